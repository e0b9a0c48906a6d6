//! `ekko backup`: offline images and NBD exports (`--disk NAME=SOURCE`), a
//! running QEMU captured live through QMP (`--qmp SOCKET`), or a libvirt
//! domain through libvirt's backup API (`--domain NAME`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use ekko::backup::{BackupOptions, DiskPlan, Progress, Session};
use ekko::capture::{self, LiveBackup, LiveOptions};
use ekko::ratelimit::{self, RateLimited, RateLimiter};
use ekko::snapshot::{self, Capture, CaptureMode, Snapshot};
use ekko::source;
use serde_json::{json, Value};

use super::Global;

#[derive(Args)]
pub struct BackupArgs {
    /// The VM the disks belong to (with --domain: the domain's name).
    #[arg(long, required_unless_present = "domain", conflicts_with = "domain")]
    vm: Option<String>,
    /// A libvirt domain: back up its disks through libvirt's pull-mode
    /// backup API and checkpoints, incrementally after the first time. The
    /// snapshots are named after the domain.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["qmp", "bitmap"])]
    domain: Option<String>,
    /// libvirt URI (with --domain).
    #[arg(long, value_name = "URI", requires = "domain")]
    connect: Option<String>,
    /// Offline: NAME=SOURCE, a raw or qcow2 image, or an nbd:// /
    /// nbd+unix:// URI. With --qmp: NAME=NODE, a QEMU device or block node
    /// name; without --disk every writable disk of QEMU is backed up. With
    /// --domain: a disk target (vda); without --disk every qcow2 disk that
    /// is not read-only, removable or shareable.
    #[arg(
        long = "disk",
        value_name = "NAME=SOURCE",
        required_unless_present_any = ["qmp", "domain"]
    )]
    disks: Vec<String>,
    /// Dirty bitmap of the sources (qcow2 persistent bitmap or NBD export
    /// context) that records writes since the previous backup.
    #[arg(long, conflicts_with = "qmp")]
    bitmap: Option<String>,
    /// QMP socket of a running QEMU or qemu-storage-daemon: capture its
    /// disks live, at one instant, incrementally through dirty bitmaps.
    #[arg(long, value_name = "SOCKET")]
    qmp: Option<PathBuf>,
    /// Freeze the guest file systems for the instant of the snapshot. With
    /// --qmp: the qemu-guest-agent socket. With --domain: no value, libvirt
    /// talks to the agent; if no agent answers the backup goes on
    /// crash-consistent with a warning.
    #[arg(long, value_name = "SOCKET", num_args = 0..=1)]
    fsfreeze: Option<Option<PathBuf>>,
    /// With --domain: fail instead of going on when the guest cannot be
    /// frozen.
    #[arg(long, requires = "domain")]
    require_fsfreeze: bool,
    /// Directory for the temporary fleecing or scratch files and sockets
    /// (with --qmp or --domain). They grow by what the guest overwrites
    /// during the backup. With --qmp ekko creates them and QEMU opens them
    /// for writing; with --domain QEMU creates them.
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// With --qmp or --domain: free space to keep in --workdir (such as 512M or 2G). A
    /// backup does not start with less, and stops (committing nothing)
    /// when free space falls below it, before QEMU would fail the guest's
    /// writes. Default: 1G, or a tenth of the file system if smaller.
    #[arg(long, value_name = "SIZE", value_parser = super::parse_bytes)]
    workdir_reserve: Option<u64>,
    /// With --qmp, when QEMU already runs an NBD server on TCP (started
    /// with `--nbd-server addr.type=inet`): its address. ekko's exports are
    /// readable there for the length of the backup, so it should listen on
    /// a loopback address. A server on a Unix socket is found unaided.
    #[arg(long, value_name = "IP:PORT")]
    nbd_server: Option<std::net::SocketAddr>,
    /// Read everything, even when an incremental is possible.
    #[arg(long)]
    full: bool,
    /// Read image files even when a running QEMU has them open for
    /// writing. The backup may then be torn (blocks from different
    /// moments); prefer --qmp or --domain for a running VM.
    #[arg(long, conflicts_with_all = ["qmp", "domain"])]
    allow_in_use: bool,
    /// Worker threads (and twice as many NBD connections, up to 8).
    #[arg(long, default_value_t = super::default_threads(), value_parser = super::at_least_one)]
    threads: usize,
    /// Cap the reads from the sources at this many MB/s (10^6 bytes per
    /// second), for all workers together.
    #[arg(long, value_name = "MB/s", value_parser = ratelimit::parse_mb_per_sec)]
    rate_limit: Option<u64>,
    /// Run at normal CPU and I/O priority instead of low.
    #[arg(long)]
    normal_priority: bool,
    /// Print a JSON summary instead of the snapshot id.
    #[arg(long)]
    json: bool,
    /// Label the snapshot; may be given several times. Letters, digits and
    /// -_.:+=@, up to 64 bytes. `ekko snapshots --tag` and
    /// `ekko forget --tag` select snapshots by their tags.
    #[arg(long = "tag", value_name = "TAG", value_parser = parse_tag)]
    tags: Vec<String>,
    /// Record this RFC 3339 instant as the snapshot's time instead of now
    /// (for tests of retention on a synthetic history).
    #[arg(long, hide = true, value_name = "RFC3339")]
    time: Option<String>,
}

