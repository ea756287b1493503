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

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use longrl_backends::BackendTask;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Done, StageCheckpoints, republish, write_training_state};
use crate::error::StageError;
use crate::fsutil::write_atomic;
use crate::model::chat::ModelTokenizer;
use crate::model::checkpoint::{SaveDtype, copy_tokenizer_files};
use crate::model::generate::SamplingConfig;
use crate::model::score::score_group_at;
use crate::model::{CausalLm, load_model, save_model};
use crate::progress::Progress;
use crate::prompt::encode_prompt;
use crate::record::Record;
use crate::reward::RuleConfig;
use crate::reward::hybrid::Reward;
use crate::rl::advantage::{StdScaling, group_advantages, mean_std};
use crate::rl::dynamic::{Drop, drop_reason, fill_step};
use crate::rl::loss::{Aggregation, KlEstimator, LossConfig, LossSums, Normalizer, policy_loss};
use crate::rl::rollout::{pass_rate_bin, rollout_group};
use crate::rl::shaping::overlong_penalty;
use crate::stage::{DifficultyReport, ModelRef, PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};
use crate::train::{OptimConfig, Trainer};

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
    /// Prompts per optimizer step (mini-batch); `prompts_per_step / mini_batch` updates per step.
    #[serde(default = "default_mini_batch")]
    pub mini_batch: usize,
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
    #[serde(default = "default_temperature")]
    pub temperature: f32,
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
    #[serde(default)]
    pub kl_estimator: KlEstimator,
    /// Entropy bonus.
    #[serde(default)]
    pub entropy_coef: f32,
    /// Drop groups whose rewards are all equal and sample the next prompts instead.
    #[serde(default = "default_true")]
    pub dynamic_sampling: bool,
    /// Keep only groups whose pass rate lies within [a, b].
    #[serde(default)]
    pub accuracy_band: Option<[f32; 2]>,
    /// Prompts tried per step at most, as a multiple of `prompts_per_step`.
    #[serde(default = "default_tries")]
    pub max_tries: usize,
    /// Rule check when no `reward` edge is connected.
    #[serde(default)]
    pub rule: RuleConfig,
    /// Seed of sampling and shuffling (mixed with the run seed).
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub save_dtype: SaveDtype,
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

pub use crate::train::OPTIMIZER_FILE;

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
        if !(self.temperature > 0.0) {
            problems.push("temperature must be positive for sampling".into());
        }
        if let Some([a, b]) = self.accuracy_band {
            if !(0.0..=1.0).contains(&a) || !(0.0..=1.0).contains(&b) || a > b {
                problems.push("accuracy_band must be [a, b] with 0 <= a <= b <= 1".into());
            }
        }
        problems
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let out_dir = ctx
            .run_dir
            .as_ref()
            .map(|d| d.join(format!("rl-{}", ctx.node)))
            .ok_or_else(|| StageError::Invalid("rl_phase needs a run directory".into()))?;
        Ok(Box::new(RlPhase { config: self, ctx: ctx.clone(), out_dir }))
    }
}

struct RlPhase {
    config: RlPhaseConfig,
    ctx: StageContext,
    out_dir: PathBuf,
}

impl Stage for RlPhase {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let policy = io.recv_model("policy")?;
        let reward = match io.recv_reward("reward")? {
            Some(reward) => reward,
            None => Arc::new(Reward::rule_only(self.config.rule.clone())),
        };
        let mut records = Vec::new();
        while let Some(record) = io.recv_record("data")? {
            records.push(record);
        }
        let device = self.ctx.device;
        longrl_backends::dispatch(device, RlTask { stage: &self, io, policy, records, reward })
            .map_err(|e| StageError::Failed(e.to_string()))?
    }
}

struct RlTask<'a> {
    stage: &'a RlPhase,
    io: &'a mut StageIo,
    policy: ModelRef,
    records: Vec<Record>,
    reward: Arc<Reward>,
}

