//! Algorithms: what the federation computes, as sans-IO state machines on the engine
//! ([`crate::engine`]).
//!
//! An algorithm turns the pooled result of the last step into the next *query* (a [`Step`]:
//! what each node computes, the shape of its answer and how answers combine) or ends. The
//! engine does everything else: node selection, quorum, deadlines, retries, the approval
//! hand-off, events, durable progress and the exact sum. Every release is therefore a sum (or
//! a declared non-streaming aggregate) of node answers that each passed the node's checks.
//!
//! Registered algorithms ([`for_spec`]):
//! - [`fedavg`]: federated averaging of linear and logistic models, built from
//!   [`standardize`] (pooled column statistics) and [`evaluate`] (pooled test metrics);
//!   the `echo` diagnostic runs its training step alone.
//! - [`glm`]: exact GLMs (`method = "exact"`) by federated Newton/IRLS, with inference.
//! - [`table`]: federated tables with statistical disclosure control, one step.
//!
//! Adding one: a module here implementing [`Algorithm`] (its steps, the encoding of its
//! answers, its per-answer checks), the node's local computation for each new
//! [`Phase`], and a line in [`for_spec`]. See ARCHITECTURE.md.

pub mod evaluate;
pub mod fedavg;
pub mod glm;
pub mod standardize;
pub mod table;

use std::sync::Arc;
use std::time::Instant;

use fedstat_proto::output::Output;
use fedstat_proto::wire::{DType, Phase, RoundRecord};

use crate::aggregate::{AggregatorKind, Pooled, Values};
use crate::spec::ExperimentSpec;
use crate::sums::Standardization;

/// One query to the nodes: what they compute, with which inputs, and what comes back.
#[derive(Debug, Clone)]
pub struct Step {
    /// The local computation the nodes run.
    pub phase: Phase,
    /// Round of the experiment (0 before the first).
    pub round: u32,
    /// The model sent with the task, if the computation needs one.
    pub model: Option<Arc<Values>>,
    /// The pooled standardisation sent with the task, if any.
    pub standardization: Option<Standardization>,
    /// The shape of every answer.
    pub answer: AnswerShape,
    /// How the answers combine.
    pub aggregator: AggregatorKind,
}

/// What every node's answer to a step must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerShape {
    pub dtype: DType,
    pub len: u64,
    /// Side figures summed with the answer's weight.
    pub aux: usize,
    /// Answers to plain sums all have weight 1.
    pub weighted: bool,
}

/// One node's answer, as the engine hands it to [`Algorithm::check_answer`].
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub values: &'a Values,
    pub weight: u64,
    pub aux: &'a [f64],
}

/// What an algorithm reports when a step closes; the engine logs and records it in order.
#[derive(Debug, Default)]
pub struct Report {
    /// Lines for the experiment's event log.
    pub events: Vec<String>,
    /// Durable facts for the store.
    pub progress: Vec<Progress>,
}

/// A durable fact the coordinator must record, in order (see `Experiment::poll_progress`).
#[derive(Debug, Clone)]
pub enum Progress {
    /// The pooled standardisation is known.
    Standardized(Standardization),
    /// A round completed; `model` is the global model after it.
    RoundCompleted { record: RoundRecord, model: Arc<Values> },
    /// The experiment ended.
    Finished(fedstat_proto::wire::ExperimentState),
    /// A line of the event log.
    Event(fedstat_proto::wire::EventRecord),
    /// The experiment's final output (GLM inference, a table), recorded before `Finished`.
    Output(Output),
}

/// What a store keeps of an algorithm's progress: the standardisation, the completed rounds
/// and the model after the last one. Enough to continue after a coordinator restart.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    pub standardization: Option<Standardization>,
    pub history: Vec<RoundRecord>,
    pub global: Option<Values>,
    pub output: Option<Output>,
}

/// A federated algorithm: a state machine over steps. No I/O, no clock (times come in).
pub trait Algorithm: std::fmt::Debug + Send {
    /// The next query, or `None` when the experiment is complete. Called when the experiment
    /// starts or resumes, and after every step that closed.
    fn next_step(&mut self, now: Instant) -> Option<Step>;

    /// Checks of one answer specific to this algorithm (the engine has already checked its
    /// shape, and the aggregator checks its range). The reason names the rule, never a value.
    fn check_answer(&self, step: &Step, answer: Answer<'_>) -> Result<(), String>;

    /// The step closed with a quorum: `pooled` combines the answers of `participants`.
    /// `retries` is how many times the round was tried again so far. An error fails the
    /// experiment with that reason.
    fn finish_step(
        &mut self,
        now: Instant,
        step: &Step,
        pooled: Pooled,
        participants: Vec<String>,
        retries: u32,
    ) -> Result<Report, String>;

    /// Completed rounds, in order.
    fn history(&self) -> &[RoundRecord];

    /// The current model (the final one once complete).
    fn model(&self) -> &Arc<Values>;

    /// The pooled standardisation, once known.
    fn standardization(&self) -> Option<&Standardization>;

    /// The final output besides the parameters (GLM inference, a table), once complete.
    fn output(&self) -> Option<&Output> {
        None
    }
}

/// The algorithm an experiment runs, resuming from `checkpoint` (empty for a new one). The
/// spec must be validated.
pub fn for_spec(spec: &ExperimentSpec, checkpoint: Checkpoint) -> Box<dyn Algorithm> {
    if spec.is_exact_glm() {
        if let Some(glm) = glm::Glm::new(spec, checkpoint.clone()) {
            return Box::new(glm);
        }
    }
    match spec.model {
        crate::spec::ModelKind::Table => Box::new(table::Table::new(spec, checkpoint)),
        _ => Box::new(fedavg::FedAvg::new(spec, checkpoint)),
    }
}
