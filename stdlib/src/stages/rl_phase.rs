//! `rl_phase` stage: one RL phase at an input budget N, GRPO or DAPO. For each step it
//! samples G responses per prompt (the prompt prefilled once per group, old log-probs kept
//! from sampling), scores them with the reward plus overlong shaping, computes group
//! advantages, drops groups that teach nothing and replaces them with the next prompts
//! (dynamic sampling), then takes PPO-clip steps over mini-batches. It reports each task's
//! difficulty and publishes the new policy.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use longrl_backends::TrainBackend;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Done, load_training_weights, write_master_weights, write_training_state};
use crate::driver::{Cadence, Driver, ModelStage, StageInputs, StageRun, StepOutcome};
use crate::error::StageError;
use crate::fsutil::write_atomic;
use crate::model::batch_decode::{BatchDecoder, BatchOptions, GroupRequest, SampleOn};
use crate::model::chat::ModelTokenizer;
use crate::model::checkpoint::{SaveDtype, copy_tokenizer_files};
use crate::model::config::ModelConfig;
use crate::model::generate::{Completion, SamplingConfig};
use crate::model::precision::{Precision, cast_model};
use crate::model::{CausalLm, save_model};
use crate::options::{at_most, limits, sampling_problems};
use crate::prompt::encode_prompt;
use crate::record::Record;
use crate::reward::{Reward, RuleConfig};
use crate::rl::advantage::{StdScaling, group_advantages, mean_std};
use crate::rl::buffer::carried_beyond_share;
use crate::rl::chain::phase_problems;
use crate::rl::dynamic::{DropReason, FilterMetric, GroupFilter, fill_step_batched};
use crate::rl::group::{Group, group_backward, normalizer};
use crate::rl::loss::{Aggregation, KlEstimator, LossConfig, LossSums};
use crate::rl::remote::RolloutConfig;
use crate::rl::rollout::{Rollouts as RolloutSink, pass_rate_bin, score_group};
use crate::rl::shaping::overlong_penalty;
use crate::rl::source::{RemoteBatch, Rollouts};
use crate::stage::{Chart, DifficultyReport, PlanView, PortKind, PortSpec, ReportFigure, Stage, StageConfig, StageContext, StageIo};
use crate::train::{OPTIMIZER_FILE, OptimConfig, RecomputeChoice, Trainer};

/// Options of the `rl_phase` stage.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RlPhaseConfig {
    /// The phase's input budget N in tokens: it trains on tasks whose length (the document
    /// budget a source recorded, else the prompt's tokens) is in (min_input, max_input].
    pub max_input: usize,
    /// Tokens the prompt may have beyond `max_input` for the template, question and
    /// instruction; longer prompts are cut in the middle.
    #[serde(default = "default_prompt_room")]
    pub prompt_room: usize,
    /// Tasks at or below this length (the previous phase's budget) are passed by, except
    /// those a hard buffer carried from an earlier phase.
    #[serde(default)]
    pub min_input: usize,
    /// Most tokens per response (L_max).
    #[serde(default = "default_max_output")]
    pub max_output: usize,
    /// Overlong shaping buffer L_cache (0 = off).
    #[serde(default)]
    pub overlong_buffer: usize,
    /// Responses sampled per prompt (G).
    #[serde(default = "default_group")]
    pub group: usize,
    /// Prompts (groups) per step.
    #[serde(default = "default_prompts")]
    pub prompts_per_step: usize,
    /// Most responses decoded together: the groups of a step's prompts share each decode
    /// step, up to this many rows (a group is never split). More rows use the cores (or the
    /// GPU) better and take more memory for keys and values.
    #[serde(default = "default_decode_rows")]
    pub decode_rows: usize,
    /// Where decoding draws its tokens: `"host"`, `"device"` (only the tokens and their
    /// log-probabilities come back from a GPU) or `"auto"` (the host, until the device check
    /// has measured both on a GPU).
    #[serde(default)]
    pub sample_on: SampleOn,
    /// Padded response tokens per micro-batch of a group's backward (responses sorted by
    /// length; every micro-batch reuses one forward of the group's prompt); 0 = the whole
    /// group at once. Bounds training memory for long responses; the result is the same.
    #[serde(default)]
    pub micro_batch_tokens: usize,
    /// Activation recomputation: `layer` keeps only each decoder layer's input and
    /// recomputes the layer in the backward (activation memory of one layer, about one
    /// more forward per step), `none` keeps every activation, `auto` picks `layer` when a
    /// prompt and its response can exceed 2,048 tokens.
    #[serde(default)]
    pub recompute: RecomputeChoice,
    /// Prompts per optimizer step (mini-batch); `prompts_per_step / mini_batch` updates per step.
    #[serde(default = "default_mini_batch")]
    pub mini_batch: usize,
    /// Data-parallel replicas: the run's device and the next `devices - 1` of its backend
    /// (on the CPU, the same processor) each compute the gradients of every `devices`-th
    /// group of a mini-batch on a copy of the weights; their gradients are summed (by
    /// burn-collective's all-reduce, or in replica order when three or more share a device)
    /// before the one optimizer update. The same update as one device (up to the order of
    /// float additions). Rollouts stay on the run's device (or the `rollout` servers).
    #[serde(default = "default_one")]
    pub devices: usize,
    /// Passes over each step's rollouts.
    #[serde(default = "default_one")]
    pub ppo_epochs: usize,
    /// Passes over the phase's tasks.
    #[serde(default = "default_one")]
    pub epochs: usize,
    /// Stop after this many steps.
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Optimizer and learning-rate schedule (`lr` is required).
    #[serde(flatten)]
    pub optim: OptimConfig,
    /// Sampling temperature of the rollouts (the loss scores responses at the same one).
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Nucleus sampling threshold of the rollouts (1 = off).
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    /// Lower clip range (ratio >= 1 - eps_low).
    #[serde(default = "default_eps_low")]
    pub eps_low: f32,
    /// Upper clip range (ratio <= 1 + eps_high); above eps_low is DAPO's clip-higher.
    #[serde(default = "default_eps_high")]
    pub eps_high: f32,
    /// `token` (DAPO), `sequence` (GRPO) or `token-sum-norm` (Dr. GRPO).
    #[serde(default)]
    pub aggregation: Aggregation,
    /// Advantage scaling: `group` std, `batch` std or `none` (Dr. GRPO).
    #[serde(default)]
    pub std_scaling: StdScaling,
    /// KL penalty to the starting policy (0 = none, and no reference model is run).
    #[serde(default)]
    pub kl_coef: f32,
    /// KL estimator: `k3` (non-negative, low variance) or `k1` (log ratio).
    #[serde(default)]
    pub kl_estimator: KlEstimator,
    /// Entropy bonus.
    #[serde(default)]
    pub entropy_coef: f32,
    /// Drop groups without a learning signal and sample the next prompts instead.
    #[serde(default = "default_true")]
    pub dynamic_sampling: bool,
    /// What dynamic sampling looks at: `accuracy` drops groups whose samples are all correct
    /// or all wrong (DAPO); `reward` drops groups whose rewards (after shaping) are all equal.
    #[serde(default)]
    pub dynamic_sampling_metric: FilterMetric,
    /// Keep only groups whose pass rate lies within [a, b].
    #[serde(default)]
    pub accuracy_band: Option<[f32; 2]>,
    /// Generate the rollouts on inference servers instead of in process: `#{ urls: [..],
    /// model: "..", flavor: "vllm" | "sglang" | "longrl", max_in_flight: 4 }` (see the
    /// README's "Running at scale"). The policy is written (bf16) and loaded by every server
    /// before each step's rollouts; the servers' log-probs are checked against the trainer's.
    #[serde(default)]
    pub rollout: Option<RolloutConfig>,
    /// Prompts tried per step at most, as a multiple of `prompts_per_step`.
    #[serde(default = "default_tries")]
    pub max_tries: usize,
    /// Rule check when no `reward` edge is connected.
    #[serde(default)]
    pub rule: RuleConfig,
    /// Seed of sampling and shuffling (mixed with the run seed).
    #[serde(default)]
    pub seed: u64,
    /// Precision of the saved weights (the published policy and each checkpoint's): `f32`,
    /// `bf16` or `f16`. Default: f32, or bf16 under `precision: "bf16-mixed"`. Below f32,
    /// the f32 master weights are saved beside them (`master/`, with the optimizer state),
    /// so a resumed run or a phase that carries the optimizer continues exactly.
    #[serde(default)]
    pub save_dtype: Option<SaveDtype>,
    /// Numeric precision of training: `f32`, or `bf16-mixed` (forward, backward and
    /// rollouts in bf16; f32 master weights, optimizer moments, log-probs, softmax, loss and
    /// reductions). CUDA and the CPU backend compute in real bf16 (on the CPU slower than
    /// f32: it is for checking the numerics); wgpu has no bf16 and trains in f32, saying so in
    /// the log.
    #[serde(default)]
    pub precision: Precision,
    /// `carry`: continue from the optimizer state an earlier phase saved with the policy
    /// (fresh when there is none); `reset`: always fresh moments.
    #[serde(default)]
    pub optimizer_state: OptimizerState,
    /// Save a checkpoint (weights, optimizer, cursors, reports so far) every this many
    /// steps for `longrl run --resume` (0 = only the stage's end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// Checkpoints kept (the newest).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
}

