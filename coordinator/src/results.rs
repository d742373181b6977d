//! What a researcher takes home: `model.json` (named coefficients in original units),
//! `metrics.csv` (one row per round) and `parameters.bin` (the raw parameters), plus the
//! human-readable lines `status` and `watch` print.

use std::fmt::Write as _;
use std::path::Path;

use fedstat_core::files::{atomic_write, Access};
use fedstat_core::model::{unstandardize, Metrics};
use fedstat_proto::design::Response;
use fedstat_proto::output::{GlmSummary, Output, TestStatistic};
use fedstat_proto::privacy::PrivacyView;
use fedstat_proto::table::{TableCell, TableOutput};
use fedstat_proto::wire::{DType, ExperimentStatus, NodeInfo, ResultsHeader, RoundRecord};
use serde_json::json;

use crate::{Error, Result};

/// Write the three result files into `dir` (created if needed). Returns the file names.
pub fn write(dir: &Path, header: &ResultsHeader, params: &[f64]) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    let model = model_json(header, params);
    let text = serde_json::to_string_pretty(&model).map_err(|e| Error::Protocol(e.to_string()))?;
    atomic_write(&dir.join("model.json"), text.as_bytes(), Access::OwnerOnly)?;
    atomic_write(
        &dir.join("metrics.csv"),
        metrics_csv(&header.status.history).as_bytes(),
        Access::OwnerOnly,
    )?;
    let bytes: Vec<u8> = match header.tensor.dtype {
        DType::F64 => params.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F32 => params.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect(),
    };
    // Through unpredictable `O_EXCL` temporaries: a shared `--out` folder may hold planted symlinks.
    atomic_write(&dir.join("parameters.bin"), &bytes, Access::OwnerOnly)?;
    let mut files: Vec<String> = vec!["model.json".into(), "metrics.csv".into(), "parameters.bin".into()];
    if let Some(Output::Glm(g)) = &header.output {
        atomic_write(
            &dir.join("coefficients.csv"),
            coefficients_csv(&header.columns, g).as_bytes(),
            Access::OwnerOnly,
        )?;
        files.push("coefficients.csv".into());
    }
    if let Some(Output::Table(table)) = &header.output {
        atomic_write(
            &dir.join("table.csv"),
            table_csv(table).as_bytes(),
            Access::OwnerOnly,
        )?;
        let text = serde_json::to_string_pretty(table).map_err(|e| Error::Protocol(e.to_string()))?;
        atomic_write(&dir.join("table.json"), text.as_bytes(), Access::OwnerOnly)?;
        files.extend(["table.csv".into(), "table.json".into()]);
    }
    Ok(files)
}

/// The name R gives a coefficient: `(Intercept)` for the constant.
fn r_name(column: &str) -> &str {
    if column == "const" {
        "(Intercept)"
    } else {
        column
    }
}

fn stat_name(g: &GlmSummary) -> &'static str {
    match g.statistic {
        TestStatistic::Z => "z",
        TestStatistic::T => "t",
    }
}

/// `coefficients.csv`: one row per coefficient, as R's `coef(summary(fit))` plus the interval.
pub fn coefficients_csv(columns: &[String], g: &GlmSummary) -> String {
    let s = stat_name(g);
    let mut out = format!("term,estimate,std_error,{s}_value,p_value,ci95_low,ci95_high\n");
    for (j, c) in columns.iter().enumerate() {
        let get = |v: &[f64]| v.get(j).copied().unwrap_or(f64::NAN);
        let ci = g.ci95.get(j).copied().unwrap_or([f64::NAN; 2]);
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{}",
            csv_field(r_name(c)),
            get(&g.coefficients),
            get(&g.std_errors),
            get(&g.statistics),
            get(&g.p_values),
            ci[0],
            ci[1]
        );
    }
    out
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// `published`, or `suppressed (rule)`.
fn cell_status(c: &TableCell) -> String {
    match c.suppressed {
        None => "published".to_owned(),
        Some(rule) => format!("suppressed ({})", rule.as_str()),
    }
}

