//! Fused-group codegen (CPU only): the kernel contract (parameter order, one
//! `__global__`, no per-launch shape argument), deterministic names and sources
//! (insta snapshots of the kernel part), `lower_node` and `fused_items`, errors, and,
//! where a host C++ compiler (`g++`) is present, the generated CUDA C compiled for the
//! host with a small CUDA shim (threads, barriers, warp shuffles emulated) and run on
//! random data against the CPU reference `Op::eval` of the same fused op.

use kiln_codegen::fused::{row_threads, ROW_THREADS};
use kiln_codegen::kernels::NodeLowering;
use kiln_codegen::symbols::graph_symbols;
use kiln_codegen::{fused_items, fused_kernel, lower_node, Grid, Kernel, ParamTy, Role};
use kiln_graph::ops::{
    Bindings, DType, Dim, FusedBody, FusedKind, FusedNode, FusedRef, HostData, HostTensor, Op, Shape, Sym,
};
use kiln_graph::{Graph, TensorExt, Tracer, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

// ---- building fused groups ------------------------------------------------------------

/// A traced graph with every non-source node wrapped into ONE fused node: the sources
/// (inputs, params, constants) stay and become the group's inputs, in topological order.
/// Returns the new graph, the body, and the source op of each group input.
fn fuse_all(g: &Graph) -> (Graph, FusedBody, Vec<Op>) {
    let mut ng = Graph::new();
    let mut body = FusedBody { inputs: vec![], nodes: vec![], outputs: vec![] };
    let mut refs: HashMap<Value, FusedRef> = HashMap::new();
    let (mut operands, mut sources) = (Vec::new(), Vec::new());
    for n in g.topo_order() {
        let node = g.node(n);
        if node.op.is_source() {
            let nn = match &node.op {
                Op::Input { name, ty } => ng.add_input(name, ty.clone()).unwrap(),
                Op::Param { name, ty } => ng.add_param(name, ty.clone(), &node.scope).unwrap(),
                op => ng.add(op.clone(), &[], "").unwrap(),
            };
            refs.insert(Value::new(n, 0), FusedRef::Input(body.inputs.len() as u16));
            body.inputs.push(node.outputs[0].clone());
            operands.push(Value::new(nn, 0));
            sources.push(node.op.clone());
        } else {
            let ops = g.operands(n).iter().map(|v| refs[v]).collect();
            for k in 0..node.outputs.len() {
                refs.insert(Value::new(n, k as u8), FusedRef::Node { node: body.nodes.len() as u16, output: k as u8 });
            }
            body.nodes.push(FusedNode { op: node.op.clone(), operands: ops, outputs: node.outputs.clone() });
        }
    }
    body.outputs = g.outputs().values().map(|v| refs[v]).collect();
    let f = ng.add(Op::Fused(Box::new(body.clone())), &operands, "").unwrap();
    for (k, name) in g.outputs().keys().enumerate() {
        ng.set_output(name, Value::new(f, k as u8)).unwrap();
    }
    ng.verify().unwrap();
    (ng, body, sources)
}

fn seq() -> Dim {
    Dim::sym("seq")
}

/// Residual add + RMSNorm (bf16): outputs `residual = x + h`, `normed`.
fn rmsnorm(hidden: usize) -> Graph {
    let tr = Tracer::new();
    let shape = [Dim::fixed(2), seq(), Dim::fixed(hidden)];
    let x = tr.input("x", DType::BF16, shape.clone()).unwrap();
    let h = tr.input("h", DType::BF16, shape).unwrap();
    let w = tr.param("w", DType::BF16, [hidden]).unwrap();
    let r = x.add(h).unwrap();
    tr.output("residual", r).unwrap();
    tr.output("normed", r.rms_norm(w, 1e-6).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// RoPE in the rotate-half layout (bf16): `x [2, seq, 3, 64]`, `cos`/`sin [seq, 64]`.
fn rope() -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", DType::BF16, [Dim::fixed(2), seq(), Dim::fixed(3), Dim::fixed(64)]).unwrap();
    let cos = tr.input("cos", DType::BF16, [seq(), Dim::fixed(64)]).unwrap();
    let sin = tr.input("sin", DType::BF16, [seq(), Dim::fixed(64)]).unwrap();
    tr.output("y", x.rope(cos, sin).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// SiLU(gate) · up from two halves of one `gate_up [2, seq, 2·96]` tensor.
fn silu_up(dtype: DType) -> Graph {
    let tr = Tracer::new();
    let gu = tr.input("gate_up", dtype, [Dim::fixed(2), seq(), Dim::fixed(192)]).unwrap();
    let gate = gu.slice(-1, 0, 96).unwrap();
    let up = gu.slice(-1, 96, 192).unwrap();
    tr.output("y", gate.silu().unwrap().mul(up).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// Softmax over the last axis of `x [4, seq, keys]`.
fn softmax(dtype: DType) -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", dtype, [Dim::fixed(4), seq(), Dim::sym("keys")]).unwrap();
    tr.output("p", x.softmax(-1).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// LayerNorm (f32, two dependent reductions) plus a row-shaped output (the mean with
/// the reduced axis dropped).
fn layer_norm(hidden: usize) -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [seq(), Dim::fixed(hidden)]).unwrap();
    let w = tr.param("w", DType::F32, [hidden]).unwrap();
    let b = tr.param("b", DType::F32, [hidden]).unwrap();
    tr.output("y", x.layer_norm(w, Some(b), 1e-5).unwrap()).unwrap();
    tr.output("mean", x.mean(&[-1], false).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// Permute + reshape (merging a symbolic dim) feeding a multiply.
fn permute_reshape() -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [seq(), Dim::fixed(4), Dim::fixed(8)]).unwrap();
    let z = tr.input("z", DType::F32, [Dim::fixed(4), &seq() * &Dim::fixed(8)]).unwrap();
    let y = x.permute(&[1, 0, 2]).unwrap().reshape([Dim::fixed(4), &seq() * &Dim::fixed(8)]).unwrap();
    tr.output("y", y.mul(z).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// A reshape whose dims do not align (`[seq, 4, 6]` → `[seq, 3, 8]`), then a transpose.
fn reshape_mixed() -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", DType::BF16, [seq(), Dim::fixed(4), Dim::fixed(6)]).unwrap();
    let y = tr.input("y", DType::BF16, [Dim::fixed(8), Dim::fixed(3), seq()]).unwrap();
    let r = x.reshape([seq(), Dim::fixed(3), Dim::fixed(8)]).unwrap().permute(&[2, 1, 0]).unwrap();
    tr.output("z", r.sub(y).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// A three-way concat with symbolic offsets (a KV-cache-like `[past + seq + past, 8]`).
fn concat3() -> Graph {
    let tr = Tracer::new();
    let a = tr.input("a", DType::F32, [Dim::sym("past"), Dim::fixed(8)]).unwrap();
    let b = tr.input("b", DType::F32, [seq(), Dim::fixed(8)]).unwrap();
    tr.output("y", a.concat(&[b, a], 0).unwrap().neg().unwrap()).unwrap();
    tr.finish().unwrap()
}

/// 8-bit integer wrap-around, comparison, select and casts.
fn int_ops() -> Graph {
    let tr = Tracer::new();
    let a = tr.input("a", DType::I8, [seq(), Dim::fixed(7)]).unwrap();
    let b = tr.input("b", DType::I8, [seq(), Dim::fixed(7)]).unwrap();
    let s = a.add(b).unwrap();
    tr.output("sel", s.lt(a).unwrap().select(s, b).unwrap()).unwrap();
    tr.output("prod", s.cast(DType::I32).unwrap().mul(b.cast(DType::I32).unwrap()).unwrap()).unwrap();
    tr.finish().unwrap()
}

fn kernel_of(g: &Graph) -> (Graph, FusedBody, Vec<Op>, Kernel) {
    let (fg, body, sources) = fuse_all(g);
    let k = fused_kernel(&body, &graph_symbols(&fg)).unwrap_or_else(|e| panic!("{e}"));
    (fg, body, sources, k)
}

/// The generated part of the source (after the shared prelude).
fn kernel_part(k: &Kernel) -> &str {
    let at = k.source.find("// ---- kernel ----").expect("the prelude marker");
    &k.source[at..]
}

/// The parameter contract with the executor, and the source's shape.
#[track_caller]
fn assert_contract(body: &FusedBody, k: &Kernel) {
    let storage = |d: DType| kiln_codegen::table::storage_type(d).unwrap().to_string();
    let mut want = Vec::new();
    for (i, &r) in body.outputs.iter().enumerate() {
        let elem = storage(body.ty(r).unwrap().dtype);
        want.push((Role::Out(i as u8), ParamTy::Ptr { elem, is_const: false }));
    }
    for (i, t) in body.inputs.iter().enumerate() {
        want.push((Role::In(i as u8), ParamTy::Ptr { elem: storage(t.dtype), is_const: true }));
    }
    want.push((Role::Syms, ParamTy::Ptr { elem: "i64".into(), is_const: true }));
    want.push((Role::N, ParamTy::I64));
    let got: Vec<(Role, ParamTy)> = k.sig.params.iter().map(|p| (p.role, p.ty.clone())).collect();
    assert_eq!(got, want, "parameters");
    let name = k.sig.name.strip_prefix("kiln_fused_").expect("kiln_fused_ name");
    assert!(name.len() == 16 && name.chars().all(|c| c.is_ascii_hexdigit()), "name {}", k.sig.name);
    let src = &k.source;
    assert_eq!(src.matches("__global__").count(), 1, "one kernel");
    // Row kernels (a block per row, up to 1,024 threads) bound their registers to fit.
    let bounds = match k.grid {
        Grid::BlockPerItem { threads } => format!("__launch_bounds__({threads}) "),
        _ => String::new(),
    };
    assert!(src.contains(&format!("extern \"C\" __global__ void {bounds}{}(", k.sig.name)), "{bounds}");
    for p in ["KILN_SIGNATURE", "KILN_DIMS", "KILN_BODY"] {
        assert!(!src.contains(p), "placeholder {p} left");
    }
    let part = kernel_part(k);
    for (open, close) in [('{', '}'), ('(', ')'), ('[', ']')] {
        let mut depth = 0i64;
        for ch in part.chars() {
            if ch == open {
                depth += 1;
            } else if ch == close {
                depth -= 1;
                assert!(depth >= 0, "unbalanced `{close}`");
            }
        }
        assert_eq!(depth, 0, "unbalanced `{open}`");
    }
    for i in 0..body.inputs.len() {
        assert!(part.contains(&format!("kiln_ld({}, ", Role::In(i as u8).c_name())), "in{i} is never read");
    }
    for i in 0..body.outputs.len() {
        assert!(part.contains(&format!("kiln_st({}, ", Role::Out(i as u8).c_name())), "out{i} is never written");
    }
}

fn bind(pairs: &[(&str, usize)]) -> Bindings {
    pairs.iter().map(|&(s, v)| (Sym::new(s), v)).collect()
}

// ---- contract, snapshots, lowering ----------------------------------------------------------

#[test]
fn rmsnorm_is_one_row_kernel_with_two_outputs() {
    let (fg, body, _, k) = kernel_of(&rmsnorm(576));
    assert_contract(&body, &k);
    // One thread per column: a decode row is read in one round per pass.
    assert_eq!(k.grid, Grid::BlockPerItem { threads: 576 });
    let part = kernel_part(&k);
    assert!(part.contains("__shfl_xor_sync") && part.contains("__syncthreads"));
    // The column loops stride by a constant (so they unroll and their loads overlap).
    assert!(part.contains("constexpr int kiln_row_threads = 576;") && part.contains("j += kiln_row_threads"));
    // Exactly one reduction: one block reduction.
    assert_eq!(part.matches("if (lane == 0)").count(), 1);
    // The bf16 add is rounded before the f32 cast (as the CPU reference rounds it).
    assert!(part.contains("kiln_rnd_bf16("));
    // Sizes come from the symbol table only.
    assert_eq!(graph_symbols(&fg), vec![Sym::new("seq")]);
    assert!(part.contains("syms[0]"));
    assert_eq!(fused_items(&body, &bind(&[("seq", 5)])).unwrap(), 10);
    // Wider rows get at most 1,024 threads; narrow ones at least 64.
    let (_, _, _, wide) = kernel_of(&rmsnorm(4096));
    assert_eq!(wide.grid, Grid::BlockPerItem { threads: 1024 });
    assert_eq!((row_threads(2048), row_threads(100), row_threads(1)), (1024, 128, 64));
    insta::assert_snapshot!("rmsnorm_residual_bf16", part);
}

/// Two independent elementwise kernels as one horizontal kernel: each part a device
/// function over its own block range, parameters renamed per part with one shared
/// symbol table, one entry wait; kernels that are not grid-stride are refused by name.
#[test]
fn horizontal_fusion_runs_parts_on_their_own_blocks() {
    use kiln_codegen::horizontal::{horizontal, horizontal_items, horizontal_roles};
    let (_, _, _, a) = kernel_of(&rope());
    let (_, _, _, b) = kernel_of(&silu_up(DType::BF16));
    let h = horizontal(&[&a, &b]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.grid, Grid::BlockPerItem { threads: 256 });
    let roles = horizontal_roles(&[&a, &b]);
    assert_eq!(roles[0].len(), a.sig.params.len());
    assert!(roles.iter().flatten().filter(|r| **r == Role::Syms).count() == 2);
    let merged: Vec<Role> = h.sig.params.iter().map(|p| p.role).collect();
    assert_eq!(merged.iter().filter(|r| **r == Role::Syms).count(), 1, "one shared symbol table");
    assert_eq!(merged.len(), a.sig.params.len() + b.sig.params.len() - 1);
    assert!(merged.contains(&Role::Part(1, 0)) && merged.contains(&Role::Part(0, 0)));
    let part = kernel_part(&h);
    assert_eq!(part.matches("__device__ __forceinline__ void kiln_part").count(), 2);
    assert_eq!(part.matches("kiln_grid_entry();").count(), 1);
    assert!(h.waits_for_previous());
    // Block indices only in the dispatching kernel; parts use the ones they are given.
    assert_eq!(part.matches("blockIdx.x").count(), 1, "{part}");
    assert!(part.contains("kiln_part0(b, nb, ") && part.contains("kiln_part1(b, nb, "));
    // 1000 and 256 items: 4 + 1 blocks; an empty part still gets its block.
    assert_eq!(horizontal_items(&[1000, 256], 256), 5);
    assert_eq!(horizontal_items(&[0, 1], 256), 2);
    // Deterministic: the same parts give the same kernel.
    assert_eq!(horizontal(&[&a, &b]).unwrap(), h);
    // A row kernel is no grid-stride kernel.
    let (_, _, _, rows) = kernel_of(&rmsnorm(64));
    let e = horizontal(&[&a, &rows]).unwrap_err().0;
    assert!(e.contains(&rows.sig.name) && e.contains("grid-stride"), "{e}");
    assert!(horizontal(&[&a]).unwrap_err().0.contains("1 parts"));
    if kiln_codegen::nvrtc::nvrtc_present() {
        let c = kiln_codegen::Compiler::new((9, 0), None).unwrap();
        c.compile_all(&[&h]).unwrap_or_else(|e| panic!("{e}"));
    } else {
        println!("skipping the NVRTC compile: libnvrtc could not be loaded");
    }
}

#[test]
fn rope_is_one_elementwise_kernel() {
    let (_, body, _, k) = kernel_of(&rope());
    assert_contract(&body, &k);
    assert_eq!(k.grid, Grid::Elementwise { threads: 256 });
    let part = kernel_part(&k);
    assert!(!part.contains("__syncthreads"));
    // The concat of rotate_half is a branch; x is loaded at three places (x, x1, x2)
    // and cos/sin once each.
    assert!(part.contains("if (") && part.contains("} else {"));
    assert_eq!(part.matches("kiln_ld(in0, ").count(), 3);
    assert_eq!(part.matches("kiln_ld(in1, ").count(), 1);
    assert_eq!(part.matches("kiln_ld(in2, ").count(), 1);
    assert_eq!(fused_items(&body, &bind(&[("seq", 5)])).unwrap(), 2 * 5 * 3 * 64);
    insta::assert_snapshot!("rope_bf16", part);
}

#[test]
fn silu_up_reads_both_halves_of_one_input() {
    let (_, body, _, k) = kernel_of(&silu_up(DType::BF16));
    assert_contract(&body, &k);
    let part = kernel_part(&k);
    // gate and up: two loads of in0, one at an offset of 96 columns; the scalar 1.0 once.
    assert_eq!(part.matches("kiln_ld(in0, ").count(), 2);
    assert!(part.contains(" + 96"));
    assert_eq!(part.matches("kiln_ld(in1, 0)").count(), 1);
    assert_eq!(fused_items(&body, &bind(&[("seq", 33)])).unwrap(), 2 * 33 * 96);
    insta::assert_snapshot!("silu_up_bf16", part);
}

#[test]
fn softmax_reduces_in_dependency_order() {
    let (fg, body, _, k) = kernel_of(&softmax(DType::F32));
    assert_contract(&body, &k);
    // Symbolic columns: the fixed block size.
    assert_eq!(k.grid, Grid::BlockPerItem { threads: ROW_THREADS });
    assert_eq!(graph_symbols(&fg), vec![Sym::new("keys"), Sym::new("seq")]);
    let part = kernel_part(&k);
    // max, then sum (which reads the max): two levels, two block reductions.
    assert_eq!(part.matches("if (lane == 0)").count(), 2);
    let (max_at, sum_at) = (part.find("= -KILN_INF;").unwrap(), part.find("= 0.0f;").unwrap());
    assert!(max_at < sum_at);
    assert_eq!(fused_items(&body, &bind(&[("seq", 3), ("keys", 9)])).unwrap(), 12);
    insta::assert_snapshot!("softmax_f32", part);
}

#[test]
fn layer_norm_shares_a_level_and_writes_a_row_output() {
    let (_, body, _, k) = kernel_of(&layer_norm(64));
    assert_contract(&body, &k);
    let part = kernel_part(&k);
    // Two means of x at level 1 (one block reduction), the variance at level 2.
    assert_eq!(part.matches("if (lane == 0)").count(), 2);
    assert!(part.contains("__shared__ float kiln_sf[2][32];"));
    assert!(part.contains("if (threadIdx.x == 0)") && part.contains("kiln_st(out1, row, "));
    insta::assert_snapshot!("layer_norm_f32", part);
}

#[test]
fn movement_and_integer_bodies() {
    for g in [permute_reshape(), reshape_mixed(), concat3(), int_ops()] {
        let (_, body, _, k) = kernel_of(&g);
        assert_contract(&body, &k);
    }
    let (_, _, _, k) = kernel_of(&concat3());
    let part = kernel_part(&k);
    assert_eq!(part.matches("else if").count(), 1, "three parts: if, else if, else");
    assert!(part.contains("syms[0] + syms[1]"), "the second offset is past + seq:\n{part}");
    let (_, _, _, k) = kernel_of(&int_ops());
    assert!(kernel_part(&k).contains("(int)(signed char)("), "i8 results wrap");
}

#[test]
fn names_are_stable_hashes_of_the_source() {
    let (_, body, _, a) = kernel_of(&rope());
    let (_, _, _, b) = kernel_of(&rope());
    assert_eq!(a, b);
    let (_, _, _, c) = kernel_of(&silu_up(DType::BF16));
    let (_, _, _, d) = kernel_of(&silu_up(DType::F32));
    assert_ne!(a.sig.name, c.sig.name);
    assert_ne!(c.sig.name, d.sig.name);
    // Another symbol table order renders other C, hence another name.
    let other = fused_kernel(&body, &[Sym::new("aaa"), Sym::new("seq")]).unwrap();
    assert!(other.source.contains("syms[1]"));
    assert_ne!(other.sig.name, a.sig.name);
}

#[test]
fn lower_node_renders_the_fused_kernel() {
    let (fg, body, _, k) = kernel_of(&rmsnorm(576));
    let fused = fg.topo_order().into_iter().find(|&n| matches!(fg.node(n).op, Op::Fused(_))).unwrap();
    assert_eq!(lower_node(&fg, fused), Ok(NodeLowering::Kernel(k.clone())));
    assert_eq!(fused_kernel(&body, &graph_symbols(&fg)).unwrap(), k);
}

#[test]
fn unsupported_bodies_are_errors_naming_the_cause() {
    let f32 = |dims: &[usize]| kiln_graph::ops::TensorType::new(DType::F32, Shape::fixed(dims));
    let node = |op: Op, operands: Vec<FusedRef>, out: kiln_graph::ops::TensorType| FusedNode {
        op,
        operands: operands.into_iter().collect(),
        outputs: std::iter::once(out).collect(),
    };
    // A gather inside a group.
    let body = FusedBody {
        inputs: vec![f32(&[4, 3]), kiln_graph::ops::TensorType::new(DType::I64, Shape::fixed(&[2]))],
        nodes: vec![node(Op::Gather { axis: 0 }, vec![FusedRef::Input(0), FusedRef::Input(1)], f32(&[2, 3]))],
        outputs: vec![FusedRef::Node { node: 0, output: 0 }],
    };
    let e = fused_kernel(&body, &[]).unwrap_err();
    assert!(e.0.contains("gather") && e.0.contains("node 0"), "{e}");
    // Elementwise outputs of different shapes fit neither form.
    let body = FusedBody {
        inputs: vec![f32(&[4]), f32(&[5])],
        nodes: vec![
            node(Op::Unary(kiln_graph::ops::UnaryOp::Exp), vec![FusedRef::Input(0)], f32(&[4])),
            node(Op::Unary(kiln_graph::ops::UnaryOp::Exp), vec![FusedRef::Input(1)], f32(&[5])),
        ],
        outputs: vec![FusedRef::Node { node: 0, output: 0 }, FusedRef::Node { node: 1, output: 0 }],
    };
    let e = fused_kernel(&body, &[]).unwrap_err();
    assert!(e.0.contains("differ in shape"), "{e}");
    assert!(fused_items(&body, &Bindings::new()).is_err());
    // An fp8 value.
    let f8 = kiln_graph::ops::TensorType::new(DType::F8E4M3, Shape::fixed(&[4]));
    let body = FusedBody {
        inputs: vec![f32(&[4])],
        nodes: vec![node(Op::Cast(DType::F8E4M3), vec![FusedRef::Input(0)], f8)],
        outputs: vec![FusedRef::Node { node: 0, output: 0 }],
    };
    let e = fused_kernel(&body, &[]).unwrap_err();
    assert!(e.0.contains("f8e4m3"), "{e}");
    // A symbol missing from the table.
    let (_, body, _) = fuse_all(&rope());
    let e = fused_kernel(&body, &[]).unwrap_err();
    assert!(e.0.contains("`seq`"), "{e}");
    let e = fused_items(&body, &Bindings::new()).unwrap_err();
    assert!(e.0.contains("seq"), "{e}");
}

// ---- host emulation -------------------------------------------------------------------------

/// Compiles CUDA C as host C++: `__global__`/`__device__` vanish, `__shared__` is a
/// static (blocks run one after another), each thread of a block is a `std::thread`,
/// `__syncthreads` a barrier, `__shfl_xor_sync` an exchange through a slot per thread
/// between two barriers (every thread of the block calls it, as in the generated
/// code). f16 conversions (inline PTX) are not available.
const SHIM: &str = r#"
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <math.h>
#include <algorithm>
#include <memory>
#include <string>
#include <thread>
#include <vector>
#define __global__
#define __launch_bounds__(...)
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define asm(...) ((void)0)
struct kiln_dim3 { unsigned x, y, z; };
static thread_local kiln_dim3 threadIdx, blockIdx;
static kiln_dim3 blockDim, gridDim;
static std::barrier<>* kiln_bar = nullptr;
static std::barrier<>* kiln_wbar[32];  // one per warp: shuffles wait for their warp only
static unsigned long long kiln_slots[1024];
static inline void __syncthreads() { kiln_bar->arrive_and_wait(); }
static inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
static inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
static inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
// The attention kernels' split merge (blocks run one after another here).
static inline float kiln_f32_of(long long b) { float f; unsigned u = (unsigned)b; std::memcpy(&f, &u, 4); return f; }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
    unsigned long long o = *p;
    if (v > o) *p = v;
    return o;
}
static inline void __threadfence() {}
template <class T> static inline T __ldcg(const T* p) { return *p; }
template <class T> static T __shfl_xor_sync(unsigned, T v, int s) {
    unsigned long long x = 0;
    std::memcpy(&x, &v, sizeof(T));
    std::barrier<>* wb = kiln_wbar[threadIdx.x >> 5];
    kiln_slots[threadIdx.x] = x;
    wb->arrive_and_wait();
    unsigned long long y = kiln_slots[threadIdx.x ^ (unsigned)s];
    wb->arrive_and_wait();
    T r;
    std::memcpy(&r, &y, sizeof(T));
    return r;
}
"#;

const MAIN: &str = r#"
// Input k's memory as a kernel argument (a test prefix may redirect one, e.g. to an
// output the same launch writes first).
#ifndef KILN_IN_PTR
#define KILN_IN_PTR(k) ins[k].data()
#endif
static std::vector<unsigned char> kiln_read(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) { std::fprintf(stderr, "cannot read %s\n", path.c_str()); std::exit(2); }
    return std::vector<unsigned char>(std::istreambuf_iterator<char>(f), {});
}
template <class F> static void kiln_launch(unsigned grid, unsigned block, F f) {
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    auto run_block = [&](unsigned b) {
        std::barrier<> bar(block);
        kiln_bar = &bar;
        std::vector<std::unique_ptr<std::barrier<>>> wbars;
        for (unsigned w = 0; w * 32 < block; ++w) {
            wbars.push_back(std::make_unique<std::barrier<>>(std::min(32u, block - 32 * w)));
            kiln_wbar[w] = wbars.back().get();
        }
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; ++t) ts.emplace_back([=] { threadIdx = {t, 0, 0}; blockIdx = {b, 0, 0}; f(); });
        for (auto& th : ts) th.join();
    };
#ifdef KILN_HOST_CONCURRENT
    // Every block at once, each a process of its own (its own statics: shared memory),
    // all allocations in one shared mapping (see CONCURRENT in the tests).
    std::vector<pid_t> kids;
    for (unsigned b = 0; b < grid; ++b) {
        const pid_t pid = fork();
        if (pid < 0) { std::perror("fork"); std::exit(3); }
        if (pid == 0) {
            alarm(120);  // a block that never finishes (a spin nobody ends) fails the run
            run_block(b);
            std::fflush(nullptr);
            _exit(0);
        }
        kids.push_back(pid);
    }
    bool ok = true;
    for (pid_t p : kids) {
        int st = 0;
        waitpid(p, &st, 0);
        ok = ok && WIFEXITED(st) && WEXITSTATUS(st) == 0;
    }
    if (!ok) { std::fprintf(stderr, "a block of the concurrent launch failed or did not finish\n"); std::exit(3); }
#else
    for (unsigned b = 0; b < grid; ++b) run_block(b);
#endif
}
// argv: dir grid block n out_bytes...
int main(int argc, char** argv) {
    std::string dir = argv[1];
    unsigned grid = (unsigned)std::atoi(argv[2]), block = (unsigned)std::atoi(argv[3]);
    i64 n = std::atoll(argv[4]);
    std::vector<std::vector<unsigned char>> outs, ins;
    for (int a = 5; a < argc; ++a) outs.emplace_back((size_t)std::atoll(argv[a]) + 1, (unsigned char)0xff);
    // An output's first contents, when the test writes them (out{k}.init).
    for (size_t o = 0; o < outs.size(); ++o) {
        const std::string init = dir + "/out" + std::to_string(o) + ".init";
        if (std::ifstream(init)) {
            std::vector<unsigned char> v = kiln_read(init);
            std::memcpy(outs[o].data(), v.data(), std::min(v.size(), outs[o].size() - 1));
        }
    }
    for (int i = 0; i < KILN_N_INPUTS; ++i) ins.push_back(kiln_read(dir + "/in" + std::to_string(i) + ".bin"));
    std::vector<unsigned char> syms = kiln_read(dir + "/syms.bin");
    syms.resize(syms.size() + 8);
    // A GEMV's m and k (n is argv[4]), when the test writes them.
    i64 m = 0, k = 0;
    if (std::ifstream(dir + "/mk.bin")) {
        std::vector<unsigned char> mk = kiln_read(dir + "/mk.bin");
        std::memcpy(&m, mk.data(), 8);
        std::memcpy(&k, mk.data() + 8, 8);
    }
    (void)m;
    (void)k;
    // Scalar parameters other than m, n, k (attention sizes), in signature order, and
    // zeroed completion counters, when the test writes them.
    std::vector<i64> scal;
    if (std::ifstream(dir + "/scalars.bin")) {
        std::vector<unsigned char> v = kiln_read(dir + "/scalars.bin");
        scal.resize(v.size() / 8);
        std::memcpy(scal.data(), v.data(), scal.size() * 8);
    }
    std::vector<unsigned char> counters(1 << 16, 0);
    (void)scal;
    (void)counters;
#ifdef KILN_HOST_INIT
    KILN_HOST_INIT(ins);
#endif
    kiln_launch(grid, block, [&] { KILN_CALL; });
#ifdef KILN_HOST_PREFETCH
    kiln_prefetch_dump(dir, ins);
#endif
    // The completion counters as the kernel left them, when the test asks.
    if (std::ifstream(dir + "/dump_counters")) {
        std::ofstream f(dir + "/counters.bin", std::ios::binary);
        f.write((const char*)counters.data(), 256);
    }
    // The inputs as the kernel left them (a fused attention writes rows into its caches).
    if (std::ifstream(dir + "/dump_ins")) {
        for (size_t i = 0; i < ins.size(); ++i) {
            std::ofstream f(dir + "/in" + std::to_string(i) + ".after.bin", std::ios::binary);
            f.write((const char*)ins[i].data(), (std::streamsize)ins[i].size());
        }
    }
    for (size_t k = 0; k < outs.size(); ++k) {
        std::ofstream f(dir + "/out" + std::to_string(k) + ".bin", std::ios::binary);
        f.write((const char*)outs[k].data(), (std::streamsize)(outs[k].size() - 1));
    }
    return 0;
}
"#;

/// A host C++ compiler, or `None` after printing why the emulation is skipped.
fn host_cxx() -> Option<&'static str> {
    for cxx in ["g++", "c++", "clang++"] {
        if Command::new(cxx).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return Some(cxx);
        }
    }
    println!("skipping the host emulation: no C++ compiler (g++, c++, clang++)");
    None
}

/// The kernel compiled for the host, with its launch argument list.
struct HostKernel {
    exe: PathBuf,
    dir: PathBuf,
    kernel: Kernel,
}

fn compile_host(cxx: &str, kernel: &Kernel, tag: &str) -> HostKernel {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-fused-host").join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let mut args = Vec::new();
    let (mut n_out, mut n_scal) = (0, 0);
    // Input files: the kernel's In(k) parameters, then a chained kernel's weights (see
    // below).
    let n_in =
        kernel.sig.params.iter().filter_map(|p| if let Role::In(k) = p.role { Some(k as usize + 1) } else { None });
    let n_in = n_in.max().unwrap_or(0);
    let mut extra = 0;
    for p in &kernel.sig.params {
        args.push(match (&p.role, &p.ty) {
            (Role::Out(k), ParamTy::Ptr { elem, .. }) => {
                n_out += 1;
                format!("({elem}*)outs[{k}].data()")
            }
            (Role::In(k), ParamTy::Ptr { elem, .. }) => format!("(const {elem}*)(KILN_IN_PTR({k}))"),
            (Role::Syms, _) => "(i64*)syms.data()".to_string(),
            (Role::N, _) | (Role::MatN, _) => "n".to_string(),
            (Role::MatM, _) => "m".to_string(),
            (Role::MatK, _) => "k".to_string(),
            (Role::Counters, _) => "(unsigned int*)counters.data()".to_string(),
            // A chained kernel (`gemv_scaled_epi_warp_chain`): the next product's weight
            // is the input file after the kernel's inputs, its y the last output; the
            // product before's weight and x the two files after that, and its y the
            // kernel input KILN_C0_Y_IN (which the test defines).
            (Role::Part(1, 0), ParamTy::Ptr { elem, .. }) => {
                extra = extra.max(1);
                format!("(const {elem}*)ins[{n_in}].data()")
            }
            (Role::Part(1, 1), ParamTy::Ptr { elem, .. }) => format!("({elem}*)outs.back().data()"),
            (Role::Part(0, 0), ParamTy::Ptr { elem, .. }) => {
                extra = 3;
                format!("(const {elem}*)ins[{}].data()", n_in + 1)
            }
            (Role::Part(0, 1), ParamTy::Ptr { elem, .. }) => format!("({elem}*)ins[KILN_C0_Y_IN].data()"),
            (Role::Part(0, 2), ParamTy::Ptr { elem, .. }) => format!("(const {elem}*)ins[{}].data()", n_in + 2),
            (_, ParamTy::I64) => {
                n_scal += 1;
                format!("scal[{}]", n_scal - 1)
            }
            (_, ParamTy::I32) => {
                n_scal += 1;
                format!("(int)scal[{}]", n_scal - 1)
            }
            (_, ParamTy::F32) => {
                n_scal += 1;
                format!("kiln_f32_of(scal[{}])", n_scal - 1)
            }
            other => panic!("unexpected parameter {other:?}"),
        });
    }
    let _ = n_out;
    let call = format!("{}({})", kernel.sig.name, args.join(", "));
    let main = MAIN.replace("KILN_N_INPUTS", &(n_in + extra).to_string()).replace("KILN_CALL", &call);
    let src = dir.join("kernel.cpp");
    std::fs::write(&src, format!("{SHIM}\n{}\n{main}", kernel.source)).unwrap();
    let exe = dir.join("kernel");
    let out = Command::new(cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-w", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("run the C++ compiler");
    assert!(
        out.status.success(),
        "{tag}: the generated kernel does not compile as host C++:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    HostKernel { exe, dir, kernel: kernel.clone() }
}

/// A prelude for [`compile_host_prefixed`]: the kernel's L2 prefetches
/// (`kiln_prefetch_l2`) are recorded and written to `prefetch.txt` as `input offset`
/// lines (`-1 0` for an address in no input).
const PREFETCH_LOG: &str = r#"
#include <mutex>
static std::mutex kiln_pf_mu;
static std::vector<const void*> kiln_pf;
#define KILN_HOST_PREFETCH(p) do { std::lock_guard<std::mutex> g(kiln_pf_mu); kiln_pf.push_back(p); } while (0)
static void kiln_prefetch_dump(const std::string& dir, const std::vector<std::vector<unsigned char>>& ins) {
    std::ofstream f(dir + "/prefetch.txt");
    for (const void* p : kiln_pf) {
        const unsigned char* a = (const unsigned char*)p;
        long long in = -1, off = 0;
        for (size_t i = 0; i < ins.size(); ++i)
            if (a >= ins[i].data() && a < ins[i].data() + ins[i].size()) in = (long long)i, off = a - ins[i].data();
        f << in << " " << off << "\n";
    }
}
"#;

/// [`compile_host`] with `prefix` between the shim and the kernel.
fn compile_host_prefixed(cxx: &str, kernel: &Kernel, tag: &str, prefix: &str) -> HostKernel {
    let mut k = kernel.clone();
    k.source = format!("{prefix}\n{}", k.source);
    compile_host(cxx, &k, tag)
}

/// The prefetches a host run recorded ([`PREFETCH_LOG`]): (input, byte offset), sorted.
fn prefetched(host: &HostKernel) -> Vec<(i64, usize)> {
    let text = std::fs::read_to_string(host.dir.join("prefetch.txt")).unwrap();
    let mut v: Vec<(i64, usize)> = text
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    v.sort_unstable();
    v
}

fn bytes_of(t: &HostTensor) -> Vec<u8> {
    match t.data() {
        HostData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        HostData::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        HostData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        HostData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        HostData::I8(v) => v.iter().map(|&x| x as u8).collect(),
        HostData::U8(v) => v.clone(),
        HostData::Bool(v) => v.iter().map(|&x| x as u8).collect(),
        _ => panic!("no host bytes for {}", t.dtype()),
    }
}

fn tensor_of(dtype: DType, shape: &[usize], b: &[u8]) -> HostTensor {
    match dtype {
        DType::F32 => {
            HostTensor::from_f32(shape, b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
        }
        DType::BF16 => {
            let v = b.chunks(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect();
            HostTensor::from_f32_as(DType::BF16, shape, v)
        }
        DType::I64 => {
            HostTensor::from_i64(shape, b.chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
        }
        DType::I32 => HostTensor::from_vec(
            shape,
            b.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>(),
        ),
        DType::I8 => HostTensor::from_vec(shape, b.iter().map(|&x| x as i8).collect::<Vec<_>>()),
        DType::U8 => HostTensor::from_vec(shape, b.to_vec()),
        DType::Bool => {
            assert!(b.iter().all(|&x| x <= 1), "a bool output holds a byte other than 0/1 (unwritten?)");
            HostTensor::from_bool(shape, b.iter().map(|&x| x == 1).collect())
        }
        d => panic!("no host tensor of {d}"),
    }
}

impl HostKernel {
    /// Runs on `inputs` with the symbol values `b` (in `table` order), the launch
    /// shaped by `grid`/`block` (the kernels' grid-stride loops cover any shape).
    fn run(
        &self,
        inputs: &[HostTensor],
        table: &[Sym],
        b: &Bindings,
        body: &FusedBody,
        launch: (u32, u32),
    ) -> Vec<HostTensor> {
        for (i, t) in inputs.iter().enumerate() {
            std::fs::write(self.dir.join(format!("in{i}.bin")), bytes_of(t)).unwrap();
        }
        let syms: Vec<u8> = table.iter().flat_map(|s| (b[s] as i64).to_le_bytes()).collect();
        std::fs::write(self.dir.join("syms.bin"), syms).unwrap();
        let n = fused_items(body, b).unwrap();
        let shapes: Vec<(DType, Vec<usize>)> = body
            .outputs
            .iter()
            .map(|&r| {
                let t = body.ty(r).unwrap();
                (t.dtype, t.shape.eval(b).unwrap())
            })
            .collect();
        let mut cmd = Command::new(&self.exe);
        cmd.arg(&self.dir).arg(launch.0.to_string()).arg(launch.1.to_string()).arg(n.to_string());
        for (d, s) in &shapes {
            cmd.arg(d.bytes_for(s.iter().product()).to_string());
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}: {}", self.kernel.sig.name, String::from_utf8_lossy(&out.stderr));
        shapes
            .iter()
            .enumerate()
            .map(|(k, (d, s))| tensor_of(*d, s, &std::fs::read(self.dir.join(format!("out{k}.bin"))).unwrap()))
            .collect()
    }
}

impl HostKernel {
    /// Runs a GEMV-shaped kernel: `ins[i]` is written as `in{i}` (`None`: an empty file,
    /// for a parameter the kernel does not read), the symbol values, `m` and `k`; `n` and
    /// the outputs' byte sizes go on the command line. Returns the outputs' bytes.
    fn run_gemv(
        &self,
        ins: &[Option<&HostTensor>],
        syms: &[i64],
        mnk: (usize, usize, usize),
        launch: (usize, u32),
        outs: &[usize],
    ) -> Vec<Vec<u8>> {
        let out = self.run_gemv_output(ins, syms, mnk, launch, outs);
        assert!(out.status.success(), "{}: {}", self.kernel.sig.name, String::from_utf8_lossy(&out.stderr));
        (0..outs.len()).map(|o| std::fs::read(self.dir.join(format!("out{o}.bin"))).unwrap()).collect()
    }

    /// [`HostKernel::run_gemv`]'s run, whatever its exit.
    fn run_gemv_output(
        &self,
        ins: &[Option<&HostTensor>],
        syms: &[i64],
        (m, n, k): (usize, usize, usize),
        (grid, threads): (usize, u32),
        outs: &[usize],
    ) -> std::process::Output {
        for (i, t) in ins.iter().enumerate() {
            std::fs::write(self.dir.join(format!("in{i}.bin")), t.map(bytes_of).unwrap_or_default()).unwrap();
        }
        let syms: Vec<u8> = syms.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(self.dir.join("syms.bin"), syms).unwrap();
        let mk: Vec<u8> = [m as i64, k as i64].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(self.dir.join("mk.bin"), mk).unwrap();
        let mut cmd = Command::new(&self.exe);
        cmd.arg(&self.dir).arg(grid.to_string()).arg(threads.to_string()).arg(n.to_string());
        for o in outs {
            cmd.arg(o.to_string());
        }
        cmd.output().unwrap()
    }
}

impl HostKernel {
    /// Runs an attention-shaped kernel: `ins[i]` as `in{i}`, the symbol values, the
    /// other scalar parameters in signature order (`scalars`: i64, an f32 as its bits),
    /// zeroed completion counters; the outputs' byte sizes on the command line.
    fn run_scalars(
        &self,
        ins: &[&HostTensor],
        syms: &[i64],
        scalars: &[i64],
        (grid, threads): (usize, u32),
        outs: &[usize],
    ) -> Vec<Vec<u8>> {
        for (i, t) in ins.iter().enumerate() {
            std::fs::write(self.dir.join(format!("in{i}.bin")), bytes_of(t)).unwrap();
        }
        let le = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        std::fs::write(self.dir.join("syms.bin"), le(syms)).unwrap();
        std::fs::write(self.dir.join("scalars.bin"), le(scalars)).unwrap();
        let mut cmd = Command::new(&self.exe);
        cmd.arg(&self.dir).arg(grid.to_string()).arg(threads.to_string()).arg("0");
        for o in outs {
            cmd.arg(o.to_string());
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}: {}", self.kernel.sig.name, String::from_utf8_lossy(&out.stderr));
        (0..outs.len()).map(|o| std::fs::read(self.dir.join(format!("out{o}.bin"))).unwrap()).collect()
    }
}

/// `kernel` with its dynamic shared memory (`extern __shared__ kiln_u4 gs_dyn[]`) made a
/// static array of its size, for the host emulation (whose `__shared__` is `static`).
fn with_static_smem(kernel: &Kernel) -> Kernel {
    with_static_smem_as(kernel, "gs_dyn")
}

/// [`with_static_smem`] for the dynamic shared array `name`.
fn with_static_smem_as(kernel: &Kernel, name: &str) -> Kernel {
    let mut k = kernel.clone();
    let decl = format!("extern __shared__ kiln_u4 {name}[];");
    assert!(k.source.contains(&decl), "{}: no dynamic shared memory declaration", k.sig.name);
    k.source = k.source.replace(&decl, &format!("__shared__ kiln_u4 {name}[{}];", kernel.dynamic_smem.div_ceil(16)));
    k
}

/// Relative L2 distance of `got` from `want`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// xorshift64*: reproducible test data without extra dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

/// Values for a fused body's inputs: random (seeded) for the graph's inputs and
/// parameters, the source op's value for constants (`sources`: the body inputs' ops, in
/// the body's input order).
fn body_inputs(body: &FusedBody, sources: &[Op], b: &Bindings, seed: u64) -> Vec<HostTensor> {
    let mut r = Rng(seed);
    body.inputs
        .iter()
        .zip(sources)
        .map(|(t, src)| match src {
            Op::Input { .. } | Op::Param { .. } => random(&mut r, t.dtype, &t.shape.eval(b).unwrap()),
            op => op.eval(&[], b).unwrap().remove(0),
        })
        .collect()
}

fn random(r: &mut Rng, dtype: DType, shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    match dtype {
        d if d.is_float() => HostTensor::from_f32_as(d, shape, (0..n).map(|_| r.uniform(-3.0, 3.0)).collect()),
        DType::I8 => HostTensor::from_vec(shape, (0..n).map(|_| r.next() as i8).collect::<Vec<_>>()),
        DType::I32 => HostTensor::from_vec(shape, (0..n).map(|_| (r.next() % 2001) as i32 - 1000).collect::<Vec<_>>()),
        DType::I64 => HostTensor::from_i64(shape, (0..n).map(|_| (r.next() % 2001) as i64 - 1000).collect()),
        d => panic!("no random {d}"),
    }
}

/// `|got - want| <= atol + rtol·|want|`, NaN nowhere (outputs start as NaN/0xff bytes).
#[track_caller]
fn compare(what: &str, got: &HostTensor, want: &HostTensor, rtol: f64, atol: f64) {
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    if !got.dtype().is_float() {
        assert_eq!(got.to_i64_vec(), want.to_i64_vec(), "{what}");
        println!("host-check\t{what}\t{}\t{:?}\texact", got.dtype(), got.shape());
        return;
    }
    let mut max_abs = 0f64;
    for (i, (&a, &b)) in got.to_f32_vec().iter().zip(&want.to_f32_vec()).enumerate() {
        assert!(!a.is_nan() && !b.is_nan(), "{what}: element {i}: got {a}, want {b} (unwritten?)");
        let d = (a as f64 - b as f64).abs();
        max_abs = max_abs.max(d);
        assert!(d <= atol + rtol * (b as f64).abs(), "{what}: element {i}: got {a}, want {b}");
    }
    println!("host-check\t{what}\t{}\t{:?}\tmax_abs={max_abs:.3e}", got.dtype(), got.shape());
}

/// Emulates the fused kernel of `g` on the host at each binding and compares every
/// output with `Op::eval` of the fused op (tolerance per output dtype).
fn emulate(tag: &str, g: &Graph, bindings: &[Bindings], tol: impl Fn(DType) -> (f64, f64)) {
    let Some(cxx) = host_cxx() else { return };
    let (fg, body, sources, k) = kernel_of(g);
    let table = graph_symbols(&fg);
    let host = compile_host(cxx, &k, tag);
    // Row kernels stride their columns by the block size they are built for.
    let launch = match k.grid {
        Grid::BlockPerItem { threads } => (2, threads),
        _ => (2, 3),
    };
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let op = Op::Fused(Box::new(body.clone()));
    for b in bindings {
        let inputs: Vec<HostTensor> = body
            .inputs
            .iter()
            .zip(&sources)
            .map(|(t, src)| match src {
                Op::Input { .. } | Op::Param { .. } => random(&mut r, t.dtype, &t.shape.eval(b).unwrap()),
                op => op.eval(&[], b).unwrap().remove(0),
            })
            .collect();
        let refs: Vec<&HostTensor> = inputs.iter().collect();
        let want = op.eval(&refs, b).unwrap();
        let got = host.run(&inputs, &table, b, &body, launch);
        for (k, (gt, w)) in got.iter().zip(&want).enumerate() {
            let (rtol, atol) = tol(w.dtype());
            compare(&format!("{tag} {b:?} output {k}"), gt, w, rtol, atol);
        }
    }
}

/// One bf16 unit in the last place (relative), for values computed in a different
/// order (reductions) or with another libm.
const BF16_ULP: (f64, f64) = (1.0 / 128.0, 1e-6);

#[test]
fn host_rmsnorm_matches_the_reference() {
    let seqs = [bind(&[("seq", 1)]), bind(&[("seq", 5)]), bind(&[("seq", 33)])];
    emulate("rmsnorm576", &rmsnorm(576), &seqs, |_| BF16_ULP);
    emulate("rmsnorm2048", &rmsnorm(2048), &seqs[..2], |_| BF16_ULP);
}

#[test]
fn host_rope_matches_the_reference_exactly() {
    let seqs = [bind(&[("seq", 1)]), bind(&[("seq", 5)]), bind(&[("seq", 33)])];
    emulate("rope", &rope(), &seqs, |_| (0.0, 0.0));
}

#[test]
fn host_silu_up_matches_the_reference() {
    let seqs = [bind(&[("seq", 1)]), bind(&[("seq", 33)])];
    emulate("silu_up_bf16", &silu_up(DType::BF16), &seqs, |_| BF16_ULP);
    emulate("silu_up_f32", &silu_up(DType::F32), &seqs, |_| (1e-6, 1e-7));
}

#[test]
fn host_softmax_matches_the_reference() {
    let b = |s: usize, k: usize| bind(&[("seq", s), ("keys", k)]);
    emulate("softmax_f32", &softmax(DType::F32), &[b(1, 1), b(5, 40), b(3, 2048)], |_| (1e-5, 1e-7));
    emulate("softmax_bf16", &softmax(DType::BF16), &[b(2, 33), b(1, 576)], |_| BF16_ULP);
}

#[test]
fn host_layer_norm_matches_the_reference() {
    let seqs = [bind(&[("seq", 1)]), bind(&[("seq", 7)])];
    emulate("layer_norm", &layer_norm(96), &seqs, |_| (1e-5, 1e-5));
}

#[test]
fn host_movement_and_integer_bodies_match_exactly() {
    let seqs = [bind(&[("seq", 1)]), bind(&[("seq", 6)])];
    emulate("permute_reshape", &permute_reshape(), &seqs, |_| (0.0, 0.0));
    emulate("reshape_mixed", &reshape_mixed(), &seqs, |_| (0.0, 0.0));
    emulate("int_ops", &int_ops(), &seqs, |_| (0.0, 0.0));
    let pasts = [bind(&[("past", 0), ("seq", 3)]), bind(&[("past", 5), ("seq", 1)]), bind(&[("past", 4), ("seq", 9)])];
    emulate("concat3", &concat3(), &pasts, |_| (0.0, 0.0));
}

/// The scaled GEMV (RMSNorm as a scale after the products) compiled for the host and run
/// by the emulation: y of a 200-row weight (13 tiles, the last partial) against the
/// group's CPU reference, which rounds the normed x to bf16 before the product (the
/// kernel does not), so to bf16 rounding. Launched with one block per tile, and with 4
/// blocks that loop over the tiles (the engine launches one wave); and its streaming form
/// (`gemv_stream_scaled`: persistent blocks, here over 3 "multiprocessors").
#[test]
fn host_scaled_gemv_matches_the_reference() {
    use kiln_codegen::decode::gemv_items_with;
    let Some(cxx) = host_cxx() else { return };
    let tr = Tracer::new();
    let x = tr.input("x", DType::BF16, [Dim::fixed(1), seq(), Dim::fixed(256)]).unwrap();
    let h = x.rms_norm(tr.param("n", DType::BF16, [256]).unwrap(), 1e-6).unwrap();
    let w = tr.param("w", DType::BF16, [200, 256]).unwrap();
    // The normed x is an output of the group (the two-kernel form writes it; the scaled
    // GEMV does not).
    tr.output("normed", h).unwrap();
    tr.output("y", h.linear(w, None).unwrap()).unwrap();
    let (fg, body, sources) = fuse_all(&tr.finish().unwrap());
    let table = graph_symbols(&fg);
    let (k, cfg) = kiln_codegen::gemv_scaled_one_row(&body, &table).unwrap();
    let host = compile_host(cxx, &k, "scaled_gemv");
    let b = bind(&[("seq", 1)]);
    let inputs = body_inputs(&body, &sources, &b, 0x2545_f491_4f6c_dd1d);
    let refs: Vec<&HostTensor> = inputs.iter().collect();
    let want = Op::Fused(Box::new(body.clone())).eval(&refs, &b).unwrap();
    let y_want = want.last().unwrap();
    // Body input i is kernel parameter in{i + 1} (x itself is computed, not read).
    let ins: Vec<Option<&HostTensor>> = std::iter::once(None).chain(inputs.iter().map(Some)).collect();
    let syms: Vec<i64> = table.iter().map(|s| b[s] as i64).collect();
    // The streaming form (persistent blocks over 3 "multiprocessors"), the same outputs.
    let ks = with_static_smem(&kiln_codegen::gemv_stream_scaled(&body, &table).unwrap());
    let hs = compile_host(cxx, &ks, "scaled_gemv_stream");
    let runs = [
        (&host, &k, gemv_items_with(200, cfg)),
        (&host, &k, 4),
        (&hs, &ks, kiln_codegen::decode::gemv_stream_items(200, 3)),
    ];
    for (host, k, grid) in runs {
        let Grid::BlockPerItem { threads } = k.grid else { panic!("{:?}", k.grid) };
        // Outputs: y, the normed x (not written).
        let out = host.run_gemv(&ins, &syms, (1, 200, 256), (grid, threads), &[2 * 200, 2 * 256]);
        let (yg, yw) = (tensor_of(DType::BF16, &[1, 1, 200], &out[0]).to_f32_vec(), y_want.to_f32_vec());
        let rel = rel_l2(&yg, &yw);
        assert!(rel < 1e-2, "{}, {grid} blocks: scaled GEMV vs reference: rel L2 {rel:.3e}", k.sig.name);
        let scale = yw.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in yg.iter().zip(&yw).enumerate() {
            assert!(
                (a - b).abs() <= 3e-2 * scale,
                "{}, {grid} blocks: y[{i}]: {a} vs {b} (max |y| {scale})",
                k.sig.name
            );
        }
    }
}

/// WIP (`KILN_GREEDY_FOLD`): the scaled GEMV that also samples (`gemv_scaled_argmax`)
/// writes the same y bits as the plain one and leaves in its key the argmax of that y
/// (`kiln_before`), the lower row on a tie: rows 37 and 150 of w are both twice the row
/// with the largest y, so they tie above every other. Host emulation, one block per tile
/// and 4 looping blocks; the key decoded as `resident::step_end_key` does.
#[test]
fn host_scaled_gemv_argmax_keys_the_first_largest_y() {
    use kiln_codegen::decode::gemv_items_with;
    let Some(cxx) = host_cxx() else { return };
    let tr = Tracer::new();
    let x = tr.input("x", DType::BF16, [Dim::fixed(1), seq(), Dim::fixed(256)]).unwrap();
    let h = x.rms_norm(tr.param("n", DType::BF16, [256]).unwrap(), 1e-6).unwrap();
    let w = tr.param("w", DType::BF16, [200, 256]).unwrap();
    tr.output("normed", h).unwrap();
    tr.output("y", h.linear(w, None).unwrap()).unwrap();
    let (fg, body, sources) = fuse_all(&tr.finish().unwrap());
    let table = graph_symbols(&fg);
    let (plain, cfg) = kiln_codegen::gemv_scaled_one_row(&body, &table).unwrap();
    let (amax, acfg) = kiln_codegen::gemv_scaled_argmax(&body, &table).unwrap();
    assert_eq!(cfg, acfg);
    assert!(amax.sig.name.starts_with("kiln_gemv_scaled_amax_") && amax.source.contains("#define GV_ARGMAX 1"));
    let b = bind(&[("seq", 1)]);
    let mut inputs = body_inputs(&body, &sources, &b, 0x2545_f491_4f6c_dd1d);
    let syms: Vec<i64> = table.iter().map(|s| b[s] as i64).collect();
    let Grid::BlockPerItem { threads } = plain.grid else { panic!("{:?}", plain.grid) };
    let hp = compile_host(cxx, &plain, "scaled_gemv_for_amax");
    let ha = compile_host(cxx, &amax, "scaled_gemv_amax");
    let y_of = |host: &HostKernel, inputs: &[HostTensor], grid: usize| {
        let ins: Vec<Option<&HostTensor>> = std::iter::once(None).chain(inputs.iter().map(Some)).collect();
        std::fs::write(host.dir.join("out2.init"), [0u8; 8]).unwrap();
        host.run_gemv(&ins, &syms, (1, 200, 256), (grid, threads), &[2 * 200, 2 * 256, 8])
    };
    // The row with the largest y, doubled into rows 37 and 150.
    let y0 = tensor_of(DType::BF16, &[200], &y_of(&hp, &inputs, 4)[0]).to_f32_vec();
    let top = (0..200).fold(0, |m, i| if y0[i] > y0[m] { i } else { m });
    assert!(y0[top] > 0.0);
    let wi = inputs.len() - 1;
    let mut wv = inputs[wi].to_f32_vec();
    let row: Vec<f32> = wv[top * 256..(top + 1) * 256].iter().map(|v| 2.0 * v).collect();
    for r in [37, 150] {
        wv[r * 256..(r + 1) * 256].copy_from_slice(&row);
    }
    inputs[wi] = HostTensor::from_f32_as(DType::BF16, &[200, 256], wv);
    for grid in [gemv_items_with(200, cfg), 4] {
        let want = y_of(&hp, &inputs, grid);
        let got = y_of(&ha, &inputs, grid);
        assert_eq!(got[0], want[0], "{grid} blocks: y");
        let y = tensor_of(DType::BF16, &[200], &got[0]).to_f32_vec();
        assert_eq!(y[37], y[150]);
        assert!(
            y.iter().enumerate().all(|(i, &v)| i == 37 || i == 150 || v < y[37]),
            "{grid} blocks: rows 37/150 lead"
        );
        let key = u64::from_le_bytes(got[2][..8].try_into().unwrap());
        assert_eq!(0xffff_ffff - (key & 0xffff_ffff), 37, "{grid} blocks: key {key:#x}");
        assert_eq!((key >> 32) as u32, (y[37].to_bits() | 0x8000_0000), "{grid} blocks: the key's value");
    }
}

/// The scaled GEMV with its SwiGLU epilogue computed per warp
/// (`gemv_scaled_epi_warp`: a warp owns a column and computes its gate and up rows),
/// compiled for the host: the epilogue's output z = silu(gate) · up and y against the
/// group's CPU reference, with one block per tile and with 3 blocks looping over the 25
/// column tiles (196 columns; the one-row GEMV's 8 warps for rows of 512 bytes, so 8
/// columns per tile, the last tile partial).
#[test]
fn host_scaled_gemv_with_a_warp_epilogue_matches_the_reference() {
    let Some(cxx) = host_cxx() else { return };
    let (inter, hidden) = (196, 256);
    let (fg, body, sources) = norm_swiglu_body_sized(hidden, inter);
    let table = graph_symbols(&fg);
    let Ok(FusedKind::MatVec { epilogue: Some(form), .. }) = body.kind() else { panic!("{:?}", body.kind()) };
    let (k, cfg) = kiln_codegen::gemv_scaled_epi_warp(&body, &table).unwrap();
    assert_eq!((cfg.warps, cfg.rows_per_warp, cfg.unroll, cfg.max_rows), (8, 2, 4, 1));
    assert_eq!(kiln_codegen::gemv_epilogue_warp_items(&form, cfg), 25);
    let part = kernel_part(&k);
    assert!(part.contains("#define GV_EPI_WARP 1") && part.contains("#define GV_SCALE_LOOP 1"), "{part}");
    assert!(part.contains("const kiln_epi_yw in0 = {gv_wy, n, row0};") && !part.contains("#define GV_EPI 1"));
    let host = compile_host(cxx, &k, "scaled_gemv_epi_warp");
    let b = bind(&[("seq", 1)]);
    let inputs = body_inputs(&body, &sources, &b, 0x9e37_79b9_7f4a_7c15);
    let refs: Vec<&HostTensor> = inputs.iter().collect();
    // Outputs as traced: normed, z, y.
    let want = Op::Fused(Box::new(body.clone())).eval(&refs, &b).unwrap();
    let (z_want, y_want) = (want[1].to_f32_vec(), want[2].to_f32_vec());
    let ins: Vec<Option<&HostTensor>> = std::iter::once(None).chain(inputs.iter().map(Some)).collect();
    let syms: Vec<i64> = table.iter().map(|s| b[s] as i64).collect();
    let Grid::BlockPerItem { threads } = k.grid else { panic!("{:?}", k.grid) };
    for grid in [25, 3] {
        // Parameters out0 (z), out1 (y), out2 (normed, not written).
        let out =
            host.run_gemv(&ins, &syms, (1, 2 * inter, hidden), (grid, threads), &[2 * inter, 4 * inter, 2 * hidden]);
        let z = tensor_of(DType::BF16, &[1, 1, inter], &out[0]).to_f32_vec();
        let y = tensor_of(DType::BF16, &[1, 1, 2 * inter], &out[1]).to_f32_vec();
        for (what, got, want) in [("y", &y, &y_want), ("z", &z, &z_want)] {
            let rel = rel_l2(got, want);
            assert!(rel < 1e-2, "{grid} blocks: {what} vs reference: rel L2 {rel:.3e}");
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                assert!((a - b).abs() <= 3e-2 * scale, "{grid} blocks: {what}[{i}]: {a} vs {b} (max {scale})");
            }
        }
    }
}

/// A prefix for [`compile_host_prefixed`]: the launch runs every block at once, each a
/// process (so each has its own `__shared__` statics), with every allocation (inputs,
/// outputs, counters) in one shared mapping, so blocks that wait for each other
/// (`GV_CHAIN`) can run; a block that does not finish within 120 s fails the run.
const CONCURRENT: &str = r#"
#define KILN_HOST_CONCURRENT 1
#include <new>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
static unsigned char* kiln_arena_base() {
    static unsigned char* a = [] {
        void* p = mmap(nullptr, (size_t)1 << 30, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) std::abort();
        *(size_t*)p = 256;
        return (unsigned char*)p;
    }();
    return a;
}
static void* kiln_arena_alloc(size_t n, size_t align) {
    unsigned char* a = kiln_arena_base();
    if (align < 64) align = 64;
    const size_t need = (n + align - 1) / align * align + align;
    const size_t off = __atomic_fetch_add((size_t*)a, need, __ATOMIC_SEQ_CST);
    if (off + need > ((size_t)1 << 30)) std::abort();
    return a + (off + align - 1) / align * align;
}
void* operator new(size_t n) { return kiln_arena_alloc(n, 16); }
void* operator new[](size_t n) { return kiln_arena_alloc(n, 16); }
void* operator new(size_t n, std::align_val_t al) { return kiln_arena_alloc(n, (size_t)al); }
void* operator new[](size_t n, std::align_val_t al) { return kiln_arena_alloc(n, (size_t)al); }
void operator delete(void*) noexcept {}
void operator delete[](void*) noexcept {}
void operator delete(void*, size_t) noexcept {}
void operator delete[](void*, size_t) noexcept {}
void operator delete(void*, std::align_val_t) noexcept {}
void operator delete[](void*, std::align_val_t) noexcept {}
void operator delete(void*, size_t, std::align_val_t) noexcept {}
void operator delete[](void*, size_t, std::align_val_t) noexcept {}
"#;

/// y = x · wᵀ for one row of x (`[n, k]` bf16 w) by the plain one-row GEMV
/// (`decode::gemv_with`, the engine's split for the shape) on the host: y's bytes.
fn host_plain_gemv(cxx: &str, x: &HostTensor, w: &HostTensor, (n, k): (usize, usize), tag: &str) -> Vec<u8> {
    use kiln_codegen::decode::{gemv_items_with, gemv_with, weight_row_bytes, GemvConfig};
    let ty = kiln_graph::ops::TensorType::new(DType::BF16, Shape::fixed(&[n, k]));
    let cfg = GemvConfig::for_shape(1, weight_row_bytes(&ty));
    let gk = gemv_with(DType::BF16, DType::BF16, DType::BF16, cfg).unwrap();
    let h = compile_host(cxx, &gk, tag);
    let Grid::BlockPerItem { threads } = gk.grid else { panic!("{:?}", gk.grid) };
    h.run_gemv(&[Some(x), Some(w)], &[], (1, n, k), (gemv_items_with(n, cfg), threads), &[2 * n]).remove(0)
}

/// The unchained reference of a chained kernel over a [`norm_swiglu_body_sized`] group:
/// the per-warp epilogue kernel's outputs (z, y, the unwritten normed x: parameters out0
/// to out2) at 25 blocks, and y2 = z · w2ᵀ (`[n2, inter]`) by the plain one-row GEMV.
fn host_unchained_mlp(
    cxx: &str,
    (body, table): (&FusedBody, &[Sym]),
    ins: &[Option<&HostTensor>],
    syms: &[i64],
    w2: &HostTensor,
    tag: &str,
) -> (Vec<Vec<u8>>, Vec<u8>) {
    let Ok(FusedKind::MatVec { epilogue: Some(form), .. }) = body.kind() else { panic!("{:?}", body.kind()) };
    let (inter, hidden, n2) =
        (form.width, body.inputs.last().unwrap().shape.dims()[1].as_fixed().unwrap(), w2.shape()[0]);
    let (k, _) = kiln_codegen::gemv_scaled_epi_warp(body, table).unwrap();
    let host = compile_host(cxx, &k, &format!("{tag}_unchained"));
    let Grid::BlockPerItem { threads } = k.grid else { panic!("{:?}", k.grid) };
    let outs = [2 * inter, 4 * inter, 2 * hidden];
    let plain = host.run_gemv(ins, syms, (1, 2 * inter, hidden), (25, threads), &outs);
    let z = tensor_of(DType::BF16, &[1, inter], &plain[0]);
    let y2 = host_plain_gemv(cxx, &z, w2, (n2, inter), &format!("{tag}_plain_down"));
    (plain, y2)
}

/// `EngineOptions::mlp_chain`: the per-warp epilogue GEMV with the down projection chained
/// into its launch (`gemv_scaled_epi_warp_chain`, `GV_CHAIN` in `gemv.cu`), its blocks
/// run concurrently on the host ([`CONCURRENT`]): z and y have the bits of the unchained
/// kernel, y2 = z · w2ᵀ has the bits of the plain one-row GEMV over that z and matches an
/// f64 reference to one bf16 rounding, for launches of 25 blocks (one tile each), 3
/// (looping) and 30 (five without a tile, which only compute rows of y2); the counters
/// are zero again after every launch. Run one block after another, the first block's
/// spin gives up and the run fails instead of hanging.
#[test]
fn host_chained_gemv_computes_the_next_product_in_the_same_launch() {
    let Some(cxx) = host_cxx() else { return };
    let (inter, hidden, n2) = (200, 256, 72);
    let (fg, body, sources) = norm_swiglu_body_sized(hidden, inter);
    let table = graph_symbols(&fg);
    let (k, cfg) = kiln_codegen::gemv_scaled_epi_warp(&body, &table).unwrap();
    let (kc, ccfg) = kiln_codegen::gemv_scaled_epi_warp_chain(&body, &table, DType::BF16, DType::BF16).unwrap();
    assert_eq!(cfg, ccfg);
    let part = kernel_part(&kc);
    assert!(part.contains("#define GV_CHAIN 1") && part.contains("#define GV_CH_X out"), "{part}");
    // A chained weight of another dtype, or an epilogue width that is no whole vector: errors.
    let e = kiln_codegen::gemv_scaled_epi_warp_chain(&body, &table, DType::F32, DType::BF16).unwrap_err();
    assert!(e.0.contains("dtype"), "{e}");
    let (fg7, body7, _) = norm_swiglu_body_sized(hidden, 196);
    let e =
        kiln_codegen::gemv_scaled_epi_warp_chain(&body7, &graph_symbols(&fg7), DType::BF16, DType::BF16).unwrap_err();
    assert!(e.0.contains("16-byte vectors"), "{e}");

    let hc = compile_host_prefixed(cxx, &kc, "chain_chained", CONCURRENT);
    let b = bind(&[("seq", 1)]);
    let inputs = body_inputs(&body, &sources, &b, 0x51_7cc1_b727_220a);
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let w2 = random(&mut r, DType::BF16, &[n2, inter]);
    let syms: Vec<i64> = table.iter().map(|s| b[s] as i64).collect();
    let Grid::BlockPerItem { threads } = k.grid else { panic!("{:?}", k.grid) };
    // Parameters out0 (z), out1 (y), out2 (normed, not written); then y2.
    let outs = [2 * inter, 4 * inter, 2 * hidden];
    let ins: Vec<Option<&HostTensor>> = std::iter::once(None).chain(inputs.iter().map(Some)).collect();
    let (plain, y2_plain) = host_unchained_mlp(cxx, (&body, &table), &ins, &syms, &w2, "chain");
    let z = tensor_of(DType::BF16, &[1, inter], &plain[0]);
    let bf = |v: f64| HostTensor::from_f32_as(DType::BF16, &[1], vec![v as f32]).to_f32_vec()[0] as f64;
    let (zf, wf) = (z.to_f32_vec(), w2.to_f32_vec());
    let y2_ref: Vec<f64> =
        (0..n2).map(|j| bf((0..inter).map(|l| zf[l] as f64 * wf[j * inter + l] as f64).sum())).collect();

    let cins: Vec<Option<&HostTensor>> =
        std::iter::once(None).chain(inputs.iter().map(Some)).chain(std::iter::once(Some(&w2))).collect();
    std::fs::write(hc.dir.join("scalars.bin"), (n2 as i64).to_le_bytes()).unwrap();
    std::fs::write(hc.dir.join("dump_counters"), b"").unwrap();
    let mut couts = outs.to_vec();
    couts.push(2 * n2);
    // With block-major rows (`KILN_CHAIN_BM=1`): the same bits (3 blocks: several rows per
    // warp; 25 and 30: blocks without rows leave before the spin).
    let with_bm = |k: &Kernel| with_define(k, "GV_CH_BM", 1);
    let hbm = compile_host_prefixed(cxx, &with_bm(&kc), "chain_chained_bm", CONCURRENT);
    std::fs::write(hbm.dir.join("scalars.bin"), (n2 as i64).to_le_bytes()).unwrap();
    std::fs::write(hbm.dir.join("dump_counters"), b"").unwrap();
    for (hk, grid) in [(&hc, 25), (&hc, 3), (&hc, 30), (&hbm, 3), (&hbm, 25), (&hbm, 30)] {
        let got = hk.run_gemv(&cins, &syms, (1, 2 * inter, hidden), (grid, threads), &couts);
        assert_eq!(got[0], plain[0], "{grid} blocks: z differs from the unchained kernel's");
        assert_eq!(got[1], plain[1], "{grid} blocks: y differs from the unchained kernel's");
        assert_eq!(got[3], y2_plain, "{grid} blocks: y2 differs from the plain GEMV's over z");
        let y2 = tensor_of(DType::BF16, &[n2], &got[3]).to_f32_vec();
        for (j, (g, w)) in y2.iter().zip(&y2_ref).enumerate() {
            assert!((*g as f64 - w).abs() <= w.abs() / 64.0 + 1e-3, "{grid} blocks: y2[{j}] = {g}, want {w}");
        }
        let ctr = std::fs::read(hk.dir.join("counters.bin")).unwrap();
        assert!(ctr.iter().all(|&c| c == 0), "{grid} blocks: counters left {:?}", &ctr[..8]);
    }
    // Blocks that cannot all run at once (here: one after another) do not hang: the first
    // block's spin gives up after 2^24 pauses and aborts the run (a trap on the GPU).
    let ht = compile_host(cxx, &kc, "chain_sequential");
    std::fs::write(ht.dir.join("scalars.bin"), (n2 as i64).to_le_bytes()).unwrap();
    let out = ht.run_gemv_output(&cins, &syms, (1, 2 * inter, hidden), (3, threads), &couts);
    assert!(!out.status.success(), "a spin that cannot end should abort the run");
    // The Llama-3.2-1B shape's kernel compiles for sm_90.
    let (fg1, body1, _) = norm_swiglu_body_sized(2048, 8192);
    let (k1, _) =
        kiln_codegen::gemv_scaled_epi_warp_chain(&body1, &graph_symbols(&fg1), DType::BF16, DType::BF16).unwrap();
    std::fs::write(hc.dir.join("chain_1b.cu"), &k1.source).unwrap();
    if kiln_codegen::nvrtc::nvrtc_present() {
        let c = kiln_codegen::Compiler::new((9, 0), None).unwrap();
        c.compile_all(&[&kc, &k1, &with_bm(&k1)]).unwrap_or_else(|e| panic!("{e}"));
    } else {
        println!("skipping the NVRTC compile: libnvrtc could not be loaded");
    }
}

/// `KILN_CHAIN_HELP` (`gemv_scaled_epi_warp_chain_helped`, `GV_CH_HELP` in `gemv.cu`): the
/// warps without a row of y2 copy steps 1..H of their partner's first row into shared
/// memory before the spin, and the partner computes those steps from there. The
/// Llama-3.2-1B MLP's widths (rows of y2 of 8,192 elements: four steps of 32·8 vectors),
/// 19 rows over 3 blocks of 16 warps (warps with and without helpers), H = 2 and 3 (no
/// step after the copied ones): z and y have the bits of the unchained kernel, y2 those of
/// the plain GEMV over z, and the counters are zero after. The Llama-3.2-1B
/// kernel with H = 2 compiles for sm_90 and asks 64 KiB of dynamic shared memory.
#[test]
fn host_chained_rows_with_helper_warps_keep_their_bits() {
    let Some(cxx) = host_cxx() else { return };
    let (inter, hidden, n2) = (8192, 2048, 19);
    let (fg, body, sources) = norm_swiglu_body_sized(hidden, inter);
    let table = graph_symbols(&fg);
    let chained = |help| {
        kiln_codegen::gemv_scaled_epi_warp_chain_helped(&body, &table, DType::BF16, DType::BF16, help).unwrap().0
    };
    let e = kiln_codegen::gemv_scaled_epi_warp_chain_helped(&body, &table, DType::BF16, DType::BF16, 4).unwrap_err();
    assert!(e.0.contains("helped steps"), "{e}");
    let b = bind(&[("seq", 1)]);
    let inputs = body_inputs(&body, &sources, &b, 0x1f83_d9ab_fb41_bd6b);
    let mut r = Rng(0x5be0_cd19_137e_2179);
    let w2 = random(&mut r, DType::BF16, &[n2, inter]);
    let syms: Vec<i64> = table.iter().map(|s| b[s] as i64).collect();
    let ins: Vec<Option<&HostTensor>> = std::iter::once(None).chain(inputs.iter().map(Some)).collect();
    let (plain, y2_plain) = host_unchained_mlp(cxx, (&body, &table), &ins, &syms, &w2, "help");
    let cins: Vec<Option<&HostTensor>> =
        std::iter::once(None).chain(inputs.iter().map(Some)).chain(std::iter::once(Some(&w2))).collect();
    let outs = [2 * inter, 4 * inter, 2 * hidden, 2 * n2];
    let k0 = chained(0);
    assert_eq!(k0.dynamic_smem, 0);
    let Grid::BlockPerItem { threads } = k0.grid else { panic!("{:?}", k0.grid) };
    assert_eq!(threads, 512, "16 warps");
    for help in [2usize, 3] {
        let k = chained(help);
        assert_eq!(k.dynamic_smem as usize, 8 * help * 4096, "help {help}");
        let k = with_static_smem_as(&k, "gv_help");
        let hk = compile_host_prefixed(cxx, &k, &format!("chain_help{help}"), CONCURRENT);
        std::fs::write(hk.dir.join("scalars.bin"), (n2 as i64).to_le_bytes()).unwrap();
        std::fs::write(hk.dir.join("dump_counters"), b"").unwrap();
        let got = hk.run_gemv(&cins, &syms, (1, 2 * inter, hidden), (3, threads), &outs);
        assert_eq!(got[0], plain[0], "help {help}: z differs from the unchained kernel's");
        assert_eq!(got[1], plain[1], "help {help}: y differs from the unchained kernel's");
        assert_eq!(got[3], y2_plain, "help {help}: y2 differs from the plain GEMV's over z");
        let ctr = std::fs::read(hk.dir.join("counters.bin")).unwrap();
        assert!(ctr.iter().all(|&c| c == 0), "help {help}: counters left {:?}", &ctr[..8]);
    }
    let k2 = chained(2);
    assert_eq!(k2.dynamic_smem, 64 << 10);
    if kiln_codegen::nvrtc::nvrtc_present() {
        let c = kiln_codegen::Compiler::new((9, 0), None).unwrap();
        c.compile_all(&[&k2]).unwrap_or_else(|e| panic!("{e}"));
    } else {
        println!("skipping the NVRTC compile: libnvrtc could not be loaded");
    }
}

/// The plain GEMV (`decode::gemv_with`, the engine's split per weight shape, one and
/// three rows of x), its residual form and the streaming GEMV (one row), compiled for the
/// host: y = x · wᵀ (plus r)
/// against an f64 reference from the same bf16 values, rounded once to bf16 (the
/// residual form rounds the product, then the sum), so to one bf16 rounding of the
/// summation-order difference.
#[test]
fn host_gemv_matches_the_reference() {
    use kiln_codegen::decode::{gemv_items_with, gemv_residual, gemv_with, weight_row_bytes, GemvConfig};
    let Some(cxx) = host_cxx() else { return };
    let mut r = Rng(0x5851_f42d_4c95_7f2d);
    let bf = |v: f64| HostTensor::from_f32_as(DType::BF16, &[1], vec![v as f32]).to_f32_vec()[0] as f64;
    for (m, n, k) in [(1, 200, 576), (1, 40, 2048), (3, 70, 576)] {
        let x = random(&mut r, DType::BF16, &[m, k]);
        let w = random(&mut r, DType::BF16, &[n, k]);
        let res = random(&mut r, DType::BF16, &[m, n]);
        let (xf, wf, rf) = (x.to_f32_vec(), w.to_f32_vec(), res.to_f32_vec());
        let cfg = GemvConfig::for_shape(
            m,
            weight_row_bytes(&kiln_graph::ops::TensorType::new(DType::BF16, Shape::fixed(&[n, k]))),
        );
        let prod: Vec<f64> = (0..m * n)
            .map(|i| {
                let (row, j) = (i / n, i % n);
                bf((0..k).map(|l| xf[row * k + l] as f64 * wf[j * k + l] as f64).sum())
            })
            .collect();
        // The streaming GEMV (one row of x; persistent blocks over 3 "multiprocessors").
        if m == 1 {
            let kern =
                with_static_smem(&kiln_codegen::decode::gemv_stream(DType::BF16, DType::BF16, DType::BF16, k).unwrap());
            let host = compile_host(cxx, &kern, &format!("gemv_stream_{n}_{k}"));
            let Grid::BlockPerItem { threads } = kern.grid else { panic!("{:?}", kern.grid) };
            let grid = kiln_codegen::decode::gemv_stream_items(n, 3);
            let out = host.run_gemv(&[Some(&x), Some(&w)], &[], (m, n, k), (grid, threads), &[2 * m * n]);
            let got = tensor_of(DType::BF16, &[m, n], &out[0]).to_f32_vec();
            for (i, g) in got.iter().enumerate() {
                let tol = prod[i].abs() / 64.0 + 1e-3;
                assert!(
                    (*g as f64 - prod[i]).abs() <= tol,
                    "{} (n {n}, k {k}): y[{i}] = {g}, want {}",
                    kern.sig.name,
                    prod[i]
                );
            }
        }
        for residual in [false, true] {
            let kern = if residual {
                gemv_residual(DType::BF16, DType::BF16, DType::BF16).unwrap()
            } else {
                gemv_with(DType::BF16, DType::BF16, DType::BF16, cfg).unwrap()
            };
            let kcfg = if residual { GemvConfig::default() } else { cfg };
            let host = compile_host(cxx, &kern, &format!("gemv_{m}_{n}_{k}_{residual}"));
            let Grid::BlockPerItem { threads } = kern.grid else { panic!("{:?}", kern.grid) };
            let ins = [Some(&x), Some(&w), residual.then_some(&res)];
            let out = host.run_gemv(&ins, &[], (m, n, k), (gemv_items_with(n, kcfg), threads), &[2 * m * n]);
            let got = tensor_of(DType::BF16, &[m, n], &out[0]).to_f32_vec();
            for (i, g) in got.iter().enumerate() {
                let want = if residual { bf(prod[i] + rf[i] as f64) } else { prod[i] };
                let tol = want.abs() / 64.0 + 1e-3;
                assert!(
                    (*g as f64 - want).abs() <= tol,
                    "{} (m {m}, n {n}, k {k}): y[{i}] = {g}, want {want}",
                    kern.sig.name
                );
            }
        }
    }
}

/// `GV_RA` (`KILN_GEMV_RA`): when its warps finish, a GEMV prefetches into L2 the two
/// ranges its table entry (found by the kernel's weight pointer) names, every 128-byte
/// line of them exactly once over the launch, and nothing for a weight not in the table.
/// Host emulation with the prefetches recorded and the module globals set before the
/// launch (the ranges here lie in x and w, which the emulation can locate): a plain GEMV
/// (5 blocks, one tile each; also early and with bulk prefetches) and the looping
/// per-warp epilogue form (3 blocks).
#[test]
fn host_gemv_reads_ahead_the_table_ranges_once() {
    use kiln_codegen::decode::{gemv_items_with, gemv_with, GemvConfig};
    let Some(cxx) = host_cxx() else { return };
    let ra = |k: &Kernel| with_define(k, "GV_RA", 1);
    // Entry 0 names another weight; entry 1 the kernel's (input `w_in`): 150,000 bytes of
    // w from byte 1,000 (more lines than a round of the launch's lanes), and 1,024 bytes
    // of w from byte 100,000.
    let init = |w_in: usize| {
        format!(
            "static unsigned long long kiln_test_tab[10];
#define KILN_HOST_INIT(ins) do {{ \
    kiln_test_tab[0] = 0x1234; kiln_test_tab[1] = (unsigned long long)ins[0].data(); kiln_test_tab[2] = 1 << 20; \
    kiln_test_tab[5] = (unsigned long long)ins[{w_in}].data(); \
    kiln_test_tab[6] = (unsigned long long)(ins[{w_in}].data() + 1000); kiln_test_tab[7] = 150000; \
    kiln_test_tab[8] = (unsigned long long)(ins[{w_in}].data() + 100000); kiln_test_tab[9] = 1024; \
    kiln_ra_tab = kiln_test_tab; kiln_ra_n = 2; }} while (0)"
        )
    };
    let want = |w_in: i64| {
        let mut v: Vec<(i64, usize)> = (0..150_000usize.div_ceil(128)).map(|i| (w_in, 1000 + 128 * i)).collect();
        v.extend((0..8).map(|i| (w_in, 100_000 + 128 * i)));
        v.sort_unstable();
        v
    };
    let mut r = Rng(0x6a09_e667_f3bc_c908);
    let (n, k) = (40, 2048);
    let x = random(&mut r, DType::BF16, &[1, k]);
    let w = random(&mut r, DType::BF16, &[n, k]);
    let cfg = GemvConfig { warps: 4, rows_per_warp: 2, unroll: 2, ksplit: 1, max_rows: 1 };
    let plain = gemv_with(DType::BF16, DType::BF16, DType::BF16, cfg).unwrap();
    let kern = ra(&plain);
    let Grid::BlockPerItem { threads } = kern.grid else { panic!("{:?}", kern.grid) };
    let prefix = format!("{PREFETCH_LOG}\n{}", init(1));
    let host = compile_host_prefixed(cxx, &kern, "gemv_ra", &prefix);
    host.run_gemv(&[Some(&x), Some(&w)], &[], (1, n, k), (gemv_items_with(n, cfg), threads), &[2 * n]);
    assert_eq!(prefetched(&host), want(1), "plain GEMV");
    // Early (GV_RA 2, KILN_GEMV_RA_EARLY): the same lines, read ahead before the wait.
    let early = with_define(&plain, "GV_RA", 2);
    let host = compile_host_prefixed(cxx, &early, "gemv_ra_early", &prefix);
    host.run_gemv(&[Some(&x), Some(&w)], &[], (1, n, k), (gemv_items_with(n, cfg), threads), &[2 * n]);
    assert_eq!(prefetched(&host), want(1), "plain GEMV, early");
    // Bulk (GV_RA_BULK, KILN_GEMV_RA_BULK): a warp's share of a range in one prefetch (the
    // host emulation records its lines): the same lines, late and early.
    for (mode, tag) in [(1, "gemv_ra_bulk"), (2, "gemv_ra_bulk_early")] {
        let bulk = with_define(&with_define(&plain, "GV_RA", mode), "GV_RA_BULK", 1);
        let host = compile_host_prefixed(cxx, &bulk, tag, &prefix);
        host.run_gemv(&[Some(&x), Some(&w)], &[], (1, n, k), (gemv_items_with(n, cfg), threads), &[2 * n]);
        assert_eq!(prefetched(&host), want(1), "plain GEMV, bulk (GV_RA {mode})");
    }
    // Not in the table: entry 1 names another weight.
    let miss = prefix.replace("kiln_test_tab[5] = (unsigned long long)ins[1].data()", "kiln_test_tab[5] = 1");
    let host = compile_host_prefixed(cxx, &kern, "gemv_ra_miss", &miss);
    host.run_gemv(&[Some(&x), Some(&w)], &[], (1, n, k), (gemv_items_with(n, cfg), threads), &[2 * n]);
    assert_eq!(prefetched(&host), Vec::new(), "a weight not in the table");

    // The per-warp epilogue form: w is the group's last input.
    let (inter, hidden) = (196, 256);
    let (fg, body, sources) = norm_swiglu_body_sized(hidden, inter);
    let table = graph_symbols(&fg);
    let (kern, _) = kiln_codegen::gemv_scaled_epi_warp(&body, &table).unwrap();
    let (epiw, kern) = (kern.clone(), ra(&kern));
    let b = bind(&[("seq", 1)]);
    let inputs = body_inputs(&body, &sources, &b, 0x9e37_79b9_7f4a_7c15);
    let ins: Vec<Option<&HostTensor>> = std::iter::once(None).chain(inputs.iter().map(Some)).collect();
    let w_in = inputs.len();
    let syms: Vec<i64> = table.iter().map(|s| b[s] as i64).collect();
    let Grid::BlockPerItem { threads } = kern.grid else { panic!("{:?}", kern.grid) };
    let host = compile_host_prefixed(cxx, &kern, "epiw_ra", &format!("{PREFETCH_LOG}\n{}", init(w_in)));
    host.run_gemv(&ins, &syms, (1, 2 * inter, hidden), (3, threads), &[2 * inter, 4 * inter, 2 * hidden]);
    assert_eq!(prefetched(&host), want(w_in as i64), "per-warp epilogue form");
    // Early read-ahead is the plain GEMV's alone: the prologue forms read nothing ahead.
    let early = with_define(&epiw, "GV_RA", 2);
    let host = compile_host_prefixed(cxx, &early, "epiw_ra_early", &format!("{PREFETCH_LOG}\n{}", init(w_in)));
    host.run_gemv(&ins, &syms, (1, 2 * inter, hidden), (3, threads), &[2 * inter, 4 * inter, 2 * hidden]);
    assert_eq!(prefetched(&host), Vec::new(), "per-warp epilogue form, early");
}

/// WIP (`KILN_GREEDY_KEY`): `decode::greedy_key` then `resident::step_end_key` sample
/// like the CPU argmax (NaN first, then the largest, ties and -0 = +0 to the lower index,
/// a row of -inf gives 0), and the step end records the ids, bumps the counter and zeroes
/// the keys. Host emulation: 5 rows of 10,000 logits, 3 blocks per row.
#[test]
fn host_greedy_key_and_its_step_end_sample_like_argmax() {
    use kiln_codegen::decode::{greedy_items, greedy_key, greedy_splits};
    let Some(cxx) = host_cxx() else { return };
    let (rows, len) = (5usize, 10_000usize);
    let mut r = Rng(0x510e_527f_ade6_82d1);
    let mut v: Vec<f32> = random(&mut r, DType::F32, &[rows, len]).to_f32_vec();
    v[len + 2000] = 100.0; // row 1: the maximum twice
    v[len + 9000] = 100.0;
    v[2 * len + 7000] = f32::NAN; // row 2: NaN twice, above a large value
    v[2 * len + 5000] = f32::NAN;
    v[2 * len + 100] = 1e30;
    for x in &mut v[3 * len..4 * len] {
        *x = -1.0; // row 3: -0 (first) and +0 tie
    }
    v[3 * len + 300] = -0.0;
    v[3 * len + 8000] = 0.0;
    v[4 * len..].fill(f32::NEG_INFINITY); // row 4
    let logits = HostTensor::from_f32(&[rows, len], v);
    let argmax = Op::ArgMax { axis: 1 };
    let got = argmax.eval(&[&logits], &Bindings::default()).unwrap();
    let want: Vec<i64> = match got[0].data() {
        HostData::I64(ids) => ids.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(&want[1..], &[2000, 5000, 300, 0], "the reference's semantics");
    let gk = greedy_key().unwrap();
    assert!(gk.waits_for_previous(), "greedy_key must start with kiln_grid_entry (PDL)");
    let host = compile_host(cxx, &gk, "greedy_key");
    std::fs::write(host.dir.join("in0.bin"), bytes_of(&logits)).unwrap();
    std::fs::write(host.dir.join("syms.bin"), b"").unwrap();
    let splits = greedy_splits(len);
    assert_eq!(splits, 3);
    let le = |x: &[i64]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    std::fs::write(host.dir.join("scalars.bin"), le(&[len as i64, splits as i64])).unwrap();
    std::fs::write(host.dir.join("out0.init"), vec![0u8; 8 * rows]).unwrap();
    let Grid::BlockPerItem { threads } = gk.grid else { panic!("{:?}", gk.grid) };
    let out = Command::new(&host.exe)
        .arg(&host.dir)
        .args([greedy_items(rows, splits).to_string(), threads.to_string(), rows.to_string(), (8 * rows).to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let keys = std::fs::read(host.dir.join("out0.bin")).unwrap();

    // The step end: history [rows, 8] at count 3, the counter, the ids, the keys.
    let table = [Sym::new("past"), Sym::new("seq")];
    let se = kiln_codegen::resident::step_end_key(Sym::new("past"), Sym::new("seq"), &table).unwrap();
    assert!(se.waits_for_previous(), "step_end_key must start with kiln_grid_entry (PDL)");
    let host = compile_host(cxx, &se, "step_end_key");
    std::fs::write(host.dir.join("syms.bin"), le(&[200, 1])).unwrap();
    std::fs::write(host.dir.join("scalars.bin"), le(&[8])).unwrap();
    std::fs::write(host.dir.join("out0.init"), vec![0u8; 8 * rows * 8]).unwrap();
    std::fs::write(host.dir.join("out1.init"), le(&[3])).unwrap();
    std::fs::write(host.dir.join("out3.init"), &keys).unwrap();
    let out = Command::new(&host.exe)
        .arg(&host.dir)
        .args(["1", "32", &rows.to_string()])
        .args([8 * rows * 8, 8, 8 * rows, 8 * rows].map(|b| b.to_string()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let i64s = |k: usize| -> Vec<i64> {
        std::fs::read(host.dir.join(format!("out{k}.bin")))
            .unwrap()
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert_eq!(i64s(2), want, "ids");
    let hist = i64s(0);
    for (b, w) in want.iter().enumerate() {
        assert_eq!(hist[b * 8 + 3], *w, "history of row {b}");
        assert_eq!(hist[b * 8..b * 8 + 3], [0, 0, 0], "history of row {b} before the count");
    }
    assert_eq!(i64s(1), vec![4], "counter");
    assert_eq!(i64s(3), vec![0; rows], "keys zeroed");
}

/// The scalar parameters of decode attention kernel `k` in signature order (for
/// [`HostKernel::run_scalars`]): batch 1, `s` query rows, `h` heads over `kh` of dim `d`,
/// caches `stride` elements per batch entry, `splits`, waiting first, causal.
fn attention_scalars(
    k: &Kernel,
    (s, h, kh, d): (usize, usize, usize, usize),
    stride: usize,
    splits: usize,
    scale: f32,
) -> Vec<i64> {
    k.sig
        .params
        .iter()
        .filter_map(|p| {
            Some(match p.role {
                Role::Batch => 1,
                Role::Seq => s as i64,
                Role::Heads => h as i64,
                Role::KvHeads => kh as i64,
                Role::HeadDim | Role::ValueDim => d as i64,
                Role::KBatchStride | Role::VBatchStride => stride as i64,
                Role::Splits => splits as i64,
                Role::Early => 0,
                Role::Scale => scale.to_bits() as i64,
                Role::MaskKind => 1,
                Role::Window => 0,
                _ => return None,
            })
        })
        .collect()
}

/// `kernel` with `AD_PVW` (`KILN_ATTN_PVW`) set to `on`.
fn with_pvw(kernel: &Kernel, on: bool) -> Kernel {
    with_define(kernel, "AD_PVW", u8::from(on).into())
}

/// `kernel` with its define `name` (0 in its source: a knob off) set to `value`.
fn with_define(kernel: &Kernel, name: &str, value: u32) -> Kernel {
    let mut k = kernel.clone();
    let off = format!("#define {name} 0\n");
    assert!(k.source.contains(&off), "{}: no {off:?}", k.sig.name);
    k.source = k.source.replacen(&off, &format!("#define {name} {value}\n"), 1);
    k
}

/// Split-K decode attention (`flash_decode.cu`, bf16, head dim 64, 8 query heads over 2
/// kv heads, causal) compiled for the host, against an f64 softmax over the same bf16
/// values, for query tiles of one head and of the whole GQA group, one and two query
/// rows, and contexts that take each path of the kernel: one stage with the two-pass
/// softmax (7 and 150 keys), the streaming loop over two stages (250), and several
/// splits merged by the last block through the workspaces and counters (300 keys over
/// 3 splits: chunks of 256 and 44). CI has no GPU: this checks the kernel's logic there.
#[test]
fn host_decode_attention_matches_the_reference() {
    use kiln_codegen::decode;
    let Some(cxx) = host_cxx() else { return };
    let table = [Sym::new("past"), Sym::new("seq")];
    let keys = &Dim::sym("past") + &Dim::sym("seq");
    let (b, h, kh, d) = (1usize, 8usize, 2usize, 64usize);
    let group = h / kh;
    let scale = 0.125f32;
    let bf = |v: Vec<f32>, shape: &[usize]| HostTensor::from_f32_as(DType::BF16, shape, v);
    let mut r = Rng(0x6a09_e667_f3bc_c908);
    // Tiles of one head (also with AD_PVW: one value vector per warp, V swizzled) and of
    // the whole group.
    for (tile, pvw) in [(1, false), (1, true), (4, false)] {
        let k = with_static_smem_as(
            &with_pvw(&decode::attention_decode_tiled(DType::BF16, group, tile, &keys, &table).unwrap(), pvw),
            "s_dyn",
        );
        let host = compile_host(cxx, &k, &format!("attention_q{tile}_pvw{}", u8::from(pvw)));
        let Grid::BlockPerItem { threads } = k.grid else { panic!("{:?}", k.grid) };
        for (t, s, splits) in [(7, 1, 1), (150, 2, 1), (250, 1, 1), (300, 1, 3), (300, 2, 3)] {
            let cap = t + 2;
            let q = bf((0..b * s * h * d).map(|_| r.uniform(-2.0, 2.0)).collect(), &[b, s, h, d]);
            let kc = bf((0..b * cap * kh * d).map(|_| r.uniform(-1.0, 1.0)).collect(), &[b, cap, kh, d]);
            let vc = bf((0..b * cap * kh * d).map(|_| r.uniform(-1.0, 1.0)).collect(), &[b, cap, kh, d]);
            let scalars = attention_scalars(&k, (s, h, kh, d), cap * kh * d, splits, scale);
            let rows = b * s * h;
            let grid = decode::attention_decode_items_tiled(b, s, h, kh, splits, tile);
            let syms = [(t - s) as i64, s as i64];
            let outs = [2 * rows * d, 4 * rows * splits * d, 4 * rows * splits * 2];
            let got = host.run_scalars(&[&q, &kc, &vc], &syms, &scalars, (grid, threads), &outs);
            let got = tensor_of(DType::BF16, &[rows * d], &got[0]).to_f32_vec();
            let (qf, kf, vf) = (q.to_f32_vec(), kc.to_f32_vec(), vc.to_f32_vec());
            let mut want = vec![0f32; rows * d];
            for i in 0..s {
                let pos = t - s + i;
                for hh in 0..h {
                    let g = hh / group;
                    let qrow = &qf[(i * h + hh) * d..][..d];
                    let sc: Vec<f64> = (0..=pos)
                        .map(|j| {
                            let krow = &kf[(j * kh + g) * d..][..d];
                            scale as f64 * qrow.iter().zip(krow).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    for e in 0..d {
                        let o: f64 = (0..=pos).map(|j| (sc[j] - m).exp() / z * vf[(j * kh + g) * d + e] as f64).sum();
                        want[(i * h + hh) * d + e] = o as f32;
                    }
                }
            }
            let rel = rel_l2(&got, &want);
            println!(
                "host-check\tdecode_attention\ttile={tile}\tpvw={pvw}\tt={t}\ts={s}\tsplits={splits}\trel_l2={rel:.3e}"
            );
            assert!(rel < 1e-2, "tile {tile} (pvw {pvw}), t {t}, s {s}, splits {splits}: rel L2 {rel:.3e}");
        }
    }
}

/// Decode attention that computes its producers (`attention_decode_fused`: RoPE of q,
/// the new K/V rows of the cache appends) compiled for the host, against the plain
/// kernel run on the producers' values as the CPU reference computes them: the same
/// output bits (the value blocks round as the reference does), and the launch's own K/V rows written into the caches by query tile 0 equal to the
/// appends' rows (the cached rows untouched), for tiles of the whole GQA group and of
/// one head, one and two new rows, and each path: one stage (two-pass), the new row in
/// the second stage of the streaming loop (250 keys), and a split merge (300 keys).
#[test]
fn host_fused_decode_attention_matches_the_plain_kernel() {
    use kiln_codegen::decode::{attention_decode_fused, attention_decode_items_tiled, attention_decode_tiled};
    let Some(cxx) = host_cxx() else { return };
    let g = common::attention_layer(DType::BF16);
    let table = graph_symbols(&g);
    let common::AttentionParts { q: qb, k: kb, v: vb, keys, .. } = common::attention_parts(&g);
    let (h, kh, d, group) = (6usize, 2usize, 64usize, 3usize);
    let kpast = kiln_codegen::fused_append(&kb).unwrap().past_input;
    let vpast = kiln_codegen::fused_append(&vb).unwrap().past_input;
    let mut r = Rng(0xbb67_ae85_84ca_a73b);
    // (Tile 1 also with AD_PVW: the new V rows swizzled in the stage like the copied ones.)
    for (tile, pvw) in [(3, false), (1, false), (1, true)] {
        let fk = with_static_smem_as(
            &with_pvw(&attention_decode_fused(DType::BF16, group, tile, &keys, &table, &qb, &kb, &vb).unwrap(), pvw),
            "s_dyn",
        );
        let pk = with_static_smem_as(
            &with_pvw(&attention_decode_tiled(DType::BF16, group, tile, &keys, &table).unwrap(), pvw),
            "s_dyn",
        );
        let pv = u8::from(pvw);
        let (hf, hp) = (
            compile_host(cxx, &fk, &format!("attn_fused_q{tile}_pvw{pv}")),
            compile_host(cxx, &pk, &format!("attn_plain_q{tile}_pvw{pv}")),
        );
        std::fs::write(hf.dir.join("dump_ins"), b"1").unwrap();
        let Grid::BlockPerItem { threads } = fk.grid else { panic!("{:?}", fk.grid) };
        for (t, s, splits) in [(7, 1, 1), (150, 2, 1), (250, 1, 1), (300, 1, 3), (250, 2, 1)] {
            let past = t - s;
            let b = bind(&[("batch", 1), ("seq", s), ("past", past)]);
            let syms: Vec<i64> = table.iter().map(|x| b[x] as i64).collect();
            // The producers' inputs: random, the caches' first `past` rows random.
            let draw = |r: &mut Rng, body: &FusedBody| -> Vec<HostTensor> {
                body.inputs.iter().map(|t| random(r, t.dtype, &t.shape.eval(&b).unwrap())).collect()
            };
            let (qi, ki, vi) = (draw(&mut r, &qb), draw(&mut r, &kb), draw(&mut r, &vb));
            let eval = |body: &FusedBody, ins: &[HostTensor]| {
                let refs: Vec<&HostTensor> = ins.iter().collect();
                Op::Fused(Box::new(body.clone())).eval(&refs, &b).unwrap().remove(0)
            };
            let (qv, kp, vp) = (eval(&qb, &qi), eval(&kb, &ki), eval(&vb, &vi));
            let scalars = |k: &Kernel| attention_scalars(k, (s, h, kh, d), t * kh * d, splits, 0.125);
            let rows = s * h;
            let grid = attention_decode_items_tiled(1, s, h, kh, splits, tile);
            let outs = [2 * rows * d, 4 * rows * splits * d, 4 * rows * splits * 2];
            // Plain: q and the full caches (the appends' outputs, t rows) from the CPU.
            let want = hp.run_scalars(&[&qv, &kp, &vp], &syms, &scalars(&pk), (grid, threads), &outs);
            // Fused: the caches hold the past rows, then NaN where the new rows go.
            let mut ins: Vec<HostTensor> = qi.iter().chain(&ki).chain(&vi).cloned().collect();
            for (at, present) in [(qi.len() + kpast, &kp), (qi.len() + ki.len() + vpast, &vp)] {
                let mut rows_f = present.to_f32_vec();
                rows_f[past * kh * d..].fill(f32::NAN);
                ins[at] = HostTensor::from_f32_as(DType::BF16, &[1, t, kh, d], rows_f);
            }
            let refs: Vec<&HostTensor> = ins.iter().collect();
            let got = hf.run_scalars(&refs, &syms, &scalars(&fk), (grid, threads), &outs);
            let (yg, yw) = (
                tensor_of(DType::BF16, &[rows * d], &got[0]).to_f32_vec(),
                tensor_of(DType::BF16, &[rows * d], &want[0]).to_f32_vec(),
            );
            let rel = rel_l2(&yg, &yw);
            println!("host-check\tfused_decode_attention\ttile={tile}\tt={t}\ts={s}\tsplits={splits}\trel_l2={rel:.3e}\tbitwise={}", yg == yw);
            assert!(
                yg == yw,
                "tile {tile} (pvw {pvw}), t {t}, s {s}, splits {splits}: fused vs plain rel L2 {rel:.3e}"
            );
            for (at, present, what) in [(qi.len() + kpast, &kp, "k"), (qi.len() + ki.len() + vpast, &vp, "v")] {
                let after = tensor_of(
                    DType::BF16,
                    &[1, t, kh, d],
                    &std::fs::read(hf.dir.join(format!("in{at}.after.bin"))).unwrap(),
                );
                compare(
                    &format!("tile {tile}, t {t}, s {s}: the {what} cache after the launch"),
                    &after,
                    present,
                    BF16_ULP.0,
                    BF16_ULP.1,
                );
            }
        }
    }
}

/// RMSNorm feeding `x · wᵀ` as one matrix-vector group: the body ends in the matmul, the
/// weight is the last input, x (the normed rows) an output before y.
fn norm_linear() -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", DType::BF16, [Dim::fixed(1), seq(), Dim::fixed(256)]).unwrap();
    let n = tr.param("n", DType::BF16, [256]).unwrap();
    let h = x.rms_norm(n, 1e-6).unwrap();
    let w = tr.param("w", DType::BF16, [96, 256]).unwrap();
    tr.output("normed", h).unwrap();
    tr.output("y", h.linear(w, None).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// The one-kernel form of a matrix-vector group: the GEMV template with the norm
/// generated where x is staged (its row reduction, then `gv_stage` into shared memory,
/// block 0 writing x), the weight and y parameters named by the body, the prologue loops
/// unrolled over the constant block size, waiting for the previous kernel. The body also
/// splits into its prologue (a plain rows kernel) for the two-kernel form.
#[test]
fn a_matvec_group_is_a_gemv_that_computes_its_x() {
    use kiln_codegen::decode::{gemv_prologue_fits, gemv_prologue_items, GemvConfig};
    let (fg, _, _) = fuse_all(&norm_linear());
    let body = match &fg.node(fg.topo_order().into_iter().find(|&n| fg.node(n).op.name() == "fused").unwrap()).op {
        Op::Fused(b) => (**b).clone(),
        _ => unreachable!(),
    };
    let Ok(FusedKind::MatVec { weight, .. }) = body.kind() else { panic!("{:?}", body.kind()) };
    assert_eq!(weight as usize, body.inputs.len() - 1);
    let syms = graph_symbols(&fg);
    let cfg = GemvConfig::for_prologue();
    let k = kiln_codegen::gemv_prologue(&body, &syms, cfg).unwrap();
    assert!(k.waits_for_previous());
    let part = kernel_part(&k);
    assert!(part.contains("#define GV_PROLOGUE 1") && part.contains("#define GV_Y out1"));
    assert!(part.contains(&format!("#define GV_W in{weight}")), "the weight is input {weight}");
    assert!(part.contains("gv_stage(xs, (int)row, j, ") && part.contains("if (blockIdx.x == 0) kiln_st(out, "));
    assert!(part.contains("j += 32 * GV_WARPS"));
    let roles: Vec<Role> = k.sig.params.iter().map(|p| p.role).collect();
    let mut want = vec![Role::Out(0), Role::Out(1)];
    want.extend((0..body.inputs.len()).map(|i| Role::In(i as u8)));
    want.extend([Role::Syms, Role::MatM, Role::MatN, Role::MatK]);
    assert_eq!(roles, want);
    // The two-kernel form's first half, and the launch sizes.
    let pro = body.prologue().unwrap();
    assert!(matches!(pro.kind(), Ok(FusedKind::Rows { .. })));
    assert!(fused_kernel(&pro, &syms).is_ok());
    assert!(gemv_prologue_fits(1, 8192) && !gemv_prologue_fits(1, 8193) && gemv_prologue_fits(4, 2048));
    assert!(!gemv_prologue_fits(8, 2048) && !gemv_prologue_fits(0, 1));
    assert_eq!(gemv_prologue_items(96, cfg, 132), 3); // 32 rows per block
    assert_eq!(gemv_prologue_items(16384, cfg, 132), 132); // one wave looping over tiles
                                                           // The template's staging size is the one the host checks against.
    assert!(part.contains(&format!("#define GV_XS {}", kiln_codegen::decode::GEMV_STAGED_FLOATS)));
    insta::assert_snapshot!("gemv_prologue_rmsnorm_bf16", part);
}

/// A matrix-vector group with SwiGLU as its epilogue: norm → gate_up → silu(gate)·up.
/// The epilogue GEMV: its warps take the gate and up rows of the block's columns (two
/// slices, 8 columns per 16-warp block), y and the epilogue's output as parameters, the
/// epilogue code reading y through `kiln_epi_y`; NVRTC compiles it.
/// norm → gate_up → silu(gate)·up as one matrix-vector group with an epilogue, the
/// weight moved to the last input (SiLU's constant came after it).
fn norm_swiglu_body() -> (Graph, FusedBody) {
    let (g, body, _) = norm_swiglu_body_sized(64, 128);
    (g, body)
}

/// [`norm_swiglu_body`] with `hidden` columns of x and `inter` SwiGLU columns, and the
/// body inputs' sources (in the body's input order).
fn norm_swiglu_body_sized(hidden: usize, inter: usize) -> (Graph, FusedBody, Vec<Op>) {
    let tr = Tracer::new();
    let x = tr.input("x", DType::BF16, [Dim::fixed(1), seq(), Dim::fixed(hidden)]).unwrap();
    let h = x.rms_norm(tr.param("n", DType::BF16, [hidden]).unwrap(), 1e-6).unwrap();
    let y = h.linear(tr.param("w", DType::BF16, [2 * inter, hidden]).unwrap(), None).unwrap();
    let z = y.slice(2, 0, inter).unwrap().silu().unwrap().mul(y.slice(2, inter, 2 * inter).unwrap()).unwrap();
    tr.output("normed", h).unwrap();
    tr.output("z", z).unwrap();
    tr.output("y", y).unwrap();
    matvec_body_weight_last(&tr.finish().unwrap())
}

/// [`fuse_all`] of a graph that is one matrix-vector group, with the weight moved to the
/// body's last input (where the matrix-vector kernels take it).
fn matvec_body_weight_last(g: &Graph) -> (Graph, FusedBody, Vec<Op>) {
    let (fg, _, mut sources) = fuse_all(g);
    let mut body = match &fg.node(fg.topo_order().into_iter().find(|&n| fg.node(n).op.name() == "fused").unwrap()).op {
        Op::Fused(b) => (**b).clone(),
        _ => unreachable!(),
    };
    // The weight is the last input of a matrix-vector body (SiLU's constant came after it).
    let mm = body.nodes.iter().position(|n| matches!(n.op, Op::MatMul { .. })).unwrap();
    let FusedRef::Input(wi) = body.nodes[mm].operands[1] else { unreachable!() };
    let last = (body.inputs.len() - 1) as u16;
    body.inputs.swap(wi as usize, last as usize);
    sources.swap(wi as usize, last as usize);
    for n in &mut body.nodes {
        for r in n.operands.iter_mut() {
            *r = match *r {
                FusedRef::Input(i) if i == wi => FusedRef::Input(last),
                FusedRef::Input(i) if i == last => FusedRef::Input(wi),
                other => other,
            };
        }
    }
    (fg, body, sources)
}

#[test]
fn a_matvec_group_with_an_epilogue_is_a_gemv_that_finishes_its_columns() {
    use kiln_codegen::decode::GemvConfig;
    let (fg, body) = norm_swiglu_body();
    let Ok(FusedKind::MatVec { epilogue: Some(form), .. }) = body.kind() else { panic!("{:?}", body.kind()) };
    assert_eq!((form.width, form.offsets.to_vec()), (128, vec![0, 128]));
    let syms = graph_symbols(&fg);
    let cfg = GemvConfig::for_rows(1);
    let k = kiln_codegen::gemv_epilogue(&body, &syms, cfg).unwrap();
    if let Ok(p) = std::env::var("KILN_DUMP_EPI") {
        std::fs::write(p, &k.source).unwrap();
    }
    assert!(k.waits_for_previous());
    assert_eq!(kiln_codegen::gemv_epilogue_items(&form, cfg), 16); // 8 columns per block
    let part = kernel_part(&k);
    for d in [
        "#define GV_EPI 1",
        "#define GV_EPI_S 2",
        "#define GV_EPI_OFF(s) ((s) == 0 ? 0LL : ((s) == 1 ? 128LL : 0LL))",
        "#define GV_EPI_W 128LL",
    ] {
        assert!(part.contains(d), "{d}");
    }
    assert!(part.contains("const kiln_epi_y in0 = {gv_ey, n, tile};"));
    let roles: Vec<Role> = k.sig.params.iter().map(|p| p.role).collect();
    let nin = body.inputs.len() - 1;
    let mut want = vec![Role::Out(0), Role::Out(1)];
    want.extend((1..=nin + 2).map(|i| Role::In(i as u8)));
    want.extend([Role::Syms, Role::MatM, Role::MatN, Role::MatK]);
    assert_eq!(roles, want, "epilogue output, y, the inputs from 1, x, the weight");
    assert!(
        part.contains(&format!("#define GV_X in{}", nin + 1)) && part.contains(&format!("#define GV_W in{}", nin + 2))
    );
    assert!(part.contains("#define GV_Y out1"));
    // The two-kernel form's first half, and the epilogue alone (for many rows).
    assert_eq!(body.prologue().unwrap().outputs.len(), 1);
    let epi = body.epilogue().unwrap();
    assert!(fused_kernel(&epi, &syms).is_ok());
    // Splits the epilogue cannot take.
    for bad in [GemvConfig { rows_per_warp: 2, ..cfg }, GemvConfig { ksplit: 2, ..cfg }] {
        assert!(kiln_codegen::gemv_epilogue(&body, &syms, bad).unwrap_err().0.contains("one row per warp"));
    }
    assert!(kiln_codegen::gemv_prologue(&body, &syms, cfg).is_err(), "the one-kernel prologue form has no epilogue");
    if kiln_codegen::nvrtc::nvrtc_present() {
        let c = kiln_codegen::Compiler::new((9, 0), None).unwrap();
        let several = kiln_codegen::gemv_epilogue(
            &body,
            &syms,
            kiln_codegen::decode::GemvConfig { rows_per_warp: 1, ..GemvConfig::for_rows(2) },
        )
        .unwrap();
        c.compile_all(&[&k, &several]).unwrap_or_else(|e| panic!("{e}"));
    } else {
        println!("skipping the NVRTC compile: libnvrtc could not be loaded");
    }
}

/// An RMSNorm prologue factors as x = A · S for the scaled GEMV: A = γ · x (the cast of
/// x to f32 and the broadcast weight), S = rsqrt(mean(x²) + ε) from one reduction; x̂
/// itself depends on the reduction, so the kernel does not write it. The kernel stages
/// A, reduces in the same pass, scales after the products; with SwiGLU the epilogue
/// follows. Layer norm (a reduction of a reduced value) has no such factorization.
/// NVRTC compiles both forms where it is present.
#[test]
fn a_norm_prologue_factors_into_a_scaled_gemv() {
    use kiln_codegen::decode::GemvConfig;
    let fused_body = |g: &Graph| -> (Graph, FusedBody) {
        let (fg, _, _) = fuse_all(g);
        let n = fg.topo_order().into_iter().find(|&n| fg.node(n).op.name() == "fused").unwrap();
        let Op::Fused(b) = &fg.node(n).op else { unreachable!() };
        let b = (**b).clone();
        (fg, b)
    };
    let (fg, body) = fused_body(&norm_linear());
    let plan = kiln_codegen::scaled_prologue(&body).unwrap();
    assert_eq!(plan.reductions.len(), 1, "{plan:?}");
    assert_eq!(plan.s.len(), 1, "one row value: the rsqrt");
    assert_eq!(plan.a.len(), 2, "the broadcast weight and x in f32: {plan:?}");
    assert!(plan.written.is_empty(), "x̂ depends on the reduction: {plan:?}");
    // Here x̂ is also a graph output ("normed"), which the scaled GEMV would not write.
    let node = fg.topo_order().into_iter().find(|&n| fg.node(n).op.name() == "fused").unwrap();
    let e = kiln_codegen::scaled_prologue_in(&fg, node).unwrap_err();
    assert!(e.0.contains("read elsewhere"), "{e}");
    let Op::Reduce { op: kiln_graph::ops::ReduceOp::Mean, .. } = body.nodes[plan.reductions[0]].op else {
        panic!("{plan:?}")
    };
    let syms = graph_symbols(&fg);
    let cfg = GemvConfig::for_rows(1);
    let k = kiln_codegen::gemv_scaled(&body, &syms, cfg, false).unwrap();
    assert!(k.waits_for_previous());
    let part = kernel_part(&k);
    for d in ["#define GV_SCALE 1", "#define GV_NRED 1", "#define GV_PROLOGUE 1", "#define GV_Y out\n"] {
        assert!(part.contains(d), "{d}");
    }
    assert!(part.contains(&format!("#define GV_W in{}\n", body.inputs.len())), "the weight after the inputs");
    assert!(part.contains("gv_stage(xs, 0, j0, (float)"), "A is staged");
    assert!(part.contains("gv_red[0 * GV_WARPS + warp] = gv_acc0;"));
    assert!(part.contains("gv_s[0] = (float)"), "S of the row");
    // Every load of the staging before any use: the last load precedes the first stage.
    let (last_load, first_stage) = (part.rfind("kiln_ld(in").unwrap(), part.find("gv_stage(xs, 0, j0").unwrap());
    assert!(last_load < first_stage, "the staging's loads come first");
    assert!(!part.contains("kiln_st(out1"), "x̂ is not written");
    let roles: Vec<Role> = k.sig.params.iter().map(|p| p.role).collect();
    let mut want = vec![Role::Out(0), Role::Out(1)];
    want.extend((1..body.inputs.len() + 1).map(|i| Role::In(i as u8)));
    want.extend([Role::Syms, Role::MatM, Role::MatN, Role::MatK]);
    assert_eq!(roles, want, "y, the prologue's output, the inputs from 1, the weight");
    assert!(kiln_codegen::gemv_scaled(&body, &syms, cfg, true).unwrap_err().0.contains("no epilogue"));
    assert!(kiln_codegen::gemv_scaled(&body, &syms, GemvConfig { ksplit: 2, ..cfg }, false).is_err());
    let several = kiln_codegen::gemv_scaled(&body, &syms, GemvConfig::for_rows(2), false).unwrap_err();
    assert!(several.0.contains("one row of x"), "{several}");
    // The engine's one-row kernel: the plain one-row GEMV's split for the weight.
    let (one, one_cfg) = kiln_codegen::gemv_scaled_one_row(&body, &syms).unwrap();
    assert_eq!(one_cfg, GemvConfig::for_shape(1, kiln_codegen::decode::weight_row_bytes(body.inputs.last().unwrap())));
    assert!(one.sig.name.starts_with("kiln_gemv_scaled_"));

    // With SwiGLU after the product: the epilogue GEMV's columns, scaled first.
    let (fg2, body2) = norm_swiglu_body();
    let syms2 = graph_symbols(&fg2);
    let ke = kiln_codegen::gemv_scaled(&body2, &syms2, cfg, true).unwrap();
    if let Ok(p) = std::env::var("KILN_DUMP_SCALED") {
        std::fs::write(p, &ke.source).unwrap();
    }
    let part = kernel_part(&ke);
    assert!(part.contains("#define GV_EPI 1") && part.contains("#define GV_SCALE 1"));
    assert!(part.contains("const kiln_epi_y in0 = {gv_ey, n, tile};"));
    let plain = kiln_codegen::gemv_scaled(&body2, &syms2, GemvConfig::for_rows(1), false).unwrap();
    assert!(!kernel_part(&plain).contains("#define GV_EPI 1"));

    // Layer norm: the variance reduces x - mean (two levels).
    let (_, ln) = fused_body(&{
        let tr = Tracer::new();
        let x = tr.input("x", DType::BF16, [Dim::fixed(1), seq(), Dim::fixed(256)]).unwrap();
        let h = x.layer_norm(tr.param("g", DType::BF16, [256]).unwrap(), None, 1e-5).unwrap();
        tr.output("normed", h).unwrap();
        tr.output("y", h.linear(tr.param("w", DType::BF16, [96, 256]).unwrap(), None).unwrap()).unwrap();
        tr.finish().unwrap()
    });
    assert!(matches!(ln.kind(), Ok(FusedKind::MatVec { .. })), "{:?}", ln.kind());
    let e = kiln_codegen::scaled_prologue(&ln).unwrap_err();
    assert!(e.0.contains("two levels") || e.0.contains("not a product"), "{e}");
    // The streaming form: the same staging, in gemv_stream.cu,
    // the scaled GEMV's parameters (no epilogue), a ring in dynamic shared memory.
    let st = kiln_codegen::gemv_stream_scaled(&body, &syms).unwrap();
    assert!(st.sig.name.starts_with("kiln_gemv_stream_scaled_"), "{}", st.sig.name);
    assert_eq!(
        st.sig.params.iter().map(|p| p.role).collect::<Vec<_>>(),
        k.sig.params.iter().map(|p| p.role).collect::<Vec<_>>()
    );
    let sp = kernel_part(&st);
    assert!(sp.contains("#define GS_SCALE 1") && sp.contains("#define GS_K 256") && sp.contains("gv_stage(xs, 0,"));
    assert!(sp.contains("gv_s[0] =") && !sp.contains("KILN_PROLOGUE"));
    assert!(st.dynamic_smem > 0 && st.waits_for_previous());
    let st2 = kiln_codegen::gemv_stream_scaled(&body2, &syms2).unwrap();
    // Rows of 256 f32 (1 KiB) are short: the engine streams them (gemv_stream_pays), and
    // the plan and viewer show that kernel, naming the tiled one; with an epilogue the
    // tiled form is shown (the epilogue GEMV when one wave), the per-warp epilogue form
    // named (the streaming form has no epilogue: the engine takes the per-warp one).
    let pays = kiln_codegen::gemv_stream_scaled_if_pays(&body, &syms).expect("short rows stream");
    assert_eq!(pays.sig.name, st.sig.name);
    let (shown, text) = kiln_codegen::scaled_gemv_one_row_choice(&body, &syms).unwrap();
    assert_eq!(shown.sig.name, st.sig.name);
    assert!(text.contains(&format!("streaming the short weight rows, else {}", one.sig.name)), "{text}");
    let (shown2, text2) = kiln_codegen::scaled_gemv_one_row_choice(&body2, &syms2).unwrap();
    assert!(shown2.sig.name.starts_with("kiln_gemv_scaled_"), "{}", shown2.sig.name);
    let (kw, _) = kiln_codegen::gemv_scaled_epi_warp(&body2, &syms2).unwrap();
    assert!(text2.contains(&format!("else {} computing it per warp", kw.sig.name)), "{text2}");
    assert!(kw.sig.name.starts_with("kiln_gemv_scaled_epiw_"), "{}", kw.sig.name);
    assert_eq!(kw.sig.params, ke.sig.params, "the block epilogue form's parameters");
    if kiln_codegen::nvrtc::nvrtc_present() {
        let c = kiln_codegen::Compiler::new((9, 0), None).unwrap();
        c.compile_all(&[&k, &ke, &plain, &st, &st2, &kw]).unwrap_or_else(|e| panic!("{e}"));
    } else {
        println!("skipping the NVRTC compile: libnvrtc could not be loaded");
    }
}

/// The grouping rule: consecutive parts that do not read each other's outputs, also
/// through a view between them; a part that does starts the next group.
#[test]
fn horizontal_runs_stop_at_a_part_that_reads_the_run() {
    use kiln_codegen::horizontal::{horizontal_runs, HStep};
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [Dim::fixed(4), Dim::fixed(8)]).unwrap();
    let y = tr.input("y", DType::F32, [Dim::fixed(4), Dim::fixed(8)]).unwrap();
    let a = x.exp().unwrap();
    let b = a.neg().unwrap(); // reads a
    let c = y.exp().unwrap();
    let r = c.reshape([Dim::fixed(32)]).unwrap(); // a view of c
    let d = r.neg().unwrap(); // reads c through the view
    let e = y.neg().unwrap();
    let ids = [a.node(), b.node(), c.node(), r.node(), d.node(), e.node()];
    for t in [b, d, e] {
        tr.output(&format!("o{}", t.node().index()), t).unwrap();
    }
    let g = tr.finish().unwrap();
    let step = |i: usize| (ids[i], if i == 3 { HStep::View } else { HStep::Part });
    let steps: Vec<_> = (0..6).map(step).collect();
    // a | b c (r) | d e: b reads a, d reads c through r.
    assert_eq!(horizontal_runs(&g, &steps), vec![vec![1, 2], vec![4, 5]]);
    // A barrier ends a group; a single part is no group.
    let mut steps = steps;
    steps[2].1 = HStep::Barrier;
    assert_eq!(horizontal_runs(&g, &steps), vec![vec![4, 5]]);
}
