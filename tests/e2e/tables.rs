//! Federated tables on the four CPS 1988 offices, against the real binaries: published cells
//! equal the pooled pandas figures (`tests/data/table-reference.json`, made by
//! `tests/reference/table_reference.py`), and a small cell at one office is suppressed at that
//! office, marked in the pooled table with its complement, and its value appears in no results
//! file.

use std::time::Duration;

use serde_json::Value;

use crate::support::{demo_data, repo, Fed, REGIONS};

fn federation(min_cell: u64) -> Fed {
    let mut fed = Fed::start();
    fed.node_policy = format!(
        "allowed_targets = [\"*\"]\nallowed_features = [\"*\"]\nallowed_models = [\"table\"]\nmin_cell = {min_cell}\n"
    );
    for r in REGIONS {
        fed.add_node(r, &[("cps1988", demo_data(r))]);
    }
    fed.wait_for_nodes(&REGIONS);
    fed
}

const SCHEMA: &str = r#"
[schema]
categorical = [
  { column = "ethnicity", levels = ["cauc", "afam"], reference = "cauc" },
  { column = "smsa", levels = ["yes", "no"], reference = "yes" },
  { column = "parttime", levels = ["no", "yes"], reference = "no" },
]
"#;

fn experiment(name: &str, table: &str) -> String {
    format!(
        "name = \"{name}\"\ndataset = \"cps1988\"\nmodel = \"table\"\nmin_nodes = 4\nround_timeout_secs = 30\n{SCHEMA}\n[table]\n{table}\n"
    )
}

fn reference() -> Value {
    let text = std::fs::read_to_string(repo().join("tests/data/table-reference.json")).expect("fixture");
    serde_json::from_str(&text).expect("fixture json")
}

/// Fetch the results into `dir`; returns (table.json, table.csv, the CLI's text).
fn results(fed: &Fed, id: u64, dir: &str) -> (Value, String, String) {
    let out = fed.path(dir);
    let r = fed.cli(&["results", &id.to_string(), "--out", out.to_str().expect("utf-8")]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let json = std::fs::read_to_string(out.join("table.json")).expect("table.json");
    let csv = std::fs::read_to_string(out.join("table.csv")).expect("table.csv");
    (
        serde_json::from_str(&json).expect("json"),
        csv,
        String::from_utf8_lossy(&r.stdout).into_owned(),
    )
}

fn cell<'a>(table: &'a Value, key: &Value) -> &'a Value {
    table["cells"]
        .as_array()
        .expect("cells")
        .iter()
        .find(|c| &c["key"] == key)
        .unwrap_or_else(|| panic!("no cell {key}"))
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

/// Published cells equal pandas on the pooled rows: counts exactly, sums, means and sample
/// variances to 1e-9 relative; suppressed cells carry no value.
#[test]
fn tables_match_the_pooled_pandas_figures() {
    let fed = federation(5);
    let wages = fed.submit(
        "wages.toml",
        &experiment(
            "wage by ethnicity and smsa",
            "by = [\"ethnicity\", \"smsa\"]\ndominance_n = 1\ndominance_k = 95\n\
             numeric = [{ column = \"wage\", min = 0, max = 20000, bins = [0, 250, 500, 750, 1000, 1500, 2000, 5000, 20000], quantiles = [0.5] }]",
        ),
    );
    let counts = fed.submit(
        "counts.toml",
        &experiment(
            "ethnicity x smsa x parttime",
            "by = [\"ethnicity\", \"smsa\", \"parttime\"]",
        ),
    );
    let reference = reference();

    let s = fed.wait_finished(wages, Duration::from_secs(60));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let (table, csv, text) = results(&fed, wages, "wages");
    assert_eq!(
        table["header"],
        serde_json::json!([
            "ethnicity",
            "smsa",
            "count",
            "wage_sum",
            "wage_mean",
            "wage_var",
            "wage_q0.5"
        ])
    );
    // Every office holds at least 5 rows in every cell, and no office dominates beyond 95%:
    // the whole table is published.
    for want in reference["wage_by_ethnicity_smsa"].as_array().expect("wages") {
        let c = cell(&table, &want["key"]);
        assert!(c["suppressed"].is_null(), "{c}");
        let v = c["values"].as_array().expect("values");
        assert_eq!(v[0].as_f64(), want["count"].as_f64(), "{c}");
        for (i, name) in [(1, "sum"), (2, "mean"), (3, "var")] {
            let (got, exp) = (v[i].as_f64().expect("value"), want[name].as_f64().expect("ref"));
            assert!(rel(got, exp) < 1e-9, "{name} of {}: {got} vs {exp}", want["key"]);
        }
        // The grouped median is within its bin of the data.
        let median = v[4].as_f64().expect("median");
        assert!(median > 0.0 && median < 20000.0, "{c}");
    }
    assert_eq!(csv.lines().count(), 1 + 9, "{csv}");
    assert!(csv.starts_with("ethnicity,smsa,status,count,wage_sum"), "{csv}");
    assert!(text.contains("wage_mean") && text.contains("(all)"), "{text}");

    let s = fed.wait_finished(counts, Duration::from_secs(60));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let (table, _, _) = results(&fed, counts, "counts");
    let mut published = 0;
    for want in reference["counts_ethnicity_smsa_parttime"]
        .as_array()
        .expect("counts")
    {
        let c = cell(&table, &want["key"]);
        if c["suppressed"].is_null() {
            assert_eq!(c["values"][0].as_f64(), want["count"].as_f64(), "{c}");
            published += 1;
        } else {
            assert!(
                c["values"].as_array().expect("values").iter().all(Value::is_null),
                "{c}"
            );
        }
    }
    // afam × no × yes has 1, 2, 28 and 2 rows at the four offices: three suppress it.
    let small = cell(&table, &serde_json::json!(["afam", "no", "yes"]));
    assert_eq!(small["suppressed"], "node", "{small}");
    assert!(published >= 18, "{published} of 27 published: {table:#}");
}

