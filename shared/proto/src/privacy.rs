//! Differential privacy and secure aggregation settings of an experiment, as the researcher
//! declares them and the custodian approves them (they are part of the manifest), and the
//! privacy cost they imply per round, which every node's budget ledger charges.
//!
//! The semantics (validation, the mechanisms, the accountant) live in `fedstat_core::privacy`;
//! what is here is the form and the cost both sides compute alike.

use serde::{Deserialize, Serialize};

use crate::spec::{ExperimentSpec, Method, ModelKind};

/// Record-level differential privacy of an experiment (`[privacy]` in the experiment TOML).
///
/// - Federated averaging: DP-SGD at every node (per-example clipping to `clip_norm`, Gaussian
///   noise of standard deviation `noise_multiplier × clip_norm` per step, Poisson subsampling
///   of each row with probability `sampling_rate`).
/// - Exact GLMs and tables: the Gaussian mechanism on each released sum, with its sensitivity
///   from the declared `bounds` (values are clipped into them at the node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    /// Noise standard deviation over the sensitivity (σ).
    pub noise_multiplier: f64,
    /// The δ at which ε is reported to the researcher (each node's ledger uses its own δ).
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// DP-SGD: per-example gradient clipping norm C.
    #[serde(default)]
    pub clip_norm: Option<f64>,
    /// DP-SGD: probability that a row takes part in a step (Poisson subsampling), in (0, 1].
    #[serde(default)]
    pub sampling_rate: Option<f64>,
    /// The Gaussian mechanism: the declared range of every numeric column the released sums
    /// use; values are clipped into it at the node.
    #[serde(default)]
    pub bounds: Vec<ColumnBound>,
    /// Node-level DP of the aggregate: each node clips its update to `clip_norm` and adds its
    /// share of Gaussian noise inside the secure sum (needs `secure_aggregation`).
    #[serde(default)]
    pub node_level: Option<NodeLevelDp>,
}

fn default_delta() -> f64 {
    1e-5
}

/// A declared clipping range of one numeric column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnBound {
    pub column: String,
    pub lower: f64,
    pub upper: f64,
}

/// Node-level DP of the aggregate (one office's whole contribution is the unit protected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeLevelDp {
    /// Bound on the L2 norm of a node's update (its change of the model).
    pub clip_norm: f64,
    /// Noise of the sum over the clip norm.
    pub noise_multiplier: f64,
}

/// What one round of an experiment costs in record-level privacy at a node: `steps`
/// compositions of the Gaussian mechanism with noise multiplier σ on a Poisson subsample of
/// rate q (q = 1: every row; the Gaussian mechanism on a sum). Composed by the RDP accountant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacyCost {
    pub sampling_rate: f64,
    pub noise_multiplier: f64,
    pub steps: u64,
}

impl ExperimentSpec {
    /// The record-level privacy cost of one round at a node, or `None` for an experiment
    /// without `[privacy]` (which a node's budget cannot cover: it releases exact sums).
    ///
    /// DP-SGD: `local_epochs / sampling_rate` steps (rounded up) per round. The Gaussian
    /// mechanism (exact GLMs, tables): one release per round of the whole answer vector, its
    /// L2 sensitivity calibrated as one mechanism.
    pub fn privacy_cost_per_round(&self) -> Option<PrivacyCost> {
        let p = self.privacy.as_ref()?;
        let fedavg =
            self.method == Method::FedAvg && matches!(self.model, ModelKind::Linear | ModelKind::Logistic);
        if fedavg {
            let q = p.sampling_rate.unwrap_or(1.0);
            let steps = if q > 0.0 {
                (f64::from(self.training.local_epochs) / q).ceil() as u64
            } else {
                0
            };
            Some(PrivacyCost {
                sampling_rate: q,
                noise_multiplier: p.noise_multiplier,
                steps,
            })
        } else {
            Some(PrivacyCost {
                sampling_rate: 1.0,
                noise_multiplier: p.noise_multiplier,
                steps: 1,
            })
        }
    }
}

/// What researchers see of an experiment's privacy (`fedstat status`, `results`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivacyView {
    /// Every sum was computed over masked answers.
    pub secure_aggregation: bool,
    /// The differential privacy settings, as approved.
    pub dp: Option<PrivacySpec>,
    /// Each node's record-level ε charged to this experiment so far, as the node reported it.
    pub spent: Vec<NodeSpend>,
}

/// One node's privacy spend for an experiment, as it reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpend {
    pub node: String,
    /// The last round the node charged.
    pub round: u32,
    /// ε charged to this experiment at the experiment's δ.
    pub epsilon: f64,
    /// The dataset's remaining budget, if the node's policy shows it.
    pub remaining: Option<f64>,
}
