//! The stage contract: typed ports, the items that flow on edges, the I/O handle a running
//! stage reads and writes through (with backpressure and cancellation), and the
//! config -> build -> run lifecycle every stage follows.

use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, SendTimeoutError, Sender};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::StageError;
use crate::fan_in::{Due, FanIn};
use crate::metrics::Metrics;
use crate::options::{OptionDoc, describe_options, parse_options};
use crate::record::{Difficulty, Record};
use crate::reward::Reward;
use crate::script::ScriptFn;

/// What flows on an edge. An edge joins an output port to an input port of the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortKind {
    /// A stream of task records.
    Records,
    /// A model handle (a Hugging Face format directory), usually one per run of the stage.
    Model,
    /// Difficulty reports (per-task group rewards) from an RL phase.
    Reports,
    /// A reward function (rule, judge, script), shared by the stages that score.
    Reward,
}

impl fmt::Display for PortKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Records => "records",
            Self::Model => "model",
            Self::Reports => "reports",
            Self::Reward => "reward",
        })
    }
}

/// One input or output of a stage.
#[derive(Debug, Clone, Copy)]
pub struct PortSpec {
    pub name: &'static str,
    pub kind: PortKind,
    /// An input that must be connected (outputs ignore this).
    pub required: bool,
    pub doc: &'static str,
}

impl PortSpec {
    /// A required port.
    pub const fn required(name: &'static str, kind: PortKind, doc: &'static str) -> Self {
        Self { name, kind, required: true, doc }
    }

    /// An optional input port (or any output port).
    pub const fn optional(name: &'static str, kind: PortKind, doc: &'static str) -> Self {
        Self { name, kind, required: false, doc }
    }
}

/// A trained or loaded model published on a model edge: a directory in Hugging Face format
/// (config.json, model.safetensors, tokenizer.json).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelRef {
    pub dir: PathBuf,
}

/// How hard one task was for the policy that attempted it, sent by RL phases and offline
/// scoring to hard buffers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DifficultyReport {
    pub record: Record,
    pub difficulty: Difficulty,
}

/// An item on an edge. Its variant always matches the edge's [`PortKind`].
#[derive(Debug, Clone)]
pub enum Item {
    Record(Box<Record>),
    Model(ModelRef),
    Report(Box<DifficultyReport>),
    Reward(Arc<Reward>),
}

impl Item {
    /// The kind of edge this item travels on.
    pub fn kind(&self) -> PortKind {
        match self {
            Self::Record(_) => PortKind::Records,
            Self::Model(_) => PortKind::Model,
            Self::Report(_) => PortKind::Reports,
            Self::Reward(_) => PortKind::Reward,
        }
    }
}

/// Shared stop flag: set by the first failing stage or by Ctrl-C; every blocking call in
/// [`StageIo`] checks it, so all threads wind down promptly.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Cancelled)` once cancelled: call it in long loops that do not touch channels.
    pub fn check(&self) -> Result<(), StageError> {
        if self.is_cancelled() { Err(StageError::Cancelled) } else { Ok(()) }
    }

    /// Sleeps `duration`, waking within [`POLL`] once cancelled.
    pub fn sleep(&self, duration: Duration) {
        let until = std::time::Instant::now() + duration;
        while !self.is_cancelled() {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(POLL));
        }
    }
}

/// Per-stage counters, readable by the executor while the stage runs.
#[derive(Debug, Default)]
pub struct StageCounters {
    /// Items received on all input ports.
    pub items_in: AtomicU64,
    /// Items sent on all output ports (an item fanned out to several edges counts once).
    pub items_out: AtomicU64,
}

