//! Small helpers: process liveness, unique names, URI encoding.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// Prefix of every node, job and export name a session creates.
pub const NAME_PREFIX: &str = "ekko-";

/// Whether `pid` names a live process (a zombie counts as dead).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the last ')' (the command name may contain one).
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => false,
    }
}

/// A per-session tag `ekko-<pid>-<4 hex>`: unique among the sessions of one
/// host, and short enough that node names stay under QEMU's 31-byte limit.
pub fn session_tag() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let mut seed = [0u8; 2];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map(|()| u32::from(u16::from_le_bytes(seed)))
        .unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // The counter makes two sessions of one process differ even if the
    // random part repeats.
    let mix = (random ^ n.wrapping_mul(0x9e37)) & 0xffff;
    format!("{NAME_PREFIX}{}-{mix:04x}", std::process::id())
}

/// Tags of the sessions of this process that may still own QEMU objects.
static LIVE_TAGS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Marks a session of this process as live (or not) for [`is_live_tag`].
pub fn set_tag_live(tag: &str, live: bool) {
    let mut tags = LIVE_TAGS.lock().unwrap_or_else(|e| e.into_inner());
    if live {
        tags.insert(tag.to_string());
    } else {
        tags.remove(tag);
    }
}

/// Whether a session of this process with this tag is still live.
pub fn is_live_tag(tag: &str) -> bool {
    LIVE_TAGS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(tag)
}

/// The PID encoded in a name made from [`session_tag`], if it is one.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, rest) = rest.split_once('-')?;
    let tag = rest.split('-').next()?;
    if tag.len() != 4 || !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    pid.parse().ok()
}

/// The `ekko-<pid>-<hex>` part of a session-made name.
pub fn session_of(name: &str) -> Option<&str> {
    owner_pid(name)?;
    let mut dashes = 0;
    for (i, b) in name.bytes().enumerate() {
        if b == b'-' {
            dashes += 1;
            if dashes == 3 {
                return Some(&name[..i]);
            }
        }
    }
    Some(name)
}

/// Writes all of `data` to a socket without raising SIGPIPE if the peer is
/// gone (the error is EPIPE instead). Honours the socket's write timeout.
pub fn send_all(stream: &UnixStream, data: &[u8]) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let mut off = 0;
    while off < data.len() {
        let rest = &data[off..];
        // SAFETY: fd is an open socket owned by `stream`; `rest` is valid for
        // reads of rest.len() bytes.
        let n = unsafe {
            libc::send(
                fd,
                rest.as_ptr().cast::<libc::c_void>(),
                rest.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        match usize::try_from(n) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Keeps `[A-Za-z0-9_.-]` and replaces anything else by `_`.
pub fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_matches('_');
    let s: String = s
        .chars()
        .rev()
        .take(48)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if s.is_empty() {
        "disk".into()
    } else {
        s
    }
}

/// Percent-encodes everything but unreserved characters and `/`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_owners() {
        let a = session_tag();
        let b = session_tag();
        assert_ne!(a, b);
        assert_eq!(owner_pid(&format!("{a}-fl0")), Some(std::process::id()));
        assert_eq!(session_of(&format!("{a}-snap12")), Some(a.as_str()));
        assert_eq!(owner_pid("ekko-12-zz-x"), None);
        assert_eq!(owner_pid("disk0"), None);
        assert!(pid_alive(std::process::id()));
        assert!(format!("{a}-snap99").len() <= 31);
    }

    #[test]
    fn encoding() {
        assert_eq!(percent_encode("/tmp/a b?c"), "/tmp/a%20b%3Fc");
        assert_eq!(
            sanitize("/machine/peripheral/virtio-disk0"),
            "machine_peripheral_virtio-disk0"
        );
        assert_eq!(sanitize("///"), "disk");
    }
}
