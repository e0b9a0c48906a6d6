//! The NBD export (`ekko serve-nbd`, nbdkit with the `ekko-nbd` plugin)
//! against real clients: qemu-img, nbdcopy, nbdinfo, qemu-io, libnbd, a
//! hand-rolled NBD client for what libnbd refuses to send, and a real VM
//! booting under qemu-system-x86_64. Every component is required: a missing
//! one fails the test, it never skips.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ekko::{LocalBackend, Repository};

use crate::util::*;

const MIB: u64 = 1 << 20;

/// The plugin and the NBD tools these tests drive.
fn require_nbd() {
    for t in ["nbdkit", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io"] {
        require(t);
    }
    sibling_bin("libekko_nbd.so");
}

/// A running `ekko serve-nbd`.
pub(crate) struct Served {
    child: Child,
    pub(crate) uri: String,
    socket: Option<PathBuf>,
    log: PathBuf,
}

/// Start `ekko serve-nbd ARGS` and wait for the URI it prints when ready.
fn serve_with(env: &Env, args: &[&str], tmpdir: Option<&Path>) -> Served {
    require_nbd();
    let log = env.path(&format!("serve-{}.log", rand::random::<u32>()));
    let mut cmd = env.cmd();
    cmd.arg("serve-nbd")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    cmd.stderr(fs::File::create(&log).unwrap());
    if let Some(t) = tmpdir {
        cmd.env("TMPDIR", t);
    }
    let mut child = cmd.spawn().expect("spawning ekko serve-nbd");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let socket = args
        .windows(2)
        .find(|w| w[0] == "--socket")
        .map(|w| PathBuf::from(w[1]));
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) if !line.trim().is_empty() => Served {
            child,
            uri: line.trim().to_string(),
            socket,
            log,
        },
        other => {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!(
                "ekko serve-nbd {args:?} did not print a URI ({other:?}, {status}):\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
}

/// Serve `snap` on a fresh Unix socket.
pub(crate) fn serve(env: &Env, snap: &str, extra: &[&str]) -> Served {
    let sock = env.path(&format!("nbd-{}.sock", rand::random::<u32>()));
    let mut args = vec![snap, "--socket", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    serve_with(env, &args, None)
}

impl Served {
    fn socket(&self) -> &Path {
        self.socket.as_deref().expect("served on a Unix socket")
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// nbdkit processes started by this server.
    fn nbdkit_pids(&self) -> Vec<u32> {
        let pid = self.child.id();
        let mut out = Vec::new();
        for task in fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(
                children
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        out
    }

    fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the server died:\n{}",
            self.log()
        );
    }

    /// SIGTERM, as a user's Ctrl-C or a service manager would; then require
    /// a clean exit with nothing left behind.
    pub(crate) fn stop(mut self) {
        self.assert_running();
        let nbdkit = self.nbdkit_pids();
        assert!(!nbdkit.is_empty(), "no nbdkit child found");
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill() on our own child's pid with a constant signal.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "serve-nbd did not stop on SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "serve-nbd exited with {status}:\n{}",
            self.log()
        );
        for p in nbdkit {
            assert!(
                !Path::new(&format!("/proc/{p}")).exists(),
                "nbdkit {p} is still there after serve-nbd stopped"
            );
        }
        if let Some(s) = &self.socket {
            assert!(!s.exists(), "socket {} left behind", s.display());
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // On a failed assertion: SIGKILL; nbdkit follows (--exit-with-parent).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn tool(program: &str, args: &[&str]) -> String {
    let out = run_tool(Command::new(program).args(args));
    String::from_utf8(out.stdout).unwrap()
}

/// `nbdinfo --map`: (offset, length, type) per line.
fn nbd_map(uri: &str) -> Vec<(u64, u64, u32)> {
    tool("nbdinfo", &["--map", uri])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

/// Type of the map entry covering `offset`.
fn map_type_at(map: &[(u64, u64, u32)], offset: u64) -> u32 {
    map.iter()
        .find(|(o, l, _)| (*o..o + l).contains(&offset))
        .map(|e| e.2)
        .unwrap()
}

fn open_repo(env: &Env) -> Repository {
    Repository::open_with_cache(
        Arc::new(LocalBackend::new(&env.repo)),
        || Ok(PASSWORD.as_bytes().to_vec()),
        false,
    )
    .unwrap()
}

fn read_file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

// ---- A minimal NBD client: newstyle handshake, simple replies. libnbd
// checks bounds and read-only flags on the client side, so requests that
// the server itself must refuse are sent through this.

const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;

struct RawNbd {
    s: UnixStream,
    size: u64,
}

impl RawNbd {
    fn connect(sock: &Path, export: &str) -> RawNbd {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        let gflags = u16::from_be_bytes([hello[16], hello[17]]);
        assert_eq!(
            gflags & 3,
            3,
            "server must offer fixed newstyle and no-zeroes"
        );
        s.write_all(&3u32.to_be_bytes()).unwrap();
        // NBD_OPT_EXPORT_NAME: the reply is the export itself.
        let name = export.as_bytes();
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes());
        opt.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
        opt.extend_from_slice(name);
        s.write_all(&opt).unwrap();
        let mut info = [0u8; 10];
        s.read_exact(&mut info).unwrap();
        RawNbd {
            size: u64::from_be_bytes(info[..8].try_into().unwrap()),
            s,
        }
    }

    fn request(&mut self, cmd: u16, handle: u64, offset: u64, len: u32) {
        let mut r = NBD_REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&r).unwrap();
    }

    /// Error code and handle of the next simple reply.
    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            NBD_SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..].try_into().unwrap()),
        )
    }

    /// A read: `Ok(data)` or `Err(NBD error code)`.
    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 7, offset, len);
        let (err, handle) = self.reply();
        assert_eq!(handle, 7);
        if err != 0 {
            return Err(err);
        }
        let mut buf = vec![0u8; usize::try_from(len).unwrap()];
        self.s.read_exact(&mut buf).unwrap();
        Ok(buf)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.request(CMD_WRITE, 9, offset, u32::try_from(data.len()).unwrap());
        self.s.write_all(data).unwrap();
        let (err, handle) = self.reply();
        assert_eq!(handle, 9);
        err
    }
}

