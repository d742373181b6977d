//! The site policy: the data custodian's rules for what may run on this office's data, from
//! the `[policy]` table of the node config. Checked by the node for every task, never by the
//! coordinator: a researcher cannot loosen it. A refusal ([`Refusal`]) names the rule that
//! failed and the column at most: never a data value nor a count from the data.
//!
//! Defaults are safe: no column may be used until the custodian lists it, cells of fewer than
//! 10 rows are never released, and every training setting that could isolate a person is
//! bounded. `docs/disclosure.md` explains each rule and the attack it stops.

use std::collections::BTreeSet;

use fedstat_core::spec::{ExperimentSpec, ModelKind};
use serde::Deserialize;

/// Whether manifests the policy allows run at once or wait for the custodian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalMode {
    /// Every manifest the policy allows runs at once (unless the custodian rejected it).
    #[default]
    Auto,
    /// Every new manifest is held until `fedstat-node approve HASH`.
    Manual,
}

impl ApprovalMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalMode::Auto => "auto",
            ApprovalMode::Manual => "manual",
        }
    }
}

/// `[policy]` as written; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    allowed_datasets: Option<Vec<String>>,
    allowed_features: Option<Vec<String>>,
    allowed_targets: Option<Vec<String>>,
    allowed_models: Option<Vec<ModelKind>>,
    max_rounds: Option<u32>,
    min_train_rows: Option<u64>,
    min_rows_per_param: Option<f64>,
    min_cell: Option<u64>,
    min_batch_size: Option<u32>,
    max_local_epochs: Option<u32>,
    min_nodes_floor: Option<u32>,
    max_params: Option<u64>,
    max_levels: Option<usize>,
    max_memory_mb: Option<u64>,
    count_rounding: Option<u64>,
    dominance_n: Option<u32>,
    dominance_k: Option<f64>,
    require_dp: Option<bool>,
    require_secure_aggregation: Option<bool>,
    secure_peers: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    approval: ApprovalMode,
    privacy: Option<RawPrivacyBudget>,
}

/// `[policy.privacy]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPrivacyBudget {
    epsilon: f64,
    delta: Option<f64>,
    #[serde(default)]
    show_remaining: bool,
    #[serde(default)]
    datasets: std::collections::BTreeMap<String, RawDatasetBudget>,
}

/// `[policy.privacy.datasets.NAME]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDatasetBudget {
    epsilon: Option<f64>,
    delta: Option<f64>,
}

/// The δ of a privacy budget when the policy does not say.
pub const DEFAULT_BUDGET_DELTA: f64 = 1e-5;

/// One dataset's record-level privacy budget: at most `epsilon` at `delta`, over every
/// differentially private experiment the node ever answers on it (see [`crate::ledger`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub epsilon: f64,
    pub delta: f64,
}

/// `[policy.privacy]`: the custodian's privacy budget per dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyBudget {
    /// `policy.privacy.epsilon` and `policy.privacy.delta` (default 1e-5): every dataset's
    /// budget unless overridden.
    pub default: Budget,
    /// `policy.privacy.datasets.NAME.epsilon` / `.delta`: a dataset's own budget.
    pub datasets: std::collections::BTreeMap<String, Budget>,
    /// `policy.privacy.show_remaining`: whether researchers are told the budget left.
    pub show_remaining: bool,
}

impl PrivacyBudget {
    /// The budget of `dataset`.
    pub fn of(&self, dataset: &str) -> Budget {
        self.datasets.get(dataset).copied().unwrap_or(self.default)
    }
}

pub const DEFAULT_MAX_ROUNDS: u32 = 100;
pub const DEFAULT_MIN_TRAIN_ROWS: u64 = 10;
pub const DEFAULT_MIN_ROWS_PER_PARAM: f64 = 3.0;
/// Fewest training rows per parameter of an exact GLM at each node, whatever the policy says.
pub const EXACT_MIN_ROWS_PER_PARAM: f64 = 3.0;
/// A common NSO output-checking threshold: no cell of fewer than 10 people.
pub const DEFAULT_MIN_CELL: u64 = 10;
pub const DEFAULT_MAX_LOCAL_EPOCHS: u32 = 10;
/// With fewer than three offices in a pooled answer, one office can subtract its own share.
pub const DEFAULT_MIN_NODES_FLOOR: u32 = 3;
pub const DEFAULT_MAX_PARAMS: u64 = 1_000;
pub const DEFAULT_MAX_LEVELS: usize = 50;
pub const DEFAULT_MAX_MEMORY_MB: u64 = 1_024;
pub const DEFAULT_COUNT_ROUNDING: u64 = 10;
/// Tables: the 2 largest contributions to a cell's sum may not exceed 85% of it.
pub const DEFAULT_DOMINANCE_N: u32 = 2;
pub const DEFAULT_DOMINANCE_K: f64 = 85.0;

/// Which columns may be used: any (`["*"]`, for demos), or exactly those listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Columns {
    Any,
    Only(BTreeSet<String>),
}

impl Columns {
    pub fn allows(&self, column: &str) -> bool {
        match self {
            Columns::Any => true,
            Columns::Only(set) => set.contains(column),
        }
    }
}

