//! Fleecing sessions against a real qemu-storage-daemon.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ekko_qmp::{inventory, list_disks, Error, FleeceSession};
use serde_json::{json, Value};

#[test]
fn list_disks_finds_both_disks() {
    let qsd = Qsd::start(true);
    let mut q = qsd.qmp("i");
    let disks = list_disks(&mut q).unwrap();
    let names: Vec<_> = disks.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["disk0", "disk1"]);
    for d in &disks {
        assert_eq!(d.node_name, d.name);
        assert_eq!(d.size, DISK_SIZE);
        assert_eq!(d.driver, "qcow2");
        assert!(d.bitmaps.is_empty());
    }
    assert_eq!(ekko_qmp::node_size(&mut q, "disk1").unwrap(), DISK_SIZE);
    assert!(matches!(
        ekko_qmp::node_size(&mut q, "nope"),
        Err(Error::NodeNotFound { .. })
    ));
}

#[test]
fn full_session_is_point_in_time_and_cleans_up() {
    let qsd = Qsd::start(true);
    qsd.write("disk0", 0x11, 0, MIB);
    qsd.write("disk1", 0x44, 2 * MIB, 64 * 1024);
    let before = [qsd.read_live("disk0"), qsd.read_live("disk1")];

    let cfg = qsd.config("gen1", None);
    let mut s = FleeceSession::start(qsd.qmp("a"), &specs(), &cfg).unwrap();
    assert!(!s.owns_nbd_server(), "the daemon's server must be reused");
    assert_eq!(s.socket(), qsd.nbd_sock.as_deref().unwrap());
    assert_eq!(s.bitmap_context("disk0"), None);
    assert_eq!(s.export_uri("nope"), None);

    // Guest writes after the instant must not show in the exports.
    qsd.write("disk0", 0x33, 0, 512 * 1024);
    qsd.write("disk1", 0x33, 2 * MIB, 4096);
    qsd.write("disk1", 0x55, 40 * MIB, MIB);

    // Disk discovery still sees each disk once, under its own name.
    let mut qi = qsd.qmp("i");
    let disks = list_disks(&mut qi).unwrap();
    let names: Vec<_> = disks.iter().map(|d| d.node_name.as_str()).collect();
    assert_eq!(names, ["disk0", "disk1"]);

    for (i, disk) in ["disk0", "disk1"].iter().enumerate() {
        let uri = s.export_uri(disk).unwrap();
        assert!(uri.starts_with("nbd+unix:///ekko-"), "{uri}");
        assert_eq!(s.disk_size(disk), Some(DISK_SIZE));
        let snap = read_uri(&uri, &qsd.dir.path().join("snap.raw"));
        assert_eq!(snap.len() as u64, DISK_SIZE);
        assert!(
            snap == before[i],
            "{disk}: export differs from the disk at the instant"
        );
        assert!(
            qsd.read_live(disk) != before[i],
            "{disk}: live disk should have changed"
        );
        // allocation-depth context is offered
        assert!(!nbd_map(&uri, "qemu:allocation-depth").is_empty());
    }
    let workdir = cfg.workdir.clone();
    assert_eq!(
        files_in(&workdir)
            .iter()
            .filter(|f| f.ends_with(".fleece.raw"))
            .count(),
        2
    );
    let _ = s.qmp().execute("query-block-jobs", Value::Null).unwrap();

    s.finish(true).unwrap();
    assert_eq!(leftovers(&mut qi), Vec::<String>::new());
    assert_eq!(files_in(&workdir), Vec::<String>::new());
    // the writable exports are back on the disks themselves
    let exports = qi.execute("query-block-exports", Value::Null).unwrap();
    assert_eq!(exports.as_array().unwrap().len(), 2);
    for d in ["disk0", "disk1"] {
        let b = bitmap(&mut qi, d, "gen1").expect("gen1 exists");
        assert!(b.recording && b.persistent && !b.busy && !b.inconsistent);
        // it recorded the writes made during the session
        assert!(b.count > 0, "{d}: {b:?}");
    }
}

