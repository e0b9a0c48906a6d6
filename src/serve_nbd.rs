//! `ekko serve-nbd`: serve one disk of a snapshot over NBD for instant
//! restore, by running nbdkit with the `ekko-nbd` plugin.
//!
//! The core cannot link the plugin (it is an nbdkit cdylib), so this module
//! only resolves what to serve, starts `nbdkit` as a child and supervises it:
//!
//! - The snapshot spec and the disk are resolved here, so mistakes are
//!   reported before nbdkit starts and the plugin gets a full snapshot id.
//! - The plugin `libekko_nbd.so` is found next to the running executable, or
//!   at `EKKO_NBD_PLUGIN`, or at [`ServeOptions::plugin`].
//! - The passphrase travels to nbdkit in its environment (`EKKO_PASSWORD`)
//!   only; never on a command line, where `ps` would show it.
//! - nbdkit writes a pid file once it listens; that is the readiness signal.
//!   Its stderr is kept until then (to explain a failed start) and passed
//!   through verbatim afterwards.
//! - `--exit-with-parent` makes nbdkit die with the thread that spawned it,
//!   so keep [`NbdServer`] on a thread that lives as long as the export.
//! - Stopping sends SIGTERM to nbdkit's pid (SIGKILL after a grace period),
//!   then removes the Unix socket and the private scratch folder. With
//!   `writable`, the copy-on-write overlay is nbdkit's own temporary file
//!   and goes with it: the repository is never written.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::snapshot;

/// Name of the plugin file built by the `ekko-nbd` crate.
pub const PLUGIN_FILE: &str = "libekko_nbd.so";
/// Environment variable that overrides where the plugin is looked for.
pub const PLUGIN_ENV: &str = "EKKO_NBD_PLUGIN";
/// The NBD port registered with IANA.
pub const DEFAULT_PORT: u16 = 10809;

const POLL: Duration = Duration::from_millis(20);
/// How long nbdkit gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How many lines of nbdkit's start-up stderr go into an error.
const STDERR_LINES: usize = 50;

/// Where the export listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address such as `127.0.0.1:10809`.
    Tcp(SocketAddr),
    /// A Unix socket path, created by nbdkit and removed on stop.
    Unix(PathBuf),
}

/// What to serve and how. (No `Debug`: it holds the passphrase.)
#[derive(Clone)]
pub struct ServeOptions {
    /// Repository directory.
    pub repo: PathBuf,
    /// Passphrase of an encrypted repository. `None`: taken from
    /// `EKKO_PASSWORD_FILE` / `EKKO_PASSWORD`, and needed only if the
    /// repository is encrypted.
    pub passphrase: Option<Vec<u8>>,
    /// Snapshot id, unique id prefix, or `VM@latest`.
    pub snapshot: String,
    /// Disk to serve; `None` serves the snapshot's only disk.
    pub disk: Option<String>,
    pub listen: Listen,
    /// Accept writes into a temporary copy-on-write overlay that is
    /// discarded when the server stops.
    pub writable: bool,
    /// nbdkit PSK file (`username:hexkey` lines): require TLS with it.
    pub tls_psk: Option<PathBuf>,
    /// The plugin; `None` looks at `EKKO_NBD_PLUGIN`, then next to the
    /// current executable.
    pub plugin: Option<PathBuf>,
}

impl ServeOptions {
    pub fn new(
        repo: impl Into<PathBuf>,
        snapshot: impl Into<String>,
        listen: Listen,
    ) -> ServeOptions {
        ServeOptions {
            repo: repo.into(),
            passphrase: None,
            snapshot: snapshot.into(),
            disk: None,
            listen,
            writable: false,
            tls_psk: None,
            plugin: None,
        }
    }
}

/// A running nbdkit serving one disk. Dropping it stops the server.
pub struct NbdServer {
    child: Option<Child>,
    uri: String,
    snapshot: String,
    disk: String,
    socket: Option<PathBuf>,
    scratch: PathBuf,
    log: Arc<Log>,
    log_thread: Option<JoinHandle<()>>,
}

