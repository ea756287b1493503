//! The executor: one thread per stage, bounded crossbeam channels between them (a slow
//! consumer holds a fast producer back), a shared cancel token that the first failure or
//! Ctrl-C sets, every thread joined and every error reported, counters per stage.

use std::collections::BTreeMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use longrl_backends::DeviceSpec;
use longrl_stdlib::metrics::Metrics;
use longrl_stdlib::stage::StageCounters;
use longrl_stdlib::{CancelToken, Item, PortSpec, Registry, StageContext, StageError, StageFactory, StageIo};
use serde_json::Value;

use crate::dataflow::plan::{Node, ValidPlan};

/// How a run is set up.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Relative input paths resolve here.
    pub base_dir: PathBuf,
    /// Where outputs go; `None` runs without a run directory (tests, benchmarks).
    pub run_dir: Option<PathBuf>,
    pub seed: u64,
    pub device: DeviceSpec,
    /// Items each edge's queue holds before its producer waits.
    pub channel_capacity: usize,
    pub metrics: Metrics,
    /// The run continues an earlier attempt (`--resume`) in the same run directory.
    pub resuming: bool,
}

impl RunOptions {
    /// Defaults for running a plan in `base_dir` with no run directory.
    pub fn in_dir(base_dir: impl Into<PathBuf>) -> Self {
        Self {
            base_dir: base_dir.into(),
            run_dir: None,
            seed: 0,
            device: DeviceSpec::cpu(),
            channel_capacity: 64,
            metrics: Metrics::discard(),
            resuming: false,
        }
    }
}

/// How one stage ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageStatus {
    Ok,
    Failed,
    /// Stopped because another stage failed or the run was interrupted.
    Cancelled,
}

/// What a stage did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageReport {
    pub node: usize,
    /// The stage's registry name.
    pub stage: String,
    pub label: String,
    pub line: usize,
    pub status: StageStatus,
    pub items_in: u64,
    pub items_out: u64,
    pub wall_s: f64,
    /// The stage's own figures (counts, rates, paths).
    pub summary: serde_json::Map<String, Value>,
    pub error: Option<String>,
}

/// The outcome of a whole run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub stages: Vec<StageReport>,
    pub wall_s: f64,
    pub interrupted: bool,
}

impl RunReport {
    pub fn succeeded(&self) -> bool {
        !self.interrupted && self.stages.iter().all(|s| s.status == StageStatus::Ok)
    }

    /// One paragraph naming every failed stage and its error.
    pub fn failure_message(&self) -> Option<String> {
        let failed: Vec<&StageReport> = self.stages.iter().filter(|s| s.status == StageStatus::Failed).collect();
        let cancelled = self.stages.iter().filter(|s| s.status == StageStatus::Cancelled).count();
        if failed.is_empty() && !self.interrupted {
            return None;
        }
        let mut message = String::new();
        if self.interrupted {
            message.push_str("the run was interrupted");
        }
        for (i, stage) in failed.iter().enumerate() {
            if i > 0 || self.interrupted {
                message.push_str("; ");
            }
            message.push_str(&format!(
                "stage {} (recipe line {}) failed: {}",
                stage.label,
                stage.line,
                stage.error.as_deref().unwrap_or("unknown error")
            ));
        }
        if cancelled > 0 {
            let other = if failed.is_empty() { "" } else { "other " };
            message.push_str(&format!(" ({cancelled} {other}stage{} stopped)", if cancelled == 1 { "" } else { "s" }));
        }
        Some(message)
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<20} {:>9} {:>10} {:>10} {:>9}", "stage", "status", "items in", "items out", "wall s")?;
        for s in &self.stages {
            let status = match s.status {
                StageStatus::Ok => "ok",
                StageStatus::Failed => "FAILED",
                StageStatus::Cancelled => "stopped",
            };
            writeln!(f, "{:<20} {:>9} {:>10} {:>10} {:>9.2}", s.label, status, s.items_in, s.items_out, s.wall_s)?;
        }
        write!(f, "total wall time {:.2} s", self.wall_s)
    }
}

