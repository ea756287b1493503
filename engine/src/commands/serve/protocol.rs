//! The OpenAI-compatible request and response bodies of `longrl serve`, with vLLM's and
//! SGLang's extensions where a rollout client needs them (token-id prompts, `n`, per-token
//! log-probs with the sampled ids, prompt log-probs, stop token ids, the weights version).
//!
//! Every field a request may carry is listed here: it is honoured, or rejected with a 400
//! that names it when its value asks for something the server does not do (a penalty, a
//! logit bias, tools). Unknown fields are rejected too, so nothing is silently ignored. Two
//! fields are accepted without effect, by design: `user` (OpenAI's end-user tag) and
//! `model` when the server was started without `--served-model-name` (any name is then
//! taken to mean the one model served, as SGLang does).

use std::collections::BTreeMap;

use longrl_stdlib::model::chat::ModelTokenizer;
use longrl_stdlib::model::generate::{Completion, FinishReason, SamplingConfig};
use longrl_stdlib::record::ChatMessage;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::worker::{GenJob, GenOutput, Generated, PositionLogprob};

mod events;
pub use events::EventStream;

/// Most alternatives a request may ask for per token (vLLM's default limit).
pub const MAX_LOGPROBS: usize = 20;
/// Most prompts in one completions request.
pub const MAX_PROMPTS: usize = 1024;
/// Most samples per prompt.
pub const MAX_N: usize = longrl_stdlib::options::limits::GROUP;
/// Most sequences (prompts times `n`) one request may ask for: one request cannot queue
/// more work than the largest group a trainer samples.
pub const MAX_SEQUENCES: usize = longrl_stdlib::options::limits::GROUP;
pub use longrl_stdlib::rl::remote::MAX_REQUEST_TOKENS;

/// Refuses a request whose `sequences` of up to `max_tokens` exceed [`MAX_REQUEST_TOKENS`].
fn check_request_tokens(sequences: usize, max_tokens: usize, field: &str) -> Result<(), ApiError> {
    if sequences.saturating_mul(max_tokens) > MAX_REQUEST_TOKENS {
        return Err(ApiError::bad(
            field,
            format!(
                "{sequences} sequences of up to {max_tokens} tokens is more than the {MAX_REQUEST_TOKENS} tokens one request may ask for; split it"
            ),
        ));
    }
    Ok(())
}

/// A request the server will not serve, with the HTTP status and the field at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into(), param: Some(param.to_string()) }
    }

    pub fn status(status: u16, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> Value {
        let kind = match self.status {
            404 => "NotFoundError",
            400..=499 => "invalid_request_error",
            _ => "internal_error",
        };
        json!({ "error": { "message": self.message, "type": kind, "param": self.param, "code": self.status } })
    }
}

/// Several problems of one request in one 400 (the first names the field).
fn rejected(problems: Vec<(String, String)>) -> Result<(), ApiError> {
    let Some((param, _)) = problems.first() else { return Ok(()) };
    let message = problems.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join("; ");
    Err(ApiError { status: 400, message, param: Some(param.clone()) })
}

/// Parses a body into `T`, naming the field of a type error and any unknown field.
pub fn parse_body<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if let Some(field) = inner.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next()) {
            return ApiError::bad(
                field,
                format!("unsupported field `{field}`: longrl serve does not know it, and rejects it rather than ignore it"),
            );
        }
        if path == "." || path.is_empty() {
            ApiError::status(400, format!("invalid request: {inner}"))
        } else {
            ApiError::bad(&path, format!("invalid request: `{path}`: {inner}"))
        }
    })
}

/// What the server serves, as the protocol needs it.
pub struct Served<'a> {
    /// Names a request's `model` may have (empty: any).
    pub names: &'a [String],
    /// The name responses carry.
    pub name: &'a str,
    pub tokenizer: &'a ModelTokenizer,
    /// Ids that end a response unless `ignore_eos` (the tokenizer's and the config's eos).
    pub eos_ids: &'a [u32],
    pub vocab: usize,
    pub max_model_len: usize,
    pub max_tokens_cap: usize,
}

impl Served<'_> {
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(name) if !self.names.is_empty() && !self.names.iter().any(|n| n == name) => {
                Err(ApiError::status(404, format!("the model `{name}` does not exist (this server serves {})", self.names.join(", "))))
            }
            _ => Ok(()),
        }
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.tokenizer.tokenizer.decode(ids, skip_special).unwrap_or_default()
    }

    fn token_text(&self, id: u32, as_id: bool) -> String {
        if as_id { format!("token_id:{id}") } else { self.decode(&[id], false) }
    }
}

/// `prompt`: a text, texts, token ids or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
    Text(String),
    Texts(Vec<String>),
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

