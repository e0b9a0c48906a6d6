//! Repositories on an S3-compatible object store: a real OpenStack Swift
//! all-in-one (Debian's swift 2.30.1 with `s3api` and `tempauth`) that
//! `scripts/test` starts once for the whole suite (`scripts/swift-aio`).
//!
//! Every test works under its own random prefix of the one bucket, so they
//! run in parallel. Without the Swift environment the tests fail (never
//! skip), saying how to run them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ekko::backend::{S3Backend, S3Location};
use ekko::Backend;

use crate::capture::qsd::{Qsd, MIB};
use crate::capture::{assert_restores, disk, live, references};
use crate::fuse::Mounted;
use crate::nbd::{serve, tool};
use crate::util::*;

/// The Swift that `scripts/test` started.
struct Swift {
    endpoint: String,
    bucket: String,
    access: String,
    secret: String,
    region: String,
    dir: Option<PathBuf>,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: the S3 tests need the Swift all-in-one; run them through \
             scripts/test (it starts Swift once for the suite), or start one with \
             `scripts/swift-aio start DIR` and `source DIR/env`"
        )
    })
}

fn swift() -> Swift {
    Swift {
        endpoint: var("EKKO_TEST_S3_ENDPOINT"),
        bucket: var("EKKO_TEST_S3_BUCKET"),
        access: var("EKKO_TEST_S3_ACCESS_KEY"),
        secret: var("EKKO_TEST_S3_SECRET_KEY"),
        region: std::env::var("EKKO_TEST_S3_REGION").unwrap_or_else(|_| "us-east-1".into()),
        dir: std::env::var_os("EKKO_TEST_SWIFT_DIR").map(PathBuf::from),
    }
}

/// A scratch folder whose repository is `s3://BUCKET/t/<tag>-<random>` on
/// the test Swift, reached through `endpoint`.
pub(crate) fn s3_env_at(tag: &str, endpoint: &str) -> Env {
    let s = swift();
    let mut e = Env::new();
    e.repo = PathBuf::from(format!(
        "s3://{}/t/{tag}-{:08x}",
        s.bucket,
        rand::random::<u32>()
    ));
    set_endpoint(&mut e, endpoint);
    e
}

pub(crate) fn set_endpoint(e: &mut Env, endpoint: &str) {
    let s = swift();
    e.vars = vec![
        ("AWS_ACCESS_KEY_ID".into(), s.access.clone()),
        ("AWS_SECRET_ACCESS_KEY".into(), s.secret.clone()),
        ("AWS_REGION".into(), s.region.clone()),
        ("EKKO_S3_ENDPOINT".into(), endpoint.into()),
    ];
}

pub(crate) fn s3_env(tag: &str) -> Env {
    s3_env_at(tag, &swift().endpoint)
}

/// The repository's objects, opened in this process.
pub(crate) fn backend(env: &Env) -> S3Backend {
    let s = swift();
    let mut loc = S3Location::parse(env.repo.to_str().unwrap()).unwrap();
    loc.endpoint = Some(s.endpoint.clone());
    loc.path_style = true;
    loc.region = Some(s.region.clone());
    S3Backend::open_with_keys(loc, &s.access, &s.secret).expect("opening the test bucket")
}

fn stored_pack_bytes(env: &Env) -> u64 {
    backend(env)
        .list("packs/")
        .unwrap()
        .iter()
        .map(|o| o.size)
        .sum()
}

fn qcow2_with_bitmap(env: &Env, raw: &Path, name: &str) -> PathBuf {
    let q = env.path(name);
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
    q
}

fn qcow2_to_raw(q: &Path, raw: &Path) {
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            q.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}

