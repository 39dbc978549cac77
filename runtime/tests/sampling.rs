//! Sampling against hand-computed distributions.

use kiln_runtime::sampling::{
    apply_repetition_penalty, argmax, filtered_probs, log_softmax_at, Sampler, SamplingError, SamplingParams,
};

fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, top_k, top_p, seed: Some(seed), ..Default::default() }
}

/// Logits whose softmax is exactly `probs`.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

#[test]
fn default_is_greedy_and_valid() {
    let p = SamplingParams::default();
    assert!(p.is_greedy());
    p.validate().unwrap();
    assert_eq!(p.top_k, 0);
    assert_eq!(p.top_p, 1.0);
    assert_eq!(p.repetition_penalty, 1.0);
}

#[test]
fn greedy_is_argmax_lowest_id_on_ties() {
    let mut s = Sampler::new(&SamplingParams::greedy(4)).unwrap();
    let logits = [0.5, 2.0, -1.0, 2.0, 1.9];
    let out = s.sample(&logits, &[]).unwrap();
    assert_eq!(out.token, 1);
    assert_eq!(argmax(&logits), 1);
}

#[test]
fn top_k_one_equals_argmax_for_any_seed() {
    let logits = [0.1, 3.0, 2.9, -5.0, 1.0];
    for seed in 0..50 {
        let mut s = Sampler::new(&params(1.7, 1, 1.0, seed)).unwrap();
        for _ in 0..5 {
            assert_eq!(s.sample(&logits, &[]).unwrap().token, 1);
        }
    }
}

#[test]
fn top_p_keeps_exactly_the_expected_set() {
    // probs 0.5, 0.2, 0.15, 0.1, 0.05 (ids 2, 0, 4, 1, 3).
    let logits = logits_of(&[0.2, 0.1, 0.5, 0.05, 0.15]);
    let ids = |p: f32| -> Vec<usize> {
        let mut v: Vec<usize> = filtered_probs(&logits, 1.0, 0, p).into_iter().map(|x| x.0).collect();
        v.sort();
        v
    };
    assert_eq!(ids(0.3), vec![2]); // 0.5 >= 0.3
    assert_eq!(ids(0.5), vec![2]); // exactly reaching p counts
    assert_eq!(ids(0.6), vec![0, 2]); // 0.7
    assert_eq!(ids(0.7), vec![0, 2]); // exactly 0.7
    assert_eq!(ids(0.8), vec![0, 2, 4]); // 0.85
    assert_eq!(ids(0.9), vec![0, 1, 2, 4]); // 0.95
    assert_eq!(ids(0.99), vec![0, 1, 2, 3, 4]);
    assert_eq!(ids(1e-6), vec![2]); // always at least one token
                                    // Renormalized: 0.5/0.7 and 0.2/0.7, sorted by probability.
    let kept = filtered_probs(&logits, 1.0, 0, 0.6);
    assert_eq!(kept[0].0, 2);
    assert!((kept[0].1 - 0.5 / 0.7).abs() < 1e-6);
    assert!((kept[1].1 - 0.2 / 0.7).abs() < 1e-6);
}

#[test]
fn top_k_then_top_p() {
    let logits = logits_of(&[0.2, 0.1, 0.5, 0.05, 0.15]);
    // top-k 3 keeps {2, 0, 4} renormalized to 0.5/0.85, 0.2/0.85, 0.15/0.85;
    // top-p 0.8 then needs 0.588 + 0.235 = 0.823 >= 0.8 → {2, 0}.
    let kept = filtered_probs(&logits, 1.0, 3, 0.8);
    assert_eq!(kept.iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 0]);
    assert!((kept[0].1 - 5.0 / 7.0).abs() < 1e-6);
}

#[test]
fn temperature_scales_logits() {
    // logits ln 0.8, ln 0.2 at T = 0.5 → probs ∝ 0.64, 0.04.
    let logits = logits_of(&[0.8, 0.2]);
    let kept = filtered_probs(&logits, 0.5, 0, 1.0);
    assert!((kept[0].1 - 0.64 / 0.68).abs() < 1e-6, "{kept:?}");
    assert!((kept[1].1 - 0.04 / 0.68).abs() < 1e-6);
}

#[test]
fn repetition_penalty_arithmetic_is_exact() {
    let mut l = vec![2.0f32, -2.0, 3.0, -0.5, 0.0];
    // id 0 twice: penalized once; id 7 out of range: ignored; id 4 is zero (stays 0).
    apply_repetition_penalty(&mut l, &[0, 1, 0, 3, 7, 4], 2.0);
    assert_eq!(l, vec![1.0, -4.0, 3.0, -1.0, 0.0]);
    let mut same = vec![2.0f32, -2.0];
    apply_repetition_penalty(&mut same, &[0, 1], 1.0);
    assert_eq!(same, vec![2.0, -2.0]);
    // A penalty below 1 encourages repetition.
    let mut l = vec![2.0f32, -2.0];
    apply_repetition_penalty(&mut l, &[0, 1], 0.5);
    assert_eq!(l, vec![4.0, -1.0]);
}

