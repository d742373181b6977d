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
    /// Poisson regression (log link); `method = "exact"` only.
    Poisson,
    /// Gamma regression (log link); `method = "exact"` only.
    Gamma,
    /// Federated tables: counts, sums, means, variances and quantiles by group (see [`crate::table`]).
    Table,
    /// Diagnostic: nodes return the global parameters plus a small seeded change. Measures the
    /// federation's own cost (network, aggregation) without touching any data.
    Echo,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Linear => "linear",
            ModelKind::Logistic => "logistic",
            ModelKind::Poisson => "poisson",
            ModelKind::Gamma => "gamma",
            ModelKind::Table => "table",
            ModelKind::Echo => "echo",
        }
    }
}

/// How a model is fitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Federated averaging of local SGD (predictions; no standard errors).
    #[default]
    FedAvg,
    /// The pooled maximum-likelihood fit, exactly, by federated Newton/IRLS on sums over rows,
    /// with standard errors as R's `summary(glm)` reports them.
    Exact,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::FedAvg => "fedavg",
            Method::Exact => "exact",
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
    /// `fedavg` (default) or `exact`.
    #[serde(default)]
    pub method: Method,
    /// Number of federated-averaging rounds (exact fits and tables: leave at 1; an exact fit
    /// runs until it converges, at most `max_iterations` steps).
    #[serde(default = "default_rounds")]
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
    /// An R-style model formula, e.g. `log(wage) ~ education + I(experience^2) + ethnicity`,
    /// instead of the `[schema]` target and feature lists (factor levels are still declared
    /// in `[schema]`).
    #[serde(default)]
    pub formula: Option<String>,
    /// Exact GLMs: a numeric column of prior weights (non-negative).
    #[serde(default)]
    pub weights: Option<String>,
    /// Exact GLMs: a numeric column, or `log(column)`, added to the linear predictor with
    /// coefficient 1 (e.g. log exposure of a Poisson rate).
    #[serde(default)]
    pub offset: Option<String>,
    /// Exact GLMs: one indicator per office (the first in `offices` is the reference), so
    /// office (e.g. region) effects are fitted in the pooled model.
    #[serde(default)]
    pub office_effects: bool,
    /// The offices of an `office_effects` experiment, in order. Filled in by the coordinator
    /// from its nodes when left empty; part of what custodians approve.
    #[serde(default)]
    pub offices: Vec<String>,
    /// Exact GLMs: most Newton/IRLS iterations (rounds) before stopping with a warning.
    #[serde(default = "default_max_iterations")]
    pub max_iterations: u32,
    /// Required for `table`.
    #[serde(default)]
    pub table: Option<crate::table::TableSpec>,
    /// Secure aggregation: every sum of the experiment is computed over masked answers, so the
    /// coordinator learns only the total of at least `secure_threshold` offices.
    #[serde(default)]
    pub secure_aggregation: bool,
    /// Secure aggregation: how many offices must take part for a sum to be unmasked (the
    /// Shamir threshold). Default: the larger of `min_nodes` and a strict majority of the
    /// offices in the round.
    #[serde(default)]
    pub secure_threshold: Option<u32>,
    /// Record-level differential privacy (DP-SGD, or the Gaussian mechanism on bounded sums).
    #[serde(default)]
    pub privacy: Option<crate::privacy::PrivacySpec>,
}

fn default_max_iterations() -> u32 {
    25
}

fn default_rounds() -> u32 {
    1
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
    /// The response of the list form; with a `formula`, leave it out (the formula names it).
    #[serde(default)]
    pub target: Option<TargetSpec>,
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
    /// Number of model parameters: `echo`'s declared count, 0 for tables and for a spec
    /// without a valid design (validation refuses those).
    pub fn num_params(&self) -> u64 {
        match (&self.model, &self.echo) {
            (ModelKind::Echo, Some(echo)) => echo.params,
            (ModelKind::Echo | ModelKind::Table, _) => 0,
            _ => self.design().map_or(0, |d| d.columns.len() as u64),
        }
    }

    /// Length of the model a task carries: the parameters, and for an exact fit one more value,
    /// the intercept of the intercept-only model fitted alongside (for the null deviance).
    pub fn model_len(&self) -> u64 {
        self.num_params() + u64::from(self.is_exact_glm())
    }

    /// Number of office indicator columns: one per office but the reference (the first).
    pub fn office_columns(&self) -> usize {
        if self.office_effects {
            self.offices.len().saturating_sub(1)
        } else {
            0
        }
    }

    /// Names of the model's parameters, in order (see [`crate::design`]): the design columns,
    /// then `office=NAME` for every office but the first. Empty for `echo`, `table` and a spec
    /// without a valid design.
    pub fn design_columns(&self) -> Vec<String> {
        self.design().map(|d| d.names()).unwrap_or_default()
    }

    /// Whether parameters travel as float32 (echo) or float64 (the GLMs).
    pub fn dtype(&self) -> DType {
        match self.model {
            ModelKind::Echo => DType::F32,
            _ => DType::F64,
        }
    }

    /// Whether the experiment reads data.
    pub fn uses_data(&self) -> bool {
        self.model != ModelKind::Echo
    }

    /// Most rounds the experiment may run: `rounds` for federated averaging; for an exact fit
    /// `max_iterations` steps and one more round for the sums at the final coefficients.
    pub fn max_rounds(&self) -> u32 {
        if self.is_exact_glm() {
            self.max_iterations.saturating_add(1)
        } else {
            self.rounds
        }
    }

    /// Whether the experiment is an exact GLM fit (federated Newton/IRLS).
    pub fn is_exact_glm(&self) -> bool {
        self.method == Method::Exact
            && matches!(
                self.model,
                ModelKind::Linear | ModelKind::Logistic | ModelKind::Poisson | ModelKind::Gamma
            )
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
