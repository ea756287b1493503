//! Sampling with a KV cache: greedy, temperature, top-k, top-p, stop tokens and a token
//! limit, seeded per sample. A group's prompt is prefilled once and its keys and values
//! shared by all G samples; a batch of different prompts is left-padded. Finished rows are
//! dropped from the batch as they finish.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use longrl_backends::CustomGrad;
use rand_chacha::ChaCha8Rng;

use crate::model::ModelError;
pub use crate::model::sampling::{sample_rng, sample_token};
use crate::model::transformer::{CausalLm, ForwardArgs, KvCache};

/// How tokens are drawn.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingConfig {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches this (1 = off).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Generation of a row ends after any of these tokens (it is kept in the output).
    pub stop_tokens: Vec<u32>,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 256, stop_tokens: Vec::new(), seed: 0 }
    }
}

impl SamplingConfig {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { temperature: 0.0, max_new_tokens, ..Self::default() }
    }

    /// Whether a draw takes the most likely token (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether top-k or top-p cut the candidates of a sampled (not greedy) draw.
    pub fn truncates(&self) -> bool {
        !self.is_greedy() && (self.top_k > 0 || self.top_p < 1.0)
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token was produced.
    Stop,
    /// `max_new_tokens` was reached (the response is truncated).
    Length,
}

/// One sampled continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub tokens: Vec<u32>,
    /// Log-probability of each sampled token under the temperature-scaled distribution
    /// before top-k/top-p truncation (what a trainer recomputes as the old policy's).
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

/// `group` samples of one prompt. The prompt is computed once; its keys and values are
/// shared by every sample. Sample i draws from its own stream seeded by (seed, i).
pub fn generate_group<B: CustomGrad>(
    model: &CausalLm<B>,
    prompt: &[u32],
    group: usize,
    config: &SamplingConfig,
) -> Result<Vec<Completion>, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid("cannot generate from an empty prompt".into()));
    }
    let device = model.device();
    let p = prompt.len();
    let mut cache = model.new_cache();
    let tokens = int_tensor::<B, _>(prompt.iter().map(|&t| t as i64).collect(), [1, p], &device);
    let hidden = model.forward_hidden(tokens, ForwardArgs::contiguous(1, 0, p, &device), &mut cache); // [1, p, d]
    let last = last_logits(model, hidden); // [1, vocab]
    let first_row = host_rows(last)?.pop().unwrap_or_default();
    let cache = cache.into_shared()?;
    let rows: Vec<Vec<f32>> = vec![first_row; group];
    let positions: Vec<usize> = vec![p; group];
    decode(model, cache, rows, positions, None, config, (0..group).collect())
}

/// One sample for each of several prompts, left-padded into one batch.
pub fn generate_batch<B: CustomGrad>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    config: &SamplingConfig,
) -> Result<Vec<Completion>, ModelError> {
    if prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::Invalid("cannot generate from an empty prompt".into()));
    }
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let device = model.device();
    let b = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * width);
    let mut positions = Vec::with_capacity(b * width);
    let mut padding = Vec::with_capacity(b * width);
    for prompt in prompts {
        let pad = width - prompt.len();
        for j in 0..width {
            let real = j >= pad;
            ids.push(if real { i64::from(prompt[j - pad]) } else { 0 });
            positions.push(if real { (j - pad) as f32 } else { 0.0 });
            padding.push(!real);
        }
    }
    let args = ForwardArgs {
        positions: Tensor::from_data(TensorData::new(positions, [b, width]), &device),
        key_padding: Some(Tensor::from_data(TensorData::new(padding.clone(), [b, width]), &device)),
        append: true,
    };
    let mut cache = model.new_cache();
    let hidden = model.forward_hidden(int_tensor::<B, _>(ids, [b, width], &device), args, &mut cache);
    let rows = host_rows(last_logits(model, hidden))?;
    let next_positions: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let padding_rows: Vec<Vec<bool>> = padding.chunks(width).map(<[bool]>::to_vec).collect();
    decode(model, cache, rows, next_positions, Some(padding_rows), config, (0..b).collect())
}

