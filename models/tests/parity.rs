//! Parity with Hugging Face `transformers`: for every checkpoint under
//! `tests/fixtures/hf/` (written by `tools/make_parity_fixtures.py`), kiln's logits at
//! every position must match the recorded ones to 1e-4 of the largest logit, and greedy
//! decoding with the KV cache must reproduce `generate(do_sample=False)` token for token.

mod support;

use kiln_ops::DType;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use support::{max_abs_diff, Loaded};

const REGENERATE: &str = "run `python3 tools/make_parity_fixtures.py` (needs torch and transformers; see \
                          tools/README.md) and commit models/tests/fixtures/hf";

fn fixture_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
    let entries = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("no parity fixtures at `{}` ({e}): {REGENERATE}", root.display()));
    let mut dirs: Vec<PathBuf> =
        entries.map(|e| e.unwrap().path()).filter(|p| p.join("config.json").is_file()).collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no parity fixtures in `{}`: {REGENERATE}", root.display());
    dirs
}

/// `expected.safetensors`: f32 and i64 tensors by name, as (shape, values as f64).
fn read_expected(dir: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let path = dir.join("expected.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("`{}`: {e}: {REGENERATE}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(name, t)| {
            let values: Vec<f64> = match t.dtype() {
                Dtype::F32 => {
                    t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
                }
                Dtype::I64 => {
                    t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
                }
                other => panic!("unexpected dtype {other:?} for `{name}`"),
            };
            (name.to_string(), (t.shape().to_vec(), values))
        })
        .collect()
}

fn ids(v: &[f64]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

#[test]
fn logits_and_greedy_tokens_match_transformers() {
    let mut failures = Vec::new();
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let expected = read_expected(&dir);
        let m = Loaded::new(&dir, DType::F32);
        let vocab = m.model.config.vocab_size;

        // Logits at every position, one sequence at a time.
        let mut cases: Vec<(Vec<i64>, Vec<f32>)> = Vec::new();
        for k in 0.. {
            let Some((_, input)) = expected.get(&format!("case.{k}.input_ids")) else { break };
            let (shape, logits) = &expected[&format!("case.{k}.logits")];
            assert_eq!(shape, &[input.len(), vocab], "{name}: case {k}");
            cases.push((ids(input), logits.iter().map(|&x| x as f32).collect()));
        }
        assert!(!cases.is_empty(), "{name}: expected.safetensors has no cases: {REGENERATE}");
        let mut check = |what: String, got: &[f32], want: &[f32]| {
            let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
            let diff = max_abs_diff(got, want);
            let ok = diff <= 1e-4 * scale;
            println!(
                "{name:16} {what:24} max |Δ| {diff:.2e} (max |logit| {scale:.2}) {}",
                if ok { "ok" } else { "FAIL" }
            );
            if !ok {
                failures.push(format!("{name}: {what}: max |Δ| = {diff:e} > 1e-4 × {scale}"));
            }
        };
        for (k, (input, want)) in cases.iter().enumerate() {
            let (logits, _) = m.step(std::slice::from_ref(input), m.empty_cache(1), false);
            assert_eq!(logits.shape(), [1, input.len(), vocab]);
            check(format!("case {k} ({} tokens)", input.len()), &logits.to_f32_vec(), want);
        }
        // The first two cases again as one batch (they have the same length).
        if cases.len() >= 2 && cases[0].0.len() == cases[1].0.len() {
            let (logits, _) = m.step(&[cases[0].0.clone(), cases[1].0.clone()], m.empty_cache(2), false);
            check(
                "cases 0+1 as a batch".into(),
                &logits.to_f32_vec(),
                &[cases[0].1.clone(), cases[1].1.clone()].concat(),
            );
        }

        // Greedy decoding with the KV cache.
        let prompt = ids(&expected["greedy.prompt"].1);
        let want = ids(&expected["greedy.output"].1);
        let got = m.greedy(&prompt, want.len() - prompt.len());
        println!("{name:16} greedy {got:?}");
        if got != want {
            failures.push(format!("{name}: greedy tokens {got:?}, transformers {want:?}"));
        }
    }
    assert!(failures.is_empty(), "parity failures:\n{}", failures.join("\n"));
}
