//! Attention with a linear-memory backward: the FlashAttention-2 algorithm over Burn tensor
//! ops, as one custom autodiff function ([`AttentionVjp`]). The forward runs an online
//! softmax over key blocks and keeps only the output and each query row's log-sum-exp; the
//! backward recomputes each block's scores from them. It covers causal self-attention,
//! grouped-query heads, key padding and a prefix shared by every row (an RL group's
//! responses attending to their common prompt). A backend may later swap in a fused kernel.
//!
//! Layouts follow [`crate::model::attention::attend`]: heads that share a key/value head
//! are folded into the row dimension (`[b, kv_heads, rep * rows, head_dim]`).

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, DType, Tensor, TensorData, TensorPrimitive};
use longrl_backends::{AttentionCall, Kernels, Vjp};

use crate::model::attention::{MASKED, mask_own, scores_shared, weighted_shared};
use crate::model::precision::{to_dtype, to_f32};

/// Scores of one (query chunk, key block) pair are kept under about this many elements.
const BLOCK_ELEMENTS: usize = 4 << 20;

/// Causal attention of queries over their own keys (and a shared prefix), differentiable
/// with a memory cost linear in the length.
///
/// Inputs: `q` `[b, heads, s, hd]` (rotated, unscaled), `own_k`, `own_v`
/// `[b, kv_heads, past + s, hd]`, and with `shared`, `shared_k`, `shared_v`
/// `[1, kv_heads, prefix, hd]`. Output: `[b, heads, s, hd]`.
#[derive(Debug, Clone)]
pub struct AttentionVjp {
    /// Own keys before the first query (a cache during generation; 0 in training).
    pub past: usize,
    /// Whether inputs 3 and 4 are a prefix every row attends to in full.
    pub shared: bool,
    /// Padding flags of the own keys, `[b, past + s]` row-major (true = masked).
    pub key_padding: Option<(Vec<bool>, [usize; 2])>,
    /// Keys per block.
    pub key_chunk: usize,
    /// Query rows per chunk at most (fewer when the batch and heads are large, so that a
    /// chunk's scores against a block stay near 4M elements).
    pub query_chunk: usize,
}

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    kv_heads: usize,
    rep: usize,
    s: usize,
    hd: usize,
    /// Own keys.
    t: usize,
}

impl Dims {
    fn of<B: Backend>(q: &Tensor<B, 4>, own_k: &Tensor<B, 4>) -> Self {
        let [b, heads, s, hd] = q.dims();
        let [_, kv_heads, t, _] = own_k.dims();
        Self { b, heads, kv_heads, rep: heads / kv_heads, s, hd, t }
    }

    fn scale(&self) -> f64 {
        1.0 / (self.hd as f64).sqrt()
    }

    /// Query rows per chunk: at most `limit`, and few enough that a chunk's scores against
    /// a block stay small.
    fn query_chunk(&self, key_chunk: usize, limit: usize) -> usize {
        (BLOCK_ELEMENTS / (self.b * self.heads * key_chunk).max(1)).clamp(16, 4096).min(limit.max(1))
    }
}

/// A primitive as a tensor of rank `D`.
pub(crate) fn tensor<B: Backend, const D: usize>(p: &FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p.clone()))
}

/// A tensor's primitive.
pub(crate) fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// `[b, kvh, rep, s, n]` rows `start..end` as `[b, kvh, rep * rows, n]`.
fn chunk_rows<B: Backend>(x: &Tensor<B, 5>, start: usize, end: usize) -> Tensor<B, 4> {
    let [b, kvh, rep, _, n] = x.dims();
    x.clone().slice([0..b, 0..kvh, 0..rep, start..end, 0..n]).reshape([b, kvh, rep * (end - start), n])
}

/// `[b, kvh, rows, n]` -> `[1, kvh, b * rows, n]`: a batch folded into rows, to meet a
/// batch-1 shared prefix in one product.
fn fold<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, kvh, rows, n] = x.dims();
    x.swap_dims(0, 1).reshape([1, kvh, b * rows, n])
}

/// Key blocks `(start, end)` of `len` keys.
fn blocks(len: usize, size: usize) -> Vec<(usize, usize)> {
    (0..len).step_by(size.max(1)).map(|start| (start, (start + size).min(len))).collect()
}

