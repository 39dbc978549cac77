//! Runtime errors. Every message names the thing at fault: the weight, the input, the
//! axis and symbol, or the node (with its op and module path).

use kiln_ops::{EvalError, TensorType};
use std::fmt;

/// A named tensor whose type differs from the graph's declaration.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    pub name: String,
    /// The type the graph declares.
    pub expected: TensorType,
    /// What was supplied, e.g. `bf16[4, 8]`.
    pub got: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` (expects {}, got {})", self.name, self.expected, self.got)
    }
}

fn names(v: &[String]) -> String {
    v.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// `missing `a`, `b`; unexpected `c`; <what> `w` (expects …, got …)`, empty parts left out.
fn problems(missing: &[String], unexpected: &[String], what: &str, mismatched: &[Mismatch]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing {}", names(missing)));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected {}", names(unexpected)));
    }
    if !mismatched.is_empty() {
        let m: Vec<String> = mismatched.iter().map(|m| m.to_string()).collect();
        parts.push(format!("{what} {}", m.join(", ")));
    }
    parts.join("; ")
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid graph: {0}")]
    Graph(#[from] kiln_graph::Error),
    /// Params are weights of a fixed size.
    #[error("param `{name}` has the symbolic type {ty}; params need fixed shapes")]
    SymbolicParam { name: String, ty: String },
    /// Every problem with the supplied weights at once.
    #[error("weights do not match the graph's params: {}", problems(.missing, .unexpected, "mis-shaped", .mismatched))]
    Weights { missing: Vec<String>, unexpected: Vec<String>, mismatched: Vec<Mismatch> },
    /// Every missing or unexpected feed, and every feed of the wrong dtype or rank.
    #[error("feeds do not match the graph's inputs: {}", problems(.missing, .unexpected, "mis-typed", .mismatched))]
    Feeds { missing: Vec<String>, unexpected: Vec<String>, mismatched: Vec<Mismatch> },
    /// Two input dims that are the same symbol have different sizes.
    #[error(
        "input `{input}` axis {axis}: symbol `{sym}` is {value} here but {bound} from input `{bound_input}` axis {bound_axis}"
    )]
    SymbolConflict {
        input: String,
        axis: usize,
        sym: String,
        value: usize,
        bound: usize,
        bound_input: String,
        bound_axis: usize,
    },
    /// An input dim (fixed or composite, e.g. `past + seq`) disagrees with the bound symbols.
    #[error("input `{input}` axis {axis}: size {got} does not match `{dim}` = {expected}")]
    DimMismatch { input: String, axis: usize, dim: String, expected: usize, got: usize },
    /// An input dim uses a symbol that no input dim binds on its own.
    #[error("input `{input}` axis {axis}: cannot evaluate `{dim}`: {reason}")]
    UnboundDim { input: String, axis: usize, dim: String, reason: String },
    /// A node failed to evaluate.
    #[error("node %{node} ({op}{}): {source}", if .scope.is_empty() { String::new() } else { format!(" in `{}`", .scope) })]
    Eval { node: usize, op: String, scope: String, source: EvalError },
    /// A node produced a tensor whose shape differs from its declared type (a bug in
    /// an op's CPU semantics; checked in debug builds).
    #[error("node %{node} ({op}) produced shape {got:?} but its type {ty} gives {expected:?}")]
    ShapeMismatch { node: usize, op: String, ty: String, expected: Vec<usize>, got: Vec<usize> },
    /// A device backend failed (driver, compiler or an unsupported node on that device).
    #[error("{backend}: {msg}")]
    Backend { backend: &'static str, msg: String },
}
