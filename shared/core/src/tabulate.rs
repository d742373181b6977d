//! Federated tables, the pure parts both sides share: the layout of a table and of a node's
//! answer, the node's tabulation and cell rules, and secondary suppression.
//!
//! **Layout.** A table over `by` columns with `d_1 × … × d_D` levels (D = 1..3) is held with its
//! margins: each dimension gains one index, `d_i` (one past its levels), that sums over it, so
//! there are `Π(d_i + 1)` *elements* (interior cells and margins, up to the grand total), row-major.
//! Each element carries `width` numbers: a suppression flag, the row count, and for every
//! numeric column `Σx`, `Σx²`, `Σ|x|`, `(Σ|x| / B)²` (B the larger magnitude of the column's
//! declared bounds; the pooled sum of these squares bounds the node-level dominance, see
//! [`dominated_pooled`]) and its histogram counts. A node's answer is that vector; the exact
//! sum of the answers is the pooled table.
//!
//! **Node rules** ([`node_answer`]): an element with 1 to `min_cell - 1` rows, or whose
//! numeric sums fail the (n, k) dominance rule on |x|, is *primary-suppressed*: sent as zeros
//! with its flag set, never with its value. Then *secondary suppression* on the node's own
//! table: a node's margins are public elsewhere (its row counts leak through other
//! experiments), so they are treated as known, and further interior cells are suppressed
//! until no suppressed cell follows from the published cells and the margins by any linear
//! combination of line sums ([`protect`]).
//!
//! **Secondary suppression** ([`protect`]): every line (an element and the elements it sums,
//! along one dimension) that holds an unknown (suppressed) element must hold at least two,
//! and when its total is published the suppressed parts must hold `min_cell` rows together
//! (else their sum, total less the published parts, releases a small group);
//! the smallest published element of the line is suppressed (non-empty cells first), to a
//! fixed point. That rule alone can leave a suppressed cell determined (a "bridge" between two
//! suppressed cycles), so the fixed point is then checked exactly: the line equations
//! restricted to the unknowns are reduced (Gauss–Jordan over the prime field 2^61 − 1, exact
//! for these 0/±1 systems), and a suppressed element whose unit vector lies in their row space
//! gets a further suppression on one of its lines; repeat until none is determined.

use fedstat_proto::spec::ExperimentSpec;
use fedstat_proto::table::{Suppression, TableNumeric, TableRows, TableSpec, MARGIN};

/// Most interior cells of a table.
pub const MAX_CELLS: u64 = 10_000;
/// Most numbers in one node's answer (elements × width).
pub const MAX_ANSWER_VALUES: u64 = 2_000_000;
/// Most numeric columns per table.
pub const MAX_NUMERIC: usize = 8;
/// Most histogram bin edges per numeric column.
pub const MAX_EDGES: usize = 1_001;
/// Most quantiles per numeric column.
pub const MAX_QUANTILES: usize = 20;
/// Largest declared bound magnitude: keeps `Σx²` of a million rows below 2^62.
pub const MAX_BOUND: f64 = 1e6;
/// Most suppressed elements linked by shared lines that the exact check will reduce at once.
pub const MAX_COMPONENT: usize = 1_500;

/// What can go wrong with a table. Messages name a column or a rule, never a value or count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The form asks for something inconsistent; `key` is the TOML key.
    #[error("invalid experiment: key `{key}`: {problem}")]
    Spec { key: String, problem: String },
    /// A value of `column` lies outside its declared `[min, max]` and `clip` is off.
    #[error("table: column `{column}` has a value outside its declared bounds (set clip = true to clip)")]
    OutOfBounds { column: String },
    /// A value of `column` is not a finite number.
    #[error("table: column `{column}` has a value that is not a finite number")]
    NotFinite { column: String },
    /// The data handed to tabulation does not match the layout (a bug, not the data).
    #[error("table: {0}")]
    Shape(&'static str),
    /// Small cells cannot be protected by secondary suppression (too many, or a line with
    /// nothing left to suppress).
    #[error("table: a small cell cannot be protected by suppressing others (policy.min_cell); use fewer or coarser `by` columns")]
    Unprotectable,
}

