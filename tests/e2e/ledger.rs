//! The privacy-budget ledger and the accountant, end to end with the real binaries: a node
//! with a small budget takes one differentially private experiment, refuses a second that would
//! exceed its budget, and after a restart still shows the spend and still refuses;
//! `fedstat privacy epsilon` agrees with the dp-accounting fixture and names a bad flag.
//!
//! The node charges what it releases whether or not the DP-SGD mechanism is in the build: this
//! test relies on the ledger (admission, charge, restart), not on the noise.

use std::path::Path;
use std::time::Duration;

use fedstat_core::accountant::CostExt;
use fedstat_proto::privacy::PrivacyCost;
use serde_json::Value;

use crate::support::{demo_data, events, logit_experiment, run_bin, Fed};

/// Per round: local_epochs = 1 at q = 0.01, so 100 steps of σ = 1.1.
const PER_ROUND: PrivacyCost = PrivacyCost {
    sampling_rate: 0.01,
    noise_multiplier: 1.1,
    steps: 100,
};

fn epsilon_of_rounds(rounds: u64) -> f64 {
    PER_ROUND
        .rdp()
        .expect("rdp")
        .times(rounds)
        .epsilon(1e-5)
        .expect("epsilon")
        .0
}

fn dp_experiment(name: &str) -> String {
    let mut text = logit_experiment(2, 1, "local_epochs = 1\n").replace("e2e logit", name);
    text.push_str(
        "[privacy]\nnoise_multiplier = 1.1\nsampling_rate = 0.01\nclip_norm = 1.0\ndelta = 1e-5\n\
         bounds = [{ column = \"education\", lower = 0, upper = 20 }, \
         { column = \"experience\", lower = -5, upper = 65 }]\n",
    );
    text
}

fn budget(config: &Path) -> Value {
    let out = run_bin(
        "fedstat-node",
        &["budget", "--config", &config.display().to_string(), "--json"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("budget JSON")
}

fn cps(v: &Value) -> &Value {
    v["datasets"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["dataset"] == "cps1988"))
        .expect("cps1988 in the budget")
}

const REFUSAL: &str = "node `ons` could not do training: refused by site policy: privacy budget: \
                       the experiment would exceed this dataset's budget (policy.privacy.epsilon)";

#[test]
fn a_node_refuses_what_would_exceed_its_budget_also_after_a_restart() {
    // Room for two rounds, not for four.
    let limit = (epsilon_of_rounds(2) + epsilon_of_rounds(4)) / 2.0;
    let mut fed = Fed::start();
    let ons = fed.add_node_with(
        "ons",
        &[("cps1988", demo_data("midwest"))],
        &format!("[policy]\n[policy.privacy]\nepsilon = {limit}\ndelta = 1e-5\nshow_remaining = true\n"),
    );
    // An office without a budget: charged, never limited, so the experiments still complete.
    fed.add_node("open", &[("cps1988", demo_data("south"))]);
    fed.wait_for_nodes(&["ons", "open"]);

    let first = fed.submit("dp1.toml", &dp_experiment("dp one"));
    let s = fed.wait_finished(first, Duration::from_secs(120));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let spent = budget(&ons);
    let d = cps(&spent);
    let charges = d["charges"].as_u64().expect("charges");
    assert!(charges >= 2, "{spent:#}");
    let want = epsilon_of_rounds(charges);
    let got = d["spent_epsilon"].as_f64().expect("spent");
    assert!((got - want).abs() <= 1e-9 * want, "{got} vs {want}");
    assert_eq!(d["budget_epsilon"].as_f64(), Some(limit));
    assert!((d["remaining_epsilon"].as_f64().expect("remaining") - (limit - got)).abs() < 1e-9);
    assert_eq!(d["experiments"][0]["experiment"], first, "{spent:#}");

    // The ledger is in the audit log, charge by charge, before each update.
    let log = std::fs::read_to_string(fed.node_audit_log("ons")).expect("audit log");
    let kinds: Vec<String> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("record")["kind"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    let charge = kinds
        .iter()
        .position(|k| k == "privacy_charge")
        .expect("a privacy_charge record");
    assert_eq!(kinds[charge + 1], "update_sent", "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| *k == "privacy_charge").count() as u64,
        charges
    );

    // A second experiment of the same cost would exceed: `ons` refuses, naming the rule only.
    let second = fed.submit("dp2.toml", &dp_experiment("dp two"));
    let s = fed.wait_finished(second, Duration::from_secs(120));
    let ev = events(&s);
    assert!(ev.contains(REFUSAL), "missing `{REFUSAL}` in:\n{ev}");
    assert!(
        !ev.contains(&format!("{limit}")),
        "no figures leave the node: {ev}"
    );
    assert_eq!(cps(&budget(&ons))["charges"].as_u64(), Some(charges));

    // After a restart the spend is still there, and still refuses.
    fed.restart_node("ons");
    fed.wait_for_nodes(&["ons", "open"]);
    let after = budget(&ons);
    assert_eq!(cps(&after)["spent_epsilon"], d["spent_epsilon"], "{after:#}");
    let third = fed.submit("dp3.toml", &dp_experiment("dp three"));
    let s = fed.wait_finished(third, Duration::from_secs(120));
    let ev = events(&s);
    assert!(ev.contains(REFUSAL), "missing `{REFUSAL}` in:\n{ev}");

    // The text form names the budget, the spend and each experiment.
    let out = run_bin(
        "fedstat-node",
        &["budget", "--config", &ons.display().to_string()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("dataset `cps1988`: budget epsilon"), "{text}");
    assert!(text.contains(&format!("experiment {first}: spent")), "{text}");
}

#[test]
fn privacy_epsilon_agrees_with_dp_accounting_and_names_bad_flags() {
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(crate::support::repo().join("tests/data/dp-accounting-reference.json"))
            .expect("fixture"),
    )
    .expect("fixture JSON");
    let row = fixture["configurations"]
        .as_array()
        .expect("configurations")
        .iter()
        .find(|r| r["sampling_rate"] == 0.01 && r["steps"] == 10000)
        .expect("a DP-SGD row");
    let arg = |k: &str| row[k].to_string();
    let out = run_bin(
        "fedstat",
        &[
            "privacy",
            "epsilon",
            "--sampling-rate",
            &arg("sampling_rate"),
            "--noise-multiplier",
            &arg("noise_multiplier"),
            "--steps",
            &arg("steps"),
            "--delta",
            &arg("delta"),
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let (e, want) = (
        got["epsilon"].as_f64().expect("epsilon"),
        row["epsilon"].as_f64().expect("epsilon"),
    );
    assert!((e - want).abs() <= 1e-6 * want, "{e} vs {want}");
    assert_eq!(got["order"], row["order"]);
    for k in ["sampling_rate", "noise_multiplier", "steps", "delta"] {
        assert_eq!(got[k], row[k], "{k}");
    }

    for (flag, value) in [
        ("--sampling-rate", "0"),
        ("--sampling-rate", "1.5"),
        ("--noise-multiplier", "0"),
        ("--steps", "0"),
        ("--delta", "1"),
    ] {
        let mut args = [
            ("--sampling-rate", "0.01"),
            ("--noise-multiplier", "1.1"),
            ("--steps", "100"),
            ("--delta", "1e-5"),
        ];
        for a in args.iter_mut().filter(|a| a.0 == flag) {
            a.1 = value;
        }
        let mut argv = vec!["privacy", "epsilon"];
        argv.extend(args.iter().flat_map(|(k, v)| [*k, *v]));
        let out = run_bin("fedstat", &argv);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(flag),
            "{flag} {value}: {err}"
        );
    }
}
