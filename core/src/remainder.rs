//! Exact in-batch terms plus a sampled cache remainder: the softmax over the
//! batch's positives (fresh, exact) and the cache (stale, sampled).
//!
//! For query `b` the candidates are every positive of the batch, `p_j`
//! (its own `p_b` is the target; another query's positive equal to its own
//! is an accidental hit and left out when items are given), and every cache
//! slot not holding a batch item. With `s_bj = alpha <q_b, p_j>` and the
//! cache's log-sum-exp `C_b` over its (stale) scores,
//!
//! ```text
//! Z_b      = sum_j exp(s_bj) + exp(C_b)
//! pi_bj    = exp(s_bj) / Z_b           (in-batch probabilities, exact)
//! M_b      = exp(C_b) / Z_b            (the cache's share, the remainder)
//! loss_b   = log Z_b - s_bb            (the cross-entropy)
//! ```
//!
//! The gradient of `loss_b` needs `sum_k P_bk f_k`, the cache softmax mean
//! of the fresh item embeddings, which the negatives drawn from the cache
//! estimate without bias: `sum_i w_bi f_bi` (one draw from the cache
//! softmax has weight 1; [`crate::CacheLoss::negative_weights`] gives the
//! weights of tempered and several draws). So, for the batch mean
//! `L = (1/B) sum_b loss_b`,
//!
//! ```text
//! dL/dq_b  = alpha/B (sum_j pi_bj p_j - p_b + M_b sum_i w_bi f_bi)
//! dL/dp_j  = alpha/B (sum_b pi_bj q_b - q_j)
//! dL/df_bi = alpha/B M_b w_bi q_b
//! dL/dalpha = 1/B sum_b (sum_j pi_bj <q_b, p_j> - <q_b, p_b> + M_b sum_i w_bi <q_b, f_bi>)
//! ```
//!
//! whose expectation over the draw is the exact gradient of this softmax
//! (with the cache's probabilities from its stored scores, as in the
//! paper). With a control variate (see [`crate::loss`]), the query's cache
//! term becomes `M_b (beta sum_i w_bi (f_bi - e_bi) + e_bar_b)`, with the
//! drawn slots' stale rows `e_bi` and the cache softmax mean of the stale
//! rows `e_bar_b`. The B in-batch terms cost `B^2 D` multiply-adds and no
//! tower evaluation: the positives are embedded anyway.

use crate::error::{check_len, Error, Result};
use crate::sampler::LogSumExp;
use crate::vector::{self, dot};

/// The cache's side of the remainder for a batch.
#[derive(Debug, Clone, Copy)]
pub struct CacheSide<'a, const DIM: usize> {
    /// Per query: the log-sum-exp of its cache candidates' scores
    /// ([`LogSumExp::EMPTY`] when it has none).
    pub lse: &'a [LogSumExp],
    /// `neg` rows per query: the drawn negatives' fresh embeddings (row
    /// `b * neg + i`).
    pub fresh: &'a [[f32; DIM]],
    /// The draws' weights, laid out as `fresh`; 0 for rows past a query's
    /// draws.
    pub weights: &'a [f32],
    /// A query-side control variate.
    pub control: Option<Control<'a, DIM>>,
}

/// The control variate of the query's cache term.
#[derive(Debug, Clone, Copy)]
pub struct Control<'a, const DIM: usize> {
    /// beta in [0, 1]: 1 unbiased, 0 the memory-bank estimator.
    pub beta: f32,
    /// The drawn slots' stale rows, laid out as [`CacheSide::fresh`].
    pub stale: &'a [[f32; DIM]],
    /// Per query, the cache softmax mean of the stale rows.
    pub mean: &'a [[f32; DIM]],
}

/// Where the gradients of the batch mean go (overwritten).
#[derive(Debug)]
pub struct RemainderGrads<'a, const DIM: usize> {
    /// d L / d q_b.
    pub query: &'a mut [[f32; DIM]],
    /// d L / d p_j.
    pub positive: &'a mut [[f32; DIM]],
    /// d L / d f_bi, laid out as [`CacheSide::fresh`].
    pub negative: &'a mut [[f32; DIM]],
}

/// Batch means.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RemainderSummary {
    /// Mean cross-entropy `log Z_b - s_bb`.
    pub loss: f32,
    /// Mean probability of the positive.
    pub prob_pos: f32,
    /// Mean cache share `M_b`.
    pub cache_mass: f32,
    /// d L / d alpha.
    pub grad_scale: f32,
}

/// Which queries of a batch a call holds: the queries of one process of a
/// distributed run see every positive of the global batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPart {
    /// The index among the positives of the first query's own positive:
    /// query `b`'s is `positives[first + b]`.
    pub first: usize,
    /// The number of queries of the whole batch, the normaliser of its
    /// mean (at least the queries given).
    pub batch: usize,
}

impl BatchPart {
    /// A whole batch of `batch` queries, query `b`'s positive at `b`.
    pub const fn whole(batch: usize) -> Self {
        Self { first: 0, batch }
    }
}

/// Computes the loss and gradients above. `items` (optional) are the
/// positives' identities, for leaving accidental hits out; `neg` is the
/// number of rows per query in `cache.fresh`.
///
/// # Errors
/// Mismatched lengths, or non-finite embeddings or scale.
pub fn in_batch_with_remainder<I: PartialEq, const DIM: usize>(
    queries: &[[f32; DIM]],
    positives: &[[f32; DIM]],
    items: Option<&[I]>,
    alpha: f32,
    neg: usize,
    cache: CacheSide<'_, DIM>,
    grads: RemainderGrads<'_, DIM>,
) -> Result<RemainderSummary> {
    check_len("positives", queries.len(), positives.len())?;
    let part = BatchPart::whole(queries.len());
    in_batch_part_with_remainder(queries, positives, items, alpha, neg, part, cache, grads)
}

/// [`in_batch_with_remainder`] for some of a batch's queries: every
/// positive of the batch enters each query's softmax, query `b`'s own is
/// `positives[part.first + b]`, and the figures and gradients are those of
/// the mean over `part.batch` queries, so that the parts' results sum to
/// the whole batch's. `grads.positive` has a row per positive, this part's
/// share of its gradient. Called with [`BatchPart::whole`] it is
/// [`in_batch_with_remainder`], operation for operation.
///
/// # Errors
/// As [`in_batch_with_remainder`], and a part that does not fit the
/// positives or the batch.
#[allow(clippy::too_many_arguments)]
pub fn in_batch_part_with_remainder<I: PartialEq, const DIM: usize>(
    queries: &[[f32; DIM]],
    positives: &[[f32; DIM]],
    items: Option<&[I]>,
    alpha: f32,
    neg: usize,
    part: BatchPart,
    cache: CacheSide<'_, DIM>,
    grads: RemainderGrads<'_, DIM>,
) -> Result<RemainderSummary> {
    let bsz = queries.len();
    let total = bsz.checked_mul(neg).ok_or(Error::CapacityExceeded { requested: usize::MAX, capacity: bsz })?;
    check_len("negative weights", total, cache.weights.len())?;
    let terms = OwnDraws { lse: cache.lse, weights: cache.weights, neg };
    remainder(queries, positives, items, alpha, total, part, cache, terms, grads)
}

