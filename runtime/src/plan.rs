//! Executable plans: a model compiled for one GPU, saved to a file and loaded back
//! without tracing, passes or kernel compilation (like a TensorRT engine file).
//!
//! An [`ExecutablePlan`] holds what the device-resident engine
//! ([`crate::cuda::CudaEngine`]) is built from, minus the weights:
//! * the **optimized graph** as IR text ([`kiln_graph::text`]), i.e. the graph after the
//!   pass pipeline, which loading parses instead of tracing and running passes;
//! * the **launch list**: every launch of a forward pass in order, with its kernel and
//!   buffer bindings (symbolic sizes such as `seq` and `past` are resolved at run time,
//!   from the bindings of each call). It is for inspection (`kiln build` prints its
//!   size, tools can read it); the engine derives the same steps from the graph, which
//!   costs no compilation;
//! * the **kernel binaries** (CUBINs) under their cache keys
//!   ([`kiln_codegen::Compiler::key`]), handed to the engine as
//!   [`crate::cuda::EngineOptions::prebuilt`], so no kernel is compiled or read from the
//!   disk cache; with the compute capability and NVRTC version they were built for;
//! * the model's identity ([`ModelIdentity`]: where it came from and fingerprints of its
//!   config and weight metadata, not the weights), the build options ([`PlanOptions`])
//!   and the kiln version. Their hash, with the target's and the graph's, is the plan's
//!   [`key`](ExecutablePlan::key).
//!
//! The file is `KILNPLAN`, a format version (u32 LE), the payload's length (u64 LE), the
//! payload's [`stable_hash`] (32 hex digits), then the payload: the plan in `postcard`
//! (a compact serde format). [`ExecutablePlan::save`] writes through a temp file and a
//! rename; [`ExecutablePlan::from_bytes`] checks magic, format version, length,
//! checksum, key and kiln version and says which one failed ([`PlanError`]), naming
//! the file. Whether the plan still matches the model it names, and the GPU it runs on,
//! is checked at load ([`ExecutablePlan::check_model`], [`ExecutablePlan::engine`]).

use crate::cuda::{CompileStats, CudaEngine, CudaError, DeviceInfo, EngineOptions};
use indexmap::IndexMap;
use kiln_codegen::horizontal::HStep;
use kiln_codegen::kernels::{self, NodeLowering};
pub use kiln_codegen::nvrtc::stable_hash;
use kiln_codegen::{decode, resident};
use kiln_graph::{Graph, NodeId, Value};
use kiln_ops::{DType, HostTensor, Op};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The first bytes of every plan file.
pub const MAGIC: [u8; 8] = *b"KILNPLAN";
/// The layout of the payload; a plan of another format version is not read.
pub const FORMAT_VERSION: u32 = 1;
/// The kiln version that writes plans (and the only one that loads them).
pub const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Magic, format version, payload length, checksum.
const HEADER_LEN: usize = 8 + 4 + 8 + 32;

/// Errors of reading, checking and loading a plan; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("plan `{path}`: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Not a plan, another format version, truncated or corrupt.
    #[error("plan `{path}`: {msg}")]
    Format { path: PathBuf, msg: String },
    /// Built by another kiln, or from a model that has changed since.
    #[error("plan `{path}` is stale: {msg}; rebuild it with `kiln build`")]
    Stale { path: PathBuf, msg: String },
    /// Built for another GPU architecture or NVRTC.
    #[error("plan `{path}` was built for {built}, but this machine has {here}; rebuild it here with `kiln build`")]
    Target { path: PathBuf, built: String, here: String },
    #[error("plan `{path}`: the graph: {msg}")]
    Graph { path: PathBuf, msg: String },
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

/// Where the model came from: what loading the plan reads the weights from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelSource {
    /// A preset config with deterministic random weights from `seed`.
    Preset { name: String, seed: u64 },
    /// A checkpoint directory or GGUF file.
    Path(String),
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Preset { name, seed } => write!(f, "preset {name} (random weights, seed {seed})"),
            ModelSource::Path(p) => f.write_str(p),
        }
    }
}

