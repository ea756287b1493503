//! `score_difficulty` stage: offline difficulty scoring the QwenLong-L1 way. A model samples
//! G responses per task, the reward scores them, and each record leaves annotated with its
//! pass rate, mean reward and difficulty (1 / mean reward), so a recipe can filter tasks or
//! fill a hard buffer by difficulty before RL. Its `reports` output feeds a `hard_buffer`.

use std::sync::Arc;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use longrl_backends::BackendTask;
use serde::Deserialize;

use crate::error::StageError;
use crate::model::chat::ModelTokenizer;
use crate::model::generate::SamplingConfig;
use crate::model::load_model;
use crate::progress::Progress;
use crate::prompt::encode_prompt;
use crate::record::Record;
use crate::reward::RuleConfig;
use crate::reward::hybrid::Reward;
use crate::rl::buffer::Entry;
use crate::rl::rollout::rollout_group;
use crate::stage::{DifficultyReport, ModelRef, PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};

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
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    /// Rule check when no `reward` edge is connected.
    #[serde(default)]
    pub rule: RuleConfig,
    #[serde(default)]
    pub seed: u64,
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
        PortSpec::optional("records", PortKind::Records, "the tasks, with metadata.difficulty"),
        PortSpec::optional("reports", PortKind::Reports, "each task's rewards and pass rate (for a hard_buffer)"),
    ];

    fn validate(&self, _ctx: &StageContext) -> Vec<String> {
        let mut problems = Vec::new();
        if self.group == 0 || self.max_output == 0 || self.max_input == 0 {
            problems.push("group, max_input and max_output must be at least 1".into());
        }
        if !(self.temperature > 0.0) {
            problems.push("temperature must be positive: difficulty needs sampled responses".into());
        }
        problems
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(ScoreDifficulty { config: self, run_seed: ctx.seed, device: ctx.device }))
    }
}

struct ScoreDifficulty {
    config: ScoreDifficultyConfig,
    run_seed: u64,
    device: longrl_backends::DeviceSpec,
}

impl Stage for ScoreDifficulty {
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
        longrl_backends::dispatch(self.device, ScoreTask { stage: &self, io, policy, records, reward })
            .map_err(|e| StageError::Failed(e.to_string()))?
    }
}

struct ScoreTask<'a> {
    stage: &'a ScoreDifficulty,
    io: &'a mut StageIo,
    policy: ModelRef,
    records: Vec<Record>,
    reward: Arc<Reward>,
}

impl BackendTask for ScoreTask<'_> {
    type Output = Result<(), StageError>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let config = &self.stage.config;
        let io = self.io;
        let tokenizer = ModelTokenizer::load(&self.policy.dir)?;
        let (model_config, model) = load_model::<B>(&self.policy.dir, &device)?;
        let model = model.valid();
        let mut stop_tokens = tokenizer.stop_ids.clone();
        stop_tokens.extend(model_config.eos_ids());
        let progress = Progress::new(io.label(), self.records.len() as u64, "tasks");
        let (mut unsolved, mut pass_sum, mut unscorable) = (0usize, 0.0f64, 0usize);
        let total = self.records.len();
        for (index, mut record) in self.records.into_iter().enumerate() {
            io.cancel_token().check()?;
            let (prompt, _) = encode_prompt(&tokenizer, &record, config.max_input)?;
            let sampling = SamplingConfig {
                temperature: config.temperature,
                top_p: config.top_p,
                top_k: 0,
                max_new_tokens: config.max_output,
                stop_tokens: stop_tokens.clone(),
                seed: config.seed ^ self.stage.run_seed.rotate_left(17) ^ ((index as u64) << 24),
            };
            let rollout = rollout_group(&model, &tokenizer, &record, &prompt, config.group, &sampling, &self.reward)?;
            let rewards: Vec<f32> = rollout.outcomes.iter().filter_map(|o| o.score).collect();
            unscorable += rollout.outcomes.len() - rewards.len();
            let pass_rate = rollout.pass_rate();
            let entry = Entry { record: record.clone(), rewards: rewards.clone(), pass_rate };
            let difficulty = entry.difficulty();
            let mean = if rewards.is_empty() { f32::NAN } else { rewards.iter().sum::<f32>() / rewards.len() as f32 };
            unsolved += usize::from(pass_rate <= 0.0);
            pass_sum += f64::from(pass_rate);
            record.metadata.insert(
                "difficulty".into(),
                serde_json::json!({
                    "pass_rate": pass_rate,
                    "mean_reward": if mean.is_finite() { serde_json::json!(mean) } else { serde_json::Value::Null },
                    // Infinite (nothing earned) is written as null.
                    "difficulty": if difficulty.is_finite() { serde_json::json!(difficulty) } else { serde_json::Value::Null },
                    "rewards": rewards,
                    "samples": config.group,
                }),
            );
            if io.output_connected("reports") {
                io.send_report("reports", DifficultyReport { record: record.clone(), rewards, pass_rate })?;
            }
            io.send_record("records", record)?;
            progress.advance(&format!("mean pass rate {:.2}", pass_sum / (index + 1) as f64));
        }
        progress.finish();
        let summary = io.summary_mut();
        summary.insert("tasks".into(), total.into());
        summary.insert("unsolved".into(), unsolved.into());
        summary.insert("mean_pass_rate".into(), (pass_sum / total.max(1) as f64).into());
        summary.insert("unscorable".into(), unscorable.into());
        Ok(())
    }
}
