//! `longrl serve` as a rollout server, over real HTTP on 127.0.0.1: token-id and text
//! prompts to `/v1/completions` with `n` samples and per-token log-probs (equal to the
//! trainer's own), server-sent event streams, chat completions honouring `n` / `logprobs`
//! / `stream`, unsupported fields refused with a 400 naming them, `/health`, weight reloads
//! through `/update_weights_from_disk`, and the official `openai` Python client.

mod support;

use std::process::Command;

use serde_json::{Value, json};
use support::serving::{floats, get_json, ids, logprob_gap, post, post_json, serve, tiny_checkpoint};
use support::workspace;

/// The `data:` payloads of a server-sent event stream, which must end with `[DONE]`.
fn events(text: &str) -> Vec<Value> {
    let payloads: Vec<&str> =
        text.split("\n\n").filter(|e| !e.trim().is_empty()).map(|e| e.strip_prefix("data: ").expect("a data event")).collect();
    assert_eq!(payloads.last(), Some(&"[DONE]"), "{text}");
    payloads[..payloads.len() - 1].iter().map(|p| serde_json::from_str(p).expect("json chunk")).collect()
}

const PROMPT: [u32; 6] = [5, 17, 29, 41, 8, 3];

fn completion_request(seed: u64) -> Value {
    json!({ "model": "tiny", "prompt": PROMPT, "n": 3, "max_tokens": 8, "temperature": 0.9, "seed": seed,
            "logprobs": 0, "return_token_ids": true, "ignore_eos": true })
}

#[test]
fn completions_sample_n_token_id_prompts_with_the_trainers_logprobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_checkpoint(dir.path(), 9);
    let server = serve(dir.path(), &[]);
    assert!(server.first_line.contains("http://127.0.0.1:"), "loopback by default: {}", server.first_line);
    let health = get_json(&format!("{}/health", server.root()));
    assert_eq!((health["status"].as_str(), health["weight_version"].as_str()), (Some("ok"), Some("default")), "{health}");

    let reply = post_json(&format!("{}/completions", server.url), &completion_request(7));
    let choices = reply["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3, "n = 3 gives three choices: {reply}");
    for choice in choices {
        assert_eq!(ids(&choice["token_ids"]).len(), 8, "ignore_eos and max_tokens 8: {choice}");
        assert_eq!(ids(&choice["prompt_token_ids"]), PROMPT);
        assert!(floats(&choice["logprobs"]["token_logprobs"]).iter().all(|lp| lp.is_finite() && *lp <= 0.0));
        assert_eq!(choice["finish_reason"], "length");
    }
    assert_eq!(reply["metadata"]["weight_version"], "default");
    assert_eq!(reply["usage"]["completion_tokens"], 24);
    let gap = logprob_gap(dir.path(), &PROMPT, choices, 0.9);
    eprintln!("largest gap between the server's log-probs and the trainer's: {gap:e}");
    assert!(gap < 1e-4, "the server's log-probs are the trainer's: gap {gap}");
    // The same seed draws the same samples.
    let again = post_json(&format!("{}/completions", server.url), &completion_request(7));
    assert_eq!(again["choices"], reply["choices"]);

    // Text prompts, several at once: n choices per prompt, in order.
    let texts = json!({ "model": "tiny", "prompt": ["the cat", "a dog"], "n": 2, "max_tokens": 4, "seed": 1, "logprobs": 1 });
    let reply = post_json(&format!("{}/completions", server.url), &texts);
    let choices = reply["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 4, "{reply}");
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert!(choice["text"].is_string());
        let top = choice["logprobs"]["top_logprobs"].as_array().expect("top logprobs");
        assert!(top.iter().all(|t| (1..=2).contains(&t.as_object().expect("map").len())), "{choice}");
    }
}

