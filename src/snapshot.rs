//! Snapshot manifests: one sealed file per snapshot, written last.
//!
//! A manifest names the VM, the instant, the parent, and for each disk its
//! size, chunk size, block map root, source and how it was captured. The set
//! of chunks a snapshot references follows from the manifest alone (walk the
//! maps), which is what garbage collection will need.

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::blockmap::MapRef;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::format::{self, MAGIC_SNAPSHOT};
use crate::id::ObjectId;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    Full,
    Incremental,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Capture {
    pub mode: CaptureMode,
    /// Dirty bitmap whose extents were read (incremental only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// Bitmap generation that records writes after this snapshot, for the
    /// next incremental.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_bitmap: Option<String>,
    /// Why a full read was done when an incremental was possible in principle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct DiskStats {
    pub bytes_read: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
    pub chunks: u64,
    pub chunks_new: u64,
    pub chunks_zero: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Disk {
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    pub map: MapRef,
    pub source: String,
    pub capture: Capture,
    pub stats: DiskStats,
}

impl Disk {
    pub fn nchunks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size))
    }
}

/// The libvirt domain a snapshot was taken from (`ekko backup --domain`).
/// Absent from manifests of other backups and of older versions.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DomainRecord {
    /// The domain's UUID.
    pub uuid: String,
    /// The libvirt URI it was reached through.
    pub connect: String,
    /// OpenStack Nova's metadata, when the domain is a Nova instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nova: Option<NovaRecord>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NovaRecord {
    pub instance_uuid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_uuid: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Snapshot {
    pub id: String,
    pub vm: String,
    /// RFC 3339 UTC, nanosecond precision.
    pub time: String,
    pub parent: Option<String>,
    pub host: String,
    pub disks: Vec<Disk>,
    pub ekko_version: String,
    /// Set by libvirt domain backups; older manifests lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<DomainRecord>,
    /// Labels given at backup (`--tag`), sorted, each once; older
    /// manifests lack them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl Snapshot {
    pub fn disk(&self, name: &str) -> Result<&Disk> {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| Error::DiskNotFound {
                snapshot: self.id.clone(),
                disk: name.to_string(),
                available: self
                    .disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Whether the snapshot carries every one of `tags`.
    pub fn has_tags(&self, tags: &[String]) -> bool {
        tags.iter().all(|t| self.tags.contains(t))
    }

    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(8)]
    }
}

pub fn snapshot_name(id: &str) -> String {
    format!("snapshots/{id}")
}

/// Whether `vm` may name a VM in a new snapshot, with the reason if not.
/// A name is a folder in the FUSE tree, so it is non-empty, at most 200
/// bytes, not `.` or `..`, and holds no `/`, control character, or leading
/// or trailing space. (`@` is allowed, as libvirt allows it: `a@b@latest`
/// names `a@b`'s newest snapshot. Older snapshots with other names still
/// read.)
pub fn check_vm_name(vm: &str) -> std::result::Result<(), String> {
    let bad = |why: &str| Err(format!("VM name {vm:?}: {why}"));
    if vm.is_empty() {
        return bad("must not be empty");
    }
    if vm.len() > 200 {
        return bad("is longer than 200 bytes");
    }
    if vm == "." || vm == ".." {
        return bad("must not be . or ..");
    }
    if let Some(c) = vm.chars().find(|c| *c == '/' || c.is_control()) {
        return bad(&format!(
            "must not contain {c:?} (it is a folder name in the mounted tree)"
        ));
    }
    if vm.trim() != vm {
        return bad("must not begin or end with a space");
    }
    Ok(())
}

/// Whether `tag` may label a snapshot, with the reason if not: 1 to 64
/// bytes of letters, digits and `-_.:+=@`, so that a tag is safe in file
/// names, shell words and the table that `ekko snapshots` prints.
pub fn check_tag(tag: &str) -> std::result::Result<(), String> {
    if tag.is_empty() || tag.len() > 64 {
        return Err(format!("tag {tag:?}: must be 1 to 64 bytes long"));
    }
    if let Some(c) = tag
        .chars()
        .find(|c| !(c.is_alphanumeric() || "-_.:+=@".contains(*c)))
    {
        return Err(format!(
            "tag {tag:?}: {c:?} is not allowed (letters, digits and -_.:+=@ are)"
        ));
    }
    Ok(())
}

pub fn new_id() -> String {
    ObjectId::random().to_hex()
}

pub fn save(backend: &dyn Backend, keys: &Keys, snap: &Snapshot) -> Result<()> {
    let name = snapshot_name(&snap.id);
    let body = serde_json::to_vec(snap).expect("serializable");
    backend.put(
        &name,
        &format::seal_file(keys, MAGIC_SNAPSHOT, &name, &body),
    )
}

pub fn load(backend: &dyn Backend, keys: &Keys, id: &str) -> Result<Snapshot> {
    decode(keys, id, &backend.get(&snapshot_name(id))?)
}

