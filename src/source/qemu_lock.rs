//! QEMU's image locks, seen from outside QEMU.
//!
//! QEMU (a VM, qemu-storage-daemon, qemu-nbd, qemu-img) takes open file
//! description (OFD) locks on bytes of every image it opens: a shared lock
//! on byte `100 + i` for each permission bit `i` it holds, and on byte
//! `200 + i` for each permission it does not let others hold (file-posix's
//! `RAW_LOCK_PERM_BASE` and `RAW_LOCK_SHARED_BASE`; bit 1 is write). Before
//! it takes a permission it checks that nobody locks the matching "does
//! not share" byte. So a reader can tell whether some QEMU has an image
//! open for writing, and can keep one from opening it so while it reads,
//! exactly as `qemu-nbd -r` does.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Locked by whoever has the image open with write permission.
const WRITE_PERM_BYTE: libc::off_t = 101;
/// Locked by whoever does not let others write the image.
const WRITE_UNSHARED_BYTE: libc::off_t = 201;

fn lock_request(kind: libc::c_int, byte: libc::off_t) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::c_short::try_from(kind).expect("a lock type fits");
    fl.l_whence = libc::c_short::try_from(libc::SEEK_SET).expect("a whence fits");
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Whether another process has the image open for writing (holds QEMU's
/// write-permission lock).
pub fn open_for_writing(file: &File) -> io::Result<bool> {
    let mut probe = lock_request(libc::F_WRLCK, WRITE_PERM_BYTE);
    // SAFETY: F_OFD_GETLK reads and writes the flock it is given, which
    // lives on this stack frame; the descriptor is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(probe.l_type) != libc::F_UNLCK)
}

/// Keeps any QEMU from opening the image for writing while `file` stays
/// open: a QEMU that tries fails with "Failed to get "write" lock".
pub fn forbid_writers(file: &File) -> io::Result<()> {
    let fl = lock_request(libc::F_RDLCK, WRITE_UNSHARED_BYTE);
    // SAFETY: F_OFD_SETLK reads the flock it is given, which lives on this
    // stack frame; the descriptor is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