fn default_checkpoint_every() -> usize {
    10
}
fn default_keep() -> usize {
    2
}

/// Whether a phase continues the previous phase's optimizer moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerState {
    #[default]
    Carry,
    Reset,
}

fn default_max_output() -> usize {
    1024
}
fn default_prompt_room() -> usize {
    128
}
fn default_group() -> usize {
    8
}
fn default_prompts() -> usize {
    16
}
fn default_decode_rows() -> usize {
    64
}
fn default_mini_batch() -> usize {
    8
}
fn default_one() -> usize {
    1
}
fn default_temperature() -> f32 {
    0.7
}
fn default_top_p() -> f32 {
    0.95
}
fn default_eps_low() -> f32 {
    0.2
}
fn default_eps_high() -> f32 {
    0.28
}
fn default_true() -> bool {
    true
}
fn default_tries() -> usize {
    4
}

impl StageConfig for RlPhaseConfig {
    const NAME: &'static str = "rl_phase";
    const SUMMARY: &'static str = "One RL phase at an input budget: group rollouts, GRPO/DAPO updates, difficulty reports.";
    const INPUTS: &'static [PortSpec] = &[
        PortSpec::required("policy", PortKind::Model, "the policy to train"),
        PortSpec::required("data", PortKind::Records, "tasks (those outside the phase's band are passed by)"),
        PortSpec::optional("reward", PortKind::Reward, "the reward (default: the `rule` option)"),
    ];
    const OUTPUTS: &'static [PortSpec] = &[
        PortSpec::optional("model", PortKind::Model, "the trained policy"),
        PortSpec::optional("reports", PortKind::Reports, "each task's group rewards and pass rate"),
    ];

    fn validate(&self, _ctx: &StageContext) -> Vec<String> {
        let mut problems = self.optim.problems();
        if self.group < 2 {
            problems.push("group must be at least 2 (advantages compare responses of a group)".into());
        }
        if self.prompts_per_step == 0 || self.mini_batch == 0 || self.mini_batch > self.prompts_per_step {
            problems.push("mini_batch must be between 1 and prompts_per_step".into());
        }
        if self.min_input >= self.max_input {
            problems.push(format!("min_input ({}) must be below max_input ({})", self.min_input, self.max_input));
        }
        if self.overlong_buffer > self.max_output {
            problems.push("overlong_buffer must not exceed max_output".into());
        }
        problems.extend(self.bound_problems());
        if let Some([a, b]) = self.accuracy_band
            && (!(0.0..=1.0).contains(&a) || !(0.0..=1.0).contains(&b) || a > b)
        {
            problems.push("accuracy_band must be [a, b] with 0 <= a <= b <= 1".into());
        }
        if let Some(rollout) = &self.rollout {
            problems.extend(rollout.problems());
            problems.extend(rollout.request_problem(self.group, self.max_output));
        }
        problems
    }

    fn check_plan(plan: &PlanView, node: usize) -> Vec<(usize, String)> {
        phase_problems(plan, node)
    }

    fn report_figures(label: &str, summary: &serde_json::Map<String, serde_json::Value>) -> Vec<ReportFigure> {
        let Some(accuracy) = summary.get("accuracy").and_then(serde_json::Value::as_f64) else { return Vec::new() };
        vec![ReportFigure {
            section: "Curriculum",
            kind: "phase-accuracy",
            caption: "Accuracy of each RL phase's rollouts".into(),
            chart: Chart::SharedBar {
                title: "Accuracy per phase".into(),
                y_label: "accuracy".into(),
                bar: (label.to_string(), accuracy),
                y_max: Some(1.0),
            },
        }]
    }

    const WRITES_FILES: bool = true;

    fn writes(&self, ctx: &StageContext) -> Vec<PathBuf> {
        vec![ctx.output_path(Path::new(&format!("rl-{}", ctx.node)))]
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let out_dir = ctx
            .run_dir
            .as_ref()
            .map(|d| d.join(format!("rl-{}", ctx.node)))
            .ok_or_else(|| StageError::Invalid("rl_phase needs a run directory".into()))?;
        Ok(Driver::boxed(RlPhase { config: self, run_seed: ctx.seed }, ctx, Some(out_dir)))
    }
}

