//! Training plumbing shared by SFT and RL: AdamW with decoupled weight decay, clipping by the
//! global gradient norm (Burn's own clipping is per parameter), gradient accumulation, and
//! learning-rate schedules (constant, linear warmup then cosine or linear decay).

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, ElementConversion, Tensor};
use longrl_backends::Kernels;
use serde::{Deserialize, Serialize};

use crate::adamw::FusedAdamW;

use std::path::Path;

use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};

use crate::error::StageError;
use crate::fsutil::write_atomic;
use crate::guard;

/// Whether a training stage recomputes each decoder layer in the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RecomputeChoice {
    /// `layer` when a sequence can exceed [`RECOMPUTE_FROM_TOKENS`], else `none`.
    #[default]
    Auto,
    /// Keep only each layer's input; recompute the layer in the backward.
    Layer,
    /// Keep every activation.
    None,
}

/// Sequences (prompt and response) longer than this get layer recomputation under `auto`.
pub const RECOMPUTE_FROM_TOKENS: usize = 2048;

impl RecomputeChoice {
    /// The recomputation for sequences of at most `longest` tokens.
    pub fn resolve(self, longest: usize) -> crate::model::Recompute {
        match self {
            Self::Layer => crate::model::Recompute::Layer,
            Self::None => crate::model::Recompute::None,
            Self::Auto if longest > RECOMPUTE_FROM_TOKENS => crate::model::Recompute::Layer,
            Self::Auto => crate::model::Recompute::None,
        }
    }
}

/// Burn 0.21 keeps every autodiff graph of a process in one registry, and the clean-up that
/// follows a backward can drop the entries of a graph another thread is still building (seen
/// as a parameter left without a gradient when two threads train at once). Training work
/// holds this lock from its first forward to its last backward, so that graphs are built and
/// consumed one at a time; stages that train in parallel take turns step by step.
pub fn autodiff_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The file, next to a model's weights, that holds its optimizer state.
pub const OPTIMIZER_FILE: &str = "optimizer.bin";

/// Shape of the learning rate over training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The same rate throughout (after warmup).
    Constant,
    /// Cosine decay from the rate to `min_lr_ratio` times it.
    #[default]
    Cosine,
    /// Linear decay from the rate to `min_lr_ratio` times it.
    Linear,
}

/// Optimizer and schedule options (the fields are recipe options of SFT and RL stages).
/// (No `deny_unknown_fields`: stages flatten it into their own options, whose parser
/// rejects unknown names.)
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning-rate schedule after warmup: `cosine`, `linear` (both decay to
    /// `min_lr_ratio` times `lr`) or `constant`.
    #[serde(default)]
    pub schedule: Schedule,
    /// Steps of linear warmup from 0.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Final rate as a fraction of the peak (cosine and linear).
    #[serde(default = "default_min_ratio")]
    pub min_lr_ratio: f64,
    /// AdamW beta1, beta2.
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// AdamW epsilon (added to the root of the second moment).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
}

fn default_min_ratio() -> f64 {
    0.1
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_clip() -> f64 {
    1.0
}

impl OptimConfig {
    /// Learning rate at `step` (0-based) of `total` steps.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).clamp(0.0, 1.0);
        let floor = self.lr * self.min_lr_ratio;
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Schedule::Linear => self.lr - (self.lr - floor) * progress,
        }
    }

    /// Problems with the values.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            out.push(format!("lr must be positive, got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            out.push("min_lr_ratio must be within [0, 1]".into());
        }
        if self.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            out.push("betas must be within [0, 1)".into());
        }
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            out.push(format!("grad_clip must be 0 (off) or a positive number, got {}", self.grad_clip));
        }
        // f32 moments: an epsilon below f32's smallest normal is lost to rounding, one of 1
        // or more swamps every update.
        if !(self.eps >= 1e-30 && self.eps < 1.0) {
            out.push(format!("eps must be within [1e-30, 1), got {}", self.eps));
        }
        if !(0.0..1.0).contains(&self.weight_decay) {
            out.push(format!("weight_decay must be within [0, 1), got {}", self.weight_decay));
        }
        out
    }
}

/// Figures of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// A module being trained: its weights and AdamW over them, with gradient accumulation
/// and global-norm clipping. The weights move through each update.
///
/// The weights, their gradients and the moments are f32 (the master weights). Under mixed
/// precision ([`Trainer::with_compute`]) the loss is computed with
/// [`Trainer::compute_model`], a copy cast to the compute dtype inside the autodiff graph, so
/// the backward runs in that dtype and the gradients arrive at the master weights in f32.
pub struct Trainer<B: AutodiffBackend<InnerBackend: Kernels>, M: AutodiffModule<B>> {
    /// Always `Some` outside [`Trainer::step`], which moves the weights through the optimizer.
    model: Option<M>,
    optim: OptimizerAdaptor<FusedAdamW, M, B>,
    accumulator: GradientsAccumulator<M>,
    config: OptimConfig,
    pending: usize,
    /// The dtype the forward and backward compute in (see [`crate::model::precision`]).
    compute: DType,
}