/// One office (west) has 5 rows in afam × no, under its `min_cell` of 10: it sends that cell
/// as zeros with a flag and protects it in its own table; the pooled table marks the cell
/// `node` with a complement in its row and its column, publishes the margins, and the pooled
/// value of a suppressed cell appears in no results file.
#[test]
fn a_small_cell_at_one_office_is_suppressed_with_its_complement() {
    let fed = federation(10);
    let id = fed.submit(
        "small.toml",
        &experiment(
            "ethnicity x smsa",
            // With the default (2, 85%) office-level rule, afam × (all) would also go: the south
            // and one other office hold over 85% of it. This test is about the small cell.
            "by = [\"ethnicity\", \"smsa\"]\ndominance_n = 1\ndominance_k = 95\n\
             numeric = [{ column = \"wage\", min = 0, max = 20000 }]",
        ),
    );
    let s = fed.wait_finished(id, Duration::from_secs(60));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let (table, csv, text) = results(&fed, id, "small");
    let status = |k: [&str; 2]| cell(&table, &serde_json::json!(k))["suppressed"].clone();
    assert_eq!(status(["afam", "no"]), "node", "{table:#}");
    let row = [status(["afam", "yes"])];
    let col = [status(["cauc", "no"])];
    assert!(
        row.iter().any(|s| !s.is_null()),
        "no complement in the row: {table:#}"
    );
    assert!(
        col.iter().any(|s| !s.is_null()),
        "no complement in the column: {table:#}"
    );
    for margin in [["(all)", "(all)"], ["afam", "(all)"], ["(all)", "no"]] {
        assert!(status(margin).is_null(), "{margin:?}: {table:#}");
    }
    let reference = reference();
    // The pooled figures of every suppressed cell, as pandas has them: none may appear.
    let mut hidden = Vec::new();
    for want in reference["wage_by_ethnicity_smsa"].as_array().expect("wages") {
        let c = cell(&table, &want["key"]);
        if !c["suppressed"].is_null() {
            assert!(
                c["values"].as_array().expect("values").iter().all(Value::is_null),
                "{c}"
            );
            hidden.push(want["count"].to_string());
            hidden.push(format!("{}", want["sum"].as_f64().expect("sum")));
        }
    }
    assert!(!hidden.is_empty());
    let out = fed.path("small");
    for file in ["table.csv", "table.json", "model.json", "metrics.csv"] {
        let body = std::fs::read_to_string(out.join(file)).expect(file);
        let fields: Vec<&str> = body
            .split([',', '\n', ' ', ':', '[', ']'])
            .map(|f| f.trim())
            .collect();
        for h in &hidden {
            assert!(
                !fields.contains(&h.as_str()),
                "{file} holds the suppressed figure {h}:\n{body}"
            );
        }
    }
    for line in csv.lines().filter(|l| l.contains("suppressed")) {
        let values: Vec<&str> = line.split(',').skip(3).collect();
        assert!(values.iter().all(|v| v.is_empty()), "{line}");
    }
    assert!(text.contains("suppressed (node)"), "{text}");
}
