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

use crate::check::{self, CheckReport, ReadData};
use crate::chunk::{self, EncodedChunk};
use crate::error::{Error, Result};
use crate::format::{self, BlobEntry, Location, MAGIC_INDEX};
use crate::id::{ChunkId, ObjectId};
use crate::index;
use crate::lock::Lock;
use crate::pack::{self, PackWriter};
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
        match pack::read_trailer(backend, keys, &p.name) {
            Ok(blobs) => entries.extend(blobs.into_iter().map(|b| {
                (
                    b.id,
                    Location {
                        pack: pid,
                        offset: b.offset,
                        stored_len: b.stored_len,
                        raw_len: b.raw_len,
                        kind: b.kind,
                        compressed: b.compressed,
                    },
                )
            })),
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
    /// Damaged packs replaced by packs of their intact chunks, then deleted.
    pub packs_replaced: usize,
    pub packs_written: usize,
    /// Intact chunks copied out of the damaged packs.
    pub chunks_salvaged: usize,
    /// Chunks of the damaged packs that failed verification: dropped.
    pub chunks_dropped: usize,
    /// Packs that index entries named but that do not exist.
    pub packs_missing: usize,
    pub index_files_written: usize,
    pub index_files_removed: usize,
    /// Chunks that snapshots reference but the repository no longer holds.
    pub chunks_lost: usize,
    /// Snapshots that reference them: incomplete until a backup of the
    /// same data stores them again.
    pub snapshots_incomplete: Vec<String>,
    /// The lost-chunk record written, if any.
    pub lost_record: Option<String>,
    /// Earlier lost-chunk records replaced by it (or healed).
    pub lost_records_removed: usize,
}

/// A check, the repair it called for, and the check of the result.
pub struct Repaired {
    pub before: CheckReport,
    pub repair: RepairReport,
    pub after: CheckReport,
}

/// `ekko check --repair`: check (reading the packs `read_data` names),
/// then repair what was found. Chunk damage is only found in the packs
/// that are read, so `ReadData::All` finds everything. `step_delay`
/// (crash tests) pauses after every change to the repository.
pub fn check_and_repair(
    repo: &Repository,
    read_data: ReadData,
    threads: usize,
    step_delay: Option<std::time::Duration>,
) -> Result<Repaired> {
    let step = || {
        if let Some(d) = step_delay {
            std::thread::sleep(d);
        }
    };
    let backend = repo.backend().as_ref();
    let keys = repo.keys();
    let _lock = Lock::exclusive(repo.backend(), keys, "check --repair")?;
    let before = check::check(repo, read_data, threads)?;
    if let Some((p, e)) = before.damage.unreadable_packs.first() {
        return Err(Error::Invalid(format!(
            "pack {} could not be read ({e}); nothing was changed: a repair must read every pack it judges, so run it again once the store answers",
            pack::pack_name(p)
        )));
    }
    let mut report = RepairReport {
        packs_missing: before.damage.missing_packs.len(),
        ..RepairReport::default()
    };
    let (records, bad_records) = crate::lost::read_all(backend, keys)?;
    if !before.ok() {
        let old_index: Vec<String> = backend
            .list("index/")?
            .into_iter()
            .map(|o| o.name)
            .collect();
        let mut to_repair: Vec<ObjectId> = before.damage.packs_to_repair().into_iter().collect();
        to_repair.sort_by_key(|p| p.0);

        // 1. Copy the intact chunks of the damaged packs into new packs.
        let mut entries: Vec<(ChunkId, Location)> = Vec::new();
        let mut writer: Option<PackWriter> = None;
        let limit = u64::from(repo.config().pack_size);
        for p in &to_repair {
            for blob in salvage(repo, p, &old_index, &mut report)? {
                let w = match writer.as_mut() {
                    Some(w) => w,
                    None => writer.insert(PackWriter::create(backend)?),
                };
                w.add(&blob)?;
                report.chunks_salvaged += 1;
                if w.len() >= limit {
                    entries.extend(writer.take().expect("present").finish(keys)?);
                    report.packs_written += 1;
                    step();
                }
            }
        }
        if let Some(w) = writer.take().filter(|w| !w.is_empty()) {
            entries.extend(w.finish(keys)?);
            report.packs_written += 1;
            step();
        }

        // 2. The index, from the trailers of every other pack.
        let mut skip: HashSet<ObjectId> = to_repair.iter().copied().collect();
        skip.extend(entries.iter().map(|(_, l)| l.pack));
        for o in backend.list("packs/")? {
            let Some(pid) = pack::pack_id_from_name(&o.name) else {
                continue;
            };
            if skip.contains(&pid) {
                continue;
            }
            entries.extend(
                pack::read_trailer(backend, keys, &o.name)?
                    .into_iter()
                    .map(|b| (b.id, location(pid, &b))),
            );
        }
        (report.index_files_written, report.index_files_removed) =
            replace_index(repo, &entries, &old_index, &step)?;

        // 3. Only now that nothing names them: the damaged packs.
        for p in &to_repair {
            backend.delete(&pack::pack_name(p))?;
            report.packs_replaced += 1;
            step();
        }
        repo.refresh_index()?;
    }

    // 4. What snapshots still reference but nothing holds is lost: record
    //    it (replacing earlier records), so that backups read such disks in
    //    full and prune can run.
    let mut after = check::check(repo, ReadData::None, threads)?;
    let lost: Vec<ChunkId> = {
        let mut v: Vec<ChunkId> = after.damage.referenced_damaged.iter().copied().collect();
        v.sort_by_key(|c| c.0);
        v
    };
    report.chunks_lost = lost.len();
    report.snapshots_incomplete = after.damage.snapshots.clone();
    let same = records.len() == 1
        && bad_records.is_empty()
        && crate::lost::lost_chunks(&records) == lost.iter().copied().collect();
    if !same {
        if !lost.is_empty() {
            let name = crate::lost::write(
                backend,
                keys,
                &crate::lost::LostRecord {
                    time: crate::time::now_rfc3339(),
                    host: crate::time::hostname(),
                    chunks: lost.iter().map(ChunkId::to_hex).collect(),
                    snapshots: after.damage.snapshots.clone(),
                },
            )?;
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
        before,
        repair: report,
        after,
    })
}

