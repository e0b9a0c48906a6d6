//! Backups of libvirt domains through libvirt's own pull-mode backup API
//! and checkpoints (`ekko backup --domain`).
//!
//! # Flow (running domain)
//!
//! 1. [`DomainBackup::prepare`] connects, reads the domain's XML, chooses
//!    the disks (qcow2, not read-only, removable, shareable or transient),
//!    ends a backup job that a dead ekko left, and decides between an
//!    incremental and a full read. Deciding changes nothing.
//! 2. [`DomainBackup::run`] calls `virDomainBackupBegin` in pull mode with a
//!    new checkpoint, an NBD server on a Unix socket and scratch files, all
//!    in a private directory. One call covers every disk, so all disks are
//!    captured at one instant. With `--fsfreeze` the guest's file systems
//!    are frozen around that call.
//! 3. Each disk's export is read with the same reader as the QMP capture
//!    ([`super::read_export`]); an incremental reads only the extents of
//!    `qemu:dirty-bitmap:backup-<disk>`, which libvirt fills with the
//!    writes since the `<incremental>` checkpoint.
//! 4. The snapshot is committed; then the job is aborted (the normal end of
//!    a pull backup), the private directory removed, and this repository's
//!    older checkpoints deleted. On any failure before the commit, the job
//!    is aborted and the new checkpoint deleted, so the last committed
//!    checkpoint still covers every write.
//!
//! # Checkpoints
//!
//! Named like QMP generations, `ekko-<first 8 hex of the repository id>-<8
//! random hex>`, so they are unique per repository. A snapshot records the
//! checkpoint created at its instant as `capture.next_bitmap` (libvirt names
//! each disk's qcow2 bitmap after its checkpoint) and the one an incremental
//! read as `capture.bitmap`. Only checkpoints with this repository's prefix
//! are ever deleted.
//!
//! # When an incremental is taken
//!
//! Only when the domain's latest snapshot in this repository has every
//! chosen disk, all recording the same checkpoint of this repository; that
//! checkpoint still exists and tracks every chosen disk; no disk changed
//! size; the chunk size is the same; and the parent's maps can be read.
//! Otherwise every disk is read in full, with the reason. If libvirt then
//! refuses the incremental (for example a bitmap marked inconsistent after
//! QEMU died), the backup is started again as a full one.
//!
//! # Stopped domains
//!
//! A domain that is not running is read from its qcow2 files through a
//! private `qemu-nbd`, with the last checkpoint's bitmap (`qemu-nbd -B`)
//! when it is there and sound. No checkpoint is created: the bitmap keeps
//! recording from the older instant, which only makes the next incremental
//! read more.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ekko_libvirt::{xml, Connection, Domain, DomainInfo};
use serde_json::Value;

use super::{check_parent_map, read_export, Decision, ExportRead};
use crate::backup::{BackupOptions, Progress, Session};
use crate::ratelimit::RateLimiter;
use crate::repo::Repository;
use crate::snapshot::{self, Capture, Disk, DomainRecord, NovaRecord, Snapshot};
use crate::source::NbdSource;

mod cleanup;

use cleanup::{end_stale_job, remove_stale_dirs, JobGuard, Watchdog};

/// Prefix of the private directories of backup jobs in the work directory:
/// `ekko-libvirt-<pid>-<8 hex>`.
const DIR_PREFIX: &str = "ekko-libvirt-";

