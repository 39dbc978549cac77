//! CPU-only checks of the decode kernels: parameter lists (the launch order the runtime
//! packs), the symbol-table rendering of the attention key count, launch and workspace
//! sizes, and the errors. The kernels themselves run in `runtime/tests/cuda_decode.rs`.

use kiln_codegen::decode::*;
use kiln_codegen::{Grid, Kernel, Role};
use kiln_ops::{DType, Dim, Sym};

mod common;
use common::attention_layer;

fn roles(k: &Kernel) -> Vec<Role> {
    k.sig.params.iter().map(|p| p.role).collect()
}

#[test]
fn gemv_parameters_and_launch() {
    let k = gemv(DType::BF16, DType::BF16, DType::BF16).unwrap();
    assert_eq!(roles(&k), [Role::Out(0), Role::In(0), Role::In(1), Role::MatM, Role::MatN, Role::MatK]);
    assert_eq!(
        k.sig.signature(),
        "extern \"C\" __global__ void kiln_gemv_bf16_bf16_bf16(kiln_bf16* out, const kiln_bf16* \
         in0, const kiln_bf16* in1, i64 m, i64 n, i64 k)"
    );
    assert!(k.source.contains("#define KILN_VEC 8") && k.source.contains("#define KILN_RESIDUAL 0"));
    assert!(!k.source.contains("KILN_SIGNATURE"));

    let r = gemv_residual(DType::F32, DType::BF16, DType::F16).unwrap();
    assert_eq!(roles(&r), [Role::Out(0), Role::In(0), Role::In(1), Role::In(2), Role::MatM, Role::MatN, Role::MatK]);
    let sig = r.sig.signature();
    // x f32, w bf16, y and r f16; the vector width follows w.
    assert!(sig.contains("kiln_f16* out, const float* in0"), "{sig}");
    assert!(sig.contains("const kiln_bf16* in1, const kiln_f16* in2"), "{sig}");
    assert!(r.source.contains("#define KILN_VEC 8") && r.source.contains("#define KILN_RESIDUAL 1"));
    assert_ne!(r.sig.name, gemv(DType::F32, DType::BF16, DType::F16).unwrap().sig.name);
    assert!(gemv(DType::F32, DType::F32, DType::F32).unwrap().source.contains("#define KILN_VEC 4"));

    // One block per 16 output columns, 256 threads.
    assert_eq!(gemv_items(1, 8192), 512);
    assert_eq!(gemv_items(8, 129), 9);
    assert_eq!(gemv_items(5, 16), 1);
    assert_eq!(k.grid, Grid::BlockPerItem { threads: 256 });
    assert_eq!(k.grid.dims(gemv_items(1, 2048)), (128, 256));
    assert_eq!(GEMV_MAX_M, 8);
}

#[test]
fn gemv_rejects_non_float_dtypes_by_name() {
    let e = gemv(DType::BF16, DType::I8, DType::BF16).unwrap_err().0;
    assert!(e.contains("gemv weight w") && e.contains("i8"), "{e}");
    let e = gemv_residual(DType::BF16, DType::BF16, DType::I32).unwrap_err().0;
    assert!(e.contains("gemv_residual output y") && e.contains("i32"), "{e}");
}

