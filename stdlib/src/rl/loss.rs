//! The policy loss: PPO's clipped surrogate with separate lower and upper clip ranges
//! (DAPO's clip-higher), aggregated per token over the mini-batch (DAPO), per sequence then
//! over sequences (GRPO) or as a token sum over a constant (Dr. GRPO); an optional KL term to
//! a frozen reference (k1 or k3 estimator) and an optional entropy bonus.

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};

/// How per-token losses become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Mean over every response token of the mini-batch (DAPO).
    #[default]
    Token,
    /// Mean over each response's tokens, then over responses (GRPO).
    Sequence,
    /// Sum over tokens divided by responses x a constant length (Dr. GRPO).
    TokenSumNorm,
}

/// Which KL estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// log pi - log pi_ref.
    K1,
    /// exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (non-negative, low variance).
    #[default]
    K3,
}

/// Options of the loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub eps_low: f32,
    pub eps_high: f32,
    pub aggregation: Aggregation,
    pub kl_coef: f32,
    pub kl_estimator: KlEstimator,
    pub entropy_coef: f32,
    /// The constant of `token-sum-norm` (usually the response budget).
    pub norm_length: f32,
}

/// The mini-batch totals the aggregation divides by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalizer {
    /// Response tokens in the whole mini-batch.
    pub tokens: f32,
    /// Responses in the whole mini-batch.
    pub responses: f32,
}

/// Figures of one loss evaluation (sums, to be divided by token counts by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossSums {
    pub tokens: f32,
    pub clipped_tokens: f32,
    pub kl_sum: f32,
    pub entropy_sum: f32,
    pub ratio_sum: f32,
}

impl LossSums {
    /// The sums of two parts of a mini-batch.
    pub fn add(&self, other: &LossSums) -> LossSums {
        LossSums {
            tokens: self.tokens + other.tokens,
            clipped_tokens: self.clipped_tokens + other.clipped_tokens,
            kl_sum: self.kl_sum + other.kl_sum,
            entropy_sum: self.entropy_sum + other.entropy_sum,
            ratio_sum: self.ratio_sum + other.ratio_sum,
        }
    }
}

/// The estimator's per-token KL.
pub fn kl_per_token<B: Backend>(logp: Tensor<B, 2>, ref_logp: Tensor<B, 2>, estimator: KlEstimator) -> Tensor<B, 2> {
    match estimator {
        KlEstimator::K1 => logp - ref_logp,
        KlEstimator::K3 => {
            let diff = ref_logp - logp; // log pi_ref - log pi
            diff.clone().exp() - diff - 1.0
        }
    }
}

/// Some responses of a mini-batch, scored.
///
/// # Shapes
/// - logp, old_logp, mask, entropy, ref_logp: `[responses, len]`; advantages: `[responses]`
#[derive(Debug, Clone)]
pub struct ScoredResponses<B: Backend> {
    /// Log-probs of the response tokens under the policy being trained.
    pub logp: Tensor<B, 2>,
    /// Log-probs under the policy that sampled them.
    pub old_logp: Tensor<B, 2>,
    pub advantages: Tensor<B, 1>,
    /// 1 for response tokens, 0 for padding.
    pub mask: Tensor<B, 2>,
    /// Entropy of the policy's distribution at each token.
    pub entropy: Tensor<B, 2>,
    /// Log-probs under the frozen reference, when the loss has a KL term.
    pub ref_logp: Option<Tensor<B, 2>>,
}

