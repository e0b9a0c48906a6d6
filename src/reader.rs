//! Point-in-time reads of one disk of one snapshot: the single read API that
//! restore, FUSE and the NBD server build on.
//!
//! A read maps each block to its chunk id through the snapshot's block map
//! (a few cached node lookups, the same cost for any chain length), then
//! fetches and decodes the chunk through a shared chunk cache. Holes read as
//! zeros and never touch storage. Snapshots never change, so caches never
//! need invalidation.

use std::sync::Arc;

use crate::blockmap::{self, NodeSource};
use crate::error::{Error, Result};
use crate::format;
use crate::id::ChunkId;
use crate::repo::Repository;
use crate::snapshot::{Disk, Snapshot};

/// Chunks of one pack this close together are fetched with one read.
const COALESCE_GAP: u64 = 256 << 10;
/// The most one coalesced read fetches.
const COALESCE_MAX: u64 = 16 << 20;

/// Decoded map nodes, shared by every reader of a repository.
pub struct NodeCache(quick_cache::sync::Cache<ChunkId, Arc<Vec<ChunkId>>>);

impl NodeCache {
    /// `nodes` map nodes of 8 KiB each at most.
    pub fn new(nodes: usize) -> NodeCache {
        NodeCache(quick_cache::sync::Cache::new(nodes.max(16)))
    }
}

/// Loads map nodes of `repo` through `cache`.
pub struct RepoNodes<'a> {
    pub repo: &'a Repository,
    pub cache: &'a NodeCache,
}

impl NodeSource for RepoNodes<'_> {
    fn node(&self, id: &ChunkId) -> Result<Arc<Vec<ChunkId>>> {
        self.cache.0.get_or_insert_with(id, || {
            let data = self.repo.read_chunk(id)?;
            Ok(Arc::new(format::decode_map_node(
                &format!("map node {id}"),
                &data,
            )?))
        })
    }
}

/// Decoded data chunks, weighed by size.
pub struct ChunkCache(quick_cache::sync::Cache<ChunkId, Arc<Vec<u8>>, ChunkWeight>);

#[derive(Clone)]
pub struct ChunkWeight;

impl quick_cache::Weighter<ChunkId, Arc<Vec<u8>>> for ChunkWeight {
    fn weight(&self, _k: &ChunkId, v: &Arc<Vec<u8>>) -> u64 {
        u64::try_from(v.len()).unwrap_or(u64::MAX).max(1)
    }
}

/// Share of the cache for chunks read at least twice. quick_cache's default
/// (97%) leaves new entries a sliver: once a long sequential read has filled
/// the cache with chunks read once, each chunk fetched ahead was evicted
/// before its reader came, and was decoded twice.
const HOT_SHARE: f64 = 0.5;

impl ChunkCache {
    pub fn new(bytes: u64) -> ChunkCache {
        let items = usize::try_from(bytes / 65536).unwrap_or(1024).max(16);
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(items)
            .weight_capacity(bytes.max(1 << 20))
            .hot_allocation(HOT_SHARE)
            .build()
            .expect("valid cache options");
        ChunkCache(quick_cache::sync::Cache::with_options(
            options,
            ChunkWeight,
            Default::default(),
            Default::default(),
        ))
    }
}

/// A contiguous run of a disk that is either data or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub data: bool,
}

/// Reads one disk of one snapshot.
pub struct DiskReader {
    repo: Arc<Repository>,
    snapshot_id: String,
    disk: Disk,
    nodes: Arc<NodeCache>,
    chunks: Arc<ChunkCache>,
}

impl DiskReader {
    pub fn new(
        repo: Arc<Repository>,
        snapshot: &Snapshot,
        disk: &str,
        nodes: Arc<NodeCache>,
        chunks: Arc<ChunkCache>,
    ) -> Result<DiskReader> {
        let disk = snapshot.disk(disk)?.clone();
        Ok(DiskReader {
            repo,
            snapshot_id: snapshot.id.clone(),
            disk,
            nodes,
            chunks,
        })
    }

    /// A reader with private caches of modest size.
    pub fn open(repo: Arc<Repository>, snapshot: &Snapshot, disk: &str) -> Result<DiskReader> {
        Self::new(
            repo,
            snapshot,
            disk,
            Arc::new(NodeCache::new(4096)),
            Arc::new(ChunkCache::new(64 << 20)),
        )
    }

