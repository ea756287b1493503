//! The reward stage end to end: the judge against a fault-injecting server on loopback
//! (500s, a 429 then success, garbage bodies, replies without a verdict, replies past the
//! timeout) and against a real `longrl serve`; the hybrid reward; `longrl score`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use longrl_stdlib::record::{AnswerKind, Record};
use longrl_stdlib::reward::RuleConfig;
use longrl_stdlib::reward::judge::{Judge, JudgeConfig, JudgeRequest, JudgeVerdict};
use longrl_stdlib::reward::{JudgeWhen, Reward};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn judge_config(url: String) -> JudgeConfig {
    JudgeConfig {
        url,
        model: "test-judge".into(),
        api_key_env: None,
        concurrency: 4,
        max_requests_per_s: 0.0,
        retries: 2,
        backoff_ms: 20,
        timeout_s: 0.5,
        max_tokens: 64,
    }
}

fn reply(content: &str) -> String {
    serde_json::json!({ "choices": [{ "index": 0, "message": { "role": "assistant", "content": content } }] }).to_string()
}

/// A loopback server whose behavior depends on the predicted answer in the prompt:
/// `ok-yes`, `ok-no`, `fail-500`, `busy-once` (429, then a verdict), `garbage`, `silent`
/// (no verdict), `slow` (answers after the client's timeout). Counts requests per answer.
fn fault_server() -> (String, Arc<Mutex<HashMap<String, usize>>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("bind");
    let port = server.server_addr().to_ip().expect("ip").port();
    let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let seen = Arc::clone(&counts);
    std::thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let mut body = String::new();
            let _ = request.as_reader().read_to_string(&mut body);
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let prompt = json["messages"][0]["content"].as_str().unwrap_or("").to_string();
            let tag = prompt.split("Predicted answer: ").nth(1).and_then(|t| t.lines().next()).unwrap_or("").to_string();
            let n = {
                let mut counts = seen.lock().expect("counts");
                let n = counts.entry(tag.clone()).or_default();
                *n += 1;
                *n
            };
            let seen_thread = Arc::clone(&seen);
            std::thread::spawn(move || {
                let _ = &seen_thread;
                let (status, text) = match tag.as_str() {
                    "ok-yes" => (200, reply("Same city.\n[[YES]]")),
                    "ok-no" => (200, reply("Different.\n[[NO]]")),
                    "fail-500" => (500, "internal error".to_string()),
                    "busy-once" if n == 1 => (429, "slow down".to_string()),
                    "busy-once" => (200, reply("[[YES]]")),
                    "garbage" => (200, "<html>not json".to_string()),
                    "silent" => (200, reply("I cannot decide.")),
                    "slow" => {
                        std::thread::sleep(Duration::from_millis(1500));
                        (200, reply("[[YES]]"))
                    }
                    _ => (400, "unknown".to_string()),
                };
                let _ = request.respond(tiny_http::Response::from_string(text).with_status_code(status));
            });
        }
    });
    (format!("http://127.0.0.1:{port}/v1"), counts)
}

fn request(prediction: &str) -> JudgeRequest {
    JudgeRequest { question: "Where is the red box kept?".into(), prediction: prediction.into(), gold: "Oslo".into() }
}