/// The draws of a whole batch, each used by every query: see
/// [`in_batch_with_shared_draws`].
#[derive(Debug)]
pub struct SharedDraws<'a, const DIM: usize> {
    /// The drawn slots' stale rows, as the scoring pass read them: query
    /// `b`'s `neg` rows at `b * neg ..`, laid out as [`CacheSide::fresh`].
    pub stale: &'a [[f32; DIM]],
    /// Per row, the share of its query's `m` independent draws that fell on
    /// it (`k / m` for a slot drawn `k` times; 1 for a single draw; 0 for a
    /// row past the query's draws).
    pub shares: &'a [f32],
    /// Every query of the batch, in order (the queries given when the call
    /// holds the whole batch): the expected counts sum over all of them.
    pub batch_queries: &'a [[f32; DIM]],
    /// Per query of `batch_queries`, the log-sum-exp of its sampling logits
    /// `inv_temp * alpha <q_b, e_j>` over its candidates (the scores' own
    /// log-sum-exp when `inv_temp` is 1).
    pub sample_lse: &'a [LogSumExp],
    /// The inverse temperature the draws were made at.
    pub inv_temp: f32,
    /// Correct the stale scores with the fresh ones (see
    /// [`in_batch_with_shared_draws`]).
    pub fresh_scores: bool,
    /// Working memory: three floats per row.
    pub counts: &'a mut [[f32; 3]],
    /// Working memory: one log-sum-exp per query given.
    pub lse: &'a mut [LogSumExp],
}

/// [`in_batch_with_remainder`] with every query's cache share estimated
/// from the draws of the whole batch instead of its own draws alone.
///
/// Query `b'` made `m` independent draws, each of slot `j` with
/// probability `rho_b'j` (its sampling softmax), so slot `j` is expected
/// `m c_j` times among the batch's draws, `c_j = sum_b' rho_b'j`. A row
/// holding slot `j` drawn `k` times by its query has share `s = k / m`;
/// weighting it for query `b` by `w_b = s P_bj / c_j` (`P_b` query `b`'s
/// cache softmax, from the stale scores) gives
/// `E[sum_rows w_b f] = sum_j P_bj f_j`: the Hansen-Hurwitz estimator of
/// the cache softmax mean, unbiased for each query, with `B m` fresh
/// negatives per query for the tower evaluations of `m`. Since
/// `c_j >= P_bj` at inverse temperature 1, no weight exceeds the share:
/// a query's own draws are never weighted above what they have alone.
/// Every slot a query can draw must be a candidate for every query (the
/// trainer's shared-draw objective hides the batch's items from all of them; with
/// accidental-hit masking alone, a query's own positive would be drawn by
/// others but never weighted).
///
/// `cache.weights` is ignored and replaced by the above; `cache.fresh`,
/// `shared.stale`, `shared.shares` and `shared.counts` have one entry per
/// row.
///
/// With `fresh_scores`, the draws also correct the cache's stale scores:
/// the cache's share `exp(C_b)` becomes `exp(C_b) S_b` with
/// `S_b = sum_k w_bk r_bk`, `r_bk = exp(alpha <q_b, f_k> - alpha <q_b, e_k>)`
/// (an unbiased estimate of the cache's sum of fresh exponentials, since
/// the draws come from the stale softmax), and the draws' weights become
/// `w_bk r_bk / S_b`: self-normalised importance sampling of the fresh
/// softmax with the stale one as proposal. It is consistent rather than
/// unbiased (the normalisation by `S_b` is random even when fresh =
/// stale), costs `B^2 m D` more multiply-adds, and takes no control
/// variate. With a single candidate it is exact: the fresh softmax.
///
/// # Errors
/// As [`in_batch_with_remainder`], and mismatched lengths of `shared`.
pub fn in_batch_with_shared_draws<I: PartialEq, const DIM: usize>(
    queries: &[[f32; DIM]],
    positives: &[[f32; DIM]],
    items: Option<&[I]>,
    alpha: f32,
    cache: CacheSide<'_, DIM>,
    shared: SharedDraws<'_, DIM>,
    grads: RemainderGrads<'_, DIM>,
) -> Result<RemainderSummary> {
    check_len("positives", queries.len(), positives.len())?;
    let part = BatchPart::whole(queries.len());
    in_batch_part_with_shared_draws(queries, positives, items, alpha, part, cache, shared, grads)
}

/// [`in_batch_with_shared_draws`] for some of a batch's queries, as
/// [`in_batch_part_with_remainder`] is for [`in_batch_with_remainder`]:
/// `queries` are the part's, `cache.lse` and `shared.lse` have one entry per
/// query of the part, and every row (the whole batch's draws, in query
/// order) enters each query's estimate. `grads.negative` gets this part's
/// share of each row's gradient, so the parts' gradients sum to the whole
/// batch's. The expected counts use every query of the batch
/// (`shared.batch_queries`), and come out the same in every part. Called
/// with [`BatchPart::whole`] it is [`in_batch_with_shared_draws`].
///
/// # Errors
/// As [`in_batch_with_shared_draws`], and a part that does not fit the
/// positives or the batch.
#[allow(clippy::too_many_arguments)]
pub fn in_batch_part_with_shared_draws<I: PartialEq, const DIM: usize>(
    queries: &[[f32; DIM]],
    positives: &[[f32; DIM]],
    items: Option<&[I]>,
    alpha: f32,
    part: BatchPart,
    cache: CacheSide<'_, DIM>,
    shared: SharedDraws<'_, DIM>,
    grads: RemainderGrads<'_, DIM>,
) -> Result<RemainderSummary> {
    let bsz = queries.len();
    let rows = shared.stale.len();
    check_len("batch queries", part.batch, shared.batch_queries.len())?;
    check_len("cache log-sum-exp", bsz, cache.lse.len())?;
    check_len("draw shares", rows, shared.shares.len())?;
    check_len("sampling log-sum-exp", part.batch, shared.sample_lse.len())?;
    check_len("draw counts", rows, shared.counts.len())?;
    check_len("corrected log-sum-exp", bsz, shared.lse.len())?;
    if !(shared.inv_temp.is_finite()
        && shared.inv_temp >= 0.0
        && vector::rows_finite(shared.stale)
        && vector::rows_finite(shared.batch_queries)
        && shared.shares.iter().all(|s| (0.0..=1.0).contains(s)))
    {
        return Err(Error::NonFinite { what: "shared draws" });
    }
    if shared.fresh_scores && cache.control.is_some() {
        return Err(Error::InvalidConfig { what: "fresh-score correction takes no control variate" });
    }
    check_len("fresh negatives", rows, cache.fresh.len())?;
    // Expected counts per draw: c_k = sum_b' rho_b'(j_k), over the batch.
    let (all, sample_lse) = (shared.batch_queries, shared.sample_lse);
    for (k, c) in shared.counts.iter_mut().enumerate() {
        c[0] = if shared.shares[k] > 0.0 {
            (0..all.len())
                .filter(|&b| sample_lse[b].sum > 0.0)
                .map(|b| sample_lse[b].weight(shared.inv_temp * (alpha * dot(&all[b], &shared.stale[k]))))
                .sum()
        } else {
            0.0
        };
    }
    let terms = SharedRows {
        queries,
        stale: shared.stale,
        fresh: cache.fresh,
        shares: shared.shares,
        lse: cache.lse,
        alpha,
        fresh_scores: shared.fresh_scores,
        rows: shared.counts,
        corrected: shared.lse,
    };
    remainder(queries, positives, items, alpha, rows, part, cache, terms, grads)
}

