//! `score_difficulty` stage: offline difficulty scoring the QwenLong-L1 way. A model samples
//! G responses per task, the reward scores them, and each record leaves annotated with its
//! pass rate, mean reward and difficulty (1 / mean reward), so a recipe can filter tasks or
//! fill a hard buffer by difficulty before RL. Its `reports` output feeds a `hard_buffer`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::AutodiffModule;
use longrl_backends::TrainBackend;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Done;
use crate::driver::{Cadence, Driver, ModelStage, StageInputs, StageRun, StepOutcome};
use crate::error::StageError;
use crate::fsutil::write_atomic;
use crate::model::batch_decode::{BatchDecoder, BatchOptions, GroupRequest, SampleOn};
use crate::model::chat::ModelTokenizer;
use crate::model::generate::{Completion, SamplingConfig};
use crate::model::{CausalLm, load_model};
use crate::options::{at_most, limits, sampling_problems};
use crate::prompt::encode_prompt;
use crate::record::{Difficulty, Record};
use crate::reward::{Reward, RuleConfig};
use crate::rl::remote::RolloutConfig;
use crate::rl::rollout::{Rollouts as RolloutSink, collect_groups, score_group};
use crate::rl::source::{RemoteBatch, Rollouts};
use crate::stage::{DifficultyReport, PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};

/// Options of the `score_difficulty` stage.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoreDifficultyConfig {
    /// Responses sampled per task (G).
    #[serde(default = "default_group")]
    pub group: usize,
    /// Prompt budget in tokens; longer prompts are cut in the middle.
    #[serde(default = "default_max_input")]
    pub max_input: usize,
    /// Most tokens per response.
    #[serde(default = "default_max_output")]
    pub max_output: usize,
    /// Sampling temperature (must be positive: difficulty needs varied samples).
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Nucleus sampling threshold (1 = off).
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    /// Rule check when no `reward` edge is connected.
    #[serde(default)]
    pub rule: RuleConfig,
    /// Seed of the sampling (mixed with the run seed).
    #[serde(default)]
    pub seed: u64,
    /// Most responses decoded together (rows of several tasks' groups; a group is never
    /// split).
    #[serde(default = "default_decode_rows")]
    pub decode_rows: usize,
    /// Where decoding draws its tokens: `"host"`, `"device"` (only the tokens and their
    /// log-probabilities come back from a GPU) or `"auto"` (the host, until the device check
    /// has measured both on a GPU).
    #[serde(default)]
    pub sample_on: SampleOn,
    /// Save the scores so far every this many tasks, for `longrl run --resume` (0 = only at
    /// the end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// Sample on inference servers instead of in process (see `rl_phase`'s `rollout`): the
    /// servers load the scoring model's directory.
    #[serde(default)]
    pub rollout: Option<RolloutConfig>,
}

fn default_checkpoint_every() -> usize {
    50
}
fn default_decode_rows() -> usize {
    64
}

fn default_group() -> usize {
    8
}
fn default_max_input() -> usize {
    131_072
}
fn default_max_output() -> usize {
    1024
}
fn default_temperature() -> f32 {
    0.7
}
fn default_top_p() -> f32 {
    0.95
}

impl StageConfig for ScoreDifficultyConfig {
    const NAME: &'static str = "score_difficulty";
    const SUMMARY: &'static str = "Samples G responses per task with a model and annotates each record with its pass rate and difficulty.";
    const INPUTS: &'static [PortSpec] = &[
        PortSpec::required("policy", PortKind::Model, "the model that attempts the tasks"),
        PortSpec::required("data", PortKind::Records, "tasks to score"),
        PortSpec::optional("reward", PortKind::Reward, "the reward (default: the `rule` option)"),
    ];
    const OUTPUTS: &'static [PortSpec] = &[
        PortSpec::optional("records", PortKind::Records, "the tasks, each with its `difficulty`"),
        PortSpec::optional("reports", PortKind::Reports, "each task's rewards and pass rate (for a hard_buffer)"),
    ];

    fn validate(&self, _ctx: &StageContext) -> Vec<String> {
        let mut problems = self.rule.problems();
        if self.group == 0 || self.max_output == 0 || self.max_input == 0 {
            problems.push("group, max_input and max_output must be at least 1".into());
        }
        if self.decode_rows == 0 {
            problems.push("decode_rows must be at least 1".into());
        }
        // Difficulty needs sampled responses: greedy decoding is not allowed here.
        problems.extend(sampling_problems(self.temperature, self.top_p, false));
        let sizes = [
            ("group", self.group, limits::GROUP),
            ("decode_rows", self.decode_rows, limits::GROUP),
            ("max_input", self.max_input, limits::TOKENS),
            ("max_output", self.max_output, limits::TOKENS),
        ];
        problems.extend(sizes.iter().filter_map(|(name, value, max)| at_most(name, *value, *max)));
        if let Some(rollout) = &self.rollout {
            problems.extend(rollout.problems());
            problems.extend(rollout.request_problem(self.group, self.max_output));
        }
        problems
    }

    const WRITES_FILES: bool = true;

    fn writes(&self, ctx: &StageContext) -> Vec<PathBuf> {
        vec![ctx.output_path(Path::new(&format!("score_difficulty-{}", ctx.node)))]
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let out_dir = ctx.run_dir.as_ref().map(|d| d.join(format!("score_difficulty-{}", ctx.node)));
        Ok(Driver::boxed(ScoreDifficulty { config: self, run_seed: ctx.seed }, ctx, out_dir))
    }
}

