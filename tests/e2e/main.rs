//! End-to-end tests: the real `fedstat-coordinator`, `fedstat-node` and `fedstat` binaries,
//! talking QUIC (or TLS over TCP, `tcp.rs`) with mutual TLS on loopback, each federation with its own temporary CA and
//! ephemeral ports.

mod configs;
mod disclosure;
mod durability;
mod glm;
mod governance;
mod hardening;
mod load;
mod privacy_of_researchers;
mod rogue;
mod rogue_coordinator;
mod secure;
mod security;
mod support;
mod tables;
mod tcp;

use std::time::Duration;

use serde_json::Value;
use support::{
    demo_data, dirty_data, events, logit_experiment, reference, wait_until, Fed, REGIONS,
    SLOW_TRAINING_POLICY,
};

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn final_metrics(status: &Value) -> Value {
    status["history"]
        .as_array()
        .and_then(|h| h.last())
        .map(|r| r["metrics"].clone())
        .expect("a completed round")
}

fn as_refs(v: &[(String, std::path::PathBuf)]) -> Vec<(&str, std::path::PathBuf)> {
    v.iter().map(|(n, p)| (n.as_str(), p.clone())).collect()
}

fn four_offices() -> Fed {
    let mut fed = Fed::start();
    for region in REGIONS {
        fed.add_node(region, &[("cps1988", demo_data(region))]);
    }
    fed.wait_for_nodes(&REGIONS);
    fed
}

/// Logit and linear experiments, run at the same time on four offices, come within the issue's
/// tolerances of the pooled statsmodels fits; results, status, nodes and shutdown work.
#[test]
fn full_experiments_match_the_pooled_fits() {
    let mut fed = four_offices();
    let logit = fed.submit("logit.toml", &logit_experiment(20, 4, ""));
    let linear_toml = logit_experiment(20, 4, "")
        .replace("model = \"logistic\"", "model = \"linear\"")
        .replace(
            "{ column = \"wage\", threshold = 522.32 }",
            "{ column = \"wage\", log = true }",
        )
        .replace("learning_rate = 0.05", "learning_rate = 0.02");
    let linear = fed.submit("linear.toml", &linear_toml);

    let reference = reference();
    let models = &reference["cps1988"]["models"];
    let s = fed.wait_finished(logit, Duration::from_secs(120));
    assert_eq!(s["state"], "Completed", "{s:#}");
    assert_eq!(s["rounds_done"], 20);
    let m = final_metrics(&s);
    let pooled = &models["logit_highwage"]["pooled_statsmodels_Logit"]["test"];
    assert_eq!(m["n"], 5631);
    assert!(
        (f(&m["log_loss"]) - f(&pooled["log_loss"])).abs() < 0.01,
        "{m} vs {pooled}"
    );
    assert!(
        (f(&m["accuracy"]) - f(&pooled["accuracy"])).abs() < 0.01,
        "{m} vs {pooled}"
    );
    for round in s["history"].as_array().expect("history") {
        assert_eq!(round["participants"], serde_json::json!(REGIONS));
        // Each office's weight is its training rows rounded to a multiple of 10 (no answer
        // states an exact count), so the total is 22,524 to within 5 per office.
        let total = round["total_examples"].as_u64().expect("total");
        assert!(total % 10 == 0 && total.abs_diff(22_524) <= 20, "{total}");
    }

    let s = fed.wait_finished(linear, Duration::from_secs(120));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let m = final_metrics(&s);
    let pooled = &models["ols_logwage"]["pooled_statsmodels_OLS"]["test"];
    assert!(f(&m["rmse"]) < f(&pooled["rmse"]) * 1.01, "{m} vs {pooled}");

    // Results: named coefficients in original units, one metrics row per round, raw parameters.
    let out = fed.path("results");
    let r = fed.cli(&[
        "results",
        &logit.to_string(),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let model: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).expect("model.json"))
            .expect("json");
    let coefs = model["coefficients"].as_object().expect("coefficients");
    let names: Vec<&str> = coefs.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "const",
            "education",
            "experience",
            "experience^2",
            "ethnicity=afam",
            "smsa=yes",
            "parttime=yes"
        ]
    );
    let raw = &models["logit_highwage"]["pooled_statsmodels_Logit"]["coef"];
    // SGD gets close to, not onto, the MLE: signs and magnitudes of the slopes must agree.
    for (name, value) in coefs {
        let (got, want) = (f(value), f(&raw[name]));
        assert_eq!(got.signum(), want.signum(), "{name}: {got} vs {want}");
    }
    let csv = std::fs::read_to_string(out.join("metrics.csv")).expect("metrics.csv");
    assert_eq!(csv.lines().count(), 21, "{csv}");
    assert_eq!(
        std::fs::metadata(out.join("parameters.bin"))
            .expect("parameters.bin")
            .len(),
        7 * 8
    );

    // Human output names the experiment; nodes show dataset names only.
    let text = fed.cli(&["status", &logit.to_string()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("round 20 of 20") && text.contains("state: completed"),
        "{text}"
    );
    let nodes = fed.json(&["nodes"]);
    assert_eq!(nodes.as_array().map(Vec::len), Some(4));
    assert_eq!(nodes[0]["datasets"], serde_json::json!(["cps1988"]));

    // SIGTERM: every process closes its connections and exits 0.
    for (name, node) in &mut fed.nodes {
        let status = node.terminate().expect("node stops");
        assert!(status.success(), "node {name} exited with {status}");
    }
    // They said goodbye: the coordinator drops them at once, not at its silence timeout.
    wait_until(Duration::from_secs(5), "the nodes to be gone", || {
        fed.json(&["nodes"]).as_array().is_some_and(Vec::is_empty)
    });
    let status = fed.coordinator.terminate().expect("coordinator stops");
    assert!(status.success(), "coordinator exited with {status}");
}

