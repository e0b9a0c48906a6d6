//! Raw declarations for the subset of `<libnbd.h>` (libnbd 1.14) used by
//! this crate, resolved from `libnbd.so.0` on first use.  Signatures mirror
//! the header exactly; see the libnbd(3) and per-function man pages for
//! semantics.  Nothing here is public.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

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

ekko_dl::api! {
    pub(crate) struct Api {
        create = "nbd_create": fn() -> *mut nbd_handle;
        close = "nbd_close": fn(*mut nbd_handle);
        get_error = "nbd_get_error": fn() -> *const c_char;
        get_errno = "nbd_get_errno": fn() -> c_int;
        set_export_name = "nbd_set_export_name": fn(*mut nbd_handle, *const c_char) -> c_int;
        add_meta_context = "nbd_add_meta_context": fn(*mut nbd_handle, *const c_char) -> c_int;
        connect_uri = "nbd_connect_uri": fn(*mut nbd_handle, *const c_char) -> c_int;
        aio_connect_uri = "nbd_aio_connect_uri": fn(*mut nbd_handle, *const c_char) -> c_int;
        aio_is_connecting = "nbd_aio_is_connecting": fn(*mut nbd_handle) -> c_int;
        aio_is_ready = "nbd_aio_is_ready": fn(*mut nbd_handle) -> c_int;
        poll = "nbd_poll": fn(*mut nbd_handle, c_int) -> c_int;
        connect_unix = "nbd_connect_unix": fn(*mut nbd_handle, *const c_char) -> c_int;
        connect_systemd_socket_activation = "nbd_connect_systemd_socket_activation":
            fn(*mut nbd_handle, *mut *mut c_char) -> c_int;
        is_read_only = "nbd_is_read_only": fn(*mut nbd_handle) -> c_int;
        can_multi_conn = "nbd_can_multi_conn": fn(*mut nbd_handle) -> c_int;
        can_meta_context = "nbd_can_meta_context": fn(*mut nbd_handle, *const c_char) -> c_int;
        get_size = "nbd_get_size": fn(*mut nbd_handle) -> i64;
        get_block_size = "nbd_get_block_size": fn(*mut nbd_handle, c_int) -> i64;
        pread = "nbd_pread": fn(*mut nbd_handle, *mut c_void, usize, u64, u32) -> c_int;
        pwrite = "nbd_pwrite": fn(*mut nbd_handle, *const c_void, usize, u64, u32) -> c_int;
        block_status = "nbd_block_status":
            fn(*mut nbd_handle, u64, u64, nbd_extent_callback, u32) -> c_int;
        shutdown = "nbd_shutdown": fn(*mut nbd_handle, u32) -> c_int;
    }
}

/// The shared library: its soname, as Debian's `libnbd0` installs it.
const LIBRARY: &str = "libnbd.so.0";

/// libnbd's functions, loaded on first use (see `ekko_dl` for why it is
/// not linked).
pub(crate) fn api() -> Result<&'static Api, crate::Error> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    ekko_dl::once(
        &API,
        LIBRARY,
        "reading NBD exports, qcow2 images and running VMs needs libnbd",
        "libnbd0",
        |lib| {
            // SAFETY: the table declares the signatures of <libnbd.h>.
            unsafe { Api::load(lib) }.map_err(|e| format!("{e}: libnbd 1.14 or newer is needed"))
        },
    )
    .map_err(|message| crate::Error::Load { message })
}
