//! The GLMs (linear, logistic): local mini-batch SGD, evaluation sums a coordinator can pool
//! exactly, metrics from those sums, and the central fit a federated run is compared against.
//!
//! Objective shared by [`train_sgd`] and [`fit_central`], with `β` all but the intercept:
//! `(1/n) Σ loss_i + (l2/2) ‖β‖²`, where loss is the log-loss (logistic) or `½ (y - ŷ)²` (linear).

use ndarray::{ArrayView1, ArrayView2};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::linalg::solve_spd;
use crate::spec::{ModelKind, TrainingSpec};
pub use crate::sums::Metrics;
use crate::sums::Standardization;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Result of a node's local training.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    pub params: Vec<f64>,
    /// Mean per-row loss over the last epoch (log-loss, or squared error for linear; no L2
    /// term), each row scored with the weights in force before its batch's update.
    pub mean_loss: f64,
}

/// Check the shapes and parameters shared by training, evaluation and fitting.
fn check_inputs(kind: ModelKind, x: ArrayView2<f64>, y: ArrayView1<f64>, params: &[f64]) -> Result<()> {
    if kind == ModelKind::Echo {
        return Err(Error::Model(
            "the echo model has no data to train or evaluate on".to_owned(),
        ));
    }
    if params.len() != x.ncols() {
        return Err(Error::Model(format!(
            "{} parameters for a design of {} columns",
            params.len(),
            x.ncols()
        )));
    }
    if y.len() != x.nrows() {
        return Err(Error::Model(format!(
            "{} responses for {} rows",
            y.len(),
            x.nrows()
        )));
    }
    if params.iter().any(|v| !v.is_finite()) {
        return Err(Error::Model("parameters are not all finite".to_owned()));
    }
    Ok(())
}

/// `z` -> `(p, log-loss)` for target `y`, stable for large `|z|`.
#[inline]
fn logistic(z: f64, y: f64) -> (f64, f64) {
    let e = (-z.abs()).exp();
    let p = if z >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    // softplus(z) - y z
    (p, z.max(0.0) + e.ln_1p() - y * z)
}

#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(u, v)| u * v).sum()
}

/// Mini-batch SGD from `init` on standardized `x` (column 0 the constant). Each epoch shuffles
/// the rows with a ChaCha8Rng seeded from `seed` (the caller derives it from the spec seed, the
/// round and the node name); the gradient is averaged over the batch, L2 applies to the
/// non-intercept coefficients. Deterministic bit for bit for the same inputs.
pub fn train_sgd(
    kind: ModelKind,
    x: ArrayView2<f64>,
    y: ArrayView1<f64>,
    init: &[f64],
    cfg: &TrainingSpec,
    seed: u64,
) -> Result<TrainOutcome> {
    check_inputs(kind, x, y, init)?;
    let (n, p) = x.dim();
    if n == 0 {
        return Err(Error::Model("no training rows".to_owned()));
    }
    if cfg.batch_size == 0
        || !(cfg.learning_rate.is_finite() && cfg.learning_rate > 0.0)
        || !cfg.l2.is_finite()
    {
        return Err(Error::Model(
            "training settings out of range (batch size, learning rate or l2)".to_owned(),
        ));
    }
    // One contiguous row-major copy only if the caller's view is not already one.
    let owned;
    let xs: &[f64] = match x.as_slice() {
        Some(s) => s,
        None => {
            owned = x.as_standard_layout().into_owned();
            owned
                .as_slice()
                .ok_or_else(|| Error::Model("internal: design layout".to_owned()))?
        }
    };
    let ys: Vec<f64> = y.to_vec();
    let logit = kind == ModelKind::Logistic;
    let batch = (cfg.batch_size as usize).min(n);
    // Batches of at least `batch` rows: a short tail joins the batch before it, so no step is
    // ever taken on fewer rows than the batch size (a one-row step is one person's gradient).
    let batches = (n / batch).max(1);
    let (lr, l2) = (cfg.learning_rate, cfg.l2);

    let mut w = init.to_vec();
    let mut grad = vec![0.0; p];
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut epoch_loss = 0.0;
    for _ in 0..cfg.local_epochs.max(1) {
        order.shuffle(&mut rng);
        epoch_loss = 0.0;
        for b in 0..batches {
            let end = if b + 1 == batches { n } else { (b + 1) * batch };
            let idx = &order[b * batch..end];
            grad.fill(0.0);
            for &i in idx {
                let row = &xs[i * p..(i + 1) * p];
                let z = dot(row, &w);
                let g = if logit {
                    let (prob, loss) = logistic(z, ys[i]);
                    epoch_loss += loss;
                    prob - ys[i]
                } else {
                    let r = z - ys[i];
                    epoch_loss += r * r;
                    r
                };
                for (gj, xj) in grad.iter_mut().zip(row) {
                    *gj += g * xj;
                }
            }
            let step = lr / idx.len() as f64;
            w[0] -= step * grad[0];
            for (wj, gj) in w.iter_mut().zip(&grad).skip(1) {
                *wj -= step * gj + lr * l2 * *wj;
            }
        }
        if !(epoch_loss.is_finite() && w.iter().all(|v| v.is_finite())) {
            return Err(Error::Model(
                "local training diverged to non-finite values; lower the learning rate".to_owned(),
            ));
        }
    }
    Ok(TrainOutcome {
        params: w,
        mean_loss: epoch_loss / n as f64,
    })
}

