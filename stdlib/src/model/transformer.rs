//! The decoder-only transformer shared by the Qwen2 and Llama families: token embedding,
//! pre-norm decoder layers (RMSNorm, grouped-query attention with RoPE, SwiGLU MLP), final
//! norm and a tied or untied LM head. Parameters are named and shaped as in Hugging Face
//! checkpoints (Linear weights are stored transposed, `[in, out]`, as Burn computes `x W`).

use burn::module::{Module, Param, ParamId};
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, Int, Tensor, TensorData, TensorPrimitive};
use longrl_backends::CustomGrad;

use crate::model::ModelError;
use crate::model::attention::{AttentionOptions, LayerKv, SelfAttention};
use crate::model::config::ModelConfig;
use crate::model::fused;
use crate::model::head::TokenScoresVjp;
use crate::model::precision::to_dtype;
use crate::model::recompute::{KvVjp, LayerShape, LayerVjp};
use crate::model::rope::Rope;

/// Where parameter values come from when a model is built: a checkpoint or an initializer.
pub trait WeightSource {
    /// The tensor named `name` (Hugging Face name and layout), which must have `shape`.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError>;
}

/// The SwiGLU feed-forward block.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: CustomGrad> Mlp<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = apply_linear(&self.gate_proj, x.clone()); // [b, s, inter]
        apply_linear(&self.down_proj, fused::swiglu(gate, apply_linear(&self.up_proj, x)))
    }
}

/// A linear layer over the last axis as one 2-D product. Burn's `Linear` on a `[b, s, in]`
/// input runs one product per batch row against the broadcast weight, each packing the
/// weight anew (and under autodiff, sums `b` weight-sized gradients): at decode time, with
/// one token in each of dozens of rows, that costs more than the product itself. Where the
/// backend asks for it (the CPU backend, for products too small for its matmul to thread
/// but large enough to gain: a decode step of many rows), the rows go in a few equal blocks
/// as one batched product against the broadcast weight, whose blocks run on separate threads.
///
/// # Shapes
/// - x: `[b, s, in]` -> `[b, s, out]`
pub(crate) fn apply_linear<B: CustomGrad>(linear: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, s, d] = x.dims();
    let rows = b * s;
    let weight = linear.weight.val(); // [in, out]
    let out = weight.dims()[1];
    let blocks = B::product_row_blocks(rows, d, out);
    if blocks > 1 {
        let y = x.reshape([blocks, rows / blocks, d]).matmul(weight.unsqueeze::<3>()); // [blocks, rows/blocks, out]
        let y = match &linear.bias {
            Some(bias) => y + bias.val().unsqueeze::<3>(),
            None => y,
        };
        return y.reshape([b, s, out]);
    }
    linear.forward(x.reshape([rows, d])).reshape([b, s, out]) // [rows, out] -> [b, s, out]
}

/// RMSNorm through the fused operation of [`fused::rms_norm`].
///
/// # Shapes
/// - x: `[.., hidden]` -> the same
fn normalize<B: CustomGrad, const D: usize>(norm: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    fused::rms_norm(x, norm.gamma.val(), norm.epsilon)
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: SelfAttention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

/// Whether training keeps each decoder layer's activations or recomputes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every activation for the backward (fastest, memory grows with the layers).
    #[default]
    None,
    /// Keep only each layer's input and recompute the layer in the backward (gradient
    /// checkpointing: about one more forward per step, activation memory of one layer).
    Layer,
}

fn float<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn from_float<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

impl<B: CustomGrad> DecoderLayer<B> {
    fn shape(&self) -> LayerShape {
        let a = &self.self_attn;
        LayerShape {
            heads: a.heads,
            kv_heads: a.kv_heads,
            head_dim: a.head_dim,
            rms_norm_eps: self.input_layernorm.epsilon,
            qkv_bias: a.q_proj.bias.is_some(),
            o_bias: a.o_proj.bias.is_some(),
        }
    }

    /// The layer's parameters in the order of [`LayerVjp`]'s inputs after `x`, `cos`, `sin`.
    fn parameters(&self) -> Vec<FloatTensor<B>> {
        let a = &self.self_attn;
        let mut out = vec![
            float(self.input_layernorm.gamma.val()),
            float(a.q_proj.weight.val()),
            float(a.k_proj.weight.val()),
            float(a.v_proj.weight.val()),
            float(a.o_proj.weight.val()),
            float(self.post_attention_layernorm.gamma.val()),
            float(self.mlp.gate_proj.weight.val()),
            float(self.mlp.up_proj.weight.val()),
            float(self.mlp.down_proj.weight.val()),
        ];
        for linear in [&a.q_proj, &a.k_proj, &a.v_proj] {
            out.extend(linear.bias.as_ref().map(|b| float(b.val())));
        }
        out.extend(a.o_proj.bias.as_ref().map(|b| float(b.val())));
        out
    }

