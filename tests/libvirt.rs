//! `ekko backup --domain` against the real libvirtd with tiny TCG domains.
//!
//! libvirtd must run (scripts/test starts it once for the suite); these
//! tests fail, never skip, when it does not answer. "The disk at an
//! instant" is the model each disk keeps of the guest writes
//! (`util/domain.rs`), checked against the images at the end of a test.

#[path = "util/domain.rs"]
mod domain;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;
use domain::{dir_entries, virsh, virsh_ok, Content, Domain, MIB};

/// The repository's chunk size (the default).
const CHUNK: u64 = MIB;

fn args(dom: &Domain, work: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "backup",
        "--json",
        "--domain",
        &dom.name,
        "--workdir",
        work.to_str().unwrap(),
        "--threads",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A backup that must succeed, checked for what every backup must leave:
/// no job, no scratch files, and of this repository's checkpoints only the
/// new one. Returns the JSON summary and stderr.
fn backup(env: &Env, dom: &Domain, extra: &[&str]) -> (Value, String) {
    let work = env.path("work");
    let a = args(dom, &work, extra);
    let out = env.run(&a);
    assert_success(&out, &a);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_clean_after(dom, &work, &v);
    (v, err)
}

fn assert_clean_after(dom: &Domain, work: &Path, v: &Value) {
    if v["running"] == true {
        assert!(!dom.has_job(), "a job is left on {}", dom.name);
        let cp = v["checkpoint"].as_str().expect("a checkpoint");
        let ours: Vec<String> = dom
            .checkpoints()
            .into_iter()
            .filter(|c| c.starts_with("ekko-"))
            .collect();
        assert_eq!(ours, [cp], "only the newest checkpoint of ekko remains");
    }
    assert_eq!(
        dir_entries(work),
        Vec::<String>::new(),
        "stale files in the work directory"
    );
}

fn disk<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no disk {name} in {v}"))
}

fn mode(v: &Value, name: &str) -> String {
    disk(v, name)["mode"].as_str().unwrap().to_string()
}

fn reason(v: &Value, name: &str) -> String {
    disk(v, name)["reason"].as_str().unwrap_or("").to_string()
}

fn assert_restore(env: &Env, v: &Value, target: &str, want_sha: &str) {
    let id = v["id"].as_str().unwrap();
    let out = env.restore(id, target);
    assert_eq!(
        sha256_file(&out),
        want_sha,
        "restore of {target} from snapshot {id} differs from the disk at its instant"
    );
}

fn content(seed: u64, parts: &[(u64, u64)]) -> Content {
    parts
        .iter()
        .enumerate()
        .map(|(i, &(off, len))| {
            (
                off,
                random_bytes(
                    seed + u64::try_from(i).unwrap(),
                    usize::try_from(len).unwrap(),
                ),
            )
        })
        .collect()
}

fn spawn_backup(env: &Env, dom: &Domain, extra: &[&str]) -> Child {
    spawn_backup_in(env, dom, &env.path("work"), extra)
}

fn spawn_backup_in(env: &Env, dom: &Domain, work: &Path, extra: &[&str]) -> Child {
    env.cmd()
        .args(args(dom, work, extra))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ekko")
}

