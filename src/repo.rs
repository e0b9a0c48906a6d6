//! An open repository: its config, keys, backend and chunk index.
//!
//! Layout (see docs/FORMAT.md):
//! ```text
//! config                 parameters, written once by `init`
//! keys/<id>              the master key wrapped by one passphrase each
//! packs/<xx>/<id>        sealed chunks with a trailer
//! index/<id>             chunk → pack locations, one or more per backup session
//! snapshots/<id>         snapshot manifests
//! locks/<id>             who is working on the repository
//! ```
//! Writers never modify an object: they only add new ones with random names,
//! so any number of backups may run at once. Commit order is packs, then
//! index, then snapshot; a crash leaves at worst unreferenced packs.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::chunk::{self, EncodedChunk};
use crate::crypto::{random_bytes, KeyFile, Keys, MASTER_KEY_LEN};
use crate::error::{Error, Result};
use crate::format::{self, ChunkKind, Location, HEADER_LEN, MAGIC_CONFIG, MAGIC_KEY};
use crate::id::{ChunkId, ObjectId};
use crate::index::{self, Index};
use crate::pack;

pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// 1 MiB: see docs/DESIGN-NOTES.md for the measurement behind it.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
pub const DEFAULT_PACK_SIZE: u32 = 16 * 1024 * 1024;
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Config {
    pub id: String,
    pub chunk_size: u32,
    pub pack_size: u32,
    pub compression_level: i32,
    /// "aes256-siv" or "none".
    pub encryption: String,
    /// Only in unencrypted repositories: the chunk-id key, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_key: Option<String>,
    pub created: String,
}

pub struct InitOptions {
    pub chunk_size: u32,
    pub compression_level: i32,
    pub encrypt: bool,
    pub pack_size: u32,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression_level: DEFAULT_ZSTD_LEVEL,
            encrypt: true,
            pack_size: DEFAULT_PACK_SIZE,
        }
    }
}

pub(crate) fn encode_json_file(magic: &[u8; 8], value: &impl Serialize) -> Vec<u8> {
    let mut out = format::header(magic, 0).to_vec();
    out.extend_from_slice(&serde_json::to_vec_pretty(value).expect("serializable"));
    out
}

fn decode_json_file<T: for<'de> Deserialize<'de>>(
    name: &str,
    data: &[u8],
    magic: &[u8; 8],
    what: &'static str,
) -> Result<T> {
    format::check_header(name, data, magic, what)?;
    serde_json::from_slice(&data[HEADER_LEN..]).map_err(|e| Error::corrupt(name, e.to_string()))
}

pub struct Repository {
    /// The repository's store, behind the local manifest cache when there
    /// is a cache folder (see `backend::ManifestCache`).
    backend: Arc<dyn Backend>,
    /// The store itself, for what must read the repository's own copies.
    store: Arc<dyn Backend>,
    /// The manifest cache in `backend`, if any.
    manifests: Option<Arc<crate::backend::ManifestCache>>,
    config: Config,
    keys: Keys,
    index: Index,
}

impl Repository {
    /// Create a new repository. `passphrase` is required when encrypting.
    pub fn init(
        backend: Arc<dyn Backend>,
        opts: &InitOptions,
        passphrase: Option<&[u8]>,
    ) -> Result<Config> {
        if !opts.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&opts.chunk_size)
        {
            return Err(Error::Invalid(format!(
                "chunk size {} must be a power of two from 64 KiB to 4 MiB",
                opts.chunk_size
            )));
        }
        if !(1 << 20..=1 << 30).contains(&opts.pack_size) {
            return Err(Error::Invalid(format!(
                "pack size {} must be from 1 MiB to 1 GiB",
                opts.pack_size
            )));
        }
        if !(-7..=22).contains(&opts.compression_level) {
            return Err(Error::Invalid(
                "zstd level must be from -7 to 22 (0 = off)".into(),
            ));
        }
        match backend.size("config") {
            Ok(_) => {
                return Err(Error::AlreadyExists {
                    path: PathBuf::from(backend.location()),
                })
            }
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        Self::remove_unfinished_init(backend.as_ref())?;
        let mut rid = [0u8; 16];
        random_bytes(&mut rid);
        let id = hex::encode(rid);
        let mut config = Config {
            id: id.clone(),
            chunk_size: opts.chunk_size,
            pack_size: opts.pack_size,
            compression_level: opts.compression_level,
            encryption: if opts.encrypt { "aes256-siv" } else { "none" }.into(),
            id_key: None,
            created: crate::time::now_rfc3339(),
        };
        if opts.encrypt {
            let pass = passphrase.filter(|p| !p.is_empty()).ok_or_else(|| {
                Error::Invalid("an encrypted repository needs a passphrase".into())
            })?;
            let mut master = [0u8; MASTER_KEY_LEN];
            random_bytes(&mut master);
            let kf = KeyFile::wrap(&master, pass, &id)?;
            // Key before config: a config without a key is never visible.
            backend.put(
                &format!("keys/{}", ObjectId::random()),
                &encode_json_file(MAGIC_KEY, &kf),
            )?;
        } else {
            let mut k = [0u8; 32];
            random_bytes(&mut k);
            config.id_key = Some(hex::encode(k));
        }
        backend.put("config", &encode_json_file(MAGIC_CONFIG, &config))?;
        Ok(config)
    }

