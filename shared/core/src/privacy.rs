//! Record-level and node-level differential privacy: what a `[privacy]` table means, checked
//! before anything runs ([`validate`]), and the mechanisms the nodes apply before an answer
//! leaves them: DP-SGD's pieces (clipping, Gaussian noise; the loop is
//! [`crate::model::train_dp_sgd`]), the Gaussian mechanism on the bounded sufficient statistics
//! of an exact linear model ([`gaussian_ols_sums`]), node-level clipping and noise of a FedAvg
//! update ([`node_level_release`]), and the public standardisation made from the declared
//! bounds ([`bounds_standardization`]), which replaces the data-dependent statistics step.
//!
//! **Randomness.** Noise (and DP-SGD's Poisson subsample) is drawn from a ChaCha20 generator
//! seeded from the operating system ([`os_rng`]) at the node, never from the spec's seed: anyone
//! who knows the seed could otherwise subtract the noise, and amplification by subsampling
//! assumes the sample is secret. DP runs are therefore not reproducible bit for bit. The
//! single-release mechanisms (exact OLS sums, table cells) draw an exact discrete Gaussian on a
//! power-of-two grid ([`discrete`]), which closes the floating-point side channel of textbook
//! samplers (Mironov, CCS 2012). DP-SGD's per-step noise and node-level noise still come from
//! the Box–Muller transform in `f64`: their accounting is for the continuous Gaussian.
//!
//! **What a DP experiment releases** (and what `privacy_cost_per_round` charges):
//! - FedAvg with DP-SGD: per round the local model after `ceil(local_epochs / q)` noisy steps,
//!   with the public weight 1 (the pooled model is the unweighted mean of the offices' models,
//!   so no row count leaves) and no training loss (sent as 0). No statistics step (the
//!   standardisation comes from the declared bounds) and no evaluation step (test sums would
//!   be a further release): the researcher evaluates the released model elsewhere.
//! - Exact linear model: one release, the noisy `XᵀX`, `Xᵀy`, `yᵀy`, `n`, `Σy` (one Gaussian
//!   mechanism on the whole vector, the other figures of the answer derived from these).

use fedstat_proto::design::{DesignColumn, DesignPlan, Factor, Response};
use fedstat_proto::privacy::{ColumnBound, PrivacySpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::data::LocalData;
use crate::glm::{self, StepSums};
use crate::spec::{ExperimentSpec, Method, ModelKind};
use crate::sums::Standardization;
use crate::{Error, Result};

const WHAT: &str = "experiment";

/// The largest δ a `[privacy]` table may declare.
pub const MAX_DELTA: f64 = 1e-3;

fn bad(key: &str, problem: impl Into<String>) -> Error {
    Error::config(WHAT, key, problem)
}

/// Which mechanism an experiment's `[privacy]` table asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// DP-SGD at every node (federated averaging of linear and logistic models).
    DpSgd,
    /// The Gaussian mechanism on bounded sums (the exact linear model).
    GaussianSums,
    /// The Gaussian mechanism on a table's cell counts and bounded sums.
    GaussianTable,
}

/// The mechanism of a model and method, or `None` where DP is not supported.
pub fn mechanism(spec: &ExperimentSpec) -> Option<Mechanism> {
    match (spec.method, spec.model) {
        (_, ModelKind::Table) => Some(Mechanism::GaussianTable),
        (Method::FedAvg, ModelKind::Linear | ModelKind::Logistic) => Some(Mechanism::DpSgd),
        (Method::Exact, ModelKind::Linear) => Some(Mechanism::GaussianSums),
        _ => None,
    }
}

