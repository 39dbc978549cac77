//! The tokenizer of a GGUF file (`tokenizer.ggml.*`), as a Hugging Face `tokenizer.json`
//! value loaded into kiln's [`Tokenizer`].
//!
//! [`tokenizer_json`] and [`tokenizer_config_json`] build the two files a Hugging Face
//! checkpoint would hold; [`Tokenizer::from_gguf`] loads them, and [`crate::convert`]
//! writes them — one construction for both.
//!
//! * **`gpt2` (byte-level BPE).** Vocabulary `tokenizer.ggml.tokens` (ids in order),
//!   merges `tokenizer.ggml.merges`, and the pre-tokenizer llama.cpp uses for
//!   `tokenizer.ggml.pre` (`gpt-2`, `smollm`, `starcoder`, `llama-bpe`, `qwen2`, …): the
//!   same regex splits, written as `tokenizers` pre-tokenizers. An unknown `pre` is an
//!   error naming it.
//! * **`llama` (SentencePiece).** Vocabulary and `tokenizer.ggml.scores` become a BPE
//!   with byte fallback whose merges are derived from the scores, as transformers'
//!   `GGUFLlamaConverter` does; a `▁` is prepended (when `tokenizer.ggml.add_space_prefix`,
//!   default true) and spaces become `▁`.
//!
//! Tokens of type 3 (control) become special added tokens and type 4 (user-defined)
//! plain added tokens, so that they are matched whole in text. BOS/EOS come from
//! `tokenizer.ggml.{bos,eos}_token_id`, `add_bos_token` from `tokenizer.ggml.add_bos_token`
//! (default: true for `llama`, false for `gpt2`), the chat template from
//! `tokenizer.chat_template`.

use super::GgufFile;
use crate::tokenizer::{Tokenizer, TokenizerConfig};
use crate::{ModelError, Result};
use serde_json::{json, Map, Value};

/// llama.cpp's token types (`llama_token_type`).
pub const TOKEN_TYPE_CONTROL: i32 = 3;
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3` regex.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2` regex.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a `tokenizer.ggml.pre` splits text before BPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pre {
    /// GPT-2's regex (`LLAMA_VOCAB_PRE_TYPE_GPT2`).
    Gpt2,
    /// Every digit alone, then GPT-2's regex (`LLAMA_VOCAB_PRE_TYPE_SMOLLM`,
    /// `_STARCODER`, `_REFACT`).
    DigitsGpt2,
    /// Llama 3's regex; whole words in the vocabulary skip the merges.
    Llama3,
    /// Qwen2's regex.
    Qwen2,
}

/// The `tokenizer.ggml.pre` values supported, with llama.cpp's pre-tokenizer type.
const PRE_TOKENIZERS: &[(&str, Pre)] = &[
    ("gpt-2", Pre::Gpt2),
    ("gpt2", Pre::Gpt2),
    ("phi-2", Pre::Gpt2),
    ("smollm", Pre::DigitsGpt2),
    ("starcoder", Pre::DigitsGpt2),
    ("refact", Pre::DigitsGpt2),
    ("llama-bpe", Pre::Llama3),
    ("llama3", Pre::Llama3),
    ("llama-v3", Pre::Llama3),
    ("qwen2", Pre::Qwen2),
];

fn tok_err(g: &GgufFile, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("`{}`: {msg}", g.path().display()))
}

/// `tokenizer.ggml.token_type`, defaulting to normal (1) for every token when absent.
fn token_types(g: &GgufFile, n: usize) -> Result<Vec<i32>> {
    if g.get("tokenizer.ggml.token_type").is_none() {
        return Ok(vec![1; n]);
    }
    let types = g.get_i32_array("tokenizer.ggml.token_type")?;
    if types.len() != n {
        return Err(tok_err(g, format!("{} token types for {n} tokens", types.len())));
    }
    Ok(types.to_vec())
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": special
    })
}

fn vocab_map(g: &GgufFile, tokens: &[String]) -> Result<Map<String, Value>> {
    let mut vocab = Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if let Some(prev) = vocab.insert(t.clone(), json!(i)) {
            return Err(tok_err(g, format!("token {t:?} appears twice in the vocabulary (ids {prev} and {i})")));
        }
    }
    Ok(vocab)
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex})
}

fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// The tokenizer of the file as a Hugging Face `tokenizer.json` value.
pub fn tokenizer_json(g: &GgufFile) -> Result<Value> {
    let model = g.get_str("tokenizer.ggml.model")?;
    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    let types = token_types(g, tokens.len())?;
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(i, &t)| added_token(i, &tokens[i], t == TOKEN_TYPE_CONTROL))
        .collect();
    let vocab = vocab_map(g, tokens)?;
    let (normalizer, pre_tokenizer, decoder, model_json) = match model {
        "gpt2" => {
            let pre_name = g
                .opt_str("tokenizer.ggml.pre")?
                .ok_or_else(|| tok_err(g, "no `tokenizer.ggml.pre`: cannot tell how this BPE tokenizer splits text"))?;
            let pre = PRE_TOKENIZERS.iter().find(|(n, _)| *n == pre_name).map(|(_, p)| *p).ok_or_else(|| {
                let names: Vec<_> = PRE_TOKENIZERS.iter().map(|(n, _)| *n).collect();
                ModelError::Unsupported(format!(
                    "tokenizer pre-type `{pre_name}` (`tokenizer.ggml.pre`) in `{}` (supported: {})",
                    g.path().display(),
                    names.join(", ")
                ))
            })?;
            let pre_tokenizer = match pre {
                Pre::Gpt2 => byte_level(true),
                Pre::DigitsGpt2 => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(true),
                ]}),
                Pre::Llama3 => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
                Pre::Qwen2 => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
            };
            let merges: Vec<Value> = g
                .get_str_array("tokenizer.ggml.merges")?
                .iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| json!([a, b]))
                        .ok_or_else(|| tok_err(g, format!("merge {m:?} is not two tokens separated by a space")))
                })
                .collect::<Result<_>>()?;
            let model_json = json!({
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": pre == Pre::Llama3, "vocab": vocab, "merges": merges
            });
            (Value::Null, pre_tokenizer, byte_level(true), model_json)
        }
        "llama" => {
            let scores = g.get_f32_array("tokenizer.ggml.scores")?;
            if scores.len() != tokens.len() {
                return Err(tok_err(g, format!("{} scores for {} tokens", scores.len(), tokens.len())));
            }
            let merges: Vec<Value> =
                merges_from_scores(tokens, scores).into_iter().map(|(a, b)| json!([a, b])).collect();
            let unk = match g.opt_u32("tokenizer.ggml.unknown_token_id")? {
                Some(id) => Some(
                    tokens
                        .get(id as usize)
                        .ok_or_else(|| tok_err(g, format!("unknown token id {id} is outside the vocabulary")))?,
                ),
                None => None,
            };
            let prefix = g.opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
            let normalizer = if prefix {
                json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
            } else {
                replace
            };
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let model_json = json!({
                "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                "ignore_merges": false, "vocab": vocab, "merges": merges
            });
            (normalizer, Value::Null, json!({"type": "Sequence", "decoders": decoders}), model_json)
        }
        other => {
            return Err(ModelError::Unsupported(format!(
                "tokenizer model `{other}` (`tokenizer.ggml.model`) in `{}` (supported: gpt2, llama)",
                g.path().display()
            )))
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": decoder,
        "model": model_json,
    }))
}

/// BPE merges for a SentencePiece vocabulary with scores, as transformers'
/// `GGUFTokenizerSkeleton` derives them: every split of every piece into two pieces of
/// the vocabulary, ranked by the score of the merged piece (highest first), ties broken
/// by the scores of the two halves and then by vocabulary order.
pub fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let score: std::collections::HashMap<&str, f32> =
        tokens.iter().zip(scores).map(|(t, &s)| (t.as_str(), s)).collect();
    let mut merges: Vec<(String, String, f32)> = Vec::new();
    for (piece, &piece_score) in tokens.iter().zip(scores) {
        let mut local: Vec<(&str, &str)> = piece
            .char_indices()
            .skip(1)
            .map(|(i, _)| piece.split_at(i))
            .filter(|(l, r)| score.contains_key(l) && score.contains_key(r))
            .collect();
        // Python's sort(reverse=True) is stable: equal keys keep their order.
        local.sort_by(|a, b| {
            let ka = (score[a.0], score[a.1]);
            let kb = (score[b.0], score[b.1]);
            kb.partial_cmp(&ka).unwrap_or(std::cmp::Ordering::Equal)
        });
        merges.extend(local.into_iter().map(|(l, r)| (l.to_string(), r.to_string(), piece_score)));
    }
    merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

/// The `tokenizer_config.json` a Hugging Face checkpoint would hold: BOS/EOS tokens,
/// `add_bos_token`, the chat template.
pub fn tokenizer_config_json(g: &GgufFile) -> Result<Value> {
    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    let token = |key: &str| -> Result<Option<String>> {
        match g.opt_u32(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id as usize)
                .cloned()
                .map(Some)
                .ok_or_else(|| tok_err(g, format!("`{key}` = {id} is outside the vocabulary of {}", tokens.len()))),
        }
    };
    let default_bos = g.get_str("tokenizer.ggml.model")? == "llama";
    let mut cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "add_bos_token": g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(default_bos),
        "add_eos_token": g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
    });
    let obj = cfg.as_object_mut().expect("an object");
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(t) = token(key)? {
            obj.insert(name.into(), json!(t));
        }
    }
    if let Some(t) = g.opt_str("tokenizer.chat_template")? {
        obj.insert("chat_template".into(), json!(t));
    }
    if let Some(n) = g.architecture().ok().and_then(|a| g.opt_u32(&format!("{a}.context_length")).ok().flatten()) {
        obj.insert("model_max_length".into(), json!(n));
    }
    Ok(cfg)
}

/// The tokenizer of an open GGUF file (see the module docs).
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<Tokenizer> {
    let cfg_json = tokenizer_config_json(g)?;
    let what = format!("{} (tokenizer config from GGUF metadata)", g.path().display());
    let config = TokenizerConfig::from_json_str(&cfg_json.to_string(), &what)?;
    let tok_json = tokenizer_json(g)?;
    Tokenizer::from_json_str(&tok_json.to_string(), config).map_err(|e| match e {
        ModelError::Tokenizer(m) => tok_err(g, m),
        other => other,
    })
}

impl Tokenizer {
    /// The tokenizer, special tokens and chat template of a GGUF file
    /// (see [`crate::gguf::tokenizer`]).
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        tokenizer_from_gguf(g)
    }
}