/// nbdkit's stderr: held back until the server is ready, then passed on.
#[derive(Default)]
struct Log {
    ready: AtomicBool,
    held: Mutex<Vec<String>>,
}

impl NbdServer {
    /// The NBD URI clients connect to (`nbd+unix:///DISK?socket=…`,
    /// `nbd://127.0.0.1:10809/DISK`, `nbds…` with TLS).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Full id of the snapshot being served.
    pub fn snapshot_id(&self) -> &str {
        &self.snapshot
    }

    /// The disk being served; also the export name.
    pub fn disk(&self) -> &str {
        &self.disk
    }

    /// nbdkit's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// nbdkit's exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            None => Ok(None),
            Some(c) => c.try_wait().map_err(|e| Error::io("nbdkit", e)),
        }
    }

    /// Stop nbdkit and remove everything the server left behind.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let mut result = Ok(());
        if let Some(mut child) = self.child.take() {
            result = terminate(&mut child);
        }
        if let Some(t) = self.log_thread.take() {
            let _ = t.join();
        }
        if let Some(sock) = self.socket.take() {
            if is_socket(&sock) {
                if let Err(e) = std::fs::remove_file(&sock) {
                    tracing::warn!("could not remove socket {}: {e}", sock.display());
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
        result
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("stopping nbdkit: {e}");
        }
    }
}

/// SIGTERM, a grace period, then SIGKILL; always reaps the child.
fn terminate(child: &mut Child) -> Result<()> {
    if child
        .try_wait()
        .map_err(|e| Error::io("nbdkit", e))?
        .is_some()
    {
        return Ok(());
    }
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| Error::Invalid("nbdkit pid out of range".into()))?;
    // SAFETY: kill with the pid of our own unreaped child and a constant signal.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if child
            .try_wait()
            .map_err(|e| Error::io("nbdkit", e))?
            .is_some()
        {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
    tracing::warn!(pid, "nbdkit did not exit after SIGTERM; killing it");
    child.kill().map_err(|e| Error::io("nbdkit", e))?;
    child.wait().map_err(|e| Error::io("nbdkit", e))?;
    Ok(())
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Where the plugin is: the option, `EKKO_NBD_PLUGIN`, or next to the
/// running executable.
pub fn find_plugin(explicit: Option<&Path>) -> Result<PathBuf> {
    let (path, how) = if let Some(p) = explicit {
        (p.to_path_buf(), "given")
    } else if let Some(p) = std::env::var_os(PLUGIN_ENV) {
        (PathBuf::from(p), "named by EKKO_NBD_PLUGIN")
    } else {
        let exe = std::env::current_exe().map_err(|e| Error::io("the current executable", e))?;
        (
            exe.with_file_name(PLUGIN_FILE),
            "expected next to the ekko executable",
        )
    };
    if !path.is_file() {
        return Err(Error::Invalid(format!(
            "the NBD plugin {} ({how}) is missing: build it with `cargo build --release --workspace`, \
             or point EKKO_NBD_PLUGIN at libekko_nbd.so",
            path.display()
        )));
    }
    std::path::absolute(&path).map_err(|e| Error::io(&path, e))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::io(p, e))
}

/// Percent-encode everything but unreserved characters and `/`.
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The first user name in an nbdkit PSK file (`username:hexkey`).
fn psk_username(file: &Path) -> Result<String> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(user, _)| user.trim().to_string())
        .find(|u| !u.is_empty())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{} holds no `username:hexkey` line; create one with `psktool -u USER -p {}`",
                file.display(),
                file.display()
            ))
        })
}

