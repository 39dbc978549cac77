//! The rotary row permutation llama.cpp's `convert_hf_to_gguf.py` applies to the
//! query and key projections of Llama-family models.
//!
//! Hugging Face checkpoints rotate dimension `i` of each head with dimension
//! `i + head_dim/2` ("rotate half"); ggml's default RoPE rotates adjacent pairs
//! `(2i, 2i+1)`. The converter therefore reorders the output rows of `attn_q` and
//! `attn_k`:
//!
//! ```python
//! def permute(w, n_head, n_head_kv):
//!     if n_head_kv is not None and n_head != n_head_kv:
//!         n_head = n_head_kv
//!     return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
//!             .swapaxes(1, 2)
//!             .reshape(w.shape))
//! ```
//!
//! i.e. GGUF row `h·hd + 2i + j` is Hugging Face row `h·hd + j·hd/2 + i` (head `h`,
//! `hd` = rows per head, `i < hd/2`, `j ∈ {0, 1}`). A model that applies rotate-half
//! RoPE must undo it with [`unpermute_qk`] — with `n_head` for `attn_q` and `n_head_kv`
//! for `attn_k` (for a bias, use `row_len = 1`).

fn check(rows: &[f32], n_rows: usize, row_len: usize, n_head: usize) -> usize {
    assert_eq!(
        Some(rows.len()),
        n_rows.checked_mul(row_len),
        "permute_qk: {} values are not {n_rows} rows of {row_len}",
        rows.len()
    );
    assert!(
        n_head > 0 && n_rows.is_multiple_of(2 * n_head),
        "permute_qk: {n_rows} rows do not split into {n_head} heads of an even number of rows"
    );
    n_rows / n_head
}

/// Applies the converter's permutation (Hugging Face row order → GGUF row order).
///
/// # Panics
/// If `rows.len() != n_rows * row_len` or `n_rows` is not a multiple of `2 * n_head`.
pub fn permute_qk(rows: &[f32], n_rows: usize, row_len: usize, n_head: usize) -> Vec<f32> {
    let hd = check(rows, n_rows, row_len, n_head);
    let mut out = Vec::with_capacity(rows.len());
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = h * hd + j * (hd / 2) + i;
                out.extend_from_slice(&rows[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

/// Undoes the converter's permutation (GGUF row order → Hugging Face row order).
///
/// # Panics
/// If `rows.len() != n_rows * row_len` or `n_rows` is not a multiple of `2 * n_head`;
/// callers taking `n_head` from a file should check that first.
pub fn unpermute_qk(rows: &[f32], n_rows: usize, row_len: usize, n_head: usize) -> Vec<f32> {
    let hd = check(rows, n_rows, row_len, n_head);
    let mut out = Vec::with_capacity(rows.len());
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + 2 * i + j;
                out.extend_from_slice(&rows[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}
