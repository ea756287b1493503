//! Remote rollouts end to end: an RL phase whose groups are sampled by two `longrl serve`
//! processes on 127.0.0.1. Both servers answer, every step's rollouts come from the weights
//! the trainer just wrote (the servers' log-probs equal the trainer's), a server that dies
//! mid-phase is taken out with a warning while the other carries on, and losing both fails
//! the phase with an error naming them.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};
use support::serving::{Server, get_json, post_json, serve, tiny_checkpoint};
use support::with_tiny;

/// Two short steps: 2 prompts of G = 3 samples each; weights sent to the servers in f32 so
/// their log-probs can equal the trainer's.
const RECIPE: &str = r#"
let tiny = "{tiny}";
let policy = model(tiny, #{ init: "random", init_std: 0.08, seed: 3 });
let tasks = synthetic(#{ count: 8, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 1 });
let letters = reward(#{ script: |response, record| {
    let hits = 0;
    for c in response { if c == 'e' { hits += 1; } }
    if response.len() == 0 { 0.0 } else { hits.to_float() / response.len().to_float() }
} });
rl_phase(policy, tasks, #{
    reward: letters, dynamic_sampling: false, max_input: 256, max_output: 6, group: 3, prompts_per_step: 2, mini_batch: 2,
    lr: 3e-3, temperature: 1.0, seed: 5, max_steps: 2,
    rollout: #{ urls: {urls}, model: "tiny", flavor: "longrl", max_in_flight: 1, weights_dtype: "f32", retries: 1, max_failures: 2 },
});
"#;

/// Runs the recipe against `servers` in a fresh runs directory under `dir`.
fn run(dir: &Path, servers: &[&Server]) -> Output {
    let urls: Vec<&str> = servers.iter().map(|s| s.url.as_str()).collect();
    let recipe = with_tiny(RECIPE).replace("{urls}", &json!(urls).to_string());
    std::fs::write(dir.join("remote.rhai"), recipe).expect("write");
    Command::new(env!("CARGO_BIN_EXE_longrl"))
        .current_dir(dir)
        .args(["run", "remote.rhai", "--runs-dir", "runs", "--name", "remote"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("longrl runs")
}

/// The RL phase's metrics lines.
fn rl_metrics(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("runs/remote/metrics.jsonl")).expect("metrics");
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .filter(|l| l["stage"].as_str().is_some_and(|s| s.starts_with("rl_phase")) && !l["weights_version"].is_null())
        .collect()
}

/// The RL phase's summary (its stage file).
fn rl_summary(dir: &Path) -> Value {
    let stages = dir.join("runs/remote/stages");
    let file = std::fs::read_dir(&stages)
        .expect("stages")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("rl_phase")))
        .expect("the phase's stage file");
    serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("json")
}

