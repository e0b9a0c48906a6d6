//! The snapshots of a repository as the tree names them, kept up to date
//! while mounted.
//!
//! Snapshots never change, but new ones arrive while the tree is mounted.
//! `refresh` lists snapshot ids (one cheap listing), loads only the manifests
//! it has not seen, and names each new snapshot once: its name never changes
//! afterwards, so paths stay valid for as long as the mount lives.
//!
//! The chunk index of an open `Repository` is a view taken when it was
//! opened, so reading a snapshot committed later needs a newer view:
//! `reader` refreshes the index the first time data of such a snapshot is
//! read (listing directories never needs it). The passphrase is not kept.
//!
//! Locking: `state` is read by every lookup and written only by `refresh`,
//! which `refresh_lock` serializes; `repo` is swapped under `reopen_lock`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use ekko::backend::Backend;
use ekko::{snapshot, ChunkCache, DiskReader, NodeCache, Repository, Snapshot};

/// How long a listing is trusted before the next lookup lists again.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// One snapshot and its names in the tree.
pub struct SnapEntry {
    pub snap: Snapshot,
    /// `<vm>` directory name.
    pub vm_dir: String,
    /// `<time>` directory name, unique within the VM.
    pub time_dir: String,
    pub time: SystemTime,
    /// Listing in which the snapshot was first seen.
    seen_at: u64,
    /// Disk name → (repository generation, reader).
    readers: Mutex<HashMap<String, (u64, Arc<DiskReader>)>>,
}

impl SnapEntry {
    /// Directory name of each disk, in manifest order.
    pub fn disk_names(&self) -> Vec<(String, String)> {
        self.snap
            .disks
            .iter()
            .map(|d| (safe_name(&d.name), d.name.clone()))
            .collect()
    }
}

#[derive(Default)]
struct State {
    listing: u64,
    by_id: HashMap<String, Arc<SnapEntry>>,
    /// VM directory → its snapshots, oldest first.
    vms: BTreeMap<String, Vec<Arc<SnapEntry>>>,
    /// Ids whose manifest is damaged; not retried.
    bad: HashSet<String>,
    last_refresh: Option<Instant>,
}

struct RepoView {
    repo: Arc<Repository>,
    /// Snapshots seen in listings up to this one are readable through it.
    covers: u64,
    generation: u64,
}

pub struct Catalog {
    backend: Arc<dyn Backend>,
    repo: RwLock<RepoView>,
    reopen_lock: Mutex<()>,
    refresh_lock: Mutex<()>,
    state: RwLock<State>,
    nodes: Arc<NodeCache>,
    chunks: Arc<ChunkCache>,
}

/// Open the repository at `backend`. Without a passphrase an encrypted
/// repository fails with a message that says how to give one.
pub fn open_repo(
    backend: &Arc<dyn Backend>,
    passphrase: Option<&[u8]>,
) -> ekko::Result<Repository> {
    Repository::open(Arc::clone(backend), || {
        passphrase.map(<[u8]>::to_vec).ok_or_else(|| {
            ekko::Error::Invalid(
                "the repository is encrypted: give its passphrase with --password-file, EKKO_PASSWORD_FILE or EKKO_PASSWORD"
                    .into(),
            )
        })
    })
}

impl Catalog {
    /// Open the repository and list its snapshots. Manifests are small; disk
    /// maps are not touched until a disk is read.
    pub fn open(
        backend: Arc<dyn Backend>,
        passphrase: Option<Vec<u8>>,
        nodes: Arc<NodeCache>,
        chunks: Arc<ChunkCache>,
    ) -> ekko::Result<Catalog> {
        // Ids first, then the repository: its index then covers the chunks
        // of every snapshot listed (a snapshot is committed after its index).
        let ids = snapshot::list_ids(backend.as_ref())?;
        let repo = open_repo(&backend, passphrase.as_deref())?;
        let cat = Catalog {
            backend,
            repo: RwLock::new(RepoView {
                repo: Arc::new(repo),
                covers: 0,
                generation: 0,
            }),
            reopen_lock: Mutex::new(()),
            refresh_lock: Mutex::new(()),
            state: RwLock::new(State::default()),
            nodes,
            chunks,
        };
        let mut st = State {
            last_refresh: Some(Instant::now()),
            ..State::default()
        };
        cat.add_new(&mut st, ids);
        *cat.state.write().expect("catalog lock") = st;
        Ok(cat)
    }

