//! Generation over a toy one-layer attention model that follows the model contract:
//! the KV loop must give exactly what recomputing the whole sequence gives.

use indexmap::IndexMap;
use kiln_graph::ops::{AttentionAttrs, DType, Dim, F32Bits, HostTensor, Mask, Op};
use kiln_graph::{Graph, TensorExt, Tracer};
use kiln_runtime::cpu::CpuExecutor;
use kiln_runtime::generate::{FinishReason, GenerateError, Generator};
use kiln_runtime::sampling::SamplingParams;
use std::ops::ControlFlow;

const VOCAB: usize = 11;
const D: usize = 4;

/// `logits = attention(E_q[ids], [past_k; E_k[ids]], [past_v; E_v[ids]]) · W_out`.
fn toy_graph(last_token_only: bool) -> Graph {
    let tr = Tracer::new();
    let (b, s, p) = (Dim::sym("batch"), Dim::sym("seq"), Dim::sym("past"));
    let ids = tr.input("input_ids", DType::I64, [b.clone(), s.clone()]).unwrap();
    let pk = tr.input("past.0.key", DType::F32, [b.clone(), p.clone(), Dim::fixed(1), Dim::fixed(D)]).unwrap();
    let pv = tr.input("past.0.value", DType::F32, [b.clone(), p, Dim::fixed(1), Dim::fixed(D)]).unwrap();
    let heads = |name: &str| {
        let w = tr.param(name, DType::F32, [VOCAB, D]).unwrap();
        w.gather(ids, 0).unwrap().reshape([b.clone(), s.clone(), Dim::fixed(1), Dim::fixed(D)]).unwrap()
    };
    let (q, k, v) = (heads("wq"), heads("wk"), heads("wv"));
    let k_all = pk.concat(&[k], 1).unwrap();
    let v_all = pv.concat(&[v], 1).unwrap();
    tr.output("present.0.key", k_all).unwrap();
    tr.output("present.0.value", v_all).unwrap();
    let attrs = AttentionAttrs { mask: Mask::Causal, scale: F32Bits::new(1.0) };
    let att = tr.apply(Op::Attention(attrs), &[q, k_all, v_all]).unwrap()[0];
    let h = att.reshape([b, s.clone(), Dim::fixed(D)]).unwrap();
    let w_out = tr.param("w_out", DType::F32, [D, VOCAB]).unwrap();
    let mut logits = h.matmul(w_out).unwrap();
    if last_token_only {
        logits = logits.slice(1, s.clone() - 1, s).unwrap();
    }
    tr.output("logits", logits).unwrap();
    tr.finish().unwrap()
}

fn weights() -> IndexMap<String, HostTensor> {
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut rand = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    };
    let mut w = IndexMap::new();
    for name in ["wq", "wk", "wv"] {
        w.insert(name.to_string(), HostTensor::from_f32(&[VOCAB, D], rand(VOCAB * D, 2.0)));
    }
    w.insert("w_out".to_string(), HostTensor::from_f32(&[D, VOCAB], rand(D * VOCAB, 6.0)));
    w
}

fn generator(last_token_only: bool, context: usize) -> Generator {
    Generator::new(CpuExecutor::new(toy_graph(last_token_only), weights()).unwrap(), context).unwrap()
}

fn go(g: &Generator, prompt: &[u32], p: &SamplingParams) -> kiln_runtime::generate::Generation {
    g.generate(prompt, p, |_| ControlFlow::Continue(())).unwrap()
}

#[test]
fn kv_loop_matches_full_recomputation() {
    let g = generator(true, 64);
    let full = generator(false, 64);
    let prompt = [3u32, 1, 4, 1, 5];
    let out = go(&g, &prompt, &SamplingParams::greedy(12));
    assert_eq!(out.token_ids.len(), 12);
    assert_eq!(out.finish_reason, FinishReason::Length);
    // Reference: rerun the whole sequence from an empty cache for every token.
    let mut seq = prompt.to_vec();
    for (i, &tok) in out.token_ids.iter().enumerate() {
        let (logits, _) = full.forward(&seq, full.empty_cache()).unwrap();
        let best = kiln_runtime::sampling::argmax(&logits) as u32;
        assert_eq!(best, tok, "token {i}");
        let lp = kiln_runtime::sampling::log_softmax_at(&logits, best as usize);
        assert!((lp - out.logprobs[i]).abs() < 1e-4, "logprob {i}: {lp} vs {}", out.logprobs[i]);
        seq.push(tok);
    }
    let sum: f64 = out.logprobs.iter().map(|&x| x as f64).sum();
    assert!((sum - out.cumulative_logprob).abs() < 1e-9);
    // The full-logits graph generates the same tokens too.
    assert_eq!(go(&full, &prompt, &SamplingParams::greedy(12)).token_ids, out.token_ids);
}

#[test]
fn cache_grows_by_one_per_step() {
    let g = generator(true, 64);
    let (_, cache) = g.forward(&[1, 2, 3], g.empty_cache()).unwrap();
    assert_eq!(cache["past.0.key"].shape(), &[1, 3, 1, D]);
    let (_, cache) = g.forward(&[4], cache).unwrap();
    assert_eq!(cache["past.0.value"].shape(), &[1, 4, 1, D]);
    assert_eq!(g.cache_inputs().collect::<Vec<_>>(), vec!["past.0.key", "past.0.value"]);
    assert_eq!(g.vocab_size(), Some(VOCAB));
}

