//! Layers that compose to any depth: the [`Layer`] trait, element-wise
//! activations and L2 normalisation as layers, and [`Chain`], which runs
//! one layer after another.
//!
//! A tower is a type: `Chain<Dense<128, 128, 2>, Chain<Act<128>,
//! Chain<Dense<128, 64, 2>, L2<64>, 64>, 128>, 128>` is Dense, ReLU,
//! Dense, L2 normalisation, with every width checked by the compiler.
//!
//! Backward passes recompute what they need from the layer's input, so a
//! layer keeps no activations between calls: a chain of depth `d` runs
//! `d - 1` forward layers again during its backward pass, and its stack
//! holds one intermediate vector per level.

use rand_core::RngCore;

use super::{normalize, Activation, Dense, ParamVisitor};

/// A differentiable map from `IN` to `OUT` floats with its parameters.
pub trait Layer<const IN: usize, const OUT: usize> {
    /// `y = f(x)`.
    fn forward(&self, x: &[f32; IN], y: &mut [f32; OUT]);
    /// Accumulates the parameters' gradients for an upstream gradient `dy`
    /// at input `x`, and writes `dx` if asked.
    fn backward(&mut self, x: &[f32; IN], dy: &[f32; OUT], dx: Option<&mut [f32; IN]>);
    /// Draws random parameters (nothing, for a layer without any).
    fn init(&mut self, _rng: &mut dyn RngCore) {}
    /// Clears the gradients.
    fn zero_grad(&mut self) {}
    /// Shows every parameter to an optimiser.
    fn visit(&mut self, _v: &mut dyn ParamVisitor) {}

    /// [`Self::forward`] for each input (`ys[k]` from `xs[k]`). Layers
    /// that can share work across inputs override it; the results must be
    /// those of one input at a time.
    fn forward_batch(&self, xs: &[[f32; IN]], ys: &mut [[f32; OUT]]) {
        for (x, y) in xs.iter().zip(ys) {
            self.forward(x, y);
        }
    }
    /// [`Self::backward`] for each input in order (`dxs`, if given, one per
    /// input); overrides must give the same gradients, bit for bit.
    fn backward_batch(&mut self, xs: &[[f32; IN]], dys: &[[f32; OUT]], dxs: Option<&mut [[f32; IN]]>) {
        match dxs {
            Some(dxs) => {
                for ((x, dy), dx) in xs.iter().zip(dys).zip(dxs) {
                    self.backward(x, dy, Some(dx));
                }
            }
            None => {
                for (x, dy) in xs.iter().zip(dys) {
                    self.backward(x, dy, None);
                }
            }
        }
    }
}

/// A layer whose backward pass a second copy of it can share: the copy
/// takes the original's parameters ([`Self::mirror`]), gathers the
/// gradients of some of the inputs in its own buffers, on another thread
/// if need be, and the original adds them to its own ([`Self::add_grads`]).
/// [`crate::layered::LayerTowers`] back-propagates the full softmax's
/// corpus in two halves this way ([`crate::layered::Twin`]).
///
/// A layer without parameters copies its settings (an activation's
/// kind) and has no gradients to add.
pub trait Mirror {
    /// Takes `other`'s parameters and clears this layer's gradients.
    fn mirror(&mut self, other: &Self);
    /// Adds `other`'s gradients to this layer's, entry by entry.
    fn add_grads(&mut self, other: &Self);
}

impl<const IN: usize, const OUT: usize, const S: usize> Mirror for Dense<IN, OUT, S> {
    fn mirror(&mut self, other: &Self) {
        Dense::mirror(self, other)
    }
    fn add_grads(&mut self, other: &Self) {
        Dense::add_grads(self, other)
    }
}

impl<const N: usize> Mirror for Act<N> {
    fn mirror(&mut self, other: &Self) {
        *self = *other;
    }
    fn add_grads(&mut self, _: &Self) {}
}

impl<const N: usize> Mirror for L2<N> {
    fn mirror(&mut self, _: &Self) {}
    fn add_grads(&mut self, _: &Self) {}
}

impl<A: Mirror, B: Mirror, const MID: usize> Mirror for Chain<A, B, MID> {
    fn mirror(&mut self, other: &Self) {
        self.0.mirror(&other.0);
        self.1.mirror(&other.1);
    }
    fn add_grads(&mut self, other: &Self) {
        self.0.add_grads(&other.0);
        self.1.add_grads(&other.1);
    }
}

/// Inputs a [`Chain`] passes through its layers together: its stack holds
/// this many intermediate vectors per level.
pub const CHUNK: usize = 16;