#[test]
fn incremental_session_exports_dirty_extents() {
    let qsd = Qsd::start(true);
    let s = FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen1", None)).unwrap();
    s.finish(true).unwrap();

    qsd.write("disk0", 0x22, MIB, 64 * 1024);

    let s =
        FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen2", Some("gen1"))).unwrap();
    assert_eq!(
        s.bitmap_context("disk0").as_deref(),
        Some("qemu:dirty-bitmap:gen1")
    );
    // writes after the instant go to gen2, not to the exported gen1
    qsd.write("disk0", 0x66, 8 * MIB, 64 * 1024);
    let uri0 = s.export_uri("disk0").unwrap();
    let uri1 = s.export_uri("disk1").unwrap();
    assert_eq!(dirty_extents(&uri0, "gen1"), vec![(MIB, 64 * 1024)]);
    assert_eq!(dirty_extents(&uri1, "gen1"), vec![]);
    let snap = read_uri(&uri0, &qsd.dir.path().join("snap.raw"));
    let mib = 1usize << 20;
    assert!(snap[mib..mib + 65536].iter().all(|&b| b == 0x22));
    assert!(snap[8 * mib..].iter().all(|&b| b == 0));
    s.finish(true).unwrap();

    let mut qi = qsd.qmp("i");
    assert_eq!(leftovers(&mut qi), Vec::<String>::new());
    for d in ["disk0", "disk1"] {
        assert!(bitmap(&mut qi, d, "gen1").is_none(), "gen1 must be removed");
        let b = bitmap(&mut qi, d, "gen2").expect("gen2 exists");
        assert!(b.recording && b.persistent);
    }
    assert_eq!(bitmap(&mut qi, "disk0", "gen2").unwrap().count, 64 * 1024);
}

#[test]
fn failed_sessions_keep_the_committed_bitmap_covering_all_writes() {
    let qsd = Qsd::start(true);
    let mut qi = qsd.qmp("i");
    FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen1", None))
        .unwrap()
        .finish(true)
        .unwrap();
    qsd.write("disk0", 0x01, 0, 64 * 1024); // A
    FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen2", Some("gen1")))
        .unwrap()
        .finish(true)
        .unwrap();
    qsd.write("disk0", 0x02, 4 * MIB, 64 * 1024); // B

    // A failed backup: finish(false), with a write during the session.
    let s =
        FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen3", Some("gen2"))).unwrap();
    qsd.write("disk0", 0x03, 8 * MIB, 64 * 1024); // C
    assert!(!bitmap(&mut qi, "disk0", "gen2").unwrap().recording);
    s.finish(false).unwrap();
    assert_eq!(leftovers(&mut qi), Vec::<String>::new());
    assert_eq!(files_in(&qsd.workdir("work")), Vec::<String>::new());
    for d in ["disk0", "disk1"] {
        assert!(bitmap(&mut qi, d, "gen3").is_none());
        let b = bitmap(&mut qi, d, "gen2").unwrap();
        assert!(b.recording && !b.busy, "{b:?}");
    }

    // A failed backup by drop.
    let s =
        FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen3", Some("gen2"))).unwrap();
    qsd.write("disk0", 0x04, 12 * MIB, 64 * 1024); // D
    drop(s);
    assert_eq!(leftovers(&mut qi), Vec::<String>::new());
    assert!(bitmap(&mut qi, "disk0", "gen3").is_none());
    assert!(bitmap(&mut qi, "disk0", "gen2").unwrap().recording);

    // The retry sees every write since the last committed backup: B, C, D.
    let s =
        FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen3", Some("gen2"))).unwrap();
    let uri = s.export_uri("disk0").unwrap();
    assert_eq!(
        dirty_extents(&uri, "gen2"),
        vec![
            (4 * MIB, 64 * 1024),
            (8 * MIB, 64 * 1024),
            (12 * MIB, 64 * 1024)
        ]
    );
    s.finish(true).unwrap();

    // A failed full backup removes its new generation.
    let s = FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("full9", None)).unwrap();
    s.finish(false).unwrap();
    assert!(bitmap(&mut qi, "disk0", "full9").is_none());
    assert!(bitmap(&mut qi, "disk0", "gen3").unwrap().recording);
    assert_eq!(leftovers(&mut qi), Vec::<String>::new());
}

/// Asserts that a refused start changed nothing.
fn assert_untouched(qsd: &Qsd, qi: &mut ekko_qmp::Qmp, new: &str) {
    assert_eq!(leftovers(qi), Vec::<String>::new());
    for d in ["disk0", "disk1"] {
        assert!(bitmap(qi, d, new).is_none(), "{d}: {new} must not exist");
    }
    assert_eq!(files_in(&qsd.workdir("work")), Vec::<String>::new());
}

