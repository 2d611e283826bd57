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

/// e^x - 1, accurate for small x.
#[inline]
pub(crate) fn exp_m1(x: f32) -> f32 {
    libm::expm1f(x)
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
