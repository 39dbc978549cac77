//! Kernel sources: each kernel is a `.cu` template under `kernels/` specialised by
//! dtype, with its signature rendered from its [`KernelSig`] and the shared prelude
//! `kiln.cuh` prepended. Sizes, shapes and strides are kernel arguments, so one compiled
//! kernel serves every binding of the graph's symbolic dims.

use crate::params::{KernelSig, ParamTy, Role};
use crate::table;
use kiln_ops::{BinaryOp, DType, Op, ReduceOp, UnaryOp};

pub const PRELUDE: &str = include_str!("kernels/kiln.cuh");
const ELEMENTWISE: &str = include_str!("kernels/elementwise.cu");
const STRIDED_COPY: &str = include_str!("kernels/strided_copy.cu");
const GATHER: &str = include_str!("kernels/gather.cu");
const ARANGE: &str = include_str!("kernels/arange.cu");
const REDUCE: &str = include_str!("kernels/reduce.cu");
const ARGMAX: &str = include_str!("kernels/argmax.cu");
const TOPK: &str = include_str!("kernels/topk.cu");
const ATTENTION: &str = include_str!("kernels/attention.cu");

/// Largest rank the index-mapping kernels take (the size of `Idx8`).
pub const MAX_RANK: usize = 8;
/// Largest head dim the attention kernel takes.
pub const MAX_HEAD_DIM: usize = 256;

/// How a kernel is launched: threads per block, and what one block covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Grid {
    /// Grid-stride loop over `n` items, `threads` per block.
    Elementwise { threads: u32 },
    /// One warp per item, `warps` per block.
    WarpPerItem { warps: u32 },
    /// One block of `threads` per item.
    BlockPerItem { threads: u32 },
}

impl Grid {
    /// (grid, block) dims for `items` work items (`items > 0`).
    pub fn dims(self, items: usize) -> (u32, u32) {
        match self {
            Grid::Elementwise { threads } => {
                let blocks = items.div_ceil(threads as usize).clamp(1, 1 << 20);
                (blocks as u32, threads)
            }
            Grid::WarpPerItem { warps } => (items.div_ceil(warps as usize) as u32, warps * 32),
            Grid::BlockPerItem { threads } => (items as u32, threads),
        }
    }
}

/// The line between the shared prelude and a kernel's own text in [`Kernel::source`].
pub(crate) const KERNEL_MARKER: &str = "\n// ---- kernel ----\n";

/// A kernel ready for NVRTC: signature, full source and launch shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Kernel {
    pub sig: KernelSig,
    pub source: String,
    pub grid: Grid,
    /// Bytes of dynamic shared memory every launch gives a block (0: none). Over 48 KiB
    /// the loader must raise the function's `MAX_DYNAMIC_SHARED_SIZE_BYTES` first.
    pub dynamic_smem: u32,
}

impl Kernel {
    /// Whether the kernel waits for the previous kernel on its stream before touching
    /// memory (`kiln_grid_entry()`, or a `KILN_MANUAL_ENTRY` kernel's own
    /// `kiln_grid_wait()`; see `kiln.cuh`). Only such a kernel may be launched with
    /// programmatic dependent launch: one that does not wait would read its inputs
    /// while the kernel writing them still runs.
    pub fn waits_for_previous(&self) -> bool {
        // The kernel's own text follows the shared prelude (which defines the helpers).
        let own = self.source.rsplit_once(KERNEL_MARKER).map_or(self.source.as_str(), |(_, k)| k);
        own.contains("kiln_grid_entry();") || (own.contains("KILN_MANUAL_ENTRY") && own.contains("kiln_grid_wait();"))
    }
}

/// The GPU backend cannot run something (a dtype or op it does not handle yet).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("CUDA codegen: {0}")]
pub struct CodegenError(pub String);

pub(crate) fn err<T>(msg: impl Into<String>) -> Result<T, CodegenError> {
    Err(CodegenError(msg.into()))
}

fn storage(d: DType) -> Result<&'static str, CodegenError> {
    table::storage_type(d).ok_or_else(|| CodegenError(format!("dtype {d} is not supported on the GPU yet")))
}

fn compute(d: DType) -> Result<&'static str, CodegenError> {
    table::compute_type(d).ok_or_else(|| CodegenError(format!("dtype {d} is not supported on the GPU yet")))
}

