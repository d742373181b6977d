//! Federated tables (`model = "table"`): one [`Phase::Table`] step. Every node answers its own
//! table with margins, small and dominated cells suppressed and protected by its own rules
//! ([`crate::tabulate::node_answer`]); the exact sum is the pooled table, on which the
//! coordinator applies the form's rules again and protects the result with margins
//! ([`pool`]). Layout and rules live in [`crate::tabulate`].
//!
//! A pooled element is suppressed when any node suppressed its share (`node`), when its pooled
//! count is between 1 and `min_cell - 1` (`primary:min_cell`), or when a numeric column fails
//! the (n, k) rule with the offices as contributors (`primary:dominance`, a conservative
//! bound from sums: [`crate::tabulate::dominated_pooled`]); then secondary suppression with
//! margins as cells (`secondary`). Suppressed cells carry no value, zero included.

use std::sync::Arc;
use std::time::Instant;

use fedstat_proto::output::Output;
use fedstat_proto::table::{Suppression, TableCell, TableOutput, TableSpec};
use fedstat_proto::wire::{DType, Phase, RoundRecord};

use crate::aggregate::{AggregatorKind, Pooled, Values};
use crate::spec::ExperimentSpec;
use crate::sums::Standardization;
use crate::tabulate::{bound, dominated_pooled, protect, quantile, Layout};

use super::{Algorithm, Answer, AnswerShape, Checkpoint, Progress, Report, Step};

/// Counts are whole numbers below 2^53.
fn count(x: f64) -> Option<u64> {
    (x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53)).then_some(x as u64)
}

/// Agreement of two sums of one node's floats, with room for rounding.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// One node's answer: flags 0 or 1 (a suppressed element all zeros), whole non-negative
/// counts, sums inside the declared bounds, `Σx² ≥ (Σx)²/n`, `Σ|x| ≥ |Σx|`, histograms summing
/// to the count, and every line whose elements are all published adding up to its total.
/// The reason names the rule, never a value.
pub fn check(layout: &Layout, v: &[f64]) -> Result<(), String> {
    if v.len() != layout.answer_len() {
        return Err("table: wrong number of values".to_owned());
    }
    let w = layout.width;
    let mut counts = vec![0u64; layout.elements];
    let mut flagged = vec![false; layout.elements];
    for e in 0..layout.elements {
        let el = &v[e * w..(e + 1) * w];
        match el[0] {
            0.0 => {}
            1.0 => {
                if el[1..].iter().any(|x| *x != 0.0) {
                    return Err("table: a suppressed cell carries values".to_owned());
                }
                flagged[e] = true;
                continue;
            }
            _ => return Err("table: a suppression flag is not 0 or 1".to_owned()),
        }
        let n = count(el[1]).ok_or("table: a count is not a whole, non-negative number")?;
        counts[e] = n;
        let nf = n as f64;
        for (m, num) in layout.numeric.iter().enumerate() {
            let o = layout.numeric_offset(m);
            let (s, sq, abs, scaled) = (el[o], el[o + 1], el[o + 2], el[o + 3]);
            let col = &num.column;
            let b = bound(num);
            let slack = 1e-9 * (nf * b).max(1.0);
            if s < nf * num.min - slack || s > nf * num.max + slack {
                return Err(format!("table: a sum of `{col}` is outside its declared bounds"));
            }
            if abs < s.abs() - slack || abs > nf * b + slack {
                return Err(format!("table: a sum of |`{col}`| is inconsistent"));
            }
            let least_sq = if n == 0 { 0.0 } else { s * s / nf };
            if sq < least_sq - 1e-9 * sq.abs().max(least_sq).max(1.0) || sq > nf * b * b * (1.0 + 1e-9) + 1e-9
            {
                return Err(format!("table: a sum of squares of `{col}` is inconsistent"));
            }
            if !close(scaled, (abs / b).powi(2)) {
                return Err(format!("table: the dominance figure of `{col}` is inconsistent"));
            }
            let hist = &el[o + 4..o + 4 + num.bins.len().saturating_sub(1)];
            if !hist.is_empty() {
                let mut total = 0u64;
                for h in hist {
                    total += count(*h).ok_or("table: a histogram count is not a whole number")?;
                }
                if total != n {
                    return Err(format!(
                        "table: the histogram of `{col}` does not add up to the count"
                    ));
                }
            }
        }
    }
    for line in layout.lines() {
        if line.iter().any(|&e| flagged[e]) {
            continue;
        }
        let (total, parts) = line.split_last().ok_or("table: an empty line")?;
        if parts.iter().map(|&e| counts[e]).sum::<u64>() != counts[*total] {
            return Err("table: the margins do not add up".to_owned());
        }
    }
    Ok(())
}