#[test]
fn attention_decode_reads_the_key_count_from_the_symbol_table() {
    let table = [Sym::new("batch"), Sym::new("past"), Sym::new("seq")];
    let keys = &Dim::sym("past") + &Dim::sym("seq");
    let p = attention_decode(DType::BF16, 4, &keys, &table).unwrap();
    assert_eq!(
        roles(&p),
        [
            Role::Out(0),
            Role::Out(1),
            Role::Out(2),
            Role::Counters,
            Role::In(0),
            Role::In(1),
            Role::In(2),
            Role::Syms,
            Role::Batch,
            Role::Seq,
            Role::Heads,
            Role::KvHeads,
            Role::HeadDim,
            Role::ValueDim,
            Role::KBatchStride,
            Role::VBatchStride,
            Role::Splits,
            Role::Early,
            Role::Scale,
            Role::MaskKind,
            Role::Window,
        ]
    );
    // It waits for the previous kernel itself: at once, or (early) after issuing the
    // copies of the rows of earlier steps.
    assert!(p.waits_for_previous() && !p.source.contains("kiln_grid_entry();"));
    assert!(p.source.contains("if (!early) kiln_grid_wait();"));
    let sig = p.sig.signature();
    assert!(!roles(&p).contains(&Role::Keys));
    assert!(!sig.contains(" keys"), "{sig}");
    assert!(
        sig.contains(
            "kiln_bf16* out, float* out1, float* out2, \
             unsigned int* counters, const kiln_bf16* in0"
        ),
        "{sig}"
    );
    assert!(sig.contains("const i64* syms"), "{sig}");
    assert!(sig.contains("float scale, int mask_kind, i64 window)"), "{sig}");
    assert!(p.source.contains("#define KILN_KEYS (syms[1] + syms[2])"), "keys expression missing");
    assert_eq!(p.grid, Grid::BlockPerItem { threads: 256 }); // tile 4: 8 warps

    // The kernel's name identifies its keys expression.
    let p2 = attention_decode(DType::BF16, 4, &Dim::sym("past"), &table).unwrap();
    assert!(p2.source.contains("#define KILN_KEYS (syms[1])"));
    assert_ne!(p.sig.name, p2.sig.name);
    // f32 has 4 elements per 16 bytes, so two vectors per lane for head dim 256, four
    // for tiles of up to 4 queries (which use fewer lanes per key).
    let p3 = attention_decode(DType::F32, 4, &keys, &table).unwrap();
    assert!(p3.source.contains("#define KILN_VEC 4") && p3.source.contains("#define AD_NVL 4"));
    assert!(p.source.contains("#define KILN_VEC 8") && p.source.contains("#define AD_NVL 2"));
    let p8 = attention_decode(DType::BF16, 8, &keys, &table).unwrap();
    assert!(p8.source.contains("#define AD_NVL 1") && p8.source.contains("#define AD_WARPS 4"));
    assert_eq!(p8.grid, Grid::BlockPerItem { threads: 128 });
    // The query tile is the GQA group's (4), and named: group 3 makes another kernel.
    assert!(p.source.contains("#define AD_QT 4") && p.sig.name.contains("_q4_"), "{}", p.sig.name);
    let p4 = attention_decode(DType::BF16, 3, &keys, &table).unwrap();
    assert!(p4.source.contains("#define AD_QT 3") && p4.sig.name.contains("_q3_"));
}

#[test]
fn attention_decode_errors_name_the_culprit() {
    let table = [Sym::new("past")];
    let e = attention_decode(DType::BF16, 4, &Dim::sym("seq"), &table).unwrap_err().0;
    assert!(e.contains("`seq`"), "{e}");
    let e = attention_decode(DType::BF16, 0, &Dim::sym("past"), &table).unwrap_err().0;
    assert!(e.contains("group of 0"), "{e}");
    let e = attention_decode(DType::I64, 4, &Dim::sym("past"), &table).unwrap_err().0;
    assert!(e.contains("attention_decode") && e.contains("i64"), "{e}");
    assert!(attention_decode_check(32, 8, 128, 128, 16).is_ok());
    let e = attention_decode_check(9, 2, 64, 64, 1).unwrap_err().0;
    assert!(e.contains("9 query heads") && e.contains("2 kv heads"), "{e}");
    assert!(attention_decode_check(4, 0, 64, 64, 1).is_err());
    let e = attention_decode_check(4, 4, 64, 320, 1).unwrap_err().0;
    assert!(e.contains("value_dim 320"), "{e}");
    assert!(attention_decode_check(4, 4, 0, 64, 1).unwrap_err().0.contains("head_dim 0"));
    assert!(attention_decode_check(4, 4, 64, 64, 0).unwrap_err().0.contains("splits"));
}

#[test]
fn attention_decode_sizes() {
    // (partial outputs, (max, sum) pairs) = b·s·h·splits·(dv, 2).
    assert_eq!(attention_decode_workspace(1, 1, 32, 128, 16), (65536, 1024));
    assert_eq!(attention_decode_workspace(3, 2, 9, 64, 5), (17280, 540));
    assert_eq!(attention_decode_workspace(2, 1, 4, 80, 1), (640, 16));
    // Query tiles: the largest divisor of the group up to 8, so tiles are full.
    let tiles: Vec<usize> = [1, 3, 4, 7, 8, 9, 12, 16, 0].iter().map(|&g| attention_decode_query_tile(g)).collect();
    assert_eq!(tiles, [1, 3, 4, 7, 8, 3, 6, 8, 1]);
    // Blocks: b·kh·(s·h/kh / tile)·splits; counters: one per (b, kv head, tile).
    assert_eq!(attention_decode_items(1, 1, 32, 8, 16), 128);
    assert_eq!(attention_decode_items(3, 2, 9, 3, 5), 90); // tile 3: 2 tiles of the 6 pairs
    assert_eq!(attention_decode_items(1, 2, 32, 2, 4), 32); // 32 (row, head) pairs per kv head: 4 tiles
    assert_eq!(attention_decode_items(2, 1, 4, 4, 3), 24);
    assert_eq!(attention_decode_counters(1, 2, 32, 2), 8);
    assert_eq!(attention_decode_counters(3, 2, 9, 3), 18);
    assert_eq!(ATTENTION_DECODE_QUERY_TILE, 8);
    // Splits: about two waves of blocks, never more than the keys, in 1..=256.
    assert_eq!(attention_decode_splits(1, 1, 32, 8, 4096, 132), 33);
    assert_eq!(attention_decode_splits(1, 1, 32, 8, 10, 132), 10);
    assert_eq!(attention_decode_splits(64, 1, 32, 8, 4096, 132), 1);
    assert_eq!(attention_decode_splits(1, 1, 1, 1, 1 << 20, 1000), 256);
}