/// Running max, normalizer and weighted sum of one query chunk's online softmax, kept in
/// f32 whatever the inputs' dtype (bf16 under mixed precision).
struct OnlineSoftmax<B: Backend> {
    max: Tensor<B, 4>,  // [b, kvh, rows, 1]
    norm: Tensor<B, 4>, // [b, kvh, rows, 1]
    acc: Tensor<B, 4>,  // [b, kvh, rows, hd]
    /// The inputs' dtype: the weights meet the values in it, and the output returns to it.
    dtype: DType,
}

impl<B: Backend> OnlineSoftmax<B> {
    fn new(rows: [usize; 3], hd: usize, dtype: DType, device: &B::Device) -> Self {
        let [b, kvh, r] = rows;
        Self {
            max: Tensor::full([b, kvh, r, 1], MASKED, device),
            norm: Tensor::zeros([b, kvh, r, 1], device),
            acc: Tensor::zeros([b, kvh, r, hd], device),
            dtype,
        }
    }

    /// Folds in a block of scores `[b, kvh, rows, keys]`; `weigh` multiplies the block's
    /// weights by its values.
    fn update(&mut self, scores: Tensor<B, 4>, weigh: impl FnOnce(Tensor<B, 4>) -> Tensor<B, 4>) {
        let scores = to_f32(scores);
        let new_max = self.max.clone().max_pair(scores.clone().max_dim(3));
        let correction = (self.max.clone() - new_max.clone()).exp();
        let weights = (scores - new_max.clone()).exp(); // [b, kvh, rows, keys]
        self.norm = self.norm.clone() * correction.clone() + weights.clone().sum_dim(3);
        self.acc = self.acc.clone() * correction + to_f32(weigh(to_dtype(weights, self.dtype)));
        self.max = new_max;
    }

    /// The output rows (in the inputs' dtype) and their log-sum-exp (f32).
    fn finish(self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let lse = self.max + self.norm.clone().log();
        (to_dtype(self.acc / self.norm, self.dtype), lse)
    }
}

impl AttentionVjp {
    fn padding<B: Backend>(&self, device: &B::Device) -> Option<Tensor<B, 2, Bool>> {
        self.key_padding.as_ref().map(|(flags, shape)| Tensor::from_data(TensorData::new(flags.clone(), *shape), device))
    }

    /// Own key blocks a query chunk ending at `q_end` can see, whole (the causal mask hides
    /// the future keys of the last one); later blocks are entirely in its future.
    fn visible_blocks(&self, dims: Dims, q_end: usize) -> Vec<(usize, usize)> {
        blocks(dims.t, self.key_chunk).into_iter().take_while(|&(start, _)| start < self.past + q_end).collect()
    }

    /// The call as a backend's fused kernel takes it.
    fn call<B: Backend>(&self, inputs: &AttentionInputs<B>) -> AttentionCall<B> {
        AttentionCall {
            q: primitive(inputs.q.clone()),
            own_k: primitive(inputs.own_k.clone()),
            own_v: primitive(inputs.own_v.clone()),
            shared: inputs.shared.as_ref().map(|(k, v)| (primitive(k.clone()), primitive(v.clone()))),
            past: self.past,
            key_padding: self.key_padding.clone(),
        }
    }

    /// The backend's fused kernel's output and log-sum-exp, if it has one.
    pub fn fused<B: Kernels>(&self, inputs: &AttentionInputs<B>) -> Option<(Tensor<B, 4>, Tensor<B, 5>)> {
        B::fused_attention(&self.call(inputs)).map(|(out, lse)| (tensor(&out), tensor(&lse)))
    }

    /// The output `[b, heads, s, hd]` and the log-sum-exp `[b, kvh, rep, s, 1]`, by the
    /// backend's fused kernel when it has one.
    pub fn attend<B: Kernels>(&self, inputs: &AttentionInputs<B>) -> (Tensor<B, 4>, Tensor<B, 5>) {
        match B::fused_attention(&self.call(inputs)) {
            Some((out, lse)) => (tensor(&out), tensor(&lse)),
            None => self.attend_generic(inputs),
        }
    }

