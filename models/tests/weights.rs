//! Checkpoint loading: the HF → kiln mapping with fused qkv / gate_up, sharded and
//! half-precision sources, and every error case with its exact message.

mod support;

use kiln_models::config::LlamaConfig;
use kiln_models::llama::LlamaForCausalLM;
use kiln_models::weights::load_weights;
use kiln_models::ModelError;
use kiln_ops::DType;
use safetensors::Dtype;
use support::{hf_tensors, llama_json, temp_dir, write_checkpoint, write_safetensors, Tensor};

fn model(json: &str) -> LlamaForCausalLM {
    LlamaForCausalLM::new(LlamaConfig::from_json_str(json).unwrap()).unwrap()
}

fn find<'a>(tensors: &'a [Tensor], name: &str) -> &'a Tensor {
    tensors.iter().find(|t| t.name == name).unwrap()
}

#[test]
fn fused_parameters_concatenate_hf_tensors_in_order() {
    let dir = temp_dir("fused");
    let json = llama_json(2, 16, 4, 2, r#""attention_bias": true, "mlp_bias": true"#);
    let m = model(&json);
    let tensors = hf_tensors(&m.config, 1);
    write_checkpoint(&dir, &json, &tensors);
    let w = load_weights(&dir, &m, DType::F32).unwrap();
    let g = m.trace(&Default::default()).unwrap();
    assert_eq!(w.keys().collect::<Vec<_>>(), g.params().keys().collect::<Vec<_>>());
    let cat = |names: &[&str]| -> Vec<f32> { names.iter().flat_map(|n| find(&tensors, n).values.clone()).collect() };
    let l = "model.layers.1";
    let qkv = &w[&format!("{l}.self_attn.qkv.weight")];
    assert_eq!(qkv.shape(), [32, 16]);
    let parts = ["q_proj", "k_proj", "v_proj"].map(|p| format!("{l}.self_attn.{p}.weight"));
    assert_eq!(qkv.to_f32_vec(), cat(&parts.each_ref().map(String::as_str)));
    let parts = ["q_proj", "k_proj", "v_proj"].map(|p| format!("{l}.self_attn.{p}.bias"));
    assert_eq!(w[&format!("{l}.self_attn.qkv.bias")].to_f32_vec(), cat(&parts.each_ref().map(String::as_str)));
    let parts = ["gate_proj", "up_proj"].map(|p| format!("{l}.mlp.{p}.weight"));
    let gate_up = &w[&format!("{l}.mlp.gate_up.weight")];
    assert_eq!(
        (gate_up.shape(), gate_up.to_f32_vec()),
        ([24, 16].as_slice(), cat(&parts.each_ref().map(String::as_str)))
    );
    assert_eq!(w["lm_head.weight"].to_f32_vec(), find(&tensors, "lm_head.weight").values);
    assert_eq!(w[&format!("{l}.mlp.down_proj.bias")].shape(), [16]);
}

#[test]
fn every_problem_is_reported_at_once() {
    let dir = temp_dir("problems");
    let json = llama_json(2, 16, 4, 2, "");
    let m = model(&json);
    let mut tensors = hf_tensors(&m.config, 2);
    tensors.retain(|t| t.name != "model.layers.1.self_attn.k_proj.weight" && t.name != "lm_head.weight");
    let norm = tensors.iter_mut().find(|t| t.name == "model.norm.weight").unwrap();
    (norm.shape, norm.values) = (vec![15], vec![1.0; 15]);
    let up = tensors.iter_mut().find(|t| t.name == "model.layers.0.mlp.up_proj.weight").unwrap();
    up.shape = vec![16, 12];
    for name in ["model.layers.0.self_attn.rotary_emb.inv_freq", "extra.weight"] {
        tensors.push(Tensor { name: name.into(), shape: vec![2], values: vec![0.0; 2] });
    }
    write_checkpoint(&dir, &json, &tensors);
    let err = load_weights(&dir, &m, DType::F32).unwrap_err();
    assert!(matches!(err, ModelError::Weights(_)));
    assert_eq!(
        err.to_string(),
        "weights do not match the model:
  missing `model.layers.1.self_attn.k_proj.weight` (part of `model.layers.1.self_attn.qkv.weight`)
  missing `lm_head.weight`
  `model.layers.0.mlp.up_proj.weight` has shape [16, 12], expected [12, 16] (part of `model.layers.0.mlp.gate_up.weight`)
  `model.norm.weight` has shape [15], expected [16]
  unexpected `extra.weight`"
    );
}

#[test]
fn tied_embeddings_need_no_lm_head_and_ignore_one() {
    let dir = temp_dir("tied");
    let json = llama_json(1, 16, 4, 2, r#""tie_word_embeddings": true"#);
    let m = model(&json);
    let mut tensors = hf_tensors(&m.config, 3);
    write_checkpoint(&dir, &json, &tensors);
    let w = load_weights(&dir, &m, DType::F32).unwrap();
    assert!(!w.contains_key("lm_head.weight"));
    // Some exporters write the tied table twice: accepted and unused.
    let embed = find(&tensors, "model.embed_tokens.weight").clone();
    tensors.push(Tensor { name: "lm_head.weight".into(), ..embed });
    write_checkpoint(&dir, &json, &tensors);
    assert_eq!(load_weights(&dir, &m, DType::F32).unwrap().len(), w.len());
}

#[test]
fn sharded_half_precision_checkpoints_are_cast() {
    let dir = temp_dir("sharded");
    let json = llama_json(2, 16, 4, 2, "");
    let m = model(&json);
    let tensors = hf_tensors(&m.config, 4);
    let (a, b) = tensors.split_at(tensors.len() / 2);
    write_safetensors(&dir.join("model-00001-of-00002.safetensors"), a, Dtype::F16);
    write_safetensors(&dir.join("model-00002-of-00002.safetensors"), b, Dtype::BF16);
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|t| (t.name.clone(), "model-00001-of-00002.safetensors".into()))
        .chain(b.iter().map(|t| (t.name.clone(), "model-00002-of-00002.safetensors".into())))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let w = load_weights(&dir, &m, DType::F32).unwrap();
    let embed = &w["model.embed_tokens.weight"];
    assert_eq!(embed.dtype(), DType::F32);
    let f16: Vec<f32> =
        find(a, "model.embed_tokens.weight").values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    assert_eq!(embed.to_f32_vec(), f16);
    let bf16: Vec<f32> = find(b, "lm_head.weight").values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    assert_eq!(w["lm_head.weight"].to_f32_vec(), bf16);

    let w = load_weights(&dir, &m, DType::BF16).unwrap();
    assert!(w.values().all(|t| t.dtype() == DType::BF16));
    assert_eq!(w["lm_head.weight"].to_f32_vec(), bf16);

    // An index naming a shard that is not there.
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "model-00003-of-00003.safetensors"}});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let err = load_weights(&dir, &m, DType::F32).unwrap_err();
    let shard = dir.join("model-00003-of-00003.safetensors");
    assert!(matches!(err, ModelError::Io { ref path, .. } if *path == shard), "{err}");
}

