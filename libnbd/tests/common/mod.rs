//! Shared helpers for the integration tests.  They drive real QEMU tools and
//! fail (never skip) when a tool is missing.

#![allow(dead_code)] // each test binary uses a different subset

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// Panic unless the QEMU tools the tests rely on are installed.
pub fn require_tools() {
    for tool in ["qemu-nbd", "qemu-storage-daemon", "qemu-img", "qemu-io"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "{tool} is required for these tests (Debian: apt install qemu-utils)"
        );
    }
}

/// Run a command to completion, panicking with its output on failure.
pub fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Create a sparse raw image of `size` bytes with `pattern` written in each
/// `(offset, len)` range; everything else is a hole.  Returns the path.
pub fn sparse_raw(dir: &Path, size: u64, data: &[(u64, u64, u8)]) -> PathBuf {
    let path = dir.join("disk.raw");
    let f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    for &(offset, len, byte) in data {
        let buf = vec![byte; usize::try_from(len).unwrap()];
        f.write_all_at(&buf, offset).unwrap();
    }
    f.sync_all().unwrap();
    path
}

/// A `qemu-nbd` listening on a Unix socket; killed on drop.
pub struct Server {
    child: Child,
    pub socket: PathBuf,
}

impl Server {
    /// Start `qemu-nbd -t -k SOCKET ARGS...` and wait for the socket.
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        let socket = dir.join("nbd.sock");
        let child = Command::new("qemu-nbd")
            .arg("-t")
            .arg("-k")
            .arg(&socket)
            .args(args)
            .spawn()
            .expect("cannot start qemu-nbd");
        let mut server = Server { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.socket.exists() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("qemu-nbd exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Assert that `extents` tile `[offset, offset + len)` exactly, in order.
pub fn assert_tiles(extents: &[ekko_libnbd::Extent], offset: u64, len: u64) {
    let mut pos = offset;
    for e in extents {
        assert_eq!(e.offset, pos, "gap or overlap in {extents:?}");
        assert!(e.length > 0, "empty extent in {extents:?}");
        pos += e.length;
    }
    assert_eq!(
        pos,
        offset + len,
        "extents do not cover the range: {extents:?}"
    );
}