impl<const IN: usize, const OUT: usize, const S: usize> Layer<IN, OUT> for Dense<IN, OUT, S> {
    fn forward(&self, x: &[f32; IN], y: &mut [f32; OUT]) {
        Dense::forward(self, x, y)
    }
    fn backward(&mut self, x: &[f32; IN], dy: &[f32; OUT], dx: Option<&mut [f32; IN]>) {
        Dense::backward(self, x, dy, dx)
    }
    fn init(&mut self, mut rng: &mut dyn RngCore) {
        Dense::init(self, &mut rng)
    }
    fn zero_grad(&mut self) {
        Dense::zero_grad(self)
    }
    fn visit(&mut self, v: &mut dyn ParamVisitor) {
        Dense::visit(self, v)
    }
    fn forward_batch(&self, xs: &[[f32; IN]], ys: &mut [[f32; OUT]]) {
        Dense::forward_batch(self, xs, ys)
    }
    fn backward_batch(&mut self, xs: &[[f32; IN]], dys: &[[f32; OUT]], dxs: Option<&mut [[f32; IN]]>) {
        Dense::backward_batch(self, xs, dys, dxs)
    }
}

/// An element-wise activation over `N` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Act<const N: usize>(pub Activation);

impl<const N: usize> Layer<N, N> for Act<N> {
    fn forward(&self, x: &[f32; N], y: &mut [f32; N]) {
        self.0.forward(x, y)
    }
    fn backward(&mut self, x: &[f32; N], dy: &[f32; N], dx: Option<&mut [f32; N]>) {
        if let Some(dx) = dx {
            let mut y = [0.0; N];
            self.0.forward(x, &mut y);
            self.0.backward(x, &y, dy, dx);
        }
    }
}

/// L2 normalisation of `N` values (see [`normalize`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2<const N: usize>;

impl<const N: usize> Layer<N, N> for L2<N> {
    fn forward(&self, x: &[f32; N], y: &mut [f32; N]) {
        normalize::forward(x, y);
    }
    fn backward(&mut self, x: &[f32; N], dy: &[f32; N], dx: Option<&mut [f32; N]>) {
        if let Some(dx) = dx {
            let mut y = [0.0; N];
            let norm = normalize::forward(x, &mut y);
            normalize::backward(&y, norm, dy, dx);
        }
    }
}

/// `B` after `A`, through `MID` values.
#[derive(Debug, Clone, Default)]
pub struct Chain<A, B, const MID: usize>(pub A, pub B);

