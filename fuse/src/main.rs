//! `ekko-fuse`: mount an Ekko repository as a read-only file tree.
//!
//! `ekko mount` runs this binary. It always stays in the foreground (the
//! caller backgrounds it if it wants to) until the tree is unmounted with
//! `umount`/`fusermount3 -u`, or it gets SIGINT, SIGTERM or SIGHUP, on which
//! it unmounts cleanly before exiting.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use ekko::backend::Backend;

/// Mount an Ekko repository as a read-only file tree:
/// MOUNTPOINT/<vm>/<time>/<disk>.img, MOUNTPOINT/<vm>/<time>/<disk>/partN/…,
/// MOUNTPOINT/<vm>/latest and MOUNTPOINT/ids/<snapshot-id>.
#[derive(Parser, Debug)]
#[command(name = "ekko-fuse", version)]
struct Cli {
    /// Repository: a folder, or s3://BUCKET/PREFIX (see docs/S3.md).
    #[arg(short = 'r', long, env = "EKKO_REPO")]
    repo: Option<PathBuf>,

    /// File holding the repository passphrase (or set EKKO_PASSWORD).
    #[arg(long, env = "EKKO_PASSWORD_FILE")]
    password_file: Option<PathBuf>,

    /// Where to mount: an existing directory (what it holds is hidden
    /// while the tree is mounted).
    mountpoint: PathBuf,

    /// Stay in the foreground. Accepted for compatibility: ekko-fuse always
    /// does, until unmounted or signalled.
    #[arg(short, long)]
    foreground: bool,

    /// More log output (-v: debug, -vv: every FUSE request). EKKO_LOG
    /// overrides it.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Requests served at once.
    #[arg(long, default_value_t = 8)]
    threads: usize,

    /// Memory for decoded chunks, in MiB, shared by all files.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    cache_size: u64,

    /// Chunks to fetch ahead of a sequential reader (0: off).
    #[arg(long, value_name = "CHUNKS", default_value_t = 16)]
    read_ahead: u64,

    /// The kernel's read-ahead for the mount, in KiB (root only; 0: leave
    /// the system's default).
    #[arg(long, value_name = "KIB", default_value_t = 4096)]
    kernel_read_ahead: u32,
}

fn init_logging(verbose: u8) {
    // fuser logs every request at debug: only from -vv on. By default, not
    // fuser's warning that its own unmount failed after `umount` did it,
    // nor fatfs's about layouts that mkfs.vfat makes and that read fine.
    let default = match verbose {
        0 => "info,fuser::mnt=error,fatfs=error",
        1 => "debug,fuser=info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("EKKO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ekko-fuse: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_mountpoint(mp: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(mp) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("{} is not a directory", mp.display()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "{} is a stale FUSE mount (its daemon is gone): run `fusermount3 -u {}` first",
            mp.display(),
            mp.display()
        ),
        Err(e) => Err(e).with_context(|| format!("mountpoint {}", mp.display())),
    }
}

fn sighup_ignored() -> bool {
    // SAFETY: sigaction with a null new action only reads the current
    // disposition into a zeroed struct that we own.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// The passphrase from the environment or a file, or typed on a tty when
/// the repository is encrypted; `None` leaves an encrypted repository to
/// fail with a message that says how to give one.
fn passphrase(cli: &Cli, backend: &dyn Backend) -> anyhow::Result<Option<Vec<u8>>> {
    // An unencrypted repository needs none, whatever the environment
    // holds (an empty EKKO_PASSWORD, say), as with `ekko`.
    if ekko::repo::Repository::read_config(backend)?.encryption == "none" {
        return Ok(None);
    }
    if let Some(p) = ekko::secret::from_env(cli.password_file.as_deref())? {
        return Ok(Some(p));
    }
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    let p = rpassword::prompt_password("Passphrase: ").context("reading the passphrase")?;
    Ok(Some(p.into_bytes()))
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let repo = cli
        .repo
        .as_ref()
        .context("no repository given: use --repo PATH or set EKKO_REPO")?;
    check_mountpoint(&cli.mountpoint)?;

    // Before mounting, so that a signal never leaves a mount behind.
    let stop = Arc::new(AtomicBool::new(false));
    let mut signals = vec![signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM];
    // A hang-up unmounts too, unless it is ignored (`nohup ekko mount …`).
    if !sighup_ignored() {
        signals.push(signal_hook::consts::SIGHUP);
    }
    for sig in signals {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }

    let backend: Arc<dyn Backend> = ekko::backend::open(repo)
        .with_context(|| format!("cannot open the repository at {}", repo.display()))?;
    let passphrase = passphrase(cli, backend.as_ref())
        .with_context(|| format!("cannot open the repository at {}", repo.display()))?;
    let opts = ekko_fuse::MountOptions {
        threads: cli.threads.max(1),
        cache_bytes: cli.cache_size.saturating_mul(1 << 20),
        read_ahead_chunks: cli.read_ahead,
        kernel_read_ahead_kib: cli.kernel_read_ahead,
        ..ekko_fuse::MountOptions::default()
    };
    let started = Instant::now();
    let fs = ekko_fuse::open(backend, passphrase, &opts)
        .with_context(|| format!("cannot open the repository at {}", repo.display()))?;
    let session = ekko_fuse::mount(fs, &cli.mountpoint, &opts)
        .with_context(|| format!("cannot mount on {}", cli.mountpoint.display()))?;
    tracing::info!(
        "mounted {} on {} in {:.0?}; unmount with `umount {}` or Ctrl-C",
        repo.display(),
        cli.mountpoint.display(),
        started.elapsed(),
        cli.mountpoint.display()
    );

    while !stop.load(Ordering::Relaxed) {
        if session.guard.is_finished() {
            // Unmounted from outside (umount, fusermount3 -u).
            session.join().context("the FUSE session failed")?;
            tracing::info!("{} was unmounted", cli.mountpoint.display());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("signal received: unmounting {}", cli.mountpoint.display());
    match session.umount_and_join() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            // Files are still open below it: detach now; the kernel drops
            // the mount when they are closed (or when this process exits).
            tracing::warn!("{} is busy; detaching it lazily", cli.mountpoint.display());
            let status = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&cli.mountpoint)
                .status();
            match status {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => bail!(
                    "fusermount3 -u -z {} failed ({s})",
                    cli.mountpoint.display()
                ),
                Err(e) => Err(e).context("running fusermount3"),
            }
        }
        Err(e) => Err(e).with_context(|| format!("unmounting {}", cli.mountpoint.display())),
    }
}