    /// The layer as plain tensor ops (autodiff keeps every activation).
    #[allow(clippy::too_many_arguments)]
    fn forward_plain(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        kv: &mut LayerKv<B>,
        key_padding: Option<Tensor<B, 2, Bool>>,
        options: AttentionOptions,
        append: bool,
    ) -> Tensor<B, 3> {
        self.forward_with(x, |attention, normed| attention.forward(normed, cos, sin, kv, key_padding, options, append))
    }

    /// The layer with its attention computed by `attend` from the normed input (the plain
    /// path's cache, or a batch of several groups' caches).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`; `attend` maps `[batch, seq, hidden]` to the same
    pub(crate) fn forward_with(
        &self,
        x: Tensor<B, 3>,
        attend: impl FnOnce(&SelfAttention<B>, Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let attn = attend(&self.self_attn, normalize(&self.input_layernorm, x.clone()));
        let x = x + attn;
        x.clone() + self.mlp.forward(normalize(&self.post_attention_layernorm, x))
    }

    /// The layer as one recomputed operation; with `append`, its keys and values (also
    /// recomputed) go to the cache as the rows' own keys.
    fn forward_recomputed(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        kv: &mut LayerKv<B>,
        options: AttentionOptions,
        append: bool,
    ) -> Tensor<B, 3> {
        let shape = self.shape();
        let shared = kv.shared.clone();
        let mut inputs = vec![float(x.clone()), float(cos.clone()), float(sin.clone())];
        inputs.extend(self.parameters());
        if append {
            let a = &self.self_attn;
            let mut kv_inputs = vec![float(x), float(cos), float(sin), float(self.input_layernorm.gamma.val())];
            kv_inputs.push(float(a.k_proj.weight.val()));
            kv_inputs.push(float(a.v_proj.weight.val()));
            if shape.qkv_bias {
                kv_inputs.extend(a.k_proj.bias.as_ref().map(|b| float(b.val())));
                kv_inputs.extend(a.v_proj.bias.as_ref().map(|b| float(b.val())));
            }
            let keys_values: Tensor<B, 4> = from_float(B::custom(KvVjp { shape }, kv_inputs)); // [b, 2 kvh, s, hd]
            let [b, _, s, hd] = keys_values.dims();
            let kvh = shape.kv_heads;
            let k = keys_values.clone().slice([0..b, 0..kvh, 0..s, 0..hd]);
            let v = keys_values.slice([0..b, kvh..2 * kvh, 0..s, 0..hd]);
            kv.own = Some((k, v));
        }
        if let Some((k, v)) = shared.clone() {
            inputs.push(float(k));
            inputs.push(float(v));
        }
        let vjp = LayerVjp { shape, shared: shared.is_some(), key_chunk: options.key_chunk, query_chunk: options.query_chunk };
        from_float(B::custom(vjp, inputs))
    }
}

/// Keys and values of every layer (see [`LayerKv`]).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<LayerKv<B>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(layers: usize) -> Self {
        Self { layers: (0..layers).map(|_| LayerKv::default()).collect() }
    }

    /// Length of each row's own keys (same in every layer).
    pub fn own_len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::own_len)
    }

    pub fn shared_len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::shared_len)
    }

    /// Turns a batch-1 cache (a prompt just prefilled) into a prefix shared by any number of
    /// rows: the next forward may have any batch size and every row attends to it.
    pub fn into_shared(self) -> Result<Self, ModelError> {
        let layers = self
            .layers
            .into_iter()
            .map(|layer| {
                if layer.shared.is_some() {
                    return Err(ModelError::Invalid("the cache already has a shared prefix".into()));
                }
                match layer.own {
                    Some((k, v)) if k.dims()[0] == 1 => Ok(LayerKv { shared: Some((k, v)), own: None }),
                    Some(_) => Err(ModelError::Invalid("only a batch-1 cache can become a shared prefix".into())),
                    None => Ok(LayerKv::default()),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { layers })
    }

    /// Keeps only the given rows of each row's own keys (finished rows dropped).
    pub fn select_rows(&mut self, rows: Tensor<B, 1, Int>) {
        for layer in &mut self.layers {
            if let Some((k, v)) = layer.own.take() {
                layer.own = Some((k.select(0, rows.clone()), v.select(0, rows.clone())));
            }
        }
    }
}

/// A causal language model of the Qwen2 / Llama family.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub rope: Rope,
    #[module(skip)]
    pub attention: AttentionOptions,
    /// Activation recomputation under autodiff.
    #[module(skip)]
    pub recompute: Recompute,
}