/// Open, authenticate and validate the stored bytes of manifest `id`.
pub fn decode(keys: &Keys, id: &str, data: &[u8]) -> Result<Snapshot> {
    let name = snapshot_name(id);
    let body = format::open_file(keys, MAGIC_SNAPSHOT, "snapshot", &name, data)?;
    let s: Snapshot =
        serde_json::from_slice(&body).map_err(|e| Error::corrupt(&name, e.to_string()))?;
    if s.id != id {
        return Err(Error::corrupt(&name, "manifest id does not match its name"));
    }
    for d in &s.disks {
        if !d.chunk_size.is_power_of_two()
            || d.chunk_size < 4096
            || usize::try_from(d.map.fanout) != Ok(crate::blockmap::FANOUT)
        {
            return Err(Error::corrupt(
                &name,
                format!("disk {:?} has an invalid chunk size or map", d.name),
            ));
        }
        // The depth follows from the size (docs/FORMAT.md). Readers walk
        // `depth` levels and take the leaves to cover the disk: a depth of
        // 0, or one too small for the size, made a single node stand for
        // every block of the disk.
        let want = crate::blockmap::depth_for(d.nchunks());
        if d.map.depth != want {
            return Err(Error::corrupt(
                &name,
                format!(
                    "disk {:?}: map depth {} does not fit its size (a map of {} blocks has depth {want})",
                    d.name,
                    d.map.depth,
                    d.nchunks()
                ),
            ));
        }
    }
    Ok(s)
}

/// Ids of all snapshots (names under `snapshots/`).
pub fn list_ids(backend: &dyn Backend) -> Result<Vec<String>> {
    Ok(backend
        .list("snapshots/")?
        .into_iter()
        .filter_map(|o| o.name.strip_prefix("snapshots/").map(str::to_string))
        .filter(|n| ObjectId::from_hex(n).is_some())
        .collect())
}

/// Manifests fetched at once from an object store, where each GET is a
/// round trip (a local folder reads them one by one).
const PARALLEL_GETS: usize = 16;

/// Load every snapshot, sorted by time. Damaged manifests are returned
/// separately so that listing still works around them.
pub fn load_all(backend: &dyn Backend, keys: &Keys) -> Result<(Vec<Snapshot>, Vec<Error>)> {
    let ids = list_ids(backend)?;
    let threads = if backend.prefers_large_reads() {
        PARALLEL_GETS.min(ids.len())
    } else {
        1
    };
    let load_each = |ids: &[String]| -> Vec<Result<Snapshot>> {
        ids.iter().map(|id| load(backend, keys, id)).collect()
    };
    let loaded: Vec<Result<Snapshot>> = if threads > 1 {
        std::thread::scope(|s| {
            let parts: Vec<_> = ids
                .chunks(ids.len().div_ceil(threads))
                .map(|part| s.spawn(move || load_each(part)))
                .collect();
            parts
                .into_iter()
                .flat_map(|p| p.join().expect("manifest loader panicked"))
                .collect()
        })
    } else {
        load_each(&ids)
    };
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for r in loaded {
        match r {
            Ok(s) => ok.push(s),
            // Forgotten since the listing.
            Err(Error::NotFound { .. }) => {}
            Err(e) if e.is_damage() || matches!(e, Error::UnsupportedVersion { .. }) => bad.push(e),
            Err(e) => return Err(e),
        }
    }
    ok.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
    Ok((ok, bad))
}

/// Whether `spec` is a full snapshot id (in either case) that `snapshots/`
/// holds: how a snapshot whose manifest does not open is named (by
/// `forget` and `protect --remove`).
pub fn is_listed_full_id(backend: &dyn Backend, spec: &str) -> bool {
    ObjectId::from_hex(spec)
        .is_some_and(|id| list_ids(backend).is_ok_and(|l| l.contains(&id.to_hex())))
}

/// `resolve`, for a snapshot to read or to act on: `VM@latest` is refused
/// while a manifest does not open, as that one may be the VM's newest (a
/// restore would silently give older data). A backup's parent is chosen
/// with `resolve`, which takes the newest that opens.
pub fn resolve_exact(backend: &dyn Backend, keys: &Keys, spec: &str) -> Result<Snapshot> {
    if let Some(vm) = spec.strip_suffix("@latest") {
        let (all, bad) = load_all(backend, keys)?;
        if let Some(first) = bad.first() {
            return Err(Error::corrupt(
                "snapshots/",
                format!(
                    "{} snapshot manifest(s) do not open ({first}{}), and one may be {vm}'s newest snapshot, so {spec} cannot be told: name the snapshot by its id (`ekko snapshots --vm {vm}` lists those that open), or repair the manifest (`ekko check --repair`)",
                    bad.len(),
                    if bad.len() > 1 { ", …" } else { "" }
                ),
            ));
        }
        return latest_of(all, vm, spec);
    }
    resolve(backend, keys, spec)
}

