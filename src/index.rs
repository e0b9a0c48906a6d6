//! The chunk index: chunk id → location in a pack.
//!
//! Truth lives in the repository: every backup session writes its own
//! `index/<random>` files after its packs. This module keeps a local redb
//! database (the cache) in step with those files, so that opening a large
//! repository does not decrypt every index file and lookups do not need the
//! whole index in memory. The cache can be deleted at any time; it is rebuilt
//! from the index files (and `ekko index rebuild` rebuilds those from the
//! packs' trailers). When the cache cannot be opened, the index is loaded into
//! memory instead.
//!
//! The cache is not trusted further than that: each entry carries a keyed
//! tag over its chunk id and location, and a lookup that finds a bad tag, a
//! cache database that fails or panics, or a chunk a snapshot references
//! that the cache lacks but an index file lists, deletes the cache and
//! serves the rest of the process from the index files in memory. The next
//! process builds a new cache.
//!
//! Why redb and not sled: sled is beta, its last stable release was in 2021
//! and its own README advises against it where reliability matters. redb has
//! a stable file format and supports several processes at once.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::backend::Backend;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::format::{self, ChunkKind, Location, MAGIC_INDEX};
use crate::id::{ChunkId, ObjectId};

/// Chunk id → location (34 bytes) and its tag (16 bytes).
const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks-v2");
const FILES: TableDefinition<&str, u64> = TableDefinition::new("index_files-v2");
/// The tables of caches from before entries had tags; deleted on sight.
const OLD_CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
const OLD_FILES: TableDefinition<&str, u64> = TableDefinition::new("index_files");

const TAG_LEN: usize = 16;
const VALUE_LEN: usize = 34 + TAG_LEN;

/// Entries per index file; bounds a session's memory on huge disks.
const FLUSH_ENTRIES: usize = 65_536;

fn cache_err(e: impl std::fmt::Display) -> Error {
    Error::Cache(e.to_string())
}

fn loc_bytes(l: &Location) -> [u8; 34] {
    let mut b = [0u8; 34];
    b[..16].copy_from_slice(&l.pack.0);
    b[16..24].copy_from_slice(&l.offset.to_le_bytes());
    b[24..28].copy_from_slice(&l.stored_len.to_le_bytes());
    b[28..32].copy_from_slice(&l.raw_len.to_le_bytes());
    b[32] = l.kind as u8;
    b[33] = u8::from(l.compressed);
    b
}

fn entry_tag(tag_key: &[u8; 32], id: &ChunkId, loc: &[u8]) -> [u8; TAG_LEN] {
    let mut h = blake3::Hasher::new_keyed(tag_key);
    h.update(&id.0);
    h.update(loc);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&h.finalize().as_bytes()[..TAG_LEN]);
    tag
}

/// A cache entry's value: the location and its tag.
fn cache_value(tag_key: &[u8; 32], id: &ChunkId, loc: &Location) -> [u8; VALUE_LEN] {
    let mut v = [0u8; VALUE_LEN];
    let l = loc_bytes(loc);
    v[..34].copy_from_slice(&l);
    v[34..].copy_from_slice(&entry_tag(tag_key, id, &l));
    v
}

/// The location in a cache entry's value, if its tag holds.
fn cache_location(tag_key: &[u8; 32], id: &ChunkId, v: &[u8]) -> Result<Location> {
    let bad = |why: &str| Error::Cache(format!("the entry of chunk {id} {why}"));
    if v.len() != VALUE_LEN {
        return Err(bad("has the wrong length"));
    }
    let (l, tag) = v.split_at(34);
    if entry_tag(tag_key, id, l) != tag {
        return Err(bad("fails its checksum"));
    }
    loc_from(l).ok_or_else(|| bad("is malformed"))
}

/// Run `f`, which uses the cache database, turning a panic in it (redb
/// panics on some damaged files) into a cache error.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match caught(f) {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::Cache(format!("the cache database failed: {what}")))
        }
    }
}

