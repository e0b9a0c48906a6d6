//! Ekko: block-based, incremental, deduplicating backup for QEMU/KVM disks.
//!
//! The public API is this list. `Repository` opens a repository through a
//! `Backend`; `backup::Session` writes snapshots from `source::Source`s;
//! `reader::DiskReader` reads any disk of any snapshot at any offset, which is
//! all that restore, the FUSE tree and the NBD server need.

pub mod aligned;
pub mod atomic_file;
pub mod backend;
pub mod backup;
pub mod blockmap;
pub mod capture;
pub mod check;
pub mod chunk;
pub mod crypto;
pub mod diff;
pub mod error;
pub mod format;
pub mod gc;
pub mod id;
pub mod index;
mod kdf_memory;
pub mod keyring;
pub mod lock;
pub mod lost;
pub mod pack;
pub mod prune;
pub mod ratelimit;
pub mod reader;
pub mod repair;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod secret;
pub mod serve_nbd;
pub mod siv;
pub mod snapshot;
pub mod source;
pub mod time;

pub use backend::{Backend, LocalBackend, S3Backend};
pub use error::{Error, Result};
pub use id::{ChunkId, ObjectId};
pub use reader::{ChunkCache, DiskReader, Extent, NodeCache};
pub use repo::{InitOptions, Repository};
pub use snapshot::{Disk, Snapshot};
