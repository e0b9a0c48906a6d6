//! On-disk structures, encoded and decoded without I/O.
//!
//! `docs/FORMAT.md` specifies every byte. All integers are little-endian.
//! Every file starts with an 8-byte magic and a version, so a reader can tell
//! what it holds and refuse what it does not understand.

use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::{ChunkId, ObjectId};

pub const MAGIC_CONFIG: &[u8; 8] = b"EKKOCONF";
pub const MAGIC_KEY: &[u8; 8] = b"EKKOKEYF";
pub const MAGIC_PACK: &[u8; 8] = b"EKKOPACK";
pub const MAGIC_PACK_END: &[u8; 8] = b"EKKOPEND";
pub const MAGIC_INDEX: &[u8; 8] = b"EKKOINDX";
pub const MAGIC_SNAPSHOT: &[u8; 8] = b"EKKOSNAP";
pub const MAGIC_LOCK: &[u8; 8] = b"EKKOLOCK";
pub const MAGIC_GC_MARK: &[u8; 8] = b"EKKOGCMK";
pub const MAGIC_PROTECT: &[u8; 8] = b"EKKOPROT";
pub const MAGIC_LOST: &[u8; 8] = b"EKKOLOST";

/// Version written by this build, for every file kind.
pub const VERSION: u16 = 1;

/// Every file starts with this 16-byte header.
pub const HEADER_LEN: usize = 16;
/// The fixed footer at the end of a pack.
pub const PACK_FOOTER_LEN: usize = 16;
/// One chunk entry in a pack trailer.
pub const PACK_ENTRY_LEN: usize = 56;
/// One chunk entry in an index file.
pub const INDEX_ENTRY_LEN: usize = 72;

const _: () = assert!(PACK_ENTRY_LEN == 32 + 8 + 4 + 4 + 1 + 1 + 6);
const _: () = assert!(INDEX_ENTRY_LEN == 32 + 16 + PACK_ENTRY_LEN - 32);

/// Flags of the header's `flags` byte.
pub const FLAG_ZSTD: u8 = 1;

/// Largest plaintext of any chunk: a data chunk holds at most one block of
/// the largest chunk size, a map node at most 256 ids (8 KiB).
pub const MAX_RAW_LEN: u32 = crate::repo::MAX_CHUNK_SIZE;
/// Largest stored blob: a plaintext that zstd did not shrink, and its tag.
pub const MAX_STORED_LEN: u32 = MAX_RAW_LEN + 16;
const _: () = assert!(crate::crypto::TAG_LEN == 16);

/// What a stored chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// A block of disk data.
    Data = 0,
    /// A node of a block map tree.
    Map = 1,
}

impl ChunkKind {
    fn from_u8(b: u8) -> Option<ChunkKind> {
        match b {
            0 => Some(ChunkKind::Data),
            1 => Some(ChunkKind::Map),
            _ => None,
        }
    }

    pub fn tag(self) -> &'static [u8] {
        match self {
            ChunkKind::Data => b"data",
            ChunkKind::Map => b"map",
        }
    }
}

/// Where one chunk lives inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobEntry {
    pub id: ChunkId,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub kind: ChunkKind,
    pub compressed: bool,
}

impl BlobEntry {
    /// This chunk's location, in pack `pack`.
    pub fn located_in(&self, pack: ObjectId) -> Location {
        Location {
            pack,
            offset: self.offset,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            kind: self.kind,
            compressed: self.compressed,
        }
    }
}

/// Where one chunk lives in the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: ObjectId,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub kind: ChunkKind,
    pub compressed: bool,
}

pub fn header(magic: &[u8; 8], flags: u8) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10] = flags;
    h
}

