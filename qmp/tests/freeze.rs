//! Guest file-system freeze around the snapshot (with a fake guest agent),
//! and the choice of NBD server socket.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use common::*;
use ekko_qmp::{Error, FleeceSession, GuestAgent};
use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    FailFreeze,
}

/// A fake qemu-guest-agent. At freeze and thaw it records how many backup
/// jobs QEMU runs, which tells whether the transaction came in between.
fn fake_agent(qsd: &Qsd, mode: Mode) -> (PathBuf, Arc<Mutex<Vec<String>>>, JoinHandle<()>) {
    let path = qsd.dir.path().join("qga.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    let qmp_path = qsd.qmp_path("i");
    let handle = std::thread::spawn(move || {
        let mut qi = ekko_qmp::Qmp::connect(&qmp_path).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend(buf[..n].iter().filter(|&&b| b != 0xFF));
            while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let v: Value = serde_json::from_slice(&line).unwrap();
                let cmd = v["execute"].as_str().unwrap().to_string();
                let jobs = qi
                    .execute("query-jobs", Value::Null)
                    .unwrap()
                    .as_array()
                    .unwrap()
                    .len();
                log2.lock().unwrap().push(format!("{cmd} jobs={jobs}"));
                let reply = match cmd.as_str() {
                    "guest-sync-delimited" => {
                        // garbage from an "earlier client" first
                        s.write_all(b"{\"return\": 7}\n").unwrap();
                        s.write_all(&[0xFF]).unwrap();
                        json!({ "return": v["arguments"]["id"] })
                    }
                    "guest-fsfreeze-freeze" if mode == Mode::FailFreeze => {
                        json!({ "error": { "class": "GenericError", "desc": "failed to freeze /: busy" } })
                    }
                    "guest-fsfreeze-freeze" | "guest-fsfreeze-thaw" => json!({ "return": 2 }),
                    "guest-fsfreeze-status" => json!({ "return": "thawed" }),
                    _ => json!({ "error": { "class": "CommandNotFound", "desc": cmd } }),
                };
                s.write_all(format!("{reply}\n").as_bytes()).unwrap();
            }
        }
    });
    (path, log, handle)
}

#[test]
fn freeze_brackets_the_transaction() {
    let qsd = Qsd::start(true);
    let (agent, log, handle) = fake_agent(&qsd, Mode::Ok);
    let mut cfg = qsd.config("gen1", None);
    cfg.freeze = Some(agent);
    let s = FleeceSession::start(qsd.qmp("a"), &specs(), &cfg).unwrap();
    s.finish(true).unwrap();
    handle.join().unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "guest-sync-delimited jobs=0",
            "guest-fsfreeze-freeze jobs=0",
            "guest-fsfreeze-thaw jobs=2"
        ]
    );
}

#[test]
fn failed_freeze_rolls_back_and_thaws() {
    let qsd = Qsd::start(true);
    let (agent, log, handle) = fake_agent(&qsd, Mode::FailFreeze);
    let mut cfg = qsd.config("gen1", None);
    cfg.freeze = Some(agent);
    let err = FleeceSession::start(qsd.qmp("a"), &specs(), &cfg).unwrap_err();
    assert!(matches!(err, Error::GuestAgent { .. }), "{err}");
    assert!(err.to_string().contains("busy"), "{err}");
    handle.join().unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "guest-sync-delimited jobs=0",
            "guest-fsfreeze-freeze jobs=0",
            "guest-fsfreeze-thaw jobs=0"
        ]
    );
    let mut qi = qsd.qmp("i");
    assert_eq!(leftovers(&mut qi), Vec::<String>::new());
    assert!(bitmap(&mut qi, "disk0", "gen1").is_none());
    assert_eq!(files_in(&qsd.workdir("work")), Vec::<String>::new());
}

#[test]
fn guest_agent_client() {
    let qsd = Qsd::start(false);
    let (agent, _log, handle) = fake_agent(&qsd, Mode::Ok);
    let mut ga = GuestAgent::connect(&agent, std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(ga.fsfreeze_status().unwrap(), "thawed");
    assert_eq!(ga.fsfreeze_freeze().unwrap(), 2);
    assert_eq!(ga.fsfreeze_thaw().unwrap(), 2);
    let e = ga.execute("guest-nope", Value::Null).unwrap_err();
    assert!(e.to_string().contains("CommandNotFound"), "{e}");
    drop(ga);
    handle.join().unwrap();
}

#[test]
fn explicit_nbd_socket() {
    let qsd = Qsd::start(true);
    // The daemon's own server, named explicitly.
    let mut cfg = qsd.config("gen1", None);
    cfg.nbd_socket = qsd.nbd_sock.clone();
    let s = FleeceSession::start(qsd.qmp("a"), &specs(), &cfg).unwrap();
    assert!(!s.owns_nbd_server());
    assert_eq!(s.socket(), qsd.nbd_sock.as_deref().unwrap());
    s.finish(false).unwrap();

    // A wrong path for the running server is refused before any change.
    cfg.nbd_socket = Some(qsd.dir.path().join("wrong.sock"));
    let err = FleeceSession::start(qsd.qmp("a"), &specs(), &cfg).unwrap_err();
    assert!(matches!(err, Error::NbdServerUnknown { .. }), "{err}");
    let mut qi = qsd.qmp("i");
    assert_eq!(leftovers(&mut qi), Vec::<String>::new());

    // No server running: the session starts one where asked.
    let qsd = Qsd::start(false);
    let mut cfg = qsd.config("gen1", None);
    let want = qsd.dir.path().join("mine.sock");
    cfg.nbd_socket = Some(want.clone());
    let s = FleeceSession::start(qsd.qmp("a"), &specs(), &cfg).unwrap();
    assert!(s.owns_nbd_server());
    assert_eq!(s.socket(), want);
    assert!(s.export_uri("disk0").unwrap().contains("mine.sock"));
    s.finish(true).unwrap();
    assert!(!want.exists());
}
