//! libvirt for Ekko: a domain's disks and metadata, its checkpoints, and
//! pull-mode backup jobs, through libvirt's own API (the official `virt`
//! crate, plus its raw `virt::sys` bindings where the safe API stops: 0.5
//! has no checkpoints, backups, job abort or fsfreeze).
//!
//! This crate knows nothing of repositories. It does what a libvirt client
//! may do: `virDomainBackupBegin` in pull mode with a checkpoint, look up,
//! list and delete checkpoints, abort the domain's job, and freeze and thaw
//! guest file systems through libvirt's guest agent channel. The decisions
//! (which checkpoint to build on, which to delete) belong to the caller.

mod domain;
mod error;
pub mod xml;

pub use domain::{Connection, Domain};
pub use error::Error;
pub use xml::{BackupJob, CheckpointDisk, CheckpointInfo, DiskInfo, DomainInfo, NovaInfo};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The URI ekko connects to unless told otherwise.
pub const DEFAULT_URI: &str = "qemu:///system";
