//! Noise without a floating-point side channel, for the single-release Gaussian mechanisms
//! (exact OLS sums, table cells).
//!
//! Gaussian noise drawn in floating point and added to a float leaks the value it hides
//! through the set of floats the sum can land on (Mironov, CCS 2012). Here every value is
//! first rounded to a grid γ (a power of two, so `x / γ` is exact), an exact discrete Gaussian
//! integer is added (Canonne, Kamath & Steinke 2020, the sampler of ISRG's `prio` crate), and
//! the integer times γ is released: the output is a deterministic function of that integer, so
//! it carries nothing the integer does not.
//!
//! **Calibration.** γ = 2^(⌊log₂(σΔ)⌋ − 20): the grid is about a millionth of the noise's
//! standard deviation. In grid units a row changes the values by at most Δ/γ in L2 plus, per
//! coordinate it touches, 1 for rounding both neighbours' values and 1 for the floating-point
//! error of their sums (far below a grid step); so Δ_γ = Δ/γ + 2√c for c touched coordinates.
//! The discrete Gaussian with parameter σ·Δ_γ (rounded up to a multiple of 2^-16) then
//! satisfies the same Rényi DP as the continuous Gaussian of noise multiplier σ: for an
//! integer-valued query of L2 sensitivity Δ_γ, D_α ≤ αΔ_γ²/(2σ²Δ_γ²) = α/(2σ²) (CKS20,
//! Theorem 14), which is what [`crate::accountant`] charges for one step at q = 1.

use num_traits::ToPrimitive;
use prio::dp::distributions::DiscreteGaussian;
use prio::dp::Rational;
use rand_010::distr::Distribution;
use rand_010::rngs::{ChaCha20Rng, SysRng};
use rand_010::SeedableRng;

use crate::{Error, Result};

/// The generator behind the discrete noise: ChaCha20 seeded by the operating system.
pub type NoiseRng = ChaCha20Rng;

/// Bits of resolution below the noise's standard deviation.
const RESOLUTION_BITS: i32 = 20;
/// The parameter is rounded up to a multiple of 1/2^16.
const PARAMETER_DENOMINATOR: u128 = 1 << 16;

/// A generator seeded by the operating system, for noise that leaves a node.
pub fn os_noise_rng() -> Result<NoiseRng> {
    NoiseRng::try_from_rng(&mut SysRng)
        .map_err(|e| Error::Model(format!("the operating system's randomness is unavailable: {e}")))
}

/// Discrete Gaussian noise on a power-of-two grid for values of L2 sensitivity `sensitivity`
/// of which a neighbouring input touches at most `touched` coordinates.
#[derive(Debug, Clone)]
pub struct GridNoise {
    grid: f64,
    /// The discrete Gaussian's parameter, in grid steps.
    parameter: f64,
    sampler: DiscreteGaussian,
}

impl GridNoise {
    pub fn new(noise_multiplier: f64, sensitivity: f64, touched: usize) -> Result<GridNoise> {
        let sd = noise_multiplier * sensitivity;
        if !(sd.is_finite() && sd > 0.0 && noise_multiplier > 0.0) {
            return Err(Error::Model(
                "the noise needs a positive, finite noise multiplier and sensitivity".to_owned(),
            ));
        }
        let grid = 2f64.powi(sd.log2().floor() as i32 - RESOLUTION_BITS);
        let steps = sensitivity / grid + 2.0 * (touched as f64).sqrt();
        let parameter = noise_multiplier * steps;
        let numerator = (parameter * PARAMETER_DENOMINATOR as f64).ceil();
        if !(numerator.is_finite() && numerator < 2f64.powi(100)) {
            return Err(Error::Model("the noise parameter is out of range".to_owned()));
        }
        let rational = Rational::from_unsigned(numerator as u128, PARAMETER_DENOMINATOR)
            .map_err(|e| Error::Model(format!("noise parameter: {e}")))?;
        let sampler =
            DiscreteGaussian::new(rational).map_err(|e| Error::Model(format!("noise parameter: {e}")))?;
        Ok(GridNoise {
            grid,
            parameter: numerator / PARAMETER_DENOMINATOR as f64,
            sampler,
        })
    }

    /// The grid step: every released value is a multiple of it.
    pub fn grid(&self) -> f64 {
        self.grid
    }

    /// The noise's standard deviation in the values' units (the discrete Gaussian's parameter;
    /// its standard deviation differs by less than 1e-100 relative at these sizes).
    pub fn sd(&self) -> f64 {
        self.parameter * self.grid
    }

    /// `value` rounded to the grid, plus one draw of the noise.
    pub fn add(&self, value: f64, rng: &mut NoiseRng) -> Result<f64> {
        let steps = (value / self.grid).round();
        if !(steps.is_finite() && steps.abs() < 2f64.powi(100)) {
            return Err(Error::Model(
                "a value to be noised is not a finite number of a plausible size".to_owned(),
            ));
        }
        let noise = self
            .sampler
            .sample(rng)
            .to_i128()
            .ok_or_else(|| Error::Model("a noise draw is out of range".to_owned()))?;
        Ok((steps as i128 + noise) as f64 * self.grid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_values_lie_on_the_grid_with_the_announced_spread() {
        let noise = GridNoise::new(4.2, 5.0, 28).expect("noise");
        // The grid is a power of two about 2^-20 of the noise's standard deviation.
        assert_eq!(noise.grid().log2().fract(), 0.0);
        let ratio = noise.sd() / (4.2 * 5.0);
        assert!((1.0..1.001).contains(&ratio), "{ratio}");
        let mut rng = NoiseRng::seed_from_u64(5);
        let x = 123.456_789_f64;
        let draws: Vec<f64> = (0..20_000)
            .map(|_| noise.add(x, &mut rng).expect("draw"))
            .collect();
        for d in &draws {
            assert_eq!((d / noise.grid()).fract(), 0.0, "off the grid: {d}");
        }
        let n = draws.len() as f64;
        let mean = draws.iter().sum::<f64>() / n;
        let sd = (draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        assert!((mean - x).abs() < 4.0 * noise.sd() / n.sqrt(), "mean {mean}");
        assert!(
            (sd / noise.sd() - 1.0).abs() < 0.03,
            "sd {sd} against {}",
            noise.sd()
        );
        // The normal shape: about 68.3% within one standard deviation, 95.4% within two.
        let within = |k: f64| draws.iter().filter(|d| (*d - x).abs() <= k * noise.sd()).count() as f64 / n;
        assert!((within(1.0) - 0.6827).abs() < 0.015, "{}", within(1.0));
        assert!((within(2.0) - 0.9545).abs() < 0.008, "{}", within(2.0));
    }

    /// Two neighbouring values produce outputs on the same grid: nothing in the low-order bits
    /// tells them apart (the floating-point attack reads exactly those).
    #[test]
    fn neighbouring_inputs_share_the_set_of_possible_outputs() {
        let noise = GridNoise::new(2.0, 1.0, 1).expect("noise");
        let mut rng = NoiseRng::seed_from_u64(6);
        for (a, b) in [(0.1, 1.1), (1e6 + 0.3, 1e6 + 1.3)] {
            let x = noise.add(a, &mut rng).expect("draw");
            let y = noise.add(b, &mut rng).expect("draw");
            assert_eq!((x / noise.grid()).fract(), 0.0);
            assert_eq!((y / noise.grid()).fract(), 0.0);
        }
        assert!(GridNoise::new(0.0, 1.0, 1).is_err());
        assert!(noise.add(f64::NAN, &mut rng).is_err());
    }
}
