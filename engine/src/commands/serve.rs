//! `longrl serve`: a longrl model behind the OpenAI-compatible API, as a judge or as a
//! rollout server for RL on other machines.
//!
//! Routes:
//! - `POST /v1/completions`: token-id or text prompts (one or a list), `n` samples per prompt
//!   (the prompt prefilled once), per-token log-probs with the sampled ids
//!   (`return_token_ids`, `return_tokens_as_token_ids`), `prompt_logprobs`, stop strings and
//!   stop token ids, `stream`;
//! - `POST /v1/chat/completions`: the model's chat template, `n`, `logprobs` /
//!   `top_logprobs`, `stream` (server-sent events);
//! - `POST /update_weights_from_disk` (SGLang's route): loads a model directory and swaps it
//!   in between two requests, reporting the weights version each response then carries
//!   (`metadata.weight_version`); `GET /get_weight_version`;
//! - `POST /collective_rpc` with `{"method": "reload_weights"}` and `POST
//!   /reset_prefix_cache` (vLLM's development-mode routes): reload the directory the server
//!   started with;
//! - `GET /health`, `GET /v1/models`.
//!
//! Requests arrive through hyper ([`http`]: deadlines for headers and bodies, capped
//! connections and bodies) and are answered, read whole, by a pool of threads; one worker
//! owns the model and runs the queued groups (see [`worker`]). A streamed response sends
//! each choice's tokens as the worker draws them (server-sent events; a request asking for
//! each token's alternatives gets its events once they are scored, at the end). A sample
//! whose text reaches a stop string, and a request whose client goes away, leave the
//! decoding batch at the next step. The server binds to loopback unless `--host` says
//! otherwise, and has no authentication.
//!
//! Log-probs of sampled tokens are those of the distribution the sampler drew from
//! (`softmax(logits / temperature)`, before top-k / top-p truncation: what a GRPO trainer
//! needs as the old policy's); `prompt_logprobs` are raw (temperature 1), as vLLM's are.

mod http;
mod protocol;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use longrl_backends::{BackendTask, CustomGrad, TrainBackend};
use longrl_stdlib::model::batch_decode::{BatchOptions, SampleOn};
use longrl_stdlib::model::chat::ModelTokenizer;
use longrl_stdlib::model::{ModelConfig, load_model};
use serde_json::{Value, json};

use http::{Answer, Call, Limits, Listener, StopHandle};
use protocol::{ApiError, ChatRequest, CompletionRequest, EventStream, Planned, ReloadRequest, RpcRequest, Served, parse_body};
use worker::{BatchStats, Generated, Generation, Sequencer, Swap, Update, Work};

/// What to serve, where.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: PathBuf,
    pub host: String,
    /// 0 picks a free port (printed on the first line of stdout).
    pub port: u16,
    /// Most tokens a request may ask for (`max_tokens`); a request above it is refused.
    pub max_tokens_cap: usize,
    /// Stop after this many requests (tests); `None` serves until killed.
    pub max_requests: Option<usize>,
    /// Names a request's `model` may carry; empty: any (the first is the name in responses,
    /// else the model directory's name).
    pub served_model_names: Vec<String>,
    /// Threads answering requests at once.
    pub threads: usize,
    /// Time a client has to send a request's headers, then its body; a kept-alive
    /// connection idle that long is closed.
    pub request_timeout: Duration,
    /// Connections open at once (more wait in the listen queue).
    pub max_connections: usize,
    /// Where decoding draws its tokens.
    pub sample_on: SampleOn,
}

/// The largest request body taken (a longer one is a 413).
const MAX_BODY_BYTES: usize = 64 << 20;

/// The version of the weights the server starts with (SGLang's default name).
pub const INITIAL_VERSION: &str = "default";

/// What the request threads share.
struct Shared<'a> {
    options: &'a ServeOptions,
    name: String,
    tokenizer: ModelTokenizer,
    config: ModelConfig,
    eos_ids: Vec<u32>,
    /// The weights version being served and where it was loaded from.
    current: Mutex<(String, PathBuf)>,
    /// Weight loads in progress are taken one at a time.
    reloading: Mutex<()>,
    reloads: AtomicUsize,
    served: AtomicUsize,
    /// Stops the listener once `max_requests` were served.
    stop: StopHandle,
    sequencer: Sequencer,
    /// How the generation worker has batched requests.
    batching: BatchStats,
}