#[test]
fn the_judge_retries_caches_and_marks_failures_unscorable() {
    let (url, counts) = fault_server();
    let judge = Judge::new(judge_config(url)).expect("judge");
    let tags = ["ok-yes", "ok-no", "fail-500", "busy-once", "garbage", "silent", "slow"];
    let requests: Vec<JudgeRequest> = tags.iter().map(|t| request(t)).collect();
    let verdicts = judge.judge_all(&requests);
    let by_tag: HashMap<&str, &JudgeVerdict> = tags.iter().copied().zip(&verdicts).collect();
    assert_eq!(by_tag["ok-yes"], &JudgeVerdict::Yes);
    assert_eq!(by_tag["ok-no"], &JudgeVerdict::No);
    assert_eq!(by_tag["busy-once"], &JudgeVerdict::Yes, "a 429 is retried");
    for tag in ["fail-500", "garbage", "silent", "slow"] {
        assert!(matches!(by_tag[tag], JudgeVerdict::Unscorable { .. }), "{tag}: {:?}", by_tag[tag]);
        assert_eq!(by_tag[tag].score(), None, "{tag} must not score 0");
    }
    let counts = counts.lock().expect("counts").clone();
    // Retryable failures are tried 1 + retries times; a reply without a verdict is final.
    assert_eq!(counts["fail-500"], 3);
    assert_eq!(counts["garbage"], 3);
    assert_eq!(counts["slow"], 3);
    assert_eq!(counts["busy-once"], 2);
    assert_eq!(counts["silent"], 1);
    assert_eq!(judge.stats.unscorable.load(Ordering::Relaxed), 4);
    assert!(judge.stats.retries.load(Ordering::Relaxed) >= 7);

    // Repeats are answered from the cache: no new request reaches the server.
    let before = judge.stats.requests.load(Ordering::Relaxed);
    assert_eq!(judge.judge(&request("ok-yes")), JudgeVerdict::Yes);
    assert_eq!(judge.stats.requests.load(Ordering::Relaxed), before);
    assert_eq!(judge.stats.cache_hits.load(Ordering::Relaxed), 1);
}

#[test]
fn the_judge_cache_file_survives_a_restart() {
    let (url, counts) = fault_server();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("judge_cache.jsonl");
    let first = Judge::new(judge_config(url.clone())).expect("judge").with_cache_file(&path).expect("cache file");
    assert_eq!(first.judge(&request("ok-yes")), JudgeVerdict::Yes);
    assert!(matches!(first.judge(&request("silent")), JudgeVerdict::Unscorable { .. }));
    drop(first);
    // A crash may leave half a line; it is skipped.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"model\": \"ju"))
        .expect("append");
    // A new judge (a resumed run) answers from the file: no request reaches the server.
    let again = Judge::new(judge_config(url)).expect("judge").with_cache_file(&path).expect("cache file");
    assert_eq!(again.cached(), 1, "only verdicts are cached, not failures");
    assert_eq!(again.judge(&request("ok-yes")), JudgeVerdict::Yes);
    assert_eq!(again.stats.requests.load(Ordering::Relaxed), 0);
    assert_eq!(counts.lock().expect("counts")["ok-yes"], 1);
}

/// A judge that accepts connections and reads requests but never replies.
fn silent_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _held = stream;
                std::thread::sleep(Duration::from_secs(60));
            });
        }
    });
    format!("http://127.0.0.1:{port}/v1")
}

#[test]
fn a_judge_that_never_replies_is_rested_not_waited_for_per_answer() {
    let config = JudgeConfig { concurrency: 2, retries: 1, timeout_s: 0.3, backoff_ms: 10, ..judge_config(silent_server()) };
    let judge = Judge::new(config).expect("judge");
    let requests: Vec<JudgeRequest> = (0..40).map(|i| request(&format!("answer {i}"))).collect();
    let started = std::time::Instant::now();
    let verdicts = judge.judge_all(&requests);
    let elapsed = started.elapsed();
    assert!(verdicts.iter().all(|v| matches!(v, JudgeVerdict::Unscorable { .. })), "{verdicts:?}");
    let rested =
        verdicts.iter().filter(|v| matches!(v, JudgeVerdict::Unscorable { reason } if reason.contains("is not answering"))).count();
    assert!(rested >= 30, "most answers were not sent to a judge that had stopped answering: {rested}");
    // Without the rest: 40 answers x 2 attempts x 0.3 s / 2 workers = 12 s.
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    assert!(judge.stats.requests.load(Ordering::Relaxed) <= 10, "{} requests", judge.stats.requests.load(Ordering::Relaxed));
}