impl RlPhaseConfig {
    /// The dtype of saved weights: `save_dtype`, else the precision's default.
    pub fn save_dtype(&self) -> SaveDtype {
        self.save_dtype.unwrap_or(self.precision.default_save_dtype())
    }

    /// Sampling settings, sizes within [`limits`], and the reward rule.
    fn bound_problems(&self) -> Vec<String> {
        let mut problems = self.rule.problems();
        if self.max_output == 0 || self.epochs == 0 || self.ppo_epochs == 0 || self.max_tries == 0 {
            problems.push("max_output, epochs, ppo_epochs and max_tries must be at least 1".into());
        }
        if self.decode_rows == 0 {
            problems.push("decode_rows must be at least 1".into());
        }
        if self.devices == 0 || self.devices > crate::parallel::MAX_DEVICES {
            problems.push(format!("devices must be between 1 and {}", crate::parallel::MAX_DEVICES));
        }
        problems.extend(sampling_problems(self.temperature, self.top_p, false));
        problems.extend(self.loss_problems());
        let sizes = [
            ("max_input", self.max_input, limits::TOKENS),
            ("prompt_room", self.prompt_room, limits::TOKENS),
            ("max_output", self.max_output, limits::TOKENS),
            ("group", self.group, limits::GROUP),
            ("prompts_per_step", self.prompts_per_step, limits::GROUP),
            ("decode_rows", self.decode_rows, limits::GROUP),
            ("epochs", self.epochs, limits::PASSES),
            ("ppo_epochs", self.ppo_epochs, limits::PASSES),
            ("max_tries", self.max_tries, limits::PASSES),
        ];
        problems.extend(sizes.iter().filter_map(|(name, value, max)| at_most(name, *value, *max)));
        problems
    }
}

impl RlPhaseConfig {
    /// The loss coefficients: clip ranges within (0, 1] (a ratio clipped below 0 or a range
    /// of 0 stops learning), penalties not negative (a negative KL coefficient rewards
    /// drifting away), all finite.
    fn loss_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, value) in [("eps_low", self.eps_low), ("eps_high", self.eps_high)] {
            if !(value > 0.0 && value <= 1.0) {
                problems.push(format!("{name} must be within (0, 1], got {value}"));
            }
        }
        for (name, value) in [("kl_coef", self.kl_coef), ("entropy_coef", self.entropy_coef)] {
            if !(value >= 0.0 && value.is_finite()) {
                problems.push(format!("{name} must be 0 or a positive number, got {value}"));
            }
        }
        problems
    }
}

/// The `rl_phase` stage, independent of the backend.
struct RlPhase {
    config: RlPhaseConfig,
    run_seed: u64,
}

/// The reports a phase sent, saved beside its weights (and in its checkpoints).
const REPORTS_FILE: &str = "reports.jsonl";

impl ModelStage for RlPhase {
    type State = RlState;
    type Run<B: TrainBackend> = RlRun<B>;

    fn rule(&self) -> RuleConfig {
        self.config.rule.clone()
    }

    fn cadence(&self) -> Cadence {
        Cadence { every: self.config.checkpoint_every, keep: self.config.keep_checkpoints }
    }

    fn prepare<B: TrainBackend>(&self, inputs: StageInputs, device: B::Device, io: &mut StageIo) -> Result<RlRun<B>, StageError> {
        RlRun::prepare(&self.config, self.run_seed, inputs, device, io)
    }

    fn republish(&self, done: &Done, _out_dir: Option<&Path>, io: &mut StageIo) -> Result<(), StageError> {
        if let Some(dir) = &done.model {
            send_reports(io, &read_reports(&dir.join(REPORTS_FILE))?)?;
        }
        Ok(())
    }
}

/// Where a phase stands between steps: everything a resumed run needs besides the weights,
/// the optimizer and the reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RlState {
    /// Optimizer updates done (the schedule's position).
    update: usize,
    /// Steps that could not be filled with `prompts_per_step` groups.
    short_steps: usize,
    /// Task indices still to draw, in order.
    queue: VecDeque<usize>,
    totals: RolloutStats,
    last_reward_mean: Option<f64>,
    /// Whether the optimizer moments came from the previous phase.
    optimizer_carried: bool,
}

/// What a step's rollouts saw (also summed over the phase).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RolloutStats {
    tried: usize,
    dropped_zero_variance: usize,
    dropped_band: usize,
    dropped_unscorable: usize,
    scorable: usize,
    unscorable: usize,
    truncated: usize,
    responses: usize,
    correct: usize,
    reward_sum: f64,
    length_sum: usize,
    pass_rate_histogram: [usize; 5],
    /// Remote rollouts: the summed absolute difference between the servers' and the
    /// trainer's log-probs, over `logprob_tokens` tokens, and the groups whose old log-probs
    /// the trainer recomputed (per step; not summed over the phase).
    #[serde(default)]
    logprob_diff_sum: f64,
    #[serde(default)]
    logprob_tokens: usize,
    #[serde(default)]
    recomputed: usize,
}

impl RolloutStats {
    fn accumulate(&mut self, step: &RolloutStats) {
        self.tried += step.tried;
        self.dropped_zero_variance += step.dropped_zero_variance;
        self.dropped_band += step.dropped_band;
        self.dropped_unscorable += step.dropped_unscorable;
        self.scorable += step.scorable;
        self.unscorable += step.unscorable;
        self.truncated += step.truncated;
        self.responses += step.responses;
        self.correct += step.correct;
    }

