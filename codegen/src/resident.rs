//! Kernels of the device-resident decode loop (the runtime's `CudaEngine`): the KV-cache
//! append that replaces `concat(past, new)` when the cache lives on the device, `arange`
//! with a start read from the device symbol table, and the step-end bookkeeping. Each
//! reads symbolic sizes through [`Role::Syms`], so a decode step captured as a CUDA
//! graph stays valid while `past` grows.

use crate::kernels::{render, word, CodegenError, Grid, Kernel};
use crate::params::{KernelSig, ParamTy, Role};
use crate::symbols::{dim_to_c, sym_index};
use kiln_ops::{DType, Dim, Sym};

const KV_APPEND: &str = include_str!("kernels/kv_append.cu");
const ARANGE_SYMS: &str = include_str!("kernels/arange_syms.cu");
const STEP_END: &str = include_str!("kernels/step_end.cu");

/// Appends new rows of `d` into a resident cache at row `at` (rendered over `syms`).
/// Parameters: out (cache), in0 (new rows, contiguous `[batch, seq, inner]`), syms,
/// n (`batch·seq·inner`), seq, inner (elements per row), batch_stride (elements).
pub fn kv_append(d: DType, at: &Dim, syms: &[Sym]) -> Result<Kernel, CodegenError> {
    let w = word(d)?;
    let at_c = dim_to_c(at, syms)?;
    let sig = KernelSig::new(
        format!("kiln_kv_append_b{}_{}", d.bits(), crate::symbols::stable_hash_hex(&at_c)),
        vec![
            (Role::Out(0), ParamTy::ptr(w)),
            (Role::In(0), ParamTy::const_ptr(w)),
            (Role::Syms, ParamTy::const_ptr("i64")),
            (Role::N, ParamTy::I64),
            (Role::Seq, ParamTy::I64),
            (Role::Inner, ParamTy::I64),
            (Role::CacheBatchStride, ParamTy::I64),
        ],
    );
    Ok(render(sig, KV_APPEND, &[("KILN_AT", at_c)], Grid::Elementwise { threads: 256 }))
}

/// `arange` whose start is a symbolic dim read from the device table. Parameters: out
/// (i64), syms, n.
pub fn arange_syms(start: &Dim, syms: &[Sym]) -> Result<Kernel, CodegenError> {
    let start_c = dim_to_c(start, syms)?;
    let sig = KernelSig::new(
        format!("kiln_arange_syms_{}", crate::symbols::stable_hash_hex(&start_c)),
        vec![(Role::Out(0), ParamTy::ptr("i64")), (Role::Syms, ParamTy::const_ptr("i64")), (Role::N, ParamTy::I64)],
    );
    Ok(render(sig, ARANGE_SYMS, &[("KILN_START", start_c)], Grid::Elementwise { threads: 256 }))
}

/// The step-end kernel: records the sampled ids (`in0`, i64 `[n]`) in the history
/// (`out`, i64 `[n, len]`) at the counter (`out1`, i64 `[1]`), bumps the counter and
/// advances `past` by `seq` in the (mutable) symbol table. Launch with one block of
/// `n` threads (`n <= 1024`): `Grid::BlockPerItem` with one item.
pub fn step_end(past: Sym, seq: Sym, syms: &[Sym]) -> Result<Kernel, CodegenError> {
    step_end_kernel(past, seq, syms, false)
}

/// WIP (`KILN_GREEDY_KEY`): [`step_end`] taking the sampled ids as the keys of
/// `decode::greedy_key` (`out3`, u64 `[n]`): it writes the ids (`out2`, i64 `[n]`, the
/// next step's input ids), records them, and zeroes the keys. Parameters: out (history),
/// out1 (counter), out2 (ids), out3 (keys), syms, n, len.
pub fn step_end_key(past: Sym, seq: Sym, syms: &[Sym]) -> Result<Kernel, CodegenError> {
    step_end_kernel(past, seq, syms, true)
}

/// The step end's kernel: `key` selects the form that reads the sampled ids from the
/// greedy keys (`out3`) instead of `in0`.
fn step_end_kernel(past: Sym, seq: Sym, syms: &[Sym], key: bool) -> Result<Kernel, CodegenError> {
    let (p, q) = (sym_index(syms, &past)?, sym_index(syms, &seq)?);
    let mut params = vec![(Role::Out(0), ParamTy::ptr("i64")), (Role::Out(1), ParamTy::ptr("i64"))];
    if key {
        params.push((Role::Out(2), ParamTy::ptr("i64")));
        params.push((Role::Out(3), ParamTy::ptr("unsigned long long")));
    } else {
        params.push((Role::In(0), ParamTy::const_ptr("i64")));
    }
    params.extend([(Role::Syms, ParamTy::ptr("i64")), (Role::N, ParamTy::I64), (Role::Len, ParamTy::I64)]);
    let name = if key { "kiln_step_end_key" } else { "kiln_step_end" };
    Ok(render(
        KernelSig::new(format!("{name}_{p}_{q}"), params),
        STEP_END,
        &[("KILN_PAST", p.to_string()), ("KILN_SEQ", q.to_string()), ("KILN_STEP_KEY", (key as u8).to_string())],
        Grid::BlockPerItem { threads: 1024 },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_kernels_read_sizes_from_the_symbol_table() {
        let table = [Sym::new("batch"), Sym::new("past"), Sym::new("seq")];
        let k = kv_append(DType::BF16, &Dim::sym("past"), &table).unwrap();
        assert!(k.source.contains("#define KILN_AT (syms[1])"), "{}", k.source);
        assert!(k.sig.signature().contains("unsigned short* out"), "{}", k.sig.signature());
        let a = arange_syms(&Dim::sym("past"), &table).unwrap();
        assert!(a.source.contains("#define KILN_START (syms[1])"));
        let e = step_end(Sym::new("past"), Sym::new("seq"), &table).unwrap();
        assert!(e.source.contains("#define KILN_PAST 1") && e.source.contains("#define KILN_SEQ 2"));
        assert!(e.sig.signature().contains("i64* syms"));
        assert!(step_end(Sym::new("nope"), Sym::new("seq"), &table).is_err());
    }
}
