//! `sft` stage (warm-up SFT): next-token loss on the response only (the prompt is masked),
//! token-mean over each optimizer step, AdamW with a schedule and global-norm clipping,
//! batches built by a token budget, gradient accumulation, seeded shuffling, epochs. It
//! publishes a Hugging Face checkpoint on its model edge.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use longrl_backends::BackendTask;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::checkpoint::{Done, StageCheckpoints, republish, write_training_state};
use crate::error::StageError;
use crate::model::chat::ModelTokenizer;
use crate::model::checkpoint::{SaveDtype, copy_tokenizer_files};
use crate::model::score::score_batch;
use crate::model::{CausalLm, load_model, save_model};
use crate::progress::Progress;
use crate::prompt::{encode_prompt, reasoning_trace};
use crate::record::Record;
use crate::stage::{ModelRef, PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};
use crate::train::{OPTIMIZER_FILE, OptimConfig, Trainer};

/// Options of the `sft` stage.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// Passes over the data.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Optimizer and learning-rate schedule (`lr` is required).
    #[serde(flatten)]
    pub optim: OptimConfig,
    /// Padded tokens per micro-batch (rows x longest row).
    #[serde(default = "default_batch_tokens")]
    pub batch_tokens: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "default_accum")]
    pub grad_accum: usize,
    /// Prompt budget in tokens; longer prompts are cut in the middle.
    #[serde(default = "default_max_input")]
    pub max_input: usize,
    /// Responses longer than this are cut (their end is lost).
    #[serde(default = "default_max_response")]
    pub max_response: usize,
    /// Stop after this many optimizer steps.
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Seed of the shuffling (mixed with the run seed).
    #[serde(default)]
    pub seed: u64,
    /// Precision of the saved weights: f32, bf16 or f16.
    #[serde(default)]
    pub save_dtype: SaveDtype,
    /// Write a metrics line every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Save a checkpoint (weights, optimizer, position) every this many steps for
    /// `longrl run --resume` (0 = only the stage's end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// Checkpoints kept (the newest).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
}

fn default_checkpoint_every() -> usize {
    50
}
fn default_keep() -> usize {
    2
}

fn default_epochs() -> usize {
    1
}
fn default_batch_tokens() -> usize {
    8192
}
fn default_accum() -> usize {
    1
}
fn default_max_input() -> usize {
    8192
}
fn default_max_response() -> usize {
    2048
}
fn default_log_every() -> usize {
    10
}

impl StageConfig for SftConfig {
    const NAME: &'static str = "sft";
    const SUMMARY: &'static str = "Warm-up SFT on reasoning traces: response-only loss, AdamW, token-budget batches.";
    const INPUTS: &'static [PortSpec] = &[
        PortSpec::required("policy", PortKind::Model, "the model to train"),
        PortSpec::required("data", PortKind::Records, "tasks with a trace (metadata.trace or supporting sentences)"),
    ];
    const OUTPUTS: &'static [PortSpec] = &[PortSpec::optional("model", PortKind::Model, "the trained checkpoint")];

    fn validate(&self, _ctx: &StageContext) -> Vec<String> {
        let mut problems = self.optim.problems();
        if self.epochs == 0 {
            problems.push("epochs must be at least 1".into());
        }
        if self.grad_accum == 0 || self.batch_tokens == 0 {
            problems.push("grad_accum and batch_tokens must be at least 1".into());
        }
        problems
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let out_dir = ctx
            .run_dir
            .as_ref()
            .map(|d| d.join(format!("sft-{}", ctx.node)))
            .ok_or_else(|| StageError::Invalid("sft needs a run directory".into()))?;
        Ok(Box::new(Sft { config: self, ctx: ctx.clone(), out_dir }))
    }
}

struct Sft {
    config: SftConfig,
    ctx: StageContext,
    out_dir: PathBuf,
}

/// One training example: prompt ids and response ids.
pub type Example = (Vec<u32>, Vec<u32>);

