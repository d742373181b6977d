//! Exact generalised linear models: the families, what a node sums over its rows for one
//! Newton/IRLS step, and the inference the coordinator draws from the pooled sums.
//!
//! Fisher scoring (IRLS) needs only sums over rows. At coefficients β each row has a linear
//! predictor η = xβ + offset, a mean μ = g⁻¹(η), a working weight W = w·(dμ/dη)²/V(μ) and a
//! working response z = η − offset + (y − μ)/(dμ/dη). The next coefficients solve
//! (XᵀWX) β' = XᵀWz, so the pooled step is exactly the step on the pooled rows. For the
//! canonical links (logit, Gaussian identity, Poisson log) this is Newton's method itself.
//!
//! Besides XᵀWX and XᵀWz a node sums the deviance, the Pearson χ², the row count and the
//! figures for the log-likelihood (AIC), and the same for the intercept-only model (the
//! null deviance) at its own coefficient. Conventions follow R's `glm` and `summary.glm`;
//! where R and statsmodels differ (the Gamma AIC) we follow R.

use fedstat_proto::output::{GlmSummary, TestStatistic};
use fedstat_proto::spec::ModelKind;
use ndarray::ArrayView2;
use statrs::distribution::{ContinuousCDF, Normal, StudentsT};

use crate::data::Design;
use crate::linalg::SpdFactor;
use crate::{Error, Result};

/// The relative deviance change below which the fit has converged (R's `glm.control`
/// criterion |D − D_old| / (|D| + 0.1), at the tolerance the issue asks for).
pub const TOLERANCE: f64 = 1e-10;

/// The error distribution and link of an exact fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Normal errors, identity link.
    Gaussian,
    /// Bernoulli (0/1) response, logit link.
    Binomial,
    /// Counts, log link.
    Poisson,
    /// Positive continuous response, log link.
    Gamma,
}

/// Smallest fitted mean: R's `.Machine$double.eps` guard of `binomial()` and `poisson()`.
const EPS: f64 = f64::EPSILON;

impl Family {
    /// The family of a model kind; `None` for kinds that are not GLMs.
    pub fn of(model: ModelKind) -> Option<Family> {
        match model {
            ModelKind::Linear => Some(Family::Gaussian),
            ModelKind::Logistic => Some(Family::Binomial),
            ModelKind::Poisson => Some(Family::Poisson),
            ModelKind::Gamma => Some(Family::Gamma),
            ModelKind::Table | ModelKind::Echo => None,
        }
    }

