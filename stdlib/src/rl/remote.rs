//! Rollouts on inference servers: vLLM, SGLang or `longrl serve`, through their
//! OpenAI-compatible completions endpoint, as verl, OpenRLHF and slime generate theirs.
//!
//! A stage sends each prompt as token ids with `n` = G samples, the phase's temperature,
//! top-p and token limit, and asks for the sampled ids (`return_token_ids`) and their
//! log-probs (`logprobs: 0`). Requests are spread over the servers with at most
//! `max_in_flight` waiting on each; a request that fails transiently (no connection, a
//! timeout, a 429 or 5xx, a reply that is not the API's) is sent again, to any server; a
//! server that fails `max_failures` times in a row is taken out with a warning, and the
//! step fails, naming every server and its last error, only when none is left.
//!
//! Weights: [`RemoteRollouts::load_weights`] asks every server to load a model directory
//! (SGLang's and longrl's `POST /update_weights_from_disk` with a `weight_version`; vLLM's
//! development-mode `POST /collective_rpc {"method": "reload_weights"}`, which rereads the
//! directory vLLM was started on, then `POST /reset_prefix_cache`). SGLang and longrl name
//! the version in every reply (`metadata.weight_version`): a reply from other weights than
//! the ones loaded is stale, rejected, and its server taken out. vLLM names none; its
//! replies are trusted because no request is sent before every server confirmed the load.
//!
//! Stages that share servers take turns: a stage holds them from its first request to its
//! end (see [`Lease`]), so two stages never load their weights over each other's.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::StageError;
use crate::model::SaveDtype;
use crate::model::generate::{Completion, FinishReason, SamplingConfig};
use crate::stage::CancelToken;

/// Which inference server the URLs point at: how weights are loaded and versions read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// vLLM (0.10.2 or later for `return_token_ids`), started with
    /// `VLLM_SERVER_DEV_MODE=1` on the `weights_dir` (weights reload through
    /// `/collective_rpc`).
    Vllm,
    /// SGLang (`/update_weights_from_disk`, versions in replies).
    Sglang,
    /// `longrl serve` (SGLang's reload route and versions).
    #[default]
    Longrl,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Self::Vllm => "vllm",
            Self::Sglang => "sglang",
            Self::Longrl => "longrl",
        }
    }

    /// Whether replies name the weights version that produced them.
    fn versioned(self) -> bool {
        !matches!(self, Self::Vllm)
    }
}

/// Where a stage's rollouts are generated: the `rollout` option of `rl_phase`, `evaluate`
/// and `score_difficulty` (absent: in the stage's own process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Base URLs of the servers' OpenAI-compatible API, e.g. `http://10.0.0.2:8000/v1`
    /// (completions go to `URL/completions`; the weight routes and `/health` to the URL
    /// without its `/v1`).
    pub urls: Vec<String>,
    /// The model name the servers serve (the `model` field of every request).
    pub model: String,
    /// `vllm`, `sglang` or `longrl`: how weights are reloaded and versions read.
    #[serde(default)]
    pub flavor: Flavor,
    /// Requests waiting on one server at most.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Seconds one request (or one weight load) may take.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Extra attempts of a request that failed transiently (429, 5xx, a malformed reply).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Attempts in a row without a reply (refused or reset connections, timeouts) after
    /// which a server is taken out.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// Where the policy is written for the servers to load (default: `<stage>-rollout-weights`
    /// in the run directory, e.g. `rl_phase-3-rollout-weights`). vLLM must have been started
    /// on this directory.
    #[serde(default)]
    pub weights_dir: Option<PathBuf>,
    /// Precision of the weights written for the servers: `bf16`, `f16` or `f32`.
    #[serde(default = "default_dtype")]
    pub weights_dtype: SaveDtype,
    /// Mean absolute difference between the servers' log-probs of a group's tokens and the
    /// trainer's above which the trainer uses its own as the old policy's (`rl_phase`).
    #[serde(default = "default_tolerance")]
    pub logprob_tolerance: f64,
}

fn default_in_flight() -> usize {
    4
}
fn default_timeout() -> f64 {
    600.0
}
fn default_retries() -> u32 {
    2
}
fn default_max_failures() -> u32 {
    3
}
fn default_dtype() -> SaveDtype {
    SaveDtype::Bf16
}
fn default_tolerance() -> f64 {
    1e-3
}

/// The longest reply read from a server.
const MAX_REPLY_BYTES: u64 = 256 << 20;
/// Most requests in flight on one server.
pub const MAX_IN_FLIGHT: usize = 1024;
/// The most retries of one request.
pub const MAX_RETRIES: u32 = 100;
/// The most failures in a row a server may be allowed before it is taken out.
pub const MAX_FAILURES: u32 = 1000;
/// The most tokens `longrl serve` generates for one request (sequences times `max_tokens`:
/// a group of 64 of 65,536 tokens, or 1,024 of 4,096), which bounds the work of rendering its
/// reply. vLLM and SGLang have no such limit.
pub const MAX_REQUEST_TOKENS: usize = 1 << 22;