/// Check a `[privacy]` table against the rest of the experiment. Called by
/// [`crate::spec::validate`]; errors name the key under `privacy`.
pub fn validate(spec: &ExperimentSpec) -> Result<()> {
    let Some(p) = &spec.privacy else {
        return Ok(());
    };
    if !(p.noise_multiplier.is_finite() && p.noise_multiplier > 0.0) {
        return Err(bad("privacy.noise_multiplier", "must be a finite number above 0"));
    }
    if !(p.delta.is_finite() && p.delta > 0.0 && p.delta <= MAX_DELTA) {
        return Err(bad("privacy.delta", "must be above 0 and at most 1e-3"));
    }
    for (i, b) in p.bounds.iter().enumerate() {
        if b.column.trim().is_empty() {
            return Err(bad(
                "privacy.bounds",
                format!("entry {}: column name must not be empty", i + 1),
            ));
        }
        if !(b.lower.is_finite() && b.upper.is_finite() && b.lower < b.upper) {
            return Err(bad(
                "privacy.bounds",
                format!(
                    "column `{}`: lower and upper must be finite, lower below upper",
                    b.column
                ),
            ));
        }
        if p.bounds[..i].iter().any(|o| o.column == b.column) {
            return Err(bad(
                "privacy.bounds",
                format!("column `{}` is bounded twice", b.column),
            ));
        }
    }
    if let Some(node) = &p.node_level {
        if !spec.secure_aggregation {
            return Err(bad(
                "privacy.node_level",
                "needs secure_aggregation = true (the coordinator must see only the sum of the noisy updates)",
            ));
        }
        if !(node.clip_norm.is_finite() && node.clip_norm > 0.0) {
            return Err(bad(
                "privacy.node_level.clip_norm",
                "must be a finite number above 0",
            ));
        }
        if !(node.noise_multiplier.is_finite() && node.noise_multiplier > 0.0) {
            return Err(bad(
                "privacy.node_level.noise_multiplier",
                "must be a finite number above 0",
            ));
        }
    }
    let Some(mechanism) = mechanism(spec) else {
        return Err(bad(
            "privacy",
            format!(
                "differential privacy is available for method = \"fedavg\" with linear or logistic models (DP-SGD), for method = \"exact\" with the linear model and for tables (Gaussian mechanism), not for model = \"{}\" with this method",
                spec.model.as_str()
            ),
        ));
    };
    if mechanism == Mechanism::GaussianTable {
        return validate_table(spec, p);
    }
    let plan = spec.design().map_err(crate::data::design_error)?;
    match mechanism {
        Mechanism::DpSgd => {
            let c = p
                .clip_norm
                .ok_or_else(|| bad("privacy.clip_norm", "required for DP-SGD (federated averaging)"))?;
            if !(c.is_finite() && c > 0.0) {
                return Err(bad("privacy.clip_norm", "must be a finite number above 0"));
            }
            let q = p.sampling_rate.ok_or_else(|| {
                bad(
                    "privacy.sampling_rate",
                    "required for DP-SGD (federated averaging)",
                )
            })?;
            if !(q.is_finite() && q > 0.0 && q <= 1.0) {
                return Err(bad("privacy.sampling_rate", "must be above 0 and at most 1"));
            }
            if !plan.intercept {
                return Err(bad("privacy", "DP-SGD needs a model with an intercept"));
            }
            // Every design column needs a public range: the standardisation is made from it.
            design_intervals(&plan, &p.bounds)?;
        }
        Mechanism::GaussianSums => {
            if p.node_level.is_some() {
                return Err(bad("privacy.node_level", "applies to federated averaging only"));
            }
            if p.clip_norm.is_some() || p.sampling_rate.is_some() {
                return Err(bad(
                    "privacy",
                    "clip_norm and sampling_rate belong to DP-SGD; the Gaussian mechanism uses bounds",
                ));
            }
            if plan.weights.is_some() || plan.offset.is_some() {
                return Err(bad(
                    "privacy",
                    "the Gaussian mechanism on sums does not support weights or an offset yet",
                ));
            }
            OlsBasis::new(spec)?;
        }
        Mechanism::GaussianTable => {}
    }
    Ok(())
}

/// A table under the Gaussian mechanism releases counts and sums only, every value clipped
/// into the bounds the form declares (they set the noise, [`crate::tabulate::private_noise_sd`]).
fn validate_table(spec: &ExperimentSpec, p: &PrivacySpec) -> Result<()> {
    if p.node_level.is_some() {
        return Err(bad("privacy.node_level", "applies to federated averaging only"));
    }
    if p.clip_norm.is_some() || p.sampling_rate.is_some() {
        return Err(bad(
            "privacy",
            "clip_norm and sampling_rate belong to DP-SGD; a table's noise is set by its numeric columns' min and max",
        ));
    }
    if !p.bounds.is_empty() {
        return Err(bad(
            "privacy.bounds",
            "a table's numeric columns declare their own min and max in [[table.numeric]]",
        ));
    }
    let Some(table) = &spec.table else {
        return Ok(()); // the table validation names the missing [table]
    };
    for n in &table.numeric {
        if !n.clip {
            return Err(bad(
                "privacy",
                format!(
                    "numeric column `{}` needs clip = true: under differential privacy a value outside its bounds is clipped, never refused (a refusal would tell that such a value exists)",
                    n.column
                ),
            ));
        }
        if !n.bins.is_empty() || !n.quantiles.is_empty() {
            return Err(bad(
                "privacy",
                format!(
                    "numeric column `{}`: histograms and quantiles are not released under differential privacy yet; counts, sums and means are",
                    n.column
                ),
            ));
        }
    }
    Ok(())
}

fn bound_of<'a>(bounds: &'a [ColumnBound], column: &str) -> Result<&'a ColumnBound> {
    bounds.iter().find(|b| b.column == column).ok_or_else(|| {
        bad(
            "privacy.bounds",
            format!("column `{column}` is used by the released sums and needs declared bounds"),
        )
    })
}

/// The range of `x^power` for `x` in `[lo, hi]`.
fn power_interval(lo: f64, hi: f64, power: u8) -> (f64, f64) {
    let k = i32::from(power);
    let (a, b) = (lo.powi(k), hi.powi(k));
    if k % 2 == 0 && lo < 0.0 && hi > 0.0 {
        (0.0, a.max(b))
    } else {
        (a.min(b), a.max(b))
    }
}

/// The range of one design column (the product of its factors) given the declared bounds;
/// indicators range over [0, 1], the constant is [1, 1].
pub fn column_interval(column: &DesignColumn, bounds: &[ColumnBound]) -> Result<(f64, f64)> {
    let mut acc = (1.0_f64, 1.0_f64);
    for f in &column.factors {
        let (lo, hi) = match f {
            Factor::Numeric { column, power } => {
                let b = bound_of(bounds, column)?;
                power_interval(b.lower, b.upper, *power)
            }
            Factor::Level { .. } | Factor::Office { .. } => (0.0, 1.0),
        };
        let c = [acc.0 * lo, acc.0 * hi, acc.1 * lo, acc.1 * hi];
        acc = (
            c.iter().copied().fold(f64::INFINITY, f64::min),
            c.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        );
    }
    Ok(acc)
}

