//! fedstat's network layer: one session interface over QUIC or TLS-over-TCP ([`session`],
//! [`tcp`], [`dial`]), streams carrying the protocol's frames and tensors
//! ([`transport`]), the rustls configuration of both ends with certificate revocation
//! ([`tls`]), who a peer is from its certificate ([`identity`]), the federation's PKI
//! ([`pki`]), signatures by certificate keys over application statements ([`attest`]) and
//! what every binary does at its edges ([`process`]).
#![forbid(unsafe_code)]

pub mod attest;
pub mod dial;
pub mod error;
pub mod identity;
pub mod pki;
pub mod process;
pub mod session;
pub mod tcp;
pub mod tls;
pub mod transport;

pub use error::{Error, Result};
