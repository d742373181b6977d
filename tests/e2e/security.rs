//! Roles and certificates: every refusal is a clear error to the caller and an audit record,
//! while a legitimate experiment in the same federation completes.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fedstat_net::transport::{read_frame, write_frame};
use fedstat_proto::wire::{Request, Response, PROTOCOL_VERSION};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::support::{
    bin, demo_data, events, logit_experiment, raw_client, wait_until, write_key, Fed, SLOW_TRAINING_POLICY,
};

/// Connect and make a request; Err(reason) when the coordinator refuses.
fn try_request(addr: SocketAddr, cfg: quinn::ClientConfig) -> Result<Response, String> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("endpoint");
        endpoint.set_default_client_config(cfg);
        let conn = endpoint
            .connect(addr, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(
            &mut send,
            &Request::Hello {
                protocol: PROTOCOL_VERSION,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        let _ = send.finish();
        let r = read_frame::<Response>(&mut recv, "response")
            .await
            .map_err(|e| e.to_string())?;
        r.ok_or_else(|| "no answer".to_owned())
    })
}

/// A node certificate that expired in 2020, signed by the federation CA.
fn expired_node_cert(
    pki: &Path,
) -> (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    String,
    String,
) {
    let ca_pem = std::fs::read_to_string(pki.join("ca.pem")).expect("ca.pem");
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).expect("ca.key"))
        .expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "stale");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, "node");
    params.not_before = rcgen::date_time_ymd(2019, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let chain = vec![cert.der().clone()];
    let key_der = PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    (chain, key_der, cert.pem(), key.serialize_pem())
}

fn audit_kinds(fed: &Fed) -> String {
    std::fs::read_to_string(fed.path("data/audit.jsonl")).unwrap_or_default()
}

