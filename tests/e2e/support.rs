//! Test support: a temporary federation of the real binaries (a fresh CA, a coordinator on an
//! ephemeral loopback port, nodes, a researcher), driven through the `fedstat` CLI. Children are
//! killed when dropped. Built on `fedstat_coordinator::harness`, which the demo and the
//! benchmark use too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use fedstat_coordinator::harness::{self, Bins, CoordinatorOptions};
use serde_json::Value;

/// The binaries built with this test (target/<profile>/).
pub fn bins() -> Bins {
    Bins::of_this_build().unwrap_or_else(|e| {
        panic!("{e}: run the tests with `cargo test --workspace` so every binary is built")
    })
}

/// A binary built with this test.
pub fn bin(name: &str) -> PathBuf {
    let path = bins().path(name);
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` so every binary is built",
        path.display()
    );
    path
}

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn demo_data(region: &str) -> PathBuf {
    repo().join("configs/demo/cps1988").join(format!("{region}.csv"))
}

pub fn dirty_data(file: &str) -> PathBuf {
    repo().join("tests/data/cps1988-dirty").join(file)
}

pub const REGIONS: [&str; 4] = ["midwest", "northeast", "south", "west"];

/// The pooled reference fits.
pub fn reference() -> Value {
    let text =
        std::fs::read_to_string(repo().join("configs/demo/cps1988/reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference json")
}

/// A running child process, killed on drop; its stderr goes to a log file.
pub use fedstat_coordinator::harness::Proc;

/// A temporary federation.
pub struct Fed {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub coordinator: Proc,
    pub nodes: Vec<(String, Proc)>,
    /// `[policy]` keys of the nodes added from now on (see [`TEST_POLICY`]); a test that
    /// needs other settings for all its nodes appends to it before adding them.
    pub node_policy: String,
    /// `transport` of the researcher and of the nodes added from now on (None: the default,
    /// `auto`); see [`Fed::set_transport`].
    pub transport: Option<String>,
}

/// The site policy of test nodes: the CPS 1988 columns listed (a node allows none by
/// default) and no floor on `min_nodes`, because most tests run federations of one to three
/// offices. Every other disclosure rule keeps its default; `disclosure.rs` tests the floor.
pub const TEST_POLICY: &str = "allowed_targets = [\"wage\"]\n\
    allowed_features = [\"education\", \"experience\", \"ethnicity\", \"smsa\", \"parttime\"]\n\
    min_nodes_floor = 1\n";

/// Local training slow enough that kills and revocations land inside rounds: test nodes that
/// use it allow more epochs and one-row batches than the defaults do.
pub const SLOW_TRAINING_POLICY: &str = "max_local_epochs = 1000\nmin_batch_size = 1\nmax_rounds = 1000\n";

/// `extra` (TOML that may hold a `[policy]` table) with every key of `defaults` it does not set
/// itself added to its `[policy]` table.
fn merge_policy(extra: &str, defaults: &str) -> String {
    let keys = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
            .collect()
    };
    let set = keys(extra);
    let missing: String = defaults
        .lines()
        .filter(|l| {
            l.split_once('=')
                .is_some_and(|(k, _)| !set.contains(&k.trim().to_owned()))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if extra.contains("[policy]") {
        extra.replacen("[policy]\n", &format!("[policy]\n{missing}"), 1)
    } else {
        format!("{extra}\n[policy]\n{missing}")
    }
}

fn toml_tls(pki: &Path, ca: &Path, name: &str) -> String {
    harness::tls_section(pki, ca, name)
}

impl Fed {
    /// A CA, a coordinator listening on 127.0.0.1:0 and a researcher certificate.
    pub fn start() -> Fed {
        Fed::start_with("")
    }

    /// [`Fed::start`] with top-level coordinator config keys, e.g. `quic = false`.
    pub fn start_with(coordinator_extra: &str) -> Fed {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        bins().pki_init(&pki, None).unwrap_or_else(|e| panic!("{e}"));
        let cfg = dir.path().join("coordinator.toml");
        let opts = CoordinatorOptions {
            crl: Some(pki.join("crl.pem")),
            extra: if coordinator_extra.is_empty() {
                String::new()
            } else {
                format!("{coordinator_extra}\n")
            },
            ..CoordinatorOptions::default()
        };
        let tls = toml_tls(&pki, &pki.join("ca.pem"), "coordinator");
        harness::write(&cfg, &harness::coordinator_config(&tls, &opts)).expect("write config");
        let (coordinator, addr) = spawn_coordinator(&cfg, &dir.path().join("coordinator.log"));
        let fed = Fed {
            dir,
            addr,
            coordinator,
            nodes: Vec::new(),
            node_policy: TEST_POLICY.to_owned(),
            transport: None,
        };
        fed.issue("researcher", "alice");
        fed.write_researcher_config("researcher.toml", "alice", &fed.pki().join("ca.pem"));
        fed
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issue a certificate from this federation's CA.
    pub fn issue(&self, role: &str, name: &str) {
        bins()
            .pki_issue(&self.pki(), role, name)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Set `transport` (`quic`, `tcp`, `auto`) for the researcher and the nodes added from now on.
    pub fn set_transport(&mut self, transport: &str) {
        self.transport = Some(transport.to_owned());
        self.write_researcher_config("researcher.toml", "alice", &self.pki().join("ca.pem"));
    }

    fn transport_line(&self) -> String {
        self.transport
            .as_ref()
            .map(|t| format!("transport = \"{t}\"\n"))
            .unwrap_or_default()
    }

    pub fn write_researcher_config(&self, file: &str, name: &str, ca: &Path) -> PathBuf {
        self.write_researcher_config_in(file, &self.pki(), name, ca)
    }

    pub fn write_researcher_config_in(&self, file: &str, pki: &Path, name: &str, ca: &Path) -> PathBuf {
        let path = self.path(file);
        // `transport` is a top-level key: it goes before the `[tls]` table.
        let tls = format!("{}{}", self.transport_line(), toml_tls(pki, ca, name));
        let text = harness::researcher_config(&self.addr, &tls);
        std::fs::write(&path, text).expect("write researcher config");
        path
    }

    /// Write a node config: certificate `name` from `pki`, trusting `ca`, offering `datasets`,
    /// with [`Fed::node_policy`].
    pub fn write_node_config(
        &self,
        name: &str,
        pki: &Path,
        ca: &Path,
        datasets: &[(&str, PathBuf)],
    ) -> PathBuf {
        let path = self.write_node_config_bare(name, pki, ca, datasets);
        let mut text = std::fs::read_to_string(&path).expect("read node config");
        text.push_str(&merge_policy("", &self.node_policy));
        std::fs::write(&path, text).expect("write node config");
        path
    }

    fn write_node_config_bare(
        &self,
        name: &str,
        pki: &Path,
        ca: &Path,
        datasets: &[(&str, PathBuf)],
    ) -> PathBuf {
        let datasets: Vec<(&str, &Path)> = datasets.iter().map(|(ds, p)| (*ds, p.as_path())).collect();
        let tls = format!("{}{}", self.transport_line(), toml_tls(pki, ca, name));
        let text = harness::node_config(&self.addr, &tls, &datasets, "");
        let path = self.path(&format!("node-{name}.toml"));
        std::fs::write(&path, text).expect("write node config");
        path
    }

    pub fn spawn_node_with_config(&self, name: &str, config: &Path) -> Proc {
        let log = self.path(&format!("node-{name}.log"));
        bins()
            .spawn_node(name, config, &log, None)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Issue a node certificate and start `fedstat-node` offering `datasets`.
    pub fn add_node(&mut self, name: &str, datasets: &[(&str, PathBuf)]) {
        self.issue("node", name);
        let cfg = self.write_node_config(name, &self.pki(), &self.pki().join("ca.pem"), datasets);
        let proc = self.spawn_node_with_config(name, &cfg);
        self.nodes.push((name.to_owned(), proc));
    }

    pub fn node(&mut self, name: &str) -> &mut Proc {
        &mut self.nodes.iter_mut().find(|(n, _)| n == name).expect("node").1
    }

    /// Run the `fedstat` CLI with the researcher config.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(&self.path("researcher.toml"), args)
    }

    pub fn cli_as(&self, config: &Path, args: &[&str]) -> Output {
        Command::new(bin("fedstat"))
            .arg("--config")
            .arg(config)
            .args(args)
            .output()
            .expect("run fedstat")
    }

    /// Run the CLI with `--json` and parse its output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "fedstat {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json output")
    }

    pub fn wait_for_nodes(&self, names: &[&str]) {
        wait_until(Duration::from_secs(30), "nodes to connect", || {
            let nodes = self.json(&["nodes"]);
            let up: Vec<&str> = nodes
                .as_array()
                .map(|a| a.iter().filter_map(|n| n["name"].as_str()).collect())
                .unwrap_or_default();
            names.iter().all(|n| up.contains(n))
        });
    }

    /// Write an experiment file and submit it; returns its id.
    pub fn submit(&self, file: &str, toml_text: &str) -> u64 {
        let path = self.path(file);
        std::fs::write(&path, toml_text).expect("write experiment");
        let v = self.json(&["submit", path.to_str().expect("utf-8 path")]);
        v["experiment"].as_u64().expect("experiment id")
    }

    pub fn status(&self, id: u64) -> Value {
        self.json(&["status", &id.to_string()])[0].clone()
    }

    /// Wait until the experiment completed or failed; returns its status.
    pub fn wait_finished(&self, id: u64, limit: Duration) -> Value {
        self.wait_finished_as(&self.path("researcher.toml"), id, limit)
    }

    /// [`Fed::wait_finished`] for the researcher whose config is `config` (only an
    /// experiment's submitter and admins may follow it).
    pub fn wait_finished_as(&self, config: &Path, id: u64, limit: Duration) -> Value {
        let mut last = Value::Null;
        wait_until(limit, "the experiment to finish", || {
            let out = self.cli_as(config, &["--json", "status", &id.to_string()]);
            assert!(
                out.status.success(),
                "status: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            last = serde_json::from_slice::<Value>(&out.stdout).expect("json")[0].clone();
            last["state"] == "Completed" || last["state"].get("Failed").is_some()
        });
        last
    }
}

pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// All event messages of a status, joined by newlines.
pub fn events(status: &Value) -> String {
    status["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["message"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// The experiment used by most tests: the README's logit on the bundled data.
pub fn logit_experiment(rounds: u32, min_nodes: u32, extra_training: &str) -> String {
    format!(
        r#"
name = "e2e logit"
dataset = "cps1988"
model = "logistic"
rounds = {rounds}
min_nodes = {min_nodes}
round_timeout_secs = 10
[schema]
target = {{ column = "wage", threshold = 522.32 }}
numeric = [{{ column = "education" }}, {{ column = "experience", squared = true }}]
categorical = [
  {{ column = "ethnicity", levels = ["cauc", "afam"], reference = "cauc" }},
  {{ column = "smsa", levels = ["no", "yes"], reference = "no" }},
  {{ column = "parttime", levels = ["no", "yes"], reference = "no" }},
]
[training]
learning_rate = 0.05
batch_size = 32
seed = 7
{extra_training}
"#
    )
}

/// Helpers for the governance tests (site policy, approval, audit).
impl Fed {
    /// Write a node config like [`Fed::write_node_config`] with this federation's CA, followed
    /// by `extra` TOML (e.g. a `[policy]` table).
    pub fn write_node_config_with(&self, name: &str, datasets: &[(&str, PathBuf)], extra: &str) -> PathBuf {
        let path = self.write_node_config_bare(name, &self.pki(), &self.pki().join("ca.pem"), datasets);
        let mut text = std::fs::read_to_string(&path).expect("read node config");
        text.push('\n');
        text.push_str(&merge_policy(extra, &self.node_policy));
        std::fs::write(&path, text).expect("write node config");
        path
    }

    /// Issue a node certificate and start `fedstat-node` with `extra` config; returns the
    /// config's path.
    pub fn add_node_with(&mut self, name: &str, datasets: &[(&str, PathBuf)], extra: &str) -> PathBuf {
        self.issue("node", name);
        let cfg = self.write_node_config_with(name, datasets, extra);
        let proc = self.spawn_node_with_config(name, &cfg);
        self.nodes.push((name.to_owned(), proc));
        cfg
    }

    /// [`Fed::add_node_with`] with environment variables for the node (fault points).
    pub fn add_node_with_env(
        &mut self,
        name: &str,
        datasets: &[(&str, PathBuf)],
        extra: &str,
        env: &[(&str, &str)],
    ) {
        self.issue("node", name);
        let cfg = self.write_node_config_with(name, datasets, extra);
        let log = self.path(&format!("node-{name}.log"));
        let proc = bins()
            .spawn_node_with_env(name, &cfg, &log, None, env)
            .unwrap_or_else(|e| panic!("{e}"));
        self.nodes.push((name.to_owned(), proc));
    }

    /// The default audit log of a node started by [`Fed::add_node_with`] or [`Fed::add_node`].
    pub fn node_audit_log(&self, name: &str) -> PathBuf {
        self.path(&format!("node-{name}-state/audit.jsonl"))
    }
}

/// Run a binary of this workspace (`fedstat-node`, `fedstat-coordinator`) with `args`.
pub fn run_bin(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name)).args(args).output().expect("run binary")
}

/// Start `fedstat-coordinator run` with `config`; returns it and the address it printed.
pub fn spawn_coordinator(config: &Path, log: &Path) -> (Proc, String) {
    bins()
        .spawn_coordinator(config, log)
        .unwrap_or_else(|e| panic!("{e}"))
}

impl Fed {
    /// SIGKILL the coordinator and start it again on the same address with the same store.
    pub fn crash_and_restart_coordinator(&mut self) {
        self.coordinator.kill();
        let cfg = self.path("coordinator.toml");
        let text = std::fs::read_to_string(&cfg).expect("config");
        let pinned = text.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{}\"", self.addr));
        std::fs::write(&cfg, pinned).expect("write config");
        let (proc, addr) = spawn_coordinator(&cfg, &self.path("coordinator.log"));
        assert_eq!(addr, self.addr);
        // Replacing the handle drops (and kills) nothing: the old child is already dead.
        self.coordinator = proc;
    }

    /// Append `extra` TOML (e.g. a `[limits]` table) to the coordinator's config and restart
    /// it with it, on the same address and store.
    pub fn reconfigure_coordinator(&mut self, extra: &str) {
        let cfg = self.path("coordinator.toml");
        let mut text = std::fs::read_to_string(&cfg).expect("config");
        text.push('\n');
        text.push_str(extra);
        std::fs::write(&cfg, text).expect("write config");
        self.crash_and_restart_coordinator();
    }

    /// Stop a node with SIGKILL and start it again with the same config.
    pub fn restart_node(&mut self, name: &str) {
        self.node(name).kill();
        let cfg = self.path(&format!("node-{name}.toml"));
        let proc = self.spawn_node_with_config(name, &cfg);
        *self.node(name) = proc;
    }
}

/// A client config that trusts `ca` and presents `identity` (or no certificate at all):
/// what the real binaries refuse to build.
pub fn raw_client(
    ca: &Path,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(cert.expect("ca cert")).expect("add root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![fedstat_net::tls::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    quinn::ClientConfig::new(Arc::new(quic))
}

/// Write a private key the way the binaries require it: owner-only (0600) from creation on.
pub fn write_key(path: &Path, pem: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("create key file");
    file.write_all(pem.as_bytes()).expect("write key");
}

/// While a handshake flood from one address holds the coordinator at its per-address cap (it
/// says so in its log), an office still joins, within 20 s; how long it took.
pub fn an_office_joins_despite_the_flood(fed: &mut Fed) -> Duration {
    wait_until(
        Duration::from_secs(10),
        "the flood to hit the per-address limit",
        || {
            fed.coordinator
                .log_text()
                .contains("too many handshakes in progress from this address")
        },
    );
    let started = Instant::now();
    fed.add_node("west", &[("cps1988", demo_data("west"))]);
    fed.wait_for_nodes(&["west"]);
    let joined = started.elapsed();
    assert!(
        joined < Duration::from_secs(20),
        "the node took {joined:?}: it waited out the flood"
    );
    joined
}
