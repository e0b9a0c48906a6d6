//! Verify a repository: structure always, every chunk's bytes on request.
//!
//! Structure: every manifest, index file and pack trailer opens and
//! authenticates; every index entry matches its pack's trailer; every map
//! node and data chunk a snapshot references is indexed. With `read_data`,
//! every stored chunk is read, decrypted, decompressed and hashed again.
//! Damage is reported by chunk, by pack, and by the snapshots it affects.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::Serialize;

use crate::chunk;
use crate::error::{Error, Result};
use crate::format::{self, BlobEntry, ChunkKind, Location};
use crate::id::{ChunkId, ObjectId};
use crate::index;
use crate::pack;
use crate::repo::Repository;
use crate::snapshot;

/// Which packs `check` reads, decrypts and verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadData {
    /// None: structure only.
    None,
    /// Every pack.
    All,
    /// Part `n` of `m` (1 ≤ n ≤ m): the packs whose id, read as a number,
    /// is `n - 1` modulo `m`. The parts are disjoint and together cover
    /// every pack, so checking part `day % m + 1` each day reads the whole
    /// repository every `m` days.
    Part { n: u64, m: u64 },
    /// About this percentage of the packs, chosen at random each run.
    Percent(u8),
}

impl ReadData {
    /// Parse `N/M` or `P%`, as `--read-data-subset` takes them.
    pub fn parse_subset(s: &str) -> std::result::Result<ReadData, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(ReadData::Percent(p)),
                _ => Err(format!("{s:?}: a percentage is 1% to 100%")),
            };
        }
        let bad = || format!("{s:?}: give N/M (part N of M, 1 ≤ N ≤ M) or P% (1% to 100%)");
        let (n, m) = s.split_once('/').ok_or_else(bad)?;
        let (n, m): (u64, u64) = (
            n.trim().parse().map_err(|_| bad())?,
            m.trim().parse().map_err(|_| bad())?,
        );
        if n == 0 || n > m {
            return Err(bad());
        }
        Ok(ReadData::Part { n, m })
    }

    /// Whether the pack `id` is read; `salt` is this run's random choice
    /// for `Percent`.
    fn reads(&self, id: &ObjectId, salt: &[u8; 16]) -> bool {
        let first8 = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
        match *self {
            ReadData::None => false,
            ReadData::All => true,
            ReadData::Part { n, m } => first8(&id.0) % m == n - 1,
            ReadData::Percent(p) => {
                let mut h = blake3::Hasher::new();
                h.update(salt);
                h.update(&id.0);
                first8(h.finalize().as_bytes()) % 100 < u64::from(p)
            }
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub snapshots: usize,
    pub packs: usize,
    pub index_files: usize,
    pub chunks: usize,
    pub chunks_read: usize,
    /// Packs read and verified (all of them with `ReadData::All`).
    pub packs_read: usize,
    /// Every problem found, one line each.
    pub problems: Vec<String>,
    /// Damaged or missing chunks (hex id → reason).
    pub damaged_chunks: Vec<(String, String)>,
    /// Snapshots that reference damaged or missing data.
    pub damaged_snapshots: Vec<String>,
    /// Packs no index refers to (left by interrupted backups; harmless).
    pub unreferenced_packs: usize,
    /// GC marks waiting for a later prune (normal; see docs/GC.md).
    pub gc_marks: usize,
    /// Packs those marks will delete.
    pub packs_marked: usize,
    pub protected_snapshots: usize,
    /// Lost-chunk records (written by `check --repair`, see `crate::lost`).
    pub lost_records: usize,
    /// Of the damaged chunks, those a record names as lost: they heal when
    /// a backup stores the same data again.
    pub chunks_known_lost: usize,
    /// Where the damage lies, for `check --repair`.
    #[serde(skip)]
    pub damage: Damage,
}

/// The damage `check` found, by pack: what a repair works from.
#[derive(Debug, Default)]
pub struct Damage {
    /// Existing packs holding chunks that failed verification.
    pub bad_chunks: HashMap<ObjectId, HashSet<ChunkId>>,
    /// Existing packs whose trailer does not open.
    pub bad_trailers: HashSet<ObjectId>,
    /// Existing packs whose header does not read but whose trailer opens:
    /// their chunks are where the trailer says, and a repair rewrites them.
    pub bad_headers: HashSet<ObjectId>,
    /// Of those, the ones whose header names a version this ekko does not
    /// know: if one of their chunks also fails verification, the pack may
    /// be a newer format misread, and a repair leaves it alone.
    pub unknown_versions: HashSet<ObjectId>,
    /// Packs that index entries name but that do not exist.
    pub missing_packs: HashSet<ObjectId>,
    /// Every pack the check listed.
    pub listed_packs: HashSet<ObjectId>,
    /// Packs that could not be read at all (an I/O or store error, not
    /// damage that was seen): a repair must not judge them.
    pub unreadable_packs: Vec<(ObjectId, String)>,
    /// Referenced chunks that are damaged or in no index.
    pub referenced_damaged: HashSet<ChunkId>,
    /// Of those, the ones no readable index file names.
    pub referenced_unindexed: HashSet<ChunkId>,
    /// The index files do not match the packs: one does not read, an entry
    /// names a chunk its pack lacks or places it elsewhere, or a pack that
    /// no index names holds a chunk a snapshot needs. Rebuilding the index
    /// from the trailers repairs it.
    pub index_damaged: bool,
    /// Ids of the snapshots that reference damaged or missing data.
    pub snapshots: Vec<String>,
}

impl Damage {
    /// Packs a repair rewrites: those with damaged chunks, trailers or
    /// headers.
    pub fn packs_to_repair(&self) -> HashSet<ObjectId> {
        self.bad_chunks
            .keys()
            .chain(&self.bad_trailers)
            .chain(&self.bad_headers)
            .copied()
            .collect()
    }
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

pub fn check(repo: &Repository, read_data: ReadData, threads: usize) -> Result<CheckReport> {
    check_with(repo, read_data, threads, &HashSet::new())
}

/// `check`, reading (with `--read-data`'s rigour) the packs in `also` as
/// well as those `read_data` selects.
pub fn check_with(
    repo: &Repository,
    read_data: ReadData,
    threads: usize,
    also: &HashSet<ObjectId>,
) -> Result<CheckReport> {
    let backend = repo.store().as_ref();
    let keys = repo.keys();
    let mut report = CheckReport::default();
    let mut damaged: HashMap<ChunkId, String> = HashMap::new();

    // 0. Key files: one that does not decode locks its passphrase out.
    for (name, why) in repo.damaged_key_files()? {
        report.problems.push(format!(
            "{why}: its passphrase no longer opens the repository. Remove it (`ekko key remove {name}`) and add that passphrase again (`ekko key add`)"
        ));
    }

    // 1. Packs and their trailers.
    let packs = backend.list("packs/")?;
    report.packs = packs.len();
    let listed: HashSet<ObjectId> = packs
        .iter()
        .filter_map(|p| pack::pack_id_from_name(&p.name))
        .collect();
    report.damage.listed_packs = listed.clone();
    let mut trailers: HashMap<ObjectId, HashMap<ChunkId, BlobEntry>> = HashMap::new();
    let mut bad_packs: HashSet<ObjectId> = HashSet::new();
    for p in &packs {
        let Some(pid) = pack::pack_id_from_name(&p.name) else {
            match pack::misplaced_pack_id(&p.name) {
                Some(id) => report.problems.push(format!(
                    "{}: a pack file in the wrong place: pack {id} belongs at {} (`ekko check --repair` puts it back if nothing is there)",
                    p.name,
                    pack::pack_name(&id)
                )),
                None => report.problems.push(format!("{}: not a pack name", p.name)),
            }
            continue;
        };
        match pack::read_trailer(backend, keys, &p.name) {
            Ok(entries) => {
                trailers.insert(pid, entries.into_iter().map(|e| (e.id, e)).collect());
            }
            Err(e) if pack::header_error(&e) => {
                match pack::read_trailer_past_header(backend, keys, &p.name) {
                    Ok(entries) => {
                        let unknown = matches!(e, Error::UnsupportedVersion { .. });
                        let caveat = if unknown {
                            "but its trailer opens as a version-1 trailer: unless a newer ekko writes to this repository,"
                        } else {
                            "its trailer opens, so"
                        };
                        report.problems.push(format!(
                            "pack {}: {e}; {caveat} only its unsealed header or footer bytes are damaged (`ekko check --read-data --repair` rewrites the pack)",
                            p.name
                        ));
                        report.damage.bad_headers.insert(pid);
                        if unknown {
                            report.damage.unknown_versions.insert(pid);
                        }
                        trailers.insert(pid, entries.into_iter().map(|e| (e.id, e)).collect());
                    }
                    // The store failed: not judged.
                    Err(e2) if !pack::header_error(&e2) => {
                        damaged_pack(&mut report, &mut bad_packs, pid, &p.name, e2)
                    }
                    Err(_) => damaged_pack(&mut report, &mut bad_packs, pid, &p.name, e),
                }
            }
            Err(e) => damaged_pack(&mut report, &mut bad_packs, pid, &p.name, e),
        }
    }

    // 2. Index files, each entry against its pack.
    let mut indexed: HashMap<ChunkId, Location> = HashMap::new();
    let mut referenced_packs: HashSet<ObjectId> = HashSet::new();
    let index_files = backend.list("index/")?;
    report.index_files = index_files.len();
    for f in &index_files {
        match index::read_index_file(backend, keys, &f.name) {
            Ok(entries) => {
                for (id, loc) in entries {
                    referenced_packs.insert(loc.pack);
                    let pname = pack::pack_name(&loc.pack);
                    if bad_packs.contains(&loc.pack) {
                        // A bad pack that is not damaged could not be read.
                        let seen_damaged = report.damage.bad_trailers.contains(&loc.pack);
                        damaged.entry(id).or_insert_with(|| {
                            if seen_damaged {
                                format!("in damaged pack {pname}")
                            } else {
                                format!("in pack {pname}, which could not be read (not judged)")
                            }
                        });
                    } else {
                        if !listed.contains(&loc.pack) {
                            report.damage.missing_packs.insert(loc.pack);
                        }
                        match trailers.get(&loc.pack).and_then(|t| t.get(&id)) {
                            None => {
                                if listed.contains(&loc.pack) {
                                    report.damage.index_damaged = true;
                                }
                                damaged.entry(id).or_insert_with(|| {
                                    format!("pack {pname} is missing or lacks it")
                                });
                            }
                            Some(e)
                                if e.offset != loc.offset
                                    || e.stored_len != loc.stored_len
                                    || e.kind != loc.kind =>
                            {
                                report.damage.index_damaged = true;
                                damaged.entry(id).or_insert_with(|| {
                                    format!("index disagrees with pack {pname}")
                                });
                            }
                            Some(_) => {}
                        }
                    }
                    indexed.insert(id, loc);
                }
            }
            Err(e) => {
                report.damage.index_damaged = true;
                report.problems.push(format!("index file {}: {e}", f.name));
            }
        }
    }
    report.chunks = indexed.len();
    report.unreferenced_packs = trailers
        .keys()
        .filter(|p| !referenced_packs.contains(p))
        .count();

    // 3. With --read-data: every chunk of every pack (or of a subset).
    // A pack whose header is damaged is rewritten by a repair: its chunks
    // are always verified, so that a repair acts on what they are now.
    let bad_headers = report.damage.bad_headers.clone();
    if read_data != ReadData::None || !also.is_empty() || !bad_headers.is_empty() {
        let mut salt = [0u8; 16];
        crate::crypto::random_bytes(&mut salt);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| Error::Invalid(format!("thread pool: {e}")))?;
        let found = Mutex::new(Vec::<(ObjectId, ChunkId, String)>::new());
        let unreadable = Mutex::new(Vec::<(ObjectId, String)>::new());
        let read = std::sync::atomic::AtomicUsize::new(0);
        let pack_list: Vec<(&ObjectId, &HashMap<ChunkId, BlobEntry>)> = trailers
            .iter()
            .filter(|(id, _)| {
                also.contains(id) || bad_headers.contains(id) || read_data.reads(id, &salt)
            })
            .collect();
        report.packs_read = pack_list.len();
        pool.install(|| {
            pack_list.par_iter().for_each(|(pid, entries)| {
                let pname = pack::pack_name(pid);
                let data = match backend.get(&pname) {
                    Ok(d) => d,
                    Err(e) => {
                        let mut f = found.lock().expect("lock");
                        for id in entries.keys() {
                            f.push((**pid, *id, format!("pack {pname} unreadable: {e}")));
                        }
                        unreadable
                            .lock()
                            .expect("lock")
                            .push((**pid, e.to_string()));
                        return;
                    }
                };
                let mut data = data;
                let mut sorted: Vec<&BlobEntry> = entries.values().collect();
                sorted.sort_by_key(|e| e.offset);
                read.fetch_add(sorted.len(), std::sync::atomic::Ordering::Relaxed);
                let bad = verify_blobs(repo, &pname, &mut data, &sorted);
                if !bad.is_empty() {
                    found
                        .lock()
                        .expect("lock")
                        .extend(bad.into_iter().map(|(id, why)| (**pid, id, why)));
                }
            })
        });
        report.chunks_read = read.into_inner();
        let unreadable = unreadable.into_inner().expect("lock");
        let unreadable_ids: HashSet<ObjectId> = unreadable.iter().map(|(p, _)| *p).collect();
        for (pid, id, reason) in found.into_inner().expect("lock") {
            if !unreadable_ids.contains(&pid) {
                report.damage.bad_chunks.entry(pid).or_default().insert(id);
            }
            damaged.entry(id).or_insert(reason);
        }
        report.damage.unreadable_packs.extend(unreadable);
    }

    // 4. GC marks and protect objects: they must open; a mark is not damage.
    let (marks, bad_marks) = crate::gc::read_marks(backend, keys)?;
    report.gc_marks = marks.len();
    report.packs_marked = marks.iter().map(|m| m.mark.packs.len()).sum();
    for e in bad_marks {
        report.problems.push(format!("GC mark: {e}"));
    }
    let mut protected = Vec::new();
    for o in backend.list(crate::gc::PROTECT_PREFIX)? {
        match crate::gc::read_protection(backend, keys, &o.name) {
            Ok(p) => {
                report.protected_snapshots += 1;
                protected.push(p.snapshot);
            }
            Err(e) if e.is_damage() || matches!(e, Error::UnsupportedVersion { .. }) => {
                report.problems.push(format!("protect object: {e}"));
            }
            Err(e) => return Err(e),
        }
    }

    // 5. Snapshots: walk every map; note which reference damage.
    let (snaps, bad_snaps) = snapshot::load_all(backend, keys)?;
    report.snapshots = snaps.len() + bad_snaps.len();
    // Forget never removes a protected snapshot: one whose manifest is
    // gone was lost some other way.
    let listed: HashSet<String> = snapshot::list_ids(backend)?.into_iter().collect();
    for id in protected.iter().filter(|id| !listed.contains(*id)) {
        report.problems.push(format!(
            "snapshot {id} is protected, but its manifest is gone: it was deleted outside ekko, or lost. If it was meant to go, `ekko protect --remove {id}`"
        ));
    }
    for e in bad_snaps {
        report.problems.push(format!("snapshot manifest: {e}"));
    }
    let (lost_records, bad_lost) = crate::lost::read_all(backend, keys)?;
    report.lost_records = lost_records.len() + bad_lost.len();
    for e in bad_lost {
        report.problems.push(format!("lost-chunk record: {e}"));
    }
    let lost = crate::lost::lost_chunks(&lost_records);
    let mut walker = Walker {
        repo,
        indexed: &indexed,
        damaged: &mut damaged,
        memo: HashMap::new(),
        problems: Vec::new(),
        referenced_bad: HashSet::new(),
    };
    for s in &snaps {
        let mut bad = false;
        for d in &s.disks {
            if walker.subtree_bad(d.map.root, d.map.depth)? {
                bad = true;
            }
        }
        if bad {
            report
                .damaged_snapshots
                .push(format!("{} ({} at {})", s.id, s.vm, s.time));
            report.damage.snapshots.push(s.id.clone());
        }
    }
    report.problems.extend(walker.problems);
    report.damage.referenced_damaged = std::mem::take(&mut walker.referenced_bad);
    // A needed chunk that no index names may still sit in a pack (one that
    // came back, or whose index file was lost): say so, as a rebuilt index
    // would find it.
    let unindexed: HashSet<ChunkId> = report
        .damage
        .referenced_damaged
        .iter()
        .filter(|id| !indexed.contains_key(*id))
        .copied()
        .collect();
    let mut in_a_pack: HashSet<ChunkId> = HashSet::new();
    for (pid, entries) in &trailers {
        for id in entries.keys().filter(|id| unindexed.contains(*id)) {
            in_a_pack.insert(*id);
            if let Some(reason) = damaged.get_mut(id) {
                reason.push_str(&format!(
                    "; but pack {} holds it: `ekko check --repair` (or `ekko index rebuild`) indexes it again",
                    pack::pack_name(pid)
                ));
            }
        }
    }
    report.damage.index_damaged |= !in_a_pack.is_empty();
    report.damage.referenced_unindexed = unindexed;
    for (id, reason) in damaged.iter_mut() {
        if lost.contains(id) && !indexed.contains_key(id) && !in_a_pack.contains(id) {
            report.chunks_known_lost += 1;
            reason.push_str(
                " (lost, as a repair recorded: the next backup of a VM whose disk still holds this data stores it again)",
            );
        }
    }
    let mut dl: Vec<(String, String)> = damaged
        .into_iter()
        .map(|(id, r)| (id.to_hex(), r))
        .collect();
    dl.sort();
    for (id, reason) in &dl {
        report.problems.push(format!("chunk {id}: {reason}"));
    }
    for s in &report.damaged_snapshots {
        report
            .problems
            .push(format!("snapshot {s} references damaged or missing data"));
    }
    report.damaged_chunks = dl;
    Ok(report)
}

/// A pack whose trailer does not read: damaged, or (an I/O or store error,
/// or a version this ekko does not know) not judged.
fn damaged_pack(
    report: &mut CheckReport,
    bad_packs: &mut HashSet<ObjectId>,
    pid: ObjectId,
    name: &str,
    e: Error,
) {
    report.problems.push(format!("pack {name}: {e}"));
    if e.is_damage() {
        report.damage.bad_trailers.insert(pid);
    } else {
        report.damage.unreadable_packs.push((pid, e.to_string()));
    }
    bad_packs.insert(pid);
}

/// Open, decompress and re-hash the blobs of one pack (`entries` sorted by
/// offset), several at once and in place in `pack`. Returns the damaged
/// ones, each with why.
fn verify_blobs(
    repo: &Repository,
    pname: &str,
    pack: &mut [u8],
    entries: &[&BlobEntry],
) -> Vec<(ChunkId, String)> {
    let mut bad = Vec::new();
    let locs: Vec<Location> = entries
        .iter()
        .map(|e| e.located_in(ObjectId([0; 16])))
        .collect();
    let mut cutter = chunk::Cutter::new(pack, 0);
    for (group, group_locs) in entries
        .chunks(crate::siv::GROUP)
        .zip(locs.chunks(crate::siv::GROUP))
    {
        // Cut each blob from the pack. One that overlaps the one before (a
        // damaged trailer) or lies past the end is reported, not opened.
        let mut blobs = Vec::with_capacity(group.len());
        for (e, loc) in group.iter().zip(group_locs) {
            match cutter.cut(e.offset, e.stored_len) {
                Some(blob) => blobs.push((&e.id, loc, blob)),
                None => bad.push((
                    e.id,
                    format!("lies past the end of pack {pname}, or overlaps another chunk"),
                )),
            }
        }
        let ids: Vec<ChunkId> = blobs.iter().map(|(id, _, _)| **id).collect();
        for (id, r) in ids
            .into_iter()
            .zip(chunk::decode_many(repo.keys(), pname, blobs))
        {
            match r {
                Err(err) => bad.push((id, err.to_string())),
                Ok(plain) if repo.keys().chunk_id(&plain) != id => {
                    bad.push((id, format!("content does not match its id (pack {pname})")))
                }
                Ok(_) => {}
            }
        }
    }
    bad
}

struct Walker<'a> {
    repo: &'a Repository,
    indexed: &'a HashMap<ChunkId, Location>,
    damaged: &'a mut HashMap<ChunkId, String>,
    /// node id → does its subtree reference damage?
    memo: HashMap<ChunkId, bool>,
    problems: Vec<String>,
    /// Referenced chunks found damaged or missing.
    referenced_bad: HashSet<ChunkId>,
}

