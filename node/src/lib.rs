//! The fedstat node agent (`fedstat-node`): runs on an office's premises next to its private
//! data, dials out to the coordinator, and answers tasks with statistics, model updates and
//! evaluation sums — never with data.
//!
//! Data flow: [`session`] receives a task over QUIC -> [`governance`] checks the site
//! [`policy`] and the custodian's [`approval`] of the experiment's manifest -> [`worker`] loads
//! the CSV, checks the disclosure thresholds, trains or evaluates -> the answer is recorded in
//! the audit log -> [`session`] streams it back.
#![forbid(unsafe_code)]

pub mod approval;
pub mod binding;
pub mod config;
pub mod disclosure;
pub mod error;
pub mod governance;
pub mod ledger;
pub mod policy;
pub mod secure;
pub mod session;
pub mod worker;

pub use error::{Error, Result};

use std::path::Path;

use fedstat_core::data::{load_design_with_codes, LoadLimits};

use crate::policy::Columns;

/// `fedstat-node check`: try, without any network, an experiment against this node's files
/// and site policy, the way the node would when a task arrives. Meant for the custodian
/// writing a policy and for an office trying its own files: the report names what the policy
/// lacks (as `[policy]` lines to add), then whether the data pass the disclosure rules.
/// Nothing is recorded. Returns the report's lines.
pub fn check(config: &config::NodeConfig, experiment: &Path) -> Result<Vec<String>> {
    let spec = fedstat_core::spec::from_toml_file(experiment)?;
    let policy = &config.policy;
    let mut out = Vec::new();
    let plan = spec.design().map_err(fedstat_core::data::design_error)?;
    let features: Vec<&str> = policy::design_features(&plan);
    let suggest = |key: &str, allowed: &Columns, wanted: &[&str]| -> Option<String> {
        let Columns::Only(set) = allowed else { return None };
        if wanted.iter().all(|c| set.contains(*c)) {
            return None;
        }
        let mut all: std::collections::BTreeSet<&str> = set.iter().map(|c| c.as_str()).collect();
        all.extend(wanted.iter().copied());
        let list: Vec<String> = all.iter().map(|c| format!("{:?}", c)).collect();
        Some(format!("{key} = [{}]", list.join(", ")))
    };
    let lines: Vec<String> = [
        suggest(
            "allowed_targets",
            &policy.allowed_targets,
            &[plan.response.column()],
        ),
        suggest("allowed_features", &policy.allowed_features, &features),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !lines.is_empty() {
        out.push("the site policy does not list every column this experiment uses; to allow them, put in [policy]:".into());
        out.extend(lines.into_iter().map(|l| format!("  {l}")));
    }
    match policy.check_spec(&spec) {
        Ok(()) => out.push("site policy: allowed".into()),
        Err(r) => out.push(format!("site policy: REFUSED: {r}")),
    }
    let path = config
        .datasets
        .get(&spec.dataset)
        .ok_or_else(|| Error::UnknownDataset(spec.dataset.clone()))?;
    let limits = LoadLimits {
        max_cells: policy.max_cells(),
    };
    // `check` runs as no particular office: office columns read 0, and an office-effects
    // experiment is checked as its reference office.
    let office = plan.offices.first().map(|o| o.as_str());
    let (data, codes) = load_design_with_codes(path, &plan, office, limits)?;
    out.push(format!(
        "dataset `{}` ({}): {} train rows, {} test rows, {} design columns: {}",
        spec.dataset,
        path.display(),
        data.train.rows(),
        data.test.rows(),
        plan.columns.len(),
        plan.names().join(", ")
    ));
    let rules = policy
        .check_rows(&spec, data.train.rows() as u64)
        .and_then(|()| disclosure::check_cells(&plan, &data, &codes, policy.min_cell));
    match rules {
        Ok(()) => out.push("disclosure rules (rows, cells): pass".into()),
        Err(r) => out.push(format!("disclosure rules: REFUSED: {r}")),
    }
    let sets = disclosure::released_sets(&plan, &data, &codes);
    match disclosure::ReleaseLedger::new(&config.state_dir).check(&spec.dataset, &sets, policy.min_cell) {
        Ok(()) => out.push("differencing against what this node released before: pass".into()),
        Err(e) => out.push(format!("differencing: REFUSED: {e}")),
    }
    Ok(out)
}

/// What the node's unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use fedstat_core::spec::ExperimentSpec;
    use fedstat_proto::wire::{ExperimentId, Phase, Task};

    /// The shipped example experiment (`configs/experiment-logit.toml`).
    pub fn example_spec() -> ExperimentSpec {
        toml::from_str(include_str!("../../configs/experiment-logit.toml")).expect("example")
    }

    /// A task of experiment `experiment` from researcher alice, without model or masking.
    pub fn task(spec: ExperimentSpec, experiment: ExperimentId, round: u32, phase: Phase) -> Task {
        Task {
            experiment,
            round,
            phase,
            submitter: "researcher `alice`".into(),
            spec,
            standardization: None,
            model: None,
            secure: None,
        }
    }
}
