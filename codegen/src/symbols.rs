//! The device symbol table: kernels that must not take a size as an argument (so that a
//! captured CUDA graph stays valid when `past` grows) read symbol values from a device
//! array `syms` (parameter [`crate::Role::Syms`]). Symbol `i` of that array is the
//! `i`-th of [`graph_symbols`]; [`dim_to_c`] renders a [`Dim`] as a C expression over it.

use crate::kernels::CodegenError;
use kiln_graph::Graph;
use kiln_ops::{Dim, Sym};

/// Every symbol the graph's types mention, sorted by name (the table's order).
pub fn graph_symbols(g: &Graph) -> Vec<Sym> {
    let mut syms: Vec<Sym> = Vec::new();
    for n in g.topo_order() {
        let node = g.node(n);
        for t in &node.outputs {
            for d in t.shape.dims() {
                syms.extend(d.symbols());
            }
        }
    }
    syms.sort();
    syms.dedup();
    syms
}

/// `d` as a C expression of type `i64`, reading symbol `s` as `syms[i]` where `i` is its
/// position in `table`. Errors if `d` mentions a symbol the table lacks.
pub fn dim_to_c(d: &Dim, table: &[Sym]) -> Result<String, CodegenError> {
    let mut parts: Vec<String> = Vec::new();
    for (mono, coef) in d.terms() {
        let mut factors: Vec<String> = Vec::new();
        if mono.is_empty() || coef != 1 {
            factors.push(format!("(i64){coef}"));
        }
        for s in mono {
            factors.push(format!("syms[{}]", sym_index(table, s)?));
        }
        parts.push(factors.join(" * "));
    }
    Ok(if parts.is_empty() { "(i64)0".to_string() } else { format!("({})", parts.join(" + ")) })
}

/// The position of symbol `s` in a kernel's symbol `table` (where it reads `syms[i]`).
pub fn sym_index(table: &[Sym], s: &Sym) -> Result<usize, CodegenError> {
    table
        .iter()
        .position(|t| t == s)
        .ok_or_else(|| CodegenError(format!("symbol `{s}` is not in the kernel's symbol table")))
}

/// 16 hex digits of the FNV-1a 64 hash of `s`: a stable (across builds and versions)
/// name suffix for kernels whose source is generated.
pub fn stable_hash_hex(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_render_over_the_table() {
        let (past, seq) = (Sym::new("past"), Sym::new("seq"));
        let table = [past, seq];
        let d = &Dim::sym("past") + &Dim::sym("seq");
        assert_eq!(dim_to_c(&d, &table).unwrap(), "(syms[0] + syms[1])");
        assert_eq!(dim_to_c(&Dim::fixed(64), &table).unwrap(), "((i64)64)");
        assert_eq!(dim_to_c(&Dim::fixed(0), &table).unwrap(), "(i64)0");
        let e = &(&Dim::sym("seq") * &Dim::fixed(2)) + &Dim::fixed(1);
        assert_eq!(dim_to_c(&e, &table).unwrap(), "((i64)2 * syms[1] + (i64)1)");
        assert!(dim_to_c(&Dim::sym("batch"), &table).unwrap_err().0.contains("`batch`"));
        // FNV-1a 64 reference values.
        assert_eq!(stable_hash_hex(""), "cbf29ce484222325");
        assert_eq!(stable_hash_hex("a"), "af63dc4c8601ec8c");
    }
}