const NBD_EPERM: u32 = 1;
const NBD_EIO: u32 = 5;
const NBD_EINVAL: u32 = 22;

// ---- Tests

#[test]
fn nbd_export_equals_restore_for_full_and_incremental_snapshots() {
    let env = Env::init(&[]);
    let raw = env.path("src.img");
    make_image(
        &raw,
        24 * MIB,
        &[
            (0, &random_bytes(21, 3 * MIB as usize)),
            (10 * MIB, &text_bytes(22, MIB as usize)),
        ],
    );
    let q = env.path("src.qcow2");
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    tool("qemu-img", &["bitmap", "--add", q.to_str().unwrap(), "bm0"]);
    let disk = format!("vda={}", q.display());

    let full = env.backup_json("vm", &[("vda", q.to_str().unwrap())], &["--bitmap", "bm0"]);
    let truth_full = sha256_file(&raw);
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x77 5M 512k",
            q.to_str().unwrap(),
        ],
    );
    let incr = env.backup_json("vm", &[("vda", q.to_str().unwrap())], &["--bitmap", "bm0"]);
    assert_eq!(
        incr["disks"][0]["mode"], "incremental",
        "second backup of {disk} should be incremental: {incr}"
    );
    let now = env.path("now.img");
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            q.to_str().unwrap(),
            now.to_str().unwrap(),
        ],
    );
    let truth_incr = sha256_file(&now);
    assert_ne!(truth_full, truth_incr);

    for (snap, truth) in [(&full["id"], &truth_full), (&incr["id"], &truth_incr)] {
        let id = snap.as_str().unwrap();
        assert_eq!(
            &sha256_file(&env.restore(id, "vda")),
            truth,
            "restore of {id}"
        );
        let s = serve(&env, id, &[]);
        assert!(s.uri.starts_with("nbd+unix:///vda?socket="), "{}", s.uri);
        let a = env.path(&format!("{id}-qemu-img.img"));
        tool(
            "qemu-img",
            &["convert", "-f", "raw", &s.uri, a.to_str().unwrap()],
        );
        assert_eq!(&sha256_file(&a), truth, "qemu-img convert of {id}");
        let b = env.path(&format!("{id}-nbdcopy.img"));
        tool("nbdcopy", &[&s.uri, b.to_str().unwrap()]);
        assert_eq!(&sha256_file(&b), truth, "nbdcopy of {id}");

        // Holes are reported as holes (type 3 = hole,zero), data as data.
        let map = nbd_map(&s.uri);
        assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), 24 * MIB);
        for off in [0, 2 * MIB, 10 * MIB] {
            assert_eq!(
                map_type_at(&map, off),
                0,
                "{id}: data at {off} should be data: {map:?}"
            );
        }
        for off in [3 * MIB, 8 * MIB, 12 * MIB, 24 * MIB - 1] {
            assert_eq!(
                map_type_at(&map, off),
                3,
                "{id}: hole at {off} should be hole,zero: {map:?}"
            );
        }
        let written = if id == incr["id"].as_str().unwrap() {
            0
        } else {
            3
        };
        assert_eq!(
            map_type_at(&map, 5 * MIB),
            written,
            "{id}: block at 5M: {map:?}"
        );
        s.stop();
    }
}