impl Shared<'_> {
    fn served(&self) -> Served<'_> {
        Served {
            names: &self.options.served_model_names,
            name: &self.name,
            tokenizer: &self.tokenizer,
            eos_ids: &self.eos_ids,
            vocab: self.config.vocab_size,
            max_model_len: self.config.max_position_embeddings.max(1),
            max_tokens_cap: self.options.max_tokens_cap,
        }
    }

    fn version(&self) -> (String, PathBuf) {
        self.current.lock().map(|c| c.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }
}

impl BackendTask for ServeOptions {
    type Output = anyhow::Result<()>;

    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        let (config, model) = load_model::<B::InnerBackend>(&self.model, &device)?;
        let tokenizer = ModelTokenizer::load(&self.model)?;
        let name = match self.served_model_names.first() {
            Some(name) => name.clone(),
            None => self.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "longrl".into()),
        };
        let listener = Listener::bind(&self.host, self.port)?;
        let port = listener.port();
        crate::outln!("listening on http://{}:{port}/v1 (model {name})", self.host)?;
        if !is_loopback(&self.host) {
            tracing::warn!(host = %self.host, "the server listens beyond this machine and has no authentication");
        }
        let (stop, stop_watch) = Listener::stop_handle();
        let mut eos_ids = tokenizer.stop_ids.clone();
        eos_ids.extend(config.eos_ids());
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let shared = Shared {
            options: &self,
            name,
            tokenizer,
            config,
            eos_ids,
            current: Mutex::new((INITIAL_VERSION.to_string(), self.model.clone())),
            reloading: Mutex::new(()),
            reloads: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            stop,
            sequencer: Sequencer::default(),
            batching: BatchStats::default(),
        };
        let (work_tx, work_rx) = crossbeam_channel::unbounded::<Work<B::InnerBackend>>();
        let (calls_tx, calls_rx) = crossbeam_channel::unbounded::<Call>();
        let limits =
            Limits { request_timeout: self.request_timeout, max_body_bytes: MAX_BODY_BYTES, max_connections: self.max_connections };
        std::thread::scope(|scope| {
            let shared = &shared;
            scope.spawn(move || listener.serve(calls_tx, limits, stop_watch));
            for _ in 0..self.threads.max(1) {
                let (work, calls) = (work_tx.clone(), calls_rx.clone());
                let device = device.clone();
                // Ends once the listener has stopped and every request it took is answered.
                scope.spawn(move || {
                    for call in calls.iter() {
                        // Its client has gone (or the server stopped without it): no work.
                        if call.reply.is_closed() {
                            continue;
                        }
                        respond::<B::InnerBackend>(call, shared, &work, &device);
                        let served = shared.served.fetch_add(1, Ordering::SeqCst) + 1;
                        if shared.options.max_requests.is_some_and(|max| served >= max) {
                            shared.stop.stop();
                        }
                    }
                });
            }
            drop(work_tx);
            let on_swap = |version: &str, path: &Path| {
                if let Ok(mut current) = shared.current.lock() {
                    *current = (version.to_string(), path.to_path_buf());
                }
            };
            let options = BatchOptions { sample_on: shared.options.sample_on, ..BatchOptions::default() };
            worker::run(model, INITIAL_VERSION.to_string(), work_rx, options, &shared.sequencer, &shared.batching, on_swap);
        });
        Ok(())
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// What a route leads to: a JSON reply, or a generation to run.
enum Routed {
    Json(u16, Value),
    Generate(Box<Planned>),
}

/// Answers one request.
fn respond<B: CustomGrad>(call: Call, shared: &Shared, work: &Sender<Work<B>>, device: &B::Device) {
    let Call { method, url, body, reply } = call;
    let answer = match route::<B>(&method, &url, &body, shared, work, device) {
        Ok(Routed::Json(status, value)) => Answer::json(status, &value),
        Ok(Routed::Generate(planned)) => return generate(&planned, shared, work, reply),
        Err(err) => Answer::error(&err),
    };
    let _ = reply.send(answer);
}