    pub fn size(&self) -> u64 {
        self.disk.size
    }

    pub fn chunk_size(&self) -> u64 {
        u64::from(self.disk.chunk_size)
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    pub fn snapshot_id(&self) -> &str {
        &self.snapshot_id
    }

    pub fn nchunks(&self) -> u64 {
        self.disk.nchunks()
    }

    fn nodes(&self) -> RepoNodes<'_> {
        RepoNodes {
            repo: &self.repo,
            cache: &self.nodes,
        }
    }

    /// The chunk id of block `idx` (ZERO for a hole).
    pub fn chunk_id(&self, idx: u64) -> Result<ChunkId> {
        blockmap::lookup(&self.nodes(), &self.disk.map, idx)
    }

    /// Length of block `idx` (the last one may be short).
    pub fn block_len(&self, idx: u64) -> u64 {
        let cs = self.chunk_size();
        cs.min(self.disk.size.saturating_sub(idx.saturating_mul(cs)))
    }

    /// Block `idx` decoded, or `None` for a hole.
    pub fn block(&self, idx: u64) -> Result<Option<Arc<Vec<u8>>>> {
        self.fetch(idx, true)
    }

    /// Block `idx` without adding it to the cache (for one-pass readers such
    /// as restore, which would only churn it); a cached copy is still used.
    pub fn block_uncached(&self, idx: u64) -> Result<Option<Arc<Vec<u8>>>> {
        self.fetch(idx, false)
    }

    fn fetch(&self, idx: u64, cache: bool) -> Result<Option<Arc<Vec<u8>>>> {
        let id = self.chunk_id(idx)?;
        if id.is_zero() {
            return Ok(None);
        }
        let data = if cache {
            self.chunks
                .0
                .get_or_insert_with(&id, || self.repo.read_chunk(&id).map(Arc::new))?
        } else {
            match self.chunks.0.get(&id) {
                Some(d) => d,
                None => Arc::new(self.repo.read_chunk(&id)?),
            }
        };
        if u64::try_from(data.len()).ok() != Some(self.block_len(idx)) {
            return Err(Error::corrupt(
                format!("snapshot {} disk {}", self.snapshot_id, self.disk.name),
                format!("block {idx} has the wrong length"),
            ));
        }
        Ok(Some(data))
    }

    /// True when the repository's store answers few large reads much
    /// faster than many small ones (an object store).
    pub fn prefers_large_reads(&self) -> bool {
        self.repo.backend().prefers_large_reads()
    }

