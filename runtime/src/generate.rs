//! Token-level generation: prefill, then decode steps feeding the KV cache back.
