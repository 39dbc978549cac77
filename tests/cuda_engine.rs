//! The device-resident engine (`kiln_runtime::cuda::CudaEngine`) against the CPU
//! reference: a tiny random Llama's logits after the prefill and after every decode step
//! match the CPU executor's, greedy tokens agree, a batch decodes like its sequences one
//! by one, and CUDA-graph replay equals eager launches. Skips without a GPU.

use indexmap::IndexMap;
use kiln::models::config::LlamaConfig;
use kiln::models::llama::{LlamaForCausalLM, TraceOptions};
use kiln::ops::{DType, HostTensor};
use kiln::runtime::cpu::CpuExecutor;
use kiln::runtime::cuda::{CudaEngine, CudaExecutor, EngineOptions};
use kiln::runtime::generate::Generator;

fn gpu() -> bool {
    match CudaExecutor::available() {
        Ok(info) => {
            println!("device: {info}");
            true
        }
        Err(why) => {
            println!("skipped: no usable CUDA GPU ({why})");
            false
        }
    }
}

const CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
  "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}"#;

/// Random weights with a larger spread than an initializer's, so logits are far apart
/// and greedy choices are stable across backends.
fn weights(model: &LlamaForCausalLM, dtype: DType) -> IndexMap<String, HostTensor> {
    let g = model.trace(&TraceOptions { dtype, last_token_only: true }).unwrap();
    let mut s = 0x9e3779b97f4a7c15u64;
    g.params()
        .iter()
        .map(|(name, &n)| {
            let shape = g.node(n).outputs[0].shape.as_fixed().unwrap();
            let len: usize = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            let v: Vec<f32> = (0..len)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                    if norm {
                        1.0 + 0.1 * u
                    } else {
                        0.25 * u
                    }
                })
                .collect();
            (name.clone(), HostTensor::from_f32(&shape, v).cast(dtype))
        })
        .collect()
}

/// A random-weight Llama of these sizes (512 positions, untied embeddings).
fn llama(
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
) -> LlamaForCausalLM {
    let config = format!(
        r#"{{"model_type": "llama", "hidden_size": {hidden}, "intermediate_size": {intermediate},
          "num_hidden_layers": {layers}, "num_attention_heads": {heads}, "num_key_value_heads": {kv_heads},
          "vocab_size": {vocab}, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": false}}"#
    );
    LlamaForCausalLM::new(LlamaConfig::from_json_str(&config).unwrap()).unwrap()
}

fn setup(dtype: DType) -> (kiln::graph::Graph, IndexMap<String, HostTensor>) {
    compiled(&LlamaForCausalLM::new(LlamaConfig::from_json_str(CONFIG).unwrap()).unwrap(), dtype)
}

