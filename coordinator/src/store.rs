//! The coordinator's durable store: an SQLite database (WAL, synchronous writes) holding
//! experiments, their manifests, round records, the event log and references to the global model
//! of every completed round. Models live beside it in `models/<sha256>.bin`, written atomically
//! (temp file, fsync, rename, fsync of the folder) and checked against their hash when read.
//! A DBA can open `fedstat.db` with the `sqlite3` tool; ARCHITECTURE.md documents the tables.

use std::io::Write;
use std::path::{Path, PathBuf};

use fedstat_core::aggregate::Values;
use fedstat_core::audit::now_rfc3339;
use fedstat_core::data::Standardization;
use fedstat_core::engine::Restored;
use fedstat_core::files::{atomic_write, Access};
use fedstat_core::spec::ExperimentSpec;
use fedstat_proto::manifest::{hex, Manifest};
use fedstat_proto::wire::{DType, EventRecord, ExperimentId, ExperimentState, RoundRecord};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Version of the schema below; stored in `meta`.
/// 2: `experiments.output_json` (GLM inference, tables); a version-1 store is upgraded in place.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS experiments (
    id             INTEGER PRIMARY KEY,
    name           TEXT NOT NULL,
    submitter      TEXT NOT NULL,
    manifest_hash  TEXT NOT NULL,
    manifest_json  TEXT NOT NULL,
    spec_json      TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('running', 'completed', 'failed', 'cancelled')),
    failure        TEXT,
    standardization_json TEXT,
    output_json    TEXT,
    submitted_at   TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    experiment_id  INTEGER NOT NULL REFERENCES experiments(id),
    round          INTEGER NOT NULL,
    participants_json TEXT NOT NULL,
    total_examples INTEGER NOT NULL,
    train_loss     REAL NOT NULL,
    metrics_json   TEXT,
    train_ms       INTEGER NOT NULL,
    round_ms       INTEGER NOT NULL,
    retries        INTEGER NOT NULL,
    model_sha256   TEXT NOT NULL REFERENCES models(sha256),
    completed_at   TEXT NOT NULL,
    PRIMARY KEY (experiment_id, round)
);
CREATE TABLE IF NOT EXISTS models (
    sha256  TEXT PRIMARY KEY,
    dtype   TEXT NOT NULL CHECK (dtype IN ('f32', 'f64')),
    len     INTEGER NOT NULL,
    bytes   INTEGER NOT NULL,
    path    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id  INTEGER NOT NULL REFERENCES experiments(id),
    at_ms          INTEGER NOT NULL,
    message        TEXT NOT NULL,
    logged_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_experiment ON events (experiment_id, id);
";

/// The store; `None` inside when the coordinator runs without one (benchmarks).
pub struct Store {
    inner: Option<Inner>,
}

struct Inner {
    db: Connection,
    models: PathBuf,
    path: PathBuf,
    /// Held as long as the store is open (see [`fedstat_core::files::lock_dir`]).
    _lock: fedstat_core::files::DirLock,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(i) => write!(f, "Store({})", i.path.display()),
            None => f.write_str("Store(in memory)"),
        }
    }
}

fn db_err(path: &Path, e: rusqlite::Error) -> Error {
    Error::Store(format!("{}: {e}", path.display()))
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Store(format!("cannot encode a record: {e}")))
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Store(format!("corrupt {what} in the store: {e}")))
}

impl Store {
    /// A coordinator without durable state: nothing survives a restart.
    pub fn in_memory() -> Store {
        Store { inner: None }
    }