/// Check a header; returns its flags byte.
pub fn check_header(name: &str, data: &[u8], magic: &[u8; 8], what: &'static str) -> Result<u8> {
    if data.len() < HEADER_LEN {
        return Err(Error::corrupt(
            name,
            format!("{} bytes long, shorter than a header", data.len()),
        ));
    }
    if &data[..8] != magic {
        return Err(Error::corrupt(
            name,
            format!(
                "not a {what} file (magic {:?})",
                String::from_utf8_lossy(&data[..8])
            ),
        ));
    }
    let version = u16::from_le_bytes([data[8], data[9]]);
    if version != VERSION {
        return Err(Error::UnsupportedVersion {
            name: name.to_string(),
            what,
            version: u32::from(version),
            supported: u32::from(VERSION),
        });
    }
    if data[11..HEADER_LEN].iter().any(|b| *b != 0) {
        return Err(Error::corrupt(
            name,
            "header damaged: its reserved bytes are not zero",
        ));
    }
    Ok(data[10])
}

/// Seal a whole-file payload (index, snapshot, lock): header, then the
/// zstd-compressed body sealed with the header and object name as
/// associated data.
pub fn seal_file(keys: &Keys, magic: &[u8; 8], name: &str, body: &[u8]) -> Vec<u8> {
    let h = header(magic, FLAG_ZSTD);
    let compressed = zstd::bulk::compress(body, 3).expect("zstd compress into a Vec");
    let sealed = keys.seal(&[&h, name.as_bytes()], &compressed);
    let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
    out.extend_from_slice(&h);
    out.extend_from_slice(&sealed);
    out
}

/// Largest decompressed metadata file we accept, against decompression bombs.
const MAX_FILE_BODY: usize = 1 << 30;

pub fn open_file(
    keys: &Keys,
    magic: &[u8; 8],
    what: &'static str,
    name: &str,
    data: &[u8],
) -> Result<Vec<u8>> {
    let flags = match check_header(name, data, magic, what) {
        // The header is sealed with the body: a file a newer ekko wrote
        // opens, one whose version bytes were damaged does not.
        Err(e @ Error::UnsupportedVersion { .. }) => {
            let (h, sealed) = data.split_at(HEADER_LEN);
            return Err(match keys.open(&[h, name.as_bytes()], sealed) {
                Some(_) => e,
                None => Error::corrupt(
                    name,
                    "its header names an unknown format version, and the file does not authenticate: the header is damaged",
                ),
            });
        }
        r => r?,
    };
    let (h, sealed) = data.split_at(HEADER_LEN);
    let plain = keys.open(&[h, name.as_bytes()], sealed).ok_or_else(|| {
        Error::corrupt(
            name,
            "authentication failed: the file was modified, truncated or belongs to another repository",
        )
    })?;
    if flags & FLAG_ZSTD != 0 {
        decompress(name, &plain, MAX_FILE_BODY)
    } else {
        Ok(plain)
    }
}

/// Decompress `data`, refusing more than `max` bytes of output. Memory
/// grows with the output: a bulk decompression reserves `max` up front
/// whenever the input does not record its size, and a hostile file of a
/// few bytes then cost a 1 GiB reservation (found by fuzz/sealed_files).
pub fn decompress(name: &str, data: &[u8], max: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let zstd_err = |e: std::io::Error| Error::corrupt(name, format!("zstd: {e}"));
    let d = zstd::stream::read::Decoder::with_buffer(data).map_err(zstd_err)?;
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    d.take(limit).read_to_end(&mut out).map_err(zstd_err)?;
    if out.len() > max {
        return Err(Error::corrupt(
            name,
            format!("decompresses to more than {max} bytes"),
        ));
    }
    Ok(out)
}

// ---- little-endian field helpers -------------------------------------------

pub(crate) struct Reader<'a> {
    name: &'a str,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(name: &'a str, data: &'a [u8]) -> Self {
        Reader { name, data, pos: 0 }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| Error::corrupt(self.name, "truncated record"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
}

fn put_entry_tail(
    out: &mut Vec<u8>,
    e_offset: u64,
    stored: u32,
    raw: u32,
    kind: ChunkKind,
    comp: bool,
) {
    out.extend_from_slice(&e_offset.to_le_bytes());
    out.extend_from_slice(&stored.to_le_bytes());
    out.extend_from_slice(&raw.to_le_bytes());
    out.push(kind as u8);
    out.push(u8::from(comp));
    out.extend_from_slice(&[0u8; 6]);
}

