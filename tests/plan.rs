//! Executable plans (`kiln build`): the file format round-trips, the key covers what it
//! must, damaged and stale files give errors that say what is wrong, the graph text
//! parses back, the model identity notices a changed checkpoint. On a GPU: a plan of a
//! preset loads with every kernel prebuilt (none compiled) and decodes exactly like an
//! engine built the normal way. The GPU test skips without a GPU.

use kiln::graph::Graph;
use kiln::models::config::LlamaConfig;
use kiln::models::llama::{LlamaForCausalLM, TraceOptions};
use kiln::ops::DType;
use kiln::runtime::plan::{
    launch_list, BuildInfo, ExecutablePlan, KernelBinary, ModelIdentity, ModelSource, PlanError, PlanOptions, Target,
    KILN_VERSION,
};
use std::path::{Path, PathBuf};

const CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
  "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}"#;

fn tiny_graph(dtype: DType) -> Graph {
    let model = LlamaForCausalLM::new(LlamaConfig::from_json_str(CONFIG).unwrap()).unwrap();
    let g = model.trace(&TraceOptions { dtype, last_token_only: true }).unwrap();
    kiln::passes::default_pipeline().run(g).unwrap().graph
}

/// A plan as `ExecutablePlan::build` makes one, with made-up kernel binaries (no GPU).
fn plan() -> ExecutablePlan {
    // As `ExecutablePlan::build` does: the launch list of the graph parsed from its text,
    // so `node` is the `%N` of the text.
    let text = kiln::graph::text::print(&tiny_graph(DType::BF16));
    let g = kiln::graph::text::parse(&text).unwrap();
    let mut p = ExecutablePlan {
        kiln_version: KILN_VERSION.to_string(),
        key: String::new(),
        model: ModelIdentity {
            source: ModelSource::Preset { name: "tiny".into(), seed: 7 },
            parts: vec![("config".into(), "0123".into())],
        },
        options: PlanOptions {
            dtype: "bf16".into(),
            max_batch: 2,
            max_context: 64,
            cuda_graphs: true,
            pipeline: "default".into(),
        },
        target: Target { arch: "sm_90".into(), nvrtc: (13, 0), device: "NVIDIA H200".into() },
        graph: text,
        launches: launch_list(&g),
        kernels: (0..5u8)
            .map(|i| KernelBinary { key: format!("k{i}"), cubin: (0..1000u32).map(|j| (j as u8) ^ i).collect() })
            .collect(),
        build: BuildInfo { date: "2026-12-03T00:00:00Z".into(), compiled: 5, ..Default::default() },
    };
    p.key = p.compute_key();
    p
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-plan-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err(bytes: &[u8]) -> String {
    ExecutablePlan::from_bytes(bytes, Path::new("x.plan")).unwrap_err().to_string()
}

#[test]
fn a_plan_round_trips_through_bytes_and_a_file() {
    let p = plan();
    let bytes = p.to_bytes();
    assert_eq!(&bytes[..8], b"KILNPLAN");
    assert_eq!(ExecutablePlan::from_bytes(&bytes, Path::new("x.plan")).unwrap(), p);

    let dir = tmp_dir("roundtrip");
    let path = dir.join("tiny.plan");
    let n = p.save(&path).unwrap();
    assert_eq!(n, bytes.len());
    assert_eq!(ExecutablePlan::open(&path).unwrap(), p);
    // Saving again replaces the file; no temp file is left behind.
    p.save(&path).unwrap();
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["tiny.plan"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_graph_text_parses_back_to_the_same_graph() {
    let p = plan();
    let g = kiln::graph::text::parse(&p.graph).unwrap();
    assert_eq!(kiln::graph::text::print(&g), p.graph);
    let orig = tiny_graph(DType::BF16);
    assert_eq!(g.node_count(), orig.node_count());
    assert_eq!(g.params().keys().collect::<Vec<_>>(), orig.params().keys().collect::<Vec<_>>());
    // The launch list of the parsed graph is the plan's; its nodes are the text's `%N`.
    assert_eq!(launch_list(&g), p.launches);
    for l in p.launches.iter().filter(|l| l.op != "greedy" && l.op != "step_end") {
        let line = p.graph.lines().find(|x| x.starts_with(&format!("%{} = ", l.node))).unwrap();
        assert!(line.contains(&l.op), "launch {l:?} vs `{line}`");
    }
}

#[test]
fn the_launch_list_names_kernels_and_bindings() {
    let p = plan();
    let l = &p.launches;
    assert!(l.len() > 10, "{} launches", l.len());
    let last: Vec<&str> = l[l.len() - 2..].iter().map(|x| x.op.as_str()).collect();
    assert_eq!(last, ["greedy", "step_end"]);
    assert!(l.iter().all(|x| !x.kernel.starts_with("unsupported")), "{l:#?}");
    assert!(l.iter().any(|x| x.kernel.starts_with("cuBLAS GEMM")));
    assert!(l.iter().any(|x| x.inputs.iter().any(|b| b.starts_with("param \"model.embed_tokens.weight\""))));
    // The cache appends write the resident caches; attention reads them.
    let appends: Vec<_> = l.iter().filter(|x| x.outputs.iter().any(|b| b.starts_with("cache \"present."))).collect();
    assert_eq!(appends.len(), 4, "2 layers × (k, v)");
    assert!(l.iter().any(|x| x.op == "attention" && x.inputs.iter().any(|b| b.starts_with("cache \"present."))));
    // Each layer's RoPE of q and its k / v appends run as one horizontal kernel (the
    // engine's grouping rule, `horizontal_runs`).
    let parts: Vec<&str> =
        l.iter().filter(|x| x.kernel.starts_with("kiln_hfused_")).map(|x| x.kernel.as_str()).collect();
    assert_eq!(parts.len(), 2 * 3, "{parts:#?}");
    assert_eq!(parts.iter().filter(|k| k.contains("(part 0 of 3, one launch: ")).count(), 2, "{parts:#?}");
    assert!(parts.iter().all(|k| k.contains("kiln_fused")), "{parts:#?}");
    // Decode attention computes those three itself (`attention_producers`, the engine's
    // rule): its entry names the fused kernel and the producers' nodes, and each
    // producer says which attention computes it.
    let attn: Vec<_> = l.iter().filter(|x| x.op == "attention").collect();
    assert_eq!(attn.len(), 2, "{attn:#?}");
    for a in &attn {
        assert!(a.kernel.starts_with("kiln_attn_decode_fused_bf16_"), "{}", a.kernel);
        assert!(a.kernel.contains("computes q and the new K/V rows itself"), "{}", a.kernel);
        let skipped: Vec<_> =
            parts.iter().filter(|k| k.contains(&format!("where attention %{} computes it", a.node))).collect();
        assert_eq!(skipped.len(), 3, "{parts:#?}");
    }
    // Symbolic sizes stay symbolic (resolved at run time).
    assert!(l.iter().any(|x| x.outputs.iter().any(|b| b.contains("seq"))));
}

#[test]
fn the_key_covers_model_options_version_target_and_graph() {
    let p = plan();
    let k = p.compute_key();
    assert_eq!(k, p.key);
    assert_eq!(k.len(), 32);
    let mut changes: Vec<(&str, ExecutablePlan)> = Vec::new();
    let mut q = p.clone();
    q.model.parts[0].1 = "4567".into();
    changes.push(("config", q));
    let mut q = p.clone();
    q.model.source = ModelSource::Preset { name: "tiny".into(), seed: 8 };
    changes.push(("seed", q));
    let mut q = p.clone();
    q.options.max_context = 128;
    changes.push(("max_context", q));
    let mut q = p.clone();
    q.options.dtype = "f16".into();
    changes.push(("dtype", q));
    let mut q = p.clone();
    q.kiln_version = "9.9.9".into();
    changes.push(("kiln version", q));
    let mut q = p.clone();
    q.target.arch = "sm_80".into();
    changes.push(("arch", q));
    let mut q = p.clone();
    q.graph = kiln::graph::text::print(&tiny_graph(DType::F32));
    changes.push(("graph", q));
    for (what, q) in &changes {
        assert_ne!(q.compute_key(), k, "{what} must change the key");
    }
    // Build information is not part of the key.
    let mut q = p.clone();
    q.build.compile_seconds = 12.5;
    assert_eq!(q.compute_key(), k);
}

#[test]
fn damaged_files_give_errors_that_say_what_is_wrong() {
    let bytes = plan().to_bytes();
    let e = err(b"hello, world");
    assert!(e.contains("`x.plan`") && e.contains("not a kiln plan"), "{e}");
    let e = err(&bytes[..30]);
    assert!(e.contains("truncated") && e.contains("header"), "{e}");
    let e = err(&bytes[..bytes.len() - 100]);
    assert!(e.contains("truncated") && e.contains("payload"), "{e}");
    let mut b = bytes.clone();
    b.push(0);
    assert!(err(&b).contains("trailing data"), "{}", err(&b));
    let mut b = bytes.clone();
    b[8] = 99;
    let e = err(&b);
    assert!(e.contains("format version 99") && e.contains("kiln build"), "{e}");
    let mut b = bytes.clone();
    let mid = b.len() - 1500;
    b[mid] ^= 0x40;
    let e = err(&b);
    assert!(e.contains("corrupt") && e.contains("checksum"), "{e}");
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(err(&b).contains("not a kiln plan"));
    // Every error is a `Result`, never a panic: every truncation of the file.
    for n in (0..bytes.len()).step_by(97) {
        assert!(ExecutablePlan::from_bytes(&bytes[..n], Path::new("x.plan")).is_err(), "{n} bytes");
    }
    let e = ExecutablePlan::open(Path::new("/nonexistent/dir/x.plan")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/dir/x.plan"), "{e}");
}

#[test]
fn a_plan_of_another_kiln_version_or_with_a_forged_key_is_refused() {
    let mut p = plan();
    p.kiln_version = "0.0.0-old".into();
    p.key = p.compute_key();
    let e = ExecutablePlan::from_bytes(&p.to_bytes(), Path::new("x.plan")).unwrap_err();
    assert!(matches!(e, PlanError::Stale { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("built by kiln 0.0.0-old") && e.contains(KILN_VERSION) && e.contains("kiln build"), "{e}");

    let mut p = plan();
    p.options.max_batch = 64; // the key was computed for 2
    let e = ExecutablePlan::from_bytes(&p.to_bytes(), Path::new("x.plan")).unwrap_err().to_string();
    assert!(e.contains("key") && e.contains("does not match"), "{e}");
}

#[test]
fn check_model_names_the_parts_that_changed() {
    let p = plan();
    let path = Path::new("x.plan");
    p.check_model(&p.model.clone(), path).unwrap();
    let mut now = p.model.clone();
    now.parts[0].1 = "changed".into();
    let e = p.check_model(&now, path).unwrap_err().to_string();
    assert!(e.contains("stale") && e.contains("config differ"), "{e}");
    let now =
        ModelIdentity { source: ModelSource::Preset { name: "tiny".into(), seed: 1 }, parts: p.model.parts.clone() };
    let e = p.check_model(&now, path).unwrap_err().to_string();
    assert!(e.contains("seed 7") && e.contains("seed 1"), "{e}");
}

/// Writes a checkpoint-shaped directory: `config.json` and one safetensors file.
fn write_checkpoint(dir: &Path, config: &str, rows: usize) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    let data = vec![0u8; rows * 4 * 4];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, 4], &data).unwrap();
    safetensors::serialize_to_file([("model.norm.weight", view)], None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn the_identity_of_a_checkpoint_notices_config_and_weight_changes() {
    use kiln::models::plan::identity;
    let dir = tmp_dir("identity");
    write_checkpoint(&dir, CONFIG, 8);
    let source = ModelSource::Path(dir.display().to_string());
    let id = identity(&source).unwrap();
    assert_eq!(id, identity(&source).unwrap(), "deterministic");
    let names: Vec<&str> = id.parts.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["config.json", "safetensors headers"]);
    let p = ExecutablePlan { model: id.clone(), ..plan() };
    let at = Path::new("m.plan");

    write_checkpoint(&dir, &CONFIG.replace("\"rms_norm_eps\": 1e-5", "\"rms_norm_eps\": 1e-6"), 8);
    let e = p.check_model(&identity(&source).unwrap(), at).unwrap_err().to_string();
    assert!(e.contains("config.json differ") && !e.contains("safetensors"), "{e}");

    write_checkpoint(&dir, CONFIG, 9);
    let e = p.check_model(&identity(&source).unwrap(), at).unwrap_err().to_string();
    assert!(e.contains("safetensors headers differ") && !e.contains("config.json"), "{e}");

    write_checkpoint(&dir, CONFIG, 8);
    p.check_model(&identity(&source).unwrap(), at).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    // Presets: the config text is fingerprinted, the seed is part of the source.
    let a = identity(&ModelSource::Preset { name: "smollm2-135m".into(), seed: 0 }).unwrap();
    let b = identity(&ModelSource::Preset { name: "llama-3.2-1b".into(), seed: 0 }).unwrap();
    assert_ne!(a.parts, b.parts);
    assert!(identity(&ModelSource::Preset { name: "gpt-5".into(), seed: 0 }).is_err());
}

#[test]
fn random_weights_of_the_optimized_graph_equal_those_of_the_model() {
    let model = LlamaForCausalLM::new(LlamaConfig::from_json_str(CONFIG).unwrap()).unwrap();
    let want = kiln::models::presets::random_weights(&model, DType::BF16, 3).unwrap();
    let got = kiln::models::presets::random_weights_for(&tiny_graph(DType::BF16), 3).unwrap();
    assert_eq!(got, want);
}

// ---- on a GPU ---------------------------------------------------------------------

fn gpu() -> bool {
    match kiln::runtime::cuda::available() {
        Ok(info) => {
            println!("device: {info}");
            true
        }
        Err(why) => {
            println!("skipping: no usable CUDA GPU ({why})");
            false
        }
    }
}

#[test]
fn building_without_a_gpu_is_a_clear_error() {
    if kiln::runtime::cuda::available().is_ok() {
        println!("skipping: a GPU is present");
        return;
    }
    let source = ModelSource::Preset { name: "smollm2-135m".into(), seed: 0 };
    let e = kiln::models::plan::build(&source, &Default::default()).err().unwrap().to_string();
    assert!(e.contains("needs a GPU"), "{e}");
}

/// Greedy tokens and the logits after the prefill and each decode step.
fn decode(e: &mut kiln::runtime::cuda::CudaEngine, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    e.prefill(&[prompt.to_vec()]).unwrap();
    let mut logits = vec![e.logits().unwrap()];
    for _ in 0..steps {
        e.decode_step().unwrap();
        logits.push(e.logits().unwrap());
    }
    (e.tokens().unwrap().remove(0), logits)
}

#[test]
fn a_loaded_plan_compiles_nothing_and_decodes_like_a_normal_engine() {
    use kiln::runtime::cuda::{CudaEngine, EngineOptions};
    if !gpu() {
        return;
    }
    let (name, seed, dtype, max_context) = ("smollm2-135m", 5, DType::BF16, 64);
    let source = ModelSource::Preset { name: name.into(), seed };
    let dir = tmp_dir("gpu");
    let path = dir.join("smollm2.plan");
    let opts = kiln::models::plan::BuildOptions { dtype, max_context: Some(max_context), ..Default::default() };
    let t = std::time::Instant::now();
    let built = kiln::models::plan::build(&source, &opts).unwrap();
    let bytes = built.plan.save(&path).unwrap();
    let b = &built.plan.build;
    println!(
        "kiln-info\tplan\tbuild_s={:.2}\tbytes={bytes}\tkernels={}\tcompiled={}\tcached={}\tlaunches={}",
        t.elapsed().as_secs_f64(),
        built.plan.kernels.len(),
        b.compiled,
        b.cached,
        built.plan.launches.len()
    );
    drop(built);

    let loaded = kiln::models::plan::load(&path, 0).unwrap();
    let (times, k) = (loaded.times, loaded.kernels);
    println!(
        "kiln-info\tplan_load\tread_ms={:.1}\tparse_ms={:.1}\tweights_ms={:.1}\tengine_ms={:.1}\tkernels_ms={:.1}\t\
         prebuilt={}\tcompiled={}\tcached={}",
        times.read * 1e3,
        times.parse * 1e3,
        times.weights * 1e3,
        times.engine * 1e3,
        times.kernels * 1e3,
        k.prebuilt,
        k.compiled,
        k.cached
    );
    assert_eq!(k.compiled, 0, "nothing compiled");
    assert_eq!(k.cached, 0, "nothing read from the disk cache");
    assert_eq!(k.prebuilt, loaded.plan.kernels.len(), "every kernel from the plan");
    let mut from_plan = loaded.engine;

    // The normal way: trace, passes, engine (kernels compiled or from the disk cache).
    let model = LlamaForCausalLM::new(kiln::models::presets::preset(name).unwrap()).unwrap();
    let graph = model.trace(&TraceOptions { dtype, last_token_only: true }).unwrap();
    let graph = kiln::passes::default_pipeline().run(graph).unwrap().graph;
    let weights = kiln::models::presets::random_weights(&model, dtype, seed).unwrap();
    let eopts = EngineOptions { max_batch: 1, max_context, ..Default::default() };
    let mut normal = CudaEngine::new(graph, weights, eopts).unwrap();

    let prompt: Vec<u32> = (0..9).map(|i| (i * 977 + 13) % 49152).collect();
    let (t_plan, l_plan) = decode(&mut from_plan, &prompt, 12);
    let (t_norm, l_norm) = decode(&mut normal, &prompt, 12);
    assert_eq!(t_plan, t_norm, "greedy tokens");
    assert_eq!(l_plan, l_norm, "logits, bit for bit");
    println!("kiln-check\tplan_vs_engine\t{} tokens\tlogits\tmax_rel=0\trel_l2=0", t_plan.len());

    // A model that changed since the build makes the plan stale at load.
    let mut p = ExecutablePlan::open(&path).unwrap();
    p.model.parts[0].1 = "an older config".into();
    p.key = p.compute_key();
    let e = kiln::models::plan::load_opened(p, 0.0, &path, 0).err().unwrap().to_string();
    assert!(e.contains("stale") && e.contains("config differ"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A checkpoint directory (config.json, model.safetensors, a byte-level tokenizer) of a
/// tiny random Llama with HF tensor names.
fn tiny_checkpoint(dir: &Path) {
    let (vocab, hidden, inter, layers, heads, kv_heads) = (260usize, 64usize, 128usize, 2, 4, 2);
    let head_dim = hidden / heads;
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
        "tie_word_embeddings": false, "bos_token_id": 256, "eos_token_id": 257
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let (q, kv) = (heads * head_dim, kv_heads * head_dim);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        t.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        t.push((format!("{p}.self_attn.q_proj.weight"), vec![q, hidden]));
        t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, hidden]));
        t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, hidden]));
        t.push((format!("{p}.self_attn.o_proj.weight"), vec![hidden, q]));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]));
    }
    t.push(("model.norm.weight".to_string(), vec![hidden]));
    t.push(("lm_head.weight".to_string(), vec![vocab, hidden]));
    let mut s = 0x9E3779B97F4A7C15u64;
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .into_iter()
        .map(|(name, shape)| {
            let norm = name.ends_with("norm.weight");
            let bytes = (0..shape.iter().product::<usize>())
                .flat_map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                    (if norm { 1.0 + 0.1 * u } else { 0.25 * u }).to_le_bytes()
                })
                .collect();
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, sh, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, sh.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let tok = kiln::models::tokenizer::tiny_byte_level_tokenizer_json(&["<s>", "</s>"]);
    std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
}

