//! Live capture: full and incremental backups of running QEMU VMs, read in
//! pull mode through persistent dirty bitmaps (the way libvirt does it).
//!
//! # Flow
//!
//! 1. [`LiveBackup::prepare`] connects to QMP, removes what dead ekko
//!    processes left in QEMU ([`ekko_qmp::cleanup_stale`]), chooses the disks,
//!    and decides per disk between an incremental and a full read (below).
//!    Nothing in QEMU or the repository is changed by a decision.
//! 2. [`LiveBackup::run`] starts **one** [`FleeceSession`] for all disks: one
//!    QMP transaction adds the next bitmap generation, disables the previous
//!    one and starts the copy-before-write jobs, so every disk is captured at
//!    the same instant. Each disk's point-in-time export is then read through
//!    libnbd (several connections, behind the shared [`RateLimiter`]) into one
//!    [`backup::Session`]: an incremental reads only the dirty extents of the
//!    previous generation and takes every other block from the parent map.
//! 3. The snapshot is committed, and only then the session is finished with
//!    `committed = true`, which removes the previous generation. Stale
//!    generations of this repository on the captured nodes are removed after
//!    that. On any error, on cancel (Ctrl-C, SIGTERM) and on unwinding, the
//!    session is finished with `committed = false`: QEMU is put back as it
//!    was, the previous generation re-enabled with the writes of the session
//!    merged into it. The repository then holds at most unreferenced packs.
//!
//! # Bitmap generations
//!
//! Generations are named `ekko-<first 8 hex of the repository id>-<8 random
//! hex>`, so two repositories (or ekko and another tool) never take each
//! other's bitmaps. The generation created at a snapshot's instant is
//! recorded as `capture.next_bitmap` of each of its disks; the one an
//! incremental read is `capture.bitmap`. Stale generations are only ever
//! removed when they carry this repository's prefix.
//!
//! # When an incremental is taken
//!
//! Invariant: a generation that exists, is persistent, consistent, recording
//! and not busy has recorded every write since the instant of the snapshot
//! that names it as `next_bitmap` (it is created in that snapshot's
//! transaction, and a failed session merges its writes back into it).
//! So a disk is read incrementally only when the VM's latest snapshot in this
//! repository has the disk with the same size and chunk size, its map can be
//! read, and its `next_bitmap` is in that state on the disk's node. All disks
//! of a session share one previous generation: if it is unusable on any disk,
//! every disk is read in full. A full read still stores only new chunks. The
//! reason for a full read is returned per disk and stored as
//! `capture.reason`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ekko_qmp::{inventory, DiskSpec, FleeceSession, NodeInfo, Qmp, SessionConfig};
use serde_json::Value;

use crate::backup::{BackupOptions, DiskPlan, Progress, Session};
use crate::blockmap;
use crate::ratelimit::{RateLimited, RateLimiter};
use crate::reader::{NodeCache, RepoNodes};
use crate::repo::Repository;
use crate::snapshot::{self, Capture, CaptureMode, Disk, Snapshot};
use crate::source::{NbdSource, Range, Source};

pub mod libvirt;
pub mod space;

/// Where fleecing files go unless told otherwise: a disk-backed directory
/// (they grow by what the guest overwrites during the backup).
pub const DEFAULT_WORKDIR: &str = "/var/tmp/ekko";

/// Errors of a live capture.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("QEMU at {qmp}: {source}")]
    Qemu {
        qmp: PathBuf,
        #[source]
        source: ekko_qmp::Error,
    },

    #[error("QEMU at {qmp} reports no writable disk; name the disks with --disk NAME=NODE")]
    NoDisks { qmp: PathBuf },

    #[error("disk {name}: QEMU has no disk or block node {node:?} (its disks: {available}); give --disk NAME=NODE with a device or node name from `query-block` or `query-named-block-nodes`")]
    UnknownNode {
        name: String,
        node: String,
        available: String,
    },

    #[error("disk {name}: block node {node:?} is read-only, so there is nothing a guest could change; leave it out")]
    ReadOnly { name: String, node: String },

    #[error("invalid disk selection: {0}")]
    Invalid(String),

    #[error("disk {disk}: {source}")]
    Disk {
        disk: String,
        #[source]
        source: crate::Error,
    },

    #[error("QEMU (pid {pid}) exited during the backup of disk {disk} ({detail}); nothing was committed, and the repository holds at most unreferenced packs; start the VM again and rerun the backup")]
    QemuGone {
        pid: String,
        disk: String,
        detail: String,
    },

    #[error("interrupted: nothing was committed, and QEMU was put back as it was (the last snapshot's bitmap generation keeps recording)")]
    Interrupted,

    #[error("the fleecing directory {dir} has {} MiB free, below the {} MiB kept in reserve: {what}. Nothing was committed, and QEMU is as it was. QEMU copies every block the guest overwrites during a backup into this directory, and fails the guest's write when it cannot; give --workdir a directory with more room, or lower --workdir-reserve", .free >> 20, .reserve >> 20)]
    WorkdirFull {
        dir: PathBuf,
        free: u64,
        reserve: u64,
        /// "the backup did not start", or how it stopped.
        what: &'static str,
    },

    #[error(transparent)]
    Repo(#[from] crate::Error),
}