fn spec_err(key: &str, problem: impl Into<String>) -> TableError {
    TableError::Spec {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

/// A validated form: its `by` columns, their levels, and the form.
type Sized<'a> = (Vec<String>, Vec<Vec<String>>, &'a TableSpec);

/// The shape of a table and of every answer to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// `by` column names.
    pub by: Vec<String>,
    /// Declared levels of each `by` column.
    pub levels: Vec<Vec<String>>,
    pub numeric: Vec<TableNumeric>,
    pub rows: TableRows,
    /// Numbers per element.
    pub width: usize,
    /// Elements (interior cells and margins).
    pub elements: usize,
    lines: Vec<Vec<usize>>,
    /// The lines through each element, one per dimension.
    member: Vec<Vec<usize>>,
}

/// Offset of numeric column `m`'s block inside an element.
fn numeric_offset(numeric: &[TableNumeric], m: usize) -> usize {
    2 + numeric[..m].iter().map(|n| 4 + bins(n)).sum::<usize>()
}

fn bins(n: &TableNumeric) -> usize {
    n.bins.len().saturating_sub(1)
}

/// The scale of a column's node-level dominance figure: its larger bound magnitude.
pub fn bound(n: &TableNumeric) -> f64 {
    n.min.abs().max(n.max.abs())
}

/// Check a table form against the experiment's schema (sizes before anything is allocated).
pub fn validate(spec: &ExperimentSpec) -> Result<(), TableError> {
    Layout::sized(spec).map(|_| ())
}

impl Layout {
    /// The layout of `spec`'s table (validated on the way).
    pub fn new(spec: &ExperimentSpec) -> Result<Layout, TableError> {
        let (by, levels, t) = Layout::sized(spec)?;
        Ok(Layout::from_parts(by, levels, t.numeric.clone(), t.rows))
    }

    /// A layout from checked parts.
    pub(crate) fn from_parts(
        by: Vec<String>,
        levels: Vec<Vec<String>>,
        numeric: Vec<TableNumeric>,
        rows: TableRows,
    ) -> Layout {
        let width = 2 + numeric.iter().map(|n| 4 + bins(n)).sum::<usize>();
        let elements = levels.iter().map(|l| l.len() + 1).product();
        let mut layout = Layout {
            by,
            levels,
            numeric,
            rows,
            width,
            elements,
            lines: Vec::new(),
            member: vec![Vec::new(); elements],
        };
        layout.build_lines();
        layout
    }

