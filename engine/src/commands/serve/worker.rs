//! The generation worker of `longrl serve`: one thread owns the model and runs the queued
//! work in arrival order: each request's groups (a prompt prefilled once, `n` samples drawn
//! from it, see [`generate_group`]), the log-probs a request asked for beside them, and
//! weight swaps. A swap takes effect between two requests, never inside one, so every
//! choice of a response comes from one set of weights, whose version the response names.
//!
//! Batching: the worker takes everything queued when it wakes (several requests' groups)
//! and decodes the groups of all those requests together ([`BatchDecoder`]: each prompt
//! prefilled once, up to [`BatchOptions::max_rows`] samples per decode step, a finished
//! group's rows going to a waiting one). A sample draws from its own seeded stream, so it
//! gets the same tokens whatever decodes beside it. A weight swap splits the batch where
//! it stands.
//!
//! A sample's tokens do not depend on what decodes beside it; its log-probs do, within float
//! rounding, and the batch around it depends on when requests arrive and when stop strings
//! and departed clients end rows, so a server's log-probs repeat only to that rounding.
//!
//! A request that streams or watches for stop strings hears of its tokens after every
//! decoding step ([`Update::Tokens`]) and names the samples that reached a stop string, which
//! end at the next step; a request whose client went away, or that a weight update aborted,
//! has its groups dropped from the batch at the next step, while the other requests decode on.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use burn::tensor::{Int, Tensor, TensorData};
use crossbeam_channel::{Receiver, Sender};
use longrl_backends::CustomGrad;
use longrl_stdlib::model::batch_decode::{BatchDecoder, BatchOptions, GroupRequest};
use longrl_stdlib::model::generate::{Completion, SamplingConfig};
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

/// Tokens one sample of a streamed request drew since the last report.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTokens {
    /// The job (prompt) of the request, and the sample of its group.
    pub job: usize,
    pub sample: usize,
    /// The index in the sample's completion of the first of `tokens`.
    pub from: usize,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
}

/// What the worker tells a request: its tokens as they come (when it streams them), then
/// its outcome.
#[derive(Debug)]
pub enum Update {
    Tokens(Vec<NewTokens>),
    Done(Result<Generated, String>),
}

/// A request's generation, queued for the worker.
#[derive(Debug)]
pub struct Generation {
    /// Orders work for `abort_all_requests`.
    pub seq: u64,
    pub jobs: Vec<GenJob>,
    pub updates: Sender<Update>,
    /// Report tokens after every decoding step.
    pub report_tokens: bool,
    /// Set when the request's client went away: its groups stop at the next step.
    pub cancelled: Arc<AtomicBool>,
    /// Samples (job, sample) whose text reached a stop string: they end at the next step.
    pub end_samples: Receiver<(usize, usize)>,
}

/// Work for the worker.
pub enum Work<B: CustomGrad> {
    Generate(Generation),
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

/// The message of work whose client went away.
pub const CANCELLED: &str = "cancelled: the client went away";

/// How the worker has batched so far (for `/health`).
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Decoding batches run.
    pub batches: AtomicU64,
    /// Requests answered from them.
    pub requests: AtomicU64,
    /// Groups (prompts) decoded in them.
    pub groups: AtomicU64,
    /// The most groups one batch held.
    pub largest: AtomicU64,
    /// Requests dropped because their client went away.
    pub cancelled: AtomicU64,
    /// Samples ended early because their text reached a stop string.
    pub ended_at_stop: AtomicU64,
}

impl BatchStats {
    fn record(&self, requests: usize, groups: usize) {
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.requests.fetch_add(requests as u64, Ordering::SeqCst);
        self.groups.fetch_add(groups as u64, Ordering::SeqCst);
        self.largest.fetch_max(groups as u64, Ordering::SeqCst);
    }

