//! The model-stage driver: what every stage that runs a model has in common, so that `sft`,
//! `rl_phase`, `evaluate` and `score_difficulty` write only their preparation and their step.
//!
//! The driver receives the policy (with the reward and the records), picks the backend,
//! republishes a stage that finished in an earlier attempt of the run, resumes from the
//! newest checkpoint (a typed state), checks cancellation between steps, logs each step's
//! typed metrics, saves a checkpoint every N steps, and at the end lets the stage save its
//! results, marks the stage done and publishes its model. Each step holds its device's turn
//! ([`crate::device_lock`]): stages that share a device take turns step by step.
//!
//! A stage plugs in with two traits: [`ModelStage`] (backend-independent: checkpoint
//! cadence, preparation, replay of a finished stage) and [`StageRun`] (one backend: steps,
//! checkpoint contents, final save).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use longrl_backends::BackendTask;
use longrl_backends::TrainBackend;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Done, StageCheckpoints};
use crate::error::StageError;
use crate::progress::Progress;
use crate::record::Record;
use crate::reward::{Reward, RuleConfig};
use crate::stage::{Item, ModelRef, Stage, StageContext, StageIo};

/// What a model stage receives on its inputs: the policy, the reward (the recipe's, or the
/// stage's own rule check when no `reward` edge is connected) and every record.
#[derive(Debug)]
pub struct StageInputs {
    pub policy: ModelRef,
    pub reward: Arc<Reward>,
    pub records: Vec<Record>,
    /// Where the stage's results go (`None` without a run directory).
    pub out_dir: Option<PathBuf>,
}

impl StageInputs {
    /// Reads the `policy`, `reward` (when the stage has one) and `data` inputs together,
    /// whichever has an item first: the records' source may also feed a stage upstream of
    /// the policy (a source feeding both a warm-up SFT and the RL phase after it), which
    /// finishes only once the source has sent everything, so waiting for the model before
    /// draining the records would leave the source blocked on this stage's full queue.
    fn receive(io: &mut StageIo, rule: &RuleConfig, out_dir: Option<PathBuf>) -> Result<Self, StageError> {
        let (mut policy, mut reward, mut records) = (None, None, Vec::new());
        let has_reward = io.input_connected("reward");
        let ports: &[&'static str] = if has_reward { &["policy", "reward", "data"] } else { &["policy", "data"] };
        while let Some((port, item)) = io.recv_any(ports)? {
            match (port, item) {
                ("data", Item::Record(record)) => records.push(*record),
                ("policy", Item::Model(model)) if policy.is_none() => policy = Some(model),
                ("reward", Item::Reward(published)) if reward.is_none() => reward = Some(published),
                (port, item) => {
                    return Err(StageError::Failed(format!("{}: unexpected {} on input `{port}`", io.label(), item.kind())));
                }
            }
        }
        let closed = |port: &str, what: &str| {
            StageError::Failed(format!("{}: input `{port}` closed before {what} arrived (did the upstream stage fail?)", io.label()))
        };
        let policy = policy.ok_or_else(|| closed("policy", "a model"))?;
        let reward = match reward {
            Some(reward) => reward,
            None if has_reward => return Err(closed("reward", "a reward")),
            None => Arc::new(Reward::rule_only(rule.clone())),
        };
        Ok(Self { policy, reward, records, out_dir })
    }
}

/// How often a stage saves a checkpoint, and how many it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    /// A checkpoint every this many steps (0: none before the end).
    pub every: usize,
    /// Checkpoints kept (the newest).
    pub keep: usize,
}

impl Cadence {
    /// No checkpoint before the end (the stage is cheap to redo).
    pub const NONE: Self = Self { every: 0, keep: 1 };

    /// Whether a checkpoint is due after `done` of `total` steps.
    fn due(self, done: usize, total: usize) -> bool {
        self.every > 0 && done.is_multiple_of(self.every) && done < total
    }
}