pub(crate) fn word(d: DType) -> Result<&'static str, CodegenError> {
    table::word_type(d).ok_or_else(|| CodegenError(format!("dtype {d} has no word type")))
}

/// Prelude + `#define`s + the template with `KILN_SIGNATURE` replaced.
pub(crate) fn render(sig: KernelSig, template: &str, defines: &[(&str, String)], grid: Grid) -> Kernel {
    let mut src = String::with_capacity(PRELUDE.len() + template.len() + 512);
    src.push_str(PRELUDE);
    src.push_str(KERNEL_MARKER);
    for (k, v) in defines {
        src.push_str(&format!("#define {k} {v}\n"));
    }
    src.push_str(&with_entry(template).replace("KILN_SIGNATURE", &sig.signature()));
    Kernel { sig, source: src, grid, dynamic_smem: 0 }
}

/// The template with `kiln_grid_entry();` (see `kiln.cuh`: programmatic dependent
/// launch) as the first statement of the kernel, unless it says `KILN_MANUAL_ENTRY`.
pub(crate) fn with_entry(template: &str) -> String {
    if template.contains("KILN_MANUAL_ENTRY") {
        template.to_string()
    } else {
        template.replacen("KILN_SIGNATURE {", "KILN_SIGNATURE {\n    kiln_grid_entry();", 1)
    }
}

fn tag(d: DType) -> &'static str {
    d.name()
}

/// An elementwise op (`Unary`, `Binary`, `Select`, `Cast`) on inputs of `ins` dtypes
/// producing `out`.
pub fn elementwise(op: &Op, ins: &[DType], out: DType) -> Result<Kernel, CodegenError> {
    let (expr, name) = match op {
        Op::Unary(u) => (unary(*u, ins[0])?, format!("{}_{}", u.name(), tag(ins[0]))),
        Op::Binary(b) => (binary(*b, ins[0])?, format!("{}_{}", b.name(), tag(ins[0]))),
        Op::Select => (table::select_expr(), format!("select_{}", tag(ins[1]))),
        Op::Cast(to) => (
            table::cast_expr(ins[0], *to)
                .ok_or_else(|| CodegenError(format!("cast {} -> {to} is not supported on the GPU yet", ins[0])))?,
            format!("cast_{}_{}", tag(ins[0]), tag(*to)),
        ),
        other => return err(format!("`{}` is not elementwise", other.name())),
    };
    let mut params = vec![(Role::Out(0), ParamTy::ptr(storage(out)?))];
    let mut loads = String::new();
    for (i, &d) in ins.iter().enumerate() {
        params.push((Role::In(i as u8), ParamTy::const_ptr(storage(d)?)));
        let var = ["a", "b", "c"][i];
        loads.push_str(&format!("{} {var} = kiln_ld({}, i); ", compute(d)?, Role::In(i as u8).c_name()));
    }
    params.push((Role::N, ParamTy::I64));
    let sig = KernelSig::new(format!("kiln_ew_{name}"), params);
    Ok(render(
        sig,
        ELEMENTWISE,
        &[("KILN_LOADS", loads), ("KILN_OUT_C", compute(out)?.to_string()), ("KILN_EXPR", expr)],
        Grid::Elementwise { threads: 256 },
    ))
}

fn unary(u: UnaryOp, d: DType) -> Result<String, CodegenError> {
    table::unary_expr(u, d).ok_or_else(|| CodegenError(format!("`{}` is not defined for {d}", u.name())))
}

fn binary(b: BinaryOp, d: DType) -> Result<String, CodegenError> {
    table::binary_expr(b, d).ok_or_else(|| CodegenError(format!("`{}` is not defined for {d}", b.name())))
}

/// Index-mapping copy of elements of `d` (permute, slice, expand, concat).
pub fn strided_copy(d: DType) -> Result<Kernel, CodegenError> {
    let w = word(d)?;
    let sig = KernelSig::new(
        format!("kiln_copy_b{}", d.bits()),
        vec![
            (Role::Out(0), ParamTy::ptr(w)),
            (Role::In(0), ParamTy::const_ptr(w)),
            (Role::N, ParamTy::I64),
            (Role::Rank, ParamTy::I32),
            (Role::Shape, ParamTy::Idx8),
            (Role::OutStrides, ParamTy::Idx8),
            (Role::OutOffset, ParamTy::I64),
            (Role::InStrides, ParamTy::Idx8),
            (Role::InOffset, ParamTy::I64),
        ],
    );
    Ok(render(sig, STRIDED_COPY, &[], Grid::Elementwise { threads: 256 }))
}

