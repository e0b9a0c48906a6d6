//! Shared test helpers: temporary repositories, the `ekko` binary, image
//! generators, and required external tools.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

pub const PASSWORD: &str = "correct horse battery staple";

/// A scratch folder with a repository path and a private index cache.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub cache: PathBuf,
    /// Extra environment for every command (object-store credentials).
    pub vars: Vec<(String, String)>,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("ekko-test-")
            .tempdir_in(scratch_root())
            .unwrap();
        let repo = dir.path().join("repo");
        let cache = dir.path().join("cache");
        Env {
            dir,
            repo,
            cache,
            vars: Vec::new(),
        }
    }

    /// A new, initialised repository (encrypted, default chunk size unless
    /// `extra` says otherwise).
    pub fn init(extra: &[&str]) -> Env {
        let e = Env::new();
        let mut args = vec!["init"];
        args.extend_from_slice(extra);
        e.ok(&args);
        e
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(ekko_bin());
        c.env("EKKO_REPO", &self.repo)
            .env("EKKO_PASSWORD", PASSWORD)
            .env("EKKO_CACHE_DIR", &self.cache)
            .env_remove("EKKO_PASSWORD_FILE")
            .env_remove("EKKO_LOG")
            .envs(self.vars.iter().map(|(k, v)| (k, v)));
        c
    }

    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.cmd().args(args).output().expect("running ekko")
    }

    /// Run and require success; returns stdout.
    pub fn ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = self.run(args);
        assert_success(&out, args);
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn backup(&self, vm: &str, disks: &[(&str, &Path)]) -> String {
        let mut args: Vec<String> = vec!["backup".into(), "--vm".into(), vm.into()];
        for (n, p) in disks {
            args.push("--disk".into());
            args.push(format!("{n}={}", p.display()));
        }
        self.ok(&args).trim().to_string()
    }

    pub fn backup_json(
        &self,
        vm: &str,
        disks: &[(&str, &str)],
        extra: &[&str],
    ) -> serde_json::Value {
        let mut args: Vec<String> =
            vec!["backup".into(), "--json".into(), "--vm".into(), vm.into()];
        for (n, p) in disks {
            args.push("--disk".into());
            args.push(format!("{n}={p}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    pub fn restore(&self, snap: &str, disk: &str) -> PathBuf {
        let out = self.path(&format!(
            "restore-{snap}-{disk}-{}.img",
            rand::random::<u32>()
        ));
        self.ok(&[
            "restore",
            snap,
            "--disk",
            disk,
            "--to",
            out.to_str().unwrap(),
        ]);
        out
    }

    /// Every file in the repository with its bytes' hash: to prove that a
    /// failed command changed nothing.
    pub fn repo_state(&self) -> Vec<(String, String)> {
        dir_state(&self.repo)
    }

    pub fn pack_files(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        collect_files(&self.repo.join("packs"), &mut v);
        v.sort();
        v
    }
}

/// Every file under `dir` with the sha256 of its bytes, sorted.
pub fn dir_state(dir: &Path) -> Vec<(String, String)> {
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, root, out);
        } else {
            out.push((
                p.strip_prefix(root).unwrap().display().to_string(),
                sha256_file(&p),
            ));
        }
    }
}

/// Where test scratch files go: a real disk (sparse files, xattrs), not tmpfs.
pub fn scratch_root() -> PathBuf {
    let p = std::env::var_os("EKKO_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    fs::create_dir_all(&p).unwrap();
    p
}

pub fn ekko_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ekko"))
}

