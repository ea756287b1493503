//! The `longrl` binary: run, check and draw recipes, list stages, benchmark.

use std::path::PathBuf;
use std::process::ExitCode;

use std::io::IsTerminal;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use longrl_backends::{BackendKind, DeviceSpec};
use longrl_engine::commands::run::{RecipeArgs, RunArgs, parse_backend};
use longrl_engine::commands::{report, run, stages};
use longrl_engine::out::{error_text, is_broken_pipe};
use longrl_engine::{errln, out, outln};
use longrl_stdlib::Registry;
use longrl_stdlib::model::SaveDtype;
use longrl_stdlib::model::batch_decode::SampleOn;

/// longrl: teach language models to reason over long documents with reinforcement learning.
#[derive(Parser, Debug)]
#[command(name = "longrl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a recipe: check it, then execute its stages into a new run directory.
    Run(RunArgs),
    /// Check a recipe without running it: print the plan, or every problem with its line.
    Check(RecipeArgs),
    /// Print a recipe's plan as text, or as Graphviz DOT with --dot.
    Graph {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Print Graphviz DOT instead of text.
        #[arg(long)]
        dot: bool,
    },
    /// List the stages a recipe can use, with their ports and options.
    Stages {
        /// Show only this stage.
        name: Option<String>,
    },
    /// Measure throughput.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Try a model: sample a continuation of a prompt (temperature 0 = greedy).
    Generate(GenerateArgs),
    /// Serve a model over the OpenAI-compatible API: a judge, or a rollout server for RL
    /// (completions with token ids and log-probs, weight reloads).
    Serve(ServeArgs),
    /// Score responses in a JSON Lines file (`response`, `gold`, `kind`): adds `score`.
    Score(ScoreArgs),
    /// Rebuild a run's report.html (plots of its metrics) from its directory.
    Report {
        /// The run directory, e.g. runs/<name>.
        run_dir: PathBuf,
    },
    /// Convert a model from another format into a Hugging Face model directory.
    #[command(subcommand)]
    Convert(ConvertCommand),
}

#[derive(Subcommand, Debug)]
enum ConvertCommand {
    /// A llama.cpp GGUF file (Llama architecture, gpt2 BPE tokenizer) into safetensors,
    /// config.json, tokenizer.json and tokenizer_config.json (with the chat template).
    Gguf {
        /// The .gguf file.
        file: PathBuf,
        /// The model directory to write (created if needed).
        out_dir: PathBuf,
        /// Precision of the written weights: f32, bf16 or f16.
        #[arg(long, default_value = "f32", value_parser = parse_dtype)]
        dtype: SaveDtype,
        /// Write into OUT_DIR even if it already holds files.
        #[arg(long)]
        force: bool,
    },
}

fn parse_dtype(text: &str) -> Result<SaveDtype, String> {
    serde_json::from_value(serde_json::Value::String(text.to_ascii_lowercase()))
        .map_err(|_| format!("unknown dtype `{text}` (f32, bf16 or f16)"))
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json with a chat template).
    #[arg(long)]
    model: PathBuf,
    /// Port; 0 picks a free one (printed on the first line).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Address to bind: loopback by default. Another address (e.g. 0.0.0.0 for rollout
    /// servers on other machines) exposes the server, which has no authentication, to
    /// whoever reaches that address.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Largest `max_tokens` a request may ask for (a request above it is refused).
    #[arg(long, default_value_t = 4096)]
    max_tokens_cap: usize,
    /// Stop after this many requests (default: serve until killed).
    #[arg(long)]
    max_requests: Option<usize>,
    /// A name requests must give as `model` (repeatable; the first is the name responses
    /// carry). Without one, any name is taken to mean the model served.
    #[arg(long = "served-model-name", value_name = "NAME")]
    served_model_names: Vec<String>,
    /// Requests answered at once (generation itself runs on one worker).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: u64,
    /// Seconds a client has to send a request's headers, then its body (408 or a closed
    /// connection after that); a kept-alive connection idle that long is closed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    request_timeout: u64,
    /// Connections open at once; more wait until one closes.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    max_connections: u64,
    /// Where decoding draws its tokens: host, device (only tokens and log-probs come back
    /// from a GPU) or auto (the host, until a GPU measurement says otherwise).
    #[arg(long, default_value = "auto")]
    sample_on: SampleOn,
    #[command(flatten)]
    compute: DeviceArgs,
}

