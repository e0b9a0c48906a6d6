//! Turning a plaintext chunk into its stored form and back.
//!
//! Stored form: zstd (only when it saves space), then `Keys::seal` with the
//! chunk kind and id as associated data, so a blob cannot be passed off as
//! another chunk.

use crate::crypto::{Keys, TAG_LEN};
use crate::error::{Error, Result};
use crate::format::{ChunkKind, Location};
use crate::id::ChunkId;

/// Chunks sealed or opened together: as many as AES-SIV runs side by side.
pub const BATCH: usize = crate::siv::LANES;

/// A chunk ready to be appended to a pack.
pub struct EncodedChunk {
    pub id: ChunkId,
    pub kind: ChunkKind,
    pub raw_len: u32,
    pub compressed: bool,
    pub sealed: Vec<u8>,
}

fn ad(kind: ChunkKind, id: &ChunkId) -> [&[u8]; 3] {
    [b"ekko chunk", kind.tag(), &id.0]
}

/// A reusable zstd context and output buffer: creating them per chunk
/// costs time and memory.
pub struct Compressor {
    ctx: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

impl Compressor {
    /// `level` 0 disables compression.
    pub fn new(level: i32) -> Compressor {
        Compressor {
            ctx: if level == 0 {
                None
            } else {
                zstd::bulk::Compressor::new(level).ok()
            },
            scratch: Vec::new(),
        }
    }

    fn compress(&mut self, plain: &[u8]) -> Option<&[u8]> {
        let c = self.ctx.as_mut()?;
        // Output no larger than the input: incompressible data is stored raw.
        self.scratch.clear();
        self.scratch.reserve(plain.len());
        match c.compress_to_buffer(plain, &mut self.scratch) {
            Ok(n) if n < plain.len() => Some(&self.scratch),
            _ => None,
        }
    }
}

/// Compress and seal. `level` 0 disables compression.
pub fn encode(keys: &Keys, id: ChunkId, kind: ChunkKind, plain: &[u8], level: i32) -> EncodedChunk {
    let p = prepare(id, kind, plain, &mut Compressor::new(level));
    seal_many(keys, vec![p]).pop().expect("one chunk")
}

/// A chunk compressed (when that saves space) and ready to seal in place.
pub struct Prepared {
    id: ChunkId,
    kind: ChunkKind,
    raw_len: u32,
    compressed: bool,
    /// `TAG_LEN` spare bytes, then the payload.
    buf: Vec<u8>,
}

impl Prepared {
    /// Bytes it holds (and will store).
    pub fn stored_len(&self) -> usize {
        self.buf.len()
    }
}

/// Compress `plain`, the plaintext of chunk `id`, into an exactly sized
/// buffer with room for the tag.
pub fn prepare(id: ChunkId, kind: ChunkKind, plain: &[u8], comp: &mut Compressor) -> Prepared {
    let raw_len = u32::try_from(plain.len()).expect("chunks are at most 4 MiB");
    let (payload, compressed) = match comp.compress(plain) {
        Some(c) => (c, true),
        None => (plain, false),
    };
    let mut buf = Vec::with_capacity(TAG_LEN + payload.len());
    buf.extend_from_slice(&[0; TAG_LEN]);
    buf.extend_from_slice(payload);
    Prepared {
        id,
        kind,
        raw_len,
        compressed,
        buf,
    }
}

/// Seal prepared chunks, several at once: that is faster than one by one.
pub fn seal_many(keys: &Keys, mut chunks: Vec<Prepared>) -> Vec<EncodedChunk> {
    let names: Vec<(ChunkKind, ChunkId)> = chunks.iter().map(|c| (c.kind, c.id)).collect();
    let ads: Vec<[&[u8]; 3]> = names.iter().map(|(kind, id)| ad(*kind, id)).collect();
    let mut items: Vec<_> = ads
        .iter()
        .zip(&mut chunks)
        .map(|(a, c)| (a.as_slice(), c.buf.as_mut_slice()))
        .collect();
    keys.seal_in_place(&mut items);
    chunks
        .into_iter()
        .map(|c| EncodedChunk {
            id: c.id,
            kind: c.kind,
            raw_len: c.raw_len,
            compressed: c.compressed,
            sealed: c.buf,
        })
        .collect()
}

/// Open and decompress a blob read from `pack`.
pub fn decode(
    keys: &Keys,
    id: &ChunkId,
    loc: &Location,
    pack: &str,
    sealed: &[u8],
) -> Result<Vec<u8>> {
    let mut buf = sealed.to_vec();
    let plain = decode_many(keys, pack, vec![(id, loc, buf.as_mut_slice())])
        .next()
        .expect("one chunk");
    plain
}

/// Chunk `id`, stored at `loc` in `pack` (the bytes of pack `pname`),
/// ready to be copied into another pack as it is sealed, if it opens and
/// its plaintext hashes to `id`. Prune's repacking and repair's salvage.
pub fn intact_copy(
    keys: &Keys,
    id: &ChunkId,
    loc: &Location,
    pname: &str,
    pack: &[u8],
) -> Option<EncodedChunk> {
    let sealed = usize::try_from(loc.offset)
        .ok()
        .zip(usize::try_from(loc.stored_len).ok())
        .and_then(|(o, n)| pack.get(o..o.checked_add(n)?))?;
    let plain = decode(keys, id, loc, pname, sealed).ok()?;
    (keys.chunk_id(&plain) == *id).then(|| EncodedChunk {
        id: *id,
        kind: loc.kind,
        raw_len: loc.raw_len,
        compressed: loc.compressed,
        sealed: sealed.to_vec(),
    })
}

/// Open blobs of one pack in place, several at once, then decompress each
/// as the iterator reaches it (so that only one plaintext is held at a
/// time). Each succeeds or fails on its own.
pub fn decode_many<'a>(
    keys: &Keys,
    pack: &'a str,
    blobs: Vec<(&'a ChunkId, &'a Location, &'a mut [u8])>,
) -> impl Iterator<Item = Result<Vec<u8>>> + 'a {
    let mut dec = Decompressor::default();
    open_many(keys, pack, blobs)
        .into_iter()
        .map(move |o| o.and_then(|o| dec.to_vec(&o)))
}