/// The ranges of every design column, in design order.
pub fn design_intervals(plan: &DesignPlan, bounds: &[ColumnBound]) -> Result<Vec<(f64, f64)>> {
    plan.columns.iter().map(|c| column_interval(c, bounds)).collect()
}

/// The range of the response as the design sees it (its logarithm for `log(y)`).
pub fn response_interval(plan: &DesignPlan, bounds: &[ColumnBound]) -> Result<(f64, f64)> {
    match &plan.response {
        Response::Value { column, log } => {
            let b = bound_of(bounds, column)?;
            if *log {
                if b.lower <= 0.0 {
                    return Err(bad(
                        "privacy.bounds",
                        format!("column `{column}` is logged: its lower bound must be above 0"),
                    ));
                }
                Ok((b.lower.ln(), b.upper.ln()))
            } else {
                Ok((b.lower, b.upper))
            }
        }
        Response::Above { .. } | Response::Level { .. } => Ok((0.0, 1.0)),
    }
}

/// The public standardisation of a DP FedAvg experiment: each non-constant design column is
/// mapped from its declared range onto [−1, 1] (mean = midpoint, sd = half-width). It depends
/// on the spec alone, so nothing about the data is released for it.
pub fn bounds_standardization(spec: &ExperimentSpec) -> Result<Standardization> {
    let p = spec
        .privacy
        .as_ref()
        .ok_or_else(|| Error::Model("no [privacy] table".to_owned()))?;
    let plan = spec.design().map_err(crate::data::design_error)?;
    let intervals = design_intervals(&plan, &p.bounds)?;
    let (mut mean, mut sd) = (Vec::new(), Vec::new());
    for (lo, hi) in intervals.into_iter().skip(1) {
        mean.push(0.5 * (lo + hi));
        let half = 0.5 * (hi - lo);
        sd.push(if half > 0.0 { half } else { 1.0 });
    }
    Ok(Standardization { mean, sd })
}

/// A generator for noise, seeded from the operating system (see the module's note).
pub fn os_rng() -> ChaCha20Rng {
    ChaCha20Rng::from_entropy()
}

/// One draw of N(0, 1) (Box–Muller; `1 − u` keeps the logarithm finite).
pub fn standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Add N(0, sd²) to every entry.
pub fn add_gaussian<R: Rng + ?Sized>(values: &mut [f64], sd: f64, rng: &mut R) {
    for v in values {
        *v += sd * standard_normal(rng);
    }
}

/// Scale `v` down to L2 norm at most `c` (unchanged if already within).
pub fn clip_l2(v: &mut [f64], c: f64) {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > c {
        let s = c / norm;
        v.iter_mut().for_each(|x| *x *= s);
    }
}

/// Node-level DP of a FedAvg update (`[privacy.node_level]`): the node's change of the model
/// is clipped to `clip_norm` and N(0, (σ·C/√t)²) is added per coordinate; returns the noisy
/// local model `global + clip(local − global) + noise`.
///
/// Why √t: with secure aggregation the coordinator sees only the sum over the k ≥ t nodes of a
/// round (fewer cannot be unmasked). One office changes that sum by at most C (its clipped
/// change), and the sum carries k independent noises of variance σ²C²/t, in all at least σ²C²:
/// the Gaussian mechanism with noise multiplier σ on the office's whole contribution.
/// Caveats: offices that drop out after the threshold leave k ≥ t, so the noise never falls
/// below the calibration; but c colluding offices who know their own noise can subtract it,
/// leaving (k − c)/t of the variance, so the guarantee holds against colluders only for
/// k − c ≥ t. The coordinator divides the sum by the number of answers (public weight 1 each),
/// which is post-processing.
pub fn node_level_release<R: Rng + ?Sized>(
    local: &[f64],
    global: &[f64],
    clip_norm: f64,
    noise_multiplier: f64,
    threshold: u32,
    rng: &mut R,
) -> Result<Vec<f64>> {
    if local.len() != global.len() {
        return Err(Error::Model(
            "local and global models differ in length".to_owned(),
        ));
    }
    let t = f64::from(threshold.max(1));
    let mut delta: Vec<f64> = local.iter().zip(global).map(|(l, g)| l - g).collect();
    clip_l2(&mut delta, clip_norm);
    add_gaussian(&mut delta, noise_multiplier * clip_norm / t.sqrt(), rng);
    Ok(global.iter().zip(&delta).map(|(g, d)| g + d).collect())
}

/// The L2 sensitivity of the released vector of [`gaussian_ols_sums`] for `p` design columns,
/// after every design column and the response are scaled into [−1, 1].
///
/// One row (x, y) with |x_a| ≤ 1, |y| ≤ 1 (x_0 = 1, the constant) contributes the entries
/// x_a·x_b (a ≤ b: p(p+1)/2 of them, x_0·x_0 = 1 being the row count), x_a·y (p, x_0·y being
/// Σy) and y² (yᵀy), each at most 1 in absolute value. Adding or removing that row changes the
/// vector by its contribution, of squared norm at most p(p+1)/2 + p + 1.
pub fn ols_sensitivity(p: usize) -> f64 {
    ((p * (p + 1) / 2 + p + 1) as f64).sqrt()
}

/// The noise of the exact linear model's sums: every one of the p(p+1)/2 + p + 1 released
/// values may change with one row.
pub fn ols_noise(noise_multiplier: f64, p: usize) -> Result<discrete::GridNoise> {
    discrete::GridNoise::new(noise_multiplier, ols_sensitivity(p), p * (p + 1) / 2 + p + 1)
}

