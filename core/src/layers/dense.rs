//! A fully connected layer `y = W x + b`.
//!
//! Backward, for an upstream gradient `dy`:
//! `dW += dy x^T`, `db += dy`, `dx = W^T dy`.

use nalgebra::{ArrayStorage, SMatrix, SVector};
use rand_core::RngCore;

use super::ParamVisitor;
use crate::math;
use crate::random;

/// A dense layer from `IN` to `OUT` features.
///
/// # Generics
/// - `IN`, `OUT`: input and output widths.
/// - `S`: optimiser-state slots kept per parameter (0 for plain SGD, 1 for
///   momentum or Adagrad, 2 for Adam).
///
/// # Memory
/// `(2 + S) * (IN * OUT + OUT) * 4` bytes: weights and bias, their
/// gradients, and the state slots. The weight matrix is an nalgebra
/// `SMatrix<f32, OUT, IN>`, stored column-major.
#[derive(Debug, Clone)]
pub struct Dense<const IN: usize, const OUT: usize, const S: usize> {
    w: SMatrix<f32, OUT, IN>,
    b: SVector<f32, OUT>,
    gw: SMatrix<f32, OUT, IN>,
    gb: SVector<f32, OUT>,
    sw: [SMatrix<f32, OUT, IN>; S],
    sb: [SVector<f32, OUT>; S],
}

impl<const IN: usize, const OUT: usize, const S: usize> Dense<IN, OUT, S> {
    const ZERO_W: SMatrix<f32, OUT, IN> = SMatrix::from_array_storage(ArrayStorage([[0.0; OUT]; IN]));
    const ZERO_B: SVector<f32, OUT> = SVector::from_array_storage(ArrayStorage([[0.0; OUT]; 1]));

    /// All zeros.
    pub const fn new() -> Self {
        Self {
            w: Self::ZERO_W,
            b: Self::ZERO_B,
            gw: Self::ZERO_W,
            gb: Self::ZERO_B,
            sw: [Self::ZERO_W; S],
            sb: [Self::ZERO_B; S],
        }
    }

    /// Glorot-uniform weights, `U(-a, a)` with `a = sqrt(6 / (IN + OUT))`;
    /// zero bias, gradients and state.
    pub fn init(&mut self, rng: &mut impl RngCore) {
        let a = math::sqrt(6.0 / (IN + OUT) as f32);
        for w in self.w.iter_mut() {
            *w = a * (2.0 * random::open01(rng) - 1.0);
        }
        self.b.fill(0.0);
        self.gw.fill(0.0);
        self.gb.fill(0.0);
        self.sw.iter_mut().for_each(|m| m.fill(0.0));
        self.sb.iter_mut().for_each(|m| m.fill(0.0));
    }

    /// `y = W x + b`.
    pub fn forward(&self, x: &[f32; IN], y: &mut [f32; OUT]) {
        let xv = SVector::<f32, IN>::from_column_slice(x);
        let mut yv = self.b;
        yv.gemv(1.0, &self.w, &xv, 1.0);
        y.copy_from_slice(yv.as_slice());
    }

    /// Accumulates `dW += dy x^T`, `db += dy`; writes `dx = W^T dy` if asked.
    pub fn backward(&mut self, x: &[f32; IN], dy: &[f32; OUT], dx: Option<&mut [f32; IN]>) {
        let xv = SVector::<f32, IN>::from_column_slice(x);
        let dyv = SVector::<f32, OUT>::from_column_slice(dy);
        self.gw.ger(1.0, &dyv, &xv, 1.0);
        self.gb += dyv;
        if let Some(dx) = dx {
            let mut dxv = SVector::<f32, IN>::zeros();
            dxv.gemv_tr(1.0, &self.w, &dyv, 0.0);
            dx.copy_from_slice(dxv.as_slice());
        }
    }

    /// `ys[k] = W xs[k] + b` for every `k`, bit for bit what
    /// [`Self::forward`] gives each input alone, with each column of `W`
    /// read once for the whole batch instead of once per input.
    pub fn forward_batch(&self, xs: &[[f32; IN]], ys: &mut [[f32; OUT]]) {
        let w = self.w.as_slice();
        for y in ys.iter_mut() {
            y.copy_from_slice(self.b.as_slice());
        }
        // The order of nalgebra's gemv, element by element: y += W[:, i] x_i
        // for i ascending (so the sums round the same way).
        for i in 0..IN {
            let col = &w[i * OUT..(i + 1) * OUT];
            for (x, y) in xs.iter().zip(ys.iter_mut()) {
                let xi = x[i];
                for o in 0..OUT {
                    y[o] += col[o] * xi;
                }
            }
        }
    }