impl RolloutConfig {
    /// The problem, for `longrl check`, with requests of `samples` completions of up to
    /// `max_tokens` tokens: more than `longrl serve` takes.
    pub fn request_problem(&self, samples: usize, max_tokens: usize) -> Option<String> {
        (self.flavor == Flavor::Longrl && samples.saturating_mul(max_tokens) > MAX_REQUEST_TOKENS).then(|| {
            format!(
                "rollout: {samples} samples of up to {max_tokens} tokens per request is more than the {MAX_REQUEST_TOKENS} tokens `longrl serve` generates for one request; lower them, or use vLLM or SGLang (flavor)"
            )
        })
    }

    /// Problems with the values, for `longrl check`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.urls.is_empty() {
            out.push("rollout: urls must name at least one server".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for url in &self.urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                out.push(format!("rollout: url `{url}` must start with http:// or https://"));
            }
            if !seen.insert(url.trim_end_matches('/')) {
                out.push(format!("rollout: url `{url}` is given twice"));
            }
        }
        if self.model.trim().is_empty() {
            out.push("rollout: model must name the model the servers serve".into());
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_IN_FLIGHT {
            out.push(format!("rollout: max_in_flight must be between 1 and {MAX_IN_FLIGHT}, got {}", self.max_in_flight));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0 && self.timeout_s <= 86_400.0) {
            out.push(format!("rollout: timeout_s must be positive and at most a day, got {}", self.timeout_s));
        }
        if self.max_failures == 0 || self.max_failures > MAX_FAILURES {
            out.push(format!("rollout: max_failures must be between 1 and {MAX_FAILURES}, got {}", self.max_failures));
        }
        if self.retries > MAX_RETRIES {
            out.push(format!("rollout: retries must be at most {MAX_RETRIES}, got {}", self.retries));
        }
        if !(self.logprob_tolerance.is_finite() && self.logprob_tolerance >= 0.0) {
            out.push(format!("rollout: logprob_tolerance must be 0 or positive, got {}", self.logprob_tolerance));
        }
        if self.flavor == Flavor::Vllm && self.weights_dir.is_none() {
            out.push(
                "rollout: flavor \"vllm\" needs weights_dir, the directory vLLM was started on (vLLM reloads its own directory)".into(),
            );
        }
        out
    }
}

/// One rollout server and how it fares.
#[derive(Debug)]
struct Server {
    /// The API base, e.g. `http://host:8000/v1`.
    url: String,
    /// The server's root, for `/health` and the weight routes.
    root: String,
    alive: AtomicBool,
    failures_in_a_row: AtomicU32,
    last_error: Mutex<String>,
    answered: AtomicUsize,
}

impl Server {
    fn new(url: &str) -> Self {
        let url = url.trim_end_matches('/').to_string();
        let root = url.strip_suffix("/v1").unwrap_or(&url).to_string();
        Self {
            url,
            root,
            alive: AtomicBool::new(true),
            failures_in_a_row: AtomicU32::new(0),
            last_error: Mutex::new(String::new()),
            answered: AtomicUsize::new(0),
        }
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn set_error(&self, message: &str) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = message.to_string();
        }
    }

    fn last_error(&self) -> String {
        self.last_error.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Takes the server out, once, with a warning.
    fn take_out(&self, stage: &str, why: &str) {
        self.set_error(why);
        if self.alive.swap(false, Ordering::SeqCst) {
            tracing::warn!(stage = %stage, server = %self.url, reason = %why, "a rollout server is taken out; the others carry on");
        }
    }
}

/// How one attempt went wrong.
#[derive(Debug, Clone, PartialEq)]
enum Failure {
    /// No reply: refused connection, reset, timeout. Retried elsewhere; counts against the
    /// server only.
    Unreachable(String),
    /// A reply worth trying again: 429, 5xx, not the API's JSON.
    Retry(String),
    /// A reply from other weights than the ones loaded.
    Stale(String),
    /// A reply that will not improve (a 4xx): the request itself is at fault.
    Final(String),
}

/// One prompt's samples from a server.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteGroup {
    /// The samples, each with its ids (the stop token kept, as in-process generation keeps
    /// it) and per-token log-probs (`NaN` where the server gave none).
    pub completions: Vec<Completion>,
    /// The weights version the server named (`None` for vLLM).
    pub weights_version: Option<String>,
    /// The server that answered.
    pub server: String,
}

/// A set of rollout servers a stage uses.
#[derive(Debug)]
pub struct RemoteRollouts {
    config: RolloutConfig,
    stage: String,
    agent: ureq::Agent,
    servers: Vec<Server>,
    /// Rows of the policy's embedding: a reply with an id at or past it is refused.
    vocab_size: usize,
    /// The version the servers hold since the last [`RemoteRollouts::load_weights`].
    loaded: Mutex<Option<String>>,
    /// Held until the stage is done with the servers.
    _lease: Lease,
}

