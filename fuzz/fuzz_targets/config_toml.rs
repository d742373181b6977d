//! Config text: an experiment spec (TOML from a researcher, then `validate`), a coordinator
//! config and a node config (the first byte picks one). Parsing and validation return a value
//! or an error naming the key; they never panic.
#![no_main]

use std::path::Path;

use fedstat_coordinator::config::CoordinatorConfig;
use fedstat_core::spec::ExperimentSpec;
use fedstat_node::config::NodeConfig;
use fedstat_proto::manifest::Manifest;
use fedstat_proto::wire::{decode_payload, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let base = Path::new("/etc/fedstat");
    match pick % 3 {
        0 => {
            let Ok(spec) = toml::from_str::<ExperimentSpec>(text) else {
                return;
            };
            if fedstat_core::spec::validate(&spec).is_err() {
                return;
            }
            let _ = spec.num_params();
            let _ = spec.dtype();
            if let Some(schema) = &spec.schema {
                let _ = schema.design_columns();
            }
            let _ = Manifest::new(&spec, "researcher `fuzz`").hash();
            // A valid spec travels to the coordinator and the nodes inside frames.
            let frame = encode_frame(&spec).expect("a valid spec encodes");
            let back: ExperimentSpec = decode_payload(&frame[4..], "spec").expect("and decodes");
            fedstat_core::spec::validate(&back).expect("and is still valid");
        }
        1 => {
            let _ = CoordinatorConfig::from_toml_str(text, base, "coordinator.toml");
        }
        _ => {
            let _ = NodeConfig::from_toml_str(text, base, "node.toml");
        }
    }
});
