//! The cache loss (spec `cache_loss`), in two phases around the item tower.
//!
//! Phase 1, [`CacheLoss::score_and_sample`]: one streaming pass over the
//! cache scores every query against every cached (stale) embedding,
//! `c_bj = alpha * <q_b, e_j>`, accumulates a log-sum-exp per query and
//! chooses the negatives (see [`crate::sampler`]). With top-k, the cache is
//! cut into k contiguous groups and each group's best slot is a candidate.
//! It then computes, with the positive score `s_b = alpha * <q_b, p_b>`,
//!
//! ```text
//! log Z_b    = logsumexp(s_b, candidates)
//! prob_pos_b = exp(s_b - log Z_b)
//! interpretable_loss_b = log Z_b - s_b = -log prob_pos_b
//! ```
//!
//! Phase 2, [`CacheLoss::backward`]: the caller embeds the chosen negatives
//! afresh (`f`), and
//!
//! ```text
//! training_loss_b = (1 - prob_pos_b) * (alpha * sum_i w_bi <q_b, f_bi> - s_b)
//! ```
//!
//! with `prob_pos_b` held constant. `sum_i w_bi f_bi` is an unbiased
//! estimate of the softmax mean `sum_j P_bj f_j` over the candidates
//! (`P_bj = exp(c_bj) / sum_k exp(c_bk)`), so the gradient equals, in
//! expectation over the draw, that of the softmax cross-entropy over the
//! candidates. The weights ([`CacheLoss::negative_weights`]) are
//!
//! - one draw from `softmax(c)` (exponential jumps or Gumbel-max at inverse
//!   temperature 1): `w = 1`, exactly;
//! - one draw from `rho = softmax(t c)`, `t != 1`: the importance weight
//!   `w = P_n / rho_n`, both over the same candidates;
//! - Gumbel-top-m, m > 1 (priority sampling, Horvitz-Thompson): with
//!   `tau` the (m+1)-th largest key `t c_j + G_j`, candidate `j` is drawn
//!   with probability `q_j = 1 - exp(-exp(t c_j - tau))` given `tau`, and
//!   `w_j = P_j / q_j`; `E[sum_{j drawn} w_j f_j] = sum_j P_j f_j`. The
//!   weights sum to 1 only in expectation. With at most m candidates all
//!   are drawn, `q_j = 1` and `w_j = P_j`;
//! - m independent draws from `rho` ([`Retrieval::ExpJump`], m > 1; with
//!   replacement): a slot drawn `k` times is one negative (embedded once)
//!   with `w = (k / m) P_j / rho_j`. The weights sum to 1 (to rounding) at
//!   inverse temperature 1, and none exceeds one draw's, so the estimate
//!   has `1/m` of one draw's variance; Horvitz-Thompson weights can be far
//!   larger than `P_j` when m is small (their threshold is a low order
//!   statistic of the keys);
//! - the m highest scores ([`Retrieval::MaxScore`]): `1 / m` each (a plain
//!   mean; not an estimate of anything).
//!
//! The gradients of the batch mean `L = mean_b training_loss_b` are
//!
//! ```text
//! dL/dq_b  = (1 - p_b) * alpha * (sum_i w_bi f_bi - p_b) / B
//! dL/dp_b  = -(1 - p_b) * alpha * q_b / B
//! dL/df_bi = (1 - p_b) * alpha * w_bi * q_b / B
//! dL/dalpha = mean_b (1 - p_b) * (sum_i w_bi <q_b, f_bi> - <q_b, p_b>)
//! ```
//!
//! With a control variate ([`CacheLoss::backward_with`], `beta` in
//! `[0, 1]`) the query gradient becomes
//!
//! ```text
//! dL/dq_b = (1 - p_b) * alpha * (beta * sum_i w_bi (f_bi - e_bi) + e_bar_b - p_b) / B
//! ```
//!
//! with `e_bar_b = sum_j P_bj e_j` the softmax mean of the stale cached
//! embeddings, accumulated during phase 1
//! ([`CacheLoss::score_and_sample_with`]). Its expectation is that of the
//! plain estimator plus `(1 - beta) (e_bar - sum_j P_j f_j)`: `beta = 1` is
//! unbiased and has less variance when the cache is nearly fresh; `beta = 0`
//! is the memory-bank gradient (no sampling noise, all of the staleness).
//! Only the query gradient changes; the loss, `dL/dp`, `dL/df` and
//! `dL/dalpha` are those above.
//!
//! Each query's terms, with or without the control variate, are
//! [`query_terms`], which takes the candidates' log-sum-exp, the weighted
//! negatives and the variate's inputs as values: a driver that merges them
//! from the shards of a distributed cache computes the same terms with the
//! same arithmetic.
//!
//! `1 - prob_pos` is computed from the candidates' own sum, not by
//! subtraction from 1, so it keeps its precision when the positive dominates.
//! A query without any candidate (an empty cache, or every slot masked) has
//! `prob_pos = 1`, no negative, and contributes zero loss and gradient.

use rand_core::RngCore;

use crate::cache::CacheRef;
use crate::error::{check_len, Error, Result};
use crate::item::Item;
use crate::kernel::{self, Mode, Outputs, Pass};
use crate::math;
use crate::parallel::{Fork, Serial};
use crate::sampler::{inclusion_probability, LogSumExp, Picks, Retrieval};
use crate::storage::Stored;
use crate::vector::{self, dot};

pub use crate::kernel::TopKOut;

/// Settings of the cache loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    /// alpha: every score is `alpha * <x, y>`. Default 1.
    pub score_scale: f32,
    /// Approximate top-k: 0 for all slots as candidates (default), else the
    /// number of contiguous groups whose best slot is a candidate; it must
    /// divide the number of slots.
    pub top_k: usize,
    /// Whether a slot holding the query's own positive item is removed from
    /// its candidates. Default `true`: a cached copy of the positive scored
    /// as a negative pushes the query away from its own answer. The
    /// reference cases run with it off.
    pub mask_accidental_hits: bool,
}

impl LossConfig {
    /// The defaults: scale 1, all slots as candidates, accidental hits
    /// masked.
    pub const DEFAULT: Self = Self { score_scale: 1.0, top_k: 0, mask_accidental_hits: true };
}

impl Default for LossConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Where the gradients of the mean training loss are written (overwritten,
/// not accumulated).
#[derive(Debug)]
pub struct LossGrads<'a, const DIM: usize> {
    /// d L / d q_b, one row per query.
    pub query: &'a mut [[f32; DIM]],
    /// d L / d p_b, one row per query.
    pub positive: &'a mut [[f32; DIM]],
    /// d L / d f_bi, row `b * NEG + i`; rows of missing negatives are zero.
    pub negative: &'a mut [[f32; DIM]],
}

/// The control variate of the query gradient (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct ControlVariate<'a, const DIM: usize> {
    /// beta in `[0, 1]`: 1 unbiased, 0 the memory-bank estimator.
    pub beta: f32,
    /// Per query, the softmax mean of the stale cached embeddings over its
    /// candidates, as written by [`CacheLoss::score_and_sample_with`] for
    /// this batch.
    pub candidate_mean: &'a [[f32; DIM]],
}

/// How a batch's negatives are weighted (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Weighting {
    /// Weight 1: one draw from the softmax itself, or a fixed negative.
    One,
    /// `1 / m` each: the highest scores.
    Mean,
    /// `P_n / rho_n` for one draw from `softmax(inv_temp * c)`.
    Ratio(f32),
    /// Horvitz-Thompson weights `P_j / q_j` for Gumbel-top-m at `inv_temp`.
    Priority(f32),
    /// m independent draws from `softmax(inv_temp * c)`: `(k / m) P_n /
    /// rho_n` for a slot drawn k times.
    Replacement(f32),
}

/// Batch means of a step's loss quantities.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossSummary {
    /// Mean training loss (the surrogate whose gradient is used).
    pub training_loss: f32,
    /// Mean `-log prob_pos`: the cross-entropy over the candidates.
    pub interpretable_loss: f32,
    /// Mean relative staleness of the drawn negatives' cached embeddings,
    /// over the queries that have one.
    pub staleness: f32,
    /// Mean probability of the positive.
    pub prob_pos: f32,
    /// d L / d alpha, for a learned score scale.
    pub grad_scale: f32,
}

/// The cache loss's working memory for up to `BATCH` queries with `NEG`
/// negatives each.
///
/// # Generics
/// - `BATCH`: the largest batch; smaller batches use a prefix.
/// - `NEG`: negatives drawn per query (1 in the paper).
///
/// # Memory
/// O(BATCH x NEG): `BATCH * (76 + 16 * NEG) + 14` bytes before padding
/// (2,958 for `CacheLoss<32, 1>`), independent of the cache's size: no
/// score matrix is ever stored.
///
/// ```
/// use negcache::CacheLoss;
/// static LOSS: CacheLoss<32, 1> = CacheLoss::new();
/// assert!(core::mem::size_of_val(&LOSS) < 4096);
/// ```
#[derive(Debug, Clone)]
pub struct CacheLoss<const BATCH: usize, const NEG: usize> {
    batch: usize,
    alpha: f32,
    average: bool,
    lse: [LogSumExp; BATCH],
    picks: [Picks<NEG>; BATCH],
    weights: [[f32; NEG]; BATCH],
    sampling: [LogSumExp; BATCH],
    group: [(f32, u32); BATCH],
    pos_score: [f32; BATCH],
    prob_pos: [f32; BATCH],
    prob_neg: [f32; BATCH],
    interpretable: [f32; BATCH],
    training: [f32; BATCH],
    staleness: [f32; BATCH],
    hit_keys: [u64; BATCH],
    found: [u32; BATCH],
    found_valid: bool,
}

const NO_SLOT: u32 = u32::MAX;

impl<const BATCH: usize, const NEG: usize> CacheLoss<BATCH, NEG> {
    /// Working memory for an empty batch.
    pub const fn new() -> Self {
        const { assert!(BATCH > 0 && NEG > 0, "BATCH and NEG must be positive") };
        Self {
            batch: 0,
            alpha: 1.0,
            average: false,
            lse: [LogSumExp::EMPTY; BATCH],
            picks: [Picks::EMPTY; BATCH],
            weights: [[0.0; NEG]; BATCH],
            sampling: [LogSumExp::EMPTY; BATCH],
            group: [(f32::NEG_INFINITY, NO_SLOT); BATCH],
            pos_score: [0.0; BATCH],
            prob_pos: [1.0; BATCH],
            prob_neg: [0.0; BATCH],
            interpretable: [0.0; BATCH],
            training: [0.0; BATCH],
            staleness: [0.0; BATCH],
            hit_keys: [0; BATCH],
            found: [NO_SLOT; BATCH],
            found_valid: false,
        }
    }

    /// Phase 1: scores the batch against the cache, computes `prob_pos` and
    /// the interpretable loss, and chooses up to `NEG` negatives per query.
    ///
    /// `positive_items` are the positives' items, needed when
    /// `cfg.mask_accidental_hits` is set. `top_k_out`, if given, receives
    /// the top-k candidates. Only occupied slots are candidates.
    #[allow(clippy::too_many_arguments)]
    pub fn score_and_sample<I: Item, const DIM: usize>(
        &mut self,
        cache: CacheRef<'_, I, DIM>,
        queries: &[[f32; DIM]],
        positives: &[[f32; DIM]],
        positive_items: Option<&[I]>,
        cfg: &LossConfig,
        retrieval: Retrieval<'_>,
        rng: &mut impl RngCore,
        top_k_out: Option<TopKOut<'_>>,
    ) -> Result<()> {
        self.score_and_sample_with(
            cache,
            queries,
            positives,
            positive_items,
            cfg,
            retrieval,
            rng,
            top_k_out,
            None,
            &Serial,
        )
    }

