//! Grouped-query self-attention with a KV cache that may hold a prefix shared by every row
//! (a group's common prompt, computed and stored once), and a chunked online-softmax path
//! whose memory grows linearly with the input instead of materializing [heads, seq, seq].
//! Under autodiff the chunked path is the custom operation of [`crate::model::flash`], whose
//! backward recomputes the scores, so training memory is linear too.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorPrimitive};
use longrl_backends::CustomGrad;

use crate::model::flash::{AttentionInputs, AttentionVjp};
use crate::model::precision::{to_dtype, to_f32};
use crate::model::transformer::apply_linear;

/// Score given to masked keys. Finite (not -inf) so that a row with every key masked (a
/// padding row) stays finite instead of spreading NaN through later layers.
pub(crate) const MASKED: f32 = -1.0e30;

/// Which attention implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Under autodiff, [`AttentionKernel::Flash`] when batch x heads x queries x keys exceeds
    /// the threshold. Otherwise the backend's fused attention (Burn's `attention` op: a flash
    /// kernel on the CPU and GPU backends) when the keys are one unpadded segment, else
    /// chunked above the threshold (queries x keys per head) and plain below it.
    Auto,
    /// Our matmul-softmax-matmul, materializing the scores.
    Plain,
    /// Our online-softmax over key blocks (linear memory).
    Chunked,
    /// The online softmax as one custom autodiff operation that keeps only the output and
    /// the rows' log-sum-exp and recomputes scores in the backward (linear training memory).
    Flash,
}

/// When and how attention is computed in chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionOptions {
    pub kernel: AttentionKernel,
    /// With `Auto`, use the chunked path when queries x keys exceeds this (per head).
    pub chunk_threshold: usize,
    /// Query rows per chunk.
    pub query_chunk: usize,
    /// Keys per block.
    pub key_chunk: usize,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        Self { kernel: AttentionKernel::Auto, chunk_threshold: 2048 * 2048, query_chunk: 512, key_chunk: 1024 }
    }
}

impl AttentionOptions {
    /// Always our chunked path, with the given sizes.
    pub fn always_chunked(query_chunk: usize, key_chunk: usize) -> Self {
        Self { kernel: AttentionKernel::Chunked, chunk_threshold: 0, query_chunk, key_chunk }
    }

    /// Always our plain path.
    pub fn never_chunked() -> Self {
        Self { kernel: AttentionKernel::Plain, chunk_threshold: usize::MAX, ..Self::default() }
    }
}

/// Keys and values one layer has seen: an optional prefix shared by all rows and each
/// row's own keys (already rotated).
#[derive(Debug, Clone)]
pub struct LayerKv<B: Backend> {
    /// `[1, kv_heads, prefix, head_dim]` keys and values every row attends to in full.
    pub shared: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// `[batch, kv_heads, len, head_dim]` keys and values of each row.
    pub own: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> Default for LayerKv<B> {
    fn default() -> Self {
        Self { shared: None, own: None }
    }
}

impl<B: Backend> LayerKv<B> {
    /// Length of each row's own keys.
    pub fn own_len(&self) -> usize {
        self.own.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Length of the shared prefix.
    pub fn shared_len(&self) -> usize {
        self.shared.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }
}

/// The attention block of a decoder layer.
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl<B: CustomGrad> SelfAttention<B> {
    /// Attends the new tokens to the cache and to each other (causally), then stores their
    /// keys and values in the cache when `append` is set.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`; cos, sin: `[batch, 1, seq, head_dim]`
    /// - key_padding: `[batch, own_len + seq]`, true where a key is padding
    /// - returns `[batch, seq, hidden]`
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        cache: &mut LayerKv<B>,
        key_padding: Option<Tensor<B, 2, Bool>>,
        options: AttentionOptions,
        append: bool,
    ) -> Tensor<B, 3> {
        let (q, k, v) = self.project(x, cos, sin);
        let past = cache.own_len();
        let (own_k, own_v) = match &cache.own {
            Some((pk, pv)) => (Tensor::cat(vec![pk.clone(), k], 2), Tensor::cat(vec![pv.clone(), v], 2)),
            None => (k, v),
        };
        let shared = cache.shared.clone();
        let out = attend(q, shared, own_k.clone(), own_v.clone(), past, key_padding, options); // [b, h, s, hd]
        if append {
            cache.own = Some((own_k, own_v));
        }
        self.output(out)
    }