/// A stage that runs a model, seen from the driver.
pub trait ModelStage: Send + Sync + 'static {
    /// Where the stage stands between steps (besides the files of its checkpoint).
    type State: Serialize + DeserializeOwned;
    /// The stage on one backend.
    type Run<B: TrainBackend>: StageRun<B, State = Self::State>;

    /// The rule check used when no `reward` edge is connected.
    fn rule(&self) -> RuleConfig {
        RuleConfig::default()
    }

    /// Checkpoint cadence.
    fn cadence(&self) -> Cadence;

    /// Loads the model and prepares the work: tasks, batches, optimizer.
    fn prepare<B: TrainBackend>(&self, inputs: StageInputs, device: B::Device, io: &mut StageIo) -> Result<Self::Run<B>, StageError>;

    /// Sends again what the stage published besides its model, when it finished in an
    /// earlier attempt of the run (the driver republishes the summary and the model).
    /// `out_dir` is where the stage's results are now (the run may have moved since).
    fn republish(&self, _done: &Done, _out_dir: Option<&Path>, _io: &mut StageIo) -> Result<(), StageError> {
        Ok(())
    }
}

/// One model stage on one backend.
pub trait StageRun<B: TrainBackend> {
    /// See [`ModelStage::State`].
    type State;
    /// What one step reports: a line of `metrics.jsonl`.
    type Metrics: Serialize;

    /// Steps the stage takes in all.
    fn total_steps(&self) -> usize;

    /// Continues from a checkpoint: reads its files in `dir` and takes its state; sends
    /// again whatever the stage had sent before the checkpoint.
    fn restore(&mut self, dir: &Path, state: Self::State, io: &mut StageIo) -> Result<(), StageError>;

    /// Step `step` (0-based).
    fn step(&mut self, step: usize, io: &mut StageIo) -> Result<StepOutcome<Self::Metrics>, StageError>;

    /// Writes a checkpoint's files (weights, optimizer, ...) into `dir` and returns the
    /// state saved beside them.
    fn checkpoint(&self, dir: &Path) -> Result<Self::State, StageError>;

    /// Saves the results into `out_dir` (when the run has a directory), fills the summary,
    /// and returns the model directory to publish, if any.
    fn finish(self, out_dir: Option<&Path>, io: &mut StageIo) -> Result<Option<PathBuf>, StageError>;
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepOutcome<M> {
    /// The step's line of `metrics.jsonl` (`None`: nothing logged this step).
    pub metrics: Option<M>,
    /// A short status for the progress bar (e.g. the loss).
    pub status: String,
    /// The stage has no work left (its tasks ran out before `total_steps`).
    pub last: bool,
}

/// The contents of a checkpoint's `state.json`: the driver's position and the stage's own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedState<S> {
    /// Steps done.
    pub step: usize,
    /// Lines the stage had logged to `metrics.jsonl` (a resumed run keeps these).
    pub metrics_lines: usize,
    /// Seconds the stage had run up to this checkpoint, summed over attempts (an attempt's
    /// time after its last checkpoint is lost with it).
    #[serde(default)]
    pub seconds: f64,
    /// Attempts that reached this checkpoint: 1 when no earlier attempt was resumed.
    #[serde(default)]
    pub attempts: usize,
    /// The stage's state.
    pub stage: S,
}

/// Runs a [`ModelStage`] as a [`Stage`] of the executor.
pub struct Driver<S: ModelStage> {
    stage: S,
    ctx: StageContext,
    /// Where the stage's results go; `None` without a run directory.
    out_dir: Option<PathBuf>,
}

impl<S: ModelStage> Driver<S> {
    /// A driven stage whose results go to `out_dir` (a subdirectory of the run).
    pub fn new(stage: S, ctx: &StageContext, out_dir: Option<PathBuf>) -> Self {
        Self { stage, ctx: ctx.clone(), out_dir }
    }

    /// A boxed stage for the executor.
    pub fn boxed(stage: S, ctx: &StageContext, out_dir: Option<PathBuf>) -> Box<dyn Stage> {
        Box::new(Self::new(stage, ctx, out_dir))
    }
}

impl<S: ModelStage> Stage for Driver<S> {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let inputs = StageInputs::receive(io, &self.stage.rule(), self.out_dir.clone())?;
        let checkpoints = self.ctx.run_dir.as_ref().map(|run| StageCheckpoints::new(run, io.label(), self.stage.cadence().keep));
        if let Some(done) = checkpoints.as_ref().map(StageCheckpoints::done).transpose()?.flatten() {
            tracing::info!(stage = %io.label(), "finished in an earlier attempt; republishing its results");
            io.summary_mut().extend(done.summary.clone());
            self.stage.republish(&done, self.out_dir.as_deref(), io)?;
            if let Some(dir) = done.model {
                io.send_model("model", ModelRef { dir })?;
            }
            return Ok(());
        }
        let task = DriverTask { driver: &self, io, inputs, checkpoints };
        longrl_backends::dispatch(self.ctx.device, task).map_err(|e| StageError::Failed(e.to_string()))?
    }
}