impl<B: AutodiffBackend<InnerBackend: Kernels>, M: AutodiffModule<B>> Trainer<B, M> {
    /// Trains `model` with fresh optimizer moments.
    pub fn new(model: M, config: OptimConfig) -> Self {
        let adamw = FusedAdamW::new(config.betas[0] as f32, config.betas[1] as f32, config.eps as f32, config.weight_decay as f32);
        let optim = OptimizerAdaptor::from(adamw);
        Self { model: Some(model), optim, accumulator: GradientsAccumulator::new(), config, pending: 0, compute: DType::F32 }
    }

    /// The same trainer computing the forward and backward in `dtype` (bf16 for
    /// `precision: bf16-mixed`); the weights and moments stay f32.
    pub fn with_compute(mut self, dtype: DType) -> Self {
        self.compute = dtype;
        self
    }

    /// The dtype the forward and backward compute in.
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// The model to compute a loss with: the weights themselves in f32, else a copy whose
    /// parameters are casts of them to the compute dtype (gradients flow back through the
    /// casts to the f32 weights, which [`Trainer::backward`] and [`Trainer::accumulate`]
    /// read).
    pub fn compute_model(&self) -> M {
        let model = self.model().clone();
        if self.compute == DType::F32 { model } else { crate::model::precision::cast_module(model, self.compute) }
    }

    /// The weights as they are now.
    pub fn model(&self) -> &M {
        match &self.model {
            Some(model) => model,
            None => unreachable!("the trainer's weights are only absent inside `step`"),
        }
    }

    /// The trained weights.
    pub fn into_model(self) -> M {
        match self.model {
            Some(model) => model,
            None => unreachable!("the trainer's weights are only absent inside `step`"),
        }
    }

    /// Replaces the weights (a resumed run loads its checkpoint's); the moments stay.
    pub fn set_model(&mut self, model: M) {
        self.model = Some(model);
    }

    pub fn config(&self) -> &OptimConfig {
        &self.config
    }

    /// Adds the gradients of `loss`, a function of [`Trainer::model`] (scaled by the caller
    /// for accumulation).
    pub fn backward(&mut self, loss: Tensor<B, 1>) {
        self.accumulate(loss.backward());
    }

    /// Adds the parameter gradients of a backward pass (one whose other gradients the caller
    /// read first).
    pub fn accumulate(&mut self, grads: B::Gradients) {
        let Some(model) = &self.model else { unreachable!("the trainer's weights are only absent inside `step`") };
        let grads = GradientsParams::from_grads(grads, model);
        self.accumulator.accumulate(model, grads);
        self.pending += 1;
    }

    /// Adds parameter gradients computed elsewhere (data-parallel replicas, already summed).
    pub fn accumulate_params(&mut self, grads: GradientsParams) {
        let Some(model) = &self.model else { unreachable!("the trainer's weights are only absent inside `step`") };
        self.accumulator.accumulate(model, grads);
        self.pending += 1;
    }

    /// Takes the gradients accumulated since the last step (tests compare them; training
    /// applies them with [`Trainer::step`]).
    pub fn take_gradients(&mut self) -> GradientsParams {
        self.pending = 0;
        self.accumulator.grads()
    }

    /// Writes the optimizer's moments (keyed by parameter name hashes, see the model's
    /// loader) to `path`, atomically, behind a header with their length and checksum (see
    /// [`optimizer_file`]).
    pub fn save_state(&self, path: &Path) -> Result<(), StageError> {
        let bytes = BinBytesRecorder::<FullPrecisionSettings>::default()
            .record(self.optim.to_record(), ())
            .map_err(|e| StageError::Failed(format!("{}: cannot encode the optimizer state: {e}", path.display())))?;
        write_atomic(path, &optimizer_file::encode(&bytes))
    }