/// Everything a stage needs to know about where it runs, at check time and at build time.
#[derive(Debug, Clone)]
pub struct StageContext {
    /// Relative input paths resolve against this directory (the working directory).
    pub base_dir: PathBuf,
    /// The run directory; relative output paths resolve here. `None` while checking.
    pub run_dir: Option<PathBuf>,
    /// A readable name for messages: stage name, node id and recipe position.
    pub label: String,
    /// The run's seed; stages derive their own streams from it and their node id.
    pub seed: u64,
    /// Node id within the plan.
    pub node: usize,
    /// Closures captured from the recipe, referenced by options as `{"$closure": n}`.
    pub closures: Arc<Vec<ScriptFn>>,
    /// The compute device the run was started with.
    pub device: longrl_backends::DeviceSpec,
    /// True in a run continued with `--resume`: files in the run directory may be this
    /// run's own from its earlier attempt, and a stage replaces them.
    pub resuming: bool,
}

impl StageContext {
    /// A context for checking a plan, with no run directory.
    pub fn for_check(base_dir: impl Into<PathBuf>) -> Self {
        Self {
            base_dir: base_dir.into(),
            run_dir: None,
            label: String::new(),
            seed: 0,
            node: 0,
            closures: Arc::new(Vec::new()),
            device: longrl_backends::DeviceSpec::default(),
            resuming: false,
        }
    }

    /// An input path: absolute as given, relative to `base_dir` otherwise.
    pub fn input_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() { path.to_path_buf() } else { self.base_dir.join(path) }
    }

    /// An output path: absolute as given, relative to the run directory otherwise.
    pub fn output_path(&self, path: &Path) -> PathBuf {
        match (&self.run_dir, path.is_absolute()) {
            (_, true) | (None, _) => path.to_path_buf(),
            (Some(dir), false) => dir.join(path),
        }
    }

    /// Whether a stage may replace an existing file at `path` (an output path) although its
    /// recipe did not ask to overwrite: only in a resumed run, and only inside the run
    /// directory (no `..` out of it), which no other run shares, so the file is this run's own.
    pub fn owns_existing_output(&self, path: &Path) -> bool {
        self.resuming && self.run_dir.as_ref().is_some_and(|dir| crate::checkpoint::lies_inside(path, dir))
    }

    /// A validation problem if `path` (an input) is not an existing file.
    pub fn require_file(&self, option: &str, path: &Path) -> Option<String> {
        let full = self.input_path(path);
        if full.is_file() {
            None
        } else if full.exists() {
            Some(format!("option `{option}`: {} is not a file", full.display()))
        } else {
            Some(format!("option `{option}`: input file {} does not exist", full.display()))
        }
    }

    /// A validation problem if `path` (an input) is not an existing directory.
    pub fn require_dir(&self, option: &str, path: &Path) -> Option<String> {
        let full = self.input_path(path);
        if full.is_dir() { None } else { Some(format!("option `{option}`: directory {} does not exist", full.display())) }
    }

    /// The closure an option refers to.
    pub fn closure(&self, reference: ClosureRef) -> Result<ScriptFn, StageError> {
        self.closures.get(reference.id).cloned().ok_or_else(|| StageError::Invalid(format!("closure #{} is not defined", reference.id)))
    }
}

/// An option value holding a recipe closure (`|record| ...`); the recipe host stores the
/// closure and writes `{"$closure": n}` in the options. Resolved with
/// [`StageContext::closure`] at build time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClosureRef {
    #[serde(rename = "$closure")]
    pub id: usize,
}

impl schemars::JsonSchema for ClosureRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "closure".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "closure" })
    }
}

/// A running stage's view of its edges.
pub struct StageIo {
    label: String,
    /// Each input port with its edges' queues, in recipe order (see [`FanIn`]).
    inputs: Vec<(PortSpec, FanIn)>,
    outputs: Vec<(PortSpec, Vec<Sender<Item>>)>,
    cancel: CancelToken,
    counters: Arc<StageCounters>,
    metrics: Metrics,
    /// Lines this stage logged to the run's metrics.
    metrics_logged: usize,
    summary: serde_json::Map<String, Value>,
}

/// How long a blocked send or receive waits before it looks at the cancel flag again.
const POLL: Duration = Duration::from_millis(50);

