//! The Llama model in the DSL: config parsing and its errors, the traced graph's
//! contract, logits against an independent plain-Rust forward, and KV-cache decoding
//! against a full forward.

mod support;

use kiln_models::config::{LlamaConfig, ModelType, RopeScaling};
use kiln_models::layers::Parallel;
use kiln_models::llama::{LlamaForCausalLM, TraceOptions};
use kiln_models::ModelError;
use kiln_ops::DType;
use std::collections::HashMap;
use support::{hf_tensors, llama_json, max_abs_diff, temp_dir, write_checkpoint, Loaded};

fn config(json: &str) -> LlamaConfig {
    LlamaConfig::from_json_str(json).unwrap()
}

fn config_err(json: &str) -> String {
    LlamaConfig::from_json_str(json).unwrap_err().to_string()
}

// ---- config ------------------------------------------------------------------------

#[test]
fn config_reads_llama_with_defaults() {
    let c = config(&llama_json(2, 16, 4, 2, r#""bos_token_id": 1, "eos_token_id": [2, 7]"#));
    assert_eq!(c.model_type, ModelType::Llama);
    assert_eq!((c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim), (16, 4, 2, 4));
    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(1), vec![2, 7]));
    assert_eq!(c.rope_scaling, RopeScaling::Default);
    assert_eq!(c.torch_dtype, Some(DType::F32));
    assert!(!c.qkv_bias && !c.o_proj_bias && !c.mlp_bias && !c.tie_word_embeddings);

    let c = config(&llama_json(1, 16, 4, 4, r#""head_dim": 6, "eos_token_id": 3, "attention_bias": true"#));
    assert_eq!((c.head_dim, c.eos_token_ids.clone()), (6, vec![3]));
    assert!(c.qkv_bias && c.o_proj_bias);

    // Missing optional fields take transformers' defaults.
    let c = config(
        r#"{"model_type": "llama", "vocab_size": 5, "hidden_size": 8, "intermediate_size": 4,
            "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": null, "head_dim": null}"#,
    );
    assert_eq!((c.num_key_value_heads, c.head_dim, c.rms_norm_eps, c.rope_theta), (2, 4, 1e-6, 10000.0));
    assert_eq!((c.max_position_embeddings, c.bos_token_id, c.torch_dtype), (2048, None, None));
}

#[test]
fn config_reads_qwen2_and_rope_scalings() {
    let json = llama_json(1, 16, 4, 2, r#""use_sliding_window": false"#).replace("\"llama\"", "\"qwen2\"");
    let c = config(&json);
    assert_eq!(c.model_type, ModelType::Qwen2);
    assert!(c.qkv_bias && !c.o_proj_bias && !c.mlp_bias);

    let c = config(&llama_json(1, 16, 4, 2, r#""rope_scaling": {"type": "linear", "factor": 2.0}"#));
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    let c = config(&llama_json(
        1,
        16,
        4,
        2,
        r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
    ));
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    assert_eq!(c.rope_scaling, llama3);
    // transformers 5 writes `rope_parameters` with the theta inside.
    let c = config(&llama_json(1, 16, 4, 2, r#""rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}"#));
    assert_eq!((c.rope_scaling, c.rope_theta), (RopeScaling::Default, 500000.0));
}

#[test]
fn rope_frequencies_follow_transformers() {
    // _compute_default_rope_parameters: 1 / 10000^(2j/8).
    let f = RopeScaling::Default.inv_freq(10000.0, 8);
    assert_eq!(f, vec![1.0, 0.1, 0.01, 0.001]);
    let f = RopeScaling::Linear { factor: 4.0 }.inv_freq(10000.0, 8);
    assert_eq!(f, vec![0.25, 0.025, 0.0025, 0.00025]);
    // Llama 3.1's values (theta 500000, head_dim 128, factor 8, 1, 4, 8192): high
    // frequencies kept, low ones divided by 8, the band in between interpolated.
    let s = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let base = RopeScaling::Default.inv_freq(500000.0, 128);
    let f = s.inv_freq(500000.0, 128);
    let wavelen = |x: f32| 2.0 * std::f32::consts::PI / x;
    for (b, x) in base.iter().zip(&f) {
        if wavelen(*b) < 2048.0 {
            assert_eq!(x, b);
        } else if wavelen(*b) > 8192.0 {
            assert_eq!(*x, b / 8.0);
        } else {
            assert!(*x < *b && *x > b / 8.0, "{x} not between {b} and {}", b / 8.0);
        }
    }
    assert_eq!(f.iter().filter(|x| base.contains(x)).count(), 29);
}

#[test]
fn config_errors_say_what_is_wrong() {
    let mistral = llama_json(1, 16, 4, 2, "").replace("\"llama\"", "\"mistral\"");
    assert_eq!(config_err(&mistral), "unsupported model: model_type `mistral` in `<json>` (supported: llama, qwen2)");
    assert_eq!(
        config_err(&llama_json(1, 16, 4, 2, r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#)),
        "unsupported model: rope scaling `yarn` in `<json>` (supported: default, linear, llama3)"
    );
    assert_eq!(
        config_err(&llama_json(1, 24, 6, 4, "")),
        "bad config `<json>`: num_attention_heads (6) is not a multiple of num_key_value_heads (4)"
    );
    assert_eq!(
        config_err(&llama_json(1, 18, 4, 2, "")),
        "bad config `<json>`: hidden_size (18) is not a multiple of num_attention_heads (4); set `head_dim`"
    );
    assert_eq!(
        config_err(&llama_json(1, 16, 4, 2, r#""head_dim": 5"#)),
        "bad config `<json>`: head_dim (5) must be even for rotary embeddings"
    );
    assert_eq!(
        config_err(&llama_json(1, 16, 4, 2, r#""rope_scaling": {"type": "linear"}"#)),
        "bad config `<json>`: rope scaling `linear` needs `factor`"
    );
    assert_eq!(
        config_err(r#"{"model_type": "llama", "vocab_size": 5, "intermediate_size": 4}"#),
        "bad config `<json>`: missing `hidden_size`"
    );
    assert!(config_err("{").starts_with("bad config `<json>`: EOF while parsing"));
    assert_eq!(
        config_err(&llama_json(1, 16, 4, 2, r#""hidden_act": "gelu""#)),
        "unsupported model: hidden_act `gelu` in `<json>` (supported: silu)"
    );
    let sliding = llama_json(1, 16, 4, 2, r#""layer_types": ["full_attention", "sliding_attention"]"#);
    assert_eq!(
        config_err(&sliding),
        "unsupported model: layer type `sliding_attention` in `<json>` (supported: full_attention)"
    );
    let missing = temp_dir("config_missing").join("config.json");
    let err = LlamaConfig::from_file(&missing).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }));
    assert!(err.to_string().starts_with(&format!("cannot read `{}`: ", missing.display())), "{err}");
}

// ---- the traced graph --------------------------------------------------------------

fn types(g: &kiln_graph::Graph) -> (Vec<String>, Vec<String>, Vec<String>) {
    let ty = |n| g.node(n).outputs[0].to_string();
    let inputs = g.inputs().iter().map(|(k, &n)| format!("{k}: {}", ty(n))).collect();
    let params = g.params().iter().map(|(k, &n)| format!("{k}: {}", ty(n))).collect();
    let outputs = g.outputs().iter().map(|(k, &v)| format!("{k}: {}", g.value_type(v))).collect();
    (inputs, params, outputs)
}

#[test]
fn traced_graph_has_the_generation_contract() {
    let model = LlamaForCausalLM::new(config(&llama_json(2, 16, 4, 2, ""))).unwrap();
    let g = model.trace(&TraceOptions { dtype: DType::F32, last_token_only: false }).unwrap();
    let (inputs, params, outputs) = types(&g);
    assert_eq!(
        inputs,
        [
            "input_ids: i64[batch, seq]",
            "past.0.key: f32[batch, past, 2, 4]",
            "past.0.value: f32[batch, past, 2, 4]",
            "past.1.key: f32[batch, past, 2, 4]",
            "past.1.value: f32[batch, past, 2, 4]",
        ]
    );
    assert_eq!(
        outputs,
        [
            "logits: f32[batch, seq, 11]",
            "present.0.key: f32[batch, past + seq, 2, 4]",
            "present.0.value: f32[batch, past + seq, 2, 4]",
            "present.1.key: f32[batch, past + seq, 2, 4]",
            "present.1.value: f32[batch, past + seq, 2, 4]",
        ]
    );
    let mut expected = vec!["model.embed_tokens.weight: f32[11, 16]".to_string()];
    for i in 0..2 {
        expected.extend([
            format!("model.layers.{i}.input_layernorm.weight: f32[16]"),
            format!("model.layers.{i}.self_attn.qkv.weight: f32[32, 16]"),
            format!("model.layers.{i}.self_attn.o_proj.weight: f32[16, 16]"),
            format!("model.layers.{i}.post_attention_layernorm.weight: f32[16]"),
            format!("model.layers.{i}.mlp.gate_up.weight: f32[24, 16]"),
            format!("model.layers.{i}.mlp.down_proj.weight: f32[16, 12]"),
        ]);
    }
    expected.extend(["model.norm.weight: f32[16]".to_string(), "lm_head.weight: f32[11, 16]".to_string()]);
    assert_eq!(params, expected);
    let plan = model.parallel_plan();
    assert_eq!(plan.len(), 9);
    assert_eq!(
        plan[..2],
        [
            ("model.layers.0.self_attn.qkv.weight".into(), Parallel::Column),
            ("model.layers.0.self_attn.o_proj.weight".into(), Parallel::Row)
        ]
    );
    assert_eq!(
        plan[7..],
        [("model.layers.1.mlp.down_proj.weight".into(), Parallel::Row), ("lm_head.weight".into(), Parallel::Column)]
    );
    assert!(plan.iter().all(|(name, _)| g.params().contains_key(name)));

    // bf16, tied embeddings, biases, head_dim != hidden / heads, last token only.
    let json = llama_json(1, 16, 4, 2, r#""head_dim": 6, "tie_word_embeddings": true, "attention_bias": true"#);
    let model = LlamaForCausalLM::new(config(&json)).unwrap();
    let g = model.trace(&TraceOptions { dtype: DType::BF16, last_token_only: true }).unwrap();
    let (inputs, params, outputs) = types(&g);
    assert_eq!(inputs[1], "past.0.key: bf16[batch, past, 2, 6]");
    assert_eq!(outputs[..2], ["logits: f32[batch, 1, 11]", "present.0.key: bf16[batch, past + seq, 2, 6]"]);
    assert_eq!(
        params,
        [
            "model.embed_tokens.weight: bf16[11, 16]",
            "model.layers.0.input_layernorm.weight: bf16[16]",
            "model.layers.0.self_attn.qkv.weight: bf16[48, 16]",
            "model.layers.0.self_attn.qkv.bias: bf16[48]",
            "model.layers.0.self_attn.o_proj.weight: bf16[16, 24]",
            "model.layers.0.self_attn.o_proj.bias: bf16[16]",
            "model.layers.0.post_attention_layernorm.weight: bf16[16]",
            "model.layers.0.mlp.gate_up.weight: bf16[24, 16]",
            "model.layers.0.mlp.down_proj.weight: bf16[16, 12]",
            "model.norm.weight: bf16[16]",
        ]
    );
}

// ---- numerics ----------------------------------------------------------------------

fn rms_norm(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, &w)| v * r * w as f64).collect()
}

/// `x · Wᵀ` with `w [out, in]` row-major.
fn matvec(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks(x.len()).map(|row| row.iter().zip(x).map(|(&a, b)| a as f64 * b).sum()).collect()
}

fn rope(x: &[f64], pos: usize, theta: f64) -> Vec<f64> {
    let d = x.len();
    let mut out = vec![0.0; d];
    for j in 0..d / 2 {
        let angle = pos as f64 / theta.powf(2.0 * j as f64 / d as f64);
        let (c, s) = (angle.cos(), angle.sin());
        out[j] = x[j] * c - x[j + d / 2] * s;
        out[j + d / 2] = x[j + d / 2] * c + x[j] * s;
    }
    out
}

/// A one-layer, one-head Llama written out with loops, in f64.
fn reference_logits(cfg: &LlamaConfig, w: &HashMap<String, Vec<f32>>, ids: &[i64]) -> Vec<f64> {
    let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
    let l = "model.layers.0";
    let mut xs: Vec<Vec<f64>> = ids
        .iter()
        .map(|&t| w["model.embed_tokens.weight"][t as usize * h..][..h].iter().map(|&v| v as f64).collect())
        .collect();
    let (mut keys, mut values, mut attn_out) = (vec![], vec![], vec![]);
    for (p, x) in xs.iter().enumerate() {
        let n = rms_norm(x, &w[&format!("{l}.input_layernorm.weight")], eps);
        let q = rope(&matvec(&w[&format!("{l}.self_attn.q_proj.weight")], &n), p, cfg.rope_theta);
        keys.push(rope(&matvec(&w[&format!("{l}.self_attn.k_proj.weight")], &n), p, cfg.rope_theta));
        values.push(matvec(&w[&format!("{l}.self_attn.v_proj.weight")], &n));
        let scores: Vec<f64> =
            keys.iter().map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (q.len() as f64).sqrt()).collect();
        let m = scores.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = e.iter().sum();
        let mut o = vec![0.0; q.len()];
        for (a, v) in e.iter().zip(&values) {
            o.iter_mut().zip(v).for_each(|(o, v)| *o += a / z * v);
        }
        attn_out.push(matvec(&w[&format!("{l}.self_attn.o_proj.weight")], &o));
    }
    let mut logits = vec![];
    for (x, a) in xs.iter_mut().zip(attn_out) {
        x.iter_mut().zip(a).for_each(|(x, a)| *x += a);
        let n = rms_norm(x, &w[&format!("{l}.post_attention_layernorm.weight")], eps);
        let gate = matvec(&w[&format!("{l}.mlp.gate_proj.weight")], &n);
        let up = matvec(&w[&format!("{l}.mlp.up_proj.weight")], &n);
        let act: Vec<f64> = gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        let down = matvec(&w[&format!("{l}.mlp.down_proj.weight")], &act);
        x.iter_mut().zip(down).for_each(|(x, d)| *x += d);
        logits.extend(matvec(&w["lm_head.weight"], &rms_norm(x, &w["model.norm.weight"], eps)));
    }
    logits
}

#[test]
fn logits_match_a_plain_rust_forward() {
    let dir = temp_dir("reference_forward");
    let json = llama_json(1, 8, 1, 1, "");
    let cfg = config(&json);
    let tensors = hf_tensors(&cfg, 7);
    write_checkpoint(&dir, &json, &tensors);
    let w: HashMap<String, Vec<f32>> = tensors.into_iter().map(|t| (t.name, t.values)).collect();
    let m = Loaded::new(&dir, DType::F32);
    let ids = [3i64, 0, 10, 4, 4, 7];
    let (logits, cache) = m.step(&[ids.to_vec()], m.empty_cache(1), false);
    assert_eq!(logits.shape(), [1, 6, 11]);
    assert_eq!(cache[0].shape(), [1, 6, 1, 8]);
    let expected: Vec<f32> = reference_logits(&cfg, &w, &ids).into_iter().map(|x| x as f32).collect();
    let scale = expected.iter().fold(0f32, |a, x| a.max(x.abs()));
    let diff = max_abs_diff(&logits.to_f32_vec(), &expected);
    assert!(diff <= 1e-5 * scale.max(1.0), "max |Δ| = {diff} (max |logit| {scale})");
}

#[test]
fn bf16_runs_close_to_f32() {
    let dir = temp_dir("bf16");
    let json = llama_json(2, 16, 4, 2, "");
    write_checkpoint(&dir, &json, &hf_tensors(&config(&json), 9));
    let ids = vec![vec![2i64, 7, 1, 9, 4]];
    let f32_run = Loaded::new(&dir, DType::F32);
    let bf16_run = Loaded::new(&dir, DType::BF16);
    let (want, _) = f32_run.step(&ids, f32_run.empty_cache(1), false);
    let (got, cache) = bf16_run.step(&ids, bf16_run.empty_cache(1), false);
    assert_eq!((got.dtype(), cache[0].dtype()), (DType::F32, DType::BF16));
    let want = want.to_f32_vec();
    let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
    let diff = max_abs_diff(&got.to_f32_vec(), &want);
    assert!(diff > 0.0 && diff <= 0.05 * scale, "max |Δ| = {diff} (max |logit| {scale})");
}

#[test]
fn decoding_with_the_kv_cache_matches_a_full_forward() {
    let dir = temp_dir("kv_cache");
    // qwen2 (q/k/v biases), GQA, two layers, a batch of two.
    let json = llama_json(2, 16, 4, 2, "").replace("\"llama\"", "\"qwen2\"");
    write_checkpoint(&dir, &json, &hf_tensors(&config(&json), 3));
    let m = Loaded::new(&dir, DType::F32);
    let rows = vec![vec![1i64, 5, 9, 2, 8, 3], vec![4, 4, 0, 10, 6, 1]];
    let (full, _) = m.step(&rows, m.empty_cache(2), false);
    let full = full.to_f32_vec();
    let vocab = 11;
    let at = |b: usize, p: usize| &full[(b * 6 + p) * vocab..][..vocab];
    let scale = full.iter().fold(0f32, |a, x| a.max(x.abs()));
    let tol = 1e-5 * scale.max(1.0);

    // Prefill two tokens, then one token at a time.
    let prefix: Vec<Vec<i64>> = rows.iter().map(|r| r[..2].to_vec()).collect();
    let (logits, mut cache) = m.step(&prefix, m.empty_cache(2), false);
    let l = logits.to_f32_vec();
    for b in 0..2 {
        for p in 0..2 {
            assert!(max_abs_diff(&l[(b * 2 + p) * vocab..][..vocab], at(b, p)) <= tol);
        }
    }
    for p in 2..6 {
        let step: Vec<Vec<i64>> = rows.iter().map(|r| vec![r[p]]).collect();
        let (logits, next) = m.step(&step, cache, true);
        assert_eq!(logits.shape(), [2, 1, vocab]);
        assert_eq!(next[0].shape(), [2, p + 1, 2, 4]);
        let l = logits.to_f32_vec();
        for b in 0..2 {
            let d = max_abs_diff(&l[b * vocab..][..vocab], at(b, p));
            assert!(d <= tol, "row {b} position {p}: max |Δ| = {d}");
        }
        cache = next;
    }
    // The last-token graph on the whole prompt gives the last row of the full logits.
    let (last, _) = m.step(&rows, m.empty_cache(2), true);
    assert!(max_abs_diff(&last.to_f32_vec()[..vocab], at(0, 5)) <= tol);
}
