//! CUDA codegen for fused groups ([`Op::Fused`]): every body whose
//! [`FusedBody::kind`] is Ok becomes ONE kernel.
//!
//! * [`FusedKind::Elementwise`]: one thread per element of the output domain (a
//!   grid-stride loop). The linear index is split into the domain coordinate; each body
//!   value is then generated *at a coordinate* by walking its operands backwards:
//!   elementwise ops keep the coordinate, `expand` maps broadcast dims to 0, `slice`
//!   adds its start, `permute` permutes, `reshape` re-linearizes (only within the
//!   smallest groups of dims whose sizes match), `concat` becomes a branch on the
//!   coordinate along its axis, and a group input is a load at the row-major offset.
//!   Values asked for at the same coordinate are generated once (CSE over C locals,
//!   scoped to the branch or loop that computed them), so the code stays linear in the
//!   body's size.
//! * [`FusedKind::Rows`]: one block per row of `[rows.., cols..]`; reductions are block
//!   reductions done in dependency order (one column pass per level of dependent
//!   reductions); the full-shaped outputs are written in a final column pass, the
//!   row-shaped ones by thread 0.
//!
//! Float values compute in f32 and every op's result is rounded to its logical dtype,
//! as the CPU reference does (a bf16 `mul` is rounded to bf16 before the next op); 8-bit
//! integer results wrap. Every size is a C expression over the device symbol table
//! `syms` (see [`crate::symbols`]), so the kernel takes no per-launch shape argument.
//!
//! Kernel parameters, in order: `out`, `out1`, … (one per body output, storage type of
//! its dtype, contiguous row-major), `in0`, `in1`, … (one per body input, `const`,
//! contiguous row-major), `syms` (`const i64*`), `n` (the work-item count,
//! [`fused_items`]: elements for the elementwise kind, rows for the rows kind; the
//! kernel takes its loop bounds from `syms`, so `n` only sizes the launch).
//! The kernel is named `kiln_fused_<FNV-1a 64 of its source>`, so identical bodies
//! share one compiled kernel.

use crate::decode::{self, GemvConfig};
use crate::kernels::{CodegenError, Grid, Kernel};
use crate::params::{KernelSig, ParamTy, Role};
use crate::symbols::dim_to_c;
use crate::table;
use kiln_ops::{Bindings, DType, Dim, FusedBody, FusedKind, FusedRef, Op, ReduceOp, Shape, Sym};
use std::collections::HashMap;
use std::fmt::Write as _;

const ELEMENTWISE: &str = include_str!("kernels/fused_elementwise.cu");
const ROWS: &str = include_str!("kernels/fused_rows.cu");

/// Threads per block of the elementwise form.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Threads per block (one block per row) of the rows form when the column count is
/// symbolic; a fixed count of `n` columns gets [`row_threads`]`(n)`.
pub const ROW_THREADS: u32 = 512;

/// Threads per block of the rows form for rows of `cols` columns: one column per thread
/// up to 1,024 (rounded up to whole warps, at least 64), so a decode step's single row
/// is read in as few dependent rounds as possible (a 2,048-wide RMSNorm row on 256
/// threads took 8 serial load rounds per pass: about 10 µs on an H200).
pub fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(32) * 32).clamp(64, 1024) as u32
}

fn err<T>(msg: impl Into<String>) -> Result<T, CodegenError> {
    Err(CodegenError(msg.into()))
}

/// The kernel of a fused body (see the [module docs](self) for its parameters and
/// form). `syms` is the device symbol table's order
/// ([`crate::symbols::graph_symbols`] of the graph holding the fused node). Errors name
/// what the GPU backend cannot generate (a dtype, an op, a body that fits neither form).
pub fn fused_kernel(body: &FusedBody, syms: &[Sym]) -> Result<Kernel, CodegenError> {
    body.check().map_err(|e| CodegenError(format!("fused group: {e}")))?;
    let kind = body.kind().map_err(|e| CodegenError(format!("fused group: {e}")))?;
    let params = params(body)?;
    let mut g = Gen::new(body, syms);
    let (template, head, code, grid) =
        match &kind {
            FusedKind::Elementwise { domain } => {
                let (head, code) = g.elementwise(domain)?;
                (ELEMENTWISE, head, code, Grid::Elementwise { threads: ELEMENTWISE_THREADS })
            }
            FusedKind::Rows { rows, cols } => {
                let (head, code) = g.rows(rows, cols)?;
                let threads = cols.numel().as_fixed().map_or(ROW_THREADS, row_threads);
                (ROWS, head.replace("KILN_ROW_THREADS", &threads.to_string()), code, Grid::BlockPerItem { threads })
            }
            FusedKind::MatVec { .. } => return err(
                "fused group: a matrix-vector group runs as `gemv_prologue`, or as its prologue's kernel and a matmul",
            ),
        };
    let template =
        template.replace("KILN_DIMS", head.trim_end_matches('\n')).replace("KILN_BODY", code.trim_end_matches('\n'));
    let mut kernel = render_hashed("kiln_fused", params, &template, &[], grid);
    if let Grid::BlockPerItem { threads } = grid {
        // Up to 1,024 threads per block: the compiler must keep the registers within
        // what such a block may have (64 per thread at 1,024), or the launch fails.
        let plain = format!("__global__ void {}(", kernel.sig.name);
        let bounded = format!("__global__ void __launch_bounds__({threads}) {}(", kernel.sig.name);
        kernel.source = kernel.source.replacen(&plain, &bounded, 1);
    }
    Ok(kernel)
}

/// How a fused body ends in a cache append: its only output is
/// `concat{axis=1}(past, new)` with `past` the body input `past_input`. A
/// device-resident KV cache turns such a body into [`fused_append_kernel`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FusedAppend {
    /// The body input that is the cache (`past`).
    pub past_input: usize,
    /// The appended rows (the concat's second operand) as a body value.
    pub new: FusedRef,
}

impl FusedAppend {
    /// The body of `body` (the append's) that computes only the new rows.
    pub fn rows_body(&self, body: &FusedBody) -> FusedBody {
        FusedBody { inputs: body.inputs.clone(), nodes: body.nodes.clone(), outputs: vec![self.new] }
    }
}

/// Whether `body` is an append (see [`FusedAppend`]).
pub fn fused_append(body: &FusedBody) -> Option<FusedAppend> {
    let [FusedRef::Node { node, output: 0 }] = body.outputs[..] else { return None };
    let n = body.nodes.get(node as usize)?;
    match (&n.op, &n.operands[..]) {
        (Op::Concat { axis: 1 }, &[FusedRef::Input(past), new]) if n.outputs[0].rank() >= 2 => {
            Some(FusedAppend { past_input: past as usize, new })
        }
        _ => None,
    }
}

/// The in-place form of an append body (see [`fused_append`]) for a device-resident
/// cache: one thread per element of the **new** rows `[batch, seq, inner..]`, each
/// computed like the elementwise form and stored at row `at + t` of batch entry `b` of
/// the cache (`out`, entries `batch_stride` elements apart, rows of
/// `Π inner` elements), where `at` is the length of the body's `past` input (axis 1),
/// read from `syms`. The cache's old rows are neither read nor copied.
///
/// Parameters: `out` (the cache), `in0`, … (the body's inputs; `past` is passed but not
/// read), `syms`, `n` (elements of the new rows: [`fused_append_items`]),
/// `batch_stride` ([`Role::CacheBatchStride`]).
pub fn fused_append_kernel(body: &FusedBody, syms: &[Sym]) -> Result<Kernel, CodegenError> {
    body.check().map_err(|e| CodegenError(format!("fused append: {e}")))?;
    let Some(app) = fused_append(body) else {
        return err("fused append: the body's only output must be concat{axis=1}(input, new)");
    };
    let new_body = app.rows_body(body);
    let domain = match new_body.kind().map_err(|e| CodegenError(format!("fused append: {e}")))? {
        FusedKind::Elementwise { domain } => domain,
        FusedKind::Rows { .. } | FusedKind::MatVec { .. } => {
            return err("fused append: the appended rows must be elementwise")
        }
    };
    let at = body.inputs[app.past_input].shape.dim(1).clone();
    let mut params = params(body)?;
    params.push((Role::CacheBatchStride, ParamTy::I64));
    let mut g = Gen::new(&new_body, syms);
    g.indent = 2;
    let dims = domain.dims();
    let coord = g.delinearize("i", dims)?;
    let v = g.value(app.new, &coord)?;
    let at_c = g.dim(&at)?;
    let row = g.linearize(&coord[2..], &dims[2..])?;
    let inner = g.dim(&Shape::new(dims[2..].iter().cloned()).numel())?;
    let pos = g.plus(&at_c, &coord[1]);
    let dst = g.index(format!("{} * batch_stride + {} * {inner} + {row}", paren(&coord[0]), paren(&pos)));
    g.line(format!("kiln_st(out, {dst}, {v});"));
    let n = g.dim(&domain.numel())?;
    let mut head = g.dim_decls()?;
    writeln!(head, "    const i64 n_items = {n};").expect("to a string");
    let code = std::mem::take(&mut g.lines);
    let template =
        ELEMENTWISE.replace("KILN_DIMS", head.trim_end_matches('\n')).replace("KILN_BODY", code.trim_end_matches('\n'));
    Ok(render_hashed("kiln_fused_append", params, &template, &[], Grid::Elementwise { threads: ELEMENTWISE_THREADS }))
}

/// A C block computing value `r` of `body` at the coordinate whose components are the
/// i64 C expressions `coord` (in `r`'s shape), assigned to the float (or compute-type)
/// local `result`, which the caller declares. Body input `i` is read from the
/// parameter `in{i + in_base}`; the block declares the symbolic dims it needs from
/// `syms` itself, so several blocks can sit in one kernel (the value is computed
/// exactly as the body's own kernels compute it, roundings included). For a kernel
/// that computes a producer's values where it needs them
/// ([`crate::decode::attention_decode_fused`]).
pub(crate) fn value_block(
    body: &FusedBody,
    r: FusedRef,
    coord: &[&str],
    syms: &[Sym],
    in_base: u8,
    result: &str,
) -> Result<String, CodegenError> {
    body.check().map_err(|e| CodegenError(format!("fused producer: {e}")))?;
    let rank = body.ty(r).ok_or_else(|| CodegenError("fused producer: no such body value".into()))?.shape.rank();
    if coord.len() != rank {
        return err(format!("fused producer: a coordinate of {} components for a value of rank {rank}", coord.len()));
    }
    let mut g = Gen::new(body, syms);
    g.in_base = in_base;
    g.indent = 1;
    let coord: Vec<String> = coord.iter().map(|c| c.to_string()).collect();
    let v = g.value(r, &coord)?;
    g.line(format!("{result} = {v};"));
    let decls = g.dim_decls()?;
    Ok(format!("{{\n{decls}{}}}", g.lines))
}

/// Work items of a [`fused_append_kernel`] launch: the elements of the new rows.
pub fn fused_append_items(body: &FusedBody, b: &Bindings) -> Result<usize, CodegenError> {
    let app = fused_append(body).ok_or_else(|| CodegenError("fused append: not an append body".into()))?;
    let shape = &body.ty(app.new).expect("checked").shape;
    let dims = shape.eval(b).map_err(|e| CodegenError(format!("fused append of {shape}: {e}")))?;
    Ok(dims.iter().product())
}

/// The number of work items to launch a fused body's kernel with
/// (`kernel.grid.dims(items)`): elements of the domain for the elementwise form, rows
/// for the rows form. Errors name an unbound symbol or a body that fits neither form.
pub fn fused_items(body: &FusedBody, b: &Bindings) -> Result<usize, CodegenError> {
    let kind = body.kind().map_err(|e| CodegenError(format!("fused group: {e}")))?;
    let shape = match &kind {
        FusedKind::Elementwise { domain } => domain,
        FusedKind::Rows { rows, .. } => rows,
        FusedKind::MatVec { .. } => {
            return err("fused group: a matrix-vector group is launched as a GEMV or in two parts")
        }
    };
    let dims = shape.eval(b).map_err(|e| CodegenError(format!("fused group of {shape}: {e}")))?;
    Ok(dims.iter().product())
}

