//! How the negative is chosen among a query's candidates, one candidate at
//! a time, in one streaming pass.
//!
//! Every selector here sees each candidate's score once, in slot order, and
//! keeps O(m) state per query, so sampling never needs a batch x capacity
//! score matrix.
//!
//! - [`Retrieval::Gumbel`]: Gumbel-max. Each candidate's key is
//!   `inv_temp * c + G` with `G` a standard Gumbel variate; the candidate
//!   with the largest key is a draw from `softmax(inv_temp * c)`, and the m
//!   largest keys are m distinct draws without replacement (Gumbel-top-m).
//!   The (m+1)-th largest key is kept too: given it, each candidate's
//!   inclusion probability is known in closed form
//!   ([`inclusion_probability`]), which gives the loss its unbiased
//!   Horvitz-Thompson weights. One logarithm pair per candidate.
//! - [`Retrieval::ExpJump`]: the same distribution for m = 1 from a weighted
//!   reservoir that jumps (m > 1: m independent reservoirs over the same
//!   running sum, so m independent draws, with replacement). With `W_j`
//!   the running sum of weights `w = exp(inv_temp * c)`, the current pick, chosen at total `W_i`,
//!   survives past total `W_j` with probability `W_i / W_j` (that is what
//!   replacing with probability `w_j / W_j` at every step multiplies out
//!   to). So instead of a coin per candidate we draw `U ~ (0, 1)` once and
//!   replace at the first candidate where the running sum exceeds
//!   `W_i / U`. The expected number of draws is the sum of `w_j / W_j`,
//!   about `ln N` for equal weights. Weights are kept relative to the
//!   running maximum score, as in the log-sum-exp, so nothing overflows.
//! - [`Retrieval::MaxScore`]: the m highest-scoring candidates (ties to the
//!   lower slot index).
//! - [`Retrieval::Fixed`]: given per query (for verification).

use crate::math;

/// How negatives are chosen among the candidates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Retrieval<'a> {
    /// Gumbel-max sampling from `softmax(inv_temp * score)`; with m > 1
    /// negatives per query, Gumbel-top-m (m distinct candidates).
    Gumbel {
        /// Inverse temperature applied to the scores before sampling.
        inv_temp: f32,
    },
    /// The same distribution as `Gumbel` for one negative per query, by a
    /// jumping weighted reservoir that draws O(log N) random numbers per
    /// query instead of one per candidate. With m > 1 negatives per query:
    /// m independent reservoirs, so m independent draws (with replacement;
    /// a slot drawn twice is one negative of twice the weight).
    ExpJump {
        /// Inverse temperature applied to the scores before sampling.
        inv_temp: f32,
    },
    /// The highest-scoring candidates, no randomness.
    MaxScore,
    /// One given negative per query: a slot index without top-k, a
    /// candidate position `g < k` with top-k.
    Fixed(&'a [usize]),
}

impl Default for Retrieval<'_> {
    fn default() -> Self {
        Retrieval::ExpJump { inv_temp: 1.0 }
    }
}

/// An online log-sum-exp: `max + ln(sum)` over the values pushed so far,
/// kept as the pair so that softmax weights keep full precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogSumExp {
    /// The largest value pushed (`-inf` when empty).
    pub max: f32,
    /// The sum of `exp(value - max)`.
    pub sum: f32,
}

impl LogSumExp {
    /// No values yet.
    pub const EMPTY: Self = Self { max: f32::NEG_INFINITY, sum: 0.0 };

    /// Adds `c` (finite); returns the factor by which the earlier sum was
    /// rescaled (1 unless `c` is a new maximum).
    #[inline]
    pub fn push(&mut self, c: f32) -> f32 {
        if c > self.max {
            let scale = math::exp(self.max - c);
            self.sum = self.sum * scale + 1.0;
            self.max = c;
            scale
        } else {
            self.sum += math::exp(c - self.max);
            1.0
        }
    }

    /// Adds every value of `other`.
    #[inline]
    pub fn merge(&mut self, other: &LogSumExp) {
        if other.sum == 0.0 {
            return;
        }
        if other.max > self.max {
            self.sum = self.sum * math::exp(self.max - other.max) + other.sum;
            self.max = other.max;
        } else {
            self.sum += other.sum * math::exp(other.max - self.max);
        }
    }

    /// `exp(c) / sum of exp(values)`: the softmax weight of a value `c`.
    ///
    /// Computed as `exp(c - max) / sum` rather than `exp(c - lse)`: at
    /// large scores the rounding of `lse` itself (an ulp of 320 is 3e-5)
    /// would otherwise enter every weight.
    #[inline]
    pub fn weight(&self, c: f32) -> f32 {
        math::exp(c - self.max) / self.sum
    }

    /// `lse - c`, with the large parts cancelled first.
    #[inline]
    pub fn minus(&self, c: f32) -> f32 {
        (self.max - c) + math::ln(self.sum)
    }
}

/// Per-query selection state: the m best keys so far, their slots and
/// scores, and the largest key that did not make it.
///
/// `threshold` is the (m+1)-th largest key offered (`-inf` while at most m
/// were offered). For Gumbel-top-m it is the `tau` of priority sampling:
/// given `tau`, candidate `j` is among the m picks exactly when its key
/// `c'_j + G_j` exceeds `tau`, which has probability
/// `1 - exp(-exp(c'_j - tau))` (see [`inclusion_probability`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Picks<const NEG: usize> {
    pub(crate) keys: [f32; NEG],
    /// Each pick's score `c = alpha <q, e>` (before any temperature).
    pub(crate) scores: [f32; NEG],
    pub(crate) slots: [u32; NEG],
    pub(crate) len: usize,
    pub(crate) threshold: f32,
}