/// Peers whose certificate does not chain to the federation CA are refused at the handshake,
/// while the federation keeps serving.
#[test]
fn peers_from_another_ca_are_refused() {
    let mut fed = Fed::start();
    fed.add_node("midwest", &[("cps1988", demo_data("midwest"))]);

    // Another CA issues a node and a researcher certificate. They trust both CAs (so their own
    // start-up checks pass and they accept the coordinator), but the coordinator trusts only its own.
    let other = fed.path("other-pki");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(support::bin("fedstat-coordinator"))
            .args(args)
            .arg("--dir")
            .arg(&other)
            .output()
            .expect("pki");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["pki", "init"]);
    run(&["pki", "issue", "--role", "node", "--name", "intruder"]);
    run(&["pki", "issue", "--role", "researcher", "--name", "mallory"]);
    let bundle = fed.path("both-cas.pem");
    let mut pem = std::fs::read_to_string(fed.pki().join("ca.pem")).expect("ca");
    pem.push_str(&std::fs::read_to_string(other.join("ca.pem")).expect("other ca"));
    std::fs::write(&bundle, pem).expect("bundle");

    let cfg = fed.write_node_config("intruder", &other, &bundle, &[("cps1988", demo_data("west"))]);
    let mut intruder = fed.spawn_node_with_config("intruder", &cfg);
    let researcher = fed.write_researcher_config_in("mallory.toml", &other, "mallory", &bundle);
    let out = fed.cli_as(&researcher, &["nodes"]);
    assert!(!out.status.success(), "a foreign researcher must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to the coordinator"), "{err}");

    wait_until(Duration::from_secs(20), "the refusal to be logged", || {
        fed.coordinator.log_text().matches("TLS handshake failed").count() >= 2
    });
    assert!(
        fed.coordinator.log_text().contains("invalid peer certificate"),
        "{}",
        fed.coordinator.log_text()
    );
    // The intruder keeps retrying and is never admitted; the legitimate node is.
    fed.wait_for_nodes(&["midwest"]);
    let nodes = fed.json(&["nodes"]);
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{nodes}");
    assert!(intruder.is_running(), "a refused node keeps retrying");
    wait_until(Duration::from_secs(20), "the intruder to log its refusal", || {
        intruder.log_text().contains("cannot connect")
    });
    let id = fed.submit("logit.toml", &logit_experiment(2, 1, ""));
    let s = fed.wait_finished(id, Duration::from_secs(60));
    assert_eq!(s["state"], "Completed", "{s:#}");
}

