//! The data custodian's control, end to end with the real binaries: the site policy refuses
//! experiments (with the reason in `fedstat status`) while compliant nodes complete them; a
//! manifest held for manual approval runs only after `fedstat-node approve`, and `reject`
//! refuses it; `audit verify` accepts a node's real audit log and names tampering.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::support::{demo_data, events, logit_experiment, run_bin, wait_until, Fed};

/// A copy of a region's CSV with `train` training rows and 3 test rows.
fn small_csv(fed: &Fed, file: &str, train: usize) -> PathBuf {
    let text = std::fs::read_to_string(demo_data("midwest")).expect("demo data");
    let mut lines = text.lines();
    let mut out = vec![lines.next().expect("header").to_owned()];
    for (i, line) in lines.take(train + 3).enumerate() {
        let (row, _) = line.rsplit_once(',').expect("split column last");
        out.push(format!("{row},{}", if i < train { "train" } else { "test" }));
    }
    let path = fed.path(file);
    std::fs::write(&path, out.join("\n") + "\n").expect("write csv");
    path
}

fn audit_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit record is JSON"))
        .collect()
}

fn participants(status: &Value) -> Vec<Vec<String>> {
    status["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|r| {
            r["participants"]
                .as_array()
                .expect("participants")
                .iter()
                .filter_map(|p| p.as_str().map(str::to_owned))
                .collect()
        })
        .collect()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Each policy rule refuses the experiment at the node that has it, with the rule named in the
/// experiment's events; the compliant node completes it, and a restricted node keeps serving an
/// experiment its policy allows.
#[test]
fn nodes_refuse_experiments_outside_their_site_policy() {
    let mut fed = Fed::start();
    let cps = |p: PathBuf| vec![("cps1988", p)];
    fed.add_node("open", &[("cps1988", demo_data("midwest"))]);
    let rules = [
        ("nodataset", "allowed_datasets = [\"lfs\"]"),
        (
            "nocolumn",
            "allowed_features = [\"education\", \"experience\", \"smsa\", \"parttime\"]",
        ),
        ("nomodel", "allowed_models = [\"linear\"]"),
        ("fewrounds", "max_rounds = 1"),
    ];
    for (name, rule) in rules {
        fed.add_node_with(name, &cps(demo_data("northeast")), &format!("[policy]\n{rule}\n"));
    }
    let tiny = small_csv(&fed, "tiny.csv", 6);
    fed.add_node("tiny", &cps(tiny));
    let small = small_csv(&fed, "small.csv", 15);
    fed.add_node("saturated", &cps(small));
    let all = [
        "open",
        "nodataset",
        "nocolumn",
        "nomodel",
        "fewrounds",
        "tiny",
        "saturated",
    ];
    fed.wait_for_nodes(&all);

    let id = fed.submit("logit.toml", &logit_experiment(2, 1, ""));
    let s = fed.wait_finished(id, Duration::from_secs(60));
    assert_eq!(s["state"], "Completed", "{s:#}");
    for round in participants(&s) {
        assert_eq!(round, ["open"], "{s:#}");
    }
    let ev = events(&s);
    for (node, reason) in [
        (
            "nodataset",
            "dataset `cps1988` is not allowed (policy.allowed_datasets)",
        ),
        (
            "nocolumn",
            "column `ethnicity` is not allowed as a feature (policy.allowed_features)",
        ),
        (
            "nomodel",
            "model kind `logistic` is not allowed (policy.allowed_models)",
        ),
        (
            "fewrounds",
            "2 rounds asked, more than the maximum of 1 (policy.max_rounds)",
        ),
        (
            "tiny",
            "fewer training rows than the minimum of 10 (policy.min_train_rows)",
        ),
        ("saturated", "the model's 7 parameters would saturate the data"),
    ] {
        let line = format!("node `{node}` could not do statistics: refused by site policy: {reason}");
        assert!(ev.contains(&line), "missing `{line}` in:\n{ev}");
    }
    // Thresholds are named, the node's row counts never are.
    assert!(!ev.contains(" 6 ") && !ev.contains(" 15 "), "{ev}");

    // The refusal is in the refusing node's audit log.
    let records = audit_records(&fed.node_audit_log("nomodel"));
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "policy_refused" && r["details"]["experiment"] == id),
        "{records:#?}"
    );

    // Nodes keep serving: a one-round linear experiment suits `nomodel` and `fewrounds`.
    let linear = logit_experiment(1, 1, "")
        .replace("model = \"logistic\"", "model = \"linear\"")
        .replace(
            "{ column = \"wage\", threshold = 522.32 }",
            "{ column = \"wage\", log = true }",
        );
    let id = fed.submit("linear.toml", &linear);
    let s = fed.wait_finished(id, Duration::from_secs(60));
    assert_eq!(s["state"], "Completed", "{s:#}");
    assert_eq!(participants(&s), [["fewrounds", "nomodel", "open"]], "{s:#}");
}

