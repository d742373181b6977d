//! The site policy: the data custodian's rules for what may run on this office's data, from
//! the `[policy]` table of the node config. Checked by the node for every task, never by the
//! coordinator: a researcher cannot loosen it. A refusal names the rule that failed and never
//! a data value (nor the node's exact row count: only which threshold was not met).

use std::collections::BTreeSet;

use fedstat_shared::spec::{ExperimentSpec, ModelKind};
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
    #[serde(default)]
    approval: ApprovalMode,
}

pub const DEFAULT_MAX_ROUNDS: u32 = 1000;
pub const DEFAULT_MIN_TRAIN_ROWS: u64 = 10;
pub const DEFAULT_MIN_ROWS_PER_PARAM: f64 = 3.0;

/// The validated site policy. `None` in an allow-list means "no restriction".
#[derive(Debug, Clone, PartialEq)]
pub struct SitePolicy {
    /// `policy.allowed_datasets`: dataset names experiments may use (default: every offered one).
    pub allowed_datasets: Option<BTreeSet<String>>,
    /// `policy.allowed_features`: CSV columns that may be used as features (default: any).
    pub allowed_features: Option<BTreeSet<String>>,
    /// `policy.allowed_targets`: CSV columns that may be used as the target (default: any).
    pub allowed_targets: Option<BTreeSet<String>>,
    /// `policy.allowed_models`: model kinds (default: all, including the data-free `echo`).
    pub allowed_models: Vec<ModelKind>,
    /// `policy.max_rounds`: most rounds an experiment may ask for.
    pub max_rounds: u32,
    /// `policy.min_train_rows`: fewest training rows behind any answer.
    pub min_train_rows: u64,
    /// `policy.min_rows_per_param`: training rows needed per model parameter (saturation
    /// limit; 3 means the parameters are at most a third of the rows).
    pub min_rows_per_param: f64,
    /// `policy.approval`.
    pub approval: ApprovalMode,
}

impl Default for SitePolicy {
    fn default() -> Self {
        SitePolicy {
            allowed_datasets: None,
            allowed_features: None,
            allowed_targets: None,
            allowed_models: vec![ModelKind::Linear, ModelKind::Logistic, ModelKind::Echo],
            max_rounds: DEFAULT_MAX_ROUNDS,
            min_train_rows: DEFAULT_MIN_TRAIN_ROWS,
            min_rows_per_param: DEFAULT_MIN_ROWS_PER_PARAM,
            approval: ApprovalMode::Auto,
        }
    }
}

impl RawPolicy {
    /// Validate; `Err((key, problem))` names the key under `policy.`.
    pub(crate) fn validate(self) -> Result<SitePolicy, (String, String)> {
        let d = SitePolicy::default();
        let list =
            |key: &str, v: Option<Vec<String>>| -> Result<Option<BTreeSet<String>>, (String, String)> {
                match v {
                    None => Ok(None),
                    Some(items) => {
                        if items.iter().any(|s| s.trim().is_empty()) {
                            return Err((format!("policy.{key}"), "names must not be empty".into()));
                        }
                        Ok(Some(items.into_iter().collect()))
                    }
                }
            };
        let max_rounds = self.max_rounds.unwrap_or(d.max_rounds);
        if max_rounds == 0 {
            return Err(("policy.max_rounds".into(), "must be at least 1".into()));
        }
        let min_train_rows = self.min_train_rows.unwrap_or(d.min_train_rows);
        if min_train_rows == 0 {
            return Err(("policy.min_train_rows".into(), "must be at least 1".into()));
        }
        let min_rows_per_param = self.min_rows_per_param.unwrap_or(d.min_rows_per_param);
        if !(min_rows_per_param.is_finite() && (1.0..=1e6).contains(&min_rows_per_param)) {
            return Err((
                "policy.min_rows_per_param".into(),
                "must be a number between 1 and 1000000".into(),
            ));
        }
        Ok(SitePolicy {
            allowed_datasets: list("allowed_datasets", self.allowed_datasets)?,
            allowed_features: list("allowed_features", self.allowed_features)?,
            allowed_targets: list("allowed_targets", self.allowed_targets)?,
            allowed_models: self.allowed_models.unwrap_or(d.allowed_models),
            max_rounds,
            min_train_rows,
            min_rows_per_param,
            approval: self.approval,
        })
    }
}

