//! The QMP client: errors, events, timeouts, disconnection.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::*;
use ekko_qmp::{Error, Qmp};
use serde_json::{json, Value};

#[test]
fn commands_errors_and_events() {
    let qsd = Qsd::start(true);
    let mut q = qsd.qmp("a");
    assert_eq!(q.version().0, 10);
    assert_eq!(q.peer_pid(), Some(qsd.pid()));
    assert_eq!(q.peer_alive(), Some(true));

    let v = q.execute("query-block-exports", Value::Null).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);

    match q.execute("blockdev-del", json!({ "node-name": "nope" })) {
        Err(Error::Command { cmd, class, desc }) => {
            assert_eq!(cmd, "blockdev-del");
            assert_eq!(class, "GenericError");
            assert!(desc.contains("nope"), "{desc}");
        }
        r => panic!("expected a command error, got {r:?}"),
    }
    let e = q.execute("no-such-command", Value::Null).unwrap_err();
    assert_eq!(e.command_class(), Some("CommandNotFound"));

    // Events that arrive while waiting for answers are kept.
    q.execute("block-export-del", json!({ "id": "rw1", "mode": "hard" }))
        .unwrap();
    let ev = q
        .wait_event(Duration::from_secs(5), |e| {
            e["event"] == "BLOCK_EXPORT_DELETED"
        })
        .unwrap();
    assert_eq!(ev["data"]["id"], "rw1");
    q.execute(
        "block-export-add",
        json!({ "type": "nbd", "id": "rw1", "node-name": "disk1", "name": "disk1", "writable": true }),
    )
    .unwrap();
    q.execute("block-export-del", json!({ "id": "rw1" }))
        .unwrap();
    // This command's answer comes after the event: it is buffered.
    q.execute("query-block-exports", Value::Null).unwrap();
    let evs = q.take_events();
    assert!(
        evs.iter().any(|e| e["event"] == "BLOCK_EXPORT_DELETED"),
        "{evs:?}"
    );
    assert!(q.take_events().is_empty());
}

#[test]
fn dead_daemon_gives_disconnected_not_a_hang() {
    let mut qsd = Qsd::start(false);
    let mut q = qsd.qmp("a");
    qsd.kill();
    let t = Instant::now();
    let e = q.execute("query-block", Value::Null).unwrap_err();
    assert!(matches!(e, Error::Disconnected { .. }), "{e}");
    let e = q.execute("query-block", Value::Null).unwrap_err();
    assert!(matches!(e, Error::Disconnected { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(q.peer_alive(), Some(false));
    assert!(matches!(
        Qmp::connect(qsd.qmp_path("a")),
        Err(Error::Connect { .. })
    ));
}

#[test]
fn silent_peer_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let t = Instant::now();
    let e = Qmp::connect_with_timeout(&path, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
    drop(listener);

    let path = dir.path().join("slow.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // A peer that greets, then answers nothing: commands time out; a late
    // answer to a timed-out command is not taken for the next one.
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 10, \"minor\": 0, \"micro\": 2}}, \"capabilities\": []}}\n").unwrap();
        let mut buf = vec![0u8; 4096];
        let mut seen = String::new();
        let mut answered_caps = false;
        let mut slow_answered = false;
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            while let Some(pos) = seen.find('\n') {
                let line: String = seen.drain(..=pos).collect();
                let v: Value = serde_json::from_str(line.trim()).unwrap();
                let id = v["id"].clone();
                match v["execute"].as_str().unwrap() {
                    "qmp_capabilities" if !answered_caps => {
                        answered_caps = true;
                        s.write_all(format!("{}\n", json!({"return": {}, "id": id})).as_bytes())
                            .unwrap();
                    }
                    "slow" => {} // never answered in time
                    "fast" => {
                        if !slow_answered {
                            // the late answer to "slow", then an event, then ours
                            slow_answered = true;
                            s.write_all(
                                format!("{}\n", json!({"return": "late", "id": "ekko-2"}))
                                    .as_bytes(),
                            )
                            .unwrap();
                        }
                        s.write_all(b"{\"event\": \"X\", \"data\": {}}\n").unwrap();
                        s.write_all(
                            format!("{}\n", json!({"return": "fast", "id": id})).as_bytes(),
                        )
                        .unwrap();
                    }
                    _ => {}
                }
            }
        }
    });
    let mut q = Qmp::connect_with_timeout(&path, Duration::from_millis(300)).unwrap();
    let t = Instant::now();
    let e = q.execute("slow", Value::Null).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(q.execute("fast", Value::Null).unwrap(), json!("fast"));
    assert_eq!(q.take_events().len(), 1);
    drop(q);
    server.join().unwrap();
}
