//! The engine: one experiment's steps, each a query to the nodes whose answers are summed.
//!
//! It is algorithm-agnostic. An [`Algorithm`] says what to ask next (a [`Step`]) and what the
//! pooled answers mean; the engine owns node selection, quorum, deadlines, retries, the
//! approval hand-off (held tasks), events, durable progress and the exact order-independent
//! aggregate ([`crate::aggregate`]). It does no I/O and reads no clock: events and the current
//! time come in as arguments (`handle_*`), and the caller drains what to send
//! (`poll_transmit`), what to record (`poll_progress`) and when to wake it (`poll_timeout`).
//! That is what lets tests drive a whole simulated federation with a fake clock.
//!
//! Every step works the same way: select the connected nodes that can take part, send each a
//! task, fold answers until every selected node answered (or failed, or left) or the deadline
//! passes. A step that ends with fewer than `min_nodes` good answers is tried again; a round's
//! steps share `max_round_retries` retries, then the experiment fails. Every step needs the
//! quorum: pooled figures from fewer offices than the experiment asked for could describe one
//! office alone. Answers fold exactly, so no result depends on arrival order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aggregate::{self, Aggregator, Values};
use crate::algorithm::{self, Algorithm, Answer, Checkpoint, Step};
use crate::proto::privacy::{NodeSpend, PrivacyView};
use crate::proto::secure::{MaskedHeader, SecureDown, SecureRound, SecureTask, SecureUp};
use crate::secure::{Advance, SecureRun, Stage};
use crate::spec::ExperimentSpec;
use crate::sums::Standardization;
use crate::wire::{
    AnswerHeader, EventRecord, ExperimentId, ExperimentState, ExperimentStatus, Phase, RoundRecord, Task,
    TensorMeta,
};

pub use crate::algorithm::Progress;

/// Events kept per experiment for `status` and `watch`; older ones are dropped.
const MAX_EVENTS: usize = 500;

/// Something the shell must send.
#[derive(Debug, Clone)]
pub enum Transmit {
    /// A task for a node, followed on its stream by `model` when present.
    Task {
        to: String,
        task: Box<Task>,
        model: Option<Arc<Vec<u8>>>,
    },
    /// A message of secure aggregation for a node's control stream.
    Secure { to: String, msg: SecureDown },
    /// Tell a node its answer was not used, and why.
    Reject {
        to: String,
        experiment: ExperimentId,
        round: u32,
        reason: String,
    },
}

/// The step in progress: who was asked, who answered, and the aggregate so far.
#[derive(Debug)]
struct StepRun {
    step: Step,
    selected: BTreeSet<String>,
    answered: BTreeSet<String>,
    failed: BTreeMap<String, String>,
    deadline: Instant,
    agg: Box<dyn Aggregator>,
    /// The exchanges of a secure step (`None`: answers come in clear and fold into `agg`).
    secure: Option<SecureRun>,
}

impl StepRun {
    fn outstanding(&self) -> impl Iterator<Item = &String> {
        self.selected
            .iter()
            .filter(|n| !self.answered.contains(*n) && !self.failed.contains_key(*n))
    }

    fn expects(&self, node: &str) -> bool {
        if self.secure.is_some() {
            // A secure step needs its members through four exchanges, not one answer.
            return self.selected.contains(node) && !self.failed.contains_key(node);
        }
        self.selected.contains(node) && !self.answered.contains(node) && !self.failed.contains_key(node)
    }

    /// Whether anyone can still answer the step (its current exchange, if secure).
    fn waiting(&self) -> bool {
        match &self.secure {
            Some(s) => s.waiting(&self.failed).next().is_some(),
            None => self.outstanding().next().is_some(),
        }
    }
}

/// Why an answer was not accepted; the shell logs it and tells the node. The variants are the
/// contract ([`Rejection::is_stale`] matches on them); the text exists only in `Display`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The answer is for `round` of `phase`, which is not open. A training answer is an
    /// update; for updates `open` is the training round that is open, if any.
    Late {
        phase: Phase,
        round: u32,
        open: Option<u32>,
    },
    /// The node already answered (or failed) `round` of `phase`.
    Duplicate { phase: Phase, round: u32 },
    /// The node was not asked for `round` (it joined after the phase started).
    NotSelected { round: u32 },
    /// An update for an experiment the coordinator does not hold (ended and forgotten, or
    /// never existed).
    UnknownExperiment { experiment: ExperimentId },
    /// An answer announced a tensor, side figures or weight other than the step's.
    WrongShape { got: TensorMeta, expected: TensorMeta },
    /// An answer to a plain sum carried a weight other than 1, or an update weight 0.
    WrongWeight { weight: u64 },
    /// The answer carries a number of side figures other than the step's.
    WrongAux { got: usize, expected: usize },
    /// The answer failed validation or broke off; the reason carries no data values.
    Invalid(String),
}

impl Rejection {
    /// Late, duplicate or unrequested: the node is not at fault for the round it is in.
    pub fn is_stale(&self) -> bool {
        matches!(
            self,
            Rejection::Late { .. }
                | Rejection::Duplicate { .. }
                | Rejection::NotSelected { .. }
                | Rejection::UnknownExperiment { .. }
        )
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Late {
                phase: Phase::Train,
                round,
                open: Some(open),
            } => write!(f, "late update for round {round}: round {open} is open"),
            Rejection::Late {
                phase: Phase::Train,
                round,
                open: None,
            } => write!(
                f,
                "late update for round {round}: the experiment is not training now"
            ),
            Rejection::Late { phase, round, .. } => write!(f, "late {phase} answer for round {round}"),
            Rejection::Duplicate {
                phase: Phase::Train,
                round,
            } => write!(f, "duplicate update for round {round}"),
            Rejection::Duplicate { phase, round } => write!(f, "duplicate {phase} answer for round {round}"),
            Rejection::NotSelected { round } => write!(f, "node was not selected for round {round}"),
            Rejection::UnknownExperiment { experiment } => {
                write!(f, "late update: unknown experiment {experiment}")
            }
            Rejection::WrongShape { got, expected } => write!(
                f,
                "wrong shape: {} {:?} parameters, the model has {} {:?}",
                got.len, got.dtype, expected.len, expected.dtype
            ),
            Rejection::WrongWeight { weight } => write!(f, "wrong weight {weight} for this step"),
            Rejection::WrongAux { got, expected } => {
                write!(f, "{got} side figures, the step has {expected}")
            }
            Rejection::Invalid(reason) => f.write_str(reason),
        }
    }
}

/// Why an experiment failed; `status` shows its `Display`, the one place it becomes text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A step missed its quorum at every try.
    Quorum {
        round: u32,
        phase: Phase,
        answered: usize,
        needed: u32,
        timeout_secs: u64,
        retries: u32,
    },
    /// The answers could not be pooled (nothing to pool, or an aggregate out of range).
    Pooling { round: u32, reason: String },
    /// The algorithm could not use the pooled result (e.g. a column constant over the pooled
    /// rows); its reason names the rule and the column, never a value.
    Algorithm(String),
    /// Stopped by the coordinator for a reason outside the protocol (its store or audit log
    /// failed); it resumes after its last recorded round when the coordinator restarts.
    Stopped(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Quorum {
                round,
                phase,
                answered,
                needed,
                timeout_secs,
                retries,
            } => write!(
                f,
                "round {round}: {answered} of the {needed} answers needed in {phase} arrived within \
                 {timeout_secs} s, after {retries} retries"
            ),
            Failure::Pooling { round, reason } => write!(f, "round {round}: {reason}"),
            Failure::Algorithm(reason) => f.write_str(reason),
            Failure::Stopped(reason) => write!(
                f,
                "{reason}; it resumes after its last recorded round when the coordinator restarts"
            ),
        }
    }
}

/// One experiment's lifecycle.
#[derive(Debug)]
pub struct Experiment {
    id: ExperimentId,
    spec: ExperimentSpec,
    submitter: String,
    created: Instant,
    state: ExperimentState,
    /// Connected nodes and the datasets they offer.
    nodes: BTreeMap<String, Vec<String>>,
    /// Nodes that cannot take part (e.g. their data failed to load), with the reason.
    excluded: BTreeMap<String, String>,
    /// Retries of the current round so far (its steps share them).
    retries: u32,
    algorithm: Box<dyn Algorithm>,
    run: Option<StepRun>,
    events: VecDeque<EventRecord>,
    outbox: VecDeque<Transmit>,
    progress: VecDeque<Progress>,
    /// Stopped by [`Experiment::abort`]: nothing more is queued for the store.
    aborted: bool,
    /// Steps started so far: numbers the attempts of secure steps, so no key, share or mask
    /// of one attempt is valid in another.
    attempts: u32,
    /// Each node's reported privacy spend (kept in memory; the event log records each report).
    spent: BTreeMap<String, NodeSpend>,
}

/// What a store keeps of an experiment, to rebuild it after a restart.
#[derive(Debug, Clone)]
pub struct Restored {
    pub spec: ExperimentSpec,
    pub submitter: String,
    pub state: ExperimentState,
    pub standardization: Option<Standardization>,
    /// Completed rounds, in order.
    pub history: Vec<RoundRecord>,
    /// The model after the last completed round (None before the first).
    pub global: Option<Values>,
    /// The final output, if the experiment recorded one.
    pub output: Option<crate::output::Output>,
    pub events: Vec<EventRecord>,
}

impl Experiment {
    /// A new experiment; it starts at once if `connected` (node name, datasets offered) holds
    /// enough eligible nodes, and waits for them otherwise. The spec must be validated.
    pub fn new(
        id: ExperimentId,
        spec: ExperimentSpec,
        submitter: String,
        now: Instant,
        connected: &[(String, Vec<String>)],
    ) -> Self {
        let algorithm = algorithm::for_spec(&spec, Checkpoint::default());
        let mut exp = Experiment::with(id, spec, submitter, now, ExperimentState::Waiting, algorithm);
        exp.log(now, format!("submitted by {}", exp.submitter));
        exp.nodes.extend(connected.iter().cloned());
        exp.maybe_start(now);
        exp
    }

