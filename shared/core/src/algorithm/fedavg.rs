//! Federated averaging (FedAvg) of linear and logistic models, and the `echo` diagnostic.
//!
//! Steps: the pooled standardisation ([`super::standardize`]) once, then per round a training
//! step (every node trains from the global model and answers its local model, weighted by its
//! training rows, with its mean training loss as a side figure; the exact weighted mean is
//! the new global model) and an evaluation step ([`super::evaluate`]) scoring it on every
//! office's test rows. `echo` has neither statistics nor evaluation.
//!
//! Under `[privacy]` (DP-SGD, [`crate::privacy`]) only the training step runs: the
//! standardisation is made from the declared bounds (public, so no statistics step releases
//! exact sums) and there is no evaluation step (its test sums would be a further release the
//! privacy cost does not charge); each node's model has the public weight 1.

use std::sync::Arc;
use std::time::Instant;

use fedstat_proto::wire::{Phase, RoundRecord};

use crate::aggregate::{AggregatorKind, Pooled, Values};
use crate::spec::ExperimentSpec;
use crate::sums::Standardization;

use super::{evaluate, standardize, Algorithm, Answer, AnswerShape, Checkpoint, Progress, Report, Step};

#[derive(Debug)]
pub struct FedAvg {
    spec: ExperimentSpec,
    global: Arc<Values>,
    standardization: Option<Standardization>,
    history: Vec<RoundRecord>,
    /// The round whose training is done and whose evaluation is pending.
    trained: Option<RoundRecord>,
    /// When the current round's training step was first asked for.
    round_started: Option<(u32, Instant)>,
    /// A standardisation made from the declared bounds that is still to be reported.
    announce: bool,
}

impl FedAvg {
    pub fn new(spec: &ExperimentSpec, checkpoint: Checkpoint) -> Self {
        let global = checkpoint
            .global
            .unwrap_or_else(|| Values::zeros(spec.dtype(), spec.num_params() as usize));
        let mut standardization = checkpoint.standardization;
        let mut announce = false;
        if standardization.is_none() && spec.privacy.is_some() && spec.uses_data() {
            // Validation made sure every design column has declared bounds; a spec that did
            // not pass it runs the statistics step and is refused by the nodes.
            standardization = crate::privacy::bounds_standardization(spec).ok();
            announce = standardization.is_some();
        }
        FedAvg {
            spec: spec.clone(),
            global: Arc::new(global),
            standardization,
            history: checkpoint.history,
            trained: None,
            round_started: None,
            announce,
        }
    }

    /// Whether the experiment evaluates each round's model on the test rows.
    fn evaluates(&self) -> bool {
        self.spec.uses_data() && self.spec.privacy.is_none()
    }

    fn started(&self, round: u32, now: Instant) -> Instant {
        match self.round_started {
            Some((r, t)) if r == round => t,
            _ => now,
        }
    }

    fn complete_round(&mut self, now: Instant, mut record: RoundRecord, report: &mut Report) {
        record.round_ms = now
            .saturating_duration_since(self.started(record.round, now))
            .as_millis() as u64;
        report.progress.push(Progress::RoundCompleted {
            record: record.clone(),
            model: self.global.clone(),
        });
        self.history.push(record);
    }
}

impl Algorithm for FedAvg {
    fn next_step(&mut self, now: Instant) -> Option<Step> {
        if self.spec.uses_data() && self.standardization.is_none() {
            return Some(standardize::step(&self.spec));
        }
        if let Some(trained) = &self.trained {
            return Some(evaluate::step(
                &self.spec,
                trained.round,
                self.global.clone(),
                self.standardization.clone(),
            ));
        }
        let done = self.history.len() as u32;
        if done >= self.spec.rounds {
            return None;
        }
        let round = done + 1;
        if self.round_started.is_none_or(|(r, _)| r != round) {
            self.round_started = Some((round, now));
        }
        Some(Step {
            phase: Phase::Train,
            round,
            model: Some(self.global.clone()),
            standardization: self.standardization.clone(),
            answer: AnswerShape {
                dtype: self.spec.dtype(),
                len: self.spec.num_params(),
                aux: 1,
                weighted: true,
            },
            aggregator: AggregatorKind::of_phase(Phase::Train),
        })
    }

    fn check_answer(&self, step: &Step, answer: Answer<'_>) -> Result<(), String> {
        match step.phase {
            Phase::Stats => standardize::check(answer),
            Phase::Evaluate => evaluate::check(self.spec.model, answer),
            // The aggregate checks the range of every parameter and of the loss.
            Phase::Train => Ok(()),
            Phase::Glm | Phase::Table => Err("federated averaging asks for no such answer".to_owned()),
        }
    }

    fn finish_step(
        &mut self,
        now: Instant,
        step: &Step,
        pooled: Pooled,
        participants: Vec<String>,
        retries: u32,
    ) -> Result<Report, String> {
        let mut report = Report::default();
        if self.announce {
            if let Some(st) = &self.standardization {
                report
                    .events
                    .push("standardisation from the declared privacy bounds (no statistics step)".to_owned());
                report.progress.push(Progress::Standardized(st.clone()));
            }
            self.announce = false;
        }
        match step.phase {
            Phase::Stats => {
                let st = standardize::pool(&self.spec, &pooled.values)
                    .map_err(|e| format!("statistics phase: {e}"))?;
                report.events.push(format!(
                    "pooled standardisation computed from {} node(s)",
                    pooled.answers
                ));
                report.progress.push(Progress::Standardized(st.clone()));
                self.standardization = Some(st);
            }
            Phase::Train => {
                self.global = Arc::new(pooled.values);
                let started = self.started(step.round, now);
                let record = RoundRecord {
                    round: step.round,
                    participants,
                    total_examples: pooled.total_weight,
                    train_loss: pooled.aux.first().copied().unwrap_or(f64::NAN),
                    metrics: None,
                    train_ms: now.saturating_duration_since(started).as_millis() as u64,
                    round_ms: 0,
                    retries,
                };
                report.events.push(format!(
                    "round {}: aggregated {} update(s) over {} rows",
                    step.round,
                    record.participants.len(),
                    record.total_examples
                ));
                if self.evaluates() {
                    self.trained = Some(record);
                } else {
                    self.complete_round(now, record, &mut report);
                }
            }
            Phase::Glm | Phase::Table => {
                return Err(format!(
                    "round {}: federated averaging asked for {}",
                    step.round, step.phase
                ))
            }
            Phase::Evaluate => {
                let Some(mut record) = self.trained.take() else {
                    return Err(format!("round {}: evaluation without training", step.round));
                };
                let metrics = evaluate::pool(self.spec.model, &pooled.values)
                    .map_err(|e| format!("round {}: evaluation: {e}", step.round))?;
                record.metrics = Some(metrics);
                // The round's retries so far: training's and, after them, evaluation's.
                record.retries = retries;
                self.complete_round(now, record, &mut report);
            }
        }
        Ok(report)
    }

    fn history(&self) -> &[RoundRecord] {
        &self.history
    }

    fn model(&self) -> &Arc<Values> {
        &self.global
    }

    fn standardization(&self) -> Option<&Standardization> {
        self.standardization.as_ref()
    }
}
