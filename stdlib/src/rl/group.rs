//! One group of rollouts (a prompt and its G sampled responses with their rewards and
//! advantages) and its part of the policy loss. The responses are scored under the current
//! policy with the prompt computed once. [`group_backward`] accumulates the loss's gradients
//! in micro-batches of responses (sorted by length, so little padding) that all reuse one
//! forward of the prompt: each micro-batch attends to detached copies of the prompt's keys
//! and values, and the gradients that reach them flow through the prompt's graph once at the
//! end. The result equals one backward of the whole group's loss.

use burn::tensor::{ElementConversion, Tensor, TensorData};
use longrl_backends::{CustomGrad, TrainBackend};

use crate::error::StageError;
use crate::model::CausalLm;
use crate::model::score::{Prefix, PrefixGrads, TokenScores, prefill, score_group_at, score_with_prefix};
use crate::rl::loss::{LossConfig, LossSums, Normalizer, ScoredResponses, policy_loss};
use crate::train::Trainer;

/// One group of rollouts, ready to train on.
#[derive(Debug, Clone)]
pub struct Group {
    pub prompt: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
    /// Sampling-time log-probs of each response token.
    pub old_logprobs: Vec<Vec<f32>>,
    /// Shaped rewards; `None` for unscorable responses.
    pub rewards: Vec<Option<f32>>,
    /// Group-relative advantages; `None` for unscorable responses.
    pub advantages: Vec<Option<f32>>,
}

impl Group {
    /// Indices of the responses that have an advantage (the scorable ones).
    pub fn scorable_rows(&self) -> Vec<usize> {
        (0..self.responses.len()).filter(|&i| self.advantages[i].is_some()).collect()
    }
}

/// Tokens and responses of a mini-batch (scorable responses only): what the loss
/// aggregations divide by.
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

/// The old log-probs and advantages of `rows`, padded to `len`.
///
/// # Shapes
/// - returns `[rows, len]` and `[rows]`
fn old_and_advantages<B: CustomGrad>(group: &Group, rows: &[usize], len: usize, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let n = rows.len();
    let mut old = vec![0.0f32; n * len];
    for (row, &i) in rows.iter().enumerate() {
        for (j, &lp) in group.old_logprobs[i].iter().enumerate().take(len) {
            old[row * len + j] = lp;
        }
    }
    let advantages: Vec<f32> = rows.iter().map(|&i| group.advantages[i].unwrap_or(0.0)).collect();
    (Tensor::from_data(TensorData::new(old, [n, len]), device), Tensor::from_data(TensorData::new(advantages, [n]), device))
}

/// The policy loss of `rows` of a group from their scores.
fn rows_loss<B: CustomGrad>(
    scores: TokenScores<B>,
    ref_logp: Option<Tensor<B, 2>>,
    group: &Group,
    rows: &[usize],
    config: &LossConfig,
    normalizer: Normalizer,
) -> (Tensor<B, 1>, LossSums) {
    let [_, len] = scores.logprobs.dims();
    let (old_logp, advantages) = old_and_advantages::<B>(group, rows, len, &scores.logprobs.device());
    let batch = ScoredResponses { logp: scores.logprobs, old_logp, advantages, mask: scores.mask, entropy: scores.entropy, ref_logp };
    policy_loss(batch, config, normalizer)
}

/// The loss of one group's scorable responses, and its figures, in one pass.
///
/// # Shapes
/// - returns a `[1]` tensor
pub fn group_loss<B: TrainBackend>(
    model: &CausalLm<B>,
    reference: Option<&CausalLm<B::InnerBackend>>,
    group: &Group,
    temperature: f32,
    config: &LossConfig,
    normalizer: Normalizer,
) -> Result<(Tensor<B, 1>, LossSums), StageError> {
    let rows = group.scorable_rows();
    let responses: Vec<Vec<u32>> = rows.iter().map(|&i| group.responses[i].clone()).collect();
    let prefix = prefill(model, &group.prompt)?;
    let scores = score_with_prefix(model, &prefix, &responses, temperature, config.entropy_coef > 0.0)?;
    let ref_logp = reference_logprobs::<B>(reference, group, &rows, temperature)?;
    Ok(rows_loss(scores, ref_logp, group, &rows, config, normalizer))
}

