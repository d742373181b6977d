//! Small dense symmetric positive-definite algebra (normal equations, Newton steps, the
//! inverse for standard errors) on nalgebra's Cholesky factor, with singular designs reported
//! by column name instead of turning into NaNs.
//!
//! Matrices come and go as row-major `p × p` slices, the layout the models build them in.

use nalgebra::{Cholesky, DMatrix, DVector, Dyn};

use crate::{Error, Result};

/// Smallest accepted Cholesky pivot of the unit-diagonal matrix. That pivot is `1 − R²` of a
/// column regressed on the columns before it, so anything smaller means "a combination of them".
const MIN_PIVOT: f64 = 1e-12;

/// Coefficients (on unit-diagonal scale) below this fraction of the largest do not count as
/// part of a dependency when naming the columns involved.
const NEGLIGIBLE: f64 = 1e-6;

/// The Cholesky factor of a symmetric positive-definite matrix `a`, taken of `D a D` with
/// `D = diag(a)^(-1/2)` so that raw-scale designs (an income next to a dummy) keep their precision.
#[derive(Debug, Clone)]
pub struct SpdFactor {
    factor: Cholesky<f64, Dyn>,
    /// The diagonal of `D`.
    scale: Vec<f64>,
}

impl SpdFactor {
    /// Factor `a` (`p × p`, row-major, symmetric). `names` name the columns in errors (missing
    /// names read `column j`). Fails with [`Error::Singular`] on the first column that is zero,
    /// or (nearly) a linear combination of the columns before it.
    pub fn new(a: &[f64], p: usize, names: &[String]) -> Result<Self> {
        if a.len() != p * p {
            return Err(Error::Model(format!(
                "internal: {} entries for a {p} × {p} matrix",
                a.len()
            )));
        }
        if a.iter().any(|v| !v.is_finite()) {
            return Err(Error::Model(
                "a matrix to factor has entries that are not finite".to_owned(),
            ));
        }
        let mut scale = Vec::with_capacity(p);
        for j in 0..p {
            let d = a[j * p + j];
            if d <= 0.0 {
                return Err(Error::Singular {
                    column: column_name(names, j),
                    combination_of: Vec::new(),
                });
            }
            scale.push(1.0 / d.sqrt());
        }
        let s = DMatrix::from_fn(p, p, |i, j| a[i * p + j] * scale[i] * scale[j]);
        // A non-positive pivot is replaced by one below MIN_PIVOT so the loop below finds the
        // first bad column whether rounding made its pivot tiny, zero or negative.
        let factor = Cholesky::new_with_substitute(s.clone(), MIN_PIVOT / 2.0)
            .ok_or_else(|| Error::Model("internal: Cholesky factorisation failed".to_owned()))?;
        let l = factor.l_dirty();
        if let Some(j) = (0..p).find(|&j| {
            let pivot = l[(j, j)] * l[(j, j)];
            pivot.is_nan() || pivot <= MIN_PIVOT
        }) {
            return Err(Error::Singular {
                column: column_name(names, j),
                combination_of: dependency(&s, l, j)
                    .into_iter()
                    .map(|k| column_name(names, k))
                    .collect(),
            });
        }
        Ok(SpdFactor { factor, scale })
    }

    /// Dimension `p`.
    pub fn dim(&self) -> usize {
        self.scale.len()
    }

    /// `x` with `a · x = b`.
    pub fn solve(&self, b: &[f64]) -> Result<Vec<f64>> {
        if b.len() != self.dim() {
            return Err(Error::Model(format!(
                "internal: right-hand side of length {} for a {p} × {p} system",
                b.len(),
                p = self.dim()
            )));
        }
        // a = D⁻¹ S D⁻¹, so x = D S⁻¹ D b.
        let db = DVector::from_iterator(b.len(), b.iter().zip(&self.scale).map(|(b, s)| b * s));
        let u = self.factor.solve(&db);
        Ok(u.iter().zip(&self.scale).map(|(u, s)| u * s).collect())
    }

    /// `a⁻¹`, row-major (e.g. the covariance of coefficients from an information matrix).
    pub fn inverse(&self) -> Vec<f64> {
        let p = self.dim();
        let inv = self.factor.inverse();
        let mut out = Vec::with_capacity(p * p);
        for i in 0..p {
            for j in 0..p {
                out.push(inv[(i, j)] * self.scale[i] * self.scale[j]);
            }
        }
        out
    }
}

/// Solve `a · x = b` for a symmetric positive-definite `a` (`b.len() × b.len()`, row-major).
pub fn solve_spd(a: &[f64], b: &[f64], names: &[String]) -> Result<Vec<f64>> {
    SpdFactor::new(a, b.len(), names)?.solve(b)
}

/// `a⁻¹` for a symmetric positive-definite `a` (`p × p`, row-major).
pub fn inverse_spd(a: &[f64], p: usize, names: &[String]) -> Result<Vec<f64>> {
    Ok(SpdFactor::new(a, p, names)?.inverse())
}

fn column_name(names: &[String], j: usize) -> String {
    names.get(j).cloned().unwrap_or_else(|| format!("column {j}"))
}