/// One group of rollouts, ready to train on.
#[derive(Debug, Clone)]
pub struct Group {
    pub prompt: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
    /// Sampling-time log-probs of each response token.
    pub old_logprobs: Vec<Vec<f32>>,
    /// Shaped rewards; `None` for unscorable responses.
    pub rewards: Vec<Option<f32>>,
    pub advantages: Vec<Option<f32>>,
}

/// What a step's rollout phase saw.
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
    tokens: usize,
    pass_rate_histogram: [usize; 5],
}

impl BackendTask for RlTask<'_> {
    type Output = Result<(), StageError>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let config = &self.stage.config;
        let io = self.io;
        let checkpoints = self.stage.ctx.run_dir.as_ref().map(|run| StageCheckpoints::new(run, io.label(), config.keep_checkpoints));
        if let Some(done) = checkpoints.as_ref().map(StageCheckpoints::done).transpose()?.flatten() {
            // Finished in an earlier attempt: its reports again, then its model.
            if let Some(dir) = &done.model {
                for report in read_reports(&dir.join(REPORTS_FILE))? {
                    if io.output_connected("reports") {
                        io.send_report("reports", report)?;
                    }
                }
            }
            return republish(io, done);
        }
        let tokenizer = ModelTokenizer::load(&self.policy.dir)?;
        let (model_config, mut model) = load_model::<B>(&self.policy.dir, &device)?;
        let reference = (config.kl_coef > 0.0).then(|| model.valid());

        // The phase's tasks: inside (min_input, max_input], prompts encoded once.
        let mut tasks: Vec<(Record, Vec<u32>)> = Vec::new();
        let mut passed_by = 0usize;
        let mut carried_tasks = 0usize;
        let mut task_list = Vec::new();
        for record in self.records {
            let (prompt, _) = encode_prompt(&tokenizer, &record, config.max_input + config.prompt_room)?;
            let length = record
                .metadata
                .get("length_budget")
                .and_then(serde_json::Value::as_u64)
                .map_or_else(|| record.input_tokens.unwrap_or(prompt.len()), |b| b as usize);
            // Tasks carried from an earlier phase's buffer keep their own length.
            let carried = record.metadata.contains_key("carried");
            if !carried && (length <= config.min_input || length > config.max_input) {
                passed_by += 1;
                continue;
            }
            carried_tasks += usize::from(carried);
            task_list.push(serde_json::json!({ "id": record.id, "length": length, "prompt_tokens": prompt.len(), "carried": carried }));
            tasks.push((record, prompt));
        }
        let task_file = self.stage.out_dir.join("tasks.jsonl");
        let lines: String = task_list.iter().map(|t| format!("{t}\n")).collect();
        write_atomic(&task_file, lines.as_bytes())?;
        if tasks.is_empty() {
            return Err(StageError::Failed(format!(
                "{}: no task falls within ({}, {}] tokens ({passed_by} passed by)",
                io.label(),
                config.min_input,
                config.max_input
            )));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed ^ self.stage.ctx.seed.rotate_left(41));
        let mut queue: VecDeque<usize> = VecDeque::new();
        for _ in 0..config.epochs {
            let mut order: Vec<usize> = (0..tasks.len()).collect();
            order.shuffle(&mut rng);
            queue.extend(order);
        }
        let mut total_steps = queue.len().div_ceil(config.prompts_per_step);
        if let Some(max) = config.max_steps {
            total_steps = total_steps.min(max);
        }
        let updates_per_step = config.prompts_per_step.div_ceil(config.mini_batch) * config.ppo_epochs;
        let mut trainer = Trainer::<B, CausalLm<B>>::new(config.optim.clone());
        let previous_state = self.policy.dir.join(OPTIMIZER_FILE);
        let mut optimizer_carried = config.optimizer_state == OptimizerState::Carry && previous_state.is_file();
        if optimizer_carried {
            trainer = trainer.load_state(&previous_state, &device)?;
            tracing::info!(stage = %io.label(), parameters = trainer.state_len(), "continuing the optimizer state of {}", self.policy.dir.display());
        }
        let loss_config = LossConfig {
            eps_low: config.eps_low,
            eps_high: config.eps_high,
            aggregation: config.aggregation,
            kl_coef: config.kl_coef,
            kl_estimator: config.kl_estimator,
            entropy_coef: config.entropy_coef,
            norm_length: config.max_output as f32,
        };
        let mut stop_tokens = tokenizer.stop_ids.clone();
        stop_tokens.extend(model_config.eos_ids());
        let progress = Progress::new(io.label(), total_steps as u64, "steps");
        let started = Instant::now();
        let (mut update, mut short_steps, mut metrics_lines, mut first_step) = (0usize, 0usize, 0usize, 0usize);
        let mut totals = RolloutStats::default();
        let mut last_reward_mean = f64::NAN;
        // Every report sent, kept to be saved with checkpoints and replayed on resume.
        let mut reports: Vec<DifficultyReport> = Vec::new();
        if let Some((dir, state)) = checkpoints.as_ref().map(StageCheckpoints::latest).transpose()?.flatten() {
            let resumed: ResumeState = serde_json::from_value(state)
                .map_err(|e| StageError::Failed(format!("{}: unreadable checkpoint state ({e})", dir.join("state.json").display())))?;
            model = load_model::<B>(&dir, &device)?.1;
            trainer = trainer.load_state(&dir.join(OPTIMIZER_FILE), &device)?;
            queue = resumed.queue.into_iter().collect();
            (first_step, update, short_steps, metrics_lines) = (resumed.step, resumed.update, resumed.short_steps, resumed.metrics_lines);
            (totals, last_reward_mean, optimizer_carried) =
                (resumed.totals, resumed.last_reward_mean.unwrap_or(f64::NAN), resumed.optimizer_carried);
            reports = read_reports(&dir.join(REPORTS_FILE))?;
            if io.output_connected("reports") {
                for report in &reports {
                    io.send_report("reports", report.clone())?;
                }
            }
            progress.skip(first_step as u64);
            tracing::info!(stage = %io.label(), step = first_step, "resuming from {}", dir.display());
        }

        for step in first_step..total_steps {
            io.cancel_token().check()?;
            // Rollouts with dynamic sampling: keep drawing prompts until the step is full.
            let rollout_started = Instant::now();
            let inference = model.valid();
            let mut stats = RolloutStats::default();
            let tries = config.prompts_per_step * config.max_tries;
            let filled = fill_step(&mut queue, config.prompts_per_step, tries, |index| -> Result<Option<Group>, StageError> {
                let (record, prompt) = &tasks[index];
                let sampling = SamplingConfig {
                    temperature: config.temperature,
                    top_p: config.top_p,
                    top_k: 0,
                    max_new_tokens: config.max_output,
                    stop_tokens: stop_tokens.clone(),
                    seed: rng_seed(config.seed, self.stage.ctx.seed, step, index),
                };
                let rollout = rollout_group(&inference, &tokenizer, record, prompt, config.group, &sampling, &self.reward)?;
                let (completions, outcomes) = (&rollout.completions, &rollout.outcomes);
                let mut rewards = Vec::with_capacity(completions.len());
                stats.truncated += rollout.truncated();
                stats.correct += (0..completions.len()).filter(|&i| rollout.correct(i)).count();
                for (completion, outcome) in completions.iter().zip(outcomes) {
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
                let pass_rate = rollout.pass_rate();
                stats.pass_rate_histogram[pass_rate_bin(pass_rate)] += 1;
                let report = DifficultyReport { record: record.clone(), rewards: rewards.iter().flatten().copied().collect(), pass_rate };
                if io.output_connected("reports") {
                    io.send_report("reports", report.clone())?;
                }
                reports.push(report);
                match drop_reason(&rewards, pass_rate, config.dynamic_sampling, config.accuracy_band) {
                    None => Ok(Some(Group {
                        prompt: prompt.clone(),
                        responses: completions.iter().map(|c| c.tokens.clone()).collect(),
                        old_logprobs: completions.iter().map(|c| c.logprobs.clone()).collect(),
                        rewards,
                        advantages: Vec::new(),
                    })),
                    Some(Drop::ZeroVariance) => {
                        stats.dropped_zero_variance += 1;
                        Ok(None)
                    }
                    Some(Drop::OutsideBand) => {
                        stats.dropped_band += 1;
                        Ok(None)
                    }
                    Some(Drop::Unscorable) => {
                        stats.dropped_unscorable += 1;
                        Ok(None)
                    }
                }
            })?;
            stats.tried = filled.tried;
            let mut groups = filled.kept;
            stats.tokens = stats.length_sum;
            let rollout_s = rollout_started.elapsed().as_secs_f64();
            if filled.short {
                short_steps += 1;
                if short_steps == 1 || groups.is_empty() {
                    tracing::warn!(
                        stage = %io.label(),
                        step,
                        kept = groups.len(),
                        wanted = config.prompts_per_step,
                        tried = stats.tried,
                        "{}",
                        if queue.is_empty() {
                            "the phase's prompts ran out before the step was full; training on the groups there are"
                        } else {
                            "the try bound was hit before the step was full (too many groups with equal rewards); training on the groups there are (raise max_tries or adjust the accuracy band)"
                        }
                    );
                }
            }
            // Advantages.
            let all: Vec<Option<f32>> = groups.iter().flat_map(|g| g.rewards.iter().copied()).collect();
            let batch_std = mean_std(&all).map_or(0.0, |(_, s)| s);
            for group in &mut groups {
                group.advantages = group_advantages(&group.rewards, config.std_scaling, batch_std);
            }
            // Updates over mini-batches, in an order drawn from the step's own stream (so a
            // resumed run draws the same).
            let mut step_rng = rand_chacha::ChaCha8Rng::seed_from_u64(rng_seed(config.seed ^ 0x5eed, self.stage.ctx.seed, step, 0));
            let train_started = Instant::now();
            let mut sums = LossSums::default();
            let (mut loss_sum, mut grad_norm, mut lr, mut train_tokens) = (0.0f64, 0.0f64, 0.0f64, 0usize);
            for _ in 0..config.ppo_epochs {
                let mut order: Vec<usize> = (0..groups.len()).collect();
                order.shuffle(&mut step_rng);
                for chunk in order.chunks(config.mini_batch) {
                    let normalizer = normalizer(&groups, chunk);
                    if normalizer.responses == 0.0 {
                        continue;
                    }
                    for &g in chunk {
                        let (loss, part) =
                            group_loss(&model, reference.as_ref(), &groups[g], config.temperature, &loss_config, normalizer, &device)?;
                        loss_sum += f64::from(burn::tensor::ElementConversion::elem::<f32>(loss.clone().into_scalar()));
                        sums.tokens += part.tokens;
                        sums.clipped_tokens += part.clipped_tokens;
                        sums.kl_sum += part.kl_sum;
                        sums.entropy_sum += part.entropy_sum;
                        sums.ratio_sum += part.ratio_sum;
                        train_tokens += groups[g].prompt.len() + groups[g].responses.iter().map(Vec::len).sum::<usize>();
                        trainer.backward(&model, loss);
                    }
                    let (next, info) = trainer.step(model, update, total_steps * updates_per_step);
                    model = next;
                    update += 1;
                    grad_norm = info.grad_norm;
                    lr = info.lr;
                }
            }
            let train_s = train_started.elapsed().as_secs_f64();
            let responses = stats.responses.max(1) as f64;
            last_reward_mean = stats.reward_sum / stats.scorable.max(1) as f64;
            let tokens = sums.tokens.max(1.0);
            let mut fields = serde_json::Map::new();
            fields.insert("reward_mean".into(), last_reward_mean.into());
            fields.insert("accuracy".into(), (stats.correct as f64 / responses).into());
            fields.insert("pass_rate_histogram".into(), serde_json::json!(stats.pass_rate_histogram));
            fields.insert("entropy".into(), f64::from(sums.entropy_sum / tokens).into());
            if config.kl_coef > 0.0 {
                fields.insert("kl".into(), f64::from(sums.kl_sum / tokens).into());
            }
            fields.insert("clip_fraction".into(), f64::from(sums.clipped_tokens / tokens).into());
            fields.insert("ratio_mean".into(), f64::from(sums.ratio_sum / tokens).into());
            fields.insert("response_length".into(), (stats.length_sum as f64 / responses).into());
            fields.insert("truncation_rate".into(), (stats.truncated as f64 / responses).into());
            fields.insert("groups_kept".into(), groups.len().into());
            fields.insert("groups_filtered".into(), (stats.dropped_zero_variance + stats.dropped_band + stats.dropped_unscorable).into());
            fields.insert("groups_zero_variance".into(), stats.dropped_zero_variance.into());
            fields.insert("groups_outside_band".into(), stats.dropped_band.into());
            fields.insert("prompts_tried".into(), stats.tried.into());
            fields.insert("unscorable".into(), stats.unscorable.into());
            fields.insert("rollout_tokens_per_s".into(), (stats.tokens as f64 / rollout_s.max(1e-9)).into());
            fields.insert("train_tokens_per_s".into(), (train_tokens as f64 / train_s.max(1e-9)).into());
            fields.insert("loss".into(), loss_sum.into());
            fields.insert("grad_norm".into(), grad_norm.into());
            fields.insert("lr".into(), lr.into());
            io.metrics().log(io.label(), step as u64, fields)?;
            metrics_lines += 1;
            progress.advance(&format!("reward {last_reward_mean:.3} acc {:.2}", stats.correct as f64 / responses));
            accumulate(&mut totals, &stats);
            if queue.is_empty() {
                break;
            }
            let done_steps = step + 1;
            if let Some(checkpoints) = checkpoints
                .as_ref()
                .filter(|_| config.checkpoint_every > 0 && done_steps % config.checkpoint_every == 0 && done_steps < total_steps)
            {
                let state = ResumeState {
                    step: done_steps,
                    update,
                    short_steps,
                    metrics_lines,
                    queue: queue.iter().copied().collect(),
                    totals: totals.clone(),
                    last_reward_mean: last_reward_mean.is_finite().then_some(last_reward_mean),
                    optimizer_carried,
                };
                let state = serde_json::to_value(&state).map_err(|e| StageError::Failed(e.to_string()))?;
                checkpoints.save(done_steps, &state, |dir| {
                    write_training_state(dir, &model.valid(), &model_config, &self.policy.dir, &trainer)?;
                    write_reports(&dir.join(REPORTS_FILE), &reports)
                })?;
            }
        }
        progress.finish();
        let dir = &self.stage.out_dir;
        save_model(&model.valid(), &model_config, dir, config.save_dtype)?;
        copy_tokenizer_files(&self.policy.dir, dir)?;
        trainer.save_state(&dir.join(OPTIMIZER_FILE))?;
        write_reports(&dir.join(REPORTS_FILE), &reports)?;
        let responses = totals.responses.max(1) as f64;
        let summary = io.summary_mut();
        summary.insert("tasks".into(), tasks.len().into());
        summary.insert("passed_by".into(), passed_by.into());
        summary.insert("carried_tasks".into(), carried_tasks.into());
        summary.insert("updates".into(), update.into());
        summary.insert("optimizer_state".into(), (if optimizer_carried { "carried" } else { "fresh" }).into());
        summary.insert("prompts_tried".into(), totals.tried.into());
        summary.insert("groups_filtered".into(), (totals.dropped_zero_variance + totals.dropped_band + totals.dropped_unscorable).into());
        summary.insert("short_steps".into(), short_steps.into());
        summary.insert("unscorable".into(), totals.unscorable.into());
        summary.insert("truncated".into(), totals.truncated.into());
        summary.insert("accuracy".into(), (totals.correct as f64 / responses).into());
        summary.insert("final_reward_mean".into(), last_reward_mean.into());
        summary.insert("reports".into(), reports.len().into());
        summary.insert("wall_s".into(), started.elapsed().as_secs_f64().into());
        summary.insert("checkpoint".into(), dir.display().to_string().into());
        let summary = summary.clone();
        if let Some(checkpoints) = &checkpoints {
            checkpoints.mark_done(&Done { model: Some(dir.clone()), summary, metrics_lines })?;
        }
        io.send_model("model", ModelRef { dir: dir.clone() })
    }
}