#[derive(Args, Debug)]
struct ScoreArgs {
    /// JSON Lines with `response`, `gold` (string or list) and `kind` (text, number, choice).
    file: PathBuf,
    /// How text answers compare: exact, contains or f1.
    #[arg(long, default_value = "contains", value_parser = parse_text_match)]
    text_match: longrl_stdlib::reward::TextMatch,
    /// Score 0 when a response has no `</think>`.
    #[arg(long)]
    require_think_end: bool,
    /// Base URL of an OpenAI-compatible judge (e.g. http://127.0.0.1:8000/v1).
    #[arg(long)]
    judge_url: Option<String>,
    /// The judge's model name.
    #[arg(long, default_value = "judge")]
    judge_model: String,
    /// Environment variable holding the judge's API key.
    #[arg(long)]
    judge_api_key_env: Option<String>,
    /// Judge requests in flight at once.
    #[arg(long, default_value_t = 8)]
    judge_concurrency: usize,
    /// Ask the judge about every answer, not only rule misses.
    #[arg(long)]
    judge_always: bool,
    /// Seconds the judge may take to answer one request before it is retried.
    #[arg(long, default_value_t = 20.0, value_parser = parse_timeout)]
    judge_timeout: f64,
    /// Retries of a judge request that failed or timed out (0 = none).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=100))]
    judge_retries: u32,
}

/// Parses `--text-match`.
fn parse_text_match(text: &str) -> Result<longrl_stdlib::reward::TextMatch, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|_| "use exact, contains or f1".to_string())
}

/// Parses `--judge-timeout`: seconds, positive, at most an hour.
fn parse_timeout(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => Ok(s),
        _ => Err(format!("`{text}` is not a number of seconds within (0, 3600]")),
    }
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The prompt text.
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids (for models without a tokenizer); prints ids.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// Tokenizer directory or tokenizer.json (default: the model directory).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    compute: DeviceArgs,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Model throughput: prefill, decode (batch 1 and a group), forward+backward; and with
    /// --memory, peak memory of prefills of growing length on the tiny preset.
    Model(ModelArgs),
    /// Rollout throughput: several prompts' groups decoded together (continuous batching)
    /// against one group at a time, on random weights; and whether both give the same
    /// tokens.
    Rollout(RolloutArgs),
    /// GFLOP/s of the matrix product on the model's shapes (decode rows, prefill, training,
    /// LM head, weight gradient), output allocation included; compare with torch's sgemm
    /// through `examples/bench/compare_gemm.py`.
    Gemm {
        /// Seconds per shape.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// The figures as one JSON list.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        compute: DeviceArgs,
    },
    /// Seconds per GRPO step on a model directory and a JSONL of chat prompts: the steps
    /// `examples/bench/trl_grpo_step.py` runs in TRL (G samples per prompt at temperature 1,
    /// a contains-the-answer reward, one PPO-clip update without KL, AdamW).
    Grpo(GrpoArgs),
    /// Judge throughput with the request pool at several concurrencies, against a loopback
    /// server that answers after a fixed delay.
    Judge {
        #[arg(long, default_value_t = 64)]
        requests: usize,
        #[arg(long, default_value_t = 100)]
        delay_ms: u64,
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        concurrency: Vec<usize>,
    },
    /// Peak memory and time of one training step per input length, each in a fresh process.
    /// RL: one prompt of that length with a group of responses; SFT: one example of that
    /// length (half prompt, half response).
    Memory {
        #[command(flatten)]
        step: MemoryArgs,
        /// Input lengths in tokens, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "4096,16384")]
        lengths: Vec<usize>,
        /// One JSON object per line (`length`, `step`, `peak_rss_mib`, `seconds`, ...).
        #[arg(long)]
        json: bool,
    },
    /// (internal) one training step of `bench memory`; prints its figures as JSON.
    #[command(hide = true)]
    MemoryStep {
        #[command(flatten)]
        step: MemoryArgs,
        #[arg(long)]
        length: usize,
    },
    /// (internal) one prefill of --len tokens; prints peak memory.
    #[command(hide = true)]
    PrefillMemory {
        #[arg(long)]
        len: usize,
        #[arg(long, default_value_t = 4096)]
        vocab: usize,
    },
    /// Records per second through jsonl -> filter -> write_jsonl, with and without
    /// tokenization, and through a plain copy from one source and from two merged sources.
    Pipeline {
        /// Records to generate.
        #[arg(long, default_value_t = 20_000)]
        records: usize,
        /// Words per generated document.
        #[arg(long, default_value_t = 300)]
        words: usize,
        /// tokenizer.json used by the tokenizing variant.
        #[arg(long, default_value = "examples/tokenizers/qwen2.5/tokenizer.json")]
        tokenizer: PathBuf,
        /// One JSON object per variant, one per line.
        #[arg(long)]
        json: bool,
    },
}

