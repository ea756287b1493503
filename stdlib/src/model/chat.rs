//! Chat templates and special tokens: the Jinja template of `tokenizer_config.json` (or
//! `chat_template.jinja`) rendered with minijinja in the dialect transformers uses (trimmed
//! blocks, Python string methods), and the eos / pad / `</think>` ids read from the files.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::model::ModelError;
use crate::record::ChatMessage;
use crate::tokenizer::Tokenizer;

/// The work one render may do (minijinja's fuel: about one unit per instruction or per 64
/// bytes of data made): enough for any real template over a conversation of tens of
/// megabytes, and a bound on a template that loops or grows without end.
const RENDER_FUEL: u64 = 20_000_000;

/// A compiled chat template with the special-token strings it may refer to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The file the template came from, named in render errors.
    origin: Option<PathBuf>,
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
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| -> String {
            // Templates use it for "today's date"; a fixed date keeps renders reproducible.
            format.replace("%d", "01").replace("%b", "Jan").replace("%B", "January").replace("%Y", "2025").replace("%m", "01")
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| ModelError::Template(format!("does not compile: {e}")))?;
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string(), origin: None })
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
        let origin = if jinja_path.is_file() { jinja_path.clone() } else { config_path.clone() };
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
        match Self::new(&source, &bos, &eos) {
            Ok(template) => Ok(Some(Self { origin: Some(origin), ..template })),
            Err(ModelError::Template(message)) => Err(ModelError::checkpoint(&origin, format!("chat template {message}"))),
            Err(other) => Err(other),
        }
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
        template.render(minijinja::Value::from(minijinja::value::Serde(Value::Object(context)))).map_err(|e| match &self.origin {
            Some(path) => ModelError::checkpoint(path, format!("chat template render failed: {e}")),
            None => ModelError::Template(format!("render failed: {e}")),
        })
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

