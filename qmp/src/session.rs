//! Point-in-time fleecing sessions: a consistent, read-only NBD view of
//! several disks at one instant, plus the dirty bitmap of the previous
//! backup, while the VM keeps running.
//!
//! # The recipe (QEMU ≥ 7.0; tested with 10.0.2)
//!
//! For each disk an empty, sparse raw "fleece" file of the disk's size is
//! created in the work directory and attached. Then **one** `transaction` covering all disks, so
//! that every disk is captured at the same instant:
//!
//! * `block-dirty-bitmap-add` of the next generation (persistent),
//! * `block-dirty-bitmap-disable` of the previous generation (if any): it now
//!   holds exactly the writes between the previous backup and this instant,
//! * `blockdev-backup sync=none` into the fleece file with a named
//!   copy-before-write filter: old data is copied aside before the guest
//!   overwrites it.
//!
//! Then per disk a `snapshot-access` node over the filter and a read-only NBD
//! export of it, with `allocation-depth` and the previous bitmap as the meta
//! context `qemu:dirty-bitmap:<prev>`.
//!
//! # NBD server
//!
//! QEMU has a single NBD server. The session first tries `nbd-server-start`
//! on `SessionConfig::nbd_socket` or on a new socket in the work directory;
//! then it owns the server and stops it at teardown, unless exports of
//! someone else are left on it. If that fails because a server already runs
//! (qemu-storage-daemon `--nbd-server`, another tool), the server is reused:
//! its socket is `SessionConfig::nbd_socket` if given (checked to speak NBD),
//! otherwise it is located through `/proc` (see `nbd.rs`). Export names are
//! unique per session, so sharing a server is safe.
//!
//! # Bitmap policy
//!
//! Invariant: the bitmap named by the last **committed** backup covers every
//! write since that backup's instant.
//!
//! * `finish(true)` (the backup was stored): the previous generation is
//!   removed; the new one keeps recording and is the one to name in the
//!   stored snapshot.
//! * `finish(false)`, drop, or a failed start: QEMU is put back as it was.
//!   With a previous generation, one `transaction` re-enables it, merges the
//!   new bitmap into it (writes made during the session) and removes the new
//!   one, atomically, so no write falls between them. A failed full backup
//!   just removes the new bitmap. If this step cannot run (QEMU died or hung),
//!   the previous bitmap stays disabled or inconsistent and the next session
//!   refuses it with [`Error::BitmapUnusable`]: a full backup follows, which
//!   is safe.
//!
//! # Names
//!
//! Every node, job, export and file of a session starts with
//! `ekko-<pid>-<4 hex>`, so concurrent sessions never collide and leftovers
//! of a killed process can be found and removed by [`cleanup_stale`].
//!
//! The fleece files grow by the data the guest overwrites during the
//! session (at most the disk size): the work directory needs that space, and
//! QEMU must be able to open files in it. If writing a fleece file fails,
//! QEMU's copy-before-write filter fails the guest write (blockdev-backup does
//! not expose `on-cbw-error`), so keep sessions short and the space ample.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::guest_agent::GuestAgent;

/// Ends the name of every fleece file.
const FLEECE_SUFFIX: &str = "fleece.raw";
/// Ended the names of fleece images before they became raw files; kept so
/// that leftovers of an older ekko are still cleaned up.
const OLD_FLEECE_SUFFIX: &str = "fleece.qcow2";
use crate::inventory::{self, DiskInfo, NodeInfo};
use crate::qmp::Qmp;
use crate::util;

/// Longest Unix socket path (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How often QEMU state is polled while waiting for an export or job to go.
const POLL: Duration = Duration::from_millis(20);

/// A disk to capture: its name (used to look it up in the session) and the
/// block node to back up, as returned by [`inventory::list_disks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub name: String,
    pub node: String,
}

impl From<&DiskInfo> for DiskSpec {
    fn from(d: &DiskInfo) -> Self {
        DiskSpec {
            name: d.name.clone(),
            node: d.node_name.clone(),
        }
    }
}

