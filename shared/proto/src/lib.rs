//! The fedstat protocol: what the coordinator, the nodes and the researchers' CLI agree on.
//!
//! - [`wire`]: versioned messages and the frame codec (postcard payloads behind a 4-byte length);
//! - [`spec`]: the experiment form a researcher writes and every node receives;
//! - [`manifest`]: the versioned form a data custodian approves, whose bytes are hashed;
//! - [`sums`]: the pooled figures that travel (standardisation, metrics, answers' sums);
//! - [`Role`]: what a certificate allows.
//!
//! This crate depends on serde and postcard only. Behaviour (validation, models, the engine)
//! lives in `fedstat-core`, networking in `fedstat-net`.
#![forbid(unsafe_code)]

pub mod error;
pub mod manifest;
mod role;
pub mod spec;
pub mod sums;
pub mod wire;

pub use error::{Error, Result};
pub use role::Role;