/// The columns before `j` that column `j` is (nearly) a combination of: the non-negligible
/// coefficients of `j` regressed on them, from the leading block of the factor (whose pivots
/// all passed).
fn dependency(s: &DMatrix<f64>, l: &DMatrix<f64>, j: usize) -> Vec<usize> {
    if j == 0 {
        return Vec::new();
    }
    let lead = l.view((0, 0), (j, j)).into_owned();
    let rhs = s.view((0, j), (j, 1)).into_owned();
    let coef = lead
        .solve_lower_triangular(&rhs)
        .and_then(|z| lead.transpose().solve_upper_triangular(&z));
    let Some(coef) = coef else {
        return Vec::new();
    };
    let largest = coef.iter().fold(0.0f64, |m, c| m.max(c.abs()));
    (0..j).filter(|&k| coef[k].abs() > NEGLIGIBLE * largest).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    /// `XᵀX` of a row-major `n × p` design.
    fn gram(x: &[f64], p: usize) -> Vec<f64> {
        let n = x.len() / p;
        let mut g = vec![0.0; p * p];
        for r in 0..n {
            for a in 0..p {
                for b in 0..p {
                    g[a * p + b] += x[r * p + a] * x[r * p + b];
                }
            }
        }
        g
    }

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= tol * y.abs().max(1.0))
    }

    #[test]
    fn known_systems_solve_and_invert() {
        // [[4, 2], [2, 3]]: inverse [[3, -2], [-2, 4]] / 8; solution of b = (2, 1) is (0.5, 0).
        let a = [4.0, 2.0, 2.0, 3.0];
        let n = names(&["a", "b"]);
        assert!(close(
            &solve_spd(&a, &[2.0, 1.0], &n).expect("spd"),
            &[0.5, 0.0],
            1e-14
        ));
        let inv = inverse_spd(&a, 2, &n).expect("spd");
        assert!(close(&inv, &[0.375, -0.25, -0.25, 0.5], 1e-14), "{inv:?}");

        // The 3 × 3 Pascal matrix has an integer inverse.
        let pascal = [1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 1.0, 3.0, 6.0];
        let inv = inverse_spd(&pascal, 3, &[]).expect("spd");
        let expected = [3.0, -3.0, 1.0, -3.0, 5.0, -2.0, 1.0, -2.0, 1.0];
        assert!(close(&inv, &expected, 1e-12), "{inv:?}");

        // Columns on wildly different scales keep their precision.
        let x = [1.0, 2.0e6, 0.0, 1.0, 3.5e6, 1.0, 1.0, 1.0e6, 1.0, 1.0, 4.0e6, 0.0];
        let beta = [0.5, 2.0e-6, -1.0];
        let y: Vec<f64> = x
            .chunks(3)
            .map(|r| r.iter().zip(&beta).map(|(a, b)| a * b).sum())
            .collect();
        let mut xty = [0.0; 3];
        for (r, yi) in x.chunks(3).zip(&y) {
            for (t, v) in xty.iter_mut().zip(r) {
                *t += v * yi;
            }
        }
        let got = solve_spd(&gram(&x, 3), &xty, &[]).expect("full rank");
        assert!(close(&got, &beta, 1e-9), "{got:?}");
    }

    #[test]
    fn singular_matrices_name_the_aliased_columns() {
        // Column c = a + 2b (aliased), d independent.
        let rows: [[f64; 4]; 5] = [
            [1.0, 0.0, 1.0, 3.0],
            [2.0, 1.0, 4.0, -1.0],
            [0.0, 3.0, 6.0, 2.0],
            [1.0, 1.0, 3.0, 0.5],
            [5.0, 2.0, 9.0, 1.0],
        ];
        let x: Vec<f64> = rows.iter().flatten().copied().collect();
        let n = names(&["a", "b", "c", "d"]);
        match SpdFactor::new(&gram(&x, 4), 4, &n) {
            Err(Error::Singular {
                column,
                combination_of,
            }) => {
                assert_eq!(column, "c");
                assert_eq!(combination_of, ["a", "b"]);
            }
            other => panic!("expected a singular matrix, got {other:?}"),
        }

        // A constant column next to the intercept; a zero column.
        let x = [1.0, 7.0, 1.0, 1.0, 7.0, 2.0, 1.0, 7.0, 3.0];
        let err = SpdFactor::new(&gram(&x, 3), 3, &names(&["(intercept)", "k", "z"])).expect_err("aliased");
        assert!(
            matches!(&err, Error::Singular { column, combination_of } if column == "k" && combination_of == &["(intercept)"]),
            "{err}"
        );
        assert!(
            err.to_string().contains("`k`") && err.public().contains("`(intercept)`"),
            "{err}"
        );
        let zero = [1.0, 0.0, 0.0, 0.0];
        let err = SpdFactor::new(&zero, 2, &names(&["x", "y"])).expect_err("zero column");
        assert!(
            matches!(&err, Error::Singular { column, combination_of } if column == "y" && combination_of.is_empty()),
            "{err}"
        );

        // Nearly aliased (1 − R² around 1e-14) is refused, not solved into huge coefficients.
        let eps = 1e-7;
        let x = [1.0, 1.0 + eps, 1.0, 1.0 - eps, 0.0, eps];
        let err = SpdFactor::new(&gram(&x, 2), 2, &names(&["u", "v"])).expect_err("near singular");
        assert!(
            matches!(&err, Error::Singular { column, .. } if column == "v"),
            "{err}"
        );

        // Not finite or a mis-sized matrix: a model error, not a panic.
        assert!(matches!(
            SpdFactor::new(&[f64::NAN], 1, &[]),
            Err(Error::Model(_))
        ));
        assert!(matches!(
            SpdFactor::new(&[1.0, 0.0], 2, &[]),
            Err(Error::Model(_))
        ));
        assert!(matches!(
            solve_spd(&[1.0], &[1.0, 2.0], &[]),
            Err(Error::Model(_))
        ));
    }
}
