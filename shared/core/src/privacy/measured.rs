//! Measured utility of the DP mechanisms on CPS 1988 (four offices, one per region), through
//! the algorithms' own steps and the nodes' own computations: the example experiments
//! `configs/experiment-logit-dp.toml` (DP-SGD) and `configs/experiment-ols-dp.toml` (the
//! Gaussian mechanism) against the non-private pooled fits. Each run's noise is seeded here
//! (the node seeds it from the operating system), so the figures cannot flake; run with
//! `--nocapture` to print them.

use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::aggregate::{Pooled, Values};
use crate::algorithm::{self, fedavg::FedAvg, glm::Glm, Algorithm, Checkpoint};
use crate::data::tests::{data_dir, REGIONS};
use crate::data::{Design, LocalData, StandardizationExt};
use crate::model::{evaluate, fit_central, metrics, train_dp_sgd, DpSgd};
use crate::spec::ExperimentSpec;
use fedstat_proto::output::Output;
use fedstat_proto::wire::Phase;

fn example(name: &str) -> ExperimentSpec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(name);
    crate::spec::from_toml_file(&path).expect("example experiment")
}

fn offices(spec: &ExperimentSpec) -> Vec<LocalData> {
    let plan = spec.design().expect("plan");
    REGIONS
        .iter()
        .map(|r| {
            let path = data_dir().join("cps1988").join(format!("{r}.csv"));
            crate::data::load_design(&path, &plan, None, crate::data::LoadLimits::UNLIMITED).expect("load")
        })
        .collect()
}

/// One DP FedAvg run: only training steps, each office's DP-SGD model with weight 1.
fn dp_fedavg(spec: &ExperimentSpec, data: &[LocalData], seed: u64) -> Vec<f64> {
    let mut alg = FedAvg::new(spec, Checkpoint::default());
    let p = spec.privacy.as_ref().expect("dp");
    let dp = DpSgd {
        clip_norm: p.clip_norm.expect("C"),
        noise_multiplier: p.noise_multiplier,
        sampling_rate: p.sampling_rate.expect("q"),
    };
    let now = Instant::now();
    while let Some(step) = alg.next_step(now) {
        assert_eq!(step.phase, Phase::Train, "a DP experiment only trains");
        let st = step.standardization.clone().expect("bounds standardisation");
        let init = step.model.as_ref().expect("model").to_f64();
        let mut sum = vec![0.0; init.len()];
        for (k, d) in data.iter().enumerate() {
            let mut x = d.train.x.clone();
            st.apply(&mut x);
            let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + u64::from(step.round) * 10 + k as u64);
            let out = train_dp_sgd(
                spec.model,
                x.view(),
                d.train.y.view(),
                &init,
                &spec.training,
                dp,
                &mut rng,
            )
            .expect("train");
            sum.iter_mut().zip(&out.params).for_each(|(s, v)| *s += v);
        }
        let n = data.len() as f64;
        let pooled = Pooled {
            values: Values::F64(sum.iter().map(|s| s / n).collect()),
            aux: vec![0.0],
            total_weight: data.len() as u64,
            answers: data.len(),
        };
        alg.finish_step(now, &step, pooled, Vec::new(), 0).expect("round");
    }
    assert_eq!(alg.history().len() as u32, spec.rounds);
    alg.model().to_f64()
}