/// The driver's work on the backend the run chose.
struct DriverTask<'a, S: ModelStage> {
    driver: &'a Driver<S>,
    io: &'a mut StageIo,
    inputs: StageInputs,
    checkpoints: Option<StageCheckpoints>,
}

impl<S: ModelStage> BackendTask for DriverTask<'_, S> {
    type Output = Result<(), StageError>;

    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        let Self { driver, io, inputs, checkpoints } = self;
        let cadence = driver.stage.cadence();
        let started = std::time::Instant::now();
        let mut run = driver.stage.prepare::<B>(inputs, device, io)?;
        let total = run.total_steps();
        let (first_step, resumed_lines, earlier) = match checkpoints.as_ref().map(|c| c.latest_state::<S::State>()).transpose()?.flatten() {
            Some((dir, saved)) => {
                if saved.step > total {
                    return Err(StageError::Failed(format!(
                        "{}: the checkpoint is at step {} but the stage has only {total} steps; it belongs to another run",
                        dir.join("state.json").display(),
                        saved.step
                    )));
                }
                run.restore(&dir, saved.stage, io)?;
                tracing::info!(stage = %io.label(), step = saved.step, "resuming from {}", dir.display());
                (saved.step, saved.metrics_lines, Earlier { seconds: saved.seconds.max(0.0), attempts: saved.attempts.max(1) })
            }
            None => (0, 0, Earlier::default()),
        };
        let progress = Progress::new(io.label(), total as u64, "steps");
        progress.skip(first_step as u64);
        for step in first_step..total {
            io.cancel_token().check()?;
            // One step at a time per device, first come first served (see `device_lock`).
            let outcome = {
                let _turn = crate::device_lock::acquire(driver.ctx.device, io.label());
                run.step(step, io)?
            };
            // A stop during the step (Ctrl-C, another stage failing) may have cut it short:
            // a judge answers `unscorable` once the run stops. Nothing of it is kept.
            io.cancel_token().check()?;
            if let Some(metrics) = &outcome.metrics {
                io.log_metrics(step as u64, metrics_fields(metrics)?)?;
            }
            progress.advance(&outcome.status);
            if outcome.last {
                break;
            }
            let done = step + 1;
            if let Some(checkpoints) = checkpoints.as_ref().filter(|_| cadence.due(done, total)) {
                let metrics_lines = resumed_lines.saturating_add(io.metrics_logged());
                let (seconds, attempts) = earlier.with_this(started);
                checkpoints
                    .save(done, |dir| Ok(SavedState { step: done, metrics_lines, seconds, attempts, stage: run.checkpoint(dir)? }))?;
            }
        }
        progress.finish();
        let model = run.finish(driver.out_dir.as_deref(), io)?;
        let (seconds, attempts) = earlier.with_this(started);
        io.summary_mut().insert("wall_s_all_attempts".into(), seconds.into());
        io.summary_mut().insert("attempts".into(), attempts.into());
        // Likewise for the final work (an evaluation's judging): a stopped stage is not done.
        io.cancel_token().check()?;
        if let Some(checkpoints) = &checkpoints {
            let metrics_lines = resumed_lines.saturating_add(io.metrics_logged());
            checkpoints.mark_done(&Done { model: model.clone(), summary: io.summary_mut().clone(), metrics_lines })?;
        }
        if let Some(dir) = model {
            io.send_model("model", ModelRef { dir })?;
        }
        Ok(())
    }
}

/// What the attempts before this one spent, as the checkpoint resumed from recorded it.
#[derive(Debug, Clone, Copy, Default)]
struct Earlier {
    seconds: f64,
    attempts: usize,
}

impl Earlier {
    /// Seconds and attempts including this attempt, which started at `started`.
    fn with_this(self, started: std::time::Instant) -> (f64, usize) {
        (self.seconds + started.elapsed().as_secs_f64(), self.attempts.saturating_add(1))
    }
}

