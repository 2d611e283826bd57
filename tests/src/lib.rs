//! Shared fixtures for the integration tests in `tests/`.

pub mod planted;
