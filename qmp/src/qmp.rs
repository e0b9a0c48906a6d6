//! A synchronous QMP client over a Unix socket.
//!
//! Every read has a deadline, so a hung QEMU gives [`Error::Timeout`] and a
//! dead one gives [`Error::Disconnected`]; nothing ever blocks forever.
//! Commands carry an `id`, so a late answer to a command that already timed
//! out is recognised and skipped instead of being taken for the answer to the
//! next command. Asynchronous events that arrive while waiting for an answer
//! are kept in a bounded buffer ([`Qmp::take_events`], [`Qmp::wait_event`]).

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Default time to wait for any answer from QEMU.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The greeting is waited for at most this long: QEMU serves one client per
/// monitor, so a silent monitor usually means another client is connected.
const GREETING_TIMEOUT: Duration = Duration::from_secs(15);

/// Oldest events are dropped beyond this many (sync=none backup jobs emit a
/// pair of JOB_STATUS_CHANGE events on every drain).
const MAX_EVENTS: usize = 4096;

/// A QMP message longer than this is a protocol error.
const MAX_LINE: usize = 64 << 20;

/// A connection to a QEMU monitor, in command mode.
pub struct Qmp {
    stream: UnixStream,
    path: PathBuf,
    rbuf: Vec<u8>,
    events: VecDeque<Value>,
    next_id: u64,
    timeout: Duration,
    peer_pid: Option<u32>,
    version: (u64, u64, u64),
    disconnected: bool,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.path)
            .field("peer_pid", &self.peer_pid)
            .field("version", &self.version)
            .field("buffered_events", &self.events.len())
            .field("disconnected", &self.disconnected)
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub fn connect(path: impl AsRef<Path>) -> Result<Qmp> {
        Self::connect_with_timeout(path, DEFAULT_TIMEOUT)
    }

    /// Like [`Qmp::connect`] with a custom timeout for every answer.
    pub fn connect_with_timeout(path: impl AsRef<Path>, timeout: Duration) -> Result<Qmp> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|source| Error::Connect {
            what: "QMP",
            path: path.clone(),
            source,
        })?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|source| Error::Io {
                context: "setting the write timeout".into(),
                source,
            })?;
        let peer_pid = peer_pid(&stream);
        let mut qmp = Qmp {
            stream,
            path,
            rbuf: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            timeout,
            peer_pid,
            version: (0, 0, 0),
            disconnected: false,
        };
        let wait = timeout.min(GREETING_TIMEOUT);
        let deadline = Instant::now() + wait;
        let greeting = loop {
            let msg = qmp
                .read_message(deadline, "the QMP greeting")
                .map_err(|e| match e {
                    // Say how long it waited for this, not for commands.
                    Error::Timeout { what, .. } => Error::Timeout {
                        what,
                        secs: wait.as_secs(),
                    },
                    e => e,
                })?;
            if msg.get("QMP").is_some() {
                break msg;
            }
            if msg.get("event").is_some() {
                qmp.push_event(msg);
                continue;
            }
            return Err(Error::Protocol(format!(
                "expected a QMP greeting from {}, got {msg}",
                qmp.path.display()
            )));
        };
        let v = &greeting["QMP"]["version"]["qemu"];
        qmp.version = (
            v["major"].as_u64().unwrap_or(0),
            v["minor"].as_u64().unwrap_or(0),
            v["micro"].as_u64().unwrap_or(0),
        );
        qmp.execute("qmp_capabilities", Value::Null)?;
        tracing::debug!(path = %qmp.path.display(), version = ?qmp.version, pid = ?qmp.peer_pid, "QMP connected");
        Ok(qmp)
    }

    /// QEMU version from the greeting, as (major, minor, micro).
    pub fn version(&self) -> (u64, u64, u64) {
        self.version
    }

    /// Path of the monitor socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// PID of the QEMU process on the other end (Linux `SO_PEERCRED`).
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    /// Whether the QEMU process on the other end still exists (not a zombie).
    /// `None` when its PID is unknown.
    pub fn peer_alive(&self) -> Option<bool> {
        self.peer_pid.map(crate::util::pid_alive)
    }

    /// Time to wait for each answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the time to wait for each answer.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        let _ = self.stream.set_write_timeout(Some(timeout));
    }

    /// Runs a command and returns its `return` value.
    ///
    /// `args` is sent as `arguments` unless it is `Value::Null`. A QMP error
    /// answer becomes [`Error::Command`].
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        if self.disconnected {
            return Err(Error::Disconnected {
                context: format!("'{cmd}' (connection already closed)"),
            });
        }
        let id = format!("ekko-{}", self.next_id);
        self.next_id += 1;
        let mut msg = json!({ "execute": cmd, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        tracing::debug!(target: "ekko_qmp::wire", "-> {msg}");
        let mut line = serde_json::to_vec(&msg).map_err(|e| Error::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.send_all(&line, cmd)?;
        let deadline = Instant::now() + self.timeout;
        let what = format!("the answer to '{cmd}'");
        loop {
            let resp = self.read_message(deadline, &what)?;
            if resp.get("event").is_some() {
                self.push_event(resp);
                continue;
            }
            match resp.get("id") {
                Some(Value::String(s)) if *s == id => {}
                // QEMU answers without id only when it could not parse the id.
                None if resp.get("error").is_some() => {}
                _ => {
                    tracing::debug!("skipping stale QMP answer {resp}");
                    continue;
                }
            }
            tracing::debug!(target: "ekko_qmp::wire", "<- {resp}");
            if let Some(ret) = resp.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = resp.get("error") {
                return Err(Error::Command {
                    cmd: cmd.to_string(),
                    class: err["class"].as_str().unwrap_or("Unknown").to_string(),
                    desc: err["desc"].as_str().unwrap_or("").to_string(),
                });
            }
            return Err(Error::Protocol(format!(
                "answer to '{cmd}' has neither return nor error: {resp}"
            )));
        }
    }

    /// Removes and returns the buffered asynchronous events, oldest first.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Waits up to `timeout` for an event that `pred` accepts (looking first
    /// at the buffered ones) and removes it from the buffer.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        if let Some(pos) = self.events.iter().position(&mut pred) {
            return Ok(self.events.remove(pos).expect("position is valid"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let msg = self.read_message(deadline, "a QMP event")?;
            if msg.get("event").is_none() {
                tracing::debug!("skipping stale QMP answer {msg}");
                continue;
            }
            if pred(&msg) {
                return Ok(msg);
            }
            self.push_event(msg);
        }
    }

    fn push_event(&mut self, ev: Value) {
        tracing::trace!(target: "ekko_qmp::wire", "event {ev}");
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }

    fn send_all(&mut self, data: &[u8], cmd: &str) -> Result<()> {
        match crate::util::send_all(&self.stream, data) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(Error::Timeout {
                    what: format!("QEMU to accept command '{cmd}'"),
                    secs: self.timeout.as_secs(),
                })
            }
            Err(e) if is_disconnect(&e) => {
                self.disconnected = true;
                Err(Error::Disconnected {
                    context: format!("sending '{cmd}'"),
                })
            }
            Err(e) => Err(Error::Io {
                context: format!("sending '{cmd}'"),
                source: e,
            }),
        }
    }

    /// Reads one JSON message, waiting at most until `deadline`.
    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Value> {
        loop {
            if let Some(pos) = self.rbuf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.rbuf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_str(text)
                    .map_err(|e| Error::Protocol(format!("invalid JSON from QEMU ({e}): {text}")));
            }
            if self.disconnected {
                return Err(Error::Disconnected {
                    context: format!("waiting for {what}"),
                });
            }
            if self.rbuf.len() > MAX_LINE {
                return Err(Error::Protocol(format!(
                    "QMP message longer than {MAX_LINE} bytes"
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: what.to_string(),
                    secs: self.timeout.as_secs(),
                });
            }
            let left = (deadline - now).max(Duration::from_millis(1));
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| Error::Io {
                    context: "setting the read timeout".into(),
                    source,
                })?;
            let mut buf = [0u8; 16384];
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.disconnected = true;
                    return Err(Error::Disconnected {
                        context: format!("waiting for {what}"),
                    });
                }
                Ok(n) => self.rbuf.extend_from_slice(&buf[..n]),
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut => {}
                    _ if is_disconnect(&e) => {
                        self.disconnected = true;
                        return Err(Error::Disconnected {
                            context: format!("waiting for {what}"),
                        });
                    }
                    _ => {
                        return Err(Error::Io {
                            context: format!("waiting for {what}"),
                            source: e,
                        })
                    }
                },
            }
        }
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

#[cfg(target_os = "linux")]
fn peer_pid(stream: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: cred and len are valid for writes of the given size; the fd is
    // an open Unix socket.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc == 0 && cred.pid > 0 {
        u32::try_from(cred.pid).ok()
    } else {
        None
    }
}

#[cfg(not(target_os = "linux"))]
fn peer_pid(_stream: &UnixStream) -> Option<u32> {
    None
}
