//! The text-level LLM API on a tiny random Llama checkpoint with a byte-level tokenizer.

mod support;

use kiln_models::config::LlamaConfig;
use kiln_models::llm::{prompt_logits, Device, FinishReason, LoadOptions, SamplingParams, LLM};
use kiln_models::tokenizer::{tiny_byte_level_tokenizer_json, ChatMessage};
use kiln_models::ModelError;
use kiln_ops::DType;
use std::path::{Path, PathBuf};
use support::{hf_tensors, max_abs_diff, temp_dir, write_checkpoint, Loaded};

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn config_json() -> String {
    r#"{"model_type": "llama", "vocab_size": 262, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 48,
        "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": "float32"}"#
        .to_string()
}

/// A checkpoint with a tokenizer: ids 0..256 bytes, 256 `<s>`, 257 `</s>`,
/// 258 `<|im_start|>`, 259 `<|im_end|>`.
fn checkpoint(name: &str) -> PathBuf {
    let dir = temp_dir(name);
    let json = config_json();
    let cfg = LlamaConfig::from_json_str(&json).unwrap();
    write_checkpoint(&dir, &json, &hf_tensors(&cfg, 5));
    let specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"];
    std::fs::write(dir.join("tokenizer.json"), tiny_byte_level_tokenizer_json(&specials)).unwrap();
    let tc =
        serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true, "chat_template": CHATML});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    dir
}

fn load(dir: &Path) -> LLM {
    LLM::load(dir, LoadOptions { dtype: DType::F32, device: Device::Cpu }).unwrap()
}

#[test]
fn greedy_generation_matches_the_reference_kv_loop() {
    let dir = checkpoint("llm_greedy");
    let llm = load(&dir);
    assert_eq!(llm.device(), Device::Cpu);
    assert_eq!(llm.context_len(), 48);
    assert_eq!(llm.eos_token_ids(), &[257]);
    let prompt_ids = llm.encode("Hi").unwrap();
    assert_eq!(prompt_ids, vec![256, b'H' as u32, b'i' as u32]);
    let params = SamplingParams { max_tokens: 8, stop_token_ids: vec![], ..SamplingParams::greedy(8) };
    let out = &llm.generate(&["Hi"], &params).unwrap()[0];
    assert_eq!(out.prompt_tokens, 3);
    // The reference greedy loop of the model tests (it does not stop at EOS).
    let reference = Loaded::new(&dir, DType::F32).greedy(&[256, 72, 105], 8);
    let want: Vec<u32> = reference[3..].iter().map(|&x| x as u32).collect();
    let n = out.token_ids.len();
    assert_eq!(out.token_ids, want[..n].to_vec());
    if out.finish_reason == FinishReason::Length {
        assert_eq!(n, 8);
    } else {
        assert_eq!(out.token_ids.last(), Some(&257));
    }
    let text_ids: Vec<u32> = out.token_ids.iter().copied().filter(|&t| t != 257).collect();
    assert_eq!(out.text, llm.tokenizer().decode(&text_ids, true).unwrap());
    assert!(out.logprobs.is_none());
    assert!(out.cumulative_logprob < 0.0);
    assert!(out.prefill_ms > 0.0);
}

#[test]
fn seeded_sampling_is_reproducible_and_batches_match() {
    let dir = checkpoint("llm_seeded");
    let llm = load(&dir);
    let p = SamplingParams {
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        seed: Some(1234),
        logprobs: true,
        ..SamplingParams::greedy(10)
    };
    let a = llm.generate(&["abc", "hello there"], &p).unwrap();
    let b = llm.generate(&["abc", "hello there"], &p).unwrap();
    let key = |v: &[kiln_models::llm::CompletionOutput]| -> Vec<(String, Vec<u32>, FinishReason)> {
        v.iter().map(|o| (o.text.clone(), o.token_ids.clone(), o.finish_reason)).collect()
    };
    assert_eq!(key(&a), key(&b));
    let single = llm.generate(&["hello there"], &p).unwrap();
    assert_eq!(single[0].token_ids, a[1].token_ids);
    assert_eq!(a[0].logprobs.as_ref().unwrap().len(), a[0].token_ids.len());
    let sum: f64 = a[0].logprobs.as_ref().unwrap().iter().map(|&x| x as f64).sum();
    assert!((sum - a[0].cumulative_logprob).abs() < 1e-6);
}

#[test]
fn streaming_deltas_add_up_to_the_text() {
    let dir = checkpoint("llm_stream");
    let llm = load(&dir);
    let p = SamplingParams::greedy(12);
    let mut deltas = Vec::new();
    let out = llm.generate_stream("Hello", &p, |d| deltas.push(d.to_string())).unwrap();
    assert_eq!(deltas.concat(), out.text);
    assert!(deltas.iter().all(|d| !d.is_empty()));
    let batch = llm.generate(&["Hello"], &p).unwrap();
    assert_eq!(batch[0].text, out.text);
    assert_eq!(batch[0].token_ids, out.token_ids);
}

#[test]
fn stop_strings_cut_the_text() {
    let dir = checkpoint("llm_stop_string");
    let llm = load(&dir);
    let mut p = SamplingParams::greedy(16);
    let free = llm.generate(&["xyz"], &p).unwrap().remove(0);
    let chars: Vec<char> = free.text.chars().collect();
    assert!(chars.len() >= 4, "need some text to cut: {:?}", free.text);
    // Stop at the third character (its first occurrence).
    let stop: String = chars[2..4].iter().collect();
    let cut = free.text.find(&stop).unwrap();
    p.stop = vec![stop.clone()];
    let mut deltas = Vec::new();
    let out = llm.generate_stream("xyz", &p, |d| deltas.push(d.to_string())).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.text, free.text[..cut]);
    assert_eq!(deltas.concat(), out.text, "streamed text never includes the stop string");
    assert!(out.token_ids.len() < free.token_ids.len() || free.finish_reason == FinishReason::Stop);
}

