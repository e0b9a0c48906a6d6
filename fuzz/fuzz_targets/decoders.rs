//! The pure decoders of `ekko::format`, fed raw bytes: the header check,
//! pack footer, pack trailer body, index body, map node, zstd, and the
//! outer framing of sealed files (before authentication).
#![no_main]

use ekko::format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = format::check_header("f", data, format::MAGIC_INDEX, "index");
    let _ = format::decode_pack_footer("p", data);
    if let Ok(entries) = format::decode_pack_trailer("p", data) {
        let again = format::encode_pack_trailer(&entries);
        assert_eq!(format::decode_pack_trailer("p", &again).unwrap(), entries);
    }
    if let Ok(entries) = format::decode_index("i", data) {
        let again = format::encode_index(&entries);
        assert_eq!(format::decode_index("i", &again).unwrap(), entries);
    }
    if let Ok(ids) = format::decode_map_node("m", data) {
        assert_eq!(format::encode_map_node(&ids), data);
    }
    let _ = format::decompress("z", data, 1 << 20);
    let keys = ekko_fuzz::keys();
    for (magic, what) in [
        (format::MAGIC_INDEX, "index"),
        (format::MAGIC_SNAPSHOT, "snapshot"),
        (format::MAGIC_LOCK, "lock"),
    ] {
        let _ = format::open_file(&keys, magic, what, "index/x", data);
    }
    // The same bytes with a correct tag reach zstd and the size cap.
    let fixed = ekko_fuzz::fix_file_tag(&keys, "index/x", data);
    let _ = format::open_file(&keys, format::MAGIC_INDEX, "index", "index/x", &fixed);
});