    /// The figures as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "batches": self.batches.load(Ordering::SeqCst),
            "requests": self.requests.load(Ordering::SeqCst),
            "groups": self.groups.load(Ordering::SeqCst),
            "largest_batch_groups": self.largest.load(Ordering::SeqCst),
            "cancelled_requests": self.cancelled.load(Ordering::SeqCst),
            "samples_ended_at_stop_strings": self.ended_at_stop.load(Ordering::SeqCst),
        })
    }
}

/// Runs queued work until every sender is gone, decoding with `options`. `on_swap` hears of
/// each new version.
pub fn run<B: CustomGrad>(
    mut model: CausalLm<B>,
    mut version: String,
    work: Receiver<Work<B>>,
    options: BatchOptions,
    sequencer: &Sequencer,
    stats: &BatchStats,
    on_swap: impl Fn(&str, &std::path::Path),
) {
    while let Ok(first) = work.recv() {
        // Everything queued now is one batch; a swap inside it splits it where it stands.
        let mut pending: Vec<Generation> = Vec::new();
        for item in std::iter::once(first).chain(work.try_iter()) {
            match item {
                Work::Generate(generation) => pending.push(generation),
                Work::Swap { swap, reply } => {
                    generate_batch(&model, &version, std::mem::take(&mut pending), options, sequencer, stats);
                    let old = std::mem::replace(&mut version, swap.version);
                    model = swap.model;
                    on_swap(&version, &swap.path);
                    let _ = reply.send(old);
                }
            }
        }
        generate_batch(&model, &version, pending, options, sequencer, stats);
    }
}

/// Answers `requests` (those a weight update did not abort and whose client is still there)
/// from one decoding batch of all their groups, each as soon as its last group is done.
fn generate_batch<B: CustomGrad>(
    model: &CausalLm<B>,
    version: &str,
    requests: Vec<Generation>,
    options: BatchOptions,
    sequencer: &Sequencer,
    stats: &BatchStats,
) {
    // The requester may have gone (client closed the connection): sends ignore that.
    let live: Vec<Generation> = requests
        .into_iter()
        .filter_map(|request| {
            let stopped = stop_reason(&request, sequencer);
            if let Some(why) = stopped {
                if why == CANCELLED {
                    stats.cancelled.fetch_add(1, Ordering::SeqCst);
                }
                let _ = request.updates.send(Update::Done(Err(why.to_string())));
            }
            stopped.is_none().then_some(request)
        })
        .collect();
    if live.is_empty() {
        return;
    }
    let context = BatchContext { model, version, sequencer, stats };
    let mut batch = Batch::submit(&context, &live, options);
    stats.record(live.len(), batch.submitted);
    batch.run();
}

/// Why a request stops before it is done: a weight update aborted it, or its client went.
fn stop_reason(request: &Generation, sequencer: &Sequencer) -> Option<&'static str> {
    if sequencer.aborted(request.seq) {
        Some(ABORTED)
    } else if request.cancelled.load(Ordering::SeqCst) {
        Some(CANCELLED)
    } else {
        None
    }
}

/// What a batch's requests share: the weights and their version, and the server's books.
struct BatchContext<'a, B: CustomGrad> {
    model: &'a CausalLm<B>,
    version: &'a str,
    sequencer: &'a Sequencer,
    stats: &'a BatchStats,
}

/// Several requests' groups decoding in one [`BatchDecoder`]. Before every step, the groups
/// of a request that failed, that a weight update aborted or whose client went away leave the
/// batch (that request is answered its error, [`ABORTED`] or [`CANCELLED`]), and the samples
/// requests named as stopped end; after it, requests that report tokens hear of their new
/// ones, and a request whose last group is done is answered. A failed decoding step fails
/// every request still decoding.
struct Batch<'a, 'm, B: CustomGrad> {
    context: &'a BatchContext<'m, B>,
    requests: &'a [Generation],
    decoder: BatchDecoder<'m, B>,
    /// Per decoder id (the groups of all requests in order): its request and job.
    owners: Vec<(usize, usize)>,
    /// The decoder id of each request's first job.
    first_ids: Vec<usize>,
    /// Per request, each job's completions.
    decoded: Vec<Vec<Vec<Completion>>>,
    errors: Vec<Option<String>>,
    /// Groups of each request still decoding.
    unfinished: Vec<usize>,
    /// Requests whose groups were taken out of the batch (failed, aborted, cancelled).
    stopped: Vec<bool>,
    answered: Vec<bool>,
    reports: TokenReports,
    /// Groups the batch took.
    submitted: usize,
}

