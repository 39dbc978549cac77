//! Tokenizer: special tokens, chat templates (Llama 3, ChatML, Mistral) and streaming
//! decode over a tiny byte-level BPE tokenizer built in the test.

use kiln_models::tokenizer::{tiny_byte_level_tokenizer_json, ChatMessage, Tokenizer, TokenizerConfig};
use kiln_models::ModelError;

const SPECIALS: [&str; 6] = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>"];

/// The chat template of Meta-Llama-3-8B-Instruct, verbatim.
const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// The ChatML template of SmolLM2-Instruct, verbatim.
const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Mistral-7B-Instruct-v0.1's template: Python `.strip()` and `raise_exception`.
const MISTRAL_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + eos_token }}{% endif %}{% endfor %}";

/// A multi-line template in the style of Qwen2 (block tags on their own lines rely on
/// `trim_blocks` / `lstrip_blocks`).
const QWEN_STYLE_TEMPLATE: &str = "{% for message in messages %}
    {% if loop.first and messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
{%- endfor %}
{% if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
";

fn config(template: Option<&str>, bos: &str, eos: &str, add_bos: Option<bool>) -> TokenizerConfig {
    TokenizerConfig {
        chat_template: template.map(str::to_string),
        bos_token: Some(bos.into()),
        eos_token: Some(eos.into()),
        add_bos_token: add_bos,
    }
}

fn tok(cfg: TokenizerConfig) -> Tokenizer {
    Tokenizer::from_json_str(&tiny_byte_level_tokenizer_json(&SPECIALS), cfg).unwrap()
}

fn chat() -> Vec<ChatMessage> {
    vec![ChatMessage::system("You are helpful."), ChatMessage::user("  Hi!\n")]
}

#[test]
fn byte_level_round_trip() {
    let t = tok(TokenizerConfig::default());
    assert_eq!(t.vocab_size(), 256 + SPECIALS.len());
    let text = "héllo wörld 😀!";
    let ids = t.encode(text, false).unwrap();
    assert_eq!(ids.len(), text.len(), "one token per byte");
    assert_eq!(t.decode(&ids, true).unwrap(), text);
    // Special tokens in text are recognised and skipped on decode.
    let ids = t.encode("<|im_start|>hi<|im_end|>", false).unwrap();
    assert_eq!(ids, vec![258, b'h' as u32, b'i' as u32, 259]);
    assert_eq!(t.decode(&ids, true).unwrap(), "hi");
    assert_eq!(t.decode(&ids, false).unwrap(), "<|im_start|>hi<|im_end|>");
}

#[test]
fn add_bos_token_controls_the_bos() {
    let t = tok(config(None, "<s>", "</s>", Some(true)));
    assert_eq!(t.bos_token_id(), Some(256));
    assert_eq!(t.eos_token_id(), Some(257));
    assert_eq!(t.encode("ab", true).unwrap(), vec![256, 97, 98]);
    assert_eq!(t.encode("ab", false).unwrap(), vec![97, 98]);
    // Text that already starts with BOS does not get a second one.
    assert_eq!(t.encode("<s>ab", true).unwrap(), vec![256, 97, 98]);
    let t = tok(config(None, "<s>", "</s>", None));
    assert_eq!(t.encode("ab", true).unwrap(), vec![97, 98]);
}

#[test]
fn config_accepts_added_token_objects_and_template_lists() {
    let json = r#"{
        "add_bos_token": true,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "eos_token": {"content": "</s>", "special": true},
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ bos_token }}"}]
    }"#;
    let c = TokenizerConfig::from_json_str(json, "tokenizer_config.json").unwrap();
    assert_eq!(c.bos_token.as_deref(), Some("<s>"));
    assert_eq!(c.eos_token.as_deref(), Some("</s>"));
    assert_eq!(c.add_bos_token, Some(true));
    assert_eq!(c.chat_template.as_deref(), Some("{{ bos_token }}"));
    let c = TokenizerConfig::from_json_str(r#"{"bos_token": null, "eos_token": "</s>"}"#, "x").unwrap();
    assert_eq!(c.bos_token, None);
    let e = TokenizerConfig::from_json_str(r#"{"bos_token": 5}"#, "tokenizer_config.json").unwrap_err();
    assert!(e.to_string().contains("bos_token"), "{e}");
    let e = TokenizerConfig::from_json_str("{", "tokenizer_config.json").unwrap_err();
    assert!(e.to_string().contains("tokenizer_config.json"), "{e}");
}

#[test]
fn unknown_special_token_is_an_error() {
    let e = Tokenizer::from_json_str(&tiny_byte_level_tokenizer_json(&[]), config(None, "<bos>", "</s>", None))
        .unwrap_err();
    assert!(e.to_string().contains("`<bos>` is not in the vocabulary"), "{e}");
}

#[test]
fn llama3_template() {
    let t = tok(config(Some(LLAMA3_TEMPLATE), "<|begin_of_text|>", "<|eot_id|>", None));
    let s = t.apply_chat_template(&chat(), true).unwrap();
    assert_eq!(
        s,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let s = t.apply_chat_template(&chat()[1..], false).unwrap();
    assert_eq!(s, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>");
    // The rendered text encodes with its specials and no extra BOS.
    let ids = t.encode(&s, false).unwrap();
    assert_eq!(ids[0], t.token_to_id("<|begin_of_text|>").unwrap());
    assert_eq!(*ids.last().unwrap(), t.token_to_id("<|eot_id|>").unwrap());
}

#[test]
fn chatml_templates() {
    let t = tok(config(Some(SMOLLM2_TEMPLATE), "<|im_start|>", "<|im_end|>", None));
    let s = t.apply_chat_template(&[ChatMessage::user("What is 2+2?")], true).unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let with_system = vec![ChatMessage::system("Be brief."), ChatMessage::user("Hi")];
    let s = t.apply_chat_template(&with_system, false).unwrap();
    assert_eq!(s, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");

    let q = tok(config(Some(QWEN_STYLE_TEMPLATE), "<|im_start|>", "<|im_end|>", None));
    let s = q.apply_chat_template(&[ChatMessage::user("Hi")], true).unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn python_methods_and_raise_exception() {
    let t = tok(config(Some(MISTRAL_TEMPLATE), "<s>", "</s>", Some(true)));
    let msgs = vec![ChatMessage::user("  hello  "), ChatMessage::assistant(" hi \n"), ChatMessage::user("bye")];
    let s = t.apply_chat_template(&msgs, false).unwrap();
    assert_eq!(s, "<s>[INST] hello [/INST] hi</s>[INST] bye [/INST]");
    let e = t.apply_chat_template(&[ChatMessage::assistant("x")], false).unwrap_err();
    assert!(matches!(e, ModelError::Template(_)));
    assert!(e.to_string().contains("Conversation roles must alternate"), "{e}");
}

#[test]
fn strftime_now_is_available() {
    let t = tok(config(Some("{{ strftime_now('%d %b %Y') }}"), "<s>", "</s>", None));
    let s = t.apply_chat_template(&[], false).unwrap();
    let parts: Vec<&str> = s.split(' ').collect();
    assert_eq!(parts.len(), 3, "{s}");
    assert_eq!(parts[0].len(), 2);
    assert_eq!(parts[1].len(), 3);
    assert!(parts[2].parse::<u32>().unwrap() >= 2024);
}

#[test]
fn missing_template_and_bad_template_are_errors() {
    let t = tok(TokenizerConfig::default());
    assert!(!t.has_chat_template());
    let e = t.apply_chat_template(&chat(), true).unwrap_err();
    assert!(e.to_string().contains("no chat template"), "{e}");
    let e = Tokenizer::from_json_str(
        &tiny_byte_level_tokenizer_json(&SPECIALS),
        config(Some("{% for m in messages %}"), "<s>", "</s>", None),
    )
    .unwrap_err();
    assert!(e.to_string().contains("cannot compile chat template"), "{e}");
}

#[test]
fn streaming_never_splits_a_character() {
    let t = tok(TokenizerConfig::default());
    let text = "a😀b é";
    let ids = t.encode(text, false).unwrap();
    let mut s = t.decode_stream(true);
    let deltas: Vec<String> = ids.iter().map(|&id| s.push(id).unwrap()).collect();
    // a, then the four bytes of 😀 (three silent, then the whole emoji), b, space, é (2 bytes).
    assert_eq!(deltas, vec!["a", "", "", "", "😀", "b", " ", "", "é"]);
    assert_eq!(s.finish().unwrap(), "");
    assert_eq!(deltas.concat(), text);
    // Special tokens are skipped in the stream.
    let mut s = t.decode_stream(true);
    assert_eq!(s.push(b'x' as u32).unwrap(), "x");
    assert_eq!(s.push(257).unwrap(), "");
    assert_eq!(s.ids(), &[b'x' as u32, 257]);
}

#[test]
fn streaming_flushes_an_incomplete_tail() {
    let t = tok(TokenizerConfig::default());
    let emoji = "😀".as_bytes();
    let mut s = t.decode_stream(true);
    assert_eq!(s.push(b'z' as u32).unwrap(), "z");
    assert_eq!(s.push(emoji[0] as u32).unwrap(), "");
    assert_eq!(s.push(emoji[1] as u32).unwrap(), "");
    let tail = s.finish().unwrap();
    assert!(tail.contains('\u{FFFD}'), "{tail:?}");
}

#[test]
fn from_dir_reads_the_files() {
    let dir = std::env::temp_dir().join(format!("kiln-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = Tokenizer::from_dir(&dir).unwrap_err();
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
    std::fs::write(dir.join("tokenizer.json"), tiny_byte_level_tokenizer_json(&SPECIALS)).unwrap();
    let t = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(t.bos_token_id(), None);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true, "chat_template": SMOLLM2_TEMPLATE})
            .to_string(),
    )
    .unwrap();
    let t = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(t.encode("a", true).unwrap(), vec![256, 97]);
    assert!(t.apply_chat_template(&[ChatMessage::user("x")], false).unwrap().contains("SmolLM"));
    // chat_template.jinja beside it wins (newer transformers layout).
    std::fs::write(dir.join("chat_template.jinja"), "{{ messages[0].content }}!").unwrap();
    let t = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(t.apply_chat_template(&[ChatMessage::user("x")], false).unwrap(), "x!");
    std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
    let e = Tokenizer::from_dir(&dir).unwrap_err();
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
