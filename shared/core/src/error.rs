//! The one error type of the core crate. Messages are lower case, name the file, line,
//! column, key, node or round that failed, say what to do, and never carry a data value:
//! many of them travel from a node to the coordinator.

use std::path::PathBuf;

/// Result with the core crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An experiment spec or config file is invalid; `key` names the TOML key.
    #[error("invalid {what}: key `{key}`: {problem}")]
    Config {
        what: String,
        key: String,
        problem: String,
    },

    /// A TOML file could not be parsed.
    #[error("cannot parse {path}: {message}")]
    Toml { path: PathBuf, message: String },

    /// A CSV file is malformed. `line` counts from 1 including the header; the message
    /// never contains the offending value, only what is wrong with it. This text is for the
    /// node's own log; [`Error::public`] is what may leave the node.
    #[error("{file}: line {line}, column `{column}`: {problem}")]
    Csv {
        file: String,
        line: u64,
        column: String,
        problem: CsvProblem,
    },

    /// A CSV file is unusable as a whole (empty, no rows for training, too large, ...).
    #[error("{file}: {problem}")]
    Dataset { file: String, problem: DatasetProblem },

    /// A model or training request is inconsistent (wrong number of parameters, ...).
    #[error("model: {0}")]
    Model(String),

    /// A matrix that must be positive definite is (nearly) singular: design `column` is zero,
    /// constant or (nearly) a linear combination of `combination_of`. Column names come from
    /// the spec, so this text may leave a node.
    #[error("{}", singular_text(column, combination_of))]
    Singular {
        column: String,
        combination_of: Vec<String>,
    },

    /// Bytes that should follow the protocol do not.
    #[error(transparent)]
    Proto(#[from] fedstat_proto::Error),

    /// A table could not be made or protected; names a column or rule, never a value.
    #[error(transparent)]
    Table(#[from] crate::tabulate::TableError),

    /// An update was rejected by validation; the reason names the check that failed.
    #[error("update rejected: {0}")]
    Rejected(String),

    /// A file another process holds an exclusive lock on (a second coordinator on the same
    /// `data_dir`, a second writer of one audit log).
    #[error("{what} {path} is in use by another process (it holds the lock on {lock}); stop that process first, or use another folder")]
    Locked {
        what: &'static str,
        path: PathBuf,
        lock: PathBuf,
    },

    /// Inputs of the privacy accountant out of range; names the parameter, never data.
    #[error(transparent)]
    Accountant(#[from] crate::accountant::AccountantError),

    /// A private key file that users other than its owner can read or write.
    #[error("private key {path} is accessible to other users (mode {mode:o}); run `chmod 600 {path}` and start again")]
    KeyPermissions { path: PathBuf, mode: u32 },
}

/// What is wrong with one cell or row of a CSV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CsvProblem {
    EmptyFile,
    NoDataRows,
    UnterminatedQuote,
    /// The experiment needs a column the header lacks; `header` is for the custodian's eyes.
    MissingColumn {
        header: Vec<String>,
    },
    FieldCount {
        expected: usize,
        found: usize,
    },
    EmptyValue,
    MissingValueMarker,
    NotANumber,
    NotFinite,
    NotPositiveForLog,
    /// A weight below zero.
    Negative,
    UnknownLevel,
    BadSplit,
}

impl CsvProblem {
    /// The problem without counts or the header list: what may leave the node.
    pub fn public(&self) -> &'static str {
        match self {
            CsvProblem::EmptyFile => "the file is empty",
            CsvProblem::NoDataRows => "the file has no data rows",
            CsvProblem::UnterminatedQuote => "a field has an unterminated double quote",
            CsvProblem::MissingColumn { .. } => "the dataset has no such column, and the experiment needs it",
            CsvProblem::FieldCount { .. } => "a row has a different number of fields than the header",
            CsvProblem::EmptyValue => "a value is empty",
            CsvProblem::MissingValueMarker => "a value is missing (NA)",
            CsvProblem::NotANumber => "a value is not a number",
            CsvProblem::NotFinite => "a value is not a finite number",
            CsvProblem::NotPositiveForLog => "a value is not positive, so its logarithm is undefined",
            CsvProblem::Negative => "a value is negative, and weights must be zero or positive",
            CsvProblem::UnknownLevel => {
                "a value is not one of the levels listed in the experiment (levels are case-sensitive)"
            }
            CsvProblem::BadSplit => "a value is neither `train` nor `test`",
        }
    }
}

impl std::fmt::Display for CsvProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CsvProblem::EmptyFile => f.write_str("the file is empty: expected a header row"),
            CsvProblem::NoDataRows => f.write_str("the file has a header but no data rows"),
            CsvProblem::UnterminatedQuote => f.write_str("unterminated double quote"),
            CsvProblem::MissingColumn { header } => write!(
                f,
                "missing from the header, and the experiment needs it; the header has: {}",
                header.join(", ")
            ),
            CsvProblem::FieldCount { expected, found } => {
                write!(f, "expected {expected} fields, found {found}")
            }
            CsvProblem::EmptyValue => f.write_str("empty value"),
            CsvProblem::MissingValueMarker => f.write_str("missing-value marker instead of a number"),
            CsvProblem::NotANumber => f.write_str("value is not a number"),
            CsvProblem::NotFinite => {
                f.write_str("value is not a finite number (or too large for a 64-bit float)")
            }
            CsvProblem::NotPositiveForLog => {
                f.write_str("value is not positive, so its logarithm is undefined")
            }
            CsvProblem::Negative => f.write_str("value is negative, and weights must be zero or positive"),
            CsvProblem::UnknownLevel => f.write_str(
                "value is not one of the levels listed in the experiment (levels are case-sensitive)",
            ),
            CsvProblem::BadSplit => f.write_str("value must be `train` or `test`"),
        }
    }
}