fn get_entry_tail(r: &mut Reader<'_>) -> Result<(u64, u32, u32, ChunkKind, bool)> {
    let offset = r.u64()?;
    let stored = r.u32()?;
    let raw = r.u32()?;
    // Readers allocate these lengths: refuse what no chunk can be, rather
    // than allocate up to 4 GiB on the word of a damaged file.
    if stored > MAX_STORED_LEN || raw > MAX_RAW_LEN {
        return Err(Error::corrupt(
            r.name,
            format!("chunk lengths out of range (stored {stored}, raw {raw})"),
        ));
    }
    let kind =
        ChunkKind::from_u8(r.u8()?).ok_or_else(|| Error::corrupt(r.name, "unknown chunk kind"))?;
    let comp = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(Error::corrupt(r.name, "unknown compression")),
    };
    r.bytes(6)?;
    Ok((offset, stored, raw, kind, comp))
}

/// Encode a pack trailer body: count, reserved, entries.
pub fn encode_pack_trailer(entries: &[BlobEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + entries.len() * PACK_ENTRY_LEN);
    let n = u32::try_from(entries.len()).expect("packs hold far fewer than 2^32 chunks");
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    for e in entries {
        out.extend_from_slice(&e.id.0);
        put_entry_tail(
            &mut out,
            e.offset,
            e.stored_len,
            e.raw_len,
            e.kind,
            e.compressed,
        );
    }
    out
}

pub fn decode_pack_trailer(name: &str, body: &[u8]) -> Result<Vec<BlobEntry>> {
    let mut r = Reader::new(name, body);
    let n = usize::try_from(r.u32()?).map_err(|_| Error::corrupt(name, "entry count"))?;
    r.bytes(4)?;
    if r.remaining() != n.saturating_mul(PACK_ENTRY_LEN) {
        return Err(Error::corrupt(
            name,
            "trailer length does not match its entry count",
        ));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let id = ChunkId(r.array()?);
        let (offset, stored_len, raw_len, kind, compressed) = get_entry_tail(&mut r)?;
        out.push(BlobEntry {
            id,
            offset,
            stored_len,
            raw_len,
            kind,
            compressed,
        });
    }
    Ok(out)
}

pub fn encode_pack_footer(trailer_len: u32) -> [u8; PACK_FOOTER_LEN] {
    let mut f = [0u8; PACK_FOOTER_LEN];
    f[..4].copy_from_slice(&trailer_len.to_le_bytes());
    f[8..].copy_from_slice(MAGIC_PACK_END);
    f
}

/// Returns the sealed trailer's length.
pub fn decode_pack_footer(name: &str, f: &[u8]) -> Result<u32> {
    let len = pack_footer_trailer_len(name, f)?;
    if f[4..8] != [0; 4] {
        return Err(Error::corrupt(
            name,
            "pack footer damaged: its reserved bytes are not zero",
        ));
    }
    Ok(len)
}

/// The trailer length a footer gives, its reserved bytes unread: for
/// reading a pack whose unsealed bytes are damaged from its sealed trailer.
pub fn pack_footer_trailer_len(name: &str, f: &[u8]) -> Result<u32> {
    if f.len() != PACK_FOOTER_LEN || &f[8..] != MAGIC_PACK_END {
        return Err(Error::corrupt(
            name,
            "pack footer missing: the pack is truncated or not a pack",
        ));
    }
    Ok(u32::from_le_bytes([f[0], f[1], f[2], f[3]]))
}

pub fn encode_index(entries: &[(ChunkId, Location)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + entries.len() * INDEX_ENTRY_LEN);
    let n = u32::try_from(entries.len()).expect("an index file holds fewer than 2^32 chunks");
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    for (id, l) in entries {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&l.pack.0);
        put_entry_tail(
            &mut out,
            l.offset,
            l.stored_len,
            l.raw_len,
            l.kind,
            l.compressed,
        );
    }
    out
}

