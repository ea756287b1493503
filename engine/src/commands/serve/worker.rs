//! The generation worker of `longrl serve`: one thread owns the model and runs the queued
//! work in arrival order: each request's groups (a prompt prefilled once, `n` samples drawn
//! from it, see [`generate_group`]), the log-probs a request asked for beside them, and
//! weight swaps. A swap takes effect between two requests, never inside one, so every
//! choice of a response comes from one set of weights, whose version the response names.
//!
//! Batching: the worker takes everything queued when it wakes (several requests' groups)
//! and runs it before it sleeps again; the groups of that batch are decoded one after the
//! other (the in-process generator decodes one group at a time), so concurrent requests
//! share the model without waiting for each other's HTTP handling, not a decoding batch.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::{Int, Tensor, TensorData};
use crossbeam_channel::{Receiver, Sender};
use longrl_backends::CustomGrad;
use longrl_stdlib::model::generate::{Completion, SamplingConfig, generate_group};
use longrl_stdlib::model::{CausalLm, ForwardArgs};

/// One prompt's group: `n` samples, and the log-probs asked for beside them.
#[derive(Debug, Clone)]
pub struct GenJob {
    pub prompt: Vec<u32>,
    pub n: usize,
    pub sampling: SamplingConfig,
    /// Alternatives reported per generated token (0: only the sampled token's log-prob).
    pub top_logprobs: usize,
    /// Log-probs of the prompt's tokens, with this many alternatives each.
    pub prompt_logprobs: Option<usize>,
}

/// A log-prob of one position: the token there, its log-prob and rank (1 = most likely),
/// and the most likely tokens (id, log-prob), most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionLogprob {
    pub id: u32,
    pub logprob: f32,
    pub rank: usize,
    pub top: Vec<(u32, f32)>,
}

/// What one [`GenJob`] produced.
#[derive(Debug, Clone)]
pub struct GenOutput {
    pub completions: Vec<Completion>,
    /// Per completion, per generated token: the alternatives (empty lists when none were
    /// asked for).
    pub top: Vec<Vec<Vec<(u32, f32)>>>,
    /// Per prompt position (the first has none): its log-prob, when asked for.
    pub prompt_logprobs: Option<Vec<Option<PositionLogprob>>>,
}

/// The outputs of one request's jobs and the weights version that produced them all.
#[derive(Debug, Clone)]
pub struct Generated {
    pub outputs: Vec<GenOutput>,
    pub weights_version: String,
}

/// New weights for the worker, loaded by the request that asked for them.
pub struct Swap<B: CustomGrad> {
    pub model: CausalLm<B>,
    pub version: String,
    pub path: PathBuf,
}

/// Work for the worker. `seq` orders work for `abort_all_requests`.
pub enum Work<B: CustomGrad> {
    Generate { seq: u64, jobs: Vec<GenJob>, reply: Sender<Result<Generated, String>> },
    Swap { swap: Box<Swap<B>>, reply: Sender<String> },
}

/// Shared between the request threads and the worker: the sequence numbers of work and the
/// newest sequence a weight update aborted.
#[derive(Debug, Default)]
pub struct Sequencer {
    next: AtomicU64,
    abort_before: AtomicU64,
}

impl Sequencer {
    pub fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Work numbered at or below the current number is answered "aborted" instead of run.
    pub fn abort_queued(&self) {
        let now = self.next.load(Ordering::SeqCst);
        self.abort_before.fetch_max(now + 1, Ordering::SeqCst);
    }

    fn aborted(&self, seq: u64) -> bool {
        seq < self.abort_before.load(Ordering::SeqCst)
    }
}

/// The message of work a weight update aborted.
pub const ABORTED: &str = "aborted by a weight update (abort_all_requests)";

/// Runs queued work until every sender is gone. `on_swap` hears of each new version.
pub fn run<B: CustomGrad>(
    mut model: CausalLm<B>,
    mut version: String,
    work: Receiver<Work<B>>,
    sequencer: &Sequencer,
    on_swap: impl Fn(&str, &std::path::Path),
) {
    while let Ok(first) = work.recv() {
        // Everything queued now is one batch; a swap inside it splits it where it stands.
        let batch: Vec<Work<B>> = std::iter::once(first).chain(work.try_iter()).collect();
        for item in batch {
            match item {
                Work::Generate { seq, jobs, reply } => {
                    let result = if sequencer.aborted(seq) {
                        Err(ABORTED.to_string())
                    } else {
                        jobs.iter()
                            .map(|job| run_job(&model, job))
                            .collect::<Result<Vec<_>, _>>()
                            .map(|outputs| Generated { outputs, weights_version: version.clone() })
                    };
                    // The requester may have gone (client closed the connection).
                    let _ = reply.send(result);
                }
                Work::Swap { swap, reply } => {
                    let old = std::mem::replace(&mut version, swap.version);
                    model = swap.model;
                    on_swap(&version, &swap.path);
                    let _ = reply.send(old);
                }
            }
        }
    }
}

