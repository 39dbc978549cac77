//! Errors of the IR layer.

use kiln_ops::OpError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// An op rejected its inputs while tracing: names the module path, the op and the
    /// shapes involved.
    #[error("in `{path}`: {source}")]
    Shape { path: String, source: OpError },
    /// A misuse the op rules do not see (an axis out of range, an odd head_dim, …).
    #[error("in `{path}`: {op}: {reason}")]
    Trace { path: String, op: String, reason: String },
    #[error("duplicate {kind} name `{name}`")]
    DuplicateName { kind: &'static str, name: String },
    #[error("tensors from two different tracers were combined in `{path}`")]
    ForeignTensor { path: String },
    #[error("graph verification failed: {0}")]
    Verify(String),
    #[error("{line}:{col}: {msg}")]
    Parse { line: usize, col: usize, msg: String },
}