#[test]
fn unusable_bitmaps_are_refused_before_any_change() {
    let mut qsd = Qsd::start(true);
    let mut qi = qsd.qmp("i");

    // Missing.
    let err = FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen2", Some("gen1")))
        .unwrap_err();
    match &err {
        Error::BitmapUnusable { disk, bitmap, .. } => {
            assert_eq!(disk, "disk0");
            assert_eq!(bitmap, "gen1");
        }
        e => panic!("expected BitmapUnusable, got {e}"),
    }
    assert!(err.to_string().contains("full backup"), "{err}");
    assert_untouched(&qsd, &mut qi, "gen2");

    FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen1", None))
        .unwrap()
        .finish(true)
        .unwrap();

    // New generation name already taken.
    let err = FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen1", None)).unwrap_err();
    assert!(matches!(err, Error::BitmapExists { .. }), "{err}");
    // Same name twice.
    let err = FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen1", Some("gen1")))
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    // Unknown node.
    let mut bad = specs();
    bad[1].node = "nope".into();
    let err =
        FleeceSession::start(qsd.qmp("a"), &bad, &qsd.config("gen2", Some("gen1"))).unwrap_err();
    assert!(matches!(err, Error::NodeNotFound { .. }), "{err}");
    assert_untouched(&qsd, &mut qi, "gen2");

    // Disabled (e.g. by a session whose process was killed).
    qi.execute(
        "block-dirty-bitmap-disable",
        json!({ "node": "disk1", "name": "gen1" }),
    )
    .unwrap();
    let err = FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen2", Some("gen1")))
        .unwrap_err();
    match &err {
        Error::BitmapUnusable { disk, reason, .. } => {
            assert_eq!(disk, "disk1");
            assert!(reason.contains("disabled"), "{reason}");
        }
        e => panic!("expected BitmapUnusable, got {e}"),
    }
    assert_untouched(&qsd, &mut qi, "gen2");
    qi.execute(
        "block-dirty-bitmap-enable",
        json!({ "node": "disk1", "name": "gen1" }),
    )
    .unwrap();
    drop(qi);

    // Inconsistent: stored cleanly, loaded (marked in use), then the daemon
    // dies uncleanly.
    qsd.quit();
    qsd.restart();
    qsd.kill();
    qsd.restart();
    let mut qi = qsd.qmp("i");
    assert!(bitmap(&mut qi, "disk0", "gen1").unwrap().inconsistent);
    let err = FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen2", Some("gen1")))
        .unwrap_err();
    match &err {
        Error::BitmapUnusable { reason, .. } => {
            assert!(reason.contains("inconsistent"), "{reason}")
        }
        e => panic!("expected BitmapUnusable, got {e}"),
    }
    assert_untouched(&qsd, &mut qi, "gen2");
    // The only way out: remove it and take a full backup.
    for d in ["disk0", "disk1"] {
        inventory::remove_bitmap(&mut qi, d, "gen1").unwrap();
    }
    FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen2", None))
        .unwrap()
        .finish(true)
        .unwrap();
}

