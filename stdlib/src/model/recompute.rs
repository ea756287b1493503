//! Activation recomputation per decoder layer (gradient checkpointing): a whole pre-norm
//! decoder layer (RMSNorm, grouped-query attention with RoPE, SwiGLU MLP) as one custom
//! autodiff operation ([`LayerVjp`]) that keeps only its input; its backward runs the layer
//! forward again and applies the layer's hand-written gradient. [`KvVjp`] gives a layer's
//! keys and values the same way, for a prompt whose keys later responses attend to.
//!
//! Parameters use Burn's layout (a Linear weight is `[in, out]`). The gradients are tested
//! against autodiff of the plain layer.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use longrl_backends::{Kernels, Vjp};

use crate::model::flash::{AttentionGrads, AttentionInputs, AttentionVjp, primitive, tensor};
use crate::model::fused;
use crate::model::precision::{to_dtype, to_f32};

/// The shape of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// q, k and v projections have biases (Qwen2).
    pub qkv_bias: bool,
    /// The output projection has a bias.
    pub o_bias: bool,
}

/// The index of each input of [`LayerVjp`] and [`KvVjp`]. Inputs are: `x`, `cos`, `sin`,
/// the layer's weights, then the biases it has, then (layer only) the shared prefix.
#[derive(Debug, Clone, Copy)]
struct Slots {
    bq: Option<usize>,
    bk: Option<usize>,
    bv: Option<usize>,
    bo: Option<usize>,
    shared: Option<usize>,
}

const X: usize = 0;
const COS: usize = 1;
const SIN: usize = 2;
const NORM1: usize = 3;
const WQ: usize = 4;
const WK: usize = 5;
const WV: usize = 6;
const WO: usize = 7;
const NORM2: usize = 8;
const WGATE: usize = 9;
const WUP: usize = 10;
const WDOWN: usize = 11;
/// Inputs of a layer before its optional ones.
pub const LAYER_FIXED_INPUTS: usize = 12;

impl Slots {
    fn new(shape: &LayerShape, first_optional: usize, shared: bool) -> Self {
        let mut next = first_optional;
        let mut take = |present: bool| {
            present.then(|| {
                next += 1;
                next - 1
            })
        };
        let (bq, bk, bv) = (take(shape.qkv_bias), take(shape.qkv_bias), take(shape.qkv_bias));
        let bo = take(shape.o_bias);
        let shared = take(shared);
        Self { bq, bk, bv, bo, shared }
    }
}

// ---------------------------------------------------------------------------------------
// Building blocks: forward and backward of the layer's parts.
// ---------------------------------------------------------------------------------------

/// RMSNorm of rows `[n, d]` (see [`fused::rms_norm`]).
fn rms_norm<B: Kernels>(x: Tensor<B, 2>, gamma: &FloatTensor<B>, eps: f64) -> Tensor<B, 2> {
    tensor(&fused::rms_norm_forward::<B>(&primitive(x), gamma, eps))
}

/// The gradients of [`rms_norm`]'s input and gamma.
fn rms_norm_backward<B: Kernels>(x: Tensor<B, 2>, gamma: &FloatTensor<B>, eps: f64, d_y: Tensor<B, 2>) -> (Tensor<B, 2>, FloatTensor<B>) {
    let (d_x, d_gamma) = fused::rms_norm_backward::<B>(&primitive(x), gamma, eps, &primitive(d_y));
    (tensor(&d_x), d_gamma)
}

/// `x W (+ b)`.
fn linear<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    let y = x.matmul(weight);
    match bias {
        Some(bias) => y + bias.unsqueeze(),
        None => y,
    }
}

/// The gradients of [`linear`]'s weight and bias; the input's is `d_y W^T`.
fn linear_param_grads<B: Backend>(x: Tensor<B, 2>, d_y: Tensor<B, 2>, bias: bool) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
    let d_bias = bias.then(|| to_dtype(to_f32(d_y.clone()).sum_dim(0), d_y.dtype()).squeeze_dim(0));
    (x.transpose().matmul(d_y), d_bias)
}

/// `[n, heads * hd]` (token-major) -> `[b, heads, s, hd]`.
fn split_heads<B: Backend>(x: Tensor<B, 2>, b: usize, s: usize, heads: usize) -> Tensor<B, 4> {
    let [_, width] = x.dims();
    x.reshape([b, s, heads, width / heads]).swap_dims(1, 2)
}