    /// [`Self::score_and_sample`], and, if `candidate_mean` is given (one
    /// row per query), writes into it each query's softmax mean of the
    /// stale cached embeddings over its candidates, `sum_j P_bj e_j` (zero
    /// without candidates), accumulated in the same pass: the input of a
    /// [`ControlVariate`]. It costs `DIM` multiply-adds per candidate and
    /// query, as much again as the scoring.
    ///
    /// The pass runs on `fork` ([`Serial`] for the calling thread), split
    /// at tiles of [`kernel::TILE`] queries; the results are the same bits
    /// whatever `fork` is (see [`crate::parallel`]).
    #[allow(clippy::too_many_arguments)]
    pub fn score_and_sample_with<I: Item, const DIM: usize>(
        &mut self,
        cache: CacheRef<'_, I, DIM>,
        queries: &[[f32; DIM]],
        positives: &[[f32; DIM]],
        positive_items: Option<&[I]>,
        cfg: &LossConfig,
        retrieval: Retrieval<'_>,
        rng: &mut impl RngCore,
        top_k_out: Option<TopKOut<'_>>,
        candidate_mean: Option<&mut [[f32; DIM]]>,
        fork: &impl Fork,
    ) -> Result<()> {
        let bsz = queries.len();
        self.found_valid = false;
        let n = cache.capacity();
        if bsz > BATCH {
            return Err(Error::CapacityExceeded { requested: bsz, capacity: BATCH });
        }
        check_len("positives", bsz, positives.len())?;
        if !cfg.score_scale.is_finite() {
            return Err(Error::NonFinite { what: "score scale" });
        }
        if !vector::rows_finite(queries) {
            return Err(Error::NonFinite { what: "query embedding" });
        }
        if !vector::rows_finite(positives) {
            return Err(Error::NonFinite { what: "positive embedding" });
        }
        if cfg.top_k > 0 && n % cfg.top_k != 0 {
            return Err(Error::TopKNotDivisor { k: cfg.top_k, slots: n });
        }
        let masking = cfg.mask_accidental_hits;
        if masking {
            let items = positive_items
                .ok_or(Error::InvalidConfig { what: "mask_accidental_hits needs the positives' items" })?;
            check_len("positive items", bsz, items.len())?;
            for (k, item) in self.hit_keys.iter_mut().zip(items) {
                *k = item.key();
            }
        }
        if let Some(out) = &top_k_out {
            if cfg.top_k == 0 {
                return Err(Error::InvalidConfig { what: "top-k output asked for without top-k" });
            }
            check_len("top-k scores", bsz * cfg.top_k, out.scores.len())?;
            check_len("top-k slots", bsz * cfg.top_k, out.slots.len())?;
        }
        if let Some(mean) = &candidate_mean {
            check_len("candidate mean", bsz, mean.len())?;
        }

        self.batch = bsz;
        self.alpha = cfg.score_scale;
        for b in 0..bsz {
            self.lse[b] = LogSumExp::EMPTY;
            self.picks[b] = Picks::EMPTY;
            self.sampling[b] = LogSumExp::EMPTY;
            self.training[b] = 0.0;
            self.staleness[b] = 0.0;
        }

        let alpha = cfg.score_scale;
        let top_k = cfg.top_k;
        let weighting = match retrieval {
            Retrieval::Gumbel { inv_temp } if NEG > 1 => Weighting::Priority(inv_temp),
            Retrieval::ExpJump { inv_temp } if NEG > 1 => Weighting::Replacement(inv_temp),
            Retrieval::Gumbel { inv_temp } | Retrieval::ExpJump { inv_temp } => {
                if inv_temp == 1.0 {
                    Weighting::One
                } else {
                    Weighting::Ratio(inv_temp)
                }
            }
            Retrieval::MaxScore => Weighting::Mean,
            Retrieval::Fixed(_) => Weighting::One,
        };
        let mode = match retrieval {
            Retrieval::Gumbel { inv_temp } => {
                check_inv_temp(inv_temp)?;
                Mode::Gumbel(inv_temp)
            }
            Retrieval::ExpJump { inv_temp } => {
                check_inv_temp(inv_temp)?;
                // At temperature 1 the sampling weights are the log-sum-exp's
                // own terms.
                if inv_temp == 1.0 {
                    Mode::Jump1
                } else {
                    Mode::Jump(inv_temp)
                }
            }
            Retrieval::MaxScore => Mode::Max,
            Retrieval::Fixed(chosen) => {
                if NEG != 1 {
                    return Err(Error::Unsupported { what: "fixed retrieval gives one negative per query" });
                }
                check_len("fixed retrieval", bsz, chosen.len())?;
                let bound = if top_k > 0 { top_k } else { n };
                for (b, &r) in chosen.iter().enumerate() {
                    if r >= bound {
                        return Err(Error::IndexOutOfRange { what: "fixed retrieval", index: r, bound });
                    }
                    if top_k == 0 {
                        if !cache.occupied()[r] {
                            return Err(Error::EmptyCandidate { query: b });
                        }
                        // The score is unused: a fixed negative has weight 1.
                        self.picks[b].set_at(0, r as u32, 0.0);
                    }
                }
                Mode::Fixed(chosen)
            }
        };
        let out = Outputs {
            lse: &mut self.lse[..bsz],
            picks: &mut self.picks[..bsz],
            sampling: &mut self.sampling[..bsz],
            group: &mut self.group[..bsz],
            top: top_k_out,
            mean: candidate_mean,
            found: masking.then_some(&mut self.found[..bsz]),
        };
        let hit_keys = masking.then_some(&self.hit_keys[..bsz]);
        let finite = stream(cache, queries, hit_keys, alpha, top_k, mode, out, rng, fork);
        if !finite {
            return Err(Error::NonFinite { what: "cache score" });
        }
        self.found_valid = masking;
        if let Retrieval::Fixed(_) = retrieval {
            if let Some(b) = (0..bsz).find(|&b| self.picks[b].len == 0) {
                return Err(Error::EmptyCandidate { query: b });
            }
        }

        for b in 0..bsz {
            let pos = PositiveTerms::new(&queries[b], &positives[b], &self.lse[b], alpha)?;
            self.pos_score[b] = pos.score;
            self.prob_pos[b] = pos.prob_pos;
            self.prob_neg[b] = pos.prob_neg;
            self.interpretable[b] = pos.interpretable;
            self.weights[b] = negative_weights(&mut self.picks[b], &self.lse[b], &self.sampling[b], weighting);
        }
        self.average = weighting == Weighting::Mean;
        Ok(())
    }

    /// Phase 2: the training loss, staleness and gradients, given the fresh
    /// embeddings of the chosen negatives.
    ///
    /// `queries` and `positives` must be those of phase 1. `fresh` holds
    /// `NEG` rows per query (row `b * NEG + i` for its i-th negative; rows
    /// past a query's number of negatives are ignored). `cache` supplies the
    /// stale embeddings for the staleness; it must not have changed since
    /// phase 1.
    pub fn backward<I: Item, const DIM: usize>(
        &mut self,
        cache: CacheRef<'_, I, DIM>,
        queries: &[[f32; DIM]],
        positives: &[[f32; DIM]],
        fresh: &[[f32; DIM]],
        grads: Option<LossGrads<'_, DIM>>,
    ) -> Result<LossSummary> {
        self.backward_with(cache, queries, positives, fresh, None, grads)
    }

    /// [`Self::backward`] with an optional control variate on the query
    /// gradient (see the module docs); `None` is [`Self::backward`].
    /// `control.candidate_mean` must be what
    /// [`Self::score_and_sample_with`] wrote for this batch, and the cache
    /// must not have changed since.
    pub fn backward_with<I: Item, const DIM: usize>(
        &mut self,
        cache: CacheRef<'_, I, DIM>,
        queries: &[[f32; DIM]],
        positives: &[[f32; DIM]],
        fresh: &[[f32; DIM]],
        control: Option<ControlVariate<'_, DIM>>,
        grads: Option<LossGrads<'_, DIM>>,
    ) -> Result<LossSummary> {
        let bsz = self.batch;
        check_len("queries", bsz, queries.len())?;
        check_len("positives", bsz, positives.len())?;
        check_len("fresh negatives", bsz * NEG, fresh.len())?;
        let mut grads = grads;
        if let Some(g) = &mut grads {
            check_len("query gradient", bsz, g.query.len())?;
            check_len("positive gradient", bsz, g.positive.len())?;
            check_len("negative gradient", bsz * NEG, g.negative.len())?;
        }
        if let Some(cv) = &control {
            if !(0.0..=1.0).contains(&cv.beta) {
                return Err(Error::InvalidConfig { what: "control variate beta must be in [0, 1]" });
            }
            check_len("candidate mean", bsz, cv.candidate_mean.len())?;
            if !vector::rows_finite(cv.candidate_mean) {
                return Err(Error::NonFinite { what: "candidate mean" });
            }
        }
        let alpha = self.alpha;
        let inv_b = if bsz > 0 { 1.0 / bsz as f32 } else { 0.0 };
        let mut sum = LossSummary::default();
        let mut with_negative = 0usize;
        for b in 0..bsz {
            let m = self.picks[b].len;
            let rows = &fresh[b * NEG..b * NEG + m];
            let weights = &self.weights[b][..m];
            let mut stale = 0.0f32;
            for (i, f) in rows.iter().enumerate() {
                stale += relative_staleness(&cache.embeddings().row(self.picks[b].slots[i] as usize), f);
            }
            let negatives = QueryNegatives {
                fresh: rows,
                weights,
                stale: |i: usize| cache.embeddings().row(self.picks[b].slots[i] as usize),
                mean_of_dots: self.average,
            };
            let cv = control.as_ref().map(|cv| QueryControl { beta: cv.beta, candidate_mean: &cv.candidate_mean[b] });
            let grads_b = grads.as_mut().map(|g| QueryGrads {
                query: &mut g.query[b],
                positive: &mut g.positive[b],
                negative: &mut g.negative[b * NEG..(b + 1) * NEG],
            });
            let t = query_terms(&queries[b], &positives[b], &self.lse[b], negatives, cv, alpha, inv_b, grads_b)?;
            let inv_m = if m > 0 { 1.0 / m as f32 } else { 0.0 };
            self.training[b] = t.training_loss;
            self.staleness[b] = stale * inv_m;
            if m > 0 {
                with_negative += 1;
                sum.staleness += self.staleness[b];
                sum.grad_scale += t.grad_scale;
            }
            sum.training_loss += self.training[b];
            sum.interpretable_loss += self.interpretable[b];
            sum.prob_pos += self.prob_pos[b];
        }
        sum.training_loss *= inv_b;
        sum.interpretable_loss *= inv_b;
        sum.prob_pos *= inv_b;
        sum.grad_scale *= inv_b;
        if with_negative > 0 {
            sum.staleness /= with_negative as f32;
        }
        Ok(sum)
    }

    /// The number of queries in the current batch.
    pub fn batch_len(&self) -> usize {
        self.batch
    }
    /// The slots chosen as query `b`'s negatives (empty when it had no
    /// candidate).
    pub fn negatives(&self, b: usize) -> &[u32] {
        if b < self.batch {
            self.picks[b].as_slice()
        } else {
            &[]
        }
    }
    /// The weights of query `b`'s negatives, in the order of
    /// [`Self::negatives`] (see the module docs): 1 for one draw from the
    /// softmax itself, `P_n / rho_n` for one tempered draw, `(k / m) P_n /
    /// rho_n` for a slot drawn k times in m independent draws, the
    /// Horvitz-Thompson weights `P_j / q_j` for Gumbel-top-m, `1 / m` for
    /// the highest scores.
    pub fn negative_weights(&self, b: usize) -> &[f32] {
        if b < self.batch {
            &self.weights[b][..self.picks[b].len]
        } else {
            &[]
        }
    }
    /// Per query: the probability of the positive among the candidates.
    pub fn prob_pos(&self) -> &[f32] {
        &self.prob_pos[..self.batch]
    }
    /// Per query: `-log prob_pos`.
    pub fn interpretable_loss(&self) -> &[f32] {
        &self.interpretable[..self.batch]
    }
    /// Per query: the training loss (after [`Self::backward`]).
    pub fn training_loss(&self) -> &[f32] {
        &self.training[..self.batch]
    }
    /// Per query: the mean relative staleness of its negatives (after
    /// [`Self::backward`]).
    pub fn staleness(&self) -> &[f32] {
        &self.staleness[..self.batch]
    }
    /// Query `b`'s log-sum-exp over its candidates (without the positive):
    /// what a shard of a distributed cache reports so that shards can be
    /// merged exactly (`LogSumExp::merge`, then a Gumbel-max over shards).
    pub fn candidate_lse(&self, b: usize) -> LogSumExp {
        if b < self.batch {
            self.lse[b]
        } else {
            LogSumExp::EMPTY
        }
    }

