//! Canonical encodings and key derivations: what every key, seed and ciphertext is bound to.
//! Every label is versioned; every variable-length field is length-prefixed, so no two
//! different inputs encode alike.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use curve25519_dalek::Scalar;
use fedstat_proto::secure::Ring;
use fedstat_proto::wire::Phase;
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::{Context, PublicKeys};

const KEYS_LABEL: &[u8] = b"fedstat-secagg/keys/v1";
const SHARE_KEY_LABEL: &[u8] = b"fedstat-secagg/share-key/v1";
const SHARE_AAD_LABEL: &[u8] = b"fedstat-secagg/share-aad/v1";
const PAIR_MASK_LABEL: &[u8] = b"fedstat-secagg/pair-mask/v1";
const SELF_MASK_LABEL: &[u8] = b"fedstat-secagg/self-mask/v1";

fn put(out: &mut Vec<u8>, field: &[u8]) {
    // Fields are labels, names (at most a few hundred bytes) and keys: u32 is plenty.
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

/// Stable codes, independent of the enums' declaration order.
fn phase_code(phase: Phase) -> u8 {
    match phase {
        Phase::Stats => 1,
        Phase::Train => 2,
        Phase::Evaluate => 3,
        Phase::Glm => 4,
        Phase::Table => 5,
    }
}

fn ring_code(ring: Ring) -> u8 {
    match ring {
        Ring::Z64 => 64,
        Ring::Z128 => 128,
    }
}

/// The attempt, ring and length: what masks and shares are bound to. The threshold is left
/// out here, on purpose: the node's context may carry the spec's minimum while the roster
/// fixes the final threshold, and a mismatch must not silently garble the sum (the threshold
/// is bound by the signed key statement and checked by every node instead).
fn attempt(out: &mut Vec<u8>, ctx: &Context) {
    out.extend_from_slice(&ctx.at.experiment.to_le_bytes());
    out.extend_from_slice(&ctx.at.round.to_le_bytes());
    out.push(phase_code(ctx.at.phase));
    out.extend_from_slice(&ctx.at.attempt.to_le_bytes());
    out.push(ring_code(ctx.ring));
    out.extend_from_slice(&ctx.len.to_le_bytes());
}

pub(crate) fn key_statement(ctx: &Context, node: &str, keys: &PublicKeys) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + node.len());
    put(&mut out, KEYS_LABEL);
    attempt(&mut out, ctx);
    out.extend_from_slice(&ctx.threshold.to_le_bytes());
    put(&mut out, node.as_bytes());
    out.extend_from_slice(&keys.cipher);
    out.extend_from_slice(&keys.mask);
    out
}

fn info(label: &[u8], ctx: &Context, names: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    put(&mut out, label);
    attempt(&mut out, ctx);
    for name in names {
        put(&mut out, name.as_bytes());
    }
    out
}

fn hkdf(ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut okm = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, ikm)
        .expand(info, okm.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

/// The X25519 secret of a scalar (clamped by x25519-dalek, the same way on every side).
pub(crate) fn x25519_secret(s: &Scalar) -> StaticSecret {
    StaticSecret::from(s.to_bytes())
}

pub(crate) fn x25519_public(s: &Scalar) -> [u8; 32] {
    PublicKey::from(&x25519_secret(s)).to_bytes()
}

/// X25519, or `None` when the peer's key is of low order (an all-zero result).
fn agree(mine: &Scalar, theirs: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
    let shared = x25519_secret(mine).diffie_hellman(&PublicKey::from(*theirs));
    shared
        .was_contributory()
        .then(|| Zeroizing::new(shared.to_bytes()))
}

/// Whether a peer's key agrees to a non-zero secret with one of mine.
pub(crate) fn usable(mine: &Scalar, theirs: &[u8; 32]) -> bool {
    agree(mine, theirs).is_some()
}

/// The pairwise mask seed of two members (symmetric).
pub(crate) fn pair_seed(ctx: &Context, mine: &Scalar, theirs: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
    let shared = agree(mine, theirs)?;
    Some(hkdf(shared.as_ref(), &info(PAIR_MASK_LABEL, ctx, &[])))
}

/// The self-mask seed of `b`.
pub(crate) fn self_seed(ctx: &Context, b: &Scalar) -> Zeroizing<[u8; 32]> {
    hkdf(b.as_bytes(), &info(SELF_MASK_LABEL, ctx, &[]))
}

/// The AEAD of shares from `from` to `to`: key from X25519 of their cipher keys, and the
/// associated data binding the attempt and both names. Each key seals one message only (one
/// attempt, one direction), so the zero nonce is never reused.
pub(crate) struct ShareBox {
    aead: ChaCha20Poly1305,
    aad: Vec<u8>,
}

impl ShareBox {
    pub(crate) fn new(
        ctx: &Context,
        mine: &Scalar,
        theirs: &[u8; 32],
        from: &str,
        to: &str,
    ) -> Option<ShareBox> {
        let shared = agree(mine, theirs)?;
        let key = hkdf(shared.as_ref(), &info(SHARE_KEY_LABEL, ctx, &[from, to]));
        Some(ShareBox {
            aead: ChaCha20Poly1305::new(key.as_ref().into()),
            aad: info(SHARE_AAD_LABEL, ctx, &[from, to]),
        })
    }

    pub(crate) fn seal(&self, plaintext: &[u8]) -> Option<Vec<u8>> {
        let payload = Payload {
            msg: plaintext,
            aad: &self.aad,
        };
        self.aead.encrypt(&[0u8; 12].into(), payload).ok()
    }

    pub(crate) fn open(&self, ciphertext: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let payload = Payload {
            msg: ciphertext,
            aad: &self.aad,
        };
        self.aead
            .decrypt(&[0u8; 12].into(), payload)
            .ok()
            .map(Zeroizing::new)
    }
}
