//! Opening a repository whose `config` and key file are hostile:
//! `Repository::open_with_cache` (config, key files, unlock with the
//! passphrase "x"), then what is derived from the config's id.
//!
//! Input: a `u16` length C, C bytes of config file, then the key file (none
//! when empty).
#![no_main]

use std::path::Path;
use std::sync::Arc;

use ekko::{capture, index, Backend, Repository};
use ekko_fuzz::{scratch, write_object};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let c = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let rest = &data[2..];
    let (config, key) = rest.split_at(c.min(rest.len()));
    let root = scratch().join("config");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    write_object(&root, "config", config);
    if !key.is_empty() {
        write_object(&root, "keys/00000000000000000000000000000004", key);
    }
    let backend: Arc<dyn Backend> = Arc::new(ekko::LocalBackend::new(&root));
    let Ok(repo) = Repository::open_with_cache(backend, || Ok(b"x".to_vec()), false) else {
        return;
    };
    let _ = capture::bitmap_prefix(&repo);
    // The index cache of a repository lies under the cache folder, whatever
    // its config says.
    let base = Path::new("/nonexistent/ekko-fuzz-cache");
    std::env::set_var("EKKO_CACHE_DIR", base);
    let cache = index::default_cache_path(&repo.config().id).unwrap();
    let cache = Path::new(&cache);
    assert!(
        cache.starts_with(base)
            && cache
                .components()
                .all(|c| !matches!(c, std::path::Component::ParentDir)),
        "cache path {cache:?} escapes {base:?}"
    );
});