/// What a forward pass needs besides the tokens.
#[derive(Debug, Clone)]
pub struct ForwardArgs<B: Backend> {
    /// Absolute positions of the new tokens, `[batch, seq]`.
    pub positions: Tensor<B, 2>,
    /// `[batch, own_len + seq]`, true where a key is padding (left-padded batches).
    pub key_padding: Option<Tensor<B, 2, Bool>>,
    /// Store the new keys and values in the cache.
    pub append: bool,
}

impl<B: Backend> ForwardArgs<B> {
    /// Positions `start..start+seq` for every row, no padding, cache appended.
    pub fn contiguous(batch: usize, start: usize, seq: usize, device: &B::Device) -> Self {
        let values: Vec<f32> = (0..batch).flat_map(|_| (start..start + seq).map(|p| p as f32)).collect();
        Self { positions: Tensor::from_data(TensorData::new(values, [batch, seq]), device), key_padding: None, append: true }
    }
}

impl<B: Backend> CausalLm<B> {
    /// Builds the model of `config`, reading every parameter from `source`.
    pub fn build(config: &ModelConfig, source: &mut dyn WeightSource, device: &B::Device) -> Result<Self, ModelError> {
        config.check().map_err(ModelError::Invalid)?;
        let (d, inter, vocab) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let (h, kvh, hd) = (config.num_attention_heads, config.kv_heads(), config.head_dim());
        let eps = config.rms_norm_eps;
        let embed = source.tensor("model.embed_tokens.weight", &[vocab, d])?;
        let embed_tokens = Embedding { weight: named_param("model.embed_tokens.weight", tensor2(embed, [vocab, d], device)) };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let self_attn = SelfAttention {
                q_proj: linear(source, &format!("{p}.self_attn.q_proj"), d, h * hd, config.qkv_bias(), device)?,
                k_proj: linear(source, &format!("{p}.self_attn.k_proj"), d, kvh * hd, config.qkv_bias(), device)?,
                v_proj: linear(source, &format!("{p}.self_attn.v_proj"), d, kvh * hd, config.qkv_bias(), device)?,
                o_proj: linear(source, &format!("{p}.self_attn.o_proj"), h * hd, d, config.o_bias(), device)?,
                heads: h,
                kv_heads: kvh,
                head_dim: hd,
            };
            layers.push(DecoderLayer {
                input_layernorm: rms_norm(source, &format!("{p}.input_layernorm"), d, eps, device)?,
                self_attn,
                post_attention_layernorm: rms_norm(source, &format!("{p}.post_attention_layernorm"), d, eps, device)?,
                mlp: Mlp {
                    gate_proj: linear(source, &format!("{p}.mlp.gate_proj"), d, inter, false, device)?,
                    up_proj: linear(source, &format!("{p}.mlp.up_proj"), d, inter, false, device)?,
                    down_proj: linear(source, &format!("{p}.mlp.down_proj"), inter, d, false, device)?,
                },
            });
        }
        let norm = rms_norm(source, "model.norm", d, eps, device)?;
        let lm_head = if config.tie_word_embeddings { None } else { Some(linear(source, "lm_head", d, vocab, false, device)?) };
        let (theta, scaling) = config.rope().map_err(ModelError::Invalid)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(hd, theta, scaling),
            attention: AttentionOptions::default(),
            recompute: Recompute::None,
        })
    }

    /// The same model with other attention chunking.
    pub fn with_attention(mut self, options: AttentionOptions) -> Self {
        self.attention = options;
        self
    }

    /// The same model with other activation recomputation (it matters under autodiff).
    pub fn with_recompute(mut self, recompute: Recompute) -> Self {
        self.recompute = recompute;
        self
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.weight.dims()[0]
    }

    pub fn device(&self) -> B::Device {
        self.embed_tokens.weight.device()
    }

    /// An empty cache for this model.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.layers.len())
    }

    /// Every parameter under its Hugging Face name and shape, in f32 row-major order.
    pub fn export(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut out = Vec::new();
        out.push(named("model.embed_tokens.weight", self.embed_tokens.weight.val()));
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push(named(&format!("{p}.input_layernorm.weight"), layer.input_layernorm.gamma.val()));
            let a = &layer.self_attn;
            for (name, lin) in [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)] {
                export_linear(&mut out, &format!("{p}.self_attn.{name}"), lin);
            }
            out.push(named(&format!("{p}.post_attention_layernorm.weight"), layer.post_attention_layernorm.gamma.val()));
            for (name, lin) in [("gate_proj", &layer.mlp.gate_proj), ("up_proj", &layer.mlp.up_proj), ("down_proj", &layer.mlp.down_proj)] {
                export_linear(&mut out, &format!("{p}.mlp.{name}"), lin);
            }
        }
        out.push(named("model.norm.weight", self.norm.gamma.val()));
        if let Some(head) = &self.lm_head {
            export_linear(&mut out, "lm_head", head);
        }
        out
    }
}