impl RemoteRollouts {
    /// Takes the servers for `stage` (waiting while another stage of the run holds any of
    /// them) and checks that each answers `/health`; one that does not is taken out. Replies
    /// must hold ids below `vocab_size` (the policy's embedding rows).
    pub fn connect(config: RolloutConfig, stage: &str, vocab_size: usize, cancel: &CancelToken) -> Result<Self, StageError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(StageError::Invalid(problems.join("; ")));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs_f64(config.timeout_s)))
            .timeout_connect(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        let servers: Vec<Server> = config.urls.iter().map(|u| Server::new(u)).collect();
        let lease = Lease::acquire(servers.iter().map(|s| s.url.clone()).collect(), stage, cancel)?;
        let remote = Self { config, stage: stage.to_string(), agent, servers, vocab_size, loaded: Mutex::new(None), _lease: lease };
        let health: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(10))).http_status_as_error(false).build().into();
        std::thread::scope(|scope| {
            for server in &remote.servers {
                let (health, remote) = (&health, &remote);
                scope.spawn(move || {
                    if let Err(why) = remote.health(health, server) {
                        server.take_out(&remote.stage, &format!("no answer to /health: {why}"));
                    }
                });
            }
        });
        remote.some_alive()?;
        tracing::info!(stage = %stage, servers = remote.servers.len(), flavor = remote.config.flavor.name(), "rollouts go to inference servers");
        Ok(remote)
    }

    pub fn config(&self) -> &RolloutConfig {
        &self.config
    }

    /// The servers still in use.
    pub fn alive(&self) -> Vec<String> {
        self.servers.iter().filter(|s| s.is_alive()).map(|s| s.url.clone()).collect()
    }

    /// Requests each server answered so far, by URL.
    pub fn answered(&self) -> BTreeMap<String, usize> {
        self.servers.iter().map(|s| (s.url.clone(), s.answered.load(Ordering::SeqCst))).collect()
    }

    /// The version loaded by the last [`RemoteRollouts::load_weights`].
    pub fn loaded_version(&self) -> Option<String> {
        self.loaded.lock().ok().and_then(|v| v.clone())
    }

    /// The error when no server is left.
    fn some_alive(&self) -> Result<(), StageError> {
        if self.servers.iter().any(Server::is_alive) {
            return Ok(());
        }
        let each: Vec<String> = self.servers.iter().map(|s| format!("{} ({})", s.url, s.last_error())).collect();
        Err(StageError::Failed(format!("{}: every rollout server failed: {}", self.stage, each.join("; "))))
    }

    fn health(&self, agent: &ureq::Agent, server: &Server) -> Result<(), String> {
        let url = format!("{}/health", server.root);
        match agent.get(&url).call() {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("HTTP {}", response.status().as_u16())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Asks every server in use to load the model directory `dir` as `version`. A server
    /// that cannot is taken out; an error when none is left. For vLLM, `dir` must be the
    /// directory it was started on.
    pub fn load_weights(&self, dir: &Path, version: &str) -> Result<(), StageError> {
        let dir = std::path::absolute(dir).map_err(|e| StageError::io(dir, e))?;
        std::thread::scope(|scope| {
            for server in self.servers.iter().filter(|s| s.is_alive()) {
                let dir = &dir;
                scope.spawn(move || {
                    let mut last = String::new();
                    for attempt in 0..=self.config.retries {
                        if attempt > 0 {
                            std::thread::sleep(backoff(attempt));
                        }
                        match self.load_on(server, dir, version) {
                            Ok(()) => return,
                            Err(Failure::Final(why)) => {
                                last = why;
                                break;
                            }
                            Err(Failure::Unreachable(why) | Failure::Retry(why) | Failure::Stale(why)) => last = why,
                        }
                    }
                    server.take_out(&self.stage, &format!("could not load weights {version}: {last}"));
                });
            }
        });
        self.some_alive()?;
        if let Ok(mut loaded) = self.loaded.lock() {
            *loaded = Some(version.to_string());
        }
        tracing::debug!(stage = %self.stage, version, servers = self.alive().len(), "rollout servers loaded new weights");
        Ok(())
    }

    fn load_on(&self, server: &Server, dir: &Path, version: &str) -> Result<(), Failure> {
        match self.config.flavor {
            Flavor::Sglang | Flavor::Longrl => {
                let body = json!({ "model_path": dir.display().to_string(), "weight_version": version });
                let reply = self.post(&format!("{}/update_weights_from_disk", server.root), &body)?;
                if reply.get("success").and_then(Value::as_bool) != Some(true) {
                    return Err(Failure::Final(format!(
                        "the load failed: {}",
                        reply.get("message").and_then(Value::as_str).unwrap_or("no message")
                    )));
                }
                Ok(())
            }
            Flavor::Vllm => {
                self.post(&format!("{}/collective_rpc", server.root), &json!({ "method": "reload_weights" }))?;
                self.post(&format!("{}/reset_prefix_cache", server.root), &json!({}))?;
                Ok(())
            }
        }
    }

    /// POSTs JSON; the reply's JSON, or how it failed.
    fn post(&self, url: &str, body: &Value) -> Result<Value, Failure> {
        let mut response = match self.agent.post(url).header("Content-Type", "application/json").send(body.to_string()) {
            Ok(response) => response,
            Err(e) => return Err(Failure::Unreachable(format!("{url}: {e}"))),
        };
        let status = response.status().as_u16();
        let text = match response.body_mut().with_config().limit(MAX_REPLY_BYTES).lossy_utf8(true).read_to_string() {
            Ok(text) => text,
            Err(e) => return Err(Failure::Unreachable(format!("{url}: cannot read the reply: {e}"))),
        };
        let snippet = || text.chars().take(300).collect::<String>();
        if status == 429 || status >= 500 {
            return Err(Failure::Retry(format!("{url}: HTTP {status}: {}", snippet())));
        }
        if status >= 400 {
            return Err(Failure::Final(format!("{url}: HTTP {status}: {}", snippet())));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|_| Failure::Retry(format!("{url}: the reply is not JSON: {}", snippet())))
    }

    /// `n` samples of each prompt (prompt `i` with `samplings[i]`), spread over the servers.
    pub fn generate(
        &self,
        prompts: &[&[u32]],
        n: usize,
        samplings: &[SamplingConfig],
        cancel: &CancelToken,
    ) -> Result<Vec<RemoteGroup>, StageError> {
        if prompts.len() != samplings.len() {
            return Err(StageError::Invalid(format!("{} prompts but {} sampling settings", prompts.len(), samplings.len())));
        }
        let expected = if self.config.flavor.versioned() { self.loaded_version() } else { None };
        let pool = Pool::new(prompts.len());
        std::thread::scope(|scope| {
            for server in &self.servers {
                for _ in 0..self.config.max_in_flight.min(prompts.len()) {
                    let pool = &pool;
                    let expected = expected.as_deref();
                    scope.spawn(move || self.serve_from(server, pool, prompts, n, samplings, expected, cancel));
                }
            }
        });
        cancel.check()?;
        let state = pool.into_state();
        if let Some(fatal) = state.fatal {
            return Err(StageError::Failed(format!("{}: {fatal}", self.stage)));
        }
        self.some_alive()?;
        state
            .results
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.ok_or_else(|| StageError::Failed(format!("{}: prompt {i} got no rollouts", self.stage))))
            .collect()
    }

    /// One request slot on `server`: takes prompts from the pool until it is empty, the
    /// server is out, or the step failed.
    #[allow(clippy::too_many_arguments)]
    fn serve_from(
        &self,
        server: &Server,
        pool: &Pool,
        prompts: &[&[u32]],
        n: usize,
        samplings: &[SamplingConfig],
        expected: Option<&str>,
        cancel: &CancelToken,
    ) {
        while let Some((index, attempts)) =
            pool.take(|| server.is_alive() && !cancel.is_cancelled() && self.servers.iter().any(Server::is_alive))
        {
            match self.complete(server, prompts[index], n, &samplings[index], expected) {
                Ok(group) => {
                    server.failures_in_a_row.store(0, Ordering::SeqCst);
                    server.answered.fetch_add(1, Ordering::SeqCst);
                    pool.done(index, group);
                }
                Err(Failure::Final(why)) => pool.fail(format!("a rollout request was refused: {why}")),
                Err(Failure::Stale(why)) => {
                    pool.put_back(index, attempts);
                    server.take_out(&self.stage, &why);
                }
                Err(Failure::Unreachable(why)) => {
                    pool.put_back(index, attempts);
                    self.count_failure(server, &why);
                    // Not at once again: a server that refuses connections answers in microseconds.
                    if server.is_alive() {
                        cancel.sleep(backoff(server.failures_in_a_row.load(Ordering::SeqCst)));
                    }
                }
                Err(Failure::Retry(why)) => {
                    if attempts >= self.config.retries {
                        pool.fail(format!("a rollout request failed {} times, last on {}: {why}", attempts + 1, server.url));
                    } else {
                        server.set_error(&why);
                        pool.put_back(index, attempts + 1);
                        cancel.sleep(backoff(attempts + 1));
                    }
                }
            }
        }
    }

    fn count_failure(&self, server: &Server, why: &str) {
        server.set_error(why);
        let failures = server.failures_in_a_row.fetch_add(1, Ordering::SeqCst) + 1;
        if failures >= self.config.max_failures {
            server.take_out(&self.stage, &format!("{failures} failures in a row, the last: {why}"));
        }
    }

    /// One completions request.
    fn complete(
        &self,
        server: &Server,
        prompt: &[u32],
        n: usize,
        sampling: &SamplingConfig,
        expected: Option<&str>,
    ) -> Result<RemoteGroup, Failure> {
        let body = request_body(&self.config, prompt, n, sampling);
        let reply = self.post(&format!("{}/completions", server.url), &body)?;
        let group = parse_reply(&reply, n, &sampling.stop_tokens)
            .and_then(|group| check_completions(group, self.vocab_size, sampling.max_new_tokens))
            .map_err(|why| Failure::Retry(format!("{}: {why}", server.url)))?;
        if let (Some(expected), Some(found)) = (expected, group.weights_version.as_deref())
            && expected != found
        {
            return Err(Failure::Stale(format!("answered with weights version `{found}` where `{expected}` was loaded")));
        }
        if expected.is_some() && group.weights_version.is_none() {
            return Err(Failure::Stale("the reply names no weights version (metadata.weight_version)".into()));
        }
        Ok(RemoteGroup { server: server.url.clone(), ..group })
    }
}