/// Which draws enter each query's cache term, and with what weight.
trait CacheTerms {
    /// The rows of query `b`'s cache term.
    fn rows(&self, b: usize) -> core::ops::Range<usize>;
    /// Prepares query `b`'s weights (called once per query, in order,
    /// before [`Self::weight`]) and returns the log-sum-exp of its cache
    /// share.
    fn begin(&mut self, b: usize) -> LogSumExp;
    /// Row `k`'s weight in query `b`'s term.
    fn weight(&self, b: usize, k: usize) -> f32;
}

/// Each query's own draws, `neg` rows each, with given weights.
struct OwnDraws<'a> {
    lse: &'a [LogSumExp],
    weights: &'a [f32],
    neg: usize,
}

impl CacheTerms for OwnDraws<'_> {
    fn rows(&self, b: usize) -> core::ops::Range<usize> {
        b * self.neg..(b + 1) * self.neg
    }
    fn begin(&mut self, b: usize) -> LogSumExp {
        self.lse[b]
    }
    fn weight(&self, _: usize, k: usize) -> f32 {
        self.weights[k]
    }
}

/// The whole batch's draws for every query, with Hansen-Hurwitz weights
/// (see [`in_batch_with_shared_draws`]). Per row, `rows` holds the
/// expected count `c_k` and, for the query being prepared, its weight and
/// (with fresh scores) its log-ratio: each score is computed once per
/// query and row.
struct SharedRows<'a, 'b, const DIM: usize> {
    queries: &'a [[f32; DIM]],
    stale: &'a [[f32; DIM]],
    fresh: &'a [[f32; DIM]],
    shares: &'a [f32],
    lse: &'a [LogSumExp],
    alpha: f32,
    fresh_scores: bool,
    rows: &'b mut [[f32; 3]],
    corrected: &'b mut [LogSumExp],
}

impl<const DIM: usize> CacheTerms for SharedRows<'_, '_, DIM> {
    fn rows(&self, _: usize) -> core::ops::Range<usize> {
        0..self.rows.len()
    }

    fn begin(&mut self, b: usize) -> LogSumExp {
        let (q, alpha, lse) = (&self.queries[b], self.alpha, self.lse[b]);
        // The stale weight w_bk = share P_b(j_k) / c_k.
        for (k, r) in self.rows.iter_mut().enumerate() {
            let (share, count) = (self.shares[k], r[0]);
            if share <= 0.0 || lse.sum <= 0.0 || count <= 0.0 {
                r[1] = 0.0;
                continue;
            }
            let score = alpha * dot(q, &self.stale[k]);
            r[1] = share * lse.weight(score) / count;
            if self.fresh_scores && r[1] != 0.0 {
                r[2] = alpha * dot(q, &self.fresh[k]) - score;
            }
        }
        if !self.fresh_scores {
            return lse;
        }
        // r_bk relative to the query's largest ratio, so that no exp
        // overflows; the shift cancels in the weights and moves into the
        // log-sum-exp. Rows of weight 0 are skipped, not multiplied by 0: a
        // row past a query's draws may hold anything finite, and its ratio
        // could overflow.
        let live = || self.rows.iter().filter(|r| r[1] > 0.0);
        let m = live().map(|r| r[2]).fold(f32::NEG_INFINITY, f32::max);
        let s: f32 = if m.is_finite() {
            self.rows.iter().map(|r| if r[1] == 0.0 { 0.0 } else { r[1] * crate::math::exp(r[2] - m) }).sum()
        } else {
            0.0
        };
        let corrected =
            if s > 0.0 && lse.sum > 0.0 { LogSumExp { max: lse.max + m, sum: lse.sum * s } } else { LogSumExp::EMPTY };
        self.corrected[b] = corrected;
        // The fresh weight w r / S = w exp(log r - m) / s, with
        // s = corrected.sum / lse.sum.
        let shift = corrected.max - lse.max;
        for r in self.rows.iter_mut() {
            r[1] = if r[1] == 0.0 || corrected.sum <= 0.0 {
                0.0
            } else {
                r[1] * crate::math::exp(r[2] - shift) * lse.sum / corrected.sum
            };
        }
        corrected
    }

    fn weight(&self, _: usize, k: usize) -> f32 {
        self.rows[k][1]
    }
}