/// DP-SGD's settings at a node (`[privacy]`): clip norm C, noise multiplier σ, Poisson
/// sampling rate q.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgd {
    pub clip_norm: f64,
    pub noise_multiplier: f64,
    pub sampling_rate: f64,
}

impl DpSgd {
    /// Steps per round: `ceil(local_epochs / q)`, as `ExperimentSpec::privacy_cost_per_round`
    /// charges them.
    pub fn steps(&self, local_epochs: u32) -> u64 {
        (f64::from(local_epochs.max(1)) / self.sampling_rate).ceil() as u64
    }
}

/// DP-SGD (Abadi et al. 2016) from `init` on standardised `x`: each of
/// [`DpSgd::steps`] steps takes every row independently with probability q (Poisson
/// subsampling), clips each row's gradient to L2 norm C, adds N(0, σ²C²) to each coordinate
/// of their sum, divides by the expected batch size q·n (not the drawn one, which would be a
/// data-dependent release) and steps; L2 applies to the non-intercept coefficients as in
/// [`train_sgd`]. `rng` draws both the subsample and the noise: the node passes one seeded
/// from the operating system ([`crate::privacy::os_rng`]). The training loss is not released
/// (`mean_loss` is 0).
pub fn train_dp_sgd<R: rand::Rng + ?Sized>(
    kind: ModelKind,
    x: ArrayView2<f64>,
    y: ArrayView1<f64>,
    init: &[f64],
    cfg: &TrainingSpec,
    dp: DpSgd,
    rng: &mut R,
) -> Result<TrainOutcome> {
    check_inputs(kind, x, y, init)?;
    let (n, p) = x.dim();
    if n == 0 {
        return Err(Error::Model("no training rows".to_owned()));
    }
    if !(cfg.learning_rate.is_finite() && cfg.learning_rate > 0.0 && cfg.l2.is_finite()) {
        return Err(Error::Model(
            "training settings out of range (learning rate or l2)".to_owned(),
        ));
    }
    let q = dp.sampling_rate;
    if !(q > 0.0 && q <= 1.0 && dp.clip_norm > 0.0 && dp.noise_multiplier > 0.0) {
        return Err(Error::Model("DP-SGD settings out of range".to_owned()));
    }
    let owned = x.as_standard_layout();
    let xs = owned
        .as_slice()
        .ok_or_else(|| Error::Model("internal: design layout".to_owned()))?;
    let logit = kind == ModelKind::Logistic;
    let (lr, l2, c) = (cfg.learning_rate, cfg.l2, dp.clip_norm);
    let expected = q * n as f64;
    let noise_sd = dp.noise_multiplier * c;
    let mut w = init.to_vec();
    let mut grad = vec![0.0; p];
    for _ in 0..dp.steps(cfg.local_epochs) {
        grad.fill(0.0);
        for i in 0..n {
            if rng.gen::<f64>() >= q {
                continue;
            }
            let row = &xs[i * p..(i + 1) * p];
            let z = dot(row, &w);
            let g = if logit {
                logistic(z, y[i]).0 - y[i]
            } else {
                z - y[i]
            };
            // ‖g·x‖ = |g|·‖x‖: scale the row's gradient down to norm C.
            let norm = g.abs() * dot(row, row).sqrt();
            let s = if norm > c { g * c / norm } else { g };
            for (gj, xj) in grad.iter_mut().zip(row) {
                *gj += s * xj;
            }
        }
        crate::privacy::add_gaussian(&mut grad, noise_sd, rng);
        let step = lr / expected;
        w[0] -= step * grad[0];
        for (wj, gj) in w.iter_mut().zip(&grad).skip(1) {
            *wj -= step * gj + lr * l2 * *wj;
        }
        if !w.iter().all(|v| v.is_finite()) {
            return Err(Error::Model(
                "DP-SGD diverged to non-finite values; lower the learning rate".to_owned(),
            ));
        }
    }
    Ok(TrainOutcome {
        params: w,
        mean_loss: 0.0,
    })
}

