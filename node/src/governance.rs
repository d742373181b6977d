//! The custodian's control over every task: the site policy, the approval of manifests, and the
//! node's tamper-evident audit log. [`Governance::admit`] decides whether a task may run before
//! any data are read; the session records every answer in the audit log before it leaves.
//!
//! The node process is the audit log's only writer. The `approve`/`reject` commands only write
//! decision files; the node records a decision in its log when it first applies it.

use std::collections::BTreeSet;
use std::sync::Mutex;

use fedstat_core::audit::{self, AuditEvent, AuditLog, Decision, RowSetRecord, TaskNotDone};
use fedstat_proto::manifest::{hex, Manifest};
use fedstat_proto::wire::{NodeMsg, Task};
use sha2::{Digest, Sha256};

use crate::approval::{ApprovalStore, Verdict};
use crate::binding::Bindings;
use crate::config::NodeConfig;
use crate::disclosure::{ReleaseLedger, RowSet};
use crate::ledger::PrivacyLedger;
use crate::policy::{ApprovalMode, SitePolicy};
use crate::{Error, Result};

/// Whether a task that passed the policy may run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Run,
    /// Held for the custodian (manual approval): answer `NodeMsg::Held`.
    Held,
}

/// Policy, approvals, bindings, the release ledger and the audit log of one running node.
#[derive(Debug)]
pub struct Governance {
    policy: SitePolicy,
    store: ApprovalStore,
    bindings: Bindings,
    ledger: ReleaseLedger,
    privacy: PrivacyLedger,
    audit: Mutex<AuditLog>,
    /// Manifests already recorded as seen by this process.
    seen: Mutex<BTreeSet<String>>,
    /// Decisions (manifest, decided_at) already recorded by this process.
    applied: Mutex<BTreeSet<(String, String)>>,
}

impl Governance {
    /// Open the audit log (creating the state folder) and record the start with the policy.
    pub fn open(config: &NodeConfig, node: &str) -> Result<Self> {
        let log = AuditLog::open(&config.audit_log)?;
        let gov = Governance {
            policy: config.policy.clone(),
            store: ApprovalStore::new(&config.state_dir),
            bindings: Bindings::new(&config.state_dir),
            ledger: ReleaseLedger::new(&config.state_dir),
            privacy: PrivacyLedger::new(&config.privacy_ledger),
            audit: Mutex::new(log),
            seen: Mutex::new(BTreeSet::new()),
            applied: Mutex::new(BTreeSet::new()),
        };
        gov.record(AuditEvent::NodeStarted {
            node: node.to_string(),
            software: format!("fedstat-node {}", env!("CARGO_PKG_VERSION")),
            datasets: config.datasets.keys().cloned().collect(),
            policy: config.policy.to_json(),
        })?;
        Ok(gov)
    }

    pub fn policy(&self) -> &SitePolicy {
        &self.policy
    }

    /// Append a record; fails when it cannot be made durable.
    pub fn record(&self, event: AuditEvent) -> Result<()> {
        let mut log = self
            .audit
            .lock()
            .map_err(|_| Error::Approval("the audit log lock is poisoned".into()))?;
        log.append(&event)?;
        Ok(())
    }

    /// Append a record where nothing is released on it (connections): a failure is logged.
    pub fn note(&self, event: AuditEvent) {
        if let Err(e) = self.record(event) {
            tracing::error!("cannot write the audit log: {e}");
        }
    }

