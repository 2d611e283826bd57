//! The training step: embed, score against the cache, sample negatives,
//! embed them afresh, back-propagate, step the optimiser, update the cache.
//!
//! The trainer owns the model, the optimiser and the step's buffers; the
//! cache is the caller's ([`CacheMut`], a view over storage the caller
//! owns: a `static` [`crate::NegativeCache`] on a device, slices sized at
//! run time on a server) and is passed to every call that reads or writes
//! it, so the cache's capacity is not part of the trainer's type.
//!
//! One [`Trainer::step`] with the cache objective:
//!
//! 1. re-embeds the R stalest cache entries with the current towers (the
//!    paper's "refresh a small fraction of the cache per step");
//! 2. embeds the batch's queries and positives;
//! 3. scores every query against the cache and draws its negatives in one
//!    streaming pass ([`CacheLoss::score_and_sample`]), split over the
//!    caller's threads by [`Trainer::step_on`];
//! 4. embeds the drawn negatives afresh and computes the loss and its
//!    gradients ([`CacheLoss::backward`]);
//! 5. back-propagates through both towers and steps the optimiser;
//! 6. refreshes the drawn entries and the positives already cached with
//!    their fresh embeddings, and inserts the other positives (streaming
//!    mode), skipping repeats within the batch.
//!
//! The same trainer runs the objectives the cache is compared against:
//! in-batch softmax, uniform sampled softmax with logQ correction, and
//! exact full softmax over a corpus. Those use the cache's storage as the
//! table of sampled or corpus embeddings, so they cost no extra memory.

use core::marker::PhantomData;
use core::ops::Range;

use rand_core::RngCore;

use crate::cache::{CacheMut, Eviction, Update};
use crate::error::{check_len, Error, Result};
use crate::item::Item;
use crate::loss::{CacheLoss, ControlVariate, LossConfig, LossGrads};
use crate::optim::{Optimizer, OptimizerKind};
use crate::parallel::{Fork, Serial};
use crate::random;
use crate::remainder::{self, CacheSide, RemainderGrads};
use crate::sampler::{LogSumExp, Retrieval};
use crate::softmax::{self, FullParts, SoftmaxOut};
use crate::storage::Precision;
use crate::tower::{backward_run, half, Towers, Upstream};

/// Sampled and full softmax use the cache's storage as their table of
/// candidate embeddings, which they read as `f32` slices.
const NEEDS_F32: Error = Error::InvalidConfig { what: "sampled and full softmax need a cache stored as f32" };

/// A model's [`Towers::backward_items_halves`] did not ask for each half's
/// rows once, in order.
const SKIPPED_ITEMS: Error =
    Error::InvalidConfig { what: "the model's backward_items_halves skipped or repeated items" };

/// What the step minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// The negative cache (the paper's method).
    Cache,
    /// Softmax over the batch's positives.
    InBatch,
    /// Softmax over the positive and `negatives` items drawn uniformly
    /// from the corpus (shared by the batch), with logQ correction.
    Sampled {
        /// How many negatives per step (at most the cache capacity).
        negatives: usize,
    },
    /// Exact softmax over every corpus item, all embedded every step.
    Full,
    /// The cache's drawn negatives and the batch's other positives in one
    /// softmax (the cache is filled and refreshed as for `Cache`).
    CacheMixed,
    /// The softmax over the batch's positives, exact, and the cache's
    /// other items, sampled: every in-batch term enters exactly and the
    /// drawn negatives estimate the cache's share without bias
    /// ([`crate::remainder`]). Cache slots holding a batch item are left
    /// out of the draw (they are in the batch, fresh).
    CacheInBatch,
    /// As [`Self::CacheInBatch`], with every query's cache share estimated
    /// from the draws of the whole batch, each weighted by its
    /// Hansen-Hurwitz weight ([`remainder::in_batch_with_shared_draws`]):
    /// `B m` fresh negatives per query for the tower evaluations of `m`.
    /// Needs a random draw: one per query (exponential jumps or Gumbel), or
    /// `NEG` independent untempered ones ([`Retrieval::ExpJump`] at inverse
    /// temperature 1).
    CacheShared,
}

impl Objective {
    /// Whether the objective draws from, and maintains, the cache.
    pub const fn uses_cache(&self) -> bool {
        matches!(self, Self::Cache | Self::CacheMixed | Self::CacheInBatch | Self::CacheShared)
    }
}

/// How the cache is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// The cache fills with the positives seen, oldest evicted first.
    Streaming,
    /// The cache holds the whole corpus ([`Trainer::fill_cache`]) and is
    /// only refreshed.
    Corpus,
}

/// Trainer settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainerConfig {
    /// What to minimise.
    pub objective: Objective,
    /// How the cache is filled (cache objective only).
    pub cache_mode: CacheMode,
    /// Which slot an insert replaces.
    pub eviction: Eviction,
    /// How negatives are drawn from the cache.
    pub retrieval: Retrieval<'static>,
    /// Approximate top-k candidates (0: all cache entries).
    pub top_k: usize,
    /// Remove a query's own positive from its candidates (cache and
    /// sampled objectives, and repeats in in-batch).
    pub mask_accidental_hits: bool,
    /// Cache entries re-embedded per step, stalest first.
    pub refresh_per_step: usize,
    /// The optimiser.
    pub optimizer: OptimizerKind,
    /// Global gradient-norm clip (0: none).
    pub clip_norm: f32,
    /// [`Objective::CacheShared`] only: correct the cache's stale scores
    /// with the drawn negatives' fresh ones (self-normalised importance
    /// sampling, see [`remainder::in_batch_with_shared_draws`]).
    pub fresh_scores: bool,
    /// [`Objective::Sampled`] only: hand the item tower the gradients of
    /// only this many of the step's negatives (the first drawn: a uniform
    /// subset), each scaled by `negatives / this`, so that the item
    /// tower's gradient stays an unbiased estimate; 0 for every negative.
    /// The query side is unchanged, exact over every negative. A
    /// diagnostic: with 32 it gives the item tower as many fresh negatives
    /// per step as a one-negative cache step with a batch of 32 does. At
    /// most `BATCH * NEG` with `sampled_item_priority`.
    pub sampled_item_gradients: usize,
    /// With `sampled_item_gradients`: choose the kept negatives by
    /// priority sampling on their gradients' norms (Duffield, Lund and
    /// Thorup: the `k` largest `|g_j| / u_j`, each scaled by
    /// `max(|g_j|, tau) / |g_j|` with `tau` the next priority; unbiased)
    /// instead of uniformly: the item side a softmax-weighted draw gives.
    pub sampled_item_priority: bool,
}

impl TrainerConfig {
    /// The paper's method: streaming cache, exact sampling, Adam.
    pub const DEFAULT: Self = Self {
        objective: Objective::Cache,
        cache_mode: CacheMode::Streaming,
        eviction: Eviction::Fifo,
        retrieval: Retrieval::ExpJump { inv_temp: 1.0 },
        top_k: 0,
        mask_accidental_hits: true,
        refresh_per_step: 0,
        optimizer: OptimizerKind::ADAM,
        clip_norm: 0.0,
        fresh_scores: false,
        sampled_item_gradients: 0,
        sampled_item_priority: false,
    };
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One step's figures.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepReport {
    /// Mean training loss (the surrogate for the cache; the cross-entropy
    /// for the softmax objectives).
    pub training_loss: f32,
    /// Mean cross-entropy over the candidates the objective saw.
    pub interpretable_loss: f32,
    /// Mean relative staleness of the drawn negatives (cache only).
    pub staleness: f32,
    /// Mean probability of the positive.
    pub prob_pos: f32,
    /// Tower forward evaluations made (not counting the recomputation
    /// inside back-propagation).
    pub tower_evals: u32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// The score scale used.
    pub score_scale: f32,
}

/// A training batch: queries, their positives, and (for full softmax) the
/// positives' indices in the corpus.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a, Q, I> {
    /// Query inputs.
    pub queries: &'a [Q],
    /// Positive items, one per query.
    pub positives: &'a [I],
    /// Each positive's index in the corpus (needed by full softmax only).
    pub positive_index: Option<&'a [u32]>,
}

/// A trainer with a model `M` over queries `Q` and items `I`, batches of
/// up to `BATCH` queries, and `NEG` negatives per query.
///
/// # Generics
/// - `M`: the model ([`Towers`]): any towers over any inputs.
/// - `Q`, `I`: query and item inputs (token lists, dense features, ids).
/// - `DIM`: embedding dimension.
/// - `BATCH`: largest batch; `NEG`: negatives per query.
///
/// The cache is the caller's and is passed to each call; its length is
/// the cache's capacity, and also bounds the sampled negatives or corpus
/// items of the softmax objectives, which use it as their table.
///
/// # Memory
/// The model and `O(BATCH * NEG * (DIM + size_of::<I>()))` bytes of
/// buffers (among them `BATCH * DIM` floats for the control variate's
/// candidate means): nothing grows with the cache. [`Trainer::new`] is a
/// `const fn`, so a trainer can be a `static`.
///
/// # Example
/// One step of the paper's method on a user-defined model over dense
/// features (a linear map per side; any [`Towers`] will do):
///
/// ```
/// use negcache::layers::ParamVisitor;
/// use negcache::optim::OptimizerKind;
/// use negcache::tower::{Model, Towers};
/// use negcache::trainer::{Batch, Trainer, TrainerConfig};
/// use negcache::NegativeCache;
/// use rand_core::{RngCore, SeedableRng};
///
/// /// Features of 4 floats, embeddings of 2: y = W x per side.
/// struct Linear { w: [[f32; 8]; 2], g: [[f32; 8]; 2], m: [[[f32; 8]; 2]; 2] }
/// impl Model<2> for Linear {
///     fn init(&mut self, rng: &mut impl RngCore) {
///         for (i, w) in self.w.iter_mut().flatten().enumerate() {
///             *w = ((rng.next_u32() >> 8) as f32 / 16777216.0 - 0.5) + i as f32 * 0.01;
///         }
///     }
///     fn score_scale(&self) -> f32 { 5.0 }
///     fn backward_scale(&mut self, _: f32) {}
///     fn zero_grad(&mut self) { self.g = [[0.0; 8]; 2] }
///     fn visit(&mut self, v: &mut dyn ParamVisitor) {
///         for s in 0..2 {
///             let [m1, m2] = &mut self.m[s];
///             v.dense(&mut self.w[s], &mut self.g[s], &mut [&mut m1[..], &mut m2[..]]);
///         }
///     }
///     fn state_slots(&self) -> usize { 2 }
/// }
/// impl Linear {
///     fn fwd(&self, s: usize, x: &[f32; 4], out: &mut [f32; 2]) {
///         for o in 0..2 { out[o] = (0..4).map(|i| self.w[s][o * 4 + i] * x[i]).sum(); }
///     }
///     fn bwd(&mut self, s: usize, x: &[f32; 4], g: &[f32; 2]) {
///         for o in 0..2 { for i in 0..4 { self.g[s][o * 4 + i] += g[o] * x[i]; } }
///     }
/// }
/// impl Towers<[f32; 4], u32, 2> for Linear {
///     fn embed_query(&self, x: &[f32; 4], out: &mut [f32; 2]) { self.fwd(0, x, out) }
///     fn embed_item(&self, y: &u32, out: &mut [f32; 2]) { self.fwd(1, &[*y as f32, 1.0, 0.0, 0.0], out) }
///     fn backward_query(&mut self, x: &[f32; 4], g: &[f32; 2]) { self.bwd(0, x, g) }
///     fn backward_item(&mut self, y: &u32, g: &[f32; 2]) { self.bwd(1, &[*y as f32, 1.0, 0.0, 0.0], g) }
/// }
///
/// let model = Linear { w: [[0.0; 8]; 2], g: [[0.0; 8]; 2], m: [[[0.0; 8]; 2]; 2] };
/// let mut trainer: Trainer<Linear, [f32; 4], u32, 2, 4, 1> =
///     Trainer::new(model, TrainerConfig { optimizer: OptimizerKind::ADAM, ..TrainerConfig::DEFAULT });
/// let mut rng = rand_pcg::Pcg32::seed_from_u64(7);
/// trainer.model.init(&mut rng);
/// trainer.init().unwrap();
/// // The cache's storage is the caller's: here 16 slots on the stack.
/// let mut cache: NegativeCache<u32, 16, 2> = NegativeCache::new();
/// let queries = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]];
/// let positives = [1u32, 2];
/// let batch = Batch { queries: &queries, positives: &positives, positive_index: None };
/// for _ in 0..3 {
///     let report = trainer.step(&mut cache.as_mut(), &batch, &[], 0.1, &mut rng).unwrap();
///     assert!(report.training_loss.is_finite());
/// }
/// // Both positives are cached now, with their fresh embeddings.
/// assert_eq!(cache.len(), 2);
/// ```
#[derive(Debug)]
pub struct Trainer<M, Q, I, const DIM: usize, const BATCH: usize, const NEG: usize> {
    /// The model being trained.
    pub model: M,
    loss: CacheLoss<BATCH, NEG>,
    q: [[f32; DIM]; BATCH],
    p: [[f32; DIM]; BATCH],
    n: [[[f32; DIM]; NEG]; BATCH],
    gq: [[f32; DIM]; BATCH],
    gp: [[f32; DIM]; BATCH],
    gn: [[[f32; DIM]; NEG]; BATCH],
    lse: [LogSumExp; BATCH],
    log_q: [f32; BATCH],
    keep: [bool; BATCH],
    slots: [usize; BATCH],
    pos_cached: [bool; BATCH],
    neg_slots: [[usize; NEG]; BATCH],
    neg_valid: [[bool; NEG]; BATCH],
    candidate_mean: [[f32; DIM]; BATCH],
    neg_weight: [[f32; NEG]; BATCH],
    stale: [[[f32; DIM]; NEG]; BATCH],
    neg_items: [[I; NEG]; BATCH],
    unique: [[u32; NEG]; BATCH],
    pos_keys: [u64; BATCH],
    counts: [[[f32; 3]; NEG]; BATCH],
    sample_lse: [LogSumExp; BATCH],
    lse_fresh: [LogSumExp; BATCH],
    control_variate: Option<f32>,
    opt: Optimizer,
    cfg: TrainerConfig,
    steps: u64,
    _inputs: PhantomData<fn(Q)>,
}

