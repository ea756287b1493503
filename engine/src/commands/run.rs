//! `longrl run`, `longrl check` and `longrl graph`: check a recipe, then execute it into a
//! new run directory (or continue a killed run with `--resume`), refreshing `report.html`
//! while it runs and printing the stages' tables at the end.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use longrl_backends::{BackendKind, DeviceSpec};
use longrl_stdlib::{CancelToken, Registry};

use crate::commands::report::{checkpoint_stamp, write_report};
use crate::dataflow::executor::RunOptions;
use crate::dataflow::params::{Origin, read_params_file};
use crate::dataflow::recipe::parse_set;
use crate::dataflow::resume::{plan_changes, remove_leftovers, rewind_metrics};
use crate::dataflow::rundir::RunDir;
use crate::dataflow::{CheckError, Params, ValidPlan, check_recipe, execute};

/// A recipe and its parameters.
#[derive(Args, Debug)]
pub struct RecipeArgs {
    /// The recipe file (.rhai).
    pub recipe: PathBuf,
    /// Set a recipe parameter read by `param("key", default)`; repeatable; overrides --params.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = check_set)]
    pub set: Vec<String>,
    /// Read recipe parameters from a YAML file of `name: value` lines (--set overrides them).
    #[arg(long = "params", value_name = "FILE.yaml")]
    pub params: Option<PathBuf>,
}

/// Checks a `--set KEY=VALUE` on the command line (a malformed one is a usage error).
fn check_set(text: &str) -> Result<String, String> {
    parse_set(text).map(|_| text.to_string())
}

/// Options of `longrl run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The recipe file (.rhai). With --resume it may be left out: the run's own copy is used.
    pub recipe: Option<PathBuf>,
    /// Set a recipe parameter read by `param("key", default)`; repeatable; overrides --params.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = check_set)]
    pub set: Vec<String>,
    /// Read recipe parameters from a YAML file of `name: value` lines (--set overrides them).
    #[arg(long = "params", value_name = "FILE.yaml")]
    pub params: Option<PathBuf>,
    /// Continue a killed run in its directory: finished stages are not redone, interrupted
    /// ones restart from their last checkpoint. Refused if the recipe's plan changed.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Name of the run directory (default: recipe name and time).
    #[arg(long)]
    pub name: Option<String>,
    /// Where run directories are created.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Compute backend.
    #[arg(long, default_value = "cpu", value_parser = parse_backend)]
    pub backend: BackendKind,
    /// Device index within the backend.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Seed of every random choice in the run (default 0; a resumed run keeps its own).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Items each edge queues before its producer waits.
    #[arg(long, default_value_t = 64)]
    pub channel_capacity: usize,
}

/// Parses `--backend`.
pub fn parse_backend(text: &str) -> Result<BackendKind, String> {
    text.parse().map_err(|e: longrl_backends::BackendError| e.to_string())
}

/// `longrl check`: the plan, or every problem.
pub fn check(args: &RecipeArgs, registry: &Registry) -> Result<ExitCode> {
    let Some((_, plan)) = checked(args, &params(args)?, registry)? else { return Ok(ExitCode::FAILURE) };
    crate::outln!("{} is valid: {} stages, {} edges", args.recipe.display(), plan.nodes.len(), plan.edges.len())?;
    crate::out!("{}", plan.to_text())?;
    print_warnings(&plan);
    Ok(ExitCode::SUCCESS)
}

/// `longrl graph`: the plan as text or DOT.
pub fn graph(args: &RecipeArgs, dot: bool, registry: &Registry) -> Result<ExitCode> {
    let Some((_, plan)) = checked(args, &params(args)?, registry)? else { return Ok(ExitCode::FAILURE) };
    crate::out!("{}", if dot { plan.to_dot() } else { plan.to_text() })?;
    Ok(ExitCode::SUCCESS)
}