    /// Validation of the form, returning the `by` columns and their levels.
    fn sized(spec: &ExperimentSpec) -> Result<Sized<'_>, TableError> {
        let t = spec
            .table
            .as_ref()
            .ok_or_else(|| spec_err("table", "required when model = \"table\""))?;
        let schema = spec
            .schema
            .as_ref()
            .ok_or_else(|| spec_err("schema", "required for tables: it declares the levels"))?;
        if t.by.is_empty() || t.by.len() > 3 {
            return Err(spec_err("table.by", "must name 1 to 3 categorical columns"));
        }
        let mut levels = Vec::new();
        let mut cells: u64 = 1;
        for (i, col) in t.by.iter().enumerate() {
            if t.by[..i].contains(col) {
                return Err(spec_err("table.by", format!("column `{col}` is named twice")));
            }
            let f = schema
                .categorical
                .iter()
                .find(|f| &f.column == col)
                .ok_or_else(|| {
                    spec_err(
                        "table.by",
                        format!("column `{col}` must be declared in [schema] categorical, with its levels"),
                    )
                })?;
            if f.levels.is_empty() {
                return Err(spec_err("table.by", format!("column `{col}` declares no levels")));
            }
            cells = cells.saturating_mul(f.levels.len() as u64);
            levels.push(f.levels.clone());
        }
        if cells > MAX_CELLS {
            return Err(spec_err(
                "table.by",
                format!("the table would have more than {MAX_CELLS} cells"),
            ));
        }
        if t.numeric.len() > MAX_NUMERIC {
            return Err(spec_err(
                "table.numeric",
                format!("at most {MAX_NUMERIC} numeric columns"),
            ));
        }
        let mut width: u64 = 2;
        for (i, n) in t.numeric.iter().enumerate() {
            let col = &n.column;
            if col.trim().is_empty() {
                return Err(spec_err("table.numeric.column", "must not be empty"));
            }
            if t.numeric[..i].iter().any(|o| &o.column == col) {
                return Err(spec_err(
                    "table.numeric.column",
                    format!("column `{col}` is named twice"),
                ));
            }
            if t.by.contains(col) || *col == schema.split_column {
                return Err(spec_err(
                    "table.numeric.column",
                    format!("column `{col}` is a `by` or split column"),
                ));
            }
            let finite = n.min.is_finite() && n.max.is_finite();
            if !(finite && n.min < n.max && n.min.abs() <= MAX_BOUND && n.max.abs() <= MAX_BOUND) {
                return Err(spec_err(
                    "table.numeric.min",
                    format!(
                        "column `{col}`: min and max must be finite, min < max, both within ±{MAX_BOUND}"
                    ),
                ));
            }
            if !n.bins.is_empty() {
                let increasing = n.bins.windows(2).all(|w| w[0] < w[1]);
                if n.bins.len() < 2
                    || n.bins.len() > MAX_EDGES
                    || !n.bins.iter().all(|e| e.is_finite())
                    || !increasing
                {
                    return Err(spec_err(
                        "table.numeric.bins",
                        format!("column `{col}`: 2 to {MAX_EDGES} finite, increasing bin edges"),
                    ));
                }
                if n.bins[0] > n.min || n.bins[n.bins.len() - 1] < n.max {
                    return Err(spec_err(
                        "table.numeric.bins",
                        format!("column `{col}`: the bins must cover [min, max]"),
                    ));
                }
            }
            if n.quantiles.len() > MAX_QUANTILES || !n.quantiles.iter().all(|q| (0.0..=1.0).contains(q)) {
                return Err(spec_err(
                    "table.numeric.quantiles",
                    format!("column `{col}`: at most {MAX_QUANTILES} probabilities in [0, 1]"),
                ));
            }
            if !n.quantiles.is_empty() && n.bins.is_empty() {
                return Err(spec_err(
                    "table.numeric.quantiles",
                    format!("column `{col}`: quantiles need `bins`"),
                ));
            }
            width += 4 + bins(n) as u64;
        }
        let elements: u64 = levels.iter().map(|l| l.len() as u64 + 1).product();
        if elements.saturating_mul(width) > MAX_ANSWER_VALUES {
            return Err(spec_err(
                "table",
                format!("cells × statistics exceed {MAX_ANSWER_VALUES} numbers; use fewer levels or bins"),
            ));
        }
        if t.min_cell == 0 || t.min_cell > 1_000_000 {
            return Err(spec_err("table.min_cell", "must be between 1 and 1000000"));
        }
        if t.dominance_n == 0 || t.dominance_n > 10 {
            return Err(spec_err("table.dominance_n", "must be between 1 and 10"));
        }
        if !(t.dominance_k > 0.0 && t.dominance_k <= 100.0) {
            return Err(spec_err("table.dominance_k", "must be a percentage in (0, 100]"));
        }
        Ok((t.by.clone(), levels, t))
    }

    /// Levels per dimension.
    pub fn dims(&self) -> Vec<usize> {
        self.levels.iter().map(Vec::len).collect()
    }

    /// The element at extended index `key` (a dimension's index `dims[i]` is its total).
    pub fn index(&self, key: &[usize]) -> usize {
        let mut idx = 0;
        for (k, l) in key.iter().zip(&self.levels) {
            idx = idx * (l.len() + 1) + k;
        }
        idx
    }

    /// The extended index of element `idx`.
    pub fn key(&self, mut idx: usize) -> Vec<usize> {
        let mut key = vec![0; self.levels.len()];
        for (i, l) in self.levels.iter().enumerate().rev() {
            key[i] = idx % (l.len() + 1);
            idx /= l.len() + 1;
        }
        key
    }

    /// An interior cell and every margin over it (each subset of its dimensions summed out):
    /// the elements one row of that cell counts in.
    pub fn cell_and_margins(&self, idx: usize) -> impl Iterator<Item = usize> + '_ {
        let key = self.key(idx);
        let dims = self.dims();
        (0..1usize << dims.len()).map(move |subset| {
            let mut k = key.clone();
            for (i, d) in dims.iter().enumerate() {
                if subset & (1 << i) != 0 {
                    k[i] = *d;
                }
            }
            self.index(&k)
        })
    }

    /// What a node loads for this table: the split column, the numeric columns, the `by`
    /// columns with their declared levels.
    pub fn frame_request(&self, split_column: &str) -> crate::data::FrameRequest {
        crate::data::FrameRequest {
            split_column: split_column.to_owned(),
            numeric: self.numeric.iter().map(|n| n.column.clone()).collect(),
            categorical: self.by.iter().cloned().zip(self.levels.iter().cloned()).collect(),
        }
    }

    /// The printed key of element `idx`: each `by` column's level, or [`MARGIN`] where it sums.
    pub fn printed_key(&self, idx: usize) -> Vec<String> {
        self.key(idx)
            .iter()
            .zip(&self.levels)
            .map(|(&k, levels)| levels.get(k).cloned().unwrap_or_else(|| MARGIN.to_owned()))
            .collect()
    }

    /// Whether element `idx` sums over at least one dimension.
    pub fn is_margin(&self, idx: usize) -> bool {
        self.key(idx).iter().zip(&self.levels).any(|(k, l)| *k == l.len())
    }

    /// Every line: the elements it sums along one dimension, then the element holding the sum.
    pub fn lines(&self) -> &[Vec<usize>] {
        &self.lines
    }

    fn build_lines(&mut self) {
        let dims = self.dims();
        for axis in 0..dims.len() {
            for start in 0..self.elements {
                let key = self.key(start);
                if key[axis] != 0 {
                    continue;
                }
                let line: Vec<usize> = (0..=dims[axis])
                    .map(|j| {
                        let mut k = key.clone();
                        k[axis] = j;
                        self.index(&k)
                    })
                    .collect();
                let id = self.lines.len();
                for &e in &line {
                    self.member[e].push(id);
                }
                self.lines.push(line);
            }
        }
    }

    /// Offset of numeric column `m`'s block in an element: `Σx, Σx², Σ|x|, (Σ|x|/B)², hist`.
    pub fn numeric_offset(&self, m: usize) -> usize {
        numeric_offset(&self.numeric, m)
    }

    /// Answer length.
    pub fn answer_len(&self) -> usize {
        self.elements * self.width
    }
}

