//! The privacy-budget ledger: what record-level differential privacy each dataset of this node
//! has spent, across experiments and restarts, against the custodian's budget
//! (`[policy.privacy]`, [`crate::policy::PrivacyBudget`]).
//!
//! - One durable file (`privacy_ledger` in the node config, default `privacy-ledger.json` in the
//!   state folder), replaced atomically on every charge: per dataset, every charge {experiment,
//!   manifest, round, phase, cost, time}. The node process is its only writer.
//! - A dataset's spend is the RDP composition of all its charges (their RDP vectors added on the
//!   accountant's default orders, [`fedstat_core::accountant`]), converted to ε at the dataset's δ.
//! - **Admission** ([`PrivacyLedger::admit`]): a task of a differentially private experiment
//!   runs only if the whole experiment (its cost per round × its most rounds), composed with what
//!   *other* experiments spent on the dataset, stays within the budget.
//! - **Charge** ([`PrivacyLedger::charge`]): every noised answer (the round's release: training
//!   for DP-SGD, the GLM sums, the table cells) is charged durably *before* it leaves the node,
//!   and refused if the charge would take the dataset over its budget. A retried round that the
//!   node answers with the same noisy answer (its memory of answers, while it runs) is not
//!   charged again: sending a vector twice releases nothing new. After a restart the answer
//!   carries fresh noise, a new release, and is charged (the charge holds the answer's digest).
//! - An experiment without `[privacy]` is never charged: it releases exact sums, which the
//!   disclosure rules protect, not differential privacy. Neither is a data-free `echo`.
//! - A damaged ledger is never reset: the node refuses differentially private experiments
//!   (every other experiment still runs) until the custodian restores the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fedstat_core::accountant::{AccountantError, CostExt, Rdp};
use fedstat_core::files::{atomic_write, Access};
use fedstat_core::spec::{ExperimentSpec, Method, ModelKind};
use fedstat_proto::privacy::PrivacyCost;
use fedstat_proto::wire::{ExperimentId, Phase, Task};
use serde::{Deserialize, Serialize};

use crate::policy::{Budget, PrivacyBudget, Refusal, DEFAULT_BUDGET_DELTA};
use crate::{Error, Result};

/// Version of the ledger file's format.
const FORMAT_VERSION: u32 = 1;

/// The ledger cannot be used; no differentially private answer is given until it can.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("privacy ledger {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "privacy ledger {path} is damaged ({problem}); the node refuses differentially private \
         experiments until its custodian restores the file from a backup (deleting it would \
         reset every dataset's budget)"
    )]
    Damaged { path: PathBuf, problem: String },
    #[error("privacy ledger {path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: fedstat_core::Error,
    },
    #[error("privacy ledger: the lock is poisoned")]
    Poisoned,
}

/// One charge: one noised release of one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Charge {
    pub experiment: ExperimentId,
    /// The manifest hash the answer was given under.
    pub manifest: String,
    pub round: u32,
    pub phase: String,
    pub cost: PrivacyCost,
    /// UTC, RFC 3339.
    pub at: String,
    /// SHA-256 of the released answer: the same answer sent again (a retry the node answers
    /// from its memory of noisy answers) releases nothing new and is not charged again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFile {
    version: u32,
    /// Dataset name -> its charges, oldest first.
    datasets: BTreeMap<String, Vec<Charge>>,
}

/// What a charge left: ε spent at the dataset's δ by the experiment and by the dataset, ε of
/// the experiment at its own δ, and the budget left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Charged {
    pub experiment_epsilon: f64,
    pub dataset_epsilon: f64,
    /// The experiment's spend at the δ of its spec (what the researcher is told).
    pub experiment_epsilon_at_spec_delta: f64,
    /// The dataset's budget left, when it has one.
    pub remaining: Option<f64>,
    pub delta: f64,
    /// The answer was charged before (the same noisy answer sent again): nothing was added.
    pub repeated: bool,
}

/// One dataset's spend, for `fedstat-node budget`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetSpend {
    pub dataset: String,
    /// The budget's ε, when the policy sets one.
    pub budget_epsilon: Option<f64>,
    /// The δ spend is measured at (the budget's, or the default 1e-5 without a budget).
    pub delta: f64,
    pub spent_epsilon: f64,
    pub remaining_epsilon: Option<f64>,
    pub charges: usize,
    pub experiments: Vec<ExperimentSpend>,
}

