//! `sft` stage (warm-up SFT): next-token loss on the response only (the prompt is masked),
//! token-mean over each optimizer step, AdamW with a schedule and global-norm clipping,
//! batches built by a token budget, gradient accumulation, seeded shuffling, epochs. It
//! publishes a Hugging Face checkpoint on its model edge.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::{ElementConversion, Tensor};
use longrl_backends::TrainBackend;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{load_training_weights, write_master_weights, write_training_state};
use crate::driver::{Cadence, Driver, ModelStage, StageInputs, StageRun, StepOutcome};
use crate::error::StageError;
use crate::model::chat::ModelTokenizer;
use crate::model::checkpoint::{SaveDtype, copy_tokenizer_files};
use crate::model::config::ModelConfig;
use crate::model::precision::Precision;
use crate::model::score::score_batch;
use crate::model::{CausalLm, save_model};
use crate::options::{at_most, limits};
use crate::prompt::{encode_prompt, reasoning_trace};
use crate::record::Record;
use crate::stage::{PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};
use crate::train::{OPTIMIZER_FILE, OptimConfig, RecomputeChoice, Trainer};

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
    /// Activation recomputation: `layer` keeps only each decoder layer's input and
    /// recomputes the layer in the backward (activation memory of one layer, about one
    /// more forward per step), `none` keeps every activation, `auto` picks `layer` when an
    /// example can exceed 2,048 tokens.
    #[serde(default)]
    pub recompute: RecomputeChoice,
    /// Micro-batches per optimizer step.
    #[serde(default = "default_accum")]
    pub grad_accum: usize,
    /// Data-parallel replicas: the run's device and the next `devices - 1` of its backend
    /// (on the CPU, the same processor) each take every `devices`-th micro-batch of a step
    /// on a copy of the weights; their gradients are summed (by burn-collective's all-reduce,
    /// or in replica order when three or more share a device) before the one optimizer
    /// update (the same update as one device, up to the order of float additions). Useful
    /// with `grad_accum` of at least `devices`.
    #[serde(default = "default_devices")]
    pub devices: usize,
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
    /// Precision of the saved weights (the published model and each checkpoint's): f32,
    /// bf16 or f16. Default: f32, or bf16 under `precision: "bf16-mixed"`. Below f32, a
    /// checkpoint also holds the f32 master weights (`master/`), so resuming is exact.
    #[serde(default)]
    pub save_dtype: Option<SaveDtype>,
    /// Numeric precision of training: `f32`, or `bf16-mixed` (forward and backward in bf16,
    /// f32 master weights, optimizer moments, log-probs, softmax, loss and reductions).
    /// CUDA and the CPU backend compute in real bf16 (on the CPU slower than f32: it is for
    /// checking the numerics); wgpu has no bf16 and trains in f32, saying so in the log.
    #[serde(default)]
    pub precision: Precision,
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
fn default_devices() -> usize {
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

impl SftConfig {
    /// The dtype of saved weights: `save_dtype`, else the precision's default.
    pub fn save_dtype(&self) -> SaveDtype {
        self.save_dtype.unwrap_or(self.precision.default_save_dtype())
    }
}

impl StageConfig for SftConfig {
    const NAME: &'static str = "sft";
    const SUMMARY: &'static str = "Warm-up SFT on reasoning traces: response-only loss, AdamW, token-budget batches.";
    const INPUTS: &'static [PortSpec] = &[
        PortSpec::required("policy", PortKind::Model, "the model to train"),
        PortSpec::required("data", PortKind::Records, "tasks with a trace (a `trace`, or supporting sentences in metadata)"),
    ];
    const OUTPUTS: &'static [PortSpec] = &[PortSpec::optional("model", PortKind::Model, "the trained checkpoint")];

    fn validate(&self, _ctx: &StageContext) -> Vec<String> {
        let mut problems = self.optim.problems();
        if self.epochs == 0 {
            problems.push("epochs must be at least 1".into());
        }
        if self.grad_accum == 0 || self.batch_tokens == 0 || self.max_input == 0 || self.max_response == 0 {
            problems.push("grad_accum, batch_tokens, max_input and max_response must be at least 1".into());
        }
        if self.devices == 0 || self.devices > crate::parallel::MAX_DEVICES {
            problems.push(format!("devices must be between 1 and {}", crate::parallel::MAX_DEVICES));
        }
        let sizes = [
            ("epochs", self.epochs, limits::PASSES),
            ("grad_accum", self.grad_accum, limits::PASSES),
            ("batch_tokens", self.batch_tokens, limits::TOKENS),
            ("max_input", self.max_input, limits::TOKENS),
            ("max_response", self.max_response, limits::TOKENS),
        ];
        problems.extend(sizes.iter().filter_map(|(name, value, max)| at_most(name, *value, *max)));
        problems
    }

    const WRITES_FILES: bool = true;

    fn writes(&self, ctx: &StageContext) -> Vec<PathBuf> {
        vec![ctx.output_path(Path::new(&format!("sft-{}", ctx.node)))]
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let out_dir = ctx
            .run_dir
            .as_ref()
            .map(|d| d.join(format!("sft-{}", ctx.node)))
            .ok_or_else(|| StageError::Invalid("sft needs a run directory".into()))?;
        Ok(Driver::boxed(Sft { config: self, run_seed: ctx.seed }, ctx, Some(out_dir)))
    }
}

