//! The `kiln` binary on a tiny random Llama checkpoint written here: config.json,
//! model.safetensors (through the `safetensors` crate) and a byte-level tokenizer.json.

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VOCAB: usize = 260;
const HIDDEN: usize = 16;
const INTER: usize = 24;
const LAYERS: usize = 2;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = HIDDEN / HEADS;
const CONTEXT: usize = 32;

fn config_json() -> String {
    serde_json::json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": false, "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": "float32"
    })
    .to_string()
}

fn tensors() -> Vec<(String, Vec<usize>)> {
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        t.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        t.push((format!("{p}.self_attn.q_proj.weight"), vec![q, HIDDEN]));
        t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, HIDDEN]));
        t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, HIDDEN]));
        t.push((format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, q]));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![INTER, HIDDEN]));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![INTER, HIDDEN]));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, INTER]));
    }
    t.push(("model.norm.weight".to_string(), vec![HIDDEN]));
    t.push(("lm_head.weight".to_string(), vec![VOCAB, HIDDEN]));
    t
}

/// A fresh model directory named `name` with every file; callers then break one.
fn checkpoint(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-cli").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json()).unwrap();
    let mut state = 0x9E3779B97F4A7C15u64;
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            let bytes = (0..n)
                .flat_map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let r = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    let v = if norm { 1.0 + 0.2 * r } else { r };
                    v.to_le_bytes()
                })
                .collect();
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> =
        data.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let tok = kiln::models::tokenizer::tiny_byte_level_tokenizer_json(&["<s>", "</s>", "<|im_start|>", "<|im_end|>"]);
    std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
    let chatml = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let tc =
        serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true, "chat_template": chatml});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    dir
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a clean failure: exit code 1, `error: ` with `needle` on stderr, no panic.
fn assert_fails(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("error: "), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}

#[test]
fn logits_writes_n_ids_by_vocab() {
    let dir = checkpoint("logits");
    let out_file = dir.join("logits.safetensors");
    let out = kiln(&["logits", "--model", s(&dir), "--ids", "256,72,105", "--out", s(&out_file), "--device", "cpu"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&out_file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), Dtype::F32);
    assert_eq!(t.shape(), &[3, VOCAB]);
    let values: Vec<f32> = t.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(values.iter().all(|v| v.is_finite()));
    // Bad ids are clean errors.
    assert_fails(&kiln(&["logits", "--model", s(&dir), "--ids", "1,x", "--out", s(&out_file)]), "`x`");
    assert_fails(&kiln(&["logits", "--model", s(&dir), "--ids", "1,9999", "--out", s(&out_file)]), "9999");
}

#[test]
fn generate_with_a_seed_is_reproducible() {
    let dir = checkpoint("generate_seed");
    let args = [
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "Hello",
        "--max-tokens",
        "8",
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--device",
        "cpu",
    ];
    let a = kiln(&args);
    let b = kiln(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(!a.stdout.is_empty());
    assert_eq!(a.stdout, b.stdout);
    // Greedy and chat modes run too.
    let g = kiln(&["generate", "--model", s(&dir), "--prompt", "Hi", "--max-tokens", "4", "--chat"]);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
}

#[test]
fn missing_config_is_a_clean_error() {
    let dir = checkpoint("missing_config");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_fails(&kiln(&["generate", "--model", s(&dir), "--prompt", "a"]), "config.json");
    let nowhere = dir.join("does-not-exist");
    assert_fails(&kiln(&["generate", "--model", s(&nowhere), "--prompt", "a"]), "does-not-exist");
}

#[test]
fn malformed_config_is_a_clean_error() {
    let dir = checkpoint("malformed_config");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\", \"vocab_size\": ").unwrap();
    assert_fails(&kiln(&["generate", "--model", s(&dir), "--prompt", "a"]), "config.json");
    let out_file = dir.join("ir.txt");
    assert_fails(&kiln(&["dump", "--model", s(&dir), "--format", "text", "--out", s(&out_file)]), "config.json");
}

#[test]
fn missing_weights_are_a_clean_error() {
    let dir = checkpoint("missing_weights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_fails(&kiln(&["generate", "--model", s(&dir), "--prompt", "a"]), "model.safetensors");
    let out_file = dir.join("l.safetensors");
    assert_fails(&kiln(&["logits", "--model", s(&dir), "--ids", "1", "--out", s(&out_file)]), "model.safetensors");
}

#[test]
fn truncated_weights_are_a_clean_error() {
    let dir = checkpoint("truncated_weights");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&kiln(&["generate", "--model", s(&dir), "--prompt", "a"]), "model.safetensors");
    // A file cut inside its header.
    std::fs::write(&path, &bytes[..20]).unwrap();
    assert_fails(&kiln(&["generate", "--model", s(&dir), "--prompt", "a"]), "model.safetensors");
}

