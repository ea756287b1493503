//! `longrl bench pipeline`: records per second through source -> filter -> sink, with and
//! without tokenization, on generated records of a chosen length.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use longrl_stdlib::{CancelToken, Registry, StageContext};
use rand::{Rng, SeedableRng};

use crate::dataflow::executor::{RunOptions, execute};
use crate::dataflow::recipe::{Params, load_plan};

/// Figures of one pipeline variant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineFigures {
    pub variant: String,
    pub records: u64,
    pub wall_s: f64,
    pub records_per_s: f64,
    pub mb_per_s: f64,
}

/// Writes `count` records with documents of about `words` words each into `dir`.
pub fn generate_records(dir: &Path, count: usize, words: usize, seed: u64) -> std::io::Result<(PathBuf, u64)> {
    const VOCAB: &[&str] = &[
        "the",
        "river",
        "report",
        "quarterly",
        "revenue",
        "of",
        "company",
        "was",
        "in",
        "million",
        "north",
        "station",
        "museum",
        "director",
        "founded",
        "album",
        "released",
        "population",
        "census",
        "county",
        "built",
        "bridge",
        "author",
        "novel",
        "published",
        "election",
        "minister",
        "team",
        "season",
        "league",
        "born",
        "village",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let path = dir.join("bench_records.jsonl");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for i in 0..count {
        let mut document = String::with_capacity(words * 7);
        for w in 0..words {
            if w > 0 {
                document.push(if w % 17 == 0 { '.' } else { ' ' });
                if w % 17 == 0 {
                    document.push(' ');
                }
            }
            document.push_str(VOCAB[rng.random_range(0..VOCAB.len())]);
        }
        let record = serde_json::json!({
            "id": format!("r{i}"), "context": document, "question": format!("What is fact {i}?"), "answers": [format!("answer {i}")]
        });
        writeln!(out, "{record}")?;
    }
    out.flush()?;
    let bytes = std::fs::metadata(&path)?.len();
    Ok((path, bytes))
}

/// Runs both variants and returns their figures.
pub fn pipeline(count: usize, words: usize, tokenizer: &Path) -> Result<Vec<PipelineFigures>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (data, bytes) = generate_records(dir.path(), count, words, 7).map_err(|e| e.to_string())?;
    let tokenizer = std::fs::canonicalize(tokenizer).map_err(|e| format!("{}: {e}", tokenizer.display()))?;
    let variants = [
        ("no tokenization (dedup only)", format!(r#"jsonl("{}").filter(#{{ dedup: true }}).write_jsonl("plain.jsonl")"#, data.display())),
        (
            "tokenize + length filter",
            format!(
                r#"jsonl("{}").filter(#{{ dedup: true, tokenizer: "{}", max_input_tokens: 1000000 }}).write_jsonl("tok.jsonl")"#,
                data.display(),
                tokenizer.display()
            ),
        ),
    ];
    let registry = Registry::standard();
    let mut figures = Vec::new();
    for (variant, recipe) in variants {
        let plan = load_plan(&recipe, "bench.rhai", &registry, &Params::new()).map_err(|p| p.to_string())?;
        let plan = plan.validate(&registry, &StageContext::for_check(dir.path())).map_err(|p| p.to_string())?;
        let mut options = RunOptions::in_dir(dir.path());
        options.run_dir = Some(dir.path().to_path_buf());
        let started = Instant::now();
        let report = execute(&plan, &registry, &options, &CancelToken::new()).map_err(|e| e.to_string())?;
        let wall = started.elapsed().as_secs_f64();
        if let Some(message) = report.failure_message() {
            return Err(message);
        }
        let records = report.stages.iter().find(|s| s.label.starts_with("write_jsonl")).map_or(0, |s| s.items_in);
        figures.push(PipelineFigures {
            variant: variant.to_string(),
            records,
            wall_s: wall,
            records_per_s: records as f64 / wall,
            mb_per_s: bytes as f64 / 1e6 / wall,
        });
    }
    Ok(figures)
}

/// Throughput of one model shape: prefill, decode (batch 1 and a shared-prompt group) and
/// training forward+backward, on the backend the task is dispatched to.
#[derive(Debug, Clone)]
pub struct ModelBench {
    pub preset: String,
    pub vocab: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub group: usize,
    pub train_batch: usize,
    pub train_seq: usize,
}

/// One measured figure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed().as_secs_f64())
}

impl longrl_backends::BackendTask for ModelBench {
    type Output = Result<Vec<Figure>, String>;

    fn run<B: longrl_backends::TrainBackend>(self, device: B::Device) -> Self::Output {
        use longrl_stdlib::model::checkpoint::RandomInit;
        use longrl_stdlib::model::generate::{SamplingConfig, generate_group};
        use longrl_stdlib::model::score::score_batch;
        use longrl_stdlib::model::{CausalLm, ModelConfig};

        let config = ModelConfig::preset(&self.preset, self.vocab)
            .ok_or_else(|| format!("unknown preset `{}` (presets: {})", self.preset, ModelConfig::PRESETS.join(", ")))?;
        let model = CausalLm::<B::InnerBackend>::build(&config, &mut RandomInit::new(1, 0.02), &device).map_err(|e| e.to_string())?;
        let mut figures = vec![Figure { name: "parameters".into(), value: config.num_params() as f64, unit: "" }];
        let prompt: Vec<u32> = (0..self.prompt_len).map(|i| ((i * 7919 + 13) % self.vocab) as u32).collect();
        let sampling = |n: usize| SamplingConfig { temperature: 1.0, max_new_tokens: n, ..SamplingConfig::default() };
        // Warm-up (allocators, thread pools).
        generate_group(&model, &prompt[..prompt.len().min(16)], 1, &sampling(2)).map_err(|e| e.to_string())?;

        let (_, prefill) = timed(|| generate_group(&model, &prompt, 1, &sampling(1)));
        figures.push(Figure {
            name: format!("prefill {} tokens, batch 1", self.prompt_len),
            value: self.prompt_len as f64 / prefill,
            unit: "tokens/s",
        });
        let (_, one) = timed(|| generate_group(&model, &prompt, 1, &sampling(self.new_tokens)));
        let decode_one = (one - prefill).max(1e-9);
        figures.push(Figure { name: "decode, batch 1".into(), value: (self.new_tokens - 1) as f64 / decode_one, unit: "tokens/s" });
        let (_, group) = timed(|| generate_group(&model, &prompt, self.group, &sampling(self.new_tokens)));
        let decode_group = (group - prefill).max(1e-9);
        figures.push(Figure {
            name: format!("decode, group of {} sharing the prompt", self.group),
            value: (self.group * (self.new_tokens - 1)) as f64 / decode_group,
            unit: "tokens/s",
        });
        figures.push(Figure {
            name: format!("group of {}: prompt + {} tokens each, wall", self.group, self.new_tokens),
            value: group,
            unit: "s",
        });

        let train = CausalLm::<B>::build(&config, &mut RandomInit::new(1, 0.02), &device).map_err(|e| e.to_string())?;
        let half = self.train_seq / 2;
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..self.train_batch)
            .map(|b| {
                let ids: Vec<u32> = (0..self.train_seq).map(|i| ((i * 31 + b * 17 + 5) % self.vocab) as u32).collect();
                (ids[..half].to_vec(), ids[half..].to_vec())
            })
            .collect();
        let step = || -> Result<(), String> {
            let scores = score_batch(&train, &pairs).map_err(|e| e.to_string())?;
            let loss = scores.logprobs.sum().neg();
            let grads = loss.backward();
            let grad = train.embed_tokens.weight.val().grad(&grads);
            drop(grad);
            Ok(())
        };
        step()?;
        let mut times = Vec::new();
        for _ in 0..3 {
            let (result, t) = timed(step);
            result?;
            times.push(t);
        }
        times.sort_by(f64::total_cmp);
        let tokens = (self.train_batch * self.train_seq) as f64;
        figures.push(Figure {
            name: format!("forward+backward, batch {} x {} tokens", self.train_batch, self.train_seq),
            value: tokens / times[1],
            unit: "tokens/s",
        });
        Ok(figures)
    }
}