    /// [`Self::backward`] for every `k` in order, the weight gradient
    /// accumulated column by column for the whole batch (each gradient
    /// entry sums the inputs in the same order, so the bits are those of
    /// the calls one by one).
    pub fn backward_batch(&mut self, xs: &[[f32; IN]], dys: &[[f32; OUT]], dxs: Option<&mut [[f32; IN]]>) {
        let gw = self.gw.as_mut_slice();
        for i in 0..IN {
            let col = &mut gw[i * OUT..(i + 1) * OUT];
            for (x, dy) in xs.iter().zip(dys) {
                let xi = x[i];
                for o in 0..OUT {
                    col[o] += dy[o] * xi;
                }
            }
        }
        for dy in dys.iter().take(xs.len()) {
            self.gb += SVector::<f32, OUT>::from_column_slice(dy);
        }
        if let Some(dxs) = dxs {
            for (dy, dx) in dys.iter().zip(dxs.iter_mut()) {
                let dyv = SVector::<f32, OUT>::from_column_slice(dy);
                let mut dxv = SVector::<f32, IN>::zeros();
                dxv.gemv_tr(1.0, &self.w, &dyv, 0.0);
                dx.copy_from_slice(dxv.as_slice());
            }
        }
    }

    /// Clears the gradients.
    pub fn zero_grad(&mut self) {
        self.gw.fill(0.0);
        self.gb.fill(0.0);
    }

    /// Shows the weights and the bias to an optimiser.
    pub fn visit(&mut self, v: &mut dyn ParamVisitor) {
        let mut sw = self.sw.each_mut().map(|m| m.as_mut_slice());
        v.dense(self.w.as_mut_slice(), self.gw.as_mut_slice(), &mut sw);
        let mut sb = self.sb.each_mut().map(|m| m.as_mut_slice());
        v.dense(self.b.as_mut_slice(), self.gb.as_mut_slice(), &mut sb);
    }

    /// The weights, column-major (`w[(o, i)]` at `o + i * OUT`).
    pub fn weights(&self) -> &[f32] {
        self.w.as_slice()
    }

    /// Mutable weights and bias, for loading a checkpoint.
    pub fn params_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        (self.w.as_mut_slice(), self.b.as_mut_slice())
    }
}

impl<const IN: usize, const OUT: usize, const S: usize> Default for Dense<IN, OUT, S> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn batches_give_the_bits_of_one_input_at_a_time() {
        use rand_core::SeedableRng;
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(9);
        let mut one = Dense::<7, 5, 0>::new();
        one.init(&mut rng);
        let mut batch = one.clone();
        let xs: [[f32; 7]; 6] = core::array::from_fn(|_| core::array::from_fn(|_| random::normal(&mut rng)));
        let dys: [[f32; 5]; 6] = core::array::from_fn(|_| core::array::from_fn(|_| random::normal(&mut rng)));
        let mut ys = [[0.0; 5]; 6];
        batch.forward_batch(&xs, &mut ys);
        let (mut dxs, mut dx) = ([[0.0; 7]; 6], [0.0; 7]);
        batch.backward_batch(&xs, &dys, Some(&mut dxs));
        for k in 0..6 {
            let mut y = [0.0; 5];
            one.forward(&xs[k], &mut y);
            assert_eq!(y.map(f32::to_bits), ys[k].map(f32::to_bits));
            one.backward(&xs[k], &dys[k], Some(&mut dx));
            assert_eq!(dx.map(f32::to_bits), dxs[k].map(f32::to_bits));
        }
        let bits = |d: &Dense<7, 5, 0>| {
            d.gw.iter().chain(d.gb.iter()).map(|x| x.to_bits()).collect::<heapless::Vec<u32, 40>>()
        };
        assert_eq!(bits(&one), bits(&batch));
    }

    use super::*;
    use approx::assert_relative_eq;
    use rand_core::SeedableRng;

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = rand_pcg::Pcg32::seed_from_u64(5);
        let mut d = Dense::<3, 2, 0>::new();
        d.init(&mut rng);
        let x = [0.5f32, -1.0, 2.0];
        let c = [1.5f32, -0.5]; // loss = <c, y>
        let loss = |d: &Dense<3, 2, 0>, x: &[f32; 3]| {
            let mut y = [0.0; 2];
            d.forward(x, &mut y);
            (c[0] * y[0] + c[1] * y[1]) as f64
        };
        let mut dx = [0.0; 3];
        d.backward(&x, &c, Some(&mut dx));
        let h = 1e-2f32;
        for i in 0..3 {
            let (mut xa, mut xb) = (x, x);
            xa[i] += h;
            xb[i] -= h;
            assert_relative_eq!(dx[i] as f64, (loss(&d, &xa) - loss(&d, &xb)) / (2.0 * h as f64), epsilon = 1e-4);
        }
        let gw: [f32; 6] = core::array::from_fn(|k| d.gw.as_slice()[k]);
        for (k, &g) in gw.iter().enumerate() {
            let (mut a, mut b) = (d.clone(), d.clone());
            a.w.as_mut_slice()[k] += h;
            b.w.as_mut_slice()[k] -= h;
            assert_relative_eq!(g as f64, (loss(&a, &x) - loss(&b, &x)) / (2.0 * h as f64), epsilon = 1e-4);
        }
        assert_eq!(d.gb.as_slice(), &c);
        assert_eq!(d.params_mut().0.len(), 6);
    }
}
