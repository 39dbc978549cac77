//! Tokenizer: `tokenizer.json` through the `tokenizers` crate, `tokenizer_config.json`
//! for the special tokens and the chat template, chat templates rendered with
//! `minijinja`, and incremental (streaming) decoding that never splits a character.
//!
//! * **Special tokens.** `bos_token` / `eos_token` in `tokenizer_config.json` may be
//!   strings or `AddedToken` objects (`{"content": "<s>", ...}`). `add_bos_token`
//!   (as in Hugging Face's Llama tokenizers) overrides whether [`Tokenizer::encode`]
//!   starts the ids with BOS when special tokens are requested: `true` makes sure the
//!   ids start with it, `false` removes one that the post-processor added.
//! * **Chat templates** come from `chat_template` in `tokenizer_config.json` (a string,
//!   or a list of `{name, template}` of which `default` is used), or from
//!   `chat_template.jinja` / `chat_template.json` beside it. They are rendered like
//!   `transformers` does: `trim_blocks` and `lstrip_blocks` on, Python string methods
//!   (`.strip()`, `.startswith()`, …) through `minijinja_contrib::pycompat`, and the
//!   globals `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
//!   `raise_exception(msg)` and `strftime_now(fmt)`. The rendered text already holds
//!   the special tokens, so encode it with `add_special_tokens = false`.
//! * **Streaming.** [`DecodeStream`] decodes the full id list after each new token
//!   and emits the new suffix only once it does not end in U+FFFD, so a multi-byte
//!   character split across byte-level tokens comes out whole.

use crate::{ModelError, Result};
use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
    pub fn system(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("assistant", content)
    }
}

/// The parts of `tokenizer_config.json` that generation uses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos_token: Option<bool>,
}

impl TokenizerConfig {
    /// Parses `tokenizer_config.json` text; `what` names the file in errors.
    pub fn from_json_str(json: &str, what: &str) -> Result<TokenizerConfig> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| ModelError::Tokenizer(format!("`{what}` is not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| ModelError::Tokenizer(format!("`{what}` is not a JSON object")))?;
        let token = |key: &str| -> Result<Option<String>> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(serde_json::Value::Object(o)) => match o.get("content") {
                    Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(ModelError::Tokenizer(format!("`{what}`: `{key}` object has no string `content`"))),
                },
                Some(other) => Err(ModelError::Tokenizer(format!(
                    "`{what}`: `{key}` must be a string or an AddedToken object, got {other}"
                ))),
            }
        };
        let chat_template = match obj.get("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => {
                let named = |n: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(|x| x.as_str()) == Some(n))
                        .and_then(|t| t.get("template").and_then(|x| x.as_str()).map(str::to_string))
                };
                Some(named("default").ok_or_else(|| {
                    ModelError::Tokenizer(format!("`{what}`: `chat_template` list has no template named `default`"))
                })?)
            }
            Some(other) => {
                return Err(ModelError::Tokenizer(format!(
                    "`{what}`: `chat_template` must be a string or a list, got {other}"
                )))
            }
        };
        let add_bos_token = match obj.get("add_bos_token") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Bool(b)) => Some(*b),
            Some(other) => {
                return Err(ModelError::Tokenizer(format!("`{what}`: `add_bos_token` must be a bool, got {other}")))
            }
        };
        Ok(TokenizerConfig {
            chat_template,
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            add_bos_token,
        })
    }
}

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    config: TokenizerConfig,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    template: Option<Environment<'static>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("config", &self.config)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io { path: path.to_path_buf(), source }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` and
    /// `chat_template.jinja` / `chat_template.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let tok_path = dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&tok_path).map_err(|e| io_err(&tok_path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let mut config = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| io_err(&cfg_path, e))?;
            TokenizerConfig::from_json_str(&text, &cfg_path.display().to_string())?
        } else {
            TokenizerConfig::default()
        };
        let jinja = dir.join("chat_template.jinja");
        let tmpl_json = dir.join("chat_template.json");
        if jinja.exists() {
            config.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| io_err(&jinja, e))?);
        } else if tmpl_json.exists() {
            let text = std::fs::read_to_string(&tmpl_json).map_err(|e| io_err(&tmpl_json, e))?;
            let t = TokenizerConfig::from_json_str(&text, &tmpl_json.display().to_string())?;
            if t.chat_template.is_some() {
                config.chat_template = t.chat_template;
            }
        }
        Tokenizer::from_json_str(&json, config).map_err(|e| match e {
            ModelError::Tokenizer(m) => ModelError::Tokenizer(format!("`{}`: {m}", tok_path.display())),
            other => other,
        })
    }

    /// Builds a tokenizer from `tokenizer.json` text and a parsed config.
    pub fn from_json_str(tokenizer_json: &str, config: TokenizerConfig) -> Result<Tokenizer> {
        let inner: tokenizers::Tokenizer =
            tokenizer_json.parse().map_err(|e| ModelError::Tokenizer(format!("cannot parse tokenizer.json: {e}")))?;
        let id_of = |t: &Option<String>, which: &str| -> Result<Option<u32>> {
            match t {
                None => Ok(None),
                Some(s) => inner
                    .token_to_id(s)
                    .map(Some)
                    .ok_or_else(|| ModelError::Tokenizer(format!("{which} token `{s}` is not in the vocabulary"))),
            }
        };
        let bos_id = id_of(&config.bos_token, "bos")?;
        let eos_id = id_of(&config.eos_token, "eos")?;
        let template = match &config.chat_template {
            None => None,
            Some(src) => Some(build_template_env(src)?),
        };
        Ok(Tokenizer { inner, config, bos_id, eos_id, template })
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.config.bos_token.as_deref()
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.config.eos_token.as_deref()
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_id
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Encodes `text`. With `add_special_tokens`, the post-processor's special tokens
    /// are added and `add_bos_token` from the config is honoured (see the module docs).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = |special: bool| -> Result<Vec<u32>> {
            self.inner
                .encode(text, special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenizer(format!("cannot encode text: {e}")))
        };
        let mut ids = enc(add_special_tokens)?;
        if add_special_tokens {
            if let Some(bos) = self.bos_id {
                match self.config.add_bos_token {
                    Some(true) if ids.first() != Some(&bos) => ids.insert(0, bos),
                    Some(false) if ids.first() == Some(&bos) && enc(false)?.first() != Some(&bos) => {
                        ids.remove(0);
                    }
                    _ => {}
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer(format!("cannot decode ids: {e}")))
    }

    /// Renders the chat template over `messages`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = self.template.as_ref().ok_or_else(|| {
            ModelError::Template(
                "the tokenizer has no chat template (no `chat_template` in tokenizer_config.json)".into(),
            )
        })?;
        let tmpl = env.get_template("chat").map_err(|e| ModelError::Template(format!("{e:#}")))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.config.bos_token.clone().unwrap_or_default(),
            eos_token => self.config.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| ModelError::Template(format!("{e:#}")))
    }

    /// A streaming decoder over this tokenizer.
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream<'_> {
        DecodeStream { tok: self, ids: Vec::new(), emitted: 0, skip_special_tokens }
    }
}