/// One row per cell and margin: the `by` levels (`(all)` for a margin), the status, then the
/// statistics; a suppressed cell's statistics are empty, never zero.
pub fn table_csv(t: &TableOutput) -> String {
    let mut out = String::new();
    let head: Vec<String> =
        t.by.iter()
            .map(String::as_str)
            .chain(std::iter::once("status"))
            .chain(t.stats.iter().map(String::as_str))
            .map(csv_field)
            .collect();
    let _ = writeln!(out, "{}", head.join(","));
    for c in &t.cells {
        let mut row: Vec<String> = c.key.iter().map(|k| csv_field(k)).collect();
        row.push(cell_status(c));
        row.extend(c.values.iter().map(|v| opt(*v)));
        let _ = writeln!(out, "{}", row.join(","));
    }
    out
}

/// R's `format.pval` at 3 significant digits: `< 2e-16` below machine precision.
fn format_p(p: f64) -> String {
    if p < 2.2e-16 {
        "< 2e-16".to_owned()
    } else if p < 1e-4 {
        format!("{p:.2e}")
    } else {
        let digits = (2 - p.log10().floor() as i32).max(0) as usize;
        format!("{p:.digits$}")
    }
}

fn stars(p: f64) -> &'static str {
    match p {
        p if p < 0.001 => "***",
        p if p < 0.01 => "**",
        p if p < 0.05 => "*",
        p if p < 0.1 => ".",
        _ => "",
    }
}

/// Numbers of one column with 4 significant digits for the smallest, fixed point when the
/// column's range allows, scientific otherwise (as R's `printCoefmat` does).
fn format_column(values: &[f64]) -> Vec<String> {
    let finite: Vec<f64> = values
        .iter()
        .copied()
        .filter(|v| v.is_finite() && *v != 0.0)
        .collect();
    let (lo, hi) = finite.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v.abs()), hi.max(v.abs()))
    });
    if finite.is_empty() || hi / lo > 1e5 || hi >= 1e7 || lo < 1e-4 {
        return values.iter().map(|v| format!("{v:.3e}")).collect();
    }
    let decimals = (3 - lo.log10().floor() as i32).clamp(0, 10) as usize;
    values.iter().map(|v| format!("{v:.decimals$}")).collect()
}