/// The one-kernel form of a [`FusedKind::MatVec`] body for few rows of x: the GEMV of
/// [`crate::decode::gemv_with`] (split `cfg`) whose blocks compute x themselves. Each
/// block runs the prologue (its row reductions included) over every row of x and stores
/// x into its shared-memory staging instead of reading it; block 0 also writes the
/// prologue's outputs (x among them), so the kernel computes every output of the body.
/// y is rounded once to its dtype; x is the prologue's value (rounded as the CPU
/// reference rounds it), staged as f32.
///
/// Parameters: `out`, `out1`, … (the body's outputs, y last), `in0`, … (its inputs, the
/// weight `[n, k]` last), `syms`, `m` (rows of x), `n`, `k`. Launch
/// `grid.dims(gemv_prologue_items(n, cfg, sms))` (any block count works: blocks loop
/// over the row tiles) when [`crate::decode::gemv_prologue_fits`]`(m, k)` (a launch with
/// rows that do not fit writes nothing).
pub fn gemv_prologue(body: &FusedBody, syms: &[Sym], cfg: GemvConfig) -> Result<Kernel, CodegenError> {
    body.check().map_err(|e| CodegenError(format!("fused matrix-vector group: {e}")))?;
    let kind = body.kind().map_err(|e| CodegenError(format!("fused matrix-vector group: {e}")))?;
    let FusedKind::MatVec { prologue, x, weight, epilogue: None } = kind else {
        return err("gemv_prologue: the body is no matrix-vector group without an epilogue");
    };
    decode::gemv_check(cfg)?;
    let pro = body.prologue().expect("a matrix-vector body has a prologue");
    let xi = pro.outputs.iter().position(|&r| r == x).expect("x is an output");
    let xt = body.ty(x).expect("checked");
    let (rows, cols) = prologue_rows(*prologue, &xt.shape);
    let mut g = Gen::new(&pro, syms);
    g.stage_x = Some(xi);
    let (head, code) = g.rows(&rows, &cols)?;
    let mut text = String::from("        {\n");
    for l in head.lines() {
        writeln!(text, "        {l}").expect("to a string");
    }
    text.push_str("            for (i64 row = 0; row < n_rows; ++row) {\n");
    for l in code.lines() {
        writeln!(text, "        {l}").expect("to a string");
    }
    text.push_str("            }\n        }");
    let wt = &body.inputs[weight as usize];
    let y = *body.outputs.last().expect("checked");
    let yt = body.ty(y).expect("checked");
    let what = "fused matrix-vector group";
    let (xs, ws, ys) = (
        decode::float_storage(xt.dtype, &format!("{what}: x"))?,
        decode::float_storage(wt.dtype, &format!("{what}: weight"))?,
        decode::float_storage(yt.dtype, &format!("{what}: y"))?,
    );
    let mut params = params(body)?;
    params.retain(|(r, _)| *r != Role::N);
    params.extend([(Role::MatM, ParamTy::I64), (Role::MatN, ParamTy::I64), (Role::MatK, ParamTy::I64)]);
    let mut defines = decode::gemv_defines(xs, ws, ys, decode::vec_elems(wt.dtype), cfg);
    defines.extend([
        ("KILN_RESIDUAL", "0".to_string()),
        ("GV_PROLOGUE", "1".to_string()),
        ("GV_X", Role::In(0).c_name()),
        ("GV_W", Role::In(weight as u8).c_name()),
        ("GV_Y", Role::Out((body.outputs.len() - 1) as u8).c_name()),
        ("GV_RES", "(const KILN_Y*)0".to_string()),
    ]);
    let template = format!("{}{}", decode::VECTOR_HELPERS, decode::GEMV)
        .replace("KILN_PROLOGUE", &text)
        .replace("KILN_WARP_EPILOGUE", "")
        .replace("KILN_EPILOGUE", "");
    let grid = Grid::BlockPerItem { threads: 32 * cfg.warps as u32 };
    Ok(render_hashed("kiln_gemv_pro", params, &template, &defines, grid))
}

/// The GEMV of a [`FusedKind::MatVec`] body with an [`kiln_ops::Epilogue`], for few rows
/// of x (written by the prologue's kernel): the blocks of [`gemv_epilogue_items`] each
/// compute the rows of w that `cols` consecutive epilogue columns read (`cols` =
/// `cfg.warps` / the epilogue's slice count; warp `s · cols + t` takes row `offsets[s] +
/// tile · cols + t`), store them into y, and then compute the epilogue of those columns
/// for every row of x from the values they hold (rounded to y's dtype, as the CPU
/// reference rounds the matmul). y is written for the columns the epilogue reads (all of
/// them when its slices cover y, as SwiGLU's do). `cfg` must have one row per warp and
/// no split-K.
///
/// Parameters: `out`, `out1`, … (the epilogue's outputs), then y, then `in{1 + i}` for
/// body input `i` (all but the weight, which the epilogue reads as it needs), x, the
/// weight, `syms`, `m` (rows of x), `n` (y's columns), `k`.
pub fn gemv_epilogue(body: &FusedBody, syms: &[Sym], cfg: GemvConfig) -> Result<Kernel, CodegenError> {
    body.check().map_err(|e| CodegenError(format!("fused matrix-vector group: {e}")))?;
    let kind = body.kind().map_err(|e| CodegenError(format!("fused matrix-vector group: {e}")))?;
    let FusedKind::MatVec { x, weight, epilogue: Some(form), .. } = kind else {
        return err("gemv_epilogue: the body is no matrix-vector group with an epilogue");
    };
    decode::gemv_check(cfg)?;
    if cfg.rows_per_warp != 1 || cfg.ksplit != 1 || cfg.warps < form.offsets.len() {
        return err(format!(
            "gemv_epilogue: the split {cfg:?} must have one row per warp, no split-K and a warp per slice"
        ));
    }
    let epi = body.epilogue().expect("a body with an epilogue form has one");
    let (text, epi_defines) = epilogue_code(&epi, syms, &form, false)?;
    let what = "fused matrix-vector group";
    let wt = &body.inputs[weight as usize];
    let (xt, yt) = (body.ty(x).expect("checked"), &body.nodes[body.matmul_node().expect("checked")].outputs[0]);
    let (xs, ws, ys) = (
        decode::float_storage(xt.dtype, &format!("{what}: x"))?,
        decode::float_storage(wt.dtype, &format!("{what}: weight"))?,
        decode::float_storage(yt.dtype, &format!("{what}: y"))?,
    );
    // Parameters: the epilogue's outputs, y, the body's inputs but the weight (as the
    // epilogue body numbers them: from 1), x, the weight.
    let mut params = Vec::new();
    for (i, &r) in epi.outputs.iter().enumerate() {
        let d = epi.ty(r).expect("checked").dtype;
        params.push((Role::Out(i as u8), ParamTy::ptr(storage(d, &format!("epilogue output {i}"))?)));
    }
    let e = epi.outputs.len();
    params.push((Role::Out(e as u8), ParamTy::ptr(ys)));
    let nin = body.inputs.len() - 1;
    for (i, t) in body.inputs[..nin].iter().enumerate() {
        params.push((Role::In((i + 1) as u8), ParamTy::const_ptr(storage(t.dtype, &format!("fused input {i}"))?)));
    }
    params.push((Role::In((nin + 1) as u8), ParamTy::const_ptr(xs)));
    params.push((Role::In((nin + 2) as u8), ParamTy::const_ptr(ws)));
    gemv_params_end(&mut params, "gemv_epilogue")?;
    let mut defines = decode::gemv_defines(xs, ws, ys, decode::vec_elems(wt.dtype), cfg);
    defines.extend(epi_defines);
    defines.extend([
        ("KILN_RESIDUAL", "0".to_string()),
        ("GV_PROLOGUE", "0".to_string()),
        ("GV_X", Role::In((nin + 1) as u8).c_name()),
        ("GV_W", Role::In((nin + 2) as u8).c_name()),
        ("GV_Y", Role::Out(e as u8).c_name()),
        ("GV_RES", "(const KILN_Y*)0".to_string()),
    ]);
    let template = format!("{}{}", decode::VECTOR_HELPERS, decode::GEMV)
        .replace("KILN_PROLOGUE", "")
        .replace("KILN_WARP_EPILOGUE", "")
        .replace("KILN_EPILOGUE", text.trim_end_matches('\n'));
    let grid = Grid::BlockPerItem { threads: 32 * cfg.warps as u32 };
    Ok(render_hashed("kiln_gemv_epi", params, &template, &defines, grid))
}

/// The rows and columns of a matrix-vector prologue of kind `prologue` whose x has shape
/// `x`: those of a rows-kind prologue, else x's leading dims and its last.
fn prologue_rows(prologue: FusedKind, x: &Shape) -> (Shape, Shape) {
    match prologue {
        FusedKind::Rows { rows, cols } => (rows, cols),
        _ => {
            let d = x.dims();
            (Shape::new(d[..d.len() - 1].iter().cloned()), Shape::new([d[d.len() - 1].clone()]))
        }
    }
}

