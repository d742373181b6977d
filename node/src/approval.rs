//! The custodian's approvals, kept in the node's state folder:
//!
//! - `pending/HASH.json`: a held manifest, exactly the canonical bytes its hash is taken over
//!   (so `sha256sum` of the file gives the hash, and the custodian reads exactly what is asked);
//! - `decisions/HASH.json`: the custodian's decision on a manifest (approved, or rejected with a
//!   reason), with the manifest itself.
//!
//! One file per manifest, each written atomically (temporary file, fsync, rename, fsync of the
//! folder): the running node reads a decision on every task and never sees half a file, and the
//! `approve`/`reject` commands never race the node on a shared file.

use std::path::{Path, PathBuf};

use fedstat_core::files::{atomic_write, Access};
use fedstat_proto::manifest::hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Longest reason a custodian may give (it is sent to the researcher).
pub const MAX_REASON: usize = 500;
/// Shortest hash prefix `approve` and `reject` accept.
pub const MIN_PREFIX: usize = 8;

/// A decision as stored in `decisions/HASH.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRecord {
    pub manifest: String,
    pub decision: Verdict,
    /// The custodian's reason for a rejection (empty for an approval).
    #[serde(default)]
    pub reason: String,
    /// RFC 3339 UTC.
    pub decided_at: String,
    /// The manifest that was decided on, as JSON.
    pub content: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Approved,
    Rejected,
}

/// A held manifest, summarised for `fedstat-node pending`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub hash: String,
    /// False when the file's bytes no longer hash to its name (edited after it was held).
    pub intact: bool,
    pub content: serde_json::Value,
}

