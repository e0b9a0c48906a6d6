//! Test harness: a real qemu-storage-daemon with two 64 MiB qcow2 disks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ekko_qmp::{Qmp, SessionConfig};
use serde_json::{json, Value};

pub const MIB: u64 = 1 << 20;
pub const DISK_SIZE: u64 = 64 * MIB;

/// A running qemu-storage-daemon; killed (by PID) on drop.
pub struct Qsd {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// NBD server socket with a writable export per disk, if started with one.
    pub nbd_sock: Option<PathBuf>,
    with_nbd: bool,
}

impl Qsd {
    /// Two disks `disk0`/`disk1`, three monitors (`a`, `b`, `i`), and, if
    /// `with_nbd`, an NBD server with writable exports `disk0`/`disk1`.
    pub fn start(with_nbd: bool) -> Qsd {
        let dir = tempfile::Builder::new()
            .prefix("ekq")
            .tempdir_in("/tmp")
            .expect("tempdir");
        for i in 0..2 {
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(dir.path().join(format!("d{i}.qcow2")))
                .arg(DISK_SIZE.to_string()));
        }
        let mut q = Qsd {
            child: None,
            nbd_sock: with_nbd.then(|| dir.path().join("nbd.sock")),
            dir,
            with_nbd,
        };
        q.spawn();
        q
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        for m in ["a", "b", "i"] {
            let _ = std::fs::remove_file(d.join(format!("qmp-{m}.sock")));
        }
        let mut cmd = Command::new("qemu-storage-daemon");
        for i in 0..2 {
            cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name=file{i},filename={}",
                d.join(format!("d{i}.qcow2")).display()
            ));
            cmd.arg("--blockdev")
                .arg(format!("driver=qcow2,node-name=disk{i},file=file{i}"));
        }
        for m in ["a", "b", "i"] {
            cmd.arg("--chardev").arg(format!(
                "socket,path={},server=on,wait=off,id=mon{m}",
                d.join(format!("qmp-{m}.sock")).display()
            ));
            cmd.arg("--monitor").arg(format!("chardev=mon{m}"));
        }
        if let Some(nbd) = &self.nbd_sock {
            let _ = std::fs::remove_file(nbd);
            cmd.arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", nbd.display()));
            for i in 0..2 {
                cmd.arg("--export").arg(format!(
                    "type=nbd,id=rw{i},node-name=disk{i},name=disk{i},writable=on"
                ));
            }
        }
        let log = std::fs::File::create(d.join("qsd.log")).expect("log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("qemu-storage-daemon must be installed (package qemu-utils >= 7.0): cannot start it");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = ["a", "b", "i"]
                .iter()
                .all(|m| d.join(format!("qmp-{m}.sock")).exists())
                && self.nbd_sock.as_ref().map(|p| p.exists()).unwrap_or(true);
            if ready {
                break;
            }
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

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Path of monitor `m` ("a", "b" or "i").
    pub fn qmp_path(&self, m: &str) -> PathBuf {
        self.dir.path().join(format!("qmp-{m}.sock"))
    }

    /// A QMP connection on monitor `m`.
    pub fn qmp(&self, m: &str) -> Qmp {
        Qmp::connect_with_timeout(self.qmp_path(m), Duration::from_secs(20)).expect("QMP connect")
    }

    pub fn workdir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn config(&self, new: &str, prev: Option<&str>) -> SessionConfig {
        SessionConfig::new(self.workdir("work"), new, prev.map(str::to_string))
    }

    /// URI of the writable export of `disk`.
    pub fn rw_uri(&self, disk: &str) -> String {
        format!(
            "nbd+unix:///{disk}?socket={}",
            self.nbd_sock
                .as_ref()
                .expect("started with an NBD server")
                .display()
        )
    }

    /// Simulates a guest write through the writable export.
    pub fn write(&self, disk: &str, pattern: u8, offset: u64, len: u64) {
        run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P 0x{pattern:02x} {offset} {len}"),
            &self.rw_uri(disk),
        ]));
    }

    /// The current contents of `disk`, read through the writable export.
    pub fn read_live(&self, disk: &str) -> Vec<u8> {
        read_uri(&self.rw_uri(disk), &self.dir.path().join("live.raw"))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Clean shutdown through QMP `quit`.
    pub fn quit(&mut self) {
        let mut q = self.qmp("i");
        let _ = q.execute("quit", Value::Null);
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "qsd did not quit");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Starts the daemon again on the same images.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Copies a whole NBD export to `tmp` with qemu-img and returns the bytes.
pub fn read_uri(uri: &str, tmp: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(tmp);
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(tmp));
    let data = std::fs::read(tmp).unwrap();
    std::fs::remove_file(tmp).unwrap();
    data
}

/// Extents of a meta context as (offset, length, type), via nbdinfo.
pub fn nbd_map(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let out = run(Command::new("nbdinfo").args([&format!("--map={context}"), "--json", uri]));
    let v: Value = serde_json::from_slice(&out).expect("nbdinfo JSON");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The dirty extents of `qemu:dirty-bitmap:<bitmap>`, merged.
pub fn dirty_extents(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, len, ty) in nbd_map(uri, &format!("qemu:dirty-bitmap:{bitmap}")) {
        if ty & 1 == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// Anything a session could have left behind in QEMU, as readable strings.
pub fn leftovers(q: &mut Qmp) -> Vec<String> {
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
            left.push(format!("node {name}"));
        }
    }
    let jobs = q.execute("query-block-jobs", Value::Null).unwrap();
    for j in jobs.as_array().unwrap() {
        left.push(format!("job {}", j["device"]));
    }
    let jobs = q.execute("query-jobs", Value::Null).unwrap();
    for j in jobs.as_array().unwrap() {
        left.push(format!("job {}", j["id"]));
    }
    let exports = q.execute("query-block-exports", Value::Null).unwrap();
    for e in exports.as_array().unwrap() {
        let id = e["id"].as_str().unwrap_or("");
        let node = e["node-name"].as_str().unwrap_or("");
        if !(id.starts_with("rw") && node.starts_with("disk")) {
            left.push(format!("export {id} on {node}"));
        }
    }
    left
}

/// Files in `dir` (names only).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The bitmap `name` of `node`, if any.
pub fn bitmap(q: &mut Qmp, node: &str, name: &str) -> Option<ekko_qmp::BitmapInfo> {
    ekko_qmp::inventory::bitmaps(q, node)
        .unwrap()
        .into_iter()
        .find(|b| b.name == name)
}

pub fn specs() -> Vec<ekko_qmp::DiskSpec> {
    (0..2)
        .map(|i| ekko_qmp::DiskSpec {
            name: format!("disk{i}"),
            node: format!("disk{i}"),
        })
        .collect()
}
