//! The coordinator's side of one attempt: who shared, the running sum of masked answers, the
//! reveals, and the unmasked sum.
//!
//! What the server learns: with at least `threshold` reveals, the survivors' self-mask seeds
//! and the dropped nodes' mask keys, hence the sum of the survivors' answers and nothing else
//! (each survivor's self mask still hides its own answer from anyone lacking its seed, and a
//! node reveals a self-mask share or a mask-key share of each owner, never both). With fewer
//! than `threshold` reveals, every secret has fewer than `threshold` Shamir shares, which are
//! uniformly distributed whatever the secret: the sum stays covered by the survivors'
//! self masks, and [`Server::finish`] refuses.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use curve25519_dalek::Scalar;
use zeroize::Zeroizing;

use crate::client::vector_bytes;
use crate::kdf;
use crate::prg::{self, Mask};
use crate::roster::Roster;
use crate::shamir::{self, Rebuild};
use crate::{Context, Error, PublicKeys, Result};

/// The coordinator's side of one attempt.
///
/// Sets are fixed as the protocol advances: the nodes that sent shares (U2) when the first
/// masked answer arrives; survivors and dropped nodes when [`Server::unmask_sets`] is first
/// called (or the first reveal arrives). A message that would change a fixed set is refused
/// with [`Error::Late`].
pub struct Server {
    ctx: Context,
    roster: Roster,
    bytes: usize,
    /// U2: the nodes that sent shares.
    shared: BTreeSet<String>,
    /// The survivors: the nodes whose masked answer is in `sum`.
    masked: BTreeSet<String>,
    sum: Vec<u8>,
    /// Survivors and dropped were announced: no more masked answers.
    announced: Cell<bool>,
    revealed: BTreeSet<String>,
    /// Revealed shares by owner: (x, value).
    shares: BTreeMap<String, Vec<(u32, Zeroizing<Scalar>)>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Server { .. }")
    }
}

impl Server {
    /// `roster`: the members and their keys, as sent in the roster; checked by the same rules
    /// as the nodes check it, with `ctx.threshold` as the threshold.
    pub fn new(ctx: Context, roster: Vec<(String, PublicKeys)>) -> Result<Server> {
        let roster = Roster::new(&roster, ctx.threshold, 2)?;
        let bytes = vector_bytes(&ctx)?;
        Ok(Server {
            ctx,
            roster,
            bytes,
            shared: BTreeSet::new(),
            masked: BTreeSet::new(),
            sum: Vec::new(),
            announced: Cell::new(false),
            revealed: BTreeSet::new(),
            shares: BTreeMap::new(),
        })
    }

    /// `from` sent its shares (it belongs to U2).
    pub fn shared(&mut self, from: &str) -> Result<()> {
        self.roster.member(from)?;
        if !self.masked.is_empty() {
            return Err(Error::Late {
                node: from.to_owned(),
                what: "nodes that sent shares",
            });
        }
        if !self.shared.insert(from.to_owned()) {
            return Err(Error::Duplicate {
                node: from.to_owned(),
                what: "nodes that sent shares",
            });
        }
        Ok(())
    }

    /// Fold `from`'s masked answer into the running sum (wrapping). `from` must be in U2, send
    /// once, `ctx.len` elements, before the sets are announced.
    pub fn add_masked(&mut self, from: &str, masked: &[u8]) -> Result<()> {
        self.roster.member(from)?;
        if self.announced.get() {
            return Err(Error::Late {
                node: from.to_owned(),
                what: "survivors",
            });
        }
        if !self.shared.contains(from) {
            return Err(Error::NoShares {
                node: from.to_owned(),
            });
        }
        if self.masked.contains(from) {
            return Err(Error::Duplicate {
                node: from.to_owned(),
                what: "masked answers",
            });
        }
        if masked.len() != self.bytes {
            return Err(Error::WrongLength {
                what: "the masked answer",
                expected: self.bytes,
                got: masked.len(),
            });
        }
        if self.sum.is_empty() {
            self.sum = vec![0; self.bytes];
        }
        prg::add_into(self.ctx.ring, &mut self.sum, masked);
        self.masked.insert(from.to_owned());
        Ok(())
    }

    /// Survivors (sent a masked answer) and dropped (sent shares, no masked answer), sorted.
    /// Fixes both sets: a masked answer arriving later is refused.
    pub fn unmask_sets(&self) -> (Vec<String>, Vec<String>) {
        self.announced.set(true);
        let survivors = self.masked.iter().cloned().collect();
        let dropped = self.shared.difference(&self.masked).cloned().collect();
        (survivors, dropped)
    }