impl StopInput {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// The sampling fields completions and chat share (OpenAI's, vLLM's and SGLang's names).
#[derive(Debug, Clone, Default, Deserialize)]
struct SamplingFields {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    n: Option<usize>,
    seed: Option<i64>,
    stop: Option<StopInput>,
    stop_token_ids: Option<Vec<u32>>,
    ignore_eos: Option<bool>,
    include_stop_str_in_output: Option<bool>,
    skip_special_tokens: Option<bool>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    min_p: Option<f32>,
    min_tokens: Option<usize>,
    logit_bias: Option<Map<String, Value>>,
    allowed_token_ids: Option<Vec<u32>>,
    spaces_between_special_tokens: Option<bool>,
    truncate_prompt_tokens: Option<i64>,
    priority: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    return_token_ids: Option<bool>,
    request_id: Option<String>,
}

/// A request body: its own fields and the shared sampling fields, every one listed (serde
/// cannot deny unknown fields through `flatten`, so the shared ones are repeated here).
macro_rules! request_body {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* $field: $ty,)*
            temperature: Option<f32>,
            top_p: Option<f32>,
            top_k: Option<i64>,
            n: Option<usize>,
            seed: Option<i64>,
            stop: Option<StopInput>,
            stop_token_ids: Option<Vec<u32>>,
            ignore_eos: Option<bool>,
            include_stop_str_in_output: Option<bool>,
            skip_special_tokens: Option<bool>,
            presence_penalty: Option<f32>,
            frequency_penalty: Option<f32>,
            repetition_penalty: Option<f32>,
            min_p: Option<f32>,
            min_tokens: Option<usize>,
            logit_bias: Option<Map<String, Value>>,
            allowed_token_ids: Option<Vec<u32>>,
            spaces_between_special_tokens: Option<bool>,
            truncate_prompt_tokens: Option<i64>,
            priority: Option<i64>,
            stream: Option<bool>,
            stream_options: Option<StreamOptions>,
            return_token_ids: Option<bool>,
            /// OpenAI's end-user tag: accepted, without effect.
            #[allow(dead_code)]
            user: Option<String>,
            request_id: Option<String>,
        }

        impl $name {
            fn sampling_fields(&self) -> SamplingFields {
                SamplingFields {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    n: self.n,
                    seed: self.seed,
                    stop: self.stop.clone(),
                    stop_token_ids: self.stop_token_ids.clone(),
                    ignore_eos: self.ignore_eos,
                    include_stop_str_in_output: self.include_stop_str_in_output,
                    skip_special_tokens: self.skip_special_tokens,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    repetition_penalty: self.repetition_penalty,
                    min_p: self.min_p,
                    min_tokens: self.min_tokens,
                    logit_bias: self.logit_bias.clone(),
                    allowed_token_ids: self.allowed_token_ids.clone(),
                    spaces_between_special_tokens: self.spaces_between_special_tokens,
                    truncate_prompt_tokens: self.truncate_prompt_tokens,
                    priority: self.priority,
                    stream: self.stream,
                    stream_options: self.stream_options.clone(),
                    return_token_ids: self.return_token_ids,
                    request_id: self.request_id.clone(),
                }
            }
        }
    };
}

request_body! {
    /// `POST /v1/completions`.
    CompletionRequest {
        model: Option<String>,
        prompt: PromptInput,
        suffix: Option<String>,
        max_tokens: Option<usize>,
        logprobs: Option<usize>,
        echo: Option<bool>,
        best_of: Option<usize>,
        prompt_logprobs: Option<usize>,
        return_tokens_as_token_ids: Option<bool>,
        add_special_tokens: Option<bool>,
        /// SGLang's name for `include_stop_str_in_output`.
        no_stop_trim: Option<bool>,
    }
}

request_body! {
    /// `POST /v1/chat/completions`.
    ChatRequest {
        model: Option<String>,
        messages: Vec<ChatMessage>,
        max_tokens: Option<usize>,
        max_completion_tokens: Option<usize>,
        logprobs: Option<bool>,
        top_logprobs: Option<usize>,
        response_format: Option<Value>,
        tools: Option<Vec<Value>>,
        tool_choice: Option<Value>,
        /// Without tools there is nothing to call in parallel: accepted either way.
        #[allow(dead_code)]
        parallel_tool_calls: Option<bool>,
        chat_template_kwargs: Option<Map<String, Value>>,
        add_generation_prompt: Option<bool>,
        continue_final_message: Option<bool>,
        echo: Option<bool>,
    }
}

/// How the outputs of a request are rendered (shared by completions and chat).
#[derive(Debug, Clone)]
struct Rendering {
    stop_strings: Vec<String>,
    /// Stop token ids asked for in the request (reported as `stop_reason`).
    stop_token_ids: Vec<u32>,
    include_stop_str: bool,
    skip_special: bool,
    return_token_ids: bool,
    stream: bool,
    include_usage: bool,
    id: String,
}

