//! The `ekko-fuse` command line, without mounting anything. (Mounts are
//! tested with the rest of the system in the workspace's integration tests,
//! which also need this binary built: having a test here makes
//! `cargo test --workspace` build it.)

use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ekko-fuse"));
    c.env_remove("EKKO_REPO")
        .env_remove("EKKO_PASSWORD")
        .env_remove("EKKO_PASSWORD_FILE");
    c
}

#[test]
fn help_lists_the_options() {
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in ["--repo", "--password-file", "--foreground", "MOUNTPOINT"] {
        assert!(text.contains(opt), "--help lacks {opt}:\n{text}");
    }
}

#[test]
fn missing_repository_is_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin().arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("EKKO_REPO"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = bin()
        .arg("--repo")
        .arg(dir.path().join("nothing"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ekko init"),
        "the message should say what to do: {err}"
    );
}

#[test]
fn a_mountpoint_that_is_not_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let out = bin()
        .arg("--repo")
        .arg(dir.path())
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
}
