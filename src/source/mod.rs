//! Where disk data comes from: a raw file, anything qemu-nbd can open
//! (qcow2), or an NBD export (such as a QEMU point-in-time export).
//!
//! A source says which ranges may hold data, and optionally which ranges a
//! dirty bitmap marks as changed; the backup reads only what those allow.

mod file;
mod nbd;

pub use file::FileSource;
pub use nbd::NbdSource;

use crate::error::{Error, Result};

/// A byte range `[offset, offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

pub trait Source: Send + Sync {
    /// What to call this source in messages and manifests.
    fn describe(&self) -> String;
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; the range lies within `size`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Ranges that may hold non-zero data, sorted. Everything else reads
    /// as zeros.
    fn data_ranges(&self) -> Result<Vec<Range>>;
    /// A hint that `[offset, offset+len)` will be read soon, so that the
    /// source can start fetching it (deep I/O queues are what make
    /// virtualised and networked disks fast).
    fn will_need(&self, _offset: u64, _len: u64) {}
    /// Threads that should read this source ahead of the workers that hash
    /// and compress, so that the two overlap. 0 (the default): each worker
    /// reads its own blocks, which suits sources the kernel reads ahead
    /// (files, with `will_need`) and keeps each block in the cache of the
    /// core that reads it.
    fn read_threads(&self) -> usize {
        0
    }
    /// Ranges a dirty bitmap marks as changed, sorted; `None` when the source
    /// has no bitmap.
    fn dirty_ranges(&self) -> Result<Option<Vec<Range>>> {
        Ok(None)
    }
}

/// Open `spec`: an `nbd://`/`nbd+unix://` URI, or an image path. qcow2 and
/// other formats go through qemu-nbd; `bitmap` names a dirty bitmap to use.
pub fn open(spec: &str, bitmap: Option<&str>, connections: usize) -> Result<Box<dyn Source>> {
    if is_nbd_uri(spec) {
        return Ok(Box::new(NbdSource::connect_uri(spec, bitmap, connections)?));
    }
    let path = std::path::Path::new(spec);
    let meta = std::fs::metadata(path).map_err(|e| Error::Source {
        source_name: spec.into(),
        reason: format!("cannot open: {e}"),
    })?;
    if meta.is_dir() {
        return Err(Error::Source {
            source_name: spec.into(),
            reason: "is a directory, not a disk image".into(),
        });
    }
    let format = image_format(path)?;
    if format == "raw" && bitmap.is_none() {
        return Ok(Box::new(FileSource::open(path)?));
    }
    if format == "raw" {
        return Err(Error::Source {
            source_name: spec.into(),
            reason: "a raw image has no dirty bitmaps; drop --bitmap or use a qcow2 image".into(),
        });
    }
    Ok(Box::new(NbdSource::qemu_nbd(
        path,
        format,
        bitmap,
        connections,
    )?))
}

/// Whether reading `spec` (as `open` takes it) goes through libnbd: an NBD
/// URI, or an image that is not raw. Guesses `false` for what `open`
/// would refuse.
pub fn needs_nbd(spec: &str) -> bool {
    is_nbd_uri(spec) || image_format(std::path::Path::new(spec)).is_ok_and(|f| f != "raw")
}

fn is_nbd_uri(spec: &str) -> bool {
    ["nbd://", "nbd+unix://", "nbds://"]
        .iter()
        .any(|p| spec.starts_with(p))
}

/// Sniff the image format from its first bytes.
fn image_format(path: &std::path::Path) -> Result<&'static str> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// Merge sorted-or-not ranges into sorted, non-overlapping ones.
pub fn normalize(mut v: Vec<Range>) -> Vec<Range> {
    v.retain(|r| r.len > 0);
    v.sort_by_key(|r| r.offset);
    let mut out: Vec<Range> = Vec::with_capacity(v.len());
    for r in v {
        if let Some(last) = out.last_mut() {
            let end = last.offset + last.len;
            if r.offset <= end {
                last.len = last.len.max(r.offset + r.len - last.offset);
                continue;
            }
        }
        out.push(r);
    }
    out
}
