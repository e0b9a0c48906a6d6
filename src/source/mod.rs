//! Where disk data comes from: a raw file, anything qemu-nbd can open
//! (qcow2), or an NBD export (such as a QEMU point-in-time export).
//!
//! A source says which ranges may hold data, and optionally which ranges a
//! dirty bitmap marks as changed; the backup reads only what those allow.

mod file;
mod nbd;
mod qemu_lock;

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
    /// A hint, given before the backup starts (while the repository is
    /// being opened), to start fetching the first blocks it will read.
    fn start_reading(&self) {}
    /// A hint, given before a disk is read: whether most blocks will be new
    /// to the repository, so that compressing them, not reading, bounds the
    /// backup. A file then reads around the page cache (see `FileSource`).
    fn read_direct(&self, _hint: bool) {}
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
    /// After the last read: an error if the source changed while it was
    /// read, so that its blocks come from different moments.
    fn unchanged(&self) -> Result<()> {
        Ok(())
    }
}

/// What tells that an image file changed: its size, modification time,
/// and identity (a file replaced under the same name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    dev: u64,
    ino: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// An image file read offline, watched for changes: nothing keeps a
/// process other than QEMU from writing or truncating it meanwhile, and
/// its blocks would then come from different moments (a qcow2 image cut
/// short even reads as zeros past its new end).
struct Watched {
    inner: Box<dyn Source>,
    path: std::path::PathBuf,
    before: Stamp,
}

impl Watched {
    fn check(&self) -> Result<()> {
        // Opened again, as at the start (see `open`).
        let now = std::fs::File::open(&self.path)
            .and_then(|f| f.metadata())
            .map(|m| Stamp::of(&m));
        let what = match now {
            Err(e) => format!("it can no longer be opened ({e})"),
            Ok(now) if now == self.before => return Ok(()),
            Ok(now) if now.dev != self.before.dev || now.ino != self.before.ino => {
                "another file replaced it".to_string()
            }
            Ok(now) if now.len != self.before.len => format!(
                "its size went from {} to {} bytes",
                self.before.len, now.len
            ),
            Ok(_) => "it was written to".to_string(),
        };
        Err(Error::Source {
            source_name: self.path.display().to_string(),
            reason: format!(
                "the image changed while it was read ({what}), so its blocks would come from different moments; nothing was committed. Stop what writes to it (or back a running VM up live, with --qmp or --domain), then run the backup again"
            ),
        })
    }
}

impl Source for Watched {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // A read that fails because the file was cut short says so.
        self.inner
            .read_at(buf, offset)
            .map_err(|e| self.check().err().unwrap_or(e))
    }
    fn data_ranges(&self) -> Result<Vec<Range>> {
        self.inner.data_ranges()
    }
    fn will_need(&self, offset: u64, len: u64) {
        self.inner.will_need(offset, len);
    }
    fn start_reading(&self) {
        self.inner.start_reading();
    }
    fn read_direct(&self, hint: bool) {
        self.inner.read_direct(hint);
    }
    fn read_threads(&self) -> usize {
        self.inner.read_threads()
    }
    fn dirty_ranges(&self) -> Result<Option<Vec<Range>>> {
        self.inner.dirty_ranges()
    }
    fn unchanged(&self) -> Result<()> {
        self.inner.unchanged()?;
        self.check()
    }
}

/// How to open a source; see [`open`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions<'a> {
    /// A dirty bitmap to read changes from.
    pub bitmap: Option<&'a str>,
    /// NBD connections (for NBD sources and qcow2 images).
    pub connections: usize,
    /// Read an image although a running QEMU has it open for writing.
    pub allow_in_use: bool,
}

