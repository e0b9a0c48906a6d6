//! Rebuilding the index from the packs alone, and repairing damage.
//!
//! Every pack carries a sealed trailer listing its chunks, so lost or
//! damaged index files can always be replaced. The rebuild writes new index
//! files first and only then deletes the old ones, under the exclusive lock:
//! a crash in between leaves duplicate (harmless) entries, never missing ones.
//!
//! `check --repair` goes further, under the same lock: it copies the intact
//! chunks of every damaged pack into new packs, rebuilds the index from the
//! trailers (so entries for damaged chunks and for packs that are gone
//! disappear), deletes the damaged packs, and records what snapshots still
//! reference as lost (`crate::lost`), so that backups heal it.

use std::collections::HashSet;

use crate::backend::Backend;
use crate::check::{self, CheckReport, ReadData};
use crate::chunk::{self, EncodedChunk};
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::format::{self, Location, MAGIC_INDEX};
use crate::id::{ChunkId, ObjectId};
use crate::index;
use crate::lock::Lock;
use crate::pack;
use crate::repo::Repository;

#[derive(Debug, Default, serde::Serialize)]
pub struct RebuildReport {
    pub packs: usize,
    pub chunks: usize,
    pub index_files_written: usize,
    pub index_files_removed: usize,
    /// Packs whose trailer could not be read: only what the old index
    /// files said of their chunks is kept (`chunks_kept`).
    pub unreadable_packs: Vec<String>,
    /// Entries carried over from the old index files for those packs.
    pub chunks_kept: usize,
}

const ENTRIES_PER_FILE: usize = 65_536;

pub fn rebuild_index(repo: &Repository) -> Result<RebuildReport> {
    let backend = repo.backend().as_ref();
    let keys = repo.keys();
    let _lock = Lock::exclusive(repo.backend(), keys, "index rebuild")?;
    let old: Vec<String> = backend
        .list("index/")?
        .into_iter()
        .map(|o| o.name)
        .collect();
    let mut report = RebuildReport::default();
    let mut entries: Vec<(ChunkId, Location)> = Vec::new();
    for p in backend.list("packs/")? {
        let Some(pid) = pack::pack_id_from_name(&p.name) else {
            continue;
        };
        report.packs += 1;
        match pack::read_any_trailer(backend, keys, &p.name) {
            Ok(blobs) => entries.extend(blobs.into_iter().map(|b| (b.id, b.located_in(pid)))),
            Err(e) => {
                tracing::warn!("pack {}: {e}; its chunks stay unindexed", p.name);
                report.unreadable_packs.push(p.name);
            }
        }
    }
    // A pack whose trailer is damaged may still hold good chunks, and the
    // old index files may be the only record of where they lie: keep
    // their entries for it (a restore then reads those chunks, and check
    // names the pack). Old index files that are themselves damaged are
    // what a rebuild replaces; they are skipped.
    if !report.unreadable_packs.is_empty() {
        let unreadable: std::collections::HashSet<ObjectId> = report
            .unreadable_packs
            .iter()
            .filter_map(|n| pack::pack_id_from_name(n))
            .collect();
        for name in &old {
            match index::read_index_file(backend, keys, name) {
                Ok(old_entries) => {
                    let before = entries.len();
                    entries.extend(
                        old_entries
                            .into_iter()
                            .filter(|(_, loc)| unreadable.contains(&loc.pack)),
                    );
                    report.chunks_kept += entries.len() - before;
                }
                Err(e) => tracing::warn!("{e}; it is replaced without its entries"),
            }
        }
    }
    // A chunk stored twice, once in a pack a prune has marked for deletion
    // (it copied the chunk out first): the index names the other copy, so
    // that readers and backups do not come to rely on the marked one.
    if let Ok((marks, _)) = crate::gc::read_marks(backend, keys) {
        let marked: HashSet<ObjectId> = marks.iter().flat_map(|m| m.mark.pack_ids()).collect();
        if !marked.is_empty() {
            entries.sort_by_key(|(id, loc)| (id.0, marked.contains(&loc.pack)));
            entries.dedup_by(|later, first| later.0 == first.0 && marked.contains(&later.1.pack));
        }
    }
    report.chunks = entries.len();
    (report.index_files_written, report.index_files_removed) =
        replace_index(repo, &entries, &old, &|| {})?;
    Ok(report)
}