/// `model`'s last-token graph through the default pipeline, and its weights, in `dtype`.
fn compiled(model: &LlamaForCausalLM, dtype: DType) -> (kiln::graph::Graph, IndexMap<String, HostTensor>) {
    let w = weights(model, dtype);
    let g = model.trace(&TraceOptions { dtype, last_token_only: true }).unwrap();
    let g = kiln::passes::default_pipeline().run(g).unwrap().graph;
    (g, w)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits after the prefill and after each of `steps` decode steps, and the tokens.
fn engine_run(
    graph: &kiln::graph::Graph,
    w: &IndexMap<String, HostTensor>,
    prompt: &[u32],
    steps: usize,
    graphs: bool,
    pdl: bool,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let (logits, tokens, _) = engine_run_with(graph, w, prompt, steps, EngineOptions { pdl, ..test_options(graphs) });
    (logits, tokens)
}

/// The engine options of these tests: batch 2, context 64, CUDA graphs or not.
fn test_options(graphs: bool) -> EngineOptions {
    EngineOptions { max_batch: 2, max_context: 64, cuda_graphs: graphs, ..Default::default() }
}

/// Two runs computed the same bits: equal tokens, and equal logits after the prefill and
/// after every decode step (`what` names the pair in a failure).
fn assert_same_bits(what: &str, (la, ta): (&[Vec<f32>], &[u32]), (lb, tb): (&[Vec<f32>], &[u32])) {
    assert_eq!(ta, tb, "{what}: tokens");
    assert_eq!(la.len(), lb.len(), "{what}: steps");
    for (i, (a, b)) in la.iter().zip(lb).enumerate() {
        assert_eq!(a, b, "{what}: step {i}: the logits differ");
    }
}

/// An [`engine_run_with`] result: logits after the prefill and each step, the tokens, the
/// launches per decode step.
type Run = (Vec<Vec<f32>>, Vec<u32>, usize);

/// A switch that changes how many kernels a decode step launches, never what they
/// compute: `run(graphs, on)` with it off (graphs) and on (graphs, then eager) gives the
/// same tokens and logits bit for bit, and `saved` launches fewer per step when on
/// (`what` names the switch in a failure). Returns the run with it off and those with it
/// on, graphs first.
fn switch_saves_launches(what: &str, saved: usize, run: impl Fn(bool, bool) -> Run) -> (Run, [Run; 2]) {
    let off = run(true, false);
    let on = [true, false].map(|graphs| {
        let r = run(graphs, true);
        let what = format!("{what} (graphs: {graphs})");
        assert_same_bits(&what, (&r.0, &r.1), (&off.0, &off.1));
        assert_eq!(r.2 + saved, off.2, "{what}: launches per decode step");
        r
    });
    (off, on)
}

/// Which of the environment knobs `vars` is set (the WIP measurement knobs turn a form on
/// for every engine, so a test comparing that form on and off by option cannot run).
fn pinned_by_env(vars: &[&str]) -> Option<String> {
    vars.iter().find_map(|v| std::env::var(v).ok().map(|x| format!("{v}={x} in the environment pins the switch")))
}

/// [`engine_run`] with any options; also the launches per decode step.
fn engine_run_with(
    graph: &kiln::graph::Graph,
    w: &IndexMap<String, HostTensor>,
    prompt: &[u32],
    steps: usize,
    opts: EngineOptions,
) -> (Vec<Vec<f32>>, Vec<u32>, usize) {
    let graphs = opts.cuda_graphs;
    let mut e = CudaEngine::new(graph.clone(), w.clone(), opts).unwrap();
    e.prefill(&[prompt.to_vec()]).unwrap();
    let mut logits = vec![e.logits().unwrap()];
    for _ in 0..steps {
        e.decode_step().unwrap();
        logits.push(e.logits().unwrap());
    }
    if graphs {
        assert_eq!(e.not_capturable(), None, "the decode step should be capturable");
    }
    let launches = e.launches_per_decode_step();
    println!("kiln-info\tengine\tlaunches_per_decode_step={launches}");
    (logits, e.tokens().unwrap().remove(0), launches)
}

fn check_against_cpu(dtype: DType, tol: f64, prompt_len: usize) {
    if !gpu() {
        return;
    }
    let (g, w) = setup(dtype);
    let prompt = test_prompt(prompt_len);
    let (logits, tokens) = engine_run(&g, &w, &prompt, 12, true, false);
    compare_with_cpu(&g, &w, &prompt, &logits, &tokens, dtype.name(), tol);
}

fn test_prompt(len: usize) -> Vec<u32> {
    [3u32, 17, 99, 4, 250, 8, 1].iter().cycle().take(len).enumerate().map(|(i, &t)| (t + 31 * i as u32) % 256).collect()
}

/// The engine's logits after the prefill and each decode step against the CPU executor
/// fed the engine's tokens (so both see one history): relative L2 under `tol`, and the
/// greedy token wherever the CPU's top two logits are apart.
fn compare_with_cpu(
    g: &kiln::graph::Graph,
    w: &IndexMap<String, HostTensor>,
    prompt: &[u32],
    logits: &[Vec<f32>],
    tokens: &[u32],
    what: &str,
    tol: f64,
) {
    let steps = logits.len() - 1;
    let gen = Generator::new(CpuExecutor::new(g.clone(), w.clone()).unwrap(), 64).unwrap();
    let (mut cpu_logits, mut cache) = gen.forward(prompt, gen.empty_cache()).unwrap();
    for (i, l) in logits.iter().enumerate() {
        let err = rel_l2(l, &cpu_logits);
        println!("kiln-check\tengine_{what}\tstep {i}\tlogits\tmax_rel=0\trel_l2={err:.3e}");
        assert!(err < tol, "step {i}: logits rel L2 {err:.3e} > {tol:e}");
        let want = argmax(&cpu_logits);
        let mut sorted = cpu_logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 1e-2 * sorted[0].abs().max(1.0) {
            assert_eq!(tokens[i], want, "step {i}: greedy token");
        }
        if i < steps {
            (cpu_logits, cache) = gen.forward(&[tokens[i]], cache).unwrap();
        }
    }
    assert_eq!(tokens.len(), steps + 1);
}

/// Past `attention_long_keys` decode attention takes whole GQA groups per block (the
/// test model's batch 1 otherwise takes one head per block), and the decode step is a
/// second CUDA graph: a run that crosses the bound (7 prompt tokens, 12 steps, bound 10)
/// captures two graphs and still matches the CPU executor, in f32 and bf16.
#[test]
fn long_contexts_switch_the_attention_tile_and_still_match_the_cpu() {
    if !gpu() {
        return;
    }
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
        let (g, w) = setup(dtype);
        let prompt = test_prompt(7);
        let opts = EngineOptions { attention_long_keys: 10, ..test_options(true) };
        let mut e = CudaEngine::new(g.clone(), w.clone(), opts).unwrap();
        e.prefill(std::slice::from_ref(&prompt)).unwrap();
        let mut logits = vec![e.logits().unwrap()];
        for _ in 0..12 {
            e.decode_step().unwrap();
            logits.push(e.logits().unwrap());
        }
        assert_eq!(e.not_capturable(), None);
        assert_eq!(e.decode_graphs(), 2, "{dtype}: one graph per side of the bound");
        let tokens = e.tokens().unwrap().remove(0);
        compare_with_cpu(&g, &w, &prompt, &logits, &tokens, &format!("long_{}", dtype.name()), tol);
    }
}