    /// R's name of the family.
    pub fn name(self) -> &'static str {
        match self {
            Family::Gaussian => "gaussian",
            Family::Binomial => "binomial",
            Family::Poisson => "poisson",
            Family::Gamma => "Gamma",
        }
    }

    pub fn link(self) -> &'static str {
        match self {
            Family::Gaussian => "identity",
            Family::Binomial => "logit",
            Family::Poisson | Family::Gamma => "log",
        }
    }

    /// Whether the dispersion is estimated (then coefficients are tested with t, not z).
    pub fn estimates_dispersion(self) -> bool {
        matches!(self, Family::Gaussian | Family::Gamma)
    }

    /// Whether the first step starts from the data (R's `mustart`) rather than from β = 0.
    /// The logit starts from β = 0, the textbook Newton start (and statsmodels' `Logit`);
    /// log links from β = 0 would overshoot by orders of magnitude on large counts.
    pub fn starts_from_data(self) -> bool {
        matches!(self, Family::Poisson | Family::Gamma)
    }

    /// The Gaussian identity model is linear in β: one step from anywhere is the solution.
    pub fn is_linear(self) -> bool {
        self == Family::Gaussian
    }

    /// R's starting mean for one row: `y + 0.1` for Poisson, `y` for Gamma.
    fn mustart(self, y: f64) -> f64 {
        match self {
            Family::Poisson => y + 0.1,
            Family::Gamma => y,
            Family::Gaussian | Family::Binomial => y,
        }
    }

    fn link_fn(self, mu: f64) -> f64 {
        match self {
            Family::Gaussian => mu,
            Family::Binomial => (mu / (1.0 - mu)).ln(),
            Family::Poisson | Family::Gamma => mu.ln(),
        }
    }

    /// μ and dμ/dη at η, with R's guards against fitted values of exactly 0 or 1.
    fn inverse_link(self, eta: f64) -> (f64, f64) {
        match self {
            Family::Gaussian => (eta, 1.0),
            Family::Binomial => {
                // R's `binomial()$linkinv`: probabilities kept inside [eps, 1 − eps].
                let mu = if eta < -30.0 {
                    EPS
                } else if eta > 30.0 {
                    1.0 - EPS
                } else {
                    1.0 / (1.0 + (-eta).exp())
                };
                (mu, (mu * (1.0 - mu)).max(EPS))
            }
            Family::Poisson | Family::Gamma => {
                let mu = eta.exp().max(EPS);
                (mu, mu)
            }
        }
    }

    fn variance(self, mu: f64) -> f64 {
        match self {
            Family::Gaussian => 1.0,
            Family::Binomial => mu * (1.0 - mu),
            Family::Poisson => mu,
            Family::Gamma => mu * mu,
        }
    }

    /// One row's deviance contribution, before its prior weight. Never negative: rounding at
    /// μ ≈ y (the first step from the data) is clamped to 0.
    fn unit_deviance(self, y: f64, mu: f64) -> f64 {
        // y·ln(y/μ), taken as 0 at y = 0.
        let ylog = |y: f64, mu: f64| if y > 0.0 { y * (y / mu).ln() } else { 0.0 };
        let d = match self {
            Family::Gaussian => (y - mu) * (y - mu),
            Family::Binomial => 2.0 * (ylog(y, mu) + ylog(1.0 - y, 1.0 - mu)),
            Family::Poisson => 2.0 * (ylog(y, mu) - (y - mu)),
            Family::Gamma => 2.0 * (-(y / mu).ln() + (y - mu) / mu),
        };
        d.max(0.0)
    }

    /// One row's log-likelihood where it needs no dispersion (binomial, Poisson); 0 otherwise.
    fn unit_loglik(self, y: f64, mu: f64) -> f64 {
        match self {
            Family::Binomial => {
                let a = if y > 0.0 { y * mu.ln() } else { 0.0 };
                let b = if y < 1.0 { (1.0 - y) * (1.0 - mu).ln() } else { 0.0 };
                a + b
            }
            Family::Poisson => {
                let a = if y > 0.0 { y * mu.ln() } else { 0.0 };
                a - mu - statrs::function::gamma::ln_gamma(y + 1.0)
            }
            Family::Gaussian | Family::Gamma => 0.0,
        }
    }

    /// The rule a response value must follow; `None` when it does.
    fn response_rule(self, y: f64) -> Option<&'static str> {
        match self {
            Family::Gaussian => None,
            Family::Binomial if (0.0..=1.0).contains(&y) => None,
            Family::Binomial => Some("a logistic response must lie between 0 and 1"),
            Family::Poisson if y >= 0.0 => None,
            Family::Poisson => Some("a Poisson response must not be negative"),
            Family::Gamma if y > 0.0 => None,
            Family::Gamma => Some("a Gamma response must be positive"),
        }
    }
}

/// Where a node evaluates its sums.
#[derive(Debug, Clone, Copy)]
pub enum At<'a> {
    /// The first step of a family that starts from the data: μ = R's `mustart(y)` for the
    /// model and for the intercept-only model alike.
    Data,
    /// Coefficients `beta` of the model, and `null`, the intercept-only model's intercept
    /// (ignored without an intercept: the null model is then the offset alone).
    Coefficients { beta: &'a [f64], null: f64 },
}

