//! GGUF reader (llama.cpp's checkpoint format), versions 2 and 3, little-endian.
//!
//! Layout of a file:
//!
//! ```text
//! magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
//! n_kv × (key string, value type u32, value)
//! n_tensors × (name string, n_dims u32, ne u64[n_dims], ggml type u32, offset u64)
//! padding to `general.alignment` (default 32)
//! tensor data (each tensor at data start + offset, offsets aligned)
//! ```
//!
//! Strings are a u64 byte length followed by UTF-8 bytes. GGUF lists dimensions
//! innermost-first (`ne[0]` is the row length); [`TensorInfo::shape`] is the row-major
//! shape `[ne[n-1], …, ne[0]]`.
//!
//! The file is memory-mapped and tensor data stays in the map. Every length read from
//! the file is checked against the bytes left before anything is allocated, so a
//! truncated or lying file gives an error naming the key or tensor at fault, never a
//! panic or a huge allocation.

pub mod dequant;
pub mod model;
mod permute;
pub mod tokenizer;
mod writer;

pub use permute::{permute_qk, unpermute_qk};
pub use writer::GgufWriter;

use crate::error::{ModelError, Result};
use indexmap::IndexMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays accepted in metadata values.
pub const MAX_ARRAY_DEPTH: usize = 8;

// ---------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------