/// Neumaier-compensated running sum: node sums exact enough for 1e-9 relative pooled variances.
#[derive(Debug, Clone, Copy, Default)]
struct Sum {
    s: f64,
    c: f64,
}

impl Sum {
    fn add(&mut self, x: f64) {
        let t = self.s + x;
        if self.s.abs() >= x.abs() {
            self.c += (self.s - t) + x;
        } else {
            self.c += (x - t) + self.s;
        }
        self.s = t;
    }
    fn value(self) -> f64 {
        self.s + self.c
    }
}

#[derive(Debug, Clone, Default)]
struct Acc {
    sum: Sum,
    sq: Sum,
    abs: Sum,
    /// The largest |x| seen, at most `dominance_n` of them, largest first. Stays at the node.
    top: Vec<f64>,
}

/// A node's tabulation of its own rows: every element's count and sums. Never leaves the node
/// as such; [`node_answer`] makes the answer from it.
#[derive(Debug, Clone)]
pub struct Tabulated {
    counts: Vec<u64>,
    /// elements × numeric.
    acc: Vec<Acc>,
    /// elements × total bins.
    hist: Vec<u64>,
    hist_offsets: Vec<usize>,
    hist_len: usize,
}

impl Tabulated {
    /// Rows in each element.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }
}

/// The cell rules a node applies (the stricter of its policy and the form).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CellRules {
    pub min_cell: u64,
    pub dominance_n: usize,
    /// Percent.
    pub dominance_k: f64,
}

