//! One group of rollouts (a prompt and its G sampled responses with their rewards and
//! advantages) and its part of the policy loss: the responses are scored under the current
//! policy with the prompt computed once, then fed to the clipped surrogate.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

use crate::error::StageError;
use crate::model::CausalLm;
use crate::model::score::score_group_at;
use crate::rl::loss::{LossConfig, LossSums, Normalizer, policy_loss};

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

/// The loss of one group's scorable responses, and its figures.
///
/// # Shapes
/// - returns a `[1]` tensor
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
    let old = Tensor::<B, 2>::from_data(TensorData::new(old, [n, len]), device); // [n, len]
    let advantages: Vec<f32> = rows.iter().map(|&i| group.advantages[i].unwrap_or(0.0)).collect();
    let advantages = Tensor::<B, 1>::from_data(TensorData::new(advantages, [n]), device); // [n]
    let ref_logp = match reference {
        Some(reference) => {
            let r = score_group_at(reference, &group.prompt, &responses, temperature)?;
            Some(Tensor::<B, 2>::from_inner(r.logprobs))
        }
        None => None,
    };
    Ok(policy_loss(scores.logprobs, old, advantages, scores.mask, scores.entropy, ref_logp, config, normalizer))
}
