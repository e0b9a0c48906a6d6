//! The core engine end to end through the `ekko` CLI: backup, restore,
//! dedup, encryption, damage detection and crash safety.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::*;

const MIB: u64 = 1 << 20;

fn roundtrip(env: &Env, vm: &str, img: &std::path::Path) -> String {
    let id = env.backup(vm, &[("sda", img)]);
    let out = env.restore(&id, "sda");
    assert_eq!(
        sha256_file(&out),
        sha256_file(img),
        "restore of {} differs",
        img.display()
    );
    assert_eq!(
        fs::metadata(&out).unwrap().len(),
        fs::metadata(img).unwrap().len()
    );
    id
}

#[test]
fn restore_equals_source_for_many_kinds_of_image() {
    let env = Env::init(&["--chunk-size", "256K"]);
    type Case = (&'static str, u64, Vec<(u64, Vec<u8>)>);
    let cases: Vec<Case> = vec![
        ("zero", 8 * MIB, vec![]),
        (
            "random",
            8 * MIB,
            vec![(0, random_bytes(1, 8 * MIB as usize))],
        ),
        ("text", 6 * MIB, vec![(0, text_bytes(2, 6 * MIB as usize))]),
        (
            "sparse-end",
            64 * MIB,
            vec![(64 * MIB - 100_000, random_bytes(3, 100_000))],
        ),
        (
            "odd-size",
            5 * MIB + 12345,
            vec![
                (0, random_bytes(4, 1000)),
                (5 * MIB, random_bytes(5, 12345)),
            ],
        ),
        ("tiny", 1000, vec![(0, random_bytes(6, 1000))]),
        ("empty", 0, vec![]),
    ];
    for (name, size, parts) in &cases {
        let img = env.path(&format!("{name}.img"));
        let parts: Vec<(u64, &[u8])> = parts.iter().map(|(o, d)| (*o, d.as_slice())).collect();
        make_image(&img, *size, &parts);
        roundtrip(&env, name, &img);
    }
    // Holes stay holes: the restored sparse image allocates little.
    let out = env.restore("sparse-end@latest", "sda");
    let blocks = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&out).unwrap());
    assert!(
        blocks * 512 < 2 * MIB,
        "restore is not sparse: {} bytes allocated",
        blocks * 512
    );
    env.ok(&["check", "--read-data"]);
}

/// Restore writes whole blocks with O_DIRECT where the filesystem allows
/// it, and through the page cache with `--buffered`: the bytes are equal
/// either way, and only the buffered restore leaves the image in the page
/// cache (the short last block is always written buffered).
#[test]
fn restore_writes_past_the_page_cache_unless_buffered() {
    require("fincore");
    let env = Env::init(&[]);
    let img = env.path("src.img");
    let size = 16 * MIB + 12345;
    make_image(
        &img,
        size,
        &[(0, &random_bytes(40, usize::try_from(size).unwrap()))],
    );
    let id = env.backup("vm", &[("sda", &img)]);
    let direct = env.restore(&id, "sda");
    let buffered = env.path("buffered.img");
    env.ok(&[
        "restore",
        &id,
        "--disk",
        "sda",
        "--to",
        buffered.to_str().unwrap(),
        "--buffered",
    ]);
    // Before anything reads them back.
    let (d, b) = (resident(&direct), resident(&buffered));
    assert!(
        d <= MIB,
        "a direct restore left {d} bytes in the page cache"
    );
    assert!(
        b >= 15 * MIB,
        "a buffered restore left only {b} bytes cached"
    );
    for out in [&direct, &buffered] {
        assert_eq!(sha256_file(out), sha256_file(&img), "{}", out.display());
    }
}

/// Bytes of `p` in the page cache.
fn resident(p: &std::path::Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(p)
        .output()
        .unwrap();
    assert!(out.status.success(), "fincore: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Write `p`'s dirty pages out, then drop it from the page cache.
fn evict(p: &std::path::Path) {
    fs::File::open(p).unwrap().sync_all().unwrap();
    let out = Command::new("dd")
        .arg(format!("if={}", p.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .output()
        .unwrap();
    assert!(out.status.success(), "dd: {out:?}");
    assert!(resident(p) <= MIB, "{} is still cached", p.display());
}

/// A first backup compresses nearly every block, so it reads the image
/// around the page cache (no copy into it, and the host's cache survives);
/// a later backup of a raw image only hashes what it reads, so it reads
/// through the cache, whose read-ahead is faster. (The image's first
/// 32 MiB are fetched into the cache while the repository opens, before
/// ekko knows which backup it is.) The restores equal the image either way.
#[test]
fn a_first_backup_reads_around_the_page_cache_and_later_ones_through_it() {
    require("fincore");
    let env = Env::init(&[]);
    let img = env.path("src.img");
    let size = 96 * MIB + 12345;
    make_image(
        &img,
        size,
        &[(0, &random_bytes(41, usize::try_from(size).unwrap()))],
    );
    evict(&img);
    let first = env.backup("vm", &[("sda", &img)]);
    let r = resident(&img);
    assert!(
        r <= 34 * MIB,
        "a first backup left {r} bytes of a 96 MiB image in the page cache"
    );
    evict(&img);
    let second = env.backup("vm", &[("sda", &img)]);
    let r = resident(&img);
    assert!(
        r >= 90 * MIB,
        "a later backup read through the page cache, but only {r} bytes are there"
    );
    for id in [&first, &second] {
        let out = env.restore(id, "sda");
        assert_eq!(sha256_file(&out), sha256_file(&img), "{id}");
    }
}

/// Restore onto a real block device (a loop device) that holds garbage:
/// holes must be written as zeros there, not skipped.
#[test]
fn restore_onto_a_block_device_overwrites_holes_with_zeros() {
    require("losetup");
    let env = Env::init(&["--chunk-size", "64K"]);
    let size = 12 * MIB;
    let img = env.path("src.img");
    make_image(
        &img,
        size,
        &[
            (100_000, &random_bytes(30, 700_000)),
            (6 * MIB, &text_bytes(31, MIB as usize)),
            (size - 4096, &random_bytes(32, 4096)),
        ],
    );
    let id = env.backup("dev", &[("sda", &img)]);
    let backing = env.path("device.raw");
    fs::write(&backing, vec![0xA5u8; usize::try_from(size).unwrap()]).unwrap();
    let out = run_tool(
        Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing),
    );
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let garbage = sha256_file(std::path::Path::new(&dev));
    // A device is overwritten only when asked to.
    let out = env.run(&["restore", &id, "--disk", "sda", "--to", &dev]);
    assert_clean_failure(&out, "--force");
    assert_eq!(sha256_file(std::path::Path::new(&dev)), garbage);
    env.ok(&["restore", &id, "--disk", "sda", "--to", &dev, "--force"]);
    assert_eq!(sha256_file(std::path::Path::new(&dev)), sha256_file(&img));

    // A device too small for the disk is refused before a byte is written.
    let small = env.path("small.raw");
    fs::write(&small, vec![0x5Au8; usize::try_from(size / 2).unwrap()]).unwrap();
    let out = run_tool(
        Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&small),
    );
    let small_dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let _detach_small = Detach(small_dev.clone());
    let before = sha256_file(std::path::Path::new(&small_dev));
    let out = env.run(&[
        "restore", &id, "--disk", "sda", "--to", &small_dev, "--force",
    ]);
    assert_clean_failure(&out, "nothing was written");
    assert_eq!(sha256_file(std::path::Path::new(&small_dev)), before);

    // A folder is not a file to restore to, with or without --force.
    let folder = env.path("a-folder");
    fs::create_dir(&folder).unwrap();
    for force in [false, true] {
        let mut args = vec![
            "restore",
            &id,
            "--disk",
            "sda",
            "--to",
            folder.to_str().unwrap(),
        ];
        if force {
            args.push("--force");
        }
        assert_clean_failure(&env.run(&args), "is a folder");
    }
}

#[test]
fn qcow2_through_real_qemu_nbd() {
    require("qemu-img");
    require("qemu-nbd");
    let env = Env::init(&[]);
    let raw = env.path("src.raw");
    make_image(
        &raw,
        20 * MIB + 4096,
        &[
            (MIB, &random_bytes(7, 3 * MIB as usize)),
            (19 * MIB, &text_bytes(8, 100_000)),
        ],
    );
    let q = env.path("src.qcow2");
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&q),
    );
    let v = env.backup_json("vmq", &[("sda", q.to_str().unwrap())], &[]);
    // Only allocated extents are read.
    assert!(v["bytes_read"].as_u64().unwrap() <= 5 * MIB, "{v}");
    let out = env.restore("vmq@latest", "sda");
    assert_eq!(sha256_file(&out), sha256_file(&raw));
}

