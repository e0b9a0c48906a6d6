//! Rebuilding the index from the packs alone.
//!
//! Every pack carries a sealed trailer listing its chunks, so lost or
//! damaged index files can always be replaced. The rebuild writes new index
//! files first and only then deletes the old ones, under the exclusive lock:
//! a crash in between leaves duplicate (harmless) entries, never missing ones.

use crate::error::Result;
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
    for part in entries.chunks(ENTRIES_PER_FILE) {
        let name = index::index_name(&ObjectId::random());
        let data = format::seal_file(keys, MAGIC_INDEX, &name, &format::encode_index(part));
        backend.put(&name, &data)?;
        report.index_files_written += 1;
    }
    for name in &old {
        backend.delete(name)?;
        report.index_files_removed += 1;
    }
    Ok(report)
}