    /// Restores moments written by [`Trainer::save_state`] for the same model. A damaged,
    /// cut or foreign file, or moments that do not fit the model's parameters, is an error
    /// naming the file; nothing of it reaches the optimizer.
    pub fn load_state(self, path: &Path, device: &B::Device) -> Result<Self, StageError> {
        let bad = |message: String| StageError::Failed(format!("{}: {message}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
        let payload = optimizer_file::decode(&bytes).map_err(bad)?;
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        // Burn's decoder panics on bytes it cannot read; the header check above catches
        // damage, this catches a file that was forged with a valid header.
        let record = guard::catch_quietly(|| recorder.load(payload.to_vec(), device))
            .map_err(|panic| bad(format!("not a readable optimizer state ({})", guard::first_line(&panic, 160))))?
            .map_err(|e| bad(format!("not a readable optimizer state ({e})")))?;
        check_moments::<B, M>(self.model(), &record).map_err(bad)?;
        Ok(Self { optim: self.optim.load_record(record), ..self })
    }

    /// Parameters the optimizer holds moments for.
    pub fn state_len(&self) -> usize {
        self.optim.to_record().len()
    }

    /// Applies the accumulated gradients at the learning rate of `step` of `total`. Gradients
    /// with a NaN or infinite value (a diverged loss) are an error and leave the weights
    /// and moments as they were, so that the last checkpoint stays a good place to resume.
    pub fn step(&mut self, step: usize, total: usize) -> Result<StepInfo, String> {
        let mut grads = self.accumulator.grads();
        self.pending = 0;
        let grad_norm = global_norm::<B, M>(self.model(), &grads);
        if !grad_norm.is_finite() {
            return Err(format!(
                "the gradients of update {} are not finite (global norm {grad_norm}): the loss diverged; \
                 the weights were not updated (a lower lr, more warmup_steps or grad_clip may help)",
                step + 1
            ));
        }
        let model = self.take_model();
        if self.config.grad_clip > 0.0 && grad_norm > self.config.grad_clip {
            scale_grads::<B, M>(&model, &mut grads, self.config.grad_clip / (grad_norm + 1e-6));
        }
        let lr = self.config.lr_at(step, total);
        self.model = Some(self.optim.step(lr, model, grads));
        Ok(StepInfo { lr, grad_norm })
    }

    fn take_model(&mut self) -> M {
        match self.model.take() {
            Some(model) => model,
            None => unreachable!("the trainer's weights are only absent inside `step`"),
        }
    }
}

/// The optimizer's moments as Burn records them, by parameter id.
type MomentRecord<B, M> = <OptimizerAdaptor<FusedAdamW, M, B> as Optimizer<M, B>>::Record;

/// Checks that each moment of a loaded optimizer state has its parameter's rank and shape
/// (a state saved for another model would fail inside the first update).
fn check_moments<B: AutodiffBackend<InnerBackend: Kernels>, M: AutodiffModule<B>>(
    model: &M,
    record: &MomentRecord<B, M>,
) -> Result<(), String> {
    struct Fit<'a, B: AutodiffBackend<InnerBackend: Kernels>, M: AutodiffModule<B>> {
        record: &'a MomentRecord<B, M>,
        problem: Option<String>,
        checked: usize,
    }
    impl<B: AutodiffBackend<InnerBackend: Kernels>, M: AutodiffModule<B>> ModuleVisitor<B> for Fit<'_, B, M> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let Some(AdaptorRecord::V1(state)) = self.record.get(&param.id).filter(|_| self.problem.is_none()) else { return };
            let rank = adaptor_rank(state);
            let expected = param.val().dims().to_vec();
            if rank != D {
                self.problem = Some(format!("holds rank-{rank} moments for a parameter of shape {expected:?}"));
                return;
            }
            let moments = AdaptorRecord::<FusedAdamW, B>::V1(state.clone()).into_state::<D>().momentum;
            let found = moments.moment_1.dims().to_vec();
            let second = moments.moment_2.dims().to_vec();
            if found != expected || second != expected {
                self.problem = Some(format!("holds moments of shape {found:?} for a parameter of shape {expected:?}"));
            }
            self.checked += 1;
        }
    }
    let mut fit = Fit::<B, M> { record, problem: None, checked: 0 };
    model.visit(&mut fit);
    match fit.problem {
        Some(problem) => Err(format!("{problem}: the optimizer state belongs to another model")),
        None if fit.checked < record.len() => {
            Err(format!("holds moments for {} parameters the model does not have: it belongs to another model", record.len() - fit.checked))
        }
        None => Ok(()),
    }
}

/// The rank of an optimizer record's state.
fn adaptor_rank<O: burn::optim::SimpleOptimizer<Bk>, Bk: burn::tensor::backend::Backend>(state: &AdaptorRecordV1<O, Bk>) -> usize {
    match state {
        AdaptorRecordV1::Rank0(_) => 0,
        AdaptorRecordV1::Rank1(_) => 1,
        AdaptorRecordV1::Rank2(_) => 2,
        AdaptorRecordV1::Rank3(_) => 3,
        AdaptorRecordV1::Rank4(_) => 4,
        AdaptorRecordV1::Rank5(_) => 5,
        AdaptorRecordV1::Rank6(_) => 6,
        AdaptorRecordV1::Rank7(_) => 7,
        AdaptorRecordV1::Rank8(_) => 8,
    }
}

