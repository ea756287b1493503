//! The LLM judge: asks an OpenAI-compatible `/v1/chat/completions` endpoint whether a
//! predicted answer is equivalent to the gold one for the question, and reads the *final*
//! `[[YES]]`/`[[NO]]` verdict strictly. Requests run in a bounded pool with a rate limit,
//! retries with backoff on 429, 5xx and timeouts, a timeout each, and a cache so no
//! (question, prediction, gold, judge model) is paid twice. A sample the judge cannot score
//! is unscorable, never a silent 0. A judge that stops answering (timeouts, refused
//! connections on every request in flight) is given a rest instead of a wait per sample, and
//! a stopped run stops asking.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::StageError;

/// The slowest request rate a judge may be limited to (a smaller positive rate is a typo,
/// and its gap between requests would not fit a `Duration`).
const MIN_REQUESTS_PER_S: f64 = 1e-3;

/// Options of the judge.
#[derive(Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// Base URL of the API, e.g. `http://127.0.0.1:8000/v1` (`/chat/completions` is appended).
    pub url: String,
    /// The model name sent in each request.
    pub model: String,
    /// Name of the environment variable holding the API key (sent as a Bearer token; the
    /// key itself is never written or logged).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// At most this many requests started per second (0 = no limit).
    #[serde(default)]
    pub max_requests_per_s: f64,
    /// Retries after a 429, a 5xx, a timeout or a connection error.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First retry delay in milliseconds; doubled at each retry.
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    /// Timeout of one request in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Tokens the judge may write.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
}

impl std::fmt::Debug for JudgeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JudgeConfig")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

fn default_concurrency() -> usize {
    8
}
fn default_retries() -> u32 {
    3
}
fn default_backoff() -> u64 {
    500
}
fn default_timeout() -> f64 {
    60.0
}
fn default_max_tokens() -> usize {
    512
}

/// Bounds of the judge's settings: beyond them a run would stall for hours on one answer.
const MAX_CONCURRENCY: usize = 1024;
const MAX_TIMEOUT_S: f64 = 3600.0;
const MAX_RETRIES: u32 = 100;
const MAX_BACKOFF_MS: u64 = 60_000;

impl JudgeConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            out.push(format!("judge url `{}` must start with http:// or https://", self.url));
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            out.push(format!("judge concurrency must be within 1..={MAX_CONCURRENCY}, got {}", self.concurrency));
        }
        if !self.timeout_s.is_finite() || self.timeout_s <= 0.0 || self.timeout_s > MAX_TIMEOUT_S {
            out.push(format!("judge timeout_s must be positive and at most {MAX_TIMEOUT_S}, got {}", self.timeout_s));
        }
        if self.retries > MAX_RETRIES {
            out.push(format!("judge retries must be at most {MAX_RETRIES}, got {}", self.retries));
        }
        if self.backoff_ms > MAX_BACKOFF_MS {
            out.push(format!("judge backoff_ms must be at most {MAX_BACKOFF_MS}, got {}", self.backoff_ms));
        }
        let rate = self.max_requests_per_s;
        if !rate.is_finite() || rate < 0.0 || (rate > 0.0 && rate < MIN_REQUESTS_PER_S) {
            out.push(format!(
                "judge max_requests_per_s must be 0 (no limit) or at least {MIN_REQUESTS_PER_S} (one request in 1,000 s), got {rate}"
            ));
        }
        if self.max_tokens == 0 || self.max_tokens > crate::options::limits::TOKENS {
            out.push(format!("judge max_tokens must be within 1..={}, got {}", crate::options::limits::TOKENS, self.max_tokens));
        }
        if let Some(var) = &self.api_key_env
            && std::env::var(var).is_err()
        {
            out.push(format!("environment variable `{var}` (the judge's API key) is not set"));
        }
        out
    }
}

/// What the judge said about one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum JudgeVerdict {
    Yes,
    No,
    /// No usable verdict after every retry; the reason says why.
    Unscorable {
        reason: String,
    },
}

