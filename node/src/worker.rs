//! Doing one task next to the data: load the CSV (cached per manifest and file version),
//! check the disclosure rules on it once, then compute the statistics, train from the global
//! model, or evaluate it. Synchronous and CPU-bound; the session runs it on a blocking thread.
//! Errors name file, line and column for the node's log, never a value; what leaves the node
//! is [`crate::Error::public`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fedstat_core::aggregate::Values;
use fedstat_core::algorithm::{self, standardize};
use fedstat_core::data::load_frame;
use fedstat_core::data::{
    column_sums, load_design_with_codes, LoadLimits, LocalData, Standardization, StandardizationExt,
};
use fedstat_core::glm::{self, Family};
use fedstat_core::model::{evaluate, train_dp_sgd, train_sgd, DpSgd};
use fedstat_core::privacy;
use fedstat_core::spec::ModelKind;
use fedstat_core::tabulate;
use fedstat_proto::table::TableRows;
use fedstat_proto::wire::{Phase, Task};
use rand::{Rng, SeedableRng};

use crate::disclosure::{check_cells, released_sets, table_set};
use crate::governance::Governance;
use crate::policy::Refusal;
use crate::{Error, Result};

/// Examples an `echo` update claims (the benchmark task's fixed count).
pub const ECHO_EXAMPLES: u64 = 100;
/// Prepared datasets kept in memory.
const CACHE_SIZE: usize = 4;
/// Noisy answers kept for retries (see [`Worker::run`]).
const NOISY_MEMO: usize = 64;
/// A noisy answer's task: manifest, phase, round and the SHA-256 of the model it started from.
type NoisyKey = (String, String, u32, [u8; 32]);

/// A task's answer, to be sent back: one vector the coordinator sums over the nodes.
#[derive(Debug, Clone)]
pub struct Answer {
    pub values: Values,
    /// Its weight in a weighted mean (training rows rounded to the policy's
    /// `count_rounding`); 1 for plain sums.
    pub weight: u64,
    /// Side figures summed with the same weight (training: the mean local loss).
    pub aux: Vec<f64>,
}

impl Answer {
    /// An answer to a plain sum.
    fn sum(values: Values) -> Self {
        Answer {
            values,
            weight: 1,
            aux: Vec::new(),
        }
    }
}

/// Which data a cache entry holds: the experiment's manifest (its schema) and the version of
/// the file (path, size, modification time), so an edited file or a new experiment with the
/// same id is never answered from stale rows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct CacheKey {
    manifest: String,
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

#[derive(Debug)]
struct Prepared {
    raw: Arc<LocalData>,
    /// Standardised copy, with the standardisation it was made with.
    standardized: Option<(Standardization, Arc<LocalData>)>,
    /// Insertion order, for eviction.
    seq: u64,
}

/// Runs tasks against this node's datasets.
#[derive(Debug)]
pub struct Worker {
    name: String,
    datasets: BTreeMap<String, PathBuf>,
    /// The policy's disclosure rules and the release ledger.
    gov: Arc<Governance>,
    cache: Mutex<(u64, BTreeMap<CacheKey, Prepared>)>,
    /// Differentially private answers already given, by (manifest, phase, round, model
    /// digest): a retry gets the same noisy answer again, so a round is released (and charged)
    /// once however often it is asked.
    noisy: Mutex<BTreeMap<NoisyKey, Answer>>,
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
    pub fn new(name: String, datasets: BTreeMap<String, PathBuf>, gov: Arc<Governance>) -> Self {
        Worker {
            name,
            datasets,
            gov,
            cache: Mutex::new((0, BTreeMap::new())),
            noisy: Mutex::new(BTreeMap::new()),
        }
    }