#[test]
fn dp_sgd_logit_at_epsilon_below_one_keeps_the_central_accuracy() {
    let spec = example("experiment-logit-dp.toml");
    let cost = spec.privacy_cost_per_round().expect("cost");
    assert_eq!(
        (cost.steps, cost.sampling_rate, cost.noise_multiplier),
        (50, 0.02, 2.0)
    );
    let data = offices(&spec);
    let st = super::bounds_standardization(&spec).expect("st");
    let std = |d: &Design| {
        let mut d = d.clone();
        st.apply(&mut d.x);
        d
    };
    let train = Design::stack(data.iter().map(|d| &d.train)).expect("stack");
    let test = std(&Design::stack(data.iter().map(|d| &d.test)).expect("stack"));
    let central = fit_central(spec.model, std(&train).x.view(), train.y.view(), 0.0, &[]).expect("central");
    let score = |beta: &[f64]| {
        metrics(
            spec.model,
            &evaluate(spec.model, test.x.view(), test.y.view(), beta).expect("evaluate"),
        )
    };
    let exact = score(&central);
    let (acc0, loss0) = (exact.accuracy.expect("acc"), exact.log_loss.expect("loss"));
    println!(
        "central Newton fit: accuracy {acc0:.4}, log-loss {loss0:.4}, AUC {:.4}",
        exact.auc.expect("auc")
    );
    // Thirty runs: one run's noise can land anywhere in its range.
    let (mut accs, mut losses) = (Vec::new(), Vec::new());
    for seed in 1..=30 {
        let beta = dp_fedavg(&spec, &data, seed);
        let m = score(&beta);
        let (acc, loss) = (m.accuracy.expect("acc"), m.log_loss.expect("loss"));
        println!(
            "DP-SGD run {seed}: accuracy {acc:.4} ({:.1}% of central), log-loss {loss:.4}, AUC {:.4}",
            100.0 * acc / acc0,
            m.auc.expect("auc")
        );
        accs.push(acc);
        losses.push(loss);
    }
    accs.sort_by(f64::total_cmp);
    losses.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v[v.len() / 2];
    let (acc_med, loss_med) = (median(&accs), median(&losses));
    let (acc_low, acc_high) = (accs[0], accs[accs.len() - 1]);
    let (loss_low, loss_high) = (losses[0], losses[losses.len() - 1]);
    println!(
        "over 30 runs: accuracy median {acc_med:.4} ({acc_low:.4}–{acc_high:.4}), log-loss median {loss_med:.4} ({loss_low:.4}–{loss_high:.4})"
    );
    assert!(acc_med >= 0.97 * acc0, "median accuracy {acc_med} against {acc0}");
    assert!(acc_low >= 0.93 * acc0, "lowest accuracy {acc_low} against {acc0}");
    assert!(
        loss_med <= 1.06 * loss0,
        "median log-loss {loss_med} against {loss0}"
    );
    assert!(
        loss_high <= 1.12 * loss0,
        "highest log-loss {loss_high} against {loss0}"
    );
}

/// A seeded generator of the discrete noise.
fn noise_rng(seed: u64) -> super::discrete::NoiseRng {
    <super::discrete::NoiseRng as rand_010::SeedableRng>::seed_from_u64(seed)
}

/// One exact OLS fit from the offices' noisy sums, through the algorithm's check and pooling.
fn dp_ols(spec: &ExperimentSpec, data: &[LocalData], seed: u64) -> fedstat_proto::output::GlmSummary {
    let mut alg = Glm::new(spec, Checkpoint::default()).expect("glm");
    let p = spec.num_params() as usize;
    let now = Instant::now();
    while let Some(step) = alg.next_step(now) {
        let mut total = vec![0.0; algorithm::glm::answer_len(p)];
        for (k, d) in data.iter().enumerate() {
            let mut rng = noise_rng(seed * 100 + k as u64);
            let sums = super::gaussian_ols_sums(spec, d, &mut rng).expect("sums");
            let v = algorithm::glm::answer(&sums);
            let a = algorithm::Answer {
                values: &v,
                weight: 1,
                aux: &[],
            };
            alg.check_answer(&step, a).expect("a valid noisy answer");
            total.iter_mut().zip(v.to_f64()).for_each(|(t, x)| *t += x);
        }
        let pooled = Pooled {
            values: Values::F64(total),
            aux: Vec::new(),
            total_weight: data.len() as u64,
            answers: data.len(),
        };
        let offices = (0..data.len()).map(|k| format!("office{k}")).collect();
        alg.finish_step(now, &step, pooled, offices, 0).expect("step");
    }
    let Some(Output::Glm(summary)) = alg.output().cloned() else {
        panic!("no summary");
    };
    *summary
}