    fn filtered(&self) -> usize {
        self.dropped_zero_variance + self.dropped_band + self.dropped_unscorable
    }
}

/// What a step's updates saw.
#[derive(Debug, Clone, Default)]
struct TrainStats {
    sums: LossSums,
    loss: f64,
    grad_norm: f64,
    lr: f64,
    tokens: usize,
    seconds: f64,
}

/// One line of an RL phase's metrics.
#[derive(Debug, Clone, Serialize)]
pub struct RlStepMetrics {
    reward_mean: f64,
    accuracy: f64,
    /// Groups by pass rate: 0, (0, 1/4], (1/4, 1/2], (1/2, 1), 1.
    pass_rate_histogram: [usize; 5],
    entropy: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    kl: Option<f64>,
    clip_fraction: f64,
    ratio_mean: f64,
    response_length: f64,
    truncation_rate: f64,
    groups_kept: usize,
    groups_filtered: usize,
    groups_zero_variance: usize,
    groups_outside_band: usize,
    prompts_tried: usize,
    unscorable: usize,
    rollout_tokens_per_s: f64,
    train_tokens_per_s: f64,
    loss: f64,
    grad_norm: f64,
    lr: f64,
    /// Remote rollouts: the weights version every rollout of the step came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    weights_version: Option<String>,
    /// Remote rollouts: mean absolute difference between the servers' log-probs of the
    /// sampled tokens and the trainer's.
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout_logprob_diff: Option<f64>,
    /// Remote rollouts: groups whose old log-probs the trainer recomputed (the servers'
    /// differed beyond `logprob_tolerance`, or were missing).
    #[serde(skip_serializing_if = "Option::is_none")]
    groups_logprobs_recomputed: Option<usize>,
    /// Remote rollouts: servers still in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout_servers: Option<usize>,
}

/// The frozen inputs of a group's backward besides the weights (shared by data-parallel
/// replicas).
struct GroupScoring<'a, B: TrainBackend> {
    reference: Option<&'a CausalLm<B::InnerBackend>>,
    temperature: f32,
    loss: &'a LossConfig,
    micro_batch_tokens: usize,
}

impl<B: TrainBackend> Clone for GroupScoring<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: TrainBackend> Copy for GroupScoring<'_, B> {}

impl<'a, B: TrainBackend> GroupScoring<'a, B> {
    /// The phase's settings for a group's backward (built from fields, so that the
    /// trainer can be borrowed mutably beside it).
    fn of(config: &RlPhaseConfig, reference: Option<&'a CausalLm<B::InnerBackend>>, loss: &'a LossConfig) -> Self {
        Self { reference, temperature: config.temperature, loss, micro_batch_tokens: config.micro_batch_tokens }
    }

    /// Adds one group's loss gradients to `trainer` (the phase's own, or a replica's).
    fn backward(
        &self,
        trainer: &mut Trainer<B, CausalLm<B>>,
        group: &Group,
        normalizer: crate::rl::loss::Normalizer,
    ) -> Result<(f64, crate::rl::loss::LossSums), StageError> {
        group_backward(trainer, self.reference, group, self.temperature, self.loss, normalizer, self.micro_batch_tokens)
    }
}

/// An RL phase on one backend.
pub struct RlRun<B: TrainBackend> {
    config: RlPhaseConfig,
    run_seed: u64,
    policy_dir: PathBuf,
    model_config: ModelConfig,
    device: B::Device,
    /// The data-parallel replicas' devices (the run's device first).
    replica_devices: Vec<B::Device>,
    /// Optimizer updates of this process whose gradients came from more than one replica.
    parallel_updates: usize,
    tokenizer: ModelTokenizer,
    trainer: Trainer<B, CausalLm<B>>,
    /// The frozen starting policy, when the loss has a KL term.
    reference: Option<CausalLm<B::InnerBackend>>,
    reward: Arc<Reward>,
    /// The phase's tasks with their encoded prompts.
    tasks: Vec<(Record, Vec<u32>)>,
    passed_by: usize,
    carried_tasks: usize,
    stop_tokens: Vec<u32>,
    total_steps: usize,
    updates_per_step: usize,
    loss: LossConfig,
    state: RlState,
    /// Every report sent, saved with checkpoints and replayed on resume.
    reports: Vec<DifficultyReport>,
    started: Instant,
    /// Where the groups are sampled.
    rollouts: Rollouts,
}

