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
pub mod config;
pub mod error;
pub mod governance;
pub mod policy;
pub mod session;
pub mod worker;

pub use error::{Error, Result};

use std::path::Path;

use fedstat_shared::data::load_csv;
use fedstat_shared::spec::ExperimentSpec;

/// Check, without any network, that this node's datasets load under an experiment's schema:
/// how an office tries its own files before joining. Returns one line per dataset.
pub fn check(config: &config::NodeConfig, experiment: &Path) -> Result<Vec<String>> {
    let spec = ExperimentSpec::from_toml_file(experiment)?;
    let schema = spec
        .schema
        .as_ref()
        .ok_or_else(|| fedstat_shared::Error::Model("the experiment has no schema to check".into()))?;
    let path = config
        .datasets
        .get(&spec.dataset)
        .ok_or_else(|| Error::UnknownDataset(spec.dataset.clone()))?;
    let data = load_csv(path, schema, spec.model)?;
    Ok(vec![format!(
        "dataset `{}` ({}): {} train rows, {} test rows, {} design columns: {}",
        spec.dataset,
        path.display(),
        data.train.rows(),
        data.test.rows(),
        schema.design_columns().len(),
        schema.design_columns().join(", ")
    )])
}
