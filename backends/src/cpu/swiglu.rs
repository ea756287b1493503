//! The fused SwiGLU gate of the MLP for the CPU backend: `y = silu(gate) up` with
//! `silu(g) = g sigmoid(g)`, and its backward, `d_up = dy silu(g)` and `d_gate = dy up
//! sigmoid(g) (1 + g (1 - sigmoid(g)))`, each one parallel pass (Burn's ops take three for
//! the forward, keep the sigmoid and the product for the backward, and take about eight
//! there).

use pulp::Simd;
use rayon::prelude::*;

use super::{Task, exp_nonpositive, vectorized};

/// Elements per rayon task.
const TASK_ELEMENTS: usize = 1 << 14;

/// `1 / (1 + exp(-x))` through the vectorizable `exp` of a non-positive argument.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    if x >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) }
}

/// `silu(gate) * up`, element-wise.
pub fn forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; gate.len()];
    y.par_chunks_mut(TASK_ELEMENTS).zip(gate.par_chunks(TASK_ELEMENTS)).zip(up.par_chunks(TASK_ELEMENTS)).for_each(|((y, gate), up)| {
        vectorized(Forward { gate, up, y });
    });
    y
}

struct Forward<'a> {
    gate: &'a [f32],
    up: &'a [f32],
    y: &'a mut [f32],
}

impl Task for Forward<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, _simd: S) {
        for ((y, &g), &u) in self.y.iter_mut().zip(self.gate).zip(self.up) {
            *y = g * sigmoid(g) * u;
        }
    }
}

/// The gradients of `gate` and `up` given the output's.
pub fn backward(gate: &[f32], up: &[f32], d_y: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut d_gate = vec![0.0; gate.len()];
    let mut d_up = vec![0.0; gate.len()];
    d_gate
        .par_chunks_mut(TASK_ELEMENTS)
        .zip(d_up.par_chunks_mut(TASK_ELEMENTS))
        .zip(gate.par_chunks(TASK_ELEMENTS).zip(up.par_chunks(TASK_ELEMENTS)).zip(d_y.par_chunks(TASK_ELEMENTS)))
        .for_each(|((d_gate, d_up), ((gate, up), d_y))| {
            vectorized(Backward { gate, up, d_y, d_gate, d_up });
        });
    (d_gate, d_up)
}

struct Backward<'a> {
    gate: &'a [f32],
    up: &'a [f32],
    d_y: &'a [f32],
    d_gate: &'a mut [f32],
    d_up: &'a mut [f32],
}

impl Task for Backward<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, _simd: S) {
        let inputs = self.gate.iter().zip(self.up).zip(self.d_y);
        for ((d_gate, d_up), ((&g, &u), &dy)) in self.d_gate.iter_mut().zip(self.d_up.iter_mut()).zip(inputs) {
            let s = sigmoid(g);
            *d_up = dy * g * s;
            *d_gate = dy * u * s * (1.0 + g * (1.0 - s));
        }
    }
}
