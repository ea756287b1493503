//! `longrl bench memory`: one training step per input length, each in a fresh process, with
//! its peak resident memory and wall time. RL: one prompt of that length and a group of
//! responses (G = 8 of 256 tokens by default), the group loss's backward (micro-batched and
//! recomputed as the options say) and an AdamW update. SFT: one example of that length, half
//! prompt and half response, and an update. Weights are random: memory and time do not
//! depend on them.

use std::time::Instant;

use burn::tensor::ElementConversion;
use longrl_backends::TrainBackend;
use longrl_stdlib::model::checkpoint::RandomInit;
use longrl_stdlib::model::precision::Precision;
use longrl_stdlib::model::score::score_batch;
use longrl_stdlib::model::{CausalLm, ModelConfig, Recompute};
use longrl_stdlib::rl::group::{Group, group_backward};
use longrl_stdlib::rl::loss::{Aggregation, KlEstimator, LossConfig, Normalizer};
use longrl_stdlib::train::{OptimConfig, RecomputeChoice, Schedule, Trainer};
use serde::{Deserialize, Serialize};

/// Which training step is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    Sft,
    Rl,
}

/// One step to measure.
#[derive(Debug, Clone)]
pub struct MemoryStep {
    pub preset: String,
    /// Vocabulary size (default: the preset's real one).
    pub vocab: Option<usize>,
    pub step: StepKind,
    /// Input tokens: the RL prompt, or the SFT example.
    pub length: usize,
    /// RL responses per group and tokens per response.
    pub group: usize,
    pub response_tokens: usize,
    pub recompute: RecomputeChoice,
    /// RL micro-batch budget in padded response tokens (0: the whole group).
    pub micro_batch_tokens: usize,
    /// Training precision (bf16-mixed: bf16 compute through f32 master weights).
    pub precision: Precision,
}

/// What one step measured (one line of `--json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryFigures {
    pub length: usize,
    pub step: StepKind,
    pub preset: String,
    pub recompute: Recompute,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// Wall time of the training step (forward, backward, update), s.
    pub seconds: f64,
    /// The precision asked for (`bf16-mixed` computes in f32 where the backend has no bf16).
    #[serde(default)]
    pub precision: Precision,
}

/// The real vocabulary of a preset's model.
pub fn preset_vocab(preset: &str) -> usize {
    match preset {
        "smollm2-135m" => 49_152,
        "qwen2-0.5b" => 151_936,
        _ => 4096,
    }
}

/// Deterministic token ids below `vocab`.
fn ids(len: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + salt * 104_729 + 13) % vocab) as u32).collect()
}

fn optim() -> OptimConfig {
    OptimConfig {
        lr: 1e-5,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        min_lr_ratio: 1.0,
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.01,
        grad_clip: 1.0,
    }
}

impl MemoryStep {
    fn rl_group(&self, vocab: usize) -> Group {
        let responses: Vec<Vec<u32>> = (0..self.group).map(|r| ids(self.response_tokens, r + 1, vocab)).collect();
        Group {
            prompt: ids(self.length, 0, vocab),
            old_logprobs: responses.iter().map(|r| vec![-5.0; r.len()]).collect(),
            rewards: (0..self.group).map(|r| Some((r % 2) as f32)).collect(),
            advantages: (0..self.group).map(|r| Some(if r % 2 == 0 { 1.0 } else { -1.0 })).collect(),
            responses,
        }
    }

    /// Builds the model, runs one step, and measures it.
    fn measure<B: TrainBackend>(&self, device: B::Device) -> Result<MemoryFigures, String> {
        let vocab = self.vocab.unwrap_or_else(|| preset_vocab(&self.preset));
        let config = ModelConfig::preset(&self.preset, vocab)
            .ok_or_else(|| format!("unknown preset `{}` (presets: {})", self.preset, ModelConfig::PRESETS.join(", ")))?;
        let longest = match self.step {
            StepKind::Rl => self.length + self.response_tokens,
            StepKind::Sft => self.length,
        };
        let recompute = self.recompute.resolve(longest);
        let model =
            CausalLm::<B>::build(&config, &mut RandomInit::new(1, 0.02), &device).map_err(|e| e.to_string())?.with_recompute(recompute);
        let mut trainer = Trainer::new(model, optim()).with_compute(self.precision.resolve::<B>(&device));
        let started = Instant::now();
        match self.step {
            StepKind::Rl => {
                let group = self.rl_group(vocab);
                let loss = LossConfig {
                    eps_low: 0.2,
                    eps_high: 0.28,
                    aggregation: Aggregation::Token,
                    kl_coef: 0.0,
                    kl_estimator: KlEstimator::K3,
                    entropy_coef: 0.0,
                    norm_length: self.response_tokens as f32,
                };
                let normalizer = Normalizer { tokens: (self.group * self.response_tokens) as f32, responses: self.group as f32 };
                group_backward(&mut trainer, None, &group, 1.0, &loss, normalizer, self.micro_batch_tokens).map_err(|e| e.to_string())?;
            }
            StepKind::Sft => {
                let half = self.length / 2;
                let example = ids(self.length, 0, vocab);
                let pairs = vec![(example[..half].to_vec(), example[half..].to_vec())];
                let scores = score_batch(&trainer.compute_model(), &pairs).map_err(|e| e.to_string())?;
                let loss = scores.logprobs.sum().neg().div_scalar((self.length - half) as f64);
                let _: f64 = loss.clone().into_scalar().elem();
                trainer.backward(loss);
            }
        }
        trainer.step(0, 1)?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(MemoryFigures {
            length: self.length,
            step: self.step,
            preset: self.preset.clone(),
            recompute,
            peak_rss_mib: super::peak_rss_mib()?,
            seconds,
            precision: self.precision,
        })
    }
}

impl longrl_backends::BackendTask for MemoryStep {
    type Output = Result<MemoryFigures, String>;

    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        self.measure::<B>(device)
    }
}
