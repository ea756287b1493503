//! Continuous batching of group generation: the groups of several prompts decode together,
//! one batch row per sample. Each group's prompt is prefilled once (batch 1) and shared by
//! its rows ([`BatchKv`]); rows that finish leave the batch, and a waiting group joins as
//! soon as its rows fit under the row limit. A sample draws from its own stream, seeded by
//! (seed, stream index), so what it generates does not depend on the batch around it: the
//! same as [`crate::model::generate::generate_group`] gives for its group alone, up to the
//! float rounding of matmuls over another number of rows (the same tokens in the tests;
//! log-probabilities within 1e-4). A run repeats bit for bit with the same requests (and the
//! same cancellations and ended samples, at the same steps).
//! Tokens are drawn on the host or, on GPU backends, on the device ([`SampleOn`]).

use std::collections::VecDeque;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use longrl_backends::CustomGrad;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::model::ModelError;
use crate::model::batch_kv::BatchKv;
use crate::model::device_sampling::{RowDraw, draw_on_device};
use crate::model::generate::{Completion, FinishReason, SamplingConfig, host_rows, int_tensor, last_logits};
use crate::model::sampling::{sample_rng, sample_token};
use crate::model::transformer::{CausalLm, ForwardArgs};

/// `samples` completions of one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRequest {
    pub prompt: Vec<u32>,
    pub samples: usize,
    pub sampling: SamplingConfig,
    /// Sample i draws from stream `first_stream + i` of `sampling.seed` (0 for a group; a
    /// prompt's position in a batch of one-sample prompts).
    pub first_stream: usize,
}

impl GroupRequest {
    /// `samples` completions of `prompt`, from streams `0..samples`.
    pub fn group(prompt: Vec<u32>, samples: usize, sampling: SamplingConfig) -> Self {
        Self { prompt, samples, sampling, first_stream: 0 }
    }
}

/// How many rows decode together, and where their tokens are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Most rows (samples) in one decode step. A group is never split: a group larger than
    /// this runs alone.
    pub max_rows: usize,
    pub sample_on: SampleOn,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self { max_rows: 64, sample_on: SampleOn::Auto }
    }
}

impl BatchOptions {
    /// Up to `max_rows` rows, drawing where the backend does it best.
    pub fn rows(max_rows: usize) -> Self {
        Self { max_rows, ..Self::default() }
    }
}

/// Where a decode step draws its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SampleOn {
    /// Where drawing is measured to be faster: the host on the CPU backend. On GPU backends
    /// also the host until `scripts/device_check.sh` has measured both there.
    #[default]
    Auto,
    /// Copy every row's logits to the host and draw there (rows in parallel).
    Host,
    /// Draw every step on the device and copy back only the tokens and their
    /// log-probabilities ([`crate::model::device_sampling`]).
    Device,
}

impl std::str::FromStr for SampleOn {
    type Err = String;

    /// The names recipes use (serde's), for command-line flags.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| format!("unknown place to sample {s:?} (auto, host or device)"))
    }
}

impl SampleOn {
    /// Whether a decoder draws on the device.
    pub fn on_device(self) -> bool {
        match self {
            Self::Auto | Self::Host => false,
            Self::Device => true,
        }
    }

    /// Where a decoder draws, in words.
    pub fn describe(self) -> &'static str {
        if self.on_device() { "device" } else { "host" }
    }
}

/// One sample being decoded.
#[derive(Debug)]
struct Row {
    /// Index of the sample in its group.
    sample: usize,
    rng: ChaCha8Rng,
}

/// The logits every row draws its next token from, in row order (the groups' rows in the
/// order of [`BatchDecoder::running`]).
enum NextLogits<B: Backend> {
    /// One `[vocab]` row per batch row, on the host.
    Host(Vec<Vec<f32>>),
    /// Pieces of `[rows, vocab]` on the device: the last decode step's rows, then each
    /// admitted group's.
    Device(Vec<Tensor<B, 2>>),
}

impl<B: Backend> NextLogits<B> {
    fn new(on_device: bool) -> Self {
        if on_device { Self::Device(Vec::new()) } else { Self::Host(Vec::new()) }
    }