/// The newest of `all` (sorted oldest first) whose VM is `vm`.
fn latest_of(all: Vec<Snapshot>, vm: &str, spec: &str) -> Result<Snapshot> {
    all.into_iter()
        .rev()
        .find(|s| s.vm == vm)
        .ok_or_else(|| Error::SnapshotNotFound { spec: spec.into() })
}

/// Resolve a full id, a unique prefix, or `VM@latest` (the newest of the
/// VM's snapshots whose manifests open).
pub fn resolve(backend: &dyn Backend, keys: &Keys, spec: &str) -> Result<Snapshot> {
    if let Some(vm) = spec.strip_suffix("@latest") {
        let (all, bad) = load_all(backend, keys)?;
        if !bad.is_empty() {
            tracing::warn!(
                "{} snapshot manifest(s) do not open (`ekko check` names them): {spec} is the newest of those that do",
                bad.len()
            );
        }
        return latest_of(all, vm, spec);
    }
    let spec_l = spec.to_ascii_lowercase();
    if spec_l.is_empty() || !spec_l.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::SnapshotNotFound { spec: spec.into() });
    }
    let matches: Vec<String> = list_ids(backend)?
        .into_iter()
        .filter(|id| id.starts_with(&spec_l))
        .collect();
    match matches.len() {
        0 => Err(Error::SnapshotNotFound { spec: spec.into() }),
        1 => load(backend, keys, &matches[0]),
        n => Err(Error::AmbiguousSnapshot {
            spec: spec.into(),
            count: n,
            matches: matches.into_iter().take(5).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"{"id":"00112233445566778899aabbccddeeff","vm":"web1",
        "time":"2026-11-25T21:42:18.123456789Z","parent":null,"host":"h",
        "ekko_version":"0.1.0","disks":[{"name":"vda","size":1048576,
        "chunk_size":1048576,"map":{"root":"0000000000000000000000000000000000000000000000000000000000000000","depth":1,"fanout":256},
        "source":"x","capture":{"mode":"full"},"stats":{"bytes_read":0,
        "bytes_new":0,"bytes_stored":0,"chunks":1,"chunks_new":0,"chunks_zero":1}}]}"#;

    /// The manifest as ekko read it before the `domain` member existed.
    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct OldSnapshot {
        id: String,
        vm: String,
        disks: Vec<Disk>,
    }

    /// Found by the fuzz/disk_read target (timeouts; two of its inputs
    /// below): a manifest whose map depth did not fit its disk size was accepted,
    /// and with depth 0 (or 1 for a disk of billions of blocks) one node
    /// answered for every block, so a SEEK_HOLE scan ran for hours.
    #[test]
    fn a_map_depth_that_does_not_fit_the_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::backend::LocalBackend::new(dir.path());
        let keys = Keys::clear([1; 32]);
        let mut s: Snapshot = serde_json::from_str(OLD).unwrap();
        save(&backend, &keys, &s).unwrap();
        load(&backend, &keys, &s.id).unwrap();
        for (depth, size, chunk_size) in [
            (0, 281_475_261_923_370, 131_072),
            (1, 281_470_681_802_496, 4096),
            (0, 0, 4096),
            (2, 4096, 4096),
        ] {
            s.disks[0].map.depth = depth;
            s.disks[0].size = size;
            s.disks[0].chunk_size = chunk_size;
            save(&backend, &keys, &s).unwrap();
            assert!(
                matches!(load(&backend, &keys, &s.id), Err(Error::Corrupt { .. })),
                "depth {depth}, size {size}"
            );
        }
        // The depth that fits loads, however large the disk.
        s.disks[0].size = 281_470_681_802_496;
        s.disks[0].chunk_size = 4096;
        s.disks[0].map.depth = crate::blockmap::depth_for(s.disks[0].nchunks());
        assert_eq!(s.disks[0].map.depth, 5);
        save(&backend, &keys, &s).unwrap();
        load(&backend, &keys, &s.id).unwrap();
    }

    #[test]
    fn the_domain_record_is_optional_both_ways() {
        // A manifest without it reads, and writes back without it.
        let s: Snapshot = serde_json::from_str(OLD).unwrap();
        assert_eq!(s.domain, None);
        let again = serde_json::to_string(&s).unwrap();
        assert!(!again.contains("domain"), "{again}");

        // With it: round trip, and an older reader ignores it.
        let mut s = s;
        s.domain = Some(DomainRecord {
            uuid: "u".into(),
            connect: "qemu:///system".into(),
            nova: Some(NovaRecord {
                instance_uuid: "u".into(),
                name: Some("web-1".into()),
                project_uuid: None,
            }),
        });
        let json = serde_json::to_string(&s).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back.domain, s.domain);
        let old: OldSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(old.vm, "web1");
        assert_eq!(old.disks.len(), 1);
    }
}
