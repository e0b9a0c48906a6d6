//! The safe [`Handle`] wrapper around `struct nbd_handle`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::ffi::{self, Api};
use crate::{Error, Extent};

/// Largest range asked for in one `nbd_block_status` call.  The protocol
/// allows up to 4 GiB - 1, but not all servers cope with that (see
/// nbd_block_status(3)); 1 GiB is accepted by qemu-nbd and nbdkit.
const MAX_BLOCK_STATUS: u64 = 1 << 30;

/// libnbd refuses reads/writes above 64 MiB per request (`ERANGE`).
const LIBNBD_MAX_REQUEST: usize = 64 << 20;

/// Request size used when the server advertises no maximum (the NBD spec
/// says clients should then not exceed 32 MiB).
const DEFAULT_MAX_REQUEST: usize = 32 << 20;

/// A connection to an NBD server.
///
/// Configure it (`set_export_name`, `add_meta_context`), then connect with
/// one of the `connect_*` methods.  Dropping the handle closes the
/// connection and, for [`Handle::connect_systemd_socket_activation`], kills
/// the server subprocess.
///
/// All methods are synchronous and block the calling thread.
pub struct Handle {
    api: &'static Api,
    h: NonNull<ffi::nbd_handle>,
}

// SAFETY: libnbd handles are thread-safe: "You can call APIs on a single
// handle from multiple threads. Single API calls on the handle are atomic —
// they either take a lock on the handle while they run or are careful to
// access handle fields atomically" (libnbd(3)).  Error details are kept in
// thread-local storage and every method reads them on its own thread right
// after the failing call.  The one non-thread-safe function, `nbd_close`, is
// only called from `Drop`, when no other reference can exist.  Note that the
// handle lock is held for the whole duration of a synchronous call, so
// concurrent calls on one handle are serialised, not parallel; open one
// handle per worker (see `can_multi_conn`) for parallel I/O.
unsafe impl Send for Handle {}
// SAFETY: see `Send` above.
unsafe impl Sync for Handle {}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("h", &self.h).finish()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: `h` came from nbd_create, is closed exactly once, and we
        // own the only reference.
        unsafe { (self.api.close)(self.h.as_ptr()) }
    }
}

/// Convert a libnbd status return (`-1` = error) into a `Result`.
fn check(api: &Api, call: &'static str, rc: c_int) -> Result<c_int, Error> {
    if rc == -1 {
        Err(Error::last(api, call))
    } else {
        Ok(rc)
    }
}

fn cstring(what: &'static str, s: impl Into<Vec<u8>>) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error::InteriorNul { what })
}

/// Check that `[offset, offset + len)` does not overflow `u64`.
fn range_end(call: &'static str, offset: u64, len: usize) -> Result<u64, Error> {
    u64::try_from(len)
        .ok()
        .and_then(|len| offset.checked_add(len))
        .ok_or_else(|| Error::InvalidArgument {
            call,
            reason: format!("range of {len} bytes at offset {offset} overflows"),
        })
}

impl Handle {
    /// Create a new, unconnected handle (`nbd_create`). The first handle
    /// loads libnbd.
    pub fn new() -> Result<Handle, Error> {
        let api = ffi::api()?;
        // SAFETY: nbd_create has no preconditions; NULL means failure.
        let h = unsafe { (api.create)() };
        NonNull::new(h)
            .map(|h| Handle { api, h })
            .ok_or_else(|| Error::last(api, "nbd_create"))
    }

    fn raw(&self) -> *mut ffi::nbd_handle {
        self.h.as_ptr()
    }

    /// Call a libnbd predicate (`1`/`0`/`-1`).
    fn flag(
        &self,
        call: &'static str,
        f: unsafe extern "C" fn(*mut ffi::nbd_handle) -> c_int,
    ) -> Result<bool, Error> {
        // SAFETY: the handle is valid; `f` only takes the handle.
        check(self.api, call, unsafe { f(self.raw()) }).map(|r| r != 0)
    }

    /// Select the export to open (default `""`).  Must be called before
    /// connecting.
    pub fn set_export_name(&self, name: &str) -> Result<(), Error> {
        let name = cstring("export name", name)?;
        // SAFETY: valid handle and NUL-terminated string; libnbd copies it.
        check(self.api, "nbd_set_export_name", unsafe {
            (self.api.set_export_name)(self.raw(), name.as_ptr())
        })
        .map(drop)
    }