/// What the plan was built from: the source and named fingerprints of its parts
/// (e.g. `config.json` → hash), compared part by part at load. The weights' values are
/// not hashed, only their metadata (names, dtypes, shapes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub source: ModelSource,
    pub parts: Vec<(String, String)>,
}

/// The trace and engine options a plan was built with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanOptions {
    /// Storage dtype of weights, activations and KV cache (`f32`, `f16`, `bf16`).
    pub dtype: String,
    pub max_batch: usize,
    pub max_context: usize,
    pub cuda_graphs: bool,
    /// The pass pipeline: `default`, or `canonicalize` (no fusion).
    pub pipeline: String,
}

impl PlanOptions {
    pub fn dtype(&self) -> Option<DType> {
        DType::from_name(&self.dtype)
    }
}

/// The GPU architecture and compiler the kernel binaries were built with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// `sm_90` etc.
    pub arch: String,
    pub nvrtc: (i32, i32),
    /// The GPU it was built on (information only).
    pub device: String,
}

impl Target {
    pub fn of(info: &DeviceInfo) -> Target {
        Target {
            arch: format!("sm_{}{}", info.compute_capability.0, info.compute_capability.1),
            nvrtc: info.nvrtc_version,
            device: info.name.clone(),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} with NVRTC {}.{}", self.arch, self.nvrtc.0, self.nvrtc.1)
    }
}

/// One launch of a forward pass: the node, what runs it and its buffer bindings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// The node's index in the plan's graph (`%N` of its text).
    pub node: usize,
    pub op: String,
    pub scope: String,
    /// The generated kernel's name, or what else runs the node (cuBLAS, …).
    pub kernel: String,
    /// Operands and results: `param "name"`, `input "name"`, `cache "present.X"`,
    /// `const %N` or `%N` (an intermediate in the arena), each with its type, whose
    /// symbolic dims are resolved at run time.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// One kernel binary under its cache key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBinary {
    pub key: String,
    #[serde(with = "serde_bytes")]
    pub cubin: Vec<u8>,
}

/// How the plan was built (information only, not part of the key).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// UTC, ISO 8601, when known.
    pub date: String,
    /// Kernels compiled by NVRTC, and read from the disk cache, while building.
    pub compiled: usize,
    pub cached: usize,
    /// Seconds spent obtaining the kernels (compiling or reading the cache).
    pub compile_seconds: f64,
    /// Seconds of tracing and of the pass pipeline.
    pub trace_seconds: f64,
    pub passes_seconds: f64,
}

/// A compiled model, ready to be saved and loaded (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecutablePlan {
    pub kiln_version: String,
    /// [`ExecutablePlan::compute_key`] at build time.
    pub key: String,
    pub model: ModelIdentity,
    pub options: PlanOptions,
    pub target: Target,
    /// The optimized graph in the IR text format.
    pub graph: String,
    pub launches: Vec<Launch>,
    pub kernels: Vec<KernelBinary>,
    pub build: BuildInfo,
}

/// Where a load's time went, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadTimes {
    /// Reading and checking the file.
    pub read: f64,
    /// Parsing the graph text.
    pub parse: f64,
    /// Reading or generating the weights (the caller's part).
    pub weights: f64,
    /// Building the engine: uploads, buffers and loading the prebuilt kernels.
    pub engine: f64,
    /// Of `engine`: obtaining the kernels (with a valid plan: taking the prebuilt ones).
    pub kernels: f64,
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("plan fields serialize")
}

impl ExecutablePlan {
    /// The hash of kiln version, model identity, options, target and graph.
    pub fn compute_key(&self) -> String {
        stable_hash(&[
            b"kiln plan",
            self.kiln_version.as_bytes(),
            &enc(&self.model),
            &enc(&self.options),
            &enc(&self.target),
            self.graph.as_bytes(),
        ])
    }