/// Generates one group and the log-probs asked for beside it.
fn run_job<B: CustomGrad>(model: &CausalLm<B>, job: &GenJob) -> Result<GenOutput, String> {
    let completions = generate_group(model, &job.prompt, job.n, &job.sampling).map_err(|e| e.to_string())?;
    let temperature = if job.sampling.temperature > 0.0 { job.sampling.temperature } else { 1.0 };
    let top = if job.top_logprobs > 0 {
        completions
            .iter()
            .map(|c| {
                let ids: Vec<u32> = job.prompt.iter().chain(&c.tokens).copied().collect();
                let scored = position_logprobs(model, &ids, job.prompt.len(), temperature, job.top_logprobs)?;
                Ok(scored.into_iter().map(|p| p.top).collect())
            })
            .collect::<Result<Vec<_>, String>>()?
    } else {
        completions.iter().map(|c| vec![Vec::new(); c.tokens.len()]).collect()
    };
    let prompt_logprobs = match job.prompt_logprobs {
        Some(k) => {
            // Raw log-probs (temperature 1), as vLLM reports a prompt's.
            let scored = position_logprobs(model, &job.prompt, 1, 1.0, k)?;
            Some(std::iter::once(None).chain(scored.into_iter().map(Some)).collect())
        }
        None => None,
    };
    Ok(GenOutput { completions, top, prompt_logprobs })
}

/// Positions scored per forward of the LM head (bounds the `[positions, vocab]` logits).
const SCORE_CHUNK: usize = 256;

/// Log-probs under `softmax(logits / temperature)` of `ids[from..]`, each given the tokens
/// before it, with the token's rank and the `k` most likely tokens.
pub fn position_logprobs<B: CustomGrad>(
    model: &CausalLm<B>,
    ids: &[u32],
    from: usize,
    temperature: f32,
    k: usize,
) -> Result<Vec<PositionLogprob>, String> {
    if from == 0 || from > ids.len() {
        return Err(format!("cannot score from position {from} of {} tokens", ids.len()));
    }
    if from == ids.len() {
        return Ok(Vec::new());
    }
    let device = model.device();
    let len = ids.len();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>(), [1, len]), &device);
    let mut args = ForwardArgs::contiguous(1, 0, len, &device);
    args.append = false;
    let mut cache = model.new_cache();
    let hidden = model.forward_hidden(tokens, args, &mut cache); // [1, len, d]
    let d = hidden.dims()[2];
    let mut out = Vec::with_capacity(len - from);
    // The state at position j - 1 predicts token j.
    let mut start = from - 1;
    while start < len - 1 {
        let end = (start + SCORE_CHUNK).min(len - 1);
        let logits = model.logits(hidden.clone().slice([0..1, start..end, 0..d])); // [1, end - start, vocab]
        let vocab = logits.dims()[2];
        let values = logits.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| format!("cannot read logits: {e:?}"))?;
        for (row, position) in values.chunks(vocab).zip(start..end) {
            out.push(score_row(row, ids[position + 1], temperature, k));
        }
        start = end;
    }
    Ok(out)
}

/// The log-softmax of one logits row at `temperature`, read at `id`, with its top `k`.
fn score_row(row: &[f32], id: u32, temperature: f32, k: usize) -> PositionLogprob {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = row.iter().map(|&l| ((l - max) / temperature).exp()).sum::<f32>().ln();
    let logprob_of = |i: usize| (row[i] - max) / temperature - log_total;
    let own = row[id as usize];
    let rank = 1 + row.iter().filter(|&&l| l > own).count();
    let mut order: Vec<usize> = (0..row.len()).collect();
    let k = k.min(row.len());
    if k > 0 {
        order.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        order.truncate(k);
        order.sort_unstable_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    } else {
        order.clear();
    }
    PositionLogprob { id, logprob: logprob_of(id as usize), rank, top: order.into_iter().map(|i| (i as u32, logprob_of(i))).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_scored_with_its_rank_and_top_tokens() {
        let row = [0.0f32, 2.0, 1.0, 2.0];
        let scored = score_row(&row, 2, 1.0, 2);
        let log_total = (1.0f32 + 2.0 * 2f32.exp() + 1f32.exp()).ln();
        assert!((scored.logprob - (1.0 - log_total)).abs() < 1e-6);
        assert_eq!(scored.rank, 3);
        // Ties go to the lower id.
        assert_eq!(scored.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((scored.top[0].1 - (2.0 - log_total)).abs() < 1e-6);
        // Temperature scales the logits before the softmax.
        let hot = score_row(&row, 1, 2.0, 0);
        let log_total = (1.0f32 + 2.0 * 1f32.exp() + 0.5f32.exp()).ln();
        assert!((hot.logprob - (1.0 - log_total)).abs() < 1e-6 && hot.top.is_empty());
    }
}
