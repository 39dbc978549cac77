//! Runtime errors.

/// Placeholder until the CPU executor lands; its owner extends this enum.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Other(String),
}
