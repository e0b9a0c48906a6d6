//! Raw declarations for the subset of `<libnbd.h>` (libnbd 1.14) used by
//! this crate.  Signatures mirror the header exactly; see the libnbd(3) and
//! per-function man pages for semantics.  Nothing here is public.

use std::ffi::{c_char, c_int, c_void};

/// Opaque `struct nbd_handle`.
#[repr(C)]
pub(crate) struct nbd_handle {
    _private: [u8; 0],
}

/// `nbd_extent_callback`: passed by value to `nbd_block_status`.
///
/// `entries` holds `nr_entries` `uint32_t`s forming `(length, flags)` pairs.
/// `free` is called exactly once, when libnbd will never call `callback`
/// again (also when the API call fails).
#[repr(C)]
pub(crate) struct nbd_extent_callback {
    pub callback: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            metacontext: *const c_char,
            offset: u64,
            entries: *mut u32,
            nr_entries: usize,
            error: *mut c_int,
        ) -> c_int,
    >,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(user_data: *mut c_void)>,
}

/// `LIBNBD_SIZE_MAXIMUM` for `nbd_get_block_size`.
pub(crate) const LIBNBD_SIZE_MAXIMUM: c_int = 2;

#[link(name = "nbd")]
extern "C" {
    pub(crate) fn nbd_create() -> *mut nbd_handle;
    pub(crate) fn nbd_close(h: *mut nbd_handle);
    pub(crate) fn nbd_get_error() -> *const c_char;
    pub(crate) fn nbd_get_errno() -> c_int;

    pub(crate) fn nbd_set_export_name(h: *mut nbd_handle, export_name: *const c_char) -> c_int;
    pub(crate) fn nbd_add_meta_context(h: *mut nbd_handle, name: *const c_char) -> c_int;

    pub(crate) fn nbd_connect_uri(h: *mut nbd_handle, uri: *const c_char) -> c_int;
    pub(crate) fn nbd_connect_unix(h: *mut nbd_handle, unixsocket: *const c_char) -> c_int;
    pub(crate) fn nbd_connect_systemd_socket_activation(
        h: *mut nbd_handle,
        argv: *mut *mut c_char,
    ) -> c_int;

    pub(crate) fn nbd_is_read_only(h: *mut nbd_handle) -> c_int;
    pub(crate) fn nbd_can_multi_conn(h: *mut nbd_handle) -> c_int;
    pub(crate) fn nbd_can_meta_context(h: *mut nbd_handle, metacontext: *const c_char) -> c_int;
    pub(crate) fn nbd_get_size(h: *mut nbd_handle) -> i64;
    pub(crate) fn nbd_get_block_size(h: *mut nbd_handle, size_type: c_int) -> i64;

    pub(crate) fn nbd_pread(
        h: *mut nbd_handle,
        buf: *mut c_void,
        count: usize,
        offset: u64,
        flags: u32,
    ) -> c_int;
    pub(crate) fn nbd_pwrite(
        h: *mut nbd_handle,
        buf: *const c_void,
        count: usize,
        offset: u64,
        flags: u32,
    ) -> c_int;
    pub(crate) fn nbd_block_status(
        h: *mut nbd_handle,
        count: u64,
        offset: u64,
        extent_callback: nbd_extent_callback,
        flags: u32,
    ) -> c_int;
    pub(crate) fn nbd_shutdown(h: *mut nbd_handle, flags: u32) -> c_int;
}
