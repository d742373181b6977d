//! The coordinator binaries' offline commands: PKI set-up and config errors.

use std::process::Command;

#[test]
fn pki_init_and_issue_write_certificates_and_refuse_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let coord = env!("CARGO_BIN_EXE_fedstat-coordinator");
    let ok = |args: &[&str]| {
        let out = Command::new(coord)
            .args(args)
            .arg("--dir")
            .arg(&pki)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&["pki", "init"]);
    ok(&["pki", "issue", "--role", "node", "--name", "ons"]);
    ok(&["pki", "issue", "--role", "researcher", "--name", "alice"]);
    for f in [
        "ca.pem",
        "ca.key",
        "coordinator.pem",
        "coordinator.key",
        "ons.pem",
        "ons.key",
        "alice.pem",
    ] {
        assert!(pki.join(f).is_file(), "{f} missing");
    }
    let again = Command::new(coord)
        .args(["pki", "init", "--dir"])
        .arg(&pki)
        .output()
        .expect("run");
    assert!(!again.status.success(), "init must not overwrite a CA");
    let bad = Command::new(coord)
        .args(["pki", "issue", "--role", "wizard", "--name", "x", "--dir"])
        .arg(&pki)
        .output()
        .expect("run");
    assert!(!bad.status.success());
}

#[test]
fn researcher_cli_without_config_says_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_fedstat"))
        .current_dir(dir.path())
        .arg("nodes")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("researcher.toml") && err.contains("--config"),
        "{err}"
    );
}