/// Number of equal-width bins of predicted probability behind the pooled AUC. Coarse on
/// purpose: evaluation answers are counts, and finer bins would single out fewer people (the
/// pooled AUC moves by well under 0.001 on CPS 1988 against exact ranking).
pub const AUC_BINS: usize = 100;

/// Evaluation sums of `params` on `(x, y)`, in the scale `x` is given in.
pub fn evaluate(kind: ModelKind, x: ArrayView2<f64>, y: ArrayView1<f64>, params: &[f64]) -> Result<EvalSums> {
    check_inputs(kind, x, y, params)?;
    let w = ArrayView1::from(params);
    let mut s = EvalSums {
        n: x.nrows() as u64,
        ..EvalSums::default()
    };
    if kind == ModelKind::Logistic {
        s.hist_pos = vec![0; AUC_BINS];
        s.hist_neg = vec![0; AUC_BINS];
    }
    for (row, &yi) in x.rows().into_iter().zip(y) {
        let z = row.dot(&w);
        if kind == ModelKind::Logistic {
            let (p, _) = logistic(z, yi);
            let pc = p.clamp(1e-15, 1.0 - 1e-15);
            let positive = yi > 0.5;
            s.loss_sum -= if positive { pc.ln() } else { (1.0 - pc).ln() };
            s.correct += u64::from((p > 0.5) == positive);
            // p is in [0, 1]; the top edge goes in the last bin.
            let bin = ((p * AUC_BINS as f64) as usize).min(AUC_BINS - 1);
            if positive {
                s.hist_pos[bin] += 1;
            } else {
                s.hist_neg[bin] += 1;
            }
        } else {
            let r = yi - z;
            s.sse += r * r;
            s.sum_y += yi;
            s.sum_y2 += yi * yi;
        }
    }
    if kind == ModelKind::Linear {
        s.loss_sum = s.sse;
    }
    if !(s.loss_sum.is_finite() && s.sse.is_finite() && s.sum_y2.is_finite()) {
        return Err(Error::Model("evaluation produced non-finite sums".to_owned()));
    }
    Ok(s)
}

/// Evaluation sums of one node's test rows; sums from many nodes merge into the pooled metrics.
///
/// Logistic: `loss_sum` is Σ log-loss with p clipped to [1e-15, 1-1e-15], `correct` counts
/// `(p > 0.5) == y`, `hist_pos`/`hist_neg` count predicted p per bin for y = 1 / y = 0.
/// Linear: `sse` (also `loss_sum`), `sum_y`, `sum_y2`; empty histograms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EvalSums {
    pub n: u64,
    pub loss_sum: f64,
    pub correct: u64,
    pub sse: f64,
    pub sum_y: f64,
    pub sum_y2: f64,
    pub hist_pos: Vec<u64>,
    pub hist_neg: Vec<u64>,
}

impl EvalSums {
    /// Add another node's sums. Merging into `EvalSums::default()` adopts the other's shape.
    /// Add another node's sums. Merging into `EvalSums::default()` adopts the other's shape.
    pub fn merge(&mut self, other: &EvalSums) -> Result<()> {
        let blank = self.n == 0 && self.hist_pos.is_empty() && self.hist_neg.is_empty();
        if blank && self.hist_pos.len() != other.hist_pos.len() {
            self.hist_pos = vec![0; other.hist_pos.len()];
            self.hist_neg = vec![0; other.hist_neg.len()];
        }
        if self.hist_pos.len() != other.hist_pos.len() || self.hist_neg.len() != other.hist_neg.len() {
            return Err(Error::Model(
                "evaluation sums with different histogram sizes".to_owned(),
            ));
        }
        let overflow = || Error::Model("evaluation counts overflow".to_owned());
        self.n = self.n.checked_add(other.n).ok_or_else(overflow)?;
        self.correct = self.correct.checked_add(other.correct).ok_or_else(overflow)?;
        for (a, b) in self
            .hist_pos
            .iter_mut()
            .zip(&other.hist_pos)
            .chain(self.hist_neg.iter_mut().zip(&other.hist_neg))
        {
            *a = a.checked_add(*b).ok_or_else(overflow)?;
        }
        self.loss_sum += other.loss_sum;
        self.sse += other.sse;
        self.sum_y += other.sum_y;
        self.sum_y2 += other.sum_y2;
        Ok(())
    }