/// A binary built beside `ekko` by `cargo build --workspace`.
pub fn sibling_bin(name: &str) -> PathBuf {
    let p = ekko_bin().with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --workspace` first",
        p.display()
    );
    p
}

/// Fail (never skip) when a required program is missing.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required program {tool:?} is not installed: run scripts/setup"
    );
}

pub fn assert_success<S: AsRef<OsStr>>(out: &Output, args: &[S]) {
    let a: Vec<_> = args
        .iter()
        .map(|s| s.as_ref().to_string_lossy().into_owned())
        .collect();
    assert!(
        out.status.success(),
        "ekko {} failed ({}):\nstdout: {}\nstderr: {}",
        a.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A failure that is reported cleanly: non-zero exit, a message, no panic.
pub fn assert_clean_failure(out: &Output, must_mention: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "ekko panicked: {err}");
    assert!(
        err.to_lowercase().contains(&must_mention.to_lowercase()),
        "stderr should mention {must_mention:?}: {err}"
    );
    err
}

pub fn sha256_file(p: &Path) -> String {
    let mut f = File::open(p).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

pub fn sha256_bytes(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Deterministic pseudo-random bytes (xorshift), incompressible.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Text-like, compressible bytes.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "qemu", "block", "dirty", "bitmap", "snapshot", "chunk", "the", "of", "and", "backup\n",
    ];
    let r = random_bytes(seed, len / 4 + 16);
    let mut v = Vec::with_capacity(len + 16);
    let mut i = 0;
    while v.len() < len {
        v.extend_from_slice(words[usize::from(r[i % r.len()]) % words.len()].as_bytes());
        v.push(b' ');
        i += 1;
    }
    v.truncate(len);
    v
}

/// Create a sparse file of `size` with `data` written at each offset.
pub fn make_image(path: &Path, size: u64, parts: &[(u64, &[u8])]) {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    for (off, d) in parts {
        f.write_all_at(d, *off).unwrap();
    }
    f.sync_all().unwrap();
}

pub fn write_at(path: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
}

/// Damage a file in place: XOR the byte at `at` with `mask`.
pub fn xor_byte(path: &Path, at: u64, mask: u8) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ mask], at).unwrap();
}

pub fn run_tool(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn write_file(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
}

/// Unmounts a tmpfs on drop.
pub struct TmpfsGuard(std::path::PathBuf);

impl TmpfsGuard {
    /// Mount a tmpfs of `size` (as `mount -o size=` takes it) at `at`.
    pub fn mount(at: &std::path::Path, size: &str) -> TmpfsGuard {
        std::fs::create_dir_all(at).unwrap();
        run_tool(
            std::process::Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size}"),
                    "ekko-test-tmpfs",
                ])
                .arg(at),
        );
        TmpfsGuard(at.to_path_buf())
    }
}

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A child process on a pseudo-terminal of its own, as a user at a
/// terminal runs it: its stdin, stdout and stderr are the terminal, and so
/// is its `/dev/tty`, where passphrase prompts read.
pub struct OnTty {
    child: std::process::Child,
    master: File,
    /// Everything the child wrote so far.
    pub output: String,
    /// How much of `output` an `expect` has consumed.
    seen: usize,
}

impl OnTty {
    pub fn spawn(mut cmd: Command) -> OnTty {
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::os::unix::process::CommandExt;
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two descriptors into the integers we own;
        // the name, termios and winsize pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned here.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let dup = || File::from(slave.try_clone().unwrap());
        cmd.stdin(dup()).stdout(dup()).stderr(dup());
        // SAFETY: setsid and ioctl are async-signal-safe; they make the
        // terminal on stdin the new session's controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(cmd);
        drop(slave);
        OnTty {
            child,
            master,
            output: String::new(),
            seen: 0,
        }
    }

    /// Read what the child writes for up to `timeout`; false at its end.
    fn read_some(&mut self, timeout: std::time::Duration) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd that we own.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            return true;
        }
        let mut buf = [0u8; 4096];
        match self.master.read(&mut buf) {
            Ok(0) | Err(_) => false, // EIO: every copy of the terminal closed
            Ok(n) => {
                self.output.push_str(&String::from_utf8_lossy(&buf[..n]));
                true
            }
        }
    }

    /// Wait (up to 60 s) until the child has written `text` after what
    /// earlier calls consumed.
    pub fn expect(&mut self, text: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(at) = self.output[self.seen..].find(text) {
                self.seen += at + text.len();
                return;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero() && self.read_some(left.min(std::time::Duration::from_millis(200)))
                    || self.output[self.seen..].contains(text),
                "waited for {text:?}; the terminal shows: {}",
                self.output
            );
        }
    }

    /// Type `line` and Enter.
    pub fn type_line(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\r").unwrap();
    }

    /// Read the rest, and the child's exit status.
    pub fn finish(mut self) -> (std::process::ExitStatus, String) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::time::Instant::now() < deadline
            && self.read_some(std::time::Duration::from_millis(200))
        {
            if let Some(status) = self.child.try_wait().unwrap() {
                while self.read_some(std::time::Duration::from_millis(50)) {}
                return (status, self.output);
            }
        }
        let status = self.child.wait().unwrap();
        (status, self.output)
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }
}