/// What makes a CSV file unusable as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetProblem {
    /// The file could not be read (the I/O error's text, for the node's log).
    Read {
        after_line: u64,
        error: String,
    },
    BlankHeader,
    DuplicateColumn(String),
    NotUtf8 {
        line: u64,
    },
    NoTrainRows {
        split_column: String,
    },
    /// Rows × design columns exceed the node's memory budget.
    OverBudget {
        max_cells: u64,
    },
}

impl DatasetProblem {
    /// The problem without line numbers or I/O details: what may leave the node.
    pub fn public(&self) -> String {
        match self {
            DatasetProblem::Read { .. } => "the dataset cannot be read".to_owned(),
            DatasetProblem::BlankHeader => "the header row is blank".to_owned(),
            DatasetProblem::DuplicateColumn(c) => format!("the header names column `{c}` twice"),
            DatasetProblem::NotUtf8 { .. } => "a line is not valid UTF-8 text".to_owned(),
            DatasetProblem::NoTrainRows { split_column } => {
                format!("no row has `{split_column}` = train")
            }
            DatasetProblem::OverBudget { .. } => {
                "the design matrix would exceed the node's memory budget (policy.max_memory_mb)".to_owned()
            }
        }
    }
}

impl std::fmt::Display for DatasetProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatasetProblem::Read { after_line: 0, error } => write!(f, "cannot read: {error}"),
            DatasetProblem::Read { after_line, error } => {
                write!(f, "cannot read after line {after_line}: {error}")
            }
            DatasetProblem::BlankHeader => f.write_str("line 1 is blank: expected a header row"),
            DatasetProblem::DuplicateColumn(c) => write!(f, "the header names column `{c}` twice"),
            DatasetProblem::NotUtf8 { line } => write!(f, "line {line} is not valid UTF-8 text"),
            DatasetProblem::NoTrainRows { split_column } => write!(
                f,
                "no row has `{split_column}` = train, so there is nothing to train on"
            ),
            DatasetProblem::OverBudget { max_cells } => write!(
                f,
                "the design matrix would exceed {max_cells} cells (rows × columns), the node's memory \
                 budget (policy.max_memory_mb)"
            ),
        }
    }
}

fn singular_text(column: &str, combination_of: &[String]) -> String {
    if combination_of.is_empty() {
        format!("model: design column `{column}` is all zeros; drop it from the schema")
    } else {
        let others: Vec<String> = combination_of.iter().map(|c| format!("`{c}`")).collect();
        format!(
            "model: design column `{column}` is (nearly) a linear combination of {}, so the fit \
             has no unique solution; drop one of them from the schema",
            others.join(", ")
        )
    }
}

impl Error {
    /// The error as it may leave a node: which rule or column failed, never a file name or
    /// path, a line number, a count, the header list or a value. The full text
    /// (`Display`) stays in the node's log and audit log for its custodian.
    pub fn public(&self) -> String {
        match self {
            Error::Csv { column, problem, .. } => match problem {
                CsvProblem::EmptyFile | CsvProblem::NoDataRows => problem.public().to_owned(),
                _ if column.starts_with('(') => problem.public().to_owned(),
                _ => format!("column `{column}`: {}", problem.public()),
            },
            Error::Dataset { problem, .. } => problem.public(),
            Error::Io { action, .. } => format!("{action} a file failed on the node"),
            Error::Toml { .. } => "a file on the node could not be parsed".to_owned(),
            Error::Config { what, key, problem } => {
                format!("invalid {what}: key `{key}`: {problem}")
            }
            Error::Model(m) => format!("model: {m}"),
            Error::Singular { .. } => self.to_string(),
            Error::Proto(fedstat_proto::Error::Wire { what, .. }) => format!("malformed {what}"),
            Error::Proto(fedstat_proto::Error::TooLarge { what, .. }) => {
                format!("{what} exceeds its size limit")
            }
            Error::Proto(fedstat_proto::Error::Unknown { what, .. }) => format!("unknown {what}"),
            Error::Rejected(r) => format!("update rejected: {r}"),
            Error::Table(t) => t.to_string(),
            Error::Accountant(a) => a.to_string(),
            Error::KeyPermissions { .. } => "certificate problem on the node".to_owned(),
            Error::Locked { .. } => "a file on the node is in use by another process".to_owned(),
        }
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        what: impl Into<String>,
        key: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        Error::Config {
            what: what.into(),
            key: key.into(),
            problem: problem.into(),
        }
    }
}