    /// Compiles `graph` (the optimized graph) for the GPU `device` and returns the plan
    /// and the engine it was built with. The engine is built from the graph as the plan
    /// stores it (printed and parsed back), so loading the plan finds exactly the kernels
    /// built here.
    pub fn build(
        graph: &Graph,
        weights: IndexMap<String, HostTensor>,
        model: ModelIdentity,
        options: PlanOptions,
        device: usize,
    ) -> Result<(ExecutablePlan, CudaEngine), PlanError> {
        let here = Path::new("<new plan>");
        let text = kiln_graph::text::print(graph);
        let parsed = parse_graph(&text, here)?;
        if kiln_graph::text::print(&parsed) != text {
            return Err(PlanError::Graph {
                path: here.into(),
                msg: "the graph's text form does not parse back to the same graph".into(),
            });
        }
        let launches = launch_list(&parsed);
        let engine = CudaEngine::new(parsed, weights, engine_options(&options, device, None))?;
        let stats = engine.compile_stats();
        let kernels =
            engine.kernel_binaries().iter().map(|(key, cubin)| KernelBinary { key: key.clone(), cubin: cubin.clone() });
        let mut plan = ExecutablePlan {
            kiln_version: KILN_VERSION.to_string(),
            key: String::new(),
            model,
            options,
            target: Target::of(engine.device()),
            graph: text,
            launches,
            kernels: kernels.collect(),
            build: BuildInfo {
                compiled: stats.compiled,
                cached: stats.cached,
                compile_seconds: stats.seconds,
                ..Default::default()
            },
        };
        plan.key = plan.compute_key();
        Ok((plan, engine))
    }