/// The `sft` stage, independent of the backend.
struct Sft {
    config: SftConfig,
    run_seed: u64,
}

/// One training example: prompt ids and response ids.
pub type Example = (Vec<u32>, Vec<u32>);

/// Turns records into examples: templated prompt (cut to `max_input`), trace + the token
/// that ends an assistant turn.
pub fn make_examples(
    tokenizer: &ModelTokenizer,
    records: &[Record],
    max_input: usize,
    max_response: usize,
) -> Result<(Vec<Example>, usize), StageError> {
    let end = tokenizer.end_of_turn;
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
pub fn response_nll<B: longrl_backends::CustomGrad>(
    model: &CausalLm<B>,
    batch: &[Example],
    denominator: f64,
) -> Result<Tensor<B, 1>, StageError> {
    let scores = score_batch(model, batch)?;
    Ok(scores.logprobs.sum().neg().div_scalar(denominator))
}

impl ModelStage for Sft {
    type State = SftState;
    type Run<B: TrainBackend> = SftRun<B>;

    fn cadence(&self) -> Cadence {
        Cadence { every: self.config.checkpoint_every, keep: self.config.keep_checkpoints }
    }

    fn prepare<B: TrainBackend>(&self, inputs: StageInputs, device: B::Device, io: &mut StageIo) -> Result<SftRun<B>, StageError> {
        let config = &self.config;
        let tokenizer = ModelTokenizer::load(&inputs.policy.dir)?;
        let (model_config, model) = load_training_weights::<B>(&inputs.policy.dir, &device)?;
        let model = model.with_recompute(config.recompute.resolve(config.max_input + config.max_response));
        let compute = config.precision.resolve::<B>(&device);
        let (examples, skipped) = make_examples(&tokenizer, &inputs.records, config.max_input, config.max_response)?;
        if examples.is_empty() {
            return Err(StageError::Failed(format!("{}: no record has a reasoning trace to train on", io.label())));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed ^ self.run_seed.rotate_left(17));
        let micro_batches: Vec<Vec<usize>> = (0..config.epochs).flat_map(|_| batches(&examples, config.batch_tokens, &mut rng)).collect();
        let mut steps: Vec<Vec<Vec<usize>>> = micro_batches.chunks(config.grad_accum).map(<[Vec<usize>]>::to_vec).collect();
        if let Some(max) = config.max_steps {
            steps.truncate(max);
        }
        tracing::info!(examples = examples.len(), skipped, steps = steps.len(), precision = %config.precision, compute = ?compute, "sft starts");
        Ok(SftRun {
            config: config.clone(),
            policy_dir: inputs.policy.dir,
            model_config,
            replica_devices: crate::parallel::replica_devices::<B>(&device, config.devices),
            parallel_updates: 0,
            device,
            trainer: Trainer::new(model, config.optim.clone()).with_compute(compute),
            examples,
            skipped,
            steps,
            state: SftState { tokens_seen: 0, last_loss: None },
            started: Instant::now(),
            tokens_before: 0,
        })
    }
}

/// Where SFT stands between steps (the step itself is the driver's).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftState {
    /// Prompt and response tokens trained on so far.
    tokens_seen: usize,
    /// The loss of the last step.
    last_loss: Option<f64>,
}