#[test]
fn streams_are_server_sent_events_that_add_up_to_the_whole_reply() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_checkpoint(dir.path(), 9);
    let server = serve(dir.path(), &[]);
    let url = format!("{}/completions", server.url);
    let whole = post_json(&url, &completion_request(3));
    let mut streamed = completion_request(3);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    let (status, kind, text) = post(&url, &streamed);
    assert_eq!(status, 200, "{text}");
    assert!(kind.starts_with("text/event-stream"), "{kind}");
    let chunks = events(&text);
    for (index, choice) in whole["choices"].as_array().expect("choices").iter().enumerate() {
        let mine: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].as_array()?.first()).filter(|c| c["index"] == index).collect();
        let text: String = mine.iter().filter_map(|c| c["text"].as_str()).collect();
        let tokens: Vec<u32> = mine.iter().filter_map(|c| c.get("token_ids")).flat_map(ids).collect();
        let logprobs: Vec<f32> =
            mine.iter().filter(|c| !c["logprobs"].is_null()).flat_map(|c| floats(&c["logprobs"]["token_logprobs"])).collect();
        assert_eq!(text, choice["text"].as_str().expect("text"));
        assert_eq!(tokens, ids(&choice["token_ids"]));
        assert_eq!(logprobs, floats(&choice["logprobs"]["token_logprobs"]));
        assert_eq!(mine.last().expect("chunks")["finish_reason"], "length");
    }
    assert_eq!(chunks.last().expect("usage chunk")["usage"]["completion_tokens"], 24);

    // Chat: n choices, each streamed with its log-probs.
    let chat = json!({ "model": "tiny", "messages": [{ "role": "user", "content": "Where is Oslo?" }], "n": 2, "max_tokens": 5,
                       "seed": 4, "logprobs": true, "top_logprobs": 2, "stream": true });
    let (status, kind, text) = post(&format!("{}/chat/completions", server.url), &chat);
    assert_eq!(status, 200, "{text}");
    assert!(kind.starts_with("text/event-stream"), "{kind}");
    let chunks = events(&text);
    for index in 0..2 {
        let mine: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].as_array()?.first()).filter(|c| c["index"] == index).collect();
        assert_eq!(mine[0]["delta"]["role"], "assistant");
        let scored: usize = mine.iter().filter_map(|c| c["logprobs"]["content"].as_array()).map(Vec::len).sum();
        assert!((1..=5).contains(&scored), "one log-prob per generated token: {text}");
        assert!(mine.last().expect("chunks")["finish_reason"].is_string());
    }
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
}

/// The text a stream's chunks add to choice `index` (completions' `text`, chat's content).
fn streamed_text(chunks: &[Value], index: usize) -> String {
    let mine = chunks.iter().filter_map(|c| c["choices"].as_array()?.first()).filter(|c| c["index"] == index);
    mine.filter_map(|c| c["text"].as_str().or(c["delta"]["content"].as_str())).collect()
}

#[test]
fn streamed_text_stops_where_the_whole_reply_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_checkpoint(dir.path(), 9);
    let server = serve(dir.path(), &["--max-tokens-cap", "1000"]);
    let url = format!("{}/completions", server.url);
    let mut request =
        json!({ "model": "tiny", "prompt": PROMPT, "n": 2, "max_tokens": 24, "temperature": 0.9, "seed": 5, "ignore_eos": true });
    let free = post_json(&url, &request);
    // Stop strings taken from the middle of the first 24 tokens' text of the first choice (so
    // it stops there, long before its limit of 1,000 tokens: the server has the time to see it
    // and end the sample) and one that never comes; with and without the stop string kept.
    let text = free["choices"][0]["text"].as_str().expect("text").to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 8, "{text}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    request["max_tokens"] = json!(1000);
    for include in [false, true] {
        request["stop"] = json!([stop, "never in this text at all"]);
        request["include_stop_str_in_output"] = json!(include);
        request["stream"] = json!(false);
        let whole = post_json(&url, &request);
        request["stream"] = json!(true);
        let (status, _, body) = post(&url, &request);
        assert_eq!(status, 200, "{body}");
        let chunks = events(&body);
        for index in 0..2 {
            let choice = &whole["choices"][index];
            assert_eq!(streamed_text(&chunks, index), choice["text"].as_str().expect("text"), "choice {index}, include {include}");
            let last =
                chunks.iter().filter_map(|c| c["choices"].as_array()?.first()).filter(|c| c["index"] == index).last().expect("chunks");
            assert_eq!((&last["finish_reason"], &last["stop_reason"]), (&choice["finish_reason"], &choice["stop_reason"]));
        }
        assert_eq!(whole["choices"][0]["finish_reason"], "stop", "the first choice stops at {stop:?}: {whole}");
    }
    // The samples that reached the stop string ended there: none ran on to its token limit.
    let ended = get_json(&format!("{}/health", server.root()))["batching"]["samples_ended_at_stop_strings"].as_u64();
    assert!(ended.is_some_and(|n| n >= 4), "two requests per setting, each with its first choice stopping: {ended:?}");
}

