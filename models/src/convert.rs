//! `kiln convert`: a GGUF file → a Hugging Face checkpoint directory.
//!
//! [`convert_gguf_to_hf`] writes
//! * `config.json` — [`crate::gguf::model::hf_config_json`] (`model_type: llama`, the tie
//!   flag, BOS/EOS ids, `torch_dtype: float32`);
//! * `generation_config.json` — BOS/EOS ids;
//! * `model.safetensors` — every tensor dequantized to f32 under its Hugging Face name
//!   ([`crate::gguf::model::TENSOR_NAMES`]), q/k rows un-permuted, q/k/v and gate/up as
//!   separate tensors (as transformers stores them);
//! * `tokenizer.json` and `tokenizer_config.json` — [`crate::gguf::tokenizer`]'s
//!   (chat template, BOS/EOS tokens, `add_bos_token`).
//!
//! The tensors are checked against the model the config describes before anything is
//! written, and `model.safetensors` is streamed tensor by tensor (written under a
//! temporary name, then renamed), so memory stays at one tensor.

use crate::gguf::model::{config_from_gguf, hf_config_json, GgufTensors};
use crate::gguf::tokenizer::{tokenizer_config_json, tokenizer_from_gguf, tokenizer_json};
use crate::gguf::GgufFile;
use crate::llama::LlamaForCausalLM;
use crate::weights::{check_weights, TensorSource};
use crate::{ModelError, Result};
use serde_json::{json, Map, Value};
use std::io::{BufWriter, Write};
use std::path::Path;

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.to_path_buf(), source }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    text.push('\n');
    std::fs::write(path, text).map_err(io_err(path))
}

/// Converts the GGUF file `gguf` into a Hugging Face checkpoint in `out_dir` (created if
/// needed; existing files of the same names are replaced). See the module docs.
pub fn convert_gguf_to_hf(gguf: &Path, out_dir: &Path) -> Result<()> {
    let g = GgufFile::open(gguf)?;
    let config = hf_config_json(&g)?;
    let model = LlamaForCausalLM::new(config_from_gguf(&g)?)?;
    let tensors = GgufTensors::new(&g, &model.config);
    check_weights(&tensors, &model)?;
    // Build the tokenizer once so that a broken one fails before anything is written.
    tokenizer_from_gguf(&g)?;
    let (tok_json, tok_config) = (tokenizer_json(&g)?, tokenizer_config_json(&g)?);

    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    write_json(&out_dir.join("config.json"), &config)?;
    let mut gen = Map::new();
    for key in ["bos_token_id", "eos_token_id"] {
        if let Some(v) = config.get(key) {
            gen.insert(key.into(), v.clone());
        }
    }
    write_json(&out_dir.join("generation_config.json"), &Value::Object(gen))?;
    write_safetensors(&tensors, &out_dir.join(crate::weights::SINGLE_FILE))?;
    write_json(&out_dir.join("tokenizer.json"), &tok_json)?;
    write_json(&out_dir.join("tokenizer_config.json"), &tok_config)?;
    Ok(())
}

/// Writes every tensor of `src` as f32 into one safetensors file, streaming.
fn write_safetensors(src: &impl TensorSource, path: &Path) -> Result<()> {
    let names = src.tensor_names();
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    let mut shapes = Vec::with_capacity(names.len());
    for name in &names {
        let shape = match src.tensor_shape(name) {
            Some(Ok(s)) => s,
            Some(Err(why)) => return Err(ModelError::Weights(format!("  {} {why}", src.describe(name)))),
            None => return Err(ModelError::Weights(format!("  missing {}", src.describe(name)))),
        };
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(name.clone(), json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
        shapes.push(shape);
    }
    let mut header = serde_json::to_string(&Value::Object(header)).expect("JSON values serialize");
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let part = path.with_extension("safetensors.part");
    let file = std::fs::File::create(&part).map_err(io_err(&part))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let write = |w: &mut BufWriter<std::fs::File>, bytes: &[u8]| w.write_all(bytes).map_err(io_err(&part));
    write(&mut w, &(header.len() as u64).to_le_bytes())?;
    write(&mut w, header.as_bytes())?;
    for (name, shape) in names.iter().zip(&shapes) {
        let values = src.read_f32(name)?;
        debug_assert_eq!(values.len(), shape.iter().product::<usize>());
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        write(&mut w, &bytes)?;
    }
    w.flush().map_err(io_err(&part))?;
    drop(w);
    std::fs::rename(&part, path).map_err(io_err(path))
}