/// Why a run did not start.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    #[error("stage `{0}` is not registered")]
    UnknownStage(String),
    #[error("could not start a thread for stage {label}: {source}")]
    Spawn {
        label: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs a validated plan to completion. Returns the report of every stage; a failed stage
/// makes the report unsuccessful (see [`RunReport::failure_message`]).
pub fn execute(plan: &ValidPlan, registry: &Registry, options: &RunOptions, cancel: &CancelToken) -> Result<RunReport, ExecuteError> {
    let started = Instant::now();
    let mut channels = Channels::wire(plan, options.channel_capacity.max(1));
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<(usize, StageReport)>();
    let mut handles = Vec::new();
    for node in &plan.nodes {
        let factory = registry.get(&node.stage).ok_or_else(|| ExecuteError::UnknownStage(node.stage.clone()))?;
        let handle = spawn_stage(plan, node, factory, channels.ports(plan, node, factory.as_ref()), options, &done_tx, cancel).map_err(
            |source| {
                cancel.cancel();
                ExecuteError::Spawn { label: node.label(), source }
            },
        )?;
        handles.push(handle);
    }
    drop(done_tx);
    // The executor's own senders would keep channels open: drop them so ends propagate.
    drop(channels);
    Ok(finish(plan, &done_rx, handles, cancel, started))
}

/// One bounded channel per edge. A port fed by several edges reads them in turn, in recipe
/// order (`FanIn`), so its order does not depend on the threads' timing.
struct Channels {
    /// The receivers not yet handed to a stage, by (node, input port).
    receivers: BTreeMap<(usize, &'static str), Vec<Receiver<Item>>>,
    /// One sender per edge, in the plan's edge order.
    senders: Vec<Sender<Item>>,
}

/// A stage's input ports with their receivers and output ports with their senders.
type StagePorts = (Vec<(PortSpec, Vec<Receiver<Item>>)>, Vec<(PortSpec, Vec<Sender<Item>>)>);

impl Channels {
    fn wire(plan: &ValidPlan, capacity: usize) -> Self {
        let mut receivers: BTreeMap<(usize, &'static str), Vec<Receiver<Item>>> = BTreeMap::new();
        let mut senders = Vec::with_capacity(plan.edges.len());
        for edge in &plan.edges {
            let (tx, rx) = bounded(capacity);
            receivers.entry((edge.to, edge.to_port)).or_default().push(rx);
            senders.push(tx);
        }
        Self { receivers, senders }
    }

    /// Takes `node`'s receivers and clones the senders of the edges leaving it.
    fn ports(&mut self, plan: &ValidPlan, node: &Node, factory: &dyn StageFactory) -> StagePorts {
        let inputs =
            factory.inputs().iter().map(|port| (*port, self.receivers.remove(&(node.id, port.name)).unwrap_or_default())).collect();
        let outputs = factory
            .outputs()
            .iter()
            .map(|port| {
                let senders = plan
                    .edges
                    .iter()
                    .zip(&self.senders)
                    .filter(|(e, _)| e.from == node.id && e.from_port == port.name)
                    .map(|(_, tx)| tx.clone())
                    .collect();
                (*port, senders)
            })
            .collect();
        (inputs, outputs)
    }
}

/// Starts `node`'s thread: it builds and runs the stage, turns a panic into a failure, sets
/// the cancel token when it fails, and sends its report on `done`.
fn spawn_stage(
    plan: &ValidPlan,
    node: &Node,
    factory: &Arc<dyn StageFactory>,
    (inputs, outputs): StagePorts,
    options: &RunOptions,
    done: &Sender<(usize, StageReport)>,
    cancel: &CancelToken,
) -> std::io::Result<JoinHandle<()>> {
    let label = node.label();
    let ctx = StageContext {
        base_dir: options.base_dir.clone(),
        run_dir: options.run_dir.clone(),
        label: format!("{label} ({}:{})", plan.recipe, node.position.line),
        seed: options.seed,
        node: node.id,
        closures: Arc::clone(&plan.closures),
        device: options.device,
        resuming: options.resuming,
    };
    let counters = Arc::new(StageCounters::default());
    let io = StageIo::new(label.clone(), inputs, outputs, cancel.clone(), Arc::clone(&counters), options.metrics.clone());
    let factory = Arc::clone(factory);
    let stage_options = node.options.clone();
    let done = done.clone();
    let stage_cancel = cancel.clone();
    let (node_id, line, stage_name) = (node.id, node.position.line, node.stage.clone());
    std::thread::Builder::new().name(label.clone()).spawn(move || {
        let span = tracing::info_span!("stage", name = %label);
        let _enter = span.enter();
        let stage_started = Instant::now();
        let mut io = io;
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let stage = factory.build(&stage_options, &ctx)?;
            stage.run(&mut io)
        }));
        let result = match outcome {
            Ok(result) => result,
            Err(payload) => Err(StageError::Failed(format!("internal error (panic): {}", panic_text(&payload)))),
        };
        let (status, error) = match result {
            Ok(()) => (StageStatus::Ok, None),
            Err(err) if err.is_cancelled() || (stage_cancel.is_cancelled() && is_echo(&err)) => (StageStatus::Cancelled, None),
            Err(err) => {
                stage_cancel.cancel();
                tracing::error!(error = %err, "stage failed");
                (StageStatus::Failed, Some(err.to_string()))
            }
        };
        let report = StageReport {
            node: node_id,
            stage: stage_name,
            label,
            line,
            status,
            items_in: counters.items_in.load(Ordering::Relaxed),
            items_out: counters.items_out.load(Ordering::Relaxed),
            wall_s: stage_started.elapsed().as_secs_f64(),
            summary: io.into_summary(),
            error,
        };
        // Dropping `io` (inside into_summary) closed this stage's outputs.
        let _ = done.send((node_id, report));
    })
}