#[test]
fn engine_matches_the_cpu_executor_f32() {
    check_against_cpu(DType::F32, 1e-4, 7);
}

/// A prompt longer than `PREFILL_ROWS`: bf16 prefill attention runs the tensor-core kernel.
#[test]
fn engine_prefill_of_a_long_prompt_matches_the_cpu_executor_bf16() {
    const { assert!(40 > kiln::runtime::cuda::PREFILL_ROWS) };
    check_against_cpu(DType::BF16, 3e-2, 40);
}

#[test]
fn engine_matches_the_cpu_executor_bf16() {
    check_against_cpu(DType::BF16, 3e-2, 7);
}

/// Programmatic dependent launch must change when kernels start, never what they
/// compute: tokens and logits equal the serial launches' bit for bit, graph and eager.
#[test]
fn pdl_launches_compute_what_serial_launches_do() {
    if !gpu() {
        return;
    }
    let (g, w) = setup(DType::F32);
    let p1 = vec![5u32, 6, 7, 8];
    let (l_serial, t_serial) = engine_run(&g, &w, &p1, 8, true, false);
    for graphs in [true, false] {
        let (l_pdl, t_pdl) = engine_run(&g, &w, &p1, 8, graphs, true);
        let what = format!("launches with and without PDL (graphs: {graphs})");
        assert_same_bits(&what, (&l_pdl, &t_pdl), (&l_serial, &t_serial));
    }
}