/// Turns records into examples: templated prompt (cut to `max_input`), trace + end token.
pub fn make_examples(
    tokenizer: &ModelTokenizer,
    records: &[Record],
    max_input: usize,
    max_response: usize,
) -> Result<(Vec<Example>, usize), StageError> {
    let end = tokenizer.stop_ids.first().copied();
    let mut examples = Vec::with_capacity(records.len());
    let mut skipped = 0;
    for record in records {
        let Some(trace) = reasoning_trace(record) else {
            skipped += 1;
            continue;
        };
        let (prompt, _) = encode_prompt(tokenizer, record, max_input)?;
        let mut response = tokenizer.tokenizer.encode(&trace)?;
        response.truncate(max_response.saturating_sub(1).max(1));
        response.extend(end);
        examples.push((prompt, response));
    }
    Ok((examples, skipped))
}

/// Micro-batches by a padded-token budget. Examples are shuffled, then sorted by length
/// within windows of 64 so a batch holds rows of similar length.
pub fn batches(examples: &[Example], budget: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(rng);
    let len = |i: usize| examples[i].0.len() + examples[i].1.len();
    for window in order.chunks_mut(64) {
        window.sort_by_key(|&i| len(i));
    }
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut longest = 0;
    for i in order {
        let l = len(i);
        if !current.is_empty() && (current.len() + 1) * longest.max(l) > budget {
            out.push(std::mem::take(&mut current));
            longest = 0;
        }
        longest = longest.max(l);
        current.push(i);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out.shuffle(rng);
    out
}

/// Mean negative log-likelihood of the response tokens of a batch, scaled by `denominator`
/// (the response tokens of the whole optimizer step) so accumulated steps are token-means.
///
/// # Shapes
/// - returns a `[1]` tensor
pub fn response_nll<B: burn::tensor::backend::Backend>(
    model: &CausalLm<B>,
    batch: &[Example],
    denominator: f64,
) -> Result<Tensor<B, 1>, StageError> {
    let scores = score_batch(model, batch)?;
    Ok(scores.logprobs.sum().neg().div_scalar(denominator))
}

impl Stage for Sft {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let policy = io.recv_model("policy")?;
        let mut records = Vec::new();
        while let Some(record) = io.recv_record("data")? {
            records.push(record);
        }
        let device = self.ctx.device;
        let task = SftTask { stage: &self, io, policy, records };
        longrl_backends::dispatch(device, task).map_err(|e| StageError::Failed(e.to_string()))?
    }
}

struct SftTask<'a> {
    stage: &'a Sft,
    io: &'a mut StageIo,
    policy: ModelRef,
    records: Vec<Record>,
}

