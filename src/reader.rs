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
use crate::id::{ChunkId, ObjectId};
use crate::repo::Repository;
use crate::snapshot::{Disk, Snapshot};

/// Chunks of one pack this close together are fetched with one read.
const COALESCE_GAP: u64 = 256 << 10;

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

/// A decoded block, as `DiskReader::decode_run` hands it over: bytes
/// already decoded (a chunk that several blocks share, or one read
/// alone), or a chunk opened and not yet decompressed.
pub enum Plain<'a> {
    Bytes(&'a [u8]),
    Opened(
        &'a crate::chunk::Opened<'a>,
        &'a mut crate::chunk::Decompressor,
    ),
}

impl Plain<'_> {
    /// The block's length.
    pub fn len(&self) -> usize {
        match self {
            Plain::Bytes(b) => b.len(),
            Plain::Opened(o, _) => o.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write the block's bytes to `out`, which is `len()` bytes long.
    pub fn write_to(self, out: &mut [u8]) -> Result<()> {
        match self {
            Plain::Bytes(b) => {
                out.copy_from_slice(b);
                Ok(())
            }
            Plain::Opened(o, dec) => dec.into_slice(o, out),
        }
    }

    /// Call `f` with the block's bytes (decompressing into a new buffer
    /// if need be).
    pub fn with_bytes<T>(self, f: impl FnOnce(&[u8]) -> Result<T>) -> Result<T> {
        match self {
            Plain::Bytes(b) => f(b),
            Plain::Opened(o, dec) => f(&dec.to_vec(o)?),
        }
    }
}

/// Neighbouring chunks of one pack, fetched with one ranged read, and the
/// blocks of the disk they fill. See `DiskReader::plan`.
pub struct PackRun {
    pack: ObjectId,
    /// Byte range of the pack: from the first chunk to the end of the last.
    start: u64,
    end: u64,
    blocks: Vec<(u64, ChunkId, format::Location)>,
}

impl PackRun {
    /// Bytes fetched by one read of this run.
    pub fn fetch_len(&self) -> u64 {
        self.end - self.start
    }

    /// The disk blocks this run fills, in pack order.
    pub fn block_indices(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks.iter().map(|(idx, _, _)| *idx)
    }
}

/// Blocks of a range of a disk: data in pack runs, and holes.
pub struct ReadPlan {
    pub runs: Vec<PackRun>,
    pub holes: Vec<u64>,
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

    /// The chunk id of block `idx`, and how many blocks from `idx` on are
    /// the same (see `blockmap::lookup_run`): scans step over whole holes.
    fn chunk_run(&self, idx: u64) -> Result<(ChunkId, u64)> {
        blockmap::lookup_run(&self.nodes(), &self.disk.map, idx)
    }

    /// Length of block `idx` (the last one may be short).
    pub fn block_len(&self, idx: u64) -> u64 {
        let cs = self.chunk_size();
        cs.min(self.disk.size.saturating_sub(idx.saturating_mul(cs)))
    }

    /// Block `idx` decoded, or `None` for a hole.
    pub fn block(&self, idx: u64) -> Result<Option<Arc<Vec<u8>>>> {
        let id = self.chunk_id(idx)?;
        if id.is_zero() {
            return Ok(None);
        }
        let data = self
            .chunks
            .0
            .get_or_insert_with(&id, || self.repo.read_chunk(&id).map(Arc::new))?;
        self.check_len(idx, data.len())?;
        Ok(Some(data))
    }

    /// A decoded block must be exactly as long as the disk says.
    fn check_len(&self, idx: u64, len: usize) -> Result<()> {
        if u64::try_from(len).ok() != Some(self.block_len(idx)) {
            return Err(Error::corrupt(
                format!("snapshot {} disk {}", self.snapshot_id, self.disk.name),
                format!("block {idx} has the wrong length"),
            ));
        }
        Ok(())
    }

    /// True when the repository's store answers few large reads much
    /// faster than many small ones (an object store).
    pub fn prefers_large_reads(&self) -> bool {
        self.repo.backend().prefers_large_reads()
    }

    /// Plan the reads of blocks `from..to`: holes, and data blocks grouped
    /// into runs of neighbouring chunks of one pack, each fetched with one
    /// ranged read of at most `max_run` bytes. On an object store a request
    /// costs far more than its bytes, and a restore reads mostly neighbours.
    /// The chunk cache is bypassed (a one-pass reader would only churn it).
    pub fn plan(&self, from: u64, to: u64, max_run: u64) -> Result<ReadPlan> {
        let to = to.min(self.nchunks());
        let mut holes = Vec::new();
        let mut wanted: Vec<(u64, ChunkId, format::Location)> = Vec::new();
        for idx in from..to {
            let id = self.chunk_id(idx)?;
            if id.is_zero() {
                holes.push(idx);
                continue;
            }
            let loc = self.repo.index().lookup_referenced(&id)?;
            wanted.push((idx, id, loc));
        }
        wanted.sort_by_key(|(_, _, l)| (l.pack.0, l.offset));
        let mut runs: Vec<PackRun> = Vec::new();
        for (idx, id, loc) in wanted {
            let l_end = loc.offset.saturating_add(u64::from(loc.stored_len));
            if let Some(run) = runs.last_mut() {
                if run.pack == loc.pack
                    && loc.offset <= run.end.saturating_add(COALESCE_GAP)
                    && l_end.max(run.end) - run.start <= max_run
                {
                    run.end = run.end.max(l_end);
                    run.blocks.push((idx, id, loc));
                    continue;
                }
            }
            runs.push(PackRun {
                pack: loc.pack,
                start: loc.offset,
                end: l_end,
                blocks: vec![(idx, id, loc)],
            });
        }
        Ok(ReadPlan { runs, holes })
    }

    /// The stored bytes of `run` in one ranged read, or `None` when the read
    /// failed: `decode_run` then reads chunk by chunk, so that an error
    /// names exactly the damaged chunk.
    pub fn fetch_run(&self, run: &PackRun) -> Option<Vec<u8>> {
        let len = usize::try_from(run.end - run.start).ok()?;
        self.repo
            .backend()
            .get_range(&crate::pack::pack_name(&run.pack), run.start, len)
            .ok()
    }

    /// Decode the blocks of `run` from `fetched` (see `fetch_run`), handing
    /// each to `each` with its block index. Chunks are opened in place,
    /// several at a time, which is faster than one by one (see `siv`); a
    /// block is decompressed only when `each` asks for its bytes, so that
    /// it can go straight into the caller's buffer.
    pub fn decode_run(
        &self,
        run: &PackRun,
        fetched: Option<&mut [u8]>,
        mut each: impl FnMut(u64, Plain<'_>) -> Result<()>,
    ) -> Result<()> {
        let pname = crate::pack::pack_name(&run.pack);
        // Blocks that hold the same chunk are neighbours (the run is sorted
        // by offset): decode each chunk once, for all its blocks.
        let chunks: Vec<_> = run
            .blocks
            .chunk_by(|a, b| a.2.offset == b.2.offset)
            .collect();
        let mut cutter = crate::chunk::Cutter::new(fetched.unwrap_or_default(), run.start);
        let mut dec = crate::chunk::Decompressor::default();
        for group in chunks.chunks(crate::siv::GROUP) {
            // Cut each chunk's sealed bytes from the fetched run; `None` if
            // the run was not fetched or does not hold them.
            let sealed: Vec<Option<&mut [u8]>> = group
                .iter()
                .map(|blocks| cutter.cut(blocks[0].2.offset, blocks[0].2.stored_len))
                .collect();
            let have: Vec<bool> = sealed.iter().map(Option::is_some).collect();
            let blobs: Vec<_> = group
                .iter()
                .zip(sealed)
                .filter_map(|(blocks, s)| Some((&blocks[0].1, &blocks[0].2, s?)))
                .collect();
            let mut opened = crate::chunk::open_many(self.repo.keys(), &pname, blobs).into_iter();
            for (blocks, have) in group.iter().zip(have) {
                let (_, id, loc) = &blocks[0];
                let plain = if have {
                    let o = opened.next().expect("one per fetched blob")?;
                    if let [(idx, _, _)] = blocks {
                        // The usual case: one block for the chunk.
                        self.check_len(*idx, o.len())?;
                        each(*idx, Plain::Opened(&o, &mut dec))?;
                        continue;
                    }
                    dec.to_vec(&o)?
                } else {
                    // Not fetched: read it alone, so that an error names it
                    // (and, if a prune deleted its pack meanwhile, where a
                    // fresh index places it).
                    self.repo.read_chunk_from(id, loc)?
                };
                for (idx, _, _) in blocks.iter() {
                    self.check_len(*idx, plain.len())?;
                    each(*idx, Plain::Bytes(&plain))?;
                }
            }
        }
        Ok(())
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
            let (id, run) = self.chunk_run(idx)?;
            let block_end = idx.saturating_add(run).saturating_mul(cs).min(end);
            let data = !id.is_zero();
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
            let (id, run) = self.chunk_run(idx)?;
            if !id.is_zero() {
                return Ok(Some(offset.max(idx * cs)));
            }
            idx = idx.saturating_add(run);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, LocalBackend};
    use crate::blockmap::MapRef;
    use crate::repo::InitOptions;
    use crate::snapshot::{Capture, CaptureMode, DiskStats};

    /// A hostile (or just enormous) manifest: a disk of 1.8 EB that is one
    /// hole. Found by the fuzz/disk_read target once map depths were
    /// checked (these are its numbers): SEEK_DATA, and the extent scan
    /// behind a FUSE `stat`, went block by block, 10^14 lookups.
    #[test]
    fn scans_step_over_a_hole_of_any_size() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path().join("repo")));
        let opts = InitOptions {
            encrypt: false,
            ..InitOptions::default()
        };
        Repository::init(backend.clone(), &opts, None).unwrap();
        let repo =
            Arc::new(Repository::open_with_cache(backend, || Ok(Vec::new()), false).unwrap());
        let size = 1_873_497_444_986_185_002;
        let disk = Disk {
            name: "d".into(),
            size,
            chunk_size: 4096,
            map: MapRef {
                root: ChunkId::ZERO,
                depth: blockmap::depth_for(size.div_ceil(4096)),
                fanout: 256,
            },
            source: "test".into(),
            capture: Capture {
                mode: CaptureMode::Full,
                bitmap: None,
                next_bitmap: None,
                reason: None,
            },
            stats: DiskStats::default(),
        };
        let snap = Snapshot {
            id: "00".repeat(16),
            vm: "vm".into(),
            time: "2026-11-26T00:00:00Z".into(),
            parent: None,
            host: "h".into(),
            disks: vec![disk],
            ekko_version: "0".into(),
            domain: None,
            tags: Vec::new(),
        };
        let r = DiskReader::open(repo, &snap, "d").unwrap();
        assert_eq!(r.disk().map.depth, 7);
        assert_eq!(r.next_data(0).unwrap(), None);
        assert_eq!(r.next_data(357_880_255_315).unwrap(), None);
        assert_eq!(r.next_data(size - 1).unwrap(), None);
        assert_eq!(r.next_hole(12345).unwrap(), 12345);
        let all = Extent {
            offset: 0,
            len: size,
            data: false,
        };
        assert_eq!(r.extents(0, u64::MAX).unwrap(), vec![all]);
        assert_eq!(
            r.extents(100, 5000).unwrap(),
            vec![Extent {
                offset: 100,
                len: 5000,
                data: false
            }]
        );
    }
}