#[test]
fn wrong_certificates_and_roles_are_refused_and_audited() {
    let mut fed = Fed::start();
    fed.node_policy.push_str(SLOW_TRAINING_POLICY);
    for n in ["midwest", "south", "west"] {
        fed.add_node(n, &[("cps1988", demo_data(n))]);
    }
    fed.wait_for_nodes(&["midwest", "south", "west"]);
    // Slow local training: the experiment runs while the attacks below happen.
    let toml = logit_experiment(30, 2, "local_epochs = 400").replace("batch_size = 32", "batch_size = 1");
    let id = fed.submit("logit.toml", &toml);
    let addr: SocketAddr = fed.addr.parse().expect("addr");
    let ca = fed.pki().join("ca.pem");

    // No client certificate at all.
    let err = try_request(addr, raw_client(&ca, None)).expect_err("no certificate must be refused");
    assert!(err.contains("certificate"), "{err}");

    // An expired certificate from the right CA: refused by the coordinator, and the node binary
    // refuses to start with it, saying why.
    let (chain, key, cert_pem, key_pem) = expired_node_cert(&fed.pki());
    let err = try_request(addr, raw_client(&ca, Some((chain, key)))).expect_err("expired must be refused");
    assert!(err.to_lowercase().contains("expired"), "{err}");
    let stale = fed.path("stale");
    std::fs::create_dir_all(&stale).expect("mkdir");
    std::fs::write(stale.join("stale.pem"), cert_pem).expect("write");
    write_key(&stale.join("stale.key"), &key_pem);
    let cfg = fed.write_node_config("stale", &stale, &ca, &[("cps1988", demo_data("west"))]);
    let out = Command::new(bin("fedstat-node"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("expired"), "{err}");

    // A node certificate may not submit experiments.
    fed.issue("node", "sneaky");
    let sneaky = fed.write_researcher_config("sneaky.toml", "sneaky", &ca);
    let experiment = fed.path("logit.toml");
    let out = fed.cli_as(&sneaky, &["submit", experiment.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node certificate"), "{err}");

    // A researcher certificate may not join rounds.
    let cfg = fed.write_node_config("alice", &fed.pki(), &ca, &[("cps1988", demo_data("west"))]);
    let mut alice_node = fed.spawn_node_with_config("alice-as-node", &cfg);
    wait_until(Duration::from_secs(20), "the researcher-as-node refusal", || {
        alice_node.log_text().contains("cannot take part in rounds")
    });
    alice_node.kill();

    // Revoking a connected node disconnects it at once and keeps it out.
    let out = Command::new(bin("fedstat-coordinator"))
        .args(["pki", "revoke", "--name", "west", "--dir"])
        .arg(fed.pki())
        .output()
        .expect("revoke");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pid = fed.coordinator.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    wait_until(Duration::from_secs(20), "west to be disconnected", || {
        let nodes = fed.json(&["nodes"]);
        nodes
            .as_array()
            .is_some_and(|a| a.iter().all(|n| n["name"] != "west"))
    });
    wait_until(Duration::from_secs(20), "a refused reconnect", || {
        fed.coordinator.log_text().contains("CertRevoked") || fed.coordinator.log_text().contains("revoked")
    });
    assert!(
        fed.node("west").is_running(),
        "a revoked node keeps trying, and is refused each time"
    );

    // The legitimate experiment completed, with the legitimate nodes.
    let s = fed.wait_finished(id, Duration::from_secs(120));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let last = s["history"]
        .as_array()
        .and_then(|h| h.last())
        .expect("rounds")
        .clone();
    assert_eq!(
        last["participants"],
        serde_json::json!(["midwest", "south"]),
        "{}",
        events(&s)
    );

    // Every refusal left an audit record, and the chain is intact.
    let audit = audit_kinds(&fed);
    for kind in [
        "\"connection_refused\"",
        "\"request_refused\"",
        "\"peer_revoked\"",
    ] {
        assert!(audit.contains(kind), "no {kind} in the audit log:\n{audit}");
    }
    let out = Command::new(bin("fedstat-coordinator"))
        .args(["audit", "verify", "--file"])
        .arg(fed.path("data/audit.jsonl"))
        .output()
        .expect("verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn admins_cancel_and_disconnect_researchers_cannot() {
    let mut fed = Fed::start();
    fed.node_policy.push_str(SLOW_TRAINING_POLICY);
    fed.add_node("midwest", &[("cps1988", demo_data("midwest"))]);
    fed.wait_for_nodes(&["midwest"]);
    fed.issue("researcher", "bob");
    fed.issue("admin", "root");
    let ca = fed.pki().join("ca.pem");
    let bob = fed.write_researcher_config("bob.toml", "bob", &ca);
    let root = fed.write_researcher_config("root.toml", "root", &ca);
    // Slow enough to still be running when cancelled.
    let toml = logit_experiment(200, 1, "local_epochs = 200");
    std::fs::write(fed.path("long.toml"), toml).expect("write");
    let out = fed.cli_as(
        &bob,
        &["--json", "submit", fed.path("long.toml").to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = id["experiment"].as_u64().expect("id").to_string();

    let out = fed.cli(&["cancel", &id]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Someone else's experiment is refused as if it did not exist.
    assert!(
        err.contains(&format!("no experiment {id} visible to researcher `alice`")),
        "{err}"
    );
    let out = fed.cli(&["disconnect", "midwest"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only an admin"));

    let out = fed.cli_as(&root, &["cancel", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = fed.cli_as(&root, &["--json", "status", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(s[0]["state"]["Cancelled"]["by"], "admin `root`", "{s:#}");
    let out = fed.cli_as(&root, &["disconnect", "midwest"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Not revoked: the node comes back by itself.
    wait_until(Duration::from_secs(30), "midwest to reconnect", || {
        fed.coordinator
            .log_text()
            .matches("node connected node=midwest")
            .count()
            >= 2
    });
    assert!(audit_kinds(&fed).contains("\"admin_action\""));
}