/// The epilogue GEMV (SwiGLU computed by the gate_up GEMV's blocks, one row of x, one
/// wave: the test model's small MLP) changes how many kernels a decode step launches,
/// never what they compute: tokens and logits equal those of the GEMV followed by the
/// epilogue's own kernel bit for bit, in f32 and bf16, graph and eager.
#[test]
fn the_epilogue_gemv_computes_what_the_epilogue_kernel_does() {
    if !gpu() {
        return;
    }
    let p1 = vec![5u32, 6, 7, 8];
    for dt in [DType::F32, DType::BF16] {
        let (g, w) = setup(dt);
        let run = |graphs: bool, epilogue_gemv: bool| {
            engine_run_with(&g, &w, &p1, 6, EngineOptions { epilogue_gemv, ..test_options(graphs) })
        };
        // One launch fewer per decoder layer (the test model has 2 layers).
        switch_saves_launches(&format!("{dt}: the epilogue GEMV"), 2, run);
    }
}

/// Where the epilogue GEMV's blocks do not fit in one wave (gate_up of 2 × 8,192 rows:
/// 1,024 blocks of 8 columns), the scaled GEMV computes SwiGLU per warp
/// (`kiln_codegen::gemv_scaled_epi_warp`: a warp takes a column's gate and up rows, the
/// blocks loop over the column tiles): one launch fewer per layer than the scaled GEMV +
/// the epilogue's kernel, the same bits (the same per-lane summation order, y rounded
/// as stored), in f32 and bf16, graph and eager; in f32 it matches the CPU executor (in
/// bf16 this model's 8,192-wide sums drift from the CPU's past the tolerance the small
/// test model uses, for both forms alike).
#[test]
fn the_warp_epilogue_gemv_computes_what_the_epilogue_kernel_does() {
    if !gpu() {
        return;
    }
    // One launch fewer per decoder layer (2 layers).
    // (Without the chained down projection, which needs the per-warp form.)
    let set = |o, epilogue_gemv| EngineOptions { epilogue_gemv, mlp_chain: false, ..o };
    wide_mlp_switch("the warp epilogue", 2, "epi_warp_f32", set);
}

/// A switch over the 2-layer test model with an 8,192-wide MLP (gate_up's epilogue GEMV
/// takes four waves, so the per-warp form runs), tiled GEMVs: `set(options, on)` turns it
/// on; [`switch_saves_launches`] in f32 and bf16 (`saved` launches per step), and in f32
/// the runs with it on against the CPU executor (`tag` names them).
fn wide_mlp_switch(what: &str, saved: usize, tag: &str, set: impl Fn(EngineOptions, bool) -> EngineOptions) {
    if let Some(why) = pinned_by_env(&["KILN_MLP_CHAIN", "KILN_EPI_WARP"]) {
        println!("skipping {what}: {why}");
        return;
    }
    let model = llama(512, 8192, 2, 8, 2, 256);
    let prompt = test_prompt(9);
    for dt in [DType::F32, DType::BF16] {
        let (g, w) = compiled(&model, dt);
        let run = |graphs: bool, on: bool| {
            let opts = set(EngineOptions { stream_gemv: false, ..test_options(graphs) }, on);
            engine_run_with(&g, &w, &prompt, 6, opts)
        };
        let (_, on) = switch_saves_launches(&format!("{dt}: {what}"), saved, run);
        if dt == DType::F32 {
            for (l_on, t_on, _) in &on {
                compare_with_cpu(&g, &w, &prompt, l_on, t_on, tag, 1e-4);
            }
        }
    }
}

/// `EngineOptions::mlp_chain` (on by default): the per-warp epilogue GEMV
/// with the down projection chained into its launch (`gemv_scaled_epi_warp_chain`: its
/// blocks count themselves as they finish gate_up + SwiGLU, spin until all have, then
/// compute the down projection's rows as the plain one-row GEMV does) computes the same
/// bits as the two launches, one launch fewer per layer, in f32 and bf16, graph and
/// eager, over 6 decode steps (so each layer's counters are reused by later steps and
/// replays: the kernel leaves them zero); in f32 it matches the CPU executor.
#[test]
fn the_chained_down_projection_computes_what_its_own_launch_does() {
    if !gpu() {
        return;
    }
    wide_mlp_switch("the chained down projection", 2, "mlp_chain_f32", |o, mlp_chain| EngineOptions { mlp_chain, ..o });
}

