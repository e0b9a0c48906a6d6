//! Locating the Unix socket of an NBD server that QEMU already runs.
//!
//! QEMU has one NBD server per process and QMP cannot tell its address. When
//! `nbd-server-start` fails because a server already runs (e.g.
//! qemu-storage-daemon was started with `--nbd-server`), the socket is found
//! from the outside: the QEMU PID comes from `SO_PEERCRED` on the QMP socket,
//! its listening Unix sockets from `/proc/PID/fd` and `/proc/PID/net/unix`,
//! and the one that greets with the NBD magic (`NBDMAGIC` `IHAVEOPT`) is it.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `__SO_ACCEPTCON` in the Flags column of /proc/net/unix: a listening socket.
const SO_ACCEPTCON: u64 = 0x10000;

/// Whether a Unix socket greets like a newstyle NBD server.
pub fn probe_nbd(path: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(path) else {
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

/// Finds the NBD server socket of process `pid`, skipping `exclude` (the QMP
/// socket).
pub fn find_nbd_socket(pid: u32, exclude: &Path) -> Result<PathBuf, String> {
    let exclude = exclude
        .canonicalize()
        .unwrap_or_else(|_| exclude.to_path_buf());
    let mut candidates: Vec<PathBuf> = listening_sockets(pid)?
        .into_iter()
        .filter(|p| *p != exclude)
        .collect();
    // Likely names first: fewer pointless probes of other sockets (a
    // socket that does not greet, such as a monitor busy with another
    // client, costs the probe's whole timeout).
    candidates.sort_by_key(|p| !p.to_string_lossy().contains("nbd"));
    let n = candidates.len();
    candidates
        .into_iter()
        .find(|p| probe_nbd(p))
        .ok_or_else(|| {
            format!("none of the {n} listening Unix socket(s) of QEMU PID {pid} is an NBD server")
        })
}

/// The paths of the Unix sockets process `pid` listens on (not abstract
/// ones), absolute.
pub fn listening_sockets(pid: u32) -> Result<Vec<PathBuf>, String> {
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