fn build_uri(listen: &Listen, disk: &str, tls: Option<(&Path, &str)>) -> String {
    // libnbd takes the TLS user name from the URI's user part.
    let (scheme, user) = match tls {
        Some((_, u)) => ("nbds", format!("{}@", uri_escape(u))),
        None => ("nbd", String::new()),
    };
    let mut query: Vec<String> = Vec::new();
    let base = match listen {
        Listen::Unix(p) => {
            query.push(format!("socket={}", uri_escape(&p.to_string_lossy())));
            format!("{scheme}+unix://{user}/{}", uri_escape(disk))
        }
        Listen::Tcp(addr) => format!("{scheme}://{user}{addr}/{}", uri_escape(disk)),
    };
    if let Some((file, _)) = tls {
        query.push(format!(
            "tls-psk-file={}",
            uri_escape(&file.to_string_lossy())
        ));
    }
    if query.is_empty() {
        base
    } else {
        format!("{base}?{}", query.join("&"))
    }
}

/// A stale socket (nothing accepts on it) is removed; a live one or any
/// other file is an error.
fn claim_socket(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::Invalid(format!(
                    "{} is in use by another server; stop it or choose another --socket",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))
        }
        Ok(_) => Err(Error::Invalid(format!(
            "{} exists and is not a socket; choose another --socket",
            path.display()
        ))),
    }
}