impl<B: TrainBackend> RlRun<B> {
    fn prepare(
        config: &RlPhaseConfig,
        run_seed: u64,
        inputs: StageInputs,
        device: B::Device,
        io: &mut StageIo,
    ) -> Result<Self, StageError> {
        let tokenizer = ModelTokenizer::load(&inputs.policy.dir)?;
        let recompute = config.recompute.resolve(config.max_input + config.prompt_room + config.max_output);
        let (model_config, model) = load_training_weights::<B>(&inputs.policy.dir, &device)?;
        let model = model.with_recompute(recompute);
        let compute = config.precision.resolve::<B>(&device);
        let reference = (config.kl_coef > 0.0).then(|| cast_model(model.valid(), compute));
        let (tasks, passed_by, carried_tasks) = phase_tasks(config, &tokenizer, inputs.records)?;
        if let Some(dir) = &inputs.out_dir {
            write_task_list(dir, &tasks)?;
        }
        if tasks.is_empty() {
            return Err(StageError::Failed(format!(
                "{}: no task falls within ({}, {}] tokens ({passed_by} passed by)",
                io.label(),
                config.min_input,
                config.max_input
            )));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed ^ run_seed.rotate_left(41));
        let mut queue: VecDeque<usize> = VecDeque::new();
        for _ in 0..config.epochs {
            let mut order: Vec<usize> = (0..tasks.len()).collect();
            order.shuffle(&mut rng);
            queue.extend(order);
        }
        let total_steps = config.max_steps.map_or(usize::MAX, |m| m).min(queue.len().div_ceil(config.prompts_per_step));
        let mut trainer = Trainer::<B, CausalLm<B>>::new(model, config.optim.clone()).with_compute(compute);
        let previous_state = inputs.policy.dir.join(OPTIMIZER_FILE);
        let optimizer_carried = config.optimizer_state == OptimizerState::Carry && previous_state.is_file();
        if optimizer_carried {
            trainer = trainer.load_state(&previous_state, &device)?;
            tracing::info!(stage = %io.label(), parameters = trainer.state_len(), "continuing the optimizer state of {}", inputs.policy.dir.display());
        }
        let mut stop_tokens = tokenizer.stop_ids.clone();
        stop_tokens.extend(model_config.eos_ids());
        let weights_dir = inputs.out_dir.as_ref().map(|d| d.with_file_name(format!("{}-rollout-weights", io.label().replace('#', "-"))));
        let rollouts = Rollouts::connect(config.rollout.as_ref(), io.label(), weights_dir, model_config.vocab_size, io.cancel_token())?;
        Ok(Self {
            config: config.clone(),
            run_seed,
            policy_dir: inputs.policy.dir,
            model_config,
            replica_devices: crate::parallel::replica_devices::<B>(&device, config.devices),
            parallel_updates: 0,
            device,
            tokenizer,
            trainer,
            reference,
            reward: inputs.reward,
            tasks,
            passed_by,
            carried_tasks,
            stop_tokens,
            total_steps,
            updates_per_step: config.prompts_per_step.div_ceil(config.mini_batch) * config.ppo_epochs,
            loss: LossConfig {
                eps_low: config.eps_low,
                eps_high: config.eps_high,
                aggregation: config.aggregation,
                kl_coef: config.kl_coef,
                kl_estimator: config.kl_estimator,
                entropy_coef: config.entropy_coef,
                norm_length: config.max_output as f32,
            },
            state: RlState { update: 0, short_steps: 0, queue, totals: RolloutStats::default(), last_reward_mean: None, optimizer_carried },
            reports: Vec::new(),
            started: Instant::now(),
            rollouts,
        })
    }

    /// Samples groups until the step is full (dynamic sampling), sending a difficulty report
    /// for every task tried. The step's prompts decode together, up to `decode_rows` rows at
    /// once; tasks are tried, judged and kept exactly as one at a time would
    /// ([`fill_step_batched`]).
    fn rollouts(&mut self, step: usize, io: &mut StageIo) -> Result<(Vec<Group>, RolloutStats, bool), StageError> {
        // Rollouts in the compute dtype too (bf16 under mixed precision), so that their
        // log-probs are those the loss recomputes.
        let inference = cast_model(self.trainer.model().valid(), self.trainer.compute_dtype());
        // Rollout servers first load the policy as it is now (once per optimizer update).
        let version = format!("{}:{}", io.label(), self.state.update);
        self.rollouts.sync_model(&inference, &self.model_config, &self.policy_dir, &version)?;
        let cancel = io.cancel_token().clone();
        let mut local;
        let mut remote;
        let source: &mut dyn RolloutSink = match self.rollouts.remote() {
            Some(servers) => {
                remote = RemoteBatch::new(servers, &cancel);
                &mut remote
            }
            None => {
                local = BatchDecoder::new(&inference, BatchOptions { max_rows: self.config.decode_rows, sample_on: self.config.sample_on });
                &mut local
            }
        };
        let mut stats = RolloutStats::default();
        let tries = self.config.prompts_per_step * self.config.max_tries;
        let mut queue = std::mem::take(&mut self.state.queue);
        let context = RolloutContext {
            config: &self.config,
            tasks: &self.tasks,
            tokenizer: &self.tokenizer,
            reward: &self.reward,
            stop_tokens: &self.stop_tokens,
            run_seed: self.run_seed,
            step,
            // Servers' log-probs are checked against the trainer's (and replaced if they differ).
            logprob_check: self.rollouts.remote().map(|_| &inference),
        };
        let reports = &mut self.reports;
        // A step samples many groups: a stopped run does not wait for all of them.
        let filled = fill_step_batched(
            &mut queue,
            self.config.prompts_per_step,
            tries,
            source,
            |index| context.request(index),
            |index, completions| context.rollout_task(index, completions, &mut stats, reports, io),
            || cancel.check(),
        );
        self.state.queue = queue;
        let filled = filled?;
        stats.tried = filled.tried;
        Ok((filled.kept, stats, filled.short))
    }