#[test]
fn full_then_incremental_two_disks_at_one_instant() {
    let env = Env::init(&[]);
    let dom = Domain::start(
        &env,
        "cycle",
        &[
            (
                "vda",
                64 * MIB,
                content(1, &[(0, 8 * MIB), (40 * MIB, 4 * MIB)]),
            ),
            ("vdb", 32 * MIB, content(7, &[(2 * MIB, 6 * MIB)])),
        ],
        "",
        "",
    );

    // Full.
    let t = Instant::now();
    let (v1, err) = backup(&env, &dom, &[]);
    let full_secs = t.elapsed().as_secs_f64();
    for d in ["vda", "vdb"] {
        assert_eq!(mode(&v1, d), "full");
        assert!(reason(&v1, d).starts_with("first backup"), "{err}");
        assert_restore(&env, &v1, d, &dom.model_sha(d));
    }
    assert_eq!(v1["running"], true);
    assert_eq!(v1["vm"], dom.name.as_str());
    let uuid = virsh_ok(&["domuuid", &dom.name]);
    assert_eq!(v1["domain"]["uuid"], uuid.trim());
    let a1 = dom.freeze_model(&env, "vda", "1");
    let b1 = dom.freeze_model(&env, "vdb", "1");

    // Guest writes, then an incremental that reads only the dirty chunks.
    dom.write("vda", 0x33, 0, 64 << 10);
    dom.write("vda", 0x34, 20 * MIB, 128 << 10);
    dom.write("vdb", 0x35, 10 * MIB, 64 << 10);
    let t = Instant::now();
    let (v2, _) = backup(&env, &dom, &[]);
    let incr_secs = t.elapsed().as_secs_f64();
    assert_eq!(mode(&v2, "vda"), "incremental", "{v2}");
    assert_eq!(mode(&v2, "vdb"), "incremental");
    assert_eq!(disk(&v2, "vda")["dirty_bytes"], (64 + 128) << 10);
    assert_eq!(disk(&v2, "vda")["bytes_read"], 2 * CHUNK);
    assert_eq!(disk(&v2, "vdb")["dirty_bytes"], 64 << 10);
    assert_eq!(disk(&v2, "vdb")["bytes_read"], CHUNK);
    assert_eq!(
        disk(&v2, "vda")["bitmap"],
        v1["checkpoint"],
        "the incremental reads from the last checkpoint"
    );
    assert_eq!(v2["deleted_checkpoints"][0], v1["checkpoint"]);
    assert_eq!(v2["parent"], v1["id"]);
    for d in ["vda", "vdb"] {
        assert_restore(&env, &v2, d, &dom.model_sha(d));
    }
    // The full snapshot still restores the disks at its own instant.
    assert_restore(&env, &v1, "vda", &sha256_file(&a1));
    assert_restore(&env, &v1, "vdb", &sha256_file(&b1));
    eprintln!("libvirt cycle: full {full_secs:.2} s, incremental {incr_secs:.2} s");

    // Writes to both disks while a slow backup runs stay out of it: both
    // disks are captured at the instant the job started.
    let a2 = dom.model_sha("vda");
    let b2 = dom.model_sha("vdb");
    let mut child = spawn_backup(&env, &dom, &["--full", "--rate-limit", "4"]);
    assert!(dom.wait_for_job(Duration::from_secs(20)), "no job appeared");
    std::thread::sleep(Duration::from_millis(300));
    dom.write("vda", 0x44, 41 * MIB, 64 << 10);
    dom.write("vdb", 0x45, 7 * MIB, 64 << 10);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup ended before the writes: the test proves nothing"
    );
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v3: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_clean_after(&dom, &env.path("work"), &v3);
    assert_restore(&env, &v3, "vda", &a2);
    assert_restore(&env, &v3, "vdb", &b2);

    // The next incremental has them.
    let (v4, _) = backup(&env, &dom, &[]);
    assert_eq!(mode(&v4, "vda"), "incremental");
    assert_eq!(disk(&v4, "vda")["dirty_bytes"], 64 << 10);
    assert_eq!(disk(&v4, "vdb")["dirty_bytes"], 64 << 10);
    for d in ["vda", "vdb"] {
        assert_restore(&env, &v4, d, &dom.model_sha(d));
    }

    // Nothing written: nothing read.
    let (v5, _) = backup(&env, &dom, &[]);
    assert_eq!(disk(&v5, "vda")["bytes_read"], 0);
    assert_eq!(disk(&v5, "vdb")["bytes_read"], 0);

    dom.check_models(&env);
}