impl Error {
    /// True when the repository's data is damaged (as opposed to QEMU or
    /// usage problems).
    pub fn is_damage(&self) -> bool {
        match self {
            Error::Disk { source, .. } | Error::Repo(source) => source.is_damage(),
            _ => false,
        }
    }
}

/// What to capture, and how.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    pub vm: String,
    /// QMP socket of QEMU or qemu-storage-daemon.
    pub qmp: PathBuf,
    /// `(name, QEMU device or node name)`; empty means every writable disk
    /// that QEMU reports, named after its device (or node).
    pub disks: Vec<(String, String)>,
    /// Read every disk in full.
    pub full: bool,
    /// qemu-guest-agent socket: freeze guest file systems for the instant.
    pub freeze: Option<PathBuf>,
    /// Directory for the fleecing files, which ekko creates and QEMU opens
    /// for reading and writing.
    pub workdir: PathBuf,
    /// NBD connections per disk.
    pub connections: usize,
    /// Cap on bytes per second read from QEMU, shared by all workers.
    pub rate_limit: Option<u64>,
    /// Free space to keep in `workdir` (see `space`); `None`: the default.
    pub workdir_reserve: Option<u64>,
    /// How long to wait for each QMP answer.
    pub qmp_timeout: Duration,
    /// The TCP address of an NBD server QEMU already runs (`--nbd-server`).
    pub nbd_tcp: Option<std::net::SocketAddr>,
    /// Tags recorded in the snapshot (`Session::set_tags`).
    pub tags: Vec<String>,
}

impl LiveOptions {
    pub fn new(vm: impl Into<String>, qmp: impl Into<PathBuf>) -> LiveOptions {
        LiveOptions {
            vm: vm.into(),
            qmp: qmp.into(),
            disks: Vec::new(),
            full: false,
            freeze: None,
            workdir: PathBuf::from(DEFAULT_WORKDIR),
            connections: 4,
            rate_limit: None,
            workdir_reserve: None,
            qmp_timeout: Duration::from_secs(60),
            nbd_tcp: None,
            tags: Vec::new(),
        }
    }
}

/// Whether a disk is read incrementally, and if not, why.
#[derive(Debug, Clone)]
pub struct Decision {
    incremental: bool,
    /// Why the disk is read in full (`None` for an incremental).
    pub reason: Option<String>,
}

impl Decision {
    /// Incremental, until a reason to read in full is found.
    pub fn incremental() -> Decision {
        Decision {
            incremental: true,
            reason: None,
        }
    }

    pub fn is_incremental(&self) -> bool {
        self.incremental
    }

    pub fn mode(&self) -> CaptureMode {
        if self.incremental {
            CaptureMode::Incremental
        } else {
            CaptureMode::Full
        }
    }

    /// Read in full for `reason`; the first reason given is kept.
    pub fn full(&mut self, reason: String) {
        if self.incremental {
            self.incremental = false;
            self.reason = Some(reason);
        }
    }
}

/// A disk to capture and the decision taken for it.
#[derive(Debug, Clone)]
pub struct PlannedDisk {
    pub name: String,
    pub node: String,
    pub size: u64,
    pub decision: Decision,
}

/// The outcome for one disk.
#[derive(Debug, Clone)]
pub struct DiskReport {
    /// The disk as stored in the snapshot (capture record and statistics).
    pub disk: Disk,
    pub node: String,
    /// Bytes the previous generation marks as written (incremental only).
    pub dirty_bytes: Option<u64>,
}

/// The outcome of a live backup.
#[derive(Debug)]
pub struct LiveReport {
    pub snapshot: Snapshot,
    pub disks: Vec<DiskReport>,
    /// Stale generations of this repository removed after the commit, as
    /// `(node, bitmap)`.
    pub removed_bitmaps: Vec<(String, String)>,
    /// Problems after the commit: the snapshot is valid, but QEMU may keep
    /// an old generation until the next backup removes it.
    pub warnings: Vec<String>,
}

/// A prepared live backup; see the module documentation.
pub struct LiveBackup<'r> {
    repo: &'r Repository,
    opts: LiveOptions,
    /// Taken by the session in `run`.
    qmp: Option<Qmp>,
    parent: Option<Snapshot>,
    disks: Vec<PlannedDisk>,
    prev_bitmap: Option<String>,
    new_bitmap: String,
}

/// `ekko-<first 8 hex of the repository id>-`: the prefix of every bitmap
/// generation this repository creates.
pub fn bitmap_prefix(repo: &Repository) -> String {
    let id = &repo.config().id;
    format!("ekko-{}-", &id[..id.len().min(8)])
}

fn new_bitmap_name(repo: &Repository) -> String {
    let random = crate::id::ObjectId::random().to_hex();
    format!("{}{}", bitmap_prefix(repo), &random[..8])
}

