//! The one error type of the shared crate. Messages are lower case, name the file, line,
//! column, key, node or round that failed, say what to do, and never carry a data value:
//! many of them travel from a node to the coordinator.

use std::path::PathBuf;

/// Result with the shared crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the shared crate.
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

    /// An experiment spec or config file is invalid; `key` names the TOML key.
    #[error("invalid {what}: key `{key}`: {problem}")]
    Config {
        what: String,
        key: String,
        problem: String,
    },

    /// A TOML file could not be parsed.
    #[error("cannot parse {path}: {message}")]
    Toml { path: PathBuf, message: String },

    /// A CSV file is malformed. `line` counts from 1 including the header; the message
    /// never contains the offending value, only what is wrong with it.
    #[error("{file}: line {line}, column `{column}`: {problem}")]
    Csv {
        file: String,
        line: u64,
        column: String,
        problem: String,
    },

    /// A CSV file is unusable as a whole (empty, no rows for training, ...).
    #[error("{file}: {problem}")]
    Dataset { file: String, problem: String },

    /// A model or training request is inconsistent (wrong number of parameters, ...).
    #[error("model: {0}")]
    Model(String),

    /// Bytes from the network could not be decoded.
    #[error("malformed {what}: {problem}")]
    Wire { what: &'static str, problem: String },

    /// A frame or stream is larger than its limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },

    /// An update was rejected by validation; the reason names the check that failed.
    #[error("update rejected: {0}")]
    Rejected(String),

    /// Certificates, keys or the TLS configuration are unusable.
    #[error("pki: {0}")]
    Pki(String),

    /// A file another process holds an exclusive lock on (a second coordinator on the same
    /// `data_dir`, a second writer of one audit log).
    #[error("{what} {path} is in use by another process (it holds the lock on {lock}); stop that process first, or use another folder")]
    Locked {
        what: &'static str,
        path: PathBuf,
        lock: PathBuf,
    },

    /// A private key file that users other than its owner can read or write.
    #[error("private key {path} is accessible to other users (mode {mode:o}); run `chmod 600 {path}` and start again")]
    KeyPermissions { path: PathBuf, mode: u32 },

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

    pub(crate) fn config(
        what: impl Into<String>,
        key: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        Error::Config {
            what: what.into(),
            key: key.into(),
            problem: problem.into(),
        }
    }
}
