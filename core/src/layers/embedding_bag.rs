//! A bag of hashed-token embeddings: each token id picks a row of a table
//! (`id % BUCKETS`), and the rows are pooled.
//!
//! Forward (mean pooling, n non-padding tokens): `y = (1/n) sum_t E[id_t]`.
//! Backward: each used row gets `dE[id_t] += dy / n` (sum pooling: `dy`);
//! the rows touched are marked so optimisers update only those (lazy sparse
//! updates), and clearing the gradient costs only what was touched.

use rand_core::RngCore;

use super::ParamVisitor;
use crate::math;
use crate::random;

/// The padding token: positions holding it are ignored.
pub const PAD: u32 = u32::MAX;

/// How token rows are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// The mean over non-padding tokens (zero when there are none).
    #[default]
    Mean,
    /// The sum.
    Sum,
}

/// A table of `BUCKETS` rows of `DIM` floats.
///
/// # Generics
/// - `BUCKETS`: number of rows; token ids are taken modulo it.
/// - `DIM`: row width.
/// - `S`: optimiser-state slots per parameter.
///
/// # Memory
/// `(2 + S) * BUCKETS * DIM * 4 + BUCKETS` bytes, row-major: the table, its
/// gradient, the state slots and one touched flag per row.
#[derive(Debug, Clone)]
pub struct EmbeddingBag<const BUCKETS: usize, const DIM: usize, const S: usize> {
    table: [[f32; DIM]; BUCKETS],
    grad: [[f32; DIM]; BUCKETS],
    state: [[[f32; DIM]; BUCKETS]; S],
    touched: [bool; BUCKETS],
}

impl<const BUCKETS: usize, const DIM: usize, const S: usize> EmbeddingBag<BUCKETS, DIM, S> {
    /// All zeros.
    pub const fn new() -> Self {
        const { assert!(BUCKETS > 0 && DIM > 0) };
        Self {
            table: [[0.0; DIM]; BUCKETS],
            grad: [[0.0; DIM]; BUCKETS],
            state: [[[0.0; DIM]; BUCKETS]; S],
            touched: [false; BUCKETS],
        }
    }

    /// Rows drawn from `N(0, 1/DIM)`, so a row has unit expected squared
    /// norm; zero gradients and state.
    pub fn init(&mut self, rng: &mut impl RngCore) {
        let sd = 1.0 / math::sqrt(DIM as f32);
        for row in self.table.iter_mut() {
            for x in row.iter_mut() {
                *x = sd * random::normal(rng);
            }
        }
        self.grad.iter_mut().for_each(|r| *r = [0.0; DIM]);
        self.state.iter_mut().for_each(|s| s.iter_mut().for_each(|r| *r = [0.0; DIM]));
        self.touched.fill(false);
    }

    #[inline]
    fn row(id: u32) -> usize {
        (id as usize) % BUCKETS
    }

    fn count(tokens: &[u32]) -> usize {
        tokens.iter().filter(|&&t| t != PAD).count()
    }

    /// Pools the rows of `tokens` into `y`.
    pub fn forward(&self, tokens: &[u32], pooling: Pooling, y: &mut [f32; DIM]) {
        *y = [0.0; DIM];
        for &t in tokens.iter().filter(|&&t| t != PAD) {
            let r = &self.table[Self::row(t)];
            for i in 0..DIM {
                y[i] += r[i];
            }
        }
        let n = Self::count(tokens);
        if pooling == Pooling::Mean && n > 0 {
            let inv = 1.0 / n as f32;
            y.iter_mut().for_each(|v| *v *= inv);
        }
    }

    /// Accumulates the rows' gradients for an upstream `dy`.
    pub fn backward(&mut self, tokens: &[u32], pooling: Pooling, dy: &[f32; DIM]) {
        let n = Self::count(tokens);
        let s = match pooling {
            Pooling::Mean if n > 0 => 1.0 / n as f32,
            _ => 1.0,
        };
        for &t in tokens.iter().filter(|&&t| t != PAD) {
            let r = Self::row(t);
            self.touched[r] = true;
            for (g, &d) in self.grad[r].iter_mut().zip(dy) {
                *g += s * d;
            }
        }
    }

