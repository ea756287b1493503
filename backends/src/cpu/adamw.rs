//! The AdamW update for the CPU backend in one parallel pass that reads the weights, the
//! gradient and both moments once and writes the weights and moments in place (Burn's
//! optimizer takes about a dozen element-wise ops, each allocating a weight-sized tensor).
//! The arithmetic follows Burn's `AdamW` step for step (the same divisions, the same f32
//! scalars), so the two agree to rounding.

use pulp::Simd;
use rayon::prelude::*;

use super::{Task, vectorized};

/// Elements per rayon task.
const TASK_ELEMENTS: usize = 1 << 15;

/// The scalars of one update.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub lr: f32,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// `1 - lr * weight_decay`, computed in f64 as Burn does.
    pub decay_factor: f32,
    /// The update's number, from 1 (the bias corrections use it).
    pub time: i32,
}

/// One update of `param` with `grad`, the moments `moment_1` and `moment_2` updated in
/// place (all the same length).
pub fn update(param: &mut [f32], grad: &[f32], moment_1: &mut [f32], moment_2: &mut [f32], step: Step) {
    param
        .par_chunks_mut(TASK_ELEMENTS)
        .zip(grad.par_chunks(TASK_ELEMENTS))
        .zip(moment_1.par_chunks_mut(TASK_ELEMENTS).zip(moment_2.par_chunks_mut(TASK_ELEMENTS)))
        .for_each(|((param, grad), (moment_1, moment_2))| vectorized(Update { param, grad, moment_1, moment_2, step }));
}

struct Update<'a> {
    param: &'a mut [f32],
    grad: &'a [f32],
    moment_1: &'a mut [f32],
    moment_2: &'a mut [f32],
    step: Step,
}

impl Task for Update<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, _simd: S) {
        let Step { lr, beta_1, beta_2, epsilon, decay_factor, time } = self.step;
        let (factor_1, factor_2) = (1.0 - beta_1, 1.0 - beta_2);
        let (correction_1, correction_2) = (1.0 - beta_1.powi(time), 1.0 - beta_2.powi(time));
        let moments = self.moment_1.iter_mut().zip(self.moment_2.iter_mut());
        for ((w, &g), (m, v)) in self.param.iter_mut().zip(self.grad).zip(moments) {
            *m = *m * beta_1 + g * factor_1;
            *v = *v * beta_2 + g * g * factor_2;
            let delta = (*m / correction_1) / ((*v / correction_2).sqrt() + epsilon);
            *w = *w * decay_factor - delta * lr;
        }
    }
}
