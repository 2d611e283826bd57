//! The one place where transcendental functions are called.
//!
//! Every `exp`, `ln` and `sqrt` in the crate goes through this module, which
//! calls `libm`. The host and a microcontroller therefore run the same
//! arithmetic and produce the same bits: `std`'s float methods may use the
//! platform's math library instead, whose results differ in the last place.

/// e^x.
#[inline]
pub(crate) fn exp(x: f32) -> f32 {
    libm::expf(x)
}

/// Natural logarithm.
#[inline]
pub(crate) fn ln(x: f32) -> f32 {
    libm::logf(x)
}

/// ln(1 + x), accurate for small x.
#[inline]
pub(crate) fn ln_1p(x: f32) -> f32 {
    libm::log1pf(x)
}

/// Square root.
#[inline]
pub(crate) fn sqrt(x: f32) -> f32 {
    libm::sqrtf(x)
}

/// tanh, for the tanh activation.
#[inline]
#[allow(dead_code)]
pub(crate) fn tanh(x: f32) -> f32 {
    libm::tanhf(x)
}

/// x^y.
#[inline]
#[allow(dead_code)]
pub(crate) fn powi(x: f32, n: i32) -> f32 {
    libm::powf(x, n as f32)
}

/// e^x in f64 (statistics only, not on the training path).
#[inline]
pub(crate) fn exp64(x: f64) -> f64 {
    libm::exp(x)
}

/// Natural logarithm in f64 (statistics only).
#[inline]
pub(crate) fn ln64(x: f64) -> f64 {
    libm::log(x)
}

/// ln(e^a + e^b) without overflow; `-inf` arguments are handled.
#[inline]
pub(crate) fn log_add_exp(a: f32, b: f32) -> f32 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if hi == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    hi + ln_1p(exp(lo - hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn log_add_exp_is_stable_for_large_arguments() {
        // ln(e^1000 + e^1000) = 1000 + ln 2, where a naive form overflows.
        assert_relative_eq!(
            log_add_exp(1000.0, 1000.0),
            1000.0 + core::f32::consts::LN_2,
            max_relative = 1e-6
        );
        assert_relative_eq!(log_add_exp(0.0, f32::NEG_INFINITY), 0.0);
        assert_eq!(
            log_add_exp(f32::NEG_INFINITY, f32::NEG_INFINITY),
            f32::NEG_INFINITY
        );
        // ln(e^-1 + e^2) from the closed form, computed in f64.
        let want = (((-1.0f64).exp() + 2.0f64.exp()).ln()) as f32;
        assert_relative_eq!(log_add_exp(-1.0, 2.0), want, max_relative = 1e-6);
    }
}