/// The validated site policy.
#[derive(Debug, Clone, PartialEq)]
pub struct SitePolicy {
    /// `policy.allowed_datasets`: dataset names experiments may use (default: every offered one).
    pub allowed_datasets: Option<BTreeSet<String>>,
    /// `policy.allowed_features`: CSV columns that may be used as features (default: none).
    pub allowed_features: Columns,
    /// `policy.allowed_targets`: CSV columns that may be used as the target (default: none).
    pub allowed_targets: Columns,
    /// `policy.allowed_models`: model kinds (default: all, including the data-free `echo`).
    pub allowed_models: Vec<ModelKind>,
    /// `policy.max_rounds`: most rounds an experiment may ask for, and highest round answered.
    pub max_rounds: u32,
    /// `policy.min_train_rows`: fewest training rows behind any answer.
    pub min_train_rows: u64,
    /// `policy.min_rows_per_param`: training rows needed per model parameter (saturation
    /// limit; 3 means the parameters are at most a third of the rows).
    pub min_rows_per_param: f64,
    /// `policy.min_cell`: fewest rows in any level of a categorical feature and in its
    /// complement, in either class of a binary target, in either split, and in the difference
    /// between two released row sets (differencing).
    pub min_cell: u64,
    /// `policy.min_batch_size`: smallest SGD batch (default: `min_cell`).
    pub min_batch_size: u32,
    /// `policy.max_local_epochs`.
    pub max_local_epochs: u32,
    /// `policy.min_nodes_floor`: smallest `min_nodes` an experiment on data may ask for.
    pub min_nodes_floor: u32,
    /// `policy.max_params`: most model parameters (design columns, or `echo` parameters).
    pub max_params: u64,
    /// `policy.max_levels`: most levels one categorical feature may declare.
    pub max_levels: usize,
    /// `policy.max_memory_mb`: budget for the design matrices of one experiment.
    pub max_memory_mb: u64,
    /// `policy.count_rounding`: row counts sent as update weights are rounded to a multiple
    /// of this.
    pub count_rounding: u64,
    /// `policy.dominance_n` and `policy.dominance_k` (percent): in a table, the `n` largest
    /// |x| in a cell may not exceed `k`% of the cell's Σ|x| (the stricter of these and the
    /// experiment's own apply).
    pub dominance_n: u32,
    pub dominance_k: f64,
    /// `policy.require_dp`: refuse experiments on data without a `[privacy]` table.
    pub require_dp: bool,
    /// `policy.require_secure_aggregation`: refuse experiments on data without
    /// `secure_aggregation = true`.
    pub require_secure_aggregation: bool,
    /// `[policy.secure_peers]`: office name → key fingerprint (`sha256:…`, see
    /// `fedstat-node fingerprint`). When set, this node takes part in a secure sum only if every
    /// other member is listed and signs with the listed key: a secretariat that also runs the
    /// CA cannot surround the office with offices of its own making (sybils) and subtract them.
    pub secure_peers: Option<std::collections::BTreeMap<String, String>>,
    /// `policy.approval`.
    pub approval: ApprovalMode,
    /// `[policy.privacy]`: the privacy budget per dataset. Without it, differentially private
    /// experiments are charged (the ledger shows their spend) but not limited: they release
    /// no more than the exact sums an experiment without `[privacy]` may release.
    pub privacy: Option<PrivacyBudget>,
}

impl Default for SitePolicy {
    fn default() -> Self {
        SitePolicy {
            allowed_datasets: None,
            allowed_features: Columns::Only(BTreeSet::new()),
            allowed_targets: Columns::Only(BTreeSet::new()),
            allowed_models: vec![
                ModelKind::Linear,
                ModelKind::Logistic,
                ModelKind::Poisson,
                ModelKind::Gamma,
                ModelKind::Table,
                ModelKind::Echo,
            ],
            max_rounds: DEFAULT_MAX_ROUNDS,
            min_train_rows: DEFAULT_MIN_TRAIN_ROWS,
            min_rows_per_param: DEFAULT_MIN_ROWS_PER_PARAM,
            min_cell: DEFAULT_MIN_CELL,
            min_batch_size: DEFAULT_MIN_CELL as u32,
            max_local_epochs: DEFAULT_MAX_LOCAL_EPOCHS,
            min_nodes_floor: DEFAULT_MIN_NODES_FLOOR,
            max_params: DEFAULT_MAX_PARAMS,
            max_levels: DEFAULT_MAX_LEVELS,
            max_memory_mb: DEFAULT_MAX_MEMORY_MB,
            count_rounding: DEFAULT_COUNT_ROUNDING,
            dominance_n: DEFAULT_DOMINANCE_N,
            dominance_k: DEFAULT_DOMINANCE_K,
            require_dp: false,
            require_secure_aggregation: false,
            secure_peers: None,
            approval: ApprovalMode::Auto,
            privacy: None,
        }
    }
}

/// Which part of a dataset a cell rule was checked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "training",
            Split::Test => "test",
        })
    }
}