/// A VM name is a folder in the mounted tree and the part before
/// `@latest`: names that cannot be either are usage errors (exit 2) and
/// write nothing.
#[test]
fn vm_names_that_cannot_name_a_folder_are_refused() {
    let env = Env::init(&[]);
    let img = env.path("d.img");
    make_image(&img, MIB, &[(0, &random_bytes(60, MIB as usize))]);
    let disk = format!("sda={}", img.display());
    let before = env.repo_state();
    for bad in ["", "a/b", "..", ".", " a", "a\tb"] {
        let out = env.run(&["backup", "--vm", bad, "--disk", &disk]);
        assert_clean_failure(&out, "VM name");
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
    assert_eq!(env.repo_state(), before, "a refused backup wrote");
    for good in [
        "web-1.example.com",
        "instance-0000002a",
        "db_2 (old)",
        "web@prod",
    ] {
        env.backup(good, &[("sda", &img)]);
        env.restore(&format!("{good}@latest"), "sda");
    }
}

/// Every image format qemu-nbd reads is read through it, never stored as
/// its container's bytes; a LUKS image, a missing backing file and a
/// missing bitmap are refused in words that say what is wrong.
#[test]
fn other_image_formats_are_read_through_qemu_nbd_and_failures_say_why() {
    require("qemu-img");
    require("qemu-nbd");
    let env = Env::init(&[]);
    // `ekko backup` of one disk `sda` from `source`.
    let backup_of = |vm: &str, source: &str| {
        env.run(&["backup", "--vm", vm, "--disk", &format!("sda={source}")])
    };
    let backed_up = |vm: &str, source: &str| {
        let out = backup_of(vm, source);
        assert_success(&out, &["backup", vm, source]);
    };
    let raw = env.path("src.raw");
    make_image(
        &raw,
        12 * MIB + 512,
        &[
            (0, &random_bytes(70, MIB as usize)),
            (9 * MIB, &text_bytes(71, 200_000)),
        ],
    );
    for (i, format) in ["vmdk", "vdi", "vhdx", "vpc", "qed", "qcow"]
        .into_iter()
        .enumerate()
    {
        let img = env.path(&format!("src.{format}"));
        run_tool(
            Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", format])
                .arg(&raw)
                .arg(&img),
        );
        let vm = format!("vm{i}");
        let v = env.backup_json(&vm, &[("sda", img.to_str().unwrap())], &[]);
        // vpc rounds the size up to its own geometry: compare the prefix.
        let size = v["disks"][0]["size"].as_u64().unwrap_or(0);
        assert!(size >= 12 * MIB + 512, "{format}: {v}");
        let out = env.restore(&format!("{vm}@latest"), "sda");
        let got = fs::read(&out).unwrap();
        let want = fs::read(&raw).unwrap();
        assert_eq!(
            sha256_bytes(&got[..want.len()]),
            sha256_bytes(&want),
            "{format}: the restore differs from the disk inside the image"
        );
        assert!(got[want.len()..].iter().all(|b| *b == 0), "{format}");
    }

    let luks = env.path("secret.luks");
    run_tool(
        Command::new("qemu-img")
            .args(["create", "-q", "--object", "secret,id=s0,data=abc"])
            .args(["-f", "luks", "-o", "key-secret=s0,iter-time=10"])
            .arg(&luks)
            .arg("4M"),
    );
    // A LUKS container is its own bytes: the restore is the same container.
    env.backup("l", &[("sda", &luks)]);
    assert_eq!(
        sha256_file(&env.restore("l@latest", "sda")),
        sha256_file(&luks)
    );
    let before = env.repo_state();

    // A raw disk whose guest wrote a VMDK descriptor into sector 0, naming
    // a host file: a sniffed format must not make ekko read that file.
    let secret = env.path("host-secret");
    fs::write(&secret, random_bytes(82, 65536)).unwrap();
    let guest = env.path("guest.raw");
    let descriptor = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 128 FLAT \"{}\" 0\nddb.adapterType = \"ide\"\n",
        secret.display()
    );
    make_image(&guest, 4 * MIB, &[(0, descriptor.as_bytes())]);
    let out = backup_of("g", &guest.display().to_string());
    let err = assert_clean_failure(&out, "refers to other files");
    assert!(err.contains("raw:"), "no way out is named: {err}");
    assert_eq!(
        env.repo_state(),
        before,
        "a refused backup changed the repository"
    );
    // Named as raw, the file's own bytes are backed up.
    backed_up("g", &format!("raw:{}", guest.display()));
    assert_eq!(
        sha256_file(&env.restore("g@latest", "sda")),
        sha256_file(&guest)
    );

    let base = env.path("base.qcow2");
    let top = env.path("top.qcow2");
    run_tool(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("4M"),
    );
    run_tool(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&top),
    );
    // An overlay is followed to its backing file only when named qcow2.
    let out = backup_of("t", &top.display().to_string());
    assert_clean_failure(&out, "refers to other files");
    backed_up("t", &format!("qcow2:{}", top.display()));
    let before = env.repo_state();
    fs::remove_file(&base).unwrap();
    let out = backup_of("t", &format!("qcow2:{}", top.display()));
    let err = assert_clean_failure(&out, "QEMU cannot open it");
    assert!(
        err.contains("base.qcow2"),
        "the missing backing file is not named: {err}"
    );

    let q = env.path("b.qcow2");
    run_tool(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&q)
            .arg("4M"),
    );
    run_tool(
        Command::new("qemu-img")
            .args(["bitmap", "--add"])
            .arg(&q)
            .arg("ekko-a"),
    );
    let out = env.run(&[
        "backup",
        "--vm",
        "b",
        "--bitmap",
        "nosuch",
        "--disk",
        &format!("sda={}", q.display()),
    ]);
    let err = assert_clean_failure(&out, "no dirty bitmap named \"nosuch\"");
    assert!(
        err.contains("ekko-a"),
        "the bitmaps it has are not listed: {err}"
    );
    assert_eq!(
        env.repo_state(),
        before,
        "a refused backup changed the repository"
    );
}

#[test]
fn second_backup_stores_almost_nothing_and_clones_share_chunks() {
    let env = Env::init(&[]);
    let base = env.path("base.img");
    make_image(&base, 64 * MIB, &[(0, &random_bytes(9, 40 * MIB as usize))]);
    let first = env.backup_json("a", &[("sda", base.to_str().unwrap())], &[]);
    assert!(first["bytes_new"].as_u64().unwrap() >= 40 * MIB);
    let second = env.backup_json("a", &[("sda", base.to_str().unwrap())], &[]);
    let new = second["bytes_stored"].as_u64().unwrap();
    assert!(
        new * 100 < first["bytes_stored"].as_u64().unwrap(),
        "second backup stored {new} bytes"
    );
    // `snapshots` reports what each added to the repository.
    let listed: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
    let added: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["disks"][0]["bytes_stored"].as_u64().unwrap())
        .collect();
    assert_eq!(added, [first["bytes_stored"].as_u64().unwrap(), new]);
    let text = env.ok(&["snapshots"]);
    let mb = format!("{:.1} MB", added[0] as f64 / 1e6);
    assert!(text.contains("added") && text.contains(&mb), "{text}");
    // A clone of the same base with a little changed, as another VM.
    let clone = env.path("clone.img");
    fs::copy(&base, &clone).unwrap();
    write_at(&clone, 10 * MIB, &random_bytes(10, 100_000));
    let c = env.backup_json("b", &[("sda", clone.to_str().unwrap())], &[]);
    let cn = c["bytes_new"].as_u64().unwrap();
    assert!(
        cn <= 2 * MIB,
        "clone stored {cn} new bytes: chunks not shared across VMs"
    );
    let out = env.restore("b@latest", "sda");
    assert_eq!(sha256_file(&out), sha256_file(&clone));
}