/// `[b, heads, s, hd]` -> `[n, heads * hd]`.
fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 2> {
    let [b, h, s, hd] = x.dims();
    x.swap_dims(1, 2).reshape([b * s, h * hd])
}

// ---------------------------------------------------------------------------------------
// The layer.
// ---------------------------------------------------------------------------------------

/// One decoder layer, recomputed in the backward. Inputs (see [`Slots`]): `x`
/// `[b, s, d]`, `cos`, `sin` `[b, 1, s, hd]`, the norm and projection weights, the biases,
/// and with `shared`, the prefix keys and values `[1, kv_heads, p, hd]`. Output `[b, s, d]`.
#[derive(Debug, Clone)]
pub struct LayerVjp {
    pub shape: LayerShape,
    /// Whether the last two inputs are a shared prefix.
    pub shared: bool,
    /// Keys per attention block.
    pub key_chunk: usize,
    /// Query rows per attention chunk at most.
    pub query_chunk: usize,
}

/// The intermediates of one layer forward, kept for its backward.
struct LayerActs<B: Backend> {
    x: Tensor<B, 2>,
    h1: Tensor<B, 2>,
    attention: AttentionInputs<B>,
    attention_out: Tensor<B, 4>,
    lse: Tensor<B, 5>,
    merged: Tensor<B, 2>,
    x1: Tensor<B, 2>,
    h2: Tensor<B, 2>,
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    act: Tensor<B, 2>,
    y: Tensor<B, 2>,
}

impl LayerVjp {
    fn slots(&self) -> Slots {
        Slots::new(&self.shape, LAYER_FIXED_INPUTS, self.shared)
    }

    fn attention(&self) -> AttentionVjp {
        AttentionVjp { past: 0, shared: self.shared, key_padding: None, key_chunk: self.key_chunk, query_chunk: self.query_chunk }
    }

    /// Runs the layer, keeping every intermediate.
    fn run<B: Kernels>(&self, inputs: &[FloatTensor<B>]) -> LayerActs<B> {
        let slots = self.slots();
        let bias = |slot: Option<usize>| slot.map(|i| tensor::<B, 1>(&inputs[i]));
        let LayerShape { heads, kv_heads, rms_norm_eps: eps, .. } = self.shape;
        let x3 = tensor::<B, 3>(&inputs[X]);
        let [b, s, d] = x3.dims();
        let (cos, sin) = (tensor::<B, 4>(&inputs[COS]), tensor::<B, 4>(&inputs[SIN]));
        let x = x3.reshape([b * s, d]);
        let h1 = rms_norm(x.clone(), &inputs[NORM1], eps);
        let q = split_heads(linear(h1.clone(), tensor(&inputs[WQ]), bias(slots.bq)), b, s, heads);
        let k = split_heads(linear(h1.clone(), tensor(&inputs[WK]), bias(slots.bk)), b, s, kv_heads);
        let v = split_heads(linear(h1.clone(), tensor(&inputs[WV]), bias(slots.bv)), b, s, kv_heads);
        let shared = slots.shared.map(|i| (tensor::<B, 4>(&inputs[i]), tensor::<B, 4>(&inputs[i + 1])));
        let attention = AttentionInputs {
            q: fused::rope_forward(q, cos.clone(), sin.clone()),
            own_k: fused::rope_forward(k, cos, sin),
            own_v: v,
            shared,
        };
        let (attention_out, lse) = self.attention().attend(&attention);
        let merged = merge_heads(attention_out.clone());
        let x1 = x.clone() + linear(merged.clone(), tensor(&inputs[WO]), bias(slots.bo));
        let h2 = rms_norm(x1.clone(), &inputs[NORM2], eps);
        let gate = h2.clone().matmul(tensor(&inputs[WGATE]));
        let up = h2.clone().matmul(tensor(&inputs[WUP]));
        let act = fused::swiglu_forward(gate.clone(), up.clone());
        let y = x1.clone() + act.clone().matmul(tensor(&inputs[WDOWN]));
        LayerActs { x, h1, attention, attention_out, lse, merged, x1, h2, gate, up, act, y }
    }