/// An experiment (as `logit_experiment`) whose phases wait `timeout` seconds for a quorum and
/// are retried many times, so a held node can be approved in between.
fn patient_experiment(min_nodes: u32, purpose: &str) -> String {
    logit_experiment(3, min_nodes, "").replace(
        "round_timeout_secs = 10",
        &format!("round_timeout_secs = 3\nmax_round_retries = 10\npurpose = \"{purpose}\""),
    )
}

/// The hash `fedstat-node pending` lists, once exactly `count` manifests are held.
fn wait_for_pending(config: &Path, count: usize) -> Vec<String> {
    let mut hashes = Vec::new();
    wait_until(Duration::from_secs(30), "a manifest to be held", || {
        let out = run_bin(
            "fedstat-node",
            &["pending", "--config", config.to_str().expect("utf-8")],
        );
        assert!(out.status.success(), "{}", text(&out));
        hashes = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("manifest "))
            .map(|h| h.split_whitespace().next().unwrap_or_default().to_owned())
            .collect();
        hashes.len() == count
    });
    hashes
}

/// With manual approval, the experiment's manifest is held (the node answers nothing) until
/// the custodian approves it with the CLI while the node runs; the retried phase then includes
/// the node. A changed experiment is a new manifest, held again, and `reject` refuses it.
#[test]
fn a_held_manifest_runs_only_after_approval_and_reject_refuses() {
    let mut fed = Fed::start();
    fed.add_node("auto", &[("cps1988", demo_data("midwest"))]);
    let custodian = fed.add_node_with(
        "custodian",
        &[("cps1988", demo_data("south"))],
        "[policy]\napproval = \"manual\"\n",
    );
    fed.wait_for_nodes(&["auto", "custodian"]);
    let cfg = custodian.to_str().expect("utf-8").to_owned();

    // Two nodes are needed: the phase waits for its deadline, then is retried.
    let id = fed.submit("first.toml", &patient_experiment(2, "wage study"));
    let held = wait_for_pending(&custodian, 1);
    let hash = held[0].clone();
    assert_eq!(hash.len(), 64, "{held:?}");
    let out = run_bin("fedstat-node", &["pending", "--config", &cfg]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    for field in [
        "submitter:  researcher",
        "name:       e2e logit",
        "purpose:    wage study",
        "model:      logistic",
        "dataset:    cps1988",
        "target:     wage > 522.32",
        "parameters: const, education, experience, experience^2",
        "rounds:     3, each with at least min_nodes = 2 offices",
        "training:   local_epochs 1, batch_size 32",
    ] {
        assert!(listing.contains(field), "`{field}` missing in:\n{listing}");
    }
    wait_until(Duration::from_secs(20), "the hold to show in the events", || {
        events(&fed.status(id)).contains(&format!(
            "node `custodian` holds the experiment for its custodian's approval (manifest {hash})"
        ))
    });
    // Nothing has run on the custodian's data yet.
    let log = fed.node_audit_log("custodian");
    assert!(
        !audit_records(&log)
            .iter()
            .any(|r| r["kind"] == "answer_released" || r["kind"] == "update_sent"),
        "{:#?}",
        audit_records(&log)
    );
    assert_eq!(fed.status(id)["rounds_done"], 0);

    let out = run_bin("fedstat-node", &["approve", &hash[..12], "--config", &cfg]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("approved manifest {hash}")),
        "{}",
        text(&out)
    );
    let s = fed.wait_finished(id, Duration::from_secs(90));
    assert_eq!(s["state"], "Completed", "{s:#}");
    assert_eq!(participants(&s).len(), 3);
    for round in participants(&s) {
        assert_eq!(round, ["auto", "custodian"], "{s:#}");
    }
    // The audit log shows the decision before the first answer for this manifest.
    let records = audit_records(&log);
    let pos = |kind: &str| {
        records
            .iter()
            .position(|r| r["kind"] == kind && r["details"]["manifest"] == hash.as_str())
    };
    let applied = pos("decision_applied").expect("decision recorded");
    let first_answer = pos("answer_released").expect("statistics released");
    assert!(applied < first_answer, "{records:#?}");
    assert!(pos("update_sent").is_some(), "{records:#?}");

    // Any change is a new manifest: held again, then rejected with a reason the researcher sees.
    let id = fed.submit("second.toml", &patient_experiment(2, "wage study, extended"));
    let held = wait_for_pending(&custodian, 1);
    assert_ne!(held[0], hash, "a changed experiment must need a new approval");
    let out = run_bin(
        "fedstat-node",
        &[
            "reject",
            &held[0],
            "--reason",
            "not approved for this purpose",
            "--config",
            &cfg,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    wait_until(
        Duration::from_secs(30),
        "the rejection to reach the researcher",
        || {
            events(&fed.status(id)).contains(
            "node `custodian` could not do statistics: rejected by the data custodian: not approved for this purpose",
        )
        },
    );
    assert!(audit_records(&log)
        .iter()
        .any(|r| r["kind"] == "custodian_rejected" && r["details"]["manifest"] == held[0].as_str()));
}

/// `audit verify` (node and coordinator binaries) accepts a node's real log after an
/// experiment, and names the first bad record after an edit, a deletion or a swap.
#[test]
fn audit_verify_accepts_a_real_log_and_names_tampering() {
    let mut fed = Fed::start();
    let cfg = fed.add_node_with("office", &[("cps1988", demo_data("midwest"))], "");
    fed.wait_for_nodes(&["office"]);
    let id = fed.submit("logit.toml", &logit_experiment(2, 1, ""));
    let s = fed.wait_finished(id, Duration::from_secs(60));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let status = fed.node("office").terminate().expect("node stops");
    assert!(status.success());

    let log = fed.node_audit_log("office");
    let records = audit_records(&log);
    let kinds: Vec<&str> = records.iter().filter_map(|r| r["kind"].as_str()).collect();
    for kind in [
        "node_started",
        "connected",
        "manifest_seen",
        "answer_released",
        "update_sent",
        "node_stopped",
    ] {
        assert!(kinds.contains(&kind), "no `{kind}` in {kinds:?}");
    }
    let updates: Vec<&Value> = records.iter().filter(|r| r["kind"] == "update_sent").collect();
    assert_eq!(updates.len(), 2, "{records:#?}");
    for u in &updates {
        assert_eq!(u["details"]["sha256"].as_str().map(str::len), Some(64));
        assert!(u["details"]["rows"].as_u64().is_some_and(|r| r > 0));
    }

    let cfg = cfg.to_str().expect("utf-8");
    let out = run_bin("fedstat-node", &["audit", "verify", "--config", cfg]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("OK: {} records", records.len())),
        "{}",
        text(&out)
    );
    let log_s = log.to_str().expect("utf-8");
    let out = run_bin("fedstat-coordinator", &["audit", "verify", "--file", log_s]);
    assert!(out.status.success(), "{}", text(&out));

    let lines: Vec<String> = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(str::to_owned)
        .collect();
    let update_line = lines
        .iter()
        .position(|l| l.contains("\"kind\":\"update_sent\""))
        .expect("an update line");
    let tampered = |name: &str, edit: &dyn Fn(&mut Vec<String>)| -> PathBuf {
        let mut l = lines.clone();
        edit(&mut l);
        let path = fed.path(name);
        std::fs::write(&path, l.join("\n") + "\n").expect("write");
        path
    };
    let rows = updates[0]["details"]["rows"].as_u64().unwrap_or_default();
    let cases: [(&str, PathBuf, String); 3] = [
        (
            "edited",
            tampered("edited.jsonl", &|l| {
                l[update_line] = l[update_line].replace(&format!("\"rows\":{rows}"), "\"rows\":1");
            }),
            format!("TAMPERED: line {} (seq {})", update_line + 1, update_line + 1),
        ),
        (
            "deleted",
            tampered("deleted.jsonl", &|l| {
                l.remove(2);
            }),
            "TAMPERED: line 3 (seq 4)".to_owned(),
        ),
        (
            "swapped",
            tampered("swapped.jsonl", &|l| l.swap(2, 3)),
            "TAMPERED: line 3 (seq 4)".to_owned(),
        ),
    ];
    for (what, path, expected) in &cases {
        let p = path.to_str().expect("utf-8");
        for (bin, args) in [
            ("fedstat-node", ["audit", "verify", "--file", p]),
            ("fedstat-coordinator", ["audit", "verify", "--file", p]),
        ] {
            let out = run_bin(bin, &args);
            assert!(
                !out.status.success(),
                "{bin}: {what} log accepted: {}",
                text(&out)
            );
            assert!(text(&out).contains(expected), "{bin}, {what}: {}", text(&out));
        }
    }

    // In place, through the node's config.
    std::fs::copy(&cases[0].1, &log).expect("tamper in place");
    let out = run_bin("fedstat-node", &["audit", "verify", "--config", cfg]);
    assert!(!out.status.success());
    assert!(text(&out).contains(&cases[0].2), "{}", text(&out));
}