/// The loss of some responses of a mini-batch, scaled so that summing it over the
/// mini-batch's parts gives the aggregated loss.
pub fn policy_loss<B: Backend>(batch: ScoredResponses<B>, config: &LossConfig, normalizer: Normalizer) -> (Tensor<B, 1>, LossSums) {
    let ScoredResponses { logp, old_logp, advantages, mask, entropy, ref_logp } = batch;
    let [n, len] = logp.dims();
    let adv = advantages.reshape([n, 1]).expand([n, len]); // [n, len]
    let ratio = (logp.clone() - old_logp).exp(); // [n, len]
    let unclipped = ratio.clone() * adv.clone();
    let clipped = ratio.clone().clamp(1.0 - config.eps_low, 1.0 + config.eps_high) * adv.clone();
    let mut token_loss = unclipped.clone().min_pair(clipped.clone()).neg(); // [n, len]
    let mut kl_sum = 0.0;
    if let (Some(reference), true) = (ref_logp, config.kl_coef > 0.0) {
        let kl = kl_per_token(logp, reference, config.kl_estimator) * mask.clone();
        kl_sum = kl.clone().sum().into_scalar().elem::<f32>();
        token_loss = token_loss + kl.mul_scalar(config.kl_coef);
    }
    let entropy = entropy * mask.clone();
    let entropy_sum = entropy.clone().detach().sum().into_scalar().elem::<f32>();
    if config.entropy_coef > 0.0 {
        token_loss = token_loss - entropy.mul_scalar(config.entropy_coef);
    }
    let token_loss = token_loss * mask.clone();
    let loss = match config.aggregation {
        Aggregation::Token => token_loss.sum().div_scalar(normalizer.tokens.max(1.0)),
        Aggregation::Sequence => {
            let lengths = mask.clone().sum_dim(1).clamp_min(1.0); // [n, 1]
            (token_loss.sum_dim(1) / lengths).sum().reshape([1]).div_scalar(normalizer.responses.max(1.0))
        }
        Aggregation::TokenSumNorm => token_loss.sum().div_scalar((normalizer.responses * config.norm_length).max(1.0)),
    };
    // Clipping is active where the clipped term is the smaller one and differs.
    let active = unclipped.greater(clipped).float() * mask.clone();
    let sums = LossSums {
        tokens: mask.clone().sum().into_scalar().elem::<f32>(),
        clipped_tokens: active.sum().into_scalar().elem::<f32>(),
        kl_sum,
        entropy_sum,
        ratio_sum: (ratio.detach() * mask).sum().into_scalar().elem::<f32>(),
    };
    (loss, sums)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use longrl_backends::Cpu;

    fn t2(values: Vec<f32>, shape: [usize; 2]) -> Tensor<Cpu, 2> {
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn value(t: Tensor<Cpu, 1>) -> f32 {
        t.into_scalar().elem::<f32>()
    }

    /// Two responses: lengths 2 and 1, advantages +1 and -2.
    /// ratios: e^0.5 = 1.6487 (clipped to 1.28 for A > 0), e^-0.1 = 0.9048 (inside), and
    /// e^-0.5 = 0.6065 (clipped to 0.8 for A < 0; min picks the clipped -1.6... see below).
    fn batch() -> ScoredResponses<Cpu> {
        ScoredResponses {
            logp: t2(vec![-1.0, -2.0, -3.0, 0.0], [2, 2]),
            old_logp: t2(vec![-1.5, -1.9, -2.5, 0.0], [2, 2]),
            advantages: Tensor::<Cpu, 1>::from_floats([1.0, -2.0], &Default::default()),
            mask: t2(vec![1.0, 1.0, 1.0, 0.0], [2, 2]),
            entropy: t2(vec![0.5, 0.5, 1.0, 9.0], [2, 2]),
            ref_logp: None,
        }
    }

    fn config(aggregation: Aggregation) -> LossConfig {
        LossConfig {
            eps_low: 0.2,
            eps_high: 0.28,
            aggregation,
            kl_coef: 0.0,
            kl_estimator: KlEstimator::K3,
            entropy_coef: 0.0,
            norm_length: 4.0,
        }
    }

    #[test]
    fn clipped_surrogate_and_its_aggregations_by_hand() {
        // Token losses, -min(r A, clip(r) A):
        //  t1: r = e^0.5 = 1.64872, A = 1: min(1.64872, 1.28) = 1.28 -> -1.28 (clipped)
        //  t2: r = e^-0.1 = 0.90484, A = 1: min(0.90484, 0.90484) -> -0.90484
        //  t3: r = e^-0.5 = 0.60653, A = -2: min(-1.21306, -1.6) = -1.6 -> +1.6 (clipped)
        let (l1, l2, l3) = (-1.28f32, -(-0.1f32).exp(), 1.6f32);
        let normalizer = Normalizer { tokens: 3.0, responses: 2.0 };
        let (loss, sums) = policy_loss(batch(), &config(Aggregation::Token), normalizer);
        assert!((value(loss) - (l1 + l2 + l3) / 3.0).abs() < 1e-5);
        assert_eq!(sums.tokens, 3.0);
        assert_eq!(sums.clipped_tokens, 2.0);
        assert!((sums.entropy_sum - 2.0).abs() < 1e-6, "padding is masked out");
        let (loss, _) = policy_loss(batch(), &config(Aggregation::Sequence), normalizer);
        assert!((value(loss) - ((l1 + l2) / 2.0 + l3) / 2.0).abs() < 1e-5);
        let (loss, _) = policy_loss(batch(), &config(Aggregation::TokenSumNorm), normalizer);
        assert!((value(loss) - (l1 + l2 + l3) / (2.0 * 4.0)).abs() < 1e-5);
    }

    #[test]
    fn kl_and_entropy_terms() {
        let normalizer = Normalizer { tokens: 3.0, responses: 2.0 };
        let reference = t2(vec![-1.0, -1.0, -3.0, 0.0], [2, 2]);
        // k3 per token: d = ref - logp = [0, 1, 0]; e^d - d - 1 = [0, e - 2, 0].
        let k3 = std::f32::consts::E - 2.0;
        let mut with_kl = config(Aggregation::Token);
        with_kl.kl_coef = 0.5;
        with_kl.entropy_coef = 0.1;
        let (base, _) = policy_loss(batch(), &config(Aggregation::Token), normalizer);
        let (loss, sums) = policy_loss(ScoredResponses { ref_logp: Some(reference), ..batch() }, &with_kl, normalizer);
        assert!((sums.kl_sum - k3).abs() < 1e-5);
        let expected = value(base) + (0.5 * k3 - 0.1 * 2.0) / 3.0;
        assert!((value(loss) - expected).abs() < 1e-5);
    }

    #[test]
    fn k1_and_k3_estimators() {
        let logp = t2(vec![-1.0, -2.0], [1, 2]);
        let reference = t2(vec![-1.5, -1.0], [1, 2]);
        let k1: Vec<f32> = kl_per_token(logp.clone(), reference.clone(), KlEstimator::K1).into_data().to_vec().expect("f32");
        assert_eq!(k1, vec![0.5, -1.0]);
        let k3: Vec<f32> = kl_per_token(logp, reference, KlEstimator::K3).into_data().to_vec().expect("f32");
        // d = ref - logp = [-0.5, 1]: e^-0.5 + 0.5 - 1 and e - 2.
        assert!((k3[0] - ((-0.5f32).exp() - 0.5)).abs() < 1e-6);
        assert!((k3[1] - (std::f32::consts::E - 2.0)).abs() < 1e-6);
    }
}