/// What `bench model` measures.
#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// Shape: tiny, smollm2-135m or qwen2-0.5b.
    #[arg(long, default_value = "tiny")]
    preset: String,
    #[arg(long, default_value_t = 4096)]
    vocab: usize,
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    #[arg(long, default_value_t = 8)]
    group: usize,
    #[arg(long, default_value_t = 4)]
    train_batch: usize,
    #[arg(long, default_value_t = 256)]
    train_seq: usize,
    /// Also measure peak memory of prefills at these lengths (each in a fresh process).
    #[arg(long, value_delimiter = ',')]
    memory: Vec<usize>,
    /// Training precision: f32 or bf16-mixed (bf16 compute, f32 master weights; f32
    /// where the backend has no bf16).
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    precision: longrl_stdlib::model::precision::Precision,
    /// The device's peak dense TFLOP/s at this precision, for the model FLOP utilisation.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// One JSON object: `prefill`, `decode_batch1`, `decode_group`, `train` in tokens/s
    /// (the keys of `examples/bench/transformers_bench.py --json`).
    #[arg(long, conflicts_with = "memory")]
    json: bool,
    #[command(flatten)]
    compute: DeviceArgs,
}

/// The compute device a command runs on.
#[derive(Args, Debug, Clone, Copy)]
struct DeviceArgs {
    /// Compute backend: cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu", value_parser = parse_backend)]
    backend: BackendKind,
    /// Device index within the backend.
    #[arg(long, default_value_t = 0)]
    device: usize,
}

impl DeviceArgs {
    fn spec(self) -> DeviceSpec {
        DeviceSpec::new(self.backend, self.device)
    }
}

/// Options of `longrl bench rollout`.
#[derive(Args, Debug)]
struct RolloutArgs {
    #[command(flatten)]
    bench: longrl_engine::commands::bench::RolloutBench,
    /// The figures as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    compute: DeviceArgs,
}

/// Options of `longrl bench grpo`.
#[derive(Args, Debug)]
struct GrpoArgs {
    /// A Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// JSONL lines `{"prompt": [{"role": ..., "content": ...}], "answer": ...}`.
    #[arg(long)]
    prompts: PathBuf,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Samples per prompt (G).
    #[arg(long, default_value_t = 4)]
    group: usize,
    #[arg(long, default_value_t = 2)]
    prompts_per_step: usize,
    /// Tokens per response at most.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    #[arg(long, default_value_t = 1e-6)]
    lr: f64,
    /// Rows decoded together at most.
    #[arg(long, default_value_t = 64)]
    decode_rows: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The figures as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    compute: DeviceArgs,
}