    /// Key files without a config are what an init that failed before
    /// writing its config leaves: they belong to no repository, and would
    /// sit beside the new one's key as a second key file. Removed, unless
    /// the store holds data, which makes them a repository that lost its
    /// config: a new init there would be a second, unrelated repository.
    fn remove_unfinished_init(backend: &dyn Backend) -> Result<()> {
        let keys = backend.list("keys/")?;
        if keys.is_empty() {
            return Ok(());
        }
        for prefix in ["snapshots/", "index/", "packs/"] {
            if !backend.list(prefix)?.is_empty() {
                return Err(Error::Invalid(format!(
                    "{} holds key files and {prefix} but no config: its config file was lost or damaged. Put back a copy of it; an init here would make a second repository that cannot read the first one's data",
                    backend.location()
                )));
            }
        }
        // An init running at this moment writes its config right after its
        // key (within a second, even on an object store): a key file only
        // seconds old may be one.
        let young = keys.iter().any(|k| {
            k.modified
                .elapsed()
                .map_or(true, |age| age < std::time::Duration::from_secs(10))
        });
        if young {
            return Err(Error::Invalid(format!(
                "{} holds a key file written seconds ago but no config: another `ekko init` may be running there. If none is, run init again in ten seconds",
                backend.location()
            )));
        }
        for k in &keys {
            backend.delete(&k.name)?;
        }
        tracing::warn!(
            "removed {} key file(s) that an earlier init left when it failed before writing the config",
            keys.len()
        );
        Ok(())
    }