/// How long to wait for libvirt to tear down an aborted job.
const JOB_END_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Errors of a domain backup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Libvirt(#[from] ekko_libvirt::Error),

    #[error("domain {domain} has no disk ekko can back up ({skipped})")]
    NoDisks { domain: String, skipped: String },

    #[error("domain {domain} has no disk {disk:?} (its disks: {available})")]
    UnknownDisk {
        domain: String,
        disk: String,
        available: String,
    },

    #[error("disk {disk} of domain {domain} cannot be backed up: {reason}")]
    Unsupported {
        domain: String,
        disk: String,
        reason: String,
    },

    #[error("domain {domain} already has a backup job ({detail}); wait for it to end, or end it with `virsh domjobabort {domain}`")]
    Busy { domain: String, detail: String },

    #[error("domain {domain}: the guest file systems could not be frozen ({detail}), and --require-fsfreeze was given; nothing was backed up. Is qemu-guest-agent running in the guest, with a <channel> for org.qemu.guest_agent.0?")]
    Freeze { domain: String, detail: String },

    #[error("disk {disk}: {source}")]
    Disk {
        disk: String,
        #[source]
        source: crate::Error,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("interrupted: nothing was committed; the backup job was ended and its checkpoint deleted, so the last snapshot's checkpoint keeps recording")]
    Interrupted,

    #[error("the scratch directory {dir} has {} MiB free, below the {} MiB kept in reserve: {what}. Nothing was committed; the backup job was ended and its checkpoint deleted. QEMU copies every block the guest overwrites during a backup into the scratch files there, and fails the guest's write when it cannot; give --workdir a directory with more room, or lower --workdir-reserve", .free >> 20, .reserve >> 20)]
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
    /// True when the repository's data is damaged.
    pub fn is_damage(&self) -> bool {
        match self {
            Error::Disk { source, .. } | Error::Repo(source) => source.is_damage(),
            _ => false,
        }
    }
}

/// What to back up, and how.
#[derive(Debug, Clone)]
pub struct DomainOptions {
    pub domain: String,
    /// libvirt URI.
    pub connect: String,
    /// Disk targets (vda, sdb…); empty means every disk that can be
    /// backed up.
    pub disks: Vec<String>,
    pub full: bool,
    /// Freeze the guest file systems through the guest agent for the
    /// instant of the backup.
    pub fsfreeze: bool,
    /// Fail instead of going on crash-consistent when freezing fails.
    pub require_fsfreeze: bool,
    /// Where the private directory (NBD socket, scratch files) goes; QEMU
    /// must be able to create files in it.
    pub workdir: PathBuf,
    pub connections: usize,
    pub rate_limit: Option<u64>,
    /// Free space to keep in `workdir` (see `super::space`); `None`: the
    /// default.
    pub workdir_reserve: Option<u64>,
    /// Tags recorded in the snapshot (`Session::set_tags`).
    pub tags: Vec<String>,
}

impl DomainOptions {
    pub fn new(domain: impl Into<String>) -> DomainOptions {
        DomainOptions {
            domain: domain.into(),
            connect: ekko_libvirt::DEFAULT_URI.into(),
            disks: Vec::new(),
            full: false,
            fsfreeze: false,
            require_fsfreeze: false,
            workdir: PathBuf::from(super::DEFAULT_WORKDIR),
            connections: 4,
            rate_limit: None,
            workdir_reserve: None,
            tags: Vec::new(),
        }
    }
}

/// A disk to back up and the decision taken for it.
#[derive(Debug, Clone)]
pub struct PlannedDisk {
    /// The target (vda), also the disk's name in the snapshot.
    pub name: String,
    /// The image file.
    pub path: Option<String>,
    pub size: u64,
    pub decision: Decision,
}

/// The outcome for one disk.
#[derive(Debug, Clone)]
pub struct DiskReport {
    pub disk: Disk,
    pub dirty_bytes: Option<u64>,
}

/// The outcome of a domain backup.
#[derive(Debug)]
pub struct DomainReport {
    pub snapshot: Snapshot,
    pub disks: Vec<DiskReport>,
    /// Whether the domain was running (live backup through libvirt) or
    /// stopped (read from its image files).
    pub running: bool,
    /// The checkpoint created at this snapshot's instant (running only).
    pub checkpoint: Option<String>,
    /// This repository's older checkpoints deleted after the commit.
    pub deleted_checkpoints: Vec<String>,
    /// Whether the guest file systems were frozen for the instant.
    pub frozen: bool,
    /// Problems that did not stop the backup.
    pub warnings: Vec<String>,
}

/// A prepared domain backup; see the module documentation.
pub struct DomainBackup<'r> {
    repo: &'r Repository,
    opts: DomainOptions,
    _conn: Connection,
    dom: Domain,
    info: DomainInfo,
    running: bool,
    parent: Option<Snapshot>,
    disks: Vec<PlannedDisk>,
    /// Disks left out, with the reason.
    skipped: Vec<(String, String)>,
    /// The checkpoint an incremental reads from.
    base: Option<String>,
    /// Stopped domains: the checkpoint whose bitmap keeps recording after
    /// this snapshot (usable on every disk), for the next incremental.
    offline_next: Option<String>,
    warnings: Vec<String>,
}