/// Lower this process's CPU and I/O priority so that tenants' VMs come first.
/// Must run before threads are spawned: Linux priorities are per thread and
/// inherited.
pub fn lower_priority() {
    // SAFETY: plain syscalls on the calling process with constant arguments.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
        // IOPRIO_WHO_PROCESS = 1; class best-effort (2) << 13 | level 7.
        libc::syscall(libc::SYS_ioprio_set, 1, 0, (2 << 13) | 7);
    }
}

pub fn resource_usage() -> (f64, u64) {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let cpu = secs(ru.ru_utime) + secs(ru.ru_stime);
    let rss = u64::try_from(ru.ru_maxrss).unwrap_or(0) * 1024;
    (cpu, rss)
}

pub fn parse_tag(s: &str) -> std::result::Result<String, String> {
    ekko::snapshot::check_tag(s).map(|()| s.to_string())
}

/// Splits `NAME=VALUE` arguments, checking names.
fn parse_disks(args: &[String]) -> Result<Vec<(String, String)>> {
    let mut specs: Vec<(String, String)> = Vec::new();
    for d in args {
        let Some((name, src)) = d.split_once('=') else {
            super::usage!("--disk {d:?}: expected NAME=SOURCE");
        };
        if name.is_empty() || name.contains('/') {
            super::usage!("--disk {d:?}: the name must be non-empty and contain no '/'");
        }
        if specs.iter().any(|(n, _)| n == name) {
            super::usage!("disk {name:?} given twice");
        }
        specs.push((name.to_string(), src.to_string()));
    }
    Ok(specs)
}

/// NBD connections per disk: two per worker, as each connection is read
/// by a thread of its own while the workers hash and compress (measured
/// on a qcow2 image through qemu-nbd, 2 workers: 4 connections beat 2).
fn connections(threads: usize) -> usize {
    threads.saturating_mul(2).clamp(1, 8)
}

fn limiter(a: &BackupArgs, cancel: &Arc<AtomicBool>) -> Result<Option<Arc<RateLimiter>>> {
    Ok(match a.rate_limit {
        Some(r) => Some(Arc::new(
            RateLimiter::new(r)?.with_cancel(Arc::clone(cancel)),
        )),
        None => None,
    })
}

/// The JSON entry of one backed-up disk.
fn disk_json(disk: &ekko::Disk, node: Option<&str>, dirty_bytes: Option<u64>) -> Value {
    let mut v = json!({
        "name": disk.name, "size": disk.size, "source": disk.source,
        "mode": disk.capture.mode, "reason": disk.capture.reason,
        "bitmap": disk.capture.bitmap, "next_bitmap": disk.capture.next_bitmap,
        "dirty_bytes": dirty_bytes,
        "bytes_read": disk.stats.bytes_read,
        "bytes_new": disk.stats.bytes_new, "bytes_stored": disk.stats.bytes_stored,
        "chunks": disk.stats.chunks, "chunks_new": disk.stats.chunks_new,
        "chunks_zero": disk.stats.chunks_zero,
    });
    if let Some(n) = node {
        v["node"] = json!(n);
    }
    v
}