    /// Check sums that came from the network: finite, non-negative where they must be, the
    /// histograms of the right size and the counts consistent with `n`.
    /// Check sums that came from a node: finite, non-negative where they must be, the
    /// histograms of the right size and the counts consistent with `n`.
    pub fn validate(&self, kind: ModelKind) -> Result<()> {
        let bad = |what: &str| Err(Error::Model(format!("evaluation sums: {what}")));
        if ![self.loss_sum, self.sse, self.sum_y, self.sum_y2]
            .iter()
            .all(|v| v.is_finite())
        {
            return bad("not all finite");
        }
        if self.loss_sum < 0.0 || self.sse < 0.0 || self.sum_y2 < 0.0 {
            return bad("a loss or sum of squares is negative");
        }
        if self.correct > self.n {
            return bad("more correct predictions than rows");
        }
        match kind {
            ModelKind::Logistic => {
                if self.hist_pos.len() != AUC_BINS || self.hist_neg.len() != AUC_BINS {
                    return bad("histograms must have AUC_BINS bins");
                }
                let total = self
                    .hist_pos
                    .iter()
                    .chain(&self.hist_neg)
                    .try_fold(0u64, |a, b| a.checked_add(*b));
                if total != Some(self.n) {
                    return bad("histogram counts do not add up to the number of rows");
                }
            }
            ModelKind::Linear => {
                if !self.hist_pos.is_empty() || !self.hist_neg.is_empty() || self.correct != 0 {
                    return bad("a linear model has no histograms or correct count");
                }
                // Cauchy-Schwarz: (Σy)² <= n Σy², with room for rounding.
                if self.sum_y * self.sum_y > self.n as f64 * self.sum_y2 * (1.0 + 1e-9) + 1e-9 {
                    return bad("sum of y and sum of y² are inconsistent");
                }
            }
            ModelKind::Echo | ModelKind::Poisson | ModelKind::Gamma | ModelKind::Table => {
                return bad("only linear and logistic models are evaluated")
            }
        }
        Ok(())
    }
}

/// Metrics from (merged) sums. AUC from the two histograms, pairs in the same bin counting ½;
/// R² = 1 - SSE/SST with SST = Σy² - (Σy)²/n.
pub fn metrics(kind: ModelKind, sums: &EvalSums) -> Metrics {
    let mut m = Metrics {
        n: sums.n,
        ..Metrics::default()
    };
    if sums.n == 0 {
        return m;
    }
    let n = sums.n as f64;
    match kind {
        ModelKind::Logistic => {
            m.log_loss = Some(sums.loss_sum / n);
            m.accuracy = Some(sums.correct as f64 / n);
            // Twice the number of concordant pairs, exact in integers.
            let (mut neg_below, mut twice_concordant, mut pos, mut neg) = (0u128, 0u128, 0u128, 0u128);
            for (&bp, &bn) in sums.hist_pos.iter().zip(&sums.hist_neg) {
                let (bp, bn) = (u128::from(bp), u128::from(bn));
                twice_concordant += bp * (2 * neg_below + bn);
                neg_below += bn;
                pos += bp;
                neg += bn;
            }
            if pos > 0 && neg > 0 {
                m.auc = Some(twice_concordant as f64 / (2.0 * pos as f64 * neg as f64));
            }
        }
        ModelKind::Linear => {
            m.rmse = Some((sums.sse / n).sqrt());
            let sst = sums.sum_y2 - sums.sum_y * sums.sum_y / n;
            if sst > 0.0 {
                m.r2 = Some(1.0 - sums.sse / sst);
            }
        }
        ModelKind::Echo | ModelKind::Poisson | ModelKind::Gamma | ModelKind::Table => {}
    }
    m
}

/// `Xᵀ diag(w) X` (lower triangle mirrored), `w = None` meaning all ones.
fn weighted_gram(xs: &[f64], n: usize, p: usize, w: Option<&[f64]>) -> Vec<f64> {
    let mut g = vec![0.0; p * p];
    for i in 0..n {
        let row = &xs[i * p..(i + 1) * p];
        let wi = w.map_or(1.0, |w| w[i]);
        for a in 0..p {
            let xa = wi * row[a];
            for b in 0..=a {
                g[a * p + b] += xa * row[b];
            }
        }
    }
    for a in 0..p {
        for b in 0..a {
            g[b * p + a] = g[a * p + b];
        }
    }
    g
}