/// Scalar sums of one step, in answer order (see `algorithm::glm`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scalars {
    /// Σ w·d(y, μ): the deviance at the evaluated coefficients.
    pub deviance: f64,
    /// Σ w·(y − μ)²/V(μ).
    pub pearson: f64,
    /// Σ W and Σ W·z of the intercept-only model (its IRLS step).
    pub null_weight: f64,
    pub null_weighted_z: f64,
    /// Σ w·d(y, μ₀) of the intercept-only model.
    pub null_deviance: f64,
    /// Rows with a positive prior weight.
    pub rows: f64,
    /// Σ w and Σ w·y.
    pub sum_w: f64,
    pub sum_wy: f64,
    /// Σ w·ℓ(y, μ) where the log-likelihood needs no dispersion (binomial, Poisson).
    pub loglik: f64,
    /// Σ ln w over rows with w > 0 (the Gaussian AIC).
    pub sum_log_w: f64,
    /// Σ w·ln y, Σ w·ln μ and Σ w·y/μ (the Gamma AIC).
    pub sum_w_log_y: f64,
    pub sum_w_log_mu: f64,
    pub sum_w_y_over_mu: f64,
}

impl Scalars {
    pub const LEN: usize = 13;

    pub fn to_vec(self) -> [f64; Self::LEN] {
        [
            self.deviance,
            self.pearson,
            self.null_weight,
            self.null_weighted_z,
            self.null_deviance,
            self.rows,
            self.sum_w,
            self.sum_wy,
            self.loglik,
            self.sum_log_w,
            self.sum_w_log_y,
            self.sum_w_log_mu,
            self.sum_w_y_over_mu,
        ]
    }

    pub fn from_slice(v: &[f64; Self::LEN]) -> Self {
        Scalars {
            deviance: v[0],
            pearson: v[1],
            null_weight: v[2],
            null_weighted_z: v[3],
            null_deviance: v[4],
            rows: v[5],
            sum_w: v[6],
            sum_wy: v[7],
            loglik: v[8],
            sum_log_w: v[9],
            sum_w_log_y: v[10],
            sum_w_log_mu: v[11],
            sum_w_y_over_mu: v[12],
        }
    }
}

/// What a node sums over its rows for one step; pooled by adding.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSums {
    /// Number of coefficients.
    pub p: usize,
    /// XᵀWX, upper triangle row by row (`p(p+1)/2` entries).
    pub xtwx: Vec<f64>,
    /// XᵀWz.
    pub xtwz: Vec<f64>,
    pub scalars: Scalars,
}

/// What a node keeps to itself about its sums: the largest share one row holds of the
/// working weight, for the dominance rule (crafted coefficients that put the weight of a whole
/// office on one person would turn the sums into that person's record).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Concentration {
    pub max_weight_share: f64,
}

impl StepSums {
    pub fn zeros(p: usize) -> Self {
        StepSums {
            p,
            xtwx: vec![0.0; p * (p + 1) / 2],
            xtwz: vec![0.0; p],
            scalars: Scalars::default(),
        }
    }

    /// XᵀWX as a full row-major `p × p` matrix.
    pub fn xtwx_full(&self) -> Vec<f64> {
        let p = self.p;
        let mut full = vec![0.0; p * p];
        let mut k = 0;
        for i in 0..p {
            for j in i..p {
                full[i * p + j] = self.xtwx[k];
                full[j * p + i] = self.xtwx[k];
                k += 1;
            }
        }
        full
    }
}

