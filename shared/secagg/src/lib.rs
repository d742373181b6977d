//! Secure aggregation (Bonawitz et al., CCS 2017), sans-IO: the node's [`Client`] and the
//! coordinator's [`Server`] for one attempt of one step. See `fedstat_proto::secure` for the
//! messages and their order.
//!
//! Values are ring elements (`Z mod 2^64` or `Z mod 2^128`, little-endian bytes): the caller
//! encodes its answer, this crate masks it, and the server's unmasked sum is the exact sum of
//! the survivors' encoded answers.
#![forbid(unsafe_code)]

use fedstat_proto::secure::{Ring, SecureRound};

mod error;
pub use error::{Error, Result};

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

/// The bytes a node signs with its certificate key to bind its keys to `ctx` and its name.
pub fn key_statement(ctx: &Context, node: &str, keys: &PublicKeys) -> Vec<u8> {
    let _ = (ctx, node, keys);
    todo!("helper B")
}

/// The node's side of one attempt.
pub struct Client {}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Client { .. }")
    }
}

impl Client {
    /// Fresh keys from the OS's randomness.
    pub fn new(ctx: Context, me: &str) -> (Client, PublicKeys) {
        let _ = (ctx, me);
        todo!("helper B")
    }

    /// Step 2: `roster` is every member (me included), keys already authenticated by the
    /// caller. Returns my sealed shares, one per other member: `(to, ciphertext)`.
    pub fn share_keys(
        &mut self,
        threshold: u32,
        roster: &[(String, PublicKeys)],
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let _ = (threshold, roster);
        todo!("helper B")
    }

    /// Step 3: `received` are the sealed shares addressed to me, `(from, ciphertext)`, from
    /// every member that sent shares (the set U2, me included implicitly); `input` my encoded
    /// answer (`ctx.len` ring elements, little-endian). Returns the masked answer.
    pub fn masked_input(&mut self, received: &[(String, Vec<u8>)], input: &[u8]) -> Result<Vec<u8>> {
        let _ = (received, input);
        todo!("helper B")
    }

    /// Step 4: reveal shares: of the self-mask seed of every survivor, of the mask key of every
    /// dropped node. Refuses if the sets are not a split of U2, if fewer than the threshold
    /// survived, if I am not a survivor, or on a second call.
    pub fn unmask(&mut self, survivors: &[String], dropped: &[String]) -> Result<Vec<(String, Vec<u8>)>> {
        let _ = (survivors, dropped);
        todo!("helper B")
    }
}

/// The coordinator's side of one attempt.
pub struct Server {}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Server { .. }")
    }
}

impl Server {
    /// `roster`: the members and their keys, as sent in the roster.
    pub fn new(ctx: Context, roster: Vec<(String, PublicKeys)>) -> Result<Server> {
        let _ = (ctx, roster);
        todo!("helper B")
    }

    /// `from` sent its shares (it belongs to U2).
    pub fn shared(&mut self, from: &str) -> Result<()> {
        let _ = from;
        todo!("helper B")
    }

    /// Fold `from`'s masked answer into the running sum (wrapping). `from` must be in U2.
    pub fn add_masked(&mut self, from: &str, masked: &[u8]) -> Result<()> {
        let _ = (from, masked);
        todo!("helper B")
    }

    /// Survivors (sent a masked answer) and dropped (sent shares, no masked answer), sorted.
    pub fn unmask_sets(&self) -> (Vec<String>, Vec<String>) {
        todo!("helper B")
    }

    /// A survivor's revealed shares.
    pub fn add_reveal(&mut self, from: &str, shares: Vec<(String, Vec<u8>)>) -> Result<()> {
        let _ = (from, shares);
        todo!("helper B")
    }

    /// Whether enough reveals arrived to unmask.
    pub fn can_finish(&self) -> bool {
        todo!("helper B")
    }

    /// The sum of the survivors' encoded answers (`ctx.len` ring elements, little-endian).
    pub fn finish(self) -> Result<Vec<u8>> {
        todo!("helper B")
    }
}