/// `#define`s of a rendered template.
type Defines = Vec<(&'static str, String)>;

/// Ends the parameter list of a fused GEMV (`syms`, `m`, `n`, `k`), which may hold at
/// most 250 parameters.
fn gemv_params_end(params: &mut Vec<(Role, ParamTy)>, what: &str) -> Result<(), CodegenError> {
    params.extend([
        (Role::Syms, ParamTy::const_ptr("i64")),
        (Role::MatM, ParamTy::I64),
        (Role::MatN, ParamTy::I64),
        (Role::MatK, ParamTy::I64),
    ]);
    if params.len() > 250 {
        return err(format!("{what}: too many inputs and outputs"));
    }
    Ok(())
}

/// The epilogue code of the GEMV template and its defines, for the epilogue body `epi`
/// of form `form`. Per block (`warp` false, `KILN_EPILOGUE`): the block's columns of the
/// epilogue for every row of x, reading y through `kiln_epi_y`. Per warp (`warp`,
/// `KILN_WARP_EPILOGUE`, see `GV_EPI_WARP` in `gemv.cu`): lane 0 of the warp that owns
/// column `row0` computes the epilogue of that column for the one row of x, reading y
/// through `kiln_epi_yw`.
fn epilogue_code(
    epi: &FusedBody,
    syms: &[Sym],
    form: &kiln_ops::Epilogue,
    warp: bool,
) -> Result<(String, Defines), CodegenError> {
    let mut g = Gen::new(epi, syms);
    let (head, code) = g.elementwise(&form.domain)?;
    let mut text = String::new();
    for l in head.lines() {
        writeln!(text, "    {l}").expect("to a string");
    }
    if warp {
        text.push_str("        const kiln_epi_yw in0 = {gv_wy, n, row0};\n");
        text.push_str("        (void)n_items;\n");
        text.push_str("        const i64 i = row0;\n");
        for l in code.lines() {
            writeln!(text, "{l}").expect("to a string");
        }
    } else {
        text.push_str("        const kiln_epi_y in0 = {gv_ey, n, tile};\n");
        text.push_str("        (void)n_items;\n");
        text.push_str("        for (int q = threadIdx.x; q < mm * GV_EPI_T; q += blockDim.x) {\n");
        text.push_str("            const int r = q / GV_EPI_T;\n");
        text.push_str("            const i64 col = tile * GV_EPI_T + (q - r * GV_EPI_T);\n");
        text.push_str("            if (col >= GV_EPI_W) continue;\n");
        text.push_str("            const i64 i = (i64)r * GV_EPI_W + col;\n");
        for l in code.lines() {
            writeln!(text, "    {l}").expect("to a string");
        }
        text.push_str("        }");
    }
    // GV_EPI_OFF(s): offset s, a constant expression (no array in local memory).
    let off = form
        .offsets
        .iter()
        .enumerate()
        .rev()
        .fold(String::from("0LL"), |acc, (i, o)| format!("((s) == {i} ? {o}LL : {acc})"));
    let defines = vec![
        (if warp { "GV_EPI_WARP" } else { "GV_EPI" }, "1".to_string()),
        ("GV_EPI_S", form.offsets.len().to_string()),
        ("GV_EPI_OFF(s)", off),
        ("GV_EPI_W", format!("{}LL", form.width)),
    ];
    Ok((text, defines))
}

/// The scaled GEMV without the epilogue for one row of x, with the split a plain one-row
/// GEMV over the group's weight takes ([`GemvConfig::for_shape`]): what the engine
/// launches, and what the plan's launch list and the viewer name.
pub fn gemv_scaled_one_row(body: &FusedBody, syms: &[Sym]) -> Result<(Kernel, GemvConfig), CodegenError> {
    let w = body.inputs.last().ok_or_else(|| CodegenError("gemv_scaled: a body without inputs".into()))?;
    let cfg = GemvConfig::for_shape(1, decode::weight_row_bytes(w));
    Ok((gemv_scaled(body, syms, cfg, false)?, cfg))
}

/// WIP (`KILN_GREEDY_FOLD`): [`gemv_scaled_one_row`] that also samples greedily: every
/// warp keeps the best (y as stored, row) of its rows (`kiln_before`: NaN first, then the
/// largest, ties to the lower row), and every block takes atomicMax of its best pair's
/// `kiln_argmax_key` into the output after the prologue's (u64 `[1]`, zero before the
/// launch), which `resident::step_end_key` decodes. For the LM head of a decode step at
/// batch 1, whose logits are y cast to f32: the greedy kernel is no longer launched.
pub fn gemv_scaled_argmax(body: &FusedBody, syms: &[Sym]) -> Result<(Kernel, GemvConfig), CodegenError> {
    let w = body.inputs.last().ok_or_else(|| CodegenError("gemv_scaled: a body without inputs".into()))?;
    let cfg = GemvConfig::for_shape(1, decode::weight_row_bytes(w));
    Ok((gemv_scaled_with(body, syms, cfg, EpiMode::None, false, true, None)?, cfg))
}

/// Blocks of a [`gemv_epilogue`] launch: one per `cfg.warps / slices` epilogue columns.
pub fn gemv_epilogue_items(form: &kiln_ops::Epilogue, cfg: GemvConfig) -> usize {
    let cols = (cfg.warps / form.offsets.len().max(1)).max(1);
    form.width.div_ceil(cols)
}

/// How a [`FusedKind::MatVec`] prologue factors for [`gemv_scaled`]: x = A · S, where
/// A is computed elementwise (no reduction) and S is a value per row of x computed from
/// the prologue's reductions (RMSNorm: A = γ · h, S = rsqrt(mean(h²) + ε)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaledPrologue {
    /// Prologue values whose product (in f32) is A: full-shaped, reduction-free.
    pub a: Vec<FusedRef>,
    /// Row-shaped prologue values whose product (in f32) is S.
    pub s: Vec<FusedRef>,
    /// The reductions (body node indices): one level, float sum / mean / max over the
    /// columns of x.
    pub reductions: Vec<usize>,
    /// Prologue outputs (indices into the prologue's outputs) the kernel writes: the
    /// full-shaped ones computed without a reduction. The others (x among them) are not
    /// written: the caller checks nothing reads them.
    pub written: Vec<usize>,
}

/// The factorization of a matrix-vector body's prologue for [`gemv_scaled`], or why it
/// has none. x must be a product of reduction-free values and broadcasts of row values
/// (casts between float types are looked through: A · S is computed in f32, without the
/// roundings of the casts, so the result differs from the CPU reference by those
/// roundings, like any reordered f32 sum).
pub fn scaled_prologue(body: &FusedBody) -> Result<ScaledPrologue, CodegenError> {
    let kind = body.kind().map_err(|e| CodegenError(format!("fused matrix-vector group: {e}")))?;
    let FusedKind::MatVec { prologue, x, .. } = kind else {
        return err("scaled_prologue: the body is no matrix-vector group");
    };
    let pro = body.prologue().expect("a matrix-vector body has a prologue");
    let xt = body.ty(x).expect("checked");
    let rank = xt.shape.rank();
    let rows_rank = prologue_rows(*prologue, &xt.shape).0.rank();
    // Which prologue values depend on a reduction.
    let mut dep = vec![false; pro.nodes.len()];
    for (i, n) in pro.nodes.iter().enumerate() {
        dep[i] = matches!(n.op, Op::Reduce { .. })
            || n.operands.iter().any(|r| matches!(r, FusedRef::Node { node, .. } if dep[*node as usize]));
    }
    let depends = |r: FusedRef| matches!(r, FusedRef::Node { node, .. } if dep[node as usize]);
    let (mut a, mut s) = (Vec::new(), Vec::new());
    let mut stack = vec![x];
    while let Some(r) = stack.pop() {
        if !depends(r) {
            a.push(r);
            continue;
        }
        let FusedRef::Node { node, .. } = r else { unreachable!("inputs depend on nothing") };
        let n = &pro.nodes[node as usize];
        let ty = |r: FusedRef| pro.ty(r).expect("checked");
        match &n.op {
            Op::Binary(kiln_ops::BinaryOp::Mul) if n.outputs[0].dtype.is_float() => {
                stack.extend(n.operands.iter().rev().copied());
            }
            Op::Cast(to) if to.is_float() && ty(n.operands[0]).dtype.is_float() => stack.push(n.operands[0]),
            Op::Expand(_) => {
                let v = n.operands[0];
                let vs = &ty(v).shape;
                if vs.rank() != rank || (rows_rank..rank).any(|k| vs.dim(k).as_fixed() != Some(1)) {
                    return err(format!("scaled_prologue: node {node} broadcasts a value that is not one per row"));
                }
                s.push(v);
            }
            other => {
                return err(format!(
                    "scaled_prologue: x is not a product of row values and reduction-free values (node {node}: `{}`)",
                    other.name()
                ))
            }
        }
    }
    // The reductions x depends on: one level, float sum / mean / max.
    let mut reductions = Vec::new();
    let mut seen = vec![false; pro.nodes.len()];
    let mut stack: Vec<FusedRef> = s.clone();
    while let Some(r) = stack.pop() {
        let FusedRef::Node { node, .. } = r else { continue };
        if std::mem::replace(&mut seen[node as usize], true) {
            continue;
        }
        let n = &pro.nodes[node as usize];
        if let Op::Reduce { .. } = n.op {
            let operand = n.operands[0];
            if depends(operand) {
                return err("scaled_prologue: a reduction of a reduced value (two levels)");
            }
            if !pro.ty(operand).expect("checked").dtype.is_float() || !n.outputs[0].dtype.is_float() {
                return err("scaled_prologue: a reduction over integers");
            }
            reductions.push(node as usize);
        } else {
            stack.extend(n.operands.iter().copied());
        }
    }
    reductions.sort_unstable();
    let written = pro
        .outputs
        .iter()
        .enumerate()
        .filter(|&(_, &r)| !depends(r) && pro.ty(r).expect("checked").shape == xt.shape)
        .map(|(i, _)| i)
        .collect();
    Ok(ScaledPrologue { a, s, reductions, written })
}

/// [`scaled_prologue`] of matrix-vector group node `n` of `g`, when the scaled GEMV may
/// run it: besides the factorization, nothing may read a prologue output the kernel
/// does not write (x, normally read by the product alone), neither a node nor a graph
/// output. The one rule the engine, the plan's launch list and the viewer use.
pub fn scaled_prologue_in(g: &kiln_graph::Graph, n: kiln_graph::NodeId) -> Result<ScaledPrologue, CodegenError> {
    let Op::Fused(body) = &g.node(n).op else {
        return err("scaled_prologue_in: not a fused node");
    };
    let plan = scaled_prologue(body)?;
    let n_pro = body.prologue().map_or(0, |p| p.outputs.len());
    for j in (0..n_pro).filter(|j| !plan.written.contains(j)) {
        let v = kiln_graph::Value::new(n, j as u8);
        let read = g.outputs().values().any(|&o| o == v)
            || g.users(n).into_iter().any(|(u, i)| g.operands(u).get(i as usize) == Some(&v));
        if read {
            return err(format!(
                "scaled_prologue_in: prologue output {j} is read elsewhere, and the scaled GEMV does not write it"
            ));
        }
    }
    Ok(plan)
}

/// The GEMV of a [`FusedKind::MatVec`] body whose prologue factors as x = A · S
/// ([`scaled_prologue`], e.g. an RMSNorm, with the residual add before it): every block
/// stages A (computed from the group's inputs, no reduction before its first FMA) and,
/// in the same pass over the columns, its share of the reductions; the warps' partial
/// sums meet in shared memory at a barrier after the staging, where every thread computes
/// S, and each warp scales its dot products by it: `y = round(S · Σ w · A)`. Block 0
/// also writes the prologue outputs [`ScaledPrologue::written`] lists (the residual
/// sum). With `epilogue` (the body has one), the blocks then compute it like
/// [`gemv_epilogue`] (`cfg` one row per warp); without, y is the product.
///
/// Parameters: `out`, … (the epilogue's outputs, with `epilogue`), y, then the prologue's
/// outputs (each its own parameter, written or not), `in{1 + i}` for body input `i` but
/// the weight, the weight, `syms`, `m` (rows of x), `n`, `k`. With `epilogue`, one
/// block per epilogue tile ([`gemv_epilogue_items`]); without, the blocks loop over the
/// tiles of `cfg.rows_per_block()` rows of w, staging A and computing S once each, so
/// launch at most [`crate::decode::gemv_items_with`] of them (the engine: one wave, from
/// the kernel's occupancy); any grid size is correct. `cfg` is for one row of x
/// (`max_rows` 1): the caller launches it for `m` = 1 when
/// [`crate::decode::gemv_prologue_fits`]`(1, k)`.
pub fn gemv_scaled(body: &FusedBody, syms: &[Sym], cfg: GemvConfig, epilogue: bool) -> Result<Kernel, CodegenError> {
    let epi = if epilogue { EpiMode::Block } else { EpiMode::None };
    gemv_scaled_with(body, syms, cfg, epi, false, false, None)
}

/// [`gemv_scaled`] with the epilogue computed per warp (`GV_EPI_WARP` in `gemv.cu`):
/// each warp owns one epilogue column per tile and computes the column's row of w in
/// every slice of the epilogue (SwiGLU: its gate and its up row), so it holds the y
/// values the column's epilogue reads and computes it without waiting for the other
/// warps; the blocks loop over the tiles of `cfg.warps` columns like the plain looping
/// form, staging A and computing S once. For one row of x. The warps per block are
/// [`gemv_scaled_one_row`]'s (so the norm's reduction, and y, come out bit for bit as
/// that kernel's), with 8 weight loads of 16 bytes in flight per lane over the slices'
/// rows, as the one-row GEMV keeps: on an H200 (2026-12-04, Llama-3.2-1B shape, batch 1,
/// same run) 16 gave 875.6 tok/s, 4 gave 1,184.3, 8 1,195.6. Parameters: [`gemv_scaled`]'s
/// with the epilogue; launch at most [`gemv_epilogue_warp_items`] blocks (the engine: one
/// wave); any grid size is correct. Returns the kernel and its split.
pub fn gemv_scaled_epi_warp(body: &FusedBody, syms: &[Sym]) -> Result<(Kernel, GemvConfig), CodegenError> {
    let Ok(FusedKind::MatVec { epilogue: Some(form), .. }) = body.kind() else {
        return err("gemv_scaled_epi_warp: the body is no matrix-vector group with an epilogue");
    };
    let s = form.offsets.len();
    if !(1..=GEMV_EPI_WARP_SLICES).contains(&s) {
        return err(format!("gemv_scaled_epi_warp: {s} epilogue slices (1..={GEMV_EPI_WARP_SLICES})"));
    }
    let w = body.inputs.last().ok_or_else(|| CodegenError("gemv_scaled_epi_warp: a body without inputs".into()))?;
    let warps = GemvConfig::for_shape(1, decode::weight_row_bytes(w)).warps;
    // WIP knob (wip/residency): KILN_EPI_WARP_LOADS, 16-byte loads in flight per lane.
    let loads = env_usize("KILN_EPI_WARP_LOADS").unwrap_or(8);
    let cfg = GemvConfig { warps, rows_per_warp: s, unroll: (loads / s).max(1), ksplit: 1, max_rows: 1 };
    Ok((gemv_scaled_with(body, syms, cfg, EpiMode::Warp, false, false, None)?, cfg))
}