/// Where a phase stands between steps: everything a resumed run needs besides the weights,
/// the optimizer and the reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ResumeState {
    /// Steps done.
    step: usize,
    /// Optimizer updates done (the schedule's position).
    update: usize,
    short_steps: usize,
    metrics_lines: usize,
    /// Task indices still to draw, in order.
    queue: Vec<usize>,
    totals: RolloutStats,
    last_reward_mean: Option<f64>,
    optimizer_carried: bool,
}

/// The reports a phase sent, saved beside its weights.
const REPORTS_FILE: &str = "reports.jsonl";

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

fn accumulate(totals: &mut RolloutStats, stats: &RolloutStats) {
    totals.tried += stats.tried;
    totals.dropped_zero_variance += stats.dropped_zero_variance;
    totals.dropped_band += stats.dropped_band;
    totals.dropped_unscorable += stats.dropped_unscorable;
    totals.scorable += stats.scorable;
    totals.unscorable += stats.unscorable;
    totals.truncated += stats.truncated;
    totals.responses += stats.responses;
    totals.correct += stats.correct;
}

fn rng_seed(seed: u64, run_seed: u64, step: usize, tried: usize) -> u64 {
    seed ^ run_seed.rotate_left(13) ^ ((step as u64) << 20) ^ tried as u64
}