/// A validated request: its jobs and how to render what they produce.
#[derive(Debug, Clone)]
pub struct Planned {
    pub jobs: Vec<GenJob>,
    pub stream: bool,
    kind: Kind,
    rendering: Rendering,
}

#[derive(Debug, Clone)]
enum Kind {
    Completion {
        /// Alternatives per token in `logprobs` (`None`: no `logprobs` object).
        logprobs: Option<usize>,
        echo: bool,
        prompt_logprobs: bool,
        tokens_as_ids: bool,
    },
    Chat {
        logprobs: bool,
        top_logprobs: usize,
    },
}

/// Problems with the sampling fields, as (field, message).
fn sampling_problems(f: &SamplingFields, problems: &mut Vec<(String, String)>) {
    let mut reject = |field: &str, message: &str| problems.push((field.to_string(), format!("`{field}`: {message}")));
    if f.presence_penalty.is_some_and(|p| p != 0.0) {
        reject("presence_penalty", "penalties are not implemented (only 0 is accepted)");
    }
    if f.frequency_penalty.is_some_and(|p| p != 0.0) {
        reject("frequency_penalty", "penalties are not implemented (only 0 is accepted)");
    }
    if f.repetition_penalty.is_some_and(|p| p != 1.0) {
        reject("repetition_penalty", "penalties are not implemented (only 1 is accepted)");
    }
    if f.min_p.is_some_and(|p| p != 0.0) {
        reject("min_p", "min-p sampling is not implemented (only 0 is accepted)");
    }
    if f.min_tokens.is_some_and(|m| m > 0) {
        reject("min_tokens", "a minimum length is not implemented (only 0 is accepted)");
    }
    if f.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        reject("logit_bias", "logit biases are not implemented");
    }
    if f.allowed_token_ids.is_some() {
        reject("allowed_token_ids", "restricting the vocabulary is not implemented");
    }
    if f.spaces_between_special_tokens == Some(false) {
        reject("spaces_between_special_tokens", "only the tokenizer's own decoding is implemented (true)");
    }
    if f.truncate_prompt_tokens.is_some() {
        reject("truncate_prompt_tokens", "prompts are never truncated by the server; send a shorter prompt");
    }
    if f.priority.is_some_and(|p| p != 0) {
        reject("priority", "requests run in arrival order (only 0 is accepted)");
    }
    if f.stream_options.is_some() && f.stream != Some(true) {
        reject("stream_options", "only allowed with stream: true");
    }
    if f.stream_options.as_ref().is_some_and(|o| o.continuous_usage_stats == Some(true)) {
        reject("stream_options.continuous_usage_stats", "usage is reported once, in the last chunk");
    }
    if let Some(n) = f.n
        && (n == 0 || n > MAX_N)
    {
        reject("n", &format!("must be between 1 and {MAX_N}, got {n}"));
    }
    let (temperature, top_p) = (f.temperature.unwrap_or(1.0), f.top_p.unwrap_or(1.0));
    for problem in longrl_stdlib::options::sampling_problems(temperature, top_p, true) {
        let field = if problem.starts_with("temperature") { "temperature" } else { "top_p" };
        reject(field, &problem);
    }
    if f.top_k.is_some_and(|k| k < -1) {
        reject("top_k", "must be -1 or 0 (off) or positive");
    }
}

/// The sampling settings and rendering of validated fields.
fn sampling_config(f: &SamplingFields, max_tokens: usize, served: &Served) -> (SamplingConfig, Rendering) {
    let stop_token_ids = f.stop_token_ids.clone().unwrap_or_default();
    let mut stop_tokens: Vec<u32> = stop_token_ids.clone();
    if f.ignore_eos != Some(true) {
        stop_tokens.extend(served.eos_ids);
    }
    stop_tokens.sort_unstable();
    stop_tokens.dedup();
    let seed = match f.seed {
        Some(seed) => seed as u64,
        None => random_seed(),
    };
    let sampling = SamplingConfig {
        temperature: f.temperature.unwrap_or(1.0),
        top_p: f.top_p.unwrap_or(1.0),
        top_k: f.top_k.filter(|&k| k > 0).map_or(0, |k| k as usize),
        max_new_tokens: max_tokens,
        stop_tokens,
        seed,
    };
    let stream = f.stream == Some(true);
    let rendering = Rendering {
        stop_strings: f.stop.clone().map(StopInput::into_vec).unwrap_or_default().into_iter().filter(|s| !s.is_empty()).collect(),
        stop_token_ids,
        include_stop_str: f.include_stop_str_in_output == Some(true),
        skip_special: f.skip_special_tokens != Some(false),
        return_token_ids: f.return_token_ids == Some(true),
        stream,
        include_usage: stream && f.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true),
        id: f.request_id.clone().unwrap_or_else(|| format!("{:x}", random_seed())),
    };
    (sampling, rendering)
}