    /// Where the last pass found query `b`'s positive: `Some(Some(slot))`,
    /// the lowest occupied slot holding it; `Some(None)`, not cached;
    /// `None` when the pass did not look (no accidental-hit masking, or
    /// `b` past the batch). The in-cache filter, found by the masking.
    pub fn positive_slot(&self, b: usize) -> Option<Option<usize>> {
        (self.found_valid && b < self.batch).then(|| (self.found[b] != NO_SLOT).then_some(self.found[b] as usize))
    }

    /// Query `b`'s log-sum-exp of its sampling logits (`inv_temp * score`
    /// over its candidates) from the last pass: the candidates' own when
    /// the draw is untempered; [`LogSumExp::EMPTY`] past the batch.
    pub fn sampling_lse(&self, b: usize) -> LogSumExp {
        if b < self.batch {
            self.sampling[b]
        } else {
            LogSumExp::EMPTY
        }
    }

    /// Per query: the positive's score `alpha * <q, p>`.
    pub fn positive_score(&self) -> &[f32] {
        &self.pos_score[..self.batch]
    }
}

impl<const BATCH: usize, const NEG: usize> Default for CacheLoss<BATCH, NEG> {
    fn default() -> Self {
        Self::new()
    }
}

/// One query's terms of the cache loss: what [`query_terms`] returns.
/// With several negatives, `<q, f>` below is their estimate
/// `sum_i w_i <q, f_i>` (their plain mean with
/// [`QueryNegatives::mean_of_dots`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QueryTerms {
    /// `s = alpha * <q, p>`.
    pub positive_score: f32,
    /// `prob_pos = exp(s) / (exp(s) + Z)`, `Z` the candidates' sum.
    pub prob_pos: f32,
    /// `-log prob_pos`.
    pub interpretable_loss: f32,
    /// `(1 - prob_pos) * (alpha * <q, f> - s)`; 0 without a negative.
    pub training_loss: f32,
    /// `d training_loss / d alpha = (1 - prob_pos) * (<q, f> - <q, p>)`,
    /// not divided by the batch; 0 without a negative.
    pub grad_scale: f32,
}

/// One query's negatives for [`query_terms`].
#[derive(Debug, Clone, Copy)]
pub struct QueryNegatives<'a, S, const DIM: usize> {
    /// The negatives' fresh embeddings (none when the query had no
    /// candidate).
    pub fresh: &'a [[f32; DIM]],
    /// Their weights in the estimate of the candidates' softmax mean
    /// ([`CacheLoss::negative_weights`]).
    pub weights: &'a [f32],
    /// The `i`-th negative's cached embedding as the pass read it (read
    /// only with a control variate).
    pub stale: S,
    /// Estimate the negatives' score by the plain mean of their dot
    /// products instead of the weighted sum (the highest scores'
    /// estimate).
    pub mean_of_dots: bool,
}

/// The query-side control variate of [`query_terms`]: the stale
/// rows come with the negatives.
#[derive(Debug, Clone, Copy)]
pub struct QueryControl<'a, const DIM: usize> {
    /// beta in `[0, 1]`.
    pub beta: f32,
    /// The softmax mean of the stale cached embeddings over the query's
    /// candidates (zero without candidates).
    pub candidate_mean: &'a [f32; DIM],
}

/// Where [`query_terms`] writes one query's gradients
/// (overwritten).
#[derive(Debug)]
pub struct QueryGrads<'a, const DIM: usize> {
    /// d L / d q.
    pub query: &'a mut [f32; DIM],
    /// d L / d p.
    pub positive: &'a mut [f32; DIM],
    /// d L / d f_i, a row per negative; rows past the negatives are zeroed.
    pub negative: &'a mut [[f32; DIM]],
}

/// One query's share of the cache loss (see the module docs), from the
/// log-sum-exp of its candidates' scores (`candidates`, the positive not
/// included) and its weighted negatives:
///
/// ```text
/// s = alpha <q, p>,  w = 1 - prob_pos = Z / (exp(s) + Z),  c = w alpha inv_batch
/// training = w (alpha sum_i w_i <q, f_i> - s)
/// dL/dq = c (sum_i w_i f_i - p),  dL/dp = -c q,  dL/df_i = c w_i q
/// ```
///
/// With `control` (beta and the candidates' softmax mean `e_bar`; the
/// negatives' cached rows `e_i` come with them) the query gradient is
/// `c (beta sum_i w_i (f_i - e_i) + e_bar - p)`; the rest is unchanged.
/// `inv_batch` is the normaliser of the batch mean (`1 / B`).
///
/// This is [`CacheLoss::backward`]'s arithmetic for each query, operation
/// for operation (it calls this function), so that a driver that merges
/// the candidates' log-sum-exp and draws from elsewhere (the shards of a
/// distributed cache, `LogSumExp::merge`) computes the same bits as one
/// cache would.
///
/// # Errors
/// [`Error::NonFinite`] if the positive score or a negative embedding is
/// not finite; [`Error::InvalidConfig`] if beta is outside `[0, 1]`;
/// mismatched lengths of the negatives, their weights and the gradient
/// rows.
#[allow(clippy::too_many_arguments)]
pub fn query_terms<S: Fn(usize) -> [f32; DIM], const DIM: usize>(
    query: &[f32; DIM],
    positive: &[f32; DIM],
    candidates: &LogSumExp,
    negatives: QueryNegatives<'_, S, DIM>,
    control: Option<QueryControl<'_, DIM>>,
    alpha: f32,
    inv_batch: f32,
    grads: Option<QueryGrads<'_, DIM>>,
) -> Result<QueryTerms> {
    let pos = PositiveTerms::new(query, positive, candidates, alpha)?;
    let (rows, weights) = (negatives.fresh, negatives.weights);
    let m = rows.len();
    check_len("negative weights", m, weights.len())?;
    if !vector::rows_finite(rows) {
        return Err(Error::NonFinite { what: "fresh negative embedding" });
    }
    if let Some(cv) = &control {
        if !(0.0..=1.0).contains(&cv.beta) {
            return Err(Error::InvalidConfig { what: "control variate beta must be in [0, 1]" });
        }
    }
    if let Some(g) = &grads {
        if g.negative.len() < m {
            return Err(Error::CapacityExceeded { requested: m, capacity: g.negative.len() });
        }
    }
    let w = pos.prob_neg;
    let (mut neg_dot, mut weighted_dot) = (0.0f32, 0.0f32);
    for (f, &wi) in rows.iter().zip(weights) {
        let d = dot(query, f);
        neg_dot += d;
        weighted_dot += wi * d;
    }
    // The highest scores keep their plain mean (as computed before
    // weights existed); for m = 1 both are the one dot product.
    let est_dot = match m {
        0 => 0.0,
        _ if negatives.mean_of_dots => neg_dot / m as f32,
        _ => weighted_dot,
    };
    let mut terms = QueryTerms {
        positive_score: pos.score,
        prob_pos: pos.prob_pos,
        interpretable_loss: pos.interpretable,
        ..QueryTerms::default()
    };
    if m > 0 {
        terms.training_loss = w * (alpha * est_dot - pos.score);
        terms.grad_scale = w * (est_dot - dot(query, positive));
    }
    if let Some(g) = grads {
        let c = if m > 0 { w * alpha * inv_batch } else { 0.0 };
        *g.query = [0.0; DIM];
        match &control {
            None => {
                for (f, &wi) in rows.iter().zip(weights) {
                    vector::axpy(c * wi, f, g.query);
                }
            }
            Some(cv) => {
                // A query without candidates has c = 0 (and a zero mean):
                // no gradient, as without the variate.
                for (i, (f, &wi)) in rows.iter().zip(weights).enumerate() {
                    let k = c * cv.beta * wi;
                    vector::axpy(k, f, g.query);
                    vector::axpy(-k, &(negatives.stale)(i), g.query);
                }
                vector::axpy(c, cv.candidate_mean, g.query);
            }
        }
        vector::axpy(-c, positive, g.query);
        *g.positive = [0.0; DIM];
        vector::axpy(-c, query, g.positive);
        for (i, gn) in g.negative.iter_mut().enumerate() {
            *gn = [0.0; DIM];
            if let Some(&wi) = weights.get(i) {
                vector::axpy(c * wi, query, gn);
            }
        }
    }
    Ok(terms)
}

/// The positive's side of one query's loss, from phase 1's figures: its
/// score, its probability and the candidates' (`1 - prob_pos`, from their
/// own sum), and `-log prob_pos`.
struct PositiveTerms {
    score: f32,
    prob_pos: f32,
    prob_neg: f32,
    interpretable: f32,
}

impl PositiveTerms {
    fn new<const DIM: usize>(query: &[f32; DIM], positive: &[f32; DIM], cand: &LogSumExp, alpha: f32) -> Result<Self> {
        let s = alpha * dot(query, positive);
        if !s.is_finite() {
            return Err(Error::NonFinite { what: "positive score" });
        }
        let mut z = LogSumExp::EMPTY;
        z.push(s);
        z.merge(cand);
        Ok(Self {
            score: s,
            prob_pos: z.weight(s),
            prob_neg: if cand.sum > 0.0 { cand.sum * z.weight(cand.max) } else { 0.0 },
            interpretable: z.minus(s),
        })
    }
}

fn check_inv_temp(inv_temp: f32) -> Result<()> {
    if inv_temp.is_finite() && inv_temp >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidConfig { what: "inverse temperature must be finite and non-negative" })
    }
}

/// The weights of one query's negatives (see the module docs): `cand` is
/// the log-sum-exp of its candidates' scores, `sampling` that of its
/// sampling logits (used by tempered draws). Independent draws of the
/// same slot are merged here into one pick (embedded once) whose weight
/// counts them all.
fn negative_weights<const NEG: usize>(
    picks: &mut Picks<NEG>,
    cand: &LogSumExp,
    sampling: &LogSumExp,
    weighting: Weighting,
) -> [f32; NEG] {
    // P_n / rho_n = exp((c - max) - (t c - max_t)) * sum_t / sum: one
    // exponential of a difference, which neither underflows nor divides
    // by a flushed probability.
    let ratio = |temp: f32, c: f32| math::exp((c - cand.max) - (temp * c - sampling.max)) * (sampling.sum / cand.sum);
    let m = picks.len;
    let mut w = [0.0; NEG];
    match weighting {
        Weighting::One => w[..m].fill(1.0),
        Weighting::Mean => w[..m].fill(if m > 0 { 1.0 / m as f32 } else { 0.0 }),
        Weighting::Ratio(temp) => {
            for (wi, &c) in w[..m].iter_mut().zip(&picks.scores[..m]) {
                *wi = ratio(temp, c);
            }
        }
        Weighting::Replacement(temp) => {
            // Each draw is an unbiased estimate of the softmax mean with
            // weight P_n / rho_n (1 untempered); their mean is one with
            // 1/m of the variance, and weights that never exceed the
            // draw's own ratio.
            let mut count = [0u32; NEG];
            let mut distinct = 0;
            for i in 0..m {
                let slot = picks.slots[i];
                match picks.slots[..distinct].iter().position(|&s| s == slot) {
                    Some(k) => count[k] += 1,
                    None => {
                        picks.slots[distinct] = slot;
                        picks.scores[distinct] = picks.scores[i];
                        count[distinct] = 1;
                        distinct += 1;
                    }
                }
            }
            picks.len = distinct;
            for k in 0..distinct {
                let share = count[k] as f32 / m as f32;
                w[k] = if temp == 1.0 { share } else { share * ratio(temp, picks.scores[k]) };
            }
        }
        Weighting::Priority(temp) => {
            let tau = picks.threshold;
            for (wi, &c) in w[..m].iter_mut().zip(&picks.scores[..m]) {
                let x = temp * c - tau;
                *wi = if x < -15.0 {
                    // q = e^x (1 - e^x / 2 + ...): P / q = exp(c - max - x) / sum
                    // to a relative 2e-7, without q underflowing.
                    math::exp((c - cand.max) - x) / cand.sum
                } else {
                    cand.weight(c) / inclusion_probability(temp * c, tau)
                };
            }
        }
    }
    w
}

/// `|e - f|^2 / |f|^2`; 0 when both are zero, `+inf` when only `f` is.
pub fn relative_staleness<const DIM: usize>(stale: &[f32; DIM], fresh: &[f32; DIM]) -> f32 {
    let d = vector::dist_sq(stale, fresh);
    let f = vector::norm_sq(fresh);
    if d == 0.0 {
        0.0
    } else {
        d / f
    }
}

