//! The objects that garbage collection shares with backups, and the guard a
//! backup holds so that it never commits a reference to a pack prune may
//! delete. `docs/GC.md` states the protocol and its argument.
//!
//! - `gc/<id>`: a **GC mark**. Prune lists the packs it will delete, and
//!   deletes them only in a later run, once the mark is older than its grace
//!   period by the store's clock, and only if a fresh scan of the snapshots
//!   still finds nothing that needs them.
//! - `protect/<snapshot id>`: the snapshot may never be forgotten.
//!
//! Who writes: marks only by prune (under the GC lock), protect objects only
//! by `ekko protect`. Neither is ever modified; both are deleted whole.
//!
//! A backup reads the marks *before* it brings its index up to date, never
//! deduplicates against a pack that a mark names, and before it commits its
//! snapshot (`Guard::before_commit`) checks that every pack it relied on
//! still exists and that it has not outlived the grace period of a mark it
//! did not see when it started.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::blockmap::MapRef;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::format::{self, ChunkKind, Location, MAGIC_GC_MARK, MAGIC_PROTECT};
use crate::id::{ChunkId, ObjectId};
use crate::repo::Repository;
use crate::snapshot::Disk;

pub const MARKS_PREFIX: &str = "gc/";
pub const PROTECT_PREFIX: &str = "protect/";

/// Grace period when none is given: a pack is deleted no sooner than this
/// after a prune marked it. It must exceed the longest backup.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Default bound on the skew between the clocks that stamp objects, plus
/// listing delay.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(10 * 60);

/// The body of a GC mark (sealed JSON, see docs/FORMAT.md).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Mark {
    /// When prune wrote it, by the prune host's clock (informational: the
    /// grace period runs from the store's timestamp of the object).
    pub time: String,
    pub host: String,
    /// Grace period in milliseconds.
    pub grace_ms: u64,
    /// Clock-skew and listing-delay margin in milliseconds.
    pub skew_ms: u64,
    /// Packs to delete (32 hex digits each).
    pub packs: Vec<String>,
}

impl Mark {
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }

    pub fn skew(&self) -> Duration {
        Duration::from_millis(self.skew_ms)
    }

    /// How long a backup that did not see this mark may run before it must
    /// give up instead of committing: grace − 2 × skew.
    pub fn backup_bound(&self) -> Duration {
        self.grace().saturating_sub(self.skew() * 2)
    }

    pub fn pack_ids(&self) -> impl Iterator<Item = ObjectId> + '_ {
        self.packs.iter().filter_map(|h| ObjectId::from_hex(h))
    }
}

/// A mark as found in the repository.
#[derive(Debug, Clone)]
pub struct MarkFile {
    pub name: String,
    /// The store's timestamp of the object: the grace period starts here.
    pub modified: SystemTime,
    pub mark: Mark,
}

/// Check the grace options: a backup must get some time to run.
pub fn validate_grace(grace: Duration, skew: Duration) -> Result<()> {
    if grace <= skew * 2 {
        return Err(Error::Invalid(format!(
            "the grace period ({}) must be longer than twice the clock skew ({}): backups get grace − 2 × skew to finish",
            humantime::format_duration(grace),
            humantime::format_duration(skew)
        )));
    }
    Ok(())
}

pub fn write_mark(backend: &dyn Backend, keys: &Keys, mark: &Mark) -> Result<String> {
    let name = format!("{MARKS_PREFIX}{}", ObjectId::random());
    let body = serde_json::to_vec(mark).expect("serializable");
    backend.put(&name, &format::seal_file(keys, MAGIC_GC_MARK, &name, &body))?;
    Ok(name)
}

/// Read and authenticate one mark.
pub fn read_mark(backend: &dyn Backend, keys: &Keys, name: &str) -> Result<Mark> {
    let data = backend.get(name)?;
    let body = format::open_file(keys, MAGIC_GC_MARK, "GC mark", name, &data)?;
    serde_json::from_slice::<Mark>(&body).map_err(|e| Error::corrupt(name, e.to_string()))
}

/// Every mark, and the damaged ones apart. A damaged mark is ignored by
/// prune (it deletes nothing it cannot read) and so by backups as well.
pub fn read_marks(backend: &dyn Backend, keys: &Keys) -> Result<(Vec<MarkFile>, Vec<Error>)> {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for o in backend.list(MARKS_PREFIX)? {
        match read_mark(backend, keys, &o.name) {
            Ok(mark) => ok.push(MarkFile {
                name: o.name,
                modified: o.modified,
                mark,
            }),
            // Deleted by a prune since the listing: it is done with.
            Err(Error::NotFound { .. }) => continue,
            Err(e) if e.is_damage() || matches!(e, Error::UnsupportedVersion { .. }) => bad.push(e),
            Err(e) => return Err(e),
        }
    }
    Ok((ok, bad))
}