/// Write `entries` as new index files, then delete the `old` ones. Returns
/// how many were written and removed.
fn replace_index(
    repo: &Repository,
    entries: &[(ChunkId, Location)],
    old: &[String],
    step: &dyn Fn(),
) -> Result<(usize, usize)> {
    let backend = repo.backend().as_ref();
    let mut written = 0;
    for part in entries.chunks(ENTRIES_PER_FILE) {
        let name = index::index_name(&ObjectId::random());
        let data = format::seal_file(repo.keys(), MAGIC_INDEX, &name, &format::encode_index(part));
        backend.put(&name, &data)?;
        written += 1;
        step();
    }
    for name in old {
        backend.delete(name)?;
        step();
    }
    Ok((written, old.len()))
}

/// What `check --repair` did.
#[derive(Debug, Default, serde::Serialize)]
pub struct RepairReport {
    /// Packs found stored under another pack's name (moved or renamed),
    /// as (where it was, its own name): copied back to their own names.
    pub packs_moved_back: Vec<(String, String)>,
    /// Damaged packs replaced by packs of their intact chunks, then deleted.
    pub packs_replaced: usize,
    pub packs_written: usize,
    /// Damaged packs kept: their trailer is damaged and the index entries
    /// do not tile them, so nothing says all they hold, while snapshots
    /// lack chunks they might hold. What the index files knew of them was
    /// copied out all the same.
    pub packs_kept: Vec<String>,
    /// Intact chunks copied out of the damaged packs.
    pub chunks_salvaged: usize,
    /// Chunks of the damaged packs that failed verification: dropped.
    pub chunks_dropped: usize,
    /// Packs that index entries named but that do not exist.
    pub packs_missing: usize,
    pub index_files_written: usize,
    pub index_files_removed: usize,
    /// GC marks that did not open, deleted (a later prune judges their
    /// packs afresh).
    pub marks_removed: usize,
    /// Protect objects that did not open, written again.
    pub protections_rewritten: usize,
    /// Snapshot manifests that did not open, put back from this host's
    /// manifest cache (whose copy authenticated).
    pub manifests_restored: usize,
    /// Damaged manifests with no good copy here: beyond repair.
    pub manifests_damaged: Vec<String>,
    /// Chunks that snapshots reference but the repository no longer holds.
    pub chunks_lost: usize,
    /// Snapshots that reference them: incomplete until a backup of the
    /// same data stores them again.
    pub snapshots_incomplete: Vec<String>,
    /// The lost-chunk record in force, if any.
    pub lost_record: Option<String>,
    /// Earlier lost-chunk records replaced or no longer needed, removed.
    pub lost_records_removed: usize,
}

/// A check, the repair it called for, and the check of the result.
pub struct Repaired {
    /// The check as asked for (`--read-data` or not), run without a lock.
    pub before: CheckReport,
    pub repair: RepairReport,
    /// The check after the repair; `None` when there was nothing to do.
    pub after: Option<CheckReport>,
}

impl Repaired {
    pub fn ok(&self) -> bool {
        self.after.as_ref().unwrap_or(&self.before).ok()
    }
}

/// How `check --repair` may act.
#[derive(Debug, Default, Clone)]
pub struct RepairOptions {
    /// Pause after every change to the repository (crash tests).
    pub step_delay: Option<std::time::Duration>,
    /// Treat a pack whose header names a version this ekko does not know,
    /// and some of whose chunks fail verification, as a damaged version-1
    /// pack: its intact chunks are kept and the rest recorded as lost. For
    /// a repository that no newer ekko writes to.
    pub rewrite_unknown_versions: bool,
}

