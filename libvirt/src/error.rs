//! Errors: each names the libvirt connection or domain and what was being
//! done, and carries libvirt's own message.

/// Errors of the libvirt layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{message}")]
    Load { message: String },

    #[error("cannot connect to libvirt at {uri}: {message}; is libvirtd running, and may this user use {uri}?")]
    Connect { uri: String, message: String },

    #[error("libvirt at {uri} has no domain {domain:?} (`virsh -c {uri} list --all` lists them)")]
    NoDomain { uri: String, domain: String },

    #[error("domain {domain}: {action}: {message}")]
    Libvirt {
        domain: String,
        action: String,
        message: String,
        /// libvirt's error code (`virErrorNumber`).
        code: i32,
    },

    #[error("domain {domain}: cannot parse {what} XML from libvirt: {reason}")]
    Xml {
        domain: String,
        what: String,
        reason: String,
    },
}

impl Error {
    /// From a failed call's `(code, message)`, see `ffi::last_error`.
    pub(crate) fn libvirt(domain: &str, action: impl Into<String>, e: (i32, String)) -> Error {
        Error::Libvirt {
            domain: domain.to_string(),
            action: action.into(),
            message: e.1,
            code: e.0,
        }
    }

    /// libvirt's `virErrorNumber`, when libvirt gave one.
    pub fn code(&self) -> Option<i32> {
        match self {
            Error::Libvirt { code, .. } => Some(*code),
            _ => None,
        }
    }
}