pub fn decode_index(name: &str, body: &[u8]) -> Result<Vec<(ChunkId, Location)>> {
    let mut r = Reader::new(name, body);
    let n = usize::try_from(r.u32()?).map_err(|_| Error::corrupt(name, "entry count"))?;
    r.bytes(4)?;
    if r.remaining() != n.saturating_mul(INDEX_ENTRY_LEN) {
        return Err(Error::corrupt(
            name,
            "index length does not match its entry count",
        ));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let id = ChunkId(r.array()?);
        let pack = ObjectId(r.array()?);
        let (offset, stored_len, raw_len, kind, compressed) = get_entry_tail(&mut r)?;
        out.push((
            id,
            Location {
                pack,
                offset,
                stored_len,
                raw_len,
                kind,
                compressed,
            },
        ));
    }
    Ok(out)
}

/// A block-map node is a plain array of 32-byte chunk ids.
pub fn encode_map_node(ids: &[ChunkId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * 32);
    for id in ids {
        out.extend_from_slice(&id.0);
    }
    out
}

pub fn decode_map_node(name: &str, data: &[u8]) -> Result<Vec<ChunkId>> {
    if data.len() % 32 != 0 {
        return Err(Error::corrupt(
            name,
            "map node length is not a multiple of 32",
        ));
    }
    Ok(data
        .chunks_exact(32)
        .map(|c| {
            let mut a = [0u8; 32];
            a.copy_from_slice(c);
            ChunkId(a)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(i: u8) -> Location {
        Location {
            pack: ObjectId([i; 16]),
            offset: u64::from(i) * 1000,
            stored_len: 77,
            raw_len: 1 << 20,
            kind: if i % 2 == 0 {
                ChunkKind::Data
            } else {
                ChunkKind::Map
            },
            compressed: i % 3 == 0,
        }
    }

    #[test]
    fn index_roundtrip_and_truncation() {
        let e: Vec<_> = (0..5u8).map(|i| (ChunkId([i; 32]), loc(i))).collect();
        let enc = encode_index(&e);
        assert_eq!(decode_index("i", &enc).unwrap(), e);
        for cut in [0, 3, 8, enc.len() - 1] {
            assert!(decode_index("i", &enc[..cut]).is_err());
        }
    }

    #[test]
    fn trailer_roundtrip() {
        let e: Vec<_> = (0..4u8)
            .map(|i| {
                let l = loc(i);
                BlobEntry {
                    id: ChunkId([i; 32]),
                    offset: l.offset,
                    stored_len: l.stored_len,
                    raw_len: l.raw_len,
                    kind: l.kind,
                    compressed: l.compressed,
                }
            })
            .collect();
        let enc = encode_pack_trailer(&e);
        assert_eq!(decode_pack_trailer("p", &enc).unwrap(), e);
        let mut bad = enc.clone();
        bad[8 + 32 + 16] = 9; // kind byte of entry 0
        assert!(decode_pack_trailer("p", &bad).is_err());
    }

    /// Found by the fuzz/chunk_read target (its minimised input):
    /// an index entry with stored length 0xffff_f569 made
    /// `Repository::read_chunk` allocate 4 GiB before reading the pack.
    #[test]
    fn entries_with_impossible_lengths_are_refused() {
        let id = ChunkId([1; 32]);
        let mut l = loc(1);
        l.stored_len = 0xffff_f569;
        assert!(decode_index("i", &encode_index(&[(id, l)])).is_err());
        l.stored_len = 77;
        l.raw_len = MAX_RAW_LEN + 1;
        assert!(decode_index("i", &encode_index(&[(id, l)])).is_err());
        let blob = |stored_len, raw_len| BlobEntry {
            id,
            offset: 16,
            stored_len,
            raw_len,
            kind: ChunkKind::Data,
            compressed: false,
        };
        for bad in [blob(MAX_STORED_LEN + 1, 1), blob(1, u32::MAX)] {
            assert!(decode_pack_trailer("p", &encode_pack_trailer(&[bad])).is_err());
        }
        // The largest chunk there can be still decodes.
        let big = blob(MAX_STORED_LEN, MAX_RAW_LEN);
        assert_eq!(
            decode_pack_trailer("p", &encode_pack_trailer(&[big])).unwrap(),
            vec![big]
        );
        l.stored_len = MAX_STORED_LEN;
        l.raw_len = MAX_RAW_LEN;
        assert_eq!(
            decode_index("i", &encode_index(&[(id, l)])).unwrap(),
            vec![(id, l)]
        );
    }

    /// Found by fuzz/sealed_files: a 34-byte GC mark whose tag was right
    /// and whose zstd body was two bytes made `open_file` reserve
    /// MAX_FILE_BODY (1 GiB) before zstd refused the body.
    #[test]
    fn decompress_allocates_by_output_not_by_limit() {
        assert!(decompress("f", b"]s", MAX_FILE_BODY).is_err());
        let keys = Keys::clear([5; 32]);
        let mut f = header(MAGIC_GC_MARK, FLAG_ZSTD).to_vec();
        f.extend_from_slice(&keys.seal(&[&f.clone(), b"gc/x"], b"]s"));
        assert!(open_file(&keys, MAGIC_GC_MARK, "GC mark", "gc/x", &f).is_err());
        // What it decompresses stays as it was, up to the limit exactly.
        let body = b"some body ".repeat(1000);
        let z = zstd::bulk::compress(&body, 3).unwrap();
        assert_eq!(decompress("f", &z, body.len()).unwrap(), body);
        assert!(decompress("f", &z, body.len() - 1).is_err());
        let mut two = z.clone();
        two.extend_from_slice(&z);
        assert_eq!(
            decompress("f", &two, 2 * body.len()).unwrap(),
            [&body[..], &body[..]].concat()
        );
        let mut trailing = z.clone();
        trailing.extend_from_slice(b"junk");
        assert!(decompress("f", &trailing, 1 << 20).is_err());
    }

    #[test]
    fn sealed_file_detects_damage() {
        let keys = Keys::from_master(&[1; 64]);
        let f = seal_file(&keys, MAGIC_INDEX, "index/a", b"payload");
        assert_eq!(
            open_file(&keys, MAGIC_INDEX, "index", "index/a", &f).unwrap(),
            b"payload"
        );
        assert!(open_file(&keys, MAGIC_INDEX, "index", "index/b", &f).is_err());
        assert!(open_file(&keys, MAGIC_SNAPSHOT, "snapshot", "index/a", &f).is_err());
        for cut in [0, 5, 16, f.len() - 1] {
            assert!(open_file(&keys, MAGIC_INDEX, "index", "index/a", &f[..cut]).is_err());
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn any_loc() -> impl Strategy<Value = Location> {
        (
            any::<[u8; 16]>(),
            any::<u64>(),
            0..=MAX_STORED_LEN,
            0..=MAX_RAW_LEN,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(p, offset, stored_len, raw_len, map, compressed)| Location {
                    pack: ObjectId(p),
                    offset,
                    stored_len,
                    raw_len,
                    kind: if map { ChunkKind::Map } else { ChunkKind::Data },
                    compressed,
                },
            )
    }

    proptest! {
        #[test]
        fn index_roundtrips(entries in proptest::collection::vec((any::<[u8; 32]>(), any_loc()), 0..50)) {
            let e: Vec<(ChunkId, Location)> = entries.into_iter().map(|(i, l)| (ChunkId(i), l)).collect();
            prop_assert_eq!(decode_index("i", &encode_index(&e)).unwrap(), e);
        }

        #[test]
        fn decoders_never_panic_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_index("i", &data);
            let _ = decode_pack_trailer("p", &data);
            let _ = decode_map_node("m", &data);
            let _ = decode_pack_footer("p", &data);
            let keys = Keys::from_master(&[2; 64]);
            let _ = open_file(&keys, MAGIC_SNAPSHOT, "snapshot", "s", &data);
        }

        #[test]
        fn sealed_files_reject_any_single_byte_change(body in proptest::collection::vec(any::<u8>(), 0..300), at in any::<usize>(), x in 1u8..=255) {
            let keys = Keys::from_master(&[4; 64]);
            let mut f = seal_file(&keys, MAGIC_INDEX, "index/x", &body);
            let i = at % f.len();
            f[i] ^= x;
            prop_assert!(open_file(&keys, MAGIC_INDEX, "index", "index/x", &f).is_err());
        }
    }
}
