//! The node crate's one error type.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Config, PKI, wire, data or model errors from the shared crate.
    #[error(transparent)]
    Shared(#[from] fedstat_shared::Error),

    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The coordinator could not be reached or refused us.
    #[error("coordinator {addr}: {problem}")]
    Connect { addr: String, problem: String },

    /// A task names a dataset this node does not offer.
    #[error("this node offers no dataset named `{0}`")]
    UnknownDataset(String),
}