/// A seed for requests that give none: different for every request.
fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    (nanos ^ count.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// Checks a prompt's ids and length against the model.
fn check_prompt(ids: &[u32], max_tokens: usize, served: &Served, field: &str) -> Result<(), ApiError> {
    if ids.is_empty() {
        return Err(ApiError::bad(field, format!("`{field}` is empty")));
    }
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= served.vocab) {
        return Err(ApiError::bad(field, format!("`{field}` holds token id {bad}, outside the vocabulary of {} tokens", served.vocab)));
    }
    if ids.len() + max_tokens > served.max_model_len {
        return Err(ApiError::bad(
            field,
            format!(
                "the prompt ({} tokens) and max_tokens ({max_tokens}) exceed the model's context of {} tokens",
                ids.len(),
                served.max_model_len
            ),
        ));
    }
    Ok(())
}

fn check_max_tokens(field: &str, max_tokens: usize, served: &Served) -> Result<(), ApiError> {
    if max_tokens == 0 || max_tokens > served.max_tokens_cap {
        return Err(ApiError::bad(
            field,
            format!("`{field}` must be between 1 and the server's cap of {} (--max-tokens-cap), got {max_tokens}", served.max_tokens_cap),
        ));
    }
    Ok(())
}

impl CompletionRequest {
    /// Validates the request into jobs (one per prompt).
    pub fn plan(self, served: &Served) -> Result<Planned, ApiError> {
        served.check_model(self.model.as_deref())?;
        let mut fields = self.sampling_fields();
        let mut problems = Vec::new();
        sampling_problems(&fields, &mut problems);
        let mut reject = |field: &str, message: &str| problems.push((field.to_string(), format!("`{field}`: {message}")));
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            reject("suffix", "insertion (a suffix after the completion) is not implemented");
        }
        let n = fields.n.unwrap_or(1);
        if self.best_of.is_some_and(|b| b != n) {
            reject("best_of", "only best_of = n is implemented (every sample is returned)");
        }
        for (field, value) in [("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)] {
            if value.is_some_and(|k| k > MAX_LOGPROBS) {
                reject(field, &format!("at most {MAX_LOGPROBS}"));
            }
        }
        if self.echo == Some(true) && fields.stream == Some(true) && self.logprobs.is_some() {
            reject("echo", "echo with logprobs is not streamed; drop stream or logprobs");
        }
        rejected(problems)?;
        let max_tokens = self.max_tokens.unwrap_or(16);
        check_max_tokens("max_tokens", max_tokens, served)?;
        let add_special = self.add_special_tokens != Some(false);
        let prompts: Vec<Vec<u32>> = match self.prompt {
            PromptInput::Ids(ids) => vec![ids],
            PromptInput::IdLists(lists) => lists,
            PromptInput::Text(text) => vec![encode(served, &text, add_special)?],
            PromptInput::Texts(texts) => texts.iter().map(|t| encode(served, t, add_special)).collect::<Result<_, _>>()?,
        };
        if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
            return Err(ApiError::bad("prompt", format!("`prompt` must hold 1 to {MAX_PROMPTS} prompts, got {}", prompts.len())));
        }
        if prompts.len().saturating_mul(n) > MAX_SEQUENCES {
            return Err(ApiError::bad(
                "n",
                format!(
                    "`n` = {n} samples of {} prompts is more than the {MAX_SEQUENCES} sequences one request may ask for",
                    prompts.len()
                ),
            ));
        }
        check_request_tokens(prompts.len() * n, max_tokens, "max_tokens")?;
        for (i, prompt) in prompts.iter().enumerate() {
            let field = if prompts.len() == 1 { "prompt".to_string() } else { format!("prompt[{i}]") };
            check_prompt(prompt, max_tokens, served, &field)?;
        }
        if self.no_stop_trim == Some(true) {
            fields.include_stop_str_in_output = Some(true);
        }
        let (sampling, rendering) = sampling_config(&fields, max_tokens, served);
        let echo = self.echo == Some(true);
        let prompt_logprobs = self.prompt_logprobs.or(if echo && self.logprobs.is_some() { self.logprobs } else { None });
        let jobs = prompts
            .into_iter()
            .map(|prompt| GenJob { prompt, n, sampling: sampling.clone(), top_logprobs: self.logprobs.unwrap_or(0), prompt_logprobs })
            .collect();
        Ok(Planned {
            jobs,
            stream: rendering.stream,
            kind: Kind::Completion {
                logprobs: self.logprobs,
                echo,
                prompt_logprobs: self.prompt_logprobs.is_some(),
                tokens_as_ids: self.return_tokens_as_token_ids == Some(true),
            },
            rendering,
        })
    }
}

