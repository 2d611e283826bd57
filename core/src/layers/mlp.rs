//! A two-layer perceptron: `y = W2 f(W1 x + b1) + b2`.
//!
//! Backward recomputes the hidden layer from `x` rather than storing it, so
//! a tower needs no per-example activation memory between its forward and
//! backward passes (a forward costs little beside the cache's scoring).

use rand_core::RngCore;

use super::layer::CHUNK;
use super::{Activation, Dense, ParamVisitor};

/// Dense `IN -> HID`, activation, dense `HID -> OUT`.
///
/// # Generics
/// `IN`, `HID`, `OUT`: widths; `S`: optimiser-state slots.
///
/// # Memory
/// That of its two [`Dense`] layers.
#[derive(Debug, Clone)]
pub struct Mlp<const IN: usize, const HID: usize, const OUT: usize, const S: usize> {
    first: Dense<IN, HID, S>,
    second: Dense<HID, OUT, S>,
}

impl<const IN: usize, const HID: usize, const OUT: usize, const S: usize> Mlp<IN, HID, OUT, S> {
    /// All zeros.
    pub const fn new() -> Self {
        Self { first: Dense::new(), second: Dense::new() }
    }

    /// Glorot-uniform weights in both layers.
    pub fn init(&mut self, rng: &mut impl RngCore) {
        self.first.init(rng);
        self.second.init(rng);
    }

    /// `y = W2 f(W1 x + b1) + b2`.
    pub fn forward(&self, act: Activation, x: &[f32; IN], y: &mut [f32; OUT]) {
        let (mut pre, mut hid) = ([0.0; HID], [0.0; HID]);
        self.first.forward(x, &mut pre);
        act.forward(&pre, &mut hid);
        self.second.forward(&hid, y);
    }

    /// Accumulates both layers' gradients; writes `dx` if asked.
    pub fn backward(&mut self, act: Activation, x: &[f32; IN], dy: &[f32; OUT], dx: Option<&mut [f32; IN]>) {
        let (mut pre, mut hid) = ([0.0; HID], [0.0; HID]);
        self.first.forward(x, &mut pre);
        act.forward(&pre, &mut hid);
        let (mut dhid, mut dpre) = ([0.0; HID], [0.0; HID]);
        self.second.backward(&hid, dy, Some(&mut dhid));
        act.backward(&pre, &hid, &dhid, &mut dpre);
        self.first.backward(x, &dpre, dx);
    }

    /// [`Self::forward`] for each input, bit for bit, each layer's weights
    /// read once for the batch ([`Dense::forward_batch`]). At most
    /// [`CHUNK`] inputs at a time pass through its stack buffers.
    pub fn forward_batch(&self, act: Activation, xs: &[[f32; IN]], ys: &mut [[f32; OUT]]) {
        let (mut pre, mut hid) = ([[0.0; HID]; CHUNK], [[0.0; HID]; CHUNK]);
        for (xs, ys) in xs.chunks(CHUNK).zip(ys.chunks_mut(CHUNK)) {
            let n = xs.len().min(ys.len());
            self.first.forward_batch(&xs[..n], &mut pre[..n]);
            for (p, h) in pre[..n].iter().zip(hid.iter_mut()) {
                act.forward(p, h);
            }
            self.second.forward_batch(&hid[..n], &mut ys[..n]);
        }
    }

    /// [`Self::backward`] for each input in order, bit for bit: each layer
    /// accumulates its gradients over the inputs in order, and the two
    /// layers share no parameter, so taking the second layer for every
    /// input before the first changes no sum.
    pub fn backward_batch(
        &mut self,
        act: Activation,
        xs: &[[f32; IN]],
        dys: &[[f32; OUT]],
        mut dxs: Option<&mut [[f32; IN]]>,
    ) {
        let (mut pre, mut hid) = ([[0.0; HID]; CHUNK], [[0.0; HID]; CHUNK]);
        let (mut dhid, mut dpre) = ([[0.0; HID]; CHUNK], [[0.0; HID]; CHUNK]);
        for (c, (xs, dys)) in xs.chunks(CHUNK).zip(dys.chunks(CHUNK)).enumerate() {
            let n = xs.len().min(dys.len());
            self.first.forward_batch(&xs[..n], &mut pre[..n]);
            for (p, h) in pre[..n].iter().zip(hid.iter_mut()) {
                act.forward(p, h);
            }
            self.second.backward_batch(&hid[..n], &dys[..n], Some(&mut dhid[..n]));
            for k in 0..n {
                act.backward(&pre[k], &hid[k], &dhid[k], &mut dpre[k]);
            }
            let dx = dxs.as_deref_mut().map(|d| {
                let len = d.len();
                &mut d[(c * CHUNK).min(len)..(c * CHUNK + n).min(len)]
            });
            self.first.backward_batch(&xs[..n], &dpre[..n], dx);
        }
    }