/// The completions request for one prompt.
fn request_body(config: &RolloutConfig, prompt: &[u32], n: usize, sampling: &SamplingConfig) -> Value {
    let mut body = json!({
        "model": config.model,
        "prompt": prompt,
        "n": n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_new_tokens,
        "seed": sampling.seed as i64,
        "stop_token_ids": sampling.stop_tokens,
        "logprobs": 0,
        "return_token_ids": true,
    });
    if sampling.top_k > 0 {
        body["top_k"] = json!(sampling.top_k);
    }
    if config.flavor != Flavor::Sglang {
        // vLLM before `return_token_ids`: the ids are read from the logprobs' tokens.
        body["return_tokens_as_token_ids"] = json!(true);
    }
    body
}

/// The samples of a completions reply.
fn parse_reply(reply: &Value, n: usize, stop_tokens: &[u32]) -> Result<RemoteGroup, String> {
    let choices = reply.get("choices").and_then(Value::as_array).ok_or("the reply has no choices")?;
    if choices.len() != n {
        return Err(format!("the reply has {} choices where {n} were asked for", choices.len()));
    }
    let mut ordered: Vec<&Value> = choices.iter().collect();
    ordered.sort_by_key(|c| c.get("index").and_then(Value::as_u64).unwrap_or(u64::MAX));
    let completions = ordered.into_iter().map(|c| parse_choice(c, stop_tokens)).collect::<Result<Vec<_>, _>>()?;
    let weights_version = reply.pointer("/metadata/weight_version").and_then(Value::as_str).map(str::to_string);
    Ok(RemoteGroup { completions, weights_version, server: String::new() })
}

