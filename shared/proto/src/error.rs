//! The one error type of the protocol crate: bytes that do not decode, frames over their limit.

/// Result with the protocol crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Bytes from the network could not be decoded (or a message could not be encoded).
    #[error("malformed {what}: {problem}")]
    Wire { what: &'static str, problem: String },

    /// A frame or tensor is larger than its limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },

    /// A text is not one of the spellings the protocol defines (a role name, ...).
    #[error("unknown {what} `{value}`: expected one of {expected}")]
    Unknown {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
}