impl StageIo {
    /// Wires a stage: the receivers of every edge into each input port (in recipe order;
    /// none: not connected), the senders of every edge leaving each output port.
    pub fn new(
        label: impl Into<String>,
        inputs: Vec<(PortSpec, Vec<Receiver<Item>>)>,
        outputs: Vec<(PortSpec, Vec<Sender<Item>>)>,
        cancel: CancelToken,
        counters: Arc<StageCounters>,
        metrics: Metrics,
    ) -> Self {
        let inputs = inputs.into_iter().map(|(spec, receivers)| (spec, FanIn::new(receivers))).collect();
        Self { label: label.into(), inputs, outputs, cancel, counters, metrics, metrics_logged: 0, summary: serde_json::Map::new() }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    pub fn counters(&self) -> Arc<StageCounters> {
        Arc::clone(&self.counters)
    }

    /// Logs one line of the run's `metrics.jsonl` for this stage.
    pub fn log_metrics(&mut self, step: u64, fields: serde_json::Map<String, Value>) -> Result<(), StageError> {
        self.metrics.log(&self.label, step, fields)?;
        self.metrics_logged += 1;
        Ok(())
    }

    /// Lines this stage logged with [`StageIo::log_metrics`].
    pub fn metrics_logged(&self) -> usize {
        self.metrics_logged
    }

    /// Figures the stage wants in its end-of-run summary (counts, rates, paths).
    pub fn summary_mut(&mut self) -> &mut serde_json::Map<String, Value> {
        &mut self.summary
    }

    pub fn into_summary(self) -> serde_json::Map<String, Value> {
        self.summary
    }

    /// Whether an input port has an edge.
    pub fn input_connected(&self, port: &str) -> bool {
        self.inputs.iter().any(|(spec, edges)| spec.name == port && edges.is_connected())
    }

    /// Whether an output port has at least one edge.
    pub fn output_connected(&self, port: &str) -> bool {
        self.outputs.iter().any(|(spec, txs)| spec.name == port && !txs.is_empty())
    }

    /// The next item on an input port; `None` once every upstream stage has finished (or
    /// the port is not connected). Several edges into the port take turns in recipe order
    /// (see [`FanIn`]). Blocks, but returns `Cancelled` promptly on a stop.
    pub fn recv(&mut self, port: &str) -> Result<Option<Item>, StageError> {
        let index = self.input_index(port)?;
        Ok(self.recv_from(&[index])?.map(|(_, item)| item))
    }

    /// The next item on whichever of `ports` has one first, with that port's name; `None`
    /// once all of them are closed. Reading several inputs this way cannot deadlock on an
    /// upstream stage that waits for this stage to drain another input. Each port's own
    /// items keep their order.
    pub fn recv_any(&mut self, ports: &[&'static str]) -> Result<Option<(&'static str, Item)>, StageError> {
        let indices = ports.iter().map(|port| self.input_index(port)).collect::<Result<Vec<_>, _>>()?;
        Ok(self.recv_from(&indices)?.map(|(position, item)| (ports[position], item)))
    }

    /// The first due item of the input ports `indices` (checked in that order), with the
    /// position in `indices` of its port; waits on every open edge of them while none is due.
    fn recv_from(&mut self, indices: &[usize]) -> Result<Option<(usize, Item)>, StageError> {
        self.cancel.check()?;
        loop {
            let mut waiting = false;
            for (position, &index) in indices.iter().enumerate() {
                match self.inputs[index].1.take_due() {
                    Due::Item(item) => {
                        self.counters.items_in.fetch_add(1, Ordering::Relaxed);
                        return Ok(Some((position, item)));
                    }
                    Due::Wait => waiting = true,
                    Due::End => {}
                }
            }
            if !waiting {
                self.cancel.check()?;
                return Ok(None);
            }
            self.wait_for_items(indices)?;
        }
    }

    /// Waits (up to one poll) for an item or an end on any open edge of the ports
    /// `indices`, and files it with its port.
    fn wait_for_items(&mut self, indices: &[usize]) -> Result<(), StageError> {
        let open: Vec<(usize, usize, Receiver<Item>)> = indices
            .iter()
            .flat_map(|&index| self.inputs[index].1.open_receivers().into_iter().map(move |(edge, rx)| (index, edge, rx)))
            .collect();
        let mut select = crossbeam_channel::Select::new();
        for (_, _, rx) in &open {
            select.recv(rx);
        }
        let Ok(operation) = select.select_timeout(POLL) else {
            return self.cancel.check();
        };
        let (index, edge, rx) = &open[operation.index()];
        let received = operation.recv(rx).ok();
        let (spec, fan_in) = &mut self.inputs[*index];
        fan_in.accept(*edge, received, spec.name, &self.label);
        Ok(())
    }

    /// The next record on a records port.
    pub fn recv_record(&mut self, port: &str) -> Result<Option<Record>, StageError> {
        match self.recv(port)? {
            None => Ok(None),
            Some(Item::Record(record)) => Ok(Some(*record)),
            Some(other) => Err(self.wrong_item(port, PortKind::Records, &other)),
        }
    }

    /// The next report on a reports port.
    pub fn recv_report(&mut self, port: &str) -> Result<Option<DifficultyReport>, StageError> {
        match self.recv(port)? {
            None => Ok(None),
            Some(Item::Report(report)) => Ok(Some(*report)),
            Some(other) => Err(self.wrong_item(port, PortKind::Reports, &other)),
        }
    }

    /// Sends an item to every edge leaving an output port, waiting while a downstream
    /// queue is full (backpressure). An edge whose consumer has finished is dropped.
    pub fn send(&mut self, port: &str, item: Item) -> Result<(), StageError> {
        self.cancel.check()?;
        let index = self.output_index(port)?;
        debug_assert_eq!(item.kind(), self.outputs[index].0.kind, "item kind must match its port");
        self.counters.items_out.fetch_add(1, Ordering::Relaxed);
        let senders = &mut self.outputs[index].1;
        let mut finished = Vec::new();
        let mut item = Some(item);
        let count = senders.len();
        for (i, tx) in senders.iter().enumerate() {
            // Clone for every edge but the last, which takes the item itself.
            let mut pending = if i + 1 == count {
                item.take().ok_or_else(|| StageError::Failed("item already sent".into()))?
            } else {
                item.clone().ok_or_else(|| StageError::Failed("item already sent".into()))?
            };
            loop {
                match tx.send_timeout(pending, POLL) {
                    Ok(()) => break,
                    Err(SendTimeoutError::Timeout(back)) => {
                        self.cancel.check()?;
                        pending = back;
                    }
                    Err(SendTimeoutError::Disconnected(_)) => {
                        self.cancel.check()?;
                        finished.push(i);
                        break;
                    }
                }
            }
        }
        for i in finished.into_iter().rev() {
            senders.remove(i);
        }
        Ok(())
    }

    pub fn send_record(&mut self, port: &str, record: Record) -> Result<(), StageError> {
        self.send(port, Item::Record(Box::new(record)))
    }

    pub fn send_model(&mut self, port: &str, model: ModelRef) -> Result<(), StageError> {
        self.send(port, Item::Model(model))
    }

    pub fn send_reward(&mut self, port: &str, reward: Arc<Reward>) -> Result<(), StageError> {
        self.send(port, Item::Reward(reward))
    }

    pub fn send_report(&mut self, port: &str, report: DifficultyReport) -> Result<(), StageError> {
        self.send(port, Item::Report(Box::new(report)))
    }

    /// Closes an output port early, so its consumers see the end of the stream.
    pub fn close_output(&mut self, port: &str) -> Result<(), StageError> {
        let index = self.output_index(port)?;
        self.outputs[index].1.clear();
        Ok(())
    }

    fn input_index(&self, port: &str) -> Result<usize, StageError> {
        self.inputs
            .iter()
            .position(|(spec, _)| spec.name == port)
            .ok_or_else(|| StageError::Failed(format!("{}: no input port named `{port}`", self.label)))
    }

    fn output_index(&self, port: &str) -> Result<usize, StageError> {
        self.outputs
            .iter()
            .position(|(spec, _)| spec.name == port)
            .ok_or_else(|| StageError::Failed(format!("{}: no output port named `{port}`", self.label)))
    }

    fn wrong_item(&self, port: &str, expected: PortKind, got: &Item) -> StageError {
        StageError::Failed(format!("{}: input `{port}` expected {expected} but received {}", self.label, got.kind()))
    }
}

/// A built stage, ready to run on its own thread.
pub trait Stage: Send {
    /// Runs to completion: reads inputs until they close, writes outputs, returns when done.
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError>;
}

/// A stage's options: deserialized from the recipe's option map (unknown fields denied),
/// documented by their `///` comments (which `longrl stages` prints), validated, then built.
pub trait StageConfig: DeserializeOwned + schemars::JsonSchema + Send + 'static {
    /// The recipe function name, e.g. `jsonl`.
    const NAME: &'static str;
    /// One line for `longrl stages`.
    const SUMMARY: &'static str;
    const INPUTS: &'static [PortSpec] = &[];
    const OUTPUTS: &'static [PortSpec] = &[];
    /// Option names that plain positional values (strings, numbers) bind to, in order:
    /// `jsonl("data.jsonl")` binds `path`.
    const POSITIONAL: &'static [&'static str] = &[];