impl<M, Q, I, const DIM: usize, const BATCH: usize, const NEG: usize> Trainer<M, Q, I, DIM, BATCH, NEG>
where
    M: Towers<Q, I, DIM>,
    I: Item,
{
    /// A trainer around `model` (not yet initialised: see [`Self::init`]).
    pub const fn new(model: M, cfg: TrainerConfig) -> Self {
        Self {
            model,
            loss: CacheLoss::new(),
            q: [[0.0; DIM]; BATCH],
            p: [[0.0; DIM]; BATCH],
            n: [[[0.0; DIM]; NEG]; BATCH],
            gq: [[0.0; DIM]; BATCH],
            gp: [[0.0; DIM]; BATCH],
            gn: [[[0.0; DIM]; NEG]; BATCH],
            lse: [LogSumExp::EMPTY; BATCH],
            log_q: [0.0; BATCH],
            keep: [false; BATCH],
            slots: [0; BATCH],
            pos_cached: [false; BATCH],
            neg_slots: [[0; NEG]; BATCH],
            neg_valid: [[false; NEG]; BATCH],
            candidate_mean: [[0.0; DIM]; BATCH],
            neg_weight: [[0.0; NEG]; BATCH],
            stale: [[[0.0; DIM]; NEG]; BATCH],
            neg_items: [[I::EMPTY; NEG]; BATCH],
            unique: [[0; NEG]; BATCH],
            pos_keys: [0; BATCH],
            counts: [[[0.0; 3]; NEG]; BATCH],
            sample_lse: [LogSumExp::EMPTY; BATCH],
            lse_fresh: [LogSumExp::EMPTY; BATCH],
            control_variate: None,
            opt: Optimizer::new(cfg.optimizer, cfg.clip_norm),
            cfg,
            steps: 0,
            _inputs: PhantomData,
        }
    }

    /// Checks the settings and resets the optimiser and the step count. The
    /// model's parameters are initialised by the caller (e.g.
    /// `TwoTower::init`), so that a loaded model can be trained further;
    /// so is the cache, which is the caller's ([`Self::check_cache`] tells
    /// whether one fits these settings).
    pub fn init(&mut self) -> Result<()> {
        let cfg = &self.cfg;
        if let Objective::Sampled { negatives: 0 } = cfg.objective {
            return Err(Error::InvalidConfig { what: "sampled negatives must be between 1 and the cache capacity" });
        }
        let sampled = matches!(cfg.objective, Objective::Sampled { .. });
        if (cfg.sampled_item_gradients > 0 || cfg.sampled_item_priority) && !sampled {
            return Err(Error::InvalidConfig {
                what: "sampled_item_gradients and _priority need the sampled objective",
            });
        }
        if cfg.sampled_item_priority && !(1..=BATCH * NEG).contains(&cfg.sampled_item_gradients) {
            return Err(Error::InvalidConfig {
                what: "sampled_item_priority needs sampled_item_gradients between 1 and BATCH * NEG",
            });
        }
        if matches!(cfg.retrieval, Retrieval::Fixed(_)) {
            return Err(Error::InvalidConfig {
                what: "training draws its negatives; fixed retrieval is for verification",
            });
        }
        let shared_ok = match cfg.retrieval {
            Retrieval::ExpJump { inv_temp } => NEG == 1 || inv_temp == 1.0,
            Retrieval::Gumbel { .. } => NEG == 1,
            _ => false,
        };
        if cfg.objective == Objective::CacheShared && !shared_ok {
            return Err(Error::InvalidConfig {
                what: "shared draws take one random draw per query (exp-jump or Gumbel), or several independent \
                       untempered ones (exp-jump at inverse temperature 1)",
            });
        }
        self.steps = 0;
        self.opt = Optimizer::new(cfg.optimizer, cfg.clip_norm);
        let slots = self.model.state_slots();
        let model = &mut self.model;
        self.opt.init_state(slots, &mut |v| model.visit(v))
    }

    /// The settings.
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }

    /// Sets the control variate of the cache objective's query gradient
    /// (see [`crate::loss`]): `Some(beta)` with beta in `[0, 1]` (1
    /// unbiased, 0 the memory-bank estimator), or `None` (the default: the
    /// plain estimator, today's numbers). It costs a second multiply-add
    /// per cached value and query in the scoring pass. The mixed objective
    /// ignores it. Kept apart from [`TrainerConfig`] so that code building
    /// that struct field by field keeps compiling.
    pub fn set_control_variate(&mut self, beta: Option<f32>) -> Result<()> {
        if beta.is_some_and(|b| !(0.0..=1.0).contains(&b)) {
            return Err(Error::InvalidConfig { what: "control variate beta must be in [0, 1]" });
        }
        self.control_variate = beta;
        Ok(())
    }

    /// The control variate's beta, if one is used.
    pub fn control_variate(&self) -> Option<f32> {
        self.control_variate
    }

    /// Whether a cache of `slots` slots fits these settings: top-k groups
    /// must divide it, and sampled softmax's negatives must fit in it.
    pub fn check_cache(&self, slots: usize) -> Result<()> {
        let cfg = &self.cfg;
        if cfg.objective.uses_cache() && cfg.top_k > 0 && slots % cfg.top_k != 0 {
            return Err(Error::TopKNotDivisor { k: cfg.top_k, slots });
        }
        if let Objective::Sampled { negatives } = cfg.objective {
            if negatives == 0 || negatives > slots {
                return Err(Error::InvalidConfig {
                    what: "sampled negatives must be between 1 and the cache capacity",
                });
            }
        }
        Ok(())
    }

    /// The optimiser and its step count.
    pub fn optimizer(&self) -> &Optimizer {
        &self.opt
    }

    /// The optimiser, mutably (to restore its step count).
    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.opt
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Corpus mode: embeds every corpus item into `cache` (slot j holds
    /// item j), on the calling thread. Returns the number of tower
    /// evaluations.
    pub fn fill_cache(&mut self, cache: &mut CacheMut<'_, I, DIM>, corpus: &[I]) -> Result<u32> {
        self.fill_cache_on(&Serial, cache, corpus)
    }

    /// [`Self::fill_cache`] with the item tower's work split over `fork`
    /// where the model supports it ([`Towers::embed_items_on`]): the same
    /// bits on any number of threads. An `f32` cache is embedded into in
    /// place, the whole corpus in one call; other precisions `BATCH`
    /// items per call, through the step's buffer.
    pub fn fill_cache_on(&mut self, fork: &impl Fork, cache: &mut CacheMut<'_, I, DIM>, corpus: &[I]) -> Result<u32> {
        if corpus.len() > cache.capacity() {
            return Err(Error::CapacityExceeded { requested: corpus.len(), capacity: cache.capacity() });
        }
        // The same state as `clear` and the writes below; a corpus already
        // in place keeps its keys (dense features cost a fingerprint each).
        // A write that fails (a non-finite embedding) empties the slots
        // from its own on, as `clear` would have left them.
        cache.clear_past(corpus.len());
        if let Some(rows) = cache.f32_rows_mut() {
            self.model.embed_items_on(fork, corpus, &mut rows[..corpus.len()]);
            for (j, item) in corpus.iter().enumerate() {
                if let Err(err) = cache.set_slot_in_place(j, *item, 0, true) {
                    cache.clear_past(j);
                    return Err(err);
                }
            }
            return Ok(corpus.len() as u32);
        }
        for (k, chunk) in corpus.chunks(BATCH).enumerate() {
            let e = &mut self.p[..chunk.len()];
            self.model.embed_items(chunk, e);
            for (i, (item, row)) in chunk.iter().zip(e.iter()).enumerate() {
                if let Err(err) = cache.set_slot(k * BATCH + i, row, *item, 0, true) {
                    cache.clear_past(k * BATCH + i);
                    return Err(err);
                }
            }
        }
        Ok(corpus.len() as u32)
    }

    /// One training step on `batch` with learning rate `lr`. `cache` is
    /// the negative cache (and, for the sampled and full objectives, the
    /// table of their embeddings); `corpus` is needed by the sampled and
    /// full objectives and may be empty otherwise.
    ///
    /// Everything runs on the calling thread; [`Self::step_on`] runs the
    /// scoring pass (and parts of the full softmax) on the caller's
    /// threads, with the same result.
    pub fn step(
        &mut self,
        cache: &mut CacheMut<'_, I, DIM>,
        batch: &Batch<'_, Q, I>,
        corpus: &[I],
        lr: f32,
        rng: &mut impl RngCore,
    ) -> Result<StepReport> {
        self.step_on(&Serial, cache, batch, corpus, lr, rng)
    }

    /// [`Self::step`] with the cache objectives' scoring pass split over
    /// `fork` at tiles of [`crate::kernel::TILE`] queries (a batch of 32
    /// is two pieces), and the full softmax's corpus embedded on it
    /// ([`Self::fill_cache_on`]), its first softmax pass split at half
    /// the queries and, when the model gathers the corpus's halves apart
    /// ([`Towers::item_halves`]), the halves back-propagated on it. The
    /// step is the same bits whatever `fork` is: each query draws from its
    /// own random stream, seeded in query order before the split (see
    /// [`crate::parallel`]), each item's embedding and each query's
    /// log-sum-exp are their own, and the halves are fixed by the corpus.
    pub fn step_on(
        &mut self,
        fork: &impl Fork,
        cache: &mut CacheMut<'_, I, DIM>,
        batch: &Batch<'_, Q, I>,
        corpus: &[I],
        lr: f32,
        rng: &mut impl RngCore,
    ) -> Result<StepReport> {
        let bsz = batch.queries.len();
        if bsz == 0 || bsz > BATCH {
            return Err(Error::CapacityExceeded { requested: bsz, capacity: BATCH });
        }
        check_len("positives", bsz, batch.positives.len())?;
        self.check_cache(cache.capacity())?;
        I::keys(batch.positives, &mut self.pos_keys);
        self.model.zero_grad();
        let mut report = match self.cfg.objective {
            Objective::Cache | Objective::CacheMixed | Objective::CacheInBatch | Objective::CacheShared => {
                self.cache_step(cache, batch, rng, fork)?
            }
            Objective::InBatch => self.in_batch_step(batch)?,
            Objective::Sampled { negatives } => self.sampled_step(cache, batch, corpus, negatives, rng)?,
            Objective::Full => self.full_step(fork, cache, batch, corpus)?,
        };
        let model = &mut self.model;
        let stats = self.opt.step(lr, &mut |v| model.visit(v))?;
        self.model.zero_grad();
        report.grad_norm = stats.grad_norm;
        if self.cfg.objective.uses_cache() {
            self.update_cache(cache, batch)?;
        }
        self.steps += 1;
        Ok(report)
    }

    /// Back-propagates `gq` and `gp` through the query and item towers:
    /// query 0, positive 0, query 1, ... one at a time, or each side as one
    /// batch when the towers share no parameter (the same bits).
    fn backward_batch(&mut self, batch: &Batch<'_, Q, I>) {
        let bsz = batch.queries.len();
        if M::SEPARATE_TOWERS {
            self.model.backward_queries(batch.queries, &self.gq[..bsz]);
            self.model.backward_items(batch.positives, &self.gp[..bsz]);
            return;
        }
        let mut seq = Sequence::new(&mut self.model);
        for (b, (x, y)) in batch.queries.iter().zip(batch.positives).enumerate() {
            seq.push(Upstream::Query(x, &self.gq[b]));
            seq.push(Upstream::Item(y, &self.gp[b]));
        }
        seq.flush();
    }

    /// Embeds the batch's queries and positives (one batched call per
    /// tower) into `q` and `p`.
    fn embed_batch(&mut self, batch: &Batch<'_, Q, I>) {
        let bsz = batch.queries.len();
        self.model.embed_queries(batch.queries, &mut self.q[..bsz]);
        self.model.embed_items(batch.positives, &mut self.p[..bsz]);
    }

    /// Embeds the drawn negatives into `n`, each distinct slot once in one
    /// batched call: a slot several queries drew is one tower evaluation,
    /// its embedding copied to every row that drew it (the same bits as
    /// embedding it again). The distinct slots are listed in `unique`,
    /// their items gathered into `neg_items` and embedded into `gn` (free
    /// until the backward pass); `neg_slots` maps each row to its slot's
    /// place in the list. Returns the tower evaluations.
    fn embed_drawn(&mut self, cache: &CacheMut<'_, I, DIM>, bsz: usize) -> u32 {
        let items = cache.as_ref().items();
        let unique = self.unique.as_flattened_mut();
        let (map, gather) = (self.neg_slots.as_flattened_mut(), self.neg_items.as_flattened_mut());
        let mut distinct = 0;
        for b in 0..bsz {
            for (i, &slot) in self.loss.negatives(b).iter().enumerate() {
                let at = match unique[..distinct].iter().position(|&u| u == slot) {
                    Some(at) => at,
                    None => {
                        unique[distinct] = slot;
                        gather[distinct] = items[slot as usize];
                        distinct += 1;
                        distinct - 1
                    }
                };
                map[b * NEG + i] = at;
            }
        }
        let embedded = self.gn.as_flattened_mut();
        self.model.embed_items(&gather[..distinct], &mut embedded[..distinct]);
        let (map, embedded) = (self.neg_slots.as_flattened(), self.gn.as_flattened());
        for b in 0..bsz {
            for i in 0..self.loss.negatives(b).len() {
                self.n[b][i] = embedded[map[b * NEG + i]];
            }
        }
        distinct as u32
    }

    fn cache_step(
        &mut self,
        cache: &mut CacheMut<'_, I, DIM>,
        batch: &Batch<'_, Q, I>,
        rng: &mut impl RngCore,
        fork: &impl Fork,
    ) -> Result<StepReport> {
        let bsz = batch.queries.len();
        let mut evals = self.refresh_stalest(cache)?;
        self.embed_batch(batch);
        evals += 2 * bsz as u32;
        let alpha = self.model.score_scale();
        let cfg = LossConfig {
            score_scale: alpha,
            top_k: self.cfg.top_k,
            mask_accidental_hits: self.cfg.mask_accidental_hits,
        };
        let in_batch = matches!(self.cfg.objective, Objective::CacheInBatch | Objective::CacheShared);
        let control = self.control_variate.filter(|_| self.cfg.objective != Objective::CacheMixed);
        // With exact in-batch terms, the slots holding batch items are
        // hidden from the pass (marked empty for its duration) so that no
        // item is counted twice.
        if in_batch {
            self.find_positives(cache, bsz);
            set_occupied(cache, &self.slots[..bsz], &self.pos_cached[..bsz], false)?;
        }
        let drawn = self.loss.score_and_sample_with(
            cache.as_ref(),
            &self.q[..bsz],
            &self.p[..bsz],
            Some(batch.positives),
            &cfg,
            self.cfg.retrieval,
            rng,
            None,
            control.map(|_| &mut self.candidate_mean[..bsz]),
            fork,
        );
        if in_batch {
            set_occupied(cache, &self.slots[..bsz], &self.pos_cached[..bsz], true)?;
        } else {
            // The in-cache filter for the update: what the pass's masking
            // found, or a scan when it did not mask.
            for b in 0..bsz {
                match self.loss.positive_slot(b) {
                    Some(found) => {
                        self.pos_cached[b] = found.is_some();
                        self.slots[b] = found.unwrap_or(0);
                    }
                    None => {
                        self.find_positives(cache, bsz);
                        break;
                    }
                }
            }
        }
        drawn?;
        evals += self.embed_drawn(cache, bsz);
        if self.cfg.objective == Objective::CacheMixed {
            return self.mixed_backward(cache, batch, evals, alpha);
        }
        if in_batch {
            return self.remainder_backward(cache, batch, evals, alpha, control);
        }
        let grads = LossGrads {
            query: &mut self.gq[..bsz],
            positive: &mut self.gp[..bsz],
            negative: self.gn[..bsz].as_flattened_mut(),
        };
        let fresh = self.n[..bsz].as_flattened();
        let control = control.map(|beta| ControlVariate { beta, candidate_mean: &self.candidate_mean[..bsz] });
        let (q, p) = (&self.q[..bsz], &self.p[..bsz]);
        let sum = self.loss.backward_with(cache.as_ref(), q, p, fresh, control, Some(grads))?;
        self.backward_drawn(cache, batch);
        self.model.backward_scale(sum.grad_scale);
        Ok(StepReport {
            training_loss: sum.training_loss,
            interpretable_loss: sum.interpretable_loss,
            staleness: sum.staleness,
            prob_pos: sum.prob_pos,
            tower_evals: evals,
            grad_norm: 0.0,
            score_scale: alpha,
        })
    }

    /// The in-cache filter for the batch's positives (by key, `pos_keys`):
    /// `pos_cached[b]` and, when set, the slot `slots[b]` that holds
    /// positive `b`.
    fn find_positives(&mut self, cache: &CacheMut<'_, I, DIM>, bsz: usize) {
        let cache = cache.as_ref();
        for b in 0..bsz {
            let found = cache.position_of_key(self.pos_keys[b]);
            self.pos_cached[b] = found.is_some();
            self.slots[b] = found.unwrap_or(0);
        }
    }

    /// Back-propagates `gq`, `gp` and the drawn negatives' `gn` through
    /// the towers: query 0, positive 0, query 0's negatives, query 1, ...
    /// one at a time; or, when the towers share no parameter, the queries
    /// as one batch and the items in that same order, in batches (the same
    /// bits). The batches are gathered into `neg_items` and `q`, whose
    /// contents the step no longer needs: the negatives' items are read
    /// from the cache and the query embeddings are spent.
    fn backward_drawn(&mut self, cache: &CacheMut<'_, I, DIM>, batch: &Batch<'_, Q, I>) {
        let items = cache.as_ref().items();
        let bsz = batch.queries.len();
        if M::SEPARATE_TOWERS {
            self.model.backward_queries(batch.queries, &self.gq[..bsz]);
            let mut pending = Pending::over(&mut self.model, self.neg_items.as_flattened_mut(), &mut self.q);
            for b in 0..bsz {
                pending.push(&batch.positives[b], &self.gp[b]);
                for (i, &slot) in self.loss.negatives(b).iter().enumerate() {
                    pending.push(&items[slot as usize], &self.gn[b][i]);
                }
            }
            pending.flush();
            return;
        }
        let mut seq = Sequence::new(&mut self.model);
        for b in 0..bsz {
            seq.push(Upstream::Query(&batch.queries[b], &self.gq[b]));
            seq.push(Upstream::Item(&batch.positives[b], &self.gp[b]));
            for (i, &slot) in self.loss.negatives(b).iter().enumerate() {
                seq.push(Upstream::Item(&items[slot as usize], &self.gn[b][i]));
            }
        }
        seq.flush();
    }

    /// The exact in-batch softmax with the sampled cache remainder
    /// ([`crate::remainder`]), once the batch and its drawn negatives are
    /// embedded (`q`, `p`, `n`).
    fn remainder_backward(
        &mut self,
        cache: &CacheMut<'_, I, DIM>,
        batch: &Batch<'_, Q, I>,
        evals: u32,
        alpha: f32,
        control: Option<f32>,
    ) -> Result<StepReport> {
        let bsz = batch.queries.len();
        let cache_ref = cache.as_ref();
        let (mut stale_sum, mut drawn) = (0.0f32, 0usize);
        // Shared draws take the rows' shares of their queries' draws: the
        // weights of untempered independent draws (k / m), 1 for one draw.
        let shared = self.cfg.objective == Objective::CacheShared;
        for b in 0..bsz {
            self.lse[b] = self.loss.candidate_lse(b);
            self.sample_lse[b] = self.loss.sampling_lse(b);
            let (slots, weights) = (self.loss.negatives(b), self.loss.negative_weights(b));
            for i in 0..NEG {
                self.neg_weight[b][i] = weights.get(i).copied().unwrap_or(0.0);
                if shared && NEG == 1 {
                    // The draw's share of its query's draws (its weight is
                    // an importance ratio when tempered).
                    self.neg_weight[b][i] = if i < slots.len() { 1.0 } else { 0.0 };
                }
                // As the pass read them (decoded from the cache's storage),
                // so that the control variate subtracts what it averaged.
                self.stale[b][i] = slots.get(i).map_or([0.0; DIM], |&s| cache_ref.embeddings().row(s as usize));
                if i < slots.len() {
                    stale_sum += crate::loss::relative_staleness(&self.stale[b][i], &self.n[b][i]);
                    drawn += 1;
                }
            }
        }
        let side = CacheSide {
            lse: &self.lse[..bsz],
            fresh: self.n[..bsz].as_flattened(),
            weights: self.neg_weight[..bsz].as_flattened(),
            control: control.map(|beta| remainder::Control {
                beta,
                stale: self.stale[..bsz].as_flattened(),
                mean: &self.candidate_mean[..bsz],
            }),
        };
        let grads = RemainderGrads {
            query: &mut self.gq[..bsz],
            positive: &mut self.gp[..bsz],
            negative: self.gn[..bsz].as_flattened_mut(),
        };
        let ids = self.cfg.mask_accidental_hits.then_some(&self.pos_keys[..bsz]);
        let (q, p) = (&self.q[..bsz], &self.p[..bsz]);
        let sum = if shared {
            let inv_temp = match self.cfg.retrieval {
                Retrieval::ExpJump { inv_temp } | Retrieval::Gumbel { inv_temp } => inv_temp,
                _ => 1.0,
            };
            let shared = remainder::SharedDraws {
                stale: self.stale[..bsz].as_flattened(),
                shares: self.neg_weight[..bsz].as_flattened(),
                batch_queries: q,
                sample_lse: &self.sample_lse[..bsz],
                inv_temp,
                fresh_scores: self.cfg.fresh_scores,
                counts: self.counts[..bsz].as_flattened_mut(),
                lse: &mut self.lse_fresh[..bsz],
            };
            remainder::in_batch_with_shared_draws(q, p, ids, alpha, side, shared, grads)?
        } else {
            remainder::in_batch_with_remainder(q, p, ids, alpha, NEG, side, grads)?
        };
        self.backward_drawn(cache, batch);
        self.model.backward_scale(sum.grad_scale);
        Ok(StepReport {
            training_loss: sum.loss,
            interpretable_loss: sum.loss,
            staleness: if drawn > 0 { stale_sum / drawn as f32 } else { 0.0 },
            prob_pos: sum.prob_pos,
            tower_evals: evals,
            grad_norm: 0.0,
            score_scale: alpha,
        })
    }

    /// Re-embeds the `refresh_per_step` stalest occupied entries of
    /// `cache`, in chunks of `BATCH` (one batched call of the item tower
    /// each) so that no buffer grows with R. Returns the tower
    /// evaluations. Part of [`Self::step`] with a cache objective; public
    /// for drivers that compose the step themselves.
    pub fn refresh_stalest(&mut self, cache: &mut CacheMut<'_, I, DIM>) -> Result<u32> {
        let mut left = self.cfg.refresh_per_step.min(cache.capacity());
        let mut evals = 0;
        while left > 0 {
            let want = left.min(BATCH);
            let got = cache.as_ref().stalest(&mut self.slots[..want]);
            let items = cache.as_ref().items();
            for k in 0..got {
                self.neg_items.as_flattened_mut()[k] = items[self.slots[k]];
            }
            self.model.embed_items(&self.neg_items.as_flattened()[..got], &mut self.p[..got]);
            let up =
                Update { refresh_indices: &self.slots[..got], refresh_embeddings: &self.p[..got], ..Update::default() };
            cache.refresh(&up, self.cfg.eviction)?;
            evals += got as u32;
            left -= want;
            if got < want {
                break;
            }
        }
        Ok(evals)
    }

    /// After the optimiser step: refresh the positives already cached and
    /// the drawn entries, insert the positives not yet cached (streaming
    /// mode), age every entry. Every refresh writes the embedding the
    /// step computed before its optimiser update (`p`, `n`).
    fn update_cache(&mut self, cache: &mut CacheMut<'_, I, DIM>, batch: &Batch<'_, Q, I>) -> Result<()> {
        let bsz = batch.queries.len();
        let streaming = self.cfg.cache_mode == CacheMode::Streaming;
        // `pos_cached` and `slots` were filled during the step (before the
        // pass, or by its masking), and the cache has not changed since.
        for b in 0..bsz {
            let y = self.pos_keys[b];
            self.keep[b] = streaming && !self.pos_cached[b] && !self.pos_keys[..b].contains(&y);
        }
        // The positives found by the in-cache filter take their fresh
        // embeddings (a refresh, no ageing; the update below ages).
        let up = Update {
            refresh_indices: &self.slots[..bsz],
            refresh_embeddings: &self.p[..bsz],
            refresh_mask: Some(&self.pos_cached[..bsz]),
            ..Update::default()
        };
        cache.refresh(&up, self.cfg.eviction)?;
        // Refreshes: one per drawn negative, in query order; queries with
        // fewer negatives leave masked holes.
        for b in 0..bsz {
            let negs = self.loss.negatives(b);
            for i in 0..NEG {
                self.neg_valid[b][i] = i < negs.len();
                self.neg_slots[b][i] = negs.get(i).map_or(0, |&s| s as usize);
            }
        }
        let up = Update {
            refresh_indices: self.neg_slots[..bsz].as_flattened(),
            refresh_embeddings: self.n[..bsz].as_flattened(),
            refresh_mask: Some(self.neg_valid[..bsz].as_flattened()),
            new_embeddings: &self.p[..bsz],
            new_items: batch.positives,
            new_mask: Some(&self.keep[..bsz]),
        };
        cache.update(&up, self.cfg.eviction)
    }

    /// The mixed objective's loss and back-propagation, once the batch and
    /// its drawn negatives are embedded (`q`, `p`, `n`).
    fn mixed_backward(
        &mut self,
        cache: &CacheMut<'_, I, DIM>,
        batch: &Batch<'_, Q, I>,
        evals: u32,
        alpha: f32,
    ) -> Result<StepReport> {
        let bsz = batch.queries.len();
        // Pack the drawn negatives to the front of `n` and their slots to the
        // front of `neg_slots`, in (query, k) order; packing moves rows only
        // towards the front, so it can be done in place.
        let mut count = 0;
        for b in 0..bsz {
            for (i, &slot) in self.loss.negatives(b).iter().enumerate() {
                let row = self.n[b][i];
                self.n.as_flattened_mut()[count] = row;
                self.neg_slots.as_flattened_mut()[count] = slot as usize;
                count += 1;
            }
        }
        let (items, keys) = (cache.as_ref().items(), cache.as_ref().keys());
        let slots = &self.neg_slots.as_flattened()[..count];
        let model = &mut self.model;
        // `gn` is free in this objective: it takes the positives' in-batch
        // gradients, which add to their own-candidate gradients below.
        let in_batch_grad = self.gn.as_flattened_mut();
        let mut sink = |j: usize, g: &[f32; DIM]| {
            if j < bsz {
                in_batch_grad[j] = *g;
            } else {
                model.backward_item(&items[slots[j - bsz]], g);
            }
        };
        let ids = NegIds { keys, slots };
        let out = SoftmaxOut {
            scratch: &mut self.lse[..bsz],
            loss: None,
            grad_query: Some(&mut self.gq[..bsz]),
            grad_positive: Some(&mut self.gp[..bsz]),
            grad_shared: Some(&mut sink),
        };
        let negs = &self.n.as_flattened()[..count];
        let pos_keys = &self.pos_keys[..bsz];
        let sum = softmax::mixed_by(&self.q[..bsz], &self.p[..bsz], negs, pos_keys, &ids, alpha, out)?;
        // Each positive's gradient from its own query and, as another
        // query's candidate, from the others.
        for b in 0..bsz {
            let g = self.gn.as_flattened()[b];
            crate::vector::axpy(1.0, &g, &mut self.gp[b]);
        }
        self.backward_batch(batch);
        // Unpack: `update_cache` pairs row (b, k) of `n` with query b's k-th
        // negative. Going backwards, each row moves towards the back, onto
        // rows already moved or never packed.
        let mut next = count;
        for b in (0..bsz).rev() {
            for k in (0..self.loss.negatives(b).len()).rev() {
                next -= 1;
                self.n[b][k] = self.n.as_flattened()[next];
            }
        }
        self.model.backward_scale(sum.grad_scale);
        Ok(softmax_report(sum, evals, alpha))
    }

    fn in_batch_step(&mut self, batch: &Batch<'_, Q, I>) -> Result<StepReport> {
        let bsz = batch.queries.len();
        self.embed_batch(batch);
        let alpha = self.model.score_scale();
        let ids = self.cfg.mask_accidental_hits.then_some(&self.pos_keys[..bsz]);
        let out = SoftmaxOut {
            scratch: &mut self.lse[..bsz],
            loss: None,
            grad_query: Some(&mut self.gq[..bsz]),
            grad_positive: Some(&mut self.gp[..bsz]),
            grad_shared: None,
        };
        let sum = softmax::in_batch(&self.q[..bsz], &self.p[..bsz], ids, None, alpha, out)?;
        self.backward_batch(batch);
        self.model.backward_scale(sum.grad_scale);
        Ok(softmax_report(sum, 2 * bsz as u32, alpha))
    }

    fn sampled_step(
        &mut self,
        cache: &mut CacheMut<'_, I, DIM>,
        batch: &Batch<'_, Q, I>,
        corpus: &[I],
        negatives: usize,
        rng: &mut impl RngCore,
    ) -> Result<StepReport> {
        let bsz = batch.queries.len();
        if corpus.is_empty() || corpus.len() > u32::MAX as usize {
            return Err(Error::InvalidConfig { what: "sampled softmax needs a corpus" });
        }
        if cache.precision() != Precision::F32 {
            return Err(NEEDS_F32);
        }
        self.embed_batch(batch);
        // Draw the negatives uniformly, with replacement, into the cache's
        // storage, which this objective uses as its table; embed them
        // `BATCH` at a time.
        let mut j = 0;
        while j < negatives {
            let chunk = (negatives - j).min(BATCH);
            let drawn = &mut self.neg_items.as_flattened_mut()[..chunk];
            for item in drawn.iter_mut() {
                *item = corpus[random::below(rng, corpus.len() as u32) as usize];
            }
            self.model.embed_items(drawn, &mut self.n.as_flattened_mut()[..chunk]);
            for (k, (item, e)) in drawn.iter().zip(self.n.as_flattened()).enumerate() {
                cache.set_slot(j + k, e, *item, 0, true)?;
            }
            j += chunk;
        }
        // logQ: each corpus item is expected S/C times among the negatives,
        // so every negative logit is lowered by ln(S/C); the same shift is
        // applied as a raise of each positive logit.
        let shift = crate::math::ln(negatives as f32 / corpus.len() as f32);
        self.log_q[..bsz].fill(-shift);
        let alpha = self.model.score_scale();
        let table = cache.as_ref();
        let emb = table.embeddings().as_f32().ok_or(NEEDS_F32)?;
        let (emb, items, keys) = (&emb[..negatives], &table.items()[..negatives], &table.keys()[..negatives]);
        let mask = self.cfg.mask_accidental_hits;
        let keep = match self.cfg.sampled_item_gradients {
            0 => negatives,
            g => g.min(negatives),
        };
        let scale = negatives as f32 / keep as f32;
        let (mut pending, mut chosen) = (None, None);
        if self.cfg.sampled_item_priority && keep < negatives {
            // The negatives' embedding buffer is free once they are in the
            // table: it holds the priorities.
            chosen = Some(Priorities::new(&mut self.neg_items, &mut self.gn, &mut self.n, keep));
        } else {
            pending = Some(Pending::new(&mut self.model, &mut self.neg_items, &mut self.gn));
        }
        let mut sink = |j: usize, g: &[f32; DIM]| {
            if let Some(c) = chosen.as_mut() {
                c.offer(&items[j], g, rng);
            } else if let Some(p) = pending.as_mut() {
                if keep == negatives {
                    p.push(&items[j], g);
                } else if j < keep {
                    p.push(&items[j], &g.map(|x| scale * x));
                }
            }
        };
        let out = SoftmaxOut {
            scratch: &mut self.lse[..bsz],
            loss: None,
            grad_query: Some(&mut self.gq[..bsz]),
            grad_positive: Some(&mut self.gp[..bsz]),
            grad_shared: Some(&mut sink),
        };
        let sum = softmax::sampled(
            &self.q[..bsz],
            &self.p[..bsz],
            emb,
            Some(&self.log_q[..bsz]),
            None,
            mask.then_some(&self.pos_keys[..bsz]),
            mask.then_some(keys),
            alpha,
            out,
        );
        if let Some(p) = pending.as_mut() {
            p.flush();
        }
        if let Some(c) = chosen {
            c.finish(&mut self.model);
        }
        let sum = sum?;
        self.backward_batch(batch);
        self.model.backward_scale(sum.grad_scale);
        Ok(softmax_report(sum, (2 * bsz + negatives) as u32, alpha))
    }

    fn full_step(
        &mut self,
        fork: &impl Fork,
        cache: &mut CacheMut<'_, I, DIM>,
        batch: &Batch<'_, Q, I>,
        corpus: &[I],
    ) -> Result<StepReport> {
        let bsz = batch.queries.len();
        if cache.precision() != Precision::F32 {
            return Err(NEEDS_F32);
        }
        let index = batch.positive_index.ok_or(Error::InvalidConfig { what: "full softmax needs positive_index" })?;
        check_len("positive_index", bsz, index.len())?;
        if corpus.is_empty() || corpus.len() > cache.capacity() {
            return Err(Error::CapacityExceeded { requested: corpus.len(), capacity: cache.capacity() });
        }
        if let Some(&bad) = index.iter().find(|&&i| i as usize >= corpus.len()) {
            return Err(Error::IndexOutOfRange { what: "positive_index", index: bad as usize, bound: corpus.len() });
        }
        let evals = self.fill_cache_on(fork, cache, corpus)?;
        self.model.embed_queries(batch.queries, &mut self.q[..bsz]);
        for (slot, &i) in self.slots.iter_mut().zip(index) {
            *slot = i as usize;
        }
        let alpha = self.model.score_scale();
        let emb = &cache.as_ref().embeddings().as_f32().ok_or(NEEDS_F32)?[..corpus.len()];
        let parts = FullParts::new(&self.q[..bsz], emb, &self.slots[..bsz], alpha)?;
        let mut sum = parts.first_on(fork, &mut self.lse[..bsz])?;
        let lse = &self.lse[..bsz];
        // The second pass runs as the item tower asks for its gradients,
        // run by run ([`Towers::backward_items_halves`] and
        // [`backward_run`]). With halves apart, the second half's query
        // gradient and d L / d alpha are summed apart too (the query
        // gradient in `gp`, which the full softmax does not use
        // otherwise), and added to the first half's before they are
        // scaled; else one run after another into the same sums, which
        // gives `softmax::full`'s bits.
        let halves = self.model.item_halves();
        let (gq, gq_second) = (&mut self.gq[..bsz], &mut self.gp[..bsz]);
        gq.iter_mut().for_each(|g| *g = [0.0; DIM]);
        if halves {
            gq_second.iter_mut().for_each(|g| *g = [0.0; DIM]);
        }
        let (mut scale, mut scale_second) = (sum.grad_scale, 0.0f32);
        // Each half's result and the next row it expects: a model that
        // skips or repeats rows is refused. After a failure a half's
        // gradients are zeros, so that nothing stale goes back.
        let mid = if halves { half(corpus.len()) } else { corpus.len() };
        let (mut first_half, mut second_half) = ((Ok(()), 0), (Ok(()), mid));
        let mut first =
            |r: Range<usize>, out: &mut [[f32; DIM]]| run_part(&parts, r, lse, gq, &mut scale, out, &mut first_half);
        if halves {
            let mut second = |r: Range<usize>, out: &mut [[f32; DIM]]| {
                run_part(&parts, r, lse, gq_second, &mut scale_second, out, &mut second_half)
            };
            self.model.backward_items_halves(fork, corpus, [&mut first, &mut second]);
        } else {
            let model = &mut self.model;
            backward_run(&mut |ys: &[I], gs: &[[f32; DIM]]| model.backward_items(ys, gs), corpus, 0, &mut first);
        }
        first_half.0.and(second_half.0)?;
        if first_half.1 != mid || second_half.1 != corpus.len() {
            return Err(SKIPPED_ITEMS);
        }
        sum.grad_scale = scale;
        if halves {
            for (g, h) in self.gq[..bsz].iter_mut().zip(&self.gp[..bsz]) {
                for (g, &h) in g.iter_mut().zip(h) {
                    *g += h;
                }
            }
            sum.grad_scale += scale_second;
        }
        parts.finish(&mut sum, &mut self.gq[..bsz]);
        self.model.backward_queries(batch.queries, &self.gq[..bsz]);
        self.model.backward_scale(sum.grad_scale);
        Ok(softmax_report(sum, evals + bsz as u32, alpha))
    }
}