#[test]
fn fallbacks_skipped_disks_nova_metadata_and_foreign_checkpoints() {
    let env = Env::init(&[]);
    let nova = r#"<nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1"><nova:name>web-1</nova:name><nova:owner><nova:project uuid="p-42">demo</nova:project></nova:owner></nova:instance>"#;
    let raw = env.path("raw.img");
    make_image(&raw, 8 * MIB, &[]);
    let raw_disk = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb' bus='virtio'/></disk>",
        raw.display()
    );
    let dom = Domain::start(
        &env,
        "lost",
        &[("vda", 32 * MIB, content(3, &[(MIB, 4 * MIB)]))],
        &raw_disk,
        nova,
    );

    let (v1, err) = backup(&env, &dom, &[]);
    assert!(
        err.contains("disk vdb: skipped: format raw"),
        "skipped disks are named with the reason: {err}"
    );
    assert_eq!(v1["skipped_disks"][0]["name"], "vdb");
    assert_eq!(v1["disks"].as_array().unwrap().len(), 1);
    assert_eq!(v1["domain"]["nova"]["name"], "web-1");
    assert_eq!(v1["domain"]["nova"]["project_uuid"], "p-42");
    assert_eq!(v1["domain"]["nova"]["instance_uuid"], v1["domain"]["uuid"]);
    // The manifest keeps it.
    let listed = env.ok(&["snapshots", "--json"]);
    assert!(listed.contains("web-1"), "{listed}");

    // A checkpoint of another tool is never touched.
    virsh_ok(&[
        "checkpoint-create-as",
        &dom.name,
        "other-tool-cp",
        "--diskspec",
        "vda,checkpoint=bitmap",
        "--diskspec",
        "vdb,checkpoint=no",
    ]);
    dom.write("vda", 0x51, 0, 64 << 10);
    let (v2, _) = backup(&env, &dom, &[]);
    assert_eq!(mode(&v2, "vda"), "incremental");
    assert_restore(&env, &v2, "vda", &dom.model_sha("vda"));
    assert!(dom.checkpoints().contains(&"other-tool-cp".to_string()));

    // Ekko's checkpoint deleted behind its back: a full read, correct.
    dom.write("vda", 0x52, 3 * MIB, 64 << 10);
    virsh_ok(&[
        "checkpoint-delete",
        &dom.name,
        v2["checkpoint"].as_str().unwrap(),
    ]);
    let (v3, err) = backup(&env, &dom, &[]);
    assert_eq!(mode(&v3, "vda"), "full");
    assert!(
        reason(&v3, "vda").starts_with("checkpoint missing"),
        "{err}"
    );
    assert!(
        err.contains("checkpoint missing"),
        "the user is told: {err}"
    );
    assert_restore(&env, &v3, "vda", &dom.model_sha("vda"));

    // And incrementals resume from the new one.
    dom.write("vda", 0x53, 5 * MIB, 64 << 10);
    let (v4, _) = backup(&env, &dom, &[]);
    assert_eq!(mode(&v4, "vda"), "incremental");
    assert_eq!(disk(&v4, "vda")["dirty_bytes"], 64 << 10);
    assert_restore(&env, &v4, "vda", &dom.model_sha("vda"));

    // A resized disk: a full read.
    virsh_ok(&["blockresize", &dom.name, "vda", "48M"]);
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&dom.disk("vda").model)
            .unwrap();
        f.set_len(48 * MIB).unwrap();
    }
    let (v5, _) = backup(&env, &dom, &[]);
    assert_eq!(mode(&v5, "vda"), "full");
    assert!(reason(&v5, "vda").starts_with("size changed"), "{v5}");
    assert_eq!(disk(&v5, "vda")["size"], 48 * MIB);
    assert_restore(&env, &v5, "vda", &dom.model_sha("vda"));

    assert!(dom.checkpoints().contains(&"other-tool-cp".to_string()));

    // A disk added while the domain runs: every disk is read in full (one
    // checkpoint covers them all), then incrementals resume.
    let added = env.path("vdc.qcow2");
    run_tool(std::process::Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        added.to_str().unwrap(),
        "16M",
    ]));
    virsh_ok(&[
        "attach-disk",
        &dom.name,
        added.to_str().unwrap(),
        "vdc",
        "--subdriver",
        "qcow2",
        "--targetbus",
        "virtio",
    ]);
    let (v6, err) = backup(&env, &dom, &[]);
    assert_eq!(mode(&v6, "vdc"), "full");
    assert!(reason(&v6, "vdc").starts_with("new disk"), "{err}");
    assert_eq!(mode(&v6, "vda"), "full");
    assert!(
        reason(&v6, "vda").starts_with("disk vdc cannot be read incrementally"),
        "{err}"
    );
    assert_restore(&env, &v6, "vda", &dom.model_sha("vda"));
    let zeros = env.path("zeros.raw");
    make_image(&zeros, 16 * MIB, &[]);
    assert_restore(&env, &v6, "vdc", &sha256_file(&zeros));
    dom.write("vda", 0x54, 7 * MIB, 64 << 10);
    let (v7, _) = backup(&env, &dom, &[]);
    assert_eq!(mode(&v7, "vda"), "incremental");
    assert_eq!(mode(&v7, "vdc"), "incremental");
    assert_eq!(disk(&v7, "vda")["dirty_bytes"], 64 << 10);
    assert_eq!(disk(&v7, "vdc")["dirty_bytes"], 0);
    assert_restore(&env, &v7, "vda", &dom.model_sha("vda"));

    // No guest agent: --fsfreeze warns and goes on; --require-fsfreeze
    // refuses and leaves nothing behind.
    let (v8, err) = backup(&env, &dom, &["--fsfreeze"]);
    assert_eq!(v8["frozen"], false);
    assert!(err.contains("crash-consistent"), "{err}");
    let before = dom.checkpoints();
    let a = args(
        &dom,
        &env.path("work"),
        &["--fsfreeze", "--require-fsfreeze"],
    );
    let out = env.run(&a);
    assert_clean_failure(&out, "could not be frozen");
    assert!(!dom.has_job());
    assert_eq!(dom.checkpoints(), before);
    assert_eq!(dir_entries(&env.path("work")), Vec::<String>::new());

    dom.check_models(&env);
}

