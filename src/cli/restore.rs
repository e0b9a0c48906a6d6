use std::path::PathBuf;
use std::process::ExitCode;
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
    #[arg(long)]
    disk: Option<String>,
    /// Output file (created sparse) or block device.
    #[arg(long)]
    to: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
    #[arg(long, default_value_t = super::default_threads())]
    threads: usize,
    /// Write through the page cache instead of with O_DIRECT (which is used
    /// where the filesystem allows it, for all but a short last block).
    #[arg(long)]
    buffered: bool,
}

pub fn run(g: &Global, a: RestoreArgs) -> Result<ExitCode> {
    let start = Instant::now();
    let repo = Arc::new(g.open()?);
    let snap = ekko::snapshot::resolve(repo.backend().as_ref(), repo.keys(), &a.snapshot)?;
    let disk = match &a.disk {
        Some(d) => d.clone(),
        None if snap.disks.len() == 1 => snap.disks[0].name.clone(),
        None => anyhow::bail!(
            "snapshot {} has several disks ({}); choose one with --disk",
            snap.short_id(),
            snap.disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let reader = DiskReader::open(repo, &snap, &disk)?;
    let cancel = super::cancel_flag()?;
    let pb = super::progress_bar(g, reader.size(), &disk);
    let progress = |n: u64| pb.set_position(n);
    let result = restore(
        &reader,
        &a.to,
        &RestoreOptions {
            buffered: a.buffered,
            threads: a.threads,
            overwrite: a.force,
            cancel: &cancel,
            progress: Some(&progress),
        },
    );
    pb.finish_and_clear();
    let stats =
        result.with_context(|| format!("restoring disk {disk} of snapshot {}", snap.short_id()))?;
    if !g.quiet {
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "restored {} ({} MB, {} MB of data) to {} in {:.1} s",
            disk,
            stats.bytes / 1_000_000,
            stats.bytes_data / 1_000_000,
            a.to.display(),
            secs
        );
    }
    Ok(ExitCode::SUCCESS)
}
