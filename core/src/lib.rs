//! # negcache
//!
//! Training two-tower retrieval models with a negative cache (Lindgren,
//! Reddi, Guo and Kumar, "Efficient Training of Retrieval Models using
//! Negative Cache", NeurIPS 2021), without an allocator.
//!
//! The cache keeps N items with (possibly stale) embeddings. Each step
//! scores every query against the cache in one streaming pass, draws a
//! negative per query from the softmax over the cached scores, embeds only
//! the drawn negatives afresh and descends on
//! `(1 - p_pos) * (s(q, fresh negative) - s(q, positive))`, whose gradient
//! matches the full softmax gradient in expectation. The exact semantics are
//! those of `shared/spec/reference-cases.md`.
//!
//! Everything the core keeps lives in fixed-size storage chosen by const
//! generics or in memory the caller lends it; every big type has a `const
//! fn new()` so it can be placed in a `static`. All transcendental
//! arithmetic goes through `libm`, so a model trained on a microcontroller
//! and on a server follows the same numbers.
//!
//! ## Using it with your own model
//! Implement [`tower::Model`] (parameters, gradients, the score scale) and
//! [`tower::Towers`] (embed and back-propagate a query or an item, of any
//! input types) for your model, or compose one from [`layers`] with
//! [`layered::LayerTowers`]. Give your item type an [`Item::key`]. Then a
//! [`Trainer`] takes steps over a cache whose storage you own
//! ([`NegativeCache`] in a `static`, or any slices through
//! [`cache::CacheMut::from_slots`]). The [`trainer::Trainer`] docs show a
//! whole training step on a user-defined model; `examples/dense.rs` trains
//! the original library's benchmark model.
//!
//! ## Modules
//! - [`trainer`]: the training step (and the objectives it is compared
//!   against), over a caller-owned cache.
//! - [`tower`]: what a model provides ([`tower::Model`], [`tower::Towers`])
//!   and the built-in hashed-token towers.
//! - [`layered`]: two towers built from any layers over dense features.
//! - [`layers`]: layers that compose ([`layers::Layer`], [`layers::Chain`]).
//! - [`optim`]: SGD, Adam and Adagrad over a model's parameters.
//! - [`item`]: what a cache slot holds and how items are told apart.
//! - [`cache`]: the cache's slots and their update rules.
//! - [`storage`]: how the cache stores its embeddings (`f32`, bf16 or
//!   int8), chosen at run time.
//! - [`loss`]: the streaming scoring pass and the cache loss.
//! - [`remainder`]: the exact in-batch softmax with the cache's sampled
//!   remainder.
//! - [`kernel`]: the blocked scoring-and-sampling pass (and the top-k it
//!   writes), its fast `exp`, its per-query random streams, the rows of
//!   each storage as it reads them and exactly merged shards, one file per
//!   concern.
//! - [`sampler`]: how negatives are chosen among candidates.
//! - [`parallel`]: how the pass's pieces (and a corpus's) run, in turn or
//!   on the caller's threads ([`Fork`]).
//! - [`softmax`]: in-batch, sampled and full softmax, for comparison.
//! - [`random`]: random variates from a caller-supplied generator.
//! - [`retrieve`]: exact top-k over stored embeddings, in a caller's buffer.
//! - [`tokenizer`]: hashed tokens for the built-in towers.
//! - [`vector`]: small fixed-size vector operations.
//! - [`stats`]: the chi-square test used to check samplers.
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cache;
pub mod error;
pub mod item;
pub mod kernel;
pub mod layered;
pub mod layers;
pub mod loss;
mod math;
pub mod optim;
pub mod parallel;
pub mod random;
pub mod remainder;
pub mod retrieve;
pub mod sampler;
pub mod softmax;
pub mod stats;
pub mod storage;
pub mod tokenizer;
pub mod tower;
pub mod trainer;
pub mod vector;

pub use cache::{CacheMut, CacheRef, Eviction, NegativeCache, SlotsMut, Update};
pub use error::{Error, Result};
pub use item::Item;
pub use loss::{CacheLoss, ControlVariate, LossConfig, LossGrads, LossSummary, TopKOut};
pub use parallel::{Fork, Serial};
pub use retrieve::{Hit, TopK};
pub use sampler::Retrieval;
pub use tower::{Model, Towers};
pub use trainer::{Batch, Trainer, TrainerConfig};
