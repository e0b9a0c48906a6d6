//! Repository locks.
//!
//! Adding objects never needs a lock: names are random and nothing is
//! modified. Operations that delete (prune, index rebuild) take an exclusive
//! lock, and backups take a shared one so that a deleter can see them. A lock
//! is an object `locks/<id>` naming its holder; it is removed on release. A
//! lock whose process is gone on this host is stale and ignored.
//!
//! Prune and forget take a *GC* lock: it excludes other GC locks and the
//! exclusive lock, but not backups, which run alongside prune safely
//! through the mark-and-grace protocol of `crate::gc` (the lock is a
//! courtesy between deleters; safety never rests on a listing being
//! current).

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::format::{self, MAGIC_LOCK};
use crate::id::ObjectId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Shared,
    Gc,
    Exclusive,
}

impl Kind {
    fn conflicts_with(self, other: &LockInfo) -> bool {
        match self {
            Kind::Exclusive => true,
            Kind::Gc => other.exclusive || other.gc,
            Kind::Shared => other.exclusive,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LockInfo {
    pub exclusive: bool,
    /// A garbage-collection lock (prune, forget). Absent in older locks.
    #[serde(default)]
    pub gc: bool,
    pub host: String,
    pub pid: u32,
    pub time: String,
    pub purpose: String,
}

pub struct Lock<'a> {
    backend: &'a dyn Backend,
    name: String,
}

fn alive(info: &LockInfo) -> bool {
    if info.host != crate::time::hostname() {
        return true; // cannot tell: assume it is
    }
    std::path::Path::new(&format!("/proc/{}", info.pid)).exists()
}

fn read_locks(backend: &dyn Backend, keys: &Keys) -> Result<Vec<(String, LockInfo)>> {
    let mut out = Vec::new();
    for o in backend.list("locks/")? {
        let Ok(data) = backend.get(&o.name) else {
            continue;
        };
        let body = format::open_file(keys, MAGIC_LOCK, "lock", &o.name, &data)?;
        let info: LockInfo =
            serde_json::from_slice(&body).map_err(|e| Error::corrupt(&o.name, e.to_string()))?;
        out.push((o.name, info));
    }
    Ok(out)
}

impl<'a> Lock<'a> {
    fn write(backend: &'a dyn Backend, keys: &Keys, kind: Kind, purpose: &str) -> Result<Lock<'a>> {
        let info = LockInfo {
            exclusive: kind == Kind::Exclusive,
            gc: kind == Kind::Gc,
            host: crate::time::hostname(),
            pid: std::process::id(),
            time: crate::time::now_rfc3339(),
            purpose: purpose.into(),
        };
        let name = format!("locks/{}", ObjectId::random());
        let body = serde_json::to_vec(&info).expect("serializable");
        backend.put(&name, &format::seal_file(keys, MAGIC_LOCK, &name, &body))?;
        Ok(Lock { backend, name })
    }

    fn conflict(backend: &dyn Backend, keys: &Keys, me: Option<&str>, want: Kind) -> Result<()> {
        for (name, info) in read_locks(backend, keys)? {
            if Some(name.as_str()) == me || !alive(&info) {
                continue;
            }
            if want.conflicts_with(&info) {
                return Err(Error::Locked {
                    holder: format!(
                        "{} (pid {} on {}, since {})",
                        info.purpose, info.pid, info.host, info.time
                    ),
                    name,
                });
            }
        }
        Ok(())
    }

    /// A shared lock: fails only if a deleting operation holds the repository.
    pub fn shared(backend: &'a dyn Backend, keys: &Keys, purpose: &str) -> Result<Lock<'a>> {
        Self::take(backend, keys, Kind::Shared, purpose)
    }

    /// A GC lock: one deleter at a time; backups go on.
    pub fn gc(backend: &'a dyn Backend, keys: &Keys, purpose: &str) -> Result<Lock<'a>> {
        Self::take(backend, keys, Kind::Gc, purpose)
    }

    fn take(backend: &'a dyn Backend, keys: &Keys, kind: Kind, purpose: &str) -> Result<Lock<'a>> {
        Self::conflict(backend, keys, None, kind)?;
        let l = Self::write(backend, keys, kind, purpose)?;
        if let Err(e) = Self::conflict(backend, keys, Some(&l.name), kind) {
            drop(l);
            return Err(e);
        }
        Ok(l)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store's clock now, or a little before: the timestamp the store
    /// gave this lock object when it was written.
    pub fn store_time(&self) -> Result<std::time::SystemTime> {
        self.backend
            .list("locks/")?
            .into_iter()
            .find(|o| o.name == self.name)
            .map(|o| o.modified)
            .ok_or_else(|| Error::NotFound {
                name: self.name.clone(),
            })
    }

    /// An exclusive lock: checked before and after writing it, so that of two
    /// racing lockers at least one backs off.
    pub fn exclusive(backend: &'a dyn Backend, keys: &Keys, purpose: &str) -> Result<Lock<'a>> {
        Self::take(backend, keys, Kind::Exclusive, purpose)
    }
}

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.backend.delete(&self.name) {
            tracing::warn!("could not remove lock {}: {e}", self.name);
        }
    }
}
