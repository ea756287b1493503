//! Per-token log-probabilities and entropies of given responses under a model: batched
//! with padding masks, differentiable on an autodiff backend (the trainer's loss) and plain
//! on an inference backend (old and reference policies). A group's shared prompt is computed
//! once ([`Prefix`]) and attended to by all its responses; the LM head runs over chunks of
//! positions ([`CausalLm::token_scores`]), so no `[positions, vocab]` tensor exists at once.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use longrl_backends::CustomGrad;

use crate::model::ModelError;
use crate::model::transformer::{CausalLm, ForwardArgs, KvCache};

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

/// A group's prompt, computed once: every layer's keys and values (shared by all the
/// responses that follow it) and the final hidden state of its last position (which
/// predicts each response's first token).
#[derive(Debug, Clone)]
pub struct Prefix<B: Backend> {
    /// A cache holding the prompt as a shared prefix.
    pub cache: KvCache<B>,
    /// `[1, 1, hidden]`, after the final norm.
    pub last: Tensor<B, 3>,
}

/// Runs the prompt.
pub fn prefill<B: CustomGrad>(model: &CausalLm<B>, prompt: &[u32]) -> Result<Prefix<B>, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid("scoring needs a non-empty prompt".into()));
    }
    let device = model.device();
    let p = prompt.len();
    let mut cache = model.new_cache();
    let ids = TensorData::new(prompt.iter().map(|&t| i64::from(t)).collect::<Vec<_>>(), [1, p]);
    let x = model.forward_layers(Tensor::<B, 2, Int>::from_data(ids, &device), ForwardArgs::contiguous(1, 0, p, &device), &mut cache); // [1, p, d]
    let d = x.dims()[2];
    let last = model.final_norm(x.slice([0..1, p - 1..p, 0..d])); // [1, 1, d]
    Ok(Prefix { cache: cache.into_shared()?, last })
}

/// The gradients of a [`Prefix`]'s tensors (see [`Prefix::detached`]).
#[derive(Debug, Clone)]
pub struct PrefixGrads<B: Backend> {
    /// Per layer, the keys' and values' gradients.
    pub layers: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    pub last: Tensor<B, 3>,
}

impl<B: AutodiffBackend> Prefix<B> {
    /// The same prefix as fresh leaves of the graph: a backward through responses scored
    /// against it stops here, and [`Prefix::grads`] reads the gradients that reached it.
    pub fn detached(&self) -> Self {
        let leaf4 = |t: &Tensor<B, 4>| t.clone().detach().require_grad();
        let mut cache = self.cache.clone();
        for layer in &mut cache.layers {
            layer.shared = layer.shared.as_ref().map(|(k, v)| (leaf4(k), leaf4(v)));
        }
        Self { cache, last: self.last.clone().detach().require_grad() }
    }

    /// The gradients that reached a [`Prefix::detached`] copy (zero where none did).
    pub fn grads(&self, grads: &B::Gradients) -> PrefixGrads<B::InnerBackend> {
        fn grad_or_zero<B: AutodiffBackend, const D: usize>(t: &Tensor<B, D>, grads: &B::Gradients) -> Tensor<B::InnerBackend, D> {
            t.grad(grads).unwrap_or_else(|| t.clone().inner().zeros_like())
        }
        let layers = self
            .cache
            .layers
            .iter()
            .filter_map(|layer| layer.shared.as_ref())
            .map(|(k, v)| (grad_or_zero(k, grads), grad_or_zero(v, grads)))
            .collect();
        PrefixGrads { layers, last: grad_or_zero(&self.last, grads) }
    }

    /// A scalar whose gradient through this prefix's graph is `grads` (summed over the
    /// micro-batches that used detached copies): `sum(K dK) + sum(V dV) + sum(h dh)`.
    pub fn surrogate(&self, grads: &PrefixGrads<B::InnerBackend>) -> Tensor<B, 1> {
        let mut total = (self.last.clone() * Tensor::from_inner(grads.last.clone())).sum();
        let shared = self.cache.layers.iter().filter_map(|layer| layer.shared.as_ref());
        for ((k, v), (dk, dv)) in shared.zip(&grads.layers) {
            total = total + (k.clone() * Tensor::from_inner(dk.clone())).sum() + (v.clone() * Tensor::from_inner(dv.clone())).sum();
        }
        total
    }
}

impl<B: Backend> PrefixGrads<B> {
    /// Adds another micro-batch's gradients.
    pub fn add(self, other: Self) -> Self {
        let layers = self.layers.into_iter().zip(other.layers).map(|((k, v), (dk, dv))| (k + dk, v + dv)).collect();
        Self { layers, last: self.last + other.last }
    }
}