impl<'a, 'm, B: CustomGrad> Batch<'a, 'm, B> {
    /// Queues every request's groups (a group that cannot be decoded fails its request).
    fn submit(context: &'a BatchContext<'m, B>, requests: &'a [Generation], options: BatchOptions) -> Self {
        let mut decoder = BatchDecoder::new(context.model, options);
        let mut errors: Vec<Option<String>> = vec![None; requests.len()];
        let mut owners = Vec::new();
        let mut first_ids = Vec::with_capacity(requests.len());
        let mut unfinished = vec![0usize; requests.len()];
        for (r, request) in requests.iter().enumerate() {
            first_ids.push(owners.len());
            for (j, job) in request.jobs.iter().enumerate() {
                let id = owners.len();
                owners.push((r, j));
                match decoder.submit(id, GroupRequest::group(job.prompt.clone(), job.n, job.sampling.clone())) {
                    Ok(()) => unfinished[r] += 1,
                    Err(e) => {
                        errors[r].get_or_insert_with(|| e.to_string());
                    }
                }
            }
        }
        let submitted = unfinished.iter().sum();
        let decoded = requests.iter().map(|r| vec![Vec::new(); r.jobs.len()]).collect();
        let reports = TokenReports::new(owners.len());
        let (stopped, answered) = (vec![false; requests.len()], vec![false; requests.len()]);
        Self { context, requests, decoder, owners, first_ids, decoded, errors, unfinished, stopped, answered, reports, submitted }
    }

    fn run(&mut self) {
        self.answer_finished();
        while !self.decoder.is_idle() {
            self.take_out_stopped();
            match self.decoder.step() {
                Ok(done) => {
                    self.report_tokens(&done);
                    for (id, completions) in done {
                        let (r, j) = self.owners[id];
                        self.decoded[r][j] = completions;
                        self.unfinished[r] -= 1;
                    }
                }
                Err(e) => {
                    for (unfinished, error) in self.unfinished.iter_mut().zip(&mut self.errors).filter(|(u, _)| **u > 0) {
                        error.get_or_insert_with(|| e.to_string());
                        *unfinished = 0;
                    }
                    self.answer_finished();
                    return;
                }
            }
            self.answer_finished();
        }
    }

