//! The FUSE tree (`ekko-fuse`, which `ekko mount` runs) against the real
//! kernel: real mounts, loop mounts of served images, signals and a killed
//! daemon. Needs root, /dev/fuse, fusermount3, sfdisk and mkfs.ext4; a
//! missing one fails the test, it never skips.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::util::*;

const MIB: u64 = 1 << 20;
/// Where the ext4 partition starts in the GPT image (sector 2048).
const PART_OFFSET: u64 = MIB;

pub(crate) fn require_fuse() -> PathBuf {
    for t in ["fusermount3", "sfdisk", "mkfs.ext4", "mount", "umount"] {
        require(t);
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module (modprobe fuse)"
    );
    sibling_bin("ekko-fuse")
}

fn is_mounted(mnt: &Path) -> bool {
    let want = fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_path_buf());
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    // /proc/mounts escapes spaces as \040; test paths have none.
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.to_str().unwrap()))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running `ekko-fuse`; unmounts (whatever state it is in) on drop.
pub(crate) struct Mounted {
    child: Option<Child>,
    mnt: PathBuf,
    log: PathBuf,
}

impl Mounted {
    pub(crate) fn start(env: &Env, mnt: &Path) -> Mounted {
        let bin = require_fuse();
        fs::create_dir_all(mnt).unwrap();
        let log = env.path(&format!("fuse-{}.log", rand::random::<u32>()));
        let child = Command::new(bin)
            .arg(mnt)
            .env("EKKO_REPO", &env.repo)
            .env("EKKO_PASSWORD", PASSWORD)
            .env("EKKO_CACHE_DIR", &env.cache)
            .env_remove("EKKO_PASSWORD_FILE")
            .env("EKKO_LOG", "info")
            .envs(env.vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("starting ekko-fuse");
        let mut m = Mounted {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            log,
        };
        let start = Instant::now();
        while !is_mounted(mnt) {
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                m.child = None;
                panic!(
                    "ekko-fuse exited ({status}) before mounting:\n{}",
                    m.log_text()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "ekko-fuse did not mount:\n{}",
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().unwrap().id()).unwrap()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Wait for the daemon to exit and return whether it succeeded.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "ekko-fuse did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none()
                && start.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// A loop mount of a served image; unmounted on drop.
struct LoopMount(PathBuf);

impl LoopMount {
    fn new(image: &Path, at: &Path, extra: &str) -> LoopMount {
        fs::create_dir_all(at).unwrap();
        let opts = format!("loop,ro,noload{extra}");
        let out = Command::new("mount")
            .arg("-o")
            .arg(&opts)
            .arg(image)
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -o {opts} {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        LoopMount(at.to_path_buf())
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// The files put into the guest filesystem.
struct GuestFiles {
    dir: PathBuf,
    mtime: SystemTime,
}

/// A source tree with a text file (mode 0640, owner 1234:5678, fixed
/// mtime), a symlink, a 20 MB random file and nested folders.
fn guest_tree(env: &Env, name: &str, big: usize) -> GuestFiles {
    let dir = env.path(name);
    fs::create_dir_all(dir.join("etc/deeper/still")).unwrap();
    let hello = dir.join("etc/hello.txt");
    write_file(&hello, b"hello from the guest\n");
    fs::set_permissions(&hello, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&hello, Some(1234), Some(5678)).unwrap();
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_934_245); // 2020-01-02T03:04:05Z
    File::options()
        .write(true)
        .open(&hello)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::os::unix::fs::symlink("hello.txt", dir.join("etc/link")).unwrap();
    write_file(&dir.join("big.bin"), &random_bytes(7, big));
    write_file(
        &dir.join("etc/deeper/still/nested.txt"),
        &text_bytes(8, 5000),
    );
    GuestFiles { dir, mtime }
}

fn mkfs(src: &Path, out: &Path, size: &str) {
    let _ = fs::remove_file(out);
    run_tool(
        Command::new("mkfs.ext4")
            .arg("-q")
            .arg("-F")
            .arg("-d")
            .arg(src)
            .arg(out)
            .arg(size),
    );
}

/// A 64 MiB disk with a GPT and one ext4 partition (at 1 MiB, 48 MiB long)
/// holding `files`.
fn gpt_disk(env: &Env, files: &GuestFiles, path: &Path) {
    make_image(path, 64 * MIB, &[]);
    let mut sf = Command::new("sfdisk");
    sf.arg("-q")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = sf.spawn().expect("running sfdisk");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nstart=2048, size=98304, type=L\n")
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    let part = env.path(&format!("part-{}.img", rand::random::<u32>()));
    mkfs(&files.dir, &part, "48M");
    let data = fs::read(&part).unwrap();
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&data, PART_OFFSET)
        .unwrap();
    fs::remove_file(&part).unwrap();
}

fn read_all(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// `pread` of `len` bytes at `off`, or the errno.
fn pread(f: &File, off: u64, len: usize) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; len];
    match f.read_exact_at(&mut buf, off) {
        Ok(()) => Ok(buf),
        Err(e) => Err(e.raw_os_error().unwrap_or(-1)),
    }
}

fn seek(f: &File, off: u64, whence: i32) -> Result<u64, i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor with plain integer arguments.
    let r = unsafe { libc::lseek(f.as_raw_fd(), i64::try_from(off).unwrap(), whence) };
    u64::try_from(r).map_err(|_| std::io::Error::last_os_error().raw_os_error().unwrap())
}

fn listing(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Each `<disk>.img` of every snapshot in a chain is byte for byte the
/// restore of that snapshot, with its exact size and its holes.
#[test]
fn fuse_disk_images_equal_restores_for_a_whole_chain() {
    require_fuse();
    let env = Env::init(&[]);
    let files = guest_tree(&env, "guest", 4 << 20);
    let disk = env.path("sda.raw");
    gpt_disk(&env, &files, &disk);
    let mut ids = vec![env.backup("web1", &[("sda", &disk)])];
    // Change blocks between backups: in the partition's free space, then
    // past its end.
    write_at(&disk, 40 * MIB + 4096, &random_bytes(20, 300_000));
    ids.push(env.backup("web1", &[("sda", &disk)]));
    write_at(&disk, 60 * MIB, &random_bytes(21, 2 * MIB as usize));
    ids.push(env.backup("web1", &[("sda", &disk)]));

    let m = Mounted::start(&env, &env.path("mnt"));
    for id in &ids {
        let img = m.path(&format!("ids/{id}/sda.img"));
        let restored = env.restore(id, "sda");
        assert_eq!(
            fs::metadata(&img).unwrap().len(),
            64 * MIB,
            "size of {}",
            img.display()
        );
        assert_eq!(
            sha256_file(&img),
            sha256_file(&restored),
            "snapshot {id}: image differs from its restore"
        );
    }
    assert_eq!(
        sha256_file(&m.path("web1/latest/sda.img")),
        sha256_file(&disk)
    );

    // SEEK_DATA/SEEK_HOLE: the GPT and the filesystem are data, the free
    // space after the partition (52..60 MiB) a hole.
    let f = File::open(m.path("web1/latest/sda.img")).unwrap();
    assert_eq!(seek(&f, 0, libc::SEEK_DATA), Ok(0));
    assert_eq!(seek(&f, 52 * MIB, libc::SEEK_HOLE), Ok(52 * MIB));
    assert_eq!(seek(&f, 52 * MIB, libc::SEEK_DATA), Ok(60 * MIB));
    assert_eq!(seek(&f, 62 * MIB, libc::SEEK_HOLE), Ok(62 * MIB));
    assert_eq!(seek(&f, 64 * MIB, libc::SEEK_DATA), Err(libc::ENXIO));
    // … so `cp --sparse` skips the holes.
    let copy = env.path("copy.img");
    run_tool(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(m.path("web1/latest/sda.img"))
            .arg(&copy),
    );
    assert_eq!(sha256_file(&copy), sha256_file(&disk));
    assert!(
        fs::metadata(&copy).unwrap().blocks() * 512 < 60 * MIB,
        "cp --sparse did not keep the holes"
    );

    // The tree's shape, stable across listings.
    let vm_list = listing(&m.path("web1"));
    assert_eq!(vm_list.len(), 4, "{vm_list:?}");
    let mut times: Vec<String> = vm_list.iter().filter(|n| *n != "latest").cloned().collect();
    let sorted = {
        let mut s = times.clone();
        s.sort();
        s
    };
    assert_eq!(times, sorted, "time folders are listed in time order");
    times.dedup();
    assert_eq!(times.len(), 3, "three distinct time folders: {vm_list:?}");
    assert_eq!(
        fs::read_link(m.path("web1/latest")).unwrap(),
        PathBuf::from(times.last().unwrap()),
        "latest points at the newest"
    );
    for id in &ids {
        let target = fs::read_link(m.path(&format!("ids/{id}"))).unwrap();
        assert!(target.starts_with("../web1/"), "{}", target.display());
        assert!(m.path(&format!("ids/{id}/sda.img")).is_file());
    }
    for dir in [
        "",
        "ids",
        "web1",
        "web1/latest",
        "web1/latest/sda",
        "web1/latest/sda/part1",
        "web1/latest/sda/part1/etc",
    ] {
        let first = listing(&m.path(dir));
        for _ in 0..3 {
            assert_eq!(listing(&m.path(dir)), first, "listing of /{dir} changed");
        }
    }
    assert_eq!(listing(&m.path("web1/latest/sda")), vec!["part1"]);
    let mut root = listing(&m.path(""));
    root.sort();
    assert_eq!(root, vec!["ids", "web1"]);

    // Read-only, and it says so.
    let erofs = |r: std::io::Result<()>, what: &str| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS), "{what}");
    };
    erofs(
        File::options()
            .write(true)
            .open(m.path("web1/latest/sda.img"))
            .map(drop),
        "open for writing",
    );
    erofs(fs::create_dir(m.path("web1/new")), "mkdir");
    erofs(
        fs::write(m.path("web1/latest/sda/part1/new.txt"), b"x"),
        "create",
    );
    erofs(
        fs::remove_file(m.path("web1/latest/sda/part1/big.bin")),
        "unlink",
    );
    // A name that does not exist is ENOENT.
    let e = fs::metadata(m.path("web1/latest/sdz.img")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
}

/// Files inside the guest read as the originals, through the tree and
/// through a loop mount of the served image.
#[test]
fn fuse_guest_files_equal_the_originals() {
    require_fuse();
    let env = Env::init(&[]);
    let files = guest_tree(&env, "guest", 20_000_000);
    let disk = env.path("sda.raw");
    gpt_disk(&env, &files, &disk);
    // A second disk with a bare filesystem and no partition table.
    let bare_src = guest_tree(&env, "bare", 1 << 20);
    let bare = env.path("sdb.raw");
    mkfs(&bare_src.dir, &bare, "16M");
    env.backup("web1", &[("sda", &disk), ("sdb", &bare)]);

    let m = Mounted::start(&env, &env.path("mnt"));
    let part = m.path("web1/latest/sda/part1");
    let check_tree = |root: &Path, src: &GuestFiles, how: &str| {
        let hello = root.join("etc/hello.txt");
        let copy = env.path(&format!("hello-{}.txt", rand::random::<u32>()));
        run_tool(Command::new("cp").arg(&hello).arg(&copy));
        assert_eq!(
            read_all(&copy),
            read_all(&src.dir.join("etc/hello.txt")),
            "{how}: cp of hello.txt"
        );
        let meta = fs::symlink_metadata(&hello).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640, "{how}: mode");
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678), "{how}: owner");
        assert_eq!(meta.modified().unwrap(), src.mtime, "{how}: mtime");
        assert_eq!(
            fs::read_link(root.join("etc/link")).unwrap(),
            PathBuf::from("hello.txt"),
            "{how}: symlink"
        );
        assert_eq!(
            read_all(&root.join("etc/link")),
            read_all(&hello),
            "{how}: through the symlink"
        );
        assert_eq!(
            sha256_file(&root.join("big.bin")),
            sha256_file(&src.dir.join("big.bin")),
            "{how}: big.bin"
        );
        assert_eq!(
            read_all(&root.join("etc/deeper/still/nested.txt")),
            read_all(&src.dir.join("etc/deeper/still/nested.txt")),
            "{how}: nested file"
        );
        let mut top = listing(root);
        top.sort();
        assert_eq!(
            top,
            vec!["big.bin", "etc", "lost+found"],
            "{how}: top folder"
        );
    };
    check_tree(&part, &files, "part1");
    // No partition table: the filesystem is under `whole/`.
    assert_eq!(listing(&m.path("web1/latest/sdb")), vec!["whole"]);
    check_tree(&m.path("web1/latest/sdb/whole"), &bare_src, "whole");

    // Loop mounts of the served images: the bare one as it is, the
    // partitioned one at its partition's offset.
    let lm = LoopMount::new(&m.path("web1/latest/sdb.img"), &env.path("loop-b"), "");
    check_tree(&lm.0, &bare_src, "loop mount of sdb.img");
    let lm2 = LoopMount::new(
        &m.path("web1/latest/sda.img"),
        &env.path("loop-a"),
        &format!(",offset={PART_OFFSET}"),
    );
    check_tree(&lm2.0, &files, "loop mount of sda.img");
    drop(lm2);
    drop(lm);
}