    /// Queries, keys (both rotated) and values of new tokens.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`; cos, sin: `[batch, 1, seq, head_dim]`
    /// - returns q `[batch, heads, seq, head_dim]`, k and v `[batch, kv_heads, seq, head_dim]`
    pub(crate) fn project(&self, x: Tensor<B, 3>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s, _] = x.dims();
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let q = apply_linear(&self.q_proj, x.clone()).reshape([b, s, h, hd]).swap_dims(1, 2); // [b, h, s, hd]
        let k = apply_linear(&self.k_proj, x.clone()).reshape([b, s, kvh, hd]).swap_dims(1, 2); // [b, kvh, s, hd]
        let v = apply_linear(&self.v_proj, x).reshape([b, s, kvh, hd]).swap_dims(1, 2); // [b, kvh, s, hd]
        let q = crate::model::fused::rope(q, cos.clone(), sin.clone());
        let k = crate::model::fused::rope(k, cos, sin);
        (q, k, v)
    }

    /// The output projection of attention rows.
    ///
    /// # Shapes
    /// - out: `[batch, heads, seq, head_dim]` -> `[batch, seq, hidden]`
    pub(crate) fn output(&self, out: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, h, s, hd] = out.dims();
        apply_linear(&self.o_proj, out.swap_dims(1, 2).reshape([b, s, h * hd]))
    }
}

/// Scaled dot-product attention of new queries over a shared prefix and each row's own keys.
/// Query i (of `seq`) sees own keys `0..=past + i` and the whole prefix.
///
/// # Shapes
/// - q: `[batch, heads, seq, head_dim]` (rotated)
/// - shared: `[1, kv_heads, prefix, head_dim]` keys and values
/// - own_k, own_v: `[batch, kv_heads, past + seq, head_dim]`
/// - key_padding: `[batch, past + seq]`, true = masked
/// - returns `[batch, heads, seq, head_dim]`
pub fn attend<B: CustomGrad>(
    q: Tensor<B, 4>,
    shared: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    own_k: Tensor<B, 4>,
    own_v: Tensor<B, 4>,
    past: usize,
    key_padding: Option<Tensor<B, 2, Bool>>,
    options: AttentionOptions,
) -> Tensor<B, 4> {
    let [b, h, s, hd] = q.dims();
    let kvh = own_k.dims()[1];
    let t = own_k.dims()[2];
    let prefix = shared.as_ref().map_or(0, |(k, _)| k.dims()[2]);
    let rep = h / kvh;
    // Under autodiff the plain path keeps a few `[b, heads, queries, keys]` tensors per layer:
    // fine for short inputs, not for long ones. A backend with a fused kernel (the CPU's)
    // runs it at every length: it reads the grouped heads and strided views as they are.
    let autodiff = B::ad_enabled(&q.device());
    let fused_kernel = <B::Base as longrl_backends::Kernels>::has_fused_attention(q.dtype());
    let autodiff_flash = autodiff && (fused_kernel || b * h * s * (prefix + t) > options.chunk_threshold);
    let flash = options.kernel == AttentionKernel::Flash || (options.kernel == AttentionKernel::Auto && autodiff_flash);
    if flash {
        return attend_flash(q, shared, own_k, own_v, past, key_padding, options);
    }
    if options.kernel == AttentionKernel::Auto && !B::ad_enabled(&q.device()) {
        // Inference: the backend's fused kernel, when it has one.
        let vjp = flash_vjp(past, shared.is_some(), key_padding.clone(), options);
        let inputs = AttentionInputs { q: q.clone(), own_k: own_k.clone(), own_v: own_v.clone(), shared: shared.clone() };
        if let Some((out, _)) = vjp.fused(&inputs) {
            return out;
        }
    }
    if options.kernel == AttentionKernel::Auto && shared.is_none() && key_padding.is_none() {
        return attend_fused(q, own_k, own_v, rep);
    }
    // Heads that share a kv head sit next to each other: fold them into the row dimension.
    let qg = q.mul_scalar(1.0 / (hd as f64).sqrt()).reshape([b, kvh, rep * s, hd]); // [b, kvh, rep*s, hd]
    let chunked = match options.kernel {
        AttentionKernel::Chunked => true,
        AttentionKernel::Plain => false,
        AttentionKernel::Auto | AttentionKernel::Flash => s * (prefix + t) > options.chunk_threshold,
    };
    let out = if chunked {
        attend_chunked(qg, shared, own_k, own_v, past, key_padding, rep, options)
    } else {
        attend_plain(qg, shared, own_k, own_v, past, key_padding, rep)
    };
    out.reshape([b, h, s, hd])
}