/// How to run a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Directory for the fleece files and the NBD socket; created if
    /// missing. QEMU must be able to open files in it.
    pub workdir: PathBuf,
    /// Name of the bitmap generation that starts at this backup's instant.
    pub new_bitmap: String,
    /// Generation of the previous committed backup, whose dirty blocks are
    /// exported; `None` for a full backup.
    pub prev_bitmap: Option<String>,
    /// Socket for the NBD server: where to start it, or, if QEMU already
    /// runs one, where that one listens. `None`: a new socket in `workdir`,
    /// or the running server found through /proc.
    pub nbd_socket: Option<PathBuf>,
    /// Where QEMU's own NBD server listens when it runs one on TCP: QMP
    /// cannot tell, and ekko does not probe QEMU's TCP ports (one may be a
    /// gdb stub that stops the VM when a client connects).
    pub nbd_tcp: Option<std::net::SocketAddr>,
    /// qemu-guest-agent socket: if set, guest file systems are frozen around
    /// the snapshot transaction (and always thawed).
    pub freeze: Option<PathBuf>,
    /// Timeout of each guest agent request.
    pub freeze_timeout: Duration,
}

impl SessionConfig {
    pub fn new(
        workdir: impl Into<PathBuf>,
        new_bitmap: impl Into<String>,
        prev_bitmap: Option<String>,
    ) -> Self {
        SessionConfig {
            workdir: workdir.into(),
            new_bitmap: new_bitmap.into(),
            prev_bitmap,
            nbd_socket: None,
            nbd_tcp: None,
            freeze: None,
            freeze_timeout: Duration::from_secs(30),
        }
    }
}

/// One exported disk of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionExport {
    pub disk: String,
    pub node: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// NBD export name.
    pub export_name: String,
    /// `nbd+unix:///<export>?socket=<path>`
    pub uri: String,
    /// `qemu:dirty-bitmap:<prev>` for an incremental session.
    pub bitmap_context: Option<String>,
}

#[derive(Debug)]
struct DiskState {
    spec: DiskSpec,
    size: u64,
    fleece_path: PathBuf,
    fleece_node: String,
    cbw_node: String,
    job_id: String,
    snap_node: String,
    export_id: String,
    export_name: String,
    file_created: bool,
    fleece_added: bool,
    job_running: bool,
    bitmaps_pending: bool,
    snap_added: bool,
    export_added: bool,
}

/// A running point-in-time capture. See the module documentation.
#[derive(Debug)]
pub struct FleeceSession {
    qmp: Option<Qmp>,
    tag: String,
    cfg: SessionConfig,
    disks: Vec<DiskState>,
    socket: PathBuf,
    /// The TCP address of QEMU's own NBD server, when it listens on TCP
    /// (and `socket` is then unused).
    tcp: Option<std::net::SocketAddr>,
    server_owned: bool,
    exports: Vec<SessionExport>,
    done: bool,
}

