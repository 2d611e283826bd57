//! Optimisers: SGD with momentum, Adam, Adagrad; global-norm clipping; lazy
//! sparse updates for embedding tables.
//!
//! Update rules for a gradient `g` (after clipping), learning rate `lr`,
//! and weight decay `wd` added to the gradient (`g' = g + wd * p`):
//!
//! - SGD: `v = mu * v + g'`, `p -= lr * v` (no state when `mu = 0`).
//! - Adam: `m = b1 m + (1 - b1) g'`, `v = b2 v + (1 - b2) g'^2`,
//!   `p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`, with `t`
//!   the number of steps taken.
//! - Adagrad: `G += g^2`, `p -= lr * g / (sqrt(G) + eps)`; `G` starts at
//!   the initial accumulator value.
//! - Clipping: `g *= c / max(|g|, c)` with `|g|` the norm over every
//!   parameter's gradient together.
//!
//! Sparse tables are updated lazily: only rows with a gradient this step
//! change, and their state too; Adam's bias correction still uses the
//! global `t`. The learning rate is passed to every step so that schedules
//! live outside. Reference values: `fixtures/optim/gen.py`.

use crate::error::{Error, Result};
use crate::layers::ParamVisitor;
use crate::math;

/// Which optimiser, with its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    /// SGD with momentum `mu`.
    Sgd {
        /// Momentum (0 for plain SGD).
        momentum: f32,
        /// L2 weight decay added to the gradient.
        weight_decay: f32,
    },
    /// Adam with bias correction.
    Adam {
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Added to the root of the second moment.
        eps: f32,
        /// L2 weight decay added to the gradient.
        weight_decay: f32,
    },
    /// Adagrad.
    Adagrad {
        /// Added to the root of the accumulator.
        eps: f32,
        /// The accumulator's starting value.
        initial_accumulator: f32,
    },
}

impl OptimizerKind {
    /// Adam with the usual defaults (0.9, 0.999, 1e-8, no decay).
    pub const ADAM: Self = Self::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };

    /// State slots needed per parameter.
    pub const fn state_slots(&self) -> usize {
        match self {
            Self::Sgd { momentum, .. } => {
                if *momentum == 0.0 {
                    0
                } else {
                    1
                }
            }
            Self::Adam { .. } => 2,
            Self::Adagrad { .. } => 1,
        }
    }
}

/// An optimiser's configuration and step count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Optimizer {
    /// The rule and its hyperparameters.
    pub kind: OptimizerKind,
    /// Clip the global gradient norm to this value (0: no clipping).
    pub clip_norm: f32,
    /// Steps taken.
    pub t: u32,
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OptimStats {
    /// The global gradient norm before clipping.
    pub grad_norm: f32,
    /// The factor applied to the gradients (1 without clipping).
    pub clip_scale: f32,
}

impl Optimizer {
    /// A fresh optimiser.
    pub const fn new(kind: OptimizerKind, clip_norm: f32) -> Self {
        Self { kind, clip_norm, t: 0 }
    }

    /// Checks that `slots` state slots suffice and prepares them (Adagrad's
    /// accumulator starts at its initial value).
    pub fn init_state(&mut self, slots: usize, params: &mut impl FnMut(&mut dyn ParamVisitor)) -> Result<()> {
        if slots < self.kind.state_slots() {
            return Err(Error::InvalidConfig {
                what: "the model has fewer optimiser-state slots than the optimiser needs",
            });
        }
        self.t = 0;
        let fill = match self.kind {
            OptimizerKind::Adagrad { initial_accumulator, .. } => initial_accumulator,
            _ => 0.0,
        };
        params(&mut Fill(fill));
        Ok(())
    }

    /// One step over every parameter the closure shows: clips, updates,
    /// and clears the gradients it consumed.
    pub fn step(&mut self, lr: f32, params: &mut impl FnMut(&mut dyn ParamVisitor)) -> Result<OptimStats> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::InvalidConfig { what: "learning rate must be finite and non-negative" });
        }
        let mut norm = Norm(0.0);
        params(&mut norm);
        let grad_norm = math::sqrt(norm.0 as f32);
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite { what: "gradient" });
        }
        let clip_scale =
            if self.clip_norm > 0.0 && grad_norm > self.clip_norm { self.clip_norm / grad_norm } else { 1.0 };
        self.t = self.t.saturating_add(1);
        params(&mut Apply { opt: *self, correction: self.bias_correction(), lr, scale: clip_scale });
        Ok(OptimStats { grad_norm, clip_scale })
    }

    /// Updates one dense slice (used by the visitors and by the reference
    /// checks): `value` from `grad * scale`, with `state` slots. Each rule
    /// is written so that the compiler vectorises it: iterators instead of
    /// indexing, and square roots by [`math::sqrt_wide`] (the same bits as
    /// `libm`'s).
    pub fn update_slice(&self, lr: f32, scale: f32, value: &mut [f32], grad: &[f32], state: &mut [&mut [f32]]) {
        self.update_corrected(self.bias_correction(), lr, scale, value, grad, state)
    }

    /// Adam's bias corrections `(1 - b1^t, 1 - b2^t)` at this step (ones
    /// for the other rules), computed once per step rather than per slice.
    fn bias_correction(&self) -> (f32, f32) {
        match self.kind {
            OptimizerKind::Adam { beta1, beta2, .. } => {
                let t = self.t.max(1) as i32;
                (1.0 - libm::powf(beta1, t as f32), 1.0 - libm::powf(beta2, t as f32))
            }
            _ => (1.0, 1.0),
        }
    }

    /// [`Self::update_slice`] with the step's bias corrections given.
    fn update_corrected(
        &self,
        (c1, c2): (f32, f32),
        lr: f32,
        scale: f32,
        value: &mut [f32],
        grad: &[f32],
        state: &mut [&mut [f32]],
    ) {
        match self.kind {
            OptimizerKind::Sgd { momentum, weight_decay } => {
                if momentum == 0.0 {
                    for (p, &g) in value.iter_mut().zip(grad) {
                        *p -= lr * (g * scale + weight_decay * *p);
                    }
                } else {
                    for ((p, &g), v) in value.iter_mut().zip(grad).zip(state[0].iter_mut()) {
                        let g = g * scale + weight_decay * *p;
                        *v = momentum * *v + g;
                        *p -= lr * *v;
                    }
                }
            }
            OptimizerKind::Adam { beta1, beta2, eps, weight_decay } => {
                let (m, rest) = state.split_at_mut(1);
                let (m, v) = (&mut *m[0], &mut *rest[0]);
                for (((p, &g), m), v) in value.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
                    let g = g * scale + weight_decay * *p;
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    *p -= lr * (*m / c1) / (math::sqrt_wide(*v / c2) + eps);
                }
            }
            OptimizerKind::Adagrad { eps, .. } => {
                for ((p, &g), a) in value.iter_mut().zip(grad).zip(state[0].iter_mut()) {
                    let g = g * scale;
                    *a += g * g;
                    *p -= lr * g / (math::sqrt_wide(*a) + eps);
                }
            }
        }
    }
}