#[test]
fn abuse_out_of_range_writes_many_clients_and_dropped_clients() {
    let env = Env::init(&["--encryption", "none"]);
    let img = env.path("d.img");
    make_image(&img, 16 * MIB, &[(0, &random_bytes(31, 12 * MIB as usize))]);
    let id = env.backup("vm", &[("vda", &img)]);
    let mut s = serve(&env, &id, &[]);
    let sock = s.socket().to_path_buf();

    // A read past the end is refused by the server; the connection and the
    // server go on.
    let mut c = RawNbd::connect(&sock, "vda");
    assert_eq!(c.size, 16 * MIB);
    assert_eq!(c.read(16 * MIB - 512, 4096), Err(NBD_EINVAL));
    assert_eq!(c.read(u64::MAX - 100, 4096), Err(NBD_EINVAL));
    assert_eq!(c.read(0, 4096).unwrap(), read_file_range(&img, 0, 4096));
    // A write to the read-only export is refused by the server itself...
    assert_eq!(c.write(0, &[0xEE; 4096]), NBD_EPERM);
    assert_eq!(c.read(0, 4096).unwrap(), read_file_range(&img, 0, 4096));
    drop(c);
    // ...and by qemu-io.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xee 0 4k", &s.uri])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("wrote "),
        "qemu-io wrote to a read-only export: {text}"
    );
    assert!(
        text.contains("read-only")
            || text.contains("Permission denied")
            || text.contains("Read-only"),
        "qemu-io should be told the export is read-only: {text}"
    );
    // An unknown export name is refused.
    let h = ekko_libnbd::Handle::new().unwrap();
    assert!(h
        .connect_uri(&format!("nbd+unix:///nope?socket={}", sock.display()))
        .is_err());
    // The default export is the disk.
    let h = ekko_libnbd::Handle::new().unwrap();
    h.connect_uri(&format!("nbd+unix://?socket={}", sock.display()))
        .unwrap();
    assert_eq!(h.size().unwrap(), 16 * MIB);
    assert!(h.is_read_only().unwrap());
    assert!(h.can_multi_conn().unwrap());

    // Ten clients at once read random ranges while three others walk away
    // in the middle of an 8 MiB reply.
    let data = Arc::new(fs::read(&img).unwrap());
    let readers: Vec<_> = (0..10u64)
        .map(|t| {
            let uri = s.uri.clone();
            let data = Arc::clone(&data);
            std::thread::spawn(move || {
                let h = ekko_libnbd::Handle::new().unwrap();
                h.connect_uri(&uri).unwrap();
                let r = random_bytes(1000 + t, 8 * 40);
                for i in 0..40 {
                    let v = u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap());
                    let len = 1 + usize::try_from(v % (300 * 1024)).unwrap();
                    let off = (v >> 20) % (16 * MIB - u64::try_from(len).unwrap());
                    let mut buf = vec![0u8; len];
                    h.pread(&mut buf, off).unwrap();
                    let o = usize::try_from(off).unwrap();
                    assert!(
                        buf == data[o..o + len],
                        "client {t} read wrong data at {off}+{len}"
                    );
                }
            })
        })
        .collect();
    let droppers: Vec<_> = (0..3u64)
        .map(|t| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = RawNbd::connect(&sock, "vda");
                c.request(CMD_READ, t, 0, 8 * 1024 * 1024);
                let (err, _) = c.reply();
                assert_eq!(err, 0);
                let mut part = vec![0u8; 64 * 1024];
                c.s.read_exact(&mut part).unwrap();
                // Dropped here, with most of the reply unread.
            })
        })
        .collect();
    for t in readers.into_iter().chain(droppers) {
        t.join().expect("a client failed");
    }
    s.assert_running();
    let mut c = RawNbd::connect(&sock, "vda");
    assert_eq!(
        c.read(15 * MIB, 4096).unwrap(),
        read_file_range(&img, 15 * MIB, 4096)
    );
    s.stop();
}