#[test]
fn gaussian_mechanism_ols_at_epsilon_below_one_is_close_to_the_pooled_fit() {
    let spec = example("experiment-ols-dp.toml");
    let cost = spec.privacy_cost_per_round().expect("cost");
    assert_eq!((cost.steps, cost.sampling_rate), (1, 1.0));
    let data = offices(&spec);
    let names = spec.design_columns();
    let train = Design::stack(data.iter().map(|d| &d.train)).expect("stack");
    let test = Design::stack(data.iter().map(|d| &d.test)).expect("stack");
    let exact = fit_central(spec.model, train.x.view(), train.y.view(), 0.0, &names).expect("pooled OLS");
    let score = |beta: &[f64]| {
        metrics(
            spec.model,
            &evaluate(spec.model, test.x.view(), test.y.view(), beta).expect("evaluate"),
        )
    };
    let m0 = score(&exact);
    println!(
        "pooled OLS: test R² {:.4}, RMSE {:.4}",
        m0.r2.expect("r2"),
        m0.rmse.expect("rmse")
    );
    // The pooled fit's own standard errors, for the share the noise adds.
    let pooled = crate::glm::fit_pooled(crate::glm::Family::Gaussian, &train, &names, 1).expect("pooled fit");
    // Thirty releases: a single one can land anywhere in the noise's range.
    const RUNS: u64 = 30;
    let mut covered = 0;
    let (mut r2s, mut rmses, mut wholes) = (Vec::new(), Vec::new(), Vec::new());
    for seed in 1..=RUNS {
        let summary = dp_ols(&spec, &data, seed);
        let beta = summary.coefficients.clone();
        // Its intervals hold the noise's variance too: they cover the pooled coefficients.
        covered += summary
            .ci95
            .iter()
            .zip(&exact)
            .filter(|([lo, hi], e)| (*lo..=*hi).contains(*e))
            .count();
        let inflation: Vec<String> = names
            .iter()
            .zip(summary.std_errors.iter().zip(&pooled.std_errors))
            .map(|(n, (dp, se))| format!("{n} {:.1}x", dp / se))
            .collect();
        let m = score(&beta);
        let (r2, rmse) = (m.r2.expect("r2"), m.rmse.expect("rmse"));
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff: Vec<f64> = beta.iter().zip(&exact).map(|(b, e)| b - e).collect();
        let whole = norm(&diff) / norm(&exact);
        println!(
            "Gaussian mechanism run {seed}: R² {r2:.4}, RMSE {rmse:.4}, coefficient vector off by {:.2}%; standard errors against the pooled fit's: {}",
            100.0 * whole,
            inflation.join(", ")
        );
        r2s.push(r2);
        rmses.push(rmse);
        wholes.push(whole);
    }
    let spread = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2], v[v.len() - 1])
    };
    let (r2_low, r2_median, r2_high) = spread(&mut r2s);
    let (rmse_low, rmse_median, rmse_high) = spread(&mut rmses);
    let (w_low, w_median, w_high) = spread(&mut wholes);
    let all = RUNS as usize * names.len();
    println!(
        "over {RUNS} releases: test R² median {r2_median:.4} ({r2_low:.4}–{r2_high:.4}), RMSE median {rmse_median:.4} ({rmse_low:.4}–{rmse_high:.4}), coefficient vector off by {:.1}% ({:.1}–{:.1}%); 95% intervals covering the pooled coefficient: {covered} of {all}",
        100.0 * w_median,
        100.0 * w_low,
        100.0 * w_high
    );
    let pooled_r2 = m0.r2.expect("r2");
    assert!(r2_median >= 0.95 * pooled_r2, "median R² {r2_median}");
    assert!(r2_low >= 0.8 * pooled_r2, "lowest R² {r2_low}");
    assert!(
        w_median < 0.1,
        "median relative error of the coefficients {w_median}"
    );
    assert!(covered * 100 >= all * 90, "{covered} of {all}");
}

/// One office's tabulation of the example's table (train rows).
fn office_table(
    layout: &crate::tabulate::Layout,
    spec: &ExperimentSpec,
    region: &str,
) -> crate::tabulate::Tabulated {
    let schema = spec.schema.as_ref().expect("schema");
    let request = layout.frame_request(&schema.split_column);
    let path = data_dir().join("cps1988").join(format!("{region}.csv"));
    let frame = crate::data::load_frame(&path, &request, crate::data::LoadLimits::UNLIMITED).expect("frame");
    let codes: Vec<&[u32]> = layout
        .by
        .iter()
        .map(|c| frame.categorical[c].codes.as_slice())
        .collect();
    let values: Vec<&[f64]> = layout
        .numeric
        .iter()
        .map(|n| frame.numeric[&n.column].as_slice())
        .collect();
    crate::tabulate::tabulate(layout, &codes, &values, &frame.train, 2).expect("tabulate")
}

