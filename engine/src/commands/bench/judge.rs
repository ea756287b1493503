//! `longrl bench judge`: requests per second through the judge pool at several
//! concurrencies, against a loopback server that answers after a fixed delay.

use std::time::Instant;

/// Judge throughput against a loopback server that answers after `delay_ms`, at each
/// concurrency: (concurrency, requests/s).
pub fn judge_throughput(requests: usize, delay_ms: u64, concurrencies: &[usize]) -> Result<Vec<(usize, f64)>, String> {
    use longrl_stdlib::reward::judge::{Judge, JudgeConfig, JudgeRequest};
    let server = tiny_http::Server::http("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = server.server_addr().to_ip().map(|a| a.port()).ok_or("no port")?;
    let server = std::sync::Arc::new(server);
    let listener = std::sync::Arc::clone(&server);
    std::thread::spawn(move || {
        for request in listener.incoming_requests() {
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(delay_ms));
                let body = serde_json::json!({ "choices": [{ "message": { "role": "assistant", "content": "[[YES]]" } }] });
                let _ = request.respond(tiny_http::Response::from_string(body.to_string()));
            });
        }
    });
    let mut out = Vec::new();
    for (round, &concurrency) in concurrencies.iter().enumerate() {
        let config = JudgeConfig {
            url: format!("http://127.0.0.1:{port}/v1"),
            model: "bench".into(),
            api_key_env: None,
            concurrency,
            max_requests_per_s: 0.0,
            retries: 0,
            backoff_ms: 0,
            timeout_s: 30.0,
            max_tokens: 16,
        };
        let judge = Judge::new(config).map_err(|e| e.to_string())?;
        let batch: Vec<JudgeRequest> =
            (0..requests).map(|i| JudgeRequest { question: format!("q{round}-{i}"), prediction: "p".into(), gold: "g".into() }).collect();
        let started = Instant::now();
        let verdicts = judge.judge_all(&batch);
        let wall = started.elapsed().as_secs_f64();
        if verdicts.iter().any(|v| v.score().is_none()) {
            return Err("some bench requests failed".into());
        }
        out.push((concurrency, requests as f64 / wall));
    }
    server.unblock();
    Ok(out)
}
