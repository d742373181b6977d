//! The core of fedstat, shared by the coordinator and the nodes: spec validation, schema to
//! design matrix, the models and their local training, the exact aggregation and the round
//! engine. It never sees the network (no tokio, quinn or rustls) nor the store (no rusqlite):
//! the binaries feed it events and carry out what it asks.
//!
//! Data flow: a node loads its CSV ([`data`]), trains ([`model`]) and answers with a sum; the
//! coordinator's engine ([`engine`]) runs an [`algorithm`]'s steps and folds answers into the exact aggregate
//! ([`aggregate`]) and records pooled metrics.
#![forbid(unsafe_code)]

pub mod accountant;
pub mod aggregate;
pub mod algorithm;
pub mod audit;
pub mod data;
pub mod engine;
pub mod error;
pub mod files;
pub mod glm;
pub mod linalg;
pub mod model;
pub mod privacy;
mod secure;
pub mod spec;
pub mod tabulate;
pub mod text;

pub use fedstat_proto as proto;
pub use fedstat_proto::{manifest, output, sums, table, wire};

pub use error::{Error, Result};
