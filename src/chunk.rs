//! Turning a plaintext chunk into its stored form and back.
//!
//! Stored form: zstd (only when it saves space), then `Keys::seal` with the
//! chunk kind and id as associated data, so a blob cannot be passed off as
//! another chunk.

use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::format::{ChunkKind, Location};
use crate::id::ChunkId;

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

/// A reusable zstd context: creating one per chunk costs time and memory.
pub struct Compressor(Option<zstd::bulk::Compressor<'static>>);

impl Compressor {
    /// `level` 0 disables compression.
    pub fn new(level: i32) -> Compressor {
        Compressor(if level == 0 {
            None
        } else {
            zstd::bulk::Compressor::new(level).ok()
        })
    }

    fn compress(&mut self, plain: &[u8]) -> Option<Vec<u8>> {
        let c = self.0.as_mut()?;
        // Output no larger than the input: incompressible data is stored raw.
        let mut out = Vec::with_capacity(plain.len());
        match c.compress_to_buffer(plain, &mut out) {
            Ok(n) if n < plain.len() => Some(out),
            _ => None,
        }
    }
}

/// Compress and seal. `level` 0 disables compression.
pub fn encode(keys: &Keys, id: ChunkId, kind: ChunkKind, plain: &[u8], level: i32) -> EncodedChunk {
    encode_with(keys, id, kind, plain, &mut Compressor::new(level))
}

/// Compress with a reusable context, then seal.
pub fn encode_with(
    keys: &Keys,
    id: ChunkId,
    kind: ChunkKind,
    plain: &[u8],
    comp: &mut Compressor,
) -> EncodedChunk {
    let raw_len = u32::try_from(plain.len()).expect("chunks are at most 4 MiB");
    let compressed = comp.compress(plain);
    let (payload, compressed_flag) = match &compressed {
        Some(c) => (c.as_slice(), true),
        None => (plain, false),
    };
    EncodedChunk {
        id,
        kind,
        raw_len,
        compressed: compressed_flag,
        sealed: keys.seal(&ad(kind, &id), payload),
    }
}

/// Open and decompress a blob read from `pack`.
pub fn decode(
    keys: &Keys,
    id: &ChunkId,
    loc: &Location,
    pack: &str,
    sealed: &[u8],
) -> Result<Vec<u8>> {
    let damaged = |reason: &str| Error::ChunkDamaged {
        id: *id,
        pack: pack.to_string(),
        reason: reason.to_string(),
    };
    let payload = keys
        .open(&ad(loc.kind, id), sealed)
        .ok_or_else(|| damaged("authentication failed"))?;
    let raw_len = usize::try_from(loc.raw_len).map_err(|_| damaged("length"))?;
    let plain = if loc.compressed {
        let mut d = zstd::bulk::Decompressor::new().map_err(|_| damaged("zstd init"))?;
        d.decompress(&payload, raw_len)
            .map_err(|_| damaged("decompression failed"))?
    } else {
        payload
    };
    if plain.len() != raw_len {
        return Err(damaged("wrong length after decoding"));
    }
    Ok(plain)
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