#[test]
fn interrupted_or_killed_ekko_leaves_the_domain_running_without_a_job() {
    let env = Env::init(&[]);
    let dom = Domain::start(
        &env,
        "kill",
        &[("vda", 64 * MIB, content(5, &[(0, 16 * MIB)]))],
        "",
        "",
    );
    let (v1, _) = backup(&env, &dom, &[]);
    let cp1 = v1["checkpoint"].as_str().unwrap().to_string();

    // SIGTERM and SIGINT: ekko ends the job itself. SIGKILL: its watchdog
    // does. Each time with a guest write before, which the next backup
    // must still see.
    for (i, sig) in [libc::SIGTERM, libc::SIGINT, libc::SIGKILL]
        .into_iter()
        .enumerate()
    {
        let at = (2 + 2 * u64::try_from(i).unwrap()) * MIB;
        dom.write("vda", 0x61, at, 64 << 10);
        let mut child = spawn_backup(&env, &dom, &["--full", "--rate-limit", "2"]);
        assert!(dom.wait_for_job(Duration::from_secs(20)), "no job appeared");
        std::thread::sleep(Duration::from_millis(500));
        assert!(child.try_wait().unwrap().is_none(), "ekko ended too early");
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: a plain signal to the child we spawned.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "signal {sig}: ekko succeeded");
        if sig != libc::SIGKILL {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("interrupted"), "signal {sig}: {err}");
            // ekko waited for the job to end before it exited.
            assert!(!dom.has_job(), "signal {sig}: a job is left");
            assert_eq!(dir_entries(&env.path("work")), Vec::<String>::new());
        }
        assert!(
            dom.wait_for_no_job(Duration::from_secs(15)),
            "signal {sig}: the backup job is stuck"
        );
        assert_eq!(dom.state(), "running");
        // The watchdog removes the private directory last.
        let deadline = Instant::now() + Duration::from_secs(15);
        while !dir_entries(&env.path("work")).is_empty() {
            assert!(Instant::now() < deadline, "scratch files left behind");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            dom.checkpoints(),
            std::slice::from_ref(&cp1),
            "signal {sig}: the interrupted run's checkpoint is gone, the committed one stays"
        );
    }

    // The next backup works, incrementally from the last committed
    // checkpoint, and has the writes made before the interrupted runs.
    let (v2, _) = backup(&env, &dom, &[]);
    assert_eq!(mode(&v2, "vda"), "incremental", "{v2}");
    assert_eq!(disk(&v2, "vda")["bitmap"], cp1.as_str());
    assert_eq!(disk(&v2, "vda")["dirty_bytes"], 3 * (64 << 10));
    assert_restore(&env, &v2, "vda", &dom.model_sha("vda"));
    dom.check_models(&env);
}