impl FleeceSession {
    /// Captures `disks` at one instant and exports them. On error everything
    /// done so far is undone; [`Error::BitmapUnusable`],
    /// [`Error::BitmapExists`], [`Error::NodeNotFound`] and [`Error::Config`]
    /// are raised before QEMU is changed at all.
    pub fn start(mut qmp: Qmp, disks: &[DiskSpec], cfg: &SessionConfig) -> Result<FleeceSession> {
        validate_config(disks, cfg)?;
        let nodes: BTreeMap<String, NodeInfo> = inventory::named_nodes(&mut qmp)?
            .into_iter()
            .map(|n| (n.node_name.clone(), n))
            .collect();
        let mut sizes = Vec::with_capacity(disks.len());
        for d in disks {
            sizes.push(check_disk(d, nodes.get(&d.node), cfg)?);
        }

        std::fs::create_dir_all(&cfg.workdir).map_err(|source| Error::File {
            context: "cannot create the work directory",
            path: cfg.workdir.clone(),
            source,
        })?;
        // QEMU resolves relative paths against its own cwd.
        let workdir = cfg.workdir.canonicalize().map_err(|source| Error::File {
            context: "cannot resolve the work directory",
            path: cfg.workdir.clone(),
            source,
        })?;
        let attached: HashSet<PathBuf> = nodes
            .values()
            .filter_map(|n| n.filename.as_ref().map(PathBuf::from))
            .collect();
        sweep_orphan_fleece_files(&workdir, &attached);
        let tag = util::session_tag();
        let socket = match &cfg.nbd_socket {
            Some(p) => p.clone(),
            None => workdir.join(format!("{tag}.nbd.sock")),
        };
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::Config(format!(
                "NBD socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter work directory or set nbd_socket",
                socket.display()
            )));
        }
        let states = disks
            .iter()
            .zip(sizes)
            .enumerate()
            .map(|(i, (d, size))| DiskState {
                spec: d.clone(),
                size,
                fleece_path: workdir.join(format!("{tag}-{i}.{FLEECE_SUFFIX}")),
                fleece_node: format!("{tag}-fl{i}"),
                cbw_node: format!("{tag}-cbw{i}"),
                job_id: format!("{tag}-job{i}"),
                snap_node: format!("{tag}-snap{i}"),
                export_id: format!("{tag}-exp{i}"),
                export_name: format!("{tag}-{i}-{}", util::sanitize(&d.name)),
                file_created: false,
                fleece_added: false,
                job_running: false,
                bitmaps_pending: false,
                snap_added: false,
                export_added: false,
            })
            .collect();
        util::set_tag_live(&tag, true);
        let mut session = FleeceSession {
            qmp: Some(qmp),
            tag,
            cfg: SessionConfig {
                workdir,
                ..cfg.clone()
            },
            disks: states,
            socket,
            tcp: None,
            server_owned: false,
            exports: Vec::new(),
            done: false,
        };
        match session.setup() {
            Ok(()) => {
                tracing::info!(session = %session.tag, disks = session.disks.len(), socket = %session.socket.display(), "fleecing session started");
                Ok(session)
            }
            Err(e) => {
                tracing::warn!(session = %session.tag, "starting the fleecing session failed, rolling back: {e}");
                session.done = true;
                if let Err(te) = session.teardown(false) {
                    tracing::error!(session = %session.tag, "rollback incomplete: {te}");
                }
                Err(e)
            }
        }
    }

    /// Unix socket of the NBD server that serves the exports.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether this session started the NBD server (and will stop it).
    pub fn owns_nbd_server(&self) -> bool {
        self.server_owned
    }

    /// The `ekko-<pid>-<hex>` tag that prefixes every name of the session.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// All exports, in the order of the disks given to `start`.
    pub fn exports(&self) -> &[SessionExport] {
        &self.exports
    }

    /// NBD URI of the point-in-time view of `disk` (a [`DiskSpec::name`]);
    /// `None` for a disk not in the session.
    pub fn export_uri(&self, disk: &str) -> Option<String> {
        self.export(disk).map(|e| e.uri.clone())
    }

    /// `qemu:dirty-bitmap:<prev>`, the NBD meta context listing the blocks
    /// written since the previous backup; `None` for a full session.
    pub fn bitmap_context(&self, disk: &str) -> Option<String> {
        self.export(disk).and_then(|e| e.bitmap_context.clone())
    }

    /// Size in bytes of `disk`.
    pub fn disk_size(&self, disk: &str) -> Option<u64> {
        self.export(disk).map(|e| e.size)
    }

    fn export(&self, disk: &str) -> Option<&SessionExport> {
        self.exports.iter().find(|e| e.disk == disk)
    }

    /// The QMP connection, e.g. for queries while the session runs.
    pub fn qmp(&mut self) -> &mut Qmp {
        self.qmp
            .as_mut()
            .expect("the QMP connection lives as long as the session")
    }

    /// Ends the session. `committed = true` once the backup is durably
    /// stored: the previous bitmap generation is removed. `false`: QEMU is
    /// restored (see the module documentation for the bitmap policy).
    ///
    /// Every step is attempted even if an earlier one fails; the errors are
    /// returned together. After a failed `finish(true)` the backup is still
    /// valid: the new generation exists and records.
    pub fn finish(self, committed: bool) -> Result<()> {
        self.finish_keep_qmp(committed).0
    }

    /// Like [`FleeceSession::finish`], and gives the QMP connection back.
    pub fn finish_keep_qmp(mut self, committed: bool) -> (Result<()>, Qmp) {
        self.done = true;
        let result = self.teardown(committed);
        let qmp = self
            .qmp
            .take()
            .expect("the QMP connection lives as long as the session");
        (result, qmp)
    }

    fn setup(&mut self) -> Result<()> {
        self.setup_nbd_server()?;
        for d in &mut self.disks {
            create_fleece_file(&d.fleece_path, d.size)?;
            d.file_created = true;
        }
        let qmp = self.qmp.as_mut().expect("qmp");
        for d in &mut self.disks {
            qmp.execute(
                "blockdev-add",
                json!({
                    "driver": "raw",
                    "node-name": d.fleece_node,
                    "file": { "driver": "file", "filename": d.fleece_path },
                    "discard": "unmap",
                }),
            )?;
            d.fleece_added = true;
        }

        self.snapshot_transaction()?;

        let qmp = self.qmp.as_mut().expect("qmp");
        for d in &mut self.disks {
            qmp.execute(
                "blockdev-add",
                json!({
                    "driver": "snapshot-access",
                    "node-name": d.snap_node,
                    "file": d.cbw_node,
                }),
            )?;
            d.snap_added = true;
            let mut args = json!({
                "type": "nbd",
                "id": d.export_id,
                "node-name": d.snap_node,
                "name": d.export_name,
                "writable": false,
                "allocation-depth": true,
            });
            if let Some(prev) = &self.cfg.prev_bitmap {
                args["bitmaps"] = json!([{ "node": d.spec.node, "name": prev }]);
            }
            qmp.execute("block-export-add", args)?;
            d.export_added = true;
        }

        let socket = util::percent_encode(&self.socket.to_string_lossy());
        let uri = |export: &str| match self.tcp {
            Some(addr) => format!("nbd://{addr}/{}", util::percent_encode(export)),
            None => format!(
                "nbd+unix:///{}?socket={socket}",
                util::percent_encode(export)
            ),
        };
        self.exports = self
            .disks
            .iter()
            .map(|d| SessionExport {
                disk: d.spec.name.clone(),
                node: d.spec.node.clone(),
                size: d.size,
                export_name: d.export_name.clone(),
                uri: uri(&d.export_name),
                bitmap_context: self
                    .cfg
                    .prev_bitmap
                    .as_ref()
                    .map(|p| format!("qemu:dirty-bitmap:{p}")),
            })
            .collect();
        Ok(())
    }

    fn setup_nbd_server(&mut self) -> Result<()> {
        let qmp = self.qmp.as_mut().expect("qmp");
        let started = qmp.execute(
            "nbd-server-start",
            json!({ "addr": { "type": "unix", "data": { "path": self.socket } } }),
        );
        let desc = match started {
            Ok(_) => {
                self.server_owned = true;
                return Ok(());
            }
            Err(Error::Command { desc, .. }) => desc,
            Err(e) => return Err(e),
        };
        // Usually "NBD server already running": reuse that server.
        if let Some(p) = &self.cfg.nbd_socket {
            if crate::nbd::probe_nbd(p) {
                tracing::info!(socket = %p.display(), "reusing the running NBD server");
                return Ok(());
            }
            return Err(Error::NbdServerUnknown {
                reason: format!(
                    "nbd-server-start said \"{desc}\" and {} does not answer as an NBD server",
                    p.display()
                ),
            });
        }
        if let Some(addr) = self.cfg.nbd_tcp {
            if crate::nbd::probe_nbd_tcp(&addr) {
                tracing::info!(%addr, "reusing the running NBD server, on TCP");
                self.tcp = Some(addr);
                return Ok(());
            }
            return Err(Error::NbdServerUnknown {
                reason: format!(
                    "nbd-server-start said \"{desc}\" and {addr} does not answer as an NBD server"
                ),
            });
        }
        let Some(pid) = qmp.peer_pid() else {
            return Err(Error::NbdServerUnknown {
                reason: format!("nbd-server-start said \"{desc}\" and QEMU's PID is unknown"),
            });
        };
        match crate::nbd::find_nbd_socket(pid, qmp.path()) {
            Ok(p) => {
                tracing::info!(socket = %p.display(), "reusing the running NBD server");
                self.socket = p;
                Ok(())
            }
            Err(reason) => Err(Error::NbdServerUnknown {
                reason: format!("nbd-server-start said \"{desc}\"; {reason}"),
            }),
        }
    }

    fn snapshot_transaction(&mut self) -> Result<()> {
        let mut actions = Vec::new();
        for d in &self.disks {
            actions.push(json!({
                "type": "block-dirty-bitmap-add",
                "data": { "node": d.spec.node, "name": self.cfg.new_bitmap, "persistent": true },
            }));
            if let Some(prev) = &self.cfg.prev_bitmap {
                actions.push(json!({
                    "type": "block-dirty-bitmap-disable",
                    "data": { "node": d.spec.node, "name": prev },
                }));
            }
            actions.push(json!({
                "type": "blockdev-backup",
                "data": {
                    "device": d.spec.node,
                    "target": d.fleece_node,
                    "sync": "none",
                    "job-id": d.job_id,
                    "filter-node-name": d.cbw_node,
                },
            }));
        }

        let mut agent = match &self.cfg.freeze {
            Some(p) => Some(GuestAgent::connect(p, self.cfg.freeze_timeout)?),
            None => None,
        };
        if let Some(a) = agent.as_mut() {
            if let Err(e) = a.fsfreeze_freeze() {
                // A freeze that failed half-way can leave some file systems frozen.
                if let Err(t) = thaw(a) {
                    tracing::error!("thawing the guest after a failed freeze failed: {t}");
                }
                return Err(e);
            }
            tracing::debug!("guest file systems frozen");
        }
        let qmp = self.qmp.as_mut().expect("qmp");
        let result = qmp.execute("transaction", json!({ "actions": actions }));
        if result.is_ok() {
            for d in &mut self.disks {
                d.job_running = true;
                d.bitmaps_pending = true;
            }
        }
        if let Some(a) = agent.as_mut() {
            match thaw(a) {
                Ok(n) => tracing::debug!("thawed {n} guest file system(s)"),
                Err(t) if result.is_ok() => return Err(t),
                Err(t) => tracing::error!("thawing the guest failed: {t}"),
            }
        }
        result.map(|_| ())
    }

    /// Undoes whatever the progress flags say was done. Idempotent.
    fn teardown(&mut self, committed: bool) -> Result<()> {
        let Some(qmp) = self.qmp.as_mut() else {
            return Ok(());
        };
        let mut errors: Vec<Error> = Vec::new();
        // After a timeout or disconnection every further command would fail
        // the same way (or wait the full timeout again): skip them.
        let lost = |errors: &Vec<Error>| errors.iter().any(Error::is_disconnected);

        for d in self.disks.iter_mut().rev() {
            if d.export_added && !lost(&errors) {
                match delete_export(qmp, &d.export_id) {
                    Ok(()) => d.export_added = false,
                    Err(e) => errors.push(e),
                }
            }
            if d.snap_added && !lost(&errors) {
                match delete_node(qmp, &d.snap_node) {
                    Ok(()) => d.snap_added = false,
                    Err(e) => errors.push(e),
                }
            }
        }
        for d in self.disks.iter_mut().rev() {
            if d.job_running && !lost(&errors) {
                match cancel_job(qmp, &d.job_id) {
                    Ok(()) => d.job_running = false,
                    Err(e) => errors.push(e),
                }
            }
        }
        for d in self.disks.iter_mut().rev() {
            if d.fleece_added && !d.job_running && !lost(&errors) {
                match delete_node(qmp, &d.fleece_node) {
                    Ok(()) => d.fleece_added = false,
                    Err(e) => errors.push(e),
                }
            }
        }
        // A fleece file still attached to a live QEMU is left in place
        // (cleanup_stale removes it later); if QEMU is gone it is garbage.
        let qemu_gone = qmp.peer_alive() == Some(false);
        for d in &mut self.disks {
            if d.file_created && (!d.fleece_added || qemu_gone) {
                match std::fs::remove_file(&d.fleece_path) {
                    Ok(()) => d.file_created = false,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => d.file_created = false,
                    Err(source) => errors.push(Error::File {
                        context: "cannot delete the fleece file",
                        path: d.fleece_path.clone(),
                        source,
                    }),
                }
            } else if d.file_created {
                tracing::warn!(file = %d.fleece_path.display(), "fleece file left in place: still attached to QEMU");
            }
        }

        for d in &mut self.disks {
            if !d.bitmaps_pending || lost(&errors) {
                continue;
            }
            let node = &d.spec.node;
            let new = &self.cfg.new_bitmap;
            let r = match (&self.cfg.prev_bitmap, committed) {
                (Some(prev), true) => qmp.execute(
                    "block-dirty-bitmap-remove",
                    json!({ "node": node, "name": prev }),
                ),
                (None, true) => Ok(Value::Null),
                (Some(prev), false) => qmp.execute(
                    "transaction",
                    json!({ "actions": [
                        { "type": "block-dirty-bitmap-enable",
                          "data": { "node": node, "name": prev } },
                        { "type": "block-dirty-bitmap-merge",
                          "data": { "node": node, "target": prev, "bitmaps": [new] } },
                        { "type": "block-dirty-bitmap-remove",
                          "data": { "node": node, "name": new } },
                    ] }),
                ),
                (None, false) => qmp.execute(
                    "block-dirty-bitmap-remove",
                    json!({ "node": node, "name": new }),
                ),
            };
            match r {
                Ok(_) => d.bitmaps_pending = false,
                Err(e) => errors.push(e),
            }
        }

        if self.server_owned && !lost(&errors) {
            match stop_server_if_unused(qmp) {
                Ok(true) => {
                    self.server_owned = false;
                    let _ = std::fs::remove_file(&self.socket);
                }
                Ok(false) => {
                    tracing::warn!(socket = %self.socket.display(), "NBD server left running: other exports use it");
                    self.server_owned = false;
                }
                Err(e) => errors.push(e),
            }
        } else if self.server_owned && qemu_gone {
            let _ = std::fs::remove_file(&self.socket);
        }

        if errors.is_empty() {
            tracing::info!(session = %self.tag, committed, "fleecing session finished");
            Ok(())
        } else {
            for e in &errors {
                tracing::warn!(session = %self.tag, "teardown: {e}");
            }
            Err(Error::Teardown {
                session: self.tag.clone(),
                errors,
            })
        }
    }
}

