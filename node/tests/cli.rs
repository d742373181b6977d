//! The `fedstat-node` binary's offline commands: an office checks its own files before joining.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn check(csv: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "coordinator = \"localhost:4433\"\nserver_name = \"localhost\"\n[tls]\nca_cert = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n.key\"\n\
             [datasets]\ncps1988 = \"{}\"\n",
            repo().join(csv).display()
        ),
    )
    .expect("write config");
    Command::new(env!("CARGO_BIN_EXE_fedstat-node"))
        .args(["check", "--config"])
        .arg(&cfg)
        .arg("--experiment")
        .arg(repo().join("configs/experiment-logit.toml"))
        .output()
        .expect("run fedstat-node")
}

#[test]
fn check_reports_rows_of_a_clean_file() {
    let out = check("configs/demo/cps1988/south.csv");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("7008 train rows, 1752 test rows"), "{text}");
}

#[test]
fn check_names_file_line_and_column_of_a_bad_cell() {
    let out = check("tests/data/cps1988-dirty/non_numeric.csv");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("non_numeric.csv: line 4, column `education`"),
        "{err}"
    );
    assert!(!err.contains("twelve"), "{err}");
}

#[test]
fn run_refuses_a_config_with_unknown_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("node.toml");
    std::fs::write(&cfg, "coordinator = \"x:1\"\nport = 3\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_fedstat-node"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("port"));
}
