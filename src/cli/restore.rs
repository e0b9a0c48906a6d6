use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ekko::restore::{restore, restore_stream, RestoreOptions};
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
    /// Output file (created sparse) or block device; `-` for standard
    /// output, or a pipe or character device (`/dev/null` to verify), which
    /// get every byte in order, holes as zeros; with `--all`, a folder
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
    let snap = ekko::snapshot::resolve_exact(repo.backend().as_ref(), repo.keys(), &a.snapshot)?;
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

/// Where a streaming restore writes.
enum Stream {
    /// `--to -`
    Stdout,
    /// An existing pipe or character device, such as `/dev/null`.
    Path,
}

/// `Some` when `to` is a stream rather than a file or block device to
/// write at offsets. Standard output on a terminal is refused.
fn stream_target(to: &Path) -> Result<Option<Stream>> {
    use std::io::IsTerminal;
    use std::os::unix::fs::FileTypeExt;
    if to == Path::new("-") {
        if std::io::stdout().is_terminal() {
            anyhow::bail!(
                "standard output is a terminal: redirect it to a file or pipe (`ekko restore … --to - | …`), or give a path"
            );
        }
        return Ok(Some(Stream::Stdout));
    }
    Ok(match std::fs::metadata(to) {
        Ok(m) if m.file_type().is_fifo() || m.file_type().is_char_device() => Some(Stream::Path),
        _ => None,
    })
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
    let opts = RestoreOptions {
        buffered: a.buffered,
        threads: a.threads,
        overwrite: a.force,
        cancel,
        progress: Some(&progress),
    };
    let result = match stream_target(to)? {
        Some(Stream::Stdout) => {
            // A descriptor of its own: big writes go straight to the pipe,
            // not through stdout's line buffer.
            use std::os::fd::AsFd;
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("opening standard output")?;
            let mut out = std::fs::File::from(fd);
            restore_stream(&reader, &mut out, Path::new("standard output"), &opts)
        }
        Some(Stream::Path) => std::fs::OpenOptions::new()
            .write(true)
            .open(to)
            .with_context(|| format!("opening {}", to.display()))
            .map(|mut f| restore_stream(&reader, &mut f, to, &opts))?,
        None => restore(&reader, to, &opts),
    };
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
            if to == Path::new("-") {
                "standard output".into()
            } else {
                to.display().to_string()
            },
            secs
        );
    }
    Ok(())
}
