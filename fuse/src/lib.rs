//! Ekko backups as a read-only file tree, served over FUSE.
//!
//! ```text
//! MOUNTPOINT/
//!   <vm>/
//!     latest -> <newest time>
//!     <time>/                 RFC 3339 UTC, e.g. 2026-11-25T21:42:18Z
//!       <disk>.img            the raw disk at that instant
//!       <disk>/part1/ …       the guest's files, one folder per partition
//!       <disk>/whole/         … or the whole disk when it has no partition table
//!   ids/<snapshot-id> -> ../<vm>/<time>
//! ```
//!
//! Module map: `catalog` (which snapshots exist and their names), `tree`
//! (inode numbers), `fs` (the FUSE operations), `guest` (ext2/3/4 through
//! ext4-view), `ptable` (MBR and GPT), `prefetch` (sequential read-ahead) and
//! `errno` (the one mapping of errors to errno values). The crate reads
//! backups only through the core's `DiskReader`; it knows nothing of packs,
//! indexes or maps.

mod catalog;
mod errno;
mod fs;
mod guest;
mod prefetch;
mod ptable;
mod tree;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use ekko::backend::Backend;
use ekko::{ChunkCache, NodeCache};
use fuser::{Config, MountOption, SessionACL};

pub use catalog::REFRESH_INTERVAL;
pub use errno::{errno, FsError};
pub use fs::{EkkoFs, Settings, LONG_TTL, MAX_READ, SHORT_TTL, WHOLE_DISK};

/// How a tree is mounted and served.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// FUSE threads serving requests at once.
    pub threads: usize,
    /// Decoded chunks kept in memory, shared by every file of the mount.
    pub cache_bytes: u64,
    /// Decoded block-map nodes kept in memory (8 KiB each at most).
    pub map_nodes: usize,
    /// Chunks fetched ahead of a sequential reader; 0 turns read-ahead off.
    pub read_ahead_chunks: u64,
    /// Threads per guest filesystem.
    pub guest_workers: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 8,
            cache_bytes: 256 << 20,
            map_nodes: 8192,
            read_ahead_chunks: 8,
            guest_workers: 2,
        }
    }
}

/// Open the repository behind `backend` and prepare its tree. Only the
/// snapshot manifests are read; disks are opened when first used.
pub fn open(
    backend: Arc<dyn Backend>,
    passphrase: Option<Vec<u8>>,
    opts: &MountOptions,
) -> ekko::Result<EkkoFs> {
    let nodes = Arc::new(NodeCache::new(opts.map_nodes));
    let chunks = Arc::new(ChunkCache::new(opts.cache_bytes));
    let catalog = Arc::new(catalog::Catalog::open(backend, passphrase, nodes, chunks)?);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let prefetch = Arc::new(prefetch::Prefetcher::new(threads, opts.read_ahead_chunks));
    let (uid, gid) = std::fs::metadata("/proc/self").map_or((0, 0), |m| (m.uid(), m.gid()));
    Ok(EkkoFs::new(
        catalog,
        prefetch,
        tree::Owner { uid, gid },
        Settings {
            guest_workers: opts.guest_workers,
        },
    ))
}

/// Mount `fs` at `mountpoint` and serve it on background threads until the
/// returned session is unmounted (or dropped).
///
/// There is deliberately no auto-unmount: if the daemon is killed, the
/// mountpoint fails with ENOTCONN ("Transport endpoint is not connected")
/// until `fusermount3 -u`, instead of silently looking like an empty folder.
pub fn mount(
    fs: EkkoFs,
    mountpoint: &Path,
    opts: &MountOptions,
) -> std::io::Result<fuser::BackgroundSession> {
    let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("ekko".into()),
        MountOption::Subtype("ekko".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
    ];
    if is_root {
        // Other users may come in, and the kernel checks permissions: the
        // synthetic folders are root's only (0500), so guest files, which
        // keep their guest owners and modes, are reached by root alone.
        config.mount_options.push(MountOption::DefaultPermissions);
        config.acl = SessionACL::All;
    } else {
        // Only the user who mounted gets in (FUSE refuses everyone else),
        // and guest owners mean nothing on the host: that user reads every
        // guest file, as root would.
        config.acl = SessionACL::Owner;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    fuser::Session::new(fs, mountpoint, &config)?.spawn()
}
