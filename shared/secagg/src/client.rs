//! The node's side of one attempt: fresh keys, sealed shares, the masked answer, the reveal.

use std::collections::{BTreeMap, BTreeSet};

use curve25519_dalek::Scalar;
use rand::rngs::OsRng;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use zeroize::Zeroizing;

use crate::kdf::{self, ShareBox};
use crate::prg::{self, Mask};
use crate::roster::Roster;
use crate::shamir;
use crate::{Context, Error, PublicKeys, Result};

/// Bytes of a sealed share's plaintext: my share of my mask key, then of my self-mask seed.
const SEALED_PLAINTEXT: usize = 2 * shamir::SHARE_LEN;

/// The node's side of one attempt. Secrets are zeroed when it is dropped.
///
/// Every step may be called once, in order (a second or early call is refused and changes
/// nothing). A step that refuses its input ends the attempt (later steps are refused with
/// [`Error::Ended`]), so a coordinator never obtains two masked answers of one input or two
/// reveals under different sets.
pub struct Client {
    ctx: Context,
    me: String,
    /// X25519 secret for the shares' encryption keys.
    cipher: Zeroizing<Scalar>,
    /// X25519 secret for the pairwise mask seeds; Shamir-shared.
    mask: Zeroizing<Scalar>,
    /// Self-mask secret `b`; Shamir-shared.
    b: Zeroizing<Scalar>,
    keys: PublicKeys,
    /// `None`: the OS's randomness. A seeded generator only for tests and simulations.
    rng: Option<ChaCha20Rng>,
    stage: Stage,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Client { .. }")
    }
}

/// My shares of one member's two secrets.
struct Held {
    mask: Zeroizing<Scalar>,
    b: Zeroizing<Scalar>,
}

enum Stage {
    Keys,
    Shared {
        roster: Roster,
        x: u32,
        own: Held,
    },
    Masked {
        roster: Roster,
        x: u32,
        held: BTreeMap<String, Held>,
    },
    Revealed,
    Failed,
}

impl Stage {
    /// Steps done: 0 after `new`, 3 after `unmask`.
    fn done(&self) -> Option<u8> {
        match self {
            Stage::Keys => Some(0),
            Stage::Shared { .. } => Some(1),
            Stage::Masked { .. } => Some(2),
            Stage::Revealed => Some(3),
            Stage::Failed => None,
        }
    }
}

const STEPS: [&str; 4] = ["key generation", "share_keys", "masked_input", "unmask"];

impl Client {
    /// Fresh keys from the OS's randomness: three uniformly random scalars of curve25519's
    /// group order (so they can be Shamir-shared over that field): the X25519 secret for
    /// encrypting shares (`cipher`), the X25519 secret for pairwise mask seeds (`mask`), and
    /// the self-mask secret `b` (its mask seed is HKDF-SHA256 of `b`). An X25519 secret is
    /// `StaticSecret::from(scalar.to_bytes())`, so the secret a server rebuilds from shares
    /// is the very key. Returns the two public keys to advertise (signed, with
    /// [`crate::key_statement`]).
    pub fn new(ctx: Context, me: &str) -> (Client, PublicKeys) {
        Client::generate(ctx, me, None)
    }

    /// Keys and shares from a seeded generator: reproducible runs for tests and simulations.
    /// Never in production (anyone knowing the seed knows every secret).
    pub fn with_seed(ctx: Context, me: &str, seed: [u8; 32]) -> (Client, PublicKeys) {
        Client::generate(ctx, me, Some(ChaCha20Rng::from_seed(seed)))
    }

    fn generate(ctx: Context, me: &str, mut rng: Option<ChaCha20Rng>) -> (Client, PublicKeys) {
        let mut draw = || match rng.as_mut() {
            Some(r) => shamir::random_scalar(r),
            None => shamir::random_scalar(&mut OsRng),
        };
        let (cipher, mask, b) = (draw(), draw(), draw());
        let keys = PublicKeys {
            cipher: kdf::x25519_public(&cipher),
            mask: kdf::x25519_public(&mask),
        };
        let client = Client {
            ctx,
            me: me.to_owned(),
            cipher,
            mask,
            b,
            keys,
            rng,
            stage: Stage::Keys,
        };
        (client, keys)
    }

