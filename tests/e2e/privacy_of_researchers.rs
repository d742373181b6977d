//! What researchers may see of each other and of the offices: only their own experiments
//! (status, watch, results, events), node names and dataset names but not connection times,
//! and a bounded number of unfinished experiments each.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::Fed;

/// Data-free, so the test does not depend on the offices' disclosure policy.
const ECHO: &str = "name = \"echo\"\nmodel = \"echo\"\nrounds = 2\nmin_nodes = 1\n[echo]\nparams = 100\n";

/// The CLI's JSON output, as `config`'s holder.
fn json_as(fed: &Fed, config: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = fed.cli_as(config, &all);
    assert!(
        out.status.success(),
        "fedstat {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json output")
}

/// The error a refused command printed; it must have failed and printed nothing else.
fn refusal(out: &Output, what: &str) -> String {
    assert!(!out.status.success(), "{what} must be refused");
    assert!(
        out.stdout.is_empty(),
        "{what} printed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `args` with `ID` replaced by `id`.
fn with_id<'a>(args: &[&'a str], id: &'a str) -> Vec<&'a str> {
    args.iter().map(|a| if *a == "ID" { id } else { a }).collect()
}

fn ids(list: &Value) -> Vec<u64> {
    list.as_array()
        .map(|a| a.iter().filter_map(|s| s["id"].as_u64()).collect())
        .unwrap_or_default()
}

#[test]
fn researchers_see_only_their_own_experiments() {
    let mut fed = Fed::start();
    fed.add_node("n1", &[]);
    fed.wait_for_nodes(&["n1"]);
    fed.issue("researcher", "bob");
    fed.issue("admin", "root");
    let ca = fed.pki().join("ca.pem");
    let alice = fed.path("researcher.toml");
    let bob = fed.write_researcher_config("bob.toml", "bob", &ca);
    let root = fed.write_researcher_config("root.toml", "root", &ca);

    let id = fed.submit("echo.toml", ECHO);
    let s = fed.wait_finished(id, Duration::from_secs(60));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let (id_s, missing) = (id.to_string(), (id + 1000).to_string());

    // Bob is refused status, watch and results of alice's experiment with the same words as
    // for an experiment that does not exist, and learns nothing of it.
    let bob_out = fed.path("bob-results");
    let bob_out = bob_out.to_str().expect("utf-8 path");
    for args in [
        vec!["status", "ID"],
        vec!["watch", "ID"],
        vec!["results", "ID", "--out", bob_out],
        vec!["results", "ID", "--round", "1", "--out", bob_out],
        vec!["cancel", "ID"],
    ] {
        let what = format!("bob's {args:?}");
        let err = refusal(&fed.cli_as(&bob, &with_id(&args, &id_s)), &what);
        assert!(
            err.contains(&format!("no experiment {id} visible to researcher `bob`")),
            "{what}: {err}"
        );
        for secret in ["alice", "echo", "Completed", "completed"] {
            assert!(!err.contains(secret), "{what} reveals {secret:?}: {err}");
        }
        let err_missing = refusal(&fed.cli_as(&bob, &with_id(&args, &missing)), &what);
        assert_eq!(
            err.replace(&format!("experiment {id_s} "), &format!("experiment {missing} ")),
            err_missing,
            "{what}: alice's experiment and a missing one must be refused alike"
        );
    }
    assert!(!Path::new(bob_out).exists(), "no results were written for bob");
    assert_eq!(json_as(&fed, &bob, &["status"]), json!([]));
    let text = fed.cli_as(&bob, &["status"]);
    assert!(text.status.success());
    assert!(
        !String::from_utf8_lossy(&text.stdout).contains("echo"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // Alice and the admin see it all.
    assert_eq!(ids(&json_as(&fed, &alice, &["status"])), [id]);
    assert_eq!(ids(&json_as(&fed, &root, &["status"])), [id]);
    let s = json_as(&fed, &root, &["status", &id_s]);
    assert_eq!(s[0]["submitter"], "researcher `alice`", "{s:#}");
    assert!(s[0]["events"].as_array().is_some_and(|e| !e.is_empty()), "{s:#}");
    let out = fed.cli_as(&root, &["watch", &id_s]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("round 2 of 2"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for (who, config) in [("alice", &alice), ("root", &root)] {
        let dir = fed.path(&format!("{who}-results"));
        let out = fed.cli_as(config, &["results", &id_s, "--out", dir.to_str().expect("utf-8")]);
        assert!(
            out.status.success(),
            "{who}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(dir.join("model.json").exists(), "{who}");
    }

    // Nodes: names and datasets for researchers; how long they are connected only for admins.
    let nodes = json_as(&fed, &bob, &["nodes"]);
    assert_eq!(nodes[0]["name"], "n1", "{nodes:#}");
    assert_eq!(nodes[0]["datasets"], json!([]), "{nodes:#}");
    assert_eq!(nodes[0]["connected_secs"], Value::Null, "{nodes:#}");
    let text = fed.cli_as(&bob, &["nodes"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("n1") && text.contains("datasets:"), "{text}");
    assert!(!text.contains("connected"), "{text}");
    let nodes = json_as(&fed, &root, &["nodes"]);
    assert!(nodes[0]["connected_secs"].is_u64(), "{nodes:#}");
    let text = fed.cli_as(&root, &["nodes"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("connected"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // The refusals are audited, naming who asked.
    let audit = std::fs::read_to_string(fed.path("data/audit.jsonl")).expect("audit log");
    let refused = audit
        .lines()
        .filter(|l| l.contains("\"request_refused\"") && l.contains("researcher `bob`"))
        .count();
    assert!(refused >= 5, "{audit}");
}

#[test]
fn a_researcher_may_have_four_unfinished_experiments() {
    // No node: every experiment waits, unfinished.
    let fed = Fed::start();
    fed.issue("researcher", "bob");
    fed.issue("admin", "root");
    let ca = fed.pki().join("ca.pem");
    let bob = fed.write_researcher_config("bob.toml", "bob", &ca);
    let root = fed.write_researcher_config("root.toml", "root", &ca);
    let first = fed.submit("echo.toml", ECHO);
    for _ in 1..4 {
        fed.submit("echo.toml", ECHO);
    }
    let file = fed.path("echo.toml");
    let file = file.to_str().expect("utf-8 path");
    let err = refusal(&fed.cli(&["submit", file]), "a fifth experiment");
    assert!(
        err.contains("limits.max_experiments_per_researcher") && err.contains("allows 4"),
        "{err}"
    );
    // Each researcher has their own allowance; admins have one too.
    json_as(&fed, &bob, &["submit", file]);
    for _ in 0..4 {
        json_as(&fed, &root, &["submit", file]);
    }
    let err = refusal(
        &fed.cli_as(&root, &["submit", file]),
        "the admin's fifth experiment",
    );
    assert!(err.contains("limits.max_experiments_per_researcher"), "{err}");
    // An ended experiment no longer counts.
    let out = fed.cli(&["cancel", &first.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    fed.submit("echo.toml", ECHO);
    let err = refusal(&fed.cli(&["submit", file]), "a fifth experiment again");
    assert!(err.contains("limits.max_experiments_per_researcher"), "{err}");
}