/// Reads the parts of a snapshot disk's block map that an incremental
/// needs before it reads any data: the root and every inner node. Cheap (a
/// few nodes per TiB), and it catches a damaged or missing map before a
/// backup commits to building on it.
pub fn check_parent_map(repo: &Repository, disk: &Disk) -> crate::Result<()> {
    let cache = NodeCache::new(64);
    let nodes = RepoNodes {
        repo,
        cache: &cache,
    };
    let nchunks = disk.nchunks();
    if !disk.map.root.is_zero() {
        let root = blockmap::NodeSource::node(&nodes, &disk.map.root)?;
        let below = u64::try_from(blockmap::FANOUT)
            .expect("fits")
            .saturating_pow(u32::from(disk.map.depth.saturating_sub(1)));
        let want = nchunks.div_ceil(below.max(1));
        if u64::try_from(root.len()).ok() != Some(want) {
            return Err(crate::Error::Corrupt {
                name: format!("map root of disk {:?}", disk.name),
                reason: format!("has {} entries, expected {want}", root.len()),
            });
        }
    }
    blockmap::leaf_ids(&nodes, &disk.map, nchunks)?;
    Ok(())
}

/// Why `bitmap` on `node` cannot be trusted to hold every write since its
/// snapshot, or `None` if it can.
fn bitmap_problem(node: &NodeInfo, bitmap: &str, prefix: &str) -> Option<String> {
    let n = &node.node_name;
    let Some(b) = node.bitmaps.iter().find(|b| b.name == bitmap) else {
        let others: Vec<&str> = node
            .bitmaps
            .iter()
            .map(|b| b.name.as_str())
            .filter(|b| b.starts_with(prefix))
            .collect();
        return Some(if others.is_empty() {
            format!("bitmap missing: {bitmap} of the last snapshot is not on node {n} (it was removed, or the image replaced)")
        } else {
            format!(
                "other generation: node {n} has {} but the last snapshot expects {bitmap} (a backup was not committed, or the bitmaps were changed)",
                others.join(", ")
            )
        });
    };
    if b.inconsistent {
        Some(format!("bitmap inconsistent: {bitmap} on node {n} is marked inconsistent (QEMU stopped uncleanly) and may have missed writes"))
    } else if !b.persistent {
        Some(format!(
            "bitmap not persistent: {bitmap} on node {n} would not survive a QEMU restart"
        ))
    } else if !b.recording {
        Some(format!("bitmap disabled: {bitmap} on node {n} is not recording (an interrupted backup?) and may have missed writes"))
    } else if b.busy {
        Some(format!(
            "bitmap busy: {bitmap} on node {n} is in use by another job or export"
        ))
    } else {
        None
    }
}

/// The disks to capture, with their node's state.
fn select_disks(qmp: &mut Qmp, opts: &LiveOptions) -> Result<Vec<(String, NodeInfo)>, Error> {
    let qerr = |source| Error::Qemu {
        qmp: opts.qmp.clone(),
        source,
    };
    let listed = inventory::list_disks(qmp).map_err(qerr)?;
    let nodes = inventory::named_nodes(qmp).map_err(qerr)?;
    let mut chosen: Vec<(String, String)> = Vec::new();
    if opts.disks.is_empty() {
        if listed.is_empty() {
            return Err(Error::NoDisks {
                qmp: opts.qmp.clone(),
            });
        }
        for d in &listed {
            // qdev paths are the last resort for a name; a disk name is one
            // path component.
            chosen.push((
                d.name.trim_matches('/').replace('/', "_"),
                d.node_name.clone(),
            ));
        }
    } else {
        for (name, spec) in &opts.disks {
            let node = listed
                .iter()
                .find(|d| d.name == *spec)
                .or_else(|| listed.iter().find(|d| d.node_name == *spec))
                .map(|d| d.node_name.clone())
                .or_else(|| {
                    nodes
                        .iter()
                        .find(|n| n.node_name == *spec)
                        .map(|n| n.node_name.clone())
                });
            let Some(node) = node else {
                let available: Vec<String> = listed
                    .iter()
                    .map(|d| {
                        if d.name == d.node_name {
                            d.name.clone()
                        } else {
                            format!("{} (node {})", d.name, d.node_name)
                        }
                    })
                    .collect();
                return Err(Error::UnknownNode {
                    name: name.clone(),
                    node: spec.clone(),
                    available: if available.is_empty() {
                        "none".into()
                    } else {
                        available.join(", ")
                    },
                });
            };
            chosen.push((name.clone(), node));
        }
    }
    let mut out: Vec<(String, NodeInfo)> = Vec::new();
    for (name, node) in chosen {
        if name.is_empty() || name.contains('/') {
            return Err(Error::Invalid(format!(
                "disk name {name:?} must be non-empty and contain no '/'"
            )));
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(Error::Invalid(format!("disk {name:?} given twice")));
        }
        if let Some((other, _)) = out.iter().find(|(_, i)| i.node_name == node) {
            return Err(Error::Invalid(format!(
                "disks {other:?} and {name:?} are the same block node {node:?}"
            )));
        }
        let info = nodes
            .iter()
            .find(|n| n.node_name == node)
            .cloned()
            .ok_or_else(|| Error::UnknownNode {
                name: name.clone(),
                node: node.clone(),
                available: String::from("none"),
            })?;
        if info.read_only {
            return Err(Error::ReadOnly { name, node });
        }
        if info.driver != "qcow2" {
            // QEMU's transaction would fail with "Can't store persistent
            // bitmaps … Operation not supported".
            return Err(Error::Invalid(format!(
                "disk {name} (node {node}) is a {} image, and QEMU keeps persistent dirty bitmaps only in qcow2 images: back up the VM's other disks (--disk NAME=NODE for each), and this one offline or once converted to qcow2",
                info.driver
            )));
        }
        out.push((name, info));
    }
    Ok(out)
}

