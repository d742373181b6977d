//! The RDP accountant: Rényi differential privacy of the Poisson-subsampled Gaussian mechanism
//! (Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
//! Mechanism"), composed over steps and rounds by adding RDP vectors order by order, and
//! converted to (ε, δ).
//!
//! It follows the conventions of Google's `dp-accounting` (`RdpAccountant`, version recorded in
//! `tests/data/dp-accounting-reference.json`) so that anyone can check a node's figures with it:
//! the same default orders; for q = 1 the plain Gaussian α/(2σ²); for integer orders the
//! binomial expansion of A_α summed in log space; for fractional orders the two-series formula
//! (section 3.3 of the paper), stopped when both series' terms fall and are e⁻³⁰ below the total,
//! and taken as +∞ (the order is then unused) after 1000 terms; the conversion to ε of Balle et
//! al. 2020 (Proposition 12) / Canonne, Kamath & Steinke 2020, with the KL bound for tiny RDP;
//! the order that gives the smallest ε. The test compares every order and ε to 1e-6 relative.

use std::ops::{Add, AddAssign};

use fedstat_proto::privacy::PrivacyCost;

/// Number of default orders.
pub const NUM_ORDERS: usize = 156;

/// `dp-accounting`'s default RDP orders: 1.1, 1.2, …, 10.9, then 11 … 63, then 128, 256, 512,
/// 1024.
pub const DEFAULT_ORDERS: [f64; NUM_ORDERS] = default_orders();

const fn default_orders() -> [f64; NUM_ORDERS] {
    let mut out = [0.0; NUM_ORDERS];
    let mut k = 0;
    // 1 + x/10 computed as the library does, so 2.0, 3.0, … are exact integers.
    while k < 99 {
        out[k] = 1.0 + (k + 1) as f64 / 10.0;
        k += 1;
    }
    let mut a = 11;
    while a < 64 {
        out[k] = a as f64;
        k += 1;
        a += 1;
    }
    let big = [128.0, 256.0, 512.0, 1024.0];
    let mut b = 0;
    while b < 4 {
        out[k] = big[b];
        k += 1;
        b += 1;
    }
    out
}

/// Most terms of the fractional-order series before the order is given up (as +∞).
const MAX_FRAC_TERMS: usize = 1000;

/// Why accountant inputs are refused; each names the parameter.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum AccountantError {
    #[error("privacy: the sampling rate must be in (0, 1]")]
    SamplingRate,
    #[error("privacy: the noise multiplier must be a positive finite number")]
    NoiseMultiplier,
    #[error("privacy: the number of steps must be at least 1")]
    Steps,
    #[error("privacy: delta must be in (0, 1)")]
    Delta,
    #[error("privacy: an RDP vector has {found} values for {orders} orders")]
    Orders { orders: usize, found: usize },
}

/// RDP of a mechanism (or a composition) at each order of an accountant's orders. Adding two
/// composes them (RDP composes additively at each order).
#[derive(Debug, Clone, PartialEq)]
pub struct Rdp(pub Vec<f64>);

impl Rdp {
    /// No privacy spent: zero at every default order.
    pub fn zero() -> Self {
        Rdp(vec![0.0; NUM_ORDERS])
    }

    /// The RDP of `cost` (steps of the subsampled Gaussian) on the default orders.
    pub fn of(cost: &PrivacyCost) -> Result<Self, AccountantError> {
        rdp(
            cost.sampling_rate,
            cost.noise_multiplier,
            cost.steps,
            &DEFAULT_ORDERS,
        )
        .map(Rdp)
    }

    /// ε at `delta` on the default orders, and the order that gives it.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64), AccountantError> {
        epsilon(&self.0, &DEFAULT_ORDERS, delta)
    }

    /// This RDP composed `times` times (a cost charged for that many rounds).
    pub fn times(&self, times: u64) -> Self {
        Rdp(self.0.iter().map(|r| r * times as f64).collect())
    }
}