    /// Problems the type system cannot see: missing files, inconsistent values.
    fn validate(&self, _ctx: &StageContext) -> Vec<String> {
        Vec::new()
    }

    /// Problems that involve other stages of the plan (a curriculum's chained phases, a
    /// buffer nobody reads), for the node `node` of this stage: `(node id, message)` pairs.
    fn check_plan(_plan: &PlanView, _node: usize) -> Vec<(usize, String)> {
        Vec::new()
    }

    /// Figures this stage adds to `report.html`, from its end-of-run summary.
    fn report_figures(_label: &str, _summary: &serde_json::Map<String, Value>) -> Vec<ReportFigure> {
        Vec::new()
    }

    /// Whether the stage writes files of its own (then [`StageConfig::writes`] names them).
    const WRITES_FILES: bool = false;

    /// The files and directories the stage writes: relative paths are in the run directory.
    /// Plan validation refuses two stages writing the same one.
    fn writes(&self, _ctx: &StageContext) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Turns the options into a runnable stage (loading what it needs).
    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError>;
}

/// A validated plan as a stage's [`StageConfig::check_plan`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct PlanView<'a> {
    pub nodes: &'a [PlanNode<'a>],
    pub edges: &'a [PlanEdge<'a>],
}

/// A stage of the plan: its id, registry name and options.
#[derive(Debug, Clone, Copy)]
pub struct PlanNode<'a> {
    pub id: usize,
    pub stage: &'a str,
    pub options: &'a Value,
}

