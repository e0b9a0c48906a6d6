use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use ekko::backup::{BackupOptions, DiskPlan, Session};
use ekko::snapshot::{self, Capture, CaptureMode, Snapshot};
use ekko::source;
use serde_json::json;

use super::Global;

#[derive(Args)]
pub struct BackupArgs {
    /// The VM the disks belong to.
    #[arg(long)]
    vm: String,
    /// NAME=SOURCE: a raw or qcow2 image, or an nbd:// / nbd+unix:// URI.
    #[arg(long = "disk", value_name = "NAME=SOURCE", required = true)]
    disks: Vec<String>,
    /// Dirty bitmap of the sources (qcow2 persistent bitmap or NBD export
    /// context) that records writes since the previous backup.
    #[arg(long)]
    bitmap: Option<String>,
    /// Read everything, even when an incremental is possible.
    #[arg(long)]
    full: bool,
    /// Worker threads.
    #[arg(long, default_value_t = super::default_threads())]
    threads: usize,
    /// Run at normal CPU and I/O priority instead of low.
    #[arg(long)]
    normal_priority: bool,
    /// Print a JSON summary instead of the snapshot id.
    #[arg(long)]
    json: bool,
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

pub fn run(g: &Global, a: BackupArgs) -> Result<ExitCode> {
    if !a.normal_priority {
        lower_priority();
    }
    let start = Instant::now();
    let repo = g.open()?;
    let cancel = super::cancel_flag()?;
    let mut specs = Vec::new();
    for d in &a.disks {
        let (name, src) = d
            .split_once('=')
            .with_context(|| format!("--disk {d:?}: expected NAME=SOURCE"))?;
        if name.is_empty() || name.contains('/') {
            bail!("--disk {d:?}: the name must be non-empty and contain no '/'");
        }
        if specs.iter().any(|(n, _)| n == name) {
            bail!("disk {name:?} given twice");
        }
        specs.push((name.to_string(), src.to_string()));
    }
    let _lock = ekko::lock::Lock::shared(
        repo.backend().as_ref(),
        repo.keys(),
        &format!("backup of {}", a.vm),
    )?;
    let parent: Option<Snapshot> = match snapshot::resolve(
        repo.backend().as_ref(),
        repo.keys(),
        &format!("{}@latest", a.vm),
    ) {
        Ok(s) => Some(s),
        Err(ekko::Error::SnapshotNotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let time = ekko::time::now_rfc3339_nanos();
    let sources: Vec<(String, Box<dyn source::Source>)> = specs
        .iter()
        .map(|(n, s)| {
            Ok((
                n.clone(),
                source::open(s, a.bitmap.as_deref(), a.threads.clamp(1, 8))?,
            ))
        })
        .collect::<Result<_>>()?;

    let mut session = Session::new(&repo);
    let opts_base = BackupOptions {
        threads: a.threads,
        cancel: cancel.clone(),
        progress: None,
    };
    let mut disk_json = Vec::new();
    for (name, src) in &sources {
        let parent_disk = parent.as_ref().and_then(|p| p.disk(name).ok());
        let (incremental, reason) = decide(
            parent_disk,
            src.as_ref(),
            a.bitmap.as_deref(),
            a.full,
            repo.config().chunk_size,
        );
        if let Some(r) = &reason {
            if !g.quiet {
                eprintln!("ekko: disk {name}: full read: {r}");
            }
        }
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
                capture,
            },
            &opts,
        );
        pb.finish_and_clear();
        let disk = disk?;
        disk_json.push(json!({
            "name": disk.name, "size": disk.size, "mode": disk.capture.mode,
            "reason": disk.capture.reason, "bytes_read": disk.stats.bytes_read,
            "bytes_new": disk.stats.bytes_new, "bytes_stored": disk.stats.bytes_stored,
            "chunks": disk.stats.chunks, "chunks_new": disk.stats.chunks_new, "chunks_zero": disk.stats.chunks_zero,
        }));
    }
    if super::cancelled(&cancel) {
        bail!(ekko::Error::Interrupted);
    }
    let snap = session.commit(&a.vm, time, parent.as_ref().map(|p| p.id.clone()))?;
    let (cpu, rss) = resource_usage();
    let total = |k: &str| {
        disk_json
            .iter()
            .map(|d| d[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    if a.json {
        let v = json!({
            "id": snap.id, "vm": snap.vm, "time": snap.time, "parent": snap.parent,
            "disks": disk_json,
            "bytes_read": total("bytes_read"), "bytes_new": total("bytes_new"),
            "bytes_stored": total("bytes_stored"),
            "duration_seconds": start.elapsed().as_secs_f64(),
            "cpu_seconds": cpu, "peak_rss_bytes": rss,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", snap.id);
        if !g.quiet {
            eprintln!(
                "snapshot {} of {}: read {} MB, stored {} MB new, {:.1} s",
                snap.short_id(),
                snap.vm,
                total("bytes_read") / 1_000_000,
                total("bytes_stored") / 1_000_000,
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Can this disk be backed up incrementally? Only when the parent recorded
/// this very bitmap as the one tracking writes after it, and nothing about
/// the disk's geometry changed. Otherwise: a full read, and why.
fn decide(
    parent: Option<&ekko::Disk>,
    src: &dyn source::Source,
    bitmap: Option<&str>,
    full: bool,
    chunk_size: u32,
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
    if p.chunk_size != chunk_size {
        return (false, Some("the repository chunk size changed".into()));
    }
    (true, None)
}
