//! Secure aggregation's messages (Bonawitz et al., CCS 2017): what nodes and the coordinator
//! exchange so that the coordinator learns the sum of the answers and nothing else.
//!
//! One secure step of an experiment runs in four exchanges, all relayed by the coordinator
//! on the nodes' control streams (the masked answer itself travels like any answer, on a
//! unidirectional stream, see [`crate::wire::Upload`]):
//! 1. every selected node computes its answer, then advertises two fresh X25519 public keys,
//!    signed with its certificate's key ([`SecureUp::Keys`]);
//! 2. the coordinator sends the roster of advertised keys to its members
//!    ([`SecureDown::Roster`]); each checks every signature and certificate, and sends its
//!    Shamir shares of its secrets, encrypted to each other member ([`SecureUp::Shares`]);
//! 3. the coordinator forwards each member the shares addressed to it ([`SecureDown::Shares`]);
//!    each sends its masked answer;
//! 4. the coordinator names who sent a masked answer and who dropped out
//!    ([`SecureDown::Unmask`]); each survivor reveals its shares of the survivors' self-mask
//!    seeds and of the dropped nodes' mask keys ([`SecureUp::Reveal`]), never both for one
//!    node. From at least `threshold` reveals the coordinator removes the masks of the sum.
//!
//! Bytes here are opaque to the protocol crate; `fedstat-secagg` gives them meaning.

use serde::{Deserialize, Serialize};

use crate::wire::{ExperimentId, Phase};

/// The width of the ring `Z mod 2^bits` in which masked answers are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ring {
    /// `Z mod 2^64`: 8 bytes per value.
    Z64,
    /// `Z mod 2^128`: 16 bytes per value; the exact fixed-point sums of `fedstat_core::aggregate`.
    Z128,
}

impl Ring {
    /// Bytes per element.
    pub fn width(self) -> usize {
        match self {
            Ring::Z64 => 8,
            Ring::Z128 => 16,
        }
    }
}

/// Which attempt of which step a secure message belongs to. Every key, share and mask is
/// bound to it, so nothing of one attempt can be replayed in another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SecureRound {
    pub experiment: ExperimentId,
    pub round: u32,
    pub phase: Phase,
    /// 0 for the first try of the step, then one more for each retry.
    pub attempt: u32,
}

/// What a task of a secure step tells the node besides the task itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecureTask {
    pub attempt: u32,
    pub ring: Ring,
    /// Ring elements of the masked answer (values, then the weight, then the side figures).
    pub len: u64,
    /// The Shamir threshold of the step: the fewest offices whose sum may be unmasked. The
    /// coordinator fixes it when the step starts (the larger of the spec's `secure_threshold`,
    /// `min_nodes`, 2 and a strict majority of the selected nodes), so keys are bound to it.
    pub threshold: Option<u32>,
}

/// A node's signed key advertisement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedKeys {
    /// The node's name (its certificate's CN).
    pub node: String,
    /// X25519 public key for encrypting shares to this node.
    pub cipher_key: [u8; 32],
    /// X25519 public key for agreeing on pairwise mask seeds.
    pub mask_key: [u8; 32],
    /// The node's certificate (DER), issued by the federation CA with role `node`.
    pub certificate: Vec<u8>,
    /// The certificate key's signature over `fedstat_secagg::key_statement`.
    pub signature: Vec<u8>,
}

/// An encrypted Shamir share, from one node to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedShare {
    /// Sender (in [`SecureUp::Shares`], the recipient is `to`; in [`SecureDown::Shares`] the
    /// recipient is the node the message goes to).
    pub from: String,
    pub to: String,
    pub ciphertext: Vec<u8>,
}

/// A survivor's share of another node's secret, revealed for unmasking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// Whose secret this is a share of.
    pub owner: String,
    /// The share (x coordinate and value), as `fedstat-secagg` encodes it.
    pub share: Vec<u8>,
}

/// Node → coordinator, on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SecureUp {
    Keys {
        at: SecureRound,
        keys: SignedKeys,
    },
    Shares {
        at: SecureRound,
        shares: Vec<SealedShare>,
    },
    Reveal {
        at: SecureRound,
        shares: Vec<RevealedShare>,
    },
}

/// Coordinator → node, on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SecureDown {
    /// Everyone whose keys arrived, in name order, and the threshold of the step.
    Roster {
        at: SecureRound,
        threshold: u32,
        members: Vec<SignedKeys>,
    },
    /// The shares addressed to the receiving node, from every node that sent shares.
    Shares {
        at: SecureRound,
        shares: Vec<SealedShare>,
    },
    /// Who sent a masked answer (`survivors`) and who sent shares but no masked answer.
    Unmask {
        at: SecureRound,
        survivors: Vec<String>,
        dropped: Vec<String>,
    },
}

impl SecureUp {
    pub fn at(&self) -> SecureRound {
        match self {
            SecureUp::Keys { at, .. } | SecureUp::Shares { at, .. } | SecureUp::Reveal { at, .. } => *at,
        }
    }
}

impl SecureDown {
    pub fn at(&self) -> SecureRound {
        match self {
            SecureDown::Roster { at, .. } | SecureDown::Shares { at, .. } | SecureDown::Unmask { at, .. } => {
                *at
            }
        }
    }
}

/// The header of a masked answer on its unidirectional stream; `len` ring elements follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedHeader {
    pub at: SecureRound,
    pub ring: Ring,
    pub len: u64,
}
