//! Reading a disk whose manifest is hostile: size, chunk size, map root and
//! depth from the input, against a repository of real chunks and map nodes
//! of several shapes (short, long, empty, odd-sized, maps where data should
//! be, ids in no pack). The manifest goes through `snapshot::load`, so only
//! what load accepts is read; then the reads FUSE, NBD, restore, check,
//! prune and incremental backups do.
#![no_main]

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use ekko::blockmap::{self, MapRef};
use ekko::format;
use ekko::reader::RepoNodes;
use ekko::snapshot::{self, Capture, CaptureMode, Disk, DiskStats, Snapshot};
use ekko::{capture, gc, Backend, ChunkCache, DiskReader, NodeCache, Repository};
use ekko_fuzz::{write_object, Fixture, SNAP_ID};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    ReadAt { offset: u64, len: u16 },
    Extents { offset: u64, len: u32 },
    NextData(u64),
    NextHole(u64),
    Plan { from: u64, n: u16, max_run: u32 },
    Prefetch { from: u64, n: u8 },
    LeafIds,
    WalkMap,
    CheckParent,
}

#[derive(Arbitrary, Debug)]
struct Input {
    root: u8,
    depth: u8,
    size: u64,
    small: bool,
    cs_shift: u8,
    ops: Vec<Op>,
}

fn live_disk(d: &Disk) -> bool {
    d.size <= 1 << 40 && (64 << 10..=4 << 20).contains(&d.chunk_size)
}

struct Fx {
    f: Fixture,
    repo: Arc<Repository>,
}

fn fx() -> &'static Fx {
    static F: OnceLock<Fx> = OnceLock::new();
    F.get_or_init(|| {
        let f = Fixture::build("disk_read", true);
        let backend: Arc<dyn Backend> = Arc::new(ekko::LocalBackend::new(&f.root));
        let repo =
            Arc::new(Repository::open_with_cache(backend, || Ok(Vec::new()), false).expect("open"));
        Fx { f, repo }
    })
}

fuzz_target!(|input: Input| {
    let Fx { f, repo } = fx();
    let size = if input.small {
        input.size % (1 << 22)
    } else {
        input.size
    };
    let disk = Disk {
        name: "d".into(),
        size,
        chunk_size: 4096u32 << (input.cs_shift % 11),
        map: MapRef {
            root: f.roots[usize::from(input.root) % f.roots.len()],
            depth: input.depth,
            fanout: 256,
        },
        source: "fuzz".into(),
        capture: Capture {
            mode: CaptureMode::Full,
            bitmap: None,
            next_bitmap: None,
            reason: None,
        },
        stats: DiskStats::default(),
    };
    let snap = Snapshot {
        id: SNAP_ID.into(),
        vm: "vm".into(),
        time: "2026-11-26T00:00:00Z".into(),
        parent: None,
        host: "h".into(),
        disks: vec![disk],
        ekko_version: "0".into(),
        domain: None,
    };
    // Through load, as a manifest: only what it accepts is read.
    let name = snapshot::snapshot_name(SNAP_ID);
    let body = serde_json::to_vec(&snap).unwrap();
    write_object(
        &f.root,
        &name,
        &format::seal_file(repo.keys(), format::MAGIC_SNAPSHOT, &name, &body),
    );
    let Ok(snap) = snapshot::load(repo.backend().as_ref(), repo.keys(), SNAP_ID) else {
        return;
    };
    let disk = &snap.disks[0];
    let nodes = Arc::new(NodeCache::new(64));
    let chunks = Arc::new(ChunkCache::new(1 << 20));
    let reader = DiskReader::new(repo.clone(), &snap, "d", nodes.clone(), chunks).unwrap();
    for op in input.ops.iter().take(8) {
        match *op {
            Op::ReadAt { offset, len } => {
                let mut buf = vec![0u8; usize::from(len)];
                let _ = reader.read_at(&mut buf, offset);
            }
            Op::Extents { offset, len } => {
                if let Ok(ext) = reader.extents(offset, u64::from(len)) {
                    let total: u64 = ext.iter().map(|e| e.len).sum();
                    assert!(total <= u64::from(len));
                }
            }
            Op::NextData(o) => {
                let _ = reader.next_data(o);
            }
            Op::NextHole(o) => {
                let _ = reader.next_hole(o);
            }
            Op::Plan { from, n, max_run } => {
                if let Ok(plan) =
                    reader.plan(from, from.saturating_add(u64::from(n)), u64::from(max_run))
                {
                    for run in &plan.runs {
                        let mut fetched = reader.fetch_run(run);
                        let _ = reader.decode_run(run, fetched.as_deref_mut(), |_, _| Ok(()));
                    }
                }
            }
            Op::Prefetch { from, n } => reader.prefetch(from, from.saturating_add(u64::from(n))),
            // Backups compare the parent's size and chunk size with the
            // live disk and the config before they read its leaves, so
            // these see only what a real disk can be (here: up to 1 TiB).
            Op::LeafIds | Op::CheckParent if !live_disk(disk) => {}
            Op::LeafIds => {
                let src = RepoNodes {
                    repo,
                    cache: &nodes,
                };
                let _ = blockmap::leaf_ids(&src, &disk.map, disk.nchunks());
            }
            Op::WalkMap => {
                let mut seen = HashSet::new();
                let _ = gc::walk_map(repo, &disk.map, &mut seen, &mut |_, _| Ok(()));
            }
            Op::CheckParent => {
                let _ = capture::check_parent_map(repo, disk);
            }
        }
    }
});
