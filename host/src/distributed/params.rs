//! A model's parameter tensors walked with a closure: the parameter count
//! and the gradient all-reduce each need one pass over them in visiting
//! order.

use negcache::layers::ParamVisitor;
use negcache::tower::Model;

use crate::session::DIM;

/// One parameter tensor as the optimiser sees it.
pub(super) struct Tensor<'a> {
    /// Its values, flattened.
    pub value: &'a mut [f32],
    /// Its gradient, flattened.
    pub grad: &'a mut [f32],
    /// For an embedding table: its row length and which rows have
    /// gradients (lazy sparse update); `None` for a dense tensor.
    pub rows: Option<(usize, &'a [bool])>,
}

struct Each<F>(F);

impl<F: FnMut(Tensor<'_>)> ParamVisitor for Each<F> {
    fn dense(&mut self, value: &mut [f32], grad: &mut [f32], _: &mut [&mut [f32]]) {
        (self.0)(Tensor { value, grad, rows: None });
    }
    fn sparse(&mut self, n: usize, value: &mut [f32], grad: &mut [f32], _: &mut [&mut [f32]], touched: &[bool]) {
        (self.0)(Tensor { value, grad, rows: Some((n, touched)) });
    }
}

/// Calls `f` on every parameter tensor of `model`, in `Model::visit`'s
/// order.
pub(super) fn each_tensor<M: Model<DIM>>(model: &mut M, f: impl FnMut(Tensor<'_>)) {
    model.visit(&mut Each(f));
}

/// Parameter values: (dense, in embedding tables).
pub(super) fn count<M: Model<DIM>>(model: &mut M) -> (usize, usize) {
    let (mut dense, mut sparse) = (0, 0);
    each_tensor(model, |t| match t.rows {
        None => dense += t.value.len(),
        Some(_) => sparse += t.value.len(),
    });
    (dense, sparse)
}
