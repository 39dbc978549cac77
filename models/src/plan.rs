//! Executable plans of models: [`build`] traces a model (a preset with random weights,
//! a checkpoint directory or a GGUF file), runs the pass pipeline and compiles the GPU
//! engine into a [`kiln_runtime::plan::ExecutablePlan`]; [`load`] turns a saved plan
//! back into an engine without tracing, passes or kernel compilation.
//!
//! A plan does not hold the weights: [`load`] reads them from the checkpoint the plan
//! names (or regenerates a preset's random weights from its seed). To notice a model
//! that changed since the build, the plan keeps the model's [identity](identity):
//! * a checkpoint directory: hashes of `config.json` and of every `*.safetensors` file's
//!   header (tensor names, dtypes, shapes and offsets; a few KiB, the weights
//!   themselves are not read);
//! * a GGUF file: a hash of its header (metadata and tensor table, up to the data);
//! * a preset: a hash of its `config.json` text (the seed is part of the source).

use crate::config::LlamaConfig;
use crate::llama::{LlamaForCausalLM, TraceOptions};
use crate::llm::{is_gguf, load_config, MAX_GPU_CONTEXT};
use crate::{ModelError, Result};
use indexmap::IndexMap;
use kiln_graph::Graph;
use kiln_ops::{DType, HostTensor};
use kiln_runtime::cuda::{CompileStats, CudaEngine};
use kiln_runtime::plan::{stable_hash, ExecutablePlan, LoadTimes, ModelIdentity, ModelSource, PlanError, PlanOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

impl From<PlanError> for ModelError {
    fn from(e: PlanError) -> ModelError {
        ModelError::Plan(Box::new(e))
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.to_path_buf(), source }
}

/// The bytes of a safetensors file's header (its 8-byte length and the JSON).
fn safetensors_header(path: &Path) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io_err(path))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(ModelError::WeightFile { path: path.into(), msg: format!("header of {n} bytes") });
    }
    let mut header = len.to_vec();
    header.resize(8 + n as usize, 0);
    f.read_exact(&mut header[8..]).map_err(io_err(path))?;
    Ok(header)
}

/// The identity of the model `source` names (see the [module docs](self)).
pub fn identity(source: &ModelSource) -> Result<ModelIdentity> {
    let parts = match source {
        ModelSource::Preset { name, .. } => {
            vec![("config".to_string(), stable_hash(&[crate::presets::preset_json(name)?.as_bytes()]))]
        }
        ModelSource::Path(p) => {
            let path = Path::new(p);
            if is_gguf(path) {
                let data_offset = crate::gguf::GgufFile::open(path)?.data_offset();
                let mut header = vec![0u8; data_offset];
                std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header)).map_err(io_err(path))?;
                vec![("GGUF header".to_string(), stable_hash(&[&header]))]
            } else {
                let config = path.join("config.json");
                let bytes = std::fs::read(&config).map_err(io_err(&config))?;
                let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(io_err(path))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                    .collect();
                files.sort();
                if files.is_empty() {
                    return Err(ModelError::WeightFile { path: path.into(), msg: "no *.safetensors files".into() });
                }
                let mut headers: Vec<Vec<u8>> = Vec::new();
                for f in &files {
                    headers.push(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().into());
                    headers.push(safetensors_header(f)?);
                }
                let refs: Vec<&[u8]> = headers.iter().map(|h| h.as_slice()).collect();
                vec![
                    ("config.json".to_string(), stable_hash(&[&bytes])),
                    ("safetensors headers".to_string(), stable_hash(&refs)),
                ]
            }
        }
    };
    Ok(ModelIdentity { source: source.clone(), parts })
}

/// The config of the model `source` names.
pub fn config(source: &ModelSource) -> Result<LlamaConfig> {
    match source {
        ModelSource::Preset { name, .. } => crate::presets::preset(name),
        ModelSource::Path(p) => load_config(Path::new(p)),
    }
}

/// The weights of the model `source` names, for the parameters of `graph` (as `dtype`).
pub fn weights(source: &ModelSource, graph: &Graph, dtype: DType) -> Result<IndexMap<String, HostTensor>> {
    match source {
        ModelSource::Preset { seed, .. } => crate::presets::random_weights_for(graph, *seed),
        ModelSource::Path(p) if is_gguf(Path::new(p)) => Ok(crate::gguf::model::load_gguf(p, dtype)?.1),
        ModelSource::Path(p) => {
            let model = LlamaForCausalLM::new(load_config(Path::new(p))?)?;
            crate::weights::load_weights(p, &model, dtype)
        }
    }
}

/// What [`build`] builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildOptions {
    pub dtype: DType,
    pub max_batch: usize,
    /// `None`: the model's `max_position_embeddings`, at most [`MAX_GPU_CONTEXT`].
    pub max_context: Option<usize>,
    pub cuda_graphs: bool,
    /// The default pass pipeline (`true`) or canonicalization only.
    pub fusion: bool,
    /// CUDA device ordinal.
    pub device: usize,
    /// Keep the graph after each pass ([`Built::stages`]).
    pub keep_stages: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            dtype: DType::BF16,
            max_batch: 1,
            max_context: None,
            cuda_graphs: true,
            fusion: true,
            device: 0,
            keep_stages: false,
        }
    }
}