impl Add for Rdp {
    type Output = Rdp;
    fn add(mut self, other: Rdp) -> Rdp {
        self += other;
        self
    }
}

impl AddAssign for Rdp {
    fn add_assign(&mut self, other: Rdp) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0.0);
        }
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }
}

/// Check the parameters of one subsampled Gaussian.
pub fn check_cost(q: f64, sigma: f64, steps: u64) -> Result<(), AccountantError> {
    if !(q > 0.0 && q <= 1.0) {
        return Err(AccountantError::SamplingRate);
    }
    if !(sigma > 0.0 && sigma.is_finite()) {
        return Err(AccountantError::NoiseMultiplier);
    }
    if steps == 0 {
        return Err(AccountantError::Steps);
    }
    Ok(())
}

/// RDP at each of `orders` of `steps` compositions of the Gaussian mechanism with noise
/// multiplier `sigma` on a Poisson subsample of rate `q`. An order whose series does not
/// converge is +∞ (unused by [`epsilon`]).
pub fn rdp(q: f64, sigma: f64, steps: u64, orders: &[f64]) -> Result<Vec<f64>, AccountantError> {
    check_cost(q, sigma, steps)?;
    Ok(orders
        .iter()
        .map(|&alpha| steps as f64 * rdp_one(q, sigma, alpha))
        .collect())
}

/// RDP of one step at order `alpha`.
fn rdp_one(q: f64, sigma: f64, alpha: f64) -> f64 {
    if alpha.is_infinite() {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// log A_α for integer α: A_α = Σᵢ C(α,i) qⁱ (1−q)^(α−i) exp((i²−i)/(2σ²)), summed in log space.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let two_var = 2.0 * sigma * sigma;
    let a = alpha as f64;
    let mut binomial = LogBinomial::new(a);
    (0..=alpha).fold(f64::NEG_INFINITY, |acc, i| {
        let i = i as f64;
        let coef = binomial.next_term() + i * log_q + (a - i) * log_1mq;
        log_add(acc, coef + (i * i - i) / two_var)
    })
}

/// log A_α for fractional α: the integrals over (−∞, z₀] and [z₀, ∞) as two series in i (with
/// j = α − i), z₀ = σ² ln(1/q − 1) + ½. Returns +∞ if the series have not converged after
/// [`MAX_FRAC_TERMS`] terms.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let two_var = 2.0 * sigma * sigma;
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let scale = std::f64::consts::SQRT_2 * sigma;
    let log_half = 0.5f64.ln();
    let (mut a0, mut a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let mut binomial = LogBinomial::new(alpha);
    for i in 0..MAX_FRAC_TERMS {
        let i = i as f64;
        let coef = binomial.next_term();
        let j = alpha - i;
        let t0 = coef + i * log_q + j * log_1mq;
        let t1 = coef + j * log_q + i * log_1mq;
        let e0 = log_half + log_erfc((i - z0) / scale);
        let e1 = log_half + log_erfc((z0 - j) / scale);
        let s0 = t0 + (i * i - i) / two_var + e0;
        let s1 = t1 + (j * j - j) / two_var + e1;
        a0 = log_add(a0, s0);
        a1 = log_add(a1, s1);
        let total = log_add(a0, a1);
        if s0 < last0 && s1 < last1 && s0.max(s1) < total - 30.0 {
            return total;
        }
        last0 = s0;
        last1 = s1;
    }
    f64::INFINITY
}

/// ε at `delta` from RDP values at `orders` (Balle et al. 2020, Proposition 12):
/// ε = min over α of r + ln(1 − 1/α) − ln(δα)/(α − 1), with ε = 0 where the KL bound
/// δ ≥ √(1 − e⁻ʳ) already holds; orders ≤ 1.01 are numerically unstable and unused. Returns ε
/// and the optimal order.
pub fn epsilon(rdp: &[f64], orders: &[f64], delta: f64) -> Result<(f64, f64), AccountantError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountantError::Delta);
    }
    if rdp.len() != orders.len() || orders.is_empty() {
        return Err(AccountantError::Orders {
            orders: orders.len(),
            found: rdp.len(),
        });
    }
    let mut best = (f64::INFINITY, orders[0]);
    let mut first = true;
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        // The first smallest, as numpy's argmin.
        if first || eps < best.0 {
            best = (eps, a);
            first = false;
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// ε at `delta` and its order for `steps` of the subsampled Gaussian, on the default orders.
pub fn epsilon_of(cost: &PrivacyCost, delta: f64) -> Result<(f64, f64), AccountantError> {
    Rdp::of(cost)?.epsilon(delta)
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// ln |C(n, k)| for k = 0, 1, 2, … in turn (for fractional n the coefficient can be negative;
/// the series use its magnitude, as `dp-accounting` does). Built term by term from
/// C(n, k+1) = C(n, k)·(n − k)/(k + 1): exact for the first terms, where the sums nearly cancel
/// when the RDP is tiny (a Γ-function approximation would cost digits there).
struct LogBinomial {
    n: f64,
    k: f64,
    log: f64,
}

impl LogBinomial {
    fn new(n: f64) -> Self {
        LogBinomial { n, k: 0.0, log: 0.0 }
    }

    fn next_term(&mut self) -> f64 {
        let out = self.log;
        self.log += (self.n - self.k).abs().ln() - (self.k + 1.0).ln();
        self.k += 1.0;
        out
    }
}

/// ln erfc(x), accurate far into the tail where erfc underflows.
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        return statrs::function::erf::erfc(x).ln();
    }
    // erfc(x) = exp(−x²)/(x√π) · (1 − 1/(2x²) + 3/(2x²)² − 15/(2x²)³ + …); at x ≥ 25 eight
    // terms are far below f64 precision.
    let inv = 1.0 / (2.0 * x * x);
    let mut term = 1.0;
    let mut sum = 1.0;
    for k in 1..8 {
        term *= -((2 * k - 1) as f64) * inv;
        sum += term;
    }
    -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln() + sum.ln()
}

