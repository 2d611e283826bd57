//! Random variates from a caller-supplied [`RngCore`].
//!
//! Nothing in the crate holds a generator: every function that needs
//! randomness takes `&mut impl RngCore`, so a run is reproducible from the
//! seed the caller chose.

use rand_core::RngCore;

use crate::math;

/// A uniform number in the open interval (0, 1).
///
/// It takes 23 random bits `x` and returns `(2x + 1) / 2^24`, which is exact
/// in f32, never 0 and never 1, so logarithms of it and of `1 - u` are
/// finite.
#[inline]
pub fn open01(rng: &mut impl RngCore) -> f32 {
    let x = rng.next_u32() >> 9; // 23 bits
    ((2 * x + 1) as f32) * (1.0 / 16_777_216.0)
}

/// A standard exponential variate, Exp(1).
#[inline]
pub fn exponential(rng: &mut impl RngCore) -> f32 {
    -math::ln(open01(rng))
}

/// A standard Gumbel variate: `-ln(E)` with `E ~ Exp(1)`.
///
/// `E` is computed as `-ln(1 - v)` through `ln_1p`, which keeps full
/// relative precision for small `E`, that is, in the upper tail of the
/// Gumbel variate, the tail that decides an argmax.
#[inline]
pub fn gumbel(rng: &mut impl RngCore) -> f32 {
    let v = open01(rng);
    let e = -math::ln_1p(-v);
    -math::ln(e)
}

/// A uniform index in `0..n` (`n > 0`), by rejection, without bias.
#[inline]
pub fn below(rng: &mut impl RngCore, n: u32) -> u32 {
    debug_assert!(n > 0);
    let zone = u32::MAX - (u32::MAX - n + 1) % n;
    loop {
        let x = rng.next_u32();
        if x <= zone {
            return x % n;
        }
    }
}

/// A standard normal variate (Box-Muller; one of the pair is dropped).
#[inline]
pub fn normal(rng: &mut impl RngCore) -> f32 {
    let u = open01(rng);
    let v = open01(rng);
    math::sqrt(-2.0 * math::ln(u)) * libm::cosf(core::f32::consts::TAU * v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    #[test]
    fn uniform_is_open_and_centred() {
        let mut rng = rand_pcg::Pcg32::seed_from_u64(1);
        let mut sum = 0.0f64;
        for _ in 0..100_000 {
            let u = open01(&mut rng);
            assert!(u > 0.0 && u < 1.0);
            sum += u as f64;
        }
        // The mean of 1e5 uniforms has standard error 0.0009.
        assert!((sum / 1e5 - 0.5).abs() < 0.005);
    }

    #[test]
    fn gumbel_has_the_right_mean() {
        // The Gumbel mean is the Euler-Mascheroni constant 0.5772; its
        // variance is pi^2/6, so the mean of 1e5 draws has s.e. 0.004.
        let mut rng = rand_pcg::Pcg32::seed_from_u64(2);
        let mut sum = 0.0f64;
        for _ in 0..100_000 {
            let g = gumbel(&mut rng);
            assert!(g.is_finite());
            sum += g as f64;
        }
        assert!((sum / 1e5 - 0.577_215_66).abs() < 0.02);
    }

    #[test]
    fn below_is_in_range() {
        let mut rng = rand_pcg::Pcg32::seed_from_u64(3);
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            seen[below(&mut rng, 7) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 850 && c < 1150), "{seen:?}");
    }
}
