//! A real qemu-storage-daemon for live-capture tests: qcow2 disks
//! `disk0..`, a QMP monitor for ekko (`a`) and one for the test (`t`), and
//! an NBD server with a writable export per disk, through which the test
//! plays the guest. Killed (by PID) on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ekko_qmp::Qmp;
use serde_json::{json, Value};

pub const MIB: u64 = 1 << 20;

pub struct Qsd {
    child: Option<Child>,
    /// Short path under /tmp: Unix socket paths are limited to 107 bytes.
    pub dir: tempfile::TempDir,
    pub disks: usize,
    /// Options added to `--nbd-server` (e.g. `,max-connections=1`).
    nbd_options: String,
    /// A TCP port for the NBD server on 127.0.0.1, instead of `nbd.sock`.
    pub tcp_port: Option<u16>,
}

impl Qsd {
    /// `disks` qcow2 disks of `size` bytes each.
    pub fn start(disks: usize, size: u64) -> Qsd {
        Qsd::start_with(disks, size, "")
    }

    /// `start`, with the NBD server on a free TCP port of 127.0.0.1.
    pub fn start_tcp(disks: usize, size: u64) -> Qsd {
        let mut q = Qsd::unstarted(disks, size, "");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        q.tcp_port = Some(port);
        q.spawn();
        q
    }

    /// `start`, with `nbd_options` added to `--nbd-server`.
    pub fn start_with(disks: usize, size: u64, nbd_options: &str) -> Qsd {
        let mut q = Qsd::unstarted(disks, size, nbd_options);
        q.spawn();
        q
    }

