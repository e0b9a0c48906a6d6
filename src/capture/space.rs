//! The fleecing directory's free space, watched while a live backup reads.
//!
//! While a backup reads its point-in-time view, QEMU copies every block the
//! guest overwrites into the fleecing file first (copy-before-write). If
//! that file cannot grow, QEMU fails the guest's write: the guest sees I/O
//! errors for as long as the backup runs. QEMU's copy-before-write filter
//! can instead break the snapshot (`on-cbw-error=break-snapshot`), but
//! `blockdev-backup` and libvirt do not let us choose that. So ekko keeps
//! a reserve: it does not start when the directory has less free space,
//! and it stops the backup (nothing committed, QEMU put back as it was)
//! when free space falls below it, before the file system is full.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the watchdog looks at the free space.
const POLL: Duration = Duration::from_millis(20);

/// The default reserve: 1 GiB, or a tenth of the file system if that is
/// smaller. At the guest's 1 GB/s of overwrites this leaves about a
/// second to stop, against the tens of milliseconds stopping takes.
pub const DEFAULT_RESERVE: u64 = 1 << 30;

/// Free bytes for unprivileged writers on the file system of `dir` (or of
/// its nearest existing parent, before it is created), and its size.
pub fn free_and_size(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let dir = dir
        .ancestors()
        .find(|d| d.exists())
        .unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: an all-zero statvfs is valid, and statvfs only writes to it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize: u64 = st.f_frsize;
    let free = st.f_bavail.saturating_mul(frsize);
    let size = st.f_blocks.saturating_mul(frsize);
    Ok((free, size))
}

/// The reserve to keep in `dir`: `asked`, or the default for its file
/// system.
pub fn reserve_for(dir: &Path, asked: Option<u64>) -> u64 {
    asked.unwrap_or_else(|| match free_and_size(dir) {
        Ok((_, size)) => DEFAULT_RESERVE.min(size / 10),
        Err(_) => DEFAULT_RESERVE,
    })
}

/// Why a watched backup stopped: the free space seen, below `reserve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LowSpace {
    pub free: u64,
    pub reserve: u64,
}

/// `Err` when `dir` has less than `reserve` bytes free now.
pub fn check(dir: &Path, reserve: u64) -> Result<(), LowSpace> {
    match free_and_size(dir) {
        Ok((free, _)) if free < reserve => Err(LowSpace { free, reserve }),
        _ => Ok(()),
    }
}

/// Runs `f` while a watchdog thread looks at the free space of `dir`. When
/// it falls below `reserve`, the watchdog sets `cancel`, so that `f` stops
/// early, and the space it saw is returned beside `f`'s result.
pub fn watch<T>(
    dir: &Path,
    reserve: u64,
    cancel: &Arc<AtomicBool>,
    f: impl FnOnce() -> T,
) -> (T, Option<LowSpace>) {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let watchdog = scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Err(low) = check(dir, reserve) {
                    tracing::warn!(
                        dir = %dir.display(),
                        free = low.free,
                        reserve,
                        "the fleecing directory is nearly full; stopping the backup"
                    );
                    cancel.store(true, Ordering::Relaxed);
                    return Some(low);
                }
                std::thread::park_timeout(POLL);
            }
            None
        });
        let out = f();
        done.store(true, Ordering::Relaxed);
        watchdog.thread().unpark();
        (out, watchdog.join().expect("the space watchdog panicked"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_cancels_when_space_runs_below_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let (free, size) = free_and_size(dir.path()).unwrap();
        assert!(free > 0 && size >= free);
        assert_eq!(reserve_for(dir.path(), Some(5)), 5);
        assert!(reserve_for(dir.path(), None) <= DEFAULT_RESERVE);

        // A reserve above what is free trips at once, and `f` sees it.
        let cancel = Arc::new(AtomicBool::new(false));
        let (saw, low) = watch(dir.path(), u64::MAX, &cancel, || {
            let t = std::time::Instant::now();
            while !cancel.load(Ordering::Relaxed) {
                assert!(t.elapsed() < Duration::from_secs(10), "never cancelled");
                std::thread::sleep(Duration::from_millis(1));
            }
            true
        });
        assert!(saw);
        let low = low.expect("tripped");
        assert_eq!(low.reserve, u64::MAX);
        assert!(check(dir.path(), u64::MAX).is_err());

        // A reserve of nothing never trips.
        let cancel = Arc::new(AtomicBool::new(false));
        let ((), low) = watch(dir.path(), 0, &cancel, || {
            std::thread::sleep(Duration::from_millis(60));
        });
        assert_eq!(low, None);
        assert!(!cancel.load(Ordering::Relaxed));
        assert!(check(dir.path(), 0).is_ok());
    }
}
