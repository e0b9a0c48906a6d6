//! Packs: append-only files of many sealed chunks with a self-describing
//! trailer, so the index can always be rebuilt from packs alone.
//!
//! A pack is built in memory up to the repository's pack size and then stored
//! with one atomic `put`; a pack is never modified after that.

use crate::backend::{Backend, ObjectWriter};
use crate::chunk::EncodedChunk;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::format::{self, BlobEntry, Location, HEADER_LEN, MAGIC_PACK, PACK_FOOTER_LEN};
use crate::id::{ChunkId, ObjectId};

pub fn pack_name(id: &ObjectId) -> String {
    let h = id.to_hex();
    format!("packs/{}/{}", &h[..2], h)
}

/// Parse `packs/xx/<hex>` back into an id.
/// The id of the pack stored as `name`, which must be exactly its
/// `pack_name`: a pack file in another folder is not a pack (see
/// `misplaced_pack_id`).
pub fn pack_id_from_name(name: &str) -> Option<ObjectId> {
    loose_pack_id(name).filter(|id| pack_name(id) == name)
}

/// The id a pack file in the wrong place (`packs/d9/d8…`) names.
pub fn misplaced_pack_id(name: &str) -> Option<ObjectId> {
    loose_pack_id(name).filter(|id| pack_name(id) != name)
}

fn loose_pack_id(name: &str) -> Option<ObjectId> {
    let file = name.strip_prefix("packs/")?.split('/').nth(1)?;
    ObjectId::from_hex(file)
}

fn trailer_ad(id: &ObjectId) -> [&[u8]; 2] {
    [b"ekko pack trailer", &id.0]
}

/// A pack being written. Blobs stream straight to the backend's object
/// writer (a temporary file locally), so a pack costs no memory; the pack
/// becomes visible, whole, only at `finish`.
pub struct PackWriter {
    id: ObjectId,
    out: Box<dyn ObjectWriter>,
    entries: Vec<BlobEntry>,
}

impl PackWriter {
    pub fn create(backend: &dyn Backend) -> Result<PackWriter> {
        let id = ObjectId::random();
        let mut out = backend.create(&pack_name(&id))?;
        out.write(&format::header(MAGIC_PACK, 0))?;
        Ok(PackWriter {
            id,
            out,
            entries: Vec::new(),
        })
    }

    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Append a chunk; returns where it will live.
    pub fn add(&mut self, c: &EncodedChunk) -> Result<Location> {
        let offset = self.out.len();
        let stored_len = u32::try_from(c.sealed.len()).expect("a sealed chunk is below 4 GiB");
        self.out.write(&c.sealed)?;
        let entry = BlobEntry {
            id: c.id,
            offset,
            stored_len,
            raw_len: c.raw_len,
            kind: c.kind,
            compressed: c.compressed,
        };
        self.entries.push(entry);
        Ok(entry.located_in(self.id))
    }

    /// Seal the trailer and commit the pack. Returns the index entries.
    pub fn finish(mut self, keys: &Keys) -> Result<Vec<(ChunkId, Location)>> {
        let trailer = keys.seal(
            &trailer_ad(&self.id),
            &format::encode_pack_trailer(&self.entries),
        );
        let tlen = u32::try_from(trailer.len()).expect("trailer below 4 GiB");
        self.out.write(&trailer)?;
        self.out.write(&format::encode_pack_footer(tlen))?;
        self.out.commit()?;
        let id = self.id;
        Ok(self
            .entries
            .into_iter()
            .map(|e| (e.id, e.located_in(id)))
            .collect())
    }
}

/// Chunks copied into new packs one after another, each pack closed once
/// it reaches `limit` bytes (prune's repacking, repair's salvage).
pub struct Packer<'a> {
    backend: &'a dyn Backend,
    limit: u64,
    writer: Option<PackWriter>,
    /// Where the chunks of the packs closed so far live.
    pub entries: Vec<(ChunkId, Location)>,
    /// Packs closed so far.
    pub packs: usize,
}

