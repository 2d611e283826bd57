//! Two towers over hashed tokens: bag of token embeddings, then an MLP,
//! then L2 normalisation; the score is `alpha * <Q(x), T(y)>` with alpha
//! fixed or learned.
//!
//! How the towers share parameters is part of the type: `TABLES` token
//! tables and `MLPS` perceptrons, the query side using the first of each
//! and the item side the last. So
//!
//! | type alias | TABLES | MLPS | meaning |
//! |---|---|---|---|
//! | [`SeparateTowers`] | 2 | 2 | nothing shared |
//! | [`SharedTokenTowers`] | 1 | 2 | one token table, two MLPs |
//! | [`SiameseTowers`] | 1 | 1 | one tower for both sides |
//!
//! and no memory is spent on a table or MLP that a tying leaves unused.
//! Sharing the token table lets a new model match words that a query and
//! an item have in common from the first step.

use core::ops::Range;

use rand_core::RngCore;

use crate::layers::layer::CHUNK;
use crate::layers::{normalize, Activation, EmbeddingBag, Mlp, ParamVisitor, Pooling};
use crate::math;
use crate::parallel::{split_parts, Fork};

/// Which side of the model an input goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The query tower.
    Query,
    /// The item tower.
    Item,
}

/// What a trainer needs of a model's parameters, whatever its inputs:
/// initialisation, the score scale, gradients and the optimiser's view.
pub trait Model<const DIM: usize> {
    /// Draws random parameters in place (see each layer for its
    /// distribution).
    fn init(&mut self, rng: &mut impl RngCore);
    /// The current score scale alpha.
    fn score_scale(&self) -> f32;
    /// Accumulates `d L / d alpha` (ignored when alpha is fixed).
    fn backward_scale(&mut self, d_alpha: f32);
    /// Clears every gradient.
    fn zero_grad(&mut self);
    /// Shows every parameter to an optimiser.
    fn visit(&mut self, v: &mut dyn ParamVisitor);
    /// Optimiser-state slots kept per parameter.
    fn state_slots(&self) -> usize;

    /// True when no parameter is in both towers. Back-propagating every
    /// query and then every item then gives the bits of interleaving them,
    /// so the trainer sends each side through its tower in batches. With
    /// shared parameters (a shared token table, one tower for both sides)
    /// it keeps its documented interleaved order.
    const SEPARATE_TOWERS: bool = false;
}

/// One input of a step's back-propagation and the gradient of its
/// embedding (see [`Towers::backward_sequence`]).
#[derive(Debug)]
pub enum Upstream<'a, Q, I, const DIM: usize> {
    /// A query.
    Query(&'a Q, &'a [f32; DIM]),
    /// An item.
    Item(&'a I, &'a [f32; DIM]),
}

impl<Q, I, const DIM: usize> Clone for Upstream<'_, Q, I, DIM> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Q, I, const DIM: usize> Copy for Upstream<'_, Q, I, DIM> {}

/// Two towers over queries `Q` and items `I`, any types: token lists,
/// dense `[f32; F]` features, precomputed embeddings, ids into a feature
/// table. The trainer embeds and back-propagates through these methods
/// only.
///
/// The batched methods embed or back-propagate many inputs with one call;
/// their defaults loop over the single-input methods, and a model whose
/// layers can do better (each weight read once for the batch) overrides
/// them. They must give the same results as the single-input methods in
/// order, bit for bit.
pub trait Towers<Q, I, const DIM: usize>: Model<DIM> {
    /// Embeds a query.
    fn embed_query(&self, x: &Q, out: &mut [f32; DIM]);
    /// Embeds an item.
    fn embed_item(&self, y: &I, out: &mut [f32; DIM]);
    /// Accumulates the parameter gradients for an upstream gradient `grad`
    /// of the query embedding of `x` (recomputing the forward pass).
    fn backward_query(&mut self, x: &Q, grad: &[f32; DIM]);
    /// Accumulates the parameter gradients for an upstream gradient `grad`
    /// of the item embedding of `y` (recomputing the forward pass).
    fn backward_item(&mut self, y: &I, grad: &[f32; DIM]);

