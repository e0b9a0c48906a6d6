//! nbdkit plugin that serves one disk of one Ekko snapshot, read-only.
//!
//! ```text
//! nbdkit -r -U sock libekko_nbd.so repo=PATH snapshot=SPEC [disk=NAME]
//!        [password-file=FILE] [cache=SIZE] [index-cache=BOOL]
//! ```
//!
//! The passphrase of an encrypted repository comes from `password-file=`,
//! else from `EKKO_PASSWORD_FILE` / `EKKO_PASSWORD`: never from a parameter,
//! where `ps` would show it. `ekko serve-nbd` starts nbdkit this way.
//!
//! Invariants:
//! - The repository and snapshot are opened once, in `get_ready`, before
//!   nbdkit accepts a connection. Every connection then reads through the
//!   same [`DiskReader`], so all connections share one chunk cache. Snapshots
//!   never change, which is why the plugin can be `parallel` and advertise
//!   multi-conn without any locking of its own.
//! - Nothing here writes: there is no `pwrite`, so nbdkit refuses writes
//!   itself (`--filter=cow` in front gives a throw-away writable overlay).
//! - Every core error reaching a client goes through [`nbd_error`], which
//!   logs it and picks an errno that NBD can carry without lying.
//!
//! nbdkit's plugin interface is a set of global callbacks, so the parameters
//! and the open export live in two process-wide cells: `PARAMS` is written
//! only during nbdkit's single-threaded configuration phase and `EXPORT` is
//! set exactly once, by `get_ready`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use ekko::{ChunkCache, DiskReader, Error, NodeCache, Repository};
use nbdkit::{ExtentHandle, ExtentType, Flags, Server, ThreadModel};

/// Decoded-chunk cache shared by all connections, unless `cache=` says
/// otherwise.
const DEFAULT_CACHE_BYTES: u64 = 256 << 20;
/// Decoded map nodes (8 KiB at most each): 4096 cover ~4 TiB of 1 MiB blocks.
const NODE_CACHE_NODES: usize = 4096;

#[derive(Default)]
struct Params {
    repo: Option<PathBuf>,
    snapshot: Option<String>,
    disk: Option<String>,
    password_file: Option<PathBuf>,
    cache_bytes: Option<u64>,
    index_cache: bool,
}

/// The one export this nbdkit process serves.
struct Export {
    reader: Arc<DiskReader>,
    disk: String,
}

static PARAMS: Mutex<Option<Params>> = Mutex::new(None);
static EXPORT: OnceLock<Export> = OnceLock::new();

// Connections share the reader across nbdkit's worker threads.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<DiskReader>();
};

/// One client connection. All state is shared, so this is only a handle.
struct Connection {
    export: &'static Export,
}

/// The single place where a core error becomes an NBD error: logged, then
/// mapped by [`errno_for`].
fn nbd_error(op: &str, offset: u64, len: u64, e: Error) -> nbdkit::Error {
    let (errno, what) = errno_for(&e);
    tracing::error!(op, offset, len, errno, "{e}");
    // nbdkit logs the returned error as well: keep it a one-line summary.
    nbdkit::Error::new(
        errno,
        format!("{op} of {len} bytes at offset {offset} failed: {what}"),
    )
}

/// NBD carries only EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP
/// and ESHUTDOWN; nbdkit turns any other errno into EINVAL, which would tell
/// the client it sent a bad request. So damage and storage failures are EIO,
/// and EINVAL is kept for requests that really are invalid.
fn errno_for(e: &Error) -> (i32, &'static str) {
    match e {
        e if e.is_damage() => (libc::EIO, "damaged backup data"),
        Error::OutOfRange { .. } | Error::Invalid(_) => (libc::EINVAL, "invalid request"),
        Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOMEM) => {
            (libc::ENOMEM, "out of memory")
        }
        Error::Interrupted => (libc::ESHUTDOWN, "shutting down"),
        _ => (libc::EIO, "I/O error"),
    }
}

/// An error during start-up; nbdkit prints it and exits.
fn config_error(msg: impl Into<String>) -> nbdkit::Error {
    nbdkit::Error::new(libc::EINVAL, msg.into())
}

