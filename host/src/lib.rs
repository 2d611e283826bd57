//! The std side of negcache: data, training, evaluation, verification.
pub mod data;
pub mod eval;
pub mod memory;
pub mod reference;