#[test]
fn damaged_chunk_reads_as_eio_and_the_server_stays_up() {
    let env = Env::init(&["--encryption", "none"]);
    let img = env.path("d.img");
    make_image(&img, 4 * MIB, &[(0, &random_bytes(41, 4 * MIB as usize))]);
    let id = env.backup("vm", &[("vda", &img)]);
    let pack = env
        .pack_files()
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let f = fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.write_all_at(&[0x55; 64], 1_500_000).unwrap();
    drop(f);
    let s = serve(&env, &id, &[]);
    let mut c = RawNbd::connect(s.socket(), "vda");
    let mut eio = 0;
    for block in 0..4 {
        match c.read(block * MIB, 4096) {
            Ok(d) => assert_eq!(d, read_file_range(&img, block * MIB, 4096)),
            Err(e) => {
                assert_eq!(e, NBD_EIO, "damage must read as EIO");
                eio += 1;
            }
        }
    }
    assert_eq!(eio, 1, "exactly the damaged block fails");
    assert_eq!(
        tool("nbdinfo", &["--size", &s.uri]).trim(),
        (4 * MIB).to_string()
    );
    assert!(
        s.log().contains("damaged"),
        "the damage is logged: {}",
        s.log()
    );
    s.stop();
}

#[test]
fn writable_export_keeps_writes_in_a_discarded_overlay() {
    let env = Env::init(&[]);
    let img = env.path("d.img");
    make_image(&img, 16 * MIB, &[(0, &random_bytes(51, 4 * MIB as usize))]);
    let truth = sha256_file(&img);
    let id = env.backup("vm", &[("vda", &img)]);
    let before = env.repo_state();
    let tmp = env.path("tmp");
    fs::create_dir(&tmp).unwrap();
    let sock = env.path("rw.sock");
    let s = serve_with(
        &env,
        &[&id, "--socket", sock.to_str().unwrap(), "--writable"],
        Some(&tmp),
    );
    for (off, pat) in [("1M", "0x5a"), ("12M", "0xa5")] {
        tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {pat} {off} 64k"),
                &s.uri,
            ],
        );
    }
    // A new connection sees the writes.
    for (off, pat) in [("1M", "0x5a"), ("12M", "0xa5")] {
        let out = tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("read -P {pat} {off} 64k"),
                &s.uri,
            ],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
    let out = tool("qemu-io", &["-f", "raw", "-c", "read -P 0 8M 64k", &s.uri]);
    assert!(
        !out.contains("Pattern verification failed"),
        "untouched holes stay zero: {out}"
    );
    s.stop();

    assert!(
        fs::read_dir(&tmp).unwrap().next().is_none(),
        "the overlay or scratch files were left in TMPDIR"
    );
    assert_eq!(
        env.repo_state(),
        before,
        "serving writable changed the repository"
    );
    let report = ekko::check::check(&open_repo(&env), ekko::check::ReadData::All, 2).unwrap();
    assert!(
        report.ok(),
        "check after a writable export: {:?}",
        report.problems
    );
    assert_eq!(sha256_file(&env.restore(&id, "vda")), truth);
}

