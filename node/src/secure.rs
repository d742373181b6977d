//! The node's side of secure aggregation: the four exchanges of `fedstat_proto::secure`
//! around `fedstat_secagg::Client`, for one attempt of one step.
//!
//! The answer is computed, checked and recorded first (as for an answer in clear); only its
//! masked form leaves the node. Every other member's keys are checked against the federation
//! CA before anything is shared with it: a coordinator that swapped keys to sit in the middle
//! would need a node certificate with that member's name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedstat_net::attest::{Signer, Verifier};
use fedstat_net::session::Connection;
use fedstat_net::transport::{write_frame, write_tensor};
use fedstat_proto::secure::{
    MaskedHeader, RevealedShare, SealedShare, SecureDown, SecureRound, SecureTask, SecureUp, SignedKeys,
};
use fedstat_proto::wire::{NodeMsg, Upload};
use fedstat_secagg::{key_statement, Client, Context, PublicKeys};
use tokio::sync::mpsc;

use crate::config::NodeConfig;
use crate::{Error, Result};

/// What a node needs for secure aggregation: its signing key, the CA to check other members
/// with, and the routing of coordinator messages to the step waiting for them.
pub struct Secure {
    signer: Signer,
    verifier: Verifier,
    /// `policy.secure_peers`: the only offices (and keys) this node sums with, if set.
    pins: Option<std::collections::BTreeMap<String, String>>,
    waiting: Mutex<HashMap<SecureRound, mpsc::UnboundedSender<SecureDown>>>,
    /// Steps (experiment, round, phase) for which this node has revealed shares: at most one
    /// attempt of a step is ever unmasked with this node's help, so a coordinator cannot
    /// difference the sums of two attempts whose survivors differ by one office.
    revealed: Mutex<std::collections::HashSet<(u64, u32, fedstat_proto::wire::Phase)>>,
}

impl std::fmt::Debug for Secure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secure { .. }")
    }
}

