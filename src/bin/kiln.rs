//! The `kiln` command line.
//!
//! * `kiln generate (--model DIR | --plan PLAN) --prompt TEXT [--chat] [--max-tokens N] [--temperature T]
//!   [--top-k K] [--top-p P] [--repetition-penalty R] [--seed S] [--stop STR]… [--device D]`:
//!   the generated text alone on stdout (streamed), statistics in the logs on stderr.
//! * `kiln logits --model DIR --ids 1,2,3 --out FILE.safetensors [--device D]`: one forward
//!   pass over the ids (full-sequence graph); writes the f32 tensor `logits`, `[n_ids, vocab]`.
//! * `kiln dump --model DIR --format text|dot|json|svg --out FILE [--stage traced|PASS]
//!   [--dump-after PASS|all DIR]`: the IR traced or after a pass of the default pipeline
//!   (the `last_token_only` prompt/decode graph unless `--full-logits`); `--dump-after`
//!   also writes the IR text and DOT after each named pass into `DIR`.
//! * `kiln build (--model MODEL | --preset NAME [--seed S]) --out PLAN [--dtype bf16]
//!   [--max-batch N] [--max-context N] [--no-cuda-graphs] [--no-fusion] [--gpu N]
//!   [--dump-after PASS|all DIR]`: an executable plan (the optimized graph, its launch list
//!   and the kernel binaries for this GPU, [`kiln::runtime::plan`]); `kiln generate --plan
//!   PLAN` and `kiln bench --plan PLAN` load it without tracing, passes or compilation.
//! * `kiln convert --from FILE.gguf --to DIR`: a Hugging Face checkpoint from a GGUF file.
//! * `kiln bench --preset NAME | --model MODEL | --plan PLAN [--dtype bf16] [--prefill 128,2048]
//!   [--batch 1,8,64] [--decode-steps 128] [--json OUT] [--no-cuda-graphs]`: GPU prefill
//!   and decode throughput, memory, launches per step and the decode roofline ([`kiln::bench`]).
//! * `kiln viz [--model MODEL | --ir FILE]`: the interactive graph viewer over every stage
//!   (traced, then after each pass).
//!
//! `MODEL` / `DIR` is an HF checkpoint directory or a `.gguf` file; without `--model` the
//! default model (SmolLM2-135M-Instruct, Q4_1 GGUF) is fetched on first use and cached.
//!
//! Logs go to stderr (`RUST_LOG` overrides the level; default `info`). Any error prints
//! `error: <message>` on stderr and exits with code 1.

use clap::{Parser, Subcommand, ValueEnum};
use kiln_graph::Graph;
use kiln_models::llama::{LlamaForCausalLM, TraceOptions};
use kiln_models::llm::{load_config, prompt_logits, Device, LoadOptions, SamplingParams, LLM};
use kiln_models::tokenizer::ChatMessage;
use kiln_ops::DType;
use kiln_runtime::plan::ModelSource;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "kiln", version, about = "kiln: trace, compile and run LLMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

