//! The coordinator crate's one error type.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something from the shared crate (config, PKI, wire, data).
    #[error(transparent)]
    Core(#[from] fedstat_core::Error),

    #[error(transparent)]
    Net(#[from] fedstat_net::Error),

    #[error(transparent)]
    Proto(#[from] fedstat_proto::Error),

    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The QUIC endpoint could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// Connecting to the coordinator failed.
    #[error("cannot connect to the coordinator at {addr}: {problem}")]
    Connect { addr: String, problem: String },

    /// The coordinator answered a request with an error.
    #[error("the coordinator refused the request: {0}")]
    Refused(String),

    /// The coordinator broke the protocol.
    #[error("unexpected answer from the coordinator: {0}")]
    Protocol(String),

    /// The durable store cannot be opened, read or written.
    #[error("store: {0}")]
    Store(String),

    /// A local federation of the real binaries could not be started (see [`crate::harness`]).
    #[error("{0}")]
    Harness(String),

    /// The demo could not run.
    #[error("demo: {0}")]
    Demo(String),
}

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
