//! # kiln-passes — graph-to-graph transformations
//!
//! A [`Pass`] rewrites a [`Graph`] in place; the default [`pipeline`] is one list in one
//! file that reads top to bottom. The [`PassManager`] runs it, verifies the graph after
//! every pass (in debug and test builds, or when asked) against the pass's phase
//! [`Spec`], times each pass and keeps a snapshot of the graph after each one so that
//! tools can dump or view every stage. [`memory`] plans one arena of intermediates per
//! graph and proves the plan has no overlapping live buffers. [`fusion`] groups
//! elementwise, reduction and index-remapping ops into one [`kiln_ops::Op::Fused`] node
//! per kernel; [`matvec`] then makes a group that only feeds a weight product that
//! product's prologue.
//!
//! May depend on: `kiln-ops`, `kiln-graph`.

mod canonicalize;
pub mod fusion;
pub mod matvec;
pub mod memory;
mod pass;
pub mod pipeline;

pub use canonicalize::{ConstFold, Cse, Dce, Simplify};
pub use fusion::Fuse;
pub use matvec::{FuseEpilogue, FuseMatVec};
pub use pass::{Pass, PassError, PassManager, PassOutcome, Spec, Stage};
pub use pipeline::default_pipeline;
