//! Reading chunks through a hostile index file: `Repository::read_chunk`
//! and `read_chunk_at` with locations (offset, stored and raw length, kind,
//! compression) that the index file says, against a real pack.
//!
//! The input describes index entries relative to the real ones, so that the
//! fuzzer can reach both "nearly right" and absurd locations; the index file
//! is then encoded and sealed as ekko writes it (its decoding is the
//! `decoders` and `sealed_files` targets' job). Optionally some bytes of
//! the pack are flipped.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use ekko::format::{self, ChunkKind, Location};
use ekko::id::{ChunkId, ObjectId};
use ekko::{index, pack, Backend, Repository};
use ekko_fuzz::{keys, write_object, Fixture};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum N64 {
    Same,
    Add(i16),
    Set(u64),
}

#[derive(Arbitrary, Debug)]
enum N32 {
    Same,
    Add(i16),
    Set(u32),
}

#[derive(Arbitrary, Debug)]
struct Entry {
    chunk: u8,
    other_pack: bool,
    offset: N64,
    stored: N32,
    raw: N32,
    flip_kind: bool,
    flip_compressed: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    entries: Vec<Entry>,
    flips: Vec<(u16, u8)>,
}

fn n64(base: u64, n: &N64) -> u64 {
    match *n {
        N64::Same => base,
        N64::Add(d) => base.wrapping_add_signed(i64::from(d)),
        N64::Set(v) => v,
    }
}

fn n32(base: u32, n: &N32) -> u32 {
    match *n {
        N32::Same => base,
        N32::Add(d) => base.wrapping_add_signed(i32::from(d)),
        N32::Set(v) => v,
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture::build("chunk_read", false))
}

fuzz_target!(|input: Input| {
    let f = fixture();
    let keys = keys();
    let entries: Vec<(ChunkId, Location)> = input
        .entries
        .iter()
        .take(16)
        .map(|e| {
            let (id, l) = f.chunks[usize::from(e.chunk) % f.chunks.len()];
            let id = if e.chunk >= 200 {
                ChunkId([e.chunk; 32])
            } else {
                id
            };
            let kind = match (l.kind, e.flip_kind) {
                (k, false) => k,
                (ChunkKind::Data, true) => ChunkKind::Map,
                (ChunkKind::Map, true) => ChunkKind::Data,
            };
            (
                id,
                Location {
                    pack: if e.other_pack {
                        ObjectId([0xee; 16])
                    } else {
                        f.pack
                    },
                    offset: n64(l.offset, &e.offset),
                    stored_len: n32(l.stored_len, &e.stored),
                    raw_len: n32(l.raw_len, &e.raw),
                    kind,
                    compressed: l.compressed ^ e.flip_compressed,
                },
            )
        })
        .collect();
    let name = index::index_name(&ObjectId([1; 16]));
    let _ = std::fs::remove_dir_all(f.root.join("index"));
    write_object(
        &f.root,
        &name,
        &format::seal_file(
            &keys,
            format::MAGIC_INDEX,
            &name,
            &format::encode_index(&entries),
        ),
    );
    let mut pack_bytes = f.pack_bytes.clone();
    for (at, x) in input.flips.iter().take(8) {
        let i = usize::from(*at) % pack_bytes.len();
        pack_bytes[i] ^= x;
    }
    write_object(&f.root, &pack::pack_name(&f.pack), &pack_bytes);

    let backend: Arc<dyn Backend> = Arc::new(ekko::LocalBackend::new(&f.root));
    // The index file may be refused as a whole.
    let Ok(repo) = Repository::open_with_cache(backend, || Ok(Vec::new()), false) else {
        return;
    };
    for (id, loc) in &entries {
        if let Ok(plain) = repo.read_chunk(id) {
            // What reads is as long as the index says.
            let raw = repo.index().lookup(id).unwrap().unwrap().raw_len;
            assert_eq!(u64::try_from(plain.len()).unwrap(), u64::from(raw));
        }
        let _ = repo.read_chunk_at(id, loc);
    }
});
