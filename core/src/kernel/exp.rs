//! The pass's `exp`: [`exp_le0`], `e^x` for `x <= 0` in basic IEEE
//! arithmetic, the same bits on every target.

/// Lower clamp of [`exp_le0`]'s argument: below it the result is 0.
const EXP_LO: f32 = -88.0;

/// `e^x` for `x <= 0`, in plain IEEE single-precision arithmetic.
///
/// Range reduction `x = n ln 2 + r` (`n` by the round-to-nearest of
/// `x log2 e`, Cody-Waite two-part `ln 2`, `|r| <= ~0.35`), Cephes' degree-6
/// polynomial for `e^r`, and `2^n` built from its exponent bits. Every
/// operation is a basic IEEE operation (no FMA, no libm), so the result is
/// the same on every target, and the function vectorises.
///
/// Accuracy: at most 2 ulp from the correctly rounded `e^x` for
/// `x` in `[-87.3, 0]` (the test `exp_is_within_two_ulp` checks 2^24 evenly
/// spread arguments against `f64`); `exp_le0(0) == 1` exactly. Results
/// below `2^-126` (`x < -87.3`) may lose precision as subnormals and are
/// flushed to 0 below `x ~ -87.7`; positive arguments are treated as 0 and
/// NaN as `-inf` (result 0). In the pass, arguments are
/// `score - running max <= 0`, so a weight that is flushed is below
/// `1e-38` times the largest weight.
#[inline(always)]
pub fn exp_le0(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds to an integer (ties to even).
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // `x > EXP_LO` is false for NaN, so NaN becomes EXP_LO.
    let x = if x > EXP_LO { x } else { EXP_LO };
    let x = if x < 0.0 { x } else { 0.0 };
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    // t's low mantissa bits hold n + 2^22; n + 127 in [0, 127] is the
    // biased exponent of 2^n (0 gives +0.0, which flushes the result).
    let biased = t.to_bits().wrapping_sub(0x4B40_0000u32.wrapping_sub(127));
    let scale = f32::from_bits(biased << 23);
    let r = x - n * LN2_HI;
    let r = r - n * LN2_LO;
    let z = r * r;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * z + r + 1.0;
    y * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulp_distance(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp() {
        assert_eq!(exp_le0(0.0), 1.0);
        assert_eq!(exp_le0(-0.0), 1.0);
        assert_eq!(exp_le0(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_le0(f32::NAN), 0.0);
        assert_eq!(exp_le0(-200.0), 0.0);
        assert_eq!(exp_le0(3.0), 1.0);
        let mut worst = 0;
        let n = 1 << 24;
        let lo = -87.3f64;
        for i in 0..=n {
            let x = (lo * i as f64 / n as f64) as f32;
            let want = libm::exp(x as f64) as f32;
            let d = ulp_distance(exp_le0(x), want);
            worst = worst.max(d);
        }
        // Also every float in [-1, 0] with exponent >= -20 sampled densely.
        let mut x = -1.0f32;
        while x < -1e-6 {
            let want = libm::exp(x as f64) as f32;
            worst = worst.max(ulp_distance(exp_le0(x), want));
            x = f32::from_bits(x.to_bits() - 97);
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }
}
