//! Mixed precision for training: `precision: "bf16-mixed"` runs the forward and the backward
//! in bf16 (activations, matmuls, attention) while the trainer keeps f32 master weights and
//! f32 AdamW moments, updated in f32.
//!
//! How: the trainer's model stays f32. Each step builds a *compute copy* of it
//! ([`compute_copy`]), every float parameter cast to bf16 inside the autodiff graph. The
//! loss is computed with the copy; in the backward, the gradient reaches each cast node in
//! bf16 and Burn's cast backward turns it into an f32 gradient of the master parameter, so
//! gradient accumulation, clipping and the AdamW update all see f32. Log-probabilities,
//! softmax, the loss and the norms' reductions are computed in f32 (the LM head casts its
//! logits up; RMSNorm squares in f32), and the online softmax of attention keeps its
//! statistics in f32 ([`to_dtype`] at those boundaries; a no-op on the f32 path).
//!
//! Backends: bf16 runs where the backend supports it ([`Precision::resolve`]): CUDA, and
//! the CPU backend (burn-flex has bf16 matmul and element-wise ops; it converts through f32,
//! so it is for checking the numerics, not for speed). wgpu's WGSL compiler has no bf16
//! type, so on wgpu `bf16-mixed` falls back to f32 with a warning in the log.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::CausalLm;

/// Numeric precision of a training stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// Forward and backward in bf16; f32 master weights, optimizer moments, log-probs,
    /// softmax, loss and reductions.
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16Mixed => "bf16-mixed",
        }
    }

    /// The dtype the forward and backward compute in on `device`: bf16 for `bf16-mixed`
    /// where the backend supports it, else f32 (logged once per call as a warning naming
    /// the fallback).
    pub fn resolve<B: Backend>(self, device: &B::Device) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16Mixed if bf16_supported::<B>(device) => DType::BF16,
            Self::Bf16Mixed => {
                tracing::warn!(
                    backend = B::name(device),
                    "precision bf16-mixed: this backend has no bf16 arithmetic (wgpu's WGSL compiler has no bf16 type); training in f32 instead"
                );
                DType::F32
            }
        }
    }

    /// The weight dtype a checkpoint of this precision saves by default.
    pub fn default_save_dtype(self) -> crate::model::SaveDtype {
        match self {
            Self::F32 => crate::model::SaveDtype::F32,
            Self::Bf16Mixed => crate::model::SaveDtype::Bf16,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `B` computes in bf16 on `device`. Burn's own answer, except for wgpu, whose WGSL
/// compiler panics on bf16 kernels whatever the adapter reports.
pub fn bf16_supported<B: Backend>(device: &B::Device) -> bool {
    let name = B::name(device).to_ascii_lowercase();
    if name.contains("wgpu") || name.contains("wgsl") {
        return false;
    }
    B::supports_dtype(device, DType::BF16)
}

/// `tensor` in `dtype` (itself when it already is: no cast node in the graph).
///
/// # Shapes
/// - tensor: any -> the same shape
pub fn to_dtype<B: Backend, const D: usize>(tensor: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if tensor.dtype() == dtype { tensor } else { tensor.cast(dtype) }
}

/// `tensor` in f32 (for softmax statistics, log-probs and reductions).
///
/// # Shapes
/// - tensor: any -> the same shape
pub fn to_f32<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Tensor<B, D> {
    to_dtype(tensor, DType::F32)
}

/// Casts every float parameter to one dtype, keeping parameter ids.
#[derive(Debug, Clone, Copy)]
struct CastParams(DType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, to_dtype(tensor, self.0), mapper)
    }
}

/// A copy of `model` whose parameters are in `dtype`: on an autodiff backend each one is a
/// cast of the master parameter, so the master parameter receives the (f32) gradient. With
/// `dtype` f32 and f32 weights, a plain clone.
pub fn compute_copy<B: Backend>(model: &CausalLm<B>, dtype: DType) -> CausalLm<B> {
    model.clone().map(&mut CastParams(dtype))
}

/// The same model with its parameters in `dtype` (for inference, e.g. the rollouts of a
/// bf16-mixed stage); itself when the dtype is f32 and so are its weights.
pub fn cast_model<B: Backend>(model: CausalLm<B>, dtype: DType) -> CausalLm<B> {
    cast_module(model, dtype)
}

/// Any module with its float parameters in `dtype` (under autodiff, casts of the originals).
pub fn cast_module<B: Backend, M: Module<B>>(module: M, dtype: DType) -> M {
    module.map(&mut CastParams(dtype))
}

/// The dtype of a model's parameters (that of its embedding).
pub fn model_dtype<B: Backend>(model: &CausalLm<B>) -> DType {
    model.embed_tokens.weight.val().dtype()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_names_parse() {
        let p: Precision = serde_json::from_str("\"bf16-mixed\"").expect("parses");
        assert_eq!(p, Precision::Bf16Mixed);
        let p: Precision = serde_json::from_str("\"f32\"").expect("parses");
        assert_eq!(p, Precision::F32);
        assert!(serde_json::from_str::<Precision>("\"bf16\"").is_err());
        assert_eq!(Precision::Bf16Mixed.to_string(), "bf16-mixed");
    }

    #[test]
    fn the_cpu_backend_computes_in_bf16() {
        let device = Default::default();
        assert_eq!(Precision::Bf16Mixed.resolve::<longrl_backends::Cpu>(&device), DType::BF16);
        assert_eq!(Precision::F32.resolve::<longrl_backends::Cpu>(&device), DType::F32);
    }
}