/// The custom operation of [`crate::model::flash`] for one call.
fn flash_vjp<B: Backend>(past: usize, shared: bool, key_padding: Option<Tensor<B, 2, Bool>>, options: AttentionOptions) -> AttentionVjp {
    let key_padding = key_padding.map(|padding| {
        let [rows, keys] = padding.dims();
        (padding.into_data().convert::<bool>().into_vec::<bool>().unwrap_or_default(), [rows, keys])
    });
    AttentionVjp { past, shared, key_padding, key_chunk: options.key_chunk, query_chunk: options.query_chunk }
}

/// [`attend`] through the custom operation of [`crate::model::flash`].
fn attend_flash<B: CustomGrad>(
    q: Tensor<B, 4>,
    shared: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    own_k: Tensor<B, 4>,
    own_v: Tensor<B, 4>,
    past: usize,
    key_padding: Option<Tensor<B, 2, Bool>>,
    options: AttentionOptions,
) -> Tensor<B, 4> {
    let vjp = flash_vjp(past, shared.is_some(), key_padding, options);
    let mut inputs = vec![q.into_primitive().tensor(), own_k.into_primitive().tensor(), own_v.into_primitive().tensor()];
    if let Some((k, v)) = shared {
        inputs.push(k.into_primitive().tensor());
        inputs.push(v.into_primitive().tensor());
    }
    Tensor::from_primitive(TensorPrimitive::Float(B::custom(vjp, inputs)))
}

/// Burn's fused attention over one segment of keys, causal aligned to the end (query i of
/// `seq` sees keys `..= past + i`). Key/value heads are repeated for grouped queries.
///
/// # Shapes
/// - q: `[b, heads, seq, hd]`; k, v: `[b, kv_heads, past + seq, hd]` -> `[b, heads, seq, hd]`
fn attend_fused<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    let (k, v) = if rep > 1 { (repeat_heads(k, rep), repeat_heads(v, rep)) } else { (k, v) };
    let options = burn::tensor::ops::AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
    burn::tensor::module::attention(q, k, v, None, None, options)
}

/// `[b, kv_heads, t, hd]` -> `[b, kv_heads * rep, t, hd]`, each kv head repeated for its
/// group of query heads (head j uses kv head j / rep).
fn repeat_heads<B: Backend>(x: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    let [b, kvh, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, kvh, rep, t, hd]).reshape([b, kvh * rep, t, hd])
}

/// Query rows `[b, kvh, rows, hd]` against a batch-1 prefix, as one product per kv head
/// (the prefix is read once for all rows of all samples).
///
/// # Shapes
/// - qg: `[b, kvh, rows, hd]`; keys: `[1, kvh, p, hd]`; returns `[b, kvh, rows, p]`
pub(crate) fn scores_shared<B: Backend>(qg: Tensor<B, 4>, keys: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, kvh, rows, hd] = qg.dims();
    let p = keys.dims()[2];
    let folded = qg.swap_dims(0, 1).reshape([1, kvh, b * rows, hd]); // [1, kvh, b*rows, hd]
    folded.matmul(keys.transpose()).reshape([kvh, b, rows, p]).swap_dims(0, 1) // [b, kvh, rows, p]
}