/// Open `spec`: an `nbd://`/`nbd+unix://` URI, or an image path. qcow2 and
/// other formats go through qemu-nbd.
///
/// An image that a running QEMU (a VM, qemu-storage-daemon, qemu-nbd) has
/// open for writing is refused unless `allow_in_use`: blocks read from it
/// would come from different moments, a torn disk that may not even mount.
pub fn open(spec: &str, opts: &OpenOptions<'_>) -> Result<Box<dyn Source>> {
    let OpenOptions {
        bitmap,
        connections,
        allow_in_use,
    } = *opts;
    if is_nbd_uri(spec) {
        return Ok(Box::new(NbdSource::connect_uri(spec, bitmap, connections)?));
    }
    let (explicit, file) = split_format(spec);
    let path = std::path::Path::new(file);
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
    let format = match explicit {
        Some(f) => f,
        None => {
            let f = image_format(path)?;
            if f != "raw" {
                refuse_references(path, f, allow_in_use)?;
            }
            f
        }
    };
    if format == "raw" && bitmap.is_some() {
        return Err(Error::Source {
            source_name: spec.into(),
            reason: "a raw image has no dirty bitmaps; drop --bitmap or use a qcow2 image".into(),
        });
    }
    // Keep writers out first, then look for one already there: a QEMU
    // starting in between fails to get its write lock. (qemu-nbd keeps
    // writers out of a qcow2 image by itself, as long as it runs.)
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Taken from the open file: a network file system refreshes its
    // attributes on open, where a plain stat may return cached ones.
    let before = Stamp::of(&file.metadata().map_err(|e| Error::io(path, e))?);
    if !allow_in_use {
        if let Err(e) = qemu_lock::forbid_writers(&file) {
            tracing::debug!(path = %path.display(), "cannot take QEMU's image lock: {e}");
        }
        match qemu_lock::open_for_writing(&file) {
            Ok(false) => {}
            Ok(true) => {
                return Err(Error::Source {
                    source_name: spec.into(),
                    reason: "a running QEMU has this image open for writing (it holds \
                             QEMU's write lock), so a backup read from the file would mix \
                             blocks from different moments. Back the VM up live with --qmp \
                             SOCKET or --domain NAME, or shut it down first; --allow-in-use \
                             reads the file anyway"
                        .into(),
                })
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), "cannot test QEMU's image lock: {e}");
            }
        }
    }
    let inner: Box<dyn Source> = if format == "raw" {
        Box::new(FileSource::from_file(path, file)?)
    } else {
        drop(file);
        Box::new(NbdSource::qemu_nbd(
            path,
            format,
            bitmap,
            connections,
            allow_in_use,
        )?)
    };
    // --allow-in-use reads an image a VM writes: changes are expected.
    if allow_in_use {
        return Ok(inner);
    }
    Ok(Box::new(Watched {
        inner,
        path: path.to_path_buf(),
        before,
    }))
}

/// Whether reading `spec` (as `open` takes it) goes through libnbd: an NBD
/// URI, or an image that is not raw. Guesses `false` for what `open`
/// would refuse.
pub fn needs_nbd(spec: &str) -> bool {
    if is_nbd_uri(spec) {
        return true;
    }
    match split_format(spec) {
        (Some(f), _) => f != "raw",
        (None, file) => image_format(std::path::Path::new(file)).is_ok_and(|f| f != "raw"),
    }
}

/// The image formats a source may name before its path (`qcow2:/path`).
const FORMATS: [&str; 9] = [
    "raw",
    "qcow2",
    "qcow",
    "vmdk",
    "vdi",
    "vhdx",
    "vpc",
    "qed",
    "parallels",
];

/// `FORMAT:PATH` → (the format, the path); anything else is a path whose
/// format is sniffed.
fn split_format(spec: &str) -> (Option<&'static str>, &str) {
    if let Some((f, path)) = spec.split_once(':') {
        if let Some(known) = FORMATS.iter().find(|k| **k == f) {
            return (Some(known), path);
        }
    }
    (None, spec)
}

