//! A node's CSV turned into a design matrix, and the pooled standardisation built from
//! per-node column sums. Errors name the file, line and column, never a cell's value.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use ndarray::{Array1, Array2, ArrayView2};

use crate::error::{CsvProblem, DatasetProblem};
use crate::spec::{DataSchema, ModelKind};
pub use crate::sums::Standardization;
use crate::{Error, Result};
use fedstat_proto::design::{DesignError, DesignPlan, Factor, Response};
use serde::{Deserialize, Serialize};

/// A design matrix and its response.
#[derive(Debug, Clone, PartialEq)]
pub struct Design {
    /// Rows × p; column 0 is the constant 1.0, the others raw, in [`DataSchema::design_columns`] order.
    pub x: Array2<f64>,
    /// The response: 0/1 for logistic, the (possibly logged) value for linear.
    pub y: Array1<f64>,
    /// Prior weights of an exact GLM (the experiment's `weights` column), if any.
    pub weights: Option<Array1<f64>>,
    /// Offset of an exact GLM's linear predictor (the experiment's `offset`), if any.
    pub offset: Option<Array1<f64>>,
    /// One fingerprint per row: the first 8 bytes of SHA-256 of the row's whole line, made
    /// distinct for repeated lines. Lets a node recognise the same people across experiments
    /// (differencing protection); never sent anywhere.
    pub ids: Vec<RowId>,
}

/// A row's fingerprint (see [`Design::ids`]).
pub type RowId = u64;

/// Limits on what loading may allocate, checked as rows are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadLimits {
    /// Most cells (rows × design columns, both splits) the design matrices may hold.
    pub max_cells: u64,
}

impl LoadLimits {
    /// No limit (local tools reading the caller's own files).
    pub const UNLIMITED: LoadLimits = LoadLimits { max_cells: u64::MAX };
}

impl Design {
    /// Several offices' rows one after the other (the pooled data a federated fit is checked
    /// against): weights and offsets kept when every part has them, row ids carried along.
    pub fn stack<'a>(parts: impl IntoIterator<Item = &'a Design>) -> Result<Design> {
        let parts: Vec<&Design> = parts.into_iter().collect();
        let join = |views: Vec<ndarray::ArrayView1<f64>>| {
            ndarray::concatenate(ndarray::Axis(0), &views)
                .map_err(|e| Error::Model(format!("pooling rows: {e}")))
        };
        let optional = |part: fn(&Design) -> Option<&Array1<f64>>| {
            let views: Option<Vec<_>> = parts.iter().map(|d| part(d).map(|a| a.view())).collect();
            views.map(join).transpose()
        };
        let xs: Vec<_> = parts.iter().map(|d| d.x.view()).collect();
        Ok(Design {
            x: ndarray::concatenate(ndarray::Axis(0), &xs)
                .map_err(|e| Error::Model(format!("pooling rows: {e}")))?,
            y: join(parts.iter().map(|d| d.y.view()).collect())?,
            weights: optional(|d| d.weights.as_ref())?,
            offset: optional(|d| d.offset.as_ref())?,
            ids: parts.iter().flat_map(|d| d.ids.iter().copied()).collect(),
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.x.nrows()
    }
}

/// A node's data, split by the schema's split column.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalData {
    pub train: Design,
    pub test: Design,
}

/// Read a node's CSV with the `[schema]` lists (or formula-free plan) of `model`; errors call
/// the file by its file name.
pub fn load_csv(path: &Path, schema: &DataSchema, model: ModelKind, limits: LoadLimits) -> Result<LocalData> {
    let plan = DesignPlan::from_schema(schema, None, model).map_err(design_error)?;
    load_design(path, &plan, None, limits)
}

/// [`load_csv`] from any reader; `file_label` is what errors call the file.
pub fn load_csv_from_reader(
    file_label: &str,
    reader: impl Read,
    schema: &DataSchema,
    model: ModelKind,
    limits: LoadLimits,
) -> Result<LocalData> {
    let plan = DesignPlan::from_schema(schema, None, model).map_err(design_error)?;
    load_design_from_reader(file_label, reader, &plan, None, limits)
}

/// A plan that cannot be made: the experiment form is wrong (validation names the same key).
pub fn design_error(e: DesignError) -> Error {
    match e {
        DesignError::Formula(f) => Error::config("experiment", "formula", f.to_string()),
        DesignError::Invalid { key, problem } => Error::config("experiment", key, problem),
    }
}

fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Read a node's CSV into the design of `plan` (see [`fedstat_proto::design`]). `office` is
/// this node's name: an office-effects plan sets its `office=NAME` column to 1 and needs it
/// listed among the plan's offices.
pub fn load_design(
    path: &Path,
    plan: &DesignPlan,
    office: Option<&str>,
    limits: LoadLimits,
) -> Result<LocalData> {
    load_design_with_codes(path, plan, office, limits).map(|(data, _)| data)
}

/// [`load_design`], with the level codes of every declared factor the plan reads, per split
/// in the design's row order: what the node's disclosure rules count.
pub fn load_design_with_codes(
    path: &Path,
    plan: &DesignPlan,
    office: Option<&str>,
    limits: LoadLimits,
) -> Result<(LocalData, FactorCodes)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    design_from_reader(&file_label(path), file, plan, office, limits)
}

/// Level codes of the declared factors, by split (see [`load_design_with_codes`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FactorCodes {
    pub train: std::collections::BTreeMap<String, FactorColumn>,
    pub test: std::collections::BTreeMap<String, FactorColumn>,
}

/// How one used column's text is read (each column once per row, whatever uses it).
#[derive(Debug, Clone, PartialEq)]
enum Rule {
    /// A finite number.
    Number,
    /// A finite number above zero (its logarithm is taken).
    Positive,
    /// A finite number, zero or above (weights).
    NonNegative,
    /// One of the declared levels: its index.
    Level(Vec<String>),
    /// 1 when the text is this level, else 0 (a logistic response on an undeclared column).
    Is(String),
}

/// What [`read_columns`] parsed: one column of values per requested column, the split and the
/// row fingerprints.
#[derive(Debug, Default)]
struct Columns {
    /// Numbers (for `Level`: the level's index as a float, exact below 2^53).
    values: Vec<Vec<f64>>,
    train: Vec<bool>,
    ids: Vec<RowId>,
}

/// Read a node's CSV into a design matrix as `plan` says.
pub fn load_design_from_reader(
    file_label: &str,
    reader: impl Read,
    plan: &DesignPlan,
    office: Option<&str>,
    limits: LoadLimits,
) -> Result<LocalData> {
    design_from_reader(file_label, reader, plan, office, limits).map(|(data, _)| data)
}

/// [`load_design_with_codes`] from any reader.
pub fn load_design_with_codes_from_reader(
    file_label: &str,
    reader: impl Read,
    plan: &DesignPlan,
    office: Option<&str>,
    limits: LoadLimits,
) -> Result<(LocalData, FactorCodes)> {
    design_from_reader(file_label, reader, plan, office, limits)
}

