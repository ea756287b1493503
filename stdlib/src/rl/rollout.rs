//! One group rollout: G samples of a task's prompt (the prompt prefilled once and shared),
//! decoded and scored by the reward. Shared by the RL phase and offline difficulty scoring.

use crate::error::StageError;
use crate::model::CausalLm;
use crate::model::chat::ModelTokenizer;
use crate::model::generate::{Completion, FinishReason, SamplingConfig, generate_group};
use crate::record::{Difficulty, Record};
use crate::reward::{Reward, RewardOutcome};

/// The samples of one prompt and their scores.
#[derive(Debug, Clone)]
pub struct GroupRollout {
    pub completions: Vec<Completion>,
    pub outcomes: Vec<RewardOutcome>,
}

impl GroupRollout {
    /// Whether sample `i` is fully correct (by the rule or by the final score).
    pub fn correct(&self, i: usize) -> bool {
        let outcome = &self.outcomes[i];
        outcome.rule.score >= 1.0 || outcome.score.is_some_and(|s| s >= 1.0)
    }

    /// Samples fully correct.
    pub fn correct_count(&self) -> usize {
        (0..self.outcomes.len()).filter(|&i| self.correct(i)).count()
    }

    /// Correct samples over scorable ones; `None` when no sample could be scored.
    pub fn pass_rate(&self) -> Option<f32> {
        self.difficulty().pass_rate
    }

    /// How hard the task was: from the samples' correctness and their rewards before any
    /// length shaping.
    pub fn difficulty(&self) -> Difficulty {
        let rewards: Vec<f32> = self.outcomes.iter().filter_map(|o| o.score).collect();
        Difficulty::new(self.correct_count(), rewards, self.outcomes.len())
    }

    /// Samples that hit the token limit.
    pub fn truncated(&self) -> usize {
        self.completions.iter().filter(|c| c.finish == FinishReason::Length).count()
    }
}

/// Labels of the pass-rate bins of [`pass_rate_bin`].
pub const PASS_RATE_BINS: [&str; 5] = ["0", "(0, .25]", "(.25, .5]", "(.5, 1)", "1"];

/// The bin of a pass rate: 0, (0, 1/4], (1/4, 1/2], (1/2, 1), 1.
pub fn pass_rate_bin(pass_rate: f32) -> usize {
    if pass_rate <= 0.0 {
        0
    } else if pass_rate <= 0.25 {
        1
    } else if pass_rate <= 0.5 {
        2
    } else if pass_rate < 1.0 {
        3
    } else {
        4
    }
}

/// Samples `group` responses to `prompt` and scores them against `record`.
pub fn rollout_group<B: longrl_backends::CustomGrad>(
    model: &CausalLm<B>,
    tokenizer: &ModelTokenizer,
    record: &Record,
    prompt: &[u32],
    group: usize,
    sampling: &SamplingConfig,
    reward: &Reward,
) -> Result<GroupRollout, StageError> {
    let completions = generate_group(model, prompt, group, sampling)?;
    score_group(tokenizer, record, completions, &sampling.stop_tokens, reward)
}

/// Decodes a group's samples (without their stop token) and scores them against `record`.
pub fn score_group(
    tokenizer: &ModelTokenizer,
    record: &Record,
    completions: Vec<Completion>,
    stop_tokens: &[u32],
    reward: &Reward,
) -> Result<GroupRollout, StageError> {
    let texts: Vec<String> = completions
        .iter()
        .map(|c| {
            let mut tokens = c.tokens.clone();
            if tokens.last().is_some_and(|t| stop_tokens.contains(t)) {
                tokens.pop();
            }
            tokenizer.tokenizer.decode(&tokens, false)
        })
        .collect::<Result<_, _>>()?;
    let pairs: Vec<(&Record, &str)> = texts.iter().map(|t| (record, t.as_str())).collect();
    let outcomes = reward.score_all(&pairs)?;
    Ok(GroupRollout { completions, outcomes })
}
