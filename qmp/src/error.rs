//! Error type of the crate.

use std::io;
use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to QEMU.
///
/// Variants carry the command, node, disk or bitmap involved so that the
/// message alone tells an operator what to look at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The QMP (or guest agent) socket could not be opened.
    #[error(
        "cannot connect to {what} socket {path}: {source} (is QEMU running and is the path right?)"
    )]
    Connect {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// An I/O error other than a closed connection or a timeout.
    #[error("I/O error on the QMP connection during {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// QEMU closed the connection (EOF, reset or broken pipe).
    #[error("QEMU closed the connection during {context}; the VM or qemu-storage-daemon has probably exited")]
    Disconnected { context: String },

    /// No answer within the configured timeout.
    #[error("timed out after {secs} s waiting for {what}; QEMU is not answering (hung, stopped, or another client holds the monitor)")]
    Timeout { what: String, secs: u64 },

    /// QEMU sent something that is not valid QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),

    /// QEMU answered a command with `{"error": {...}}`.
    #[error("QMP command '{cmd}' failed: {class}: {desc}")]
    Command {
        cmd: String,
        class: String,
        desc: String,
    },

    /// A block node named by the caller does not exist.
    #[error("block node '{node}' does not exist in QEMU (list the disks again; the VM configuration may have changed)")]
    NodeNotFound { node: String },

    /// The disk cannot be written to by the guest, so it is not backed up this way.
    #[error("disk '{disk}': block node '{node}' is read-only")]
    ReadOnly { disk: String, node: String },

    /// The bitmap of the previous backup cannot be used: take a full backup.
    #[error("disk '{disk}': bitmap '{bitmap}' cannot be used for an incremental backup: {reason}; take a full backup of this disk instead")]
    BitmapUnusable {
        disk: String,
        bitmap: String,
        reason: String,
    },

    /// The bitmap name chosen for the next generation is already taken.
    #[error("disk '{disk}': bitmap '{bitmap}' already exists on node '{node}'; it is probably left over from an interrupted backup: remove it (block-dirty-bitmap-remove) or choose another generation name")]
    BitmapExists {
        disk: String,
        node: String,
        bitmap: String,
    },

    /// The session configuration is invalid; nothing was changed.
    #[error("invalid backup session configuration: {0}")]
    Config(String),

    /// Another process owns the NBD server and its socket could not be located.
    #[error("QEMU already runs an NBD server and ekko could not find where it listens ({reason}). ekko finds a server on a Unix socket unaided; for one on TCP, pass its address with --nbd-server IP:PORT (such as 127.0.0.1:10809). A server that requires TLS is not supported")]
    NbdServerUnknown { reason: String },

    /// A local file operation (workdir, fleece file) failed.
    #[error("{context} {path}: {source}")]
    File {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The qemu-guest-agent refused or failed a request.
    #[error("guest agent {op} failed: {detail}")]
    GuestAgent { op: String, detail: String },

    /// Tearing a session down did not fully succeed. The first error is shown;
    /// the others are in `errors` and in the log.
    #[error("teardown of backup session {session} incomplete ({} problem(s)); first: {}", errors.len(), errors.first().map(|e| e.to_string()).unwrap_or_default())]
    Teardown { session: String, errors: Vec<Error> },
}

impl Error {
    /// True when the error means the QMP connection is gone or unusable.
    pub fn is_disconnected(&self) -> bool {
        match self {
            Error::Disconnected { .. } | Error::Timeout { .. } => true,
            Error::Teardown { errors, .. } => errors.iter().any(Error::is_disconnected),
            _ => false,
        }
    }

    /// The QMP error class if this is a failed command.
    pub fn command_class(&self) -> Option<&str> {
        match self {
            Error::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}
