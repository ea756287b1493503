//! `longrl generate`: try a model from the command line: encode a prompt (optionally with
//! the chat template), sample a continuation with the KV cache, print it.

use std::path::PathBuf;

use longrl_backends::BackendTask;
use longrl_backends::TrainBackend;
use longrl_stdlib::model::chat::ModelTokenizer;
use longrl_stdlib::model::generate::{SamplingConfig, generate_group};
use longrl_stdlib::model::{ModelError, load_model};
use longrl_stdlib::record::ChatMessage;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub model: PathBuf,
    /// Tokenizer directory or file (default: the model directory).
    pub tokenizer: Option<PathBuf>,
    /// Text prompt, or token ids when `ids` is given.
    pub prompt: Option<String>,
    /// Prompt as token ids (for models without a tokenizer); the output is ids too.
    pub ids: Option<Vec<u32>>,
    pub chat: bool,
    pub sampling: SamplingConfig,
}

impl GenerateRequest {
    /// Problems with the sampling settings, found before the model is loaded.
    pub fn problems(&self) -> Vec<String> {
        let sampling = &self.sampling;
        let mut problems: Vec<String> = longrl_stdlib::options::sampling_problems(sampling.temperature, sampling.top_p, true)
            .into_iter()
            .map(|p| format!("--{}", p.replacen("top_p", "top-p", 1)))
            .collect();
        let limit = longrl_stdlib::options::limits::TOKENS;
        if sampling.max_new_tokens == 0 || sampling.max_new_tokens > limit {
            problems.push(format!("--max-new-tokens must be within 1..={limit}, got {}", sampling.max_new_tokens));
        }
        problems
    }
}

impl BackendTask for GenerateRequest {
    type Output = Result<String, ModelError>;

    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        let (config, model) = load_model::<B::InnerBackend>(&self.model, &device)?;
        let vocab = config.vocab_size;
        let mut sampling = self.sampling.clone();
        if let Some(ids) = &self.ids {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ModelError::Invalid(format!("token id {bad} is outside the model's vocabulary of {vocab}")));
            }
            sampling.stop_tokens.extend(config.eos_ids());
            let out = generate_group(&model, ids, 1, &sampling)?;
            let tokens = out.first().map(|c| c.tokens.clone()).unwrap_or_default();
            return Ok(tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
        }
        let tokenizer_dir = self.tokenizer.clone().unwrap_or_else(|| self.model.clone());
        let tokenizer = ModelTokenizer::load(&tokenizer_dir)?;
        tokenizer.check_fits(vocab as u64, &self.model)?;
        if self.chat && tokenizer.template.is_none() {
            return Err(ModelError::Invalid(format!(
                "{}: --chat, but the model has no chat template (chat_template.jinja, or `chat_template` in tokenizer_config.json); leave out --chat to use the prompt as it is",
                tokenizer_dir.display()
            )));
        }
        let text = self.prompt.clone().unwrap_or_default();
        let ids = if self.chat {
            let turn = ChatMessage { role: "user".into(), content: text };
            tokenizer.encode_chat(&[turn], true, &serde_json::json!({ "enable_thinking": true }))?
        } else {
            tokenizer.tokenizer.encode(&text).map_err(|e| ModelError::Tokenizer(e.to_string()))?
        };
        if ids.is_empty() {
            return Err(ModelError::Invalid("the prompt is empty".into()));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Invalid(format!(
                "the tokenizer gives id {bad}, outside the model's vocabulary of {vocab}: is it the model's tokenizer?"
            )));
        }
        sampling.stop_tokens.extend(tokenizer.stop_ids.iter().copied());
        sampling.stop_tokens.extend(config.eos_ids());
        let out = generate_group(&model, &ids, 1, &sampling)?;
        let mut tokens = out.first().map(|c| c.tokens.clone()).unwrap_or_default();
        if tokens.last().is_some_and(|t| sampling.stop_tokens.contains(t)) {
            tokens.pop();
        }
        tokenizer.tokenizer.decode(&tokens, false).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }
}
