//! The backup pipeline.
//!
//! One dispatcher walks the blocks to read in order; `threads` workers each
//! read a block (or take it from reader threads, for sources that ask for
//! them: `Source::read_threads`), skip it if it is all zeros, hash it, and
//! compress and seal it only if the repository does not have it yet; the
//! calling thread collects results (in any order), appends new chunks to
//! the current pack, stores full packs, and builds the block map. Bounded
//! channels between the stages keep memory constant whatever the disk size
//! (a few blocks per worker and reader), and let reading, hashing,
//! compressing and writing overlap.
//!
//! Nothing becomes visible until `Session::commit` writes, in order, the last
//! pack, the index files, and the snapshot manifest.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use crate::aligned::AlignedBuf;
use crate::blockmap::{self, MapBuilder};
use crate::chunk::{self, EncodedChunk};
use crate::error::{Error, Result};
use crate::format::{self, ChunkKind};
use crate::gc::Guard;
use crate::id::ChunkId;
use crate::pack::PackWriter;
use crate::reader::{NodeCache, RepoNodes};
use crate::repo::Repository;
use crate::snapshot::{self, Capture, Disk, DiskStats, Snapshot};
use crate::source::{Range, Source};

pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

#[derive(Clone)]
pub struct BackupOptions {
    /// Worker threads for read, hash, compress and seal (some sources add
    /// reader threads of their own: `Source::read_threads`).
    pub threads: usize,
    /// Set to stop the backup early; it then fails with `Interrupted`.
    pub cancel: Arc<AtomicBool>,
    /// Called with the number of bytes of the disk processed so far.
    pub progress: Option<Progress>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            cancel: Arc::new(AtomicBool::new(false)),
            progress: None,
        }
    }
}

/// What to back up for one disk.
pub struct DiskPlan<'a> {
    pub name: String,
    pub source: &'a dyn Source,
    /// For an incremental: the same disk in the parent snapshot. Only the
    /// source's dirty ranges are read; every other block comes from it.
    pub incremental_parent: Option<&'a Disk>,
    /// No earlier backup of this disk exists, so most blocks will be new:
    /// the backup is bound by compression, not by reading
    /// (`Source::read_direct`).
    pub first: bool,
    pub capture: Capture,
}

enum Outcome {
    Zero,
    Known(ChunkId),
    New(EncodedChunk),
}

/// Neighbouring blocks: `blocks` of them from index `first`, `bytes` in
/// all (`cs` each, but perhaps the last).
#[derive(Clone, Copy)]
struct Run {
    first: u64,
    blocks: u64,
    bytes: u64,
}

impl Run {
    /// The blocks, as (index, offset from the run's start, length).
    fn blocks(self, cs: u64) -> impl Iterator<Item = (u64, usize, usize)> {
        (0..self.blocks).map(move |j| {
            let at = j * cs;
            let len = cs.min(self.bytes - at);
            let fit = |n: u64| usize::try_from(n).expect("a block fits in memory");
            (self.first + j, fit(at), fit(len))
        })
    }
}

/// A run read from the source with one request, on its way to a worker:
/// the blocks lie back to back in the buffer.
struct Read {
    run: Run,
    data: Result<AlignedBuf>,
}

/// Reads blocks into buffers that are reused: a buffer comes back once its
/// blocks are hashed (and compressed). Buffers are aligned, so that a
/// source can read into them with `O_DIRECT`. Reader threads and workers
/// share the pool in `free`; a worker that reads its own blocks keeps its
/// one buffer, warm in its core's cache. How many buffers exist is bounded
/// by the channels between the stages, not here.
struct BlockReader<'a> {
    source: &'a dyn Source,
    cs: u64,
    free: Mutex<Vec<AlignedBuf>>,
    bytes_read: AtomicU64,
}