/// The `score_difficulty` stage, independent of the backend.
struct ScoreDifficulty {
    config: ScoreDifficultyConfig,
    run_seed: u64,
}

/// The scored tasks, saved with the stage's results (and replayed on resume).
const SCORED_FILE: &str = "scored.jsonl";

impl ModelStage for ScoreDifficulty {
    type State = ScoreState;
    type Run<B: TrainBackend> = ScoreRun<B>;

    fn rule(&self) -> RuleConfig {
        self.config.rule.clone()
    }

    fn cadence(&self) -> Cadence {
        Cadence { every: self.config.checkpoint_every, keep: 1 }
    }

    fn prepare<B: TrainBackend>(&self, inputs: StageInputs, device: B::Device, io: &mut StageIo) -> Result<ScoreRun<B>, StageError> {
        let tokenizer = ModelTokenizer::load(&inputs.policy.dir)?;
        let model_config = crate::model::ModelConfig::load(&inputs.policy.dir.join("config.json"))?;
        let rollouts = Rollouts::connect(self.config.rollout.as_ref(), io.label(), None, model_config.vocab_size, io.cancel_token())?;
        // The servers sample: the model is not loaded here.
        let model = match rollouts.remote() {
            None => Some(load_model::<B>(&inputs.policy.dir, &device)?.1.valid()),
            Some(_) => {
                rollouts.sync_dir(&inputs.policy.dir, &format!("{}:{}", io.label(), inputs.policy.dir.display()))?;
                None
            }
        };
        let mut stop_tokens = tokenizer.stop_ids.clone();
        stop_tokens.extend(model_config.eos_ids());
        Ok(ScoreRun {
            config: self.config.clone(),
            run_seed: self.run_seed,
            tokenizer,
            rollouts,
            model,
            stop_tokens,
            reward: inputs.reward,
            records: inputs.records,
            state: ScoreState { scored: Vec::new(), unscorable: 0 },
            ready: VecDeque::new(),
        })
    }

    fn republish(&self, done: &Done, out_dir: Option<&Path>, io: &mut StageIo) -> Result<(), StageError> {
        // The results are in this stage's own directory (the recorded path may predate a move).
        let Some(dir) = out_dir.filter(|_| done.summary.contains_key("results")) else { return Ok(()) };
        for scored in read_scored(&dir.join(SCORED_FILE))? {
            emit(io, scored)?;
        }
        io.summary_mut().insert("results".into(), dir.display().to_string().into());
        Ok(())
    }
}

/// The tasks scored so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreState {
    /// Each scored task's difficulty, in input order.
    scored: Vec<Difficulty>,
    /// Samples the reward could not score.
    unscorable: usize,
}

/// Scoring logs no per-task metrics.
#[derive(Debug, Clone, Serialize)]
pub struct NoStepMetrics {}

/// Difficulty scoring on one backend.
pub struct ScoreRun<B: TrainBackend> {
    config: ScoreDifficultyConfig,
    run_seed: u64,
    tokenizer: ModelTokenizer,
    /// The model, when sampling in process.
    model: Option<CausalLm<B::InnerBackend>>,
    rollouts: Rollouts,
    stop_tokens: Vec<u32>,
    reward: Arc<Reward>,
    records: Vec<Record>,
    state: ScoreState,
    /// Samples generated ahead for the next tasks (decoded together), by task index.
    ready: VecDeque<(usize, Vec<Completion>)>,
}

impl<B: TrainBackend> ScoreRun<B> {
    /// Task `index` annotated with its score.
    fn scored_record(&self, index: usize) -> Record {
        let mut record = self.records[index].clone();
        record.difficulty = self.state.scored.get(index).cloned();
        record
    }