/// The CPS table of counts and mean wage by ethnicity × smsa at ε = 0.96 per office
/// (`configs/experiment-table-dp.toml`) against the same table without noise (wages clipped at
/// the same bound): the errors match the noise the notes announce.
#[test]
fn gaussian_table_at_epsilon_below_one_against_the_exact_table() {
    use crate::algorithm::table::pool_private;
    use crate::tabulate::{node_answer, private_answer, CellRules, Layout};
    let spec = example("experiment-table-dp.toml");
    crate::spec::validate(&spec).expect("valid");
    let cost = spec.privacy_cost_per_round().expect("cost");
    assert_eq!((cost.steps, cost.sampling_rate), (1, 1.0));
    let layout = Layout::new(&spec).expect("layout");
    let tables: Vec<_> = REGIONS.iter().map(|r| office_table(&layout, &spec, r)).collect();
    // The exact pooled table: every office's unsuppressed answer, summed.
    let no_rules = CellRules {
        min_cell: 1,
        dominance_n: 1,
        dominance_k: 100.0,
    };
    let mut exact = vec![0.0; layout.answer_len()];
    for t in &tables {
        let (a, _) = node_answer(&layout, t, no_rules).expect("answer");
        exact.iter_mut().zip(a).for_each(|(e, x)| *e += x);
    }
    let w = layout.width;
    let o = layout.numeric_offset(0);
    let sigma = spec.privacy.as_ref().expect("privacy").noise_multiplier;
    let (sd_count, sd_sum) = crate::tabulate::private_noise_sd(&layout, sigma).expect("noise");
    let pooled_sd = (REGIONS.len() as f64).sqrt();
    let mut worst_count_z: f64 = 0.0;
    for seed in 1..=5 {
        let mut rng = noise_rng(seed);
        let mut pooled = vec![0.0; layout.answer_len()];
        for t in &tables {
            let a = private_answer(&layout, t, sigma, &mut rng).expect("answer");
            crate::algorithm::table::check_private(&layout, &a).expect("a well-formed private answer");
            pooled.iter_mut().zip(a).for_each(|(p, x)| *p += x);
        }
        let out = pool_private(&spec, &layout, &pooled, REGIONS.len()).expect("pool");
        let mut shown = Vec::new();
        for (e, cell) in out.cells.iter().enumerate() {
            assert_eq!(cell.suppressed, None);
            let n = exact[e * w + 1];
            let mean = exact[e * w + o] / n;
            let noisy_n = cell.values[0].expect("count");
            let noisy_mean = cell.values[2].expect("mean");
            // Margins sum k interior cells' noise.
            let k = layout
                .key(e)
                .iter()
                .zip(&layout.levels)
                .map(|(&i, l)| if i == l.len() { l.len() } else { 1 })
                .product::<usize>() as f64;
            let z = (noisy_n - n) / (sd_count * pooled_sd * k.sqrt());
            worst_count_z = worst_count_z.max(z.abs());
            shown.push(format!(
                "{}: n {n} ~ {noisy_n} ({:+.2}%), mean {mean:.1} ~ {noisy_mean:.1} ({:+.2}%)",
                cell.key.join("/"),
                100.0 * (noisy_n - n) / n,
                100.0 * (noisy_mean - mean) / mean
            ));
            let mean_sd = sd_sum[0] * pooled_sd * k.sqrt() / n;
            assert!(
                (noisy_mean - mean).abs() < 6.0 * mean_sd + 6.0 * mean * sd_count * pooled_sd * k.sqrt() / n,
                "{}",
                shown.join("\n")
            );
        }
        println!("Gaussian table run {seed}:\n  {}", shown.join("\n  "));
    }
    println!(
        "noise sd per pooled cell: count {:.2}, wage sum {:.0}",
        sd_count * pooled_sd,
        sd_sum[0] * pooled_sd
    );
    assert!(
        worst_count_z < 5.0,
        "a count's error is {worst_count_z} standard deviations"
    );
}
