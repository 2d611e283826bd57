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

/// The correctly rounded square root, bit for bit what [`sqrt`] gives,
/// for loops that should vectorise.
///
/// `libm`'s `sqrtf` is one `sqrtss` instruction in inline assembly on
/// x86-64: opaque to the vectoriser, and a legacy SSE instruction that
/// stalls when it follows 256- or 512-bit vector code. Here, on targets
/// with hardware `f64`, the root is plain arithmetic: `1/sqrt(x)` in f64
/// from an exponent-halving guess and three Newton steps (relative error
/// below 4e-11, far below the 3e-8 of half an f32 step), times `x`,
/// rounded to f32. That is the correctly rounded
/// root or one of its neighbours; the neighbour is settled exactly: the
/// midpoints between adjacent f32 values have 25 significant bits, so
/// their squares are exact in f64 and compare exactly with `x`. Zero,
/// infinity, negative and NaN arguments give what `sqrt` gives (NaN for
/// the last two, possibly with another payload). Elsewhere (the Cortex-M4
/// has no f64 unit) it is [`sqrt`].
#[inline]
pub(crate) fn sqrt_wide(x: f32) -> f32 {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let xd = x as f64;
        let mut y = f64::from_bits(0x5fe6_eb50_c7b5_37a9u64.wrapping_sub(xd.to_bits() >> 1));
        for _ in 0..3 {
            y *= 1.5 - 0.5 * xd * y * y;
        }
        let r = (xd * y) as f32;
        let bits = r.to_bits();
        let (rd, up, down) =
            (r as f64, f32::from_bits(bits.wrapping_add(1)) as f64, f32::from_bits(bits.wrapping_sub(1)) as f64);
        let (hi, lo) = (0.5 * (rd + up), 0.5 * (down + rd));
        let r = if xd > hi * hi {
            up as f32
        } else if xd < lo * lo {
            down as f32
        } else {
            r
        };
        if x > 0.0 && x < f32::INFINITY {
            r
        } else if x == 0.0 || x == f32::INFINITY {
            x
        } else {
            f32::NAN
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        sqrt(x)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bits: u32) {
        let x = f32::from_bits(bits);
        let (want, got) = (sqrt(x), sqrt_wide(x));
        if want.is_nan() {
            assert!(got.is_nan(), "sqrt({x:e}) = {got:e}, not NaN");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "sqrt({x:e} = {bits:#x}): {got:e} against {want:e}");
        }
    }

    #[test]
    fn wide_square_root_is_the_correctly_rounded_one() {
        // Two whole binades (the guess and the steps repeat every second
        // binade), every subnormal, and a stride through every other value
        // of both signs, zeros, infinities and NaNs.
        let one = 1.0f32.to_bits();
        (one..one + (2 << 23)).for_each(check);
        (0..1 << 23).for_each(check);
        (0..=u32::MAX).step_by(251).for_each(check);
        [0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0x7f7f_ffff, 0x0000_0001].into_iter().for_each(check);
    }

    /// Every one of the 2^32 arguments (`cargo test --release -p negcache
    /// --lib every_square_root -- --ignored`; a minute or so).
    #[test]
    #[ignore]
    fn every_square_root_is_the_correctly_rounded_one() {
        (0..=u32::MAX).for_each(check);
    }
}