fn design_from_reader(
    file_label: &str,
    reader: impl Read,
    plan: &DesignPlan,
    office: Option<&str>,
    limits: LoadLimits,
) -> Result<(LocalData, FactorCodes)> {
    let office_value = |name: &str| office == Some(name);
    if !plan.offices.is_empty() && !office.is_some_and(|o| plan.offices.iter().any(|x| x == o)) {
        return Err(Error::config(
            "experiment",
            "offices",
            "this node is not among the experiment's offices, so its office column is unknown; \
             ask the researcher to list it",
        ));
    }
    // The columns to read, each once, with the one rule that serves all its uses.
    let mut requests: Vec<(String, Rule)> = Vec::new();
    let mut add = |column: &str, rule: Rule| -> Result<usize> {
        if let Some(i) = requests.iter().position(|(c, _)| c == column) {
            let merged = match (&requests[i].1, &rule) {
                (a, b) if a == b => a.clone(),
                (Rule::Number, r @ (Rule::Positive | Rule::NonNegative))
                | (r @ (Rule::Positive | Rule::NonNegative), Rule::Number) => r.clone(),
                _ => {
                    return Err(Error::config(
                        "experiment",
                        "formula",
                        format!(
                        "column `{column}` is used both as a number and as a factor, or with two conditions"
                    ),
                    ))
                }
            };
            requests[i].1 = merged;
            Ok(i)
        } else {
            requests.push((column.to_owned(), rule));
            Ok(requests.len() - 1)
        }
    };
    let levels_of = |column: &str| plan.categorical.iter().find(|f| f.column == column);
    let response_at = match &plan.response {
        Response::Value { column, log } => add(column, if *log { Rule::Positive } else { Rule::Number })?,
        Response::Above { column, .. } => add(column, Rule::Number)?,
        Response::Level { column, level } => match levels_of(column) {
            Some(f) => add(column, Rule::Level(f.levels.clone()))?,
            None => add(column, Rule::Is(level.clone()))?,
        },
    };
    // Per design column: (request index, what to compute) of each factor.
    enum Part {
        Power(usize, i32),
        Code(usize, f64),
        Constant(f64),
    }
    let mut parts: Vec<Vec<Part>> = Vec::with_capacity(plan.columns.len());
    for c in &plan.columns {
        let mut ps = Vec::with_capacity(c.factors.len());
        for f in &c.factors {
            ps.push(match f {
                Factor::Numeric { column, power } => {
                    Part::Power(add(column, Rule::Number)?, i32::from(*power))
                }
                Factor::Level { column, level } => {
                    let decl = levels_of(column).ok_or_else(|| {
                        Error::config(
                            "experiment",
                            "schema.categorical",
                            format!("column `{column}` is used as a factor but its levels are not declared"),
                        )
                    })?;
                    let k = decl.levels.iter().position(|l| l == level).ok_or_else(|| {
                        Error::config(
                            "experiment",
                            "schema.categorical.levels",
                            format!("a design column of `{column}` names an undeclared level"),
                        )
                    })?;
                    Part::Code(add(column, Rule::Level(decl.levels.clone()))?, k as f64)
                }
                Factor::Office { name } => Part::Constant(if office_value(name) { 1.0 } else { 0.0 }),
            });
        }
        parts.push(ps);
    }
    let weights_at = plan
        .weights
        .as_deref()
        .map(|w| add(w, Rule::NonNegative))
        .transpose()?;
    let offset_at = plan
        .offset
        .as_ref()
        .map(|o| add(&o.column, if o.log { Rule::Positive } else { Rule::Number }))
        .transpose()?;
    let p = plan.columns.len();
    let cols = read_columns(
        file_label,
        reader,
        &requests,
        &plan.split_column,
        p.max(1),
        limits,
    )?;
    let (n_train, n_test) = cols
        .train
        .iter()
        .fold((0, 0), |(a, b), t| if *t { (a + 1, b) } else { (a, b + 1) });
    if n_train == 0 {
        return Err(Error::Dataset {
            file: file_label.to_owned(),
            problem: DatasetProblem::NoTrainRows {
                split_column: plan.split_column.clone(),
            },
        });
    }
    let response = |i: usize| -> f64 {
        let v = cols.values[response_at][i];
        match &plan.response {
            Response::Value { log: true, .. } => v.ln(),
            Response::Value { log: false, .. } => v,
            Response::Above { threshold, .. } => indicator(v > *threshold),
            Response::Level { column, level } => match levels_of(column) {
                Some(f) => indicator(f.levels.get(v as usize) == Some(level)),
                None => v,
            },
        }
    };
    let make = |train: bool, rows: usize| -> Result<Design> {
        let mut x = Vec::with_capacity(rows * p);
        let mut y = Vec::with_capacity(rows);
        let mut ids = Vec::with_capacity(rows);
        let mut w = Vec::new();
        let mut off = Vec::new();
        for i in (0..cols.train.len()).filter(|i| cols.train[*i] == train) {
            for ps in &parts {
                let mut v = 1.0;
                for part in ps {
                    v *= match *part {
                        Part::Power(j, k) => cols.values[j][i].powi(k),
                        Part::Code(j, level) => indicator(cols.values[j][i] == level),
                        Part::Constant(c) => c,
                    };
                }
                x.push(v);
            }
            y.push(response(i));
            ids.push(cols.ids[i]);
            if let Some(j) = weights_at {
                w.push(cols.values[j][i]);
            }
            if let (Some(j), Some(o)) = (offset_at, &plan.offset) {
                let v = cols.values[j][i];
                off.push(if o.log { v.ln() } else { v });
            }
        }
        let x = Array2::from_shape_vec((y.len(), p), x)
            .map_err(|e| Error::Model(format!("internal: design matrix shape: {e}")))?;
        Ok(Design {
            x,
            y: Array1::from(y),
            weights: weights_at.map(|_| Array1::from(w)),
            offset: offset_at.map(|_| Array1::from(off)),
            ids,
        })
    };
    let mut codes = FactorCodes::default();
    for ((name, rule), values) in requests.iter().zip(&cols.values) {
        let Rule::Level(levels) = rule else { continue };
        for (train, map) in [(true, &mut codes.train), (false, &mut codes.test)] {
            let codes = values
                .iter()
                .zip(&cols.train)
                .filter(|(_, t)| **t == train)
                .map(|(v, _)| *v as u32)
                .collect();
            map.insert(
                name.clone(),
                FactorColumn {
                    levels: levels.clone(),
                    codes,
                },
            );
        }
    }
    Ok((
        LocalData {
            train: make(true, n_train)?,
            test: make(false, n_test)?,
        },
        codes,
    ))
}

/// Which raw columns [`load_frame`] reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FrameRequest {
    /// The column with `train` or `test`.
    pub split_column: String,
    /// Numeric columns (finite numbers).
    pub numeric: Vec<String>,
    /// Categorical columns and their declared levels (any other value is an error).
    pub categorical: Vec<(String, Vec<String>)>,
}

/// One categorical column of a [`Frame`]: each row's level as an index into `levels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactorColumn {
    pub levels: Vec<String>,
    pub codes: Vec<u32>,
}

/// Raw typed columns of a node's CSV, every row (both splits) in file order: for tables and
/// the disclosure rules, which work on values and levels rather than on a design matrix.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Frame {
    pub numeric: std::collections::BTreeMap<String, Vec<f64>>,
    pub categorical: std::collections::BTreeMap<String, FactorColumn>,
    /// `true` for a train row, `false` for a test row.
    pub train: Vec<bool>,
    /// Row fingerprints, as [`Design::ids`].
    pub ids: Vec<RowId>,
}