    /// Appends `samples` rows that all start from one prompt's logits.
    ///
    /// # Shapes
    /// - logits: `[1, vocab]`
    fn push_group(&mut self, logits: Tensor<B, 2>, samples: usize) -> Result<(), ModelError> {
        match self {
            Self::Host(rows) => {
                let row = host_rows(logits)?.pop().unwrap_or_default();
                rows.extend(std::iter::repeat_n(row, samples));
            }
            Self::Device(pieces) => pieces.push(logits.repeat_dim(0, samples)),
        }
        Ok(())
    }

    /// Replaces every row with a decode step's logits.
    ///
    /// # Shapes
    /// - logits: `[rows, vocab]`
    fn replace(&mut self, logits: Tensor<B, 2>) -> Result<(), ModelError> {
        match self {
            Self::Host(rows) => *rows = host_rows(logits)?,
            Self::Device(pieces) => *pieces = vec![logits],
        }
        Ok(())
    }

    /// Draws every row's token from its logits (which are used up), each row from its own
    /// stream: the host draws rows in parallel; the device takes one uniform number per
    /// sampled row, the number the host sampler would take.
    fn draw(&mut self, rows: Vec<(&SamplingConfig, &mut ChaCha8Rng)>) -> Result<Vec<(u32, f32)>, ModelError> {
        match self {
            Self::Host(logits) => {
                let logits = std::mem::take(logits);
                if logits.len() != rows.len() {
                    return Err(ModelError::Invalid(format!("{} logits rows for {} decode rows", logits.len(), rows.len())));
                }
                Ok(logits.into_par_iter().zip(rows).map(|(row, (sampling, rng))| sample_token(&row, sampling, rng)).collect())
            }
            Self::Device(pieces) => {
                let pieces = std::mem::take(pieces);
                if pieces.is_empty() {
                    if rows.is_empty() {
                        return Ok(Vec::new());
                    }
                    return Err(ModelError::Invalid(format!("no logits for {} decode rows", rows.len())));
                }
                let draws: Vec<RowDraw> = rows
                    .into_iter()
                    .map(|(config, rng)| RowDraw { config, uniform: if config.is_greedy() { 0.0 } else { rng.random::<f32>() } })
                    .collect();
                draw_on_device(Tensor::cat(pieces, 0), &draws)
            }
        }
    }
}

/// A group in the batch: its rows occupy one segment of the cache, in slot order.
#[derive(Debug)]
struct Running {
    id: usize,
    sampling: SamplingConfig,
    prompt_len: usize,
    completions: Vec<Completion>,
    rows: Vec<Row>,
}

/// Decodes queued groups in a shared batch. [`BatchDecoder::step`] advances every row by
/// one token and returns the groups that finished.
pub struct BatchDecoder<'m, B: CustomGrad> {
    model: &'m CausalLm<B>,
    options: BatchOptions,
    waiting: VecDeque<(usize, GroupRequest)>,
    /// The groups decoding, in the order of the cache's segments.
    running: Vec<Running>,
    /// Ids of running groups to drop at the next step.
    cancelled: Vec<usize>,
    /// Rows (group id, sample) to end at the next step.
    ending: Vec<(usize, usize)>,
    /// Cancelled groups that never started, returned by the next step.
    dropped: Vec<(usize, Vec<Completion>)>,
    cache: BatchKv<B>,
    next: NextLogits<B>,
}

impl<B: CustomGrad> std::fmt::Debug for BatchDecoder<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchDecoder").field("waiting", &self.waiting.len()).field("running", &self.running.len()).finish()
    }
}

impl<'m, B: CustomGrad> BatchDecoder<'m, B> {
    pub fn new(model: &'m CausalLm<B>, options: BatchOptions) -> Self {
        let next = NextLogits::new(options.sample_on.on_device());
        Self {
            model,
            options,
            waiting: VecDeque::new(),
            running: Vec::new(),
            cancelled: Vec::new(),
            ending: Vec::new(),
            dropped: Vec::new(),
            cache: BatchKv::new(model.num_layers()),
            next,
        }
    }