/// The public change of basis of an exact linear model under the Gaussian mechanism: every
/// design column is computed in a transformed form whose values lie in [−1, 1], and `t` maps
/// a transformed row back to the design's row (`raw_j = Σ_i transformed_i · t[i][j]`).
///
/// A numeric column x with range [lo, hi] becomes u = (x − m)/h (m the midpoint, h the
/// half-width). Its power x^k, when the design also has x, x², …, x^(k−1) as columns of their
/// own, becomes u^k, and x^k = Σ_i C(k, i) h^i m^(k−i) u^i maps back through those columns:
/// a polynomial in u keeps the information on the higher power that noise would drown if x^k
/// were only rescaled (x and x² are nearly collinear on [0, 65]). Any other column is
/// centred and scaled onto [−1, 1] by its own range. The response likewise: y = m_y + h_y·ỹ.
#[derive(Debug, Clone, PartialEq)]
pub struct OlsBasis {
    /// Per design column: how its transformed value is made.
    pub columns: Vec<BasisColumn>,
    /// p × p, row-major.
    pub t: Vec<f64>,
    /// The response's midpoint and half-width.
    pub y_mid: f64,
    pub y_half: f64,
}

/// How one transformed design column is computed from the clipped design row.
#[derive(Debug, Clone, PartialEq)]
pub enum BasisColumn {
    /// The constant 1.
    Constant,
    /// ((x_j clipped to [lo, hi]) − mid) / half.
    Affine { lo: f64, hi: f64, mid: f64, half: f64 },
    /// u^power, u = ((x_base clipped to [lo, hi]) − mid) / half, x_base the design column
    /// `base` (the power-1 column of the same variable).
    Power {
        base: usize,
        power: u8,
        lo: f64,
        hi: f64,
        mid: f64,
        half: f64,
    },
}

fn binomial(n: u8, k: u8) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * f64::from(n - i) / f64::from(i + 1))
}

impl OlsBasis {
    /// The basis of an experiment with an intercept, numeric bounds on every column used.
    pub fn new(spec: &ExperimentSpec) -> Result<Self> {
        let privacy = spec
            .privacy
            .as_ref()
            .ok_or_else(|| Error::Model("no [privacy] table".to_owned()))?;
        let plan = spec.design().map_err(crate::data::design_error)?;
        if !plan.intercept {
            return Err(bad(
                "privacy",
                "the Gaussian mechanism on sums needs a model with an intercept",
            ));
        }
        let p = plan.columns.len();
        let intervals = design_intervals(&plan, &privacy.bounds)?;
        // The single-factor numeric columns: (variable, power) -> design index.
        let single = |col: &DesignColumn| match col.factors.as_slice() {
            [Factor::Numeric { column, power }] => Some((column.clone(), *power)),
            _ => None,
        };
        let index_of = |var: &str, k: u8| {
            plan.columns
                .iter()
                .position(|c| single(c).is_some_and(|(v, pk)| v == var && pk == k))
        };
        let mut columns = Vec::with_capacity(p);
        let mut t = vec![0.0; p * p];
        for (j, col) in plan.columns.iter().enumerate() {
            let (lo, hi) = intervals[j];
            if col.factors.is_empty() {
                columns.push(BasisColumn::Constant);
                t[j * p + j] = 1.0;
                continue;
            }
            let poly = single(col).and_then(|(var, k)| {
                let lower: Option<Vec<usize>> = (1..k).map(|i| index_of(&var, i)).collect();
                let base = index_of(&var, 1)?;
                Some((var, k, base, lower?))
            });
            match poly {
                Some((var, k, base, lower)) if k >= 2 => {
                    let b = bound_of(&privacy.bounds, &var)?;
                    let (mid, half) = (0.5 * (b.lower + b.upper), 0.5 * (b.upper - b.lower));
                    columns.push(BasisColumn::Power {
                        base,
                        power: k,
                        lo: b.lower,
                        hi: b.upper,
                        mid,
                        half,
                    });
                    // x^k = Σ_i C(k, i) h^i m^(k−i) u^i; u^0 is the constant, u^i the
                    // transformed column of x^i.
                    t[j] = mid.powi(i32::from(k));
                    for i in 1..=k {
                        let from = if i == k { j } else { lower[usize::from(i) - 1] };
                        t[from * p + j] =
                            binomial(k, i) * half.powi(i32::from(i)) * mid.powi(i32::from(k - i));
                    }
                }
                _ => {
                    let (mid, half) = (0.5 * (lo + hi), 0.5 * (hi - lo));
                    let half = if half > 0.0 { half } else { 1.0 };
                    columns.push(BasisColumn::Affine { lo, hi, mid, half });
                    t[j] = mid;
                    t[j * p + j] = half;
                }
            }
        }
        let (ylo, yhi) = response_interval(&plan, &privacy.bounds)?;
        Ok(OlsBasis {
            columns,
            t,
            y_mid: 0.5 * (ylo + yhi),
            y_half: 0.5 * (yhi - ylo),
        })
    }

    /// The transformed row of a design row (clipping every value into its range).
    fn transform(&self, raw: &[f64], out: &mut [f64]) {
        for (j, c) in self.columns.iter().enumerate() {
            out[j] = match *c {
                BasisColumn::Constant => 1.0,
                BasisColumn::Affine { lo, hi, mid, half } => (raw[j].clamp(lo, hi) - mid) / half,
                BasisColumn::Power {
                    base,
                    power,
                    lo,
                    hi,
                    mid,
                    half,
                } => ((raw[base].clamp(lo, hi) - mid) / half).powi(i32::from(power)),
            };
        }
    }