impl Drop for FleeceSession {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            if let Err(e) = self.teardown(false) {
                tracing::error!(session = %self.tag, "teardown on drop failed: {e}");
            }
        }
        // Whatever is left now belongs to nobody: cleanup_stale may take it.
        util::set_tag_live(&self.tag, false);
    }
}

fn validate_config(disks: &[DiskSpec], cfg: &SessionConfig) -> Result<()> {
    if disks.is_empty() {
        return Err(Error::Config("no disks given".into()));
    }
    let valid_name = |s: &str| !s.is_empty() && s.len() <= 1023 && !s.contains('\0');
    if !valid_name(&cfg.new_bitmap) {
        return Err(Error::Config(format!(
            "invalid new bitmap name '{}'",
            cfg.new_bitmap
        )));
    }
    if let Some(prev) = &cfg.prev_bitmap {
        if !valid_name(prev) {
            return Err(Error::Config(format!(
                "invalid previous bitmap name '{prev}'"
            )));
        }
        if *prev == cfg.new_bitmap {
            return Err(Error::Config(format!(
                "the new bitmap generation must differ from the previous one ('{prev}')"
            )));
        }
    }
    let mut names = HashSet::new();
    let mut nodes = HashSet::new();
    for d in disks {
        if !names.insert(&d.name) {
            return Err(Error::Config(format!("disk '{}' given twice", d.name)));
        }
        if !nodes.insert(&d.node) {
            return Err(Error::Config(format!("node '{}' given twice", d.node)));
        }
    }
    Ok(())
}