/// One run of the full softmax's second pass, for the item tower: `seen`
/// holds the half's result so far and the row the run must start at.
fn run_part<const DIM: usize>(
    parts: &FullParts<'_, DIM>,
    rows: Range<usize>,
    lse: &[LogSumExp],
    grad_query: &mut [[f32; DIM]],
    grad_scale: &mut f32,
    out: &mut [[f32; DIM]],
    seen: &mut (Result<()>, usize),
) {
    if seen.0.is_ok() && rows.start != seen.1 {
        seen.0 = Err(SKIPPED_ITEMS);
    }
    if seen.0.is_ok() {
        seen.1 = rows.end;
        seen.0 = parts.second(rows, lse, grad_query, grad_scale, out);
    }
    if seen.0.is_err() {
        out.iter_mut().for_each(|g| *g = [0.0; DIM]);
    }
}

/// Marks `slots[b]` occupied or empty for each `b` with `which[b]` set.
fn set_occupied<I: Item, const DIM: usize>(
    cache: &mut CacheMut<'_, I, DIM>,
    slots: &[usize],
    which: &[bool],
    occupied: bool,
) -> Result<()> {
    for (&slot, _) in slots.iter().zip(which).filter(|(_, &w)| w) {
        cache.set_occupied(slot, occupied)?;
    }
    Ok(())
}

