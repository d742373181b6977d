//! The fedstat protocol: what the coordinator, the nodes and the researchers' CLI agree on.
//!
//! - [`wire`]: versioned messages and the frame codec (postcard payloads behind a 4-byte length);
//! - [`spec`]: the experiment form a researcher writes and every node receives;
//! - [`formula`] and [`design`]: R-style formulas and the design plan both sides compute;
//! - [`manifest`]: the versioned form a data custodian approves, whose bytes are hashed;
//! - [`sums`]: the pooled figures that travel (standardisation, metrics, answers' sums);
//! - [`output`]: what an experiment produces besides parameters (GLM inference, tables);
//! - [`table`]: the federated table form and result;
//! - [`privacy`]: differential privacy settings and the privacy cost of a round;
//! - [`secure`]: the messages of secure aggregation;
//! - [`Role`]: what a certificate allows.
//!
//! This crate depends on serde and postcard only. Behaviour (validation, models, the engine)
//! lives in `fedstat-core`, networking in `fedstat-net`.
#![forbid(unsafe_code)]

pub mod design;
pub mod error;
pub mod formula;
pub mod manifest;
pub mod output;
pub mod privacy;
mod role;
pub mod secure;
pub mod spec;
pub mod sums;
pub mod table;
pub mod wire;

pub use error::{Error, Result};
pub use role::Role;
