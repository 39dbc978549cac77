//! Horizontal fusion: one launch for several independent grid-stride kernels.
//!
//! A decode layer computes RoPE of q and appends k (with its RoPE) and v to the caches:
//! three small elementwise kernels that read the same qkv projection and none of which
//! reads another's output. Each costs a launch and a dependent wait, far more than its
//! work. [`horizontal`] renders them as one kernel: every part becomes a device function
//! (its template unchanged, its block index and grid size taken as arguments) and the
//! kernel hands each part its own range of blocks, as many as the part would have been
//! launched with alone (`Grid::Elementwise`: one thread per item, at most 2^20 blocks).
//! The parts run concurrently, so the caller must check that no part writes memory
//! another part reads or writes (the engine does, per launch, and launches the parts
//! one by one otherwise).
//!
//! Parameters: part `p`'s parameter `i` becomes [`Role::Part`]`(p, i)`, except the
//! device symbol table, which all parts share ([`Role::Syms`]). Launch over
//! [`horizontal_items`] blocks.

use crate::fused::fnv1a64;
use crate::kernels::{err, Grid, Kernel, KERNEL_MARKER};
use crate::params::{KernelSig, Role};
use crate::CodegenError;
use kiln_graph::{Graph, NodeId};
use kiln_ops::{FusedKind, Op};
use std::collections::HashSet;
use std::fmt::Write as _;

/// Most parts one horizontal kernel takes.
pub const MAX_PARTS: usize = 8;

/// What a step (a node in launch order) is to horizontal fusion
/// ([`horizontal`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HStep {
    /// A fused elementwise kernel or a fused cache append: may join a group.
    Part,
    /// Launches nothing (a view, a source): skipped, but reading a group member makes
    /// it one for the dependence check.
    View,
    /// Anything else ends a group.
    Barrier,
}

/// The horizontal groups of a step sequence: runs of 2 to [`MAX_PARTS`] consecutive
/// parts none of which reads another's output (directly or through views between
/// them); returns each run's step positions. The CUDA engine launches each run as one
/// kernel; the plan's launch list and the viewer say so. The one rule for all three.
pub fn horizontal_runs(graph: &Graph, steps: &[(NodeId, HStep)]) -> Vec<Vec<usize>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < steps.len() {
        let mut run: Vec<usize> = Vec::new();
        let mut touched: HashSet<NodeId> = HashSet::new();
        let mut j = i;
        while j < steps.len() && run.len() < MAX_PARTS {
            let (n, kind) = steps[j];
            let reads_run = graph.operands(n).iter().any(|v| touched.contains(&v.node));
            match kind {
                HStep::Part if reads_run => break,
                HStep::Part => {
                    run.push(j);
                    touched.insert(n);
                }
                HStep::View => {
                    if reads_run {
                        touched.insert(n);
                    }
                }
                HStep::Barrier => break,
            }
            j += 1;
        }
        i = if j > i && !run.is_empty() { j } else { i + 1 };
        if run.len() >= 2 {
            runs.push(run);
        }
    }
    runs
}

/// What node `n` of `graph` is to horizontal fusion: a fused elementwise group or a
/// fused cache append is a part; sources and reshapes (no launch) are views; anything
/// else is a barrier. (The engine classifies its own steps: it also knows which nodes
/// it turns into views.)
pub fn node_step(graph: &Graph, n: NodeId) -> HStep {
    match &graph.node(n).op {
        Op::Fused(b) if crate::fused::fused_append(b).is_some() => HStep::Part,
        Op::Fused(b) if matches!(b.kind(), Ok(FusedKind::Elementwise { .. })) => HStep::Part,
        Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Reshape(_) => HStep::View,
        _ => HStep::Barrier,
    }
}

/// The horizontal groups of `graph`'s nodes in topological order ([`node_step`],
/// [`horizontal_runs`]), as node lists.
pub fn graph_runs(graph: &Graph) -> Vec<Vec<NodeId>> {
    let steps: Vec<(NodeId, HStep)> = graph.topo_order().into_iter().map(|n| (n, node_step(graph, n))).collect();
    horizontal_runs(graph, &steps).into_iter().map(|run| run.into_iter().map(|i| steps[i].0).collect()).collect()
}

/// The merged role of each parameter of each part (part-major, in parameter order).
pub fn horizontal_roles(parts: &[&Kernel]) -> Vec<Vec<Role>> {
    parts
        .iter()
        .enumerate()
        .map(|(p, k)| {
            k.sig
                .params
                .iter()
                .enumerate()
                .map(|(i, prm)| if prm.role == Role::Syms { Role::Syms } else { Role::Part(p as u8, i as u8) })
                .collect()
        })
        .collect()
}