/// Where `method url` with `body` leads.
fn route<B: CustomGrad>(
    method: &str,
    url: &str,
    body: &str,
    shared: &Shared,
    work: &Sender<Work<B>>,
    device: &B::Device,
) -> Result<Routed, ApiError> {
    let ok = |value: Value| Ok(Routed::Json(200, value));
    match (method, url) {
        ("GET", "/health") => {
            let (version, path) = shared.version();
            ok(json!({
                "status": "ok",
                "model": shared.name,
                "model_path": path.display().to_string(),
                "weight_version": version,
                "requests": shared.served.load(Ordering::SeqCst),
                "batching": shared.batching.to_json(),
            }))
        }
        ("GET", "/v1/models") => {
            let model = json!({ "id": shared.name, "object": "model", "owned_by": "longrl", "max_model_len": shared.config.max_position_embeddings });
            ok(json!({ "object": "list", "data": [model] }))
        }
        ("GET", "/get_weight_version") => ok(json!({ "weight_version": shared.version().0 })),
        ("POST", "/v1/completions") => Ok(Routed::Generate(Box::new(parse_body::<CompletionRequest>(body)?.plan(&shared.served())?))),
        ("POST", "/v1/chat/completions") => Ok(Routed::Generate(Box::new(parse_body::<ChatRequest>(body)?.plan(&shared.served())?))),
        ("POST", "/update_weights_from_disk" | "/collective_rpc") => {
            weight_route(url, body, shared, work, device).map(|(status, value)| Routed::Json(status, value))
        }
        // There is no prefix cache: nothing to reset.
        ("POST", "/reset_prefix_cache") => ok(json!({})),
        _ => Err(ApiError::status(404, format!("no route for {method} {url}"))),
    }
}

/// The weight routes: SGLang's `/update_weights_from_disk` (any model directory, a named
/// version) and vLLM's `/collective_rpc` `reload_weights` (the directory served).
fn weight_route<B: CustomGrad>(
    url: &str,
    body: &str,
    shared: &Shared,
    work: &Sender<Work<B>>,
    device: &B::Device,
) -> Result<(u16, Value), ApiError> {
    if url == "/collective_rpc" {
        let request = parse_body::<RpcRequest>(body)?;
        if request.method != "reload_weights" {
            return Err(ApiError::bad("method", format!("only `reload_weights` is served, not `{}`", request.method)));
        }
        if !request.args.is_empty() || !request.kwargs.is_empty() {
            return Err(ApiError::bad("args", "reload_weights takes no arguments: it reloads the directory the server started with"));
        }
        reload(&shared.options.model, None, false, shared, work, device)?;
        return Ok((200, json!({ "results": [null] })));
    }
    let request = parse_body::<ReloadRequest>(body)?;
    request.check()?;
    let version = request.weight_version.clone();
    match reload(Path::new(&request.model_path), version, request.abort_all_requests == Some(true), shared, work, device) {
        Ok(version) => Ok((
            200,
            json!({
                "success": true,
                "message": format!("loaded {}", request.model_path),
                "num_paused_requests": 0,
                "weight_version": version,
            }),
        )),
        Err(err) => Ok((err.status, json!({ "success": false, "message": err.message, "num_paused_requests": 0 }))),
    }
}

/// How often a request thread waiting for the worker looks whether its client is still there.
const CLIENT_CHECK: Duration = Duration::from_millis(100);

/// Queues a request's jobs and answers with what they produce: whole, or as events while
/// they decode. The worker's first word decides the status, so a request that fails before
/// its first token gets its own error status, streamed or not. While the jobs decode, a
/// sample whose text reaches a stop string is ended.
fn generate<B: CustomGrad>(planned: &Planned, shared: &Shared, work: &Sender<Work<B>>, reply: tokio::sync::oneshot::Sender<Answer>) {
    let cancelled = Arc::new(AtomicBool::new(false));
    let (updates, from_worker) = crossbeam_channel::unbounded();
    let (end_sample, end_samples) = crossbeam_channel::unbounded();
    let generation = Generation {
        seq: shared.sequencer.next(),
        jobs: planned.jobs.clone(),
        updates,
        report_tokens: EventStream::follows_tokens(planned),
        cancelled: Arc::clone(&cancelled),
        end_samples,
    };
    if work.send(Work::Generate(generation)).is_err() {
        let _ = reply.send(Answer::error(&shutting_down()));
        return;
    }
    let first = next_update(&from_worker, || reply.is_closed(), &cancelled).and_then(|update| match update {
        Update::Done(Err(message)) => Err(worker_error(&message)),
        update => Ok(update),
    });
    let first = match first {
        Ok(update) => update,
        Err(err) => {
            let _ = reply.send(Answer::error(&err));
            return;
        }
    };
    let served = shared.served();
    let mut events = EventStream::new(planned, &served);
    let worker = WorkerLink { from_worker: &from_worker, end_sample: &end_sample, cancelled: &cancelled };
    if !planned.stream {
        let answer = match worker.until_done(&mut events, first, || reply.is_closed(), |_| true) {
            Ok(generated) => Answer::json(200, &planned.render(&generated, &served)),
            Err(err) => Answer::error(&err),
        };
        let _ = reply.send(answer);
        return;
    }
    let (sink, receiver) = tokio::sync::mpsc::unbounded_channel();
    if reply.send(Answer::events(receiver)).is_err() {
        cancelled.store(true, Ordering::SeqCst);
        return;
    }
    let send = |text: String| text.is_empty() || sink.send(hyper::body::Bytes::from(text)).is_ok();
    if !send(events.opening()) {
        cancelled.store(true, Ordering::SeqCst);
        return;
    }
    match worker.until_done(&mut events, first, || sink.is_closed(), send) {
        Ok(generated) => send(events.finish(&generated)),
        Err(err) => send(EventStream::failure(&err)),
    };
}

