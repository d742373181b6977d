//! Config files of the coordinator and the researcher CLI: a raw `Deserialize` form with
//! `deny_unknown_fields`, then a validated form whose paths are resolved against the file's
//! folder. Every key is documented in `configs/*.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedstat_net::session::Transport;
use fedstat_net::tls::TlsFiles;
use serde::Deserialize;

use crate::{Error, Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_cert: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl RawTls {
    fn resolve(self, base: &Path) -> TlsFiles {
        TlsFiles {
            ca_cert: base.join(self.ca_cert),
            cert: base.join(self.cert),
            key: base.join(self.key),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    listen: SocketAddr,
    #[serde(default = "yes")]
    quic: bool,
    #[serde(default = "yes")]
    tcp: bool,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default = "yes")]
    durable: bool,
    #[serde(default)]
    audit_log: Option<PathBuf>,
    #[serde(default)]
    crl: Option<PathBuf>,
    #[serde(default)]
    record_received: Option<PathBuf>,
    tls: RawTls,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_connections: usize,
    max_handshakes: usize,
    max_handshakes_per_address: usize,
    retry_above_handshakes: usize,
    max_connections_per_address: usize,
    max_connections_per_identity: usize,
    max_concurrent_updates: usize,
    max_params: u64,
    handshake_timeout_secs: u64,
    max_experiments_per_researcher: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: 1000,
            max_handshakes: 64,
            max_handshakes_per_address: 8,
            retry_above_handshakes: 16,
            max_connections_per_address: 256,
            max_connections_per_identity: 8,
            max_concurrent_updates: 4,
            max_params: fedstat_core::spec::MAX_PARAMS,
            handshake_timeout_secs: 10,
            max_experiments_per_researcher: 4,
        }
    }
}

/// Validated coordinator configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// `listen`: host and port of the QUIC (UDP) and TLS-over-TCP listeners; both use the
    /// same port number.
    pub listen: SocketAddr,
    /// `quic = true`: listen on UDP for QUIC.
    pub quic: bool,
    /// `tcp = true`: listen on TCP for TLS-over-TCP (clients whose UDP is blocked).
    pub tcp: bool,
    /// Folder of the durable store; `None` keeps everything in memory (benchmarks only).
    pub data_dir: Option<PathBuf>,
    /// The tamper-evident audit log (default `data_dir/audit.jsonl`; none without a store
    /// unless set).
    pub audit_log: Option<PathBuf>,
    /// A PEM certificate revocation list from the federation CA, reloaded on SIGHUP.
    pub crl: Option<PathBuf>,
    /// `record_received`: a folder where the coordinator keeps a copy of every answer and
    /// every secure-aggregation message it receives, exactly as received, so auditors can
    /// check what the secretariat holds (masked answers under secure aggregation). Off by
    /// default: it holds offices' answers in clear for experiments without masking.
    pub record_received: Option<PathBuf>,
    pub tls: TlsFiles,
    pub limits: Limits,
}

/// Resource limits; each one keeps a misbehaving peer from hurting the others.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections at most (nodes and researchers); more are refused at once.
    pub max_connections: usize,
    /// TLS handshakes in progress at most: peers not yet authenticated cannot take more.
    pub max_handshakes: usize,
    /// TLS handshakes in progress from one IP address at most, so one source cannot take all
    /// of `max_handshakes` and lock out the nodes.
    pub max_handshakes_per_address: usize,
    /// Above this many handshakes in progress, a new one must first prove its source address
    /// with a QUIC retry (one more round trip), so spoofed floods cost no handshake state.
    pub retry_above_handshakes: usize,
    /// Open connections from one IP address at most (offices behind one NAT share it).
    pub max_connections_per_address: usize,
    /// Open connections per certificate identity at most (a node needs one, a researcher one
    /// per running CLI command).
    pub max_connections_per_identity: usize,
    /// Updates staged at the same time; bounds memory at (this + 1) model sizes whatever the
    /// number of nodes. Other uploads wait (QUIC flow control holds the senders back).
    pub max_concurrent_updates: usize,
    /// Largest model an experiment may declare.
    pub max_params: u64,
    /// Time a peer has for its first message after the TLS handshake.
    pub handshake_timeout: std::time::Duration,
    /// Unfinished experiments one researcher (or admin) may have at once; more are refused at
    /// submission, so one party cannot keep every node busy.
    pub max_experiments_per_researcher: usize,
}

fn yes() -> bool {
    true
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    toml::from_str(&text).map_err(|e| {
        fedstat_core::Error::Toml {
            path: path.to_owned(),
            message: e.to_string(),
        }
        .into()
    })
}

fn base_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_owned).unwrap_or_default()
}

fn invalid(what: &str, key: &str, problem: &str) -> Error {
    fedstat_core::Error::Config {
        what: what.into(),
        key: key.into(),
        problem: problem.into(),
    }
    .into()
}

