//! The experiment form: what a researcher submits (as TOML) and what the coordinator sends to
//! every node. It names columns and levels only, never data values. Its validation lives in
//! `fedstat_core::spec`; what is here is the data and the shape it implies (parameters,
//! design columns), which both sides must compute alike.

use serde::{Deserialize, Serialize};

use crate::wire::DType;

/// The kind of model an experiment trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Linear regression with intercept, squared-error loss.
    Linear,
    /// Binary logistic regression with intercept, log-loss.
    Logistic,
    /// Diagnostic: nodes return the global parameters plus a small seeded change. Measures the
    /// federation's own cost (network, aggregation) without touching any data.
    Echo,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Linear => "linear",
            ModelKind::Logistic => "logistic",
            ModelKind::Echo => "echo",
        }
    }
}

/// A submitted experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    /// Short human name, shown by `fedstat status`.
    pub name: String,
    /// Why the experiment is run; recorded with it.
    #[serde(default)]
    pub purpose: String,
    /// The dataset name every participating node must offer (a key of its `[datasets]`).
    #[serde(default)]
    pub dataset: String,
    pub model: ModelKind,
    /// Number of federated-averaging rounds.
    pub rounds: u32,
    /// Fewest answers with which a round may close at its deadline.
    #[serde(default = "default_min_nodes")]
    pub min_nodes: u32,
    /// How long a phase of a round waits for answers, in seconds.
    #[serde(default = "default_round_timeout")]
    pub round_timeout_secs: u64,
    /// How many times a round that misses its quorum is tried again before the experiment fails.
    #[serde(default = "default_retries")]
    pub max_round_retries: u32,
    /// Columns and target; required for `linear` and `logistic`.
    #[serde(default)]
    pub schema: Option<DataSchema>,
    #[serde(default)]
    pub training: TrainingSpec,
    /// Required for `echo`.
    #[serde(default)]
    pub echo: Option<EchoSpec>,
}

fn default_min_nodes() -> u32 {
    1
}
fn default_round_timeout() -> u64 {
    120
}
fn default_retries() -> u32 {
    2
}

/// How a node turns its CSV into a design matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSchema {
    /// Column whose value is `train` or `test`.
    #[serde(default = "default_split_column")]
    pub split_column: String,
    pub target: TargetSpec,
    /// Numeric features, in design order, each optionally followed by its square.
    #[serde(default)]
    pub numeric: Vec<NumericFeature>,
    /// Categorical features, one-hot coded with the reference level dropped, after the numerics.
    #[serde(default)]
    pub categorical: Vec<CategoricalFeature>,
}

fn default_split_column() -> String {
    "split".to_owned()
}

/// The response variable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub column: String,
    /// Linear only: model `ln(column)`; the column must then be positive.
    #[serde(default)]
    pub log: bool,
    /// Logistic on a numeric column: the target is 1 when the value is above this threshold.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Logistic on a categorical column: the target is 1 when the value is this level.
    #[serde(default)]
    pub positive_level: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumericFeature {
    pub column: String,
    /// Also add `column^2` (raw square, before standardisation) right after it.
    #[serde(default)]
    pub squared: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoricalFeature {
    pub column: String,
    /// Every allowed level, in order; any other value in the data is an error.
    pub levels: Vec<String>,
    /// The level whose dummy is dropped.
    pub reference: String,
}

/// Local training at each node: mini-batch SGD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSpec {
    /// Passes over the local training rows per round.
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    /// L2 penalty on the non-intercept coefficients (standardised scale).
    pub l2: f64,
    /// Seed of the shuffling; with the same participants a run is reproducible bit for bit.
    pub seed: u64,
}

impl Default for TrainingSpec {
    fn default() -> Self {
        TrainingSpec {
            local_epochs: 1,
            batch_size: 32,
            learning_rate: 0.05,
            l2: 0.0,
            seed: 1,
        }
    }
}

/// The diagnostic `echo` model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EchoSpec {
    /// Number of float32 parameters.
    pub params: u64,
}

impl ExperimentSpec {
    /// Number of model parameters.
    pub fn num_params(&self) -> u64 {
        match (&self.model, &self.echo, &self.schema) {
            (ModelKind::Echo, Some(echo), _) => echo.params,
            (_, _, Some(schema)) => schema.design_width() as u64,
            _ => 0,
        }
    }

    /// Whether parameters travel as float32 (echo) or float64 (the GLMs).
    pub fn dtype(&self) -> DType {
        match self.model {
            ModelKind::Echo => DType::F32,
            _ => DType::F64,
        }
    }

    /// Whether the experiment reads data (and so has a statistics and an evaluation phase).
    pub fn uses_data(&self) -> bool {
        self.model != ModelKind::Echo
    }
}

impl DataSchema {
    /// Number of design columns, computed without building their names (a spec from the
    /// network is sized before anything is allocated for it).
    pub fn design_width(&self) -> usize {
        let numeric: usize = self.numeric.iter().map(|f| if f.squared { 2 } else { 1 }).sum();
        let dummies: usize = self
            .categorical
            .iter()
            .map(|f| f.levels.len().saturating_sub(1))
            .sum();
        1 + numeric + dummies
    }

    /// Names of the design-matrix columns, in order: `const`, each numeric (then `name^2` when
    /// squared), then `column=level` for every non-reference level.
    pub fn design_columns(&self) -> Vec<String> {
        let mut cols = vec!["const".to_owned()];
        for f in &self.numeric {
            cols.push(f.column.clone());
            if f.squared {
                cols.push(format!("{}^2", f.column));
            }
        }
        for f in &self.categorical {
            for level in f.levels.iter().filter(|l| **l != f.reference) {
                cols.push(format!("{}={}", f.column, level));
            }
        }
        cols
    }
}