/// Weights `[b, kvh, rows, p]` times a batch-1 prefix's values `[1, kvh, p, hd]`.
pub(crate) fn weighted_shared<B: Backend>(weights: Tensor<B, 4>, values: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, kvh, rows, p] = weights.dims();
    let hd = values.dims()[3];
    let folded = weights.swap_dims(0, 1).reshape([1, kvh, b * rows, p]);
    folded.matmul(values).reshape([kvh, b, rows, hd]).swap_dims(0, 1) // [b, kvh, rows, hd]
}

/// Masks own-key scores: causal (query i sees keys up to `past + q_start + i`) and padding.
///
/// # Shapes
/// - scores: `[b, kvh, rep*rows, keys]` for query rows `q_start..q_start+rows` and own
///   keys `k_start..k_start+keys`; key_padding: `[b, all own keys]`
pub(crate) fn mask_own<B: Backend>(
    scores: Tensor<B, 4>,
    rep: usize,
    past: usize,
    q_start: usize,
    k_start: usize,
    key_padding: Option<&Tensor<B, 2, Bool>>,
) -> Tensor<B, 4> {
    let [b, kvh, rows_all, keys] = scores.dims();
    let rows = rows_all / rep;
    let device = scores.device();
    let offset = (past + q_start) as i64 - k_start as i64;
    if key_padding.is_none() && (keys as i64 - 1) <= offset {
        // Every key is at or before the first query's position (e.g. one decode step):
        // nothing to mask.
        return scores;
    }
    // True where key column > row + offset: a future key.
    let mut mask = Tensor::<B, 2, Bool>::tril_mask([rows, keys], offset, &device).reshape([1, 1, rows, keys]);
    if let Some(padding) = key_padding {
        let [pb, pk] = padding.dims();
        let block = padding.clone().slice([0..pb, k_start..(k_start + keys).min(pk)]).reshape([pb, 1, 1, keys]);
        mask = mask.expand([b, 1, rows, keys]).bool_or(block.expand([b, 1, rows, keys]));
    }
    let mask = mask.unsqueeze_dim::<5>(2).expand([b, kvh, rep, rows, keys]); // [b, kvh, rep, rows, keys]
    scores.reshape([b, kvh, rep, rows, keys]).mask_fill(mask, MASKED).reshape([b, kvh, rows_all, keys])
}

fn attend_plain<B: Backend>(
    qg: Tensor<B, 4>,
    shared: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    own_k: Tensor<B, 4>,
    own_v: Tensor<B, 4>,
    past: usize,
    key_padding: Option<Tensor<B, 2, Bool>>,
    rep: usize,
) -> Tensor<B, 4> {
    let t = own_k.dims()[2];
    let own_scores = mask_own(qg.clone().matmul(own_k.transpose()), rep, past, 0, 0, key_padding.as_ref()); // [b, kvh, rows, t]
    match shared {
        None => to_dtype(softmax(to_f32(own_scores), 3), own_v.dtype()).matmul(own_v),
        Some((sk, sv)) => {
            let p = sk.dims()[2];
            let shared_scores = scores_shared(qg, sk); // [b, kvh, rows, p]
            // The softmax in f32 (the scores are bf16 under mixed precision).
            let weights = softmax(to_f32(Tensor::cat(vec![shared_scores, own_scores], 3)), 3); // [b, kvh, rows, p+t]
            let weights = to_dtype(weights, sv.dtype());
            let [b, kvh, rows, _] = weights.dims();
            let w_shared = weights.clone().slice([0..b, 0..kvh, 0..rows, 0..p]);
            let w_own = weights.slice([0..b, 0..kvh, 0..rows, p..p + t]);
            weighted_shared(w_shared, sv) + w_own.matmul(own_v)
        }
    }
}