fn encode(served: &Served, text: &str, add_special: bool) -> Result<Vec<u32>, ApiError> {
    served
        .tokenizer
        .tokenizer
        .inner()
        .encode_fast(text, add_special)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| ApiError::bad("prompt", format!("cannot tokenize the prompt: {e}")))
}

impl ChatRequest {
    /// Validates the request into one job.
    pub fn plan(self, served: &Served) -> Result<Planned, ApiError> {
        served.check_model(self.model.as_deref())?;
        let fields = self.sampling_fields();
        let mut problems = Vec::new();
        sampling_problems(&fields, &mut problems);
        let mut reject = |field: &str, message: &str| problems.push((field.to_string(), format!("`{field}`: {message}")));
        if self.messages.is_empty() {
            reject("messages", "must not be empty");
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            reject("tools", "tool calling is not implemented");
        }
        if self.tool_choice.as_ref().is_some_and(|c| !c.is_null() && c.as_str() != Some("none")) {
            reject("tool_choice", "tool calling is not implemented (only \"none\")");
        }
        if self.response_format.as_ref().is_some_and(|f| !f.is_null() && f.get("type").and_then(Value::as_str) != Some("text")) {
            reject("response_format", "structured output is not implemented (only {\"type\": \"text\"})");
        }
        if self.continue_final_message == Some(true) {
            reject("continue_final_message", "continuing the last message is not implemented");
        }
        if self.echo == Some(true) {
            reject("echo", "echoing the last message is not implemented");
        }
        if self.top_logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
            reject("top_logprobs", &format!("at most {MAX_LOGPROBS}"));
        }
        if self.top_logprobs.is_some_and(|k| k > 0) && self.logprobs != Some(true) {
            reject("top_logprobs", "needs logprobs: true");
        }
        if self.max_tokens.is_some() && self.max_completion_tokens.is_some() && self.max_tokens != self.max_completion_tokens {
            reject("max_tokens", "differs from max_completion_tokens; give one");
        }
        rejected(problems)?;
        let (field, max_tokens) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", m),
            (None, Some(m)) => ("max_tokens", m),
            (None, None) => ("max_tokens", 256.min(served.max_tokens_cap)),
        };
        check_max_tokens(field, max_tokens, served)?;
        check_request_tokens(fields.n.unwrap_or(1), max_tokens, field)?;
        let mut extra = Map::new();
        extra.insert("enable_thinking".into(), true.into());
        extra.extend(self.chat_template_kwargs.unwrap_or_default());
        let ids = served
            .tokenizer
            .encode_chat(&self.messages, self.add_generation_prompt != Some(false), &Value::Object(extra))
            .map_err(|e| ApiError::bad("messages", format!("cannot render the chat template: {e}")))?;
        check_prompt(&ids, max_tokens, served, "messages")?;
        let (sampling, rendering) = sampling_config(&fields, max_tokens, served);
        let logprobs = self.logprobs == Some(true);
        let top_logprobs = self.top_logprobs.unwrap_or(0);
        let job = GenJob { prompt: ids, n: fields.n.unwrap_or(1), sampling, top_logprobs, prompt_logprobs: None };
        Ok(Planned { jobs: vec![job], stream: rendering.stream, kind: Kind::Chat { logprobs, top_logprobs }, rendering })
    }
}

/// One finished choice: what the generator produced, cut at a stop string.
#[derive(Debug, Clone)]
struct Choice {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    top: Vec<Vec<(u32, f32)>>,
    /// The text without the stop token (and cut at a stop string).
    text: String,
    finish: &'static str,
    stop_reason: Value,
}

/// Tokens with their log-probs and alternatives (rows of a choice, or one streamed token).
#[derive(Debug, Clone, Copy)]
struct Scored<'c> {
    tokens: &'c [u32],
    logprobs: &'c [f32],
    /// Per token, its alternatives (may be shorter than `tokens`: none asked for).
    top: &'c [Vec<(u32, f32)>],
}

impl Choice {
    fn scored(&self) -> Scored<'_> {
        Scored { tokens: &self.tokens, logprobs: &self.logprobs, top: &self.top }
    }
}

