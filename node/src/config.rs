//! The node's config file, owned by the office's IT staff: where the coordinator is, the
//! node's certificate, and which local datasets it offers (name -> CSV path). Paths are
//! resolved against the file's folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedstat_shared::tls::TlsFiles;
use serde::Deserialize;

use crate::{Error, Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    coordinator: String,
    #[serde(default = "default_server_name")]
    server_name: String,
    tls: RawTls,
    #[serde(default)]
    datasets: BTreeMap<String, PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_cert: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn default_server_name() -> String {
    "localhost".to_owned()
}

/// Validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// `host:port` of the coordinator (the node dials out; nothing dials in).
    pub coordinator: String,
    /// Name the coordinator's certificate must carry.
    pub server_name: String,
    pub tls: TlsFiles,
    /// Dataset name -> CSV file. Only the names are ever sent to the coordinator.
    pub datasets: BTreeMap<String, PathBuf>,
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            action: "cannot read",
            path: path.to_owned(),
            source: e,
        })?;
        let raw: RawNode = toml::from_str(&text).map_err(|e| fedstat_shared::Error::Toml {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        let what = format!("node config {}", path.display());
        let invalid = |key: String, problem: &str| -> Error {
            fedstat_shared::Error::Config {
                what: what.clone(),
                key,
                problem: problem.into(),
            }
            .into()
        };
        if raw.coordinator.trim().is_empty() {
            return Err(invalid("coordinator".into(), "must be host:port"));
        }
        for name in raw.datasets.keys() {
            if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control()) {
                return Err(invalid(
                    format!("datasets.{name}"),
                    "dataset names are 1 to 128 printable characters",
                ));
            }
        }
        Ok(NodeConfig {
            coordinator: raw.coordinator,
            server_name: raw.server_name,
            tls: TlsFiles {
                ca_cert: base.join(raw.tls.ca_cert),
                cert: base.join(raw.tls.cert),
                key: base.join(raw.tls.key),
            },
            datasets: raw.datasets.into_iter().map(|(k, v)| (k, base.join(v))).collect(),
        })
    }
}