    /// Marks row `r` as having a gradient this step, leaving the gradient
    /// as it is (ignored when `r` is out of range). A data-parallel run
    /// needs it: each replica back-propagates only its own examples, so
    /// after the gradients are summed across replicas every replica must
    /// also update the rows that only another replica touched, or the lazy
    /// sparse update would let the replicas' tables drift apart.
    pub fn touch(&mut self, r: usize) {
        if let Some(t) = self.touched.get_mut(r) {
            *t = true;
        }
    }

    /// Clears the gradients of the touched rows.
    pub fn zero_grad(&mut self) {
        for r in 0..BUCKETS {
            if self.touched[r] {
                self.grad[r] = [0.0; DIM];
                self.touched[r] = false;
            }
        }
    }

    /// Shows the table to an optimiser as a sparse tensor.
    pub fn visit(&mut self, v: &mut dyn ParamVisitor) {
        let mut st = self.state.each_mut().map(|s| s.as_flattened_mut());
        v.sparse(DIM, self.table.as_flattened_mut(), self.grad.as_flattened_mut(), &mut st, &self.touched);
    }

    /// The table, row-major.
    pub fn table(&self) -> &[[f32; DIM]; BUCKETS] {
        &self.table
    }

    /// The table, for loading a checkpoint.
    pub fn table_mut(&mut self) -> &mut [[f32; DIM]; BUCKETS] {
        &mut self.table
    }
}

impl<const BUCKETS: usize, const DIM: usize, const S: usize> Default for EmbeddingBag<BUCKETS, DIM, S> {
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
    fn mean_pooling_and_its_sparse_gradient() {
        let mut bag = EmbeddingBag::<5, 2, 0>::new();
        bag.init(&mut rand_pcg::Pcg32::seed_from_u64(1));
        // Token 7 is row 2; token 3 is row 3; PAD is skipped.
        let tokens = [7, 3, PAD, 7];
        let mut y = [0.0; 2];
        bag.forward(&tokens, Pooling::Mean, &mut y);
        let t = bag.table;
        for i in 0..2 {
            assert_relative_eq!(y[i], (2.0 * t[2][i] + t[3][i]) / 3.0, epsilon = 1e-6);
        }
        bag.backward(&tokens, Pooling::Mean, &[3.0, -3.0]);
        assert_eq!(bag.touched, [false, false, true, true, false]);
        assert_relative_eq!(bag.grad[2][0], 2.0, epsilon = 1e-6);
        assert_relative_eq!(bag.grad[3][1], -1.0, epsilon = 1e-6);
        bag.forward(&tokens, Pooling::Sum, &mut y);
        assert_relative_eq!(y[0], 2.0 * t[2][0] + t[3][0], epsilon = 1e-6);
        bag.zero_grad();
        assert!(bag.grad.iter().all(|r| r == &[0.0, 0.0]) && !bag.touched.iter().any(|&x| x));
        bag.forward(&[PAD, PAD], Pooling::Mean, &mut y);
        assert_eq!(y, [0.0, 0.0]);
    }

    #[test]
    fn a_touched_row_is_updated_and_cleared_like_a_backward_one() {
        let mut bag = EmbeddingBag::<5, 2, 0>::new();
        bag.backward(&[1], Pooling::Sum, &[1.0, 2.0]);
        bag.touch(4);
        bag.touch(9); // out of range: ignored
        assert_eq!(bag.touched, [false, true, false, false, true]);
        assert_eq!(bag.grad[4], [0.0, 0.0], "touching leaves the gradient as it is");
        bag.zero_grad();
        assert!(!bag.touched.iter().any(|&t| t));
    }
}