/// Entries of [`Sequence`] per call of [`Towers::backward_sequence`].
const SEQUENCE: usize = 32;

/// A step's upstream gradients on their way to
/// [`Towers::backward_sequence`], in the order they came, [`SEQUENCE`] at
/// a time.
struct Sequence<'a, 'm, M, Q, I, const DIM: usize> {
    model: &'m mut M,
    buf: heapless::Vec<Upstream<'a, Q, I, DIM>, SEQUENCE>,
}

impl<'a, 'm, M: Towers<Q, I, DIM>, Q, I, const DIM: usize> Sequence<'a, 'm, M, Q, I, DIM> {
    fn new(model: &'m mut M) -> Self {
        Self { model, buf: heapless::Vec::new() }
    }

    fn push(&mut self, u: Upstream<'a, Q, I, DIM>) {
        if self.buf.is_full() {
            self.flush();
        }
        // Not full after a flush.
        let _ = self.buf.push(u);
    }

    fn flush(&mut self) {
        self.model.backward_sequence(&self.buf);
        self.buf.clear();
    }
}

/// Candidate gradients on their way to the item tower, `items.len()` at a
/// time through [`Towers::backward_items`], in the order they came.
struct Pending<'a, M, Q, I, const DIM: usize> {
    model: &'a mut M,
    items: &'a mut [I],
    grads: &'a mut [[f32; DIM]],
    n: usize,
    _queries: PhantomData<fn(Q)>,
}