impl JudgeVerdict {
    pub fn score(&self) -> Option<f32> {
        match self {
            Self::Yes => Some(1.0),
            Self::No => Some(0.0),
            Self::Unscorable { .. } => None,
        }
    }
}

/// One question for the judge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JudgeRequest {
    pub question: String,
    pub prediction: String,
    pub gold: String,
}

/// Most characters of a question sent to the judge; a longer one keeps its end (where the
/// question proper sits, after any document).
pub const MAX_QUESTION_CHARS: usize = 2000;

/// The question to show the judge: a prompt's text after its document (the last
/// `</text>`), or, without that marker, its last paragraph when the whole is too long;
/// never more than [`MAX_QUESTION_CHARS`] characters. The judge never sees a document.
pub fn judge_question(question: &str) -> String {
    let after_document = match question.rfind("</text>") {
        Some(at) => &question[at + "</text>".len()..],
        None if question.chars().count() > MAX_QUESTION_CHARS => last_paragraph(question),
        None => question,
    };
    let text = after_document.trim();
    let count = text.chars().count();
    if count <= MAX_QUESTION_CHARS {
        return text.to_string();
    }
    let tail: String = text.chars().skip(count - MAX_QUESTION_CHARS).collect();
    format!("...{}", tail.trim_start())
}

/// The last paragraph (after the last blank line) that has text.
fn last_paragraph(text: &str) -> &str {
    text.trim_end().rsplit("\n\n").find(|p| !p.trim().is_empty()).unwrap_or(text)
}

/// The judge's prompt (our own wording): the question, not the document.
pub fn judge_prompt(request: &JudgeRequest) -> String {
    format!(
        "You check answers to questions. Decide whether the predicted answer means the same as \
         the reference answer for this question. Ignore differences in wording, formatting, \
         units written out or abbreviated, and extra words that do not change the answer.\n\n\
         Question: {}\nReference answer: {}\nPredicted answer: {}\n\n\
         Explain briefly, then end with your verdict on its own line: [[YES]] if they are \
         equivalent, [[NO]] if not.",
        request.question, request.gold, request.prediction
    )
}

/// The final verdict of a reply: the last `[[...]]` marker, which must be `[[YES]]` or
/// `[[NO]]` and be followed by nothing but whitespace and punctuation.
pub fn parse_verdict(reply: &str) -> Option<bool> {
    let start = reply.rfind("[[")?;
    let end = start + reply[start..].find("]]")?;
    let word = reply[start + 2..end].trim().to_ascii_uppercase();
    let rest = &reply[end + 2..];
    if rest.chars().any(|c| c.is_alphanumeric()) {
        return None;
    }
    match word.as_str() {
        "YES" => Some(true),
        "NO" => Some(false),
        _ => None,
    }
}

/// Counters of a judge's work, readable at any time.
#[derive(Debug, Default)]
pub struct JudgeStats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub cache_hits: AtomicU64,
    pub unscorable: AtomicU64,
}

impl JudgeStats {
    pub fn snapshot(&self) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        for (name, counter) in [
            ("judge_requests", &self.requests),
            ("judge_retries", &self.retries),
            ("judge_cache_hits", &self.cache_hits),
            ("judge_unscorable", &self.unscorable),
        ] {
            map.insert(name.into(), counter.load(Ordering::Relaxed).into());
        }
        map
    }
}

/// A judge client shared by every stage that scores.
pub struct Judge {
    config: JudgeConfig,
    agent: ureq::Agent,
    api_key: Option<String>,
    cache: Mutex<HashMap<JudgeRequest, bool>>,
    /// Where verdicts are appended, so a resumed run does not pay for them again.
    cache_file: Option<Mutex<std::fs::File>>,
    next_start: Mutex<Instant>,
    /// Attempts in a row that got no reply at all (timeouts, connection errors).
    unreachable_in_a_row: AtomicU64,
    /// Until when the judge is not asked, after too many attempts in a row got no reply.
    resting_until: Mutex<Option<Instant>>,
    /// The run's stop flag, once the stage that publishes the judge runs.
    cancel: std::sync::OnceLock<crate::stage::CancelToken>,
    pub stats: JudgeStats,
}

