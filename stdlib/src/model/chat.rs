//! Chat templates and special tokens: the Jinja template of `tokenizer_config.json` (or
//! `chat_template.jinja`) rendered with minijinja in the dialect transformers uses (trimmed
//! blocks, Python string methods), and the eos / pad / `</think>` ids read from the files.

use std::path::Path;

use serde_json::Value;

use crate::model::ModelError;
use crate::record::ChatMessage;
use crate::tokenizer::Tokenizer;

/// A compiled chat template with the special-token strings it may refer to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos", &self.bos_token).field("eos", &self.eos_token).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a template; `bos_token` and `eos_token` are exposed to it as variables.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ModelError> {
        let mut env = minijinja::Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ModelError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| -> String {
            // Templates use it for "today's date"; a fixed date keeps renders reproducible.
            format.replace("%d", "01").replace("%b", "Jan").replace("%B", "January").replace("%Y", "2025").replace("%m", "01")
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| ModelError::Template(format!("does not compile: {e}")))?;
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Reads the template of a model directory: `chat_template.jinja`, else the
    /// `chat_template` of `tokenizer_config.json`. `Ok(None)` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Self>, ModelError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
            serde_json::from_str(&text).map_err(|e| ModelError::checkpoint(&config_path, format!("not valid JSON: {e}")))?
        } else {
            Value::Null
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|e| ModelError::io(&jinja_path, e))?)
        } else {
            match config.get("chat_template") {
                Some(Value::String(text)) => Some(text.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            }
        };
        let Some(source) = source else { return Ok(None) };
        let bos = special_token(&config, "bos_token").unwrap_or_default();
        let eos = special_token(&config, "eos_token").unwrap_or_default();
        Self::new(&source, &bos, &eos).map(Some).map_err(|e| match e {
            ModelError::Template(message) => ModelError::checkpoint(&config_path, format!("chat template {message}")),
            other => other,
        })
    }

    /// Renders a conversation; `extra` adds template variables (e.g. `enable_thinking`).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool, extra: &Value) -> Result<String, ModelError> {
        let template = self.env.get_template("chat").map_err(|e| ModelError::Template(e.to_string()))?;
        let mut context = serde_json::Map::new();
        context.insert("messages".into(), serde_json::to_value(messages).map_err(|e| ModelError::Template(e.to_string()))?);
        context.insert("add_generation_prompt".into(), add_generation_prompt.into());
        context.insert("bos_token".into(), self.bos_token.clone().into());
        context.insert("eos_token".into(), self.eos_token.clone().into());
        if let Value::Object(more) = extra {
            context.extend(more.clone());
        }
        template
            .render(minijinja::Value::from(minijinja::value::Serde(Value::Object(context))))
            .map_err(|e| ModelError::Template(format!("render failed: {e}")))
    }
}

/// A special token's text from tokenizer_config.json: a string or `{"content": ..}`.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// A model's tokenizer, chat template and special token ids, read from its directory.
#[derive(Debug)]
pub struct ModelTokenizer {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Ids that end a response: eos from tokenizer_config, generation_config and config
    /// (sorted).
    pub stop_ids: Vec<u32>,
    /// The id that ends an assistant turn, which SFT appends to each trace: the eos token of
    /// tokenizer_config.json (`<|im_end|>` for Qwen2.5-Instruct), else the first eos id of
    /// generation_config.json or config.json.
    pub end_of_turn: Option<u32>,
    pub pad_id: Option<u32>,
    /// The id of `</think>` if the vocabulary has it.
    pub think_end_id: Option<u32>,
}

impl ModelTokenizer {
    /// Loads `tokenizer.json`, the chat template and the special ids of `dir`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let tokenizer = Tokenizer::load(dir).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let template = ChatTemplate::load(dir)?;
        let mut stop_ids = Vec::new();
        let read = |name: &str| -> Value {
            std::fs::read_to_string(dir.join(name)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null)
        };
        let tok_config = read("tokenizer_config.json");
        if let Some(id) = special_token(&tok_config, "eos_token").and_then(|t| tokenizer.token_id(&t)) {
            stop_ids.push(id);
        }
        for file in ["generation_config.json", "config.json"] {
            match read(file).get("eos_token_id") {
                Some(Value::Number(n)) => stop_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(Value::Array(ids)) => stop_ids.extend(ids.iter().filter_map(Value::as_u64).map(|v| v as u32)),
                _ => {}
            }
        }
        let end_of_turn = stop_ids.first().copied();
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let pad_id = special_token(&tok_config, "pad_token").and_then(|t| tokenizer.token_id(&t));
        let think_end_id = tokenizer.token_id("</think>");
        Ok(Self { tokenizer, template, stop_ids, end_of_turn, pad_id, think_end_id })
    }

    /// Token ids of a conversation rendered with the chat template (no template: the turns'
    /// contents joined by newlines).
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool, extra: &Value) -> Result<Vec<u32>, ModelError> {
        let text = match &self.template {
            Some(template) => template.render(messages, add_generation_prompt, extra)?,
            None => messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
        };
        self.tokenizer.encode(&text).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> ChatMessage {
        ChatMessage { role: "user".into(), content: text.into() }
    }

    #[test]
    fn python_string_methods_and_trimmed_blocks_work() {
        let source =
            "{% for m in messages %}\n  {{ m.content.strip().upper() }}|{% if m.content.startswith(' a') %}yes{% endif %}\n{% endfor %}";
        let template = ChatTemplate::new(source, "", "").expect("compiles");
        let out = template.render(&[user(" abc ")], false, &Value::Null).expect("renders");
        // As jinja2 renders it: lstrip_blocks strips only before block tags, and trim_blocks
        // eats the newline after `{% endif %}`.
        assert_eq!(out, "  ABC|yes");
    }

    #[test]
    fn raise_exception_is_a_render_error() {
        let template = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").expect("compiles");
        let err = template.render(&[], false, &Value::Null).expect_err("raises");
        assert!(err.to_string().contains("no system role"), "{err}");
    }
}
