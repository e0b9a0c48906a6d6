//! Errors of the core library.
//!
//! Rules: every variant carries the context a user needs to act (the object,
//! chunk, disk or offset involved), and its message says what to do next when
//! there is something to do. `anyhow` is for the binary and the tests only.

use std::path::PathBuf;

use crate::id::ChunkId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("repository object {name} does not exist")]
    NotFound { name: String },

    #[error("no repository at {path}: run `ekko init` first, or point --repo / EKKO_REPO at an existing one")]
    NoRepository { path: PathBuf },

    #[error("a repository already exists at {path}")]
    AlreadyExists { path: PathBuf },

    #[error("wrong passphrase: none of the {tried} key file(s) in the repository opens with it (if the passphrase is right, the key files or the config are damaged or from another repository)")]
    WrongPassphrase { tried: usize },

    #[error("{name} is damaged: {reason}")]
    Corrupt { name: String, reason: String },

    #[error("chunk {id} in pack {pack} is damaged ({reason}); `ekko check --read-data --repair` saves what is intact, and the next backup of the same data replaces the rest")]
    ChunkDamaged {
        id: ChunkId,
        pack: String,
        reason: String,
    },

    #[error("chunk {id} is referenced but is not in any pack of the repository index; run `ekko check`: it tells lost data (which a later backup of the same data brings back) from lost index files (which `ekko index rebuild` restores)")]
    ChunkMissing { id: ChunkId },

    #[error(
        "{name}: {what} format version {version}, and this ekko reads up to {supported}: it was written by a newer ekko (upgrade ekko to read it), or its header is damaged"
    )]
    UnsupportedVersion {
        name: String,
        what: &'static str,
        version: u32,
        supported: u32,
    },

    #[error("no snapshot matches {spec:?}; list them with `ekko snapshots`")]
    SnapshotNotFound { spec: String },

    #[error("snapshot prefix {spec:?} is ambiguous: it matches {count} snapshots ({}); give more of the id", matches.join(", "))]
    AmbiguousSnapshot {
        spec: String,
        count: usize,
        /// The first few ids that match.
        matches: Vec<String>,
    },

    #[error("snapshot {snapshot} has no disk {disk:?} (it has: {available})")]
    DiskNotFound {
        snapshot: String,
        disk: String,
        available: String,
    },

    #[error("read at offset {offset} of disk {disk:?} is past its end ({size} bytes)")]
    OutOfRange {
        disk: String,
        offset: u64,
        size: u64,
    },

    #[error("source {source_name}: {reason}")]
    Source { source_name: String, reason: String },

    #[error("NBD: {0}")]
    Nbd(#[from] ekko_libnbd::Error),

    #[error("{0}")]
    Invalid(String),

    #[error("repository is locked by {holder} ({name}); wait for it to finish. If that process is gone, `ekko unlock` removes the lock once it is stale (at once on its own host, after 30 min without refresh elsewhere), and `ekko unlock --remove-all` removes it now")]
    Locked { holder: String, name: String },

    #[error("interrupted")]
    Interrupted,

    #[error("{reason}; nothing was committed (the packs written are reclaimed by a later prune): run the backup again")]
    GcRace { reason: String },

    #[error("prune cannot see every reference: {reason}; nothing was deleted. Run `ekko check` and repair the repository first")]
    PruneUnsafe { reason: String },
    #[error("object store {location}: {op} {name}: {reason}")]
    Remote {
        location: String,
        op: &'static str,
        name: String,
        reason: String,
    },

    #[error("index cache: {0}")]
    Cache(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            name: name.into(),
            reason: reason.into(),
        }
    }

    /// True when the error means data in the repository is damaged or missing
    /// (as opposed to a usage or environment problem).
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            Error::Corrupt { .. } | Error::ChunkDamaged { .. } | Error::ChunkMissing { .. }
        )
    }
}
