//! The pooled figures that travel: the pooled standardisation sent with every task, and the
//! pooled test metrics in a round's record. Data only; `fedstat_core` computes and checks them.

use serde::{Deserialize, Serialize};

/// Pooled mean and population sd of every non-const design column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardization {
    pub mean: Vec<f64>,
    pub sd: Vec<f64>,
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