impl Secure {
    pub fn load(config: &NodeConfig) -> Result<Secure> {
        let signer = Signer::load(&config.tls.key, &config.tls.cert)?;
        let verifier = Verifier::load(&config.tls.ca_cert, config.crl.as_deref())?;
        Ok(Secure {
            signer,
            verifier,
            pins: config.policy.secure_peers.clone(),
            waiting: Mutex::new(HashMap::new()),
            revealed: Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// Hand a coordinator message to the step it belongs to; one for no step is dropped.
    pub fn deliver(&self, msg: SecureDown) {
        let at = msg.at();
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        match waiting.get(&at) {
            Some(tx) => {
                let _ = tx.send(msg);
            }
            None => tracing::debug!(?at, "a secure-aggregation message for no step of this node"),
        }
    }

    fn register(&self, at: SecureRound) -> mpsc::UnboundedReceiver<SecureDown> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(at, tx);
        rx
    }

    fn unregister(&self, at: &SecureRound) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(at);
    }

    /// Run one attempt: advertise keys, share, send the masked answer, reveal. `encoded` is the
    /// answer as ring elements (`fedstat_core::aggregate::encode_ring`).
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        self: &Arc<Self>,
        at: SecureRound,
        task: SecureTask,
        me: &str,
        encoded: Vec<u8>,
        conn: &Connection,
        ctl: &mpsc::UnboundedSender<NodeMsg>,
        wait: Duration,
    ) -> Result<()> {
        let mut inbox = self.register(at);
        let result = self
            .exchange(at, task, me, encoded, conn, ctl, wait, &mut inbox)
            .await;
        self.unregister(&at);
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        at: SecureRound,
        task: SecureTask,
        me: &str,
        encoded: Vec<u8>,
        conn: &Connection,
        ctl: &mpsc::UnboundedSender<NodeMsg>,
        wait: Duration,
        inbox: &mut mpsc::UnboundedReceiver<SecureDown>,
    ) -> Result<()> {
        let protocol = |rule: &'static str| Error::SecureProtocol(rule);
        let threshold = task.threshold.ok_or(protocol("the task names no threshold"))?;
        if encoded.len() as u64 != task.len.saturating_mul(task.ring.width() as u64) {
            return Err(protocol("the answer's length is not the step's"));
        }
        let ctx = Context {
            at,
            ring: task.ring,
            len: task.len,
            threshold,
        };
        let (mut client, keys) = Client::new(ctx, me);
        let signature = self.signer.sign(&key_statement(&ctx, me, &keys))?;
        let mine = SignedKeys {
            node: me.to_owned(),
            cipher_key: keys.cipher,
            mask_key: keys.mask,
            certificate: self.signer.certificate_der().to_vec(),
            signature,
        };
        send(ctl, SecureUp::Keys { at, keys: mine })?;

        // 2. The roster: every member's keys, checked against the federation CA.
        let (t, members) = match next(inbox, wait).await? {
            SecureDown::Roster {
                threshold, members, ..
            } => (threshold, members),
            _ => return Err(protocol("a message out of order (expected the roster)")),
        };
        tracing::info!(
            members = members.len(),
            threshold = t,
            attempt = at.attempt,
            "secure aggregation: roster received"
        );
        if t != threshold {
            return Err(protocol("the roster's threshold is not the task's"));
        }
        let mut roster = Vec::with_capacity(members.len());
        for m in &members {
            let pk = PublicKeys {
                cipher: m.cipher_key,
                mask: m.mask_key,
            };
            if m.node == me {
                if pk != keys {
                    return Err(protocol("the roster carries other keys under this node's name"));
                }
            } else {
                self.verifier.verify(
                    &m.certificate,
                    &m.node,
                    &key_statement(&ctx, &m.node, &pk),
                    &m.signature,
                )?;
                check_pinned(self.pins.as_ref(), &m.node, &m.certificate)?;
            }
            roster.push((m.node.clone(), pk));
        }
        let sealed = client.share_keys(threshold, &roster)?;
        let shares = sealed
            .into_iter()
            .map(|(to, ciphertext)| SealedShare {
                from: me.to_owned(),
                to,
                ciphertext,
            })
            .collect();
        send(ctl, SecureUp::Shares { at, shares })?;

        // 3. The shares addressed to this node; then the masked answer.
        let received = match next(inbox, wait).await? {
            SecureDown::Shares { shares, .. } => shares,
            _ => return Err(protocol("a message out of order (expected the shares)")),
        };
        tracing::info!(shares = received.len(), "secure aggregation: shares received");
        // The coordinator forwarded shares, so it has this node's: a node leaving here is a
        // member that shared and then dropped before masking.
        fault("after-shares", conn).await;
        if received.iter().any(|s| s.to != me) {
            return Err(protocol("shares addressed to another node"));
        }
        let received: Vec<(String, Vec<u8>)> = received.into_iter().map(|s| (s.from, s.ciphertext)).collect();
        let (client_back, masked) = tokio::task::spawn_blocking(move || {
            let masked = client.masked_input(&received, &encoded);
            (client, masked)
        })
        .await
        .map_err(|_| protocol("masking crashed"))?;
        let mut client = client_back;
        let masked = masked?;
        send_masked(conn, at, &task, &masked)
            .await
            .map_err(|e| Error::Connect {
                addr: "coordinator".into(),
                problem: format!("cannot send the masked answer: {e}"),
            })?;
        fault("after-masked", conn).await;

        // 4. Who survived and who dropped: reveal the shares that unmask the sum.
        let (survivors, dropped) = match next(inbox, wait).await? {
            SecureDown::Unmask {
                survivors, dropped, ..
            } => (survivors, dropped),
            _ => return Err(protocol("a message out of order (expected the unmask request)")),
        };
        let first = self.revealed.lock().unwrap_or_else(|e| e.into_inner()).insert((
            at.experiment,
            at.round,
            at.phase,
        ));
        if !first {
            return Err(protocol(
                "this node already helped unmask another attempt of this step (one unmasking per step)",
            ));
        }
        let shares = client
            .unmask(&survivors, &dropped)?
            .into_iter()
            .map(|(owner, share)| RevealedShare { owner, share })
            .collect();
        send(ctl, SecureUp::Reveal { at, shares })
    }
}

