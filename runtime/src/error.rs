//! Runtime errors.
