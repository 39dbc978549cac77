#!/usr/bin/env python3
"""The HF transformers baseline for `kiln bench`, run on the same machine right after it.

    python3 tools/bench_hf.py --preset llama-3.2-1b [--model DIR] [--kiln-json kiln.json]
        [--compile] [--dtype bfloat16] [--prefill 128,2048] [--batch 1] [--decode-steps 128]
        [--json OUT]

The model: a preset's config built in code (`transformers.LlamaConfig`, the same values as
kiln's `kiln_models::presets`; random init on the GPU, nothing downloaded), or `--model DIR`
(a local checkpoint). With `--kiln-json` (what `kiln bench --json` wrote), the prefill
lengths and decode steps default to kiln's, the preset config is checked against the one
kiln ran, and the kiln / transformers ratios are printed.

What is measured (CUDA, synchronized around every timed region, median of several runs
after a warm-up):
* prefill: one forward over a prompt of each length at batch 1 with the KV cache and
  logits of the last position only, plus the greedy token copied to the host (what kiln's
  prefill returns);
* decode, `generate`: `model.generate` (greedy, `min_new_tokens` = `max_new_tokens`, no
  EOS) timed at 1 and 1 + N new tokens; decode tokens/s = N / (difference), so prefill is
  excluded;
* decode, loop: a manual greedy loop with `past_key_values` (DynamicCache), the argmax fed
  back on the device, synchronized only at the end; for each `--batch`;
* with `--compile`: the same loop with a static cache and the step compiled by
  `torch.compile(mode="reduce-overhead")` (CUDA graphs; gpt-fast style). Compiling can take
  minutes; any failure is caught and reported instead of a number.

Decode runs start after a prompt of 128 tokens, like kiln's.
"""
import argparse
import inspect
import json
import statistics
import sys
import time
import traceback

import torch
import transformers

# The checkpoints' config.json values (as in kiln_models::presets).
PRESETS = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=None,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        rope_scaling=None,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    ),
}

DECODE_PROMPT = 128
DECODE_WARMUP = 8
PREFILL_REPS = 5
DECODE_REPS = 3


def major():
    return int(transformers.__version__.split(".")[0])


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def llama_config(spec):
    """A transformers.LlamaConfig from a preset, in the installed version's own format."""
    kw = dict(spec)
    theta = kw.pop("rope_theta")
    rope = kw.pop("rope_scaling")
    if major() >= 5:
        params = {"rope_type": "default", "rope_theta": theta}
        if rope:
            params.update(rope)
        kw["rope_parameters"] = params
    else:
        kw["rope_theta"] = theta
        kw["rope_scaling"] = rope
    return transformers.LlamaConfig(**kw)


def check_against_kiln(spec, kiln):
    """Warns about any field where the preset differs from the config kiln ran."""
    hf = ((kiln or {}).get("model") or {}).get("hf_config")
    if not hf:
        return
    for k, v in spec.items():
        if k == "rope_scaling":
            other = hf.get("rope_scaling")
            other = {kk: vv for kk, vv in (other or {}).items()} or None
            v = dict(v) if v else None
        else:
            other = hf.get(k, v if k == "head_dim" else None)
        if other != v and not (isinstance(v, float) and isinstance(other, (int, float)) and float(other) == v):
            log(f"bench_hf: warning: {k} = {v!r} here but {other!r} in the kiln run")


def build_model(a, dtype):
    dtype_kw = "dtype" if major() >= 5 else "torch_dtype"
    if a.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model, **{dtype_kw: dtype}).to(DEVICE)
        name = a.model
    else:
        torch.manual_seed(0)
        spec = dict(PRESETS[a.preset])
        if a.layers:
            spec["num_hidden_layers"] = a.layers
        config = llama_config(spec)
        with torch.device(DEVICE):
            model = transformers.AutoModelForCausalLM.from_config(config, **{dtype_kw: dtype})
        name = a.preset
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return name, model


DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def prompt(batch, length, vocab, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(DEVICE)


def cache_kw(model):
    """The forward's KV cache argument: `cache` (transformers >= 5.2x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def out_cache(out):
    for key in ("cache", "past_key_values"):
        v = out.get(key)
        if v is not None:
            return v
    raise RuntimeError("the model returned no KV cache")


def forward_last(model, **kw):
    """A forward computing the logits of the last position only (when supported)."""
    for key in ("logits_to_keep", "num_logits_to_keep"):
        try:
            return model(**kw, **{key: 1})
        except TypeError:
            continue
    return model(**kw)


def bench_prefill(model, length, vocab):
    ids = prompt(1, length, vocab)

    def run():
        out = forward_last(model, input_ids=ids, use_cache=True)
        out.logits[:, -1].argmax(-1).cpu()

    run()
    times = [timed(run) for _ in range(PREFILL_REPS)]
    t = statistics.median(times)
    return dict(tokens=length, median_ms=t * 1e3, tokens_per_s=length / t, runs_ms=[x * 1e3 for x in times])


def bench_generate(model, steps, vocab):
    ids = prompt(1, DECODE_PROMPT, vocab)
    mask = torch.ones_like(ids)

    def gen(n):
        model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
            eos_token_id=None,
        )

    gen(1 + steps)  # warm-up
    t1 = statistics.median(timed(lambda: gen(1)) for _ in range(DECODE_REPS))
    tn = statistics.median(timed(lambda: gen(1 + steps)) for _ in range(DECODE_REPS))
    per_step = (tn - t1) / steps
    return dict(batch=1, steps=steps, median_ms_per_step=per_step * 1e3, tokens_per_s=1 / per_step,
                generate_1_ms=t1 * 1e3, generate_n_ms=tn * 1e3)


def bench_loop(model, batch, steps, vocab):
    """Eager greedy decode with a DynamicCache; one synchronization at the end."""
    ids = prompt(batch, DECODE_PROMPT, vocab)
    kw = cache_kw(model)
    times = []
    for rep in range(DECODE_REPS + 1):
        out = forward_last(model, input_ids=ids, use_cache=True)
        past = out_cache(out)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(DECODE_WARMUP):
            out = model(input_ids=tok, use_cache=True, **{kw: past})
            past, tok = out_cache(out), out.logits[:, -1:].argmax(-1)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=tok, use_cache=True, **{kw: past})
            past, tok = out_cache(out), out.logits[:, -1:].argmax(-1)
        sync()
        if rep > 0:  # the first run warms up the allocator and kernels
            times.append(time.perf_counter() - t)
        del out, past
    t = statistics.median(times)
    return dict(batch=batch, steps=steps, median_ms_per_step=t / steps * 1e3, tokens_per_s=batch * steps / t,
                runs_ms=[x * 1e3 for x in times])


def static_cache(model, batch, max_len):
    """A StaticCache, whatever the installed version's constructor looks like."""
    cls = transformers.StaticCache
    params = inspect.signature(cls.__init__).parameters
    kw = {}
    for name, value in (("config", model.config), ("max_batch_size", batch), ("batch_size", batch),
                        ("max_cache_len", max_len), ("device", model.device), ("dtype", model.dtype)):
        if name in params:
            kw[name] = value
    return cls(**kw)


def bench_compiled(model, batch, steps, vocab):
    """gpt-fast style: a static cache and the decode step compiled with reduce-overhead."""
    max_len = DECODE_PROMPT + DECODE_WARMUP + steps + 8
    cache = static_cache(model, batch, max_len)
    ids = prompt(batch, DECODE_PROMPT, vocab)
    kw = cache_kw(model)

    def step(tok, pos):
        out = model(input_ids=tok, cache_position=pos, position_ids=pos[None].expand(tok.shape[0], 1), use_cache=True,
                    **{kw: cache})
        return out.logits[:, -1:].argmax(-1)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)

    def run(n_timed):
        cache.reset()
        pos = torch.arange(DECODE_PROMPT, device=DEVICE)
        out = forward_last(model, input_ids=ids, cache_position=pos, position_ids=pos[None].expand(batch, -1),
                           use_cache=True, **{kw: cache})
        tok = out.logits[:, -1:].argmax(-1)
        pos = torch.tensor([DECODE_PROMPT], device=DEVICE)
        for _ in range(DECODE_WARMUP):
            torch.compiler.cudagraph_mark_step_begin()
            tok = compiled(tok, pos).clone()
            pos += 1
        sync()
        t = time.perf_counter()
        for _ in range(n_timed):
            torch.compiler.cudagraph_mark_step_begin()
            tok = compiled(tok, pos).clone()
            pos += 1
        sync()
        return time.perf_counter() - t

    t0 = time.perf_counter()
    run(steps)  # compiles (and records the CUDA graph)
    compile_s = time.perf_counter() - t0
    times = [run(steps) for _ in range(DECODE_REPS)]
    t = statistics.median(times)
    return dict(batch=batch, steps=steps, median_ms_per_step=t / steps * 1e3, tokens_per_s=batch * steps / t,
                runs_ms=[x * 1e3 for x in times], compile_and_first_run_s=compile_s)


