//! CPU-only checks of the prefill attention kernel: its parameter list (the decode
//! split-K kernel's roles without its workspaces, counters and split count), the symbol-table rendering of
//! the key count (never an argument), deterministic rendering, launch sizes, and errors
//! that name the culprit. The kernel itself runs in `runtime/tests/cuda_prefill.rs`.

use kiln_codegen::prefill::*;
use kiln_codegen::{Grid, Kernel, Role};
use kiln_ops::{DType, Dim, Sym};

fn roles(k: &Kernel) -> Vec<Role> {
    k.sig.params.iter().map(|p| p.role).collect()
}

fn table() -> [Sym; 3] {
    [Sym::new("batch"), Sym::new("past"), Sym::new("seq")]
}

#[test]
fn prefill_parameters_and_key_count_from_the_symbol_table() {
    let keys = &Dim::sym("past") + &Dim::sym("seq");
    let k = attention_prefill(DType::BF16, 64, &keys, &table()).unwrap();
    // The decode kernel's parameters without its split-K ones (one list builds both:
    // `decode::cache_attention_params`; codegen/tests/decode.rs spells it out).
    let decode = kiln_codegen::decode::attention_decode(DType::BF16, 4, &keys, &table()).unwrap();
    let split_k = [Role::Out(1), Role::Out(2), Role::Counters, Role::Splits, Role::Early];
    let want: Vec<Role> = roles(&decode).into_iter().filter(|r| !split_k.contains(r)).collect();
    assert_eq!(roles(&k), want);
    let sig = k.sig.signature();
    assert!(!roles(&k).contains(&Role::Keys) && !roles(&k).contains(&Role::Splits));
    assert!(!sig.contains(" keys"), "{sig}");
    assert!(sig.contains("kiln_bf16* out, const kiln_bf16* in0, const kiln_bf16* in1"), "{sig}");
    assert!(sig.contains("const i64* syms"), "{sig}");
    assert!(sig.contains("float scale, int mask_kind, i64 window)"), "{sig}");
    assert!(k.source.contains("#define KILN_KEYS (syms[1] + syms[2])"), "keys expression missing");
    assert!(k.source.contains("#define PF_D 64") && k.source.contains("#define PF_F16 0"));
    assert!(!k.source.contains("KILN_SIGNATURE"));
    // Tensor cores: the bf16 mma and ldmatrix (plain and transposed) are in the source.
    assert!(k.source.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
    assert!(k.source.contains("ldmatrix.sync.aligned.m8n8.x4.shared.b16"));
    assert!(k.source.contains("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"));
    assert_eq!(k.grid, Grid::BlockPerItem { threads: 128 });

    let h = attention_prefill(DType::F16, 128, &keys, &table()).unwrap();
    assert!(h.sig.signature().contains("kiln_f16* out, const kiln_f16* in0"));
    assert!(h.source.contains("#define PF_D 128") && h.source.contains("#define PF_F16 1"));

    // The name identifies dtype, head dim and keys expression.
    let k2 = attention_prefill(DType::BF16, 64, &Dim::sym("past"), &table()).unwrap();
    assert!(k2.source.contains("#define KILN_KEYS (syms[1])"));
    let names = [
        &k.sig.name,
        &h.sig.name,
        &k2.sig.name,
        &attention_prefill(DType::BF16, 128, &keys, &table()).unwrap().sig.name,
    ];
    for (i, a) in names.iter().enumerate() {
        for b in &names[i + 1..] {
            assert_ne!(a, b);
        }
    }
    // The 2-warp variant: 64 threads, another name.
    let w2 =
        attention_prefill_variant(DType::BF16, 64, PrefillTuning { warps: 2, ..Default::default() }, &keys, &table())
            .unwrap();
    assert_eq!(w2.grid, Grid::BlockPerItem { threads: 64 });
    assert!(w2.source.contains("#define PF_MW 2") && k.source.contains("#define PF_MW 1"));
    assert_ne!(w2.sig.name, k.sig.name);
    // Launch bounds only when asked for.
    assert!(!k.source.contains("__launch_bounds__"));
    let b5 = attention_prefill_variant(
        DType::BF16,
        64,
        PrefillTuning { min_blocks: 5, ..Default::default() },
        &keys,
        &table(),
    )
    .unwrap();
    assert!(b5.source.contains(&format!("__global__ void __launch_bounds__(128, 5) {}(", b5.sig.name)));
    // A tuned variant still waits for the previous kernel (programmatic dependent launch).
    assert!(b5.waits_for_previous() && k.waits_for_previous());
    assert!(!b5.source.contains("KILN_SIGNATURE"));
    assert_ne!(b5.sig.name, k.sig.name);
    // Two stages: twice the tiles, head dims up to 80.
    let two = PrefillTuning { stages: 2, ..Default::default() };
    let s2 = attention_prefill_variant(DType::BF16, 64, two, &keys, &table()).unwrap();
    assert!(s2.source.contains("#define PF_STAGES 2") && k.source.contains("#define PF_STAGES 1"));
    assert_ne!(s2.sig.name, k.sig.name);
    let e = attention_prefill_variant(DType::BF16, 96, two, &keys, &table()).unwrap_err().0;
    assert!(e.contains("2 stages") && e.contains("head_dim 96"), "{e}");
}

#[test]
fn prefill_rendering_is_deterministic() {
    let keys = &Dim::sym("past") + &Dim::sym("seq");
    let a = attention_prefill(DType::BF16, 128, &keys, &table()).unwrap();
    let b = attention_prefill(DType::BF16, 128, &keys, &table()).unwrap();
    assert_eq!(a.sig, b.sig);
    assert_eq!(a.source, b.source);
    // A stable name: FNV-1a of the keys expression, not a per-process hash.
    assert!(a.sig.name.starts_with("kiln_attn_prefill_bf16_d128_"), "{}", a.sig.name);
    assert_eq!(a.sig.name.len(), "kiln_attn_prefill_bf16_d128_".len() + 16);
}

#[test]
fn prefill_errors_name_the_culprit() {
    let table = [Sym::new("past")];
    let keys = Dim::sym("past");
    let e = attention_prefill(DType::F32, 64, &keys, &table).unwrap_err().0;
    assert!(e.contains("attention_prefill") && e.contains("f32"), "{e}");
    let e = attention_prefill(DType::I64, 64, &keys, &table).unwrap_err().0;
    assert!(e.contains("i64"), "{e}");
    let e = attention_prefill(DType::BF16, 80 + 4, &keys, &table).unwrap_err().0;
    assert!(e.contains("head_dim 84"), "{e}");
    let e = attention_prefill(DType::BF16, 256, &keys, &table).unwrap_err().0;
    assert!(e.contains("head_dim 256") && e.contains("16..=128"), "{e}");
    assert!(attention_prefill(DType::BF16, 0, &keys, &table).unwrap_err().0.contains("head_dim 0"));
    let e = attention_prefill(DType::BF16, 64, &Dim::sym("seq"), &table).unwrap_err().0;
    assert!(e.contains("`seq`"), "{e}");
    let e =
        attention_prefill_variant(DType::BF16, 128, PrefillTuning { warps: 2, ..Default::default() }, &keys, &table)
            .unwrap_err()
            .0;
    assert!(e.contains("2 warps") && e.contains("head_dim 128"), "{e}");

    assert!(attention_prefill_check(DType::BF16, 32, 8, 64, 64).is_ok());
    assert!(attention_prefill_check(DType::F16, 9, 3, 128, 128).is_ok());
    assert!(attention_prefill_check(DType::BF16, 4, 4, 96, 96).is_ok());
    let e = attention_prefill_check(DType::F32, 32, 8, 64, 64).unwrap_err().0;
    assert!(e.contains("f32"), "{e}");
    let e = attention_prefill_check(DType::BF16, 9, 2, 64, 64).unwrap_err().0;
    assert!(e.contains("9 query heads") && e.contains("2 kv heads"), "{e}");
    assert!(attention_prefill_check(DType::BF16, 4, 0, 64, 64).is_err());
    let e = attention_prefill_check(DType::BF16, 4, 4, 64, 128).unwrap_err().0;
    assert!(e.contains("head_dim 64 != value_dim 128"), "{e}");
    let e = attention_prefill_check(DType::BF16, 4, 4, 100, 100).unwrap_err().0;
    assert!(e.contains("head_dim 100"), "{e}");
    let e = attention_prefill_check(DType::BF16, 4, 4, 64, 200).unwrap_err().0;
    assert!(e.contains("value_dim 200"), "{e}");
}

#[test]
fn prefill_launch_sizes() {
    // One block per (batch, query head, 64 query rows).
    assert_eq!(PREFILL_QUERY_TILE, 64);
    assert_eq!(attention_prefill_items(1, 2048, 32, 8), 1024);
    assert_eq!(attention_prefill_items(2, 130, 9, 3), 54);
    assert_eq!(attention_prefill_items(1, 1, 4, 4), 4);
    assert_eq!(attention_prefill_items(3, 64, 4, 2), 12);
    let k = attention_prefill(DType::BF16, 64, &Dim::sym("past"), &[Sym::new("past")]).unwrap();
    assert_eq!(k.grid.dims(attention_prefill_items(1, 2048, 32, 8)), (1024, 128));
}