impl<B: CustomGrad> CausalLm<B> {
    /// Final hidden states of new tokens, attending to the cache (if any) and to each other.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn forward_hidden(&self, tokens: Tensor<B, 2, Int>, args: ForwardArgs<B>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        normalize(&self.norm, self.forward_layers(tokens, args, cache))
    }

    /// The residual stream after the last layer, before the final norm (apply
    /// [`CausalLm::final_norm`] to the positions that are needed).
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn forward_layers(&self, tokens: Tensor<B, 2, Int>, args: ForwardArgs<B>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        let mut x = self.embed_tokens.forward(tokens); // [b, s, d]
        // The rotation tables in the weights' dtype (bf16 under `precision: bf16-mixed`).
        let (cos, sin) = self.rope.tables(args.positions);
        let (cos, sin) = (to_dtype(cos, x.dtype()), to_dtype(sin, x.dtype()));
        let autodiff = B::ad_enabled(&x.device());
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let recompute = self.recompute == Recompute::Layer && autodiff && args.key_padding.is_none() && kv.own.is_none();
            x = if recompute {
                layer.forward_recomputed(x, cos.clone(), sin.clone(), kv, self.attention, args.append)
            } else {
                layer.forward_plain(x, cos.clone(), sin.clone(), kv, args.key_padding.clone(), self.attention, args.append)
            };
        }
        x
    }

    /// The final norm.
    pub fn final_norm(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        normalize(&self.norm, x)
    }

    /// Log-probability of each target and the entropy at each position, computed over
    /// chunks of positions (never `[positions, vocab]` at once), under
    /// `softmax(logits / temperature)`. `entropy_grad`: whether the entropy's gradient is
    /// needed (the loss has an entropy term).
    ///
    /// # Shapes
    /// - hidden: `[n, hidden]` (final, normed); targets: `n` ids -> two `[n]` tensors
    pub fn token_scores(
        &self,
        hidden: Tensor<B, 2>,
        targets: Vec<i64>,
        temperature: f32,
        entropy_grad: bool,
    ) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let [n, _] = hidden.dims();
        let (weight, tied) = match &self.lm_head {
            Some(head) => (head.weight.val(), false),
            None => (self.embed_tokens.weight.val(), true),
        };
        let vjp = TokenScoresVjp { targets, temperature, tied, entropy_grad };
        let scores: Tensor<B, 2> = from_float(B::custom(vjp, vec![float(hidden), float(weight)])); // [n, 2]
        let logprobs = scores.clone().slice([0..n, 0..1]).reshape([n]);
        let entropy = scores.slice([0..n, 1..2]).reshape([n]);
        (logprobs, entropy)
    }

    /// Logits of hidden states.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, hidden]` -> `[batch, seq, vocab]`
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => apply_linear(head, hidden),
            None => {
                // h E^T: the product reads the embedding through its transposed strides (no
                // copy) and writes the logits contiguous, so the reshape copies nothing.
                let [b, s, d] = hidden.dims();
                let weight = self.embed_tokens.weight.val(); // [vocab, d]
                let vocab = weight.dims()[0];
                hidden.reshape([b * s, d]).matmul(weight.transpose()).reshape([b, s, vocab]) // [b, s, vocab]
            }
        }
    }

    /// Logits of every position of a full sequence without a cache.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]` -> `[batch, seq, vocab]`
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, s] = tokens.dims();
        let mut cache = self.new_cache();
        let mut args = ForwardArgs::contiguous(b, 0, s, &tokens.device());
        args.append = false;
        let hidden = self.forward_hidden(tokens, args, &mut cache);
        self.logits(hidden)
    }
}