impl<'a> Packer<'a> {
    pub fn new(backend: &'a dyn Backend, limit: u64) -> Packer<'a> {
        Packer {
            backend,
            limit,
            writer: None,
            entries: Vec::new(),
            packs: 0,
        }
    }

    /// Append a chunk; returns true when that closed a pack.
    pub fn add(&mut self, keys: &Keys, c: &EncodedChunk) -> Result<bool> {
        let w = match self.writer.as_mut() {
            Some(w) => w,
            None => self.writer.insert(PackWriter::create(self.backend)?),
        };
        w.add(c)?;
        if w.len() < self.limit {
            return Ok(false);
        }
        let w = self.writer.take().expect("present");
        self.entries.extend(w.finish(keys)?);
        self.packs += 1;
        Ok(true)
    }

    /// Close the last pack, if it holds anything; returns true if it did.
    pub fn finish(&mut self, keys: &Keys) -> Result<bool> {
        match self.writer.take().filter(|w| !w.is_empty()) {
            Some(w) => {
                self.entries.extend(w.finish(keys)?);
                self.packs += 1;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// The size of a pack holding `chunks` sealed chunks of `chunk_bytes` bytes
/// in all: header, the chunks, the sealed trailer (count, entries, tag) and
/// the footer. Prune compares it with a pack's size: the difference is what
/// rewriting the pack's live chunks into a pack of their own would free.
pub fn packed_size(chunk_bytes: u64, chunks: u64) -> u64 {
    const FIXED: usize = HEADER_LEN + 8 + crate::crypto::TAG_LEN + PACK_FOOTER_LEN;
    let fixed = u64::try_from(FIXED).expect("small");
    let entry = u64::try_from(format::PACK_ENTRY_LEN).expect("small");
    fixed
        .saturating_add(chunk_bytes)
        .saturating_add(chunks.saturating_mul(entry))
}

/// Read and authenticate a pack's trailer: the list of its chunks.
pub fn read_trailer(backend: &dyn Backend, keys: &Keys, name: &str) -> Result<Vec<BlobEntry>> {
    trailer(backend, keys, name, true)
}

/// The trailer of a pack whose header does not read (a damaged magic, or a
/// version this ekko does not know). The trailer is sealed with the
/// repository's key and the pack's id as associated data, so if it opens,
/// it, and not the header, says what the pack holds.
pub fn read_trailer_past_header(
    backend: &dyn Backend,
    keys: &Keys,
    name: &str,
) -> Result<Vec<BlobEntry>> {
    trailer(backend, keys, name, false)
}

/// Which of `candidates` is the id of the pack stored at `name`: the one
/// whose id, as associated data, opens its trailer. A pack whose trailer
/// does not open under its own name may be another pack, moved or
/// renamed. Only the footer is trusted for the trailer's length.
pub fn trailer_opens_as(
    backend: &dyn Backend,
    keys: &Keys,
    name: &str,
    candidates: &[ObjectId],
) -> Result<Option<ObjectId>> {
    let size = backend.size(name)?;
    let min = u64::try_from(HEADER_LEN + PACK_FOOTER_LEN).expect("small");
    if size < min || candidates.is_empty() {
        return Ok(None);
    }
    let footer = backend.get_range(name, size - 16, PACK_FOOTER_LEN)?;
    let Ok(tlen) = format::pack_footer_trailer_len(name, &footer) else {
        return Ok(None);
    };
    let Some(tstart) = (size - 16)
        .checked_sub(u64::from(tlen))
        .filter(|&s| s >= 16)
    else {
        return Ok(None);
    };
    let Ok(len) = usize::try_from(tlen) else {
        return Ok(None);
    };
    let sealed = backend.get_range(name, tstart, len)?;
    Ok(candidates
        .iter()
        .find(|id| keys.open(&trailer_ad(id), &sealed).is_some())
        .copied())
}

/// Whether `read_trailer` failed on what a damaged header gives.
pub fn header_error(e: &Error) -> bool {
    e.is_damage() || matches!(e, Error::UnsupportedVersion { .. })
}

/// `read_trailer`, or, when that fails as a damaged header would,
/// `read_trailer_past_header` (keeping the first error if that fails too).
pub fn read_any_trailer(backend: &dyn Backend, keys: &Keys, name: &str) -> Result<Vec<BlobEntry>> {
    match read_trailer(backend, keys, name) {
        // A store failure on the second read is what is reported.
        Err(e) if header_error(&e) => read_trailer_past_header(backend, keys, name).map_err(|e2| {
            if header_error(&e2) {
                e
            } else {
                e2
            }
        }),
        r => r,
    }
}

fn trailer(backend: &dyn Backend, keys: &Keys, name: &str, strict: bool) -> Result<Vec<BlobEntry>> {
    let id = pack_id_from_name(name).ok_or_else(|| Error::corrupt(name, "not a pack name"))?;
    let size = backend.size(name)?;
    let min = u64::try_from(HEADER_LEN + PACK_FOOTER_LEN).expect("small");
    if size < min {
        return Err(Error::corrupt(
            name,
            format!("only {size} bytes: truncated"),
        ));
    }
    // Strict: the unsealed header and footer bytes must be as written.
    if strict {
        let head = backend.get_range(name, 0, HEADER_LEN)?;
        if format::check_header(name, &head, MAGIC_PACK, "pack")? != 0 {
            return Err(Error::corrupt(
                name,
                "header damaged: a pack's flags byte is not zero",
            ));
        }
    }
    let footer = backend.get_range(name, size - 16, PACK_FOOTER_LEN)?;
    let tlen = if strict {
        format::decode_pack_footer(name, &footer)?
    } else {
        format::pack_footer_trailer_len(name, &footer)?
    };
    let tstart = (size - 16)
        .checked_sub(u64::from(tlen))
        .filter(|&s| s >= 16)
        .ok_or_else(|| Error::corrupt(name, "trailer length exceeds the pack"))?;
    let sealed = backend.get_range(
        name,
        tstart,
        usize::try_from(tlen).map_err(|_| Error::corrupt(name, "trailer length"))?,
    )?;
    let body = keys
        .open(&trailer_ad(&id), &sealed)
        .ok_or_else(|| Error::corrupt(name, "trailer authentication failed"))?;
    let entries = format::decode_pack_trailer(name, &body)?;
    for e in &entries {
        let end = e.offset.checked_add(u64::from(e.stored_len));
        if e.offset < 16 || end.is_none_or(|end| end > tstart) {
            return Err(Error::corrupt(
                name,
                format!("entry for chunk {} lies outside the pack", e.id),
            ));
        }
    }
    Ok(entries)
}