    /// PPO-clip updates over mini-batches of the step's groups, in an order drawn from the
    /// step's own stream (so a resumed run draws the same).
    fn train(&mut self, groups: &[Group], step: usize, label: &str) -> Result<TrainStats, StageError> {
        let (ppo_epochs, mini_batch) = (self.config.ppo_epochs, self.config.mini_batch);
        let mut step_rng = rand_chacha::ChaCha8Rng::seed_from_u64(rng_seed(self.config.seed ^ 0x5eed, self.run_seed, step, 0));
        let started = Instant::now();
        let _autodiff = crate::train::autodiff_lock();
        let mut stats = TrainStats::default();
        for _ in 0..ppo_epochs {
            let mut order: Vec<usize> = (0..groups.len()).collect();
            order.shuffle(&mut step_rng);
            for chunk in order.chunks(mini_batch) {
                let normalizer = normalizer(groups, chunk);
                if normalizer.responses == 0.0 {
                    continue;
                }
                let parts = if self.replica_devices.len() > 1 {
                    self.chunk_backward_parallel(groups, chunk, normalizer)?
                } else {
                    let scoring = GroupScoring::of(&self.config, self.reference.as_ref(), &self.loss);
                    let mut parts = Vec::with_capacity(chunk.len());
                    for &g in chunk {
                        parts.push(scoring.backward(&mut self.trainer, &groups[g], normalizer)?);
                    }
                    parts
                };
                for (&g, (loss, part)) in chunk.iter().zip(parts) {
                    stats.loss += loss;
                    stats.sums = stats.sums.add(&part);
                    stats.tokens += groups[g].prompt.len() + groups[g].responses.iter().map(Vec::len).sum::<usize>();
                }
                let info = self
                    .trainer
                    .step(self.state.update, self.total_steps * self.updates_per_step)
                    .map_err(|why| StageError::Failed(format!("{label}: {why}")))?;
                self.state.update += 1;
                stats.grad_norm = info.grad_norm;
                stats.lr = info.lr;
            }
        }
        stats.seconds = started.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// One mini-batch's gradients over the N data-parallel replicas: replica r takes groups
    /// r, r + N, ... of `chunk` on its own device; the summed gradients go to the phase's
    /// trainer. Returns each group's loss and figures in `chunk` order.
    fn chunk_backward_parallel(
        &mut self,
        groups: &[Group],
        chunk: &[usize],
        normalizer: crate::rl::loss::Normalizer,
    ) -> Result<Vec<(f64, crate::rl::loss::LossSums)>, StageError> {
        let positions: Vec<usize> = (0..chunk.len()).collect();
        let shares = crate::parallel::shares(&positions, self.replica_devices.len());
        let devices = &self.replica_devices[..shares.len()];
        self.parallel_updates += usize::from(shares.len() > 1);
        let (optim, compute) = (self.trainer.config().clone(), self.trainer.compute_dtype());
        // The KL reference, if any, on each replica's device.
        let references: Vec<Option<CausalLm<B::InnerBackend>>> =
            devices.iter().map(|device| self.reference.as_ref().map(|reference| reference.clone().fork(device))).collect();
        let scoring = GroupScoring::of(&self.config, self.reference.as_ref(), &self.loss);
        let (grads, outputs) = crate::parallel::all_reduce_gradients(self.trainer.model(), devices, |r, model| {
            let scoring = GroupScoring { reference: references[r].as_ref(), ..scoring };
            let mut replica = Trainer::new(model, optim.clone()).with_compute(compute);
            let mut parts = Vec::with_capacity(shares[r].len());
            for &position in &shares[r] {
                parts.push((position, scoring.backward(&mut replica, &groups[chunk[position]], normalizer)?));
            }
            Ok((replica.take_gradients(), parts))
        })?;
        self.trainer.accumulate_params(grads);
        let mut parts: Vec<(usize, (f64, crate::rl::loss::LossSums))> = outputs.into_iter().flatten().collect();
        parts.sort_by_key(|(position, _)| *position);
        Ok(parts.into_iter().map(|(_, part)| part).collect())
    }

    /// Warns, the first time and whenever nothing was kept, that a step is short.
    fn warn_short(&mut self, step: usize, kept: usize, tried: usize, label: &str) {
        self.state.short_steps += 1;
        if self.state.short_steps > 1 && kept > 0 {
            return;
        }
        let message = if self.state.queue.is_empty() {
            "the phase's prompts ran out before the step was full; training on the groups there are"
        } else {
            "the try bound was hit before the step was full (too many groups all correct or all wrong, or with equal rewards); training on the groups there are (raise max_tries or adjust the accuracy band; with a reward that is not a 0/1 correctness, set dynamic_sampling_metric: \"reward\")"
        };
        tracing::warn!(stage = %label, step, kept, wanted = self.config.prompts_per_step, tried, "{message}");
    }
}

impl<B: TrainBackend> StageRun<B> for RlRun<B> {
    type State = RlState;
    type Metrics = RlStepMetrics;

    fn total_steps(&self) -> usize {
        self.total_steps
    }

    fn restore(&mut self, dir: &Path, state: RlState, io: &mut StageIo) -> Result<(), StageError> {
        if let Some(bad) = state.queue.iter().find(|&&index| index >= self.tasks.len()) {
            return Err(StageError::Failed(format!(
                "{}: the checkpoint's task queue names task {bad}, but the phase has {} tasks; it belongs to another run",
                dir.join("state.json").display(),
                self.tasks.len()
            )));
        }
        let weights = load_training_weights::<B>(dir, &self.device)?.1.with_recompute(self.trainer.model().recompute);
        self.trainer = Trainer::new(weights, self.config.optim.clone())
            .with_compute(self.trainer.compute_dtype())
            .load_state(&dir.join(OPTIMIZER_FILE), &self.device)?;
        self.state = state;
        self.reports = read_reports(&dir.join(REPORTS_FILE))?;
        send_reports(io, &self.reports)
    }

    fn step(&mut self, step: usize, io: &mut StageIo) -> Result<StepOutcome<RlStepMetrics>, StageError> {
        let rollout_started = Instant::now();
        let (mut groups, stats, short) = self.rollouts(step, io)?;
        let rollout_s = rollout_started.elapsed().as_secs_f64();
        if short {
            self.warn_short(step, groups.len(), stats.tried, io.label());
        }
        let all: Vec<Option<f32>> = groups.iter().flat_map(|g| g.rewards.iter().copied()).collect();
        let batch_std = mean_std(&all).map_or(0.0, |(_, s)| s);
        for group in &mut groups {
            group.advantages = group_advantages(&group.rewards, self.config.std_scaling, batch_std);
        }
        let train = self.train(&groups, step, io.label())?;
        let responses = stats.responses.max(1) as f64;
        let reward_mean = stats.reward_sum / stats.scorable.max(1) as f64;
        self.state.last_reward_mean = Some(reward_mean);
        self.state.totals.accumulate(&stats);
        let tokens = f64::from(train.sums.tokens.max(1.0));
        let metrics = RlStepMetrics {
            reward_mean,
            accuracy: stats.correct as f64 / responses,
            pass_rate_histogram: stats.pass_rate_histogram,
            entropy: f64::from(train.sums.entropy_sum) / tokens,
            kl: (self.config.kl_coef > 0.0).then(|| f64::from(train.sums.kl_sum) / tokens),
            clip_fraction: f64::from(train.sums.clipped_tokens) / tokens,
            ratio_mean: f64::from(train.sums.ratio_sum) / tokens,
            response_length: stats.length_sum as f64 / responses,
            truncation_rate: stats.truncated as f64 / responses,
            groups_kept: groups.len(),
            groups_filtered: stats.filtered(),
            groups_zero_variance: stats.dropped_zero_variance,
            groups_outside_band: stats.dropped_band,
            prompts_tried: stats.tried,
            unscorable: stats.unscorable,
            rollout_tokens_per_s: stats.length_sum as f64 / rollout_s.max(1e-9),
            train_tokens_per_s: train.tokens as f64 / train.seconds.max(1e-9),
            loss: train.loss,
            grad_norm: train.grad_norm,
            lr: train.lr,
            weights_version: None,
            rollout_logprob_diff: None,
            groups_logprobs_recomputed: None,
            rollout_servers: None,
        };
        let metrics = match self.rollouts.remote() {
            Some(servers) => RlStepMetrics {
                weights_version: servers.loaded_version(),
                rollout_logprob_diff: (stats.logprob_tokens > 0).then(|| stats.logprob_diff_sum / stats.logprob_tokens as f64),
                groups_logprobs_recomputed: Some(stats.recomputed),
                rollout_servers: Some(servers.alive().len()),
                ..metrics
            },
            None => metrics,
        };
        let status = format!("reward {reward_mean:.3} acc {:.2}", metrics.accuracy);
        Ok(StepOutcome { metrics: Some(metrics), status, last: self.state.queue.is_empty() })
    }