/// The type tag of a metadata value, as stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    pub const fn id(self) -> u32 {
        self as u32
    }

    pub const fn name(self) -> &'static str {
        use GgufValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type takes in the file (a string is at least
    /// its u64 length, an array at least its element type and u64 length).
    const fn min_size(self) -> usize {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

impl fmt::Display for GgufValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: all elements share one type; arrays may nest.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufValue {
    pub fn value_type(&self) -> GgufValueType {
        use GgufValue as V;
        use GgufValueType as T;
        match self {
            V::U8(_) => T::U8,
            V::I8(_) => T::I8,
            V::U16(_) => T::U16,
            V::I16(_) => T::I16,
            V::U32(_) => T::U32,
            V::I32(_) => T::I32,
            V::F32(_) => T::F32,
            V::Bool(_) => T::Bool,
            V::String(_) => T::String,
            V::Array(_) => T::Array,
            V::U64(_) => T::U64,
            V::I64(_) => T::I64,
            V::F64(_) => T::F64,
        }
    }

    /// A description of the type for error messages: `u32`, `array of 3 string`, ….
    pub fn type_description(&self) -> String {
        match self {
            GgufValue::Array(a) => a.type_description(),
            v => v.value_type().name().to_string(),
        }
    }

    /// The value as an i128 if it is an integer (for range-checked conversions).
    fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }
}

impl GgufArray {
    pub fn elem_type(&self) -> GgufValueType {
        use GgufArray as A;
        use GgufValueType as T;
        match self {
            A::U8(_) => T::U8,
            A::I8(_) => T::I8,
            A::U16(_) => T::U16,
            A::I16(_) => T::I16,
            A::U32(_) => T::U32,
            A::I32(_) => T::I32,
            A::F32(_) => T::F32,
            A::Bool(_) => T::Bool,
            A::String(_) => T::String,
            A::Array(_) => T::Array,
            A::U64(_) => T::U64,
            A::I64(_) => T::I64,
            A::F64(_) => T::F64,
        }
    }

    pub fn len(&self) -> usize {
        use GgufArray as A;
        match self {
            A::U8(v) => v.len(),
            A::I8(v) => v.len(),
            A::U16(v) => v.len(),
            A::I16(v) => v.len(),
            A::U32(v) => v.len(),
            A::I32(v) => v.len(),
            A::F32(v) => v.len(),
            A::Bool(v) => v.len(),
            A::String(v) => v.len(),
            A::Array(v) => v.len(),
            A::U64(v) => v.len(),
            A::I64(v) => v.len(),
            A::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn type_description(&self) -> String {
        format!("array of {} {}", self.len(), self.elem_type())
    }
}

// ---------------------------------------------------------------------------------------
// Tensor types
// ---------------------------------------------------------------------------------------

/// A ggml tensor type (`enum ggml_type`). Every id llama.cpp currently assigns is known
/// here so that block sizes can be checked; [`dequant::SUPPORTED`] lists those that
/// [`GgufFile::tensor_f32`] can dequantize.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// (type, id, name, elements per block, bytes per block), from ggml.c's `type_traits`.
const GGML_TYPES: [(GgmlType, u32, &str, usize, usize); 32] = {
    use GgmlType::*;
    [
        (F32, 0, "F32", 1, 4),
        (F16, 1, "F16", 1, 2),
        (Q4_0, 2, "Q4_0", 32, 18),
        (Q4_1, 3, "Q4_1", 32, 20),
        (Q5_0, 6, "Q5_0", 32, 22),
        (Q5_1, 7, "Q5_1", 32, 24),
        (Q8_0, 8, "Q8_0", 32, 34),
        (Q8_1, 9, "Q8_1", 32, 36),
        (Q2_K, 10, "Q2_K", 256, 84),
        (Q3_K, 11, "Q3_K", 256, 110),
        (Q4_K, 12, "Q4_K", 256, 144),
        (Q5_K, 13, "Q5_K", 256, 176),
        (Q6_K, 14, "Q6_K", 256, 210),
        (Q8_K, 15, "Q8_K", 256, 292),
        (IQ2_XXS, 16, "IQ2_XXS", 256, 66),
        (IQ2_XS, 17, "IQ2_XS", 256, 74),
        (IQ3_XXS, 18, "IQ3_XXS", 256, 98),
        (IQ1_S, 19, "IQ1_S", 256, 50),
        (IQ4_NL, 20, "IQ4_NL", 32, 18),
        (IQ3_S, 21, "IQ3_S", 256, 110),
        (IQ2_S, 22, "IQ2_S", 256, 82),
        (IQ4_XS, 23, "IQ4_XS", 256, 136),
        (I8, 24, "I8", 1, 1),
        (I16, 25, "I16", 1, 2),
        (I32, 26, "I32", 1, 4),
        (I64, 27, "I64", 1, 8),
        (F64, 28, "F64", 1, 8),
        (IQ1_M, 29, "IQ1_M", 256, 56),
        (BF16, 30, "BF16", 1, 2),
        (TQ1_0, 34, "TQ1_0", 256, 54),
        (TQ2_0, 35, "TQ2_0", 256, 66),
        (MXFP4, 39, "MXFP4", 32, 17),
    ]
};

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        GGML_TYPES.iter().find(|r| r.0 == self).expect("every GgmlType is in GGML_TYPES")
    }

    pub fn from_id(id: u32) -> Option<Self> {
        GGML_TYPES.iter().find(|r| r.1 == id).map(|r| r.0)
    }

    pub fn from_name(name: &str) -> Option<Self> {
        GGML_TYPES.iter().find(|r| r.2.eq_ignore_ascii_case(name)).map(|r| r.0)
    }

    /// The id stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// llama.cpp's name: `Q4_K`, `F16`, ….
    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        self.row().3
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().4
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes taken by `n` elements (`n` must be a multiple of the block size); `None` on
    /// overflow.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        (n / self.block_size()).checked_mul(self.type_size())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's entry in the tensor info table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as stored (innermost first, `ne[0]` is the row length).
    pub ne: Vec<u64>,
    /// Row-major shape: `ne` reversed.
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Number of elements (product of the dims; 1 for zero dims).
    pub n_elements: usize,
    /// Number of bytes of data.
    pub n_bytes: usize,
}

// ---------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An open GGUF file: parsed metadata and tensor infos, tensor data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    alignment: u64,
    data_offset: usize,
    metadata: IndexMap<String, GgufValue>,
    tensors: IndexMap<String, TensorInfo>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and parses `path`, memory-mapping it.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| ModelError::Io { path: path.clone(), source };
        let file = std::fs::File::open(&path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        let storage = if len == 0 {
            // Mapping an empty file fails on some platforms; the parser reports it.
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only; as with every memory-mapped checkpoint
            // reader, the file must not be truncated or rewritten while it is open.
            Storage::Mmap(unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?)
        };
        Self::from_storage(path, storage)
    }

    /// Parses a GGUF image held in memory; `name` stands for the path in errors.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<PathBuf>) -> Result<GgufFile> {
        Self::from_storage(name.into(), Storage::Owned(bytes))
    }

    fn from_storage(path: PathBuf, storage: Storage) -> Result<GgufFile> {
        match parse(storage.bytes()) {
            Ok(p) => Ok(GgufFile {
                path,
                storage,
                version: p.version,
                alignment: p.alignment,
                data_offset: p.data_offset,
                metadata: p.metadata,
                tensors: p.tensors,
            }),
            Err(msg) => Err(ModelError::Gguf { path, msg }),
        }
    }

    fn err(&self, msg: impl Into<String>) -> ModelError {
        ModelError::Gguf { path: self.path.clone(), msg: msg.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Tensor data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte offset in the file where the tensor data section starts.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &IndexMap<String, GgufValue> {
        &self.metadata
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &IndexMap<String, TensorInfo> {
        &self.tensors
    }

    /// `general.architecture` (e.g. `llama`); the prefix of the model's hyperparameter
    /// keys. Checking that it is supported is up to the model config.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The value of `key`, or an error naming it.
    pub fn value(&self, key: &str) -> Result<&GgufValue> {
        self.metadata.get(key).ok_or_else(|| self.err(format!("missing metadata key `{key}`")))
    }

    fn mistyped(&self, key: &str, v: &GgufValue, want: &str) -> ModelError {
        self.err(format!("metadata key `{key}` is {}, expected {want}", v.type_description()))
    }

    fn get_int<T: TryFrom<i128>>(&self, key: &str, want: &str) -> Result<T> {
        let v = self.value(key)?;
        let i = v.as_integer().ok_or_else(|| self.mistyped(key, v, want))?;
        T::try_from(i).map_err(|_| self.err(format!("metadata key `{key}` = {i} does not fit in {want}")))
    }

    /// An integer value that fits in u32 (any integer type is accepted).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.get_int(key, "u32")
    }

    /// An integer value that fits in u64 (any integer type is accepted).
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get_int(key, "u64")
    }

    /// An integer value that fits in i32 (any integer type is accepted).
    pub fn get_i32(&self, key: &str) -> Result<i32> {
        self.get_int(key, "i32")
    }

    /// An integer value that fits in i64 (any integer type is accepted).
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        self.get_int(key, "i64")
    }

    /// An integer value that fits in usize (any integer type is accepted).
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        self.get_int(key, "usize")
    }

    /// A float value (f32, or f64 rounded to f32).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.value(key)? {
            GgufValue::F32(x) => Ok(*x),
            GgufValue::F64(x) => Ok(*x as f32),
            v => Err(self.mistyped(key, v, "f32")),
        }
    }

    /// A float value (f64 or f32).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        match self.value(key)? {
            GgufValue::F32(x) => Ok(f64::from(*x)),
            GgufValue::F64(x) => Ok(*x),
            v => Err(self.mistyped(key, v, "f64")),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.value(key)? {
            GgufValue::Bool(b) => Ok(*b),
            v => Err(self.mistyped(key, v, "bool")),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.value(key)? {
            GgufValue::String(s) => Ok(s),
            v => Err(self.mistyped(key, v, "string")),
        }
    }

    /// An array value of any element type.
    pub fn get_array(&self, key: &str) -> Result<&GgufArray> {
        match self.value(key)? {
            GgufValue::Array(a) => Ok(a),
            v => Err(self.mistyped(key, v, "array")),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        match self.value(key)? {
            GgufValue::Array(GgufArray::String(a)) => Ok(a),
            v => Err(self.mistyped(key, v, "array of string")),
        }
    }

    pub fn get_f32_array(&self, key: &str) -> Result<&[f32]> {
        match self.value(key)? {
            GgufValue::Array(GgufArray::F32(a)) => Ok(a),
            v => Err(self.mistyped(key, v, "array of f32")),
        }
    }

    pub fn get_i32_array(&self, key: &str) -> Result<&[i32]> {
        match self.value(key)? {
            GgufValue::Array(GgufArray::I32(a)) => Ok(a),
            v => Err(self.mistyped(key, v, "array of i32")),
        }
    }

    pub fn get_u32_array(&self, key: &str) -> Result<&[u32]> {
        match self.value(key)? {
            GgufValue::Array(GgufArray::U32(a)) => Ok(a),
            v => Err(self.mistyped(key, v, "array of u32")),
        }
    }

    /// `get_u32` for an optional key: `Ok(None)` when absent, an error when mistyped.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get(key).map(|_| self.get_u32(key)).transpose()
    }

    /// `get_f32` for an optional key: `Ok(None)` when absent, an error when mistyped.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.get(key).map(|_| self.get_f32(key)).transpose()
    }

    /// `get_bool` for an optional key: `Ok(None)` when absent, an error when mistyped.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|_| self.get_bool(key)).transpose()
    }

    /// `get_str` for an optional key: `Ok(None)` when absent, an error when mistyped.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|_| self.get_str(key)).transpose()
    }

    /// The info of tensor `name`, or an error naming it.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| self.err(format!("no tensor `{name}` in the file")))
    }

    /// The raw (possibly quantized) bytes of tensor `name`, borrowed from the map.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let info = self.tensor_info(name)?;
        Ok(self.data_of(info))
    }

    fn data_of(&self, info: &TensorInfo) -> &[u8] {
        // Bounds were checked when parsing.
        let start = self.data_offset + info.offset as usize;
        &self.storage.bytes()[start..start + info.n_bytes]
    }

    /// Tensor `name` dequantized to f32, with its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensor_info(name)?;
        let values = dequant::dequantize(info.ggml_type, self.data_of(info), info.n_elements)
            .map_err(|e| self.err(format!("tensor `{name}`: {e}")))?;
        Ok((info.shape.clone(), values))
    }
}

