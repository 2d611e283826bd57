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

use rand_core::RngCore;

use crate::layers::{normalize, Activation, EmbeddingBag, Mlp, ParamVisitor, Pooling};
use crate::math;

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
        I: AsRef<[u32]>,
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