    fn checkpoint(&self, dir: &Path) -> Result<RlState, StageError> {
        write_training_state(dir, &self.trainer, &self.model_config, &self.policy_dir, self.config.save_dtype())?;
        write_reports(&dir.join(REPORTS_FILE), &self.reports)?;
        Ok(self.state.clone())
    }

    fn finish(self, out_dir: Option<&Path>, io: &mut StageIo) -> Result<Option<PathBuf>, StageError> {
        let dir = out_dir.ok_or_else(|| StageError::Invalid("rl_phase needs a run directory".into()))?;
        let model = self.trainer.model().valid();
        save_model(&model, &self.model_config, dir, self.config.save_dtype())?;
        write_master_weights(&model, &self.model_config, dir, self.config.save_dtype())?;
        copy_tokenizer_files(&self.policy_dir, dir)?;
        self.trainer.save_state(&dir.join(OPTIMIZER_FILE))?;
        write_reports(&dir.join(REPORTS_FILE), &self.reports)?;
        let totals = &self.state.totals;
        let summary = io.summary_mut();
        summary.insert("tasks".into(), self.tasks.len().into());
        summary.insert("passed_by".into(), self.passed_by.into());
        summary.insert("carried_tasks".into(), self.carried_tasks.into());
        summary.insert("updates".into(), self.state.update.into());
        summary.insert("precision".into(), self.config.precision.as_str().into());
        summary.insert("parallel_updates".into(), self.parallel_updates.into());
        summary.insert("optimizer_state".into(), (if self.state.optimizer_carried { "carried" } else { "fresh" }).into());
        summary.insert("prompts_tried".into(), totals.tried.into());
        summary.insert("groups_filtered".into(), totals.filtered().into());
        summary.insert("short_steps".into(), self.state.short_steps.into());
        summary.insert("unscorable".into(), totals.unscorable.into());
        summary.insert("truncated".into(), totals.truncated.into());
        summary.insert("accuracy".into(), (totals.correct as f64 / totals.responses.max(1) as f64).into());
        summary.insert("final_reward_mean".into(), self.state.last_reward_mean.unwrap_or(f64::NAN).into());
        summary.insert("reports".into(), self.reports.len().into());
        summary.insert("wall_s".into(), self.started.elapsed().as_secs_f64().into());
        summary.insert("checkpoint".into(), dir.display().to_string().into());
        if let Some(servers) = self.rollouts.remote() {
            summary.insert("rollout_requests".into(), serde_json::json!(servers.answered()));
            summary.insert("rollout_servers_left".into(), serde_json::json!(servers.alive()));
        }
        Ok(Some(dir.to_path_buf()))
    }
}

/// What a task's rollout reads from its phase, borrowed apart from the rest of the run (so
/// that the step's groups can be requested and judged while they decode together). A task's
/// completions may come from any [`crate::rl::rollout::Rollouts`].
struct RolloutContext<'a, B: longrl_backends::CustomGrad> {
    config: &'a RlPhaseConfig,
    tasks: &'a [(Record, Vec<u32>)],
    tokenizer: &'a ModelTokenizer,
    reward: &'a Reward,
    stop_tokens: &'a [u32],
    run_seed: u64,
    step: usize,
    /// The model that checks the rollouts' log-probs, when they come from servers.
    logprob_check: Option<&'a CausalLm<B>>,
}

impl<B: longrl_backends::CustomGrad> RolloutContext<'_, B> {
    /// Task `index`'s group: G samples of its prompt, from the task's own seed for the step.
    fn request(&self, index: usize) -> GroupRequest {
        let config = self.config;
        let sampling = SamplingConfig {
            temperature: config.temperature,
            top_p: config.top_p,
            top_k: 0,
            max_new_tokens: config.max_output,
            stop_tokens: self.stop_tokens.to_vec(),
            seed: rng_seed(config.seed, self.run_seed, self.step, index),
        };
        GroupRequest::group(self.tasks[index].1.clone(), config.group, sampling)
    }

    /// One task's group: its G samples scored, rewards with overlong shaping, its report;
    /// `None` when dynamic sampling drops it.
    fn rollout_task(
        &self,
        index: usize,
        completions: Vec<Completion>,
        stats: &mut RolloutStats,
        reports: &mut Vec<DifficultyReport>,
        io: &mut StageIo,
    ) -> Result<Option<Group>, StageError> {
        let config = self.config;
        let (record, prompt) = &self.tasks[index];
        let rollout = score_group(self.tokenizer, record, completions, self.stop_tokens, self.reward)?;
        stats.truncated += rollout.truncated();
        stats.correct += (0..rollout.completions.len()).filter(|&i| rollout.correct(i)).count();
        let mut rewards = Vec::with_capacity(rollout.completions.len());
        for (completion, outcome) in rollout.completions.iter().zip(&rollout.outcomes) {
            stats.responses += 1;
            stats.length_sum += completion.tokens.len();
            let shaped = outcome.score.map(|s| {
                if config.overlong_buffer > 0 {
                    s + overlong_penalty(completion.tokens.len(), config.max_output, config.overlong_buffer)
                } else {
                    s
                }
            });
            match shaped {
                Some(r) => stats.reward_sum += f64::from(r),
                None => stats.unscorable += 1,
            }
            rewards.push(shaped);
        }
        stats.scorable += rewards.iter().filter(|r| r.is_some()).count();
        // Difficulty and filtering follow correctness, not the shaped rewards.
        let difficulty = rollout.difficulty();
        let pass_rate = difficulty.pass_rate;
        if let Some(rate) = pass_rate {
            stats.pass_rate_histogram[pass_rate_bin(rate)] += 1;
        }
        let report = DifficultyReport { record: record.clone(), difficulty };
        send_reports(io, std::slice::from_ref(&report))?;
        reports.push(report);
        let filter = GroupFilter { dynamic: config.dynamic_sampling, metric: config.dynamic_sampling_metric, band: config.accuracy_band };
        match filter.drop_reason(&rewards, pass_rate) {
            None => {
                let responses: Vec<Vec<u32>> = rollout.completions.iter().map(|c| c.tokens.clone()).collect();
                let mut old_logprobs: Vec<Vec<f32>> = rollout.completions.iter().map(|c| c.logprobs.clone()).collect();
                if let Some(model) = self.logprob_check {
                    old_logprobs = checked_logprobs(model, prompt, &responses, old_logprobs, config, stats)?;
                }
                Ok(Some(Group { prompt: prompt.clone(), responses, old_logprobs, rewards, advantages: Vec::new() }))
            }
            Some(reason) => {
                match reason {
                    DropReason::ZeroVariance => stats.dropped_zero_variance += 1,
                    DropReason::OutsideBand => stats.dropped_band += 1,
                    DropReason::Unscorable => stats.dropped_unscorable += 1,
                }
                Ok(None)
            }
        }
    }
}

