//! Group rollouts: G samples of a task's prompt (the prompt prefilled once and shared),
//! decoded and scored by the reward. [`Rollouts`] is where a step's groups are generated:
//! the local batch decoder, which decodes several tasks' groups together, or any other
//! source of completions (a remote server). Shared by the RL phase and offline difficulty
//! scoring.

use longrl_backends::CustomGrad;

use crate::error::StageError;
use crate::model::batch_decode::{BatchDecoder, GroupRequest};
use crate::model::chat::ModelTokenizer;
use crate::model::generate::{Completion, FinishReason};
use crate::record::{Difficulty, Record};
use crate::reward::{Reward, RewardOutcome};

/// A source of group completions. Requests go in with an id; groups come back under it as
/// they finish, in any order. The local [`BatchDecoder`] decodes the queued groups
/// together; a remote implementation would send each request to a server (n samples,
/// seeded) and return the responses as they arrive.
pub trait Rollouts {
    /// Queues `request`'s group.
    fn submit(&mut self, id: usize, request: GroupRequest) -> Result<(), StageError>;

    /// Advances the work (one decode step locally; a wait for responses remotely) and
    /// returns the groups that finished, possibly none.
    fn poll(&mut self) -> Result<Vec<(usize, Vec<Completion>)>, StageError>;
}

impl<B: CustomGrad> Rollouts for BatchDecoder<'_, B> {
    fn submit(&mut self, id: usize, request: GroupRequest) -> Result<(), StageError> {
        Ok(BatchDecoder::submit(self, id, request)?)
    }

    fn poll(&mut self) -> Result<Vec<(usize, Vec<Completion>)>, StageError> {
        Ok(self.step()?)
    }
}

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

/// Every request's completions, in request order, from `rollouts`; `check` runs between
/// polls (cancellation).
pub fn collect_groups(
    rollouts: &mut dyn Rollouts,
    requests: Vec<GroupRequest>,
    mut check: impl FnMut() -> Result<(), StageError>,
) -> Result<Vec<Vec<Completion>>, StageError> {
    let mut out: Vec<Option<Vec<Completion>>> = vec![None; requests.len()];
    for (id, request) in requests.into_iter().enumerate() {
        rollouts.submit(id, request)?;
    }
    let mut missing = out.len();
    while missing > 0 {
        check()?;
        for (id, completions) in rollouts.poll()? {
            if let Some(slot) = out.get_mut(id).filter(|slot| slot.is_none()) {
                *slot = Some(completions);
                missing -= 1;
            }
        }
    }
    Ok(out.into_iter().map(Option::unwrap_or_default).collect())
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

/// Scores a group's completions against `record` (a final stop token is not part of the
/// text the reward reads).
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
