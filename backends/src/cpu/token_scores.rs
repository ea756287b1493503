//! The softmax end of the LM head for the CPU backend: each row's log-probability of its
//! target token and the entropy of its distribution under `softmax(logits / T)`, and the
//! logits' gradient from theirs, in two and three passes over a row (Burn's ops take about
//! six for the forward and ten for the backward over `[rows, vocab]`, each with libm's
//! scalar `exp`; here `exp` is vectorized).
//!
//! Per row with `z = logits / T`, `lse = log sum exp z`, `p = exp(z - lse)`:
//! log-prob `z_target - lse`, entropy `H = lse - sum p z`; given their gradients `g_logp`,
//! `g_H`: `dz = g_logp (onehot(target) - p) - g_H p (z - lse + H)` and `dlogits = dz / T`.

use pulp::Simd;
use rayon::prelude::*;

use super::{Task, exp_nonpositive, vectorized};

/// A row's softmax statistics.
#[derive(Debug, Clone, Copy)]
struct RowStats {
    /// `log sum exp z`.
    lse: f32,
    /// `sum p z`.
    mean_z: f32,
}

/// The statistics of `z = logits / T` for one row (two passes: the max, then the sums).
#[inline(always)]
fn row_stats(logits: &[f32], inv_t: f32) -> RowStats {
    // T > 0, so the max of z is the max of the logits, scaled.
    let mut maxes = [f32::NEG_INFINITY; 16];
    let chunks = logits.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in maxes.iter_mut().zip(chunk) {
            *m = m.max(x);
        }
    }
    let max = tail.iter().fold(maxes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b)) * inv_t;
    let (mut sums, mut weighted) = ([0f32; 16], [0f32; 16]);
    let chunks = logits.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for ((s, w), &x) in sums.iter_mut().zip(weighted.iter_mut()).zip(chunk) {
            let z = x * inv_t;
            let e = exp_nonpositive(z - max);
            *s += e;
            *w += e * z;
        }
    }
    let (mut sum, mut weighted_sum) = (sums.iter().sum::<f32>(), weighted.iter().sum::<f32>());
    for &x in tail {
        let z = x * inv_t;
        let e = exp_nonpositive(z - max);
        sum += e;
        weighted_sum += e * z;
    }
    RowStats { lse: max + sum.ln(), mean_z: weighted_sum / sum }
}

/// `[rows, 2]`: each row's target log-probability and entropy. `logits` is `[rows, vocab]`
/// row-major; every target is below `vocab`.
pub fn forward(logits: &[f32], vocab: usize, targets: &[usize], temperature: f32) -> Vec<f32> {
    let inv_t = 1.0 / temperature;
    let mut out = vec![0.0; 2 * targets.len()];
    out.par_chunks_mut(2).zip(logits.par_chunks(vocab)).zip(targets.par_iter()).for_each(|((out, row), &target)| {
        let stats = vectorized(Stats { row, inv_t });
        out[0] = row[target] * inv_t - stats.lse;
        out[1] = stats.lse - stats.mean_z;
    });
    out
}

struct Stats<'a> {
    row: &'a [f32],
    inv_t: f32,
}

impl Task for Stats<'_> {
    type Output = RowStats;

    #[inline(always)]
    fn run<S: Simd>(self, _simd: S) -> RowStats {
        row_stats(self.row, self.inv_t)
    }
}

/// The logits' gradient `[rows, vocab]` given the scores' gradient `grad` `[rows, 2]` (the
/// entropy column ignored unless `entropy_grad`).
pub fn backward(logits: &[f32], vocab: usize, targets: &[usize], temperature: f32, grad: &[f32], entropy_grad: bool) -> Vec<f32> {
    let inv_t = 1.0 / temperature;
    let mut d_logits = vec![0.0; logits.len()];
    d_logits.par_chunks_mut(vocab).zip(logits.par_chunks(vocab)).zip(targets.par_iter().zip(grad.par_chunks(2))).for_each(
        |((d_row, row), (&target, g))| {
            let g_entropy = if entropy_grad { g[1] } else { 0.0 };
            vectorized(RowGradient { row, inv_t, g_logp: g[0], g_entropy, d_row });
            d_row[target] += g[0] * inv_t;
        },
    );
    d_logits
}

struct RowGradient<'a> {
    row: &'a [f32],
    inv_t: f32,
    g_logp: f32,
    g_entropy: f32,
    d_row: &'a mut [f32],
}

impl Task for RowGradient<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, _simd: S) {
        let RowStats { lse, mean_z } = row_stats(self.row, self.inv_t);
        let entropy = lse - mean_z;
        let (inv_t, g_logp, g_entropy) = (self.inv_t, self.g_logp, self.g_entropy);
        for (d, &x) in self.d_row.iter_mut().zip(self.row) {
            let log_p = (x * inv_t - lse).min(0.0);
            let p = exp_nonpositive(log_p);
            *d = -p * (g_logp + g_entropy * (log_p + entropy)) * inv_t;
        }
    }
}