#[test]
fn attention_decode_one_head_tiles() {
    assert_eq!(ATTENTION_DECODE_MIN_BLOCKS, 32);
    // Llama-3.2-1B (32 heads, 8 kv heads): batch 1 has 8 group tiles, too few: one head
    // per block (32 blocks); batch 8 has 64: whole groups.
    assert_eq!(attention_decode_pick_tile(1, 1, 32, 8), 1);
    assert_eq!(attention_decode_pick_tile(8, 1, 32, 8), 4);
    // SmolLM2 (9 heads, 3 kv heads): 3 and 24 group tiles at batch 1 and 8; 192 at 64.
    assert_eq!(attention_decode_pick_tile(1, 1, 9, 3), 1);
    assert_eq!(attention_decode_pick_tile(8, 1, 9, 3), 1);
    assert_eq!(attention_decode_pick_tile(64, 1, 9, 3), 3);
    // A prefill of 16 rows on the 1B shape: 8·16 = 128 group tiles.
    assert_eq!(attention_decode_pick_tile(1, 16, 32, 8), 4);
    // Counts with tile 1: one block per (b, row, head) and split.
    assert_eq!(attention_decode_counters_tiled(1, 1, 32, 8, 1), 32);
    assert_eq!(attention_decode_items_tiled(3, 2, 9, 3, 5, 1), 3 * 2 * 9 * 5);
    assert_eq!(attention_decode_items_tiled(3, 2, 9, 3, 5, 3), attention_decode_items(3, 2, 9, 3, 5));
    assert_eq!(attention_decode_splits_tiled(1, 1, 32, 8, 4096, 132, 1), 9); // 264 / 32 blocks
                                                                             // The kernels differ by name; a tile must divide the group.
    let keys = Dim::sym("t");
    let syms = [Sym::new("t")];
    let k4 = attention_decode_tiled(DType::BF16, 4, 4, &keys, &syms).unwrap();
    let k1 = attention_decode_tiled(DType::BF16, 4, 1, &keys, &syms).unwrap();
    assert_eq!(k4.sig.name, attention_decode(DType::BF16, 4, &keys, &syms).unwrap().sig.name);
    assert_ne!(k4.sig.name, k1.sig.name);
    assert!(k1.source.contains("#define AD_QT 1\n"), "tile 1 kernel");
    let e = attention_decode_tiled(DType::BF16, 4, 3, &keys, &syms).unwrap_err().0;
    assert!(e.contains("query tile of 3") && e.contains("group of 4"), "{e}");
}

#[test]
fn sample_parameters() {
    let k = sample(DType::F32).unwrap();
    assert_eq!(
        roles(&k),
        [
            Role::Out(0),
            Role::Out(1),
            Role::In(0),
            Role::Step,
            Role::N,
            Role::Len,
            Role::Temperature,
            Role::TopK,
            Role::TopP,
            Role::Seed,
        ]
    );
    assert_eq!(
        k.sig.signature(),
        "extern \"C\" __global__ void kiln_sample_f32(i64* out, float* out1, const float* \
         in0, i64* step, i64 n, i64 len, float temperature, i64 top_k, float top_p, i64 seed)"
    );
    assert_eq!(k.grid, Grid::BlockPerItem { threads: SAMPLE_THREADS });
    assert!(k.source.contains(&format!("#define KILN_THREADS {SAMPLE_THREADS}")));
    assert_eq!(k.grid.dims(sample_items(3)), (3, 512));
    assert!(sample(DType::BF16).unwrap().sig.signature().contains("const kiln_bf16* in0"));
    assert!(sample(DType::Bool).unwrap_err().0.contains("sample logits"));
}