#[test]
fn missing_tokenizer_is_a_clean_error() {
    let dir = checkpoint("missing_tokenizer");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert_fails(&kiln(&["generate", "--model", s(&dir), "--prompt", "a"]), "tokenizer.json");
}

#[test]
fn too_long_prompt_is_a_clean_error() {
    let dir = checkpoint("too_long");
    let prompt = "x".repeat(CONTEXT);
    let out = kiln(&["generate", "--model", s(&dir), "--prompt", &prompt, "--max-tokens", "4"]);
    assert_fails(&out, "exceeds the context of 32 tokens");
}

#[test]
fn bad_options_are_clean_errors() {
    let dir = checkpoint("bad_options");
    if kiln::runtime::cuda::available().is_err() {
        let out = kiln(&["generate", "--model", s(&dir), "--prompt", "a", "--device", "cuda"]);
        assert_fails(&out, "no usable GPU");
    }
    let out = kiln(&["generate", "--model", s(&dir), "--prompt", "a", "--temperature", "-1"]);
    assert_fails(&out, "temperature");
    let out = kiln(&["generate", "--model", s(&dir), "--prompt", "a", "--top-p", "0"]);
    assert_fails(&out, "top_p");
}

#[test]
fn dump_writes_the_ir() {
    let dir = checkpoint("dump");
    let text = dir.join("model.kiln");
    let out = kiln(&["dump", "--model", s(&dir), "--format", "text", "--out", s(&text)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ir = std::fs::read_to_string(&text).unwrap();
    assert!(ir.contains("input_ids") && ir.contains("present.1.value"), "{ir}");
    let parsed = kiln::graph::text::parse(&ir).unwrap();
    assert_eq!(kiln::graph::text::print(&parsed), ir);
    let dot = dir.join("model.dot");
    let out = kiln(&["dump", "--model", s(&dir), "--format", "dot", "--out", s(&dot)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read_to_string(&dot).unwrap().starts_with("digraph"));
    let json = dir.join("model.json");
    let out = kiln(&["dump", "--model", s(&dir), "--format", "json", "--out", s(&json)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v.is_object());
    // SVG needs Graphviz: either it works or it says how to get it, without a panic.
    let svg = dir.join("model.svg");
    let out = kiln(&["dump", "--model", s(&dir), "--format", "svg", "--out", s(&svg)]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    assert!(out.status.code() == Some(0) || out.status.code() == Some(1));
}

#[test]
fn dump_after_writes_every_stage_and_stage_selects_one() {
    let dir = checkpoint("dump_after");
    let stages = dir.join("stages");
    let last = dir.join("dce.kiln");
    let out = kiln(&[
        "dump",
        "--model",
        s(&dir),
        "--format",
        "text",
        "--out",
        s(&last),
        "--stage",
        "dce",
        "--dump-after",
        "all",
        s(&stages),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut names: Vec<String> =
        std::fs::read_dir(&stages).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "00-traced.dot",
            "00-traced.kiln",
            "01-fold.dot",
            "01-fold.kiln",
            "02-simplify.dot",
            "02-simplify.kiln",
            "03-cse.dot",
            "03-cse.kiln",
            "04-dce.dot",
            "04-dce.kiln",
            "05-fuse.dot",
            "05-fuse.kiln",
            "06-fuse_matvec.dot",
            "06-fuse_matvec.kiln",
            "07-fuse_epilogue.dot",
            "07-fuse_epilogue.kiln"
        ]
    );
    // The selected stage is the last pass's graph, and it still parses and verifies.
    let ir = std::fs::read_to_string(&last).unwrap();
    assert_eq!(ir, std::fs::read_to_string(stages.join("04-dce.kiln")).unwrap());
    kiln::graph::text::parse(&ir).unwrap();
    let out = kiln(&["dump", "--model", s(&dir), "--out", s(&last), "--stage", "fusion"]);
    assert_fails(
        &out,
        "--stage: no stage `fusion`; stages: traced, fold, simplify, cse, dce, fuse, fuse_matvec, fuse_epilogue",
    );
    let out = kiln(&["dump", "--model", s(&dir), "--out", s(&last), "--dump-after", "nope", s(&stages)]);
    assert_fails(&out, "--dump-after: no pass `nope`");
}

#[test]
fn convert_of_a_missing_file_is_a_clean_error() {
    let dir = std::env::temp_dir().join("kiln-cli-convert");
    let out = kiln(&["convert", "--from", "/nonexistent/model.gguf", "--to", s(&dir)]);
    assert_fails(&out, "/nonexistent/model.gguf");
}