#[test]
fn dead_daemon_makes_finish_fail_fast() {
    let mut qsd = Qsd::start(true);
    let s = FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen1", None)).unwrap();
    let work = qsd.workdir("work");
    qsd.kill();
    let t = Instant::now();
    let err = s.finish(true).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(err.is_disconnected(), "{err}");
    // QEMU is gone, so its fleece images are garbage and removed.
    assert_eq!(files_in(&work), Vec::<String>::new());

    // Drop of a session on a dead daemon does not hang or panic either.
    let mut qsd = Qsd::start(true);
    let s = FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen1", None)).unwrap();
    qsd.kill();
    let t = Instant::now();
    drop(s);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn session_starts_and_stops_its_own_nbd_server() {
    let qsd = Qsd::start(false);
    let mut qi = qsd.qmp("i");
    let cfg = qsd.config("gen1", None);
    let s = FleeceSession::start(qsd.qmp("a"), &specs(), &cfg).unwrap();
    assert!(s.owns_nbd_server());
    assert!(s.socket().starts_with(cfg.workdir.canonicalize().unwrap()));
    let size = run(
        std::process::Command::new("nbdinfo").args(["--size", &s.export_uri("disk1").unwrap()])
    );
    assert_eq!(String::from_utf8_lossy(&size).trim(), DISK_SIZE.to_string());
    let sock = s.socket().to_path_buf();
    s.finish(true).unwrap();
    assert!(!sock.exists());
    assert_eq!(leftovers(&mut qi), Vec::<String>::new());
    // The server is stopped: a new one can be started.
    let p = qsd.dir.path().join("x.sock");
    qi.execute(
        "nbd-server-start",
        json!({ "addr": { "type": "unix", "data": { "path": p } } }),
    )
    .unwrap();
    qi.execute("nbd-server-stop", Value::Null).unwrap();
}

#[test]
fn concurrent_sessions_on_different_disks() {
    let qsd = Qsd::start(true);
    let specs = specs();
    let s0 = FleeceSession::start(qsd.qmp("a"), &specs[..1], &qsd.config("g0", None)).unwrap();
    let s1 = FleeceSession::start(qsd.qmp("b"), &specs[1..], &qsd.config("g1", None)).unwrap();
    assert_ne!(s0.tag(), s1.tag());
    assert_eq!(s0.socket(), s1.socket());
    for (s, d) in [(&s0, "disk0"), (&s1, "disk1")] {
        let size =
            run(std::process::Command::new("nbdinfo").args(["--size", &s.export_uri(d).unwrap()]));
        assert_eq!(String::from_utf8_lossy(&size).trim(), DISK_SIZE.to_string());
    }
    s1.finish(false).unwrap();
    s0.finish(true).unwrap();
    let mut qi = qsd.qmp("i");
    assert_eq!(leftovers(&mut qi), Vec::<String>::new());
    assert!(bitmap(&mut qi, "disk0", "g0").is_some());
    assert!(bitmap(&mut qi, "disk1", "g1").is_none());
}

/// Child role of `cleanup_removes_leftovers_of_dead_sessions`: start a
/// session, say so, and wait to be killed.
fn child_session_then_hang(qmp: &str, work: &str) -> ! {
    let cfg = ekko_qmp::SessionConfig::new(work, "gen1", None);
    let s = FleeceSession::start(ekko_qmp::Qmp::connect(qmp).unwrap(), &specs(), &cfg).unwrap();
    println!("\nSESSION-READY {}", s.tag());
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn cleanup_removes_leftovers_of_dead_sessions() {
    if let Ok(qmp) = std::env::var("EKKO_QMP_TEST_CHILD_QMP") {
        child_session_then_hang(&qmp, &std::env::var("EKKO_QMP_TEST_CHILD_WORK").unwrap());
    }
    let qsd = Qsd::start(false);
    let work = qsd.workdir("work");
    // A backup process (this test binary again) killed mid-session.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "cleanup_removes_leftovers_of_dead_sessions",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("EKKO_QMP_TEST_CHILD_QMP", qsd.qmp_path("a"))
        .env("EKKO_QMP_TEST_CHILD_WORK", &work)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "child exited before starting its session");
        if line.starts_with("SESSION-READY") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let mut qi = qsd.qmp("i");
    assert!(!leftovers(&mut qi).is_empty());
    assert_eq!(files_in(&work).len(), 3, "{:?}", files_in(&work));

    // A live session of this process (here on a disk the dead one also
    // captured: QEMU stacks the filters) is never touched.
    let live =
        FleeceSession::start(qsd.qmp("b"), &specs()[1..], &qsd.config("mine", None)).unwrap();

    let r = ekko_qmp::cleanup_stale(&mut qi).unwrap();
    assert_eq!(r.exports.len(), 2, "{r:?}");
    assert_eq!(r.jobs.len(), 2, "{r:?}");
    assert_eq!(r.files.len(), 2, "{r:?}");
    assert!(!r.nbd_server_stopped, "the live session uses it: {r:?}");
    assert_eq!(files_in(&work).len(), 2, "{:?}", files_in(&work)); // live + socket
    let size =
        run(std::process::Command::new("nbdinfo")
            .args(["--size", &live.export_uri("disk1").unwrap()]));
    assert_eq!(String::from_utf8_lossy(&size).trim(), DISK_SIZE.to_string());
    live.finish(true).unwrap();

    // The dead session's NBD server goes once nothing uses it.
    let r = ekko_qmp::cleanup_stale(&mut qi).unwrap();
    assert!(r.nbd_server_stopped, "{r:?}");
    assert_eq!(leftovers(&mut qi), Vec::<String>::new());
    assert_eq!(files_in(&work), Vec::<String>::new());
    // Idempotent.
    assert!(ekko_qmp::cleanup_stale(&mut qi).unwrap().is_empty());
    // The dead session's bitmap generation is an orphan the caller removes.
    assert!(bitmap(&mut qi, "disk0", "gen1").is_some());
}

#[test]
fn cleanup_removes_a_qcow2_fleece_image_left_by_an_older_ekko() {
    // Before fleece files became raw, a session attached a qcow2 image
    // named `<tag>-<i>.fleece.qcow2`. A dead session's such image must
    // still be detached and deleted; an image not named like ours is only
    // detached.
    let qsd = Qsd::start(false);
    let work = qsd.workdir("work");
    let old = work.join("ekko-4000000-beef-0.fleece.qcow2");
    let foreign = work.join("keep-me.qcow2");
    let mut qi = qsd.qmp("i");
    for (i, path) in [&old, &foreign].into_iter().enumerate() {
        run(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(DISK_SIZE.to_string()));
        qi.execute(
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": format!("ekko-4000000-beef-fl{i}"),
                "file": { "driver": "file", "filename": path },
            }),
        )
        .unwrap();
    }
    let r = ekko_qmp::cleanup_stale_if(&mut qi, |pid| pid == 4_000_000).unwrap();
    assert_eq!(r.nodes.len(), 2, "{r:?}");
    assert_eq!(r.files, vec![old.clone()], "{r:?}");
    assert!(!old.exists());
    assert!(foreign.exists());
    assert_eq!(leftovers(&mut qi), Vec::<String>::new());
}

