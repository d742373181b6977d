//! The custodian's offline commands: `pending`, `approve`, `reject` and `audit verify`, run as
//! the real binary against a node's state folder (no network).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fedstat_core::audit::{AuditEvent, AuditLog};
use fedstat_node::approval::ApprovalStore;
use fedstat_node::config::NodeConfig;
use fedstat_proto::manifest::Manifest;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn node(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedstat-node"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run fedstat-node")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn setup() -> (tempfile::TempDir, PathBuf, NodeConfig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("office.toml");
    std::fs::write(
        &cfg,
        "coordinator = \"localhost:4433\"\nserver_name = \"localhost\"\n[tls]\nca_cert = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n.key\"\n\
         [policy]\napproval = \"manual\"\n",
    )
    .expect("write config");
    let loaded = NodeConfig::load(&cfg).expect("config");
    (dir, cfg, loaded)
}

fn hold(cfg: &NodeConfig, purpose: &str) -> String {
    let mut spec =
        fedstat_core::spec::from_toml_file(&repo().join("configs/experiment-logit.toml")).expect("spec");
    spec.purpose = purpose.to_owned();
    let m = Manifest::new(&spec, "researcher `alice`");
    ApprovalStore::new(&cfg.state_dir)
        .hold(&m.hash(), &m.canonical_json())
        .expect("hold");
    m.hash()
}

#[test]
fn pending_approve_and_reject_work_on_the_state_folder() {
    let (dir, cfg_path, cfg) = setup();
    assert_eq!(cfg.state_dir, dir.path().join("office-state"));
    let out = node(&["pending"], &cfg_path);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no manifests are held"), "{}", text(&out));

    let a = hold(&cfg, "first purpose");
    let b = hold(&cfg, "second purpose");
    let out = node(&["pending"], &cfg_path);
    let listing = text(&out);
    assert!(listing.contains(&format!("manifest {a}")) && listing.contains(&format!("manifest {b}")));
    assert!(listing.contains("purpose:    first purpose"), "{listing}");
    assert!(listing.contains("submitter:  researcher `alice`"), "{listing}");

    let out = node(&["approve", &a[..8]], &cfg_path);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("approved manifest {a}")));
    let out = node(&["reject", &b, "--reason", "purpose too broad"], &cfg_path);
    assert!(out.status.success(), "{}", text(&out));
    let store = ApprovalStore::new(&cfg.state_dir);
    assert!(store.pending().expect("list").is_empty());
    assert_eq!(
        store.decision(&b).expect("read").map(|d| d.reason),
        Some("purpose too broad".into())
    );

    // Unknown and malformed hashes are refused with an explanation.
    let out = node(&["approve", "deadbeefdeadbeef"], &cfg_path);
    assert!(!out.status.success());
    assert!(text(&out).contains("no held manifest matches"), "{}", text(&out));
    let out = node(&["approve", "xyz"], &cfg_path);
    assert!(!out.status.success());
    assert!(text(&out).contains("not a manifest hash"), "{}", text(&out));
}

#[test]
fn audit_verify_exits_non_zero_on_tampering() {
    let (_dir, cfg_path, cfg) = setup();
    let mut log = AuditLog::open(&cfg.audit_log).expect("open");
    for round in 1..=4 {
        log.append(&AuditEvent::UpdateSent {
            experiment: 1,
            round,
            manifest: "m".into(),
            rows: 50,
            bytes: 8,
            sha256: "s".into(),
        })
        .expect("append");
    }
    drop(log);
    let out = node(&["audit", "verify"], &cfg_path);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("OK: 4 records"), "{}", text(&out));

    let original = std::fs::read_to_string(&cfg.audit_log).expect("read");
    std::fs::write(&cfg.audit_log, original.replacen("\"rows\":50", "\"rows\":51", 1)).expect("edit");
    let out = node(&["audit", "verify"], &cfg_path);
    assert!(!out.status.success());
    assert!(text(&out).contains("TAMPERED: line 1 (seq 1)"), "{}", text(&out));

    let file = cfg.audit_log.to_str().expect("utf-8");
    let out = Command::new(env!("CARGO_BIN_EXE_fedstat-node"))
        .args(["audit", "verify", "--file", file])
        .output()
        .expect("run");
    assert!(!out.status.success());
}