/// `gather` of elements of `d` by indices of `idx` (i64 or i32).
pub fn gather(d: DType, idx: DType) -> Result<Kernel, CodegenError> {
    if !matches!(idx, DType::I64 | DType::I32) {
        return err(format!("gather indices must be i64 or i32, got {idx}"));
    }
    let w = word(d)?;
    let sig = KernelSig::new(
        format!("kiln_gather_b{}_{}", d.bits(), tag(idx)),
        vec![
            (Role::Out(0), ParamTy::ptr(w)),
            (Role::In(0), ParamTy::const_ptr(w)),
            (Role::Ids, ParamTy::const_ptr(storage(idx)?)),
            (Role::N, ParamTy::I64),
            (Role::NIdx, ParamTy::I64),
            (Role::Size, ParamTy::I64),
            (Role::Inner, ParamTy::I64),
        ],
    );
    Ok(render(sig, GATHER, &[("KILN_WORD", w.to_string())], Grid::Elementwise { threads: 256 }))
}

/// `arange`: i64 `start + i`.
pub fn arange() -> Kernel {
    let sig = KernelSig::new(
        "kiln_arange",
        vec![(Role::Out(0), ParamTy::ptr("i64")), (Role::N, ParamTy::I64), (Role::Start, ParamTy::I64)],
    );
    render(sig, ARANGE, &[], Grid::Elementwise { threads: 256 })
}

/// `reduce_sum` / `reduce_max` / `reduce_mean` of `d` over any axes.
pub fn reduce(op: ReduceOp, d: DType) -> Result<Kernel, CodegenError> {
    let float = d.is_float();
    if d == DType::Bool {
        return err(format!("`{}` is not defined for bool", op.name()));
    }
    let int_min = match d {
        DType::I64 => "(i64)(-0x7fffffffffffffffLL - 1)",
        DType::I32 => "(i64)(-0x7fffffff - 1)",
        DType::I8 => "(i64)-128",
        _ => "(i64)0",
    };
    let (acc, init, combine, finish) = match (op, float) {
        (ReduceOp::Sum, true) => ("float", "0.0f", "((a) + (b))", "(acc)"),
        (ReduceOp::Mean, true) => ("float", "0.0f", "((a) + (b))", "((acc) / (float)n_red)"),
        (ReduceOp::Max, true) => ("float", "-KILN_INF", "kiln_fmax((a), (b))", "(acc)"),
        (ReduceOp::Sum, false) => {
            ("i64", "(i64)0", "((i64)((unsigned long long)(a) + (unsigned long long)(b)))", "(acc)")
        }
        (ReduceOp::Mean, false) => (
            "i64",
            "(i64)0",
            "((i64)((unsigned long long)(a) + (unsigned long long)(b)))",
            "(n_red == 0 ? (i64)0 : (acc) / n_red)",
        ),
        (ReduceOp::Max, false) => ("i64", int_min, "((a) > (b) ? (a) : (b))", "(acc)"),
    };
    let out_c = compute(d)?;
    let sig = KernelSig::new(
        format!("kiln_{}_{}", op.name(), tag(d)),
        vec![
            (Role::Out(0), ParamTy::ptr(storage(d)?)),
            (Role::In(0), ParamTy::const_ptr(storage(d)?)),
            (Role::NOut, ParamTy::I64),
            (Role::NRed, ParamTy::I64),
            (Role::KeptRank, ParamTy::I32),
            (Role::KeptShape, ParamTy::Idx8),
            (Role::KeptStrides, ParamTy::Idx8),
            (Role::RedRank, ParamTy::I32),
            (Role::RedShape, ParamTy::Idx8),
            (Role::RedStrides, ParamTy::Idx8),
        ],
    );
    Ok(render(
        sig,
        REDUCE,
        &[
            ("KILN_ACC", acc.to_string()),
            ("KILN_INIT", init.to_string()),
            ("KILN_COMBINE(a, b)", combine.to_string()),
            ("KILN_FINISH(acc)", format!("(({out_c}){finish})")),
        ],
        Grid::WarpPerItem { warps: 8 },
    ))
}

