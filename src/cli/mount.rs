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
    /// Stay in the foreground (the default when run from a terminal).
    #[arg(long)]
    foreground: bool,
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
    cmd.arg(&a.mountpoint);
    use std::os::unix::process::CommandExt;
    // Replace this process: signals and exit status go straight to ekko-fuse.
    Err(cmd.exec()).context("starting ekko-fuse")
}