    /// Do one task admitted under the manifest hashing to `manifest`. `model` is the global
    /// model for Train and Evaluate. The match on the phase is the registry of local
    /// computations: each phase's answer is encoded by its algorithm's module in
    /// `fedstat_core::algorithm`, the same module that reads the pooled sum at the coordinator.
    ///
    /// Under `[privacy]` the answer is noisy (noise from the operating system's randomness);
    /// it is kept per manifest, phase, round and model, and a retry of the same task is
    /// answered with it again, never with fresh noise.
    pub fn run(&self, task: &Task, manifest: &str, model: Option<Values>) -> Result<Answer> {
        if task.spec.privacy.is_none() {
            return self.run_exact(task, manifest, model);
        }
        let digest = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for v in model.as_ref().map(Values::to_f64).unwrap_or_default() {
                h.update(v.to_le_bytes());
            }
            <[u8; 32]>::from(h.finalize())
        };
        let key = (manifest.to_owned(), task.phase.to_string(), task.round, digest);
        if let Some(a) = self
            .noisy
            .lock()
            .map_err(|_| shared_model("answer memo poisoned"))?
            .get(&key)
        {
            return Ok(a.clone());
        }
        let answer = self.run_exact(task, manifest, model)?;
        let mut memo = self
            .noisy
            .lock()
            .map_err(|_| shared_model("answer memo poisoned"))?;
        if memo.len() >= NOISY_MEMO {
            memo.pop_first();
        }
        memo.insert(key, answer.clone());
        Ok(answer)
    }

    fn run_exact(&self, task: &Task, manifest: &str, model: Option<Values>) -> Result<Answer> {
        let spec = &task.spec;
        if spec.model == ModelKind::Echo {
            return self.echo(task, model);
        }
        if spec.model == ModelKind::Table {
            return self.table(task);
        }
        let data = self.data(task, manifest)?;
        let model_f64 = || -> Result<Vec<f64>> {
            let m = model
                .as_ref()
                .ok_or_else(|| shared_model("the task carries no model"))?;
            Ok(m.to_f64())
        };
        if spec.privacy.is_some() && matches!(task.phase, Phase::Stats | Phase::Evaluate) {
            // A DP experiment standardises from its bounds and is not evaluated here: these
            // exact sums are not covered by its privacy cost.
            return Err(Error::Policy(Refusal::NotPrivate(task.phase.to_string())));
        }
        match task.phase {
            Phase::Stats => Ok(Answer::sum(standardize::answer(&column_sums(
                data.train.x.view(),
            )))),
            Phase::Train if spec.privacy.is_some() => self.train_private(task, &data, model_f64()?),
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
                Ok(Answer {
                    values: Values::F64(out.params),
                    weight: self.gov.policy().rounded_count(data.train.rows() as u64),
                    aux: vec![out.mean_loss],
                })
            }
            Phase::Evaluate => {
                let params = model_f64()?;
                let sums = evaluate(spec.model, data.test.x.view(), data.test.y.view(), &params)?;
                Ok(Answer::sum(algorithm::evaluate::answer(&sums)))
            }
            Phase::Glm => self.glm(task, &data, model),
            Phase::Table => Err(shared_model("table cells are asked of table experiments only")),
        }
    }

    /// DP-SGD from the global model (and, with `[privacy.node_level]`, the update's change
    /// clipped and noised for the secure sum). The weight is the public 1 and the training
    /// loss is not released: neither is covered by the privacy cost.
    fn train_private(&self, task: &Task, data: &LocalData, init: Vec<f64>) -> Result<Answer> {
        let spec = &task.spec;
        let p = spec
            .privacy
            .as_ref()
            .ok_or_else(|| shared_model("not a private experiment"))?;
        let (Some(clip_norm), Some(sampling_rate)) = (p.clip_norm, p.sampling_rate) else {
            return Err(shared_model("DP-SGD needs clip_norm and sampling_rate"));
        };
        let dp = DpSgd {
            clip_norm,
            noise_multiplier: p.noise_multiplier,
            sampling_rate,
        };
        let mut rng = privacy::os_rng();
        let out = train_dp_sgd(
            spec.model,
            data.train.x.view(),
            data.train.y.view(),
            &init,
            &spec.training,
            dp,
            &mut rng,
        )?;
        let params = match &p.node_level {
            Some(node) => {
                let t = task
                    .secure
                    .as_ref()
                    .and_then(|s| s.threshold)
                    .unwrap_or(spec.min_nodes);
                privacy::node_level_release(
                    &out.params,
                    &init,
                    node.clip_norm,
                    node.noise_multiplier,
                    t,
                    &mut rng,
                )?
            }
            None => out.params,
        };
        Ok(Answer {
            values: Values::F64(params),
            weight: 1,
            aux: vec![0.0],
        })
    }

    /// One Newton/IRLS step of an exact GLM: the sums at the coefficients sent, on the raw
    /// training rows. Refused if one row would carry more than `1/min_cell` of the working
    /// weight: coefficients crafted to single out a person (a rogue coordinator's) would
    /// otherwise turn the sums into that person's record.
    fn glm(&self, task: &Task, data: &LocalData, model: Option<Values>) -> Result<Answer> {
        let spec = &task.spec;
        let family = Family::of(spec.model).ok_or_else(|| shared_model("not a GLM"))?;
        let names = spec.design_columns();
        let p = names.len();
        let model = model.map(|m| m.to_f64()).unwrap_or_default();
        let at = algorithm::glm::evaluation_point(family, task.round, &model, p)
            .ok_or_else(|| shared_model("the task's coefficients do not match the design"))?;
        if spec.privacy.is_some() {
            // The Gaussian mechanism on the bounded sums at β = 0 (the linear model ends in
            // one round; validation admits no other family under `[privacy]`).
            if family != Family::Gaussian || task.round != 1 {
                return Err(Error::Policy(Refusal::NotPrivate(task.phase.to_string())));
            }
            let sums = privacy::gaussian_ols_sums(spec, data, &mut privacy::discrete::os_noise_rng()?)?;
            return Ok(Answer::sum(algorithm::glm::answer(&sums)));
        }
        let intercept = algorithm::glm::has_intercept(&names);
        let (sums, concentration) = glm::step_sums(family, &data.train, at, intercept)?;
        let min_cell = self.gov.policy().min_cell.max(1) as f64;
        if concentration.max_weight_share > 1.0 / min_cell {
            return Err(Error::Policy(Refusal::Concentrated));
        }
        Ok(Answer::sum(algorithm::glm::answer(&sums)))
    }

    /// The diagnostic model: the global parameters plus a small seeded change.
    fn echo(&self, task: &Task, model: Option<Values>) -> Result<Answer> {
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
        Ok(Answer {
            values: Values::F32(v),
            weight: ECHO_EXAMPLES,
            aux: vec![0.0],
        })
    }

    /// A table: this node's cells and margins with its own cell rules applied
    /// ([`fedstat_core::tabulate::node_answer`]: small and dominated cells suppressed and
    /// protected, sent as zeros with a flag). Only the `by`, numeric and split columns are read.
    fn table(&self, task: &Task) -> Result<Answer> {
        let spec = &task.spec;
        if task.phase != Phase::Table {
            return Err(shared_model("a table experiment asks only for table cells"));
        }
        let (Some(schema), Some(form)) = (&spec.schema, &spec.table) else {
            return Err(shared_model("the experiment has no schema or table"));
        };
        let layout = tabulate::Layout::new(spec).map_err(fedstat_core::Error::from)?;
        let policy = self.gov.policy();
        let columns = form.by.iter().chain(form.numeric.iter().map(|n| &n.column));
        for column in columns {
            if !policy.allowed_features.allows(column) {
                return Err(Error::Policy(Refusal::FeatureNotAllowed(column.clone())));
            }
        }
        let path = self
            .datasets
            .get(&spec.dataset)
            .ok_or_else(|| Error::UnknownDataset(spec.dataset.clone()))?;
        let request = layout.frame_request(&schema.split_column);
        let limits = LoadLimits {
            max_cells: policy.max_cells(),
        };
        let frame = load_frame(path, &request, limits)?;
        let selected: Vec<bool> = frame
            .train
            .iter()
            .map(|&train| match layout.rows {
                TableRows::Train => train,
                TableRows::Test => !train,
                TableRows::All => true,
            })
            .collect();
        let rows = selected.iter().filter(|s| **s).count() as u64;
        policy.check_rows(spec, rows).map_err(Error::Policy)?;
        // The table's population is recorded like a split (differencing between experiments);
        // within the table, its suppression rules protect the cells.
        let ids = frame
            .ids
            .iter()
            .zip(&selected)
            .filter(|(_, s)| **s)
            .map(|(id, _)| *id);
        self.gov
            .check_release(task, &[table_set(layout.rows.as_str(), ids)])?;
        let mut codes: Vec<&[u32]> = Vec::new();
        for col in &layout.by {
            let f = frame
                .categorical
                .get(col)
                .ok_or_else(|| shared_model("the loader lost a `by` column"))?;
            codes.push(&f.codes);
        }
        let mut values: Vec<&[f64]> = Vec::new();
        for n in &layout.numeric {
            let v = frame
                .numeric
                .get(&n.column)
                .ok_or_else(|| shared_model("the loader lost a numeric column"))?;
            values.push(v);
        }
        // The stricter of the custodian's rules and the researcher's.
        let rules = tabulate::CellRules {
            min_cell: policy.min_cell,
            dominance_n: policy.dominance_n.max(form.dominance_n) as usize,
            dominance_k: policy.dominance_k.min(form.dominance_k),
        };
        let t = tabulate::tabulate(&layout, &codes, &values, &selected, rules.dominance_n)
            .map_err(fedstat_core::Error::from)?;
        if let Some(p) = &spec.privacy {
            // The Gaussian mechanism instead of the cell rules: the noise protects every cell,
            // and a suppression decided on the true counts would itself disclose.
            let mut rng = privacy::discrete::os_noise_rng()?;
            let answer = tabulate::private_answer(&layout, &t, p.noise_multiplier, &mut rng)
                .map_err(fedstat_core::Error::from)?;
            tracing::info!(experiment = ?task.experiment, "table cells answered with Gaussian noise");
            return Ok(Answer::sum(Values::F64(answer)));
        }
        let (answer, suppressed) =
            tabulate::node_answer(&layout, &t, rules).map_err(fedstat_core::Error::from)?;
        tracing::info!(
            experiment = ?task.experiment,
            suppressed,
            "table cells answered, {suppressed} suppressed by this node's rules"
        );
        Ok(Answer::sum(Values::F64(answer)))
    }

    /// The experiment's data: raw for the statistics phase, standardised with the pooled
    /// statistics afterwards. Loaded once per manifest and file version; the disclosure rules
    /// (row thresholds, cells, differencing) pass before it is cached, so no answer of any
    /// kind comes from data that fails them.
    fn data(&self, task: &Task, manifest: &str) -> Result<Arc<LocalData>> {
        let spec = &task.spec;
        let plan = spec.design().map_err(fedstat_core::data::design_error)?;
        let path = self
            .datasets
            .get(&spec.dataset)
            .ok_or_else(|| Error::UnknownDataset(spec.dataset.clone()))?;
        let meta = std::fs::metadata(path).map_err(|e| Error::Io {
            action: "cannot read",
            path: path.clone(),
            source: e,
        })?;
        let key = CacheKey {
            manifest: manifest.to_owned(),
            path: path.clone(),
            len: meta.len(),
            modified: meta.modified().ok(),
        };
        let mut guard = self
            .cache
            .lock()
            .map_err(|_| shared_model("data cache poisoned"))?;
        let (seq, cache) = &mut *guard;
        if !cache.contains_key(&key) {
            let policy = self.gov.policy();
            let limits = LoadLimits {
                max_cells: policy.max_cells(),
            };
            let (raw, codes) = load_design_with_codes(path, &plan, Some(&self.name), limits)?;
            policy
                .check_rows(spec, raw.train.rows() as u64)
                .map_err(Error::Policy)?;
            check_cells(&plan, &raw, &codes, policy.min_cell).map_err(Error::Policy)?;
            self.gov
                .check_release(task, &released_sets(&plan, &raw, &codes))?;
            while cache.len() >= CACHE_SIZE {
                let Some(oldest) = cache.iter().min_by_key(|(_, p)| p.seq).map(|(k, _)| k.clone()) else {
                    break;
                };
                cache.remove(&oldest);
            }
            *seq += 1;
            cache.insert(
                key.clone(),
                Prepared {
                    raw: Arc::new(raw),
                    standardized: None,
                    seq: *seq,
                },
            );
        }
        let entry = cache
            .get_mut(&key)
            .ok_or_else(|| shared_model("data cache lost an entry"))?;
        let Some(st) = &task.standardization else {
            return Ok(entry.raw.clone());
        };
        if let Some((made_with, s)) = &entry.standardized {
            if made_with == st {
                return Ok(s.clone());
            }
        }
        st.validate(plan.columns.len())?;
        let mut data = (*entry.raw).clone();
        st.apply(&mut data.train.x);
        st.apply(&mut data.test.x);
        let data = Arc::new(data);
        entry.standardized = Some((st.clone(), data.clone()));
        Ok(data)
    }
}