/// Scores `responses` that all follow the same `prompt` (an RL group): the prompt runs
/// once, and every response attends to its keys and values.
pub fn score_group<B: CustomGrad>(model: &CausalLm<B>, prompt: &[u32], responses: &[Vec<u32>]) -> Result<TokenScores<B>, ModelError> {
    score_group_at(model, prompt, responses, 1.0)
}

/// [`score_group`] under the distribution `softmax(logits / temperature)`, the one a
/// sampler at that temperature draws from.
pub fn score_group_at<B: CustomGrad>(
    model: &CausalLm<B>,
    prompt: &[u32],
    responses: &[Vec<u32>],
    temperature: f32,
) -> Result<TokenScores<B>, ModelError> {
    let prefix = prefill(model, prompt)?;
    score_with_prefix(model, &prefix, responses, temperature, true)
}

/// Scores responses against a computed prompt. `entropy_grad`: whether the entropy's
/// gradient is needed (the loss has an entropy term).
pub fn score_with_prefix<B: CustomGrad>(
    model: &CausalLm<B>,
    prefix: &Prefix<B>,
    responses: &[Vec<u32>],
    temperature: f32,
    entropy_grad: bool,
) -> Result<TokenScores<B>, ModelError> {
    if responses.is_empty() || responses.iter().any(Vec::is_empty) {
        return Err(ModelError::Invalid("scoring needs non-empty responses".into()));
    }
    let device = model.device();
    let p = prefix.cache.shared_len();
    let g = responses.len();
    let len = responses.iter().map(Vec::len).max().unwrap_or(0);
    let d = prefix.last.dims()[2];
    let first = prefix.last.clone().expand([g, 1, d]); // [g, 1, d]
    let (ids, mask) = padded(responses, len);
    let hidden = if len > 1 {
        // Response tokens 0..len-1 predict tokens 1..len; token 0 is predicted by the prompt.
        let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [g, len]), &device).slice([0..g, 0..len - 1]);
        let mut args = ForwardArgs::contiguous(g, p, len - 1, &device);
        args.append = false;
        let mut cache = prefix.cache.clone();
        let response_hidden = model.final_norm(model.forward_layers(inputs, args, &mut cache)); // [g, len-1, d]
        Tensor::cat(vec![first, response_hidden], 1) // [g, len, d]
    } else {
        first
    };
    Ok(scores_from_hidden(model, hidden, ids, mask, temperature, entropy_grad))
}

/// Scores each `(prompt, response)` pair of a batch of different prompts. Rows are
/// right-padded, so padding never precedes a real token and needs no attention mask.
pub fn score_batch<B: CustomGrad>(model: &CausalLm<B>, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<TokenScores<B>, ModelError> {
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
    let x = model.forward_layers(tokens, args, &mut cache); // [b, width, d]
    let d = x.dims()[2];
    // The state that predicts response token j of row i sits at prompt_len_i - 1 + j.
    let mut index = Vec::with_capacity(b * len * d);
    for (prompt, _) in pairs {
        for j in 0..len {
            let at = (prompt.len() - 1 + j).min(width - 1) as i64;
            index.extend(std::iter::repeat_n(at, d));
        }
    }
    let index = Tensor::<B, 3, Int>::from_data(TensorData::new(index, [b, len, d]), &device);
    let picked = model.final_norm(x.gather(1, index)); // [b, len, d]
    let responses: Vec<Vec<u32>> = pairs.iter().map(|(_, r)| r.clone()).collect();
    let (targets, mask) = padded(&responses, len);
    Ok(scores_from_hidden(model, picked, targets, mask, 1.0, false))
}

/// Right-padded ids and mask of a set of responses.
fn padded(responses: &[Vec<u32>], len: usize) -> (Vec<i64>, Vec<f32>) {
    let mut ids = Vec::with_capacity(responses.len() * len);
    let mut mask = Vec::with_capacity(responses.len() * len);
    for response in responses {
        for j in 0..len {
            ids.push(response.get(j).map_or(0, |&t| i64::from(t)));
            mask.push(if j < response.len() { 1.0 } else { 0.0 });
        }
    }
    (ids, mask)
}

/// Log-probs of `targets` and entropies from the final hidden states that predict them.
///
/// # Shapes
/// - hidden: `[batch, len, d]`; targets and mask: `batch * len` values
fn scores_from_hidden<B: CustomGrad>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 3>,
    targets: Vec<i64>,
    mask: Vec<f32>,
    temperature: f32,
    entropy_grad: bool,
) -> TokenScores<B> {
    let [b, len, d] = hidden.dims();
    let temperature = if temperature > 0.0 { temperature } else { 1.0 };
    let (logprobs, entropy) = model.token_scores(hidden.reshape([b * len, d]), targets, temperature, entropy_grad);
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, len]), &model.device());
    TokenScores { logprobs: logprobs.reshape([b, len]) * mask.clone(), entropy: entropy.reshape([b, len]) * mask.clone(), mask }
}
