//! QMP client and point-in-time fleecing sessions for live, pull-mode
//! incremental backups of QEMU VMs (qemu-system or qemu-storage-daemon).
//!
//! * [`Qmp`]: a synchronous QMP client with timeouts and an event buffer.
//! * [`inventory`]: disks, block nodes and dirty bitmaps.
//! * [`FleeceSession`]: exports every disk at one instant over NBD, with the
//!   dirty bitmap of the previous backup, and manages bitmap generations.
//! * [`GuestAgent`]: freezes guest file systems around that instant.

pub mod error;
pub mod guest_agent;
pub mod inventory;
mod nbd;
pub mod qmp;
pub mod session;
mod util;

pub use error::{Error, Result};
pub use guest_agent::GuestAgent;
pub use inventory::{list_disks, node_size, BitmapInfo, DiskInfo, NodeInfo};
pub use qmp::Qmp;
pub use session::{
    cleanup_stale, cleanup_stale_if, DiskSpec, FleeceSession, SessionConfig, SessionExport,
    StaleCleanup,
};
pub use util::{percent_encode, pid_alive};