/// How long a judge that stopped answering is left alone before it is tried again.
const REST: Duration = Duration::from_secs(30);

/// The longest wait between two attempts (the backoff doubles up to it).
const MAX_BACKOFF: Duration = Duration::from_secs(120);

/// One cached verdict as a line of the cache file.
#[derive(serde::Serialize, serde::Deserialize)]
struct CacheLine {
    model: String,
    question: String,
    prediction: String,
    gold: String,
    yes: bool,
}

impl std::fmt::Debug for Judge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Judge").field("config", &self.config).finish_non_exhaustive()
    }
}

/// How one attempt failed.
enum Attempt {
    /// Worth retrying: 429, 5xx, a reply that is not the API's JSON.
    Retry(String),
    /// No reply at all: a timeout or connection trouble (retried; counts toward a rest).
    Unreachable(String),
    /// Will not improve: a 4xx, a reply without a verdict.
    Final(String),
}

impl Judge {
    pub fn new(config: JudgeConfig) -> Result<Self, StageError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(StageError::Invalid(problems.join("; ")));
        }
        let api_key = config.api_key_env.as_ref().and_then(|var| std::env::var(var).ok());
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs_f64(config.timeout_s)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            config,
            agent,
            api_key,
            cache: Mutex::new(HashMap::new()),
            cache_file: None,
            next_start: Mutex::new(Instant::now()),
            unreachable_in_a_row: AtomicU64::new(0),
            resting_until: Mutex::new(None),
            cancel: std::sync::OnceLock::new(),
            stats: JudgeStats::default(),
        })
    }

    /// Keeps the cache in `path` (JSON Lines, appended as verdicts arrive): the verdicts of
    /// this judge model already there are loaded, so a resumed run asks nothing twice. A
    /// line cut short by a crash is skipped.
    pub fn with_cache_file(mut self, path: &std::path::Path) -> Result<Self, StageError> {
        if let Ok(text) = std::fs::read_to_string(path) {
            let mut cache = self.cache.lock().map_err(|_| StageError::Failed("judge cache lock poisoned".into()))?;
            for (index, line) in text.lines().enumerate() {
                match serde_json::from_str::<CacheLine>(line) {
                    Ok(entry) if entry.model == self.config.model => {
                        cache.insert(JudgeRequest { question: entry.question, prediction: entry.prediction, gold: entry.gold }, entry.yes);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("{}:{}: skipping an unreadable judge cache line ({e})", path.display(), index + 1),
                }
            }
        }
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| StageError::io(path, e))?;
        // Start on a fresh line after a line cut short.
        if std::fs::read(path).map(|bytes| bytes.last().is_some_and(|&b| b != b'\n')).unwrap_or(false) {
            std::io::Write::write_all(&mut file, b"\n").map_err(|e| StageError::io(path, e))?;
        }
        self.cache_file = Some(Mutex::new(file));
        Ok(self)
    }

    /// Stops asking once `cancel` is set (the run was stopped): remaining answers are
    /// unscorable at once, and retries are not waited for.
    pub fn watch(&self, cancel: &crate::stage::CancelToken) {
        let _ = self.cancel.set(cancel.clone());
    }

    /// Verdicts in the cache.
    pub fn cached(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    pub fn config(&self) -> &JudgeConfig {
        &self.config
    }

    /// Judges many answers with up to `concurrency` requests in flight. The order of the
    /// verdicts is the order of the requests.
    pub fn judge_all(&self, requests: &[JudgeRequest]) -> Vec<JudgeVerdict> {
        let results: Vec<Mutex<Option<JudgeVerdict>>> = requests.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicU64::new(0);
        let workers = self.config.concurrency.min(requests.len()).max(1);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(request) = requests.get(i) else { break };
                        let verdict = self.judge(request);
                        if let Ok(mut slot) = results[i].lock() {
                            *slot = Some(verdict);
                        }
                    }
                });
            }
        });
        results
            .into_iter()
            .map(|slot| slot.into_inner().ok().flatten().unwrap_or(JudgeVerdict::Unscorable { reason: "the worker thread failed".into() }))
            .collect()
    }

    fn append_to_cache_file(&self, request: &JudgeRequest, yes: bool) {
        let Some(file) = &self.cache_file else { return };
        let line = CacheLine {
            model: self.config.model.clone(),
            question: request.question.clone(),
            prediction: request.prediction.clone(),
            gold: request.gold.clone(),
            yes,
        };
        if let (Ok(mut file), Ok(mut text)) = (file.lock(), serde_json::to_string(&line)) {
            text.push('\n');
            use std::io::Write;
            if let Err(e) = file.write_all(text.as_bytes()) {
                tracing::warn!("cannot append to the judge cache file: {e}");
            }
        }
    }

    /// Judges one answer (cached, retried).
    pub fn judge(&self, request: &JudgeRequest) -> JudgeVerdict {
        if let Some(&yes) = self.cache.lock().ok().and_then(|c| c.get(request).copied()).as_ref() {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return if yes { JudgeVerdict::Yes } else { JudgeVerdict::No };
        }
        let mut delay = Duration::from_millis(self.config.backoff_ms);
        let mut last = String::new();
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                self.pause(delay);
                delay = delay.saturating_mul(2).min(MAX_BACKOFF);
            }
            if let Some(reason) = self.refusal() {
                last = reason;
                break;
            }
            self.wait_for_rate_limit();
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let outcome = self.ask(request);
            self.note_reachability(&outcome);
            match outcome {
                Ok(yes) => {
                    if let Ok(mut cache) = self.cache.lock() {
                        cache.insert(request.clone(), yes);
                    }
                    self.append_to_cache_file(request, yes);
                    return if yes { JudgeVerdict::Yes } else { JudgeVerdict::No };
                }
                Err(Attempt::Retry(reason) | Attempt::Unreachable(reason)) => {
                    tracing::debug!(attempt, reason = %reason, "judge request failed; retrying");
                    last = reason;
                }
                Err(Attempt::Final(reason)) => {
                    last = reason;
                    break;
                }
            }
        }
        self.stats.unscorable.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(reason = %last, "the judge could not score an answer; it is marked unscorable");
        JudgeVerdict::Unscorable { reason: last }
    }

    /// Why no attempt should be made now: the run was stopped, or the judge is resting.
    fn refusal(&self) -> Option<String> {
        if self.cancel.get().is_some_and(crate::stage::CancelToken::is_cancelled) {
            return Some("the run was stopped".into());
        }
        let resting = self.resting_until.lock().ok().and_then(|until| *until).is_some_and(|until| Instant::now() < until);
        resting.then(|| {
            format!(
                "the judge at {} is not answering ({} attempts in a row got no reply); not asked for {} s",
                self.config.url,
                self.unreachable_in_a_row.load(Ordering::Relaxed),
                REST.as_secs()
            )
        })
    }

    /// Counts attempts without a reply; enough in a row (one per request in flight, at
    /// least four) give the judge a rest, any reply ends the count.
    fn note_reachability(&self, outcome: &Result<bool, Attempt>) {
        if !matches!(outcome, Err(Attempt::Unreachable(_))) {
            self.unreachable_in_a_row.store(0, Ordering::Relaxed);
            return;
        }
        let count = self.unreachable_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if count >= self.config.concurrency.max(4) as u64
            && let Ok(mut until) = self.resting_until.lock()
        {
            if until.is_none_or(|t| t <= Instant::now()) {
                tracing::warn!(url = %self.config.url, attempts = count, "the judge is not answering; giving it a rest");
            }
            *until = Some(Instant::now() + REST);
        }
    }

    /// Sleeps `delay`, waking early when the run is stopped.
    fn pause(&self, delay: Duration) {
        let end = Instant::now() + delay;
        while Instant::now() < end && self.refusal().is_none() {
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
        }
    }

    fn wait_for_rate_limit(&self) {
        if self.config.max_requests_per_s <= 0.0 {
            return;
        }
        let gap = Duration::from_secs_f64(1.0 / self.config.max_requests_per_s);
        let wait = match self.next_start.lock() {
            Ok(mut next) => {
                let now = Instant::now();
                let start = (*next).max(now);
                *next = start + gap;
                start - now
            }
            Err(_) => Duration::ZERO,
        };
        std::thread::sleep(wait);
    }

    fn ask(&self, request: &JudgeRequest) -> Result<bool, Attempt> {
        let url = format!("{}/chat/completions", self.config.url.trim_end_matches('/'));
        let body = json!({
            "model": self.config.model,
            "messages": [{ "role": "user", "content": judge_prompt(request) }],
            "temperature": 0.0,
            "max_tokens": self.config.max_tokens,
        });
        let mut call = self.agent.post(&url).header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            call = call.header("Authorization", &format!("Bearer {key}"));
        }
        let mut response = match call.send(body.to_string()) {
            Ok(response) => response,
            Err(ureq::Error::Timeout(_)) => {
                return Err(Attempt::Unreachable(format!("no reply within {} s (--judge-timeout / timeout_s)", self.config.timeout_s)));
            }
            Err(err) => return Err(Attempt::Unreachable(format!("request failed: {err}"))),
        };
        let status = response.status().as_u16();
        let text = match response.body_mut().with_config().limit(MAX_REPLY_BYTES).lossy_utf8(true).read_to_string() {
            Ok(text) => text,
            Err(ureq::Error::Timeout(_)) => return Err(Attempt::Unreachable("the reply timed out".into())),
            Err(err) => return Err(Attempt::Retry(format!("cannot read the reply: {err}"))),
        };
        if status == 429 || status >= 500 {
            return Err(Attempt::Retry(format!("HTTP {status}")));
        }
        if status >= 400 {
            return Err(Attempt::Final(format!("HTTP {status}: {}", text.chars().take(200).collect::<String>())));
        }
        let json: Value = serde_json::from_str(&text).map_err(|_| Attempt::Retry("the reply is not JSON".into()))?;
        let content = json
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or_else(|| Attempt::Retry("the reply has no choices[0].message.content".into()))?;
        parse_verdict(content).ok_or_else(|| Attempt::Final("the reply ends without a [[YES]] or [[NO]] verdict".into()))
    }
}