/// Tabulate a node's rows: `codes[i][r]` is row r's level index in `by` column i, `values[m][r]`
/// its value of numeric column m, `selected[r]` whether the row is counted (the `rows` split).
/// Values outside the declared bounds are an error naming the column, or clipped if asked.
pub fn tabulate(
    layout: &Layout,
    codes: &[&[u32]],
    values: &[&[f64]],
    selected: &[bool],
    dominance_n: usize,
) -> Result<Tabulated, TableError> {
    let rows = selected.len();
    if codes.len() != layout.levels.len()
        || values.len() != layout.numeric.len()
        || codes.iter().any(|c| c.len() != rows)
        || values.iter().any(|v| v.len() != rows)
    {
        return Err(TableError::Shape("columns do not match the table's layout"));
    }
    let dims = layout.dims();
    let nm = layout.numeric.len();
    let mut hist_offsets = Vec::with_capacity(nm);
    let mut hist_len = 0;
    for n in &layout.numeric {
        hist_offsets.push(hist_len);
        hist_len += bins(n);
    }
    let mut t = Tabulated {
        counts: vec![0; layout.elements],
        acc: vec![Acc::default(); layout.elements * nm],
        hist: vec![0; layout.elements * hist_len],
        hist_offsets,
        hist_len,
    };
    let d = dims.len();
    let mut key = vec![0usize; d];
    let mut x = vec![0f64; nm];
    let mut bin = vec![0usize; nm];
    for r in 0..rows {
        if !selected[r] {
            continue;
        }
        for i in 0..d {
            let c = codes[i][r] as usize;
            if c >= dims[i] {
                return Err(TableError::Shape("a level code is out of range"));
            }
            key[i] = c;
        }
        for (m, n) in layout.numeric.iter().enumerate() {
            let mut v = values[m][r];
            if !v.is_finite() {
                return Err(TableError::NotFinite {
                    column: n.column.clone(),
                });
            }
            if v < n.min || v > n.max {
                if !n.clip {
                    return Err(TableError::OutOfBounds {
                        column: n.column.clone(),
                    });
                }
                v = v.clamp(n.min, n.max);
            }
            x[m] = v;
            if !n.bins.is_empty() {
                let b = n.bins.partition_point(|e| *e <= v);
                bin[m] = b.saturating_sub(1).min(n.bins.len() - 2);
            }
        }
        // The row counts in every element whose key agrees with it or sums over a dimension.
        for mask in 0..(1usize << d) {
            let mut k = key.clone();
            for (i, ki) in k.iter_mut().enumerate() {
                if mask & (1 << i) != 0 {
                    *ki = dims[i];
                }
            }
            let e = layout.index(&k);
            t.counts[e] += 1;
            for m in 0..nm {
                let a = &mut t.acc[e * nm + m];
                let v = x[m];
                a.sum.add(v);
                a.sq.add(v * v);
                a.abs.add(v.abs());
                let pos = a.top.partition_point(|y| *y >= v.abs());
                if pos < dominance_n {
                    a.top.insert(pos, v.abs());
                    a.top.truncate(dominance_n);
                }
                if !layout.numeric[m].bins.is_empty() {
                    t.hist[e * hist_len + t.hist_offsets[m] + bin[m]] += 1;
                }
            }
        }
    }
    Ok(t)
}

/// The L2 sensitivity of a differentially private table answer in its normalised units: a
/// row falls in exactly one interior cell and changes that cell's count by 1 and its sum of
/// numeric column c by at most B_c (the column's larger bound magnitude, values clipped). With
/// every sum divided by its B_c, one row moves the released vector by at most √(1 + m) for m
/// numeric columns. Margins are sums of released cells: post-processing.
pub fn private_sensitivity(layout: &Layout) -> f64 {
    ((1 + layout.numeric.len()) as f64).sqrt()
}

/// The noise on one office's cell in normalised units (count, Σx_c / B_c): one row touches
/// one cell, 1 + m values.
pub fn private_noise(
    layout: &Layout,
    noise_multiplier: f64,
) -> Result<crate::privacy::discrete::GridNoise, TableError> {
    crate::privacy::discrete::GridNoise::new(
        noise_multiplier,
        private_sensitivity(layout),
        1 + layout.numeric.len(),
    )
    .map_err(|_| TableError::Shape("the noise parameters are out of range"))
}