/// Checks one disk before anything changes; returns its size.
fn check_disk(d: &DiskSpec, node: Option<&NodeInfo>, cfg: &SessionConfig) -> Result<u64> {
    let node = node.ok_or_else(|| Error::NodeNotFound {
        node: d.node.clone(),
    })?;
    if node.read_only {
        return Err(Error::ReadOnly {
            disk: d.name.clone(),
            node: d.node.clone(),
        });
    }
    if node.size == 0 {
        return Err(Error::Config(format!(
            "disk '{}': node '{}' reports size 0",
            d.name, d.node
        )));
    }
    if node.bitmaps.iter().any(|b| b.name == cfg.new_bitmap) {
        return Err(Error::BitmapExists {
            disk: d.name.clone(),
            node: d.node.clone(),
            bitmap: cfg.new_bitmap.clone(),
        });
    }
    if let Some(prev) = &cfg.prev_bitmap {
        let unusable = |reason: &str| Error::BitmapUnusable {
            disk: d.name.clone(),
            bitmap: prev.clone(),
            reason: reason.to_string(),
        };
        let Some(b) = node.bitmaps.iter().find(|b| b.name == *prev) else {
            return Err(unusable(&format!(
                "it does not exist on node '{}' (the image was replaced, or the bitmap removed)",
                d.node
            )));
        };
        if b.inconsistent {
            return Err(unusable(
                "it is marked inconsistent (QEMU stopped uncleanly) and may have missed writes",
            ));
        }
        if !b.persistent {
            return Err(unusable(
                "it is not persistent, so it would not survive a QEMU restart",
            ));
        }
        if !b.recording {
            return Err(unusable(
                "it is disabled (probably by an interrupted backup session) and may have missed writes",
            ));
        }
        if b.busy {
            return Err(unusable("it is busy: another backup or export is using it"));
        }
    }
    Ok(node.size)
}