/// The layout of `optimizer.bin`: a magic line, the payload's length and FNV-1a checksum (each
/// a little-endian u64), then the payload (Burn's encoding of the moments). The header lets a
/// cut or damaged file be named before any decoder sees it.
pub mod optimizer_file {
    /// The first bytes of every optimizer file longrl writes.
    pub const MAGIC: &[u8; 16] = b"longrl-optim-v1\n";
    const HEADER: usize = MAGIC.len() + 16;

    /// The file's bytes for `payload`.
    pub fn encode(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&fnv1a(payload).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// The payload of a file's bytes, or why they are not a complete optimizer file.
    pub fn decode(bytes: &[u8]) -> Result<&[u8], String> {
        if bytes.is_empty() {
            return Err("the optimizer state is empty (0 bytes)".into());
        }
        if !bytes.starts_with(&MAGIC[..bytes.len().min(MAGIC.len())]) {
            return Err("not an optimizer state written by longrl (unknown header); delete the checkpoint, or set optimizer_state: \"reset\" to start with fresh moments".into());
        }
        if bytes.len() < HEADER {
            return Err(format!("the optimizer state is cut short: {} bytes, less than its {HEADER}-byte header", bytes.len()));
        }
        let word = |at: usize| bytes[at..at + 8].iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        let (declared, checksum) = (word(MAGIC.len()), word(MAGIC.len() + 8));
        let payload = &bytes[HEADER..];
        if payload.len() as u64 != declared {
            let how = if (payload.len() as u64) < declared { "cut short" } else { "longer than written" };
            return Err(format!("the optimizer state is {how}: {} bytes of moments where {declared} were written", payload.len()));
        }
        if fnv1a(payload) != checksum {
            return Err("the optimizer state is damaged (its checksum does not match)".into());
        }
        Ok(payload)
    }

    /// The 64-bit FNV-1a hash.
    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    }
}

/// sqrt of the sum of squares of every gradient.
pub fn global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, grads: &GradientsParams) -> f64 {
    struct SumSquares<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        total: Option<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for SumSquares<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let s = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    let mut visitor = SumSquares::<B> { grads, total: None };
    model.visit(&mut visitor);
    visitor.total.map_or(0.0, |t| t.into_scalar().elem::<f64>().sqrt())
}

/// Multiplies every gradient by `factor`.
pub fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, grads: &mut GradientsParams, factor: f64) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register::<B::InnerBackend, D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    model.visit(&mut Scale { grads, factor });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(schedule: Schedule) -> OptimConfig {
        OptimConfig {
            lr: 1.0,
            schedule,
            warmup_steps: 2,
            min_lr_ratio: 0.1,
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: 0.0,
            grad_clip: 1.0,
        }
    }

    #[test]
    fn a_cut_or_damaged_optimizer_file_is_named_before_decoding() {
        let payload = b"moments moments moments".to_vec();
        let file = optimizer_file::encode(&payload);
        assert_eq!(optimizer_file::decode(&file), Ok(&payload[..]));
        for cut in [1, 10, 20, file.len() - 1] {
            let err = optimizer_file::decode(&file[..cut]).expect_err("cut");
            assert!(err.contains("cut short"), "{cut}: {err}");
        }
        let mut flipped = file.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(optimizer_file::decode(&flipped).expect_err("damaged").contains("checksum"));
        assert!(optimizer_file::decode(b"").expect_err("empty").contains("empty"));
        assert!(optimizer_file::decode(b"PK\x03\x04 a zip").expect_err("foreign").contains("not an optimizer state"));
        let mut longer = file;
        longer.push(0);
        assert!(optimizer_file::decode(&longer).expect_err("long").contains("longer than written"));
    }

    #[test]
    fn schedules_warm_up_then_decay_to_the_floor() {
        let cosine = config(Schedule::Cosine);
        assert_eq!(cosine.lr_at(0, 12), 0.5);
        assert_eq!(cosine.lr_at(1, 12), 1.0);
        assert!((cosine.lr_at(2, 12) - 1.0).abs() < 1e-12);
        assert!((cosine.lr_at(7, 12) - 0.55).abs() < 1e-12, "{}", cosine.lr_at(7, 12));
        assert!((cosine.lr_at(12, 12) - 0.1).abs() < 1e-12);
        let linear = config(Schedule::Linear);
        assert!((linear.lr_at(7, 12) - 0.55).abs() < 1e-12);
        assert_eq!(config(Schedule::Constant).lr_at(11, 12), 1.0);
    }
}
