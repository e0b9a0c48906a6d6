//! Locating the Unix socket of an NBD server that QEMU already runs.
//!
//! QEMU has one NBD server per process and QMP cannot tell its address. When
//! `nbd-server-start` fails because a server already runs (e.g.
//! qemu-storage-daemon was started with `--nbd-server`), the socket is found
//! from the outside: the QEMU PID comes from `SO_PEERCRED` on the QMP socket,
//! its listening Unix sockets from `/proc/PID/fd` and `/proc/PID/net/unix`,
//! and the one that greets with the NBD magic (`NBDMAGIC` `IHAVEOPT`) is it.
//! A server on TCP (`--nbd-server addr.type=inet`) is found the same way in
//! `/proc/PID/net/tcp` and `tcp6`, and reached on the loopback address when
//! it listens on every address.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `__SO_ACCEPTCON` in the Flags column of /proc/net/unix: a listening socket.
const SO_ACCEPTCON: u64 = 0x10000;

/// Whether a Unix socket greets like a newstyle NBD server.
pub fn probe_nbd(path: &Path) -> bool {
    let Some(mut s) = connect_without_waiting(path) else {
        return false;
    };
    if s.set_read_timeout(Some(Duration::from_millis(800)))
        .is_err()
    {
        return false;
    }
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
    let Ok(mut s) = std::net::TcpStream::connect_timeout(addr, Duration::from_millis(800)) else {
        return false;
    };
    if s.set_read_timeout(Some(Duration::from_millis(800)))
        .is_err()
    {
        return false;
    }
    let mut magic = [0u8; 16];
    s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGICIHAVEOPT"
}

/// The TCP addresses process `pid` listens on, as a client on this host
/// reaches them (a wildcard address becomes the loopback one).
pub fn listening_tcp(pid: u32) -> Result<Vec<std::net::SocketAddr>, String> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let inodes = socket_inodes(pid)?;
    let mut out = Vec::new();
    for (table, v6) in [("tcp", false), ("tcp6", true)] {
        let path = format!("/proc/{pid}/net/{table}");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue; // not LISTEN
            }
            let Ok(inode) = cols[9].parse::<u64>() else {
                continue;
            };
            if !inodes.contains(&inode) {
                continue;
            }
            let Some((ip_hex, port_hex)) = cols[1].split_once(':') else {
                continue;
            };
            let Ok(port) = u16::from_str_radix(port_hex, 16) else {
                continue;
            };
            // The address is in 32-bit words of host byte order.
            let words: Vec<u32> = (0..ip_hex.len() / 8)
                .filter_map(|i| u32::from_str_radix(ip_hex.get(i * 8..i * 8 + 8)?, 16).ok())
                .collect();
            let ip = match (v6, words.as_slice()) {
                (false, [w]) => {
                    let ip = Ipv4Addr::from(w.to_ne_bytes());
                    IpAddr::V4(if ip.is_unspecified() {
                        Ipv4Addr::LOCALHOST
                    } else {
                        ip
                    })
                }
                (true, [a, b, c, d]) => {
                    let mut bytes = [0u8; 16];
                    for (i, w) in [a, b, c, d].iter().enumerate() {
                        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
                    }
                    let ip = Ipv6Addr::from(bytes);
                    IpAddr::V6(if ip.is_unspecified() {
                        Ipv6Addr::LOCALHOST
                    } else {
                        ip
                    })
                }
                _ => continue,
            };
            let addr = SocketAddr::new(ip, port);
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    Ok(out)
}

/// Where an NBD server of QEMU listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

/// Finds the NBD server of process `pid`: on a Unix socket (skipping
/// `exclude`, the QMP socket), or else on TCP.
pub fn find_nbd_server(pid: u32, exclude: &Path) -> Result<NbdAddress, String> {
    let unix = find_nbd_socket(pid, exclude);
    if let Ok(p) = unix {
        return Ok(NbdAddress::Unix(p));
    }
    let tcp = listening_tcp(pid)?;
    let n = tcp.len();
    for addr in tcp {
        if probe_nbd_tcp(&addr) {
            return Ok(NbdAddress::Tcp(addr));
        }
    }
    Err(format!(
        "{}, and none of its {n} TCP listener(s) is",
        unix.err().unwrap_or_default()
    ))
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