/// `EngineOptions::greedy_fold` (on by default): at batch 1 the LM head's
/// GEMV samples greedily itself (each block's best (y, row) key by atomicMax, decoded by
/// the step end), so the greedy kernel is not launched, and in bf16 the logits' cast to
/// f32 waits for `logits()`: the same tokens and logits bits as the greedy kernel over
/// the cast logits, graph and eager, with 2 launches fewer per step in bf16 (the greedy
/// kernel and the cast; in f32, whose logits are y itself, the greedy kernel only).
#[test]
fn the_folded_greedy_sampling_picks_what_the_greedy_kernel_does() {
    if !gpu() {
        return;
    }
    if let Some(why) = pinned_by_env(&["KILN_GREEDY_FOLD", "KILN_GREEDY_KEY"]) {
        println!("skipping: {why}");
        return;
    }
    let model = llama(512, 1024, 2, 8, 2, 256);
    let prompt = test_prompt(9);
    for (dt, saved) in [(DType::F32, 1), (DType::BF16, 2)] {
        let (g, w) = compiled(&model, dt);
        let run = |graphs: bool, greedy_fold: bool| {
            // Tiled GEMVs (the sampling LM head is the tiled one's twin, bit for bit).
            let opts = EngineOptions { greedy_fold, stream_gemv: false, ..test_options(graphs) };
            engine_run_with(&g, &w, &prompt, 6, opts)
        };
        switch_saves_launches(&format!("{dt}: the folded greedy sampling"), saved, run);
    }
}

/// The scaled GEMV (the RMSNorm before qkv, gate_up and the LM head computed by the
/// GEMV's blocks as a scale after their products, the residual add staged with it)
/// replaces each norm's kernel: 2 per decoder layer and the final one, 5 launches fewer
/// on the 2-layer test model. It skips the rounding of the normed x to the storage
/// type, so it matches the norm kernel + GEMV to rounding, not bit for bit: both match
/// the CPU executor (logits and greedy tokens), in f32 and bf16, graph and eager, for
/// the tiled scaled GEMV and for its streaming form (the default for this model's short
/// rows since the streaming GEMV).
#[test]
fn the_scaled_gemv_replaces_the_norm_kernels_and_matches_the_cpu() {
    if !gpu() {
        return;
    }
    let prompt = test_prompt(7);
    // The tiled form (stream off) and the streaming one (this model's rows are short).
    for stream_gemv in [false, true] {
        for (dt, tol, close) in [(DType::F32, 1e-4, 1e-5), (DType::BF16, 3e-2, 2e-2)] {
            let (g, w) = setup(dt);
            let run = |graphs: bool, scaled_gemv: bool| {
                // (Without the folded sampling, which needs the scaled LM head: 2 launches more.)
                let opts = EngineOptions { scaled_gemv, stream_gemv, greedy_fold: false, ..test_options(graphs) };
                engine_run_with(&g, &w, &prompt, 12, opts)
            };
            let (l_off, _, n_off) = run(true, false);
            for graphs in [true, false] {
                let (l_on, t_on, n_on) = run(graphs, true);
                let what = format!("{dt}, graphs: {graphs}, stream: {stream_gemv}");
                assert_eq!(n_on + 5, n_off, "{what}: launches per decode step");
                for (i, (a, b)) in l_on.iter().zip(&l_off).enumerate() {
                    let err = rel_l2(a, b);
                    assert!(err < close, "{what}: step {i}: scaled vs norm kernel rel L2 {err:.3e}");
                }
                let tag = format!("scaled_{}{}", dt.name(), if stream_gemv { "_stream" } else { "" });
                compare_with_cpu(&g, &w, &prompt, &l_on, &t_on, &tag, tol);
            }
        }
    }
}