/// Tokens and responses of a mini-batch (scorable responses only).
pub fn normalizer(groups: &[Group], chunk: &[usize]) -> Normalizer {
    let mut tokens = 0usize;
    let mut responses = 0usize;
    for &g in chunk {
        for (response, advantage) in groups[g].responses.iter().zip(&groups[g].advantages) {
            if advantage.is_some() {
                tokens += response.len();
                responses += 1;
            }
        }
    }
    Normalizer { tokens: tokens as f32, responses: responses as f32 }
}

/// The loss of one group's scorable responses.
pub fn group_loss<B: AutodiffBackend>(
    model: &CausalLm<B>,
    reference: Option<&CausalLm<B::InnerBackend>>,
    group: &Group,
    temperature: f32,
    config: &LossConfig,
    normalizer: Normalizer,
    device: &B::Device,
) -> Result<(Tensor<B, 1>, LossSums), StageError> {
    let rows: Vec<usize> = (0..group.responses.len()).filter(|&i| group.advantages[i].is_some()).collect();
    let responses: Vec<Vec<u32>> = rows.iter().map(|&i| group.responses[i].clone()).collect();
    let scores = score_group_at(model, &group.prompt, &responses, temperature)?;
    let [n, len] = scores.logprobs.dims();
    let mut old = vec![0.0f32; n * len];
    for (row, &i) in rows.iter().enumerate() {
        for (j, &lp) in group.old_logprobs[i].iter().enumerate().take(len) {
            old[row * len + j] = lp;
        }
    }
    let old = Tensor::<B, 2>::from_data(TensorData::new(old, [n, len]), device);
    let advantages: Vec<f32> = rows.iter().map(|&i| group.advantages[i].unwrap_or(0.0)).collect();
    let advantages = Tensor::<B, 1>::from_data(TensorData::new(advantages, [n]), device);
    let ref_logp = match reference {
        Some(reference) => {
            let r = score_group_at(reference, &group.prompt, &responses, temperature)?;
            Some(Tensor::<B, 2>::from_inner(r.logprobs))
        }
        None => None,
    };
    Ok(policy_loss(scores.logprobs, old, advantages, scores.mask, scores.entropy, ref_logp, config, normalizer))
}
