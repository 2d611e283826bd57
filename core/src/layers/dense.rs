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
/// `SMatrix<f32, OUT, IN>`, stored column-major. The batched methods work
/// in stack buffers besides: `backward_batch` with input gradients about
/// `64 * (IN + OUT)` bytes (16 inputs' gradients, transposed).
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
    /// [`Self::forward`] gives each input alone.
    ///
    /// Each output is summed in nalgebra's gemv order, `b[o]` then
    /// `+= W[o, i] x[i]` for `i` ascending, so the bits are those of one
    /// input at a time. The work is blocked for registers: [`EXAMPLES`]
    /// inputs by [`OUTPUTS`] outputs are summed together, so each weight
    /// read from memory serves several inputs and a whole block's sums stay
    /// in registers until they are done (the rows past the last whole
    /// block sum in `ys`).
    pub fn forward_batch(&self, xs: &[[f32; IN]], ys: &mut [[f32; OUT]]) {
        let n = xs.len().min(ys.len());
        let (w, b) = (self.w.as_slice(), self.b.as_slice());
        let mut k = 0;
        while k + EXAMPLES <= n {
            forward_block::<IN, OUT, EXAMPLES>(w, b, &xs[k..k + EXAMPLES], &mut ys[k..k + EXAMPLES]);
            k += EXAMPLES;
        }
        while k < n {
            forward_block::<IN, OUT, 1>(w, b, &xs[k..k + 1], &mut ys[k..k + 1]);
            k += 1;
        }
    }

    /// [`Self::backward`] for every `k` in order, bit for bit.
    ///
    /// - The weight gradient: each entry adds `dy[o] x[i]` over the inputs
    ///   in order (nalgebra's ger, one input after another), blocked as
    ///   [`COLUMNS`] columns by [`OUTPUTS`] rows held in registers.
    /// - `dx = W^T dy`: each entry is nalgebra's dot product of a weight
    ///   column with `dy` (eight running sums, combined in its order),
    ///   computed for [`LANES`] inputs side by side, which the compiler
    ///   turns into vector operations across the inputs.
    pub fn backward_batch(&mut self, xs: &[[f32; IN]], dys: &[[f32; OUT]], dxs: Option<&mut [[f32; IN]]>) {
        let n = xs.len().min(dys.len());
        let (xs, dys) = (&xs[..n], &dys[..n]);
        let gw = self.gw.as_mut_slice();
        let mut i = 0;
        while i + COLUMNS <= IN {
            weight_grad_block::<IN, OUT, COLUMNS>(gw, xs, dys, i);
            i += COLUMNS;
        }
        while i < IN {
            weight_grad_block::<IN, OUT, 1>(gw, xs, dys, i);
            i += 1;
        }
        for dy in dys {
            self.gb += SVector::<f32, OUT>::from_column_slice(dy);
        }
        if let Some(dxs) = dxs {
            let w = self.w.as_slice();
            for (dys, dxs) in dys.chunks(LANES).zip(dxs.chunks_mut(LANES)) {
                input_grad_lanes::<IN, OUT>(w, dys, dxs);
            }
        }
    }

    /// Takes `other`'s weights and bias and clears the gradients (the
    /// optimiser state is left alone): a copy ready to gather gradients
    /// for the same parameters.
    pub fn mirror(&mut self, other: &Self) {
        self.w.as_mut_slice().copy_from_slice(other.w.as_slice());
        self.b.as_mut_slice().copy_from_slice(other.b.as_slice());
        self.zero_grad();
    }

    /// Adds `other`'s gradients to this layer's, entry by entry.
    pub fn add_grads(&mut self, other: &Self) {
        for (g, &o) in self.gw.as_mut_slice().iter_mut().zip(other.gw.as_slice()) {
            *g += o;
        }
        for (g, &o) in self.gb.as_mut_slice().iter_mut().zip(other.gb.as_slice()) {
            *g += o;
        }
    }

    /// Clears the gradients.
    pub fn zero_grad(&mut self) {
        // Through the slices: a plain fill the compiler turns into a
        // memset (nalgebra's `fill` walks the matrix element by element).
        self.gw.as_mut_slice().fill(0.0);
        self.gb.as_mut_slice().fill(0.0);
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

// How the batched kernels are written. Each is plain Rust over fixed-size
// arrays that the compiler turns into vector instructions of the build's
// width; the shapes below are the ones it vectorises along the contiguous
// dimension (measured on AVX-512: about 88 GFLOP/s for the forward pass
// and the weight gradient, 45 for the input gradient, against 3 to 6 for
// the first shapes tried, which it vectorised across inputs with gathers).
// The sums keep nalgebra's order, so the bits are those of one input at a
// time (`batches_give_the_bits_of_one_input_at_a_time`).

/// Inputs summed together by [`Dense::forward_batch`].
pub const EXAMPLES: usize = 4;
/// Outputs (rows of `W`) per register block in the batched kernels.
pub const OUTPUTS: usize = 64;
/// Weight columns per register block of the batched weight gradient.
pub const COLUMNS: usize = 4;
/// Inputs side by side in the batched input gradient.
pub const LANES: usize = 16;

/// `ys[k] = W xs[k] + b` for `K` inputs: whole blocks of [`OUTPUTS`] rows,
/// then the rows left, each sum in gemv order.
#[inline(always)]
fn forward_block<const IN: usize, const OUT: usize, const K: usize>(
    w: &[f32],
    b: &[f32],
    xs: &[[f32; IN]],
    ys: &mut [[f32; OUT]],
) {
    let (Some(xs), Some(ys)) = (xs.first_chunk::<K>(), ys.first_chunk_mut::<K>()) else { return };
    let mut o0 = 0;
    while o0 + OUTPUTS <= OUT {
        let Some(bias) = b[o0..].first_chunk::<OUTPUTS>() else { return };
        let mut acc = [*bias; K];
        for (i, col) in w.chunks_exact(OUT).take(IN).enumerate() {
            let Some(c) = col[o0..].first_chunk::<OUTPUTS>() else { return };
            for k in 0..K {
                let xi = xs[k][i];
                for o in 0..OUTPUTS {
                    acc[k][o] += c[o] * xi;
                }
            }
        }
        for k in 0..K {
            ys[k][o0..o0 + OUTPUTS].copy_from_slice(&acc[k]);
        }
        o0 += OUTPUTS;
    }
    if o0 < OUT {
        for y in ys.iter_mut() {
            y[o0..].copy_from_slice(&b[o0..]);
        }
        for (i, col) in w.chunks_exact(OUT).take(IN).enumerate() {
            for (x, y) in xs.iter().zip(ys.iter_mut()) {
                let xi = x[i];
                for (y, &c) in y[o0..].iter_mut().zip(&col[o0..]) {
                    *y += c * xi;
                }
            }
        }
    }
}

/// `gW[:, i0..i0 + C] += dy x^T` over every input in order.
#[inline(always)]
fn weight_grad_block<const IN: usize, const OUT: usize, const C: usize>(
    gw: &mut [f32],
    xs: &[[f32; IN]],
    dys: &[[f32; OUT]],
    i0: usize,
) {
    let mut o0 = 0;
    while o0 + OUTPUTS <= OUT {
        let mut acc = [[0.0f32; OUTPUTS]; C];
        for (c, a) in acc.iter_mut().enumerate() {
            a.copy_from_slice(&gw[(i0 + c) * OUT + o0..][..OUTPUTS]);
        }
        for (x, dy) in xs.iter().zip(dys) {
            let Some(d) = dy[o0..].first_chunk::<OUTPUTS>() else { return };
            let Some(xi) = x[i0..].first_chunk::<C>() else { return };
            for (a, &xi) in acc.iter_mut().zip(xi) {
                for (a, &d) in a.iter_mut().zip(d) {
                    *a += d * xi;
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            gw[(i0 + c) * OUT + o0..][..OUTPUTS].copy_from_slice(a);
        }
        o0 += OUTPUTS;
    }
    if o0 < OUT {
        for c in 0..C {
            let col = &mut gw[(i0 + c) * OUT + o0..(i0 + c + 1) * OUT];
            for (x, dy) in xs.iter().zip(dys) {
                let xi = x[i0 + c];
                for (g, &d) in col.iter_mut().zip(&dy[o0..]) {
                    *g += d * xi;
                }
            }
        }
    }
}

/// `dxs[k] = W^T dys[k]` for up to [`LANES`] inputs, each entry nalgebra's
/// dot product of a column of `W` with `dys[k]`: for 2 to 4 rows its
/// special cases, else eight running sums over the rows (row `r` in sum
/// `r % 8`, while eight rows remain), combined as
/// `((0 + (s0 + s4)) + (s1 + s5)) + ...`, then the rows left one by one.
/// The inputs are the vector lanes: `dys` is transposed first.
fn input_grad_lanes<const IN: usize, const OUT: usize>(w: &[f32], dys: &[[f32; OUT]], dxs: &mut [[f32; IN]]) {
    let n = dys.len().min(dxs.len()).min(LANES);
    if OUT == 0 {
        // No rows: every dot product is empty (and `chunks_exact(0)` would
        // panic).
        dxs[..n].iter_mut().for_each(|dx| *dx = [0.0; IN]);
        return;
    }
    let mut dyt = [[0.0f32; LANES]; OUT];
    for (k, dy) in dys[..n].iter().enumerate() {
        for (t, &d) in dyt.iter_mut().zip(dy) {
            t[k] = d;
        }
    }
    let mut dxt = [[0.0f32; LANES]; IN];
    if (2..=4).contains(&OUT) {
        // nalgebra's own sums for 2, 3 and 4 rows.
        for (col, out) in w.chunks_exact(OUT).zip(dxt.iter_mut()) {
            for (l, s) in out.iter_mut().enumerate() {
                let p = |r: usize| col[r] * dyt[r][l];
                *s = match OUT {
                    2 => p(0) + p(1),
                    3 => p(0) + p(1) + p(2),
                    _ => (p(0) + p(2)) + (p(1) + p(3)),
                };
            }
        }
    } else {
        // Opaque to the optimiser, so that it keeps the loop over rows as
        // a loop instead of unrolling it and vectorising across columns.
        let whole = core::hint::black_box(OUT / 8 * 8);
        for (col, out) in w.chunks_exact(OUT).zip(dxt.iter_mut()) {
            let mut acc = [[0.0f32; LANES]; 8];
            let mut o = 0;
            while o < whole {
                let Some(rows) = col[o..].first_chunk::<8>() else { break };
                for (r, (&wr, a)) in rows.iter().zip(acc.iter_mut()).enumerate() {
                    let t = &dyt[o + r];
                    for l in 0..LANES {
                        a[l] += wr * t[l];
                    }
                }
                o += 8;
            }
            for r in 0..4 {
                for l in 0..LANES {
                    out[l] += acc[r][l] + acc[r + 4][l];
                }
            }
            for (&wr, t) in col[whole..].iter().zip(&dyt[whole..]) {
                for l in 0..LANES {
                    out[l] += wr * t[l];
                }
            }
        }
    }
    for (k, dx) in dxs[..n].iter_mut().enumerate() {
        for (d, t) in dx.iter_mut().zip(&dxt) {
            *d = t[k];
        }
    }
}

impl<const IN: usize, const OUT: usize, const S: usize> Default for Dense<IN, OUT, S> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    /// One shape: `K` inputs through `Dense<IN, OUT>` in a batch and one
    /// at a time, with some inputs and gradients exactly zero or -0.0.
    fn batch_against_one_at_a_time<const IN: usize, const OUT: usize, const K: usize>(seed: u64) {
        use rand_core::SeedableRng;
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
        let mut one = Dense::<IN, OUT, 0>::new();
        one.init(&mut rng);
        one.b.iter_mut().for_each(|b| *b = random::normal(&mut rng));
        let mut batch = one.clone();
        let mut value = |k: usize, i: usize| match (k * 31 + i * 7) % 23 {
            0 => 0.0,
            1 => -0.0,
            _ => random::normal(&mut rng),
        };
        let xs: [[f32; IN]; K] = core::array::from_fn(|k| core::array::from_fn(|i| value(k, i)));
        let dys: [[f32; OUT]; K] = core::array::from_fn(|k| core::array::from_fn(|o| value(k + 3, o)));
        let mut ys = [[0.0; OUT]; K];
        batch.forward_batch(&xs, &mut ys);
        let mut dxs = [[0.0; IN]; K];
        batch.backward_batch(&xs, &dys, Some(&mut dxs));
        for k in 0..K {
            let (mut y, mut dx) = ([0.0; OUT], [0.0; IN]);
            one.forward(&xs[k], &mut y);
            assert_eq!(y.map(f32::to_bits), ys[k].map(f32::to_bits), "{IN}x{OUT}, forward, input {k}");
            one.backward(&xs[k], &dys[k], Some(&mut dx));
            assert_eq!(dx.map(f32::to_bits), dxs[k].map(f32::to_bits), "{IN}x{OUT}, dx, input {k}");
        }
        let bits = |d: &Dense<IN, OUT, 0>| {
            d.gw.iter().chain(d.gb.iter()).map(|x| x.to_bits()).collect::<heapless::Vec<u32, 8192>>()
        };
        assert_eq!(bits(&one), bits(&batch), "{IN}x{OUT}, parameter gradients");
        // Without dx, the parameter gradients are the same again.
        let mut again = one.clone();
        again.zero_grad();
        one.zero_grad();
        again.backward_batch(&xs, &dys, None);
        for k in 0..K {
            one.backward(&xs[k], &dys[k], None);
        }
        assert_eq!(bits(&one), bits(&again), "{IN}x{OUT}, parameter gradients without dx");
    }

    #[test]
    fn batches_give_the_bits_of_one_input_at_a_time() {
        // Whole register blocks and tails on every side, nalgebra's special
        // dot products (2 to 4 rows), more inputs than a lane group.
        batch_against_one_at_a_time::<7, 5, 6>(9);
        batch_against_one_at_a_time::<5, 4, 3>(10);
        batch_against_one_at_a_time::<3, 2, 5>(11);
        batch_against_one_at_a_time::<6, 3, 4>(12);
        batch_against_one_at_a_time::<2, 1, 2>(13);
        batch_against_one_at_a_time::<37, 70, 21>(14);
        batch_against_one_at_a_time::<64, 32, 17>(15);
        batch_against_one_at_a_time::<9, 17, 33>(16);
        batch_against_one_at_a_time::<3, 0, 5>(17);
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
