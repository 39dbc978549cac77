#!/usr/bin/env python3
"""Write the Hugging Face parity fixtures of `models/tests/parity.rs`.

For each tiny configuration below this builds a `transformers` model with random
weights (seeded; nothing is downloaded), saves it with `save_pretrained` as f32
safetensors, and records what transformers computes with it:

* the logits at every position for a few token sequences (eager attention, f32, CPU);
* a greedy continuation (`generate(do_sample=False)`, KV cache on).

Output, per fixture, in `models/tests/fixtures/hf/<name>/`:

    config.json, model.safetensors (or model-0000i-of-0000n.safetensors + index)
    expected.safetensors:
        case.<k>.input_ids  i64[seq]         the k-th sequence
        case.<k>.logits     f32[seq, vocab]  transformers' logits at every position
        greedy.prompt       i64[p]
        greedy.output       i64[p + n]       prompt followed by n greedy tokens

Usage (needs torch and transformers; runs on the CPU in seconds):

    python3 tools/make_parity_fixtures.py [--out models/tests/fixtures/hf] [--only NAME ...]
"""

import argparse
import json
import math
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "models", "tests", "fixtures", "hf")

# Tiny configurations; every one has 2 layers. `arch` picks the transformers classes,
# `shard` makes save_pretrained split the checkpoint (exercises the index loader),
# `rope` is (rope_type, parameters) or None for the default.
FIXTURES = {
    "llama_gqa": dict(
        arch="llama", vocab_size=64, hidden_size=24, intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=2, shard="20KB",
    ),
    "llama_mqa": dict(
        arch="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
    ),
    "llama_tied": dict(
        arch="llama", vocab_size=64, hidden_size=32, intermediate_size=16,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "llama3_rope": dict(
        # head_dim 12, theta 5e5: wavelengths 6.3 (< 16: kept), 56 (between 16 and 64:
        # smoothed) and > 64 (divided by 8): every branch of the llama3 rule is used.
        arch="llama", vocab_size=64, hidden_size=24, intermediate_size=32,
        num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0, max_position_embeddings=512,
        rope=("llama3", dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64)),
    ),
    "llama_odd_sizes": dict(
        # hidden 30 over 5 heads of 6, intermediate 20, vocab 61.
        arch="llama", vocab_size=61, hidden_size=30, intermediate_size=20,
        num_attention_heads=5, num_key_value_heads=5, tie_word_embeddings=True,
    ),
    "llama_head_dim": dict(
        # head_dim 10 != 24 / 4, with linear rope scaling.
        arch="llama", vocab_size=64, hidden_size=24, intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=2, head_dim=10, tie_word_embeddings=True,
        rope=("linear", dict(factor=2.0)),
    ),
    "llama_bias": dict(
        # attention_bias (q, k, v and o) and mlp_bias.
        arch="llama", vocab_size=48, hidden_size=16, intermediate_size=24,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True,
    ),
    "qwen2_bias": dict(
        arch="qwen2", vocab_size=64, hidden_size=24, intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0,
    ),
}

CASE_LENGTHS = [6, 6, 3, 20]  # the two of length 6 are also run as a batch in Rust
PROMPT_LEN = 4
NEW_TOKENS = 8
MIN_MARGIN = 1e-3  # greedy steps must win by this much, so f32 noise cannot flip them


def transformers_major():
    return int(transformers.__version__.split(".")[0])