impl Pending {
    /// One block of text for the custodian: every field that changes what the node would
    /// release. The researcher's text is printed with control and invisible characters escaped
    /// (see [`fedstat_core::text`]), so what is shown is what is approved.
    pub fn describe(&self) -> String {
        use serde_json::Value;
        let c = &self.content;
        let spec = &c["spec"];
        let s = |v: &Value| -> String {
            let raw = match v {
                Value::String(s) => s.clone(),
                Value::Null => "-".to_owned(),
                other => other.to_string(),
            };
            fedstat_core::text::printable(&raw).into_owned()
        };
        let schema = &spec["schema"];
        let t = &schema["target"];
        let target = if schema.is_null() {
            "-".to_owned()
        } else if t.is_null() && !spec["formula"].is_null() {
            "the formula's left-hand side".to_owned()
        } else if !t["threshold"].is_null() {
            format!(
                "{} > {} (1 above the threshold, else 0)",
                s(&t["column"]),
                s(&t["threshold"])
            )
        } else if !t["positive_level"].is_null() {
            format!(
                "{} = {} (1 for that level, else 0)",
                s(&t["column"]),
                s(&t["positive_level"])
            )
        } else if t["log"].as_bool() == Some(true) {
            format!("log({})", s(&t["column"]))
        } else {
            s(&t["column"])
        };
        let mut features = Vec::new();
        for f in schema["numeric"].as_array().into_iter().flatten() {
            let squared = if f["squared"].as_bool() == Some(true) {
                " (and its square)"
            } else {
                ""
            };
            features.push(format!("{}{squared}", s(&f["column"])));
        }
        for f in schema["categorical"].as_array().into_iter().flatten() {
            let levels: Vec<String> = f["levels"].as_array().into_iter().flatten().map(s).collect();
            features.push(format!(
                "{} [levels: {}; reference {}]",
                s(&f["column"]),
                levels.join(", "),
                s(&f["reference"])
            ));
        }
        let columns = c["columns"]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let tr = &spec["training"];
        let mut out = format!("manifest {}", self.hash);
        if !self.intact {
            out.push_str("  (FILE ALTERED: its content no longer matches this hash; it cannot be approved)");
        }
        let row = |out: &mut String, label: &str, value: String| {
            out.push_str(&format!("\n  {label:<12}{value}"));
        };
        row(&mut out, "submitter:", s(&c["submitter"]));
        row(&mut out, "name:", s(&spec["name"]));
        row(&mut out, "purpose:", s(&spec["purpose"]));
        row(&mut out, "model:", s(&spec["model"]));
        row(&mut out, "dataset:", s(&spec["dataset"]));
        row(&mut out, "split:", s(&schema["split_column"]));
        row(&mut out, "target:", target);
        // The formula exactly as written (only control and invisible characters escaped):
        // what the custodian approves is the researcher's own text.
        if !spec["formula"].is_null() {
            row(&mut out, "formula:", s(&spec["formula"]));
        }
        if !spec["method"].is_null() {
            row(&mut out, "method:", s(&spec["method"]));
        }
        if !spec["weights"].is_null() {
            row(&mut out, "weights:", s(&spec["weights"]));
        }
        if !spec["offset"].is_null() {
            row(&mut out, "offset:", s(&spec["offset"]));
        }
        if spec["office_effects"].as_bool() == Some(true) {
            let offices: Vec<String> = spec["offices"].as_array().into_iter().flatten().map(s).collect();
            row(
                &mut out,
                "offices:",
                format!(
                    "office effects: one column per office but the first (reference) of {}",
                    offices.join(", ")
                ),
            );
        }
        row(
            &mut out,
            "features:",
            if features.is_empty() {
                "-".to_owned()
            } else {
                features.join("; ")
            },
        );
        row(
            &mut out,
            "parameters:",
            if columns.is_empty() {
                "-".to_owned()
            } else {
                columns
            },
        );
        if !spec["echo"].is_null() {
            row(
                &mut out,
                "echo:",
                format!("{} parameters", s(&spec["echo"]["params"])),
            );
        }
        row(
            &mut out,
            "rounds:",
            format!(
                "{}, each with at least min_nodes = {} offices; {} s per phase, up to {} retries",
                s(&spec["rounds"]),
                s(&spec["min_nodes"]),
                s(&spec["round_timeout_secs"]),
                s(&spec["max_round_retries"])
            ),
        );
        row(
            &mut out,
            "training:",
            format!(
                "local_epochs {}, batch_size {}, learning_rate {}, l2 {}, seed {}",
                s(&tr["local_epochs"]),
                s(&tr["batch_size"]),
                s(&tr["learning_rate"]),
                s(&tr["l2"]),
                s(&tr["seed"])
            ),
        );
        // Who sees what: secure aggregation and its threshold, then every DP parameter.
        row(
            &mut out,
            "secure agg:",
            if spec["secure_aggregation"].as_bool() == Some(true) {
                let t = &spec["secure_threshold"];
                format!(
                    "on: the coordinator sees only the sum of at least {} offices",
                    if t.is_null() {
                        "max(min_nodes, a majority of the round's)".to_owned()
                    } else {
                        s(t)
                    }
                )
            } else {
                "off: the coordinator sees this office's own answers".to_owned()
            },
        );
        let dp = &spec["privacy"];
        if dp.is_null() {
            row(&mut out, "privacy:", "none: exact sums are released".to_owned());
        } else {
            let mut text = format!(
                "noise_multiplier {}, delta {}",
                s(&dp["noise_multiplier"]),
                s(&dp["delta"])
            );
            if !dp["clip_norm"].is_null() || !dp["sampling_rate"].is_null() {
                text.push_str(&format!(
                    "; DP-SGD: clip_norm {}, sampling_rate {}",
                    s(&dp["clip_norm"]),
                    s(&dp["sampling_rate"])
                ));
                // As the privacy cost counts them: ceil(local_epochs / q).
                if let (Some(e), Some(q)) = (tr["local_epochs"].as_f64(), dp["sampling_rate"].as_f64()) {
                    if q > 0.0 {
                        text.push_str(&format!(", {} steps per round", (e.max(1.0) / q).ceil()));
                    }
                }
            }
            row(&mut out, "privacy:", text);
            let bounds: Vec<String> = dp["bounds"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| format!("{} in [{}, {}]", s(&b["column"]), s(&b["lower"]), s(&b["upper"])))
                .collect();
            row(
                &mut out,
                "dp bounds:",
                if bounds.is_empty() {
                    "-".to_owned()
                } else {
                    bounds.join("; ")
                },
            );
            let node = &dp["node_level"];
            row(
                &mut out,
                "node-level:",
                if node.is_null() {
                    "off".to_owned()
                } else {
                    format!(
                        "update change clipped to {}, noise_multiplier {} (shared by the secure sum's threshold)",
                        s(&node["clip_norm"]),
                        s(&node["noise_multiplier"])
                    )
                },
            );
        }
        out.push('\n');
        out
    }
}

/// The approval state under one node's state folder.
#[derive(Debug, Clone)]
pub struct ApprovalStore {
    dir: PathBuf,
}

impl ApprovalStore {
    pub fn new(state_dir: &Path) -> Self {
        ApprovalStore {
            dir: state_dir.to_owned(),
        }
    }