/// Runs one prefill of `len` tokens on the tiny preset and returns this process's peak
/// resident memory in MiB (read from /proc/self/status; the caller runs it in a child
/// process so earlier work does not count).
pub fn prefill_peak_memory(len: usize, vocab: usize) -> Result<(f64, f64), String> {
    use longrl_stdlib::model::checkpoint::RandomInit;
    use longrl_stdlib::model::{CausalLm, ForwardArgs, ModelConfig};
    let config = ModelConfig::preset("tiny", vocab).ok_or("no tiny preset")?;
    let device = Default::default();
    let model = CausalLm::<longrl_backends::Cpu>::build(&config, &mut RandomInit::new(1, 0.02), &device).map_err(|e| e.to_string())?;
    let ids: Vec<i64> = (0..len).map(|i| ((i * 7919 + 13) % vocab) as i64).collect();
    let tokens = burn::tensor::Tensor::<longrl_backends::Cpu, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(ids, [1, len]),
        &device,
    );
    let mut cache = model.new_cache();
    let started = Instant::now();
    let hidden = model.forward_hidden(tokens, ForwardArgs::contiguous(1, 0, len, &device), &mut cache);
    let [_, s, d] = hidden.dims();
    let last = model.logits(hidden.slice([0..1, s - 1..s, 0..d]));
    let _ = last.into_data();
    let wall = started.elapsed().as_secs_f64();
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let peak_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or("no VmHWM in /proc/self/status")?;
    Ok((peak_kb / 1024.0, wall))
}

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