impl Frame {
    /// Number of rows (both splits).
    pub fn rows(&self) -> usize {
        self.train.len()
    }
}

/// Read the requested columns of a node's CSV, with the same tokeniser, checks and errors as
/// [`load_design`] (a memory budget of rows × requested columns).
pub fn load_frame(path: &Path, request: &FrameRequest, limits: LoadLimits) -> Result<Frame> {
    let file = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    load_frame_from_reader(&file_label(path), file, request, limits)
}

/// [`load_frame`] from any reader; `file_label` is what errors call the file.
pub fn load_frame_from_reader(
    file_label: &str,
    reader: impl Read,
    request: &FrameRequest,
    limits: LoadLimits,
) -> Result<Frame> {
    let mut requests: Vec<(String, Rule)> = Vec::new();
    for c in &request.numeric {
        requests.push((c.clone(), Rule::Number));
    }
    for (c, levels) in &request.categorical {
        requests.push((c.clone(), Rule::Level(levels.clone())));
    }
    for (i, (c, _)) in requests.iter().enumerate() {
        if requests[..i].iter().any(|(d, _)| d == c) || *c == request.split_column {
            return Err(Error::config(
                "table",
                "by",
                format!("column `{c}` is requested twice"),
            ));
        }
    }
    let cols = read_columns(
        file_label,
        reader,
        &requests,
        &request.split_column,
        requests.len().max(1),
        limits,
    )?;
    let mut frame = Frame {
        train: cols.train,
        ids: cols.ids,
        ..Frame::default()
    };
    for ((name, rule), values) in requests.into_iter().zip(cols.values) {
        match rule {
            Rule::Level(levels) => {
                let codes = values.into_iter().map(|v| v as u32).collect();
                frame.categorical.insert(name, FactorColumn { levels, codes });
            }
            _ => {
                frame.numeric.insert(name, values);
            }
        }
    }
    Ok(frame)
}

/// The one CSV reading path: header, then every row's requested columns (parsed in header
/// order, so the first error reported is the first in the file) and split.
///
/// Tolerant of a UTF-8 byte-order mark, CRLF line endings, blank lines, spaces around fields
/// and double-quoted fields (RFC 4180 quoting by csv-core, one record per line). Columns not
/// requested are not parsed, but every row must have as many fields as the header. At most
/// `limits.max_cells / cells_per_row` data rows are read.
fn read_columns(
    file_label: &str,
    reader: impl Read,
    requests: &[(String, Rule)],
    split_column: &str,
    cells_per_row: usize,
    limits: LoadLimits,
) -> Result<Columns> {
    let dataset_err = |problem: DatasetProblem| Error::Dataset {
        file: file_label.to_owned(),
        problem,
    };
    let mut lines = BufReader::new(reader);
    let mut buf = Vec::new();
    let mut line_no: u64 = 0;

    // Header: the first line; a blank one is an error.
    let header_fields: Vec<String> = {
        let read = lines.read_until(b'\n', &mut buf).map_err(|e| {
            dataset_err(DatasetProblem::Read {
                after_line: 0,
                error: e.to_string(),
            })
        })?;
        if read == 0 {
            return Err(Error::Csv {
                file: file_label.to_owned(),
                line: 1,
                column: "(header)".to_owned(),
                problem: CsvProblem::EmptyFile,
            });
        }
        line_no += 1;
        let text = line_text(&buf, line_no, file_label)?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        if text.trim().is_empty() {
            return Err(dataset_err(DatasetProblem::BlankHeader));
        }
        let mut fields = LineFields::new();
        fields.split(text).map_err(|i| Error::Csv {
            file: file_label.to_owned(),
            line: line_no,
            column: format!("(header field {})", i + 1),
            problem: CsvProblem::UnterminatedQuote,
        })?;
        (0..fields.len()).map(|i| fields.get(i).to_owned()).collect()
    };

    // Map each requested column to its position in the header.
    let find = |name: &str| -> Result<usize> {
        let mut hits = header_fields
            .iter()
            .enumerate()
            .filter(|(_, h)| h.as_str() == name);
        match (hits.next(), hits.next()) {
            (Some((i, _)), None) => Ok(i),
            (Some(_), Some(_)) => Err(dataset_err(DatasetProblem::DuplicateColumn(name.to_owned()))),
            (None, _) => Err(Error::Csv {
                file: file_label.to_owned(),
                line: 1,
                column: name.to_owned(),
                problem: CsvProblem::MissingColumn {
                    header: header_fields.clone(),
                },
            }),
        }
    };
    // (header index, request index or None for the split), in header order.
    let mut order: Vec<(usize, Option<usize>)> = Vec::with_capacity(requests.len() + 1);
    for (k, (name, _)) in requests.iter().enumerate() {
        order.push((find(name)?, Some(k)));
    }
    order.push((find(split_column)?, None));
    order.sort_by_key(|(i, _)| *i);

    let mut out = Columns {
        values: vec![Vec::new(); requests.len()],
        ..Columns::default()
    };
    // Occurrences of each line seen so far, so repeated lines get distinct fingerprints.
    let mut seen_lines: std::collections::HashMap<RowId, u32> = std::collections::HashMap::new();
    let max_rows = limits.max_cells / cells_per_row.max(1) as u64;
    let mut fields = LineFields::new();
    let mut data_rows: u64 = 0;

    loop {
        buf.clear();
        let read = lines.read_until(b'\n', &mut buf).map_err(|e| {
            dataset_err(DatasetProblem::Read {
                after_line: line_no,
                error: e.to_string(),
            })
        })?;
        if read == 0 {
            break;
        }
        line_no += 1;
        let text = line_text(&buf, line_no, file_label)?;
        if text.trim().is_empty() {
            continue;
        }
        let csv_err = |column: &str, problem: CsvProblem| Error::Csv {
            file: file_label.to_owned(),
            line: line_no,
            column: column.to_owned(),
            problem,
        };
        fields.split(text).map_err(|i| {
            let name = header_fields.get(i).map_or("(beyond the header)", |s| s.as_str());
            csv_err(name, CsvProblem::UnterminatedQuote)
        })?;
        if fields.len() != header_fields.len() {
            let column = header_fields
                .get(fields.len())
                .map_or("(beyond the header)", |s| s.as_str());
            return Err(csv_err(
                column,
                CsvProblem::FieldCount {
                    expected: header_fields.len(),
                    found: fields.len(),
                },
            ));
        }
        data_rows += 1;
        if data_rows > max_rows {
            return Err(dataset_err(DatasetProblem::OverBudget {
                max_cells: limits.max_cells,
            }));
        }
        for &(i, request) in &order {
            let name = header_fields[i].as_str();
            let value = fields.get(i);
            if value.is_empty() {
                return Err(csv_err(name, CsvProblem::EmptyValue));
            }
            let Some(k) = request else {
                out.train.push(match value {
                    "train" => true,
                    "test" => false,
                    _ => return Err(csv_err(name, CsvProblem::BadSplit)),
                });
                continue;
            };
            let v = match &requests[k].1 {
                Rule::Number => parse_number(value).map_err(|p| csv_err(name, p))?,
                Rule::Positive => {
                    let v = parse_number(value).map_err(|p| csv_err(name, p))?;
                    if v <= 0.0 {
                        return Err(csv_err(name, CsvProblem::NotPositiveForLog));
                    }
                    v
                }
                Rule::NonNegative => {
                    let v = parse_number(value).map_err(|p| csv_err(name, p))?;
                    if v < 0.0 {
                        return Err(csv_err(name, CsvProblem::Negative));
                    }
                    v
                }
                Rule::Level(levels) => match levels.iter().position(|l| l == value) {
                    Some(code) => code as f64,
                    None => return Err(csv_err(name, CsvProblem::UnknownLevel)),
                },
                Rule::Is(level) => indicator(value == level),
            };
            out.values[k].push(v);
        }
        out.ids.push(row_id(text, &mut seen_lines));
    }

    if data_rows == 0 {
        return Err(Error::Csv {
            file: file_label.to_owned(),
            line: line_no + 1,
            column: "(first data row)".to_owned(),
            problem: CsvProblem::NoDataRows,
        });
    }
    Ok(out)
}