/// `group` if every sample fits what was asked: ids inside the vocabulary and no more than
/// `max_tokens` of them (one more where the stop token the server left out was put back).
fn check_completions(group: RemoteGroup, vocab_size: usize, max_tokens: usize) -> Result<RemoteGroup, String> {
    for completion in &group.completions {
        if let Some(id) = completion.tokens.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(format!("the reply holds token id {id}, past the policy's vocabulary of {vocab_size}"));
        }
        if completion.tokens.len() > max_tokens + 1 {
            return Err(format!("a sample of {} tokens where max_tokens was {max_tokens}", completion.tokens.len()));
        }
    }
    Ok(group)
}

/// One choice: its token ids (from `token_ids`, else `token_id:N` logprob tokens), their
/// log-probs, and why it ended.
fn parse_choice(choice: &Value, stop_tokens: &[u32]) -> Result<Completion, String> {
    let logprobs = choice.get("logprobs").filter(|l| !l.is_null());
    let mut tokens: Vec<u32> = match choice.get("token_ids").and_then(Value::as_array) {
        Some(ids) => ids
            .iter()
            .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or("a token id is not a number below 2^32"))
            .collect::<Result<_, _>>()?,
        None => logprobs
            .and_then(|l| l.get("tokens"))
            .and_then(Value::as_array)
            .ok_or("the reply has neither token_ids nor token_id:N tokens in its logprobs")?
            .iter()
            .map(|t| {
                t.as_str()
                    .and_then(|t| t.strip_prefix("token_id:"))
                    .and_then(|id| id.parse::<u32>().ok())
                    .ok_or("a logprobs token is not token_id:N")
            })
            .collect::<Result<_, _>>()?,
    };
    let mut values: Vec<f32> = logprobs
        .and_then(|l| l.get("token_logprobs"))
        .and_then(Value::as_array)
        .map(|lps| lps.iter().map(|v| v.as_f64().map_or(f32::NAN, |x| x as f32)).collect())
        .unwrap_or_default();
    let finish = match choice.get("finish_reason").and_then(Value::as_str) {
        Some("stop") => FinishReason::Stop,
        Some("length") => FinishReason::Length,
        other => return Err(format!("the generation ended with finish_reason {other:?}")),
    };
    // A server that leaves out the stop token it stopped at names it (vLLM's `stop_reason`,
    // SGLang's `matched_stop`): keep it, as in-process rollouts do.
    let matched =
        choice.get("stop_reason").or_else(|| choice.get("matched_stop")).and_then(Value::as_u64).and_then(|t| u32::try_from(t).ok());
    if let Some(stop) = matched.filter(|_| finish == FinishReason::Stop)
        && tokens.last() != Some(&stop)
    {
        if !stop_tokens.contains(&stop) {
            return Err(format!("the generation stopped at token {stop}, which is not a stop token of the request"));
        }
        tokens.push(stop);
    }
    if tokens.is_empty() {
        return Err("an empty completion".into());
    }
    values.resize(tokens.len(), f32::NAN);
    Ok(Completion { tokens, logprobs: values, finish })
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(6)).min(5_000))
}