impl CoordinatorConfig {
    /// Read and validate the config file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
        Self::from_toml_str(&text, &base_dir(path), &path.display().to_string())
    }

    /// Parse and validate config text (what [`CoordinatorConfig::load`] does after reading the
    /// file). Relative paths are resolved against `base_dir`; `label` names the file in errors.
    pub fn from_toml_str(text: &str, base_dir: &Path, label: &str) -> Result<Self> {
        let raw: RawCoordinator = toml::from_str(text).map_err(|e| fedstat_core::Error::Toml {
            path: PathBuf::from(label),
            message: e.to_string(),
        })?;
        let what = format!("coordinator config {label}");
        let l = raw.limits;
        if l.max_connections == 0 {
            return Err(invalid(&what, "limits.max_connections", "must be at least 1"));
        }
        if l.max_handshakes == 0 {
            return Err(invalid(&what, "limits.max_handshakes", "must be at least 1"));
        }
        if l.max_handshakes_per_address == 0 || l.max_handshakes_per_address > l.max_handshakes {
            return Err(invalid(
                &what,
                "limits.max_handshakes_per_address",
                "must be between 1 and limits.max_handshakes",
            ));
        }
        if l.max_connections_per_address == 0 {
            return Err(invalid(
                &what,
                "limits.max_connections_per_address",
                "must be at least 1",
            ));
        }
        if l.max_connections_per_identity < 2 {
            // A node's reconnection briefly overlaps its old connection.
            return Err(invalid(
                &what,
                "limits.max_connections_per_identity",
                "must be at least 2",
            ));
        }
        if l.max_concurrent_updates == 0 {
            return Err(invalid(
                &what,
                "limits.max_concurrent_updates",
                "must be at least 1",
            ));
        }
        if l.max_params == 0 || l.max_params > fedstat_core::spec::MAX_PARAMS {
            return Err(invalid(
                &what,
                "limits.max_params",
                "must be between 1 and 100000000",
            ));
        }
        if l.handshake_timeout_secs == 0 {
            return Err(invalid(
                &what,
                "limits.handshake_timeout_secs",
                "must be at least 1",
            ));
        }
        if l.max_experiments_per_researcher == 0 {
            return Err(invalid(
                &what,
                "limits.max_experiments_per_researcher",
                "must be at least 1",
            ));
        }
        let base = base_dir;
        let data_dir = raw
            .durable
            .then(|| base.join(raw.data_dir.unwrap_or_else(|| PathBuf::from("data"))));
        if !raw.quic && !raw.tcp {
            return Err(invalid(&what, "quic", "`quic` and `tcp` cannot both be false"));
        }
        Ok(CoordinatorConfig {
            listen: raw.listen,
            quic: raw.quic,
            tcp: raw.tcp,
            audit_log: match raw.audit_log {
                Some(p) => Some(base.join(p)),
                None => data_dir.as_ref().map(|d| d.join("audit.jsonl")),
            },
            crl: raw.crl.map(|p| base.join(p)),
            record_received: raw.record_received.map(|p| base.join(p)),
            data_dir,
            tls: raw.tls.resolve(base),
            limits: Limits {
                max_connections: l.max_connections,
                max_handshakes: l.max_handshakes,
                max_handshakes_per_address: l.max_handshakes_per_address,
                retry_above_handshakes: l.retry_above_handshakes,
                max_connections_per_address: l.max_connections_per_address,
                max_connections_per_identity: l.max_connections_per_identity,
                max_concurrent_updates: l.max_concurrent_updates,
                max_params: l.max_params,
                handshake_timeout: std::time::Duration::from_secs(l.handshake_timeout_secs),
                max_experiments_per_researcher: l.max_experiments_per_researcher,
            },
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResearcher {
    coordinator: String,
    server_name: String,
    #[serde(default)]
    transport: Transport,
    #[serde(default)]
    crl: Option<PathBuf>,
    tls: RawTls,
}

/// Validated researcher CLI configuration.
#[derive(Debug, Clone)]
pub struct ResearcherConfig {
    /// `host:port` of the coordinator.
    pub coordinator: String,
    /// `server_name`: the DNS name or IP address the coordinator's certificate must carry
    /// (required: no silent default).
    pub server_name: String,
    /// `transport = "quic" | "tcp" | "auto"` (default `auto`: QUIC, TCP when UDP gets no
    /// answer).
    pub transport: Transport,
    /// `crl`: the federation's revocation list (PEM), checked against the coordinator's
    /// certificate.
    pub crl: Option<PathBuf>,
    pub tls: TlsFiles,
}

impl ResearcherConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let raw: RawResearcher = read_toml(path)?;
        let what = format!("researcher config {}", path.display());
        if raw.coordinator.trim().is_empty() {
            return Err(invalid(&what, "coordinator", "must be host:port"));
        }
        if raw.server_name.trim().is_empty() {
            return Err(invalid(
                &what,
                "server_name",
                "must name the coordinator's DNS name or IP address as in its certificate",
            ));
        }
        let base = base_dir(path);
        Ok(ResearcherConfig {
            coordinator: raw.coordinator,
            server_name: raw.server_name,
            transport: raw.transport,
            crl: raw.crl.map(|p| base.join(p)),
            tls: raw.tls.resolve(&base),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(limits: &str) -> Result<CoordinatorConfig> {
        let text = format!(
            "listen = \"127.0.0.1:0\"\n[tls]\nca_cert = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n[limits]\n{limits}"
        );
        CoordinatorConfig::from_toml_str(&text, Path::new("/etc/fedstat"), "coordinator.toml")
    }

    #[test]
    fn experiments_per_researcher_defaults_and_is_validated() {
        // (limits table, expected value or the key the error must name)
        let cases: [(&str, std::result::Result<usize, &str>); 4] = [
            ("", Ok(4)),
            ("max_experiments_per_researcher = 1", Ok(1)),
            ("max_experiments_per_researcher = 25", Ok(25)),
            (
                "max_experiments_per_researcher = 0",
                Err("limits.max_experiments_per_researcher"),
            ),
        ];
        for (limits, want) in cases {
            match (parse(limits), want) {
                (Ok(c), Ok(n)) => assert_eq!(c.limits.max_experiments_per_researcher, n, "{limits}"),
                (Err(e), Err(key)) => assert!(e.to_string().contains(key), "{limits}: {e}"),
                (got, _) => panic!("{limits}: unexpected {got:?}"),
            }
        }
    }
}
