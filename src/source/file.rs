//! A raw image file or block device, read with `pread`; holes are found with
//! `SEEK_DATA`/`SEEK_HOLE` so that sparse regions are never read.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Range, Source};
use crate::error::{Error, Result};

pub struct FileSource {
    path: PathBuf,
    file: File,
    size: u64,
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
        Ok(FileSource {
            path: path.to_path_buf(),
            file,
            size,
        })
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
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(&self.path, e))
    }

    fn will_need(&self, offset: u64, len: u64) {
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
