//! Where repository objects live.
//!
//! The trait is deliberately narrow so that an object store can implement it:
//! put a whole object atomically, get a byte range, list a prefix, delete.
//! Nothing above it appends to or renames an object. Object names are
//! relative, `/`-separated paths such as `packs/3f/3f9c….pack`.

mod local;

pub use local::LocalBackend;

use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
}

pub trait Backend: Send + Sync {
    /// Store `data` under `name`, atomically: a reader sees either the whole
    /// object or nothing, also after a crash.
    fn put(&self, name: &str, data: &[u8]) -> Result<()>;

    /// Read `len` bytes at `offset`. A short object is an error, never a
    /// short read.
    fn get_range(&self, name: &str, offset: u64, len: usize) -> Result<Vec<u8>>;

    /// Read a whole object.
    fn get(&self, name: &str) -> Result<Vec<u8>>;

    /// Size of one object.
    fn size(&self, name: &str) -> Result<u64>;

    /// Every object whose name starts with `prefix` (a folder such as
    /// `snapshots/`), in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// Remove an object. Removing a missing object is not an error.
    fn delete(&self, name: &str) -> Result<()>;

    /// A human-readable location, for messages.
    fn location(&self) -> String;
}
