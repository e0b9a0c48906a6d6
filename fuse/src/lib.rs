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
//! (inode numbers), `fs` (the FUSE operations), `guest` (guest filesystems:
//! ext2/3/4 through ext4-view), `fat` (FAT12/16/32 through fatfs), `ptable` (MBR and GPT), `prefetch` (sequential read-ahead) and
//! `errno` (the one mapping of errors to errno values). The crate reads
//! backups only through the core's `DiskReader`; it knows nothing of packs,
//! indexes or maps.

mod catalog;
mod errno;
mod fat;
mod fs;
mod guest;
mod prefetch;
mod ptable;
mod tree;

use std::os::unix::ffi::OsStrExt;
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
    /// The kernel's read-ahead for files of the mount, in KiB (the mount's
    /// `/sys/class/bdi/<dev>/read_ahead_kb`); 0 leaves it as it is. Needs root.
    pub kernel_read_ahead_kib: u32,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 8,
            cache_bytes: 256 << 20,
            map_nodes: 8192,
            read_ahead_chunks: 16,
            guest_workers: 2,
            kernel_read_ahead_kib: 4 << 10,
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
    let ready = fs.ready_gate();
    let session = fuser::Session::new(fs, mountpoint, &config)?.spawn()?;
    if is_root && opts.kernel_read_ahead_kib > 0 {
        // For guest files (images use direct I/O and the daemon's read-ahead).
        raise_read_ahead(mountpoint, opts.kernel_read_ahead_kib);
    }
    ready.open();
    Ok(session)
}

/// The `major:minor` of the FUSE mount at `mountpoint`, once the kernel has
/// the daemon's init reply (which would otherwise reset the read-ahead).
///
/// Neither step asks for the root's attributes: the kernel would cache them
/// for a second, and a daemon killed within that second would leave a mount
/// that looks like a folder instead of failing with ENOTCONN.
fn mount_device(mountpoint: &Path) -> Option<String> {
    let mp = std::fs::canonicalize(mountpoint).ok()?;
    let c = std::ffi::CString::new(mp.as_os_str().as_bytes()).ok()?;
    // statfs waits until the connection is initialized; nothing is cached.
    // SAFETY: `c` is a valid C string and `st` a zeroed struct that we own.
    let ok = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0
    };
    if !ok {
        return None;
    }
    // /proc/self/mountinfo: "id parent major:minor root mountpoint …", with
    // spaces and the like in paths escaped as \ooo; the last match is on top.
    let want = mountinfo_escape(mp.as_os_str().as_bytes());
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 4 && f[4].as_bytes() == want.as_slice()).then(|| f[2].to_string())
        })
        .next_back()
}

fn mountinfo_escape(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for &b in path {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\\') {
            out.extend_from_slice(format!("\\{b:03o}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

/// Raise the kernel's read-ahead for the mount (best effort).
///
/// The kernel offers FUSE the default read-ahead (128 KiB) at init, and a
/// daemon can only lower it there; sequential reads of `<disk>.img` then
/// come as many small requests, mostly one at a time. A larger window makes
/// the kernel send requests of the largest size (`MAX_READ`) several at a
/// time, so that chunks are fetched and decoded in parallel. The setting
/// belongs to the mount's backing device and applies to files opened
/// afterwards.
fn raise_read_ahead(mountpoint: &Path, kib: u32) -> bool {
    let Some(dev) = mount_device(mountpoint) else {
        tracing::warn!(
            "cannot find the device of {}; read-ahead left as it is",
            mountpoint.display()
        );
        return false;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&path, format!("{kib}\n")) {
        Ok(()) => {
            tracing::debug!("{path}: read-ahead set to {kib} KiB");
            true
        }
        Err(e) => {
            tracing::warn!("cannot set {path} ({e}); read-ahead left as it is");
            false
        }
    }
}