/// Why the site policy refuses an experiment or a task. The text names the rule (its policy
/// key) and at most a column or the researcher's own setting: never a value or a count from
/// the data. It is what the researcher sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    ModelNotAllowed(ModelKind),
    TooManyRounds {
        asked: u32,
        max: u32,
    },
    DatasetNotAllowed(String),
    TargetNotAllowed(String),
    FeatureNotAllowed(String),
    BatchTooSmall {
        min: u32,
    },
    TooManyEpochs {
        max: u32,
    },
    MinNodesBelowFloor {
        floor: u32,
    },
    TooManyParams {
        max: u64,
    },
    TooManyLevels {
        column: String,
        max: usize,
    },
    TooFewTrainRows {
        min: u64,
    },
    Saturated {
        params: u64,
        per_param: String,
    },
    /// A level of `column` (or the rest of the rows) has fewer than `min_cell` rows.
    SmallLevel {
        column: String,
        split: Split,
    },
    /// A class of the binary target has fewer than `min_cell` rows.
    SmallClass {
        column: String,
        split: Split,
    },
    /// A cell of the factor × factor interaction `columns` (`a:b`), or the rest of the rows,
    /// has fewer than `min_cell` rows.
    SmallCell {
        columns: String,
        split: Split,
    },
    /// The offset is not a finite number on every row.
    BadOffset {
        column: String,
    },
    /// The training or test split has fewer than `min_cell` rows.
    SmallSplit {
        split: Split,
    },
    /// A row set this experiment would release differs from one released before by fewer
    /// than `min_cell` rows (but not by none).
    Differencing {
        what: String,
    },
    /// One row would carry more than `1/min_cell` of the working weight of an exact fit's sums.
    Concentrated,
    /// The experiment's record-level privacy cost, composed with what its dataset has spent,
    /// would exceed the dataset's budget (the figures go to the node's log only).
    PrivacyBudget,
    /// The experiment has no `[privacy]` table and the policy requires one.
    DpRequired,
    /// The experiment does not use secure aggregation and the policy requires it.
    SecureAggregationRequired,
    /// A differentially private experiment was asked for an answer (this phase) that its
    /// privacy cost does not cover.
    NotPrivate(String),
    /// A member of a secure sum is not among the pinned peers, or signs with another key
    /// (which member goes to the node's log only).
    UnpinnedPeer,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ModelNotAllowed(m) => {
                write!(
                    f,
                    "model kind `{}` is not allowed (policy.allowed_models)",
                    m.as_str()
                )
            }
            Refusal::TooManyRounds { asked, max } => write!(
                f,
                "{asked} rounds asked, more than the maximum of {max} (policy.max_rounds)"
            ),
            Refusal::DatasetNotAllowed(d) => write!(
                f,
                "dataset `{}` is not allowed (policy.allowed_datasets)",
                fedstat_core::text::printable(d)
            ),
            Refusal::TargetNotAllowed(c) => write!(
                f,
                "column `{}` is not allowed as the target (policy.allowed_targets)",
                fedstat_core::text::printable(c)
            ),
            Refusal::FeatureNotAllowed(c) => write!(
                f,
                "column `{}` is not allowed as a feature (policy.allowed_features)",
                fedstat_core::text::printable(c)
            ),
            Refusal::BatchTooSmall { min } => write!(
                f,
                "training.batch_size is below the minimum of {min} (policy.min_batch_size)"
            ),
            Refusal::TooManyEpochs { max } => write!(
                f,
                "training.local_epochs is above the maximum of {max} (policy.max_local_epochs)"
            ),
            Refusal::MinNodesBelowFloor { floor } => write!(
                f,
                "min_nodes is below this office's floor of {floor} offices per pooled answer \
                 (policy.min_nodes_floor)"
            ),
            Refusal::TooManyParams { max } => {
                write!(f, "the model has more than {max} parameters (policy.max_params)")
            }
            Refusal::TooManyLevels { column, max } => write!(
                f,
                "column `{}` declares more than {max} levels (policy.max_levels)",
                fedstat_core::text::printable(column)
            ),
            Refusal::TooFewTrainRows { min } => write!(
                f,
                "fewer training rows than the minimum of {min} (policy.min_train_rows)"
            ),
            Refusal::Saturated { params, per_param } => write!(
                f,
                "the model's {params} parameters would saturate the data: at least {per_param} \
                 training rows per parameter are required (policy.min_rows_per_param)"
            ),
            Refusal::SmallLevel { column, split } => write!(
                f,
                "column `{}`: a level, or the rows outside it, has too few {split} rows \
                 (policy.min_cell)",
                fedstat_core::text::printable(column)
            ),
            Refusal::SmallClass { column, split } => write!(
                f,
                "target `{}`: a class has too few {split} rows (policy.min_cell)",
                fedstat_core::text::printable(column)
            ),
            Refusal::SmallCell { columns, split } => write!(
                f,
                "interaction `{}`: a cell, or the rows outside it, has too few {split} rows \
                 (policy.min_cell)",
                fedstat_core::text::printable(columns)
            ),
            Refusal::BadOffset { column } => write!(
                f,
                "offset `{}` is not a finite number on every row",
                fedstat_core::text::printable(column)
            ),
            Refusal::SmallSplit { split } => {
                write!(f, "the {split} split has too few rows (policy.min_cell)")
            }
            Refusal::Concentrated => write!(
                f,
                "dominance: at the coefficients sent, one row would carry too large a share of \
                 the GLM sums (policy.min_cell)"
            ),
            Refusal::PrivacyBudget => f.write_str(
                "privacy budget: the experiment would exceed this dataset's budget \
                 (policy.privacy.epsilon)",
            ),
            Refusal::DpRequired => write!(
                f,
                "this office requires differential privacy: the experiment needs a [privacy] \
                 table (policy.require_dp)"
            ),
            Refusal::SecureAggregationRequired => write!(
                f,
                "this office requires secure aggregation: the experiment needs \
                 secure_aggregation = true (policy.require_secure_aggregation)"
            ),
            Refusal::UnpinnedPeer => f.write_str(
                "a member of the secure sum is not one of this office's pinned peers, or not with \
                 its pinned key (policy.secure_peers)",
            ),
            Refusal::NotPrivate(phase) => write!(
                f,
                "a differentially private experiment releases no exact {phase} answers \
                 ([privacy])"
            ),
            Refusal::Differencing { what } => write!(
                f,
                "differencing: the {what} would differ from rows this office released before by \
                 too few rows (policy.min_cell)"
            ),
        }
    }
}

