//! A read-through cache of snapshot manifests, in the local cache folder.
//!
//! Finding a VM's latest snapshot (the parent of every backup), resolving
//! `VM@latest` and listing snapshots read every manifest in the repository.
//! On an object store that is one GET per snapshot of every VM, each a
//! round trip, so a fleet's repository of thousands of snapshots made every
//! backup start slowly. Manifests never change once written (a new
//! snapshot gets a new random name; `forget` deletes), so a copy fetched
//! once serves from then on, and only new manifests are fetched.
//!
//! The cache is only a cache: deleting it loses nothing.
//! - Each file holds the BLAKE3 hash of the manifest's bytes, then the bytes
//!   as stored in the repository (still sealed: the reader opens and
//!   verifies them as it would the repository's copy). A file whose hash
//!   does not match (a torn write, a damaged disk) is fetched again, so it
//!   needs neither fsync nor the repository's atomic-write path.
//! - Listing `snapshots/` removes the copies of manifests that are gone,
//!   and notes each manifest's size: a copy is served only while its size
//!   is the one listed, so a repository manifest that was truncated or
//!   replaced is read (and reported) as it is. Damage that keeps the size
//!   is for `ekko check`, which reads the repository's own copies, never
//!   these.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Backend, ObjectInfo, ObjectWriter};
use crate::atomic_file::TEMP_PREFIX;
use crate::error::Result;
use crate::id::ObjectId;

const PREFIX: &str = "snapshots/";
const HASH_LEN: usize = 32;

pub struct ManifestCache {
    inner: Arc<dyn Backend>,
    dir: PathBuf,
    /// Each manifest's size in the latest listing of `snapshots/`.
    listed: Mutex<HashMap<String, u64>>,
}

impl ManifestCache {
    /// Wrap `inner`, keeping copies of its manifests in `dir`.
    pub fn new(inner: Arc<dyn Backend>, dir: PathBuf) -> ManifestCache {
        ManifestCache {
            inner,
            dir,
            listed: Mutex::default(),
        }
    }

    /// The manifest id, if `name` is a manifest.
    fn id(name: &str) -> Option<&str> {
        name.strip_prefix(PREFIX)
            .filter(|id| ObjectId::from_hex(id).is_some())
    }

    fn read(&self, id: &str) -> Option<Vec<u8>> {
        let mut f = fs::read(self.dir.join(id)).ok()?;
        if f.len() < HASH_LEN {
            return None;
        }
        let body = f.split_off(HASH_LEN);
        (blake3::hash(&body).as_bytes()[..] == f[..]).then_some(body)
    }

    /// The local copy of manifest `name`, whatever the repository's copy
    /// now holds (for `check --repair`, which authenticates it before use).
    pub fn copy_of(&self, name: &str) -> Option<Vec<u8>> {
        Self::id(name).and_then(|id| self.read(id))
    }

    /// Best effort: a copy that cannot be written is fetched next time.
    fn write(&self, id: &str, data: &[u8]) {
        let tmp = self
            .dir
            .join(format!("{TEMP_PREFIX}{id}-{}", std::process::id()));
        let mut file = Vec::with_capacity(HASH_LEN + data.len());
        file.extend_from_slice(blake3::hash(data).as_bytes());
        file.extend_from_slice(data);
        let done = fs::create_dir_all(&self.dir)
            .and_then(|()| fs::write(&tmp, &file))
            .and_then(|()| fs::rename(&tmp, self.dir.join(id)));
        if let Err(e) = done {
            tracing::debug!("manifest cache {}: {e}", self.dir.display());
            let _ = fs::remove_file(&tmp);
        }
    }

    /// Drop the copies of manifests that are no longer listed.
    fn retain(&self, listed: &[ObjectInfo]) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let keep: HashSet<&str> = listed.iter().filter_map(|o| Self::id(&o.name)).collect();
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !keep.contains(name.as_ref()) && !name.starts_with(TEMP_PREFIX) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

impl Backend for ManifestCache {
    fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>> {
        self.inner.create(name)
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        self.inner.put(name, data)?;
        if let Some(id) = Self::id(name) {
            self.write(id, data);
        }
        Ok(())
    }