/// A private folder for the pid file.
fn scratch_dir() -> Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    sweep_scratch(&base);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = base.join(format!(
        "ekko-nbd-{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// Remove the scratch folders of servers that were killed (SIGKILL leaves
/// no chance to clean up): those whose process is gone.
fn sweep_scratch(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ekko-nbd-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Resolve what to serve, start nbdkit, and return once it accepts
/// connections.
pub fn start(opts: &ServeOptions) -> Result<NbdServer> {
    start_cancellable(opts, &AtomicBool::new(false))
}

fn start_cancellable(opts: &ServeOptions, cancel: &AtomicBool) -> Result<NbdServer> {
    let plugin = find_plugin(opts.plugin.as_deref())?;
    let repo_path = if crate::backend::is_url(opts.repo.as_os_str()) {
        opts.repo.clone()
    } else {
        absolute(&opts.repo)?
    };
    let passphrase = match &opts.passphrase {
        Some(p) => Some(p.clone()),
        None => crate::secret::from_env(None)?,
    };

    // Resolve here, so that a typo fails before nbdkit starts, and so that
    // `VM@latest` names one fixed snapshot for the life of the server.
    let (snap_id, disk) = {
        let backend = crate::backend::open(&repo_path)?;
        let pass = passphrase.clone();
        let repo = Repository::open(backend, move || {
            pass.ok_or_else(|| {
                Error::Invalid(
                    "the repository is encrypted: set EKKO_PASSWORD or EKKO_PASSWORD_FILE, or pass --password-file"
                        .into(),
                )
            })
        })?;
        let snap = snapshot::resolve_exact(repo.backend().as_ref(), repo.keys(), &opts.snapshot)?;
        let disk = match &opts.disk {
            Some(d) => snap.disk(d)?.name.clone(),
            None => match snap.disks.as_slice() {
                [only] => only.name.clone(),
                disks => {
                    let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
                    return Err(Error::Invalid(format!(
                        "snapshot {} has {} disks ({}): choose one with --disk",
                        snap.short_id(),
                        disks.len(),
                        names.join(", ")
                    )));
                }
            },
        };
        // The repository (and its index cache) is closed again here: the
        // plugin opens its own.
        (snap.id, disk)
    };

    let tls = match &opts.tls_psk {
        Some(f) => {
            let f = absolute(f)?;
            let user = psk_username(&f)?;
            Some((f, user))
        }
        None => None,
    };
    let listen = match &opts.listen {
        Listen::Unix(p) => {
            let p = absolute(p)?;
            claim_socket(&p)?;
            Listen::Unix(p)
        }
        Listen::Tcp(addr) if addr.port() == 0 => {
            return Err(Error::Invalid(format!(
                "--listen {addr}: give a port, such as {}",
                SocketAddr::new(addr.ip(), DEFAULT_PORT)
            )))
        }
        l @ Listen::Tcp(_) => l.clone(),
    };
    let uri = build_uri(
        &listen,
        &disk,
        tls.as_ref().map(|(f, u)| (f.as_path(), u.as_str())),
    );

    let scratch = scratch_dir()?;
    let pidfile = scratch.join("nbdkit.pid");
    let mut cmd = Command::new("nbdkit");
    cmd.arg("--foreground")
        .arg("--exit-with-parent")
        .arg("-P")
        .arg(&pidfile);
    if opts.writable {
        // The plugin never writes; cow keeps the writes in a temporary
        // overlay that nbdkit deletes when it exits.
        cmd.arg("--filter=cow");
    } else {
        cmd.arg("-r");
    }
    match &listen {
        Listen::Unix(p) => {
            cmd.arg("-U").arg(p);
        }
        Listen::Tcp(addr) => {
            cmd.arg("-i")
                .arg(addr.ip().to_string())
                .arg("-p")
                .arg(addr.port().to_string());
        }
    }
    if let Some((f, _)) = &tls {
        let mut a = OsString::from("--tls-psk=");
        a.push(f);
        cmd.arg("--tls=require").arg(a);
    }
    cmd.arg("-e").arg(&disk).arg(&plugin);
    let mut repo_arg = OsString::from("repo=");
    repo_arg.push(&repo_path);
    cmd.arg(repo_arg)
        .arg(format!("snapshot={snap_id}"))
        .arg(format!("disk={disk}"));
    cmd.env_remove("EKKO_PASSWORD_FILE")
        .env_remove("EKKO_PASSWORD");
    if let Some(p) = passphrase {
        cmd.env("EKKO_PASSWORD", OsString::from_vec(p));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());

    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            if e.kind() == std::io::ErrorKind::NotFound {
                return Err(Error::Invalid(
                    "nbdkit is not installed: install the nbdkit package (scripts/setup does)"
                        .into(),
                ));
            }
            return Err(Error::io("nbdkit", e));
        }
    };
    let log = Arc::new(Log::default());
    let log_thread = child.stderr.take().map(|err| {
        let log = Arc::clone(&log);
        std::thread::spawn(move || pass_log(err, &log))
    });
    let pid = child.id();
    let mut server = NbdServer {
        child: Some(child),
        uri,
        snapshot: snap_id,
        disk,
        socket: match &listen {
            Listen::Unix(p) => Some(p.clone()),
            Listen::Tcp(_) => None,
        },
        scratch,
        log,
        log_thread,
    };
    tracing::info!(pid, uri = %server.uri, "started nbdkit");

    loop {
        if let Some(status) = server.try_wait()? {
            // Let the reader drain nbdkit's last words before quoting them.
            if let Some(t) = server.log_thread.take() {
                let _ = t.join();
            }
            let held = server.log.held.lock().expect("log lock").join("; ");
            return Err(server_error(format!(
                "nbdkit failed to start ({status}): {held}"
            )));
        }
        if pid_file_written(&pidfile) {
            break;
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        std::thread::sleep(POLL);
    }
    {
        // Under the lock, so that no line slips between the two states.
        let mut held = server.log.held.lock().expect("log lock");
        server.log.ready.store(true, Ordering::SeqCst);
        let mut err = std::io::stderr().lock();
        for line in held.drain(..) {
            let _ = writeln!(err, "{line}");
        }
    }
    Ok(server)
}

/// The error for an nbdkit that failed: an I/O error of the server process.
fn server_error(msg: String) -> Error {
    Error::io("nbdkit", std::io::Error::other(msg))
}

/// nbdkit writes "PID\n" once it is listening.
fn pid_file_written(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|d| d.ends_with(b"\n"))
}

fn pass_log(err: std::process::ChildStderr, log: &Log) {
    for line in BufReader::new(err).lines() {
        let Ok(line) = line else { break };
        // The lock orders this against the hand-over in `start`.
        let mut held = log.held.lock().expect("log lock");
        if log.ready.load(Ordering::SeqCst) {
            drop(held);
            // nbdkit's own log, passed through as it is.
            let _ = writeln!(std::io::stderr(), "{line}");
        } else {
            if held.len() == STDERR_LINES {
                held.remove(0);
            }
            held.push(line);
        }
    }
}

/// Serve until SIGINT or SIGTERM (or until nbdkit exits): print the NBD URI
/// on stdout once clients can connect, then stop nbdkit and clean up.
pub fn serve(opts: &ServeOptions) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut ids = Vec::new();
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        ids.push(
            signal_hook::flag::register(sig, Arc::clone(&stop))
                .map_err(|e| Error::io("signal handler", e))?,
        );
    }
    let result = serve_until(opts, &stop);
    for id in ids {
        signal_hook::low_level::unregister(id);
    }
    result
}