/// The prompts of one [`RemoteRollouts::generate`], shared by its request slots.
struct Pool {
    state: Mutex<PoolState>,
    changed: Condvar,
}

struct PoolState {
    /// Prompts waiting, with the retries they used.
    queue: VecDeque<(usize, u32)>,
    in_flight: usize,
    results: Vec<Option<RemoteGroup>>,
    fatal: Option<String>,
}

impl Pool {
    fn new(count: usize) -> Self {
        Self {
            state: Mutex::new(PoolState {
                queue: (0..count).map(|i| (i, 0)).collect(),
                in_flight: 0,
                results: vec![None; count],
                fatal: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next prompt, waiting while others are in flight (they may come back); `None`
    /// when there is nothing left to do or `go_on` says to stop.
    fn take(&self, go_on: impl Fn() -> bool) -> Option<(usize, u32)> {
        let mut state = self.lock();
        loop {
            if state.fatal.is_some() || !go_on() {
                self.changed.notify_all();
                return None;
            }
            if let Some(item) = state.queue.pop_front() {
                state.in_flight += 1;
                return Some(item);
            }
            if state.in_flight == 0 {
                return None;
            }
            state = self.changed.wait_timeout(state, Duration::from_millis(50)).map(|(s, _)| s).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn done(&self, index: usize, group: RemoteGroup) {
        let mut state = self.lock();
        state.results[index] = Some(group);
        state.in_flight -= 1;
        self.changed.notify_all();
    }

    fn put_back(&self, index: usize, attempts: u32) {
        let mut state = self.lock();
        state.queue.push_front((index, attempts));
        state.in_flight -= 1;
        self.changed.notify_all();
    }

    fn fail(&self, why: String) {
        let mut state = self.lock();
        state.fatal.get_or_insert(why);
        state.in_flight -= 1;
        self.changed.notify_all();
    }

    fn into_state(self) -> PoolState {
        self.state.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A stage's hold on a set of servers: the stages of a run that share servers take turns,
/// so one never loads its weights while another is generating.
#[derive(Debug)]
pub struct Lease {
    urls: Vec<String>,
}

/// Which stage holds each server URL.
static LEASES: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
static LEASES_CHANGED: Condvar = Condvar::new();

impl Lease {
    fn acquire(urls: Vec<String>, stage: &str, cancel: &CancelToken) -> Result<Self, StageError> {
        let mut held = LEASES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut warned = false;
        loop {
            let busy: Vec<(String, String)> = urls.iter().filter_map(|u| held.get(u).map(|s| (u.clone(), s.clone()))).collect();
            if busy.is_empty() {
                break;
            }
            if !warned {
                tracing::info!(stage = %stage, server = %busy[0].0, held_by = %busy[0].1, "waiting for rollout servers another stage is using");
                warned = true;
            }
            cancel.check()?;
            held = LEASES_CHANGED.wait_timeout(held, Duration::from_millis(200)).map(|(h, _)| h).unwrap_or_else(|p| p.into_inner().0);
        }
        for url in &urls {
            held.insert(url.clone(), stage.to_string());
        }
        Ok(Self { urls })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut held = LEASES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for url in &self.urls {
            held.remove(url);
        }
        LEASES_CHANGED.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A fake server of the longrl/SGLang protocol on loopback: `n` samples of ids
    /// `[prompt[0] + i, stop]`, log-prob -0.5 each, the loaded version in the reply. Counts
    /// requests and the most in flight at once; `fail_first` requests get a 500.
    struct Fake {
        url: String,
        requests: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
    }

    const STOP: u32 = 2;

    fn fake(fail_first: usize, delay_ms: u64, lie_about_version: bool) -> Fake {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind"));
        let port = server.server_addr().to_ip().expect("ip").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let now = Arc::new(AtomicUsize::new(0));
        let version = Arc::new(Mutex::new("default".to_string()));
        for _ in 0..8 {
            let (server, requests, peak, now, version) =
                (Arc::clone(&server), Arc::clone(&requests), Arc::clone(&peak), Arc::clone(&now), Arc::clone(&version));
            std::thread::spawn(move || {
                while let Ok(mut request) = server.recv() {
                    let mut body = String::new();
                    let _ = request.as_reader().read_to_string(&mut body);
                    let json: Value = serde_json::from_str(&body).unwrap_or_default();
                    let (status, reply) = match request.url() {
                        "/health" => (200, json!({"status": "ok"})),
                        "/update_weights_from_disk" => {
                            *version.lock().expect("version") = json["weight_version"].as_str().unwrap_or("?").to_string();
                            (200, json!({"success": true, "message": "ok"}))
                        }
                        "/v1/completions" => {
                            let count = requests.fetch_add(1, Ordering::SeqCst) + 1;
                            let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(running, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(delay_ms));
                            now.fetch_sub(1, Ordering::SeqCst);
                            if count <= fail_first {
                                (500, json!({"error": "busy"}))
                            } else {
                                let first = json["prompt"][0].as_u64().unwrap_or(0) as u32;
                                let n = json["n"].as_u64().unwrap_or(1) as u32;
                                let choices: Vec<Value> = (0..n)
                                    .map(|i| json!({"index": i, "text": "", "token_ids": [first + i, STOP], "logprobs": {"token_logprobs": [-0.5, -0.5]}, "finish_reason": "stop"}))
                                    .collect();
                                let v = if lie_about_version { "old".to_string() } else { version.lock().expect("version").clone() };
                                (200, json!({"choices": choices, "metadata": {"weight_version": v}}))
                            }
                        }
                        _ => (404, json!({})),
                    };
                    let _ = request.respond(tiny_http::Response::from_string(reply.to_string()).with_status_code(status));
                }
            });
        }
        Fake { url: format!("http://127.0.0.1:{port}/v1"), requests, peak }
    }

    /// A URL nothing listens on.
    fn dead_url() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        format!("http://127.0.0.1:{port}/v1")
    }

    fn config(urls: Vec<String>) -> RolloutConfig {
        RolloutConfig {
            urls,
            model: "m".into(),
            flavor: Flavor::Longrl,
            max_in_flight: 2,
            timeout_s: 10.0,
            retries: 2,
            max_failures: 2,
            weights_dir: None,
            weights_dtype: SaveDtype::Bf16,
            logprob_tolerance: 1e-3,
        }
    }

    fn sampling() -> SamplingConfig {
        SamplingConfig { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 4, stop_tokens: vec![STOP], seed: 0 }
    }

    fn ask(remote: &RemoteRollouts, count: usize) -> Result<Vec<RemoteGroup>, StageError> {
        let prompts: Vec<Vec<u32>> = (0..count).map(|i| vec![10 * i as u32 + 10, 5]).collect();
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        remote.generate(&refs, 3, &vec![sampling(); count], &CancelToken::new())
    }

    #[test]
    fn requests_are_spread_bounded_and_answered_in_order() {
        let (a, b) = (fake(0, 30, false), fake(0, 30, false));
        let remote =
            RemoteRollouts::connect(config(vec![a.url.clone(), b.url.clone()]), "test#1", 1 << 20, &CancelToken::new()).expect("connect");
        let dir = tempfile::tempdir().expect("tempdir");
        remote.load_weights(dir.path(), "v1").expect("load");
        let groups = ask(&remote, 12).expect("rollouts");
        for (i, group) in groups.iter().enumerate() {
            let first = 10 * i as u32 + 10;
            let ids: Vec<Vec<u32>> = group.completions.iter().map(|c| c.tokens.clone()).collect();
            assert_eq!(ids, vec![vec![first, STOP], vec![first + 1, STOP], vec![first + 2, STOP]]);
            assert_eq!(group.completions[0].logprobs, vec![-0.5, -0.5]);
            assert_eq!(group.completions[0].finish, FinishReason::Stop);
            assert_eq!(group.weights_version.as_deref(), Some("v1"));
        }
        let (ra, rb) = (a.requests.load(Ordering::SeqCst), b.requests.load(Ordering::SeqCst));
        assert_eq!(ra + rb, 12);
        assert!(ra >= 3 && rb >= 3, "both servers answer: {ra} and {rb}");
        assert!(a.peak.load(Ordering::SeqCst) <= 2 && b.peak.load(Ordering::SeqCst) <= 2, "at most max_in_flight per server");
        assert_eq!(remote.answered().values().sum::<usize>(), 12);
    }

    #[test]
    fn transient_failures_are_retried_and_a_dead_server_is_taken_out() {
        let flaky = fake(2, 0, false);
        let remote = RemoteRollouts::connect(config(vec![flaky.url.clone()]), "test#2", 1 << 20, &CancelToken::new()).expect("connect");
        assert_eq!(ask(&remote, 1).expect("retried").len(), 1);
        assert_eq!(flaky.requests.load(Ordering::SeqCst), 3, "two 500s, then an answer");

        // One of two servers dies after the health check: the other carries the step.
        let good = fake(0, 0, false);
        let doomed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let doomed_url = format!("http://127.0.0.1:{}/v1", doomed.local_addr().expect("addr").port());
        let health = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut stream, _) = doomed.accept().expect("health check");
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
            // The listener closes here: later requests are refused.
        });
        let remote = RemoteRollouts::connect(config(vec![good.url.clone(), doomed_url.clone()]), "test#3", 1 << 20, &CancelToken::new())
            .expect("connect");
        health.join().expect("health answered");
        let groups = ask(&remote, 6).expect("the other server carries on");
        assert_eq!(groups.len(), 6);
        assert!(groups.iter().all(|g| g.server == good.url));
        assert_eq!(remote.alive(), vec![good.url.clone()], "the dead server is out");
    }

    #[test]
    fn no_server_left_is_an_error_naming_them() {
        let (x, y) = (dead_url(), dead_url());
        let err =
            RemoteRollouts::connect(config(vec![x.clone(), y.clone()]), "test#4", 1 << 20, &CancelToken::new()).expect_err("all dead");
        let text = err.to_string();
        assert!(text.contains("every rollout server failed") && text.contains(&x) && text.contains(&y), "{text}");
    }

    #[test]
    fn a_stale_reply_is_rejected_and_its_server_taken_out() {
        let (liar, honest) = (fake(0, 0, true), fake(0, 0, false));
        let remote = RemoteRollouts::connect(config(vec![liar.url.clone(), honest.url.clone()]), "test#5", 1 << 20, &CancelToken::new())
            .expect("connect");
        let dir = tempfile::tempdir().expect("tempdir");
        remote.load_weights(dir.path(), "v2").expect("load");
        let groups = ask(&remote, 4).expect("the honest server answers");
        assert!(groups.iter().all(|g| g.weights_version.as_deref() == Some("v2")));
        assert_eq!(remote.alive(), vec![honest.url.clone()]);
        // With only the liar, the step fails and names it.
        let liar2 = fake(0, 0, true);
        let remote = RemoteRollouts::connect(config(vec![liar2.url.clone()]), "test#6", 1 << 20, &CancelToken::new()).expect("connect");
        remote.load_weights(dir.path(), "v3").expect("load");
        let err = ask(&remote, 1).expect_err("stale").to_string();
        assert!(err.contains(&liar2.url) && err.contains("weights version `old`"), "{err}");
    }

    #[test]
    fn samples_past_the_vocabulary_or_the_length_asked_are_refused() {
        let group = |tokens: Vec<u32>| RemoteGroup {
            completions: vec![Completion { logprobs: vec![0.0; tokens.len()], tokens, finish: FinishReason::Stop }],
            weights_version: None,
            server: String::new(),
        };
        assert!(check_completions(group(vec![3, 9]), 10, 2).is_ok());
        assert!(check_completions(group(vec![3, 4, 9]), 10, 2).is_ok(), "the stop token put back");
        let err = check_completions(group(vec![3, 10]), 10, 8).expect_err("id 10 of 10");
        assert!(err.contains("token id 10"), "{err}");
        let err = check_completions(group(vec![1; 5]), 10, 3).expect_err("5 tokens of 3");
        assert!(err.contains("max_tokens was 3"), "{err}");
    }

    #[test]
    fn choices_without_token_ids_or_stop_tokens_are_read_like_vllm_sends_them() {
        let choice = json!({"index": 0, "logprobs": {"tokens": ["token_id:7", "token_id:9"], "token_logprobs": [-1.0, null]}, "finish_reason": "stop", "stop_reason": 2});
        let completion = parse_choice(&choice, &[2, 3]).expect("parses");
        assert_eq!(completion.tokens, vec![7, 9, 2]);
        assert_eq!(completion.logprobs[0], -1.0);
        assert!(completion.logprobs[1].is_nan() && completion.logprobs[2].is_nan());
        let length = json!({"index": 0, "token_ids": [4, 5], "finish_reason": "length"});
        assert_eq!(parse_choice(&length, &[2]).expect("parses").finish, FinishReason::Length);
        assert!(parse_choice(&json!({"index": 0, "token_ids": [4], "finish_reason": "abort"}), &[2]).is_err());
    }

    #[test]
    fn options_are_checked() {
        let mut bad = config(vec!["ftp://x".into(), "ftp://x".into()]);
        bad.flavor = Flavor::Vllm;
        bad.max_in_flight = 0;
        bad.model = String::new();
        let problems = bad.problems().join("\n");
        for needle in ["http://", "given twice", "model", "max_in_flight", "weights_dir"] {
            assert!(problems.contains(needle), "{needle}: {problems}");
        }
        assert!(config(vec!["http://a/v1".into()]).problems().is_empty());
        let longrl = config(vec!["http://a/v1".into()]);
        assert_eq!(longrl.request_problem(64, 65_536), None);
        let problem = longrl.request_problem(128, 65_536).expect("8M tokens per request");
        assert!(problem.contains("128 samples of up to 65536 tokens"), "{problem}");
        let vllm = RolloutConfig { flavor: Flavor::Vllm, ..longrl };
        assert_eq!(vllm.request_problem(128, 65_536), None, "vLLM takes it");
    }
}