    fn fresh(&self) -> bool {
        self.state
            .read()
            .expect("catalog lock")
            .last_refresh
            .is_some_and(|t| t.elapsed() < REFRESH_INTERVAL)
    }

    /// List snapshots again if the last listing is older than
    /// `REFRESH_INTERVAL`. A failed listing keeps the previous one.
    pub fn refresh(&self) {
        if self.fresh() {
            return;
        }
        let _serial = self.refresh_lock.lock().expect("refresh lock");
        if self.fresh() {
            return;
        }
        let ids = match snapshot::list_ids(self.backend.as_ref()) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!("cannot list snapshots ({e}); showing the previous list");
                self.state.write().expect("catalog lock").last_refresh = Some(Instant::now());
                return;
            }
        };
        // Manifests load without holding the state lock: lookups go on.
        let (known, bad, listing) = {
            let st = self.state.read().expect("catalog lock");
            (
                st.by_id.keys().cloned().collect::<HashSet<_>>(),
                st.bad.clone(),
                st.listing,
            )
        };
        let listed: HashSet<String> = ids.iter().cloned().collect();
        let new: Vec<String> = ids
            .into_iter()
            .filter(|id| !known.contains(id) && !bad.contains(id))
            .collect();
        let mut scratch = State {
            listing: listing + 1,
            ..State::default()
        };
        let loaded = self.load(&mut scratch, &new);

        let mut st = self.state.write().expect("catalog lock");
        st.listing = listing + 1;
        st.bad.extend(scratch.bad);
        let gone: Vec<String> = st
            .by_id
            .keys()
            .filter(|id| !listed.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            tracing::info!("snapshot {id} was removed from the repository; it leaves the tree");
            st.by_id.remove(&id);
            for list in st.vms.values_mut() {
                list.retain(|e| e.snap.id != id);
            }
        }
        st.vms.retain(|_, l| !l.is_empty());
        Self::insert(&mut st, loaded);
        st.last_refresh = Some(Instant::now());
    }

    fn add_new(&self, st: &mut State, ids: Vec<String>) {
        let loaded = self.load(st, &ids);
        Self::insert(st, loaded);
    }

    /// Load the manifests of `ids`; damaged ones go to `st.bad`.
    fn load(&self, st: &mut State, ids: &[String]) -> Vec<Snapshot> {
        let repo = Arc::clone(&self.repo.read().expect("repo lock").repo);
        let mut out = Vec::new();
        for id in ids {
            match snapshot::load(self.backend.as_ref(), repo.keys(), id) {
                Ok(s) => out.push(s),
                Err(e) if e.is_damage() || matches!(e, ekko::Error::UnsupportedVersion { .. }) => {
                    tracing::error!("snapshot {id} is left out of the tree: {e}");
                    st.bad.insert(id.clone());
                }
                // Perhaps transient (a backend error): retried next listing.
                Err(e) => tracing::warn!("cannot load snapshot {id} ({e}); will retry"),
            }
        }
        out
    }

    /// Name new snapshots and add them. Names are given in time order, so a
    /// second snapshot within the same second gets `.1`.
    fn insert(st: &mut State, mut new: Vec<Snapshot>) {
        new.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
        let listing = st.listing;
        for snap in new {
            let vm_dir = vm_dir_name(&snap.vm);
            let time = ekko::time::parse_rfc3339(&snap.time).unwrap_or(SystemTime::UNIX_EPOCH);
            let base = match ekko::time::parse_rfc3339(&snap.time) {
                Some(t) => humantime::format_rfc3339_seconds(t).to_string(),
                None => {
                    tracing::warn!(
                        "snapshot {} has an unreadable time {:?}",
                        snap.id,
                        snap.time
                    );
                    safe_name(&snap.time)
                }
            };
            let list = st.vms.entry(vm_dir.clone()).or_default();
            let mut time_dir = base.clone();
            let mut n = 0;
            while list.iter().any(|e| e.time_dir == time_dir) {
                n += 1;
                time_dir = format!("{base}.{n}");
            }
            let entry = Arc::new(SnapEntry {
                vm_dir,
                time_dir,
                time,
                seen_at: listing,
                readers: Mutex::new(HashMap::new()),
                snap,
            });
            list.push(Arc::clone(&entry));
            list.sort_by(|a, b| {
                a.snap
                    .time
                    .cmp(&b.snap.time)
                    .then(a.snap.id.cmp(&b.snap.id))
            });
            st.by_id.insert(entry.snap.id.clone(), entry);
        }
    }

    /// VM directory names, sorted.
    pub fn vms(&self) -> Vec<String> {
        self.state
            .read()
            .expect("catalog lock")
            .vms
            .keys()
            .cloned()
            .collect()
    }

    /// Snapshots of one VM, oldest first (empty if the VM is gone).
    pub fn snapshots(&self, vm_dir: &str) -> Vec<Arc<SnapEntry>> {
        self.state
            .read()
            .expect("catalog lock")
            .vms
            .get(vm_dir)
            .cloned()
            .unwrap_or_default()
    }

    pub fn by_id(&self, id: &str) -> Option<Arc<SnapEntry>> {
        self.state
            .read()
            .expect("catalog lock")
            .by_id
            .get(id)
            .cloned()
    }

    /// All snapshot ids, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .state
            .read()
            .expect("catalog lock")
            .by_id
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// A reader of one disk of a snapshot, sharing the mount's caches.
    pub fn reader(&self, entry: &SnapEntry, disk: &str) -> ekko::Result<Arc<DiskReader>> {
        let (repo, generation) = self.repo_for(entry.seen_at)?;
        let mut readers = entry.readers.lock().expect("readers lock");
        if let Some((g, r)) = readers.get(disk) {
            if *g == generation {
                return Ok(Arc::clone(r));
            }
        }
        let r = Arc::new(DiskReader::new(
            repo,
            &entry.snap,
            disk,
            Arc::clone(&self.nodes),
            Arc::clone(&self.chunks),
        )?);
        readers.insert(disk.to_string(), (generation, Arc::clone(&r)));
        Ok(r)
    }

    /// A repository whose index covers snapshots seen in listing `seen_at`.
    fn repo_for(&self, seen_at: u64) -> ekko::Result<(Arc<Repository>, u64)> {
        {
            let v = self.repo.read().expect("repo lock");
            if v.covers >= seen_at {
                return Ok((Arc::clone(&v.repo), v.generation));
            }
        }
        let _serial = self.reopen_lock.lock().expect("reopen lock");
        let generation = {
            let v = self.repo.read().expect("repo lock");
            if v.covers >= seen_at {
                return Ok((Arc::clone(&v.repo), v.generation));
            }
            v.generation
        };
        let covers = self.state.read().expect("catalog lock").listing;
        let started = Instant::now();
        // Same keys, newer index: take in the index files written since.
        let repo = Arc::clone(&self.repo.read().expect("repo lock").repo);
        repo.refresh_index()?;
        tracing::info!(elapsed = ?started.elapsed(), "refreshed the index to read snapshots committed after mounting");
        let mut v = self.repo.write().expect("repo lock");
        *v = RepoView {
            repo: Arc::clone(&repo),
            covers,
            generation: generation + 1,
        };
        Ok((repo, generation + 1))
    }
}

/// A directory name for an arbitrary string: no `/` or NUL, never `.`/`..`.
pub fn safe_name(s: &str) -> String {
    let n: String = s
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    match n.as_str() {
        "" | "." | ".." => format!("_{n}"),
        _ => n,
    }
}

/// A VM's directory name; `ids` is taken by the id links.
fn vm_dir_name(vm: &str) -> String {
    let n = safe_name(vm);
    if n == "ids" {
        "vm-ids".to_string()
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe() {
        assert_eq!(safe_name("a/b"), "a_b");
        assert_eq!(safe_name(".."), "_..");
        assert_eq!(safe_name(""), "_");
        assert_eq!(vm_dir_name("ids"), "vm-ids");
        assert_eq!(vm_dir_name("web1"), "web1");
    }
}