fn open_export(p: &Params) -> Result<Export, String> {
    let repo_path = p.repo.as_ref().ok_or("missing parameter repo=PATH")?;
    let spec = p
        .snapshot
        .as_deref()
        .ok_or("missing parameter snapshot=SPEC")?;
    let backend = ekko::backend::open(repo_path)
        .map_err(|e| format!("cannot open repository {}: {e}", repo_path.display()))?;
    let password_file = p.password_file.clone();
    let passphrase = move || {
        ekko::secret::from_env(password_file.as_deref())?.ok_or_else(|| {
            Error::Invalid(
                "the repository is encrypted: give password-file=FILE, or set EKKO_PASSWORD_FILE or EKKO_PASSWORD"
                    .into(),
            )
        })
    };
    // Without the index cache the whole index is loaded into memory once.
    // That keeps a long-running server from holding the cache database
    // open, which would push every concurrent `ekko` command onto the slow
    // path; see docs/NBD.md.
    let repo = Repository::open_with_cache(backend, passphrase, p.index_cache)
        .map_err(|e| format!("cannot open repository {}: {e}", repo_path.display()))?;
    let snap = ekko::snapshot::resolve(repo.backend().as_ref(), repo.keys(), spec)
        .map_err(|e| e.to_string())?;
    let disk = match &p.disk {
        Some(d) => d.clone(),
        None => match snap.disks.as_slice() {
            [only] => only.name.clone(),
            disks => {
                let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
                return Err(format!(
                    "snapshot {} has {} disks ({}): pick one with disk=NAME",
                    snap.short_id(),
                    disks.len(),
                    names.join(", ")
                ));
            }
        },
    };
    let chunks = Arc::new(ChunkCache::new(
        p.cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES),
    ));
    let nodes = Arc::new(NodeCache::new(NODE_CACHE_NODES));
    let reader =
        DiskReader::new(Arc::new(repo), &snap, &disk, nodes, chunks).map_err(|e| e.to_string())?;
    tracing::info!(snapshot = %snap.id, disk, size = reader.size(), "serving");
    Ok(Export {
        reader: Arc::new(reader),
        disk,
    })
}