    /// The MLP half's gradients: of `x1` (through the MLP and its norm, without the
    /// residual), and of norm2, gate, up and down.
    fn mlp_backward<B: Kernels>(
        &self,
        inputs: &[FloatTensor<B>],
        acts: &LayerActs<B>,
        d_y: Tensor<B, 2>,
        grads: &mut [Option<FloatTensor<B>>],
    ) -> Tensor<B, 2> {
        grads[WDOWN] = Some(primitive(acts.act.clone().transpose().matmul(d_y.clone())));
        let d_act = d_y.matmul(tensor::<B, 2>(&inputs[WDOWN]).transpose()); // [n, inter]
        let (d_gate, d_up) = fused::swiglu_backward(acts.gate.clone(), acts.up.clone(), d_act);
        grads[WGATE] = Some(primitive(acts.h2.clone().transpose().matmul(d_gate.clone())));
        grads[WUP] = Some(primitive(acts.h2.clone().transpose().matmul(d_up.clone())));
        let d_h2 = d_gate.matmul(tensor::<B, 2>(&inputs[WGATE]).transpose()) + d_up.matmul(tensor::<B, 2>(&inputs[WUP]).transpose());
        let (d_x1, d_norm2) = rms_norm_backward(acts.x1.clone(), &inputs[NORM2], self.shape.rms_norm_eps, d_h2);
        grads[NORM2] = Some(d_norm2);
        d_x1
    }

    /// The attention half's gradients given `d_x1`: of `x` (through attention and its norm,
    /// without the residual), and of norm1, the projections and the shared prefix.
    fn attention_backward<B: Kernels>(
        &self,
        inputs: &[FloatTensor<B>],
        acts: &LayerActs<B>,
        d_x1: Tensor<B, 2>,
        grads: &mut [Option<FloatTensor<B>>],
    ) -> Tensor<B, 2> {
        let slots = self.slots();
        let [b, heads, s, _] = acts.attention_out.dims();
        let (d_wo, d_bo) = linear_param_grads(acts.merged.clone(), d_x1.clone(), slots.bo.is_some());
        grads[WO] = Some(primitive(d_wo));
        if let (Some(i), Some(g)) = (slots.bo, d_bo) {
            grads[i] = Some(primitive(g));
        }
        let d_merged = d_x1.matmul(tensor::<B, 2>(&inputs[WO]).transpose());
        let d_attention = split_heads(d_merged, b, s, heads);
        let AttentionGrads { q: d_q_rot, own_k: d_k_rot, own_v: d_v, shared } =
            self.attention().gradients(&acts.attention, acts.attention_out.clone(), acts.lse.clone(), d_attention);
        if let (Some(i), Some((k, v))) = (slots.shared, shared) {
            grads[i] = Some(primitive(k));
            grads[i + 1] = Some(primitive(v));
        }
        let (cos, sin) = (tensor::<B, 4>(&inputs[COS]), tensor::<B, 4>(&inputs[SIN]));
        let d_q = merge_heads(fused::rope_backward(d_q_rot, cos.clone(), sin.clone()));
        let d_k = merge_heads(fused::rope_backward(d_k_rot, cos, sin));
        let d_v = merge_heads(d_v);
        let mut d_h1 = acts.h1.zeros_like();
        for (d_out, weight, bias) in [(d_q, WQ, slots.bq), (d_k, WK, slots.bk), (d_v, WV, slots.bv)] {
            let (d_w, d_b) = linear_param_grads(acts.h1.clone(), d_out.clone(), bias.is_some());
            grads[weight] = Some(primitive(d_w));
            if let (Some(i), Some(g)) = (bias, d_b) {
                grads[i] = Some(primitive(g));
            }
            d_h1 = d_h1 + d_out.matmul(tensor::<B, 2>(&inputs[weight]).transpose());
        }
        let (d_x, d_norm1) = rms_norm_backward(acts.x.clone(), &inputs[NORM1], self.shape.rms_norm_eps, d_h1);
        grads[NORM1] = Some(d_norm1);
        d_x
    }
}

impl<B: Kernels> Vjp<B> for LayerVjp {
    type Saved = ();

    fn forward(&self, inputs: &[FloatTensor<B>]) -> (FloatTensor<B>, ()) {
        let [b, s, d] = tensor::<B, 3>(&inputs[X]).dims();
        (primitive(self.run::<B>(inputs).y.reshape([b, s, d])), ())
    }

