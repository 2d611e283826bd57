//! The crate's error type: small values, never panics.

use core::fmt;

/// What went wrong. Every fallible operation of the crate returns this
/// instead of panicking.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// More items were offered than there is room for.
    CapacityExceeded {
        /// How many were offered.
        requested: usize,
        /// How many fit.
        capacity: usize,
    },
    /// Two inputs that must have the same length do not.
    LengthMismatch {
        /// Which input.
        what: &'static str,
        /// The length it should have.
        expected: usize,
        /// The length it has.
        got: usize,
    },
    /// An index points outside its range.
    IndexOutOfRange {
        /// Which input.
        what: &'static str,
        /// The offending index.
        index: usize,
        /// The exclusive upper bound.
        bound: usize,
    },
    /// An input or an intermediate result is NaN or infinite.
    NonFinite {
        /// Which input or quantity.
        what: &'static str,
    },
    /// A configuration value is invalid.
    InvalidConfig {
        /// Which setting and why.
        what: &'static str,
    },
    /// The top-k setting does not divide the number of cache slots.
    TopKNotDivisor {
        /// The k asked for.
        k: usize,
        /// The number of slots.
        slots: usize,
    },
    /// A fixed retrieval named a slot or candidate that is empty.
    EmptyCandidate {
        /// The query whose retrieval is invalid.
        query: usize,
    },
    /// This combination of options is not implemented.
    Unsupported {
        /// What was asked for.
        what: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::CapacityExceeded { requested, capacity } => {
                write!(f, "{requested} items offered but only {capacity} fit")
            }
            Error::LengthMismatch { what, expected, got } => {
                write!(f, "{what}: expected length {expected}, got {got}")
            }
            Error::IndexOutOfRange { what, index, bound } => {
                write!(f, "{what}: index {index} is not below {bound}")
            }
            Error::NonFinite { what } => write!(f, "{what} is NaN or infinite"),
            Error::InvalidConfig { what } => write!(f, "invalid configuration: {what}"),
            Error::TopKNotDivisor { k, slots } => {
                write!(f, "top-k {k} does not divide the {slots} cache slots")
            }
            Error::EmptyCandidate { query } => {
                write!(f, "query {query}: the fixed retrieval names an empty slot or candidate")
            }
            Error::Unsupported { what } => write!(f, "not supported: {what}"),
        }
    }
}

impl core::error::Error for Error {}

/// Shorthand for results of this crate.
pub type Result<T> = core::result::Result<T, Error>;

/// Checks that `got == expected`, naming `what` otherwise.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::LengthMismatch { what, expected, got })
    }
}
