//! Fused RMSNorm for the CPU backend: `y = x * rsqrt(mean(x^2) + eps) * gamma` over each
//! row, and its backward, each in one pass over the rows (Burn's ops take six for the
//! forward and more for the backward), parallel over blocks of rows, vectorized for the
//! CPU's vector unit (see [`super::vectorized`]).
//!
//! Backward, per row with `r = rsqrt(mean(x^2) + eps)` and `n = x r`:
//! `dx = r (dy gamma - n mean(dy gamma n))`, and `dgamma = sum over rows of dy n`.

use pulp::Simd;
use rayon::prelude::*;

use super::{Task, dot, dot3, vectorized};

/// Elements per rayon task (whole rows).
const TASK_ELEMENTS: usize = 1 << 14;

fn rows_per_task(d: usize) -> usize {
    (TASK_ELEMENTS / d.max(1)).max(1)
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
#[inline(always)]
fn inv_rms<S: Simd>(simd: S, x: &[f32], eps: f32) -> f32 {
    1.0 / (dot(simd, x, x) / x.len() as f32 + eps).sqrt()
}

/// The normalized rows `[n, d]` of `x` `[n, d]` (row-major), `d = gamma.len()`.
pub fn forward(x: &[f32], gamma: &[f32], eps: f32) -> Vec<f32> {
    let d = gamma.len();
    let mut y = vec![0.0; x.len()];
    let chunk = rows_per_task(d) * d;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(y, x)| vectorized(Forward { x, gamma, eps, y }));
    y
}

struct Forward<'a> {
    x: &'a [f32],
    gamma: &'a [f32],
    eps: f32,
    y: &'a mut [f32],
}

impl Task for Forward<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, simd: S) {
        let d = self.gamma.len();
        for (x, y) in self.x.chunks_exact(d).zip(self.y.chunks_exact_mut(d)) {
            let r = inv_rms(simd, x, self.eps);
            for ((y, &x), &g) in y.iter_mut().zip(x).zip(self.gamma) {
                *y = x * r * g;
            }
        }
    }
}

/// The gradients of `x` (`[n, d]`) and `gamma` (`[d]`) given the output's, `d_y`.
pub fn backward(x: &[f32], gamma: &[f32], eps: f32, d_y: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    let mut d_x = vec![0.0; x.len()];
    let chunk = rows_per_task(d) * d;
    // Each block's share of d_gamma, summed in block order: the same bits on every run
    // (rayon's own reduce would pair them as the threads happen to split the work).
    let parts: Vec<Vec<f32>> = d_x
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(d_y.par_chunks(chunk))
        .map(|((d_x, x), d_y)| vectorized(Backward { x, gamma, eps, d_y, d_x }))
        .collect();
    let mut d_gamma = vec![0.0; d];
    for part in &parts {
        d_gamma.iter_mut().zip(part).for_each(|(total, p)| *total += p);
    }
    (d_x, d_gamma)
}

struct Backward<'a> {
    x: &'a [f32],
    gamma: &'a [f32],
    eps: f32,
    d_y: &'a [f32],
    d_x: &'a mut [f32],
}

impl Task for Backward<'_> {
    /// This block's share of `d_gamma`.
    type Output = Vec<f32>;

    #[inline(always)]
    fn run<S: Simd>(self, simd: S) -> Vec<f32> {
        let d = self.gamma.len();
        let mut d_gamma = vec![0.0; d];
        let rows = self.x.chunks_exact(d).zip(self.d_y.chunks_exact(d)).zip(self.d_x.chunks_exact_mut(d));
        for ((x, d_y), d_x) in rows {
            let r = inv_rms(simd, x, self.eps);
            // mean(dy gamma n) = r * mean(dy gamma x)
            let projection = dot3(simd, d_y, self.gamma, x);
            let scale = r * r * projection / d as f32;
            for (((dx, &dy), &g), &x) in d_x.iter_mut().zip(d_y).zip(self.gamma).zip(x) {
                *dx = r * (dy * g - x * scale);
            }
            for ((dg, &dy), &x) in d_gamma.iter_mut().zip(d_y).zip(x) {
                *dg = (dy * x).mul_add(r, *dg);
            }
        }
        d_gamma
    }
}