impl BlockReader<'_> {
    fn read(&self, buf: AlignedBuf, idx: u64, len: u64) -> Read {
        let run = Run {
            first: idx,
            blocks: 1,
            bytes: len,
        };
        self.read_run(buf, run)
    }

    fn read_run(&self, mut buf: AlignedBuf, run: Run) -> Read {
        let n = usize::try_from(run.bytes).expect("a few blocks fit in memory");
        let data = self
            .source
            .read_at(buf.get_mut(n), run.first * self.cs)
            .map(|()| {
                self.bytes_read.fetch_add(run.bytes, Ordering::Relaxed);
                buf
            });
        Read { run, data }
    }

    /// Read neighbouring blocks with one request, into one buffer that the
    /// worker takes whole. Small blocks read one by one cost a round trip
    /// each, and interleaved small requests defeat the read-ahead of the
    /// server's disk. If the joint read fails, every block is read alone,
    /// so that each error names its own block.
    fn read_joined(&self, blocks: &[(u64, u64)]) -> Vec<Read> {
        let Some(&(first, _)) = blocks.first() else {
            return Vec::new();
        };
        let run = Run {
            first,
            blocks: u64::try_from(blocks.len()).expect("a few blocks"),
            bytes: blocks.iter().map(|&(_, len)| len).sum(),
        };
        let joined = self.read_run(self.take(), run);
        if joined.data.is_ok() || blocks.len() == 1 {
            return vec![joined];
        }
        blocks
            .iter()
            .map(|&(idx, len)| self.read(self.take(), idx, len))
            .collect()
    }

    fn take(&self) -> AlignedBuf {
        let reused = self.free.lock().expect("buffer pool lock").pop();
        reused.unwrap_or_default()
    }

    fn give_back(&self, buf: AlignedBuf) {
        self.free.lock().expect("buffer pool lock").push(buf);
    }
}

/// Where a worker gets its blocks: from reader threads, or by reading
/// them itself (see `Source::read_threads`).
enum Feed<'a> {
    Reads(Receiver<Read>, &'a BlockReader<'a>),
    /// Runs of neighbouring blocks to read.
    Jobs(
        Receiver<Vec<(u64, u64)>>,
        &'a BlockReader<'a>,
        RefCell<OwnReads>,
    ),
}

/// A worker that reads its own blocks: what is left of its current run,
/// and its one buffer.
#[derive(Default)]
struct OwnReads {
    run: std::vec::IntoIter<(u64, u64)>,
    buf: AlignedBuf,
}

enum Next {
    Block(Read),
    /// Nothing came before the deadline.
    Idle,
    Done,
}

impl Feed<'_> {
    /// The next block, waiting at most until `deadline` if there is one.
    fn next(&self, deadline: Option<Instant>) -> Next {
        fn recv<T>(rx: &Receiver<T>, deadline: Option<Instant>) -> std::result::Result<T, Next> {
            match deadline {
                None => rx.recv().map_err(|_| Next::Done),
                Some(d) => rx.recv_deadline(d).map_err(|e| match e {
                    RecvTimeoutError::Timeout => Next::Idle,
                    RecvTimeoutError::Disconnected => Next::Done,
                }),
            }
        }
        let got = match self {
            Feed::Reads(rx, _) => recv(rx, deadline),
            Feed::Jobs(jobs, reader, state) => {
                let OwnReads { run, buf } = &mut *state.borrow_mut();
                let next = match run.next() {
                    Some(block) => Ok(block),
                    None => recv(jobs, deadline).map(|r| {
                        *run = r.into_iter();
                        run.next().expect("runs are not empty")
                    }),
                };
                next.map(|(idx, len)| reader.read(std::mem::take(buf), idx, len))
            }
        };
        got.map_or_else(|n| n, Next::Block)
    }

    /// Whether the blocks handed out so far end a run: a job read by this
    /// worker, or a read from a reader thread.
    fn run_done(&self) -> bool {
        match self {
            Feed::Reads(..) => true,
            Feed::Jobs(_, _, state) => state.borrow().run.len() == 0,
        }
    }

    /// A block's buffer, done with.
    fn give_back(&self, buf: AlignedBuf) {
        match self {
            Feed::Reads(_, reader) => reader.give_back(buf),
            Feed::Jobs(_, _, state) => state.borrow_mut().buf = buf,
        }
    }
}

/// What a worker makes of a block (see `Session::encode`).
enum Encoded {
    Done(Outcome),
    Fresh(chunk::Prepared),
}

/// A block's outcome, for the collector.
struct Done {
    idx: u64,
    len: u64,
    outcome: Result<Outcome>,
}

enum Msg {
    /// Outcomes of blocks, sent together: one message per block made the
    /// thread hand-offs a tenth of a 64 KiB backup's CPU.
    Blocks(Vec<Done>),
    Keep {
        from: u64,
        to: u64,
    },
}