/// The same model fitted centrally (what the demo compares against): logistic by Newton/IRLS
/// to convergence, linear by the normal equations, both minimising the objective above.
/// `columns` name the design columns (intercept first) in [`Error::Singular`].
pub fn fit_central(
    kind: ModelKind,
    x: ArrayView2<f64>,
    y: ArrayView1<f64>,
    l2: f64,
    columns: &[String],
) -> Result<Vec<f64>> {
    let (n, p) = x.dim();
    check_inputs(kind, x, y, &vec![0.0; p])?;
    if n == 0 || p == 0 {
        return Err(Error::Model("no rows or no columns to fit".to_owned()));
    }
    if !(l2.is_finite() && l2 >= 0.0) {
        return Err(Error::Model("l2 must be zero or positive".to_owned()));
    }
    let owned = x.as_standard_layout();
    let xs = owned
        .as_slice()
        .ok_or_else(|| Error::Model("internal: design layout".to_owned()))?;
    let ys: Vec<f64> = y.to_vec();
    // The penalty's weight in the summed (not averaged) objective.
    let ridge = n as f64 * l2;

    if kind == ModelKind::Linear {
        let mut a = weighted_gram(xs, n, p, None);
        for j in 1..p {
            a[j * p + j] += ridge;
        }
        let mut b = vec![0.0; p];
        for (i, &yi) in ys.iter().enumerate() {
            for (bj, xj) in b.iter_mut().zip(&xs[i * p..(i + 1) * p]) {
                *bj += xj * yi;
            }
        }
        return solve_spd(&a, &b, columns);
    }

    // Logistic: Newton from zero, halving a step that does not lower the objective (only
    // needed far from the optimum; near it every full step is taken).
    let objective = |beta: &[f64]| -> f64 {
        let loss: f64 = (0..n)
            .map(|i| logistic(dot(&xs[i * p..(i + 1) * p], beta), ys[i]).1)
            .sum();
        loss + 0.5 * ridge * beta.iter().skip(1).map(|b| b * b).sum::<f64>()
    };
    let mut beta = vec![0.0; p];
    let mut current = objective(&beta);
    let mut weights = vec![0.0; n];
    for _ in 0..100 {
        let mut grad = vec![0.0; p];
        for i in 0..n {
            let row = &xs[i * p..(i + 1) * p];
            let (prob, _) = logistic(dot(row, &beta), ys[i]);
            weights[i] = prob * (1.0 - prob);
            for (gj, xj) in grad.iter_mut().zip(row) {
                *gj += (ys[i] - prob) * xj;
            }
        }
        let mut h = weighted_gram(xs, n, p, Some(&weights));
        for j in 1..p {
            h[j * p + j] += ridge;
            grad[j] -= ridge * beta[j];
        }
        let step = solve_spd(&h, &grad, columns)?;
        let mut t = 1.0;
        let mut next: Vec<f64> = beta.iter().zip(&step).map(|(b, s)| b + s).collect();
        let mut value = objective(&next);
        // The tolerance absorbs rounding in the sum over rows, so that steps near the optimum,
        // whose true gain is below that noise, are not halved.
        let worse = |v: f64| v.is_nan() || v > current + 1e-10 * current.abs().max(1.0);
        while worse(value) && t > 1e-6 {
            t *= 0.5;
            next = beta.iter().zip(&step).map(|(b, s)| b + t * s).collect();
            value = objective(&next);
        }
        // Newton converges quadratically: once the full step is this small the error is far smaller.
        let converged = step
            .iter()
            .zip(&next)
            .all(|(s, b)| s.abs() <= 1e-10 * b.abs().max(1.0));
        beta = next;
        current = value;
        if converged {
            return Ok(beta);
        }
    }
    Err(Error::Model(
        "logistic fit did not converge in 100 Newton steps (are the classes perfectly separated?)".to_owned(),
    ))
}