/// The tiled scaled GEMV's blocks are one wave that loops over the row tiles: an LM head
/// of 16,384 rows of 1,024 f32 (1,024 tiles of 16 rows, blocks of 512 threads: at most 4
/// per multiprocessor, so several tiles per block on any GPU of up to 256) matches the
/// CPU executor's logits and greedy tokens, graph and eager, and the norm kernel + GEMV
/// to rounding.
#[test]
fn the_scaled_gemv_loops_over_tiles_and_matches_the_cpu() {
    if !gpu() {
        return;
    }
    let model = llama(1024, 256, 1, 8, 2, 16384);
    let dt = DType::F32;
    let (g, w) = compiled(&model, dt);
    let prompt = test_prompt(5);
    let run = |graphs: bool, scaled_gemv: bool| {
        let opts = EngineOptions { scaled_gemv, stream_gemv: false, ..test_options(graphs) };
        engine_run_with(&g, &w, &prompt, 4, opts)
    };
    let (l_off, _, n_off) = run(true, false);
    for graphs in [true, false] {
        let (l_on, t_on, n_on) = run(graphs, true);
        assert!(n_on < n_off, "graphs {graphs}: the norm kernels are gone ({n_on} vs {n_off})");
        for (i, (a, b)) in l_on.iter().zip(&l_off).enumerate() {
            let err = rel_l2(a, b);
            assert!(err < 1e-5, "step {i}: scaled vs norm kernel rel L2 {err:.3e} (graphs: {graphs})");
        }
        compare_with_cpu(&g, &w, &prompt, &l_on, &t_on, "scaled_loop_f32", 1e-4);
    }
}

/// Horizontal fusion (a layer's RoPE of q and its k / v appends in one launch) changes
/// how many kernels a decode step launches, never what they compute: tokens and logits
/// equal the separate launches' bit for bit, in f32 and bf16, graph and eager.
#[test]
fn horizontal_groups_compute_what_separate_launches_do() {
    if !gpu() {
        return;
    }
    let p1 = vec![5u32, 6, 7, 8];
    for dt in [DType::F32, DType::BF16] {
        let (g, w) = setup(dt);
        let run = |graphs: bool, horizontal: bool| {
            // The producers launch (not computed by attention), so their grouping shows.
            let opts = EngineOptions { horizontal, attention_fused: false, ..test_options(graphs) };
            engine_run_with(&g, &w, &p1, 6, opts)
        };
        // Two launches fewer per decoder layer (the test model has 2 layers).
        switch_saves_launches(&format!("{dt}: horizontal groups"), 2 * 2, run);
    }
}

/// Decode attention that computes its producers (a layer's RoPE of q and its k / v
/// appends: `attention_decode_fused`) skips their launch, one per decoder layer (2 on the
/// test model), and computes the same bits as the producers' own kernels: logits and
/// tokens equal the unfused run's in f32 and bf16, graph and eager, for a short prompt
/// (its prefill takes the split-K kernel, fused too) and a long one (the prefill kernel,
/// with the producers launched, then fused decode steps), and match the CPU executor.
#[test]
fn fused_attention_skips_the_producers_and_computes_the_same_bits() {
    if !gpu() {
        return;
    }
    for dt in [DType::F32, DType::BF16] {
        let (g, w) = setup(dt);
        for prompt in [test_prompt(5), test_prompt(21)] {
            let run = |graphs: bool, attention_fused: bool| {
                engine_run_with(&g, &w, &prompt, 8, EngineOptions { attention_fused, ..test_options(graphs) })
            };
            let what = format!("{dt}: fused attention (prompt {})", prompt.len());
            let ((l_sep, t_sep, _), _) = switch_saves_launches(&what, 2, run);
            let tol = if dt == DType::F32 { 1e-4 } else { 3e-2 };
            compare_with_cpu(&g, &w, &prompt, &l_sep, &t_sep, &format!("attn_fused_{}", dt.name()), tol);
        }
    }
}

