//! Federated evaluation: every node scores the global model on its test rows and answers the
//! sums behind the pooled metrics, `[n, Σloss, correct, SSE, Σy, Σy², histogram of p for
//! y = 1, histogram for y = 0]` (the histograms for logistic models only, [`AUC_BINS`] bins
//! each); the exact sum gives the pooled metrics of every office's test rows together.
//! Node side: [`answer`]; coordinator side: [`step`], [`check`], [`pool`].

use std::sync::Arc;

use fedstat_proto::wire::{DType, Phase};

use crate::aggregate::{AggregatorKind, Values};
use crate::model::{metrics, EvalSums, Metrics, AUC_BINS};
use crate::spec::{ExperimentSpec, ModelKind};
use crate::sums::Standardization;

use super::{Answer, AnswerShape, Step};

const FIXED: usize = 6;

fn bins(kind: ModelKind) -> usize {
    if kind == ModelKind::Logistic {
        AUC_BINS
    } else {
        0
    }
}

/// The query: evaluation sums of `model` on the test rows of `round`.
pub fn step(spec: &ExperimentSpec, round: u32, model: Arc<Values>, st: Option<Standardization>) -> Step {
    Step {
        phase: Phase::Evaluate,
        round,
        model: Some(model),
        standardization: st,
        answer: AnswerShape {
            dtype: DType::F64,
            len: (FIXED + 2 * bins(spec.model)) as u64,
            aux: 0,
            weighted: false,
        },
        aggregator: AggregatorKind::of_phase(Phase::Evaluate),
    }
}

/// A node's answer: its evaluation sums as one vector. Counts up to 2^53 are exact in f64.
pub fn answer(s: &EvalSums) -> Values {
    let mut v = vec![s.n as f64, s.loss_sum, s.correct as f64, s.sse, s.sum_y, s.sum_y2];
    v.extend(s.hist_pos.iter().map(|&c| c as f64));
    v.extend(s.hist_neg.iter().map(|&c| c as f64));
    Values::F64(v)
}

/// Read a vector of evaluation sums back; `None` if a count is not a whole, non-negative number.
fn decode(v: &[f64]) -> Option<EvalSums> {
    let count = |x: f64| (x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53)).then_some(x as u64);
    let fixed = v.get(..FIXED)?;
    let rest = v.get(FIXED..)?;
    let half = rest.len() / 2;
    let hist = |h: &[f64]| h.iter().map(|&c| count(c)).collect::<Option<Vec<u64>>>();
    Some(EvalSums {
        n: count(fixed[0])?,
        loss_sum: fixed[1],
        correct: count(fixed[2])?,
        sse: fixed[3],
        sum_y: fixed[4],
        sum_y2: fixed[5],
        hist_pos: hist(&rest[..half])?,
        hist_neg: hist(&rest[half..])?,
    })
}

/// One node's answer: whole counts and the rules of [`EvalSums::validate`].
pub fn check(kind: ModelKind, answer: Answer<'_>) -> Result<(), String> {
    let sums = decode(&answer.values.to_f64()).ok_or("evaluation sums: a count is not a whole number")?;
    sums.validate(kind).map_err(|e| e.to_string())
}

/// The pooled metrics from the exact sum of the answers.
pub fn pool(kind: ModelKind, pooled: &Values) -> Result<Metrics, String> {
    let sums = decode(&pooled.to_f64()).ok_or("pooled evaluation sums are not whole counts")?;
    Ok(metrics(kind, &sums))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_split_counts_are_refused() {
        let s = EvalSums {
            n: 4,
            loss_sum: 2.0,
            correct: 3,
            hist_pos: (0..AUC_BINS as u64).map(|i| u64::from(i == 7)).collect(),
            hist_neg: (0..AUC_BINS as u64).map(|i| 3 * u64::from(i == 2)).collect(),
            ..EvalSums::default()
        };
        let v = answer(&s);
        assert_eq!(decode(&v.to_f64()), Some(s));
        let ok = Answer {
            values: &v,
            weight: 1,
            aux: &[],
        };
        assert!(check(ModelKind::Logistic, ok).is_ok());
        let mut bad = v.to_f64();
        bad[2] = 2.5;
        let bad = Values::F64(bad);
        let a = Answer {
            values: &bad,
            weight: 1,
            aux: &[],
        };
        assert!(check(ModelKind::Logistic, a).is_err());
    }
}
