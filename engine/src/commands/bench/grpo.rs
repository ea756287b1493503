//! `longrl bench grpo`: seconds per GRPO step on a real model and a file of chat prompts:
//! the steps `examples/bench/trl_grpo_step.py` runs with TRL's GRPOTrainer, so the two can
//! be compared. A step takes the next `prompts_per_step` prompts, samples G responses each
//! (temperature 1, no truncation, the groups decoded together), rewards a response 1 when
//! it contains the prompt's answer (case-insensitive) and 0 otherwise, computes
//! group-relative advantages, and takes one PPO-clip update over all the step's responses
//! (token-level loss, no KL term, no reference model), then an AdamW step.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use longrl_backends::TrainBackend;
use longrl_stdlib::model::batch_decode::{BatchOptions, GroupRequest, generate_groups};
use longrl_stdlib::model::chat::ModelTokenizer;
use longrl_stdlib::model::generate::{Completion, SamplingConfig};
use longrl_stdlib::model::{CausalLm, load_model};
use longrl_stdlib::record::ChatMessage;
use longrl_stdlib::rl::advantage::{StdScaling, group_advantages};
use longrl_stdlib::rl::group::{Group, group_backward, normalizer};
use longrl_stdlib::rl::loss::{Aggregation, KlEstimator, LossConfig};
use longrl_stdlib::train::{OptimConfig, Schedule, Trainer};
use serde::{Deserialize, Serialize};

/// The steps to time.
#[derive(Debug, Clone)]
pub struct GrpoBench {
    /// A Hugging Face model directory (weights, config, tokenizer with a chat template).
    pub model: PathBuf,
    /// JSONL of chat prompts: `{"prompt": [{"role": ..., "content": ...}], "answer": ...}`.
    pub prompts: PathBuf,
    pub steps: usize,
    /// Responses per prompt (G).
    pub group: usize,
    pub prompts_per_step: usize,
    /// Tokens per response at most.
    pub new_tokens: usize,
    pub lr: f64,
    /// Rows decoded together at most.
    pub decode_rows: usize,
    pub seed: u64,
}

/// What the steps took (`--json` prints this object).
#[derive(Debug, Clone, Serialize)]
pub struct GrpoFigures {
    pub model: String,
    pub steps: usize,
    pub group: usize,
    pub prompts_per_step: usize,
    pub new_tokens: usize,
    /// Prompt tokens of each prompt used, in order of use.
    pub prompt_tokens: Vec<usize>,
    /// Wall time of each step: rollouts, rewards, update.
    pub step_s: Vec<f64>,
    /// The rollouts' share of each step.
    pub rollout_s: Vec<f64>,
    /// Median of `step_s`.
    pub seconds_per_step: f64,
    /// Mean reward over every response.
    pub reward_mean: f64,
}

/// One line of the prompts file.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatPrompt {
    pub prompt: Vec<ChatMessage>,
    #[serde(default)]
    pub answer: String,
}

/// Reads a JSONL file of chat prompts; an error names the file and line.
pub fn read_prompts(path: &Path) -> Result<Vec<ChatPrompt>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let prompt: ChatPrompt = serde_json::from_str(line.trim_start_matches('\u{feff}')).map_err(|e| {
            format!("{}:{}: not a chat prompt ({{\"prompt\": [{{\"role\", \"content\"}}], \"answer\"}}): {e}", path.display(), i + 1)
        })?;
        if prompt.prompt.is_empty() {
            return Err(format!("{}:{}: the prompt has no message", path.display(), i + 1));
        }
        prompts.push(prompt);
    }
    if prompts.is_empty() {
        return Err(format!("{}: no prompts", path.display()));
    }
    Ok(prompts)
}

/// 1 when `text` contains `answer` (case-insensitive), else 0.
fn contains_answer(text: &str, answer: &str) -> f32 {
    if !answer.is_empty() && text.to_lowercase().contains(&answer.to_lowercase()) { 1.0 } else { 0.0 }
}

fn optim(lr: f64) -> OptimConfig {
    OptimConfig {
        lr,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        min_lr_ratio: 1.0,
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.0,
        grad_clip: 1.0,
    }
}

/// The clipped policy loss of the TRL run: token-level, no KL term, no entropy bonus.
fn loss(new_tokens: usize) -> LossConfig {
    LossConfig {
        eps_low: 0.2,
        eps_high: 0.2,
        aggregation: Aggregation::Token,
        kl_coef: 0.0,
        kl_estimator: KlEstimator::K3,
        entropy_coef: 0.0,
        norm_length: new_tokens as f32,
    }
}

/// The model and prompts a run needs, loaded once.
struct Loaded<B: TrainBackend> {
    prompts: Vec<ChatPrompt>,
    /// Each prompt's chat-template tokens, with the assistant turn opened.
    encoded: Vec<Vec<u32>>,
    tokenizer: ModelTokenizer,
    stop_tokens: Vec<u32>,
    trainer: Trainer<B, CausalLm<B>>,
}