    fn with(
        id: ExperimentId,
        spec: ExperimentSpec,
        submitter: String,
        created: Instant,
        state: ExperimentState,
        algorithm: Box<dyn Algorithm>,
    ) -> Self {
        Experiment {
            id,
            spec,
            submitter,
            created,
            state,
            nodes: BTreeMap::new(),
            excluded: BTreeMap::new(),
            retries: 0,
            algorithm,
            run: None,
            events: VecDeque::new(),
            outbox: VecDeque::new(),
            progress: VecDeque::new(),
            aborted: false,
            attempts: 0,
            spent: BTreeMap::new(),
        }
    }

    /// Rebuild an experiment from its stored record after a coordinator restart. A finished one
    /// stays finished; a running one continues after its last completed round (an interrupted
    /// round is run again from the stored model, so with the same participants the result is
    /// bit-identical to an uninterrupted run).
    pub fn restore(id: ExperimentId, r: Restored, now: Instant, connected: &[(String, Vec<String>)]) -> Self {
        let elapsed = r.events.last().map_or(0, |e| e.at_ms);
        let created = now.checked_sub(Duration::from_millis(elapsed)).unwrap_or(now);
        let finished = r.state.is_finished();
        let checkpoint = Checkpoint {
            standardization: r.standardization,
            history: r.history,
            global: r.global,
            output: r.output,
        };
        let algorithm = algorithm::for_spec(&r.spec, checkpoint);
        let state = if finished {
            r.state
        } else {
            ExperimentState::Waiting
        };
        let mut exp = Experiment::with(id, r.spec, r.submitter, created, state, algorithm);
        exp.events = r.events.into_iter().collect();
        if !finished {
            let done = exp.history().len();
            exp.log(now, format!("coordinator restarted: resuming after round {done}"));
            exp.nodes.extend(connected.iter().cloned());
            exp.maybe_start(now);
        }
        exp
    }

    /// Stop the experiment now; answers still in flight are ignored as late.
    pub fn cancel(&mut self, now: Instant, by: &str) {
        if self.is_finished() {
            return;
        }
        self.run = None;
        self.state = ExperimentState::Cancelled { by: by.to_owned() };
        self.log(now, format!("cancelled by {by}"));
        self.progress.push_back(Progress::Finished(self.state.clone()));
    }

    /// Stop the experiment in memory for a reason outside the protocol (its record cannot be
    /// written, the audit log is down): nothing more is sent, answers in flight are ignored as
    /// late, the tasks already queued for sending are dropped, and `status` shows the reason.
    /// Nothing is queued for the store, which cannot be trusted to take it: the store still
    /// says `running`, so a coordinator restarted once the fault is mended resumes after the
    /// last recorded round.
    pub fn abort(&mut self, now: Instant, reason: String) {
        if self.is_finished() {
            return;
        }
        self.outbox.clear();
        self.progress.clear();
        self.aborted = true;
        self.run = None;
        let reason = Failure::Stopped(reason).to_string();
        self.log(now, format!("stopped: {reason}"));
        self.state = ExperimentState::Failed { reason };
    }

    /// The next durable fact to record.
    pub fn poll_progress(&mut self) -> Option<Progress> {
        self.progress.pop_front()
    }

    fn maybe_start(&mut self, now: Instant) {
        if self.state == ExperimentState::Waiting && self.candidates().len() >= self.spec.min_nodes as usize {
            self.start_next(now, None);
        }
    }

    pub fn id(&self) -> ExperimentId {
        self.id
    }

    pub fn spec(&self) -> &ExperimentSpec {
        &self.spec
    }

    /// The final output besides the parameters (GLM inference, a table), once complete.
    pub fn output(&self) -> Option<&crate::output::Output> {
        self.algorithm.output()
    }

    pub fn state(&self) -> &ExperimentState {
        &self.state
    }

    pub fn is_finished(&self) -> bool {
        self.state.is_finished()
    }

    /// The current global model (the final one once completed).
    pub fn global(&self) -> &Values {
        self.algorithm.model()
    }

    /// The current global model, shared rather than copied (it can be hundreds of MB).
    pub fn global_shared(&self) -> Arc<Values> {
        self.algorithm.model().clone()
    }

    pub fn submitter(&self) -> &str {
        &self.submitter
    }

    pub fn standardization(&self) -> Option<&Standardization> {
        self.algorithm.standardization()
    }

    pub fn history(&self) -> &[RoundRecord] {
        self.algorithm.history()
    }

    fn eligible(&self, datasets: &[String]) -> bool {
        !self.spec.uses_data() || datasets.contains(&self.spec.dataset)
    }