#[test]
fn repetition_penalty_changes_the_greedy_choice() {
    let logits = [3.0f32, 2.0, 0.0];
    let p = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy(1) };
    let mut s = Sampler::new(&p).unwrap();
    // 3.0 / 2 = 1.5 < 2.0 → token 1.
    assert_eq!(s.sample(&logits, &[0]).unwrap().token, 1);
    assert_eq!(s.sample(&logits, &[]).unwrap().token, 0);
}

#[test]
fn logprob_is_from_the_original_distribution() {
    let logits = logits_of(&[0.25, 0.75]);
    // Greedy with a penalty: token 1 chosen, logprob ln 0.75 regardless of the penalty.
    let p = SamplingParams { repetition_penalty: 1.5, ..SamplingParams::greedy(1) };
    let out = Sampler::new(&p).unwrap().sample(&logits, &[0]).unwrap();
    assert_eq!(out.token, 1);
    assert!((out.logprob - 0.75f32.ln()).abs() < 1e-6);
    // top-k 1 at a high temperature: still ln 0.75, not 0.
    let out = Sampler::new(&params(3.0, 1, 1.0, 1)).unwrap().sample(&logits, &[]).unwrap();
    assert!((out.logprob - 0.75f32.ln()).abs() < 1e-6);
    assert!((log_softmax_at(&logits, 0) - 0.25f32.ln()).abs() < 1e-6);
}

#[test]
fn same_seed_same_tokens_different_seed_differs() {
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    let run = |seed| {
        let mut s = Sampler::new(&params(1.0, 0, 1.0, seed)).unwrap();
        (0..64).map(|_| s.sample(&logits, &[]).unwrap().token).collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn seeded_stream_is_platform_stable() {
    // ChaCha8 with a fixed seed is specified bit for bit; these ids pin the draw order,
    // so a change in the sampling walk or RNG use shows up here.
    let logits = logits_of(&[0.1, 0.2, 0.3, 0.4]);
    let mut s = Sampler::new(&params(1.0, 0, 1.0, 42)).unwrap();
    let got: Vec<u32> = (0..16).map(|_| s.sample(&logits, &[]).unwrap().token).collect();
    let mut again = Sampler::new(&params(1.0, 0, 1.0, 42)).unwrap();
    let got2: Vec<u32> = (0..16).map(|_| again.sample(&logits, &[]).unwrap().token).collect();
    assert_eq!(got, got2);
    assert_eq!(got, EXPECTED_SEED_42.to_vec(), "seed-42 stream changed: {got:?}");
}

const EXPECTED_SEED_42: [u32; 16] = [2, 0, 2, 2, 3, 3, 3, 1, 1, 3, 2, 0, 0, 2, 1, 3];

#[test]
fn empirical_frequencies_follow_the_filtered_distribution() {
    // probs 0.5, 0.3, 0.2; top-k 2 → 0.625, 0.375.
    let logits = logits_of(&[0.5, 0.3, 0.2]);
    let mut s = Sampler::new(&params(1.0, 2, 1.0, 3)).unwrap();
    let n = 20_000;
    let mut counts = [0usize; 3];
    for _ in 0..n {
        counts[s.sample(&logits, &[]).unwrap().token as usize] += 1;
    }
    assert_eq!(counts[2], 0);
    let f0 = counts[0] as f64 / n as f64;
    assert!((f0 - 0.625).abs() < 0.02, "{counts:?}");
}

#[test]
fn invalid_params_name_the_field() {
    let cases: Vec<(SamplingParams, &str)> = vec![
        (SamplingParams { temperature: -0.1, ..Default::default() }, "temperature"),
        (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature"),
        (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
        (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p"),
        (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
        (SamplingParams { max_tokens: 0, ..Default::default() }, "max_tokens"),
        (SamplingParams { stop: vec![String::new()], ..Default::default() }, "stop"),
    ];
    for (p, field) in cases {
        let e = Sampler::new(&p).unwrap_err();
        assert!(matches!(e, SamplingError::InvalidParam { field: f, .. } if f == field), "{e}");
        assert!(e.to_string().contains(field), "{e}");
    }
}

#[test]
fn bad_logits_are_errors() {
    let mut s = Sampler::new(&SamplingParams::default()).unwrap();
    assert_eq!(s.sample(&[], &[]).unwrap_err(), SamplingError::EmptyLogits);
    assert_eq!(s.sample(&[0.0, f32::NAN], &[]).unwrap_err(), SamplingError::NanLogits(1));
}

#[test]
fn masked_logits_are_never_sampled() {
    let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
    for seed in 0..20 {
        let mut s = Sampler::new(&params(0.7, 0, 0.9, seed)).unwrap();
        let t = s.sample(&logits, &[]).unwrap().token;
        assert!(t == 1 || t == 3);
    }
}