/// One line of SFT's metrics.
#[derive(Debug, Clone, Serialize)]
pub struct SftStepMetrics {
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens_per_s: f64,
    /// Tokens trained on so far.
    tokens: usize,
}

/// SFT on one backend.
pub struct SftRun<B: TrainBackend> {
    config: SftConfig,
    policy_dir: PathBuf,
    model_config: ModelConfig,
    device: B::Device,
    /// The data-parallel replicas' devices (the run's device first).
    replica_devices: Vec<B::Device>,
    /// Optimizer steps of this process whose gradients came from more than one replica.
    parallel_updates: usize,
    trainer: Trainer<B, CausalLm<B>>,
    examples: Vec<Example>,
    skipped: usize,
    /// Each optimizer step's micro-batches (indices into `examples`).
    steps: Vec<Vec<Vec<usize>>>,
    state: SftState,
    started: Instant,
    /// Tokens already trained on when this process started the stage (a resumed run's).
    tokens_before: usize,
}

impl<B: TrainBackend> SftRun<B> {
    /// One step's gradients over the N data-parallel replicas: replica r takes micro-batches
    /// r, r + N, ... on its own device; the summed gradients go to the stage's trainer.
    /// Returns the step's loss (its micro-batches' losses added in step order).
    fn step_backward_parallel(&mut self, step: usize, denominator: f64) -> Result<f64, StageError> {
        let micro_batches = &self.steps[step];
        let positions: Vec<usize> = (0..micro_batches.len()).collect();
        let shares = crate::parallel::shares(&positions, self.replica_devices.len());
        let devices = &self.replica_devices[..shares.len()];
        self.parallel_updates += usize::from(shares.len() > 1);
        let (optim, compute, examples) = (self.trainer.config().clone(), self.trainer.compute_dtype(), &self.examples);
        let (grads, outputs) = crate::parallel::all_reduce_gradients(self.trainer.model(), devices, |r, model| {
            let mut replica = Trainer::new(model, optim.clone()).with_compute(compute);
            let mut losses = Vec::with_capacity(shares[r].len());
            for &position in &shares[r] {
                let pairs: Vec<Example> = micro_batches[position].iter().map(|&i| examples[i].clone()).collect();
                let loss = response_nll(&replica.compute_model(), &pairs, denominator)?;
                losses.push((position, loss.clone().into_scalar().elem::<f64>()));
                replica.backward(loss);
            }
            Ok((replica.take_gradients(), losses))
        })?;
        self.trainer.accumulate_params(grads);
        let mut losses: Vec<(usize, f64)> = outputs.into_iter().flatten().collect();
        losses.sort_by_key(|(position, _)| *position);
        Ok(losses.into_iter().map(|(_, loss)| loss).sum())
    }
}

impl<B: TrainBackend> StageRun<B> for SftRun<B> {
    type State = SftState;
    type Metrics = SftStepMetrics;

    fn total_steps(&self) -> usize {
        self.steps.len()
    }

    fn restore(&mut self, dir: &Path, state: SftState, _io: &mut StageIo) -> Result<(), StageError> {
        let weights = load_training_weights::<B>(dir, &self.device)?.1.with_recompute(self.trainer.model().recompute);
        self.trainer = Trainer::new(weights, self.config.optim.clone())
            .with_compute(self.trainer.compute_dtype())
            .load_state(&dir.join(OPTIMIZER_FILE), &self.device)?;
        self.tokens_before = state.tokens_seen;
        self.state = state;
        Ok(())
    }