impl RawPolicy {
    /// Validate; `Err((key, problem))` names the key under `policy.`.
    pub(crate) fn validate(self) -> Result<SitePolicy, (String, String)> {
        let d = SitePolicy::default();
        let err = |key: &str, problem: &str| (format!("policy.{key}"), problem.to_owned());
        let names = |key: &str, v: &[String]| -> Result<(), (String, String)> {
            if v.iter().any(|s| s.trim().is_empty()) {
                return Err(err(key, "names must not be empty"));
            }
            Ok(())
        };
        let columns = |key: &str, v: Option<Vec<String>>| -> Result<Columns, (String, String)> {
            match v {
                None => Ok(Columns::Only(BTreeSet::new())),
                Some(items) if items.iter().any(|s| s == "*") => {
                    if items.len() > 1 {
                        return Err(err(key, "\"*\" (any column) stands alone"));
                    }
                    Ok(Columns::Any)
                }
                Some(items) => {
                    names(key, &items)?;
                    Ok(Columns::Only(items.into_iter().collect()))
                }
            }
        };
        let allowed_datasets = match self.allowed_datasets {
            None => None,
            Some(items) => {
                names("allowed_datasets", &items)?;
                Some(items.into_iter().collect())
            }
        };
        let max_rounds = self.max_rounds.unwrap_or(d.max_rounds);
        if max_rounds == 0 {
            return Err(err("max_rounds", "must be at least 1"));
        }
        let min_train_rows = self.min_train_rows.unwrap_or(d.min_train_rows);
        if min_train_rows == 0 {
            return Err(err("min_train_rows", "must be at least 1"));
        }
        let min_rows_per_param = self.min_rows_per_param.unwrap_or(d.min_rows_per_param);
        if !(min_rows_per_param.is_finite() && (1.0..=1e6).contains(&min_rows_per_param)) {
            return Err(err(
                "min_rows_per_param",
                "must be a number between 1 and 1000000",
            ));
        }
        let min_cell = self.min_cell.unwrap_or(d.min_cell);
        if min_cell == 0 || min_cell > 1_000_000 {
            return Err(err("min_cell", "must be between 1 and 1000000"));
        }
        let min_batch_size = self
            .min_batch_size
            .unwrap_or(u32::try_from(min_cell).unwrap_or(u32::MAX));
        if min_batch_size == 0 {
            return Err(err("min_batch_size", "must be at least 1"));
        }
        let max_local_epochs = self.max_local_epochs.unwrap_or(d.max_local_epochs);
        if max_local_epochs == 0 || max_local_epochs > fedstat_core::spec::MAX_LOCAL_EPOCHS {
            return Err(err("max_local_epochs", "must be between 1 and 1000"));
        }
        let min_nodes_floor = self.min_nodes_floor.unwrap_or(d.min_nodes_floor);
        if min_nodes_floor == 0 {
            return Err(err("min_nodes_floor", "must be at least 1"));
        }
        let max_params = self.max_params.unwrap_or(d.max_params);
        if max_params == 0 || max_params > fedstat_core::spec::MAX_PARAMS {
            return Err(err("max_params", "must be between 1 and 100000000"));
        }
        let max_levels = self.max_levels.unwrap_or(d.max_levels);
        if !(2..=fedstat_core::spec::MAX_LEVELS).contains(&max_levels) {
            return Err(err("max_levels", "must be between 2 and 1000"));
        }
        let max_memory_mb = self.max_memory_mb.unwrap_or(d.max_memory_mb);
        if max_memory_mb == 0 || max_memory_mb > 1 << 30 {
            return Err(err("max_memory_mb", "must be between 1 and 1073741824"));
        }
        let count_rounding = self.count_rounding.unwrap_or(d.count_rounding);
        if count_rounding == 0 || count_rounding > 1_000_000 {
            return Err(err("count_rounding", "must be between 1 and 1000000"));
        }
        let dominance_n = self.dominance_n.unwrap_or(d.dominance_n);
        if dominance_n == 0 || dominance_n > 10 {
            return Err(err("dominance_n", "must be between 1 and 10"));
        }
        let dominance_k = self.dominance_k.unwrap_or(d.dominance_k);
        if !(dominance_k > 0.0 && dominance_k <= 100.0) {
            return Err(err("dominance_k", "must be a percentage in (0, 100]"));
        }
        let privacy = match self.privacy {
            None => None,
            Some(raw) => Some(raw.validate()?),
        };
        let secure_peers = match self.secure_peers {
            None => None,
            Some(raw) => Some(validate_peers(raw)?),
        };
        Ok(SitePolicy {
            privacy,
            allowed_datasets,
            allowed_features: columns("allowed_features", self.allowed_features)?,
            allowed_targets: columns("allowed_targets", self.allowed_targets)?,
            allowed_models: self.allowed_models.unwrap_or(d.allowed_models),
            max_rounds,
            min_train_rows,
            min_rows_per_param,
            min_cell,
            min_batch_size,
            max_local_epochs,
            min_nodes_floor,
            max_params,
            max_levels,
            max_memory_mb,
            count_rounding,
            dominance_n,
            dominance_k,
            require_dp: self.require_dp.unwrap_or(d.require_dp),
            require_secure_aggregation: self
                .require_secure_aggregation
                .unwrap_or(d.require_secure_aggregation),
            secure_peers,
            approval: self.approval,
        })
    }
}

