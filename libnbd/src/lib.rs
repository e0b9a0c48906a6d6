//! A small, safe binding to [libnbd](https://gitlab.com/nbdkit/libnbd), the
//! NBD (Network Block Device) client library, as shipped by Debian 12
//! (libnbd 1.14).
//!
//! Only the synchronous API needed by Ekko is covered: connecting (URI, Unix
//! socket, or a subprocess such as `qemu-nbd` via systemd socket
//! activation), reading and writing, and querying block status — allocation
//! (`base:allocation`) and QEMU dirty bitmaps (`qemu:dirty-bitmap:NAME`).
//!
//! ```no_run
//! use ekko_libnbd::{dirty_bitmap_context, Handle, STATE_DIRTY};
//!
//! # fn main() -> Result<(), ekko_libnbd::Error> {
//! let nbd = Handle::new()?;
//! let ctx = dirty_bitmap_context("bm0");
//! nbd.add_meta_context(&ctx)?;
//! nbd.connect_systemd_socket_activation(&[
//!     "qemu-nbd", "-r", "-f", "qcow2", "-B", "bm0", "disk.qcow2",
//! ])?;
//! let size = nbd.size()?;
//! for e in nbd.extents(&ctx, 0, size)? {
//!     if e.flags & STATE_DIRTY != 0 {
//!         let mut buf = vec![0; usize::try_from(e.length).unwrap()];
//!         nbd.pread(&mut buf, e.offset)?;
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The crate does not link libnbd: the first [`Handle::new`] loads the
//! system's `libnbd.so.0` (Debian: `libnbd0`), and fails with
//! [`Error::Load`] where it is missing (see the `ekko-dl` crate for why).

mod error;
mod ffi;
mod handle;

pub use error::Error;
pub use handle::Handle;

/// The standard allocation metadata context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";

/// `base:allocation` flag: the range is not allocated (a hole).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the range reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag: the range is dirty (changed).
pub const STATE_DIRTY: u32 = 1;

/// Loads libnbd now, if it is not loaded yet: lets a caller fail before
/// it sets up anything that would need undoing (`Handle::new` loads it too).
pub fn load() -> Result<(), Error> {
    ffi::api().map(drop)
}

/// The metadata context name of QEMU dirty bitmap `bitmap`, as exported by
/// `qemu-nbd -B bitmap` or the NBD server of QEMU / qemu-storage-daemon:
/// `qemu:dirty-bitmap:NAME`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// A run of bytes sharing the same metadata flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start of the extent in bytes.
    pub offset: u64,
    /// Length of the extent in bytes (never 0).
    pub length: u64,
    /// Context-specific flags, e.g. [`STATE_HOLE`] | [`STATE_ZERO`] or
    /// [`STATE_DIRTY`].
    pub flags: u32,
}
