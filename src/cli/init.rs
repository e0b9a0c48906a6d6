use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use ekko::repo::{InitOptions, Repository, DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL};

use super::Global;

#[derive(Args)]
pub struct InitArgs {
    /// Chunk size: a power of two from 64K to 4M.
    #[arg(long, value_parser = super::parse_size, default_value_t = DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// zstd level: 1 (fastest) to 22 (smallest), negative (-7 to -1) for
    /// faster still, 0 for no compression.
    #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL, allow_negative_numbers = true)]
    compression: i32,
    /// aes256-siv (default) or none.
    #[arg(long, default_value = "aes256-siv", value_parser = ["aes256-siv", "none"])]
    encryption: String,
    /// Target pack size (1M to 1G); small packs make GC tests meaningful.
    /// By default the store's own (16 MiB on a local folder, 32 MiB on an
    /// object store).
    #[arg(long, hide = true, value_parser = super::parse_size)]
    pack_size: Option<u32>,
}

pub fn run(g: &Global, a: InitArgs) -> Result<ExitCode> {
    let path = g.repo_path()?;
    if !ekko::backend::is_url(path.as_os_str()) && path.exists() && !path.is_dir() {
        super::usage!(
            "{} is a file, not a folder: give a new or empty folder for the repository",
            path.display()
        );
    }
    // A local folder that holds other things is not where a repository
    // goes (a typo, or the wrong variable); an existing repository is
    // refused below with its own message. (`keys/` alone is what an init
    // that failed before writing its config leaves.)
    let entries = std::fs::read_dir(&path).ok();
    if let Some(entries) = entries.filter(|_| !path.join("config").exists()) {
        let other = entries.flatten().map(|e| e.file_name()).find(|n| {
            // A fresh file system's lost+found, and temporary files of
            // a killed init, are not someone else's things.
            n != "keys"
                && n != "config"
                && n != "lost+found"
                && !n.to_string_lossy().starts_with(".tmp-")
        });
        if let Some(n) = other {
            super::usage!(
                "{} is not empty (it holds {:?}, among others): give a new or empty folder for the repository",
                path.display(),
                n
            );
        }
    }
    let encrypt = a.encryption != "none";
    let pass = if encrypt {
        Some(g.new_passphrase()?)
    } else {
        eprintln!("ekko: warning: creating an UNENCRYPTED repository: anyone who can read it can read your disks");
        None
    };
    let backend = g.backend()?;
    let opts = InitOptions {
        chunk_size: a.chunk_size,
        compression_level: a.compression,
        encrypt,
        pack_size: a.pack_size.unwrap_or_else(|| backend.default_pack_size()),
    };
    let cfg = Repository::init(backend, &opts, pass.as_deref())?;
    println!("{}", cfg.id);
    if !g.quiet {
        eprintln!(
            "created repository {} at {} (chunk size {} KiB, packs {} MiB, zstd {}, encryption {})",
            cfg.id,
            g.repo_path()?.display(),
            cfg.chunk_size / 1024,
            cfg.pack_size >> 20,
            cfg.compression_level,
            cfg.encryption
        );
    }
    Ok(ExitCode::SUCCESS)
}