    /// Open (or create) the store in `dir`. Everything that can go wrong with the folder or the
    /// database is found here, at start-up, not in the middle of a run.
    pub fn open(dir: &Path) -> Result<Store> {
        let hint =
            "check that the folder exists, is a folder, and is writable by this user (config key `data_dir`)";
        let models = dir.join("models");
        std::fs::create_dir_all(&models).map_err(|e| {
            Error::Store(format!(
                "cannot create the data folder {}: {e}; {hint}",
                models.display()
            ))
        })?;
        // Before anything in the folder is written or read: a second coordinator on the same
        // store would interleave rounds and fork the audit log's hash chain.
        let lock = fedstat_core::files::lock_dir(dir, "data folder")?;
        // Prove the folder is writable now (a read-only mount, a full disk, permissions).
        let probe = dir.join(".write-probe");
        std::fs::File::create(&probe)
            .and_then(|mut f| f.write_all(b"ok").and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| {
                Error::Store(format!(
                    "cannot write in the data folder {}: {e}; {hint}",
                    dir.display()
                ))
            })?;
        let path = dir.join("fedstat.db");
        let db = Connection::open(&path).map_err(|e| db_err(&path, e))?;
        let setup = || -> rusqlite::Result<i64> {
            db.pragma_update(None, "journal_mode", "WAL")?;
            db.pragma_update(None, "synchronous", "FULL")?;
            db.pragma_update(None, "foreign_keys", "ON")?;
            db.execute_batch(SCHEMA)?;
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?1)",
                params![SCHEMA_VERSION.to_string()],
            )?;
            let v: String = db.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| {
                r.get(0)
            })?;
            let v = v.parse().unwrap_or(-1);
            if v == 1 {
                // Version 1 lacked the output column; adding it loses nothing.
                let tx = db.unchecked_transaction()?;
                tx.execute("ALTER TABLE experiments ADD COLUMN output_json TEXT", [])?;
                tx.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                    params![SCHEMA_VERSION.to_string()],
                )?;
                tx.commit()?;
                return Ok(SCHEMA_VERSION);
            }
            Ok(v)
        };
        let version = setup().map_err(|e| {
            Error::Store(format!(
                "cannot use the database {}: {e}; if it is not a fedstat store, move it away",
                path.display()
            ))
        })?;
        if version != SCHEMA_VERSION {
            return Err(Error::Store(format!(
                "the database {} has schema version {version}; this coordinator reads version {SCHEMA_VERSION}",
                path.display()
            )));
        }
        Ok(Store {
            inner: Some(Inner {
                db,
                models,
                path,
                _lock: lock,
            }),
        })
    }

    /// The id for the next experiment.
    pub fn next_experiment_id(&self) -> Result<ExperimentId> {
        let Some(i) = &self.inner else { return Ok(1) };
        let max: Option<i64> =
            i.db.query_row("SELECT max(id) FROM experiments", [], |r| r.get(0))
                .map_err(|e| db_err(&i.path, e))?;
        Ok(max.map_or(1, |m| m as u64 + 1))
    }

    pub fn insert_experiment(&self, id: ExperimentId, spec: &ExperimentSpec, submitter: &str) -> Result<()> {
        let Some(i) = &self.inner else { return Ok(()) };
        let manifest = Manifest::new(spec, submitter);
        let now = now_rfc3339();
        i.db.execute(
            "INSERT INTO experiments (id, name, submitter, manifest_hash, manifest_json, spec_json, state,
                                      submitted_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7, ?7)",
            params![
                id as i64,
                spec.name,
                submitter,
                manifest.hash(),
                String::from_utf8_lossy(&manifest.canonical_json()),
                json(spec)?,
                now
            ],
        )
        .map_err(|e| db_err(&i.path, e))?;
        Ok(())
    }

    pub fn set_standardization(&self, id: ExperimentId, st: &Standardization) -> Result<()> {
        let Some(i) = &self.inner else { return Ok(()) };
        i.db.execute(
            "UPDATE experiments SET standardization_json = ?2, updated_at = ?3 WHERE id = ?1",
            params![id as i64, json(st)?, now_rfc3339()],
        )
        .map_err(|e| db_err(&i.path, e))?;
        Ok(())
    }

    pub fn set_output(&self, id: ExperimentId, output: &fedstat_core::output::Output) -> Result<()> {
        let Some(i) = &self.inner else { return Ok(()) };
        i.db.execute(
            "UPDATE experiments SET output_json = ?2, updated_at = ?3 WHERE id = ?1",
            params![id as i64, json(output)?, now_rfc3339()],
        )
        .map_err(|e| db_err(&i.path, e))?;
        Ok(())
    }

    pub fn set_state(&self, id: ExperimentId, state: &ExperimentState) -> Result<()> {
        let Some(i) = &self.inner else { return Ok(()) };
        let (name, failure) = match state {
            ExperimentState::Completed => ("completed", None),
            ExperimentState::Failed { reason } => ("failed", Some(reason.as_str())),
            ExperimentState::Cancelled { by } => ("cancelled", Some(by.as_str())),
            ExperimentState::Waiting | ExperimentState::Running { .. } => ("running", None),
        };
        i.db.execute(
            "UPDATE experiments SET state = ?2, failure = ?3, updated_at = ?4 WHERE id = ?1",
            params![id as i64, name, failure, now_rfc3339()],
        )
        .map_err(|e| db_err(&i.path, e))?;
        Ok(())
    }

    pub fn append_event(&self, id: ExperimentId, event: &EventRecord) -> Result<()> {
        let Some(i) = &self.inner else { return Ok(()) };
        i.db.execute(
            "INSERT INTO events (experiment_id, at_ms, message, logged_at) VALUES (?1, ?2, ?3, ?4)",
            params![id as i64, event.at_ms as i64, event.message, now_rfc3339()],
        )
        .map_err(|e| db_err(&i.path, e))?;
        Ok(())
    }

    /// Record a completed round: first the model file (atomically), then the row that refers
    /// to it, so the database never points at a missing or partial file.
    pub fn record_round(&self, id: ExperimentId, record: &RoundRecord, model: &Values) -> Result<()> {
        let Some(i) = &self.inner else { return Ok(()) };
        let bytes = model.to_le_bytes();
        let sha = hex(&Sha256::digest(&bytes));
        let file = i.models.join(format!("{sha}.bin"));
        if !file.exists() {
            atomic_write(&file, &bytes, Access::OwnerOnly)?;
        }
        let dtype = match model.dtype() {
            DType::F32 => "f32",
            DType::F64 => "f64",
        };
        let tx = i.db.unchecked_transaction().map_err(|e| db_err(&i.path, e))?;
        tx.execute(
            "INSERT OR IGNORE INTO models (sha256, dtype, len, bytes, path) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                sha,
                dtype,
                model.len() as i64,
                bytes.len() as i64,
                format!("models/{sha}.bin")
            ],
        )
        .map_err(|e| db_err(&i.path, e))?;
        tx.execute(
            "INSERT OR REPLACE INTO rounds (experiment_id, round, participants_json, total_examples, train_loss,
                                 metrics_json, train_ms, round_ms, retries, model_sha256, completed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                id as i64,
                record.round,
                json(&record.participants)?,
                record.total_examples as i64,
                record.train_loss,
                record.metrics.as_ref().map(json).transpose()?,
                record.train_ms as i64,
                record.round_ms as i64,
                record.retries,
                sha,
                now_rfc3339()
            ],
        )
        .map_err(|e| db_err(&i.path, e))?;
        tx.commit().map_err(|e| db_err(&i.path, e))
    }

    /// The model stored for a round, checked against its hash.
    pub fn load_model(&self, id: ExperimentId, round: u32) -> Result<Option<Values>> {
        let Some(i) = &self.inner else { return Ok(None) };
        let row: Option<(String, String, i64)> =
            i.db.query_row(
                "SELECT m.sha256, m.dtype, m.len FROM rounds r JOIN models m ON m.sha256 = r.model_sha256
                 WHERE r.experiment_id = ?1 AND r.round = ?2",
                params![id as i64, round],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| db_err(&i.path, e))?;
        let Some((sha, dtype, len)) = row else {
            return Ok(None);
        };
        let file = i.models.join(format!("{sha}.bin"));
        let bytes = std::fs::read(&file).map_err(|e| Error::io("cannot read", &file, e))?;
        if hex(&Sha256::digest(&bytes)) != sha {
            return Err(Error::Store(format!(
                "{} does not match its checksum: the file was changed or damaged",
                file.display()
            )));
        }
        let dtype = if dtype == "f32" { DType::F32 } else { DType::F64 };
        let values = fedstat_proto::wire::tensor_to_f64(&bytes, dtype)?;
        if values.len() as i64 != len {
            return Err(Error::Store(format!(
                "{} holds {} values, expected {len}",
                file.display(),
                values.len()
            )));
        }
        Ok(Some(Values::from_f64(&values, dtype)))
    }

    /// Every stored experiment, to rebuild the federation after a restart.
    pub fn load_all(&self) -> Result<Vec<(ExperimentId, Restored)>> {
        let Some(i) = &self.inner else {
            return Ok(Vec::new());
        };
        let map = |e: rusqlite::Error| db_err(&i.path, e);
        let mut stmt = i
            .db
            .prepare("SELECT id, submitter, spec_json, state, failure, standardization_json, output_json FROM experiments ORDER BY id")
            .map_err(map)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })
            .map_err(map)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(map)?;
        let mut out = Vec::new();
        for (id, submitter, spec, state, failure, st, output) in rows {
            let id = id as u64;
            let spec: ExperimentSpec = parse(&spec, "experiment spec")?;
            let state = match (state.as_str(), failure) {
                ("completed", _) => ExperimentState::Completed,
                ("failed", reason) => ExperimentState::Failed {
                    reason: reason.unwrap_or_default(),
                },
                ("cancelled", by) => ExperimentState::Cancelled {
                    by: by.unwrap_or_default(),
                },
                _ => ExperimentState::Waiting,
            };
            let standardization = st.map(|s| parse(&s, "standardisation")).transpose()?;
            let output = output.map(|s| parse(&s, "experiment output")).transpose()?;
            let mut state = state;
            let history = self.rounds(i, id)?;
            // A damaged or missing model file costs its experiment, not the coordinator: it is
            // shown as failed with the reason (in memory only; the store is left as found for
            // inspection, and a restored file makes it resume at the next start).
            let global = match history.last().map(|r| (r.round, self.load_model(id, r.round))) {
                None => None,
                Some((_, Ok(model))) => model,
                Some((round, Err(e))) => {
                    tracing::error!(experiment = id, "damaged: {e}");
                    state = ExperimentState::Failed {
                        reason: format!(
                            "damaged: the model of round {round} cannot be read ({e}); restore the file \
                             from a backup and restart the coordinator"
                        ),
                    };
                    None
                }
            };
            let mut stmt =
                i.db.prepare_cached("SELECT at_ms, message FROM events WHERE experiment_id = ?1 ORDER BY id")
                    .map_err(map)?;
            let events = stmt
                .query_map(params![id as i64], |r| {
                    Ok(EventRecord {
                        at_ms: r.get::<_, i64>(0)? as u64,
                        message: r.get(1)?,
                    })
                })
                .map_err(map)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(map)?;
            out.push((
                id,
                Restored {
                    spec,
                    submitter,
                    state,
                    standardization,
                    history,
                    global,
                    output,
                    events,
                },
            ));
        }
        Ok(out)
    }

    fn rounds(&self, i: &Inner, id: ExperimentId) -> Result<Vec<RoundRecord>> {
        let map = |e: rusqlite::Error| db_err(&i.path, e);
        let mut stmt = i
            .db
            .prepare_cached(
                "SELECT round, participants_json, total_examples, train_loss, metrics_json, train_ms, round_ms, retries
                 FROM rounds WHERE experiment_id = ?1 ORDER BY round",
            )
            .map_err(map)?;
        let rows = stmt
            .query_map(params![id as i64], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, f64>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, u32>(7)?,
                ))
            })
            .map_err(map)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(map)?;
        rows.into_iter()
            .map(
                |(round, participants, total, loss, metrics, train_ms, round_ms, retries)| {
                    Ok(RoundRecord {
                        round,
                        participants: parse(&participants, "participants")?,
                        total_examples: total as u64,
                        train_loss: loss,
                        metrics: metrics.map(|m| parse(&m, "metrics")).transpose()?,
                        train_ms: train_ms as u64,
                        round_ms: round_ms as u64,
                        retries,
                    })
                },
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstat_core::model::Metrics;

    fn spec() -> ExperimentSpec {
        toml::from_str(include_str!("../../configs/experiment-logit.toml")).expect("spec")
    }

    fn record(round: u32) -> RoundRecord {
        RoundRecord {
            round,
            participants: vec!["a".into(), "b".into()],
            total_examples: 100,
            train_loss: 0.5,
            metrics: Some(Metrics {
                n: 10,
                log_loss: Some(0.51),
                accuracy: Some(0.7),
                ..Metrics::default()
            }),
            train_ms: 3,
            round_ms: 4,
            retries: 0,
        }
    }

    #[test]
    fn everything_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            assert_eq!(store.next_experiment_id().expect("id"), 1);
            store
                .insert_experiment(1, &spec(), "researcher `alice`")
                .expect("insert");
            let st = Standardization {
                mean: vec![0.1, 1.0 / 3.0],
                sd: vec![2.0, 0.7],
            };
            store.set_standardization(1, &st).expect("st");
            store
                .record_round(1, &record(1), &Values::F64(vec![0.1, -2.5, 1e-300]))
                .expect("round");
            store
                .append_event(
                    1,
                    &EventRecord {
                        at_ms: 7,
                        message: "hello".into(),
                    },
                )
                .expect("event");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.next_experiment_id().expect("id"), 2);
        let all = store.load_all().expect("load");
        assert_eq!(all.len(), 1);
        let (id, r) = &all[0];
        assert_eq!(*id, 1);
        assert_eq!(r.spec, spec());
        assert_eq!(r.state, ExperimentState::Waiting);
        assert_eq!(r.standardization.as_ref().map(|s| s.mean[1]), Some(1.0 / 3.0));
        assert_eq!(r.history, vec![record(1)]);
        assert_eq!(r.global, Some(Values::F64(vec![0.1, -2.5, 1e-300])));
        assert_eq!(r.events[0].message, "hello");
        store.set_state(1, &ExperimentState::Completed).expect("state");
        assert_eq!(
            store.load_all().expect("load")[0].1.state,
            ExperimentState::Completed
        );
    }

    #[test]
    fn a_damaged_model_file_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.insert_experiment(1, &spec(), "r").expect("insert");
        store
            .record_round(1, &record(1), &Values::F32(vec![1.0, 2.0]))
            .expect("round");
        let file = std::fs::read_dir(dir.path().join("models"))
            .expect("models")
            .next()
            .expect("one file")
            .expect("entry")
            .path();
        std::fs::write(&file, [0u8; 8]).expect("damage");
        let err = store.load_model(1, 1).expect_err("damaged").to_string();
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn a_damaged_or_missing_model_costs_only_its_experiment() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            for (id, v) in [(1, 1.0), (2, 2.0), (3, 3.0)] {
                store.insert_experiment(id, &spec(), "r").expect("insert");
                store
                    .record_round(id, &record(1), &Values::F64(vec![v, v]))
                    .expect("round");
            }
        }
        let file = |v: f64| {
            let bytes = Values::F64(vec![v, v]).to_le_bytes();
            dir.path()
                .join("models")
                .join(format!("{}.bin", hex(&Sha256::digest(&bytes))))
        };
        std::fs::write(file(1.0), [0u8; 16]).expect("damage");
        std::fs::remove_file(file(2.0)).expect("remove");
        let store = Store::open(dir.path()).expect("reopen");
        let all = store.load_all().expect("the store still loads");
        let states: Vec<_> = all.iter().map(|(id, r)| (*id, r.state.clone())).collect();
        for (id, state) in &states[..2] {
            let ExperimentState::Failed { reason } = state else {
                panic!("experiment {id}: {state:?}");
            };
            assert!(reason.starts_with("damaged: the model of round 1"), "{reason}");
        }
        assert_eq!(states[2], (3, ExperimentState::Waiting));
    }

    #[test]
    fn unusable_locations_fail_at_open_with_a_clear_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-folder");
        std::fs::write(&file, "x").expect("write");
        let err = Store::open(&file.join("data"))
            .expect_err("under a file")
            .to_string();
        assert!(err.contains("data_dir"), "{err}");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::write(data.join("fedstat.db"), vec![b'x'; 4096]).expect("garbage db");
        let err = Store::open(&data).expect_err("garbage").to_string();
        assert!(
            err.contains("fedstat.db") && err.contains("not a fedstat store"),
            "{err}"
        );
    }
}
