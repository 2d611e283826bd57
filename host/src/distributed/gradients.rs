//! The gradient all-reduce (steps 8 and 9 of the module docs): the union
//! of the embedding rows any process touched, then one sum over processes
//! of the dense gradients and of the union's rows only.

use anyhow::ensure;

use super::comm::Comm;
use super::params::{count, each_tensor};
use super::replica::Replicated;
use crate::session::{BUCKETS, E};

/// The buffers of the all-reduce.
#[derive(Debug, Default)]
pub(super) struct GradientSum {
    dense_params: usize,
    bits: Vec<u32>,
    bits_all: Vec<u32>,
    grads: Vec<f32>,
    grads_sum: Vec<f32>,
}

impl GradientSum {
    /// Buffers for `model`'s shape.
    pub fn new<M: Replicated>(model: &mut M) -> Self {
        Self { dense_params: count(model).0, ..Self::default() }
    }

    /// Sums the gradients over processes, with `extra` values riding
    /// along; returns their sums. Embedding tables carry only the rows
    /// some process touched, which every process then marks as touched so
    /// that its lazy optimiser updates the same rows. Collective.
    pub fn all_reduce<M: Replicated>(
        &mut self,
        comm: &mut Comm,
        model: &mut M,
        extra: &[f32],
    ) -> anyhow::Result<Vec<f32>> {
        // Each table's touched flags as bit words.
        self.bits.clear();
        each_tensor(model, |t| {
            if let Some((_, touched)) = t.rows {
                let at = self.bits.len();
                self.bits.resize(at + touched.len().div_ceil(32), 0);
                for (r, _) in touched.iter().enumerate().filter(|(_, &t)| t) {
                    self.bits[at + r / 32] |= 1 << (r % 32);
                }
            }
        });
        self.bits_all.clear();
        self.bits_all.resize(self.bits.len(), 0);
        comm.or_u32("touched", &self.bits, &mut self.bits_all);
        let words = BUCKETS.div_ceil(32);
        for (k, table) in model.tables().iter_mut().enumerate() {
            for (i, &w) in self.bits_all[k * words..(k + 1) * words].iter().enumerate() {
                let mut w = w;
                while w != 0 {
                    table.touch(i * 32 + w.trailing_zeros() as usize);
                    w &= w - 1;
                }
            }
        }
        // Every dense gradient whole, and the touched rows of each table,
        // in visiting order.
        self.grads.clear();
        each_tensor(model, |t| match t.rows {
            None => self.grads.extend_from_slice(t.grad),
            Some((n, touched)) => {
                for (r, _) in touched.iter().enumerate().filter(|(_, &t)| t) {
                    self.grads.extend_from_slice(&t.grad[r * n..(r + 1) * n]);
                }
            }
        });
        let params = self.grads.len();
        // Every process must hand the all-reduce a buffer of one length (MPI
        // does not check): the dense tensors and the union's rows.
        let rows: u32 = self.bits_all.iter().map(|w| w.count_ones()).sum();
        ensure!(
            params == self.dense_params + rows as usize * E,
            "the gradient buffer ({params} values) is not the dense tensors ({}) and the {rows} touched rows",
            self.dense_params
        );
        self.grads.extend_from_slice(extra);
        self.grads_sum.clear();
        self.grads_sum.resize(self.grads.len(), 0.0);
        comm.sum_f32("gradients", &self.grads, &mut self.grads_sum);
        // The sums back into the gradients, in the same order.
        let mut at = 0;
        let sum = &self.grads_sum;
        let mut take = |g: &mut [f32]| {
            g.copy_from_slice(&sum[at..at + g.len()]);
            at += g.len();
        };
        each_tensor(model, |t| match t.rows {
            None => take(t.grad),
            Some((n, touched)) => {
                for (r, _) in touched.iter().enumerate().filter(|(_, &t)| t) {
                    take(&mut t.grad[r * n..(r + 1) * n]);
                }
            }
        });
        Ok(self.grads_sum[params..].to_vec())
    }
}