/// One backup session: any number of disks, then one commit. One session
/// at a time per `Repository`: the index's pending entries, which a
/// commit publishes and a failed session deletes the packs of, belong to
/// the repository handle, not to the session.
pub struct Session<'r> {
    repo: &'r Repository,
    /// Touched only by the collecting thread; the lock is never contended.
    pack: Mutex<Option<PackWriter>>,
    /// While a disk is being backed up: the queue of full packs to store,
    /// so that storing one overlaps with encoding the next.
    uploader: Mutex<Option<Sender<PackWriter>>>,
    /// Chunks stored (or being stored) by this session and not yet in the
    /// index: the guard that keeps a chunk from being encoded twice.
    inflight: Mutex<HashSet<ChunkId>>,
    nodes: NodeCache,
    disks: Vec<Disk>,
    started: Instant,
    /// Marks seen at the start and packs relied on: see `crate::gc`.
    guard: Guard,
    /// A disk kept chunks of its parent without reading them.
    kept_parent_chunks: bool,
    /// The libvirt domain, recorded in the manifest.
    domain: Option<snapshot::DomainRecord>,
    /// Tags recorded in the manifest.
    tags: Vec<String>,
    /// When this session last shared its progress (see `maybe_share`), and
    /// how often it does.
    shared_at: Mutex<Instant>,
    share_every: Option<Duration>,
    /// The snapshot manifest is stored.
    committed: bool,
}

impl Drop for Session<'_> {
    /// A session that ends without a snapshot (an error, a cancel) deletes
    /// the packs it stored that no index file names yet: nobody else can
    /// know of them, and on a full disk they hold the space that every
    /// later command needs. Packs already named by an index file this
    /// session published stay, for prune.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let index = self.repo.index();
        let Some(packs) = index.unpublished_packs() else {
            return;
        };
        if packs.is_empty() {
            return;
        }
        let backend = self.repo.backend();
        let mut removed = 0usize;
        for p in &packs {
            match backend.delete(&crate::pack::pack_name(p)) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(
                        "could not delete pack {p} of the failed backup (a later prune will): {e}"
                    );
                }
            }
        }
        index.discard_pending();
        tracing::info!(
            "deleted the {removed} pack(s) this backup had stored, as it committed nothing"
        );
    }
}

/// How often a running backup publishes the index of the packs it has
/// stored so far, and takes in what other running backups published.
pub const SHARE_EVERY: Duration = Duration::from_secs(60);

/// `SHARE_EVERY`, or `EKKO_SHARE_MS` (0 turns sharing off).
fn share_every() -> Option<Duration> {
    match std::env::var("EKKO_SHARE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(0) => None,
        Some(ms) => Some(Duration::from_millis(ms)),
        None => Some(SHARE_EVERY),
    }
}

/// Turn byte ranges into sorted, merged runs of block indices.
fn block_runs(ranges: &[Range], cs: u64, nchunks: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for r in ranges {
        if r.len == 0 {
            continue;
        }
        let first = r.offset / cs;
        let last = ((r.offset + r.len - 1) / cs + 1).min(nchunks);
        if first >= last {
            continue;
        }
        match runs.last_mut() {
            Some(l) if first <= l.1 => l.1 = l.1.max(last),
            _ => runs.push((first, last)),
        }
    }
    runs
}