/// Blocks of a [`horizontal`] launch whose parts have `items` work items each: each
/// part's own `Grid::Elementwise` launch size (`kiln_part_blocks` in the kernel).
pub fn horizontal_items(items: &[usize], threads: u32) -> usize {
    items.iter().map(|&n| Grid::Elementwise { threads }.dims(n).0 as usize).sum()
}

/// One kernel running `parts` side by side (see the module docs). Each part must be a
/// grid-stride kernel of the same `Grid::Elementwise` block size, start with
/// `kiln_grid_entry()`, and use no shared memory, defines or manual entry; its item
/// count must be its `n` parameter ([`Role::N`]).
pub fn horizontal(parts: &[&Kernel]) -> Result<Kernel, CodegenError> {
    if !(2..=MAX_PARTS).contains(&parts.len()) {
        return err(format!("horizontal fusion: {} parts (2 to {MAX_PARTS})", parts.len()));
    }
    let Grid::Elementwise { threads } = parts[0].grid else {
        return err(format!("horizontal fusion: {} is not a grid-stride kernel", parts[0].sig.name));
    };
    let (prelude, _) = parts[0]
        .source
        .split_once(KERNEL_MARKER)
        .ok_or_else(|| CodegenError(format!("horizontal fusion: {} has no prelude", parts[0].sig.name)))?;
    let mut funcs = String::new();
    let mut params = Vec::new();
    let mut calls = String::new();
    let roles = horizontal_roles(parts);
    for (p, k) in parts.iter().enumerate() {
        let name = &k.sig.name;
        let bad = |why: &str| err(format!("horizontal fusion: part {name}: {why}"));
        if k.grid != (Grid::Elementwise { threads }) {
            return bad("not a grid-stride kernel of the first part's block size");
        }
        let Some((pre, own)) = k.source.split_once(KERNEL_MARKER) else { return bad("no prelude") };
        if pre != prelude {
            return bad("another prelude");
        }
        let sig = k.sig.signature();
        if k.dynamic_smem != 0
            || own.contains("__shared__")
            || own.contains("#define")
            || own.contains("KILN_MANUAL_ENTRY")
            || own.matches(&sig).count() != 1
            || own.matches("kiln_grid_entry();").count() != 1
        {
            return bad("uses shared memory, defines or a manual entry, or its signature or entry is not found once");
        }
        let Some(n_index) = k.sig.params.iter().position(|prm| prm.role == Role::N) else {
            return bad("no item count `n`");
        };
        let args = &sig[sig.find('(').expect("a signature has a parameter list") + 1..sig.len() - 1];
        let func = own
            .replacen(
                &sig,
                &format!("__device__ __forceinline__ void kiln_part{p}(unsigned kiln_blk, unsigned kiln_nblk, {args})"),
                1,
            )
            .replacen("kiln_grid_entry();", "// (the fused kernel waits for the previous one)", 1)
            .replace("blockIdx.x", "kiln_blk")
            .replace("gridDim.x", "kiln_nblk");
        writeln!(funcs, "// ---- part {p}: {name} ----\n{func}").expect("to a string");
        for (prm, &role) in k.sig.params.iter().zip(&roles[p]) {
            if role != Role::Syms || !params.iter().any(|(r, _)| *r == Role::Syms) {
                params.push((role, prm.ty.clone()));
            }
        }
        let names: Vec<String> = roles[p].iter().map(|r| r.c_name()).collect();
        let n = Role::Part(p as u8, n_index as u8).c_name();
        writeln!(
            calls,
            "    {{\n        const unsigned nb = kiln_part_blocks({n});\n        if (b < nb) {{\n            \
             kiln_part{p}(b, nb, {});\n            return;\n        }}\n        b -= nb;\n    }}",
            names.join(", ")
        )
        .expect("to a string");
    }
    let body = format!(
        "// The blocks of part p (as many as its own launch would have) follow those of parts < p.\n\
         __device__ __forceinline__ unsigned kiln_part_blocks(i64 n) {{\n    \
         const i64 b = (n + {threads} - 1) / {threads};\n    \
         return b < 1 ? 1u : (b > (1 << 20) ? (1u << 20) : (unsigned)b);\n}}\n\n\
         KILN_SIGNATURE {{\n    kiln_grid_entry();\n    unsigned b = blockIdx.x;\n{calls}}}\n"
    );
    let probe_sig = KernelSig::new("kiln_hfused", params.clone());
    let text = |sig: &KernelSig| {
        format!("{prelude}{KERNEL_MARKER}{funcs}{}", body.replace("KILN_SIGNATURE", &sig.signature()))
    };
    let sig = KernelSig::new(format!("kiln_hfused_{:016x}", fnv1a64(&text(&probe_sig))), params);
    let source = text(&sig);
    Ok(Kernel { sig, source, grid: Grid::BlockPerItem { threads }, dynamic_smem: 0 })
}
