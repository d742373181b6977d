//! The TCP fallback for networks that block UDP: full experiments over TLS-over-TCP give the
//! bit-identical model of QUIC, `auto` falls back when the QUIC listener is off, and TCP
//! refuses the same peers QUIC does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{an_office_joins_despite_the_flood, demo_data, logit_experiment, wait_until, Fed};

const OFFICES: [&str; 3] = ["midwest", "south", "west"];

/// A federation whose nodes and researcher use `transport` (None: the default, `auto`).
fn offices(coordinator_extra: &str, transport: Option<&str>) -> Fed {
    let mut fed = Fed::start_with(coordinator_extra);
    if let Some(t) = transport {
        fed.set_transport(t);
    }
    for region in OFFICES {
        fed.add_node(region, &[("cps1988", demo_data(region))]);
    }
    fed.wait_for_nodes(&OFFICES);
    fed
}

/// Run the logit experiment and return the raw bytes of its final parameters.
fn final_parameters(fed: &Fed) -> Vec<u8> {
    let id = fed.submit("logit.toml", &logit_experiment(5, 3, ""));
    let s = fed.wait_finished(id, Duration::from_secs(180));
    assert_eq!(s["state"], "Completed", "{s:#}");
    assert_eq!(s["rounds_done"], 5);
    let out = fed.path("results");
    let r = fed.cli(&["results", &id.to_string(), "--out", out.to_str().expect("utf-8")]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    std::fs::read(out.join("parameters.bin")).expect("parameters.bin")
}

/// Every node and the researcher on `transport = "tcp"`: the experiment completes with the
/// same model, bit for bit, as over QUIC (the engine is deterministic).
#[test]
fn an_experiment_over_tcp_ends_with_the_model_of_quic() {
    let over_quic = {
        let fed = offices("", Some("quic"));
        final_parameters(&fed)
    };
    let fed = offices("", Some("tcp"));
    let over_tcp = final_parameters(&fed);
    assert_eq!(over_tcp.len(), 7 * 8);
    assert_eq!(
        over_tcp, over_quic,
        "TCP and QUIC runs must give the same parameters"
    );
    for (name, node) in &fed.nodes {
        let log = node.log_text();
        assert!(
            log.contains("connected to the coordinator") && log.contains("transport=\"tcp\""),
            "node {name}: {log}"
        );
        assert!(!log.contains("falling back"), "node {name}: {log}");
    }
}

/// The coordinator's QUIC listener is off (as if UDP were dropped): nodes and the researcher
/// on the default `auto` get no QUIC answer, say so, and work over TCP on the same port.
#[test]
fn auto_falls_back_to_tcp_when_quic_gets_no_answer() {
    let fed = offices("quic = false", None);
    let id = fed.submit("logit.toml", &logit_experiment(2, 3, ""));
    let s = fed.wait_finished(id, Duration::from_secs(180));
    assert_eq!(s["state"], "Completed", "{s:#}");
    assert!(
        fed.coordinator.log_text().contains("TCP only"),
        "{}",
        fed.coordinator.log_text()
    );
    for (name, node) in &fed.nodes {
        let log = node.log_text();
        assert!(
            log.contains("falling back to TCP") && log.contains(&fed.addr),
            "node {name}: {log}"
        );
        assert!(log.contains("transport=\"tcp\""), "node {name}: {log}");
    }
    let out = fed.cli(&["nodes"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("falling back to TCP"), "{err}");
}

/// Over TCP, a peer without a client certificate is refused at the TLS handshake, a
/// certificate from another CA too, and a node certificate cannot act as a researcher.
#[test]
fn tcp_refuses_strangers_and_node_certificates_as_researchers() {
    let fed = Fed::start_with("quic = false");
    let addr: SocketAddr = fed.addr.parse().expect("addr");

    // No client certificate: the TLS handshake fails at the coordinator, and the first read
    // at the client sees the connection end.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let outcome = rt.block_on(no_certificate_request(addr, &fed.pki().join("ca.pem")));
    assert!(
        outcome.is_err(),
        "a peer without a certificate must be refused: {outcome:?}"
    );
    wait_until(Duration::from_secs(10), "the refusal to be logged", || {
        fed.coordinator.log_text().contains("TLS handshake failed")
    });

    // A node certificate used for researcher requests, over TCP.
    fed.issue("node", "sneaky");
    let mut cfg = std::fs::read_to_string(fed.write_researcher_config(
        "sneaky.toml",
        "sneaky",
        &fed.pki().join("ca.pem"),
    ))
    .expect("config");
    cfg = cfg.replacen("server_name", "transport = \"tcp\"\nserver_name", 1);
    let path = fed.path("sneaky.toml");
    std::fs::write(&path, cfg).expect("write");
    let out = fed.cli_as(&path, &["nodes"]);
    assert!(
        !out.status.success(),
        "a node certificate must not act as researcher"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node certificate"), "{err}");
}

/// Dial the coordinator over TCP with TLS but no client certificate and try one request.
async fn no_certificate_request(addr: SocketAddr, ca: &std::path::Path) -> Result<usize, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![fedstat_net::tls::ALPN.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // With TLS 1.3 the server judges our (missing) certificate after we think we are done.
    let _ = stream.write_all(b"\x00\x00\x00\x01\x00").await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
        Ok(Ok(0)) => Err("connection closed".into()),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Ok(0),
    }
}

/// SIGHUP after a revocation closes the revoked node's TCP connection too, with the reason,
/// and its reconnects over TCP are refused at the handshake.
#[test]
fn revoked_nodes_are_disconnected_over_tcp() {
    let mut fed = Fed::start_with("quic = false");
    fed.set_transport("tcp");
    for region in ["midwest", "west"] {
        fed.add_node(region, &[("cps1988", demo_data(region))]);
    }
    fed.wait_for_nodes(&["midwest", "west"]);
    let out = std::process::Command::new(crate::support::bin("fedstat-coordinator"))
        .args(["pki", "revoke", "--name", "west", "--dir"])
        .arg(fed.pki())
        .output()
        .expect("revoke");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pid = fed.coordinator.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    wait_until(Duration::from_secs(20), "west to be disconnected", || {
        fed.json(&["nodes"])
            .as_array()
            .is_some_and(|a| a.iter().all(|n| n["name"] != "west"))
    });
    let log = fed.coordinator.log_text();
    assert!(log.contains("certificate revoked: disconnecting"), "{log}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !fed
        .coordinator
        .log_text()
        .contains("invalid peer certificate: Revoked")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no refused reconnect:\n{}\n---\n{}",
            fed.coordinator.log_text(),
            fed.node("west").log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let west = fed.node("west").log_text();
    assert!(west.contains("closed by peer: certificate revoked"), "{west}");
    assert!(fed.node("midwest").is_running());
    let nodes = fed.json(&["nodes"]);
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{nodes}");
}

/// The coordinator's handshake caps apply to TCP: a flood of TCP connections from one address
/// that never start TLS is refused at the per-address limit, and an office over TCP still
/// gets in and works.
#[test]
fn a_tcp_flood_from_one_address_is_capped_and_an_office_gets_in() {
    let mut fed = Fed::start();
    fed.reconfigure_coordinator(
        "[limits]\nmax_handshakes = 16\nmax_handshakes_per_address = 8\nhandshake_timeout_secs = 30\n",
    );
    fed.set_transport("tcp");
    let addr: SocketAddr = fed.addr.parse().expect("addr");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // 100 connections from 127.0.0.2 that say nothing, held open for the whole test.
    let flood: Vec<tokio::net::TcpStream> = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..100 {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind("127.0.0.2:0".parse().expect("addr")).expect("bind");
            if let Ok(s) = socket.connect(addr).await {
                held.push(s);
            }
        }
        held
    });
    assert!(!flood.is_empty());
    an_office_joins_despite_the_flood(&mut fed);
    let id = fed.submit("logit.toml", &logit_experiment(1, 1, ""));
    let s = fed.wait_finished(id, Duration::from_secs(60));
    assert_eq!(s["state"], "Completed", "{s:#}");
    drop(flood);
}
