//! Reading, writing and allocation status of raw images served by qemu-nbd.

mod common;

use std::sync::Arc;

use common::*;
use ekko_libnbd::{Extent, Handle, CONTEXT_BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};

const HOLE: u32 = STATE_HOLE | STATE_ZERO;

fn ext(offset: u64, length: u64, flags: u32) -> Extent {
    Extent {
        offset,
        length,
        flags,
    }
}

/// 8 MiB: data at [0, 64k), [1M, 1M+128k) and the last 64k; holes elsewhere.
fn layout() -> (u64, Vec<(u64, u64, u8)>) {
    let size = 8 * MIB;
    (
        size,
        vec![
            (0, 64 * KIB, 0x11),
            (MIB, 128 * KIB, 0x22),
            (size - 64 * KIB, 64 * KIB, 0x33),
        ],
    )
}

fn open_ro(path: &std::path::Path) -> Handle {
    let h = Handle::new().unwrap();
    h.add_meta_context(CONTEXT_BASE_ALLOCATION).unwrap();
    h.connect_systemd_socket_activation(&["qemu-nbd", "-r", "-f", "raw", path_str(path)])
        .unwrap();
    h
}

#[test]
fn raw_content_and_allocation() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let (size, data) = layout();
    let path = sparse_raw(dir.path(), size, &data);
    let h = open_ro(&path);

    assert_eq!(h.size().unwrap(), size);
    assert!(h.is_read_only().unwrap());
    assert!(h.can_meta_context(CONTEXT_BASE_ALLOCATION).unwrap());
    assert!(!h.can_meta_context("qemu:dirty-bitmap:nope").unwrap());

    let mut buf = vec![0u8; usize::try_from(size).unwrap()];
    h.pread(&mut buf, 0).unwrap();
    assert!(
        buf == std::fs::read(&path).unwrap(),
        "pread differs from file"
    );

    let all = h.extents(CONTEXT_BASE_ALLOCATION, 0, size).unwrap();
    assert_eq!(
        all,
        vec![
            ext(0, 64 * KIB, 0),
            ext(64 * KIB, MIB - 64 * KIB, HOLE),
            ext(MIB, 128 * KIB, 0),
            ext(MIB + 128 * KIB, size - 64 * KIB - (MIB + 128 * KIB), HOLE),
            ext(size - 64 * KIB, 64 * KIB, 0),
        ]
    );

    // A sub-range is clipped at both ends.
    let part = h.extents(CONTEXT_BASE_ALLOCATION, 32 * KIB, MIB).unwrap();
    assert_eq!(
        part,
        vec![
            ext(32 * KIB, 32 * KIB, 0),
            ext(64 * KIB, MIB - 64 * KIB, HOLE),
            ext(MIB, 32 * KIB, 0),
        ]
    );
    assert_tiles(&part, 32 * KIB, MIB);
    assert!(h.extents(CONTEXT_BASE_ALLOCATION, 0, 0).unwrap().is_empty());
    h.shutdown().unwrap();
}

/// A range larger than one block-status request (1 GiB) is covered by
/// looping, and the hole spanning the request boundaries is merged.
#[test]
fn extents_span_several_requests() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let gib = 1024 * MIB;
    let size = 3 * gib + MIB;
    let path = sparse_raw(dir.path(), size, &[(3 * gib, 64 * KIB, 0x44)]);
    let h = open_ro(&path);
    let all = h.extents(CONTEXT_BASE_ALLOCATION, 0, size).unwrap();
    assert_eq!(
        all,
        vec![
            ext(0, 3 * gib, HOLE),
            ext(3 * gib, 64 * KIB, 0),
            ext(3 * gib + 64 * KIB, MIB - 64 * KIB, HOLE),
        ]
    );
}

/// `Handle` is Send + Sync: several threads read through one handle.
#[test]
fn concurrent_preads_on_one_handle() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let (size, data) = layout();
    let path = sparse_raw(dir.path(), size, &data);
    let file = Arc::new(std::fs::read(&path).unwrap());
    let h = Arc::new(open_ro(&path));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (h, file) = (Arc::clone(&h), Arc::clone(&file));
            std::thread::spawn(move || {
                let chunk = 256 * KIB;
                let mut buf = vec![0u8; usize::try_from(chunk).unwrap()];
                for i in (t..size / chunk).step_by(4) {
                    h.pread(&mut buf, i * chunk).unwrap();
                    let at = usize::try_from(i * chunk).unwrap();
                    assert!(buf[..] == file[at..at + buf.len()], "chunk {i} differs");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// pwrite on a writable export reaches the file; buffers larger than the
/// server's maximum request are split.
#[test]
fn pwrite_to_writable_export() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 80 * MIB;
    let path = sparse_raw(dir.path(), size, &[]);
    let h = Handle::new().unwrap();
    h.connect_systemd_socket_activation(&["qemu-nbd", "-f", "raw", path_str(&path)])
        .unwrap();
    assert!(!h.is_read_only().unwrap());

    // 70 MiB: above both qemu-nbd's 32 MiB and libnbd's 64 MiB limits.
    let data: Vec<u8> = (0..70 * MIB)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    h.pwrite(&data, 4 * MIB).unwrap();
    let mut back = vec![0u8; data.len()];
    h.pread(&mut back, 4 * MIB).unwrap();
    assert!(back == data, "read back differs");
    h.shutdown().unwrap();
    drop(h);

    let file = std::fs::read(&path).unwrap();
    let at = usize::try_from(4 * MIB).unwrap();
    assert!(file[at..at + data.len()] == data[..], "file differs");
}

/// connect_unix and connect_uri against a qemu-nbd listening on a socket,
/// with a named export.
#[test]
fn connect_unix_and_uri() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let (size, data) = layout();
    let path = sparse_raw(dir.path(), size, &data);
    let server = Server::start(
        dir.path(),
        &["-r", "-f", "raw", "-x", "exp", path_str(&path)],
    );

    let h = Handle::new().unwrap();
    h.set_export_name("exp").unwrap();
    h.connect_unix(&server.socket).unwrap();
    assert_eq!(h.size().unwrap(), size);
    let mut buf = [0u8; 4];
    h.pread(&mut buf, MIB).unwrap();
    assert_eq!(buf, [0x22; 4]);
    h.shutdown().unwrap();

    let h = Handle::new().unwrap();
    h.connect_uri(&format!(
        "nbd+unix:///exp?socket={}",
        path_str(&server.socket)
    ))
    .unwrap();
    assert_eq!(h.size().unwrap(), size);
    h.pread(&mut buf, size - 4).unwrap();
    assert_eq!(buf, [0x33; 4]);
}