/// Creates the fleece file: empty and sparse, so it takes disk space only
/// for the old data copied into it. A raw file needs no qemu-img process
/// (30–50 ms with a cold page cache), and the copy-before-write filter
/// keeps its own record of what it copied, so no image format is needed.
/// `create_new` never truncates a file that is not ours.
fn create_fleece_file(path: &Path, size: u64) -> Result<()> {
    let file_error = |context, source| Error::File {
        context,
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| file_error("cannot create the fleece file", e))?;
    if let Err(e) = f.set_len(size) {
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(file_error("cannot size the fleece file", e));
    }
    Ok(())
}

/// Deletes fleece files in `workdir` of sessions whose process is gone:
/// those a process killed between creating the file and attaching it left
/// behind. Files this QEMU has attached (`attached`) are left to
/// [`cleanup_stale`]. (One attached to another QEMU sharing the folder
/// only loses its name; its space returns when that QEMU's next backup
/// detaches it.)
fn sweep_orphan_fleece_files(workdir: &Path, attached: &HashSet<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(workdir) else {
        return;
    };
    let me = std::process::id();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let ours = name.ends_with(FLEECE_SUFFIX) || name.ends_with(OLD_FLEECE_SUFFIX);
        let dead = util::owner_pid(name).is_some_and(|pid| pid != me && !util::pid_alive(pid));
        if ours && dead && !attached.contains(&e.path()) && std::fs::remove_file(e.path()).is_ok() {
            tracing::info!(file = %e.path().display(), "removed the fleece file of a dead backup session");
        }
    }
}