#[test]
fn a_session_sweeps_unattached_fleece_files_of_dead_sessions() {
    // A backup killed between creating its fleece file and attaching it
    // leaves the file behind; the next session in that folder deletes it.
    let qsd = Qsd::start(true);
    let cfg = qsd.config("gen1", None);
    std::fs::create_dir_all(&cfg.workdir).unwrap();
    let dead = cfg.workdir.join("ekko-4194305-beef-0.fleece.raw"); // above PID_MAX_LIMIT
    let old = cfg.workdir.join("ekko-4194305-beef-1.fleece.qcow2");
    let alive = cfg
        .workdir
        .join(format!("ekko-{}-beef-0.fleece.raw", std::process::id()));
    let other = cfg.workdir.join("ekko-4194305-beef-notes.txt");
    for f in [&dead, &old, &alive, &other] {
        std::fs::write(f, b"x").unwrap();
    }
    let s = FleeceSession::start(qsd.qmp("a"), &specs(), &cfg).unwrap();
    assert!(!dead.exists() && !old.exists());
    assert!(alive.exists() && other.exists());
    s.finish(true).unwrap();
}

#[test]
fn cleanup_spares_live_sessions_of_this_process() {
    let qsd = Qsd::start(true);
    let s = FleeceSession::start(qsd.qmp("a"), &specs(), &qsd.config("gen1", None)).unwrap();
    let mut qi = qsd.qmp("i");
    assert!(ekko_qmp::cleanup_stale(&mut qi).unwrap().is_empty());
    assert!(ekko_qmp::cleanup_stale_if(&mut qi, |_| true)
        .unwrap()
        .is_empty());
    s.finish(true).unwrap();
}

#[test]
fn failure_in_the_transaction_rolls_everything_back() {
    let qsd = Qsd::start(true);
    let mut qi = qsd.qmp("i");
    // A raw image cannot store a persistent bitmap: the transaction fails
    // after the fleece images were created and attached.
    let raw = qsd.dir.path().join("raw.img");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    qi.execute(
        "blockdev-add",
        json!({ "driver": "raw", "node-name": "raw0",
                "file": { "driver": "file", "filename": raw } }),
    )
    .unwrap();
    let disks = list_disks(&mut qi).unwrap();
    assert_eq!(disks.len(), 3, "{disks:?}");
    let mut specs = specs();
    specs.push(ekko_qmp::DiskSpec {
        name: "raw0".into(),
        node: "raw0".into(),
    });
    let err = FleeceSession::start(qsd.qmp("a"), &specs, &qsd.config("gen1", None)).unwrap_err();
    assert_eq!(err.command_class(), Some("GenericError"), "{err}");
    assert!(err.to_string().contains("transaction"), "{err}");
    assert_untouched(&qsd, &mut qi, "gen1");
    let mut nodes: Vec<String> = inventory::named_nodes(&mut qi)
        .unwrap()
        .into_iter()
        .map(|n| n.node_name)
        .filter(|n| !n.starts_with('#'))
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["disk0", "disk1", "file0", "file1", "raw0"]);
}