fn location(pack: ObjectId, b: &BlobEntry) -> Location {
    Location {
        pack,
        offset: b.offset,
        stored_len: b.stored_len,
        raw_len: b.raw_len,
        kind: b.kind,
        compressed: b.compressed,
    }
}

/// The intact chunks of one damaged pack, each opened and hashed again. The
/// pack's trailer lists them; if it does not open, the index files do.
fn salvage(
    repo: &Repository,
    pid: &ObjectId,
    index_files: &[String],
    report: &mut RepairReport,
) -> Result<Vec<EncodedChunk>> {
    let backend = repo.backend().as_ref();
    let keys = repo.keys();
    let pname = pack::pack_name(pid);
    let listed: Vec<(ChunkId, Location)> = match pack::read_trailer(backend, keys, &pname) {
        Ok(blobs) => blobs.iter().map(|b| (b.id, location(*pid, b))).collect(),
        Err(e) if e.is_damage() => {
            let mut v = Vec::new();
            for f in index_files {
                match index::read_index_file(backend, keys, f) {
                    Ok(es) => v.extend(es.into_iter().filter(|(_, l)| l.pack == *pid)),
                    Err(e) if e.is_damage() => {}
                    Err(e) => return Err(e),
                }
            }
            v.sort_by_key(|(id, l)| (l.offset, id.0));
            v.dedup();
            v
        }
        Err(e) => return Err(e),
    };
    let data = backend.get(&pname)?;
    let mut good = Vec::new();
    let mut seen = HashSet::new();
    for (id, loc) in listed {
        let sealed = usize::try_from(loc.offset)
            .ok()
            .zip(usize::try_from(loc.stored_len).ok())
            .and_then(|(o, n)| data.get(o..o.checked_add(n)?));
        let intact = sealed.filter(|s| {
            chunk::decode(keys, &id, &loc, &pname, s).is_ok_and(|plain| keys.chunk_id(&plain) == id)
        });
        match intact {
            Some(s) if seen.insert(id) => good.push(EncodedChunk {
                id,
                kind: loc.kind,
                raw_len: loc.raw_len,
                compressed: loc.compressed,
                sealed: s.to_vec(),
            }),
            Some(_) => {}
            None => report.chunks_dropped += 1,
        }
    }
    Ok(good)
}