/// The decision for every disk, and the previous generation the session
/// exports (if any). See the module documentation.
fn decide(
    repo: &Repository,
    vm: &str,
    parent: Option<&Snapshot>,
    disks: &[(String, NodeInfo)],
    full: bool,
) -> (Option<String>, Vec<PlannedDisk>) {
    let prefix = bitmap_prefix(repo);
    let mut planned: Vec<PlannedDisk> = disks
        .iter()
        .map(|(name, info)| PlannedDisk {
            name: name.clone(),
            node: info.node_name.clone(),
            size: info.size,
            decision: Decision::incremental(),
        })
        .collect();
    let parent = match parent {
        _ if full => {
            planned
                .iter_mut()
                .for_each(|d| d.decision.full("--full was given".into()));
            return (None, planned);
        }
        None => {
            planned.iter_mut().for_each(|d| {
                d.decision
                    .full(format!("first backup of VM {vm} in this repository"))
            });
            return (None, planned);
        }
        Some(p) => p,
    };

    // The generation the parent recorded, per disk.
    let mut prev: Option<String> = None;
    for d in &mut planned {
        let Ok(pd) = parent.disk(&d.name) else {
            d.decision.full(format!(
                "new disk: snapshot {} of VM {vm} has no disk {}",
                parent.short_id(),
                d.name
            ));
            continue;
        };
        match pd.capture.next_bitmap.as_deref() {
            None => d.decision.full(format!(
                "no generation: snapshot {} recorded no bitmap generation for this disk",
                parent.short_id()
            )),
            Some(b) if !b.starts_with(&prefix) => d.decision.full(format!(
                "other generation: snapshot {} recorded bitmap {b}, which is not one of this repository's ({prefix}*)",
                parent.short_id()
            )),
            Some(b) => match &prev {
                None => prev = Some(b.to_string()),
                Some(p) if p == b => {}
                Some(p) => d.decision.full(format!(
                    "other generation: snapshot {} recorded {b} for this disk but {p} for another",
                    parent.short_id()
                )),
            },
        }
    }
    let Some(prev) = prev else {
        return (None, planned);
    };

    // One generation for all disks of the session: it must be usable on
    // every node, or no disk is read incrementally.
    let problems: Vec<Option<String>> = disks
        .iter()
        .map(|(_, info)| bitmap_problem(info, &prev, &prefix))
        .collect();
    if let Some((i, p)) = problems
        .iter()
        .enumerate()
        .find_map(|(i, p)| p.as_ref().map(|p| (i, p)))
    {
        let culprit = planned[i].name.clone();
        for (d, own) in planned.iter_mut().zip(&problems) {
            d.decision.full(own.clone().unwrap_or_else(|| {
                format!("disk {culprit} cannot be read incrementally ({p}), and all disks of a VM are captured with one bitmap generation")
            }));
        }
        return (None, planned);
    }

    for d in &mut planned {
        if !d.decision.is_incremental() {
            continue;
        }
        let pd = parent.disk(&d.name).expect("checked above");
        if pd.size != d.size {
            d.decision
                .full(format!("size changed: {} → {} bytes", pd.size, d.size));
        } else if pd.chunk_size != repo.config().chunk_size {
            d.decision.full(format!(
                "chunk size changed: {} → {} bytes",
                pd.chunk_size,
                repo.config().chunk_size
            ));
        } else if let Err(e) = check_parent_map(repo, pd) {
            d.decision.full(format!(
                "parent damaged: the block map of disk {} in snapshot {} cannot be read ({e}); run `ekko check`",
                d.name,
                parent.short_id()
            ));
        }
    }
    (Some(prev), planned)
}

/// Sum of the lengths of `ranges` within `size`.
pub fn range_bytes(ranges: &[Range], size: u64) -> u64 {
    ranges
        .iter()
        .map(|r| {
            r.offset
                .saturating_add(r.len)
                .min(size)
                .saturating_sub(r.offset.min(size))
        })
        .sum()
}