/// Thaws, retrying once after re-synchronising the agent.
fn thaw(a: &mut GuestAgent) -> Result<u64> {
    match a.fsfreeze_thaw() {
        Ok(n) => Ok(n),
        Err(first) => {
            tracing::warn!("guest thaw failed, retrying: {first}");
            a.sync().and_then(|()| a.fsfreeze_thaw()).map_err(|e| Error::GuestAgent {
                op: "guest-fsfreeze-thaw".into(),
                detail: format!(
                    "{e}; the guest file systems may still be frozen: run guest-fsfreeze-thaw by hand"
                ),
            })
        }
    }
}

/// Polls `done` until it says true, for at most the QMP timeout.
fn wait_until(
    qmp: &mut Qmp,
    what: &str,
    mut done: impl FnMut(&mut Qmp) -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + qmp.timeout();
    loop {
        if done(qmp)? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                secs: qmp.timeout().as_secs(),
            });
        }
        std::thread::sleep(POLL);
    }
}

fn export_exists(qmp: &mut Qmp, id: &str) -> Result<bool> {
    let v = qmp.execute("query-block-exports", Value::Null)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .any(|e| e["id"].as_str() == Some(id)))
}

fn node_exists(qmp: &mut Qmp, node: &str) -> Result<bool> {
    Ok(inventory::named_nodes(qmp)?
        .iter()
        .any(|n| n.node_name == node))
}

/// Deletes an export, dropping its clients, and waits until it is gone.
fn delete_export(qmp: &mut Qmp, id: &str) -> Result<()> {
    if let Err(e) = qmp.execute("block-export-del", json!({ "id": id, "mode": "hard" })) {
        if e.is_disconnected() || export_exists(qmp, id)? {
            return Err(e);
        }
        return Ok(());
    }
    wait_until(qmp, &format!("export '{id}' to be deleted"), |q| {
        Ok(!export_exists(q, id)?)
    })
}

fn delete_node(qmp: &mut Qmp, node: &str) -> Result<()> {
    match qmp.execute("blockdev-del", json!({ "node-name": node })) {
        Ok(_) => Ok(()),
        Err(e) if e.is_disconnected() => Err(e),
        Err(e) => {
            if node_exists(qmp, node)? {
                Err(e)
            } else {
                Ok(())
            }
        }
    }
}

/// The status of a job, `None` if QEMU does not know it.
fn job_status(qmp: &mut Qmp, id: &str) -> Result<Option<String>> {
    let v = qmp.execute("query-jobs", Value::Null)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .find(|j| j["id"].as_str() == Some(id))
        .map(|j| j["status"].as_str().unwrap_or("").to_string()))
}

/// Cancels a job and waits until it is gone (this also removes the
/// copy-before-write filter of a backup job).
fn cancel_job(qmp: &mut Qmp, id: &str) -> Result<()> {
    if let Err(e) = qmp.execute("block-job-cancel", json!({ "device": id, "force": true })) {
        if e.is_disconnected() {
            return Err(e);
        }
        match job_status(qmp, id)? {
            None => return Ok(()), // already ended by itself
            Some(s) if s == "concluded" || s == "aborting" || s == "null" => {}
            Some(_) => return Err(e),
        }
    }
    wait_until(qmp, &format!("job '{id}' to end"), |q| {
        match job_status(q, id)?.as_deref() {
            None => Ok(true),
            Some("concluded") => {
                q.execute("job-dismiss", json!({ "id": id }))?;
                Ok(false)
            }
            Some(_) => Ok(false),
        }
    })
}

/// Stops the NBD server if no NBD export is left on it.
fn stop_server_if_unused(qmp: &mut Qmp) -> Result<bool> {
    let v = qmp.execute("query-block-exports", Value::Null)?;
    let others = v
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["type"].as_str() == Some("nbd"));
    if others {
        return Ok(false);
    }
    qmp.execute("nbd-server-stop", Value::Null)?;
    Ok(true)
}

/// What [`cleanup_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaleCleanup {
    pub exports: Vec<String>,
    pub jobs: Vec<String>,
    pub nodes: Vec<String>,
    pub files: Vec<PathBuf>,
    /// The NBD server was stopped (it had been started by a dead session).
    pub nbd_server_stopped: bool,
}