/// The JSON of `path`, or `Null` when there is no such file; a file that is there but not
/// valid JSON is an error naming it.
fn read_json_if_present(path: &Path) -> Result<Value, ModelError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| ModelError::checkpoint(path, format!("not valid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Value::Null),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

/// The `eos_token_id` of a config: absent, one id, or a list of ids.
fn eos_ids(config: &Value) -> Result<Vec<u32>, String> {
    let as_id = |v: &Value| v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| format!("eos_token_id {v} is not a token id"));
    match config.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(ids)) => ids.iter().map(as_id).collect(),
        Some(one) => Ok(vec![as_id(one)?]),
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
    /// Loads `tokenizer.json`, the chat template and the special ids of `dir`. Every id the
    /// tokenizer can produce, and every special id, must lie inside the model's embedding
    /// (`vocab_size` of config.json, when the directory has one).
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let tokenizer = Tokenizer::load(dir).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let template = ChatTemplate::load(dir)?;
        let tok_config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let model_config = read_json_if_present(&dir.join("config.json"))?;
        let mut stop_ids = Vec::new();
        if let Some(id) = special_token(&tok_config, "eos_token").and_then(|t| tokenizer.token_id(&t)) {
            stop_ids.push(id);
        }
        for (file, config) in
            [("generation_config.json", read_json_if_present(&dir.join("generation_config.json"))?), ("config.json", model_config.clone())]
        {
            stop_ids.extend(eos_ids(&config).map_err(|message| ModelError::checkpoint(dir.join(file), message))?);
        }
        let end_of_turn = stop_ids.first().copied();
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let pad_id = special_token(&tok_config, "pad_token").and_then(|t| tokenizer.token_id(&t));
        let think_end_id = tokenizer.token_id("</think>");
        let loaded = Self { tokenizer, template, stop_ids, end_of_turn, pad_id, think_end_id };
        if let Some(vocab_size) = model_config.get("vocab_size").and_then(Value::as_u64) {
            loaded.check_fits(vocab_size, dir)?;
        }
        Ok(loaded)
    }

    /// Errors unless every id the tokenizer knows and every stop id is below `vocab_size`
    /// (an id past the embedding would index out of it mid-run).
    /// `dir` is the model directory whose config.json gave `vocab_size`.
    pub fn check_fits(&self, vocab_size: u64, dir: &Path) -> Result<(), ModelError> {
        if let Some(max) = self.tokenizer.max_id()
            && u64::from(max) >= vocab_size
        {
            return Err(ModelError::checkpoint(
                self.tokenizer.path(),
                format!(
                    "has token id {max}, but the model's embedding has {vocab_size} rows (vocab_size of {})",
                    dir.join("config.json").display()
                ),
            ));
        }
        if let Some(&stop) = self.stop_ids.iter().find(|&&id| u64::from(id) >= vocab_size) {
            return Err(ModelError::checkpoint(
                dir,
                format!(
                    "eos token id {stop} (tokenizer_config.json, generation_config.json or config.json) is not below vocab_size {vocab_size}"
                ),
            ));
        }
        Ok(())
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
    fn a_template_that_would_run_for_hours_runs_out_of_fuel() {
        let source = "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}";
        let template = ChatTemplate::new(source, "", "").expect("compiles");
        let err = template.render(&[user("hi")], false, &Value::Null).expect_err("stops");
        assert!(err.to_string().contains("fuel"), "{err}");
        let huge = ChatTemplate::new("{{ 'x' * 100000000000 }}", "", "").expect("compiles");
        assert!(huge.render(&[], false, &Value::Null).is_err());
        // A long document is far inside the budget.
        let echo = ChatTemplate::new("{% for m in messages %}{{ m.content.strip() }}{% endfor %}", "", "").expect("compiles");
        let document = "word ".repeat(200_000);
        assert_eq!(echo.render(&[user(&document)], false, &Value::Null).expect("renders").len(), document.trim().len());
    }

    #[test]
    fn ids_past_the_embedding_are_refused_when_the_model_is_loaded() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/tiny");
        std::fs::copy(fixture.join("tokenizer.json"), dir.path().join("tokenizer.json")).expect("copy tokenizer");
        let vocab = ModelTokenizer::load(dir.path()).expect("no config: nothing to check").tokenizer.max_id().expect("ids") as u64 + 1;
        let write_config =
            |config: serde_json::Value| std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write config");
        write_config(serde_json::json!({"vocab_size": vocab}));
        ModelTokenizer::load(dir.path()).expect("every id fits");
        write_config(serde_json::json!({"vocab_size": vocab - 1}));
        let err = ModelTokenizer::load(dir.path()).expect_err("the last id does not fit").to_string();
        assert!(err.contains("tokenizer.json") && err.contains(&format!("has token id {}", vocab - 1)), "{err}");
        write_config(serde_json::json!({"vocab_size": vocab, "eos_token_id": vocab}));
        let err = ModelTokenizer::load(dir.path()).expect_err("eos past the end").to_string();
        assert!(err.contains(&format!("eos token id {vocab}")), "{err}");
        write_config(serde_json::json!({"vocab_size": vocab}));
        std::fs::write(dir.path().join("generation_config.json"), "{\"eos_token_id\": [1,").expect("write");
        let err = ModelTokenizer::load(dir.path()).expect_err("broken generation config").to_string();
        assert!(err.contains("generation_config.json") && err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn raise_exception_is_a_render_error() {
        let template = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").expect("compiles");
        let err = template.render(&[], false, &Value::Null).expect_err("raises");
        assert!(err.to_string().contains("no system role"), "{err}");
    }

    #[test]
    fn errors_of_a_loaded_template_name_its_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = serde_json::json!({"chat_template": "{{ raise_exception('roles must alternate') }}"});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).expect("write config");
        let template = ChatTemplate::load(dir.path()).expect("compiles").expect("present");
        let err = template.render(&[user("hi")], true, &Value::Null).expect_err("raises").to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("roles must alternate"), "{err}");
        std::fs::write(dir.path().join("chat_template.jinja"), "{% for m in messages %}").expect("write template");
        let err = ChatTemplate::load(dir.path()).expect_err("unclosed block").to_string();
        assert!(err.contains("chat_template.jinja") && err.contains("does not compile"), "{err}");
    }
}
