//! Two towers built from any [`Layer`]s over dense features: the query
//! tower maps `[f32; FQ]` and the item tower `[f32; FI]` to `DIM` values,
//! and the score is `alpha <Q(x), T(y)>` with a fixed alpha. Items carry
//! their features (`[f32; FI]` is an [`crate::Item`], keyed by a
//! fingerprint of its values); a model whose items are ids into a feature
//! table implements [`Towers`] itself, over its id type.
//!
//! ```
//! use negcache::layered::LayerTowers;
//! use negcache::layers::{Act, Activation, Chain, Dense, L2};
//! use negcache::tower::Towers;
//!
//! // Dense(8) -> ReLU -> Dense(4) -> L2 on each side, Adam's 2 state slots.
//! type Tower = Chain<Dense<6, 8, 2>, Chain<Act<8>, Chain<Dense<8, 4, 2>, L2<4>, 4>, 8>, 8>;
//! let tower = || Chain(Dense::new(), Chain(Act(Activation::Relu), Chain(Dense::new(), L2)));
//! let model: LayerTowers<Tower, Tower, 6, 6, 2> = LayerTowers::new(tower(), tower(), 20.0);
//! let mut e = [0.0; 4];
//! Towers::<[f32; 6], [f32; 6], 4>::embed_query(&model, &[1.0; 6], &mut e);
//! ```

use rand_core::RngCore;

use crate::layers::{Layer, Mirror, ParamVisitor};
use crate::parallel::{split_parts, Fork};
use crate::tower::{backward_halves_in_turn, backward_run, embed_items_split, half, ItemGrads, Model, Towers};

/// A query tower `QT` over `[f32; FQ]` and an item tower `IT` over
/// `[f32; FI]`. `S` is the optimiser-state slots the layers keep per
/// parameter (their `Dense<_, _, S>`); `Trainer::init` checks it against
/// the optimiser's needs. `W` is [`NoTwin`], or a [`Twin`] of the item
/// tower ([`Self::with_twin`]) that lets the full softmax back-propagate
/// its corpus on two threads.
#[derive(Debug, Clone)]
pub struct LayerTowers<QT, IT, const FQ: usize, const FI: usize, const S: usize, W = NoTwin> {
    /// The query tower.
    pub query: QT,
    /// The item tower.
    pub item: IT,
    /// The score scale alpha.
    pub alpha: f32,
    /// The item tower's twin, if any.
    pub twin: W,
}

impl<QT, IT, const FQ: usize, const FI: usize, const S: usize> LayerTowers<QT, IT, FQ, FI, S> {
    /// Two towers and a fixed score scale.
    pub const fn new(query: QT, item: IT, alpha: f32) -> Self {
        Self { query, item, alpha, twin: NoTwin }
    }

    /// The same towers with `twin`, a second item tower of the same type
    /// (its values do not matter), as a second gradient buffer: the full
    /// softmax then back-propagates the two halves of its corpus apart,
    /// on two threads when the fork has them and the corpus is worth a
    /// hand-over ([`split_parts`]), and adds the second half's
    /// gradients to the first's ([`Towers::backward_items_halves`]). The
    /// twin costs the item tower's memory again, its optimiser state
    /// included, which it does not use; the gradients' bits change (two
    /// sums added instead of one), the same on any number of threads.
    ///
    /// ```
    /// use negcache::layered::LayerTowers;
    /// use negcache::layers::{Act, Activation, Chain, Dense, L2};
    /// use negcache::tower::Towers;
    ///
    /// type Tower = Chain<Dense<6, 8, 2>, Chain<Act<8>, Chain<Dense<8, 4, 2>, L2<4>, 4>, 8>, 8>;
    /// let tower = || Chain(Dense::new(), Chain(Act(Activation::Relu), Chain(Dense::new(), L2)));
    /// let plain: LayerTowers<Tower, Tower, 6, 6, 2> = LayerTowers::new(tower(), tower(), 20.0);
    /// assert!(!Towers::<[f32; 6], [f32; 6], 4>::item_halves(&plain));
    /// let model = plain.with_twin(tower());
    /// assert!(Towers::<[f32; 6], [f32; 6], 4>::item_halves(&model));
    /// ```
    pub fn with_twin(self, twin: IT) -> LayerTowers<QT, IT, FQ, FI, S, Twin<IT>> {
        let Self { query, item, alpha, twin: NoTwin } = self;
        LayerTowers { query, item, alpha, twin: Twin(twin) }
    }
}

impl<QT, IT, const FQ: usize, const FI: usize, const S: usize, W> LayerTowers<QT, IT, FQ, FI, S, W> {
    /// The multiply-adds an item counts for when a corpus is split over
    /// threads ([`Towers::embed_items_on`]): the layers' own work is not
    /// known here, so `FI x dim`, one dense map from the features to the
    /// embedding, a lower bound for most towers.
    pub const fn item_work(dim: usize) -> usize {
        FI * dim
    }
}

/// No twin: [`LayerTowers`]' default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoTwin;

/// A second item tower of type `L`, a second set of gradient buffers: each
/// full-softmax step it takes the item tower's parameters, recomputes the
/// forward passes of the corpus's second half with them and gathers their
/// gradients, which are then added to the item tower's (see
/// [`LayerTowers::with_twin`]). Its optimiser state goes unused.
#[derive(Debug, Clone, Default)]
pub struct Twin<L>(pub L);