    fn get_range(&self, name: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.inner.get_range(name, offset, len)
    }

    fn stale_temporaries(&self, older_than: Duration, dry_run: bool) -> Result<(usize, u64)> {
        self.inner.stale_temporaries(older_than, dry_run)
    }

    fn get(&self, name: &str) -> Result<Vec<u8>> {
        let Some(id) = Self::id(name) else {
            return self.inner.get(name);
        };
        if let Some(copy) = self.read(id) {
            let listed = self.listed.lock().expect("listing lock").get(id).copied();
            if listed.is_none_or(|size| u64::try_from(copy.len()).ok() == Some(size)) {
                return Ok(copy);
            }
            // The repository's manifest changed size: read it as it is.
            return self.inner.get(name);
        }
        let data = self.inner.get(name)?;
        self.write(id, &data);
        Ok(data)
    }

    fn size(&self, name: &str) -> Result<u64> {
        self.inner.size(name)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let listed = self.inner.list(prefix)?;
        if prefix == PREFIX {
            self.retain(&listed);
            *self.listed.lock().expect("listing lock") = listed
                .iter()
                .filter_map(|o| Self::id(&o.name).map(|id| (id.to_string(), o.size)))
                .collect();
        }
        Ok(listed)
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.inner.delete(name)?;
        if let Some(id) = Self::id(name) {
            let _ = fs::remove_file(self.dir.join(id));
        }
        Ok(())
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn write_concurrency(&self) -> usize {
        self.inner.write_concurrency()
    }

    fn prefers_large_reads(&self) -> bool {
        self.inner.prefers_large_reads()
    }

    fn default_pack_size(&self) -> u32 {
        self.inner.default_pack_size()
    }

    fn timestamp_resolution(&self) -> Duration {
        self.inner.timestamp_resolution()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn serves_copies_refetches_damaged_ones_and_drops_forgotten_ones() {
        let repo = tempfile::tempdir().unwrap();
        let cache_dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Backend> = Arc::new(LocalBackend::new(repo.path()));
        let c = ManifestCache::new(Arc::clone(&inner), cache_dir.path().to_path_buf());
        let name = format!("snapshots/{ID}");
        inner.put(&name, b"manifest").unwrap();
        assert_eq!(c.get(&name).unwrap(), b"manifest");
        // Served from the copy: the repository's file is not read again.
        fs::remove_file(repo.path().join(&name)).unwrap();
        assert_eq!(c.get(&name).unwrap(), b"manifest");
        // A damaged copy is fetched again.
        inner.put(&name, b"manifest").unwrap();
        let copy = cache_dir.path().join(ID);
        let mut bytes = fs::read(&copy).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&copy, &bytes).unwrap();
        assert_eq!(c.get(&name).unwrap(), b"manifest");
        assert_eq!(fs::read(&copy).unwrap(), {
            let mut f = blake3::hash(b"manifest").as_bytes().to_vec();
            f.extend_from_slice(b"manifest");
            f
        });
        // A repository manifest of another size than the copy (truncated)
        // is read as it is, once listed, and the good copy is kept.
        inner.put(&name, b"mani").unwrap();
        assert_eq!(c.get(&name).unwrap(), b"manifest", "not listed yet");
        assert_eq!(c.list(PREFIX).unwrap().len(), 1);
        assert_eq!(c.get(&name).unwrap(), b"mani");
        assert!(copy.exists());
        // Listing drops the copies of manifests that are gone.
        fs::remove_file(repo.path().join(&name)).unwrap();
        assert!(c.list(PREFIX).unwrap().is_empty());
        assert!(!copy.exists());
        // Other objects pass through, uncached.
        inner.put("index/ab", b"x").unwrap();
        assert_eq!(c.get("index/ab").unwrap(), b"x");
        assert_eq!(fs::read_dir(cache_dir.path()).unwrap().count(), 0);
    }
}