    /// Request a metadata context such as [`crate::CONTEXT_BASE_ALLOCATION`]
    /// or a [`crate::dirty_bitmap_context`].  Must be called before
    /// connecting; afterwards check [`Handle::can_meta_context`].
    pub fn add_meta_context(&self, name: &str) -> Result<(), Error> {
        let name = cstring("metadata context name", name)?;
        // SAFETY: valid handle and NUL-terminated string; libnbd copies it.
        check(self.api, "nbd_add_meta_context", unsafe {
            (self.api.add_meta_context)(self.raw(), name.as_ptr())
        })
        .map(drop)
    }

    /// Connect to an NBD URI, e.g. `nbd://host:10809/export` or
    /// `nbd+unix:///export?socket=/run/sock`.
    pub fn connect_uri(&self, uri: &str) -> Result<(), Error> {
        let uri = cstring("URI", uri)?;
        // SAFETY: valid handle and NUL-terminated string.
        check(self.api, "nbd_connect_uri", unsafe {
            (self.api.connect_uri)(self.raw(), uri.as_ptr())
        })
        .map(drop)
    }

    /// [`Handle::connect_uri`], giving up after `timeout` if the server
    /// has not completed the handshake by then. A server that serves a
    /// limited number of clients lets further ones connect and then leaves
    /// them waiting, forever; the caller can then make do with the
    /// connections it has.
    pub fn connect_uri_within(&self, uri: &str, timeout: Duration) -> Result<(), Error> {
        let c_uri = cstring("URI", uri)?;
        // SAFETY: valid handle and NUL-terminated string.
        check(self.api, "nbd_aio_connect_uri", unsafe {
            (self.api.aio_connect_uri)(self.raw(), c_uri.as_ptr())
        })?;
        let deadline = Instant::now() + timeout;
        while self.flag("nbd_aio_is_connecting", self.api.aio_is_connecting)? {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    uri: uri.to_owned(),
                    after: timeout,
                });
            }
            let ms = c_int::try_from(left.as_millis().clamp(1, 1000)).unwrap_or(1000);
            // SAFETY: valid handle; nbd_poll only waits on its socket.
            check(self.api, "nbd_connect_uri", unsafe {
                (self.api.poll)(self.raw(), ms)
            })?;
        }
        if self.flag("nbd_aio_is_ready", self.api.aio_is_ready)? {
            Ok(())
        } else {
            Err(Error::Nbd {
                call: "nbd_connect_uri",
                message: "the server closed the connection during the handshake".to_owned(),
                errno: 0,
            })
        }
    }

    /// Connect to a server listening on a Unix domain socket.
    pub fn connect_unix(&self, path: &Path) -> Result<(), Error> {
        let path = cstring("socket path", path.as_os_str().as_bytes())?;
        // SAFETY: valid handle and NUL-terminated string.
        check(self.api, "nbd_connect_unix", unsafe {
            (self.api.connect_unix)(self.raw(), path.as_ptr())
        })
        .map(drop)
    }

    /// Run `argv` (looked up in `PATH`) as a subprocess serving NBD on a
    /// socket passed via systemd socket activation, and connect to it, e.g.
    /// `["qemu-nbd", "-r", "-f", "qcow2", "-B", "bm0", "disk.qcow2"]`.
    /// The subprocess is killed when the handle is dropped.
    pub fn connect_systemd_socket_activation(&self, argv: &[&str]) -> Result<(), Error> {
        if argv.is_empty() {
            return Err(Error::InvalidArgument {
                call: "connect_systemd_socket_activation",
                reason: "argv must name the server program to run".to_owned(),
            });
        }
        let args = argv
            .iter()
            .map(|a| cstring("server command argument", *a))
            .collect::<Result<Vec<_>, _>>()?;
        let mut ptrs: Vec<*mut c_char> = args
            .iter()
            .map(|a| a.as_ptr().cast_mut())
            .chain(std::iter::once(ptr::null_mut()))
            .collect();
        // SAFETY: `ptrs` is a NULL-terminated array of NUL-terminated strings
        // that outlive the call.  libnbd copies argv and never writes through
        // it (the `char **` type is only for execvp compatibility).
        check(self.api, "nbd_connect_systemd_socket_activation", unsafe {
            (self.api.connect_systemd_socket_activation)(self.raw(), ptrs.as_mut_ptr())
        })
        .map(drop)
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> Result<u64, Error> {
        // SAFETY: valid handle.
        let size = unsafe { (self.api.get_size)(self.raw()) };
        if size == -1 {
            return Err(Error::last(self.api, "nbd_get_size"));
        }
        u64::try_from(size).map_err(|_| Error::InvalidArgument {
            call: "nbd_get_size",
            reason: format!("server reported a negative size {size}"),
        })
    }

    /// Whether the export is read-only.
    pub fn is_read_only(&self) -> Result<bool, Error> {
        self.flag("nbd_is_read_only", self.api.is_read_only)
    }

    /// Whether the server negotiated metadata context `name` (only contexts
    /// requested with [`Handle::add_meta_context`] can be negotiated).
    pub fn can_meta_context(&self, name: &str) -> Result<bool, Error> {
        let name = cstring("metadata context name", name)?;
        // SAFETY: valid handle and NUL-terminated string.
        check(self.api, "nbd_can_meta_context", unsafe {
            (self.api.can_meta_context)(self.raw(), name.as_ptr())
        })
        .map(|r| r != 0)
    }

    /// Whether the server allows several connections to the same export
    /// with consistent results (safe to read in parallel over N handles).
    pub fn can_multi_conn(&self) -> Result<bool, Error> {
        self.flag("nbd_can_multi_conn", self.api.can_multi_conn)
    }

    /// Largest request to send at once: the server's advertised maximum
    /// block size, capped at libnbd's 64 MiB limit.
    fn max_request(&self) -> usize {
        // SAFETY: valid handle.  A failure (-1) only means "unknown".
        let max = unsafe { (self.api.get_block_size)(self.raw(), ffi::LIBNBD_SIZE_MAXIMUM) };
        usize::try_from(max)
            .ok()
            .filter(|&m| m > 0)
            .map_or(DEFAULT_MAX_REQUEST, |m| m.min(LIBNBD_MAX_REQUEST))
    }

    /// Read exactly `buf.len()` bytes at `offset`.  Large buffers are split
    /// into several requests no larger than the server's maximum.
    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        range_end("pread", offset, buf.len())?;
        let mut pos = offset;
        for chunk in buf.chunks_mut(self.max_request()) {
            // SAFETY: `chunk` is a valid writable buffer of `chunk.len()` bytes
            // that outlives this synchronous call.
            check(self.api, "nbd_pread", unsafe {
                (self.api.pread)(self.raw(), chunk.as_mut_ptr().cast(), chunk.len(), pos, 0)
            })?;
            pos = range_end("pread", pos, chunk.len())?;
        }
        Ok(())
    }

    /// Write all of `buf` at `offset`.  Large buffers are split into several
    /// requests no larger than the server's maximum.
    pub fn pwrite(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        range_end("pwrite", offset, buf.len())?;
        let mut pos = offset;
        for chunk in buf.chunks(self.max_request()) {
            // SAFETY: `chunk` is a valid readable buffer of `chunk.len()` bytes
            // that outlives this synchronous call.
            check(self.api, "nbd_pwrite", unsafe {
                (self.api.pwrite)(self.raw(), chunk.as_ptr().cast(), chunk.len(), pos, 0)
            })?;
            pos = range_end("pwrite", pos, chunk.len())?;
        }
        Ok(())
    }

    /// All extents of metadata context `context` covering
    /// `[offset, offset + len)`, in order and without gaps.
    ///
    /// Calls `nbd_block_status` repeatedly (at most 1 GiB per call) until the
    /// range is covered.  Extents are clipped to the range and adjacent
    /// extents with equal flags are merged.  The context must have been
    /// requested with [`Handle::add_meta_context`] before connecting.
    pub fn extents(&self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        let ctx = cstring("metadata context name", context)?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::InvalidArgument {
                call: "extents",
                reason: format!("range of {len} bytes at offset {offset} overflows"),
            })?;
        let bad = |offset: u64, reason: &str| Error::Extents {
            context: context.to_owned(),
            offset,
            reason: reason.to_owned(),
        };

        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let count = (end - pos).min(MAX_BLOCK_STATUS);
            let reply = self
                .block_status(&ctx, pos, count)?
                .ok_or_else(|| bad(pos, "the server sent none"))?;
            if reply.offset > pos {
                return Err(bad(
                    pos,
                    "the server's extents start after the requested offset",
                ));
            }
            let before = pos;
            let mut start = reply.offset;
            // Pairs of (length, flags); a dangling odd entry is ignored.
            for pair in reply.entries.chunks_exact(2) {
                let (length, flags) = (u64::from(pair[0]), pair[1]);
                let stop = start.saturating_add(length).min(end);
                if stop > pos {
                    push_merged(&mut out, pos, stop - pos, flags);
                    pos = stop;
                }
                if pos >= end {
                    break;
                }
                start = start.saturating_add(length);
            }
            if pos == before {
                return Err(bad(
                    pos,
                    "the server's extents do not advance past this offset",
                ));
            }
        }
        Ok(out)
    }

    /// One `nbd_block_status` call; returns the reply for `ctx`, if any.
    fn block_status(&self, ctx: &CStr, offset: u64, count: u64) -> Result<Option<Reply>, Error> {
        let state = Arc::new(Mutex::new(ExtentState {
            context: ctx.to_owned(),
            reply: None,
        }));
        // The callback's reference is released by libnbd through `free`,
        // "when the callback will not be called again by libnbd, including in
        // the case where the API fails" (libnbd(3)), so the state stays valid
        // for as long as libnbd can use it.
        let callback = ffi::nbd_extent_callback {
            callback: Some(extent_callback),
            user_data: Arc::into_raw(Arc::clone(&state)).cast_mut().cast(),
            free: Some(extent_free),
        };
        // SAFETY: valid handle; `callback` upholds the libnbd closure contract
        // (see `extent_callback` and `extent_free`).
        check(self.api, "nbd_block_status", unsafe {
            (self.api.block_status)(self.raw(), count, offset, callback, 0)
        })?;
        let reply = state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reply
            .take();
        Ok(reply)
    }

    /// Politely disconnect from the server (`nbd_shutdown`).  The handle
    /// cannot be used for I/O afterwards.
    pub fn shutdown(&self) -> Result<(), Error> {
        // SAFETY: valid handle; no flags.
        check(self.api, "nbd_shutdown", unsafe {
            (self.api.shutdown)(self.raw(), 0)
        })
        .map(drop)
    }
}