/// Decode attention over a context that crosses into its block's second K/V stage (head
/// dim 64: 192 keys per stage in bf16, 96 in f32), where the fused kernel computes the
/// launch's own K/V rows into the second stage: a run crossing the stage boundary
/// computes the same bits fused and unfused (whose kernel
/// `attention_decode_matches_reference` checks), graph and eager; in f32 it also
/// matches the CPU executor (in bf16 the greedy tokens of a 200-token context part from
/// the CPU's where the engine's roundings reorder near-ties).
#[test]
fn fused_attention_over_two_stages_computes_the_same_bits() {
    if !gpu() {
        return;
    }
    let model = llama(256, 256, 2, 4, 2, 256);
    for (dt, prompt_len) in [(DType::BF16, 185), (DType::F32, 89)] {
        let (g, w) = compiled(&model, dt);
        let prompt = test_prompt(prompt_len);
        let run = |graphs: bool, attention_fused: bool| {
            let opts = EngineOptions { attention_fused, max_context: 256, ..test_options(graphs) };
            engine_run_with(&g, &w, &prompt, 16, opts)
        };
        let (l_sep, t_sep, _) = run(true, false);
        for graphs in [true, false] {
            let (l_f, t_f, _) = run(graphs, true);
            let what = format!("{dt}: fused attention (graphs: {graphs})");
            assert_same_bits(&what, (&l_f, &t_f), (&l_sep, &t_sep));
        }
        if dt == DType::F32 {
            compare_with_cpu(&g, &w, &prompt, &l_sep, &t_sep, "attn_two_stages_f32", 1e-4);
        }
    }
}

/// The streaming GEMV (on by default for short weight rows; this model's rows are all
/// short) computes the one-row products to rounding of the tiled GEMV (another
/// summation order), in f32 and bf16, graph and eager, and the engine still matches the
/// CPU executor; it launches as many kernels, and the step's timeline names streaming
/// kernels only when it is on.
#[test]
fn the_streaming_gemv_matches_the_tiled_gemv_and_the_cpu() {
    if !gpu() {
        return;
    }
    let prompt = test_prompt(7);
    for (dt, tol, close) in [(DType::F32, 1e-4, 1e-5), (DType::BF16, 3e-2, 2e-2)] {
        let (g, w) = setup(dt);
        let run = |graphs: bool, stream_gemv: bool| {
            engine_run_with(&g, &w, &prompt, 8, EngineOptions { stream_gemv, ..test_options(graphs) })
        };
        let (l_off, _, n_off) = run(true, false);
        for graphs in [true, false] {
            let (l_on, t_on, n_on) = run(graphs, true);
            assert_eq!(n_on, n_off, "{dt}: launches per decode step (graphs: {graphs})");
            for (i, (a, b)) in l_on.iter().zip(&l_off).enumerate() {
                let err = rel_l2(a, b);
                assert!(err < close, "{dt}: step {i}: streaming vs tiled GEMV rel L2 {err:.3e} (graphs: {graphs})");
            }
            compare_with_cpu(&g, &w, &prompt, &l_on, &t_on, &format!("stream_{}", dt.name()), tol);
        }
        // The timeline labels launches by kernel name.
        for on in [true, false] {
            let opts = EngineOptions { stream_gemv: on, trace: true, ..test_options(true) };
            let mut e = CudaEngine::new(g.clone(), w.clone(), opts).unwrap();
            e.prefill(std::slice::from_ref(&prompt)).unwrap();
            let names: Vec<String> = e.timeline(2).unwrap().into_iter().map(|(l, _, _)| l).collect();
            let streams = names.iter().filter(|l| l.starts_with("kiln_gemv_stream")).count();
            assert_eq!(streams > 0, on, "{dt}: streaming kernels in the decode step (on: {on}): {names:?}");
        }
    }
}