thread_local! {
    /// Whether this thread runs cache code whose panics `caught` catches.
    static IN_CACHE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` (cache database code), catching a panic. Such panics are
/// reported as a damaged cache, not printed as a crash; every other panic
/// is printed as before.
fn caught<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_CACHE.with(std::cell::Cell::get) {
                tracing::debug!("index cache: {info}");
                return;
            }
            previous(info);
        }));
    });
    let outer = IN_CACHE.with(|c| c.replace(true));
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    IN_CACHE.with(|c| c.set(outer));
    r
}

fn loc_from(b: &[u8]) -> Option<Location> {
    if b.len() != 34 {
        return None;
    }
    let mut pack = [0u8; 16];
    pack.copy_from_slice(&b[..16]);
    Some(Location {
        pack: ObjectId(pack),
        offset: u64::from_le_bytes(b[16..24].try_into().ok()?),
        stored_len: u32::from_le_bytes(b[24..28].try_into().ok()?),
        raw_len: u32::from_le_bytes(b[28..32].try_into().ok()?),
        kind: match b[32] {
            0 => ChunkKind::Data,
            1 => ChunkKind::Map,
            _ => return None,
        },
        compressed: b[33] != 0,
    })
}

/// Every entry of the index files read, and those files' names.
type Loaded = (HashMap<ChunkId, Location>, HashSet<String>);

enum Store {
    Redb(redb::Database),
    /// The entries, and the index files they came from.
    Memory(RwLock<Loaded>),
}

pub struct Index {
    store: RwLock<Store>,
    /// Where the index files are, to read them when the cache fails.
    origin: Arc<dyn Backend>,
    keys: Keys,
    cache_path: Option<PathBuf>,
    /// Keys the cache entries' tags.
    tag_key: [u8; 32],
    /// Serialises falling back from the cache to memory.
    falling_back: Mutex<()>,
    /// Whether a referenced chunk the cache lacks was looked for in the
    /// index files already (once per process is enough), and the lock
    /// under which that happens.
    miss_checked: AtomicBool,
    checking_miss: Mutex<()>,
    /// Entries stored by this process and not yet written to an index file.
    pending: RwLock<HashMap<ChunkId, Location>>,
    /// A `flush` failed to store its index file: it may exist even so.
    publish_uncertain: AtomicBool,
    /// Packs named by an index file this process stored, whether or not
    /// their entries have left `pending` (a cache update that failed
    /// after the file was stored leaves them there).
    published: Mutex<HashSet<ObjectId>>,
    /// The cache as one read transaction saw it, shared by every lookup
    /// until `generation` moves on. A read transaction of a multi-process
    /// redb takes and drops file locks (`fcntl`), which cost lookups more
    /// than the search itself; see `lookup`.
    view: Arc<RwLock<ViewSlot>>,
    /// Moves on whenever this process may see more in the cache: after
    /// `flush` and after every `refresh` (which takes in what other
    /// processes added).
    generation: AtomicU64,
    /// Index files that would not read, skipped by this
    /// process: one damaged file must not lock users out of the
    /// repository, nor out of `check` and `index rebuild`, which find and
    /// replace it. Chunks only it lists look unstored: a backup stores them
    /// again, a restore names them and the rebuild.
    damaged: Mutex<HashSet<String>>,
}

/// How long one read view serves lookups at most. An open read
/// transaction keeps every process sharing the cache from reusing the pages
/// freed after it, so a long-lived reader (a mount, an NBD server) must not
/// hold one for long.
const VIEW_MAX_AGE: Duration = Duration::from_secs(1);

/// The shared read view, and whether a thread watches it to drop it once
/// it is older than `VIEW_MAX_AGE`, so that an idle process (a mount, an
/// NBD server) holds no read transaction.
#[derive(Default)]
struct ViewSlot {
    view: Option<Arc<ReadView>>,
    watched: bool,
}

struct ReadView {
    generation: u64,
    opened: Instant,
    /// `None` while the cache has no chunk table yet.
    chunks: Option<redb::ReadOnlyTable<&'static [u8], &'static [u8]>>,
}

pub fn index_name(id: &ObjectId) -> String {
    format!("index/{}", id.to_hex())
}

/// Names and sizes of the repository's index files.
fn list_index_files(backend: &dyn Backend) -> Result<HashMap<String, u64>> {
    Ok(backend
        .list("index/")?
        .into_iter()
        .map(|o| (o.name, o.size))
        .collect())
}

/// Read and authenticate one index file.
pub fn read_index_file(
    backend: &dyn Backend,
    keys: &Keys,
    name: &str,
) -> Result<Vec<(ChunkId, Location)>> {
    let data = backend.get(name)?;
    let body = format::open_file(keys, MAGIC_INDEX, "index", name, &data)?;
    format::decode_index(name, &body)
}

impl Index {
    /// Open the index, bringing the cache at `cache_path` in step with the
    /// repository's index files. `None` keeps everything in memory.
    pub fn open(
        backend: &Arc<dyn Backend>,
        keys: &Keys,
        cache_path: Option<&Path>,
    ) -> Result<Index> {
        if let Some(path) = cache_path {
            match Self::open_cache(path) {
                Ok(db) => {
                    let idx = Index::with_store(Store::Redb(db), backend, keys, cache_path);
                    idx.refresh(backend.as_ref(), keys)?;
                    return Ok(idx);
                }
                Err(e) => tracing::warn!(
                    "index cache {} unusable ({e}); loading the index into memory",
                    path.display()
                ),
            }
        }
        let idx = Index::with_store(Store::Memory(RwLock::default()), backend, keys, None);
        idx.refresh(backend.as_ref(), keys)?;
        Ok(idx)
    }

    fn with_store(
        store: Store,
        backend: &Arc<dyn Backend>,
        keys: &Keys,
        cache_path: Option<&Path>,
    ) -> Index {
        Index {
            store: RwLock::new(store),
            origin: Arc::clone(backend),
            keys: keys.clone(),
            cache_path: cache_path.map(Path::to_path_buf),
            tag_key: keys.chunk_id(b"ekko index cache entry tags").0,
            falling_back: Mutex::default(),
            miss_checked: AtomicBool::new(false),
            checking_miss: Mutex::default(),
            pending: RwLock::default(),
            publish_uncertain: AtomicBool::new(false),
            published: Mutex::default(),
            view: Arc::default(),
            generation: AtomicU64::new(0),
            damaged: Mutex::default(),
        }
    }

    /// Read index file `name`, or `None` (remembered, with a warning) if it
    /// is damaged.
    fn read_or_skip(
        &self,
        backend: &dyn Backend,
        keys: &Keys,
        name: &str,
    ) -> Result<Option<Vec<(ChunkId, Location)>>> {
        match read_index_file(backend, keys, name) {
            Ok(entries) => Ok(Some(entries)),
            Err(e) if e.is_damage() => {
                tracing::warn!(
                    "{e}; skipping it (its chunks count as unstored until `ekko index rebuild`)"
                );
                self.damaged
                    .lock()
                    .expect("index lock")
                    .insert(name.to_string());
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn is_skipped(&self, name: &str) -> bool {
        self.damaged.lock().expect("index lock").contains(name)
    }

    /// Take in index files written since this index was opened (by other
    /// processes, e.g. a backup while a FUSE mount or NBD server runs).
    ///
    /// A listed file may vanish before it is read (a prune replacing the
    /// index files): then list again.
    pub fn refresh(&self, backend: &dyn Backend, keys: &Keys) -> Result<()> {
        let mut attempt = 0;
        loop {
            let listed = list_index_files(backend)?;
            let r = if self.is_cached() {
                match guarded(|| self.sync_cache(backend, keys, &listed)) {
                    Err(e @ Error::Cache(_)) => self.fall_back(&e),
                    r => r,
                }
            } else {
                self.load_new_into_memory(backend, keys, &listed)
            };
            // Even when this process added nothing, another may have
            // brought the shared cache further: later lookups look afresh.
            self.move_on();
            match r {
                Err(Error::NotFound { name }) if attempt < 5 && name.starts_with("index/") => {
                    tracing::debug!("index file {name} vanished while loading; listing again");
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    fn load_new_into_memory(
        &self,
        backend: &dyn Backend,
        keys: &Keys,
        listed: &HashMap<String, u64>,
    ) -> Result<()> {
        let store = self.store.read().expect("index lock");
        let Store::Memory(m) = &*store else {
            return Ok(());
        };
        let new: Vec<&String> = {
            let g = m.read().expect("index lock");
            listed
                .keys()
                .filter(|n| !g.1.contains(*n) && !self.is_skipped(n))
                .collect()
        };
        for name in new {
            let Some(entries) = self.read_or_skip(backend, keys, name)? else {
                continue;
            };
            let mut g = m.write().expect("index lock");
            g.0.extend(entries);
            g.1.insert(name.clone());
        }
        Ok(())
    }

    fn open_cache(path: &Path) -> Result<redb::Database> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        // redb panics on some damaged files: that is damage like any other.
        let open = || {
            caught(|| {
                redb::Database::builder()
                    .set_concurrency_mode(redb::ConcurrencyMode::MultiWriter)
                    .set_cache_size(8 << 20)
                    .create(path)
            })
            .unwrap_or_else(|_| {
                Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(
                    "redb could not read it".into(),
                )))
            })
        };
        match open() {
            Ok(db) => Ok(db),
            Err(e @ redb::DatabaseError::DatabaseAlreadyOpen) => Err(cache_err(e)),
            Err(e) => {
                // A damaged cache is only a cache: start it afresh.
                tracing::warn!(
                    "index cache {} is damaged ({e}); rebuilding it",
                    path.display()
                );
                let _ = std::fs::remove_file(path);
                open().map_err(cache_err)
            }
        }
    }

    fn sync_cache(
        &self,
        backend: &dyn Backend,
        keys: &Keys,
        listed: &HashMap<String, u64>,
    ) -> Result<()> {
        let store = self.store.read().expect("index lock");
        let Store::Redb(db) = &*store else {
            // A fall-back came in between: the store is memory now.
            drop(store);
            return self.load_new_into_memory(backend, keys, listed);
        };
        let known: HashMap<String, u64> = {
            let tx = db.begin_read().map_err(cache_err)?;
            match tx.open_table(FILES) {
                Ok(t) => t
                    .iter()
                    .map_err(cache_err)?
                    .filter_map(|r| r.ok().map(|(k, v)| (k.value().to_string(), v.value())))
                    .collect(),
                Err(redb::TableError::TableDoesNotExist(_)) => HashMap::new(),
                Err(e) => return Err(cache_err(e)),
            }
        };
        // A file that is gone, or whose size differs from the one cached
        // (the cache belongs to another repository with the same id, or a
        // file was rewritten), makes the cache disagree with the
        // repository: rebuild it from the index files.
        let vanished = known
            .iter()
            .any(|(k, size)| listed.get(k).is_none_or(|s| s != size));
        if vanished {
            tracing::info!(
                "index cache disagrees with the repository's index files; rebuilding it"
            );
        }
        let new: Vec<&String> = listed
            .keys()
            .filter(|k| !known.contains_key(*k) && !self.is_skipped(k))
            .collect();
        if !vanished && new.is_empty() {
            return Ok(());
        }
        let tx = db.begin_write().map_err(cache_err)?;
        {
            if vanished {
                // Index files were removed (prune): rebuild from scratch.
                tx.delete_table(CHUNKS).map_err(cache_err)?;
                tx.delete_table(FILES).map_err(cache_err)?;
            }
            if known.is_empty() {
                tx.delete_table(OLD_CHUNKS).map_err(cache_err)?;
                tx.delete_table(OLD_FILES).map_err(cache_err)?;
            }
            let mut chunks = tx.open_table(CHUNKS).map_err(cache_err)?;
            let mut files = tx.open_table(FILES).map_err(cache_err)?;
            let todo: Vec<&String> = if vanished {
                listed.keys().filter(|k| !self.is_skipped(k)).collect()
            } else {
                new
            };
            for name in todo {
                // A damaged file stays out of the cache's file table, so
                // that every process looks at it again.
                let Some(entries) = self.read_or_skip(backend, keys, name)? else {
                    continue;
                };
                for (id, loc) in entries {
                    chunks
                        .insert(
                            id.0.as_slice(),
                            cache_value(&self.tag_key, &id, &loc).as_slice(),
                        )
                        .map_err(cache_err)?;
                }
                files
                    .insert(name.as_str(), listed[name])
                    .map_err(cache_err)?;
            }
        }
        tx.commit().map_err(cache_err)?;
        Ok(())
    }

    pub fn lookup(&self, id: &ChunkId) -> Result<Option<Location>> {
        if let Some(l) = self.pending.read().expect("index lock").get(id) {
            return Ok(Some(*l));
        }
        match self.lookup_stored(id) {
            Err(e @ Error::Cache(_)) => {
                self.fall_back(&e)?;
                self.lookup_stored(id)
            }
            r => r,
        }
    }

    /// The location of a chunk that a snapshot references: a chunk the
    /// cache lacks is looked for in the index files too (a damaged cache
    /// can lose entries without a bad tag to show it).
    pub fn lookup_referenced(&self, id: &ChunkId) -> Result<Location> {
        if let Some(l) = self.lookup(id)? {
            return Ok(l);
        }
        if self.is_cached() && !self.miss_checked.load(Ordering::Acquire) {
            let _one = self.checking_miss.lock().expect("index lock");
            // Another thread may have checked (and fallen back) meanwhile.
            if let Some(l) = self.lookup(id)? {
                return Ok(l);
            }
            if self.is_cached() && !self.miss_checked.load(Ordering::Acquire) {
                // A cache that is only behind (a backup committed since it
                // was brought in step) is not damaged: catch up first.
                self.refresh(self.origin.as_ref(), &self.keys)?;
                if let Some(l) = self.lookup(id)? {
                    return Ok(l);
                }
                let loaded = self.read_index_files()?;
                self.miss_checked.store(true, Ordering::Release);
                if loaded.0.contains_key(id) {
                    let _one = self.falling_back.lock().expect("index lock");
                    if self.is_cached() {
                        self.fall_back_locked(
                            &Error::Cache(format!(
                                "it lacks chunk {id}, which an index file lists"
                            )),
                            loaded,
                        )?;
                    }
                }
            }
            if let Some(l) = self.lookup(id)? {
                return Ok(l);
            }
        }
        Err(Error::ChunkMissing { id: *id })
    }

    fn lookup_stored(&self, id: &ChunkId) -> Result<Option<Location>> {
        let store = self.store.read().expect("index lock");
        match &*store {
            Store::Memory(m) => Ok(m.read().expect("index lock").0.get(id).copied()),
            Store::Redb(db) => guarded(|| {
                let view = self.read_view(db)?;
                let Some(chunks) = &view.chunks else {
                    return Ok(None);
                };
                let v = chunks.get(id.0.as_slice()).map_err(cache_err)?;
                v.map(|g| cache_location(&self.tag_key, id, g.value()))
                    .transpose()
            }),
        }
    }

    /// Every index file's entries, and the files read.
    fn read_index_files(&self) -> Result<Loaded> {
        let backend = self.origin.as_ref();
        let mut entries = HashMap::new();
        let mut files = HashSet::new();
        for name in list_index_files(backend)?.into_keys() {
            if let Some(e) = self.read_or_skip(backend, &self.keys, &name)? {
                entries.extend(e);
                files.insert(name);
            }
        }
        Ok((entries, files))
    }

    /// Whether lookups go to the cache (not to memory).
    fn is_cached(&self) -> bool {
        matches!(*self.store.read().expect("index lock"), Store::Redb(_))
    }

    /// The cache failed (`why`): delete it, and serve this process from
    /// the index files in memory. The next process builds a new cache.
    fn fall_back(&self, why: &Error) -> Result<()> {
        let _one = self.falling_back.lock().expect("index lock");
        if !self.is_cached() {
            return Ok(());
        }
        self.fall_back_locked(why, self.read_index_files()?)
    }

    /// `fall_back`, under its lock, with the index files already read
    /// into `loaded`.
    fn fall_back_locked(&self, why: &Error, loaded: Loaded) -> Result<()> {
        let path = self
            .cache_path
            .as_deref()
            .map_or_else(String::new, |p| format!(" {}", p.display()));
        tracing::warn!(
            "the local index cache{path} is damaged or failed ({why}); deleting it and reading the repository's index files instead (the next run builds a new cache)"
        );
        let old = {
            let mut store = self.store.write().expect("index lock");
            // The read view's transaction must end before the database goes.
            let view = self.view.write().expect("index lock").view.take();
            let _ = caught(move || drop(view));
            std::mem::replace(&mut *store, Store::Memory(RwLock::new(loaded)))
        };
        // Closing a database that panicked may panic again.
        let _ = caught(move || drop(old));
        if let Some(p) = &self.cache_path {
            let _ = std::fs::remove_file(p);
        }
        // Index files written (by this process's flush, or others) while
        // the files were read above: take them in too.
        let listed = list_index_files(self.origin.as_ref())?;
        self.load_new_into_memory(self.origin.as_ref(), &self.keys, &listed)?;
        self.move_on();
        Ok(())
    }

    /// The current read view of the cache, opened again if the generation
    /// moved on or it is older than `VIEW_MAX_AGE`. Sound because `flush`
    /// moves the generation on after its commit and before it takes its
    /// entries out of `pending`: a lookup that misses them in `pending`
    /// sees the new generation.
    fn read_view(&self, db: &redb::Database) -> Result<Arc<ReadView>> {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(v) = self.view.read().expect("index lock").view.as_ref() {
            if v.generation == generation && v.opened.elapsed() < VIEW_MAX_AGE {
                return Ok(Arc::clone(v));
            }
        }
        let tx = db.begin_read().map_err(cache_err)?;
        let chunks = match tx.open_table(CHUNKS) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(cache_err(e)),
        };
        let view = Arc::new(ReadView {
            generation,
            opened: Instant::now(),
            chunks,
        });
        let mut slot = self.view.write().expect("index lock");
        // Another thread may have opened a newer view meanwhile: keep that.
        if slot
            .view
            .as_ref()
            .is_none_or(|v| (v.generation, v.opened) < (generation, view.opened))
        {
            slot.view = Some(Arc::clone(&view));
            if !slot.watched {
                slot.watched = true;
                let weak = Arc::downgrade(&self.view);
                std::thread::spawn(move || drop_old_views(&weak));
            }
        }
        Ok(view)
    }

    /// Later lookups must open a new read view: the cache may hold more.
    fn move_on(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.view.write().expect("index lock").view = None;
    }

    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.lookup(id)?.is_some())
    }

    /// Record chunks of a pack that has been stored. Returns true when enough
    /// are pending that the caller should `flush`.
    pub fn add_pending(&self, entries: Vec<(ChunkId, Location)>) -> bool {
        let mut p = self.pending.write().expect("index lock");
        p.extend(entries);
        p.len() >= FLUSH_ENTRIES
    }

    /// The packs of the pending entries, unless an index file that may
    /// name some of them may have been stored (a `flush` whose put
    /// failed): packs that nobody else can know of.
    pub fn unpublished_packs(&self) -> Option<HashSet<ObjectId>> {
        if self.publish_uncertain.load(Ordering::Acquire) {
            return None;
        }
        let published = self.published.lock().expect("index lock");
        let p = self.pending.read().expect("index lock");
        Some(
            p.values()
                .map(|l| l.pack)
                .filter(|pack| !published.contains(pack))
                .collect(),
        )
    }

    /// Forget the pending entries (their packs were deleted).
    pub fn discard_pending(&self) {
        self.pending.write().expect("index lock").clear();
    }

    /// Write the pending entries as a new index file, then move them into the
    /// cache. Must only run after the packs they point to are stored.
    pub fn flush(&self, backend: &dyn Backend, keys: &Keys) -> Result<()> {
        let entries: Vec<(ChunkId, Location)> = {
            let p = self.pending.read().expect("index lock");
            if p.is_empty() {
                return Ok(());
            }
            p.iter().map(|(k, v)| (*k, *v)).collect()
        };
        let name = index_name(&ObjectId::random());
        let body = format::encode_index(&entries);
        let data = format::seal_file(keys, MAGIC_INDEX, &name, &body);
        if let Err(e) = backend.put(&name, &data) {
            // The file may be stored all the same (a put whose reply was
            // lost, a folder fsync that failed after the rename). In a
            // local folder, one that is not there now never will be (the
            // failed write removed its temporary file): a full disk that
            // fails this put leaves nothing published.
            let absent = !crate::backend::is_url(std::ffi::OsStr::new(&backend.location()))
                && matches!(backend.size(&name), Err(Error::NotFound { .. }));
            if !absent {
                self.publish_uncertain.store(true, Ordering::Release);
            }
            return Err(e);
        }
        // Stored: whatever fails below, others may read these entries.
        self.published
            .lock()
            .expect("index lock")
            .extend(entries.iter().map(|(_, l)| l.pack));
        let size = u64::try_from(data.len()).expect("fits");
        let cached = {
            let store = self.store.read().expect("index lock");
            match &*store {
                Store::Memory(m) => {
                    let mut g = m.write().expect("index lock");
                    g.0.extend(entries.iter().copied());
                    g.1.insert(name.clone());
                    Ok(())
                }
                Store::Redb(db) => guarded(|| {
                    let tx = db.begin_write().map_err(cache_err)?;
                    {
                        let mut chunks = tx.open_table(CHUNKS).map_err(cache_err)?;
                        let mut files = tx.open_table(FILES).map_err(cache_err)?;
                        for (id, loc) in &entries {
                            chunks
                                .insert(
                                    id.0.as_slice(),
                                    cache_value(&self.tag_key, id, loc).as_slice(),
                                )
                                .map_err(cache_err)?;
                        }
                        files.insert(name.as_str(), size).map_err(cache_err)?;
                    }
                    tx.commit().map_err(cache_err)
                }),
            }
        };
        if let Err(e @ Error::Cache(_)) = cached {
            // The index file is stored: reading the files takes it in.
            self.fall_back(&e)?;
        } else {
            cached?;
        }
        self.move_on();
        let mut p = self.pending.write().expect("index lock");
        for (id, _) in &entries {
            p.remove(id);
        }
        Ok(())
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        // The read view's transaction must end before the database closes.
        let view = self.view.write().map(|mut v| v.view.take());
        let store = std::mem::replace(
            self.store.get_mut().unwrap_or_else(|p| p.into_inner()),
            Store::Memory(RwLock::default()),
        );
        // redb reads its own tables when it closes, and panics on some
        // damage there: the cache goes, not the process.
        let closed = caught(move || {
            drop(view);
            drop(store);
        });
        if closed.is_err() {
            if let Some(p) = &self.cache_path {
                tracing::warn!("index cache {} is damaged; deleting it", p.display());
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Every `VIEW_MAX_AGE`, drops the shared read view if it is that old;
/// ends once there is none (a new view starts a new watcher) or the index
/// is gone.
fn drop_old_views(slot: &std::sync::Weak<RwLock<ViewSlot>>) {
    loop {
        std::thread::sleep(VIEW_MAX_AGE);
        let Some(slot) = slot.upgrade() else {
            return;
        };
        let mut s = slot.write().expect("index lock");
        if s.view
            .as_ref()
            .is_some_and(|v| v.opened.elapsed() >= VIEW_MAX_AGE)
        {
            s.view = None;
        }
        if s.view.is_none() {
            s.watched = false;
            return;
        }
    }
}

/// Default place of the index cache for a repository.
pub fn default_cache_path(repo_id: &str) -> Option<PathBuf> {
    let base = std::env::var_os("EKKO_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("ekko")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ekko")))?;
    Some(base.join(repo_id).join("index.redb"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    /// A scratch folder, a local store in it, keys, and a cache path.
    fn fixture() -> (tempfile::TempDir, Arc<dyn Backend>, Keys, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path().join("repo")));
        let cache = dir.path().join("c/index.redb");
        (dir, backend, Keys::from_master(&[8; 64]), cache)
    }

    fn loc(i: u8) -> Location {
        Location {
            pack: ObjectId([i; 16]),
            offset: 16,
            stored_len: 100,
            raw_len: 200,
            kind: ChunkKind::Data,
            compressed: true,
        }
    }

    #[test]
    fn only_packs_no_stored_index_file_names_are_unpublished() {
        let (dir, backend, keys, _) = fixture();
        let index = Index::open(&backend, &keys, None).unwrap();
        let set = |packs: &[u8]| -> HashSet<ObjectId> {
            packs.iter().map(|&i| ObjectId([i; 16])).collect()
        };
        index.add_pending(vec![(ChunkId([1; 32]), loc(1))]);
        assert_eq!(index.unpublished_packs(), Some(set(&[1])));
        index.flush(backend.as_ref(), &keys).unwrap();
        index.add_pending(vec![(ChunkId([2; 32]), loc(2))]);
        assert_eq!(index.unpublished_packs(), Some(set(&[2])));
        // Once stored, an index file's packs stay published even while
        // their entries are still pending (a cache update failed after).
        index.published.lock().unwrap().insert(ObjectId([2; 16]));
        assert_eq!(index.unpublished_packs(), Some(set(&[])));
        // A put that failed may have stored the file all the same.
        std::fs::write(dir.path().join("not-a-folder"), b"").unwrap();
        let broken: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path().join("not-a-folder")));
        index.add_pending(vec![(ChunkId([3; 32]), loc(3))]);
        assert!(index.flush(broken.as_ref(), &keys).is_err());
        assert_eq!(index.unpublished_packs(), None);
    }

    #[test]
    fn refresh_takes_in_index_files_of_other_writers() {
        let (_dir, backend, keys, cache) = fixture();
        for cache in [None, Some(cache.as_path())] {
            let reader = Index::open(&backend, &keys, cache).unwrap();
            let writer = Index::open(&backend, &keys, None).unwrap();
            let id = ChunkId([rand_byte(cache.is_some()); 32]);
            writer.add_pending(vec![(id, loc(1))]);
            writer.flush(backend.as_ref(), &keys).unwrap();
            assert_eq!(reader.lookup(&id).unwrap(), None);
            reader.refresh(backend.as_ref(), &keys).unwrap();
            assert_eq!(reader.lookup(&id).unwrap(), Some(loc(1)));
        }
    }

    #[test]
    fn a_flushed_chunk_is_never_missed_by_concurrent_lookups() {
        // Lookups share one read view of the cache; flush must make them
        // open a new one before its entries leave `pending`.
        let (_dir, backend, keys, cache) = fixture();
        let index = Index::open(&backend, &keys, Some(&cache)).unwrap();
        assert!(matches!(*index.store.read().unwrap(), Store::Redb(_)));
        let id = |n: u64| {
            let mut a = [0u8; 32];
            a[..8].copy_from_slice(&(n + 1).to_le_bytes());
            ChunkId(a)
        };
        let added = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| loop {
                    let n = added.load(Ordering::Acquire);
                    for k in n.saturating_sub(3)..n {
                        assert_eq!(index.lookup(&id(k)).unwrap(), Some(loc(1)), "chunk {k}");
                    }
                    if n == 300 {
                        return;
                    }
                });
            }
            for n in 0..300 {
                index.add_pending(vec![(id(n), loc(1))]);
                added.store(n + 1, Ordering::Release);
                index.flush(backend.as_ref(), &keys).unwrap();
            }
        });
        assert_eq!(index.lookup(&id(300)).unwrap(), None);
    }

    #[test]
    fn an_idle_read_view_is_dropped() {
        // An open read transaction keeps other processes from reusing the
        // cache's freed pages: an idle reader must not keep one.
        let (_dir, backend, keys, cache) = fixture();
        let index = Index::open(&backend, &keys, Some(&cache)).unwrap();
        assert_eq!(index.lookup(&ChunkId([5; 32])).unwrap(), None);
        assert!(index.view.read().unwrap().view.is_some());
        std::thread::sleep(VIEW_MAX_AGE * 3);
        let slot = index.view.read().unwrap();
        assert!(slot.view.is_none() && !slot.watched);
        drop(slot);
        // And the next lookup opens one again.
        assert_eq!(index.lookup(&ChunkId([5; 32])).unwrap(), None);
        assert!(index.view.read().unwrap().view.is_some());
    }

    /// A cache that is only behind (a backup committed since it was
    /// brought in step) is not damaged: a referenced chunk is found by
    /// catching up, and the cache stays.
    #[test]
    fn a_cache_that_is_only_behind_is_not_damaged() {
        let (_dir, backend, keys, cache) = fixture();
        let reader = Index::open(&backend, &keys, Some(&cache)).unwrap();
        let writer = Index::open(&backend, &keys, None).unwrap();
        let id = ChunkId([4; 32]);
        writer.add_pending(vec![(id, loc(2))]);
        writer.flush(backend.as_ref(), &keys).unwrap();
        assert_eq!(reader.lookup_referenced(&id).unwrap(), loc(2));
        assert!(matches!(*reader.store.read().unwrap(), Store::Redb(_)));
        assert!(cache.exists());
    }

    /// A cache entry that rots (its location changes, or its tag) is
    /// caught: the lookup answers from the index files, and the cache is
    /// deleted. A cache that lost an entry is caught when a snapshot needs
    /// that chunk.
    #[test]
    fn a_damaged_cache_entry_is_never_believed() {
        let (_dir, backend, keys, cache) = fixture();
        let id = ChunkId([7; 32]);
        let writer = Index::open(&backend, &keys, None).unwrap();
        writer.add_pending(vec![(id, loc(3))]);
        writer.flush(backend.as_ref(), &keys).unwrap();
        for damage in [16usize, 40, 49] {
            {
                let index = Index::open(&backend, &keys, Some(&cache)).unwrap();
                drop(index);
            }
            // Flip one bit of the entry's value, as rot would.
            {
                let db = redb::Database::create(&cache).unwrap();
                let tx = db.begin_write().unwrap();
                {
                    let mut t = tx.open_table(CHUNKS).unwrap();
                    let mut v = t.get(id.0.as_slice()).unwrap().unwrap().value().to_vec();
                    v[damage] ^= 1;
                    t.insert(id.0.as_slice(), v.as_slice()).unwrap();
                }
                tx.commit().unwrap();
            }
            let index = Index::open(&backend, &keys, Some(&cache)).unwrap();
            assert_eq!(index.lookup(&id).unwrap(), Some(loc(3)), "byte {damage}");
            assert!(matches!(*index.store.read().unwrap(), Store::Memory(_)));
            assert!(!cache.exists(), "the damaged cache is still there");
        }
        // An entry gone from the cache (its tree damaged) while the index
        // files list it.
        drop(Index::open(&backend, &keys, Some(&cache)).unwrap());
        {
            let db = redb::Database::create(&cache).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(CHUNKS)
                .unwrap()
                .remove(id.0.as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let index = Index::open(&backend, &keys, Some(&cache)).unwrap();
        assert_eq!(
            index.lookup(&id).unwrap(),
            None,
            "a plain lookup trusts a miss"
        );
        assert_eq!(index.lookup_referenced(&id).unwrap(), loc(3));
        assert!(!cache.exists());
        // A chunk no index file lists is missing, and stays so.
        let absent = ChunkId([9; 32]);
        assert!(matches!(
            index.lookup_referenced(&absent),
            Err(Error::ChunkMissing { .. })
        ));
    }

    fn rand_byte(second: bool) -> u8 {
        if second {
            2
        } else {
            1
        }
    }
}
