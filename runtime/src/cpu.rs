//! The CPU reference executor.