/// An edge of the plan with both ports resolved.
#[derive(Debug, Clone, Copy)]
pub struct PlanEdge<'a> {
    pub from: usize,
    pub from_port: &'a str,
    pub to: usize,
    pub to_port: &'a str,
}

impl<'a> PlanView<'a> {
    /// The node with this id.
    pub fn node(&self, id: usize) -> Option<&'a PlanNode<'a>> {
        // Nodes come in id order; a search keeps checks of large plans fast.
        match self.nodes.binary_search_by_key(&id, |n| n.id) {
            Ok(at) => self.nodes.get(at),
            Err(_) => self.nodes.iter().find(|n| n.id == id),
        }
    }

    /// Whether node `id` is a stage named `stage`.
    pub fn is(&self, id: usize, stage: &str) -> bool {
        self.node(id).is_some_and(|n| n.stage == stage)
    }

    /// Edges arriving at `node`'s input `port`.
    pub fn into_port(&self, node: usize, port: &'a str) -> impl Iterator<Item = &'a PlanEdge<'a>> + 'a {
        self.edges.iter().filter(move |e| e.to == node && e.to_port == port)
    }

    /// Edges leaving `node`.
    pub fn out_of(&self, node: usize) -> impl Iterator<Item = &'a PlanEdge<'a>> + 'a {
        self.edges.iter().filter(move |e| e.from == node)
    }
}