#[test]
fn gemv_one_row_kernels_size_their_accumulators() {
    // The batch-1 split keeps one accumulator per weight row (GV_MAX_M 1); the split for
    // more rows takes up to GEMV_MAX_M. Names say which, so both can be loaded at once.
    let one = GemvConfig::for_rows(1);
    let more = GemvConfig::for_rows(2);
    assert_eq!((one.max_rows, more.max_rows), (1, GEMV_MAX_M));
    assert_eq!((one.tag().as_str(), more.tag().as_str()), ("w16r1u8m1", "w8r2u4"));
    let k1 = gemv_with(DType::BF16, DType::BF16, DType::BF16, one).unwrap();
    let k8 = gemv_with(DType::BF16, DType::BF16, DType::BF16, more).unwrap();
    assert!(k1.source.contains("#define GV_MAX_M 1\n") && k8.source.contains("#define GV_MAX_M 8\n"));
    assert!(k1.sig.name.ends_with("_w16r1u8m1"), "{}", k1.sig.name);
    assert_ne!(k1.sig.name, k8.sig.name);
    for bad in [0, GEMV_MAX_M + 1] {
        let e = gemv_with(DType::BF16, DType::BF16, DType::BF16, GemvConfig { max_rows: bad, ..one }).unwrap_err().0;
        assert!(e.contains("rows of x"), "{e}");
    }
}

/// Decode attention that computes its producers: the rule finds the RoPE group of q and
/// the two fused appends, the kernel takes their inputs in place of q and the caches
/// (the appends' `past` inputs are the caches), carries the producers' code (RoPE's
/// rotate-half reads of qkv) and compiles; a tile of one head renders too, and a graph
/// whose q is read elsewhere is refused by name.
#[test]
fn fused_decode_attention_takes_the_producers_inputs() {
    let g = attention_layer(DType::BF16);
    let syms = kiln_codegen::symbols::graph_symbols(&g);
    let common::AttentionParts { node: attn, producers: p, q, k, v, keys } = common::attention_parts(&g);
    let kern = attention_decode_fused(DType::BF16, 3, 3, &keys, &syms, &q, &k, &v).unwrap();
    let plain = attention_decode(DType::BF16, 3, &keys, &syms).unwrap();
    let (nq, nk, nv) = (q.inputs.len(), k.inputs.len(), v.inputs.len());
    let r = roles(&kern);
    let pr = roles(&plain);
    // The producers' inputs replace q, k, v; the rest of the list is the plain kernel's.
    assert_eq!(r.len(), pr.len() - 3 + nq + nk + nv);
    assert_eq!(&r[..4], &pr[..4]);
    assert_eq!(&r[4 + nq + nk + nv..], &pr[7..]);
    assert!(r[4..4 + nq + nk + nv].iter().enumerate().all(|(i, x)| *x == Role::In(i as u8)));
    let kpast = kiln_codegen::fused_append(&k).unwrap().past_input;
    let vpast = kiln_codegen::fused_append(&v).unwrap().past_input;
    assert!(kern.source.contains(&format!("#define AD_KC in{}", nq + kpast)), "{}", kern.source);
    assert!(kern.source.contains(&format!("#define AD_VC in{}", nq + nk + vpast)));
    assert!(kern.source.contains("#define AD_FUSED 1") && !kern.source.contains("KILN_FUSED_Q"));
    assert!(!plain.source.contains("#define AD_FUSED"));
    assert_ne!(kern.sig.name, plain.sig.name);
    assert_eq!(kern.dynamic_smem, plain.dynamic_smem);
    let single = attention_decode_fused(DType::BF16, 3, 1, &keys, &syms, &q, &k, &v).unwrap();
    // The graph-reading form (engine, plan, viewer) renders the same kernels.
    let (from_graph, found) = attention_decode_fused_in(&g, attn, None, &syms).unwrap();
    assert_eq!((from_graph.source.as_str(), found), (kern.source.as_str(), p));
    assert_eq!(attention_decode_fused_in(&g, attn, Some(1), &syms).unwrap().0.source, single.source);
    assert_ne!(single.sig.name, kern.sig.name);
    // Deterministic: the same graph renders the same kernel.
    let again = attention_decode_fused(DType::BF16, 3, 3, &keys, &syms, &q, &k, &v).unwrap();
    assert_eq!(again.source, kern.source);
    if kiln_codegen::nvrtc::nvrtc_present() {
        let f32_graph = attention_layer(DType::F32);
        let p32 = common::attention_parts(&f32_graph);
        let s32 = kiln_codegen::symbols::graph_symbols(&f32_graph);
        let k32 = attention_decode_fused(DType::F32, 3, 3, &keys, &s32, &p32.q, &p32.k, &p32.v).unwrap();
        let c = kiln_codegen::Compiler::new((9, 0), None).unwrap();
        c.compile_all(&[&kern, &single, &plain, &k32]).unwrap_or_else(|e| panic!("{e}"));
    } else {
        println!("skipping the NVRTC compile: libnvrtc could not be loaded");
    }
    // Not an attention node; attention whose q is also a graph output.
    let e = attention_producers(&g, p.q).unwrap_err().0;
    assert!(e.contains("not an attention node"), "{e}");
    let mut g2 = g.clone();
    g2.set_output("q", kiln_graph::Value::new(p.q, 0)).unwrap();
    let e = attention_producers(&g2, attn).unwrap_err().0;
    assert!(e.contains("q") && e.contains("graph output"), "{e}");
}