    /// Takes the groups of failed, aborted and cancelled requests out of the batch, and ends
    /// the samples requests named as stopped.
    fn take_out_stopped(&mut self) {
        for (r, request) in self.requests.iter().enumerate() {
            if self.unfinished[r] == 0 || self.stopped[r] {
                continue;
            }
            if self.errors[r].is_none() {
                self.errors[r] = stop_reason(request, self.context.sequencer).map(str::to_string);
            }
            if self.errors[r].is_some() {
                self.stopped[r] = true;
                for id in self.first_ids[r]..self.first_ids[r] + request.jobs.len() {
                    self.decoder.cancel(id);
                }
                continue;
            }
            for (job, sample) in request.end_samples.try_iter().filter(|&(job, _)| job < request.jobs.len()) {
                if self.decoder.end_sample(self.first_ids[r] + job, sample) {
                    self.context.stats.ended_at_stop.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    /// Sends the requests that report tokens the ones drawn by the last step (`done`: the
    /// groups it finished).
    fn report_tokens(&mut self, done: &[(usize, Vec<Completion>)]) {
        let reporting: Vec<bool> =
            self.requests.iter().zip(&self.stopped).map(|(request, &stopped)| request.report_tokens && !stopped).collect();
        let mut new_tokens: Vec<Vec<NewTokens>> = vec![Vec::new(); self.requests.len()];
        let finished = done.iter().map(|(id, completions)| (*id, completions.as_slice()));
        for (id, completions) in finished.chain(self.decoder.decoding()) {
            let (r, j) = self.owners[id];
            if reporting[r] {
                self.reports.collect(id, j, completions, &mut new_tokens[r]);
            }
        }
        for (request, new) in self.requests.iter().zip(new_tokens) {
            if !new.is_empty() && request.updates.send(Update::Tokens(new)).is_err() {
                // Nobody listens any more: the client went away.
                request.cancelled.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Answers every request with no group left decoding that was not answered yet.
    fn answer_finished(&mut self) {
        for r in 0..self.requests.len() {
            if self.unfinished[r] > 0 || self.answered[r] {
                continue;
            }
            self.answered[r] = true;
            let request = &self.requests[r];
            let result = match self.errors[r].take() {
                Some(error) => {
                    if error == CANCELLED {
                        self.context.stats.cancelled.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(error)
                }
                None => {
                    let completions = std::mem::take(&mut self.decoded[r]);
                    let version = self.context.version.to_string();
                    let outputs = request.jobs.iter().zip(completions).map(|(job, c)| job_output(self.context.model, job, c));
                    outputs.collect::<Result<Vec<_>, _>>().map(|outputs| Generated { outputs, weights_version: version })
                }
            };
            let _ = request.updates.send(Update::Done(result));
        }
    }
}

/// How many tokens of each sample of each group were reported, so that each report carries
/// only the new ones.
struct TokenReports {
    /// Per decoder id, per sample.
    reported: Vec<Vec<usize>>,
}

impl TokenReports {
    fn new(groups: usize) -> Self {
        Self { reported: vec![Vec::new(); groups] }
    }

    /// Adds the tokens of group `id` (job `job` of its request) not reported yet to `out`.
    fn collect(&mut self, id: usize, job: usize, completions: &[Completion], out: &mut Vec<NewTokens>) {
        let reported = &mut self.reported[id];
        reported.resize(completions.len(), 0);
        for (sample, (completion, from)) in completions.iter().zip(reported.iter_mut()).enumerate() {
            if completion.tokens.len() > *from {
                out.push(NewTokens {
                    job,
                    sample,
                    from: *from,
                    tokens: completion.tokens[*from..].to_vec(),
                    logprobs: completion.logprobs[*from..].to_vec(),
                });
                *from = completion.tokens.len();
            }
        }
    }
}

/// One group's output: its completions and the log-probs asked for beside them.
fn job_output<B: CustomGrad>(model: &CausalLm<B>, job: &GenJob, completions: Vec<Completion>) -> Result<GenOutput, String> {
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
    use longrl_backends::Cpu;
    use longrl_stdlib::model::checkpoint::RandomInit;
    use longrl_stdlib::model::generate::generate_group;
    use longrl_stdlib::model::{Architecture, ModelConfig};

    fn tiny_model(seed: u64) -> CausalLm<Cpu> {
        let config = ModelConfig::tiny(Architecture::Qwen2, 64, 32, 2, 4, 2, 64);
        CausalLm::<Cpu>::build(&config, &mut RandomInit::new(seed, 0.3), &Default::default()).expect("builds")
    }

    fn job(prompt: Vec<u32>, n: usize, seed: u64) -> GenJob {
        let sampling =
            SamplingConfig { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 6 + seed as usize, stop_tokens: vec![], seed };
        GenJob { prompt, n, sampling, top_logprobs: 0, prompt_logprobs: None }
    }

    /// Queues a generation request; returns where its updates arrive.
    fn queue(work: &Sender<Work<Cpu>>, seq: u64, jobs: Vec<GenJob>) -> Receiver<Update> {
        queue_streamed(work, seq, jobs, false, Arc::default())
    }

    fn queue_streamed(
        work: &Sender<Work<Cpu>>,
        seq: u64,
        jobs: Vec<GenJob>,
        report_tokens: bool,
        cancelled: Arc<AtomicBool>,
    ) -> Receiver<Update> {
        let (updates, answer) = crossbeam_channel::unbounded();
        let end_samples = crossbeam_channel::never();
        work.send(Work::Generate(Generation { seq, jobs, updates, report_tokens, cancelled, end_samples })).expect("queued");
        answer
    }

    /// Queues a request that reports its tokens through a channel of one, so the worker is at
    /// most two steps ahead of a test that reads them; returns where its updates arrive and
    /// where it names the samples to end.
    fn queue_paced(
        work: &Sender<Work<Cpu>>,
        seq: u64,
        jobs: Vec<GenJob>,
        cancelled: Arc<AtomicBool>,
    ) -> (Receiver<Update>, Sender<(usize, usize)>) {
        let (updates, paced) = crossbeam_channel::bounded(1);
        let (end_sample, end_samples) = crossbeam_channel::unbounded();
        work.send(Work::Generate(Generation { seq, jobs, updates, report_tokens: true, cancelled, end_samples })).expect("queued");
        (paced, end_sample)
    }

    /// A request's outcome, past any token reports.
    fn outcome(updates: &Receiver<Update>) -> Result<Generated, String> {
        loop {
            match updates.recv().expect("answered") {
                Update::Done(result) => return result,
                Update::Tokens(_) => {}
            }
        }
    }

    #[test]
    fn a_weight_update_aborts_queued_and_decoding_requests() {
        let config = ModelConfig::tiny(Architecture::Qwen2, 64, 32, 2, 4, 2, 4096);
        let model = CausalLm::<Cpu>::build(&config, &mut RandomInit::new(3, 0.3), &Default::default()).expect("builds");
        let sequencer = Sequencer::default();
        let (work, received) = crossbeam_channel::unbounded::<Work<Cpu>>();
        // Aborted while queued.
        let early = queue(&work, sequencer.next(), vec![job(vec![1, 2], 2, 1)]);
        sequencer.abort_queued();
        // Aborted while it decodes 4,000 tokens (about 4.7 s here when left alone): the
        // worker stops between two steps.
        let mut long = job(vec![3, 4], 2, 2);
        long.sampling.max_new_tokens = 4000;
        let decoding = queue(&work, sequencer.next(), vec![long]);
        drop(work);
        let stats = BatchStats::default();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                sequencer.abort_queued();
            });
            run(model, "v1".into(), received, BatchOptions::default(), &sequencer, &stats, |_, _| {});
        });
        assert_eq!(outcome(&early).expect_err("aborted"), ABORTED);
        assert_eq!(outcome(&decoding).expect_err("aborted"), ABORTED);
    }

    #[test]
    fn queued_requests_decode_in_one_batch_with_the_tokens_of_groups_alone() {
        let model = tiny_model(7);
        let (work, received) = crossbeam_channel::unbounded::<Work<Cpu>>();
        let first = queue(&work, 1, vec![job(vec![1, 2, 3], 3, 1), job(vec![9, 8], 2, 2)]);
        let bad = queue(&work, 2, vec![job(vec![5, 6], 2, 3), job(vec![], 2, 4)]);
        let third = queue(&work, 3, vec![job(vec![4, 4, 4, 4], 4, 5)]);
        // New weights between the third and the fourth request split the batch there.
        let (swap_reply, swapped) = crossbeam_channel::bounded(1);
        let swap = Swap { model: tiny_model(8), version: "v2".into(), path: PathBuf::from("elsewhere") };
        work.send(Work::Swap { swap: Box::new(swap), reply: swap_reply }).expect("queued");
        let fourth = queue(&work, 4, vec![job(vec![1, 2, 3], 3, 1)]);
        drop(work);
        let stats = BatchStats::default();
        run(model.clone(), "v1".into(), received, BatchOptions::default(), &Sequencer::default(), &stats, |_, _| {});

        // One batch before the swap (three requests, five groups submitted, one refused) and
        // one after it.
        assert_eq!(stats.batches.load(Ordering::SeqCst), 2);
        assert_eq!(stats.requests.load(Ordering::SeqCst), 4);
        assert_eq!(stats.largest.load(Ordering::SeqCst), 4);
        assert_eq!(swapped.recv().expect("swap answered"), "v1");
        let err = outcome(&bad).expect_err("an empty prompt");
        assert!(err.contains("empty prompt"), "{err}");
        let alone = |model: &CausalLm<Cpu>, job: &GenJob| generate_group(model, &job.prompt, job.n, &job.sampling).expect("group");
        for (answer, jobs, version, weights) in [
            (first, vec![job(vec![1, 2, 3], 3, 1), job(vec![9, 8], 2, 2)], "v1", tiny_model(7)),
            (third, vec![job(vec![4, 4, 4, 4], 4, 5)], "v1", tiny_model(7)),
            (fourth, vec![job(vec![1, 2, 3], 3, 1)], "v2", tiny_model(8)),
        ] {
            let generated = outcome(&answer).expect("generated");
            assert_eq!(generated.weights_version, version);
            assert_eq!(generated.outputs.len(), jobs.len());
            for (output, job) in generated.outputs.iter().zip(&jobs) {
                let reference = alone(&weights, job);
                assert_eq!(output.completions.len(), job.n);
                let tokens: Vec<&Vec<u32>> = output.completions.iter().map(|c| &c.tokens).collect();
                assert_eq!(tokens, reference.iter().map(|c| &c.tokens).collect::<Vec<_>>());
                for (batched, single) in output.completions.iter().zip(&reference) {
                    for (a, b) in batched.logprobs.iter().zip(&single.logprobs) {
                        assert!((a - b).abs() < 1e-4, "log-prob {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn streamed_tokens_add_up_to_the_completions_and_cancelled_requests_and_ended_samples_leave_the_batch() {
        let model = tiny_model(7);
        let (work, received) = crossbeam_channel::unbounded::<Work<Cpu>>();
        let jobs = vec![job(vec![1, 2, 3], 3, 1), job(vec![9, 8], 2, 2)];
        let streamed = queue_streamed(&work, 1, jobs.clone(), true, Arc::default());
        // A request whose client goes away after its first report, and one decoding beside it.
        // Its reports go through a channel of one, so the worker is at most two steps ahead of
        // this thread: the cancellation lands long before the 60 tokens are drawn.
        let mut long = job(vec![5, 6, 7], 2, 3);
        long.sampling.max_new_tokens = 60;
        let cancelled = Arc::new(AtomicBool::new(false));
        let (given_up, end_sample) = queue_paced(&work, 2, vec![long], Arc::clone(&cancelled));
        let beside = queue(&work, 3, vec![job(vec![4, 4], 2, 4)]);
        drop(work);
        let stats = BatchStats::default();
        std::thread::scope(|scope| {
            scope.spawn(|| run(model.clone(), "v1".into(), received, BatchOptions::default(), &Sequencer::default(), &stats, |_, _| {}));
            match given_up.recv().expect("a first report") {
                Update::Tokens(new) => assert!(new.iter().all(|n| n.from == 0 && n.tokens.len() == 1), "{new:?}"),
                Update::Done(result) => panic!("done before any report: {result:?}"),
            }
            cancelled.store(true, Ordering::SeqCst);
            // Ending a sample of a cancelled request changes nothing.
            end_sample.send((0, 0)).expect("sent");
            assert_eq!(outcome(&given_up).expect_err("cancelled"), CANCELLED);
            // Every report adds to each sample's tokens where the last one ended.
            let mut so_far: Vec<Vec<Vec<u32>>> = jobs.iter().map(|j| vec![Vec::new(); j.n]).collect();
            let mut reports = 0;
            let generated = loop {
                match streamed.recv().expect("updates") {
                    Update::Tokens(new) => {
                        reports += 1;
                        for n in new {
                            let tokens = &mut so_far[n.job][n.sample];
                            assert_eq!(n.from, tokens.len(), "a report starts where the last ended");
                            assert_eq!(n.tokens.len(), n.logprobs.len());
                            tokens.extend(n.tokens);
                        }
                    }
                    Update::Done(result) => break result.expect("generated"),
                }
            };
            assert!(reports >= 6, "a report per step: {reports}");
            for (output, tokens) in generated.outputs.iter().zip(&so_far) {
                assert_eq!(output.completions.iter().map(|c| &c.tokens).collect::<Vec<_>>(), tokens.iter().collect::<Vec<_>>());
            }
            let generated = outcome(&beside).expect("generated");
            let alone = generate_group(&tiny_model(7), &[4, 4], 2, &job(vec![4, 4], 2, 4).sampling).expect("group");
            let tokens: Vec<&Vec<u32>> = generated.outputs[0].completions.iter().map(|c| &c.tokens).collect();
            assert_eq!(tokens, alone.iter().map(|c| &c.tokens).collect::<Vec<_>>());
        });
    }

    #[test]
    fn a_sample_named_as_stopped_ends_at_the_next_step() {
        let model = tiny_model(7);
        let (work, received) = crossbeam_channel::unbounded::<Work<Cpu>>();
        let mut long = job(vec![5, 6, 7], 2, 3);
        long.sampling.max_new_tokens = 60;
        let (stopping, end_sample) = queue_paced(&work, 1, vec![long.clone()], Arc::default());
        drop(work);
        let stats = BatchStats::default();
        std::thread::scope(|scope| {
            scope.spawn(|| run(model.clone(), "v1".into(), received, BatchOptions::default(), &Sequencer::default(), &stats, |_, _| {}));
            assert!(matches!(stopping.recv().expect("a first report"), Update::Tokens(_)));
            end_sample.send((0, 1)).expect("sent");
            let ended = outcome(&stopping).expect("generated");
            let alone = generate_group(&model, &long.prompt, 2, &long.sampling).expect("group");
            let completions = &ended.outputs[0].completions;
            assert_eq!(completions[0].tokens, alone[0].tokens, "the other sample decodes on");
            assert_eq!(completions[0].tokens.len(), 60);
            assert!(completions[1].tokens.len() < 5 && alone[1].tokens.starts_with(&completions[1].tokens), "{:?}", completions[1]);
        });
    }

    #[test]
    fn a_request_is_answered_when_its_groups_are_done_not_when_the_batch_is() {
        let model = tiny_model(7);
        let (work, received) = crossbeam_channel::unbounded::<Work<Cpu>>();
        let mut long = job(vec![5, 6, 7], 2, 3);
        long.sampling.max_new_tokens = 60;
        let (long_updates, _) = queue_paced(&work, 1, vec![long], Arc::default());
        let short = queue(&work, 2, vec![job(vec![4, 4], 2, 4)]);
        drop(work);
        let stats = BatchStats::default();
        std::thread::scope(|scope| {
            scope.spawn(|| run(model.clone(), "v1".into(), received, BatchOptions::default(), &Sequencer::default(), &stats, |_, _| {}));
            let mut long_reports = 0;
            let short_answer = loop {
                if let Ok(update) = short.try_recv() {
                    break update;
                }
                match long_updates.recv().expect("the long request is still decoding") {
                    Update::Tokens(_) => long_reports += 1,
                    Update::Done(result) => panic!("the long request was answered first: {result:?}"),
                }
            };
            assert!(matches!(short_answer, Update::Done(Ok(_))), "{short_answer:?}");
            assert!(long_reports < 20, "answered within a few steps of its last token: {long_reports} reports");
            assert_eq!(outcome(&long_updates).expect("generated").outputs[0].completions[0].tokens.len(), 60);
        });
    }

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