/// The shared body of the estimators: the exact in-batch softmax, and the
/// cache term `M_b sum_{k in rows(b)} weight(b, k) f_k`.
#[allow(clippy::too_many_arguments)]
fn remainder<I: PartialEq, const DIM: usize>(
    queries: &[[f32; DIM]],
    positives: &[[f32; DIM]],
    items: Option<&[I]>,
    alpha: f32,
    total: usize,
    part: BatchPart,
    cache: CacheSide<'_, DIM>,
    mut terms: impl CacheTerms,
    grads: RemainderGrads<'_, DIM>,
) -> Result<RemainderSummary> {
    let bsz = queries.len();
    let np = positives.len();
    let first = part.first;
    if first.checked_add(bsz).is_none_or(|end| end > np) || part.batch < bsz {
        return Err(Error::InvalidConfig { what: "a batch part must fit its positives and its batch" });
    }
    if let Some(ids) = items {
        check_len("positive items", np, ids.len())?;
    }
    check_len("cache log-sum-exp", bsz, cache.lse.len())?;
    check_len("fresh negatives", total, cache.fresh.len())?;
    if let Some(Control { beta, stale, mean }) = cache.control {
        if !(0.0..=1.0).contains(&beta) {
            return Err(Error::InvalidConfig { what: "control variate beta must be in [0, 1]" });
        }
        check_len("stale negatives", total, stale.len())?;
        check_len("candidate means", bsz, mean.len())?;
    }
    check_len("query gradient", bsz, grads.query.len())?;
    check_len("positive gradient", np, grads.positive.len())?;
    check_len("negative gradient", total, grads.negative.len())?;
    if !alpha.is_finite() {
        return Err(Error::NonFinite { what: "score scale" });
    }
    if !vector::rows_finite(queries) || !vector::rows_finite(positives) || !vector::rows_finite(cache.fresh) {
        return Err(Error::NonFinite { what: "embedding" });
    }
    let hit = |b: usize, j: usize| j != first + b && items.is_some_and(|ids| ids[j] == ids[first + b]);
    let inv_b = if part.batch > 0 { 1.0 / part.batch as f32 } else { 0.0 };
    let c = alpha * inv_b;
    grads.positive.iter_mut().for_each(|g| *g = [0.0; DIM]);
    grads.negative.iter_mut().for_each(|g| *g = [0.0; DIM]);
    let mut sum = RemainderSummary::default();
    for b in 0..bsz {
        let q = &queries[b];
        let mine = first + b;
        let own = alpha * dot(q, &positives[mine]);
        let mut z = LogSumExp::EMPTY;
        for (j, p) in positives.iter().enumerate() {
            if !hit(b, j) {
                z.push(alpha * dot(q, p));
            }
        }
        let rest = terms.begin(b);
        z.merge(&rest);
        let mass = if rest.sum > 0.0 { rest.sum * z.weight(rest.max) } else { 0.0 };
        sum.loss += z.minus(own);
        let prob_pos = z.weight(own);
        sum.prob_pos += prob_pos;
        sum.cache_mass += mass;

        // In-batch terms, exact.
        let gq = &mut grads.query[b];
        *gq = [0.0; DIM];
        let mut scale_grad = -dot(q, &positives[mine]);
        for (j, p) in positives.iter().enumerate() {
            if hit(b, j) {
                continue;
            }
            let d = dot(q, p);
            let pi = z.weight(alpha * d);
            vector::axpy(c * pi, p, gq);
            vector::axpy(c * pi, q, &mut grads.positive[j]);
            scale_grad += pi * d;
        }
        vector::axpy(-c, &positives[mine], gq);
        vector::axpy(-c, q, &mut grads.positive[mine]);

        // The cache remainder, sampled.
        for k in terms.rows(b) {
            let w = terms.weight(b, k);
            if w == 0.0 {
                // An unweighted row adds nothing (and may hold anything
                // finite, whose products could overflow).
                continue;
            }
            let f = &cache.fresh[k];
            scale_grad += mass * w * dot(q, f);
            vector::axpy(c * mass * w, q, &mut grads.negative[k]);
            match cache.control {
                None => vector::axpy(c * mass * w, f, gq),
                Some(Control { beta, stale, .. }) => {
                    let wb = c * mass * beta * w;
                    vector::axpy(wb, f, gq);
                    vector::axpy(-wb, &stale[k], gq);
                }
            }
        }
        if let Some(Control { mean, .. }) = cache.control {
            vector::axpy(c * mass, &mean[b], gq);
        }
        sum.grad_scale += scale_grad;
    }
    sum.loss *= inv_b;
    sum.prob_pos *= inv_b;
    sum.cache_mass *= inv_b;
    sum.grad_scale *= inv_b;
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;
    use rand_pcg::Pcg64Mcg;

    const D: usize = 3;

    fn rows<const N: usize>(r: &mut Pcg64Mcg) -> [[f32; D]; N] {
        core::array::from_fn(|_| core::array::from_fn(|_| crate::random::normal(r) * 0.7))
    }

    type CacheSoftmax = ([LogSumExp; 3], [[f32; D]; 3], [[f64; 5]; 3]);

    /// Per query, the cache's log-sum-exp, the softmax mean of its rows and
    /// each row's probability (the draw's distribution).
    fn cache_softmax(q: &[[f32; D]; 3], cache: &[[f32; D]; 5], alpha: f32) -> CacheSoftmax {
        let (mut lse, mut mean, mut probs) = ([LogSumExp::EMPTY; 3], [[0.0f32; D]; 3], [[0.0f64; 5]; 3]);
        for b in 0..3 {
            for e in cache {
                lse[b].push(alpha * dot(&q[b], e));
            }
            for (k, e) in cache.iter().enumerate() {
                probs[b][k] = f64::from(lse[b].weight(alpha * dot(&q[b], e)));
                vector::axpy(probs[b][k] as f32, e, &mut mean[b]);
            }
        }
        (lse, mean, probs)
    }

    type Exact = (f64, [[f64; D]; 3], [[f64; D]; 3], [[f64; D]; 5]);

    /// The exact softmax over {batch positives} and {cache rows}, in f64:
    /// (mean loss, d/dq, d/dp, d/d(cache row)).
    fn exact(q: &[[f32; D]; 3], p: &[[f32; D]; 3], cache: &[[f32; D]; 5], alpha: f64) -> Exact {
        let d64 = |x: &[f32; D], y: &[f32; D]| (0..D).map(|i| f64::from(x[i]) * f64::from(y[i])).sum::<f64>();
        let (mut loss, mut gq, mut gp, mut gc) = (0.0, [[0.0; D]; 3], [[0.0; D]; 3], [[0.0; D]; 5]);
        for b in 0..3 {
            let row = |j: usize| if j < 3 { &p[j] } else { &cache[j - 3] };
            let logits: [f64; 8] = core::array::from_fn(|j| alpha * d64(&q[b], row(j)));
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            loss += (z.ln() + m - logits[b]) / 3.0;
            for (j, l) in logits.iter().enumerate() {
                let pi = (l - m).exp() / z - if j == b { 1.0 } else { 0.0 };
                for i in 0..D {
                    gq[b][i] += alpha * pi * f64::from(row(j)[i]) / 3.0;
                    let g = alpha * pi * f64::from(q[b][i]) / 3.0;
                    if j < 3 {
                        gp[j][i] += g;
                    } else {
                        gc[j - 3][i] += g;
                    }
                }
            }
        }
        (loss, gq, gp, gc)
    }

    type Grads = ([[f32; D]; 3], [[f32; D]; 3], [[f32; D]; 3]);

    /// The expectation of (loss, d/dq, d/dp, d/d(cache row)) over every
    /// combination of one draw per query (`prob[b][k]`: query `b` draws row
    /// `k`), given the estimator's output for each combination; checks it
    /// against `want` to 1e-5.
    fn check_expectation(
        prob: &[[f64; 5]; 3],
        want: &Exact,
        what: &dyn core::fmt::Debug,
        run: impl Fn([usize; 3], &mut Grads) -> f32,
    ) {
        let (mut eq, mut ep, mut ec) = ([[0.0f64; D]; 3], [[0.0f64; D]; 3], [[0.0f64; D]; 5]);
        let mut e_loss = 0.0;
        for draw in 0..125usize {
            let pick = [draw % 5, (draw / 5) % 5, draw / 25];
            let pr: f64 = (0..3).map(|b| prob[b][pick[b]]).product();
            let mut g: Grads = ([[0.0; D]; 3], [[0.0; D]; 3], [[0.0; D]; 3]);
            e_loss += pr * f64::from(run(pick, &mut g));
            for b in 0..3 {
                for i in 0..D {
                    eq[b][i] += pr * f64::from(g.0[b][i]);
                    ep[b][i] += pr * f64::from(g.1[b][i]);
                    ec[pick[b]][i] += pr * f64::from(g.2[b][i]);
                }
            }
        }
        let (want_loss, want_q, want_p, want_c) = want;
        assert!((e_loss - want_loss).abs() < 1e-5, "{what:?}: loss {e_loss} against {want_loss}");
        for (got, want) in [(&eq[..], &want_q[..]), (&ep[..], &want_p[..]), (&ec[..], &want_c[..])] {
            for (g, w) in got.iter().zip(want) {
                for i in 0..D {
                    assert!((g[i] - w[i]).abs() < 1e-5, "{what:?}: {g:?} against {w:?}");
                }
            }
        }
    }

    /// With stale = fresh, the expectation over one exact draw from the
    /// cache softmax equals the exact softmax gradient: enumerate the draws,
    /// each with its probability, through the function's fixed-draw form.
    #[test]
    fn expected_gradient_is_the_exact_softmax_gradient() {
        let mut r = Pcg64Mcg::seed_from_u64(11);
        let q: [[f32; D]; 3] = rows(&mut r);
        let p: [[f32; D]; 3] = rows(&mut r);
        let cache: [[f32; D]; 5] = rows(&mut r);
        let alpha = 2.5f32;
        let want = exact(&q, &p, &cache, f64::from(alpha));
        for control in [None, Some(1.0f32), Some(0.0)] {
            let (lse, mean, probs) = cache_softmax(&q, &cache, alpha);
            check_expectation(&probs, &want, &control, |pick, (gq, gp, gn)| {
                let fresh: [[f32; D]; 3] = core::array::from_fn(|b| cache[pick[b]]);
                let side = CacheSide {
                    lse: &lse,
                    fresh: &fresh,
                    weights: &[1.0; 3],
                    control: control.map(|beta| Control { beta, stale: &fresh[..], mean: &mean[..] }),
                };
                let grads = RemainderGrads { query: gq, positive: gp, negative: gn };
                in_batch_with_remainder::<u32, D>(&q, &p, None, alpha, 1, side, grads).unwrap().loss
            });
        }
    }

    /// With stale rows that differ from the fresh ones, the expected query
    /// gradient under the control variate is the closed form
    /// `alpha/B (sum_j pi_j p_j - p_b + M (beta sum_k P_k (f_k - e_k) + e_bar))`
    /// (P from the stale scores, as the draw), so beta 1 is unbiased for the
    /// fresh mean `sum_k P_k f_k` and beta 0 is the stale mean.
    #[test]
    fn control_variate_with_stale_rows_has_the_closed_form_expectation() {
        let mut r = Pcg64Mcg::seed_from_u64(5);
        let q: [[f32; D]; 3] = rows(&mut r);
        let p: [[f32; D]; 3] = rows(&mut r);
        let stale: [[f32; D]; 5] = rows(&mut r);
        let shift: [[f32; D]; 5] = rows(&mut r);
        let fresh: [[f32; D]; 5] = core::array::from_fn(|k| core::array::from_fn(|i| stale[k][i] + 0.3 * shift[k][i]));
        let alpha = 2.0f32;
        for beta in [1.0f32, 0.5, 0.0] {
            let (lse, mean, probs) = cache_softmax(&q, &stale, alpha);
            let mut eq = [[0.0f64; D]; 3];
            for draw in 0..125usize {
                let pick = [draw % 5, (draw / 5) % 5, draw / 25];
                let prob: f64 = (0..3).map(|b| probs[b][pick[b]]).product();
                let f: [[f32; D]; 3] = core::array::from_fn(|b| fresh[pick[b]]);
                let e: [[f32; D]; 3] = core::array::from_fn(|b| stale[pick[b]]);
                let (mut gq, mut gp, mut gn) = ([[0.0; D]; 3], [[0.0; D]; 3], [[0.0; D]; 3]);
                let side = CacheSide {
                    lse: &lse,
                    fresh: &f,
                    weights: &[1.0; 3],
                    control: Some(Control { beta, stale: &e, mean: &mean }),
                };
                let grads = RemainderGrads { query: &mut gq, positive: &mut gp, negative: &mut gn };
                in_batch_with_remainder::<u32, D>(&q, &p, None, alpha, 1, side, grads).unwrap();
                for b in 0..3 {
                    for i in 0..D {
                        eq[b][i] += prob * f64::from(gq[b][i]);
                    }
                }
            }
            // The closed form, in f64, from the same softmax terms.
            for b in 0..3 {
                let d64 = |x: &[f32; D], y: &[f32; D]| (0..D).map(|i| f64::from(x[i]) * f64::from(y[i])).sum::<f64>();
                let a = f64::from(alpha);
                let logits: [f64; 3] = core::array::from_fn(|j| a * d64(&q[b], &p[j]));
                let cache: [f64; 5] = core::array::from_fn(|k| a * d64(&q[b], &stale[k]));
                let m = logits.iter().chain(&cache).copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().chain(&cache).map(|l| (l - m).exp()).sum();
                let mass: f64 = cache.iter().map(|l| (l - m).exp()).sum::<f64>() / z;
                for i in 0..D {
                    let mut want = -f64::from(p[b][i]);
                    for j in 0..3 {
                        want += (logits[j] - m).exp() / z * f64::from(p[j][i]);
                    }
                    let (mut diff, mut ebar) = (0.0, 0.0);
                    for k in 0..5 {
                        diff += probs[b][k] * f64::from(fresh[k][i] - stale[k][i]);
                        ebar += probs[b][k] * f64::from(stale[k][i]);
                    }
                    want += mass * (f64::from(beta) * diff + ebar);
                    want *= a / 3.0;
                    assert!((eq[b][i] - want).abs() < 1e-5, "beta {beta}: {} against {want}", eq[b][i]);
                }
            }
        }
    }

    /// The shared-draw estimator: one draw per query from its sampling
    /// softmax (tempered or not), each draw used by every query with its
    /// Hansen-Hurwitz weight. With stale = fresh, its expectation over every
    /// joint draw is the exact softmax gradient.
    #[test]
    fn shared_draws_have_the_exact_softmax_gradient_in_expectation() {
        let mut r = Pcg64Mcg::seed_from_u64(23);
        let q: [[f32; D]; 3] = rows(&mut r);
        let p: [[f32; D]; 3] = rows(&mut r);
        let cache: [[f32; D]; 5] = rows(&mut r);
        let alpha = 2.5f32;
        let want = exact(&q, &p, &cache, f64::from(alpha));
        for (inv_temp, control) in [(1.0f32, None), (0.5, None), (1.0, Some(1.0f32)), (0.5, Some(1.0))] {
            let (lse, mean, _) = cache_softmax(&q, &cache, alpha);
            // The sampling softmax at this temperature.
            let (mut slse, mut rho) = ([LogSumExp::EMPTY; 3], [[0.0f64; 5]; 3]);
            for b in 0..3 {
                for e in &cache {
                    slse[b].push(inv_temp * alpha * dot(&q[b], e));
                }
                for (k, e) in cache.iter().enumerate() {
                    rho[b][k] = f64::from(slse[b].weight(inv_temp * alpha * dot(&q[b], e)));
                }
            }
            check_expectation(&rho, &want, &(inv_temp, control), |pick, (gq, gp, gn)| {
                let fresh: [[f32; D]; 3] = core::array::from_fn(|b| cache[pick[b]]);
                let side = CacheSide {
                    lse: &lse,
                    fresh: &fresh,
                    weights: &[0.0; 3],
                    control: control.map(|beta| Control { beta, stale: &fresh[..], mean: &mean[..] }),
                };
                let (mut counts, mut scratch) = ([[0.0; 3]; 3], [LogSumExp::EMPTY; 3]);
                let shared = SharedDraws {
                    stale: &fresh,
                    shares: &[1.0; 3],
                    batch_queries: &q,
                    sample_lse: &slse,
                    inv_temp,
                    fresh_scores: false,
                    counts: &mut counts,
                    lse: &mut scratch,
                };
                let grads = RemainderGrads { query: gq, positive: gp, negative: gn };
                in_batch_with_shared_draws::<u32, D>(&q, &p, None, alpha, side, shared, grads).unwrap().loss
            });
        }
    }

    /// Two independent draws per query, pooled over the batch: a row is a
    /// distinct slot of a query's draws with its share (1/2, or 1 when both
    /// draws fell on it). Every joint draw of the three queries is
    /// enumerated (25^3) with its probability; with stale = fresh the
    /// expected gradients are the exact softmax's, tempered or not, with or
    /// without a control variate.
    #[test]
    fn several_shared_draws_per_query_have_the_exact_gradient_in_expectation() {
        let mut r = Pcg64Mcg::seed_from_u64(29);
        let q: [[f32; D]; 3] = rows(&mut r);
        let p: [[f32; D]; 3] = rows(&mut r);
        let cache: [[f32; D]; 5] = rows(&mut r);
        let alpha = 2.5f32;
        let (want_loss, want_q, want_p, want_c) = exact(&q, &p, &cache, f64::from(alpha));
        for (inv_temp, control) in [(1.0f32, None), (0.5, None), (1.0, Some(1.0f32))] {
            let (lse, mean, _) = cache_softmax(&q, &cache, alpha);
            let (mut slse, mut rho) = ([LogSumExp::EMPTY; 3], [[0.0f64; 5]; 3]);
            for b in 0..3 {
                for e in &cache {
                    slse[b].push(inv_temp * alpha * dot(&q[b], e));
                }
                for (k, e) in cache.iter().enumerate() {
                    rho[b][k] = f64::from(slse[b].weight(inv_temp * alpha * dot(&q[b], e)));
                }
            }
            let (mut eq, mut ep, mut ec) = ([[0.0f64; D]; 3], [[0.0f64; D]; 3], [[0.0f64; D]; 5]);
            let mut e_loss = 0.0;
            for draw in 0..15_625usize {
                let pair = |b: usize| {
                    let d = (draw / 25usize.pow(b as u32)) % 25;
                    (d % 5, d / 5)
                };
                let pr: f64 = (0..3).map(|b| rho[b][pair(b).0] * rho[b][pair(b).1]).product();
                // Query b's rows at 2b, 2b + 1.
                let (mut slot, mut shares) = ([0usize; 6], [0.0f32; 6]);
                for b in 0..3 {
                    let (x, y) = pair(b);
                    slot[2 * b] = x;
                    slot[2 * b + 1] = y;
                    if x == y {
                        shares[2 * b] = 1.0;
                    } else {
                        shares[2 * b] = 0.5;
                        shares[2 * b + 1] = 0.5;
                    }
                }
                let fresh: [[f32; D]; 6] = core::array::from_fn(|k| cache[slot[k]]);
                let side = CacheSide {
                    lse: &lse,
                    fresh: &fresh,
                    weights: &[0.0; 6],
                    control: control.map(|beta| Control { beta, stale: &fresh[..], mean: &mean[..] }),
                };
                let (mut counts, mut scratch) = ([[0.0; 3]; 6], [LogSumExp::EMPTY; 3]);
                let shared = SharedDraws {
                    stale: &fresh,
                    shares: &shares,
                    batch_queries: &q,
                    sample_lse: &slse,
                    inv_temp,
                    fresh_scores: false,
                    counts: &mut counts,
                    lse: &mut scratch,
                };
                let (mut gq, mut gp, mut gn) = ([[0.0; D]; 3], [[0.0; D]; 3], [[0.0; D]; 6]);
                let grads = RemainderGrads { query: &mut gq, positive: &mut gp, negative: &mut gn };
                let s = in_batch_with_shared_draws::<u32, D>(&q, &p, None, alpha, side, shared, grads).unwrap();
                e_loss += pr * f64::from(s.loss);
                for b in 0..3 {
                    for i in 0..D {
                        eq[b][i] += pr * f64::from(gq[b][i]);
                        ep[b][i] += pr * f64::from(gp[b][i]);
                    }
                }
                for k in 0..6 {
                    for i in 0..D {
                        ec[slot[k]][i] += pr * f64::from(gn[k][i]);
                    }
                }
            }
            let what = (inv_temp, control);
            assert!((e_loss - want_loss).abs() < 1e-5, "{what:?}: loss {e_loss} against {want_loss}");
            for (got, want) in [(&eq[..], &want_q[..]), (&ep[..], &want_p[..]), (&ec[..], &want_c[..])] {
                for (g, w) in got.iter().zip(want) {
                    for i in 0..D {
                        assert!((g[i] - w[i]).abs() < 1e-5, "{what:?}: {g:?} against {w:?}");
                    }
                }
            }
        }
    }

    /// The fresh-score correction with a cache of one stale row: every
    /// draw is that row, and the corrected softmax is exactly the softmax
    /// over the batch's positives and the row's fresh embedding.
    #[test]
    fn fresh_scores_correct_a_single_stale_row_exactly() {
        let mut r = Pcg64Mcg::seed_from_u64(31);
        let q: [[f32; D]; 3] = rows(&mut r);
        let p: [[f32; D]; 3] = rows(&mut r);
        let stale: [[f32; D]; 1] = rows(&mut r);
        let fresh_row: [[f32; D]; 1] = rows(&mut r);
        let alpha = 2.0f32;
        let mut lse = [LogSumExp::EMPTY; 3];
        for b in 0..3 {
            lse[b].push(alpha * dot(&q[b], &stale[0]));
        }
        let fresh = [fresh_row[0]; 3];
        let stale3 = [stale[0]; 3];
        let (mut gq, mut gp, mut gn) = ([[0.0; D]; 3], [[0.0; D]; 3], [[0.0; D]; 3]);
        let side = CacheSide { lse: &lse, fresh: &fresh, weights: &[0.0; 3], control: None };
        let (mut counts, mut scratch) = ([[0.0; 3]; 3], [LogSumExp::EMPTY; 3]);
        let shared = SharedDraws {
            stale: &stale3,
            shares: &[1.0; 3],
            batch_queries: &q,
            sample_lse: &lse,
            inv_temp: 1.0,
            fresh_scores: true,
            counts: &mut counts,
            lse: &mut scratch,
        };
        let grads = RemainderGrads { query: &mut gq, positive: &mut gp, negative: &mut gn };
        let s = in_batch_with_shared_draws::<u32, D>(&q, &p, None, alpha, side, shared, grads).unwrap();
        // The softmax over {3 positives, the fresh row}, in f64.
        let d64 = |x: &[f32; D], y: &[f32; D]| (0..D).map(|i| f64::from(x[i]) * f64::from(y[i])).sum::<f64>();
        let a = f64::from(alpha);
        let (mut loss, mut eq, mut egn) = (0.0, [[0.0f64; D]; 3], [0.0f64; D]);
        for b in 0..3 {
            let logits: [f64; 4] = core::array::from_fn(|j| a * d64(&q[b], if j < 3 { &p[j] } else { &fresh_row[0] }));
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            loss += (z.ln() + m - logits[b]) / 3.0;
            for j in 0..4 {
                let pi = (logits[j] - m).exp() / z - if j == b { 1.0 } else { 0.0 };
                let row = if j < 3 { &p[j] } else { &fresh_row[0] };
                for i in 0..D {
                    eq[b][i] += a * pi * f64::from(row[i]) / 3.0;
                    if j == 3 {
                        egn[i] += a * pi * f64::from(q[b][i]) / 3.0;
                    }
                }
            }
        }
        assert!((f64::from(s.loss) - loss).abs() < 1e-5, "{} against {loss}", s.loss);
        for b in 0..3 {
            for i in 0..D {
                assert!((f64::from(gq[b][i]) - eq[b][i]).abs() < 1e-5, "query {b}: {:?} against {:?}", gq[b], eq[b]);
            }
        }
        // The row's gradient is spread over the three draws of it.
        for i in 0..D {
            let got: f64 = (0..3).map(|k| f64::from(gn[k][i])).sum();
            assert!((got - egn[i]).abs() < 1e-5, "{got} against {}", egn[i]);
        }
    }

    #[test]
    fn accidental_hits_and_empty_cache() {
        // Two queries share an item: each other's positive is left out, so
        // with an empty cache each query's softmax has only its own
        // positive: loss 0, probability 1, zero gradients.
        let q = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        let p = [[0.5, 0.5, 0.0], [0.1, 0.2, 0.3]];
        let (mut gq, mut gp, mut gn) = ([[0.0; D]; 2], [[0.0; D]; 2], [[0.0; D]; 2]);
        let side = CacheSide { lse: &[LogSumExp::EMPTY; 2], fresh: &[[0.0; D]; 2], weights: &[0.0; 2], control: None };
        let grads = RemainderGrads { query: &mut gq, positive: &mut gp, negative: &mut gn };
        let s = in_batch_with_remainder(&q, &p, Some(&[7u32, 7]), 3.0, 1, side, grads).unwrap();
        assert!(s.loss.abs() < 1e-6 && (s.prob_pos - 1.0).abs() < 1e-6 && s.cache_mass == 0.0);
        assert!(gq.iter().chain(&gp).chain(&gn).all(|g| g.iter().all(|x| x.abs() < 1e-6)));
    }

    /// A batch split into parts (the queries of two processes) gives each
    /// query the whole batch's terms: its query and negative gradients to
    /// the bit, and figures and positive gradients that sum to the
    /// whole's. With an accidental hit across the parts and a control
    /// variate.
    #[test]
    fn parts_of_a_batch_sum_to_the_whole() {
        let mut r = Pcg64Mcg::seed_from_u64(3);
        let (q, p) = (rows::<3>(&mut r), rows::<3>(&mut r));
        let (fresh, stale, mean) = (rows::<6>(&mut r), rows::<6>(&mut r), rows::<3>(&mut r));
        let ids = [4u32, 9, 4];
        let lse = [LogSumExp { max: 0.3, sum: 2.0 }, LogSumExp::EMPTY, LogSumExp { max: -1.0, sum: 1.5 }];
        let weights = [0.5, 0.5, 0.0, 0.0, 1.0, 0.0];
        let side = |b: core::ops::Range<usize>| CacheSide {
            lse: &lse[b.clone()],
            fresh: &fresh[2 * b.start..2 * b.end],
            weights: &weights[2 * b.start..2 * b.end],
            control: Some(Control { beta: 0.7, stale: &stale[2 * b.start..2 * b.end], mean: &mean[b] }),
        };
        let (mut gq, mut gp, mut gn) = ([[0.0; D]; 3], [[0.0; D]; 3], [[0.0; D]; 6]);
        let grads = RemainderGrads { query: &mut gq, positive: &mut gp, negative: &mut gn };
        let whole = in_batch_with_remainder(&q, &p, Some(&ids), 2.5, 2, side(0..3), grads).unwrap();
        let (mut pq, mut pn, mut psum) = ([[0.0; D]; 3], [[0.0; D]; 6], RemainderSummary::default());
        let mut pp = [[0.0f32; D]; 3];
        for range in [0..1, 1..3] {
            let mut gp_part = [[0.0; D]; 3];
            let grads = RemainderGrads {
                query: &mut pq[range.clone()],
                positive: &mut gp_part,
                negative: &mut pn[2 * range.start..2 * range.end],
            };
            let part = BatchPart { first: range.start, batch: 3 };
            let s = in_batch_part_with_remainder(&q[range.clone()], &p, Some(&ids), 2.5, 2, part, side(range), grads)
                .unwrap();
            psum.loss += s.loss;
            psum.prob_pos += s.prob_pos;
            psum.grad_scale += s.grad_scale;
            for (acc, g) in pp.iter_mut().zip(&gp_part) {
                vector::axpy(1.0, g, acc);
            }
        }
        assert_eq!((pq, pn), (gq, gn), "query and negative gradients are each query's own");
        let close = |a: f32, b: f32| (a - b).abs() < 1e-6 * (1.0 + b.abs());
        assert!(close(psum.loss, whole.loss) && close(psum.prob_pos, whole.prob_pos));
        assert!(close(psum.grad_scale, whole.grad_scale), "{psum:?} {whole:?}");
        assert!(pp.iter().flatten().zip(gp.iter().flatten()).all(|(&a, &b)| close(a, b)), "{pp:?} {gp:?}");
        // A part must fit its positives and its batch; a whole batch has a
        // positive per query.
        let (mut gq, mut gp, mut gn) = ([[0.0; D]; 2], [[0.0; D]; 3], [[0.0; D]; 4]);
        for part in [BatchPart { first: 2, batch: 3 }, BatchPart { first: 0, batch: 1 }] {
            let grads = RemainderGrads { query: &mut gq, positive: &mut gp, negative: &mut gn };
            assert!(in_batch_part_with_remainder(&q[..2], &p, Some(&ids), 2.5, 2, part, side(0..2), grads).is_err());
        }
        let grads = RemainderGrads { query: &mut gq, positive: &mut gp, negative: &mut gn };
        assert!(in_batch_with_remainder(&q[..2], &p, Some(&ids), 2.5, 2, side(0..2), grads).is_err());
    }

    /// Shared draws split into parts (the queries of two processes), with
    /// fresh scores and without: each part's query gradients are the
    /// whole's to the bit, and its negative and positive gradients and
    /// figures sum to the whole's. Row 5 is past its query's draws and
    /// holds a row whose scores overflow: it must not be weighted.
    #[test]
    fn parts_of_a_batch_with_shared_draws_sum_to_the_whole() {
        let mut r = Pcg64Mcg::seed_from_u64(7);
        let (q, p) = (rows::<3>(&mut r), rows::<3>(&mut r));
        let (mut fresh, stale) = (rows::<6>(&mut r), rows::<6>(&mut r));
        fresh[5] = core::array::from_fn(|i| f32::MAX * q[0][i].signum());
        let ids = [4u32, 9, 4];
        let alpha = 2.5;
        let mut lse = [LogSumExp::EMPTY; 3];
        for (b, z) in lse.iter_mut().enumerate() {
            for e in &stale {
                z.push(alpha * dot(&q[b], e));
            }
        }
        let shares = [0.5, 0.5, 1.0, 0.0, 1.0, 0.0];
        let side =
            |b: core::ops::Range<usize>| CacheSide { lse: &lse[b], fresh: &fresh, weights: &[0.0; 6], control: None };
        let close = |a: f32, b: f32| (a - b).abs() < 1e-5 * (1.0 + b.abs());
        for fresh_scores in [false, true] {
            let mut counts = [[0.0; 3]; 6];
            let mut scratch = [LogSumExp::EMPTY; 3];
            let (mut gq, mut gp, mut gn) = ([[0.0; D]; 3], [[0.0; D]; 3], [[0.0; D]; 6]);
            let grads = RemainderGrads { query: &mut gq, positive: &mut gp, negative: &mut gn };
            let draws = SharedDraws {
                stale: &stale,
                shares: &shares,
                batch_queries: &q,
                sample_lse: &lse,
                inv_temp: 1.0,
                fresh_scores,
                counts: &mut counts,
                lse: &mut scratch,
            };
            let whole = in_batch_with_shared_draws(&q, &p, Some(&ids), alpha, side(0..3), draws, grads).unwrap();
            // Row 5 is unweighted whatever it holds: zeroed, it gives the
            // same bits.
            let mut benign = fresh;
            benign[5] = [0.0; D];
            let (mut bq, mut bp, mut bn) = ([[0.0; D]; 3], [[0.0; D]; 3], [[0.0; D]; 6]);
            let grads = RemainderGrads { query: &mut bq, positive: &mut bp, negative: &mut bn };
            let draws = SharedDraws {
                stale: &stale,
                shares: &shares,
                batch_queries: &q,
                sample_lse: &lse,
                inv_temp: 1.0,
                fresh_scores,
                counts: &mut counts,
                lse: &mut scratch,
            };
            let side_b = CacheSide { lse: &lse, fresh: &benign, weights: &[0.0; 6], control: None };
            let b = in_batch_with_shared_draws(&q, &p, Some(&ids), alpha, side_b, draws, grads).unwrap();
            assert_eq!((b, bq, bp, bn[..5].to_vec()), (whole, gq, gp, gn[..5].to_vec()), "fresh scores {fresh_scores}");
            let (mut pq, mut pn, mut pp) = ([[0.0; D]; 3], [[0.0f32; D]; 6], [[0.0f32; D]; 3]);
            let mut psum = RemainderSummary::default();
            for range in [0..1, 1..3] {
                let (mut gp_part, mut gn_part) = ([[0.0; D]; 3], [[0.0; D]; 6]);
                let grads =
                    RemainderGrads { query: &mut pq[range.clone()], positive: &mut gp_part, negative: &mut gn_part };
                let part = BatchPart { first: range.start, batch: 3 };
                let draws = SharedDraws {
                    stale: &stale,
                    shares: &shares,
                    batch_queries: &q,
                    sample_lse: &lse,
                    inv_temp: 1.0,
                    fresh_scores,
                    counts: &mut counts,
                    lse: &mut scratch[range.clone()],
                };
                let s = in_batch_part_with_shared_draws(
                    &q[range.clone()],
                    &p,
                    Some(&ids),
                    alpha,
                    part,
                    side(range),
                    draws,
                    grads,
                )
                .unwrap();
                psum.loss += s.loss;
                psum.prob_pos += s.prob_pos;
                psum.grad_scale += s.grad_scale;
                for (acc, g) in pp.iter_mut().zip(&gp_part).chain(pn.iter_mut().zip(&gn_part)) {
                    vector::axpy(1.0, g, acc);
                }
            }
            assert_eq!(pq, gq, "fresh scores {fresh_scores}: query gradients are each query's own");
            assert!(close(psum.loss, whole.loss) && close(psum.prob_pos, whole.prob_pos), "{psum:?} {whole:?}");
            assert!(close(psum.grad_scale, whole.grad_scale), "{psum:?} {whole:?}");
            for (got, want) in [(&pp[..], &gp[..]), (&pn[..], &gn[..])] {
                assert!(
                    got.iter().flatten().zip(want.iter().flatten()).all(|(&a, &b)| close(a, b)),
                    "{got:?} {want:?}"
                );
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let q = [[1.0, 0.0, 0.0]];
        let (mut gq, mut gp, mut gn) = ([[0.0; D]; 1], [[0.0; D]; 1], [[0.0; D]; 1]);
        let side = CacheSide { lse: &[LogSumExp::EMPTY], fresh: &[[0.0; D]; 1], weights: &[0.0], control: None };
        let grads = RemainderGrads { query: &mut gq, positive: &mut gp, negative: &mut gn };
        assert!(in_batch_with_remainder::<u32, D>(&q, &[], None, 1.0, 1, side, grads).is_err());
        let grads = RemainderGrads { query: &mut gq, positive: &mut gp, negative: &mut gn };
        assert!(in_batch_with_remainder::<u32, D>(&q, &q, None, f32::NAN, 1, side, grads).is_err());
    }
}
