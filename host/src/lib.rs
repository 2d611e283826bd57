//! The std side of negcache: data, training, evaluation, verification.
pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod convergence;
pub mod data;
#[cfg(feature = "mpi")]
pub mod distributed;
pub mod eval;
pub mod featurize;
pub mod memory;
pub mod reference;
pub mod report;
pub mod session;
pub mod train;