    /// Queues a group; [`BatchDecoder::step`] returns it under `id` when it is done.
    pub fn submit(&mut self, id: usize, request: GroupRequest) -> Result<(), ModelError> {
        if request.prompt.is_empty() {
            return Err(ModelError::Invalid("cannot generate from an empty prompt".into()));
        }
        if request.samples == 0 {
            return Err(ModelError::Invalid("a group needs at least one sample".into()));
        }
        self.waiting.push_back((id, request));
        Ok(())
    }

    /// No group is waiting or decoding.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty() && self.dropped.is_empty()
    }

    /// Groups queued or decoding.
    pub fn pending(&self) -> usize {
        self.waiting.len() + self.running.len() + self.dropped.len()
    }

    /// The groups decoding, each with its completions so far in sample order (for streaming
    /// tokens as they come; a completion's last token may be its stop token).
    pub fn decoding(&self) -> impl Iterator<Item = (usize, &[Completion])> {
        self.running.iter().map(|group| (group.id, group.completions.as_slice()))
    }

    /// Stops group `id`: its rows leave the batch at the next [`BatchDecoder::step`] (a
    /// waiting group never starts), which returns it with the tokens it has (none, for a
    /// group that had not started; the finish reason of an unfinished completion stays
    /// `Length`). Returns false when no such group is waiting or decoding.
    pub fn cancel(&mut self, id: usize) -> bool {
        if let Some(at) = self.waiting.iter().position(|(waiting, _)| *waiting == id) {
            if let Some((id, request)) = self.waiting.remove(at) {
                self.dropped.push((id, vec![unstarted(); request.samples]));
            }
            return true;
        }
        let running = self.running.iter().any(|group| group.id == id);
        if running && !self.cancelled.contains(&id) {
            self.cancelled.push(id);
        }
        running
    }

    /// Ends sample `sample` of decoding group `id` where it stands (its text reached a stop
    /// string, say): its row leaves the batch at the next [`BatchDecoder::step`] without
    /// another token, and its completion keeps the finish reason `Length`. Returns false
    /// when the group is not decoding or the sample is not among its rows.
    pub fn end_sample(&mut self, id: usize, sample: usize) -> bool {
        let decoding = self.running.iter().any(|group| group.id == id && group.rows.iter().any(|row| row.sample == sample));
        if decoding && !self.ending.contains(&(id, sample)) {
            self.ending.push((id, sample));
        }
        decoding
    }

    /// Admits the waiting groups that fit, draws a token for every row, retires the rows
    /// and groups that are done, and computes the next logits of the rest. Returns the
    /// groups that finished, each with its completions in sample order.
    pub fn step(&mut self) -> Result<Vec<(usize, Vec<Completion>)>, ModelError> {
        let mut done = std::mem::take(&mut self.dropped);
        done.extend(self.admit()?);
        let finished = self.sample()?;
        done.extend(self.retire(&finished));
        self.forward()?;
        Ok(done)
    }

    /// Prefills waiting groups while their rows fit (a group always fits an empty batch).
    /// Groups that may generate nothing finish at once.
    fn admit(&mut self) -> Result<Vec<(usize, Vec<Completion>)>, ModelError> {
        let mut done = Vec::new();
        while let Some((_, request)) = self.waiting.front() {
            let rows = self.cache.rows();
            if rows > 0 && rows + request.samples > self.options.max_rows {
                break;
            }
            let Some((id, request)) = self.waiting.pop_front() else { break };
            if request.sampling.max_new_tokens == 0 {
                done.push((id, vec![unstarted(); request.samples]));
                continue;
            }
            self.prefill(&request)?;
            let seed = request.sampling.seed;
            let rows = (0..request.samples).map(|sample| Row { sample, rng: sample_rng(seed, request.first_stream + sample) }).collect();
            self.running.push(Running {
                id,
                prompt_len: request.prompt.len(),
                completions: vec![unstarted(); request.samples],
                rows,
                sampling: request.sampling,
            });
        }
        Ok(done)
    }

    /// Computes a prompt's keys and values (batch 1) into a new segment, and its rows'
    /// logits of their first token.
    fn prefill(&mut self, request: &GroupRequest) -> Result<(), ModelError> {
        let device = self.model.device();
        let p = request.prompt.len();
        let mut prompt_cache = self.model.new_cache();
        let tokens = int_tensor::<B, _>(request.prompt.iter().map(|&t| i64::from(t)).collect(), [1, p], &device);
        let hidden = self.model.forward_hidden(tokens, ForwardArgs::contiguous(1, 0, p, &device), &mut prompt_cache); // [1, p, d]
        self.next.push_group(last_logits(self.model, hidden), request.samples)?;
        // A row's own keys: every token it generates except the last.
        self.cache.push_segment(prompt_cache, request.samples, request.sampling.max_new_tokens - 1)
    }

    /// Draws every row's next token (each from its own stream) and appends it; returns,
    /// per running group, the slots of the rows that are done.
    fn sample(&mut self) -> Result<Vec<Vec<usize>>, ModelError> {
        let mut work: Vec<(&SamplingConfig, &mut ChaCha8Rng)> = Vec::with_capacity(self.cache.rows());
        for group in &mut self.running {
            let Running { sampling, rows, .. } = group;
            work.extend(rows.iter_mut().map(|row| (&*sampling, &mut row.rng)));
        }
        let mut drawn = self.next.draw(work)?.into_iter();
        let mut finished = Vec::with_capacity(self.running.len());
        let cancelled = std::mem::take(&mut self.cancelled);
        let ending = std::mem::take(&mut self.ending);
        for group in &mut self.running {
            let mut slots = Vec::new();
            let whole = cancelled.contains(&group.id);
            for (slot, row) in group.rows.iter().enumerate() {
                let Some((token, logprob)) = drawn.next() else { break };
                // A cancelled group's or an ended row's draw is dropped and the row leaves.
                if whole || ending.contains(&(group.id, row.sample)) {
                    slots.push(slot);
                    continue;
                }
                let completion = &mut group.completions[row.sample];
                completion.tokens.push(token);
                completion.logprobs.push(logprob);
                let stopped = group.sampling.stop_tokens.contains(&token);
                if stopped {
                    completion.finish = FinishReason::Stop;
                }
                if stopped || completion.tokens.len() >= group.sampling.max_new_tokens {
                    slots.push(slot);
                }
            }
            finished.push(slots);
        }
        Ok(finished)
    }

    /// Removes the rows that are done (the last row of a segment takes a freed slot) and
    /// returns the groups with no row left.
    fn retire(&mut self, finished: &[Vec<usize>]) -> Vec<(usize, Vec<Completion>)> {
        let mut done = Vec::new();
        for index in (0..self.running.len()).rev() {
            // Highest slots first: the row moved into a freed slot is then always one
            // that is still decoding.
            for &slot in finished[index].iter().rev() {
                self.cache.remove_row(index, slot);
                self.running[index].rows.swap_remove(slot);
            }
            if self.running[index].rows.is_empty() {
                self.cache.remove_segment(index);
                let group = self.running.remove(index);
                done.push((group.id, group.completions));
            }
        }
        done.reverse();
        done
    }

    /// Feeds every remaining row its last token and stores the next logits.
    fn forward(&mut self) -> Result<(), ModelError> {
        let b = self.cache.rows();
        if b == 0 {
            return Ok(());
        }
        let device = self.model.device();
        let (mut tokens, mut positions) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for group in &self.running {
            for row in &group.rows {
                let completion = &group.completions[row.sample];
                tokens.push(completion.tokens.last().map_or(0, |&t| i64::from(t)));
                // The token's absolute position: after the prompt and the earlier tokens.
                positions.push((group.prompt_len + completion.tokens.len() - 1) as f32);
            }
        }
        let tokens = int_tensor::<B, _>(tokens, [b, 1], &device);
        let positions = Tensor::<B, 2>::from_data(TensorData::new(positions, [b, 1]), &device);
        let hidden = self.model.forward_segments(tokens, positions, &mut self.cache); // [b, 1, d]
        self.next.replace(last_logits(self.model, hidden))
    }
}