/// The fingerprint of a data line: SHA-256 of its text, the k-th repeat of the same text
/// hashed again with k so that identical rows (two people with the same values) stay distinct.
fn row_id(line: &str, seen: &mut std::collections::HashMap<RowId, u32>) -> RowId {
    use sha2::{Digest, Sha256};
    let first8 = |d: &[u8]| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        u64::from_le_bytes(b)
    };
    let id = first8(&Sha256::digest(line.as_bytes()));
    let k = seen.entry(id).or_insert(0);
    *k += 1;
    if *k == 1 {
        id
    } else {
        let mut h = Sha256::new();
        h.update(id.to_le_bytes());
        h.update(k.to_le_bytes());
        first8(&h.finalize())
    }
}

fn indicator(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The line without its line ending, as UTF-8.
fn line_text<'a>(buf: &'a [u8], line: u64, file_label: &str) -> Result<&'a str> {
    let bytes = buf.strip_suffix(b"\n").unwrap_or(buf);
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|_| Error::Dataset {
        file: file_label.to_owned(),
        problem: DatasetProblem::NotUtf8 { line },
    })
}

/// One line split into fields by csv-core, the tokeniser of BurntSushi's `csv` crate.
///
/// We keep the line framing ourselves (one record per physical line, blank lines skipped, the
/// line's text fingerprinted) and hand only the splitting to csv-core: `csv::Reader` would let a
/// quoted field run over line breaks and end records at a lone `\r`, which would move line
/// numbers and fingerprints. Quoting is RFC 4180: a field that starts with `"` may hold commas
/// and `""` for a quote; text after the closing quote is kept. Fields are then trimmed. (The
/// hand-written splitter before it also opened a quote after leading spaces, `a, "b,c"`; RFC 4180
/// and csv-core read that quote as text, so such a field keeps its quotes, and a comma in it
/// splits the row, which then fails its field count.)
#[derive(Debug)]
struct LineFields {
    tokeniser: csv_core::Reader,
    /// The fields' bytes, one after the other; `ends[i]` is where field `i` ends.
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl LineFields {
    fn new() -> Self {
        LineFields {
            tokeniser: csv_core::ReaderBuilder::new()
                .terminator(csv_core::Terminator::Any(b'\n'))
                .build(),
            bytes: Vec::new(),
            ends: Vec::new(),
        }
    }

    /// Split `line` (without its line ending). On a quote the line does not close, returns the
    /// index of the field that opened it.
    fn split(&mut self, line: &str) -> std::result::Result<(), usize> {
        use csv_core::ReadRecordResult as R;
        self.tokeniser.reset();
        // A field is never longer than the line, and there is at most one per comma, plus one.
        self.bytes.resize(line.len() + 1, 0);
        self.ends
            .resize(line.bytes().filter(|b| *b == b',').count() + 2, 0);
        let (mut nout, mut nend) = (0, 0);
        // The line, then its terminator: a record ends only if no quote is open at the end.
        for input in [line.as_bytes(), b"\n"] {
            let mut input = input;
            loop {
                let (result, nin, out, ends) =
                    self.tokeniser
                        .read_record(input, &mut self.bytes[nout..], &mut self.ends[nend..]);
                input = &input[nin..];
                nout += out;
                nend += ends;
                match result {
                    R::Record => {
                        self.ends.truncate(nend);
                        return Ok(());
                    }
                    R::InputEmpty => break,
                    // Not reached given the sizes above; grow rather than assume.
                    R::OutputFull => self.bytes.resize(self.bytes.len() * 2 + 1, 0),
                    R::OutputEndsFull => self.ends.resize(self.ends.len() * 2 + 1, 0),
                    R::End => break,
                }
            }
        }
        // The terminator was swallowed as quoted text: field `nend` opened a quote.
        Err(nend)
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    /// Field `i`, trimmed. csv-core splits only at ASCII bytes, so a field of a UTF-8 line is
    /// UTF-8; if it ever were not, it reads as empty (an error for any used column).
    fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        std::str::from_utf8(&self.bytes[start..self.ends[i]])
            .unwrap_or("")
            .trim()
    }
}

/// Parse a finite number; the error says what is wrong without repeating the value.
fn parse_number(value: &str) -> std::result::Result<f64, CsvProblem> {
    if value == "NA" {
        return Err(CsvProblem::MissingValueMarker);
    }
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(CsvProblem::NotFinite),
        Err(_) => Err(CsvProblem::NotANumber),
    }
}

/// Sums over the train rows of every non-const design column: what the statistics phase sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnSums {
    pub n: u64,
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
}

