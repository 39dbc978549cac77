//! The pass trait and the manager that runs, verifies, times and records passes.

use kiln_graph::Graph;
use kiln_ops::Op;
use std::time::{Duration, Instant};

/// What a graph must look like after a pass (checked with the verifier).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spec {
    /// Any verified graph.
    Any,
    /// No node is unreachable from the outputs (sources excepted).
    NoDeadCode,
    /// After fusion: every node is a source, a reshape view, a structured op (matmul,
    /// attention, gather, argmax, topk), a movement op, or a fused node whose body's
    /// [`kind`](kiln_ops::FusedBody::kind) is `Ok`; no bare elementwise or reduce node
    /// remains (except a reduction no fused body can express, e.g. over leading axes).
    Fused,
}

impl Spec {
    fn check(self, g: &Graph) -> Result<(), String> {
        match self {
            Spec::Any => Ok(()),
            Spec::NoDeadCode => {
                let live = crate::canonicalize::live_nodes(g);
                let dead: Vec<String> = g
                    .topo_order()
                    .into_iter()
                    .filter(|n| !live.contains(n) && removable(&g.node(*n).op))
                    .map(|n| format!("{} ({})", n.index(), g.node(n).op.name()))
                    .collect();
                if dead.is_empty() {
                    Ok(())
                } else {
                    Err(format!("dead nodes remain: {}", dead.join(", ")))
                }
            }
            Spec::Fused => crate::fusion::check_fused(g),
        }
    }
}

/// A graph-to-graph transformation.
pub trait Pass {
    /// A short lowercase name, used by `--dump-after NAME`.
    fn name(&self) -> &'static str;
    /// Rewrites `g` in place; returns how many rewrites it made.
    fn run(&self, g: &mut Graph) -> Result<usize, PassError>;
    /// What the graph satisfies afterwards.
    fn spec(&self) -> Spec {
        Spec::Any
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("pass `{pass}` failed: {msg}")]
    Failed { pass: &'static str, msg: String },
    #[error("after pass `{pass}`: {source}")]
    Verify { pass: &'static str, source: kiln_graph::Error },
    #[error("after pass `{pass}`: phase check failed: {msg}")]
    Spec { pass: &'static str, msg: String },
}

/// The graph after one pass, with what the pass did.
#[derive(Clone, Debug)]
pub struct Stage {
    pub pass: &'static str,
    pub graph: Graph,
    pub rewrites: usize,
    pub elapsed: Duration,
}

/// The result of running a pipeline.
#[derive(Clone, Debug)]
pub struct PassOutcome {
    pub graph: Graph,
    /// One entry per pass, in order (only when stages were kept).
    pub stages: Vec<Stage>,
    /// (pass, rewrites, time) for every pass.
    pub timings: Vec<(&'static str, usize, Duration)>,
}

/// Runs a list of passes.
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    verify: bool,
    keep_stages: bool,
}

impl PassManager {
    /// Verification is on in debug and test builds, off in release unless asked.
    pub fn new(passes: Vec<Box<dyn Pass>>) -> PassManager {
        PassManager { passes, verify: cfg!(debug_assertions), keep_stages: false }
    }

    pub fn verify(mut self, on: bool) -> Self {
        self.verify = on;
        self
    }

    /// Keep a copy of the graph after every pass (for dumps and the viewer).
    pub fn keep_stages(mut self, on: bool) -> Self {
        self.keep_stages = on;
        self
    }

    pub fn pass_names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    pub fn run(&self, mut g: Graph) -> Result<PassOutcome, PassError> {
        let mut stages = Vec::new();
        let mut timings = Vec::new();
        for p in &self.passes {
            let t = Instant::now();
            let rewrites = p.run(&mut g)?;
            let elapsed = t.elapsed();
            if self.verify {
                g.verify().map_err(|source| PassError::Verify { pass: p.name(), source })?;
                p.spec().check(&g).map_err(|msg| PassError::Spec { pass: p.name(), msg })?;
            }
            tracing::debug!(pass = p.name(), rewrites, ?elapsed, "pass done");
            timings.push((p.name(), rewrites, elapsed));
            if self.keep_stages {
                stages.push(Stage { pass: p.name(), graph: g.clone(), rewrites, elapsed });
            }
        }
        Ok(PassOutcome { graph: g, stages, timings })
    }
}

/// True for ops a pass may delete when unused (inputs and params are the graph's
/// interface: the feeds and weights a plan expects).
pub(crate) fn removable(op: &Op) -> bool {
    !matches!(op, Op::Input { .. } | Op::Param { .. })
}