/// The body of a protect object.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Protection {
    pub snapshot: String,
    pub time: String,
    pub host: String,
}

fn protect_name(snapshot_id: &str) -> String {
    format!("{PROTECT_PREFIX}{snapshot_id}")
}

/// Protect a snapshot from `forget`. Idempotent: the object's name is the
/// snapshot id, so protecting twice writes the same object again.
pub fn protect(backend: &dyn Backend, keys: &Keys, snapshot_id: &str) -> Result<()> {
    let name = protect_name(snapshot_id);
    let body = serde_json::to_vec(&Protection {
        snapshot: snapshot_id.to_string(),
        time: crate::time::now_rfc3339(),
        host: crate::time::hostname(),
    })
    .expect("serializable");
    backend.put(&name, &format::seal_file(keys, MAGIC_PROTECT, &name, &body))
}

/// Remove a protection; returns whether there was one.
pub fn unprotect(backend: &dyn Backend, snapshot_id: &str) -> Result<bool> {
    let name = protect_name(snapshot_id);
    let existed = match backend.size(&name) {
        Ok(_) => true,
        Err(Error::NotFound { .. }) => false,
        Err(e) => return Err(e),
    };
    backend.delete(&name)?;
    Ok(existed)
}

/// Ids of the protected snapshots. The name alone protects: an object that
/// does not open keeps its snapshot protected (`check` reports it).
pub fn protected_ids(backend: &dyn Backend) -> Result<HashSet<String>> {
    Ok(backend
        .list(PROTECT_PREFIX)?
        .into_iter()
        .filter_map(|o| o.name.strip_prefix(PROTECT_PREFIX).map(str::to_string))
        .filter(|id| ObjectId::from_hex(id).is_some())
        .collect())
}

/// Read and authenticate one protect object.
pub fn read_protection(backend: &dyn Backend, keys: &Keys, name: &str) -> Result<Protection> {
    let data = backend.get(name)?;
    let body = format::open_file(keys, MAGIC_PROTECT, "protect", name, &data)?;
    let p: Protection =
        serde_json::from_slice(&body).map_err(|e| Error::corrupt(name, e.to_string()))?;
    if protect_name(&p.snapshot) != name {
        return Err(Error::corrupt(name, "names another snapshot"));
    }
    Ok(p)
}

/// Visit every chunk a block map references, once: each node (as `Map`)
/// before its children, and the data chunks of each leaf (as `Data`).
/// `seen` spans calls, so maps that share nodes are walked once.
pub fn walk_map(
    repo: &Repository,
    map: &MapRef,
    seen: &mut HashSet<ChunkId>,
    visit: &mut dyn FnMut(ChunkId, ChunkKind) -> Result<()>,
) -> Result<()> {
    walk_map_past(repo, map, seen, &HashSet::new(), visit)
}

/// `walk_map`, visiting but not descending into the nodes in `lost` that
/// cannot be read (a repair recorded them as lost): what lies below them
/// is unknown until a backup stores them again.
pub fn walk_map_past(
    repo: &Repository,
    map: &MapRef,
    seen: &mut HashSet<ChunkId>,
    lost: &HashSet<ChunkId>,
    visit: &mut dyn FnMut(ChunkId, ChunkKind) -> Result<()>,
) -> Result<()> {
    if map.depth == 0 {
        return Err(Error::corrupt("block map", "depth 0"));
    }
    walk_node(repo, map.root, map.depth - 1, seen, lost, visit)
}

fn walk_node(
    repo: &Repository,
    id: ChunkId,
    level: u8,
    seen: &mut HashSet<ChunkId>,
    lost: &HashSet<ChunkId>,
    visit: &mut dyn FnMut(ChunkId, ChunkKind) -> Result<()>,
) -> Result<()> {
    if id.is_zero() || !seen.insert(id) {
        return Ok(());
    }
    visit(id, ChunkKind::Map)?;
    let data = match repo.read_chunk(&id) {
        Err(Error::ChunkMissing { .. }) if lost.contains(&id) => return Ok(()),
        r => r?,
    };
    let children = format::decode_map_node(&format!("map node {id}"), &data)?;
    for c in children {
        if level == 0 {
            if !c.is_zero() && seen.insert(c) {
                visit(c, ChunkKind::Data)?;
            }
        } else {
            walk_node(repo, c, level - 1, seen, lost, visit)?;
        }
    }
    Ok(())
}