impl<'a, M: Towers<Q, I, DIM>, Q, I: Item, const DIM: usize> Pending<'a, M, Q, I, DIM> {
    fn new<const B: usize, const N: usize>(
        model: &'a mut M,
        items: &'a mut [[I; N]; B],
        grads: &'a mut [[[f32; DIM]; N]; B],
    ) -> Self {
        Self::over(model, items.as_flattened_mut(), grads.as_flattened_mut())
    }

    /// Batches of up to the shorter of `items` and `grads` (one at a time
    /// if either is empty).
    fn over(model: &'a mut M, items: &'a mut [I], grads: &'a mut [[f32; DIM]]) -> Self {
        let n = items.len().min(grads.len());
        Self { model, items: &mut items[..n], grads: &mut grads[..n], n: 0, _queries: PhantomData }
    }

    fn push(&mut self, item: &I, grad: &[f32; DIM]) {
        if self.items.is_empty() {
            self.model.backward_items(core::slice::from_ref(item), core::slice::from_ref(grad));
            return;
        }
        self.items[self.n] = *item;
        self.grads[self.n] = *grad;
        self.n += 1;
        if self.n == self.items.len() {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.model.backward_items(&self.items[..self.n], &self.grads[..self.n]);
        self.n = 0;
    }
}

/// Priority sampling (Duffield, Lund and Thorup) of the candidates'
/// gradients for the item tower: keeps the `k` with the largest
/// priorities `|g_j| / u_j` (`u_j` uniform in (0, 1)) and the largest
/// priority it let go, `tau`. Scaling each kept gradient by
/// `max(|g_j|, tau) / |g_j|` makes their sum an unbiased estimate of the
/// sum of every candidate's gradient; with `k` or fewer candidates it is
/// that sum.
struct Priorities<'a, I, const DIM: usize> {
    items: &'a mut [I],
    grads: &'a mut [[f32; DIM]],
    /// Row `i`'s first value is kept gradient `i`'s priority.
    prio: &'a mut [[f32; DIM]],
    n: usize,
    tau: f32,
}

impl<'a, I: Item, const DIM: usize> Priorities<'a, I, DIM> {
    fn new<const B: usize, const N: usize>(
        items: &'a mut [[I; N]; B],
        grads: &'a mut [[[f32; DIM]; N]; B],
        prio: &'a mut [[[f32; DIM]; N]; B],
        k: usize,
    ) -> Self {
        let k = k.min(B * N);
        Self {
            items: &mut items.as_flattened_mut()[..k],
            grads: &mut grads.as_flattened_mut()[..k],
            prio: &mut prio.as_flattened_mut()[..k],
            n: 0,
            tau: 0.0,
        }
    }

    fn offer(&mut self, item: &I, g: &[f32; DIM], rng: &mut impl RngCore) {
        let w = crate::math::sqrt(g.iter().map(|x| x * x).sum());
        if w == 0.0 || self.items.is_empty() {
            return;
        }
        let p = w / random::open01(rng);
        let slot = if self.n < self.items.len() {
            self.n += 1;
            self.n - 1
        } else {
            let mut low = 0;
            for i in 1..self.n {
                if self.prio[i][0] < self.prio[low][0] {
                    low = i;
                }
            }
            let least = self.prio[low][0];
            if p <= least {
                self.tau = self.tau.max(p);
                return;
            }
            self.tau = self.tau.max(least);
            low
        };
        self.items[slot] = *item;
        self.grads[slot] = *g;
        self.prio[slot][0] = p;
    }

    /// Scales the kept gradients to their estimates; returns how many.
    fn scale(&mut self) -> usize {
        for g in self.grads[..self.n].iter_mut() {
            let w = crate::math::sqrt(g.iter().map(|x| x * x).sum());
            let s = w.max(self.tau) / w;
            g.iter_mut().for_each(|x| *x *= s);
        }
        self.n
    }