#[test]
fn stops_on_stop_token_and_keeps_it() {
    let g = generator(true, 64);
    let prompt = [2u32, 7];
    let free = go(&g, &prompt, &SamplingParams::greedy(8));
    let stop = free.token_ids[2];
    let first = free.token_ids.iter().position(|&t| t == stop).unwrap();
    let p = SamplingParams { stop_token_ids: vec![stop], ..SamplingParams::greedy(8) };
    let out = go(&g, &prompt, &p);
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.token_ids, free.token_ids[..=first].to_vec());
}

#[test]
fn callback_streams_every_token_and_can_stop() {
    let g = generator(true, 64);
    let mut seen = Vec::new();
    let out = g
        .generate(&[1, 2], &SamplingParams::greedy(10), |s| {
            seen.push((s.index, s.token));
            if s.index == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.token_ids.len(), 4);
    assert_eq!(seen, out.token_ids.iter().enumerate().map(|(i, &t)| (i, t)).collect::<Vec<_>>());
}

#[test]
fn seeded_sampling_is_reproducible_and_batches_match_single_runs() {
    let g = generator(true, 64);
    let p = SamplingParams { temperature: 1.0, top_k: 5, top_p: 0.9, seed: Some(11), ..SamplingParams::greedy(10) };
    let a = go(&g, &[1, 2, 3], &p);
    let b = go(&g, &[1, 2, 3], &p);
    assert_eq!(a.token_ids, b.token_ids);
    let prompts = vec![vec![1u32, 2, 3], vec![9u32], vec![4u32, 4, 4, 4, 4, 4, 4]];
    let batch = g.generate_batch(&prompts, &p).unwrap();
    assert_eq!(batch.len(), 3);
    for (pr, out) in prompts.iter().zip(&batch) {
        assert_eq!(out.token_ids, go(&g, pr, &p).token_ids);
        assert_eq!(out.prompt_tokens, pr.len());
    }
}

#[test]
fn timing_is_reported() {
    let g = generator(true, 64);
    let out = go(&g, &[1, 2, 3], &SamplingParams::greedy(5));
    assert!(out.prefill_ms > 0.0);
    assert!(out.decode_ms > 0.0);
    assert!(out.decode_tokens_per_s > 0.0);
    let one = go(&g, &[1, 2, 3], &SamplingParams::greedy(1));
    assert_eq!(one.token_ids.len(), 1);
    assert_eq!(one.decode_tokens_per_s, 0.0);
}

#[test]
fn bad_requests_are_errors() {
    let g = generator(true, 8);
    let e = g.generate(&[1, 2, 3, 4, 5], &SamplingParams::greedy(4), |_| ControlFlow::Continue(())).unwrap_err();
    assert!(matches!(e, GenerateError::ContextExceeded { prompt: 5, max_new: 4, context: 8 }), "{e}");
    assert!(e.to_string().contains("exceeds the context of 8 tokens"));
    // Exactly the context is fine.
    go(&g, &[1, 2, 3, 4], &SamplingParams::greedy(4));
    let e = g.generate(&[], &SamplingParams::greedy(2), |_| ControlFlow::Continue(())).unwrap_err();
    assert!(matches!(e, GenerateError::EmptyPrompt));
    let e = g.generate(&[1, 99], &SamplingParams::greedy(2), |_| ControlFlow::Continue(())).unwrap_err();
    assert!(matches!(e, GenerateError::TokenOutOfRange { id: 99, position: 1, vocab: VOCAB }), "{e}");
    let bad = SamplingParams { temperature: -1.0, ..SamplingParams::greedy(2) };
    let e = g.generate(&[1], &bad, |_| ControlFlow::Continue(())).unwrap_err();
    assert!(e.to_string().contains("temperature"), "{e}");
    // A batch is checked whole before anything runs.
    let e = g.generate_batch(&[vec![1], vec![1; 7]], &SamplingParams::greedy(2)).unwrap_err();
    assert!(matches!(e, GenerateError::ContextExceeded { prompt: 7, .. }));
}

#[test]
fn graphs_off_contract_are_rejected() {
    let tr = Tracer::new();
    let x = tr.input("tokens", DType::I64, [Dim::sym("batch"), Dim::sym("seq")]).unwrap();
    tr.output("logits", x.cast(DType::F32).unwrap().unsqueeze(2).unwrap()).unwrap();
    let exec = CpuExecutor::new(tr.finish().unwrap(), IndexMap::new()).unwrap();
    let e = Generator::new(exec, 16).unwrap_err();
    assert!(e.to_string().contains("no input `input_ids`"), "{e}");

    let tr = Tracer::new();
    let ids = tr.input("input_ids", DType::I64, [Dim::sym("batch"), Dim::sym("seq")]).unwrap();
    let _past = tr.input("past.0.key", DType::F32, [Dim::sym("batch"), Dim::sym("past"), Dim::fixed(2)]).unwrap();
    tr.output("logits", ids.cast(DType::F32).unwrap().unsqueeze(2).unwrap()).unwrap();
    let exec = CpuExecutor::new(tr.finish().unwrap(), IndexMap::new()).unwrap();
    let e = Generator::new(exec, 16).unwrap_err();
    assert!(e.to_string().contains("no matching output `present.0.key`"), "{e}");
}