/// What a backup session knows about garbage collection: the marks it saw
/// when it started, and the packs its snapshot will rely on.
pub struct Guard {
    started: Instant,
    seen: HashSet<String>,
    candidates: HashSet<ObjectId>,
    /// Packs the snapshot relies on for chunks it did not store, each with
    /// the end of the last such chunk in it: a pack shorter than that was
    /// truncated.
    depends: Mutex<HashMap<ObjectId, u64>>,
    /// Packs this backup stored.
    written: Mutex<HashSet<ObjectId>>,
    /// Chunks that a repair recorded as lost (`crate::lost`): a parent that
    /// references one is not built on.
    lost: HashSet<ChunkId>,
    /// A lost-chunk record did not open: what it named is unknown, so every
    /// parent's chunks are looked up (a missing one blocks it).
    check_parents: bool,
}

/// Above this many packs, one listing is cheaper than a request per pack.
const LIST_INSTEAD_OF_HEAD: usize = 64;

impl Guard {
    /// Read the marks, then bring the index up to date: in that order, so
    /// that an index loaded from files a finished prune has since replaced
    /// comes with the mark that names the packs it deleted.
    pub fn start(repo: &Repository) -> Result<Guard> {
        let started = Instant::now();
        let (marks, bad) = read_marks(repo.backend().as_ref(), repo.keys())?;
        for e in bad {
            tracing::warn!("ignoring a damaged GC mark: {e}");
        }
        repo.refresh_index()?;
        let (records, bad) = crate::lost::read_all(repo.backend().as_ref(), repo.keys())?;
        for e in &bad {
            tracing::warn!(
                "a damaged lost-chunk record (`ekko check --repair` replaces it): {e}; every parent is checked for missing chunks"
            );
        }
        Ok(Guard {
            started,
            seen: marks.iter().map(|m| m.name.clone()).collect(),
            candidates: marks.iter().flat_map(|m| m.mark.pack_ids()).collect(),
            depends: Mutex::new(HashMap::new()),
            written: Mutex::new(HashSet::new()),
            lost: crate::lost::lost_chunks(&records),
            check_parents: !bad.is_empty(),
        })
    }

    /// A guard that knows of no marks (for tests of the pipeline alone).
    pub fn none() -> Guard {
        Guard {
            started: Instant::now(),
            seen: HashSet::new(),
            candidates: HashSet::new(),
            depends: Mutex::new(HashMap::new()),
            written: Mutex::new(HashSet::new()),
            lost: HashSet::new(),
            check_parents: false,
        }
    }

    /// May a chunk stored at `loc` be reused? Not if prune marked its
    /// pack: the chunk is stored again instead. If it may, the snapshot
    /// now relies on the pack, up to the chunk's end.
    pub fn reuse(&self, loc: &Location) -> bool {
        if self.candidates.contains(&loc.pack) {
            return false;
        }
        rely(&mut self.depends.lock().expect("guard lock"), loc);
        true
    }

    /// This backup stored `pack`: its snapshot relies on it too. A backup
    /// that outlives its grace period can find a pack of its own marked,
    /// and, after the next prune, deleted with its mark, so that no unseen
    /// mark is left to tell; `before_commit` then finds the pack gone.
    pub fn wrote(&self, pack: ObjectId) {
        self.written.lock().expect("guard lock").insert(pack);
    }

    /// Before this backup publishes the index of its last packs: fail if
    /// a pack it stored is gone, so that no index file names it.
    pub fn before_publishing(&self, repo: &Repository) -> Result<()> {
        let written: Vec<(ObjectId, u64)> = self
            .written
            .lock()
            .expect("guard lock")
            .iter()
            .map(|p| (*p, 0))
            .collect();
        missing_packs_error(repo, written)
    }

