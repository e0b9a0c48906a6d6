//! Guest filesystems: one `Volume` per partition (or whole disk), read with
//! ext4-view through the disk's `DiskReader`.
//!
//! `ext4_view::Ext4` is not `Send` (it shares its state with `Rc`), so each
//! volume runs a few worker threads, each with its own `Ext4` over the same
//! reader; FUSE threads hand them work and wait for the answer. Reads of one
//! open file always go to the same worker, which keeps the file positioned
//! where the last read ended (seeking in ext4-view walks the extent list
//! from the start). Workers load their filesystem on first use and exit
//! after a minute without work, so an idle mount holds no threads; the next
//! request starts a new worker.
//!
//! A volume whose filesystem cannot be loaded (not ext2/3/4, damaged
//! superblock, …) is logged once and then shows as an empty folder; it never
//! fails anything else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ext4_view::{Ext4, Ext4Error, Ext4Read, File, Metadata};

use crate::catalog::{Catalog, SnapEntry};
use crate::errno::{FsError, FsResult};
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
    pub kind: ext4_view::FileType,
}

/// The state a worker thread owns.
pub struct Worker {
    source: Arc<VolumeSource>,
    fs: Option<Ext4>,
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

    fn loaded<R>(
        self: &Arc<Self>,
        w: &mut Worker,
        f: impl FnOnce(&Ext4) -> Result<R, Ext4Error>,
    ) -> FsResult<Option<R>> {
        if self.is_unreadable() {
            return Ok(None);
        }
        if w.fs.is_none() {
            let src = &w.source;
            let reader = src.catalog.reader(&src.snap, &src.disk)?;
            let part = PartRead {
                reader,
                offset: src.offset,
                size: src.size,
                prefetch: Arc::clone(&src.prefetch),
                cursor: Cursor::default(),
            };
            match Ext4::load(Box::new(part)) {
                Ok(fs) => w.fs = Some(fs),
                Err(e) => {
                    let msg = e.to_string();
                    if self.unreadable.set(msg.clone()).is_ok() {
                        tracing::warn!(
                            "{}: no readable ext2/3/4 filesystem ({msg}); it is shown as an empty folder (the raw disk image still has its bytes)",
                            self.label
                        );
                    }
                    return Ok(None);
                }
            }
        }
        let fs = w.fs.as_ref().expect("loaded above");
        Ok(Some(f(fs)?))
    }

    /// `lstat` of a guest path. `None`: the volume is unreadable.
    pub fn metadata(self: &Arc<Self>, path: Vec<u8>) -> FsResult<Option<Metadata>> {
        let me = Arc::clone(self);
        self.call(None, move |w| {
            me.loaded(w, |fs| fs.symlink_metadata(path.as_slice()))
        })?
    }

    /// The entries of a guest directory, without `.` and `..`.
    pub fn read_dir(self: &Arc<Self>, path: Vec<u8>) -> FsResult<Vec<GuestEntry>> {
        let me = Arc::clone(self);
        let r = self.call(None, move |w| {
            me.loaded(w, |fs| {
                let mut out = Vec::new();
                for e in fs.read_dir(path.as_slice())? {
                    let e = e?;
                    let name = e.file_name().as_ref().to_vec();
                    if name == b"." || name == b".." {
                        continue;
                    }
                    out.push(GuestEntry {
                        name,
                        kind: e.file_type()?,
                    });
                }
                Ok(out)
            })
        })??;
        Ok(r.unwrap_or_default())
    }

    pub fn read_link(self: &Arc<Self>, path: Vec<u8>) -> FsResult<Vec<u8>> {
        let me = Arc::clone(self);
        let r = self.call(None, move |w| {
            me.loaded(w, |fs| {
                fs.read_link(path.as_slice()).map(|p| p.as_ref().to_vec())
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
        let r = self.call(Some(fh), move |w| -> FsResult<Option<Vec<u8>>> {
            if me.loaded(w, |_| Ok(()))?.is_none() {
                return Ok(None);
            }
            let fs = w.fs.clone().expect("loaded");
            if !w.files.contains_key(&fh) {
                if w.files.len() >= MAX_OPEN_FILES {
                    w.files.clear();
                }
                w.files.insert(fh, fs.open(path.as_slice())?);
            }
            let file = w.files.get_mut(&fh).expect("inserted above");
            let size = file.metadata().len();
            if offset >= size {
                return Ok(Some(Vec::new()));
            }
            if file.position() != offset {
                file.seek_to(offset)?;
            }
            let want = usize::try_from((size - offset).min(u64::try_from(len).unwrap_or(u64::MAX)))
                .unwrap_or(len);
            let mut buf = vec![0u8; want];
            let mut done = 0;
            while done < want {
                match file.read_bytes(&mut buf[done..]) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) => {
                        // Its position is now unknown: open afresh next time.
                        w.files.remove(&fh);
                        return Err(e.into());
                    }
                }
            }
            buf.truncate(done);
            Ok(Some(buf))
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