    /// Embeds `xs[k]` into `out[k]` for every `k` below the shorter length.
    fn embed_queries(&self, xs: &[Q], out: &mut [[f32; DIM]]) {
        for (x, o) in xs.iter().zip(out) {
            self.embed_query(x, o);
        }
    }
    /// Embeds `ys[k]` into `out[k]` for every `k` below the shorter length.
    fn embed_items(&self, ys: &[I], out: &mut [[f32; DIM]]) {
        for (y, o) in ys.iter().zip(out) {
            self.embed_item(y, o);
        }
    }
    /// [`Self::embed_items`], possibly split over `fork`'s threads: the
    /// same bits, since each item's embedding is its own. The default runs
    /// on the calling thread; a model that can be shared between threads
    /// (`Sync`), or whose item tower can, may override it with
    /// [`embed_items_split`]. The full softmax embeds its whole corpus
    /// through it every step.
    fn embed_items_on<F: Fork>(&self, fork: &F, ys: &[I], out: &mut [[f32; DIM]]) {
        let _ = fork;
        self.embed_items(ys, out)
    }
    /// [`Self::backward_query`] for each `(xs[k], grads[k])`, in order.
    fn backward_queries(&mut self, xs: &[Q], grads: &[[f32; DIM]]) {
        for (x, g) in xs.iter().zip(grads) {
            self.backward_query(x, g);
        }
    }
    /// [`Self::backward_item`] for each `(ys[k], grads[k])`, in order.
    fn backward_items(&mut self, ys: &[I], grads: &[[f32; DIM]]) {
        for (y, g) in ys.iter().zip(grads) {
            self.backward_item(y, g);
        }
    }
    /// Whether [`Self::backward_items_halves`] gathers its two halves'
    /// gradients apart and adds them at the end (so that it can run them
    /// on two threads). The trainer's full softmax asks it: when true it
    /// back-propagates its corpus through that method, each half's share
    /// of the query gradient summed apart too; when false (the default)
    /// in runs of [`RUN`] items, in corpus order, through
    /// [`Self::backward_items`]. Either way
    /// the bits do not depend on the thread count; they differ between the
    /// two answers.
    fn item_halves(&self) -> bool {
        false
    }
    /// Back-propagates `items` in two fixed halves, `items[..half(n)]`
    /// with `halves[0]` and the rest with `halves[1]`: each is called with
    /// runs of its half in order (indices into `items`) and writes their
    /// upstream gradients into its second argument, one row per item.
    /// Each closure must be called over its whole half, run after run in
    /// order ([`backward_run`] does), or the trainer refuses the step.
    /// The default runs the first half and then the second through
    /// [`Self::backward_items`]; a model that keeps a second gradient
    /// buffer gathers the second half there, on another of `fork`'s
    /// threads when that is worth a hand-over
    /// ([`crate::parallel::split_parts`]), and adds it at the end (see
    /// [`Self::item_halves`]).
    fn backward_items_halves<F: Fork>(&mut self, fork: &F, items: &[I], halves: [ItemGrads<'_, DIM>; 2]) {
        let _ = fork;
        backward_halves_in_turn(&mut |ys: &[I], gs: &[[f32; DIM]]| self.backward_items(ys, gs), items, halves)
    }
    /// Every entry of `seq` in order, as [`Self::backward_query`] and
    /// [`Self::backward_item`] called one after another. The trainer sends
    /// a step's inputs through it, in its interleaved order, when the
    /// towers share parameters ([`Model::SEPARATE_TOWERS`] false); a model
    /// whose layers can batch overrides it, with the same bits.
    fn backward_sequence(&mut self, seq: &[Upstream<'_, Q, I, DIM>]) {
        for u in seq {
            match *u {
                Upstream::Query(x, g) => self.backward_query(x, g),
                Upstream::Item(y, g) => self.backward_item(y, g),
            }
        }
    }
}

/// One half's upstream gradients in [`Towers::backward_items_halves`]:
/// called with a range of item indices and a buffer of at least that many
/// rows, it writes each item's gradient into its row. `Send`, so that the
/// half can run on another thread.
pub type ItemGrads<'a, const DIM: usize> = &'a mut (dyn FnMut(Range<usize>, &mut [[f32; DIM]]) + Send);

/// Where [`Towers::backward_items_halves`] cuts `n` items: the first half
/// is the shorter one.
pub const fn half(n: usize) -> usize {
    n / 2
}

/// Items back-propagated together by [`backward_run`].
pub const RUN: usize = 32;

/// Back-propagates `items` (whose first is item `offset` of the whole) in
/// runs of [`RUN`], in order: `grads` writes each run's upstream
/// gradients, then `backward` takes the run.
pub fn backward_run<I, const DIM: usize>(
    backward: &mut impl FnMut(&[I], &[[f32; DIM]]),
    items: &[I],
    offset: usize,
    grads: ItemGrads<'_, DIM>,
) {
    let mut buf = [[0.0f32; DIM]; RUN];
    for (k, run) in items.chunks(RUN).enumerate() {
        let start = offset + k * RUN;
        grads(start..start + run.len(), &mut buf[..run.len()]);
        backward(run, &buf[..run.len()]);
    }
}

/// [`Towers::backward_items_halves`] into one gradient buffer: the first
/// half through [`backward_run`], then the second, both into `backward`.
pub fn backward_halves_in_turn<I, const DIM: usize>(
    backward: &mut impl FnMut(&[I], &[[f32; DIM]]),
    items: &[I],
    halves: [ItemGrads<'_, DIM>; 2],
) {
    let mid = half(items.len());
    let [first, second] = halves;
    backward_run(backward, &items[..mid], 0, first);
    backward_run(backward, &items[mid..], mid, second);
}

/// `embed(ys, out)` split over `fork` at item boundaries, for an override
/// of [`Towers::embed_items_on`] (`embed` is the model's own
/// [`Towers::embed_items`], or its item tower's batched forward): the same
/// bits on any number of threads, since each item's embedding is its own.
/// `item_work` is about one item's multiply-adds; the items are split into
/// `fork.width()` pieces (at most one per item) when each would carry at
/// least [`Fork::min_piece_work`] of them, else embedded on the calling
/// thread.
pub fn embed_items_split<I, F, const DIM: usize>(
    fork: &F,
    ys: &[I],
    out: &mut [[f32; DIM]],
    item_work: usize,
    embed: &(impl Fn(&[I], &mut [[f32; DIM]]) + Sync),
) where
    I: Sync,
    F: Fork,
{
    let n = ys.len().min(out.len());
    split_embed(fork, &ys[..n], &mut out[..n], split_parts(fork, n, item_work), embed);
}

fn split_embed<I: Sync, F: Fork, const DIM: usize>(
    fork: &F,
    ys: &[I],
    out: &mut [[f32; DIM]],
    parts: usize,
    embed: &(impl Fn(&[I], &mut [[f32; DIM]]) + Sync),
) {
    if parts <= 1 {
        return embed(ys, out);
    }
    let left = parts / 2;
    // `len * left / parts` without its product overflowing.
    let mid = ys.len() / parts * left + ys.len() % parts * left / parts;
    let (ya, yb) = ys.split_at(mid);
    let (oa, ob) = out.split_at_mut(mid);
    fork.join(|| split_embed(fork, ya, oa, left, embed), || split_embed(fork, yb, ob, parts - left, embed));
}

/// A model over hashed token lists, with one method per operation and a
/// [`Side`]: the form the host's tools (evaluation, export) use. Every
/// `TokenModel` embeds any `AsRef<[u32]>` queries and items through
/// [`Towers`] (see [`TwoTower`]).
pub trait TokenModel<const DIM: usize>: Model<DIM> {
    /// Embeds `tokens` with one side's tower.
    fn embed(&self, side: Side, tokens: &[u32], out: &mut [f32; DIM]);
    /// Accumulates the parameter gradients for an upstream gradient `grad`
    /// of the embedding of `tokens` (recomputing the forward pass).
    fn backward(&mut self, side: Side, tokens: &[u32], grad: &[f32; DIM]);
}

/// The score scale alpha.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    /// A constant alpha.
    Fixed(f32),
    /// alpha = exp(theta) is learned, starting at `init` and kept within
    /// `[min, max]`: theta is projected onto `[ln min, ln max]` after every
    /// optimiser update (and at `init`), and at a bound its gradient is
    /// kept only when a descent step would move it back inside.
    Learned {
        /// Starting value.
        init: f32,
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
}

/// Tower settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TowerConfig {
    /// How the token rows are pooled.
    pub pooling: Pooling,
    /// The MLP's hidden activation.
    pub activation: Activation,
    /// The score scale.
    pub scale: Scale,
}

impl TowerConfig {
    /// Mean pooling, ReLU, alpha fixed at 20 (with unit vectors, scores in
    /// [-20, 20]: a softmax that can be sharp without overflow).
    pub const DEFAULT: Self = Self { pooling: Pooling::Mean, activation: Activation::Relu, scale: Scale::Fixed(20.0) };
}

impl Default for TowerConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Two towers, each `EmbeddingBag<BUCKETS, E>` then `Mlp<E, H, DIM>` then
/// L2 normalisation.
///
/// # Generics
/// - `TABLES`, `MLPS`: 1 or 2 each; see the module docs on tying.
/// - `BUCKETS`: rows per token table; `E`: token embedding width.
/// - `H`: hidden width; `DIM`: output embedding dimension.
/// - `S`: optimiser-state slots per parameter (0 SGD, 1 momentum or
///   Adagrad, 2 Adam).
///
/// # Memory
/// `TABLES` tables of `(2 + S) * BUCKETS * E * 4` bytes plus `MLPS` MLPs of
/// `(2 + S) * 4 * (E * H + H + H * DIM + DIM)` bytes. A doctest shows a
/// model in a `static`:
///
/// ```
/// use negcache::tower::{SharedTokenTowers, TowerConfig};
/// static MODEL: SharedTokenTowers<4096, 32, 64, 32, 2> = SharedTokenTowers::new(TowerConfig::DEFAULT);
/// assert_eq!(MODEL.config(), &TowerConfig::DEFAULT);
/// ```
#[derive(Debug, Clone)]
pub struct TwoTower<
    const TABLES: usize,
    const MLPS: usize,
    const BUCKETS: usize,
    const E: usize,
    const H: usize,
    const DIM: usize,
    const S: usize,
> {
    bags: [EmbeddingBag<BUCKETS, E, S>; TABLES],
    mlps: [Mlp<E, H, DIM, S>; MLPS],
    log_scale: [f32; 1],
    log_scale_grad: [f32; 1],
    log_scale_state: [[f32; 1]; S],
    cfg: TowerConfig,
}

/// Separate query and item towers.
pub type SeparateTowers<const B: usize, const E: usize, const H: usize, const D: usize, const S: usize> =
    TwoTower<2, 2, B, E, H, D, S>;
/// Towers sharing their token table.
pub type SharedTokenTowers<const B: usize, const E: usize, const H: usize, const D: usize, const S: usize> =
    TwoTower<1, 2, B, E, H, D, S>;
/// One tower for both sides.
pub type SiameseTowers<const B: usize, const E: usize, const H: usize, const D: usize, const S: usize> =
    TwoTower<1, 1, B, E, H, D, S>;

impl<
        const TABLES: usize,
        const MLPS: usize,
        const BUCKETS: usize,
        const E: usize,
        const H: usize,
        const DIM: usize,
        const S: usize,
    > TwoTower<TABLES, MLPS, BUCKETS, E, H, DIM, S>
{
    /// All-zero parameters; call [`Self::init`] before training.
    pub const fn new(cfg: TowerConfig) -> Self {
        const { assert!(TABLES == 1 || TABLES == 2, "TABLES must be 1 or 2") };
        const { assert!(MLPS == 1 || MLPS == 2, "MLPS must be 1 or 2") };
        Self {
            bags: [const { EmbeddingBag::new() }; TABLES],
            mlps: [const { Mlp::new() }; MLPS],
            log_scale: [0.0],
            log_scale_grad: [0.0],
            log_scale_state: [[0.0]; S],
            cfg,
        }
    }

    /// Random parameters (see each layer's `init` for its distribution) and
    /// the scale at its starting value.
    pub fn init(&mut self, rng: &mut impl RngCore) {
        self.bags.iter_mut().for_each(|b| b.init(rng));
        self.mlps.iter_mut().for_each(|m| m.init(rng));
        self.log_scale = [match self.cfg.scale {
            Scale::Fixed(a) => math::ln(a),
            Scale::Learned { init, .. } => math::ln(init),
        }];
        self.project_scale();
        self.log_scale_grad = [0.0];
        self.log_scale_state = [[0.0]; S];
    }

    /// The settings.
    pub fn config(&self) -> &TowerConfig {
        &self.cfg
    }

    /// The token tables.
    pub fn tables_mut(&mut self) -> &mut [EmbeddingBag<BUCKETS, E, S>; TABLES] {
        &mut self.bags
    }

    /// The MLPs.
    pub fn mlps_mut(&mut self) -> &mut [Mlp<E, H, DIM, S>; MLPS] {
        &mut self.mlps
    }

    /// ln alpha, for checkpoints.
    pub fn log_scale_mut(&mut self) -> &mut f32 {
        &mut self.log_scale[0]
    }

    fn parts(side: Side) -> (usize, usize) {
        match side {
            Side::Query => (0, 0),
            Side::Item => (TABLES - 1, MLPS - 1),
        }
    }

    fn raw(&self, side: Side, tokens: &[u32], pooled: &mut [f32; E], out: &mut [f32; DIM]) {
        let (t, m) = Self::parts(side);
        self.bags[t].forward(tokens, self.cfg.pooling, pooled);
        self.mlps[m].forward(self.cfg.activation, pooled, out);
    }

    fn scale_bounds(&self) -> (f32, f32) {
        match self.cfg.scale {
            Scale::Fixed(a) => (a, a),
            Scale::Learned { min, max, .. } => (min, max),
        }
    }

    /// Projects a learned theta onto `[ln min, ln max]` (NaN stays NaN).
    fn project_scale(&mut self) {
        if let Scale::Learned { min, max, .. } = self.cfg.scale {
            let (lo, hi) = (math::ln(min), math::ln(max));
            let t = self.log_scale[0];
            self.log_scale[0] = if t < lo {
                lo
            } else if t > hi {
                hi
            } else {
                t
            };
        }
    }

    /// [`TokenModel::embed`] for each input, bit for bit: each input pooled
    /// alone, then the side's MLP over [`CHUNK`] inputs at a time
    /// ([`Mlp::forward_batch`]), then each normalised.
    fn embed_side<X: AsRef<[u32]>>(&self, side: Side, xs: &[X], out: &mut [[f32; DIM]]) {
        if !BATCH_TOKENS {
            xs.iter().zip(out).for_each(|(x, o)| TokenModel::embed(self, side, x.as_ref(), o));
            return;
        }
        let (t, m) = Self::parts(side);
        let (mut pooled, mut raw) = ([[0.0; E]; CHUNK], [[0.0; DIM]; CHUNK]);
        for (xs, out) in xs.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
            let n = xs.len().min(out.len());
            for (x, p) in xs.iter().zip(pooled.iter_mut()) {
                self.bags[t].forward(x.as_ref(), self.cfg.pooling, p);
            }
            self.mlps[m].forward_batch(self.cfg.activation, &pooled[..n], &mut raw[..n]);
            for (r, o) in raw[..n].iter().zip(out.iter_mut()) {
                normalize::forward(r, o);
            }
        }
    }

    /// One side's inputs with their gradients, in order, each made an entry
    /// by `entry_of` ([`Upstream::Query`] or [`Upstream::Item`]).
    fn backward_each<'a, X, Q: AsRef<[u32]> + 'a, I: AsRef<[u32]> + 'a>(
        &mut self,
        inputs: &'a [X],
        grads: &'a [[f32; DIM]],
        entry_of: impl Fn(&'a X, &'a [f32; DIM]) -> Upstream<'a, Q, I, DIM>,
    ) {
        for (xs, gs) in inputs.chunks(CHUNK).zip(grads.chunks(CHUNK)) {
            let seq: [Option<Upstream<'a, Q, I, DIM>>; CHUNK] =
                core::array::from_fn(|k| xs.get(k).zip(gs.get(k)).map(|(x, g)| entry_of(x, g)));
            self.backward_chunk(&seq);
        }
    }

    /// [`TokenModel::backward`] for each present entry of `seq`, in order,
    /// bit for bit. Each entry is pooled alone; each MLP takes the entries
    /// of its side as one batch ([`Mlp::backward_batch`], in their order;
    /// the MLPs share no parameter with each other or with the tables);
    /// then each entry's pooled gradient goes to its table, in order.
    fn backward_chunk<Q: AsRef<[u32]>, I: AsRef<[u32]>>(&mut self, seq: &[Option<Upstream<'_, Q, I, DIM>>; CHUNK]) {
        if !BATCH_TOKENS {
            for u in seq.iter().flatten() {
                let (side, tokens, g) = entry(u);
                TokenModel::backward(self, side, tokens, g);
            }
            return;
        }
        let mut pooled = [[0.0; E]; CHUNK];
        for (u, p) in seq.iter().zip(pooled.iter_mut()) {
            if let Some(u) = u {
                let (side, tokens, _) = entry(u);
                self.bags[Self::parts(side).0].forward(tokens, self.cfg.pooling, p);
            }
        }
        let mut dpooled = [[0.0; E]; CHUNK];
        for m in 0..MLPS {
            // This MLP's entries, in order.
            let (mut at, mut len) = ([0usize; CHUNK], 0);
            for (k, u) in seq.iter().enumerate() {
                if u.as_ref().is_some_and(|u| Self::parts(entry(u).0).1 == m) {
                    at[len] = k;
                    len += 1;
                }
            }
            if len == 0 {
                continue;
            }
            let (mut xs, mut raw, mut draw) = ([[0.0; E]; CHUNK], [[0.0; DIM]; CHUNK], [[0.0; DIM]; CHUNK]);
            for (x, &k) in xs.iter_mut().zip(&at[..len]) {
                *x = pooled[k];
            }
            self.mlps[m].forward_batch(self.cfg.activation, &xs[..len], &mut raw[..len]);
            for ((r, d), &k) in raw[..len].iter().zip(draw.iter_mut()).zip(&at[..len]) {
                let Some(u) = &seq[k] else { continue };
                let mut y = [0.0; DIM];
                let norm = normalize::forward(r, &mut y);
                normalize::backward(&y, norm, entry(u).2, d);
            }
            let mut dxs = [[0.0; E]; CHUNK];
            self.mlps[m].backward_batch(self.cfg.activation, &xs[..len], &draw[..len], Some(&mut dxs[..len]));
            for (dx, &k) in dxs[..len].iter().zip(&at[..len]) {
                dpooled[k] = *dx;
            }
        }
        for (u, dp) in seq.iter().zip(&dpooled) {
            if let Some(u) = u {
                let (side, tokens, _) = entry(u);
                self.bags[Self::parts(side).0].backward(tokens, self.cfg.pooling, dp);
            }
        }
    }
}

impl<
        const TABLES: usize,
        const MLPS: usize,
        const BUCKETS: usize,
        const E: usize,
        const H: usize,
        const DIM: usize,
        const S: usize,
    > TokenModel<DIM> for TwoTower<TABLES, MLPS, BUCKETS, E, H, DIM, S>
{
    fn embed(&self, side: Side, tokens: &[u32], out: &mut [f32; DIM]) {
        let (mut pooled, mut raw) = ([0.0; E], [0.0; DIM]);
        self.raw(side, tokens, &mut pooled, &mut raw);
        normalize::forward(&raw, out);
    }

    fn backward(&mut self, side: Side, tokens: &[u32], grad: &[f32; DIM]) {
        let (mut pooled, mut raw, mut y) = ([0.0; E], [0.0; DIM], [0.0; DIM]);
        self.raw(side, tokens, &mut pooled, &mut raw);
        let norm = normalize::forward(&raw, &mut y);
        let mut draw = [0.0; DIM];
        normalize::backward(&y, norm, grad, &mut draw);
        let (t, m) = Self::parts(side);
        let mut dpooled = [0.0; E];
        self.mlps[m].backward(self.cfg.activation, &pooled, &draw, Some(&mut dpooled));
        self.bags[t].backward(tokens, self.cfg.pooling, &dpooled);
    }
}

impl<
        Q: AsRef<[u32]>,
        I: AsRef<[u32]> + Sync,
        const TABLES: usize,
        const MLPS: usize,
        const BUCKETS: usize,
        const E: usize,
        const H: usize,
        const DIM: usize,
        const S: usize,
    > Towers<Q, I, DIM> for TwoTower<TABLES, MLPS, BUCKETS, E, H, DIM, S>
{
    fn embed_query(&self, x: &Q, out: &mut [f32; DIM]) {
        TokenModel::embed(self, Side::Query, x.as_ref(), out)
    }
    fn embed_item(&self, y: &I, out: &mut [f32; DIM]) {
        TokenModel::embed(self, Side::Item, y.as_ref(), out)
    }
    fn backward_query(&mut self, x: &Q, grad: &[f32; DIM]) {
        TokenModel::backward(self, Side::Query, x.as_ref(), grad)
    }
    fn backward_item(&mut self, y: &I, grad: &[f32; DIM]) {
        TokenModel::backward(self, Side::Item, y.as_ref(), grad)
    }
    fn embed_queries(&self, xs: &[Q], out: &mut [[f32; DIM]]) {
        self.embed_side(Side::Query, xs, out)
    }
    fn embed_items(&self, ys: &[I], out: &mut [[f32; DIM]]) {
        self.embed_side(Side::Item, ys, out)
    }
    fn embed_items_on<F: Fork>(&self, fork: &F, ys: &[I], out: &mut [[f32; DIM]]) {
        let tokens = ys.first().map_or(0, |y| y.as_ref().len());
        let embed = |ys: &[I], out: &mut [[f32; DIM]]| self.embed_side(Side::Item, ys, out);
        let work = tokens.saturating_mul(E).saturating_add(E * H + H * DIM);
        embed_items_split(fork, ys, out, work, &embed)
    }
    fn backward_queries(&mut self, xs: &[Q], grads: &[[f32; DIM]]) {
        self.backward_each(xs, grads, Upstream::<Q, I, DIM>::Query)
    }
    fn backward_items(&mut self, ys: &[I], grads: &[[f32; DIM]]) {
        self.backward_each(ys, grads, Upstream::<Q, I, DIM>::Item)
    }
    fn backward_sequence(&mut self, seq: &[Upstream<'_, Q, I, DIM>]) {
        for chunk in seq.chunks(CHUNK) {
            let seq: [Option<Upstream<'_, Q, I, DIM>>; CHUNK] = core::array::from_fn(|k| chunk.get(k).copied());
            self.backward_chunk(&seq);
        }
    }
}

/// Whether [`TwoTower`] sends its batched methods' inputs through its
/// MLPs [`CHUNK`] at a time (the same bits as one at a time either way).
/// On targets with wide vectors it does; a microcontroller has none to
/// fill, and the chunks' buffers would nearly triple its stack (the
/// Cortex-M4 example's peak: 26,140 bytes batched, 9,076 not), so there
/// it goes one input at a time.
const BATCH_TOKENS: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// A token entry's side, tokens and upstream gradient.
fn entry<'a, Q: AsRef<[u32]>, I: AsRef<[u32]>, const DIM: usize>(
    u: &Upstream<'a, Q, I, DIM>,
) -> (Side, &'a [u32], &'a [f32; DIM]) {
    match *u {
        Upstream::Query(x, g) => (Side::Query, x.as_ref(), g),
        Upstream::Item(y, g) => (Side::Item, y.as_ref(), g),
    }
}

impl<
        const TABLES: usize,
        const MLPS: usize,
        const BUCKETS: usize,
        const E: usize,
        const H: usize,
        const DIM: usize,
        const S: usize,
    > Model<DIM> for TwoTower<TABLES, MLPS, BUCKETS, E, H, DIM, S>
{
    fn init(&mut self, rng: &mut impl RngCore) {
        TwoTower::init(self, rng)
    }

    fn score_scale(&self) -> f32 {
        let (lo, hi) = self.scale_bounds();
        math::exp(self.log_scale[0]).clamp(lo, hi)
    }

    fn backward_scale(&mut self, d_alpha: f32) {
        if let Scale::Learned { min, max, .. } = self.cfg.scale {
            let a = math::exp(self.log_scale[0]);
            if a > min && a < max {
                // d L / d theta = alpha * d L / d alpha for alpha = e^theta.
                self.log_scale_grad[0] += a * d_alpha;
            } else if (a >= max && d_alpha > 0.0) || (a <= min && d_alpha < 0.0) {
                // At a bound, alpha is clamped; a descent step along this
                // gradient moves theta back inside, so let it through (with
                // the alpha actually used).
                self.log_scale_grad[0] += self.score_scale() * d_alpha;
            }
        }
    }

    fn zero_grad(&mut self) {
        self.bags.iter_mut().for_each(|b| b.zero_grad());
        self.mlps.iter_mut().for_each(|m| m.zero_grad());
        self.log_scale_grad = [0.0];
    }

    fn visit(&mut self, v: &mut dyn ParamVisitor) {
        self.bags.iter_mut().for_each(|b| b.visit(v));
        self.mlps.iter_mut().for_each(|m| m.visit(v));
        if let Scale::Learned { .. } = self.cfg.scale {
            let mut st = self.log_scale_state.each_mut().map(|s| &mut s[..]);
            v.dense(&mut self.log_scale, &mut self.log_scale_grad, &mut st);
            // After an optimiser's update (a no-op for visitors that only
            // read): theta never leaves the bounds, so it cannot stick
            // outside them with its gradient dropped.
            self.project_scale();
        }
    }

    fn state_slots(&self) -> usize {
        S
    }

    const SEPARATE_TOWERS: bool = TABLES == 2 && MLPS == 2;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::PAD;
    use crate::vector::dot;
    use approx::assert_relative_eq;
    use rand_core::SeedableRng;

    type Small = SeparateTowers<13, 4, 5, 3, 0>;

    /// A scalar function of both towers: <c, Q(x)> + <d, T(y)>.
    fn objective(m: &impl TokenModel<3>, x: &[u32], y: &[u32], c: &[f32; 3], d: &[f32; 3]) -> f64 {
        let (mut q, mut t) = ([0.0; 3], [0.0; 3]);
        m.embed(Side::Query, x, &mut q);
        m.embed(Side::Item, y, &mut t);
        (dot(c, &q) + dot(d, &t)) as f64
    }

    fn check_tower<const T: usize, const M: usize>(mut m: TwoTower<T, M, 13, 4, 5, 3, 0>) {
        m.init(&mut rand_pcg::Pcg32::seed_from_u64(8));
        let (x, y) = ([1u32, 5, 9], [5u32, 2]);
        let (c, d) = ([0.3f32, -0.8, 0.5], [-0.2f32, 0.4, 0.9]);
        m.backward(Side::Query, &x, &c);
        m.backward(Side::Item, &y, &d);
        // Finite differences over every table entry, through the visitor.
        struct Collect(heapless::Vec<(f32, f32), 512>);
        impl ParamVisitor for Collect {
            fn dense(&mut self, v: &mut [f32], g: &mut [f32], _: &mut [&mut [f32]]) {
                v.iter().zip(g.iter()).for_each(|(&v, &g)| {
                    let _ = self.0.push((v, g));
                });
            }
            fn sparse(&mut self, _: usize, v: &mut [f32], g: &mut [f32], _: &mut [&mut [f32]], _: &[bool]) {
                v.iter().zip(g.iter()).for_each(|(&v, &g)| {
                    let _ = self.0.push((v, g));
                });
            }
        }
        let mut all = Collect(heapless::Vec::new());
        m.visit(&mut all);
        let n = all.0.len();
        let h = 1e-2f32;
        for k in 0..n {
            let bump = |m: &mut TwoTower<T, M, 13, 4, 5, 3, 0>, delta: f32| {
                struct Bump(usize, f32);
                impl ParamVisitor for Bump {
                    fn dense(&mut self, v: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]]) {
                        if self.0 < v.len() {
                            v[self.0] += self.1;
                        }
                        self.0 = self.0.wrapping_sub(v.len());
                    }
                    fn sparse(&mut self, _: usize, v: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]], _: &[bool]) {
                        if self.0 < v.len() {
                            v[self.0] += self.1;
                        }
                        self.0 = self.0.wrapping_sub(v.len());
                    }
                }
                m.visit(&mut Bump(k, delta));
            };
            let (mut a, mut b) = (m.clone(), m.clone());
            bump(&mut a, h);
            bump(&mut b, -h);
            let fd = (objective(&a, &x, &y, &c, &d) - objective(&b, &x, &y, &c, &d)) / (2.0 * h as f64);
            assert_relative_eq!(all.0[k].1 as f64, fd, epsilon = 2e-3, max_relative = 2e-2);
        }
    }

    #[test]
    fn every_tying_has_correct_gradients() {
        check_tower(Small::new(TowerConfig::DEFAULT));
        check_tower(SharedTokenTowers::<13, 4, 5, 3, 0>::new(TowerConfig::DEFAULT));
        check_tower(SiameseTowers::<13, 4, 5, 3, 0>::new(TowerConfig {
            activation: Activation::Tanh,
            pooling: Pooling::Sum,
            ..TowerConfig::DEFAULT
        }));
    }

    /// The batched methods against one input at a time, for one tying:
    /// embeddings, and every gradient word after a sequence of 37 entries
    /// (more than two chunks) mixing queries and items, padding and empty
    /// inputs.
    fn batches_match_one_at_a_time<const T: usize, const M: usize>(cfg: TowerConfig) {
        struct Words(heapless::Vec<u32, 4096>);
        impl ParamVisitor for Words {
            fn dense(&mut self, _: &mut [f32], g: &mut [f32], _: &mut [&mut [f32]]) {
                self.0.extend(g.iter().map(|x| x.to_bits()));
            }
            fn sparse(&mut self, _: usize, _: &mut [f32], g: &mut [f32], _: &mut [&mut [f32]], t: &[bool]) {
                self.0.extend(g.iter().map(|x| x.to_bits()));
                self.0.extend(t.iter().map(|&t| t as u32));
            }
        }
        type Tw<const T: usize, const M: usize> = TwoTower<T, M, 13, 4, 70, 5, 0>;
        let mut one = Tw::<T, M>::new(cfg);
        one.init(&mut rand_pcg::Pcg32::seed_from_u64(6));
        let mut batched = one.clone();
        let tokens: [[u32; 3]; 37] = core::array::from_fn(|k| match k % 9 {
            4 => [PAD; 3],
            7 => [k as u32, PAD, 3],
            _ => [k as u32, (k * 5) as u32, (k * 11 + 1) as u32],
        });
        let grads: [[f32; 5]; 37] = core::array::from_fn(|k| core::array::from_fn(|i| ((k * 5 + i) % 7) as f32 - 3.0));
        let is_query = |k: usize| k % 3 != 1;
        let seq: [Upstream<'_, [u32; 3], [u32; 3], 5>; 37] = core::array::from_fn(|k| {
            if is_query(k) {
                Upstream::Query(&tokens[k], &grads[k])
            } else {
                Upstream::Item(&tokens[k], &grads[k])
            }
        });
        Towers::<[u32; 3], [u32; 3], 5>::backward_sequence(&mut batched, &seq);
        for k in 0..37 {
            let side = if is_query(k) { Side::Query } else { Side::Item };
            TokenModel::backward(&mut one, side, &tokens[k], &grads[k]);
        }
        let words = |m: &mut Tw<T, M>| {
            let mut w = Words(heapless::Vec::new());
            m.visit(&mut w);
            w.0
        };
        assert!(words(&mut one) == words(&mut batched), "{T} tables, {M} MLPs: sequence gradients differ");
        // Each side's batched methods.
        one.zero_grad();
        batched.zero_grad();
        Towers::<[u32; 3], [u32; 3], 5>::backward_queries(&mut batched, &tokens[..20], &grads[..20]);
        Towers::<[u32; 3], [u32; 3], 5>::backward_items(&mut batched, &tokens[20..], &grads[20..]);
        for k in 0..37 {
            let side = if k < 20 { Side::Query } else { Side::Item };
            TokenModel::backward(&mut one, side, &tokens[k], &grads[k]);
        }
        assert!(words(&mut one) == words(&mut batched), "{T} tables, {M} MLPs: side gradients differ");
        for side in [Side::Query, Side::Item] {
            let mut out = [[0.0; 5]; 37];
            match side {
                Side::Query => Towers::<[u32; 3], [u32; 3], 5>::embed_queries(&one, &tokens, &mut out),
                Side::Item => Towers::<[u32; 3], [u32; 3], 5>::embed_items(&one, &tokens, &mut out),
            }
            for k in 0..37 {
                let mut e = [0.0; 5];
                one.embed(side, &tokens[k], &mut e);
                assert_eq!(e.map(f32::to_bits), out[k].map(f32::to_bits), "{side:?} {k}");
            }
        }
    }

    #[test]
    fn every_tying_batches_with_the_bits_of_one_input_at_a_time() {
        batches_match_one_at_a_time::<2, 2>(TowerConfig::DEFAULT);
        batches_match_one_at_a_time::<1, 2>(TowerConfig { pooling: Pooling::Sum, ..TowerConfig::DEFAULT });
        batches_match_one_at_a_time::<1, 1>(TowerConfig { activation: Activation::Tanh, ..TowerConfig::DEFAULT });
    }

    #[test]
    fn embeddings_are_unit_vectors_and_siamese_sides_agree() {
        let mut m = SiameseTowers::<13, 4, 5, 3, 0>::new(TowerConfig::DEFAULT);
        m.init(&mut rand_pcg::Pcg32::seed_from_u64(1));
        let (mut a, mut b) = ([0.0; 3], [0.0; 3]);
        m.embed(Side::Query, &[3, 4], &mut a);
        m.embed(Side::Item, &[3, 4], &mut b);
        assert_eq!(a, b);
        assert_relative_eq!(dot(&a, &a), 1.0, epsilon = 1e-5);
        assert_relative_eq!(m.score_scale(), 20.0, epsilon = 1e-4);
    }

    #[test]
    fn learned_scale_moves_by_its_gradient_and_stays_in_bounds() {
        let cfg = TowerConfig { scale: Scale::Learned { init: 5.0, min: 1.0, max: 6.0 }, ..TowerConfig::DEFAULT };
        let mut m = SiameseTowers::<13, 4, 5, 3, 0>::new(cfg);
        m.init(&mut rand_pcg::Pcg32::seed_from_u64(1));
        m.backward_scale(-2.0);
        // theta gradient = alpha * dL/dalpha = -10; SGD lr 0.01 -> theta += 0.1.
        let mut opt =
            crate::optim::Optimizer::new(crate::optim::OptimizerKind::Sgd { momentum: 0.0, weight_decay: 0.0 }, 0.0);
        opt.step(0.01, &mut |v| m.visit(v)).unwrap();
        assert_relative_eq!(m.score_scale(), 5.0 * math::exp(0.1), epsilon = 1e-4);
        m.backward_scale(-100.0);
        opt.step(0.01, &mut |v| m.visit(v)).unwrap();
        assert_relative_eq!(m.score_scale(), 6.0);
    }

    #[test]
    fn learned_scale_leaves_a_bound_when_the_gradient_points_inside() {
        // theta starts above ln max (as a checkpoint may hold it).
        let cfg = TowerConfig { scale: Scale::Learned { init: 5.0, min: 1.0, max: 6.0 }, ..TowerConfig::DEFAULT };
        let mut m = SiameseTowers::<13, 4, 5, 3, 0>::new(cfg);
        m.init(&mut rand_pcg::Pcg32::seed_from_u64(1));
        let sgd = crate::optim::OptimizerKind::Sgd { momentum: 0.0, weight_decay: 0.0 };
        let mut opt = crate::optim::Optimizer::new(sgd, 0.0);
        let (lo, hi) = (math::ln(1.0), math::ln(6.0));
        *m.log_scale_mut() = math::ln(10.0);
        assert_relative_eq!(m.score_scale(), 6.0);
        // A gradient pointing outside (dL/dalpha < 0 wants alpha larger):
        // theta is projected onto the bound and stays there.
        m.backward_scale(-2.0);
        opt.step(0.01, &mut |v| m.visit(v)).unwrap();
        assert!(*m.log_scale_mut() <= hi, "{}", m.log_scale_mut());
        assert_relative_eq!(m.score_scale(), 6.0, max_relative = 1e-6);
        // A gradient pointing inside: the step is taken. At the bound,
        // alpha = 6 (to an ulp), theta gradient = 6 * 2 = 12, lr 0.01:
        // theta = ln 6 - 0.12, alpha = 6 e^-0.12.
        m.backward_scale(2.0);
        opt.step(0.01, &mut |v| m.visit(v)).unwrap();
        assert_relative_eq!(m.score_scale(), 6.0 * math::exp(-0.12), max_relative = 1e-5);
        // The same from below the lower bound.
        *m.log_scale_mut() = math::ln(0.5);
        m.backward_scale(3.0);
        opt.step(0.01, &mut |v| m.visit(v)).unwrap();
        assert_relative_eq!(*m.log_scale_mut(), lo, epsilon = 1e-7);
        m.backward_scale(-3.0);
        opt.step(0.01, &mut |v| m.visit(v)).unwrap();
        // theta gradient = 1 * -3, lr 0.01: theta = 0.03.
        assert_relative_eq!(m.score_scale(), math::exp(0.03), max_relative = 1e-5);
        // A start outside the bounds is projected at init.
        let cfg = TowerConfig { scale: Scale::Learned { init: 50.0, min: 1.0, max: 6.0 }, ..TowerConfig::DEFAULT };
        let mut m = SiameseTowers::<13, 4, 5, 3, 0>::new(cfg);
        m.init(&mut rand_pcg::Pcg32::seed_from_u64(1));
        assert_relative_eq!(*m.log_scale_mut(), hi);
    }
}
