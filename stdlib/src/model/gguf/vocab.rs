//! A Hugging Face tokenizer from GGUF tokenizer metadata: the `gpt2` (byte-level BPE) model
//! of `tokenizer.ggml.*` (tokens, token types, merges, special ids) with the pre-tokenizer
//! that `tokenizer.ggml.pre` names, written as `tokenizer.json`, and the chat template and
//! special tokens as `tokenizer_config.json`.

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

use super::{GgufErrorKind, Value};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The tokenizer metadata of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    pub tokens: Vec<String>,
    pub types: Vec<i64>,
    pub merges: Vec<(String, String)>,
    /// `tokenizer.ggml.pre`: which pre-tokenizer the model was trained with.
    pub pre: String,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

/// The regex split of GPT-2 style pre-tokenizers that do not use ByteLevel's own regex.
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl GgufVocab {
    /// Reads the tokenizer metadata; only the `gpt2` model (byte-level BPE) is supported.
    pub fn from_metadata(metadata: &BTreeMap<String, Value>) -> Result<Self, GgufErrorKind> {
        let get = |k: &str| metadata.get(k);
        let key = |k: &str| format!("tokenizer.ggml.{k}");
        let model = get(&key("model")).and_then(|v| v.as_str().map(str::to_string)).ok_or(GgufErrorKind::MissingKey(key("model")))?;
        if model != "gpt2" {
            return Err(GgufErrorKind::Unsupported(format!(
                "tokenizer model `{model}` is not supported (longrl converts `gpt2` byte-level BPE vocabularies)"
            )));
        }
        let tokens = strings(get(&key("tokens")), &key("tokens"))?;
        let types = match get(&key("token_type")) {
            Some(Value::Array(items)) => items.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(GgufErrorKind::BadValue {
                key: key("token_type"),
                message: format!("has {} entries for {} tokens", types.len(), tokens.len()),
            });
        }
        let merges = strings(get(&key("merges")), &key("merges"))?
            .into_iter()
            .enumerate()
            .map(|(i, m)| match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok((a.to_string(), b.to_string())),
                _ => Err(GgufErrorKind::BadValue { key: key("merges"), message: format!("entry {i} ({m:?}) is not two tokens") }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let id = |k: &str| -> Result<Option<u32>, GgufErrorKind> {
            match get(&key(k)).map(|v| v.as_u64()) {
                None => Ok(None),
                Some(Some(id)) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
                Some(other) => {
                    Err(GgufErrorKind::BadValue { key: key(k), message: format!("({other:?}) is not a token id below {}", tokens.len()) })
                }
            }
        };
        Ok(Self {
            pre: get(&key("pre")).and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| "default".into()),
            bos: id("bos_token_id")?,
            eos: id("eos_token_id")?,
            unk: id("unknown_token_id")?,
            pad: id("padding_token_id")?,
            add_bos: get(&key("add_bos_token")).and_then(|v| v.as_bool()).unwrap_or(false),
            chat_template: get("tokenizer.chat_template").and_then(|v| v.as_str().map(str::to_string)),
            tokens,
            types,
            merges,
        })
    }

    fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize)).map(String::as_str)
    }

    /// The pre-tokenizer `tokenizer.ggml.pre` stands for, as tokenizers JSON.
    fn pre_tokenizer(&self) -> Result<Json, GgufErrorKind> {
        let byte_level =
            |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |pattern: &str| {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]})
        };
        Ok(match self.pre.as_str() {
            "default" | "gpt-2" | "gpt2" => byte_level(true),
            // Single digits first, then GPT-2's regex (llama.cpp groups these the same).
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)],
            }),
            "llama-bpe" | "llama3" | "smaug-bpe" => split(LLAMA3_SPLIT),
            "qwen2" | "deepseek-r1-qwen" => split(QWEN2_SPLIT),
            other => {
                return Err(GgufErrorKind::Unsupported(format!(
                    "tokenizer pre-tokenizer `{other}` is not known (longrl knows default, gpt-2, smollm, starcoder, llama-bpe, qwen2)"
                )));
            }
        })
    }

    /// `tokenizer.json`: byte-level BPE with the vocabulary's control and user-defined
    /// tokens as added tokens.
    pub fn tokenizer_json(&self) -> Result<Json, GgufErrorKind> {
        let vocab: serde_json::Map<String, Json> = self.tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        if vocab.len() != self.tokens.len() {
            return Err(GgufErrorKind::BadValue { key: "tokenizer.ggml.tokens".into(), message: "holds the same token twice".into() });
        }
        let added: Vec<Json> = self
            .tokens
            .iter()
            .zip(&self.types)
            .enumerate()
            .filter(|(_, (_, ty))| matches!(**ty, CONTROL | USER_DEFINED))
            .map(|(id, (content, ty))| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": *ty == CONTROL})
            })
            .collect();
        let merges: Vec<Json> = self.merges.iter().map(|(a, b)| json!([a, b])).collect();
        let post_processor = match self.token(self.bos).filter(|_| self.add_bos) {
            Some(bos) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [self.bos], "tokens": [bos]}},
            }),
            None => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": self.pre_tokenizer()?,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": self.token(self.unk), "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        }))
    }

    /// `tokenizer_config.json`: special tokens, the chat template, the context length.
    pub fn tokenizer_config(&self, max_length: Option<u64>) -> Json {
        let mut config = json!({
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        for (name, id) in [("bos_token", self.bos), ("eos_token", self.eos), ("unk_token", self.unk), ("pad_token", self.pad)] {
            if let Some(token) = self.token(id) {
                config[name] = json!(token);
            }
        }
        if let Some(template) = &self.chat_template {
            config["chat_template"] = json!(template);
        }
        if let Some(length) = max_length {
            config["model_max_length"] = json!(length);
        }
        config
    }
}

fn strings(value: Option<&Value>, key: &str) -> Result<Vec<String>, GgufErrorKind> {
    let Some(value) = value else { return Err(GgufErrorKind::MissingKey(key.into())) };
    let items = value.as_array().ok_or_else(|| GgufErrorKind::BadValue { key: key.into(), message: "is not an array".into() })?;
    items
        .iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| GgufErrorKind::BadValue { key: key.into(), message: "is not an array of strings".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(model: &str, pre: &str, merges: &[&str]) -> BTreeMap<String, Value> {
        let strings = |items: &[&str]| Value::Array(items.iter().map(|s| Value::String((*s).into())).collect());
        BTreeMap::from([
            ("tokenizer.ggml.model".to_string(), Value::String(model.into())),
            ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
            ("tokenizer.ggml.tokens".to_string(), strings(&["a", "b", "ab", "<|end|>"])),
            ("tokenizer.ggml.token_type".to_string(), Value::Array(vec![Value::I32(1), Value::I32(1), Value::I32(1), Value::I32(3)])),
            ("tokenizer.ggml.merges".to_string(), strings(merges)),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(3)),
        ])
    }

    #[test]
    fn a_bpe_vocabulary_becomes_a_tokenizer_that_loads() {
        let vocab = GgufVocab::from_metadata(&metadata("gpt2", "llama-bpe", &["a b"])).expect("reads");
        let json = vocab.tokenizer_json().expect("builds");
        assert_eq!(json["added_tokens"][0]["content"], "<|end|>");
        assert_eq!(json["model"]["merges"][0], serde_json::json!(["a", "b"]));
        let tokenizer = json.to_string().parse::<tokenizers::Tokenizer>().expect("the tokenizers crate loads it");
        let ids = tokenizer.encode("ab<|end|>", false).expect("encodes").get_ids().to_vec();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(vocab.tokenizer_config(Some(128))["eos_token"], "<|end|>");
    }

    #[test]
    fn unsupported_vocabularies_say_what_is_missing() {
        let err = GgufVocab::from_metadata(&metadata("llama", "default", &[])).expect_err("sentencepiece");
        assert!(err.to_string().contains("tokenizer model `llama` is not supported"), "{err}");
        let err = GgufVocab::from_metadata(&metadata("gpt2", "default", &["ab"])).expect_err("bad merge");
        assert!(err.to_string().contains("entry 0 (\"ab\") is not two tokens"), "{err}");
        let vocab = GgufVocab::from_metadata(&metadata("gpt2", "mystery", &[])).expect("reads");
        let err = vocab.tokenizer_json().expect_err("unknown pre-tokenizer");
        assert!(err.to_string().contains("pre-tokenizer `mystery` is not known"), "{err}");
    }
}
