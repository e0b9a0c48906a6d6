//! `ekko prune`: reclaim the space of chunks no snapshot references, safely
//! while backups run on any host. `docs/GC.md` gives the argument.
//!
//! One run, under the GC lock:
//! 1. Read the store's clock (the timestamp of our lock object), the GC
//!    marks, the snapshots, the index files and the pack listing, in that
//!    order. Walk every snapshot's block maps: the referenced chunks.
//! 2. **Delete** the packs of every mark older than its grace period, except
//!    a pack that holds the only indexed copy of a chunk referenced *now*
//!    (a backup that started before the mark reused it).
//! 3. **Mark** packs older than the grace period that hold nothing
//!    referenced, and repack those that are mostly garbage (copy their live
//!    chunks into new packs, then mark them).
//! 4. Rewrite the index if anything changed (new files first, then delete
//!    the files read in step 1), then delete the packs of step 2, then the
//!    marks that are done, then write the new mark.
//!
//! Every crash point leaves a repository that checks clean: index files never
//! name a deleted pack (they are replaced before packs go), and a pack is
//! deleted only after a full grace period in a mark.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::chunk::{self, EncodedChunk};
use crate::error::{Error, Result};
use crate::format::{self, Location, MAGIC_INDEX};
use crate::gc::{self, Mark};
use crate::id::{ChunkId, ObjectId};
use crate::index;
use crate::lock::Lock;
use crate::pack;
use crate::repo::Repository;
use crate::snapshot;

mod placement;

/// Repack a pack once this percentage of it is garbage, so that garbage
/// stays below it across the repository (borg compact's default too).
pub const DEFAULT_REPACK_THRESHOLD: u8 = 10;

#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// How long a pack stays marked before it may be deleted; also the
    /// minimum age of a pack before it may be marked.
    pub grace: Duration,
    /// Bound on the skew between the clocks that stamp objects, plus listing
    /// delay. Backups that missed a mark get `grace − 2 × skew`.
    pub skew: Duration,
    /// Repack a pack when at least this percentage of its bytes is garbage.
    pub repack_threshold: u8,
    /// Compute and report, change nothing.
    pub dry_run: bool,
    /// Crash tests only: pause this long after every change to the
    /// repository, so that a kill lands between any two of them.
    pub step_delay: Option<Duration>,
    /// Dry runs only: treat these snapshots as gone (what `forget
    /// --dry-run --prune` would have removed).
    pub assume_forgotten: HashSet<String>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            grace: gc::DEFAULT_GRACE,
            skew: gc::DEFAULT_SKEW,
            repack_threshold: DEFAULT_REPACK_THRESHOLD,
            dry_run: false,
            step_delay: None,
            assume_forgotten: HashSet::new(),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub snapshots: usize,
    pub chunks_referenced: usize,
    pub packs: usize,
    /// Packs deleted (or, in a dry run, that would be), and their bytes.
    pub packs_deleted: usize,
    pub bytes_deleted: u64,
    /// Marked packs kept because a snapshot came to reference them.
    pub packs_kept_referenced: usize,
    pub marks_completed: usize,
    /// Packs marked by this run, and their bytes: deleted by a prune after
    /// `next_deletion`.
    pub packs_marked: usize,
    pub bytes_marked: u64,
    /// Of the marked packs, those that still held live chunks.
    pub packs_repacked: usize,
    /// Live bytes copied out of them into `packs_written` new packs.
    pub bytes_repacked: u64,
    pub packs_written: usize,
    /// Packs younger than the grace period: kept whole and not judged
    /// (they may belong to a backup still running); a later prune will.
    pub packs_too_young: usize,
    pub marks_pending: usize,
    /// When the earliest pending mark may be acted on (store clock).
    pub next_deletion: Option<String>,
    pub index_files_written: usize,
    pub index_files_removed: usize,
    /// Temporary files left by killed writers (a local folder), removed.
    pub temporaries_removed: usize,
    pub bytes_temporaries: u64,
    /// Referenced chunks that a repair recorded as lost and that are still
    /// missing (see `crate::lost`).
    pub chunks_lost: usize,
    /// Of those, block-map nodes: while any is missing, nothing is marked
    /// or repacked (what lies below it is unseen).
    pub lost_map_nodes: usize,
    /// While `lost_map_nodes` holds prune: the snapshots the lost-chunk
    /// records name that still exist. Forgetting those that reference a
    /// lost node (or restoring its pack) releases the hold.
    pub held_by: Vec<String>,
    /// Lost-chunk records removed: none of their chunks is both referenced
    /// and missing any more (healed by a backup, or forgotten).
    pub lost_records_removed: usize,
    pub seconds: f64,
}