/// [`gemv_scaled_epi_warp`] that also
/// computes the one-row product consuming the epilogue's output in the same launch
/// (`GV_CHAIN` in `gemv.cu`): SwiGLU's z, then the down projection `y2 = z · w2ᵀ`, with
/// no kernel boundary between them. The blocks count themselves into a counter as they
/// finish their tiles and spin until all have, so every block must be resident at once:
/// launch at most one wave (the kernel's occupancy) and at most
/// [`gemv_epilogue_warp_items`] blocks. y2 has the bits of the plain one-row GEMV over
/// z (the same per-lane order, f32 accumulation, one rounding). The epilogue must have
/// one output, of the weight's dtype, as `w2 [n2, width]` (`width` the epilogue's, at
/// most [`decode::GEMV_STAGED_FLOATS`]). Parameters: [`gemv_scaled_epi_warp`]'s, then
/// `p1_0` (w2), `p1_1` (y2 `[n2]`, dtype `y2`), `p1_2` (n2, i64), `counters` (two
/// `unsigned int` 128 bytes apart, zero before the first launch; the kernel leaves them
/// zero).
pub fn gemv_scaled_epi_warp_chain(
    body: &FusedBody,
    syms: &[Sym],
    w2: DType,
    y2: DType,
) -> Result<(Kernel, GemvConfig), CodegenError> {
    gemv_scaled_epi_warp_chain_helped(body, syms, w2, y2, chain_help())
}

/// [`gemv_scaled_epi_warp_chain`] with `help` (0..=3) steps of each chained row copied by
/// a helper warp (`GV_CH_HELP` in `gemv.cu`; the kernel takes that many 4 KiB copies per
/// helper of dynamic shared memory). [`gemv_scaled_epi_warp_chain`] takes [`chain_help`].
pub fn gemv_scaled_epi_warp_chain_helped(
    body: &FusedBody,
    syms: &[Sym],
    w2: DType,
    y2: DType,
    help: usize,
) -> Result<(Kernel, GemvConfig), CodegenError> {
    if help > 3 {
        return err(format!("gemv_scaled_epi_warp_chain: {help} helped steps (0..=3)"));
    }
    let (_, cfg) = gemv_scaled_epi_warp(body, syms)?;
    let chain = Chain { w2, y2, help };
    Ok((gemv_scaled_with(body, syms, cfg, EpiMode::Warp, false, false, Some(chain))?, cfg))
}

/// A measurement knob: whether a chained kernel takes the rows of its next product
/// block-major, its blocks without rows leaving before the spin (`GV_CH_BM` in
/// `gemv.cu`): `KILN_CHAIN_BM=1` in the environment (ignored with [`chain_help`]).
pub fn chain_block_major() -> bool {
    env_flag("KILN_CHAIN_BM")
}

/// 16-byte loads in flight per lane in a chained kernel's rows of the next product
/// (`GV_CH_U` in `gemv.cu`).
const CHAIN_LOADS: usize = 8;

/// A measurement knob: the steps of each chained row that a helper warp copies into shared
/// memory (`GV_CH_HELP` in `gemv.cu`): `KILN_CHAIN_HELP=H` (1..=3) in the environment, 0
/// (none) by default.
pub fn chain_help() -> usize {
    env_usize("KILN_CHAIN_HELP").filter(|h| (1..=3).contains(h)).unwrap_or(0)
}

/// What [`gemv_scaled_with`] chains: the next product's weight and y dtypes.
#[derive(Clone, Copy)]
struct Chain {
    w2: DType,
    y2: DType,
    /// Steps of each chained row a helper warp copies (`GV_CH_HELP`).
    help: usize,
}

/// Epilogue slices (weight rows per warp) [`gemv_scaled_epi_warp`] takes at most.
pub const GEMV_EPI_WARP_SLICES: usize = 4;

/// Blocks of a [`gemv_scaled_epi_warp`] launch that have a tile: one per `cfg.warps`
/// epilogue columns.
pub fn gemv_epilogue_warp_items(form: &kiln_ops::Epilogue, cfg: GemvConfig) -> usize {
    form.width.div_ceil(cfg.warps.max(1))
}

/// Where a scaled GEMV computes its group's epilogue.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EpiMode {
    /// Not at all: y is the product.
    None,
    /// Per block, after a barrier (`GV_EPI`).
    Block,
    /// Per warp (`GV_EPI_WARP`).
    Warp,
}

/// The streaming form of [`gemv_scaled`] (`gemv_stream.cu` with `GS_SCALE`, see
/// [`crate::decode::gemv_stream`]): persistent blocks of
/// [`crate::decode::GEMV_STREAM_WARPS`] warps stream the weight through per-warp
/// `cp.async` rings; each block stages A and computes S once (the same generated code),
/// block 0 writes the prologue's written outputs, every row's sum is scaled by S. No
/// epilogue. Parameters: [`gemv_scaled`]'s without an epilogue. Launch over
/// [`crate::decode::gemv_stream_items`] blocks with the kernel's dynamic shared memory,
/// for one row of x, when the weight rows fit ([`crate::decode::gemv_stream_fits`]).
pub fn gemv_stream_scaled(body: &FusedBody, syms: &[Sym]) -> Result<Kernel, CodegenError> {
    let cfg = GemvConfig { warps: decode::GEMV_STREAM_WARPS, rows_per_warp: 1, unroll: 4, ksplit: 1, max_rows: 1 };
    gemv_scaled_with(body, syms, cfg, EpiMode::None, true, false, None)
}

/// [`gemv_stream_scaled`] where the engine runs it for one row of x: the weight's rows
/// are short ([`crate::decode::gemv_stream_pays`]) and the kernel renders; `None`
/// otherwise (the tiled [`gemv_scaled`] runs). The engine, the plan's launch list and the
/// viewer all ask here.
pub fn gemv_stream_scaled_if_pays(body: &FusedBody, syms: &[Sym]) -> Option<Kernel> {
    let w = body.inputs.last()?;
    let k = w.shape.dims().last()?.as_fixed()?;
    decode::gemv_stream_pays(w.dtype, k).then(|| gemv_stream_scaled(body, syms).ok()).flatten()
}

/// What the engine runs for one row of x of a matrix-vector group whose norm the scaled
/// GEMV computes, for the plan's launch list and the viewer: the kernel to show and a
/// description naming the alternatives. Without an epilogue, the streaming form where
/// [`gemv_stream_scaled_if_pays`], else the tiled [`gemv_scaled_one_row`]; with one, the
/// tiled form (the epilogue inside when its blocks fit in one wave, else
/// [`gemv_scaled_epi_warp`], or where that does not render the streaming form, if it
/// pays, or the tiled one, then the epilogue's kernel).
pub fn scaled_gemv_one_row_choice(body: &FusedBody, syms: &[Sym]) -> Result<(Kernel, String), CodegenError> {
    let (tiled, _) = gemv_scaled_one_row(body, syms)?;
    let epilogue = matches!(body.kind(), Ok(FusedKind::MatVec { epilogue: Some(_), .. }));
    let norm = "the norm as a scale after the products";
    let one_wave = "with the epilogue when its blocks fit in one wave";
    if epilogue {
        if let Ok((w, _)) = gemv_scaled_epi_warp(body, syms) {
            let text = format!(
                "{} for one row of x ({norm}; {one_wave}, else {} computing it per warp)",
                tiled.sig.name, w.sig.name
            );
            return Ok((tiled, text));
        }
    }
    Ok(match (gemv_stream_scaled_if_pays(body, syms), epilogue) {
        (Some(s), false) => {
            let text = format!(
                "{} for one row of x (streaming the short weight rows, else {}; {norm})",
                s.sig.name, tiled.sig.name
            );
            (s, text)
        }
        (Some(s), true) => {
            let text = format!(
                "{} for one row of x ({norm}; {one_wave}, else {} streaming the short weight rows, then the \
                 epilogue's kernel)",
                tiled.sig.name, s.sig.name
            );
            (tiled, text)
        }
        (None, e) => {
            let epi = if e { format!("; {one_wave}, then the epilogue's kernel otherwise") } else { String::new() };
            let text = format!("{} for one row of x ({norm}{epi})", tiled.sig.name);
            (tiled, text)
        }
    })
}

