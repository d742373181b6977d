//! Disclosure attacks by an honest-but-curious researcher, against the real binaries: each one
//! rebuilt a person's record or attribute before the node's disclosure rules existed. Here the
//! custodian is careless (any column may be used) and every other rule keeps its default; each
//! attack is refused by the nodes with the rule named, and no refusal carries a line number, a
//! path, a header list or a value.

use std::time::Duration;

use serde_json::Value;

use crate::support::{demo_data, events, Fed, REGIONS};

/// Four CPS 1988 offices whose custodians allow any column and keep every other default.
fn careless_federation() -> Fed {
    let mut fed = Fed::start();
    fed.node_policy = "allowed_targets = [\"*\"]\nallowed_features = [\"*\"]\n".to_owned();
    for r in REGIONS {
        fed.add_node(r, &[("cps1988", demo_data(r))]);
    }
    fed.wait_for_nodes(&REGIONS);
    fed
}

/// A one-round logistic experiment; phases give up after 2 s so refused ones fail fast.
fn experiment(
    name: &str,
    target: &str,
    numeric: &str,
    categorical: &str,
    settings: &str,
    training: &str,
) -> String {
    format!(
        r#"
name = "{name}"
dataset = "cps1988"
model = "logistic"
rounds = 1
min_nodes = 3
round_timeout_secs = 3
max_round_retries = 0
{settings}
[schema]
target = {target}
numeric = [{numeric}]
categorical = [{categorical}]
[training]
seed = 3
{training}
"#
    )
}

const NUMERIC: &str = r#"{ column = "education" }, { column = "experience" }"#;
const CATEGORICAL: &str = r#"{ column = "ethnicity", levels = ["cauc", "afam"], reference = "cauc" }"#;

/// The part of each node's failure event after "could not do statistics:", for every node.
fn refusals(status: &Value) -> Vec<String> {
    events(status)
        .lines()
        .filter_map(|l| {
            l.split_once("could not do statistics: ")
                .map(|(_, r)| r.to_owned())
        })
        .collect()
}

/// What a researcher sees of a refusal must name a rule, never a line, path, header or value.
fn assert_clean(text: &str) {
    for bad in [".csv", "/", "line ", "header has", "found "] {
        assert!(!text.contains(bad), "a refusal leaks {bad:?}: {text}");
    }
}

fn run_to_end(fed: &Fed, file: &str, toml: &str) -> Value {
    let id = fed.submit(file, toml);
    fed.wait_finished(id, Duration::from_secs(60))
}

