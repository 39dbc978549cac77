//! Plan and run: the live nodes in topological order, one step each; kernels compiled
//! once at construction; per-run buffers freed after their last use.

use super::blas::Gemm;
use super::{driver_err, host_bytes, tensor_from_bytes, CudaError, DeviceInfo};
use crate::error::RuntimeError;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;
use indexmap::IndexMap;
use kiln_codegen::kernels::{self, NodeLowering, MAX_HEAD_DIM, MAX_RANK};
use kiln_codegen::{ArgValue, CompileStats, Compiler, Kernel, Role};
use kiln_graph::{Graph, NodeId, Value};
use kiln_ops::{Bindings, DType, HostTensor, Mask, Op, Sym};
use smallvec::SmallVec;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

/// Executor settings.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Kernel cache folder; `None` uses [`kiln_codegen::nvrtc::default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Whether to read and write the kernel cache at all.
    pub use_cache: bool,
    /// Fill every freshly allocated buffer with 0xff bytes (NaN for floats) before the
    /// node that writes it, so an element a kernel forgets to write shows up in tests.
    pub poison: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions { device: 0, cache_dir: None, use_cache: true, poison: false }
    }
}

/// A device buffer (at least one byte, so empty tensors have an address too).
struct Buf {
    slice: CudaSlice<u8>,
    bytes: usize,
}

impl Buf {
    fn ptr(&self, stream: &CudaStream) -> u64 {
        let (p, _sync) = self.slice.device_ptr(stream);
        p
    }
}

enum Exec {
    Input(usize),
    Param(usize),
    Constant(usize),
    /// A reshape: the output shares the operand's buffer.
    Alias,
    /// Launch of kernel number `i` (concat launches it once per operand).
    Kernel(usize),
    MatMul,
}

struct Step {
    node: NodeId,
    exec: Exec,
    inputs: SmallVec<[usize; 4]>,
    outputs: SmallVec<[usize; 2]>,
}

/// Runs a graph on a CUDA GPU. See the [module docs](super).
pub struct CudaExecutor {
    graph: Graph,
    info: DeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    options: CudaOptions,
    weights: Vec<Arc<Buf>>,
    consts: Vec<Arc<Buf>>,
    kernels: Vec<(Kernel, CudaFunction)>,
    steps: Vec<Step>,
    uses: Vec<usize>,
    /// Per slot: the value's node and output (for its type).
    slot_values: Vec<Value>,
    outputs: Vec<(String, usize)>,
    stats: CompileStats,
    /// The device symbol table's order ([`kiln_codegen::symbols::graph_symbols`]).
    syms: Vec<Sym>,
}

fn rm_strides(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1] as i64;
    }
    s
}