impl Walker<'_> {
    fn chunk_bad(&mut self, id: &ChunkId) -> bool {
        if id.is_zero() {
            return false;
        }
        if !self.damaged.contains_key(id) && self.indexed.contains_key(id) {
            return false;
        }
        self.damaged
            .entry(*id)
            .or_insert_with(|| "referenced but not in any index".into());
        self.referenced_bad.insert(*id);
        true
    }

    fn subtree_bad(&mut self, node: ChunkId, depth: u8) -> Result<bool> {
        if node.is_zero() {
            return Ok(false);
        }
        if let Some(&b) = self.memo.get(&node) {
            return Ok(b);
        }
        let bad = if self.chunk_bad(&node) {
            true
        } else {
            match self.indexed.get(&node).map(|l| l.kind) {
                Some(ChunkKind::Map) => {}
                _ => {
                    self.damaged.insert(node, "expected a map node".into());
                    self.referenced_bad.insert(node);
                    self.memo.insert(node, true);
                    return Ok(true);
                }
            }
            match self
                .repo
                .read_chunk(&node)
                .and_then(|d| format::decode_map_node("map node", &d))
            {
                Err(e) if e.is_damage() => {
                    self.damaged.entry(node).or_insert_with(|| e.to_string());
                    self.referenced_bad.insert(node);
                    true
                }
                Err(e) => return Err(e),
                Ok(children) => {
                    let mut bad = false;
                    for c in children {
                        let b = if depth > 1 {
                            self.subtree_bad(c, depth - 1)?
                        } else {
                            self.chunk_bad(&c)
                        };
                        bad |= b;
                    }
                    bad
                }
            }
        };
        self.memo.insert(node, bad);
        Ok(bad)
    }
}