/// `longrl run`.
pub fn run(args: RunArgs, registry: &Registry) -> Result<ExitCode> {
    if let Some(resume) = &args.resume {
        return resume_run(&args, resume, registry);
    }
    let Some(recipe) = args.recipe.clone() else { bail!("give a recipe to run (or --resume RUN_DIR)") };
    let recipe_args = RecipeArgs { recipe, set: args.set.clone(), params: args.params.clone() };
    let params = params(&recipe_args)?;
    let Some((source, plan)) = checked(&recipe_args, &params, registry)? else { return Ok(ExitCode::FAILURE) };
    print_warnings(&plan);
    let device = DeviceSpec::new(args.backend, args.device);
    longrl_backends::probe(device)?;
    let run_dir = RunDir::create(&args.runs_dir, args.name.as_deref(), &recipe_args.recipe)?;
    let _lock = run_dir.lock()?;
    let info = serde_json::json!({
        "recipe": recipe_args.recipe.display().to_string(),
        "params": params.values(),
        "params_file": recipe_args.params.as_ref().map(|p| p.display().to_string()),
        "backend": args.backend.as_str(),
        "device": device.to_string(),
        "seed": args.seed.unwrap_or(0),
        "longrl_version": env!("CARGO_PKG_VERSION"),
    });
    run_dir.record_inputs(&source, &plan, info)?;
    crate::errln!("run directory: {}", run_dir.path.display());
    execute_in(plan, registry, run_dir, device, args.seed.unwrap_or(0), args.channel_capacity, false)
}

/// The recipe's parameters: the `--params` file's values, then the `--set` ones over them.
fn params(args: &RecipeArgs) -> Result<Params> {
    let mut params = match &args.params {
        Some(path) => read_params_file(path).map_err(anyhow::Error::msg)?,
        None => Params::new(),
    };
    for item in &args.set {
        let (key, value) = parse_set(item).map_err(anyhow::Error::msg)?;
        params.insert(key, value);
    }
    Ok(params)
}

/// A valid plan, or `None` after printing every problem.
fn checked(args: &RecipeArgs, params: &Params, registry: &Registry) -> Result<Option<(String, ValidPlan)>> {
    let base_dir = std::env::current_dir().context("cannot read the working directory")?;
    match check_recipe(&args.recipe, registry, params, &base_dir) {
        Ok(found) => Ok(Some(found)),
        Err(CheckError::Problems(problems)) => {
            crate::errln!("error: {}", problems.to_string().trim_end());
            Ok(None)
        }
        Err(other) => Err(other.into()),
    }
}

fn print_warnings(plan: &ValidPlan) {
    for warning in &plan.warnings {
        crate::errln!("warning: {}:{}:{}: {}", plan.recipe, warning.position.line, warning.position.column, warning.message);
    }
}

fn read_json(path: &Path, what: &str) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read {what}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// `longrl run --resume DIR`: the same plan again, in the same directory, with the metrics
/// of unfinished work dropped back to each stage's last checkpoint.
fn resume_run(args: &RunArgs, dir: &Path, registry: &Registry) -> Result<ExitCode> {
    let run_dir = RunDir::open(dir)?;
    let _lock = run_dir.lock()?;
    let info = read_json(&dir.join("run.json"), "the run's settings")?;
    let seed = info["seed"].as_u64().unwrap_or(0);
    if let Some(asked) = args.seed {
        bail!(
            "--seed {asked} with --resume: the run {} keeps the seed it started with ({seed}), or its checkpoints would not fit; leave out --seed (or start a new run)",
            dir.display()
        );
    }
    let recipe = args.recipe.clone().unwrap_or_else(|| dir.join("recipe.rhai"));
    let recipe_args = RecipeArgs { recipe, set: args.set.clone(), params: args.params.clone() };
    let recorded = recorded_params(&info);
    let given = params(&recipe_args)?;
    let mut changes = param_changes(&recorded, &given);
    let mut merged = recorded;
    merged.extend(given);
    let Some((_, plan)) = checked(&recipe_args, &merged, registry)? else { return Ok(ExitCode::FAILURE) };
    let saved = read_json(&dir.join("plan.json"), "the run's plan")?;
    changes.extend(plan_changes(&saved, &plan.to_json()));
    if !changes.is_empty() {
        bail!(
            "cannot resume {}: the recipe's plan changed since the run started, so its checkpoints do not fit:\n  {}\n(start a new run instead)",
            dir.display(),
            changes.join("\n  ")
        );
    }
    if finished(dir) {
        bail!(
            "the run {} already finished (its report.json has every stage ok); nothing to resume (start a new run to run it again)",
            dir.display()
        );
    }
    let backend = info["backend"].as_str().map(parse_backend).transpose().map_err(anyhow::Error::msg)?.unwrap_or(args.backend);
    let device = DeviceSpec::new(backend, info["device"].as_str().and_then(|d| d.rsplit(':').next()?.parse().ok()).unwrap_or(args.device));
    longrl_backends::probe(device)?;
    let labels: Vec<String> = plan.nodes.iter().map(|n| n.label()).collect();
    let kept = rewind_metrics(dir, &labels)?;
    let leftovers = remove_leftovers(dir)?;
    let swept = if leftovers > 0 { format!(", {leftovers} half-written files of the killed attempt removed") } else { String::new() };
    crate::errln!("resuming {} ({kept} metrics lines kept{swept})", dir.display());
    execute_in(plan, registry, run_dir, device, seed, args.channel_capacity, true)
}