/// A node's sums for one step on its rows `d` (raw, unstandardised design with `const` first
/// when the model has an intercept). Errors name the rule and never a value.
pub fn step_sums(
    family: Family,
    d: &Design,
    at: At<'_>,
    intercept: bool,
) -> Result<(StepSums, Concentration)> {
    let x: ArrayView2<f64> = d.x.view();
    let (n, p) = x.dim();
    if let At::Coefficients { beta, .. } = at {
        if beta.len() != p {
            return Err(Error::Model(format!(
                "the coefficients have {} values for {p} design columns",
                beta.len()
            )));
        }
    }
    let weight = |i: usize| d.weights.as_ref().map_or(1.0, |w| w[i]);
    let offset = |i: usize| d.offset.as_ref().map_or(0.0, |o| o[i]);
    let mut sums = StepSums::zeros(p);
    let mut s = Scalars::default();
    let mut max_w: f64 = 0.0;
    let mut total_w = 0.0;
    let mut wx = vec![0.0; p];
    for i in 0..n {
        let (y, w, o) = (d.y[i], weight(i), offset(i));
        if let Some(rule) = family.response_rule(y) {
            return Err(Error::Model(rule.to_owned()));
        }
        if w == 0.0 {
            continue;
        }
        let row = x.row(i);
        // The model's and the null model's η.
        let (eta, eta0) = match at {
            At::Data => {
                let e = family.link_fn(family.mustart(y));
                (e, e)
            }
            At::Coefficients { beta, null } => {
                let xb: f64 = row.iter().zip(beta).map(|(a, b)| a * b).sum();
                (xb + o, if intercept { null + o } else { o })
            }
        };
        let (mu, dmu) = family.inverse_link(eta);
        let var = family.variance(mu).max(EPS);
        let ww = w * dmu * dmu / var;
        // W·z computed as W(η − o) + w(y − μ)μ'/V: no division by a tiny μ'.
        let wz = ww * (eta - o) + w * (y - mu) * dmu / var;
        for a in 0..p {
            wx[a] = ww * row[a];
        }
        let mut k = 0;
        for a in 0..p {
            let wxa = wx[a];
            for b in a..p {
                sums.xtwx[k] += wxa * row[b];
                k += 1;
            }
            sums.xtwz[a] += wz * row[a];
        }
        max_w = max_w.max(ww);
        total_w += ww;

        let (mu0, dmu0) = family.inverse_link(eta0);
        let var0 = family.variance(mu0).max(EPS);
        let ww0 = w * dmu0 * dmu0 / var0;
        s.null_weight += ww0;
        s.null_weighted_z += ww0 * (eta0 - o) + w * (y - mu0) * dmu0 / var0;
        s.null_deviance += w * family.unit_deviance(y, mu0);

        s.deviance += w * family.unit_deviance(y, mu);
        s.pearson += w * (y - mu) * (y - mu) / var;
        s.rows += 1.0;
        s.sum_w += w;
        s.sum_wy += w * y;
        s.loglik += w * family.unit_loglik(y, mu);
        s.sum_log_w += w.ln();
        if family == Family::Gamma {
            s.sum_w_log_y += w * y.ln();
            s.sum_w_log_mu += w * mu.ln();
            s.sum_w_y_over_mu += w * y / mu;
        }
    }
    sums.scalars = s;
    let scalars = s.to_vec();
    if sums
        .xtwx
        .iter()
        .chain(&sums.xtwz)
        .chain(&scalars)
        .any(|v| !v.is_finite())
    {
        return Err(Error::Model(
            "the fitted values overflow at the coefficients sent (the fit diverges)".to_owned(),
        ));
    }
    let share = if total_w > 0.0 { max_w / total_w } else { 0.0 };
    Ok((
        sums,
        Concentration {
            max_weight_share: share,
        },
    ))
}

/// The pooled sums of the Gaussian model at β = 0 moved to the solution `beta`: the deviance
/// (residual sum of squares) and Pearson χ² become zᵀWz − βᵀXᵀWz, and the intercept-only
/// model's deviance its own minimum. Gaussian fits take one round; everything comes from it.
pub fn gaussian_at_solution(at_zero: &StepSums, beta: &[f64], intercept: bool) -> Scalars {
    let mut s = at_zero.scalars;
    let ztwz = s.deviance;
    let fitted: f64 = beta.iter().zip(&at_zero.xtwz).map(|(b, g)| b * g).sum();
    s.deviance = (ztwz - fitted).max(0.0);
    s.pearson = s.deviance;
    if intercept && s.null_weight > 0.0 {
        let alpha = s.null_weighted_z / s.null_weight;
        s.null_deviance = (ztwz - alpha * s.null_weighted_z).max(0.0);
    }
    s
}

/// The next coefficients: the solution of (XᵀWX) β = XᵀWz. A singular XᵀWX names the columns.
pub fn irls_step(sums: &StepSums, names: &[String]) -> Result<Vec<f64>> {
    let factor = SpdFactor::new(&sums.xtwx_full(), sums.p, names)?;
    factor.solve(&sums.xtwz)
}