#[test]
fn attacks_on_one_person_are_refused_with_the_rule_named() {
    let fed = careless_federation();

    // 1. The one-row class: person 2's id as the positive level, one full-batch step from zero,
    //    so the update would be Σ(y − ½)x and person 2's row would fall out of it.
    let s = run_to_end(
        &fed,
        "one-row.toml",
        &experiment(
            "one-row class",
            r#"{ column = "id", positive_level = "2" }"#,
            r#"{ column = "education" }, { column = "experience" }, { column = "wage" }"#,
            "",
            "",
            "local_epochs = 1\nbatch_size = 4294967295\nlearning_rate = 1.0\nl2 = 0.0",
        ),
    );
    assert!(s["state"].get("Failed").is_some(), "{s:#}");
    let r = refusals(&s);
    assert_eq!(r.len(), 4, "{s:#}");
    for text in &r {
        assert!(
            text.contains("target `id`: a class has too few training rows (policy.min_cell)"),
            "{text}"
        );
        assert_clean(text);
    }

    // 2. Batch size 1: each update would be one person's gradient.
    let s = run_to_end(
        &fed,
        "batch1.toml",
        &experiment(
            "batch of one",
            r#"{ column = "wage", threshold = 522.32 }"#,
            NUMERIC,
            CATEGORICAL,
            "",
            "batch_size = 1",
        ),
    );
    assert!(s["state"].get("Failed").is_some(), "{s:#}");
    for text in refusals(&s) {
        assert!(
            text.contains("training.batch_size is below the minimum of 10 (policy.min_batch_size)"),
            "{text}"
        );
    }

    // 3. Level padding: unused levels that would make every node allocate a huge design.
    let padded = |n: usize| {
        let levels: Vec<String> = (0..n).map(|i| format!("\"pad{i}\"")).collect();
        format!(
            r#"{{ column = "ethnicity", levels = ["cauc", "afam", {}], reference = "cauc" }}"#,
            levels.join(", ")
        )
    };
    let path = fed.path("padded-huge.toml");
    let huge = experiment(
        "padding",
        r#"{ column = "wage", threshold = 522.32 }"#,
        NUMERIC,
        &padded(200_000),
        "",
        "",
    );
    std::fs::write(&path, huge).expect("write");
    let out = fed.cli(&["submit", path.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a spec padded with 200,000 levels must be refused"
    );
    assert!(err.contains("schema.categorical.levels"), "{err}");
    let s = run_to_end(
        &fed,
        "padded.toml",
        &experiment(
            "padding",
            r#"{ column = "wage", threshold = 522.32 }"#,
            NUMERIC,
            &padded(60),
            "",
            "",
        ),
    );
    for text in refusals(&s) {
        assert!(
            text.contains("column `ethnicity` declares more than 50 levels (policy.max_levels)"),
            "{text}"
        );
    }

    // 4. A "pooled" answer from a single office.
    let s = run_to_end(
        &fed,
        "alone.toml",
        &experiment(
            "one office",
            r#"{ column = "wage", threshold = 522.32 }"#,
            NUMERIC,
            CATEGORICAL,
            "",
            "",
        )
        .replace("min_nodes = 3", "min_nodes = 1"),
    );
    assert!(s["state"].get("Failed").is_some(), "{s:#}");
    for text in refusals(&s) {
        assert!(
            text.contains("min_nodes is below this office's floor of 3 offices per pooled answer (policy.min_nodes_floor)"),
            "{text}"
        );
    }

    // 5. The error oracle: a level list without `afam` used to say on which line the first
    //    `afam` row was. Now it names the column and the rule only.
    let s = run_to_end(
        &fed,
        "oracle.toml",
        &experiment(
            "oracle",
            r#"{ column = "wage", threshold = 522.32 }"#,
            NUMERIC,
            r#"{ column = "ethnicity", levels = ["cauc", "other"], reference = "cauc" }"#,
            "",
            "",
        ),
    );
    let r = refusals(&s);
    assert_eq!(r.len(), 4, "{s:#}");
    for text in &r {
        assert_eq!(
            text,
            "dataset `cps1988`: column `ethnicity`: a value is not one of the levels listed in the \
             experiment (levels are case-sensitive)"
        );
    }
    // The custodian's log still says where.
    let south = fed.path("node-south.log");
    let log = std::fs::read_to_string(south).unwrap_or_default();
    assert!(log.contains("south.csv: line "), "{log}");
}

/// The threshold of `wage` just above 522.32 at `region`, with how many training rows lie
/// between the two: a second experiment with it would single them out by difference.
fn next_threshold(region: &str) -> (f64, usize) {
    let text = std::fs::read_to_string(demo_data(region)).expect("csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).expect("column");
    let (wage, split) = (col("wage"), col("split"));
    let wages: Vec<f64> = lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f[split] == "train")
        .map(|f| f[wage].parse::<f64>().expect("wage"))
        .filter(|w| *w > 522.32)
        .collect();
    let next = wages.iter().copied().fold(f64::INFINITY, f64::min);
    (next, wages.iter().filter(|w| **w == next).count())
}

#[test]
fn differencing_two_thresholds_a_few_rows_apart_is_refused_across_experiments() {
    let mut fed = careless_federation();
    let logit = |t: f64| {
        experiment(
            "high wage",
            &format!("{{ column = \"wage\", threshold = {t} }}"),
            NUMERIC,
            CATEGORICAL,
            "",
            "",
        )
    };
    let s = run_to_end(&fed, "first.toml", &logit(522.32));
    assert_eq!(s["state"], "Completed", "{s:#}");

    // The node restarts in between: its record of released row sets is on disk.
    fed.restart_node("south");
    fed.wait_for_nodes(&REGIONS);
    let (t2, between) = next_threshold("south");
    assert!(
        (1..10).contains(&between),
        "the fixture should have 1 to 9 rows at {t2}"
    );
    let s = run_to_end(&fed, "second.toml", &logit(t2));
    let ev = events(&s);
    let south = ev
        .lines()
        .find(|l| l.contains("node `south` could not do statistics"))
        .unwrap_or_else(|| panic!("south must refuse: {ev}"));
    assert!(
        south.contains(
            "refused by site policy: differencing: the training rows in the positive class of \
             target `wage` would differ from rows this office released before by too few rows \
             (policy.min_cell)"
        ),
        "{south}"
    );
    assert!(!south.contains(&t2.to_string()), "{south}");
    let audit = std::fs::read_to_string(fed.node_audit_log("south")).expect("audit");
    assert!(audit.contains("\"row_sets_recorded\""), "{audit}");
    // The same experiment again releases nothing new and is answered.
    let s = run_to_end(&fed, "again.toml", &logit(522.32));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let participants = &s["history"][0]["participants"];
    assert!(
        participants
            .as_array()
            .is_some_and(|p| p.iter().any(|n| n == "south")),
        "{s:#}"
    );
}
