//! Whole-file objects read through the public API, from a local-folder
//! repository: snapshot manifests, index files, locks, GC marks and protect
//! objects.
//!
//! Input: one selector byte, then the bytes. The selector picks the kind
//! (`b % 5`) and the framing (`(b / 16) % 3`, see `ekko_fuzz::Framing`):
//! the file as is, the file with its tag fixed, or a plaintext body sealed
//! as ekko seals it.
#![no_main]

use std::collections::HashSet;
use std::time::SystemTime;

use ekko::format;
use ekko::{gc, index, lock, snapshot};
use ekko_fuzz::{fresh_repo, keys, write_object, Framing, SNAP_ID};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let framing = Framing::from_byte(sel / 16);
    let keys = keys();
    let (root, backend) = fresh_repo("sealed");
    let backend = backend.as_ref();
    match sel % 5 {
        0 => {
            let name = snapshot::snapshot_name(SNAP_ID);
            let file = framing.frame(&keys, format::MAGIC_SNAPSHOT, &name, input);
            write_object(&root, &name, &file);
            if let Ok(s) = snapshot::load(backend, &keys, SNAP_ID) {
                let _ = s.short_id();
                for d in &s.disks {
                    let _ = d.nchunks();
                    let _ = s.disk(&d.name);
                }
                let _ = serde_json::to_vec(&s).expect("a loaded manifest serializes");
            }
            let _ = snapshot::load_all(backend, &keys);
            let _ = snapshot::resolve(backend, &keys, &SNAP_ID[..6]);
            let _ = snapshot::resolve(backend, &keys, "vm@latest");
        }
        1 => {
            let name = "index/00000000000000000000000000000001";
            let file = framing.frame(&keys, format::MAGIC_INDEX, name, input);
            write_object(&root, name, &file);
            if let Ok(entries) = index::read_index_file(backend, &keys, name) {
                let idx = index::Index::open(backend, &keys, None).expect("it read before");
                for (id, loc) in entries.iter().rev().take(8) {
                    // The last entry for an id wins.
                    let _ = loc;
                    assert!(idx.lookup(id).unwrap().is_some());
                }
            }
        }
        2 => {
            let name = "locks/00000000000000000000000000000002";
            let file = framing.frame(&keys, format::MAGIC_LOCK, name, input);
            write_object(&root, name, &file);
            if let Ok(found) = lock::list(backend, &keys) {
                for f in found {
                    let _ = f.stale(SystemTime::now());
                    let _ = f.holder();
                }
            }
        }
        3 => {
            let name = "gc/00000000000000000000000000000003";
            let file = framing.frame(&keys, format::MAGIC_GC_MARK, name, input);
            write_object(&root, name, &file);
            if let Ok((marks, _bad)) = gc::read_marks(backend, &keys) {
                for m in marks {
                    let _ = m.mark.backup_bound();
                    let _ = m.mark.pack_ids().count();
                    let _ = gc::validate_grace(m.mark.grace(), m.mark.skew());
                }
            }
        }
        _ => {
            let name = format!("protect/{SNAP_ID}");
            let file = framing.frame(&keys, format::MAGIC_PROTECT, &name, input);
            write_object(&root, &name, &file);
            let _ = gc::read_protection(backend, &keys, &name);
            let ids: HashSet<String> = gc::protected_ids(backend).unwrap_or_default();
            let _ = ids;
        }
    }
});
