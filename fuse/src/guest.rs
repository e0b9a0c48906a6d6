//! Guest filesystems: one `Volume` per partition (or whole disk), read
//! through the disk's `DiskReader` with ext4-view (ext2/3/4) or, failing
//! that, `fatfs` (FAT12/16/32; see `fat`).
//!
//! Neither reader is `Send` (ext4-view shares its state with `Rc`, fatfs
//! with `RefCell`), so each
//! volume runs a few worker threads, each with its own `Ext4` over the same
//! reader; FUSE threads hand them work and wait for the answer. Reads of one
//! open file always go to the same worker, which keeps the file positioned
//! where the last read ended (seeking in ext4-view walks the extent list
//! from the start). Workers load their filesystem on first use and exit
//! after a minute without work, so an idle mount holds no threads; the next
//! request starts a new worker.
//!
//! A volume whose filesystem cannot be loaded (neither ext2/3/4 nor FAT, damaged
//! superblock, …) is logged once and then shows as an empty folder; it never
//! fails anything else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ext4_view::{Ext4, Ext4Error, Ext4Read, File, Metadata};
use fuser::FileType;

use crate::catalog::{Catalog, SnapEntry};
use crate::errno::{FsError, FsResult};
use crate::fat::{Fat, PartDevice};
use crate::prefetch::{Cursor, Prefetcher};
use ekko::DiskReader;

const IDLE_EXIT: Duration = Duration::from_secs(60);
/// Open guest files a worker keeps positioned; beyond this it starts over.
const MAX_OPEN_FILES: usize = 256;

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// What a volume needs to read its bytes.
pub struct VolumeSource {
    pub catalog: Arc<Catalog>,
    pub snap: Arc<SnapEntry>,
    pub disk: String,
    pub offset: u64,
    pub size: u64,
    pub prefetch: Arc<Prefetcher>,
}

pub struct Volume {
    /// `vm/time/disk/partN`, for log lines.
    pub label: String,
    source: Arc<VolumeSource>,
    workers: Mutex<Vec<Option<Sender<Job>>>>,
    next: AtomicUsize,
    /// Set once when the filesystem cannot be loaded.
    unreadable: OnceLock<String>,
}

/// A directory entry of the guest.
pub struct GuestEntry {
    pub name: Vec<u8>,
    pub kind: FileType,
}

/// A guest file's attributes, whichever filesystem it lives in.
#[derive(Debug, Clone)]
pub struct GuestMeta {
    pub kind: FileType,
    pub size: u64,
    /// Permission bits (`0o7777` at most).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub crtime: SystemTime,
}

impl GuestMeta {
    /// A folder with no attributes of its own (a FAT root).
    pub fn dir(time: SystemTime) -> GuestMeta {
        GuestMeta {
            kind: FileType::Directory,
            size: 0,
            perm: 0o755,
            uid: 0,
            gid: 0,
            atime: time,
            mtime: time,
            crtime: time,
        }
    }

    fn from_ext4(m: &Metadata) -> GuestMeta {
        let mtime = ext4_time(m.modified());
        GuestMeta {
            kind: ext4_kind(m.file_type()),
            size: m.len(),
            perm: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            atime: ext4_time(m.accessed()),
            mtime,
            crtime: m.created().map_or(mtime, ext4_time),
        }
    }
}

fn ext4_time(t: ext4_view::Timestamp) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nanoseconds().min(999_999_999)));
    match u64::try_from(t.seconds()) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s) + nanos,
        Err(_) => UNIX_EPOCH - Duration::from_secs(t.seconds().unsigned_abs()) + nanos,
    }
}