/// What [`LayerTowers`] does with the halves of a corpus:
/// [`NoTwin`] back-propagates them one after the other into the item
/// tower (the provided method), [`Twin`] apart and then adds them.
pub trait ItemTwin<L: Layer<FI, DIM>, const FI: usize, const DIM: usize> {
    /// Whether the halves are gathered apart ([`Towers::item_halves`]).
    const APART: bool;
    /// [`Towers::backward_items_halves`] for the item tower `item`.
    fn backward_halves<F: Fork>(
        &mut self,
        item: &mut L,
        fork: &F,
        items: &[[f32; FI]],
        halves: [ItemGrads<'_, DIM>; 2],
    ) {
        let _ = fork;
        backward_halves_in_turn(
            &mut |ys: &[[f32; FI]], gs: &[[f32; DIM]]| item.backward_batch(ys, gs, None),
            items,
            halves,
        )
    }
}

impl<L: Layer<FI, DIM>, const FI: usize, const DIM: usize> ItemTwin<L, FI, DIM> for NoTwin {
    const APART: bool = false;
}

impl<L, const FI: usize, const DIM: usize> ItemTwin<L, FI, DIM> for Twin<L>
where
    L: Layer<FI, DIM> + Mirror + Send,
{
    const APART: bool = true;
    /// The first half into `item`, the second into the twin (which takes
    /// `item`'s parameters first), on two threads when
    /// [`split_parts`] finds the corpus worth a split at `2 FI DIM`
    /// multiply-adds per item (a backward pass recomputes the forward one
    /// and adds at least as much; a rough measure, which decides only
    /// where the halves run); then the twin's gradients are added to
    /// `item`'s. The same bits either way.
    fn backward_halves<F: Fork>(
        &mut self,
        item: &mut L,
        fork: &F,
        items: &[[f32; FI]],
        halves: [ItemGrads<'_, DIM>; 2],
    ) {
        let twin = &mut self.0;
        twin.mirror(item);
        let mid = half(items.len());
        let (ya, yb) = items.split_at(mid);
        let [first, second] = halves;
        let mut run_a =
            || backward_run(&mut |ys: &[[f32; FI]], gs: &[[f32; DIM]]| item.backward_batch(ys, gs, None), ya, 0, first);
        let mut run_b = || {
            backward_run(&mut |ys: &[[f32; FI]], gs: &[[f32; DIM]]| twin.backward_batch(ys, gs, None), yb, mid, second)
        };
        if split_parts(fork, items.len(), 2 * FI * DIM) >= 2 {
            fork.join(run_a, run_b);
        } else {
            run_a();
            run_b();
        }
        item.add_grads(twin);
    }
}

impl<QT, IT, const FQ: usize, const FI: usize, const S: usize, W, const DIM: usize> Model<DIM>
    for LayerTowers<QT, IT, FQ, FI, S, W>
where
    QT: Layer<FQ, DIM>,
    IT: Layer<FI, DIM>,
{
    fn init(&mut self, mut rng: &mut impl RngCore) {
        self.query.init(&mut rng);
        self.item.init(&mut rng);
    }
    fn score_scale(&self) -> f32 {
        self.alpha
    }
    fn backward_scale(&mut self, _d_alpha: f32) {}
    fn zero_grad(&mut self) {
        self.query.zero_grad();
        self.item.zero_grad();
    }
    fn visit(&mut self, v: &mut dyn ParamVisitor) {
        self.query.visit(v);
        self.item.visit(v);
    }
    fn state_slots(&self) -> usize {
        S
    }

    // The two towers are two values: nothing is shared.
    const SEPARATE_TOWERS: bool = true;
}

impl<QT, IT, const FQ: usize, const FI: usize, const S: usize, W, const DIM: usize> Towers<[f32; FQ], [f32; FI], DIM>
    for LayerTowers<QT, IT, FQ, FI, S, W>
where
    QT: Layer<FQ, DIM>,
    IT: Layer<FI, DIM> + Sync,
    W: ItemTwin<IT, FI, DIM>,
{
    fn embed_query(&self, x: &[f32; FQ], out: &mut [f32; DIM]) {
        self.query.forward(x, out)
    }
    fn embed_item(&self, y: &[f32; FI], out: &mut [f32; DIM]) {
        self.item.forward(y, out)
    }
    fn backward_query(&mut self, x: &[f32; FQ], grad: &[f32; DIM]) {
        self.query.backward(x, grad, None)
    }
    fn backward_item(&mut self, y: &[f32; FI], grad: &[f32; DIM]) {
        self.item.backward(y, grad, None)
    }
    fn embed_queries(&self, xs: &[[f32; FQ]], out: &mut [[f32; DIM]]) {
        self.query.forward_batch(xs, out)
    }
    fn embed_items(&self, ys: &[[f32; FI]], out: &mut [[f32; DIM]]) {
        self.item.forward_batch(ys, out)
    }
    /// Split over `fork` when the corpus pays for it
    /// ([`LayerTowers::item_work`] per item).
    fn embed_items_on<F: Fork>(&self, fork: &F, ys: &[[f32; FI]], out: &mut [[f32; DIM]]) {
        let item = &self.item;
        let embed = |ys: &[[f32; FI]], out: &mut [[f32; DIM]]| item.forward_batch(ys, out);
        embed_items_split(fork, ys, out, Self::item_work(DIM), &embed)
    }
    fn backward_queries(&mut self, xs: &[[f32; FQ]], grads: &[[f32; DIM]]) {
        self.query.backward_batch(xs, grads, None)
    }
    fn backward_items(&mut self, ys: &[[f32; FI]], grads: &[[f32; DIM]]) {
        self.item.backward_batch(ys, grads, None)
    }
    fn item_halves(&self) -> bool {
        W::APART
    }
    fn backward_items_halves<F: Fork>(&mut self, fork: &F, items: &[[f32; FI]], halves: [ItemGrads<'_, DIM>; 2]) {
        self.twin.backward_halves(&mut self.item, fork, items, halves)
    }
}