/// A completion with no token yet.
fn unstarted() -> Completion {
    Completion { tokens: Vec::new(), logprobs: Vec::new(), finish: FinishReason::Length }
}

/// Every request's completions (in request order), decoded together in batches of at most
/// `options.max_rows` rows.
pub fn generate_groups<B: CustomGrad>(
    model: &CausalLm<B>,
    requests: Vec<GroupRequest>,
    options: BatchOptions,
) -> Result<Vec<Vec<Completion>>, ModelError> {
    let mut decoder = BatchDecoder::new(model, options);
    let mut out: Vec<Option<Vec<Completion>>> = vec![None; requests.len()];
    for (id, request) in requests.into_iter().enumerate() {
        decoder.submit(id, request)?;
    }
    while !decoder.is_idle() {
        for (id, completions) in decoder.step()? {
            out[id] = Some(completions);
        }
    }
    Ok(out.into_iter().map(Option::unwrap_or_default).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::RandomInit;
    use crate::model::{Architecture, ModelConfig};
    use longrl_backends::Cpu;

    fn sampling(seed: u64) -> SamplingConfig {
        SamplingConfig { temperature: 1.0, max_new_tokens: 6, seed, ..SamplingConfig::default() }
    }

    #[test]
    fn cancelled_groups_and_ended_samples_leave_at_the_next_step_and_the_rest_decode_as_without_them() {
        let config = ModelConfig::tiny(Architecture::Qwen2, 64, 32, 2, 4, 2, 64);
        let model = CausalLm::<Cpu>::build(&config, &mut RandomInit::new(5, 0.3), &Default::default()).expect("builds");
        let groups = [
            GroupRequest::group(vec![1, 2, 3], 2, sampling(1)),
            GroupRequest::group(vec![4, 5], 2, sampling(2)),
            GroupRequest::group(vec![6], 3, sampling(3)),
        ];
        // Four rows at most: the third group waits while the first two decode.
        let options = BatchOptions { max_rows: 4, sample_on: SampleOn::Host };
        let mut decoder = BatchDecoder::new(&model, options);
        for (id, group) in groups.iter().enumerate() {
            decoder.submit(id, group.clone()).expect("queued");
        }
        assert!(decoder.step().expect("steps").is_empty());
        let so_far: Vec<(usize, Vec<usize>)> = decoder.decoding().map(|(id, c)| (id, c.iter().map(|c| c.tokens.len()).collect())).collect();
        assert_eq!(so_far, vec![(0, vec![1, 1]), (1, vec![1, 1])], "one token per row of the groups decoding");
        let first_tokens: Vec<u32> = decoder.decoding().find(|(id, _)| *id == 1).expect("group 1").1.iter().map(|c| c.tokens[0]).collect();
        assert!(decoder.cancel(1) && decoder.cancel(2) && !decoder.cancel(7));
        // Group 0's second sample ends after its first token; its first decodes on.
        assert!(decoder.end_sample(0, 1) && !decoder.end_sample(0, 5) && !decoder.end_sample(2, 0));
        let done = decoder.step().expect("steps");
        let ids: Vec<usize> = done.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![2, 1], "both cancelled groups come back at once");
        assert!(done[0].1.iter().all(|c| c.tokens.is_empty()), "a group cancelled while waiting has no tokens");
        assert_eq!(
            done[1].1.iter().map(|c| c.tokens.clone()).collect::<Vec<_>>(),
            first_tokens.iter().map(|&t| vec![t]).collect::<Vec<_>>()
        );
        let mut rest = Vec::new();
        while !decoder.is_idle() {
            rest.extend(decoder.step().expect("steps"));
        }
        assert_eq!(rest.len(), 1);
        let alone = generate_groups(&model, vec![groups[0].clone()], options).expect("generates");
        assert_eq!(rest[0].0, 0);
        assert_eq!(rest[0].1[0].tokens, alone[0][0].tokens, "the sample left running decodes as alone");
        assert_eq!(rest[0].1[1].tokens, alone[0][1].tokens[..1], "the ended sample keeps its first token only");
    }
}