/// The streaming pass: scores each query against each occupied slot and
/// feeds every candidate, in slot order per query, to the log-sum-exp and
/// the selector of `mode`. Without top-k every unmasked occupied slot is a
/// candidate; with top-k the best slot of each group is (lowest index on
/// ties), at the end of its group. Returns false if a candidate's score was
/// not finite.
///
/// The work is done by `kernel::pass_on` (blocked scoring, block-wise
/// log-sum-exp, one random stream per query, tiles of queries split over
/// `fork`; see `crate::kernel`). The pass is compiled once per storage
/// precision and chosen here, once per call: an `f32` cache is read in
/// place, a bf16 or int8 one is decoded block by block.
#[allow(clippy::too_many_arguments)]
fn stream<I: Item, const DIM: usize, const NEG: usize>(
    cache: CacheRef<'_, I, DIM>,
    queries: &[[f32; DIM]],
    hit_keys: Option<&[u64]>,
    alpha: f32,
    top_k: usize,
    mode: Mode<'_>,
    out: Outputs<'_, NEG, DIM>,
    rng: &mut impl RngCore,
    fork: &impl Fork,
) -> bool {
    // One `Pass` per storage's row type; everything else is shared.
    macro_rules! pass_over {
        ($rows:expr) => {{
            let p = Pass {
                rows: $rows,
                keys: cache.keys(),
                occupied: cache.occupied(),
                range: 0..cache.capacity(),
                queries,
                hits: hit_keys,
                alpha,
                top_k,
                mode,
            };
            kernel::pass_on(fork, &p, out, rng)
        }};
    }
    match cache.embeddings() {
        Stored::F32(r) => pass_over!(&kernel::F32Rows(r)),
        Stored::Bf16(r) => pass_over!(&kernel::Bf16Rows(r)),
        Stored::Int8 { rows, scales } => pass_over!(&kernel::I8Rows { rows, scales }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::NegativeCache;
    use crate::math;
    use crate::parallel::Reversed;
    use crate::random;
    use crate::stats::chi_square;
    use approx::assert_relative_eq;
    use rand_core::SeedableRng;
    use rand_pcg::Pcg64Mcg;

    const D: usize = 4;

    fn rng(seed: u64) -> Pcg64Mcg {
        Pcg64Mcg::seed_from_u64(seed)
    }

    fn random_rows<const N: usize>(r: &mut Pcg64Mcg, scale: f32) -> [[f32; D]; N] {
        core::array::from_fn(|_| core::array::from_fn(|_| scale * random::normal(r)))
    }

    /// A cache whose slot j holds item j with the given embedding.
    fn filled<const N: usize>(emb: &[[f32; D]; N]) -> NegativeCache<u32, N, D> {
        let mut cache = NegativeCache::new();
        let mut c = cache.as_mut();
        for (j, e) in emb.iter().enumerate() {
            c.set_slot(j, e, j as u32, 0, true).unwrap();
        }
        cache
    }

    /// softmax(t * c) in f64: the closed form the samplers must follow.
    fn softmax(c: &[f64], t: f64) -> heapless::Vec<f64, 64> {
        let m = c.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(t * x));
        let z: f64 = c.iter().map(|&x| (t * x - m).exp()).sum();
        c.iter().map(|&x| (t * x - m).exp() / z).collect()
    }

    const NO_MASK: LossConfig = LossConfig { score_scale: 1.0, top_k: 0, mask_accidental_hits: false };

    #[test]
    fn gradients_match_finite_differences() {
        let mut r = rng(7);
        let q: [[f32; D]; 3] = random_rows(&mut r, 1.0);
        let p: [[f32; D]; 3] = random_rows(&mut r, 1.0);
        let stale: [[f32; D]; 5] = random_rows(&mut r, 1.0);
        let cache = filled(&stale);
        let cfg = LossConfig { score_scale: 2.5, ..NO_MASK };
        let mut loss = CacheLoss::<4, 1>::new();
        loss.score_and_sample(cache.as_ref(), &q, &p, None, &cfg, Retrieval::Fixed(&[4, 0, 2]), &mut r, None).unwrap();
        let fresh: [[f32; D]; 3] = random_rows(&mut r, 1.0);
        let (mut gq, mut gp, mut gf) = ([[0.0; D]; 3], [[0.0; D]; 3], [[0.0; D]; 3]);
        let grads = LossGrads { query: &mut gq, positive: &mut gp, negative: &mut gf };
        let sum = loss.backward(cache.as_ref(), &q, &p, &fresh, Some(grads)).unwrap();

        // The loss in f64 with prob_pos held at phase 1's values.
        let w: [f64; 3] = core::array::from_fn(|b| 1.0 - loss.prob_pos()[b] as f64);
        let f64dot = |a: &[f64; D], b: &[f64; D]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let widen = |rows: &[[f32; D]; 3]| rows.map(|r| r.map(|x| x as f64));
        let total = |q: &[[f64; D]; 3], p: &[[f64; D]; 3], f: &[[f64; D]; 3], a: f64| {
            (0..3).map(|b| w[b] * (a * f64dot(&q[b], &f[b]) - a * f64dot(&q[b], &p[b]))).sum::<f64>() / 3.0
        };
        let (q64, p64, f64_) = (widen(&q), widen(&p), widen(&fresh));
        assert_relative_eq!(sum.training_loss as f64, total(&q64, &p64, &f64_, 2.5), max_relative = 1e-5);
        let h = 1e-4;
        for b in 0..3 {
            for i in 0..D {
                let fd = |which: usize| {
                    let (mut qa, mut pa, mut fa) = (q64, p64, f64_);
                    let (mut qb, mut pb, mut fb) = (q64, p64, f64_);
                    let (xa, xb) = match which {
                        0 => (&mut qa[b][i], &mut qb[b][i]),
                        1 => (&mut pa[b][i], &mut pb[b][i]),
                        _ => (&mut fa[b][i], &mut fb[b][i]),
                    };
                    *xa += h;
                    *xb -= h;
                    (total(&qa, &pa, &fa, 2.5) - total(&qb, &pb, &fb, 2.5)) / (2.0 * h)
                };
                assert_relative_eq!(gq[b][i] as f64, fd(0), epsilon = 1e-5, max_relative = 1e-4);
                assert_relative_eq!(gp[b][i] as f64, fd(1), epsilon = 1e-5, max_relative = 1e-4);
                assert_relative_eq!(gf[b][i] as f64, fd(2), epsilon = 1e-5, max_relative = 1e-4);
            }
        }
        let fd_scale = (total(&q64, &p64, &f64_, 2.5 + h) - total(&q64, &p64, &f64_, 2.5 - h)) / (2.0 * h);
        assert_relative_eq!(sum.grad_scale as f64, fd_scale, epsilon = 1e-5, max_relative = 1e-4);
    }

    #[test]
    fn sampled_gradient_is_unbiased_for_the_softmax_gradient() {
        // With fresh == stale embeddings, the mean of the sampled query
        // gradient must approach the exact gradient of the cross-entropy
        // -log softmax over {positive, cache}:
        // alpha * (sum_j P_j e_j - (1 - P_pos) p).
        let mut r = rng(11);
        let q: [[f32; D]; 1] = random_rows(&mut r, 0.7);
        let p: [[f32; D]; 1] = random_rows(&mut r, 0.7);
        let emb: [[f32; D]; 6] = random_rows(&mut r, 0.7);
        let cache = filled(&emb);
        let alpha = 1.5f64;
        let cfg = LossConfig { score_scale: alpha as f32, ..NO_MASK };
        let mut logits = [0f64; 7];
        logits[0] = alpha * (0..D).map(|i| q[0][i] as f64 * p[0][i] as f64).sum::<f64>();
        for j in 0..6 {
            logits[j + 1] = alpha * (0..D).map(|i| q[0][i] as f64 * emb[j][i] as f64).sum::<f64>();
        }
        let pr = softmax(&logits, 1.0);
        let mut exact = [0f64; D];
        for i in 0..D {
            exact[i] =
                alpha * ((0..6).map(|j| pr[j + 1] * emb[j][i] as f64).sum::<f64>() - (1.0 - pr[0]) * p[0][i] as f64);
        }
        let mut loss = CacheLoss::<1, 1>::new();
        let mut mean = [0f64; D];
        let draws = 40_000;
        for _ in 0..draws {
            loss.score_and_sample(
                cache.as_ref(),
                &q,
                &p,
                None,
                &cfg,
                Retrieval::ExpJump { inv_temp: 1.0 },
                &mut r,
                None,
            )
            .unwrap();
            let fresh = [emb[loss.negatives(0)[0] as usize]];
            let (mut gq, mut gp, mut gf) = ([[0.0; D]; 1], [[0.0; D]; 1], [[0.0; D]; 1]);
            let grads = LossGrads { query: &mut gq, positive: &mut gp, negative: &mut gf };
            loss.backward(cache.as_ref(), &q, &p, &fresh, Some(grads)).unwrap();
            for i in 0..D {
                mean[i] += gq[0][i] as f64 / draws as f64;
            }
        }
        for i in 0..D {
            // Per-draw gradients are O(1), so 4e4 draws give s.e. < 0.01.
            assert!((mean[i] - exact[i]).abs() < 0.03, "dim {i}: {} vs {}", mean[i], exact[i]);
        }
    }

    /// Draws `n` negatives for one query and checks their distribution
    /// against softmax(inv_temp * candidate scores) by a chi-square test.
    fn check_sampler(retrieval: Retrieval<'_>, inv_temp: f64, top_k: usize, seed: u64) {
        let mut r = rng(seed);
        let q: [[f32; D]; 1] = random_rows(&mut r, 1.0);
        let emb: [[f32; D]; 12] = random_rows(&mut r, 0.8);
        let cache = filled(&emb);
        let cfg = LossConfig { top_k, ..NO_MASK };
        let score = |j: usize| (0..D).map(|i| q[0][i] * emb[j][i]).sum::<f32>() as f64;
        // Candidates: all slots, or each group's best.
        let mut cand: heapless::Vec<usize, 12> = heapless::Vec::new();
        if let Some(g) = 12usize.checked_div(top_k) {
            for k in 0..top_k {
                let best = (k * g..(k + 1) * g).fold(k * g, |a, j| if score(j) > score(a) { j } else { a });
                cand.push(best).unwrap();
            }
        } else {
            cand.extend(0..12);
        }
        let scores: heapless::Vec<f64, 12> = cand.iter().map(|&j| score(j)).collect();
        let probs = softmax(&scores, inv_temp);
        let mut counts = [0u64; 12];
        let mut loss = CacheLoss::<1, 1>::new();
        for _ in 0..100_000 {
            loss.score_and_sample(cache.as_ref(), &q, &q, None, &cfg, retrieval, &mut r, None).unwrap();
            let slot = loss.negatives(0)[0] as usize;
            let pos = cand.iter().position(|&c| c == slot).expect("a non-candidate was drawn");
            counts[pos] += 1;
        }
        let t = chi_square(&counts[..cand.len()], &probs).unwrap();
        assert!(t.p_value > 0.001, "{retrieval:?} top_k {top_k}: {t:?} {counts:?}");
    }

    #[test]
    fn gumbel_max_follows_the_softmax() {
        check_sampler(Retrieval::Gumbel { inv_temp: 1.0 }, 1.0, 0, 1);
        check_sampler(Retrieval::Gumbel { inv_temp: 2.5 }, 2.5, 0, 2);
        check_sampler(Retrieval::Gumbel { inv_temp: 1.0 }, 1.0, 4, 3);
    }

    #[test]
    fn exp_jump_follows_the_softmax() {
        check_sampler(Retrieval::ExpJump { inv_temp: 1.0 }, 1.0, 0, 4);
        check_sampler(Retrieval::ExpJump { inv_temp: 0.3 }, 0.3, 0, 5);
        check_sampler(Retrieval::ExpJump { inv_temp: 1.0 }, 1.0, 3, 6);
        check_sampler(Retrieval::ExpJump { inv_temp: 0.0 }, 0.0, 0, 7);
    }

    #[test]
    fn gumbel_top_two_draws_without_replacement() {
        // P(first = i, second = j) = p_i * p_j / (1 - p_i).
        let mut r = rng(9);
        let q: [[f32; D]; 1] = random_rows(&mut r, 1.0);
        let emb: [[f32; D]; 4] = random_rows(&mut r, 1.0);
        let cache = filled(&emb);
        let scores: heapless::Vec<f64, 4> =
            (0..4).map(|j| (0..D).map(|i| q[0][i] * emb[j][i]).sum::<f32>() as f64).collect();
        let p = softmax(&scores, 1.0);
        let mut want = [0f64; 16];
        for i in 0..4 {
            for j in 0..4 {
                if i != j {
                    want[i * 4 + j] = p[i] * p[j] / (1.0 - p[i]);
                }
            }
        }
        let mut counts = [0u64; 16];
        let mut loss = CacheLoss::<1, 2>::new();
        // The draws' own seed: with the per-query streams of
        // `crate::kernel`, continuing from seed 9 lands on p = 0.00098 (a
        // 1-in-1000 event); over seeds 0..30 the p-values look uniform.
        let mut r = rng(90);
        for _ in 0..100_000 {
            let retrieval = Retrieval::Gumbel { inv_temp: 1.0 };
            loss.score_and_sample(cache.as_ref(), &q, &q, None, &NO_MASK, retrieval, &mut r, None).unwrap();
            let n = loss.negatives(0);
            assert_eq!(n.len(), 2);
            counts[n[0] as usize * 4 + n[1] as usize] += 1;
        }
        let t = chi_square(&counts, &want).unwrap();
        assert!(t.p_value > 0.001, "{t:?}");
    }

    #[test]
    fn empty_and_masked_slots_are_never_candidates() {
        let mut r = rng(3);
        let q: [[f32; D]; 2] = random_rows(&mut r, 1.0);
        let p: [[f32; D]; 2] = random_rows(&mut r, 1.0);
        let mut cache = NegativeCache::<u32, 8, D>::new();
        let mut loss = CacheLoss::<2, 1>::new();
        let cfg = LossConfig::DEFAULT;
        // Empty cache: no negative, prob_pos 1, zero loss.
        let items = [5u32, 5];
        loss.score_and_sample(cache.as_ref(), &q, &p, Some(&items), &cfg, Retrieval::default(), &mut r, None).unwrap();
        assert_eq!(loss.prob_pos(), &[1.0, 1.0]);
        assert!(loss.negatives(0).is_empty());
        let s = loss.backward(cache.as_ref(), &q, &p, &[[0.0; D]; 2], None).unwrap();
        assert_eq!(s.training_loss, 0.0);
        // Slot 2 holds both queries' positive item 5; slot 1 holds item 7;
        // the rest are empty.
        let mut c = cache.as_mut();
        c.set_slot(2, &p[0], 5, 0, true).unwrap();
        c.set_slot(1, &q[0], 7, 0, true).unwrap();
        for _ in 0..200 {
            loss.score_and_sample(
                cache.as_ref(),
                &q,
                &p,
                Some(&items),
                &cfg,
                Retrieval::Gumbel { inv_temp: 1.0 },
                &mut r,
                None,
            )
            .unwrap();
            assert_eq!(loss.negatives(0), &[1]);
            assert_eq!(loss.negatives(1), &[1]);
        }
        // prob_pos over {positive, slot 1} only: 1 / (1 + e^(c - s)).
        let s0 = dot(&q[0], &p[0]);
        let c0 = dot(&q[0], &q[0]);
        assert_relative_eq!(loss.prob_pos()[0], 1.0 / (1.0 + math::exp(c0 - s0)), max_relative = 1e-5);
        // Without masking, the positive's copy becomes a candidate.
        loss.score_and_sample(cache.as_ref(), &q, &p, Some(&items), &NO_MASK, Retrieval::MaxScore, &mut r, None)
            .unwrap();
        assert!(loss.prob_pos()[0] < 1.0 / (1.0 + math::exp(c0 - s0)));
    }

    #[test]
    fn max_score_breaks_ties_to_the_lower_slot() {
        let emb = [[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]];
        let cache = filled(&emb);
        let q = [[1.0, 0.0, 0.0, 0.0]];
        let mut loss = CacheLoss::<1, 1>::new();
        loss.score_and_sample(cache.as_ref(), &q, &q, None, &NO_MASK, Retrieval::MaxScore, &mut rng(0), None).unwrap();
        assert_eq!(loss.negatives(0), &[1]);
        let cfg = LossConfig { top_k: 2, ..NO_MASK };
        let (mut s, mut i) = ([0.0; 2], [0u32; 2]);
        let out = TopKOut { scores: &mut s, slots: &mut i };
        loss.score_and_sample(cache.as_ref(), &q, &q, None, &cfg, Retrieval::Fixed(&[1]), &mut rng(0), Some(out))
            .unwrap();
        assert_eq!(i, [1, 2]);
        assert_eq!(s, [2.0, 2.0]);
        assert_eq!(loss.negatives(0), &[2]);
    }

    #[test]
    fn large_scales_stay_finite() {
        // Unit vectors at scale 1000: scores up to 1000, where exp overflows.
        let emb = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0]];
        let cache = filled(&emb);
        let q = [[0.8, 0.6, 0.0, 0.0]];
        let p = [[0.0, 0.0, 1.0, 0.0]];
        let cfg = LossConfig { score_scale: 1000.0, ..NO_MASK };
        let mut loss = CacheLoss::<1, 1>::new();
        loss.score_and_sample(
            cache.as_ref(),
            &q,
            &p,
            None,
            &cfg,
            Retrieval::ExpJump { inv_temp: 1.0 },
            &mut rng(1),
            None,
        )
        .unwrap();
        // log Z = 960 + ln(1 + e^-160 + ...) ~ 960 (slot 2 scores 960).
        assert_relative_eq!(loss.interpretable_loss()[0], 960.0, max_relative = 1e-6);
        assert_eq!(loss.negatives(0), &[2]);
        assert_eq!(loss.prob_pos()[0], 0.0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cache = filled(&[[1.0; D]; 6]);
        let mut loss = CacheLoss::<2, 1>::new();
        let q = [[1.0; D]; 2];
        let mut r = rng(0);
        let nan = [[f32::NAN; D]; 2];
        let run =
            |loss: &mut CacheLoss<2, 1>, q: &[[f32; D]], cfg: &LossConfig, ret: Retrieval<'_>, r: &mut Pcg64Mcg| {
                loss.score_and_sample(cache.as_ref(), q, q, None, cfg, ret, r, None)
            };
        assert_eq!(
            run(&mut loss, &nan, &NO_MASK, Retrieval::MaxScore, &mut r),
            Err(Error::NonFinite { what: "query embedding" })
        );
        let k4 = LossConfig { top_k: 4, ..NO_MASK };
        assert_eq!(run(&mut loss, &q, &k4, Retrieval::MaxScore, &mut r), Err(Error::TopKNotDivisor { k: 4, slots: 6 }));
        assert!(matches!(
            run(&mut loss, &[[1.0; D]; 3], &NO_MASK, Retrieval::MaxScore, &mut r),
            Err(Error::CapacityExceeded { .. })
        ));
        assert!(matches!(
            run(&mut loss, &q, &NO_MASK, Retrieval::Fixed(&[0, 6]), &mut r),
            Err(Error::IndexOutOfRange { .. })
        ));
        assert!(matches!(
            run(&mut loss, &q, &LossConfig::DEFAULT, Retrieval::MaxScore, &mut r),
            Err(Error::InvalidConfig { .. })
        ));
        // Finite inputs whose cache score overflows (4e39) while the
        // positive score (400) does not.
        let huge = filled(&[[1e38; D]; 2]);
        let ten = [[10.0; D]; 2];
        let e = loss.score_and_sample(huge.as_ref(), &ten, &ten, None, &NO_MASK, Retrieval::MaxScore, &mut r, None);
        assert_eq!(e, Err(Error::NonFinite { what: "cache score" }));
        let mut two = CacheLoss::<2, 2>::new();
        let e = two.score_and_sample(cache.as_ref(), &q, &q, None, &NO_MASK, Retrieval::Fixed(&[0, 1]), &mut r, None);
        assert!(matches!(e, Err(Error::Unsupported { .. })));
    }

    // ---- Several negatives and tempered draws: unbiasedness ----

    /// `alpha * <x, y>` in f64 from f32 inputs.
    fn score64(alpha: f32, x: &[f32; D], y: &[f32; D]) -> f64 {
        alpha as f64 * (0..D).map(|d| x[d] as f64 * y[d] as f64).sum::<f64>()
    }

    /// Inclusion probabilities of m ordered draws without replacement with
    /// probabilities `rho` (Plackett-Luce), by enumerating every ordered
    /// sequence: `P(s_1..s_m) = prod_k rho_{s_k} / (1 - sum_{l<k} rho_{s_l})`.
    fn plackett_luce_inclusion(rho: &[f64], m: usize) -> heapless::Vec<f64, 8> {
        fn walk(rho: &[f64], left: usize, used: &mut [bool; 8], prob: f64, acc: &mut [f64]) {
            if left == 0 {
                for (j, &u) in used.iter().enumerate().take(rho.len()) {
                    if u {
                        acc[j] += prob;
                    }
                }
                return;
            }
            let rest: f64 = 1.0 - (0..rho.len()).filter(|&j| used[j]).map(|j| rho[j]).sum::<f64>();
            for j in 0..rho.len() {
                if !used[j] {
                    used[j] = true;
                    walk(rho, left - 1, used, prob * rho[j] / rest, acc);
                    used[j] = false;
                }
            }
        }
        let mut acc: heapless::Vec<f64, 8> = rho.iter().map(|_| 0.0).collect();
        walk(rho, m.min(rho.len()), &mut [false; 8], 1.0, &mut acc);
        acc
    }

    /// What one Monte Carlo check of the cache loss's estimator found: the
    /// distance of the old averaging estimator's exact expectation from
    /// the exact gradient, in standard errors of the new one.
    #[derive(Debug)]
    struct Found {
        /// max over dimensions of |old E[dL/dq] - exact| / s.e.
        old_grad_sigmas: f64,
        /// |old E[weight of the dominant candidate] - P| / s.e.
        old_weight_sigmas: f64,
    }

    /// Draws `draws` negative sets for one query with `NEG = M` and stale
    /// = fresh, and checks, against closed forms in f64:
    ///
    /// - the mean query gradient equals the exact softmax gradient
    ///   `alpha (1 - p) (sum_j P_j e_j - p)`, within 5 standard errors
    ///   (plus 1e-5 for f32 rounding);
    /// - each candidate's mean weight (read off `dL/df = c w q`, so that the
    ///   check also ran on the code before weights existed) equals its
    ///   softmax probability `P_j`, within 5 standard errors (plus 1e-6).
    ///
    /// The old estimator (every negative weighted `1 / m`) has expected
    /// weight `pi_j / m`, with `pi_j` the exact Plackett-Luce inclusion
    /// probability under `softmax(inv_temp * c)`; the result says how many
    /// standard errors it would have been off.
    #[allow(clippy::too_many_arguments)]
    fn check_estimator<const N: usize, const M: usize>(
        emb: &[[f32; D]; N],
        q: &[f32; D],
        p: &[f32; D],
        alpha: f32,
        top_k: usize,
        retrieval: Retrieval<'_>,
        draws: usize,
        seed: u64,
    ) -> Found {
        let inv_temp = match retrieval {
            Retrieval::Gumbel { inv_temp } | Retrieval::ExpJump { inv_temp } => inv_temp as f64,
            _ => unreachable!(),
        };
        let cache = filled(emb);
        let cfg = LossConfig { score_scale: alpha, top_k, ..NO_MASK };
        // Candidates: every slot, or each group's best.
        let mut cand: heapless::Vec<usize, 16> = heapless::Vec::new();
        if let Some(g) = N.checked_div(top_k) {
            for k in 0..top_k {
                let best = (k * g..(k + 1) * g).fold(k * g, |a, j| {
                    if score64(alpha, q, &emb[j]) > score64(alpha, q, &emb[a]) {
                        j
                    } else {
                        a
                    }
                });
                cand.push(best).unwrap();
            }
        } else {
            cand.extend(0..N);
        }
        let c: heapless::Vec<f64, 16> = cand.iter().map(|&j| score64(alpha, q, &emb[j])).collect();
        let big_p = softmax(&c, 1.0);
        let rho = softmax(&c, inv_temp);
        let s = score64(alpha, q, p);
        let mx = c.iter().fold(s, |a, &x| a.max(x));
        let z = (s - mx).exp() + c.iter().map(|&x| (x - mx).exp()).sum::<f64>();
        let neg = 1.0 - (s - mx).exp() / z;
        let exact: [f64; D] = core::array::from_fn(|d| {
            alpha as f64
                * neg
                * (cand.iter().zip(&big_p).map(|(&j, &pj)| pj * emb[j][d] as f64).sum::<f64>() - p[d] as f64)
        });
        let pi = plackett_luce_inclusion(&rho, M);
        let old: [f64; D] = core::array::from_fn(|d| {
            alpha as f64
                * neg
                * (cand.iter().zip(&pi).map(|(&j, &pj)| pj / M.min(cand.len()) as f64 * emb[j][d] as f64).sum::<f64>()
                    - p[d] as f64)
        });

        let mut r = rng(seed);
        let mut loss = CacheLoss::<1, M>::new();
        let (mut g1, mut g2) = ([0f64; D], [0f64; D]);
        let (mut w1, mut w2) = ([0f64; 16], [0f64; 16]);
        let q_norm2 = (0..D).map(|d| q[d] as f64 * q[d] as f64).sum::<f64>();
        for _ in 0..draws {
            loss.score_and_sample(cache.as_ref(), &[*q], &[*p], None, &cfg, retrieval, &mut r, None).unwrap();
            let negs: heapless::Vec<u32, M> = loss.negatives(0).iter().copied().collect();
            let mut fresh = [[0.0f32; D]; M];
            for (i, &slot) in negs.iter().enumerate() {
                fresh[i] = emb[slot as usize];
            }
            let (mut gq, mut gp, mut gf) = ([[0.0; D]; 1], [[0.0; D]; 1], [[0.0; D]; M]);
            let grads = LossGrads { query: &mut gq, positive: &mut gp, negative: &mut gf };
            loss.backward(cache.as_ref(), &[*q], &[*p], &fresh, Some(grads)).unwrap();
            for d in 0..D {
                let g = gq[0][d] as f64;
                g1[d] += g;
                g2[d] += g * g;
            }
            // dL/df_i = alpha (1 - p) w_i q.
            let c = alpha as f64 * (1.0 - loss.prob_pos()[0] as f64);
            let mut per_slot = [0f64; 16];
            for (i, &slot) in negs.iter().enumerate() {
                let proj = (0..D).map(|d| gf[i][d] as f64 * q[d] as f64).sum::<f64>();
                per_slot[cand.iter().position(|&j| j == slot as usize).unwrap()] += proj / (c * q_norm2);
            }
            for k in 0..cand.len() {
                w1[k] += per_slot[k];
                w2[k] += per_slot[k] * per_slot[k];
            }
        }
        let n = draws as f64;
        let se = |s1: f64, s2: f64| ((s2 / n - (s1 / n).powi(2)).max(0.0) / (n - 1.0)).sqrt();
        let mut found = Found { old_grad_sigmas: 0.0, old_weight_sigmas: 0.0 };
        for d in 0..D {
            let (mean, e) = (g1[d] / n, se(g1[d], g2[d]));
            assert!(
                (mean - exact[d]).abs() <= 5.0 * e + 1e-5,
                "{retrieval:?} m {M} top_k {top_k} dim {d}: mean {mean} vs exact {} (s.e. {e})",
                exact[d]
            );
            found.old_grad_sigmas = found.old_grad_sigmas.max((old[d] - exact[d]).abs() / e);
        }
        let dominant = (0..cand.len()).fold(0, |a, k| if big_p[k] > big_p[a] { k } else { a });
        for k in 0..cand.len() {
            let (mean, e) = (w1[k] / n, se(w1[k], w2[k]));
            assert!(
                (mean - big_p[k]).abs() <= 5.0 * e + 1e-6,
                "{retrieval:?} m {M} top_k {top_k} candidate {k}: mean weight {mean} vs P {} (s.e. {e})",
                big_p[k]
            );
            if k == dominant {
                found.old_weight_sigmas = (pi[k] / M.min(cand.len()) as f64 - big_p[k]).abs() / e;
            }
        }
        found
    }

    /// A query, its positive and five cached embeddings, one of which
    /// dominates the softmax (P ~ 0.86 at alpha 2.5).
    const Q5: [f32; D] = [0.6, -0.3, 0.5, 0.2];
    const P5: [f32; D] = [0.2, 0.1, 0.3, -0.4];
    const E5: [[f32; D]; 5] = [
        [1.0, -0.4, 0.9, 0.3],
        [0.1, 0.5, -0.2, 0.4],
        [-0.3, 0.2, 0.1, -0.5],
        [0.4, 0.1, -0.6, 0.2],
        [-0.2, -0.3, 0.3, 0.1],
    ];

    #[test]
    fn several_negatives_and_tempered_draws_are_unbiased() {
        let draws = 100_000;
        let gumbel = |t: f32| Retrieval::Gumbel { inv_temp: t };
        // One draw from the softmax itself: unbiased before and after.
        check_estimator::<5, 1>(&E5, &Q5, &P5, 2.5, 0, gumbel(1.0), draws, 31);
        // The cases that were biased: the old averaging would have been off
        // by far more than the tolerance (5 s.e.), in the gradient and in
        // the dominant item's weight (its P, not inclusion / m).
        let biased = [
            check_estimator::<5, 1>(&E5, &Q5, &P5, 2.5, 0, gumbel(0.5), draws, 32),
            check_estimator::<5, 1>(&E5, &Q5, &P5, 2.5, 0, Retrieval::ExpJump { inv_temp: 0.5 }, draws, 33),
            check_estimator::<5, 2>(&E5, &Q5, &P5, 2.5, 0, gumbel(1.0), draws, 34),
            check_estimator::<5, 2>(&E5, &Q5, &P5, 2.5, 0, gumbel(0.5), draws, 35),
            check_estimator::<5, 3>(&E5, &Q5, &P5, 2.5, 0, gumbel(1.0), draws, 36),
            check_estimator::<5, 3>(&E5, &Q5, &P5, 2.5, 0, gumbel(0.5), draws, 37),
        ];
        for f in &biased {
            assert!(f.old_grad_sigmas > 20.0 && f.old_weight_sigmas > 20.0, "{f:?}");
        }
        // Top-k candidates (group bests, scored one at a time), tempered.
        let mut r = rng(38);
        let emb: [[f32; D]; 6] = random_rows(&mut r, 0.8);
        check_estimator::<6, 1>(&emb, &Q5, &P5, 2.0, 3, gumbel(0.5), draws, 39);
        check_estimator::<6, 2>(&emb, &Q5, &P5, 2.0, 3, gumbel(0.5), draws, 40);
        // m equal to the number of candidates: all drawn, q = 1, w = P.
        check_estimator::<6, 3>(&emb, &Q5, &P5, 2.0, 3, gumbel(1.0), 1_000, 41);
        // Independent draws (exponential jumps, m > 1), plain, tempered
        // and over top-k candidates.
        let jump = |t: f32| Retrieval::ExpJump { inv_temp: t };
        check_estimator::<5, 2>(&E5, &Q5, &P5, 2.5, 0, jump(1.0), draws, 42);
        check_estimator::<5, 3>(&E5, &Q5, &P5, 2.5, 0, jump(0.5), draws, 43);
        check_estimator::<6, 2>(&emb, &Q5, &P5, 2.0, 3, jump(0.5), draws, 44);
    }

    #[test]
    fn independent_draws_are_independent_softmax_draws() {
        // Two reservoirs: after merging, the picks in reservoir order give
        // the ordered pair drawn; its frequency must be P_i P_j (5 s.e.),
        // and the weights 1 for a pair of equal draws, 1/2 each otherwise.
        let cache = filled(&E5);
        let alpha = 2.5f32;
        let cfg = LossConfig { score_scale: alpha, ..NO_MASK };
        let c: heapless::Vec<f64, 8> = E5.iter().map(|e| score64(alpha, &Q5, e)).collect();
        let big_p = softmax(&c, 1.0);
        let mut r = rng(45);
        let mut loss = CacheLoss::<1, 2>::new();
        let mut seen = [[0u32; 5]; 5];
        let n = 200_000;
        for _ in 0..n {
            let ret = Retrieval::ExpJump { inv_temp: 1.0 };
            loss.score_and_sample(cache.as_ref(), &[Q5], &[P5], None, &cfg, ret, &mut r, None).unwrap();
            let (negs, w) = (loss.negatives(0), loss.negative_weights(0));
            match negs.len() {
                1 => {
                    assert_eq!(w[0].to_bits(), 1.0f32.to_bits());
                    seen[negs[0] as usize][negs[0] as usize] += 1;
                }
                2 => {
                    assert_ne!(negs[0], negs[1]);
                    assert_eq!(w, &[0.5, 0.5]);
                    seen[negs[0] as usize][negs[1] as usize] += 1;
                }
                k => panic!("{k} picks"),
            }
        }
        for i in 0..5 {
            for j in 0..5 {
                let want = big_p[i] * big_p[j];
                let got = f64::from(seen[i][j]) / n as f64;
                let se = (want * (1.0 - want) / n as f64).sqrt();
                assert!((got - want).abs() <= 5.0 * se + 1e-6, "pair ({i}, {j}): {got} vs {want}");
            }
        }
    }

    /// The variance (summed over the dimensions) of the query gradient's
    /// estimate over `draws` passes.
    fn query_gradient_variance<const M: usize>(
        emb: &[[f32; D]; 64],
        alpha: f32,
        ret: Retrieval<'_>,
        draws: usize,
    ) -> f64 {
        let cache = filled(emb);
        let cfg = LossConfig { score_scale: alpha, ..NO_MASK };
        let mut r = rng(46);
        let mut loss = CacheLoss::<1, M>::new();
        let (mut g1, mut g2) = ([0f64; D], [0f64; D]);
        for _ in 0..draws {
            loss.score_and_sample(cache.as_ref(), &[Q5], &[P5], None, &cfg, ret, &mut r, None).unwrap();
            let mut fresh = [[0.0f32; D]; M];
            for (i, &slot) in loss.negatives(0).iter().enumerate() {
                fresh[i] = emb[slot as usize];
            }
            let (mut gq, mut gp, mut gf) = ([[0.0; D]; 1], [[0.0; D]; 1], [[0.0; D]; M]);
            let grads = LossGrads { query: &mut gq, positive: &mut gp, negative: &mut gf };
            loss.backward(cache.as_ref(), &[Q5], &[P5], &fresh, Some(grads)).unwrap();
            for d in 0..D {
                g1[d] += gq[0][d] as f64;
                g2[d] += (gq[0][d] as f64).powi(2);
            }
        }
        let n = draws as f64;
        (0..D).map(|d| g2[d] / n - (g1[d] / n).powi(2)).sum()
    }

    #[test]
    fn independent_draws_cut_the_variance_where_priority_weights_do_not() {
        // 64 cached rows, one of them near the query (it dominates the
        // softmax, as a near-synonym does): two independent draws halve
        // one draw's variance; Gumbel-top-2's Horvitz-Thompson weights,
        // whose threshold is then the second key of the rest, have more
        // variance than one draw.
        let mut r = rng(47);
        let mut emb: [[f32; D]; 64] = random_rows(&mut r, 0.3);
        emb[9] = Q5;
        let (alpha, draws) = (6.0, 40_000);
        let one = query_gradient_variance::<1>(&emb, alpha, Retrieval::ExpJump { inv_temp: 1.0 }, draws);
        let two = query_gradient_variance::<2>(&emb, alpha, Retrieval::ExpJump { inv_temp: 1.0 }, draws);
        let ht = query_gradient_variance::<2>(&emb, alpha, Retrieval::Gumbel { inv_temp: 1.0 }, draws);
        // Sampling error of a variance estimate at 40,000 draws: a few %.
        assert!((two / one - 0.5).abs() < 0.05, "two draws {two} vs one {one}");
        assert!(ht > one, "Gumbel-top-2 {ht} vs one draw {one}");
    }

    #[test]
    fn single_draws_at_temperature_one_keep_weight_exactly_one() {
        // The reference cases and every earlier run use these paths; their
        // numbers must not move, so the weight must be exactly 1.0.
        let cache = filled(&E5);
        let mut r = rng(5);
        let mut loss = CacheLoss::<2, 1>::new();
        let q = [Q5, P5];
        for (ret, top_k) in [
            (Retrieval::ExpJump { inv_temp: 1.0 }, 0),
            (Retrieval::Gumbel { inv_temp: 1.0 }, 0),
            (Retrieval::ExpJump { inv_temp: 1.0 }, 5),
            (Retrieval::Gumbel { inv_temp: 1.0 }, 5),
            (Retrieval::Fixed(&[3, 1]), 0),
            (Retrieval::MaxScore, 0),
        ] {
            let cfg = LossConfig { top_k, ..NO_MASK };
            for _ in 0..50 {
                loss.score_and_sample(cache.as_ref(), &q, &q, None, &cfg, ret, &mut r, None).unwrap();
                for b in 0..2 {
                    let w = loss.negative_weights(b);
                    assert_eq!(w.len(), 1);
                    assert_eq!(w[0].to_bits(), 1.0f32.to_bits(), "{ret:?}");
                }
            }
        }
    }

    #[test]
    fn weights_are_what_backward_applies() {
        // dL/df_i = (1 - p) alpha w_i q / B for the weights reported, and
        // a tempered single draw reports P_n / rho_n (closed form, f64).
        let cache = filled(&E5);
        let mut r = rng(6);
        let alpha = 2.5f32;
        let cfg = LossConfig { score_scale: alpha, ..NO_MASK };
        let c: heapless::Vec<f64, 8> = E5.iter().map(|e| score64(alpha, &Q5, e)).collect();
        let (big_p, rho) = (softmax(&c, 1.0), softmax(&c, 0.5));
        let mut one = CacheLoss::<1, 1>::new();
        for ret in [Retrieval::Gumbel { inv_temp: 0.5 }, Retrieval::ExpJump { inv_temp: 0.5 }] {
            one.score_and_sample(cache.as_ref(), &[Q5], &[P5], None, &cfg, ret, &mut r, None).unwrap();
            let n = one.negatives(0)[0] as usize;
            assert_relative_eq!(one.negative_weights(0)[0] as f64, big_p[n] / rho[n], max_relative = 1e-5);
        }
        let mut three = CacheLoss::<1, 3>::new();
        let ret = Retrieval::Gumbel { inv_temp: 0.5 };
        three.score_and_sample(cache.as_ref(), &[Q5], &[P5], None, &cfg, ret, &mut r, None).unwrap();
        let fresh: [[f32; D]; 3] = random_rows(&mut r, 1.0);
        let (mut gq, mut gp, mut gf) = ([[0.0; D]; 1], [[0.0; D]; 1], [[0.0; D]; 3]);
        let grads = LossGrads { query: &mut gq, positive: &mut gp, negative: &mut gf };
        three.backward(cache.as_ref(), &[Q5], &[P5], &fresh, Some(grads)).unwrap();
        let k = alpha * (1.0 - three.prob_pos()[0]);
        for (i, &w) in three.negative_weights(0).iter().enumerate() {
            assert!(w > 0.0 && w.is_finite());
            for d in 0..D {
                assert_relative_eq!(gf[i][d], k * w * Q5[d], epsilon = 1e-6, max_relative = 1e-5);
            }
        }
    }

    // ---- The control variate ----

    #[test]
    fn candidate_mean_is_the_softmax_mean_of_the_stale_rows() {
        // 20 queries (two tiles of lanes) against 37 slots (a partial
        // block), one slot empty and one query's positive masked; and the
        // top-k path (group bests, scored one at a time). Reference: the
        // closed form sum_j P_j e_j in f64 over the same candidates.
        let mut r = rng(12);
        let emb: [[f32; D]; 36] = random_rows(&mut r, 0.7);
        let mut cache = NegativeCache::<u32, 37, D>::new();
        let mut cm = cache.as_mut();
        for (j, e) in emb.iter().enumerate() {
            if j != 5 {
                cm.set_slot(j, e, j as u32, 0, true).unwrap();
            }
        }
        cm.set_slot(36, &emb[0], 36, 0, true).unwrap();
        let q: [[f32; D]; 20] = random_rows(&mut r, 1.0);
        let items: [u32; 20] = core::array::from_fn(|b| if b == 3 { 7 } else { 1000 + b as u32 });
        let alpha = 2.0f32;
        let row = |j: usize| if j == 36 { emb[0] } else { emb[j] };
        for top_k in [0usize, 1] {
            let cfg = LossConfig { score_scale: alpha, top_k, mask_accidental_hits: true };
            let mut loss = CacheLoss::<20, 1>::new();
            let mut mean = [[0.0f32; D]; 20];
            let ret = Retrieval::Gumbel { inv_temp: 1.0 };
            loss.score_and_sample_with(
                cache.as_ref(),
                &q,
                &q,
                Some(&items),
                &cfg,
                ret,
                &mut r,
                None,
                Some(&mut mean),
                &Serial,
            )
            .unwrap();
            for b in 0..20 {
                let cand: heapless::Vec<usize, 37> = (0..37).filter(|&j| j != 5 && !(b == 3 && j == 7)).collect();
                let cand: heapless::Vec<usize, 37> = if top_k == 1 {
                    let best = cand.iter().copied().fold(cand[0], |a, j| {
                        if score64(alpha, &q[b], &row(j)) > score64(alpha, &q[b], &row(a)) {
                            j
                        } else {
                            a
                        }
                    });
                    core::iter::once(best).collect()
                } else {
                    cand
                };
                let c: heapless::Vec<f64, 37> = cand.iter().map(|&j| score64(alpha, &q[b], &row(j))).collect();
                let pr = softmax(&c, 1.0);
                for (d, &got) in mean[b].iter().enumerate() {
                    let want = cand.iter().zip(&pr).map(|(&j, &pj)| pj * row(j)[d] as f64).sum::<f64>();
                    assert_relative_eq!(got as f64, want, epsilon = 1e-5, max_relative = 1e-4);
                }
            }
        }
        // No candidate: a zero mean.
        let empty = NegativeCache::<u32, 4, D>::new();
        let mut loss = CacheLoss::<1, 1>::new();
        let mut mean = [[9.0f32; D]; 1];
        loss.score_and_sample_with(
            empty.as_ref(),
            &q[..1],
            &q[..1],
            None,
            &NO_MASK,
            Retrieval::default(),
            &mut r,
            None,
            Some(&mut mean),
            &Serial,
        )
        .unwrap();
        assert_eq!(mean, [[0.0; D]; 1]);
    }

    #[test]
    fn a_split_pass_computes_the_serial_bits() {
        let fixed: [usize; 150] = core::array::from_fn(|b| (b * 3) % 5);
        split_matches_serial::<1>(&[
            (Retrieval::ExpJump { inv_temp: 1.0 }, 0),
            (Retrieval::ExpJump { inv_temp: 0.5 }, 0),
            (Retrieval::Gumbel { inv_temp: 0.7 }, 0),
            (Retrieval::MaxScore, 0),
            (Retrieval::Gumbel { inv_temp: 1.0 }, 5),
            (Retrieval::Fixed(&fixed), 5),
        ]);
        split_matches_serial::<3>(&[
            (Retrieval::ExpJump { inv_temp: 1.0 }, 0),
            (Retrieval::ExpJump { inv_temp: 0.5 }, 5),
            (Retrieval::Gumbel { inv_temp: 1.0 }, 0),
        ]);
    }

    /// 150 queries (two chunks of seeds: 128 and 22; nine full tiles and a
    /// partial one) against 300 slots (a partial block), an empty slot,
    /// masked positives, in each of `modes`: outputs, draws and weights bit
    /// for bit.
    fn split_matches_serial<const M: usize>(modes: &[(Retrieval<'_>, usize)]) {
        let mut r = rng(21);
        let emb: [[f32; D]; 300] = random_rows(&mut r, 0.8);
        let mut cache = filled(&emb);
        cache.as_mut().set_occupied(17, false).unwrap();
        let q: [[f32; D]; 150] = random_rows(&mut r, 1.0);
        let items: [u32; 150] = core::array::from_fn(|b| (b as u32 * 7) % 300);
        for &(ret, top_k) in modes {
            let cfg = LossConfig { score_scale: 3.0, top_k, mask_accidental_hits: true };
            let run = |split: bool| {
                let mut loss = CacheLoss::<150, M>::new();
                let mut mean = [[0.0f32; D]; 150];
                let (mut ts, mut tl) = ([0.0f32; 750], [0u32; 750]);
                let top = (top_k > 0).then(|| TopKOut { scores: &mut ts[..], slots: &mut tl[..] });
                let mut g = rng(5);
                let (m, p) = (Some(&mut mean[..]), Some(&items[..]));
                let cache = cache.as_ref();
                if split {
                    loss.score_and_sample_with(cache, &q, &q, p, &cfg, ret, &mut g, top, m, &Reversed::default())
                        .unwrap();
                } else {
                    loss.score_and_sample_with(cache, &q, &q, p, &cfg, ret, &mut g, top, m, &Serial).unwrap();
                }
                (loss, mean, ts, tl, g.next_u64())
            };
            let (a, b) = (run(false), run(true));
            for k in 0..150 {
                assert_eq!(a.0.negatives(k), b.0.negatives(k), "{ret:?} query {k}");
                assert_eq!(a.0.positive_slot(k), b.0.positive_slot(k));
                assert_eq!(a.0.candidate_lse(k).max.to_bits(), b.0.candidate_lse(k).max.to_bits());
                assert_eq!(a.0.candidate_lse(k).sum.to_bits(), b.0.candidate_lse(k).sum.to_bits());
                assert_eq!(a.0.sampling_lse(k).sum.to_bits(), b.0.sampling_lse(k).sum.to_bits());
                let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<heapless::Vec<u32, M>>();
                assert_eq!(bits(a.0.negative_weights(k)), bits(b.0.negative_weights(k)));
                for d in 0..D {
                    assert_eq!(a.1[k][d].to_bits(), b.1[k][d].to_bits());
                }
            }
            assert_eq!(a.2.map(f32::to_bits), b.2.map(f32::to_bits));
            assert_eq!(a.3, b.3);
            // The caller's generator advanced by the same draws.
            assert_eq!(a.4, b.4);
        }
    }

    #[test]
    fn control_variate_keeps_the_expectation_and_cuts_the_variance() {
        // Exact enumeration: with one draw at temperature 1, slot j is the
        // negative with probability P_j (the sampler's law, checked by
        // `exp_jump_follows_the_softmax`), and its weight is 1; so every
        // expectation is sum_j P_j g(j), with g(j) the gradient computed
        // with `Retrieval::Fixed(&[j])`.
        let mut r = rng(13);
        let alpha = 2.5f32;
        let cfg = LossConfig { score_scale: alpha, ..NO_MASK };
        let cache = filled(&E5);
        let c: heapless::Vec<f64, 8> = E5.iter().map(|e| score64(alpha, &Q5, e)).collect();
        let big_p = softmax(&c, 1.0);
        for (noise, cuts) in [(0.01f32, true), (1.0, false)] {
            let fresh_all: [[f32; D]; 5] =
                core::array::from_fn(|j| core::array::from_fn(|d| E5[j][d] + noise * random::normal(&mut r)));
            let mut loss = CacheLoss::<1, 1>::new();
            // g[k][j]: estimator k (plain, beta 1, beta 0.5, beta 0) with
            // negative j.
            let mut g = [[[0f64; D]; 5]; 4];
            let mut mean = [[0.0f32; D]; 1];
            let mut neg = 0.0;
            for j in 0..5 {
                let fixed = [j];
                loss.score_and_sample_with(
                    cache.as_ref(),
                    &[Q5],
                    &[P5],
                    None,
                    &cfg,
                    Retrieval::Fixed(&fixed),
                    &mut r,
                    None,
                    Some(&mut mean),
                    &Serial,
                )
                .unwrap();
                neg = 1.0 - loss.prob_pos()[0] as f64;
                for (k, beta) in [None, Some(1.0), Some(0.5), Some(0.0)].into_iter().enumerate() {
                    let cv = beta.map(|beta| ControlVariate { beta, candidate_mean: &mean });
                    let (mut gq, mut gp, mut gf) = ([[0.0; D]; 1], [[0.0; D]; 1], [[0.0; D]; 1]);
                    let grads = LossGrads { query: &mut gq, positive: &mut gp, negative: &mut gf };
                    loss.backward_with(cache.as_ref(), &[Q5], &[P5], &[fresh_all[j]], cv, Some(grads)).unwrap();
                    g[k][j] = gq[0].map(|x| x as f64);
                    // The item side is the plain estimator's.
                    assert_relative_eq!(gf[0][0], alpha * neg as f32 * Q5[0], max_relative = 1e-5);
                }
            }
            let expect =
                |k: usize| -> [f64; D] { core::array::from_fn(|d| (0..5).map(|j| big_p[j] * g[k][j][d]).sum()) };
            let var = |k: usize| -> f64 {
                let e = expect(k);
                (0..5).map(|j| big_p[j] * (0..D).map(|d| (g[k][j][d] - e[d]).powi(2)).sum::<f64>()).sum()
            };
            // Closed forms: F = sum P f, E_bar = sum P e.
            let fbar: [f64; D] = core::array::from_fn(|d| (0..5).map(|j| big_p[j] * fresh_all[j][d] as f64).sum());
            let ebar: [f64; D] = core::array::from_fn(|d| (0..5).map(|j| big_p[j] * E5[j][d] as f64).sum());
            let a = alpha as f64 * neg;
            for d in 0..D {
                let plain = a * (fbar[d] - P5[d] as f64);
                assert_relative_eq!(expect(0)[d], plain, epsilon = 1e-5, max_relative = 1e-4);
                assert_relative_eq!(expect(1)[d], plain, epsilon = 1e-5, max_relative = 1e-4);
                let half = a * (0.5 * (fbar[d] - ebar[d]) + ebar[d] - P5[d] as f64);
                assert_relative_eq!(expect(2)[d], half, epsilon = 1e-5, max_relative = 1e-4);
                let bank = a * (ebar[d] - P5[d] as f64);
                assert_relative_eq!(expect(3)[d], bank, epsilon = 1e-5, max_relative = 1e-4);
            }
            // beta = 0 has no sampling noise at all (to f32 rounding).
            assert!(var(3) < 1e-10, "{}", var(3));
            if cuts {
                // Nearly fresh: the variate removes almost all the variance.
                assert!(var(1) < 0.01 * var(0), "{} vs {}", var(1), var(0));
            }
        }
    }

    #[test]
    fn control_variate_inputs_are_checked() {
        let cache = filled(&E5);
        let mut loss = CacheLoss::<1, 1>::new();
        let mut r = rng(1);
        let mut mean = [[0.0f32; D]; 2];
        let e = loss.score_and_sample_with(
            cache.as_ref(),
            &[Q5],
            &[P5],
            None,
            &NO_MASK,
            Retrieval::MaxScore,
            &mut r,
            None,
            Some(&mut mean),
            &Serial,
        );
        assert!(matches!(e, Err(Error::LengthMismatch { .. })), "{e:?}");
        loss.score_and_sample(cache.as_ref(), &[Q5], &[P5], None, &NO_MASK, Retrieval::MaxScore, &mut r, None).unwrap();
        let cv = ControlVariate { beta: 1.5, candidate_mean: &mean[..1] };
        let e = loss.backward_with(cache.as_ref(), &[Q5], &[P5], &[E5[0]], Some(cv), None);
        assert!(matches!(e, Err(Error::InvalidConfig { .. })), "{e:?}");
    }

    // ---- One query's terms, shared with distributed drivers ----

    #[test]
    fn query_terms_are_the_cache_loss_and_follow_the_closed_form() {
        // One query, five cached rows, the negative fixed to slot 2 and a
        // fresh embedding of it; a batch normaliser of 1/4 as for a query
        // that is one of four. Reference: the closed forms in f64.
        let mut r = rng(21);
        let alpha = 2.5f32;
        let cfg = LossConfig { score_scale: alpha, ..NO_MASK };
        let cache = filled(&E5);
        let fresh: [[f32; D]; 2] = random_rows(&mut r, 0.5);
        let mut loss = CacheLoss::<1, 1>::new();
        loss.score_and_sample(cache.as_ref(), &[Q5], &[P5], None, &cfg, Retrieval::Fixed(&[2]), &mut r, None).unwrap();
        let (mut gq, mut gp, mut gf) = ([[0.0; D]; 1], [[0.0; D]; 1], [[0.0; D]; 1]);
        let grads = LossGrads { query: &mut gq, positive: &mut gp, negative: &mut gf };
        let sum = loss.backward(cache.as_ref(), &[Q5], &[P5], &fresh[..1], Some(grads)).unwrap();
        // Each negative's cached row is its own (E5[1 + i]).
        let one = |w: &'static [f32]| QueryNegatives {
            fresh: &fresh[..w.len()],
            weights: w,
            stale: |i: usize| E5[1 + i],
            mean_of_dots: false,
        };

        // With the cache's own log-sum-exp and B = 1: CacheLoss's bits.
        let (mut q1, mut p1, mut f1) = ([9.0; D], [9.0; D], [[9.0; D]; 1]);
        let g = QueryGrads { query: &mut q1, positive: &mut p1, negative: &mut f1 };
        let t = query_terms(&Q5, &P5, &loss.candidate_lse(0), one(&[1.0]), None, alpha, 1.0, Some(g)).unwrap();
        assert_eq!(t.training_loss.to_bits(), sum.training_loss.to_bits());
        assert_eq!(t.interpretable_loss.to_bits(), sum.interpretable_loss.to_bits());
        assert_eq!(t.prob_pos.to_bits(), sum.prob_pos.to_bits());
        assert_eq!(t.grad_scale.to_bits(), sum.grad_scale.to_bits());
        let bits = |v: [f32; D]| v.map(f32::to_bits);
        assert_eq!((bits(q1), bits(p1), bits(f1[0])), (bits(gq[0]), bits(gp[0]), bits(gf[0])));

        // The candidates' log-sum-exp merged from two "shards" (slots 0-1
        // and 2-4), normaliser 1/4, two negatives of weights 1/4 and 1/2
        // (weights need not sum to 1, as with tempered draws): the closed
        // forms.
        let (mut a, mut b) = (LogSumExp::EMPTY, LogSumExp::EMPTY);
        for (j, e) in E5.iter().enumerate() {
            let c = alpha * dot(&Q5, e);
            let shard = if j < 2 { &mut a } else { &mut b };
            shard.push(c);
        }
        a.merge(&b);
        let weights = [0.25, 0.5];
        let (mut q4, mut p4, mut f4) = ([9.0; D], [9.0; D], [[9.0; D]; 3]);
        let g = QueryGrads { query: &mut q4, positive: &mut p4, negative: &mut f4 };
        let t = query_terms(&Q5, &P5, &a, one(&[0.25, 0.5]), None, alpha, 0.25, Some(g)).unwrap();
        let s = score64(alpha, &Q5, &P5);
        let z: f64 = E5.iter().map(|e| score64(alpha, &Q5, e).exp()).sum();
        let w = z / (s.exp() + z);
        let est =
            |x: f64| weights[0] * score64(x as f32, &Q5, &fresh[0]) + weights[1] * score64(x as f32, &Q5, &fresh[1]);
        assert_relative_eq!(t.positive_score as f64, s, max_relative = 1e-6);
        assert_relative_eq!(t.prob_pos as f64, 1.0 - w, max_relative = 1e-5);
        assert_relative_eq!(t.interpretable_loss as f64, -(1.0 - w).ln(), max_relative = 1e-5);
        assert_relative_eq!(t.training_loss as f64, w * (est(alpha as f64) - s), max_relative = 1e-5);
        let grad_scale = w * (est(1.0) - score64(1.0, &Q5, &P5));
        assert_relative_eq!(t.grad_scale as f64, grad_scale, max_relative = 1e-5);
        let k = w * alpha as f64 * 0.25;
        let mean = |d: usize| weights[0] * fresh[0][d] as f64 + weights[1] * fresh[1][d] as f64;
        for d in 0..D {
            assert_relative_eq!(q4[d] as f64, k * (mean(d) - P5[d] as f64), epsilon = 1e-6, max_relative = 1e-5);
            assert_relative_eq!(p4[d] as f64, -k * Q5[d] as f64, epsilon = 1e-6, max_relative = 1e-5);
            for (i, wi) in weights.iter().enumerate() {
                assert_relative_eq!(f4[i][d] as f64, k * wi * Q5[d] as f64, epsilon = 1e-6, max_relative = 1e-5);
            }
            assert_eq!(f4[2][d], 0.0, "a row past the negatives is zeroed");
        }

        // With the control variate (beta 0.7, each negative's stale row
        // and a candidate mean): only the query gradient changes, to the
        // closed form k (beta sum_i w_i (f_i - e_i) + e_bar - p); the other
        // gradients are the same bits.
        let e_bar = [0.1, 0.2, -0.3, 0.4];
        let stale_mean = |d: usize| weights[0] * E5[1][d] as f64 + weights[1] * E5[2][d] as f64;
        let cv = QueryControl { beta: 0.7, candidate_mean: &e_bar };
        let (mut qc, mut pc, mut fc) = ([9.0; D], [9.0; D], [[9.0; D]; 3]);
        let g = QueryGrads { query: &mut qc, positive: &mut pc, negative: &mut fc };
        let tc = query_terms(&Q5, &P5, &a, one(&[0.25, 0.5]), Some(cv), alpha, 0.25, Some(g)).unwrap();
        assert_eq!(tc.training_loss.to_bits(), t.training_loss.to_bits());
        assert_eq!((bits(pc), fc.map(bits)), (bits(p4), f4.map(bits)));
        for d in 0..D {
            let want = k * (0.7 * (mean(d) - stale_mean(d)) + e_bar[d] as f64 - P5[d] as f64);
            assert_relative_eq!(qc[d] as f64, want, epsilon = 1e-6, max_relative = 1e-5);
        }
        // The highest scores' estimate: the plain mean of the dot products.
        let mean_dots = QueryNegatives { mean_of_dots: true, ..one(&[0.5, 0.5]) };
        let tm = query_terms(&Q5, &P5, &a, mean_dots, None, alpha, 0.25, None).unwrap();
        let plain = (score64(alpha, &Q5, &fresh[0]) + score64(alpha, &Q5, &fresh[1])) / 2.0;
        assert_relative_eq!(tm.training_loss as f64, w * (plain - s), max_relative = 1e-5);
        let bad = QueryControl { beta: 1.5, ..cv };
        assert!(query_terms(&Q5, &P5, &a, one(&[1.0]), Some(bad), alpha, 0.25, None).is_err());

        // No negative (no candidate anywhere): prob_pos 1, no loss, zero
        // gradients.
        let (mut q0, mut p0, mut f0) = ([9.0; D], [9.0; D], [[9.0; D]; 1]);
        let g = QueryGrads { query: &mut q0, positive: &mut p0, negative: &mut f0 };
        let t = query_terms(&Q5, &P5, &LogSumExp::EMPTY, one(&[]), None, alpha, 0.25, Some(g)).unwrap();
        assert_eq!((t.prob_pos, t.training_loss, t.grad_scale), (1.0, 0.0, 0.0));
        assert!(t.interpretable_loss.abs() < 1e-7, "{}", t.interpretable_loss);
        assert_eq!((q0, p0, f0), ([0.0; D], [0.0; D], [[0.0; D]; 1]));

        // A non-finite fresh embedding, weights that do not match the
        // negatives, or too few gradient rows are errors.
        let nan = [[f32::NAN; D]];
        let bad = QueryNegatives { fresh: &nan, ..one(&[1.0]) };
        let e = query_terms(&Q5, &P5, &a, bad, None, alpha, 0.25, None);
        assert!(matches!(e, Err(Error::NonFinite { .. })), "{e:?}");
        let short = QueryNegatives { fresh: &fresh, ..one(&[1.0]) };
        assert!(query_terms(&Q5, &P5, &a, short, None, alpha, 0.25, None).is_err());
        let mut few = [[0.0; D]; 1];
        let g = QueryGrads { query: &mut q0, positive: &mut p0, negative: &mut few };
        assert!(query_terms(&Q5, &P5, &a, one(&[0.25, 0.5]), None, alpha, 0.25, Some(g)).is_err());
    }
}