/// A phase's tasks with their encoded prompts, and how many were passed by and carried.
type PhaseTasks = (Vec<(Record, Vec<u32>)>, usize, usize);

/// The phase's tasks, inside (min_input, max_input] or carried by a buffer, with their
/// prompts encoded once; and the counts of tasks passed by and carried.
fn phase_tasks(config: &RlPhaseConfig, tokenizer: &ModelTokenizer, records: Vec<Record>) -> Result<PhaseTasks, StageError> {
    let (mut tasks, mut passed_by, mut carried) = (Vec::new(), 0usize, 0usize);
    for record in records {
        let (prompt, _) = encode_prompt(tokenizer, &record, config.max_input + config.prompt_room)?;
        let length = record.length(prompt.len());
        // Tasks carried from an earlier phase's buffer keep their own length.
        let is_carried = record.carried_from.is_some();
        if !is_carried && (length <= config.min_input || length > config.max_input) {
            passed_by += 1;
            continue;
        }
        carried += usize::from(is_carried);
        tasks.push((record, prompt));
    }
    let beyond_share = cap_carried(&mut tasks);
    Ok((tasks, passed_by + beyond_share, carried - beyond_share))
}

/// Drops the carried tasks beyond their buffer's share of the phase's tasks (see
/// [`carried_beyond_share`]). Returns how many were dropped.
fn cap_carried(tasks: &mut Vec<(Record, Vec<u32>)>) -> usize {
    let dropped = carried_beyond_share(&tasks.iter().map(|(r, _)| r).collect::<Vec<_>>());
    let mut index = 0;
    tasks.retain(|_| {
        index += 1;
        !dropped.contains(&(index - 1))
    });
    dropped.len()
}

/// `tasks.jsonl` in the phase's directory: each task's id, length, prompt tokens and
/// whether a buffer carried it.
fn write_task_list(dir: &Path, tasks: &[(Record, Vec<u32>)]) -> Result<(), StageError> {
    let mut lines = String::new();
    for (record, prompt) in tasks {
        let line = serde_json::json!({
            "id": record.id,
            "length": record.length(prompt.len()),
            "prompt_tokens": prompt.len(),
            "carried": record.carried_from.is_some(),
        });
        lines.push_str(&format!("{line}\n"));
    }
    write_atomic(&dir.join("tasks.jsonl"), lines.as_bytes())
}

fn send_reports(io: &mut StageIo, reports: &[DifficultyReport]) -> Result<(), StageError> {
    if io.output_connected("reports") {
        for report in reports {
            io.send_report("reports", report.clone())?;
        }
    }
    Ok(())
}

fn write_reports(path: &Path, reports: &[DifficultyReport]) -> Result<(), StageError> {
    let mut text = String::new();
    for report in reports {
        text.push_str(&serde_json::to_string(report).map_err(|e| StageError::Failed(e.to_string()))?);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

fn read_reports(path: &Path) -> Result<Vec<DifficultyReport>, StageError> {
    let text = std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| StageError::BadRecord { path: path.to_path_buf(), line: i + 1, message: e.to_string() })
        })
        .collect()
}

/// The old policy's log-probs of a group sampled elsewhere: the servers' when they agree
/// with the trainer's within `logprob_tolerance` (mean absolute difference over the
/// group's tokens), else the trainer's own (as verl recomputes them). The difference is
/// added to the step's figures.
fn checked_logprobs<B: longrl_backends::CustomGrad>(
    model: &CausalLm<B>,
    prompt: &[u32],
    responses: &[Vec<u32>],
    servers: Vec<Vec<f32>>,
    config: &RlPhaseConfig,
    stats: &mut RolloutStats,
) -> Result<Vec<Vec<f32>>, StageError> {
    let scores = crate::model::score::score_group_at(model, prompt, responses, config.temperature)?;
    let width = responses.iter().map(Vec::len).max().unwrap_or(0);
    let flat = scores
        .logprobs
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| StageError::Failed(format!("cannot read log-probs: {e:?}")))?;
    let own: Vec<Vec<f32>> = responses.iter().enumerate().map(|(i, r)| flat[i * width..i * width + r.len()].to_vec()).collect();
    let (mut diff, mut tokens, mut missing) = (0.0f64, 0usize, false);
    for (theirs, ours) in servers.iter().zip(&own) {
        for (a, b) in theirs.iter().zip(ours) {
            if a.is_finite() {
                diff += f64::from((a - b).abs());
                tokens += 1;
            } else {
                missing = true;
            }
        }
    }
    stats.logprob_diff_sum += diff;
    stats.logprob_tokens += tokens;
    let tolerance = config.rollout.as_ref().map_or(0.0, |r| r.logprob_tolerance);
    if missing || diff / tokens.max(1) as f64 > tolerance {
        stats.recomputed += 1;
        Ok(own)
    } else {
        Ok(servers)
    }
}

fn rng_seed(seed: u64, run_seed: u64, step: usize, tried: usize) -> u64 {
    seed ^ run_seed.rotate_left(13) ^ ((step as u64) << 20) ^ tried as u64
}
