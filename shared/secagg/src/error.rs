//! The crate's one error type.

/// What went wrong in a round of secure aggregation. Messages name the rule broken and the
/// node concerned, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("secure aggregation: {0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, Error>;
