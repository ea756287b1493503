//! AdamW with the backend's fused update ([`Kernels::fused_adamw`]: one pass over the
//! weights, gradient and moments on the CPU backend) and Burn's `AdamW` as the fallback.
//! Its state is Burn's `AdamWState`, so optimizer checkpoints keep their format and a run
//! resumes with either.

use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Device, Tensor, TensorPrimitive};
use longrl_backends::{AdamWStep, AdamWTensors, Kernels};

/// AdamW with decoupled weight decay (no AMSGrad, no cautious decay).
#[derive(Clone)]
pub struct FusedAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    /// Burn's optimizer with the same settings, for backends without the kernel.
    fallback: AdamW,
}

impl FusedAdamW {
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Self {
        let fallback =
            AdamWConfig::new().with_beta_1(beta_1).with_beta_2(beta_2).with_epsilon(epsilon).with_weight_decay(weight_decay).build();
        Self { beta_1, beta_2, epsilon, weight_decay, fallback }
    }
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> burn::tensor::ops::FloatTensor<B> {
    t.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(p: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

impl<B: Kernels> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let amsgrad = state.as_ref().is_some_and(|s| s.momentum.max_moment_2.is_some());
        if amsgrad {
            return self.fallback.step(lr, param, grad, state);
        }
        let time = state.as_ref().map_or(0, |s| s.momentum.time) + 1;
        let step = AdamWStep {
            lr: lr as f32,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            decay_factor: (1.0 - lr * f64::from(self.weight_decay)) as f32,
            time: i32::try_from(time).unwrap_or(i32::MAX),
        };
        let moments = state.map(|s| (primitive(s.momentum.moment_1), primitive(s.momentum.moment_2)));
        match B::fused_adamw(AdamWTensors { param: primitive(param), grad: primitive(grad), moments }, step) {
            Ok(AdamWTensors { param, moments: Some((moment_1, moment_2)), .. }) => {
                let momentum = AdaptiveMomentumState { time, moment_1: tensor(moment_1), moment_2: tensor(moment_2), max_moment_2: None };
                (tensor(param), Some(AdamWState { momentum }))
            }
            Ok(AdamWTensors { param, grad, moments: None }) | Err(AdamWTensors { param, grad, moments: None }) => {
                self.fallback.step(lr, tensor(param), tensor(grad), None)
            }
            Err(AdamWTensors { param, grad, moments: Some((moment_1, moment_2)) }) => {
                let momentum =
                    AdaptiveMomentumState { time: time - 1, moment_1: tensor(moment_1), moment_2: tensor(moment_2), max_moment_2: None };
                self.fallback.step(lr, tensor(param), tensor(grad), Some(AdamWState { momentum }))
            }
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device<B>) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    //! The fused update against Burn's `AdamW` over several steps, with weight decay.

    use super::*;
    use burn::tensor::Distribution;
    use longrl_backends::Cpu;

    fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
        t.into_data().to_vec().expect("f32 values")
    }

    #[test]
    fn the_fused_update_equals_burns_adamw_bit_for_bit() {
        let device = Default::default();
        <Cpu as Backend>::seed(&device, 5);
        let fused = FusedAdamW::new(0.9, 0.95, 1e-8, 0.1);
        let burn = AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.95).with_epsilon(1e-8).with_weight_decay(0.1).build();
        let start = Tensor::<Cpu, 2>::random([37, 300], Distribution::Normal(0.0, 1.0), &device);
        let (mut a, mut b) = (start.clone(), start);
        let (mut state_a, mut state_b) = (None, None);
        for step in 0..4 {
            let grad = Tensor::<Cpu, 2>::random([37, 300], Distribution::Normal(0.0, 0.1 * (step + 1) as f64), &device);
            let lr = 1e-3 * (step + 1) as f64;
            (a, state_a) = fused.step(lr, a, grad.clone(), state_a);
            (b, state_b) = burn.step(lr, b, grad, state_b);
        }
        assert_eq!(values(a), values(b), "weights");
        let (sa, sb) = (state_a.expect("a state"), state_b.expect("a state"));
        assert_eq!(sa.momentum.time, sb.momentum.time);
        assert_eq!(values(sa.momentum.moment_1), values(sb.momentum.moment_1), "first moments");
        assert_eq!(values(sa.momentum.moment_2), values(sb.momentum.moment_2), "second moments");
    }
}