    /// Decide whether `task` may run: the site policy first, then the custodian's decision on
    /// its manifest. `Err(Error::Policy)` and `Err(Error::CustodianRejected)` are refusals to
    /// send back; with manual approval an undecided manifest is held, and so is a new
    /// experiment id under a manifest whose approval another experiment has used (one approval,
    /// one run).
    pub fn admit(&self, task: &Task, manifest: &Manifest<'_>) -> Result<Admission> {
        let hash = manifest.hash();
        let first_sight = self
            .seen
            .lock()
            .map(|mut s| s.insert(hash.clone()))
            .unwrap_or(true);
        if first_sight {
            self.record(AuditEvent::ManifestSeen {
                manifest: hash.clone(),
                experiment: task.experiment,
                submitter: task.submitter.clone(),
                name: fedstat_core::text::printable(&task.spec.name).into_owned(),
                model: task.spec.model.as_str().to_owned(),
                dataset: task.spec.dataset.clone(),
                rounds: task.spec.rounds,
            })?;
        }
        self.policy.check_spec(&task.spec).map_err(Error::Policy)?;
        // Before the custodian is asked: a manifest the budget cannot cover is never held.
        self.privacy.admit(task, self.policy.privacy.as_ref())?;
        let decision = self.store.decision(&hash).map_err(|e| {
            tracing::error!("cannot read the custodian's decision on manifest {hash}: {e}");
            Error::Approval(
                "the node cannot read its approval state; its custodian must check the node's log".into(),
            )
        })?;
        if let Some(d) = &decision {
            let new = self
                .applied
                .lock()
                .map(|mut s| s.insert((hash.clone(), d.decided_at.clone())))
                .unwrap_or(true);
            if new {
                self.record(AuditEvent::DecisionApplied {
                    manifest: hash.clone(),
                    decision: match d.decision {
                        Verdict::Approved => Decision::Approved,
                        Verdict::Rejected => Decision::Rejected,
                    },
                    reason: d.reason.clone(),
                    decided_at: d.decided_at.clone(),
                })?;
            }
        }
        let rerun_of = match (&decision, self.policy.approval) {
            (Some(d), ApprovalMode::Manual)
                if d.decision == Verdict::Approved && !self.bindings.is_bound(task.experiment)? =>
            {
                self.bindings
                    .use_approval(&hash, &d.decided_at, task.experiment)?
            }
            _ => None,
        };
        match (decision, self.policy.approval) {
            (Some(d), _) if d.decision == Verdict::Rejected => Err(Error::CustodianRejected(d.reason)),
            (_, ApprovalMode::Auto) => Ok(Admission::Run),
            (Some(_), ApprovalMode::Manual) if rerun_of.is_none() => Ok(Admission::Run),
            (_, ApprovalMode::Manual) => {
                let newly = self.store.hold(&hash, &manifest.canonical_json()).map_err(|e| {
                    tracing::error!("cannot hold manifest {hash}: {e}");
                    Error::Approval("the node cannot record the manifest for its custodian".into())
                })?;
                self.record(AuditEvent::Held {
                    manifest: hash.clone(),
                    experiment: task.experiment,
                    round: task.round,
                    phase: task.phase.to_string(),
                    newly_held: newly,
                    approval_used_by: rerun_of,
                })?;
                if newly {
                    tracing::warn!(
                        "experiment {} (`{}`) is held for the custodian: manifest {hash}{}; see `fedstat-node pending`",
                        task.experiment,
                        fedstat_core::text::printable(&task.spec.name),
                        rerun_of.map_or(String::new(), |e| format!(
                            " (its approval was used by experiment {e}: a new run needs a new approval)"
                        )),
                    );
                }
                Ok(Admission::Held)
            }
        }
    }

    /// Check that `task` is one this node may answer under the manifest it was admitted with
    /// (see [`crate::binding`]); `inputs` digests what the answer is computed from.
    pub fn check_binding(&self, task: &Task, manifest: &str, inputs: &str) -> Result<()> {
        self.bindings
            .check(task, manifest, inputs, self.policy.max_rounds)
    }

    /// Record, before it is sent, that the answer to `task` on `inputs` is given.
    pub fn record_binding(&self, task: &Task, inputs: &str) -> Result<()> {
        self.bindings.record_answer(task, inputs)
    }

    /// The differencing rule: refuse `sets` (the row sets an experiment on `dataset` releases)
    /// if one is a few rows from a set released before; record and audit the new ones.
    pub fn check_release(&self, task: &Task, sets: &[RowSet]) -> Result<()> {
        let added = self
            .ledger
            .check_and_record(&task.spec.dataset, sets, self.policy.min_cell)?;
        if !added.is_empty() {
            self.record(AuditEvent::RowSetsRecorded {
                experiment: task.experiment,
                dataset: fedstat_core::text::printable(&task.spec.dataset).into_owned(),
                sets: added
                    .iter()
                    .map(|(label, rows, digest)| RowSetRecord {
                        set: label.clone(),
                        rows: *rows as u64,
                        sha256: digest.clone(),
                    })
                    .collect(),
            })?;
        }
        Ok(())
    }

