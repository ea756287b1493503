//! The `longrl` binary: run, check and draw recipes, list stages, benchmark.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use longrl_backends::{BackendKind, DeviceSpec};
use longrl_engine::executor::RunOptions;
use longrl_engine::recipe::parse_set;
use longrl_engine::rundir::RunDir;
use longrl_engine::{CheckError, Params, check_recipe, execute};
use longrl_stdlib::{CancelToken, Registry};

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
    /// Serve a model over the OpenAI-compatible chat API (so it can be a judge).
    Serve(ServeArgs),
    /// Score responses in a JSON Lines file (`response`, `gold`, `kind`): adds `score`.
    Score(ScoreArgs),
    /// Rebuild a run's report.html (plots of its metrics) from its directory.
    Report {
        /// The run directory, e.g. runs/<name>.
        run_dir: PathBuf,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json with a chat template).
    #[arg(long)]
    model: PathBuf,
    /// Port; 0 picks a free one (printed on the first line).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Address to bind (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 4096)]
    max_tokens_cap: usize,
    /// Stop after this many requests (default: serve until killed).
    #[arg(long)]
    max_requests: Option<usize>,
    #[arg(long, default_value = "cpu", value_parser = parse_backend)]
    backend: BackendKind,
    #[arg(long, default_value_t = 0)]
    device: usize,
}

#[derive(Args, Debug)]
struct ScoreArgs {
    /// JSON Lines with `response`, `gold` (string or list) and `kind` (text, number, choice).
    file: PathBuf,
    /// How text answers compare: exact, contains or f1.
    #[arg(long, default_value = "contains")]
    text_match: String,
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
    /// Compute backend.
    #[arg(long, default_value = "cpu", value_parser = parse_backend)]
    backend: BackendKind,
    /// Device index within the backend.
    #[arg(long, default_value_t = 0)]
    device: usize,
}

#[derive(Args, Debug)]
struct RecipeArgs {
    /// The recipe file (.rhai).
    recipe: PathBuf,
    /// Set a recipe parameter read by `param("key", default)`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The recipe file (.rhai). With --resume it may be left out: the run's own copy is used.
    recipe: Option<PathBuf>,
    /// Set a recipe parameter read by `param("key", default)`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue a killed run in its directory: finished stages are not redone, interrupted
    /// ones restart from their last checkpoint. Refused if the recipe's plan changed.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Name of the run directory (default: recipe name and time).
    #[arg(long)]
    name: Option<String>,
    /// Where run directories are created.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Compute backend.
    #[arg(long, default_value = "cpu", value_parser = parse_backend)]
    backend: BackendKind,
    /// Device index within the backend.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Seed of every random choice in the run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Items each edge queues before its producer waits.
    #[arg(long, default_value_t = 64)]
    channel_capacity: usize,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Model throughput: prefill, decode (batch 1 and a group), forward+backward; and with
    /// --memory, peak memory of prefills of growing length on the tiny preset.
    Model {
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
        #[arg(long, default_value = "cpu", value_parser = parse_backend)]
        backend: BackendKind,
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
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
    /// (internal) one prefill of --len tokens; prints peak memory.
    #[command(hide = true)]
    PrefillMemory {
        #[arg(long)]
        len: usize,
        #[arg(long, default_value_t = 4096)]
        vocab: usize,
    },
    /// Records per second through jsonl -> filter -> write_jsonl, with and without tokenization.
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
    },
}