fn dims(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

/// Role → value pairs for one launch; `KernelSig::pack` pulls them in parameter order.
#[derive(Default)]
pub(super) struct Args(Vec<(Role, ArgValue)>);

impl Args {
    pub(super) fn set(&mut self, r: Role, v: ArgValue) -> &mut Self {
        self.0.push((r, v));
        self
    }
    pub(super) fn i64(&mut self, r: Role, v: usize) -> &mut Self {
        self.set(r, ArgValue::I64(v as i64))
    }
    pub(super) fn get(&self, r: Role) -> Option<ArgValue> {
        self.0.iter().rev().find(|(role, _)| *role == r).map(|(_, v)| *v)
    }
}

impl CudaExecutor {
    /// Whether a GPU and the CUDA libraries are usable (first device), and why not.
    pub fn available() -> Result<DeviceInfo, String> {
        super::available()
    }

    /// Checks the weights like the CPU executor, uploads them, compiles (or loads from
    /// the cache) every kernel the graph needs, with default options.
    pub fn new(graph: Graph, weights: IndexMap<String, HostTensor>) -> Result<CudaExecutor, CudaError> {
        CudaExecutor::with_options(graph, weights, CudaOptions::default())
    }

    pub fn with_options(
        graph: Graph,
        weights: IndexMap<String, HostTensor>,
        options: CudaOptions,
    ) -> Result<CudaExecutor, CudaError> {
        graph.verify().map_err(RuntimeError::from)?;
        crate::feeds::check_weights(&graph, &weights)?;
        let info = super::device_info(options.device).map_err(CudaError::Unavailable)?;
        let ctx = CudaContext::new(options.device).map_err(driver_err("context"))?;
        // One stream per executor and no cross-stream sharing: no event tracking needed.
        // SAFETY: buffers of this executor are only used on its own stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver_err("stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Driver(format!("cuBLAS handle: {e:?}")))?;

        let live = live_nodes(&graph);

        let upload = |t: &HostTensor| -> Result<Arc<Buf>, CudaError> {
            let bytes = host_bytes(t);
            let mut slice = stream.alloc_zeros::<u8>(bytes.len().max(1)).map_err(driver_err("alloc"))?;
            if !bytes.is_empty() {
                stream.memcpy_htod(&bytes, &mut slice).map_err(driver_err("upload"))?;
            }
            Ok(Arc::new(Buf { slice, bytes: bytes.len() }))
        };

        let mut weight_bufs = Vec::with_capacity(graph.params().len());
        for name in graph.params().keys() {
            weight_bufs.push(upload(&weights[name])?);
        }

        let mut kernel_ids: HashMap<String, usize> = HashMap::new();
        let mut kernel_list: Vec<Kernel> = Vec::new();
        let mut slot_of: HashMap<Value, usize> = HashMap::new();
        let mut slot_values: Vec<Value> = Vec::new();
        let mut uses: Vec<usize> = Vec::new();
        let mut steps = Vec::new();
        let mut consts = Vec::new();
        for n in graph.topo_order() {
            if !live.contains(&n) {
                continue;
            }
            let node = graph.node(n);
            let unsupported = |reason: String| CudaError::Unsupported {
                node: n.index(),
                op: node.op.name().into(),
                scope: node.scope.clone(),
                reason,
            };
            // What runs for this node (one decision, shared with the viewer's details).
            let lowering = kernels::lower_node(&graph, n).map_err(|e| unsupported(e.0))?;
            let operands = graph.operands(n);
            let inputs: SmallVec<[usize; 4]> = operands
                .iter()
                .map(|v| {
                    let s = slot_of[v];
                    uses[s] += 1;
                    s
                })
                .collect();
            let outputs: SmallVec<[usize; 2]> = (0..node.outputs.len())
                .map(|i| {
                    let v = Value::new(n, i as u8);
                    slot_of.insert(v, uses.len());
                    slot_values.push(v);
                    uses.push(0);
                    uses.len() - 1
                })
                .collect();
            let kernel = match lowering {
                NodeLowering::Input => {
                    steps.push(Step {
                        node: n,
                        exec: Exec::Input(graph.inputs().get_index_of(input_name(&node.op)).expect("verified")),
                        inputs,
                        outputs,
                    });
                    continue;
                }
                NodeLowering::Param => {
                    steps.push(Step {
                        node: n,
                        exec: Exec::Param(graph.params().get_index_of(input_name(&node.op)).expect("verified")),
                        inputs,
                        outputs,
                    });
                    continue;
                }
                NodeLowering::Constant => {
                    let v = node
                        .op
                        .eval(&[], &Bindings::new())
                        .map_err(|e| unsupported(format!("cannot evaluate the constant: {e}")))?;
                    consts.push(upload(&v[0])?);
                    steps.push(Step { node: n, exec: Exec::Constant(consts.len() - 1), inputs, outputs });
                    continue;
                }
                NodeLowering::View => {
                    steps.push(Step { node: n, exec: Exec::Alias, inputs, outputs });
                    continue;
                }
                NodeLowering::CublasMatMul => {
                    steps.push(Step { node: n, exec: Exec::MatMul, inputs, outputs });
                    continue;
                }
                NodeLowering::Kernel(k) => k,
            };
            let id = match kernel_ids.get(&kernel.sig.name) {
                Some(&id) => {
                    debug_assert_eq!(kernel_list[id].source, kernel.source, "kernel names identify sources");
                    id
                }
                None => {
                    kernel_ids.insert(kernel.sig.name.clone(), kernel_list.len());
                    kernel_list.push(kernel);
                    kernel_list.len() - 1
                }
            };
            steps.push(Step { node: n, exec: Exec::Kernel(id), inputs, outputs });
        }
        let outputs: Vec<(String, usize)> = graph
            .outputs()
            .iter()
            .map(|(name, v)| {
                let s = slot_of[v];
                uses[s] += 1;
                (name.clone(), s)
            })
            .collect();

        // Compile (or load from the cache) and load every kernel.
        let cache_dir =
            options.use_cache.then(|| options.cache_dir.clone().unwrap_or_else(kiln_codegen::nvrtc::default_cache_dir));
        let (kernels, stats, _) = compile_and_load(&ctx, info.compute_capability, cache_dir, kernel_list, None)?;
        stream.synchronize().map_err(driver_err("upload"))?;
        tracing::info!(
            device = %info,
            nodes = steps.len(),
            kernels = kernels.len(),
            "CUDA executor ready"
        );
        let syms = kiln_codegen::symbols::graph_symbols(&graph);
        Ok(CudaExecutor {
            syms,
            graph,
            info,
            ctx,
            stream,
            blas,
            options,
            weights: weight_bufs,
            consts,
            kernels,
            steps,
            uses,
            slot_values,
            outputs,
            stats,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn device(&self) -> &DeviceInfo {
        &self.info
    }

    /// What building the kernels did: how many compiled, how many came from the cache.
    pub fn compile_stats(&self) -> CompileStats {
        self.stats
    }

    /// The distinct kernels this executor launches.
    pub fn kernels(&self) -> impl Iterator<Item = &Kernel> {
        self.kernels.iter().map(|(k, _)| k)
    }

    fn alloc(&self, bytes: usize) -> Result<Arc<Buf>, CudaError> {
        // SAFETY: the buffer is written by the node that produces it before any read
        // (or poisoned first when `poison` is set).
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(driver_err("alloc"))?;
        let buf = Buf { slice, bytes };
        if self.options.poison && bytes > 0 {
            // SAFETY: the address range is the buffer just allocated.
            unsafe {
                cudarc::driver::result::memset_d8_async(buf.ptr(&self.stream), 0xff, bytes, self.stream.cu_stream())
            }
            .map_err(driver_err("memset"))?;
        }
        Ok(Arc::new(buf))
    }

    /// Runs the graph: feeds are checked and symbols bound exactly as by the CPU
    /// executor; returns the graph outputs by name, in the graph's output order.
    pub fn run(&self, feeds: &IndexMap<String, HostTensor>) -> Result<IndexMap<String, HostTensor>, CudaError> {
        let b = crate::feeds::bind(&self.graph, feeds)?;
        self.ctx.bind_to_thread().map_err(driver_err("bind context"))?;
        let input_names: Vec<&String> = self.graph.inputs().keys().collect();
        // The device symbol table (kernels that read sizes on the device).
        let sym_values: Vec<i64> = self.syms.iter().map(|s| b.get(s).map_or(0, |&v| v as i64)).collect();
        let sym_bytes: Vec<u8> = sym_values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let syms = self.alloc(sym_bytes.len())?;
        if !sym_bytes.is_empty() {
            // SAFETY: `syms` holds `sym_bytes.len()` bytes; the copy is staged before return.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(syms.ptr(&self.stream), &sym_bytes, self.stream.cu_stream())
            }
            .map_err(driver_err("upload symbols"))?;
        }
        let mut remaining = self.uses.clone();
        let mut slots: Vec<Option<(Arc<Buf>, Vec<usize>)>> = (0..remaining.len()).map(|_| None).collect();
        for step in &self.steps {
            let node = self.graph.node(step.node);
            let err = |reason: String| CudaError::Unsupported {
                node: step.node.index(),
                op: node.op.name().into(),
                scope: node.scope.clone(),
                reason,
            };
            let out_shapes: Vec<Vec<usize>> =
                node.outputs.iter().map(|t| t.shape.eval(&b)).collect::<Result<_, _>>().map_err(err)?;
            let outs: Vec<Arc<Buf>> = match &step.exec {
                Exec::Input(i) => {
                    let t = &feeds[input_names[*i]];
                    let bytes = host_bytes(t);
                    let buf = self.alloc(bytes.len())?;
                    if !bytes.is_empty() {
                        // SAFETY: `buf` holds at least `bytes.len()` bytes; the host data
                        // stays alive until the stream synchronizes at the end of the run
                        // (the copy from pageable memory is staged before returning).
                        unsafe {
                            cudarc::driver::result::memcpy_htod_async(
                                buf.ptr(&self.stream),
                                &bytes,
                                self.stream.cu_stream(),
                            )
                        }
                        .map_err(driver_err("upload feed"))?;
                    }
                    vec![buf]
                }
                Exec::Param(i) => vec![self.weights[*i].clone()],
                Exec::Constant(i) => vec![self.consts[*i].clone()],
                Exec::Alias => vec![slots[step.inputs[0]].as_ref().expect("operand computed").0.clone()],
                Exec::Kernel(_) | Exec::MatMul => {
                    let outs: Vec<Arc<Buf>> = node
                        .outputs
                        .iter()
                        .zip(&out_shapes)
                        .map(|(t, s)| self.alloc(t.dtype.bytes_for(s.iter().product())))
                        .collect::<Result<_, _>>()?;
                    let ins: Vec<(&Buf, &[usize])> = step
                        .inputs
                        .iter()
                        .map(|&s| {
                            let (buf, shape) = slots[s].as_ref().expect("operands are computed before use");
                            (buf.as_ref(), shape.as_slice())
                        })
                        .collect();
                    let outv: Vec<(&Buf, &[usize])> =
                        outs.iter().zip(&out_shapes).map(|(b, s)| (b.as_ref(), s.as_slice())).collect();
                    match step.exec {
                        Exec::Kernel(k) => {
                            let ins: Vec<(u64, &[usize])> =
                                ins.iter().map(|(x, s)| (x.ptr(&self.stream), *s)).collect();
                            let outv: Vec<(u64, &[usize])> =
                                outv.iter().map(|(x, s)| (x.ptr(&self.stream), *s)).collect();
                            launch_node(
                                Lane { stream: &self.stream, pdl: false, log: None },
                                &self.kernels[k],
                                &node.op,
                                &ins,
                                &outv,
                                &b,
                                syms.ptr(&self.stream),
                            )
                            .map_err(|e| match e {
                                CudaError::Unsupported { reason, .. } => err(reason),
                                other => other,
                            })?
                        }
                        _ => self.matmul(&node.op, &ins, &outv, node.outputs[0].dtype)?,
                    }
                    outs
                }
            };
            for &s in &step.inputs {
                remaining[s] -= 1;
                if remaining[s] == 0 {
                    slots[s] = None;
                }
            }
            for ((buf, shape), &s) in outs.into_iter().zip(out_shapes).zip(&step.outputs) {
                if remaining[s] > 0 {
                    slots[s] = Some((buf, shape));
                }
            }
        }
        let mut result = IndexMap::with_capacity(self.outputs.len());
        for (name, s) in &self.outputs {
            let (buf, shape) = slots[*s].as_ref().expect("outputs are computed");
            let mut host = vec![0u8; buf.bytes];
            if buf.bytes > 0 {
                self.stream.memcpy_dtoh(&buf.slice.slice(0..buf.bytes), &mut host).map_err(driver_err("download"))?;
            }
            let dtype = self.graph.value_type(self.slot_values[*s]).dtype;
            result.insert(name.clone(), (dtype, shape.clone(), host));
        }
        self.stream.synchronize().map_err(driver_err("run"))?;
        result
            .into_iter()
            .map(|(name, (dtype, shape, host))| Ok((name, tensor_from_bytes(dtype, &shape, &host)?)))
            .collect()
    }

    fn matmul(
        &self,
        op: &Op,
        ins: &[(&Buf, &[usize])],
        outs: &[(&Buf, &[usize])],
        dtype: DType,
    ) -> Result<(), CudaError> {
        let Op::MatMul { transpose_a: ta, transpose_b: tb } = *op else { unreachable!("matmul step") };
        let (sa, sb) = (ins[0].1, ins[1].1);
        let (ra, rb) = (sa.len(), sb.len());
        let (m, k) = if ta { (sa[ra - 1], sa[ra - 2]) } else { (sa[ra - 2], sa[ra - 1]) };
        let n = if tb { sb[rb - 2] } else { sb[rb - 1] };
        let batch: usize = sa[..ra - 2].iter().product();
        let (out, _) = outs[0];
        if batch == 0 || m == 0 || n == 0 {
            return Ok(());
        }
        let c = out.ptr(&self.stream);
        if k == 0 {
            // SAFETY: `out` holds batch·m·n elements of `dtype`.
            return unsafe { cudarc::driver::result::memset_d8_async(c, 0, out.bytes, self.stream.cu_stream()) }
                .map_err(driver_err("memset"));
        }
        let g = Gemm { dtype, batch, m, n, k, ta, tb, shared_b: rb == 2 };
        g.run(&self.blas, ins[0].0.ptr(&self.stream), ins[1].0.ptr(&self.stream), c)
    }
}

/// The nodes the graph's outputs depend on.
pub(super) fn live_nodes(graph: &Graph) -> HashSet<NodeId> {
    let mut live: HashSet<NodeId> = HashSet::new();
    let mut stack: Vec<NodeId> = graph.outputs().values().map(|v| v.node).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(graph.operands(n).iter().map(|v| v.node));
        }
    }
    live
}

/// The kernels of a compiled program: each with its function, the compile statistics, and
/// every binary under its cache key ([`Compiler::key`]), for an executable plan.
pub(super) type Loaded = (Vec<(Kernel, CudaFunction)>, CompileStats, Vec<(String, Vec<u8>)>);

/// Compiles (or takes from `prebuilt`, or loads from the disk cache in `cache_dir`) every
/// kernel for compute capability `cc` and loads it into `ctx`.
pub(super) fn compile_and_load(
    ctx: &Arc<CudaContext>,
    cc: (i32, i32),
    cache_dir: Option<PathBuf>,
    kernel_list: Vec<Kernel>,
    prebuilt: Option<&HashMap<String, Vec<u8>>>,
) -> Result<Loaded, CudaError> {
    let compiler = Compiler::new(cc, cache_dir)?;
    let refs: Vec<&Kernel> = kernel_list.iter().collect();
    let (cubins, stats) = compiler.compile_all_with(&refs, prebuilt)?;
    let mut kernels = Vec::with_capacity(kernel_list.len());
    let mut binaries = Vec::with_capacity(kernel_list.len());
    for (k, cubin) in kernel_list.into_iter().zip(cubins) {
        binaries.push((compiler.key(&k.source), cubin.clone()));
        let module = ctx.load_module(Ptx::from_binary(cubin)).map_err(driver_err("load module"))?;
        let f = module.load_function(&k.sig.name).map_err(driver_err("load function"))?;
        allow_dynamic_smem(&k, &f)?;
        kernels.push((k, f));
    }
    Ok((kernels, stats, binaries))
}

/// Lets `f` be launched with the kernel's dynamic shared memory (needed when its static and
/// dynamic shared memory together pass 48 KiB; set for any dynamic amount).
pub fn allow_dynamic_smem(k: &Kernel, f: &CudaFunction) -> Result<(), CudaError> {
    if k.dynamic_smem > 0 {
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            k.dynamic_smem as i32,
        )
        .map_err(|e| {
            CudaError::Driver(format!("{}: {} bytes of dynamic shared memory: {e:?}", k.sig.name, k.dynamic_smem))
        })?;
    }
    Ok(())
}