    /// The file's bytes (see the [module docs](self)).
    pub fn to_bytes(&self) -> Vec<u8> {
        let payload = enc(self);
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(stable_hash(&[&payload]).as_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Reads a plan from the bytes of file `path` (named in errors): checks the magic,
    /// format version, length, checksum, key and kiln version.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<ExecutablePlan, PlanError> {
        let bad = |msg: String| PlanError::Format { path: path.to_path_buf(), msg };
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(bad("not a kiln plan (the file does not start with `KILNPLAN`)".into()));
        }
        if bytes.len() < HEADER_LEN {
            return Err(bad(format!("truncated: {} bytes, shorter than the {HEADER_LEN}-byte header", bytes.len())));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}, but this kiln ({KILN_VERSION}) reads version {FORMAT_VERSION}; rebuild it \
                 with `kiln build`"
            )));
        }
        let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let payload = &bytes[HEADER_LEN..];
        if (payload.len() as u64) < len {
            return Err(bad(format!(
                "truncated: the header announces {len} bytes of payload, the file has {}",
                payload.len()
            )));
        }
        if payload.len() as u64 > len {
            return Err(bad(format!(
                "{} bytes of trailing data after the {len}-byte payload",
                payload.len() as u64 - len
            )));
        }
        let sum = std::str::from_utf8(&bytes[20..HEADER_LEN]).unwrap_or("");
        if stable_hash(&[payload]) != sum {
            return Err(bad("corrupt: the payload's checksum does not match the header".into()));
        }
        let plan: ExecutablePlan =
            postcard::from_bytes(payload).map_err(|e| bad(format!("corrupt: cannot decode the payload: {e}")))?;
        if plan.kiln_version != KILN_VERSION {
            return Err(PlanError::Stale {
                path: path.to_path_buf(),
                msg: format!("built by kiln {}, this is kiln {KILN_VERSION}", plan.kiln_version),
            });
        }
        if plan.compute_key() != plan.key {
            return Err(bad(format!("corrupt: the key {} does not match the plan's contents", plan.key)));
        }
        Ok(plan)
    }

    /// Reads and checks the plan file `path` ([`ExecutablePlan::from_bytes`]).
    pub fn open(path: &Path) -> Result<ExecutablePlan, PlanError> {
        let bytes = std::fs::read(path).map_err(|source| PlanError::Io { path: path.to_path_buf(), source })?;
        ExecutablePlan::from_bytes(&bytes, path)
    }

    /// Writes the plan to `path` atomically (a temp file beside it, then a rename).
    /// Returns the number of bytes written.
    pub fn save(&self, path: &Path) -> Result<usize, PlanError> {
        let bytes = self.to_bytes();
        let io = |source| PlanError::Io { path: path.to_path_buf(), source };
        let name = path
            .file_name()
            .ok_or_else(|| io(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let written = (|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(bytes.len())
    }

    /// Checks that the model found now (`now`, computed the way the plan's was) is the
    /// one the plan was built from; the error names every part that differs.
    pub fn check_model(&self, now: &ModelIdentity, path: &Path) -> Result<(), PlanError> {
        let stale = |msg: String| PlanError::Stale { path: path.to_path_buf(), msg };
        if now.source != self.model.source {
            return Err(stale(format!("built from {}, not {}", self.model.source, now.source)));
        }
        let was: HashMap<&str, &str> = self.model.parts.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let is: HashMap<&str, &str> = now.parts.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut differ: Vec<&str> = Vec::new();
        for (k, v) in &self.model.parts {
            if is.get(k.as_str()) != Some(&v.as_str()) {
                differ.push(k);
            }
        }
        for (k, _) in &now.parts {
            if !was.contains_key(k.as_str()) {
                differ.push(k);
            }
        }
        if differ.is_empty() {
            Ok(())
        } else {
            Err(stale(format!(
                "the model at {} has changed since it was built: {} differ",
                now.source,
                differ.join(", ")
            )))
        }
    }

    /// Parses the plan's graph.
    pub fn parse_graph(&self, path: &Path) -> Result<Graph, PlanError> {
        parse_graph(&self.graph, path)
    }

    /// Checks that device `device` is the architecture (and this NVRTC the version) the
    /// kernels were built for.
    pub fn check_target(&self, device: usize, path: &Path) -> Result<DeviceInfo, PlanError> {
        let info = crate::cuda::device_info(device).map_err(CudaError::Unavailable)?;
        let here = Target::of(&info);
        if here.arch != self.target.arch || here.nvrtc != self.target.nvrtc {
            return Err(PlanError::Target {
                path: path.to_path_buf(),
                built: self.target.to_string(),
                here: format!("{here} ({})", info.name),
            });
        }
        Ok(info)
    }

    /// The engine of this plan on GPU `device`, from its parsed graph and the weights:
    /// every kernel from the plan's binaries. Returns it with the seconds it took and the
    /// time spent on kernels ([`CompileStats`]); a kernel that had to be compiled after
    /// all (the plan does not match what this kiln lowers) is logged as a warning.
    pub fn engine(
        &self,
        graph: Graph,
        weights: IndexMap<String, HostTensor>,
        device: usize,
        path: &Path,
    ) -> Result<(CudaEngine, f64, CompileStats), PlanError> {
        self.check_target(device, path)?;
        let t = Instant::now();
        let prebuilt: HashMap<String, Vec<u8>> =
            self.kernels.iter().map(|k| (k.key.clone(), k.cubin.clone())).collect();
        let opts = engine_options(&self.options, device, Some(Arc::new(prebuilt)));
        let engine = CudaEngine::new(graph, weights, opts)?;
        let stats = engine.compile_stats();
        if stats.compiled + stats.cached > 0 {
            tracing::warn!(
                plan = %path.display(),
                compiled = stats.compiled,
                cached = stats.cached,
                "the plan lacks kernels this kiln needs; rebuild it with `kiln build`"
            );
        }
        Ok((engine, t.elapsed().as_secs_f64(), stats))
    }

    /// Total bytes of the kernel binaries.
    pub fn kernel_bytes(&self) -> usize {
        self.kernels.iter().map(|k| k.cubin.len()).sum()
    }
}

fn parse_graph(text: &str, path: &Path) -> Result<Graph, PlanError> {
    kiln_graph::text::parse(text).map_err(|e| PlanError::Graph { path: path.to_path_buf(), msg: e.to_string() })
}

fn engine_options(o: &PlanOptions, device: usize, prebuilt: Option<Arc<HashMap<String, Vec<u8>>>>) -> EngineOptions {
    EngineOptions {
        device,
        max_batch: o.max_batch,
        max_context: o.max_context,
        cuda_graphs: o.cuda_graphs,
        cache_dir: None,
        prebuilt,
        ..Default::default()
    }
}

/// Every launch of one forward pass of `graph` (the model contract of the engine) in
/// order, then greedy sampling and the step end, as the engine runs them. Derived from
/// the graph and the kernel generators alone (no GPU needed).
pub fn launch_list(graph: &Graph) -> Vec<Launch> {
    let mut live: HashSet<NodeId> = HashSet::new();
    let mut stack: Vec<NodeId> = graph.outputs().values().map(|v| v.node).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(graph.operands(n).iter().map(|v| v.node));
        }
    }
    // `present.X = concat(past.X, new)`, bare or ending a fused group: appends into the
    // resident cache.
    let mut present: HashMap<NodeId, String> = HashMap::new();
    for (name, v) in graph.outputs() {
        let append = match &graph.node(v.node).op {
            Op::Concat { axis: 1 } => true,
            Op::Fused(body) => kiln_codegen::fused_append(body).is_some(),
            _ => false,
        };
        if name.starts_with("present.") && append {
            present.insert(v.node, name.clone());
        }
    }
    let syms = kiln_codegen::symbols::graph_symbols(graph);
    let describe = |v: Value| -> String {
        let node = graph.node(v.node);
        let ty = graph.value_type(v);
        let at =
            if v.output == 0 { format!("%{}", v.node.index()) } else { format!("%{}.{}", v.node.index(), v.output) };
        match &node.op {
            Op::Input { name, .. } => format!("input \"{name}\" {ty}"),
            Op::Param { name, .. } => format!("param \"{name}\" {ty}"),
            Op::Constant { .. } => format!("const {at} {ty}"),
            _ => match present.get(&v.node) {
                Some(name) => format!("cache \"{name}\" {ty}"),
                None => format!("{at} {ty}"),
            },
        }
    };
    let name_or = |r: Result<kiln_codegen::Kernel, kiln_codegen::CodegenError>| match r {
        Ok(k) => k.sig.name,
        Err(e) => format!("unsupported: {}", e.0),
    };
    let mut out = Vec::new();
    // Producers that a fused decode attention computes itself (the engine's rule,
    // `attention_producers`): producer → its attention.
    let mut absorbed: HashMap<NodeId, NodeId> = HashMap::new();
    for n in graph.topo_order() {
        if let Ok(p) = decode::attention_producers(graph, n) {
            for m in [p.q, p.k, p.v] {
                absorbed.insert(m, n);
            }
        }
    }
    // Horizontal fusion candidates: (node, kind, its kernel, its launch's index).
    let mut hsteps: Vec<(NodeId, HStep)> = Vec::new();
    let mut hparts: Vec<Option<(kiln_codegen::Kernel, usize)>> = Vec::new();
    for n in graph.topo_order() {
        if !live.contains(&n) {
            continue;
        }
        let node = graph.node(n);
        let ops = graph.operands(n);
        let part = match &node.op {
            Op::Fused(body) if present.contains_key(&n) => kiln_codegen::fused_append_kernel(body, &syms).ok(),
            Op::Fused(body) if matches!(body.kind(), Ok(kiln_ops::FusedKind::Elementwise { .. })) => {
                kiln_codegen::fused_kernel(body, &syms).ok()
            }
            _ => None,
        };
        let kind = match kiln_codegen::horizontal::node_step(graph, n) {
            HStep::Part if part.is_none() => HStep::Barrier,
            k => k,
        };
        hsteps.push((n, kind));
        hparts.push(part.map(|k| (k, out.len())));
        let kernel = if let (true, Op::Fused(body)) = (present.contains_key(&n), &node.op) {
            name_or(kiln_codegen::fused_append_kernel(body, &syms))
        } else if present.contains_key(&n) {
            let at = graph.value_type(ops[0]).shape.dims()[1].clone();
            name_or(resident::kv_append(node.outputs[0].dtype, &at, &syms))
        } else {
            match &node.op {
                Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Reshape(_) => continue,
                Op::Fused(body) if kiln_codegen::scaled_prologue_in(graph, n).is_ok() => {
                    match kiln_codegen::scaled_gemv_one_row_choice(body, &syms) {
                        Ok((_, text)) => format!("{text}, else {}", matvec_launch(body, &syms)),
                        Err(_) => matvec_launch(body, &syms),
                    }
                }
                Op::Fused(body) if matches!(body.kind(), Ok(kiln_ops::FusedKind::MatVec { .. })) => {
                    matvec_launch(body, &syms)
                }
                Op::Arange { start, .. } if !start.is_fixed() => name_or(resident::arange_syms(start, &syms)),
                Op::MatMul { transpose_a, transpose_b } => {
                    let (a, w) = (graph.value_type(ops[0]), graph.value_type(ops[1]));
                    let y = node.outputs[0].dtype;
                    let row = decode::weight_row_bytes(w);
                    let gemv =
                        |m: usize| decode::gemv_with(a.dtype, w.dtype, y, decode::GemvConfig::for_shape(m, row)).ok();
                    // The streaming GEMV for one row over short rows, as the engine decides.
                    let stream = decode::gemv_stream_if_pays(a.dtype, w, y);
                    match (!transpose_a && *transpose_b && w.rank() == 2).then(|| (gemv(1), gemv(2))) {
                        Some((Some(k1), Some(k2))) => {
                            let one =
                                stream.map_or(k1.sig.name, |s| format!("{} (streaming the short rows)", s.sig.name));
                            format!("cuBLAS GEMM, or {one} for one row, {} for a few", k2.sig.name)
                        }
                        _ => "cuBLAS GEMM".into(),
                    }
                }
                Op::Attention(_) if ops[1..].iter().any(|v| present.contains_key(&v.node)) => {
                    let (qt, kt) = (graph.value_type(ops[0]), graph.value_type(ops[1]));
                    let heads = |t: &kiln_ops::TensorType| t.shape.dims()[2].as_fixed().unwrap_or(0);
                    let group = heads(qt).checked_div(heads(kt)).unwrap_or(0);
                    let keys = &kt.shape.dims()[1];
                    let fused = match decode::attention_decode_fused_in(graph, n, None, &syms) {
                        Ok((f, p)) => format!(
                            "{} (computes q and the new K/V rows itself: %{}, %{}, %{} launch nothing) whenever the \
                             split-K kernel runs; else ",
                            f.sig.name,
                            p.q.index(),
                            p.k.index(),
                            p.v.index()
                        ),
                        Err(_) => String::new(),
                    };
                    match decode::attention_decode(kt.dtype, group, keys, &syms) {
                        Ok(k) if decode::attention_decode_query_tile(group) > 1 => {
                            match decode::attention_decode_tiled(kt.dtype, group, 1, keys, &syms) {
                                Ok(k1) => format!(
                                    "{fused}{}, or {} below {} blocks per split",
                                    k.sig.name,
                                    k1.sig.name,
                                    decode::ATTENTION_DECODE_MIN_BLOCKS
                                ),
                                Err(e) => format!("unsupported: {}", e.0),
                            }
                        }
                        Ok(k) => format!("{fused}{}", k.sig.name),
                        Err(e) => format!("unsupported: {}", e.0),
                    }
                }
                _ => match kernels::lower_node(graph, n) {
                    Ok(NodeLowering::Kernel(k)) => k.sig.name,
                    Ok(other) => format!("unexpected lowering {other:?}"),
                    Err(e) => format!("unsupported: {}", e.0),
                },
            }
        };
        let kernel = match absorbed.get(&n) {
            Some(a) => format!("{kernel} (launches nothing where attention %{} computes it: split-K)", a.index()),
            None => kernel,
        };
        out.push(Launch {
            node: n.index(),
            op: node.op.name().to_string(),
            scope: node.scope.clone(),
            kernel,
            inputs: ops.iter().map(|&v| describe(v)).collect(),
            outputs: (0..node.outputs.len()).map(|i| describe(Value::new(n, i as u8))).collect(),
        });
    }
    for run in kiln_codegen::horizontal::horizontal_runs(graph, &hsteps) {
        let parts: Vec<&(kiln_codegen::Kernel, usize)> =
            run.iter().map(|&j| hparts[j].as_ref().expect("parts have kernels")).collect();
        let kernels: Vec<&kiln_codegen::Kernel> = parts.iter().map(|(k, _)| k).collect();
        if let Ok(h) = kiln_codegen::horizontal::horizontal(&kernels) {
            for (p, (_, at)) in parts.iter().enumerate() {
                let own = std::mem::take(&mut out[*at].kernel);
                out[*at].kernel = format!("{} (part {p} of {}, one launch: {own})", h.sig.name, parts.len());
            }
        }
    }
    if let Some(&logits) = graph.outputs().get("logits") {
        out.push(Launch {
            node: logits.node.index(),
            op: "greedy".into(),
            scope: String::new(),
            kernel: name_or(decode::greedy()),
            inputs: vec![describe(logits)],
            outputs: vec!["the next input ids (device)".into()],
        });
        out.push(Launch {
            node: logits.node.index(),
            op: "step_end".into(),
            scope: String::new(),
            kernel: "step_end (records the sampled ids, advances `past` on the device)".into(),
            inputs: vec!["the next input ids (device)".into()],
            outputs: vec!["token history, symbol table".into()],
        });
    }
    out
}