/// A step's typed metrics as the fields of a `metrics.jsonl` line.
fn metrics_fields<M: Serialize>(metrics: &M) -> Result<serde_json::Map<String, serde_json::Value>, StageError> {
    match serde_json::to_value(metrics) {
        Ok(serde_json::Value::Object(fields)) => Ok(fields),
        Ok(other) => Err(StageError::Failed(format!("step metrics must serialize to an object, got {other}"))),
        Err(e) => Err(StageError::Failed(format!("cannot encode step metrics: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::stage::{CancelToken, PortKind, PortSpec, StageCounters};

    /// When the fake stage stops the run (as Ctrl-C would while a step or the final
    /// judging is under way).
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum StopDuring {
        Step(usize),
        Finish,
    }

    /// A model stage without a model: four steps, a checkpoint after each, logging one
    /// metrics line per step.
    struct Fake {
        stop: StopDuring,
    }

    struct FakeRun {
        stop: StopDuring,
    }

    impl ModelStage for Fake {
        type State = usize;
        type Run<B: TrainBackend> = FakeRun;

        fn cadence(&self) -> Cadence {
            Cadence { every: 1, keep: 10 }
        }

        fn prepare<B: TrainBackend>(&self, _inputs: StageInputs, _device: B::Device, _io: &mut StageIo) -> Result<FakeRun, StageError> {
            Ok(FakeRun { stop: self.stop })
        }
    }

    impl<B: TrainBackend> StageRun<B> for FakeRun {
        type State = usize;
        type Metrics = serde_json::Value;

        fn total_steps(&self) -> usize {
            4
        }

        fn restore(&mut self, _dir: &Path, _state: usize, _io: &mut StageIo) -> Result<(), StageError> {
            Ok(())
        }

        fn step(&mut self, step: usize, io: &mut StageIo) -> Result<StepOutcome<serde_json::Value>, StageError> {
            if self.stop == StopDuring::Step(step) {
                io.cancel_token().cancel();
            }
            Ok(StepOutcome { metrics: Some(serde_json::json!({ "loss": step })), status: String::new(), last: false })
        }

        fn checkpoint(&self, _dir: &Path) -> Result<usize, StageError> {
            Ok(0)
        }

        fn finish(self, _out_dir: Option<&Path>, io: &mut StageIo) -> Result<Option<PathBuf>, StageError> {
            if self.stop == StopDuring::Finish {
                io.cancel_token().cancel();
            }
            Ok(None)
        }
    }

    /// Runs the fake stage in `run_dir` with a policy on its input; returns its result and
    /// the metrics lines it logged.
    fn run_fake(run_dir: &Path, stop: StopDuring) -> (Result<(), StageError>, usize) {
        let (policy_tx, policy_rx) = crossbeam_channel::unbounded();
        policy_tx.send(Item::Model(ModelRef { dir: run_dir.join("model") })).expect("send");
        drop(policy_tx);
        let inputs = vec![
            (PortSpec::required("policy", PortKind::Model, "policy"), vec![policy_rx]),
            (PortSpec::required("data", PortKind::Records, "data"), Vec::new()),
        ];
        let mut io = StageIo::new("fake#1", inputs, Vec::new(), CancelToken::new(), Arc::new(StageCounters::default()), Metrics::discard());
        let ctx = StageContext { run_dir: Some(run_dir.to_path_buf()), ..StageContext::for_check(run_dir) };
        let result = Box::new(Driver::new(Fake { stop }, &ctx, None)).run(&mut io);
        (result, io.metrics_logged())
    }

    #[test]
    fn a_step_cut_short_by_a_stop_is_neither_logged_nor_saved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (result, logged) = run_fake(dir.path(), StopDuring::Step(2));
        assert!(matches!(result, Err(StageError::Cancelled)), "{result:?}");
        assert_eq!(logged, 2, "steps 0 and 1 logged, not the stopped step 2");
        let checkpoints = StageCheckpoints::new(dir.path(), "fake#1", 10);
        let (latest, _) = checkpoints.latest().expect("reads").expect("a checkpoint");
        assert!(latest.ends_with("step-000002"), "the newest checkpoint is after step 1: {}", latest.display());
        assert!(checkpoints.done().expect("reads").is_none());
    }

    #[test]
    fn a_stage_stopped_while_finishing_is_not_marked_done() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (result, logged) = run_fake(dir.path(), StopDuring::Finish);
        assert!(matches!(result, Err(StageError::Cancelled)), "{result:?}");
        assert_eq!(logged, 4);
        assert!(StageCheckpoints::new(dir.path(), "fake#1", 10).done().expect("reads").is_none(), "no done.json");
        // Left alone, the same stage is marked done.
        let dir = tempfile::tempdir().expect("tempdir");
        let (result, _) = run_fake(dir.path(), StopDuring::Step(99));
        assert!(result.is_ok(), "{result:?}");
        assert!(StageCheckpoints::new(dir.path(), "fake#1", 10).done().expect("reads").is_some());
    }
}