/// The step `bench memory` measures.
#[derive(Args, Debug, Clone)]
struct MemoryArgs {
    /// Shape: tiny, smollm2-135m or qwen2-0.5b.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Which step: rl or sft.
    #[arg(long, value_enum, default_value = "rl")]
    step: longrl_engine::commands::bench::memory::StepKind,
    /// Vocabulary size (default: the preset model's).
    #[arg(long)]
    vocab: Option<usize>,
    /// RL: responses per group.
    #[arg(long, default_value_t = 8)]
    group: usize,
    /// RL: tokens per response.
    #[arg(long, default_value_t = 256)]
    response_tokens: usize,
    /// Activation recomputation: auto, layer or none.
    #[arg(long, default_value = "auto", value_parser = parse_recompute)]
    recompute: longrl_stdlib::train::RecomputeChoice,
    /// RL: padded response tokens per micro-batch (0: the whole group at once).
    #[arg(long, default_value_t = 0)]
    micro_batch_tokens: usize,
    /// Training precision: f32 or bf16-mixed.
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    precision: longrl_stdlib::model::precision::Precision,
    #[command(flatten)]
    compute: DeviceArgs,
}

impl MemoryArgs {
    fn step(&self, length: usize) -> longrl_engine::commands::bench::memory::MemoryStep {
        longrl_engine::commands::bench::memory::MemoryStep {
            preset: self.preset.clone(),
            vocab: self.vocab,
            step: self.step,
            length,
            group: self.group,
            response_tokens: self.response_tokens,
            recompute: self.recompute,
            micro_batch_tokens: self.micro_batch_tokens,
            precision: self.precision,
        }
    }

    /// The same options as command-line arguments, for the child process.
    fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--preset".to_string(), self.preset.clone(), "--step".into()];
        args.push(serde_json::to_value(self.step).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default());
        if let Some(vocab) = self.vocab {
            args.extend(["--vocab".to_string(), vocab.to_string()]);
        }
        args.extend(["--group".to_string(), self.group.to_string(), "--response-tokens".into(), self.response_tokens.to_string()]);
        let recompute = serde_json::to_value(self.recompute).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        args.extend(["--recompute".to_string(), recompute, "--micro-batch-tokens".into(), self.micro_batch_tokens.to_string()]);
        args.extend(["--precision".to_string(), self.precision.to_string()]);
        args.extend(["--backend".to_string(), self.compute.backend.to_string(), "--device".into(), self.compute.device.to_string()]);
        args
    }
}

fn parse_precision(text: &str) -> Result<longrl_stdlib::model::precision::Precision, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|_| format!("`{text}` is not f32 or bf16-mixed"))
}

fn parse_recompute(text: &str) -> Result<longrl_stdlib::train::RecomputeChoice, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|_| format!("`{text}` is not auto, layer or none"))
}

/// Rhai's hashing seed, fixed so that a closure's name (a hash of its body) is the same in
/// every process: `--resume` compares the closures of a run's plan with the recipe's now.
/// Recipes are the user's own code, so the randomized seed's protection is not needed.
const RHAI_HASHING_SEED: [u64; 4] = [0x6c6f_6e67, 0x726c, 0x7265_6369, 0x7065];