/// The type argmax/topk compare in: the compute type, with bool widened to int (warp
/// shuffles take no bool).
fn compare_type(d: DType) -> Result<&'static str, CodegenError> {
    Ok(if d == DType::Bool { "int" } else { compute(d)? })
}

/// `argmax` of `d` along one axis (input viewed as `[outer, len, inner]`).
pub fn argmax(d: DType) -> Result<Kernel, CodegenError> {
    let sig = KernelSig::new(
        format!("kiln_argmax_{}", tag(d)),
        vec![
            (Role::Out(0), ParamTy::ptr("i64")),
            (Role::In(0), ParamTy::const_ptr(storage(d)?)),
            (Role::N, ParamTy::I64),
            (Role::Len, ParamTy::I64),
            (Role::Inner, ParamTy::I64),
        ],
    );
    Ok(render(sig, ARGMAX, &[("KILN_C", compare_type(d)?.to_string())], Grid::BlockPerItem { threads: 512 }))
}

/// `topk` of `d` along one axis: values (as stored) and i64 indices.
pub fn topk(d: DType) -> Result<Kernel, CodegenError> {
    let sig = KernelSig::new(
        format!("kiln_topk_{}", tag(d)),
        vec![
            (Role::Out(0), ParamTy::ptr(storage(d)?)),
            (Role::Out(1), ParamTy::ptr("i64")),
            (Role::In(0), ParamTy::const_ptr(storage(d)?)),
            (Role::Len, ParamTy::I64),
            (Role::Inner, ParamTy::I64),
            (Role::K, ParamTy::I64),
        ],
    );
    Ok(render(sig, TOPK, &[("KILN_C", compare_type(d)?.to_string())], Grid::BlockPerItem { threads: 256 }))
}

/// `attention` on q/k/v of the float dtype `d`.
pub fn attention(d: DType) -> Result<Kernel, CodegenError> {
    if !d.is_float() {
        return err(format!("attention needs a float dtype, got {d}"));
    }
    let s = storage(d)?;
    let sig = KernelSig::new(
        format!("kiln_attention_{}", tag(d)),
        vec![
            (Role::Out(0), ParamTy::ptr(s)),
            (Role::In(0), ParamTy::const_ptr(s)),
            (Role::In(1), ParamTy::const_ptr(s)),
            (Role::In(2), ParamTy::const_ptr(s)),
            (Role::Batch, ParamTy::I64),
            (Role::Seq, ParamTy::I64),
            (Role::Heads, ParamTy::I64),
            (Role::KvHeads, ParamTy::I64),
            (Role::Keys, ParamTy::I64),
            (Role::HeadDim, ParamTy::I64),
            (Role::ValueDim, ParamTy::I64),
            (Role::Scale, ParamTy::F32),
            (Role::MaskKind, ParamTy::I32),
            (Role::Window, ParamTy::I64),
        ],
    );
    Ok(render(sig, ATTENTION, &[], Grid::WarpPerItem { warps: 4 }))
}

/// What the GPU backend runs for one graph node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeLowering {
    /// A generated kernel (its CUDA C source is [`Kernel::source`]).
    Kernel(Kernel),
    /// A graph input, uploaded by the caller each run.
    Input,
    /// A weight, uploaded once.
    Param,
    /// A constant, evaluated and uploaded once.
    Constant,
    /// `reshape`: an alias of its operand's buffer, no kernel.
    View,
    /// `matmul`: a cuBLAS call, no generated kernel.
    CublasMatMul,
}

impl NodeLowering {
    /// A short description of what runs instead of a generated kernel (`None` for
    /// [`NodeLowering::Kernel`]).
    pub fn describe(&self) -> Option<&'static str> {
        match self {
            NodeLowering::Kernel(_) => None,
            NodeLowering::Input => Some("graph input: uploaded by the caller, no kernel"),
            NodeLowering::Param => Some("uploaded weight, no kernel"),
            NodeLowering::Constant => Some("constant: evaluated and uploaded once, no kernel"),
            NodeLowering::View => Some("view: no kernel (aliases its operand's buffer)"),
            NodeLowering::CublasMatMul => Some("cuBLAS matmul, no generated kernel"),
        }
    }
}

