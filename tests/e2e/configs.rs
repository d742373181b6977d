//! Every example in `configs/` parses and validates, so the documented examples never rot.

use fedstat_coordinator::config::{CoordinatorConfig, ResearcherConfig};
use fedstat_node::config::NodeConfig;

use crate::support::repo;

#[test]
fn every_example_config_parses() {
    let dir = repo().join("configs");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let result = match name.as_str() {
            "coordinator.toml" => CoordinatorConfig::load(&path)
                .map(drop)
                .map_err(|e| e.to_string()),
            "node.toml" => NodeConfig::load(&path).map(drop).map_err(|e| e.to_string()),
            "researcher.toml" => ResearcherConfig::load(&path).map(drop).map_err(|e| e.to_string()),
            n if n.starts_with("experiment-") => fedstat_core::spec::from_toml_file(&path)
                .map(drop)
                .map_err(|e| e.to_string()),
            other => panic!("configs/{other}: no test knows this kind of file; add it here"),
        };
        result.unwrap_or_else(|e| panic!("configs/{name}: {e}"));
        seen.push(name);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "coordinator.toml",
            "experiment-echo.toml",
            "experiment-formula.toml",
            "experiment-glm.toml",
            "experiment-linear.toml",
            "experiment-logit-dp.toml",
            "experiment-logit.toml",
            "experiment-ols-dp.toml",
            "experiment-table-dp.toml",
            "experiment-table.toml",
            "node.toml",
            "researcher.toml"
        ]
    );
}

#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coordinator.toml");
    let base = std::fs::read_to_string(repo().join("configs/coordinator.toml")).expect("example");
    std::fs::write(
        &path,
        base.replace("max_concurrent_updates = 4", "max_concurrent_updates = 0"),
    )
    .expect("write");
    let err = CoordinatorConfig::load(&path).expect_err("invalid").to_string();
    assert!(err.contains("limits.max_concurrent_updates"), "{err}");
    std::fs::write(&path, base.replace("listen =", "listen_on =")).expect("write");
    let err = CoordinatorConfig::load(&path)
        .expect_err("unknown key")
        .to_string();
    assert!(err.contains("listen_on"), "{err}");
}
