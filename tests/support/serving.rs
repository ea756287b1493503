//! `longrl serve` processes for the tests: a tiny checkpoint to serve, a server started on
//! 127.0.0.1 with a free port (killed when dropped), and JSON over HTTP.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use longrl_backends::Cpu;
use longrl_stdlib::model::load_model;
use longrl_stdlib::model::score::score_group_at;
use serde_json::Value;

use super::workspace;

/// A checkpoint of the tiny model with random weights drawn from `seed` (f32, so the
/// server's weights are exactly the ones a test scores with).
pub fn tiny_checkpoint(dir: &Path, seed: u64) {
    use longrl_stdlib::model::checkpoint::{RandomInit, SaveDtype, copy_tokenizer_files};
    use longrl_stdlib::model::{CausalLm, ModelConfig, save_model};
    let source = workspace().join("examples/models/tiny");
    let config = ModelConfig::load(&source.join("config.json")).expect("config");
    let model = CausalLm::<Cpu>::build(&config, &mut RandomInit::new(seed, 0.08), &Default::default()).expect("model");
    save_model(&model, &config, dir, SaveDtype::F32).expect("save");
    copy_tokenizer_files(&source, dir).expect("tokenizer");
}

/// A `longrl serve` child process, killed when dropped.
pub struct Server {
    pub child: Child,
    /// The API base, `http://127.0.0.1:PORT/v1`.
    pub url: String,
    pub first_line: String,
}

impl Server {
    /// The server's root (for `/health` and the weight routes).
    pub fn root(&self) -> String {
        self.url.trim_end_matches("/v1").to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `longrl serve --port 0` on `model` with `extra` arguments (`--max-tokens-cap 32` unless
/// they set it).
pub fn serve(model: &Path, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_longrl"))
        .args(["serve", "--model", model.to_str().expect("utf-8"), "--port", "0"])
        .args(if extra.contains(&"--max-tokens-cap") { &[][..] } else { &["--max-tokens-cap", "32"][..] })
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("serve starts");
    let mut first_line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut first_line).expect("first line");
    let url = first_line.split_whitespace().find(|w| w.starts_with("http://")).expect("url in the first line").to_string();
    Server { child, url, first_line }
}

pub fn agent() -> ureq::Agent {
    // A server that hangs fails the test instead of holding it forever.
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(std::time::Duration::from_secs(120))).build().into()
}

/// POSTs `body` to `url`: the status, the content type and the body text.
pub fn post(url: &str, body: &Value) -> (u16, String, String) {
    let mut response = agent().post(url).header("Content-Type", "application/json").send(body.to_string()).expect("request");
    let status = response.status().as_u16();
    let kind = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    (status, kind, response.body_mut().read_to_string().expect("body"))
}

/// POSTs `body` to `url`, which must answer 200 with JSON.
pub fn post_json(url: &str, body: &Value) -> Value {
    let (status, _, text) = post(url, body);
    assert_eq!(status, 200, "{url}: {text}");
    serde_json::from_str(&text).expect("json")
}

/// GETs `url`, which must answer 200 with JSON.
pub fn get_json(url: &str) -> Value {
    let mut response = agent().get(url).call().expect("request");
    assert_eq!(response.status().as_u16(), 200, "{url}");
    serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("json")
}

pub fn ids(value: &Value) -> Vec<u32> {
    value.as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect()
}

pub fn floats(value: &Value) -> Vec<f32> {
    value.as_array().expect("numbers").iter().map(|v| v.as_f64().expect("number") as f32).collect()
}

/// The most the log-probs `choices` report differ from `model_dir`'s own (at `temperature`).
pub fn logprob_gap(model_dir: &Path, prompt: &[u32], choices: &[Value], temperature: f32) -> f32 {
    let (_, model) = load_model::<Cpu>(model_dir, &Default::default()).expect("model");
    let responses: Vec<Vec<u32>> = choices.iter().map(|c| ids(&c["token_ids"])).collect();
    let scores = score_group_at(&model, prompt, &responses, temperature).expect("scores");
    let width = responses.iter().map(Vec::len).max().expect("responses");
    let own: Vec<f32> = scores.logprobs.into_data().convert::<f32>().into_vec().expect("f32");
    let mut gap = 0f32;
    for (i, choice) in choices.iter().enumerate() {
        let theirs = floats(&choice["logprobs"]["token_logprobs"]);
        assert_eq!(theirs.len(), responses[i].len(), "one log-prob per token: {choice}");
        for (k, lp) in theirs.iter().enumerate() {
            gap = gap.max((lp - own[i * width + k]).abs());
        }
    }
    gap
}
