//! Goodness-of-fit checks for samplers: the chi-square test.
//!
//! Used by the crate's tests and by `negcache verify` for the
//! `gumbel_distribution` reference cases. Not on the training path; it
//! computes in f64.

use crate::math::{exp64, ln64};

/// The outcome of a chi-square goodness-of-fit test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChiSquare {
    /// The statistic, sum over cells of (observed - expected)^2 / expected.
    pub statistic: f64,
    /// Degrees of freedom: cells after pooling, minus one.
    pub dof: usize,
    /// The probability of a statistic at least this large under the null.
    pub p_value: f64,
}

/// Tests `observed` counts against cell `probabilities` (which should sum
/// to 1). Cells whose expected count is below 5 are pooled into one cell;
/// if that pooled cell is itself below 5 it is merged into the smallest
/// other cell. Returns `None` when the lengths differ or fewer than two
/// cells remain.
pub fn chi_square(observed: &[u64], probabilities: &[f64]) -> Option<ChiSquare> {
    if observed.len() != probabilities.len() {
        return None;
    }
    let total: u64 = observed.iter().sum();
    let n = total as f64;
    let (mut stat, mut cells) = (0.0f64, 0usize);
    let (mut pool_obs, mut pool_exp) = (0.0f64, 0.0f64);
    // The smallest unpooled cell, kept aside in case the pool must join it.
    let mut smallest: Option<(f64, f64)> = None;
    for (&o, &p) in observed.iter().zip(probabilities) {
        let e = p * n;
        if e < 5.0 {
            pool_obs += o as f64;
            pool_exp += e;
            continue;
        }
        cells += 1;
        match smallest {
            Some((_, se)) if se <= e => stat += term(o as f64, e),
            Some((so, se)) => {
                stat += term(so, se);
                smallest = Some((o as f64, e));
            }
            None => smallest = Some((o as f64, e)),
        }
    }
    let (so, se) = smallest?;
    if pool_exp >= 5.0 || (pool_exp == 0.0 && pool_obs == 0.0) {
        stat += term(so, se);
        if pool_exp > 0.0 {
            stat += term(pool_obs, pool_exp);
            cells += 1;
        }
    } else {
        stat += term(so + pool_obs, se + pool_exp);
    }
    if cells < 2 {
        return None;
    }
    let dof = cells - 1;
    Some(ChiSquare { statistic: stat, dof, p_value: gamma_q(dof as f64 / 2.0, stat / 2.0) })
}

fn term(o: f64, e: f64) -> f64 {
    let d = o - e;
    d * d / e
}

/// ln Gamma(x) for x > 0, by the Lanczos approximation (g = 7, nine
/// coefficients; relative error below 1e-13).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Gamma(x) Gamma(1 - x) = pi / sin(pi x).
        let pi = core::f64::consts::PI;
        return ln64(pi / libm::sin(pi * x)) - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, &c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * ln64(2.0 * core::f64::consts::PI) + (x + 0.5) * ln64(t) - t + ln64(a)
}

/// The regularised upper incomplete gamma function Q(a, x), by its series
/// for x < a + 1 and by its continued fraction (modified Lentz) otherwise.
pub fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let ln_prefix = a * ln64(x) - x - ln_gamma(a);
    if x < a + 1.0 {
        let (mut term, mut sum, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..1000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * exp64(ln_prefix)
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        exp64(ln_prefix) * h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn gamma_q_matches_closed_forms() {
        // Q(1, x) = e^-x; Q(1/2, x) = erfc(sqrt x).
        assert_relative_eq!(gamma_q(1.0, 2.5), (-2.5f64).exp(), max_relative = 1e-12);
        assert_relative_eq!(gamma_q(1.0, 0.3), (-0.3f64).exp(), max_relative = 1e-12);
        assert_relative_eq!(gamma_q(0.5, 2.0), libm::erfc(2.0f64.sqrt()), max_relative = 1e-10);
        // Q(k/2, x/2) for k = 2: e^{-x/2}; chi-square with 4 dof at 9.4877
        // has tail 0.05 (table value).
        assert_relative_eq!(gamma_q(2.0, 9.4877 / 2.0), 0.05, max_relative = 1e-4);
        assert_relative_eq!(ln_gamma(5.0), 24.0f64.ln(), max_relative = 1e-12);
    }

    #[test]
    fn chi_square_accepts_a_fit_and_rejects_a_misfit() {
        let p = [0.25, 0.25, 0.5];
        let fit = chi_square(&[2510, 2470, 5020], &p).unwrap();
        assert_eq!(fit.dof, 2);
        assert!(fit.p_value > 0.5, "{fit:?}");
        let misfit = chi_square(&[3000, 2000, 5000], &p).unwrap();
        assert!(misfit.p_value < 1e-6, "{misfit:?}");
    }

    #[test]
    fn small_cells_are_pooled() {
        // Expected counts 1, 1 and 98 of 100: the two small cells pool into
        // a cell of 2, which joins the smallest other cell: 1 cell remains.
        assert!(chi_square(&[1, 1, 98], &[0.01, 0.01, 0.98]).is_none());
        let r = chi_square(&[5, 5, 90, 100], &[0.02, 0.03, 0.45, 0.5]).unwrap();
        assert_eq!(r.dof, 2);
    }
}