/// The scaled GEMV's kernel in its forms: the epilogue `mode`, the streaming form
/// (`stream`), the sampling LM head (`argmax`), and with `chain` (the per-warp epilogue
/// form only) the products chained into its launch (`GV_CHAIN*` in `gemv.cu`).
fn gemv_scaled_with(
    body: &FusedBody,
    syms: &[Sym],
    cfg: GemvConfig,
    mode: EpiMode,
    stream: bool,
    argmax: bool,
    chain: Option<Chain>,
) -> Result<Kernel, CodegenError> {
    body.check().map_err(|e| CodegenError(format!("fused matrix-vector group: {e}")))?;
    let help = chain.as_ref().map_or(0, |c| c.help); // GV_CH_HELP
    let kind = body.kind().map_err(|e| CodegenError(format!("fused matrix-vector group: {e}")))?;
    let FusedKind::MatVec { prologue, x, weight, epilogue: form } = kind else {
        return err("gemv_scaled: the body is no matrix-vector group");
    };
    decode::gemv_check(cfg)?;
    if cfg.ksplit != 1 || cfg.max_rows != 1 {
        return err(format!("gemv_scaled: the split {cfg:?} must be for one row of x, without split-K"));
    }
    let form = match (mode, form) {
        (EpiMode::None, _) => None,
        (EpiMode::Block, Some(f)) => {
            if cfg.rows_per_warp != 1 || cfg.warps < f.offsets.len() {
                return err(format!("gemv_scaled: the split {cfg:?} must have one row per warp and a warp per slice"));
            }
            Some(f)
        }
        (EpiMode::Warp, Some(f)) => {
            if cfg.rows_per_warp != f.offsets.len() || stream {
                return err(format!("gemv_scaled: the split {cfg:?} must have a row per warp and slice"));
            }
            Some(f)
        }
        (_, None) => return err("gemv_scaled: the body has no epilogue"),
    };
    let plan = scaled_prologue(body)?;
    let nin = body.inputs.len() - 1;
    if weight as usize != nin {
        return err("gemv_scaled: the weight must be the body's last input");
    }
    let pro = body.prologue().expect("a matrix-vector body has a prologue");
    let xt = body.ty(x).expect("checked");
    let (rows, cols) = prologue_rows(*prologue, &xt.shape);
    let e = match &form {
        Some(_) => body.epilogue().expect("a body with an epilogue form has one").outputs.len(),
        None => 0,
    };
    let pro_out = |j: usize| Role::Out((e + 1 + j) as u8);

    // The staging pass for the one row of x (see `scaled_staging`).
    let (staging, nred, ncols_fixed) = scaled_staging(&pro, &plan, (&rows, &cols), syms, cfg.warps, &pro_out)?;

    // The epilogue, as gemv_epilogue generates it.
    let (epi_text, epi_defines) = match (&form, mode) {
        (Some(f), mode) => epilogue_code(&body.epilogue().expect("checked"), syms, f, mode == EpiMode::Warp)?,
        (None, _) => (String::new(), Vec::new()),
    };
    let (block_epi, warp_epi) = match mode {
        EpiMode::Warp => ("", epi_text.trim_end_matches('\n')),
        _ => (epi_text.trim_end_matches('\n'), ""),
    };

    let what = "fused matrix-vector group";
    let wt = &body.inputs[nin];
    let yt = &body.nodes[body.matmul_node().expect("checked")].outputs[0];
    let (xs, ws, ys) = (
        decode::float_storage(xt.dtype, &format!("{what}: x"))?,
        decode::float_storage(wt.dtype, &format!("{what}: weight"))?,
        decode::float_storage(yt.dtype, &format!("{what}: y"))?,
    );
    let mut params = Vec::new();
    if form.is_some() {
        let epi = body.epilogue().expect("checked");
        for (i, &r) in epi.outputs.iter().enumerate() {
            let d = epi.ty(r).expect("checked").dtype;
            params.push((Role::Out(i as u8), ParamTy::ptr(storage(d, &format!("epilogue output {i}"))?)));
        }
    }
    params.push((Role::Out(e as u8), ParamTy::ptr(ys)));
    for (j, &r) in pro.outputs.iter().enumerate() {
        let d = pro.ty(r).expect("checked").dtype;
        params.push((pro_out(j), ParamTy::ptr(storage(d, &format!("prologue output {j}"))?)));
    }
    for (i, t) in body.inputs[..nin].iter().enumerate() {
        params.push((Role::In((i + 1) as u8), ParamTy::const_ptr(storage(t.dtype, &format!("fused input {i}"))?)));
    }
    params.push((Role::In((nin + 1) as u8), ParamTy::const_ptr(ws)));
    gemv_params_end(&mut params, "gemv_scaled")?;
    // The argmax key: the output after the prologue's.
    let key = Role::Out((e + 1 + pro.outputs.len()) as u8);
    if argmax {
        if mode != EpiMode::None || stream {
            return err("gemv_scaled_argmax: the plain looping form only");
        }
        params.push((key, ParamTy::ptr("unsigned long long")));
    }
    if let Some(Chain { w2, y2, .. }) = chain {
        let epi = body.epilogue().expect("checked");
        let (Some(f), EpiMode::Warp, false, false) = (&form, mode, stream, argmax) else {
            return err("gemv_scaled_epi_warp_chain: the per-warp epilogue form only");
        };
        let z = epi.outputs.iter().map(|&r| epi.ty(r).expect("checked").dtype).collect::<Vec<_>>();
        if z != [wt.dtype] || w2 != wt.dtype {
            return err(format!(
                "gemv_scaled_epi_warp_chain: the epilogue's outputs {z:?} must be one of the weight's dtype ({}), as \
                 the chained weight's ({w2})",
                wt.dtype
            ));
        }
        let vec = decode::vec_elems(wt.dtype);
        if f.width % vec != 0 || f.width > decode::GEMV_STAGED_FLOATS {
            return err(format!(
                "gemv_scaled_epi_warp_chain: the chained rows of {} elements must be whole 16-byte vectors and fit \
                 the staging ({} floats)",
                f.width,
                decode::GEMV_STAGED_FLOATS
            ));
        }
        params.extend([
            (Role::Part(1, 0), ParamTy::const_ptr(ws)),
            (Role::Part(1, 1), ParamTy::ptr(decode::float_storage(y2, "the chained product's y")?)),
            (Role::Part(1, 2), ParamTy::I64),
            (Role::Counters, ParamTy::ptr("unsigned int")),
        ]);
    }
    let mut defines = decode::gemv_defines(xs, ws, ys, decode::vec_elems(wt.dtype), cfg);
    if chain.is_some() {
        defines.extend([
            ("GV_CHAIN", "1".to_string()),
            ("GV_CH_U", CHAIN_LOADS.to_string()),
            ("GV_CH_HELP", help.to_string()),
            ("GV_CH_BM", u8::from(chain_block_major() && help == 0).to_string()),
            ("GV_CH_W", Role::Part(1, 0).c_name()),
            ("GV_CH_Y", Role::Part(1, 1).c_name()),
            ("GV_CH_N", Role::Part(1, 2).c_name()),
            ("GV_CH_X", Role::Out(0).c_name()),
            ("GV_CH_CTR", Role::Counters.c_name()),
        ]);
    }
    if stream {
        let Some(k) = body.inputs[nin].shape.dims().last().and_then(|d| d.as_fixed()) else {
            return err("gemv_stream_scaled: the weight's row length must be fixed");
        };
        if !decode::gemv_stream_fits(wt.dtype, k) || ncols_fixed != k {
            return err(format!("gemv_stream_scaled: weight rows of {k} elements ({ncols_fixed} columns of x)"));
        }
        let (template, mut defines, grid, smem) = decode::gemv_stream_parts((xs, ws, ys), wt.dtype, k, &staging);
        defines.extend([
            ("GS_SCALE", "1".to_string()),
            ("GV_NRED", nred.max(1).to_string()),
            ("GS_X", "((const KILN_X*)0)".to_string()),
            ("GS_W", Role::In((nin + 1) as u8).c_name()),
            ("GS_Y", Role::Out(e as u8).c_name()),
        ]);
        let mut kernel = render_hashed("kiln_gemv_stream_scaled", params, &template, &defines, grid);
        kernel.dynamic_smem = smem;
        return Ok(kernel);
    }
    defines.extend([
        ("KILN_RESIDUAL", "0".to_string()),
        ("GV_PROLOGUE", "1".to_string()),
        ("GV_SCALE", "1".to_string()),
        ("GV_SCALE_LOOP", u8::from(mode != EpiMode::Block).to_string()),
        ("GV_NRED", nred.max(1).to_string()),
        ("GV_X", "((const KILN_X*)0)".to_string()),
        ("GV_W", Role::In((nin + 1) as u8).c_name()),
        ("GV_Y", Role::Out(e as u8).c_name()),
        ("GV_RES", "(const KILN_Y*)0".to_string()),
    ]);
    defines.extend(epi_defines);
    if argmax {
        defines.extend([("GV_ARGMAX", "1".to_string()), ("GV_KEY", key.c_name())]);
    }
    // The helper warps' copies (GV_CH_HELP) take the cp.async helpers.
    let cp = if help > 0 { decode::CACHE_ATTENTION } else { "" };
    let template = format!("{}{cp}{}", decode::VECTOR_HELPERS, decode::GEMV)
        .replace("KILN_PROLOGUE", &staging)
        .replace("KILN_WARP_EPILOGUE", warp_epi)
        .replace("KILN_EPILOGUE", block_epi);
    let grid = Grid::BlockPerItem { threads: 32 * cfg.warps as u32 };
    let prefix = match mode {
        EpiMode::Warp if chain.is_some() => "kiln_gemv_scaled_chain",
        EpiMode::None if argmax => "kiln_gemv_scaled_amax",
        EpiMode::None => "kiln_gemv_scaled",
        EpiMode::Block => "kiln_gemv_scaled_epi",
        EpiMode::Warp => "kiln_gemv_scaled_epiw",
    };
    let mut kernel = render_hashed(prefix, params, &template, &defines, grid);
    // GV_CH_HELP: GV_WARPS / 2 helpers' copies of `help` steps of 32·GV_CH_U vectors.
    kernel.dynamic_smem = (cfg.warps / 2 * help * 32 * CHAIN_LOADS * 16) as u32;
    // At most 64 registers per thread (2 blocks of 512 threads, 4 of 256 per
    // multiprocessor, what the plain one-row GEMV gets): the staging's loads, all in
    // flight next to the weight loads, would otherwise take 79 (sm_90, 2,048 columns)
    // and halve the resident blocks; capped, ptxas spills a few index registers.
    let threads = 32 * cfg.warps;
    // WIP knob (wip/residency): KILN_EPI_WARP_BOUNDS, the per-warp epilogue form's
    // blocks per multiprocessor in its launch bounds (3: at most 42 registers).
    let min_blocks = match (mode, env_usize("KILN_EPI_WARP_BOUNDS")) {
        (EpiMode::Warp, Some(b)) => b.max(1),
        _ => (65536 / (threads * 64)).max(1),
    };
    let plain = format!("__global__ void {}(", kernel.sig.name);
    let bounded = format!("__global__ void __launch_bounds__({threads}, {min_blocks}) {}(", kernel.sig.name);
    kernel.source = kernel.source.replacen(&plain, &bounded, 1);
    Ok(kernel)
}

