//! `fedstat-node check`, run as the real binary: what a custodian writing a site policy sees
//! for an experiment, with no network.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn check(policy: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("office.toml");
    let data = repo().join("configs/demo/cps1988/midwest.csv");
    std::fs::write(
        &cfg,
        format!(
            "coordinator = \"localhost:4433\"\nserver_name = \"localhost\"\n\
             [tls]\nca_cert = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n.key\"\n\
             [datasets]\ncps1988 = {:?}\n[policy]\n{policy}",
            data.display().to_string()
        ),
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_fedstat-node"))
        .args(["check", "--config"])
        .arg(&cfg)
        .arg("--experiment")
        .arg(repo().join("configs/experiment-logit.toml"))
        .output()
        .expect("run fedstat-node check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn check_writes_the_missing_policy_lines_then_runs_the_disclosure_rules() {
    let report = check("allowed_targets = [\"wage\"]\n");
    for line in [
        "the site policy does not list every column this experiment uses",
        "  allowed_features = [\"education\", \"ethnicity\", \"experience\", \"parttime\", \"smsa\"]",
        "site policy: REFUSED: column `education` is not allowed as a feature (policy.allowed_features)",
        "disclosure rules (rows, cells): pass",
        "differencing against what this node released before: pass",
    ] {
        assert!(report.contains(line), "{line:?} missing from:\n{report}");
    }
    assert!(!report.contains("allowed_targets ="), "{report}");

    let report = check(
        "allowed_targets = [\"wage\"]\nallowed_features = [\"*\"]\nmin_cell = 100000\nmin_batch_size = 10\n",
    );
    assert!(report.contains("site policy: allowed"), "{report}");
    assert!(
        report.contains("disclosure rules: REFUSED: the training split has too few rows (policy.min_cell)"),
        "{report}"
    );
}