// ---------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------

struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: usize,
    metadata: IndexMap<String, GgufValue>,
    tensors: IndexMap<String, TensorInfo>,
}

/// A bounds-checked little-endian reader. Errors are plain strings; the caller adds
/// the file name.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {} needs {n} bytes at offset {} but only {} are left",
                what(),
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("take returned N bytes"))
    }

    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_size` bytes long, checked against the bytes
    /// left so that it can be allocated.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> Result<usize, String> {
        let n = self.u64(&|| format!("the length of {}", what()))?;
        let left = self.remaining();
        if n > (left / min_size.max(1)) as u64 {
            return Err(format!(
                "{} claims {n} items of at least {min_size} bytes each, but only {left} bytes \
                 are left in the file",
                what()
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, String> {
        let at = self.pos;
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("{} at offset {at} is not UTF-8: {e}", what()))
    }

    fn value_type(&mut self, what: &dyn Fn() -> String) -> Result<GgufValueType, String> {
        let at = self.pos;
        let id = self.u32(&|| format!("the type of {}", what()))?;
        GgufValueType::from_id(id)
            .ok_or_else(|| format!("{} has unknown value type id {id} (at offset {at}; known ids are 0..=12)", what()))
    }

    fn value(&mut self, ty: GgufValueType, depth: usize, what: &dyn Fn() -> String) -> Result<GgufValue, String> {
        use GgufValueType as T;
        Ok(match ty {
            T::U8 => GgufValue::U8(self.u8(what)?),
            T::I8 => GgufValue::I8(self.u8(what)? as i8),
            T::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            T::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            T::U32 => GgufValue::U32(self.u32(what)?),
            T::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            T::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            T::Bool => GgufValue::Bool(self.bool(what)?),
            T::String => GgufValue::String(self.string(what)?),
            T::Array => GgufValue::Array(self.array_value(depth + 1, what)?),
            T::U64 => GgufValue::U64(self.u64(what)?),
            T::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            T::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
        })
    }

    fn bool(&mut self, what: &dyn Fn() -> String) -> Result<bool, String> {
        let at = self.pos;
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("{} at offset {at} is a bool stored as {b}, not 0 or 1", what())),
        }
    }

    fn array_value(&mut self, depth: usize, what: &dyn Fn() -> String) -> Result<GgufArray, String> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(format!("{} nests arrays more than {MAX_ARRAY_DEPTH} deep", what()));
        }
        let ty = self.value_type(&|| format!("the elements of {}", what()))?;
        let n = self.count(ty.min_size(), what)?;
        let item = |i: usize| move || format!("element {i} of {}", what());
        fn fixed<const N: usize, T>(
            r: &mut Reader<'_>,
            n: usize,
            f: impl Fn([u8; N]) -> T,
            what: &dyn Fn() -> String,
        ) -> Result<Vec<T>, String> {
            // `count` checked that n * N bytes are left.
            let bytes = r.take(n * N, what)?;
            Ok(bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunk of N"))).collect())
        }
        use GgufValueType as T;
        Ok(match ty {
            T::U8 => GgufArray::U8(fixed(self, n, |b: [u8; 1]| b[0], what)?),
            T::I8 => GgufArray::I8(fixed(self, n, |b: [u8; 1]| b[0] as i8, what)?),
            T::U16 => GgufArray::U16(fixed(self, n, u16::from_le_bytes, what)?),
            T::I16 => GgufArray::I16(fixed(self, n, i16::from_le_bytes, what)?),
            T::U32 => GgufArray::U32(fixed(self, n, u32::from_le_bytes, what)?),
            T::I32 => GgufArray::I32(fixed(self, n, i32::from_le_bytes, what)?),
            T::F32 => GgufArray::F32(fixed(self, n, f32::from_le_bytes, what)?),
            T::U64 => GgufArray::U64(fixed(self, n, u64::from_le_bytes, what)?),
            T::I64 => GgufArray::I64(fixed(self, n, i64::from_le_bytes, what)?),
            T::F64 => GgufArray::F64(fixed(self, n, f64::from_le_bytes, what)?),
            T::Bool => GgufArray::Bool((0..n).map(|i| self.bool(&item(i))).collect::<Result<_, _>>()?),
            T::String => GgufArray::String((0..n).map(|i| self.string(&item(i))).collect::<Result<_, _>>()?),
            T::Array => {
                GgufArray::Array((0..n).map(|i| self.array_value(depth + 1, &item(i))).collect::<Result<_, _>>()?)
            }
        })
    }
}

fn parse(data: &[u8]) -> Result<Parsed, String> {
    let mut r = Reader { data, pos: 0 };
    let magic = r.array::<4>(&|| "the magic number".into())?;
    if magic != GGUF_MAGIC {
        return Err(format!("not a GGUF file: starts with {magic:02x?}, expected \"GGUF\""));
    }
    let version = r.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => return Err("GGUF version 1 is not supported (only versions 2 and 3); re-convert the model".into()),
        v if matches!(v.swap_bytes(), 2 | 3) => {
            return Err(format!("big-endian GGUF files are not supported (version field {v:#010x})"));
        }
        v => return Err(format!("unsupported GGUF version {v} (only versions 2 and 3 are supported)")),
    }
    // A tensor info is at least name length + n_dims + type + offset = 24 bytes; a
    // key/value pair at least key length + type + one byte = 13 bytes.
    let n_tensors = r.u64(&|| "the tensor count".into())?;
    let n_kv = r.u64(&|| "the metadata count".into())?;
    let left = r.remaining() as u64;
    if n_kv > left / 13 {
        return Err(format!("header claims {n_kv} metadata entries, more than the {left} bytes left could hold"));
    }
    if n_tensors > left / 24 {
        return Err(format!("header claims {n_tensors} tensors, more than the {left} bytes left could hold"));
    }

    let mut metadata = IndexMap::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = r.string(&|| format!("the key of metadata entry {i}"))?;
        let what = || format!("metadata key `{key}`");
        let ty = r.value_type(&what)?;
        let value = r.value(ty, 0, &what)?;
        if metadata.contains_key(&key) {
            return Err(format!("duplicate metadata key `{key}`"));
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(GgufValue::U32(a)) => {
            return Err(format!("`{ALIGNMENT_KEY}` = {a} is not a power of two"));
        }
        Some(v) => {
            return Err(format!("`{ALIGNMENT_KEY}` is {}, expected u32", v.type_description()));
        }
    };

    let mut infos = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&|| format!("the name of tensor {i}"))?;
        let what = || format!("tensor `{name}`");
        let n_dims = r.u32(&|| format!("the dimension count of {}", what()))?;
        if n_dims as usize > MAX_DIMS {
            return Err(format!("{} has {n_dims} dimensions, at most {MAX_DIMS} are supported", what()));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            ne.push(r.u64(&|| format!("dimension {d} of {}", what()))?);
        }
        let type_id = r.u32(&|| format!("the type of {}", what()))?;
        let ggml_type =
            GgmlType::from_id(type_id).ok_or_else(|| format!("{} has unknown ggml type id {type_id}", what()))?;
        let offset = r.u64(&|| format!("the data offset of {}", what()))?;
        infos.push((name, ne, ggml_type, offset));
    }

    let data_offset = (r.pos as u64).next_multiple_of(alignment);
    let data_len = (data.len() as u64).saturating_sub(data_offset);
    let mut tensors = IndexMap::with_capacity(infos.len());
    for (name, ne, ggml_type, offset) in infos {
        let info = tensor_info(name, ne, ggml_type, offset, alignment, data_len)?;
        if tensors.contains_key(&info.name) {
            return Err(format!("duplicate tensor `{}`", info.name));
        }
        tensors.insert(info.name.clone(), info);
    }
    let data_offset = usize::try_from(data_offset).map_err(|_| "data section offset overflows".to_string())?;
    Ok(Parsed { version, alignment, data_offset, metadata, tensors })
}

fn tensor_info(
    name: String,
    ne: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
    alignment: u64,
    data_len: u64,
) -> Result<TensorInfo, String> {
    let dims = ne.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    let mut n: u64 = 1;
    for &d in &ne {
        n = n
            .checked_mul(d)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| format!("tensor `{name}`: the element count of dims [{dims}] overflows"))?;
    }
    let row = ne.first().copied().unwrap_or(1);
    let bs = ggml_type.block_size() as u64;
    if !row.is_multiple_of(bs) {
        return Err(format!(
            "tensor `{name}` of type {ggml_type}: row length {row} is not a multiple of the block size {bs}"
        ));
    }
    let n_bytes = (n / bs)
        .checked_mul(ggml_type.type_size() as u64)
        .ok_or_else(|| format!("tensor `{name}`: the byte size of dims [{dims}] overflows"))?;
    if !offset.is_multiple_of(alignment) {
        return Err(format!("tensor `{name}`: data offset {offset} is not a multiple of the alignment {alignment}"));
    }
    if offset.checked_add(n_bytes).is_none_or(|end| end > data_len) {
        return Err(format!(
            "tensor `{name}` ({ggml_type}, dims [{dims}], {n_bytes} bytes at data offset {offset}) runs past the \
             end of the file (the data section holds {data_len} bytes)"
        ));
    }
    // Everything fits in the file, hence in usize.
    let shape = ne.iter().rev().map(|&d| d as usize).collect();
    Ok(TensorInfo { name, ne, shape, ggml_type, offset, n_elements: n as usize, n_bytes: n_bytes as usize })
}
