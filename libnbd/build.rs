//! Link against the system libnbd (Debian: `libnbd-dev`).
//!
//! `pkg-config libnbd` is consulted for a non-standard library directory when
//! the tool is available; otherwise the default linker search path is used.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    if let Ok(out) = Command::new("pkg-config")
        .args(["--libs-only-L", "libnbd"])
        .output()
    {
        if out.status.success() {
            let flags = String::from_utf8_lossy(&out.stdout);
            for dir in flags
                .split_whitespace()
                .filter_map(|f| f.strip_prefix("-L"))
            {
                println!("cargo:rustc-link-search=native={dir}");
            }
        }
    }
    println!("cargo:rustc-link-lib=nbd");
}