    /// Record a task the node did not do: the full reason for the custodian, and the text
    /// that was sent back.
    pub fn record_failure(&self, task: &Task, manifest: &str, error: &Error) {
        let what = TaskNotDone {
            experiment: task.experiment,
            round: task.round,
            phase: task.phase.to_string(),
            manifest: manifest.to_owned(),
            reason: error.to_string(),
            sent: error.public(&task.spec.dataset),
        };
        self.note(match error {
            Error::Policy(_) => AuditEvent::PolicyRefused(what),
            Error::Binding(_) => AuditEvent::TaskRefused(what),
            Error::CustodianRejected(_) => AuditEvent::CustodianRejected(what),
            _ => AuditEvent::TaskFailed(what),
        });
    }

    /// Record an update before it is sent: its row count and the SHA-256 of its bytes.
    pub fn record_update(&self, task: &Task, manifest: &str, rows: u64, bytes: &[u8]) -> Result<()> {
        self.record(AuditEvent::UpdateSent {
            experiment: task.experiment,
            round: task.round,
            manifest: manifest.to_owned(),
            rows,
            bytes: bytes.len() as u64,
            sha256: hex(&Sha256::digest(bytes)),
        })
    }

    /// Charge a differentially private answer to its dataset's privacy budget before it is
    /// sent (see [`crate::ledger`]) and audit it; `Ok(Some)` is the notice for the coordinator
    /// (`NodeMsg::PrivacySpent`), `Ok(None)` an answer the ledger does not charge.
    /// `answer` is the answer's digest: the same answer sent again is not charged again.
    pub fn charge_privacy(&self, task: &Task, manifest: &str, answer: &str) -> Result<Option<NodeMsg>> {
        let budget = self.policy.privacy.as_ref();
        let Some(charged) = self.privacy.charge(task, manifest, budget, answer)? else {
            return Ok(None);
        };
        let cost = task.spec.privacy_cost_per_round();
        self.record(AuditEvent::PrivacyCharge {
            experiment: task.experiment,
            round: task.round,
            phase: task.phase.to_string(),
            manifest: manifest.to_owned(),
            dataset: fedstat_core::text::printable(&task.spec.dataset).into_owned(),
            sampling_rate: cost.map_or(0.0, |c| c.sampling_rate),
            noise_multiplier: cost.map_or(0.0, |c| c.noise_multiplier),
            steps: cost.map_or(0, |c| c.steps),
            delta: charged.delta,
            experiment_epsilon: charged.experiment_epsilon,
            dataset_epsilon: charged.dataset_epsilon,
            repeated: charged.repeated,
        })?;
        let show = budget.is_some_and(|b| b.show_remaining);
        Ok(Some(NodeMsg::PrivacySpent {
            experiment: task.experiment,
            round: task.round,
            epsilon: charged.experiment_epsilon_at_spec_delta,
            remaining: charged.remaining.filter(|_| show),
        }))
    }

    /// Record a statistics or evaluation answer before it is sent.
    pub fn record_answer(&self, task: &Task, manifest: &str) -> Result<()> {
        self.record(AuditEvent::AnswerReleased {
            experiment: task.experiment,
            round: task.round,
            kind: task.phase.to_string(),
            manifest: manifest.to_owned(),
        })
    }
}

