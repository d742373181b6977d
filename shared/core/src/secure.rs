//! One secure step, as the engine runs it: the four exchanges of secure aggregation
//! (`fedstat_proto::secure`) around the coordinator's `fedstat_secagg::Server`. Sans-IO like
//! the engine: messages come in, messages to send and the unmasked sum come out.
//!
//! Each exchange waits for the members of the one before it (minus those that failed or
//! left) until its deadline; it goes on with whoever answered if they are at least the
//! step's quorum (the larger of the Shamir threshold and `min_nodes`), else the step is tried
//! again from the start with fresh keys. The coordinator relays keys and sealed shares it
//! cannot open, adds masked answers it cannot read, and unmasks only the sum of at least
//! `threshold` survivors.

use std::collections::{BTreeMap, BTreeSet};

use fedstat_proto::secure::{Ring, SealedShare, SecureDown, SecureRound, SignedKeys};
use fedstat_secagg::{Context, PublicKeys, Server};

/// The exchange a secure step is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Waiting for the selected nodes' signed keys (each sends them once its answer is ready).
    Keys,
    /// Roster sent; waiting for the members' sealed shares.
    Shares,
    /// Shares forwarded; waiting for masked answers.
    Masked,
    /// Unmask request sent; waiting for the survivors' revealed shares.
    Reveal,
}

/// What an exchange came to.
#[derive(Debug)]
pub(crate) enum Advance {
    /// Messages for the next exchange.
    Send(Vec<(String, SecureDown)>),
    /// The unmasked sum (ring elements) of the survivors' answers.
    Done { sum: Vec<u8>, survivors: Vec<String> },
    /// Too few answered this exchange: the step must start again.
    Short { stage: Stage, have: usize, need: usize },
    /// Unmasking failed (the reason names the rule, never a value).
    Failed(String),
}

#[derive(Debug)]
pub(crate) struct SecureRun {
    pub at: SecureRound,
    pub ring: Ring,
    /// Ring elements of every masked answer.
    pub len: u64,
    stage: Stage,
    /// Who this exchange waits for, and who answered it.
    members: BTreeSet<String>,
    responded: BTreeSet<String>,
    min_nodes: u32,
    threshold: u32,
    keys: BTreeMap<String, SignedKeys>,
    /// Sealed shares to forward, by recipient.
    inbox: BTreeMap<String, Vec<SealedShare>>,
    server: Option<Server>,
}

impl SecureRun {
    pub fn new(
        at: SecureRound,
        len: u64,
        selected: &BTreeSet<String>,
        spec_threshold: Option<u32>,
        min_nodes: u32,
    ) -> Self {
        SecureRun {
            at,
            ring: Ring::Z128,
            len,
            stage: Stage::Keys,
            members: selected.clone(),
            responded: BTreeSet::new(),
            min_nodes,
            threshold: Self::threshold_for(spec_threshold.unwrap_or(0), min_nodes, selected.len()),
            keys: BTreeMap::new(),
            inbox: BTreeMap::new(),
            server: None,
        }
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The threshold for `n` selected nodes: the spec's (a floor), `min_nodes`, a strict
    /// majority of them (so no two disjoint groups can each be unmasked), and at least 2.
    pub fn threshold_for(spec_threshold: u32, min_nodes: u32, n: usize) -> u32 {
        spec_threshold.max(min_nodes).max(n as u32 / 2 + 1).max(2)
    }

    /// The Shamir threshold, fixed when the step starts (every key is bound to it).
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    fn need(&self) -> usize {
        self.threshold.max(self.min_nodes) as usize
    }

    /// Members of this exchange that have not answered and have not failed.
    pub fn waiting<'a>(
        &'a self,
        failed: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a String> + 'a {
        self.members
            .iter()
            .filter(move |n| !self.responded.contains(*n) && !failed.contains_key(*n))
    }

    fn expect(&self, stage: Stage, node: &str) -> Result<(), String> {
        if self.stage != stage {
            return Err(format!(
                "a secure-aggregation message out of order ({stage:?} during {:?})",
                self.stage
            ));
        }
        if !self.members.contains(node) {
            return Err("a secure-aggregation message from a node outside this exchange".into());
        }
        if self.responded.contains(node) {
            return Err("a second secure-aggregation message for the same exchange".into());
        }
        Ok(())
    }

    pub fn on_keys(&mut self, node: &str, keys: SignedKeys) -> Result<(), String> {
        self.expect(Stage::Keys, node)?;
        if keys.node != node {
            return Err("keys advertised under another node's name".into());
        }
        self.keys.insert(node.to_owned(), keys);
        self.responded.insert(node.to_owned());
        Ok(())
    }

