//! The LM head over long responses: log-probabilities of given tokens and the entropy of
//! each predicted distribution, computed over chunks of positions so that `[positions,
//! vocab]` logits never exist for a whole response (a 10K-token response over a 152K
//! vocabulary would be 6 GB in f32). Under autodiff it is one custom operation
//! ([`TokenScoresVjp`]) whose backward recomputes each chunk's logits; the entropy's
//! gradient is skipped when nothing asks for it.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use longrl_backends::Vjp;

use crate::model::flash::{primitive, tensor};
use crate::model::precision::{to_dtype, to_f32};

/// Logits elements of one chunk (about 64 MB in f32).
const CHUNK_ELEMENTS: usize = 16 << 20;

/// Log-probability of each position's target token and the entropy of its distribution,
/// under `softmax(logits / temperature)`. Inputs: the final hidden states `[n, d]` and the
/// head weight (`[d, vocab]` for an LM head, `[vocab, d]` for a head tied to the
/// embedding). Output `[n, 2]`: log-prob, entropy.
#[derive(Debug, Clone)]
pub struct TokenScoresVjp {
    /// One target token per position.
    pub targets: Vec<i64>,
    pub temperature: f32,
    /// The weight is the embedding `[vocab, d]` (logits = h E^T).
    pub tied: bool,
    /// Whether the entropy column's gradient is used (the loss has an entropy term).
    pub entropy_grad: bool,
}

/// One chunk's scaled logits and their softmax pieces.
struct ChunkLogits<B: Backend> {
    /// `log softmax(logits / T)`, `[rows, vocab]`.
    log_probs: Tensor<B, 2>,
    /// `[rows, 1]` target ids.
    targets: Tensor<B, 2, Int>,
}

impl TokenScoresVjp {
    fn vocab<B: Backend>(&self, weight: &Tensor<B, 2>) -> usize {
        let [a, b] = weight.dims();
        if self.tied { a } else { b }
    }

    /// Row ranges of the chunks.
    fn chunks(&self, n: usize, vocab: usize) -> Vec<(usize, usize)> {
        let rows = (CHUNK_ELEMENTS / vocab.max(1)).max(1);
        (0..n).step_by(rows).map(|start| (start, (start + rows).min(n))).collect()
    }

    /// The logits in f32: the product runs in the weights' dtype (bf16 under mixed
    /// precision), the softmax and log-probs that follow in f32.
    fn logits<B: Backend>(&self, hidden: Tensor<B, 2>, weight: &Tensor<B, 2>) -> Tensor<B, 2> {
        let logits = if self.tied { hidden.matmul(weight.clone().transpose()) } else { hidden.matmul(weight.clone()) };
        let logits = to_f32(logits);
        if (self.temperature - 1.0).abs() > f32::EPSILON { logits.div_scalar(self.temperature) } else { logits }
    }

    fn chunk<B: Backend>(&self, hidden: &Tensor<B, 2>, weight: &Tensor<B, 2>, span: (usize, usize)) -> ChunkLogits<B> {
        let [_, d] = hidden.dims();
        let (start, end) = span;
        let logits = self.logits(hidden.clone().slice([start..end, 0..d]), weight);
        let log_probs = burn::tensor::activation::log_softmax(logits, 1);
        let ids = TensorData::new(self.targets[start..end].to_vec(), [end - start, 1]);
        ChunkLogits { log_probs, targets: Tensor::from_data(ids, &hidden.device()) }
    }
}

impl<B: Backend> Vjp<B> for TokenScoresVjp {
    type Saved = ();

    fn forward(&self, inputs: &[FloatTensor<B>]) -> (FloatTensor<B>, ()) {
        let (hidden, weight) = (tensor::<B, 2>(&inputs[0]), tensor::<B, 2>(&inputs[1]));
        let mut out = Vec::new();
        for span in self.chunks(hidden.dims()[0], self.vocab(&weight)) {
            let ChunkLogits { log_probs, targets } = self.chunk(&hidden, &weight, span);
            let picked = log_probs.clone().gather(1, targets); // [rows, 1]
            let entropy = (log_probs.clone().exp() * log_probs).sum_dim(1).neg(); // [rows, 1]
            out.push(Tensor::cat(vec![picked, entropy], 1));
        }
        (primitive(Tensor::cat(out, 0)), ())
    }

    /// Per chunk, with p = softmax(z), z = logits / T, g = the output's gradient:
    /// d z = g_logp (onehot(target) - p) - g_entropy p (log p + H); the logits' gradient is
    /// d z / T, which gives the hidden states' and the weight's.
    fn backward(&self, inputs: &[FloatTensor<B>], _: (), output_grad: FloatTensor<B>, wanted: &[bool]) -> Vec<Option<FloatTensor<B>>> {
        let (hidden, weight) = (tensor::<B, 2>(&inputs[0]), tensor::<B, 2>(&inputs[1]));
        let grad = to_f32(tensor::<B, 2>(&output_grad)); // [n, 2]
        let dtype = weight.dtype();
        let [n, d] = hidden.dims();
        let mut d_hidden = Vec::new();
        let mut d_weight = Tensor::<B, 2>::zeros(weight.dims(), &weight.device());
        for (start, end) in self.chunks(n, self.vocab(&weight)) {
            let ChunkLogits { log_probs, targets } = self.chunk(&hidden, &weight, (start, end));
            let g = grad.clone().slice([start..end, 0..2]);
            let g_logp = g.clone().slice([0..end - start, 0..1]); // [rows, 1]
            let probs = log_probs.clone().exp();
            let mut d_z = probs.clone() * g_logp.clone().neg();
            if self.entropy_grad {
                let g_entropy = g.slice([0..end - start, 1..2]);
                let entropy = (probs.clone() * log_probs.clone()).sum_dim(1).neg(); // [rows, 1]
                d_z = d_z - probs * (log_probs + entropy) * g_entropy;
            }
            let d_z = d_z.scatter(1, targets, g_logp, IndexingUpdateOp::Add);
            let d_logits = if (self.temperature - 1.0).abs() > f32::EPSILON { d_z.div_scalar(self.temperature) } else { d_z };
            let d_logits = to_dtype(d_logits, dtype);
            let h = hidden.clone().slice([start..end, 0..d]);
            if self.tied {
                d_hidden.push(d_logits.clone().matmul(weight.clone())); // [rows, d]
                d_weight = d_weight + to_f32(d_logits.transpose().matmul(h)); // [vocab, d]
            } else {
                d_hidden.push(d_logits.clone().matmul(weight.clone().transpose()));
                d_weight = d_weight + to_f32(h.transpose().matmul(d_logits)); // [d, vocab]
            }
        }
        vec![wanted[0].then(|| primitive(Tensor::cat(d_hidden, 0))), wanted[1].then(|| primitive(to_dtype(d_weight, dtype)))]
    }
}
