//! Dirty-bitmap block status from a qcow2 persistent bitmap via qemu-nbd.

mod common;

use common::*;
use ekko_libnbd::{
    dirty_bitmap_context, Extent, Handle, CONTEXT_BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE,
    STATE_ZERO,
};

#[test]
fn dirty_bitmap_reports_exactly_the_written_range() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let img = path_str(&img);
    run(&["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"]);
    run(&["qemu-img", "bitmap", "--add", img, "bm0"]);
    // qemu-io opens the image read-write, which loads the persistent bitmap
    // as enabled, records the write in it and stores it back on close.
    run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -q -P 0x22 1M 64k",
        img,
    ]);

    let ctx = dirty_bitmap_context("bm0");
    assert_eq!(ctx, "qemu:dirty-bitmap:bm0");
    let h = Handle::new().unwrap();
    // Two contexts: the extent callback sees both and must keep only the one
    // asked for.
    h.add_meta_context(CONTEXT_BASE_ALLOCATION).unwrap();
    h.add_meta_context(&ctx).unwrap();
    h.connect_systemd_socket_activation(&["qemu-nbd", "-r", "-f", "qcow2", "-B", "bm0", img])
        .unwrap();
    assert!(h.can_meta_context(&ctx).unwrap());
    assert!(h.can_meta_context(CONTEXT_BASE_ALLOCATION).unwrap());

    let size = h.size().unwrap();
    assert_eq!(size, 64 * MIB);
    let dirty = h.extents(&ctx, 0, size).unwrap();
    assert_eq!(
        dirty,
        vec![
            Extent {
                offset: 0,
                length: MIB,
                flags: 0
            },
            Extent {
                offset: MIB,
                length: 64 * KIB,
                flags: STATE_DIRTY
            },
            Extent {
                offset: MIB + 64 * KIB,
                length: size - MIB - 64 * KIB,
                flags: 0
            },
        ]
    );

    let alloc = h.extents(CONTEXT_BASE_ALLOCATION, 0, size).unwrap();
    assert_tiles(&alloc, 0, size);
    let data: Vec<_> = alloc.iter().filter(|e| e.flags & STATE_HOLE == 0).collect();
    assert_eq!(
        data,
        [&Extent {
            offset: MIB,
            length: 64 * KIB,
            flags: 0
        }]
    );
    assert!(alloc
        .iter()
        .filter(|e| e.flags & STATE_HOLE != 0)
        .all(|e| e.flags & STATE_ZERO != 0));

    let mut buf = vec![0u8; 64 * 1024];
    h.pread(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));
}