impl<A, B, const IN: usize, const MID: usize, const OUT: usize> Layer<IN, OUT> for Chain<A, B, MID>
where
    A: Layer<IN, MID>,
    B: Layer<MID, OUT>,
{
    fn forward(&self, x: &[f32; IN], y: &mut [f32; OUT]) {
        let mut h = [0.0; MID];
        self.0.forward(x, &mut h);
        self.1.forward(&h, y);
    }
    fn backward(&mut self, x: &[f32; IN], dy: &[f32; OUT], dx: Option<&mut [f32; IN]>) {
        let (mut h, mut dh) = ([0.0; MID], [0.0; MID]);
        self.0.forward(x, &mut h);
        self.1.backward(&h, dy, Some(&mut dh));
        self.0.backward(x, &dh, dx);
    }
    fn init(&mut self, rng: &mut dyn RngCore) {
        self.0.init(rng);
        self.1.init(rng);
    }
    fn zero_grad(&mut self) {
        self.0.zero_grad();
        self.1.zero_grad();
    }
    fn visit(&mut self, v: &mut dyn ParamVisitor) {
        self.0.visit(v);
        self.1.visit(v);
    }
    fn forward_batch(&self, xs: &[[f32; IN]], ys: &mut [[f32; OUT]]) {
        let mut h = [[0.0; MID]; CHUNK];
        for (x, y) in xs.chunks(CHUNK).zip(ys.chunks_mut(CHUNK)) {
            let n = x.len().min(y.len());
            self.0.forward_batch(&x[..n], &mut h[..n]);
            self.1.forward_batch(&h[..n], &mut y[..n]);
        }
    }
    fn backward_batch(&mut self, xs: &[[f32; IN]], dys: &[[f32; OUT]], mut dxs: Option<&mut [[f32; IN]]>) {
        let (mut h, mut dh) = ([[0.0; MID]; CHUNK], [[0.0; MID]; CHUNK]);
        for (c, (x, dy)) in xs.chunks(CHUNK).zip(dys.chunks(CHUNK)).enumerate() {
            let n = x.len().min(dy.len());
            self.0.forward_batch(&x[..n], &mut h[..n]);
            self.1.backward_batch(&h[..n], &dy[..n], Some(&mut dh[..n]));
            let dx = dxs.as_deref_mut().map(|d| {
                let len = d.len();
                &mut d[(c * CHUNK).min(len)..(c * CHUNK + n).min(len)]
            });
            self.0.backward_batch(&x[..n], &dh[..n], dx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Activation;
    use rand_core::SeedableRng;

    type Tower = Chain<Dense<5, 4, 0>, Chain<Act<4>, Chain<Dense<4, 3, 0>, L2<3>, 3>, 4>, 4>;

    fn tower() -> Tower {
        let mut t = Chain(Dense::new(), Chain(Act(Activation::Tanh), Chain(Dense::new(), L2)));
        t.init(&mut rand_pcg::Pcg64Mcg::seed_from_u64(5));
        t
    }

    /// `<c, f(x)>` in f64.
    fn objective(t: &Tower, x: &[f32; 5], c: &[f32; 3]) -> f64 {
        let mut y = [0.0; 3];
        t.forward(x, &mut y);
        (0..3).map(|i| c[i] as f64 * y[i] as f64).sum()
    }

    #[test]
    fn a_chain_in_batches_gives_the_bits_of_one_input_at_a_time() {
        let mut one = tower();
        let mut batch = tower();
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(8);
        // More inputs than a chunk, and not a multiple of it.
        let xs: [[f32; 5]; 37] = core::array::from_fn(|_| core::array::from_fn(|_| crate::random::normal(&mut rng)));
        let dys: [[f32; 3]; 37] = core::array::from_fn(|_| core::array::from_fn(|_| crate::random::normal(&mut rng)));
        let mut ys = [[0.0; 3]; 37];
        batch.forward_batch(&xs, &mut ys);
        let mut dxs = [[0.0; 5]; 37];
        batch.backward_batch(&xs, &dys, Some(&mut dxs));
        for k in 0..37 {
            let (mut y, mut dx) = ([0.0; 3], [0.0; 5]);
            one.forward(&xs[k], &mut y);
            one.backward(&xs[k], &dys[k], Some(&mut dx));
            assert_eq!(y.map(f32::to_bits), ys[k].map(f32::to_bits), "{k}");
            assert_eq!(dx.map(f32::to_bits), dxs[k].map(f32::to_bits), "{k}");
        }
        struct Bits(heapless::Vec<u32, 64>);
        impl ParamVisitor for Bits {
            fn dense(&mut self, _: &mut [f32], g: &mut [f32], _: &mut [&mut [f32]]) {
                self.0.extend(g.iter().map(|x| x.to_bits()));
            }
            fn sparse(&mut self, _: usize, _: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]], _: &[bool]) {}
        }
        let (mut a, mut b) = (Bits(heapless::Vec::new()), Bits(heapless::Vec::new()));
        one.visit(&mut a);
        batch.visit(&mut b);
        assert_eq!(a.0, b.0);
    }

    #[test]
    fn a_chain_back_propagates_like_finite_differences() {
        let mut t = tower();
        let x = [0.3, -0.7, 0.2, 0.9, -0.1];
        let c = [0.5, -1.0, 0.25];
        let mut dx = [0.0; 5];
        t.zero_grad();
        t.backward(&x, &c, Some(&mut dx));
        let h = 1e-3;
        for i in 0..5 {
            let (mut xp, mut xm) = (x, x);
            xp[i] += h;
            xm[i] -= h;
            let fd = (objective(&t, &xp, &c) - objective(&t, &xm, &c)) / (2.0 * h as f64);
            assert!((fd - dx[i] as f64).abs() < 2e-3, "dx[{i}]: {fd} vs {}", dx[i]);
        }
        // Parameter gradients: perturb every weight through the visitor.
        struct Grads(heapless::Vec<f32, 64>);
        impl ParamVisitor for Grads {
            fn dense(&mut self, _: &mut [f32], g: &mut [f32], _: &mut [&mut [f32]]) {
                self.0.extend_from_slice(g).unwrap();
            }
            fn sparse(&mut self, _: usize, _: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]], _: &[bool]) {}
        }
        let mut g = Grads(heapless::Vec::new());
        t.visit(&mut g);
        assert_eq!(g.0.len(), 5 * 4 + 4 + 4 * 3 + 3);
        struct Nudge(usize, f32);
        impl ParamVisitor for Nudge {
            fn dense(&mut self, v: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]]) {
                if self.0 < v.len() {
                    v[self.0] += self.1;
                }
                self.0 = self.0.wrapping_sub(v.len());
            }
            fn sparse(&mut self, _: usize, _: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]], _: &[bool]) {}
        }
        for (k, &want) in g.0.iter().enumerate() {
            let mut tp = tower();
            tp.visit(&mut Nudge(k, h));
            let mut tm = tower();
            tm.visit(&mut Nudge(k, -h));
            let fd = (objective(&tp, &x, &c) - objective(&tm, &x, &c)) / (2.0 * h as f64);
            assert!((fd - want as f64).abs() < 2e-3, "param {k}: {fd} vs {want}");
        }
    }
}