    /// An incremental keeps the parent's chunks without reading them. If
    /// marks or lost-chunk records exist, every chunk the parent's map
    /// references must be indexed, in an unmarked pack; otherwise the disk
    /// must be read in full (which stores lost chunks again: the repository
    /// heals). Returns why not, or None when the parent is safe to build on.
    pub fn parent_blocked(&self, repo: &Repository, parent: &Disk) -> Result<Option<String>> {
        if self.candidates.is_empty() && self.lost.is_empty() && !self.check_parents {
            return Ok(None);
        }
        let mut seen = HashSet::new();
        let mut blocked: Option<String> = None;
        let mut packs = HashMap::new();
        let walked = walk_map(repo, &parent.map, &mut seen, &mut |id, _| {
            if blocked.is_some() {
                return Ok(());
            }
            match repo.index().lookup(&id)? {
                Some(loc) if self.candidates.contains(&loc.pack) => {
                    blocked = Some(format!(
                        "the parent's chunk {id} is in pack {} that prune marked for deletion",
                        loc.pack
                    ));
                }
                Some(loc) => rely(&mut packs, &loc),
                None if self.lost.contains(&id) => {
                    blocked = Some(format!(
                        "the parent's chunk {id} was lost (a repair recorded it): reading the disk in full stores it again if the disk still holds it"
                    ));
                }
                None => blocked = Some(format!("the parent's chunk {id} is not indexed")),
            }
            Ok(())
        });
        match walked {
            // A lost or damaged map node: the parent's map cannot be used.
            Err(e) if e.is_damage() => {
                return Ok(Some(format!("the parent's block map cannot be read ({e})")));
            }
            r => r?,
        }
        if blocked.is_none() {
            let mut d = self.depends.lock().expect("guard lock");
            for (p, end) in packs {
                raise(&mut d, p, end);
            }
        }
        Ok(blocked)
    }

    /// Just before the snapshot manifest is written: fail if a prune may
    /// delete, or has deleted, something this snapshot relies on.
    pub fn before_commit(&self, repo: &Repository) -> Result<()> {
        let backend = repo.backend().as_ref();
        let elapsed = self.started.elapsed();
        let (marks, _) = read_marks(backend, repo.keys())?;
        for m in marks.iter().filter(|m| !self.seen.contains(&m.name)) {
            let bound = m.mark.backup_bound();
            if elapsed > bound {
                return Err(Error::GcRace {
                    reason: format!(
                        "a prune marked packs for deletion ({}) while this backup ran, and the backup took {:.1} s, longer than the {:.1} s that its grace period allows",
                        m.name,
                        elapsed.as_secs_f64(),
                        bound.as_secs_f64()
                    ),
                });
            }
        }
        let mut deps: Vec<(ObjectId, u64)> = self
            .depends
            .lock()
            .expect("guard lock")
            .iter()
            .map(|(p, end)| (*p, *end))
            .collect();
        deps.extend(
            self.written
                .lock()
                .expect("guard lock")
                .iter()
                .map(|p| (*p, 0)),
        );
        missing_packs_error(repo, deps)
    }