impl BackendTask for SftTask<'_> {
    type Output = Result<(), StageError>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let config = &self.stage.config;
        let io = self.io;
        let tokenizer = ModelTokenizer::load(&self.policy.dir)?;
        let checkpoints = self.stage.ctx.run_dir.as_ref().map(|run| StageCheckpoints::new(run, io.label(), config.keep_checkpoints));
        if let Some(done) = checkpoints.as_ref().map(StageCheckpoints::done).transpose()?.flatten() {
            return republish(io, done);
        }
        let (model_config, mut model) = load_model::<B>(&self.policy.dir, &device)?;
        let (examples, skipped) = make_examples(&tokenizer, &self.records, config.max_input, config.max_response)?;
        if examples.is_empty() {
            return Err(StageError::Failed(format!("{}: no record has a reasoning trace to train on", io.label())));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed ^ self.stage.ctx.seed.rotate_left(17));
        let epochs: Vec<Vec<Vec<usize>>> = (0..config.epochs).map(|_| batches(&examples, config.batch_tokens, &mut rng)).collect();
        let micro: usize = epochs.iter().map(Vec::len).sum();
        let mut total_steps = micro.div_ceil(config.grad_accum);
        if let Some(max) = config.max_steps {
            total_steps = total_steps.min(max);
        }
        tracing::info!(examples = examples.len(), skipped, steps = total_steps, "sft starts");
        let mut trainer = Trainer::<B, CausalLm<B>>::new(config.optim.clone());
        let (mut tokens_seen, mut last_loss, mut metrics_lines, mut first_step) = (0usize, f64::NAN, 0usize, 0usize);
        if let Some((dir, state)) = checkpoints.as_ref().map(StageCheckpoints::latest).transpose()?.flatten() {
            // Resume: weights, moments and position of the newest checkpoint.
            model = load_model::<B>(&dir, &device)?.1;
            trainer = trainer.load_state(&dir.join(OPTIMIZER_FILE), &device)?;
            first_step = state["step"].as_u64().unwrap_or(0) as usize;
            tokens_seen = state["tokens_seen"].as_u64().unwrap_or(0) as usize;
            last_loss = state["last_loss"].as_f64().unwrap_or(f64::NAN);
            metrics_lines = state["metrics_lines"].as_u64().unwrap_or(0) as usize;
            tracing::info!(stage = %io.label(), step = first_step, "resuming from {}", dir.display());
        }
        let progress = Progress::new(io.label(), total_steps as u64, "steps");
        progress.skip(first_step as u64);
        let all: Vec<&Vec<usize>> = epochs.iter().flatten().collect();
        let started = Instant::now();
        for (step, group) in all.chunks(config.grad_accum).take(total_steps).enumerate().skip(first_step) {
            io.cancel_token().check()?;
            let step_started = Instant::now();
            let denominator: usize = group.iter().flat_map(|b| b.iter()).map(|&i| examples[i].1.len()).sum();
            let mut loss_sum = 0.0;
            let mut step_tokens = 0;
            for batch in group {
                let pairs: Vec<Example> = batch.iter().map(|&i| examples[i].clone()).collect();
                step_tokens += pairs.iter().map(|(p, r)| p.len() + r.len()).sum::<usize>();
                let loss = response_nll(&model, &pairs, denominator as f64)?;
                loss_sum += loss.clone().into_scalar().elem::<f64>();
                trainer.backward(&model, loss);
            }
            let (next, info) = trainer.step(model, step, total_steps);
            model = next;
            tokens_seen += step_tokens;
            last_loss = loss_sum;
            let tokens_per_s = step_tokens as f64 / step_started.elapsed().as_secs_f64();
            progress.advance(&format!("loss {loss_sum:.4} lr {:.2e}", info.lr));
            if step % config.log_every.max(1) == 0 || step + 1 == total_steps {
                let mut fields = serde_json::Map::new();
                fields.insert("loss".into(), loss_sum.into());
                fields.insert("lr".into(), info.lr.into());
                fields.insert("grad_norm".into(), info.grad_norm.into());
                fields.insert("tokens_per_s".into(), tokens_per_s.into());
                fields.insert("tokens".into(), tokens_seen.into());
                io.metrics().log(io.label(), step as u64, fields)?;
                metrics_lines += 1;
                tracing::info!(step, loss = loss_sum, lr = info.lr, tokens_per_s, "sft step");
            }
            let done_steps = step + 1;
            if let Some(checkpoints) = checkpoints
                .as_ref()
                .filter(|_| config.checkpoint_every > 0 && done_steps % config.checkpoint_every == 0 && done_steps < total_steps)
            {
                let state = serde_json::json!({ "step": done_steps, "tokens_seen": tokens_seen, "last_loss": last_loss, "metrics_lines": metrics_lines });
                checkpoints
                    .save(done_steps, &state, |dir| write_training_state(dir, &model.valid(), &model_config, &self.policy.dir, &trainer))?;
            }
        }
        progress.finish();
        let wall = started.elapsed().as_secs_f64();
        let dir = &self.stage.out_dir;
        save_model(&model.valid(), &model_config, dir, config.save_dtype)?;
        copy_tokenizer_files(&self.policy.dir, dir)?;
        let summary = io.summary_mut();
        summary.insert("examples".into(), examples.len().into());
        summary.insert("skipped_without_trace".into(), skipped.into());
        summary.insert("steps".into(), total_steps.into());
        summary.insert("final_loss".into(), last_loss.into());
        summary.insert("tokens_per_s".into(), (tokens_seen as f64 / wall).into());
        summary.insert("checkpoint".into(), dir.display().to_string().into());
        let summary = summary.clone();
        if let Some(checkpoints) = &checkpoints {
            checkpoints.mark_done(&Done { model: Some(dir.clone()), summary, metrics_lines })?;
        }
        io.send_model("model", ModelRef { dir: dir.clone() })
    }
}
