//! `pack::read_trailer` on a hostile pack in a local-folder repository.
//!
//! Input: one selector byte, then the bytes.
//! - `sel % 3 == 0`: the input is the pack file, as is (header, footer and
//!   trailer length before authentication).
//! - `sel % 3 == 1`: the input is the pack file; if its footer points at a
//!   trailer inside the file, that trailer's tag is recomputed.
//! - `sel % 3 == 2`: a `u16` blob length B, B bytes of blobs, then the
//!   trailer body: the pack is built around them (header, sealed trailer,
//!   footer), so that the body reaches `decode_pack_trailer` and the bounds
//!   checks after it.
#![no_main]

use ekko::crypto::TAG_LEN;
use ekko::format::{self, HEADER_LEN, PACK_FOOTER_LEN};
use ekko::id::ObjectId;
use ekko::pack;
use ekko_fuzz::{fresh_repo, keys, write_object};
use libfuzzer_sys::fuzz_target;

const PACK_ID: ObjectId = ObjectId([0xab; 16]);

fn trailer_ad(id: &ObjectId) -> [&[u8]; 2] {
    [b"ekko pack trailer", &id.0]
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let keys = keys();
    let file = match sel % 3 {
        0 => input.to_vec(),
        1 => {
            let mut f = input.to_vec();
            let n = f.len();
            if n >= HEADER_LEN + PACK_FOOTER_LEN {
                let tlen = u32::from_le_bytes([f[n - 16], f[n - 15], f[n - 14], f[n - 13]]);
                let tlen = usize::try_from(tlen).unwrap_or(usize::MAX);
                if let Some(start) = (n - PACK_FOOTER_LEN).checked_sub(tlen) {
                    if tlen >= TAG_LEN && start >= HEADER_LEN {
                        let body = f[start + TAG_LEN..n - PACK_FOOTER_LEN].to_vec();
                        let sealed = keys.seal(&trailer_ad(&PACK_ID), &body);
                        f[start..start + TAG_LEN].copy_from_slice(&sealed[..TAG_LEN]);
                    }
                }
            }
            f
        }
        _ => {
            if input.len() < 2 {
                return;
            }
            let b = usize::from(u16::from_le_bytes([input[0], input[1]]));
            let rest = &input[2..];
            let (blobs, body) = rest.split_at(b.min(rest.len()));
            let mut f = format::header(format::MAGIC_PACK, 0).to_vec();
            f.extend_from_slice(blobs);
            let sealed = keys.seal(&trailer_ad(&PACK_ID), body);
            f.extend_from_slice(&sealed);
            let tlen = u32::try_from(sealed.len()).expect("small input");
            f.extend_from_slice(&format::encode_pack_footer(tlen));
            f
        }
    };
    let (root, backend) = fresh_repo("pack");
    let name = pack::pack_name(&PACK_ID);
    write_object(&root, &name, &file);
    if let Ok(entries) = pack::read_trailer(backend.as_ref(), &keys, &name) {
        // What read_trailer accepts lies inside the pack.
        for e in entries {
            let end = e.offset + u64::from(e.stored_len);
            assert!(end <= u64::try_from(file.len()).unwrap());
        }
    }
});
