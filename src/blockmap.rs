//! Block maps: which chunk holds each block of a disk, as a tree of
//! content-addressed map chunks.
//!
//! Level 0 nodes (leaves) list the data chunk ids of up to `FANOUT`
//! consecutive blocks; level k nodes list the ids of level k-1 nodes. The
//! all-zero id means "hole" at every level, so an empty region costs nothing.
//! Because nodes are content-addressed, a snapshot that changed a few blocks
//! writes only the leaves it touched and the path above them; every other
//! node is shared with its parent snapshot. A lookup walks `depth` nodes
//! whatever the length of the chain.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::ChunkId;

pub const FANOUT: usize = 256;
const FANOUT_U64: u64 = 256;

/// A disk's block map as recorded in a snapshot.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRef {
    pub root: ChunkId,
    pub depth: u8,
    pub fanout: u32,
}

/// Number of levels needed for `nchunks` entries (at least one).
pub fn depth_for(nchunks: u64) -> u8 {
    let mut d = 1u8;
    let mut cap = FANOUT_U64;
    while cap < nchunks {
        cap = cap.saturating_mul(FANOUT_U64);
        d += 1;
    }
    d
}

fn span(level: u8) -> u64 {
    FANOUT_U64.saturating_pow(u32::from(level))
}

/// Loads a map node by id (through a cache, in practice).
pub trait NodeSource {
    fn node(&self, id: &ChunkId) -> Result<Arc<Vec<ChunkId>>>;
}

/// The chunk id of block `idx`, or ZERO for a hole.
pub fn lookup(src: &dyn NodeSource, map: &MapRef, idx: u64) -> Result<ChunkId> {
    Ok(lookup_run(src, map, idx)?.0)
}

/// Like `lookup`, and also how many blocks from `idx` on are the same: the
/// rest of the hole `idx` lies in (a ZERO node stands for every block of
/// its subtree), or 1 for data. A scan for data steps over a hole of any
/// size in one go, instead of block by block.
pub fn lookup_run(src: &dyn NodeSource, map: &MapRef, idx: u64) -> Result<(ChunkId, u64)> {
    let mut node_id = map.root;
    for level in (0..map.depth).rev() {
        if node_id.is_zero() {
            // A node of `level` covers span(level + 1) blocks.
            let s = span(level + 1);
            return Ok((ChunkId::ZERO, s - idx % s));
        }
        let node = src.node(&node_id)?;
        let pos = usize::try_from((idx / span(level)) % FANOUT_U64).expect("below FANOUT");
        node_id = *node.get(pos).ok_or_else(|| {
            Error::corrupt(
                format!("map node {node_id}"),
                format!("has no entry {pos} (block {idx})"),
            )
        })?;
    }
    Ok((node_id, 1))
}

/// Ids of all leaves of a map, in order (ZERO for all-hole leaves).
pub fn leaf_ids(src: &dyn NodeSource, map: &MapRef, nchunks: u64) -> Result<Vec<ChunkId>> {
    let mut level_ids = vec![map.root];
    for level in (1..map.depth).rev() {
        let want = nchunks.div_ceil(span(level));
        let mut next = Vec::new();
        for (i, id) in level_ids.iter().enumerate() {
            let children = want_children(want, i);
            if id.is_zero() {
                next.extend(std::iter::repeat_n(ChunkId::ZERO, children));
            } else {
                let node = src.node(id)?;
                if node.len() != children {
                    return Err(Error::corrupt(
                        format!("map node {id}"),
                        "wrong number of entries",
                    ));
                }
                next.extend(node.iter().copied());
            }
        }
        level_ids = next;
    }
    // An empty disk has a (zero) root and no leaves.
    if nchunks == 0 {
        level_ids.clear();
    }
    Ok(level_ids)
}