    /// `Tᵀ A T` of a symmetric p × p matrix `a` (row-major).
    fn back(&self, a: &[f64]) -> Vec<f64> {
        let p = self.columns.len();
        let mut at = vec![0.0; p * p];
        for i in 0..p {
            for j in 0..p {
                at[i * p + j] = (0..p).map(|k| a[i * p + k] * self.t[k * p + j]).sum();
            }
        }
        let mut out = vec![0.0; p * p];
        for i in 0..p {
            for j in 0..p {
                out[i * p + j] = (0..p).map(|k| self.t[k * p + i] * at[k * p + j]).sum();
            }
        }
        out
    }
}

/// A node's answer to an exact linear model under the Gaussian mechanism.
///
/// Every row is clipped into the declared ranges and moved into the public basis of
/// [`OlsBasis`] (all values in [−1, 1]); the sums at β = 0 are taken there (X̃ᵀX̃, X̃ᵀỹ and
/// ỹᵀỹ; the row count n and Σỹ are their constant's entries), noise of standard deviation σΔ
/// is added to each (a discrete Gaussian on a fine grid, [`discrete`], so no floating-point
/// side channel)
/// entry with Δ from [`ols_sensitivity`], and the noisy
/// sums are mapped back to the design's units: XᵀX = Tᵀ X̃ᵀX̃ T, Xᵀy = Tᵀ(h_y X̃ᵀỹ + m_y X̃ᵀ1)
/// (X̃ᵀ1 is the constant's column of X̃ᵀX̃), yᵀy = h_y² ỹᵀỹ + 2 h_y m_y Σỹ + m_y² n,
/// Σy = h_y Σỹ + m_y n. The rest of the answer is derived from these (post-processing):
/// Pearson χ² and the null deviance at 0 equal yᵀy, the row count is the noisy n rounded (at
/// least 0), Σw = n, Σwy = Σy. Diagonals and yᵀy are floored at 0.
pub fn gaussian_ols_sums(
    spec: &ExperimentSpec,
    data: &LocalData,
    rng: &mut discrete::NoiseRng,
) -> Result<StepSums> {
    let privacy: &PrivacySpec = spec
        .privacy
        .as_ref()
        .ok_or_else(|| Error::Model("no [privacy] table".to_owned()))?;
    let basis = OlsBasis::new(spec)?;
    let p = basis.columns.len();
    let d = &data.train;
    if d.x.ncols() != p {
        return Err(Error::Model(
            "the design does not match the declared columns".to_owned(),
        ));
    }
    let (ylo, yhi) = (basis.y_mid - basis.y_half, basis.y_mid + basis.y_half);
    let yh = if basis.y_half > 0.0 { basis.y_half } else { 1.0 };
    let mut g = vec![0.0; p * p];
    let mut b = vec![0.0; p];
    let mut yty = 0.0;
    let mut row = vec![0.0; p];
    for (raw, y) in d.x.rows().into_iter().zip(&d.y) {
        let raw: Vec<f64> = raw.to_vec();
        basis.transform(&raw, &mut row);
        let yt = (y.clamp(ylo, yhi) - basis.y_mid) / yh;
        for a in 0..p {
            for c in a..p {
                g[a * p + c] += row[a] * row[c];
            }
            b[a] += row[a] * yt;
        }
        yty += yt * yt;
    }
    let noise = ols_noise(privacy.noise_multiplier, p)?;
    for a in 0..p {
        for c in a..p {
            g[a * p + c] = noise.add(g[a * p + c], rng)?;
            g[c * p + a] = g[a * p + c];
        }
    }
    for v in b.iter_mut() {
        *v = noise.add(*v, rng)?;
    }
    let yty = noise.add(yty, rng)?;
    // The constant's entries: the row count and Σỹ (validation requires an intercept).
    let (n, sy) = (g[0], b[0]);

    // Back to the design's units: post-processing of the noisy sums.
    let full = basis.back(&g);
    let xty: Vec<f64> = (0..p)
        .map(|j| {
            (0..p)
                .map(|k| basis.t[k * p + j] * (yh * b[k] + basis.y_mid * g[k * p]))
                .sum()
        })
        .collect();
    let mut xtwx = Vec::with_capacity(p * (p + 1) / 2);
    for a in 0..p {
        for c in a..p {
            let v = full[a * p + c];
            xtwx.push(if a == c { v.max(0.0) } else { v });
        }
    }
    let rows = n.round().max(0.0);
    let yty = (yh * yh * yty + 2.0 * yh * basis.y_mid * sy + basis.y_mid * basis.y_mid * n).max(0.0);
    let sum_y = yh * sy + basis.y_mid * n;
    Ok(StepSums {
        p,
        xtwx,
        xtwz: xty,
        scalars: glm::Scalars {
            deviance: yty,
            pearson: yty,
            null_weight: n.max(0.0),
            null_weighted_z: sum_y,
            null_deviance: yty,
            rows,
            sum_w: n.max(0.0),
            sum_wy: sum_y,
            ..glm::Scalars::default()
        },
    })
}