fn main() -> ExitCode {
    // Before any Rhai engine exists: every hash Rhai computes depends on it.
    if rhai::config::hashing::set_hashing_seed(Some(RHAI_HASHING_SEED)).is_err() {
        errln!("warning: Rhai's hashing seed was already set; `--resume` may see closures as changed");
    }
    let cli = Cli::parse();
    init_tracing();
    match dispatch(cli) {
        Ok(code) => code,
        // The reader of stdout went away (`longrl stages | head -1`): nothing left to say.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            errln!("error: {}", error_text(&err));
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; colour codes only when stderr is a terminal (never in a file or pipe).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,longrl_engine=info,longrl_stdlib=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let registry = Registry::standard();
    match cli.command {
        Command::Run(args) => run::run(args, &registry),
        Command::Check(args) => run::check(&args, &registry),
        Command::Graph { recipe, dot } => run::graph(&recipe, dot, &registry),
        Command::Report { run_dir } => {
            let path = report::write_report(&run_dir, &registry)?;
            outln!("{}", path.display())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stages { name } => {
            let stdout = std::io::stdout();
            stages::print_stages(&registry, name.as_deref(), &mut stdout.lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => serve(args),
        Command::Score(args) => score(args),
        Command::Generate(args) => generate(args),
        Command::Bench(command) => bench(command),
        Command::Convert(ConvertCommand::Gguf { file, out_dir, dtype, force }) => {
            use longrl_engine::commands::convert::{GgufConversion, convert, describe};
            let summary = convert(&GgufConversion { file, out_dir, dtype, force })?;
            println!("{}", describe(&summary));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `longrl serve`.
fn serve(args: ServeArgs) -> Result<ExitCode> {
    let options = longrl_engine::commands::serve::ServeOptions {
        model: args.model,
        host: args.host,
        port: args.port,
        max_tokens_cap: args.max_tokens_cap,
        max_requests: args.max_requests,
        served_model_names: args.served_model_names,
        threads: args.threads as usize,
        request_timeout: std::time::Duration::from_secs(args.request_timeout),
        max_connections: args.max_connections as usize,
        sample_on: args.sample_on,
    };
    longrl_backends::dispatch(args.compute.spec(), options)??;
    Ok(ExitCode::SUCCESS)
}

/// `longrl score`.
fn score(args: ScoreArgs) -> Result<ExitCode> {
    use longrl_stdlib::reward::{JudgeWhen, Reward};
    let rule = longrl_stdlib::reward::RuleConfig { require_think_end: args.require_think_end, text: args.text_match, ..Default::default() };
    let mut reward = Reward::rule_only(rule);
    if let Some(url) = args.judge_url {
        let config = longrl_stdlib::reward::judge::JudgeConfig {
            url,
            model: args.judge_model,
            api_key_env: args.judge_api_key_env,
            concurrency: args.judge_concurrency,
            max_requests_per_s: 0.0,
            retries: args.judge_retries,
            backoff_ms: 500,
            timeout_s: args.judge_timeout,
            max_tokens: 512,
        };
        reward.judge = Some(std::sync::Arc::new(longrl_stdlib::reward::judge::Judge::new(config)?));
        reward.judge_when = if args.judge_always { JudgeWhen::Always } else { JudgeWhen::Miss };
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    longrl_engine::commands::score::score_file(&args.file, &reward, &mut out)?;
    std::io::Write::flush(&mut out)?;
    Ok(ExitCode::SUCCESS)
}

/// `longrl generate`.
fn generate(args: GenerateArgs) -> Result<ExitCode> {
    let request = longrl_engine::commands::generate::GenerateRequest {
        model: args.model,
        tokenizer: args.tokenizer,
        prompt: args.prompt,
        ids: args.ids,
        chat: args.chat,
        sampling: longrl_stdlib::model::generate::SamplingConfig {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            max_new_tokens: args.max_new_tokens,
            stop_tokens: Vec::new(),
            seed: args.seed,
        },
    };
    let problems = request.problems();
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    let text = longrl_backends::dispatch(args.compute.spec(), request)??;
    outln!("{text}")?;
    Ok(ExitCode::SUCCESS)
}

/// `longrl bench memory`: each length's step in a fresh process.
fn bench_memory(step: &MemoryArgs, lengths: &[usize], json: bool) -> Result<ExitCode> {
    use longrl_engine::commands::bench::memory::MemoryFigures;
    let exe = std::env::current_exe().context("cannot find the longrl executable")?;
    if !json {
        println!(
            "{:?} step, preset {}, backend {}, precision {} (one fresh process per length)",
            step.step, step.preset, step.compute.backend, step.precision
        );
        println!("{:>9} {:>10} {:>14} {:>10}", "length", "recompute", "peak RSS MiB", "seconds");
    }
    for &length in lengths {
        let out = std::process::Command::new(&exe)
            .args(["bench", "memory-step", "--length", &length.to_string()])
            .args(step.to_args())
            .output()
            .context("cannot start the memory probe")?;
        if !out.status.success() {
            bail!("the step at {length} tokens failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let figures: MemoryFigures = serde_json::from_slice(&out.stdout).context("the memory probe printed no figures")?;
        if json {
            println!("{}", serde_json::to_string(&figures)?);
        } else {
            println!(
                "{:>9} {:>10} {:>14.0} {:>10.2}",
                figures.length,
                format!("{:?}", figures.recompute).to_lowercase(),
                figures.peak_rss_mib,
                figures.seconds
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `longrl bench rollout`.
fn bench_rollout(args: RolloutArgs) -> Result<ExitCode> {
    let RolloutArgs { bench, json, compute } = args;
    let f = longrl_backends::dispatch(compute.spec(), bench)?.map_err(anyhow::Error::msg)?;
    if json {
        outln!("{}", serde_json::to_string(&f)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "rollout bench: preset {}, vocab {}, {} prompts x {} samples, prompt {} tokens, up to {} new tokens, backend {}",
        f.preset,
        f.vocab,
        f.prompts,
        f.group,
        f.prompt_len,
        f.new_tokens,
        compute.backend
    )?;
    outln!("  {:<44} {:>10} {:>16}", "", "tokens/s", "decode tokens/s")?;
    let one = f.one_group_at_a_time;
    outln!("  {:<44} {one:>10.1} {:>16.1} ({:.2} s)", "one group at a time", f.one_group_at_a_time_decode, f.one_group_at_a_time_s)?;
    let together = format!("groups decoded together (<= {} rows, {})", f.max_rows, f.sampled_on);
    outln!("  {together:<44} {:>10.1} {:>16.1} ({:.2} s)", f.batched, f.batched_decode, f.batched_s)?;
    let decode_speedup = f.batched_decode / f.one_group_at_a_time_decode.max(1e-9);
    outln!("  speedup {:.2}x ({decode_speedup:.2}x decode only; prefills {:.2} s)", f.speedup, f.prefill_s)?;
    outln!("  {} of {} groups with the same tokens in both runs", f.identical_groups, f.prompts)?;
    Ok(ExitCode::SUCCESS)
}

/// `longrl bench gemm`.
fn bench_gemm(seconds: f64, json: bool, spec: DeviceSpec) -> Result<ExitCode> {
    if !(seconds > 0.0 && seconds.is_finite()) {
        bail!("--seconds must be a positive number, not {seconds}");
    }
    let figures = longrl_backends::dispatch(spec, longrl_engine::commands::bench::gemm::GemmBench { seconds })?;
    if json {
        outln!("{}", serde_json::to_string(&figures)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!("gemm bench: [m, k] x [k, n] products, backend {}, output allocation included", spec.kind)?;
    outln!("  {:<32} {:>6} {:>6} {:>6} {:>9}", "", "m", "k", "n", "GFLOP/s")?;
    for f in figures {
        outln!("  {:<32} {:>6} {:>6} {:>6} {:>9.1}", f.shape.name, f.shape.m, f.shape.k, f.shape.n, f.gflops)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `longrl bench grpo`.
fn bench_grpo(args: GrpoArgs) -> Result<ExitCode> {
    let GrpoArgs { model, prompts, steps, group, prompts_per_step, new_tokens, lr, decode_rows, seed, json, compute } = args;
    let task = longrl_engine::commands::bench::grpo::GrpoBench {
        model,
        prompts,
        steps,
        group,
        prompts_per_step,
        new_tokens,
        lr,
        decode_rows,
        seed,
    };
    let f = longrl_backends::dispatch(compute.spec(), task)?.map_err(anyhow::Error::msg)?;
    if json {
        outln!("{}", serde_json::to_string(&f)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!("grpo bench: {} ({} prompts x {} samples per step, {} new tokens)", f.model, f.prompts_per_step, f.group, f.new_tokens)?;
    for (i, (total, rollout)) in f.step_s.iter().zip(&f.rollout_s).enumerate() {
        outln!("  step {i}: {total:.2} s (rollouts {rollout:.2} s)")?;
    }
    outln!("  {:.2} s per step (median), mean reward {:.3}", f.seconds_per_step, f.reward_mean)?;
    Ok(ExitCode::SUCCESS)
}

/// `longrl bench model`: the figures on the chosen device, then prefill peak memory by
/// length (each in a fresh process).
fn bench_model(args: ModelArgs) -> Result<ExitCode> {
    let ModelArgs { preset, vocab, prompt_len, new_tokens, group, train_batch, train_seq, memory, precision, peak_tflops, json, compute } =
        args;
    let task = longrl_engine::commands::bench::ModelBench {
        preset: preset.clone(),
        vocab,
        prompt_len,
        new_tokens,
        group,
        train_batch,
        train_seq,
        precision,
        peak_tflops,
    };
    let figures = longrl_backends::dispatch(compute.spec(), task)?.map_err(anyhow::Error::msg)?;
    if json {
        let object = longrl_engine::commands::bench::model::figures_json(&preset, vocab, compute.backend.as_str(), &figures);
        outln!("{object}")?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!("model bench: preset {preset}, vocab {vocab}, backend {}, precision {precision}", compute.backend)?;
    for f in figures {
        outln!("  {:<52} {:>12.1} {}", f.name, f.value, f.unit)?;
    }
    if memory.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    outln!("prefill peak memory (tiny preset, fresh process each):")?;
    let exe = std::env::current_exe().context("cannot find the longrl executable")?;
    for len in memory {
        let out = std::process::Command::new(&exe)
            .args(["bench", "prefill-memory", "--len", &len.to_string(), "--vocab", &vocab.to_string()])
            .output()
            .context("cannot start the memory probe")?;
        if !out.status.success() {
            bail!("prefill of {len} tokens failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        out!("  {len:>7} tokens: {}", String::from_utf8_lossy(&out.stdout))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `longrl bench ...`.
fn bench(command: BenchCommand) -> Result<ExitCode> {
    match command {
        BenchCommand::Model(args) => bench_model(args),
        BenchCommand::Rollout(args) => bench_rollout(args),
        BenchCommand::Grpo(args) => bench_grpo(args),
        BenchCommand::Gemm { seconds, json, compute } => bench_gemm(seconds, json, compute.spec()),
        BenchCommand::Judge { requests, delay_ms, concurrency } => {
            let figures = longrl_engine::commands::bench::judge_throughput(requests, delay_ms, &concurrency).map_err(anyhow::Error::msg)?;
            outln!("judge pool: {requests} requests, server delay {delay_ms} ms")?;
            let base = figures.first().map_or(1.0, |f| f.1);
            for (c, rate) in figures {
                outln!("  concurrency {c:>3}: {rate:>8.1} requests/s ({:.1}x)", rate / base)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Memory { step, lengths, json } => bench_memory(&step, &lengths, json),
        BenchCommand::MemoryStep { step, length } => {
            let figures = longrl_backends::dispatch(step.compute.spec(), step.step(length))?.map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string(&figures)?);
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::PrefillMemory { len, vocab } => {
            let (peak_mib, wall) = longrl_engine::commands::bench::prefill_peak_memory(len, vocab).map_err(anyhow::Error::msg)?;
            outln!("peak RSS {peak_mib:.0} MiB, prefill {wall:.1} s ({:.0} tokens/s)", len as f64 / wall)?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Pipeline { records, words, tokenizer, json } => {
            let figures = longrl_engine::commands::bench::pipeline(records, words, &tokenizer).map_err(anyhow::Error::msg)?;
            if json {
                for f in figures {
                    outln!("{}", serde_json::to_string(&f)?)?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            outln!("pipeline jsonl -> filter -> write_jsonl, {records} records of {words} words")?;
            outln!("{:<36} {:>10} {:>9} {:>12} {:>9}", "variant", "records", "wall s", "records/s", "MB/s")?;
            for f in figures {
                outln!("{:<36} {:>10} {:>9.2} {:>12.0} {:>9.1}", f.variant, f.records, f.wall_s, f.records_per_s, f.mb_per_s)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