    /// The input gradients, by the backend's fused kernel when it has one.
    pub fn gradients<B: Kernels>(
        &self,
        inputs: &AttentionInputs<B>,
        out: Tensor<B, 4>,
        lse: Tensor<B, 5>,
        d_out: Tensor<B, 4>,
    ) -> AttentionGrads<B> {
        let (out_p, lse_p, d_out_p) = (primitive(out.clone()), primitive(lse.clone()), primitive(d_out.clone()));
        match B::fused_attention_backward(&self.call(inputs), &out_p, &lse_p, &d_out_p) {
            Some(grads) => AttentionGrads {
                q: tensor(&grads.q),
                own_k: tensor(&grads.own_k),
                own_v: tensor(&grads.own_v),
                shared: grads.shared.map(|(k, v)| (tensor(&k), tensor(&v))),
            },
            None => self.gradients_generic(inputs, out, lse, d_out),
        }
    }

    /// The inputs as tensors: queries, own keys and values, and the shared prefix.
    fn unpack<B: Backend>(&self, inputs: &[FloatTensor<B>]) -> AttentionInputs<B> {
        AttentionInputs {
            q: tensor(&inputs[0]),
            own_k: tensor(&inputs[1]),
            own_v: tensor(&inputs[2]),
            shared: self.shared.then(|| (tensor(&inputs[3]), tensor(&inputs[4]))),
        }
    }

    /// [`AttentionVjp::attend`] over tensor ops.
    pub fn attend_generic<B: Backend>(&self, inputs: &AttentionInputs<B>) -> (Tensor<B, 4>, Tensor<B, 5>) {
        let AttentionInputs { q, own_k, own_v, shared } = inputs;
        let dims = Dims::of(&q, &own_k);
        let Dims { b, kv_heads: kvh, rep, s, hd, .. } = dims;
        let device = q.device();
        let padding = self.padding::<B>(&device);
        let q5 = q.clone().mul_scalar(dims.scale()).reshape([b, kvh, rep, s, hd]);
        let (mut outputs, mut lses) = (Vec::new(), Vec::new());
        for (q_start, q_end) in blocks(s, dims.query_chunk(self.key_chunk, self.query_chunk)) {
            let rows = q_end - q_start;
            let qc = chunk_rows(&q5, q_start, q_end); // [b, kvh, rep*rows, hd]
            let mut state = OnlineSoftmax::new([b, kvh, rep * rows], hd, q.dtype(), &device);
            if let Some((sk, sv)) = shared {
                for (k_start, k_end) in blocks(sk.dims()[2], self.key_chunk) {
                    let kb = sk.clone().slice([0..1, 0..kvh, k_start..k_end, 0..hd]);
                    let vb = sv.clone().slice([0..1, 0..kvh, k_start..k_end, 0..hd]);
                    state.update(scores_shared(qc.clone(), kb), |w| weighted_shared(w, vb));
                }
            }
            for (k_start, k_end) in self.visible_blocks(dims, q_end) {
                let kb = own_k.clone().slice([0..b, 0..kvh, k_start..k_end, 0..hd]);
                let vb = own_v.clone().slice([0..b, 0..kvh, k_start..k_end, 0..hd]);
                let scores = mask_own(qc.clone().matmul(kb.transpose()), rep, self.past, q_start, k_start, padding.as_ref());
                state.update(scores, |w| w.matmul(vb));
            }
            let (out, lse) = state.finish();
            outputs.push(out.reshape([b, kvh, rep, rows, hd]));
            lses.push(lse.reshape([b, kvh, rep, rows, 1]));
        }
        (Tensor::cat(outputs, 3).reshape([b, dims.heads, s, hd]), Tensor::cat(lses, 3))
    }
}

/// Gradient accumulators of the key/value blocks.
struct KeyGrads<B: Backend> {
    k: Vec<Tensor<B, 4>>,
    v: Vec<Tensor<B, 4>>,
}

impl<B: Backend> KeyGrads<B> {
    fn zeros(batch: usize, kvh: usize, spans: &[(usize, usize)], hd: usize, device: &B::Device) -> Self {
        let zeros = || spans.iter().map(|(a, b)| Tensor::zeros([batch, kvh, b - a, hd], device)).collect();
        Self { k: zeros(), v: zeros() }
    }

    /// The gradients (accumulated in f32) in `dtype`, the inputs'.
    fn finish(self, dtype: DType) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (to_dtype(Tensor::cat(self.k, 2), dtype), to_dtype(Tensor::cat(self.v, 2), dtype))
    }
}

/// One query chunk's tensors in the backward, `[b, kvh, rep * rows, n]`.
struct ChunkGrad<B: Backend> {
    q: Tensor<B, 4>,
    d_out: Tensor<B, 4>,
    lse: Tensor<B, 4>,
    /// rowsum(dO * O).
    delta: Tensor<B, 4>,
    d_q: Tensor<B, 4>,
}

