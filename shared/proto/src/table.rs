//! Federated tables: what a researcher asks for (`model = "table"`) and what comes back.
//! (Being built: issue 10, part 5.)

use serde::{Deserialize, Serialize};

/// What a table experiment tabulates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// Declared categorical columns to cross-tabulate (1 to 3), each declared in `[schema]`.
    pub by: Vec<String>,
}

/// A pooled table, with its suppressed cells marked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableOutput {
    /// Column names of the printed table.
    pub header: Vec<String>,
}