    /// Clears the gradients.
    pub fn zero_grad(&mut self) {
        self.first.zero_grad();
        self.second.zero_grad();
    }

    /// Shows both layers to an optimiser.
    pub fn visit(&mut self, v: &mut dyn ParamVisitor) {
        self.first.visit(v);
        self.second.visit(v);
    }

    /// The two layers, for checkpoints.
    pub fn layers_mut(&mut self) -> (&mut Dense<IN, HID, S>, &mut Dense<HID, OUT, S>) {
        (&mut self.first, &mut self.second)
    }
}

impl<const IN: usize, const HID: usize, const OUT: usize, const S: usize> Default for Mlp<IN, HID, OUT, S> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;
    use rand_core::SeedableRng;

    #[test]
    fn batches_give_the_bits_of_one_input_at_a_time() {
        let mut rng = rand_pcg::Pcg32::seed_from_u64(4);
        let mut one = Mlp::<9, 70, 5, 0>::new();
        one.init(&mut rng);
        for act in [Activation::Relu, Activation::Tanh] {
            let mut batch = one.clone();
            let v = |k: usize| ((k * 37 % 29) as f32 - 14.0) / 7.0;
            let xs: [[f32; 9]; 21] = core::array::from_fn(|k| core::array::from_fn(|i| v(k * 9 + i)));
            let dys: [[f32; 5]; 21] = core::array::from_fn(|k| core::array::from_fn(|o| v(k * 5 + o + 3)));
            let (mut ys, mut dxs) = ([[0.0; 5]; 21], [[0.0; 9]; 21]);
            batch.forward_batch(act, &xs, &mut ys);
            batch.backward_batch(act, &xs, &dys, Some(&mut dxs));
            for k in 0..21 {
                let (mut y, mut dx) = ([0.0; 5], [0.0; 9]);
                one.forward(act, &xs[k], &mut y);
                one.backward(act, &xs[k], &dys[k], Some(&mut dx));
                assert_eq!(y.map(f32::to_bits), ys[k].map(f32::to_bits), "{act:?} forward {k}");
                assert_eq!(dx.map(f32::to_bits), dxs[k].map(f32::to_bits), "{act:?} dx {k}");
            }
            let words = |m: &mut Mlp<9, 70, 5, 0>| {
                let mut w = Words(heapless::Vec::new());
                m.visit(&mut w);
                w.0
            };
            assert!(words(&mut one) == words(&mut batch), "{act:?}: gradients differ");
        }
    }

    struct Words(heapless::Vec<u32, 2048>);
    impl ParamVisitor for Words {
        fn dense(&mut self, _: &mut [f32], g: &mut [f32], _: &mut [&mut [f32]]) {
            self.0.extend(g.iter().map(|x| x.to_bits()));
        }
        fn sparse(&mut self, _: usize, _: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]], _: &[bool]) {}
    }

    #[test]
    fn input_gradient_matches_finite_differences() {
        let mut m = Mlp::<3, 4, 2, 0>::new();
        m.init(&mut rand_pcg::Pcg32::seed_from_u64(3));
        let c = [0.6f32, -1.1];
        for act in [Activation::Relu, Activation::Tanh] {
            let f = |x: &[f32; 3]| {
                let mut y = [0.0; 2];
                m.forward(act, x, &mut y);
                (c[0] * y[0] + c[1] * y[1]) as f64
            };
            let x = [0.4f32, -0.9, 1.3];
            let mut dx = [0.0; 3];
            m.clone().backward(act, &x, &c, Some(&mut dx));
            for i in 0..3 {
                let h = 1e-2;
                let (mut a, mut b) = (x, x);
                a[i] += h;
                b[i] -= h;
                assert_relative_eq!(dx[i] as f64, (f(&a) - f(&b)) / (2.0 * h as f64), epsilon = 2e-3);
            }
        }
    }
}