impl<'r> Session<'r> {
    /// Start a session. Reads the GC marks, then refreshes the index.
    pub fn new(repo: &'r Repository) -> Result<Session<'r>> {
        let guard = Guard::start(repo)?;
        Ok(Session {
            repo,
            pack: Mutex::new(None),
            uploader: Mutex::new(None),
            inflight: Mutex::new(HashSet::new()),
            nodes: NodeCache::new(1024),
            disks: Vec::new(),
            started: Instant::now(),
            guard,
            kept_parent_chunks: false,
            domain: None,
            tags: Vec::new(),
            shared_at: Mutex::new(Instant::now()),
            share_every: share_every(),
            committed: false,
        })
    }

    /// Share progress with backups running at the same time on other hosts,
    /// at most every `share_every`: publish an index file for the packs
    /// stored so far, then take in the index files others published. A
    /// clone of a VM that another host is backing up then deduplicates
    /// against the chunks that host has already stored, instead of storing
    /// them again. Safe under the GC protocol: early index entries name
    /// stored packs, like those of a crashed session (docs/GC.md).
    fn maybe_share(&self) -> Result<()> {
        let Some(every) = self.share_every else {
            return Ok(());
        };
        {
            let mut at = self.shared_at.lock().expect("share lock");
            if at.elapsed() < every {
                return Ok(());
            }
            *at = Instant::now();
        }
        self.repo
            .index()
            .flush(self.repo.backend().as_ref(), self.repo.keys())?;
        if let Err(e) = self.repo.refresh_index() {
            // Only a missed chance to deduplicate: the backup goes on.
            tracing::warn!("could not take in other backups' index files: {e}");
        }
        Ok(())
    }

    /// Records `tags` in the manifest (sorted, each once). Each must pass
    /// `snapshot::check_tag`, or the commit fails.
    pub fn set_tags(&mut self, tags: &[String]) {
        let mut t = tags.to_vec();
        t.sort();
        t.dedup();
        self.tags = t;
    }

    /// Records the libvirt domain the disks come from in the manifest.
    pub fn set_domain(&mut self, domain: snapshot::DomainRecord) {
        self.domain = Some(domain);
    }

    pub fn repo(&self) -> &Repository {
        self.repo
    }

    /// Append an encoded chunk to the current pack, handing the pack on to
    /// be stored once it is full. Returns the bytes it adds.
    fn append(&self, c: &EncodedChunk) -> Result<u64> {
        let limit = u64::from(self.repo.config().pack_size);
        let full = {
            let mut slot = self.pack.lock().expect("pack lock");
            if slot.is_none() {
                *slot = Some(PackWriter::create(self.repo.backend().as_ref())?);
            }
            let p = slot.as_mut().expect("just created");
            p.add(c)?;
            p.len() >= limit
        };
        if full {
            self.flush_pack()?;
        }
        Ok(u64::try_from(c.sealed.len()).expect("fits"))
    }

    /// Hand the current pack to the uploader thread if one runs (so that
    /// committing it overlaps with encoding the next), else commit it now.
    fn flush_pack(&self) -> Result<()> {
        let Some(pack) = self.pack.lock().expect("pack lock").take() else {
            return Ok(());
        };
        let tx = self.uploader.lock().expect("uploader lock").clone();
        match tx {
            Some(tx) => match tx.send(pack) {
                Ok(()) => Ok(()),
                // The uploader stopped: its error is reported by backup_disk.
                Err(crossbeam_channel::SendError(pack)) => self.store_pack(pack),
            },
            None => self.store_pack(pack),
        }
    }

    fn store_pack(&self, pack: PackWriter) -> Result<()> {
        let entries = pack.finish(self.repo.keys())?;
        if let Some((_, loc)) = entries.first() {
            self.guard.wrote(loc.pack);
        }
        let ids: Vec<ChunkId> = entries.iter().map(|(id, _)| *id).collect();
        // Into the index first, then out of the claim set: no window in which
        // a worker would see neither and encode the chunk again.
        let flush = self.repo.index().add_pending(entries);
        {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            for id in &ids {
                inflight.remove(id);
            }
        }
        if flush {
            self.repo
                .index()
                .flush(self.repo.backend().as_ref(), self.repo.keys())?;
        }
        Ok(())
    }

    /// Is this chunk already stored, or claimed by another worker of this
    /// session? Claims it if not.
    fn claim(&self, id: &ChunkId) -> Result<bool> {
        // A chunk in a pack that prune marked is stored again.
        if let Some(loc) = self.repo.index().lookup(id)? {
            if self.guard.reuse(&loc) {
                return Ok(false);
            }
        }
        Ok(self.inflight.lock().expect("inflight lock").insert(*id))
    }

    fn store_map_node(&self, entries: &[ChunkId], stored: &AtomicU64) -> Result<ChunkId> {
        let plain = format::encode_map_node(entries);
        let id = self.repo.keys().chunk_id(&plain);
        if self.claim(&id)? {
            let enc = chunk::encode(self.repo.keys(), id, ChunkKind::Map, &plain, 0);
            stored.fetch_add(self.append(&enc)?, Ordering::Relaxed);
        }
        Ok(id)
    }

    /// Back up one disk; its entry goes into the snapshot at commit.
    pub fn backup_disk(&mut self, mut plan: DiskPlan<'_>, opts: &BackupOptions) -> Result<Disk> {
        if let Some(parent) = plan.incremental_parent {
            if let Some(why) = self.guard.parent_blocked(self.repo, parent)? {
                plan.incremental_parent = None;
                plan.capture = Capture {
                    mode: snapshot::CaptureMode::Full,
                    bitmap: None,
                    next_bitmap: plan.capture.next_bitmap,
                    reason: Some(why),
                };
            }
        }
        self.kept_parent_chunks |= plan.incremental_parent.is_some();
        let cs = u64::from(self.repo.config().chunk_size);
        let size = plan.source.size();
        let nchunks = size.div_ceil(cs);
        let (ranges, parent_leaves) = match plan.incremental_parent {
            Some(parent) => {
                if parent.size != size || u64::from(parent.chunk_size) != cs {
                    return Err(Error::Invalid(format!(
                        "disk {}: size or chunk size differs from the parent; an incremental is impossible",
                        plan.name
                    )));
                }
                let dirty = plan.source.dirty_ranges()?.ok_or_else(|| {
                    Error::Invalid(format!(
                        "disk {}: the source has no dirty bitmap",
                        plan.name
                    ))
                })?;
                let nodes = RepoNodes {
                    repo: self.repo,
                    cache: &self.nodes,
                };
                (
                    dirty,
                    Some(blockmap::leaf_ids(&nodes, &parent.map, nchunks)?),
                )
            }
            None => (plan.source.data_ranges()?, None),
        };
        let runs = block_runs(&ranges, cs, nchunks);
        let mut builder = MapBuilder::new(nchunks, parent_leaves)?;
        let mut stats = DiskStats {
            chunks: nchunks,
            ..DiskStats::default()
        };

        let threads = opts.threads.max(1);
        let source = plan.source;
        source.read_direct(plan.first);
        let readers = source.read_threads().min(MAX_READERS);
        let (job_tx, job_rx) = bounded::<Vec<(u64, u64)>>(threads.max(readers));
        let (read_tx, read_rx) = bounded::<Read>(threads);
        let (res_tx, res_rx) = bounded::<Msg>(threads * 2);
        let reader = BlockReader {
            source,
            cs,
            free: Mutex::new(Vec::new()),
            bytes_read: AtomicU64::new(0),
        };
        let cancel = &opts.cancel;

        // One uploader for a local folder; several for an object store, to
        // hide request latency. An object store's writer buffers its pack in
        // memory, so the count is also bounded by UPLOAD_MEMORY.
        let per_pack = u64::from(self.repo.config().pack_size).max(1);
        let by_memory = usize::try_from(UPLOAD_MEMORY / per_pack)
            .unwrap_or(1)
            .max(1);
        let uploads = self.repo.backend().write_concurrency().clamp(1, by_memory);
        let (up_tx, up_rx) = bounded::<PackWriter>(1);
        *self.uploader.lock().expect("uploader lock") = Some(up_tx);
        let result: Result<()> = std::thread::scope(|scope| {
            let this = &*self;
            let uploaders: Vec<_> = (0..uploads)
                .map(|_| {
                    let up_rx = up_rx.clone();
                    scope.spawn(move || -> Result<()> {
                        for pack in up_rx {
                            if let Err(e) = this.store_pack(pack) {
                                this.uploader.lock().expect("uploader lock").take();
                                return Err(e);
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            drop(up_rx);
            // Dispatcher: blocks in order, gaps as `Keep`.
            let res_tx_d = res_tx.clone();
            scope.spawn(move || {
                dispatch(source, &runs, nchunks, size, cs, &job_tx, &res_tx_d, cancel)
            });
            let reader = &reader;
            for _ in 0..readers {
                let (job_rx, read_tx) = (job_rx.clone(), read_tx.clone());
                scope.spawn(move || read_ahead(reader, &job_rx, &read_tx, cancel));
            }
            drop(read_tx);
            for _ in 0..threads {
                let feed = if readers > 0 {
                    Feed::Reads(read_rx.clone(), reader)
                } else {
                    Feed::Jobs(job_rx.clone(), reader, RefCell::default())
                };
                let res_tx = res_tx.clone();
                scope.spawn(move || this.worker(&feed, &res_tx));
            }
            drop(job_rx);
            drop(res_tx);
            drop(read_rx);
            let collected = this.collect(&res_rx, &mut builder, &mut stats, opts, size);
            // Closing the queue ends the uploader once it has stored the rest.
            this.uploader.lock().expect("uploader lock").take();
            let uploaded = uploaders
                .into_iter()
                .map(|u| u.join().expect("uploader thread panicked"))
                .fold(Ok(()), Result::and);
            collected.and(uploaded)
        });
        result?;
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        source.unchanged()?;
        stats.bytes_read = reader.bytes_read.into_inner();
        let node_bytes = AtomicU64::new(0);
        let map = builder.finish(&mut |e| self.store_map_node(e, &node_bytes))?;
        stats.bytes_stored += node_bytes.into_inner();
        let disk = Disk {
            name: plan.name,
            size,
            chunk_size: self.repo.config().chunk_size,
            map,
            source: source.describe(),
            capture: plan.capture,
            stats,
        };
        self.disks.push(disk.clone());
        Ok(disk)
    }

    /// Hash and compress blocks, seal the new chunks together (faster
    /// than one by one, see `siv`), and hand every outcome on. Known and
    /// all-zero blocks go on at once; new chunks wait until `chunk::BATCH`
    /// of them can be sealed together, but never longer than `SEAL_WAIT`
    /// (a slow source must not hold finished chunks back), and the worker
    /// never holds more than `SEAL_BYTES` of them, so memory stays bounded
    /// per worker whatever the chunk size.
    fn worker(&self, feed: &Feed<'_>, out: &Sender<Msg>) {
        let mut comp = chunk::Compressor::new(self.repo.config().compression_level);
        // The new chunks waiting to be sealed, and where they go.
        let mut held: Vec<(u64, u64)> = Vec::new();
        let mut fresh: Vec<chunk::Prepared> = Vec::new();
        let mut since = Instant::now();
        // Outcomes not sent yet: they go at the end of each run.
        let mut pending: Vec<Done> = Vec::new();
        let send = |pending: &mut Vec<Done>| -> bool {
            pending.is_empty()
                || out
                    .send(Msg::Blocks(std::mem::replace(
                        pending,
                        Vec::with_capacity(chunk::BATCH),
                    )))
                    .is_ok()
        };
        let seal = |held: &mut Vec<(u64, u64)>,
                    fresh: &mut Vec<chunk::Prepared>,
                    pending: &mut Vec<Done>| {
            let sealed = chunk::seal_many(self.repo.keys(), std::mem::take(fresh));
            pending.extend(held.drain(..).zip(sealed).map(|((idx, len), enc)| Done {
                idx,
                len,
                outcome: Ok(Outcome::New(enc)),
            }));
        };
        let cs = u64::from(self.repo.config().chunk_size);
        loop {
            let deadline = (!held.is_empty()).then(|| since + SEAL_WAIT);
            let read = match feed.next(deadline) {
                Next::Block(r) => r,
                Next::Idle => {
                    seal(&mut held, &mut fresh, &mut pending);
                    if !send(&mut pending) {
                        return;
                    }
                    continue;
                }
                Next::Done => break,
            };
            let Read { run, data } = read;
            let buf = match data {
                Ok(buf) => buf,
                Err(e) => {
                    // Failed reads are single blocks (see `read_joined`).
                    pending.push(Done {
                        idx: run.first,
                        len: run.bytes,
                        outcome: Err(e),
                    });
                    if !send(&mut pending) {
                        return;
                    }
                    continue;
                }
            };
            let data = buf.get(usize::try_from(run.bytes).expect("blocks fit in memory"));
            for (idx, at, n) in run.blocks(cs) {
                let len = u64::try_from(n).expect("a block length fits");
                let outcome = match self.encode(&data[at..at + n], &mut comp) {
                    Ok(Encoded::Done(o)) => Ok(o),
                    Err(e) => Err(e),
                    Ok(Encoded::Fresh(prepared)) => {
                        fresh.push(prepared);
                        if held.is_empty() {
                            since = Instant::now();
                        }
                        held.push((idx, len));
                        let holding: usize = fresh.iter().map(chunk::Prepared::stored_len).sum();
                        if fresh.len() >= chunk::BATCH
                            || holding >= SEAL_BYTES
                            || since.elapsed() >= SEAL_WAIT
                        {
                            seal(&mut held, &mut fresh, &mut pending);
                        }
                        continue;
                    }
                };
                pending.push(Done { idx, len, outcome });
            }
            feed.give_back(buf);
            if (feed.run_done() || pending.len() >= chunk::BATCH) && !send(&mut pending) {
                return;
            }
        }
        seal(&mut held, &mut fresh, &mut pending);
        send(&mut pending);
    }

    /// A block's outcome, or, for a chunk new to the repository (and
    /// claimed by this worker), the chunk compressed and ready to seal.
    fn encode(&self, block: &[u8], comp: &mut chunk::Compressor) -> Result<Encoded> {
        if chunk::is_zero(block) {
            return Ok(Encoded::Done(Outcome::Zero));
        }
        let id = self.repo.keys().chunk_id(block);
        Ok(if self.claim(&id)? {
            Encoded::Fresh(chunk::prepare(id, ChunkKind::Data, block, comp))
        } else {
            Encoded::Done(Outcome::Known(id))
        })
    }

    fn collect(
        &self,
        rx: &Receiver<Msg>,
        builder: &mut MapBuilder,
        stats: &mut DiskStats,
        opts: &BackupOptions,
        size: u64,
    ) -> Result<()> {
        let cs = u64::from(self.repo.config().chunk_size);
        let nodes = RepoNodes {
            repo: self.repo,
            cache: &self.nodes,
        };
        let node_bytes = AtomicU64::new(0);
        let mut store = |e: &[ChunkId]| self.store_map_node(e, &node_bytes);
        let mut first_err: Option<Error> = None;
        let mut done = 0u64;
        for msg in rx {
            if first_err.is_some() {
                continue; // drain, so that the other stages finish
            }
            let r = match msg {
                Msg::Keep { from, to } => {
                    done += (to * cs).min(size) - (from * cs).min(size);
                    builder.keep(from, to, &mut store)
                }
                Msg::Blocks(blocks) => blocks.into_iter().try_for_each(|d| {
                    done += d.len;
                    let id = match d.outcome? {
                        Outcome::Zero => {
                            stats.chunks_zero += 1;
                            ChunkId::ZERO
                        }
                        Outcome::Known(id) => id,
                        Outcome::New(enc) => {
                            stats.chunks_new += 1;
                            stats.bytes_new += u64::from(enc.raw_len);
                            stats.bytes_stored += self.append(&enc)?;
                            enc.id
                        }
                    };
                    builder.set(d.idx, id, &nodes, &mut store)
                }),
            };
            if let Some(p) = &opts.progress {
                p(done);
            }
            let r = r.and_then(|()| self.maybe_share());
            if let Err(e) = r {
                opts.cancel.store(true, Ordering::Relaxed);
                first_err = Some(e);
            }
        }
        stats.bytes_stored += node_bytes.into_inner();
        first_err.map_or(Ok(()), Err)
    }

    /// Write the last pack, the index, then the snapshot manifest.
    pub fn commit(mut self, vm: &str, time: String, parent: Option<String>) -> Result<Snapshot> {
        if self.disks.is_empty() {
            return Err(Error::Invalid("a snapshot needs at least one disk".into()));
        }
        snapshot::check_vm_name(vm).map_err(Error::Invalid)?;
        for t in &self.tags {
            snapshot::check_tag(t).map_err(Error::Invalid)?;
        }
        self.flush_pack()?;
        self.guard.before_publishing(self.repo)?;
        self.repo
            .index()
            .flush(self.repo.backend().as_ref(), self.repo.keys())?;
        let snap = Snapshot {
            id: snapshot::new_id(),
            vm: vm.to_string(),
            time,
            parent,
            host: crate::time::hostname(),
            disks: std::mem::take(&mut self.disks),
            ekko_version: env!("CARGO_PKG_VERSION").to_string(),
            domain: self.domain.take(),
            tags: std::mem::take(&mut self.tags),
        };
        self.guard.before_commit(self.repo)?;
        if let (true, Some(p)) = (self.kept_parent_chunks, &snap.parent) {
            self.guard.before_commit_on(self.repo, p, &snap.disks)?;
        }
        // From here on the manifest may be stored, even if `save` fails
        // (its folder fsync, say): the packs stay.
        self.committed = true;
        if let Err(e) = snapshot::save(self.repo.backend().as_ref(), self.repo.keys(), &snap) {
            // A manifest renamed into place whose folder then failed to
            // sync is listed: saying only "failed" invites a duplicate.
            let name = snapshot::snapshot_name(&snap.id);
            if self.repo.backend().size(&name).is_ok() {
                return Err(Error::Invalid(format!(
                    "snapshot {} of {vm} was stored, but not made durable ({e}): it may be lost if the host crashes now; `ekko snapshots` lists it",
                    snap.id
                )));
            }
            return Err(e);
        }
        tracing::info!(snapshot = %snap.id, elapsed = ?self.started.elapsed(), "snapshot committed");
        Ok(snap)
    }
}

/// Bytes of packs being uploaded at once (see `backup_disk`): what hides
/// an object store's latency is bytes in flight, so larger packs get fewer
/// uploaders (4 of 16 MiB, 2 of 32 MiB) and memory stays the same.
const UPLOAD_MEMORY: u64 = 64 << 20;

/// The most readers for one disk, whatever the source asks for.
const MAX_READERS: usize = 8;

/// A reader thread: read blocks ahead of the workers and pass them on,
/// until the dispatcher is done or the backup is cancelled.
fn read_ahead(
    reader: &BlockReader<'_>,
    jobs: &Receiver<Vec<(u64, u64)>>,
    out: &Sender<Read>,
    cancel: &AtomicBool,
) {
    let per_read = usize::try_from(JOINED_READ_BYTES / reader.cs)
        .unwrap_or(1)
        .max(1);
    for job in jobs.iter() {
        for group in neighbours(&job, per_read) {
            if cancel.load(Ordering::Relaxed) {
                return;
            }
            let reads = reader.read_joined(group);
            for r in reads {
                if out.send(r).is_err() {
                    return;
                }
            }
        }
    }
}

/// Split a job into groups of at most `most` blocks with consecutive
/// indices, each of which can be read with one request.
fn neighbours(job: &[(u64, u64)], most: usize) -> impl Iterator<Item = &[(u64, u64)]> {
    let mut rest = job;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut n = 1;
        while n < rest.len().min(most) && rest[n].0 == rest[n - 1].0 + 1 {
            n += 1;
        }
        let (group, tail) = rest.split_at(n);
        rest = tail;
        Some(group)
    })
}

/// Reader threads join neighbouring blocks into requests of up to this
/// many bytes (blocks this size or larger are read one by one).
const JOINED_READ_BYTES: u64 = 1 << 20;

/// How far ahead of the workers the dispatcher asks the source to fetch.
const READ_AHEAD_BYTES: u64 = 32 << 20;

/// The longest a finished chunk waits for the rest of its job to be read.
const SEAL_WAIT: Duration = Duration::from_millis(50);

/// The most a worker holds of compressed chunks waiting to be sealed.
const SEAL_BYTES: usize = 4 << 20;

#[allow(clippy::too_many_arguments)]
fn dispatch(
    source: &dyn Source,
    runs: &[(u64, u64)],
    nchunks: u64,
    size: u64,
    cs: u64,
    jobs: &Sender<Vec<(u64, u64)>>,
    out: &Sender<Msg>,
    cancel: &AtomicBool,
) {
    let mut batch = Vec::with_capacity(chunk::BATCH);
    let ahead = (READ_AHEAD_BYTES / cs).max(2);
    // Blocks in reading order, so that hints can run ahead of the workers.
    let order = || runs.iter().flat_map(|&(from, to)| from..to);
    let mut hints = order().skip(usize::try_from(ahead).unwrap_or(usize::MAX));
    for idx in order().take(usize::try_from(ahead).unwrap_or(usize::MAX)) {
        source.will_need(idx * cs, cs.min(size - idx * cs));
    }
    let mut next = 0u64;
    for &(from, to) in runs {
        if next < from
            && out
                .send(Msg::Keep {
                    from: next,
                    to: from,
                })
                .is_err()
        {
            return;
        }
        for idx in from..to {
            if cancel.load(Ordering::Relaxed) {
                return;
            }
            let len = cs.min(size - idx * cs);
            if let Some(h) = hints.next() {
                source.will_need(h * cs, cs.min(size - h * cs));
            }
            batch.push((idx, len));
            if batch.len() == chunk::BATCH
                && jobs
                    .send(std::mem::replace(
                        &mut batch,
                        Vec::with_capacity(chunk::BATCH),
                    ))
                    .is_err()
            {
                return;
            }
        }
        next = to;
    }
    if !batch.is_empty() && jobs.send(batch).is_err() {
        return;
    }
    if next < nchunks {
        let _ = out.send(Msg::Keep {
            from: next,
            to: nchunks,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::neighbours;

    #[test]
    fn neighbours_split_at_gaps_and_at_the_limit() {
        let job = [(3, 8), (4, 8), (5, 8), (7, 8), (8, 8), (9, 8), (10, 5)];
        let groups: Vec<Vec<u64>> = neighbours(&job, 3)
            .map(|g| g.iter().map(|&(i, _)| i).collect())
            .collect();
        assert_eq!(groups, vec![vec![3, 4, 5], vec![7, 8, 9], vec![10]]);
        assert_eq!(neighbours(&job, 1).count(), job.len());
        assert_eq!(neighbours(&[], 4).count(), 0);
    }
}