fn shared_model(msg: &str) -> Error {
    fedstat_core::Error::Model(msg.to_owned()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::NodeConfig;
    use crate::policy::{Columns, SitePolicy};
    use fedstat_core::privacy::bounds_standardization;

    fn example(name: &str) -> fedstat_core::spec::ExperimentSpec {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../configs")
            .join(name);
        fedstat_core::spec::from_toml_file(&path).expect("example")
    }

    fn worker(dir: &std::path::Path) -> Worker {
        let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/cps1988/west.csv");
        let config = NodeConfig {
            coordinator: "127.0.0.1:1".into(),
            server_name: "localhost".into(),
            transport: Default::default(),
            crl: None,
            tls: fedstat_net::tls::TlsFiles {
                ca_cert: dir.join("ca.pem"),
                cert: dir.join("node.pem"),
                key: dir.join("node.key"),
            },
            datasets: [("cps1988".to_owned(), data)].into_iter().collect(),
            state_dir: dir.join("state"),
            audit_log: dir.join("audit.jsonl"),
            privacy_ledger: dir.join("state/privacy-ledger.json"),
            policy: SitePolicy {
                allowed_features: Columns::Any,
                allowed_targets: Columns::Any,
                ..SitePolicy::default()
            },
        };
        let gov = Governance::open(&config, "west").expect("governance");
        Worker::new("west".into(), config.datasets.clone(), Arc::new(gov))
    }

    fn task(spec: &fedstat_core::spec::ExperimentSpec, phase: Phase, round: u32) -> Task {
        crate::testing::task(spec.clone(), 1, round, phase)
    }

    /// A DP experiment's answers: no exact statistics or evaluation; DP-SGD models with the
    /// public weight 1 and no loss, the same noisy answer for a retry of the same task and
    /// fresh noise for another model; the noisy OLS sums differ from the exact ones.
    #[test]
    fn private_experiments_answer_only_with_noise_and_once_per_task() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = worker(dir.path());
        let spec = example("experiment-logit-dp.toml");
        for phase in [Phase::Stats, Phase::Evaluate] {
            let err = w
                .run(&task(&spec, phase, 1), "m1", Some(Values::F64(vec![0.0; 7])))
                .expect_err("refused");
            assert!(
                err.public("cps1988").contains("releases no exact"),
                "{}",
                err.public("cps1988")
            );
        }
        let mut train = task(&spec, Phase::Train, 1);
        train.standardization = Some(bounds_standardization(&spec).expect("st"));
        let zeros = Values::F64(vec![0.0; 7]);
        let a = w.run(&train, "m1", Some(zeros.clone())).expect("train");
        let b = w.run(&train, "m1", Some(zeros)).expect("retry");
        assert_eq!((a.weight, a.aux.as_slice()), (1, [0.0].as_slice()));
        assert_eq!(a.values, b.values, "a retry gets the same noisy answer");
        let c = w
            .run(&train, "m1", Some(Values::F64(vec![0.01; 7])))
            .expect("another model");
        assert_ne!(a.values, c.values);

        let ols = example("experiment-ols-dp.toml");
        let glm = task(&ols, Phase::Glm, 1);
        let noisy = w
            .run(&glm, "m2", Some(Values::F64(vec![0.0; 8])))
            .expect("noisy sums");
        let mut exact_spec = ols.clone();
        exact_spec.privacy = None;
        let exact = w
            .run(
                &task(&exact_spec, Phase::Glm, 1),
                "m3",
                Some(Values::F64(vec![0.0; 8])),
            )
            .expect("exact sums");
        let (n, e) = (noisy.values.to_f64(), exact.values.to_f64());
        assert_eq!(n.len(), e.len());
        assert!(n.iter().zip(&e).any(|(x, y)| x != y));
        // The row count is a noisy whole number near the exact one (σΔ ≈ 26 per entry).
        let rows = 28 + 7 + 5;
        assert_eq!(n[rows].fract(), 0.0);
        assert!((n[rows] - e[rows]).abs() < 200.0, "{} vs {}", n[rows], e[rows]);
    }

    #[test]
    fn seeds_differ_by_node_and_round_and_repeat() {
        assert_eq!(task_seed(1, 2, "a"), task_seed(1, 2, "a"));
        assert_ne!(task_seed(1, 2, "a"), task_seed(1, 2, "b"));
        assert_ne!(task_seed(1, 2, "a"), task_seed(1, 3, "a"));
        assert_ne!(task_seed(1, 2, "a"), task_seed(2, 2, "a"));
    }
}