fn record(gold: &str, kind: AnswerKind) -> Record {
    let mut r = Record::new("r", "Where is the red box kept?");
    r.answers = vec![gold.into()];
    r.kind = kind;
    r
}

#[test]
fn the_hybrid_reward_asks_the_judge_only_when_the_rule_misses() {
    let (url, counts) = fault_server();
    let judge = Arc::new(Judge::new(judge_config(url)).expect("judge"));
    let reward = Reward {
        rule: RuleConfig::default(),
        judge: Some(Arc::clone(&judge)),
        judge_when: JudgeWhen::Miss,
        ..Reward::rule_only(RuleConfig::default())
    };
    let oslo = record("Oslo", AnswerKind::Text);
    let choice = record("B", AnswerKind::Choice);
    let items: Vec<(&Record, &str)> = vec![
        (&oslo, "Therefore, the answer is Oslo."),    // rule hit: no judge
        (&oslo, "Therefore, the answer is ok-yes"),   // rule miss, judge yes -> 1
        (&oslo, "Therefore, the answer is ok-no"),    // rule miss, judge no -> 0
        (&oslo, "Therefore, the answer is fail-500"), // judge fails -> unscorable
        (&oslo, "I do not know."),                    // no answer: nothing to judge -> 0
        (&choice, "Therefore, the answer is (C)"),    // choice: never judged
    ];
    let outcomes = reward.score_all(&items).expect("scores");
    let scores: Vec<Option<f32>> = outcomes.iter().map(|o| o.score).collect();
    assert_eq!(scores, vec![Some(1.0), Some(1.0), Some(0.0), None, Some(0.0), Some(0.0)]);
    assert!(outcomes[0].judge.is_none() && outcomes[4].judge.is_none() && outcomes[5].judge.is_none());
    assert_eq!(counts.lock().expect("counts").get("Oslo"), None, "a rule hit is not sent to the judge");
}

