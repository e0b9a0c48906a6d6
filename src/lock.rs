//! Repository locks.
//!
//! Adding objects never needs a lock: names are random and nothing is
//! modified. Operations that delete (prune, index rebuild) take an exclusive
//! lock, and backups take a shared one so that a deleter can see them. A lock
//! is an object `locks/<id>` naming its holder; it is removed on release.
//!
//! A holder rewrites its lock every `REFRESH_EVERY`, so the store's
//! timestamp of a live lock is never older than that. A lock is **stale**
//! when its process is gone on this host, or when the store has not seen it
//! rewritten for `STALE_AFTER` (its holder died, on any host). Stale locks
//! are ignored, and `ekko unlock` removes them.
//!
//! Prune and forget take a *GC* lock: it excludes other GC locks and the
//! exclusive lock, but not backups, which run alongside prune safely
//! through the mark-and-grace protocol of `crate::gc` (the lock is a
//! courtesy between deleters; safety never rests on a listing being
//! current).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
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
    /// Which process `pid` was: the host's boot id and the process's start
    /// time (`process_start`), so that a PID the kernel reused for another
    /// process does not keep a dead holder's lock alive. Absent in older
    /// locks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    pub time: String,
    pub purpose: String,
}

/// `<boot id>:<start time in clock ticks since boot>` of process `pid` on
/// this host, or `None` if it does not run (or /proc does not say).
pub fn process_start(pid: u32) -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything:
    // the fields after its last ')' start at field 3.
    let after = &stat[stat.rfind(')')? + 1..];
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{}:{start}", boot.trim()))
}

/// How often a holder rewrites its lock.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);
/// A lock the store has not seen rewritten for this long is stale: six
/// missed refreshes, far more than any clock skew or listing delay.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);

