//! Helpers shared by the fuzz targets: an unencrypted repository folder to
//! write hostile files into, and ways to get hostile bytes past the
//! authentication tag so that they reach the decoders.
//!
//! In an unencrypted repository (`Keys::clear`) the tag is a keyed BLAKE3
//! over the associated data and the payload; the key is in the config, so
//! anyone who can write the repository can also forge it. The targets do
//! exactly that.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ekko::crypto::{Keys, TAG_LEN};
use ekko::format::{self, HEADER_LEN};
use ekko::LocalBackend;

/// Largest single allocation the targets allow. Without a sanitizer,
/// libFuzzer cannot see allocations (`-malloc_limit_mb` needs its hooks),
/// and a huge `Vec::with_capacity` or `vec![0; n]` costs no memory until
/// touched, so `-rss_limit_mb` misses it too. This allocator makes every
/// allocation above the limit a crash, with a backtrace that says where.
pub const ALLOC_LIMIT: usize = 64 << 20;

pub struct CapAlloc;

fn check_size(size: usize) {
    if size > ALLOC_LIMIT {
        // Small allocations from here on go through as usual.
        let bt = std::backtrace::Backtrace::force_capture();
        eprintln!("==ekko-fuzz== allocation of {size} bytes (limit {ALLOC_LIMIT}) at:\n{bt}");
        std::process::abort();
    }
}

// SAFETY: forwards to the system allocator unchanged, after a size check.
unsafe impl GlobalAlloc for CapAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check_size(layout.size());
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check_size(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check_size(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CapAlloc = CapAlloc;

/// The id key of every fixture repository: fixed, so chunk ids are the same
/// from one run to the next.
pub const ID_KEY: [u8; 32] = [0x5a; 32];
pub const REPO_ID: &str = "0123456789abcdef0123456789abcdef";
/// The id every snapshot target names its manifest by.
pub const SNAP_ID: &str = "00112233445566778899aabbccddeeff";

pub fn keys() -> Keys {
    Keys::clear(ID_KEY)
}

/// A folder private to this process, in memory when /dev/shm exists:
/// `ekko-fuzz/<pid>`. A fuzzer leaves by `exit` or a crash, never dropping
/// statics, so each process first removes the folders of processes gone
/// (fork mode starts hundreds).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.join("ekko-fuzz")
        } else {
            std::env::temp_dir().join("ekko-fuzz")
        };
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let pid = e.file_name();
                if !Path::new("/proc").join(&pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    })
}