/// Open blobs of one pack in place, several at once (faster than one by
/// one, see `siv`), and check their lengths; `Decompressor` turns each
/// into its plaintext, into a new `Vec` or straight into a buffer of the
/// caller's.
pub fn open_many<'a>(
    keys: &Keys,
    pack: &'a str,
    mut blobs: Vec<(&'a ChunkId, &'a Location, &'a mut [u8])>,
) -> Vec<Result<Opened<'a>>> {
    let ads: Vec<[&[u8]; 3]> = blobs.iter().map(|(id, loc, _)| ad(loc.kind, id)).collect();
    let mut items: Vec<_> = ads
        .iter()
        .zip(&mut blobs)
        .map(|(a, (_, _, sealed))| (a.as_slice(), &mut **sealed))
        .collect();
    let opened = keys.open_in_place(&mut items);
    drop(items);
    opened
        .into_iter()
        .zip(blobs)
        .map(|(ok, (id, loc, buf))| {
            // A location from a damaged or hostile index may be shorter
            // than the tag.
            let payload: Option<&[u8]> = buf.get(TAG_LEN..);
            let o = Opened {
                id,
                pack,
                compressed: loc.compressed,
                raw_len: 0,
                payload: payload.unwrap_or_default(),
            };
            if payload.is_none() {
                return Err(o.damaged("shorter than its tag"));
            }
            if !ok {
                return Err(o.damaged("authentication failed"));
            }
            // Decompression allocates `raw_len` up front.
            if loc.raw_len > crate::format::MAX_RAW_LEN {
                return Err(o.damaged("raw length out of range"));
            }
            let raw_len = usize::try_from(loc.raw_len).map_err(|_| o.damaged("length"))?;
            Ok(Opened { raw_len, ..o })
        })
        .collect()
}

/// A blob opened in place: its plaintext, still compressed if it was
/// stored so.
pub struct Opened<'a> {
    id: &'a ChunkId,
    pack: &'a str,
    compressed: bool,
    raw_len: usize,
    payload: &'a [u8],
}