/// Entries of node `i` of a level that has `nodes_below_count` children in all.
fn want_children(nodes_below_count: u64, i: usize) -> usize {
    let start = u64::try_from(i).expect("fits").saturating_mul(FANOUT_U64);
    usize::try_from(nodes_below_count.saturating_sub(start).min(FANOUT_U64)).expect("below FANOUT")
}

struct PendingLeaf {
    entries: Option<Vec<ChunkId>>,
    filled: usize,
}

/// Builds a new map from per-block results that may arrive out of order.
pub struct MapBuilder {
    nchunks: u64,
    /// Leaves of the parent map, for incremental backups.
    parent_leaves: Option<Vec<ChunkId>>,
    leaves: Vec<ChunkId>,
    pending: BTreeMap<usize, PendingLeaf>,
}

impl MapBuilder {
    pub fn new(nchunks: u64, parent_leaves: Option<Vec<ChunkId>>) -> Result<MapBuilder> {
        let nleaves = usize::try_from(nchunks.div_ceil(FANOUT_U64))
            .map_err(|_| Error::Invalid("disk too large".into()))?;
        if let Some(p) = &parent_leaves {
            if p.len() != nleaves {
                return Err(Error::Invalid("parent map has another size".into()));
            }
        }
        Ok(MapBuilder {
            nchunks,
            parent_leaves,
            leaves: vec![ChunkId::ZERO; nleaves],
            pending: BTreeMap::new(),
        })
    }

    fn leaf_len(&self, leaf: usize) -> usize {
        want_children(self.nchunks, leaf)
    }

    fn split(idx: u64) -> (usize, usize) {
        let leaf = usize::try_from(idx / FANOUT_U64).expect("leaf index fits");
        let pos = usize::try_from(idx % FANOUT_U64).expect("below FANOUT");
        (leaf, pos)
    }

    /// Block `idx` now holds `id` (ZERO for a hole).
    pub fn set(
        &mut self,
        idx: u64,
        id: ChunkId,
        nodes: &dyn NodeSource,
        store: &mut dyn FnMut(&[ChunkId]) -> Result<ChunkId>,
    ) -> Result<()> {
        let (leaf, pos) = Self::split(idx);
        let len = self.leaf_len(leaf);
        let parent = self.parent_leaves.as_ref().map(|p| p[leaf]);
        let p = self.pending.entry(leaf).or_insert(PendingLeaf {
            entries: None,
            filled: 0,
        });
        if p.entries.is_none() {
            p.entries = Some(match parent {
                Some(pid) if !pid.is_zero() => nodes.node(&pid)?.as_ref().clone(),
                _ => vec![ChunkId::ZERO; len],
            });
        }
        let entries = p.entries.as_mut().expect("just set");
        *entries
            .get_mut(pos)
            .ok_or_else(|| Error::corrupt("parent map", "leaf too short"))? = id;
        p.filled += 1;
        self.maybe_finish(leaf, store)
    }

    /// Blocks `from..to` keep what the parent map (or a hole) says.
    pub fn keep(
        &mut self,
        from: u64,
        to: u64,
        store: &mut dyn FnMut(&[ChunkId]) -> Result<ChunkId>,
    ) -> Result<()> {
        let mut idx = from;
        while idx < to {
            let (leaf, pos) = Self::split(idx);
            let len = self.leaf_len(leaf);
            let n = (len - pos).min(usize::try_from(to - idx).unwrap_or(usize::MAX));
            self.pending
                .entry(leaf)
                .or_insert(PendingLeaf {
                    entries: None,
                    filled: 0,
                })
                .filled += n;
            self.maybe_finish(leaf, store)?;
            idx += u64::try_from(n).expect("fits");
        }
        Ok(())
    }