/// Where launches go: a stream, and whether each launch may start while the previous
/// kernel on the stream is still running (programmatic dependent launch, Hopper and
/// later: every generated kernel begins with `kiln_grid_wait()` before it touches
/// anything the previous kernel reads or writes; see `kiln.cuh`).
#[derive(Clone, Copy)]
pub(super) struct Lane<'a> {
    pub stream: &'a CudaStream,
    pub pdl: bool,
    /// Where to note each launch's kernel name (the engine's timeline labels), if anywhere.
    pub log: Option<&'a std::cell::RefCell<Vec<String>>>,
}

/// Launches `kf` over `items` work items with the values in `args` on `lane`.
pub(super) fn launch(lane: Lane, kf: &(Kernel, CudaFunction), items: usize, args: &Args) -> Result<(), CudaError> {
    if items == 0 {
        return Ok(());
    }
    let (kernel, f) = kf;
    if let Some(log) = lane.log {
        log.borrow_mut().push(kernel.sig.name.clone());
    }
    let mut values = kernel.sig.pack(|r| args.get(r)).map_err(|e| CudaError::Driver(e.to_string()))?;
    let mut params: Vec<*mut std::ffi::c_void> = values.iter_mut().map(|v| v.as_kernel_param()).collect();
    let (grid, block) = kernel.grid.dims(items);
    if lane.pdl {
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            // SAFETY: an all-zero union is a valid value of every member.
            value: unsafe { std::mem::zeroed() },
        };
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: kernel.dynamic_smem,
            hStream: lane.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as below; `config` and `attr` outlive the call.
        return unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| CudaError::Driver(format!("launch {}: {e:?}", kernel.sig.name)));
    }
    // SAFETY: `params` points at one value per kernel parameter, in order and of the
    // parameter's C type (checked by `pack`); the device addresses are live buffers
    // sized for the shapes the index arguments describe.
    unsafe {
        cudarc::driver::result::launch_kernel(
            f.cu_function(),
            (grid, 1, 1),
            (block, 1, 1),
            kernel.dynamic_smem,
            lane.stream.cu_stream(),
            &mut params,
        )
    }
    .map_err(|e| CudaError::Driver(format!("launch {}: {e:?}", kernel.sig.name)))
}