#[test]
fn incremental_chain_restores_every_point_in_time() {
    let env = Env::init(&["--chunk-size", "64K"]);
    let img = env.path("disk.img");
    make_image(&img, 32 * MIB, &[(0, &random_bytes(11, 8 * MIB as usize))]);
    let mut points = Vec::new();
    for round in 0..5u64 {
        write_at(
            &img,
            (round * 5 + 3) * MIB,
            &random_bytes(100 + round, 300_000),
        );
        let id = env.backup("chain", &[("sda", &img)]);
        points.push((id, sha256_file(&img)));
    }
    for (id, sum) in &points {
        assert_eq!(&sha256_file(&env.restore(id, "sda")), sum, "snapshot {id}");
    }
    // Prefix and VM@latest resolve.
    let last = &points.last().unwrap().0;
    assert_eq!(
        sha256_file(&env.restore(&last[..8], "sda")),
        points.last().unwrap().1
    );
    let js: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshots", "--json", "--vm", "chain"])).unwrap();
    let arr = js.as_array().unwrap();
    assert_eq!(arr.len(), 5);
    assert_eq!(arr[1]["parent"], arr[0]["id"]);
    assert!(arr[0]["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(arr[0]["disks"][0]["size"], 32 * MIB);
}

#[test]
fn multi_disk_snapshot_and_unencrypted_repository() {
    let env = Env::new();
    let out = env.run(&["init", "--encryption", "none"]);
    assert_success(&out, &["init"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNENCRYPTED"));
    let a = env.path("a.img");
    let b = env.path("b.img");
    make_image(&a, 3 * MIB, &[(0, &random_bytes(12, 100_000))]);
    make_image(&b, 5 * MIB, &[(MIB, &text_bytes(13, 2 * MIB as usize))]);
    let id = env.backup("two", &[("vda", &a), ("vdb", &b)]);
    assert_eq!(sha256_file(&env.restore(&id, "vda")), sha256_file(&a));
    assert_eq!(sha256_file(&env.restore(&id, "vdb")), sha256_file(&b));
    // Every disk at once, into a folder that does not exist yet.
    let all = env.path("all/of/them");
    let dir = all.to_str().unwrap();
    env.ok(&["restore", &id, "--all", "--to", dir]);
    assert_eq!(sha256_file(&all.join("vda.img")), sha256_file(&a));
    assert_eq!(sha256_file(&all.join("vdb.img")), sha256_file(&b));
    assert_eq!(std::fs::read_dir(&all).unwrap().count(), 2);
    // Existing outputs are kept unless --force.
    assert_clean_failure(&env.run(&["restore", &id, "--all", "--to", dir]), "exists");
    env.ok(&["restore", &id, "--all", "--force", "--to", dir]);
    let err = assert_clean_failure(&env.run(&["restore", &id, "--to", dir]), "--all");
    assert!(err.contains("vda, vdb"), "{err}");
    assert_clean_failure(
        &env.run(&["restore", &id, "--all", "--disk", "vda", "--to", dir]),
        "cannot be used with",
    );
    let err = assert_clean_failure(
        &env.run(&["restore", &id, "--disk", "nope", "--to", "/tmp/x"]),
        "has no disk",
    );
    assert!(err.contains("vda"), "{err}");
    // A folder that does not exist: the error names the path asked for.
    let missing = env.path("no/such/folder/vda.img");
    let missing = missing.to_str().unwrap();
    assert_clean_failure(
        &env.run(&["restore", &id, "--disk", "vda", "--to", missing]),
        missing,
    );
    env.ok(&["check", "--read-data"]);
}

#[test]
fn wrong_passphrase_is_refused_and_writes_nothing() {
    let env = Env::init(&[]);
    let img = env.path("d.img");
    make_image(&img, 2 * MIB, &[(0, &random_bytes(14, 2 * MIB as usize))]);
    env.backup("vm", &[("sda", &img)]);
    let before = env.repo_state();
    for args in [
        vec![
            "backup".to_string(),
            "--vm".into(),
            "vm".into(),
            "--disk".into(),
            format!("sda={}", img.display()),
        ],
        vec!["snapshots".into()],
        vec!["check".into()],
    ] {
        let out = env
            .cmd()
            .env("EKKO_PASSWORD", "wrong")
            .args(&args)
            .output()
            .unwrap();
        assert_clean_failure(&out, "wrong passphrase");
    }
    assert_eq!(
        env.repo_state(),
        before,
        "a refused command changed the repository"
    );
    // A second passphrase opens it too.
    let out_key_add = env
        .cmd()
        .env("EKKO_NEW_PASSWORD", "second one")
        .args(["key", "add"])
        .output()
        .unwrap();
    assert_success(&out_key_add, &["key add"]);
    let out = env
        .cmd()
        .env("EKKO_PASSWORD", "second one")
        .args(["snapshots"])
        .output()
        .unwrap();
    assert_success(&out, &["snapshots"]);
    // A damaged key file locks out only its own passphrase: the first one
    // still opens the repository (with a warning naming the damage), the
    // second gets the damage as its error.
    let second = env
        .repo
        .join(String::from_utf8(out_key_add.stdout).unwrap().trim());
    fs::write(&second, b"EKKO{damaged").unwrap();
    let out = env.run(&["snapshots"]);
    assert_success(&out, &["snapshots"]);
    let warn = String::from_utf8_lossy(&out.stderr);
    assert!(warn.contains("is damaged"), "{warn}");
    let out = env
        .cmd()
        .env("EKKO_PASSWORD", "second one")
        .args(["snapshots"])
        .output()
        .unwrap();
    assert_clean_failure(&out, "is damaged");
    // check reports it (its passphrase is locked out) and says what to do.
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("ekko key remove"), "{text}");
}

/// Rotating passphrases: add a new one, then remove the old key file with
/// the new passphrase. Nobody can remove the last key, nor the only one
/// their passphrase opens.
#[test]
fn a_key_file_is_removed_only_while_another_one_opens_the_repository() {
    let env = Env::init(&[]);
    let img = env.path("d.img");
    make_image(&img, MIB, &[(0, &random_bytes(16, MIB as usize))]);
    let id = env.backup("vm", &[("sda", &img)]);
    let first = env.ok(&["key", "list"]).trim().to_string();
    assert!(first.starts_with("keys/"), "{first}");
    // Key commands never open the index: a damaged index file (which
    // every other command warns about) goes unread, and no cache is made.
    let ix = fs::read_dir(env.repo.join("index"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let ix_orig = fs::read(&ix).unwrap();
    fs::write(&ix, b"garbage").unwrap();
    fs::remove_dir_all(&env.cache).unwrap();
    let out = env.run(&["key", "list"]);
    assert_success(&out, &["key list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("index"), "{err}");
    assert!(!env.cache.exists());
    fs::write(&ix, &ix_orig).unwrap();
    let with = |pass: &str, args: &[&str]| {
        env.cmd()
            .env("EKKO_PASSWORD", pass)
            .args(args)
            .output()
            .unwrap()
    };
    // `key add` under passphrase `pass`: the new key file's name.
    let key_add = |pass: &str, new: &str| {
        let out = env
            .cmd()
            .env("EKKO_PASSWORD", pass)
            .env("EKKO_NEW_PASSWORD", new)
            .args(["key", "add"])
            .output()
            .unwrap();
        assert_success(&out, &["key add"]);
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };

    let before = env.repo_state();
    assert_clean_failure(&env.run(&["key", "remove", &first]), "only key file");
    assert_clean_failure(
        &env.run(&["key", "remove", "keys/zz"]),
        "not a key file name",
    );
    let absent = format!("keys/{}", "ab".repeat(16));
    assert_clean_failure(&env.run(&["key", "remove", &absent]), "no key file");
    assert_eq!(
        env.repo_state(),
        before,
        "a refused removal changed the repository"
    );

    // `key list` under passphrase `pass`: it must open a key file.
    let key_list = |pass: &str| {
        let out = with(pass, &["key", "list"]);
        assert_success(&out, &["key list"]);
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_clean_failure(&with("not it", &["key", "list"]), "wrong passphrase");

    let mut second = key_add(PASSWORD, "new one");
    // The old passphrase opens only the first key file: it may not remove it.
    assert_clean_failure(&env.run(&["key", "remove", &first]), "lock you out");
    // The new one may, by name or by id alone.
    let out = with(
        "new one",
        &["key", "remove", first.trim_start_matches("keys/")],
    );
    assert_success(&out, &["key remove"]);
    assert_eq!(key_list("new one"), second);
    assert_clean_failure(&env.run(&["snapshots"]), "wrong passphrase");
    let to = env.path("r.img");
    let out = with("new one", &["restore", &id, "--to", to.to_str().unwrap()]);
    assert_success(&out, &["restore"]);
    assert_eq!(sha256_file(&to), sha256_file(&img));
    assert_clean_failure(
        &with("new one", &["key", "remove", &second]),
        "only key file",
    );

    // Two removals at once, each of the other's key file: at most one
    // succeeds, and a key file always remains that opens the repository.
    // Each pauses between its checks and the deletion.
    for round in 0..3 {
        let third = key_add("new one", "third");
        let spawn = |pass: &str, key: &str| {
            env.cmd()
                .env("EKKO_PASSWORD", pass)
                .args(["key", "remove", "--crash-test-delay", "300ms", key])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut a = spawn("new one", &third);
        let mut b = spawn("third", &second);
        let (ra, rb) = (a.wait().unwrap(), b.wait().unwrap());
        assert!(
            !(ra.success() && rb.success()),
            "round {round}: both removals succeeded"
        );
        let pass = if rb.success() { "third" } else { "new one" };
        assert_success(&with(pass, &["snapshots"]), &["snapshots"]);
        // Back to the one key file `second` ("new one") for the next round.
        if rb.success() {
            second = key_add("third", "new one");
        }
        if key_list("new one").lines().any(|k| k == third) {
            assert_success(
                &with("new one", &["key", "remove", &third]),
                &["key remove"],
            );
        }
        assert_eq!(key_list("new one"), second);
    }
}

#[test]
fn flipped_bit_in_a_pack_is_detected_and_never_restored() {
    let env = Env::init(&["--chunk-size", "64K"]);
    let img = env.path("d.img");
    make_image(&img, 4 * MIB, &[(0, &random_bytes(15, 4 * MIB as usize))]);
    let id = env.backup("vm", &[("sda", &img)]);
    let packs = env.pack_files();
    assert!(!packs.is_empty());
    // Flip one bit in the middle of the data of the first pack.
    let p = &packs[0];
    xor_byte(p, fs::metadata(p).unwrap().len() / 3, 0x10);
    let out = env.run(&["check", "--read-data"]);
    assert_eq!(out.status.code(), Some(3), "check must exit 3 on damage");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("chunk "),
        "check does not name the chunk: {report}"
    );
    assert!(
        report.contains(&id),
        "check does not name the affected snapshot: {report}"
    );
    let pack_name = p.file_name().unwrap().to_str().unwrap();
    assert!(
        report.contains(pack_name),
        "check does not name the pack: {report}"
    );
    // Restore fails loudly instead of returning wrong bytes.
    let to = env.path("r.img");
    let out = env.run(&[
        "restore",
        &id,
        "--disk",
        "sda",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "damaged");
    assert_eq!(out.status.code(), Some(3));
    // ... and leaves nothing behind that looks like a restored image.
    assert!(!to.exists(), "a failed restore left {}", to.display());
    let debris: Vec<_> = fs::read_dir(to.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(debris.is_empty(), "{debris:?}");
    // With --force, an older file at that name survives a failed restore.
    fs::write(&to, b"older").unwrap();
    let out = env.run(&["restore", &id, "--force", "--to", to.to_str().unwrap()]);
    assert_clean_failure(&out, "damaged");
    assert_eq!(fs::read(&to).unwrap(), b"older");
}

/// `restore --to -` streams the disk in order, holes as zeros, through a
/// pipe (read here by the real `sha256sum`), and so does a restore to a
/// FIFO or to `/dev/null`. A damaged chunk stops the stream with exit 3
/// before any byte of its window is written.
#[test]
fn a_restore_streams_to_a_pipe_bit_for_bit() {
    require("sha256sum");
    let env = Env::init(&["--chunk-size", "64K"]);
    let img = env.path("d.img");
    // Five windows of the stream (16 MiB each), holes, a short last block.
    let size = 70 * MIB + 4321;
    make_image(
        &img,
        size,
        &[
            (0, &random_bytes(41, 3 * MIB as usize)),
            (20 * MIB + 100, &text_bytes(42, 5 * MIB as usize)),
            (33 * MIB - 7, &random_bytes(43, MIB as usize)),
            (size - 9000, &random_bytes(44, 9000)),
        ],
    );
    let want = sha256_file(&img);
    let id = env.backup("vm", &[("sda", &img)]);
    let piped = |to: &str| -> (Option<i32>, String, String) {
        let mut ekko = env
            .cmd()
            .args(["restore", &id, "--to", to])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let sum = Command::new("sha256sum")
            .stdin(ekko.stdout.take().unwrap())
            .output()
            .unwrap();
        let out = ekko.wait_with_output().unwrap();
        let sum = String::from_utf8(sum.stdout).unwrap();
        (
            out.status.code(),
            sum.split_whitespace().next().unwrap_or("").to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, got, err) = piped("-");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(got, want, "the stream differs from the image");
    assert!(err.contains("to standard output"), "{err}");

    let fifo = env.path("out.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let reader = std::thread::spawn({
        let fifo = fifo.clone();
        move || sha256_bytes(&fs::read(fifo).unwrap())
    });
    env.ok(&["restore", &id, "--to", fifo.to_str().unwrap()]);
    assert_eq!(reader.join().unwrap(), want, "the FIFO got other bytes");
    env.ok(&["restore", &id, "--to", "/dev/null"]);

    // Damage in the third window: a byte of the random data at 33 MiB,
    // found in its pack (unencrypted, and random data is stored raw). The
    // stream ends with exit 3 after exactly the two windows before it,
    // never writing a wrong byte.
    let plain = Env::init(&["--chunk-size", "64K", "--encryption", "none"]);
    let id = plain.backup("vm", &[("sda", &img)]);
    // Within one 64 KiB block (the data starts 7 bytes before a boundary).
    let needle = &random_bytes(43, MIB as usize)[600 << 10..][..64];
    let mut flipped = 0;
    for p in plain.pack_files() {
        let bytes = fs::read(&p).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            xor_byte(&p, u64::try_from(at).unwrap() + 10, 0x04);
            flipped += 1;
        }
    }
    assert_eq!(flipped, 1, "the chunk is stored once");
    let mut ekko = plain
        .cmd()
        .args(["restore", &id, "--to", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut streamed = Vec::new();
    std::io::Read::read_to_end(ekko.stdout.as_mut().unwrap(), &mut streamed).unwrap();
    let out = ekko.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("damaged"), "{err}");
    let image = fs::read(&img).unwrap();
    assert_eq!(streamed.len(), 32 * MIB as usize, "{err}");
    assert!(image.starts_with(&streamed), "a wrong byte was streamed");
}

/// `--tag` labels a snapshot (sorted, each once); `snapshots --tag` lists
/// the snapshots carrying every tag given, and `forget --tag` applies its
/// policy to those alone. A malformed tag is refused before anything is
/// written.
#[test]
fn tags_label_snapshots_and_select_them_for_listing_and_forget() {
    let env = Env::init(&["--chunk-size", "64K"]);
    let img = env.path("d.img");
    let mut ids = Vec::new();
    for (n, tags) in [
        vec!["nightly"],
        vec!["pre-upgrade", "nightly", "nightly"],
        vec![],
        vec!["nightly"],
    ]
    .into_iter()
    .enumerate()
    {
        make_image(&img, MIB, &[(0, &random_bytes(60 + n as u64, 128 << 10))]);
        let mut extra = Vec::new();
        for t in &tags {
            extra.extend(["--tag", t]);
        }
        let v = env.backup_json("a", &[("sda", img.to_str().unwrap())], &extra);
        let mut want: Vec<&str> = tags.clone();
        want.sort();
        want.dedup();
        assert_eq!(v["tags"], serde_json::json!(want), "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let listed = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["snapshots", "--json"];
        all.extend_from_slice(args);
        let v: serde_json::Value = serde_json::from_str(&env.ok(&all)).unwrap();
        let mut out: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        out.sort();
        out
    };
    let sorted = |v: &[&String]| -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(
        listed(&["--tag", "nightly"]),
        sorted(&[&ids[0], &ids[1], &ids[3]])
    );
    assert_eq!(
        listed(&["--tag", "nightly", "--tag", "pre-upgrade"]),
        sorted(&[&ids[1]])
    );
    assert!(listed(&["--tag", "weekly"]).is_empty());
    let table = env.ok(&["snapshots"]);
    assert!(table.contains("tags: nightly,pre-upgrade"), "{table}");

    let before = env.repo_state();
    for bad in ["", "two words", "a/b", &"x".repeat(65)] {
        let out = env.run(&[
            "backup",
            "--vm",
            "a",
            "--disk",
            &format!("sda={}", img.display()),
            "--tag",
            bad,
        ]);
        assert_eq!(out.status.code(), Some(2), "tag {bad:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("tag"),
            "{out:?}"
        );
    }
    assert_eq!(env.repo_state(), before, "a refused tag wrote something");

    // The policy sees the tagged snapshots only: the untagged one stays.
    let r: serde_json::Value = serde_json::from_str(&env.ok(&[
        "forget",
        "--json",
        "--tag",
        "nightly",
        "--keep-last",
        "1",
    ]))
    .unwrap();
    let removed: Vec<&str> = r["remove"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(removed.len(), 2, "{r}");
    assert!(removed.contains(&ids[0].as_str()) && removed.contains(&ids[1].as_str()));
    assert_eq!(listed(&[]), sorted(&[&ids[2], &ids[3]]));
}

/// `ekko diff` names exactly the blocks whose bytes differ between two
/// snapshots (compared here with the images themselves, the shorter read
/// as zeros past its end), a disk that grew, one that stayed the same, and
/// one that was added.
#[test]
fn diff_names_exactly_the_blocks_that_changed() {
    const CS: usize = 64 << 10;
    let env = Env::init(&["--chunk-size", "64K"]);
    let (a, b, c) = (env.path("a.img"), env.path("b.img"), env.path("c.img"));
    let size = 8 * MIB + 5000;
    make_image(
        &a,
        size,
        &[
            (0, &random_bytes(70, 2 * MIB as usize)),
            (5 * MIB, &text_bytes(71, MIB as usize)),
            (size - 100, &random_bytes(74, 100)),
        ],
    );
    make_image(&b, 3 * MIB, &[(0, &random_bytes(72, MIB as usize))]);
    let old_a = fs::read(&a).unwrap();
    let first = env.backup("vm", &[("sda", &a), ("sdb", &b)]);
    // Small writes, one across a block boundary, one into a hole, one
    // that writes the bytes already there (no change), and growth.
    write_at(&a, 100, b"changed");
    write_at(&a, 3 * CS as u64 - 3, b"across");
    write_at(&a, 7 * MIB + 1, &random_bytes(73, 200_000));
    write_at(&a, 5 * MIB + 10, &old_a[5 * MIB as usize + 10..][..4000]);
    let grown = size + 3 * CS as u64 + 17;
    fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .set_len(grown)
        .unwrap();
    write_at(&a, grown - 10, b"new tail!!");
    make_image(&c, MIB, &[(0, b"another disk")]);
    let second = env.backup("vm", &[("sda", &a), ("sdb", &b), ("sdc", &c)]);

    let new_a = fs::read(&a).unwrap();
    let mut want: Vec<(u64, u64)> = Vec::new();
    for (i, blk) in new_a.chunks(CS).enumerate() {
        let old = old_a
            .get(i * CS..)
            .map_or(&[][..], |o| &o[..o.len().min(CS)]);
        // The old disk reads as zeros past its end; its last block, if it
        // holds data, changed length, which counts as a change.
        let mut extended = old.to_vec();
        extended.resize(blk.len(), 0);
        let same = (old.len() == blk.len() || old.iter().all(|b| *b == 0)) && extended == blk;
        if !same {
            let (off, len) = (
                u64::try_from(i * CS).unwrap(),
                u64::try_from(blk.len()).unwrap(),
            );
            match want.last_mut() {
                Some(r) if r.0 + r.1 == off => r.1 += len,
                _ => want.push((off, len)),
            }
        }
    }
    assert!(want.len() >= 3, "{want:?}");
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["diff", &first, &second, "--json"])).unwrap();
    let disk = |n: &str| {
        v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == n)
            .unwrap_or_else(|| panic!("no {n}: {v}"))
            .clone()
    };
    let got: Vec<(u64, u64)> = disk("sda")["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, want, "{v}");
    assert_eq!(disk("sda")["status"], "changed");
    assert_eq!(disk("sda")["size_to"], grown);
    assert_eq!(disk("sdb")["status"], "same");
    assert_eq!(disk("sdc")["status"], "added");
    let back: serde_json::Value =
        serde_json::from_str(&env.ok(&["diff", &second, &first, "--disk", "sdc", "--json"]))
            .unwrap();
    assert_eq!(back["disks"][0]["status"], "removed", "{back}");
    let text = env.ok(&["diff", &first, "vm@latest", "--disk", "sda"]);
    assert!(text.contains(&format!("{} range(s)", want.len())), "{text}");
    let out = env.run(&["diff", &first, &second, "--disk", "nope"]);
    assert_clean_failure(&out, "no disk");
}

/// `check --read-data-subset N/M` reads disjoint parts of the packs that
/// together cover them all: a flipped bit is found by exactly the one part
/// that holds its pack, and by `100%`.
#[test]
fn read_data_subsets_cover_every_pack_once() {
    let env = Env::init(&["--chunk-size", "64K", "--pack-size", "1M"]);
    let img = env.path("d.img");
    make_image(&img, 12 * MIB, &[(0, &random_bytes(17, 12 * MIB as usize))]);
    env.backup("vm", &[("sda", &img)]);
    let packs = env.pack_files();
    assert!(packs.len() >= 6, "only {} packs", packs.len());
    let check = |subset: &str| -> (Option<i32>, serde_json::Value) {
        let out = env.run(&["check", "--json", "--read-data-subset", subset]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{subset}: {e}: {out:?}"));
        (out.status.code(), v)
    };
    let read = |v: &serde_json::Value| v["packs_read"].as_u64().unwrap();
    let total = u64::try_from(packs.len()).unwrap();
    let mut sum = 0;
    for i in 1..=3 {
        let (code, v) = check(&format!("{i}/3"));
        assert_eq!(code, Some(0), "{v}");
        sum += read(&v);
    }
    assert_eq!(sum, total, "the parts do not cover the packs once");
    let (_, v) = check("100%");
    assert_eq!(read(&v), total);

    // Damage a data pack (the largest: a third of the way into a small
    // pack of map nodes can be its trailer, which every check reads): only
    // its part, and 100%, see it.
    let p = packs
        .iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let name = p.file_name().unwrap().to_str().unwrap();
    xor_byte(p, fs::metadata(p).unwrap().len() / 3, 0x01);
    let mut found = 0;
    for i in 1..=3 {
        let (code, v) = check(&format!("{i}/3"));
        if code == Some(3) {
            found += 1;
            assert!(v.to_string().contains(name), "{v}");
        } else {
            assert_eq!(code, Some(0), "{v}");
        }
    }
    assert_eq!(found, 1, "the damaged pack is in exactly one part");
    assert_eq!(check("100%").0, Some(3));

    for bad in ["0/3", "4/3", "1/0", "x", "0%", "101%"] {
        let out = env.run(&["check", "--read-data-subset", bad]);
        assert_clean_failure(&out, bad);
    }
}

/// At a terminal, a new passphrase is typed twice and a mistyped one is
/// asked for again (one typo must not lock a user out); `key add` asks for
/// the current passphrase once. Without a terminal, a missing or empty
/// passphrase says where to give one.
#[test]
fn passphrases_typed_at_a_terminal_are_confirmed() {
    let env = Env::new();
    let on_tty = |args: &[&str]| {
        let mut c = env.cmd();
        c.env_remove("EKKO_PASSWORD").args(args);
        OnTty::spawn(c)
    };
    let mut t = on_tty(&["init"]);
    t.expect("New passphrase:");
    t.type_line("first");
    t.expect("Repeat the new passphrase:");
    t.type_line("frist");
    t.expect("differ");
    t.expect("New passphrase:");
    t.type_line("first");
    t.expect("Repeat the new passphrase:");
    t.type_line("first");
    let (status, shown) = t.finish();
    assert!(status.success(), "init on a terminal failed: {shown}");
    let with = |pass: &str, args: &[&str]| {
        env.cmd()
            .env("EKKO_PASSWORD", pass)
            .args(args)
            .output()
            .unwrap()
    };
    assert_success(&with("first", &["snapshots"]), &["snapshots"]);
    assert_clean_failure(&with("frist", &["snapshots"]), "wrong passphrase");

    let mut t = on_tty(&["key", "add"]);
    t.expect("Passphrase:");
    t.type_line("first");
    t.expect("New passphrase:");
    t.type_line("second");
    t.expect("Repeat the new passphrase:");
    t.type_line("second");
    let (status, shown) = t.finish();
    assert!(status.success(), "key add on a terminal failed: {shown}");
    assert!(
        !shown.contains("Current passphrase"),
        "key add asked for the current passphrase twice: {shown}"
    );
    assert_success(&with("second", &["snapshots"]), &["snapshots"]);

    // No terminal: say which variables to set.
    let out = env
        .cmd()
        .env("EKKO_PASSWORD", "first")
        .env_remove("EKKO_NEW_PASSWORD")
        .args(["key", "add"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_clean_failure(&out, "EKKO_NEW_PASSWORD");
    let fresh = Env::new();
    let out = fresh
        .cmd()
        .env_remove("EKKO_PASSWORD")
        .arg("init")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_clean_failure(&out, "--encryption none");
    assert!(!fresh.repo.exists(), "a refused init left a repository");
    // A password file that is missing or empty is named as such.
    let missing = env.path("no-such-file");
    let out = env
        .cmd()
        .env_remove("EKKO_PASSWORD")
        .arg("--password-file")
        .arg(&missing)
        .arg("snapshots")
        .output()
        .unwrap();
    assert_clean_failure(&out, "cannot read the password file");
    let empty = env.path("empty-pass");
    fs::write(&empty, b"\n").unwrap();
    let out = env
        .cmd()
        .env_remove("EKKO_PASSWORD")
        .arg("--password-file")
        .arg(&empty)
        .arg("snapshots")
        .output()
        .unwrap();
    assert_clean_failure(&out, "is empty");
}

/// The local index cache is only a cache: bits flipped anywhere in its
/// used pages never make a restore fail, panic or return wrong bytes, nor
/// a backup fail. (redb panics on some damaged files, and a flipped entry
/// would point at the wrong place.)
#[test]
fn a_damaged_index_cache_is_never_believed() {
    let env = Env::init(&["--chunk-size", "64K"]);
    let img = env.path("d.img");
    make_image(
        &img,
        12 * MIB + 4096,
        &[
            (0, &random_bytes(80, 6 * MIB as usize)),
            (8 * MIB, &text_bytes(81, 3 * MIB as usize)),
        ],
    );
    let id = env.backup("vm", &[("sda", &img)]);
    let want = sha256_file(&img);
    assert_eq!(sha256_file(&env.restore(&id, "sda")), want);
    let cache = fs::read_dir(&env.cache)
        .unwrap()
        .map(|e| e.unwrap().path().join("index.redb"))
        .find(|p| p.exists())
        .expect("an index cache");
    let pristine = fs::read(&cache).unwrap();
    // Offsets spread over the pages that hold anything.
    let used: Vec<usize> = pristine
        .chunks(4096)
        .enumerate()
        .filter(|(_, page)| page.iter().any(|b| *b != 0))
        .map(|(i, _)| i * 4096)
        .collect();
    assert!(!used.is_empty());
    let mut offsets = Vec::new();
    for (n, page) in used.iter().enumerate() {
        for k in 0..6 {
            offsets.push(page + (n * 977 + k * 683) % 4096);
        }
    }
    let (mut caught, mut runs) = (0, 0);
    for (n, off) in offsets.into_iter().enumerate().step_by(2) {
        let mut damaged = pristine.clone();
        damaged[off] ^= 1 << (n % 8);
        fs::write(&cache, &damaged).unwrap();
        let to = env.path("r.img");
        let _ = fs::remove_file(&to);
        let out = env.run(&[
            "restore",
            &id,
            "--disk",
            "sda",
            "--to",
            to.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains("panicked"),
            "byte {off}: {err}"
        );
        assert_eq!(sha256_file(&to), want, "byte {off}");
        if err.contains("index cache") {
            caught += 1;
        }
        if n % 8 == 0 {
            fs::write(&cache, &damaged).unwrap();
            let out = env.run(&[
                "backup",
                "--vm",
                "vm",
                "--disk",
                &format!("sda={}", img.display()),
            ]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && !err.contains("panicked"),
                "byte {off}: {err}"
            );
        }
        runs += 1;
    }
    assert!(caught > 0, "no damage was noticed in {runs} runs");
    env.ok(&["check", "--read-data"]);
}

/// `check --repair` finds packs stored under another pack's name (one
/// renamed, two swapped) and copies them back instead of deleting the only
/// copy of intact data; it refuses to touch anything when no pack opens
/// at all (an unencrypted repository whose config lost its `id_key`).
#[test]
fn repair_puts_moved_packs_back_and_refuses_a_wrong_key() {
    // Two packs swapped, and a third renamed to a name no pack has.
    let env = Env::init(&["--chunk-size", "64K", "--pack-size", "1M"]);
    let img = env.path("d.img");
    make_image(&img, 5 * MIB, &[(0, &random_bytes(80, 5 * MIB as usize))]);
    let want = sha256_file(&img);
    let id = env.backup("vm", &[("sda", &img)]);
    let mut packs = env.pack_files();
    packs.sort();
    assert!(packs.len() >= 4, "{packs:?}");
    let tmp = env.path("swap");
    fs::rename(&packs[0], &tmp).unwrap();
    fs::rename(&packs[1], &packs[0]).unwrap();
    fs::rename(&tmp, &packs[1]).unwrap();
    let elsewhere = env.repo.join("packs/01/0123456789abcdef0123456789abcdef");
    fs::create_dir_all(elsewhere.parent().unwrap()).unwrap();
    fs::rename(&packs[2], &elsewhere).unwrap();
    // And one in the wrong folder (packs/xx/ must be its id's first byte).
    let file = packs[3].file_name().unwrap().to_owned();
    let folder = if file.to_str().unwrap().starts_with("ff") {
        "00"
    } else {
        "ff"
    };
    let wrong = env.repo.join("packs").join(folder).join(&file);
    fs::create_dir_all(wrong.parent().unwrap()).unwrap();
    fs::rename(&packs[3], &wrong).unwrap();
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("a pack file in the wrong place"),
        "{out:?}"
    );
    let out = env.run(&["check", "--read-data"]);
    assert_eq!(out.status.code(), Some(3));
    let report = env.ok(&["check", "--read-data", "--repair"]);
    assert_eq!(
        report
            .matches("stored under another name: copied back")
            .count(),
        4,
        "{report}"
    );
    assert!(!elsewhere.exists(), "the copy under the wrong name stays");
    assert!(!wrong.exists(), "the file in the wrong folder stays");
    env.ok(&["check", "--read-data"]);
    assert_eq!(sha256_file(&env.restore(&id, "sda")), want);

    // An unencrypted repository whose config's id_key is damaged: every
    // file fails to authenticate, and the repair changes nothing.
    let plain = Env::init(&["--chunk-size", "64K", "--encryption", "none"]);
    let id = plain.backup("vm", &[("sda", &img)]);
    let config = plain.repo.join("config");
    let good = fs::read(&config).unwrap();
    let text = String::from_utf8(good[16..].to_vec()).unwrap();
    let at = text.find("\"id_key\": \"").unwrap() + 11;
    let digit = text.as_bytes()[at];
    let mut bad = good.clone();
    bad[16 + at] = if digit == b'0' { b'1' } else { b'0' };
    fs::write(&config, &bad).unwrap();
    let before = plain.repo_state();
    let out = plain.run(&["check", "--read-data", "--repair"]);
    let err = assert_clean_failure(&out, "id_key");
    assert!(err.contains("Nothing was changed"), "{err}");
    assert_eq!(plain.repo_state(), before, "a refused repair changed files");
    fs::write(&config, &good).unwrap();
    assert_eq!(sha256_file(&plain.restore(&id, "sda")), want);
}

/// A backup that deduplicates against a truncated pack (found empty or
/// short by the size check before the commit) commits nothing, and says
/// what to do; after the repair the next backup stores the data again.
#[test]
fn a_backup_never_commits_onto_a_truncated_pack() {
    let env = Env::init(&["--chunk-size", "64K"]);
    let img = env.path("d.img");
    make_image(&img, 2 * MIB, &[(0, &random_bytes(82, 2 * MIB as usize))]);
    env.backup("vm", &[("sda", &img)]);
    let packs = env.pack_files();
    assert_eq!(packs.len(), 1);
    for len in [0, fs::metadata(&packs[0]).unwrap().len() / 2] {
        fs::OpenOptions::new()
            .write(true)
            .open(&packs[0])
            .unwrap()
            .set_len(len)
            .unwrap();
        let before = env.repo_state();
        let out = env.run(&[
            "backup",
            "--vm",
            "vm",
            "--disk",
            &format!("sda={}", img.display()),
        ]);
        let err = assert_clean_failure(&out, "truncated");
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(err.contains("Nothing was committed"), "{err}");
        assert_eq!(env.repo_state(), before, "a refused backup changed files");
    }
    env.run(&["check", "--read-data", "--repair"]);
    let id = env.backup("vm", &[("sda", &img)]);
    assert_eq!(sha256_file(&env.restore(&id, "sda")), sha256_file(&img));
    // The damaged pack was kept while snapshots lacked chunks it might
    // hold; now that the backup stored them again, a repair removes it.
    env.ok(&["check", "--read-data", "--repair"]);
    env.ok(&["check", "--read-data"]);
}

/// A file whose header names an unknown format version is either written
/// by a newer ekko or damaged; sealed files tell which (the header is
/// sealed with the body). A damaged one is damage like any other: named,
/// and it does not lock every command out.
#[test]
fn a_damaged_version_byte_is_damage_and_named() {
    let env = Env::init(&["--chunk-size", "64K"]);
    let img = env.path("d.img");
    make_image(&img, MIB, &[(0, &random_bytes(81, MIB as usize))]);
    let id = env.backup("vm", &[("sda", &img)]);
    let index: Vec<_> = fs::read_dir(env.repo.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(index.len(), 1);
    xor_byte(&index[0], 8, 0x03); // version 1 -> 2
    let _ = fs::remove_dir_all(&env.cache);
    let name = format!("index/{}", index[0].file_name().unwrap().to_str().unwrap());
    let out = env.run(&["snapshots"]);
    assert!(out.status.success(), "{out:?}");
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&name) && text.contains("header is damaged"),
        "{text}"
    );
    env.ok(&["index", "rebuild"]);
    assert_eq!(sha256_file(&env.restore(&id, "sda")), sha256_file(&img));

    let manifest = env.repo.join("snapshots").join(&id);
    xor_byte(&manifest, 8, 0x03);
    // Not from this host's manifest cache, which holds a good copy.
    let _ = fs::remove_dir_all(&env.cache);
    let out = env.run(&["restore", &id, "--to", env.path("r.img").to_str().unwrap()]);
    let err = assert_clean_failure(&out, &format!("snapshots/{id}"));
    assert!(err.contains("header is damaged"), "{err}");

    // With the newest manifest damaged, `vm@latest` cannot be told: a
    // restore or an export of it is refused (exit 3) instead of silently
    // giving the older snapshot; a backup still finds a parent.
    env.backup("old", &[("sda", &img)]);
    let newer = env.backup("vm", &[("sda", &img)]);
    let _ = fs::remove_dir_all(&env.cache);
    xor_byte(&env.repo.join("snapshots").join(&newer), 40, 0x01);
    let out = env.run(&["restore", "vm@latest", "--to", "-"]);
    let err = assert_clean_failure(&out, "name the snapshot by its id");
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(out.stdout.is_empty(), "a refused restore streamed bytes");
    let out = env.run(&["diff", "old@latest", "vm@latest"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    env.backup("vm", &[("sda", &img)]);
}

#[test]
fn truncated_empty_or_missing_files_give_precise_errors() {
    let env = Env::init(&[]);
    let img = env.path("d.img");
    make_image(&img, 3 * MIB, &[(0, &random_bytes(16, 3 * MIB as usize))]);
    let id = env.backup("vm", &[("sda", &img)]);
    let snap = env.repo.join("snapshots").join(&id);
    let orig = fs::read(&snap).unwrap();
    let to = env.path("r.img");
    let restore = |env: &Env| {
        let _ = fs::remove_file(&to);
        env.run(&[
            "restore",
            &id,
            "--disk",
            "sda",
            "--to",
            to.to_str().unwrap(),
        ])
    };
    for (what, data) in [
        ("truncated", &orig[..orig.len() / 2]),
        ("zero-length", &orig[..0]),
        ("bad magic", b"XXXXXXXXXXXXXXXXXXXXXXX".as_slice()),
    ] {
        fs::write(&snap, data).unwrap();
        let out = restore(&env);
        let err = assert_clean_failure(&out, "snapshots/");
        assert!(
            err.contains("damaged") || err.contains("truncated"),
            "{what}: {err}"
        );
        // The list goes on without it, and says it is incomplete.
        let out = env.run(&["snapshots", "--json"]);
        assert_eq!(out.status.code(), Some(3), "{what}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("missing from this list"), "{what}: {err}");
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(listed, serde_json::json!([]), "{what}");
    }
    fs::write(&snap, &orig).unwrap();
    assert_success(&restore(&env), &["restore"]);
    // Truncated pack.
    let pack = env.pack_files()[0].clone();
    let porig = fs::read(&pack).unwrap();
    // Losing only the trailer: check reports it; the chunks still read
    // right, because each one is authenticated on its own.
    fs::write(&pack, &porig[..porig.len() - 7]).unwrap();
    assert_eq!(env.run(&["check"]).status.code(), Some(3));
    assert_success(&restore(&env), &["restore"]);
    assert_eq!(sha256_file(&to), sha256_file(&img));
    // Losing chunk data too: restore fails loudly.
    fs::write(&pack, &porig[..porig.len() / 2]).unwrap();
    assert_eq!(env.run(&["check"]).status.code(), Some(3));
    assert_clean_failure(&restore(&env), "damaged");
    // Missing pack.
    fs::remove_file(&pack).unwrap();
    assert_clean_failure(&restore(&env), "missing");
    fs::write(&pack, &porig).unwrap();
    // Missing or empty config / key files.
    let cfg = env.repo.join("config");
    let corig = fs::read(&cfg).unwrap();
    fs::write(&cfg, b"").unwrap();
    assert_clean_failure(&env.run(&["snapshots"]), "config");
    fs::remove_file(&cfg).unwrap();
    assert_clean_failure(&env.run(&["snapshots"]), "ekko init");
    fs::write(&cfg, &corig).unwrap();
    // Index files lost: the cache keeps working, and a fresh cache reports
    // the missing chunks instead of guessing.
    let keydir = env.repo.join("keys");
    let key = fs::read_dir(&keydir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let korig = fs::read(&key).unwrap();
    fs::write(&key, &korig[..20]).unwrap();
    assert_clean_failure(&env.run(&["snapshots"]), "keys/");
    fs::write(&key, &korig).unwrap();
    assert_success(&restore(&env), &["restore"]);
    assert_eq!(sha256_file(&to), sha256_file(&img));
}

#[test]
fn index_cache_is_only_a_cache() {
    let env = Env::init(&[]);
    let img = env.path("d.img");
    make_image(&img, 4 * MIB, &[(0, &random_bytes(17, 4 * MIB as usize))]);
    let id = env.backup("vm", &[("sda", &img)]);
    fs::remove_dir_all(&env.cache).unwrap();
    assert_eq!(sha256_file(&env.restore(&id, "sda")), sha256_file(&img));
    // A damaged cache file is rebuilt, not trusted.
    let cache_file = fs::read_dir(&env.cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("index.redb");
    fs::write(&cache_file, b"garbage").unwrap();
    let second = env.backup_json("vm", &[("sda", img.to_str().unwrap())], &[]);
    assert_eq!(
        second["bytes_new"], 0,
        "dedup lost after cache rebuild: {second}"
    );
    assert_eq!(
        sha256_file(&env.restore("vm@latest", "sda")),
        sha256_file(&img)
    );
}

#[test]
fn sigkill_during_backup_never_damages_earlier_snapshots() {
    let env = Env::init(&["--chunk-size", "64K"]);
    let img = env.path("big.img");
    make_image(&img, 96 * MIB, &[(0, &random_bytes(18, 96 * MIB as usize))]);
    // Every round rewrites the whole image, so each backup does the work
    // of this first one: kill them at 10% to 80% of its time, whatever
    // this machine's speed.
    let started = std::time::Instant::now();
    let id0 = env.backup("vm", &[("sda", &img)]);
    let full = started.elapsed();
    let sum0 = sha256_file(&img);
    let mut killed = 0;
    for round in 0..8u64 {
        // Change everything so that the backup has real work to do.
        write_at(&img, 0, &random_bytes(1000 + round, 96 * MIB as usize));
        let mut child = env
            .cmd()
            .args(["backup", "--vm", "vm", "--threads", "2", "--disk"])
            .arg(format!("sda={}", img.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(0.1 + 0.1 * round as f64));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        // Earlier snapshot intact; the repository checks clean.
        let out = env.run(&["check", "--read-data"]);
        assert_success(&out, &["check --read-data"]);
        assert_eq!(sha256_file(&env.restore(&id0, "sda")), sum0);
    }
    assert!(
        killed >= 4,
        "only {killed} backups were killed mid-way; the test lost its teeth"
    );
    // And the repository still takes backups.
    let id = env.backup("vm", &[("sda", &img)]);
    assert_eq!(sha256_file(&env.restore(&id, "sda")), sha256_file(&img));
}

#[test]
fn bad_arguments_are_clear() {
    let env = Env::init(&[]);
    assert_clean_failure(&env.run(&["init"]), "already exists");
    assert_clean_failure(
        &env.run(&["backup", "--vm", "x", "--disk", "nonsense"]),
        "NAME=SOURCE",
    );
    assert_clean_failure(
        &env.run(&["backup", "--vm", "x", "--disk", "a=/nonexistent.img"]),
        "cannot open",
    );
    assert_clean_failure(
        &env.run(&["restore", "ffffffff", "--to", "/tmp/none"]),
        "no snapshot",
    );
    let e2 = Env::new();
    // A folder holding other things is not where a repository goes.
    fs::create_dir_all(&e2.repo).unwrap();
    fs::write(e2.repo.join("notes.txt"), b"mine").unwrap();
    let out = e2.run(&["init"]);
    assert_clean_failure(&out, "not empty");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        fs::read_dir(&e2.repo).unwrap().count(),
        1,
        "init wrote into it"
    );
    fs::remove_dir_all(&e2.repo).unwrap();
    assert_clean_failure(&e2.run(&["init", "--chunk-size", "100K"]), "power of two");
    assert_clean_failure(&e2.run(&["snapshots"]), "ekko init");
}

/// A repository written by ekko 0.1.0 (format version 1) must stay readable:
/// a format change is a version change, and this test keeps the old one.
#[test]
fn reads_a_version_1_repository_fixture() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v1");
    let env = Env::new();
    // Copy it: reading must not need to write, but keep the fixture pristine.
    run_tool(Command::new("cp").arg("-a").arg(&fixture).arg(&env.repo));
    let run = |args: &[&str]| {
        let out = env
            .cmd()
            .env("EKKO_PASSWORD", "fixture")
            .args(args)
            .output()
            .unwrap();
        assert_success(&out, args);
        String::from_utf8(out.stdout).unwrap()
    };
    let want = [
        (
            "9b8a4b16961b3ba98becb91f7ed3a973",
            "645d82e7a703732b63e62da7acd82438bd10b64fabfdeaa63a4455b7df83da9a",
        ),
        (
            "e570654f48b74da1eb2ea8b2f4bc47dc",
            "10ac2893d85b34a3c6ee2549ce1ae7be5fd0afb76e430fd6bd388ecbfbb3f3ae",
        ),
    ];
    for (id, sum) in want {
        let to = env.path(&format!("{id}.img"));
        run(&["restore", id, "--to", to.to_str().unwrap()]);
        assert_eq!(sha256_file(&to), sum, "snapshot {id} of the v1 fixture");
    }
    run(&["check", "--read-data"]);
    assert_eq!(
        env.repo_state(),
        dir_state(&fixture),
        "reading changed the repository"
    );
}

#[test]
fn index_rebuilds_from_packs_alone() {
    let env = Env::init(&["--chunk-size", "64K"]);
    let img = env.path("d.img");
    make_image(&img, 6 * MIB, &[(0, &random_bytes(19, 5 * MIB as usize))]);
    let id = env.backup("vm", &[("sda", &img)]);
    fs::remove_dir_all(env.repo.join("index")).unwrap();
    fs::remove_dir_all(&env.cache).unwrap();
    let to = env.path("r.img");
    let out = env.run(&["restore", &id, "--to", to.to_str().unwrap()]);
    assert_clean_failure(&out, "not in any pack");
    let _ = fs::remove_file(&to);
    env.ok(&["index", "rebuild"]);
    assert_eq!(sha256_file(&env.restore(&id, "sda")), sha256_file(&img));
    env.ok(&["check", "--read-data"]);
    // A pack whose trailer is damaged but whose chunks are intact: a
    // rebuild reports it and keeps what the old index said of its chunks,
    // so the snapshot still restores (it used to lose them for good).
    let packs = env.pack_files();
    let p = packs
        .iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    xor_byte(p, fs::metadata(p).unwrap().len() - 40, 0x01);
    let out = env.run(&["index", "rebuild"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unreadable pack trailer") && err.contains("kept "),
        "{err}"
    );
    fs::remove_dir_all(&env.cache).unwrap();
    assert_eq!(sha256_file(&env.restore(&id, "sda")), sha256_file(&img));
    // Rebuilding again keeps them again.
    assert_eq!(env.run(&["index", "rebuild"]).status.code(), Some(3));
    fs::remove_dir_all(&env.cache).unwrap();
    assert_eq!(sha256_file(&env.restore(&id, "sda")), sha256_file(&img));
}

/// One damaged index file does not lock users out: the repository still
/// opens (with a warning), `check` names the file, `prune` refuses to
/// delete anything, a restore that needs its chunks points at `index
/// rebuild`, and the rebuild replaces it.
#[test]
fn a_damaged_index_file_is_skipped_reported_and_rebuilt() {
    let env = Env::init(&["--chunk-size", "64K"]);
    let img = env.path("d.img");
    make_image(&img, 3 * MIB, &[(0, &random_bytes(23, 3 * MIB as usize))]);
    let id = env.backup("vm", &[("sda", &img)]);
    let index: Vec<_> = fs::read_dir(env.repo.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(index.len(), 1);
    write_at(&index[0], 100, &[0x55]);
    fs::remove_dir_all(&env.cache).unwrap();
    let name = index[0].file_name().unwrap().to_str().unwrap().to_string();
    let out = env.run(&["snapshots"]);
    assert_success(&out, &["snapshots"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(&name));
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&name));
    let before = env.repo_state();
    assert_clean_failure(&env.run(&["prune"]), "index rebuild");
    assert_eq!(
        env.repo_state(),
        before,
        "a refused prune changed the repository"
    );
    let to = env.path("r.img");
    let out = env.run(&["restore", &id, "--to", to.to_str().unwrap()]);
    assert_clean_failure(&out, "index rebuild");
    // A backup still works: it stores again what it cannot see.
    env.backup("vm", &[("sda", &img)]);
    env.ok(&["index", "rebuild"]);
    assert!(!index[0].exists());
    assert_eq!(sha256_file(&env.restore(&id, "sda")), sha256_file(&img));
    env.ok(&["check", "--read-data"]);
}

#[test]
fn full_disk_fails_cleanly_and_loses_nothing() {
    let env = Env::new();
    let mnt = env.path("small");
    let guard = TmpfsGuard::mount(&mnt, "24m");
    let env = Env {
        repo: mnt.join("repo"),
        ..env
    };
    env.ok(&["init"]);
    let small = env.path("small.img");
    make_image(&small, 8 * MIB, &[(0, &random_bytes(20, 8 * MIB as usize))]);
    let id = env.backup("vm", &[("sda", &small)]);
    let before = env.repo_state();
    let big = env.path("big.img");
    make_image(&big, 40 * MIB, &[(0, &random_bytes(21, 40 * MIB as usize))]);
    let out = env.run(&[
        "backup",
        "--vm",
        "vm",
        "--disk",
        &format!("sda={}", big.display()),
    ]);
    assert_clean_failure(&out, "no space left");
    // Earlier snapshots are intact and no snapshot appeared.
    let js: serde_json::Value = serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(js.as_array().unwrap().len(), 1);
    assert_eq!(sha256_file(&env.restore(&id, "sda")), sha256_file(&small));
    env.ok(&["check", "--read-data"]);
    // Nothing half-written is left behind, and nothing old was touched.
    let after = env.repo_state();
    assert!(
        after.iter().all(|(n, _)| !n.contains(".tmp-")),
        "debris left: {after:?}"
    );
    for f in &before {
        if !f.0.starts_with("locks/") {
            assert!(after.contains(f), "{} changed or vanished", f.0);
        }
    }
    // A restore onto a full filesystem fails cleanly too, whether whole
    // blocks go through O_DIRECT (the default) or the page cache.
    let tiny = env.path("tiny");
    let tiny_guard = TmpfsGuard::mount(&tiny, "4m");
    for extra in [None, Some("--buffered")] {
        let to = tiny.join("out.img");
        let mut args = vec![
            "restore",
            &id,
            "--disk",
            "sda",
            "--to",
            to.to_str().unwrap(),
        ];
        args.extend(extra);
        assert_clean_failure(&env.run(&args), "no space left");
        // The partial image is gone, and with it the space it took.
        assert_eq!(
            fs::read_dir(&tiny).unwrap().count(),
            0,
            "debris in {tiny:?}"
        );
    }
    // Unmount first: `env`, declared after `guard`, would otherwise be
    // dropped first, and its scratch folder cannot go while a tmpfs is
    // mounted inside it.
    drop((tiny_guard, guard));
}

/// A slow backup (rate-limited) that holds its shared lock, started with
/// `vars` added to its environment, once its lock object exists.
/// The caller kills and waits for the child.
#[allow(clippy::zombie_processes)]
fn slow_backup(
    env: &Env,
    img: &std::path::Path,
    vars: &[(&str, &str)],
) -> (std::process::Child, std::path::PathBuf) {
    let before: Vec<_> = lock_files(env);
    let mut child = env
        .cmd()
        .args(["backup", "--vm", "slow", "--rate-limit", "1", "--disk"])
        .arg(format!("sda={}", img.display()))
        .envs(vars.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(l) = lock_files(env).into_iter().find(|l| !before.contains(l)) {
            return (child, l);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the backup never took its lock");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lock objects of a folder repository (not the temporary files they
/// are written through, which a killed writer may never rename).
fn lock_files(env: &Env) -> Vec<std::path::PathBuf> {
    match fs::read_dir(env.repo.join("locks")) {
        Ok(d) => d
            .map(|e| e.unwrap().path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// `ekko unlock` removes exactly one lock, for a reason that says `why`.
fn unlock_removes_one(env: &Env, why: &str) {
    let r: serde_json::Value = serde_json::from_str(&env.ok(&["unlock", "--json"])).unwrap();
    assert_eq!(r["removed"].as_array().unwrap().len(), 1, "{r}");
    let reason = r["removed"][0]["reason"].as_str().unwrap();
    assert!(reason.contains(why), "{r}");
}

fn age_file(path: &std::path::Path, ago: &str) {
    run_tool(Command::new("touch").args(["-m", "-d", ago]).arg(path));
}

/// Locks of dead holders: on this host they are stale at once; elsewhere
/// once the store has not seen them refreshed for 30 minutes. Live holders
/// refresh theirs. `ekko unlock` removes only stale locks unless told
/// `--remove-all`.
#[test]
fn stale_locks_are_ignored_and_unlock_removes_them() {
    let env = Env::init(&[]);
    let img = env.path("disk.img");
    make_image(&img, 64 * MIB, &[(0, &random_bytes(40, 64 * MIB as usize))]);

    // A backup on "another host" dies holding its lock: index rebuild (an
    // exclusive lock) cannot tell that it is dead, and refuses.
    let (mut child, lock) = slow_backup(&env, &img, &[("EKKO_HOST", "compute-17")]);
    child.kill().unwrap();
    child.wait().unwrap();
    let out = env.run(&["index", "rebuild"]);
    let err = assert_clean_failure(&out, "locked");
    assert!(
        err.contains("compute-17") && err.contains("ekko unlock"),
        "{err}"
    );
    // unlock keeps a lock that may be live.
    let r: serde_json::Value = serde_json::from_str(&env.ok(&["unlock", "--json"])).unwrap();
    assert_eq!(r["removed"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["live"].as_array().unwrap().len(), 1, "{r}");
    assert!(lock.exists());
    // Not refreshed for two hours: stale. Rebuild goes ahead; unlock removes it.
    age_file(&lock, "2 hours ago");
    env.ok(&["index", "rebuild"]);
    unlock_removes_one(&env, "not refreshed");
    assert!(!lock.exists());

    // A live holder refreshes its lock, so an old timestamp does not last.
    let (mut child, lock) = slow_backup(
        &env,
        &img,
        &[("EKKO_HOST", "compute-18"), ("EKKO_LOCK_REFRESH_SECS", "1")],
    );
    age_file(&lock, "2 hours ago");
    std::thread::sleep(Duration::from_millis(2500));
    let age = fs::metadata(&lock)
        .unwrap()
        .modified()
        .unwrap()
        .elapsed()
        .unwrap_or_default();
    assert!(
        age < Duration::from_secs(60),
        "lock not refreshed: {age:?} old"
    );
    assert_clean_failure(&env.run(&["index", "rebuild"]), "locked");
    // --remove-all removes even a lock that looks live (fresh, from another
    // host). The holder is stopped first: running, it would write its lock
    // again at its next refresh, a second later.
    child.kill().unwrap();
    child.wait().unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&env.ok(&["unlock", "--remove-all", "--json"])).unwrap();
    assert_eq!(r["removed"].as_array().unwrap().len(), 1, "{r}");
    assert!(!lock.exists());

    // On this host, a lock whose process is gone is stale at once.
    let (mut child, lock) = slow_backup(&env, &img, &[]);
    child.kill().unwrap();
    child.wait().unwrap();
    env.ok(&["index", "rebuild"]);
    unlock_removes_one(&env, "gone on this host");
    assert!(!lock.exists());
    env.ok(&["check"]);

    // A damaged lock file: its holder is unknown, so a deleter backs off,
    // naming it; `unlock` removes it at once (it used to fail on it, as
    // did every backup).
    let junk = env
        .repo
        .join("locks")
        .join("0123456789abcdef0123456789abcdef");
    fs::write(&junk, random_bytes(41, 50)).unwrap();
    let err = assert_clean_failure(&env.run(&["index", "rebuild"]), "damaged");
    assert!(err.contains("ekko unlock"), "{err}");
    unlock_removes_one(&env, "damaged");
    assert!(!junk.exists());
    env.backup("vm", &[("sda", &img)]);
}

/// Two hosts back up clones of one base image at overlapping times. The
/// second starts while the first is midway and runs behind it: with
/// progress sharing (published index files, taken in as the backup runs)
/// it stores little more than its own delta; with sharing off it stores
/// the whole base again. Both snapshots verify and restore exactly.
#[test]
fn a_backup_running_behind_another_dedups_against_what_it_already_stored() {
    overlapping_backups_share_progress(|| Env::init(&["--pack-size", "1M"]));
}

/// The scenario above on the repository `new_repo` makes (a folder, or a
/// bucket in `tests/s3.rs`).
pub(crate) fn overlapping_backups_share_progress(new_repo: impl Fn() -> Env) {
    const BASE: usize = 48 << 20;
    for share_ms in ["200", "0"] {
        let env = new_repo();
        let base = random_bytes(50, BASE);
        let imgs: Vec<_> = (0..2u64)
            .map(|i| {
                let img = env.path(&format!("clone{i}.img"));
                make_image(&img, 64 * MIB, &[(0, &base)]);
                write_at(
                    &img,
                    (40 + 4 * i) * MIB,
                    &random_bytes(51 + i, MIB as usize),
                );
                img
            })
            .collect();
        let spawn = |i: usize| {
            env.cmd()
                .args(["backup", "--json", "--rate-limit", "16", "--vm"])
                .arg(format!("vm{i}"))
                .arg("--disk")
                .arg(format!("sda={}", imgs[i].display()))
                .env("EKKO_SHARE_MS", share_ms)
                .env("EKKO_HOST", format!("host{i}"))
                .env("EKKO_CACHE_DIR", env.path(&format!("cache{i}")))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let first = spawn(0);
        std::thread::sleep(Duration::from_millis(1500));
        let second = spawn(1);
        let mut new = Vec::new();
        for child in [first, second] {
            let out = child.wait_with_output().unwrap();
            assert_success(&out, &["backup (overlapping)"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            new.push(v["bytes_new"].as_u64().unwrap());
        }
        eprintln!("share every {share_ms} ms: new bytes {new:?}");
        if share_ms == "0" {
            // The control: without sharing, the second stores the base again.
            assert!(new[1] >= BASE as u64, "{new:?}");
        } else {
            assert!(new[0] >= BASE as u64, "{new:?}");
            assert!(
                new[1] <= MIB + BASE as u64 / 4,
                "the second backup stored {} bytes for a 1 MiB delta",
                new[1]
            );
        }
        env.ok(&["check", "--read-data"]);
        for (i, img) in imgs.iter().enumerate() {
            let out = env.restore(&format!("vm{i}@latest"), "sda");
            assert_eq!(sha256_file(&out), sha256_file(img));
        }
    }
}

/// ekko links neither libnbd nor libvirt. With both unreadable (a private
/// mount namespace binds /dev/null over them), a raw image backs up and
/// restores, and a qcow2 image or a libvirt domain fails saying what to
/// install, leaving the repository as it was.
#[test]
fn without_libnbd_or_libvirt_installed_only_what_needs_them_fails() {
    require("unshare");
    let env = Env::init(&[]);
    let img = env.path("d.img");
    make_image(&img, 4 * MIB, &[(0, &random_bytes(40, MIB as usize))]);
    let qcow = env.path("d.qcow2");
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-q", "-O", "qcow2"])
            .arg(&img)
            .arg(&qcow),
    );
    let libs: Vec<String> = ["libnbd.so.0", "libvirt.so.0"]
        .iter()
        .map(|l| {
            let p = Path::new("/lib/x86_64-linux-gnu").join(l);
            let real = fs::canonicalize(&p).unwrap_or_else(|e| {
                panic!("{} missing (scripts/setup installs it): {e}", p.display())
            });
            real.display().to_string()
        })
        .collect();
    let hidden = |args: &str| {
        let mut script = String::new();
        for l in &libs {
            script += &format!("mount --bind /dev/null {l} && ");
        }
        script += &format!("exec {} {args}", ekko_bin().display());
        // ekko's environment (repository, passphrase, cache), run by unshare.
        let ekko = env.cmd();
        let mut c = Command::new("unshare");
        for (k, v) in ekko.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.args(["--mount", "sh", "-c", &script])
            .output()
            .expect("running unshare")
    };
    let out = hidden(&format!(
        "backup -q --vm plain --disk sda={}",
        img.display()
    ));
    assert_success(&out, &["backup of a raw image (libnbd and libvirt hidden)"]);
    let snap = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let to = env.path("restored.img");
    let out = hidden(&format!("restore -q {snap} --to {}", to.display()));
    assert_success(&out, &["restore (libnbd and libvirt hidden)"]);
    assert_eq!(sha256_file(&to), sha256_file(&img));

    let before = env.repo_state();
    let out = hidden(&format!("backup --vm q --disk sda={}", qcow.display()));
    let err = assert_clean_failure(&out, "apt install libnbd0");
    assert!(err.contains("libnbd.so.0"), "{err}");
    let out = hidden("backup --domain ekko-test-anything");
    let err = assert_clean_failure(&out, "apt install libvirt0");
    assert!(err.contains("libvirt.so.0"), "{err}");
    assert_eq!(
        env.repo_state(),
        before,
        "a failed backup changed the repository"
    );
}

/// A backup keeps a copy of each manifest in the local cache folder, so
/// that finding a VM's latest snapshot does not fetch every manifest of the
/// repository again. The copy never hides damage from `check`: with a bit
/// flipped in the repository's manifest, the restore (from the verified
/// copy) still equals the source, and `check` names the manifest and exits
/// 3. Truncation is caught everywhere (see the test above).
#[test]
fn a_cached_manifest_never_hides_a_damaged_one_from_check() {
    let env = Env::init(&[]);
    let img = env.path("d.img");
    make_image(&img, 3 * MIB, &[(0, &random_bytes(17, 3 * MIB as usize))]);
    let id = env.backup("vm", &[("sda", &img)]);
    let copies: Vec<_> = fs::read_dir(&env.cache)
        .unwrap()
        .flatten()
        .map(|repo| repo.path().join("snapshots").join(&id))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(copies.len(), 1, "the backup left no copy of its manifest");

    let snap = env.repo.join("snapshots").join(&id);
    xor_byte(&snap, fs::metadata(&snap).unwrap().len() / 2, 0x04);

    let out = env.restore(&id, "sda");
    assert_eq!(sha256_file(&out), sha256_file(&img));
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(3), "check must see the damage");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains(&format!("snapshots/{id}")), "{report}");

    // Without the cache folder the damage is reported by every reader.
    fs::remove_dir_all(&env.cache).unwrap();
    let out = env.run(&["restore", &id, "--to", env.path("r2.img").to_str().unwrap()]);
    assert_clean_failure(&out, "damaged");
}

/// A qemu-storage-daemon with each image as a writable NBD export, as a
/// running VM would hold it: QEMU's write lock on every image. Killed (by
/// PID) on drop.
struct ImageHolder {
    _daemon: KillOnDrop,
    /// Holds the NBD socket until the daemon is gone.
    _dir: tempfile::TempDir,
}

/// qemu-storage-daemon serving each image as a writable NBD export on the
/// Unix socket `sock`.
fn image_holder_command(images: &[(&Path, &str)], sock: &Path) -> Command {
    require("qemu-storage-daemon");
    let mut cmd = Command::new("qemu-storage-daemon");
    for (i, (path, format)) in images.iter().enumerate() {
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=f{i},filename={}",
            path.display().to_string().replace(',', ",,")
        ));
        cmd.arg("--blockdev")
            .arg(format!("driver={format},node-name=d{i},file=f{i}"));
    }
    cmd.arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()));
    for i in 0..images.len() {
        cmd.arg("--export").arg(format!(
            "type=nbd,id=e{i},node-name=d{i},name=d{i},writable=on"
        ));
    }
    cmd.stdout(Stdio::null());
    cmd
}

impl ImageHolder {
    fn start(images: &[(&Path, &str)]) -> ImageHolder {
        let dir = tempfile::Builder::new()
            .prefix("ekh")
            .tempdir_in("/tmp")
            .unwrap();
        let sock = dir.path().join("nbd.sock");
        let child = image_holder_command(images, &sock)
            .spawn()
            .expect("qemu-storage-daemon");
        let child = KillOnDrop(child);
        let started = std::time::Instant::now();
        while !sock.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ImageHolder {
            _daemon: child,
            _dir: dir,
        }
    }
}

#[test]
fn an_image_a_running_qemu_writes_is_refused_unless_allowed() {
    require("qemu-img");
    require("qemu-nbd");
    let env = Env::init(&[]);
    let raw = env.path("vm.raw");
    make_image(
        &raw,
        12 * MIB,
        &[
            (MIB, &random_bytes(21, 2 * MIB as usize)),
            (9 * MIB, &text_bytes(22, 50_000)),
        ],
    );
    let want = sha256_file(&raw);
    let q = env.path("vm,1.qcow2"); // a comma, which QEMU's options double
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&q),
    );
    let holder = ImageHolder::start(&[(&raw, "raw"), (&q, "qcow2")]);
    let before = env.repo_state();
    for img in [&raw, &q] {
        let disk = format!("sda={}", img.display());
        let out = env.run(&["backup", "--vm", "v", "--disk", &disk]);
        let err = assert_clean_failure(&out, "open for writing");
        assert!(
            err.contains("--qmp") && err.contains("--allow-in-use"),
            "{err}"
        );
    }
    assert_eq!(
        env.repo_state(),
        before,
        "a refused backup wrote to the repository"
    );

    // Asked for, the files are read anyway (nothing writes them here, so
    // the backups are exact).
    for (vm, img) in [("r", &raw), ("q", &q)] {
        let id = env.backup_json(vm, &[("sda", img.to_str().unwrap())], &["--allow-in-use"])["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(sha256_file(&env.restore(&id, "sda")), want, "{vm}");
    }

    // Once QEMU lets go, no flag is needed.
    drop(holder);
    for img in [&raw, &q] {
        env.backup("after", &[("sda", img)]);
    }
}

#[test]
fn a_vm_cannot_start_writing_an_image_while_it_is_backed_up() {
    require("qemu-storage-daemon");
    let env = Env::init(&[]);
    let raw = env.path("busy.raw");
    make_image(&raw, 48 * MIB, &[(0, &random_bytes(31, 48 * MIB as usize))]);
    let want = sha256_file(&raw);
    // Slowed down so that the daemon starts while it runs (48 MB at
    // 12 MB/s: about four seconds).
    let mut backup = env
        .cmd()
        .args(["backup", "--vm", "busy", "--rate-limit", "12", "--disk"])
        .arg(format!("sda={}", raw.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        backup.try_wait().unwrap().is_none(),
        "the backup ended too soon"
    );
    let dir = tempfile::Builder::new()
        .prefix("ekw")
        .tempdir_in("/tmp")
        .unwrap();
    let qsd = image_holder_command(&[(&raw, "raw")], &dir.path().join("s"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut qsd = KillOnDrop(qsd);
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = qsd.0.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > Duration::from_secs(3) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = qsd.0.stderr.take() {
        if status.is_some() {
            std::io::Read::read_to_string(&mut e, &mut err).unwrap();
        }
    }
    assert!(
        status.is_some_and(|s| !s.success()) && err.contains("lock"),
        "a writer opened the image during the backup ({status:?}): {err}"
    );
    let out = backup.wait_with_output().unwrap();
    assert_success(&out, &["backup (rate-limited)"]);
    assert_eq!(sha256_file(&env.restore("busy@latest", "sda")), want);
    // The lock ends with the backup.
    drop(ImageHolder::start(&[(&raw, "raw")]));
}

/// Kills (by PID) and reaps a daemon a test started, if it still runs.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A backup that fills the repository's file system fails cleanly, and
/// deletes the packs it stored: the space is back at once, earlier
/// snapshots are intact, and the next backup that fits succeeds.
#[test]
fn a_backup_that_fills_the_disk_gives_its_space_back() {
    let env = Env::new();
    let _small = TmpfsGuard::mount(&env.repo, "48m");
    env.ok(&["init"]);
    let first = env.path("first.img");
    make_image(&first, 4 * MIB, &[(0, &random_bytes(61, 4 * MIB as usize))]);
    let a = env.backup("vm", &[("sda", &first)]);
    let packs = env.pack_files();
    let big = env.path("big.img");
    make_image(&big, 96 * MIB, &[(0, &random_bytes(62, 96 * MIB as usize))]);
    let out = env.run(&[
        "backup",
        "--vm",
        "big",
        "--disk",
        &format!("sda={}", big.display()),
    ]);
    let err = assert_clean_failure(&out, "no space left");
    assert!(err.contains("forget"), "no way out named: {err}");
    assert_eq!(
        env.pack_files(),
        packs,
        "the failed backup left packs behind"
    );
    let next = env.path("next.img");
    make_image(
        &next,
        24 * MIB,
        &[(0, &random_bytes(63, 24 * MIB as usize))],
    );
    env.backup("vm2", &[("sda", &next)]);
    env.ok(&["check", "--read-data"]);
    let to = env.restore(&a, "sda");
    assert_eq!(sha256_file(&to), sha256_file(&first));
}

/// An image that changes while it is read (another process writes or cuts
/// it) gives no snapshot: its blocks would come from different moments.
#[test]
fn an_image_that_changes_during_the_backup_is_refused() {
    require("qemu-img");
    let env = Env::init(&[]);
    let raw = env.path("d.raw");
    make_image(&raw, 24 * MIB, &[(0, &random_bytes(71, 24 * MIB as usize))]);
    let qcow = env.path("d.qcow2");
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow),
    );
    for (img, change) in [(&qcow, "truncate"), (&raw, "write")] {
        let before = env.repo_state();
        // About 2.4 s at 10 MB/s; the change comes after 0.5 s.
        let child = env
            .cmd()
            .args(["backup", "--vm", "vm", "--rate-limit", "10", "--disk"])
            .arg(format!("sda={}", img.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let f = fs::OpenOptions::new().write(true).open(img).unwrap();
        if change == "truncate" {
            f.set_len(8 * MIB).unwrap();
        } else {
            use std::os::unix::fs::FileExt;
            f.write_all_at(b"changed", 20 * MIB).unwrap();
        }
        drop(f);
        let out = child.wait_with_output().unwrap();
        let err = assert_clean_failure(&out, "changed while it was read");
        assert!(err.contains("nothing was committed"), "{change}: {err}");
        assert_eq!(env.repo_state(), before, "{change}: the repository changed");
    }
    // Left alone, the same image backs up and restores.
    let id = env.backup("vm", &[("sda", &raw)]);
    assert_eq!(sha256_file(&env.restore(&id, "sda")), sha256_file(&raw));
}

/// What an init that failed before writing its config leaves (a key file)
/// is removed by the next init, so the new repository has one key file;
/// key files beside data but no config are a repository that lost its
/// config, and init refuses to make a second one there.
#[test]
fn init_removes_what_a_failed_init_left_but_never_a_repository() {
    let donor = Env::init(&[]);
    let key = fs::read_dir(donor.repo.join("keys"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let env = Env::new();
    let keys = env.repo.join("keys");
    fs::create_dir_all(&keys).unwrap();
    let stale = keys.join(key.file_name().unwrap());
    fs::copy(&key, &stale).unwrap();
    // Seconds old: another init may be writing its config right now.
    assert_clean_failure(&env.run(&["init"]), "another `ekko init` may be running");
    run_tool(Command::new("touch").args(["-d", "1 hour ago"]).arg(&stale));
    env.ok(&["init"]);
    let listed = env.ok(&["key", "list"]);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(!stale.exists());

    // Key files and packs, no config: a repository that lost its config.
    let lost = Env::new();
    fs::create_dir_all(lost.repo.join("keys")).unwrap();
    fs::copy(&key, lost.repo.join("keys").join(key.file_name().unwrap())).unwrap();
    let pack = donor.pack_files();
    let img = donor.path("d.img");
    make_image(&img, MIB, &[(0, &random_bytes(81, MIB as usize))]);
    donor.backup("vm", &[("sda", &img)]);
    let pack = donor
        .pack_files()
        .into_iter()
        .find(|p| !pack.contains(p))
        .unwrap();
    fs::create_dir_all(lost.repo.join("packs")).unwrap();
    fs::copy(
        &pack,
        lost.repo.join("packs").join(pack.file_name().unwrap()),
    )
    .unwrap();
    let before = lost.repo_state();
    let out = lost.run(&["init"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lost.repo_state(), before);

    // A file given as the repository.
    let file = env.path("a-file");
    fs::write(&file, b"x").unwrap();
    let out = env
        .cmd()
        .env("EKKO_REPO", &file)
        .arg("init")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_clean_failure(&out, "is a file, not a folder");
}