def attempt(what, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - report, never abort the whole baseline
        log(f"bench_hf: {what} failed: {type(e).__name__}: {e}")
        log(traceback.format_exc(limit=4))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def fmt(x, nd=1):
    return "-" if x is None else f"{x:,.{nd}f}"


def ratio(k, h):
    return f"{k / h:.2f}x" if k and h else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--model", help="a local HF checkpoint directory instead of a preset")
    ap.add_argument("--kiln-json", help="what `kiln bench --json` wrote: lengths, steps and ratios")
    ap.add_argument("--compile", action="store_true", help="also the static cache + torch.compile decode loop")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--prefill", type=ints, help="prefill lengths [kiln's, else 128,2048]")
    ap.add_argument("--batch", type=ints, default=[1], help="decode batch sizes of the loop [1]")
    ap.add_argument("--decode-steps", type=int, help="timed decode steps [kiln's, else 128]")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: only to try the script")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers (to try the script on a small model)")
    a = ap.parse_args()
    if not a.preset and not a.model:
        ap.error("give --preset or --model")
    global DEVICE
    DEVICE = a.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_hf: needs a CUDA GPU (torch.cuda.is_available() is False)")

    kiln = None
    if a.kiln_json:
        with open(a.kiln_json) as f:
            kiln = json.load(f)
    prefill = a.prefill or [p["tokens"] for p in (kiln or {}).get("prefill", [])] or [128, 2048]
    kiln_decode = (kiln or {}).get("decode", [])
    steps = a.decode_steps or (kiln_decode[0]["steps"] if kiln_decode else 128)
    if a.preset and not a.model:
        check_against_kiln(PRESETS[a.preset], kiln)

    dtype = getattr(torch, a.dtype)
    t = time.perf_counter()
    name, model = build_model(a, dtype)
    vocab = model.config.vocab_size
    params = sum(p.numel() for p in model.parameters())
    attn = getattr(model.config, "_attn_implementation", "?")
    log(f"bench_hf: {name}: {params / 1e9:.3f} B parameters, {a.dtype}, attention {attn}, "
        f"built in {time.perf_counter() - t:.1f} s")

    res = dict(
        machine=dict(gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch=torch.__version__, transformers=transformers.__version__,
                     cuda=torch.version.cuda, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        model=dict(name=name, parameters=params, dtype=a.dtype, attention=attn,
                   weights="checkpoint" if a.model else "random init"),
        prefill=[], decode_generate=None, decode_loop=[], decode_compiled=[],
    )
    with torch.inference_mode():
        for n in prefill:
            log(f"bench_hf: prefill {n}")
            res["prefill"].append({"tokens": n, **attempt(f"prefill {n}", lambda: bench_prefill(model, n, vocab))})
        log("bench_hf: decode (generate)")
        res["decode_generate"] = attempt("generate", lambda: bench_generate(model, steps, vocab))
        for b in a.batch:
            log(f"bench_hf: decode loop, batch {b}")
            r = attempt(f"decode loop batch {b}", lambda: bench_loop(model, b, steps, vocab))
            res["decode_loop"].append({"batch": b, **r})
    if a.compile:
        for b in a.batch:
            log(f"bench_hf: compiled decode, batch {b} (compiling may take minutes)")
            with torch.inference_mode():
                r = attempt(f"compiled decode batch {b}", lambda: bench_compiled(model, b, steps, vocab))
            res["decode_compiled"].append({"batch": b, **r})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)

    # The table: transformers next to kiln, ratio = kiln / transformers.
    kp = {p["tokens"]: p["tokens_per_s"] for p in (kiln or {}).get("prefill", [])}
    kd = {d["batch"]: d["tokens_per_s"] for d in kiln_decode}
    m = res["machine"]
    print(f"transformers {m['transformers']}, torch {m['torch']} (CUDA {m['cuda']}), {m['gpu']}, {a.dtype}, "
          f"attention {attn}; {name} ({res['model']['weights']}), {params / 1e9:.3f} B parameters")
    print(f"{'tokens/s':<34} {'kiln':>12} {'transformers':>14} {'kiln/hf':>8}")
    rows = []
    for p in res["prefill"]:
        rows.append((f"prefill {p['tokens']} (batch 1)", kp.get(p["tokens"]), p.get("tokens_per_s"), p.get("error")))
    g = res["decode_generate"] or {}
    rows.append((f"decode batch 1, generate (eager)", kd.get(1), g.get("tokens_per_s"), g.get("error")))
    for d in res["decode_loop"]:
        rows.append((f"decode batch {d['batch']}, loop (eager)", kd.get(d["batch"]), d.get("tokens_per_s"),
                     d.get("error")))
    for d in res["decode_compiled"]:
        rows.append((f"decode batch {d['batch']}, compiled+static", kd.get(d["batch"]), d.get("tokens_per_s"),
                     d.get("error")))
    for label, k, h, err in rows:
        print(f"{label:<34} {fmt(k):>12} {fmt(h):>14} {ratio(k, h):>8}" + (f"  ({err[:80]})" if err else ""))
    if kiln and kiln.get("roofline_batch1"):
        r = kiln["roofline_batch1"]
        print(f"decode roofline (batch 1): {r['tokens_per_s']:,.1f} tokens/s; kiln at {r['percent']:.1f}%")


if __name__ == "__main__":
    main()