/// Inodes in the mounted tree now, as `statfs` reports them (f_files).
fn inode_count(path: &Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%c"])
        .arg(path)
        .output()
        .expect("running stat");
    assert!(out.status.success(), "stat -f {}", path.display());
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Walking a guest filesystem of thousands of files grows the daemon's
/// inode table; when the kernel trims its own cache (here: drop_caches),
/// the forgotten inodes leave the table too, and every file still reads
/// exactly as before.
#[test]
fn fuse_forgotten_inodes_leave_the_table() {
    require_fuse();
    let env = Env::init(&[]);
    let files = guest_tree(&env, "guest", 1 << 20);
    let many = files.dir.join("many");
    fs::create_dir_all(&many).unwrap();
    const N: usize = 3000;
    for i in 0..N {
        write_file(
            &many.join(format!("f{i:05}")),
            format!("file {i}\n").as_bytes(),
        );
    }
    let disk = env.path("sdb.raw");
    mkfs(&files.dir, &disk, "32M");
    env.backup("vm", &[("sdb", &disk)]);

    let m = Mounted::start(&env, &env.path("mnt"));
    let root = m.path("vm/latest/sdb/whole");
    let walk = || {
        let mut names = listing(&root.join("many"));
        names.sort();
        assert_eq!(names.len(), N);
        for name in &names {
            // A lookup of every file, and a read of some.
            let p = root.join("many").join(name);
            let meta = fs::metadata(&p).unwrap();
            assert!(meta.is_file(), "{name}");
            if name.ends_with('7') {
                let i: usize = name[1..].parse().unwrap();
                assert_eq!(read_all(&p), format!("file {i}\n").as_bytes());
            }
        }
    };
    walk();
    let walked = inode_count(&m.path(""));
    assert!(
        walked > N as u64,
        "{walked} inodes after looking up {N} files"
    );
    // The kernel forgets unused dentries and inodes, and tells the daemon.
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    wait_until(
        "the daemon to drop forgotten inodes",
        Duration::from_secs(20),
        || inode_count(&m.path("")) < walked / 4,
    );
    // Everything reads as before, under new inode numbers where needed.
    walk();
    assert_eq!(
        sha256_file(&root.join("big.bin")),
        sha256_file(&files.dir.join("big.bin"))
    );
    assert_eq!(
        read_all(&root.join("etc/deeper/still/nested.txt")),
        read_all(&files.dir.join("etc/deeper/still/nested.txt"))
    );
}

/// A FAT32 EFI system partition and a bare FAT16 disk (made by mkfs.vfat and
/// filled by mtools, not by the code under test) read like the originals:
/// long names, nested folders, sizes, mtimes, case-insensitive lookups.
#[test]
fn fuse_fat_partitions_read_like_the_originals() {
    require_fuse();
    require("mkfs.vfat");
    require("mcopy");
    let env = Env::init(&[]);
    let src = env.path("esp");
    fs::create_dir_all(src.join("EFI/BOOT")).unwrap();
    fs::create_dir_all(src.join("EFI/debian/nested deeper")).unwrap();
    write_file(
        &src.join("EFI/BOOT/BOOTX64.EFI"),
        &random_bytes(21, 3_000_000),
    );
    write_file(&src.join("EFI/debian/grub.cfg"), b"search --fs-uuid x\n");
    write_file(
        &src.join("EFI/debian/nested deeper/A long file name.txt"),
        &text_bytes(22, 70_000),
    );
    // FAT keeps local time in 2-second steps; mtools runs with TZ=UTC.
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    File::options()
        .write(true)
        .open(src.join("EFI/debian/grub.cfg"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let fat = |kind: &str, size_kib: u64, out: &Path| {
        let _ = fs::remove_file(out);
        run_tool(
            Command::new("mkfs.vfat")
                .args(["-F", kind, "-n", "EKKOTEST", "-C"])
                .arg(out)
                .arg(size_kib.to_string())
                .stdout(Stdio::null()),
        );
        run_tool(
            Command::new("mcopy")
                .env("TZ", "UTC")
                .args(["-s", "-m", "-i"])
                .arg(out)
                .arg(src.join("EFI"))
                .arg("::/"),
        );
    };
    // sda: GPT, partition 1 an EFI system partition (FAT32, 40 MiB).
    let disk = env.path("sda.raw");
    make_image(&disk, 64 * MIB, &[]);
    let mut sf = Command::new("sfdisk");
    sf.arg("-q")
        .arg(&disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = sf.spawn().expect("running sfdisk");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nstart=2048, size=81920, type=U\n")
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    let part = env.path("esp.img");
    fat("32", 40 * 1024, &part);
    File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&fs::read(&part).unwrap(), PART_OFFSET)
        .unwrap();
    // sdb: a bare FAT16 filesystem, no partition table.
    let bare = env.path("sdb.raw");
    fat("16", 16 * 1024, &bare);
    env.backup("uefi1", &[("sda", &disk), ("sdb", &bare)]);

    let m = Mounted::start(&env, &env.path("mnt"));
    for (root, how) in [
        (m.path("uefi1/latest/sda/part1"), "FAT32 ESP"),
        (m.path("uefi1/latest/sdb/whole"), "bare FAT16"),
    ] {
        assert_eq!(listing(&root), vec!["EFI"], "{how}: top folder");
        let mut sub = listing(&root.join("EFI"));
        sub.sort();
        assert_eq!(sub, vec!["BOOT", "debian"], "{how}: EFI/");
        let mut deb = listing(&root.join("EFI/debian"));
        deb.sort();
        assert_eq!(deb, vec!["grub.cfg", "nested deeper"], "{how}: EFI/debian/");
        assert_eq!(
            listing(&root.join("EFI/debian")).len(),
            2,
            "{how}: a second listing is the same"
        );
        let efi = root.join("EFI/BOOT/BOOTX64.EFI");
        let copy = env.path("copy.efi");
        run_tool(Command::new("cp").arg(&efi).arg(&copy));
        assert_eq!(
            sha256_file(&copy),
            sha256_file(&src.join("EFI/BOOT/BOOTX64.EFI")),
            "{how}: cp of BOOTX64.EFI"
        );
        assert_eq!(fs::metadata(&efi).unwrap().len(), 3_000_000, "{how}: size");
        assert_eq!(
            read_all(&root.join("EFI/debian/nested deeper/A long file name.txt")),
            read_all(&src.join("EFI/debian/nested deeper/A long file name.txt")),
            "{how}: a long name in a nested folder"
        );
        let cfg = fs::metadata(root.join("EFI/debian/grub.cfg")).unwrap();
        assert_eq!(cfg.modified().unwrap(), mtime, "{how}: mtime");
        assert_eq!(cfg.permissions().mode() & 0o777, 0o644, "{how}: mode");
        assert!(
            fs::metadata(root.join("EFI")).unwrap().is_dir(),
            "{how}: EFI is a folder"
        );
        // FAT names are case-insensitive, as in the guest.
        assert_eq!(
            read_all(&root.join("efi/boot/bootx64.efi")),
            read_all(&efi),
            "{how}: case-insensitive lookup"
        );
        assert_eq!(
            fs::metadata(root.join("EFI/nothing-here"))
                .map(|_| ())
                .map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENOENT)),
            "{how}: a missing name"
        );
        assert_eq!(
            File::create(root.join("EFI/new.txt"))
                .map(|_| ())
                .map_err(|e| e.raw_os_error()),
            Err(Some(libc::EROFS)),
            "{how}: writes"
        );
    }
}

/// 32 threads reading at random offsets at once get the restored bytes.
#[test]
fn fuse_parallel_random_reads_match_the_restore() {
    require_fuse();
    let env = Env::init(&["--chunk-size", "256K"]);
    let disk = env.path("sda.raw");
    make_image(
        &disk,
        24 * MIB + 777,
        &[
            (0, &random_bytes(30, 9 * MIB as usize)[..]),
            (16 * MIB, &text_bytes(31, 8 * MIB as usize + 777)[..]),
        ],
    );
    let id = env.backup("db", &[("sda", &disk)]);
    let restored = Arc::new(read_all(&env.restore(&id, "sda")));
    let m = Mounted::start(&env, &env.path("mnt"));
    let img = m.path("db/latest/sda.img");
    let size = fs::metadata(&img).unwrap().len();
    assert_eq!(size, 24 * MIB + 777);
    let threads: Vec<_> = (0..32u64)
        .map(|t| {
            let (img, restored) = (img.clone(), Arc::clone(&restored));
            std::thread::spawn(move || {
                let f = File::open(&img).unwrap();
                let r = random_bytes(100 + t, 64 * 16);
                for i in 0..64 {
                    let x = u64::from_le_bytes(r[i * 16..i * 16 + 8].try_into().unwrap());
                    let y = u64::from_le_bytes(r[i * 16 + 8..i * 16 + 16].try_into().unwrap());
                    let off = x % size;
                    let len = usize::try_from((y % (3 * MIB)).min(size - off)).unwrap();
                    let got = pread(&f, off, len)
                        .unwrap_or_else(|e| panic!("thread {t}: pread at {off}: errno {e}"));
                    let o = usize::try_from(off).unwrap();
                    assert!(
                        got == restored[o..o + len],
                        "thread {t}: bytes at {off}+{len} differ"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// SIGTERM unmounts cleanly; after SIGKILL the mountpoint fails with
/// ENOTCONN (never an empty folder) until `fusermount3 -u`, after which it
/// mounts again.
#[test]
fn fuse_signals_unmount_and_a_killed_daemon_is_visible() {
    require_fuse();
    let env = Env::init(&[]);
    let disk = env.path("sda.raw");
    make_image(
        &disk,
        4 * MIB,
        &[(0, &random_bytes(40, 3 * MIB as usize)[..])],
    );
    env.backup("vm1", &[("sda", &disk)]);
    let mnt = env.path("mnt");

    let mut m = Mounted::start(&env, &mnt);
    let f = File::open(m.path("vm1/latest/sda.img")).unwrap();
    drop(f);
    m.signal(libc::SIGTERM);
    let status = m.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        m.log_text()
    );
    assert!(!is_mounted(&mnt), "still mounted after SIGTERM");

    // SIGINT too (Ctrl-C).
    let mut m = Mounted::start(&env, &mnt);
    m.signal(libc::SIGINT);
    assert!(m.wait_exit(Duration::from_secs(10)).success());
    assert!(!is_mounted(&mnt), "still mounted after SIGINT");

    let mut m = Mounted::start(&env, &mnt);
    m.signal(libc::SIGKILL);
    m.wait_exit(Duration::from_secs(10));
    let err = fs::metadata(&mnt).expect_err("a dead mount must not look like a folder");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    // Mounting over it is refused with a hint.
    let out = Command::new(sibling_bin("ekko-fuse"))
        .arg(&mnt)
        .env("EKKO_REPO", &env.repo)
        .env("EKKO_PASSWORD", PASSWORD)
        .env("EKKO_CACHE_DIR", &env.cache)
        .output()
        .unwrap();
    assert_clean_failure(&out, "fusermount3 -u");
    run_tool(Command::new("fusermount3").arg("-u").arg(&mnt));
    assert!(!is_mounted(&mnt));

    let m = Mounted::start(&env, &mnt);
    assert_eq!(
        sha256_file(&m.path("vm1/latest/sda.img")),
        sha256_file(&disk)
    );
    // Unmounted from outside: the daemon notices and exits cleanly.
    let mut m = m;
    run_tool(Command::new("umount").arg(&mnt));
    assert!(
        m.wait_exit(Duration::from_secs(10)).success(),
        "{}",
        m.log_text()
    );
}

/// A damaged pack makes reads of the range it holds fail with EIO; the rest
/// of that disk and every other disk still read.
#[test]
fn fuse_damaged_pack_is_eio_only_where_damaged() {
    require_fuse();
    let env = Env::init(&[]);
    let good = env.path("good.raw");
    make_image(
        &good,
        6 * MIB,
        &[(0, &random_bytes(50, 6 * MIB as usize)[..])],
    );
    env.backup("good", &[("sda", &good)]);
    let before = env.pack_files();
    let bad = env.path("bad.raw");
    let bad_data = random_bytes(51, 8 * MIB as usize);
    make_image(&bad, 8 * MIB, &[(0, &bad_data[..])]);
    env.backup("bad", &[("sda", &bad)]);
    let new: Vec<PathBuf> = env
        .pack_files()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(new.len(), 1, "the second backup wrote one pack: {new:?}");
    // Flip bytes in the middle of the pack: inside one of its data chunks.
    let pack = &new[0];
    let len = fs::metadata(pack).unwrap().len();
    let f = File::options().read(true).write(true).open(pack).unwrap();
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, len / 2).unwrap();
    for x in &mut b {
        *x ^= 0xa5;
    }
    f.write_all_at(&b, len / 2).unwrap();
    drop(f);

    let m = Mounted::start(&env, &env.path("mnt"));
    let img = File::open(m.path("bad/latest/sda.img")).unwrap();
    let (mut eio, mut ok) = (0, 0);
    for i in 0..8u64 {
        match pread(&img, i * MIB, MIB as usize) {
            Ok(got) => {
                let o = usize::try_from(i * MIB).unwrap();
                assert!(
                    got == bad_data[o..o + MIB as usize],
                    "chunk {i} read wrong bytes"
                );
                ok += 1;
            }
            Err(e) => {
                assert_eq!(
                    e,
                    libc::EIO,
                    "chunk {i}: a damaged chunk must be EIO, got errno {e}"
                );
                eio += 1;
            }
        }
    }
    assert!(eio >= 1, "no read failed although a pack is damaged");
    assert!(
        ok >= 6,
        "only {ok} of 8 chunks read; damage should stay local"
    );
    assert_eq!(
        sha256_file(&m.path("good/latest/sda.img")),
        sha256_file(&good),
        "an undamaged disk must read"
    );
    assert!(
        m.log_text().contains("damaged"),
        "the log must say why reads fail:\n{}",
        m.log_text()
    );
}

/// Snapshots committed while mounted appear without remounting, both in a
/// known VM and as a new VM.
#[test]
fn fuse_snapshots_committed_after_mounting_appear() {
    require_fuse();
    let env = Env::init(&[]);
    let disk = env.path("sda.raw");
    make_image(
        &disk,
        4 * MIB,
        &[(0, &random_bytes(60, 2 * MIB as usize)[..])],
    );
    let first = env.backup("vm1", &[("sda", &disk)]);
    let m = Mounted::start(&env, &env.path("mnt"));
    assert_eq!(listing(&m.path("vm1")).len(), 2);

    write_at(&disk, MIB, &random_bytes(61, MIB as usize));
    let second = env.backup("vm1", &[("sda", &disk)]);
    let other = env.path("other.raw");
    make_image(
        &other,
        2 * MIB,
        &[(0, &random_bytes(62, 2 * MIB as usize)[..])],
    );
    let third = env.backup("vm2", &[("sda", &other)]);

    wait_until("the new snapshot in vm1/", Duration::from_secs(10), || {
        listing(&m.path("vm1")).len() == 3
    });
    wait_until("vm2/ at the root", Duration::from_secs(10), || {
        m.path("vm2").is_dir()
    });
    assert_eq!(
        sha256_file(&m.path(&format!("ids/{second}/sda.img"))),
        sha256_file(&disk)
    );
    assert_eq!(
        sha256_file(&m.path("vm2/latest/sda.img")),
        sha256_file(&other)
    );
    wait_until("latest to move", Duration::from_secs(10), || {
        fs::read_link(m.path("vm1/latest")).ok()
            == fs::read_link(m.path(&format!("ids/{second}")))
                .ok()
                .map(|p| PathBuf::from(p.file_name().unwrap_or(OsStr::new(""))))
    });
    // The old snapshot is untouched.
    assert!(m.path(&format!("ids/{first}/sda.img")).is_file());
    assert!(m.path(&format!("ids/{third}")).exists());
}

/// `ekko mount` at a terminal asks for the passphrase, as every other
/// command does, and passes its tuning options on to ekko-fuse.
#[test]
fn fuse_ekko_mount_asks_for_the_passphrase_at_a_terminal() {
    require_fuse();
    let env = Env::init(&[]);
    let disk = env.path("sda.raw");
    make_image(&disk, 2 * MIB, &[(0, &random_bytes(41, MIB as usize)[..])]);
    env.backup("vm1", &[("sda", &disk)]);
    let mnt = env.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mut c = env.cmd();
    c.env_remove("EKKO_PASSWORD")
        .args(["mount", "--cache-size", "32", "--read-ahead", "4"])
        .arg(&mnt);
    let mut t = OnTty::spawn(c);
    t.expect("Passphrase:");
    t.type_line(PASSWORD);
    wait_until("the mount", Duration::from_secs(20), || is_mounted(&mnt));
    assert_eq!(
        sha256_file(&mnt.join("vm1/latest/sda.img")),
        sha256_file(&disk)
    );
    run_tool(Command::new("umount").arg(&mnt));
    let (status, shown) = t.finish();
    assert!(status.success(), "ekko mount: {status}\n{shown}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn fuse_an_unencrypted_repository_mounts_whatever_the_passphrase_variables_hold() {
    require_fuse();
    let mut env = Env::init(&["--encryption", "none"]);
    let disk = env.path("sda.raw");
    make_image(
        &disk,
        2 * MIB,
        &[(MIB, &random_bytes(42, MIB as usize)[..])],
    );
    env.backup("vm1", &[("sda", &disk)]);
    // An empty EKKO_PASSWORD is refused where a passphrase is needed;
    // here none is, as `ekko snapshots` agrees.
    env.vars.push(("EKKO_PASSWORD".into(), String::new()));
    env.ok(&["snapshots"]);
    let m = Mounted::start(&env, &env.path("mnt"));
    assert_eq!(
        sha256_file(&m.path("vm1/latest/sda.img")),
        sha256_file(&disk)
    );
}
