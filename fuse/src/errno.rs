//! The one place where failures become errno values.
//!
//! Rules: data damage in the repository is EIO, never ENOENT; ENOENT means
//! only that a name does not exist. Everything is logged here, before it is
//! mapped, so that a user who sees EIO finds the reason in the log.

use std::fmt::Display;

use fuser::Errno;

/// Why an operation of the file tree failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    /// The core library failed: damage, a backend I/O error, and so on.
    #[error(transparent)]
    Core(#[from] ekko::Error),

    /// The guest filesystem reader failed (a read error of the disk below it
    /// arrives wrapped in `Ext4Error::Io`).
    #[error("guest filesystem: {0}")]
    Guest(#[from] ext4_view::Ext4Error),

    /// The FAT reader failed (a read error of the disk below it arrives
    /// wrapped in the `io::Error`).
    #[error("guest filesystem: {0}")]
    GuestIo(#[from] std::io::Error),

    /// The worker thread that owns a guest filesystem stopped (it panicked).
    #[error("the guest filesystem worker stopped; see the log above")]
    WorkerGone,
}

pub type FsResult<T> = Result<T, FsError>;

/// Map `err`, met while doing `what`, to the errno returned to the kernel.
pub fn errno(what: &dyn Display, err: &FsError) -> Errno {
    match err {
        FsError::Core(e) => core_errno(what, e),
        FsError::Guest(e) => guest_errno(what, e),
        FsError::GuestIo(e) => guest_io_errno(what, e),
        FsError::WorkerGone => {
            tracing::error!("{what}: {err}");
            Errno::EIO
        }
    }
}

fn core_errno(what: &dyn Display, e: &ekko::Error) -> Errno {
    use ekko::Error as E;
    if e.is_damage() {
        tracing::error!("{what}: {e}");
        return Errno::EIO;
    }
    match e {
        E::Io { source, .. } => {
            tracing::error!("{what}: {e}");
            source.raw_os_error().map_or(Errno::EIO, Errno::from_i32)
        }
        E::Interrupted => {
            tracing::debug!("{what}: {e}");
            Errno::EINTR
        }
        _ => {
            tracing::error!("{what}: {e}");
            Errno::EIO
        }
    }
}

fn guest_errno(what: &dyn Display, e: &ext4_view::Ext4Error) -> Errno {
    use ext4_view::Ext4Error as X;
    match e {
        // The only ENOENT: the guest has no such name.
        X::NotFound => {
            tracing::debug!("{what}: no such file in the guest filesystem");
            Errno::ENOENT
        }
        X::NotADirectory => Errno::ENOTDIR,
        X::IsADirectory => Errno::EISDIR,
        X::NotASymlink => Errno::EINVAL,
        X::TooManySymlinks => Errno::ELOOP,
        X::PathTooLong => Errno::ENAMETOOLONG,
        X::Io(inner) => match inner.downcast_ref::<ekko::Error>() {
            Some(core) => core_errno(what, core),
            None => {
                tracing::error!("{what}: {e}");
                Errno::EIO
            }
        },
        X::Encrypted => {
            tracing::warn!(
                "{what}: the file is encrypted inside the guest (fscrypt); it cannot be read"
            );
            Errno::EACCES
        }
        _ => {
            tracing::error!("{what}: {e}");
            Errno::EIO
        }
    }
}

fn guest_io_errno(what: &dyn Display, e: &std::io::Error) -> Errno {
    use std::io::ErrorKind as K;
    if let Some(core) = e.get_ref().and_then(|i| i.downcast_ref::<ekko::Error>()) {
        return core_errno(what, core);
    }
    match e.kind() {
        K::NotFound => {
            tracing::debug!("{what}: no such file in the guest filesystem");
            Errno::ENOENT
        }
        K::NotADirectory => Errno::ENOTDIR,
        K::IsADirectory => Errno::EISDIR,
        K::InvalidInput => Errno::EINVAL,
        _ => {
            tracing::error!("{what}: {e}");
            Errno::EIO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damage_is_eio_and_only_missing_names_are_enoent() {
        let what = "test";
        let damage = FsError::Core(ekko::Error::Corrupt {
            name: "packs/x".into(),
            reason: "bad".into(),
        });
        assert_eq!(errno(&what, &damage), Errno::EIO);
        let missing = FsError::Core(ekko::Error::NotFound {
            name: "snapshots/x".into(),
        });
        assert_eq!(errno(&what, &missing), Errno::EIO);
        let io = ext4_view::Ext4Error::Io(Box::new(ekko::Error::Corrupt {
            name: "p".into(),
            reason: "r".into(),
        }));
        assert_eq!(errno(&what, &FsError::Guest(io)), Errno::EIO);
        assert_eq!(
            errno(&what, &FsError::Guest(ext4_view::Ext4Error::NotFound)),
            Errno::ENOENT
        );
    }
}