    /// Blocks `from..to` decoded (`None` for holes), without adding them to
    /// the cache. Chunks that lie close together in one pack are fetched
    /// with one ranged read: on an object store a request costs far more
    /// than the bytes, and a restore reads mostly neighbours.
    pub fn blocks_uncached(&self, from: u64, to: u64) -> Result<Vec<Option<Arc<Vec<u8>>>>> {
        let to = to.min(self.nchunks());
        let n = usize::try_from(to.saturating_sub(from))
            .map_err(|_| Error::Invalid("block range too large".into()))?;
        let mut out: Vec<Option<Arc<Vec<u8>>>> = vec![None; n];
        let mut wanted: Vec<(usize, ChunkId, format::Location)> = Vec::new();
        for (i, idx) in (from..to).enumerate() {
            let id = self.chunk_id(idx)?;
            if id.is_zero() {
                continue;
            }
            if let Some(d) = self.chunks.0.get(&id) {
                out[i] = Some(d);
                continue;
            }
            let loc = self
                .repo
                .index()
                .lookup(&id)?
                .ok_or(Error::ChunkMissing { id })?;
            wanted.push((i, id, loc));
        }
        wanted.sort_by_key(|(_, _, l)| (l.pack.0, l.offset));
        let mut start = 0;
        while start < wanted.len() {
            let first = &wanted[start].2;
            let run_start = first.offset;
            let mut run_end = first.offset.saturating_add(u64::from(first.stored_len));
            let mut end = start + 1;
            while let Some((_, _, l)) = wanted.get(end) {
                let l_end = l.offset.saturating_add(u64::from(l.stored_len));
                if l.pack != first.pack
                    || l.offset > run_end.saturating_add(COALESCE_GAP)
                    || l_end.max(run_end) - run_start > COALESCE_MAX
                {
                    break;
                }
                run_end = run_end.max(l_end);
                end += 1;
            }
            let run = &wanted[start..end];
            let fetched = if run.len() > 1 {
                let pname = crate::pack::pack_name(&first.pack);
                usize::try_from(run_end - run_start)
                    .ok()
                    .and_then(|len| self.repo.backend().get_range(&pname, run_start, len).ok())
            } else {
                None
            };
            for (i, id, loc) in run {
                let plain = match &fetched {
                    Some(buf) => {
                        let a = usize::try_from(loc.offset - run_start).expect("within run");
                        let b = a + usize::try_from(loc.stored_len).expect("fits");
                        self.repo.decode_chunk(id, loc, &buf[a..b])?
                    }
                    // One chunk, or the larger read failed: per chunk, so
                    // that an error names exactly the damaged chunk.
                    None => self.repo.read_chunk_at(id, loc)?,
                };
                out[*i] = Some(Arc::new(plain));
            }
            start = end;
        }
        for (i, block) in out.iter().enumerate() {
            let idx = from + u64::try_from(i).expect("fits");
            if let Some(data) = block {
                if u64::try_from(data.len()).ok() != Some(self.block_len(idx)) {
                    return Err(Error::corrupt(
                        format!("snapshot {} disk {}", self.snapshot_id, self.disk.name),
                        format!("block {idx} has the wrong length"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Fill `buf` with the disk's bytes at `offset`. The range must lie
    /// within the disk.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = u64::try_from(buf.len()).expect("fits");
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.disk.size)
        {
            return Err(Error::OutOfRange {
                disk: self.disk.name.clone(),
                offset,
                size: self.disk.size,
            });
        }
        let cs = self.chunk_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + u64::try_from(done).expect("fits");
            let idx = pos / cs;
            let within = usize::try_from(pos % cs).expect("below chunk size");
            let n = (buf.len() - done).min(usize::try_from(cs).expect("fits") - within);
            let out = &mut buf[done..done + n];
            match self.block(idx)? {
                None => out.fill(0),
                Some(data) => out.copy_from_slice(&data[within..within + n]),
            }
            done += n;
        }
        Ok(())
    }

    /// Warm the cache with blocks `from..to` (sequential read-ahead).
    pub fn prefetch(&self, from: u64, to: u64) {
        for idx in from..to.min(self.nchunks()) {
            if let Ok(id) = self.chunk_id(idx) {
                if !id.is_zero() && self.chunks.0.get(&id).is_none() {
                    let _ = self.block(idx);
                }
            }
        }
    }

    /// Data and hole extents covering `[offset, offset+len)`, merged, at
    /// block granularity (clipped to the requested range).
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.disk.size);
        let cs = self.chunk_size();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / cs;
            let block_end = ((idx + 1) * cs).min(end);
            let data = !self.chunk_id(idx)?.is_zero();
            match out.last_mut() {
                Some(last) if last.data == data => last.len += block_end - pos,
                _ => out.push(Extent {
                    offset: pos,
                    len: block_end - pos,
                    data,
                }),
            }
            pos = block_end;
        }
        Ok(out)
    }

    /// Offset of the first data at or after `offset` (SEEK_DATA), if any.
    pub fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        let cs = self.chunk_size();
        let mut idx = offset / cs;
        while idx < self.nchunks() {
            if !self.chunk_id(idx)?.is_zero() {
                return Ok(Some(offset.max(idx * cs)));
            }
            idx += 1;
        }
        Ok(None)
    }

    /// Offset of the first hole at or after `offset` (SEEK_HOLE); the end of
    /// the disk counts as a hole.
    pub fn next_hole(&self, offset: u64) -> Result<u64> {
        let cs = self.chunk_size();
        let mut idx = offset / cs;
        while idx < self.nchunks() {
            if self.chunk_id(idx)?.is_zero() {
                return Ok(offset.max(idx * cs));
            }
            idx += 1;
        }
        Ok(self.disk.size)
    }
}
