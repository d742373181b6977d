//! The IT security review's findings, end to end: one coordinator per store, keys generated
//! where they are used, nodes and researchers checking who the coordinator is.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::support::{an_office_joins_despite_the_flood, bin, demo_data, run_bin, wait_until, Fed};

/// Every file under `dir` with its bytes, sorted by path.
fn snapshot(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read");
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_second_coordinator_on_the_same_store_exits_before_writing() {
    let fed = Fed::start();
    // Something in the store and the audit log: a researcher request.
    fed.json(&["nodes"]);
    let data = fed.path("data");
    let before = snapshot(&data);
    assert!(
        before
            .iter()
            .any(|(p, b)| p.ends_with("audit.jsonl") && !b.is_empty()),
        "the first coordinator wrote no audit record"
    );

    let out = Command::new(bin("fedstat-coordinator"))
        .args(["run", "--config"])
        .arg(fed.path("coordinator.toml"))
        .output()
        .expect("run second coordinator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second coordinator started: {stderr}");
    assert!(
        stderr.contains("data folder") && stderr.contains("in use by another process"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
    assert_eq!(
        snapshot(&data),
        before,
        "the refused coordinator changed the store"
    );

    // The first one is unaffected.
    fed.json(&["nodes"]);
}

const ECHO: &str = "name = \"echo\"\nmodel = \"echo\"\nrounds = 2\nmin_nodes = 1\nround_timeout_secs = 20\n\
                    [echo]\nparams = 1000\n";

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

fn run_ok(bin_name: &str, args: &[&str]) -> String {
    let out = run_bin(bin_name, args);
    assert!(
        out.status.success(),
        "{bin_name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn keys_made_where_they_are_used_join_the_federation() {
    let mut fed = Fed::start();
    let pki = fed.pki();

    // The office makes its key; only the request travels; the secretariat decides the role.
    let at_node = fed.path("at-ons");
    run_ok("fedstat-node", &["keygen", "--name", "ons", "--out", s(&at_node)]);
    assert_eq!(mode(&at_node.join("ons.key")), 0o600);
    let csr = at_node.join("ons.csr");
    let signed = run_ok(
        "fedstat-coordinator",
        &[
            "pki",
            "sign",
            "--dir",
            s(&pki),
            "--csr",
            s(&csr),
            "--role",
            "node",
            "--out",
            s(&at_node),
        ],
    );
    assert!(signed.contains("node `ons`"), "{signed}");
    assert!(!pki.join("ons.key").exists(), "no key for the node at the CA");

    let cfg = fed.write_node_config(
        "ons",
        &at_node,
        &pki.join("ca.pem"),
        &[("cps1988", demo_data("west"))],
    );
    let node = fed.spawn_node_with_config("ons", &cfg);
    fed.nodes.push(("ons".to_owned(), node));

    // The same for a researcher.
    let at_bob = fed.path("at-bob");
    run_ok("fedstat", &["keygen", "--name", "bob", "--out", s(&at_bob)]);
    assert_eq!(mode(&at_bob.join("bob.key")), 0o600);
    run_ok(
        "fedstat-coordinator",
        &[
            "pki",
            "sign",
            "--dir",
            s(&pki),
            "--csr",
            s(&at_bob.join("bob.csr")),
            "--role",
            "researcher",
            "--out",
            s(&at_bob),
        ],
    );
    let bob = fed.write_researcher_config_in("bob.toml", &at_bob, "bob", &pki.join("ca.pem"));

    fed.wait_for_nodes(&["ons"]);
    let experiment = fed.path("echo.toml");
    std::fs::write(&experiment, ECHO).expect("write experiment");
    let out = fed.cli_as(&bob, &["--json", "submit", s(&experiment)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["experiment"]
        .as_u64()
        .expect("id");
    // Only bob, who submitted it, may follow it.
    let status = fed.wait_finished_as(&bob, id, Duration::from_secs(60));
    assert_eq!(status["state"], "Completed", "{status:#}");

    // Everything the binaries wrote is owner-only (umask 077): store, models, audit logs, node
    // state, results.
    let results = fed.path("results");
    let out = fed.cli_as(&bob, &["results", &id.to_string(), "--out", s(&results)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut checked = 0;
    for dir in [fed.path("data"), fed.path("node-ons-state"), results] {
        for (path, _) in snapshot(&dir) {
            assert_eq!(mode(&path) & 0o077, 0, "{} is readable by others", path.display());
            checked += 1;
        }
        assert_eq!(mode(&dir) & 0o077, 0, "{}", dir.display());
    }
    assert!(checked >= 8, "only {checked} files written?");
}

#[test]
fn private_keys_others_can_read_are_refused_by_every_binary() {
    let mut fed = Fed::start();
    let pki = fed.pki();
    fed.issue("node", "ons");
    let node_key = pki.join("ons.key");
    std::fs::set_permissions(&node_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let cfg = fed.write_node_config(
        "ons",
        &pki,
        &pki.join("ca.pem"),
        &[("cps1988", demo_data("west"))],
    );
    let expect_refusal = |out: std::process::Output, key: &Path| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with an exposed key: {stderr}");
        assert!(
            stderr.contains(&format!("chmod 600 {}", key.display())),
            "{stderr}"
        );
    };
    expect_refusal(run_bin("fedstat-node", &["run", "--config", s(&cfg)]), &node_key);

    let alice_key = pki.join("alice.key");
    std::fs::set_permissions(&alice_key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    expect_refusal(fed.cli(&["nodes"]), &alice_key);

    // The coordinator: a copy of its config with the key readable by the group.
    fed.coordinator.kill();
    let coordinator_key = pki.join("coordinator.key");
    std::fs::set_permissions(&coordinator_key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    expect_refusal(
        run_bin(
            "fedstat-coordinator",
            &["run", "--config", s(&fed.path("coordinator.toml"))],
        ),
        &coordinator_key,
    );
    // And the CA key, before anything is signed with it.
    let ca_key = pki.join("ca.key");
    std::fs::set_permissions(&ca_key, std::fs::Permissions::from_mode(0o604)).expect("chmod");
    expect_refusal(
        run_bin(
            "fedstat-coordinator",
            &["pki", "issue", "--dir", s(&pki), "--role", "node", "--name", "x"],
        ),
        &ca_key,
    );
    fed.nodes.clear();
}

/// A QUIC server on loopback posing as the coordinator with a *node* certificate that carries
/// server usage, the coordinator's name and `localhost`, signed by the federation CA (what an
/// office's own CA, or a careless `pki` fork, could issue). Counts handshakes it completed.
struct Impostor {
    addr: std::net::SocketAddr,
    established: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

impl Impostor {
    fn start(pki: &Path) -> Impostor {
        let ca_pem = std::fs::read_to_string(pki.join("ca.pem")).expect("ca.pem");
        let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).expect("ca.key"))
            .expect("ca key");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationalUnitName, "node");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "coordinator");
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key = PrivateKeyDer::try_from(key.serialize_der()).expect("key der");

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server cert");
        tls.alpn_protocols = vec![fedstat_net::tls::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let endpoint = rt
            .block_on(async {
                quinn::Endpoint::server(
                    quinn::ServerConfig::with_crypto(Arc::new(quic)),
                    "127.0.0.1:0".parse().expect("addr"),
                )
            })
            .expect("bind");
        let addr = endpoint.local_addr().expect("addr");
        let established = Arc::new(AtomicUsize::new(0));
        let count = established.clone();
        rt.spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let Ok(connecting) = incoming.accept() else { return };
                    // A client that refused our certificate never sends its Finished, so the
                    // handshake never completes here.
                    if connecting.await.is_ok() {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        Impostor {
            addr,
            established,
            _rt: rt,
        }
    }
}

#[test]
fn a_node_certificate_cannot_pose_as_the_coordinator() {
    let fed = Fed::start();
    let pki = fed.pki();
    let impostor = Impostor::start(&pki);

    // A node pointed at the impostor refuses it, saying why, and never completes a handshake.
    fed.issue("node", "ons");
    let cfg = fed.write_node_config(
        "ons",
        &pki,
        &pki.join("ca.pem"),
        &[("cps1988", demo_data("west"))],
    );
    let real = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, real.replace(&fed.addr, &impostor.addr.to_string())).expect("write");
    let mut node = fed.spawn_node_with_config("ons", &cfg);
    wait_until(Duration::from_secs(20), "the node to refuse the impostor", || {
        node.log_text().contains("not a coordinator certificate")
    });
    node.kill();

    // So does the researcher CLI.
    let researcher = fed.path("researcher.toml");
    let text = std::fs::read_to_string(&researcher).expect("config");
    let to_impostor = fed.path("to-impostor.toml");
    std::fs::write(&to_impostor, text.replace(&fed.addr, &impostor.addr.to_string())).expect("write");
    let out = fed.cli_as(&to_impostor, &["nodes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "fedstat trusted the impostor");
    assert!(stderr.contains("not a coordinator certificate"), "{stderr}");
    assert_eq!(impostor.established.load(Ordering::SeqCst), 0);

    // The same configs against the real coordinator work (it was the certificate, not the setup).
    assert!(fed.cli(&["nodes"]).status.success());
}

#[test]
fn nodes_and_researchers_refuse_a_revoked_coordinator() {
    let fed = Fed::start();
    let pki = fed.pki();
    fed.issue("node", "ons");
    let out = run_bin(
        "fedstat-coordinator",
        &["pki", "revoke", "--dir", s(&pki), "--name", "coordinator"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let crl_line = format!("crl = \"{}\"\n", pki.join("crl.pem").display());
    let cfg = fed.write_node_config(
        "ons",
        &pki,
        &pki.join("ca.pem"),
        &[("cps1988", demo_data("west"))],
    );
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, format!("{crl_line}{text}")).expect("write");
    let mut node = fed.spawn_node_with_config("ons", &cfg);
    wait_until(
        Duration::from_secs(20),
        "the node to refuse the revoked coordinator",
        || node.log_text().contains("Revoked"),
    );

    let researcher = fed.path("researcher.toml");
    let text = std::fs::read_to_string(&researcher).expect("config");
    let with_crl = fed.path("with-crl.toml");
    std::fs::write(&with_crl, format!("{crl_line}{text}")).expect("write");
    let out = fed.cli_as(&with_crl, &["nodes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "fedstat trusted a revoked coordinator");
    assert!(stderr.contains("Revoked"), "{stderr}");

    // Without the CRL the same coordinator is still reachable, and the node never joined.
    let nodes = fed.json(&["nodes"]);
    assert_eq!(nodes.as_array().map(Vec::len), Some(0), "{nodes}");
    node.kill();
}

fn echo(name: &str, params: u32, rounds: u32, min_nodes: u32) -> String {
    format!(
        "name = \"{name}\"\nmodel = \"echo\"\nrounds = {rounds}\nmin_nodes = {min_nodes}\n\
         round_timeout_secs = 20\n[echo]\nparams = {params}\n"
    )
}

fn state(status: &serde_json::Value) -> String {
    match &status["state"] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[test]
fn a_damaged_model_file_costs_only_its_experiment() {
    let mut fed = Fed::start();
    // Echo models larger than a node allows by default.
    fed.node_policy.push_str("max_params = 100000\n");
    fed.add_node("west", &[("cps1988", demo_data("west"))]);
    fed.wait_for_nodes(&["west"]);
    // 1000 f32 parameters: model files of 4000 bytes.
    let a = fed.submit("a.toml", &echo("a", 1000, 2, 1));
    assert_eq!(
        fed.wait_finished(a, Duration::from_secs(60))["state"],
        "Completed"
    );
    // Waits for a second node.
    let b = fed.submit("b.toml", &echo("b", 2000, 2, 2));

    fed.coordinator.kill();
    let mut damaged = 0;
    for (path, bytes) in snapshot(&fed.path("data/models")) {
        if bytes.len() == 4000 {
            std::fs::write(&path, vec![0u8; 4000]).expect("damage");
            damaged += 1;
        }
    }
    assert!(damaged > 0, "no model file of experiment a found");
    fed.crash_and_restart_coordinator();

    let status = fed.status(a);
    assert!(
        status["state"]["Failed"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("damaged: the model of round 2")),
        "{status:#}"
    );
    fed.add_node("south", &[("cps1988", demo_data("south"))]);
    let status = fed.wait_finished(b, Duration::from_secs(60));
    assert_eq!(status["state"], "Completed", "{status:#}");
}

/// A size-limited tmpfs, unmounted on drop. CI runs as root; elsewhere the test says why it
/// cannot run instead of passing silently.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).expect("mkdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a {size} tmpfs to fill the coordinator's disk and needs root \
             (CI runs as root): mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk {
            path: path.to_owned(),
        }
    }

    fn grow(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .output()
            .expect("run mount");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn a_full_disk_stops_the_experiment_and_leaves_a_consistent_store() {
    let mut fed = Fed::start();
    let disk = SmallDisk::mount(&fed.path("disk"), "2m");
    // The same coordinator, now with its store (and audit log) on the small disk.
    fed.coordinator.kill();
    let cfg = fed.path("coordinator.toml");
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, format!("data_dir = \"{}\"\n{text}", disk.path.display())).expect("write");
    fed.crash_and_restart_coordinator();
    // Echo models larger than a node allows by default.
    fed.node_policy.push_str("max_params = 100000\n");
    fed.add_node("west", &[("cps1988", demo_data("west"))]);
    fed.wait_for_nodes(&["west"]);

    // 50 000 f32 parameters: 200 kB per round's model; the disk holds a handful.
    let id = fed.submit("big.toml", &echo("big", 50_000, 60, 1));
    let status = fed.wait_finished(id, Duration::from_secs(120));
    let reason = status["state"]["Failed"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.contains("cannot record progress") || reason.contains("audit log"),
        "expected a failure for the full disk: {status:#}"
    );
    let done = status["rounds_done"].as_u64().expect("rounds_done");
    assert!(done < 60, "{status:#}");
    // Nothing more runs for it.
    std::thread::sleep(Duration::from_secs(2));
    let later = fed.status(id);
    assert_eq!(later["rounds_done"].as_u64(), Some(done));
    assert_eq!(state(&later), state(&status));
    let log = fed.coordinator.log_text();
    assert!(log.contains("No space left on device"), "{log}");

    // With room again, the coordinator starts from what is on disk: every recorded round's
    // model checks against its hash, and the audit log's chain is intact.
    fed.coordinator.kill();
    disk.grow("64m");
    fed.crash_and_restart_coordinator();
    let status = fed.status(id);
    let rounds: Vec<u64> = status["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|r| r["round"].as_u64())
        .collect();
    assert_eq!(
        rounds,
        (1..=rounds.len() as u64).collect::<Vec<_>>(),
        "{status:#}"
    );
    for k in &rounds {
        let out = fed.cli(&[
            "results",
            &id.to_string(),
            "--round",
            &k.to_string(),
            "--out",
            s(&fed.path(&format!("r{k}"))),
        ]);
        assert!(
            out.status.success(),
            "round {k}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run_bin(
        "fedstat-coordinator",
        &["audit", "verify", "--file", s(&disk.path.join("audit.jsonl"))],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The stop was never written as a failure: with room again the experiment resumes after
    // its last recorded round and completes.
    let status = fed.wait_finished(id, Duration::from_secs(120));
    assert_eq!(status["state"], "Completed", "{status:#}");
    let rounds: Vec<u64> = status["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|r| r["round"].as_u64())
        .collect();
    assert_eq!(rounds, (1..=60).collect::<Vec<u64>>(), "{status:#}");
    fed.coordinator.kill();
    fed.nodes.clear();
}

#[test]
fn a_failed_audit_write_stops_what_it_records() {
    let mut fed = Fed::start();
    let disk = SmallDisk::mount(&fed.path("audit-disk"), "1m");
    fed.coordinator.kill();
    let cfg = fed.path("coordinator.toml");
    let text = std::fs::read_to_string(&cfg).expect("config");
    let audit = disk.path.join("audit.jsonl");
    std::fs::write(&cfg, format!("audit_log = \"{}\"\n{text}", audit.display())).expect("write");
    fed.crash_and_restart_coordinator();
    fed.add_node("west", &[("cps1988", demo_data("west"))]);
    fed.wait_for_nodes(&["west"]);
    // Waits for a second node.
    let waiting = fed.submit("waiting.toml", &echo("waiting", 100, 2, 2));

    // Fill the audit log's disk (whatever fits; the write itself is expected to fail), then
    // make refused requests, each an audit record, until the log's last page is full too.
    let _ = std::fs::write(disk.path.join("filler"), vec![1u8; 2 << 20]);
    let mut tries = 0;
    loop {
        let out = fed.cli(&["cancel", "999"]);
        if String::from_utf8_lossy(&out.stderr).contains("cannot write its audit log") {
            break;
        }
        tries += 1;
        assert!(tries < 200, "the audit log never filled up");
    }
    let experiment = fed.path("again.toml");
    std::fs::write(&experiment, echo("again", 100, 2, 1)).expect("write");
    let out = fed.cli(&["submit", s(&experiment)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a submission was accepted without its audit record"
    );
    assert!(stderr.contains("cannot write its audit log"), "{stderr}");

    // Every running experiment stopped with the reason; status stays readable.
    let status = fed.status(waiting);
    let reason = status["state"]["Failed"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("cannot write its audit log"), "{status:#}");
    // Results are not released and a new node is not admitted.
    let out = fed.cli(&["results", &waiting.to_string(), "--out", s(&fed.path("r"))]);
    assert!(!out.status.success());
    fed.add_node("south", &[("cps1988", demo_data("south"))]);
    std::thread::sleep(Duration::from_secs(3));
    let nodes = fed.json(&["nodes"]);
    assert!(!nodes.to_string().contains("south"), "{nodes}");
    // What is on the disk is still a valid chain.
    let out = run_bin("fedstat-coordinator", &["audit", "verify", "--file", s(&audit)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    fed.coordinator.kill();
    fed.nodes.clear();
}

/// A TLS client that never finishes: it blocks in certificate verification until released,
/// so every handshake it started stays in progress at the coordinator.
#[derive(Debug)]
struct Stall(Arc<AtomicBool>);

impl rustls::client::danger::ServerCertVerifier for Stall {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        while !self.0.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(rustls::Error::General("stalled on purpose".into()))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("unused".into()))
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("unused".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Start `attempts` handshakes from 127.0.0.2 at once and leave them unfinished until `release`.
fn flood(
    addr: std::net::SocketAddr,
    attempts: usize,
    release: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("tls13")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Stall(release.clone())))
                .with_no_client_auth();
            tls.alpn_protocols = vec![fedstat_net::tls::ALPN.to_vec()];
            let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic");
            let mut endpoint =
                quinn::Endpoint::client("127.0.0.2:0".parse().expect("addr")).expect("endpoint");
            endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
            // All Initials are queued before the runtime runs anything, so they leave together.
            let pending: Vec<_> = (0..attempts)
                .filter_map(|_| endpoint.connect(addr, "localhost").ok())
                .collect();
            while !release.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(pending);
            endpoint.close(0u32.into(), b"done");
        });
    })
}

#[test]
fn a_node_gets_in_during_a_flood_of_unfinished_handshakes_from_one_address() {
    let mut fed = Fed::start();
    // Few handshake slots, held long: without the per-address limit the flood takes them all
    // for 30 s and no office can connect.
    fed.coordinator.kill();
    let cfg = fed.path("coordinator.toml");
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(
        &cfg,
        format!(
            "{text}\n[limits]\nmax_handshakes = 16\nmax_handshakes_per_address = 8\n\
             retry_above_handshakes = 12\nhandshake_timeout_secs = 30\n"
        ),
    )
    .expect("write");
    fed.crash_and_restart_coordinator();
    let addr: std::net::SocketAddr = fed.addr.parse().expect("addr");

    let release = Arc::new(AtomicBool::new(false));
    let attacker = flood(addr, 300, release.clone());
    let joined = an_office_joins_despite_the_flood(&mut fed);
    let id = fed.submit("echo.toml", ECHO);
    let status = fed.wait_finished(id, Duration::from_secs(60));
    assert_eq!(status["state"], "Completed", "{status:#}");
    let log = fed.coordinator.log_text();
    let refused = log
        .matches("too many handshakes in progress from this address")
        .count();
    eprintln!(
        "flood: 300 unfinished handshakes from 127.0.0.2, {refused} refused at the per-address \
         limit; the node joined in {joined:?} and the experiment completed"
    );
    release.store(true, Ordering::SeqCst);
    attacker.join().expect("attacker thread");
}

#[test]
fn a_renewed_certificate_keeps_the_node_in_the_federation() {
    let mut fed = Fed::start();
    let pki = fed.pki();
    fed.add_node("ons", &[("cps1988", demo_data("west"))]);
    fed.wait_for_nodes(&["ons"]);
    let before = std::fs::read(pki.join("ons.pem")).expect("cert");
    let key = std::fs::read(pki.join("ons.key")).expect("key");
    let out = run_ok(
        "fedstat-coordinator",
        &["pki", "renew", "--dir", s(&pki), "--name", "ons", "--days", "30"],
    );
    assert!(out.contains("renewed node `ons` for 30 days"), "{out}");
    assert_ne!(std::fs::read(pki.join("ons.pem")).expect("cert"), before);
    assert_eq!(
        std::fs::read(pki.join("ons.key")).expect("key"),
        key,
        "the key never changes"
    );
    let out = run_ok("fedstat-coordinator", &["pki", "crl", "--dir", s(&pki)]);
    assert!(out.contains("valid 90 days"), "{out}");

    fed.restart_node("ons");
    fed.wait_for_nodes(&["ons"]);
    let id = fed.submit("echo.toml", ECHO);
    assert_eq!(
        fed.wait_finished(id, Duration::from_secs(60))["state"],
        "Completed"
    );
}
