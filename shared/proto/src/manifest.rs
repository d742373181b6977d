//! The canonical manifest of an experiment: everything a data custodian approves (model, schema,
//! columns, rounds, training and any strategy or privacy settings, submitter, purpose), and its
//! SHA-256 hash. Any change to the experiment changes the hash, so it needs a new approval.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::spec::ExperimentSpec;

/// Version of the manifest layout. 2: exact GLMs, formulas, weights, offsets, office effects
/// and tables joined the form. 3: secure aggregation and differential privacy.
pub const MANIFEST_VERSION: u32 = 3;

/// What a custodian approves. Serialised as JSON with fields in declaration order and no
/// whitespace: the same experiment always gives the same bytes, on every platform.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Manifest<'a> {
    /// Version of this layout; part of the hash.
    pub manifest_version: u32,
    pub submitter: &'a str,
    /// Design columns in parameter order (empty for `echo`).
    pub columns: Vec<String>,
    pub spec: &'a ExperimentSpec,
}

impl<'a> Manifest<'a> {
    pub fn new(spec: &'a ExperimentSpec, submitter: &'a str) -> Self {
        Manifest {
            manifest_version: MANIFEST_VERSION,
            submitter,
            columns: spec.design_columns(),
            spec,
        }
    }

    /// The canonical bytes.
    pub fn canonical_json(&self) -> Vec<u8> {
        // Serialising plain structs of strings, numbers and vectors cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Lower-case hex SHA-256 of the canonical bytes.
    pub fn hash(&self) -> String {
        hex(&Sha256::digest(self.canonical_json()))
    }
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ExperimentSpec {
        toml::from_str(include_str!("../../../configs/experiment-logit.toml")).expect("example experiment")
    }

    #[test]
    fn hash_is_stable_and_sensitive_to_every_change() {
        let s = spec();
        let h = Manifest::new(&s, "researcher `alice`").hash();
        assert_eq!(h.len(), 64);
        assert_eq!(h, Manifest::new(&s.clone(), "researcher `alice`").hash());
        assert_ne!(h, Manifest::new(&s, "researcher `bob`").hash());
        let mut t = s.clone();
        t.rounds += 1;
        assert_ne!(h, Manifest::new(&t, "researcher `alice`").hash());
        let mut t = s.clone();
        t.purpose.push('.');
        assert_ne!(h, Manifest::new(&t, "researcher `alice`").hash());
        let mut t = s;
        t.training.learning_rate *= 1.0000001;
        assert_ne!(h, Manifest::new(&t, "researcher `alice`").hash());
    }

    /// The hash of a fixed experiment, written down: a refactor that changes the manifest's
    /// bytes (a renamed or reordered field, a new default) fails here, because it would void
    /// every custodian's approval. Change it only with `manifest_version`, on purpose.
    #[test]
    fn hash_of_the_shipped_example_is_pinned() {
        assert_eq!(
            Manifest::new(&spec(), "researcher `alice`").hash(),
            "93408eeb1432a3685de318d452951b208e426a87f0a39b71757a85b5845b7570"
        );
    }
}