impl StaleCleanup {
    pub fn is_empty(&self) -> bool {
        self.exports.is_empty()
            && self.jobs.is_empty()
            && self.nodes.is_empty()
            && self.files.is_empty()
            && !self.nbd_server_stopped
    }
}

/// Removes the exports, jobs, nodes and fleece images left in QEMU by
/// sessions that can no longer tear down: those of processes that died
/// (SIGKILL, crash...), and those of this process that were dropped although
/// their teardown failed (QMP timeout...). Sessions of other live processes,
/// and live sessions of this one, are not touched. The owner PID is part of
/// every name, so this assumes the backup processes run in this host's PID
/// namespace.
///
/// Bitmaps are not touched: the dead session's previous generation stays
/// disabled, so the next session refuses it and a full backup follows; its
/// new generation is an orphan the caller may remove with
/// [`inventory::remove_bitmap`].
pub fn cleanup_stale(qmp: &mut Qmp) -> Result<StaleCleanup> {
    cleanup_stale_if(qmp, |pid| !util::pid_alive(pid))
}

/// [`cleanup_stale`] with a custom test of which *other* processes are dead
/// (e.g. for backup processes in another PID namespace).
pub fn cleanup_stale_if(qmp: &mut Qmp, owner_dead: impl Fn(u32) -> bool) -> Result<StaleCleanup> {
    let me = std::process::id();
    let stale = |name: &str| match util::owner_pid(name) {
        Some(pid) if pid == me => util::session_of(name).is_some_and(|t| !util::is_live_tag(t)),
        Some(pid) => owner_dead(pid),
        None => false,
    };
    let mut report = StaleCleanup::default();

    let exports = qmp.execute("query-block-exports", Value::Null)?;
    let ids: Vec<String> = exports
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["id"].as_str())
        .filter(|id| stale(id))
        .map(str::to_string)
        .collect();
    for id in ids {
        delete_export(qmp, &id)?;
        report.exports.push(id);
    }

    let snaps: Vec<String> = inventory::named_nodes(qmp)?
        .into_iter()
        .filter(|n| n.driver == "snapshot-access" && stale(&n.node_name))
        .map(|n| n.node_name)
        .collect();
    for n in snaps {
        delete_node(qmp, &n)?;
        report.nodes.push(n);
    }

    let jobs = qmp.execute("query-jobs", Value::Null)?;
    let ids: Vec<String> = jobs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["id"].as_str())
        .filter(|id| stale(id))
        .map(str::to_string)
        .collect();
    for id in ids {
        cancel_job(qmp, &id)?;
        report.jobs.push(id);
    }

    let fleeces: Vec<NodeInfo> = inventory::named_nodes(qmp)?
        .into_iter()
        .filter(|n| stale(&n.node_name) && n.driver != "copy-before-write")
        .collect();
    for n in fleeces {
        delete_node(qmp, &n.node_name)?;
        // Delete only files named like ours, never an arbitrary image.
        if let (Some(file), Some(tag)) = (&n.filename, util::session_of(&n.node_name)) {
            let path = PathBuf::from(file);
            let ours = path
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .is_some_and(|f| {
                    f.starts_with(tag)
                        && (f.ends_with(FLEECE_SUFFIX) || f.ends_with(OLD_FLEECE_SUFFIX))
                });
            if ours && std::fs::remove_file(&path).is_ok() {
                report.files.push(path);
            }
        }
        report.nodes.push(n.node_name);
    }

    // An NBD server started by a dead session listens on `<tag>.nbd.sock`.
    // Only sockets so named are probed: probing any other (a monitor busy
    // with another client does not greet) would cost its whole timeout on
    // every backup.
    if let Some(pid) = qmp.peer_pid() {
        let ours = crate::nbd::listening_sockets(pid)
            .unwrap_or_default()
            .into_iter()
            .find(|sock| {
                sock.file_name()
                    .and_then(|f| f.to_str())
                    .and_then(|f| f.strip_suffix(".nbd.sock"))
                    .is_some_and(|tag| stale(&format!("{tag}-x")))
                    && crate::nbd::probe_nbd(sock)
            });
        if let Some(sock) = ours {
            if stop_server_if_unused(qmp)? {
                let _ = std::fs::remove_file(&sock);
                report.nbd_server_stopped = true;
            }
        }
    }
    if !report.is_empty() {
        tracing::info!(?report, "removed leftovers of dead backup sessions");
    }
    Ok(report)
}