/// A built plan, the engine it was built with, and the stages of the pipeline.
pub struct Built {
    pub plan: ExecutablePlan,
    pub engine: CudaEngine,
    /// `traced`, then the graph after each pass (when asked for).
    pub stages: Vec<(String, Graph)>,
    /// Seconds of reading or generating the weights.
    pub weights_seconds: f64,
}

/// Traces the model, runs the pass pipeline and compiles the GPU engine (a GPU is
/// needed: the kernels are compiled for its architecture).
pub fn build(source: &ModelSource, opts: &BuildOptions) -> Result<Built> {
    if let Err(why) = kiln_runtime::cuda::device_info(opts.device) {
        return Err(ModelError::Device {
            device: "cuda".into(),
            msg: format!("building a plan compiles kernels for the GPU's architecture and needs a GPU: {why}"),
        });
    }
    if !matches!(opts.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(ModelError::Request(format!("dtype must be f32, f16 or bf16, not {}", opts.dtype.name())));
    }
    let cfg = config(source)?;
    let max_context = opts.max_context.unwrap_or(cfg.max_position_embeddings.min(MAX_GPU_CONTEXT));
    if max_context < 2 || max_context > cfg.max_position_embeddings {
        return Err(ModelError::Request(format!(
            "max context {max_context} must be in 2..={} (the model's max_position_embeddings)",
            cfg.max_position_embeddings
        )));
    }
    if opts.max_batch == 0 {
        return Err(ModelError::Request("max batch must be at least 1".into()));
    }
    let model_id = identity(source)?;
    let model = LlamaForCausalLM::new(cfg)?;
    let t = Instant::now();
    let traced = model.trace(&TraceOptions { dtype: opts.dtype, last_token_only: true })?;
    let trace_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let pipeline = if opts.fusion { kiln_passes::default_pipeline() } else { kiln_passes::pipeline::canonicalize() };
    let out = pipeline
        .keep_stages(opts.keep_stages)
        .run(traced.clone())
        .map_err(|e| ModelError::Unsupported(format!("pass pipeline: {e}")))?;
    let passes_seconds = t.elapsed().as_secs_f64();
    let mut stages = Vec::new();
    if opts.keep_stages {
        stages.push(("traced".to_string(), traced));
        stages.extend(out.stages.into_iter().map(|s| (s.pass.to_string(), s.graph)));
    }
    let graph = out.graph;
    let t = Instant::now();
    let w = weights(source, &graph, opts.dtype)?;
    let weights_seconds = t.elapsed().as_secs_f64();
    let options = PlanOptions {
        dtype: opts.dtype.name().to_string(),
        max_batch: opts.max_batch,
        max_context,
        cuda_graphs: opts.cuda_graphs,
        pipeline: if opts.fusion { "default" } else { "canonicalize" }.to_string(),
    };
    let (mut plan, engine) = ExecutablePlan::build(&graph, w, model_id, options, opts.device)?;
    plan.build.trace_seconds = trace_seconds;
    plan.build.passes_seconds = passes_seconds;
    Ok(Built { plan, engine, stages, weights_seconds })
}

/// A loaded plan: the engine, ready to prefill, and what the load did.
pub struct Loaded {
    pub plan: ExecutablePlan,
    pub engine: CudaEngine,
    pub config: LlamaConfig,
    /// The plan's graph (parsed), as the engine runs it.
    pub graph: Graph,
    pub times: LoadTimes,
    /// How the engine obtained its kernels: with a valid plan, all prebuilt.
    pub kernels: CompileStats,
}

/// Reads the plan file `path` and builds its engine on GPU `device`: checks the file,
/// that the model it names is unchanged ([`identity`]) and that this GPU is the
/// architecture it was built for; parses the graph, reads the weights and takes every
/// kernel from the plan. Logs the time of each part.
pub fn load(path: &Path, device: usize) -> Result<Loaded> {
    let t = Instant::now();
    let plan = ExecutablePlan::open(path)?;
    load_opened(plan, t.elapsed().as_secs_f64(), path, device)
}

/// [`load`] for a plan already read from `path` (in `read` seconds).
pub fn load_opened(plan: ExecutablePlan, read: f64, path: &Path, device: usize) -> Result<Loaded> {
    let config = config(&plan.model.source)?;
    plan.check_model(&identity(&plan.model.source)?, path)?;
    plan.check_target(device, path)?;
    let dtype = plan.options.dtype().ok_or_else(|| {
        ModelError::from(PlanError::Format {
            path: path.into(),
            msg: format!("unknown dtype `{}`", plan.options.dtype),
        })
    })?;
    let t = Instant::now();
    let graph = plan.parse_graph(path)?;
    let parse = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let w = weights(&plan.model.source, &graph, dtype)?;
    let weights_s = t.elapsed().as_secs_f64();
    let (engine, engine_s, kernels) = plan.engine(graph.clone(), w, device, path)?;
    let times = LoadTimes { read, parse, weights: weights_s, engine: engine_s, kernels: kernels.seconds };
    tracing::info!(
        plan = %path.display(),
        model = %plan.model.source,
        read_ms = format!("{:.1}", times.read * 1e3),
        parse_ms = format!("{:.1}", times.parse * 1e3),
        weights_ms = format!("{:.1}", times.weights * 1e3),
        engine_ms = format!("{:.1}", times.engine * 1e3),
        kernels_ms = format!("{:.1}", times.kernels * 1e3),
        prebuilt = kernels.prebuilt,
        compiled = kernels.compiled,
        cached = kernels.cached,
        "plan loaded"
    );
    Ok(Loaded { plan, engine, config, graph, times, kernels })
}