    pub fn on_shares(&mut self, node: &str, shares: Vec<SealedShare>) -> Result<(), String> {
        self.expect(Stage::Shares, node)?;
        let mut to: BTreeSet<&str> = BTreeSet::new();
        for s in &shares {
            if s.from != node || s.to == node || !self.members.contains(&s.to) || !to.insert(&s.to) {
                return Err("sealed shares that are not one to each other member".into());
            }
        }
        if to.len() + 1 != self.members.len() {
            return Err("sealed shares that are not one to each other member".into());
        }
        let server = self.server.as_mut().ok_or("no roster")?;
        server.shared(node).map_err(|e| e.to_string())?;
        for s in shares {
            self.inbox.entry(s.to.clone()).or_default().push(s);
        }
        self.responded.insert(node.to_owned());
        Ok(())
    }

    /// Whether a masked answer from `node` is expected now.
    pub fn expects_masked(&self, node: &str) -> Result<(), String> {
        self.expect(Stage::Masked, node)
    }

    pub fn on_masked(&mut self, node: &str, masked: &[u8]) -> Result<(), String> {
        self.expect(Stage::Masked, node)?;
        let server = self.server.as_mut().ok_or("no roster")?;
        server.add_masked(node, masked).map_err(|e| e.to_string())?;
        self.responded.insert(node.to_owned());
        Ok(())
    }

    pub fn on_reveal(&mut self, node: &str, shares: Vec<(String, Vec<u8>)>) -> Result<(), String> {
        self.expect(Stage::Reveal, node)?;
        let server = self.server.as_mut().ok_or("no roster")?;
        server.add_reveal(node, shares).map_err(|e| e.to_string())?;
        self.responded.insert(node.to_owned());
        Ok(())
    }

    /// Close this exchange with whoever answered and start the next one.
    pub fn advance(&mut self) -> Advance {
        let have = self.responded.len();
        let need = self.need();
        if self.stage != Stage::Reveal && have < need {
            return Advance::Short {
                stage: self.stage,
                have,
                need,
            };
        }
        let answered = std::mem::take(&mut self.responded);
        match self.stage {
            Stage::Keys => {
                let members: Vec<SignedKeys> = answered
                    .iter()
                    .filter_map(|n| self.keys.get(n).cloned())
                    .collect();
                let roster = members
                    .iter()
                    .map(|k| {
                        (
                            k.node.clone(),
                            PublicKeys {
                                cipher: k.cipher_key,
                                mask: k.mask_key,
                            },
                        )
                    })
                    .collect();
                let ctx = Context {
                    at: self.at,
                    ring: self.ring,
                    len: self.len,
                    threshold: self.threshold,
                };
                match Server::new(ctx, roster) {
                    Ok(server) => self.server = Some(server),
                    Err(e) => return Advance::Failed(e.to_string()),
                }
                self.stage = Stage::Shares;
                self.members = answered.clone();
                let msg = SecureDown::Roster {
                    at: self.at,
                    threshold: self.threshold,
                    members,
                };
                Advance::Send(answered.into_iter().map(|n| (n, msg.clone())).collect())
            }
            Stage::Shares => {
                self.stage = Stage::Masked;
                let sent = answered.clone();
                self.members = answered;
                let mut inbox = std::mem::take(&mut self.inbox);
                // Only shares from members that sent theirs: U2.
                Advance::Send(
                    sent.iter()
                        .map(|to| {
                            let shares = inbox
                                .remove(to)
                                .unwrap_or_default()
                                .into_iter()
                                .filter(|s| sent.contains(&s.from))
                                .collect();
                            (to.clone(), SecureDown::Shares { at: self.at, shares })
                        })
                        .collect(),
                )
            }
            Stage::Masked => {
                let Some(server) = self.server.as_ref() else {
                    return Advance::Failed("no roster".into());
                };
                let (survivors, dropped) = server.unmask_sets();
                self.stage = Stage::Reveal;
                self.members = survivors.iter().cloned().collect();
                let msg = SecureDown::Unmask {
                    at: self.at,
                    survivors: survivors.clone(),
                    dropped,
                };
                Advance::Send(survivors.into_iter().map(|n| (n, msg.clone())).collect())
            }
            Stage::Reveal => {
                let Some(server) = self.server.take() else {
                    return Advance::Failed("no roster".into());
                };
                if !server.can_finish() {
                    return Advance::Short {
                        stage: Stage::Reveal,
                        have,
                        need: self.threshold as usize,
                    };
                }
                let survivors = server.unmask_sets().0;
                match server.finish() {
                    Ok(sum) => Advance::Done { sum, survivors },
                    Err(e) => Advance::Failed(e.to_string()),
                }
            }
        }
    }
}
