//! libvirt for Ekko: a domain's disks and metadata, its checkpoints, and
//! pull-mode backup jobs, through libvirt's own C API, loaded from
//! `libvirt.so.0` on first use (see `ffi` for why it is not linked).
//!
//! This crate knows nothing of repositories. It does what a libvirt client
//! may do: `virDomainBackupBegin` in pull mode with a checkpoint, look up,
//! list and delete checkpoints, abort the domain's job, and freeze and thaw
//! guest file systems through libvirt's guest agent channel. The decisions
//! (which checkpoint to build on, which to delete) belong to the caller.

mod domain;
mod error;
mod ffi;
pub mod xml;

pub use domain::{Connection, Domain};
pub use error::Error;
pub use xml::{BackupJob, CheckpointDisk, CheckpointInfo, DiskInfo, DomainInfo, NovaInfo};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The URI ekko connects to unless told otherwise.
/// Loads libvirt now, if it is not loaded yet (`Connection::open` loads it
/// too): lets a caller start the load early, on a thread of its own.
pub fn load() -> Result<()> {
    ffi::api().map(drop)
}

pub const DEFAULT_URI: &str = "qemu:///system";
