//! Locating the Unix socket of an NBD server that QEMU already runs.
//!
//! QEMU has one NBD server per process and QMP cannot tell its address. When
//! `nbd-server-start` fails because a server already runs (e.g.
//! qemu-storage-daemon was started with `--nbd-server`), the socket is found
//! from the outside: the QEMU PID comes from `SO_PEERCRED` on the QMP socket,
//! its listening Unix sockets from `/proc/PID/fd` and `/proc/PID/net/unix`,
//! and the one that greets with the NBD magic (`NBDMAGIC` `IHAVEOPT`) is it.
//! A server on TCP is not looked for: probing QEMU's TCP ports could reach
//! a gdb stub (which stops the VM) or a serial console; its address is
//! given instead, and only checked with `probe_nbd_tcp`.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `__SO_ACCEPTCON` in the Flags column of /proc/net/unix: a listening socket.
const SO_ACCEPTCON: u64 = 0x10000;

/// Whether a Unix socket greets like a newstyle NBD server.
pub fn probe_nbd(path: &Path) -> bool {
    let Some(s) = connect_without_waiting(path) else {
        return false;
    };
    s.set_read_timeout(Some(PROBE_TIMEOUT)).is_ok() && greets_as_nbd(s)
}

/// How long a probe waits for a connection and for the greeting.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// Whether the first bytes read are a newstyle NBD server's greeting
/// (`NBDMAGIC` `IHAVEOPT`).
fn greets_as_nbd(mut s: impl Read) -> bool {
    let mut magic = [0u8; 16];
    s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGICIHAVEOPT"
}

/// Connects to a Unix socket without waiting for room in its listener's
/// queue. A socket whose owner does not accept (a QEMU monitor busy with
/// another client) keeps every connection made to it queued, and once the
/// queue is full a blocking `connect` waits for good; here it fails at
/// once instead.
fn connect_without_waiting(path: &Path) -> Option<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return None;
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).ok()?;
    for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*b]);
    }
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).ok()?;
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes on this stack
    // frame; `fd` is open. A Unix stream connect completes at once or
    // fails (EAGAIN when the queue is full).
    let r = unsafe { libc::connect(fd, std::ptr::from_ref(&addr).cast::<libc::sockaddr>(), len) };
    if r != 0 {
        return None;
    }
    stream.set_nonblocking(false).ok()?;
    Some(stream)
}

/// Whether a TCP listener greets like a newstyle NBD server.
pub fn probe_nbd_tcp(addr: &std::net::SocketAddr) -> bool {
    let Ok(s) = std::net::TcpStream::connect_timeout(addr, PROBE_TIMEOUT) else {
        return false;
    };
    s.set_read_timeout(Some(PROBE_TIMEOUT)).is_ok() && greets_as_nbd(s)
}

/// Finds the NBD server socket of process `pid`, skipping `exclude` (the QMP
/// socket).
pub fn find_nbd_socket(pid: u32, exclude: &Path) -> Result<PathBuf, String> {
    let exclude = exclude
        .canonicalize()
        .unwrap_or_else(|_| exclude.to_path_buf());
    let candidates: Vec<PathBuf> = listening_sockets(pid)?
        .into_iter()
        .filter(|p| *p != exclude)
        .collect();
    // All at once: a socket that does not greet (a monitor busy with
    // another client) costs its probe the whole timeout, and must not
    // delay the answer of the one that does. QEMU runs one NBD server, so
    // the first socket that greets is it; probes still running when it
    // answers end on their own.
    let n = candidates.len();
    let (tx, rx) = std::sync::mpsc::channel();
    for p in candidates {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let greets = probe_nbd(&p);
            let _ = tx.send(greets.then_some(p));
        });
    }
    drop(tx);
    rx.iter().flatten().next().ok_or_else(|| {
        format!("none of the {n} listening Unix socket(s) of QEMU PID {pid} is an NBD server")
    })
}

/// The paths of the Unix sockets process `pid` listens on (not abstract
/// ones), absolute.
pub fn listening_sockets(pid: u32) -> Result<Vec<PathBuf>, String> {
    let inodes = socket_inodes(pid)?;
    let table_path = format!("/proc/{pid}/net/unix");
    let table = std::fs::read_to_string(&table_path)
        .map_err(|e| format!("cannot read {table_path}: {e}"))?;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
    let mut candidates: Vec<PathBuf> = Vec::new();
    for line in table.lines().skip(1) {
        // Num RefCount Protocol Flags Type St Inode [Path]
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 8 {
            continue;
        }
        let flags = u64::from_str_radix(cols[3], 16).unwrap_or(0);
        let Ok(inode) = cols[6].parse::<u64>() else {
            continue;
        };
        if flags & SO_ACCEPTCON == 0 || !inodes.contains(&inode) {
            continue;
        }
        let raw = cols[7..].join(" ");
        if raw.starts_with('@') {
            continue; // abstract socket
        }
        let mut p = PathBuf::from(raw);
        if p.is_relative() {
            match &cwd {
                Some(c) => p = c.join(p),
                None => continue,
            }
        }
        if !candidates.contains(&p) {
            candidates.push(p);
        }
    }
    Ok(candidates)
}

/// The inodes of the sockets process `pid` has open.
fn socket_inodes(pid: u32) -> Result<HashSet<u64>, String> {
    let fd_dir = format!("/proc/{pid}/fd");
    let mut inodes = HashSet::new();
    let entries = std::fs::read_dir(&fd_dir).map_err(|e| format!("cannot list {fd_dir}: {e}"))?;
    for entry in entries.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let t = target.to_string_lossy();
            if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                if let Ok(ino) = ino.parse::<u64>() {
                    inodes.insert(ino);
                }
            }
        }
    }
    Ok(inodes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_socket_that_never_accepts_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // The smallest queue, never accepted from: as a monitor that is
        // busy with another client.
        // SAFETY: listen(2) on the listener's own descriptor.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let mut queued = Vec::new();
        while let Some(c) = connect_without_waiting(&path) {
            queued.push(c);
            assert!(queued.len() < 1000, "the queue never filled");
        }
        assert!(!queued.is_empty());
        // A blocking connect would now wait until the test is killed.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || tx.send(probe_nbd(&p)).unwrap());
        let answer = rx.recv_timeout(Duration::from_secs(20));
        assert_eq!(answer, Ok(false), "the probe waited on a full queue");
    }
}
