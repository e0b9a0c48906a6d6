//! The crate's error type.

use std::ffi::CStr;

use crate::ffi::Api;

/// Everything that can go wrong when talking to an NBD server via libnbd.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A libnbd function returned an error.  `message` is libnbd's own
    /// description (`nbd_get_error`), `errno` its error number
    /// (`nbd_get_errno`, 0 when libnbd had none).
    #[error("libnbd: {}{}", describe(.call, .message), hint(.call, .message, *.errno))]
    Nbd {
        /// The libnbd function that failed, e.g. `"nbd_connect_unix"`.
        call: &'static str,
        /// libnbd's error message.
        message: String,
        /// The errno reported by libnbd, 0 if none.
        errno: i32,
    },

    /// libnbd is not installed (or too old): `libnbd.so.0` could not be
    /// loaded, or lacks a function.
    #[error("{message}")]
    Load {
        /// What failed, and what to install.
        message: String,
    },

    /// A string argument contained a NUL byte and cannot be passed to C.
    #[error("{what} contains a NUL byte, which libnbd cannot accept; remove it")]
    InteriorNul {
        /// Which argument was rejected.
        what: &'static str,
    },

    /// An argument was rejected before calling libnbd.
    #[error("{call}: {reason}")]
    InvalidArgument {
        /// The method that rejected the argument.
        call: &'static str,
        /// What was wrong with it.
        reason: String,
    },

    /// The server accepted the connection but did not finish the NBD
    /// handshake in time: typically a server that serves a limited number
    /// of clients at once and has them all (qemu-nbd serves one unless
    /// started with `--shared`).
    #[error(
        "the NBD server at {uri} did not complete the NBD handshake within {} s: it may \
         serve a limited number of clients and have them all (qemu-nbd serves one unless \
         started with --shared N), or be unreachable",
        .after.as_secs_f64()
    )]
    Timeout {
        /// Where it connected.
        uri: String,
        /// How long it waited.
        after: std::time::Duration,
    },

    /// `nbd_block_status` succeeded but gave no usable extents for the
    /// requested metadata context.
    #[error(
        "NBD server returned no usable extents for metadata context {context:?} at offset \
         {offset}: {reason}; make sure add_meta_context({context:?}) was called before \
         connecting and that can_meta_context reports it as supported"
    )]
    Extents {
        /// The requested metadata context.
        context: String,
        /// Where in the export the problem occurred.
        offset: u64,
        /// What the server did wrong.
        reason: String,
    },
}

impl Error {
    /// The errno libnbd reported, if this is a libnbd error that had one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Nbd { errno, .. } if *errno != 0 => Some(*errno),
            _ => None,
        }
    }

    /// Capture libnbd's thread-local error state after `call` failed.
    ///
    /// Must be called on the same thread, immediately after the failing
    /// call, before any other libnbd function (libnbd(3), ERROR HANDLING).
    pub(crate) fn last(api: &Api, call: &'static str) -> Error {
        // SAFETY: nbd_get_error/nbd_get_errno only read thread-local state and
        // may be called at any time.  The returned string is valid until the
        // next libnbd call on this thread; we copy it immediately.
        let (message, errno) = unsafe {
            let msg = (api.get_error)();
            let message = if msg.is_null() {
                "unknown error".to_owned()
            } else {
                CStr::from_ptr(msg).to_string_lossy().into_owned()
            };
            (message, (api.get_errno)())
        };
        Error::Nbd {
            call,
            message,
            errno,
        }
    }
}

/// libnbd's messages normally read "nbd_call: what: strerror"; add the
/// call name only when libnbd left it out.
fn describe(call: &str, message: &str) -> String {
    if message.starts_with(call) {
        message.to_owned()
    } else {
        format!("{call}: {message}")
    }
}

fn hint(call: &str, message: &str, errno: i32) -> &'static str {
    if message.contains("invalid state") && !call.contains("connect") {
        // The handle is dead or closed: the server went away (or closed
        // the connection after an earlier error), whatever the request.
        "; the connection to the NBD server is closed: the server exited or dropped it"
    } else if call.contains("connect") {
        "; check that the NBD server is running and that the URI, socket path or server \
         command is correct"
    } else if call == "nbd_pwrite" && (errno == libc::EPERM || errno == libc::EROFS) {
        "; the export is read-only"
    } else if errno == libc::EINVAL
        && matches!(call, "nbd_pread" | "nbd_pwrite" | "nbd_block_status")
    {
        "; check that the range lies within the export size"
    } else if matches!(call, "nbd_set_export_name" | "nbd_add_meta_context") {
        "; this must be done before connecting"
    } else {
        ""
    }
}