#[test]
fn stopped_domain_is_read_from_its_images() {
    let env = Env::init(&[]);
    let dom = Domain::start(
        &env,
        "stopped",
        &[
            ("vda", 32 * MIB, content(9, &[(0, 4 * MIB)])),
            ("vdb", 16 * MIB, content(11, &[(MIB, 2 * MIB)])),
        ],
        "",
        "",
    );
    let (v1, _) = backup(&env, &dom, &[]);
    let cp1 = v1["checkpoint"].as_str().unwrap().to_string();
    dom.write("vda", 0x71, 6 * MIB, 64 << 10);
    dom.quit();

    // Stopped: read from the qcow2 files, incrementally through the
    // checkpoint's bitmap (qemu-nbd -B).
    let (v2, err) = backup(&env, &dom, &[]);
    assert_eq!(v2["running"], false);
    assert!(err.contains("not running"), "{err}");
    assert_eq!(mode(&v2, "vda"), "incremental", "{v2}");
    assert_eq!(disk(&v2, "vda")["dirty_bytes"], 64 << 10);
    assert_eq!(disk(&v2, "vdb")["dirty_bytes"], 0);
    assert_eq!(disk(&v2, "vda")["next_bitmap"], cp1.as_str());
    for d in ["vda", "vdb"] {
        assert_restore(&env, &v2, d, &dom.model_sha(d));
    }
    assert_eq!(dom.checkpoints(), std::slice::from_ref(&cp1));

    // Running again: the checkpoint kept recording from its own instant,
    // so the incremental reads both writes.
    virsh_ok(&["start", &dom.name]);
    dom.write("vdb", 0x72, 9 * MIB, 64 << 10);
    let (v3, _) = backup(&env, &dom, &[]);
    assert_eq!(mode(&v3, "vda"), "incremental");
    assert_eq!(disk(&v3, "vda")["dirty_bytes"], 64 << 10);
    assert_eq!(disk(&v3, "vdb")["dirty_bytes"], 64 << 10);
    for d in ["vda", "vdb"] {
        assert_restore(&env, &v3, d, &dom.model_sha(d));
    }
    dom.check_models(&env);
}

#[test]
fn unknown_domain_unknown_disk_and_foreign_job_fail_cleanly() {
    domain::require_libvirtd();
    let env = Env::init(&[]);
    let out = env.run(&["backup", "--domain", "ekko-test-no-such-domain"]);
    assert_clean_failure(&out, "no domain");
    let dom = Domain::start(&env, "bad", &[("vda", 8 * MIB, Vec::new())], "", "");
    let out = env.run(&["backup", "--domain", &dom.name, "--disk", "vdz"]);
    assert_clean_failure(&out, "no disk \"vdz\"");
    assert!(!dom.has_job());

    // Another tool's backup job is left alone, and said so.
    let xml = env.path("foreign-backup.xml");
    write_file(
        &xml,
        format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{}'/></domainbackup>",
            env.path("foreign.sock").display()
        )
        .as_bytes(),
    );
    virsh_ok(&["backup-begin", &dom.name, xml.to_str().unwrap()]);
    let out = env.run(&args(&dom, &env.path("work"), &[]));
    assert_clean_failure(&out, "already has a backup job");
    assert!(dom.has_job(), "the foreign job was ended");
    virsh_ok(&["domjobabort", &dom.name]);
    assert!(dom.wait_for_no_job(Duration::from_secs(20)));
    assert!(dom.checkpoints().is_empty());
    let _ = virsh(&["destroy", &dom.name]);
}

/// A QEMU that dies holding the image leaves its bitmaps marked in use:
/// `qemu-io` opens it read-write, writes, and kills itself.
fn crash_while_writing(dom: &Domain, target: &str, pattern: u8, offset: u64) {
    let d = dom.disk(target);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", d.image.to_str().unwrap(), "-c"])
        .arg(format!("write -P 0x{pattern:02x} {offset} 64k"))
        .args(["-c", "sigraise 9"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("wrote 65536"),
        "qemu-io: {out:?}"
    );
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&d.model)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[pattern; 64 << 10], offset).unwrap();
}