/// Gathers every stage's report. A stage still busy after the grace period (inside one long
/// computation or a request) is left behind: its report says so, and the process exit ends
/// its thread.
fn finish(
    plan: &ValidPlan,
    done: &Receiver<(usize, StageReport)>,
    handles: Vec<JoinHandle<()>>,
    cancel: &CancelToken,
    started: Instant,
) -> RunReport {
    let mut reports = collect_reports(done, plan.nodes.len(), cancel);
    let missing: Vec<&Node> = plan.nodes.iter().filter(|n| !reports.contains_key(&n.id)).collect();
    for node in missing {
        tracing::warn!(stage = %node.label(), "the stage did not stop within {} s of the stop; leaving it behind", STOP_GRACE.as_secs());
        reports.insert(node.id, abandoned(node, started));
    }
    for handle in handles.into_iter().filter(|h| h.is_finished()) {
        let _ = handle.join();
    }
    let interrupted = cancel.is_cancelled() && reports.values().all(|r| r.status != StageStatus::Failed);
    RunReport { stages: reports.into_values().collect(), wall_s: started.elapsed().as_secs_f64(), interrupted }
}

/// How long stages get to wind down once the run is stopped (a failure, Ctrl-C, SIGTERM).
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// The stages' reports as they finish: all of them, or those in by [`STOP_GRACE`] after the
/// run was stopped.
fn collect_reports(done_rx: &Receiver<(usize, StageReport)>, stages: usize, cancel: &CancelToken) -> BTreeMap<usize, StageReport> {
    let mut reports = BTreeMap::new();
    let mut stopped_at: Option<Instant> = None;
    while reports.len() < stages {
        match done_rx.recv_timeout(Duration::from_millis(100)) {
            Ok((id, report)) => {
                reports.insert(id, report);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
        if cancel.is_cancelled() && stopped_at.get_or_insert_with(Instant::now).elapsed() >= STOP_GRACE {
            break;
        }
    }
    reports
}

/// The report of a stage that did not stop in time.
fn abandoned(node: &Node, started: Instant) -> StageReport {
    StageReport {
        node: node.id,
        stage: node.stage.clone(),
        label: node.label(),
        line: node.position.line,
        status: StageStatus::Cancelled,
        items_in: 0,
        items_out: 0,
        wall_s: started.elapsed().as_secs_f64(),
        summary: serde_json::Map::new(),
        error: Some(format!("did not stop within {} s of the stop; left behind", STOP_GRACE.as_secs())),
    }
}

/// Errors a stage raises only because its neighbours stopped (a closed input mid-stream).
fn is_echo(err: &StageError) -> bool {
    matches!(err, StageError::Failed(msg) if msg.contains("closed before"))
}

fn panic_text(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}