#[test]
fn broken_files_are_errors_naming_the_file() {
    let dir = temp_dir("broken");
    let json = llama_json(1, 16, 4, 2, "");
    let m = model(&json);
    let tensors = hf_tensors(&m.config, 5);

    // No weights at all.
    std::fs::write(dir.join("config.json"), &json).unwrap();
    let err = load_weights(&dir, &m, DType::F32).unwrap_err();
    let file = dir.join("model.safetensors");
    assert!(matches!(err, ModelError::Io { ref path, .. } if *path == file));
    assert!(err.to_string().starts_with(&format!("cannot read `{}`: ", file.display())), "{err}");

    // Truncated.
    write_checkpoint(&dir, &json, &tensors);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    let err = load_weights(&dir, &m, DType::F32).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "bad weight file `{}`: not a valid safetensors file of {} bytes: incomplete metadata, file not fully \
             covered (truncated?)",
            file.display(),
            bytes.len() - 10
        )
    );

    // Garbage, and an empty file.
    std::fs::write(&file, b"\x05\0\0\0\0\0\0\0{oops").unwrap();
    let err = load_weights(&dir, &m, DType::F32).unwrap_err();
    assert!(matches!(err, ModelError::WeightFile { ref path, .. } if *path == file), "{err}");
    assert!(err.to_string().contains("invalid JSON in header"), "{err}");
    std::fs::write(&file, b"").unwrap();
    let err = load_weights(&dir, &m, DType::F32).unwrap_err();
    assert!(matches!(err, ModelError::WeightFile { ref path, .. } if *path == file), "{err}");

    // A tensor of a non-float type.
    let mut bad = tensors.clone();
    bad.retain(|t| t.name != "model.norm.weight");
    write_safetensors(&file, &bad, Dtype::F32);
    // The norm as i32, in a second shard written by hand: header length, header, data.
    let header = r#"{"model.norm.weight":{"dtype":"I32","shape":[16],"data_offsets":[0,64]}}"#;
    let mut bytes = Vec::new();
    bytes.extend((header.len() as u64).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 64]);
    std::fs::write(dir.join("model-00002-of-00002.safetensors"), &bytes).unwrap();
    std::fs::rename(&file, dir.join("model-00001-of-00002.safetensors")).unwrap();
    let mut map: serde_json::Map<String, serde_json::Value> =
        bad.iter().map(|t| (t.name.clone(), "model-00001-of-00002.safetensors".into())).collect();
    map.insert("model.norm.weight".into(), "model-00002-of-00002.safetensors".into());
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({"weight_map": map}).to_string())
        .unwrap();
    let err = load_weights(&dir, &m, DType::F32).unwrap_err();
    assert_eq!(
        err.to_string(),
        "weights do not match the model:\n  `model.norm.weight` has dtype I32, expected F32, F16 or BF16"
    );
}