impl<'r> LiveBackup<'r> {
    /// Connects to QEMU, cleans up after dead backup processes, chooses the
    /// disks and decides how to read each. Changes nothing of the backup
    /// state in QEMU or in the repository.
    pub fn prepare(repo: &'r Repository, opts: &LiveOptions) -> Result<LiveBackup<'r>, Error> {
        let qerr = |source| Error::Qemu {
            qmp: opts.qmp.clone(),
            source,
        };
        let mut qmp = Qmp::connect_with_timeout(&opts.qmp, opts.qmp_timeout).map_err(qerr)?;
        let cleaned = ekko_qmp::cleanup_stale(&mut qmp).map_err(qerr)?;
        if !cleaned.is_empty() {
            tracing::warn!(
                exports = ?cleaned.exports, jobs = ?cleaned.jobs, nodes = ?cleaned.nodes,
                "removed what an interrupted ekko process left in QEMU"
            );
        }
        let disks = select_disks(&mut qmp, opts)?;
        let parent = match snapshot::resolve(
            repo.backend().as_ref(),
            repo.keys(),
            &format!("{}@latest", opts.vm),
        ) {
            Ok(s) => Some(s),
            Err(crate::Error::SnapshotNotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let (prev_bitmap, planned) = decide(repo, &opts.vm, parent.as_ref(), &disks, opts.full);
        for d in &planned {
            tracing::info!(disk = %d.name, node = %d.node, mode = ?d.decision.mode(), reason = ?d.decision.reason, "capture planned");
        }
        Ok(LiveBackup {
            repo,
            opts: opts.clone(),
            qmp: Some(qmp),
            parent,
            disks: planned,
            prev_bitmap,
            new_bitmap: new_bitmap_name(repo),
        })
    }

    pub fn disks(&self) -> &[PlannedDisk] {
        &self.disks
    }

    /// The snapshot an incremental builds on.
    pub fn parent(&self) -> Option<&Snapshot> {
        self.parent.as_ref()
    }

    /// The generation whose dirty blocks are read, if any disk is incremental.
    pub fn prev_bitmap(&self) -> Option<&str> {
        self.prev_bitmap.as_deref()
    }

    /// The generation that starts at this backup's instant.
    pub fn new_bitmap(&self) -> &str {
        &self.new_bitmap
    }

    fn session_config(&self) -> SessionConfig {
        let mut cfg = SessionConfig::new(
            &self.opts.workdir,
            self.new_bitmap.clone(),
            self.prev_bitmap.clone(),
        );
        cfg.freeze = self.opts.freeze.clone();
        cfg.nbd_tcp = self.opts.nbd_tcp;
        cfg
    }

    fn qemu_err(&self, source: ekko_qmp::Error) -> Error {
        Error::Qemu {
            qmp: self.opts.qmp.clone(),
            source,
        }
    }

    /// Captures every disk at one instant, backs them up and commits the
    /// snapshot. `opts.threads` and `opts.cancel` apply; `progress` gives
    /// each disk's progress callback.
    pub fn run(
        mut self,
        opts: &BackupOptions,
        progress: &dyn Fn(&PlannedDisk) -> Option<Progress>,
    ) -> Result<LiveReport, Error> {
        let limiter = match self.opts.rate_limit {
            Some(r) => Some(Arc::new(
                RateLimiter::new(r)?.with_cancel(Arc::clone(&opts.cancel)),
            )),
            None => None,
        };
        let specs: Vec<DiskSpec> = self
            .disks
            .iter()
            .map(|d| DiskSpec {
                name: d.name.clone(),
                node: d.node.clone(),
            })
            .collect();

        if opts.cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        // Reading the exports needs libnbd: fail before QEMU is touched.
        ekko_libnbd::load().map_err(|e| Error::Repo(e.into()))?;
        let reserve = space::reserve_for(&self.opts.workdir, self.opts.workdir_reserve);
        let low_space = |low: space::LowSpace, what| Error::WorkdirFull {
            dir: self.opts.workdir.clone(),
            free: low.free,
            reserve: low.reserve,
            what,
        };
        space::check(&self.opts.workdir, reserve)
            .map_err(|low| low_space(low, "the backup did not start"))?;
        let qmp = self.qmp.take().expect("prepared with a connection");
        let mut time = crate::time::now_rfc3339_nanos();
        let mut session = match FleeceSession::start(qmp, &specs, &self.session_config()) {
            Ok(s) => s,
            // The generation changed between the decision and the start.
            Err(ekko_qmp::Error::BitmapUnusable { disk, reason, .. })
                if self.prev_bitmap.is_some() =>
            {
                let why = format!("bitmap unusable on disk {disk}: {reason}");
                tracing::warn!("{why}; reading every disk in full");
                self.disks
                    .iter_mut()
                    .for_each(|d| d.decision.full(why.clone()));
                self.prev_bitmap = None;
                let qmp = Qmp::connect_with_timeout(&self.opts.qmp, self.opts.qmp_timeout)
                    .map_err(|e| self.qemu_err(e))?;
                time = crate::time::now_rfc3339_nanos();
                FleeceSession::start(qmp, &specs, &self.session_config())
                    .map_err(|e| self.qemu_err(e))?
            }
            Err(e) => return Err(self.qemu_err(e)),
        };
        tracing::info!(session = %session.tag(), new = %self.new_bitmap, prev = ?self.prev_bitmap, "point in time taken");

        let mut backup = match Session::new(self.repo) {
            Ok(b) => b,
            Err(e) => return Err(abort(session, e.into())),
        };
        backup.set_tags(&self.opts.tags);
        let (read, low) = space::watch(&self.opts.workdir, reserve, &opts.cancel, || {
            self.read_disks(&mut session, &mut backup, limiter.as_ref(), opts, progress)
        });
        if let Some(low) = low {
            let why = "the backup stopped before the directory filled up";
            return Err(abort(session, low_space(low, why)));
        }
        let reports = match read {
            Ok(r) if !opts.cancel.load(Ordering::Relaxed) => r,
            Ok(_) => return Err(abort(session, Error::Interrupted)),
            Err(e) => return Err(abort(session, e)),
        };
        let parent_id = self.parent.as_ref().map(|p| p.id.clone());
        let snap = match backup.commit(&self.opts.vm, time, parent_id) {
            Ok(s) => s,
            Err(e) => return Err(abort(session, e.into())),
        };

        // Committed: from here on the backup stands whatever happens.
        let mut warnings = Vec::new();
        let mut removed = Vec::new();
        let (finished, mut qmp) = session.finish_keep_qmp(true);
        match finished {
            Err(e) => warnings.push(format!(
                "snapshot {} is stored, but ending the QEMU session was incomplete ({e}); a leftover old bitmap generation is removed by the next backup",
                snap.short_id()
            )),
            Ok(()) => self.remove_stale(&mut qmp, &mut removed, &mut warnings),
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let disks = reports
            .into_iter()
            .map(|(node, dirty_bytes, name)| DiskReport {
                disk: snap.disk(&name).expect("committed disk").clone(),
                node,
                dirty_bytes,
            })
            .collect();
        Ok(LiveReport {
            snapshot: snap,
            disks,
            removed_bitmaps: removed,
            warnings,
        })
    }

    /// Backs up every disk of the session; returns `(node, dirty bytes,
    /// name)` per disk.
    fn read_disks(
        &self,
        session: &mut FleeceSession,
        backup: &mut Session<'_>,
        limiter: Option<&Arc<RateLimiter>>,
        opts: &BackupOptions,
        progress: &dyn Fn(&PlannedDisk) -> Option<Progress>,
    ) -> Result<Vec<(String, Option<u64>, String)>, Error> {
        let mut out = Vec::new();
        for d in &self.disks {
            if opts.cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            let fail = |session: &mut FleeceSession, e: crate::Error| -> Error {
                if matches!(e, crate::Error::Interrupted) {
                    return Error::Interrupted;
                }
                if let Some(pid) = qemu_gone(session.qmp()) {
                    return Error::QemuGone {
                        pid,
                        disk: d.name.clone(),
                        detail: e.to_string(),
                    };
                }
                Error::Disk {
                    disk: d.name.clone(),
                    source: e,
                }
            };
            let uri = session
                .export_uri(&d.name)
                .expect("every disk of the session is exported");
            let bitmap = if d.decision.is_incremental() {
                self.prev_bitmap.as_deref()
            } else {
                None
            };
            let nbd = match NbdSource::connect_uri(&uri, bitmap, self.opts.connections) {
                Ok(s) => s,
                Err(e) => return Err(fail(session, e)),
            };
            let parent_disk = match (&self.parent, d.decision.is_incremental()) {
                (Some(p), true) => Some(p.disk(&d.name).expect("decided with this parent")),
                _ => None,
            };
            let read = ExportRead {
                name: &d.name,
                source: Box::new(nbd),
                describe: format!("node {} of QEMU at {}", d.node, self.opts.qmp.display()),
                size: d.size,
                parent: parent_disk,
                capture: Capture {
                    mode: d.decision.mode(),
                    bitmap: bitmap.map(str::to_string),
                    next_bitmap: Some(self.new_bitmap.clone()),
                    reason: d.decision.reason.clone(),
                },
            };
            let dirty_bytes = match read_export(backup, read, limiter, opts, progress(d)) {
                Ok(b) => b,
                Err(e) => return Err(fail(session, e)),
            };
            out.push((d.node.clone(), dirty_bytes, d.name.clone()));
        }
        Ok(out)
    }

    /// Removes this repository's generations other than the new one from
    /// the captured nodes, so they do not pile up (each costs QEMU a little
    /// work on every write).
    fn remove_stale(
        &self,
        qmp: &mut Qmp,
        removed: &mut Vec<(String, String)>,
        warnings: &mut Vec<String>,
    ) {
        let prefix = bitmap_prefix(self.repo);
        for d in &self.disks {
            let bitmaps = match inventory::bitmaps(qmp, &d.node) {
                Ok(b) => b,
                Err(e) => {
                    warnings.push(format!("listing the bitmaps of node {}: {e}", d.node));
                    continue;
                }
            };
            for b in bitmaps {
                if !b.name.starts_with(&prefix) || b.name == self.new_bitmap || b.busy {
                    continue;
                }
                match inventory::remove_bitmap(qmp, &d.node, &b.name) {
                    Ok(()) => {
                        tracing::info!(node = %d.node, bitmap = %b.name, "removed a stale bitmap generation");
                        removed.push((d.node.clone(), b.name));
                    }
                    Err(e) => warnings.push(format!(
                        "removing stale bitmap {} from node {}: {e}",
                        b.name, d.node
                    )),
                }
            }
        }
    }
}

/// One disk of a point-in-time view (an NBD export, or a closed image
/// through qemu-nbd), to be read into a backup session.
pub(crate) struct ExportRead<'a> {
    /// The disk's name in the snapshot.
    pub name: &'a str,
    pub source: Box<dyn Source>,
    /// What the manifest names as the source: the export itself is gone
    /// after the backup.
    pub describe: String,
    /// The size the disk must have (from the hypervisor's own inventory).
    pub size: u64,
    /// The parent's disk, for an incremental (then `source` has a bitmap).
    pub parent: Option<&'a Disk>,
    pub capture: Capture,
}

/// Reads one disk of a point-in-time view into `backup`, behind the shared
/// rate limiter. Returns the bytes the bitmap marks dirty, for an
/// incremental. Shared by the QMP and the libvirt capture.
pub(crate) fn read_export(
    backup: &mut Session<'_>,
    read: ExportRead<'_>,
    limiter: Option<&Arc<RateLimiter>>,
    opts: &BackupOptions,
    progress: Option<Progress>,
) -> crate::Result<Option<u64>> {
    let live = Named {
        inner: read.source,
        name: read.describe,
    };
    let source = RateLimited::wrap(Box::new(live), limiter);
    if source.size() != read.size {
        return Err(crate::Error::Source {
            source_name: source.describe(),
            reason: format!(
                "the point-in-time view has {} bytes but the disk has {}",
                source.size(),
                read.size
            ),
        });
    }
    let dirty_bytes = if read.parent.is_some() {
        source.dirty_ranges()?.map(|r| range_bytes(&r, read.size))
    } else {
        None
    };
    let disk_opts = BackupOptions {
        progress,
        ..opts.clone()
    };
    let plan = DiskPlan {
        name: read.name.to_string(),
        source: source.as_ref(),
        incremental_parent: read.parent,
        // Only files read around the page cache; these are NBD exports.
        first: false,
        capture: read.capture,
    };
    backup.backup_disk(plan, &disk_opts)?;
    Ok(dirty_bytes)
}

/// A source under a lasting name: the NBD export of a session is gone
/// after it, so the manifest names the QEMU node instead.
struct Named {
    inner: Box<dyn Source>,
    name: String,
}

impl Source for Named {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn data_ranges(&self) -> crate::Result<Vec<Range>> {
        self.inner.data_ranges()
    }

    fn dirty_ranges(&self) -> crate::Result<Option<Vec<Range>>> {
        self.inner.dirty_ranges()
    }

    fn read_direct(&self, hint: bool) {
        self.inner.read_direct(hint);
    }

    fn read_threads(&self) -> usize {
        self.inner.read_threads()
    }

    fn will_need(&self, offset: u64, len: u64) {
        self.inner.will_need(offset, len);
    }
}

/// Ends a failed session, restoring QEMU, and returns the error to report.
fn abort(session: FleeceSession, err: Error) -> Error {
    let gone = matches!(err, Error::QemuGone { .. });
    if let Err(t) = session.finish(false) {
        if gone {
            tracing::debug!("teardown on a dead QEMU: {t}");
        } else {
            tracing::error!("putting QEMU back after the failure was incomplete: {t}");
        }
    }
    err
}

/// The PID (or "?") of QEMU if it is no longer there.
fn qemu_gone(qmp: &mut Qmp) -> Option<String> {
    let pid = qmp
        .peer_pid()
        .map_or_else(|| "?".to_string(), |p| p.to_string());
    if qmp.peer_alive() == Some(false) {
        return Some(pid);
    }
    match qmp.execute("query-version", Value::Null) {
        Err(e) if e.is_disconnected() => Some(pid),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockmap::MapRef;
    use crate::id::ChunkId;
    use crate::snapshot::DiskStats;
    use crate::{InitOptions, LocalBackend};
    use ekko_qmp::BitmapInfo;

    const SIZE: u64 = 64 << 20;

    fn repo(dir: &std::path::Path) -> Repository {
        let backend: Arc<dyn crate::Backend> = Arc::new(LocalBackend::new(dir));
        let opts = InitOptions {
            encrypt: false,
            ..InitOptions::default()
        };
        Repository::init(Arc::clone(&backend), &opts, None).unwrap();
        Repository::open_with_cache(backend, || Ok(Vec::new()), false).unwrap()
    }

    fn bitmap(name: &str) -> BitmapInfo {
        BitmapInfo {
            name: name.into(),
            recording: true,
            persistent: true,
            inconsistent: false,
            busy: false,
            granularity: 65536,
            count: 0,
        }
    }

    fn node(name: &str, size: u64, bitmaps: Vec<BitmapInfo>) -> (String, NodeInfo) {
        let info = NodeInfo {
            node_name: name.into(),
            driver: "qcow2".into(),
            read_only: false,
            size,
            filename: None,
            bitmaps,
        };
        (name.to_string(), info)
    }

    fn parent(repo: &Repository, next: &str, disks: &[&str]) -> Snapshot {
        let disk = |name: &str| Disk {
            name: name.into(),
            size: SIZE,
            chunk_size: repo.config().chunk_size,
            map: MapRef {
                root: ChunkId::ZERO,
                depth: 1,
                fanout: 256,
            },
            source: "test".into(),
            capture: Capture {
                mode: CaptureMode::Full,
                bitmap: None,
                next_bitmap: Some(next.into()),
                reason: None,
            },
            stats: DiskStats::default(),
        };
        Snapshot {
            id: snapshot::new_id(),
            vm: "vm".into(),
            time: crate::time::now_rfc3339_nanos(),
            parent: None,
            host: "h".into(),
            disks: disks.iter().map(|d| disk(d)).collect(),
            ekko_version: "test".into(),
            domain: None,
            tags: Vec::new(),
        }
    }

    fn reasons(planned: &[PlannedDisk]) -> Vec<Option<&str>> {
        planned
            .iter()
            .map(|d| d.decision.reason.as_deref())
            .collect()
    }

    #[test]
    fn incremental_only_with_this_repositorys_usable_generation() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let x = format!("{}00000001", bitmap_prefix(&repo));
        let p = parent(&repo, &x, &["a", "b"]);
        let good = vec![
            node("a", SIZE, vec![bitmap(&x), bitmap("user")]),
            node("b", SIZE, vec![bitmap(&x)]),
        ];

        let (prev, planned) = decide(&repo, "vm", Some(&p), &good, false);
        assert_eq!(prev.as_deref(), Some(x.as_str()));
        assert!(planned
            .iter()
            .all(|d| d.decision.mode() == CaptureMode::Incremental));

        let (prev, planned) = decide(&repo, "vm", Some(&p), &good, true);
        assert_eq!(prev, None);
        assert_eq!(reasons(&planned), [Some("--full was given"); 2]);

        let (prev, planned) = decide(&repo, "vm", None, &good, false);
        assert_eq!(prev, None);
        assert!(planned[0]
            .decision
            .reason
            .as_deref()
            .unwrap()
            .starts_with("first backup"));

        // Missing on one disk: every disk in full, each saying why.
        let mut missing = good.clone();
        missing[1].1.bitmaps.clear();
        let (prev, planned) = decide(&repo, "vm", Some(&p), &missing, false);
        assert_eq!(prev, None);
        assert!(planned[1]
            .decision
            .reason
            .as_deref()
            .unwrap()
            .starts_with("bitmap missing"));
        assert!(planned[0]
            .decision
            .reason
            .as_deref()
            .unwrap()
            .starts_with("disk b cannot"));

        // Each unusable state has its reason.
        type Change = fn(&mut BitmapInfo);
        let changes: [(Change, &str); 4] = [
            (|b| b.inconsistent = true, "bitmap inconsistent"),
            (|b| b.recording = false, "bitmap disabled"),
            (|b| b.persistent = false, "bitmap not persistent"),
            (|b| b.busy = true, "bitmap busy"),
        ];
        for (change, want) in changes {
            let mut bad = good.clone();
            change(&mut bad[0].1.bitmaps[0]);
            let (prev, planned) = decide(&repo, "vm", Some(&p), &bad, false);
            assert_eq!(prev, None, "{want}");
            assert!(
                planned[0]
                    .decision
                    .reason
                    .as_deref()
                    .unwrap()
                    .starts_with(want),
                "{planned:?}"
            );
        }

        // Another generation of this repository in QEMU.
        let mut other = good.clone();
        other[0].1.bitmaps = vec![bitmap(&format!("{}00000002", bitmap_prefix(&repo)))];
        let (_, planned) = decide(&repo, "vm", Some(&p), &other, false);
        assert!(planned[0]
            .decision
            .reason
            .as_deref()
            .unwrap()
            .starts_with("other generation"));

        // A generation that is not this repository's is never used.
        let foreign = "ekko-ffffffff-00000001";
        let pf = parent(&repo, foreign, &["a", "b"]);
        let fine = vec![
            node("a", SIZE, vec![bitmap(foreign)]),
            node("b", SIZE, vec![bitmap(foreign)]),
        ];
        let (prev, planned) = decide(&repo, "vm", Some(&pf), &fine, false);
        assert_eq!(prev, None);
        assert!(planned[0]
            .decision
            .reason
            .as_deref()
            .unwrap()
            .starts_with("other generation"));
    }

    #[test]
    fn per_disk_reasons_keep_the_generation_for_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let x = format!("{}00000001", bitmap_prefix(&repo));
        let mut p = parent(&repo, &x, &["a", "b", "c"]);
        // c's map root is not in the repository: damaged parent.
        p.disks[2].map.root = ChunkId([7; 32]);
        let disks = vec![
            node("a", SIZE, vec![bitmap(&x)]),
            node("b", 2 * SIZE, vec![bitmap(&x)]),
            node("c", SIZE, vec![bitmap(&x)]),
        ];
        let (prev, planned) = decide(&repo, "vm", Some(&p), &disks, false);
        assert_eq!(prev.as_deref(), Some(x.as_str()));
        assert_eq!(planned[0].decision.mode(), CaptureMode::Incremental);
        assert!(planned[1]
            .decision
            .reason
            .as_deref()
            .unwrap()
            .starts_with("size changed"));
        assert!(planned[2]
            .decision
            .reason
            .as_deref()
            .unwrap()
            .starts_with("parent damaged"));
    }

    #[test]
    fn names_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let n = new_bitmap_name(&repo);
        assert!(n.starts_with(&bitmap_prefix(&repo)));
        assert_eq!(n.len(), "ekko-".len() + 8 + 1 + 8);
        assert_ne!(n, new_bitmap_name(&repo));
        let r = |offset, len| Range { offset, len };
        assert_eq!(range_bytes(&[r(0, 10), r(20, 5), r(95, 10)], 100), 20);
    }
}