/// The statistics of every cell, in order.
pub fn stat_names(layout: &Layout) -> Vec<String> {
    let mut names = vec!["count".to_owned()];
    for n in &layout.numeric {
        let c = &n.column;
        names.extend([format!("{c}_sum"), format!("{c}_mean"), format!("{c}_var")]);
        names.extend(n.quantiles.iter().map(|q| format!("{c}_q{q}")));
    }
    names
}

/// The published table from the exact sum of the answers.
pub fn pool(spec: &ExperimentSpec, layout: &Layout, pooled: &[f64]) -> Result<TableOutput, String> {
    let t = spec.table.as_ref().ok_or("the experiment has no table")?;
    if pooled.len() != layout.answer_len() {
        return Err("pooled table has the wrong length".to_owned());
    }
    let w = layout.width;
    let el = |e: usize| &pooled[e * w..(e + 1) * w];
    let mut counts = vec![0u64; layout.elements];
    let mut status: Vec<Option<Suppression>> = vec![None; layout.elements];
    for (e, st) in status.iter_mut().enumerate() {
        let x = el(e);
        if x[0] > 0.0 {
            *st = Some(Suppression::Node);
            continue;
        }
        let n = count(x[1]).ok_or("a pooled count is not a whole number")?;
        counts[e] = n;
        if n > 0 && n < t.min_cell {
            *st = Some(Suppression::MinCell);
            continue;
        }
        let dominated = layout.numeric.iter().enumerate().any(|(m, num)| {
            let o = layout.numeric_offset(m);
            dominated_pooled(x[o + 2], x[o + 3], bound(num), t.dominance_n, t.dominance_k)
        });
        if dominated {
            *st = Some(Suppression::Dominance);
        }
    }
    protect(layout, &counts, &mut status, false, t.min_cell).map_err(|e| e.to_string())?;

    let mut cells = Vec::with_capacity(layout.elements);
    let stats = stat_names(layout);
    for (e, st) in status.iter().enumerate() {
        let key = layout.printed_key(e);
        let values = if st.is_some() {
            vec![None; stats.len()]
        } else {
            let x = el(e);
            let n = counts[e] as f64;
            let mut values = vec![Some(n)];
            for (m, num) in layout.numeric.iter().enumerate() {
                let o = layout.numeric_offset(m);
                let (s, sq) = (x[o], x[o + 1]);
                let mean = (n > 0.0).then(|| s / n);
                let var = (n > 1.0).then(|| ((sq - s * s / n) / (n - 1.0)).max(0.0));
                values.extend([Some(s), mean, var]);
                let hist = &x[o + 4..o + 4 + num.bins.len().saturating_sub(1)];
                values.extend(num.quantiles.iter().map(|&q| quantile(&num.bins, hist, q)));
            }
            values
        };
        cells.push(TableCell {
            key,
            margin: layout.is_margin(e),
            suppressed: *st,
            values,
        });
    }
    let notes = vec![
        format!("rows: {} rows of every participating office", t.rows.as_str()),
        "var: sample variance (divisor n - 1); mean and var are empty for too few rows".to_owned(),
        "quantiles: grouped-data interpolation inside the declared histogram bin (L + (q n - F) / f × width); approximate to the bin width".to_owned(),
        format!(
            "suppression: primary:min_cell (pooled count 1 to {}), primary:dominance ({} largest offices over {}% of a cell's Σ|x|, conservative bound), node (an office suppressed its share), secondary (protects the others; margins are cells)",
            t.min_cell - 1,
            t.dominance_n,
            t.dominance_k
        ),
    ];
    Ok(output(layout, t, stats, cells, notes))
}

/// The published table: the `by` columns and `stats` as its header.
fn output(
    layout: &Layout,
    t: &TableSpec,
    stats: Vec<String>,
    cells: Vec<TableCell>,
    notes: Vec<String>,
) -> TableOutput {
    let mut header = layout.by.clone();
    header.extend(stats.iter().cloned());
    TableOutput {
        header,
        by: layout.by.clone(),
        stats,
        rows: t.rows.as_str().to_owned(),
        cells,
        notes,
    }
}

