//! FAT12/16/32 guest filesystems (EFI system partitions, data volumes),
//! read with the `fatfs` crate over the disk's `DiskReader`.
//!
//! `fatfs` wants a `Read + Write + Seek` device even to read; the device
//! here refuses every write, and nothing in this module asks for one (the
//! crate writes only when a file or the volume was modified). FAT keeps no
//! owners, modes or time zones: files show as `0644` (`0444` when marked
//! read-only), folders as `0755`, owned by root, and times are taken as
//! UTC. Names are looked up case-insensitively, as FAT does.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fatfs::{Dir, DirEntry, FileSystem, FsOptions};
use fuser::FileType;

use crate::guest::{GuestEntry, GuestMeta};
use ekko::DiskReader;

/// The bytes of one partition as a read-only seekable device.
pub struct PartDevice {
    reader: Arc<DiskReader>,
    offset: u64,
    size: u64,
    pos: u64,
}

impl PartDevice {
    pub fn new(reader: Arc<DiskReader>, offset: u64, size: u64) -> PartDevice {
        PartDevice {
            reader,
            offset,
            size,
            pos: 0,
        }
    }
}

impl Read for PartDevice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.size.saturating_sub(self.pos);
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        if n == 0 {
            return Ok(0);
        }
        let at = self
            .offset
            .checked_add(self.pos)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        // A repository error travels inside the io::Error, so that damage
        // still maps to EIO with its reason logged.
        self.reader
            .read_at(&mut buf[..n], at)
            .map_err(io::Error::other)?;
        self.pos += u64::try_from(n).expect("fits");
        Ok(n)
    }
}

impl Seek for PartDevice {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let base = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos =
            base.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        Ok(self.pos)
    }
}

impl Write for PartDevice {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::ReadOnlyFilesystem,
            "backups are read-only",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A mounted FAT volume.
pub struct Fat {
    fs: FileSystem<PartDevice>,
    /// Times for the root folder, which has no entry of its own.
    root_time: SystemTime,
}

/// Quick check of a boot sector before handing it to `fatfs`: the 0x55AA
/// signature and a sane bytes-per-sector field.
fn looks_like_fat(dev: &mut PartDevice) -> io::Result<bool> {
    let mut boot = [0u8; 512];
    if dev.size < 512 {
        return Ok(false);
    }
    dev.seek(SeekFrom::Start(0))?;
    dev.read_exact(&mut boot)?;
    dev.seek(SeekFrom::Start(0))?;
    let sector = u16::from_le_bytes([boot[11], boot[12]]);
    Ok(boot[510] == 0x55 && boot[511] == 0xAA && matches!(sector, 512 | 1024 | 2048 | 4096))
}

impl Fat {
    /// `Ok(None)` when the partition holds no FAT filesystem.
    pub fn load(mut dev: PartDevice, root_time: SystemTime) -> io::Result<Option<Fat>> {
        if !looks_like_fat(&mut dev)? {
            return Ok(None);
        }
        let fs = FileSystem::new(dev, FsOptions::new())?;
        Ok(Some(Fat { fs, root_time }))
    }

    /// The entry at `path` (absolute, `/`-separated) and, for the root, `None`.
    fn entry(&self, path: &[u8]) -> io::Result<Option<DirEntry<'_, PartDevice>>> {
        let path = utf8(path)?.trim_matches('/');
        if path.is_empty() {
            return Ok(None);
        }
        let (parent, name) = match path.rfind('/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => ("", path),
        };
        let dir = self.dir(parent)?;
        for e in dir.iter() {
            let e = e?;
            if e.file_name().eq_ignore_ascii_case(name) {
                return Ok(Some(e));
            }
        }
        Err(io::Error::new(io::ErrorKind::NotFound, "no such name"))
    }

    fn dir(&self, path: &str) -> io::Result<Dir<'_, PartDevice>> {
        let path = path.trim_matches('/');
        let root = self.fs.root_dir();
        if path.is_empty() {
            Ok(root)
        } else {
            root.open_dir(path)
        }
    }

    pub fn metadata(&self, path: &[u8]) -> io::Result<GuestMeta> {
        Ok(match self.entry(path)? {
            None => GuestMeta::dir(self.root_time),
            Some(e) => meta(&e),
        })
    }

    pub fn read_dir(&self, path: &[u8]) -> io::Result<Vec<GuestEntry>> {
        let dir = self.dir(utf8(path)?)?;
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e?;
            let name = e.file_name();
            if name == "."
                || name == ".."
                || e.attributes().contains(fatfs::FileAttributes::VOLUME_ID)
            {
                continue;
            }
            out.push(GuestEntry {
                name: name.into_bytes(),
                kind: if e.is_dir() {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                },
            });
        }
        Ok(out)
    }

    /// Up to `len` bytes of file `path` at `offset`.
    pub fn read(&self, path: &[u8], offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let e = self
            .entry(path)?
            .filter(DirEntry::is_file)
            .ok_or_else(|| io::Error::new(io::ErrorKind::IsADirectory, "a folder"))?;
        let size = e.len();
        if offset >= size {
            return Ok(Vec::new());
        }
        let want = usize::try_from(size - offset).map_or(len, |l| l.min(len));
        let mut file = e.to_file();
        file.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; want];
        let mut done = 0;
        while done < want {
            match file.read(&mut buf[done..])? {
                0 => break,
                n => done += n,
            }
        }
        buf.truncate(done);
        Ok(buf)
    }
}

fn utf8(path: &[u8]) -> io::Result<&str> {
    std::str::from_utf8(path)
        .map_err(|_| io::Error::new(io::ErrorKind::NotFound, "FAT names are UTF-8 here"))
}

fn meta(e: &DirEntry<'_, PartDevice>) -> GuestMeta {
    let mtime = fat_time(e.modified());
    let readonly = e.attributes().contains(fatfs::FileAttributes::READ_ONLY);
    let (kind, perm, size) = if e.is_dir() {
        (FileType::Directory, 0o755, 0)
    } else {
        (
            FileType::RegularFile,
            if readonly { 0o444 } else { 0o644 },
            e.len(),
        )
    };
    let accessed = e.accessed();
    GuestMeta {
        kind,
        size,
        perm,
        uid: 0,
        gid: 0,
        atime: fat_time(fatfs::DateTime {
            date: accessed,
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }),
        mtime,
        crtime: fat_time(e.created()),
    }
}

fn fat_time(t: fatfs::DateTime) -> SystemTime {
    let d = &t.date;
    // An unset FAT date (all zeros) decodes as 1980-00-00: clamp into range.
    let days = ekko::time::days_from_civil(
        i64::from(d.year),
        u32::from(d.month.clamp(1, 12)),
        u32::from(d.day.clamp(1, 31)),
    );
    let secs = days * 86_400
        + i64::from(t.time.hour) * 3600
        + i64::from(t.time.min) * 60
        + i64::from(t.time.sec);
    let millis = Duration::from_millis(u64::from(t.time.millis.min(999)));
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s) + millis,
        Err(_) => UNIX_EPOCH,
    }
}