    /// Generates the samples of tasks `index..` that decode together: enough groups to keep
    /// `decode_rows` rows busy as groups finish, never past the next checkpoint (a resumed
    /// run starts there). Task i draws from its own seed, so a chunk's tasks get what they
    /// would alone.
    fn generate_from(&mut self, index: usize, io: &mut StageIo) -> Result<(), StageError> {
        let config = &self.config;
        let per_chunk = 2 * (config.decode_rows / config.group).max(1);
        let mut end = (index + per_chunk).min(self.records.len());
        if let Some(done) = index.checked_div(config.checkpoint_every) {
            end = end.min((done + 1) * config.checkpoint_every);
        }
        let mut requests = Vec::with_capacity(end - index);
        for i in index..end {
            io.cancel_token().check()?;
            let (prompt, _) = encode_prompt(&self.tokenizer, &self.records[i], config.max_input)?;
            let sampling = SamplingConfig {
                temperature: config.temperature,
                top_p: config.top_p,
                top_k: 0,
                max_new_tokens: config.max_output,
                stop_tokens: self.stop_tokens.clone(),
                seed: config.seed ^ self.run_seed.rotate_left(17) ^ ((i as u64) << 24),
            };
            requests.push(GroupRequest::group(prompt, config.group, sampling));
        }
        let cancel = io.cancel_token().clone();
        let groups = match (&self.model, self.rollouts.remote()) {
            (_, Some(servers)) => collect_groups(&mut RemoteBatch::new(servers, &cancel), requests, || cancel.check())?,
            (Some(model), None) => {
                let mut decoder = BatchDecoder::new(model, BatchOptions { max_rows: config.decode_rows, sample_on: config.sample_on });
                collect_groups(&mut decoder as &mut dyn RolloutSink, requests, || cancel.check())?
            }
            (None, None) => return Err(StageError::Failed(format!("{}: no model and no rollout servers", io.label()))),
        };
        self.ready = (index..end).zip(groups).collect();
        Ok(())
    }

    /// Mean pass rate of the tasks that could be scored.
    fn mean_pass_rate(&self) -> f64 {
        let rates: Vec<f64> = self.state.scored.iter().filter_map(|d| d.pass_rate).map(f64::from).collect();
        rates.iter().sum::<f64>() / rates.len().max(1) as f64
    }
}

impl<B: TrainBackend> StageRun<B> for ScoreRun<B> {
    type State = ScoreState;
    type Metrics = NoStepMetrics;

    fn total_steps(&self) -> usize {
        self.records.len()
    }

    fn restore(&mut self, dir: &Path, state: ScoreState, io: &mut StageIo) -> Result<(), StageError> {
        if state.scored.len() > self.records.len() {
            return Err(StageError::Failed(format!(
                "{}: the checkpoint holds scores of {} tasks, but the stage has {}; it belongs to another run",
                dir.join("state.json").display(),
                state.scored.len(),
                self.records.len()
            )));
        }
        self.state = state;
        for index in 0..self.state.scored.len() {
            emit(io, self.scored_record(index))?;
        }
        Ok(())
    }

    fn step(&mut self, index: usize, io: &mut StageIo) -> Result<StepOutcome<NoStepMetrics>, StageError> {
        if self.ready.front().map(|(i, _)| *i) != Some(index) {
            self.generate_from(index, io)?;
        }
        let Some((_, completions)) = self.ready.pop_front() else {
            return Err(StageError::Failed(format!("{}: no samples were generated for task {index}", io.label())));
        };
        let record = &self.records[index];
        let rollout = score_group(&self.tokenizer, record, completions, &self.stop_tokens, &self.reward)?;
        let difficulty = rollout.difficulty();
        self.state.unscorable += difficulty.samples - difficulty.rewards.len();
        self.state.scored.push(difficulty);
        emit(io, self.scored_record(index))?;
        Ok(StepOutcome { metrics: None, status: format!("mean pass rate {:.2}", self.mean_pass_rate()), last: false })
    }

    fn checkpoint(&self, _dir: &Path) -> Result<ScoreState, StageError> {
        Ok(self.state.clone())
    }

    fn finish(self, out_dir: Option<&Path>, io: &mut StageIo) -> Result<Option<PathBuf>, StageError> {
        let mean_pass_rate = self.mean_pass_rate();
        let unsolved = self.state.scored.iter().filter(|d| d.unsolved()).count();
        if let Some(dir) = out_dir {
            let scored: Vec<Record> = (0..self.state.scored.len()).map(|i| self.scored_record(i)).collect();
            write_scored(&dir.join(SCORED_FILE), &scored)?;
            io.summary_mut().insert("results".into(), dir.display().to_string().into());
        }
        let summary = io.summary_mut();
        summary.insert("tasks".into(), self.records.len().into());
        summary.insert("unsolved".into(), unsolved.into());
        summary.insert("mean_pass_rate".into(), mean_pass_rate.into());
        summary.insert("unscorable".into(), self.state.unscorable.into());
        Ok(None)
    }
}

/// Sends a scored task on `records` and its report on `reports`.
fn emit(io: &mut StageIo, record: Record) -> Result<(), StageError> {
    if io.output_connected("reports")
        && let Some(difficulty) = record.difficulty.clone()
    {
        io.send_report("reports", DifficultyReport { record: record.clone(), difficulty })?;
    }
    io.send_record("records", record)
}

fn write_scored(path: &Path, records: &[Record]) -> Result<(), StageError> {
    let mut text = String::new();
    for record in records {
        text.push_str(&serde_json::to_string(record).map_err(|e| StageError::Failed(e.to_string()))?);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

fn read_scored(path: &Path) -> Result<Vec<Record>, StageError> {
    let text = std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| StageError::BadRecord { path: path.to_path_buf(), line: i + 1, message: e.to_string() })
        })
        .collect()
}