/// What `qemu-img info` says of the image at `path` opened as `format`
/// (with its whole backing chain, an array, when `chain`): its JSON, or
/// QEMU's reason why the image does not open.
fn qemu_img_info(
    path: &std::path::Path,
    format: &str,
    force_share: bool,
    chain: bool,
) -> std::io::Result<std::result::Result<serde_json::Value, String>> {
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["info", "--output=json", "-f", format]);
    if chain {
        cmd.arg("--backing-chain");
    }
    if force_share {
        cmd.arg("-U");
    }
    let out = cmd.arg(path).output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Ok(Err(err.trim().trim_start_matches("qemu-img: ").to_string()));
    }
    Ok(Ok(serde_json::from_slice(&out.stdout).unwrap_or_default()))
}

/// A format that was only sniffed comes from bytes that whoever wrote the
/// image controls (a guest writing sector 0 of its raw disk): such an image
/// may not make ekko read other files (a backing file, VMDK extents, an
/// external data file). Naming the format says the image is what it looks
/// like. `qemu-img info` (without the chain) says what it refers to.
fn refuse_references(path: &std::path::Path, format: &str, force_share: bool) -> Result<()> {
    let info = qemu_img_info(path, format, force_share, false).map_err(|e| Error::Source {
        source_name: path.display().to_string(),
        reason: format!("running qemu-img info: {e}"),
    })?;
    // One that does not open: qemu-nbd fails on it too, and says why.
    let Ok(info) = info else {
        return Ok(());
    };
    let me = path.display().to_string();
    let mut refs: Vec<String> = Vec::new();
    if let Some(b) = info.get("backing-filename").and_then(|v| v.as_str()) {
        refs.push(b.to_string());
    }
    if let Some(d) = info
        .pointer("/format-specific/data/data-file")
        .and_then(|v| v.as_str())
    {
        refs.push(d.to_string());
    }
    for e in info
        .pointer("/format-specific/data/extents")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        if let Some(f) = e.get("filename").and_then(|v| v.as_str()) {
            let same = std::fs::canonicalize(f).ok() == std::fs::canonicalize(path).ok();
            if !same {
                refs.push(f.to_string());
            }
        }
    }
    if refs.is_empty() {
        return Ok(());
    }
    Err(Error::Source {
        source_name: me.clone(),
        reason: format!(
            "looks like a {format} image that refers to other files ({}). ekko follows such references only when the format is named: --disk NAME={format}:{me} if this is a {format} image you trust, or raw:{me} to back up the file's own bytes",
            refs.join(", ")
        ),
    })
}

fn is_nbd_uri(spec: &str) -> bool {
    ["nbd://", "nbd+unix://", "nbds://"]
        .iter()
        .any(|p| spec.starts_with(p))
}

/// Sniff the image format from its first bytes, as QEMU's own probes do,
/// for the formats qemu-nbd reads. Anything else, LUKS included, is raw.
fn image_format(path: &std::path::Path) -> Result<&'static str> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    let head = &head[..n];
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let format = if at(0, b"QFI\xfb") {
        // Version 1 is the old qcow format; 2 and 3 are qcow2.
        if at(4, &[0, 0, 0, 1]) {
            "qcow"
        } else {
            "qcow2"
        }
    } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") || at(0, b"COWD") {
        "vmdk"
    } else if at(0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
        "vdi"
    } else if at(0, b"vhdxfile") {
        "vhdx"
    } else if at(0, b"conectix") {
        "vpc"
    } else if at(0, b"QED\0") {
        "qed"
    } else if at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt") {
        "parallels"
    } else if at(0, b"LUKS\xba\xbe") {
        // A LUKS container (QEMU's, or a guest's whole-disk one): its bytes
        // are the disk, and a restore gives back the same container.
        tracing::info!(
            "{}: a LUKS container; its encrypted bytes are backed up as they are (they neither compress nor deduplicate)",
            path.display()
        );
        "raw"
    } else {
        "raw"
    };
    Ok(format)
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
