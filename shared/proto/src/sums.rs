//! The pooled figures that travel: a node's statistics and evaluation sums, the pooled
//! standardisation sent with every task, and the pooled test metrics in a round's record.
//! Data only; `fedstat_core` computes, merges and checks them.

use serde::{Deserialize, Serialize};

/// Sums over the train rows of every non-const design column: what the statistics phase sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnSums {
    pub n: u64,
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
}

/// Pooled mean and population sd of every non-const design column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardization {
    pub mean: Vec<f64>,
    pub sd: Vec<f64>,
}

/// Evaluation sums of one node's test rows; sums from many nodes merge into the pooled metrics.
///
/// Logistic: `loss_sum` is Σ log-loss with p clipped to [1e-15, 1-1e-15], `correct` counts
/// `(p > 0.5) == y`, `hist_pos`/`hist_neg` count predicted p per bin for y = 1 / y = 0.
/// Linear: `sse` (also `loss_sum`), `sum_y`, `sum_y2`; empty histograms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EvalSums {
    pub n: u64,
    pub loss_sum: f64,
    pub correct: u64,
    pub sse: f64,
    pub sum_y: f64,
    pub sum_y2: f64,
    pub hist_pos: Vec<u64>,
    pub hist_neg: Vec<u64>,
}

/// Pooled test metrics; `None` where a metric does not apply or is undefined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Metrics {
    pub n: u64,
    pub log_loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub auc: Option<f64>,
    pub rmse: Option<f64>,
    pub r2: Option<f64>,
}
