//! Command-line interface: one module per subcommand.
//!
//! Exit codes: 0 success, 1 error, 2 usage error, 3 repository damage found.

mod backup;
mod check;
mod diff;
mod forget;
mod index;
mod init;
mod key;
mod mount;
mod protect;
mod prune;
mod restore;
mod serve_nbd;
mod snapshots;
mod unlock;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ekko::Repository;

#[derive(Parser)]
#[command(
    name = "ekko",
    version,
    about = "Block-based incremental backup for QEMU/KVM virtual machines"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Repository: a folder, or s3://BUCKET/PREFIX (see docs/S3.md).
    #[arg(long, env = "EKKO_REPO", global = true)]
    pub repo: Option<PathBuf>,
    /// File holding the passphrase (or set EKKO_PASSWORD).
    #[arg(long, env = "EKKO_PASSWORD_FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// More logging (-v info, -vv debug); EKKO_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// No progress bars, only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create a new repository.
    Init(init::InitArgs),
    /// Back up the disks of a VM.
    Backup(backup::BackupArgs),
    /// List snapshots.
    Snapshots(snapshots::SnapshotsArgs),
    /// Restore a disk of a snapshot to a file or block device (or --all disks into a folder).
    Restore(restore::RestoreArgs),
    /// Show the byte ranges of each disk that changed between two snapshots.
    Diff(diff::DiffArgs),
    /// Verify the repository.
    Check(check::CheckArgs),
    /// Manage passphrases (key files).
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Serve one disk of a snapshot over NBD (boot a VM from a backup).
    ServeNbd(serve_nbd::ServeNbdArgs),
    /// Maintain the chunk index.
    #[command(subcommand)]
    Index(index::IndexCommand),
    /// Show every snapshot as a read-only file tree (FUSE).
    Mount(mount::MountArgs),
    /// Remove snapshots by a retention policy (per VM).
    Forget(forget::ForgetArgs),
    /// Protect a snapshot from forget (or --remove the protection).
    Protect(protect::ProtectArgs),
    /// Delete data no snapshot references, safely beside running backups.
    Prune(prune::PruneArgs),
    /// Remove stale locks (holders gone), or every lock with --remove-all.
    Unlock(unlock::UnlockArgs),
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Init(a) => init::run(g, a),
        Command::Backup(a) => backup::run(g, a),
        Command::Snapshots(a) => snapshots::run(g, a),
        Command::Restore(a) => restore::run(g, a),
        Command::Diff(a) => diff::run(g, a),
        Command::Check(a) => check::run(g, a),
        Command::Key(a) => key::run(g, a),
        Command::Mount(a) => mount::run(g, a),
        Command::Index(a) => index::run(g, a),
        Command::ServeNbd(a) => serve_nbd::run(g, a),
        Command::Forget(a) => forget::run(g, a),
        Command::Protect(a) => protect::run(g, a),
        Command::Prune(a) => prune::run(g, a),
        Command::Unlock(a) => unlock::run(g, a),
    }
}

/// A usage error: wrong or conflicting options. Exits with code 2, as
/// clap's own usage errors do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Return a [`Usage`] error from the enclosing function.
macro_rules! usage {
    ($($t:tt)*) => {
        return Err(anyhow::Error::new($crate::cli::Usage(format!($($t)*))))
    };
}
pub(crate) use usage;