/// A figure a stage contributes to `report.html`: data only, the engine draws it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportFigure {
    /// The report section it belongs to (e.g. `Curriculum`).
    pub section: &'static str,
    /// A short kind naming the plot (for styling and tests), e.g. `buffer-size`.
    pub kind: &'static str,
    pub caption: String,
    pub chart: Chart,
}

/// What a [`ReportFigure`] draws.
#[derive(Debug, Clone, PartialEq)]
pub enum Chart {
    /// A bar chart of named values.
    Bars { title: String, y_label: String, bars: Vec<(String, f64)>, y_max: Option<f64> },
    /// One bar of a chart shared by every figure of the same kind (e.g. accuracy per RL
    /// phase: one bar per phase); the first figure's title, label and caption are used.
    SharedBar { title: String, y_label: String, bar: (String, f64), y_max: Option<f64> },
}

/// The object-safe face of a stage type, held by the registry.
pub trait StageFactory: Send + Sync {
    fn name(&self) -> &'static str;
    fn summary(&self) -> &'static str;
    fn inputs(&self) -> &'static [PortSpec];
    fn outputs(&self) -> &'static [PortSpec];
    fn positional(&self) -> &'static [&'static str];
    /// Every option with its type, default and documentation.
    fn options(&self) -> Vec<OptionDoc>;
    /// Every problem with these options (parse errors first, then semantic checks).
    fn check(&self, options: &Value, ctx: &StageContext) -> Vec<String>;
    /// See [`StageConfig::check_plan`].
    fn check_plan(&self, plan: &PlanView, node: usize) -> Vec<(usize, String)>;
    /// See [`StageConfig::report_figures`].
    fn report_figures(&self, label: &str, summary: &serde_json::Map<String, Value>) -> Vec<ReportFigure>;
    /// See [`StageConfig::writes`]; empty when the options do not parse.
    fn writes(&self, options: &Value, ctx: &StageContext) -> Vec<PathBuf>;
    fn build(&self, options: &Value, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError>;
}

/// The [`StageFactory`] of any [`StageConfig`].
pub struct ConfigFactory<C>(PhantomData<fn() -> C>);

impl<C> ConfigFactory<C> {
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<C> Default for ConfigFactory<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: StageConfig> StageFactory for ConfigFactory<C> {
    fn name(&self) -> &'static str {
        C::NAME
    }

    fn summary(&self) -> &'static str {
        C::SUMMARY
    }

    fn inputs(&self) -> &'static [PortSpec] {
        C::INPUTS
    }

    fn outputs(&self) -> &'static [PortSpec] {
        C::OUTPUTS
    }

    fn positional(&self) -> &'static [&'static str] {
        C::POSITIONAL
    }

    fn options(&self) -> Vec<OptionDoc> {
        describe_options::<C>()
    }

    fn check(&self, options: &Value, ctx: &StageContext) -> Vec<String> {
        match parse_options::<C>(options) {
            Ok(config) => config.validate(ctx),
            Err(problems) => problems,
        }
    }

    fn check_plan(&self, plan: &PlanView, node: usize) -> Vec<(usize, String)> {
        C::check_plan(plan, node)
    }

    fn report_figures(&self, label: &str, summary: &serde_json::Map<String, Value>) -> Vec<ReportFigure> {
        C::report_figures(label, summary)
    }

    fn writes(&self, options: &Value, ctx: &StageContext) -> Vec<PathBuf> {
        if !C::WRITES_FILES {
            return Vec::new();
        }
        parse_options::<C>(options).map(|config| config.writes(ctx)).unwrap_or_default()
    }

    fn build(&self, options: &Value, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let config = parse_options::<C>(options).map_err(|problems| StageError::Invalid(problems.join("; ")))?;
        config.build(ctx)
    }
}