/// `fedstat-node audit verify`: check a log; `Err(Error::Tampered)` names the first bad record.
pub fn verify_audit(path: &std::path::Path) -> Result<String> {
    let report = audit::verify(path)?;
    if report.is_intact() {
        Ok(format!("audit log {}: {report}", path.display()))
    } else {
        Err(Error::Tampered {
            path: path.to_owned(),
            report: report.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstat_proto::wire::Phase;
    use serde_json::Value;
    use std::path::Path;

    fn config(dir: &Path, policy: &str) -> NodeConfig {
        let text = format!(
            "coordinator = \"c:1\"\nserver_name = \"localhost\"\n[tls]\nca_cert = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n.key\"\n\
             [datasets]\ncps1988 = \"x.csv\"\n[policy]\nallowed_targets = [\"wage\"]\n\
             allowed_features = [\"*\"]\n{policy}"
        );
        NodeConfig::from_toml_str(&text, dir, "node.toml").expect("config")
    }

    fn task(rounds: u32) -> Task {
        let mut spec = crate::testing::example_spec();
        spec.rounds = rounds;
        crate::testing::task(spec, 3, 0, Phase::Stats)
    }

    fn kinds(cfg: &NodeConfig) -> Vec<String> {
        std::fs::read_to_string(&cfg.audit_log)
            .expect("log")
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).expect("json")["kind"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn manual_approval_holds_until_approved_and_rejection_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), "approval = \"manual\"");
        let gov = Governance::open(&cfg, "ons").expect("open");
        let t = task(20);
        let m = Manifest::new(&t.spec, &t.submitter);
        assert_eq!(gov.admit(&t, &m).expect("admit"), Admission::Held);
        assert_eq!(gov.admit(&t, &m).expect("admit"), Admission::Held);
        let store = ApprovalStore::new(&cfg.state_dir);
        assert_eq!(store.pending().expect("pending").len(), 1);
        store.approve(&m.hash()).expect("approve");
        assert_eq!(gov.admit(&t, &m).expect("admit"), Admission::Run);
        gov.check_binding(&t, &m.hash(), "inputs").expect("bind");

        // The same manifest under a new experiment id is a new run: held again, and only a
        // new approval admits it.
        let mut rerun = task(20);
        rerun.experiment = 4;
        assert_eq!(gov.admit(&rerun, &m).expect("admit"), Admission::Held);
        assert_eq!(gov.admit(&t, &m).expect("admit"), Admission::Run);
        store.approve(&m.hash()).expect("approve again");
        assert_eq!(gov.admit(&rerun, &m).expect("admit"), Admission::Run);

        // Any change is a new manifest: held again; rejected -> refused with the reason.
        let t2 = task(21);
        let m2 = Manifest::new(&t2.spec, &t2.submitter);
        assert_eq!(gov.admit(&t2, &m2).expect("admit"), Admission::Held);
        store.reject(&m2.hash(), "not this quarter").expect("reject");
        let err = gov.admit(&t2, &m2).expect_err("rejected");
        assert_eq!(
            err.to_string(),
            "rejected by the data custodian: not this quarter"
        );
        gov.record_failure(&t2, &m2.hash(), &err);

        assert_eq!(
            kinds(&cfg),
            [
                "node_started",
                "manifest_seen",
                "held",
                "held",
                "decision_applied",
                "held",
                "decision_applied",
                "manifest_seen",
                "held",
                "decision_applied",
                "custodian_rejected"
            ]
        );
        assert!(verify_audit(&cfg.audit_log).is_ok());
    }

    #[test]
    fn auto_approval_runs_what_the_policy_allows_and_refuses_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), "max_rounds = 20");
        let gov = Governance::open(&cfg, "ons").expect("open");
        let t = task(20);
        assert_eq!(
            gov.admit(&t, &Manifest::new(&t.spec, &t.submitter))
                .expect("admit"),
            Admission::Run
        );
        let t = task(21);
        let err = gov
            .admit(&t, &Manifest::new(&t.spec, &t.submitter))
            .expect_err("refused");
        assert!(
            err.to_string().starts_with("refused by site policy: 21 rounds"),
            "{err}"
        );
        gov.record_update(&t, "h", 100, b"bytes").expect("record");
        let log = std::fs::read_to_string(&cfg.audit_log).expect("log");
        assert!(log.contains(&hex(&Sha256::digest(b"bytes"))), "{log}");
        assert!(ApprovalStore::new(&cfg.state_dir)
            .pending()
            .expect("list")
            .is_empty());
    }

    #[test]
    fn verify_audit_names_tampering() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), "");
        let gov = Governance::open(&cfg, "ons").expect("open");
        gov.note(AuditEvent::ConnectFailed {
            coordinator: "c:1".into(),
            reason: "test".into(),
        });
        drop(gov);
        let text = std::fs::read_to_string(&cfg.audit_log).expect("log");
        std::fs::write(&cfg.audit_log, text.replace("c:1", "c:2")).expect("edit");
        let err = verify_audit(&cfg.audit_log).expect_err("tampered").to_string();
        assert!(err.contains("TAMPERED: line 2 (seq 2)"), "{err}");
    }
}