/// One experiment's spend on a dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentSpend {
    pub experiment: ExperimentId,
    pub spent_epsilon: f64,
    pub charges: usize,
}

/// The record-level privacy cost of one round of `spec`, or `None` when the node charges
/// nothing for it (no `[privacy]`, or a data-free model).
pub fn cost_per_round(spec: &ExperimentSpec) -> Option<PrivacyCost> {
    if !spec.uses_data() {
        return None;
    }
    spec.privacy_cost_per_round()
}

/// Whether an answer to `phase` is the noised release of its round, which the ledger charges:
/// the update (DP-SGD) for federated averaging, the sums of an exact GLM, a table's cells.
/// Statistics and evaluation answers are not charged here: the experiment's cost per round
/// (`ExperimentSpec::privacy_cost_per_round`) counts one release per round.
pub fn charged_phase(spec: &ExperimentSpec, phase: Phase) -> bool {
    if cost_per_round(spec).is_none() {
        return false;
    }
    match phase {
        Phase::Train => spec.method == Method::FedAvg,
        Phase::Glm => spec.is_exact_glm(),
        Phase::Table => spec.model == ModelKind::Table,
        Phase::Stats | Phase::Evaluate => false,
    }
}

/// The pure decision: may `planned` be spent on top of `spent` under `budget`? `Ok` is ε
/// after, `Err` ε it would reach.
pub fn decide(spent: &Rdp, planned: &Rdp, budget: Budget) -> Result<f64, f64> {
    let after = spent.clone() + planned.clone();
    // The δ of a budget is checked when the policy is loaded; an error here means +∞.
    let eps = after.epsilon(budget.delta).map_or(f64::INFINITY, |(e, _)| e);
    if eps <= budget.epsilon {
        Ok(eps)
    } else {
        Err(eps)
    }
}

fn rdp_of(cost: &PrivacyCost) -> Result<Rdp> {
    cost.rdp()
        .map_err(|e: AccountantError| Error::InvalidSpec(fedstat_core::Error::Accountant(e)))
}

fn epsilon(rdp: &Rdp, delta: f64) -> f64 {
    rdp.epsilon(delta).map_or(f64::INFINITY, |(e, _)| e)
}

/// The node's privacy-budget ledger file.
#[derive(Debug)]
pub struct PrivacyLedger {
    path: PathBuf,
    /// Check then record is one step within the node process.
    lock: Mutex<()>,
}