/// A node killed in the middle of a round: the round closes on `min_nodes` at its deadline and
/// the experiment completes without it.
#[test]
fn node_stopped_mid_round_round_completes_on_quorum() {
    let mut fed = Fed::start();
    fed.node_policy.push_str(SLOW_TRAINING_POLICY);
    let names = ["midwest", "south", "west"];
    for n in names {
        fed.add_node(n, &[("cps1988", demo_data(n))]);
    }
    fed.wait_for_nodes(&names);
    // Slow local training (batch size 1, many epochs) so that a round lasts long enough to be
    // interrupted.
    // A generous deadline keeps round 1 whole on a loaded machine; round 2 ends at it.
    let toml = logit_experiment(3, 2, "local_epochs = 1000")
        .replace("batch_size = 32", "batch_size = 1")
        .replace("round_timeout_secs = 10", "round_timeout_secs = 15");
    let id = fed.submit(
        "slow.toml",
        &toml.replace("learning_rate = 0.05", "learning_rate = 0.0005"),
    );
    wait_until(Duration::from_secs(60), "round 2 training", || {
        let s = fed.status(id);
        s["rounds_done"] == 1 && s["state"]["Running"]["phase"] == "Train"
    });
    fed.node("west").kill();

    let s = fed.wait_finished(id, Duration::from_secs(90));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let history = s["history"].as_array().expect("history");
    assert_eq!(history[0]["participants"], serde_json::json!(names));
    assert_eq!(
        history[1]["participants"],
        serde_json::json!(["midwest", "south"])
    );
    assert_eq!(
        history[2]["participants"],
        serde_json::json!(["midwest", "south"])
    );
    let ev = events(&s);
    assert!(
        ev.contains("without an answer from west") || ev.contains("node `west` dropped out"),
        "{ev}"
    );
}

/// Updates with the wrong shape or a NaN (and garbage frames) are rejected with a reason, and
/// every round completes with the good nodes.
#[test]
fn bad_updates_are_rejected_and_rounds_complete() {
    let mut fed = Fed::start();
    for n in ["midwest", "south"] {
        fed.add_node(n, &[("cps1988", demo_data(n))]);
    }
    fed.issue("node", "rogue-shape");
    fed.issue("node", "rogue-nan");
    let addr: std::net::SocketAddr = fed.addr.parse().expect("addr");
    let tls = |name: &str| fedstat_net::tls::TlsFiles {
        ca_cert: fed.pki().join("ca.pem"),
        cert: fed.pki().join(format!("{name}.pem")),
        key: fed.pki().join(format!("{name}.key")),
    };
    let rogues = [
        (tls("rogue-shape"), rogue::Misbehaviour::WrongShape),
        (tls("rogue-nan"), rogue::Misbehaviour::NotANumber),
    ];
    let handles: Vec<_> = rogues
        .into_iter()
        .map(|(files, how)| {
            std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().expect("runtime");
                rt.block_on(rogue::run(addr, files, how, "cps1988", Duration::from_secs(25)))
            })
        })
        .collect();
    fed.wait_for_nodes(&["midwest", "south", "rogue-shape", "rogue-nan"]);
    let id = fed.submit("logit.toml", &logit_experiment(3, 2, ""));
    let s = fed.wait_finished(id, Duration::from_secs(60));
    assert_eq!(s["state"], "Completed", "{s:#}");
    for round in s["history"].as_array().expect("history") {
        assert_eq!(
            round["participants"],
            serde_json::json!(["midwest", "south"]),
            "{round}"
        );
    }
    let ev = events(&s);
    assert!(
        ev.contains("rejected answer from `rogue-shape`: wrong shape"),
        "{ev}"
    );
    assert!(
        ev.contains("rejected answer from `rogue-nan`: update rejected: value 2 is not finite"),
        "{ev}"
    );
    // The rogues were told why, and the coordinator is still serving.
    let told: Vec<Vec<String>> = handles
        .into_iter()
        .map(|h| h.join().expect("rogue thread"))
        .collect();
    assert!(told[0].iter().any(|r| r.contains("wrong shape")), "{told:?}");
    assert!(told[1].iter().any(|r| r.contains("value 2")), "{told:?}");
    assert!(fed.coordinator.is_running());
    fed.wait_for_nodes(&["midwest", "south"]);
}

