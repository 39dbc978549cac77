//! Model presets (configs of real checkpoints) and deterministic random weights.

use indexmap::IndexMap;
use kiln_models::config::{LlamaConfig, RopeScaling};
use kiln_models::llama::{LlamaForCausalLM, TraceOptions};
use kiln_models::presets::{self, num_parameters, preset, random_weights, PRESETS};
use kiln_ops::{DType, HostTensor};
use kiln_runtime::cpu::CpuExecutor;

/// Parameter elements of the traced graph: params × shapes, no weights materialized.
fn count(name: &str) -> usize {
    let model = LlamaForCausalLM::new(preset(name).unwrap()).unwrap();
    let g = model.trace(&TraceOptions { dtype: DType::BF16, last_token_only: true }).unwrap();
    let by_hand: usize =
        g.params().values().map(|&n| g.node(n).outputs[0].shape.as_fixed().unwrap().iter().product::<usize>()).sum();
    assert_eq!(num_parameters(&g), by_hand);
    by_hand
}

#[test]
fn parameter_counts_match_the_published_models() {
    assert_eq!(count("llama-3.2-1b"), 1_235_814_400);
    assert_eq!(count("smollm2-135m"), 134_515_008);
    assert_eq!(count("llama-3-8b"), 8_030_261_248);
}

#[test]
fn presets_match_the_checkpoints_config_json() {
    let c = preset("llama-3.2-1b").unwrap();
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (2048, 16, 32, 8, 64)
    );
    assert_eq!((c.intermediate_size, c.vocab_size, c.max_position_embeddings), (8192, 128256, 131072));
    assert!(c.tie_word_embeddings);
    assert_eq!((c.rope_theta, c.rms_norm_eps), (500000.0, 1e-5));
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        }
    );
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone(), c.torch_dtype),
        (Some(128000), vec![128001], Some(DType::BF16))
    );

    let c = preset("llama-3-8b").unwrap();
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (4096, 32, 32, 8, 128)
    );
    assert_eq!((c.intermediate_size, c.vocab_size, c.max_position_embeddings), (14336, 128256, 8192));
    assert!(!c.tie_word_embeddings);
    assert_eq!((c.rope_theta, c.rope_scaling, c.rms_norm_eps), (500000.0, RopeScaling::Default, 1e-5));

    let c = preset("SmolLM2-135M").unwrap(); // case-insensitive
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (576, 30, 9, 3, 64)
    );
    assert_eq!((c.intermediate_size, c.vocab_size, c.max_position_embeddings), (1536, 49152, 8192));
    assert!(c.tie_word_embeddings);
    assert_eq!((c.rope_theta, c.rope_scaling, c.rms_norm_eps), (100000.0, RopeScaling::Default, 1e-5));
    assert!(!c.qkv_bias && !c.o_proj_bias && !c.mlp_bias);

    // Built through the same parser as a checkpoint's config.json.
    for name in PRESETS {
        assert_eq!(preset(name).unwrap(), LlamaConfig::from_json_str(presets::preset_json(name).unwrap()).unwrap());
    }
}

#[test]
fn unknown_preset_lists_the_presets() {
    let e = preset("llama-9000").unwrap_err().to_string();
    assert!(e.contains("llama-9000"), "{e}");
    for name in PRESETS {
        assert!(e.contains(name), "{e}");
    }
}

fn tiny(extra: &str) -> LlamaForCausalLM {
    let json = format!(
        r#"{{"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 64{extra}}}"#
    );
    LlamaForCausalLM::new(LlamaConfig::from_json_str(&json).unwrap()).unwrap()
}

fn bytes(w: &IndexMap<String, HostTensor>) -> Vec<Vec<u8>> {
    w.values().map(|t| t.to_f32_vec().iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()).collect()
}

fn std_of(v: &[f32]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
}

#[test]
fn random_weights_are_deterministic() {
    let model = tiny(r#", "attention_bias": true"#);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let a = random_weights(&model, dtype, 1).unwrap();
        let b = random_weights(&model, dtype, 1).unwrap();
        let c = random_weights(&model, dtype, 2).unwrap();
        assert_eq!(bytes(&a), bytes(&b), "{dtype}: same seed, same bytes");
        assert_eq!(a.keys().collect::<Vec<_>>(), c.keys().collect::<Vec<_>>());
        for (name, t) in &a {
            assert_eq!(t.dtype(), dtype, "{name}");
            let differs = t.to_f32_vec() != c[name].to_f32_vec();
            // Constant-initialized tensors (norms, biases) do not depend on the seed.
            assert_eq!(differs, t.rank() == 2, "{dtype} {name}: a different seed changes exactly the matrices");
        }
    }
}

#[test]
fn random_weights_fill_every_param_like_transformers() {
    let model = tiny(r#", "attention_bias": true, "mlp_bias": true"#);
    let w = random_weights(&model, DType::F32, 42).unwrap();
    let g = model.trace(&TraceOptions { dtype: DType::F32, last_token_only: true }).unwrap();
    assert_eq!(w.keys().collect::<Vec<_>>(), g.params().keys().collect::<Vec<_>>());
    for (name, t) in &w {
        let v = t.to_f32_vec();
        if name.ends_with(".bias") {
            assert!(v.iter().all(|&x| x == 0.0), "{name}");
        } else if name.ends_with("norm.weight") {
            assert!(v.iter().all(|&x| x == 1.0), "{name}");
        } else {
            let s = std_of(&v);
            assert!((s - 0.02).abs() < 0.002, "{name}: std {s}");
        }
    }
    // Two matrices of one model hold different values (per-parameter streams).
    assert_ne!(
        w["model.layers.0.mlp.down_proj.weight"].to_f32_vec()[..64],
        w["model.layers.1.mlp.down_proj.weight"].to_f32_vec()[..64]
    );

    // The weights fit the graph: the CPU executor accepts them and computes finite logits.
    let exec = CpuExecutor::new(g.clone(), w).unwrap();
    let mut feeds = IndexMap::new();
    feeds.insert("input_ids".to_string(), HostTensor::from_i64(&[1, 3], vec![5, 17, 299]));
    for name in g.inputs().keys().filter(|n| n.starts_with("past.")) {
        feeds.insert(name.clone(), HostTensor::zeros(DType::F32, &[1, 0, 2, 16]));
    }
    let out = exec.run(&feeds).unwrap();
    let logits = out["logits"].to_f32_vec();
    assert_eq!(logits.len(), 300);
    assert!(logits.iter().all(|x| x.is_finite()));
    assert!(logits.iter().any(|&x| x != logits[0]), "random weights give varied logits");
}

#[test]
fn random_weights_of_a_real_preset_in_bf16() {
    let model = LlamaForCausalLM::new(preset("smollm2-135m").unwrap()).unwrap();
    let t = std::time::Instant::now();
    let w = random_weights(&model, DType::BF16, 0).unwrap();
    eprintln!("smollm2-135m bf16 random weights: {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(w.values().map(HostTensor::numel).sum::<usize>(), 134_515_008);
    let table = w["model.embed_tokens.weight"].to_f32_vec();
    assert_eq!(table.len(), 49152 * 576);
    let s = std_of(&table);
    assert!((s - 0.02).abs() < 0.002, "embedding std {s}");
    assert!(w["model.norm.weight"].to_f32_vec().iter().all(|&x| x == 1.0));
    assert!(!w.contains_key("lm_head.weight"), "tied: no separate lm_head");
}

#[test]
fn random_weights_reject_non_float_dtypes() {
    let e = random_weights(&tiny(""), DType::I8, 0).unwrap_err().to_string();
    assert!(e.contains("i8"), "{e}");
}