    fn step(&mut self, step: usize, io: &mut StageIo) -> Result<StepOutcome<SftStepMetrics>, StageError> {
        let step_started = Instant::now();
        let _autodiff = crate::train::autodiff_lock();
        let micro_batches = &self.steps[step];
        // Every micro-batch's loss is divided by the step's response tokens: a token mean.
        let denominator: usize = micro_batches.iter().flatten().map(|&i| self.examples[i].1.len()).sum();
        let step_tokens: usize = micro_batches.iter().flatten().map(|&i| self.examples[i].0.len() + self.examples[i].1.len()).sum();
        let loss_sum = if self.replica_devices.len() > 1 {
            self.step_backward_parallel(step, denominator as f64)?
        } else {
            let mut loss_sum = 0.0;
            for batch in micro_batches {
                let pairs: Vec<Example> = batch.iter().map(|&i| self.examples[i].clone()).collect();
                let loss = response_nll(&self.trainer.compute_model(), &pairs, denominator as f64)?;
                loss_sum += loss.clone().into_scalar().elem::<f64>();
                self.trainer.backward(loss);
            }
            loss_sum
        };
        let info = self.trainer.step(step, self.steps.len()).map_err(|why| StageError::Failed(format!("{}: {why}", io.label())))?;
        self.state.tokens_seen += step_tokens;
        self.state.last_loss = Some(loss_sum);
        let tokens_per_s = step_tokens as f64 / step_started.elapsed().as_secs_f64();
        let logged = step.is_multiple_of(self.config.log_every.max(1)) || step + 1 == self.steps.len();
        if logged {
            tracing::info!(step, loss = loss_sum, lr = info.lr, tokens_per_s, "sft step");
        }
        let metrics =
            SftStepMetrics { loss: loss_sum, lr: info.lr, grad_norm: info.grad_norm, tokens_per_s, tokens: self.state.tokens_seen };
        Ok(StepOutcome { metrics: logged.then_some(metrics), status: format!("loss {loss_sum:.4} lr {:.2e}", info.lr), last: false })
    }

    fn checkpoint(&self, dir: &Path) -> Result<SftState, StageError> {
        write_training_state(dir, &self.trainer, &self.model_config, &self.policy_dir, self.config.save_dtype())?;
        Ok(self.state.clone())
    }

    fn finish(self, out_dir: Option<&Path>, io: &mut StageIo) -> Result<Option<PathBuf>, StageError> {
        let wall = self.started.elapsed().as_secs_f64();
        let dir = out_dir.ok_or_else(|| StageError::Invalid("sft needs a run directory".into()))?;
        let model = self.trainer.model().valid();
        save_model(&model, &self.model_config, dir, self.config.save_dtype())?;
        write_master_weights(&model, &self.model_config, dir, self.config.save_dtype())?;
        copy_tokenizer_files(&self.policy_dir, dir)?;
        let summary = io.summary_mut();
        summary.insert("examples".into(), self.examples.len().into());
        summary.insert("skipped_without_trace".into(), self.skipped.into());
        summary.insert("steps".into(), self.steps.len().into());
        summary.insert("precision".into(), self.config.precision.as_str().into());
        summary.insert("parallel_updates".into(), self.parallel_updates.into());
        summary.insert("final_loss".into(), self.state.last_loss.unwrap_or(f64::NAN).into());
        // This process's throughput: a resumed run's earlier tokens took an earlier process's time.
        let tokens_now = self.state.tokens_seen.saturating_sub(self.tokens_before);
        summary.insert("tokens_per_s".into(), (tokens_now as f64 / wall).into());
        summary.insert("checkpoint".into(), dir.display().to_string().into());
        Ok(Some(dir.to_path_buf()))
    }
}