/// Append `[offset, offset + length)` to `out`, merging it into the last
/// extent when that one is adjacent and has the same flags.
fn push_merged(out: &mut Vec<Extent>, offset: u64, length: u64, flags: u32) {
    if let Some(last) = out.last_mut() {
        if last.flags == flags && last.offset.checked_add(last.length) == Some(offset) {
            last.length += length;
            return;
        }
    }
    out.push(Extent {
        offset,
        length,
        flags,
    });
}

/// The raw extents the server returned for the wanted context.
struct Reply {
    offset: u64,
    entries: Vec<u32>,
}

struct ExtentState {
    context: CString,
    reply: Option<Reply>,
}

/// `nbd_extent_callback.callback`: record the entries for our context.
///
/// Never unwinds into C: the body only copies data, and any panic is caught
/// and turned into a failed command (`EPROTO`).
unsafe extern "C" fn extent_callback(
    user_data: *mut c_void,
    metacontext: *const c_char,
    offset: u64,
    entries: *mut u32,
    nr_entries: usize,
    error: *mut c_int,
) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `user_data` is the `Arc<Mutex<ExtentState>>` leaked in
        // `block_status`; it stays alive until `extent_free`.
        let state = unsafe { &*user_data.cast_const().cast::<Mutex<ExtentState>>() };
        if metacontext.is_null() {
            return;
        }
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: libnbd passes a NUL-terminated context name.
        if unsafe { CStr::from_ptr(metacontext) } != state.context.as_c_str() {
            return; // another context we also negotiated
        }
        if state.reply.is_some() {
            return; // non-compliant server repeating a context: keep the first
        }
        let entries = if entries.is_null() || nr_entries == 0 {
            Vec::new()
        } else {
            // SAFETY: libnbd passes `nr_entries` valid u32s.
            unsafe { std::slice::from_raw_parts(entries, nr_entries) }.to_vec()
        };
        state.reply = Some(Reply { offset, entries });
    }));
    match result {
        Ok(()) => 0,
        Err(_) => {
            if !error.is_null() {
                // SAFETY: libnbd passes a valid `int *error`.
                unsafe { *error = libc::EPROTO };
            }
            -1
        }
    }
}

/// `nbd_extent_callback.free`: drop the callback's reference to the state.
unsafe extern "C" fn extent_free(user_data: *mut c_void) {
    // SAFETY: `user_data` came from `Arc::into_raw` in `block_status`, and
    // libnbd calls `free` exactly once.
    drop(unsafe { Arc::from_raw(user_data.cast_const().cast::<Mutex<ExtentState>>()) });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adjacent_equal_flags() {
        let mut v = Vec::new();
        push_merged(&mut v, 0, 10, 0);
        push_merged(&mut v, 10, 5, 0);
        push_merged(&mut v, 15, 5, 3);
        assert_eq!(
            v,
            vec![
                Extent {
                    offset: 0,
                    length: 15,
                    flags: 0
                },
                Extent {
                    offset: 15,
                    length: 5,
                    flags: 3
                },
            ]
        );
    }

    #[test]
    fn interior_nul_rejected_before_ffi() {
        let h = Handle::new().unwrap();
        let err = h.set_export_name("a\0b").unwrap_err();
        assert!(matches!(err, Error::InteriorNul { .. }), "{err}");
    }
}