impl GrpoBench {
    fn load<B: TrainBackend>(&self, device: &B::Device) -> Result<Loaded<B>, String> {
        let prompts = read_prompts(&self.prompts)?;
        let tokenizer = ModelTokenizer::load(&self.model).map_err(|e| e.to_string())?;
        let (config, model) = load_model::<B>(&self.model, device).map_err(|e| e.to_string())?;
        let mut stop_tokens = tokenizer.stop_ids.clone();
        stop_tokens.extend(config.eos_ids());
        let encoded: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| tokenizer.encode_chat(&p.prompt, true, &serde_json::json!({})))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        Ok(Loaded { prompts, encoded, tokenizer, stop_tokens, trainer: Trainer::new(model, optim(self.lr)) })
    }

    /// The prompts of step `step` (the next ones in file order, wrapping around) and their
    /// groups' requests: G samples at temperature 1, no truncation, a seed per prompt and step.
    fn requests<B: TrainBackend>(&self, loaded: &Loaded<B>, step: usize) -> (Vec<usize>, Vec<GroupRequest>) {
        let chosen: Vec<usize> = (0..self.prompts_per_step).map(|k| (step * self.prompts_per_step + k) % loaded.prompts.len()).collect();
        let requests = chosen
            .iter()
            .map(|&i| {
                let sampling = SamplingConfig {
                    temperature: 1.0,
                    top_p: 1.0,
                    top_k: 0,
                    max_new_tokens: self.new_tokens,
                    stop_tokens: loaded.stop_tokens.clone(),
                    seed: self.seed ^ ((step as u64) << 20) ^ i as u64,
                };
                GroupRequest::group(loaded.encoded[i].clone(), self.group, sampling)
            })
            .collect();
        (chosen, requests)
    }

    /// Prompt `i`'s group with its rewards (1 when a response contains the answer) and
    /// group-relative advantages.
    fn scored<B: TrainBackend>(loaded: &Loaded<B>, i: usize, completions: &[Completion]) -> Result<Group, String> {
        let mut rewards = Vec::with_capacity(completions.len());
        for completion in completions {
            let mut tokens = completion.tokens.clone();
            if tokens.last().is_some_and(|t| loaded.stop_tokens.contains(t)) {
                tokens.pop();
            }
            let text = loaded.tokenizer.tokenizer.decode(&tokens, false).map_err(|e| e.to_string())?;
            rewards.push(Some(contains_answer(&text, &loaded.prompts[i].answer)));
        }
        Ok(Group {
            prompt: loaded.encoded[i].clone(),
            responses: completions.iter().map(|c| c.tokens.clone()).collect(),
            old_logprobs: completions.iter().map(|c| c.logprobs.clone()).collect(),
            advantages: group_advantages(&rewards, StdScaling::Group, 0.0),
            rewards,
        })
    }

    /// One step: rollouts (the groups decoded together), rewards, one update. Returns the
    /// rollouts' seconds and the step's groups.
    fn step<B: TrainBackend>(&self, loaded: &mut Loaded<B>, step: usize) -> Result<(f64, Vec<Group>), String> {
        let started = Instant::now();
        let (chosen, requests) = self.requests(loaded, step);
        let inference = loaded.trainer.model().valid();
        let completions = generate_groups(&inference, requests, BatchOptions::rows(self.decode_rows)).map_err(|e| e.to_string())?;
        drop(inference);
        let rollout_s = started.elapsed().as_secs_f64();
        let groups: Vec<Group> =
            chosen.iter().zip(&completions).map(|(&i, group)| Self::scored(loaded, i, group)).collect::<Result<_, _>>()?;
        let all: Vec<usize> = (0..groups.len()).collect();
        let norm = normalizer(&groups, &all);
        if norm.responses > 0.0 {
            for group in &groups {
                group_backward(&mut loaded.trainer, None, group, 1.0, &loss(self.new_tokens), norm, 0).map_err(|e| e.to_string())?;
            }
        }
        loaded.trainer.step(step, self.steps)?;
        Ok((rollout_s, groups))
    }

    fn measure<B: TrainBackend>(&self, device: B::Device) -> Result<GrpoFigures, String> {
        if self.steps == 0 || self.group < 2 || self.prompts_per_step == 0 || self.new_tokens == 0 || self.decode_rows == 0 {
            return Err("--steps, --prompts-per-step, --new-tokens and --decode-rows must be at least 1, --group at least 2".into());
        }
        let mut loaded = self.load::<B>(&device)?;
        let mut figures = GrpoFigures {
            model: self.model.display().to_string(),
            steps: self.steps,
            group: self.group,
            prompts_per_step: self.prompts_per_step,
            new_tokens: self.new_tokens,
            prompt_tokens: Vec::new(),
            step_s: Vec::new(),
            rollout_s: Vec::new(),
            seconds_per_step: 0.0,
            reward_mean: 0.0,
        };
        let mut rewards: Vec<f32> = Vec::new();
        for step in 0..self.steps {
            let started = Instant::now();
            let (rollout_s, groups) = self.step(&mut loaded, step)?;
            figures.step_s.push(started.elapsed().as_secs_f64());
            figures.rollout_s.push(rollout_s);
            figures.prompt_tokens.extend(groups.iter().map(|g| g.prompt.len()));
            rewards.extend(groups.iter().flat_map(|g| g.rewards.iter().flatten()));
        }
        let mut sorted = figures.step_s.clone();
        sorted.sort_by(f64::total_cmp);
        figures.seconds_per_step = sorted[sorted.len() / 2];
        figures.reward_mean = rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / rewards.len().max(1) as f64;
        Ok(figures)
    }
}

impl longrl_backends::BackendTask for GrpoBench {
    type Output = Result<GrpoFigures, String>;

    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        self.measure::<B>(device)
    }
}