    /// Just before the manifest of a snapshot that kept chunks of `parent`
    /// without reading them: is the parent still there? If it was
    /// forgotten after the backup resolved it but before this guard read
    /// the lost-chunk records, a prune may have deleted a record that named
    /// one of those chunks (a record goes once no snapshot needs what it
    /// names), and the snapshot would reference a chunk nothing holds. So,
    /// with the parent gone, every chunk the snapshot's `disks` reference
    /// must be indexed.
    pub fn before_commit_on(
        &self,
        repo: &Repository,
        parent: &str,
        disks: &[crate::snapshot::Disk],
    ) -> Result<()> {
        match repo.backend().size(&crate::snapshot::snapshot_name(parent)) {
            Ok(_) => return Ok(()),
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        repo.refresh_index()?;
        let mut seen = HashSet::new();
        for d in disks {
            let mut missing = None;
            let walked = walk_map(repo, &d.map, &mut seen, &mut |id, _| {
                if missing.is_none() && repo.index().lookup(&id)?.is_none() {
                    missing = Some(format!("chunk {id}, which no index names"));
                }
                Ok(())
            });
            match walked {
                Err(e) if e.is_damage() => {
                    missing = Some(format!("a block-map node that cannot be read ({e})"))
                }
                r => r?,
            }
            if let Some(what) = missing {
                return Err(Error::GcRace {
                    reason: format!(
                        "the parent snapshot {parent} was forgotten while this backup started, and disk {} kept from it {what} (run again, the backup builds on the VM's latest snapshot now)",
                        d.name
                    ),
                });
            }
        }
        tracing::info!(parent, "the parent snapshot was forgotten meanwhile; every chunk this snapshot kept from it is still indexed");
        Ok(())
    }
}

/// A `GcRace` error if any of `packs` is gone from the repository.
/// The snapshot relies on `pack` up to `loc`'s chunk's end.
fn rely(packs: &mut HashMap<ObjectId, u64>, loc: &Location) {
    raise(
        packs,
        loc.pack,
        loc.offset.saturating_add(u64::from(loc.stored_len)),
    );
}

/// Relied on up to `end` in `pack`, at least.
fn raise(packs: &mut HashMap<ObjectId, u64>, pack: ObjectId, end: u64) {
    let e = packs.entry(pack).or_insert(0);
    *e = (*e).max(end);
}

/// Fail if a pack of `deps` is gone, or shorter than the end given with it
/// (truncated: the snapshot would reference chunks that are not there).
fn missing_packs_error(repo: &Repository, deps: Vec<(ObjectId, u64)>) -> Result<()> {
    let backend = repo.backend().as_ref();
    // Many packs: one listing narrows them down to those it lacks or lists
    // too short. A listing may lag behind what was just stored
    // (docs/GC.md), so each of those is asked for by name before it counts.
    let suspects: Vec<(ObjectId, u64)> = if deps.len() > LIST_INSTEAD_OF_HEAD {
        let present: HashMap<ObjectId, u64> = backend
            .list("packs/")?
            .iter()
            .filter_map(|o| Some((crate::pack::pack_id_from_name(&o.name)?, o.size)))
            .collect();
        deps.into_iter()
            .filter(|(p, end)| present.get(p).is_none_or(|size| size < end))
            .collect()
    } else {
        deps
    };
    let mut missing = Vec::new();
    for (p, end) in suspects {
        let name = crate::pack::pack_name(&p);
        match backend.size(&name) {
            Ok(size) if size < end => {
                return Err(Error::corrupt(
                    &name,
                    format!(
                        "it is {size} bytes long, but chunks this backup deduplicated against lie up to byte {end}: it was truncated. Nothing was committed; `ekko check --read-data --repair` keeps what is intact, after which backups store the rest again"
                    ),
                ));
            }
            Ok(_) => {}
            Err(Error::NotFound { .. }) => missing.push(p),
            Err(e) => return Err(e),
        }
    }
    if let Some(p) = missing.first() {
        // Usually a prune that this backup could not see; but a pack
        // lost some other way looks the same, and then every retry
        // fails alike until the index forgets it.
        return Err(Error::GcRace {
            reason: format!(
                "pack {p}{} that this backup stored or deduplicated against was deleted by a prune, or lost. A prune deletes a running backup's packs only when the backup takes longer than the grace period allows: give prune a longer --grace than the longest backup. (If the next backup fails the same way, the repository lost it: run `ekko check` to see which snapshots are affected, then `ekko index rebuild`, after which backups store its chunks again)",
                match missing.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                }
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_must_leave_backups_time() {
        let s = Duration::from_secs;
        assert!(validate_grace(s(10), s(5)).is_err());
        assert!(validate_grace(s(10), s(4)).is_ok());
        assert!(validate_grace(s(1), s(0)).is_ok());
        let m = Mark {
            time: String::new(),
            host: String::new(),
            grace_ms: 86_400_000,
            skew_ms: 600_000,
            packs: vec![ObjectId([7; 16]).to_hex(), "not hex".into()],
        };
        assert_eq!(m.backup_bound(), s(86_400 - 1_200));
        // A malformed id is skipped, never turned into another pack's id.
        assert_eq!(m.pack_ids().collect::<Vec<_>>(), vec![ObjectId([7; 16])]);
    }

    #[test]
    fn a_guard_refuses_marked_packs_and_records_the_rest() {
        let g = Guard {
            started: Instant::now(),
            seen: HashSet::new(),
            candidates: [ObjectId([1; 16])].into(),
            depends: Mutex::new(HashMap::new()),
            written: Mutex::new(HashSet::new()),
            lost: HashSet::new(),
            check_parents: false,
        };
        let at = |pack: u8, offset: u64| Location {
            pack: ObjectId([pack; 16]),
            offset,
            stored_len: 100,
            raw_len: 100,
            kind: crate::format::ChunkKind::Data,
            compressed: false,
        };
        assert!(!g.reuse(&at(1, 16)));
        assert!(g.reuse(&at(2, 500)));
        assert!(g.reuse(&at(2, 16)));
        let deps = g.depends.lock().unwrap().clone();
        assert_eq!(deps, [(ObjectId([2; 16]), 600)].into());
    }
}
