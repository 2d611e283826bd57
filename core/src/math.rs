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
/// with hardware `f64`, the root is plain arithmetic: `1/sqrt(x)` from an
/// exponent-halving guess, two Newton steps in f32 (relative error about
/// 5e-6, in twice as many vector lanes as f64 has) and two in f64 (about
/// 2e-21, so what remains is the rounding of a few f64 operations), times
/// `x` in f64, rounded to f32. A root of an f32 lies at least `2^-51` of
/// itself away from every midpoint between adjacent f32 values (a
/// midpoint has 25 significant bits, so its square is not an f32), and
/// the f64 result is nearer than that to the root; the last step leaves
/// little margin, so the claim rests on a test of every one of the 2^32
/// arguments (`every_square_root_is_the_correctly_rounded_one`, run
/// before this version was kept; CI runs two whole binades, every
/// subnormal, the extreme binades and a stride). Subnormal arguments are
/// scaled by `2^24` for the f32 guess and its result by `2^12`, both
/// exact. Zero, infinity, negative and NaN arguments give what `sqrt`
/// gives (NaN for the last two, possibly with another payload). This
/// replaced a version with three f64 steps and an exact choice between
/// the result and its neighbours (the same bits, about twice the time).
/// Elsewhere (the Cortex-M4 has no f64 unit) it is [`sqrt`].
#[inline]
pub(crate) fn sqrt_wide(x: f32) -> f32 {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let tiny = x < f32::MIN_POSITIVE;
        let xs = if tiny { x * 16_777_216.0 } else { x };
        let mut y = f32::from_bits(0x5f37_5a86u32.wrapping_sub(xs.to_bits() >> 1));
        let h = 0.5 * xs;
        for _ in 0..2 {
            y *= 1.5 - h * y * y;
        }
        let y = if tiny { y * 4096.0 } else { y };
        let (xd, mut yd) = (x as f64, y as f64);
        let hd = 0.5 * xd;
        for _ in 0..2 {
            yd *= 1.5 - hd * yd * yd;
        }
        let r = (xd * yd) as f32;
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

/// `L` exponentials side by side, bit for bit what [`exp`] gives each
/// argument, for loops that should vectorise.
///
/// `libm`'s `expf` (0.2.16: FreeBSD's `e_expf.c`) is a scalar function
/// with branches on the argument's range. For arguments at most zero (a
/// softmax's `c - max`) its steps are written here without branches, as
/// selects the compiler turns into vector instructions: the reduction
/// `x = k ln2 + r` with `k` from the same three ranges (`ln2` split in a
/// high and a low part), the same rational approximation of `e^r`, and
/// the same scaling by `2^k`, in two steps below `2^-126` as its
/// `scalbnf` does. The arithmetic is the same, operation for operation,
/// so the rounding is too. Arguments above zero, and NaN, go to [`exp`]
/// itself, lane by lane. `exp_lanes_is_libm_bit_for_bit` checks it
/// against `libm` over every non-positive argument in a stride and whole
/// binades; a `libm` that changes its `expf` fails that test.
#[inline]
pub(crate) fn exp_lanes<const L: usize>(x: [f32; L]) -> [f32; L] {
    let ln2_hi = f32::from_bits(0x3f31_7200);
    let ln2_lo = f32::from_bits(0x35bf_be8e);
    let inv_ln2 = f32::from_bits(0x3fb8_aa3b);
    let p1 = f32::from_bits(0x3e2a_aa8f);
    let p2 = f32::from_bits(0xbb35_5215);
    // 2^-102: libm's pre-scaling when 2^k is below the normal range.
    let pre_scale = f32::from_bits((127 - 102) << 23);
    // 1.5 * 2^23: adding and subtracting it rounds to an integer, and
    // 2^23 + i has i in its low bits. Integers are kept in floats this way
    // because a float-to-integer cast saturates, which does not vectorise.
    const ROUND: f32 = 12_582_912.0;
    const TWO23: f32 = 8_388_608.0;
    let mut out = [0.0f32; L];
    for (o, &v) in out.iter_mut().zip(&x) {
        let hx = v.to_bits() & 0x7fff_ffff;
        // k: beyond 1.5 ln2, x / ln2 - 0.5 cut toward zero (it is
        // negative here, so that is its ceiling); -1 beyond 0.5 ln2;
        // else 0. The clamp keeps lanes that take another branch in range.
        let a = (inv_ln2 * v - 0.5).max(-200.0);
        let near = (a + ROUND) - ROUND;
        let ceil = if near < a { near + 1.0 } else { near };
        let kf = if hx > 0x3f85_1592 {
            ceil
        } else if hx > 0x3eb1_7218 {
            -1.0
        } else {
            0.0
        };
        let hi = v - kf * ln2_hi;
        let lo = kf * ln2_lo;
        let r = hi - lo;
        let rr = r * r;
        let c = r - rr * (p1 + rr * p2);
        let y = 1.0 + (r * c / (2.0 - c) - lo + hi);
        let (pre, n) = if kf < -126.0 { (pre_scale, kf + 102.0) } else { (1.0, kf) };
        let biased = (n + 127.0 + TWO23).to_bits() - TWO23.to_bits();
        let scale = f32::from_bits(biased << 23);
        *o = if hx >= 0x42cf_f1b5 {
            // Below about -103.97: zero (and -infinity).
            0.0
        } else if hx <= 0x3900_0000 {
            // |x| at most 2^-14: libm returns 1 + x.
            1.0 + v
        } else {
            y * pre * scale
        };
    }
    for (o, &v) in out.iter_mut().zip(&x) {
        if v > 0.0 || v.is_nan() {
            *o = exp(v);
        }
    }
    out
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
    fn exp_lanes_is_libm_bit_for_bit() {
        fn check(bits: &[u32]) {
            let mut x = [0.0f32; 16];
            for chunk in bits.chunks(16) {
                for (x, &b) in x.iter_mut().zip(chunk) {
                    *x = f32::from_bits(b);
                }
                let got = exp_lanes(x);
                for (&x, g) in x.iter().zip(got).take(chunk.len()) {
                    let want = exp(x);
                    if want.is_nan() {
                        assert!(g.is_nan(), "exp({x:e}) = {g:e}, not NaN");
                    } else {
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "exp({x:e} = {:#x}): {g:e} against {want:e}",
                            x.to_bits()
                        );
                    }
                }
            }
        }
        let run = |it: &mut dyn Iterator<Item = u32>| {
            let mut buf = [0u32; 4096];
            loop {
                let n = buf.iter_mut().zip(&mut *it).map(|(b, v)| *b = v).count();
                check(&buf[..n]);
                if n < buf.len() {
                    break;
                }
            }
        };
        // Whole binades of negative arguments around each range boundary
        // (2^-14, 0.5 ln2, 1.5 ln2, where 2^k leaves the normal range,
        // the cut to zero), every 97th value of both
        // signs, and the special values.
        for lead in [0xb880_0000u32, 0xb900_0000, 0xbe80_0000, 0xbf00_0000, 0xbf80_0000, 0xc000_0000, 0xc280_0000] {
            run(&mut (lead..lead + (1 << 23)));
        }
        run(&mut (0..=u32::MAX).step_by(97));
        run(&mut [
            0,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0xc2cf_f1b5,
            0xc2cf_f1b4,
            0xc2ae_ac50,
            0x3900_0000,
            0xb900_0001,
        ]
        .into_iter());
    }

    #[test]
    fn wide_square_root_is_the_correctly_rounded_one() {
        // Two whole binades (away from the range's ends, the guess and the
        // steps scale exactly every second binade), every subnormal, and a
        // stride through every other value of both signs, zeros,
        // infinities and NaNs.
        let one = 1.0f32.to_bits();
        (one..one + (2 << 23)).for_each(check);
        (0..1 << 23).for_each(check);
        (0..=u32::MAX).step_by(251).for_each(check);
        // The lowest normal binades and the highest, where a scaled guess
        // or a step could leave the range.
        (1 << 23..3 << 23).for_each(check);
        (0x7f00_0000..0x7f80_0000).for_each(check);
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
