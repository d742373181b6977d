//! What an experiment produces besides its parameter vector: the inference of an exact GLM
//! ([`GlmSummary`]) or a pooled table ([`crate::table::TableOutput`]). Computed by the
//! coordinator from pooled sums only, stored with the experiment and sent with its results.

use serde::{Deserialize, Serialize};

use crate::table::TableOutput;

/// The final output of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Output {
    Glm(Box<GlmSummary>),
    Table(Box<TableOutput>),
}

/// Which statistic tests a coefficient: `z` when the dispersion is known (binomial, Poisson),
/// `t` with `df_residual` degrees of freedom when it is estimated (Gaussian, Gamma).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TestStatistic {
    Z,
    T,
}

/// An exact GLM fit, as R's `summary(glm)` reports it. Every vector is in coefficient order
/// (the experiment's design columns) and in the original, unstandardised units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlmSummary {
    /// `gaussian`, `binomial`, `poisson` or `Gamma` (R's names).
    pub family: String,
    /// `identity`, `logit` or `log`.
    pub link: String,
    pub coefficients: Vec<f64>,
    pub std_errors: Vec<f64>,
    pub statistic: TestStatistic,
    /// `z` or `t` values: coefficient / standard error.
    pub statistics: Vec<f64>,
    /// Two-sided p-values of the `statistics`.
    pub p_values: Vec<f64>,
    /// 95% Wald intervals: coefficient ± q × standard error, q the 0.975 quantile of the
    /// normal or of t(`df_residual`).
    pub ci95: Vec<[f64; 2]>,
    /// The covariance matrix of the coefficients, row-major `p × p` (dispersion × (XᵀWX)⁻¹).
    pub covariance: Vec<f64>,
    pub deviance: f64,
    pub null_deviance: f64,
    /// Akaike's criterion as R computes it (`NaN` never: `None` when undefined).
    pub aic: Option<f64>,
    /// 1 for binomial and Poisson; Pearson χ² / `df_residual` for Gaussian and Gamma.
    pub dispersion: f64,
    /// Rows with positive weight, less the number of coefficients.
    pub df_residual: u64,
    /// Rows with positive weight, less one (the intercept-only model).
    pub df_null: u64,
    /// Rows used (positive weight).
    pub rows: u64,
    /// Newton/IRLS iterations: rounds whose step moved the coefficients.
    pub iterations: u32,
    pub converged: bool,
    /// What an analyst must know (not converged, fitted probabilities of 0 or 1, ...).
    pub warnings: Vec<String>,
}