/// The refresh interval: `REFRESH_EVERY`, or `EKKO_LOCK_REFRESH_SECS` (for
/// tests, which cannot wait minutes).
fn refresh_every() -> Duration {
    std::env::var("EKKO_LOCK_REFRESH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(REFRESH_EVERY, Duration::from_secs)
}

/// A held lock: rewritten every `REFRESH_EVERY` by a thread of its own,
/// removed on drop.
pub struct Lock {
    backend: Arc<dyn Backend>,
    name: String,
    refresher: Option<(Sender<()>, JoinHandle<()>)>,
}

/// A lock found in the repository.
pub struct Found {
    pub name: String,
    pub info: LockInfo,
    /// The store's timestamp of its last write.
    pub modified: SystemTime,
    /// Why the lock file would not read, if it would not. Its holder is
    /// then unknown: it counts as exclusive until stale by age, and
    /// `ekko unlock` removes it at once.
    pub damaged: Option<String>,
}

impl Found {
    /// Why this lock is stale at the store's time `now`, or `None` if its
    /// holder may still be running.
    pub fn stale(&self, now: SystemTime) -> Option<String> {
        if self.info.host == crate::time::hostname() {
            if !std::path::Path::new(&format!("/proc/{}", self.info.pid)).exists() {
                return Some(format!("process {} is gone on this host", self.info.pid));
            }
            if let Some(start) = &self.info.start {
                if process_start(self.info.pid).is_some_and(|now| now != *start) {
                    return Some(format!(
                        "process {} is gone on this host (its pid now belongs to another process)",
                        self.info.pid
                    ));
                }
            }
        }
        let age = now.duration_since(self.modified).unwrap_or_default();
        (age > STALE_AFTER).then(|| {
            format!(
                "not refreshed for {} min (a live holder refreshes every {} min)",
                age.as_secs() / 60,
                REFRESH_EVERY.as_secs() / 60
            )
        })
    }

    pub fn holder(&self) -> String {
        if let Some(why) = &self.damaged {
            return format!("an unknown holder (the lock file is damaged: {why})");
        }
        format!(
            "{} (pid {} on {}, since {})",
            self.info.purpose, self.info.pid, self.info.host, self.info.time
        )
    }
}

/// Every lock in the repository. Locks that vanish while listed are
/// skipped; a damaged one is listed as such (`Found::damaged`), so that it
/// neither locks everyone out for good nor goes unnoticed.
pub fn list(backend: &dyn Backend, keys: &Keys) -> Result<Vec<Found>> {
    let mut out = Vec::new();
    for o in backend.list("locks/")? {
        let Ok(data) = backend.get(&o.name) else {
            continue;
        };
        let read = format::open_file(keys, MAGIC_LOCK, "lock", &o.name, &data).and_then(|body| {
            serde_json::from_slice::<LockInfo>(&body)
                .map_err(|e| Error::corrupt(&o.name, e.to_string()))
        });
        let (info, damaged) = match read {
            Ok(info) => (info, None),
            Err(e) if e.is_damage() => (
                LockInfo {
                    exclusive: true,
                    gc: false,
                    host: String::new(),
                    pid: 0,
                    start: None,
                    time: String::new(),
                    purpose: String::new(),
                },
                Some(e.to_string()),
            ),
            Err(e) => return Err(e),
        };
        out.push(Found {
            name: o.name,
            info,
            modified: o.modified,
            damaged,
        });
    }
    Ok(out)
}

/// The store's clock now, as well as a client can tell from a listing that
/// includes an object it just wrote: the newest timestamp in it.
fn store_now(locks: &[Found]) -> SystemTime {
    locks
        .iter()
        .map(|l| l.modified)
        .max()
        .unwrap_or_else(SystemTime::now)
}

impl Lock {
    fn write(backend: &Arc<dyn Backend>, keys: &Keys, kind: Kind, purpose: &str) -> Result<Lock> {
        let info = LockInfo {
            exclusive: kind == Kind::Exclusive,
            gc: kind == Kind::Gc,
            host: crate::time::hostname(),
            pid: std::process::id(),
            start: process_start(std::process::id()),
            time: crate::time::now_rfc3339(),
            purpose: purpose.into(),
        };
        let name = format!("locks/{}", ObjectId::random());
        let body = serde_json::to_vec(&info).expect("serializable");
        let sealed = format::seal_file(keys, MAGIC_LOCK, &name, &body);
        backend.put(&name, &sealed)?;
        let (stop, stopped) = bounded::<()>(0);
        let every = refresh_every();
        let refresher = {
            let (backend, name) = (Arc::clone(backend), name.clone());
            std::thread::Builder::new()
                .name("ekko-lock".into())
                .spawn(move || loop {
                    match stopped.recv_timeout(every) {
                        Err(RecvTimeoutError::Timeout) => {
                            if let Err(e) = backend.put(&name, &sealed) {
                                tracing::warn!("could not refresh lock {name}: {e}");
                            }
                        }
                        _ => return,
                    }
                })
        };
        let refresher = match refresher {
            Ok(t) => t,
            Err(e) => {
                let _ = backend.delete(&name);
                return Err(Error::Invalid(format!("lock refresher thread: {e}")));
            }
        };
        Ok(Lock {
            backend: Arc::clone(backend),
            name,
            refresher: Some((stop, refresher)),
        })
    }

    /// A shared lock: fails only if a deleting operation holds the repository.
    pub fn shared(backend: &Arc<dyn Backend>, keys: &Keys, purpose: &str) -> Result<Lock> {
        Self::take(backend, keys, Kind::Shared, purpose)
    }

    /// A GC lock: one deleter at a time; backups go on.
    pub fn gc(backend: &Arc<dyn Backend>, keys: &Keys, purpose: &str) -> Result<Lock> {
        Self::take(backend, keys, Kind::Gc, purpose)
    }

    /// An exclusive lock.
    pub fn exclusive(backend: &Arc<dyn Backend>, keys: &Keys, purpose: &str) -> Result<Lock> {
        Self::take(backend, keys, Kind::Exclusive, purpose)
    }

    /// Write the lock, then look for conflicting live locks; on conflict,
    /// remove it again (on drop), so that of two racing lockers at least
    /// one backs off. Stale locks are judged by the store's clock, read
    /// from the timestamp it gave the new lock.
    fn take(backend: &Arc<dyn Backend>, keys: &Keys, kind: Kind, purpose: &str) -> Result<Lock> {
        let l = Self::write(backend, keys, kind, purpose)?;
        let locks = list(backend.as_ref(), keys)?;
        let now = store_now(&locks);
        for other in &locks {
            if other.name == l.name || other.stale(now).is_some() {
                continue;
            }
            if kind.conflicts_with(&other.info) {
                return Err(Error::Locked {
                    holder: other.holder(),
                    name: other.name.clone(),
                });
            }
        }
        Ok(l)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store's clock now, or a little before: the timestamp the store
    /// gave this lock object when it was last written.
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
}

/// What `unlock` did.
#[derive(Debug, Default, serde::Serialize)]
pub struct UnlockReport {
    /// Removed locks.
    pub removed: Vec<UnlockedLock>,
    /// Locks left because their holders may still be running.
    pub live: Vec<UnlockedLock>,
}

#[derive(Debug, serde::Serialize)]
pub struct UnlockedLock {
    pub name: String,
    pub holder: String,
    /// Why it was removed (empty for a live lock).
    pub reason: String,
}

/// Remove stale locks, or with `all` every lock (the caller asserts that no
/// ekko process uses the repository).
pub fn unlock(backend: &Arc<dyn Backend>, keys: &Keys, all: bool) -> Result<UnlockReport> {
    // A lock of our own (shared: it conflicts with nothing that unlock
    // removes) gives the store's clock by the timestamp the store gives it.
    let me = Lock::write(backend, keys, Kind::Shared, "unlock")?;
    let locks = list(backend.as_ref(), keys)?;
    let now = store_now(&locks);
    let mut report = UnlockReport::default();
    for l in locks {
        if l.name == me.name {
            continue;
        }
        let reason = match l.stale(now) {
            Some(why) => why,
            None if l.damaged.is_some() => "damaged".to_string(),
            None if all => "--remove-all".to_string(),
            None => {
                report.live.push(UnlockedLock {
                    holder: l.holder(),
                    name: l.name,
                    reason: String::new(),
                });
                continue;
            }
        };
        match backend.delete(&l.name) {
            Ok(()) | Err(Error::NotFound { .. }) => report.removed.push(UnlockedLock {
                holder: l.holder(),
                name: l.name,
                reason,
            }),
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Stop the refresher first, so that it cannot write the lock again
        // after it is removed.
        if let Some((stop, thread)) = self.refresher.take() {
            drop(stop);
            let _ = thread.join();
        }
        if let Err(e) = self.backend.delete(&self.name) {
            tracing::warn!("could not remove lock {}: {e}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(pid: u32, start: Option<String>) -> Found {
        Found {
            name: "locks/x".into(),
            info: LockInfo {
                exclusive: false,
                gc: false,
                host: crate::time::hostname(),
                pid,
                start,
                time: String::new(),
                purpose: "test".into(),
            },
            modified: SystemTime::now(),
            damaged: None,
        }
    }

    #[test]
    fn a_reused_pid_does_not_keep_a_dead_holders_lock() {
        let me = std::process::id();
        let start = process_start(me).expect("/proc tells our start");
        let now = SystemTime::now();
        assert!(found(me, Some(start.clone())).stale(now).is_none());
        // An older lock without a start time: the pid alone decides.
        assert!(found(me, None).stale(now).is_none());
        // Our pid, but another process's start: the holder is gone.
        let why = found(me, Some(format!("{start}0"))).stale(now).unwrap();
        assert!(why.contains("belongs to another process"), "{why}");
    }
}