/// The fit's figures that [`summarize`] needs besides the sums.
#[derive(Debug, Clone)]
pub struct FitState<'a> {
    pub family: Family,
    pub names: &'a [String],
    pub beta: &'a [f64],
    pub intercept: bool,
    pub iterations: u32,
    pub converged: bool,
    pub warnings: Vec<String>,
    /// Covariance the sampling model does not see, added to dispersion × (XᵀWX)⁻¹: the
    /// Gaussian mechanism's noise (`privacy::ols_noise_covariance`), row-major p × p.
    pub noise_covariance: Option<Vec<f64>>,
}

/// Inference as R's `summary.glm` reports it, from pooled sums evaluated at the final
/// coefficients (`scalars` already moved to the solution for the Gaussian model):
/// covariance = dispersion × (XᵀWX)⁻¹; z tests for binomial and Poisson, t tests on
/// `df_residual` degrees of freedom for Gaussian and Gamma; 95% Wald intervals with the same
/// reference distribution.
pub fn summarize(fit: FitState<'_>, sums: &StepSums, scalars: Scalars) -> Result<GlmSummary> {
    let p = sums.p;
    let family = fit.family;
    let factor = SpdFactor::new(&sums.xtwx_full(), p, fit.names)?;
    let unscaled = factor.inverse();
    let rows = scalars.rows.round().max(0.0) as u64;
    let df_residual = rows.saturating_sub(p as u64);
    let df_null = rows.saturating_sub(u64::from(fit.intercept));
    let dispersion = if family.estimates_dispersion() {
        if df_residual == 0 {
            return Err(Error::Model(
                "no residual degrees of freedom: as many coefficients as rows".to_owned(),
            ));
        }
        scalars.pearson / df_residual as f64
    } else {
        1.0
    };
    let covariance: Vec<f64> = match &fit.noise_covariance {
        Some(noise) if noise.len() == unscaled.len() => unscaled
            .iter()
            .zip(noise)
            .map(|(v, e)| v * dispersion + e)
            .collect(),
        Some(_) => {
            return Err(Error::Model(
                "internal: the noise covariance has the wrong size".to_owned(),
            ))
        }
        None => unscaled.iter().map(|v| v * dispersion).collect(),
    };
    let std_errors: Vec<f64> = (0..p).map(|j| covariance[j * p + j].max(0.0).sqrt()).collect();
    let statistics: Vec<f64> = fit
        .beta
        .iter()
        .zip(&std_errors)
        .map(|(b, se)| if *se > 0.0 { b / se } else { 0.0 })
        .collect();
    let (statistic, p_values, q) = if family.estimates_dispersion() {
        let t = StudentsT::new(0.0, 1.0, df_residual as f64)
            .map_err(|e| Error::Model(format!("internal: t distribution: {e}")))?;
        let p: Vec<f64> = statistics.iter().map(|s| 2.0 * t.cdf(-s.abs())).collect();
        (TestStatistic::T, p, t.inverse_cdf(0.975))
    } else {
        let z = Normal::standard();
        let p: Vec<f64> = statistics.iter().map(|s| 2.0 * z.cdf(-s.abs())).collect();
        (TestStatistic::Z, p, z.inverse_cdf(0.975))
    };
    let ci95 = fit
        .beta
        .iter()
        .zip(&std_errors)
        .map(|(b, se)| [b - q * se, b + q * se])
        .collect();
    let aic = aic(family, &scalars, p);
    let summary = GlmSummary {
        family: family.name().to_owned(),
        link: family.link().to_owned(),
        coefficients: fit.beta.to_vec(),
        std_errors,
        statistic,
        statistics,
        p_values,
        ci95,
        covariance,
        deviance: scalars.deviance,
        null_deviance: scalars.null_deviance,
        aic,
        dispersion,
        df_residual,
        df_null,
        rows,
        iterations: fit.iterations,
        converged: fit.converged,
        warnings: fit.warnings,
    };
    let finite = summary
        .coefficients
        .iter()
        .chain(&summary.std_errors)
        .chain(&summary.p_values)
        .chain(&summary.covariance)
        .chain([summary.deviance, summary.null_deviance, summary.dispersion].iter())
        .all(|v| v.is_finite());
    if !finite {
        return Err(Error::Model(
            "the fit's inference is not finite (a near-singular design or a diverging fit)".to_owned(),
        ));
    }
    Ok(summary)
}

