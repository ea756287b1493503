//! Per-token log-probabilities and entropies of given responses under a model: batched
//! with padding masks, differentiable on an autodiff backend (the trainer's loss) and plain
//! on an inference backend (old and reference policies). A group's shared prompt is computed
//! once and attended to by all its responses.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::ModelError;
use crate::model::transformer::{CausalLm, ForwardArgs};

/// Log-probs, entropies and the mask of real (non-padding) response tokens.
#[derive(Debug, Clone)]
pub struct TokenScores<B: Backend> {
    /// `[batch, len]` log-probability of each response token.
    pub logprobs: Tensor<B, 2>,
    /// `[batch, len]` entropy of the predicted distribution at each response token.
    pub entropy: Tensor<B, 2>,
    /// `[batch, len]` 1.0 for response tokens, 0.0 for padding.
    pub mask: Tensor<B, 2>,
}

/// Scores `responses` that all follow the same `prompt` (an RL group): the prompt runs
/// once, and every response attends to its keys and values.
pub fn score_group<B: Backend>(model: &CausalLm<B>, prompt: &[u32], responses: &[Vec<u32>]) -> Result<TokenScores<B>, ModelError> {
    score_group_at(model, prompt, responses, 1.0)
}

/// [`score_group`] under the distribution `softmax(logits / temperature)`, the one a
/// sampler at that temperature draws from.
pub fn score_group_at<B: Backend>(
    model: &CausalLm<B>,
    prompt: &[u32],
    responses: &[Vec<u32>],
    temperature: f32,
) -> Result<TokenScores<B>, ModelError> {
    if prompt.is_empty() || responses.is_empty() || responses.iter().any(Vec::is_empty) {
        return Err(ModelError::Invalid("scoring needs a prompt and non-empty responses".into()));
    }
    let device = model.device();
    let p = prompt.len();
    let g = responses.len();
    let len = responses.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = model.new_cache();
    let prompt_ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(prompt.iter().map(|&t| i64::from(t)).collect::<Vec<_>>(), [1, p]), &device);
    let prompt_hidden = model.forward_hidden(prompt_ids, ForwardArgs::contiguous(1, 0, p, &device), &mut cache); // [1, p, d]
    let d = prompt_hidden.dims()[2];
    let last_prompt = prompt_hidden.slice([0..1, p - 1..p, 0..d]).expand([g, 1, d]); // [g, 1, d]
    let cache_len = cache.own_len();
    let mut cache = cache.into_shared()?;
    debug_assert_eq!(cache.shared_len(), cache_len);

    let (ids, targets, mask) = padded(responses, len);
    let hidden = if len > 1 {
        // Response tokens 0..len-1 predict tokens 1..len; token 0 is predicted by the prompt.
        let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [g, len]), &device).slice([0..g, 0..len - 1]);
        let mut args = ForwardArgs::contiguous(g, p, len - 1, &device);
        args.append = false;
        let response_hidden = model.forward_hidden(inputs, args, &mut cache); // [g, len-1, d]
        Tensor::cat(vec![last_prompt, response_hidden], 1) // [g, len, d]
    } else {
        last_prompt
    };
    Ok(scores_from_hidden(model, hidden, targets, mask, temperature, &device))
}

/// Scores each `(prompt, response)` pair of a batch of different prompts. Rows are
/// right-padded, so padding never precedes a real token and needs no attention mask.
pub fn score_batch<B: Backend>(model: &CausalLm<B>, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<TokenScores<B>, ModelError> {
    if pairs.is_empty() || pairs.iter().any(|(p, r)| p.is_empty() || r.is_empty()) {
        return Err(ModelError::Invalid("scoring needs non-empty prompts and responses".into()));
    }
    let device = model.device();
    let b = pairs.len();
    let width = pairs.iter().map(|(p, r)| p.len() + r.len()).max().unwrap_or(0);
    let len = pairs.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    let mut ids = vec![0i64; b * width];
    for (row, (prompt, response)) in pairs.iter().enumerate() {
        for (j, &t) in prompt.iter().chain(response).enumerate() {
            ids[row * width + j] = i64::from(t);
        }
    }
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, width]), &device);
    let mut args = ForwardArgs::contiguous(b, 0, width, &device);
    args.append = false;
    let mut cache = model.new_cache();
    let hidden = model.forward_hidden(tokens, args, &mut cache); // [b, width, d]
    let d = hidden.dims()[2];
    // Hidden state that predicts response token j of row i sits at prompt_len_i - 1 + j.
    let mut index = Vec::with_capacity(b * len * d);
    for (prompt, _) in pairs {
        for j in 0..len {
            let at = (prompt.len() - 1 + j).min(width - 1) as i64;
            index.extend(std::iter::repeat_n(at, d));
        }
    }
    let index = Tensor::<B, 3, Int>::from_data(TensorData::new(index, [b, len, d]), &device);
    let picked = hidden.gather(1, index); // [b, len, d]
    let responses: Vec<Vec<u32>> = pairs.iter().map(|(_, r)| r.clone()).collect();
    let (_, targets, mask) = padded(&responses, len);
    Ok(scores_from_hidden(model, picked, targets, mask, 1.0, &device))
}

/// Right-padded ids, targets (same ids) and mask of a set of responses.
fn padded(responses: &[Vec<u32>], len: usize) -> (Vec<i64>, Vec<i64>, Vec<f32>) {
    let mut ids = Vec::with_capacity(responses.len() * len);
    let mut mask = Vec::with_capacity(responses.len() * len);
    for response in responses {
        for j in 0..len {
            ids.push(response.get(j).map_or(0, |&t| i64::from(t)));
            mask.push(if j < response.len() { 1.0 } else { 0.0 });
        }
    }
    (ids.clone(), ids, mask)
}

/// Log-probs of `targets` and entropies from the hidden states that predict them.
///
/// # Shapes
/// - hidden: `[batch, len, d]`; targets and mask: `batch * len` values
fn scores_from_hidden<B: Backend>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 3>,
    targets: Vec<i64>,
    mask: Vec<f32>,
    temperature: f32,
    device: &B::Device,
) -> TokenScores<B> {
    let [b, len, _] = hidden.dims();
    let logits = model.logits(hidden); // [b, len, vocab]
    let logits = if (temperature - 1.0).abs() > f32::EPSILON && temperature > 0.0 { logits.div_scalar(temperature) } else { logits };
    let logp = log_softmax(logits, 2); // [b, len, vocab]
    let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [b, len, 1]), device);
    let logprobs = logp.clone().gather(2, targets).reshape([b, len]);
    let entropy = (logp.clone().exp() * logp).sum_dim(2).reshape([b, len]).neg();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, len]), device);
    TokenScores { logprobs: logprobs * mask.clone(), entropy: entropy * mask.clone(), mask }
}