/// The launch-list entry of a matrix-vector group as the prologue's kernel and a GEMV
/// (with its epilogue's forms).
fn matvec_launch(body: &kiln_ops::FusedBody, syms: &[kiln_ops::Sym]) -> String {
    match body.kind() {
        Ok(kiln_ops::FusedKind::MatVec { epilogue: Some(_), .. }) => {
            let epi = kiln_codegen::gemv_epilogue(body, syms, decode::GemvConfig::for_rows(1));
            let pro = body.prologue().map(|p| kiln_codegen::fused_kernel(&p, syms));
            let tail = body.epilogue().map(|e| kiln_codegen::fused_kernel(&e, syms));
            match (epi, pro, tail) {
                (Ok(e), Some(Ok(p)), Some(Ok(t))) => format!(
                    "{} then {} (the GEMV that also computes the epilogue: one row, one wave of blocks), \
                     or a GEMV or cuBLAS GEMM then {}",
                    p.sig.name, e.sig.name, t.sig.name
                ),
                (Err(e), _, _) | (_, Some(Err(e)), _) | (_, _, Some(Err(e))) => format!("unsupported: {}", e.0),
                (_, None, _) | (_, _, None) => "unsupported: no prologue or epilogue".into(),
            }
        }
        _ => {
            let fused = kiln_codegen::gemv_prologue(body, syms, decode::GemvConfig::for_prologue());
            let pro = body.prologue().map(|p| kiln_codegen::fused_kernel(&p, syms));
            match (fused, pro) {
                (Ok(f), Some(Ok(p))) => {
                    format!("{} then GEMV or cuBLAS GEMM (or {} with KILN_MATVEC=fused)", p.sig.name, f.sig.name)
                }
                (Err(e), _) | (_, Some(Err(e))) => format!("unsupported: {}", e.0),
                (_, None) => "unsupported: no prologue".into(),
            }
        }
    }
}
