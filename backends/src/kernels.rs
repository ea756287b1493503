//! Fused kernels a backend may provide for the model's hot operations. Every method has a
//! default that returns `None`, and the caller then computes the same thing with generic
//! tensor ops; a backend overrides a method with a faster implementation (the CPU backend's
//! are in [`crate::cpu`]). Results must match the generic path (tests compare them).

use std::ops::Range;

use burn::tensor::Slice;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};

use crate::cpu::f32_values;

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

/// The tensors of one AdamW update, all of one shape: the weights, their gradient, and the
/// moments (`None` before the first update, which starts them at zero).
#[derive(Debug, Clone)]
pub struct AdamWTensors<B: Backend> {
    pub param: FloatTensor<B>,
    pub grad: FloatTensor<B>,
    pub moments: Option<(FloatTensor<B>, FloatTensor<B>)>,
}

pub use crate::cpu::adamw::Step as AdamWStep;

/// Fused kernels of a backend.
pub trait Kernels: Backend {
    /// The attention output `[b, heads, s, hd]` and each query row's log-sum-exp
    /// `[b, kv_heads, rep, s, 1]`.
    fn fused_attention(_call: &AttentionCall<Self>) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// The outputs of several inference calls with the same heads, query positions and head
    /// size (the segments of a decode batch, each with its own prefix and past), computed
    /// together and concatenated over the batch: `[sum of b, heads, s, hd]`.
    fn fused_attention_batch(_calls: &[AttentionCall<Self>]) -> Option<FloatTensor<Self>> {
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

    /// Whether [`Kernels::fused_attention`] computes attention at this dtype (training then
    /// uses it at every length, not only where memory demands it).
    fn has_fused_attention(_dtype: burn::tensor::DType) -> bool {
        false
    }

    /// RMSNorm over the last axis, `x * rsqrt(mean(x^2) + eps) * gamma`.
    ///
    /// # Shapes
    /// - x: `[.., d]`, gamma: `[d]` -> `[.., d]`
    fn fused_rms_norm(_x: &FloatTensor<Self>, _gamma: &FloatTensor<Self>, _eps: f64) -> Option<FloatTensor<Self>> {
        None
    }

    /// The gradients of RMSNorm's `x` and `gamma` given the output's.
    fn fused_rms_norm_backward(
        _x: &FloatTensor<Self>,
        _gamma: &FloatTensor<Self>,
        _eps: f64,
        _d_y: &FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// The rotary embedding (rotate half) `x cos + rot(x) sin`, or with `transpose` its
    /// gradient's map `dy cos + rot^T(dy sin)`. The result may be a strided view (the CPU
    /// kernel's is a `[b, heads, s, hd]` view of a token-major `[b, s, heads, hd]` buffer).
    ///
    /// # Shapes
    /// - x: `[b, heads, s, hd]`; cos, sin: `[b or 1, 1, s, hd]` -> `[b, heads, s, hd]`
    fn fused_rope(
        _x: &FloatTensor<Self>,
        _cos: &FloatTensor<Self>,
        _sin: &FloatTensor<Self>,
        _transpose: bool,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// The MLP's gate, `silu(gate) * up`, element-wise.
    fn fused_swiglu(_gate: &FloatTensor<Self>, _up: &FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        None
    }

    /// The gradients of the gate's `gate` and `up` given the output's.
    fn fused_swiglu_backward(
        _gate: &FloatTensor<Self>,
        _up: &FloatTensor<Self>,
        _d_y: &FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// Each row's log-probability of its target and the entropy of its distribution under
    /// `softmax(logits / temperature)`.
    ///
    /// # Shapes
    /// - logits: `[rows, vocab]` f32; targets: one per row -> `[rows, 2]` (log-prob, entropy)
    fn fused_token_scores(_logits: &FloatTensor<Self>, _targets: &[i64], _temperature: f32) -> Option<FloatTensor<Self>> {
        None
    }

    /// The logits' gradient `[rows, vocab]` given the scores' gradient `grad` `[rows, 2]`
    /// (its entropy column only when `entropy_grad`).
    fn fused_token_scores_backward(
        _logits: &FloatTensor<Self>,
        _targets: &[i64],
        _temperature: f32,
        _grad: &FloatTensor<Self>,
        _entropy_grad: bool,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// One AdamW update (Burn's arithmetic): the updated weights and moments, or the inputs
    /// handed back when the backend has no kernel for them.
    fn fused_adamw(tensors: AdamWTensors<Self>, _step: AdamWStep) -> Result<AdamWTensors<Self>, AdamWTensors<Self>> {
        Err(tensors)
    }

    /// Into how many row blocks an inference product `[rows, k] x [k, n]` is best split, to
    /// run as one batched product of the blocks (1: a single product). The CPU backend runs
    /// a single product under 192^3 multiply-adds on one thread but spreads a batched one
    /// over its threads: every product of a small model's decode step is under that size.
    fn product_row_blocks(_rows: usize, _k: usize, _n: usize) -> usize {
        1
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
    fn has_fused_attention(dtype: burn::tensor::DType) -> bool {
        dtype == burn::tensor::DType::F32
    }

    fn product_row_blocks(rows: usize, k: usize, n: usize) -> usize {
        crate::cpu::row_blocks(rows, k, n, rayon::current_num_threads())
    }

    fn fused_rms_norm(x: &FloatTensor<Self>, gamma: &FloatTensor<Self>, eps: f64) -> Option<FloatTensor<Self>> {
        let (mut x_holder, mut gamma_holder) = (None, None);
        let values = f32_values(x, &mut x_holder)?;
        let gamma = f32_values(gamma, &mut gamma_holder)?;
        if gamma.is_empty() || dims(x).last() != Some(&gamma.len()) {
            return None;
        }
        Some(crate::cpu::tensor(crate::cpu::rms_norm::forward(values, gamma, eps as f32), &dims(x)))
    }

    fn fused_rms_norm_backward(
        x: &FloatTensor<Self>,
        gamma: &FloatTensor<Self>,
        eps: f64,
        d_y: &FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        if dims(d_y) != dims(x) {
            return None;
        }
        let (mut x_holder, mut gamma_holder, mut d_y_holder) = (None, None, None);
        let values = f32_values(x, &mut x_holder)?;
        let gamma_values = f32_values(gamma, &mut gamma_holder)?;
        let d_y = f32_values(d_y, &mut d_y_holder)?;
        if gamma_values.is_empty() || dims(x).last() != Some(&gamma_values.len()) {
            return None;
        }
        let (d_x, d_gamma) = crate::cpu::rms_norm::backward(values, gamma_values, eps as f32, d_y);
        Some((crate::cpu::tensor(d_x, &dims(x)), crate::cpu::tensor(d_gamma, &dims(gamma))))
    }

    fn fused_rope(x: &FloatTensor<Self>, cos: &FloatTensor<Self>, sin: &FloatTensor<Self>, transpose: bool) -> Option<FloatTensor<Self>> {
        use crate::cpu::view4;
        let (x, cos, sin) = (view4(x)?, view4(cos)?, view4(sin)?);
        let [b, heads, s, hd] = x.dims;
        let table_fits = |t: &crate::cpu::attention::View4| (t.dims[0] == b || t.dims[0] == 1) && t.dims[1..] == [1, s, hd];
        if hd % 2 != 0 || !table_fits(&cos) || !table_fits(&sin) {
            return None;
        }
        let token_major = crate::cpu::tensor(crate::cpu::rope::apply(x, cos, sin, transpose), &[b, s, heads, hd]);
        Some(<Self as FloatTensorOps<Self>>::float_swap_dims(token_major, 1, 2))
    }

    fn fused_swiglu(gate: &FloatTensor<Self>, up: &FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        let (mut gate_holder, mut up_holder) = (None, None);
        let gate_values = f32_values(gate, &mut gate_holder)?;
        let up = f32_values(up, &mut up_holder)?;
        (gate_values.len() == up.len()).then(|| crate::cpu::tensor(crate::cpu::swiglu::forward(gate_values, up), &dims(gate)))
    }

    fn fused_swiglu_backward(
        gate: &FloatTensor<Self>,
        up: &FloatTensor<Self>,
        d_y: &FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        let (mut gate_holder, mut up_holder, mut d_y_holder) = (None, None, None);
        let gate_values = f32_values(gate, &mut gate_holder)?;
        let up = f32_values(up, &mut up_holder)?;
        let d_y = f32_values(d_y, &mut d_y_holder)?;
        if gate_values.len() != up.len() || d_y.len() != up.len() {
            return None;
        }
        let (d_gate, d_up) = crate::cpu::swiglu::backward(gate_values, up, d_y);
        let shape = dims(gate);
        Some((crate::cpu::tensor(d_gate, &shape), crate::cpu::tensor(d_up, &shape)))
    }

    fn fused_token_scores(logits: &FloatTensor<Self>, targets: &[i64], temperature: f32) -> Option<FloatTensor<Self>> {
        let mut holder = None;
        let values = f32_values(logits, &mut holder)?;
        let (vocab, targets) = token_rows(logits, targets, temperature)?;
        let scores = crate::cpu::token_scores::forward(values, vocab, &targets, temperature);
        Some(crate::cpu::tensor(scores, &[targets.len(), 2]))
    }

    fn fused_token_scores_backward(
        logits: &FloatTensor<Self>,
        targets: &[i64],
        temperature: f32,
        grad: &FloatTensor<Self>,
        entropy_grad: bool,
    ) -> Option<FloatTensor<Self>> {
        let (mut holder, mut grad_holder) = (None, None);
        let values = f32_values(logits, &mut holder)?;
        let grad = f32_values(grad, &mut grad_holder)?;
        let (vocab, targets) = token_rows(logits, targets, temperature)?;
        if grad.len() != 2 * targets.len() {
            return None;
        }
        let d_logits = crate::cpu::token_scores::backward(values, vocab, &targets, temperature, grad, entropy_grad);
        Some(crate::cpu::tensor(d_logits, &[targets.len(), vocab]))
    }

    fn fused_adamw(tensors: AdamWTensors<Self>, step: AdamWStep) -> Result<AdamWTensors<Self>, AdamWTensors<Self>> {
        use crate::cpu::owned_contiguous;
        let shape = dims(&tensors.param);
        let fits = |t: &FloatTensor<Self>| t.dtype() == burn::tensor::DType::F32 && dims(t) == shape;
        let moments_fit = tensors.moments.as_ref().is_none_or(|(m, v)| fits(m) && fits(v));
        if !fits(&tensors.param) || !fits(&tensors.grad) || !moments_fit {
            return Err(tensors);
        }
        let AdamWTensors { param, grad, moments } = tensors;
        let (moment_1, moment_2) = match moments {
            Some(moments) => moments,
            None => {
                let zeros = || crate::cpu::tensor(vec![0.0; shape.iter().product()], &shape);
                (zeros(), zeros())
            }
        };
        let (mut param, grad) = (owned_contiguous(param), owned_contiguous(grad));
        let (mut moment_1, mut moment_2) = (owned_contiguous(moment_1), owned_contiguous(moment_2));
        // Contiguous and whole: the storage is the values, in order.
        let grad_values = grad.storage::<f32>();
        crate::cpu::adamw::update(param.storage_mut(), grad_values, moment_1.storage_mut(), moment_2.storage_mut(), step);
        Ok(AdamWTensors { param, grad, moments: Some((moment_1, moment_2)) })
    }

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

    fn fused_attention_batch(calls: &[AttentionCall<Self>]) -> Option<FloatTensor<Self>> {
        let problems: Vec<_> = calls.iter().map(cpu_problem).collect::<Option<_>>()?;
        let [_, heads, s, hd] = problems.first()?.q.dims;
        if problems.iter().any(|p| p.q.dims[1..] != [heads, s, hd]) {
            return None;
        }
        let rows: usize = problems.iter().map(|p| p.q.dims[0]).sum();
        let out: Vec<f32> = crate::cpu::attention::forward_many(&problems).into_iter().flat_map(|f| f.out).collect();
        Some(crate::cpu::tensor(out, &[rows, heads, s, hd]))
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

/// The vocabulary size and the targets as indices, when `logits` is `[targets, vocab]`,
/// every target is a valid index and the temperature is positive.
fn token_rows(logits: &FloatTensor<crate::Cpu>, targets: &[i64], temperature: f32) -> Option<(usize, Vec<usize>)> {
    let shape = dims(logits);
    let [rows, vocab] = shape[..] else { return None };
    let targets: Vec<usize> = targets.iter().map(|&t| usize::try_from(t).ok().filter(|&t| t < vocab)).collect::<Option<_>>()?;
    (rows == targets.len() && temperature > 0.0).then_some((vocab, targets))
}

/// A CPU tensor's dimensions.
fn dims(tensor: &FloatTensor<crate::Cpu>) -> Vec<usize> {
    tensor.layout().shape().iter().copied().collect()
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