/// Applies stop tokens and stop strings to a completion.
fn finish_choice(completion: &Completion, top: &[Vec<(u32, f32)>], rendering: &Rendering, served: &Served) -> Choice {
    let mut tokens = completion.tokens.clone();
    let mut logprobs = completion.logprobs.clone();
    let mut top = top.to_vec();
    let stopped_by_token = completion.finish == FinishReason::Stop;
    let body_len = if stopped_by_token { tokens.len().saturating_sub(1) } else { tokens.len() };
    let mut text = served.decode(&tokens[..body_len], rendering.skip_special);
    let mut finish = if stopped_by_token { "stop" } else { "length" };
    let mut stop_reason = match tokens.last() {
        Some(&last) if stopped_by_token && rendering.stop_token_ids.contains(&last) => json!(last),
        _ => Value::Null,
    };
    // The first stop string in the text ends the completion there.
    let first = rendering.stop_strings.iter().filter_map(|s| text.find(s.as_str()).map(|at| (at, s))).min_by_key(|(at, _)| *at);
    if let Some((at, stop)) = first {
        // The fewest tokens whose text holds a stop string.
        let holds = |k: usize| {
            let prefix = served.decode(&tokens[..k], rendering.skip_special);
            rendering.stop_strings.iter().any(|s| prefix.contains(s.as_str()))
        };
        let (mut lo, mut hi) = (1usize, body_len);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if holds(mid) { hi = mid } else { lo = mid + 1 }
        }
        tokens.truncate(hi);
        logprobs.truncate(hi);
        top.truncate(hi);
        let end = if rendering.include_stop_str { at + stop.len() } else { at };
        text.truncate(end);
        finish = "stop";
        stop_reason = json!(stop);
    }
    Choice { tokens, logprobs, top, text, finish, stop_reason }
}