/// The staging pass of a scaled GEMV ([`gemv_scaled`]) for the prologue `pro` (with the
/// factoring `plan`, rows and columns of x `rows`, `cols`), for blocks of `warps` warps:
/// the code that stages A and computes S into `gv_s[0]` (its body inputs named
/// `in{i + 1}`, its written outputs `pro_out(j)`), the number of reductions, and the
/// columns of x.
fn scaled_staging(
    pro: &FusedBody,
    plan: &ScaledPrologue,
    (rows, cols): (&Shape, &Shape),
    syms: &[Sym],
    warps: usize,
    pro_out: &dyn Fn(usize) -> Role,
) -> Result<(String, usize, usize), CodegenError> {
    // The staging pass for the one row of x: A into the staging, the reductions'
    // partial sums, block 0's stores of the written outputs; a barrier; then every
    // thread combines the warps' partials and computes S, before its products (whose
    // weights are still in flight). Every load of the pass (the columns' and those S
    // needs besides the reductions, e.g. ε) is issued before the first use of any.
    let mut g = Gen::new(pro, syms);
    g.in_base = 1; // in0 is the GEMV's x parameter, unused by the prologue form
    g.indent = 2;
    let ncols = g.dim(&cols.numel())?;
    let reds: Vec<(usize, Reduction)> = plan
        .reductions
        .iter()
        .map(|&k| {
            let Op::Reduce { op, .. } = pro.nodes[k].op else { unreachable!("reductions") };
            Ok((k, reduction(op, pro.ty(pro.nodes[k].operands[0]).expect("checked").dtype, k)?))
        })
        .collect::<Result<_, CodegenError>>()?;
    let product = |vals: &[String]| -> String {
        if vals.is_empty() {
            "1.0f".to_string()
        } else {
            vals.iter().map(|v| format!("(float){v}")).collect::<Vec<_>>().join(" * ")
        }
    };
    let Some(ncols_fixed) = cols.numel().as_fixed() else {
        return err("gemv_scaled: the prologue's column count must be fixed");
    };
    let per_thread = ncols_fixed.div_ceil(32 * warps).max(1);
    g.line("const i64 row = 0;");
    let row = g.delinearize("row", rows.dims())?;
    g.row = Some(row.clone());
    for (i, (_, red)) in reds.iter().enumerate() {
        g.line(format!("float gv_acc{i} = {};", red.init));
    }
    for (w, &o) in plan.written.iter().enumerate() {
        let c = compute(pro.ty(pro.outputs[o]).expect("checked").dtype, "a prologue output")?;
        g.line(format!("{c} gv_w{w}[{per_thread}];"));
    }
    // Lines that compute indices or load go first (in order), the rest after them. A
    // generated branch (concat) cannot be split so.
    let mut loads = String::new();
    let mut rest = String::new();
    let split = |code: String, loads: &mut String, rest: &mut String| -> Result<(), CodegenError> {
        for l in code.lines() {
            let t = l.trim_start();
            if t.contains('{') || t.contains('}') {
                return err("gemv_scaled: the prologue needs branches (concat) in its column loop");
            }
            let early = t.starts_with("const i64 ") || t.starts_with("const bool ") || t.contains("kiln_ld(");
            writeln!(if early { &mut *loads } else { &mut *rest }, "{l}").expect("to a string");
        }
        Ok(())
    };
    // The thread's columns unrolled by hand, without a branch: a thread past the last
    // column computes the last column again (its staging store writes the same value)
    // and adds the reduction's identity.
    for u in 0..per_thread {
        let before = std::mem::take(&mut g.lines);
        g.line(format!("const i64 gv_j{u} = threadIdx.x + {u} * (32 * GV_WARPS);"));
        g.line(format!("const bool gv_ok{u} = gv_j{u} < {ncols};"));
        g.line(format!("const i64 j{u} = gv_ok{u} ? gv_j{u} : {ncols} - 1;"));
        let cc = g.delinearize(&format!("j{u}"), cols.dims())?;
        let coord: Vec<String> = row.iter().cloned().chain(cc).collect();
        let mut av = Vec::new();
        for &r in &plan.a {
            av.push(g.value(r, &coord)?);
        }
        g.line(format!("gv_stage(xs, 0, j{u}, {}, vec, nv, len);", product(&av)));
        for (i, (k, red)) in reds.iter().enumerate() {
            let v = g.value(pro.nodes[*k].operands[0], &coord)?;
            let acc = format!("gv_acc{i}");
            let v = format!("(gv_ok{u} ? (float){v} : {})", red.init);
            g.line(format!("{acc} = {};", substitute(red.combine, &[&acc, &v])));
        }
        for (w, &o) in plan.written.iter().enumerate() {
            let v = g.value(pro.outputs[o], &coord)?;
            g.line(format!("gv_w{w}[{u}] = {v};"));
        }
        let code = std::mem::replace(&mut g.lines, before);
        split(code, &mut loads, &mut rest)?;
    }
    // S, with the reductions as locals combined after the barrier.
    let before = std::mem::take(&mut g.lines);
    for (i, (k, _)) in reds.iter().enumerate() {
        g.reduced.insert(*k, format!("gv_red_v{i}"));
    }
    let mut sv = Vec::new();
    for &r in &plan.s {
        let rank = pro.ty(r).expect("checked").shape.rank();
        let mut c = row.clone();
        c.resize(rank, String::from("0"));
        sv.push(g.value(r, &c)?);
    }
    g.line(format!("gv_s[0] = {};", product(&sv)));
    let s_code = std::mem::replace(&mut g.lines, before);
    let mut s_rest = String::new();
    split(s_code, &mut loads, &mut s_rest)?;
    g.lines.push_str(&loads);
    g.lines.push_str(&rest);
    for (i, (_, red)) in reds.iter().enumerate() {
        let acc = format!("gv_acc{i}");
        let shfl = substitute(red.combine, &[&acc, &format!("__shfl_xor_sync(0xffffffffu, {acc}, s)")]);
        g.line(format!("for (int s = 16; s > 0; s >>= 1) {acc} = {shfl};"));
        g.line(format!("if (lane == 0) gv_red[{i} * GV_WARPS + warp] = {acc};"));
    }
    if !plan.written.is_empty() {
        g.line("if (blockIdx.x == 0) {");
        for u in 0..per_thread {
            g.line(format!("    if (gv_ok{u}) {{"));
            for (w, &o) in plan.written.iter().enumerate() {
                g.line(format!("        kiln_st({}, row * {ncols} + j{u}, gv_w{w}[{u}]);", pro_out(o).c_name()));
            }
            g.line("    }");
        }
        g.line("}");
    }
    g.line("__syncthreads();  // the warps' partials are complete");
    for (i, (k, red)) in reds.iter().enumerate() {
        let acc = format!("gv_t{i}");
        g.line(format!("float {acc} = gv_red[{i} * GV_WARPS];"));
        let c = substitute(red.combine, &[&acc, &format!("gv_red[{i} * GV_WARPS + w]")]);
        g.line(format!("for (int w = 1; w < GV_WARPS; ++w) {acc} = {c};"));
        let n = &pro.nodes[*k];
        let Op::Reduce { op, .. } = n.op else { unreachable!("reductions") };
        let value = match op {
            ReduceOp::Mean => format!("{acc} / (float){ncols}"),
            _ => acc.clone(),
        };
        g.line(format!("const float gv_red_v{i} = {};", finish(value, n.outputs[0].dtype)));
    }
    g.lines.push_str(&s_rest);
    let staging = std::mem::take(&mut g.lines);
    let head = g.dim_decls()?;
    let block = |code: &str| {
        let mut t = String::from("        {\n");
        for l in head.lines().chain(code.lines()) {
            writeln!(t, "        {l}").expect("to a string");
        }
        t.push_str("        }");
        t
    };
    Ok((block(&staging), reds.len(), ncols_fixed))
}

/// [`crate::kernels::render`] under the name `{prefix}_{hash}`, the hash that of the
/// source rendered under the name `prefix`: generated bodies get stable names, and equal
/// sources share a name (and a kernel-cache entry).
fn render_hashed(
    prefix: &str,
    params: Vec<(Role, ParamTy)>,
    template: &str,
    defines: &[(&str, String)],
    grid: Grid,
) -> Kernel {
    let probe = crate::kernels::render(KernelSig::new(prefix, params.clone()), template, defines, grid);
    let sig = KernelSig::new(format!("{prefix}_{:016x}", fnv1a64(&probe.source)), params);
    crate::kernels::render(sig, template, defines, grid)
}

/// Outputs, inputs, the symbol table, the item count: the contract with the executor.
fn params(body: &FusedBody) -> Result<Vec<(Role, ParamTy)>, CodegenError> {
    if body.outputs.len() > u8::MAX as usize + 1 || body.inputs.len() > u8::MAX as usize + 1 {
        return err(format!(
            "a fused kernel takes at most 256 inputs and outputs, the group has {} and {}",
            body.inputs.len(),
            body.outputs.len()
        ));
    }
    let mut params = Vec::with_capacity(body.outputs.len() + body.inputs.len() + 2);
    for (i, &r) in body.outputs.iter().enumerate() {
        let d = body.ty(r).expect("checked").dtype;
        params.push((Role::Out(i as u8), ParamTy::ptr(storage(d, &format!("fused output {i}"))?)));
    }
    for (i, t) in body.inputs.iter().enumerate() {
        params.push((Role::In(i as u8), ParamTy::const_ptr(storage(t.dtype, &format!("fused input {i}"))?)));
    }
    params.push((Role::Syms, ParamTy::const_ptr("i64")));
    params.push((Role::N, ParamTy::I64));
    Ok(params)
}

fn storage(d: DType, what: &str) -> Result<&'static str, CodegenError> {
    table::storage_type(d).ok_or_else(|| CodegenError(format!("{what}: dtype {d} is not supported on the GPU yet")))
}

fn compute(d: DType, what: &str) -> Result<&'static str, CodegenError> {
    table::compute_type(d).ok_or_else(|| CodegenError(format!("{what}: dtype {d} is not supported on the GPU yet")))
}

/// 64-bit FNV-1a: stable across builds and platforms.
pub(crate) fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// `expr` brought into the value set of `d`, as the CPU reference's `finish` does after
/// every computing op: floats rounded to bf16/f16, 8-bit integers wrapped.
fn finish(expr: String, d: DType) -> String {
    match d {
        DType::BF16 => format!("kiln_rnd_bf16({expr})"),
        DType::F16 => format!("kiln_rnd_f16({expr})"),
        DType::I8 => format!("(int)(signed char)({expr})"),
        DType::U8 => format!("(int)(unsigned char)({expr})"),
        _ => expr,
    }
}

/// Replaces the operand names `a`, `b`, `c` of a table expression by `args` (C locals).
/// Numbers (`1.0f`, `0x7f`) and longer identifiers are left alone.
fn substitute(expr: &str, args: &[&str]) -> String {
    let mut out = String::with_capacity(expr.len() + 8);
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        if ch.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_') {
                out.push(chars[i]);
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            match word.as_str() {
                "a" if !args.is_empty() => out.push_str(args[0]),
                "b" if args.len() > 1 => out.push_str(args[1]),
                "c" if args.len() > 2 => out.push_str(args[2]),
                _ => out.push_str(&word),
            }
        } else {
            out.push(ch);
            i += 1;
        }
    }
    out
}

/// An identifier or a literal: usable in a larger expression without parentheses.
fn is_simple(e: &str) -> bool {
    e.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn paren(e: &str) -> String {
    if is_simple(e) {
        e.to_string()
    } else {
        format!("({e})")
    }
}

/// A reduction's accumulator: C type, initial value, combine, final value.
struct Reduction {
    acc: &'static str,
    init: &'static str,
    /// Combine of `a` and `b`.
    combine: &'static str,
}

fn reduction(op: ReduceOp, d: DType, node: usize) -> Result<Reduction, CodegenError> {
    let wrap_add = "(i64)((unsigned long long)a + (unsigned long long)b)";
    Ok(match (op, d) {
        (_, DType::Bool) => return err(format!("fused body node {node}: `{}` is not defined for bool", op.name())),
        (ReduceOp::Sum | ReduceOp::Mean, d) if d.is_float() => {
            Reduction { acc: "float", init: "0.0f", combine: "a + b" }
        }
        (ReduceOp::Max, d) if d.is_float() => Reduction { acc: "float", init: "-KILN_INF", combine: "kiln_fmax(a, b)" },
        (ReduceOp::Sum | ReduceOp::Mean, _) => Reduction { acc: "i64", init: "(i64)0", combine: wrap_add },
        (ReduceOp::Max, d) => Reduction {
            acc: "i64",
            init: match d {
                DType::I64 => "(i64)(-0x7fffffffffffffffLL - 1)",
                DType::I32 => "(i64)(-0x7fffffff - 1)",
                DType::I8 => "(i64)-128",
                _ => "(i64)0",
            },
            combine: "(a > b ? a : b)",
        },
    })
}

/// The source generator: C lines of the kernel body, the size declarations they use,
/// and the scoped CSE cache.
struct Gen<'a> {
    body: &'a FusedBody,
    syms: &'a [Sym],
    /// Symbolic dims declared at the top of the kernel, with their C names.
    dims: Vec<(Dim, String)>,
    lines: String,
    indent: usize,
    /// Key (a value at a coordinate, or an index expression) → C local.
    cache: HashMap<String, String>,
    /// Keys in insertion order, to forget those of a closed scope.
    log: Vec<String>,
    next: usize,
    /// Rows form: reduction node → its per-row C local, once computed.
    reduced: HashMap<usize, String>,
    /// Rows form: the current row's coordinate (`None` in the elementwise form).
    row: Option<Vec<String>>,
    /// GEMV prologue mode ([`gemv_prologue`]): the output that is the GEMV's x, stored
    /// into the GEMV's staging; block 0 alone writes the outputs to memory.
    stage_x: Option<usize>,
    /// Added to body input numbers in parameter names (`in{i + in_base}`).
    in_base: u8,
}