fn serve_until(opts: &ServeOptions, stop: &AtomicBool) -> Result<()> {
    let mut server = start_cancellable(opts, stop)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", server.uri())
            .and_then(|()| out.flush())
            .map_err(|e| Error::io("stdout", e))?;
    }
    loop {
        if stop.load(Ordering::Relaxed) {
            tracing::info!("stopping the NBD server");
            return server.stop();
        }
        if let Some(status) = server.try_wait()? {
            // A Ctrl-C on the terminal reaches nbdkit too; that is a stop.
            std::thread::sleep(POLL);
            if stop.load(Ordering::Relaxed) {
                return server.stop();
            }
            server.stop()?;
            return Err(server_error(format!(
                "nbdkit exited unexpectedly ({status})"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let unix = Listen::Unix(PathBuf::from("/run/ekko nbd.sock"));
        assert_eq!(
            build_uri(&unix, "vda", None),
            "nbd+unix:///vda?socket=/run/ekko%20nbd.sock"
        );
        let tcp = Listen::Tcp("127.0.0.1:10809".parse().unwrap());
        assert_eq!(build_uri(&tcp, "vda", None), "nbd://127.0.0.1:10809/vda");
        let v6 = Listen::Tcp("[::1]:10809".parse().unwrap());
        assert_eq!(build_uri(&v6, "d", None), "nbd://[::1]:10809/d");
        assert_eq!(
            build_uri(&tcp, "vda", Some((Path::new("/k.psk"), "ekko"))),
            "nbds://ekko@127.0.0.1:10809/vda?tls-psk-file=/k.psk"
        );
        assert_eq!(
            build_uri(&unix, "vda", Some((Path::new("/k.psk"), "ekko"))),
            "nbds+unix://ekko@/vda?socket=/run/ekko%20nbd.sock&tls-psk-file=/k.psk"
        );
    }

    #[test]
    fn psk_user() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keys.psk");
        std::fs::write(&f, "alice:0123abcd\n").unwrap();
        assert_eq!(psk_username(&f).unwrap(), "alice");
        std::fs::write(&f, "garbage\n").unwrap();
        assert!(psk_username(&f).is_err());
    }

    #[test]
    fn scratch_of_dead_servers_is_swept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join("ekko-nbd-4000000000-1-0");
        let alive = dir
            .path()
            .join(format!("ekko-nbd-{}-1-0", std::process::id()));
        let other = dir.path().join("ekko-nbd-notapid");
        for d in [&dead, &alive, &other] {
            std::fs::create_dir(d).unwrap();
        }
        sweep_scratch(dir.path());
        assert!(!dead.exists());
        assert!(alive.exists() && other.exists());
    }

    #[test]
    fn stale_socket_is_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert!(claim_socket(&p).is_err(), "a live socket must be refused");
        drop(l);
        claim_socket(&p).unwrap();
        assert!(!p.exists());
        std::fs::write(&p, b"x").unwrap();
        assert!(claim_socket(&p).is_err(), "a regular file must be refused");
    }
}