/// Standard deviations of the noise on one office's cell: on the count, and on each numeric
/// column's sum (`σ · √(1 + m) · B_c`, slightly more: [`private_noise`]).
pub fn private_noise_sd(layout: &Layout, noise_multiplier: f64) -> Result<(f64, Vec<f64>), TableError> {
    let sd = private_noise(layout, noise_multiplier)?.sd();
    Ok((sd, layout.numeric.iter().map(|n| sd * bound(n)).collect()))
}

/// A node's answer to a table under the Gaussian mechanism (`[privacy]`): every interior
/// cell's count and numeric sums with noise added ([`private_noise_sd`]; a discrete Gaussian
/// on a fine grid of the normalised values, so no floating-point side channel), the margins the
/// sums of those noisy cells; Σx², Σ|x| and histograms are not released (zeros). No cell is
/// suppressed: a data-dependent suppression would itself release something the noise does not
/// cover. Values must have been clipped into their bounds (`clip = true`, checked by
/// validation).
pub fn private_answer(
    layout: &Layout,
    t: &Tabulated,
    noise_multiplier: f64,
    rng: &mut crate::privacy::discrete::NoiseRng,
) -> Result<Vec<f64>, TableError> {
    let nm = layout.numeric.len();
    let w = layout.width;
    let noise = private_noise(layout, noise_multiplier)?;
    let drawn = |v: f64, rng: &mut crate::privacy::discrete::NoiseRng| {
        noise
            .add(v, rng)
            .map_err(|_| TableError::Shape("a cell's figure is out of the noise's range"))
    };
    let mut out = vec![0.0; layout.answer_len()];
    let mut noisy = vec![0.0; nm];
    for e in (0..layout.elements).filter(|&e| !layout.is_margin(e)) {
        let count = drawn(t.counts[e] as f64, rng)?;
        for (m, v) in noisy.iter_mut().enumerate() {
            let b = bound(&layout.numeric[m]);
            *v = drawn(t.acc[e * nm + m].sum.value() / b, rng)? * b;
        }
        for at in layout.cell_and_margins(e) {
            let at = at * w;
            out[at + 1] += count;
            for (m, v) in noisy.iter().enumerate() {
                out[at + layout.numeric_offset(m)] += v;
            }
        }
    }
    Ok(out)
}

/// The node's answer: primary suppression by its rules, secondary suppression with its margins
/// treated as known, then the encoded vector (suppressed elements all zero but the flag).
/// Also returns how many elements were suppressed, for the node's log.
pub fn node_answer(
    layout: &Layout,
    t: &Tabulated,
    rules: CellRules,
) -> Result<(Vec<f64>, usize), TableError> {
    let nm = layout.numeric.len();
    let mut status: Vec<Option<Suppression>> = vec![None; layout.elements];
    for (e, st) in status.iter_mut().enumerate() {
        let n = t.counts[e];
        if n > 0 && n < rules.min_cell {
            *st = Some(Suppression::MinCell);
            continue;
        }
        let dominated = (0..nm).any(|m| {
            let a = &t.acc[e * nm + m];
            let total = a.abs.value();
            let top: f64 = a.top.iter().take(rules.dominance_n).sum();
            total > 0.0 && top > rules.dominance_k / 100.0 * total
        });
        if dominated {
            *st = Some(Suppression::Dominance);
        }
    }
    protect(layout, &t.counts, &mut status, true, rules.min_cell)?;
    let mut out = vec![0f64; layout.answer_len()];
    for (e, st) in status.iter().enumerate() {
        let base = e * layout.width;
        if st.is_some() {
            out[base] = 1.0;
            continue;
        }
        out[base + 1] = t.counts[e] as f64;
        for (m, n) in layout.numeric.iter().enumerate() {
            let o = base + layout.numeric_offset(m);
            let a = &t.acc[e * nm + m];
            out[o] = a.sum.value();
            out[o + 1] = a.sq.value();
            out[o + 2] = a.abs.value();
            out[o + 3] = (a.abs.value() / bound(n)).powi(2);
            let h = e * t.hist_len + t.hist_offsets[m];
            for b in 0..bins(n) {
                out[o + 4 + b] = t.hist[h + b] as f64;
            }
        }
    }
    let suppressed = status.iter().filter(|s| s.is_some()).count();
    Ok((out, suppressed))
}