def make_config(spec):
    spec = dict(spec)
    arch = spec.pop("arch")
    spec.pop("shard", None)
    rope = spec.pop("rope", None)
    theta = spec.pop("rope_theta", 10000.0)
    kw = dict(
        num_hidden_layers=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    kw.update(spec)
    if transformers_major() >= 5:
        params = {"rope_type": "default", "rope_theta": theta}
        if rope is not None:
            params.update(rope_type=rope[0], **rope[1])
        kw["rope_parameters"] = params
    else:
        kw["rope_theta"] = theta
        if rope is not None:
            kw["rope_scaling"] = dict(rope_type=rope[0], **rope[1])
    if arch == "llama":
        return transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    if arch == "qwen2":
        kw["use_sliding_window"] = False
        return transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    raise ValueError(arch)


def randomize(model):
    """Random weights of a useful scale: projections ~ N(0, 1/fan_in), embeddings
    ~ N(0, 1), biases ~ N(0, 0.5), norm weights ~ 1 + N(0, 0.2) (so a swapped norm
    shows). Logits come out with a spread of a few units, so greedy steps are clear."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif name == "lm_head.weight":
                p.normal_(0.0, 3.0 / math.sqrt(p.shape[1]))
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))


def check_structure(model, spec):
    """Fails loudly when this transformers version ignores a setting we rely on."""
    attn = model.model.layers[0].self_attn
    head_dim = spec.get("head_dim", spec["hidden_size"] // spec["num_attention_heads"])
    assert attn.head_dim == head_dim, f"head_dim {attn.head_dim} != {head_dim} (transformers too old?)"
    q_proj = attn.q_proj
    assert q_proj.weight.shape[0] == spec["num_attention_heads"] * head_dim
    want_qkv_bias = spec["arch"] == "qwen2" or spec.get("attention_bias", False)
    assert (q_proj.bias is not None) == want_qkv_bias, "q/k/v bias setting not honoured"
    assert (attn.o_proj.bias is not None) == (spec["arch"] == "llama" and spec.get("attention_bias", False))
    mlp_bias = model.model.layers[0].mlp.gate_proj.bias is not None
    assert mlp_bias == spec.get("mlp_bias", False), "mlp_bias not honoured (transformers too old?)"
    impl = getattr(model.config, "_attn_implementation", "eager")
    assert impl == "eager", f"attention implementation is {impl}, not eager"
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == spec.get("tie_word_embeddings", False)


def greedy(model, prompt):
    out = model.generate(
        prompt[None, :],
        attention_mask=torch.ones_like(prompt)[None, :],
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=0,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
        num_beams=1,
    )
    seq = out.sequences[0]
    assert seq.shape[0] == PROMPT_LEN + NEW_TOKENS, f"generate stopped early: {seq.tolist()}"
    margin = math.inf
    for scores in out.scores:
        top = torch.topk(scores[0].float(), 2).values
        margin = min(margin, (top[0] - top[1]).item())
    return seq, margin


def make(name, spec, out_root, seed):
    torch.manual_seed(seed)
    config, cls = make_config(spec)
    model = cls(config).to(torch.float32).eval()
    if hasattr(model.config, "_attn_implementation"):
        model.config._attn_implementation = "eager"
    randomize(model)
    check_structure(model, spec)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    out = os.path.join(out_root, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    save_kw = {}
    if spec.get("shard"):
        save_kw["max_shard_size"] = spec["shard"]
    try:
        model.save_pretrained(out, safe_serialization=True, **save_kw)
    except TypeError:  # transformers 5: safetensors only, no flag
        model.save_pretrained(out, **save_kw)
    for extra in ("generation_config.json",):
        path = os.path.join(out, extra)
        if os.path.exists(path):
            os.remove(path)
    files = sorted(os.listdir(out))
    assert any(f.endswith(".safetensors") for f in files), files
    if spec.get("shard"):
        assert "model.safetensors.index.json" in files, f"{name}: expected a sharded checkpoint, got {files}"

    # What we compare against comes from the reloaded checkpoint, so the files are the
    # truth (a save that dropped or renamed a tensor shows up here, not in Rust).
    dtype_kw = "dtype" if transformers_major() >= 5 else "torch_dtype"
    model = cls.from_pretrained(out, attn_implementation="eager", **{dtype_kw: torch.float32}).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(seed + 1)
    expected = {}
    with torch.no_grad():
        for k, n in enumerate(CASE_LENGTHS):
            ids = torch.randint(0, vocab, (n,), generator=gen)
            logits = model(ids[None, :], use_cache=False).logits[0].float()
            expected[f"case.{k}.input_ids"] = ids.to(torch.int64)
            expected[f"case.{k}.logits"] = logits.contiguous()
        for attempt in range(50):
            prompt = torch.randint(0, vocab, (PROMPT_LEN,), generator=gen)
            seq, margin = greedy(model, prompt)
            if margin >= MIN_MARGIN:
                break
        else:
            raise RuntimeError(f"{name}: no prompt with greedy margins >= {MIN_MARGIN}")
    expected["greedy.prompt"] = prompt.to(torch.int64)
    expected["greedy.output"] = seq.to(torch.int64).contiguous()
    meta = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seed": str(seed),
        "greedy_margin": f"{margin:.4g}",
    }
    save_file(expected, os.path.join(out, "expected.safetensors"), metadata=meta)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{name:16} {size / 1024:7.1f} KB  files: {', '.join(sorted(os.listdir(out)))}  "
          f"greedy margin {margin:.3g}")
    return size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="fixture root (default: %(default)s)")
    ap.add_argument("--only", nargs="*", default=None, help="fixture names to (re)make")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    names = args.only or list(FIXTURES)
    unknown = [n for n in names if n not in FIXTURES]
    if unknown:
        sys.exit(f"unknown fixtures {unknown}; known: {', '.join(FIXTURES)}")
    os.makedirs(args.out, exist_ok=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__} -> {args.out}")
    total = 0
    for i, name in enumerate(FIXTURES):
        if name in names:
            total += make(name, FIXTURES[name], args.out, seed=1000 + i)
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write("Generated by `tools/make_parity_fixtures.py` "
                f"(transformers {transformers.__version__}, torch {torch.__version__}); "
                "do not edit. See tools/README.md.\n")
    print(f"total {total / 1024:.1f} KB")


if __name__ == "__main__":
    main()
