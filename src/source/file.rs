//! A raw image file or block device, read with `pread`; holes are found with
//! `SEEK_DATA`/`SEEK_HOLE` so that sparse regions are never read.
//!
//! When the backup will be bound by CPU (`Source::read_direct`), reads go
//! around the page cache (`O_DIRECT`) where the file system allows it and
//! the buffer, offset and length are aligned: a backup reads each block
//! once, so caching it only costs a copy (in a first backup, about a tenth
//! of the CPU) and evicts what the host was using. Reader threads then keep
//! several requests in flight, since the kernel reads nothing ahead for
//! direct I/O. Anything unaligned (the tail of an image whose size is not a
//! multiple of 4 KiB) is read through the page cache. A backup bound by the
//! disk reads through the page cache, whose read-ahead is faster on these
//! disks. (`start_reading`, called while the repository opens and before
//! the backup knows which it will be, still fetches the first 32 MiB into
//! the cache.)

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Range, Source};
use crate::aligned;
use crate::error::{Error, Result};

pub struct FileSource {
    path: PathBuf,
    file: File,
    /// The same file opened with `O_DIRECT`, if its file system reads that
    /// way (see `open_direct`).
    direct: Option<File>,
    /// Whether reads use `direct` (see `Source::read_direct`).
    direct_on: AtomicBool,
    size: u64,
}

/// Reader threads for direct reads: requests in flight, since nothing
/// reads ahead. Four 1 MiB requests keep these virtual disks at their
/// parallel read speed.
const DIRECT_READERS: usize = 4;

/// `EKKO_DIRECT_READ=1` reads around the page cache whenever it can, `0`
/// never; unset, the backup's hint decides.
fn direct_override() -> Option<bool> {
    match std::env::var("EKKO_DIRECT_READ").ok()?.as_str() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// Open `file` again with `O_DIRECT`, and keep it only if an aligned read
/// works: some file systems (tmpfs on older kernels, some FUSE ones) refuse
/// the flag at open, others only at the first read. It is reopened through
/// `/proc/self/fd`, not by its path, so that both descriptors read the same
/// file even if the path has been replaced since (the flag cannot be set on
/// a duplicate: `dup` shares the file status flags).
fn open_direct(path: &Path, file: &File, size: u64) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if direct_override() == Some(false) {
        return None;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()?;
    let probe = usize::try_from(size.min(aligned::ALIGN as u64)).ok()?;
    let mut buf = aligned::AlignedBuf::new(aligned::ALIGN);
    match file.read_at(buf.get_mut(aligned::ALIGN), 0) {
        Ok(n) if n == probe => Some(file),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(path = %path.display(), "no direct reads: {e}");
            None
        }
    }
}

impl FileSource {
    pub fn open(path: &Path) -> Result<FileSource> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Self::from_file(path, file)
    }

    /// Reads `file`, opened from `path` (and kept open, with any locks
    /// taken on it, as long as the source lives).
    pub fn from_file(path: &Path, mut file: File) -> Result<FileSource> {
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(path, e))?;
        let direct = open_direct(path, &file, size);
        Ok(FileSource {
            path: path.to_path_buf(),
            file,
            direct,
            direct_on: AtomicBool::new(false),
            size,
        })
    }

    /// The `O_DIRECT` file, when reads use it.
    fn direct(&self) -> Option<&File> {
        self.direct
            .as_ref()
            .filter(|_| self.direct_on.load(Ordering::Relaxed))
    }
}

/// How much of an image `start_reading` asks the kernel for: what the
/// backup's own read-ahead would ask for first.
const START_READING_BYTES: u64 = 32 << 20;

fn lseek(fd: i32, off: u64, whence: i32) -> Option<u64> {
    let off = libc::off_t::try_from(off).ok()?;
    // SAFETY: lseek on a valid descriptor with plain integer arguments.
    let r = unsafe { libc::lseek(fd, off, whence) };
    u64::try_from(r).ok()
}

impl Source for FileSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(direct) = self.direct() {
            if buf.as_ptr().align_offset(aligned::ALIGN) == 0 && aligned::fits(offset, buf.len()) {
                match direct.read_exact_at(buf, offset) {
                    Ok(()) => return Ok(()),
                    // Alignment the device wants more of: try the cache.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) => return Err(Error::io(&self.path, e)),
                }
            }
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(&self.path, e))
    }

    fn read_direct(&self, hint: bool) {
        let on = self.direct.is_some() && direct_override().unwrap_or(hint);
        self.direct_on.store(on, Ordering::Relaxed);
    }

    fn read_threads(&self) -> usize {
        if self.direct().is_some() {
            DIRECT_READERS
        } else {
            0
        }
    }

    fn will_need(&self, offset: u64, len: u64) {
        if self.direct().is_some() {
            return; // the page cache is not read from
        }
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return;
        };
        // SAFETY: posix_fadvise on a valid descriptor; it only schedules
        // readahead into the page cache.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED);
        }
    }

    fn start_reading(&self) {
        let first = lseek(self.file.as_raw_fd(), 0, libc::SEEK_DATA).unwrap_or(0);
        self.will_need(
            first,
            START_READING_BYTES.min(self.size.saturating_sub(first)),
        );
    }

    fn data_ranges(&self) -> Result<Vec<Range>> {
        let fd = self.file.as_raw_fd();
        let whole = vec![Range {
            offset: 0,
            len: self.size,
        }];
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let Some(data) = lseek(fd, pos, libc::SEEK_DATA) else {
                // ENXIO: no data after `pos`. Anything else (EINVAL on a
                // filesystem without SEEK_DATA, a block device): read it all.
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return Ok(whole);
            };
            if data >= self.size {
                break;
            }
            let hole = lseek(fd, data, libc::SEEK_HOLE)
                .unwrap_or(self.size)
                .min(self.size);
            out.push(Range {
                offset: data,
                len: hole - data,
            });
            pos = hole;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct reads return the same bytes as reads through the page cache,
    /// for aligned blocks, an unaligned buffer, and the unaligned tail.
    #[test]
    fn direct_reads_equal_cached_reads() {
        // tempdir() is on the same file system as the tests' images (ext4
        // here); a file system without O_DIRECT would fail the first check.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let size = (3 << 20) + 777;
        let data: Vec<u8> = (0..size).map(|i: usize| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let src = FileSource::open(&path).unwrap();
        assert!(src.direct().is_none(), "reads are cached until hinted");
        assert_eq!(src.read_threads(), 0);
        src.read_direct(true);
        if direct_override() != Some(false) {
            assert!(src.direct().is_some(), "no O_DIRECT on {}", path.display());
            assert_eq!(src.read_threads(), DIRECT_READERS);
        }
        let mut buf = aligned::AlignedBuf::new(1 << 20);
        for off in [0usize, 1 << 20, 2 << 20] {
            src.read_at(buf.get_mut(1 << 20), off as u64).unwrap();
            assert_eq!(buf.get(1 << 20), &data[off..off + (1 << 20)]);
        }
        // The tail: shorter than the alignment allows.
        let tail = size - (3 << 20);
        src.read_at(buf.get_mut(tail), 3 << 20).unwrap();
        assert_eq!(buf.get(tail), &data[3 << 20..]);
        // An unaligned buffer and offset.
        let mut odd = vec![0u8; 10_001];
        src.read_at(&mut odd[1..], 4097).unwrap();
        assert_eq!(&odd[1..], &data[4097..4097 + 10_000]);
        // Past the end is an error, direct or not.
        assert!(src.read_at(buf.get_mut(1 << 20), 3 << 20).is_err());
        src.read_direct(false);
        assert!(src.direct().is_none());
    }
}