/// Coefficients on the standardised scale -> original units: `b_j / sd_j`, intercept
/// `b_0 - Σ b_j mean_j / sd_j`. `params` must have one more entry than `st` has columns.
pub fn unstandardize(params: &[f64], st: &Standardization) -> Vec<f64> {
    let mut out = params.to_vec();
    if let Some((b0, rest)) = out.split_first_mut() {
        for ((b, m), s) in rest.iter_mut().zip(&st.mean).zip(&st.sd) {
            *b /= s;
            *b0 -= *b * m;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use ndarray::{Array1, Array2};

    use super::*;
    use crate::data::tests::{data_dir, load_region, logit_schema, ols_schema, REGIONS};
    use crate::data::{column_sums, Design, LocalData, StandardizationExt};

    struct Pooled {
        regions: Vec<LocalData>,
        st: Standardization,
        train: Design,
        test: Design,
        names: Vec<String>,
    }

    #[test]
    fn dp_sgd_clips_each_row_and_adds_noise_of_sd_sigma_c() {
        let cfg = TrainingSpec {
            local_epochs: 1,
            batch_size: 1,
            learning_rate: 1.0,
            l2: 0.0,
            seed: 0,
        };
        // One row whose gradient is huge: with almost no noise and q = 1 the step is C long.
        let x = Array2::from_shape_vec((1, 2), vec![1.0, 1000.0]).expect("test value");
        let y = Array1::from(vec![1e6]);
        let dp = DpSgd {
            clip_norm: 0.5,
            noise_multiplier: 1e-12,
            sampling_rate: 1.0,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let out = train_dp_sgd(
            ModelKind::Linear,
            x.view(),
            y.view(),
            &[0.0, 0.0],
            &cfg,
            dp,
            &mut rng,
        )
        .expect("test value");
        let norm = dot(&out.params, &out.params).sqrt();
        assert!((norm - 0.5).abs() < 1e-9, "{norm}");
        assert_eq!(out.mean_loss, 0.0);
        // Rows with zero gradient: the step is the noise alone, of sd σC / (q n).
        let p = 20_000;
        let x = Array2::zeros((1, p));
        let y = Array1::from(vec![0.0]);
        let dp = DpSgd {
            clip_norm: 2.0,
            noise_multiplier: 1.5,
            sampling_rate: 1.0,
        };
        let out = train_dp_sgd(
            ModelKind::Linear,
            x.view(),
            y.view(),
            &vec![0.0; p],
            &cfg,
            dp,
            &mut rng,
        )
        .expect("test value");
        let sd = (out.params.iter().map(|v| v * v).sum::<f64>() / p as f64).sqrt();
        assert!((sd - 3.0).abs() < 0.05, "{sd}");
        assert_eq!(dp.steps(3), 3);
        let dp = DpSgd {
            sampling_rate: 0.03,
            ..dp
        };
        assert_eq!(dp.steps(1), 34);
    }

    /// The four clean regions, standardised with the pooled train statistics.
    fn pooled(model: ModelKind) -> Pooled {
        let schema = if model == ModelKind::Linear {
            ols_schema()
        } else {
            logit_schema()
        };
        let names = schema.design_columns();
        let mut regions: Vec<LocalData> = REGIONS.iter().map(|r| load_region(r, &schema, model)).collect();
        let sums: Vec<_> = regions.iter().map(|d| column_sums(d.train.x.view())).collect();
        let st = Standardization::from_sums(&sums, &names[1..]).expect("standardise");
        for d in &mut regions {
            st.apply(&mut d.train.x);
            st.apply(&mut d.test.x);
        }
        let train = Design::stack(regions.iter().map(|d| &d.train)).expect("stack");
        let test = Design::stack(regions.iter().map(|d| &d.test)).expect("stack");
        Pooled {
            regions,
            st,
            train,
            test,
            names,
        }
    }

    fn reference() -> serde_json::Value {
        let text = std::fs::read_to_string(data_dir().join("cps1988/reference.json")).expect("reference");
        serde_json::from_str(&text).expect("json")
    }

    fn coefs(v: &serde_json::Value, names: &[String]) -> Vec<f64> {
        names
            .iter()
            .map(|n| v[n].as_f64().expect("coefficient"))
            .collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64, relative: bool, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            let err = if relative {
                ((g - w) / w).abs()
            } else {
                (g - w).abs()
            };
            assert!(err <= tol, "{what}[{j}]: {g} vs {w} (error {err:e})");
        }
    }

    #[test]
    fn central_logit_matches_statsmodels_and_its_test_metrics() {
        let d = pooled(ModelKind::Logistic);
        let r = &reference()["cps1988"]["models"]["logit_highwage"];
        let beta =
            fit_central(ModelKind::Logistic, d.train.x.view(), d.train.y.view(), 0.0, &[]).expect("fit");
        let want = coefs(&r["pooled_statsmodels_Logit_standardized"]["coef"], &d.names);
        assert_close(&beta, &want, 1e-6, false, "standardized logit");
        let raw = coefs(&r["pooled_statsmodels_Logit"]["coef"], &d.names);
        assert_close(&unstandardize(&beta, &d.st), &raw, 1e-6, true, "raw logit");

        let m = metrics(
            ModelKind::Logistic,
            &evaluate(ModelKind::Logistic, d.test.x.view(), d.test.y.view(), &beta).expect("evaluate"),
        );
        let t = &r["pooled_statsmodels_Logit"]["test"];
        let num = |k: &str| t[k].as_f64().expect("metric");
        assert_eq!(m.n, 5_631);
        assert!(
            (m.log_loss.expect("log loss") - num("log_loss")).abs() < 1e-9,
            "{m:?}"
        );
        assert!(
            (m.accuracy.expect("accuracy") - num("accuracy")).abs() < 1e-9,
            "{m:?}"
        );
        assert!((m.auc.expect("auc") - num("auc")).abs() < 2e-3, "{m:?}");
        assert_eq!((m.rmse, m.r2), (None, None));
    }

    #[test]
    fn central_ols_matches_statsmodels_and_its_test_metrics() {
        let d = pooled(ModelKind::Linear);
        let r = &reference()["cps1988"]["models"]["ols_logwage"];
        let beta = fit_central(ModelKind::Linear, d.train.x.view(), d.train.y.view(), 0.0, &[]).expect("fit");
        let want = coefs(&r["pooled_statsmodels_OLS_standardized"]["coef"], &d.names);
        assert_close(&beta, &want, 1e-6, false, "standardized ols");
        let raw = coefs(&r["pooled_statsmodels_OLS"]["coef"], &d.names);
        assert_close(&unstandardize(&beta, &d.st), &raw, 1e-6, true, "raw ols");
        let m = metrics(
            ModelKind::Linear,
            &evaluate(ModelKind::Linear, d.test.x.view(), d.test.y.view(), &beta).expect("evaluate"),
        );
        let t = &r["pooled_statsmodels_OLS"]["test"];
        assert!(
            (m.rmse.expect("rmse") - t["rmse"].as_f64().expect("rmse")).abs() < 1e-9,
            "{m:?}"
        );
        assert!(
            (m.r2.expect("r2") - t["r2"].as_f64().expect("r2")).abs() < 1e-9,
            "{m:?}"
        );
    }

    #[test]
    fn sgd_gets_close_to_the_central_fit_and_is_deterministic() {
        let d = pooled(ModelKind::Logistic);
        let cfg = TrainingSpec {
            local_epochs: 10,
            batch_size: 32,
            learning_rate: 0.05,
            l2: 0.0,
            seed: 7,
        };
        let init = vec![0.0; d.names.len()];
        let run = || {
            train_sgd(
                ModelKind::Logistic,
                d.train.x.view(),
                d.train.y.view(),
                &init,
                &cfg,
                7,
            )
            .expect("train")
        };
        let a = run();
        let b = run();
        let bits = |o: &TrainOutcome| o.params.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
        assert_eq!(a.mean_loss.to_bits(), b.mean_loss.to_bits());
        let other = train_sgd(
            ModelKind::Logistic,
            d.train.x.view(),
            d.train.y.view(),
            &init,
            &cfg,
            8,
        )
        .expect("train");
        assert_ne!(bits(&a), bits(&other), "the seed must matter");

        let m = metrics(
            ModelKind::Logistic,
            &evaluate(ModelKind::Logistic, d.test.x.view(), d.test.y.view(), &a.params).expect("evaluate"),
        );
        let want = reference()["cps1988"]["models"]["logit_highwage"]["pooled_statsmodels_Logit"]["test"]
            ["log_loss"]
            .as_f64()
            .expect("log loss");
        let got = m.log_loss.expect("log loss");
        assert!((got - want).abs() < 0.01, "sgd test log-loss {got} vs {want}");
        assert!((a.mean_loss - 0.52).abs() < 0.02, "train loss {}", a.mean_loss);

        // Linear SGD as well, on ln wage.
        let d = pooled(ModelKind::Linear);
        let lin = train_sgd(
            ModelKind::Linear,
            d.train.x.view(),
            d.train.y.view(),
            &init,
            &cfg,
            7,
        )
        .expect("train");
        let beta = fit_central(ModelKind::Linear, d.train.x.view(), d.train.y.view(), 0.0, &[]).expect("fit");
        let rmse = |p: &[f64]| {
            metrics(
                ModelKind::Linear,
                &evaluate(ModelKind::Linear, d.test.x.view(), d.test.y.view(), p).expect("eval"),
            )
            .rmse
            .expect("rmse")
        };
        assert!(
            rmse(&lin.params) < rmse(&beta) + 0.01,
            "{} vs {}",
            rmse(&lin.params),
            rmse(&beta)
        );
    }

    #[test]
    fn bad_training_requests_are_refused() {
        let x = Array2::from_shape_vec((3, 2), vec![1.0, 0.5, 1.0, -0.5, 1.0, 2.0]).expect("shape");
        let y = Array1::from(vec![1.0, 0.0, 1.0]);
        let cfg = TrainingSpec::default();
        let check = |init: &[f64], cfg: &TrainingSpec, kind: ModelKind, want: &str| {
            let e = train_sgd(kind, x.view(), y.view(), init, cfg, 1).expect_err(want);
            assert!(e.to_string().contains(want), "{e}");
        };
        check(
            &[0.0; 3],
            &cfg,
            ModelKind::Logistic,
            "3 parameters for a design of 2 columns",
        );
        check(&[0.0, f64::NAN], &cfg, ModelKind::Logistic, "not all finite");
        check(&[0.0; 2], &cfg, ModelKind::Echo, "echo");
        let wild = TrainingSpec {
            learning_rate: 1e300,
            local_epochs: 5,
            ..cfg.clone()
        };
        check(&[0.0; 2], &wild, ModelKind::Linear, "diverged");
        let empty = Array2::<f64>::zeros((0, 2));
        let e = train_sgd(
            ModelKind::Linear,
            empty.view(),
            Array1::zeros(0).view(),
            &[0.0; 2],
            &cfg,
            1,
        );
        assert!(e.is_err());
        // Collinear design: clear error, not garbage.
        let x = Array2::from_shape_vec((3, 3), vec![1.0, 0.5, 1.0, 1.0, -0.5, -1.0, 1.0, 2.0, 4.0])
            .expect("shape");
        let cols = ["(intercept)".to_owned(), "u".to_owned(), "w".to_owned()];
        let e = fit_central(ModelKind::Linear, x.view(), y.view(), 0.0, &cols).expect_err("singular");
        assert!(
            matches!(&e, Error::Singular { column, combination_of } if column == "w" && combination_of == &cols[1..2]),
            "{e}"
        );
        assert!(
            fit_central(ModelKind::Linear, x.view(), y.view(), 0.1, &[]).is_ok(),
            "ridge makes it solvable"
        );
    }

    #[test]
    fn merged_region_sums_equal_the_pooled_evaluation() {
        for kind in [ModelKind::Logistic, ModelKind::Linear] {
            let d = pooled(kind);
            let params = fit_central(kind, d.train.x.view(), d.train.y.view(), 0.01, &[]).expect("fit");
            let whole = evaluate(kind, d.test.x.view(), d.test.y.view(), &params).expect("evaluate");
            whole.validate(kind).expect("valid");
            let mut merged = EvalSums::default();
            for r in &d.regions {
                let part = evaluate(kind, r.test.x.view(), r.test.y.view(), &params).expect("evaluate");
                part.validate(kind).expect("valid");
                merged.merge(&part).expect("merge");
            }
            merged.validate(kind).expect("valid");
            assert_eq!(
                (merged.n, merged.correct, &merged.hist_pos, &merged.hist_neg),
                (whole.n, whole.correct, &whole.hist_pos, &whole.hist_neg)
            );
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
            for (a, b) in [
                (merged.loss_sum, whole.loss_sum),
                (merged.sse, whole.sse),
                (merged.sum_y, whole.sum_y),
                (merged.sum_y2, whole.sum_y2),
            ] {
                assert!(close(a, b), "{kind:?}: {a} vs {b}");
            }
            let (m1, m2) = (metrics(kind, &merged), metrics(kind, &whole));
            assert_eq!((m1.n, m1.accuracy, m1.auc), (m2.n, m2.accuracy, m2.auc));
        }
    }

    #[test]
    fn auc_and_validation_follow_their_definitions() {
        let mut s = EvalSums {
            n: 4,
            correct: 3,
            hist_pos: vec![0; AUC_BINS],
            hist_neg: vec![0; AUC_BINS],
            ..EvalSums::default()
        };
        // Positives in bins 10 and 20, negatives in bins 10 and 5: pairs (20,10),(20,5),(10,5)
        // concordant, (10,10) a tie -> 3.5 / 4.
        s.hist_pos[10] = 1;
        s.hist_pos[20] = 1;
        s.hist_neg[10] = 1;
        s.hist_neg[5] = 1;
        assert_eq!(metrics(ModelKind::Logistic, &s).auc, Some(0.875));
        s.validate(ModelKind::Logistic).expect("valid");

        let check = |edit: &dyn Fn(&mut EvalSums), want: &str| {
            let mut bad = s.clone();
            edit(&mut bad);
            let e = bad.validate(ModelKind::Logistic).expect_err(want);
            assert!(e.to_string().contains(want), "{e}");
        };
        check(&|b| b.n = 5, "do not add up");
        check(&|b| b.hist_pos.pop().map_or((), drop), "AUC_BINS");
        check(&|b| b.loss_sum = f64::NAN, "finite");
        check(&|b| b.correct = 9, "more correct");
        check(&|b| b.loss_sum = -1.0, "negative");
        let linear = EvalSums {
            n: 2,
            sse: 1.0,
            loss_sum: 1.0,
            sum_y: 10.0,
            sum_y2: 1.0,
            ..EvalSums::default()
        };
        assert!(linear.validate(ModelKind::Linear).is_err());
        let mut lin = EvalSums::default();
        assert!(lin.merge(&s).is_ok());
        let linear_ok = EvalSums {
            sum_y2: 60.0,
            ..linear
        };
        assert!(lin.merge(&linear_ok).is_err(), "histogram shapes differ");
    }
}