/// Largest magnitude of a noisy count or sum in a private answer (below the 2^62 every sum
/// accepts): far beyond any table a node may hold plus its noise.
const MAX_PRIVATE_VALUE: f64 = 1e18;

/// One node's answer under the Gaussian mechanism ([`crate::tabulate::private_answer`]):
/// flags 0, finite counts and sums of a plausible size, nothing in the fields it does not
/// release. Its margins are not checked: the pooled margins are recomputed from the cells.
pub fn check_private(layout: &Layout, v: &[f64]) -> Result<(), String> {
    if v.len() != layout.answer_len() {
        return Err("table: wrong number of values".to_owned());
    }
    let w = layout.width;
    let released: Vec<usize> = std::iter::once(1)
        .chain((0..layout.numeric.len()).map(|m| layout.numeric_offset(m)))
        .collect();
    for el in v.chunks_exact(w) {
        for (i, x) in el.iter().enumerate() {
            if released.contains(&i) {
                if !(x.is_finite() && x.abs() <= MAX_PRIVATE_VALUE) {
                    return Err(
                        "table: a noisy count or sum is not a finite number of a plausible size".to_owned(),
                    );
                }
            } else if *x != 0.0 {
                return Err(
                    "table: a differentially private answer carries a figure it does not release".to_owned(),
                );
            }
        }
    }
    Ok(())
}

/// The statistics of every cell of a private table, in order.
pub fn private_stat_names(layout: &Layout) -> Vec<String> {
    let mut names = vec!["count".to_owned()];
    for n in &layout.numeric {
        let c = &n.column;
        names.extend([format!("{c}_sum"), format!("{c}_mean")]);
    }
    names
}

/// The published table under the Gaussian mechanism, from the sum of `offices`' noisy
/// answers: every interior cell's noisy count (rounded, at least 0) and sums, margins summed
/// from the noisy interior cells (so the table adds up), means as noisy sum over noisy count.
/// No cell is suppressed; the notes give the noise of every figure.
pub fn pool_private(
    spec: &ExperimentSpec,
    layout: &Layout,
    pooled: &[f64],
    offices: usize,
) -> Result<TableOutput, String> {
    let t = spec.table.as_ref().ok_or("the experiment has no table")?;
    let sigma = spec
        .privacy
        .as_ref()
        .ok_or("the experiment has no [privacy] table")?
        .noise_multiplier;
    if pooled.len() != layout.answer_len() {
        return Err("pooled table has the wrong length".to_owned());
    }
    let w = layout.width;
    let nm = layout.numeric.len();
    // Per element: count, then each numeric sum; margins from the interior cells.
    let mut figures = vec![0.0; layout.elements * (1 + nm)];
    for e in (0..layout.elements).filter(|&e| !layout.is_margin(e)) {
        let el = &pooled[e * w..(e + 1) * w];
        for at in layout.cell_and_margins(e) {
            let at = at * (1 + nm);
            figures[at] += el[1];
            for m in 0..nm {
                figures[at + 1 + m] += el[layout.numeric_offset(m)];
            }
        }
    }
    let mut cells = Vec::with_capacity(layout.elements);
    for e in 0..layout.elements {
        let key = layout.printed_key(e);
        let f = &figures[e * (1 + nm)..(e + 1) * (1 + nm)];
        let n = f[0];
        let mut values = vec![Some(n.round().max(0.0))];
        for s in &f[1..] {
            values.extend([Some(*s), (n >= 1.0).then(|| s / n)]);
        }
        cells.push(TableCell {
            key,
            margin: layout.is_margin(e),
            suppressed: None,
            values,
        });
    }
    let (sd_count, sd_sums) = crate::tabulate::private_noise_sd(layout, sigma).map_err(|e| e.to_string())?;
    let pooled_sd = (offices.max(1) as f64).sqrt();
    let mut noise = format!(
        "differential privacy (Gaussian mechanism, noise multiplier {sigma}): each office added noise to each of its cells; in a pooled cell of {offices} office(s) the count has noise of standard deviation {:.3}",
        sd_count * pooled_sd
    );
    for (num, sd) in layout.numeric.iter().zip(&sd_sums) {
        noise.push_str(&format!(", the sum of `{}` {:.6e}", num.column, sd * pooled_sd));
    }
    noise.push_str("; a margin over k cells has √k times that");
    let notes = vec![
        format!("rows: {} rows of every participating office", t.rows.as_str()),
        noise,
        "counts: noisy, rounded to whole numbers, at least 0; margins are sums of the noisy cells, so the table adds up".to_owned(),
        "means: noisy sum / noisy count, empty where the noisy count is below 1; unreliable for small cells".to_owned(),
        "suppression: none; differential privacy protects every cell (a suppression decided on the true counts would itself disclose)".to_owned(),
    ];
    Ok(output(layout, t, private_stat_names(layout), cells, notes))
}