#[test]
fn a_stream_sends_tokens_as_they_are_drawn_and_a_client_that_leaves_stops_its_generation() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_checkpoint(dir.path(), 9);
    let server = serve(dir.path(), &["--max-tokens-cap", "20000"]);
    // 20,000 tokens take far longer than this test waits for its first events: a server that
    // sent the reply only when complete would have nothing to send yet.
    let request = json!({ "model": "tiny", "prompt": PROMPT, "max_tokens": 20000, "ignore_eos": true, "stream": true,
                          "return_token_ids": true })
    .to_string();
    let mut client = std::net::TcpStream::connect(address(&server.url)).expect("connects");
    write!(
        client,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{request}",
        request.len()
    )
    .expect("write");
    client.set_read_timeout(Some(std::time::Duration::from_secs(60))).expect("timeout");
    let mut received = String::new();
    let mut buffer = [0u8; 4096];
    while received.matches("\"token_ids\":[").count() < 3 {
        let n = client.read(&mut buffer).expect("events arrive while the tokens are drawn");
        assert!(n > 0, "the server closed the stream: {received}");
        received.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    assert!(received.starts_with("HTTP/1.1 200") && received.contains("text/event-stream"), "{received}");
    assert!(!received.contains("[DONE]"), "{received}");
    // The client leaves: the server drops its generation from the batch.
    drop(client);
    let health = format!("{}/health", server.root());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while get_json(&health)["batching"]["cancelled_requests"] != 1 {
        assert!(std::time::Instant::now() < deadline, "the generation went on without its client: {}", get_json(&health));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // And serves the next request.
    let (status, _, text) = post(&format!("{}/completions", server.url), &completion_request(2));
    assert_eq!(status, 200, "{text}");
}

#[test]
fn chat_honours_n_and_logprobs_and_unsupported_fields_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_checkpoint(dir.path(), 9);
    let server = serve(dir.path(), &[]);
    let chat_url = format!("{}/chat/completions", server.url);
    let chat = json!({ "model": "tiny", "messages": [{ "role": "user", "content": "Hi" }], "n": 3, "max_tokens": 4,
                       "logprobs": true, "top_logprobs": 2, "seed": 5 });
    let reply = post_json(&chat_url, &chat);
    let choices = reply["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3, "n = 3 gives three choices: {reply}");
    for choice in choices {
        let content = choice["logprobs"]["content"].as_array().expect("logprobs.content");
        assert!(!content.is_empty() && content.len() <= 4, "{choice}");
        assert!(
            content
                .iter()
                .all(|t| t["logprob"].as_f64().is_some_and(|lp| lp <= 0.0) && t["top_logprobs"].as_array().is_some_and(|a| a.len() == 2))
        );
    }

    let completions_url = format!("{}/completions", server.url);
    let cases = [
        (&completions_url, json!({ "prompt": [1, 2], "frequency_penalty": 0.5 }), "frequency_penalty"),
        (&completions_url, json!({ "prompt": [1, 2], "logit_bias": { "5": 10 } }), "logit_bias"),
        (&completions_url, json!({ "prompt": [1, 2], "no_such_field": 1 }), "no_such_field"),
        (&completions_url, json!({ "prompt": [1, 2], "max_tokens": 100000 }), "max_tokens"),
        (&completions_url, json!({ "prompt": [1, 2], "n": "three" }), "n"),
        (&completions_url, json!({ "prompt": vec![vec![1, 2]; 1024], "n": 5 }), "n"),
        (&chat_url, json!({ "messages": [{ "role": "user", "content": "Hi" }], "tools": [{ "type": "function" }] }), "tools"),
        (&chat_url, json!({ "messages": [{ "role": "user", "content": "Hi" }], "presence_penalty": 1.0 }), "presence_penalty"),
    ];
    for (url, body, field) in cases {
        let (status, _, text) = post(url, &body);
        assert_eq!(status, 400, "{body} is refused: {text}");
        let error: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(error["error"]["param"], field, "{text}");
        assert!(error["error"]["message"].as_str().expect("message").contains(field), "{text}");
    }
    let (status, _, _) = post(&format!("{}/no/such/route", server.url), &json!({}));
    assert_eq!(status, 404);
}

#[test]
fn a_weight_reload_swaps_the_model_and_names_its_version() {
    let first = tempfile::tempdir().expect("tempdir");
    let second = tempfile::tempdir().expect("tempdir");
    tiny_checkpoint(first.path(), 9);
    tiny_checkpoint(second.path(), 10);
    let server = serve(first.path(), &[]);
    let root = server.root();
    let before = post_json(&format!("{}/completions", server.url), &completion_request(7));

    let reload = json!({ "model_path": second.path().display().to_string(), "weight_version": "step-1" });
    let reply = post_json(&format!("{root}/update_weights_from_disk"), &reload);
    assert_eq!((reply["success"].as_bool(), reply["weight_version"].as_str()), (Some(true), Some("step-1")), "{reply}");
    assert_eq!(get_json(&format!("{root}/get_weight_version"))["weight_version"], "step-1");
    assert_eq!(get_json(&format!("{root}/health"))["weight_version"], "step-1");

    let after = post_json(&format!("{}/completions", server.url), &completion_request(7));
    assert_eq!(after["metadata"]["weight_version"], "step-1");
    assert_ne!(after["choices"], before["choices"], "new weights, new samples");
    let choices = after["choices"].as_array().expect("choices");
    let gap = logprob_gap(second.path(), &PROMPT, choices, 0.9);
    assert!(gap < 1e-4, "the log-probs are the reloaded weights': gap {gap}");

    // A directory that is no model is refused, and the served weights stay.
    let bad = json!({ "model_path": first.path().join("missing").display().to_string() });
    let (status, _, text) = post(&format!("{root}/update_weights_from_disk"), &bad);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("\"success\":false"), "{text}");
    assert_eq!(get_json(&format!("{root}/get_weight_version"))["weight_version"], "step-1");

    // vLLM's reload route rereads the directory the server started on.
    let reply = post_json(&format!("{root}/collective_rpc"), &json!({ "method": "reload_weights" }));
    assert_eq!(reply["results"], json!([null]), "{reply}");
    let version = get_json(&format!("{root}/get_weight_version"))["weight_version"].clone();
    assert_ne!(version, "step-1");
    let again = post_json(&format!("{}/completions", server.url), &completion_request(7));
    assert_eq!(again["choices"], before["choices"], "the first weights again");
    let (status, _, text) = post(&format!("{root}/collective_rpc"), &json!({ "method": "sleep" }));
    assert_eq!(status, 400, "{text}");
}

