//! What changed between two snapshots of a disk: the block ranges whose
//! chunks differ, found from the block maps alone. Leaves that two maps
//! share (most of them, between neighbouring snapshots) are compared by
//! their ids and never read; no data chunk is read at all.

use std::sync::Arc;

use crate::blockmap::{self, NodeSource, FANOUT};
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::snapshot::Disk;

/// A byte range of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Range {
    pub offset: u64,
    pub length: u64,
}

/// The byte ranges where disk `b` differs from disk `a`, in order and
/// merged. The shorter disk reads as zeros past its end (as a grown disk
/// does), so growth shows only where it holds data; the sizes tell the
/// rest. The last block of the shorter disk, if it holds data, counts as
/// changed when its length differs, even if the bytes it gained are zeros. Both disks must
/// have the same chunk size.
pub fn changed(src: &dyn NodeSource, a: &Disk, b: &Disk) -> Result<Vec<Range>> {
    if a.chunk_size != b.chunk_size {
        return Err(Error::Invalid(format!(
            "disk {} has {} byte chunks in one snapshot and {} in the other: blocks of different sizes cannot be compared",
            b.name, a.chunk_size, b.chunk_size
        )));
    }
    let (na, nb) = (a.nchunks(), b.nchunks());
    let leaves_a = blockmap::leaf_ids(src, &a.map, na)?;
    let leaves_b = blockmap::leaf_ids(src, &b.map, nb)?;
    let n = na.max(nb);
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    let mut push = |idx: u64| match blocks.last_mut() {
        Some(r) if r.1 == idx => r.1 += 1,
        _ => blocks.push((idx, idx + 1)),
    };
    for i in 0..leaves_a.len().max(leaves_b.len()) {
        let (la, lb) = (leaves_a.get(i), leaves_b.get(i));
        if la.is_some() && la == lb {
            continue; // the same leaf: the same blocks
        }
        let first = u64::try_from(i).expect("fits") * u64::try_from(FANOUT).expect("fits");
        let ea = entries(src, la)?;
        let eb = entries(src, lb)?;
        for j in 0..FANOUT {
            let idx = first + u64::try_from(j).expect("fits");
            if idx >= n {
                break;
            }
            let x = entry(&ea, j, idx, na, la)?;
            let y = entry(&eb, j, idx, nb, lb)?;
            if x != y {
                push(idx);
            }
        }
    }
    let cs = u64::from(a.chunk_size);
    let end = a.size.max(b.size);
    Ok(blocks
        .into_iter()
        .map(|(f, e)| {
            let offset = f * cs;
            Range {
                offset,
                length: (e * cs).min(end) - offset,
            }
        })
        .collect())
}

/// A leaf's entries: `None` for a leaf past the end of the disk, an
/// empty list for an all-hole leaf.
fn entries(src: &dyn NodeSource, leaf: Option<&ChunkId>) -> Result<Option<Arc<Vec<ChunkId>>>> {
    match leaf {
        None => Ok(None),
        Some(id) if id.is_zero() => Ok(Some(Arc::new(Vec::new()))),
        Some(id) => src.node(id).map(Some),
    }
}

/// Block `idx` (entry `j` of its leaf): a hole past the end of the disk.
fn entry(
    leaf: &Option<Arc<Vec<ChunkId>>>,
    j: usize,
    idx: u64,
    nchunks: u64,
    id: Option<&ChunkId>,
) -> Result<ChunkId> {
    if idx >= nchunks {
        return Ok(ChunkId::ZERO);
    }
    match leaf {
        None => Ok(ChunkId::ZERO),
        Some(e) if e.is_empty() => Ok(ChunkId::ZERO),
        Some(e) => e.get(j).copied().ok_or_else(|| {
            Error::corrupt(
                format!("map node {}", id.copied().unwrap_or(ChunkId::ZERO)),
                format!("has no entry {j} (block {idx})"),
            )
        }),
    }
}