impl From<DeviceArg> for Device {
    fn from(d: DeviceArg) -> Device {
        match d {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
            DeviceArg::Auto => Device::Auto,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> DType {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Dot,
    Json,
    Svg,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt.
    Generate {
        /// HF model directory or GGUF file [default: SmolLM2-135M-Instruct, fetched on first use].
        #[arg(long)]
        model: Option<PathBuf>,
        /// An executable plan of a checkpoint (`kiln build --model`) instead of a model: runs
        /// on the GPU with the plan's dtype and engine options.
        #[arg(long, conflicts_with_all = ["model", "device", "dtype"])]
        plan: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        temperature: f32,
        /// 0 = off.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        top_p: f32,
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        repetition_penalty: f32,
        #[arg(long)]
        seed: Option<u64>,
        /// Stop strings (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DTypeArg,
    },
    /// Write the logits of one forward pass over token ids to a safetensors file.
    Logits {
        /// HF model directory or GGUF file [default: SmolLM2-135M-Instruct].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Comma-separated token ids.
        #[arg(long)]
        ids: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DTypeArg,
    },
    /// Write the traced IR of a model.
    Dump {
        /// HF model directory or GGUF file [default: SmolLM2-135M-Instruct].
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        #[arg(long)]
        out: PathBuf,
        /// Trace the full-sequence logits graph instead of the last-token one.
        #[arg(long)]
        full_logits: bool,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DTypeArg,
        /// Which stage to write: `traced` or the name of a pass of the default pipeline.
        #[arg(long, default_value = "traced")]
        stage: String,
        /// Also write `NN-PASS.kiln` and `NN-PASS.dot` after the named pass (or `all`) into DIR.
        #[arg(long, num_args = 2, value_names = ["PASS", "DIR"])]
        dump_after: Vec<String>,
    },
    /// Open the interactive graph viewer (stages: traced, then after each pass).
    Viz {
        /// HF model directory or GGUF file to trace [default: SmolLM2-135M-Instruct].
        #[arg(long, conflicts_with = "ir")]
        model: Option<PathBuf>,
        /// An IR text file (`kiln dump --format text`) instead of a model.
        #[arg(long)]
        ir: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DTypeArg,
    },
    /// Convert a GGUF file into a Hugging Face checkpoint directory (config.json,
    /// model.safetensors, tokenizer.json, tokenizer_config.json) that kiln and
    /// transformers both load.
    Convert {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        to: PathBuf,
    },
    /// Benchmark prefill and decode on the GPU (a preset with random weights, a model, or a plan).
    Bench(kiln::bench::BenchArgs),
    /// Compile a model for this GPU into an executable plan file (needs a GPU).
    Build {
        /// HF model directory or GGUF file [default: SmolLM2-135M-Instruct].
        #[arg(long, conflicts_with = "preset")]
        model: Option<PathBuf>,
        /// A model preset with random weights: llama-3.2-1b, llama-3-8b, smollm2-135m.
        #[arg(long)]
        preset: Option<String>,
        /// Seed of the random weights (presets).
        #[arg(long, default_value_t = 0, requires = "preset")]
        seed: u64,
        /// The plan file to write.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: DTypeArg,
        /// Sequences decoded together, at most.
        #[arg(long, default_value_t = 1)]
        max_batch: usize,
        /// Positions per sequence (the KV cache's capacity) [default: the model's
        /// max_position_embeddings, at most 16384].
        #[arg(long)]
        max_context: Option<usize>,
        /// Launch kernels one by one instead of replaying CUDA graphs.
        #[arg(long)]
        no_cuda_graphs: bool,
        /// Canonicalization only (skip the fusion pass).
        #[arg(long)]
        no_fusion: bool,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        gpu: usize,
        /// Also write `NN-PASS.kiln` and `NN-PASS.dot` after the named pass (or `all`) into DIR.
        #[arg(long, num_args = 2, value_names = ["PASS", "DIR"])]
        dump_after: Vec<String>,
    },
}

/// The model to use: the one given, or the default model (downloaded on first use).
fn model_path(model: Option<PathBuf>) -> Result<PathBuf, CliError> {
    match model {
        Some(m) => Ok(m),
        None => Ok(kiln_models::fetch::default_model_path()?),
    }
}

/// An error for the user: the message, with its causes.
struct CliError(String);

impl<E: std::error::Error> From<E> for CliError {
    fn from(e: E) -> CliError {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            let m = s.to_string();
            if !msg.contains(&m) {
                msg.push_str(&format!(": {m}"));
            }
            src = s.source();
        }
        CliError(msg)
    }
}

fn fail(msg: impl Into<String>) -> CliError {
    CliError(msg.into())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    std::fs::write(path, bytes).map_err(|e| fail(format!("cannot write `{}`: {e}", path.display())))
}

fn parse_ids(s: &str) -> Result<Vec<u32>, CliError> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<u32>().map_err(|_| fail(format!("--ids: `{x}` is not a token id (non-negative integer)"))))
        .collect()
}