/// A request's line to the worker while its jobs decode.
struct WorkerLink<'a> {
    from_worker: &'a Receiver<Update>,
    /// Where samples that reached a stop string are named.
    end_sample: &'a Sender<(usize, usize)>,
    cancelled: &'a AtomicBool,
}

impl WorkerLink<'_> {
    /// Feeds the worker's updates, from `first` on, to `events` until the jobs are done;
    /// `send` takes each piece of event text and says whether the client is still there.
    fn until_done(
        &self,
        events: &mut EventStream,
        first: Update,
        gone: impl Fn() -> bool,
        send: impl Fn(String) -> bool,
    ) -> Result<Generated, ApiError> {
        let mut update = first;
        loop {
            match update {
                Update::Tokens(new) => {
                    let text = events.tokens(&new);
                    for ended in events.take_ended() {
                        let _ = self.end_sample.send(ended);
                    }
                    if !send(text) {
                        self.cancelled.store(true, Ordering::SeqCst);
                        return Err(worker_error(worker::CANCELLED));
                    }
                }
                Update::Done(Ok(generated)) => return Ok(generated),
                Update::Done(Err(message)) => return Err(worker_error(&message)),
            }
            update = next_update(self.from_worker, &gone, self.cancelled)?;
        }
    }
}

/// The worker's next update for a request; if the request's client is gone or goes away
/// meanwhile (`gone`, looked at before every wait), the worker is told to drop the request
/// and the wait ends.
fn next_update(from_worker: &Receiver<Update>, gone: impl Fn() -> bool, cancelled: &AtomicBool) -> Result<Update, ApiError> {
    loop {
        if gone() {
            cancelled.store(true, Ordering::SeqCst);
            return Err(worker_error(worker::CANCELLED));
        }
        match from_worker.recv_timeout(CLIENT_CHECK) {
            Ok(update) => return Ok(update),
            Err(RecvTimeoutError::Disconnected) => return Err(shutting_down()),
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// The API error of a worker's message.
fn worker_error(message: &str) -> ApiError {
    match message {
        worker::ABORTED => ApiError::status(503, message),
        // Nobody hears it: the client is gone (nginx's "client closed request").
        worker::CANCELLED => ApiError::status(499, message),
        _ => ApiError::status(500, message),
    }
}

fn shutting_down() -> ApiError {
    ApiError::status(503, "the server is shutting down")
}

/// Loads `path` and swaps it in between two requests; returns the new version.
fn reload<B: CustomGrad>(
    path: &Path,
    version: Option<String>,
    abort: bool,
    shared: &Shared,
    work: &Sender<Work<B>>,
    device: &B::Device,
) -> Result<String, ApiError> {
    let _one_at_a_time = shared.reloading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (config, model) =
        load_model::<B>(path, device).map_err(|e| ApiError::bad("model_path", format!("cannot load the weights: {e}")))?;
    let served = &shared.config;
    let same = |a: &ModelConfig, b: &ModelConfig| {
        (a.vocab_size, a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.intermediate_size)
            == (b.vocab_size, b.hidden_size, b.num_hidden_layers, b.num_attention_heads, b.intermediate_size)
    };
    if !same(&config, served) {
        return Err(ApiError::bad(
            "model_path",
            format!("{}: another model's shapes (vocabulary, hidden size, layers or heads differ from the served model's)", path.display()),
        ));
    }
    let count = shared.reloads.fetch_add(1, Ordering::SeqCst) + 1;
    let version = version.unwrap_or_else(|| count.to_string());
    if abort {
        shared.sequencer.abort_queued();
    }
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
    work.send(Work::Swap { swap: Box::new(Swap { model, version: version.clone(), path: path.to_path_buf() }), reply: reply_tx })
        .map_err(|_| shutting_down())?;
    let old = reply_rx.recv().map_err(|_| shutting_down())?;
    tracing::info!(from = %old, to = %version, path = %path.display(), "weights swapped");
    Ok(version)
}