/// What the accountant needs of a [`PrivacyCost`].
pub trait CostExt {
    /// Check the cost's parameters.
    fn check(&self) -> Result<(), AccountantError>;
    /// Its RDP on the default orders.
    fn rdp(&self) -> Result<Rdp, AccountantError>;
    /// Its ε at `delta`.
    fn epsilon(&self, delta: f64) -> Result<f64, AccountantError>;
}

impl CostExt for PrivacyCost {
    fn check(&self) -> Result<(), AccountantError> {
        check_cost(self.sampling_rate, self.noise_multiplier, self.steps)
    }
    fn rdp(&self) -> Result<Rdp, AccountantError> {
        Rdp::of(self)
    }
    fn epsilon(&self, delta: f64) -> Result<f64, AccountantError> {
        Ok(epsilon_of(self, delta)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn reference() -> Value {
        let text = include_str!("../../../tests/data/dp-accounting-reference.json");
        serde_json::from_str(text).expect("reference json")
    }

    fn close(got: f64, want: f64, rel: f64) -> bool {
        got == want || (got - want).abs() <= rel * want.abs().max(f64::MIN_POSITIVE)
    }

    #[test]
    fn default_orders_are_the_librarys() {
        let r = reference();
        let orders: Vec<f64> = r["orders"]
            .as_array()
            .expect("orders")
            .iter()
            .map(|o| o.as_f64().expect("number"))
            .collect();
        assert_eq!(orders, DEFAULT_ORDERS.to_vec());
    }

    /// Every order's RDP and ε to 1e-6 relative, and the same optimal order, for every
    /// configuration of the fixture made with `dp-accounting`.
    #[test]
    fn agrees_with_dp_accounting() {
        let r = reference();
        assert!(r["dp_accounting_version"].is_string());
        let configs = r["configurations"].as_array().expect("configurations");
        assert!(configs.len() >= 20, "{}", configs.len());
        let rel = |g: f64, w: f64| if g == w { 0.0 } else { (g - w).abs() / w.abs() };
        let (mut worst_rdp, mut worst_eps) = (0.0f64, 0.0f64);
        for c in configs {
            let q = c["sampling_rate"].as_f64().expect("q");
            let sigma = c["noise_multiplier"].as_f64().expect("sigma");
            let steps = c["steps"].as_u64().expect("steps");
            let delta = c["delta"].as_f64().expect("delta");
            let label = format!("q={q} sigma={sigma} steps={steps} delta={delta}");
            let got = rdp(q, sigma, steps, &DEFAULT_ORDERS).expect("valid");
            let want = c["rdp"].as_array().expect("rdp");
            assert_eq!(got.len(), want.len(), "{label}");
            for ((g, w), a) in got.iter().zip(want).zip(DEFAULT_ORDERS) {
                match w.as_f64() {
                    None => assert!(g.is_infinite(), "{label} order {a}: {g} vs inf"),
                    Some(w) => {
                        assert!(close(*g, w, 1e-6), "{label} order {a}: {g} vs {w}");
                        worst_rdp = worst_rdp.max(rel(*g, w));
                    }
                }
            }
            let (eps, order) = epsilon(&got, &DEFAULT_ORDERS, delta).expect("epsilon");
            let want_eps = c["epsilon"].as_f64().expect("finite epsilon");
            assert!(close(eps, want_eps, 1e-6), "{label}: epsilon {eps} vs {want_eps}");
            worst_eps = worst_eps.max(rel(eps, want_eps));
            assert_eq!(order, c["order"].as_f64().expect("order"), "{label}");
        }
        eprintln!(
            "{} configurations: largest relative difference {worst_rdp:.1e} (RDP), {worst_eps:.1e} (epsilon)",
            configs.len()
        );
    }

    #[test]
    fn composition_adds_order_by_order() {
        let one = PrivacyCost {
            sampling_rate: 0.01,
            noise_multiplier: 1.1,
            steps: 100,
        };
        let ten = PrivacyCost { steps: 1000, ..one };
        let composed = (0..10).fold(Rdp::zero(), |acc, _| acc + Rdp::of(&one).expect("rdp"));
        let direct = Rdp::of(&ten).expect("rdp");
        for (a, b) in composed.0.iter().zip(&direct.0) {
            assert!(close(*a, *b, 1e-12), "{a} vs {b}");
        }
        assert_eq!(Rdp::of(&one).expect("rdp").times(10).0.len(), NUM_ORDERS);
        let (e1, _) = Rdp::of(&one).expect("rdp").epsilon(1e-5).expect("eps");
        let (e10, _) = composed.epsilon(1e-5).expect("eps");
        assert!(e10 > e1 && e10 < 10.0 * e1, "{e1} {e10}");
        assert_eq!(Rdp::zero().epsilon(1e-5).expect("eps").0, 0.0);
    }

    #[test]
    fn bad_inputs_name_the_parameter() {
        for (q, sigma, steps, want) in [
            (0.0, 1.0, 1, AccountantError::SamplingRate),
            (1.5, 1.0, 1, AccountantError::SamplingRate),
            (f64::NAN, 1.0, 1, AccountantError::SamplingRate),
            (0.5, 0.0, 1, AccountantError::NoiseMultiplier),
            (0.5, f64::INFINITY, 1, AccountantError::NoiseMultiplier),
            (0.5, 1.0, 0, AccountantError::Steps),
        ] {
            assert_eq!(rdp(q, sigma, steps, &DEFAULT_ORDERS), Err(want));
        }
        for delta in [0.0, 1.0, -1.0, f64::NAN] {
            assert_eq!(Rdp::zero().epsilon(delta), Err(AccountantError::Delta), "{delta}");
        }
        assert!(matches!(
            epsilon(&[1.0], &DEFAULT_ORDERS, 1e-5),
            Err(AccountantError::Orders { .. })
        ));
    }
}
