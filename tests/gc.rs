//! Retention, protection and garbage collection through the real `ekko`
//! binary: exact retention sets on a synthetic history, prune reclaiming
//! space, backups and `forget --prune` racing each other, prune killed at
//! random points, and dry runs that change nothing.
//!
//! Every command reaches the repository through `repo_url`, so the same
//! tests can run against an object store by changing that one function (and
//! `stored_bytes` / `repo_state`, the two that look at the store directly).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::util::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// A short grace period so that tests see deletions within seconds.
const GRACE: &str = "2s";
const GRACE_DURATION: Duration = Duration::from_secs(2);

/// The repository the tests run against: a local directory today.
fn repo_url(env: &Env) -> String {
    env.repo.display().to_string()
}

/// Total bytes stored in the repository.
fn stored_bytes(env: &Env) -> u64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p).map_or(0, |rd| {
            rd.map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                if m.is_dir() {
                    walk(&e.path())
                } else {
                    m.len()
                }
            })
            .sum()
        })
    }
    walk(&env.repo)
}

/// Every object with the hash of its bytes.
fn repo_state(env: &Env) -> Vec<(String, String)> {
    env.repo_state()
}

fn ekko(env: &Env) -> Command {
    let mut c = env.cmd();
    c.env("EKKO_REPO", repo_url(env));
    c
}

fn run(env: &Env, args: &[&str]) -> Output {
    ekko(env).args(args).output().expect("running ekko")
}

fn ok(env: &Env, args: &[&str]) -> String {
    let out = run(env, args);
    assert_success(&out, args);
    String::from_utf8(out.stdout).unwrap()
}

fn json(env: &Env, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&ok(env, &a)).unwrap()
}

fn new_repo() -> Env {
    let env = Env::new();
    ok(
        &env,
        &["init", "--chunk-size", "64K", "--pack-size", "1M", "-q"],
    );
    env
}

fn backup(env: &Env, vm: &str, img: &Path, time: Option<&str>) -> String {
    let disk = format!("sda={}", img.display());
    let mut args = vec![
        "backup",
        "--vm",
        vm,
        "--disk",
        &disk,
        "--threads",
        "1",
        "-q",
    ];
    if let Some(t) = time {
        args.extend(["--time", t]);
    }
    ok(env, &args).trim().to_string()
}

/// Snapshot ids → VM, from `ekko snapshots --json`.
fn snapshots(env: &Env) -> BTreeMap<String, Value> {
    json(env, &["snapshots"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s.clone()))
        .collect()
}

fn prune(env: &Env, extra: &[&str]) -> Value {
    let mut args = vec!["prune", "--grace", GRACE, "--clock-skew", "0s"];
    args.extend_from_slice(extra);
    json(env, &args)
}