/// What the CUDA executor runs for node `n` of `g`: the kernel it renders (by the same
/// functions above, so the source is exactly what NVRTC compiles) or what runs instead.
/// Errors are the reasons the GPU backend rejects the node (an unsupported dtype or op).
///
/// `kiln_runtime`'s `CudaExecutor::new` runs exactly this choice for every node.
pub fn lower_node(g: &kiln_graph::Graph, n: kiln_graph::NodeId) -> Result<NodeLowering, CodegenError> {
    let node = g.node(n);
    for t in &node.outputs {
        storage(t.dtype)?;
    }
    let in_dtypes: Vec<DType> = g.operands(n).iter().map(|v| g.value_type(*v).dtype).collect();
    let out_dtype = node.outputs[0].dtype;
    let k = match &node.op {
        Op::Input { .. } => return Ok(NodeLowering::Input),
        Op::Param { .. } => return Ok(NodeLowering::Param),
        Op::Constant { .. } => return Ok(NodeLowering::Constant),
        Op::Reshape(_) => return Ok(NodeLowering::View),
        Op::MatMul { .. } => {
            if !matches!(out_dtype, DType::F32 | DType::F16 | DType::BF16) {
                return err(format!("matmul on {out_dtype} is not supported on the GPU"));
            }
            return Ok(NodeLowering::CublasMatMul);
        }
        Op::Fused(body) => crate::fused::fused_kernel(body, &crate::symbols::graph_symbols(g))?,
        op if op.is_elementwise() => elementwise(op, &in_dtypes, out_dtype)?,
        Op::Permute(_) | Op::Slice { .. } | Op::Expand(_) | Op::Concat { .. } => strided_copy(out_dtype)?,
        Op::Gather { .. } => gather(out_dtype, in_dtypes[1])?,
        Op::Arange { .. } => arange(),
        Op::Reduce { op, .. } => reduce(*op, in_dtypes[0])?,
        Op::ArgMax { .. } => argmax(in_dtypes[0])?,
        Op::TopK { .. } => topk(in_dtypes[0])?,
        Op::Attention(_) => attention(in_dtypes[0])?,
        other => return err(format!("`{}` has no GPU lowering", other.name())),
    };
    Ok(NodeLowering::Kernel(k))
}

/// The CUDA C source the GPU executor compiles for node `n` of `g`, or `None` when it
/// runs no generated kernel for it (sources, views, cuBLAS matmul) or cannot run it.
pub fn render_node_source(g: &kiln_graph::Graph, n: kiln_graph::NodeId) -> Option<String> {
    match lower_node(g, n) {
        Ok(NodeLowering::Kernel(k)) => Some(k.source),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_graph::{TensorExt, Tracer};
    use kiln_ops::Dim;

    #[test]
    fn lower_node_picks_what_the_executor_runs() {
        let tr = Tracer::new();
        let x = tr.input("x", DType::F32, [Dim::sym("seq"), Dim::fixed(8)]).unwrap();
        let w = tr.param("w", DType::F32, [8usize, 8]).unwrap();
        let y = x.matmul(w).unwrap().exp().unwrap().reshape([Dim::fixed(8), Dim::sym("seq")]).unwrap();
        tr.output("y", y).unwrap();
        let g = tr.finish().unwrap();
        let of = |name: &str| g.topo_order().into_iter().find(|&n| g.node(n).op.name() == name).unwrap();
        assert_eq!(lower_node(&g, of("input")), Ok(NodeLowering::Input));
        assert_eq!(lower_node(&g, of("param")), Ok(NodeLowering::Param));
        assert_eq!(lower_node(&g, of("matmul")), Ok(NodeLowering::CublasMatMul));
        assert_eq!(lower_node(&g, of("reshape")), Ok(NodeLowering::View));
        let src = render_node_source(&g, of("exp")).unwrap();
        assert_eq!(src, elementwise(&Op::Unary(UnaryOp::Exp), &[DType::F32], DType::F32).unwrap().source);
        assert!(src.contains("expf"));
        assert_eq!(render_node_source(&g, of("matmul")), None);
    }
}