/// The reference policy's log-probs of `rows` (no gradient), when there is a reference.
fn reference_logprobs<B: TrainBackend>(
    reference: Option<&CausalLm<B::InnerBackend>>,
    group: &Group,
    rows: &[usize],
    temperature: f32,
) -> Result<Option<Tensor<B, 2>>, StageError> {
    let Some(reference) = reference else { return Ok(None) };
    let responses: Vec<Vec<u32>> = rows.iter().map(|&i| group.responses[i].clone()).collect();
    let scores = score_group_at(reference, &group.prompt, &responses, temperature)?;
    Ok(Some(Tensor::<B, 2>::from_inner(scores.logprobs)))
}

/// Scorable rows split into micro-batches of at most `budget` padded tokens (rows x the
/// longest), longest responses first; `budget` 0 keeps the group whole.
pub fn micro_batches(group: &Group, budget: usize) -> Vec<Vec<usize>> {
    let mut rows = group.scorable_rows();
    rows.sort_by_key(|&i| std::cmp::Reverse(group.responses[i].len()));
    if budget == 0 {
        return vec![rows];
    }
    let mut out: Vec<Vec<usize>> = Vec::new();
    for row in rows {
        match out.last_mut() {
            // Rows come longest first: the batch's first row is its longest.
            Some(batch) if (batch.len() + 1) * group.responses[batch[0]].len() <= budget => batch.push(row),
            _ => out.push(vec![row]),
        }
    }
    out
}

/// Adds the gradients of one group's loss to the trainer, in micro-batches of at most
/// `micro_batch_tokens` padded response tokens (0: the whole group at once) that reuse one
/// forward of the prompt. Returns the loss's value and figures.
#[allow(clippy::too_many_arguments)]
pub fn group_backward<B: TrainBackend>(
    trainer: &mut Trainer<B, CausalLm<B>>,
    reference: Option<&CausalLm<B::InnerBackend>>,
    group: &Group,
    temperature: f32,
    config: &LossConfig,
    normalizer: Normalizer,
    micro_batch_tokens: usize,
) -> Result<(f64, LossSums), StageError> {
    let batches = micro_batches(group, micro_batch_tokens);
    if batches.len() <= 1 {
        let (loss, sums) = group_loss(&trainer.compute_model(), reference, group, temperature, config, normalizer)?;
        let value = loss.clone().into_scalar().elem::<f64>();
        trainer.backward(loss);
        return Ok((value, sums));
    }
    let prefix = prefill(&trainer.compute_model(), &group.prompt)?;
    let mut total = (0.0f64, LossSums::default());
    let mut prefix_grads: Option<PrefixGrads<B::InnerBackend>> = None;
    for rows in &batches {
        let (value, sums, grads) = micro_batch_backward(trainer, reference, &prefix, group, rows, temperature, config, normalizer)?;
        total.0 += value;
        total.1 = total.1.add(&sums);
        prefix_grads = Some(match prefix_grads {
            Some(sum) => sum.add(grads),
            None => grads,
        });
    }
    if let Some(grads) = prefix_grads {
        trainer.backward(prefix.surrogate(&grads));
    }
    Ok(total)
}

/// One micro-batch's backward against a detached copy of the prompt: its parameter
/// gradients go to the trainer; the gradients that reached the prompt are returned.
#[allow(clippy::too_many_arguments)]
fn micro_batch_backward<B: TrainBackend>(
    trainer: &mut Trainer<B, CausalLm<B>>,
    reference: Option<&CausalLm<B::InnerBackend>>,
    prefix: &Prefix<B>,
    group: &Group,
    rows: &[usize],
    temperature: f32,
    config: &LossConfig,
    normalizer: Normalizer,
) -> Result<(f64, LossSums, PrefixGrads<B::InnerBackend>), StageError> {
    let leaf = prefix.detached();
    let responses: Vec<Vec<u32>> = rows.iter().map(|&i| group.responses[i].clone()).collect();
    let scores = score_with_prefix(&trainer.compute_model(), &leaf, &responses, temperature, config.entropy_coef > 0.0)?;
    let ref_logp = reference_logprobs::<B>(reference, group, rows, temperature)?;
    let (loss, sums) = rows_loss(scores, ref_logp, group, rows, config, normalizer);
    let value = loss.clone().into_scalar().elem::<f64>();
    let grads = loss.backward();
    let reached = leaf.grads(&grads);
    trainer.accumulate(grads);
    Ok((value, sums, reached))
}