impl SitePolicy {
    /// Rules that need no data: model kind, rounds, dataset, columns. `Err` is the reason.
    pub fn check_spec(&self, spec: &ExperimentSpec) -> Result<(), String> {
        if !self.allowed_models.contains(&spec.model) {
            return Err(format!(
                "model kind `{}` is not allowed (policy.allowed_models)",
                spec.model.as_str()
            ));
        }
        if spec.rounds > self.max_rounds {
            return Err(format!(
                "{} rounds asked, more than the maximum of {} (policy.max_rounds)",
                spec.rounds, self.max_rounds
            ));
        }
        if !spec.uses_data() {
            return Ok(());
        }
        if let Some(allowed) = &self.allowed_datasets {
            if !allowed.contains(&spec.dataset) {
                return Err(format!(
                    "dataset `{}` is not allowed (policy.allowed_datasets)",
                    spec.dataset
                ));
            }
        }
        let Some(schema) = &spec.schema else {
            return Ok(());
        };
        if let Some(allowed) = &self.allowed_targets {
            if !allowed.contains(&schema.target.column) {
                return Err(format!(
                    "column `{}` is not allowed as the target (policy.allowed_targets)",
                    schema.target.column
                ));
            }
        }
        if let Some(allowed) = &self.allowed_features {
            let features = schema
                .numeric
                .iter()
                .map(|f| &f.column)
                .chain(schema.categorical.iter().map(|f| &f.column));
            for column in features {
                if !allowed.contains(column) {
                    return Err(format!(
                        "column `{column}` is not allowed as a feature (policy.allowed_features)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Disclosure thresholds, once the data are loaded. Says which threshold failed, not the
    /// row count.
    pub fn check_rows(&self, spec: &ExperimentSpec, train_rows: u64) -> Result<(), String> {
        if !spec.uses_data() {
            return Ok(());
        }
        if train_rows < self.min_train_rows {
            return Err(format!(
                "fewer training rows than the minimum of {} (policy.min_train_rows)",
                self.min_train_rows
            ));
        }
        let params = spec.num_params();
        // Compared in f64: exact for any realistic count, and the limit may be fractional.
        if (train_rows as f64) < params as f64 * self.min_rows_per_param {
            return Err(format!(
                "the model's {params} parameters would saturate the data: at least {} training rows \
                 per parameter are required (policy.min_rows_per_param)",
                self.min_rows_per_param
            ));
        }
        Ok(())
    }

    /// A summary for the audit log's start record.
    pub fn to_json(&self) -> serde_json::Value {
        let list = |s: &Option<BTreeSet<String>>| match s {
            None => serde_json::Value::String("any".into()),
            Some(set) => serde_json::json!(set),
        };
        serde_json::json!({
            "allowed_datasets": list(&self.allowed_datasets),
            "allowed_features": list(&self.allowed_features),
            "allowed_targets": list(&self.allowed_targets),
            "allowed_models": self.allowed_models.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            "max_rounds": self.max_rounds,
            "min_train_rows": self.min_train_rows,
            "min_rows_per_param": self.min_rows_per_param,
            "approval": self.approval.as_str(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ExperimentSpec {
        toml::from_str(include_str!("../../configs/experiment-logit.toml")).expect("example experiment")
    }

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
            (Some(want), Err(reason)) => assert!(reason.starts_with(want), "{policy_toml}: {reason}"),
            (want, got) => panic!("{policy_toml}: expected {want:?}, got {got:?}"),
        }
    }

    #[test]
    fn each_rule_refuses_with_its_reason() {
        let same = |_: &mut ExperimentSpec| {};
        check("", same, 1000, None);
        check(
            "allowed_datasets = [\"lfs\"]",
            same,
            1000,
            Some("dataset `cps1988` is not allowed"),
        );
        check("allowed_datasets = [\"cps1988\"]", same, 1000, None);
        check(
            "allowed_features = [\"education\", \"experience\", \"smsa\", \"parttime\"]",
            same,
            1000,
            Some("column `ethnicity` is not allowed as a feature"),
        );
        check(
            "allowed_features = [\"education\", \"experience\", \"ethnicity\", \"smsa\", \"parttime\"]",
            same,
            1000,
            None,
        );
        check(
            "allowed_targets = [\"hours\"]",
            same,
            1000,
            Some("column `wage` is not allowed as the target"),
        );
        check(
            "allowed_models = [\"linear\", \"echo\"]",
            same,
            1000,
            Some("model kind `logistic` is not allowed"),
        );
        check(
            "max_rounds = 5",
            |s| s.rounds = 6,
            1000,
            Some("6 rounds asked, more than the maximum of 5"),
        );
        check("max_rounds = 5", |s| s.rounds = 5, 1000, None);
        check("", same, 9, Some("fewer training rows than the minimum of 10"));
        check(
            "min_train_rows = 5",
            same,
            9,
            Some("the model's 7 parameters would saturate"),
        );
        check("min_train_rows = 5", same, 21, None);
        check("min_train_rows = 5", same, 20, Some("the model's 7 parameters"));
        check("min_rows_per_param = 1.5", same, 11, None);
    }

    #[test]
    fn refusals_never_state_the_row_count() {
        let p = SitePolicy::default();
        for rows in [3u64, 17] {
            let reason = p.check_rows(&spec(), rows).expect_err("refused");
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
    }

    #[test]
    fn defaults_and_invalid_values() {
        assert_eq!(policy(""), SitePolicy::default());
        assert_eq!(policy("approval = \"manual\"").approval, ApprovalMode::Manual);
        for (text, key) in [
            ("max_rounds = 0", "policy.max_rounds"),
            ("min_train_rows = 0", "policy.min_train_rows"),
            ("min_rows_per_param = 0.5", "policy.min_rows_per_param"),
            ("allowed_datasets = [\"\"]", "policy.allowed_datasets"),
        ] {
            let err = toml::from_str::<RawPolicy>(text)
                .expect("parse")
                .validate()
                .expect_err(text);
            assert_eq!(err.0, key);
        }
        assert!(toml::from_str::<RawPolicy>("approval = \"sometimes\"").is_err());
        assert!(toml::from_str::<RawPolicy>("max_round = 3").is_err());
    }
}