/// Token counts of a response.
fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({ "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens })
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What every rendering of a response shares: its choices (with the job and output each
/// came from), token counts, the weights version and the time.
struct Rendered<'a> {
    choices: Vec<(&'a GenJob, &'a GenOutput, Choice)>,
    usage: Value,
    metadata: Value,
    created: u64,
}

/// The completions API's options of a request.
#[derive(Clone, Copy)]
struct CompletionKind {
    logprobs: Option<usize>,
    echo: bool,
    prompt_logprobs: bool,
    tokens_as_ids: bool,
}

impl Planned {
    /// The response to the request from what its jobs produced.
    pub fn render(&self, generated: &Generated, served: &Served) -> Value {
        let mut choices = Vec::new();
        for (job, output) in self.jobs.iter().zip(&generated.outputs) {
            for (completion, top) in output.completions.iter().zip(&output.top) {
                choices.push((job, output, finish_choice(completion, top, &self.rendering, served)));
            }
        }
        let prompt_tokens: usize = self.jobs.iter().map(|j| j.prompt.len()).sum();
        let completion_tokens: usize = choices.iter().map(|(_, _, c)| c.tokens.len()).sum();
        let out = Rendered {
            choices,
            usage: usage(prompt_tokens, completion_tokens),
            metadata: json!({ "weight_version": generated.weights_version }),
            created: now(),
        };
        match self.kind {
            Kind::Completion { logprobs, echo, prompt_logprobs, tokens_as_ids } => {
                let kind = CompletionKind { logprobs, echo, prompt_logprobs, tokens_as_ids };
                self.completion_json(out, kind, served)
            }
            Kind::Chat { logprobs, top_logprobs } => self.chat_json(out, logprobs, top_logprobs, served),
        }
    }

    /// A completions response chunk or body with `choices`.
    fn completion_base(&self, out: &Rendered, choices: Vec<Value>, served: &Served) -> Value {
        json!({ "id": format!("cmpl-{}", self.rendering.id), "object": "text_completion", "created": out.created, "model": served.name, "choices": choices })
    }

    /// A whole completions response.
    fn completion_json(&self, out: Rendered, kind: CompletionKind, served: &Served) -> Value {
        let r = &self.rendering;
        let rendered: Vec<Value> = out
            .choices
            .iter()
            .enumerate()
            .map(|(index, (job, output, choice))| {
                let prompt_text = if kind.echo { served.decode(&job.prompt, r.skip_special) } else { String::new() };
                let mut entry = json!({
                    "index": index,
                    "text": format!("{prompt_text}{}", choice.text),
                    "logprobs": null,
                    "finish_reason": choice.finish,
                    "stop_reason": choice.stop_reason,
                });
                if let Some(top) = kind.logprobs {
                    let mut object = completion_logprobs(
                        choice.scored(),
                        0..choice.tokens.len(),
                        top,
                        kind.tokens_as_ids,
                        served,
                        prompt_text.chars().count(),
                    );
                    if kind.echo {
                        object = with_echoed_prompt(object, job, output, kind.tokens_as_ids, served);
                    }
                    entry["logprobs"] = object;
                }
                if r.return_token_ids {
                    entry["token_ids"] = json!(choice.tokens);
                    entry["prompt_token_ids"] = json!(job.prompt);
                }
                if kind.prompt_logprobs {
                    entry["prompt_logprobs"] = prompt_logprobs_json(output, served);
                }
                entry
            })
            .collect();
        let mut body = self.completion_base(&out, rendered, served);
        body["usage"] = out.usage;
        body["metadata"] = out.metadata;
        body
    }

    /// A whole chat response.
    fn chat_json(&self, out: Rendered, logprobs: bool, top_logprobs: usize, served: &Served) -> Value {
        let r = &self.rendering;
        let rendered: Vec<Value> = out
            .choices
            .iter()
            .enumerate()
            .map(|(index, (_, _, choice))| {
                let mut entry = json!({
                    "index": index,
                    "message": { "role": "assistant", "content": choice.text },
                    "logprobs": null,
                    "finish_reason": choice.finish,
                    "stop_reason": choice.stop_reason,
                });
                if logprobs {
                    entry["logprobs"] = json!({ "content": chat_logprobs(choice.scored(), 0..choice.tokens.len(), top_logprobs, served) });
                }
                if r.return_token_ids {
                    entry["token_ids"] = json!(choice.tokens);
                }
                entry
            })
            .collect();
        let mut body = json!({
            "id": format!("chatcmpl-{}", r.id), "object": "chat.completion", "created": out.created, "model": served.name,
            "choices": rendered, "usage": out.usage, "metadata": out.metadata,
        });
        if r.return_token_ids {
            body["prompt_token_ids"] = json!(self.jobs[0].prompt);
        }
        body
    }
}

/// The completions API's `logprobs` object for tokens `range` of a choice, whose first
/// token starts at character `start` of the text.
fn completion_logprobs(choice: Scored, range: std::ops::Range<usize>, k: usize, as_ids: bool, served: &Served, start: usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    let mut at = start;
    for i in range {
        let id = choice.tokens[i];
        tokens.push(served.token_text(id, as_ids));
        token_logprobs.push(json!(choice.logprobs[i]));
        let mut top: Map<String, Value> = Map::new();
        // The sampled token is always there (as vLLM does), then the k most likely.
        top.insert(served.token_text(id, as_ids), json!(choice.logprobs[i]));
        for &(alt, lp) in choice.top.get(i).map(Vec::as_slice).unwrap_or_default().iter().take(k) {
            top.entry(served.token_text(alt, as_ids)).or_insert(json!(lp));
        }
        top_logprobs.push(Value::Object(top));
        text_offset.push(at);
        at += served.decode(&[id], false).chars().count();
    }
    json!({ "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset })
}

/// Puts the prompt's tokens before a completion's in its `logprobs` (echo).
fn with_echoed_prompt(object: Value, job: &GenJob, output: &GenOutput, as_ids: bool, served: &Served) -> Value {
    let positions = output.prompt_logprobs.clone().unwrap_or_default();
    let mut tokens: Vec<Value> = job.prompt.iter().map(|&t| json!(served.token_text(t, as_ids))).collect();
    let mut token_logprobs: Vec<Value> = positions.iter().map(|p| p.as_ref().map_or(Value::Null, |p| json!(p.logprob))).collect();
    let mut top_logprobs: Vec<Value> = positions
        .iter()
        .map(|p| match p {
            None => Value::Null,
            Some(p) => {
                let mut top: Map<String, Value> = Map::new();
                top.insert(served.token_text(p.id, as_ids), json!(p.logprob));
                for &(alt, lp) in &p.top {
                    top.entry(served.token_text(alt, as_ids)).or_insert(json!(lp));
                }
                Value::Object(top)
            }
        })
        .collect();
    let mut text_offset = Vec::new();
    let mut at = 0usize;
    for &t in &job.prompt {
        text_offset.push(json!(at));
        at += served.decode(&[t], false).chars().count();
    }
    let take = |key: &str| object.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
    tokens.extend(take("tokens"));
    token_logprobs.extend(take("token_logprobs"));
    top_logprobs.extend(take("top_logprobs"));
    text_offset.extend(take("text_offset"));
    json!({ "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset })
}

/// vLLM's `prompt_logprobs`: per prompt position, `null` for the first, else a map from
/// token id to `{logprob, rank, decoded_token}` holding the prompt's token and the top ones.
fn prompt_logprobs_json(output: &GenOutput, served: &Served) -> Value {
    let Some(positions) = &output.prompt_logprobs else { return Value::Null };
    let entry = |p: &PositionLogprob| {
        let mut map: BTreeMap<String, Value> = BTreeMap::new();
        map.insert(p.id.to_string(), json!({ "logprob": p.logprob, "rank": p.rank, "decoded_token": served.decode(&[p.id], false) }));
        for (rank, &(alt, lp)) in p.top.iter().enumerate() {
            map.entry(alt.to_string())
                .or_insert_with(|| json!({ "logprob": lp, "rank": rank + 1, "decoded_token": served.decode(&[alt], false) }));
        }
        json!(map)
    };
    Value::Array(positions.iter().map(|p| p.as_ref().map_or(Value::Null, entry)).collect())
}

/// The chat API's `logprobs.content` for tokens `range` of a choice.
fn chat_logprobs(choice: Scored, range: std::ops::Range<usize>, k: usize, served: &Served) -> Vec<Value> {
    let item = |id: u32, logprob: f32| {
        let token = served.decode(&[id], false);
        json!({ "token": token, "logprob": logprob, "bytes": token.as_bytes() })
    };
    range
        .map(|i| {
            let mut entry = item(choice.tokens[i], choice.logprobs[i]);
            let top: Vec<Value> =
                choice.top.get(i).map(Vec::as_slice).unwrap_or_default().iter().take(k).map(|&(alt, lp)| item(alt, lp)).collect();
            entry["top_logprobs"] = json!(top);
            entry
        })
        .collect()
}

/// `POST /update_weights_from_disk` (SGLang's): load new weights from a model directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    pub model_path: String,
    pub load_format: Option<String>,
    pub weight_version: Option<String>,
    pub abort_all_requests: Option<bool>,
    /// There is no prefix cache to flush: either value is the same.
    #[allow(dead_code)]
    pub flush_cache: Option<bool>,
    pub is_async: Option<bool>,
    pub keep_pause: Option<bool>,
    /// The trainer's step (SGLang records it); accepted, without effect.
    #[allow(dead_code)]
    pub token_step: Option<i64>,
}

impl ReloadRequest {
    pub fn check(&self) -> Result<(), ApiError> {
        if self.load_format.as_deref().is_some_and(|f| !matches!(f, "auto" | "safetensors")) {
            return Err(ApiError::bad("load_format", "only safetensors model directories load (auto or safetensors)"));
        }
        if self.is_async == Some(true) {
            return Err(ApiError::bad("is_async", "weights are swapped between requests, once loaded (only false)"));
        }
        if self.keep_pause == Some(true) {
            return Err(ApiError::bad("keep_pause", "the server never pauses (only false)"));
        }
        if self.model_path.is_empty() {
            return Err(ApiError::bad("model_path", "`model_path` is empty"));
        }
        Ok(())
    }
}

/// vLLM's development-mode `POST /collective_rpc`: `reload_weights` reloads the model
/// directory the server started with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcRequest {
    pub method: String,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// Loading is not cut short; accepted, without effect.
    #[allow(dead_code)]
    pub timeout: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_mistyped_fields_are_named() {
        let err = parse_body::<CompletionRequest>(r#"{"prompt": [1, 2], "colour": 3}"#).expect_err("unknown");
        assert_eq!(err.param.as_deref(), Some("colour"), "{err:?}");
        let err = parse_body::<CompletionRequest>(r#"{"prompt": [1, 2], "n": "three"}"#).expect_err("mistyped");
        assert!(err.message.contains("`n`"), "{err:?}");
        let err = parse_body::<ChatRequest>(r#"{"messages": [], "temperature": 0.5, "frequency_penalty": 0, "nope": true}"#)
            .expect_err("unknown");
        assert_eq!(err.param.as_deref(), Some("nope"), "{err:?}");
        let ok = parse_body::<CompletionRequest>(r#"{"prompt": [[1, 2], [3]], "n": 2, "stop": "x", "user": "u"}"#).expect("valid");
        assert!(matches!(ok.prompt, PromptInput::IdLists(ref l) if l.len() == 2));
        let reload = parse_body::<ReloadRequest>(r#"{"model_path": "/m", "weight_version": "3", "flush_cache": true}"#).expect("reload");
        assert!(reload.check().is_ok());
        assert!(parse_body::<ReloadRequest>(r#"{"model_path": "/m", "load_format": "pt"}"#).expect("parses").check().is_err());
    }

    #[test]
    fn sampling_fields_the_server_cannot_honour_are_rejected_by_name() {
        let fields: SamplingFields =
            serde_json::from_str(r#"{"presence_penalty": 0.5, "min_p": 0.1, "top_p": 0, "n": 0}"#).expect("parses");
        let mut problems = Vec::new();
        sampling_problems(&fields, &mut problems);
        let named: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(named, ["presence_penalty", "min_p", "n", "top_p"], "{problems:?}");
        let fine: SamplingFields = serde_json::from_str(r#"{"presence_penalty": 0, "logit_bias": {}, "temperature": 0}"#).expect("parses");
        let mut problems = Vec::new();
        sampling_problems(&fine, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn a_request_for_more_than_four_million_tokens_is_refused() {
        assert!(check_request_tokens(256, 4096, "max_tokens").is_ok());
        let err = check_request_tokens(4096, 4096, "max_completion_tokens").expect_err("16M tokens");
        assert_eq!((err.status, err.param.as_deref()), (400, Some("max_completion_tokens")));
        assert!(err.message.contains("4096 sequences of up to 4096 tokens"), "{err:?}");
    }
}
