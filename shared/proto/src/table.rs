//! Federated tables: what a researcher asks for (`model = "table"`) and what comes back.
//!
//! A table cross-tabulates 1 to 3 declared categorical columns over the train, test or all
//! rows. Every cell has its row count and, for each declared numeric column, the sum, mean,
//! sample variance (ddof 1) and quantiles read off a histogram with declared bin edges. Margins
//! (every line summed over one or more `by` columns, up to the grand total) are cells too.
//! Cells that fail a disclosure rule are published with their status and no value.

use serde::{Deserialize, Serialize};

/// What a table experiment tabulates (`[table]` in the experiment TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// Declared categorical columns to cross-tabulate (1 to 3), each declared in `[schema]`
    /// with its levels. The table has one cell per combination of levels.
    pub by: Vec<String>,
    /// Which rows: `train` (default), `test` or `all`.
    #[serde(default)]
    pub rows: TableRows,
    /// Numeric columns summarised in every cell.
    #[serde(default)]
    pub numeric: Vec<TableNumeric>,
    /// Fewest rows in a published cell of the pooled table (default 10). Each node also
    /// enforces its own `policy.min_cell` on its own cells.
    #[serde(default = "default_min_cell")]
    pub min_cell: u64,
    /// The (n, k) dominance rule for sums: the `dominance_n` largest contributions to a cell
    /// must not exceed `dominance_k` percent of its total (defaults 2 and 85).
    #[serde(default = "default_dominance_n")]
    pub dominance_n: u32,
    #[serde(default = "default_dominance_k")]
    pub dominance_k: f64,
}

fn default_min_cell() -> u64 {
    10
}
fn default_dominance_n() -> u32 {
    2
}
fn default_dominance_k() -> f64 {
    85.0
}

/// Which rows a table counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableRows {
    #[default]
    Train,
    Test,
    All,
}

impl TableRows {
    pub fn as_str(self) -> &'static str {
        match self {
            TableRows::Train => "train",
            TableRows::Test => "test",
            TableRows::All => "all",
        }
    }
}

/// A numeric column summarised per cell, with its declared range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableNumeric {
    pub column: String,
    /// Declared range of the column: it bounds every contribution (for the dominance rule and
    /// any later noise). A value outside it is an error naming the column, unless `clip`.
    pub min: f64,
    pub max: f64,
    /// Clip values outside `[min, max]` to the nearer bound instead of refusing.
    #[serde(default)]
    pub clip: bool,
    /// Bin edges of the histogram behind the quantiles, increasing; the first must be at most
    /// `min` and the last at least `max`. Empty: no quantiles.
    #[serde(default)]
    pub bins: Vec<f64>,
    /// Probabilities in [0, 1] of the quantiles to report (needs `bins`).
    #[serde(default)]
    pub quantiles: Vec<f64>,
}

/// A pooled table, with its suppressed cells marked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableOutput {
    /// Column names of the printed table: the `by` columns, then [`TableOutput::stats`].
    pub header: Vec<String>,
    /// The `by` columns.
    pub by: Vec<String>,
    /// The statistics of every cell, in order (`count`, `wage_sum`, `wage_mean`, ...).
    pub stats: Vec<String>,
    /// `train`, `test` or `all`.
    pub rows: String,
    /// Every cell, interior cells and margins, in row-major order of the levels (a margin's
    /// key holds [`MARGIN`] for the columns it sums over).
    pub cells: Vec<TableCell>,
    /// How the figures were made (variance, quantiles, rules), for the reader.
    pub notes: Vec<String>,
}

/// The key of a margin for a column it sums over.
pub const MARGIN: &str = "(all)";

/// One cell of a published table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableCell {
    /// The level of each `by` column, or [`MARGIN`].
    pub key: Vec<String>,
    /// Whether the cell sums over at least one `by` column.
    pub margin: bool,
    /// `None`: published. Otherwise the rule that suppressed the cell.
    pub suppressed: Option<Suppression>,
    /// One value per statistic; `None` when suppressed or undefined (a mean of no rows, a
    /// variance of one row). A suppressed cell never carries a value, zero included.
    pub values: Vec<Option<f64>>,
}

/// Why a cell is not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Suppression {
    /// Its pooled count is between 1 and `min_cell - 1`.
    #[serde(rename = "primary:min_cell")]
    MinCell,
    /// Its sums fail the (n, k) dominance rule on node-level contributions.
    #[serde(rename = "primary:dominance")]
    Dominance,
    /// A node suppressed its share of the cell (its own rules).
    #[serde(rename = "node")]
    Node,
    /// Suppressed so that another suppressed cell cannot be recovered by subtraction.
    #[serde(rename = "secondary")]
    Secondary,
}

impl Suppression {
    pub fn as_str(self) -> &'static str {
        match self {
            Suppression::MinCell => "primary:min_cell",
            Suppression::Dominance => "primary:dominance",
            Suppression::Node => "node",
            Suppression::Secondary => "secondary",
        }
    }
}