#[test]
fn a_script_reward_replaces_or_adds() {
    let registry = longrl_stdlib::Registry::standard();
    let recipe = r#"
        let r1 = reward(#{ script: |response, record| if response.contains(record.answers[0]) { 2.0 } else { -1 } });
        let r2 = reward(#{ script: |response, record| 0.5, script_mode: "add" });
    "#;
    let plan = longrl_engine::load_plan(recipe, "r.rhai", &registry, &Default::default()).expect("recipe");
    let dir = tempfile::tempdir().expect("tempdir");
    let ctx = longrl_stdlib::StageContext { closures: Arc::clone(&plan.closures), ..longrl_stdlib::StageContext::for_check(dir.path()) };
    let valid = plan.validate(&registry, &ctx).expect("valid");
    let factory = registry.get("reward").expect("reward stage");
    let oslo = record("Oslo", AnswerKind::Text);
    let mut values = Vec::new();
    for node in &valid.nodes {
        let stage = factory.build(&node.options, &ctx).expect("builds");
        let (tx, rx) = crossbeam_channel::bounded(1);
        let spec = factory.outputs()[0];
        let mut io = longrl_stdlib::StageIo::new(
            "reward",
            vec![],
            vec![(spec, vec![tx])],
            Default::default(),
            Default::default(),
            longrl_stdlib::metrics::Metrics::discard(),
        );
        stage.run(&mut io).expect("runs");
        let Ok(longrl_stdlib::Item::Reward(reward)) = rx.recv() else { panic!("no reward published") };
        let outcomes = reward.score_all(&[(&oslo, "the answer is Oslo"), (&oslo, "the answer is Rome")]).expect("scores");
        values.push(outcomes.iter().map(|o| o.score).collect::<Vec<_>>());
    }
    assert_eq!(values[0], vec![Some(2.0), Some(-1.0)]);
    assert_eq!(values[1], vec![Some(1.5), Some(0.5)]);
}

/// A checkpoint of the tiny model with random weights (its verdicts are noise).
fn tiny_checkpoint(dir: &Path) {
    use longrl_stdlib::model::checkpoint::{RandomInit, SaveDtype, copy_tokenizer_files};
    use longrl_stdlib::model::{CausalLm, ModelConfig, save_model};
    let source = workspace().join("examples/models/tiny");
    let config = ModelConfig::load(&source.join("config.json")).expect("config");
    let model = CausalLm::<longrl_backends::Cpu>::build(&config, &mut RandomInit::new(9, 0.08), &Default::default()).expect("model");
    save_model(&model, &config, dir, SaveDtype::F32).expect("save");
    copy_tokenizer_files(&source, dir).expect("tokenizer");
}

/// Starts `longrl serve --port 0` and returns the process and its base URL.
fn serve(model: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_longrl"))
        .args(["serve", "--model", model.to_str().expect("utf-8"), "--port", "0", "--max-tokens-cap", "64"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("first line");
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).expect("url in the first line").to_string();
    (child, url)
}

#[test]
fn the_judge_talks_to_a_real_longrl_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_checkpoint(dir.path());
    let (mut child, url) = serve(dir.path());
    // The OpenAI-compatible shape, by hand.
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let body = serde_json::json!({ "model": "x", "messages": [{ "role": "user", "content": "Is Oslo Oslo?" }], "max_tokens": 8, "temperature": 0 });
    let mut response = agent.post(&format!("{url}/chat/completions")).send(body.to_string()).expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let json: serde_json::Value = serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("json");
    assert!(json["choices"][0]["message"]["content"].is_string(), "{json}");
    assert!(json["usage"]["completion_tokens"].as_u64().is_some_and(|n| (1..=8).contains(&n)), "{json}");
    let mut bad = agent.post(&format!("{url}/chat/completions")).send("{not json").expect("request");
    assert_eq!(bad.status().as_u16(), 400);
    assert!(bad.body_mut().read_to_string().expect("body").contains("invalid request"));

    // The judge's plumbing: the tiny random model rarely ends with a verdict, so most are
    // unscorable; each request got an answer and nothing was scored 0 silently.
    let mut config = judge_config(url);
    config.timeout_s = 30.0;
    let judge = Judge::new(config).expect("judge");
    let verdicts = judge.judge_all(&[request("Oslo"), request("Rome"), request("Lima")]);
    for verdict in &verdicts {
        match verdict {
            JudgeVerdict::Yes | JudgeVerdict::No => {}
            JudgeVerdict::Unscorable { reason } => assert!(reason.contains("verdict"), "{reason}"),
        }
    }
    assert_eq!(judge.stats.requests.load(Ordering::Relaxed), 3, "a reply without a verdict is not retried");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn score_adds_a_score_to_every_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("responses.jsonl");
    let lines = [
        r#"{"response": "Therefore, the answer is $1,234.5 million.", "gold": "1234.5", "kind": "number"}"#,
        r#"{"response": "the answer is 12%", "gold": ["0.12"], "kind": "number"}"#,
        r#"{"response": "<think>x</think> The answer is the Eiffel Tower!", "gold": "Eiffel Tower", "kind": "text"}"#,
        r#"{"response": "The answer is A. No: the answer is (C).", "gold": "C", "kind": "choice"}"#,
        r#"{"response": "I am not sure.", "gold": "Oslo", "kind": "text"}"#,
    ];
    std::fs::write(&file, lines.join("\n")).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_longrl")).args(["score", file.to_str().expect("utf-8")]).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let scored: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    let scores: Vec<f64> = scored.iter().map(|v| v["score"].as_f64().expect("score")).collect();
    assert_eq!(scores, vec![1.0, 1.0, 1.0, 1.0, 0.0]);
    assert_eq!(scored[0]["answer"], "$1,234.5 million");
    assert!(scored[4]["answer"].is_null());

    std::fs::write(&file, "{\"response\": \"x\"}\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_longrl")).args(["score", file.to_str().expect("utf-8")]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("responses.jsonl:1: missing field `gold`"));
}