/// The decode loop: sample from `rows` (one logits row per active sample), feed the samples
/// back, repeat. `padding` tracks each row's masked keys when the batch is left-padded.
fn decode<B: CustomGrad>(
    model: &CausalLm<B>,
    mut cache: KvCache<B>,
    mut rows: Vec<Vec<f32>>,
    mut positions: Vec<usize>,
    mut padding: Option<Vec<Vec<bool>>>,
    config: &SamplingConfig,
    sample_ids: Vec<usize>,
) -> Result<Vec<Completion>, ModelError> {
    let device = model.device();
    let n = sample_ids.len();
    let mut rngs: Vec<ChaCha8Rng> = sample_ids.iter().map(|&i| sample_rng(config.seed, i)).collect();
    let mut out: Vec<Completion> =
        (0..n).map(|_| Completion { tokens: Vec::new(), logprobs: Vec::new(), finish: FinishReason::Length }).collect();
    // active[k] = which completion batch row k belongs to.
    let mut active: Vec<usize> = (0..n).collect();
    if config.max_new_tokens == 0 {
        return Ok(out);
    }
    loop {
        let mut next = Vec::with_capacity(active.len());
        let mut still = Vec::with_capacity(active.len());
        for (row, &sample) in rows.iter().zip(&active) {
            let (token, logprob) = sample_token(row, config, &mut rngs[sample]);
            let completion = &mut out[sample];
            completion.tokens.push(token);
            completion.logprobs.push(logprob);
            let stopped = config.stop_tokens.contains(&token);
            if stopped {
                completion.finish = FinishReason::Stop;
            }
            let done = stopped || completion.tokens.len() >= config.max_new_tokens;
            still.push(!done);
            next.push(token);
        }
        if still.iter().all(|s| !s) {
            return Ok(out);
        }
        // Drop finished rows from the batch and the cache.
        if still.iter().any(|s| !s) {
            let keep: Vec<usize> = (0..active.len()).filter(|&k| still[k]).collect();
            cache.select_rows(int_tensor::<B, _>(keep.iter().map(|&k| k as i64).collect(), [keep.len()], &device));
            active = keep.iter().map(|&k| active[k]).collect();
            next = keep.iter().map(|&k| next[k]).collect();
            positions = keep.iter().map(|&k| positions[k]).collect();
            if let Some(pad) = padding.as_mut() {
                *pad = keep.iter().map(|&k| pad[k].clone()).collect();
            }
        }
        let b = active.len();
        let key_padding = padding.as_mut().map(|pad| {
            for row in pad.iter_mut() {
                row.push(false);
            }
            let width = pad[0].len();
            let flat: Vec<bool> = pad.iter().flatten().copied().collect();
            Tensor::<B, 2, Bool>::from_data(TensorData::new(flat, [b, width]), &device)
        });
        let args = ForwardArgs {
            positions: Tensor::from_data(TensorData::new(positions.iter().map(|&p| p as f32).collect::<Vec<_>>(), [b, 1]), &device),
            key_padding,
            append: true,
        };
        let tokens = int_tensor::<B, _>(next.iter().map(|&t| i64::from(t)).collect(), [b, 1], &device);
        let hidden = model.forward_hidden(tokens, args, &mut cache); // [b, 1, d]
        rows = host_rows(last_logits(model, hidden))?;
        positions.iter_mut().for_each(|p| *p += 1);
    }
}

/// Logits of the last position.
///
/// # Shapes
/// - hidden: `[batch, seq, hidden]` -> `[batch, vocab]`
pub(crate) fn last_logits<B: CustomGrad>(model: &CausalLm<B>, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, s, d] = hidden.dims();
    let last = hidden.slice([0..b, s - 1..s, 0..d]);
    let logits = model.logits(last); // [b, 1, vocab]
    let vocab = logits.dims()[2];
    logits.reshape([b, vocab])
}

/// The rows of `[batch, vocab]` logits on the host, each copied once from the tensor's data.
pub(crate) fn host_rows<B: Backend>(logits: Tensor<B, 2>) -> Result<Vec<Vec<f32>>, ModelError> {
    let [b, vocab] = logits.dims();
    let data = logits.into_data().convert::<f32>();
    let values = data.as_slice::<f32>().map_err(|e| ModelError::Invalid(format!("cannot read logits: {e:?}")))?;
    Ok((0..b).map(|i| values[i * vocab..(i + 1) * vocab].to_vec()).collect())
}

pub(crate) fn int_tensor<B: Backend, const D: usize>(values: Vec<i64>, shape: [usize; D], device: &B::Device) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}
