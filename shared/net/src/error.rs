//! The one error type of the network crate. Messages name the file, peer or stream that failed
//! and say what to do.

use std::path::PathBuf;

/// Result with the network crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the network crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A stream broke off or carried bytes that do not follow the protocol.
    #[error(transparent)]
    Proto(#[from] fedstat_proto::Error),

    /// A tensor failed the core's checks while it arrived, or a file check failed.
    #[error(transparent)]
    Core(#[from] fedstat_core::Error),

    /// Certificates, keys or the TLS configuration are unusable.
    #[error("pki: {0}")]
    Pki(String),

    /// A connection could not be made, or ended (with the peer's close reason when it gave one).
    #[error("connection: {0}")]
    Connection(String),

    /// A statement signed with a certificate key (secure aggregation's keys) was refused, or
    /// could not be signed.
    #[error("signed statement of `{node}` refused: {problem}")]
    Attest {
        node: String,
        problem: crate::attest::Problem,
    },

    /// A peer's certificate does not carry a usable fedstat identity.
    #[error("peer identity: {0}")]
    Identity(String),
}

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// A stream-level failure: `what` was being read or written.
    pub(crate) fn wire(what: &'static str, problem: impl Into<String>) -> Self {
        Error::Proto(fedstat_proto::Error::Wire {
            what,
            problem: problem.into(),
        })
    }
}
