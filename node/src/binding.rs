//! What the node has agreed to answer, per experiment, kept durably in the state folder so a
//! coordinator (rogue, or one that lost its store) cannot get more out of an approval than the
//! manifest says:
//!
//! - `bindings/<experiment id>.json`: the manifest hash the id was first used with, and the
//!   digest of the inputs of every answer given (phase and round). A task for the same phase and
//!   round on the same inputs is a retry and is answered again (identically: answers are
//!   deterministic); on other inputs it is refused. So is a round beyond the manifest's rounds.
//! - `approval-uses/<manifest hash>.json`: with manual approval, which experiment an approval
//!   was used by. A custodian approves one run; a new experiment id under the same manifest is
//!   held again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fedstat_core::files::{atomic_write, Access};
use fedstat_proto::wire::{ExperimentId, Phase, Task};
use serde::{Deserialize, Serialize};

use crate::error::Binding;
use crate::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingRecord {
    manifest: String,
    /// `"<phase>:<round>"` -> SHA-256 of the task's inputs (model and standardisation).
    answers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalUse {
    /// The decision (by its time) that was used.
    decided_at: String,
    experiment: ExperimentId,
}

/// The node's bindings of experiments to manifests and answers.
#[derive(Debug)]
pub struct Bindings {
    dir: PathBuf,
    /// One writer at a time per node process: check then record is one step.
    lock: Mutex<()>,
}

fn phase_key(phase: Phase, round: u32) -> String {
    let p = match phase {
        Phase::Stats => "statistics",
        Phase::Train => "training",
        Phase::Evaluate => "evaluation",
        Phase::Glm => "glm",
        Phase::Table => "table",
    };
    format!("{p}:{round}")
}

impl Bindings {
    pub fn new(state_dir: &Path) -> Self {
        Bindings {
            dir: state_dir.to_owned(),
            lock: Mutex::new(()),
        }
    }

    fn binding_path(&self, id: ExperimentId) -> PathBuf {
        self.dir.join("bindings").join(format!("{id}.json"))
    }

    fn use_path(&self, manifest: &str) -> PathBuf {
        self.dir.join("approval-uses").join(format!("{manifest}.json"))
    }

    fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Ledger(format!("{}: unreadable: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Ledger(format!("cannot read {}: {e}", path.display()))),
        }
    }

    fn write<T: Serialize>(path: &Path, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::Ledger(format!("cannot encode {}: {e}", path.display())))?;
        Ok(atomic_write(path, &bytes, Access::OwnerOnly)?)
    }

    fn guard(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        self.lock
            .lock()
            .map_err(|_| Error::Ledger("the bindings lock is poisoned".into()))
    }

    /// Whether the node has already taken part in experiment `id` (it was admitted before).
    pub fn is_bound(&self, id: ExperimentId) -> Result<bool> {
        Ok(Self::read::<BindingRecord>(&self.binding_path(id))?.is_some())
    }

    /// Manual approval: whether the decision made at `decided_at` on `manifest` may admit
    /// experiment `id`. The first experiment to use an approval takes it; another one needs a
    /// new approval. Returns the experiment that used it when that is another one.
    pub fn use_approval(
        &self,
        manifest: &str,
        decided_at: &str,
        id: ExperimentId,
    ) -> Result<Option<ExperimentId>> {
        let _g = self.guard()?;
        let path = self.use_path(manifest);
        if let Some(used) = Self::read::<ApprovalUse>(&path)? {
            if used.decided_at == decided_at && used.experiment != id {
                return Ok(Some(used.experiment));
            }
        }
        Self::write(
            &path,
            &ApprovalUse {
                decided_at: decided_at.to_owned(),
                experiment: id,
            },
        )?;
        Ok(None)
    }

    /// Check that `task` is one the node may answer under `manifest`, with `max_rounds` from
    /// the site policy; `inputs` is the digest of what the answer is computed from. Binds the
    /// id to the manifest on first use. Call [`Bindings::record_answer`] once the answer is made.
    pub fn check(&self, task: &Task, manifest: &str, inputs: &str, max_rounds: u32) -> Result<()> {
        let rounds = task.spec.max_rounds().min(max_rounds);
        let in_range = match task.phase {
            Phase::Stats => task.round == 0,
            Phase::Train | Phase::Evaluate | Phase::Glm | Phase::Table => (1..=rounds).contains(&task.round),
        };
        if !in_range {
            return Err(Error::Binding(Binding::RoundOutOfRange {
                round: task.round,
                rounds,
            }));
        }
        let _g = self.guard()?;
        let path = self.binding_path(task.experiment);
        let record = match Self::read::<BindingRecord>(&path)? {
            Some(r) if r.manifest != manifest => return Err(Error::Binding(Binding::OtherManifest)),
            Some(r) => r,
            None => {
                let r = BindingRecord {
                    manifest: manifest.to_owned(),
                    answers: BTreeMap::new(),
                };
                Self::write(&path, &r)?;
                r
            }
        };
        match record.answers.get(&phase_key(task.phase, task.round)) {
            Some(earlier) if earlier != inputs => Err(Error::Binding(Binding::SecondAnswer {
                phase: task.phase,
                round: task.round,
            })),
            _ => Ok(()),
        }
    }

    /// Record that the answer to `task` on `inputs` is being released.
    pub fn record_answer(&self, task: &Task, inputs: &str) -> Result<()> {
        let _g = self.guard()?;
        let path = self.binding_path(task.experiment);
        let mut record = Self::read::<BindingRecord>(&path)?
            .ok_or_else(|| Error::Ledger(format!("{}: missing", path.display())))?;
        record
            .answers
            .insert(phase_key(task.phase, task.round), inputs.to_owned());
        Self::write(&path, &record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: ExperimentId, phase: Phase, round: u32) -> Task {
        crate::testing::task(crate::testing::example_spec(), id, round, phase)
    }

    #[test]
    fn one_answer_per_phase_and_round_within_the_manifest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Bindings::new(dir.path());
        let t = task(4, Phase::Train, 1);
        b.check(&t, "m1", "in-a", 100).expect("first");
        b.record_answer(&t, "in-a").expect("record");
        // A retry on the same inputs is answered again; other inputs are refused.
        b.check(&t, "m1", "in-a", 100).expect("retry");
        let b = Bindings::new(dir.path()); // survives a restart
        assert!(matches!(
            b.check(&t, "m1", "in-b", 100),
            Err(Error::Binding(Binding::SecondAnswer { round: 1, .. }))
        ));
        // The id stays bound to its manifest.
        assert!(matches!(
            b.check(&task(4, Phase::Evaluate, 1), "m2", "x", 100),
            Err(Error::Binding(Binding::OtherManifest))
        ));
        // Rounds beyond the manifest's (20) or the policy's are refused; statistics are round 0.
        for (phase, round, max) in [
            (Phase::Train, 21, 100),
            (Phase::Evaluate, 0, 100),
            (Phase::Stats, 1, 100),
            (Phase::Train, 6, 5),
        ] {
            assert!(
                matches!(
                    b.check(&task(4, phase, round), "m1", "x", max),
                    Err(Error::Binding(Binding::RoundOutOfRange { .. }))
                ),
                "{phase} {round}"
            );
        }
        b.check(&task(4, Phase::Stats, 0), "m1", "x", 100)
            .expect("statistics");
    }

    #[test]
    fn an_approval_admits_one_experiment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Bindings::new(dir.path());
        assert_eq!(b.use_approval("m", "t1", 7).expect("use"), None);
        assert_eq!(b.use_approval("m", "t1", 7).expect("same experiment"), None);
        assert_eq!(b.use_approval("m", "t1", 8).expect("other"), Some(7));
        // A new approval (a later decision) admits the new run.
        assert_eq!(b.use_approval("m", "t2", 8).expect("re-approved"), None);
    }
}