/// `[policy.secure_peers]`: names as certificates carry them, fingerprints as
/// `fedstat-node fingerprint` prints them (hex case and `:` separators as `openssl` prints
/// them are accepted too). Returned with fingerprints in the printed form.
fn validate_peers(
    raw: std::collections::BTreeMap<String, String>,
) -> Result<std::collections::BTreeMap<String, String>, (String, String)> {
    if raw.is_empty() {
        return Err((
            "policy.secure_peers".to_owned(),
            "lists no office; remove the table or list every office (`fedstat-node fingerprint`)".to_owned(),
        ));
    }
    let mut out = std::collections::BTreeMap::new();
    for (name, print) in raw {
        let key = format!("policy.secure_peers.{}", fedstat_core::text::printable(&name));
        if name.is_empty()
            || name.len() > fedstat_net::identity::MAX_NAME_LEN
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err((
                key,
                "is not an office name (letters, digits, `.`, `_`, `-`)".to_owned(),
            ));
        }
        let digits: String = print
            .trim()
            .strip_prefix("sha256:")
            .or_else(|| print.trim().strip_prefix("SHA256:"))
            .unwrap_or("")
            .chars()
            .filter(|&c| c != ':')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err((
                key,
                "must be `sha256:` and 64 hex digits, as `fedstat-node fingerprint --cert NAME.pem` prints"
                    .to_owned(),
            ));
        }
        out.insert(name, format!("sha256:{digits}"));
    }
    Ok(out)
}

impl RawPrivacyBudget {
    fn validate(self) -> Result<PrivacyBudget, (String, String)> {
        let budget = |key: &str, epsilon: f64, delta: f64| -> Result<Budget, (String, String)> {
            if !(epsilon.is_finite() && epsilon > 0.0) {
                return Err((
                    format!("policy.privacy.{key}epsilon"),
                    "must be a positive number".to_owned(),
                ));
            }
            if !(delta > 0.0 && delta < 1.0) {
                return Err((
                    format!("policy.privacy.{key}delta"),
                    "must be a number in (0, 1), e.g. 1e-5".to_owned(),
                ));
            }
            Ok(Budget { epsilon, delta })
        };
        let default = budget("", self.epsilon, self.delta.unwrap_or(DEFAULT_BUDGET_DELTA))?;
        let mut datasets = std::collections::BTreeMap::new();
        for (name, raw) in self.datasets {
            let key = format!("datasets.{name}.");
            let b = budget(
                &key,
                raw.epsilon.unwrap_or(default.epsilon),
                raw.delta.unwrap_or(default.delta),
            )?;
            datasets.insert(name, b);
        }
        Ok(PrivacyBudget {
            default,
            datasets,
            show_remaining: self.show_remaining,
        })
    }
}