impl Opened<'_> {
    /// The length of the plaintext.
    pub fn len(&self) -> usize {
        self.raw_len
    }

    pub fn is_empty(&self) -> bool {
        self.raw_len == 0
    }

    fn damaged(&self, reason: &str) -> Error {
        Error::ChunkDamaged {
            id: *self.id,
            pack: self.pack.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// Decompresses opened blobs, reusing one zstd context.
#[derive(Default)]
pub struct Decompressor {
    ctx: Option<zstd::bulk::Decompressor<'static>>,
}

impl Decompressor {
    fn ctx(&mut self, o: &Opened<'_>) -> Result<&mut zstd::bulk::Decompressor<'static>> {
        if self.ctx.is_none() {
            let d = zstd::bulk::Decompressor::new().map_err(|_| o.damaged("zstd init"))?;
            self.ctx = Some(d);
        }
        Ok(self.ctx.as_mut().expect("just set"))
    }

    /// The plaintext of `o`, in a new `Vec`.
    pub fn to_vec(&mut self, o: &Opened<'_>) -> Result<Vec<u8>> {
        let plain = if o.compressed {
            self.ctx(o)?
                .decompress(o.payload, o.raw_len)
                .map_err(|_| o.damaged("decompression failed"))?
        } else {
            o.payload.to_vec()
        };
        if plain.len() != o.raw_len {
            return Err(o.damaged("wrong length after decoding"));
        }
        Ok(plain)
    }

    /// The plaintext of `o`, written to `out`, which must be `o.len()`
    /// bytes long: no copy beyond decompression itself.
    pub fn into_slice(&mut self, o: &Opened<'_>, out: &mut [u8]) -> Result<()> {
        assert_eq!(out.len(), o.raw_len, "the output fits the plaintext");
        let n = if o.compressed {
            self.ctx(o)?
                .decompress_to_buffer(o.payload, out)
                .map_err(|_| o.damaged("decompression failed"))?
        } else if o.payload.len() == out.len() {
            out.copy_from_slice(o.payload);
            out.len()
        } else {
            o.payload.len()
        };
        if n != o.raw_len {
            return Err(o.damaged("wrong length after decoding"));
        }
        Ok(())
    }
}

/// Cuts the blobs of a fetched range of a pack out of its buffer, in order
/// of offset, each as its own mutable slice (opening decrypts in place).
pub struct Cutter<'a> {
    rest: &'a mut [u8],
    /// The pack offset where `rest` starts.
    pos: u64,
}

impl<'a> Cutter<'a> {
    /// `buf` holds the pack's bytes from offset `start`.
    pub fn new(buf: &'a mut [u8], start: u64) -> Cutter<'a> {
        Cutter {
            rest: buf,
            pos: start,
        }
    }

    /// The blob at `loc`, or `None` if it starts before the end of the
    /// previous one (overlapping or repeated) or runs past the buffer.
    /// Only a successful cut moves the cutter on.
    pub fn cut(&mut self, offset: u64, stored_len: u32) -> Option<&'a mut [u8]> {
        let skip = usize::try_from(offset.checked_sub(self.pos)?).ok()?;
        let len = usize::try_from(stored_len).ok()?;
        let end = offset.checked_add(u64::from(stored_len))?;
        if self.rest.len() < skip.checked_add(len)? {
            return None;
        }
        let (_, tail) = std::mem::take(&mut self.rest).split_at_mut(skip);
        let (blob, tail) = tail.split_at_mut(len);
        self.rest = tail;
        self.pos = end;
        Some(blob)
    }
}

/// True if every byte is zero. Zero chunks are never stored.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        // OR 8-byte words together; the compiler vectorises this.
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ObjectId;

    #[test]
    fn cutter_cuts_in_order_and_survives_a_bad_entry() {
        let mut buf: Vec<u8> = (0..100).collect();
        let mut c = Cutter::new(&mut buf, 1000);
        assert_eq!(c.cut(1010, 5).unwrap(), &[10, 11, 12, 13, 14]);
        assert!(c.cut(1012, 4).is_none(), "overlaps the one before");
        assert!(c.cut(1090, 20).is_none(), "runs past the end");
        assert!(c.cut(999, 1).is_none(), "before the start");
        let b = c.cut(1015, 2).unwrap();
        b[0] = 99;
        assert_eq!(b, &[99, 16]);
        assert_eq!(c.cut(1095, 5).unwrap(), &[95, 96, 97, 98, 99]);
        assert!(c.cut(1100, 1).is_none());
        assert_eq!(c.cut(1100, 0).unwrap(), &[] as &[u8]);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 1000]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }

    /// A location whose raw length no chunk can have is refused before
    /// decompression allocates it (see fuzz/chunk_read).
    #[test]
    fn impossible_raw_length_is_refused() {
        let keys = Keys::clear([3; 32]);
        let data = vec![7u8; 5000];
        let id = keys.chunk_id(&data);
        let e = encode(&keys, id, ChunkKind::Data, &data, 3);
        assert!(e.compressed);
        let loc = Location {
            pack: ObjectId([0; 16]),
            offset: 16,
            stored_len: u32::try_from(e.sealed.len()).unwrap(),
            raw_len: u32::MAX,
            kind: ChunkKind::Data,
            compressed: true,
        };
        assert!(matches!(
            decode(&keys, &id, &loc, "p", &e.sealed),
            Err(Error::ChunkDamaged { .. })
        ));
    }

    /// Decompressing into a caller's buffer gives the bytes `to_vec`
    /// gives, for compressed and stored-raw chunks alike, and a plaintext
    /// of the wrong length is refused either way.
    #[test]
    fn into_slice_equals_to_vec() {
        let keys = Keys::from_master(&[5; 64]);
        let mut random = vec![0u8; 6000];
        crate::crypto::random_bytes(&mut random);
        for data in [b"text ".repeat(1200), random] {
            let id = keys.chunk_id(&data);
            let e = encode(&keys, id, ChunkKind::Data, &data, 3);
            for raw_len in [data.len(), data.len() - 1] {
                let loc = Location {
                    pack: ObjectId([0; 16]),
                    offset: 16,
                    stored_len: u32::try_from(e.sealed.len()).unwrap(),
                    raw_len: u32::try_from(raw_len).unwrap(),
                    kind: ChunkKind::Data,
                    compressed: e.compressed,
                };
                let mut sealed = e.sealed.clone();
                let opened = open_many(&keys, "p", vec![(&id, &loc, sealed.as_mut_slice())]);
                let o = opened.into_iter().next().unwrap().unwrap();
                let mut dec = Decompressor::default();
                let mut out = vec![0u8; o.len()];
                let (v, s) = (dec.to_vec(&o), dec.into_slice(&o, &mut out));
                if raw_len == data.len() {
                    assert_eq!(v.unwrap(), data);
                    s.unwrap();
                    assert_eq!(out, data);
                } else {
                    assert!(matches!(v, Err(Error::ChunkDamaged { .. })), "{v:?}");
                    assert!(matches!(s, Err(Error::ChunkDamaged { .. })), "{s:?}");
                }
            }
            // A location shorter than the tag (a damaged or forged index)
            // is damage, not a panic.
            for short in [0, 1, TAG_LEN - 1] {
                let loc = Location {
                    pack: ObjectId([0; 16]),
                    offset: 16,
                    stored_len: u32::try_from(short).unwrap(),
                    raw_len: u32::try_from(data.len()).unwrap(),
                    kind: ChunkKind::Data,
                    compressed: e.compressed,
                };
                let mut sealed = e.sealed[..short].to_vec();
                let r = open_many(&keys, "p", vec![(&id, &loc, sealed.as_mut_slice())]);
                let r = r.into_iter().next().unwrap();
                assert!(matches!(r, Err(Error::ChunkDamaged { .. })), "{short}");
            }
        }
    }

    #[test]
    fn roundtrip_and_binding() {
        let keys = Keys::from_master(&[5; 64]);
        for data in [
            vec![7u8; 5000],
            (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ] {
            let id = keys.chunk_id(&data);
            let e = encode(&keys, id, ChunkKind::Data, &data, 3);
            let loc = Location {
                pack: ObjectId([0; 16]),
                offset: 0,
                stored_len: e.sealed.len() as u32,
                raw_len: e.raw_len,
                kind: ChunkKind::Data,
                compressed: e.compressed,
            };
            assert_eq!(decode(&keys, &id, &loc, "p", &e.sealed).unwrap(), data);
            let other = ChunkId([1; 32]);
            assert!(decode(&keys, &other, &loc, "p", &e.sealed).is_err());
            let map_loc = Location {
                kind: ChunkKind::Map,
                ..loc
            };
            assert!(decode(&keys, &id, &map_loc, "p", &e.sealed).is_err());
        }
    }
}