/// Sums squared gradients (in f64, over dense tensors and touched rows).
struct Norm(f64);

/// The sum of squares of `g` in f64: eight running sums, element `i` in
/// sum `i % 8`, added up in a fixed order at the end, so that the loop
/// vectorises and every build adds in the same order. (Before, one
/// running sum: the global norm may differ from an earlier version's in
/// its last bit, which changes a run only when it clips.)
fn sum_of_squares(g: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = g.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64 * x as f64;
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += x as f64 * x as f64;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

impl ParamVisitor for Norm {
    fn dense(&mut self, _: &mut [f32], grad: &mut [f32], _: &mut [&mut [f32]]) {
        self.0 += sum_of_squares(grad);
    }
    fn sparse(&mut self, row_len: usize, _: &mut [f32], grad: &mut [f32], _: &mut [&mut [f32]], touched: &[bool]) {
        for (r, _) in touched.iter().enumerate().filter(|(_, &t)| t) {
            self.0 += sum_of_squares(&grad[r * row_len..(r + 1) * row_len]);
        }
    }
}

struct Apply {
    opt: Optimizer,
    correction: (f32, f32),
    lr: f32,
    scale: f32,
}

impl ParamVisitor for Apply {
    fn dense(&mut self, value: &mut [f32], grad: &mut [f32], state: &mut [&mut [f32]]) {
        self.opt.update_corrected(self.correction, self.lr, self.scale, value, grad, state);
        grad.fill(0.0);
    }
    fn sparse(
        &mut self,
        row_len: usize,
        value: &mut [f32],
        grad: &mut [f32],
        state: &mut [&mut [f32]],
        touched: &[bool],
    ) {
        for (r, _) in touched.iter().enumerate().filter(|(_, &t)| t) {
            let span = r * row_len..(r + 1) * row_len;
            // No optimiser uses more than two slots; a model that keeps
            // more shows them all, and the extra ones are left alone.
            let mut rows: heapless::Vec<&mut [f32], 4> =
                state.iter_mut().take(4).map(|s| &mut s[span.clone()]).collect();
            let (value, grad) = (&mut value[span.clone()], &grad[span.clone()]);
            self.opt.update_corrected(self.correction, self.lr, self.scale, value, grad, &mut rows);
        }
        // The layer clears its own gradient rows and touched flags
        // (`zero_grad`), which knows which rows it touched.
    }
}

struct Fill(f32);

impl ParamVisitor for Fill {
    fn dense(&mut self, _: &mut [f32], _: &mut [f32], state: &mut [&mut [f32]]) {
        state.iter_mut().for_each(|s| s.fill(self.0));
    }
    fn sparse(&mut self, _: usize, _: &mut [f32], _: &mut [f32], state: &mut [&mut [f32]], _: &[bool]) {
        state.iter_mut().for_each(|s| s.fill(self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn adam_first_step_moves_by_lr_times_sign() {
        // With bias correction, Adam's first step is lr * g / (|g| + eps').
        let opt = Optimizer { kind: OptimizerKind::ADAM, clip_norm: 0.0, t: 1 };
        let mut p = [1.0f32, -2.0];
        let (mut m, mut v) = ([0.0f32; 2], [0.0f32; 2]);
        opt.update_slice(0.1, 1.0, &mut p, &[0.5, -3.0], &mut [&mut m, &mut v]);
        assert_relative_eq!(p[0], 0.9, epsilon = 1e-6);
        assert_relative_eq!(p[1], -1.9, epsilon = 1e-6);
    }

    #[test]
    fn clipping_scales_to_the_bound() {
        struct One([f32; 2], [f32; 2]);
        let mut x = One([0.0; 2], [3.0, 4.0]);
        let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.0, weight_decay: 0.0 }, 1.0);
        let s = opt.step(1.0, &mut |v: &mut dyn ParamVisitor| v.dense(&mut x.0, &mut x.1, &mut [])).unwrap();
        // |g| = 5, clipped to 1: p = -(3, 4) / 5.
        assert_relative_eq!(s.grad_norm, 5.0);
        assert_relative_eq!(x.0[0], -0.6, epsilon = 1e-6);
        assert_relative_eq!(x.0[1], -0.8, epsilon = 1e-6);
        assert_eq!(x.1, [0.0, 0.0]);
    }
}