/// `policy.secure_peers`: a member not listed, or listed with another key, ends this node's
/// part in the step before it shares anything. The researcher and the coordinator are told the
/// rule; which member and which key, only the node's log.
fn check_pinned(
    pins: Option<&std::collections::BTreeMap<String, String>>,
    member: &str,
    certificate: &[u8],
) -> Result<()> {
    let Some(pins) = pins else {
        return Ok(());
    };
    let presented = fedstat_net::attest::key_fingerprint(certificate);
    match pins.get(member) {
        Some(pinned) if presented.as_deref() == Some(pinned.as_str()) => Ok(()),
        pinned => {
            tracing::warn!(
                member = %fedstat_core::text::printable(member),
                presented = presented.as_deref().unwrap_or("none"),
                pinned = pinned.map(String::as_str).unwrap_or("not listed"),
                "secure aggregation: a member is not a pinned peer (policy.secure_peers); \
                 leaving the step before sharing anything"
            );
            Err(Error::Policy(crate::policy::Refusal::UnpinnedPeer))
        }
    }
}

/// Test-only fault injection for the dropout tests: with `FEDSTAT_TEST_FAULT=secagg-exit-<point>`
/// in its environment, the node leaves the federation at that point of a secure step, as a
/// node that crashes there would (its connection closed, its process gone). Custodians never
/// set it; it changes nothing else.
async fn fault(point: &str, conn: &Connection) {
    let Ok(want) = std::env::var("FEDSTAT_TEST_FAULT") else {
        return;
    };
    if want.strip_prefix("secagg-exit-") == Some(point) {
        tracing::warn!("test fault: leaving the federation {point}");
        conn.close_and_wait(fedstat_net::session::close::SHUTDOWN, b"test fault")
            .await;
        std::process::exit(3);
    }
}

fn send(ctl: &mpsc::UnboundedSender<NodeMsg>, up: SecureUp) -> Result<()> {
    ctl.send(NodeMsg::Secure(up)).map_err(|_| Error::Connect {
        addr: "coordinator".into(),
        problem: "the control stream closed".into(),
    })
}

async fn next(inbox: &mut mpsc::UnboundedReceiver<SecureDown>, wait: Duration) -> Result<SecureDown> {
    match tokio::time::timeout(wait, inbox.recv()).await {
        Ok(Some(msg)) => Ok(msg),
        Ok(None) => Err(Error::SecureProtocol("the step was abandoned")),
        Err(_) => Err(Error::SecureProtocol(
            "the coordinator did not go on with the step in time",
        )),
    }
}

async fn send_masked(
    conn: &Connection,
    at: SecureRound,
    task: &SecureTask,
    masked: &[u8],
) -> std::result::Result<(), String> {
    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
    let header = MaskedHeader {
        at,
        ring: task.ring,
        len: task.len,
    };
    write_frame(&mut s, &Upload::Masked(header))
        .await
        .map_err(|e| e.to_string())?;
    write_tensor(&mut s, masked).await.map_err(|e| e.to_string())?;
    s.finish().await.map_err(|e| e.to_string())?;
    s.stopped().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fedstat_net::identity::Role;
    use fedstat_net::pki;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    use super::*;

    #[test]
    fn only_listed_members_with_their_listed_key_pass_the_pins() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = pki::CaDir::new(tmp.path());
        pki::init(&ca, "fed", &["localhost".into()]).expect("init");
        let cert = |name: &str| {
            // Each issuance in its own folder: the CA may mint a second `istat`.
            let out = tempfile::tempdir_in(tmp.path()).expect("folder").keep();
            let (path, _) = pki::issue(&ca, Role::Node, name, &out, 30).expect("issue");
            CertificateDer::from_pem_file(path)
                .expect("cert")
                .as_ref()
                .to_vec()
        };
        let istat = cert("istat");
        let pins: BTreeMap<String, String> = [(
            "istat".to_owned(),
            fedstat_net::attest::key_fingerprint(&istat).expect("fingerprint"),
        )]
        .into();
        let refused = |r: Result<()>| matches!(r, Err(Error::Policy(crate::policy::Refusal::UnpinnedPeer)));

        assert!(
            check_pinned(None, "anyone", b"anything").is_ok(),
            "no pins: the CA decides"
        );
        assert!(check_pinned(Some(&pins), "istat", &istat).is_ok());
        // A name the office never agreed to sum with.
        assert!(refused(check_pinned(Some(&pins), "sybil", &cert("sybil"))));
        // The CA re-issuing `istat` with a key of its own (an impersonation).
        assert!(refused(check_pinned(Some(&pins), "istat", &cert("istat"))));
        assert!(refused(check_pinned(Some(&pins), "istat", b"garbage")));
    }
}