    pub fn read_config(backend: &dyn Backend) -> Result<Config> {
        let data = match backend.get("config") {
            Ok(d) => d,
            Err(Error::NotFound { .. }) => {
                return Err(Error::NoRepository {
                    path: PathBuf::from(backend.location()),
                })
            }
            Err(e) => return Err(e),
        };
        let c: Config = decode_json_file("config", &data, MAGIC_CONFIG, "config")?;
        // The id names the local index cache folder and prefixes QEMU
        // bitmap names: anything but the 32 hex digits of docs/FORMAT.md
        // could point the cache outside its folder, or cut a character.
        if c.id.len() != 32 || !c.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::corrupt(
                "config",
                "repository id is not 32 hex digits",
            ));
        }
        if !c.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c.chunk_size)
        {
            return Err(Error::corrupt("config", "chunk size out of range"));
        }
        if !(1 << 20..=1 << 30).contains(&c.pack_size) {
            return Err(Error::corrupt("config", "pack size out of range"));
        }
        Ok(c)
    }

    /// Open a repository. `passphrase` is called only if it is encrypted.
    pub fn open(
        backend: Arc<dyn Backend>,
        passphrase: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Repository> {
        Self::open_with_cache(backend, passphrase, true)
    }

    pub fn open_with_cache(
        backend: Arc<dyn Backend>,
        passphrase: impl FnOnce() -> Result<Vec<u8>>,
        use_cache: bool,
    ) -> Result<Repository> {
        let config = Self::read_config(backend.as_ref())?;
        let (keys, _) = Self::unlock(backend.as_ref(), &config, passphrase)?;
        let cache = if use_cache {
            index::default_cache_path(&config.id)
        } else {
            None
        };
        let index = Index::open(&backend, &keys, cache.as_deref())?;
        let store = Arc::clone(&backend);
        let manifests = cache
            .as_deref()
            .and_then(std::path::Path::parent)
            .map(|dir| {
                Arc::new(crate::backend::ManifestCache::new(
                    Arc::clone(&backend),
                    dir.join("snapshots"),
                ))
            });
        let backend: Arc<dyn Backend> = match &manifests {
            Some(m) => Arc::clone(m) as Arc<dyn Backend>,
            None => backend,
        };
        Ok(Repository {
            backend,
            store,
            manifests,
            config,
            keys,
            index,
        })
    }

    /// Key files that are damaged as far as can be told without their
    /// passphrases: (name, what is wrong).
    pub fn damaged_key_files(&self) -> Result<Vec<(String, String)>> {
        Ok(Self::key_files(self.store.as_ref())?
            .into_iter()
            .filter_map(|(name, kf)| match kf.and_then(|k| k.check(&name)) {
                Ok(_) => None,
                Err(e) => Some((name, e.to_string())),
            })
            .collect())
    }

    /// Every key file, each read and decoded on its own: a damaged one
    /// must not keep another passphrase's key file from opening the
    /// repository.
    pub(crate) fn key_files(backend: &dyn Backend) -> Result<Vec<(String, Result<KeyFile>)>> {
        let mut out = Vec::new();
        for o in backend.list("keys/")? {
            let kf = backend
                .get(&o.name)
                .and_then(|data| decode_json_file(&o.name, &data, MAGIC_KEY, "key"));
            out.push((o.name.clone(), kf));
        }
        Ok(out)
    }

    /// The master key from the first key file that `passphrase` unwraps.
    /// Damaged key files are skipped (with a warning) as long as another
    /// one opens; if none does, the first damage is the error.
    pub(crate) fn unwrap_any(
        key_files: Vec<(String, Result<KeyFile>)>,
        passphrase: &[u8],
        repo_id: &str,
    ) -> Result<([u8; MASTER_KEY_LEN], String)> {
        let tried = key_files.len();
        let mut damage: Vec<Error> = Vec::new();
        let mut readable = Vec::new();
        for (name, kf) in key_files {
            match kf {
                Ok(kf) => readable.push((name, kf)),
                Err(e) => damage.push(e),
            }
        }
        let mut found = None;
        for (name, kf) in readable {
            match kf.unwrap_key(passphrase, repo_id, &name) {
                Ok(Some(master)) => {
                    found = Some((master, name));
                    break;
                }
                Ok(None) => {}
                Err(e) => damage.push(e),
            }
        }
        match found {
            Some(found) => {
                for e in damage {
                    tracing::warn!("{e} (another key file opened the repository)");
                }
                Ok(found)
            }
            None => Err(damage
                .into_iter()
                .next()
                .unwrap_or(Error::WrongPassphrase { tried })),
        }
    }

    pub(crate) fn unlock(
        backend: &dyn Backend,
        config: &Config,
        passphrase: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<(Keys, Option<String>)> {
        let key_files = Self::key_files(backend)?;
        match config.encryption.as_str() {
            "none" => {
                if !key_files.is_empty() {
                    return Err(Error::corrupt(
                        "config",
                        "says unencrypted, but key files exist",
                    ));
                }
                let hexkey = config
                    .id_key
                    .as_deref()
                    .ok_or_else(|| Error::corrupt("config", "id_key missing"))?;
                let mut k = [0u8; 32];
                hex::decode_to_slice(hexkey, &mut k)
                    .map_err(|_| Error::corrupt("config", "id_key is not 32 hex bytes"))?;
                Ok((Keys::clear(k), None))
            }
            "aes256-siv" => {
                if key_files.is_empty() {
                    return Err(Error::corrupt(
                        "keys/",
                        "no key files: the repository cannot be opened",
                    ));
                }
                let pass = passphrase()?;
                let (master, name) = Self::unwrap_any(key_files, &pass, &config.id)?;
                Ok((Keys::from_master(&master), Some(name)))
            }
            other => Err(Error::corrupt(
                "config",
                format!("unknown encryption {other:?}"),
            )),
        }
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The store without the local manifest cache: what `check` reads, so
    /// that it judges the repository's own files.
    pub fn store(&self) -> &Arc<dyn Backend> {
        &self.store
    }

    /// This host's cached copy of manifest `name` (`snapshots/<id>`), as
    /// stored, not yet authenticated.
    pub fn cached_manifest(&self, name: &str) -> Option<Vec<u8>> {
        self.manifests.as_ref().and_then(|m| m.copy_of(name))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Take in chunks that other processes committed since this repository
    /// was opened, so that their newer snapshots can be read.
    pub fn refresh_index(&self) -> Result<()> {
        self.index.refresh(self.backend.as_ref(), &self.keys)
    }

    pub fn encode_chunk(&self, kind: ChunkKind, plain: &[u8]) -> EncodedChunk {
        let id = self.keys.chunk_id(plain);
        chunk::encode(&self.keys, id, kind, plain, self.config.compression_level)
    }

    /// Fetch and decode one stored chunk. If its pack is gone, a prune may
    /// have moved the chunk since the index was loaded: look it up again once.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let loc = self.index.lookup_referenced(id)?;
        self.read_chunk_from(id, &loc)
    }

    /// `read_chunk_at`, and if the pack at `loc` is gone (a prune moved the
    /// chunk and deleted it since the location was looked up), the chunk
    /// where a fresh index places it.
    pub fn read_chunk_from(&self, id: &ChunkId, loc: &Location) -> Result<Vec<u8>> {
        let loc = *loc;
        match self.read_chunk_at(id, &loc) {
            Err(e @ Error::ChunkDamaged { .. }) if self.pack_missing(&loc)? => {
                self.refresh_index()?;
                match self.index.lookup(id)? {
                    Some(moved) if moved != loc => self.read_chunk_at(id, &moved),
                    _ => Err(e),
                }
            }
            r => r,
        }
    }

    fn pack_missing(&self, loc: &Location) -> Result<bool> {
        match self.backend.size(&pack::pack_name(&loc.pack)) {
            Ok(_) => Ok(false),
            Err(Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    pub fn read_chunk_at(&self, id: &ChunkId, loc: &Location) -> Result<Vec<u8>> {
        let pname = pack::pack_name(&loc.pack);
        // The decoders refuse such lengths; a location from elsewhere (an
        // index cache) must not make us allocate them either.
        if loc.stored_len > format::MAX_STORED_LEN || loc.raw_len > format::MAX_RAW_LEN {
            return Err(Error::ChunkDamaged {
                id: *id,
                pack: pname,
                reason: format!(
                    "its location gives impossible lengths (stored {}, raw {})",
                    loc.stored_len, loc.raw_len
                ),
            });
        }
        let len = usize::try_from(loc.stored_len).map_err(|_| Error::corrupt(&pname, "length"))?;
        let mut sealed = match self.backend.get_range(&pname, loc.offset, len) {
            Ok(s) => s,
            Err(Error::NotFound { .. }) => {
                return Err(Error::ChunkDamaged {
                    id: *id,
                    pack: pname,
                    reason: "pack is missing".into(),
                })
            }
            Err(Error::Corrupt { reason, .. }) => {
                return Err(Error::ChunkDamaged {
                    id: *id,
                    pack: pname,
                    reason,
                })
            }
            Err(e) => return Err(e),
        };
        let plain = chunk::decode_many(&self.keys, &pname, vec![(id, loc, sealed.as_mut_slice())])
            .next()
            .expect("one chunk");
        plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    fn clear_repo(dir: &std::path::Path) -> Repository {
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.join("repo")));
        let opts = InitOptions {
            encrypt: false,
            ..InitOptions::default()
        };
        Repository::init(backend.clone(), &opts, None).unwrap();
        Repository::open_with_cache(backend, || Ok(Vec::new()), false).unwrap()
    }

    /// Found in review, shown with hand-made inputs to the fuzz/config
    /// target (the fuzzer itself did not get there): a config whose id was `0123456€89abcdef` made
    /// `capture::bitmap_prefix` panic (byte 8 inside '€'), and one whose id
    /// was `/tmp/elsewhere` or `../../x` put the index cache outside the
    /// cache folder.
    #[test]
    fn a_config_id_that_is_not_32_hex_digits_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path());
        let config = |id: &str| {
            let mut c = format::header(MAGIC_CONFIG, 0).to_vec();
            c.extend_from_slice(
                format!(
                    r#"{{"id":"{id}","chunk_size":65536,"pack_size":1048576,"compression_level":3,"encryption":"none","id_key":"{}","created":"x"}}"#,
                    "5a".repeat(32)
                )
                .as_bytes(),
            );
            c
        };
        backend
            .put("config", &config("0123456789abcdef0123456789abcdef"))
            .unwrap();
        Repository::read_config(&backend).unwrap();
        for bad in [
            "0123456€89abcdef",
            "/tmp/elsewhere",
            "../../x",
            "",
            "0123456789abcdef0123456789abcdeg",
            "0123456789abcdef0123456789abcdef0",
        ] {
            backend.put("config", &config(bad)).unwrap();
            assert!(
                matches!(
                    Repository::read_config(&backend),
                    Err(Error::Corrupt { .. })
                ),
                "{bad:?}"
            );
        }
    }

    /// Found by the fuzz/chunk_read target (its minimised input):
    /// a location with stored length 0xffff_f569 made `read_chunk_at`
    /// allocate 4 GiB for the ranged read before finding the pack short.
    #[test]
    fn a_location_with_impossible_lengths_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let repo = clear_repo(dir.path());
        let mut pw = pack::PackWriter::create(repo.backend().as_ref()).unwrap();
        let c = repo.encode_chunk(ChunkKind::Data, b"some data");
        pw.add(&c).unwrap();
        let (id, good) = pw.finish(repo.keys()).unwrap()[0];
        assert_eq!(repo.read_chunk_at(&id, &good).unwrap(), b"some data");
        for bad in [
            Location {
                stored_len: 0xffff_f569,
                ..good
            },
            Location {
                raw_len: u32::MAX,
                ..good
            },
        ] {
            assert!(matches!(
                repo.read_chunk_at(&id, &bad),
                Err(Error::ChunkDamaged { .. })
            ));
        }
    }
}