impl Server for Connection {
    fn name() -> &'static str {
        "ekko"
    }

    fn description() -> Option<&'static str> {
        Some("Serves one disk of an Ekko backup snapshot, read-only")
    }

    fn version() -> Option<&'static str> {
        Some(env!("CARGO_PKG_VERSION"))
    }

    fn config_help() -> Option<&'static str> {
        Some(
            "repo=<PATH|URL>        (required) Ekko repository directory, or s3://BUCKET/PREFIX\n\
             snapshot=<SPEC>        (required) snapshot id, unique prefix, or VM@latest\n\
             disk=<NAME>            disk of the snapshot (needed if it has several)\n\
             password-file=<FILE>   passphrase file (else EKKO_PASSWORD_FILE / EKKO_PASSWORD)\n\
             cache=<SIZE>           decoded-chunk cache shared by all clients (default 256M)\n\
             index-cache=<BOOL>     use the on-disk index cache (default false)",
        )
    }

    fn load() {
        // nbdkit's stderr is the log; EKKO_LOG filters it as in the CLI.
        let filter = tracing_subscriber::EnvFilter::try_from_env("EKKO_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .try_init();
    }

    fn config(key: &str, value: &str) -> nbdkit::Result<()> {
        let mut guard = PARAMS.lock().expect("params lock");
        let p = guard.get_or_insert_with(Params::default);
        match key {
            "repo" => p.repo = Some(PathBuf::from(value)),
            "snapshot" => p.snapshot = Some(value.to_string()),
            "disk" => p.disk = Some(value.to_string()),
            "password-file" => p.password_file = Some(PathBuf::from(value)),
            "cache" => {
                let n = nbdkit::parse_size(value)?;
                p.cache_bytes = Some(u64::try_from(n).map_err(|_| config_error("cache= must not be negative"))?);
            }
            "index-cache" => p.index_cache = nbdkit::parse_bool(value)?,
            "password" => {
                return Err(config_error(
                    "a passphrase is never taken as a parameter (ps would show it): use password-file= or EKKO_PASSWORD",
                ))
            }
            _ => return Err(config_error(format!("unknown parameter {key:?}; see nbdkit ekko --help"))),
        }
        Ok(())
    }

    fn config_complete() -> nbdkit::Result<()> {
        let guard = PARAMS.lock().expect("params lock");
        let p = guard
            .as_ref()
            .ok_or_else(|| config_error("parameters repo= and snapshot= are required"))?;
        if p.repo.is_none() {
            return Err(config_error("missing parameter repo=PATH"));
        }
        if p.snapshot.is_none() {
            return Err(config_error("missing parameter snapshot=SPEC"));
        }
        Ok(())
    }

    fn get_ready() -> nbdkit::Result<()> {
        let guard = PARAMS.lock().expect("params lock");
        let p = guard
            .as_ref()
            .ok_or_else(|| config_error("parameters repo= and snapshot= are required"))?;
        let export = open_export(p).map_err(|m| {
            tracing::error!("{m}");
            config_error(m)
        })?;
        EXPORT
            .set(export)
            .map_err(|_| config_error("get_ready called twice"))?;
        Ok(())
    }

    fn thread_model() -> nbdkit::Result<ThreadModel> {
        Ok(ThreadModel::Parallel)
    }

    fn open(_readonly: bool) -> nbdkit::Result<Box<dyn Server>> {
        let export = EXPORT
            .get()
            .ok_or_else(|| nbdkit::Error::new(libc::EIO, "the export is not open yet"))?;
        // The empty name is the default export; any other must be the disk.
        let name = nbdkit::export_name().unwrap_or_default();
        if !name.is_empty() && name != export.disk {
            tracing::warn!(requested = %name, "client asked for an unknown export");
            return Err(nbdkit::Error::new(
                libc::ENOENT,
                format!(
                    "no export {name:?}: this server exports only {:?}",
                    export.disk
                ),
            ));
        }
        Ok(Box::new(Connection { export }))
    }

    fn get_size(&self) -> nbdkit::Result<i64> {
        let size = self.export.reader.size();
        i64::try_from(size).map_err(|_| {
            nbdkit::Error::new(libc::EOVERFLOW, format!("disk size {size} is too large"))
        })
    }

    fn can_multi_conn(&self) -> nbdkit::Result<bool> {
        // Read-only data that never changes is consistent across connections.
        Ok(true)
    }

    fn can_extents(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> nbdkit::Result<()> {
        self.export.reader.read_at(buf, offset).map_err(|e| {
            nbd_error(
                "read",
                offset,
                u64::try_from(buf.len()).unwrap_or(u64::MAX),
                e,
            )
        })
    }

    fn extents(
        &self,
        count: u32,
        offset: u64,
        flags: Flags,
        h: &mut ExtentHandle,
    ) -> nbdkit::Result<()> {
        let len = u64::from(count);
        let extents = self
            .export
            .reader
            .extents(offset, len)
            .map_err(|e| nbd_error("block status", offset, len, e))?;
        for e in extents {
            let kind = if e.data {
                ExtentType::Allocated
            } else {
                ExtentType::HoleZero
            };
            h.add(e.offset, e.len, kind)?;
            if flags.contains(Flags::REQ_ONE) {
                break;
            }
        }
        Ok(())
    }
}

nbdkit::plugin!(Connection {
    load,
    config,
    config_complete,
    config_help,
    get_ready,
    thread_model,
    can_multi_conn,
    can_extents,
    extents
});

#[cfg(test)]
mod tests {
    use super::*;
    use ekko::ChunkId;

    #[test]
    fn errors_map_to_errnos_that_do_not_lie() {
        let io = |errno| Error::Io {
            path: "packs/x".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        let cases = [
            (Error::ChunkMissing { id: ChunkId::ZERO }, libc::EIO),
            (
                Error::Corrupt {
                    name: "map node".into(),
                    reason: "bad".into(),
                },
                libc::EIO,
            ),
            (
                Error::NotFound {
                    name: "packs/ab/cd".into(),
                },
                libc::EIO,
            ),
            (io(libc::ENOENT), libc::EIO),
            (io(libc::ENOMEM), libc::ENOMEM),
            (
                Error::OutOfRange {
                    disk: "vda".into(),
                    offset: 10,
                    size: 5,
                },
                libc::EINVAL,
            ),
            (Error::Interrupted, libc::ESHUTDOWN),
        ];
        for (e, want) in cases {
            assert_eq!(errno_for(&e).0, want, "{e}");
        }
    }
}
