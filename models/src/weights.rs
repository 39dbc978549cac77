//! Checkpoint loading: memory-mapped safetensors, single-file (`model.safetensors`) or
//! sharded (`model.safetensors.index.json`), f32/f16/bf16 sources cast to the dtype the
//! model is traced in.
//!
//! [`load_weights`] maps HF names to kiln parameters through the model's table
//! ([`crate::llama::WEIGHT_MAP`]), checks every shape, and reports every missing,
//! unexpected and mis-shaped tensor at once.

use crate::llama::{LlamaForCausalLM, WeightSource};
use crate::{ModelError, Result};
use indexmap::IndexMap;
use kiln_ops::{DType, HostTensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor of a checkpoint: where it lives and what it is.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    /// Index into the checkpoint's files.
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the file.
    range: (usize, usize),
}

struct Mapped {
    path: PathBuf,
    mmap: Mmap,
}

/// The safetensors files of a checkpoint directory, memory-mapped, with their headers
/// parsed and validated.
pub struct Checkpoint {
    files: Vec<Mapped>,
    tensors: IndexMap<String, TensorEntry>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` and its shards, or else
    /// `dir/model.safetensors`. Missing files are `Io` errors naming the path; corrupt or
    /// truncated ones are `WeightFile` errors naming the file.
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let dir = dir.as_ref();
        let index_path = dir.join(INDEX_FILE);
        let (names, index) = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| ModelError::Io { path: index_path.clone(), source })?;
            let bad = |msg: String| ModelError::WeightFile { path: index_path.clone(), msg };
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let map =
                json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no `weight_map`".into()))?;
            let mut index = IndexMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| bad(format!("file of `{tensor}` is not a string")))?;
                index.insert(tensor.clone(), file.to_string());
            }
            let mut names: Vec<String> = index.values().cloned().collect();
            names.dedup();
            let mut seen = HashSet::new();
            names.retain(|n| seen.insert(n.clone()));
            (names, Some(index))
        } else {
            (vec![SINGLE_FILE.to_string()], None)
        };
        let mut ckpt = Checkpoint { files: Vec::new(), tensors: IndexMap::new() };
        for name in names {
            ckpt.add_file(dir.join(name))?;
        }
        if let Some(index) = index {
            for (tensor, file) in index {
                let at = ckpt.tensors.get(&tensor).map(|e| &ckpt.files[e.file].path);
                if at.and_then(|p| p.file_name()) != Some(std::ffi::OsStr::new(&file)) {
                    return Err(ModelError::WeightFile {
                        path: index_path,
                        msg: format!("lists `{tensor}` in `{file}`, which does not hold it"),
                    });
                }
            }
        }
        Ok(ckpt)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
        let bad = |msg: String| ModelError::WeightFile { path: path.clone(), msg };
        // SAFETY: the map is read-only; like every mmap-based loader we assume the file
        // is not modified while the checkpoint is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| bad(format!("cannot map: {e}")))?;
        let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            let hint = match e {
                SafeTensorError::MetadataIncompleteBuffer
                | SafeTensorError::HeaderTooSmall
                | SafeTensorError::InvalidHeaderLength => " (truncated?)",
                _ => "",
            };
            bad(format!("not a valid safetensors file of {} bytes: {e}{hint}", mmap.len()))
        })?;
        let start = 8 + n;
        let fi = self.files.len();
        let mut infos: Vec<_> = meta.tensors().into_iter().collect();
        infos.sort_by_key(|(_, info)| info.data_offsets);
        for (name, info) in infos {
            if let Some(prev) = self.tensors.get(&name) {
                let other = self.files[prev.file].path.display();
                return Err(bad(format!("tensor `{name}` is also in `{other}`")));
            }
            let (a, b) = info.data_offsets;
            let entry =
                TensorEntry { file: fi, dtype: info.dtype, shape: info.shape.clone(), range: (start + a, start + b) };
            self.tensors.insert(name, entry);
        }
        self.files.push(Mapped { path, mmap });
        Ok(())
    }

    /// Tensor names, file by file in storage order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// The file holding a tensor.
    pub fn path_of(&self, entry: &TensorEntry) -> &Path {
        &self.files[entry.file].path
    }

    /// The raw little-endian bytes of a tensor.
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.files[entry.file].mmap[entry.range.0..entry.range.1]
    }

    /// A float tensor's values as f32 (`None` for other dtypes).
    pub fn to_f32(&self, entry: &TensorEntry) -> Option<Vec<f32>> {
        let b = self.bytes(entry);
        let u16s = || b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
        Some(match entry.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => u16s().map(|x| half::f16::from_bits(x).to_f32()).collect(),
            Dtype::BF16 => u16s().map(|x| half::bf16::from_bits(x).to_f32()).collect(),
            _ => return None,
        })
    }
}

fn is_float_source(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// `config.json` and the weights of the checkpoint in `dir`: the model and its weights
/// as `dtype`, ready for [`LlamaForCausalLM::trace`] with the same dtype and an executor.
pub fn load_pretrained(
    dir: impl AsRef<Path>,
    dtype: DType,
) -> Result<(LlamaForCausalLM, IndexMap<String, HostTensor>)> {
    let dir = dir.as_ref();
    let model = LlamaForCausalLM::new(crate::config::LlamaConfig::from_file(dir.join("config.json"))?)?;
    let weights = load_weights(dir, &model, dtype)?;
    Ok((model, weights))
}

/// Reads the checkpoint in `dir` for `model`, as `dtype` tensors keyed by kiln
/// parameter name (ready for an executor). Every traced parameter must be found with
/// its exact shape; all missing, mis-shaped and unexpected HF tensors are reported in
/// one [`ModelError::Weights`].
pub fn load_weights(
    dir: impl AsRef<Path>,
    model: &LlamaForCausalLM,
    dtype: DType,
) -> Result<IndexMap<String, HostTensor>> {
    assemble_weights(&Checkpoint::open(dir)?, model, dtype)
}

/// What [`assemble_weights`] needs of a checkpoint: tensors by Hugging Face name, with
/// their shapes, readable as f32. Implemented by [`Checkpoint`] (safetensors) and by
/// the GGUF loader ([`crate::gguf::model`]), so both check weights the same way.
pub trait TensorSource {
    /// Every tensor name (HF naming), in storage order.
    fn tensor_names(&self) -> Vec<String>;
    /// The row-major shape of `name`, `None` when absent, `Err(why)` when present but
    /// unusable (e.g. an integer dtype).
    fn tensor_shape(&self, name: &str) -> Option<std::result::Result<Vec<usize>, String>>;
    /// The values of `name` as f32 (called only for names whose shape checked out).
    fn read_f32(&self, name: &str) -> Result<Vec<f32>>;
    /// How `name` is shown in error messages (e.g. with the file's own tensor name).
    fn describe(&self, name: &str) -> String {
        format!("`{name}`")
    }
}

impl TensorSource for Checkpoint {
    fn tensor_names(&self) -> Vec<String> {
        self.names().map(str::to_string).collect()
    }

    fn tensor_shape(&self, name: &str) -> Option<std::result::Result<Vec<usize>, String>> {
        self.get(name).map(|e| {
            if is_float_source(e.dtype) {
                Ok(e.shape.clone())
            } else {
                Err(format!("has dtype {:?}, expected F32, F16 or BF16", e.dtype))
            }
        })
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.get(name).ok_or_else(|| ModelError::Weights(format!("  missing `{name}`")))?;
        self.to_f32(e).ok_or_else(|| ModelError::Weights(format!("  `{name}` is not a float tensor")))
    }
}

/// Assembles the weights of `model` from `src`: every traced parameter from its HF
/// tensors ([`LlamaForCausalLM::weight_sources`], fused ones concatenated along dim 0),
/// as `dtype`. All missing, mis-shaped, unusable and unexpected tensors are reported in
/// one [`ModelError::Weights`] before anything is read.
pub fn assemble_weights(
    src: &impl TensorSource,
    model: &LlamaForCausalLM,
    dtype: DType,
) -> Result<IndexMap<String, HostTensor>> {
    let sources = model.weight_sources(dtype)?;
    check_sources(src, model, &sources)?;
    let mut out = IndexMap::with_capacity(sources.len());
    for s in sources {
        let mut values = Vec::new();
        for (hf, _) in &s.parts {
            values.extend(src.read_f32(hf)?);
        }
        let shape = s.ty.shape.as_fixed().expect("parameters have fixed shapes");
        out.insert(s.name, HostTensor::from_f32(&shape, values).cast(dtype));
    }
    Ok(out)
}

/// The checks of [`assemble_weights`] alone: that `src` holds every tensor `model` needs
/// with its exact shape, and nothing unexpected.
pub fn check_weights(src: &impl TensorSource, model: &LlamaForCausalLM) -> Result<()> {
    check_sources(src, model, &model.weight_sources(DType::F32)?)
}

fn check_sources(src: &impl TensorSource, model: &LlamaForCausalLM, sources: &[WeightSource]) -> Result<()> {
    let (mut missing, mut wrong, mut used) = (Vec::new(), Vec::new(), HashSet::new());
    for s in sources {
        for (hf, shape) in &s.parts {
            used.insert(hf.as_str());
            let part_of = if s.parts.len() > 1 { format!(" (part of `{}`)", s.name) } else { String::new() };
            match src.tensor_shape(hf) {
                None => missing.push(format!("  missing {}{part_of}", src.describe(hf))),
                Some(Ok(got)) if &got != shape => {
                    wrong.push(format!("  {} has shape {got:?}, expected {shape:?}{part_of}", src.describe(hf)))
                }
                Some(Err(why)) => wrong.push(format!("  {} {why}", src.describe(hf))),
                Some(Ok(_)) => {}
            }
        }
    }
    let names = src.tensor_names();
    let unexpected = names
        .iter()
        .filter(|n| !used.contains(n.as_str()) && !model.is_ignored_hf_tensor(n))
        .map(|n| format!("  unexpected {}", src.describe(n)));
    let problems: Vec<String> = missing.into_iter().chain(wrong).chain(unexpected).collect();
    if !problems.is_empty() {
        return Err(ModelError::Weights(problems.join("\n")));
    }
    Ok(())
}