impl<B: Backend> ChunkGrad<B> {
    /// One key block's probabilities P = exp(S - lse) and score gradients
    /// dS = P * (dP - rowsum(dO * O)), from its masked scores S and dP = dO V^T.
    /// Both in the inputs' dtype `dtype`, computed in f32.
    fn block(&mut self, scores: Tensor<B, 4>, d_p: Tensor<B, 4>, dtype: DType) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let p = (to_f32(scores) - self.lse.clone()).exp(); // [b, kvh, rows, keys]
        let d_s = p.clone() * (to_f32(d_p) - self.delta.clone());
        (to_dtype(p, dtype), to_dtype(d_s, dtype))
    }
}

/// The inputs of an attention call as tensors.
#[derive(Debug, Clone)]
pub struct AttentionInputs<B: Backend> {
    /// `[b, heads, s, hd]`, rotated, unscaled.
    pub q: Tensor<B, 4>,
    /// `[b, kv_heads, past + s, hd]`.
    pub own_k: Tensor<B, 4>,
    pub own_v: Tensor<B, 4>,
    /// `[1, kv_heads, prefix, hd]` keys and values every row attends to.
    pub shared: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

/// Inference attention of several calls at once by the backend's fused kernel (see
/// [`Kernels::fused_attention_batch`]): `(inputs, past)` per call, all with the same heads,
/// query positions and head size, no key padding. Returns the outputs concatenated over the
/// batch, `[sum of b, heads, s, hd]`, or `None` when the backend cannot (no such kernel, or
/// not for these dtypes or layouts): the caller then attends call by call.
pub fn fused_batch<B: Kernels>(calls: &[(AttentionInputs<B>, usize)]) -> Option<Tensor<B, 4>> {
    let calls: Vec<AttentionCall<B>> = calls
        .iter()
        .map(|(inputs, past)| {
            let vjp = AttentionVjp { past: *past, shared: inputs.shared.is_some(), key_padding: None, key_chunk: 0, query_chunk: 0 };
            vjp.call(inputs)
        })
        .collect();
    B::fused_attention_batch(&calls).map(|out| tensor(&out))
}

/// The gradients of an attention call's inputs.
#[derive(Debug, Clone)]
pub struct AttentionGrads<B: Backend> {
    pub q: Tensor<B, 4>,
    pub own_k: Tensor<B, 4>,
    pub own_v: Tensor<B, 4>,
    pub shared: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl AttentionVjp {
    /// The gradients of the inputs given the output's, from the output and log-sum-exp of
    /// [`AttentionVjp::attend`] (FlashAttention-2's backward: scores recomputed per block),
    /// over tensor ops.
    pub fn gradients_generic<B: Backend>(
        &self,
        inputs: &AttentionInputs<B>,
        out: Tensor<B, 4>,
        lse: Tensor<B, 5>,
        d_out: Tensor<B, 4>,
    ) -> AttentionGrads<B> {
        let AttentionInputs { q, own_k, own_v, shared } = inputs;
        let dims = Dims::of(q, own_k);
        let Dims { b, kv_heads: kvh, rep, s, hd, t, .. } = dims;
        let device = q.device();
        let padding = self.padding::<B>(&device);
        let scale = dims.scale();
        let q5 = q.clone().mul_scalar(scale).reshape([b, kvh, rep, s, hd]);
        let d_out5 = d_out.reshape([b, kvh, rep, s, hd]);
        let dtype = q.dtype();
        let delta5 = (to_f32(d_out5.clone()) * to_f32(out.reshape([b, kvh, rep, s, hd]))).sum_dim(4); // [b, kvh, rep, s, 1]
        let own_spans = blocks(t, self.key_chunk);
        let mut own = KeyGrads::zeros(b, kvh, &own_spans, hd, &device);
        let shared_spans = shared.as_ref().map(|(sk, _)| blocks(sk.dims()[2], self.key_chunk)).unwrap_or_default();
        let mut prefix = KeyGrads::zeros(1, kvh, &shared_spans, hd, &device);
        let mut d_q_chunks = Vec::new();
        for (q_start, q_end) in blocks(s, dims.query_chunk(self.key_chunk, self.query_chunk)) {
            let rows = q_end - q_start;
            let mut chunk = ChunkGrad {
                q: chunk_rows(&q5, q_start, q_end),
                d_out: chunk_rows(&d_out5, q_start, q_end),
                lse: chunk_rows(&lse, q_start, q_end),
                delta: chunk_rows(&delta5, q_start, q_end),
                d_q: Tensor::zeros([b, kvh, rep * rows, hd], &device),
            };
            if let Some((sk, sv)) = shared {
                for (j, &(k_start, k_end)) in shared_spans.iter().enumerate() {
                    let kb = sk.clone().slice([0..1, 0..kvh, k_start..k_end, 0..hd]);
                    let vb = sv.clone().slice([0..1, 0..kvh, k_start..k_end, 0..hd]);
                    let scores = scores_shared(chunk.q.clone(), kb.clone());
                    let d_p = scores_shared(chunk.d_out.clone(), vb);
                    let (p, d_s) = chunk.block(scores, d_p, dtype);
                    prefix.v[j] = prefix.v[j].clone() + to_f32(fold(p).transpose().matmul(fold(chunk.d_out.clone())));
                    prefix.k[j] = prefix.k[j].clone() + to_f32(fold(d_s.clone()).transpose().matmul(fold(chunk.q.clone())));
                    chunk.d_q = chunk.d_q.clone() + to_f32(weighted_shared(d_s, kb));
                }
            }
            for (j, (k_start, k_end)) in self.visible_blocks(dims, q_end).into_iter().enumerate() {
                let kb = own_k.clone().slice([0..b, 0..kvh, k_start..k_end, 0..hd]);
                let vb = own_v.clone().slice([0..b, 0..kvh, k_start..k_end, 0..hd]);
                let scores = mask_own(chunk.q.clone().matmul(kb.clone().transpose()), rep, self.past, q_start, k_start, padding.as_ref());
                let d_p = chunk.d_out.clone().matmul(vb.transpose());
                let masked = padding.is_some().then(|| scores.clone().lower_equal_elem(MASKED / 2.0));
                let (p, d_s) = chunk.block(scores, d_p, dtype);
                // A masked score is a constant: no gradient reaches q or k through it (this
                // matters only for a row whose keys are all masked, e.g. a padding query).
                let d_s = match masked {
                    Some(masked) => d_s.mask_fill(masked, 0.0),
                    None => d_s,
                };
                own.v[j] = own.v[j].clone() + to_f32(p.transpose().matmul(chunk.d_out.clone()));
                own.k[j] = own.k[j].clone() + to_f32(d_s.clone().transpose().matmul(chunk.q.clone()));
                chunk.d_q = chunk.d_q.clone() + to_f32(d_s.matmul(kb));
            }
            d_q_chunks.push(to_dtype(chunk.d_q.mul_scalar(scale), dtype).reshape([b, kvh, rep, rows, hd]));
        }
        let (d_own_k, d_own_v) = own.finish(dtype);
        AttentionGrads {
            q: Tensor::cat(d_q_chunks, 3).reshape([b, dims.heads, s, hd]),
            own_k: d_own_k,
            own_v: d_own_v,
            shared: shared.is_some().then(|| prefix.finish(dtype)),
        }
    }
}

impl<B: Kernels> Vjp<B> for AttentionVjp {
    /// The output and the log-sum-exp of every query row.
    type Saved = (FloatTensor<B>, FloatTensor<B>);

    fn forward(&self, inputs: &[FloatTensor<B>]) -> (FloatTensor<B>, Self::Saved) {
        let (out, lse) = self.attend(&self.unpack::<B>(inputs));
        let out = primitive(out);
        (out.clone(), (out, primitive(lse)))
    }

    fn backward(
        &self,
        inputs: &[FloatTensor<B>],
        saved: Self::Saved,
        output_grad: FloatTensor<B>,
        _wanted: &[bool],
    ) -> Vec<Option<FloatTensor<B>>> {
        let inputs = self.unpack::<B>(inputs);
        let grads = self.gradients(&inputs, tensor(&saved.0), tensor(&saved.1), tensor(&output_grad));
        let mut out = vec![Some(primitive(grads.q)), Some(primitive(grads.own_k)), Some(primitive(grads.own_v))];
        if let Some((k, v)) = grads.shared {
            out.push(Some(primitive(k)));
            out.push(Some(primitive(v)));
        }
        out
    }
}