/// Online-softmax attention over key blocks, one query chunk at a time: memory per step is
/// `query_chunk x key_chunk` scores, never `seq x seq`. Key blocks wholly in a query chunk's
/// future are skipped.
#[allow(clippy::too_many_arguments)]
fn attend_chunked<B: Backend>(
    qg: Tensor<B, 4>,
    shared: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    own_k: Tensor<B, 4>,
    own_v: Tensor<B, 4>,
    past: usize,
    key_padding: Option<Tensor<B, 2, Bool>>,
    rep: usize,
    options: AttentionOptions,
) -> Tensor<B, 4> {
    let [b, kvh, rows_all, hd] = qg.dims();
    let s = rows_all / rep;
    let t = own_k.dims()[2];
    let device = qg.device();
    let qc_size = options.query_chunk.max(1);
    let kc_size = options.key_chunk.max(1);
    let q5 = qg.reshape([b, kvh, rep, s, hd]);
    let mut outputs = Vec::new();
    let mut q_start = 0;
    while q_start < s {
        let q_end = (q_start + qc_size).min(s);
        let rows = q_end - q_start;
        let qc = q5.clone().slice([0..b, 0..kvh, 0..rep, q_start..q_end, 0..hd]).reshape([b, kvh, rep * rows, hd]);
        let mut state = OnlineSoftmax::new(b, kvh, rep * rows, hd, own_v.dtype(), &device);
        if let Some((sk, sv)) = &shared {
            let p = sk.dims()[2];
            let mut k_start = 0;
            while k_start < p {
                let k_end = (k_start + kc_size).min(p);
                let kb = sk.clone().slice([0..1, 0..kvh, k_start..k_end, 0..hd]);
                let vb = sv.clone().slice([0..1, 0..kvh, k_start..k_end, 0..hd]);
                let scores = scores_shared(qc.clone(), kb);
                state.update(scores, |w| weighted_shared(w, vb));
                k_start = k_end;
            }
        }
        // Own keys after `past + q_end - 1` are in every row's future.
        let visible = (past + q_end).min(t);
        let mut k_start = 0;
        while k_start < visible {
            let k_end = (k_start + kc_size).min(visible);
            let kb = own_k.clone().slice([0..b, 0..kvh, k_start..k_end, 0..hd]);
            let vb = own_v.clone().slice([0..b, 0..kvh, k_start..k_end, 0..hd]);
            let scores = mask_own(qc.clone().matmul(kb.transpose()), rep, past, q_start, k_start, key_padding.as_ref());
            state.update(scores, |w| w.matmul(vb));
            k_start = k_end;
        }
        outputs.push(state.finish().reshape([b, kvh, rep, rows, hd]));
        q_start = q_end;
    }
    Tensor::cat(outputs, 3).reshape([b, kvh, rows_all, hd])
}

/// Running max, normalizer and weighted sum of one query chunk's online softmax, in f32
/// whatever the inputs' dtype.
struct OnlineSoftmax<B: Backend> {
    max: Tensor<B, 4>,  // [b, kvh, rows, 1]
    norm: Tensor<B, 4>, // [b, kvh, rows, 1]
    acc: Tensor<B, 4>,  // [b, kvh, rows, hd]
    /// The values' dtype (bf16 under mixed precision).
    dtype: burn::tensor::DType,
}

impl<B: Backend> OnlineSoftmax<B> {
    fn new(b: usize, kvh: usize, rows: usize, hd: usize, dtype: burn::tensor::DType, device: &B::Device) -> Self {
        Self {
            max: Tensor::full([b, kvh, rows, 1], MASKED, device),
            norm: Tensor::zeros([b, kvh, rows, 1], device),
            acc: Tensor::zeros([b, kvh, rows, hd], device),
            dtype,
        }
    }

    /// Folds in one block of scores `[b, kvh, rows, keys]`; `weigh` multiplies weights by
    /// the block's values.
    fn update(&mut self, scores: Tensor<B, 4>, weigh: impl FnOnce(Tensor<B, 4>) -> Tensor<B, 4>) {
        let scores = to_f32(scores);
        let block_max = scores.clone().max_dim(3);
        let new_max = self.max.clone().max_pair(block_max);
        let correction = (self.max.clone() - new_max.clone()).exp();
        let weights = (scores - new_max.clone()).exp(); // [b, kvh, rows, keys]
        self.norm = self.norm.clone() * correction.clone() + weights.clone().sum_dim(3);
        self.acc = self.acc.clone() * correction + to_f32(weigh(to_dtype(weights, self.dtype)));
        self.max = new_max;
    }

    fn finish(self) -> Tensor<B, 4> {
        to_dtype(self.acc / self.norm, self.dtype)
    }
}