#[test]
fn eos_from_generation_config_and_stop_token_ids_end_generation() {
    let dir = checkpoint("llm_eos");
    let free = load(&dir).generate(&["q"], &SamplingParams::greedy(10)).unwrap().remove(0);
    let third = free.token_ids[2];
    let first = free.token_ids.iter().position(|&t| t == third).unwrap();
    std::fs::write(dir.join("generation_config.json"), format!(r#"{{"eos_token_id": [257, {third}]}}"#)).unwrap();
    let llm = load(&dir);
    assert!(llm.eos_token_ids().contains(&third));
    let out = llm.generate(&["q"], &SamplingParams::greedy(10)).unwrap().remove(0);
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.token_ids, free.token_ids[..=first].to_vec());
    let text_ids = &free.token_ids[..first];
    assert_eq!(out.text, llm.tokenizer().decode(text_ids, true).unwrap(), "the stop token is not in the text");
    // The same through stop_token_ids on the request.
    std::fs::remove_file(dir.join("generation_config.json")).unwrap();
    let llm = load(&dir);
    let p = SamplingParams { stop_token_ids: vec![third], ..SamplingParams::greedy(10) };
    assert_eq!(llm.generate(&["q"], &p).unwrap()[0].token_ids, free.token_ids[..=first].to_vec());
}

#[test]
fn chat_applies_the_template() {
    let dir = checkpoint("llm_chat");
    let llm = load(&dir);
    let msgs = vec![ChatMessage::user("Hi")];
    let ids = llm.encode_chat(&msgs).unwrap();
    let rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(ids, llm.tokenizer().encode(rendered, false).unwrap());
    assert_eq!(ids[0], 258);
    let p = SamplingParams::greedy(5);
    let out = llm.chat(&msgs, &p).unwrap();
    assert_eq!(out.prompt_tokens, ids.len());
    let mut deltas = String::new();
    let streamed = llm.chat_stream(&msgs, &p, |d| deltas.push_str(d)).unwrap();
    assert_eq!(streamed.token_ids, out.token_ids);
    assert_eq!(deltas, out.text);
}

#[test]
fn too_long_prompts_and_bad_requests_are_errors() {
    let dir = checkpoint("llm_errors");
    let llm = load(&dir);
    let long = "a".repeat(45);
    let e = llm.generate(&[&long], &SamplingParams::greedy(8)).unwrap_err();
    assert!(matches!(e, ModelError::PromptTooLong { tokens: 46, max_new: 8, context: 48 }), "{e}");
    let e = llm.generate_stream(&long, &SamplingParams::greedy(8), |_| {}).unwrap_err();
    assert!(matches!(e, ModelError::PromptTooLong { .. }), "{e}");
    let bad = SamplingParams { top_p: 0.0, ..SamplingParams::greedy(4) };
    let e = llm.generate(&["a"], &bad).unwrap_err();
    assert!(e.to_string().contains("top_p"), "{e}");
}

#[test]
fn devices() {
    let dir = checkpoint("llm_devices");
    let gpu = kiln_runtime::cuda::available();
    let cuda = LLM::load(&dir, LoadOptions { dtype: DType::F32, device: Device::Cuda });
    let auto = LLM::load(&dir, LoadOptions { dtype: DType::F32, device: Device::Auto }).unwrap();
    match gpu {
        // No GPU (CI): `cuda` is an error saying why, `auto` falls back to the CPU.
        Err(why) => {
            let e = match cuda {
                Ok(_) => panic!("cuda without a GPU must fail"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains("no usable GPU") && e.contains(&why), "{e}");
            assert_eq!(auto.device(), Device::Cpu);
        }
        Ok(_) => {
            assert_eq!(cuda.unwrap().device(), Device::Cuda);
            assert_eq!(auto.device(), Device::Cuda);
        }
    }
    assert_eq!("CPU".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("auto".parse::<Device>().unwrap(), Device::Auto);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda);
    assert!("tpu".parse::<Device>().unwrap_err().to_string().contains("tpu"));
    let e = LLM::load(&dir, LoadOptions { dtype: DType::I64, device: Device::Cpu }).unwrap_err();
    assert!(e.to_string().contains("dtype"), "{e}");
}

#[test]
fn bf16_weights_generate() {
    let dir = checkpoint("llm_bf16");
    let llm = LLM::load(&dir, LoadOptions { dtype: DType::BF16, device: Device::Cpu }).unwrap();
    let out = llm.generate(&["ok"], &SamplingParams::greedy(4)).unwrap();
    assert!(!out[0].token_ids.is_empty());
}

#[test]
fn prompt_logits_are_the_full_sequence_logits() {
    let dir = checkpoint("llm_logits");
    let ids = [256u32, 10, 20, 30];
    let t = prompt_logits(&dir, &LoadOptions::default(), &ids).unwrap();
    assert_eq!(t.shape(), &[4, 262]);
    let reference = Loaded::new(&dir, DType::F32);
    let (want, _) = reference.step(&[ids.iter().map(|&i| i as i64).collect()], reference.empty_cache(1), false);
    assert!(max_abs_diff(&t.to_f32_vec(), &want.to_f32_vec()) < 1e-6);
    let e = prompt_logits(&dir, &LoadOptions::default(), &[999]).unwrap_err();
    assert!(e.to_string().contains("999"), "{e}");
    let e = prompt_logits(&dir.join("nope"), &LoadOptions::default(), &[1]).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}