/// The official `openai` Python client against the server (`tests/openai_client.py`). Skips
/// with a message when Python or the package is missing, unless `LONGRL_REQUIRE_OPENAI` is
/// set (CI sets it after installing the package).
#[test]
fn the_official_openai_python_client_works_against_the_server() {
    let required = std::env::var_os("LONGRL_REQUIRE_OPENAI").is_some();
    let probe = Command::new("python3").args(["-c", "import openai"]).output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match probe {
            Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
            Err(e) => format!("no python3: {e}"),
        };
        assert!(!required, "LONGRL_REQUIRE_OPENAI is set but the openai client is unavailable: {why}");
        eprintln!("skipped: the openai Python client is unavailable ({why}); `pip install openai` to run this test");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_checkpoint(dir.path(), 9);
    let server = serve(dir.path(), &["--served-model-name", "tiny"]);
    let out = Command::new("python3").arg(workspace().join("tests/openai_client.py")).arg(&server.url).output().expect("python runs");
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "the openai client's checks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The address `host:port` of a server's API base.
fn address(url: &str) -> String {
    url.trim_start_matches("http://").split('/').next().expect("host:port").to_string()
}

/// What the server sends on `stream` before it closes it (or 20 s pass).
fn read_until_closed(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(20))).expect("timeout");
    let mut bytes = Vec::new();
    let result = stream.read_to_end(&mut bytes);
    assert!(result.is_ok() || !bytes.is_empty(), "the server neither answered nor closed the connection: {result:?}");
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn a_server_drawing_on_the_device_answers_as_one_drawing_on_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_checkpoint(dir.path(), 9);
    let (host, device) = (serve(dir.path(), &["--sample-on", "host"]), serve(dir.path(), &["--sample-on", "device"]));
    let greedy = json!({ "model": "tiny", "prompt": PROMPT, "n": 2, "max_tokens": 8, "temperature": 0,
                         "logprobs": 0, "return_token_ids": true, "ignore_eos": true });
    let (a, b) = (post_json(&format!("{}/completions", host.url), &greedy), post_json(&format!("{}/completions", device.url), &greedy));
    for index in 0..2 {
        let (x, y) = (&a["choices"][index], &b["choices"][index]);
        assert_eq!(ids(&x["token_ids"]), ids(&y["token_ids"]), "greedy tokens: {a} vs {b}");
        for (p, q) in floats(&x["logprobs"]["token_logprobs"]).into_iter().zip(floats(&y["logprobs"]["token_logprobs"])) {
            assert!((p - q).abs() < 1e-4, "log-probs {p} vs {q}");
        }
    }
    let sampled = post_json(&format!("{}/completions", device.url), &completion_request(3));
    let choices = sampled["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3, "{sampled}");
    assert!(choices.iter().all(|c| ids(&c["token_ids"]).len() == 8), "{sampled}");
}

