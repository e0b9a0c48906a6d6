//! Retention, protection and garbage collection through the real `ekko`
//! binary, on a local directory and on the object store (the Swift
//! all-in-one of `tests/s3.rs`, each test under its own prefix): exact
//! retention sets on a synthetic history, prune reclaiming space, backups
//! and `forget --prune` racing each other, prunes and backups killed at
//! random points, the store going away mid-prune, dry runs that change
//! nothing, and `check --repair` with the backups that heal what it lost.
//!
//! Each scenario is one function taking a [`Store`]; `on_both_stores!`
//! turns it into `gc::<scenario>::local` and `gc::<scenario>::s3`. Commands
//! reach the repository through `Env::cmd` (its `repo` is a folder or an
//! `s3://` URL); what looks at the store directly goes through the
//! `ekko::Backend` trait (`objects`), never the filesystem.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ekko::Backend;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::util::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// A short grace period so that tests see deletions within seconds.
const GRACE: &str = "2s";
const GRACE_DURATION: Duration = Duration::from_secs(2);

/// Where a test's repository lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    /// A folder under the test's scratch directory.
    Local,
    /// `s3://BUCKET/t/gc-<tag>-<random>` on the test Swift.
    S3,
}

impl Store {
    fn env(self, tag: &str) -> Env {
        match self {
            Store::Local => Env::new(),
            Store::S3 => crate::s3::s3_env(&format!("gc-{tag}")),
        }
    }

    /// The resolution of the store's object timestamps (Swift's S3 API
    /// gives whole seconds): prune waits this much longer than the grace
    /// period, so the tests must too.
    fn resolution(self) -> Duration {
        match self {
            Store::Local => Duration::ZERO,
            Store::S3 => Duration::from_secs(1),
        }
    }
}

/// `mod <scenario> { #[test] fn local(); #[test] fn s3(); }` for each
/// scenario function.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn local() {
                super::$name(super::Store::Local)
            }
            #[test]
            fn s3() {
                super::$name(super::Store::S3)
            }
        }
    )*};
}

/// The same, local directory only (fault injection that needs nothing from
/// an object store, or components tested on it elsewhere).
macro_rules! local_only {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn local() {
                super::$name(super::Store::Local)
            }
        }
    )*};
}

on_both_stores!(
    retention_keeps_exactly_what_the_policy_says_and_protected_snapshots_survive,
    prune_frees_space_repacks_and_every_kept_snapshot_restores,
    dry_runs_change_nothing,
    backups_and_forget_prune_run_at_the_same_time_over_and_over,
    killing_prune_at_random_points_leaves_a_clean_repository,
    killing_backups_at_random_points_while_prunes_run,
    a_backup_whose_reused_pack_vanished_aborts_without_committing,
    a_marked_pack_that_a_snapshot_came_to_need_is_kept,
    a_kept_pack_that_is_mostly_garbage_is_repacked_in_the_same_prune,
    a_mark_never_comes_due_before_its_grace_period,
    a_repair_saves_intact_chunks_and_the_next_backup_heals_every_snapshot,
    a_repair_puts_back_a_damaged_manifest_from_the_cache,
);
local_only!(a_damaged_lost_record_still_keeps_backups_off_holes);
local_only!(
    a_lost_pack_is_repaired_and_healed_with_its_block_map,
    nothing_is_pruned_below_a_lost_map_node_that_comes_back,
    a_pack_that_comes_back_after_a_repair_is_indexed_again_not_pruned,
    a_damaged_trailer_with_a_damaged_index_file_keeps_its_pack,
    a_repair_removes_damaged_marks_and_rewrites_protections,
    a_damaged_trailer_whose_index_entries_cover_the_pack_is_replaced,
    a_pack_whose_header_rots_is_rewritten_from_its_trailer,
    an_incremental_whose_parent_is_forgotten_as_it_starts_keeps_no_hole,
    forget_with_vm_narrows_a_prefix_that_other_vms_share,
    killing_a_repair_at_random_points_loses_nothing_intact,
    prune_removes_temporary_files_that_killed_writers_left,
    a_backup_never_deduplicates_against_marked_packs,
    a_backup_that_outlives_a_new_marks_grace_aborts_without_committing,
    a_backup_whose_own_pack_a_prune_deleted_aborts_without_committing,
    an_incremental_whose_parent_sits_in_marked_packs_reads_in_full,
    index_rebuild_names_the_copy_that_a_prune_keeps,
);

/// The same, object store only (a test that stops the store's proxy).
macro_rules! s3_only {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn s3() {
                super::$name(super::Store::S3)
            }
        }
    )*};
}

s3_only!(the_proxy_stopped_mid_prune_is_a_clean_error);

/// The repository's objects, opened in this process through the library.
fn objects(env: &Env) -> Arc<dyn Backend> {
    if ekko::backend::is_url(env.repo.as_os_str()) {
        Arc::new(crate::s3::backend(env))
    } else {
        Arc::new(ekko::LocalBackend::new(&env.repo))
    }
}

/// Total bytes stored in the repository.
fn stored_bytes(env: &Env) -> u64 {
    objects(env).list("").unwrap().iter().map(|o| o.size).sum()
}

/// Every object with the hash of its bytes, sorted.
fn repo_state(env: &Env) -> Vec<(String, String)> {
    let b = objects(env);
    let mut v: Vec<(String, String)> = b
        .list("")
        .unwrap()
        .into_iter()
        .map(|o| {
            let h = hex(&Sha256::digest(b.get(&o.name).unwrap()));
            (o.name, h)
        })
        .collect();
    v.sort();
    v
}

/// The packs' ids (hex), sorted.
fn pack_ids(env: &Env) -> Vec<String> {
    let mut v: Vec<String> = objects(env)
        .list("packs/")
        .unwrap()
        .iter()
        .filter_map(|o| ekko::pack::pack_id_from_name(&o.name))
        .map(|id| id.to_hex())
        .collect();
    v.sort();
    v
}