/// Prints the summary: JSON, or the snapshot id and a line on stderr.
fn print_summary(
    g: &Global,
    a: &BackupArgs,
    snap: &Snapshot,
    disks: Vec<Value>,
    extra: Value,
    start: Instant,
) -> Result<()> {
    let (cpu, rss) = resource_usage();
    let total = |k: &str| {
        disks
            .iter()
            .map(|d| d[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let (read, stored) = (total("bytes_read"), total("bytes_stored"));
    if a.json {
        let mut v = json!({
            "id": snap.id, "vm": snap.vm, "time": snap.time, "parent": snap.parent,
            "tags": snap.tags,
            "bytes_read": read, "bytes_new": total("bytes_new"),
            "bytes_stored": stored,
            "duration_seconds": start.elapsed().as_secs_f64(),
            "cpu_seconds": cpu, "peak_rss_bytes": rss,
            "rate_limit_bytes_per_sec": a.rate_limit,
            "disks": disks,
        });
        if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
            obj.extend(more);
        }
        writeln!(
            std::io::stdout().lock(),
            "{}",
            serde_json::to_string_pretty(&v)?
        )?;
    } else {
        writeln!(std::io::stdout().lock(), "{}", snap.id)?;
        if !g.quiet {
            eprintln!(
                "snapshot {} of {}: read {}, stored {} new, {:.1} s",
                snap.short_id(),
                snap.vm,
                super::mb(read),
                super::mb(stored),
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// Starts loading the C libraries this backup will use (libnbd for NBD
/// sources, qcow2 images and live capture; libvirt for `--domain`) on a
/// thread of its own. Loading them is mostly reading files from disk, so
/// it overlaps with opening the repository (Argon2) instead of coming after
/// it. Whoever uses a library first waits for the load to end, and reports
/// its error.
fn preload_libraries(a: &BackupArgs) {
    let virt = a.domain.is_some();
    let nbd = virt
        || a.qmp.is_some()
        || parse_disks(&a.disks)
            .unwrap_or_default()
            .iter()
            .any(|(_, spec)| ekko::source::needs_nbd(spec));
    if nbd {
        std::thread::spawn(move || {
            if virt {
                let _ = ekko_libvirt::load();
            }
            let _ = ekko_libnbd::load();
        });
    }
}

pub fn run(g: &Global, a: BackupArgs) -> Result<ExitCode> {
    if !a.normal_priority {
        lower_priority();
    }
    if a.workdir_reserve.is_some() && a.qmp.is_none() && a.domain.is_none() {
        super::usage!("--workdir-reserve needs --qmp or --domain");
    }
    if a.workdir.is_some() && a.qmp.is_none() && a.domain.is_none() {
        super::usage!("--workdir needs --qmp or --domain");
    }
    if a.nbd_server.is_some() && a.qmp.is_none() {
        super::usage!("--nbd-server needs --qmp");
    }
    match (&a.fsfreeze, &a.qmp, &a.domain) {
        (Some(None), Some(_), _) => {
            super::usage!(
                "--fsfreeze with --qmp needs the qemu-guest-agent socket: --fsfreeze SOCKET"
            )
        }
        (Some(Some(_)), _, Some(_)) => {
            super::usage!(
                "--fsfreeze with --domain takes no value: libvirt talks to the guest agent"
            )
        }
        (Some(_), None, None) => super::usage!("--fsfreeze needs --qmp or --domain"),
        _ => {}
    }
    if let Err(why) = ekko::snapshot::check_vm_name(vm(&a)) {
        super::usage!("{why}");
    }
    preload_libraries(&a);
    if let Some(d) = a.domain.clone() {
        return run_domain(g, &a, d);
    }
    match a.qmp.clone() {
        Some(qmp) => run_live(g, &a, qmp),
        None => run_offline(g, &a),
    }
}

fn vm(a: &BackupArgs) -> &str {
    a.vm.as_deref().or(a.domain.as_deref()).unwrap_or_default()
}

/// A libvirt domain through libvirt's backup API; see
/// `ekko::capture::libvirt`.
fn run_domain(g: &Global, a: &BackupArgs, domain: String) -> Result<ExitCode> {
    use ekko::capture::libvirt::{self, DomainBackup, DomainOptions};
    let start = Instant::now();
    let repo = g.open()?;
    let cancel = super::cancel_flag()?;
    let mut opts = DomainOptions::new(domain.clone());
    if let Some(c) = &a.connect {
        opts.connect = c.clone();
    }
    for d in &a.disks {
        if d.is_empty() || d.contains('=') || d.contains('/') {
            super::usage!("--disk {d:?}: with --domain, give a disk target such as vda");
        }
    }
    opts.disks = a.disks.clone();
    opts.full = a.full;
    opts.tags = a.tags.clone();
    opts.fsfreeze = a.fsfreeze.is_some();
    opts.require_fsfreeze = a.require_fsfreeze;
    if opts.require_fsfreeze && !opts.fsfreeze {
        super::usage!("--require-fsfreeze needs --fsfreeze");
    }
    if let Some(w) = &a.workdir {
        opts.workdir = w.clone();
    }
    opts.connections = connections(a.threads);
    opts.rate_limit = a.rate_limit;
    opts.workdir_reserve = a.workdir_reserve;
    let _lock = ekko::lock::Lock::shared(
        repo.backend(),
        repo.keys(),
        &format!("backup of libvirt domain {domain}"),
    )?;
    let prepared = DomainBackup::prepare(&repo, &opts).map_err(domain_error)?;
    if !g.quiet {
        for (t, r) in prepared.skipped() {
            eprintln!("ekko: disk {t}: skipped: {r}");
        }
        if !prepared.running() {
            eprintln!("ekko: domain {domain} is not running: reading its image files");
        }
        for d in prepared.disks() {
            if let Some(r) = &d.decision.reason {
                eprintln!("ekko: disk {}: full read: {r}", d.name);
            }
        }
    }
    let skipped: Vec<Value> = prepared
        .skipped()
        .iter()
        .map(|(t, r)| json!({ "name": t, "reason": r }))
        .collect();
    let bars = DiskBars::default();
    let progress = |d: &libvirt::PlannedDisk| bars.next(g, d.size, &d.name);
    let bopts = BackupOptions {
        threads: a.threads,
        cancel: Arc::clone(&cancel),
        progress: None,
    };
    let result = prepared.run(&bopts, &progress);
    bars.finish();
    let report = result.map_err(domain_error)?;
    if !g.quiet {
        for w in &report.warnings {
            eprintln!("ekko: warning: {w}");
        }
    }
    let disks = report
        .disks
        .iter()
        .map(|d| disk_json(&d.disk, None, d.dirty_bytes))
        .collect();
    let extra = json!({
        "domain": report.snapshot.domain,
        "running": report.running,
        "checkpoint": report.checkpoint,
        "deleted_checkpoints": report.deleted_checkpoints,
        "frozen": report.frozen,
        "skipped_disks": skipped,
        "warnings": report.warnings,
    });
    print_summary(g, a, &report.snapshot, disks, extra, start)?;
    Ok(ExitCode::SUCCESS)
}

/// Keeps repository damage recognisable (exit code 3) through anyhow.
fn domain_error(e: ekko::capture::libvirt::Error) -> anyhow::Error {
    use ekko::capture::libvirt::Error;
    match e {
        Error::Disk { disk, source } if source.is_damage() => {
            anyhow::Error::new(source).context(format!("disk {disk}"))
        }
        Error::Repo(source) => anyhow::Error::new(source),
        e => anyhow::Error::new(e),
    }
}

/// Live capture of a running QEMU through QMP; see `ekko::capture`.
fn run_live(g: &Global, a: &BackupArgs, qmp: PathBuf) -> Result<ExitCode> {
    let start = Instant::now();
    let repo = g.open()?;
    let cancel = super::cancel_flag()?;
    let mut opts = LiveOptions::new(vm(a), qmp);
    opts.disks = parse_disks(&a.disks)?;
    opts.full = a.full;
    opts.freeze = a.fsfreeze.clone().flatten();
    if let Some(w) = &a.workdir {
        opts.workdir = w.clone();
    }
    opts.connections = connections(a.threads);
    opts.rate_limit = a.rate_limit;
    opts.workdir_reserve = a.workdir_reserve;
    opts.nbd_tcp = a.nbd_server;
    opts.tags = a.tags.clone();
    let _lock = ekko::lock::Lock::shared(
        repo.backend(),
        repo.keys(),
        &format!("live backup of {}", vm(a)),
    )?;
    let live = LiveBackup::prepare(&repo, &opts).map_err(live_error)?;
    if !g.quiet {
        for d in live.disks() {
            if let Some(r) = &d.decision.reason {
                eprintln!("ekko: disk {}: full read: {r}", d.name);
            }
        }
    }
    let bars = DiskBars::default();
    let progress = |d: &capture::PlannedDisk| bars.next(g, d.size, &d.name);
    let bopts = BackupOptions {
        threads: a.threads,
        cancel: Arc::clone(&cancel),
        progress: None,
    };
    let result = live.run(&bopts, &progress);
    bars.finish();
    let report = result.map_err(live_error)?;
    if !g.quiet {
        for w in &report.warnings {
            eprintln!("ekko: warning: {w}");
        }
    }
    let disks = report
        .disks
        .iter()
        .map(|d| disk_json(&d.disk, Some(&d.node), d.dirty_bytes))
        .collect();
    let removed: Vec<Value> = report
        .removed_bitmaps
        .iter()
        .map(|(node, name)| json!({ "node": node, "bitmap": name }))
        .collect();
    let extra = json!({
        "removed_bitmaps": removed,
        "warnings": report.warnings,
    });
    print_summary(g, a, &report.snapshot, disks, extra, start)?;
    Ok(ExitCode::SUCCESS)
}

/// Keeps repository damage recognisable (exit code 3) through anyhow.
fn live_error(e: capture::Error) -> anyhow::Error {
    match e {
        capture::Error::Disk { disk, source } if source.is_damage() => {
            anyhow::Error::new(source).context(format!("disk {disk}"))
        }
        capture::Error::Repo(source) => anyhow::Error::new(source),
        e => anyhow::Error::new(e),
    }
}

/// Open the `--disk` sources of an offline backup, and have image files
/// start fetching their first blocks.
fn open_sources(
    a: &BackupArgs,
    specs: &[(String, String)],
) -> Result<Vec<(String, Box<dyn source::Source>)>> {
    specs
        .iter()
        .map(|(n, s)| {
            let src = source::open(
                s,
                &source::OpenOptions {
                    bitmap: a.bitmap.as_deref(),
                    connections: connections(a.threads),
                    allow_in_use: a.allow_in_use,
                },
            )?;
            // A rate-limited source gets no read-ahead hints (RateLimited
            // passes none on), so it gets none here either.
            if a.rate_limit.is_none() {
                src.start_reading();
            }
            Ok((n.clone(), src))
        })
        .collect()
}

fn run_offline(g: &Global, a: &BackupArgs) -> Result<ExitCode> {
    let start = Instant::now();
    // The repository opens (Argon2, the index) while the sources open
    // (qemu-nbd for qcow2) and start fetching their first blocks. Its
    // error, such as a wrong passphrase, comes first.
    let specs = parse_disks(&a.disks)?;
    let (repo, opened) = std::thread::scope(|s| {
        let repo = s.spawn(|| g.open());
        let opened = open_sources(a, &specs);
        let repo = repo.join().expect("repository opening panicked");
        (repo, opened)
    });
    let repo = repo?;
    let opened = opened?;
    let cancel = super::cancel_flag()?;
    let limiter = limiter(a, &cancel)?;
    let _lock =
        ekko::lock::Lock::shared(repo.backend(), repo.keys(), &format!("backup of {}", vm(a)))?;
    let parent: Option<Snapshot> = match snapshot::resolve(
        repo.backend().as_ref(),
        repo.keys(),
        &format!("{}@latest", vm(a)),
    ) {
        Ok(s) => Some(s),
        Err(ekko::Error::SnapshotNotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let time = match &a.time {
        Some(t) => {
            let parsed = ekko::time::parse_rfc3339(t)
                .with_context(|| format!("--time {t:?}: expected an RFC 3339 instant"))?;
            humantime::format_rfc3339_nanos(parsed).to_string()
        }
        None => ekko::time::now_rfc3339_nanos(),
    };
    let sources: Vec<(String, Box<dyn source::Source>)> = opened
        .into_iter()
        .map(|(n, src)| (n, RateLimited::wrap(src, limiter.as_ref())))
        .collect();

    let mut session = Session::new(&repo)?;
    session.set_tags(&a.tags);
    let opts_base = BackupOptions {
        threads: a.threads,
        cancel: cancel.clone(),
        progress: None,
    };
    let mut disk_json_v = Vec::new();
    for (name, src) in &sources {
        let parent_disk = parent.as_ref().and_then(|p| p.disk(name).ok());
        let (incremental, reason) = decide(
            &repo,
            parent_disk,
            src.as_ref(),
            a.bitmap.as_deref(),
            a.full,
        );
        if let Some(r) = &reason {
            if !g.quiet {
                eprintln!("ekko: disk {name}: full read: {r}");
            }
        }
        let dirty_bytes = if incremental {
            src.dirty_ranges()?
                .map(|r| capture::range_bytes(&r, src.size()))
        } else {
            None
        };
        let pb = super::progress_bar(g, src.size(), name);
        let pbc = pb.clone();
        let opts = BackupOptions {
            progress: Some(Arc::new(move |n| pbc.set_position(n))),
            ..opts_base.clone()
        };
        let capture = Capture {
            mode: if incremental {
                CaptureMode::Incremental
            } else {
                CaptureMode::Full
            },
            bitmap: if incremental { a.bitmap.clone() } else { None },
            next_bitmap: a.bitmap.clone(),
            reason,
        };
        let disk = session.backup_disk(
            DiskPlan {
                name: name.clone(),
                source: src.as_ref(),
                incremental_parent: if incremental { parent_disk } else { None },
                first: parent_disk.is_none(),
                capture,
            },
            &opts,
        );
        pb.finish_and_clear();
        let disk = disk?;
        disk_json_v.push(disk_json(&disk, None, dirty_bytes));
    }
    if super::cancelled(&cancel) {
        bail!(ekko::Error::Interrupted);
    }
    let snap = session.commit(vm(a), time, parent.as_ref().map(|p| p.id.clone()))?;
    print_summary(g, a, &snap, disk_json_v, json!({}), start)?;
    Ok(ExitCode::SUCCESS)
}

/// Can this disk be backed up incrementally? Only when the parent recorded
/// this very bitmap as the one tracking writes after it, nothing about the
/// disk's geometry changed, and the parent's map can be read. Otherwise: a
/// full read, and why.
fn decide(
    repo: &ekko::Repository,
    parent: Option<&ekko::Disk>,
    src: &dyn source::Source,
    bitmap: Option<&str>,
    full: bool,
) -> (bool, Option<String>) {
    let Some(bitmap) = bitmap else {
        return (false, None);
    };
    if full {
        return (false, Some("--full was given".into()));
    }
    let Some(p) = parent else {
        return (false, Some("no earlier snapshot of this disk".into()));
    };
    if p.capture.next_bitmap.as_deref() != Some(bitmap) {
        return (
            false,
            Some(format!(
                "the parent snapshot was not taken with bitmap {bitmap:?}"
            )),
        );
    }
    if p.size != src.size() {
        return (
            false,
            Some(format!(
                "the disk size changed ({} → {})",
                p.size,
                src.size()
            )),
        );
    }
    if p.chunk_size != repo.config().chunk_size {
        return (false, Some("the repository chunk size changed".into()));
    }
    if let Err(e) = capture::check_parent_map(repo, p) {
        return (
            false,
            Some(format!(
                "parent damaged: its block map cannot be read ({e})"
            )),
        );
    }
    (true, None)
}

/// One progress bar per disk of a capture, shown one after the other.
#[derive(Default)]
struct DiskBars(Mutex<Vec<indicatif::ProgressBar>>);

impl DiskBars {
    /// A bar for the next disk; the previous one is cleared.
    fn next(&self, g: &super::Global, size: u64, name: &str) -> Option<Progress> {
        let mut bars = self.0.lock().expect("progress bars");
        if let Some(prev) = bars.last() {
            prev.finish_and_clear();
        }
        let pb = super::progress_bar(g, size, name);
        bars.push(pb.clone());
        Some(Arc::new(move |n| pb.set_position(n)))
    }

    fn finish(&self) {
        for pb in self.0.lock().expect("progress bars").iter() {
            pb.finish_and_clear();
        }
    }
}