    fn candidates(&self) -> BTreeSet<String> {
        // An office-effects design has a column for each listed office and for no other.
        let listed = |name: &String| !self.spec.office_effects || self.spec.offices.contains(name);
        self.nodes
            .iter()
            .filter(|(name, ds)| self.eligible(ds) && listed(name) && !self.excluded.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn log(&mut self, now: Instant, message: String) {
        tracing::info!(experiment = self.id, "{message}");
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        let event = EventRecord {
            at_ms: now.saturating_duration_since(self.created).as_millis() as u64,
            message,
        };
        if !self.aborted {
            self.progress.push_back(Progress::Event(event.clone()));
        }
        self.events.push_back(event);
    }

    /// A node connected (or reconnected). It takes part from the next step that starts.
    pub fn node_available(&mut self, now: Instant, name: &str, datasets: &[String]) {
        self.nodes.insert(name.to_owned(), datasets.to_vec());
        self.maybe_start(now);
    }

    /// A node's connection ended. If the current step waits for it, it counts as failed.
    pub fn node_gone(&mut self, now: Instant, name: &str) {
        self.nodes.remove(name);
        let Some(p) = self.run.as_mut() else { return };
        if p.expects(name) {
            p.failed.insert(name.to_owned(), "disconnected".into());
            let (phase, round) = (p.step.phase, p.step.round);
            self.log(
                now,
                format!("round {round}: node `{name}` dropped out during {phase}"),
            );
            self.check_close(now);
        }
    }

    /// Whether an answer from `node` would be accepted now; call before reading the answer's
    /// bytes so late, duplicate and misshapen answers are refused without being read. A
    /// misshapen one counts as the node's failed answer for the step.
    pub fn begin_answer(
        &mut self,
        now: Instant,
        node: &str,
        header: &AnswerHeader,
    ) -> Result<TensorMeta, Rejection> {
        let result = self.check_header(node, header);
        match &result {
            Err(rej) if rej.is_stale() => self.log(
                now,
                format!("ignored {} from `{node}`: {rej}", noun(header.phase)),
            ),
            Err(rej) => {
                self.fail_answer(now, node, header.round, &rej.to_string());
                self.check_close(now);
            }
            Ok(_) => {}
        }
        result
    }

    fn check_header(&self, node: &str, header: &AnswerHeader) -> Result<TensorMeta, Rejection> {
        let (phase, round) = (header.phase, header.round);
        let Some(p) = self.run.as_ref().filter(|p| p.step.phase == phase) else {
            return Err(Rejection::Late {
                phase,
                round,
                open: None,
            });
        };
        if round != p.step.round {
            return Err(Rejection::Late {
                phase,
                round,
                open: Some(p.step.round),
            });
        }
        if p.answered.contains(node) || p.failed.contains_key(node) {
            return Err(Rejection::Duplicate { phase, round });
        }
        if !p.selected.contains(node) {
            return Err(Rejection::NotSelected { round });
        }
        if p.secure.is_some() {
            return Err(Rejection::Invalid(
                "an answer in clear to a secure step (it must be masked)".into(),
            ));
        }
        let shape = p.step.answer;
        let expected = TensorMeta {
            dtype: shape.dtype,
            len: shape.len,
        };
        if header.tensor != expected {
            return Err(Rejection::WrongShape {
                got: header.tensor,
                expected,
            });
        }
        if header.aux.len() != shape.aux {
            return Err(Rejection::WrongAux {
                got: header.aux.len(),
                expected: shape.aux,
            });
        }
        if header.weight == 0 || (!shape.weighted && header.weight != 1) {
            return Err(Rejection::WrongWeight {
                weight: header.weight,
            });
        }
        Ok(expected)
    }

    /// A node's answer arrived whole (`Ok`) or broke off / failed validation while streaming
    /// (`Err`, with the reason).
    pub fn handle_answer(
        &mut self,
        now: Instant,
        node: &str,
        header: &AnswerHeader,
        values: Result<Values, String>,
    ) -> Result<(), Rejection> {
        if let Err(rej) = self.check_header(node, header) {
            self.log(
                now,
                format!("ignored {} from `{node}`: {rej}", noun(header.phase)),
            );
            return Err(rej);
        }
        let folded = values.and_then(|v| {
            let p = self.run.as_mut().ok_or("no open step")?;
            let answer = Answer {
                values: &v,
                weight: header.weight,
                aux: &header.aux,
            };
            self.algorithm.check_answer(&p.step, answer)?;
            p.agg
                .fold(&v, header.weight, &header.aux)
                .map_err(|e| e.to_string())
        });
        let result = match folded {
            Ok(()) => {
                if let Some(p) = self.run.as_mut() {
                    p.answered.insert(node.to_owned());
                }
                Ok(())
            }
            Err(reason) => {
                self.fail_answer(now, node, header.round, &reason);
                Err(Rejection::Invalid(reason))
            }
        };
        self.check_close(now);
        result
    }

    /// The node could not do its task; `reason` carries no data values (and is escaped: it is
    /// a node's text, shown to researchers and logged).
    pub fn handle_failure(&mut self, now: Instant, node: &str, round: u32, phase: Phase, reason: &str) {
        let reason = &*crate::text::printable(reason);
        if self.expect_answer(node, round, phase) {
            self.log(
                now,
                format!("round {round}: node `{node}` could not do {phase}: {reason}"),
            );
            if phase == Phase::Stats {
                // Its data cannot be used: keep it out of the later rounds too.
                self.excluded.insert(node.to_owned(), reason.to_owned());
            }
            if let Some(p) = self.run.as_mut() {
                p.failed.insert(node.to_owned(), reason.to_owned());
            }
            self.check_close(now);
        }
    }

    /// The node holds the task until its custodian approves the manifest: no answer this
    /// step, but it stays a candidate for the next one.
    pub fn handle_held(&mut self, now: Instant, node: &str, round: u32, phase: Phase, manifest: &str) {
        let manifest = &*crate::text::printable(manifest);
        if self.expect_answer(node, round, phase) {
            self.log(
                now,
                format!("round {round}: node `{node}` holds the experiment for its custodian's approval (manifest {manifest})"),
            );
            if let Some(p) = self.run.as_mut() {
                p.failed.insert(node.to_owned(), "held for approval".to_owned());
            }
            self.check_close(now);
        }
    }

    /// A node reported the record-level privacy its ledger charged this experiment. Only a
    /// node that takes part may report, with a finite, non-negative ε.
    pub fn note_privacy_spent(
        &mut self,
        now: Instant,
        node: &str,
        round: u32,
        epsilon: f64,
        remaining: Option<f64>,
    ) {
        let sane = |x: f64| x.is_finite() && x >= 0.0;
        if self.spec.privacy.is_none() || !sane(epsilon) || remaining.is_some_and(|r| !sane(r)) {
            return;
        }
        if !self.nodes.contains_key(node) {
            return;
        }
        let shown = match remaining {
            Some(r) => format!("; {r:.3} left in its budget"),
            None => String::new(),
        };
        self.log(
            now,
            format!("round {round}: node `{node}` has charged this experiment ε = {epsilon:.4}{shown}"),
        );
        self.spent.insert(
            node.to_owned(),
            NodeSpend {
                node: node.to_owned(),
                round,
                epsilon,
                remaining,
            },
        );
    }

    /// The secure run of the open step, if `at` names its attempt.
    fn secure_run(&mut self, at: &SecureRound) -> Option<&mut StepRun> {
        self.run
            .as_mut()
            .filter(|p| p.secure.as_ref().is_some_and(|s| s.at == *at))
    }

    /// A node's message of secure aggregation. A message for another attempt is stale (the
    /// node is not at fault); one that breaks the protocol fails the node for this step.
    pub fn handle_secure(&mut self, now: Instant, node: &str, msg: SecureUp) -> Result<(), Rejection> {
        let at = msg.at();
        let stale = Rejection::Late {
            phase: at.phase,
            round: at.round,
            open: None,
        };
        let Some(p) = self.secure_run(&at) else {
            return Err(stale);
        };
        if !p.expects(node) {
            return Err(Rejection::NotSelected { round: at.round });
        }
        let Some(s) = p.secure.as_mut() else {
            return Err(stale);
        };
        let result = match msg {
            SecureUp::Keys { keys, .. } => s.on_keys(node, keys),
            SecureUp::Shares { shares, .. } => s.on_shares(node, shares),
            SecureUp::Reveal { shares, .. } => {
                s.on_reveal(node, shares.into_iter().map(|r| (r.owner, r.share)).collect())
            }
        };
        let result = result.map_err(|reason| {
            self.fail_answer(now, node, at.round, &reason);
            Rejection::Invalid(reason)
        });
        self.check_close(now);
        result
    }

    /// Whether a masked answer from `node` would be accepted now; returns its byte length.
    /// Call before reading its bytes (as [`Experiment::begin_answer`]).
    pub fn begin_masked(
        &mut self,
        now: Instant,
        node: &str,
        header: &MaskedHeader,
    ) -> Result<u64, Rejection> {
        let at = header.at;
        let stale = Rejection::Late {
            phase: at.phase,
            round: at.round,
            open: None,
        };
        let Some(p) = self.secure_run(&at) else {
            self.log(now, format!("ignored masked answer from `{node}`: {stale}"));
            return Err(stale);
        };
        let checked = match p.secure.as_ref() {
            Some(_) if !p.expects(node) => Err(Rejection::NotSelected { round: at.round }),
            Some(s) if header.ring != s.ring || header.len != s.len => Err(Rejection::Invalid(
                "a masked answer of another ring or length than the step's".into(),
            )),
            Some(s) => s
                .expects_masked(node)
                .map(|()| s.len * s.ring.width() as u64)
                .map_err(Rejection::Invalid),
            None => Err(stale),
        };
        if let Err(rej) = &checked {
            if rej.is_stale() {
                self.log(now, format!("ignored masked answer from `{node}`: {rej}"));
            } else {
                self.fail_answer(now, node, at.round, &rej.to_string());
                self.check_close(now);
            }
        }
        checked
    }

    /// A masked answer arrived whole (`Ok`, its bytes) or broke off (`Err`).
    pub fn handle_masked(
        &mut self,
        now: Instant,
        node: &str,
        header: &MaskedHeader,
        bytes: Result<Vec<u8>, String>,
    ) -> Result<(), Rejection> {
        let at = header.at;
        let Some(p) = self.secure_run(&at) else {
            return Err(Rejection::Late {
                phase: at.phase,
                round: at.round,
                open: None,
            });
        };
        let folded = bytes.and_then(|b| match p.secure.as_mut() {
            Some(s) => s.on_masked(node, &b),
            None => Err("no secure step".into()),
        });
        let result = match folded {
            Ok(()) => {
                p.answered.insert(node.to_owned());
                Ok(())
            }
            Err(reason) => {
                self.fail_answer(now, node, at.round, &reason);
                Err(Rejection::Invalid(reason))
            }
        };
        self.check_close(now);
        result
    }

    /// Close the current exchange of a secure step and start the next, finish the step with
    /// the unmasked sum, or try the step again.
    fn secure_advance(&mut self, now: Instant) {
        let Some(p) = self.run.as_mut() else { return };
        let Some(s) = p.secure.as_mut() else { return };
        let (round, phase) = (p.step.round, p.step.phase);
        match s.advance() {
            Advance::Send(msgs) => {
                let stage = s.stage();
                p.deadline = now + Duration::from_secs(self.spec.round_timeout_secs);
                let n = msgs.len();
                for (to, msg) in msgs {
                    self.outbox.push_back(Transmit::Secure { to, msg });
                }
                self.log(
                    now,
                    format!(
                        "round {round}: {phase}: secure aggregation {} with {n} node(s)",
                        stage_noun(stage)
                    ),
                );
                // Every member may have failed already.
                self.check_close(now);
            }
            Advance::Done { sum, survivors } => {
                let Some(p) = self.run.take() else { return };
                let shape = p.step.answer;
                let pooled = aggregate::pooled_from_ring(
                    p.step.aggregator,
                    shape.dtype,
                    shape.len as usize,
                    shape.aux,
                    &sum,
                    survivors.len(),
                );
                match pooled {
                    Ok(pooled) => {
                        self.log(
                            now,
                            format!(
                                "round {round}: {phase}: unmasked the sum of {} node(s)",
                                survivors.len()
                            ),
                        );
                        self.conclude(now, p.step, pooled, survivors)
                    }
                    Err(e) => self.fail(
                        now,
                        Failure::Pooling {
                            round,
                            reason: e.to_string(),
                        },
                    ),
                }
            }
            Advance::Short { stage, have, need } => {
                let why = format!(
                    "{have} of the {need} nodes needed for secure aggregation {} answered within {} s",
                    stage_noun(stage),
                    self.spec.round_timeout_secs
                );
                self.retry_because(now, have, need, Some(why))
            }
            Advance::Failed(reason) => {
                let why = format!("secure aggregation could not unmask the sum: {reason}");
                self.retry_because(now, 0, self.spec.min_nodes as usize, Some(why))
            }
        }
    }

    fn expect_answer(&self, node: &str, round: u32, phase: Phase) -> bool {
        self.run
            .as_ref()
            .is_some_and(|p| p.step.phase == phase && p.step.round == round && p.expects(node))
    }

    fn fail_answer(&mut self, now: Instant, node: &str, round: u32, reason: &str) {
        self.log(
            now,
            format!("round {round}: rejected answer from `{node}`: {reason}"),
        );
        if let Some(p) = self.run.as_mut() {
            p.failed.insert(node.to_owned(), reason.to_owned());
        }
        self.outbox.push_back(Transmit::Reject {
            to: node.to_owned(),
            experiment: self.id,
            round,
            reason: reason.to_owned(),
        });
    }

    /// Advance past deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(p) = self.run.as_ref() else { return };
        if now < p.deadline {
            return;
        }
        if let Some(s) = &p.secure {
            let late: Vec<String> = s.waiting(&p.failed).cloned().collect();
            let (phase, round, stage) = (p.step.phase, p.step.round, s.stage());
            if !late.is_empty() {
                self.log(
                    now,
                    format!(
                        "round {round}: {phase} deadline of secure aggregation ({}) passed without {}",
                        stage_noun(stage),
                        late.join(", ")
                    ),
                );
            }
            return self.secure_advance(now);
        }
        let late: Vec<String> = p.outstanding().cloned().collect();
        let (phase, round, answered) = (p.step.phase, p.step.round, p.answered.len());
        if !late.is_empty() {
            self.log(
                now,
                format!(
                    "round {round}: {phase} deadline passed without an answer from {}",
                    late.join(", ")
                ),
            );
        }
        if answered >= self.spec.min_nodes as usize {
            self.finish_step(now);
        } else {
            self.retry(now, answered);
        }
    }

    /// When the shell must call [`Experiment::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.run.as_ref().map(|p| p.deadline)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    /// Close the step early once every selected node has answered and the quorum is met.
    fn check_close(&mut self, now: Instant) {
        let Some(p) = self.run.as_ref() else { return };
        if p.waiting() {
            return;
        }
        if p.secure.is_some() {
            return self.secure_advance(now);
        }
        if p.answered.len() >= self.spec.min_nodes as usize {
            self.finish_step(now);
        }
        // Otherwise no answer can still come: wait for the deadline, then retry, so that a
        // federation whose nodes are restarting is not failed within milliseconds.
    }

    fn retry(&mut self, now: Instant, answered: usize) {
        let needed = self.spec.min_nodes as usize;
        self.retry_because(now, answered, needed, None)
    }

    fn retry_because(&mut self, now: Instant, answered: usize, needed: usize, secure: Option<String>) {
        let Some(p) = self.run.take() else { return };
        self.retries += 1;
        let why = match secure {
            Some(why) => format!("round {}: {why}", p.step.round),
            None => format!(
                "round {}: {} of the {} answers needed in {} arrived within {} s",
                p.step.round, answered, needed, p.step.phase, self.spec.round_timeout_secs
            ),
        };
        if self.retries > self.spec.max_round_retries {
            let failure = Failure::Quorum {
                round: p.step.round,
                phase: p.step.phase,
                answered,
                needed: needed as u32,
                timeout_secs: self.spec.round_timeout_secs,
                retries: self.spec.max_round_retries,
            };
            self.fail(now, failure);
            return;
        }
        self.log(
            now,
            format!(
                "{why}; retrying (attempt {} of {})",
                self.retries + 1,
                self.spec.max_round_retries + 1
            ),
        );
        self.start_step(now, p.step);
    }

    fn fail(&mut self, now: Instant, failure: Failure) {
        let reason = failure.to_string();
        self.log(now, format!("failed: {reason}"));
        self.state = ExperimentState::Failed { reason };
        self.run = None;
        self.progress.push_back(Progress::Finished(self.state.clone()));
    }

    /// Ask the algorithm for its next step and start it, or complete the experiment. A step
    /// of another round than `after` (the step that just closed, if any) starts the round's
    /// retries afresh.
    fn start_next(&mut self, now: Instant, after: Option<u32>) {
        match self.algorithm.next_step(now) {
            Some(step) => {
                if after != Some(step.round) {
                    self.retries = 0;
                }
                self.start_step(now, step);
            }
            None => {
                self.state = ExperimentState::Completed;
                self.log(now, format!("completed {} round(s)", self.history().len()));
                self.progress.push_back(Progress::Finished(self.state.clone()));
            }
        }
    }

    fn start_step(&mut self, now: Instant, step: Step) {
        let selected = self.candidates();
        let attempt = self.attempts;
        self.attempts = self.attempts.wrapping_add(1);
        let shape = step.answer;
        let secure = self.spec.secure_aggregation.then(|| {
            let at = SecureRound {
                experiment: self.id,
                round: step.round,
                phase: step.phase,
                attempt,
            };
            // Values, then the weight, then the side figures: see `aggregate::encode_ring`.
            let len = shape.len + 1 + shape.aux as u64;
            SecureRun::new(
                at,
                len,
                &selected,
                self.spec.secure_threshold,
                self.spec.min_nodes,
            )
        });
        let secure_task = secure.as_ref().map(|s| SecureTask {
            attempt,
            ring: s.ring,
            len: s.len,
            threshold: Some(s.threshold()),
        });
        self.state = ExperimentState::Running { phase: step.phase };
        let model_bytes = step.model.as_ref().map(|m| Arc::new(m.to_le_bytes()));
        let model_meta = step.model.as_ref().map(|m| TensorMeta {
            dtype: m.dtype(),
            len: m.len() as u64,
        });
        for to in &selected {
            self.outbox.push_back(Transmit::Task {
                to: to.clone(),
                task: Box::new(Task {
                    experiment: self.id,
                    round: step.round,
                    phase: step.phase,
                    submitter: self.submitter.clone(),
                    spec: self.spec.clone(),
                    standardization: step.standardization.clone(),
                    model: model_meta,
                    secure: secure_task,
                }),
                model: model_bytes.clone(),
            });
        }
        let agg = step.aggregator.start(shape.dtype, shape.len as usize, shape.aux);
        self.log(
            now,
            format!(
                "round {}: {} started with {} node(s){}",
                step.round,
                step.phase,
                selected.len(),
                if secure.is_some() {
                    ", under secure aggregation"
                } else {
                    ""
                }
            ),
        );
        self.run = Some(StepRun {
            step,
            selected,
            answered: BTreeSet::new(),
            failed: BTreeMap::new(),
            deadline: now + Duration::from_secs(self.spec.round_timeout_secs),
            agg,
            secure,
        });
        // A step with nobody to ask can only end at its deadline; one whose quorum is already
        // impossible is handled there too.
    }

    fn finish_step(&mut self, now: Instant) {
        let Some(p) = self.run.take() else { return };
        let round = p.step.round;
        let pooled = match p.agg.finish() {
            Ok(pooled) => pooled,
            Err(e) => {
                let reason = e.to_string();
                return self.fail(now, Failure::Pooling { round, reason });
            }
        };
        let participants = p.answered.into_iter().collect();
        self.conclude(now, p.step, pooled, participants)
    }

    /// The step's answers pooled: hand them to the algorithm and go on.
    fn conclude(&mut self, now: Instant, step: Step, pooled: aggregate::Pooled, participants: Vec<String>) {
        let round = step.round;
        match self
            .algorithm
            .finish_step(now, &step, pooled, participants, self.retries)
        {
            Ok(report) => {
                for e in report.events {
                    self.log(now, e);
                }
                self.progress.extend(report.progress);
                self.start_next(now, Some(round));
            }
            Err(reason) => self.fail(now, Failure::Algorithm(reason)),
        }
    }

    /// What researchers see.
    pub fn status(&self) -> ExperimentStatus {
        ExperimentStatus {
            id: self.id,
            name: self.spec.name.clone(),
            model: self.spec.model,
            submitter: self.submitter.clone(),
            state: self.state.clone(),
            rounds_done: self.history().len() as u32,
            rounds: self.spec.max_rounds(),
            participants: self
                .run
                .as_ref()
                .map(|p| p.selected.iter().cloned().collect())
                .unwrap_or_default(),
            history: self.history().to_vec(),
            events: self.events.iter().cloned().collect(),
            privacy: PrivacyView {
                secure_aggregation: self.spec.secure_aggregation,
                dp: self.spec.privacy.clone(),
                spent: self.spent.values().cloned().collect(),
            },
        }
    }
}

/// What an exchange of secure aggregation is called in the event log.
fn stage_noun(stage: Stage) -> &'static str {
    match stage {
        Stage::Keys => "key advertisement",
        Stage::Shares => "share exchange",
        Stage::Masked => "masked answers",
        Stage::Reveal => "unmasking",
    }
}

