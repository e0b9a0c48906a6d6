//! Where repository objects live.
//!
//! The trait is deliberately narrow so that an object store can implement it:
//! put a whole object atomically, get a byte range, list a prefix, delete.
//! Nothing above it appends to or renames an object. Object names are
//! relative, `/`-separated paths such as `packs/3f/3f9c….pack`.

mod local;
mod manifest_cache;
mod s3;

pub use local::{LocalBackend, LocalWriter};
pub use manifest_cache::ManifestCache;
pub use s3::{S3Backend, S3Location, S3Writer};

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;

use crate::error::Result;

/// True when `location` names an object store (`s3://…`) rather than a
/// local folder.
pub fn is_url(location: &OsStr) -> bool {
    location.to_str().is_some_and(|s| s.starts_with("s3://"))
}

/// The one place that turns a repository location into a backend:
/// `s3://BUCKET/PREFIX[?endpoint=…]` opens an [`S3Backend`] (and checks the
/// bucket and credentials), anything else is a local folder. The CLI, the
/// FUSE adapter and the NBD plugin all open repositories through it.
pub fn open(location: impl AsRef<OsStr>) -> Result<Arc<dyn Backend>> {
    let location = location.as_ref();
    if is_url(location) {
        let url = location.to_str().expect("is_url checked UTF-8");
        Ok(Arc::new(S3Backend::open(S3Location::parse(url)?)?))
    } else {
        Ok(Arc::new(LocalBackend::new(Path::new(location))))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    /// When the object was written, by the store's clock. Garbage collection
    /// uses it for its grace period.
    pub modified: std::time::SystemTime,
}

/// Refuse a name that is not a plain relative path (empty, absolute, or
/// with empty, `.` or `..` parts). Names come from our own code or from
/// listings, but a damaged index must never reach outside the repository.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('/')
        || name
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(crate::error::Error::Invalid(format!(
            "bad object name {name:?}"
        )));
    }
    Ok(())
}

/// An object being written. Nothing is visible under its name until
/// `commit` returns; dropping it uncommitted leaves no trace.
pub trait ObjectWriter: Send {
    fn write(&mut self, data: &[u8]) -> Result<()>;
    /// Bytes written so far.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Make the object durable and visible, atomically.
    fn commit(self: Box<Self>) -> Result<()>;
}

pub trait Backend: Send + Sync {
    /// Start writing object `name`: it appears whole at `commit`, or never.
    /// (A local directory streams to a temporary file; an object store may
    /// buffer or upload in parts.)
    fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>>;

    /// Store `data` under `name`, atomically: a reader sees either the whole
    /// object or nothing, also after a crash.
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        let mut w = self.create(name)?;
        w.write(data)?;
        w.commit()
    }

    /// Read `len` bytes at `offset`. A short object is an error, never a
    /// short read.
    fn get_range(&self, name: &str, offset: u64, len: usize) -> Result<Vec<u8>>;

    /// Read a whole object.
    fn get(&self, name: &str) -> Result<Vec<u8>>;

    /// What interrupted writes left behind and nothing has written to for
    /// `older_than` (a local folder's temporary files of killed processes):
    /// how many files and bytes, removed unless `dry_run`. An object store
    /// leaves nothing: a PUT is whole or absent.
    fn stale_temporaries(
        &self,
        _older_than: std::time::Duration,
        _dry_run: bool,
    ) -> Result<(usize, u64)> {
        Ok((0, 0))
    }

    /// Size of one object.
    fn size(&self, name: &str) -> Result<u64>;

    /// Every object whose name starts with `prefix` (a folder such as
    /// `snapshots/`), in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// Remove an object. Removing a missing object is not an error.
    fn delete(&self, name: &str) -> Result<()>;

    /// A human-readable location, for messages.
    fn location(&self) -> String;

    /// How many objects a writer should have in flight at once. A local
    /// disk gains nothing from more than one; an object store needs several
    /// to hide request latency. Each one costs up to a pack of memory.
    fn write_concurrency(&self) -> usize {
        1
    }

    /// True when one request costs far more than the bytes it moves (an
    /// object store), so readers should fetch neighbouring chunks together.
    fn prefers_large_reads(&self) -> bool {
        false
    }

    /// The pack size `ekko init` gives a new repository here unless told
    /// otherwise. Each pack is one PUT: an object store charges per
    /// request, so it gets larger ones.
    fn default_pack_size(&self) -> u32 {
        crate::repo::DEFAULT_PACK_SIZE
    }

    /// How coarse the `modified` timestamps of a listing may be: a listed
    /// time may be up to this much later (rounded up) or earlier (rounded
    /// down) than when the store took the object. Two timestamps then
    /// differ from the true interval by less than this. Garbage collection
    /// adds it to every age it requires, so that a grace period is never
    /// cut short by rounding. A local filesystem has nanoseconds.
    fn timestamp_resolution(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}