/// The table algorithm: one step, then done.
#[derive(Debug)]
pub struct Table {
    spec: ExperimentSpec,
    layout: Option<Layout>,
    output: Option<Output>,
    history: Vec<RoundRecord>,
    model: Arc<Values>,
}

impl Table {
    pub fn new(spec: &ExperimentSpec, checkpoint: Checkpoint) -> Self {
        Table {
            spec: spec.clone(),
            layout: Layout::new(spec).ok(),
            output: checkpoint.output,
            history: checkpoint.history,
            model: Arc::new(Values::F64(Vec::new())),
        }
    }
}

impl Algorithm for Table {
    fn next_step(&mut self, _now: Instant) -> Option<Step> {
        if self.output.is_some() {
            return None;
        }
        let layout = self.layout.as_ref()?;
        Some(Step {
            phase: Phase::Table,
            round: 1,
            model: None,
            standardization: None,
            answer: AnswerShape {
                dtype: DType::F64,
                len: layout.answer_len() as u64,
                aux: 0,
                weighted: false,
            },
            aggregator: AggregatorKind::of_phase(Phase::Table),
        })
    }

    fn check_answer(&self, step: &Step, answer: Answer<'_>) -> Result<(), String> {
        let layout = self.layout.as_ref().ok_or("the table form is invalid")?;
        match (step.phase, answer.values) {
            (Phase::Table, Values::F64(v)) if self.spec.privacy.is_some() => check_private(layout, v),
            (Phase::Table, Values::F64(v)) => check(layout, v),
            (Phase::Table, _) => Err("table: answers are float64".to_owned()),
            _ => Err("a table asks for no such answer".to_owned()),
        }
    }

    fn finish_step(
        &mut self,
        _now: Instant,
        step: &Step,
        pooled: Pooled,
        participants: Vec<String>,
        retries: u32,
    ) -> Result<Report, String> {
        if step.phase != Phase::Table {
            return Err(format!("a table asked for {}", step.phase));
        }
        let layout = self.layout.as_ref().ok_or("the table form is invalid")?;
        let values = pooled.values.to_f64();
        let out = if self.spec.privacy.is_some() {
            pool_private(&self.spec, layout, &values, pooled.answers)
        } else {
            pool(&self.spec, layout, &values)
        }
        .map_err(|e| format!("table: {e}"))?;
        let suppressed = out.cells.iter().filter(|c| c.suppressed.is_some()).count();
        // The grand total, when published, is the round's row count; otherwise 0.
        let rows = out
            .cells
            .last()
            .and_then(|c| c.values.first().copied().flatten())
            .unwrap_or(0.0) as u64;
        let record = RoundRecord {
            round: step.round,
            participants,
            total_examples: rows,
            train_loss: f64::NAN,
            metrics: None,
            train_ms: 0,
            round_ms: 0,
            retries,
        };
        let mut report = Report::default();
        report.events.push(format!(
            "table pooled from {} node(s): {} of {} cells and margins suppressed",
            pooled.answers,
            suppressed,
            out.cells.len()
        ));
        let output = Output::Table(Box::new(out));
        report.progress.push(Progress::Output(output.clone()));
        report.progress.push(Progress::RoundCompleted {
            record: record.clone(),
            model: self.model.clone(),
        });
        self.history.push(record);
        self.output = Some(output);
        Ok(report)
    }

    fn history(&self) -> &[RoundRecord] {
        &self.history
    }

    fn model(&self) -> &Arc<Values> {
        &self.model
    }

    fn standardization(&self) -> Option<&Standardization> {
        None
    }