    fn maybe_finish(
        &mut self,
        leaf: usize,
        store: &mut dyn FnMut(&[ChunkId]) -> Result<ChunkId>,
    ) -> Result<()> {
        let len = self.leaf_len(leaf);
        let done = self.pending.get(&leaf).is_some_and(|p| p.filled >= len);
        if !done {
            return Ok(());
        }
        let p = self.pending.remove(&leaf).expect("present");
        self.leaves[leaf] = match p.entries {
            // Untouched: the parent's leaf (or a hole) stands as it is.
            None => self
                .parent_leaves
                .as_ref()
                .map_or(ChunkId::ZERO, |pl| pl[leaf]),
            Some(e) if e.iter().all(ChunkId::is_zero) => ChunkId::ZERO,
            Some(e) => store(&e)?,
        };
        Ok(())
    }

    /// Build the upper levels. Every block must have been set or kept.
    pub fn finish(self, store: &mut dyn FnMut(&[ChunkId]) -> Result<ChunkId>) -> Result<MapRef> {
        if !self.pending.is_empty() {
            return Err(Error::Invalid(
                "block map incomplete: a block was never reported".into(),
            ));
        }
        let depth = depth_for(self.nchunks);
        let mut level = self.leaves;
        for _ in 1..depth {
            let mut up = Vec::with_capacity(level.len().div_ceil(FANOUT));
            for group in level.chunks(FANOUT) {
                up.push(if group.iter().all(ChunkId::is_zero) {
                    ChunkId::ZERO
                } else {
                    store(group)?
                });
            }
            level = up;
        }
        let root = match level.len() {
            0 => ChunkId::ZERO,
            1 => level[0],
            _ => unreachable!("depth_for guarantees a single root"),
        };
        Ok(MapRef {
            root,
            depth,
            fanout: u32::try_from(FANOUT).expect("fits"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Mem(Mutex<HashMap<ChunkId, Arc<Vec<ChunkId>>>>, Mutex<usize>);

    impl NodeSource for Mem {
        fn node(&self, id: &ChunkId) -> Result<Arc<Vec<ChunkId>>> {
            Ok(self.0.lock().unwrap()[id].clone())
        }
    }

    impl Mem {
        fn store(&self, e: &[ChunkId]) -> ChunkId {
            let mut h = blake3::Hasher::new();
            for x in e {
                h.update(&x.0);
            }
            let id = ChunkId(*h.finalize().as_bytes());
            *self.1.lock().unwrap() += 1;
            self.0.lock().unwrap().insert(id, Arc::new(e.to_vec()));
            id
        }
    }

    fn cid(i: u64) -> ChunkId {
        let mut a = [0u8; 32];
        a[..8].copy_from_slice(&(i + 1).to_le_bytes());
        ChunkId(a)
    }

    #[test]
    fn full_then_incremental() {
        let mem = Mem::default();
        let n = 70_000u64; // depth 3
        let mut b = MapBuilder::new(n, None).unwrap();
        let mut st = |e: &[ChunkId]| Ok(mem.store(e));
        // Out of order, with holes every 7th block.
        for i in (0..n).rev() {
            let id = if i % 7 == 0 { ChunkId::ZERO } else { cid(i) };
            b.set(i, id, &mem, &mut st).unwrap();
        }
        let m1 = b.finish(&mut st).unwrap();
        assert_eq!(m1.depth, 3);
        for i in [0, 1, 255, 256, 65535, 65536, n - 1] {
            let want = if i % 7 == 0 { ChunkId::ZERO } else { cid(i) };
            assert_eq!(lookup(&mem, &m1, i).unwrap(), want, "block {i}");
        }
        // Incremental: change two blocks, keep the rest.
        let leaves = leaf_ids(&mem, &m1, n).unwrap();
        assert_eq!(leaves.len(), 274);
        *mem.1.lock().unwrap() = 0;
        let mut b = MapBuilder::new(n, Some(leaves)).unwrap();
        let mut st = |e: &[ChunkId]| Ok(mem.store(e));
        b.keep(0, 1000, &mut st).unwrap();
        b.set(1000, cid(999_999), &mem, &mut st).unwrap();
        b.keep(1001, 69_000, &mut st).unwrap();
        b.set(69_000, ChunkId::ZERO, &mem, &mut st).unwrap();
        b.keep(69_001, n, &mut st).unwrap();
        let m2 = b.finish(&mut st).unwrap();
        // Two leaves, plus upper nodes: writes proportional to the change.
        let stores = *mem.1.lock().unwrap();
        assert!(stores <= 2 + 2 + 1, "{stores} node stores");
        assert_eq!(lookup(&mem, &m2, 1000).unwrap(), cid(999_999));
        assert_eq!(lookup(&mem, &m2, 69_000).unwrap(), ChunkId::ZERO);
        assert_eq!(lookup(&mem, &m2, 1002).unwrap(), cid(1002));
        assert_eq!(lookup(&mem, &m2, 1001).unwrap(), ChunkId::ZERO); // 1001 % 7 == 0
        assert_eq!(lookup(&mem, &m1, 1000).unwrap(), cid(1000));
    }

    #[test]
    fn lookup_run_spans_whole_holes() {
        let mem = Mem::default();
        let n = 70_000u64; // depth 3
        let mut b = MapBuilder::new(n, None).unwrap();
        let mut st = |e: &[ChunkId]| Ok(mem.store(e));
        b.keep(0, 1000, &mut st).unwrap();
        b.set(1000, cid(1000), &mem, &mut st).unwrap();
        b.keep(1001, 69_000, &mut st).unwrap();
        b.set(69_000, cid(69_000), &mem, &mut st).unwrap();
        b.keep(69_001, n, &mut st).unwrap();
        let m = b.finish(&mut st).unwrap();
        let run = |i| lookup_run(&mem, &m, i).unwrap();
        // A hole leaf: the rest of it.
        assert_eq!(run(0), (ChunkId::ZERO, 256));
        assert_eq!(run(2000), (ChunkId::ZERO, 256 - 2000 % 256));
        // In the leaf of block 1000: a hole entry, then data.
        assert_eq!(run(999), (ChunkId::ZERO, 1));
        assert_eq!(run(1000), (cid(1000), 1));
        assert_eq!(run(66_000), (ChunkId::ZERO, 256 - 66_000 % 256));
        // Every run agrees with lookup block by block.
        let mut i = 0;
        while i < n {
            let (id, len) = run(i);
            for j in i..(i + len).min(n) {
                assert_eq!(lookup(&mem, &m, j).unwrap(), id, "block {j}");
            }
            i += len;
        }
        // An all-hole map of any size is one run.
        let empty = MapRef {
            root: ChunkId::ZERO,
            depth: 7,
            fanout: 256,
        };
        assert_eq!(
            lookup_run(&mem, &empty, 5).unwrap(),
            (ChunkId::ZERO, (1 << 56) - 5)
        );
        let huge = MapRef { depth: 9, ..empty };
        assert_eq!(
            lookup_run(&mem, &huge, 5).unwrap(),
            (ChunkId::ZERO, u64::MAX - 5)
        );
    }

    #[test]
    fn tiny_and_empty() {
        let mem = Mem::default();
        let mut st = |e: &[ChunkId]| Ok(mem.store(e));
        let b = MapBuilder::new(0, None).unwrap();
        let m = b.finish(&mut st).unwrap();
        assert!(m.root.is_zero());
        // An incremental of an empty disk builds on its empty parent.
        let leaves = leaf_ids(&mem, &m, 0).unwrap();
        assert!(leaves.is_empty());
        let b = MapBuilder::new(0, Some(leaves)).unwrap();
        assert!(b.finish(&mut st).unwrap().root.is_zero());
        let mut b = MapBuilder::new(3, None).unwrap();
        b.keep(0, 3, &mut st).unwrap();
        let m = b.finish(&mut st).unwrap();
        assert!(m.root.is_zero());
        assert_eq!(lookup(&mem, &m, 2).unwrap(), ChunkId::ZERO);
    }
}