fn check_read_data(env: &Env) {
    let out = run(env, &["check", "--read-data"]);
    assert!(
        out.status.success(),
        "check --read-data failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn restore_sha(env: &Env, id: &str) -> String {
    restore_disk_sha(env, id, "sda")
}

fn restore_disk_sha(env: &Env, id: &str, disk: &str) -> String {
    let to = env.path(&format!("r-{id}-{}.img", rand::random::<u32>()));
    ok(
        env,
        &[
            "restore",
            id,
            "--disk",
            disk,
            "--to",
            to.to_str().unwrap(),
            "-q",
        ],
    );
    let h = sha256_file(&to);
    std::fs::remove_file(&to).unwrap();
    h
}

/// Every snapshot in the repository restores to the hash recorded when it
/// was taken.
fn all_restore_exactly(env: &Env, expected: &HashMap<String, String>) -> usize {
    let snaps = snapshots(env);
    for id in snaps.keys() {
        let want = expected
            .get(id)
            .unwrap_or_else(|| panic!("snapshot {id} was never recorded"));
        assert_eq!(
            &restore_sha(env, id),
            want,
            "snapshot {id} restores wrongly"
        );
    }
    snaps.len()
}

fn ids(v: &Value, key: &str) -> BTreeSet<String> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn retention_keeps_exactly_what_the_policy_says_and_protected_snapshots_survive() {
    let env = new_repo();
    let img = env.path("img");
    // VM a: a history over four months. The comments give the weekday.
    let a_times = [
        "2026-06-03T10:00:00Z", // 0  Wed
        "2026-06-20T10:00:00Z", // 1  newest of June
        "2026-07-01T08:00:00Z", // 2
        "2026-07-15T09:00:00Z", // 3
        "2026-07-15T17:00:00Z", // 4  newest of July
        "2026-08-02T12:00:00Z", // 5
        "2026-08-30T12:00:00Z", // 6  newest of August
        "2026-09-01T06:00:00Z", // 7  Tue
        "2026-09-01T06:30:00Z", // 8
        "2026-09-01T07:10:00Z", // 9
        "2026-09-02T23:59:00Z", // 10 Wed
        "2026-09-03T00:01:00Z", // 11 Thu, newest of ISO week 36
        "2026-09-07T10:00:00Z", // 12 Mon, week 37
        "2026-09-13T10:00:00Z", // 13 Sun, week 37 (newest of it)
        "2026-09-14T10:00:00Z", // 14 Mon, week 38
        "2026-09-14T10:20:00Z", // 15 newest of all
    ];
    let b_times = [
        "2026-09-10T00:00:00Z",
        "2026-09-11T00:00:00Z",
        "2026-09-12T00:00:00Z",
    ];
    let mut a = Vec::new();
    // Out of order on purpose: retention goes by the recorded time.
    let order = [3, 0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 14];
    let mut by_index = BTreeMap::new();
    for (n, &i) in order.iter().enumerate() {
        make_image(
            &img,
            256 * KIB as u64,
            &[(0, &random_bytes(n as u64, 64 * KIB))],
        );
        by_index.insert(i, backup(&env, "a", &img, Some(a_times[i])));
    }
    for i in 0..a_times.len() {
        a.push(by_index[&i].clone());
    }
    let mut b = Vec::new();
    for (i, t) in b_times.iter().enumerate() {
        make_image(
            &img,
            256 * KIB as u64,
            &[(0, &random_bytes(100 + i as u64, 64 * KIB))],
        );
        b.push(backup(&env, "b", &img, Some(t)));
    }
    let snaps = snapshots(&env);
    assert_eq!(snaps[&a[15]]["time"], "2026-09-14T10:20:00.000000000Z");

    // Protect the oldest: it must survive any policy.
    ok(&env, &["protect", &a[0], "-q"]);
    assert_eq!(snapshots(&env)[&a[0]]["protected"], true);
    assert_eq!(snapshots(&env)[&a[1]]["protected"], false);

    // No policy: refused, nothing removed.
    let before = repo_state(&env);
    let out = run(&env, &["forget"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(repo_state(&env), before);

    let policy = [
        "forget",
        "--keep-last",
        "2",
        "--keep-hourly",
        "3",
        "--keep-daily",
        "4",
        "--keep-weekly",
        "3",
        "--keep-monthly",
        "4",
    ];
    // Worked out by hand from the rules in src/retention.rs:
    //   last 2:    15, 14
    //   hourly 3:  15 (09-14 10h), 13 (09-13 10h), 12 (09-07 10h)
    //   daily 4:   15, 13, 12, 11 (09-03)
    //   weekly 3:  15 (W38), 13 (W37), 11 (W36)
    //   monthly 4: 15 (Sep), 6 (Aug), 4 (Jul), 1 (Jun)
    //   protected: 0
    let want_a: BTreeSet<String> = [0, 1, 4, 6, 11, 12, 13, 14, 15]
        .iter()
        .map(|&i| a[i].clone())
        .collect();
    let want_reasons: Vec<(usize, &[&str])> = vec![
        (15, &["last", "hourly", "daily", "weekly", "monthly"]),
        (14, &["last"]),
        (13, &["hourly", "daily", "weekly"]),
        (12, &["hourly", "daily"]),
        (11, &["daily", "weekly"]),
        (6, &["monthly"]),
        (4, &["monthly"]),
        (1, &["monthly"]),
        (0, &["protected"]),
    ];

    // A dry run reports and changes nothing.
    let mut dry = policy.to_vec();
    dry.extend(["--vm", "a", "--dry-run"]);
    let before = repo_state(&env);
    let plan = json(&env, &dry);
    assert_eq!(
        repo_state(&env),
        before,
        "forget --dry-run changed the repository"
    );
    assert_eq!(ids(&plan, "keep"), want_a);

    let mut args = policy.to_vec();
    args.extend(["--vm", "a"]);
    let done = json(&env, &args);
    assert_eq!(ids(&done, "keep"), want_a);
    let all_a: BTreeSet<String> = a.iter().cloned().collect();
    let want_removed: BTreeSet<String> = all_a.difference(&want_a).cloned().collect();
    assert_eq!(ids(&done, "remove"), want_removed);
    for (i, reasons) in want_reasons {
        let d = done["keep"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == a[i].as_str())
            .unwrap();
        let got: Vec<&str> = d["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        assert_eq!(got, reasons, "reasons for a[{i}]");
    }
    // VM b was not touched; the repository now holds exactly the rest.
    let left: BTreeSet<String> = snapshots(&env).keys().cloned().collect();
    let mut want_left = want_a.clone();
    want_left.extend(b.iter().cloned());
    assert_eq!(left, want_left);

    // Per VM: keep-last 1 over everything keeps the newest of each VM and
    // the protected one.
    let r = json(&env, &["forget", "--keep-last", "1"]);
    let want: BTreeSet<String> = [a[15].clone(), a[0].clone(), b[2].clone()].into();
    assert_eq!(ids(&r, "keep"), want);
    assert_eq!(
        snapshots(&env).keys().cloned().collect::<BTreeSet<_>>(),
        want
    );

    // Without its protection, the old snapshot goes.
    ok(&env, &["protect", "--remove", &a[0], "-q"]);
    assert_eq!(snapshots(&env)[&a[0]]["protected"], false);
    let r = json(&env, &["forget", "--keep-last", "1"]);
    assert_eq!(ids(&r, "remove"), [a[0].clone()].into());
    let want: BTreeSet<String> = [a[15].clone(), b[2].clone()].into();
    assert_eq!(
        snapshots(&env).keys().cloned().collect::<BTreeSet<_>>(),
        want
    );
    check_read_data(&env);
}

/// Sleep until packs written so far are older than the grace period.
fn age_past_grace() {
    std::thread::sleep(GRACE_DURATION + Duration::from_millis(300));
}

#[test]
fn prune_frees_space_repacks_and_every_kept_snapshot_restores() {
    let env = new_repo();
    let mut hashes = HashMap::new();
    // vm a: three unrelated 4 MiB images; vm b: one that shares a quarter
    // of each 64 KiB group with a's last image, so a's last packs become
    // mostly garbage once a's last snapshot is forgotten.
    let mut imgs = Vec::new();
    for i in 0..3u64 {
        let p = env.path(&format!("a{i}.img"));
        make_image(&p, 4 * MIB as u64, &[(0, &random_bytes(1000 + i, 4 * MIB))]);
        imgs.push(p);
    }
    for p in &imgs {
        let id = backup(&env, "a", p, None);
        hashes.insert(id, sha256_file(p));
    }
    let mut shared = std::fs::read(&imgs[2]).unwrap();
    let noise = random_bytes(77, shared.len());
    for (g, chunk) in shared.chunks_mut(64 * KIB).enumerate() {
        if g % 4 != 0 {
            chunk.copy_from_slice(&noise[g * 64 * KIB..(g + 1) * 64 * KIB]);
        }
    }
    let bimg = env.path("b.img");
    write_file(&bimg, &shared);
    let bid = backup(&env, "b", &bimg, None);
    hashes.insert(bid.clone(), sha256_file(&bimg));

    let before = stored_bytes(&env);
    let r = json(&env, &["forget", "--vm", "a", "--keep-last", "1"]);
    assert_eq!(r["remove"].as_array().unwrap().len(), 2, "{r}");
    let a_last = ids(&r, "keep").into_iter().next().unwrap();

    age_past_grace();
    let r = prune(&env, &[]);
    eprintln!("mark run: {r}");
    let marked = r["packs_marked"].as_u64().unwrap();
    assert!(marked >= 8, "expected a0 and a1's packs to be marked: {r}");
    assert_eq!(r["packs_deleted"], 0, "marks wait a grace period: {r}");
    check_read_data(&env);
    age_past_grace();
    let r = prune(&env, &[]);
    assert_eq!(r["packs_deleted"].as_u64().unwrap(), marked, "{r}");
    let freed = r["bytes_deleted"].as_u64().unwrap();
    let after = stored_bytes(&env);
    // a0 and a1 were 8 MiB of incompressible data.
    assert!(freed >= 8 * MIB as u64, "freed only {freed} bytes: {r}");
    assert!(
        before - after >= freed / 10 * 9,
        "the repository shrank by {} bytes, prune reported {freed}",
        before - after
    );
    check_read_data(&env);
    assert_eq!(all_restore_exactly(&env, &hashes), 2);

    // Now forget a's last snapshot: b shares a quarter of its chunks, so
    // its packs are 3/4 garbage and get repacked.
    let r = json(&env, &["forget", &a_last]);
    assert_eq!(ids(&r, "remove"), [a_last.clone()].into());
    assert!(!snapshots(&env).contains_key(&a_last));
    age_past_grace();
    let r = prune(&env, &[]);
    assert!(
        r["packs_repacked"].as_u64().unwrap() >= 1,
        "a's last packs are 3/4 garbage and should be repacked: {r}"
    );
    assert!(r["packs_written"].as_u64().unwrap() >= 1, "{r}");
    check_read_data(&env);
    assert_eq!(all_restore_exactly(&env, &hashes), 1);
    age_past_grace();
    let r = prune(&env, &[]);
    assert!(r["packs_deleted"].as_u64().unwrap() >= 1, "{r}");
    check_read_data(&env);
    assert_eq!(all_restore_exactly(&env, &hashes), 1);
    // Forgetting a protected snapshot by name is refused.
    ok(&env, &["protect", &bid, "-q"]);
    let before = repo_state(&env);
    assert_clean_failure(&run(&env, &["forget", &bid]), "protected");
    assert_eq!(repo_state(&env), before);
}

#[test]
fn dry_runs_change_nothing() {
    let env = new_repo();
    let img = env.path("img");
    for i in 0..3u64 {
        make_image(&img, 2 * MIB as u64, &[(0, &random_bytes(i, 2 * MIB))]);
        backup(&env, "a", &img, None);
    }
    ok(&env, &["forget", "--keep-last", "1", "-q"]);
    age_past_grace();
    let before = repo_state(&env);
    let r = prune(&env, &["--dry-run"]);
    assert_eq!(
        repo_state(&env),
        before,
        "prune --dry-run changed the repository"
    );
    assert!(r["packs_marked"].as_u64().unwrap() >= 4, "{r}");
    assert_eq!(r["dry_run"], true);
    // A real run marks; once the mark is due a dry run would delete.
    prune(&env, &[]);
    age_past_grace();
    make_image(&img, 2 * MIB as u64, &[(0, &random_bytes(9, 2 * MIB))]);
    backup(&env, "a", &img, None);
    let before = repo_state(&env);
    let r = json(
        &env,
        &[
            "forget",
            "--keep-last",
            "1",
            "--dry-run",
            "--prune",
            "--grace",
            GRACE,
            "--clock-skew",
            "0s",
        ],
    );
    assert_eq!(
        repo_state(&env),
        before,
        "forget --dry-run --prune changed the repository"
    );
    assert_eq!(r["remove"].as_array().unwrap().len(), 1, "{r}");
    assert!(r["prune"]["packs_deleted"].as_u64().unwrap() >= 4, "{r}");
    let r = prune(&env, &["--dry-run"]);
    assert_eq!(repo_state(&env), before);
    assert!(r["packs_deleted"].as_u64().unwrap() >= 4, "{r}");
    check_read_data(&env);
}

#[test]
fn a_backup_never_deduplicates_against_marked_packs() {
    let env = new_repo();
    let img = env.path("img");
    let data = random_bytes(5, 2 * MIB);
    make_image(&img, 2 * MIB as u64, &[(0, &data)]);
    backup(&env, "a", &img, None);
    make_image(&img, 2 * MIB as u64, &[(0, &random_bytes(6, 2 * MIB))]);
    backup(&env, "a", &img, None);
    ok(&env, &["forget", "--keep-last", "1", "-q"]);
    age_past_grace();
    let r = prune(&env, &[]);
    assert!(r["packs_marked"].as_u64().unwrap() >= 2, "{r}");
    // The first image's chunks are only in marked packs: a new backup of the
    // same bytes must store them again rather than rely on them.
    make_image(&img, 2 * MIB as u64, &[(0, &data)]);
    let v = json(
        &env,
        &[
            "backup",
            "--vm",
            "c",
            "--disk",
            &format!("sda={}", img.display()),
        ],
    );
    assert!(
        v["bytes_new"].as_u64().unwrap() >= 2 * MIB as u64,
        "the backup deduplicated against marked packs: {v}"
    );
    let want = sha256_file(&img);
    age_past_grace();
    let r = prune(&env, &[]);
    assert!(r["packs_deleted"].as_u64().unwrap() >= 2, "{r}");
    check_read_data(&env);
    assert_eq!(restore_sha(&env, v["id"].as_str().unwrap()), want);
}

#[test]
fn a_backup_that_outlives_a_new_marks_grace_aborts_without_committing() {
    let env = new_repo();
    let img = env.path("img");
    make_image(&img, 2 * MIB as u64, &[(0, &random_bytes(11, 2 * MIB))]);
    backup(&env, "a", &img, None);
    let snaps = snapshots(&env);
    assert_eq!(snaps.len(), 1);
    age_past_grace();
    // A slow backup (rate-limited to 1 MB/s: about 4 s for 4 MiB) that
    // starts before the mark exists.
    let slow = env.path("slow.img");
    make_image(&slow, 4 * MIB as u64, &[(0, &random_bytes(12, 4 * MIB))]);
    let child = ekko(&env)
        .args([
            "backup",
            "--vm",
            "slow",
            "--threads",
            "1",
            "--rate-limit",
            "1",
            "--disk",
        ])
        .arg(format!("sda={}", slow.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // Forget the old snapshot and prune: its packs get a mark with a 2 s
    // grace while the backup runs.
    let old = snaps.keys().next().unwrap().clone();
    ok(&env, &["forget", &old, "-q"]);
    let r = prune(&env, &[]);
    assert!(r["packs_marked"].as_u64().unwrap() >= 2, "{r}");
    let out = child.wait_with_output().unwrap();
    assert_clean_failure(&out, "nothing was committed");
    assert!(
        !snapshots(&env).values().any(|s| s["vm"] == "slow"),
        "the slow backup committed a snapshot"
    );
    check_read_data(&env);
}

fn spawn(env: &Env, args: &[String]) -> Child {
    ekko(env)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning ekko")
}

#[test]
fn backups_and_forget_prune_run_at_the_same_time_over_and_over() {
    let env = new_repo();
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let vms = ["v0", "v1", "v2"];
    // Contents that come and go across rounds, so that backups keep
    // meeting chunks that prune has just found unreferenced and marked.
    let variants: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(500 + i, MIB)).collect();
    let bases: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(600 + i, MIB)).collect();
    let mut hashes: HashMap<String, String> = HashMap::new();
    let (mut committed, mut aborted, mut deleted, mut kept_referenced) = (0, 0, 0u64, 0u64);
    let rounds = 8;
    for round in 0..rounds {
        let t0 = Instant::now();
        let mut children = Vec::new();
        for (i, vm) in vms.iter().enumerate() {
            let img = env.path(&format!("{vm}.img"));
            let v = &variants[(round + i) % 3];
            let unique = random_bytes((round * 10 + i) as u64 + 1000, 128 * KIB);
            make_image(
                &img,
                3 * MIB as u64,
                &[(0, &bases[i]), (MIB as u64, v), (2 * MIB as u64, &unique)],
            );
            let sha = sha256_file(&img);
            let args: Vec<String> = [
                "backup",
                "--vm",
                vm,
                "--threads",
                "1",
                "--disk",
                &format!("sda={}", img.display()),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            children.push((spawn(&env, &args), sha));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..250)));
        let forget: Vec<String> = [
            "forget",
            "--keep-last",
            "2",
            "--prune",
            "--grace",
            "3s",
            "--clock-skew",
            "250ms",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let f = spawn(&env, &forget).wait_with_output().unwrap();
        assert_success(&f, &forget);
        let fv: Value = serde_json::from_slice(&f.stdout).unwrap();
        deleted += fv["prune"]["packs_deleted"].as_u64().unwrap();
        kept_referenced += fv["prune"]["packs_kept_referenced"].as_u64().unwrap();
        for (child, sha) in children {
            let out = child.wait_with_output().unwrap();
            if out.status.success() {
                let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
                hashes.insert(id, sha);
                committed += 1;
            } else {
                // The only acceptable failure: the guard refused to commit.
                assert_clean_failure(&out, "nothing was committed");
                aborted += 1;
            }
        }
        check_read_data(&env);
        let n = all_restore_exactly(&env, &hashes);
        assert!(n <= 6 + vms.len(), "forget keeps 2 per VM, got {n}");
        eprintln!(
            "round {round}: {n} snapshots, {deleted} packs deleted so far, {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        // Let marks come due within the run.
        std::thread::sleep(Duration::from_millis(rng.gen_range(500..1500)));
    }
    eprintln!("{committed} backups committed, {aborted} aborted, {kept_referenced} marked packs kept because a racing backup reused them");
    assert!(
        committed >= rounds * vms.len() / 2,
        "too few backups committed: {committed}"
    );
    assert!(
        deleted > 0,
        "prune never deleted anything while backups ran"
    );
    // Quiesce: everything garbage is reclaimed and all still restores.
    std::thread::sleep(Duration::from_secs(3));
    let fv = json(&env, &["prune", "--grace", "3s", "--clock-skew", "250ms"]);
    eprintln!("final prune: {fv}");
    check_read_data(&env);
    all_restore_exactly(&env, &hashes);
}

#[test]
fn killing_prune_at_random_points_leaves_a_clean_repository() {
    let env = new_repo();
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut hashes = HashMap::new();
    let img = env.path("img");
    let mut n = 0u64;
    let mut image = random_bytes(1, 4 * MIB);
    let mut add = |env: &Env, hashes: &mut HashMap<String, String>, k: usize| {
        for _ in 0..k {
            n += 1;
            // Each image replaces a random half of the previous one's
            // chunks: forgotten snapshots leave packs that are partly live,
            // so prune repacks as well as deletes.
            for (g, chunk) in image.chunks_mut(64 * KIB).enumerate() {
                if random_bytes(n * 7919 + g as u64, 8)[0] & 1 == 0 {
                    chunk.copy_from_slice(&random_bytes(n * 100_000 + g as u64, 64 * KIB));
                }
            }
            write_file(&img, &image);
            let id = backup(env, "a", &img, None);
            hashes.insert(id, sha256_file(&img));
        }
    };
    add(&env, &mut hashes, 4);
    ok(&env, &["forget", "--keep-last", "2", "-q"]);
    age_past_grace();
    // Each prune pauses 20 ms after every change it makes, so that a kill
    // at a random instant lands between any two of them. How long an
    // uninterrupted one takes bounds the kill instant.
    let prune_args = [
        "prune",
        "--grace",
        "1s",
        "--clock-skew",
        "0s",
        "--repack-threshold",
        "30",
        "--crash-test-delay",
        "20ms",
    ];
    let t = Instant::now();
    let plan = prune(&env, &["--dry-run", "--repack-threshold", "30"]);
    let startup = t.elapsed().as_millis() as u64;
    // The prunes about to be killed have packs to repack as well as mark.
    let repacked = plan["packs_repacked"].as_u64().unwrap();
    let mut killed = 0;
    let mut finished = 0;
    for round in 0..10 {
        let span = startup + 600;
        let mut child = ekko(&env)
            .args(prune_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..span)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL, by pid
            killed += 1;
        } else {
            finished += 1;
        }
        child.wait().unwrap();

        check_read_data(&env);
        all_restore_exactly(&env, &hashes);
        if round % 2 == 1 {
            add(&env, &mut hashes, 2);
            ok(&env, &["forget", "--keep-last", "2", "-q"]);
        }
        std::thread::sleep(Duration::from_millis(1100));
    }
    eprintln!("{killed} prunes killed, {finished} finished first, {repacked} packs to repack at the start");
    assert!(
        repacked > 0,
        "the history should have given prune packs to repack"
    );
    assert!(killed > 0, "prune always finished before the kill");
    // The next prune succeeds (the killed ones' locks are stale), and a
    // later one reclaims what they marked.
    let r = json(&env, &["prune", "--grace", "1s", "--clock-skew", "0s"]);
    eprintln!("after kills: {r}");
    std::thread::sleep(Duration::from_millis(1100));
    json(&env, &["prune", "--grace", "1s", "--clock-skew", "0s"]);
    check_read_data(&env);
    all_restore_exactly(&env, &hashes);
    let left = snapshots(&env);
    assert_eq!(left.len(), 2);
}

#[test]
fn a_backup_whose_reused_pack_vanished_aborts_without_committing() {
    // Fault injection on a local repository: a pack disappears under a
    // running backup that deduplicates against it, as if a prune the backup
    // could not see had deleted it. The backup must notice before writing
    // its manifest.
    let env = new_repo();
    let img = env.path("img");
    make_image(&img, 2 * MIB as u64, &[(0, &random_bytes(21, 2 * MIB))]);
    backup(&env, "a", &img, None);
    let packs = env.pack_files();
    assert!(!packs.is_empty());
    let child = ekko(&env)
        .args([
            "backup",
            "--vm",
            "b",
            "--threads",
            "1",
            "--rate-limit",
            "1",
            "--disk",
        ])
        .arg(format!("sda={}", img.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    for p in &packs {
        std::fs::remove_file(p).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_clean_failure(&out, "was deleted by a prune");
    assert!(
        !snapshots(&env).values().any(|s| s["vm"] == "b"),
        "the backup committed a snapshot that references deleted packs"
    );
}

use crate::capture::qsd;

/// Open the repository through the library, to forge the state a race
/// leaves behind.
fn open_repo(env: &Env) -> ekko::Repository {
    let backend = std::sync::Arc::new(ekko::LocalBackend::new(repo_url(env)));
    ekko::Repository::open_with_cache(backend, || Ok(PASSWORD.as_bytes().to_vec()), false).unwrap()
}

#[test]
fn an_incremental_whose_parent_sits_in_marked_packs_reads_in_full() {
    let env = new_repo();
    let qsd = qsd::Qsd::start(1, 16 * MIB as u64);
    qsd.write("disk0", 0x11, 0, 4 * MIB as u64);
    let live = |env: &Env| {
        json(
            env,
            &[
                "backup",
                "--vm",
                "live",
                "--qmp",
                qsd.qmp_path().to_str().unwrap(),
                "--workdir",
                qsd.workdir().to_str().unwrap(),
                "--threads",
                "1",
            ],
        )
    };
    let full = live(&env);
    assert_eq!(full["disks"][0]["mode"], "full", "{full}");
    qsd.write("disk0", 0x22, MIB as u64, 64 * KIB as u64);
    let want = qsd.reference("disk0", &env.path("ref.img"));

    // The state a backup that raced a prune leaves: the parent's chunks sit
    // in packs that a mark names (it committed after the prune scanned).
    let repo = open_repo(&env);
    let marked: Vec<String> = env
        .pack_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    ekko::gc::write_mark(
        repo.backend().as_ref(),
        repo.keys(),
        &ekko::gc::Mark {
            time: "2026-11-26T00:00:00Z".into(),
            host: "test".into(),
            grace_ms: 3_600_000,
            skew_ms: 0,
            packs: marked,
        },
    )
    .unwrap();

    // The next backup could be an incremental, but building on that parent
    // would tie it to packs due for deletion: it reads in full, and stores
    // again even the chunks the marked packs hold.
    let inc = live(&env);
    let d = &inc["disks"][0];
    assert_eq!(d["mode"], "full", "{inc}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("marked for deletion"),
        "{inc}"
    );
    assert!(d["chunks_new"].as_u64().unwrap() >= 2, "{inc}");
    let check = json(&env, &["check", "--read-data"]);
    assert_eq!(check["gc_marks"], 1, "{check}");
    assert_eq!(check["problems"].as_array().unwrap().len(), 0, "{check}");
    assert_eq!(
        restore_disk_sha(&env, inc["id"].as_str().unwrap(), "disk0"),
        want
    );
}

#[test]
fn a_marked_pack_that_a_snapshot_came_to_need_is_kept() {
    // The state a backup that missed a mark leaves: its snapshot relies on
    // chunks whose only copies are in marked packs. When the mark comes due,
    // prune scans the snapshots again and keeps those packs.
    let env = new_repo();
    let img = env.path("img");
    make_image(&img, 2 * MIB as u64, &[(0, &random_bytes(31, 2 * MIB))]);
    let id = backup(&env, "a", &img, None);
    let want = sha256_file(&img);
    let packs: Vec<String> = env
        .pack_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    let repo = open_repo(&env);
    ekko::gc::write_mark(
        repo.backend().as_ref(),
        repo.keys(),
        &ekko::gc::Mark {
            time: "2026-11-26T00:00:00Z".into(),
            host: "test".into(),
            grace_ms: 500,
            skew_ms: 0,
            packs: packs.clone(),
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let r = prune(&env, &[]);
    assert_eq!(r["marks_completed"], 1, "{r}");
    assert_eq!(r["packs_deleted"], 0, "{r}");
    assert_eq!(r["packs_kept_referenced"], packs.len(), "{r}");
    assert_eq!(env.pack_files().len(), packs.len());
    check_read_data(&env);
    assert_eq!(restore_sha(&env, &id), want);
}