fn build_template_env(src: &str) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| -> String { strftime_now(&fmt) });
    env.add_template_owned("chat", src.to_string())
        .map_err(|e| ModelError::Template(format!("cannot compile chat template: {e:#}")))?;
    Ok(env)
}

/// A small `strftime` over the current UTC date (`%d %m %Y %y %b %B %H %M %S %%`),
/// enough for the date lines of Llama 3.x templates.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Incremental decoding for streaming: push ids one at a time and get back text deltas
/// that never split a UTF-8 character.
pub struct DecodeStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Bytes of the decoded text already emitted.
    emitted: usize,
    skip_special_tokens: bool,
}

impl DecodeStream<'_> {
    /// Adds one id; returns the new text (empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, self.skip_special_tokens)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(String::new());
        }
        let delta = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(delta)
    }

    /// Whatever has not been emitted yet (a trailing U+FFFD if the ids really end in
    /// an incomplete character).
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tok.decode(&self.ids, self.skip_special_tokens)?;
        if text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(String::new());
        }
        let delta = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(delta)
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// GPT-2's byte → printable character map used by byte-level BPE.
pub fn byte_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).expect("latin-1 is valid")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid code point")
        };
    }
    map
}

/// A tiny byte-level BPE `tokenizer.json` for tests and smoke runs: ids `0..256` are the
/// bytes (no merges), followed by `specials` as special added tokens (ids `256..`).
/// Any text round-trips; every byte is one token.
pub fn tiny_byte_level_tokenizer_json(specials: &[&str]) -> String {
    let map = byte_to_unicode();
    let vocab: serde_json::Map<String, serde_json::Value> =
        map.iter().enumerate().map(|(i, c)| (c.to_string(), serde_json::Value::from(i))).collect();
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({
                "id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true
    });
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    })
    .to_string()
}