/// `LLM::load_plan` (what `kiln generate --plan` runs) on a checkpoint's plan generates
/// the same text and tokens as `LLM::load` on the checkpoint; a changed config.json
/// makes the plan stale.
#[test]
fn generating_from_a_checkpoint_plan_equals_generating_from_the_checkpoint() {
    use kiln::models::llm::{Device, LoadOptions, SamplingParams, LLM};
    if !gpu() {
        return;
    }
    let dir = tmp_dir("checkpoint");
    tiny_checkpoint(&dir);
    let source = ModelSource::Path(dir.display().to_string());
    let opts = kiln::models::plan::BuildOptions { dtype: DType::F32, ..Default::default() };
    let built = kiln::models::plan::build(&source, &opts).unwrap();
    assert_eq!(built.plan.options.max_context, 128, "the model's max_position_embeddings");
    let path = dir.join("tiny.plan");
    built.plan.save(&path).unwrap();
    drop(built);

    let params = SamplingParams::greedy(12);
    let from_plan = LLM::load_plan(&path).unwrap();
    let a = from_plan.generate(&["Hello"], &params).unwrap().remove(0);
    drop(from_plan);
    let normal = LLM::load(&dir, LoadOptions { dtype: DType::F32, device: Device::Cuda }).unwrap();
    let b = normal.generate(&["Hello"], &params).unwrap().remove(0);
    drop(normal);
    println!("kiln-info\tplan_generate\ttokens={:?}", a.token_ids);
    assert_eq!(a.token_ids, b.token_ids);
    assert_eq!(a.text, b.text);

    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["rms_norm_eps"] = serde_json::json!(1e-6);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = LLM::load_plan(&path).err().unwrap().to_string();
    assert!(e.contains("stale") && e.contains("config.json differ"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The CLI's plan commands fail cleanly: a file that is no plan, an unknown
/// `--dump-after` pass, `kiln build` without a GPU, options a plan fixes.
#[test]
fn cli_plan_errors_are_clean() {
    // `KILN_BIN`: where the CLI is when the test executable runs away from its build
    // tree (tools/gpu/run.sh on the GPU machine).
    let bin = std::env::var("KILN_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kiln").to_string());
    let kiln = |args: &[&str]| {
        let out = std::process::Command::new(&bin).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("panicked"), "{err}");
        (out.status.code(), err)
    };
    let dir = tmp_dir("cli");
    let junk = dir.join("junk.plan");
    std::fs::write(&junk, "not a plan at all").unwrap();
    let j = junk.to_str().unwrap();
    for args in [vec!["bench", "--plan", j], vec!["generate", "--plan", j, "--prompt", "hi"]] {
        let (code, err) = kiln(&args);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("error: plan `") && err.contains("not a kiln plan"), "{err}");
    }
    let (code, err) = kiln(&["bench", "--plan", j, "--dtype", "f32"]);
    assert_eq!(code, Some(2), "clap refuses options the plan fixes: {err}");
    let out = dir.join("x.plan");
    let o = out.to_str().unwrap();
    let (code, err) = kiln(&["build", "--preset", "smollm2-135m", "--out", o, "--dump-after", "nope", "/tmp"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no pass `nope`") && err.contains("fuse"), "{err}");
    if kiln::runtime::cuda::available().is_err() {
        let (code, err) = kiln(&["build", "--preset", "smollm2-135m", "--out", o]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("needs a GPU"), "{err}");
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