fn parse_backend(text: &str) -> Result<BackendKind, String> {
    text.parse().map_err(|e: longrl_backends::BackendError| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,longrl_engine=info,longrl_stdlib=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let registry = Registry::standard();
    match cli.command {
        Command::Run(args) => run(args, &registry),
        Command::Check(args) => {
            let Some((_, plan)) = checked(&args, &registry)? else { return Ok(ExitCode::FAILURE) };
            println!("{} is valid: {} stages, {} edges", args.recipe.display(), plan.nodes.len(), plan.edges.len());
            print!("{}", plan.to_text());
            print_warnings(&plan);
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph { recipe, dot } => {
            let Some((_, plan)) = checked(&recipe, &registry)? else { return Ok(ExitCode::FAILURE) };
            print!("{}", if dot { plan.to_dot() } else { plan.to_text() });
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { run_dir } => {
            let path = longrl_engine::report::write_report(&run_dir)?;
            println!("{}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Stages { name } => {
            print_stages(&registry, name.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            let options = longrl_engine::serve::ServeOptions {
                model: args.model,
                host: args.host,
                port: args.port,
                max_tokens_cap: args.max_tokens_cap,
                max_requests: args.max_requests,
            };
            longrl_backends::dispatch(DeviceSpec::new(args.backend, args.device), options)??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Score(args) => {
            use longrl_stdlib::reward::hybrid::{JudgeWhen, Reward};
            let text: longrl_stdlib::reward::TextMatch = serde_json::from_value(serde_json::Value::String(args.text_match.clone()))
                .map_err(|_| anyhow::anyhow!("--text-match must be exact, contains or f1"))?;
            let rule = longrl_stdlib::reward::RuleConfig { require_think_end: args.require_think_end, text, ..Default::default() };
            let mut reward = Reward::rule_only(rule);
            if let Some(url) = args.judge_url {
                let config = longrl_stdlib::reward::judge::JudgeConfig {
                    url,
                    model: args.judge_model,
                    api_key_env: args.judge_api_key_env,
                    concurrency: args.judge_concurrency,
                    max_requests_per_s: 0.0,
                    retries: 3,
                    backoff_ms: 500,
                    timeout_s: 60.0,
                    max_tokens: 512,
                };
                reward.judge = Some(std::sync::Arc::new(longrl_stdlib::reward::judge::Judge::new(config)?));
                reward.judge_when = if args.judge_always { JudgeWhen::Always } else { JudgeWhen::Miss };
            }
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            longrl_engine::score::score_file(&args.file, &reward, &mut out)?;
            std::io::Write::flush(&mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(args) => {
            let request = longrl_engine::generate::GenerateRequest {
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
            let text = longrl_backends::dispatch(DeviceSpec::new(args.backend, args.device), request)??;
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Model {
            preset,
            vocab,
            prompt_len,
            new_tokens,
            group,
            train_batch,
            train_seq,
            memory,
            backend,
            device,
        }) => {
            let task =
                longrl_engine::bench::ModelBench { preset: preset.clone(), vocab, prompt_len, new_tokens, group, train_batch, train_seq };
            let figures = longrl_backends::dispatch(DeviceSpec::new(backend, device), task)?.map_err(anyhow::Error::msg)?;
            println!("model bench: preset {preset}, vocab {vocab}, backend {backend}");
            for f in figures {
                println!("  {:<52} {:>12.1} {}", f.name, f.value, f.unit);
            }
            if !memory.is_empty() {
                println!("prefill peak memory (tiny preset, fresh process each):");
                let exe = std::env::current_exe().context("cannot find the longrl executable")?;
                for len in memory {
                    let out = std::process::Command::new(&exe)
                        .args(["bench", "prefill-memory", "--len", &len.to_string(), "--vocab", &vocab.to_string()])
                        .output()
                        .context("cannot start the memory probe")?;
                    if !out.status.success() {
                        bail!("prefill of {len} tokens failed: {}", String::from_utf8_lossy(&out.stderr));
                    }
                    print!("  {len:>7} tokens: {}", String::from_utf8_lossy(&out.stdout));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Judge { requests, delay_ms, concurrency }) => {
            let figures = longrl_engine::bench::judge_throughput(requests, delay_ms, &concurrency).map_err(anyhow::Error::msg)?;
            println!("judge pool: {requests} requests, server delay {delay_ms} ms");
            let base = figures.first().map_or(1.0, |f| f.1);
            for (c, rate) in figures {
                println!("  concurrency {c:>3}: {rate:>8.1} requests/s ({:.1}x)", rate / base);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::PrefillMemory { len, vocab }) => {
            let (peak_mib, wall) = longrl_engine::bench::prefill_peak_memory(len, vocab).map_err(anyhow::Error::msg)?;
            println!("peak RSS {peak_mib:.0} MiB, prefill {wall:.1} s ({:.0} tokens/s)", len as f64 / wall);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Pipeline { records, words, tokenizer }) => {
            let figures = longrl_engine::bench::pipeline(records, words, &tokenizer).map_err(anyhow::Error::msg)?;
            println!("pipeline jsonl -> filter -> write_jsonl, {records} records of {words} words");
            println!("{:<32} {:>10} {:>9} {:>12} {:>9}", "variant", "records", "wall s", "records/s", "MB/s");
            for f in figures {
                println!("{:<32} {:>10} {:>9.2} {:>12.0} {:>9.1}", f.variant, f.records, f.wall_s, f.records_per_s, f.mb_per_s);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn params(args: &RecipeArgs) -> Result<Params> {
    let mut params = Params::new();
    for item in &args.set {
        let (key, value) = parse_set(item).map_err(anyhow::Error::msg)?;
        params.insert(key, value);
    }
    Ok(params)
}

/// A valid plan, or `None` after printing every problem.
fn checked(args: &RecipeArgs, registry: &Registry) -> Result<Option<(String, longrl_engine::ValidPlan)>> {
    let base_dir = std::env::current_dir().context("cannot read the working directory")?;
    match check_recipe(&args.recipe, registry, &params(args)?, &base_dir) {
        Ok(found) => Ok(Some(found)),
        Err(CheckError::Problems(problems)) => {
            eprint!("error: {problems}");
            Ok(None)
        }
        Err(other) => Err(other.into()),
    }
}

fn print_warnings(plan: &longrl_engine::ValidPlan) {
    for warning in &plan.warnings {
        eprintln!("warning: {}:{}:{}: {}", plan.recipe, warning.position.line, warning.position.column, warning.message);
    }
}

fn run(args: RunArgs, registry: &Registry) -> Result<ExitCode> {
    if let Some(resume) = &args.resume {
        return resume_run(&args, resume, registry);
    }
    let Some(recipe) = args.recipe.clone() else { bail!("give a recipe to run (or --resume RUN_DIR)") };
    let recipe_args = RecipeArgs { recipe, set: args.set.clone() };
    let Some((source, plan)) = checked(&recipe_args, registry)? else { return Ok(ExitCode::FAILURE) };
    print_warnings(&plan);
    let device = DeviceSpec::new(args.backend, args.device);
    longrl_backends::probe(device)?;
    let run_dir = RunDir::create(&args.runs_dir, args.name.as_deref(), &recipe_args.recipe)?;
    let info = serde_json::json!({
        "recipe": recipe_args.recipe.display().to_string(),
        "params": params(&recipe_args)?,
        "backend": args.backend.as_str(),
        "device": device.to_string(),
        "seed": args.seed,
        "longrl_version": env!("CARGO_PKG_VERSION"),
    });
    run_dir.record_inputs(&source, &plan, info)?;
    eprintln!("run directory: {}", run_dir.path.display());
    execute_in(plan, registry, run_dir, device, args.seed, args.channel_capacity)
}

/// `longrl run --resume DIR`: the same plan again, in the same directory, with the metrics
/// of unfinished work dropped back to each stage's last checkpoint.
fn resume_run(args: &RunArgs, dir: &Path, registry: &Registry) -> Result<ExitCode> {
    let run_dir = RunDir::open(dir)?;
    let info: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("run.json"))
            .with_context(|| format!("{}: cannot read the run's settings", dir.join("run.json").display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", dir.join("run.json").display()))?;
    let recipe = args.recipe.clone().unwrap_or_else(|| dir.join("recipe.rhai"));
    let mut set: Vec<String> =
        info["params"].as_object().map(|params| params.iter().map(|(k, v)| format!("{k}={v}")).collect()).unwrap_or_default();
    set.extend(args.set.iter().cloned());
    let recipe_args = RecipeArgs { recipe, set };
    let Some((_, plan)) = checked(&recipe_args, registry)? else { return Ok(ExitCode::FAILURE) };
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("plan.json"))
            .with_context(|| format!("{}: cannot read the run's plan", dir.join("plan.json").display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", dir.join("plan.json").display()))?;
    let changes = longrl_engine::resume::plan_changes(&saved, &plan.to_json());
    if !changes.is_empty() {
        bail!(
            "cannot resume {}: the recipe's plan changed since the run started, so its checkpoints do not fit:\n  {}\n(start a new run instead)",
            dir.display(),
            changes.join("\n  ")
        );
    }
    let backend = info["backend"].as_str().map(parse_backend).transpose().map_err(anyhow::Error::msg)?.unwrap_or(args.backend);
    let device = DeviceSpec::new(backend, info["device"].as_str().and_then(|d| d.rsplit(':').next()?.parse().ok()).unwrap_or(args.device));
    longrl_backends::probe(device)?;
    let seed = info["seed"].as_u64().unwrap_or(args.seed);
    let labels: Vec<String> = plan.nodes.iter().map(|n| n.label()).collect();
    let kept = longrl_engine::resume::rewind_metrics(dir, &labels)?;
    eprintln!("resuming {} ({kept} metrics lines kept)", dir.display());
    execute_in(plan, registry, run_dir, device, seed, args.channel_capacity)
}

/// The longest report.html goes without a rebuild during a run.
const REPORT_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);

fn execute_in(
    plan: longrl_engine::ValidPlan,
    registry: &Registry,
    run_dir: RunDir,
    device: DeviceSpec,
    seed: u64,
    channel_capacity: usize,
) -> Result<ExitCode> {
    let cancel = CancelToken::new();
    {
        let cancel = cancel.clone();
        ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: stopping every stage (press Ctrl-C again to kill)");
            if cancel.is_cancelled() {
                std::process::exit(130);
            }
            cancel.cancel();
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let options = RunOptions {
        base_dir: std::env::current_dir().context("cannot read the working directory")?,
        run_dir: Some(run_dir.path.clone()),
        seed,
        device,
        channel_capacity,
        metrics: run_dir.metrics()?,
    };
    // report.html is refreshed after each checkpoint a stage writes (and at least every
    // REPORT_REFRESH), and written once more at the end.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let refresher = {
        let (running, dir) = (std::sync::Arc::clone(&running), run_dir.path.clone());
        std::thread::spawn(move || {
            let mut last = std::time::Instant::now();
            let mut seen = longrl_engine::report::checkpoint_stamp(&dir);
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let stamp = longrl_engine::report::checkpoint_stamp(&dir);
                if stamp != seen || last.elapsed() >= REPORT_REFRESH {
                    (seen, last) = (stamp, std::time::Instant::now());
                    if let Err(e) = longrl_engine::report::write_report(&dir) {
                        tracing::debug!("report refresh skipped: {e}");
                    }
                }
            }
        })
    };
    let report = execute(&plan, registry, &options, &cancel);
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = refresher.join();
    let report = report?;
    run_dir.record_report(&report)?;
    match longrl_engine::report::write_report(&run_dir.path) {
        Ok(path) => eprintln!("report: {}", path.display()),
        Err(e) => eprintln!("warning: the report could not be written: {e}"),
    }
    eprintln!("{report}");
    let mut tables = Vec::new();
    for stage in &report.stages {
        let mut summary = stage.summary.clone();
        if let Some(serde_json::Value::String(table)) = summary.remove("table") {
            tables.push(table);
        }
        summary.remove("rows");
        if !summary.is_empty() {
            eprintln!("  {}: {}", stage.label, serde_json::Value::Object(summary));
        }
    }
    for table in tables {
        println!("\n{table}");
    }
    match report.failure_message() {
        None => {
            eprintln!("done: {}", run_dir.path.display());
            Ok(ExitCode::SUCCESS)
        }
        Some(message) => bail!("{message}"),
    }
}

fn print_stages(registry: &Registry, only: Option<&str>) -> Result<()> {
    if let Some(name) = only {
        if registry.get(name).is_none() {
            bail!("no stage named `{name}` (stages: {})", registry.names().collect::<Vec<_>>().join(", "));
        }
    }
    for factory in registry.iter().filter(|f| only.is_none_or(|n| n == f.name())) {
        println!("{} - {}", factory.name(), factory.summary());
        let ports = |label: &str, list: &[longrl_stdlib::PortSpec]| {
            for p in list {
                let need = if label == "input" && !p.required { " (optional)" } else { "" };
                println!("    {label} {:<12} {:<8} {}{need}", p.name, p.kind.to_string(), p.doc);
            }
        };
        ports("input", factory.inputs());
        ports("output", factory.outputs());
        if !factory.positional().is_empty() {
            println!("    positional: {}", factory.positional().join(", "));
        }
        for option in factory.options() {
            let default = match (&option.default, option.required) {
                (Some(d), _) => format!(" = {d}"),
                (None, true) => " (required)".to_string(),
                (None, false) => String::new(),
            };
            println!("    option {:<18} {}{default}", option.name, option.ty);
            if !option.doc.is_empty() {
                println!("        {}", option.doc);
            }
        }
        println!();
    }
    Ok(())
}