impl<const NEG: usize> Picks<NEG> {
    pub(crate) const EMPTY: Self = Self {
        keys: [f32::NEG_INFINITY; NEG],
        scores: [0.0; NEG],
        slots: [0; NEG],
        len: 0,
        threshold: f32::NEG_INFINITY,
    };

    /// Offers a candidate with selection key `key` and score `score`; keeps
    /// the `NEG` largest keys, an earlier candidate winning ties, and the
    /// largest key left out.
    #[inline]
    pub(crate) fn offer(&mut self, key: f32, score: f32, slot: u32) {
        if self.len == NEG {
            if key <= self.keys[NEG - 1] {
                if key > self.threshold {
                    self.threshold = key;
                }
                return;
            }
            // The evicted key was among the m largest, so it is at least
            // every key left out before it.
            self.threshold = self.keys[NEG - 1];
            self.len -= 1;
        }
        let mut pos = self.len;
        while pos > 0 && key > self.keys[pos - 1] {
            self.keys[pos] = self.keys[pos - 1];
            self.scores[pos] = self.scores[pos - 1];
            self.slots[pos] = self.slots[pos - 1];
            pos -= 1;
        }
        self.keys[pos] = key;
        self.scores[pos] = score;
        self.slots[pos] = slot;
        self.len += 1;
    }

    /// Sets pick `i` (an independent draw, or the one given) and counts
    /// it.
    #[inline]
    pub(crate) fn set_at(&mut self, i: usize, slot: u32, score: f32) {
        self.scores[i] = score;
        self.slots[i] = slot;
        if self.len <= i {
            self.len = i + 1;
        }
    }

    pub(crate) fn as_slice(&self) -> &[u32] {
        &self.slots[..self.len]
    }
}

/// Gumbel-top-m's inclusion probability of a candidate with sampling logit
/// `logit` given the threshold `tau` (the (m+1)-th largest key):
/// `P(logit + G > tau) = 1 - exp(-exp(logit - tau))` for a standard Gumbel
/// `G`; 1 when `tau = -inf` (fewer than m+1 candidates: all are taken).
///
/// Computed as `-expm1(-exp(logit - tau))`, which keeps full relative
/// precision when the probability is small.
#[inline]
pub fn inclusion_probability(logit: f32, tau: f32) -> f32 {
    if tau == f32::NEG_INFINITY {
        return 1.0;
    }
    -math::exp_m1(-math::exp(logit - tau))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lse_matches_closed_form() {
        let mut l = LogSumExp::EMPTY;
        for c in [1.0f32, 3.0, -2.0] {
            l.push(c);
        }
        let mut other = LogSumExp::EMPTY;
        other.push(3.0);
        l.merge(&other);
        let want = (1.0f64.exp() + 2.0 * 3.0f64.exp() + (-2.0f64).exp()).ln() as f32;
        approx::assert_relative_eq!(l.minus(0.0), want, max_relative = 1e-6);
        // The weight of 3 is e^3 / sum.
        let w = 3.0f64.exp() / (1.0f64.exp() + 2.0 * 3.0f64.exp() + (-2.0f64).exp());
        approx::assert_relative_eq!(l.weight(3.0), w as f32, max_relative = 1e-6);
        // At scores near 1000 the value is still exact to f32 precision.
        let mut big = LogSumExp::EMPTY;
        big.push(1000.0);
        big.push(1000.0);
        approx::assert_relative_eq!(big.minus(0.0), 1000.0 + core::f32::consts::LN_2, max_relative = 1e-6);
    }

    #[test]
    fn picks_keep_the_largest_with_ties_to_the_first() {
        let mut p = Picks::<3>::EMPTY;
        for (k, s) in [(1.0, 0), (5.0, 1), (3.0, 2), (5.0, 3), (0.5, 4), (4.0, 5)] {
            p.offer(k, -k, s);
        }
        assert_eq!(p.as_slice(), &[1, 3, 5]);
        assert_eq!(&p.scores[..3], &[-5.0, -5.0, -4.0]);
        // The largest key left out: 3 (slot 2, evicted by slot 5's 4).
        assert_eq!(p.threshold, 3.0);
        let mut one = Picks::<1>::EMPTY;
        for (k, s) in [(2.0, 7), (2.0, 8)] {
            one.offer(k, 0.0, s);
        }
        assert_eq!(one.as_slice(), &[7]);
        assert_eq!(one.threshold, 2.0);
        // With at most m candidates offered nothing is left out.
        let mut few = Picks::<3>::EMPTY;
        few.offer(1.0, 0.0, 0);
        few.offer(2.0, 0.0, 1);
        assert_eq!(few.threshold, f32::NEG_INFINITY);
    }

    #[test]
    fn inclusion_probability_matches_the_gumbel_tail() {
        // P(c + G > tau) = 1 - exp(-exp(c - tau)), in f64 as the reference.
        for (c, tau) in [(0.0f32, 0.0f32), (1.5, -0.5), (-3.0, 4.0), (-20.0, 5.0), (10.0, -1.0)] {
            let want = 1.0 - (-((c as f64) - (tau as f64)).exp()).exp();
            approx::assert_relative_eq!(inclusion_probability(c, tau) as f64, want, max_relative = 1e-6);
        }
        // Tiny probabilities keep their relative precision: e^-25 ~ 1.4e-11.
        let want = (-25.0f64).exp() * (1.0 - 0.5 * (-25.0f64).exp());
        approx::assert_relative_eq!(inclusion_probability(0.0, 25.0) as f64, want, max_relative = 1e-6);
        assert_eq!(inclusion_probability(-3.0, f32::NEG_INFINITY), 1.0);
    }
}