#[test]
fn graph_replay_equals_eager_and_batches_decode_like_single_sequences() {
    if !gpu() {
        return;
    }
    let (g, w) = setup(DType::F32);
    let (p1, p2) = (vec![5u32, 6, 7, 8], vec![200u32, 100, 50, 25]);
    let (l_graph, t_graph) = engine_run(&g, &w, &p1, 8, true, false);
    let (l_eager, t_eager) = engine_run(&g, &w, &p1, 8, false, false);
    assert_same_bits("replayed and eager launches", (&l_graph, &t_graph), (&l_eager, &t_eager));
    let (_, t2) = engine_run(&g, &w, &p2, 8, true, false);
    let opts = EngineOptions { max_batch: 2, max_context: 64, ..Default::default() };
    let mut e = CudaEngine::new(g.clone(), w.clone(), opts).unwrap();
    e.prefill(&[p1.clone(), p2.clone()]).unwrap();
    for _ in 0..8 {
        e.decode_step().unwrap();
    }
    let both = e.tokens().unwrap();
    assert_eq!(both, vec![t_graph, t2]);
}

#[test]
fn engine_errors_name_the_problem() {
    if !gpu() {
        return;
    }
    let (g, w) = setup(DType::F32);
    let opts = EngineOptions { max_batch: 1, max_context: 8, ..Default::default() };
    let mut e = CudaEngine::new(g, w, opts).unwrap();
    let err = e.decode_step().unwrap_err().to_string();
    assert!(err.contains("before prefill"), "{err}");
    let err = e.prefill(&[vec![1, 2], vec![3, 4]]).unwrap_err().to_string();
    assert!(err.contains("1 to 1"), "{err}");
    let err = e.prefill(&[vec![1; 8]]).unwrap_err().to_string();
    assert!(err.contains("context of 8"), "{err}");
    let err = e.prefill(&[vec![999]]).unwrap_err().to_string();
    assert!(err.contains("vocabulary of 256"), "{err}");
    e.prefill(&[vec![1, 2, 3, 4, 5, 6]]).unwrap();
    e.decode_step().unwrap();
    e.decode_step().unwrap();
    let err = e.decode_step().unwrap_err().to_string();
    assert!(err.contains("is full"), "{err}");
}

/// The text-level path on CUDA (`kiln_models::llm` drives the engine through the
/// `Decoder` trait: host-sampled tokens go back with `set_tokens`): seeded sampling with
/// temperature, top-k and top-p gives exactly the CPU generator's tokens and logprobs
/// (close), since both sample on the host from logits that agree.
#[test]
fn sampling_loop_over_the_engine_matches_the_cpu_generator() {
    use kiln::runtime::generate::generate_with;
    use kiln::runtime::sampling::SamplingParams;
    use std::ops::ControlFlow;
    if !gpu() {
        return;
    }
    let (g, w) = setup(DType::F32);
    let prompt = vec![11u32, 22, 33, 44, 55];
    for params in [
        SamplingParams::greedy(16),
        SamplingParams { max_tokens: 16, temperature: 0.8, top_k: 20, top_p: 0.9, seed: Some(7), ..Default::default() },
    ] {
        let cpu = Generator::new(CpuExecutor::new(g.clone(), w.clone()).unwrap(), 64).unwrap();
        let want = cpu.generate(&prompt, &params, |_| ControlFlow::Continue(())).unwrap();
        let opts = EngineOptions { max_batch: 1, max_context: 64, ..Default::default() };
        let mut e = CudaEngine::new(g.clone(), w.clone(), opts).unwrap();
        let got = generate_with(&mut e, &prompt, &params, |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(got.token_ids, want.token_ids, "temperature {}", params.temperature);
        for (a, b) in got.logprobs.iter().zip(&want.logprobs) {
            assert!((a - b).abs() < 1e-3, "logprob {a} vs {b}");
        }
        println!("kiln-check\tengine_sampling_loop\tT={}\ttokens\tmax_rel=0\trel_l2=0", params.temperature);
    }
}