/// The covariance the Gaussian mechanism's noise adds to the coefficients of an exact linear
/// model fitted on pooled noisy sums (`sums`, solved at `beta`), from `nodes` offices' noise:
/// the delta method, exact for the linearised estimator.
///
/// The noise is public in distribution: each office added noise of variance (σΔ)² (slightly
/// more: [`ols_noise`]) to every entry e of its
/// sums in the basis of [`OlsBasis`] (X̃ᵀX̃'s upper triangle and X̃ᵀỹ), so the pooled noise has
/// variance s² = (σΔ)²·nodes per entry, independently. The nodes' map back to the design's
/// units is linear in e, and β = A⁻¹b (A = XᵀX, b = Xᵀy) moves by dβ = A⁻¹(db − dA·β). So
/// Cov(dβ) = s² A⁻¹ (Σₑ vₑ vₑᵀ) A⁻¹ with vₑ = ∂(db − dA·β)/∂e, evaluated at the released sums.
/// (A second-moment bootstrap is no alternative: A⁻¹ of a noisy A has heavy tails.)
pub fn ols_noise_covariance(
    spec: &ExperimentSpec,
    sums: &StepSums,
    beta: &[f64],
    nodes: usize,
    names: &[String],
) -> Result<Vec<f64>> {
    let privacy = spec
        .privacy
        .as_ref()
        .ok_or_else(|| Error::Model("no [privacy] table".to_owned()))?;
    let basis = OlsBasis::new(spec)?;
    let p = basis.columns.len();
    if sums.p != p || beta.len() != p {
        return Err(Error::Model(
            "the sums do not match the declared columns".to_owned(),
        ));
    }
    let var = ols_noise(privacy.noise_multiplier, p)?.sd().powi(2) * nodes.max(1) as f64;
    let yh = if basis.y_half > 0.0 { basis.y_half } else { 1.0 };
    let t = |row: usize, col: usize| basis.t[row * p + col];
    // (T·β)_a: row a of the transformed design times β, in design units.
    let tb: Vec<f64> = (0..p).map(|a| (0..p).map(|j| t(a, j) * beta[j]).sum()).collect();
    let mut meat = vec![0.0; p * p];
    let mut add = |v: &[f64]| {
        for i in 0..p {
            for j in 0..p {
                meat[i * p + j] += v[i] * v[j];
            }
        }
    };
    let mut v = vec![0.0; p];
    // Noise on X̃ᵀX̃[a][c] (a ≤ c; the matrix is symmetric): dA = Tᵀ(E_ac + E_ca)T, and the
    // constant's column (a = 0) also enters Xᵀy as m_y·X̃ᵀ1.
    for a in 0..p {
        for c in a..p {
            for (j, vj) in v.iter_mut().enumerate() {
                let da_beta = if a == c {
                    t(a, j) * tb[a]
                } else {
                    t(a, j) * tb[c] + t(c, j) * tb[a]
                };
                let db = if a == 0 { basis.y_mid * t(c, j) } else { 0.0 };
                *vj = db - da_beta;
            }
            add(&v);
        }
    }
    // Noise on X̃ᵀỹ[k]: db = h_y·Tᵀe_k.
    for k in 0..p {
        for (j, vj) in v.iter_mut().enumerate() {
            *vj = yh * t(k, j);
        }
        add(&v);
    }
    let inverse = crate::linalg::inverse_spd(&sums.xtwx_full(), p, names)?;
    let mut left = vec![0.0; p * p];
    for i in 0..p {
        for j in 0..p {
            left[i * p + j] = (0..p).map(|k| inverse[i * p + k] * meat[k * p + j]).sum();
        }
    }
    let mut cov = vec![0.0; p * p];
    for i in 0..p {
        for j in 0..p {
            cov[i * p + j] = var * (0..p).map(|k| left[i * p + k] * inverse[k * p + j]).sum::<f64>();
        }
    }
    Ok(cov)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::glm::Family;
    use rand_chacha::ChaCha8Rng;

    fn dp(s: &mut ExperimentSpec) -> &mut PrivacySpec {
        s.privacy.as_mut().expect("a [privacy] table")
    }

    fn spec(text: &str) -> ExperimentSpec {
        toml::from_str(text).expect("spec")
    }

    const LOGIT: &str = r#"
name = "dp"
dataset = "cps"
model = "logistic"
[schema]
target = { column = "wage", threshold = 500.0 }
numeric = [{ column = "education" }, { column = "experience", squared = true }]
categorical = [{ column = "smsa", levels = ["no", "yes"], reference = "no" }]
[privacy]
noise_multiplier = 1.0
clip_norm = 1.0
sampling_rate = 0.05
bounds = [
  { column = "education", lower = 0, upper = 20 },
  { column = "experience", lower = -5, upper = 65 },
]
"#;

    #[test]
    fn a_valid_dp_sgd_spec_passes_and_each_rule_names_its_key() {
        let ok = spec(LOGIT);
        crate::spec::validate(&ok).expect("valid");
        type Edit = Box<dyn Fn(&mut ExperimentSpec)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "privacy.noise_multiplier",
                Box::new(|s| dp(s).noise_multiplier = 0.0),
            ),
            (
                "privacy.noise_multiplier",
                Box::new(|s| dp(s).noise_multiplier = f64::NAN),
            ),
            ("privacy.delta", Box::new(|s| dp(s).delta = 0.01)),
            ("privacy.delta", Box::new(|s| dp(s).delta = 0.0)),
            ("privacy.clip_norm", Box::new(|s| dp(s).clip_norm = None)),
            ("privacy.clip_norm", Box::new(|s| dp(s).clip_norm = Some(-1.0))),
            (
                "privacy.sampling_rate",
                Box::new(|s| dp(s).sampling_rate = Some(1.5)),
            ),
            ("privacy.sampling_rate", Box::new(|s| dp(s).sampling_rate = None)),
            (
                "privacy.bounds",
                Box::new(|s| {
                    dp(s).bounds.pop();
                }),
            ),
            ("privacy.bounds", Box::new(|s| dp(s).bounds[0].upper = -1.0)),
            (
                "privacy.bounds",
                Box::new(|s| dp(s).bounds[0].upper = f64::INFINITY),
            ),
            (
                "privacy.node_level",
                Box::new(|s| {
                    dp(s).node_level = Some(fedstat_proto::privacy::NodeLevelDp {
                        clip_norm: 1.0,
                        noise_multiplier: 1.0,
                    })
                }),
            ),
            ("privacy", Box::new(|s| s.model = ModelKind::Poisson)),
        ];
        for (key, edit) in cases {
            let mut s = ok.clone();
            edit(&mut s);
            let err = validate(&s).expect_err(key).to_string();
            assert!(err.contains(&format!("key `{key}`")), "{key}: {err}");
        }
        let mut with_secure = ok.clone();
        with_secure.secure_aggregation = true;
        dp(&mut with_secure).node_level = Some(fedstat_proto::privacy::NodeLevelDp {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
        });
        validate(&with_secure).expect("node-level with secure aggregation");
    }

    #[test]
    fn intervals_of_products_and_powers() {
        assert_eq!(power_interval(-5.0, 65.0, 2), (0.0, 4225.0));
        assert_eq!(power_interval(-2.0, 3.0, 3), (-8.0, 27.0));
        assert_eq!(power_interval(1.0, 3.0, 2), (1.0, 9.0));
        let bounds = vec![ColumnBound {
            column: "e".into(),
            lower: -5.0,
            upper: 10.0,
        }];
        let col = DesignColumn {
            name: "e:x".into(),
            factors: vec![
                Factor::Numeric {
                    column: "e".into(),
                    power: 1,
                },
                Factor::Level {
                    column: "x".into(),
                    level: "a".into(),
                },
            ],
        };
        assert_eq!(column_interval(&col, &bounds).expect("test value"), (-5.0, 10.0));
    }

    #[test]
    fn bounds_standardisation_maps_ranges_onto_minus_one_one() {
        let st = bounds_standardization(&spec(LOGIT)).expect("st");
        // education, experience, experience², smsayes
        assert_eq!(st.mean, vec![10.0, 30.0, 2112.5, 0.5]);
        assert_eq!(st.sd, vec![10.0, 35.0, 2112.5, 0.5]);
    }

    #[test]
    fn clipping_bounds_the_norm_and_noise_has_the_declared_sd() {
        let mut v = vec![3.0, 4.0];
        clip_l2(&mut v, 1.0);
        assert!((v[0] - 0.6).abs() < 1e-12 && (v[1] - 0.8).abs() < 1e-12);
        let mut w = vec![0.3, 0.4];
        clip_l2(&mut w, 1.0);
        assert_eq!(w, vec![0.3, 0.4]);

        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut x = vec![0.0; 200_000];
        add_gaussian(&mut x, 2.5, &mut rng);
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let sd = (x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((sd - 2.5).abs() < 0.02, "{sd}");
    }

    #[test]
    fn node_level_noise_of_t_nodes_adds_up_to_the_full_noise() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let global = vec![0.0; 4];
        let local = vec![10.0, 0.0, 0.0, 0.0];
        // The change is clipped to the bound.
        let out = node_level_release(&local, &global, 1.0, 1e-9, 3, &mut rng).expect("test value");
        assert!((out[0] - 1.0).abs() < 1e-6);
        // The sum of t = 4 releases carries noise of sd σC.
        let (sigma, c, t) = (2.0, 0.5, 4u32);
        let mut sums = Vec::new();
        for _ in 0..20_000 {
            let mut s = 0.0;
            for _ in 0..t {
                s += node_level_release(&[0.0], &[0.0], c, sigma, t, &mut rng).expect("test value")[0];
            }
            sums.push(s);
        }
        let n = sums.len() as f64;
        let sd = (sums.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
        assert!((sd - sigma * c).abs() < 0.02, "{sd}");
    }

    /// With (almost) no noise, the sums made in the public basis and mapped back equal the
    /// exact sums of the design (every row inside the bounds).
    /// A seeded generator of the discrete noise.
    fn noise_rng(seed: u64) -> discrete::NoiseRng {
        <discrete::NoiseRng as rand_010::SeedableRng>::seed_from_u64(seed)
    }

    /// log(wage) on the CPS design at the west office under the Gaussian mechanism with
    /// noise multiplier `sigma`, and that office's data.
    fn ols_fixture(sigma: f64) -> (ExperimentSpec, LocalData) {
        let mut s = spec(LOGIT);
        s.model = ModelKind::Linear;
        s.method = Method::Exact;
        let schema = s.schema.as_mut().expect("test value");
        schema.target = Some(crate::spec::TargetSpec {
            column: "wage".into(),
            log: true,
            threshold: None,
            positive_level: None,
        });
        let p = dp(&mut s);
        p.clip_norm = None;
        p.sampling_rate = None;
        p.noise_multiplier = sigma;
        p.bounds.push(ColumnBound {
            column: "wage".into(),
            lower: 1.0,
            upper: 1e5,
        });
        validate(&s).expect("valid");
        let plan = s.design().expect("test value");
        let path = crate::data::tests::data_dir().join("cps1988/west.csv");
        let data = crate::data::load_design(&path, &plan, None, crate::data::LoadLimits::UNLIMITED)
            .expect("test value");
        (s, data)
    }

    #[test]
    fn gaussian_ols_sums_map_back_to_the_exact_sums() {
        let (s, data) = ols_fixture(1e-12);
        let plan = s.design().expect("test value");
        let zeros = vec![0.0; plan.columns.len()];
        let (exact, _) = glm::step_sums(
            Family::Gaussian,
            &data.train,
            glm::At::Coefficients {
                beta: &zeros,
                null: 0.0,
            },
            true,
        )
        .expect("test value");
        let noisy = gaussian_ols_sums(&s, &data, &mut noise_rng(1)).expect("test value");
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * (1.0 + b.abs());
        for (a, b) in noisy
            .xtwx
            .iter()
            .zip(&exact.xtwx)
            .chain(noisy.xtwz.iter().zip(&exact.xtwz))
        {
            assert!(close(*a, *b), "{a} vs {b}");
        }
        let (a, b) = (noisy.scalars, exact.scalars);
        for (x, y) in [
            (a.deviance, b.deviance),
            (a.rows, b.rows),
            (a.null_weighted_z, b.null_weighted_z),
        ] {
            assert!(close(x, y), "{x} vs {y}");
        }
    }

    /// The noise covariance against the spread of coefficients over 400 repeated releases of
    /// the same office's sums (a robust spread: the normalised interquartile range, as A⁻¹ of
    /// a noisy A has heavy tails).
    #[test]
    fn the_noise_covariance_is_the_spread_of_repeated_releases() {
        let (s, data) = ols_fixture(4.2);
        let names = s.design().expect("test value").names();
        let p = names.len();
        let fit = |seed: u64| {
            let sums = gaussian_ols_sums(&s, &data, &mut noise_rng(seed)).expect("test value");
            let beta = glm::irls_step(&sums, &names).expect("positive definite");
            (sums, beta)
        };
        let runs: Vec<Vec<f64>> = (100..500).map(|seed| fit(seed).1).collect();
        let spread = |j: usize| {
            let mut v: Vec<f64> = runs.iter().map(|b| b[j]).collect();
            v.sort_by(f64::total_cmp);
            let q = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
            (q(0.75) - q(0.25)) / 1.349
        };
        // The figure is computed at the release's own noisy XᵀX, so it varies from release to
        // release (at one office with σ = 4.2, from 0.7 to 2.2 times the spread for the weakest
        // column); its median over releases is the spread.
        let mut ratios = vec![Vec::new(); p];
        for release in 1..22 {
            let (sums, beta) = fit(release);
            let cov = ols_noise_covariance(&s, &sums, &beta, 1, &names).expect("test value");
            for (j, r) in ratios.iter_mut().enumerate() {
                r.push(cov[j * p + j].sqrt() / spread(j));
            }
            // More offices, more noise in the pool: variance in proportion.
            let four = ols_noise_covariance(&s, &sums, &beta, 4, &names).expect("test value");
            assert!((four[0] / cov[0] - 4.0).abs() < 1e-9);
        }
        for (name, mut r) in names.iter().zip(ratios) {
            r.sort_by(f64::total_cmp);
            let median = r[r.len() / 2];
            assert!(
                (0.85..1.2).contains(&median),
                "{name}: median ratio {median:.2} ({r:.2?})"
            );
        }
    }

    /// The sensitivity bound, checked by removing one row: the change of the scaled sums never
    /// exceeds Δ, and an extreme row comes close to it.
    #[test]
    fn ols_sensitivity_covers_removing_any_row() {
        let p = 3;
        let rows: Vec<(Vec<f64>, f64)> = vec![
            (vec![1.0, 0.5, -0.2], 0.3),
            (vec![1.0, -1.0, 1.0], -1.0),
            (vec![1.0, 1.0, 1.0], 1.0),
            (vec![1.0, 0.0, 0.1], 0.9),
        ];
        let contribution = |x: &[f64], y: f64| -> Vec<f64> {
            let mut v = Vec::new();
            for a in 0..p {
                for b in a..p {
                    v.push(x[a] * x[b]);
                }
            }
            v.extend(x.iter().map(|xa| xa * y));
            v.push(y * y);
            v
        };
        let total = |skip: Option<usize>| -> Vec<f64> {
            let mut s = vec![0.0; p * (p + 1) / 2 + p + 1];
            for (i, (x, y)) in rows.iter().enumerate() {
                if Some(i) != skip {
                    for (t, c) in s.iter_mut().zip(contribution(x, *y)) {
                        *t += c;
                    }
                }
            }
            s
        };
        let all = total(None);
        let delta = ols_sensitivity(p);
        let mut largest: f64 = 0.0;
        for i in 0..rows.len() {
            let d: f64 = all
                .iter()
                .zip(total(Some(i)))
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(d <= delta + 1e-12, "row {i}: {d} > {delta}");
            largest = largest.max(d);
        }
        assert!(
            (largest - delta).abs() < 1e-12,
            "the all-ones row attains the bound"
        );
    }
}

#[cfg(test)]
mod measured;

pub mod discrete;
