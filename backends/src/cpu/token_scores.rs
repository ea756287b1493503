//! The softmax end of the LM head for the CPU backend: each row's log-probability of its
//! target token and the entropy of its distribution under `softmax(logits / T)`, and the
//! logits' gradient from theirs, in two and three passes over a row (Burn's ops take about
//! six for the forward and ten for the backward over `[rows, vocab]`, each with libm's
//! scalar `exp`; here `exp` is vectorized).
//!
//! Per row with `z = logits / T`, `lse = log sum exp z`, `p = exp(z - lse)`:
//! log-prob `z_target - lse`, entropy `H = lse - sum p z`; a row holding NaN scores NaN; given their gradients `g_logp`,
//! `g_H`: `dz = g_logp (onehot(target) - p) - g_H p (z - lse + H)` and `dlogits = dz / T`.

use pulp::Simd;
use rayon::prelude::*;

use super::{Task, exp_nonpositive, vectorized};

/// A row's softmax statistics (NaN when the row holds a NaN, as the tensor ops give).
#[derive(Debug, Clone, Copy)]
struct RowStats {
    /// `log sum exp z`.
    lse: f32,
    /// The entropy `lse - sum p z`, computed as `log sum e - sum e (z - max) / sum e` with
    /// `e = exp(z - max)`, which keeps it accurate when the logits are large.
    entropy: f32,
}

/// The statistics of `z = logits / T` for one row (two passes: the max, then the sums).
#[inline(always)]
fn row_stats(logits: &[f32], inv_t: f32) -> RowStats {
    // T > 0, so the max of z is the max of the logits, scaled. `f32::max` skips NaN, so
    // NaN is looked for on the way.
    let mut maxes = [f32::NEG_INFINITY; 16];
    let mut nan = [false; 16];
    let chunks = logits.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for ((m, n), &x) in maxes.iter_mut().zip(nan.iter_mut()).zip(chunk) {
            *m = m.max(x);
            *n |= x.is_nan();
        }
    }
    if nan.iter().any(|&n| n) || tail.iter().any(|x| x.is_nan()) {
        return RowStats { lse: f32::NAN, entropy: f32::NAN };
    }
    let max = tail.iter().fold(maxes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b)) * inv_t;
    let (mut sums, mut weighted) = ([0f32; 16], [0f32; 16]);
    let chunks = logits.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for ((s, w), &x) in sums.iter_mut().zip(weighted.iter_mut()).zip(chunk) {
            let shifted = x * inv_t - max;
            let e = exp_nonpositive(shifted);
            *s += e;
            *w += e * shifted;
        }
    }
    let (mut sum, mut weighted_sum) = (sums.iter().sum::<f32>(), weighted.iter().sum::<f32>());
    for &x in tail {
        let shifted = x * inv_t - max;
        let e = exp_nonpositive(shifted);
        sum += e;
        weighted_sum += e * shifted;
    }
    let log_sum = sum.ln();
    RowStats { lse: max + log_sum, entropy: log_sum - weighted_sum / sum }
}

/// `[rows, 2]`: each row's target log-probability and entropy. `logits` is `[rows, vocab]`
/// row-major; every target is below `vocab`.
pub fn forward(logits: &[f32], vocab: usize, targets: &[usize], temperature: f32) -> Vec<f32> {
    let inv_t = 1.0 / temperature;
    let mut out = vec![0.0; 2 * targets.len()];
    out.par_chunks_mut(2).zip(logits.par_chunks(vocab)).zip(targets.par_iter()).for_each(|((out, row), &target)| {
        let stats = vectorized(Stats { row, inv_t });
        out[0] = row[target] * inv_t - stats.lse;
        out[1] = stats.entropy;
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
        let RowStats { lse, entropy } = row_stats(self.row, self.inv_t);
        if lse.is_nan() {
            self.d_row.fill(f32::NAN);
            return;
        }
        let (inv_t, g_logp, g_entropy) = (self.inv_t, self.g_logp, self.g_entropy);
        for (d, &x) in self.d_row.iter_mut().zip(self.row) {
            let log_p = (x * inv_t - lse).min(0.0);
            let p = exp_nonpositive(log_p);
            *d = -p * (g_logp + g_entropy * (log_p + entropy)) * inv_t;
        }
    }
}