fn ekko(env: &Env) -> Command {
    env.cmd()
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

fn new_repo(store: Store, tag: &str) -> Env {
    let env = store.env(tag);
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

fn retention_keeps_exactly_what_the_policy_says_and_protected_snapshots_survive(store: Store) {
    let env = new_repo(store, "retention");
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

/// Wait until what was written before the call is older than the grace
/// period by the store's clock. A store that rounds timestamps up (Swift:
/// to the next second) stamps objects up to one resolution late, and prune
/// adds one more resolution to every age.
fn age_past_grace(store: Store) {
    std::thread::sleep(GRACE_DURATION + 2 * store.resolution() + Duration::from_millis(300));
}

fn prune_frees_space_repacks_and_every_kept_snapshot_restores(store: Store) {
    let env = new_repo(store, "frees");
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

    age_past_grace(store);
    let r = prune(&env, &[]);
    eprintln!("mark run: {r}");
    let marked = r["packs_marked"].as_u64().unwrap();
    assert!(marked >= 8, "expected a0 and a1's packs to be marked: {r}");
    assert_eq!(r["packs_deleted"], 0, "marks wait a grace period: {r}");
    check_read_data(&env);
    age_past_grace(store);
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
    age_past_grace(store);
    let r = prune(&env, &[]);
    assert!(
        r["packs_repacked"].as_u64().unwrap() >= 1,
        "a's last packs are 3/4 garbage and should be repacked: {r}"
    );
    assert!(r["packs_written"].as_u64().unwrap() >= 1, "{r}");
    check_read_data(&env);
    assert_eq!(all_restore_exactly(&env, &hashes), 1);
    age_past_grace(store);
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

/// A writer killed mid-write leaves its temporary file, which no listing
/// shows and nothing else removes. Prune removes those that have sat
/// unwritten for the grace period and at least an hour; a fresh one (a
/// writer may still be at it) stays.
fn prune_removes_temporary_files_that_killed_writers_left(store: Store) {
    use std::fs;
    let env = new_repo(store, "tmp");
    let img = env.path("img");
    make_image(&img, 2 * MIB as u64, &[(0, &random_bytes(31, 2 * MIB))]);
    let id = backup(&env, "a", &img, None);
    let dir = env.repo.join("packs").join("ab");
    fs::create_dir_all(&dir).unwrap();
    let dead = dir.join(".tmp-0123456789abcdef");
    let live = env.repo.join("index").join(".tmp-fedcba9876543210");
    fs::write(&dead, random_bytes(32, MIB)).unwrap();
    fs::write(&live, b"being written").unwrap();
    let two_hours = Duration::from_secs(7200);
    fs::File::options()
        .write(true)
        .open(&dead)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - two_hours)
        .unwrap();
    let r = prune(&env, &["--dry-run"]);
    assert_eq!(r["temporaries_removed"], 1, "{r}");
    assert!(dead.exists() && live.exists());
    let r = prune(&env, &[]);
    assert_eq!(r["temporaries_removed"], 1, "{r}");
    assert_eq!(r["bytes_temporaries"], MIB as u64, "{r}");
    assert!(!dead.exists(), "a stale temporary file survived prune");
    assert!(live.exists(), "prune removed a fresh temporary file");
    assert_eq!(restore_sha(&env, &id), sha256_file(&img));
    check_read_data(&env);
}

fn dry_runs_change_nothing(store: Store) {
    let env = new_repo(store, "dry");
    let img = env.path("img");
    for i in 0..3u64 {
        make_image(&img, 2 * MIB as u64, &[(0, &random_bytes(i, 2 * MIB))]);
        backup(&env, "a", &img, None);
    }
    ok(&env, &["forget", "--keep-last", "1", "-q"]);
    age_past_grace(store);
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
    age_past_grace(store);
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

fn a_backup_never_deduplicates_against_marked_packs(store: Store) {
    let env = new_repo(store, "nodedup");
    let img = env.path("img");
    let data = random_bytes(5, 2 * MIB);
    make_image(&img, 2 * MIB as u64, &[(0, &data)]);
    backup(&env, "a", &img, None);
    make_image(&img, 2 * MIB as u64, &[(0, &random_bytes(6, 2 * MIB))]);
    backup(&env, "a", &img, None);
    ok(&env, &["forget", "--keep-last", "1", "-q"]);
    age_past_grace(store);
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
    age_past_grace(store);
    let r = prune(&env, &[]);
    assert!(r["packs_deleted"].as_u64().unwrap() >= 2, "{r}");
    check_read_data(&env);
    assert_eq!(restore_sha(&env, v["id"].as_str().unwrap()), want);
}

fn a_backup_that_outlives_a_new_marks_grace_aborts_without_committing(store: Store) {
    let env = new_repo(store, "outlives");
    let img = env.path("img");
    make_image(&img, 2 * MIB as u64, &[(0, &random_bytes(11, 2 * MIB))]);
    backup(&env, "a", &img, None);
    let snaps = snapshots(&env);
    assert_eq!(snaps.len(), 1);
    age_past_grace(store);
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

/// A backup that outlives prune's grace period twice over: a prune marks
/// the first pack it stored (no index names it yet), the next deletes it
/// with its mark, so that no new mark is left when the backup ends. The
/// backup must find its own pack gone and commit nothing.
fn a_backup_whose_own_pack_a_prune_deleted_aborts_without_committing(store: Store) {
    let env = new_repo(store, "own-pack");
    let img = env.path("img");
    // One pack of random data first, then zeros read at 10 MB/s: about 6 s.
    let mut data = random_bytes(13, 17 * MIB);
    data.resize(64 * MIB, 0);
    write_file(&img, &data);
    let child = ekko(&env)
        .args(["backup", "--vm", "slow", "--rate-limit", "10", "--disk"])
        .arg(format!("sda={}", img.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Some(child);
    let mut deleted = 0;
    let out = loop {
        if child.as_mut().unwrap().try_wait().unwrap().is_some() {
            break child.take().unwrap().wait_with_output().unwrap();
        }
        let r = json(&env, &["prune", "--grace", "1s", "--clock-skew", "0s"]);
        deleted += r["packs_deleted"].as_u64().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(deleted > 0, "no prune deleted a pack while the backup ran");
    assert_clean_failure(&out, "nothing was committed");
    assert!(
        !snapshots(&env).values().any(|s| s["vm"] == "slow"),
        "the backup committed a snapshot whose pack is gone"
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

fn backups_and_forget_prune_run_at_the_same_time_over_and_over(store: Store) {
    let env = new_repo(store, "race");
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
    std::thread::sleep(Duration::from_secs(3) + store.resolution());
    let fv = json(&env, &["prune", "--grace", "3s", "--clock-skew", "250ms"]);
    eprintln!("final prune: {fv}");
    check_read_data(&env);
    all_restore_exactly(&env, &hashes);
}

/// Each image replaces a random half of the previous one's chunks (64 KiB
/// each): forgotten snapshots leave packs that are partly live, so prune
/// repacks as well as deletes.
fn mutate(image: &mut [u8], n: u64) {
    for (g, chunk) in image.chunks_mut(64 * KIB).enumerate() {
        let g = u64::try_from(g).unwrap();
        if random_bytes(n * 7919 + g, 8)[0] & 1 == 0 {
            chunk.copy_from_slice(&random_bytes(n * 100_000 + g, 64 * KIB));
        }
    }
}

/// A random instant in the `round`th of `rounds` equal slices of `span`
/// ms: over the rounds, kills land all along a run, early ones included
/// (so some surely land before the process is done), whatever the seed.
fn kill_instant(rng: &mut rand::rngs::StdRng, span: u64, round: u64, rounds: u64) -> Duration {
    let lo = span * round / rounds;
    let hi = (span * (round + 1) / rounds).max(lo + 1);
    Duration::from_millis(rng.gen_range(lo..hi))
}

fn killing_prune_at_random_points_leaves_a_clean_repository(store: Store) {
    let env = new_repo(store, "killprune");
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
            mutate(&mut image, n);
            write_file(&img, &image);
            let id = backup(env, "a", &img, None);
            hashes.insert(id, sha256_file(&img));
        }
    };
    add(&env, &mut hashes, 4);
    ok(&env, &["forget", "--keep-last", "2", "-q"]);
    age_past_grace(store);
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
    let startup = u64::try_from(t.elapsed().as_millis()).unwrap();
    // The prunes about to be killed have packs to repack as well as mark.
    let repacked = plan["packs_repacked"].as_u64().unwrap();
    // Long enough for a mark of the last prune to come due.
    let due = Duration::from_millis(1100) + store.resolution();
    let mut killed = 0;
    let mut finished = 0;
    for round in 0..10u64 {
        let span = startup + 600;
        let mut child = ekko(&env)
            .args(prune_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(kill_instant(&mut rng, span, round, 10));
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
        std::thread::sleep(due);
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
    std::thread::sleep(due);
    json(&env, &["prune", "--grace", "1s", "--clock-skew", "0s"]);
    check_read_data(&env);
    all_restore_exactly(&env, &hashes);
    let left = snapshots(&env);
    assert_eq!(left.len(), 2);
}

fn a_backup_whose_reused_pack_vanished_aborts_without_committing(store: Store) {
    // Fault injection: a pack disappears under a running backup that
    // deduplicates against it, as if a prune the backup could not see had
    // deleted it. The backup must notice before writing its manifest.
    let env = new_repo(store, "vanished");
    let img = env.path("img");
    make_image(&img, 2 * MIB as u64, &[(0, &random_bytes(21, 2 * MIB))]);
    backup(&env, "a", &img, None);
    let packs = objects(&env).list("packs/").unwrap();
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
    let b = objects(&env);
    for p in &packs {
        b.delete(&p.name).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_clean_failure(&out, "was deleted by a prune");
    assert!(
        !snapshots(&env).values().any(|s| s["vm"] == "b"),
        "the backup committed a snapshot that references deleted packs"
    );
    // No prune ran: the packs are lost, and a retry fails the same way,
    // with the way out in its message. After `index rebuild` backups store
    // those chunks again.
    let disk = format!("sda={}", img.display());
    let out = run(&env, &["backup", "--vm", "b", "--disk", &disk]);
    assert_clean_failure(&out, "ekko index rebuild");
    ok(&env, &["index", "rebuild"]);
    let id = backup(&env, "b", &img, None);
    assert_eq!(restore_sha(&env, &id), sha256_file(&img));
}

use crate::capture::qsd;

/// Open the repository through the library, to forge the state a race
/// leaves behind.
fn open_repo(env: &Env) -> ekko::Repository {
    ekko::Repository::open_with_cache(objects(env), || Ok(PASSWORD.as_bytes().to_vec()), false)
        .unwrap()
}

fn an_incremental_whose_parent_sits_in_marked_packs_reads_in_full(store: Store) {
    let env = new_repo(store, "parent");
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
    let marked = pack_ids(&env);
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

/// Write a GC mark naming `packs`, as a prune would, with a short grace.
fn mark_packs(env: &Env, packs: &[String], grace: Duration) {
    let repo = open_repo(env);
    ekko::gc::write_mark(
        repo.backend().as_ref(),
        repo.keys(),
        &ekko::gc::Mark {
            time: "2026-11-26T00:00:00Z".into(),
            host: "test".into(),
            grace_ms: u64::try_from(grace.as_millis()).unwrap(),
            skew_ms: 0,
            packs: packs.to_vec(),
        },
    )
    .unwrap();
}

fn a_marked_pack_that_a_snapshot_came_to_need_is_kept(store: Store) {
    // The state a backup that missed a mark leaves: its snapshot relies on
    // chunks whose only copies are in marked packs. When the mark comes due,
    // prune scans the snapshots again and keeps those packs.
    let env = new_repo(store, "needed");
    let img = env.path("img");
    make_image(&img, 2 * MIB as u64, &[(0, &random_bytes(31, 2 * MIB))]);
    let id = backup(&env, "a", &img, None);
    let want = sha256_file(&img);
    let packs = pack_ids(&env);
    mark_packs(&env, &packs, Duration::from_millis(500));
    // Prune counts a mark due once its age by store time is at least its
    // grace plus the resolution. With whole-second timestamps (both rounded
    // up) a measured age can be up to one resolution short of the true one,
    // so waiting out the grace for sure takes two resolutions.
    std::thread::sleep(Duration::from_millis(700) + 2 * store.resolution());
    let r = prune(&env, &[]);
    assert_eq!(r["marks_completed"], 1, "{r}");
    assert_eq!(r["packs_deleted"], 0, "{r}");
    assert_eq!(r["packs_kept_referenced"], packs.len(), "{r}");
    assert_eq!(pack_ids(&env), packs);
    check_read_data(&env);
    assert_eq!(restore_sha(&env, &id), want);
}

/// A pack kept because a snapshot came to need it is an ordinary pack again
/// in the same prune: if it is mostly garbage it is repacked and marked
/// there, so two prunes a grace period apart leave no garbage (the state
/// a killed backup racing a prune left in a CI run: the kept pack waited
/// for a third prune).
fn a_kept_pack_that_is_mostly_garbage_is_repacked_in_the_same_prune(store: Store) {
    let env = new_repo(store, "keptrepack");
    let img = env.path("img");
    let mut image = random_bytes(32, MIB);
    write_file(&img, &image);
    let first = backup(&env, "a", &img, None);
    let old_packs = pack_ids(&env);
    // All but the first 64 KiB chunk change: the first backup's packs are
    // over 90% garbage once its snapshot is forgotten.
    image[64 * KIB..].copy_from_slice(&random_bytes(33, MIB - 64 * KIB));
    write_file(&img, &image);
    let second = backup(&env, "a", &img, None);
    let want = sha256_file(&img);
    ok(&env, &["forget", &first, "-q"]);
    mark_packs(&env, &old_packs, Duration::from_millis(500));
    // Old enough to be judged (older than the grace period), the mark due.
    let due = GRACE_DURATION + store.resolution() + Duration::from_millis(200);
    std::thread::sleep(due);
    let r = prune(&env, &[]);
    assert_eq!(r["marks_completed"], 1, "{r}");
    assert_eq!(r["packs_too_young"], 0, "{r}");
    // The map chunk's small pack is garbage and goes; the data pack stays.
    let (deleted, kept) = (
        r["packs_deleted"].as_u64(),
        r["packs_kept_referenced"].as_u64(),
    );
    assert_eq!(
        deleted.unwrap() + kept.unwrap(),
        u64::try_from(old_packs.len()).unwrap(),
        "{r}"
    );
    assert!(kept.unwrap() >= 1, "{r}");
    assert!(r["packs_repacked"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["marks_pending"], 1, "{r}");
    check_read_data(&env);
    assert_eq!(restore_sha(&env, &second), want);
    std::thread::sleep(due);
    let r = prune(&env, &[]);
    assert!(r["packs_deleted"].as_u64().unwrap() >= 1, "{r}");
    let left = prune(&env, &["--dry-run"]);
    assert_eq!(left["packs_marked"], 0, "garbage left behind: {left}");
    assert_eq!(left["marks_pending"], 0, "{left}");
    let now = pack_ids(&env);
    assert!(
        old_packs.iter().all(|p| !now.contains(p)),
        "a first-backup pack survived: {old_packs:?} {now:?}"
    );
    check_read_data(&env);
    assert_eq!(restore_sha(&env, &second), want);
    // A backup a moment old: its packs are kept whole, not judged, and the
    // report says so.
    image[..64 * KIB].copy_from_slice(&random_bytes(34, 64 * KIB));
    write_file(&img, &image);
    backup(&env, "a", &img, None);
    let r = prune(&env, &["--dry-run"]);
    assert!(r["packs_too_young"].as_u64().unwrap() >= 1, "{r}");
}

/// Snapshots that a killed backup committed before it died: the id never
/// reached the test, but the bytes are the ones it was given. At most one.
fn adopt_unknown(env: &Env, hashes: &mut HashMap<String, String>, sha: &str) -> usize {
    let unknown: Vec<String> = snapshots(env)
        .into_keys()
        .filter(|id| !hashes.contains_key(id))
        .collect();
    assert!(unknown.len() <= 1, "unexpected snapshots {unknown:?}");
    for id in &unknown {
        hashes.insert(id.clone(), sha.to_string());
    }
    unknown.len()
}

fn killing_backups_at_random_points_while_prunes_run(store: Store) {
    use std::os::unix::process::ExitStatusExt;
    let env = new_repo(store, "killbackup");
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let img = env.path("img");
    let mut image = random_bytes(3, 4 * MIB);
    let mut hashes = HashMap::new();
    write_file(&img, &image);
    // How long an uninterrupted backup takes (a full one: an upper bound)
    // bounds the kill instant.
    let t = Instant::now();
    let id = backup(&env, "a", &img, None);
    let span = u64::try_from(t.elapsed().as_millis()).unwrap() + 100;
    hashes.insert(id, sha256_file(&img));
    // Two more, and old enough that the first round's forget --prune has
    // garbage to mark and the second's packs to delete, however many of
    // the backups below the kills cut short.
    for n in 101..=102 {
        mutate(&mut image, n);
        write_file(&img, &image);
        let id = backup(&env, "a", &img, None);
        hashes.insert(id, sha256_file(&img));
    }
    let forget_prune: Vec<String> = [
        "forget",
        "--keep-last",
        "2",
        "--prune",
        "--grace",
        GRACE,
        "--clock-skew",
        "250ms",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let due = GRACE_DURATION + store.resolution() + Duration::from_millis(200);
    std::thread::sleep(due);
    let (mut killed, mut committed, mut aborted, mut deleted) = (0, 0, 0, 0u64);
    for round in 1..=6u64 {
        mutate(&mut image, round);
        write_file(&img, &image);
        let sha = sha256_file(&img);
        let args: Vec<String> = [
            "backup",
            "--vm",
            "a",
            "--threads",
            "1",
            "-q",
            "--disk",
            &format!("sda={}", img.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut child = spawn(&env, &args);
        let pruner = spawn(&env, &forget_prune);
        std::thread::sleep(kill_instant(&mut rng, span, round - 1, 6));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL, by pid
        }
        let out = child.wait_with_output().unwrap();
        if out.status.signal() == Some(libc::SIGKILL) {
            killed += 1;
            // It may have died after its manifest was written.
            committed += adopt_unknown(&env, &mut hashes, &sha);
        } else if out.status.success() {
            let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
            hashes.insert(id, sha);
            committed += 1;
        } else {
            // The only acceptable failure: the guard refused to commit.
            assert_clean_failure(&out, "nothing was committed");
            aborted += 1;
        }
        let f = pruner.wait_with_output().unwrap();
        assert_success(&f, &forget_prune);
        let fv: Value = serde_json::from_slice(&f.stdout).unwrap();
        deleted += fv["prune"]["packs_deleted"].as_u64().unwrap();
        check_read_data(&env);
        all_restore_exactly(&env, &hashes);
        std::thread::sleep(due);
    }
    eprintln!("{killed} backups killed, {committed} committed, {aborted} aborted, {deleted} packs deleted");
    assert!(killed > 0, "every backup finished before the kill");
    assert!(deleted > 0, "prune never deleted anything");
    // The next backup succeeds; two prunes a grace period apart reclaim
    // everything the killed backups left; after them nothing is garbage.
    mutate(&mut image, 100);
    write_file(&img, &image);
    let id = backup(&env, "a", &img, None);
    hashes.insert(id, sha256_file(&img));
    ok(&env, &["forget", "--keep-last", "2", "-q"]);
    std::thread::sleep(due);
    prune(&env, &[]);
    std::thread::sleep(due);
    let r = prune(&env, &[]);
    eprintln!("final prune: {r}");
    check_read_data(&env);
    assert_eq!(all_restore_exactly(&env, &hashes), 2);
    let left = prune(&env, &["--dry-run"]);
    assert_eq!(left["packs_marked"], 0, "garbage left behind: {left}");
    assert_eq!(left["packs_deleted"], 0, "garbage left behind: {left}");
    assert_eq!(left["marks_pending"], 0, "{left}");
}

/// Stopping the store's proxy in the middle of a prune (after its first
/// change to the repository) is a clean error: non-zero exit, a message
/// saying the store is unreachable, no panic, no long hang. With the store
/// back the next prune succeeds (the failed one's lock is stale), check
/// passes, every snapshot restores exactly, and the garbage goes.
fn the_proxy_stopped_mid_prune_is_a_clean_error(store: Store) {
    assert_eq!(store, Store::S3);
    let proxy = crate::s3::start_proxy(&format!("gc-{:08x}", rand::random::<u32>()));
    let mut env = crate::s3::s3_env_at("gc-proxy", &proxy.endpoint);
    ok(
        &env,
        &["init", "--chunk-size", "64K", "--pack-size", "1M", "-q"],
    );
    let img = env.path("img");
    let mut image = random_bytes(4, 4 * MIB);
    let mut hashes = HashMap::new();
    for n in 1..=4 {
        mutate(&mut image, n);
        write_file(&img, &image);
        let id = backup(&env, "a", &img, None);
        hashes.insert(id, sha256_file(&img));
    }
    ok(&env, &["forget", "--keep-last", "2", "-q"]);
    age_past_grace(store);
    let plan = prune(&env, &["--dry-run", "--repack-threshold", "30"]);
    assert!(plan["packs_repacked"].as_u64().unwrap() > 0, "{plan}");
    // Watch the store through the main proxy (same storage).
    let watch = objects(&env);
    let before: BTreeSet<String> = watch
        .list("packs/")
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    let child = spawn(
        &env,
        &[
            "prune",
            "--grace",
            GRACE,
            "--clock-skew",
            "0s",
            "--repack-threshold",
            "30",
            "--crash-test-delay",
            "500ms",
        ]
        .map(String::from),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now: BTreeSet<String> = watch
            .list("packs/")
            .unwrap()
            .into_iter()
            .map(|o| o.name)
            .collect();
        if now.difference(&before).next().is_some() {
            break; // the first repacked pack is written
        }
        assert!(Instant::now() < deadline, "prune wrote no pack in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.stop();
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    let err = assert_clean_failure(&out, "object store");
    assert!(
        err.contains("reachable"),
        "the message should say the store is unreachable: {err}"
    );
    assert!(
        took < Duration::from_secs(90),
        "gave up only after {took:?}"
    );

    let back = crate::s3::start_proxy(&format!("gc-back-{:08x}", rand::random::<u32>()));
    drop(proxy);
    crate::s3::set_endpoint(&mut env, &back.endpoint);
    check_read_data(&env);
    assert_eq!(all_restore_exactly(&env, &hashes), 2);
    let r = prune(&env, &["--repack-threshold", "30"]);
    eprintln!("after the store came back: {r}");
    assert!(r["packs_marked"].as_u64().unwrap() > 0, "{r}");
    check_read_data(&env);
    age_past_grace(store);
    let r = prune(&env, &["--repack-threshold", "30"]);
    assert!(r["packs_deleted"].as_u64().unwrap() > 0, "{r}");
    check_read_data(&env);
    assert_eq!(all_restore_exactly(&env, &hashes), 2);
}

/// Store timestamps may be rounded (Swift's S3 API: up to the next whole
/// second). A mark written just before a second boundary and a prune whose
/// lock lands just after it differ by a whole second on the store's clock
/// though only a fraction of one passed: prune must not take that for a
/// grace period of 1 s.
fn a_mark_never_comes_due_before_its_grace_period(store: Store) {
    let env = new_repo(store, "early");
    let img = env.path("img");
    make_image(&img, MIB as u64, &[(0, &random_bytes(41, MIB))]);
    backup(&env, "a", &img, None);
    let repo = open_repo(&env);
    let grace = Duration::from_secs(1);
    for attempt in 0..3 {
        // Write the mark just before a second boundary, so that the
        // prune's lock lands just after it.
        let target = [900, 930, 960][attempt];
        let frac = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_millis();
        std::thread::sleep(Duration::from_millis(u64::from(
            (1000 + target - frac) % 1000,
        )));
        let written = Instant::now();
        ekko::gc::write_mark(
            repo.backend().as_ref(),
            repo.keys(),
            &ekko::gc::Mark {
                time: "2026-11-26T00:00:00Z".into(),
                host: "test".into(),
                grace_ms: u64::try_from(grace.as_millis()).unwrap(),
                skew_ms: 0,
                packs: pack_ids(&env),
            },
        )
        .unwrap();
        let r = prune(&env, &[]);
        // The prune's lock came after `written`, and before now.
        let elapsed = written.elapsed();
        eprintln!("attempt {attempt}: {:?} after the mark: {r}", elapsed);
        if elapsed < grace {
            assert_eq!(
                r["marks_completed"], 0,
                "a mark came due {elapsed:?} after it was written, grace {grace:?}: {r}"
            );
        }
        assert_eq!(r["packs_deleted"], 0, "{r}");
        // Let this mark come due (its packs are referenced: kept).
        std::thread::sleep(grace + store.resolution() + Duration::from_millis(200));
        let r = prune(&env, &[]);
        assert_eq!(r["marks_completed"], 1, "{r}");
        assert_eq!(r["packs_deleted"], 0, "{r}");
    }
    check_read_data(&env);
}

/// A live VM disk of distinct 64 KiB chunks (a constant pattern each),
/// backed up in full, then incrementally after one more write. Returns the
/// daemon, the two snapshot ids and their disk hashes.
fn two_live_snapshots(env: &Env) -> (qsd::Qsd, [String; 2], [String; 2]) {
    let qsd = qsd::Qsd::start(1, 16 * MIB as u64);
    let writes: Vec<(u8, u64, u64)> = (0..32u8)
        .map(|i| (i + 1, u64::from(i) * 64 * KIB as u64, 64 * KIB as u64))
        .collect();
    qsd.write_each("disk0", &writes);
    let first = live_backup(env, &qsd);
    assert_eq!(first["disks"][0]["mode"], "full", "{first}");
    let sha1 = qsd.reference("disk0", &env.path("ref.img"));
    qsd.write("disk0", 0x77, 8 * MIB as u64, 64 * KIB as u64);
    let second = live_backup(env, &qsd);
    assert_ne!(second["disks"][0]["mode"], "full", "{second}");
    let sha2 = qsd.reference("disk0", &env.path("ref.img"));
    let id = |v: &Value| v["id"].as_str().unwrap().to_string();
    (qsd, [id(&first), id(&second)], [sha1, sha2])
}

fn live_backup(env: &Env, qsd: &qsd::Qsd) -> Value {
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
}

/// `check` with extra arguments, as JSON, and its exit code.
fn check_json(env: &Env, extra: &[&str]) -> (Value, Option<i32>) {
    let mut args = vec!["check", "--json"];
    args.extend_from_slice(extra);
    let out = run(env, &args);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.code())
}

fn a_repair_saves_intact_chunks_and_the_next_backup_heals_every_snapshot(store: Store) {
    let env = new_repo(store, "repair");
    let (qsd, [s1, s2], [sha1, sha2]) = two_live_snapshots(&env);
    let b = objects(&env);
    // Damage one data chunk of the full backup's pack (the pack with the
    // most data chunks), as bit rot would.
    let (victim, _) = rot_one_chunk(&env, &b.list("packs/").unwrap());

    let (found, code) = check_json(&env, &["--read-data"]);
    assert_eq!(code, Some(3), "{found}");
    assert_eq!(
        found["damaged_chunks"].as_array().unwrap().len(),
        1,
        "{found}"
    );

    // The repair keeps every intact chunk, drops the damaged one, and
    // names both snapshots as incomplete (the incremental inherited it).
    let (r, code) = check_json(&env, &["--read-data", "--repair"]);
    assert_eq!(code, Some(3), "lost data remains: {r}");
    let rep = &r["repair"];
    assert_eq!(rep["packs_replaced"], 1, "{r}");
    assert_eq!(rep["chunks_dropped"], 1, "{r}");
    assert!(rep["chunks_salvaged"].as_u64().unwrap() >= 31, "{r}");
    assert_eq!(rep["chunks_lost"], 1, "{r}");
    let incomplete: BTreeSet<String> = rep["snapshots_incomplete"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert_eq!(incomplete, [s1.clone(), s2.clone()].into(), "{r}");
    assert!(
        b.list("packs/").unwrap().iter().all(|o| o.name != victim),
        "the damaged pack is still there"
    );
    assert_eq!(b.list("lost/").unwrap().len(), 1);
    // Nothing damaged is left: only the lost chunk, known as such.
    let (after, code) = check_json(&env, &["--read-data"]);
    assert_eq!(code, Some(3), "{after}");
    assert_eq!(after["chunks_known_lost"], 1, "{after}");
    assert_eq!(after["damaged_chunks"].as_array().unwrap().len(), 1);
    // A second repair finds nothing more to do and keeps the record.
    let (again, _) = check_json(&env, &["--read-data", "--repair"]);
    assert_eq!(again["repair"]["packs_replaced"], 0, "{again}");
    assert_eq!(again["repair"]["index_files_written"], 0, "{again}");
    assert_eq!(again["repair"]["lost_records_removed"], 0, "{again}");
    assert_eq!(b.list("lost/").unwrap().len(), 1);

    // A restore that needs the lost chunk fails and names the way out.
    let to = env.path("lost.img");
    let out = run(&env, &["restore", &s1, "--to", to.to_str().unwrap()]);
    assert_clean_failure(&out, "ekko check");
    assert!(!to.exists());

    // Prune runs beside the known loss, and deletes nothing anyone needs.
    age_past_grace(store);
    let p = prune(&env, &[]);
    assert_eq!(p["chunks_lost"], 1, "{p}");
    assert_eq!(p["lost_records_removed"], 0, "{p}");

    // The next backup could be an incremental, but its parent references
    // the lost chunk: it reads the disk in full, stores the chunk again,
    // and with that both older snapshots are whole again.
    let heal = live_backup(&env, &qsd);
    let d = &heal["disks"][0];
    assert_eq!(d["mode"], "full", "{heal}");
    assert!(d["reason"].as_str().unwrap().contains("lost"), "{heal}");
    let (healed, code) = check_json(&env, &["--read-data"]);
    assert_eq!(code, Some(0), "{healed}");
    assert_eq!(restore_disk_sha(&env, &s1, "disk0"), sha1);
    assert_eq!(restore_disk_sha(&env, &s2, "disk0"), sha2);
    assert_eq!(
        restore_disk_sha(&env, heal["id"].as_str().unwrap(), "disk0"),
        sha2
    );
    // Prune sees nothing lost any more and removes the record; backups are
    // incremental again.
    let p = prune(&env, &[]);
    assert_eq!(p["chunks_lost"], 0, "{p}");
    assert_eq!(p["lost_records_removed"], 1, "{p}");
    assert!(b.list("lost/").unwrap().is_empty());
    qsd.write("disk0", 0x78, 9 * MIB as u64, 4 * KIB as u64);
    let next = live_backup(&env, &qsd);
    assert_ne!(next["disks"][0]["mode"], "full", "{next}");
    check_read_data(&env);
}

fn a_lost_pack_is_repaired_and_healed_with_its_block_map(store: Store) {
    // The incremental's own pack (its new chunk and its block map) is lost.
    let env = new_repo(store, "lostpack");
    let (qsd, [s1, s2], [sha1, sha2]) = two_live_snapshots(&env);
    let b = objects(&env);
    let mut packs = b.list("packs/").unwrap();
    packs.sort_by_key(|o| o.modified);
    let newest = packs.last().unwrap().name.clone();
    b.delete(&newest).unwrap();

    let (found, code) = check_json(&env, &[]);
    assert_eq!(code, Some(3), "{found}");
    let (r, code) = check_json(&env, &["--repair"]);
    assert_eq!(code, Some(3), "{r}");
    assert_eq!(r["repair"]["packs_missing"], 1, "{r}");
    assert_eq!(
        r["repair"]["snapshots_incomplete"],
        serde_json::json!([s2]),
        "{r}"
    );
    // The older snapshot never needed that pack.
    assert_eq!(restore_disk_sha(&env, &s1, "disk0"), sha1);
    // Prune holds (exit 3) and names the incomplete snapshot: what lies
    // below the lost map node is unseen.
    age_past_grace(store);
    let p = prune_held(&env);
    assert!(p["chunks_lost"].as_u64().unwrap() >= 1, "{p}");
    assert_eq!(p["held_by"], serde_json::json!([s2]), "{p}");

    // The guest did not write since: a full read stores the same chunk and
    // the same map nodes again, and the incremental is whole.
    let heal = live_backup(&env, &qsd);
    assert_eq!(heal["disks"][0]["mode"], "full", "{heal}");
    check_read_data(&env);
    assert_eq!(restore_disk_sha(&env, &s2, "disk0"), sha2);
    let p = prune(&env, &[]);
    assert_eq!(p["lost_records_removed"], 1, "{p}");
}

/// Damage exactly one data chunk (the lowest-offset one) of the pack of
/// `packs` that holds the most data chunks; returns the pack's name and
/// the chunk's id.
fn rot_one_chunk(env: &Env, packs: &[ekko::backend::ObjectInfo]) -> (String, String) {
    let b = objects(env);
    let repo = open_repo(env);
    let (pack, e) = packs
        .iter()
        .map(|p| {
            let data: Vec<ekko::format::BlobEntry> =
                ekko::pack::read_trailer(b.as_ref(), repo.keys(), &p.name)
                    .unwrap()
                    .into_iter()
                    .filter(|e| e.kind == ekko::format::ChunkKind::Data)
                    .collect();
            (p.name.clone(), data)
        })
        .max_by_key(|(_, data)| data.len())
        .and_then(|(p, data)| Some((p, data.into_iter().min_by_key(|e| e.offset)?)))
        .expect("a pack with data chunks");
    xor_object(&b, &pack, usize::try_from(e.offset).unwrap() + 8, 0x40);
    (pack, e.id.to_hex())
}

/// Flip bits `mask` of byte `at` of object `name`, as bit rot would.
fn xor_object(b: &Arc<dyn Backend>, name: &str, at: usize, mask: u8) {
    let mut d = b.get(name).unwrap();
    d[at] ^= mask;
    b.put(name, &d).unwrap();
}

/// Flip a bit inside a pack's sealed trailer (40 bytes before its end).
fn rot_trailer(b: &Arc<dyn Backend>, pack: &str) {
    let size = usize::try_from(b.size(pack).unwrap()).unwrap();
    xor_object(b, pack, size - 40, 0x01);
}

/// The name of the largest pack.
fn largest_pack(b: &Arc<dyn Backend>) -> String {
    b.list("packs/")
        .unwrap()
        .into_iter()
        .max_by_key(|o| o.size)
        .unwrap()
        .name
}

fn killing_a_repair_at_random_points_loses_nothing_intact(store: Store) {
    let env = new_repo(store, "killrepair");
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Two VMs; rot one chunk of the first one's first pack.
    let a = env.path("a.img");
    let b_img = env.path("b.img");
    write_file(&a, &random_bytes(31, 4 * MIB));
    write_file(&b_img, &random_bytes(32, 4 * MIB));
    let sa = backup(&env, "a", &a, None);
    let packs_a = objects(&env).list("packs/").unwrap();
    let sb = backup(&env, "b", &b_img, None);
    let (_, victim) = rot_one_chunk(&env, &packs_a);
    let (r, _) = check_json(&env, &["--read-data"]);
    assert_eq!(r["damaged_snapshots"].as_array().unwrap().len(), 1, "{r}");

    let args = [
        "check",
        "--read-data",
        "--repair",
        "--crash-test-delay",
        "20ms",
    ];
    let t = Instant::now();
    let out = run(&env, &["check", "--read-data"]);
    assert_eq!(out.status.code(), Some(3));
    let startup = u64::try_from(t.elapsed().as_millis()).unwrap();
    let mut killed = 0;
    for round in 0..8u64 {
        let mut child = ekko(&env)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(kill_instant(&mut rng, 2 * startup + 300, round, 8));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL, by pid
            killed += 1;
        }
        child.wait().unwrap();
        ok(&env, &["unlock", "-q"]);
        // Whatever the instant: the intact VM restores, and the only
        // damage is the one chunk, in the one snapshot.
        assert_eq!(restore_sha(&env, &sb), sha256_file(&b_img));
        let (r, code) = check_json(&env, &["--read-data"]);
        assert_eq!(code, Some(3), "{r}");
        let damaged: Vec<&str> = r["damaged_chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d[0].as_str().unwrap())
            .collect();
        assert_eq!(damaged, [victim.as_str()], "round {round}: {r}");
        // Once the index no longer has it, a record names it, so that no
        // backup builds on the hole (even if the repair was killed before
        // its final record).
        let reason = r["damaged_chunks"][0][1].as_str().unwrap();
        if reason.contains("not in any index") {
            assert_eq!(r["chunks_known_lost"], 1, "round {round}: {r}");
        }
        assert_eq!(r["damaged_snapshots"].as_array().unwrap().len(), 1, "{r}");
    }
    eprintln!("{killed} repairs killed");
    assert!(killed > 0, "every repair finished before the kill");
    // A repair run to the end, then a backup of the same image, heals all.
    let (r, code) = check_json(&env, &["--read-data", "--repair"]);
    assert_eq!(code, Some(3), "{r}");
    assert_eq!(r["repair"]["chunks_lost"], 1, "{r}");
    backup(&env, "a", &a, None);
    check_read_data(&env);
    assert_eq!(restore_sha(&env, &sa), sha256_file(&a));
    assert_eq!(restore_sha(&env, &sb), sha256_file(&b_img));
}

fn a_pack_that_comes_back_after_a_repair_is_indexed_again_not_pruned(store: Store) {
    // A pack goes missing (a store hiccup, a mount that was away), a repair
    // records its chunks as lost, then the pack comes back.
    let env = new_repo(store, "comesback");
    let img = env.path("img");
    write_file(&img, &random_bytes(41, 2 * MIB));
    let id = backup(&env, "a", &img, None);
    let b = objects(&env);
    let p = largest_pack(&b);
    let held = b.get(&p).unwrap();
    b.delete(&p).unwrap();
    let (r, _) = check_json(&env, &["--repair"]);
    assert_eq!(r["repair"]["packs_missing"], 1, "{r}");
    assert!(r["repair"]["chunks_lost"].as_u64().unwrap() > 0, "{r}");
    b.put(&p, &held).unwrap();

    // check sees where the lost chunks are, and prune refuses to mark the
    // pack as garbage.
    let out = run(&env, &["check"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("holds it"));
    age_past_grace(store);
    let out = run(&env, &["prune", "--grace", GRACE, "--clock-skew", "0s"]);
    assert_clean_failure(&out, "index it again");
    // A repair indexes it again; nothing is lost any more.
    let (r, code) = check_json(&env, &["--repair"]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["repair"]["chunks_lost"], 0, "{r}");
    assert_eq!(r["repair"]["lost_records_removed"], 1, "{r}");
    check_read_data(&env);
    assert_eq!(restore_sha(&env, &id), sha256_file(&img));
}

fn a_damaged_trailer_with_a_damaged_index_file_keeps_its_pack(store: Store) {
    // Nothing says what the pack holds: deleting it could lose intact
    // chunks that no other copy of the index lists.
    let env = new_repo(store, "keeptrailer");
    let img = env.path("img");
    write_file(&img, &random_bytes(42, 2 * MIB));
    let id = backup(&env, "a", &img, None);
    let b = objects(&env);
    let p = largest_pack(&b);
    rot_trailer(&b, &p);
    for f in b.list("index/").unwrap() {
        xor_object(&b, &f.name, 40, 0x01);
    }
    let (r, code) = check_json(&env, &["--read-data", "--repair"]);
    assert_eq!(code, Some(3), "{r}");
    assert_eq!(
        r["repair"]["packs_kept"].as_array().unwrap().len(),
        1,
        "{r}"
    );
    assert_eq!(r["repair"]["packs_replaced"], 0, "{r}");
    assert!(b.list("packs/").unwrap().iter().any(|o| o.name == p));
    // The pack stays while snapshots lack chunks, and a backup heals them.
    age_past_grace(store);
    let out = run(&env, &["prune", "--grace", GRACE, "--clock-skew", "0s"]);
    assert_clean_failure(&out, "cannot be read");
    backup(&env, "a", &img, None);
    // Once no snapshot lacks a chunk, nothing in it is needed: the next
    // repair deletes it.
    let (r, code) = check_json(&env, &["--read-data", "--repair"]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["repair"]["packs_replaced"], 1, "{r}");
    check_read_data(&env);
    assert_eq!(restore_sha(&env, &id), sha256_file(&img));
}

fn a_repair_removes_damaged_marks_and_rewrites_protections(store: Store) {
    let env = new_repo(store, "marks");
    let img = env.path("img");
    write_file(&img, &random_bytes(43, MIB));
    let id = backup(&env, "a", &img, None);
    ok(&env, &["protect", &id]);
    let b = objects(&env);
    let repo = open_repo(&env);
    ekko::gc::write_mark(
        b.as_ref(),
        repo.keys(),
        &ekko::gc::Mark {
            time: "2026-11-27T00:00:00Z".into(),
            host: "test".into(),
            grace_ms: 3_600_000,
            skew_ms: 0,
            packs: vec![],
        },
    )
    .unwrap();
    drop(repo);
    for prefix in ["gc/", "protect/"] {
        xor_object(&b, &b.list(prefix).unwrap()[0].name, 20, 0x01);
    }
    let (r, code) = check_json(&env, &[]);
    assert_eq!(code, Some(3), "{r}");
    let (r, code) = check_json(&env, &["--repair"]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["repair"]["marks_removed"], 1, "{r}");
    assert_eq!(r["repair"]["protections_rewritten"], 1, "{r}");
    assert!(b.list("gc/").unwrap().is_empty());
    // Still protected.
    let out = run(&env, &["forget", &id]);
    assert!(!out.status.success());
    assert_eq!(snapshots(&env).len(), 1);

    // A protected snapshot's manifest that goes another way than forget
    // (deleted by hand) was lost: check says so, and `protect --remove`
    // by its id accepts that it is gone.
    b.delete(&format!("snapshots/{id}")).unwrap();
    let (r, code) = check_json(&env, &[]);
    assert_eq!(code, Some(3), "{r}");
    assert!(
        r["problems"].to_string().contains("manifest is gone"),
        "{r}"
    );
    ok(&env, &["protect", "--remove", &id]);
    let (r, code) = check_json(&env, &[]);
    assert_eq!(code, Some(0), "{r}");
}

fn a_repair_puts_back_a_damaged_manifest_from_the_cache(store: Store) {
    let env = new_repo(store, "manifest");
    let img = env.path("img");
    write_file(&img, &random_bytes(44, MIB));
    let id = backup(&env, "a", &img, None);
    let b = objects(&env);
    let name = format!("snapshots/{id}");
    xor_object(&b, &name, 30, 0x01);
    let (r, code) = check_json(&env, &[]);
    assert_eq!(code, Some(3), "{r}");
    // This host backed it up, so its manifest cache holds the manifest as
    // written; it authenticates, and goes back.
    let (r, code) = check_json(&env, &["--repair"]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["repair"]["manifests_restored"], 1, "{r}");
    assert_eq!(restore_sha(&env, &id), sha256_file(&img));
    ok(&env, &["protect", &id]);
    // Without a cached copy it is beyond repair, and said so.
    std::fs::remove_dir_all(&env.cache).unwrap();
    xor_object(&b, &name, 30, 0x01);
    let (r, code) = check_json(&env, &["--repair"]);
    assert_eq!(code, Some(3), "{r}");
    assert_eq!(r["repair"]["manifests_restored"], 0, "{r}");
    assert_eq!(
        r["repair"]["manifests_damaged"],
        serde_json::json!([name]),
        "{r}"
    );

    // It can still be removed, by its full id only, once unprotected, and
    // not under a --vm it cannot be shown to belong to.
    let other = env.path("other");
    write_file(&other, &random_bytes(45, MIB));
    let bid = backup(&env, "b", &other, None);
    assert_clean_failure(&run(&env, &["forget", &id]), "protected");
    ok(&env, &["protect", "--remove", &id.to_ascii_uppercase()]);
    assert_clean_failure(&run(&env, &["forget", &id[..8]]), "full id");
    assert_clean_failure(&run(&env, &["forget", "--vm", "a", &id]), "without --vm");
    assert_clean_failure(
        &run(&env, &["forget", "--vm", "a", &bid]),
        "belongs to VM b",
    );
    // Which VM's newest snapshot the damaged one is cannot be told.
    assert_clean_failure(&run(&env, &["forget", "b@latest"]), "do not open");
    assert!(b.size(&name).is_ok(), "nothing was removed");
    let r = json(&env, &["forget", &id]);
    assert_eq!(r["remove_damaged"], serde_json::json!([id]), "{r}");
    assert!(b.size(&name).is_err());
    assert_eq!(snapshots(&env).keys().collect::<Vec<_>>(), [&bid]);
    prune(&env, &[]);
    check_read_data(&env);
    assert_eq!(restore_sha(&env, &bid), sha256_file(&other));
}

fn nothing_is_pruned_below_a_lost_map_node_that_comes_back(store: Store) {
    // A VM whose only snapshot has a two-level block map: its data is
    // referenced only through the map's nodes.
    let env = new_repo(store, "lostnode");
    let img = env.path("img");
    write_file(&img, &random_bytes(45, 17 * MIB));
    let id = backup(&env, "a", &img, None);
    let b = objects(&env);
    let repo = open_repo(&env);
    let map_pack = b
        .list("packs/")
        .unwrap()
        .into_iter()
        .find(|o| {
            ekko::pack::read_trailer(b.as_ref(), repo.keys(), &o.name)
                .unwrap()
                .iter()
                .any(|e| e.kind == ekko::format::ChunkKind::Map)
        })
        .unwrap()
        .name;
    drop(repo);
    let held = b.get(&map_pack).unwrap();
    b.delete(&map_pack).unwrap();
    let (r, _) = check_json(&env, &["--repair"]);
    assert!(r["repair"]["chunks_lost"].as_u64().unwrap() >= 1, "{r}");
    let packs_before = b.list("packs/").unwrap().len();

    // Prune cannot see below the lost node: it marks and repacks nothing,
    // run after run.
    for _ in 0..2 {
        age_past_grace(store);
        let p = prune_held(&env);
        assert!(p["lost_map_nodes"].as_u64().unwrap() >= 1, "{p}");
        assert_eq!(p["held_by"], serde_json::json!([id]), "{p}");
        assert_eq!(p["packs_marked"], 0, "{p}");
        assert_eq!(p["packs_deleted"], 0, "{p}");
    }
    assert_eq!(b.list("packs/").unwrap().len(), packs_before);
    // The pack comes back: a repair indexes it, and the snapshot is whole.
    b.put(&map_pack, &held).unwrap();
    let (r, code) = check_json(&env, &["--repair"]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(restore_sha(&env, &id), sha256_file(&img));
    check_read_data(&env);
}

fn a_damaged_lost_record_still_keeps_backups_off_holes(store: Store) {
    let env = new_repo(store, "badrecord");
    let (qsd, [s1, _], [sha1, _]) = two_live_snapshots(&env);
    let b = objects(&env);
    let packs = b.list("packs/").unwrap();
    rot_one_chunk(&env, &packs);
    let (r, _) = check_json(&env, &["--read-data", "--repair"]);
    assert_eq!(r["repair"]["chunks_lost"], 1, "{r}");
    xor_object(&b, &b.list("lost/").unwrap()[0].name, 20, 0x01);
    // What the record named is unknown now: the backup looks its parent's
    // chunks up, finds one missing, and reads in full.
    let heal = live_backup(&env, &qsd);
    let d = &heal["disks"][0];
    assert_eq!(d["mode"], "full", "{heal}");
    assert!(
        d["reason"].as_str().unwrap().contains("not indexed"),
        "{heal}"
    );
    assert_eq!(restore_disk_sha(&env, &s1, "disk0"), sha1);
    // The damaged record is still a problem, and a repair removes it.
    let (r, code) = check_json(&env, &["--read-data"]);
    assert_eq!(code, Some(3), "{r}");
    let (r, code) = check_json(&env, &["--read-data", "--repair"]);
    assert_eq!(code, Some(0), "{r}");
    assert!(b.list("lost/").unwrap().is_empty());
}

/// `prune --json` that holds garbage collection: exit 3, and the report.
fn prune_held(env: &Env) -> Value {
    let out = run(
        env,
        &["prune", "--grace", GRACE, "--clock-skew", "0s", "--json"],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn a_damaged_trailer_whose_index_entries_cover_the_pack_is_replaced(store: Store) {
    // Another VM's data is lost (so snapshots lack chunks), and one pack's
    // trailer rots while the index still names every chunk in it: the
    // entries tile the pack, so it is replaced, not kept.
    let env = new_repo(store, "tiles");
    let a = env.path("a.img");
    let bi = env.path("b.img");
    write_file(&a, &random_bytes(46, 2 * MIB));
    write_file(&bi, &random_bytes(47, MIB));
    let sa = backup(&env, "a", &a, None);
    let b = objects(&env);
    let packs_a: Vec<String> = b
        .list("packs/")
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    backup(&env, "b", &bi, None);
    for o in b.list("packs/").unwrap() {
        if !packs_a.contains(&o.name) {
            b.delete(&o.name).unwrap();
        }
    }
    let (r, _) = check_json(&env, &["--repair"]);
    assert!(r["repair"]["chunks_lost"].as_u64().unwrap() > 0, "{r}");
    let victim = largest_pack(&b);
    rot_trailer(&b, &victim);
    let (r, code) = check_json(&env, &["--read-data", "--repair"]);
    assert_eq!(code, Some(3), "b's data is still lost: {r}");
    assert_eq!(r["repair"]["packs_replaced"], 1, "{r}");
    assert_eq!(r["repair"]["packs_kept"], serde_json::json!([]), "{r}");
    assert_eq!(r["repair"]["chunks_dropped"], 0, "{r}");
    assert!(b.list("packs/").unwrap().iter().all(|o| o.name != victim));
    assert_eq!(restore_sha(&env, &sa), sha256_file(&a));
    // Only b's loss remains; its next backup heals it.
    backup(&env, "b", &bi, None);
    check_read_data(&env);
}

fn a_pack_whose_header_rots_is_rewritten_from_its_trailer(store: Store) {
    // One pack's magic and another's version byte rot. Their trailers
    // still open, so check says only the headers are damaged, and the
    // repair copies every chunk into new packs.
    let env = new_repo(store, "header");
    let a = env.path("a.img");
    write_file(&a, &random_bytes(48, 40 * MIB));
    let sa = backup(&env, "a", &a, None);
    let b = objects(&env);
    let mut packs: Vec<_> = b.list("packs/").unwrap();
    packs.sort_by_key(|o| std::cmp::Reverse(o.size));
    assert!(packs.len() >= 4, "{packs:?}");
    let (magic, version) = (packs[0].name.clone(), packs[1].name.clone());
    xor_object(&b, &magic, 0, 0x20);
    xor_object(&b, &version, 8, 0x06);
    // Reserved bytes of a header and of a footer: unsealed too, and no
    // less a flipped bit that check must find.
    let (reserved, footer) = (packs[2].name.clone(), packs[3].name.clone());
    xor_object(&b, &reserved, 13, 0x01);
    xor_object(
        &b,
        &footer,
        usize::try_from(packs[3].size).unwrap() - 11,
        0x80,
    );
    let (r, code) = check_json(&env, &[]);
    assert_eq!(code, Some(3), "{r}");
    let problems = r["problems"].to_string();
    for p in [&magic, &version, &reserved, &footer] {
        assert!(problems.contains(&format!("pack {p}")), "{r}");
    }
    assert!(
        problems.contains("only its unsealed header or footer bytes are damaged"),
        "{r}"
    );
    assert_eq!(
        r["damaged_snapshots"],
        serde_json::json!([]),
        "the chunks are all there: {r}"
    );
    assert_eq!(restore_sha(&env, &sa), sha256_file(&a));
    let (r, code) = check_json(&env, &["--read-data", "--repair"]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["repair"]["packs_replaced"], 4, "{r}");
    assert_eq!(r["repair"]["chunks_dropped"], 0, "{r}");
    assert_eq!(r["repair"]["chunks_lost"], 0, "{r}");
    let left: Vec<String> = b
        .list("packs/")
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    for p in [&magic, &version, &reserved, &footer] {
        assert!(!left.contains(p), "{p} is still there: {left:?}");
    }
    check_read_data(&env);
    assert_eq!(restore_sha(&env, &sa), sha256_file(&a));

    // A header naming an unknown version over a chunk that fails
    // verification may be a newer ekko's pack: the repair changes nothing.
    let (victim, rotted) = rot_one_chunk(&env, &b.list("packs/").unwrap());
    xor_object(&b, &victim, 8, 0x06);
    // Even a check without --read-data verifies a pack whose header is
    // damaged: a repair acts on what its chunks are now, whatever an
    // earlier check saw.
    let (r, code) = check_json(&env, &[]);
    assert_eq!(code, Some(3), "{r}");
    assert!(r["problems"].to_string().contains(&rotted), "{r}");
    let before = repo_state(&env);
    let out = run(&env, &["check", "--read-data", "--repair"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&victim)
            && err.contains("Nothing was changed")
            && err.contains("--rewrite-unknown-versions"),
        "{err}"
    );
    assert_eq!(repo_state(&env), before);
    // As the message says: told that no newer ekko writes here, the repair
    // keeps the pack's intact chunks and records the rotted one as lost.
    let (r, code) = check_json(
        &env,
        &["--read-data", "--repair", "--rewrite-unknown-versions"],
    );
    assert_eq!(code, Some(3), "{r}");
    assert_eq!(r["repair"]["chunks_dropped"], 1, "{r}");
    assert!(r["repair"]["chunks_salvaged"].as_u64().unwrap() > 1, "{r}");
    assert_eq!(r["repair"]["chunks_lost"], 1, "{r}");
    assert!(b.size(&victim).is_err());
    backup(&env, "a", &a, None);
    check_read_data(&env);
    assert_eq!(restore_sha(&env, &sa), sha256_file(&a));
}

/// A file with a dirty bitmap of our choosing: an incremental's source.
struct Dirty {
    file: ekko::source::FileSource,
    dirty: Vec<ekko::source::Range>,
}

impl ekko::source::Source for Dirty {
    fn describe(&self) -> String {
        self.file.describe()
    }
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> ekko::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn data_ranges(&self) -> ekko::Result<Vec<ekko::source::Range>> {
        self.file.data_ranges()
    }
    fn dirty_ranges(&self) -> ekko::Result<Option<Vec<ekko::source::Range>>> {
        Ok(Some(self.dirty.clone()))
    }
}

fn an_incremental_whose_parent_is_forgotten_as_it_starts_keeps_no_hole(store: Store) {
    // A repair recorded a chunk of VM a as lost. A backup of a resolves
    // its parent; then the parent is forgotten and a prune deletes the
    // record (no snapshot needs the chunk any more), before the backup's
    // guard reads the records. The other chunks live on in VM b, so prune
    // marks no pack either: the backup sees nothing that says the parent
    // has a hole. It must not commit a snapshot that references it.
    use ekko::backup::{BackupOptions, DiskPlan, Session};
    use ekko::snapshot::Capture;
    let env = new_repo(store, "forgotten");
    let a = env.path("a.img");
    let mut data = random_bytes(49, MIB);
    write_file(&a, &data);
    let sa = backup(&env, "a", &a, None);
    let b = objects(&env);
    let (_, victim) = rot_one_chunk(&env, &b.list("packs/").unwrap());
    // b holds all of a but the rotted chunk.
    let repo = open_repo(&env);
    let block = data
        .chunks(64 * KIB)
        .position(|c| repo.keys().chunk_id(c).to_hex() == victim)
        .expect("the rotted chunk is one of a's blocks");
    data[block * 64 * KIB..(block + 1) * 64 * KIB].copy_from_slice(&random_bytes(50, 64 * KIB));
    let bi = env.path("b.img");
    write_file(&bi, &data);
    backup(&env, "b", &bi, None);
    let (r, code) = check_json(&env, &["--read-data", "--repair"]);
    assert_eq!(code, Some(3), "{r}");
    assert_eq!(r["repair"]["chunks_lost"], 1, "{r}");

    // The backup opens the repository and resolves its parent...
    let repo = open_repo(&env);
    let parent = ekko::snapshot::resolve(repo.backend().as_ref(), repo.keys(), "a@latest").unwrap();
    assert_eq!(parent.id, sa);
    // ...the parent is forgotten and a prune deletes the record...
    ok(&env, &["forget", &sa]);
    let p = prune(&env, &[]);
    assert!(b.list("lost/").unwrap().is_empty(), "{p}");
    assert!(b.list("gc/").unwrap().is_empty(), "{p}");
    // ...and only then does the backup's guard start.
    let src = Dirty {
        file: ekko::source::FileSource::open(&a).unwrap(),
        // One block changed, not the lost one.
        dirty: vec![ekko::source::Range {
            offset: u64::try_from(((block + 1) % 16) * 64 * KIB).unwrap(),
            len: 64 * KIB as u64,
        }],
    };
    let mut session = Session::new(&repo).unwrap();
    let disk = session
        .backup_disk(
            DiskPlan {
                name: "sda".into(),
                source: &src,
                incremental_parent: Some(parent.disk("sda").unwrap()),
                first: false,
                capture: Capture {
                    mode: ekko::snapshot::CaptureMode::Incremental,
                    bitmap: Some("b0".into()),
                    next_bitmap: Some("b1".into()),
                    reason: None,
                },
            },
            &BackupOptions::default(),
        )
        .unwrap();
    assert_eq!(disk.capture.mode, ekko::snapshot::CaptureMode::Incremental);
    let err = session
        .commit("a", ekko::time::now_rfc3339(), Some(parent.id.clone()))
        .expect_err("a snapshot that references a chunk nothing holds");
    assert!(err.to_string().contains("was forgotten"), "{err}");
    assert_eq!(
        snapshots(&env).values().filter(|s| s["vm"] == "a").count(),
        0
    );
    check_read_data(&env);
    // The next backup has no parent, reads in full, and stores the chunk.
    let again = backup(&env, "a", &a, None);
    check_read_data(&env);
    assert_eq!(restore_sha(&env, &again), sha256_file(&a));
}

fn forget_with_vm_narrows_a_prefix_that_other_vms_share(store: Store) {
    // Snapshot ids are random: back up b until one of its ids shares a
    // first digit with a's only snapshot.
    let env = new_repo(store, "prefix");
    let img = env.path("img");
    write_file(&img, &random_bytes(51, MIB));
    let a_id = backup(&env, "a", &img, None);
    let prefix = a_id[..1].to_string();
    let mut b_ids = Vec::new();
    while !b_ids.iter().any(|id: &String| id.starts_with(&prefix)) {
        assert!(b_ids.len() < 200, "ids are not random");
        b_ids.push(backup(&env, "b", &img, None));
    }
    let err = assert_clean_failure(&run(&env, &["forget", &prefix]), "ambiguous");
    // The message lists the ids it matches, so the user can pick one.
    assert!(err.contains(&a_id), "{err}");
    assert_eq!(
        snapshots(&env).len(),
        1 + b_ids.len(),
        "nothing was removed"
    );
    let r = json(&env, &["forget", "--vm", "a", &prefix]);
    assert_eq!(ids(&r, "remove"), [a_id.clone()].into(), "{r}");
    let left = snapshots(&env);
    assert!(!left.contains_key(&a_id));
    assert_eq!(left.len(), b_ids.len());
}

/// A prune that repacks copies a pack's live chunks out and marks the pack;
/// an `index rebuild` before the mark is due sees both copies and must
/// name the kept one, or readers and backups would come to rely on a pack
/// the next prune deletes (found by a stress run: a restore then failed,
/// calling an intact repository damaged).
fn index_rebuild_names_the_copy_that_a_prune_keeps(store: Store) {
    let env = new_repo(store, "rebuild-marked");
    let a = env.path("a.img");
    let g = env.path("g.img");
    // `old` holds a's 64 KiB blocks interleaved with others, so that every
    // pack of it is half garbage once `old` is forgotten.
    let a_bytes = random_bytes(90, 4 * MIB);
    let other = random_bytes(91, 4 * MIB);
    let mut ag = Vec::new();
    for (x, y) in a_bytes.chunks(64 * KIB).zip(other.chunks(64 * KIB)) {
        ag.extend_from_slice(x);
        ag.extend_from_slice(y);
    }
    write_file(&a, &a_bytes);
    write_file(&g, &ag);
    let old = backup(&env, "old", &g, None);
    let id = backup(&env, "a", &a, None);
    ok(&env, &["forget", &old, "-q"]);
    age_past_grace(store);
    let r = prune(&env, &["--repack-threshold", "1"]);
    assert!(r["packs_marked"].as_u64().unwrap() > 0, "{r}");
    assert!(r["packs_repacked"].as_u64().unwrap() > 0, "{r}");
    ok(&env, &["index", "rebuild", "-q"]);

    let backend = Arc::new(ekko::LocalBackend::new(env.repo.clone()));
    let repo =
        ekko::Repository::open_with_cache(backend, || Ok(PASSWORD.as_bytes().to_vec()), false)
            .unwrap();
    let (b, keys) = (repo.backend().as_ref(), repo.keys());
    let (marks, _) = ekko::gc::read_marks(b, keys).unwrap();
    let marked: std::collections::HashSet<ekko::id::ObjectId> =
        marks.iter().flat_map(|m| m.mark.pack_ids()).collect();
    assert!(!marked.is_empty());
    // Garbage chunks are only in the marked packs; a chunk that also has
    // a copy elsewhere must be indexed there alone.
    let mut packs_of: HashMap<ekko::id::ChunkId, Vec<ekko::id::ObjectId>> = HashMap::new();
    for o in b.list("index/").unwrap() {
        for (chunk, loc) in ekko::index::read_index_file(b, keys, &o.name).unwrap() {
            packs_of.entry(chunk).or_default().push(loc.pack);
        }
    }
    let mut kept_copies = 0;
    for (chunk, packs) in &packs_of {
        if packs.iter().any(|p| !marked.contains(p)) {
            kept_copies += 1;
            assert!(
                packs.iter().all(|p| !marked.contains(p)),
                "chunk {chunk} is also indexed in a marked pack: {packs:?}"
            );
        }
    }
    assert!(kept_copies > 0);
    age_past_grace(store);
    let r = prune(&env, &[]);
    assert!(r["packs_deleted"].as_u64().unwrap() > 0, "{r}");
    check_read_data(&env);
    assert_eq!(restore_sha(&env, &id), sha256_bytes(&a_bytes));
}