    fn pending_dir(&self) -> PathBuf {
        self.dir.join("pending")
    }

    fn decisions_dir(&self) -> PathBuf {
        self.dir.join("decisions")
    }

    /// The decision on a manifest, if any. Read from disk on every call, so decisions made by
    /// the CLI while the node runs take effect on the next task.
    pub fn decision(&self, hash: &str) -> Result<Option<DecisionRecord>> {
        check_hash(hash)?;
        let path = self.decisions_dir().join(format!("{hash}.json"));
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("cannot read", &path, e)),
        };
        let record: DecisionRecord = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Approval(format!("{}: not a decision file: {e}", path.display())))?;
        if record.manifest != hash {
            return Err(Error::Approval(format!(
                "{}: names manifest {}, not the one in its file name",
                path.display(),
                record.manifest
            )));
        }
        Ok(Some(record))
    }

    /// Hold a manifest for the custodian: write its canonical bytes to `pending/HASH.json`.
    /// Returns whether it was newly held.
    pub fn hold(&self, hash: &str, canonical: &[u8]) -> Result<bool> {
        check_hash(hash)?;
        let path = self.pending_dir().join(format!("{hash}.json"));
        if path.is_file() {
            return Ok(false);
        }
        atomic_write(&path, canonical, Access::OwnerOnly)?;
        Ok(true)
    }

    /// Held manifests, sorted by hash.
    pub fn pending(&self) -> Result<Vec<Pending>> {
        let dir = self.pending_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("cannot list", &dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io("cannot list", &dir, e))?;
            let name = entry.file_name();
            let Some(hash) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if check_hash(hash).is_err() {
                continue;
            }
            out.push(self.read_pending(hash)?);
        }
        out.sort_by(|a, b| a.hash.cmp(&b.hash));
        Ok(out)
    }

    fn read_pending(&self, hash: &str) -> Result<Pending> {
        let path = self.pending_dir().join(format!("{hash}.json"));
        let bytes = std::fs::read(&path).map_err(|e| io("cannot read", &path, e))?;
        let intact = hex(&Sha256::digest(&bytes)) == hash;
        let content = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok(Pending {
            hash: hash.to_owned(),
            intact,
            content,
        })
    }

    /// Find the held (or already decided) manifest a full hash or a unique prefix of at least
    /// [`MIN_PREFIX`] characters names.
    pub fn resolve(&self, prefix: &str) -> Result<String> {
        let prefix = prefix.trim().to_ascii_lowercase();
        if prefix.len() < MIN_PREFIX || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Approval(format!(
                "`{}` is not a manifest hash: give the 64 hex digits `fedstat-node pending` shows, or at least the first {MIN_PREFIX}",
                prefix.escape_debug()
            )));
        }
        let mut matches = std::collections::BTreeSet::new();
        for dir in [self.pending_dir(), self.decisions_dir()] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("cannot list", &dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| io("cannot list", &dir, e))?;
                if let Some(hash) = entry.file_name().to_str().and_then(|n| n.strip_suffix(".json")) {
                    if check_hash(hash).is_ok() && hash.starts_with(&prefix) {
                        matches.insert(hash.to_owned());
                    }
                }
            }
        }
        match matches.len() {
            1 => Ok(matches.into_iter().next().unwrap_or_default()),
            0 => Err(Error::Approval(format!(
                "no held manifest matches `{prefix}`: see `fedstat-node pending`"
            ))),
            n => Err(Error::Approval(format!(
                "{n} manifests match `{prefix}`: give more digits"
            ))),
        }
    }

    /// Approve a held (or earlier rejected) manifest.
    pub fn approve(&self, hash_or_prefix: &str) -> Result<DecisionRecord> {
        self.decide(hash_or_prefix, Verdict::Approved, String::new())
    }

    /// Reject a held (or earlier approved) manifest; the reason is sent to the researcher.
    pub fn reject(&self, hash_or_prefix: &str, reason: &str) -> Result<DecisionRecord> {
        let reason = reason.trim();
        if reason.is_empty() || reason.chars().count() > MAX_REASON || reason.chars().any(char::is_control) {
            return Err(Error::Approval(format!(
                "the reason must be 1 to {MAX_REASON} characters on one line; it is sent to the researcher"
            )));
        }
        self.decide(hash_or_prefix, Verdict::Rejected, reason.to_owned())
    }

    fn decide(&self, hash_or_prefix: &str, verdict: Verdict, reason: String) -> Result<DecisionRecord> {
        let hash = self.resolve(hash_or_prefix)?;
        let content = match self.decision(&hash)? {
            Some(earlier) => earlier.content,
            None => {
                let pending = self.read_pending(&hash)?;
                if !pending.intact {
                    return Err(Error::Approval(format!(
                        "pending/{hash}.json was altered after the node held it: its content no longer matches the hash; \
                         delete it and let the node hold the experiment again"
                    )));
                }
                pending.content
            }
        };
        let record = DecisionRecord {
            manifest: hash.clone(),
            decision: verdict,
            reason,
            decided_at: fedstat_core::audit::now_rfc3339(),
            content,
        };
        let bytes = serde_json::to_vec_pretty(&record)
            .map_err(|e| Error::Approval(format!("cannot encode the decision: {e}")))?;
        atomic_write(
            &self.decisions_dir().join(format!("{hash}.json")),
            &bytes,
            Access::OwnerOnly,
        )?;
        let pending = self.pending_dir().join(format!("{hash}.json"));
        match std::fs::remove_file(&pending) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot remove", &pending, e)),
        }
        Ok(record)
    }
}