    /// Disks made, daemon not started.
    fn unstarted(disks: usize, size: u64, nbd_options: &str) -> Qsd {
        crate::util::require("qemu-storage-daemon");
        crate::util::require("qemu-img");
        crate::util::require("qemu-io");
        let dir = tempfile::Builder::new()
            .prefix("ekc")
            .tempdir_in("/tmp")
            .expect("tempdir");
        for i in 0..disks {
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(dir.path().join(format!("d{i}.qcow2")))
                .arg(size.to_string()));
        }
        Qsd {
            child: None,
            dir,
            disks,
            nbd_options: nbd_options.to_string(),
            tcp_port: None,
        }
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        for s in ["qmp-a.sock", "qmp-t.sock", "nbd.sock"] {
            let _ = std::fs::remove_file(d.join(s));
        }
        let mut cmd = Command::new("qemu-storage-daemon");
        for i in 0..self.disks {
            cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name=file{i},filename={}",
                d.join(format!("d{i}.qcow2")).display()
            ));
            cmd.arg("--blockdev")
                .arg(format!("driver=qcow2,node-name=disk{i},file=file{i}"));
        }
        for m in ["a", "t"] {
            cmd.arg("--chardev").arg(format!(
                "socket,path={},server=on,wait=off,id=mon{m}",
                d.join(format!("qmp-{m}.sock")).display()
            ));
            cmd.arg("--monitor").arg(format!("chardev=mon{m}"));
        }
        let server = match self.tcp_port {
            Some(port) => format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            None => format!("addr.type=unix,addr.path={}", d.join("nbd.sock").display()),
        };
        cmd.arg("--nbd-server")
            .arg(format!("{server}{}", self.nbd_options));
        for i in 0..self.disks {
            cmd.arg("--export").arg(format!(
                "type=nbd,id=rw{i},node-name=disk{i},name=disk{i},writable=on"
            ));
        }
        let log = std::fs::File::create(d.join("qsd.log")).expect("log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("qemu-storage-daemon must be installed (qemu-utils >= 7.2; run scripts/setup)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let ready = |s: &&str| match (*s, self.tcp_port) {
            ("nbd.sock", Some(port)) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            _ => d.join(s).exists(),
        };
        while !["qmp-a.sock", "qmp-t.sock", "nbd.sock"].iter().all(ready) {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "qemu-storage-daemon exited with {st}: {}",
                    std::fs::read_to_string(d.join("qsd.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The monitor ekko uses.
    pub fn qmp_path(&self) -> PathBuf {
        self.dir.path().join("qmp-a.sock")
    }

    /// A connection on the test's own monitor.
    pub fn qmp(&self) -> Qmp {
        Qmp::connect_with_timeout(self.dir.path().join("qmp-t.sock"), Duration::from_secs(20))
            .expect("QMP connect")
    }

    /// Where ekko puts its fleecing images in these tests.
    pub fn workdir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn rw_uri(&self, disk: &str) -> String {
        if let Some(port) = self.tcp_port {
            return format!("nbd://127.0.0.1:{port}/{disk}");
        }
        format!(
            "nbd+unix:///{disk}?socket={}",
            self.dir.path().join("nbd.sock").display()
        )
    }

    /// A guest write: `len` bytes of `pattern` at `offset`.
    pub fn write(&self, disk: &str, pattern: u8, offset: u64, len: u64) {
        self.write_each(disk, &[(pattern, offset, len)]);
    }

    /// Guest writes, `(pattern, offset, len)` each, in one qemu-io run.
    pub fn write_each(&self, disk: &str, writes: &[(u8, u64, u64)]) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for (pattern, offset, len) in writes {
            cmd.arg("-c")
                .arg(format!("write -P 0x{pattern:02x} {offset} {len}"));
        }
        let out = String::from_utf8_lossy(&run(cmd.arg(self.rw_uri(disk)))).into_owned();
        assert_eq!(
            out.matches("wrote").count(),
            writes.len(),
            "qemu-io did not write them all: {out}"
        );
    }

    /// The disk's current content, copied to `to`; returns its sha256.
    pub fn reference(&self, disk: &str, to: &Path) -> String {
        let _ = std::fs::remove_file(to);
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &self.rw_uri(disk)])
            .arg(to));
        let sum = crate::util::sha256_file(to);
        std::fs::remove_file(to).unwrap();
        sum
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Clean shutdown through QMP `quit` (persistent bitmaps are stored).
    pub fn quit(&mut self) {
        let _ = self.qmp().execute("quit", Value::Null);
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "qemu-storage-daemon did not quit"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Starts the daemon again on the same images.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }

    /// The named dirty bitmaps of `node`.
    pub fn bitmaps(&self, node: &str) -> Vec<ekko_qmp::BitmapInfo> {
        ekko_qmp::inventory::bitmaps(&mut self.qmp(), node).unwrap()
    }

    /// Anything a backup could have left in QEMU: fleecing, snapshot-access
    /// and copy-before-write nodes, jobs, and exports other than the
    /// writable ones of the disks.
    pub fn leftovers(&self) -> Vec<String> {
        let mut q = self.qmp();
        let mut left = Vec::new();
        let nodes = q
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .unwrap();
        for n in nodes.as_array().unwrap() {
            let name = n["node-name"].as_str().unwrap_or("");
            if name.starts_with("ekko-")
                || n["drv"] == "copy-before-write"
                || n["drv"] == "snapshot-access"
            {
                left.push(format!("node {name} ({})", n["drv"]));
            }
        }
        let blocks = q.execute("query-block", Value::Null).unwrap();
        for b in blocks.as_array().unwrap() {
            let node = b["inserted"]["node-name"].as_str().unwrap_or("");
            if node.starts_with("ekko-") {
                left.push(format!("block device on node {node}"));
            }
        }
        for cmd in ["query-block-jobs", "query-jobs"] {
            for j in q.execute(cmd, Value::Null).unwrap().as_array().unwrap() {
                left.push(format!(
                    "job {}",
                    j["id"].as_str().or(j["device"].as_str()).unwrap_or("?")
                ));
            }
        }
        for e in q
            .execute("query-block-exports", Value::Null)
            .unwrap()
            .as_array()
            .unwrap()
        {
            let id = e["id"].as_str().unwrap_or("");
            let node = e["node-name"].as_str().unwrap_or("");
            if !(id.starts_with("rw") && node.starts_with("disk")) {
                left.push(format!("export {id} on {node}"));
            }
        }
        left
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed? run scripts/setup): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