/// Whether a pooled element's sums fail the (n, k) rule with the offices as contributors. Nodes
/// send `Σ|x|` (A_j) and `(A_j / B)²`; the pooled sums give T = Σ A_j and Q = Σ (A_j / B)².
/// By Cauchy–Schwarz the n largest A_j sum to at most `B √(n Q)`, so the element is refused when
/// that bound exceeds k% of T: conservative, and a sum, so it needs no office's share on its own.
/// (The person-level rule needs no pooled check: every node enforced it on its share, and the n
/// largest people of a pooled cell contribute at most the sum of each node's n largest.)
pub fn dominated_pooled(total_abs: f64, sum_sq_scaled: f64, bound: f64, n: u32, k: f64) -> bool {
    total_abs > 0.0 && bound * (f64::from(n) * sum_sq_scaled.max(0.0)).sqrt() > k / 100.0 * total_abs
}

/// Secondary suppression to a fixed point. `status[e]` is set for primary-suppressed elements;
/// cells suppressed here are marked [`Suppression::Secondary`]. `size` orders candidates
/// (smallest non-empty first). With `margins_known` (a node's own table) margins are neither
/// unknowns nor candidates.
pub fn protect(
    layout: &Layout,
    size: &[u64],
    status: &mut [Option<Suppression>],
    margins_known: bool,
    min_cell: u64,
) -> Result<(), TableError> {
    let margin: Vec<bool> = (0..layout.elements).map(|e| layout.is_margin(e)).collect();
    let fixed = |e: usize| margins_known && margin[e];
    let rank = |e: usize| (size[e] == 0, size[e], e);
    loop {
        let mut changed = false;
        // The line rules: no line with exactly one unknown, and where the line's total is
        // published, the unknowns it sums hold no rows or at least `min_cell` together (their
        // sum is the total less the published parts: a group of its own).
        for line in &layout.lines {
            let unknown = line.iter().filter(|&&e| status[e].is_some() && !fixed(e)).count();
            let (total, parts) = line.split_last().ok_or(TableError::Shape("an empty line"))?;
            let total_known = status[*total].is_none() || fixed(*total);
            let group: u64 = parts
                .iter()
                .filter(|&&e| status[e].is_some() && !fixed(e))
                .map(|&e| size[e])
                .sum();
            let small_group = total_known && group > 0 && group < min_cell;
            if unknown == 1 || (unknown > 1 && small_group) {
                let pick = line
                    .iter()
                    .copied()
                    .filter(|&e| status[e].is_none() && !fixed(e))
                    .min_by_key(|&e| rank(e))
                    .ok_or(TableError::Unprotectable)?;
                status[pick] = Some(Suppression::Secondary);
                changed = true;
            }
        }
        if changed {
            continue;
        }
        // The exact check: no unknown determined by the line equations.
        let unknowns: Vec<usize> = (0..layout.elements)
            .filter(|&e| status[e].is_some() && !fixed(e))
            .collect();
        for s in determined(layout, &unknowns)? {
            // A candidate on the determined element's own lines; failing that (its lines are
            // all suppressed, and it follows through others), on any line with an unknown.
            let candidate = |elements: &mut dyn Iterator<Item = usize>| {
                elements
                    .filter(|&e| status[e].is_none() && !fixed(e))
                    .min_by_key(|&e| rank(e))
            };
            let own = candidate(
                &mut layout.member[s]
                    .iter()
                    .flat_map(|&l| layout.lines[l].iter().copied()),
            );
            let pick = own
                .or_else(|| {
                    candidate(
                        &mut unknowns
                            .iter()
                            .flat_map(|&u| layout.member[u].iter())
                            .flat_map(|&l| layout.lines[l].iter().copied()),
                    )
                })
                .ok_or(TableError::Unprotectable)?;
            if status[pick].is_none() {
                status[pick] = Some(Suppression::Secondary);
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
    }
}

const P: u64 = (1 << 61) - 1;

fn mulmod(a: u64, b: u64) -> u64 {
    ((u128::from(a) * u128::from(b)) % u128::from(P)) as u64
}

fn inverse(a: u64) -> u64 {
    let (mut base, mut exp, mut acc) = (a, P - 2, 1u64);
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mulmod(acc, base);
        }
        base = mulmod(base, base);
        exp >>= 1;
    }
    acc
}