impl PrivacyLedger {
    pub fn new(path: &Path) -> Self {
        PrivacyLedger {
            path: path.to_owned(),
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<LedgerFile, LedgerError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LedgerFile {
                    version: FORMAT_VERSION,
                    datasets: BTreeMap::new(),
                })
            }
            Err(source) => {
                return Err(LedgerError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let damaged = |problem: String| LedgerError::Damaged {
            path: self.path.clone(),
            problem,
        };
        let file: LedgerFile = serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
        if file.version != FORMAT_VERSION {
            return Err(damaged(format!("unknown format version {}", file.version)));
        }
        for charges in file.datasets.values() {
            if let Some(c) = charges.iter().find(|c| c.cost.check().is_err()) {
                return Err(damaged(format!(
                    "a charge of experiment {} has an invalid cost",
                    c.experiment
                )));
            }
        }
        Ok(file)
    }

    fn write(&self, file: &LedgerFile) -> Result<(), LedgerError> {
        let write = |source| LedgerError::Write {
            path: self.path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(file)
            .map_err(|e| write(fedstat_core::Error::Model(format!("cannot encode: {e}"))))?;
        atomic_write(&self.path, &bytes, Access::OwnerOnly).map_err(write)
    }

    fn guard(&self) -> Result<std::sync::MutexGuard<'_, ()>, LedgerError> {
        self.lock.lock().map_err(|_| LedgerError::Poisoned)
    }

    /// RDP of the charges of `dataset`, all of them or those of one experiment or the others.
    fn composed(file: &LedgerFile, dataset: &str, keep: impl Fn(&Charge) -> bool) -> Result<Rdp> {
        let mut total = Rdp::zero();
        for c in file
            .datasets
            .get(dataset)
            .into_iter()
            .flatten()
            .filter(|c| keep(c))
        {
            total += rdp_of(&c.cost)?;
        }
        Ok(total)
    }

    /// Admission of a task of a differentially private experiment: refuse
    /// (`Err(Error::Policy(Refusal::PrivacyBudget))`) if the whole experiment, composed with
    /// what other experiments spent on the dataset, would exceed its budget. No budget: admitted.
    pub fn admit(&self, task: &Task, budget: Option<&PrivacyBudget>) -> Result<()> {
        let spec = &task.spec;
        let Some(cost) = cost_per_round(spec) else {
            return Ok(());
        };
        let whole = rdp_of(&cost)?.times(u64::from(spec.max_rounds()));
        let file = {
            let _g = self.guard()?;
            self.read()?
        };
        let Some(budget) = budget.map(|b| b.of(&spec.dataset)) else {
            return Ok(());
        };
        let others = Self::composed(&file, &spec.dataset, |c| c.experiment != task.experiment)?;
        match decide(&others, &whole, budget) {
            Ok(_) => Ok(()),
            Err(would) => {
                tracing::warn!(
                    experiment = task.experiment,
                    "privacy budget of dataset `{}`: the experiment ({} rounds of {} steps, q = {}, \
                     sigma = {}) would bring it to epsilon {would:.4} at delta {}, above its budget \
                     of {} (other experiments spent {:.4}); refused",
                    fedstat_core::text::printable(&spec.dataset),
                    spec.max_rounds(),
                    cost.steps,
                    cost.sampling_rate,
                    cost.noise_multiplier,
                    budget.delta,
                    budget.epsilon,
                    epsilon(&others, budget.delta),
                );
                Err(Error::Policy(Refusal::PrivacyBudget))
            }
        }
    }

    /// Charge the answer to `task` (a charged phase of a differentially private experiment)
    /// before it is sent: refused if it would take the dataset over its budget, otherwise
    /// recorded durably. `Ok(None)`: nothing to charge.
    pub fn charge(
        &self,
        task: &Task,
        manifest: &str,
        budget: Option<&PrivacyBudget>,
        answer: &str,
    ) -> Result<Option<Charged>> {
        let spec = &task.spec;
        if !charged_phase(spec, task.phase) {
            return Ok(None);
        }
        let Some(cost) = cost_per_round(spec) else {
            return Ok(None);
        };
        let this = rdp_of(&cost)?;
        let _g = self.guard()?;
        let mut file = self.read()?;
        let dataset_budget = budget.map(|b| b.of(&spec.dataset));
        let delta = dataset_budget.map_or(DEFAULT_BUDGET_DELTA, |b| b.delta);
        let spent = Self::composed(&file, &spec.dataset, |_| true)?;
        let phase = task.phase.to_string();
        let repeated = file.datasets.get(&spec.dataset).is_some_and(|charges| {
            charges.iter().any(|c| {
                c.experiment == task.experiment
                    && c.round == task.round
                    && c.phase == phase
                    && c.answer.as_deref() == Some(answer)
            })
        });
        if repeated {
            // Releasing the same vector again is post-processing of the first release.
            let dataset_epsilon = epsilon(&spent, delta);
            return Self::charged(&file, task, dataset_budget, delta, dataset_epsilon, true).map(Some);
        }
        let dataset_epsilon = match dataset_budget {
            Some(b) => decide(&spent, &this, b).map_err(|would| {
                tracing::warn!(
                    experiment = task.experiment,
                    round = task.round,
                    "privacy budget of dataset `{}`: this answer would bring it to epsilon \
                     {would:.4} at delta {}, above its budget of {}; not sent",
                    fedstat_core::text::printable(&spec.dataset),
                    b.delta,
                    b.epsilon
                );
                Error::Policy(Refusal::PrivacyBudget)
            })?,
            None => epsilon(&(spent.clone() + this.clone()), delta),
        };
        file.datasets
            .entry(spec.dataset.clone())
            .or_default()
            .push(Charge {
                experiment: task.experiment,
                manifest: manifest.to_owned(),
                round: task.round,
                phase,
                cost,
                at: fedstat_core::audit::now_rfc3339(),
                answer: Some(answer.to_owned()),
            });
        self.write(&file)?;
        Self::charged(&file, task, dataset_budget, delta, dataset_epsilon, false).map(Some)
    }

    /// The figures of a charge, from the ledger as it stands after it.
    fn charged(
        file: &LedgerFile,
        task: &Task,
        dataset_budget: Option<Budget>,
        delta: f64,
        dataset_epsilon: f64,
        repeated: bool,
    ) -> Result<Charged> {
        let spec = &task.spec;
        let mine = Self::composed(file, &spec.dataset, |c| c.experiment == task.experiment)?;
        let spec_delta = spec.privacy.as_ref().map_or(delta, |p| p.delta);
        Ok(Charged {
            experiment_epsilon: epsilon(&mine, delta),
            dataset_epsilon,
            experiment_epsilon_at_spec_delta: mine
                .epsilon(spec_delta)
                .map_or(epsilon(&mine, delta), |(e, _)| e),
            remaining: dataset_budget.map(|b| (b.epsilon - dataset_epsilon).max(0.0)),
            delta,
            repeated,
        })
    }

    /// Spend per dataset (those in `offered` and any the ledger holds), for
    /// `fedstat-node budget`.
    pub fn report(&self, offered: &[String], budget: Option<&PrivacyBudget>) -> Result<Vec<DatasetSpend>> {
        let file = {
            let _g = self.guard()?;
            self.read()?
        };
        let mut names: Vec<String> = offered.to_vec();
        names.extend(file.datasets.keys().filter(|k| !offered.contains(k)).cloned());
        let mut out = Vec::new();
        for dataset in names {
            let b = budget.map(|b| b.of(&dataset));
            let delta = b.map_or(DEFAULT_BUDGET_DELTA, |b| b.delta);
            let total = Self::composed(&file, &dataset, |_| true)?;
            let spent = epsilon(&total, delta);
            let charges = file.datasets.get(&dataset).map_or(&[][..], |c| &c[..]);
            let mut ids: Vec<ExperimentId> = charges.iter().map(|c| c.experiment).collect();
            ids.sort_unstable();
            ids.dedup();
            let mut experiments = Vec::new();
            for id in ids {
                let rdp = Self::composed(&file, &dataset, |c| c.experiment == id)?;
                experiments.push(ExperimentSpend {
                    experiment: id,
                    spent_epsilon: epsilon(&rdp, delta),
                    charges: charges.iter().filter(|c| c.experiment == id).count(),
                });
            }
            out.push(DatasetSpend {
                budget_epsilon: b.map(|b| b.epsilon),
                delta,
                spent_epsilon: spent,
                remaining_epsilon: b.map(|b| (b.epsilon - spent).max(0.0)),
                charges: charges.len(),
                experiments,
                dataset,
            });
        }
        Ok(out)
    }
}

/// `fedstat-node budget`: one block of lines per dataset.
pub fn describe(spend: &[DatasetSpend]) -> Vec<String> {
    let mut out = Vec::new();
    for d in spend {
        let name = fedstat_core::text::printable(&d.dataset);
        match (d.budget_epsilon, d.remaining_epsilon) {
            (Some(b), Some(r)) => out.push(format!(
                "dataset `{name}`: budget epsilon {b} at delta {}; spent {:.6}; remaining {r:.6}; {} charges",
                d.delta, d.spent_epsilon, d.charges
            )),
            _ => out.push(format!(
                "dataset `{name}`: no budget (policy.privacy); spent {:.6} at delta {}; {} charges",
                d.spent_epsilon, d.delta, d.charges
            )),
        }
        for e in &d.experiments {
            out.push(format!(
                "  experiment {}: spent {:.6} ({} charges)",
                e.experiment, e.spent_epsilon, e.charges
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstat_proto::privacy::PrivacySpec;

    /// A fresh answer's digest: every call a new noisy answer.
    fn fresh() -> String {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        format!(
            "answer-{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }

    /// The same noisy answer sent again (a retry answered from the node's memory) is charged
    /// once; a new answer to the same round (fresh noise after a restart) is charged again.
    #[test]
    fn the_same_answer_sent_again_is_charged_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = PrivacyLedger::new(&dir.path().join("ledger.json"));
        let b = budget(100.0);
        let t = task(7, 3, 1, Phase::Train);
        let first = ledger
            .charge(&t, "m", Some(&b), "same")
            .expect("charge")
            .expect("charged");
        assert!(!first.repeated);
        let again = ledger
            .charge(&t, "m", Some(&b), "same")
            .expect("charge")
            .expect("charged");
        assert!(again.repeated);
        assert_eq!(again.experiment_epsilon, first.experiment_epsilon);
        assert_eq!(again.dataset_epsilon, first.dataset_epsilon);
        let report = ledger.report(&["cps1988".into()], Some(&b)).expect("report");
        assert_eq!(report[0].experiments[0].charges, 1);
        let fresh = ledger
            .charge(&t, "m", Some(&b), "other")
            .expect("charge")
            .expect("charged");
        assert!(!fresh.repeated && fresh.experiment_epsilon > first.experiment_epsilon);
        let report = ledger.report(&["cps1988".into()], Some(&b)).expect("report");
        assert_eq!(report[0].experiments[0].charges, 2);
    }

    fn budget(epsilon: f64) -> PrivacyBudget {
        PrivacyBudget {
            default: Budget { epsilon, delta: 1e-5 },
            datasets: BTreeMap::new(),
            show_remaining: true,
        }
    }

    /// A DP-SGD logistic regression: `rounds` rounds of 1/q steps at σ.
    fn task(experiment: ExperimentId, rounds: u32, round: u32, phase: Phase) -> Task {
        let mut spec = crate::testing::example_spec();
        spec.rounds = rounds;
        spec.training.local_epochs = 1;
        spec.privacy = Some(PrivacySpec {
            noise_multiplier: 1.1,
            delta: 1e-5,
            clip_norm: Some(1.0),
            sampling_rate: Some(0.01),
            bounds: Vec::new(),
            node_level: None,
        });
        crate::testing::task(spec, experiment, round, phase)
    }

    fn eps_of_rounds(rounds: u64) -> f64 {
        let cost = PrivacyCost {
            sampling_rate: 0.01,
            noise_multiplier: 1.1,
            steps: 100,
        };
        cost.rdp()
            .expect("rdp")
            .times(rounds)
            .epsilon(1e-5)
            .expect("eps")
            .0
    }

    #[test]
    fn decide_is_the_composed_epsilon_against_the_budget() {
        let cost = PrivacyCost {
            sampling_rate: 1.0,
            noise_multiplier: 2.0,
            steps: 1,
        };
        let one = cost.rdp().expect("rdp");
        let b = Budget {
            epsilon: 5.0,
            delta: 1e-5,
        };
        let e1 = decide(&Rdp::zero(), &one, b).expect("fits");
        assert_eq!(e1, one.epsilon(1e-5).expect("eps").0);
        let e2 = decide(&one, &one, b).expect("fits");
        assert!(e2 > e1 && e2 < 2.0 * e1, "{e1} {e2}");
        assert!(decide(&one.times(5), &one, b).is_err());
    }

    #[test]
    fn charges_compose_refuse_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("privacy-ledger.json");
        // A budget that fits 10 rounds but not 11.
        let limit = (eps_of_rounds(10) + eps_of_rounds(11)) / 2.0;
        let b = budget(limit);
        let ledger = PrivacyLedger::new(&path);
        let a = task(1, 6, 0, Phase::Stats);
        ledger.admit(&a, Some(&b)).expect("6 rounds fit");
        assert_eq!(ledger.charge(&a, "m1", Some(&b), &fresh()).expect("stats"), None);
        let mut last = None;
        for r in 1..=6 {
            let t = task(1, 6, r, Phase::Train);
            last = ledger.charge(&t, "m1", Some(&b), &fresh()).expect("charge");
            // Evaluation is not charged.
            assert_eq!(
                ledger
                    .charge(&task(1, 6, r, Phase::Evaluate), "m1", Some(&b), &fresh())
                    .expect("eval"),
                None
            );
        }
        let last = last.expect("charged");
        assert!((last.dataset_epsilon - eps_of_rounds(6)).abs() < 1e-9, "{last:?}");
        assert_eq!(last.experiment_epsilon, last.dataset_epsilon);
        assert!((last.remaining.expect("budget") - (limit - eps_of_rounds(6))).abs() < 1e-9);

        // Reopened: the spend is still there. Five more rounds would exceed; four fit.
        let ledger = PrivacyLedger::new(&path);
        let err = ledger
            .admit(&task(2, 5, 0, Phase::Stats), Some(&b))
            .expect_err("over");
        assert!(matches!(err, Error::Policy(Refusal::PrivacyBudget)), "{err}");
        assert_eq!(
            err.public("cps1988"),
            "refused by site policy: privacy budget: the experiment would exceed this dataset's \
             budget (policy.privacy.epsilon)"
        );
        ledger
            .admit(&task(2, 4, 0, Phase::Stats), Some(&b))
            .expect("4 fit");
        // The running experiment is not counted against itself.
        ledger
            .admit(&task(1, 6, 3, Phase::Train), Some(&b))
            .expect("own spend excluded");
        // A larger budget for this dataset only.
        let mut roomy = b.clone();
        roomy.datasets.insert(
            "cps1988".into(),
            Budget {
                epsilon: 100.0,
                delta: 1e-5,
            },
        );
        ledger
            .admit(&task(2, 5, 0, Phase::Stats), Some(&roomy))
            .expect("dataset override");
        // No budget: admitted, and still charged.
        ledger
            .admit(&task(2, 50, 0, Phase::Stats), None)
            .expect("no budget");

        // Charges are checked too: four retried rounds fit, the fifth does not and leaves no trace.
        for _ in 0..4 {
            ledger
                .charge(&task(3, 4, 1, Phase::Train), "m3", Some(&b), &fresh())
                .expect("fits");
        }
        let before = std::fs::read(&path).expect("read");
        let err = ledger
            .charge(&task(3, 4, 1, Phase::Train), "m3", Some(&b), &fresh())
            .expect_err("over");
        assert!(matches!(err, Error::Policy(Refusal::PrivacyBudget)), "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), before);

        let report = PrivacyLedger::new(&path)
            .report(&["cps1988".into(), "lfs".into()], Some(&b))
            .expect("report");
        assert_eq!(report.len(), 2);
        assert_eq!(report[0].charges, 10);
        assert_eq!(report[0].experiments.len(), 2);
        assert!((report[0].spent_epsilon - eps_of_rounds(10)).abs() < 1e-9);
        assert!((report[0].experiments[1].spent_epsilon - eps_of_rounds(4)).abs() < 1e-9);
        assert_eq!(report[1].charges, 0);
        assert_eq!(report[1].spent_epsilon, 0.0);
        let text = describe(&report).join("\n");
        assert!(text.contains("dataset `cps1988`: budget epsilon"), "{text}");
        assert!(text.contains("experiment 3: spent"), "{text}");
    }

    #[test]
    fn experiments_without_privacy_or_data_are_not_charged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = PrivacyLedger::new(&dir.path().join("l.json"));
        let mut plain = task(1, 5, 1, Phase::Train);
        plain.spec.privacy = None;
        ledger.admit(&plain, Some(&budget(0.001))).expect("not DP");
        assert_eq!(
            ledger
                .charge(&plain, "m", Some(&budget(0.001)), &fresh())
                .expect("charge"),
            None
        );
        let echo: ExperimentSpec =
            toml::from_str(include_str!("../../configs/experiment-echo.toml")).expect("echo");
        assert!(!charged_phase(&echo, Phase::Train));
        assert!(!dir.path().join("l.json").exists());
    }

    #[test]
    fn a_damaged_ledger_refuses_and_is_never_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("privacy-ledger.json");
        let ledger = PrivacyLedger::new(&path);
        ledger
            .charge(&task(1, 2, 1, Phase::Train), "m", Some(&budget(10.0)), &fresh())
            .expect("charge");
        let good = std::fs::read_to_string(&path).expect("read");
        for bad in [
            good[..good.len() / 2].to_owned(),
            good.replace("\"version\": 1", "\"version\": 9"),
            good.replace("\"noise_multiplier\": 1.1", "\"noise_multiplier\": -1.0"),
        ] {
            std::fs::write(&path, &bad).expect("damage");
            let err = ledger
                .admit(&task(2, 1, 0, Phase::Stats), Some(&budget(10.0)))
                .expect_err("damaged");
            let text = err.to_string();
            assert!(
                matches!(err, Error::PrivacyLedger(LedgerError::Damaged { .. })),
                "{text}"
            );
            assert!(text.contains("restores the file"), "{text}");
            assert_eq!(
                err.public("cps1988"),
                "the node cannot use its privacy ledger; its custodian must check the node's log"
            );
            assert!(ledger
                .charge(&task(1, 2, 2, Phase::Train), "m", Some(&budget(10.0)), &fresh())
                .is_err());
            assert!(ledger.report(&[], None).is_err());
            // Nothing was rewritten over the damaged file.
            assert_eq!(std::fs::read_to_string(&path).expect("read"), bad);
        }
        // An experiment without [privacy] still runs.
        let mut plain = task(3, 1, 0, Phase::Stats);
        plain.spec.privacy = None;
        ledger.admit(&plain, Some(&budget(10.0))).expect("not DP");
    }
}