/// The streaming GEMV: the plain GEMV's parameters, its k baked in (x staged whole),
/// a ring of weight items per warp in dynamic shared memory, blocks up to one per
/// multiprocessor; rows it cannot take are refused by name; it compiles for sm_90.
#[test]
fn the_streaming_gemv_takes_the_gemv_parameters_and_compiles() {
    let k = gemv_stream(DType::BF16, DType::BF16, DType::BF16, 8192).unwrap();
    let plain = gemv(DType::BF16, DType::BF16, DType::BF16).unwrap();
    assert_eq!(roles(&k), roles(&plain));
    assert_eq!(k.sig.name, "kiln_gemv_stream_bf16_bf16_bf16_k8192");
    assert_eq!(k.grid, Grid::BlockPerItem { threads: 32 * GEMV_STREAM_WARPS as u32 });
    assert_eq!(k.dynamic_smem as usize, GEMV_STREAM_WARPS * GEMV_STREAM_STAGES * GEMV_STREAM_VECTORS * 16 + 4 * 8192);
    assert!(k.dynamic_smem <= 227 << 10, "fits a multiprocessor");
    assert!(k.waits_for_previous(), "a manual entry that waits");
    assert!(k.source.contains("#define GS_K 8192"));
    assert_eq!(gemv_stream_items(2048, 132), 132);
    assert_eq!(gemv_stream_items(576, 132), 72);
    assert_eq!(gemv_stream_items(1, 132), 1);
    assert!(gemv_stream_fits(DType::BF16, 576) && !gemv_stream_fits(DType::BF16, 577));
    // The engine streams rows of at most 2 KiB (SmolLM2's 576, not the 1B's 2,048).
    assert!(gemv_stream_pays(DType::BF16, 576) && gemv_stream_pays(DType::BF16, 1024));
    assert!(!gemv_stream_pays(DType::BF16, 1536) && !gemv_stream_pays(DType::BF16, 2048));
    assert!(gemv_stream_pays(DType::F32, 512) && !gemv_stream_pays(DType::F32, 1024));
    assert!(!gemv_stream_pays(DType::BF16, 577), "whole 16-byte vectors only");
    assert!(!gemv_stream_fits(DType::BF16, GEMV_STREAM_MAX_K + 8) && gemv_stream_fits(DType::F32, 4));
    let e = gemv_stream(DType::BF16, DType::BF16, DType::BF16, 100).unwrap_err().0;
    assert!(e.contains("gemv_stream") && e.contains("100"), "{e}");
    let e = gemv_stream(DType::BF16, DType::I8, DType::BF16, 64).unwrap_err().0;
    assert!(e.contains("gemv_stream weight w") && e.contains("i8"), "{e}");
    if kiln_codegen::nvrtc::nvrtc_present() {
        let c = kiln_codegen::Compiler::new((9, 0), None).unwrap();
        let more = [
            gemv_stream(DType::BF16, DType::BF16, DType::BF16, 576).unwrap(),
            gemv_stream(DType::F32, DType::F32, DType::F32, 1000).unwrap(),
            gemv_stream(DType::F16, DType::F16, DType::F32, 2048).unwrap(),
        ];
        c.compile_all(&[&k, &more[0], &more[1], &more[2]]).unwrap_or_else(|e| panic!("{e}"));
    } else {
        println!("skipping the NVRTC compile: libnvrtc could not be loaded");
    }
}