    /// Move to step `step` (1..=3): the stage it needs, or the reason it is refused. The
    /// client is left `Failed` until the step succeeds.
    fn begin(&mut self, step: usize) -> Result<Stage> {
        let stage = std::mem::replace(&mut self.stage, Stage::Failed);
        match stage.done() {
            Some(done) if usize::from(done) + 1 == step => Ok(stage),
            Some(done) if usize::from(done) >= step => {
                self.stage = stage;
                Err(Error::Replay { step: STEPS[step] })
            }
            Some(_) => {
                self.stage = stage;
                Err(Error::OutOfOrder {
                    step: STEPS[step],
                    needs: STEPS[step - 1],
                })
            }
            None => Err(Error::Ended { step: STEPS[step] }),
        }
    }

    fn split(&mut self, secret: &Scalar, t: u32, n: u32) -> Vec<Zeroizing<Scalar>> {
        match self.rng.as_mut() {
            Some(r) => shamir::split(secret, t, n, r),
            None => shamir::split(secret, t, n, &mut OsRng),
        }
    }

    /// Step 2: `roster` is every member (me included), keys already authenticated by the
    /// caller. Returns my sealed shares, one per other member: `(to, ciphertext)`.
    ///
    /// Refuses a roster with duplicate names or keys, without me or with other keys under my
    /// name, a threshold below 2, below the context's, above the members, or not a strict
    /// majority (`2 * threshold > members`: no two disjoint groups can both unmask).
    pub fn share_keys(
        &mut self,
        threshold: u32,
        roster: &[(String, PublicKeys)],
    ) -> Result<Vec<(String, Vec<u8>)>> {
        self.begin(1)?;
        let roster = Roster::new(roster, threshold, self.ctx.threshold)?;
        let (x, keys) = roster.member(&self.me)?;
        if *keys != self.keys {
            return Err(Error::NotMyKeys {
                node: self.me.clone(),
            });
        }
        for (_, name, keys) in roster.iter().filter(|(_, name, _)| *name != self.me) {
            if !kdf::usable(&self.cipher, &keys.cipher) || !kdf::usable(&self.mask, &keys.mask) {
                return Err(Error::WeakKey {
                    node: name.to_owned(),
                });
            }
        }
        // Fits u32: checked by `Roster::new`.
        let n = roster.len() as u32;
        let (mask, b) = (self.mask.clone(), self.b.clone());
        let mask_shares = self.split(&mask, threshold, n);
        let b_shares = self.split(&b, threshold, n);

        let mut sealed = Vec::with_capacity(roster.len().saturating_sub(1));
        for (to_x, to, keys) in roster.iter() {
            if to == self.me {
                continue;
            }
            let i = to_x as usize - 1;
            let mut plaintext = Zeroizing::new(Vec::with_capacity(SEALED_PLAINTEXT));
            shamir::encode_into(&mut plaintext, to_x, &mask_shares[i]);
            shamir::encode_into(&mut plaintext, to_x, &b_shares[i]);
            let ciphertext = ShareBox::new(&self.ctx, &self.cipher, &keys.cipher, &self.me, to)
                .and_then(|sealer| sealer.seal(&plaintext))
                .ok_or_else(|| Error::Seal { to: to.to_owned() })?;
            sealed.push((to.to_owned(), ciphertext));
        }
        let i = x as usize - 1;
        let own = Held {
            mask: mask_shares[i].clone(),
            b: b_shares[i].clone(),
        };
        self.stage = Stage::Shared { roster, x, own };
        Ok(sealed)
    }