/// Whether the run's last attempt ended with every stage done (`report.json` is written
/// when an attempt ends; a killed attempt leaves none, or the one before it).
fn finished(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("report.json")) else { return false };
    let Ok(report) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    let stages = report["stages"].as_array().map(Vec::as_slice).unwrap_or_default();
    report["interrupted"] == false && !stages.is_empty() && stages.iter().all(|stage| stage["status"] == "ok")
}

/// The parameters a run recorded in its `run.json` when it started.
fn recorded_params(info: &serde_json::Value) -> Params {
    let mut params = Params::new();
    for (key, value) in info["params"].as_object().into_iter().flatten() {
        params.insert_from(key.clone(), value.clone(), Origin::Recorded);
    }
    params
}

/// Parameters given to `--resume` (by `--set` or `--params`) whose values differ from
/// the ones the run started with.
fn param_changes(recorded: &Params, given: &Params) -> Vec<String> {
    given
        .keys()
        .filter_map(|key| {
            let new = given.get(key)?;
            match recorded.get(key) {
                Some(old) if old == new => None,
                Some(old) => Some(format!("parameter `{key}` changed from {old} to {new} ({})", given.describe(key))),
                None => Some(format!("parameter `{key}` was not set when the run started ({})", given.describe(key))),
            }
        })
        .collect()
}

/// The longest report.html goes without a rebuild during a run.
const REPORT_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// Rebuilds report.html after each checkpoint a stage writes (and at least every
/// [`REPORT_REFRESH`]) until `running` is cleared.
fn spawn_report_refresher(
    dir: PathBuf,
    registry: Registry,
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut last = std::time::Instant::now();
        let mut seen = checkpoint_stamp(&dir);
        while running.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let stamp = checkpoint_stamp(&dir);
            if stamp != seen || last.elapsed() >= REPORT_REFRESH {
                (seen, last) = (stamp, std::time::Instant::now());
                if let Err(e) = write_report(&dir, &registry) {
                    tracing::debug!("report refresh skipped: {e}");
                }
            }
        }
    })
}

/// Ctrl-C (and SIGTERM) set the run's cancel token; a second one exits at once.
fn install_interrupt_handler(cancel: &CancelToken) -> Result<()> {
    let cancel = cancel.clone();
    ctrlc::set_handler(move || {
        crate::errln!("\ninterrupted: stopping every stage (press Ctrl-C again to kill)");
        if cancel.is_cancelled() {
            std::process::exit(130);
        }
        cancel.cancel();
    })
    .context("cannot install the Ctrl-C handler")
}

fn execute_in(
    plan: ValidPlan,
    registry: &Registry,
    run_dir: RunDir,
    device: DeviceSpec,
    seed: u64,
    channel_capacity: usize,
    resuming: bool,
) -> Result<ExitCode> {
    let cancel = CancelToken::new();
    install_interrupt_handler(&cancel)?;
    let options = RunOptions {
        base_dir: std::env::current_dir().context("cannot read the working directory")?,
        run_dir: Some(run_dir.path.clone()),
        seed,
        device,
        channel_capacity,
        metrics: run_dir.metrics()?,
        resuming,
    };
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let refresher = spawn_report_refresher(run_dir.path.clone(), registry.clone(), std::sync::Arc::clone(&running));
    let report = execute(&plan, registry, &options, &cancel);
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = refresher.join();
    let report = report?;
    run_dir.record_report(&report)?;
    match write_report(&run_dir.path, registry) {
        Ok(path) => crate::errln!("report: {}", path.display()),
        Err(e) => crate::errln!("warning: the report could not be written: {e}"),
    }
    crate::errln!("{report}");
    let mut tables = Vec::new();
    for stage in &report.stages {
        let mut summary = stage.summary.clone();
        if let Some(serde_json::Value::String(table)) = summary.remove("table") {
            tables.push(table);
        }
        summary.remove("rows");
        if !summary.is_empty() {
            crate::errln!("  {}: {}", stage.label, serde_json::Value::Object(summary));
        }
    }
    for table in tables {
        crate::outln!("\n{table}")?;
    }
    match report.failure_message() {
        None => {
            crate::errln!("done: {}", run_dir.path.display());
            Ok(ExitCode::SUCCESS)
        }
        Some(message) => bail!("{message}"),
    }
}