    fn output(&self) -> Option<&Output> {
        self.output.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tabulate::{node_answer, tabulate, CellRules};

    fn spec() -> ExperimentSpec {
        let spec: ExperimentSpec = toml::from_str(
            r#"
name = "t"
dataset = "d"
model = "table"
[schema]
target = { column = "wage" }
categorical = [
  { column = "a", levels = ["x", "y", "z"], reference = "x" },
  { column = "b", levels = ["p", "q"], reference = "p" },
]
[table]
by = ["a", "b"]
min_cell = 3
dominance_n = 1
numeric = [{ column = "wage", min = 0, max = 100, bins = [0, 50, 100], quantiles = [0.5] }]
"#,
        )
        .expect("spec");
        crate::spec::validate(&spec).expect("valid");
        spec
    }

    /// Two offices' answers summed: a cell one office suppressed is marked `node`, and the
    /// pooled table protects it; published means and variances are the pooled ones.
    #[test]
    fn pooled_tables_mark_node_suppressions_and_protect_them() {
        let spec = spec();
        let layout = Layout::new(&spec).expect("layout");
        let rules = CellRules {
            min_cell: 3,
            dominance_n: 2,
            dominance_k: 100.0,
        };
        let office = |a: &[u32], b: &[u32], x: &[f64]| {
            let sel = vec![true; a.len()];
            let t = tabulate(&layout, &[a, b], &[x], &sel, 2).expect("tabulate");
            let (v, _) = node_answer(&layout, &t, rules).expect("answer");
            check(&layout, &v).expect("valid");
            v
        };
        // Office 1: 4 rows in every cell. Office 2: the same, but one row in (z, q).
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut x = Vec::new();
        for i in 0..3u32 {
            for j in 0..2u32 {
                for k in 0..4 {
                    a.push(i);
                    b.push(j);
                    x.push(f64::from(10 * i + j) + f64::from(k));
                }
            }
        }
        let v1 = office(&a, &b, &x);
        let keep: Vec<usize> = (0..a.len())
            .filter(|&r| !(a[r] == 2 && b[r] == 1) || x[r] == 21.0)
            .collect();
        let pick = |v: &[u32]| keep.iter().map(|&r| v[r]).collect::<Vec<_>>();
        let v2 = office(
            &pick(&a),
            &pick(&b),
            &keep.iter().map(|&r| x[r]).collect::<Vec<_>>(),
        );
        let sum: Vec<f64> = v1.iter().zip(&v2).map(|(p, q)| p + q).collect();
        let out = pool(&spec, &layout, &sum).expect("pool");
        let cell = |k: [&str; 2]| out.cells.iter().find(|c| c.key == k).expect("cell");
        assert_eq!(cell(["z", "q"]).suppressed, Some(Suppression::Node));
        let suppressed: Vec<_> = out.cells.iter().filter(|c| c.suppressed.is_some()).collect();
        assert!(suppressed.len() >= 4, "{suppressed:?}");
        for c in &suppressed {
            assert!(c.values.iter().all(Option::is_none));
        }
        // Published interior cells: 8 rows, values v..v+3 twice: mean v + 1.5, variance 8/7 · 1.25.
        let published: Vec<_> = out
            .cells
            .iter()
            .filter(|c| !c.margin && c.suppressed.is_none())
            .collect();
        assert!(!published.is_empty());
        for c in published {
            let i = ["x", "y", "z"]
                .iter()
                .position(|l| *l == c.key[0])
                .expect("level") as f64;
            let j = ["p", "q"].iter().position(|l| *l == c.key[1]).expect("level") as f64;
            assert_eq!(c.values[0], Some(8.0));
            assert_eq!(c.values[2], Some(10.0 * i + j + 1.5));
            assert!((c.values[3].expect("var") - 1.25 * 8.0 / 7.0).abs() < 1e-12);
        }
        assert_eq!(
            out.header,
            [
                "a",
                "b",
                "count",
                "wage_sum",
                "wage_mean",
                "wage_var",
                "wage_q0.5"
            ]
        );
    }

    #[test]
    fn answers_breaking_a_rule_are_refused_by_name() {
        let spec = spec();
        let layout = Layout::new(&spec).expect("layout");
        let good = vec![0.0; layout.answer_len()];
        assert!(check(&layout, &good).is_ok());
        let w = layout.width;
        let cases: Vec<(usize, f64, &str)> =
            vec![(0, 0.5, "flag"), (1, 2.5, "count"), (w + 1, 3.0, "margins")];
        for (i, value, rule) in cases {
            let mut v = good.clone();
            v[i] = value;
            if rule == "margins" {
                v[w + layout.numeric_offset(0) + 4] = 3.0;
            }
            let err = check(&layout, &v).expect_err(rule);
            assert!(err.contains(rule), "{err}");
        }
        let mut v = good.clone();
        v[0] = 1.0;
        v[1] = 4.0;
        assert!(check(&layout, &v)
            .expect_err("values")
            .contains("suppressed cell carries"));
    }

    /// The same form under `[privacy]`: clipped wage, no histogram.
    fn private_spec() -> ExperimentSpec {
        let mut spec = spec();
        let table = spec.table.as_mut().expect("table");
        table.numeric[0].bins.clear();
        table.numeric[0].quantiles.clear();
        table.numeric[0].clip = true;
        spec.privacy = Some(toml::from_str("noise_multiplier = 2.0\ndelta = 1e-5").expect("privacy"));
        crate::spec::validate(&spec).expect("valid");
        spec
    }

    /// Under the Gaussian mechanism the table is validated for what it releases, answers carry
    /// noisy counts and sums only, and the pooled table's margins add up and nothing is
    /// suppressed.
    #[test]
    fn private_tables_release_noisy_cells_whose_margins_add_up() {
        let spec = private_spec();
        // What validation refuses under [privacy], by key.
        let refused = |edit: &dyn Fn(&mut ExperimentSpec), key: &str| {
            let mut s = spec.clone();
            edit(&mut s);
            let err = crate::spec::validate(&s).expect_err(key).to_string();
            assert!(err.contains(key), "{err}");
        };
        refused(
            &|s| s.table.as_mut().expect("t").numeric[0].clip = false,
            "clip = true",
        );
        refused(
            &|s| s.table.as_mut().expect("t").numeric[0].bins = vec![0.0, 100.0],
            "histograms and quantiles",
        );
        refused(
            &|s| s.privacy.as_mut().expect("p").sampling_rate = Some(0.1),
            "clip_norm and sampling_rate",
        );

        let layout = Layout::new(&spec).expect("layout");
        let a = [0u32, 0, 1, 2, 2, 2];
        let b = [0u32, 1, 1, 0, 0, 1];
        let wage = [10.0, 20.0, 500.0, 40.0, 50.0, 60.0];
        let t = tabulate(&layout, &[&a, &b], &[&wage], &[true; 6], 1).expect("tabulate");
        let mut rng = <crate::privacy::discrete::NoiseRng as rand_010::SeedableRng>::seed_from_u64(9);
        let answer = crate::tabulate::private_answer(&layout, &t, 2.0, &mut rng).expect("answer");
        check_private(&layout, &answer).expect("well formed");
        // Nothing but counts and sums; every value noisy (no exact count survives).
        let w = layout.width;
        let o = layout.numeric_offset(0);
        for (e, el) in answer.chunks_exact(w).enumerate() {
            assert_eq!(el[0], 0.0);
            assert_ne!(el[1], t.counts()[e] as f64);
            assert!(el[o + 1..].iter().all(|x| *x == 0.0));
        }
        // A node's answer that carries a sum of squares, or a non-finite count, is refused.
        let mut bad = answer.clone();
        bad[o + 1] = 3.0;
        assert!(check_private(&layout, &bad)
            .expect_err("sq")
            .contains("does not release"));
        let mut bad = answer.clone();
        bad[1] = f64::NAN;
        assert!(check_private(&layout, &bad).expect_err("nan").contains("finite"));

        let out = pool_private(&spec, &layout, &answer, 1).expect("pool");
        assert!(out.cells.iter().all(|c| c.suppressed.is_none()));
        assert_eq!(out.stats, vec!["count", "wage_sum", "wage_mean"]);
        // The grand total's sum is the sum of the interior cells' sums (the wage clipped at 100).
        let total = out.cells.last().expect("total");
        let interior: f64 = out
            .cells
            .iter()
            .filter(|c| !c.margin)
            .map(|c| c.values[1].expect("sum"))
            .sum();
        let grand = total.values[1].expect("sum");
        assert!(
            (grand - interior).abs() < 1e-6 * grand.abs().max(1.0),
            "{grand} vs {interior}"
        );
        assert!(out.notes.iter().any(|n| n.contains("differential privacy")));
    }
}