    /// Step 3: `received` are the sealed shares addressed to me, `(from, ciphertext)`, from
    /// every member that sent shares (the set U2, me included implicitly); `input` my encoded
    /// answer (`ctx.len` ring elements, little-endian). Returns the masked answer:
    /// `input + PRG(b) + Σ ±PRG(s_me,v)` over the other members of U2, `+` when my name sorts
    /// before theirs.
    pub fn masked_input(&mut self, received: &[(String, Vec<u8>)], input: &[u8]) -> Result<Vec<u8>> {
        let Stage::Shared { roster, x, own } = self.begin(2)? else {
            return Err(Error::Ended { step: STEPS[2] });
        };
        let expected = vector_bytes(&self.ctx)?;
        if input.len() != expected {
            return Err(Error::WrongLength {
                what: "the answer",
                expected,
                got: input.len(),
            });
        }
        let mut held = BTreeMap::new();
        held.insert(self.me.clone(), own);
        for (from, ciphertext) in received {
            let (_, keys) = roster.member(from)?;
            if held.contains_key(from) {
                return Err(Error::Duplicate {
                    node: from.clone(),
                    what: "received shares",
                });
            }
            let bad = |problem| Error::BadShare {
                from: from.clone(),
                problem,
            };
            let plaintext = ShareBox::new(&self.ctx, &self.cipher, &keys.cipher, from, &self.me)
                .ok_or_else(|| Error::WeakKey { node: from.clone() })?
                .open(ciphertext)
                .ok_or_else(|| bad("it does not open with our keys for this attempt"))?;
            if plaintext.len() != SEALED_PLAINTEXT {
                return Err(bad("wrong length"));
            }
            let (mask_x, mask) =
                shamir::decode(&plaintext[..shamir::SHARE_LEN]).map_err(|e| bad(e.problem()))?;
            let (b_x, b) = shamir::decode(&plaintext[shamir::SHARE_LEN..]).map_err(|e| bad(e.problem()))?;
            if mask_x != x || b_x != x {
                return Err(bad("it is not for my position"));
            }
            held.insert(from.clone(), Held { mask, b });
        }
        if held.len() < roster.threshold() as usize {
            return Err(Error::BelowThreshold {
                have: held.len(),
                need: roster.threshold(),
                what: "members sent shares",
            });
        }

        let mut masks = vec![Mask {
            seed: kdf::self_seed(&self.ctx, &self.b),
            add: true,
        }];
        for peer in held.keys().filter(|name| **name != self.me) {
            let (_, keys) = roster.member(peer)?;
            let seed = kdf::pair_seed(&self.ctx, &self.mask, &keys.mask)
                .ok_or_else(|| Error::WeakKey { node: peer.clone() })?;
            masks.push(Mask {
                seed,
                add: self.me < *peer,
            });
        }
        let mut masked = input.to_vec();
        prg::apply(self.ctx.ring, &mut masked, &masks);
        self.stage = Stage::Masked { roster, x, held };
        Ok(masked)
    }

    /// Step 4: reveal shares: of the self-mask seed of every survivor, of the mask key of every
    /// dropped node; `(owner, share)`, never both for one owner. Refuses if the sets are not a
    /// split of U2, if fewer than the threshold survived, if I am not a survivor, or on a second
    /// call.
    pub fn unmask(&mut self, survivors: &[String], dropped: &[String]) -> Result<Vec<(String, Vec<u8>)>> {
        let Stage::Masked { roster, x, held } = self.begin(3)? else {
            return Err(Error::Ended { step: STEPS[3] });
        };
        let mut seen = BTreeSet::new();
        for (list, what) in [(survivors, "survivors"), (dropped, "dropped nodes")] {
            for node in list {
                if !held.contains_key(node) {
                    return Err(Error::NotSplit {
                        node: node.clone(),
                        problem: "did not send shares, so it can be neither a survivor nor dropped",
                    });
                }
                if !seen.insert(node.as_str()) {
                    return Err(if survivors.contains(node) && dropped.contains(node) {
                        Error::NotSplit {
                            node: node.clone(),
                            problem: "is named both a survivor and dropped",
                        }
                    } else {
                        Error::Duplicate {
                            node: node.clone(),
                            what,
                        }
                    });
                }
            }
        }
        if let Some(missing) = held.keys().find(|name| !seen.contains(name.as_str())) {
            return Err(Error::NotSplit {
                node: missing.clone(),
                problem: "sent shares but is named neither a survivor nor dropped",
            });
        }
        if !survivors.contains(&self.me) {
            return Err(Error::NotSurvivor {
                node: self.me.clone(),
            });
        }
        if survivors.len() < roster.threshold() as usize {
            return Err(Error::BelowThreshold {
                have: survivors.len(),
                need: roster.threshold(),
                what: "survivors",
            });
        }
        let mut out = Vec::with_capacity(held.len());
        for (list, self_mask) in [(survivors, true), (dropped, false)] {
            for node in list {
                if let Some(h) = held.get(node) {
                    let secret = if self_mask { &h.b } else { &h.mask };
                    out.push((node.clone(), shamir::encode(x, secret)));
                }
            }
        }
        self.stage = Stage::Revealed;
        Ok(out)
    }
}

/// Bytes of a vector of the context's ring and length, if it fits this machine and the mask
/// generator.
pub(crate) fn vector_bytes(ctx: &Context) -> Result<usize> {
    ctx.len
        .checked_mul(ctx.ring.width() as u64)
        .filter(|&bytes| bytes <= prg::MAX_BYTES)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or(Error::TooLarge { len: ctx.len })
}