impl<'a> Gen<'a> {
    fn new(body: &'a FusedBody, syms: &'a [Sym]) -> Gen<'a> {
        Gen {
            body,
            syms,
            dims: Vec::new(),
            lines: String::new(),
            indent: 0,
            cache: HashMap::new(),
            log: Vec::new(),
            next: 0,
            reduced: HashMap::new(),
            row: None,
            stage_x: None,
            in_base: 0,
        }
    }

    fn line(&mut self, s: impl AsRef<str>) {
        for _ in 0..self.indent {
            self.lines.push_str("    ");
        }
        self.lines.push_str(s.as_ref());
        self.lines.push('\n');
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next - 1)
    }

    /// Opens a CSE scope (a branch or loop body): returns the mark to close it with.
    fn enter(&mut self) -> usize {
        self.indent += 1;
        self.log.len()
    }

    fn leave(&mut self, mark: usize) {
        for k in self.log.drain(mark..) {
            self.cache.remove(&k);
        }
        self.indent -= 1;
    }

    fn remember(&mut self, key: String, name: String) {
        self.log.push(key.clone());
        self.cache.insert(key, name);
    }

    /// A dim as C: a literal when fixed, else a named local declared at the top.
    fn dim(&mut self, d: &Dim) -> Result<String, CodegenError> {
        if let Some(n) = d.as_fixed() {
            return Ok(if n > i32::MAX as usize { format!("{n}LL") } else { n.to_string() });
        }
        if let Some((_, name)) = self.dims.iter().find(|(x, _)| x == d) {
            return Ok(name.clone());
        }
        dim_to_c(d, self.syms)?;
        let name = format!("d{}", self.dims.len());
        self.dims.push((d.clone(), name.clone()));
        Ok(name)
    }

    /// The declarations of the symbolic dims used.
    fn dim_decls(&self) -> Result<String, CodegenError> {
        let mut s = String::new();
        for (d, name) in &self.dims {
            writeln!(s, "    const i64 {name} = {};  // {d}", dim_to_c(d, self.syms)?).expect("to a string");
        }
        Ok(s)
    }

    /// An i64 index expression as a simple C term (a local for compound expressions,
    /// generated once per scope).
    fn index(&mut self, expr: String) -> String {
        if is_simple(&expr) {
            return expr;
        }
        let key = format!("i:{expr}");
        if let Some(name) = self.cache.get(&key) {
            return name.clone();
        }
        let name = self.fresh("t");
        self.line(format!("const i64 {name} = {expr};"));
        self.remember(key, name.clone());
        name
    }

    /// `c + d` for index terms.
    fn plus(&mut self, c: &str, d: &str) -> String {
        match (c, d) {
            ("0", _) => d.to_string(),
            (_, "0") => c.to_string(),
            _ => self.index(format!("{c} + {d}")),
        }
    }

    /// `c - d` for index terms.
    fn minus(&mut self, c: &str, d: &str) -> String {
        if d == "0" {
            c.to_string()
        } else {
            self.index(format!("{c} - {d}"))
        }
    }

    /// The CSE key of "the linear index of `coord` within `dims`".
    fn lin_key(coord: &[String], dims: &[Dim]) -> String {
        let ds: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
        format!("lin:{}|{}", coord.join(","), ds.join(","))
    }

    /// The row-major linear index of `coord` within `dims` (size-1 dims skipped). Starts
    /// from the longest prefix whose linear index is already known (the work item's
    /// own index and the quotients of its decomposition, see [`Gen::delinearize`]).
    fn linearize(&mut self, coord: &[String], dims: &[Dim]) -> Result<String, CodegenError> {
        let (mut acc, mut from) = (String::from("0"), 0);
        for p in (1..=coord.len()).rev() {
            if let Some(name) = self.cache.get(&Self::lin_key(&coord[..p], &dims[..p])) {
                (acc, from) = (name.clone(), p);
                break;
            }
        }
        for (c, d) in coord.iter().zip(dims).skip(from) {
            if d.as_fixed() == Some(1) {
                continue;
            }
            acc = if acc == "0" {
                c.clone()
            } else {
                let dc = self.dim(d)?;
                if c == "0" {
                    format!("{} * {dc}", paren(&acc))
                } else {
                    format!("{} * {dc} + {c}", paren(&acc))
                }
            };
        }
        Ok(self.index(acc))
    }

    /// The row-major coordinate within `dims` of the linear index `lin` (assumed to be
    /// below the product of `dims`). Remembers the linear index of every prefix of the
    /// coordinate (the quotients), for [`Gen::linearize`].
    fn delinearize(&mut self, lin: &str, dims: &[Dim]) -> Result<Vec<String>, CodegenError> {
        let outer = dims.iter().position(|d| d.as_fixed() != Some(1));
        let mut coord = vec![String::from("0"); dims.len()];
        // prefix[p]: the linear index of coord[..p] within dims[..p].
        let mut prefix = vec![String::from("0"); dims.len() + 1];
        prefix[dims.len()] = lin.to_string();
        let mut rem = lin.to_string();
        for k in (0..dims.len()).rev() {
            if dims[k].as_fixed() == Some(1) {
                prefix[k] = rem.clone();
                continue;
            }
            if Some(k) == outer {
                coord[k] = rem.clone();
                break;
            }
            let dc = self.dim(&dims[k])?;
            coord[k] = self.index(format!("{rem} % {dc}"));
            rem = self.index(format!("{rem} / {dc}"));
            prefix[k] = rem.clone();
        }
        for p in 1..=dims.len() {
            if prefix[p] != "0" {
                self.remember(Self::lin_key(&coord[..p], &dims[..p]), prefix[p].clone());
            }
        }
        Ok(coord)
    }

    /// The coordinate in the input of `reshape` (`from` → `to`) of `coord` in its output:
    /// size-1 dims are dropped, the rest is split into the smallest groups of
    /// consecutive dims with equal products, and only groups of several dims are
    /// re-linearized.
    fn reshape_coord(&mut self, coord: &[String], from: &Shape, to: &Shape) -> Result<Vec<String>, CodegenError> {
        let non1 = |s: &Shape| -> Vec<usize> { (0..s.rank()).filter(|&i| s.dim(i).as_fixed() != Some(1)).collect() };
        let (od, id) = (non1(to), non1(from));
        let prod = |s: &Shape, ax: &[usize]| ax.iter().fold(Dim::fixed(1), |acc, &i| &acc * s.dim(i));
        let mut res = vec![String::from("0"); from.rank()];
        let (mut i, mut j) = (0, 0);
        while i < od.len() || j < id.len() {
            // The smallest (k, l) with equal products, else everything left.
            let mut group = (od.len(), id.len());
            'search: for total in 2..=(od.len() - i) + (id.len() - j) {
                for k in i + 1..=od.len() {
                    let Some(l) = (j + total).checked_sub(k - i) else { continue };
                    if l <= j || l > id.len() {
                        continue;
                    }
                    if prod(to, &od[i..k]) == prod(from, &id[j..l]) {
                        group = (k, l);
                        break 'search;
                    }
                }
            }
            let (k, l) = group;
            if k - i == 1 && l - j == 1 {
                res[id[j]] = coord[od[i]].clone();
            } else {
                let oc: Vec<String> = od[i..k].iter().map(|&a| coord[a].clone()).collect();
                let odims: Vec<Dim> = od[i..k].iter().map(|&a| to.dim(a).clone()).collect();
                let lin = self.linearize(&oc, &odims)?;
                let idims: Vec<Dim> = id[j..l].iter().map(|&a| from.dim(a).clone()).collect();
                let ic = self.delinearize(&lin, &idims)?;
                for (&a, c) in id[j..l].iter().zip(ic) {
                    res[a] = c;
                }
            }
            (i, j) = (k, l);
        }
        Ok(res)
    }

    fn ty(&self, r: FusedRef) -> &'a kiln_ops::TensorType {
        self.body.ty(r).expect("checked body")
    }

    /// The C local holding body value `r` at `coord` (generated on first request in
    /// the current scope).
    fn value(&mut self, r: FusedRef, coord: &[String]) -> Result<String, CodegenError> {
        let key = match r {
            FusedRef::Input(i) => format!("in{i}@{}", coord.join(",")),
            FusedRef::Node { node, output } => format!("n{node}.{output}@{}", coord.join(",")),
        };
        if let Some(v) = self.cache.get(&key) {
            return Ok(v.clone());
        }
        let v = match r {
            FusedRef::Input(i) => {
                let ty = self.ty(r);
                let c = compute(ty.dtype, &format!("fused input {i}"))?;
                let dims = ty.shape.dims().to_vec();
                let off = self.linearize(coord, &dims)?;
                let name = self.fresh("v");
                self.line(format!("const {c} {name} = kiln_ld({}, {off});", Role::In(i as u8 + self.in_base).c_name()));
                name
            }
            FusedRef::Node { node, output } => self.node_value(node as usize, output as usize, coord)?,
        };
        self.remember(key, v.clone());
        Ok(v)
    }

    fn node_value(&mut self, i: usize, output: usize, coord: &[String]) -> Result<String, CodegenError> {
        let body = self.body;
        let n = &body.nodes[i];
        let out = &n.outputs[output];
        let what = format!("fused body node {i} (`{}`)", n.op.name());
        let in_dtype = |k: usize| body.ty(n.operands[k]).expect("checked").dtype;
        // An elementwise op: its operands at the same coordinate, then the table's C.
        let elementwise = |g: &mut Self, expr: Option<String>, finishes: bool| -> Result<String, CodegenError> {
            let expr = expr.ok_or_else(|| {
                let ins: Vec<String> = (0..n.operands.len()).map(|k| in_dtype(k).to_string()).collect();
                CodegenError(format!("{what}: not defined for {} on the GPU", ins.join(", ")))
            })?;
            let mut args = Vec::with_capacity(n.operands.len());
            for &r in &n.operands {
                args.push(g.value(r, coord)?);
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut e = substitute(&expr, &refs);
            if finishes {
                e = finish(e, out.dtype);
            }
            let c = compute(out.dtype, &what)?;
            if is_simple(&e) {
                return Ok(e); // a copy (a cast to the same compute value)
            }
            let name = g.fresh("v");
            g.line(format!("const {c} {name} = {e};  // {}", n.op.name()));
            Ok(name)
        };
        match &n.op {
            Op::Unary(u) => elementwise(self, table::unary_expr(*u, in_dtype(0)), true),
            Op::Binary(b) => elementwise(self, table::binary_expr(*b, in_dtype(0)), !b.is_comparison()),
            Op::Select => elementwise(self, Some(table::select_expr()), false),
            Op::Cast(to) => elementwise(self, table::cast_expr(in_dtype(0), *to), true),
            Op::Reshape(to) => {
                let from = &body.ty(n.operands[0]).expect("checked").shape;
                let c = self.reshape_coord(coord, from, to)?;
                self.value(n.operands[0], &c)
            }
            Op::Permute(perm) => {
                let mut c = vec![String::new(); perm.len()];
                for (k, &p) in perm.iter().enumerate() {
                    c[p] = coord[k].clone();
                }
                self.value(n.operands[0], &c)
            }
            Op::Slice { axis, start, .. } => {
                let s = self.dim(start)?;
                let mut c = coord.to_vec();
                c[*axis] = self.plus(&coord[*axis], &s);
                self.value(n.operands[0], &c)
            }
            Op::Expand(to) => {
                let from = &body.ty(n.operands[0]).expect("checked").shape;
                let off = to.rank() - from.rank();
                let c: Vec<String> = (0..from.rank())
                    .map(|k| if from.dim(k).as_fixed() == Some(1) { String::from("0") } else { coord[off + k].clone() })
                    .collect();
                self.value(n.operands[0], &c)
            }
            Op::Concat { axis } => self.concat(i, *axis, coord, &what),
            Op::Reduce { .. } => {
                let Some(row) = &self.row else {
                    return err(format!("{what}: a reduction outside the rows form"));
                };
                if coord.len() < row.len() || coord[..row.len()] != row[..] {
                    return err(format!(
                        "{what}: a reduction's row value is read at coordinate ({}), not at the kernel's row ({})",
                        coord.join(", "),
                        row.join(", ")
                    ));
                }
                self.reduced.get(&i).cloned().ok_or_else(|| CodegenError(format!("{what}: read before it is reduced")))
            }
            other => err(format!("{what}: `{}` cannot be generated inside a fused kernel", other.name())),
        }
    }

    /// `concat` along `axis`: a branch per operand on the coordinate along the axis.
    fn concat(&mut self, i: usize, axis: usize, coord: &[String], what: &str) -> Result<String, CodegenError> {
        let n = &self.body.nodes[i];
        let c = compute(n.outputs[0].dtype, what)?;
        let parts = n.operands.len();
        if parts == 1 {
            return self.value(n.operands[0], coord);
        }
        let name = self.fresh("v");
        self.line(format!("{c} {name};  // concat"));
        let mut start = Dim::fixed(0);
        for (p, &r) in n.operands.iter().enumerate() {
            let end = &start + self.ty(r).shape.dim(axis);
            let at = &coord[axis];
            if p == 0 {
                let e = self.dim(&end)?;
                self.line(format!("if ({at} < {e}) {{"));
            } else if p + 1 < parts {
                let e = self.dim(&end)?;
                self.line(format!("}} else if ({at} < {e}) {{"));
            } else {
                self.line("} else {");
            }
            let mark = self.enter();
            let s = self.dim(&start)?;
            let mut sub = coord.to_vec();
            sub[axis] = self.minus(at, &s);
            let v = self.value(r, &sub)?;
            self.line(format!("{name} = {v};"));
            self.leave(mark);
            start = end;
        }
        self.line("}");
        Ok(name)
    }

    /// The elementwise form: (size declarations, loop body).
    fn elementwise(&mut self, domain: &Shape) -> Result<(String, String), CodegenError> {
        self.indent = 2;
        let coord = self.delinearize("i", domain.dims())?;
        for (k, &r) in self.body.outputs.iter().enumerate() {
            let v = self.value(r, &coord)?;
            self.line(format!("kiln_st({}, i, {v});", Role::Out(k as u8).c_name()));
        }
        let n = self.dim(&domain.numel())?;
        let mut head = self.dim_decls()?;
        writeln!(head, "    const i64 n_items = {n};").expect("to a string");
        Ok((head, std::mem::take(&mut self.lines)))
    }

    /// Body nodes the outputs depend on.
    fn live(&self) -> Vec<bool> {
        let mut live = vec![false; self.body.nodes.len()];
        let mut stack: Vec<FusedRef> = self.body.outputs.clone();
        while let Some(r) = stack.pop() {
            if let FusedRef::Node { node, .. } = r {
                if !std::mem::replace(&mut live[node as usize], true) {
                    stack.extend(self.body.nodes[node as usize].operands.iter().copied());
                }
            }
        }
        live
    }

    /// The live reductions grouped by level: a reduction's level is one more than the
    /// highest level among the reductions its operand depends on.
    fn levels(&self) -> Vec<Vec<usize>> {
        let live = self.live();
        let mut depth = vec![0usize; self.body.nodes.len()];
        let mut levels: Vec<Vec<usize>> = Vec::new();
        for (i, n) in self.body.nodes.iter().enumerate() {
            let base = n
                .operands
                .iter()
                .map(|r| match r {
                    FusedRef::Input(_) => 0,
                    FusedRef::Node { node, .. } => depth[*node as usize],
                })
                .max()
                .unwrap_or(0);
            depth[i] = base;
            if matches!(n.op, Op::Reduce { .. }) {
                depth[i] = base + 1;
                if live[i] {
                    if levels.len() < base + 1 {
                        levels.resize(base + 1, Vec::new());
                    }
                    levels[base].push(i);
                }
            }
        }
        levels.retain(|l| !l.is_empty());
        levels
    }

    /// The rows form: (size and shared-memory declarations, row loop body).
    /// Opens a loop of the block's threads over the row's `ncols` columns. The block
    /// size is a constant (`32 · GV_WARPS` in the GEMV prologue, `kiln_row_threads`
    /// otherwise), so the loop unrolls and the loads of a reduction pass overlap.
    fn column_loop(&mut self, ncols: &str) {
        self.line("#pragma unroll 4");
        if self.stage_x.is_some() {
            self.line(format!("for (i64 j = threadIdx.x; j < {ncols}; j += 32 * GV_WARPS) {{"));
        } else {
            self.line(format!("for (i64 j = threadIdx.x; j < {ncols}; j += kiln_row_threads) {{"));
        }
    }

    fn rows(&mut self, rows: &Shape, cols: &Shape) -> Result<(String, String), CodegenError> {
        let full: Vec<Dim> = rows.dims().iter().chain(cols.dims()).cloned().collect();
        let ncols = self.dim(&cols.numel())?;
        self.indent = 2;
        let row = self.delinearize("row", rows.dims())?;
        self.row = Some(row.clone());
        let levels = self.levels();
        let (mut shared_f, mut shared_i) = (0usize, 0usize);
        for level in &levels {
            let mut accs: Vec<(usize, String, Reduction)> = Vec::new();
            for &k in level {
                let n = &self.body.nodes[k];
                let Op::Reduce { op, .. } = n.op else { unreachable!("levels hold reductions") };
                let d = self.ty(n.operands[0]).dtype;
                let red = reduction(op, d, k)?;
                let acc = self.fresh("acc");
                self.line(format!("{} {acc} = {};  // {} (node {k})", red.acc, red.init, op.name()));
                accs.push((k, acc, red));
            }
            self.column_loop(&ncols);
            let mark = self.enter();
            let cc = self.delinearize("j", cols.dims())?;
            let coord: Vec<String> = row.iter().cloned().chain(cc).collect();
            for (k, acc, red) in &accs {
                let operand = self.body.nodes[*k].operands[0];
                let v = self.value(operand, &coord)?;
                let vc = compute(self.ty(operand).dtype, "a reduced value")?;
                let v = if vc == red.acc { v } else { format!("({}){v}", red.acc) };
                let e = substitute(red.combine, &[acc, &v]);
                self.line(format!("{acc} = {e};"));
            }
            self.leave(mark);
            self.line("}");
            // Block reduction: warp butterflies, then every thread combines the warps'
            // partials in the same order.
            let slot = |accs: &[(usize, String, Reduction)], a: usize| {
                let float = accs[a].2.acc == "float";
                let s = accs[..a].iter().filter(|x| (x.2.acc == "float") == float).count();
                if float {
                    format!("kiln_sf[{s}]")
                } else {
                    format!("kiln_si[{s}]")
                }
            };
            shared_f = shared_f.max(accs.iter().filter(|x| x.2.acc == "float").count());
            shared_i = shared_i.max(accs.iter().filter(|x| x.2.acc != "float").count());
            self.line("for (int s = 16; s > 0; s >>= 1) {");
            self.indent += 1;
            for (_, acc, red) in &accs {
                let e = substitute(red.combine, &[acc, &format!("__shfl_xor_sync(0xffffffffu, {acc}, s)")]);
                self.line(format!("{acc} = {e};"));
            }
            self.indent -= 1;
            self.line("}");
            self.line("if (lane == 0) {");
            self.indent += 1;
            for (a, (_, acc, _)) in accs.iter().enumerate() {
                self.line(format!("{}[warp] = {acc};", slot(&accs, a)));
            }
            self.indent -= 1;
            self.line("}");
            self.line("__syncthreads();");
            for (a, (_, acc, _)) in accs.iter().enumerate() {
                self.line(format!("{acc} = {}[0];", slot(&accs, a)));
            }
            self.line("for (int w = 1; w < warps; ++w) {");
            self.indent += 1;
            for (a, (_, acc, red)) in accs.iter().enumerate() {
                let e = substitute(red.combine, &[acc, &format!("{}[w]", slot(&accs, a))]);
                self.line(format!("{acc} = {e};"));
            }
            self.indent -= 1;
            self.line("}");
            self.line("__syncthreads();  // the partials are reused by the next reduction");
            for (k, acc, red) in &accs {
                let n = &self.body.nodes[*k];
                let Op::Reduce { op, .. } = n.op else { unreachable!("levels hold reductions") };
                let d = n.outputs[0].dtype;
                let c = compute(d, &format!("fused body node {k} (`{}`)", op.name()))?;
                let value = match (op, red.acc) {
                    (ReduceOp::Mean, "float") => format!("{acc} / (float){ncols}"),
                    (ReduceOp::Mean, _) => format!("({ncols} == 0 ? (i64)0 : {acc} / {ncols})"),
                    _ => acc.clone(),
                };
                let value = if c == red.acc { value } else { format!("({c})({value})") };
                let name = self.fresh("red");
                self.line(format!("const {c} {name} = {};", finish(value, d)));
                self.reduced.insert(*k, name);
            }
        }
        // Outputs: full-shaped ones in a column pass, row-shaped ones by thread 0.
        let full_shape = Shape::new(full.iter().cloned());
        let outs: Vec<(usize, FusedRef)> = self.body.outputs.iter().copied().enumerate().collect();
        let (wide, narrow): (Vec<_>, Vec<_>) = outs.into_iter().partition(|&(_, r)| self.ty(r).shape == full_shape);
        if !wide.is_empty() {
            self.column_loop(&ncols);
            let mark = self.enter();
            let cc = self.delinearize("j", cols.dims())?;
            let coord: Vec<String> = row.iter().cloned().chain(cc).collect();
            for &(k, r) in &wide {
                let v = self.value(r, &coord)?;
                let store = format!("kiln_st({}, row * {ncols} + j, {v});", Role::Out(k as u8).c_name());
                match self.stage_x {
                    None => self.line(store),
                    Some(x) => {
                        if x == k {
                            self.line(format!("gv_stage(xs, (int)row, j, {v}, vec, nv, len);"));
                        }
                        self.line(format!("if (blockIdx.x == 0) {store}"));
                    }
                }
            }
            self.leave(mark);
            self.line("}");
        }
        if !narrow.is_empty() {
            self.line(if self.stage_x.is_some() {
                "if (threadIdx.x == 0 && blockIdx.x == 0) {"
            } else {
                "if (threadIdx.x == 0) {"
            });
            let mark = self.enter();
            for &(k, r) in &narrow {
                // `[rows..]` or `[rows.., 1..]`: the kept dims are at 0.
                let rank = self.ty(r).shape.rank();
                let mut coord = row.clone();
                coord.resize(rank, String::from("0"));
                let v = self.value(r, &coord)?;
                self.line(format!("kiln_st({}, row, {v});", Role::Out(k as u8).c_name()));
            }
            self.leave(mark);
            self.line("}");
        }
        let nrows = self.dim(&rows.numel())?;
        let mut head = self.dim_decls()?;
        writeln!(head, "    const i64 n_rows = {nrows};").expect("to a string");
        if self.stage_x.is_none() {
            // The launch's block size (fused_kernel substitutes it): a constant stride.
            head.push_str("    constexpr int kiln_row_threads = KILN_ROW_THREADS;\n");
        }
        if !levels.is_empty() {
            if shared_f > 0 {
                writeln!(head, "    __shared__ float kiln_sf[{shared_f}][32];").expect("to a string");
            }
            if shared_i > 0 {
                writeln!(head, "    __shared__ i64 kiln_si[{shared_i}][32];").expect("to a string");
            }
            head.push_str("    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;\n");
        }
        Ok((head, std::mem::take(&mut self.lines)))
    }
}

/// A measurement knob's value from the environment (a count; `None` unset or unparsable).
pub fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Whether the environment sets knob `name` to 1.
pub fn env_flag(name: &str) -> bool {
    env_usize(name) == Some(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution_replaces_operand_names_only() {
        assert_eq!(substitute("a + b", &["v1", "v2"]), "v1 + v2");
        assert_eq!(substitute("(a ? 1.0f : 0.0f)", &["v0"]), "(v0 ? 1.0f : 0.0f)");
        assert_eq!(substitute("kiln_fmax(a, b)", &["x", "y"]), "kiln_fmax(x, y)");
        assert_eq!(substitute("a ? b : c", &["c0", "v1", "v2"]), "c0 ? v1 : v2");
        assert_eq!(substitute("(i64)(-0x7fffffffffffffffLL - 1) + a", &["v"]), "(i64)(-0x7fffffffffffffffLL - 1) + v");
        assert_eq!(substitute("1.0f / sqrtf(a)", &["v3"]), "1.0f / sqrtf(v3)");
    }

    #[test]
    fn fnv_is_the_reference_fnv1a() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64("foobar"), 0x85944171f73967e8);
    }
}
