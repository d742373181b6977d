//! The node's config file, owned by the office's IT staff and data custodian: where the
//! coordinator is, the node's certificate, which local datasets it offers (name -> CSV path),
//! where it keeps its state (approvals, audit log) and the site policy. Paths are resolved
//! against the file's folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedstat_net::session::Transport;
use fedstat_net::tls::TlsFiles;
use serde::Deserialize;

use crate::policy::{RawPolicy, SitePolicy};
use crate::{Error, Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    coordinator: String,
    server_name: String,
    #[serde(default)]
    transport: Transport,
    #[serde(default)]
    crl: Option<PathBuf>,
    tls: RawTls,
    #[serde(default)]
    datasets: BTreeMap<String, PathBuf>,
    state_dir: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    privacy_ledger: Option<PathBuf>,
    #[serde(default)]
    policy: RawPolicy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_cert: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// Validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// `host:port` of the coordinator (the node dials out; nothing dials in).
    pub coordinator: String,
    /// `server_name`: the DNS name or IP address the coordinator's certificate must carry
    /// (required: no default, so a node never trusts a name nobody chose).
    pub server_name: String,
    /// `transport = "quic" | "tcp" | "auto"` (default `auto`: QUIC first, TLS-over-TCP on the
    /// same port when the QUIC handshake gets no answer, as where outbound UDP is blocked).
    pub transport: Transport,
    /// `crl`: the federation's revocation list (PEM), checked against the coordinator's
    /// certificate; read at start.
    pub crl: Option<PathBuf>,
    pub tls: TlsFiles,
    /// Dataset name -> CSV file. Only the names are ever sent to the coordinator.
    pub datasets: BTreeMap<String, PathBuf>,
    /// `state_dir`: held manifests and the custodian's decisions (default: a folder named after
    /// the config file, `node-state/` beside `node.toml`, so nodes sharing a folder never share
    /// state).
    pub state_dir: PathBuf,
    /// `audit_log`: the tamper-evident audit log (default: `audit.jsonl` in the state folder).
    pub audit_log: PathBuf,
    /// `privacy_ledger`: the privacy-budget ledger (default: `privacy-ledger.json` in the
    /// state folder).
    pub privacy_ledger: PathBuf,
    /// `[policy]`: the custodian's rules.
    pub policy: SitePolicy,
}

impl NodeConfig {
    /// Read and validate the config file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            action: "cannot read",
            path: path.to_owned(),
            source: e,
        })?;
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        Self::from_toml_str(&text, &base, &path.display().to_string())
    }

    /// Parse and validate config text. Relative paths are resolved against `base_dir`; `label`
    /// names the file in errors, and its stem names the default state folder.
    pub fn from_toml_str(text: &str, base_dir: &Path, label: &str) -> Result<Self> {
        let raw: RawNode = toml::from_str(text).map_err(|e| fedstat_core::Error::Toml {
            path: PathBuf::from(label),
            message: e.to_string(),
        })?;
        let base = base_dir;
        let what = format!("node config {label}");
        let invalid = |key: String, problem: &str| -> Error {
            fedstat_core::Error::Config {
                what: what.clone(),
                key,
                problem: problem.into(),
            }
            .into()
        };
        if raw.coordinator.trim().is_empty() {
            return Err(invalid("coordinator".into(), "must be host:port"));
        }
        if raw.server_name.trim().is_empty() {
            return Err(invalid(
                "server_name".into(),
                "must name the coordinator's DNS name or IP address as in its certificate",
            ));
        }
        for name in raw.datasets.keys() {
            if name.is_empty() || name.len() > 128 || name.chars().any(fedstat_core::text::is_unprintable) {
                return Err(invalid(
                    format!("datasets.{name}"),
                    "dataset names are 1 to 128 printable characters",
                ));
            }
        }
        let policy = raw
            .policy
            .validate()
            .map_err(|(key, problem)| invalid(key, &problem))?;
        let stem = Path::new(label)
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .unwrap_or("node");
        let state_dir = base.join(
            raw.state_dir
                .unwrap_or_else(|| PathBuf::from(format!("{stem}-state"))),
        );
        if state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir".into(), "must name a folder"));
        }
        let audit_log = match raw.audit_log {
            Some(p) if p.as_os_str().is_empty() => {
                return Err(invalid("audit_log".into(), "must name a file"));
            }
            Some(p) => base.join(p),
            None => state_dir.join("audit.jsonl"),
        };
        let privacy_ledger = match raw.privacy_ledger {
            Some(p) if p.as_os_str().is_empty() => {
                return Err(invalid("privacy_ledger".into(), "must name a file"));
            }
            Some(p) => base.join(p),
            None => state_dir.join("privacy-ledger.json"),
        };
        Ok(NodeConfig {
            privacy_ledger,
            coordinator: raw.coordinator,
            server_name: raw.server_name,
            transport: raw.transport,
            crl: raw.crl.map(|p| base.join(p)),
            tls: TlsFiles {
                ca_cert: base.join(raw.tls.ca_cert),
                cert: base.join(raw.tls.cert),
                key: base.join(raw.tls.key),
            },
            datasets: raw.datasets.into_iter().map(|(k, v)| (k, base.join(v))).collect(),
            state_dir,
            audit_log,
            policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ApprovalMode;

    const MINIMAL: &str =
        "coordinator = \"c:1\"\nserver_name = \"c\"\n[tls]\nca_cert = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n.key\"\n";

    #[test]
    fn defaults_put_state_beside_the_file_under_its_name() {
        let cfg = NodeConfig::from_toml_str(MINIMAL, Path::new("/etc/fedstat"), "/etc/fedstat/ons.toml")
            .expect("valid");
        assert_eq!(cfg.state_dir, Path::new("/etc/fedstat/ons-state"));
        assert_eq!(cfg.audit_log, Path::new("/etc/fedstat/ons-state/audit.jsonl"));
        assert_eq!(
            cfg.privacy_ledger,
            Path::new("/etc/fedstat/ons-state/privacy-ledger.json")
        );
        assert_eq!(cfg.policy, SitePolicy::default());
    }

    #[test]
    fn policy_and_state_keys_parse_and_errors_name_the_key() {
        let text = format!(
            "state_dir = \"/var/lib/fedstat\"\naudit_log = \"audit/node.jsonl\"\n{MINIMAL}\
             [policy]\napproval = \"manual\"\nallowed_models = [\"linear\"]\nmax_rounds = 50\n"
        );
        let cfg = NodeConfig::from_toml_str(&text, Path::new("/etc/fedstat"), "node.toml").expect("valid");
        assert_eq!(cfg.state_dir, Path::new("/var/lib/fedstat"));
        assert_eq!(cfg.audit_log, Path::new("/etc/fedstat/audit/node.jsonl"));
        assert_eq!(cfg.policy.approval, ApprovalMode::Manual);
        assert_eq!(cfg.policy.max_rounds, 50);

        let err = NodeConfig::from_toml_str(
            &format!("{MINIMAL}[policy]\nmin_train_rows = 0\n"),
            Path::new("."),
            "n.toml",
        )
        .expect_err("invalid")
        .to_string();
        assert!(
            err.contains("policy.min_train_rows") && err.contains("n.toml"),
            "{err}"
        );
        let err = NodeConfig::from_toml_str(
            &format!("{MINIMAL}[policy]\nmax_round = 3\n"),
            Path::new("."),
            "n.toml",
        )
        .expect_err("unknown key")
        .to_string();
        assert!(err.contains("max_round"), "{err}");
        assert!(NodeConfig::from_toml_str("\u{0}", Path::new("."), "fuzz").is_err());
    }
}
