//! `longrl serve`: a longrl model behind the OpenAI-compatible chat API
//! (`POST /v1/chat/completions`, `GET /v1/models`), so it can be a judge and tests can talk
//! to a real server. Binds to loopback unless told otherwise; one request is generated at a
//! time.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use longrl_backends::BackendTask;
use longrl_backends::TrainBackend;
use longrl_stdlib::model::chat::ModelTokenizer;
use longrl_stdlib::model::generate::{FinishReason, SamplingConfig, generate_group};
use longrl_stdlib::model::load_model;
use longrl_stdlib::record::ChatMessage;
use serde::Deserialize;
use serde_json::{Value, json};

/// What to serve, where.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: PathBuf,
    pub host: String,
    /// 0 picks a free port (printed on the first line of stdout).
    pub port: u16,
    /// Cap on `max_tokens` of a request.
    pub max_tokens_cap: usize,
    /// Stop after this many requests (tests); `None` serves until killed.
    pub max_requests: Option<usize>,
}

/// The body of a chat completion request (the fields longrl uses; others are ignored, as
/// OpenAI-compatible servers do).
#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default = "default_temperature")]
    temperature: f32,
    #[serde(default = "default_top_p")]
    top_p: f32,
    #[serde(default)]
    seed: Option<u64>,
}

fn default_temperature() -> f32 {
    1.0
}
fn default_top_p() -> f32 {
    1.0
}

impl BackendTask for ServeOptions {
    type Output = anyhow::Result<()>;

    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        let (config, model) = load_model::<B::InnerBackend>(&self.model, &device)?;
        let tokenizer = ModelTokenizer::load(&self.model)?;
        let name = self.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "longrl".into());
        let server = tiny_http::Server::http((self.host.as_str(), self.port))
            .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", self.host, self.port))?;
        let port = server.server_addr().to_ip().map(|a| a.port()).unwrap_or(self.port);
        crate::outln!("listening on http://{}:{port}/v1 (model {name})", self.host)?;
        let mut stop_ids = tokenizer.stop_ids.clone();
        stop_ids.extend(config.eos_ids());
        let mut served = 0usize;
        for mut request in server.incoming_requests() {
            let method = request.method().to_string();
            let url = request.url().split('?').next().unwrap_or("").to_string();
            let (status, body) = match (method.as_str(), url.as_str()) {
                ("GET", "/v1/models") => {
                    (200, json!({ "object": "list", "data": [{ "id": name, "object": "model", "owned_by": "longrl" }] }))
                }
                ("GET", "/health") => (200, json!({ "status": "ok" })),
                ("POST", "/v1/chat/completions") => {
                    let mut text = String::new();
                    match std::io::Read::read_to_string(&mut std::io::Read::take(request.as_reader(), MAX_BODY_BYTES), &mut text) {
                        Err(e) => (400, error_body(&format!("cannot read the request body: {e}"))),
                        Ok(_) => match serde_json::from_str::<ChatRequest>(&text) {
                            Err(e) => (400, error_body(&format!("invalid request: {e}"))),
                            Ok(chat) => complete(&model, &tokenizer, &name, &stop_ids, &chat, self.max_tokens_cap, config.vocab_size),
                        },
                    }
                }
                _ => (404, error_body(&format!("no route for {method} {url}"))),
            };
            let response = tiny_http::Response::from_string(body.to_string()).with_status_code(status).with_header(
                tiny_http::Header::from_bytes("Content-Type", "application/json").map_err(|()| anyhow::anyhow!("bad header"))?,
            );
            if let Err(e) = request.respond(response) {
                tracing::warn!(error = %e, "could not send a reply");
            }
            served += 1;
            if self.max_requests.is_some_and(|max| served >= max) {
                break;
            }
        }
        Ok(())
    }
}

/// The largest request body read (the rest of a longer one is ignored, and its JSON fails).
const MAX_BODY_BYTES: u64 = 16 << 20;

fn error_body(message: &str) -> Value {
    json!({ "error": { "message": message, "type": "invalid_request_error" } })
}

/// Generates one chat completion.
fn complete<B: longrl_backends::CustomGrad>(
    model: &longrl_stdlib::model::CausalLm<B>,
    tokenizer: &ModelTokenizer,
    name: &str,
    stop_ids: &[u32],
    chat: &ChatRequest,
    cap: usize,
    vocab: usize,
) -> (u16, Value) {
    if chat.messages.is_empty() {
        return (400, error_body("messages must not be empty"));
    }
    let problems = longrl_stdlib::options::sampling_problems(chat.temperature, chat.top_p, true);
    if !problems.is_empty() {
        return (400, error_body(&problems.join("; ")));
    }
    let ids = match tokenizer.encode_chat(&chat.messages, true, &json!({ "enable_thinking": true })) {
        Ok(ids) if !ids.is_empty() => ids,
        Ok(_) => return (400, error_body("the prompt is empty")),
        Err(e) => return (400, error_body(&e.to_string())),
    };
    if ids.iter().any(|&t| t as usize >= vocab) {
        return (500, error_body("the tokenizer produced ids outside the model's vocabulary"));
    }
    let max_tokens = chat.max_completion_tokens.or(chat.max_tokens).unwrap_or(256).clamp(1, cap);
    let sampling = SamplingConfig {
        temperature: chat.temperature,
        top_p: chat.top_p,
        top_k: 0,
        max_new_tokens: max_tokens,
        stop_tokens: stop_ids.to_vec(),
        seed: chat.seed.unwrap_or(0),
    };
    let completion = match generate_group(model, &ids, 1, &sampling) {
        Ok(mut out) => out.remove(0),
        Err(e) => return (500, error_body(&e.to_string())),
    };
    let mut tokens = completion.tokens.clone();
    if tokens.last().is_some_and(|t| stop_ids.contains(t)) {
        tokens.pop();
    }
    let content = match tokenizer.tokenizer.decode(&tokens, true) {
        Ok(text) => text,
        Err(e) => return (500, error_body(&e.to_string())),
    };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let finish = match completion.finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    };
    (
        200,
        json!({
            "id": format!("chatcmpl-{created}-{}", ids.len()),
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": finish }],
            "usage": { "prompt_tokens": ids.len(), "completion_tokens": completion.tokens.len(), "total_tokens": ids.len() + completion.tokens.len() }
        }),
    )
}