/// Each malformed file gives the researcher an error naming the dataset, the column and the
/// kind of problem, and nothing else: no file name, path, line number, count, header list or
/// value (that would be an oracle for where a person's row is). The node's own log names the
/// file, the line and the column for its custodian. The node keeps serving.
#[test]
fn dirty_files_are_reported_by_column_to_researchers_and_by_line_to_custodians() {
    // (file, what the researcher sees, what the node's log says); bom_crlf.csv is valid.
    let cases = [
        (
            "missing_values.csv",
            "column `wage`: a value is empty",
            "line 6, column `wage`",
        ),
        (
            "non_numeric.csv",
            "column `education`: a value is not a number",
            "line 4, column `education`",
        ),
        (
            "extra_column.csv",
            "a row has a different number of fields than the header",
            "line 7, column `(beyond the header)`",
        ),
        (
            "short_row.csv",
            "column `parttime`: a row has a different number of fields",
            "line 8, column `parttime`",
        ),
        (
            "unknown_category.csv",
            "column `parttime`: a value is not one of the levels listed",
            "line 10, column `parttime`",
        ),
        (
            "nonfinite_values.csv",
            "column `wage`: a value is not a finite number",
            "line 3, column `wage`",
        ),
        (
            "wrong_header.csv",
            "column `education`: the dataset has no such column",
            "line 1, column `education`",
        ),
        ("empty.csv", "the file is empty", "line 1, column `(header)`"),
        (
            "header_only.csv",
            "the file has no data rows",
            "line 2, column `(first data row)`",
        ),
        ("bom_crlf.csv", "", ""),
    ];
    let forbidden = [
        "twelve",
        "1O",
        "$354.94",
        "north-east",
        "YES",
        "validation",
        "inf",
        "NaN",
        "-120.5",
        "1e309",
        ".csv",
        "line",
        "found",
        "header has",
        "/",
    ];
    let mut fed = Fed::start();
    // One researcher runs all ten experiments at once.
    fed.reconfigure_coordinator("[limits]\nmax_experiments_per_researcher = 10\n");
    let dirty: Vec<(String, std::path::PathBuf)> = cases
        .iter()
        .map(|(file, _, _)| (file.replace(".csv", ""), dirty_data(file)))
        .collect();
    let clean: Vec<(String, std::path::PathBuf)> = cases
        .iter()
        .map(|(file, _, _)| (file.replace(".csv", ""), demo_data("northeast")))
        .collect();
    // Tiny files: let the valid 20-row one through the saturation and cell rules, which are
    // tested on their own; this test is about malformed files.
    fed.add_node_with(
        "dirty",
        &as_refs(&dirty),
        "[policy]\nmin_rows_per_param = 1\nmin_cell = 1\n",
    );
    fed.add_node("clean", &as_refs(&clean));
    fed.wait_for_nodes(&["dirty", "clean"]);
    let ids: Vec<u64> = cases
        .iter()
        .map(|(file, _, _)| {
            let ds = file.replace(".csv", "");
            let toml =
                logit_experiment(1, 1, "").replace("dataset = \"cps1988\"", &format!("dataset = \"{ds}\""));
            fed.submit(&format!("{ds}.toml"), &toml)
        })
        .collect();
    for ((file, public, local), id) in cases.iter().zip(ids) {
        let s = fed.wait_finished(id, Duration::from_secs(60));
        assert_eq!(s["state"], "Completed", "{file}: {s:#}");
        let participants = &s["history"][0]["participants"];
        let ev = events(&s);
        if public.is_empty() {
            assert_eq!(
                participants,
                &serde_json::json!(["clean", "dirty"]),
                "{file}: {ev}"
            );
            continue;
        }
        assert_eq!(participants, &serde_json::json!(["clean"]), "{file}: {ev}");
        let reported = ev
            .lines()
            .find(|l| l.contains("node `dirty` could not do statistics"))
            .unwrap_or_else(|| panic!("{file}: no failure reported: {ev}"));
        let ds = file.replace(".csv", "");
        assert!(
            reported.contains(&format!("dataset `{ds}`: {public}")),
            "{file}: {reported}"
        );
        let after_round = reported
            .split_once("could not do statistics:")
            .map_or(reported, |(_, r)| r);
        for v in forbidden {
            assert!(
                !after_round.contains(v),
                "{file}: the report leaks {v:?}: {reported}"
            );
        }
        assert!(
            !after_round.chars().any(|c| c.is_ascii_digit()),
            "{file}: the report has a number: {reported}"
        );
        let node_log = fed.node("dirty").log_text();
        assert!(
            node_log.contains(&format!("{file}: {local}")),
            "{file}: the node's log should name the file, line and column: {node_log}"
        );
    }
    // Still up, still connected, and it served the valid file.
    assert!(fed.node("dirty").is_running());
    fed.wait_for_nodes(&["dirty", "clean"]);
    let log = fed.coordinator.log_text();
    for v in ["twelve", "$354.94", "north-east", "validation", "-120.5", "1e309"] {
        assert!(!log.contains(v), "the coordinator's log holds the value {v:?}");
    }
}