/// `ekko check --repair`: check (reading the packs `read_data` names),
/// then repair what was found. Chunk damage is only found in the packs
/// that are read, so `ReadData::All` finds everything.
///
/// The full check runs without a lock, so backups go on meanwhile. Only
/// then does the repair take the exclusive lock, check the structure again
/// and read the suspect packs again, and act on what it finds then.
pub fn check_and_repair(
    repo: &Repository,
    read_data: ReadData,
    threads: usize,
    opts: &RepairOptions,
) -> Result<Repaired> {
    let step = || {
        if let Some(d) = opts.step_delay {
            std::thread::sleep(d);
        }
    };
    let backend = repo.backend().as_ref();
    let keys = repo.keys();
    let first = check::check(repo, read_data, threads)?;
    refuse_unjudged(&first, opts)?;
    let lost_listed = !backend.list(crate::lost::LOST_PREFIX)?.is_empty();
    let mut report = RepairReport::default();
    if first.ok() && !lost_listed {
        return Ok(Repaired {
            before: first,
            repair: report,
            after: None,
        });
    }

    let _lock = Lock::exclusive(repo.backend(), keys, "check --repair")?;
    // The structure as it is now, under the lock, with the suspect packs
    // read again.
    let recheck = || -> Result<CheckReport> {
        repo.refresh_index()?;
        let r = check::check_with(
            repo,
            ReadData::None,
            threads,
            &first.damage.packs_to_repair(),
        )?;
        refuse_unjudged(&r, opts)?;
        Ok(r)
    };
    let mut now = recheck()?;
    // 0. Packs stored under another pack's name: copied back to their own
    //    names, and the repository checked again.
    report.packs_moved_back = move_back(backend, keys, &now.damage, &step)?;
    if !report.packs_moved_back.is_empty() {
        now = recheck()?;
    }
    refuse_if_nothing_opens(repo, &now)?;
    let damage = &now.damage;
    // A pack the listing lacks may only be late to appear (some stores'
    // listings lag): dropping it from the index would let prune delete it.
    for p in &damage.missing_packs {
        match backend.size(&pack::pack_name(p)) {
            Err(Error::NotFound { .. }) => {}
            Ok(_) => {
                return Err(Error::Invalid(format!(
                    "pack {} is missing from the listing but exists (the store's listing lags); nothing was changed: run the repair again later",
                    pack::pack_name(p)
                )))
            }
            Err(e) => return Err(e),
        }
    }
    report.packs_missing = damage.missing_packs.len();
    let mut to_repair: Vec<ObjectId> = damage.packs_to_repair().into_iter().collect();
    to_repair.sort_by_key(|p| p.0);
    let changes_index =
        !to_repair.is_empty() || !damage.missing_packs.is_empty() || damage.index_damaged;
    // Before anything is dropped, record every needed chunk that may end up
    // lost, so that a repair killed midway still keeps backups from
    // building on holes. The final record (step 6) replaces it.
    if changes_index && !damage.referenced_damaged.is_empty() {
        let (records, _) = crate::lost::read_all(backend, keys)?;
        let known = crate::lost::lost_chunks(&records);
        if !damage.referenced_damaged.is_subset(&known) {
            let record =
                crate::lost::LostRecord::new(&damage.referenced_damaged, &damage.snapshots);
            crate::lost::write(backend, keys, &record)?;
            step();
        }
    }
    if changes_index {
        let old_index: Vec<String> = backend
            .list("index/")?
            .into_iter()
            .map(|o| o.name)
            .collect();
        let known = IndexKnowledge::read(repo, &old_index, &damage.bad_trailers)?;
        // A pack whose trailer is damaged cannot say all it holds (an
        // index file may be damaged, lost, or split, and the pack may be
        // a copy of a missing one): it is kept while snapshots lack
        // chunks, which it might hold. Once none does, nothing in it is
        // needed.
        let needed_elsewhere = !damage.referenced_damaged.is_empty();

        // 1. Copy the intact chunks of the damaged packs into new packs.
        let mut packer = pack::Packer::new(backend, u64::from(repo.config().pack_size));
        let mut deletable: Vec<ObjectId> = Vec::new();
        for p in &to_repair {
            let (blobs, complete) = salvage(repo, p, &known, &mut report)?;
            if complete || !needed_elsewhere {
                deletable.push(*p);
            } else {
                report.packs_kept.push(pack::pack_name(p));
            }
            for blob in blobs {
                report.chunks_salvaged += 1;
                if packer.add(keys, &blob)? {
                    step();
                }
            }
        }
        if packer.finish(keys)? {
            step();
        }
        report.packs_written = packer.packs;
        let mut entries = packer.entries;

        // 2. The index, from the trailers of every other pack.
        // Every pack this listing or the check's shows: a listing that lags
        // must not drop a pack from the index.
        let mut skip: HashSet<ObjectId> = to_repair.iter().copied().collect();
        skip.extend(entries.iter().map(|(_, l)| l.pack));
        let mut all: Vec<ObjectId> = backend
            .list("packs/")?
            .iter()
            .filter_map(|o| pack::pack_id_from_name(&o.name))
            .chain(damage.listed_packs.iter().copied())
            .filter(|p| !skip.contains(p))
            .collect();
        all.sort_by_key(|p| p.0);
        all.dedup();
        for pid in all {
            match pack::read_trailer(backend, keys, &pack::pack_name(&pid)) {
                Ok(blobs) => entries.extend(blobs.into_iter().map(|b| (b.id, b.located_in(pid)))),
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        (report.index_files_written, report.index_files_removed) =
            replace_index(repo, &entries, &old_index, &step)?;

        // 3. Only now that nothing names them: the damaged packs whose
        //    every chunk was judged.
        for p in &deletable {
            backend.delete(&pack::pack_name(p))?;
            report.packs_replaced += 1;
            step();
        }
    }

    // 4. GC marks and protect objects that do not open. A mark's packs are
    //    judged afresh by a later prune; a protect object protects by its
    //    name, so it is written again, whole.
    for o in backend.list(crate::gc::MARKS_PREFIX)? {
        if opens_damaged(crate::gc::read_mark(backend, keys, &o.name)) {
            backend.delete(&o.name)?;
            report.marks_removed += 1;
            step();
        }
    }
    for o in backend.list(crate::gc::PROTECT_PREFIX)? {
        if opens_damaged(crate::gc::read_protection(backend, keys, &o.name)) {
            if let Some(id) = o.name.strip_prefix(crate::gc::PROTECT_PREFIX) {
                crate::gc::protect(backend, keys, id)?;
                report.protections_rewritten += 1;
                step();
            }
        }
    }
    // 5. Manifests that do not open: this host's manifest cache may hold
    //    the bytes as they were written (sealed, so they authenticate).
    let store = repo.store().as_ref();
    for id in crate::snapshot::list_ids(store)? {
        let name = crate::snapshot::snapshot_name(&id);
        let stored = store
            .get(&name)
            .and_then(|d| crate::snapshot::decode(keys, &id, &d));
        if !opens_damaged(stored) {
            continue;
        }
        match repo
            .cached_manifest(&name)
            .filter(|c| crate::snapshot::decode(keys, &id, c).is_ok())
        {
            Some(copy) => {
                store.put(&name, &copy)?;
                report.manifests_restored += 1;
                step();
            }
            None => report.manifests_damaged.push(name),
        }
    }
    repo.refresh_index()?;

    // 6. What snapshots still reference but nothing holds is lost: record
    //    it (replacing earlier records), so that backups read such disks in
    //    full and prune can run.
    let (records, bad_records) = crate::lost::read_all(backend, keys)?;
    let mut after = check::check(repo, ReadData::None, threads)?;
    let lost = &after.damage.referenced_damaged;
    report.chunks_lost = lost.len();
    report.snapshots_incomplete = after.damage.snapshots.clone();
    let same =
        records.len() == 1 && bad_records.is_empty() && crate::lost::lost_chunks(&records) == *lost;
    if !same {
        if !lost.is_empty() {
            let record = crate::lost::LostRecord::new(lost, &after.damage.snapshots);
            let name = crate::lost::write(backend, keys, &record)?;
            report.lost_record = Some(name);
            step();
        }
        // The damaged ones too: they hold no hint a repair needs.
        for o in backend.list(crate::lost::LOST_PREFIX)? {
            if Some(&o.name) != report.lost_record.as_ref() {
                backend.delete(&o.name)?;
                report.lost_records_removed += 1;
                step();
            }
        }
        after = check::check(repo, ReadData::None, threads)?;
    } else {
        report.lost_record = records.first().map(|r| r.name.clone());
    }
    Ok(Repaired {
        before: first,
        repair: report,
        after: Some(after),
    })
}

/// When no pack's trailer, index file or snapshot manifest opens, they are
/// not all damaged: the key is wrong (in an unencrypted repository, the
/// config's `id_key` is damaged), and a repair would drop every chunk. It
/// stops, changing nothing.
fn refuse_if_nothing_opens(repo: &Repository, r: &CheckReport) -> Result<()> {
    let d = &r.damage;
    if d.bad_trailers.is_empty() || d.bad_trailers.len() != d.listed_packs.len() {
        return Ok(());
    }
    let (backend, keys) = (repo.store().as_ref(), repo.keys());
    let (snaps, _) = crate::snapshot::load_all(backend, keys)?;
    let index_opens = backend
        .list("index/")?
        .iter()
        .any(|o| index::read_index_file(backend, keys, &o.name).is_ok());
    if snaps.is_empty() && !index_opens {
        return Err(Error::Invalid(format!(
            "none of the {} packs' trailers opens with this repository's key: that is a wrong key, not {} damaged packs (in an unencrypted repository, a damaged `id_key` in the config; put back a copy of the config). Nothing was changed",
            d.listed_packs.len(),
            d.listed_packs.len()
        )));
    }
    Ok(())
}

/// Packs whose trailer does not open under their own name, tried under the
/// names of the missing packs and of each other (a swap): one that opens
/// is a pack moved or renamed, and is copied back to its own name (the
/// copy at the wrong name is then a damaged pack like any other, deleted
/// once it holds nothing needed). All are read before any is written, so
/// that a swap is undone whole. Returns (from, to) names.
fn move_back(
    backend: &dyn Backend,
    keys: &Keys,
    damage: &check::Damage,
    step: &dyn Fn(),
) -> Result<Vec<(String, String)>> {
    /// Bytes of moved packs held at once; more are left for the next run.
    const MAX_HELD: usize = 1 << 30;
    let mut candidates: Vec<ObjectId> = damage
        .missing_packs
        .iter()
        .chain(&damage.bad_trailers)
        .copied()
        .collect();
    candidates.sort_by_key(|p| p.0);
    candidates.dedup();
    let mut sources: Vec<ObjectId> = damage.bad_trailers.iter().copied().collect();
    sources.sort_by_key(|p| p.0);
    // (file, the pack it is): files in the wrong folder, and damaged packs
    // that open under another pack's id. Each is authenticated by its
    // trailer before anything is written.
    let mut pairs: Vec<(String, ObjectId)> = Vec::new();
    for o in backend.list("packs/")? {
        if let Some(to) = pack::misplaced_pack_id(&o.name) {
            if pack::trailer_opens_as(backend, keys, &o.name, &[to])?.is_some() {
                pairs.push((o.name, to));
            }
        }
    }
    for from in sources {
        let others: Vec<ObjectId> = candidates.iter().filter(|c| **c != from).copied().collect();
        let name = pack::pack_name(&from);
        if let Some(to) = pack::trailer_opens_as(backend, keys, &name, &others)? {
            pairs.push((name, to));
        }
    }
    let mut found: Vec<(String, ObjectId, Vec<u8>)> = Vec::new();
    let mut held = 0usize;
    for (from, to) in pairs {
        if found.iter().any(|(_, t, _)| *t == to) {
            continue; // two copies of one pack: the first will do
        }
        // Only a name that holds nothing, or a damaged pack, is written
        // over: a pack a lagging listing lacks may well exist.
        if !damage.bad_trailers.contains(&to) {
            match backend.size(&pack::pack_name(&to)) {
                Err(Error::NotFound { .. }) => {}
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
        let data = backend.get(&from)?;
        held = held.saturating_add(data.len());
        if held > MAX_HELD {
            tracing::warn!("more moved packs than a repair holds at once; run the repair again");
            break;
        }
        found.push((from, to, data));
    }
    let mut moved = Vec::new();
    for (from, to, data) in found {
        backend.put(&pack::pack_name(&to), &data)?;
        if pack::pack_id_from_name(&from).is_none() {
            // Not a pack name: nothing else would ever remove it.
            backend.delete(&from)?;
        }
        moved.push((from, pack::pack_name(&to)));
        step();
    }
    Ok(moved)
}

/// A repair judges every pack it touches: it stops, changing nothing, on
/// a pack it could not read (the store failed, or the pack names a format
/// version this ekko does not know).
fn refuse_unjudged(r: &CheckReport, opts: &RepairOptions) -> Result<()> {
    let d = &r.damage;
    if let Some(p) = d
        .unknown_versions
        .iter()
        .find(|p| d.bad_chunks.contains_key(*p) && !opts.rewrite_unknown_versions)
    {
        return Err(Error::Invalid(format!(
            "pack {} names a format version this ekko does not know, and some of its chunks fail verification: it may be a newer ekko's pack, or a pack with a damaged header and damaged chunks. Nothing was changed. If no newer ekko writes to this repository, run `ekko check --read-data --repair --rewrite-unknown-versions`: it keeps every intact chunk of the pack and records the others as lost, and the next backup of each affected VM stores them again",
            pack::pack_name(p)
        )));
    }
    match d.unreadable_packs.first() {
        None => Ok(()),
        Some((p, e)) => Err(Error::Invalid(format!(
            "pack {} could not be read ({e}); nothing was changed. If the store failed, run the repair again once it answers; if the pack names a version this ekko does not know while no newer ekko writes here, its header is damaged",
            pack::pack_name(p)
        ))),
    }
}

/// Whether reading an object failed because it is damaged (as opposed to
/// the store failing, which a repair must not act on).
fn opens_damaged<T>(r: Result<T>) -> bool {
    matches!(r, Err(e) if e.is_damage())
}

/// What the readable index files say of the packs whose trailer is
/// damaged (maybe not all they hold).
struct IndexKnowledge {
    by_pack: std::collections::HashMap<ObjectId, Vec<(ChunkId, Location)>>,
}

impl IndexKnowledge {
    fn read(repo: &Repository, files: &[String], packs: &HashSet<ObjectId>) -> Result<Self> {
        let mut k = IndexKnowledge {
            by_pack: Default::default(),
        };
        if packs.is_empty() {
            return Ok(k);
        }
        for f in files {
            match index::read_index_file(repo.backend().as_ref(), repo.keys(), f) {
                Ok(es) => {
                    for (id, l) in es.into_iter().filter(|(_, l)| packs.contains(&l.pack)) {
                        k.by_pack.entry(l.pack).or_default().push((id, l));
                    }
                }
                Err(e) => tracing::warn!("{e}; its entries cannot help salvage damaged packs"),
            }
        }
        Ok(k)
    }
}

/// The intact chunks of one damaged pack, each opened and hashed again,
/// and whether they are all it holds (its trailer listed them, or the
/// index entries tile its data region). If the trailer does not open, the
/// index files list what they know of it.
fn salvage(
    repo: &Repository,
    pid: &ObjectId,
    known: &IndexKnowledge,
    report: &mut RepairReport,
) -> Result<(Vec<EncodedChunk>, bool)> {
    let backend = repo.backend().as_ref();
    let keys = repo.keys();
    let pname = pack::pack_name(pid);
    let (listed, trailer_read) = match pack::read_any_trailer(backend, keys, &pname) {
        Ok(blobs) => (
            blobs.iter().map(|b| (b.id, b.located_in(*pid))).collect(),
            true,
        ),
        Err(e) if e.is_damage() => {
            let mut v = known.by_pack.get(pid).cloned().unwrap_or_default();
            v.sort_by_key(|(id, l)| (l.offset, id.0));
            v.dedup();
            (v, false)
        }
        Err(e) => return Err(e),
    };
    let data = backend.get(&pname)?;
    // Without the trailer, the entries are all the pack holds if they tile
    // its data region exactly: from the header to the trailer, whose
    // length the footer still gives.
    let complete = trailer_read || tiles_data_region(&data, &listed);
    let mut good = Vec::new();
    let mut seen = HashSet::new();
    for (id, loc) in listed {
        match chunk::intact_copy(keys, &id, &loc, &pname, &data) {
            Some(c) if seen.insert(id) => good.push(c),
            Some(_) => {}
            None => report.chunks_dropped += 1,
        }
    }
    Ok((good, complete))
}

/// Whether `entries` (sorted by offset) cover a pack's data region, from
/// the header to the trailer the footer names, exactly and without gaps.
fn tiles_data_region(pack: &[u8], entries: &[(ChunkId, Location)]) -> bool {
    let Some(footer_at) = pack.len().checked_sub(format::PACK_FOOTER_LEN) else {
        return false;
    };
    let Ok(tlen) = format::pack_footer_trailer_len("pack", &pack[footer_at..]) else {
        return false;
    };
    let Some(end) = usize::try_from(tlen)
        .ok()
        .and_then(|t| footer_at.checked_sub(t))
    else {
        return false;
    };
    let mut at = u64::try_from(format::HEADER_LEN).expect("small");
    for (_, l) in entries {
        if l.offset != at {
            return false;
        }
        at += u64::from(l.stored_len);
    }
    !entries.is_empty() && usize::try_from(at).is_ok_and(|at| at == end)
}
