//! A two-layer perceptron: `y = W2 f(W1 x + b1) + b2`.
//!
//! Backward recomputes the hidden layer from `x` rather than storing it, so
//! a tower needs no per-example activation memory between its forward and
//! backward passes (a forward costs little beside the cache's scoring).

use rand_core::RngCore;

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