/// `ekko-<8 hex>-`: the prefix of this repository's checkpoints.
pub fn checkpoint_prefix(repo: &Repository) -> String {
    super::bitmap_prefix(repo)
}

/// A qcow2 bitmap's name and flags (`auto`, `in-use`).
type ImageBitmap = (String, Vec<String>);

/// The virtual size and the bitmaps of a closed qcow2 image.
fn image_bitmaps(path: &str) -> Result<(u64, Vec<ImageBitmap>), crate::Error> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", "qcow2", path])
        .output()
        .map_err(|e| crate::Error::Source {
            source_name: path.into(),
            reason: format!("cannot run qemu-img: {e}"),
        })?;
    if !out.status.success() {
        return Err(crate::Error::Source {
            source_name: path.into(),
            reason: format!(
                "qemu-img info failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| crate::Error::Source {
        source_name: path.into(),
        reason: format!("qemu-img info gave no JSON: {e}"),
    })?;
    let size = v["virtual-size"].as_u64().unwrap_or(0);
    let bitmaps = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let flags = b["flags"]
                        .as_array()
                        .map(|f| {
                            f.iter()
                                .filter_map(|x| x.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    (b["name"].as_str().unwrap_or("").to_string(), flags)
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((size, bitmaps))
}

/// Why the bitmap `name` of a closed image cannot be trusted, or `None`.
fn image_bitmap_problem(disk: &str, bitmaps: &[ImageBitmap], name: &str) -> Option<String> {
    match bitmaps.iter().find(|(n, _)| n == name) {
        None => Some(format!(
            "checkpoint bitmap missing: the image of disk {disk} has no bitmap {name}"
        )),
        Some((_, f)) if f.iter().any(|x| x == "in-use") => Some(format!(
            "bitmap inconsistent: bitmap {name} of disk {disk} is marked in use (QEMU stopped uncleanly) and may have missed writes"
        )),
        Some((_, f)) if !f.iter().any(|x| x == "auto") => Some(format!(
            "bitmap disabled: bitmap {name} of disk {disk} is not recording"
        )),
        Some(_) => None,
    }
}

impl<'r> DomainBackup<'r> {
    /// Connects to libvirt, chooses the disks, ends a job a dead ekko left
    /// and decides how to read each disk. Changes nothing of the backup
    /// state in libvirt or in the repository.
    pub fn prepare(repo: &'r Repository, opts: &DomainOptions) -> Result<DomainBackup<'r>, Error> {
        // libvirt needs absolute paths, and a stale job is recognised by
        // its socket's directory.
        let mut opts = opts.clone();
        opts.workdir = std::path::absolute(&opts.workdir).map_err(|source| Error::Io {
            path: opts.workdir.clone(),
            source,
        })?;
        let opts = &opts;
        let conn = Connection::open(&opts.connect)?;
        let dom = conn.domain(&opts.domain)?;
        let running = dom.is_active()?;
        let info = dom.info()?;
        let mut warnings = Vec::new();

        let (mut disks, skipped) = select_disks(&info, opts)?;
        let mut bitmaps: Vec<Vec<ImageBitmap>> = Vec::new();
        for d in &mut disks {
            if running {
                d.size = dom.capacity(&d.name)?;
            } else {
                let path = d.path.clone().ok_or_else(|| Error::Unsupported {
                    domain: opts.domain.clone(),
                    disk: d.name.clone(),
                    reason: "the domain is stopped and the disk has no local file".into(),
                })?;
                let (size, b) = image_bitmaps(&path).map_err(|source| Error::Disk {
                    disk: d.name.clone(),
                    source,
                })?;
                d.size = size;
                bitmaps.push(b);
            }
        }

        if running {
            end_stale_job(&dom, &opts.workdir, &mut warnings)?;
        }
        for p in remove_stale_dirs(&opts.workdir) {
            tracing::warn!(dir = %p.display(), "removed the private directory of a dead ekko process");
        }

        let parent = match snapshot::resolve(
            repo.backend().as_ref(),
            repo.keys(),
            &format!("{}@latest", opts.domain),
        ) {
            Ok(s) => Some(s),
            Err(crate::Error::SnapshotNotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let (mut base, sound) = decide(repo, &dom, opts, parent.as_ref(), &mut disks)?;
        let mut offline_next = None;
        if let (false, Some(cp)) = (running, sound) {
            // The checkpoint's bitmap must be sound in every image.
            let problem = disks
                .iter()
                .zip(&bitmaps)
                .find_map(|(d, b)| image_bitmap_problem(&d.name, b, &cp));
            match problem {
                None => offline_next = Some(cp),
                Some(p) => {
                    for d in &mut disks {
                        d.decision.full(p.clone());
                    }
                    base = None;
                }
            }
        }
        for d in &disks {
            tracing::info!(disk = %d.name, mode = ?d.decision.mode(), reason = ?d.decision.reason, "capture planned");
        }
        Ok(DomainBackup {
            repo,
            opts: opts.clone(),
            _conn: conn,
            dom,
            info,
            running,
            parent,
            disks,
            skipped,
            base,
            offline_next,
            warnings,
        })
    }

    pub fn disks(&self) -> &[PlannedDisk] {
        &self.disks
    }

    /// Disks of the domain left out, with the reason.
    pub fn skipped(&self) -> &[(String, String)] {
        &self.skipped
    }

    pub fn running(&self) -> bool {
        self.running
    }

    fn record(&self) -> DomainRecord {
        DomainRecord {
            uuid: self.info.uuid.clone(),
            connect: self.opts.connect.clone(),
            nova: self.info.nova.as_ref().map(|n| NovaRecord {
                instance_uuid: n.instance_uuid.clone(),
                name: n.name.clone(),
                project_uuid: n.project_uuid.clone(),
            }),
        }
    }

    /// Backs up every chosen disk at one instant and commits the snapshot.
    pub fn run(
        self,
        opts: &BackupOptions,
        progress: &dyn Fn(&PlannedDisk) -> Option<Progress>,
    ) -> Result<DomainReport, Error> {
        let limiter = match self.opts.rate_limit {
            Some(r) => Some(Arc::new(
                RateLimiter::new(r)?.with_cancel(Arc::clone(&opts.cancel)),
            )),
            None => None,
        };
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        if self.running {
            self.run_live(opts, limiter.as_ref(), progress)
        } else {
            self.run_offline(opts, limiter.as_ref(), progress)
        }
    }

    fn run_offline(
        mut self,
        opts: &BackupOptions,
        limiter: Option<&Arc<RateLimiter>>,
        progress: &dyn Fn(&PlannedDisk) -> Option<Progress>,
    ) -> Result<DomainReport, Error> {
        let time = crate::time::now_rfc3339_nanos();
        let mut backup = Session::new(self.repo)?;
        backup.set_domain(self.record());
        backup.set_tags(&self.opts.tags);
        let mut dirty = Vec::new();
        for d in &self.disks {
            if opts.cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            let path = d.path.clone().expect("checked in prepare");
            let bitmap = if d.decision.is_incremental() {
                self.base.as_deref()
            } else {
                None
            };
            let disk_err = |source| Error::Disk {
                disk: d.name.clone(),
                source,
            };
            let src = NbdSource::qemu_nbd(
                Path::new(&path),
                "qcow2",
                bitmap,
                self.opts.connections,
                false,
            )
            .map_err(disk_err)?;
            let read = ExportRead {
                name: &d.name,
                source: Box::new(src),
                describe: path.clone(),
                size: d.size,
                parent: self.parent_disk(d),
                capture: Capture {
                    mode: d.decision.mode(),
                    bitmap: bitmap.map(str::to_string),
                    next_bitmap: self.offline_next.clone(),
                    reason: d.decision.reason.clone(),
                },
            };
            let b = read_export(&mut backup, read, limiter, opts, progress(d)).map_err(|e| {
                if matches!(e, crate::Error::Interrupted) {
                    Error::Interrupted
                } else {
                    disk_err(e)
                }
            })?;
            dirty.push(b);
        }
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        let parent_id = self.parent.as_ref().map(|p| p.id.clone());
        let snap = backup.commit(&self.opts.domain, time, parent_id)?;
        let disks = self.reports(&snap, dirty);
        Ok(DomainReport {
            snapshot: snap,
            disks,
            running: false,
            checkpoint: None,
            deleted_checkpoints: Vec::new(),
            frozen: false,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    /// Reads every disk of a running domain's backup job (its NBD server
    /// listens on `socket`) into `backup`; returns each disk's dirty bytes.
    fn read_running(
        &self,
        backup: &mut Session<'_>,
        socket: &str,
        checkpoint: &str,
        limiter: Option<&Arc<RateLimiter>>,
        opts: &BackupOptions,
        progress: &dyn Fn(&PlannedDisk) -> Option<Progress>,
    ) -> Result<Vec<Option<u64>>, Error> {
        let mut dirty = Vec::new();
        for d in &self.disks {
            if opts.cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            let disk_err = |e: crate::Error| {
                if matches!(e, crate::Error::Interrupted) {
                    Error::Interrupted
                } else {
                    Error::Disk {
                        disk: d.name.clone(),
                        source: e,
                    }
                }
            };
            let uri = format!(
                "nbd+unix:///{}?socket={}",
                ekko_qmp::percent_encode(&d.name),
                ekko_qmp::percent_encode(socket)
            );
            let context = format!("backup-{}", d.name);
            let bitmap = d.decision.is_incremental().then_some(context.as_str());
            let src =
                NbdSource::connect_uri(&uri, bitmap, self.opts.connections).map_err(disk_err)?;
            let read = ExportRead {
                name: &d.name,
                source: Box::new(src),
                describe: format!(
                    "disk {} of libvirt domain {} ({})",
                    d.name,
                    self.opts.domain,
                    d.path.as_deref().unwrap_or("no file")
                ),
                size: d.size,
                parent: self.parent_disk(d),
                capture: Capture {
                    mode: d.decision.mode(),
                    bitmap: if d.decision.is_incremental() {
                        self.base.clone()
                    } else {
                        None
                    },
                    next_bitmap: Some(checkpoint.to_string()),
                    reason: d.decision.reason.clone(),
                },
            };
            let b = read_export(backup, read, limiter, opts, progress(d)).map_err(disk_err)?;
            dirty.push(b);
        }
        Ok(dirty)
    }

    fn parent_disk(&self, d: &PlannedDisk) -> Option<&Disk> {
        match (&self.parent, d.decision.is_incremental()) {
            (Some(p), true) => Some(p.disk(&d.name).expect("decided with this parent")),
            _ => None,
        }
    }

    fn reports(&self, snap: &Snapshot, dirty: Vec<Option<u64>>) -> Vec<DiskReport> {
        self.disks
            .iter()
            .zip(dirty)
            .map(|(d, dirty_bytes)| DiskReport {
                disk: snap.disk(&d.name).expect("committed disk").clone(),
                dirty_bytes,
            })
            .collect()
    }

    /// Freezes the guest if asked; returns whether it is frozen.
    fn freeze(&mut self) -> Result<bool, Error> {
        if !self.opts.fsfreeze {
            return Ok(false);
        }
        match self.dom.fs_freeze() {
            Ok(n) => {
                tracing::info!(filesystems = n, "guest file systems frozen");
                Ok(true)
            }
            Err(e) if self.opts.require_fsfreeze => Err(Error::Freeze {
                domain: self.opts.domain.clone(),
                detail: e.to_string(),
            }),
            Err(e) => {
                self.warnings.push(format!(
                    "the guest file systems could not be frozen ({e}); the backup is crash-consistent"
                ));
                Ok(false)
            }
        }
    }

    fn thaw(&mut self) {
        if let Err(e) = self.dom.fs_thaw() {
            let w = format!("thawing the guest file systems failed: {e}; run `virsh domfsthaw {}` if the guest hangs", self.opts.domain);
            tracing::error!("{w}");
            self.warnings.push(w);
        }
    }

    fn run_live(
        mut self,
        opts: &BackupOptions,
        limiter: Option<&Arc<RateLimiter>>,
        progress: &dyn Fn(&PlannedDisk) -> Option<Progress>,
    ) -> Result<DomainReport, Error> {
        std::fs::create_dir_all(&self.opts.workdir).map_err(|source| Error::Io {
            path: self.opts.workdir.clone(),
            source,
        })?;
        let reserve = super::space::reserve_for(&self.opts.workdir, self.opts.workdir_reserve);
        let workdir = self.opts.workdir.clone();
        let low_space = move |low: super::space::LowSpace, what| Error::WorkdirFull {
            dir: workdir.clone(),
            free: low.free,
            reserve: low.reserve,
            what,
        };
        super::space::check(&self.opts.workdir, reserve)
            .map_err(|low| low_space(low, "the backup did not start"))?;
        let random = crate::id::ObjectId::random().to_hex();
        let dir = self.opts.workdir.join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            &random[..8]
        ));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|source| Error::Io {
                    path: dir.clone(),
                    source,
                })?;
        }
        let checkpoint = format!("{}{}", checkpoint_prefix(self.repo), &random[8..16]);
        let socket = dir.join("nbd.sock");
        let socket_s = socket.to_string_lossy().into_owned();
        let chosen: Vec<String> = self.disks.iter().map(|d| d.name.clone()).collect();
        let others: Vec<String> = self
            .info
            .disks
            .iter()
            .map(|d| d.target.clone())
            .filter(|t| !chosen.contains(t))
            .collect();
        let scratch: Vec<(String, String)> = chosen
            .iter()
            .map(|t| {
                (
                    t.clone(),
                    dir.join(format!("{t}.scratch"))
                        .to_string_lossy()
                        .into_owned(),
                )
            })
            .collect();
        let cp_xml = xml::checkpoint_xml(&checkpoint, &chosen, &others);

        // Started before the job, so that no instant exists in which a
        // killed ekko would leave the job behind unwatched.
        let watchdog = Watchdog::spawn(
            &self.opts.connect,
            &self.info.uuid,
            &checkpoint,
            &dir,
            &mut self.warnings,
        );
        let frozen = match self.freeze() {
            Ok(f) => f,
            Err(e) => {
                drop(watchdog);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut time = crate::time::now_rfc3339_nanos();
        let begin = |base: Option<&str>| {
            self.dom.backup_begin(
                &xml::backup_xml(&socket_s, &scratch, &others, base),
                Some(&cp_xml),
            )
        };
        let mut started = begin(self.base.as_deref());
        let mut fallback = None;
        if let (Err(e), Some(base)) = (&started, &self.base) {
            let why = format!(
                "checkpoint unusable: libvirt refused an incremental backup from {base} ({e})"
            );
            tracing::warn!("{why}; reading every disk in full");
            fallback = Some(why);
            time = crate::time::now_rfc3339_nanos();
            started = begin(None);
        }
        if frozen {
            self.thaw();
        }
        if let Some(why) = fallback {
            for d in &mut self.disks {
                d.decision.full(why.clone());
            }
            self.base = None;
        }
        if let Err(e) = started {
            drop(watchdog);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        // From here the job, its checkpoint and the directory are undone by
        // the guard unless the snapshot is committed.
        let mut guard = JobGuard {
            dom: &self.dom,
            dir: dir.clone(),
            checkpoint: checkpoint.clone(),
            committed: false,
            watchdog,
        };
        tracing::info!(checkpoint = %checkpoint, base = ?self.base, "backup job started");

        let mut backup = Session::new(self.repo)?;
        backup.set_domain(self.record());
        backup.set_tags(&self.opts.tags);
        let read_all =
            || self.read_running(&mut backup, &socket_s, &checkpoint, limiter, opts, progress);
        let (read, low) = super::space::watch(&self.opts.workdir, reserve, &opts.cancel, read_all);
        if let Some(low) = low {
            return Err(low_space(
                low,
                "the backup stopped before the directory filled up",
            ));
        }
        let dirty = read?;
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        let parent_id = self.parent.as_ref().map(|p| p.id.clone());
        let snap = backup.commit(&self.opts.domain, time, parent_id)?;
        guard.committed = true;
        if let Some(w) = &mut guard.watchdog {
            w.say("committed");
        }

        // Committed: the backup stands whatever happens now.
        let mut warnings = std::mem::take(&mut self.warnings);
        if let Err(e) = self.dom.abort_job(JOB_END_WAIT) {
            warnings.push(format!(
                "snapshot {} is stored, but ending the backup job failed ({e}); end it with `virsh domjobabort {}`",
                snap.short_id(),
                self.opts.domain
            ));
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warnings.push(format!("removing {}: {e}", dir.display()));
            }
        }
        let mut deleted = Vec::new();
        let prefix = checkpoint_prefix(self.repo);
        match self.dom.checkpoints() {
            Err(e) => warnings.push(format!("listing checkpoints: {e}")),
            Ok(names) => {
                for name in names {
                    if !name.starts_with(&prefix) || name == checkpoint {
                        continue;
                    }
                    match self.dom.delete_checkpoint(&name) {
                        Ok(_) => {
                            tracing::info!(checkpoint = %name, "deleted an older checkpoint");
                            deleted.push(name);
                        }
                        Err(e) => warnings.push(format!(
                            "deleting the older checkpoint {name}: {e}; the next backup retries"
                        )),
                    }
                }
            }
        }
        drop(guard);
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let disks = self.reports(&snap, dirty);
        Ok(DomainReport {
            snapshot: snap,
            disks,
            running: true,
            checkpoint: Some(checkpoint),
            deleted_checkpoints: deleted,
            frozen,
            warnings,
        })
    }
}

/// The disks to back up, and the disks left out with the reason.
#[allow(clippy::type_complexity)]
fn select_disks(
    info: &DomainInfo,
    opts: &DomainOptions,
) -> Result<(Vec<PlannedDisk>, Vec<(String, String)>), Error> {
    let mut chosen = Vec::new();
    let mut skipped = Vec::new();
    let plan = |d: &ekko_libvirt::DiskInfo| PlannedDisk {
        name: d.target.clone(),
        path: d.source.clone(),
        size: 0,
        decision: Decision::incremental(),
    };
    if opts.disks.is_empty() {
        for d in &info.disks {
            match d.unsupported() {
                None => chosen.push(plan(d)),
                Some(r) => skipped.push((d.target.clone(), r)),
            }
        }
        if chosen.is_empty() {
            return Err(Error::NoDisks {
                domain: opts.domain.clone(),
                skipped: if skipped.is_empty() {
                    "it has no disks".into()
                } else {
                    skipped
                        .iter()
                        .map(|(t, r)| format!("{t}: {r}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            });
        }
    } else {
        for want in &opts.disks {
            let Some(d) = info.disks.iter().find(|d| &d.target == want) else {
                return Err(Error::UnknownDisk {
                    domain: opts.domain.clone(),
                    disk: want.clone(),
                    available: info
                        .disks
                        .iter()
                        .map(|d| d.target.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            if let Some(reason) = d.unsupported() {
                return Err(Error::Unsupported {
                    domain: opts.domain.clone(),
                    disk: want.clone(),
                    reason,
                });
            }
            if chosen.iter().any(|c: &PlannedDisk| &c.name == want) {
                continue;
            }
            chosen.push(plan(d));
        }
        for d in &info.disks {
            if !opts.disks.contains(&d.target) {
                skipped.push((d.target.clone(), "not selected with --disk".into()));
            }
        }
    }
    Ok((chosen, skipped))
}

/// `(the checkpoint an incremental reads from, the parent's checkpoint if
/// it passed every check)`. The first is `None` when any disk must be read
/// in full; then every disk is marked full with its reason. The second
/// differs only under `--full`.
fn decide(
    repo: &Repository,
    dom: &Domain,
    opts: &DomainOptions,
    parent: Option<&Snapshot>,
    disks: &mut [PlannedDisk],
) -> Result<(Option<String>, Option<String>), Error> {
    let all_full = |disks: &mut [PlannedDisk], why: &str| {
        for d in disks.iter_mut() {
            d.decision.full(why.to_string());
        }
    };
    let vm = &opts.domain;
    let Some(parent) = parent else {
        let why = if opts.full {
            "--full was given".to_string()
        } else {
            format!("first backup of domain {vm} in this repository")
        };
        all_full(disks, &why);
        return Ok((None, None));
    };
    let prefix = checkpoint_prefix(repo);
    let mut base: Option<String> = None;
    let mut problem: Option<(String, String)> = None;
    for d in disks.iter() {
        let why = match parent.disk(&d.name) {
            Err(_) => Some(format!(
                "new disk: snapshot {} of domain {vm} has no disk {}",
                parent.short_id(),
                d.name
            )),
            Ok(pd) => match pd.capture.next_bitmap.as_deref() {
                None => Some(format!(
                    "no checkpoint: snapshot {} recorded no checkpoint for disk {}",
                    parent.short_id(),
                    d.name
                )),
                Some(b) if !b.starts_with(&prefix) => Some(format!(
                    "other checkpoint: snapshot {} recorded {b}, not one of this repository's ({prefix}*)",
                    parent.short_id()
                )),
                Some(b) => match &base {
                    Some(x) if x != b => Some(format!(
                        "other checkpoint: snapshot {} recorded {b} for disk {} but {x} for another",
                        parent.short_id(),
                        d.name
                    )),
                    _ => {
                        base = Some(b.to_string());
                        if pd.size != d.size {
                            Some(format!(
                                "size changed: disk {} went from {} to {} bytes",
                                d.name, pd.size, d.size
                            ))
                        } else if pd.chunk_size != repo.config().chunk_size {
                            Some(format!(
                                "chunk size changed: {} → {} bytes",
                                pd.chunk_size,
                                repo.config().chunk_size
                            ))
                        } else {
                            check_parent_map(repo, pd).err().map(|e| format!(
                                "parent damaged: the block map of disk {} in snapshot {} cannot be read ({e}); run `ekko check`",
                                d.name,
                                parent.short_id()
                            ))
                        }
                    }
                },
            },
        };
        if let Some(w) = why {
            problem = Some((d.name.clone(), w));
            break;
        }
    }
    if problem.is_none() {
        if let Some(b) = &base {
            problem = match dom.checkpoint(b)? {
                None => Some((
                    disks[0].name.clone(),
                    format!("checkpoint missing: domain {vm} no longer has checkpoint {b} of the last snapshot (deleted, or the domain was redefined)"),
                )),
                Some(cp) => disks.iter().find_map(|d| {
                    let tracked = cp.disks.iter().any(|c| c.name == d.name && c.tracked);
                    (!tracked).then(|| {
                        (
                            d.name.clone(),
                            format!("new disk: checkpoint {b} does not track disk {}", d.name),
                        )
                    })
                }),
            };
        }
    }
    let sound = if problem.is_none() { base } else { None };
    if opts.full {
        all_full(disks, "--full was given");
        return Ok((None, sound));
    }
    if let Some((culprit, why)) = problem {
        for d in disks.iter_mut() {
            if d.name == culprit {
                d.decision.full(why.clone());
            } else {
                d.decision.full(format!("disk {culprit} cannot be read incrementally ({why}), and all disks of a domain are captured with one checkpoint"));
            }
        }
        return Ok((None, None));
    }
    Ok((sound.clone(), sound))
}

#[cfg(test)]
mod tests {
    use super::cleanup::dir_owner;
    use super::*;

    #[test]
    fn private_directory_names() {
        assert_eq!(dir_owner("ekko-libvirt-123-0a1b2c3d"), Some(123));
        assert_eq!(dir_owner("ekko-libvirt-123-xyz"), None);
        assert_eq!(dir_owner("ekko-123-0a1b2c3d"), None);
    }

    #[test]
    fn image_bitmap_states() {
        let b = vec![
            ("ok".to_string(), vec!["auto".to_string()]),
            ("used".to_string(), vec!["in-use".into(), "auto".into()]),
            ("off".to_string(), vec![]),
        ];
        assert_eq!(image_bitmap_problem("vda", &b, "ok"), None);
        let p = |n| image_bitmap_problem("vda", &b, n).unwrap();
        assert!(p("used").starts_with("bitmap inconsistent"));
        assert!(p("off").starts_with("bitmap disabled"));
        assert!(p("gone").starts_with("checkpoint bitmap missing"));
    }
}
