#!/usr/bin/env python3
"""HF transformers decode baseline on the same checkpoint kiln runs, on the same machine.

    python3 tools/hf_decode_baseline.py DIR [--device cuda] [--dtype float32|bfloat16]
        [--prompt-tokens 32] [--new-tokens 128] [--static-compile]

Greedy generation at batch 1 with the KV cache, after one warm-up run; prints
`hf decode tokens/s: X` (new tokens / time of the timed generate, prefill included, as
kiln's summary line reports decode separately: compare like with like). With
`--static-compile` it uses the static KV cache and torch.compile(mode="reduce-overhead"),
the strongest plain-PyTorch decode path.
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--static-compile", action="store_true")
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.dir, dtype=getattr(torch, a.dtype)).to(a.device).eval()
    kw = {}
    if a.static_compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        kw["cache_implementation"] = "static"
    ids = torch.arange(100, 100 + a.prompt_tokens, device=a.device)[None]
    gen = dict(do_sample=False, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=0, **kw)
    with torch.no_grad():
        model.generate(ids, **gen)  # warm-up (and compilation)
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, **gen)
        if a.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
    print(f"hf decode tokens/s: {a.new_tokens / dt:.1f} ({a.dtype}, {a.device}, {'static+compile' if a.static_compile else 'eager'})")


if __name__ == "__main__":
    main()