#[test]
fn inconsistent_bitmap_after_a_crash_gives_a_full_backup() {
    require("qemu-io");
    let env = Env::init(&[]);
    let dom = Domain::start(
        &env,
        "crash",
        &[("vda", 32 * MIB, content(13, &[(0, 4 * MIB)]))],
        "",
        "",
    );
    backup(&env, &dom, &[]);

    // Running again after the crash: libvirt refuses the incremental, ekko
    // reads in full and says why.
    dom.quit();
    crash_while_writing(&dom, "vda", 0x81, 9 * MIB);
    virsh_ok(&["start", &dom.name]);
    let (v2, err) = backup(&env, &dom, &[]);
    assert_eq!(mode(&v2, "vda"), "full", "{v2}");
    assert!(
        reason(&v2, "vda").starts_with("checkpoint unusable"),
        "{err}"
    );
    assert_restore(&env, &v2, "vda", &dom.model_sha("vda"));

    // Stopped after the crash: the image's bitmap is marked in use.
    dom.quit();
    crash_while_writing(&dom, "vda", 0x82, 11 * MIB);
    let (v3, err) = backup(&env, &dom, &[]);
    assert_eq!(v3["running"], false);
    assert_eq!(mode(&v3, "vda"), "full", "{v3}");
    assert!(
        reason(&v3, "vda").starts_with("bitmap inconsistent"),
        "{err}"
    );
    assert_restore(&env, &v3, "vda", &dom.model_sha("vda"));
    dom.check_models(&env);
}

/// As with --qmp (see the capture tests): a backup job whose scratch
/// directory runs low on space is stopped before QEMU fails the guest's
/// writes, and nothing is committed; one that would start below the
/// reserve does not start.
#[test]
fn a_filling_workdir_stops_the_backup_not_the_guest() {
    let env = Env::init(&[]);
    // Mounted before the domain starts: QEMU runs in a mount namespace of
    // its own, made at its start.
    let work = env.path("small-work");
    let _tmpfs = TmpfsGuard::mount(&work, "40m");
    let dom = Domain::start(
        &env,
        "space",
        &[("vda", 128 * MIB, content(9, &[(0, 128 * MIB)]))],
        "",
        "",
    );
    let (v1, _) = backup(&env, &dom, &[]);
    let cp1 = v1["checkpoint"].as_str().unwrap().to_string();
    let before = env.repo_state();

    let out = env.run(&args(&dom, &work, &["--workdir-reserve", "64M"]));
    let err = assert_clean_failure(&out, "the backup did not start");
    assert!(err.contains("--workdir-reserve"), "{err}");
    assert!(!dom.has_job());

    let mut child = spawn_backup_in(
        &env,
        &dom,
        &work,
        &["--full", "--rate-limit", "2", "--workdir-reserve", "12M"],
    );
    if !dom.wait_for_job(Duration::from_secs(20)) {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!("no job appeared: {}", String::from_utf8_lossy(&out.stderr));
    }
    // 60 MiB of overwrites; the scratch file would need more than the
    // 40 MiB there are. (Through the monitor, qemu-io prints nothing when a
    // write fails: the restore below, compared with the model, is what
    // catches a lost write. Without the reserve, it differs.)
    for i in 0..60u64 {
        dom.write("vda", 0x40 + u8::try_from(i % 64).unwrap(), i * MIB, MIB);
    }
    let out = child.wait_with_output().unwrap();
    let err = assert_clean_failure(&out, "the backup stopped before the directory filled up");
    assert!(err.contains(work.to_str().unwrap()), "{err}");
    assert!(
        dom.wait_for_no_job(Duration::from_secs(15)),
        "the backup job is stuck"
    );
    assert_eq!(
        dir_entries(&work),
        Vec::<String>::new(),
        "scratch files left"
    );
    assert_eq!(
        env.repo_state(),
        before,
        "a stopped backup changed the repository"
    );
    assert_eq!(dom.checkpoints(), std::slice::from_ref(&cp1));

    let (v2, _) = backup(&env, &dom, &[]);
    assert_eq!(mode(&v2, "vda"), "incremental", "{v2}");
    assert_restore(&env, &v2, "vda", &dom.model_sha("vda"));
    dom.check_models(&env);
}