/// A valid config file of an unencrypted repository with `ID_KEY`.
pub fn config_file() -> Vec<u8> {
    let mut out = format::header(format::MAGIC_CONFIG, 0).to_vec();
    out.extend_from_slice(
        format!(
            r#"{{"id":"{REPO_ID}","chunk_size":65536,"pack_size":1048576,"compression_level":3,"encryption":"none","id_key":"{}","created":"2026-11-26T00:00:00Z"}}"#,
            hex(&ID_KEY)
        )
        .as_bytes(),
    );
    out
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A repository folder `sub` of the scratch folder, emptied: only `config`.
pub fn fresh_repo(sub: &str) -> (PathBuf, Arc<LocalBackend>) {
    let root = scratch().join(sub);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::write(root.join("config"), config_file()).expect("write config");
    (root.clone(), Arc::new(LocalBackend::new(root)))
}

/// Write `data` as object `name` of the repository at `root` (plain file
/// writes: the fixture needs no durability).
pub fn write_object(root: &Path, name: &str, data: &[u8]) {
    let p = root.join(name);
    std::fs::create_dir_all(p.parent().expect("has a parent")).expect("mkdir");
    std::fs::write(p, data).expect("write object");
}

/// How a target turns its input into a whole-file object (index, snapshot,
/// lock, GC mark, protect object).
#[derive(Clone, Copy, Debug)]
pub enum Framing {
    /// The input is the file, as is: tests the framing before and at
    /// authentication.
    Raw,
    /// The input is the file, but its 16-byte tag (bytes 16..32) is
    /// recomputed so that the rest reaches decompression and the decoder.
    FixTag,
    /// The input is the plaintext body: header, zstd and tag are made
    /// as `seal_file` makes them.
    Seal,
}

impl Framing {
    pub fn from_byte(b: u8) -> Framing {
        match b % 3 {
            0 => Framing::Raw,
            1 => Framing::FixTag,
            _ => Framing::Seal,
        }
    }

    /// The file to store under `name`.
    pub fn frame(self, keys: &Keys, magic: &[u8; 8], name: &str, input: &[u8]) -> Vec<u8> {
        match self {
            Framing::Raw => input.to_vec(),
            Framing::FixTag => fix_file_tag(keys, name, input),
            Framing::Seal => format::seal_file(keys, magic, name, input),
        }
    }
}

/// Recompute the tag of a whole-file object (AD = header, name) in place.
pub fn fix_file_tag(keys: &Keys, name: &str, file: &[u8]) -> Vec<u8> {
    if file.len() < HEADER_LEN + TAG_LEN {
        return file.to_vec();
    }
    let (h, rest) = file.split_at(HEADER_LEN);
    let sealed = keys.seal(&[h, name.as_bytes()], &rest[TAG_LEN..]);
    let mut out = h.to_vec();
    out.extend_from_slice(&sealed);
    out
}

/// A repository with a few real chunks in one pack: data chunks (compressed
/// and not, full and short) and map nodes of several shapes, for the targets
/// that read through block maps and the index.
pub struct Fixture {
    pub root: PathBuf,
    pub pack: ekko::ObjectId,
    /// The pack file as written.
    pub pack_bytes: Vec<u8>,
    /// Every chunk, with where it lives.
    pub chunks: Vec<(ekko::ChunkId, format::Location)>,
    /// Candidate map roots: ZERO, a data chunk, leaves and inner nodes of
    /// several shapes, and an id that is in no pack.
    pub roots: Vec<ekko::ChunkId>,
}

fn text(n: usize, salt: u8) -> Vec<u8> {
    b"ekko fuzz fixture: some text that compresses well. "
        .iter()
        .cycle()
        .take(n)
        .map(|b| b.wrapping_add(salt))
        .collect()
}

fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

impl Fixture {
    /// Build it in the scratch folder `sub`. With `index`, its index file
    /// is written too; without, the folder has only config and the pack.
    pub fn build(sub: &str, index: bool) -> Fixture {
        use ekko::format::ChunkKind::{Data, Map};
        use ekko::ChunkId;
        let (root, backend) = fresh_repo(sub);
        let backend: Arc<dyn ekko::Backend> = backend;
        let repo = ekko::Repository::open_with_cache(backend.clone(), || Ok(Vec::new()), false)
            .expect("open the fixture");
        let mut pw = ekko::pack::PackWriter::create(backend.as_ref()).expect("a pack");
        let mut add = |kind, plain: &[u8]| -> ChunkId {
            let c = repo.encode_chunk(kind, plain);
            pw.add(&c).expect("add a chunk");
            c.id
        };
        let d_text = add(Data, &text(4096, 0));
        let d_rand = add(Data, &noise(4096));
        let d_short = add(Data, &text(100, 1));
        let _d_big = add(Data, &text(8192, 2));
        let node = |ids: &[ChunkId]| format::encode_map_node(ids);
        let leaf1 = add(Map, &node(&[d_text, d_rand, ChunkId::ZERO, d_short]));
        let leaf_full = add(Map, &node(&[d_text; 256]));
        let leaf_long = add(Map, &node(&[d_rand; 300]));
        let leaf_empty = add(Map, &[]);
        let leaf_odd = add(Map, &[1u8; 33]);
        let leaf_of_maps = add(Map, &node(&[leaf1, leaf_full]));
        let root2 = add(Map, &node(&[leaf1, ChunkId::ZERO, leaf_full]));
        let root3 = add(Map, &node(&[root2, root2, ChunkId::ZERO, leaf_of_maps]));
        let pack = pw.id();
        let chunks = pw.finish(repo.keys()).expect("finish the pack");
        if index {
            repo.index().add_pending(chunks.clone());
            repo.index()
                .flush(backend.as_ref(), repo.keys())
                .expect("flush");
        }
        let pack_bytes = std::fs::read(root.join(ekko::pack::pack_name(&pack))).expect("pack");
        Fixture {
            root,
            pack,
            pack_bytes,
            chunks,
            roots: vec![
                ChunkId::ZERO,
                d_text,
                leaf1,
                leaf_full,
                leaf_long,
                leaf_empty,
                leaf_odd,
                leaf_of_maps,
                root2,
                root3,
                ChunkId([7; 32]),
            ],
        }
    }
}
