//! Failures come back as `Err` with a useful message, never as panics.

mod common;

use common::*;
use ekko_libnbd::{dirty_bitmap_context, Error, Handle, CONTEXT_BASE_ALLOCATION};

#[test]
fn connect_to_missing_socket() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("no-such.sock");

    let h = Handle::new().unwrap();
    let err = h.connect_unix(&sock).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("nbd_connect_unix"), "{msg}");
    assert!(
        msg.contains("check that the NBD server is running"),
        "{msg}"
    );
    assert_eq!(err.errno(), Some(libc::ENOENT), "{msg}");

    let h = Handle::new().unwrap();
    let uri = format!("nbd+unix:///?socket={}", path_str(&sock));
    let msg = h.connect_uri(&uri).unwrap_err().to_string();
    assert!(msg.contains("nbd_connect_uri"), "{msg}");

    let h = Handle::new().unwrap();
    let msg = h.connect_uri("not a uri").unwrap_err().to_string();
    assert!(msg.contains("nbd_connect_uri"), "{msg}");
}

#[test]
fn socket_activation_of_missing_program() {
    require_tools();
    let h = Handle::new().unwrap();
    let err = h
        .connect_systemd_socket_activation(&["/nonexistent/qemu-nbd", "x"])
        .unwrap_err();
    assert!(matches!(err, Error::Nbd { .. }), "{err}");

    let err = h.connect_systemd_socket_activation(&[]).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let err = Handle::new()
        .unwrap()
        .connect_systemd_socket_activation(&["qemu-nbd", "a\0b"])
        .unwrap_err();
    assert!(matches!(err, Error::InteriorNul { .. }), "{err}");
}

#[test]
fn unconnected_handle() {
    let h = Handle::new().unwrap();
    assert!(h.size().is_err());
    assert!(h.pread(&mut [0u8; 512], 0).is_err());
    assert!(h.extents(CONTEXT_BASE_ALLOCATION, 0, 512).is_err());
}

#[test]
fn io_errors_on_connected_handle() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = MIB;
    let path = sparse_raw(dir.path(), size, &[(0, 4 * KIB, 0x55)]);
    let h = Handle::new().unwrap();
    h.add_meta_context(CONTEXT_BASE_ALLOCATION).unwrap();
    h.connect_systemd_socket_activation(&["qemu-nbd", "-r", "-f", "raw", path_str(&path)])
        .unwrap();

    // Reads past or across the end fail cleanly.
    let mut buf = [0u8; 512];
    let msg = h.pread(&mut buf, size).unwrap_err().to_string();
    assert!(msg.contains("nbd_pread"), "{msg}");
    assert!(h.pread(&mut buf, size - 256).is_err());
    assert!(h.pread(&mut buf, u64::MAX - 10).is_err());

    // Writes to a read-only export fail.
    let msg = h.pwrite(&buf, 0).unwrap_err().to_string();
    assert!(msg.contains("nbd_pwrite"), "{msg}");

    // Block status past the end, with overflow, or for a context that was
    // not negotiated.
    assert!(h.extents(CONTEXT_BASE_ALLOCATION, size, 512).is_err());
    assert!(h.extents(CONTEXT_BASE_ALLOCATION, 1, u64::MAX).is_err());
    let err = h
        .extents(&dirty_bitmap_context("bm0"), 0, size)
        .unwrap_err();
    assert!(matches!(err, Error::Extents { .. }), "{err}");
    assert!(err.to_string().contains("add_meta_context"), "{err}");

    // The handle is still usable after all of that.
    h.pread(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x55; 512]);
}
