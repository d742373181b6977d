//! Doing one task next to the data: load the CSV (cached per experiment), then compute the
//! statistics, train from the global model, or evaluate it. Synchronous and CPU-bound; the
//! session runs it on a blocking thread. Errors name file, line and column, never a value.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fedstat_shared::aggregate::Values;
use fedstat_shared::data::{column_sums, load_csv, ColumnSums, LocalData};
use fedstat_shared::model::{evaluate, train_sgd, EvalSums};
use fedstat_shared::spec::ModelKind;
use fedstat_shared::wire::{ExperimentId, Phase, Task};
use rand::{Rng, SeedableRng};

use crate::policy::SitePolicy;
use crate::{Error, Result};

/// Examples an `echo` update claims (the benchmark task's fixed count).
pub const ECHO_EXAMPLES: u64 = 100;
/// Experiments whose prepared data stay in memory.
const CACHE_SIZE: usize = 4;

/// A task's result, to be sent back.
#[derive(Debug)]
pub enum Outcome {
    Stats(ColumnSums),
    Update {
        values: Values,
        num_examples: u64,
        train_loss: f64,
    },
    Eval(EvalSums),
}

#[derive(Debug)]
struct Prepared {
    raw: Arc<LocalData>,
    /// Standardised copy, once the pooled standardisation is known.
    standardized: Option<Arc<LocalData>>,
}

/// Runs tasks against this node's datasets.
#[derive(Debug)]
pub struct Worker {
    name: String,
    datasets: BTreeMap<String, PathBuf>,
    /// For the disclosure thresholds, which need the data loaded.
    policy: SitePolicy,
    cache: Mutex<BTreeMap<ExperimentId, Prepared>>,
}

/// The shuffling seed of one node in one round: distinct per node and round, reproducible.
pub fn task_seed(seed: u64, round: u32, node: &str) -> u64 {
    // FNV-1a over the inputs, then a splitmix64 finaliser.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed
        .to_le_bytes()
        .iter()
        .chain(&round.to_le_bytes())
        .chain(node.as_bytes())
    {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl Worker {
    pub fn new(name: String, datasets: BTreeMap<String, PathBuf>, policy: SitePolicy) -> Self {
        Worker {
            name,
            datasets,
            policy,
            cache: Mutex::new(BTreeMap::new()),
        }
    }

    /// Do one task. `model` is the global model for Train and Evaluate.
    pub fn run(&self, task: &Task, model: Option<Values>) -> Result<Outcome> {
        let spec = &task.spec;
        if spec.model == ModelKind::Echo {
            return self.echo(task, model);
        }
        let data = self.data(task)?;
        // Every phase: no answer of any kind from too few rows or for a saturated model.
        self.policy
            .check_rows(spec, data.train.rows() as u64)
            .map_err(Error::Policy)?;
        let model_f64 = || -> Result<Vec<f64>> {
            let m = model
                .as_ref()
                .ok_or_else(|| shared_model("the task carries no model"))?;
            Ok(m.to_f64())
        };
        match task.phase {
            Phase::Stats => {
                if data.train.rows() == 0 {
                    return Err(shared_model("no training rows in the dataset"));
                }
                Ok(Outcome::Stats(column_sums(data.train.x.view())))
            }
            Phase::Train => {
                let init = model_f64()?;
                let seed = task_seed(spec.training.seed, task.round, &self.name);
                let out = train_sgd(
                    spec.model,
                    data.train.x.view(),
                    data.train.y.view(),
                    &init,
                    &spec.training,
                    seed,
                )?;
                Ok(Outcome::Update {
                    values: Values::F64(out.params),
                    num_examples: data.train.rows() as u64,
                    train_loss: out.mean_loss,
                })
            }
            Phase::Evaluate => {
                let params = model_f64()?;
                Ok(Outcome::Eval(evaluate(
                    spec.model,
                    data.test.x.view(),
                    data.test.y.view(),
                    &params,
                )?))
            }
        }
    }

    /// The diagnostic model: the global parameters plus a small seeded change.
    fn echo(&self, task: &Task, model: Option<Values>) -> Result<Outcome> {
        let Some(Values::F32(mut v)) = model else {
            return Err(shared_model("an echo task must carry a float32 model"));
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(task_seed(
            task.spec.training.seed,
            task.round,
            &self.name,
        ));
        let delta: f32 = rng.gen_range(-1e-3..1e-3);
        v.iter_mut().for_each(|x| *x += delta);
        Ok(Outcome::Update {
            values: Values::F32(v),
            num_examples: ECHO_EXAMPLES,
            train_loss: 0.0,
        })
    }

    /// The experiment's data: raw for the statistics phase, standardised with the pooled
    /// statistics afterwards. Loaded once per experiment.
    fn data(&self, task: &Task) -> Result<Arc<LocalData>> {
        let spec = &task.spec;
        let schema = spec
            .schema
            .as_ref()
            .ok_or_else(|| shared_model("the experiment has no schema"))?;
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| shared_model("data cache poisoned"))?;
        if !cache.contains_key(&task.experiment) {
            let path = self
                .datasets
                .get(&spec.dataset)
                .ok_or_else(|| Error::UnknownDataset(spec.dataset.clone()))?;
            let raw = load_csv(path, schema, spec.model)?;
            while cache.len() >= CACHE_SIZE {
                let Some(oldest) = cache.keys().next().copied() else {
                    break;
                };
                cache.remove(&oldest);
            }
            cache.insert(
                task.experiment,
                Prepared {
                    raw: Arc::new(raw),
                    standardized: None,
                },
            );
        }
        let entry = cache
            .get_mut(&task.experiment)
            .ok_or_else(|| shared_model("data cache lost an entry"))?;
        let Some(st) = &task.standardization else {
            return Ok(entry.raw.clone());
        };
        if let Some(s) = &entry.standardized {
            return Ok(s.clone());
        }
        st.validate(schema.design_columns().len())?;
        let mut data = (*entry.raw).clone();
        st.apply(&mut data.train.x);
        st.apply(&mut data.test.x);
        let data = Arc::new(data);
        entry.standardized = Some(data.clone());
        Ok(data)
    }
}

fn shared_model(msg: &str) -> Error {
    fedstat_shared::Error::Model(msg.to_owned()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_by_node_and_round_and_repeat() {
        assert_eq!(task_seed(1, 2, "a"), task_seed(1, 2, "a"));
        assert_ne!(task_seed(1, 2, "a"), task_seed(1, 2, "b"));
        assert_ne!(task_seed(1, 2, "a"), task_seed(1, 3, "a"));
        assert_ne!(task_seed(1, 2, "a"), task_seed(2, 2, "a"));
    }
}