#[test]
fn an_rl_phase_rolls_out_on_two_servers_that_load_each_steps_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = dir.path().join("start");
    tiny_checkpoint(&start, 9);
    let (a, b) = (serve(&start, &[]), serve(&start, &[]));
    let out = run(dir.path(), &[&a, &b]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    let steps = rl_metrics(dir.path());
    assert_eq!(steps.len(), 2, "two steps: {steps:?}");
    let versions: Vec<&str> = steps.iter().map(|s| s["weights_version"].as_str().expect("version")).collect();
    assert!(versions[0] != versions[1] && versions[1].ends_with(":1"), "a new version per optimizer update: {versions:?}");
    for step in &steps {
        let diff = step["rollout_logprob_diff"].as_f64().expect("diff");
        eprintln!("step {}: weights {}, mean |server - trainer| log-prob {diff:e}", step["step"], step["weights_version"]);
        assert!(diff < 1e-4, "the servers sample from the trainer's weights: {step}");
        assert_eq!(step["groups_logprobs_recomputed"], 0, "{step}");
        assert_eq!(step["rollout_servers"], 2, "{step}");
    }
    let summary = rl_summary(dir.path());
    let answered = summary.pointer("/summary/rollout_requests").or_else(|| summary.get("rollout_requests")).expect("requests per server");
    for server in [&a, &b] {
        assert!(answered[&server.url].as_u64().is_some_and(|n| n >= 1), "{} answered: {summary}", server.url);
        // Each server holds the last weights the trainer wrote.
        assert_eq!(get_json(&format!("{}/get_weight_version", server.root()))["weight_version"], versions[1]);
    }

    // The servers' log-probs of a fixed continuation are the trainer's after the reload: the
    // weights the phase wrote for step 2, scored here against a server's answer.
    let weights = std::fs::read_dir(dir.path().join("runs/remote"))
        .expect("run dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with("rollout-weights")))
        .expect("the rollout weights directory");
    let prompt = [5u32, 17, 29, 41, 8, 3];
    let request = json!({ "prompt": prompt, "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 1, "logprobs": 0,
                          "return_token_ids": true, "ignore_eos": true });
    let reply = post_json(&format!("{}/completions", b.url), &request);
    let gap = support::serving::logprob_gap(&weights, &prompt, reply["choices"].as_array().expect("choices"), 1.0);
    eprintln!("after the reload: largest |server - trainer| log-prob {gap:e}");
    assert!(gap < 1e-4, "gap {gap}");
}

#[test]
fn a_server_dying_mid_phase_is_taken_out_and_losing_both_fails_naming_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = dir.path().join("start");
    tiny_checkpoint(&start, 9);
    // A answers its health check, the first load and one rollout request, then exits.
    let (a, b) = (serve(&start, &["--max-requests", "3"]), serve(&start, &[]));
    let out = run(dir.path(), &[&a, &b]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the phase carries on without the dead server: {stderr}");
    eprintln!("{stderr}");
    assert!(stderr.contains("a rollout server is taken out") && stderr.contains(&a.url), "a warning names the server: {stderr}");
    let steps = rl_metrics(dir.path());
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[1]["rollout_servers"], 1, "{:?}", steps[1]);
    assert!(steps[1]["rollout_logprob_diff"].as_f64().is_some_and(|d| d < 1e-4));

    // Both die after the first step: the second fails, naming each server.
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (serve(&start, &["--max-requests", "3"]), serve(&start, &["--max-requests", "3"]));
    let out = run(dir.path(), &[&a, &b]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    eprintln!("{stderr}");
    assert!(stderr.contains("every rollout server failed"), "{stderr}");
    assert!(stderr.contains(&a.url) && stderr.contains(&b.url), "the error names both servers: {stderr}");
}

/// `score_difficulty` and `evaluate` with and without servers: the servers run the same
/// sampler with the same seeds, so the difficulties and the evaluation's samples are the
/// same.
const SCORE_AND_EVALUATE: &str = r#"
let tiny = "{tiny}";
let policy = model(tiny, #{ init: "random", init_std: 0.08, seed: 3 });
let tasks = synthetic(#{ count: 4, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 1 });
let letters = reward(#{ script: |response, record| {
    let hits = 0;
    for c in response { if c == 'e' { hits += 1; } }
    if response.len() == 0 { 0.0 } else { hits.to_float() / response.len().to_float() }
} });
let servers = #{ urls: {urls}, model: "tiny", flavor: "longrl", weights_dtype: "f32" };
let scoring = #{ reward: letters, group: 3, max_output: 5, seed: 2 };
score_difficulty(policy, tasks, scoring).output("records").write_jsonl("local.jsonl");
score_difficulty(policy, tasks, scoring + #{ rollout: servers }).output("records").write_jsonl("remote.jsonl");
let evaluation = #{ reward: letters, max_new_tokens: 5, samples: 2, temperature: 0.8, seed: 4 };
evaluate(policy, tasks, evaluation + #{ name: "local" });
evaluate(policy, tasks, evaluation + #{ name: "remote", rollout: servers });
"#;

#[test]
fn difficulty_scoring_and_evaluation_on_servers_match_in_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = dir.path().join("start");
    tiny_checkpoint(&start, 9);
    let (a, b) = (serve(&start, &[]), serve(&start, &[]));
    let urls = json!([a.url, b.url]).to_string();
    std::fs::write(dir.path().join("remote.rhai"), with_tiny(SCORE_AND_EVALUATE).replace("{urls}", &urls)).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_longrl"))
        .current_dir(dir.path())
        .args(["run", "remote.rhai", "--runs-dir", "runs", "--name", "remote"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("longrl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = dir.path().join("runs/remote");
    let read = |name: &str| std::fs::read_to_string(run.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let difficulty = |name: &str| -> Vec<Value> {
        read(name).lines().map(|l| serde_json::from_str::<Value>(l).expect("json")["difficulty"].clone()).collect()
    };
    let (local, remote) = (difficulty("local.jsonl"), difficulty("remote.jsonl"));
    assert_eq!(local.len(), 4);
    assert!(local.iter().all(|d| d["rewards"].as_array().is_some_and(|r| r.len() == 3)), "{local:?}");
    assert_eq!(local, remote, "the same samples, so the same difficulty");
    let answers = |name: &str| -> Vec<Value> {
        read(&format!("{name}/items.jsonl"))
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("json"))
            .map(|item| item["responses"].clone())
            .collect()
    };
    let (local, remote) = (answers("local"), answers("remote"));
    assert_eq!(local.len(), 4);
    assert!(local.iter().all(|r| r.as_array().is_some_and(|a| a.len() == 2)), "{local:?}");
    assert_eq!(local, remote, "the servers draw the same samples");
    // Samples that ran out of their 5 tokens, as counted from in-process finish reasons and
    // from the servers' `finish_reason`: the random model rarely stops by itself.
    let cut = |name: &str| -> Vec<u64> {
        read(&format!("{name}/items.jsonl"))
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("json")["cut"].as_u64().expect("cut count"))
            .collect()
    };
    let (local, remote) = (cut("local"), cut("remote"));
    assert_eq!(local, remote, "the same samples reached max_new_tokens");
    assert!(local.iter().sum::<u64>() > 0 && local.iter().all(|&c| c <= 2), "{local:?}");
}