fn ext4_kind(t: ext4_view::FileType) -> FileType {
    use ext4_view::FileType as G;
    match t {
        G::BlockDevice => FileType::BlockDevice,
        G::CharacterDevice => FileType::CharDevice,
        G::Directory => FileType::Directory,
        G::Fifo => FileType::NamedPipe,
        G::Symlink => FileType::Symlink,
        G::Socket => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// A loaded guest filesystem.
enum GuestFs {
    Ext4(Ext4),
    Fat(Box<Fat>),
}

/// The state a worker thread owns.
pub struct Worker {
    source: Arc<VolumeSource>,
    fs: Option<GuestFs>,
    /// Open ext4 files, positioned where their last read ended.
    files: HashMap<u64, File>,
}

impl Volume {
    pub fn new(label: String, source: VolumeSource, workers: usize) -> Volume {
        Volume {
            label,
            source: Arc::new(source),
            workers: Mutex::new(vec![None; workers.max(1)]),
            next: AtomicUsize::new(0),
            unreadable: OnceLock::new(),
        }
    }

    /// True once loading the filesystem has failed: the volume is empty.
    pub fn is_unreadable(&self) -> bool {
        self.unreadable.get().is_some()
    }

    /// Run `f` on a worker (`key` picks which: the same key, the same
    /// worker) and wait for its answer.
    fn call<R: Send + 'static>(
        self: &Arc<Self>,
        key: Option<u64>,
        f: impl FnOnce(&mut Worker) -> R + Send + 'static,
    ) -> FsResult<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            key,
            Box::new(move |w| {
                let _ = tx.send(f(w));
            }),
        );
        rx.recv().map_err(|_| FsError::WorkerGone)
    }

    fn submit(self: &Arc<Self>, key: Option<u64>, job: Job) {
        let mut slots = self.workers.lock().expect("workers lock");
        let n = slots.len();
        let i = match key {
            Some(k) => usize::try_from(k % u64::try_from(n).expect("small")).expect("below n"),
            None => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        let job = match &slots[i] {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                // The worker died (a panic); start another.
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("ekko-guest-{i}"))
            .spawn(move || me.run_worker(i, &rx));
        match spawned {
            Ok(_) => {
                let _ = tx.send(job);
                slots[i] = Some(tx);
            }
            Err(e) => {
                tracing::warn!(
                    "{}: cannot start a worker thread ({e}); working inline",
                    self.label
                );
                drop(slots);
                let mut w = Worker {
                    source: Arc::clone(&self.source),
                    fs: None,
                    files: HashMap::new(),
                };
                job(&mut w);
            }
        }
    }

    fn run_worker(self: Arc<Self>, slot: usize, rx: &Receiver<Job>) {
        let mut w = Worker {
            source: Arc::clone(&self.source),
            fs: None,
            files: HashMap::new(),
        };
        loop {
            match rx.recv_timeout(IDLE_EXIT) {
                Ok(job) => job(&mut w),
                Err(RecvTimeoutError::Timeout) => {
                    // Retire under the lock that senders hold, so that no job
                    // is queued to a worker that is leaving.
                    let mut slots = self.workers.lock().expect("workers lock");
                    if let Ok(job) = rx.try_recv() {
                        drop(slots);
                        job(&mut w);
                        continue;
                    }
                    slots[slot] = None;
                    return;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Run `f` on the worker's filesystem, loading it first if needed.
    /// `None`: the volume holds nothing readable.
    fn loaded<R>(
        self: &Arc<Self>,
        w: &mut Worker,
        f: impl FnOnce(&GuestFs, &mut HashMap<u64, File>) -> FsResult<R>,
    ) -> FsResult<Option<R>> {
        if self.is_unreadable() {
            return Ok(None);
        }
        if w.fs.is_none() {
            match self.load(&w.source)? {
                Ok(fs) => w.fs = Some(fs),
                Err(msg) => {
                    if self.unreadable.set(msg.clone()).is_ok() {
                        tracing::warn!(
                            "{}: no readable ext2/3/4 or FAT filesystem ({msg}); it is shown as an empty folder (the raw disk image still has its bytes)",
                            self.label
                        );
                    }
                    return Ok(None);
                }
            }
        }
        let fs = w.fs.as_ref().expect("loaded above");
        Ok(Some(f(fs, &mut w.files)?))
    }

    /// Load the volume's filesystem: ext2/3/4, else FAT. The inner error is
    /// why neither could be read.
    fn load(&self, src: &VolumeSource) -> FsResult<Result<GuestFs, String>> {
        let reader = src.catalog.reader(&src.snap, &src.disk)?;
        let part = PartRead {
            reader: Arc::clone(&reader),
            offset: src.offset,
            size: src.size,
            prefetch: Arc::clone(&src.prefetch),
            cursor: Cursor::default(),
        };
        let ext4_err = match Ext4::load(Box::new(part)) {
            Ok(fs) => return Ok(Ok(GuestFs::Ext4(fs))),
            Err(e) => e,
        };
        let dev = PartDevice::new(reader, src.offset, src.size);
        Ok(match Fat::load(dev, src.snap.time) {
            Ok(Some(fat)) => Ok(GuestFs::Fat(Box::new(fat))),
            Ok(None) => Err(ext4_err.to_string()),
            Err(e) => Err(format!("{ext4_err}; as FAT: {e}")),
        })
    }

    /// `lstat` of a guest path. `None`: the volume is unreadable.
    pub fn metadata(self: &Arc<Self>, path: Vec<u8>) -> FsResult<Option<GuestMeta>> {
        let me = Arc::clone(self);
        self.call(None, move |w| {
            me.loaded(w, |fs, _| match fs {
                GuestFs::Ext4(fs) => {
                    Ok(GuestMeta::from_ext4(&fs.symlink_metadata(path.as_slice())?))
                }
                GuestFs::Fat(fat) => Ok(fat.metadata(&path)?),
            })
        })?
    }

    /// The entries of a guest directory, without `.` and `..`.
    pub fn read_dir(self: &Arc<Self>, path: Vec<u8>) -> FsResult<Vec<GuestEntry>> {
        let me = Arc::clone(self);
        let r = self.call(None, move |w| {
            me.loaded(w, |fs, _| match fs {
                GuestFs::Ext4(fs) => {
                    let mut out = Vec::new();
                    for e in fs.read_dir(path.as_slice())? {
                        let e = e?;
                        let name = e.file_name().as_ref().to_vec();
                        if name == b"." || name == b".." {
                            continue;
                        }
                        out.push(GuestEntry {
                            name,
                            kind: ext4_kind(e.file_type()?),
                        });
                    }
                    Ok(out)
                }
                GuestFs::Fat(fat) => Ok(fat.read_dir(&path)?),
            })
        })??;
        Ok(r.unwrap_or_default())
    }

    pub fn read_link(self: &Arc<Self>, path: Vec<u8>) -> FsResult<Vec<u8>> {
        let me = Arc::clone(self);
        let r = self.call(None, move |w| {
            me.loaded(w, |fs, _| match fs {
                GuestFs::Ext4(fs) => {
                    Ok(fs.read_link(path.as_slice()).map(|p| p.as_ref().to_vec())?)
                }
                GuestFs::Fat(_) => Err(FsError::Guest(Ext4Error::NotASymlink)),
            })
        })??;
        r.ok_or(FsError::Guest(Ext4Error::NotFound))
    }

    /// Read up to `len` bytes at `offset` of the regular file `path`, opened
    /// as handle `fh`.
    pub fn read(
        self: &Arc<Self>,
        fh: u64,
        path: Vec<u8>,
        offset: u64,
        len: usize,
    ) -> FsResult<Vec<u8>> {
        let me = Arc::clone(self);
        let r = self.call(Some(fh), move |w| {
            me.loaded(w, |fs, files| match fs {
                GuestFs::Ext4(fs) => ext4_read(fs, files, fh, &path, offset, len),
                GuestFs::Fat(fat) => Ok(fat.read(&path, offset, len)?),
            })
        })??;
        r.ok_or(FsError::Guest(Ext4Error::NotFound))
    }

    /// Forget handle `fh` (its worker may already have exited).
    pub fn release(self: &Arc<Self>, fh: u64) {
        let slots = self.workers.lock().expect("workers lock");
        let n = u64::try_from(slots.len()).expect("small");
        let i = usize::try_from(fh % n).expect("below n");
        if let Some(tx) = &slots[i] {
            let _ = tx.send(Box::new(move |w: &mut Worker| {
                w.files.remove(&fh);
            }));
        }
    }
}

/// A read of an ext4 file through the worker's table of open files.
fn ext4_read(
    fs: &Ext4,
    files: &mut HashMap<u64, File>,
    fh: u64,
    path: &[u8],
    offset: u64,
    len: usize,
) -> FsResult<Vec<u8>> {
    if !files.contains_key(&fh) {
        if files.len() >= MAX_OPEN_FILES {
            files.clear();
        }
        files.insert(fh, fs.open(path)?);
    }
    let file = files.get_mut(&fh).expect("inserted above");
    let size = file.metadata().len();
    if offset >= size {
        return Ok(Vec::new());
    }
    if file.position() != offset {
        file.seek_to(offset)?;
    }
    let want =
        usize::try_from((size - offset).min(u64::try_from(len).unwrap_or(u64::MAX))).unwrap_or(len);
    let mut buf = vec![0u8; want];
    let mut done = 0;
    while done < want {
        match file.read_bytes(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => {
                // Its position is now unknown: open afresh next time.
                files.remove(&fh);
                return Err(e.into());
            }
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// The bytes of one partition, as ext4-view reads them.
struct PartRead {
    reader: Arc<DiskReader>,
    offset: u64,
    size: u64,
    prefetch: Arc<Prefetcher>,
    cursor: Cursor,
}

#[derive(Debug, thiserror::Error)]
#[error("read of {len} bytes at {start} is past the end of the partition ({size} bytes)")]
struct PastEnd {
    start: u64,
    len: u64,
    size: u64,
}

impl Ext4Read for PartRead {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let len = u64::try_from(dst.len())?;
        if start.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Box::new(PastEnd {
                start,
                len,
                size: self.size,
            }));
        }
        let at = self.offset + start;
        self.reader.read_at(dst, at).map_err(Box::new)?;
        self.prefetch.hint(&self.reader, &mut self.cursor, at, len);
        Ok(())
    }
}