    fn backward(&self, inputs: &[FloatTensor<B>], _: (), output_grad: FloatTensor<B>, _wanted: &[bool]) -> Vec<Option<FloatTensor<B>>> {
        let acts = self.run(inputs);
        let [b, s, d] = tensor::<B, 3>(&inputs[X]).dims();
        let d_y = tensor::<B, 3>(&output_grad).reshape([b * s, d]);
        let mut grads: Vec<Option<FloatTensor<B>>> = vec![None; inputs.len()];
        let d_x1 = d_y.clone() + self.mlp_backward(inputs, &acts, d_y, &mut grads);
        let d_x = d_x1.clone() + self.attention_backward(inputs, &acts, d_x1, &mut grads);
        grads[X] = Some(primitive(d_x.reshape([b, s, d])));
        grads
    }
}

// ---------------------------------------------------------------------------------------
// A layer's keys and values.
// ---------------------------------------------------------------------------------------

/// A layer's rotated keys and its values, `[b, 2 * kv_heads, s, hd]` (keys first), kept as
/// a function of the layer input only. Inputs: `x`, `cos`, `sin`, norm1, `wk`, `wv`, and
/// with biases `bk`, `bv`.
#[derive(Debug, Clone)]
pub struct KvVjp {
    pub shape: LayerShape,
}

/// Input slots of [`KvVjp`].
const KV_NORM: usize = 3;
const KV_WK: usize = 4;
const KV_WV: usize = 5;
const KV_BK: usize = 6;
const KV_BV: usize = 7;

impl KvVjp {
    /// The normed input, and keys and values before rotation.
    fn run<B: Kernels>(&self, inputs: &[FloatTensor<B>]) -> (Tensor<B, 2>, Tensor<B, 4>, Tensor<B, 4>) {
        let x3 = tensor::<B, 3>(&inputs[X]);
        let [b, s, d] = x3.dims();
        let h = rms_norm(x3.reshape([b * s, d]), &inputs[KV_NORM], self.shape.rms_norm_eps);
        let bias = |slot: usize| self.shape.qkv_bias.then(|| tensor::<B, 1>(&inputs[slot]));
        let k = split_heads(linear(h.clone(), tensor(&inputs[KV_WK]), bias(KV_BK)), b, s, self.shape.kv_heads);
        let v = split_heads(linear(h.clone(), tensor(&inputs[KV_WV]), bias(KV_BV)), b, s, self.shape.kv_heads);
        (h, k, v)
    }
}

impl<B: Kernels> Vjp<B> for KvVjp {
    type Saved = ();

    fn forward(&self, inputs: &[FloatTensor<B>]) -> (FloatTensor<B>, ()) {
        let (_, k, v) = self.run::<B>(inputs);
        let k = fused::rope_forward(k, tensor(&inputs[COS]), tensor(&inputs[SIN]));
        (primitive(Tensor::cat(vec![k, v], 1)), ())
    }

    fn backward(&self, inputs: &[FloatTensor<B>], _: (), output_grad: FloatTensor<B>, _wanted: &[bool]) -> Vec<Option<FloatTensor<B>>> {
        let (h, _, _) = self.run(inputs);
        let x3 = tensor::<B, 3>(&inputs[X]);
        let [b, s, d] = x3.dims();
        let kvh = self.shape.kv_heads;
        let d_out = tensor::<B, 4>(&output_grad); // [b, 2 kvh, s, hd]
        let [_, _, _, hd] = d_out.dims();
        let d_k_rot = d_out.clone().slice([0..b, 0..kvh, 0..s, 0..hd]);
        let d_v = merge_heads(d_out.slice([0..b, kvh..2 * kvh, 0..s, 0..hd]));
        let d_k = merge_heads(fused::rope_backward(d_k_rot, tensor(&inputs[COS]), tensor(&inputs[SIN])));
        let mut grads: Vec<Option<FloatTensor<B>>> = vec![None; inputs.len()];
        let mut d_h = h.zeros_like();
        for (d, weight, bias) in [(d_k, KV_WK, KV_BK), (d_v, KV_WV, KV_BV)] {
            let (d_w, d_b) = linear_param_grads(h.clone(), d.clone(), self.shape.qkv_bias);
            grads[weight] = Some(primitive(d_w));
            if let Some(g) = d_b {
                grads[bias] = Some(primitive(g));
            }
            d_h = d_h + d.matmul(tensor::<B, 2>(&inputs[weight]).transpose());
        }
        let (d_x, d_norm) = rms_norm_backward(x3.reshape([b * s, d]), &inputs[KV_NORM], self.shape.rms_norm_eps, d_h);
        grads[KV_NORM] = Some(d_norm);
        grads[X] = Some(primitive(d_x.reshape([b, s, d])));
        grads
    }
}