impl ColumnSums {
    /// Check sums that came from a node: `k` columns, all finite, sums of squares not negative.
    pub fn validate(&self, k: usize) -> Result<()> {
        if self.sum.len() != k || self.sum_sq.len() != k {
            return Err(Error::Model(format!(
                "{} sums and {} sums of squares, expected {k} of each",
                self.sum.len(),
                self.sum_sq.len()
            )));
        }
        if self.sum.iter().chain(&self.sum_sq).any(|v| !v.is_finite()) || self.sum_sq.iter().any(|v| *v < 0.0)
        {
            return Err(Error::Model(
                "column sums are not all finite, or a sum of squares is negative".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Column sums of `x` (column 0, the constant, is skipped).
pub fn column_sums(x: ArrayView2<f64>) -> ColumnSums {
    let k = x.ncols().saturating_sub(1);
    let mut sum = vec![0.0; k];
    let mut sum_sq = vec![0.0; k];
    for row in x.rows() {
        for ((s, q), &v) in sum.iter_mut().zip(sum_sq.iter_mut()).zip(row.iter().skip(1)) {
            *s += v;
            *q += v * v;
        }
    }
    ColumnSums {
        n: x.nrows() as u64,
        sum,
        sum_sq,
    }
}

/// The pooled standardisation: computed from the nodes' sums, checked and applied.
pub trait StandardizationExt: Sized {
    /// Combine per-node sums (in a fixed order, e.g. sorted by node name, so the result is
    /// deterministic). Population sd (ddof 0). Fails naming the column if it is constant over
    /// the pooled rows, or if there are no rows.
    fn from_sums(parts: &[ColumnSums], column_names: &[String]) -> Result<Self>;
    /// Check this fits a design of `p` columns (constant included) and is usable.
    fn validate(&self, p: usize) -> Result<()>;
    /// `x_std = (x - mean) / sd` for columns 1.., the constant untouched. Columns without a
    /// mean/sd are left as they are: call [`StandardizationExt::validate`] first.
    fn apply(&self, x: &mut Array2<f64>);
}

impl StandardizationExt for Standardization {
    /// Combine per-node sums (the caller passes them in a fixed order, e.g. sorted by node name, so
    /// the result is deterministic). Population sd (ddof 0). Fails naming the column if it is
    /// constant over the pooled rows, or if there are no rows.
    fn from_sums(parts: &[ColumnSums], column_names: &[String]) -> Result<Self> {
        let k = column_names.len();
        let mut n: u64 = 0;
        let mut sum = vec![0.0; k];
        let mut sum_sq = vec![0.0; k];
        for (i, part) in parts.iter().enumerate() {
            part.validate(k).map_err(|e| match e {
                Error::Model(m) => Error::Model(format!("column sums #{}: {m}", i + 1)),
                other => other,
            })?;
            n = n
                .checked_add(part.n)
                .ok_or_else(|| Error::Model("row count of the column sums overflows".to_owned()))?;
            for j in 0..k {
                sum[j] += part.sum[j];
                sum_sq[j] += part.sum_sq[j];
            }
        }
        if n == 0 {
            return Err(Error::Model(
                "no training rows at any node: cannot standardise".to_owned(),
            ));
        }
        let nf = n as f64;
        let mut mean = Vec::with_capacity(k);
        let mut sd = Vec::with_capacity(k);
        for (j, name) in column_names.iter().enumerate() {
            let m = sum[j] / nf;
            let ex2 = sum_sq[j] / nf;
            let var = ex2 - m * m;
            // E[x²] - mean² of a constant column is rounding noise of the size of eps · E[x²].
            if var.is_nan() || var <= 64.0 * f64::EPSILON * ex2 {
                return Err(Error::Model(format!(
                    "column `{name}` is constant over the pooled training rows, so it cannot be \
                     standardised; remove it from the schema"
                )));
            }
            mean.push(m);
            sd.push(var.sqrt());
        }
        Ok(Standardization { mean, sd })
    }

    /// Check this fits a design of `p` columns (constant included) and is usable.
    fn validate(&self, p: usize) -> Result<()> {
        if self.mean.len() + 1 != p || self.sd.len() + 1 != p {
            return Err(Error::Model(format!(
                "standardisation has {} means and {} sds, the design has {} non-constant columns",
                self.mean.len(),
                self.sd.len(),
                p.saturating_sub(1)
            )));
        }
        if self.mean.iter().any(|m| !m.is_finite()) || self.sd.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::Model(
                "standardisation has a non-finite mean or a non-positive sd".to_owned(),
            ));
        }
        Ok(())
    }

    /// `x_std = (x - mean) / sd` for columns 1.., the constant untouched. Columns without a
    /// mean/sd are left as they are: call [`Standardization::validate`] first.
    fn apply(&self, x: &mut Array2<f64>) {
        for mut row in x.rows_mut() {
            for ((v, m), s) in row.iter_mut().skip(1).zip(&self.mean).zip(&self.sd) {
                *v = (*v - m) / s;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::spec::{CategoricalFeature, NumericFeature, TargetSpec};

    /// The data sets the repository ships: the clean CPS 1988 files (with the pooled reference
    /// fits) under `configs/demo`, the deliberately malformed copies under `tests/data`.
    pub(crate) fn data_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
    }

    fn cat(column: &str, levels: &[&str]) -> CategoricalFeature {
        CategoricalFeature {
            column: column.to_owned(),
            levels: levels.iter().map(|l| (*l).to_owned()).collect(),
            reference: levels[0].to_owned(),
        }
    }

    /// The README's design: education, experience (+ squared), three dummies.
    pub(crate) fn cps_schema(target: TargetSpec) -> DataSchema {
        DataSchema {
            split_column: "split".to_owned(),
            target: Some(target),
            numeric: vec![
                NumericFeature {
                    column: "education".to_owned(),
                    squared: false,
                },
                NumericFeature {
                    column: "experience".to_owned(),
                    squared: true,
                },
            ],
            categorical: vec![
                cat("ethnicity", &["cauc", "afam"]),
                cat("smsa", &["no", "yes"]),
                cat("parttime", &["no", "yes"]),
            ],
        }
    }

    pub(crate) fn logit_schema() -> DataSchema {
        cps_schema(TargetSpec {
            column: "wage".to_owned(),
            log: false,
            threshold: Some(522.32),
            positive_level: None,
        })
    }

    pub(crate) fn ols_schema() -> DataSchema {
        cps_schema(TargetSpec {
            column: "wage".to_owned(),
            log: true,
            threshold: None,
            positive_level: None,
        })
    }

    /// A logistic design from CSV text, without limits.
    fn read_text(text: &str, schema: &DataSchema) -> Result<LocalData> {
        load_csv_from_reader(
            "t.csv",
            text.as_bytes(),
            schema,
            ModelKind::Logistic,
            LoadLimits::UNLIMITED,
        )
    }

    pub(crate) const REGIONS: [&str; 4] = ["midwest", "northeast", "south", "west"];

    pub(crate) fn load_region(region: &str, schema: &DataSchema, model: ModelKind) -> LocalData {
        let path = data_dir().join("cps1988").join(format!("{region}.csv"));
        load_csv(&path, schema, model, LoadLimits::UNLIMITED).expect("clean file loads")
    }

    /// `(line, column, words the message must contain, values it must not contain)`; line 0 means
    /// a whole-file error.
    type Expect = (
        u64,
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
    );

    fn check(file: &str, schema: &DataSchema, model: ModelKind, expected: Option<Expect>) {
        let path = data_dir().join("cps1988-dirty").join(file);
        let result = load_csv(&path, schema, model, LoadLimits::UNLIMITED);
        match (result, expected) {
            (Ok(data), None) => {
                assert_eq!(data.train.rows() + data.test.rows(), 20, "{file}");
            }
            (Ok(_), Some(_)) => panic!("{file}: loaded but should fail"),
            (Err(e), None) => panic!("{file}: {e}"),
            (Err(e), Some((line, column, words, forbidden))) => {
                let msg = e.to_string();
                assert!(msg.contains(file), "{msg}: should name the file");
                if line > 0 {
                    match &e {
                        Error::Csv {
                            line: l, column: c, ..
                        } => {
                            assert_eq!((*l, c.as_str()), (line, column), "{msg}");
                        }
                        other => panic!("{file}: expected a CSV error, got {other:?}"),
                    }
                    assert!(msg.contains(&format!("line {line},")), "{msg}");
                    assert!(msg.contains(&format!("`{column}`")), "{msg}");
                } else {
                    assert!(matches!(e, Error::Dataset { .. }), "{file}: {e:?}");
                }
                for w in words {
                    assert!(msg.contains(w), "{msg}: should contain {w:?}");
                }
                for v in forbidden {
                    assert!(!msg.contains(v), "{msg}: leaks the value {v:?}");
                }
            }
        }
    }

    #[test]
    fn dirty_files_fail_at_the_right_cell_without_leaking_values() {
        let s = logit_schema();
        let lg = ModelKind::Logistic;
        check("bom_crlf.csv", &s, lg, None);
        check("empty.csv", &s, lg, Some((1, "(header)", &["empty"], &[])));
        check(
            "header_only.csv",
            &s,
            lg,
            Some((2, "(first data row)", &["no data rows"], &[])),
        );
        check(
            "extra_column.csv",
            &s,
            lg,
            Some((
                7,
                "(beyond the header)",
                &["expected 9 fields, found 10"],
                &["oops"],
            )),
        );
        check(
            "short_row.csv",
            &s,
            lg,
            Some((8, "parttime", &["expected 9 fields, found 7"], &[])),
        );
        check(
            "missing_values.csv",
            &s,
            lg,
            Some((6, "wage", &["empty"], &["NA"])),
        );
        check(
            "non_numeric.csv",
            &s,
            lg,
            Some((4, "education", &["not a number"], &["twelve", "1O", "$354.94"])),
        );
        check(
            "unknown_category.csv",
            &s,
            lg,
            Some((
                10,
                "parttime",
                &["not one of the levels listed in the experiment"],
                &["YES", "north-east", "validation"],
            )),
        );
        check(
            "nonfinite_values.csv",
            &s,
            lg,
            Some((3, "wage", &["finite"], &["inf", "NaN", "-120.5", "1e309"])),
        );
        check(
            "wrong_header.csv",
            &s,
            lg,
            Some((1, "education", &["`education`", "educ,"], &[])),
        );
    }

    /// What leaves a node for a dirty file names at most the column and the kind of problem:
    /// no file name, line number, count, header list or value.
    #[test]
    fn public_text_of_dirty_files_names_no_line_file_count_header_or_value() {
        let schema = logit_schema();
        let forbidden_everywhere = [
            ".csv",
            "line",
            "found",
            "header has",
            "educ,",
            "twelve",
            "1O",
            "$354.94",
            "YES",
            "north-east",
            "validation",
            "NA,",
            "inf",
            "NaN",
            "-120.5",
            "1e309",
            "oops",
            "/",
        ];
        for entry in std::fs::read_dir(data_dir().join("cps1988-dirty")).expect("dirty dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "csv") {
                continue;
            }
            let Err(e) = load_csv(&path, &schema, ModelKind::Logistic, LoadLimits::UNLIMITED) else {
                continue;
            };
            let public = e.public();
            for word in forbidden_everywhere {
                assert!(
                    !public.contains(word),
                    "{}: {public:?} contains {word:?}",
                    path.display()
                );
            }
            assert!(
                !public.chars().any(|c| c.is_ascii_digit()),
                "{public:?} has a number"
            );
        }
    }

    #[test]
    fn the_memory_budget_stops_loading_before_it_is_exceeded() {
        let schema = logit_schema();
        let path = data_dir().join("cps1988/south.csv");
        let p = schema.design_width() as u64;
        let e = load_csv(
            &path,
            &schema,
            ModelKind::Logistic,
            LoadLimits { max_cells: 100 * p },
        )
        .expect_err("over budget");
        assert!(
            matches!(
                e,
                Error::Dataset {
                    problem: DatasetProblem::OverBudget { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.public().contains("policy.max_memory_mb"), "{}", e.public());
    }

    #[test]
    fn row_ids_are_distinct_even_for_repeated_lines() {
        let schema = logit_schema();
        let text = "wage,education,experience,ethnicity,smsa,parttime,split\n\
                    600,12,3,cauc,no,no,train\n600,12,3,cauc,no,no,train\n100,9,1,afam,yes,no,train\n";
        let d = read_text(text, &schema).expect("loads");
        let ids: std::collections::BTreeSet<_> = d.train.ids.iter().collect();
        assert_eq!(ids.len(), 3);
        // The same file read again gives the same fingerprints.
        let again = read_text(text, &schema).expect("loads");
        assert_eq!(d.train.ids, again.train.ids);
    }

    #[test]
    fn each_defect_is_found_once_the_earlier_ones_are_fixed() {
        // Re-read the dirty files with the earlier defective lines dropped, to reach the later
        // defects; line numbers then shift by the number of dropped lines.
        let read =
            |file: &str| std::fs::read_to_string(data_dir().join("cps1988-dirty").join(file)).expect("read");
        let drop_lines = |text: &str, drop: &[usize]| -> String {
            text.lines()
                .enumerate()
                .filter(|(i, _)| !drop.contains(&(i + 1)))
                .map(|(_, l)| format!("{l}\n"))
                .collect()
        };
        // (file, lines dropped, model, expected line, column, value that must not appear)
        type Case = (
            &'static str,
            &'static [usize],
            ModelKind,
            u64,
            &'static str,
            &'static str,
        );
        let cases: &[Case] = &[
            (
                "missing_values.csv",
                &[6],
                ModelKind::Logistic,
                10,
                "education",
                "NA",
            ),
            (
                "missing_values.csv",
                &[6, 11],
                ModelKind::Logistic,
                14,
                "ethnicity",
                ",",
            ),
            (
                "non_numeric.csv",
                &[4],
                ModelKind::Logistic,
                8,
                "experience",
                "1O",
            ),
            (
                "non_numeric.csv",
                &[4, 9],
                ModelKind::Logistic,
                11,
                "wage",
                "$354.94",
            ),
            (
                "unknown_category.csv",
                &[10],
                ModelKind::Logistic,
                13,
                "split",
                "validation",
            ),
            (
                "nonfinite_values.csv",
                &[3],
                ModelKind::Logistic,
                3,
                "wage",
                "NaN",
            ),
            (
                "nonfinite_values.csv",
                &[3, 4],
                ModelKind::Linear,
                3,
                "wage",
                "-120.5",
            ),
            (
                "nonfinite_values.csv",
                &[3, 4, 5],
                ModelKind::Logistic,
                3,
                "wage",
                "1e309",
            ),
        ];
        for &(file, drop, model, line, column, value) in cases {
            let schema = if model == ModelKind::Linear {
                ols_schema()
            } else {
                logit_schema()
            };
            let text = drop_lines(&read(file), drop);
            let e = load_csv_from_reader(file, text.as_bytes(), &schema, model, LoadLimits::UNLIMITED)
                .expect_err(file);
            let msg = e.to_string();
            assert!(
                matches!(&e, Error::Csv { line: l, column: c, .. } if *l == line && c == column),
                "{file} without {drop:?}: {msg}"
            );
            assert!(value == "," || !msg.contains(value), "{msg} leaks {value:?}");
        }
    }

    #[test]
    fn lines_split_by_rfc_4180_quoting_and_unclosed_quotes_name_their_field() {
        let check = |line: &str, expected: std::result::Result<&[&str], usize>| {
            let mut fields = LineFields::new();
            let got = fields.split(line).map(|()| {
                (0..fields.len())
                    .map(|i| fields.get(i).to_owned())
                    .collect::<Vec<_>>()
            });
            let expected = expected.map(|f| f.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
            assert_eq!(got, expected, "{line:?}");
        };
        check("a,b,", Ok(&["a", "b", ""]));
        check(" a , b ", Ok(&["a", "b"]));
        check("\"a,b\",c", Ok(&["a,b", "c"]));
        check("\"say \"\"hi\"\"\",x", Ok(&["say \"hi\"", "x"]));
        check("\"ab\"cd,e", Ok(&["abcd", "e"]));
        check("é,\"ü,ß\"", Ok(&["é", "ü,ß"]));
        check("a\rb,c", Ok(&["a\rb", "c"]));
        // A quote after leading spaces is text (RFC 4180), as documented on `LineFields`.
        check("a, \"b,c\"", Ok(&["a", "\"b", "c\""]));
        check("x,\"open,y", Err(1));
        check("\"", Err(0));
        let many: Vec<&str> = std::iter::repeat_n("a", 1000).chain([""]).collect();
        check(&"a,".repeat(1000), Ok(&many));
    }

    #[test]
    fn small_inputs_parse_as_documented() {
        let schema = DataSchema {
            split_column: "s".to_owned(),
            target: Some(TargetSpec {
                column: "t".to_owned(),
                log: false,
                threshold: None,
                positive_level: Some("hi".to_owned()),
            }),
            numeric: vec![NumericFeature {
                column: "a".to_owned(),
                squared: true,
            }],
            categorical: vec![CategoricalFeature {
                column: "c".to_owned(),
                levels: vec!["x".into(), "y".into(), "z".into()],
                reference: "y".to_owned(),
            }],
        };
        let text = "\u{feff}t, a ,c,s,unused\r\nhi,2,x,train,?\r\n\r\n\"lo\",\"-1.5\",z,test,\"a,b\"\nlo,3,y,train,\n";
        let data = read_text(text, &schema).expect("loads");
        assert_eq!(
            data.train.x.as_slice(),
            Some(&[1.0, 2.0, 4.0, 1.0, 0.0, 1.0, 3.0, 9.0, 0.0, 0.0][..])
        );
        assert_eq!(data.train.y.to_vec(), [1.0, 0.0]);
        assert_eq!(data.test.x.as_slice(), Some(&[1.0, -1.5, 2.25, 0.0, 1.0][..]));
        assert_eq!(data.test.y.to_vec(), [0.0]);
        // Fingerprints are SHA-256 of the line as written (quotes kept, CRLF and BOM not): the
        // release ledgers on nodes' disks hold them, so these values must never change.
        assert_eq!(data.train.ids[0], 0x3e1d_cfcb_30f6_b827);
        assert_eq!(data.test.ids, [0x3b68_7fd7_7616_96e7]);

        let fails = |text: &str, line: u64, column: &str| {
            let e = read_text(text, &schema).expect_err(text);
            assert!(
                matches!(&e, Error::Csv { line: l, column: c, .. } if *l == line && c == column),
                "{text:?}: {e}"
            );
        };
        fails("t,a,c,s,unused\nhi,2,x,train,?\nhi,2,x,\"train,?\n", 3, "s");
        fails("t,a,c,s,unused\nhi,2,X,train,?\n", 2, "c");
        fails("t,a,c,s,unused\nhi,-inf,x,train,?\n", 2, "a");
        let only_test = "t,a,c,s,unused\nhi,2,x,test,?\n";
        let e = read_text(only_test, &schema).expect_err("no train");
        assert!(e.to_string().contains("nothing to train on"), "{e}");
    }

    #[test]
    fn clean_files_pool_to_the_reference_counts_and_standardisation() {
        let schema = logit_schema();
        let names: Vec<String> = schema.design_columns().into_iter().skip(1).collect();
        let (mut train, mut test) = (0, 0);
        let mut parts = Vec::new();
        for region in REGIONS {
            let d = load_region(region, &schema, ModelKind::Logistic);
            train += d.train.rows();
            test += d.test.rows();
            parts.push(column_sums(d.train.x.view()));
        }
        assert_eq!((train, test), (22_524, 5_631));
        let st = Standardization::from_sums(&parts, &names).expect("standardise");
        st.validate(names.len() + 1).expect("valid");
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(data_dir().join("cps1988/reference.json")).expect("reference"),
        )
        .expect("json");
        let r = &reference["cps1988"]["models"]["logit_highwage"]["standardization"];
        for (j, name) in names.iter().enumerate() {
            for (got, key) in [(st.mean[j], "mean"), (st.sd[j], "sd")] {
                let want = r[key][name].as_f64().expect("reference value");
                assert!(
                    ((got - want) / want).abs() < 1e-9,
                    "{key} of {name}: {got} vs {want}"
                );
            }
        }
    }

    /// The coordinator stores the standardisation as JSON and sends it again after a restart;
    /// nodes answer a task only once per input (see the node's bindings), so the values must
    /// come back bit for bit (serde_json's `float_roundtrip`).
    #[test]
    fn standardisation_survives_json_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let st = Standardization {
            mean: (0..2000).map(|_| rng.gen::<f64>() * 1e3 - 17.0).collect(),
            sd: (0..2000).map(|_| rng.gen::<f64>().powi(7) + 1e-300).collect(),
        };
        let back: Standardization =
            serde_json::from_str(&serde_json::to_string(&st).expect("encode")).expect("decode");
        for (a, b) in st.mean.iter().chain(&st.sd).zip(back.mean.iter().chain(&back.sd)) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    fn constant_columns_and_no_rows_are_refused_by_name() {
        let names = vec!["a".to_owned(), "b".to_owned()];
        let x = ndarray::array![[1.0, 3.0, 0.1], [1.0, 3.0, 0.2], [1.0, 3.0, 0.7]];
        let e = Standardization::from_sums(&[column_sums(x.view())], &names).expect_err("constant");
        assert!(e.to_string().contains("`a`"), "{e}");
        let e = Standardization::from_sums(&[], &names).expect_err("no rows");
        assert!(e.to_string().contains("no training rows"), "{e}");

        let mut x = ndarray::array![[1.0, 1.0, 0.0], [1.0, 3.0, 2.0]];
        let st = Standardization::from_sums(&[column_sums(x.view())], &names).expect("ok");
        st.apply(&mut x);
        assert_eq!(x, ndarray::array![[1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]);
    }

    /// An experiment form from TOML (for plans with formulas, weights, offsets, offices).
    fn spec_of(text: &str) -> crate::spec::ExperimentSpec {
        toml::from_str(text).expect("spec")
    }

    fn plan_of(text: &str) -> DesignPlan {
        spec_of(text).design().expect("plan")
    }

    #[test]
    fn the_formula_gives_the_design_of_the_lists_on_the_cps_files() {
        let mut schema = ols_schema();
        schema.target = None;
        schema.numeric.clear();
        let plan = DesignPlan::from_schema(
            &schema,
            Some("log(wage) ~ education + experience + I(experience^2) + ethnicity + smsa + parttime"),
            ModelKind::Linear,
        )
        .expect("plan");
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(data_dir().join("cps1988/reference.json")).expect("reference"),
        )
        .expect("json");
        let want: Vec<String> = reference["cps1988"]["models"]["ols_logwage"]["design"]["columns_in_order"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|c| c.as_str().expect("name").to_owned())
            .collect();
        assert_eq!(plan.names(), want);
        for region in REGIONS {
            let path = data_dir().join("cps1988").join(format!("{region}.csv"));
            let from_formula = load_design(&path, &plan, None, LoadLimits::UNLIMITED).expect("loads");
            let from_lists = load_region(region, &ols_schema(), ModelKind::Linear);
            assert_eq!(from_formula, from_lists, "{region}");
        }
    }

    const SMALL: &str = "y,x,f,g,w,e,split\n\
        1,2,a,u,1,1,train\n\
        2,3,b,v,0,2,train\n\
        3,4,c,v,2.5,4,train\n\
        4,5,b,u,1,8,test\n";

    fn small_spec(rhs: &str, extra: &str) -> String {
        format!(
            "name = \"t\"\ndataset = \"d\"\nmodel = \"linear\"\nmethod = \"exact\"\nformula = \"y ~ {rhs}\"\n{extra}\n\
             [schema]\ncategorical = [{{ column = \"f\", levels = [\"a\", \"b\", \"c\"], reference = \"a\" }}, \
             {{ column = \"g\", levels = [\"u\", \"v\"], reference = \"u\" }}]\n"
        )
    }

    #[test]
    fn interactions_of_factors_and_numbers_build_their_columns() {
        let plan = plan_of(&small_spec("x*f + f:g", ""));
        assert_eq!(
            plan.names(),
            ["const", "x", "f=b", "f=c", "x:f=b", "x:f=c", "f=b:g=v", "f=c:g=v"]
        );
        let d = load_design_from_reader("t.csv", SMALL.as_bytes(), &plan, None, LoadLimits::UNLIMITED)
            .expect("loads");
        assert_eq!(
            d.train.x,
            ndarray::array![
                [1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                [1.0, 3.0, 1.0, 0.0, 3.0, 0.0, 1.0, 0.0],
                [1.0, 4.0, 0.0, 1.0, 0.0, 4.0, 0.0, 1.0],
            ]
        );
        assert_eq!(
            d.test.x,
            ndarray::array![[1.0, 5.0, 1.0, 0.0, 5.0, 0.0, 0.0, 0.0]]
        );
        assert_eq!(d.train.y.to_vec(), [1.0, 2.0, 3.0]);
        assert!(d.train.weights.is_none() && d.train.offset.is_none());
        // Without an intercept the first factor keeps every level, as in R.
        let plan = plan_of(&small_spec("f + x - 1", ""));
        assert_eq!(plan.names(), ["f=a", "f=b", "f=c", "x"]);
        let d = load_design_from_reader("t.csv", SMALL.as_bytes(), &plan, None, LoadLimits::UNLIMITED)
            .expect("loads");
        assert_eq!(d.train.x.row(0).to_vec(), [1.0, 0.0, 0.0, 2.0]);
    }

    #[test]
    fn weights_and_offset_load_and_bad_values_are_refused_by_column() {
        let plan = plan_of(&small_spec("x", "weights = \"w\"\noffset = \"log(e)\""));
        let d = load_design_from_reader("t.csv", SMALL.as_bytes(), &plan, None, LoadLimits::UNLIMITED)
            .expect("loads");
        assert_eq!(
            d.train.weights.as_ref().map(|w| w.to_vec()),
            Some(vec![1.0, 0.0, 2.5])
        );
        let off = d.train.offset.as_ref().map(|o| o.to_vec()).expect("offset");
        assert_eq!(off, [0.0, 2f64.ln(), 4f64.ln()]);
        assert_eq!(d.test.offset.as_ref().map(|o| o.to_vec()), Some(vec![8f64.ln()]));
        let plain = plan_of(&small_spec("x", "offset = \"e\""));
        let d = load_design_from_reader("t.csv", SMALL.as_bytes(), &plain, None, LoadLimits::UNLIMITED)
            .expect("loads");
        assert_eq!(d.test.offset.as_ref().map(|o| o.to_vec()), Some(vec![8.0]));

        let fails = |text: &str, line: u64, column: &str, problem: CsvProblem| {
            let e = load_design_from_reader("t.csv", text.as_bytes(), &plan, None, LoadLimits::UNLIMITED)
                .expect_err(text);
            assert!(
                matches!(&e, Error::Csv { line: l, column: c, problem: p, .. }
                    if *l == line && c == column && *p == problem),
                "{text:?}: {e}"
            );
            assert!(e.public().contains(&format!("`{column}`")), "{}", e.public());
        };
        fails(&SMALL.replace("2.5,4", "-2.5,4"), 4, "w", CsvProblem::Negative);
        fails(&SMALL.replace("2.5,4", "inf,4"), 4, "w", CsvProblem::NotFinite);
        fails(
            &SMALL.replace("2.5,4", "2.5,0"),
            4,
            "e",
            CsvProblem::NotPositiveForLog,
        );
        fails(
            &SMALL.replace("2.5,4", "2.5,NA"),
            4,
            "e",
            CsvProblem::MissingValueMarker,
        );
    }

    #[test]
    fn office_columns_are_set_for_the_nodes_own_office_only() {
        let plan = plan_of(&small_spec(
            "x",
            "office_effects = true\noffices = [\"north\", \"south\", \"west\"]",
        ));
        assert_eq!(plan.names(), ["const", "x", "office=south", "office=west"]);
        let load = |office: Option<&str>| {
            load_design_from_reader("t.csv", SMALL.as_bytes(), &plan, office, LoadLimits::UNLIMITED)
        };
        let south = load(Some("south")).expect("south");
        assert_eq!(south.train.x.column(2).to_vec(), [1.0, 1.0, 1.0]);
        assert_eq!(south.train.x.column(3).to_vec(), [0.0, 0.0, 0.0]);
        let north = load(Some("north")).expect("north");
        assert_eq!(north.train.x.column(2).sum() + north.train.x.column(3).sum(), 0.0);
        for office in [None, Some("east")] {
            let e = load(office).expect_err("not an office of the experiment");
            assert!(e.to_string().contains("offices"), "{e}");
        }
    }

    #[test]
    fn frames_hold_typed_raw_columns_by_name() {
        let request = FrameRequest {
            split_column: "split".into(),
            numeric: vec!["wage".into(), "education".into()],
            categorical: vec![(
                "region".into(),
                vec![
                    "midwest".into(),
                    "northeast".into(),
                    "south".into(),
                    "west".into(),
                ],
            )],
        };
        let path = data_dir().join("cps1988/south.csv");
        let frame = load_frame(&path, &request, LoadLimits::UNLIMITED).expect("loads");
        let design = load_region("south", &logit_schema(), ModelKind::Logistic);
        assert_eq!(frame.rows(), design.train.rows() + design.test.rows());
        assert_eq!(frame.train.iter().filter(|t| **t).count(), design.train.rows());
        let region = &frame.categorical["region"];
        assert!(region.codes.iter().all(|c| *c == 2));
        assert_eq!(frame.numeric["education"].len(), frame.rows());
        // The same fingerprints as the design's rows, in file order.
        let train_ids: Vec<RowId> = frame
            .ids
            .iter()
            .zip(&frame.train)
            .filter(|(_, t)| **t)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(train_ids, design.train.ids);
        // Errors are those of the design loader: file, line and column, never the value.
        let text = "wage,region,split\n1,south,train\n2,mars,test\n";
        let e = load_frame_from_reader("t.csv", text.as_bytes(), &request, LoadLimits::UNLIMITED)
            .expect_err("missing column");
        assert!(
            matches!(&e, Error::Csv { column, .. } if column == "education"),
            "{e}"
        );
        let request = FrameRequest {
            numeric: vec!["wage".into()],
            ..request
        };
        let e = load_frame_from_reader("t.csv", text.as_bytes(), &request, LoadLimits::UNLIMITED)
            .expect_err("unknown level");
        assert!(
            matches!(&e, Error::Csv { line: 3, column, problem: CsvProblem::UnknownLevel, .. } if column == "region"),
            "{e}"
        );
        assert!(!e.to_string().contains("mars"), "{e}");
    }
}
