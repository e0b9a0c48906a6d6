//! Lost-chunk records: what `ekko check --repair` could not save.
//!
//! A repair replaces damaged packs by packs of their intact chunks and
//! takes the damaged and missing chunks out of the index. Snapshots that
//! referenced those chunks stay, incomplete: a restore that needs a lost
//! chunk fails and names it. The repair then writes a record `lost/<id>`
//! naming the lost chunks, so that:
//!
//! - a backup whose parent references a lost chunk reads its disk in full
//!   (`gc::Guard::parent_blocked`) instead of inheriting the hole. Chunk ids
//!   are content hashes, so if the disk still holds that data the backup
//!   stores it again, and every older snapshot that referenced it is whole
//!   again: the repository heals;
//! - prune runs despite the references it cannot satisfy (without a record
//!   it refuses, as a referenced chunk in no pack means damage it does not
//!   understand), and deletes a record once none of its chunks is both
//!   referenced and missing;
//! - `check` says which missing chunks are known lost, and how they heal.
//!
//! Records are written only under the exclusive lock (by the repair) and
//! deleted by the repair or by prune. Like every object, never modified.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::format::{self, MAGIC_LOST};
use crate::id::{ChunkId, ObjectId};

pub const LOST_PREFIX: &str = "lost/";

/// The body of a lost-chunk record (sealed JSON, see docs/FORMAT.md).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct LostRecord {
    /// When the repair wrote it, by its host's clock (informational).
    pub time: String,
    pub host: String,
    /// The chunks that were damaged or missing and are referenced by a
    /// snapshot (64 hex digits each).
    pub chunks: Vec<String>,
    /// The snapshots that referenced them when the record was written.
    pub snapshots: Vec<String>,
}

impl LostRecord {
    /// A record of `chunks` (in id order) and the `snapshots` that need
    /// them, stamped with this host and time.
    pub fn new(chunks: &HashSet<ChunkId>, snapshots: &[String]) -> LostRecord {
        let mut ids: Vec<&ChunkId> = chunks.iter().collect();
        ids.sort_by_key(|c| c.0);
        LostRecord {
            time: crate::time::now_rfc3339(),
            host: crate::time::hostname(),
            chunks: ids.into_iter().map(ChunkId::to_hex).collect(),
            snapshots: snapshots.to_vec(),
        }
    }

    pub fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.chunks.iter().filter_map(|h| ChunkId::from_hex(h))
    }
}

/// A record as found in the repository.
#[derive(Debug, Clone)]
pub struct LostFile {
    pub name: String,
    pub record: LostRecord,
}

pub fn write(backend: &dyn Backend, keys: &Keys, record: &LostRecord) -> Result<String> {
    let name = format!("{LOST_PREFIX}{}", ObjectId::random());
    let body = serde_json::to_vec(record).expect("serializable");
    backend.put(&name, &format::seal_file(keys, MAGIC_LOST, &name, &body))?;
    Ok(name)
}

/// Every record, and the damaged ones apart (a damaged record only loses
/// its hints: backups then inherit holes, and prune refuses to run until a
/// repair writes a new one; `check` reports it).
pub fn read_all(backend: &dyn Backend, keys: &Keys) -> Result<(Vec<LostFile>, Vec<Error>)> {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for o in backend.list(LOST_PREFIX)? {
        let data = match backend.get(&o.name) {
            Ok(d) => d,
            Err(Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        let parsed = format::open_file(keys, MAGIC_LOST, "lost-chunk record", &o.name, &data)
            .and_then(|body| {
                serde_json::from_slice::<LostRecord>(&body)
                    .map_err(|e| Error::corrupt(&o.name, e.to_string()))
            });
        match parsed {
            Ok(record) => ok.push(LostFile {
                name: o.name,
                record,
            }),
            Err(e) if e.is_damage() || matches!(e, Error::UnsupportedVersion { .. }) => bad.push(e),
            Err(e) => return Err(e),
        }
    }
    Ok((ok, bad))
}

/// The chunks all readable records name.
pub fn lost_chunks(records: &[LostFile]) -> HashSet<ChunkId> {
    records.iter().flat_map(|f| f.record.chunk_ids()).collect()
}