    fn finish<M: Towers<Q, I, DIM>, Q>(mut self, model: &mut M) {
        let n = self.scale();
        model.backward_items(&self.items[..n], &self.grads[..n]);
    }
}

/// The keys of packed negatives, looked up through their slots.
struct NegIds<'a> {
    keys: &'a [u64],
    slots: &'a [usize],
}

impl softmax::Ids<u64> for NegIds<'_> {
    fn len(&self) -> usize {
        self.slots.len()
    }
    fn id(&self, k: usize) -> &u64 {
        &self.keys[self.slots[k]]
    }
}

fn softmax_report(sum: softmax::SoftmaxSummary, evals: u32, alpha: f32) -> StepReport {
    StepReport {
        training_loss: sum.loss,
        interpretable_loss: sum.loss,
        staleness: 0.0,
        prob_pos: sum.prob_pos,
        tower_evals: evals,
        grad_norm: 0.0,
        score_scale: alpha,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::NegativeCache;
    use crate::parallel::Reversed;
    use crate::tower::{SeparateTowers, Side, TokenModel, TowerConfig};
    use rand_core::SeedableRng;
    use rand_pcg::Pcg64Mcg;

    #[test]
    fn priority_sampling_estimates_the_sum_without_bias() {
        // Ten gradients of unequal norms, three kept: the mean of the
        // scaled kept sum over many draws is the full sum (within five
        // standard errors); with ten kept it is the sum exactly.
        let g: [[f32; 2]; 10] = core::array::from_fn(|j| [(j as f32 + 1.0) * 0.3, 1.0 - 0.15 * j as f32]);
        let full = g.iter().fold([0.0f64; 2], |a, x| [a[0] + x[0] as f64, a[1] + x[1] as f64]);
        let mut rng = Pcg64Mcg::seed_from_u64(9);
        let trials = 40_000;
        let (mut mean, mut sq) = ([0.0f64; 2], [0.0f64; 2]);
        for _ in 0..trials {
            let (mut items, mut grads, mut prio) = ([[0u32; 1]; 4], [[[0.0f32; 2]; 1]; 4], [[[0.0f32; 2]; 1]; 4]);
            let mut p = Priorities::new(&mut items, &mut grads, &mut prio, 3);
            for (j, x) in g.iter().enumerate() {
                p.offer(&(j as u32), x, &mut rng);
            }
            let n = p.scale();
            assert_eq!(n, 3);
            for d in 0..2 {
                let est: f64 = p.grads[..n].iter().map(|x| x[d] as f64).sum();
                mean[d] += est / trials as f64;
                sq[d] += est * est / trials as f64;
            }
        }
        for d in 0..2 {
            let se = ((sq[d] - mean[d] * mean[d]) / trials as f64).sqrt();
            assert!((mean[d] - full[d]).abs() < 5.0 * se, "dim {d}: {} against {} (se {se})", mean[d], full[d]);
        }
        let (mut items, mut grads, mut prio) = ([[0u32; 1]; 10], [[[0.0f32; 2]; 1]; 10], [[[0.0f32; 2]; 1]; 10]);
        let mut p = Priorities::new(&mut items, &mut grads, &mut prio, 10);
        for (j, x) in g.iter().enumerate() {
            p.offer(&(j as u32), x, &mut rng);
        }
        assert_eq!(p.scale(), 10);
        assert_eq!(p.grads, &g[..]);
    }

    /// A corpus write that fails part-way (a non-finite embedding, in the
    /// second `BATCH` of items) leaves the cache as `clear` and the writes
    /// before it would, split over threads or not.
    #[test]
    fn a_failed_corpus_fill_leaves_the_cleared_caches_state() {
        use crate::cache::CacheRef;
        use crate::layered::LayerTowers;
        use crate::layers::Dense;
        use crate::tower::{Model, Towers as _};
        type M = LayerTowers<Dense<2, 3, 2>, Dense<2, 3, 2>, 2, 2, 2>;
        type C = NegativeCache<[f32; 2], 7, 3>;
        let mut t = Trainer::<M, [f32; 2], [f32; 2], 3, 2, 1>::new(
            LayerTowers::new(Dense::new(), Dense::new(), 1.0),
            TrainerConfig::DEFAULT,
        );
        t.model.init(&mut Pcg64Mcg::seed_from_u64(5));
        t.init().unwrap();
        let mut corpus: [[f32; 2]; 6] = core::array::from_fn(|j| [j as f32 - 2.0, 1.0 + 0.5 * j as f32]);
        corpus[3][1] = f32::INFINITY;
        let mut want = C::new();
        let mut w = want.as_mut();
        for (j, y) in corpus[..3].iter().enumerate() {
            let mut e = [0.0; 3];
            t.model.embed_item(y, &mut e);
            w.set_slot(j, &e, *y, 0, true).unwrap();
        }
        let serial = Serial;
        let reversed = Reversed::default();
        for split in [false, true] {
            // A cache that held other items, two of them past the corpus.
            let mut got = C::new();
            let mut g = got.as_mut();
            for j in 0..7 {
                g.set_slot(j, &[j as f32, 1.0, 0.0], [9.0, j as f32], j as i32, j % 3 != 1).unwrap();
            }
            let r = if split {
                t.fill_cache_on(&reversed, &mut g, &corpus)
            } else {
                t.fill_cache_on(&serial, &mut g, &corpus)
            };
            assert_eq!(r, Err(Error::NonFinite { what: "slot embedding" }), "split {split}");
            let (g, w) = (got.as_ref(), want.as_ref());
            let bits = |c: &CacheRef<'_, [f32; 2], 3>| {
                let e = c.embeddings().as_f32().unwrap().iter().flatten().map(|x| x.to_bits());
                e.chain(c.items().iter().flatten().map(|x| x.to_bits())).collect::<heapless::Vec<u32, 64>>()
            };
            assert_eq!(bits(&g), bits(&w), "split {split}");
            assert_eq!(g.keys(), w.keys());
            assert_eq!(g.ages(), w.ages());
            assert_eq!(g.stamps(), w.stamps());
            assert_eq!(g.occupied(), w.occupied());
            assert_eq!(g.clock(), w.clock());
        }
        assert!(reversed.joins() > 0, "the corpus was not split");
    }

    type Towers = SeparateTowers<13, 4, 5, 3, 0>;
    type Item2 = [u32; 2];
    /// 3-dimensional embeddings, batches of 2, 2 negatives.
    type Small = Trainer<Towers, Item2, Item2, 3, 2, 2>;
    /// 4 slots.
    type Cache = NegativeCache<Item2, 4, 3>;

    const A: Item2 = [1, 2];
    const B: Item2 = [3, 4];
    const C: Item2 = [5, 6];
    const D: Item2 = [7, 8];
    /// Stale embeddings: nothing the towers output (unit vectors).
    const STALE: [[f32; 3]; 4] = [[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0], [9.0, 9.0, 0.0]];

    /// A trainer whose cache holds `items` in slots 0.. with stale
    /// embeddings, stepping with learning rate 0 so that the towers after
    /// the step are the towers that embedded the batch: every refreshed
    /// slot must then hold exactly `embed(its item)`.
    fn trainer(objective: Objective, cache_mode: CacheMode, items: &[Item2]) -> (Small, Cache) {
        let cfg = TrainerConfig {
            objective,
            cache_mode,
            retrieval: Retrieval::Gumbel { inv_temp: 1.0 },
            optimizer: OptimizerKind::Sgd { momentum: 0.0, weight_decay: 0.0 },
            ..TrainerConfig::DEFAULT
        };
        let mut t = Small::new(Towers::new(TowerConfig::DEFAULT), cfg);
        t.model.init(&mut Pcg64Mcg::seed_from_u64(3));
        t.init().unwrap();
        let mut cache = Cache::new();
        let mut c = cache.as_mut();
        for (j, item) in items.iter().enumerate() {
            c.set_slot(j, &STALE[j], *item, 5, true).unwrap();
        }
        (t, cache)
    }

    fn embed(t: &Small, item: &Item2) -> [f32; 3] {
        let mut e = [0.0; 3];
        t.model.embed(Side::Item, item, &mut e);
        e
    }

    fn assert_fresh(t: &Small, cache: &Cache, slot: usize) {
        let c = cache.as_ref();
        let want = embed(t, &c.items()[slot]);
        // Bit for bit: the cache stores the very embedding computed.
        assert_eq!(c.embeddings().row(slot), want, "slot {slot} ({:?})", c.items()[slot]);
    }

    #[test]
    fn mixed_objective_refreshes_each_slot_with_its_own_embedding() {
        // The cache holds A and B. Query 0's positive A is masked, so it has
        // one candidate (B) for NEG = 2; query 1 (positive C) draws both A
        // and B. The mixed objective packs the negatives' rows, so query
        // 1's rows move forwards; each slot must still get its own row.
        for seed in 0..20 {
            let (mut t, mut cache) = trainer(Objective::CacheMixed, CacheMode::Corpus, &[A, B]);
            let batch = Batch { queries: &[[11, 12], [13, 14]], positives: &[A, C], positive_index: None };
            t.step(&mut cache.as_mut(), &batch, &[], 0.0, &mut Pcg64Mcg::seed_from_u64(seed)).unwrap();
            assert_eq!(t.loss.negatives(0).len(), 1);
            assert_eq!(t.loss.negatives(1).len(), 2);
            assert_fresh(&t, &cache, 0);
            assert_fresh(&t, &cache, 1);
        }
    }

    #[test]
    fn exact_in_batch_hides_batch_items_from_the_draw() {
        // The cache holds A, B, C and D; the batch's positives are A and C.
        // Both are in the softmax exactly, so neither query may draw them
        // from the cache: every draw is B or D, and afterwards all four
        // slots are occupied again (the hiding is undone).
        for seed in 0..20 {
            let (mut t, mut cache) = trainer(Objective::CacheInBatch, CacheMode::Corpus, &[A, B, C, D]);
            let batch = Batch { queries: &[[11, 12], [13, 14]], positives: &[A, C], positive_index: None };
            let r = t.step(&mut cache.as_mut(), &batch, &[], 0.0, &mut Pcg64Mcg::seed_from_u64(seed)).unwrap();
            for b in 0..2 {
                assert_eq!(t.loss.negatives(b).len(), 2);
                assert!(t.loss.negatives(b).iter().all(|&s| s == 1 || s == 3), "{:?}", t.loss.negatives(b));
            }
            assert!(cache.as_ref().occupied().iter().all(|&o| o));
            assert!(r.interpretable_loss.is_finite() && r.prob_pos > 0.0 && r.prob_pos < 1.0);
            for slot in 0..4 {
                if slot == 0 || slot == 2 || t.loss.negatives(0).contains(&(slot as u32)) {
                    assert_fresh(&t, &cache, slot);
                }
            }
        }
    }

    #[test]
    fn shared_draws_hide_batch_items_and_draw_at_random() {
        let cfg = TrainerConfig {
            objective: Objective::CacheShared,
            optimizer: OptimizerKind::Sgd { momentum: 0.0, weight_decay: 0.0 },
            ..TrainerConfig::DEFAULT
        };
        // NEG 2: independent untempered draws only.
        assert!(Small::new(Towers::new(TowerConfig::DEFAULT), cfg).init().is_ok());
        for retrieval in
            [Retrieval::ExpJump { inv_temp: 0.5 }, Retrieval::Gumbel { inv_temp: 1.0 }, Retrieval::MaxScore]
        {
            let cfg = TrainerConfig { retrieval, ..cfg };
            assert!(Small::new(Towers::new(TowerConfig::DEFAULT), cfg).init().is_err(), "{retrieval:?}");
        }
        // NEG 1: batch items are never drawn, every draw is refreshed.
        type One = Trainer<Towers, Item2, Item2, 3, 2, 1>;
        for seed in 0..20 {
            let mut t = One::new(Towers::new(TowerConfig::DEFAULT), cfg);
            t.model.init(&mut Pcg64Mcg::seed_from_u64(3));
            t.init().unwrap();
            let mut cache = Cache::new();
            for (j, item) in [A, B, C, D].iter().enumerate() {
                cache.as_mut().set_slot(j, &STALE[j], *item, 5, true).unwrap();
            }
            let batch = Batch { queries: &[[11, 12], [13, 14]], positives: &[A, C], positive_index: None };
            let r = t.step(&mut cache.as_mut(), &batch, &[], 0.0, &mut Pcg64Mcg::seed_from_u64(seed)).unwrap();
            for b in 0..2 {
                assert_eq!(t.loss.negatives(b).len(), 1);
                assert!(t.loss.negatives(b).iter().all(|&s| s == 1 || s == 3), "{:?}", t.loss.negatives(b));
            }
            assert!(cache.as_ref().occupied().iter().all(|&o| o));
            assert!(r.interpretable_loss.is_finite() && r.prob_pos > 0.0 && r.prob_pos < 1.0);
            let mut e = [0.0; 3];
            for b in 0..2 {
                let slot = t.loss.negatives(b)[0] as usize;
                t.model.embed(Side::Item, &cache.as_ref().items()[slot], &mut e);
                assert_eq!(cache.as_ref().embeddings().row(slot), e);
            }
        }
    }

    /// A slot several queries draw is one tower evaluation: with the
    /// batch's items hidden, B is both queries' only candidate, drawn twice
    /// by each, and embedded once; the cache holds its fresh embedding.
    #[test]
    fn a_slot_drawn_by_several_queries_is_embedded_once() {
        let cfg = TrainerConfig {
            objective: Objective::CacheShared,
            optimizer: OptimizerKind::Sgd { momentum: 0.0, weight_decay: 0.0 },
            ..TrainerConfig::DEFAULT
        };
        let mut t = Small::new(Towers::new(TowerConfig::DEFAULT), cfg);
        t.model.init(&mut Pcg64Mcg::seed_from_u64(3));
        t.init().unwrap();
        let mut cache = Cache::new();
        for (j, item) in [A, B, C].iter().enumerate() {
            cache.as_mut().set_slot(j, &STALE[j], *item, 5, true).unwrap();
        }
        let batch = Batch { queries: &[[11, 12], [13, 14]], positives: &[A, C], positive_index: None };
        let r = t.step(&mut cache.as_mut(), &batch, &[], 0.0, &mut Pcg64Mcg::seed_from_u64(0)).unwrap();
        for b in 0..2 {
            assert_eq!(t.loss.negatives(b), &[1]);
            assert_eq!(t.loss.negative_weights(b), &[1.0]);
        }
        assert_eq!(r.tower_evals, 2 * 2 + 1);
        let mut e = [0.0; 3];
        t.model.embed(Side::Item, &B, &mut e);
        assert_eq!(cache.as_ref().embeddings().row(1), e);
    }

    #[test]
    fn cached_positives_are_refreshed() {
        for (objective, mode) in [
            (Objective::Cache, CacheMode::Streaming),
            (Objective::Cache, CacheMode::Corpus),
            (Objective::CacheMixed, CacheMode::Streaming),
        ] {
            // One query whose positive A sits in slot 0 with a stale
            // embedding; its only candidate (masked A) is B.
            let (mut t, mut cache) = trainer(objective, mode, &[A, B]);
            let batch = Batch { queries: &[[11, 12]], positives: &[A], positive_index: None };
            t.step(&mut cache.as_mut(), &batch, &[], 0.0, &mut Pcg64Mcg::seed_from_u64(1)).unwrap();
            assert_fresh(&t, &cache, 0);
            assert_fresh(&t, &cache, 1);
            // Not inserted a second time; slots 2 and 3 stay empty.
            assert_eq!(cache.as_ref().occupied(), &[true, true, false, false]);
        }
    }

    /// A bf16 or int8 cache steps exactly as an `f32` cache holding its
    /// decoded rows (the pass and the loss read the stored values, bit for
    /// bit), and stores each refreshed or inserted embedding encoded.
    #[test]
    fn quantized_caches_step_on_their_stored_values() {
        use crate::storage::{dequantize_i8, quantize_i8, Bf16Store, Int8Store, Store};
        fn check<S: Store<4, 3>>(encode: impl Fn(&[f32; 3]) -> [f32; 3]) {
            for seed in 0..10 {
                let (mut plain, mut f32_cache) = trainer(Objective::CacheInBatch, CacheMode::Streaming, &[]);
                let (mut small, _) = trainer(Objective::CacheInBatch, CacheMode::Streaming, &[]);
                plain.set_control_variate(Some(1.0)).unwrap();
                small.set_control_variate(Some(1.0)).unwrap();
                let mut cache = NegativeCache::<Item2, 4, 3, S>::new();
                for (j, item) in [A, B, D].iter().enumerate() {
                    cache.as_mut().set_slot(j, &STALE[j], *item, 5, true).unwrap();
                    f32_cache.as_mut().set_slot(j, &encode(&STALE[j]), *item, 5, true).unwrap();
                }
                let batch = Batch { queries: &[[11, 12], [13, 14]], positives: &[A, C], positive_index: None };
                let rng = || Pcg64Mcg::seed_from_u64(seed);
                let r0 = plain.step(&mut f32_cache.as_mut(), &batch, &[], 0.1, &mut rng()).unwrap();
                let r1 = small.step(&mut cache.as_mut(), &batch, &[], 0.1, &mut rng()).unwrap();
                assert_eq!(r0.training_loss.to_bits(), r1.training_loss.to_bits(), "seed {seed}");
                assert_eq!(r0.grad_norm.to_bits(), r1.grad_norm.to_bits(), "seed {seed}");
                for b in 0..2 {
                    assert_eq!(plain.loss.negatives(b), small.loss.negatives(b));
                }
                // Every slot written this step holds its f32 twin's value, encoded.
                let (q, f) = (cache.as_ref(), f32_cache.as_ref());
                assert_eq!(q.items(), f.items());
                for j in 0..4 {
                    assert_eq!(q.embeddings().row(j), encode(&f.embeddings().row(j)), "seed {seed} slot {j}");
                }
            }
        }
        check::<Int8Store<4, 3>>(|x| {
            let (q, k) = quantize_i8(x);
            dequantize_i8(&q, k)
        });
        check::<Bf16Store<4, 3>>(|x| x.map(|v| crate::storage::bf16_to_f32(crate::storage::f32_to_bf16(v))));
    }

    /// Sampled and full softmax read the cache as `f32` rows: on an int8
    /// cache they fail before touching it.
    #[test]
    fn softmax_objectives_refuse_a_quantized_cache() {
        use crate::storage::Int8Store;
        for objective in [Objective::Sampled { negatives: 2 }, Objective::Full] {
            let (mut t, _) = trainer(objective, CacheMode::Streaming, &[]);
            let mut cache = NegativeCache::<Item2, 4, 3, Int8Store<4, 3>>::new();
            let batch = Batch { queries: &[[11, 12]], positives: &[A], positive_index: Some(&[0]) };
            let r = t.step(&mut cache.as_mut(), &batch, &[A, B], 0.1, &mut Pcg64Mcg::seed_from_u64(1));
            assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{objective:?}: {r:?}");
            assert!(cache.is_empty(), "{objective:?} wrote into the cache");
        }
    }

    /// Separate towers back-propagate each side in batches (queries, then
    /// the items in the interleaved order); the same model told that its
    /// towers share parameters goes one input at a time, interleaved. Both
    /// must reach the same bits, for every objective.
    #[test]
    fn separate_towers_in_batches_and_split_steps_give_the_interleaved_bits() {
        use crate::layered::LayerTowers;
        use crate::layers::{Act, Activation, Chain, Dense, ParamVisitor, L2};
        use crate::tower::Towers as TowerPair;
        type Tower = Chain<Dense<6, 40, 2>, Chain<Act<40>, Chain<Dense<40, 67, 2>, L2<67>, 67>, 40>, 40>;
        type Dense2 = LayerTowers<Tower, Tower, 6, 6, 2>;
        struct Words(heapless::Vec<u32, 32768>);
        impl ParamVisitor for Words {
            fn dense(&mut self, v: &mut [f32], _: &mut [f32], s: &mut [&mut [f32]]) {
                self.0.extend(v.iter().chain(s.iter().flat_map(|s| s.iter())).map(|x| x.to_bits()));
            }
            fn sparse(&mut self, _: usize, _: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]], _: &[bool]) {}
        }
        fn run<M: TowerPair<[f32; 6], [f32; 6], 67>>(
            model: M,
            objective: Objective,
            fork: &impl Fork,
        ) -> (heapless::Vec<u32, 32768>, [f32; 4]) {
            let cfg = TrainerConfig { objective, ..TrainerConfig::DEFAULT };
            let mut t = Trainer::<M, [f32; 6], [f32; 6], 67, 5, 2>::new(model, cfg);
            let mut rng = Pcg64Mcg::seed_from_u64(4);
            t.model.init(&mut rng);
            t.init().unwrap();
            let corpus: [[f32; 6]; 9] =
                core::array::from_fn(|j| core::array::from_fn(|i| ((j * 7 + i * 3) % 11) as f32 - 5.0));
            let mut cache = NegativeCache::<[f32; 6], 9, 67>::new();
            let mut losses = [0.0; 4];
            for (step, loss) in losses.iter_mut().enumerate() {
                let picks: [usize; 5] = core::array::from_fn(|b| (step * 5 + b * 4) % 9);
                let queries: [[f32; 6]; 5] = core::array::from_fn(|b| corpus[picks[b]].map(|x| 0.5 * x + 1.0));
                let positives = picks.map(|j| corpus[j]);
                let index = picks.map(|j| j as u32);
                let batch = Batch { queries: &queries, positives: &positives, positive_index: Some(&index) };
                *loss = t.step_on(fork, &mut cache.as_mut(), &batch, &corpus, 0.05, &mut rng).unwrap().training_loss;
            }
            let mut words = Words(heapless::Vec::new());
            t.model.visit(&mut words);
            words.0.extend(cache.as_ref().embeddings().as_f32().unwrap().iter().flatten().map(|x| x.to_bits()));
            (words.0, losses)
        }
        let tower = || Chain(Dense::new(), Chain(Act(Activation::Relu), Chain(Dense::new(), L2)));
        let model = || LayerTowers::new(tower(), tower(), 8.0);
        for objective in [
            Objective::Cache,
            Objective::CacheInBatch,
            Objective::CacheMixed,
            Objective::InBatch,
            Objective::Sampled { negatives: 7 },
            Objective::Full,
        ] {
            let (batched, a) = run(model(), objective, &Serial);
            let (one, b) = run(Single::<Dense2, false>(model()), objective, &Serial);
            assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits), "{objective:?}: losses");
            assert!(batched == one, "{objective:?}: parameters, optimiser state or cache differ");
            // Split over a fork (the full softmax's corpus in four pieces,
            // run last to first): the same bits.
            let fork = Reversed::default();
            let (split, c) = run(model(), objective, &fork);
            if objective == Objective::Full {
                assert!(fork.joins() > 0, "the corpus was not split");
            }
            assert_eq!(a.map(f32::to_bits), c.map(f32::to_bits), "{objective:?}: losses, split");
            assert!(batched == split, "{objective:?}: parameters, optimiser state or cache differ, split");
            // With a twin the full softmax gathers its corpus's halves
            // apart: other bits, but the same on one thread and split, and
            // only the full softmax changes.
            let fork_twin = Reversed::default();
            let (twin, d) = run(model().with_twin(tower()), objective, &Serial);
            let (twin_split, e) = run(model().with_twin(tower()), objective, &fork_twin);
            assert_eq!(d.map(f32::to_bits), e.map(f32::to_bits), "{objective:?}: losses, twin split");
            assert!(twin == twin_split, "{objective:?}: parameters, optimiser state or cache differ, twin split");
            if objective == Objective::Full {
                assert!(fork_twin.joins() > fork.joins(), "the halves were not split");
                assert!(twin != batched, "the twin changed nothing");
            } else {
                assert!(twin == batched, "{objective:?}: the twin changed the bits");
            }
        }
    }

    /// `M` through its single-input methods only: one input at a time, as
    /// if its towers shared parameters. With `SKIP` it also claims to
    /// gather the corpus's halves apart and back-propagates only the first
    /// (a broken model).
    struct Single<M, const SKIP: bool>(M);

    impl<M: crate::tower::Model<DIM>, const DIM: usize, const SKIP: bool> crate::tower::Model<DIM> for Single<M, SKIP> {
        fn init(&mut self, rng: &mut impl RngCore) {
            self.0.init(rng)
        }
        fn score_scale(&self) -> f32 {
            self.0.score_scale()
        }
        fn backward_scale(&mut self, d_alpha: f32) {
            self.0.backward_scale(d_alpha)
        }
        fn zero_grad(&mut self) {
            self.0.zero_grad()
        }
        fn visit(&mut self, v: &mut dyn crate::layers::ParamVisitor) {
            self.0.visit(v)
        }
        fn state_slots(&self) -> usize {
            self.0.state_slots()
        }
    }

    impl<M, Q, I, const DIM: usize, const SKIP: bool> crate::tower::Towers<Q, I, DIM> for Single<M, SKIP>
    where
        M: crate::tower::Towers<Q, I, DIM>,
    {
        fn embed_query(&self, x: &Q, out: &mut [f32; DIM]) {
            self.0.embed_query(x, out)
        }
        fn embed_item(&self, y: &I, out: &mut [f32; DIM]) {
            self.0.embed_item(y, out)
        }
        fn backward_query(&mut self, x: &Q, g: &[f32; DIM]) {
            self.0.backward_query(x, g)
        }
        fn backward_item(&mut self, y: &I, g: &[f32; DIM]) {
            self.0.backward_item(y, g)
        }
        fn item_halves(&self) -> bool {
            SKIP
        }
        fn backward_items_halves<F: Fork>(
            &mut self,
            _: &F,
            items: &[I],
            halves: [crate::tower::ItemGrads<'_, DIM>; 2],
        ) {
            let [first, second] = halves;
            let mid = half(items.len());
            let mut backward = |ys: &[I], gs: &[[f32; DIM]]| self.0.backward_items(ys, gs);
            backward_run(&mut backward, &items[..mid], 0, first);
            if !SKIP {
                backward_run(&mut backward, &items[mid..], mid, second);
            }
        }
    }

    mod full {
        use super::*;
        use crate::layered::LayerTowers;
        use crate::layers::{Act, Activation, Chain, Dense, Layer, ParamVisitor, L2};
        use crate::softmax::{self, SoftmaxOut};
        use crate::tower::{Model, Towers as TowerPair};

        type Tower = Chain<Dense<6, 20, 0>, Chain<Act<20>, Chain<Dense<20, 8, 0>, L2<8>, 8>, 20>, 20>;
        type Plain = LayerTowers<Tower, Tower, 6, 6, 0>;
        const N: usize = 75;
        const SGD: OptimizerKind = OptimizerKind::Sgd { momentum: 0.0, weight_decay: 0.0 };

        struct Values(heapless::Vec<f32, 1024>);
        impl ParamVisitor for Values {
            fn dense(&mut self, v: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]]) {
                self.0.extend_from_slice(v).unwrap();
            }
            fn sparse(&mut self, _: usize, _: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]], _: &[bool]) {}
        }

        fn tower(act: Activation) -> Tower {
            Chain(Dense::new(), Chain(Act(act), Chain(Dense::new(), L2)))
        }

        fn plain() -> Plain {
            let mut m = LayerTowers::new(tower(Activation::Tanh), tower(Activation::Tanh), 5.0);
            m.init(&mut Pcg64Mcg::seed_from_u64(9));
            m
        }

        /// An odd corpus, longer than a run of `RUN` items per half.
        fn corpus() -> [[f32; 6]; N] {
            core::array::from_fn(|j| core::array::from_fn(|i| ((j * 5 + i * 7) % 13) as f32 * 0.3 - 1.8))
        }

        /// Step `s`'s batch: queries, positives, positive indices.
        fn batch(s: usize) -> ([[f32; 6]; 4], [[f32; 6]; 4], [u32; 4]) {
            let c = corpus();
            let picks = [(3 + 11 * s) % N, (40 + 7 * s) % N, 41, N - 1 - s];
            (core::array::from_fn(|b| c[picks[b]].map(|x| 0.7 * x - 0.2)), picks.map(|j| c[j]), picks.map(|j| j as u32))
        }

        /// The parameters after `steps` full-softmax SGD steps of `model`.
        fn train<M: TowerPair<[f32; 6], [f32; 6], 8>>(model: M, steps: usize) -> heapless::Vec<f32, 1024> {
            let cfg = TrainerConfig { objective: Objective::Full, optimizer: SGD, ..TrainerConfig::DEFAULT };
            let mut t = Trainer::<M, [f32; 6], [f32; 6], 8, 4, 1>::new(model, cfg);
            t.init().unwrap();
            let c = corpus();
            let mut cache = NegativeCache::<[f32; 6], N, 8>::new();
            for s in 0..steps {
                let (q, p, index) = batch(s);
                let batch = Batch { queries: &q, positives: &p, positive_index: Some(&index) };
                t.step(&mut cache.as_mut(), &batch, &c, 1.0, &mut Pcg64Mcg::seed_from_u64(1)).unwrap();
            }
            let mut after = Values(heapless::Vec::new());
            t.model.visit(&mut after);
            after.0
        }

        /// Without a twin the full step is `softmax::full` with each
        /// item's gradient back-propagated one at a time, as it handed
        /// them out, bit for bit.
        #[test]
        fn a_full_step_without_twin_is_the_softmax_and_one_item_at_a_time() {
            let got = train(plain(), 2);
            let mut m = plain();
            let mut opt = Optimizer::new(SGD, 0.0);
            let c = corpus();
            for s in 0..2 {
                let (q, _, index) = batch(s);
                m.zero_grad();
                let mut emb = [[0.0f32; 8]; N];
                for (y, e) in c.iter().zip(emb.iter_mut()) {
                    m.item.forward(y, e);
                }
                let mut qe = [[0.0f32; 8]; 4];
                for (x, e) in q.iter().zip(qe.iter_mut()) {
                    m.query.forward(x, e);
                }
                let (mut lse, mut gq) = ([LogSumExp::EMPTY; 4], [[0.0f32; 8]; 4]);
                let item = &mut m.item;
                let mut sink = |j: usize, g: &[f32; 8]| item.backward(&c[j], g, None);
                let out =
                    SoftmaxOut { grad_query: Some(&mut gq), grad_shared: Some(&mut sink), ..SoftmaxOut::new(&mut lse) };
                softmax::full(&qe, &emb, &index.map(|i| i as usize), m.alpha, out).unwrap();
                for (x, g) in q.iter().zip(&gq) {
                    m.query.backward(x, g, None);
                }
                opt.step(1.0, &mut |v| m.visit(v)).unwrap();
            }
            let mut want = Values(heapless::Vec::new());
            m.visit(&mut want);
            assert!(got.iter().map(|x| x.to_bits()).eq(want.0.iter().map(|x| x.to_bits())));
        }

        /// A model that claims halves but back-propagates only the first
        /// is refused, not trained on half a corpus.
        #[test]
        fn a_model_that_skips_a_half_is_refused() {
            let cfg = TrainerConfig { objective: Objective::Full, optimizer: SGD, ..TrainerConfig::DEFAULT };
            let mut t = Trainer::<Single<Plain, true>, [f32; 6], [f32; 6], 8, 4, 1>::new(Single(plain()), cfg);
            t.init().unwrap();
            let mut cache = NegativeCache::<[f32; 6], N, 8>::new();
            let (q, p, index) = batch(0);
            let batch = Batch { queries: &q, positives: &p, positive_index: Some(&index) };
            let r = t.step(&mut cache.as_mut(), &batch, &corpus(), 1.0, &mut Pcg64Mcg::seed_from_u64(1));
            assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{r:?}");
        }

        /// Full-softmax SGD steps of a model whose twin gathers the
        /// corpus's second half apart move its parameters as the one-buffer
        /// steps do, up to rounding: every item and each half's share of
        /// the query gradient counted once, and the twin's own values
        /// (another activation, other weights) play no part.
        #[test]
        fn twin_full_steps_move_the_parameters_as_one_buffer_does() {
            let start = {
                let mut v = Values(heapless::Vec::new());
                plain().visit(&mut v);
                v.0
            };
            let mut twin = tower(Activation::Relu);
            twin.init(&mut Pcg64Mcg::seed_from_u64(77));
            let one = train(plain(), 3);
            let two = train(plain().with_twin(twin), 3);
            let moved =
                |after: &[f32]| -> heapless::Vec<f32, 1024> { after.iter().zip(&start).map(|(a, s)| a - s).collect() };
            let (d_one, d_twin) = (moved(&one), moved(&two));
            let largest = d_one.iter().fold(0.0f32, |m, d| m.max(d.abs()));
            assert!(largest > 1e-3, "the steps moved nothing");
            let mut differ = false;
            for (k, (a, b)) in d_one.iter().zip(&d_twin).enumerate() {
                assert!((a - b).abs() <= 1e-5 * largest, "parameter {k}: {a} against {b}");
                differ |= a != b;
            }
            assert!(differ, "the same bits: the twin did not gather anything apart");
        }
    }

    #[test]
    fn control_variate_setting_is_checked_and_used() {
        let (mut t, mut cache) = trainer(Objective::Cache, CacheMode::Streaming, &[A, B, D]);
        assert_eq!(t.control_variate(), None);
        assert!(t.set_control_variate(Some(1.5)).is_err());
        assert!(t.set_control_variate(Some(f32::NAN)).is_err());
        assert_eq!(t.control_variate(), None);
        // With beta = 0 the query gradient is the memory bank's; the step
        // differs from the plain one (same seed) only through it.
        let batch = Batch { queries: &[[11, 12], [13, 14]], positives: &[A, C], positive_index: None };
        let (mut plain, mut plain_cache) = trainer(Objective::Cache, CacheMode::Streaming, &[A, B, D]);
        let r0 = plain.step(&mut plain_cache.as_mut(), &batch, &[], 0.1, &mut Pcg64Mcg::seed_from_u64(2)).unwrap();
        t.set_control_variate(Some(0.0)).unwrap();
        let r1 = t.step(&mut cache.as_mut(), &batch, &[], 0.1, &mut Pcg64Mcg::seed_from_u64(2)).unwrap();
        assert_eq!(r0.training_loss.to_bits(), r1.training_loss.to_bits());
        assert!(r0.grad_norm.is_finite() && r1.grad_norm.is_finite());
        assert_ne!(r0.grad_norm.to_bits(), r1.grad_norm.to_bits());
    }
}