fn named<B: Backend, const D: usize>(name: &str, tensor: Tensor<B, D>) -> (String, Vec<usize>, Vec<f32>) {
    let shape = tensor.dims().to_vec();
    let values = tensor.into_data().convert::<f32>().into_vec::<f32>().unwrap_or_default();
    (name.to_string(), shape, values)
}

/// A Linear's weight back in HF layout `[out, in]`, and its bias.
fn export_linear<B: Backend>(out: &mut Vec<(String, Vec<usize>, Vec<f32>)>, prefix: &str, linear: &Linear<B>) {
    let weight = linear.weight.val().transpose(); // [out, in]
    out.push(named(&format!("{prefix}.weight"), weight));
    if let Some(bias) = &linear.bias {
        out.push(named(&format!("{prefix}.bias"), bias.val()));
    }
}

/// Row-major `[rows, cols]` to row-major `[cols, rows]`, so parameters are contiguous.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// A trainable parameter whose id is derived from its Hugging Face name (FNV-1a), so that
/// optimizer state saved against one load of a checkpoint applies to the next load.
fn named_param<B: Backend, const D: usize>(name: &str, value: Tensor<B, D>) -> Param<Tensor<B, D>> {
    let id = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3));
    Param::initialized(ParamId::from(id), value.require_grad())
}

fn tensor2<B: Backend>(values: Vec<f32>, shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn tensor1<B: Backend>(values: Vec<f32>, len: usize, device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(values, [len]), device)
}

/// A Linear from HF `{prefix}.weight` `[out, in]` (and `.bias`), stored as Burn's `[in, out]`.
fn linear<B: Backend>(
    source: &mut dyn WeightSource,
    prefix: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Linear<B>, ModelError> {
    let weight = source.tensor(&format!("{prefix}.weight"), &[d_out, d_in])?;
    let weight = tensor2::<B>(transpose(&weight, d_out, d_in), [d_in, d_out], device); // [in, out]
    let bias = if bias {
        let name = format!("{prefix}.bias");
        Some(named_param(&name, tensor1(source.tensor(&name, &[d_out])?, d_out, device)))
    } else {
        None
    };
    Ok(Linear { weight: named_param(&format!("{prefix}.weight"), weight), bias })
}

fn rms_norm<B: Backend>(
    source: &mut dyn WeightSource,
    prefix: &str,
    d: usize,
    eps: f64,
    device: &B::Device,
) -> Result<RmsNorm<B>, ModelError> {
    let gamma = source.tensor(&format!("{prefix}.weight"), &[d])?;
    Ok(RmsNorm { gamma: named_param(&format!("{prefix}.weight"), tensor1(gamma, d, device)), epsilon: eps })
}

#[cfg(test)]
mod tests {
    use burn::nn::LinearConfig;
    use burn::tensor::{Tensor, TensorData};
    use longrl_backends::{Cpu, Kernels};

    use super::apply_linear;

    /// A decode step's product split into row blocks (two threads: 64 rows of 128 -> 384,
    /// as in the tiny preset) equals the single product, with and without a bias.
    #[test]
    fn a_product_split_into_row_blocks_equals_the_single_product() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a thread pool");
        pool.install(|| {
            assert_eq!(Cpu::product_row_blocks(64, 128, 384), 2, "the shape must take the split path");
            let device = Default::default();
            let values: Vec<f32> = (0..64 * 128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let x = Tensor::<Cpu, 3>::from_data(TensorData::new(values, [8, 8, 128]), &device);
            for bias in [false, true] {
                let linear = LinearConfig::new(128, 384).with_bias(bias).init::<Cpu>(&device);
                let split: Vec<f32> = apply_linear(&linear, x.clone()).into_data().into_vec().expect("f32");
                let single: Vec<f32> = linear.forward(x.clone().reshape([64, 128])).into_data().into_vec().expect("f32");
                assert_eq!(split.len(), single.len());
                let worst = split.iter().zip(&single).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst < 1e-5, "bias {bias}: the split product differs by {worst}");
            }
        });
    }
}