/// The unknowns whose value follows from the line equations (their unit vector lies in the
/// row space of the equations restricted to the unknowns), found per connected component.
fn determined(layout: &Layout, unknowns: &[usize]) -> Result<Vec<usize>, TableError> {
    let mut col = vec![usize::MAX; layout.elements];
    for (i, &e) in unknowns.iter().enumerate() {
        col[e] = i;
    }
    // Union-find over unknowns sharing a line.
    let mut parent: Vec<usize> = (0..unknowns.len()).collect();
    fn find(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    let mut rows_of: Vec<usize> = Vec::new();
    for (l, line) in layout.lines.iter().enumerate() {
        let cols: Vec<usize> = line
            .iter()
            .map(|&e| col[e])
            .filter(|&c| c != usize::MAX)
            .collect();
        if let Some(&first) = cols.first() {
            rows_of.push(l);
            for &c in &cols[1..] {
                let (a, b) = (find(&mut parent, first), find(&mut parent, c));
                parent[a] = b;
            }
        }
    }
    let mut comps: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for c in 0..unknowns.len() {
        let root = find(&mut parent, c);
        comps.entry(root).or_default().push(c);
    }
    let mut out = Vec::new();
    for members in comps.values() {
        if members.len() > MAX_COMPONENT {
            return Err(TableError::Unprotectable);
        }
        let local: std::collections::HashMap<usize, usize> =
            members.iter().enumerate().map(|(i, &c)| (c, i)).collect();
        let mut rows: Vec<Vec<u64>> = Vec::new();
        for &l in &rows_of {
            let line = &layout.lines[l];
            let total = line[line.len() - 1];
            let mut row = vec![0u64; members.len()];
            let mut any = false;
            for &e in line {
                if let Some(&j) = local.get(&col[e]) {
                    row[j] = if e == total { P - 1 } else { 1 };
                    any = true;
                }
            }
            if any {
                rows.push(row);
            }
        }
        for j in reduce(&mut rows, members.len()) {
            out.push(unknowns[members[j]]);
        }
    }
    Ok(out)
}

/// Gauss–Jordan over GF(P); returns the columns whose unit vector is a row of the result.
fn reduce(rows: &mut [Vec<u64>], n: usize) -> Vec<usize> {
    let mut r = 0;
    let mut pivots = Vec::new();
    for c in 0..n {
        let Some(p) = (r..rows.len()).find(|&i| rows[i][c] != 0) else {
            continue;
        };
        rows.swap(r, p);
        let inv = inverse(rows[r][c]);
        for v in rows[r].iter_mut() {
            *v = mulmod(*v, inv);
        }
        let pivot = rows[r].clone();
        for (i, row) in rows.iter_mut().enumerate() {
            if i != r && row[c] != 0 {
                let f = row[c];
                for (v, pv) in row.iter_mut().zip(&pivot) {
                    if *pv != 0 {
                        *v = (*v + P - mulmod(f, *pv)) % P;
                    }
                }
            }
        }
        pivots.push((r, c));
        r += 1;
        if r == rows.len() {
            break;
        }
    }
    pivots
        .into_iter()
        .filter(|&(r, c)| rows[r].iter().enumerate().all(|(j, v)| j == c || *v == 0))
        .map(|(_, c)| c)
        .collect()
}

/// A grouped-data quantile: the bin holding the `q·n`-th value, and linear interpolation inside
/// it (`L + (q·n − F) / f × h`). Approximate to the bin's width. `None` for no rows.
pub fn quantile(edges: &[f64], hist: &[f64], q: f64) -> Option<f64> {
    let n: f64 = hist.iter().sum();
    if n <= 0.0 {
        return None;
    }
    let target = q * n;
    let mut cum = 0.0;
    for (i, &h) in hist.iter().enumerate() {
        if h > 0.0 && cum + h >= target {
            let w = edges[i + 1] - edges[i];
            return Some(edges[i] + ((target - cum) / h).clamp(0.0, 1.0) * w);
        }
        cum += h;
    }
    edges.last().copied()
}

#[cfg(test)]
mod tests;