/// Akaike's criterion as R's families compute it, plus 2 × (number of coefficients); the
/// Gaussian and Gamma count their dispersion as one more parameter, like R.
fn aic(family: Family, s: &Scalars, p: usize) -> Option<f64> {
    let k = 2.0 * p as f64;
    let value = match family {
        Family::Gaussian => {
            let n = s.rows;
            n * ((2.0 * std::f64::consts::PI * s.deviance / n).ln() + 1.0) + 2.0 - s.sum_log_w + k
        }
        Family::Binomial | Family::Poisson => -2.0 * s.loglik + k,
        Family::Gamma => {
            // R's Gamma()$aic: the dispersion estimated as deviance / Σw, then the Gamma
            // log-density with shape 1/φ and scale μφ summed with the prior weights.
            let phi = s.deviance / s.sum_w;
            let shape = 1.0 / phi;
            let loglik = -s.sum_w * statrs::function::gamma::ln_gamma(shape)
                - shape * (s.sum_w_log_mu + s.sum_w * phi.ln())
                + (shape - 1.0) * s.sum_w_log_y
                - shape * s.sum_w_y_over_mu;
            -2.0 * loglik + 2.0 + k
        }
    };
    value.is_finite().then_some(value)
}

/// The same fit on rows held in one place (the demo's and the tests' "central" fit): IRLS from
/// the same start with R's convergence rule, inference at the estimate.
pub fn fit_pooled(family: Family, d: &Design, names: &[String], max_iterations: u32) -> Result<GlmSummary> {
    let intercept = names.first().is_some_and(|n| n == "const");
    let p = names.len();
    let start = if family.starts_from_data() {
        At::Data
    } else {
        At::Coefficients {
            beta: &vec![0.0; p],
            null: 0.0,
        }
    };
    let (mut sums, _) = step_sums(family, d, start, intercept)?;
    if family.is_linear() {
        let beta = irls_step(&sums, names)?;
        let scalars = gaussian_at_solution(&sums, &beta, intercept);
        let fit = FitState {
            family,
            names,
            beta: &beta,
            intercept,
            iterations: 1,
            converged: true,
            warnings: Vec::new(),
            noise_covariance: None,
        };
        return summarize(fit, &sums, scalars);
    }
    // The intercept-only model starts at g(ȳ) (its estimate without an offset) and takes its
    // own IRLS steps alongside (needed with an offset).
    let mut null = if intercept && sums.scalars.sum_w > 0.0 {
        family.link_fn(sums.scalars.sum_wy / sums.scalars.sum_w)
    } else {
        0.0
    };
    let mut beta = irls_step(&sums, names)?;
    let mut previous = sums.scalars.deviance;
    let mut iterations = 1;
    loop {
        sums = step_sums(family, d, At::Coefficients { beta: &beta, null }, intercept)?.0;
        let converged_now = converged(previous, sums.scalars.deviance);
        if converged_now || iterations >= max_iterations {
            let fit = FitState {
                family,
                names,
                beta: &beta,
                intercept,
                iterations,
                converged: converged_now,
                warnings: Vec::new(),
                noise_covariance: None,
            };
            return summarize(fit, &sums, sums.scalars);
        }
        previous = sums.scalars.deviance;
        beta = irls_step(&sums, names)?;
        if intercept && sums.scalars.null_weight > 0.0 {
            null = sums.scalars.null_weighted_z / sums.scalars.null_weight;
        }
        iterations += 1;
    }
}

