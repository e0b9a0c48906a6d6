//! Live capture against a real qemu-storage-daemon: `ekko backup --qmp`.
//!
//! The test plays the guest by writing through the daemon's writable NBD
//! exports. "The disk at its own instant" is a copy taken through that
//! export just before a backup starts, while nothing writes; every restore
//! is compared with it by sha256.

#[path = "util/qsd.rs"]
pub(crate) mod qsd;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;
use qsd::{Qsd, MIB};

const SIZE: u64 = 64 * MIB;
/// The repository's chunk size (the default).
const CHUNK: u64 = MIB;
const VM: &str = "vm1";

fn live_args(qsd: &Qsd, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "backup".into(),
        "--json".into(),
        "--vm".into(),
        VM.into(),
        "--qmp".into(),
        qsd.qmp_path().display().to_string(),
        "--workdir".into(),
        qsd.workdir().display().to_string(),
        "--threads".into(),
        "2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A live backup that must succeed: its JSON summary and its stderr.
pub(crate) fn live(env: &Env, qsd: &Qsd, extra: &[&str]) -> (Value, String) {
    let args = live_args(qsd, extra);
    let out = env.run(&args);
    assert_success(&out, &args);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    (v, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn spawn_live(env: &Env, qsd: &Qsd, extra: &[&str]) -> Child {
    spawn_ekko(env, &live_args(qsd, extra))
}

fn spawn_ekko(env: &Env, args: &[String]) -> Child {
    env.cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ekko")
}

/// Waits until a backup's point-in-time exports exist: its instant is past.
fn wait_for_session(qsd: &Qsd, child: &mut Child) {
    let mut q = qsd.qmp();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let exports = q.execute("query-block-exports", Value::Null).unwrap();
        if exports
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"].as_str().unwrap_or("").starts_with("ekko-"))
        {
            return;
        }
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output_ref();
            panic!("ekko ended ({st}) before its session was seen: {out}");
        }
        assert!(Instant::now() < deadline, "no ekko export appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

trait ChildOutput {
    fn wait_with_output_ref(&mut self) -> String;
}

impl ChildOutput for Child {
    fn wait_with_output_ref(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

pub(crate) fn disk<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no disk {name} in {v}"))
}

/// sha256 of each disk, read through the writable exports.
pub(crate) fn references(qsd: &Qsd, env: &Env, disks: &[&str]) -> Vec<String> {
    disks
        .iter()
        .map(|d| qsd.reference(d, &env.path(&format!("ref-{d}.raw"))))
        .collect()
}

pub(crate) fn assert_restores(env: &Env, snap: &str, disks: &[&str], refs: &[String]) {
    for (d, want) in disks.iter().zip(refs) {
        let out = env.restore(snap, d);
        assert_eq!(
            &sha256_file(&out),
            want,
            "restore of {d} from snapshot {snap} differs from the disk at its instant"
        );
        std::fs::remove_file(out).unwrap();
    }
}

/// Bytes of the chunks that `ranges` touch: what an incremental must read.
fn chunk_bytes(ranges: &[(u64, u64)]) -> u64 {
    let mut chunks: Vec<u64> = ranges
        .iter()
        .flat_map(|&(off, len)| off / CHUNK..(off + len).div_ceil(CHUNK))
        .collect();
    chunks.sort();
    chunks.dedup();
    chunks.len() as u64 * CHUNK
}

/// This repository's bitmap generations on `node`.
fn generations(qsd: &Qsd, node: &str) -> Vec<ekko_qmp::BitmapInfo> {
    qsd.bitmaps(node)
        .into_iter()
        .filter(|b| b.name.starts_with("ekko-") && !b.name.starts_with("ekko-zzzz"))
        .collect()
}

/// Exactly one generation, recording and usable, named `name`.
fn assert_only_generation(qsd: &Qsd, node: &str, name: &str) {
    let g = generations(qsd, node);
    assert_eq!(g.len(), 1, "{node}: {g:?}");
    assert_eq!(g[0].name, name, "{node}: {g:?}");
    assert!(
        g[0].recording && g[0].persistent && !g[0].busy && !g[0].inconsistent,
        "{node}: {g:?}"
    );
}

fn assert_no_leftovers(qsd: &Qsd) {
    assert_eq!(
        qsd.leftovers(),
        Vec::<String>::new(),
        "QEMU keeps backup leftovers"
    );
    let files: Vec<_> = std::fs::read_dir(qsd.workdir())
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(files.is_empty(), "work directory keeps {files:?}");
}

/// A snapshot's manifest as stored.
fn stored_snapshot(env: &Env, id: &str) -> ekko::Snapshot {
    let backend = std::sync::Arc::new(ekko::LocalBackend::new(env.repo.clone()));
    let repo =
        ekko::Repository::open_with_cache(backend, || Ok(PASSWORD.as_bytes().to_vec()), false)
            .unwrap();
    ekko::snapshot::resolve(repo.backend().as_ref(), repo.keys(), id).unwrap()
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn finish(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

#[test]
fn live_full_then_incremental_restores_each_instant() {
    let env = Env::init(&[]);
    let qsd = Qsd::start(2, SIZE);
    let names = ["disk0", "disk1"];
    qsd.write("disk0", 0x11, 0, 3 * MIB);
    qsd.write("disk1", 0x12, 20 * MIB, MIB);
    let refs0 = references(&qsd, &env, &names);

    // No --disk: every writable disk, named after its node.
    let (full, err) = live(&env, &qsd, &[]);
    let gen1 = disk(&full, "disk0")["next_bitmap"]
        .as_str()
        .unwrap()
        .to_string();
    for d in names {
        let j = disk(&full, d);
        assert_eq!(j["mode"], "full", "{j}");
        assert_eq!(j["node"], d);
        assert_eq!(j["next_bitmap"], gen1.as_str(), "one generation for the VM");
        assert_only_generation(&qsd, d, &gen1);
    }
    assert!(err.contains("first backup"), "{err}");
    // Only allocated data is read on a full backup.
    assert_eq!(full["bytes_read"], 4 * MIB, "{full}");
    let repo_id8 = {
        let s = &gen1["ekko-".len()..];
        s.split('-').next().unwrap().to_string()
    };
    assert_eq!(repo_id8.len(), 8, "{gen1}");
    assert_no_leftovers(&qsd);

    // Writes, one of them across a chunk boundary.
    let w0 = [
        (MIB, 64 * 1024),
        (10 * MIB - 64 * 1024, 128 * 1024),
        (63 * MIB, 4096),
    ];
    for (i, &(off, len)) in w0.iter().enumerate() {
        qsd.write("disk0", 0x20 + i as u8, off, len);
    }
    let w1 = [(40 * MIB, 4096)];
    qsd.write("disk1", 0x30, 40 * MIB, 4096);
    let refs1 = references(&qsd, &env, &names);

    let (inc, err) = live(&env, &qsd, &[]);
    assert!(!err.contains("full read"), "{err}");
    assert_eq!(inc["parent"], full["id"]);
    let gen2 = disk(&inc, "disk0")["next_bitmap"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(gen2.starts_with(&format!("ekko-{repo_id8}-")) && gen2 != gen1);
    for (d, w) in [("disk0", &w0[..]), ("disk1", &w1[..])] {
        let j = disk(&inc, d);
        assert_eq!(j["mode"], "incremental", "{j}");
        assert_eq!(j["reason"], Value::Null, "{j}");
        assert_eq!(j["bitmap"], gen1.as_str(), "{j}");
        assert_eq!(j["next_bitmap"], gen2.as_str(), "{j}");
        // The bitmap's granularity is 64 KiB: a 4 KiB write dirties 64 KiB.
        let dirty: u64 = w.iter().map(|&(_, len)| len.max(64 * 1024)).sum();
        assert_eq!(j["dirty_bytes"], dirty, "{j}");
        assert_eq!(j["bytes_read"], chunk_bytes(w), "{j}");
        // The old generation is gone, the new one records.
        assert_only_generation(&qsd, d, &gen2);
    }
    assert_eq!(inc["bytes_read"], 5 * MIB, "{inc}");
    for k in ["cpu_seconds", "peak_rss_bytes", "duration_seconds"] {
        assert!(inc[k].as_f64().unwrap() > 0.0, "{k}: {inc}");
    }
    assert_no_leftovers(&qsd);

    let full_id = full["id"].as_str().unwrap();
    let inc_id = inc["id"].as_str().unwrap();
    assert_restores(&env, full_id, &names, &refs0);
    assert_restores(&env, inc_id, &names, &refs1);
    let stored = stored_snapshot(&env, inc_id);
    let d0 = stored.disk("disk0").unwrap();
    assert_eq!(d0.capture.mode, ekko::snapshot::CaptureMode::Incremental);
    assert_eq!(d0.capture.bitmap.as_deref(), Some(gen1.as_str()));
    assert_eq!(d0.capture.next_bitmap.as_deref(), Some(gen2.as_str()));
    assert_eq!(d0.capture.reason, None);
    env.ok(&["check", "--read-data"]);
}

/// With chunks smaller than a read request, reader threads read
/// neighbouring blocks together and split them again: every block must
/// land where it belongs, across gaps, odd offsets and the disk's end.
#[test]
fn small_chunks_read_together_restore_exactly() {
    const K64: u64 = 64 * 1024;
    let env = Env::init(&["--chunk-size", "64K"]);
    let qsd = Qsd::start(1, SIZE);
    let names = ["disk0"];
    // 3 MiB of distinct blocks, five blocks with holes between, the last block.
    let mut w0: Vec<(u8, u64, u64)> = (0..48u8)
        .map(|i| (i + 1, 4 * MIB + u64::from(i) * K64, K64))
        .collect();
    w0.extend((0..5u8).map(|i| (0x80 + i, 20 * MIB + 2 * u64::from(i) * K64, K64)));
    w0.push((0xfe, SIZE - K64, K64));
    qsd.write_each("disk0", &w0);
    let refs0 = references(&qsd, &env, &names);
    let (full, _) = live(&env, &qsd, &[]);
    assert_eq!(disk(&full, "disk0")["mode"], "full", "{full}");
    assert_eq!(full["bytes_read"], 54 * K64, "{full}");

    // Rewrites off the block edges, into a hole, and a fresh 9-block run.
    let w1 = [
        (0x41, 4 * MIB + 3 * K64 + 100, 5 * K64),
        (0x42, 20 * MIB + K64, K64),
        (0x43, 30 * MIB, 9 * K64),
    ];
    qsd.write_each("disk0", &w1);
    let refs1 = references(&qsd, &env, &names);
    let (inc, _) = live(&env, &qsd, &[]);
    assert_eq!(disk(&inc, "disk0")["mode"], "incremental", "{inc}");
    // Blocks 3..=8 of the first run, one, and nine.
    assert_eq!(inc["bytes_read"], 16 * K64, "{inc}");

    assert_restores(&env, full["id"].as_str().unwrap(), &names, &refs0);
    assert_restores(&env, inc["id"].as_str().unwrap(), &names, &refs1);
    env.ok(&["check", "--read-data"]);
}

#[test]
fn writes_during_an_incremental_do_not_leak_into_it() {
    let env = Env::init(&[]);
    let qsd = Qsd::start(2, SIZE);
    let names = ["disk0", "disk1"];
    live(&env, &qsd, &[]);
    // 8 dirty chunks on disk0, 4 on disk1: ~3 s at 4 MB/s.
    qsd.write("disk0", 0x31, 4 * MIB, 8 * MIB);
    qsd.write("disk1", 0x32, 30 * MIB, 4 * MIB);
    let refs = references(&qsd, &env, &names);

    let limit = 4_000_000.0;
    let mut child = spawn_live(&env, &qsd, &["--rate-limit", "4"]);
    wait_for_session(&qsd, &mut child);
    // The guest keeps writing, over blocks not read yet and elsewhere.
    qsd.write("disk0", 0x66, 11 * MIB, MIB);
    qsd.write("disk0", 0x67, 50 * MIB, MIB);
    qsd.write("disk1", 0x68, 33 * MIB, MIB);
    qsd.write("disk1", 0x69, 0, 64 * 1024);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup should still be reading"
    );
    let out = finish(child);
    assert_success(&out, &["backup", "--rate-limit"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for d in names {
        assert_eq!(disk(&v, d)["mode"], "incremental", "{v}");
    }
    assert_eq!(disk(&v, "disk0")["bytes_read"], 8 * MIB, "{v}");
    assert_eq!(disk(&v, "disk1")["bytes_read"], 4 * MIB, "{v}");
    assert_restores(&env, v["id"].as_str().unwrap(), &names, &refs);

    // The rate limit holds: never faster than the cap.
    let secs = v["duration_seconds"].as_f64().unwrap();
    let rate = v["bytes_read"].as_f64().unwrap() / secs;
    assert!(
        rate <= limit * 1.05,
        "read at {rate} B/s with a {limit} B/s cap"
    );
    assert!(
        rate >= limit * 0.5,
        "read at only {rate} B/s with a {limit} B/s cap"
    );

    // The writes made during the backup are in the next one.
    let refs2 = references(&qsd, &env, &names);
    let (v2, _) = live(&env, &qsd, &[]);
    assert_eq!(disk(&v2, "disk0")["bytes_read"], 2 * MIB, "{v2}");
    assert_eq!(disk(&v2, "disk1")["bytes_read"], 2 * MIB, "{v2}");
    assert_restores(&env, v2["id"].as_str().unwrap(), &names, &refs2);
    assert_no_leftovers(&qsd);
}

#[test]
fn two_disks_are_captured_at_one_instant() {
    let env = Env::init(&[]);
    let qsd = Qsd::start(2, SIZE);
    let names = ["disk0", "disk1"];
    qsd.write("disk0", 0x41, 0, 6 * MIB);
    qsd.write("disk1", 0x42, 8 * MIB, 2 * MIB);
    let refs = references(&qsd, &env, &names);

    // disk1 is read ~1.5 s after the instant; writes to both meanwhile.
    let mut child = spawn_live(&env, &qsd, &["--rate-limit", "4"]);
    wait_for_session(&qsd, &mut child);
    qsd.write("disk1", 0x51, 9 * MIB, MIB);
    qsd.write("disk0", 0x52, 5 * MIB, MIB);
    qsd.write("disk1", 0x53, 30 * MIB, MIB);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup should still be reading"
    );
    let out = finish(child);
    assert_success(&out, &["backup"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_restores(&env, v["id"].as_str().unwrap(), &names, &refs);
    assert_no_leftovers(&qsd);
}

#[test]
fn deleted_or_inconsistent_bitmap_gives_a_correct_full_read() {
    let env = Env::init(&[]);
    let mut qsd = Qsd::start(2, SIZE);
    let names = ["disk0", "disk1"];
    qsd.write("disk0", 0x11, 0, 2 * MIB);
    let (a, _) = live(&env, &qsd, &[]);
    let gen_a = disk(&a, "disk0")["next_bitmap"]
        .as_str()
        .unwrap()
        .to_string();

    // Deleted on one disk: both disks are read in full (one generation).
    qsd.qmp()
        .execute(
            "block-dirty-bitmap-remove",
            json!({ "node": "disk0", "name": gen_a }),
        )
        .unwrap();
    qsd.write("disk0", 0x12, 5 * MIB, MIB);
    qsd.write("disk1", 0x13, 7 * MIB, MIB);
    let refs = references(&qsd, &env, &names);
    let (b, err) = live(&env, &qsd, &[]);
    assert!(
        err.contains("disk disk0: full read: bitmap missing"),
        "{err}"
    );
    let j0 = disk(&b, "disk0");
    assert_eq!(j0["mode"], "full");
    assert!(j0["reason"].as_str().unwrap().contains(&gen_a), "{j0}");
    let j1 = disk(&b, "disk1");
    assert_eq!(j1["mode"], "full");
    assert!(
        j1["reason"].as_str().unwrap().contains("disk disk0"),
        "{j1}"
    );
    assert_restores(&env, b["id"].as_str().unwrap(), &names, &refs);
    // disk1's stale generation was removed after the commit.
    let gen_b = j0["next_bitmap"].as_str().unwrap().to_string();
    for d in names {
        assert_only_generation(&qsd, d, &gen_b);
    }
    let stored = stored_snapshot(&env, b["id"].as_str().unwrap());
    let reason = stored
        .disk("disk0")
        .unwrap()
        .capture
        .reason
        .clone()
        .unwrap();
    assert!(reason.starts_with("bitmap missing"), "{reason}");

    // The next one is incremental again.
    qsd.write("disk0", 0x14, 9 * MIB, 4096);
    let refs = references(&qsd, &env, &names);
    let (c, _) = live(&env, &qsd, &[]);
    assert_eq!(disk(&c, "disk0")["mode"], "incremental", "{c}");
    assert_eq!(c["bytes_read"], MIB, "{c}");
    assert_restores(&env, c["id"].as_str().unwrap(), &names, &refs);

    // Inconsistent: stored cleanly, loaded (marked in use), then the daemon
    // dies uncleanly.
    qsd.quit();
    qsd.restart();
    qsd.kill();
    qsd.restart();
    let gen_c = disk(&c, "disk0")["next_bitmap"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(qsd
        .bitmaps("disk0")
        .iter()
        .any(|b| b.name == gen_c && b.inconsistent));
    qsd.write("disk1", 0x15, 11 * MIB, MIB);
    let refs = references(&qsd, &env, &names);
    let (d, err) = live(&env, &qsd, &[]);
    assert!(err.contains("full read: bitmap inconsistent"), "{err}");
    for n in names {
        assert_eq!(disk(&d, n)["mode"], "full", "{d}");
    }
    assert_restores(&env, d["id"].as_str().unwrap(), &names, &refs);
    let gen_d = disk(&d, "disk0")["next_bitmap"]
        .as_str()
        .unwrap()
        .to_string();
    for n in names {
        assert_only_generation(&qsd, n, &gen_d);
    }
    qsd.write("disk1", 0x16, 12 * MIB, MIB);
    let refs = references(&qsd, &env, &names);
    let (e, _) = live(&env, &qsd, &[]);
    assert_eq!(disk(&e, "disk1")["mode"], "incremental", "{e}");
    assert_eq!(e["bytes_read"], MIB, "{e}");
    assert_restores(&env, e["id"].as_str().unwrap(), &names, &refs);
    assert_no_leftovers(&qsd);
}

#[test]
fn killed_qemu_during_a_backup_is_a_clean_error() {
    let env = Env::init(&[]);
    let mut qsd = Qsd::start(1, SIZE);
    qsd.write("disk0", 0x11, 0, 4 * MIB);
    let refs_a = references(&qsd, &env, &["disk0"]);
    let (a, _) = live(&env, &qsd, &[]);
    qsd.write("disk0", 0x12, 8 * MIB, 8 * MIB);

    let mut child = spawn_live(&env, &qsd, &["--rate-limit", "2"]);
    wait_for_session(&qsd, &mut child);
    std::thread::sleep(Duration::from_millis(300));
    qsd.kill();
    let t = Instant::now();
    let out = finish(child);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "ekko took {:?} to notice",
        t.elapsed()
    );
    let err = assert_clean_failure(&out, "exited during the backup");
    assert!(err.contains("nothing was committed"), "{err}");
    assert!(out.stdout.is_empty());

    // The repository is unharmed.
    env.ok(&["check", "--read-data"]);
    assert_restores(&env, a["id"].as_str().unwrap(), &["disk0"], &refs_a);
    let snaps: Value = serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1);

    // QEMU again: its unclean stop lost the generation, so a full read.
    qsd.restart();
    let refs = references(&qsd, &env, &["disk0"]);
    let (b, err) = live(&env, &qsd, &[]);
    assert_eq!(disk(&b, "disk0")["mode"], "full", "{b}");
    assert!(err.contains("full read: bitmap"), "{err}");
    assert_restores(&env, b["id"].as_str().unwrap(), &["disk0"], &refs);
    assert_no_leftovers(&qsd);
}

#[test]
fn failures_leave_qemu_as_it_was_and_the_generation_usable() {
    let env = Env::init(&[]);
    let qsd = Qsd::start(2, SIZE);
    let names = ["disk0", "disk1"];
    qsd.write("disk0", 0x11, 0, 2 * MIB);
    let (a, _) = live(
        &env,
        &qsd,
        &["--disk", "disk0=disk0", "--disk", "disk1=disk1"],
    );
    let gen_a = disk(&a, "disk0")["next_bitmap"]
        .as_str()
        .unwrap()
        .to_string();

    // A node QEMU does not have: refused before anything changes.
    let out = env.run(&live_args(
        &qsd,
        &["--disk", "disk0=disk0", "--disk", "disk1=nope"],
    ));
    let err = assert_clean_failure(&out, "\"nope\"");
    assert!(err.contains("disk0, disk1"), "should list the disks: {err}");
    assert_no_leftovers(&qsd);
    for d in names {
        assert_only_generation(&qsd, d, &gen_a);
    }

    // A raw node, where QEMU cannot keep a persistent bitmap: refused
    // before anything changes, with the way out.
    let raw = qsd.dir.path().join("raw.img");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    qsd.qmp()
        .execute(
            "blockdev-add",
            json!({ "driver": "raw", "node-name": "raw0",
                    "file": { "driver": "file", "filename": raw } }),
        )
        .unwrap();
    let out = env.run(&live_args(
        &qsd,
        &["--disk", "disk0=disk0", "--disk", "r=raw0"],
    ));
    let err = assert_clean_failure(&out, "only in qcow2 images");
    assert!(err.contains("--disk NAME=NODE"), "{err}");
    qsd.qmp()
        .execute("blockdev-del", json!({ "node-name": "raw0" }))
        .unwrap();
    assert_no_leftovers(&qsd);
    for d in names {
        assert_only_generation(&qsd, d, &gen_a);
    }

    // Interrupted while reading, by SIGTERM and by SIGINT, with guest
    // writes before and during each attempt.
    let mut written = vec![(4 * MIB, 4 * MIB)];
    qsd.write("disk0", 0x21, 4 * MIB, 4 * MIB);
    for (i, sig) in [libc::SIGTERM, libc::SIGINT].into_iter().enumerate() {
        let mut child = spawn_live(&env, &qsd, &["--rate-limit", "1"]);
        wait_for_session(&qsd, &mut child);
        let off = (20 + 4 * i as u64) * MIB;
        qsd.write("disk0", 0x30 + i as u8, off, 64 * 1024);
        written.push((off, 64 * 1024));
        std::thread::sleep(Duration::from_millis(200));
        signal(&child, sig);
        let out = finish(child);
        let err = assert_clean_failure(&out, "interrupted");
        assert!(err.contains("nothing was committed"), "{err}");
        assert_no_leftovers(&qsd);
        for d in names {
            assert_only_generation(&qsd, d, &gen_a);
        }
    }

    // The previous generation still covers everything since snapshot a.
    let refs = references(&qsd, &env, &names);
    let (b, err) = live(&env, &qsd, &[]);
    assert!(!err.contains("full read"), "{err}");
    let j = disk(&b, "disk0");
    assert_eq!(j["mode"], "incremental", "{b}");
    assert_eq!(j["bitmap"], gen_a.as_str(), "{b}");
    assert_eq!(j["bytes_read"], chunk_bytes(&written), "{b}");
    assert_eq!(disk(&b, "disk1")["bytes_read"], 0, "{b}");
    assert_restores(&env, b["id"].as_str().unwrap(), &names, &refs);
    assert_eq!(b["parent"], a["id"]);
    assert_no_leftovers(&qsd);
}

#[test]
fn killed_ekko_is_cleaned_up_by_the_next_backup() {
    let env = Env::init(&[]);
    let qsd = Qsd::start(1, SIZE);
    qsd.write("disk0", 0x11, 0, 2 * MIB);
    live(&env, &qsd, &[]);
    // Bitmaps of other tools and repositories are never touched.
    let mut q = qsd.qmp();
    for name in ["user-bm", "ekko-zzzzzzzz-other"] {
        q.execute(
            "block-dirty-bitmap-add",
            json!({ "node": "disk0", "name": name, "persistent": true }),
        )
        .unwrap();
    }
    drop(q);
    qsd.write("disk0", 0x12, 4 * MIB, 4 * MIB);

    let mut child = spawn_live(&env, &qsd, &["--rate-limit", "1"]);
    wait_for_session(&qsd, &mut child);
    signal(&child, libc::SIGKILL);
    finish(child);
    assert!(
        !qsd.leftovers().is_empty(),
        "a killed backup should leave its session"
    );

    let refs = references(&qsd, &env, &["disk0"]);
    let (b, err) = live(&env, &qsd, &[]);
    // The dead session disabled the generation: it cannot be trusted.
    assert!(err.contains("full read: bitmap disabled"), "{err}");
    assert_eq!(disk(&b, "disk0")["mode"], "full");
    assert_restores(&env, b["id"].as_str().unwrap(), &["disk0"], &refs);
    assert_no_leftovers(&qsd);
    let gen_b = disk(&b, "disk0")["next_bitmap"]
        .as_str()
        .unwrap()
        .to_string();
    assert_only_generation(&qsd, "disk0", &gen_b);
    let mut names: Vec<String> = qsd.bitmaps("disk0").into_iter().map(|b| b.name).collect();
    names.sort();
    let mut want = vec![gen_b, "ekko-zzzzzzzz-other".into(), "user-bm".into()];
    want.sort();
    assert_eq!(names, want);
}

/// A backup stuck on a QEMU that stopped answering (here: SIGSTOPped)
/// cannot finish its first stop, which waits on QEMU; a second SIGTERM
/// ends it at once with status 143, and the next backup, once QEMU
/// answers again, removes what it left and captures the disk correctly.
#[test]
fn a_backup_stuck_on_a_stopped_qemu_ends_on_a_second_signal() {
    let env = Env::init(&[]);
    let qsd = Qsd::start(1, SIZE);
    qsd.write("disk0", 0x21, 0, 2 * MIB);
    let first_refs = references(&qsd, &env, &["disk0"]);
    let (a, _) = live(&env, &qsd, &[]);
    qsd.write("disk0", 0x22, 4 * MIB, 4 * MIB);

    let mut child = spawn_live(&env, &qsd, &["--rate-limit", "1"]);
    wait_for_session(&qsd, &mut child);
    let qsd_pid = libc::pid_t::try_from(qsd.pid()).unwrap();
    // SAFETY: kill(2) on the storage daemon this test started.
    assert_eq!(unsafe { libc::kill(qsd_pid, libc::SIGSTOP) }, 0);
    signal(&child, libc::SIGTERM);
    std::thread::sleep(Duration::from_secs(2));
    let stuck = child.try_wait().unwrap().is_none();
    signal(&child, libc::SIGTERM);
    let sent = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if sent.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            // SAFETY: as above.
            unsafe { libc::kill(qsd_pid, libc::SIGCONT) };
            panic!("ekko still ran 10 s after a second SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(qsd_pid, libc::SIGCONT) }, 0);
    let err = child.wait_with_output_ref();
    assert!(
        stuck,
        "the first SIGTERM should wait on the stopped QEMU: {err}"
    );
    assert_eq!(status.code(), Some(143), "{status}: {err}");
    assert!(
        err.contains("a second Ctrl-C or SIGTERM stops at once"),
        "{err}"
    );

    let refs = references(&qsd, &env, &["disk0"]);
    let (b, _) = live(&env, &qsd, &[]);
    assert_eq!(b["parent"], a["id"], "{b}");
    assert_restores(&env, b["id"].as_str().unwrap(), &["disk0"], &refs);
    assert_restores(&env, a["id"].as_str().unwrap(), &["disk0"], &first_refs);
    assert_no_leftovers(&qsd);
    env.ok(&["check", "--read-data"]);
}

#[test]
fn offline_qcow2_bitmap_reports_dirty_bytes() {
    require("qemu-img");
    require("qemu-io");
    require("qemu-nbd");
    let env = Env::init(&[]);
    let img = env.path("d.qcow2");
    let img_s = img.to_str().unwrap();
    let io = |cmd: &str| {
        run_tool(Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd, img_s]));
    };
    run_tool(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", img_s, "32M"]));
    io("write -P 0x11 0 3M");
    run_tool(Command::new("qemu-img").args(["bitmap", "--add", img_s, "bm0"]));
    let disks = [("sda", img_s)];
    let a = env.backup_json(VM, &disks, &["--bitmap", "bm0"]);
    assert_eq!(disk(&a, "sda")["mode"], "full");
    io("write -P 0x22 1M 64k");
    io("write -P 0x23 20M 128k");
    let b = env.backup_json(VM, &disks, &["--bitmap", "bm0", "--rate-limit", "50"]);
    let j = disk(&b, "sda");
    assert_eq!(j["mode"], "incremental", "{b}");
    assert_eq!(j["dirty_bytes"], 192 * 1024, "{b}");
    assert_eq!(j["bytes_read"], 2 * MIB, "{b}");
    assert_eq!(j["bitmap"], "bm0");
    let raw = env.path("ref.raw");
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw", img_s])
            .arg(&raw),
    );
    let out = env.restore(b["id"].as_str().unwrap(), "sda");
    assert_eq!(sha256_file(&out), sha256_file(&raw));
}

/// A fake qemu-guest-agent that logs each command with the number of jobs
/// QEMU runs at that moment (1 per disk once the instant is taken).
fn fake_agent(qsd: &Qsd) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{Read, Write};
    let path = qsd.dir.path().join("qga.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut q = qsd.qmp();
    let handle = std::thread::spawn(move || {
        let mut log = Vec::new();
        let (mut s, _) = listener.accept().unwrap();
        let (mut pending, mut buf) = (Vec::new(), [0u8; 4096]);
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => return log,
                Ok(n) => n,
            };
            pending.extend(buf[..n].iter().filter(|&&b| b != 0xFF));
            while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let v: Value = serde_json::from_slice(&line).unwrap();
                let cmd = v["execute"].as_str().unwrap().to_string();
                let jobs = q.execute("query-jobs", Value::Null).unwrap();
                log.push(format!("{cmd} jobs={}", jobs.as_array().unwrap().len()));
                let reply = match cmd.as_str() {
                    "guest-sync-delimited" => {
                        s.write_all(&[0xFF]).unwrap(); // the sentinel
                        json!({ "return": v["arguments"]["id"] })
                    }
                    "guest-fsfreeze-freeze" | "guest-fsfreeze-thaw" => json!({ "return": 1 }),
                    _ => json!({ "error": { "class": "CommandNotFound", "desc": cmd } }),
                };
                s.write_all(format!("{reply}\n").as_bytes()).unwrap();
            }
        }
    });
    (path, handle)
}

#[test]
fn fsfreeze_brackets_the_instant() {
    let env = Env::init(&[]);
    let qsd = Qsd::start(1, SIZE);
    qsd.write("disk0", 0x11, 0, MIB);
    let refs = references(&qsd, &env, &["disk0"]);
    let (agent, handle) = fake_agent(&qsd);
    let (v, _) = live(&env, &qsd, &["--fsfreeze", agent.to_str().unwrap()]);
    let log = handle.join().unwrap();
    let freeze = log.iter().position(|l| l == "guest-fsfreeze-freeze jobs=0");
    let thaw = log.iter().position(|l| l == "guest-fsfreeze-thaw jobs=1");
    assert!(
        matches!((freeze, thaw), (Some(f), Some(t)) if f < t),
        "freeze, then the instant, then thaw: {log:?}"
    );
    assert_restores(&env, v["id"].as_str().unwrap(), &["disk0"], &refs);
}

/// QEMU copies each block the guest overwrites during a backup into the
/// fleecing file, and fails the guest's write when it cannot. ekko keeps a
/// reserve of free space in --workdir: below it a backup does not start,
/// and a running backup stops (committing nothing) when the guest's
/// overwrites eat into it, so the guest's writes keep succeeding.
#[test]
fn a_filling_workdir_stops_the_backup_not_the_guest() {
    let env = Env::init(&[]);
    let qsd = Qsd::start(1, 2 * SIZE);
    qsd.write("disk0", 0x21, 0, 2 * SIZE);
    let (first, _) = live(&env, &qsd, &[]);
    let before = env.repo_state();
    let work = env.path("small-work");
    let _tmpfs = TmpfsGuard::mount(&work, "40m");
    let work_s = work.display().to_string();
    let mut args = live_args(&qsd, &["--full", "--rate-limit", "2"]);
    let at = args.iter().position(|a| a == "--workdir").unwrap();
    args[at + 1] = work_s.clone();

    // More reserve than the directory has: the backup does not start.
    let mut big = args.clone();
    big.extend(["--workdir-reserve".into(), "64M".into()]);
    let out = env.run(&big);
    let err = assert_clean_failure(&out, "the backup did not start");
    assert!(err.contains("--workdir-reserve"), "{err}");
    assert_eq!(env.repo_state(), before);

    // A running backup, and a guest that overwrites 60 MiB, 1 MiB at a
    // time: the fleecing file would need more than the 40 MiB there are.
    args.extend(["--workdir-reserve".into(), "12M".into()]);
    let mut child = spawn_ekko(&env, &args);
    wait_for_session(&qsd, &mut child);
    for i in 0..60u64 {
        // Each write must succeed: qsd.write checks qemu-io's answer.
        qsd.write("disk0", 0x40 + u8::try_from(i % 64).unwrap(), i * MIB, MIB);
    }
    let out = finish(child);
    let err = assert_clean_failure(&out, "the backup stopped before the directory filled up");
    assert!(err.contains(&work_s), "{err}");
    assert_eq!(
        env.repo_state(),
        before,
        "a stopped backup changed the repository"
    );
    assert_no_leftovers(&qsd);
    assert!(
        std::fs::read_dir(&work).unwrap().next().is_none(),
        "fleecing files left in {work_s}"
    );

    // QEMU is as it was: the next backup is an incremental of the first
    // one's generation and restores the disk as the guest left it.
    let refs = references(&qsd, &env, &["disk0"]);
    let (v, _) = live(&env, &qsd, &[]);
    assert_eq!(disk(&v, "disk0")["mode"], "incremental", "{v}");
    assert_eq!(v["parent"], first["id"], "{v}");
    assert_restores(&env, v["id"].as_str().unwrap(), &["disk0"], &refs);
}

/// Run `args`, killing ekko (and failing) if it takes longer than `limit`.
fn run_bounded(env: &Env, args: &[String], limit: Duration) -> Output {
    let mut child = spawn_ekko(env, args);
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = finish(child);
            panic!(
                "{args:?} still ran after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    finish(child)
}

/// Servers that take fewer clients than ekko opens connections (QEMU's
/// `max-connections`, qemu-nbd's default of one client, nbdkit's limit
/// filter) leave the extra connections waiting or refuse them: the backup
/// reads over the connections it has, instead of hanging.
#[test]
fn servers_that_take_one_client_are_read_over_one_connection() {
    require("qemu-nbd");
    require("nbdkit");
    let env = Env::init(&[]);
    let qsd = Qsd::start_with(1, SIZE, ",max-connections=1");
    qsd.write("disk0", 0x41, 5 * MIB, 3 * MIB);
    let refs = references(&qsd, &env, &["disk0"]);
    let out = run_bounded(&env, &live_args(&qsd, &[]), Duration::from_secs(60));
    assert_success(&out, &["backup --qmp, max-connections=1"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_restores(&env, v["id"].as_str().unwrap(), &["disk0"], &refs);
    assert_no_leftovers(&qsd);

    // Offline servers, read as nbd+unix:// sources.
    let raw = env.path("plain.raw");
    // A multiple of 512 bytes (QEMU rounds a raw image up to one), not
    // of the chunk size.
    let data = random_bytes(77, 5 * MIB as usize + 12288);
    std::fs::write(&raw, &data).unwrap();
    let raw_s = raw.to_str().unwrap();
    for (name, server) in [
        ("qemu-nbd", vec!["qemu-nbd", "-r", "-f", "raw", "-k"]),
        (
            "nbdkit-limit",
            vec![
                "nbdkit",
                "-f",
                "--filter=limit",
                "file",
                raw_s,
                "limit=1",
                "-U",
            ],
        ),
    ] {
        let sock = env.path(&format!("{name}.sock"));
        let mut cmd = Command::new(server[0]);
        cmd.args(&server[1..]).arg(&sock);
        if name == "qemu-nbd" {
            cmd.arg(raw_s);
        }
        let mut srv = cmd.stdin(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "{name} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let args: Vec<String> = ["backup", "--vm", name, "--disk", &format!("sda={uri}")]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = run_bounded(&env, &args, Duration::from_secs(60));
        let _ = srv.kill();
        let _ = srv.wait();
        assert_success(&out, &[name]);
        let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert_eq!(
            sha256_file(&env.restore(&id, "sda")),
            sha256_file(&raw),
            "{name}"
        );
    }
    env.ok(&["check", "--read-data"]);
}

/// A QEMU whose NBD server listens on TCP (`--nbd-server addr.type=inet`):
/// ekko does not probe QEMU's TCP ports, says to name the server, and
/// reads its exports there once it is named.
#[test]
fn a_qemu_nbd_server_on_tcp_is_used_when_named() {
    let env = Env::init(&[]);
    let qsd = Qsd::start_tcp(1, SIZE);
    qsd.write("disk0", 0x51, 2 * MIB, 5 * MIB);
    let refs = references(&qsd, &env, &["disk0"]);
    let out = env.run(&live_args(&qsd, &[]));
    assert_clean_failure(&out, "--nbd-server IP:PORT");
    assert_no_leftovers(&qsd);
    let server = format!("127.0.0.1:{}", qsd.tcp_port.unwrap());
    let (full, _) = live(&env, &qsd, &["--nbd-server", &server]);
    assert_restores(&env, full["id"].as_str().unwrap(), &["disk0"], &refs);
    qsd.write("disk0", 0x52, 30 * MIB, MIB);
    let refs = references(&qsd, &env, &["disk0"]);
    let (inc, _) = live(&env, &qsd, &["--nbd-server", &server]);
    assert_eq!(disk(&inc, "disk0")["mode"], "incremental", "{inc}");
    assert_restores(&env, inc["id"].as_str().unwrap(), &["disk0"], &refs);
    assert_no_leftovers(&qsd);
}
