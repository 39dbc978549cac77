//! # kiln-models — layers and architectures in the DSL, checkpoint loading
//!
//! May depend on: `kiln-ops`, `kiln-graph`, `kiln-runtime` (and through it passes and
//! codegen).

pub mod config;
pub mod convert;
pub mod error;
pub mod fetch;
pub mod gguf;
pub mod layers;
pub mod llama;
pub mod llm;
pub mod plan;
pub mod presets;
pub mod tokenizer;
pub mod weights;

pub use error::{ModelError, Result};