/// What an answer to `phase` is called in the event log.
fn noun(phase: Phase) -> &'static str {
    match phase {
        Phase::Train => "update",
        _ => "answer",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::AggregatorKind;
    use crate::data::ColumnSums;
    use crate::model::EvalSums;
    use crate::spec::{EchoSpec, ModelKind, TrainingSpec};
    use crate::wire::DType;

    const T0: Duration = Duration::from_secs(10);

    fn echo(min_nodes: u32, rounds: u32, retries: u32) -> ExperimentSpec {
        ExperimentSpec {
            name: "sim".into(),
            purpose: String::new(),
            dataset: String::new(),
            model: ModelKind::Echo,
            rounds,
            min_nodes,
            round_timeout_secs: T0.as_secs(),
            max_round_retries: retries,
            schema: None,
            training: TrainingSpec::default(),
            echo: Some(EchoSpec { params: 4 }),
            method: Default::default(),
            formula: None,
            weights: None,
            offset: None,
            office_effects: false,
            offices: Vec::new(),
            max_iterations: 25,
            table: None,
            secure_aggregation: false,
            secure_threshold: None,
            privacy: None,
        }
    }

    /// A linear model on dataset `d` (intercept and `x`): statistics, then per round training
    /// and evaluation.
    fn linear(min_nodes: u32, rounds: u32, retries: u32) -> ExperimentSpec {
        let text = format!(
            "name = \"sim linear\"\ndataset = \"d\"\nmodel = \"linear\"\nrounds = {rounds}\n\
             min_nodes = {min_nodes}\nround_timeout_secs = {}\nmax_round_retries = {retries}\n\
             [schema]\ntarget = {{ column = \"y\" }}\nnumeric = [{{ column = \"x\" }}]\n",
            T0.as_secs()
        );
        let spec: ExperimentSpec = toml::from_str(&text).expect("linear spec");
        crate::spec::validate(&spec).expect("valid linear spec");
        spec
    }

    /// A simulated federation: nodes answer tasks by returning global + their offset.
    struct Sim {
        now: Instant,
        exp: Experiment,
        /// Tasks delivered, per node: (round, global model).
        inbox: BTreeMap<String, Vec<(u32, Vec<f64>)>>,
        /// Nodes told their answer was rejected.
        rejected: Vec<String>,
    }

    impl Sim {
        fn new(spec: ExperimentSpec, nodes: &[&str]) -> Sim {
            Sim::offering(spec, nodes, &[])
        }

        /// Like [`Sim::new`], every node offering dataset `d`.
        fn with_data(spec: ExperimentSpec, nodes: &[&str]) -> Sim {
            Sim::offering(spec, nodes, &["d"])
        }

        fn offering(spec: ExperimentSpec, nodes: &[&str], datasets: &[&str]) -> Sim {
            let now = Instant::now();
            let connected = connected(nodes, datasets);
            let mut sim = Sim {
                now,
                exp: Experiment::new(1, spec, "researcher `r`".into(), now, &connected),
                inbox: BTreeMap::new(),
                rejected: Vec::new(),
            };
            sim.pump();
            sim
        }

        /// The experiment as a restarted coordinator rebuilds it from `store`, with `nodes`
        /// (offering `datasets`) connected.
        fn restored(store: &Restored, now: Instant, nodes: &[&str], datasets: &[&str]) -> Sim {
            let connected = connected(nodes, datasets);
            let mut sim = Sim {
                now,
                exp: Experiment::restore(1, store.clone(), now, &connected),
                inbox: BTreeMap::new(),
                rejected: Vec::new(),
            };
            sim.pump();
            sim
        }

        /// The node answers the statistics phase (10 train rows of `x`).
        fn stats(&mut self, node: &str) {
            let sums = ColumnSums {
                n: 10,
                sum: vec![5.0],
                sum_sq: vec![10.0],
            };
            self.send_stats(node, &sums).expect("stats");
        }

        /// The node answers the statistics phase with `sums`.
        fn send_stats(&mut self, node: &str, sums: &ColumnSums) -> Result<(), Rejection> {
            let values = crate::algorithm::standardize::answer(sums);
            let header = sum_header(Phase::Stats, 0, &values);
            let r = self.exp.handle_answer(self.now, node, &header, Ok(values));
            self.pump();
            r
        }

        /// The node answers its latest task, an evaluation, with sums over 5 test rows.
        fn eval(&mut self, node: &str) -> Result<(), Rejection> {
            let (round, _) = self.inbox[node].last().cloned().expect("a task");
            let sums = EvalSums {
                n: 5,
                loss_sum: 2.0,
                sse: 2.0,
                sum_y: 5.0,
                sum_y2: 10.0,
                ..EvalSums::default()
            };
            let values = crate::algorithm::evaluate::answer(&sums);
            let header = sum_header(Phase::Evaluate, round, &values);
            let r = self.exp.handle_answer(self.now, node, &header, Ok(values));
            self.pump();
            r
        }

        fn phase(&self) -> Option<Phase> {
            match self.exp.state() {
                ExperimentState::Running { phase } => Some(*phase),
                _ => None,
            }
        }

        fn events(&self) -> String {
            let status = self.exp.status();
            let lines: Vec<&str> = status.events.iter().map(|e| e.message.as_str()).collect();
            lines.join("\n")
        }

        fn pump(&mut self) {
            while let Some(t) = self.exp.poll_transmit() {
                match t {
                    Transmit::Task { to, task, model } => {
                        let dtype = self.exp.spec().dtype();
                        let values = model
                            .map(|m| crate::wire::tensor_to_f64(&m, dtype).expect("tensor"))
                            .unwrap_or_default();
                        self.inbox.entry(to).or_default().push((task.round, values));
                    }
                    Transmit::Reject { to, .. } => self.rejected.push(to),
                    Transmit::Secure { .. } => {}
                }
            }
        }

        fn header(&self, round: u32, rows: u64) -> AnswerHeader {
            AnswerHeader {
                experiment: 1,
                round,
                phase: Phase::Train,
                weight: rows,
                aux: vec![0.5],
                tensor: TensorMeta {
                    dtype: self.exp.spec().dtype(),
                    len: self.exp.spec().num_params(),
                },
            }
        }

        /// The node answers its latest task with global + offset.
        fn answer(&mut self, node: &str, offset: f32, rows: u64) -> Result<(), Rejection> {
            let (round, global) = self.inbox[node].last().cloned().expect("a task");
            let moved: Vec<f64> = global.iter().map(|g| g + f64::from(offset)).collect();
            let values = Values::from_f64(&moved, self.exp.spec().dtype());
            let header = self.header(round, rows);
            let r = self.exp.handle_answer(self.now, node, &header, Ok(values));
            self.pump();
            r
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
            if self.exp.poll_timeout().is_some_and(|t| t <= self.now) {
                self.exp.handle_timeout(self.now);
            }
            self.pump();
        }

        fn rounds_done(&self) -> usize {
            self.exp.history().len()
        }
    }

    /// The header of an answer to a plain sum.
    fn sum_header(phase: Phase, round: u32, values: &Values) -> AnswerHeader {
        AnswerHeader {
            experiment: 1,
            round,
            phase,
            weight: 1,
            aux: Vec::new(),
            tensor: TensorMeta {
                dtype: values.dtype(),
                len: values.len() as u64,
            },
        }
    }

    /// A store that has recorded nothing of `spec` yet.
    fn empty_store(spec: &ExperimentSpec) -> Restored {
        Restored {
            spec: spec.clone(),
            submitter: "researcher `r`".into(),
            state: ExperimentState::Waiting,
            standardization: None,
            history: vec![],
            global: None,
            output: None,
            events: vec![],
        }
    }

    /// Connections of `nodes`, each offering `datasets`.
    fn connected(nodes: &[&str], datasets: &[&str]) -> Vec<(String, Vec<String>)> {
        let datasets: Vec<String> = datasets.iter().map(|d| d.to_string()).collect();
        nodes.iter().map(|n| (n.to_string(), datasets.clone())).collect()
    }

    /// What a store would have kept: progress applied in order.
    fn record(exp: &mut Experiment, into: &mut Restored) {
        while let Some(p) = exp.poll_progress() {
            match p {
                Progress::Standardized(st) => into.standardization = Some(st),
                Progress::RoundCompleted { record, model } => {
                    into.history.push(record);
                    into.global = Some((*model).clone());
                }
                Progress::Finished(state) => into.state = state,
                Progress::Event(e) => into.events.push(e),
                Progress::Output(o) => into.output = Some(o),
            }
        }
    }

    /// Node answers depend only on (node, round, global), like real nodes' seeded training.
    fn play(sim: &mut Sim, rounds: std::ops::Range<u32>, store: &mut Restored) {
        for round in rounds {
            for (i, n) in ["a", "b", "c"].iter().enumerate() {
                let offset = (round as f32 * 0.37 + i as f32 * 0.11).sin();
                sim.answer(n, offset, 3 + i as u64).expect("answer");
            }
            record(&mut sim.exp, store);
        }
    }

    #[test]
    fn a_restored_run_ends_bit_identical() {
        let spec = echo(3, 6, 0);
        let fresh = || empty_store(&spec);
        let mut whole = Sim::new(spec.clone(), &["a", "b", "c"]);
        let mut store = fresh();
        play(&mut whole, 1..7, &mut store);
        assert_eq!(whole.exp.state(), &ExperimentState::Completed);
        let want = whole.exp.global().to_le_bytes();

        for crash_after in [0, 1, 3, 5] {
            let mut first = Sim::new(spec.clone(), &["a", "b", "c"]);
            let mut store = fresh();
            play(&mut first, 1..crash_after + 1, &mut store);
            // A round in flight when the coordinator dies: one answer arrived, then nothing.
            first.answer("a", 9.0, 3).expect("in flight");
            record(&mut first.exp, &mut store);
            assert_eq!(store.history.len(), crash_after as usize);

            let mut again = Sim::restored(&store, first.now, &["a", "b", "c"], &[]);
            assert!(again
                .exp
                .status()
                .events
                .iter()
                .any(|e| e.message.contains("resuming")));
            play(&mut again, crash_after + 1..7, &mut store);
            assert_eq!(
                again.exp.state(),
                &ExperimentState::Completed,
                "crash after {crash_after}"
            );
            assert_eq!(
                again.exp.global().to_le_bytes(),
                want,
                "crash after {crash_after}"
            );
            assert_eq!(store.history.len(), 6);
        }
    }

    /// A data experiment (statistics, then training and evaluation each round) interrupted by a
    /// coordinator restart after any step resumes from the store and ends bit-identical, with
    /// the same pooled metrics, and never asks for the statistics again.
    #[test]
    fn a_restored_data_experiment_ends_bit_identical() {
        let spec = linear(3, 3, 0);
        let fresh = || empty_store(&spec);
        // Every node's answers depend only on (node, round, global model).
        let step = |sim: &mut Sim, store: &mut Restored| {
            let phase = sim.phase().expect("running");
            for (i, n) in ["a", "b", "c"].iter().enumerate() {
                match phase {
                    Phase::Stats => sim.stats(n),
                    Phase::Train => {
                        let round = sim.inbox[*n].last().map_or(0, |t| t.0);
                        let offset = (round as f32 * 0.37 + i as f32 * 0.11).sin();
                        sim.answer(n, offset, 10 + i as u64).expect("update");
                    }
                    Phase::Evaluate => sim.eval(n).expect("evaluation"),
                    Phase::Glm | Phase::Table => unreachable!("a linear FedAvg asks for neither"),
                }
            }
            record(&mut sim.exp, store);
        };
        let mut whole = Sim::with_data(spec.clone(), &["a", "b", "c"]);
        let mut store = fresh();
        while !whole.exp.is_finished() {
            step(&mut whole, &mut store);
        }
        assert_eq!(whole.exp.state(), &ExperimentState::Completed);
        let want = (whole.exp.global().to_le_bytes(), whole.exp.history().to_vec());
        // 1 statistics step + 3 rounds of training and evaluation.
        for crash_after in 0..7 {
            let mut first = Sim::with_data(spec.clone(), &["a", "b", "c"]);
            let mut store = fresh();
            for _ in 0..crash_after {
                step(&mut first, &mut store);
            }
            let mut again = Sim::restored(&store, first.now, &["a", "b", "c"], &["d"]);
            if crash_after > 0 {
                assert_ne!(again.phase(), Some(Phase::Stats), "crash after {crash_after}");
            }
            while !again.exp.is_finished() {
                step(&mut again, &mut store);
            }
            assert_eq!(
                again.exp.global().to_le_bytes(),
                want.0,
                "crash after {crash_after}"
            );
            let metrics = |h: &[RoundRecord]| h.iter().map(|r| r.metrics.clone()).collect::<Vec<_>>();
            assert_eq!(
                metrics(again.exp.history()),
                metrics(&want.1),
                "crash after {crash_after}"
            );
        }
    }

    /// A node that holds the task for its custodian sits out the step, which closes on the
    /// others; it stays a candidate and is asked again in the next step.
    #[test]
    fn a_held_node_sits_out_the_step_and_is_asked_again() {
        let mut sim = Sim::with_data(linear(2, 1, 0), &["a", "b", "c"]);
        sim.exp
            .handle_held(sim.now, "c", 0, Phase::Stats, &"ab".repeat(32));
        sim.stats("a");
        assert_eq!(sim.phase(), Some(Phase::Stats), "b is still expected");
        sim.stats("b");
        assert_eq!(sim.phase(), Some(Phase::Train), "closed without c");
        assert!(
            sim.events().contains("node `c` holds the experiment"),
            "{}",
            sim.events()
        );
        assert_eq!(sim.inbox["c"].last().map(|t| t.0), Some(1), "c is asked to train");
        // A held node's later answer to the held step is late, not counted.
        let err = sim.send_stats(
            "c",
            &ColumnSums {
                n: 10,
                sum: vec![5.0],
                sum_sq: vec![10.0],
            },
        );
        assert!(err.is_err_and(|e| e.is_stale()));
        for n in ["a", "b", "c"] {
            sim.answer(n, 1.0, 10).expect("trains");
        }
        assert_eq!(sim.exp.history().len(), 0);
        assert_eq!(sim.phase(), Some(Phase::Evaluate));
    }

    /// A node whose data fails at the statistics step is kept out of every later step; the
    /// experiment goes on with the others.
    #[test]
    fn a_node_whose_data_fails_is_kept_out_of_later_steps() {
        let mut sim = Sim::with_data(linear(2, 1, 0), &["a", "b", "c"]);
        sim.exp.handle_failure(
            sim.now,
            "c",
            0,
            Phase::Stats,
            "dataset `d`: column `x`: not a number",
        );
        sim.stats("a");
        sim.stats("b");
        assert_eq!(sim.phase(), Some(Phase::Train));
        assert_eq!(sim.inbox["c"].len(), 1, "c gets no training task");
        sim.answer("a", 1.0, 10).expect("a");
        sim.answer("b", 1.0, 10).expect("b");
        sim.eval("a").expect("a");
        sim.eval("b").expect("b");
        assert_eq!(sim.exp.state(), &ExperimentState::Completed);
        assert_eq!(sim.exp.history()[0].participants, ["a", "b"]);
        assert!(
            sim.events().contains("node `c` could not do statistics"),
            "{}",
            sim.events()
        );
    }

    /// Answers whose header does not match the step are refused before their bytes are read.
    #[test]
    fn answers_must_match_the_step_shape_weight_and_side_figures() {
        let mut sim = Sim::with_data(linear(1, 1, 0), &["a", "b", "c", "d"]);
        let values = crate::algorithm::standardize::answer(&ColumnSums {
            n: 10,
            sum: vec![5.0],
            sum_sq: vec![10.0],
        });
        let mut weighted = sum_header(Phase::Stats, 0, &values);
        weighted.weight = 10;
        let mut aux = sum_header(Phase::Stats, 0, &values);
        aux.aux = vec![1.0];
        let mut long = sum_header(Phase::Stats, 0, &values);
        long.tensor.len += 1;
        let mut train = sum_header(Phase::Train, 0, &values);
        train.weight = 10;
        for (node, header, want) in [
            ("a", weighted, "wrong weight 10"),
            ("b", aux, "1 side figures, the step has 0"),
            ("c", long, "wrong shape"),
            ("d", train, "late update for round 0"),
        ] {
            let err = sim.exp.begin_answer(sim.now, node, &header).expect_err(want);
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    /// A store or audit fault stops the experiment in memory only: nothing is queued for the
    /// store (which still says running, so a restart resumes), nothing more is sent, and late
    /// answers are ignored.
    #[test]
    fn an_aborted_experiment_writes_and_sends_nothing_more() {
        let mut sim = Sim::new(echo(2, 3, 0), &["a", "b"]);
        sim.answer("a", 1.0, 1).expect("a");
        sim.exp
            .abort(sim.now, "the store cannot record progress (disk full)".into());
        assert!(sim.exp.poll_progress().is_none());
        assert!(sim.exp.poll_transmit().is_none());
        assert!(sim.exp.poll_timeout().is_none());
        match sim.exp.state() {
            ExperimentState::Failed { reason } => {
                assert!(
                    reason.contains("disk full") && reason.contains("resumes"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(sim.answer("b", 1.0, 1).is_err(), "late after the abort");
        assert!(sim.exp.poll_progress().is_none());
        assert!(sim.events().contains("stopped: the store cannot record progress"));
    }

    #[test]
    fn a_restored_finished_experiment_stays_finished() {
        let mut sim = Sim::new(echo(1, 1, 0), &["a"]);
        sim.answer("a", 1.0, 1).expect("a");
        let mut store = Restored {
            spec: echo(1, 1, 0),
            submitter: "r".into(),
            state: ExperimentState::Waiting,
            standardization: None,
            history: vec![],
            global: None,
            output: None,
            events: vec![],
        };
        record(&mut sim.exp, &mut store);
        assert_eq!(store.state, ExperimentState::Completed);
        let exp = Experiment::restore(1, store, sim.now, &[("a".into(), vec![])]);
        assert_eq!(exp.state(), &ExperimentState::Completed);
        assert_eq!(exp.global(), &Values::F32(vec![1.0; 4]));
    }

    /// A simulated federation under secure aggregation: each node runs a real
    /// `fedstat_secagg::Client`, answers its training task with `base + offset(node, round)`
    /// of weight `rows(node)`, and may leave after sending its shares or its masked answer.
    struct SecureSim {
        now: Instant,
        exp: Experiment,
        clients: BTreeMap<
            String,
            (
                fedstat_secagg::Client,
                crate::proto::secure::SecureTask,
                u32,
                Values,
            ),
        >,
        gone_after_shares: BTreeSet<String>,
        gone_after_masked: BTreeSet<String>,
        /// Every masked answer the coordinator received, with the plain encoding it hides.
        received: Vec<(Vec<u8>, Vec<u8>)>,
        gone: BTreeSet<String>,
    }

    fn offset(node: &str, round: u32) -> f32 {
        (node.as_bytes()[0] - b'a') as f32 * 0.25 + round as f32
    }

    fn rows(node: &str) -> u64 {
        u64::from(node.as_bytes()[0] - b'a') * 7 + 3
    }

    impl SecureSim {
        fn new(
            spec: ExperimentSpec,
            nodes: &[&str],
            after_shares: &[&str],
            after_masked: &[&str],
        ) -> SecureSim {
            let now = Instant::now();
            let exp = Experiment::new(1, spec, "researcher `r`".into(), now, &connected(nodes, &[]));
            let mut sim = SecureSim {
                now,
                exp,
                clients: BTreeMap::new(),
                gone_after_shares: after_shares.iter().map(|s| s.to_string()).collect(),
                gone_after_masked: after_masked.iter().map(|s| s.to_string()).collect(),
                received: Vec::new(),
                gone: BTreeSet::new(),
            };
            sim.pump();
            sim
        }

        fn leave(&mut self, node: &str) {
            self.gone.insert(node.to_owned());
            self.exp.node_gone(self.now, node);
        }

        /// Deliver everything the engine sends until it waits (for a deadline or the end).
        fn pump(&mut self) {
            while let Some(t) = self.exp.poll_transmit() {
                match t {
                    Transmit::Task { to, task, model } => {
                        let st = task.secure.expect("a secure task");
                        let global =
                            crate::wire::tensor_to_f64(&model.expect("model"), DType::F32).expect("model");
                        let values = Values::F32(
                            global
                                .iter()
                                .map(|g| *g as f32 + offset(&to, task.round))
                                .collect(),
                        );
                        let at = SecureRound {
                            experiment: task.experiment,
                            round: task.round,
                            phase: task.phase,
                            attempt: st.attempt,
                        };
                        let ctx = fedstat_secagg::Context {
                            at,
                            ring: st.ring,
                            len: st.len,
                            threshold: st.threshold.expect("threshold"),
                        };
                        let (client, keys) = fedstat_secagg::Client::new(ctx, &to);
                        let up = SecureUp::Keys {
                            at,
                            keys: crate::proto::secure::SignedKeys {
                                node: to.clone(),
                                cipher_key: keys.cipher,
                                mask_key: keys.mask,
                                certificate: Vec::new(),
                                signature: Vec::new(),
                            },
                        };
                        self.clients.insert(to.clone(), (client, st, task.round, values));
                        self.exp.handle_secure(self.now, &to, up).expect("keys");
                    }
                    Transmit::Secure { to, msg } => self.secure(&to, msg),
                    Transmit::Reject { to, .. } => panic!("{to} was rejected"),
                }
            }
        }

        fn secure(&mut self, to: &str, msg: SecureDown) {
            if self.gone.contains(to) {
                return;
            }
            let Some((client, st, _round, values)) = self.clients.get_mut(to) else {
                return;
            };
            match msg {
                SecureDown::Roster {
                    at,
                    threshold,
                    members,
                } => {
                    let roster: Vec<_> = members
                        .iter()
                        .map(|k| {
                            (
                                k.node.clone(),
                                fedstat_secagg::PublicKeys {
                                    cipher: k.cipher_key,
                                    mask: k.mask_key,
                                },
                            )
                        })
                        .collect();
                    let shares = client
                        .share_keys(threshold, &roster)
                        .expect("shares")
                        .into_iter()
                        .map(|(peer, ciphertext)| crate::proto::secure::SealedShare {
                            from: to.to_owned(),
                            to: peer,
                            ciphertext,
                        })
                        .collect();
                    self.exp
                        .handle_secure(self.now, to, SecureUp::Shares { at, shares })
                        .expect("shares");
                    if self.gone_after_shares.contains(to) {
                        self.leave(to);
                    }
                }
                SecureDown::Shares { at, shares } => {
                    let received: Vec<_> = shares.into_iter().map(|s| (s.from, s.ciphertext)).collect();
                    let encoded =
                        crate::aggregate::encode_ring(AggregatorKind::Mean, values, rows(to), &[0.5])
                            .expect("encode");
                    let masked = client.masked_input(&received, &encoded).expect("mask");
                    self.received.push((masked.clone(), encoded));
                    let header = MaskedHeader {
                        at,
                        ring: st.ring,
                        len: st.len,
                    };
                    let to = to.to_owned();
                    self.exp.begin_masked(self.now, &to, &header).expect("begin");
                    self.exp
                        .handle_masked(self.now, &to, &header, Ok(masked))
                        .expect("masked");
                    if self.gone_after_masked.contains(&to) {
                        self.leave(&to);
                    }
                }
                SecureDown::Unmask {
                    at,
                    survivors,
                    dropped,
                } => {
                    let shares = client
                        .unmask(&survivors, &dropped)
                        .expect("unmask")
                        .into_iter()
                        .map(|(owner, share)| crate::proto::secure::RevealedShare { owner, share })
                        .collect();
                    self.exp
                        .handle_secure(self.now, to, SecureUp::Reveal { at, shares })
                        .expect("reveal");
                }
            }
        }

        fn run(&mut self) {
            for _ in 0..20 {
                self.pump();
                if self.exp.is_finished() {
                    return;
                }
                self.now += T0 + Duration::from_secs(1);
                self.exp.handle_timeout(self.now);
            }
        }
    }

    /// The same echo experiment in clear, each node answering as in [`SecureSim`].
    fn plain_run(spec: ExperimentSpec, nodes: &[&str]) -> Values {
        let mut sim = Sim::new(spec, nodes);
        for _ in 0..spec_rounds(&sim) {
            let round = sim.exp.status().rounds_done + 1;
            for n in nodes {
                let global = sim.inbox[*n].last().expect("task").1.clone();
                let values = Values::F32(global.iter().map(|g| *g as f32 + offset(n, round)).collect());
                let mut header = sim.header(round, rows(n));
                header.aux = vec![0.5];
                sim.exp
                    .handle_answer(sim.now, n, &header, Ok(values))
                    .expect("answer");
                sim.pump();
            }
        }
        assert_eq!(sim.exp.state(), &ExperimentState::Completed);
        sim.exp.global().clone()
    }

    fn spec_rounds(sim: &Sim) -> u32 {
        sim.exp.spec().rounds
    }

    fn secure_echo(min_nodes: u32, rounds: u32) -> ExperimentSpec {
        let mut spec = echo(min_nodes, rounds, 1);
        spec.secure_aggregation = true;
        spec
    }

    #[test]
    fn a_secure_run_ends_with_the_plain_runs_model_bit_for_bit() {
        let nodes = ["a", "b", "c", "d", "e"];
        let mut sim = SecureSim::new(secure_echo(3, 3), &nodes, &[], &[]);
        sim.run();
        assert_eq!(
            sim.exp.state(),
            &ExperimentState::Completed,
            "{:?}",
            sim.exp.status().events
        );
        let plain = plain_run(echo(3, 3, 1), &nodes);
        assert_eq!(sim.exp.global().to_le_bytes(), plain.to_le_bytes());
        // What the coordinator received is never the encoded answer, element by element.
        for (masked, encoded) in &sim.received {
            let same = masked
                .chunks_exact(16)
                .zip(encoded.chunks_exact(16))
                .filter(|(m, e)| m == e)
                .count();
            assert_eq!(same, 0);
        }
    }

    #[test]
    fn secure_steps_survive_the_dropouts_the_threshold_allows() {
        let nodes = ["a", "b", "c", "d", "e"];
        // Five selected: the threshold is 3.
        for (after_shares, after_masked, survivors) in [
            (&[][..], &["e"][..], 5),
            (&["d", "e"][..], &[][..], 3),
            (&["e"][..], &["d"][..], 4),
            (&[][..], &["d", "e"][..], 5),
        ] {
            let mut sim = SecureSim::new(secure_echo(3, 1), &nodes, after_shares, after_masked);
            sim.run();
            let events = sim.exp.status().events;
            assert_eq!(sim.exp.state(), &ExperimentState::Completed, "{events:?}");
            let unmasked = format!("unmasked the sum of {survivors} node(s)");
            assert!(events.iter().any(|e| e.message.contains(&unmasked)), "{events:?}");
            assert_eq!(sim.exp.history()[0].participants.len(), survivors);
        }
    }

    #[test]
    fn more_dropouts_than_the_threshold_allows_fail_without_unmasking() {
        let nodes = ["a", "b", "c", "d", "e"];
        let mut sim = SecureSim::new(secure_echo(3, 1), &nodes, &["c", "d", "e"], &[]);
        sim.run();
        let status = sim.exp.status();
        assert!(
            matches!(sim.exp.state(), ExperimentState::Failed { .. }),
            "{:?}",
            status.events
        );
        assert!(status.events.iter().all(|e| !e.message.contains("unmasked")));
        assert!(
            status
                .events
                .iter()
                .any(|e| e.message.contains("needed for secure aggregation")),
            "{:?}",
            status.events
        );
    }

    #[test]
    fn full_run_averages_by_rows() {
        let mut sim = Sim::new(echo(2, 2, 0), &["a", "b"]);
        sim.answer("a", 1.0, 1).expect("a");
        sim.answer("b", 5.0, 3).expect("b");
        assert_eq!(sim.rounds_done(), 1);
        assert_eq!(sim.exp.global(), &Values::F32(vec![4.0; 4]));
        sim.answer("b", 1.0, 1).expect("b");
        sim.answer("a", 1.0, 1).expect("a");
        assert_eq!(sim.exp.state(), &ExperimentState::Completed);
        assert_eq!(sim.exp.global(), &Values::F32(vec![5.0; 4]));
        assert_eq!(sim.exp.history()[1].participants, ["a", "b"]);
    }

    #[test]
    fn waits_for_min_nodes_before_starting() {
        let mut sim = Sim::new(echo(2, 1, 0), &["a"]);
        assert_eq!(sim.exp.state(), &ExperimentState::Waiting);
        assert!(sim.inbox.is_empty());
        sim.exp.node_available(sim.now, "b", &[]);
        sim.pump();
        assert_eq!(sim.inbox.len(), 2);
    }

    #[test]
    fn deadline_with_quorum_closes_the_round() {
        let mut sim = Sim::new(echo(2, 1, 0), &["a", "b", "c"]);
        sim.answer("a", 1.0, 1).expect("a");
        sim.answer("b", 3.0, 1).expect("b");
        assert_eq!(sim.rounds_done(), 0, "c is still expected");
        sim.advance(T0);
        assert_eq!(sim.exp.state(), &ExperimentState::Completed);
        assert_eq!(sim.exp.global(), &Values::F32(vec![2.0; 4]));
        assert!(sim
            .exp
            .status()
            .events
            .iter()
            .any(|e| e.message.contains("without an answer from c")));
    }

    #[test]
    fn deadline_without_quorum_retries_then_fails() {
        let mut sim = Sim::new(echo(2, 1, 1), &["a", "b"]);
        sim.answer("a", 1.0, 1).expect("a");
        sim.advance(T0);
        // Retried: both nodes got a second task for round 1.
        assert_eq!(sim.inbox["b"].len(), 2);
        assert!(matches!(sim.exp.state(), ExperimentState::Running { .. }));
        sim.advance(T0);
        match sim.exp.state() {
            ExperimentState::Failed { reason } => {
                assert!(reason.contains("0 of the 2 answers"), "{reason}");
                assert!(reason.contains("after 1 retries"), "{reason}");
            }
            other => panic!("expected failure, got {other:?}"),
        }
    }

    #[test]
    fn evaluation_without_quorum_retries_then_fails() {
        let mut sim = Sim::with_data(linear(2, 1, 1), &["a", "b"]);
        sim.stats("a");
        sim.stats("b");
        sim.answer("a", 1.0, 10).expect("a trains");
        sim.answer("b", 1.0, 10).expect("b trains");
        assert_eq!(sim.phase(), Some(Phase::Evaluate));
        sim.eval("a").expect("a evaluates");
        // b is silent: one answer is not the quorum of two, so the phase waits for its
        // deadline rather than publishing metrics of a's test rows alone.
        assert_eq!(sim.rounds_done(), 0);
        let tasks_b = sim.inbox["b"].len();
        sim.advance(T0);
        assert_eq!(sim.phase(), Some(Phase::Evaluate), "retried");
        assert_eq!(sim.inbox["b"].len(), tasks_b + 1, "b is asked again");
        assert!(
            sim.events()
                .contains("round 1: 1 of the 2 answers needed in evaluation arrived within 10 s; retrying"),
            "{}",
            sim.events()
        );
        sim.eval("a").expect("a evaluates again");
        sim.advance(T0);
        match sim.exp.state() {
            ExperimentState::Failed { reason } => {
                assert!(
                    reason.contains("1 of the 2 answers needed in evaluation"),
                    "{reason}"
                );
                assert!(reason.contains("after 1 retries"), "{reason}");
            }
            other => panic!("expected failure, got {other:?}"),
        }
        assert_eq!(sim.rounds_done(), 0, "no metrics from one office are recorded");
        let mut kept = Vec::new();
        while let Some(p) = sim.exp.poll_progress() {
            kept.push(p);
        }
        assert!(
            !kept.iter().any(|p| matches!(p, Progress::RoundCompleted { .. })),
            "{kept:?}"
        );
    }

    #[test]
    fn evaluation_with_quorum_completes() {
        let mut sim = Sim::with_data(linear(2, 2, 0), &["a", "b", "c"]);
        for n in ["a", "b", "c"] {
            sim.stats(n);
        }
        // Round 1: c never answers; training and evaluation each close at their deadline on
        // the quorum of a and b.
        sim.answer("a", 1.0, 10).expect("a trains");
        sim.answer("b", 1.0, 10).expect("b trains");
        sim.advance(T0);
        assert_eq!(sim.phase(), Some(Phase::Evaluate));
        sim.eval("a").expect("a evaluates");
        sim.eval("b").expect("b evaluates");
        assert_eq!(sim.rounds_done(), 0, "c is still expected");
        sim.advance(T0);
        assert_eq!(sim.rounds_done(), 1);
        let metrics = sim.exp.history()[0].metrics.clone().expect("pooled metrics");
        assert_eq!(metrics.n, 10, "two offices' test rows");
        // Round 2: everyone answers, so nothing waits for a deadline.
        for n in ["a", "b", "c"] {
            sim.answer(n, 0.5, 10).expect("trains");
        }
        for n in ["a", "b", "c"] {
            sim.eval(n).expect("evaluates");
        }
        assert_eq!(sim.exp.state(), &ExperimentState::Completed);
        assert_eq!(sim.exp.history()[1].metrics.as_ref().map(|m| m.n), Some(15));
        assert_eq!(sim.exp.history()[1].retries, 0);
    }

    #[test]
    fn training_and_evaluation_share_the_rounds_retries() {
        let mut sim = Sim::with_data(linear(2, 1, 2), &["a", "b"]);
        sim.stats("a");
        sim.stats("b");
        sim.answer("a", 1.0, 10).expect("a trains");
        sim.advance(T0);
        assert_eq!(sim.phase(), Some(Phase::Train), "training retried");
        sim.answer("a", 1.0, 10).expect("a trains again");
        sim.answer("b", 1.0, 10).expect("b trains");
        sim.eval("a").expect("a evaluates");
        sim.advance(T0);
        assert_eq!(sim.phase(), Some(Phase::Evaluate), "evaluation retried");
        sim.eval("a").expect("a evaluates again");
        sim.eval("b").expect("b evaluates");
        assert_eq!(sim.exp.state(), &ExperimentState::Completed);
        assert_eq!(sim.exp.history()[0].retries, 2, "one retry of each phase");
    }

    #[test]
    fn late_and_duplicate_updates_are_ignored() {
        let mut sim = Sim::new(echo(1, 2, 0), &["a", "b"]);
        sim.answer("a", 1.0, 1).expect("a");
        let dup = sim.answer("a", 9.0, 1).expect_err("duplicate");
        assert_eq!(
            dup,
            Rejection::Duplicate {
                phase: Phase::Train,
                round: 1
            }
        );
        assert_eq!(dup.to_string(), "duplicate update for round 1");
        assert!(dup.is_stale());
        sim.answer("b", 1.0, 1).expect("b");
        assert_eq!(sim.rounds_done(), 1);
        // A round-1 update arriving during round 2 is late.
        let header = sim.header(1, 1);
        let late = sim
            .exp
            .handle_answer(sim.now, "a", &header, Ok(Values::F32(vec![0.0; 4])))
            .expect_err("late");
        assert_eq!(
            late,
            Rejection::Late {
                phase: Phase::Train,
                round: 1,
                open: Some(2)
            }
        );
        assert_eq!(late.to_string(), "late update for round 1: round 2 is open");
        assert!(late.is_stale());
        assert_eq!(sim.exp.global(), &Values::F32(vec![1.0; 4]));
    }

    #[test]
    fn node_leaving_and_rejoining_mid_round() {
        let mut sim = Sim::new(echo(1, 2, 0), &["a", "b"]);
        sim.exp.node_gone(sim.now, "b");
        sim.answer("a", 2.0, 1).expect("a");
        // b's departure means nobody is outstanding: round 1 closes on a alone.
        assert_eq!(sim.rounds_done(), 1);
        assert_eq!(sim.exp.history()[0].participants, ["a"]);
        sim.exp.node_available(sim.now, "b", &[]);
        sim.pump();
        // b rejoined mid round 2: not selected for it, so its update is refused...
        assert_eq!(sim.inbox["b"].len(), 1);
        let stale = sim.answer("b", 1.0, 1).expect_err("not selected");
        assert!(
            matches!(stale, Rejection::Late { .. } | Rejection::NotSelected { .. }),
            "{stale}"
        );
        assert!(stale.is_stale());
        sim.answer("a", 0.0, 1).expect("a");
        assert_eq!(sim.exp.state(), &ExperimentState::Completed);
    }

    #[test]
    fn rejoined_node_takes_part_in_the_next_round() {
        let mut sim = Sim::new(echo(1, 3, 0), &["a", "b"]);
        sim.exp.node_gone(sim.now, "b");
        sim.exp.node_available(sim.now, "b", &[]);
        sim.answer("a", 2.0, 1).expect("a");
        assert_eq!(sim.rounds_done(), 1);
        // Round 2 selects b again.
        assert_eq!(sim.inbox["b"].last().map(|t| t.0), Some(2));
        sim.answer("a", 0.0, 1).expect("a");
        sim.answer("b", 2.0, 1).expect("b");
        assert_eq!(sim.exp.history()[1].participants, ["a", "b"]);
    }

    #[test]
    fn invalid_update_is_rejected_and_the_round_goes_on() {
        let mut sim = Sim::new(echo(1, 1, 0), &["a", "b", "c"]);
        let header = sim.header(1, 1);
        let err = sim
            .exp
            .handle_answer(
                sim.now,
                "b",
                &header,
                Ok(Values::F32(vec![0.0, f32::NAN, 0.0, 0.0])),
            )
            .expect_err("nan");
        assert!(matches!(err, Rejection::Invalid(_)) && !err.is_stale(), "{err:?}");
        assert!(err.to_string().contains("value 1"), "{err}");
        let mut wrong = sim.header(1, 1);
        wrong.tensor.len = 3;
        let err = sim
            .exp
            .begin_answer(sim.now, "c", &wrong)
            .expect_err("wrong shape");
        assert!(
            matches!(err, Rejection::WrongShape { .. }) && !err.is_stale(),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "wrong shape: 3 F32 parameters, the model has 4 F32"
        );
        sim.pump();
        assert_eq!(sim.rejected, ["b", "c"]);
        sim.answer("a", 1.0, 1).expect("a");
        // b and c failed, a answered: the round closes without waiting for the deadline.
        assert_eq!(sim.exp.state(), &ExperimentState::Completed);
        assert_eq!(sim.exp.history()[0].participants, ["a"]);
        assert!(sim
            .exp
            .status()
            .events
            .iter()
            .any(|e| e.message.contains("rejected answer from `b`")));
    }

    #[test]
    fn arrival_order_does_not_change_the_model() {
        let run = |order: &[&str]| {
            let mut sim = Sim::new(echo(3, 3, 0), &["a", "b", "c"]);
            for _ in 0..3 {
                for (i, n) in order.iter().enumerate() {
                    sim.answer(n, 0.1 * (i as f32 + 1.0) / 3.0, 7 + i as u64)
                        .expect("answer");
                }
            }
            sim.exp.global().to_le_bytes()
        };
        let base = run(&["a", "b", "c"]);
        assert_eq!(base, run(&["a", "b", "c"]));
        // Different weights per node in this order, so compare only runs with the same
        // node -> (offset, rows) mapping: permute answer order, keep assignment.
        let run_perm = |perm: &[usize]| {
            let names = ["a", "b", "c"];
            let mut sim = Sim::new(echo(3, 3, 0), &names);
            for _ in 0..3 {
                for &i in perm {
                    sim.answer(names[i], 0.1 * (i as f32 + 1.0) / 3.0, 7 + i as u64)
                        .expect("answer");
                }
            }
            sim.exp.global().to_le_bytes()
        };
        for perm in [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
            assert_eq!(run_perm(&perm), base, "order {perm:?}");
        }
    }

    #[test]
    fn rejections_read_as_before() {
        let meta = |len| TensorMeta {
            dtype: crate::wire::DType::F64,
            len,
        };
        // (rejection, text, stale)
        let cases = [
            (
                Rejection::Late {
                    phase: Phase::Train,
                    round: 3,
                    open: None,
                },
                "late update for round 3: the experiment is not training now",
                true,
            ),
            (
                Rejection::Late {
                    phase: Phase::Evaluate,
                    round: 2,
                    open: None,
                },
                "late evaluation answer for round 2",
                true,
            ),
            (
                Rejection::Duplicate {
                    phase: Phase::Stats,
                    round: 0,
                },
                "duplicate statistics answer for round 0",
                true,
            ),
            (
                Rejection::NotSelected { round: 4 },
                "node was not selected for round 4",
                true,
            ),
            (
                Rejection::UnknownExperiment { experiment: 7 },
                "late update: unknown experiment 7",
                true,
            ),
            (
                Rejection::WrongShape {
                    got: meta(2),
                    expected: meta(5),
                },
                "wrong shape: 2 F64 parameters, the model has 5 F64",
                false,
            ),
            (
                Rejection::WrongWeight { weight: 0 },
                "wrong weight 0 for this step",
                false,
            ),
            (
                Rejection::WrongAux { got: 2, expected: 1 },
                "2 side figures, the step has 1",
                false,
            ),
            (
                Rejection::Invalid("parameter 1 is not finite".into()),
                "parameter 1 is not finite",
                false,
            ),
        ];
        for (rejection, text, stale) in cases {
            assert_eq!(rejection.to_string(), text);
            assert_eq!(rejection.is_stale(), stale, "{text}");
        }
    }

    #[test]
    fn negative_sum_of_squares_is_rejected_and_statistics_complete_with_the_others() {
        let mut sim = Sim::with_data(linear(2, 1, 0), &["a", "b", "c"]);
        assert_eq!(sim.phase(), Some(Phase::Stats));
        let bad = ColumnSums {
            n: 10,
            sum: vec![5.0],
            sum_sq: vec![-1.0],
        };
        let err = sim.send_stats("b", &bad).expect_err("negative");
        assert!(matches!(err, Rejection::Invalid(_)) && !err.is_stale(), "{err:?}");
        assert!(err.to_string().contains("sum of squares is negative"), "{err}");
        assert_eq!(sim.rejected, ["b"], "b is told");
        // A second answer from b is a duplicate, not a second chance.
        let again = sim
            .send_stats(
                "b",
                &ColumnSums {
                    n: 10,
                    sum: vec![5.0],
                    sum_sq: vec![10.0],
                },
            )
            .expect_err("duplicate");
        assert!(matches!(again, Rejection::Duplicate { .. }), "{again:?}");
        // No rows is its own rule, kept next to the shared ones.
        let mut sim2 = Sim::with_data(linear(1, 1, 0), &["a", "z"]);
        let empty = ColumnSums {
            n: 0,
            sum: vec![0.0],
            sum_sq: vec![0.0],
        };
        let err = sim2.send_stats("z", &empty).expect_err("no rows");
        assert!(err.to_string().contains("no training rows"), "{err}");
        sim2.stats("a");
        assert_eq!(sim2.phase(), Some(Phase::Train));
        // a and c answer well: the phase closes on them without waiting for the deadline.
        sim.stats("a");
        assert_eq!(sim.phase(), Some(Phase::Stats), "c is still expected");
        sim.stats("c");
        assert_eq!(sim.phase(), Some(Phase::Train));
        assert!(sim
            .events()
            .contains("round 0: rejected answer from `b`: model: column sums are not all finite, or a sum of squares is negative"),
            "{}",
            sim.events()
        );
        assert!(
            sim.events()
                .contains("pooled standardisation computed from 2 node(s)"),
            "{}",
            sim.events()
        );
        let st = sim.exp.standardization().cloned().expect("pooled");
        assert_eq!(st.mean, [0.5], "b's sums are not in the pool");
    }
}
