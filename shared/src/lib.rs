//! The code both sides of a fedstat federation use: the experiment spec, the wire protocol,
//! the models and their local training, the exact aggregation, the round state machine and
//! the identity layer (PKI, TLS, roles).
//!
//! Data flow: a node loads its CSV ([`data`]), trains ([`model`]), encodes an update
//! ([`wire`]); the coordinator's round state machine ([`round`]) folds it into the
//! aggregate ([`aggregate`]) and records pooled metrics.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod audit;
pub mod data;
pub mod error;
pub mod files;
pub mod identity;
pub mod manifest;
pub mod model;
pub mod pki;
pub mod process;
pub mod round;
pub mod spec;
pub mod text;
pub mod tls;
pub mod transport;
pub mod wire;

pub use error::{Error, Result};