/// A full manifest hash: 64 lower-case hex digits (never a path).
fn check_hash(hash: &str) -> Result<()> {
    if hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Error::Approval(format!(
            "`{}` is not a manifest hash",
            hash.escape_debug()
        )))
    }
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstat_core::spec::ExperimentSpec;
    use fedstat_proto::manifest::Manifest;

    fn manifest_bytes(rounds: u32) -> (String, Vec<u8>) {
        let mut spec: ExperimentSpec =
            toml::from_str(include_str!("../../configs/experiment-logit.toml")).expect("example");
        spec.rounds = rounds;
        let m = Manifest::new(&spec, "researcher `alice`");
        (m.hash(), m.canonical_json())
    }

    #[test]
    fn pending_escapes_control_and_invisible_characters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ApprovalStore::new(dir.path());
        let mut spec: ExperimentSpec =
            toml::from_str(include_str!("../../configs/experiment-logit.toml")).expect("example");
        // Refused at submission today; an old or forged manifest must still print safely.
        spec.name = "fine\u{1b}[2J\u{202E}name".into();
        spec.purpose = "line one\nAPPROVED BY CUSTODIAN".into();
        let m = Manifest::new(&spec, "researcher `alice`");
        store.hold(&m.hash(), &m.canonical_json()).expect("hold");
        let text = store.pending().expect("list")[0].describe();
        assert!(text.contains("fine\\u{1b}[2J\\u{202e}name"), "{text}");
        assert!(text.contains("line one\\nAPPROVED"), "{text}");
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
    }

    #[test]
    fn hold_list_approve_reject_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ApprovalStore::new(&dir.path().join("state"));
        assert!(store.pending().expect("empty").is_empty());
        let (h1, b1) = manifest_bytes(20);
        let (h2, b2) = manifest_bytes(21);
        assert_ne!(h1, h2);
        assert!(store.hold(&h1, &b1).expect("hold"));
        assert!(!store.hold(&h1, &b1).expect("held once"));
        assert!(store.hold(&h2, &b2).expect("hold"));
        assert_eq!(store.decision(&h1).expect("read"), None);

        // The pending file is exactly the hashed bytes.
        let file = dir.path().join(format!("state/pending/{h1}.json"));
        assert_eq!(std::fs::read(&file).expect("pending file"), b1);
        let listed = store.pending().expect("list");
        assert_eq!(listed.len(), 2);
        let text = listed.iter().find(|p| p.hash == h1).expect("h1").describe();
        for shown in [
            "researcher `alice`",
            "rounds:     20, each with at least min_nodes = 3 offices; 60 s per phase, up to 2 retries",
            "target:     wage > 522.32 (1 above the threshold, else 0)",
            "features:   education; experience (and its square); ethnicity [levels: cauc, afam; reference cauc]",
            "parameters: const, education, experience",
            "training:   local_epochs 3, batch_size 32, learning_rate 0.05, l2 0.0, seed 1",
        ] {
            assert!(text.contains(shown), "{shown:?} not in {text}");
        }

        let approved = store.approve(&h1[..10]).expect("approve by prefix");
        assert_eq!(approved.decision, Verdict::Approved);
        assert_eq!(store.decision(&h1).expect("read"), Some(approved));
        assert!(!file.exists(), "no longer pending");
        assert_eq!(store.pending().expect("list").len(), 1);

        let rejected = store
            .reject(&h2, "  no income models this quarter ")
            .expect("reject");
        assert_eq!(rejected.reason, "no income models this quarter");
        assert_eq!(
            store.decision(&h2).expect("read").map(|d| d.decision),
            Some(Verdict::Rejected)
        );
        // A decision can be changed; the manifest content is kept.
        let changed = store.approve(&h2).expect("re-decide");
        assert_eq!(changed.content["spec"]["rounds"], 21);
        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("state/decisions"))
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn pending_shows_every_privacy_setting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ApprovalStore::new(dir.path());
        let mut spec: ExperimentSpec =
            toml::from_str(include_str!("../../configs/experiment-logit-dp.toml")).expect("example");
        spec.secure_aggregation = true;
        spec.secure_threshold = Some(3);
        spec.privacy.as_mut().expect("dp").node_level = Some(fedstat_proto::privacy::NodeLevelDp {
            clip_norm: 0.5,
            noise_multiplier: 0.7,
        });
        let m = Manifest::new(&spec, "researcher `alice`");
        store.hold(&m.hash(), &m.canonical_json()).expect("hold");
        let text = store.pending().expect("list")[0].describe();
        for shown in [
            "secure agg: on: the coordinator sees only the sum of at least 3 offices",
            "privacy:    noise_multiplier 2.0, delta 0.00001; DP-SGD: clip_norm 3.0, sampling_rate 0.02, 50 steps per round",
            "dp bounds:  education in [0.0, 20.0]; experience in [-5.0, 65.0]",
            "node-level: update change clipped to 0.5, noise_multiplier 0.7",
        ] {
            assert!(text.contains(shown), "{shown:?} not in {text}");
        }
        let (h, b) = manifest_bytes(20);
        store.hold(&h, &b).expect("hold");
        let plain = store
            .pending()
            .expect("list")
            .into_iter()
            .find(|p| p.hash == h)
            .expect("held");
        assert!(plain
            .describe()
            .contains("privacy:    none: exact sums are released"));
    }

    #[test]
    fn pending_shows_the_formula_as_written_and_the_exact_options() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ApprovalStore::new(dir.path());
        let spec: ExperimentSpec = toml::from_str(
            r#"
name = "visits"
dataset = "cps1988"
model = "poisson"
method = "exact"
formula = "wage ~ education*ethnicity + I(experience^2)"
weights = "w"
offset = "log(exposure)"
office_effects = true
offices = ["north", "south"]
[schema]
categorical = [{ column = "ethnicity", levels = ["cauc", "afam"], reference = "cauc" }]
"#,
        )
        .expect("spec");
        let m = Manifest::new(&spec, "researcher `alice`");
        store.hold(&m.hash(), &m.canonical_json()).expect("hold");
        let text = store.pending().expect("list")[0].describe();
        for shown in [
            "formula:    wage ~ education*ethnicity + I(experience^2)",
            "target:     the formula's left-hand side",
            "method:     exact",
            "weights:    w",
            "offset:     log(exposure)",
            "office effects: one column per office but the first (reference) of north, south",
            "parameters: const, education, ethnicity=afam, experience^2, education:ethnicity=afam, office=south",
        ] {
            assert!(text.contains(shown), "{shown:?} not in {text}");
        }
    }

    #[test]
    fn bad_hashes_reasons_and_altered_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ApprovalStore::new(dir.path());
        let (h, b) = manifest_bytes(20);
        store.hold(&h, &b).expect("hold");
        assert!(store.approve("abc").is_err(), "too short a prefix");
        assert!(store.approve("../../etc/passwd").is_err());
        assert!(store.approve(&"0".repeat(64)).is_err(), "not held");
        assert!(store.decision("../x").is_err());
        assert!(store.reject(&h, "").is_err());
        assert!(store.reject(&h, "two\nlines").is_err());
        assert!(store.reject(&h, &"x".repeat(MAX_REASON + 1)).is_err());
        // Edited after it was held: the custodian would approve something else than was asked.
        let file = dir.path().join(format!("pending/{h}.json"));
        let edited = String::from_utf8(b)
            .expect("utf-8")
            .replace("\"rounds\":20", "\"rounds\":2");
        std::fs::write(&file, edited).expect("edit");
        assert!(!store.pending().expect("list")[0].intact);
        let err = store.approve(&h).expect_err("altered").to_string();
        assert!(err.contains("altered"), "{err}");
    }
}
