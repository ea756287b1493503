//! The LM head over long responses: log-probabilities of given tokens and the entropy of
//! each predicted distribution, computed over chunks of positions so that `[positions,
//! vocab]` logits never exist for a whole response (a 10K-token response over a 152K
//! vocabulary would be 6 GB in f32). Under autodiff it is one custom operation
//! ([`TokenScoresVjp`]) whose backward recomputes each chunk's logits; the entropy's
//! gradient is skipped when nothing asks for it.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use longrl_backends::{Kernels, Vjp};

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

    /// The logits of rows `span` in f32, before the temperature: the product runs in the
    /// weights' dtype (bf16 under mixed precision), what follows in f32.
    fn logits<B: Backend>(&self, hidden: &Tensor<B, 2>, weight: &Tensor<B, 2>, (start, end): (usize, usize)) -> Tensor<B, 2> {
        let [_, d] = hidden.dims();
        let hidden = hidden.clone().slice([start..end, 0..d]);
        to_f32(if self.tied { hidden.matmul(weight.clone().transpose()) } else { hidden.matmul(weight.clone()) })
    }

    /// The log-softmax of logits over the temperature, with the targets, in tensor ops.
    fn log_probs<B: Backend>(&self, logits: Tensor<B, 2>, (start, end): (usize, usize)) -> ChunkLogits<B> {
        let scaled = if (self.temperature - 1.0).abs() > f32::EPSILON { logits.div_scalar(self.temperature) } else { logits };
        let ids = TensorData::new(self.targets[start..end].to_vec(), [end - start, 1]);
        let targets = Tensor::from_data(ids, &scaled.device());
        ChunkLogits { log_probs: burn::tensor::activation::log_softmax(scaled, 1), targets }
    }

    /// `[rows, 2]` scores of a chunk's logits in tensor ops.
    fn scores_ops<B: Backend>(&self, logits: Tensor<B, 2>, span: (usize, usize)) -> Tensor<B, 2> {
        let ChunkLogits { log_probs, targets } = self.log_probs(logits, span);
        let picked = log_probs.clone().gather(1, targets); // [rows, 1]
        let entropy = (log_probs.clone().exp() * log_probs).sum_dim(1).neg(); // [rows, 1]
        Tensor::cat(vec![picked, entropy], 1)
    }

    /// The gradient of a chunk's logits (f32) given its scores' gradient `g` `[rows, 2]`, in
    /// tensor ops.
    fn logits_grad_ops<B: Backend>(&self, logits: Tensor<B, 2>, span: (usize, usize), g: Tensor<B, 2>) -> Tensor<B, 2> {
        let rows = span.1 - span.0;
        let ChunkLogits { log_probs, targets } = self.log_probs(logits, span);
        let g_logp = g.clone().slice([0..rows, 0..1]); // [rows, 1]
        let probs = log_probs.clone().exp();
        let mut d_z = probs.clone() * g_logp.clone().neg();
        if self.entropy_grad {
            let g_entropy = g.slice([0..rows, 1..2]);
            let entropy = (probs.clone() * log_probs.clone()).sum_dim(1).neg(); // [rows, 1]
            d_z = d_z - probs * (log_probs + entropy) * g_entropy;
        }
        let d_z = d_z.scatter(1, targets, g_logp, IndexingUpdateOp::Add);
        if (self.temperature - 1.0).abs() > f32::EPSILON { d_z.div_scalar(self.temperature) } else { d_z }
    }
}

impl<B: Kernels> Vjp<B> for TokenScoresVjp {
    type Saved = ();

    fn forward(&self, inputs: &[FloatTensor<B>]) -> (FloatTensor<B>, ()) {
        let (hidden, weight) = (tensor::<B, 2>(&inputs[0]), tensor::<B, 2>(&inputs[1]));
        let mut out = Vec::new();
        for span in self.chunks(hidden.dims()[0], self.vocab(&weight)) {
            let logits = self.logits(&hidden, &weight, span);
            let fused = B::fused_token_scores(&primitive(logits.clone()), &self.targets[span.0..span.1], self.temperature);
            out.push(fused.map_or_else(|| self.scores_ops(logits, span), |scores| tensor(&scores)));
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
            let logits = self.logits(&hidden, &weight, (start, end));
            let g = grad.clone().slice([start..end, 0..2]);
            let targets = &self.targets[start..end];
            let fused = B::fused_token_scores_backward(
                &primitive(logits.clone()),
                targets,
                self.temperature,
                &primitive(g.clone()),
                self.entropy_grad,
            );
            let d_logits = fused.map_or_else(|| self.logits_grad_ops(logits, (start, end), g), |d| tensor(&d));
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

#[cfg(test)]
mod tests {
    //! The CPU kernel's scores and logits gradient against the tensor-op path.

    use super::*;
    use burn::tensor::Distribution;
    use longrl_backends::Cpu;

    fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
        t.into_data().to_vec().expect("f32 values")
    }

    fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32, what: &str) {
        let scale = expected.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        let worst = actual.iter().zip(expected).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(actual.len() == expected.len() && worst / scale < tolerance, "{what}: relative difference {}", worst / scale);
    }

    #[test]
    fn the_cpu_kernel_matches_the_tensor_ops_with_temperature_and_entropy() {
        let device = Default::default();
        <Cpu as Backend>::seed(&device, 11);
        let (rows, vocab) = (5, 301);
        // Large logits (40 and up, as a trained model's) keep the entropy accurate only when it
        // is computed from shifted logits.
        let logits = Tensor::<Cpu, 2>::random([rows, vocab], Distribution::Normal(40.0, 3.0), &device);
        let g = Tensor::<Cpu, 2>::random([rows, 2], Distribution::Normal(0.0, 1.0), &device);
        let targets = vec![0, 300, 17, 17, 150];
        for (temperature, entropy_grad) in [(1.0, false), (0.7, true), (1.3, true)] {
            let head = TokenScoresVjp { targets: targets.clone(), temperature, tied: false, entropy_grad };
            let span = (0, rows);
            let expected = values(head.scores_ops(logits.clone(), span));
            let fused = Cpu::fused_token_scores(&primitive(logits.clone()), &targets, temperature).expect("the CPU kernel");
            assert_close(&values(tensor::<Cpu, 2>(&fused)), &expected, 1e-5, "scores");
            let expected = values(head.logits_grad_ops(logits.clone(), span, g.clone()));
            let fused =
                Cpu::fused_token_scores_backward(&primitive(logits.clone()), &targets, temperature, &primitive(g.clone()), entropy_grad)
                    .expect("the CPU kernel");
            assert_close(&values(tensor::<Cpu, 2>(&fused)), &expected, 1e-5, "logits gradient");
        }
        assert!(Cpu::fused_token_scores(&primitive(logits.clone()), &[0, 1, 2, 3, 301], 1.0).is_none(), "a target past the vocabulary");
        // A NaN logit makes its row's scores NaN (as the tensor ops do), not a finite number.
        let with_nan = logits.slice_assign([2..3, 7..8], Tensor::from_floats([[f32::NAN]], &device));
        let scores = values(tensor::<Cpu, 2>(&Cpu::fused_token_scores(&primitive(with_nan), &targets, 1.0).expect("the CPU kernel")));
        assert!(scores[4].is_nan() && scores[5].is_nan(), "row 2: {:?}", &scores[4..6]);
        assert!(scores.iter().enumerate().all(|(i, x)| i / 2 == 2 || x.is_finite()), "{scores:?}");
    }
}