const ENTRIES_PER_FILE: usize = 65_536;

struct PackInfo {
    size: u64,
    modified: SystemTime,
}

fn unsafe_(reason: impl Into<String>) -> Error {
    Error::PruneUnsafe {
        reason: reason.into(),
    }
}

fn older_than(now: SystemTime, t: SystemTime, d: Duration) -> bool {
    now.duration_since(t).is_ok_and(|age| age >= d)
}

pub fn prune(repo: &Repository, opts: &PruneOptions) -> Result<PruneReport> {
    gc::validate_grace(opts.grace, opts.skew)?;
    if !opts.dry_run && !opts.assume_forgotten.is_empty() {
        return Err(Error::Invalid(
            "assume_forgotten is for dry runs only".into(),
        ));
    }
    if opts.repack_threshold > 100 {
        return Err(Error::Invalid(
            "the repack threshold is a percentage: 0 to 100".into(),
        ));
    }
    let started = Instant::now();
    let step = || {
        if let Some(d) = opts.step_delay {
            std::thread::sleep(d);
        }
    };
    let backend = repo.backend().as_ref();
    let keys = repo.keys();
    let lock = if opts.dry_run {
        None
    } else {
        Some(Lock::gc(repo.backend(), keys, "prune")?)
    };
    // The store's clock: every age below is measured on it.
    let now = match &lock {
        Some(l) => l.store_time()?,
        // A dry run writes nothing, so it cannot stamp an object to read
        // the store's clock. It takes the newest timestamp it can list (a
        // real run's own lock would be newer still), or this host's clock
        // if that is later: a store that rounds timestamps up runs ahead.
        None => ["snapshots/", "gc/", "locks/"]
            .iter()
            .filter_map(|p| backend.list(p).ok())
            .flatten()
            .map(|o| o.modified)
            .fold(SystemTime::now(), SystemTime::max),
    };
    // Store timestamps may be rounded (whole seconds on S3): every age
    // compared with the grace period must exceed it by the rounding, or a
    // pack could go up to that much before a full grace period has passed.
    let grace = opts.grace + backend.timestamp_resolution();
    let mut report = PruneReport {
        dry_run: opts.dry_run,
        ..PruneReport::default()
    };

    // 1. What exists and what is referenced, in the order the protocol needs.
    let (marks, bad_marks) = gc::read_marks(backend, keys)?;
    for e in &bad_marks {
        tracing::warn!("ignoring a damaged GC mark (its packs are not deleted): {e}");
    }
    let (due, pending): (Vec<_>, Vec<_>) = marks.into_iter().partition(|m| {
        older_than(
            now,
            m.modified,
            m.mark.grace() + backend.timestamp_resolution(),
        )
    });
    let mut marked: HashSet<ObjectId> = due
        .iter()
        .chain(&pending)
        .flat_map(|m| m.mark.pack_ids())
        .collect();

    let (mut snaps, bad_snaps) = snapshot::load_all(backend, keys)?;
    if let Some(e) = bad_snaps.first() {
        return Err(unsafe_(format!("a snapshot manifest is unreadable ({e})")));
    }
    snaps.retain(|s| !opts.assume_forgotten.contains(&s.id));
    report.snapshots = snaps.len();

    let index_files: Vec<String> = backend
        .list("index/")?
        .into_iter()
        .map(|o| o.name)
        .collect();
    let mut locs: HashMap<ChunkId, Vec<Location>> = HashMap::new();
    for f in &index_files {
        let entries = index::read_index_file(backend, keys, f).map_err(|e| match e {
            e if e.is_damage() => unsafe_(format!(
                "index file {f} is unreadable ({e}); run `ekko index rebuild`"
            )),
            e => e,
        })?;
        for (id, loc) in entries {
            let v = locs.entry(id).or_default();
            if !v.contains(&loc) {
                v.push(loc);
            }
        }
    }

    let packs: HashMap<ObjectId, PackInfo> = backend
        .list("packs/")?
        .into_iter()
        .filter_map(|o| {
            pack::pack_id_from_name(&o.name).map(|id| {
                (
                    id,
                    PackInfo {
                        size: o.size,
                        modified: o.modified,
                    },
                )
            })
        })
        .collect();
    report.packs = packs.len();

    repo.refresh_index()?;
    // Chunks a repair recorded as lost (`crate::lost`): a snapshot may
    // reference them, and a lost map node hides what lies below it.
    let (lost_records, bad_lost) = crate::lost::read_all(backend, keys)?;
    if let Some(e) = bad_lost.first() {
        return Err(unsafe_(format!(
            "a lost-chunk record is unreadable ({e}); run `ekko check --read-data --repair`"
        )));
    }
    let lost = crate::lost::lost_chunks(&lost_records);
    // Recorded lost map nodes that snapshots reference.
    let mut lost_nodes: HashSet<ChunkId> = HashSet::new();
    let mut referenced: HashSet<ChunkId> = HashSet::new();
    for s in &snaps {
        for d in &s.disks {
            gc::walk_map_past(repo, &d.map, &mut referenced, &lost, &mut |id, kind| {
                if kind == format::ChunkKind::Map && lost.contains(&id) {
                    lost_nodes.insert(id);
                }
                Ok(())
            })
            .map_err(|e| {
                if e.is_damage() {
                    unsafe_(format!(
                        "the block map of disk {} of snapshot {} cannot be read ({e}); if a repair recorded it as lost, back the VM up again (which then reads its disks in full) or forget the snapshot",
                        d.name, s.id
                    ))
                } else {
                    e
                }
            })?;
        }
    }
    report.chunks_referenced = referenced.len();
    // A referenced chunk that nothing holds is damage. Only what a repair
    // recorded as lost is understood (and has nothing to keep); anything
    // else stops the prune.
    let mut missing: HashSet<ChunkId> = HashSet::new();
    for id in &referenced {
        let held = locs
            .get(id)
            .is_some_and(|v| v.iter().any(|l| packs.contains_key(&l.pack)));
        if !held {
            if !lost.contains(id) {
                return Err(unsafe_(format!(
                    "chunk {id} is referenced but in no existing indexed pack; run `ekko check --read-data --repair`"
                )));
            }
            missing.insert(*id);
        }
    }
    report.chunks_lost = missing.len();
    referenced.retain(|id| !missing.contains(id));
    // What lies below a lost map node is unseen: any pack may hold it, and
    // the node may come back (its pack restored from a copy, or a listing
    // that lagged). Until it does, or its snapshots are forgotten, nothing
    // is marked or repacked; due marks are still acted on, as they were
    // judged while the node could be seen.
    report.lost_map_nodes = missing.iter().filter(|c| lost_nodes.contains(c)).count();
    if report.lost_map_nodes > 0 {
        let existing: HashSet<&str> = snaps.iter().map(|s| s.id.as_str()).collect();
        let mut held: Vec<String> = lost_records
            .iter()
            .flat_map(|r| r.record.snapshots.iter())
            .filter(|id| existing.contains(id.as_str()))
            .cloned()
            .collect();
        held.sort();
        held.dedup();
        report.held_by = held;
    }
    for r in &lost_records {
        if !r.record.chunk_ids().any(|c| missing.contains(&c)) {
            report.lost_records_removed += 1;
        }
    }

    // Which chunks each pack holds, by the index.
    let mut pack_chunks: HashMap<ObjectId, Vec<ChunkId>> = HashMap::new();
    for (id, v) in &locs {
        for l in v {
            pack_chunks.entry(l.pack).or_default().push(*id);
        }
    }
    // A pack no index names would be marked as garbage below. While
    // snapshots lack chunks, it may be the one that holds them (it came
    // back, or its index file was lost): refuse rather than delete it.
    // Young packs are not judged in this run.
    if !missing.is_empty() {
        for (p, info) in &packs {
            if pack_chunks.contains_key(p) || !older_than(now, info.modified, grace) {
                continue;
            }
            let name = pack::pack_name(p);
            match pack::read_trailer(backend, keys, &name) {
                Ok(blobs) => {
                    if let Some(b) = blobs.iter().find(|b| missing.contains(&b.id)) {
                        return Err(unsafe_(format!(
                            "pack {name}, which no index names, holds chunk {} that snapshots need; run `ekko check --repair` to index it again",
                            b.id
                        )));
                    }
                }
                Err(e) if e.is_damage() => {
                    return Err(unsafe_(format!(
                        "pack {name}, which no index names, cannot be read ({e}) and may hold chunks that snapshots need; prune deletes it once no snapshot lacks a chunk (after the next backups of the VMs that `ekko check` names, or once their incomplete snapshots are forgotten)"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }

    // 2. Delete what the due marks name, unless it became needed.
    let mut deleting: HashSet<ObjectId> = HashSet::new();
    let mut kept: Vec<ObjectId> = Vec::new();
    for m in &due {
        for p in m.mark.pack_ids() {
            if !packs.contains_key(&p) || deleting.contains(&p) {
                continue;
            }
            let needed = pack_chunks.get(&p).is_some_and(|chunks| {
                chunks.iter().any(|c| {
                    referenced.contains(c)
                        && !locs[c].iter().any(|l| {
                            l.pack != p
                                && packs.contains_key(&l.pack)
                                && !marked.contains(&l.pack)
                                && !deleting.contains(&l.pack)
                        })
                })
            });
            if needed {
                report.packs_kept_referenced += 1;
                kept.push(p);
            } else {
                deleting.insert(p);
                report.packs_deleted += 1;
                report.bytes_deleted += packs[&p].size;
            }
        }
    }
    report.marks_completed = due.len();
    // A pack kept because a snapshot came to need it loses its mark with the
    // mark's object below, so from here on it is an ordinary pack: placement
    // and repacking judge it in this same run (it is old, and may be mostly
    // garbage), instead of leaving it for the next prune to find.
    let still_marked: HashSet<ObjectId> = pending.iter().flat_map(|m| m.mark.pack_ids()).collect();
    for p in &kept {
        if !still_marked.contains(p) {
            marked.remove(p);
        }
    }

    // 3. Choose one location per chunk: an existing pack not being deleted,
    //    preferring unmarked packs, then the copy `placement` picks (so that
    //    duplicate copies end up whole packs of garbage).
    let candidates: HashMap<ObjectId, placement::Candidate> = packs
        .iter()
        .filter(|(p, _)| !deleting.contains(*p) && !marked.contains(*p))
        .map(|(p, info)| {
            let fixed = !older_than(now, info.modified, grace);
            (
                *p,
                placement::Candidate {
                    size: info.size,
                    fixed,
                },
            )
        })
        .collect();
    let placed = placement::place(&referenced, &locs, &candidates, opts.repack_threshold);
    let choose = |id: &ChunkId, extra_marked: &HashSet<ObjectId>| -> Option<Location> {
        locs[id]
            .iter()
            .filter(|l| packs.contains_key(&l.pack) && !deleting.contains(&l.pack))
            .max_by_key(|l| {
                let unmarked = !marked.contains(&l.pack) && !extra_marked.contains(&l.pack);
                let here = placed.get(id) == Some(&l.pack);
                (unmarked, here, packs[&l.pack].modified, l.pack.0)
            })
            .copied()
    };
    let none = HashSet::new();
    // Per pack: the bytes and number of the live chunks it keeps.
    let mut live_chunks: HashMap<ObjectId, (u64, u64)> = HashMap::new();
    for id in &referenced {
        if let Some(l) = choose(id, &none) {
            let e = live_chunks.entry(l.pack).or_default();
            e.0 += u64::from(l.stored_len);
            e.1 += 1;
        }
    }
    // What a pack of only those chunks would take (its own header, trailer
    // and footer count as live: a small pack is not garbage for them).
    let live: HashMap<ObjectId, u64> = live_chunks
        .into_iter()
        .map(|(p, (bytes, n))| (p, pack::packed_size(bytes, n)))
        .collect();
    let mut new_marks: Vec<ObjectId> = Vec::new();
    let mut to_repack: Vec<ObjectId> = Vec::new();
    // Candidates are the packs neither marked nor being deleted; `fixed`
    // ones are young and may belong to a backup still running.
    for (id, c) in &candidates {
        if c.fixed {
            report.packs_too_young += 1;
            continue;
        }
        if report.lost_map_nodes > 0 {
            continue;
        }
        let l = live.get(id).copied().unwrap_or(0);
        if l == 0 {
            new_marks.push(*id);
        } else if placement::repacks(c.size, l, opts.repack_threshold) {
            to_repack.push(*id);
        }
    }

    // Repack: copy the live chunks of mostly-garbage packs (the sealed blobs
    // as they are, after authenticating them).
    let mut chosen_override: HashMap<ChunkId, Location> = HashMap::new();
    if !to_repack.is_empty() {
        let mut packer = pack::Packer::new(backend, u64::from(repo.config().pack_size));
        for p in &to_repack {
            let pname = pack::pack_name(p);
            let mine: Vec<(ChunkId, Location)> = pack_chunks
                .get(p)
                .into_iter()
                .flatten()
                .filter(|c| referenced.contains(*c))
                .filter_map(|c| choose(c, &none).filter(|l| l.pack == *p).map(|l| (*c, l)))
                .collect();
            if opts.dry_run {
                report.packs_repacked += 1;
                report.bytes_repacked += mine
                    .iter()
                    .map(|(_, l)| u64::from(l.stored_len))
                    .sum::<u64>();
                new_marks.push(*p);
                continue;
            }
            let data = backend.get(&pname)?;
            let blobs: Option<Vec<EncodedChunk>> = mine
                .iter()
                .map(|(id, l)| chunk::intact_copy(keys, id, l, &pname, &data))
                .collect();
            let Some(blobs) = blobs else {
                tracing::warn!("pack {pname} holds a damaged live chunk: not repacked; run `ekko check --read-data`");
                continue;
            };
            for b in &blobs {
                report.bytes_repacked += u64::try_from(b.sealed.len()).expect("fits");
                if packer.add(keys, b)? {
                    step();
                }
            }
            report.packs_repacked += 1;
            new_marks.push(*p);
        }
        if packer.finish(keys)? {
            step();
        }
        report.packs_written = packer.packs;
        chosen_override.extend(packer.entries);
    }
    report.packs_marked = new_marks.len();
    report.bytes_marked = new_marks.iter().map(|p| packs[p].size).sum();

    // 4. The new index: one location per chunk.
    let duplicates = locs.values().any(|v| v.len() > 1);
    let rewrite = !deleting.is_empty() || !chosen_override.is_empty() || duplicates;
    let newly_marked: HashSet<ObjectId> = new_marks.iter().copied().collect();
    if rewrite {
        let mut entries: Vec<(ChunkId, Location)> = Vec::with_capacity(locs.len());
        for (id, v) in &locs {
            if let Some(l) = chosen_override.get(id) {
                entries.push((*id, *l));
            } else if let Some(l) = choose(id, &newly_marked) {
                entries.push((*id, l));
            } else if let Some(l) = v.iter().find(|l| !deleting.contains(&l.pack)) {
                // Its pack is missing: damage that `check` must still see.
                entries.push((*id, *l));
            }
            // Otherwise every copy is in a pack being deleted: unreferenced.
        }
        for (id, l) in &chosen_override {
            if !locs.contains_key(id) {
                entries.push((*id, *l));
            }
        }
        report.index_files_written = entries.len().div_ceil(ENTRIES_PER_FILE);
        report.index_files_removed = index_files.len();
        if !opts.dry_run {
            for part in entries.chunks(ENTRIES_PER_FILE) {
                let name = index::index_name(&ObjectId::random());
                backend.put(
                    &name,
                    &format::seal_file(keys, MAGIC_INDEX, &name, &format::encode_index(part)),
                )?;
                step();
            }
            for f in &index_files {
                backend.delete(f)?;
                step();
            }
        }
    }

    if !opts.dry_run {
        for p in &deleting {
            backend.delete(&pack::pack_name(p))?;
            step();
        }
        for m in &due {
            backend.delete(&m.name)?;
            step();
        }
        for r in &lost_records {
            if !r.record.chunk_ids().any(|c| missing.contains(&c)) {
                backend.delete(&r.name)?;
            }
        }
    }
    let mut pending_times: Vec<SystemTime> = pending
        .iter()
        .map(|m| m.modified + m.mark.grace() + backend.timestamp_resolution())
        .collect();
    if !new_marks.is_empty() {
        let mut ids: Vec<String> = new_marks.iter().map(ObjectId::to_hex).collect();
        ids.sort();
        if !opts.dry_run {
            gc::write_mark(
                backend,
                keys,
                &Mark {
                    time: crate::time::now_rfc3339(),
                    host: crate::time::hostname(),
                    grace_ms: u64::try_from(opts.grace.as_millis()).unwrap_or(u64::MAX),
                    skew_ms: u64::try_from(opts.skew.as_millis()).unwrap_or(u64::MAX),
                    packs: ids,
                },
            )?;
        }
        pending_times.push(now + grace);
    }
    report.marks_pending = pending_times.len();
    report.next_deletion = pending_times
        .into_iter()
        .min()
        .map(|t| humantime::format_rfc3339_seconds(t).to_string());
    // Temporary files of writers killed mid-write: idle for the grace
    // period (which must exceed the longest backup), and at least an hour,
    // no writer still holds them.
    let idle = opts.grace.max(TEMPORARIES_IDLE);
    (report.temporaries_removed, report.bytes_temporaries) =
        backend.stale_temporaries(idle, opts.dry_run)?;
    report.seconds = started.elapsed().as_secs_f64();
    drop(lock);
    Ok(report)
}

/// The least time a temporary file must sit unwritten before prune
/// removes it, whatever the grace period.
pub const TEMPORARIES_IDLE: std::time::Duration = std::time::Duration::from_secs(3600);
