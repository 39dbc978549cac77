//! Errors of model loading and generation. Every message names the file, tensor,
//! option or prompt at fault.

use std::path::PathBuf;

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read `{path}`: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("bad config `{path}`: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("weights do not match the model:\n{0}")]
    Weights(String),
    #[error("bad weight file `{path}`: {msg}")]
    WeightFile { path: PathBuf, msg: String },
    #[error("bad GGUF file `{path}`: {msg}")]
    Gguf { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("prompt of {tokens} tokens plus {max_new} new tokens exceeds the context of {context} tokens")]
    PromptTooLong { tokens: usize, max_new: usize, context: usize },
    #[error("bad request: {0}")]
    Request(String),
    #[error(transparent)]
    Graph(#[from] kiln_graph::Error),
    #[error(transparent)]
    Runtime(#[from] kiln_runtime::error::RuntimeError),
    #[error("device `{device}`: {msg}")]
    Device { device: String, msg: String },
    /// A generation request the generator rejected (the context check maps to
    /// [`ModelError::PromptTooLong`], runtime failures to [`ModelError::Runtime`]).
    #[error(transparent)]
    Generate(kiln_runtime::generate::GenerateError),
    /// The default model could not be downloaded or installed (the message says why
    /// and how to pass a model instead).
    #[error("cannot get the default model: {0}")]
    Fetch(String),
    /// An executable plan that cannot be read, is stale or was built for another GPU.
    #[error(transparent)]
    Plan(Box<kiln_runtime::plan::PlanError>),
}