    /// A survivor's revealed shares: exactly one per node that sent shares, each at the
    /// revealer's position. Whether a share is of a self-mask seed or of a mask key follows
    /// from the announced sets.
    pub fn add_reveal(&mut self, from: &str, shares: Vec<(String, Vec<u8>)>) -> Result<()> {
        let (x, _) = self.roster.member(from)?;
        self.announced.set(true);
        if !self.masked.contains(from) {
            return Err(Error::NotSurvivor {
                node: from.to_owned(),
            });
        }
        if self.revealed.contains(from) {
            return Err(Error::Duplicate {
                node: from.to_owned(),
                what: "reveals",
            });
        }
        let bad = |problem| Error::BadShare {
            from: from.to_owned(),
            problem,
        };
        if shares.len() != self.shared.len() {
            return Err(bad("a reveal holds one share of every node that sent shares"));
        }
        let mut parsed = BTreeMap::new();
        for (owner, bytes) in &shares {
            if !self.shared.contains(owner) {
                return Err(bad("a share of a node that sent no shares"));
            }
            let (share_x, value) = shamir::decode(bytes).map_err(|e| bad(e.problem()))?;
            if share_x != x {
                return Err(bad("a share not at the revealer's position"));
            }
            if parsed.insert(owner.clone(), value).is_some() {
                return Err(bad("two shares of one node"));
            }
        }
        for (owner, value) in parsed {
            self.shares.entry(owner).or_default().push((x, value));
        }
        self.revealed.insert(from.to_owned());
        Ok(())
    }

    /// Whether enough reveals arrived to unmask.
    pub fn can_finish(&self) -> bool {
        self.revealed.len() >= self.roster.threshold() as usize
    }

    /// The sum of the survivors' encoded answers (`ctx.len` ring elements, little-endian).
    ///
    /// Every secret is rebuilt from all its revealed shares, checked to lie on one polynomial
    /// (a lying or corrupted survivor makes the attempt fail with [`Error::SharesDisagree`]
    /// rather than release a wrong sum), and a dropped node's rebuilt mask key must match its
    /// advertised public key. Then the survivors' self masks and the pairwise masks between
    /// each dropped node and each survivor are removed; the expansions run on up to 4 threads
    /// (each over its own element range of the sum, see `prg`).
    pub fn finish(self) -> Result<Vec<u8>> {
        let t = self.roster.threshold();
        if self.revealed.len() < t as usize {
            return Err(Error::BelowThreshold {
                have: self.revealed.len(),
                need: t,
                what: "survivors revealed their shares",
            });
        }
        let rebuild = |owner: &str, secret: &'static str| -> Result<Zeroizing<Scalar>> {
            let points: Vec<(u32, Scalar)> = self
                .shares
                .get(owner)
                .map(|v| v.iter().map(|(x, y)| (*x, **y)).collect())
                .unwrap_or_default();
            let points = Zeroizing::new(points);
            shamir::reconstruct(&points, t).map_err(|e| match e {
                Rebuild::TooFew => Error::BelowThreshold {
                    have: points.len(),
                    need: t,
                    what: "shares revealed",
                },
                Rebuild::Disagree => Error::SharesDisagree {
                    owner: owner.to_owned(),
                    secret,
                },
            })
        };

        let mut masks = Vec::new();
        for survivor in &self.masked {
            let b = rebuild(survivor, "self-mask seed")?;
            masks.push(Mask {
                seed: kdf::self_seed(&self.ctx, &b),
                add: false,
            });
        }
        for dropped in self.shared.difference(&self.masked) {
            let secret = rebuild(dropped, "mask key")?;
            let (_, keys) = self.roster.member(dropped)?;
            if kdf::x25519_public(&secret) != keys.mask {
                return Err(Error::WrongSecret {
                    owner: dropped.clone(),
                });
            }
            for survivor in &self.masked {
                let (_, keys) = self.roster.member(survivor)?;
                let seed = kdf::pair_seed(&self.ctx, &secret, &keys.mask).ok_or_else(|| Error::WeakKey {
                    node: survivor.clone(),
                })?;
                // The survivor added this mask when its name sorts first: take it back.
                masks.push(Mask {
                    seed,
                    add: *survivor > *dropped,
                });
            }
        }
        let mut sum = self.sum;
        if sum.is_empty() {
            sum = vec![0; self.bytes];
        }
        prg::apply(self.ctx.ring, &mut sum, &masks);
        Ok(sum)
    }
}
