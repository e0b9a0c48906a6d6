use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ekko::restore::{restore, RestoreOptions};
use ekko::DiskReader;

use super::Global;

#[derive(Args)]
pub struct RestoreArgs {
    /// Snapshot id, unique prefix, or VM@latest.
    snapshot: String,
    /// Disk to restore (may be omitted when the snapshot has one disk).
    #[arg(long, conflicts_with = "all")]
    disk: Option<String>,
    /// Restore every disk of the snapshot into the folder `--to`, as
    /// `DISK.img` (the names the FUSE tree uses).
    #[arg(long)]
    all: bool,
    /// Output file (created sparse) or block device; with `--all`, a folder
    /// (created if missing).
    #[arg(long)]
    to: PathBuf,
    /// Overwrite an existing file, or write onto a block device.
    #[arg(long)]
    force: bool,
    /// Threads decompressing and decrypting chunks.
    #[arg(long, default_value_t = super::default_threads(), value_parser = super::at_least_one)]
    threads: usize,
    /// Write through the page cache instead of with O_DIRECT (which is used
    /// where the filesystem allows it, for all but a short last block).
    #[arg(long)]
    buffered: bool,
}

pub fn run(g: &Global, a: RestoreArgs) -> Result<ExitCode> {
    let repo = Arc::new(g.open()?);
    let snap = ekko::snapshot::resolve(repo.backend().as_ref(), repo.keys(), &a.snapshot)?;
    let cancel = super::cancel_flag()?;
    if a.all {
        std::fs::create_dir_all(&a.to)
            .with_context(|| format!("creating folder {}", a.to.display()))?;
        for disk in &snap.disks {
            // The name becomes a file name: one plain path component.
            if matches!(disk.name.as_str(), "" | "." | "..") || disk.name.contains('/') {
                anyhow::bail!(
                    "disk name {:?} of snapshot {} is not a plain file name; restore it with --disk and --to",
                    disk.name,
                    snap.short_id()
                );
            }
        }
        for disk in &snap.disks {
            let to = a.to.join(format!("{}.img", disk.name));
            restore_one(g, &a, &repo, &snap, &disk.name, &to, &cancel)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let disk = match &a.disk {
        Some(d) => d.clone(),
        None if snap.disks.len() == 1 => snap.disks[0].name.clone(),
        None => anyhow::bail!(
            "snapshot {} has several disks ({}); choose one with --disk, or restore them all with --all",
            snap.short_id(),
            snap.disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    restore_one(g, &a, &repo, &snap, &disk, &a.to, &cancel)?;
    Ok(ExitCode::SUCCESS)
}

fn restore_one(
    g: &Global,
    a: &RestoreArgs,
    repo: &Arc<ekko::Repository>,
    snap: &ekko::snapshot::Snapshot,
    disk: &str,
    to: &Path,
    cancel: &AtomicBool,
) -> Result<()> {
    let start = Instant::now();
    let reader = DiskReader::open(repo.clone(), snap, disk)?;
    let pb = super::progress_bar(g, reader.size(), disk);
    let progress = |n: u64| pb.set_position(n);
    let result = restore(
        &reader,
        to,
        &RestoreOptions {
            buffered: a.buffered,
            threads: a.threads,
            overwrite: a.force,
            cancel,
            progress: Some(&progress),
        },
    );
    pb.finish_and_clear();
    let stats =
        result.with_context(|| format!("restoring disk {disk} of snapshot {}", snap.short_id()))?;
    if !g.quiet {
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "restored {} ({}, {} of data) to {} in {:.1} s",
            disk,
            super::mb(stats.bytes),
            super::mb(stats.bytes_data),
            to.display(),
            secs
        );
    }
    Ok(())
}
