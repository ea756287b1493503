//! Fused kernels a backend may provide for the model's hot operations. Every method has a
//! default that returns `None`, and the caller then computes the same thing with generic
//! tensor ops; a backend overrides a method with a faster implementation (the CPU backend's
//! are in [`crate::cpu`]). Results must match the generic path (tests compare them).

use std::ops::Range;

use burn::tensor::Slice;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

/// One causal attention call, in the layout of `longrl_stdlib::model::flash`.
#[derive(Debug, Clone)]
pub struct AttentionCall<B: Backend> {
    /// `[b, heads, s, hd]`, rotated, unscaled.
    pub q: FloatTensor<B>,
    /// `[b, kv_heads, past + s, hd]`.
    pub own_k: FloatTensor<B>,
    pub own_v: FloatTensor<B>,
    /// `[1, kv_heads, prefix, hd]`, attended to in full by every row.
    pub shared: Option<(FloatTensor<B>, FloatTensor<B>)>,
    /// Own keys before the first query.
    pub past: usize,
    /// `[b, past + s]` flags (true = masked) and their shape.
    pub key_padding: Option<(Vec<bool>, [usize; 2])>,
}

/// The gradients of an attention call's inputs.
#[derive(Debug, Clone)]
pub struct AttentionCallGrads<B: Backend> {
    pub q: FloatTensor<B>,
    pub own_k: FloatTensor<B>,
    pub own_v: FloatTensor<B>,
    pub shared: Option<(FloatTensor<B>, FloatTensor<B>)>,
}

/// Fused kernels of a backend.
pub trait Kernels: Backend {
    /// The attention output `[b, heads, s, hd]` and each query row's log-sum-exp
    /// `[b, kv_heads, rep, s, 1]`.
    fn fused_attention(_call: &AttentionCall<Self>) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// The attention's input gradients from its output, log-sum-exp and output gradient.
    fn fused_attention_backward(
        _call: &AttentionCall<Self>,
        _out: &FloatTensor<Self>,
        _lse: &FloatTensor<Self>,
        _d_out: &FloatTensor<Self>,
    ) -> Option<AttentionCallGrads<Self>> {
        None
    }

    /// `tensor[ranges] = value` (one range per dimension), written into `tensor`'s own
    /// buffer where the backend can: a KV cache that grows a token at a time must not be
    /// copied per token. The default is Burn's `slice_assign`.
    fn slice_assign_in_place(tensor: FloatTensor<Self>, ranges: &[Range<usize>], value: FloatTensor<Self>) -> FloatTensor<Self> {
        let slices: Vec<Slice> = ranges.iter().map(|r| Slice::from(r.clone())).collect();
        Self::float_slice_assign(tensor, &slices, value)
    }
}

impl Kernels for crate::Cpu {
    fn slice_assign_in_place(tensor: FloatTensor<Self>, ranges: &[Range<usize>], value: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::inplace::assign(tensor, ranges, value)
    }

    fn fused_attention(call: &AttentionCall<Self>) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        let problem = cpu_problem(call)?;
        let [b, heads, s, hd] = problem.q.dims;
        let kvh = problem.own_k.dims[1];
        let forward = crate::cpu::attention::forward(&problem);
        let out = crate::cpu::tensor(forward.out, &[b, heads, s, hd]);
        let lse = crate::cpu::tensor(forward.lse, &[b, kvh, heads / kvh, s, 1]);
        Some((out, lse))
    }

    fn fused_attention_backward(
        call: &AttentionCall<Self>,
        out: &FloatTensor<Self>,
        lse: &FloatTensor<Self>,
        d_out: &FloatTensor<Self>,
    ) -> Option<AttentionCallGrads<Self>> {
        let problem = cpu_problem(call)?;
        let (out, lse, d_out) = (out.to_contiguous(), lse.to_contiguous(), d_out.to_contiguous());
        let saved =
            crate::cpu::attention::Saved { out: out.as_slice::<f32>()?, lse: lse.as_slice::<f32>()?, d_out: d_out.as_slice::<f32>()? };
        let grads = crate::cpu::attention::backward(&problem, saved);
        let tensor = |values: Vec<f32>, dims: [usize; 4]| crate::cpu::tensor(values, &dims);
        let shared = match (grads.d_shared, &problem.shared) {
            (Some((k, v)), Some((shared_k, _))) => Some((tensor(k, shared_k.dims), tensor(v, shared_k.dims))),
            _ => None,
        };
        Some(AttentionCallGrads {
            q: tensor(grads.d_q, problem.q.dims),
            own_k: tensor(grads.d_own_k, problem.own_k.dims),
            own_v: tensor(grads.d_own_v, problem.own_k.dims),
            shared,
        })
    }
}

/// The CPU kernel's view of a call, when every tensor is f32 with a contiguous last axis.
fn cpu_problem(call: &AttentionCall<crate::Cpu>) -> Option<crate::cpu::attention::Problem<'_>> {
    use crate::cpu::view4;
    let shared = match &call.shared {
        Some((k, v)) => Some((view4(k)?, view4(v)?)),
        None => None,
    };
    Some(crate::cpu::attention::Problem {
        q: view4(&call.q)?,
        own_k: view4(&call.own_k)?,
        own_v: view4(&call.own_v)?,
        shared,
        past: call.past,
        key_padding: call.key_padding.as_ref().map(|(flags, _)| flags.as_slice()),
    })
}

#[cfg(feature = "wgpu")]
impl Kernels for crate::Wgpu {}
#[cfg(feature = "cuda")]
impl Kernels for crate::Cuda {}
impl<B: Backend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> Kernels for burn::backend::Autodiff<B, C> {}