/// The fit as R's `print(summary(glm))` shows it: the coefficient table with significance
/// stars, the dispersion, the deviances and the AIC.
pub fn glm_table(columns: &[String], g: &GlmSummary) -> String {
    let s = stat_name(g);
    let names: Vec<&str> = columns.iter().map(|c| r_name(c)).collect();
    let est = format_column(&g.coefficients);
    let se = format_column(&g.std_errors);
    let stat: Vec<String> = g.statistics.iter().map(|v| format!("{v:.3}")).collect();
    let pv: Vec<String> = g.p_values.iter().map(|p| format_p(*p)).collect();
    let heads = [
        "Estimate",
        "Std. Error",
        &format!("{s} value"),
        &format!("Pr(>|{s}|)"),
    ];
    let width =
        |col: &[String], head: &str| col.iter().map(|x| x.len()).chain([head.len()]).max().unwrap_or(0);
    let wn = names.iter().map(|n| n.len()).max().unwrap_or(0);
    let (we, ws, wt, wp) = (
        width(&est, heads[0]),
        width(&se, heads[1]),
        width(&stat, heads[2]),
        width(&pv, heads[3]),
    );
    let mut out = String::from("Coefficients:\n");
    let _ = writeln!(
        out,
        "{:wn$} {:>we$} {:>ws$} {:>wt$} {:>wp$}",
        "", heads[0], heads[1], heads[2], heads[3]
    );
    for j in 0..names.len().min(est.len()) {
        let p = g.p_values.get(j).copied().unwrap_or(f64::NAN);
        let line = format!(
            "{:wn$} {:>we$} {:>ws$} {:>wt$} {:>wp$} {}",
            names[j],
            est[j],
            se[j],
            stat[j],
            pv[j],
            stars(p)
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out.push_str("---\nSignif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1\n\n");
    let _ = writeln!(
        out,
        "(Dispersion parameter for {} family taken to be {})\n",
        g.family,
        signif(g.dispersion, 7)
    );
    let dw = signif(g.null_deviance, 7).len().max(signif(g.deviance, 7).len());
    let _ = writeln!(
        out,
        "    Null deviance: {:>dw$}  on {} degrees of freedom",
        signif(g.null_deviance, 7),
        g.df_null
    );
    let _ = writeln!(
        out,
        "Residual deviance: {:>dw$}  on {} degrees of freedom",
        signif(g.deviance, 7),
        g.df_residual
    );
    if let Some(aic) = g.aic {
        let _ = writeln!(out, "AIC: {}", signif(aic, 5));
    }
    let _ = writeln!(
        out,
        "\nNumber of Fisher Scoring iterations: {}{}",
        g.iterations,
        if g.converged { "" } else { " (not converged)" }
    );
    for w in &g.warnings {
        let _ = writeln!(out, "Warning: {w}");
    }
    out
}

/// `x` to `digits` significant digits, without trailing zeros (R's default printing).
fn signif(x: f64, digits: i32) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let decimals = (digits - 1 - x.abs().log10().floor() as i32).max(0) as usize;
    let text = format!("{x:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

/// The table as aligned text for `fedstat results`: suppressed cells show their rule.
pub fn table_text(t: &TableOutput) -> String {
    let fmt = |v: &Option<f64>| match v {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => format!("{x:.4}"),
        None => String::new(),
    };
    let mut rows: Vec<Vec<String>> = Vec::with_capacity(t.cells.len() + 1);
    let mut head: Vec<String> = t.by.clone();
    head.extend(t.stats.iter().cloned());
    head.push("status".to_owned());
    rows.push(head);
    for c in &t.cells {
        let mut row: Vec<String> = c.key.clone();
        row.extend(c.values.iter().map(fmt));
        row.push(
            c.suppressed
                .map_or(String::new(), |r| format!("suppressed ({})", r.as_str())),
        );
        rows.push(row);
    }
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let text = fedstat_core::text::printable(s);
                if i < t.by.len() || i + 1 == cols {
                    format!("{text:<w$}", w = widths[i])
                } else {
                    format!("{text:>w$}", w = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    for n in &t.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

/// The `model.json` document.
pub fn model_json(header: &ResultsHeader, params: &[f64]) -> serde_json::Value {
    let spec = &header.spec;
    let named = |values: &[f64]| -> serde_json::Map<String, serde_json::Value> {
        header
            .columns
            .iter()
            .zip(values)
            .map(|(c, v)| (c.clone(), json!(v)))
            .collect()
    };
    let target = spec.design().ok().map(|d| match d.response {
        Response::Value { column, log: true } => format!("ln({column})"),
        Response::Value { column, log: false } => column,
        Response::Above { column, threshold } => format!("{column} > {threshold}"),
        Response::Level { column, level } => format!("{column} == {level}"),
    });
    let mut doc = json!({
        "experiment": header.status.id,
        "name": spec.name,
        "purpose": spec.purpose,
        "model": spec.model.as_str(),
        "dataset": spec.dataset,
        "target": target,
        "state": header.status.state.to_string(),
        "rounds_completed": header.status.rounds_done,
        "rounds": header.status.rounds,
        "parameters_file": "parameters.bin",
        "parameters_dtype": format!("{:?}", header.tensor.dtype).to_lowercase(),
        "parameters_len": header.tensor.len,
        "final_test_metrics": header.status.history.last().and_then(|r| r.metrics.clone()),
    });
    if let Some(Output::Glm(g)) = &header.output {
        let s = stat_name(g);
        doc["method"] = json!("exact");
        doc["family"] = json!(g.family);
        doc["link"] = json!(g.link);
        doc["coefficients"] = json!(named(&g.coefficients));
        doc["coefficients_note"] =
            json!("the pooled maximum-likelihood fit, in the original units of the design columns");
        doc["std_errors"] = json!(named(&g.std_errors));
        doc[format!("{s}_values")] = json!(named(&g.statistics));
        doc["p_values"] = json!(named(&g.p_values));
        doc["ci95"] = json!(header
            .columns
            .iter()
            .zip(&g.ci95)
            .map(|(c, v)| (c.clone(), json!(v)))
            .collect::<serde_json::Map<_, _>>());
        doc["ci95_note"] = json!(format!(
            "Wald intervals: estimate ± the 0.975 quantile of {} × standard error",
            if g.statistic == TestStatistic::T {
                "t(df_residual)"
            } else {
                "the standard normal"
            }
        ));
        doc["covariance"] = json!({
            "columns": header.columns,
            "matrix": g.covariance.chunks(header.columns.len().max(1)).collect::<Vec<_>>(),
        });
        doc["deviance"] = json!(g.deviance);
        doc["null_deviance"] = json!(g.null_deviance);
        doc["aic"] = json!(g.aic);
        doc["dispersion"] = json!(g.dispersion);
        doc["df_residual"] = json!(g.df_residual);
        doc["df_null"] = json!(g.df_null);
        doc["rows"] = json!(g.rows);
        doc["iterations"] = json!(g.iterations);
        doc["converged"] = json!(g.converged);
        doc["warnings"] = json!(g.warnings);
    } else if let (Some(st), false) = (&header.standardization, header.columns.is_empty()) {
        let raw = unstandardize(params, st);
        doc["coefficients"] = json!(named(&raw));
        doc["coefficients_note"] =
            json!("original units of the features: the intercept and slopes apply to unstandardised columns");
        doc["coefficients_standardized"] = json!(named(params));
        let cols = &header.columns[1..];
        doc["standardization"] = json!({
            "note": "pooled mean and population sd over all nodes' training rows",
            "mean": cols.iter().zip(&st.mean).map(|(c, v)| (c.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "sd": cols.iter().zip(&st.sd).map(|(c, v)| (c.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        });
    }
    let privacy = &header.status.privacy;
    doc["secure_aggregation"] = json!(privacy.secure_aggregation);
    if let Some(dp) = &privacy.dp {
        doc["differential_privacy"] = json!(dp);
        doc["privacy_spent"] = json!(privacy.spent);
    }
    doc
}

/// How an experiment's answers were protected, for `status` and `results`: one line each.
pub fn privacy_lines(p: &PrivacyView) -> Vec<String> {
    let mut lines = vec![format!(
        "secure aggregation: {}",
        if p.secure_aggregation {
            "on (the coordinator saw only masked answers and their sum)"
        } else {
            "off"
        }
    )];
    match &p.dp {
        None => lines.push("differential privacy: off".into()),
        Some(dp) => {
            let mut parts = vec![
                format!("noise multiplier {}", dp.noise_multiplier),
                format!("delta {:e}", dp.delta),
            ];
            if let Some(c) = dp.clip_norm {
                parts.push(format!("clip norm {c}"));
            }
            if let Some(q) = dp.sampling_rate {
                parts.push(format!("sampling rate {q}"));
            }
            if let Some(n) = &dp.node_level {
                parts.push(format!(
                    "node-level: clip {} noise multiplier {}",
                    n.clip_norm, n.noise_multiplier
                ));
            }
            lines.push(format!("differential privacy: {}", parts.join(", ")));
            for s in &p.spent {
                let left = s.remaining.map(|r| format!(", {r:.4} left")).unwrap_or_default();
                lines.push(format!(
                    "  node {}: epsilon {:.4} spent through round {}{left}",
                    s.node, s.epsilon, s.round
                ));
            }
        }
    }
    lines
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x}")).unwrap_or_default()
}

/// One row per completed round.
pub fn metrics_csv(history: &[RoundRecord]) -> String {
    let mut out =
        String::from("round,nodes,train_rows,train_loss,test_rows,log_loss,accuracy,auc,rmse,r2,train_ms,round_ms,retries\n");
    for r in history {
        let m = r.metrics.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.round,
            r.participants.len(),
            r.total_examples,
            r.train_loss,
            m.n,
            opt(m.log_loss),
            opt(m.accuracy),
            opt(m.auc),
            opt(m.rmse),
            opt(m.r2),
            r.train_ms,
            r.round_ms,
            r.retries
        );
    }
    out
}

/// Pooled test metrics, compactly: `log-loss 0.5190 accuracy 0.7380 AUC 0.8190`.
pub fn metrics_line(m: &Metrics) -> String {
    let mut parts = Vec::new();
    let mut add = |name: &str, v: Option<f64>| {
        if let Some(v) = v {
            parts.push(format!("{name} {v:.4}"));
        }
    };
    add("log-loss", m.log_loss);
    add("accuracy", m.accuracy);
    add("AUC", m.auc);
    add("RMSE", m.rmse);
    add("R²", m.r2);
    parts.join("  ")
}

/// `round 3 of 20: 4 nodes, 22524 rows, train loss 0.5301, test log-loss ...`
pub fn round_line(r: &RoundRecord, rounds: u32) -> String {
    let mut line = format!(
        "round {} of {}: {} node(s), {} rows, train loss {:.4}",
        r.round,
        rounds,
        r.participants.len(),
        r.total_examples,
        r.train_loss
    );
    if let Some(m) = &r.metrics {
        let _ = write!(line, ", test {}", metrics_line(m));
    }
    let _ = write!(line, " ({} ms)", r.round_ms);
    line
}

/// `west                     connected     42 s   datasets: cps1988`; the connection time
/// only when the coordinator told it (admins).
pub fn node_line(n: &NodeInfo) -> String {
    match n.connected_secs {
        Some(secs) => format!(
            "{:<24} connected {secs:>6} s   datasets: {}",
            n.name,
            n.datasets.join(", ")
        ),
        None => format!("{:<24} datasets: {}", n.name, n.datasets.join(", ")),
    }
}

/// A status summary line for one experiment.
pub fn status_line(s: &ExperimentStatus) -> String {
    format!(
        "{:>4}  {:<24} {:<9} {:>4}/{:<4} {}",
        s.id,
        s.name,
        s.model.as_str(),
        s.rounds_done,
        s.rounds,
        s.state
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn node_lines_show_the_connection_time_only_when_told() {
        let node = |secs| NodeInfo {
            name: "west".into(),
            datasets: vec!["cps1988".into(), "lfs".into()],
            connected_secs: secs,
        };
        assert_eq!(
            node_line(&node(Some(42))),
            "west                     connected     42 s   datasets: cps1988, lfs"
        );
        assert_eq!(
            node_line(&node(None)),
            "west                     datasets: cps1988, lfs"
        );
    }

    #[test]
    fn planted_symlinks_are_not_followed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "precious").expect("write");
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).expect("mkdir");
        // The old, predictable temporary names, and the final names themselves.
        for name in ["model.tmp", "metrics.tmp", "parameters.tmp", "model.json"] {
            symlink(&victim, out.join(name)).expect("symlink");
        }
        atomic_write(&out.join("model.json"), b"{}", Access::OwnerOnly).expect("write");
        atomic_write(&out.join("metrics.csv"), b"round\n", Access::OwnerOnly).expect("write");
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "precious");
        let meta = std::fs::symlink_metadata(out.join("model.json")).expect("meta");
        assert!(
            meta.file_type().is_file(),
            "the symlink is replaced, not followed"
        );
        assert_eq!(std::fs::read(out.join("model.json")).expect("read"), b"{}");
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(&out)
            .expect("read_dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
