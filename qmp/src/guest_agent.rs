//! A minimal qemu-guest-agent client, used to freeze guest file systems for
//! the instant of the snapshot.
//!
//! The agent socket is the host end of the `org.qemu.guest_agent.0`
//! virtio-serial channel. Only one client can use it at a time (under libvirt,
//! libvirtd holds it: use `virsh domfsfreeze` there instead).

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// A connection to qemu-guest-agent.
#[derive(Debug)]
pub struct GuestAgent {
    stream: UnixStream,
    path: PathBuf,
    rbuf: Vec<u8>,
    timeout: Duration,
}

fn ga_err(op: &str, detail: impl std::fmt::Display) -> Error {
    Error::GuestAgent {
        op: op.to_string(),
        detail: detail.to_string(),
    }
}

impl GuestAgent {
    /// Connects and synchronises with `guest-sync-delimited`, so that stale
    /// output of an earlier client is discarded.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<GuestAgent> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|source| Error::Connect {
            what: "guest agent",
            path: path.clone(),
            source,
        })?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| ga_err("connect", e))?;
        let mut ga = GuestAgent {
            stream,
            path,
            rbuf: Vec::new(),
            timeout,
        };
        ga.sync()?;
        Ok(ga)
    }

    /// Socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `guest-sync-delimited`: flushes the agent's parser with a 0xFF byte,
    /// then waits for the echo of a fresh id after the 0xFF sentinel.
    pub fn sync(&mut self) -> Result<()> {
        let id = u64::from(std::process::id()) << 20
            | u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_micros())
                    .unwrap_or(0),
            );
        let msg = json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } });
        let mut out = vec![0xFFu8];
        out.extend_from_slice(msg.to_string().as_bytes());
        out.push(b'\n');
        self.write("guest-sync", &out)?;
        let deadline = Instant::now() + self.timeout;
        // Skip everything up to the sentinel, then read answers until ours.
        loop {
            self.fill_until(deadline, "guest-sync", |b| b.contains(&0xFF))?;
            let pos = self
                .rbuf
                .iter()
                .position(|&b| b == 0xFF)
                .expect("sentinel present");
            self.rbuf.drain(..=pos);
            loop {
                let v = self.read_json(deadline, "guest-sync")?;
                if v["return"].as_u64() == Some(id) {
                    return Ok(());
                }
                if self.rbuf.contains(&0xFF) {
                    break;
                }
            }
        }
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let mut msg = json!({ "execute": cmd });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut out = msg.to_string().into_bytes();
        out.push(b'\n');
        self.write(cmd, &out)?;
        let deadline = Instant::now() + self.timeout;
        let v = self.read_json(deadline, cmd)?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = v.get("error") {
            return Err(ga_err(
                cmd,
                format!(
                    "{}: {}",
                    e["class"].as_str().unwrap_or("Error"),
                    e["desc"].as_str().unwrap_or("")
                ),
            ));
        }
        Err(ga_err(cmd, format!("unexpected answer {v}")))
    }

    /// Freezes the guest file systems; returns how many were frozen.
    pub fn fsfreeze_freeze(&mut self) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-freeze", Value::Null)?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// Thaws the guest file systems; returns how many were thawed.
    pub fn fsfreeze_thaw(&mut self) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-thaw", Value::Null)?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `"thawed"` or `"frozen"`.
    pub fn fsfreeze_status(&mut self) -> Result<String> {
        let v = self.execute("guest-fsfreeze-status", Value::Null)?;
        Ok(v.as_str().unwrap_or("").to_string())
    }

    fn write(&mut self, op: &str, data: &[u8]) -> Result<()> {
        crate::util::send_all(&self.stream, data).map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                ga_err(op, format!("no progress writing within {:?}", self.timeout))
            } else {
                ga_err(op, e)
            }
        })
    }

    fn read_json(&mut self, deadline: Instant, op: &str) -> Result<Value> {
        loop {
            self.fill_until(deadline, op, |b| b.contains(&b'\n'))?;
            let pos = self
                .rbuf
                .iter()
                .position(|&b| b == b'\n')
                .expect("newline present");
            let line: Vec<u8> = self.rbuf.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{FFFD}');
            if text.is_empty() {
                continue;
            }
            return serde_json::from_str(text)
                .map_err(|e| ga_err(op, format!("invalid JSON ({e}): {text}")));
        }
    }

    fn fill_until(
        &mut self,
        deadline: Instant,
        op: &str,
        done: impl Fn(&[u8]) -> bool,
    ) -> Result<()> {
        while !done(&self.rbuf) {
            let now = Instant::now();
            if now >= deadline {
                return Err(ga_err(
                    op,
                    format!(
                        "no answer within {:?} (is qemu-guest-agent running in the guest?)",
                        self.timeout
                    ),
                ));
            }
            self.stream
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                .map_err(|e| ga_err(op, e))?;
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(ga_err(op, "the agent socket was closed")),
                Ok(n) => self.rbuf.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(ga_err(op, e)),
            }
        }
        Ok(())
    }
}
