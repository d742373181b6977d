//! The fedstat coordinator (`fedstat-coordinator`) and the researcher CLI (`fedstat`).
//!
//! Data flow: [`server`] accepts QUIC connections and turns every stream into an event for
//! [`federation`], the one task that owns all experiment state (the round state machines of
//! `fedstat_core::round`) and records every completed round in [`store`]; [`client`] is the researcher's
//! side of the same protocol, and [`demo`] runs a whole local federation of real processes, started by [`harness`]
//! (which the benchmark and the end-to-end tests use too).
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod demo;
pub mod error;
pub mod federation;
pub mod harness;
pub mod results;
pub mod server;
pub mod store;

pub use error::{Error, Result};