pub fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("EKKO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

impl Global {
    pub fn repo_path(&self) -> Result<PathBuf> {
        self.repo.clone().context(
            "no repository given: pass --repo PATH (or s3://BUCKET/PREFIX) or set EKKO_REPO",
        )
    }

    pub fn backend(&self) -> Result<Arc<dyn ekko::Backend>> {
        Ok(ekko::backend::open(self.repo_path()?)?)
    }

    /// The passphrase from the environment, a file, or a prompt on a tty.
    pub fn passphrase(&self, prompt: &str) -> ekko::Result<Vec<u8>> {
        if let Some(p) = ekko::secret::from_env(self.password_file.as_deref())? {
            return Ok(p);
        }
        if std::io::stdin().is_terminal() {
            let p = rpassword::prompt_password(prompt)
                .map_err(|e| ekko::Error::Invalid(format!("reading the passphrase: {e}")))?;
            return Ok(p.into_bytes());
        }
        Err(ekko::Error::Invalid(
            "the repository is encrypted: set EKKO_PASSWORD or EKKO_PASSWORD_FILE, or pass --password-file".into(),
        ))
    }

    /// A passphrase for a new key file (`init`): from the environment or
    /// a file, or typed twice on a tty.
    pub fn new_passphrase(&self) -> ekko::Result<Vec<u8>> {
        if let Some(p) = ekko::secret::from_env(self.password_file.as_deref())? {
            return Ok(p);
        }
        prompt_new_passphrase().ok_or_else(|| {
            ekko::Error::Invalid(
                "no passphrase for the new repository: set EKKO_PASSWORD or EKKO_PASSWORD_FILE, pass --password-file, or run on a terminal to type one (or create it with --encryption none)".into(),
            )
        })?
    }

    pub fn open(&self) -> Result<Repository> {
        let backend = self.backend()?;
        Ok(Repository::open(backend, || {
            self.passphrase("Passphrase: ")
        })?)
    }

    /// Open the repository's key files only (not the index), and keep
    /// the passphrase that opened one (asked for once), for the key
    /// commands that use it again.
    pub fn open_keyring(&self) -> Result<(ekko::keyring::Keyring, Option<Vec<u8>>)> {
        let backend = self.backend()?;
        let mut kept = None;
        let ring = ekko::keyring::Keyring::open(backend, || {
            let p = self.passphrase("Passphrase: ")?;
            kept = Some(p.clone());
            Ok(p)
        })?;
        Ok((ring, kept))
    }

    /// Open without the local index cache (index files may be missing).
    pub fn open_without_cache(&self) -> Result<Repository> {
        let backend = self.backend()?;
        Ok(Repository::open_with_cache(
            backend,
            || self.passphrase("Passphrase: "),
            false,
        )?)
    }

    pub fn progress_enabled(&self) -> bool {
        !self.quiet && std::io::stderr().is_terminal()
    }
}

/// A new passphrase typed twice on a tty; `None` without a tty. An empty
/// or mistyped one is asked for again, three times at most.
pub fn prompt_new_passphrase() -> Option<ekko::Result<Vec<u8>>> {
    if !std::io::stdin().is_terminal() {
        return None;
    }
    let read = |prompt: &str| {
        rpassword::prompt_password(prompt)
            .map_err(|e| ekko::Error::Invalid(format!("reading the passphrase: {e}")))
    };
    for _ in 0..3 {
        let first = match read("New passphrase: ") {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        if first.is_empty() {
            eprintln!("ekko: the passphrase is empty; type one");
            continue;
        }
        match read("Repeat the new passphrase: ") {
            Ok(again) if again == first => return Some(Ok(first.into_bytes())),
            Ok(_) => eprintln!("ekko: the two passphrases differ; type them again"),
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Err(ekko::Error::Invalid(
        "no passphrase was confirmed; nothing was written".into(),
    )))
}

/// A progress bar on stderr when it is a terminal, hidden otherwise.
pub fn progress_bar(g: &Global, len: u64, what: &str) -> indicatif::ProgressBar {
    if !g.progress_enabled() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// A flag set by Ctrl-C or SIGTERM: the work stops at its next step and
/// puts things back. A second signal ends the process at once, with status
/// 128 + the signal, for a stop that waits on something stuck (an NBD
/// server that stopped answering): the repository then holds at most
/// unreferenced packs, which prune removes, and the next live backup ends
/// what this one left in QEMU or libvirt.
pub fn cancel_flag() -> Result<Arc<AtomicBool>> {
    const STOPPING: &[u8] = b"ekko: stopping; a second Ctrl-C or SIGTERM stops at once\n";
    let flag = Arc::new(AtomicBool::new(false));
    // Set by signals alone: ekko sets `flag` itself too (a failed read, a
    // filling work folder), and a signal after that is still the first.
    let signalled = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The shutdown goes first: it fires only when a signal came
        // before, that is, on the second signal.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&signalled))
            .context("installing a signal handler")?;
        let (first, cancel) = (Arc::clone(&signalled), Arc::clone(&flag));
        // SAFETY: the action only sets atomics and calls write(2), all
        // async-signal-safe; it neither allocates nor takes locks.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                cancel.store(true, Ordering::SeqCst);
                if !first.swap(true, Ordering::SeqCst) {
                    libc::write(2, STOPPING.as_ptr().cast(), STOPPING.len());
                }
            })
        }
        .context("installing a signal handler")?;
    }
    Ok(flag)
}

pub fn cancelled(flag: &AtomicBool) -> bool {
    flag.load(Ordering::Relaxed)
}

/// Bytes as decimal megabytes, for people.
pub fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// A count of threads: 1 or more.
pub fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Parse sizes such as `1M`, `64K`, `4MiB`, `1048576`.
pub fn parse_size(s: &str) -> std::result::Result<u32, String> {
    u32::try_from(parse_bytes(s)?).map_err(|_| "size too large".into())
}

/// Parse sizes such as `512M`, `2G`, `64K`, `1GiB`, `1048576` into bytes.
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1024u64),
        Some('M' | 'm') => (&t[..t.len() - 1], 1024 * 1024),
        Some('G' | 'g') => (&t[..t.len() - 1], 1024 * 1024 * 1024),
        Some('T' | 't') => (&t[..t.len() - 1], 1024 * 1024 * 1024 * 1024),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult).ok_or_else(|| "size too large".into())
}