/// The columns a design reads besides its response: features (numeric and factors), the
/// weights and the offset, each once, in order of first use.
pub fn design_features(plan: &fedstat_proto::design::DesignPlan) -> Vec<&str> {
    use fedstat_proto::design::Factor;
    let mut out: Vec<&str> = Vec::new();
    let extra = plan
        .weights
        .iter()
        .map(|w| w.as_str())
        .chain(plan.offset.iter().map(|o| o.column.as_str()));
    let columns = plan
        .columns
        .iter()
        .flat_map(|c| c.factors.iter())
        .filter_map(|f| match f {
            Factor::Numeric { column, .. } | Factor::Level { column, .. } => Some(column.as_str()),
            Factor::Office { .. } => None,
        })
        .chain(extra);
    for c in columns {
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

impl SitePolicy {
    /// Rules that need no data: model kind, rounds, dataset, columns, training settings,
    /// quorum and size. Checked before anything is read or allocated for the task.
    pub fn check_spec(&self, spec: &ExperimentSpec) -> Result<(), Refusal> {
        if !self.allowed_models.contains(&spec.model) {
            return Err(Refusal::ModelNotAllowed(spec.model));
        }
        if spec.max_rounds() > self.max_rounds {
            return Err(Refusal::TooManyRounds {
                asked: spec.max_rounds(),
                max: self.max_rounds,
            });
        }
        if spec.num_params() > self.max_params {
            return Err(Refusal::TooManyParams { max: self.max_params });
        }
        if !spec.uses_data() {
            return Ok(());
        }
        if self.require_dp && spec.privacy.is_none() {
            return Err(Refusal::DpRequired);
        }
        if self.require_secure_aggregation && !spec.secure_aggregation {
            return Err(Refusal::SecureAggregationRequired);
        }
        if let Some(allowed) = &self.allowed_datasets {
            if !allowed.contains(&spec.dataset) {
                return Err(Refusal::DatasetNotAllowed(spec.dataset.clone()));
            }
        }
        if spec.min_nodes < self.min_nodes_floor {
            return Err(Refusal::MinNodesBelowFloor {
                floor: self.min_nodes_floor,
            });
        }
        let t = &spec.training;
        if t.batch_size < self.min_batch_size {
            return Err(Refusal::BatchTooSmall {
                min: self.min_batch_size,
            });
        }
        if t.local_epochs > self.max_local_epochs {
            return Err(Refusal::TooManyEpochs {
                max: self.max_local_epochs,
            });
        }
        let Some(schema) = &spec.schema else {
            return Ok(());
        };
        // A spec without a valid design is refused by validation and cannot be loaded; the
        // column rules apply to every column the design reads.
        let Ok(plan) = spec.design() else {
            return Ok(());
        };
        if !self.allowed_targets.allows(plan.response.column()) {
            return Err(Refusal::TargetNotAllowed(plan.response.column().to_owned()));
        }
        for column in design_features(&plan) {
            if !self.allowed_features.allows(column) {
                return Err(Refusal::FeatureNotAllowed(column.to_owned()));
            }
        }
        if let Some(f) = schema
            .categorical
            .iter()
            .find(|f| f.levels.len() > self.max_levels)
        {
            return Err(Refusal::TooManyLevels {
                column: f.column.clone(),
                max: self.max_levels,
            });
        }
        Ok(())
    }

    /// Disclosure thresholds on the number of training rows, once the data are loaded. Says
    /// which threshold failed, not the row count.
    pub fn check_rows(&self, spec: &ExperimentSpec, train_rows: u64) -> Result<(), Refusal> {
        if !spec.uses_data() {
            return Ok(());
        }
        if train_rows < self.min_train_rows {
            return Err(Refusal::TooFewTrainRows {
                min: self.min_train_rows,
            });
        }
        let params = spec.num_params();
        // An exact fit releases XᵀWX and XᵀWz at each node: with few rows per parameter they
        // pin the rows down, so at least EXACT_MIN_ROWS_PER_PARAM hold whatever the policy.
        let per_param = if spec.is_exact_glm() {
            self.min_rows_per_param.max(EXACT_MIN_ROWS_PER_PARAM)
        } else {
            self.min_rows_per_param
        };
        // Compared in f64: exact for any realistic count, and the limit may be fractional.
        if (train_rows as f64) < params as f64 * per_param {
            return Err(Refusal::Saturated {
                params,
                per_param: per_param.to_string(),
            });
        }
        Ok(())
    }

    /// The most design-matrix cells (rows × columns, f64) one experiment may load.
    pub fn max_cells(&self) -> u64 {
        self.max_memory_mb.saturating_mul(1 << 20) / 8
    }

    /// `rows` rounded to the nearest multiple of `count_rounding` (at least one multiple): the
    /// weight an update carries, so no answer states this office's exact row count.
    pub fn rounded_count(&self, rows: u64) -> u64 {
        let r = self.count_rounding;
        (rows.saturating_add(r / 2) / r).max(1).saturating_mul(r)
    }

    /// A summary for the audit log's start record.
    pub fn to_json(&self) -> serde_json::Value {
        let columns = |c: &Columns| match c {
            Columns::Any => serde_json::json!("any"),
            Columns::Only(set) => serde_json::json!(set),
        };
        serde_json::json!({
            "allowed_datasets": match &self.allowed_datasets {
                None => serde_json::json!("any offered"),
                Some(set) => serde_json::json!(set),
            },
            "allowed_features": columns(&self.allowed_features),
            "allowed_targets": columns(&self.allowed_targets),
            "allowed_models": self.allowed_models.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            "max_rounds": self.max_rounds,
            "min_train_rows": self.min_train_rows,
            "min_rows_per_param": self.min_rows_per_param,
            "min_cell": self.min_cell,
            "min_batch_size": self.min_batch_size,
            "max_local_epochs": self.max_local_epochs,
            "min_nodes_floor": self.min_nodes_floor,
            "max_params": self.max_params,
            "max_levels": self.max_levels,
            "max_memory_mb": self.max_memory_mb,
            "count_rounding": self.count_rounding,
            "dominance_n": self.dominance_n,
            "dominance_k": self.dominance_k,
            "approval": self.approval.as_str(),
            "privacy": self.privacy.as_ref().map(|p| serde_json::json!({
                "epsilon": p.default.epsilon,
                "delta": p.default.delta,
                "show_remaining": p.show_remaining,
                "datasets": p.datasets.iter().map(|(k, b)| (k.clone(), serde_json::json!({
                    "epsilon": b.epsilon,
                    "delta": b.delta,
                }))).collect::<serde_json::Map<_, _>>(),
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ExperimentSpec {
        toml::from_str(include_str!("../../configs/experiment-logit.toml")).expect("example experiment")
    }

    /// The example experiment's columns, which a custodian would list.
    const LISTED: &str = "allowed_targets = [\"wage\"]\n\
        allowed_features = [\"education\", \"experience\", \"ethnicity\", \"smsa\", \"parttime\"]\n";

    fn policy(toml_text: &str) -> SitePolicy {
        toml::from_str::<RawPolicy>(toml_text)
            .expect("parse")
            .validate()
            .expect("valid")
    }

    /// (policy, the start of the expected refusal, or None when allowed).
    fn check(policy_toml: &str, edit: impl Fn(&mut ExperimentSpec), rows: u64, expected: Option<&str>) {
        let p = policy(policy_toml);
        let mut s = spec();
        edit(&mut s);
        let got = p.check_spec(&s).and_then(|()| p.check_rows(&s, rows));
        match (expected, got) {
            (None, Ok(())) => {}
            (Some(want), Err(reason)) => {
                let text = reason.to_string();
                assert!(text.starts_with(want), "{policy_toml}: {text}");
            }
            (want, got) => panic!("{policy_toml}: expected {want:?}, got {got:?}"),
        }
    }

    #[test]
    fn each_rule_refuses_with_its_reason() {
        let same = |_: &mut ExperimentSpec| {};
        let with = |extra: &str| format!("{LISTED}{extra}");
        check("", same, 1000, Some("column `wage` is not allowed as the target"));
        check(
            "allowed_targets = [\"wage\"]",
            same,
            1000,
            Some("column `education` is not allowed as a feature"),
        );
        check(LISTED, same, 1000, None);
        check(
            "allowed_targets = [\"*\"]\nallowed_features = [\"*\"]",
            same,
            1000,
            None,
        );
        check(
            &with("allowed_datasets = [\"lfs\"]"),
            same,
            1000,
            Some("dataset `cps1988` is not allowed"),
        );
        check(&with("allowed_datasets = [\"cps1988\"]"), same, 1000, None);
        check(
            &with("require_dp = true"),
            same,
            1000,
            Some("this office requires differential privacy"),
        );
        let private = |s: &mut ExperimentSpec| {
            s.privacy = Some(fedstat_proto::privacy::PrivacySpec {
                noise_multiplier: 1.0,
                delta: 1e-5,
                clip_norm: Some(1.0),
                sampling_rate: Some(0.1),
                bounds: Vec::new(),
                node_level: None,
            })
        };
        check(&with("require_dp = true"), private, 1000, None);
        check(
            &with("require_secure_aggregation = true"),
            private,
            1000,
            Some("this office requires secure aggregation"),
        );
        check(
            &with("require_secure_aggregation = true"),
            |s| s.secure_aggregation = true,
            1000,
            None,
        );
        check(
            "allowed_targets = [\"wage\"]\nallowed_features = [\"education\", \"experience\", \"smsa\", \"parttime\"]",
            same,
            1000,
            Some("column `ethnicity` is not allowed as a feature"),
        );
        check(
            "allowed_targets = [\"hours\"]\nallowed_features = [\"*\"]",
            same,
            1000,
            Some("column `wage` is not allowed as the target"),
        );
        check(
            &with("allowed_models = [\"linear\", \"echo\"]"),
            same,
            1000,
            Some("model kind `logistic` is not allowed"),
        );
        check(
            &with("max_rounds = 5"),
            |s| s.rounds = 6,
            1000,
            Some("6 rounds asked, more than the maximum of 5"),
        );
        check(&with("max_rounds = 5"), |s| s.rounds = 5, 1000, None);
        check(LISTED, |s| s.rounds = 101, 1000, Some("101 rounds asked"));
        check(
            LISTED,
            |s| s.training.batch_size = 1,
            1000,
            Some("training.batch_size is below the minimum of 10 (policy.min_batch_size)"),
        );
        check(&with("min_cell = 5"), |s| s.training.batch_size = 5, 1000, None);
        check(
            LISTED,
            |s| s.training.local_epochs = 11,
            1000,
            Some("training.local_epochs is above the maximum of 10"),
        );
        check(
            LISTED,
            |s| s.min_nodes = 2,
            1000,
            Some("min_nodes is below this office's floor of 3"),
        );
        check(&with("min_nodes_floor = 2"), |s| s.min_nodes = 2, 1000, None);
        check(
            LISTED,
            |s| {
                if let Some(schema) = s.schema.as_mut() {
                    schema.categorical[0]
                        .levels
                        .extend((0..60).map(|i| format!("pad{i}")));
                }
            },
            100_000,
            Some("column `ethnicity` declares more than 50 levels (policy.max_levels)"),
        );
        check(
            &with("max_params = 5"),
            same,
            1000,
            Some("the model has more than 5 parameters (policy.max_params)"),
        );
        check(
            LISTED,
            same,
            9,
            Some("fewer training rows than the minimum of 10"),
        );
        check(
            &with("min_train_rows = 5"),
            same,
            9,
            Some("the model's 7 parameters would saturate"),
        );
        check(&with("min_train_rows = 5"), same, 21, None);
        check(
            &with("min_train_rows = 5"),
            same,
            20,
            Some("the model's 7 parameters"),
        );
        check(&with("min_rows_per_param = 1.5"), same, 11, None);
    }

    #[test]
    fn refusals_never_state_the_row_count() {
        let p = policy(LISTED);
        for rows in [3u64, 17] {
            let reason = p.check_rows(&spec(), rows).expect_err("refused").to_string();
            assert!(!reason.contains(&rows.to_string()), "{reason}");
        }
    }

    #[test]
    fn echo_reads_no_data_and_skips_the_data_rules() {
        let echo: ExperimentSpec =
            toml::from_str(include_str!("../../configs/experiment-echo.toml")).expect("echo");
        let p = policy("allowed_datasets = [\"lfs\"]\nallowed_features = []");
        assert_eq!(p.check_spec(&echo), Ok(()));
        assert_eq!(p.check_rows(&echo, 0), Ok(()));
        let p = policy("allowed_models = [\"linear\"]");
        assert!(p.check_spec(&echo).is_err());
        // The default size limit keeps a padded echo far below the coordinator's 10^8.
        let mut big = echo.clone();
        big.echo = Some(fedstat_core::spec::EchoSpec { params: 1_001 });
        assert_eq!(
            SitePolicy::default().check_spec(&big),
            Err(Refusal::TooManyParams { max: 1_000 })
        );
    }

    #[test]
    fn counts_are_rounded_to_the_policy_multiple() {
        let p = SitePolicy::default();
        for (rows, want) in [(1, 10), (4, 10), (15, 20), (5_634, 5_630), (5_635, 5_640)] {
            assert_eq!(p.rounded_count(rows), want, "{rows}");
        }
        assert_eq!(policy("count_rounding = 1").rounded_count(5_634), 5_634);
    }

    #[test]
    fn defaults_and_invalid_values() {
        assert_eq!(policy(""), SitePolicy::default());
        assert_eq!(policy("approval = \"manual\"").approval, ApprovalMode::Manual);
        assert_eq!(policy("min_cell = 5").min_batch_size, 5);
        for (text, key) in [
            ("max_rounds = 0", "policy.max_rounds"),
            ("min_train_rows = 0", "policy.min_train_rows"),
            ("min_rows_per_param = 0.5", "policy.min_rows_per_param"),
            ("allowed_datasets = [\"\"]", "policy.allowed_datasets"),
            ("allowed_features = [\"*\", \"age\"]", "policy.allowed_features"),
            ("min_cell = 0", "policy.min_cell"),
            ("min_batch_size = 0", "policy.min_batch_size"),
            ("max_local_epochs = 0", "policy.max_local_epochs"),
            ("min_nodes_floor = 0", "policy.min_nodes_floor"),
            ("max_params = 0", "policy.max_params"),
            ("max_levels = 1", "policy.max_levels"),
            ("max_memory_mb = 0", "policy.max_memory_mb"),
            ("count_rounding = 0", "policy.count_rounding"),
            ("[privacy]\nepsilon = 0", "policy.privacy.epsilon"),
            ("[privacy]\nepsilon = 1\ndelta = 1", "policy.privacy.delta"),
            (
                "[privacy]\nepsilon = 1\n[privacy.datasets.lfs]\nepsilon = -1",
                "policy.privacy.datasets.lfs.epsilon",
            ),
            ("[secure_peers]", "policy.secure_peers"),
            ("[secure_peers]\nons = \"sha256:00\"", "policy.secure_peers.ons"),
            ("[secure_peers]\nons = \"md5:00\"", "policy.secure_peers.ons"),
            (
                "[secure_peers]\n\"o n\" = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"",
                "policy.secure_peers.o n",
            ),
        ] {
            let err = toml::from_str::<RawPolicy>(text)
                .expect("parse")
                .validate()
                .expect_err(text);
            assert_eq!(err.0, key);
        }
        // Fingerprints as this node prints them, or as openssl does.
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        let peers = policy(&format!(
            "[secure_peers]\nons = \"sha256:{hex}\"\nistat = \"SHA256:{colons}\""
        ))
        .secure_peers
        .expect("peers");
        assert_eq!(peers["ons"], format!("sha256:{hex}"));
        assert_eq!(peers["istat"], format!("sha256:{hex}"));
        assert_eq!(SitePolicy::default().secure_peers, None);
        assert!(toml::from_str::<RawPolicy>("approval = \"sometimes\"").is_err());
        assert!(toml::from_str::<RawPolicy>("max_round = 3").is_err());
        assert!(toml::from_str::<RawPolicy>("[privacy]\nepsilon = 1\nshow = true").is_err());
        let p = policy("[privacy]\nepsilon = 3\nshow_remaining = true\n[privacy.datasets.lfs]\nepsilon = 1")
            .privacy
            .expect("budget");
        assert_eq!(
            p.of("cps1988"),
            Budget {
                epsilon: 3.0,
                delta: 1e-5
            }
        );
        assert_eq!(
            p.of("lfs"),
            Budget {
                epsilon: 1.0,
                delta: 1e-5
            }
        );
        assert!(p.show_remaining);
    }

    #[test]
    fn exact_fits_need_three_training_rows_per_parameter_whatever_the_policy() {
        let p = policy("min_rows_per_param = 1\nallowed_targets = [\"*\"]\nallowed_features = [\"*\"]");
        let mut exact = spec();
        exact.method = fedstat_core::spec::Method::Exact;
        exact.rounds = 1;
        let params = exact.num_params();
        assert_eq!(params, 7);
        let refused = p.check_rows(&exact, 3 * params - 1).expect_err("saturated");
        assert!(matches!(refused, Refusal::Saturated { .. }), "{refused}");
        let text = refused.to_string();
        assert!(
            text.contains("policy.min_rows_per_param") && text.contains("saturate"),
            "{text}"
        );
        assert!(!text.contains("20"), "names no row count: {text}");
        assert_eq!(p.check_rows(&exact, 3 * params), Ok(()));
        // Federated averaging follows the policy's own figure.
        assert_eq!(p.check_rows(&spec(), 2 * params), Ok(()));
    }
}