/// The longest reply read from the judge (a verdict fits in far less).
const MAX_REPLY_BYTES: u64 = 1 << 20;

/// A shared judge.
pub type SharedJudge = Arc<Judge>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_final_verdict_counts() {
        let cases: &[(&str, Option<bool>)] = &[
            ("They match.\n[[YES]]", Some(true)),
            ("[[NO]]", Some(false)),
            ("I first thought [[NO]] but they are the same. [[YES]].", Some(true)),
            ("[[YES]] is what I would say if they matched; they do not.", None),
            ("The answer YES is right", None),
            ("[[MAYBE]]", None),
            ("[[ yes ]]", Some(true)),
            ("", None),
        ];
        for (reply, expected) in cases {
            assert_eq!(parse_verdict(reply), *expected, "{reply:?}");
        }
    }

    #[test]
    fn the_prompt_has_the_question_not_the_document() {
        let prompt = judge_prompt(&JudgeRequest { question: "Q?".into(), prediction: "p".into(), gold: "g".into() });
        assert!(prompt.contains("Question: Q?") && prompt.contains("Reference answer: g") && prompt.ends_with("[[NO]] if not."));
    }

    #[test]
    fn a_long_document_never_reaches_the_judge() {
        let document = "Filler sentence about the harbor. ".repeat(5000);
        let turn = format!("<text>\n{document}\n</text>\n\nWho owns the red box?\n\nReason step by step.");
        assert_eq!(judge_question(&turn), "Who owns the red box?\n\nReason step by step.");
        // Without the markers: the last paragraph, cut to the limit.
        let bare = format!("{document}\n\nWho owns the red box?");
        assert_eq!(judge_question(&bare), "Who owns the red box?");
        let endless = "word ".repeat(3000);
        let cut = judge_question(&endless);
        assert!(cut.starts_with("...") && cut.chars().count() <= MAX_QUESTION_CHARS + 3, "{}", cut.len());
        assert_eq!(judge_question("  Who?  "), "Who?");
    }
}