#[test]
fn vm_boots_from_the_nbd_export() {
    require("nasm");
    require("qemu-system-x86_64");
    let env = Env::init(&["--encryption", "none"]);
    let asm = env.path("boot.asm");
    write_file(
        &asm,
        br#"
; Prints a marker on COM1 and halts: proof that the BIOS read sector 0
; through the NBD export and ran it.
bits 16
org 0x7c00
start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov si, msg
next:
    lodsb
    test al, al
    jz done
    mov bl, al
    mov dx, 0x3fd           ; line status: wait until the transmitter is empty
wait_thr:
    in al, dx
    test al, 0x20
    jz wait_thr
    mov dx, 0x3f8
    mov al, bl
    out dx, al
    jmp next
done:
    hlt
    jmp done
msg: db "EKKO-BOOT-OK", 13, 10, 0
times 510 - ($ - $$) db 0
dw 0xaa55
"#,
    );
    let bin = env.path("boot.bin");
    tool(
        "nasm",
        &[
            "-f",
            "bin",
            "-o",
            bin.to_str().unwrap(),
            asm.to_str().unwrap(),
        ],
    );
    let boot = fs::read(&bin).unwrap();
    assert_eq!(boot.len(), 512);
    let img = env.path("vm.img");
    make_image(&img, 8 * MIB, &[(0, &boot)]);
    let id = env.backup("bootvm", &[("vda", &img)]);
    // A guest needs a writable disk (QEMU refuses a read-only IDE disk):
    // writes go to the server's throw-away overlay.
    let s = serve(&env, &id, &["--writable"]);

    let serial = env.path("serial.log");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "accel=tcg",
            "-m",
            "64",
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
        ])
        .args([
            "-monitor",
            "none",
            "-serial",
            &format!("file:{}", serial.display()),
        ])
        .args(["-drive", &format!("file={},format=raw,if=ide", s.uri)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-x86_64");
    let deadline = Instant::now() + Duration::from_secs(60);
    let booted = loop {
        if fs::read_to_string(&serial)
            .unwrap_or_default()
            .contains("EKKO-BOOT-OK")
        {
            break true;
        }
        if Instant::now() > deadline || qemu.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // QEMU by pid, whatever happened.
    let _ = qemu.kill();
    let out = qemu.wait_with_output().unwrap();
    assert!(
        booted,
        "no boot marker on the serial console within 60 s; serial: {:?}; qemu: {}; server: {}",
        fs::read_to_string(&serial).unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
    s.stop();
}

#[test]
fn tcp_with_tls_psk_and_a_clean_stop() {
    let env = Env::init(&["--encryption", "none"]);
    let img = env.path("d.img");
    make_image(&img, 2 * MIB, &[(MIB, &random_bytes(61, 1000))]);
    let id = env.backup("vm", &[("vda", &img)]);
    let psk = env.path("keys.psk");
    write_file(
        &psk,
        format!("ekko:{}\n", hex(&random_bytes(62, 32))).as_bytes(),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let s = serve_with(
        &env,
        &[&id, "--listen", &listen, "--tls-psk", psk.to_str().unwrap()],
        None,
    );
    assert!(
        s.uri.starts_with(&format!("nbds://ekko@{listen}/vda?")),
        "{}",
        s.uri
    );
    assert_eq!(
        tool("nbdinfo", &["--size", &s.uri]).trim(),
        (2 * MIB).to_string()
    );
    let out = env.path("tls.img");
    tool("nbdcopy", &[&s.uri, out.to_str().unwrap()]);
    assert_eq!(sha256_file(&out), sha256_file(&img));
    // Without TLS the server refuses.
    let plain = Command::new("nbdinfo")
        .args(["--size", &format!("nbd://{listen}/vda")])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a client without TLS was served");
    s.stop();
}

#[test]
fn serve_nbd_reports_bad_arguments_before_starting() {
    require_nbd();
    let env = Env::init(&["--encryption", "none"]);
    let a = env.path("a.img");
    let b = env.path("b.img");
    make_image(&a, MIB, &[(0, b"a")]);
    make_image(&b, MIB, &[(0, b"b")]);
    let two = env.backup("two", &[("vda", &a), ("vdb", &b)]);
    let sock = env.path("x.sock");
    let sock = sock.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut full = vec!["serve-nbd"];
        full.extend_from_slice(args);
        env.run(&full)
    };
    let err = assert_clean_failure(&run(&[&two, "--socket", sock]), "--disk");
    assert!(
        err.contains("vda") && err.contains("vdb"),
        "the disks are listed: {err}"
    );
    assert_clean_failure(
        &run(&[&two, "--disk", "nope", "--socket", sock]),
        "has no disk",
    );
    assert_clean_failure(
        &run(&["abcdef0123", "--socket", sock]),
        "no snapshot matches",
    );
    let out = env
        .cmd()
        .args(["serve-nbd", &two, "--disk", "vda", "--socket", sock])
        .env("EKKO_NBD_PLUGIN", "/nonexistent/libekko_nbd.so")
        .output()
        .unwrap();
    assert_clean_failure(&out, "plugin");
    // A socket someone else listens on is not taken over.
    let busy = env.path("busy.sock");
    let _l = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    assert_clean_failure(
        &run(&[&two, "--disk", "vda", "--socket", busy.to_str().unwrap()]),
        "in use",
    );
    assert!(!Path::new(sock).exists());
}