/// Whether the deviance moved by less than [`TOLERANCE`] relative (R's criterion).
pub fn converged(previous: f64, current: f64) -> bool {
    (current - previous).abs() / (current.abs() + 0.1) < TOLERANCE
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2};

    fn design(x: Vec<[f64; 2]>, y: Vec<f64>) -> Design {
        let n = y.len();
        Design {
            x: Array2::from_shape_vec((n, 2), x.into_iter().flatten().collect()).expect("shape"),
            y: Array1::from(y),
            weights: None,
            offset: None,
            ids: (0..n as u64).collect(),
        }
    }

    /// Sums are additive over rows: two halves pooled equal the whole, so a federation's
    /// step is the pooled step.
    #[test]
    fn sums_of_parts_are_the_sum_of_the_whole() {
        let xs: Vec<[f64; 2]> = (0..40).map(|i| [1.0, (i as f64 * 0.37).sin() * 3.0]).collect();
        let ys: Vec<f64> = (0..40).map(|i| ((i * 7) % 5) as f64).collect();
        let whole = design(xs.clone(), ys.clone());
        let a = design(xs[..15].to_vec(), ys[..15].to_vec());
        let b = design(xs[15..].to_vec(), ys[15..].to_vec());
        let at = At::Coefficients {
            beta: &[0.3, 0.1],
            null: 0.5,
        };
        for family in [Family::Gaussian, Family::Poisson] {
            let (w, _) = step_sums(family, &whole, at, true).expect("whole");
            let (sa, _) = step_sums(family, &a, at, true).expect("a");
            let (sb, _) = step_sums(family, &b, at, true).expect("b");
            for (k, v) in w.xtwx.iter().enumerate() {
                assert!((v - (sa.xtwx[k] + sb.xtwx[k])).abs() <= 1e-9 * v.abs().max(1.0));
            }
            let (sw, sa, sb) = (w.scalars.to_vec(), sa.scalars.to_vec(), sb.scalars.to_vec());
            for k in 0..Scalars::LEN {
                assert!(
                    (sw[k] - (sa[k] + sb[k])).abs() <= 1e-9 * sw[k].abs().max(1.0),
                    "scalar {k}"
                );
            }
        }
    }

    /// A Poisson fit by repeated steps reaches the score equations Xᵀ(y − μ) = 0.
    #[test]
    fn poisson_steps_reach_the_score_equations() {
        let xs: Vec<[f64; 2]> = (0..60).map(|i| [1.0, (i % 6) as f64]).collect();
        let ys: Vec<f64> = (0..60).map(|i| ((i % 6) + (i % 4)) as f64).collect();
        let d = design(xs, ys);
        let names = vec!["const".to_owned(), "x".to_owned()];
        let (mut sums, _) = step_sums(Family::Poisson, &d, At::Data, true).expect("start");
        let mut beta = vec![0.0; 2];
        for _ in 0..25 {
            beta = irls_step(&sums, &names).expect("step");
            sums = step_sums(
                Family::Poisson,
                &d,
                At::Coefficients {
                    beta: &beta,
                    null: 0.0,
                },
                true,
            )
            .expect("sums")
            .0;
        }
        let score: Vec<f64> = (0..2)
            .map(|j| {
                (0..60)
                    .map(|i| d.x[[i, j]] * (d.y[i] - (d.x[[i, 0]] * beta[0] + d.x[[i, 1]] * beta[1]).exp()))
                    .sum()
            })
            .collect();
        assert!(score.iter().all(|s| s.abs() < 1e-8), "{score:?}");
    }

    #[test]
    fn responses_outside_the_family_are_refused_by_rule() {
        let d = design(vec![[1.0, 0.0], [1.0, 1.0]], vec![1.0, -1.0]);
        let err = step_sums(Family::Poisson, &d, At::Data, true).expect_err("negative count");
        assert!(err.to_string().contains("must not be negative"), "{err}");
        assert!(!err.to_string().contains("-1"), "no value in {err}");
        let d = design(vec![[1.0, 0.0], [1.0, 1.0]], vec![1.0, 0.0]);
        assert!(step_sums(Family::Gamma, &d, At::Data, true).is_err());
    }

    #[test]
    fn aliased_columns_are_named() {
        // x is twice the constant.
        let d = design(vec![[1.0, 2.0]; 10], (0..10).map(f64::from).collect());
        let names = vec!["const".to_owned(), "x".to_owned()];
        let (sums, _) = step_sums(
            Family::Gaussian,
            &d,
            At::Coefficients {
                beta: &[0.0, 0.0],
                null: 0.0,
            },
            true,
        )
        .expect("sums");
        let err = irls_step(&sums, &names).expect_err("singular").to_string();
        assert!(err.contains("`x`") || err.contains("x"), "{err}");
    }
}