/// The arguments and work items of a fused group's kernel ([`kiln_codegen::fused_kernel`]):
/// outputs, inputs, the symbol table and the item count.
pub(super) fn fused_args(
    body: &kiln_ops::FusedBody,
    ins: &[(u64, &[usize])],
    outs: &[(u64, &[usize])],
    b: &Bindings,
    syms: u64,
) -> Result<(Args, usize), String> {
    let items = kiln_codegen::fused::fused_items(body, b).map_err(|e| e.0)?;
    let mut a = Args::default();
    for (i, (p, _)) in outs.iter().enumerate() {
        a.set(Role::Out(i as u8), ArgValue::Ptr(*p));
    }
    for (i, (p, _)) in ins.iter().enumerate() {
        a.set(Role::In(i as u8), ArgValue::Ptr(*p));
    }
    a.set(Role::Syms, ArgValue::Ptr(syms)).i64(Role::N, items);
    Ok((a, items))
}

/// Launches the kernel of a node (as [`kiln_codegen::lower_node`] chose it) with its
/// operands and outputs given as (device address, shape); `syms` is the device symbol
/// table. Errors with `node: 0` and an empty op: callers fill in the node.
pub(super) fn launch_node(
    stream: Lane,
    k: &(Kernel, CudaFunction),
    op: &Op,
    ins: &[(u64, &[usize])],
    outs: &[(u64, &[usize])],
    b: &Bindings,
    syms: u64,
) -> Result<(), CudaError> {
    let bad = |reason: String| CudaError::Unsupported { node: 0, op: String::new(), scope: String::new(), reason };
    let ptr = |x: u64| ArgValue::Ptr(x);
    let mut a = Args::default();
    a.set(Role::Syms, ArgValue::Ptr(syms));
    let (out, out_shape) = outs[0];
    let numel = |s: &[usize]| s.iter().product::<usize>();
    let check_rank = |s: &[usize]| {
        if s.len() > MAX_RANK {
            Err(bad(format!("rank {} exceeds the GPU kernels' limit of {MAX_RANK}", s.len())))
        } else {
            Ok(())
        }
    };
    a.set(Role::Out(0), ptr(out));
    for (i, (x, _)) in ins.iter().enumerate() {
        a.set(Role::In(i as u8), ptr(*x));
    }
    let lanes = |shape: &[usize], axis: usize| (numel(&shape[..axis]), shape[axis], numel(&shape[axis + 1..]));
    // Index-mapping copy of `shape` elements from `in_strides`/`in_offset`.
    let copy =
        |a: &mut Args, shape: &[usize], in_strides: &[i64], in_offset: i64, out_strides: &[i64], out_offset: i64| {
            check_rank(shape)?;
            a.i64(Role::N, numel(shape))
                .set(Role::Rank, ArgValue::I32(shape.len() as i32))
                .set(Role::Shape, ArgValue::idx8(&dims(shape)))
                .set(Role::InStrides, ArgValue::idx8(in_strides))
                .set(Role::InOffset, ArgValue::I64(in_offset))
                .set(Role::OutStrides, ArgValue::idx8(out_strides))
                .set(Role::OutOffset, ArgValue::I64(out_offset));
            launch(stream, k, numel(shape), a)
        };
    match op {
        op if op.is_elementwise() => {
            a.i64(Role::N, numel(out_shape));
            launch(stream, k, numel(out_shape), &a)
        }
        Op::Permute(perm) => {
            let st_in = rm_strides(ins[0].1);
            let in_strides: Vec<i64> = perm.iter().map(|&p| st_in[p]).collect();
            copy(&mut a, out_shape, &in_strides, 0, &rm_strides(out_shape), 0)
        }
        Op::Slice { axis, start, end } => {
            let s = start.eval(b).map_err(bad)?;
            let e = end.eval(b).map_err(bad)?;
            let size = ins[0].1[*axis];
            if s > e || e > size {
                return Err(bad(format!(
                    "range {s}..{e} (`{start}..{end}`) is invalid for axis {axis} of size {size}"
                )));
            }
            let st_in = rm_strides(ins[0].1);
            copy(&mut a, out_shape, &st_in, s as i64 * st_in[*axis], &rm_strides(out_shape), 0)
        }
        Op::Expand(_) => {
            let in_shape = ins[0].1;
            let off = out_shape.len() - in_shape.len();
            let st_in = rm_strides(in_shape);
            let mut in_strides = vec![0i64; out_shape.len()];
            for (i, &d) in in_shape.iter().enumerate() {
                if d == out_shape[off + i] {
                    in_strides[off + i] = st_in[i];
                } else if d != 1 {
                    return Err(bad(format!("cannot expand {in_shape:?} to {out_shape:?}")));
                }
            }
            copy(&mut a, out_shape, &in_strides, 0, &rm_strides(out_shape), 0)
        }
        Op::Concat { axis } => {
            let st_out = rm_strides(out_shape);
            let mut at = 0usize;
            for (x, shape) in ins {
                a.set(Role::In(0), ptr(*x));
                copy(&mut a, shape, &rm_strides(shape), 0, &st_out, at as i64 * st_out[*axis])?;
                at += shape[*axis];
            }
            Ok(())
        }
        Op::Gather { axis } => {
            let (outer, size, inner) = lanes(ins[0].1, *axis);
            let _ = outer;
            a.set(Role::Ids, ptr(ins[1].0))
                .i64(Role::N, numel(out_shape))
                .i64(Role::NIdx, numel(ins[1].1))
                .i64(Role::Size, size)
                .i64(Role::Inner, inner);
            launch(stream, k, numel(out_shape), &a)
        }
        Op::Arange { start, .. } => {
            let s = start.eval(b).map_err(bad)?;
            a.i64(Role::N, numel(out_shape)).i64(Role::Start, s);
            launch(stream, k, numel(out_shape), &a)
        }
        Op::Reduce { axes, .. } => {
            let shape = ins[0].1;
            check_rank(shape)?;
            let st_in = rm_strides(shape);
            let (mut ks, mut kst, mut rs, mut rst) = (vec![], vec![], vec![], vec![]);
            for (i, &d) in shape.iter().enumerate() {
                if axes.contains(&i) {
                    rs.push(d as i64);
                    rst.push(st_in[i]);
                } else {
                    ks.push(d as i64);
                    kst.push(st_in[i]);
                }
            }
            let n_out: usize = ks.iter().product::<i64>() as usize;
            a.i64(Role::NOut, n_out)
                .set(Role::NRed, ArgValue::I64(rs.iter().product()))
                .set(Role::KeptRank, ArgValue::I32(ks.len() as i32))
                .set(Role::KeptShape, ArgValue::idx8(&ks))
                .set(Role::KeptStrides, ArgValue::idx8(&kst))
                .set(Role::RedRank, ArgValue::I32(rs.len() as i32))
                .set(Role::RedShape, ArgValue::idx8(&rs))
                .set(Role::RedStrides, ArgValue::idx8(&rst));
            launch(stream, k, n_out, &a)
        }
        Op::ArgMax { axis } => {
            let (outer, len, inner) = lanes(ins[0].1, *axis);
            if len == 0 {
                return Err(bad(format!("axis {axis} of shape {:?} is empty", ins[0].1)));
            }
            a.i64(Role::N, outer * inner).i64(Role::Len, len).i64(Role::Inner, inner);
            launch(stream, k, outer * inner, &a)
        }
        Op::TopK { k: kk, axis } => {
            let (outer, len, inner) = lanes(ins[0].1, *axis);
            if *kk == 0 || *kk > len {
                return Err(bad(format!("k = {kk} must be in 1..={len}")));
            }
            a.set(Role::Out(1), ptr(outs[1].0)).i64(Role::Len, len).i64(Role::Inner, inner).i64(Role::K, *kk);
            launch(stream, k, outer * inner, &a)
        }
        Op::Attention(attrs) => {
            let (q, kk, v) = (ins[0].1, ins[1].1, ins[2].1);
            let (bsz, s, h, d) = (q[0], q[1], q[2], q[3]);
            let (t, kh, dv) = (kk[1], kk[2], v[3]);
            if kh == 0 || h % kh != 0 {
                return Err(bad(format!("{h} query heads are not a multiple of {kh} kv heads")));
            }
            if t < s {
                return Err(bad(format!("{t} keys are fewer than {s} queries")));
            }
            if d > MAX_HEAD_DIM || dv > MAX_HEAD_DIM {
                return Err(bad(format!("head dims {d}/{dv} exceed the attention kernel's {MAX_HEAD_DIM}")));
            }
            let (mask, window) = match attrs.mask {
                Mask::None => (0, 0),
                Mask::Causal => (1, 0),
                Mask::SlidingWindow(w) => (2, w as usize),
            };
            a.i64(Role::Batch, bsz)
                .i64(Role::Seq, s)
                .i64(Role::Heads, h)
                .i64(Role::KvHeads, kh)
                .i64(Role::Keys, t)
                .i64(Role::HeadDim, d)
                .i64(Role::ValueDim, dv)
                .set(Role::Scale, ArgValue::F32(attrs.scale.get()))
                .set(Role::MaskKind, ArgValue::I32(mask))
                .i64(Role::Window, window);
            launch(stream, k, bsz * s * h, &a)
        }
        Op::Fused(body) => {
            let (a, items) = fused_args(body, ins, outs, b, syms).map_err(bad)?;
            launch(stream, k, items, &a)
        }
        other => Err(bad(format!("`{}` has no GPU kernel", other.name()))),
    }
}

/// The name of an input or param node.
fn input_name(op: &Op) -> &str {
    match op {
        Op::Input { name, .. } | Op::Param { name, .. } => name,
        _ => unreachable!("lowered as a source"),
    }
}
