//! Tower building blocks. Each layer keeps its parameters, their gradients
//! and `S` optimiser-state slots of the same shape, all in fixed arrays;
//! forward and backward sit side by side with their formulas.
//!
//! Backward passes accumulate into the gradient buffers (`+=`), so one
//! step's examples sum up; [`crate::optim`] consumes and clears them.

pub mod activation;
pub mod dense;
pub mod embedding_bag;
pub mod layer;
pub mod mlp;
pub mod normalize;

pub use activation::Activation;
pub use dense::Dense;
pub use embedding_bag::{EmbeddingBag, Pooling, PAD};
pub use layer::{Act, Chain, Layer, Mirror, L2};
pub use mlp::Mlp;

/// What an optimiser sees of a model: each parameter tensor flattened, with
/// its gradient and its state slots.
pub trait ParamVisitor {
    /// A dense tensor: every entry is updated.
    fn dense(&mut self, value: &mut [f32], grad: &mut [f32], state: &mut [&mut [f32]]);
    /// A table of rows of `row_len` entries of which only the rows with
    /// `touched[r]` have gradients (lazy sparse update).
    fn sparse(
        &mut self,
        row_len: usize,
        value: &mut [f32],
        grad: &mut [f32],
        state: &mut [&mut [f32]],
        touched: &[bool],
    );
}
