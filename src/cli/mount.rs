//! `ekko mount` runs the `ekko-fuse` program that sits beside `ekko`: the
//! FUSE adapter is its own crate and the core cannot depend on it.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use clap::Args;

use super::Global;

#[derive(Args)]
pub struct MountArgs {
    /// Where to mount.
    mountpoint: PathBuf,
    /// Accepted for compatibility: the mount always stays in the
    /// foreground until unmounted or signalled (run it with `&` or under
    /// a service manager to background it).
    #[arg(long)]
    foreground: bool,
    /// FUSE requests served at once [ekko-fuse's default: 8].
    #[arg(long)]
    threads: Option<usize>,
    /// Memory for decoded chunks, in MiB, shared by all files [default: 256].
    #[arg(long, value_name = "MIB")]
    cache_size: Option<u64>,
    /// Chunks to fetch ahead of a sequential reader (0: off) [default: 16].
    #[arg(long, value_name = "CHUNKS")]
    read_ahead: Option<u64>,
    /// The kernel's read-ahead for the mount, in KiB (root only; 0: the
    /// system's default) [default: 4096].
    #[arg(long, value_name = "KIB")]
    kernel_read_ahead: Option<u32>,
}

pub fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the ekko executable")?;
    let p = exe.with_file_name(name);
    anyhow::ensure!(
        p.exists(),
        "{} is missing: build the whole workspace (cargo build --release --workspace)",
        p.display()
    );
    Ok(p)
}

pub fn run(g: &Global, a: MountArgs) -> Result<ExitCode> {
    let mut cmd = Command::new(sibling("ekko-fuse")?);
    cmd.arg("--repo").arg(g.repo_path()?);
    if let Some(f) = &g.password_file {
        cmd.arg("--password-file").arg(f);
    }
    for _ in 0..g.verbose {
        cmd.arg("-v");
    }
    if a.foreground {
        cmd.arg("--foreground");
    }
    let tuning = [
        ("--threads", a.threads.map(|v| v.to_string())),
        ("--cache-size", a.cache_size.map(|v| v.to_string())),
        ("--read-ahead", a.read_ahead.map(|v| v.to_string())),
        (
            "--kernel-read-ahead",
            a.kernel_read_ahead.map(|v| v.to_string()),
        ),
    ];
    for (flag, value) in tuning {
        if let Some(v) = value {
            cmd.arg(flag).arg(v);
        }
    }
    cmd.arg(&a.mountpoint);
    use std::os::unix::process::CommandExt;
    // Replace this process: signals and exit status go straight to ekko-fuse.
    Err(cmd.exec()).context("starting ekko-fuse")
}