fn id(v: &serde_json::Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

/// Full and incremental backups of the same qcow2 history into a local and
/// a Swift repository: restores, the FUSE images and the NBD export of the
/// Swift one all equal the disk at each instant, and equal the local ones.
#[test]
fn s3_full_incremental_restore_mount_and_nbd_equal_local() {
    let s3 = s3_env("image");
    s3.ok(&["init"]);
    let local = Env::init(&[]);
    // Packs are 32 MiB on an object store (one PUT each), 16 MiB locally.
    let pack_size = |b: std::sync::Arc<dyn Backend>| {
        ekko::Repository::open_with_cache(b, || Ok(PASSWORD.as_bytes().to_vec()), false)
            .unwrap()
            .config()
            .pack_size
    };
    assert_eq!(pack_size(std::sync::Arc::new(backend(&s3))), 32 << 20);
    let local_backend = ekko::LocalBackend::new(&local.repo);
    assert_eq!(pack_size(std::sync::Arc::new(local_backend)), 16 << 20);
    let raw = s3.path("src.img");
    make_image(
        &raw,
        24 * MIB,
        &[
            (0, &random_bytes(71, 3 * MIB as usize)),
            (10 * MIB, &text_bytes(72, MIB as usize)),
        ],
    );
    let truth_full = sha256_file(&raw);
    let mut snaps = Vec::new(); // (env, full id, incremental id)
    let mut truth_incr = String::new();
    for (env, name) in [(&s3, "s3.qcow2"), (&local, "local.qcow2")] {
        let q = qcow2_with_bitmap(&s3, &raw, name);
        let qs = q.to_str().unwrap();
        let full = env.backup_json("vm", &[("vda", qs)], &["--bitmap", "bm0"]);
        tool(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x77 5M 512k", qs],
        );
        tool(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x78 20M 64k", qs],
        );
        let incr = env.backup_json("vm", &[("vda", qs)], &["--bitmap", "bm0"]);
        assert_eq!(incr["disks"][0]["mode"], "incremental", "{incr}");
        assert_eq!(incr["parent"], full["id"], "{incr}");
        let now = s3.path(&format!("{name}.now.raw"));
        qcow2_to_raw(&q, &now);
        truth_incr = sha256_file(&now);
        snaps.push((env, id(&full), id(&incr)));
    }
    assert_ne!(truth_full, truth_incr);
    for (env, full, incr) in &snaps {
        for (snap, truth) in [(full, &truth_full), (incr, &truth_incr)] {
            let out = env.restore(snap, "vda");
            assert_eq!(
                &sha256_file(&out),
                truth,
                "restore of {snap} from {:?}",
                env.repo
            );
            fs::remove_file(out).unwrap();
        }
        env.ok(&["check", "--read-data"]);
    }
    // The same bytes were stored in both (modulo pack names).
    let local_bytes: u64 = local
        .pack_files()
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    let s3_bytes = stored_pack_bytes(&s3);
    assert_eq!(s3_bytes, local_bytes, "packs on Swift vs locally");

    let (_, full, incr) = &snaps[0];
    let listing = s3.ok(&["snapshots"]);
    assert!(
        listing.contains(&full[..8]) && listing.contains(&incr[..8]),
        "{listing}"
    );

    // NBD export of the Swift repository, read by nbdcopy.
    for (snap, truth) in [(full, &truth_full), (incr, &truth_incr)] {
        let served = serve(&s3, snap, &[]);
        let info = tool("nbdinfo", &["--size", &served.uri]);
        assert_eq!(info.trim(), (24 * MIB).to_string());
        let copy = s3.path(&format!("nbd-{snap}.raw"));
        tool("nbdcopy", &[&served.uri, copy.to_str().unwrap()]);
        assert_eq!(&sha256_file(&copy), truth, "NBD export of {snap}");
        served.stop();
    }

    // FUSE mount of the Swift repository.
    let m = Mounted::start(&s3, &s3.path("mnt"));
    assert_eq!(
        sha256_file(&m.path(&format!("ids/{full}/vda.img"))),
        truth_full
    );
    assert_eq!(
        sha256_file(&m.path(&format!("ids/{incr}/vda.img"))),
        truth_incr
    );
    assert_eq!(sha256_file(&m.path("vm/latest/vda.img")), truth_incr);
}

/// A live backup of a running qemu-storage-daemon (QMP, fleecing, dirty
/// bitmaps) into Swift restores each instant exactly.
#[test]
fn s3_live_capture_full_then_incremental() {
    let env = s3_env("live");
    env.ok(&["init"]);
    let qsd = Qsd::start(1, 32 * MIB);
    qsd.write("disk0", 0x11, 0, 3 * MIB);
    let refs0 = references(&qsd, &env, &["disk0"]);
    let (full, _) = live(&env, &qsd, &[]);
    assert_eq!(disk(&full, "disk0")["mode"], "full", "{full}");
    qsd.write("disk0", 0x22, 9 * MIB, 128 * 1024);
    let refs1 = references(&qsd, &env, &["disk0"]);
    let (inc, _) = live(&env, &qsd, &[]);
    assert_eq!(disk(&inc, "disk0")["mode"], "incremental", "{inc}");
    assert_restores(&env, &id(&full), &["disk0"], &refs0);
    assert_restores(&env, &id(&inc), &["disk0"], &refs1);
    env.ok(&["check", "--read-data"]);
}

fn spawn_backup(env: &Env, vm: &str, img: &Path) -> Child {
    env.cmd()
        .args(["backup", "--json", "--vm", vm, "--disk"])
        .arg(format!("sda={}", img.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ekko backup")
}

/// Four hosts (four processes, four index caches) back up four VMs cloned
/// from one base image into one repository at the same moment.
#[test]
fn s3_four_concurrent_backups_of_clones_store_the_base_once() {
    const SIZE: u64 = 64 * MIB;
    const BASE: usize = 40 << 20;
    const DELTA: usize = 3 << 20;
    let env = s3_env("clones");
    env.ok(&["init"]);
    let base = env.path("base.img");
    make_image(&base, SIZE, &[(0, &random_bytes(80, BASE))]);
    // The base image is in the repository (the template VM's backup).
    env.backup("template", &[("sda", &base)]);
    let after_base = stored_pack_bytes(&env);
    assert!(after_base >= BASE as u64, "{after_base}");

    let mut clones = Vec::new();
    for i in 0..4u64 {
        let img = env.path(&format!("clone{i}.img"));
        fs::copy(&base, &img).unwrap();
        // Each clone diverges: a private delta, inside and after the base.
        write_at(&img, (4 + 11 * i) * MIB, &random_bytes(90 + i, DELTA));
        let mut host = Env::new();
        host.repo = env.repo.clone();
        host.vars = env.vars.clone();
        clones.push((host, img));
    }
    let children: Vec<Child> = clones
        .iter()
        .enumerate()
        .map(|(i, (host, img))| spawn_backup(host, &format!("vm{i}"), img))
        .collect();
    let mut ids = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert_success(&out, &["backup (concurrent)"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        ids.push(id(&v));
    }
    env.ok(&["check", "--read-data"]);
    for (snap, (_, img)) in ids.iter().zip(&clones) {
        let out = env.restore(snap, "sda");
        assert_eq!(sha256_file(&out), sha256_file(img), "restore of {snap}");
        fs::remove_file(out).unwrap();
    }
    // One base plus four deltas, plus map nodes and pack overhead; a second
    // copy of the base would exceed it by far.
    let total = stored_pack_bytes(&env);
    let bound = BASE as u64 + 4 * DELTA as u64 + 4 * MIB;
    assert!(
        total <= bound,
        "stored {total} bytes, more than base + 4 deltas ({bound})"
    );
    assert!(total >= BASE as u64 + 4 * DELTA as u64, "{total}");
}

fn kill(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(libc::pid_t::try_from(child.id()).unwrap(), sig) };
}

fn finish(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

/// A backup into Swift killed at random points leaves nothing that hurts:
/// the next backup succeeds, check passes, every snapshot restores.
#[test]
fn s3_killed_backups_then_next_run_succeeds() {
    let env = s3_env("kill");
    env.ok(&["init"]);
    let img = env.path("disk.img");
    make_image(&img, 96 * MIB, &[(0, &random_bytes(100, 64 << 20))]);
    let mut rng_state = rand::random::<u64>() | 1;
    for round in 0..3u64 {
        write_at(&img, round * 7 * MIB, &random_bytes(200 + round, 2 << 20));
        let child = spawn_backup(&env, "vm", &img);
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let delay = 50 + rng_state % 1200;
        std::thread::sleep(Duration::from_millis(delay));
        kill(&child, libc::SIGKILL);
        let out = finish(child);
        eprintln!("round {round}: killed after {delay} ms ({})", out.status);
    }
    let snap = env.backup("vm", &[("sda", &img)]);
    env.ok(&["check", "--read-data"]);
    let out = env.restore(&snap, "sda");
    assert_eq!(sha256_file(&out), sha256_file(&img));
}

/// A proxy of our own (same storage, another port) that the test may stop.
pub(crate) struct Proxy {
    pid: i32,
    pub(crate) endpoint: String,
    stopped: std::cell::Cell<bool>,
}

pub(crate) fn start_proxy(name: &str) -> Proxy {
    let dir = swift()
        .dir
        .unwrap_or_else(|| PathBuf::from(var("EKKO_TEST_SWIFT_DIR")));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/swift-aio");
    let out = Command::new(script)
        .arg("proxy")
        .arg(&dir)
        .arg(name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "swift-aio proxy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    let mut it = s.split_whitespace();
    let pid: i32 = it.next().unwrap().parse().unwrap();
    let port: u16 = it.next().unwrap().parse().unwrap();
    Proxy {
        pid,
        endpoint: format!("http://127.0.0.1:{port}"),
        stopped: std::cell::Cell::new(false),
    }
}

impl Proxy {
    /// Stop it once (never signal a pid that may have been reused since).
    pub(crate) fn stop(&self) {
        if !self.stopped.replace(true) {
            // SAFETY: kill(2) on the proxy this test started (its pid).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stopping the Swift proxy in the middle of a backup is a clean error
/// (non-zero exit, a message naming the store, no panic, no long hang);
/// once the store is back the next backup succeeds and check passes.
#[test]
fn s3_proxy_stopped_mid_backup_is_a_clean_error() {
    let proxy = start_proxy(&format!("stop-{:08x}", rand::random::<u32>()));
    let mut env = s3_env_at("proxy", &proxy.endpoint);
    env.ok(&["init"]);
    let img = env.path("disk.img");
    make_image(&img, 160 * MIB, &[(0, &random_bytes(300, 160 << 20))]);
    let child = spawn_backup(&env, "vm", &img);
    std::thread::sleep(Duration::from_millis(300));
    proxy.stop();
    let started = Instant::now();
    let out = finish(child);
    let took = started.elapsed();
    let err = assert_clean_failure(&out, "object store");
    assert!(
        err.contains("reachable") || err.contains("onnect"),
        "the message should say the store is unreachable: {err}"
    );
    assert!(
        took < Duration::from_secs(90),
        "gave up only after {took:?}"
    );
    // Other commands fail the same way, quickly.
    let started = Instant::now();
    let out = env.run(&["snapshots"]);
    assert_clean_failure(&out, "reachable");
    assert!(started.elapsed() < Duration::from_secs(30));

    // The store is back (a new proxy on the same storage).
    let back = start_proxy(&format!("back-{:08x}", rand::random::<u32>()));
    drop(proxy);
    set_endpoint(&mut env, &back.endpoint);
    let snap = env.backup("vm", &[("sda", &img)]);
    env.ok(&["check", "--read-data"]);
    let out = env.restore(&snap, "sda");
    assert_eq!(sha256_file(&out), sha256_file(&img));
    fs::remove_file(&out).unwrap();

    // The proxy dies during a restore: a clean error too, and the partial
    // output is not mistaken for a good one (the exit status says so).
    let to = env.path("partial.img");
    let child = env
        .cmd()
        .args(["restore", &snap, "--to", to.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    back.stop();
    let out = finish(child);
    assert_clean_failure(&out, "object store");

    let again = start_proxy(&format!("again-{:08x}", rand::random::<u32>()));
    set_endpoint(&mut env, &again.endpoint);
    env.ok(&["check", "--read-data"]);
    let out = env.restore(&snap, "sda");
    assert_eq!(sha256_file(&out), sha256_file(&img));
}

/// Four hosts back up clones of one base image into an empty repository at
/// the same moment, so all four encode and upload the same base chunks
/// concurrently (no host can see another's uncommitted packs). Every
/// snapshot must still verify and restore exactly; the space cost is at
/// most one base copy per host.
#[test]
fn s3_four_concurrent_first_backups_race_on_the_same_chunks() {
    const BASE: usize = 24 << 20;
    const DELTA: usize = 2 << 20;
    let env = s3_env("race");
    env.ok(&["init"]);
    let base = env.path("base.img");
    make_image(&base, 32 * MIB, &[(0, &random_bytes(600, BASE))]);
    let mut hosts = Vec::new();
    for i in 0..4u64 {
        let img = env.path(&format!("clone{i}.img"));
        fs::copy(&base, &img).unwrap();
        write_at(&img, (2 + 6 * i) * MIB, &random_bytes(610 + i, DELTA));
        let mut host = Env::new();
        host.repo = env.repo.clone();
        host.vars = env.vars.clone();
        if i == 0 {
            // Loopback bodies go unsigned by default; one host signs them.
            host.vars
                .push(("AWS_UNSIGNED_PAYLOAD".into(), "false".into()));
        }
        hosts.push((host, img));
    }
    let children: Vec<Child> = hosts
        .iter()
        .enumerate()
        .map(|(i, (host, img))| spawn_backup(host, &format!("vm{i}"), img))
        .collect();
    let mut ids = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert_success(&out, &["backup (concurrent, empty repository)"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        ids.push(id(&v));
    }
    env.ok(&["check", "--read-data"]);
    for (snap, (host, img)) in ids.iter().zip(&hosts) {
        // Each host, with its own cache, and a fresh one, restore exactly.
        for e in [host, &env] {
            let out = e.restore(snap, "sda");
            assert_eq!(sha256_file(&out), sha256_file(img), "restore of {snap}");
            fs::remove_file(out).unwrap();
        }
    }
    let total = stored_pack_bytes(&env);
    eprintln!(
        "four concurrent first backups stored {total} bytes (one base {BASE}, four deltas {})",
        4 * DELTA
    );
    assert!(total >= (BASE + 4 * DELTA) as u64, "{total}");
    assert!(total <= 4 * (BASE + DELTA) as u64 + 4 * MIB, "{total}");
    // A fifth backup after them dedups against what they committed.
    let img = env.path("clone4.img");
    fs::copy(&base, &img).unwrap();
    write_at(&img, 30 * MIB, &random_bytes(620, DELTA));
    env.backup("vm4", &[("sda", &img)]);
    let grew = stored_pack_bytes(&env) - total;
    assert!(
        grew <= DELTA as u64 + 2 * MIB,
        "the fifth clone stored {grew} bytes"
    );
    // The extra copies of the base are garbage: two prunes a grace period
    // apart (mark, then delete) bring the store back to about one base and
    // five deltas (prune's default leaves less than 10% of the store as
    // garbage; here one chunk of slack), and every snapshot still restores
    // exactly.
    let prune = ["prune", "--grace", "2s", "--clock-skew", "0s", "--json"];
    // Every pack older than the grace period (plus Swift's one-second
    // timestamps) first: prune keeps younger packs whole, and a young extra
    // copy of the base would only be repacked by the second prune, deleted
    // by a third. This test is about where the copies end up, not timing.
    std::thread::sleep(Duration::from_secs(4));
    let first = env.ok(&prune);
    std::thread::sleep(Duration::from_secs(4));
    let second = env.ok(&prune);
    let after = stored_pack_bytes(&env);
    eprintln!(
        "after prune: {after} bytes (one base {BASE}, five deltas {})",
        5 * DELTA
    );
    assert!(
        after <= (BASE + 5 * DELTA) as u64 + MIB,
        "prune left {after} bytes of packs; the prunes said\n{first}\n{second}"
    );
    env.ok(&["check", "--read-data"]);
    let fifth = env.ok(&["snapshots", "--vm", "vm4", "--json"]);
    let fifth: serde_json::Value = serde_json::from_str(&fifth).unwrap();
    let fifth = fifth[0]["id"].as_str().unwrap().to_string();
    for (snap, img) in ids
        .iter()
        .zip(hosts.iter().map(|(_, img)| img))
        .chain([(&fifth, &img)])
    {
        let out = env.restore(snap, "sda");
        assert_eq!(
            sha256_file(&out),
            sha256_file(img),
            "restore of {snap} after prune"
        );
        fs::remove_file(out).unwrap();
    }
}

/// Two overlapping backups of clones through Swift: the one running behind
/// deduplicates against what the other has stored and published so far.
#[test]
fn s3_overlapping_backups_share_progress() {
    crate::engine::overlapping_backups_share_progress(|| {
        let env = s3_env("share");
        env.ok(&["init", "--pack-size", "1M"]);
        env
    });
}

/// The local index cache is only a cache: cold, deleted, damaged, or stale
/// because another host added and replaced index files.
#[test]
fn s3_cache_cold_deleted_damaged_and_stale() {
    let a = s3_env("cache");
    a.ok(&["init"]);
    let img1 = a.path("one.img");
    make_image(&img1, 16 * MIB, &[(0, &random_bytes(400, 6 << 20))]);
    let s1 = a.backup("vm", &[("sda", &img1)]);
    let truth1 = sha256_file(&img1);
    let restore_is = |env: &Env, snap: &str, truth: &str| {
        let out = env.restore(snap, "sda");
        assert_eq!(sha256_file(&out), truth, "restore of {snap}");
        fs::remove_file(out).unwrap();
    };

    // Cold: another host, with no cache at all.
    let mut b = Env::new();
    b.repo = a.repo.clone();
    b.vars = a.vars.clone();
    restore_is(&b, &s1, &truth1);

    // Deleted.
    fs::remove_dir_all(&a.cache).unwrap();
    restore_is(&a, &s1, &truth1);
    a.ok(&["check", "--read-data"]);

    // Damaged: garbage in place of the database.
    let db = fs::read_dir(&a.cache)
        .unwrap()
        .map(|e| e.unwrap().path().join("index.redb"))
        .find(|p| p.exists())
        .expect("a cache database");
    fs::write(&db, random_bytes(401, 100_000)).unwrap();
    restore_is(&a, &s1, &truth1);

    // Stale, new files: host B adds a snapshot that dedups against A's.
    let img2 = a.path("two.img");
    fs::copy(&img1, &img2).unwrap();
    write_at(&img2, 8 * MIB, &random_bytes(402, 3 << 20));
    let s2 = b.backup("vm", &[("sda", &img2)]);
    restore_is(&a, &s2, &sha256_file(&img2));

    // Stale, files gone: B rewrites the index files (new names, old ones
    // deleted). A's cache names files that no longer exist and must be
    // rebuilt, or A would dedup against the wrong knowledge.
    b.ok(&["index", "rebuild"]);
    let img3 = a.path("three.img");
    fs::copy(&img2, &img3).unwrap();
    write_at(&img3, 12 * MIB, &random_bytes(403, MIB as usize));
    let s3 = a.backup("vm", &[("sda", &img3)]);
    a.ok(&["check", "--read-data"]);
    b.ok(&["check", "--read-data"]);
    restore_is(&b, &s3, &sha256_file(&img3));
    restore_is(&a, &s1, &truth1);
    restore_is(&b, &s2, &sha256_file(&img2));
}

/// Errors that a user can act on: a missing bucket, bad credentials and an
/// unreachable endpoint each name the problem and exit non-zero.
#[test]
fn s3_setup_errors_are_actionable() {
    let s = swift();
    let mut env = s3_env("errors");
    env.repo = PathBuf::from(format!(
        "s3://no-such-bucket-{:08x}/x",
        rand::random::<u32>()
    ));
    assert_clean_failure(&env.run(&["init"]), "does not exist");

    let mut env = s3_env("errors");
    env.vars[1].1 = "wrong-secret".into();
    assert_clean_failure(&env.run(&["init"]), "AWS_SECRET_ACCESS_KEY");

    let env = s3_env_at("errors", "http://127.0.0.1:9");
    let started = Instant::now();
    assert_clean_failure(&env.run(&["init"]), "EKKO_S3_ENDPOINT");
    assert!(started.elapsed() < Duration::from_secs(30));

    // No repository under the prefix yet.
    let env = s3_env("errors");
    assert_clean_failure(&env.run(&["snapshots"]), "ekko init");

    // ?endpoint= in the URL works without EKKO_S3_ENDPOINT.
    let mut env = s3_env("url");
    env.vars.retain(|(k, _)| k != "EKKO_S3_ENDPOINT");
    env.repo = PathBuf::from(format!("{}?endpoint={}", env.repo.display(), s.endpoint));
    env.ok(&["init"]);
    env.ok(&["snapshots"]);
}

/// Damage on the object store (one flipped bit in a pack, a truncated pack)
/// is found by check and stops a restore, naming the chunk, also when the
/// restore fetches many chunks with one request.
#[test]
fn s3_damaged_packs_are_detected_and_never_restored() {
    let env = s3_env("damage");
    env.ok(&["init", "--chunk-size", "64K"]);
    let img = env.path("d.img");
    make_image(&img, 6 * MIB, &[(0, &random_bytes(500, 6 << 20))]);
    let id = env.backup("vm", &[("sda", &img)]);
    let b = backend(&env);
    let mut packs = b.list("packs/").unwrap();
    packs.sort_by_key(|o| std::cmp::Reverse(o.size));
    let pack = &packs[0];
    let orig = b.get(&pack.name).unwrap();
    let mut bad = orig.clone();
    let at = bad.len() / 3;
    bad[at] ^= 0x10;
    b.put(&pack.name, &bad).unwrap();

    let out = env.run(&["check", "--read-data"]);
    assert_eq!(out.status.code(), Some(3), "check must exit 3 on damage");
    let report = String::from_utf8_lossy(&out.stdout);
    let short = pack.name.rsplit('/').next().unwrap();
    assert!(
        report.contains("chunk ") && report.contains(short),
        "{report}"
    );
    let to = env.path("r.img");
    let out = env.run(&["restore", &id, "--to", to.to_str().unwrap()]);
    assert_clean_failure(&out, "damaged");
    assert_eq!(out.status.code(), Some(3));

    // Truncated: the end of the pack is gone.
    b.put(&pack.name, &orig[..orig.len() / 2]).unwrap();
    let _ = fs::remove_file(&to);
    let out = env.run(&["restore", &id, "--to", to.to_str().unwrap()]);
    assert_clean_failure(&out, "damaged");
    assert_eq!(out.status.code(), Some(3));

    // Repaired: the restore is exact again.
    b.put(&pack.name, &orig).unwrap();
    let out = env.restore(&id, "sda");
    assert_eq!(sha256_file(&out), sha256_file(&img));
}

/// A store with slow commits, beside the real one: it proves that a backup
/// keeps several pack uploads in flight when the backend asks for them, and
/// never more than it asks for (the memory bound).
mod overlap {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use ekko::backend::{Backend, ObjectInfo, ObjectWriter};
    use ekko::backup::{BackupOptions, DiskPlan, Session};
    use ekko::snapshot::{Capture, CaptureMode};
    use ekko::source::FileSource;
    use ekko::{InitOptions, LocalBackend, Repository};

    use crate::util::*;

    struct Slow {
        inner: LocalBackend,
        uploads: usize,
        now: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
    }

    struct SlowWriter {
        inner: Box<dyn ObjectWriter>,
        pack: bool,
        now: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
    }

    impl ObjectWriter for SlowWriter {
        fn write(&mut self, data: &[u8]) -> ekko::Result<()> {
            self.inner.write(data)
        }
        fn len(&self) -> u64 {
            self.inner.len()
        }
        fn commit(self: Box<Self>) -> ekko::Result<()> {
            if !self.pack {
                return self.inner.commit();
            }
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(n, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(150)); // request latency
            let r = self.inner.commit();
            self.now.fetch_sub(1, Ordering::SeqCst);
            r
        }
    }

    impl Backend for Slow {
        fn create(&self, name: &str) -> ekko::Result<Box<dyn ObjectWriter>> {
            Ok(Box::new(SlowWriter {
                inner: self.inner.create(name)?,
                pack: name.starts_with("packs/"),
                now: Arc::clone(&self.now),
                peak: Arc::clone(&self.peak),
            }))
        }
        fn get_range(&self, name: &str, offset: u64, len: usize) -> ekko::Result<Vec<u8>> {
            self.inner.get_range(name, offset, len)
        }
        fn get(&self, name: &str) -> ekko::Result<Vec<u8>> {
            self.inner.get(name)
        }
        fn size(&self, name: &str) -> ekko::Result<u64> {
            self.inner.size(name)
        }
        fn list(&self, prefix: &str) -> ekko::Result<Vec<ObjectInfo>> {
            self.inner.list(prefix)
        }
        fn delete(&self, name: &str) -> ekko::Result<()> {
            self.inner.delete(name)
        }
        fn location(&self) -> String {
            self.inner.location()
        }
        fn write_concurrency(&self) -> usize {
            self.uploads
        }
    }

    fn peak_uploads(uploads: usize) -> (usize, usize) {
        let env = Env::new();
        let backend = Arc::new(Slow {
            inner: LocalBackend::new(&env.repo),
            uploads,
            now: Arc::default(),
            peak: Arc::default(),
        });
        let opts = InitOptions {
            encrypt: false,
            pack_size: 1 << 20,
            chunk_size: 64 << 10,
            ..InitOptions::default()
        };
        Repository::init(backend.clone(), &opts, None).unwrap();
        let repo = Repository::open_with_cache(backend.clone(), || Ok(Vec::new()), false).unwrap();
        let img = env.path("d.img");
        make_image(&img, 16 << 20, &[(0, &random_bytes(700, 12 << 20))]);
        let src = FileSource::open(&img).unwrap();
        let mut s = Session::new(&repo).unwrap();
        s.backup_disk(
            DiskPlan {
                name: "sda".into(),
                source: &src,
                incremental_parent: None,
                first: true,
                capture: Capture {
                    mode: CaptureMode::Full,
                    bitmap: None,
                    next_bitmap: None,
                    reason: None,
                },
            },
            &BackupOptions::default(),
        )
        .unwrap();
        s.commit("vm", ekko::time::now_rfc3339(), None).unwrap();
        let packs = backend.list("packs/").unwrap().len();
        (backend.peak.load(Ordering::SeqCst), packs)
    }

    #[test]
    fn pack_uploads_overlap_up_to_the_backends_concurrency() {
        let (peak, packs) = peak_uploads(4);
        assert!(packs >= 10, "{packs} packs");
        assert!((2..=4).contains(&peak), "peak of {peak} uploads in flight");
        let (peak, _) = peak_uploads(1);
        assert_eq!(peak, 1, "a local folder uploads one pack at a time");
    }
}