#[test]
fn a_client_that_reads_none_of_its_reply_loses_its_connection_at_the_deadline() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_checkpoint(dir.path(), 4);
    // One connection at a time and a 3 s deadline.
    let server = serve(dir.path(), &["--max-connections", "1", "--request-timeout", "3"]);
    // A reply of several MB: every prompt token's 20 most likely tokens, 48 prompts of 400.
    let prompts: Vec<Vec<u32>> = (0..48u32).map(|p| (0..400u32).map(|i| (i * 7 + p * 13) % 1000 + 3).collect()).collect();
    let request = json!({ "model": "tiny", "prompt": prompts, "max_tokens": 1, "echo": true, "logprobs": 20, "temperature": 0 });
    let body = request.to_string();
    // A client with a small receive window that sends the request and reads nothing.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let addr: std::net::SocketAddr = address(&server.url).parse().expect("address");
    socket.connect(&addr.into()).expect("connects");
    let mut stalled: std::net::TcpStream = socket.into();
    write!(
        stalled,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    // The one connection slot is the stalled client's until its reply times out; then this
    // client's request is taken (it waits in the listen queue meanwhile).
    let started = std::time::Instant::now();
    let reply = post_json(&format!("{}/completions", server.url), &request);
    let waited = started.elapsed();
    let text = reply.to_string();
    assert!(text.len() > 6 << 20, "the reply must outgrow the socket buffers: {} bytes", text.len());
    assert!(waited < std::time::Duration::from_secs(60), "served after the stalled reply was cut off ({waited:?})");
    // The stalled client's reply was cut short: far fewer bytes than the whole.
    let received = read_until_closed(&mut stalled);
    assert!(received.len() < text.len(), "{} of {} bytes", received.len(), text.len());
}

#[test]
fn stalled_clients_hold_no_request_thread_and_are_cut_off_at_the_deadline() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_checkpoint(dir.path(), 4);
    // One request thread and a 5 s deadline.
    let server = serve(dir.path(), &["--threads", "1", "--request-timeout", "5"]);
    let addr = address(&server.url);
    let connect = || std::net::TcpStream::connect(&addr).expect("connects");
    // Half a request's headers; headers promising a body of 100 bytes and sending 10; a
    // connection that never sends anything.
    let mut half_headers = connect();
    half_headers.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty").expect("write");
    let mut short_body = connect();
    short_body
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        .expect("write");
    let mut silent = connect();
    // Meanwhile the one request thread answers others.
    let started = std::time::Instant::now();
    assert_eq!(get_json(&format!("{}/health", server.root()))["status"], "ok");
    let (status, _, text) = post(&format!("{}/completions", server.url), &completion_request(1));
    assert_eq!(status, 200, "{text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "answered before any stalled client was cut off");
    // At the deadline: a 408 for the body that never came, closed connections for the rest.
    let reply = read_until_closed(&mut short_body);
    assert!(reply.starts_with("HTTP/1.1 408") && reply.contains("did not arrive within 5 s"), "{reply}");
    for stream in [&mut half_headers, &mut silent] {
        let reply = read_until_closed(stream);
        assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 408"), "{reply}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(25));
    // The server goes on.
    assert_eq!(get_json(&format!("{}/health", server.root()))["status"], "ok");
}