fn trace(model: &Path, dtype: DType, last_token_only: bool) -> Result<Graph, CliError> {
    let m = LlamaForCausalLM::new(load_config(model)?)?;
    Ok(m.trace(&TraceOptions { dtype, last_token_only })?)
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn stages(traced: Graph) -> Result<Vec<(String, Graph)>, CliError> {
    Ok(kiln::dump::stages(traced)?)
}

fn dump_stages(stages: &[(String, Graph)], which: &str, dir: &Path) -> Result<(), CliError> {
    kiln::dump::write_stages(stages, which, dir).map(|_| ()).map_err(CliError)
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.cmd {
        Cmd::Generate {
            model,
            plan,
            prompt,
            chat,
            max_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            device,
            dtype,
        } => {
            let params = SamplingParams {
                max_tokens,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                seed,
                stop,
                ..SamplingParams::default()
            };
            params.validate()?;
            let llm = match plan {
                Some(plan) => LLM::load_plan(&plan)?,
                None => LLM::load(&model_path(model)?, LoadOptions { dtype: dtype.into(), device: device.into() })?,
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let mut write_err = None;
            let mut on_delta = |d: &str| {
                if write_err.is_none() {
                    if let Err(e) = out.write_all(d.as_bytes()).and_then(|_| out.flush()) {
                        write_err = Some(e);
                    }
                }
            };
            let res = if chat {
                llm.chat_stream(&[ChatMessage::user(prompt)], &params, &mut on_delta)?
            } else {
                llm.generate_stream(&prompt, &params, &mut on_delta)?
            };
            if let Some(e) = write_err {
                return Err(fail(format!("cannot write to stdout: {e}")));
            }
            writeln!(out).map_err(|e| fail(format!("cannot write to stdout: {e}")))?;
            tracing::info!(
                prompt_tokens = res.prompt_tokens,
                generated_tokens = res.token_ids.len(),
                prefill_ms = format!("{:.1}", res.prefill_ms),
                decode_tokens_per_s = format!("{:.1}", res.decode_tokens_per_s),
                finish_reason = %res.finish_reason,
                device = %llm.device(),
                "done"
            );
        }
        Cmd::Logits { model, ids, out, device, dtype } => {
            let ids = parse_ids(&ids)?;
            if ids.is_empty() {
                return Err(fail("--ids: no token ids given"));
            }
            let logits =
                prompt_logits(&model_path(model)?, &LoadOptions { dtype: dtype.into(), device: device.into() }, &ids)?;
            let bytes: Vec<u8> = logits.to_f32_vec().iter().flat_map(|v| v.to_le_bytes()).collect();
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, logits.shape().to_vec(), &bytes)?;
            safetensors::serialize_to_file([("logits", view)], None, &out)
                .map_err(|e| fail(format!("cannot write `{}`: {e}", out.display())))?;
            tracing::info!(shape = ?logits.shape(), out = %out.display(), "logits written");
        }
        Cmd::Dump { model, format, out, full_logits, dtype, stage, dump_after } => {
            let stages = stages(trace(&model_path(model)?, dtype.into(), !full_logits)?)?;
            if let [which, dir] = dump_after.as_slice() {
                dump_stages(&stages, which, Path::new(dir))?;
            }
            let g = match stages.iter().find(|(n, _)| *n == stage) {
                Some((_, g)) => g,
                None => {
                    let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(fail(format!("--stage: no stage `{stage}`; stages: {}", names.join(", "))));
                }
            };
            let text = match format {
                Format::Text => kiln_graph::text::print(g),
                Format::Dot => kiln_viz::dot::to_dot(g, &Default::default()),
                Format::Json => serde_json::to_string_pretty(&kiln_viz::json::to_json(g))?,
                Format::Svg => kiln_viz::svg::to_svg(&kiln_viz::dot::to_dot(g, &Default::default()))?,
            };
            write_file(&out, text.as_bytes())?;
            tracing::info!(nodes = g.node_count(), out = %out.display(), "IR written");
        }
        Cmd::Viz { model, ir, dtype } => {
            let traced = match (model, ir) {
                (None, Some(f)) => {
                    let text =
                        std::fs::read_to_string(&f).map_err(|e| fail(format!("cannot read `{}`: {e}", f.display())))?;
                    kiln_graph::text::parse(&text).map_err(|e| fail(format!("{}:{e}", f.display())))?
                }
                (model, _) => trace(&model_path(model)?, dtype.into(), true)?,
            };
            view(stages(traced)?)?;
        }
        Cmd::Convert { from, to } => {
            kiln_models::convert::convert_gguf_to_hf(&from, &to)?;
            tracing::info!(from = %from.display(), to = %to.display(), "converted");
        }
        Cmd::Bench(args) => kiln::bench::run_cli(&args)?,
        Cmd::Build {
            model,
            preset,
            seed,
            out,
            dtype,
            max_batch,
            max_context,
            no_cuda_graphs,
            no_fusion,
            gpu,
            dump_after,
        } => {
            if let [which, _] = dump_after.as_slice() {
                kiln::dump::check_pass(which, !no_fusion).map_err(CliError)?;
            }
            let source = match preset {
                Some(name) => ModelSource::Preset { name, seed },
                None => {
                    let path = model_path(model)?;
                    let abs = std::fs::canonicalize(&path)
                        .map_err(|e| fail(format!("cannot read `{}`: {e}", path.display())))?;
                    ModelSource::Path(abs.to_string_lossy().into_owned())
                }
            };
            let opts = kiln_models::plan::BuildOptions {
                dtype: dtype.into(),
                max_batch,
                max_context,
                cuda_graphs: !no_cuda_graphs,
                fusion: !no_fusion,
                device: gpu,
                keep_stages: !dump_after.is_empty(),
            };
            let t = std::time::Instant::now();
            let mut built = kiln_models::plan::build(&source, &opts)?;
            if let [which, dir] = dump_after.as_slice() {
                dump_stages(&built.stages, which, Path::new(dir))?;
            }
            built.plan.build.date = kiln::bench::utc_now();
            let plan = &built.plan;
            let bytes = plan.save(&out)?;
            let b = &plan.build;
            let o = &plan.options;
            println!("plan      {} ({}, key {})", out.display(), mib(bytes), plan.key);
            println!("model     {}", plan.model.source);
            println!(
                "options   {}, max batch {}, max context {}, CUDA graphs {}, pipeline {}",
                o.dtype,
                o.max_batch,
                o.max_context,
                if o.cuda_graphs { "on" } else { "off" },
                o.pipeline
            );
            println!("target    {} ({})", plan.target, plan.target.device);
            println!(
                "graph     {} nodes, {} launches per forward pass (with sampling)",
                built.engine.graph().node_count(),
                plan.launches.len()
            );
            println!(
                "kernels   {} ({} of binaries): {} compiled, {} from the disk cache, in {:.2} s",
                plan.kernels.len(),
                mib(plan.kernel_bytes()),
                b.compiled,
                b.cached,
                b.compile_seconds
            );
            println!(
                "time      trace {:.2} s, passes {:.2} s, weights {:.2} s, total {:.2} s",
                b.trace_seconds,
                b.passes_seconds,
                built.weights_seconds,
                t.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

#[cfg(feature = "viewer")]
fn view(stages: Vec<(String, Graph)>) -> Result<(), CliError> {
    Ok(kiln_viz::viewer::run(stages, "kiln")?)
}

#[cfg(not(feature = "viewer"))]
fn view(_: Vec<(String, Graph)>) -> Result<(), CliError> {
    Err(fail("this kiln was built without the `viewer` feature; rebuild with `--features viewer`"))
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
