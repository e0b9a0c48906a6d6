//! The key files: listing, adding and removing passphrases. Needs only
//! the config and the key files, never the index, so key management is
//! as quick on a repository of many terabytes as on an empty one.

use std::sync::Arc;

use crate::backend::Backend;
use crate::crypto::{KeyFile, Keys};
use crate::error::{Error, Result};
use crate::format::MAGIC_KEY;
use crate::id::ObjectId;
use crate::repo::{encode_json_file, Config, Repository};

/// A repository opened for its keys only.
pub struct Keyring {
    backend: Arc<dyn Backend>,
    config: Config,
    keys: Keys,
    opened_with: Option<String>,
}

impl Keyring {
    /// Read the config and unlock a key file, as `Repository::open` does
    /// (`passphrase` is called only if the repository is encrypted).
    pub fn open(
        backend: Arc<dyn Backend>,
        passphrase: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Keyring> {
        let config = Repository::read_config(backend.as_ref())?;
        let (keys, opened_with) = Repository::unlock(backend.as_ref(), &config, passphrase)?;
        Ok(Keyring {
            backend,
            config,
            keys,
            opened_with,
        })
    }

    /// The key files' names (`keys/<id>`).
    pub fn list(&self) -> Result<Vec<String>> {
        Ok(self
            .backend
            .list("keys/")?
            .into_iter()
            .map(|o| o.name)
            .collect())
    }

    /// The key file (`keys/<id>`) whose passphrase opened the repository;
    /// `None` when it is not encrypted.
    pub fn opened_with(&self) -> Option<&str> {
        self.opened_with.as_deref()
    }

    /// Add a key file so that `new_passphrase` also opens the repository.
    pub fn add_key(&self, current_passphrase: &[u8], new_passphrase: &[u8]) -> Result<String> {
        if !self.keys.is_encrypted() {
            return Err(Error::Invalid(
                "the repository is not encrypted; it has no keys".into(),
            ));
        }
        let key_files = Repository::key_files(self.backend.as_ref())?;
        let (master, _) = Repository::unwrap_any(key_files, current_passphrase, &self.config.id)?;
        let nk = KeyFile::wrap(&master, new_passphrase, &self.config.id)?;
        let name = format!("keys/{}", ObjectId::random());
        self.backend.put(&name, &encode_json_file(MAGIC_KEY, &nk))?;
        Ok(name)
    }

    /// Remove the key file `key` (`keys/<id>` or `<id>`), so that its
    /// passphrase no longer opens the repository. `current_passphrase` must
    /// open another key file: nobody can lock themselves out, nor remove
    /// the last key. A damaged key file may be removed too. Removing a key
    /// file does not change the master key (see docs/FORMAT.md).
    pub fn remove_key(&self, current_passphrase: &[u8], key: &str) -> Result<String> {
        self.remove_key_pausing(current_passphrase, key, None)
    }

    /// `remove_key`, pausing between its checks and the deletion (crash
    /// and race tests).
    pub fn remove_key_pausing(
        &self,
        current_passphrase: &[u8],
        key: &str,
        pause: Option<std::time::Duration>,
    ) -> Result<String> {
        if !self.keys.is_encrypted() {
            return Err(Error::Invalid(
                "the repository is not encrypted; it has no keys".into(),
            ));
        }
        let id = key.strip_prefix("keys/").unwrap_or(key);
        if ObjectId::from_hex(id).is_none() {
            return Err(Error::Invalid(format!(
                "{key:?} is not a key file name: give one that `ekko key list` prints (keys/ and 32 hex digits)"
            )));
        }
        let name = format!("keys/{id}");
        // One removal at a time, and none beside a running backup: two
        // removals that each checked the other's key was still there
        // could otherwise delete both. The keys are read under the lock.
        let _lock = crate::lock::Lock::exclusive(&self.backend, &self.keys, "key remove")?;
        let key_files = Repository::key_files(self.backend.as_ref())?;
        if !key_files.iter().any(|(n, _)| *n == name) {
            return Err(Error::Invalid(format!(
                "no key file {name} in this repository (see `ekko key list`)"
            )));
        }
        let others: Vec<(String, Result<KeyFile>)> =
            key_files.into_iter().filter(|(n, _)| *n != name).collect();
        if others.is_empty() {
            return Err(Error::Invalid(format!(
                "{name} is the repository's only key file: removing it would make the repository unreadable"
            )));
        }
        match Repository::unwrap_any(others, current_passphrase, &self.config.id) {
            Ok(_) => {}
            Err(Error::WrongPassphrase { .. }) => {
                return Err(Error::Invalid(format!(
                    "the passphrase given opens no key file but {name}: removing it would lock you out. Add another passphrase first (`ekko key add`), or give one that another key file opens"
                )));
            }
            Err(e) => return Err(e),
        }
        if let Some(d) = pause {
            std::thread::sleep(d);
        }
        self.backend.delete(&name)?;
        Ok(name)
    }
}
