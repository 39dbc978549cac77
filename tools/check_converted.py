#!/usr/bin/env python3
"""Checks that a checkpoint written by `kiln convert --from SmolLM2.gguf --to DIR` loads in
HF transformers and reproduces the GGUF fixture: for every chat prompt in
models/tests/fixtures/smollm2/expected.json, the prompt ids and the greedy tokens that
transformers gives from DIR must equal the ones it gave when it loaded the GGUF itself.

    kiln convert --from SmolLM2-135M-Instruct.Q4_1.gguf --to /tmp/hf
    python3 tools/check_converted.py /tmp/hf

Needs torch and transformers; runs on the CPU in float32; exits 1 on any mismatch.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    hf_dir = sys.argv[1]
    fixture = os.path.join(os.path.dirname(__file__), "..", "models", "tests", "fixtures", "smollm2", "expected.json")
    expected = json.load(open(fixture))
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    bad = 0
    for s in expected["strings"]:
        ids = tok(s["text"], add_special_tokens=False)["input_ids"]
        if ids != s["ids"]:
            bad += 1
            print(f"tokenizer mismatch on {s['text']!r}: {ids} vs {s['ids']}")
    for chat in expected["chats"]:
        ids = chat["prompt_ids"]
        rendered = tok.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True)
        if rendered != chat["prompt_text"]:
            bad += 1
            print(f"chat template mismatch: {rendered!r} vs {chat['prompt_text']!r}")
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=len(chat["greedy"]),
                eos_token_id=None, pad_token_id=0,
            )
        got = out[0, len(ids):].tolist()
        same = got == chat["greedy"]
        bad += not same
        print(f"{'OK ' if same else 'BAD'} {chat['messages'][-1]['content']!r}: {tok.decode(got)!r}")
    print(f"{len(expected['strings'])} strings, {len(expected['chats'])} chats, {bad} mismatches")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
