//! Pooled standardisation: every node answers `[n, Σx_1..Σx_k, Σx²_1..Σx²_k]` over its train
//! rows (the non-constant design columns); the exact sum gives the pooled mean and population
//! sd of every column. Node side: [`answer`]; coordinator side: [`step`], [`check`], [`pool`].

use fedstat_proto::wire::{DType, Phase};

use crate::aggregate::{AggregatorKind, Values};
use crate::data::{ColumnSums, StandardizationExt};
use crate::spec::ExperimentSpec;
use crate::sums::Standardization;

use super::{Answer, AnswerShape, Step};

/// Non-constant design columns of the experiment.
fn width(spec: &ExperimentSpec) -> usize {
    spec.num_params().saturating_sub(1) as usize
}

/// The query: column sums over the train rows (round 0, before training).
pub fn step(spec: &ExperimentSpec) -> Step {
    Step {
        phase: Phase::Stats,
        round: 0,
        model: None,
        standardization: None,
        answer: AnswerShape {
            dtype: DType::F64,
            len: 1 + 2 * width(spec) as u64,
            aux: 0,
            weighted: false,
        },
        aggregator: AggregatorKind::of_phase(Phase::Stats),
    }
}

/// A node's answer: its column sums as one vector.
pub fn answer(sums: &ColumnSums) -> Values {
    let mut v = Vec::with_capacity(1 + 2 * sums.sum.len());
    v.push(sums.n as f64);
    v.extend_from_slice(&sums.sum);
    v.extend_from_slice(&sums.sum_sq);
    Values::F64(v)
}

/// Read a vector of column sums back (one node's, or the pooled sum).
fn decode(v: &[f64]) -> ColumnSums {
    let k = v.len().saturating_sub(1) / 2;
    ColumnSums {
        n: v.first().map_or(0, |&n| n as u64),
        sum: v.get(1..1 + k).unwrap_or_default().to_vec(),
        sum_sq: v.get(1 + k..).unwrap_or_default().to_vec(),
    }
}

/// One node's answer: a whole, positive row count and the rules of [`ColumnSums::validate`].
pub fn check(answer: Answer<'_>) -> Result<(), String> {
    let v = answer.values.to_f64();
    let n = v.first().copied().unwrap_or(0.0);
    if !(n >= 1.0 && n.fract() == 0.0) {
        return Err("no training rows, or a row count that is not a whole number".into());
    }
    let sums = decode(&v);
    sums.validate(sums.sum.len()).map_err(|e| e.to_string())
}

/// The pooled standardisation from the exact sum of the answers.
pub fn pool(spec: &ExperimentSpec, pooled: &Values) -> Result<Standardization, String> {
    let names: Vec<String> = spec
        .schema
        .as_ref()
        .map(|s| s.design_columns().into_iter().skip(1).collect())
        .unwrap_or_default();
    Standardization::from_sums(&[decode(&pooled.to_f64())], &names).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_bad_counts_are_refused() {
        let sums = ColumnSums {
            n: 10,
            sum: vec![5.0, -3.0],
            sum_sq: vec![10.0, 4.0],
        };
        let v = answer(&sums);
        assert_eq!(decode(&v.to_f64()), sums);
        let ok = Answer {
            values: &v,
            weight: 1,
            aux: &[],
        };
        assert!(check(ok).is_ok());
        for bad in [vec![0.0, 1.0, 1.0], vec![2.5, 1.0, 1.0], vec![2.0, 1.0, -1.0]] {
            let values = Values::F64(bad);
            let a = Answer {
                values: &values,
                weight: 1,
                aux: &[],
            };
            assert!(check(a).is_err(), "{values:?}");
        }
    }
}
