//! Secure aggregation (Bonawitz et al., CCS 2017), sans-IO: the node's [`Client`] and the
//! coordinator's [`Server`] for one attempt of one step. See `fedstat_proto::secure` for the
//! messages and their order.
//!
//! Values are ring elements (`Z mod 2^64` or `Z mod 2^128`, little-endian bytes): the caller
//! encodes its answer, this crate masks it, and the server's unmasked sum is the exact sum of
//! the survivors' encoded answers.
#![forbid(unsafe_code)]

use fedstat_proto::secure::{Ring, SecureRound};

mod client;
mod error;
mod kdf;
mod prg;
mod roster;
mod server;
mod shamir;

pub use client::Client;
pub use error::{Error, Result};
pub use server::Server;

/// Bytes of one revealed share: its x (u32, little-endian) then a 32-byte scalar.
pub const SHARE_LEN: usize = shamir::SHARE_LEN;

/// Everything a round's keys, shares and masks are bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    pub at: SecureRound,
    pub ring: Ring,
    /// Ring elements of every masked answer.
    pub len: u64,
    /// Fewest survivors whose sum may be unmasked (Shamir threshold).
    pub threshold: u32,
}

/// A node's two public keys for one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKeys {
    pub cipher: [u8; 32],
    pub mask: [u8; 32],
}

/// The bytes a node signs with its certificate key to bind its keys to `ctx` and its name:
/// a versioned label, every field of `ctx` (attempt, ring, length, threshold), the name
/// (length-prefixed) and both keys.
pub fn key_statement(ctx: &Context, node: &str, keys: &PublicKeys) -> Vec<u8> {
    kdf::key_statement(ctx, node, keys)
}

#[cfg(test)]
mod tests;
