//! Errors of the op layer: a shape/dtype rule that rejects its inputs, or a CPU
//! evaluation that cannot proceed.

use crate::TensorType;

/// An op's shape or dtype rule rejected its inputs. Carries the op's name, the reason
/// and the input types so the message shows all shapes involved.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{op}: {reason} (inputs: {})", fmt_types(.inputs))]
pub struct OpError {
    pub op: String,
    pub reason: String,
    pub inputs: Vec<TensorType>,
}

fn fmt_types(t: &[TensorType]) -> String {
    if t.is_empty() {
        return "none".into();
    }
    t.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
}

/// Failure while evaluating an op on the CPU (a symbol without a value, an index out of
/// range, an unsupported dtype).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{op}: {reason}")]
pub struct EvalError {
    pub op: String,
    pub reason: String,
}

impl EvalError {
    pub fn new(op: impl Into<String>, reason: impl Into<String>) -> EvalError {
        EvalError { op: op.into(), reason: reason.into() }
    }
}
