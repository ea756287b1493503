//! Fused rotary embedding for the CPU backend (rotate-half convention): `y = x cos +
//! rot(x) sin` with `rot([x1, x2]) = [-x2, x1]`, or the gradient's map `dx = dy cos +
//! rot^T(dy sin)` with `rot^T([z1, z2]) = [z2, -z1]`, in one pass (Burn's ops take a slice,
//! a negation, a concatenation, two products and a sum, each a full copy).
//!
//! Inputs are read through their strides. The output is written token-major,
//! `[b, s, heads, hd]`, which is the layout the projections produce and consume: a caller
//! hands it on as a `[b, heads, s, hd]` view, so that neither the heads split from a
//! projection nor a gradient merged back into one needs a copy.

use pulp::Simd;
use rayon::prelude::*;

use super::attention::View4;
use super::{Task, vectorized};

/// Tokens per rayon task.
const TASK_TOKENS: usize = 16;

/// Rotates `x` `[b, heads, s, hd]` by the tables `cos`, `sin` `[b or 1, 1, s, hd]`; with
/// `transpose`, applies the transposed rotation (the backward). Returns `[b, s, heads, hd]`
/// row-major.
pub fn apply(x: View4, cos: View4, sin: View4, transpose: bool) -> Vec<f32> {
    let [b, heads, s, hd] = x.dims;
    let token = heads * hd;
    let mut out = vec![0.0; b * s * token];
    out.par_chunks_mut(TASK_TOKENS * token).enumerate().for_each(|(task, out)| {
        vectorized(Rotate { x, cos, sin, transpose, first_token: task * TASK_TOKENS, out });
    });
    out
}

struct Rotate<'a> {
    x: View4<'a>,
    cos: View4<'a>,
    sin: View4<'a>,
    transpose: bool,
    /// Index (over `b * s`) of the first token of `out`.
    first_token: usize,
    /// `[tokens, heads, hd]`.
    out: &'a mut [f32],
}

impl Task for Rotate<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, _simd: S) {
        let [_, heads, s, hd] = self.x.dims;
        let half = hd / 2;
        let token_len = heads * hd;
        for (offset, out) in self.out.chunks_exact_mut(token_len).enumerate() {
            let token = self.first_token + offset;
            let (bi, si) = (token / s, token % s);
            let table_batch = if self.cos.dims[0] == 1 { 0 } else { bi };
            let (cos, sin) = (self.cos.row(table_batch, 0, si), self.sin.row(table_batch, 0, si));
            let (cos1, cos2) = cos.split_at(half);
            let (sin1, sin2) = sin.split_at(half);
            for (head, out) in out.chunks_exact_mut(hd).enumerate() {
                let (x1, x2) = self.x.row(bi, head, si).split_at(half);
                let (y1, y2) = out.split_at_mut(half);
                // The transpose swaps which half of the sine table each output uses and
                // negates it: `y1 = x1 cos1 + x2 sin2`, `y2 = x2 cos2 - x1 sin1`.
                let (sin1, sin2, sign) = if self.transpose { (sin2, sin1, -1.0) } else { (sin1, sin2, 1.0) };
                rotate(x1, x2, cos1, cos2, sin1, sin2, sign, y1, y2);
            }
        }
    }
}

/// `y1 = x1 cos1 - sign x2 sin1`, `y2 = x2 cos2 + sign x1 sin2` (`sign` is 1 or -1, so the
/// product by it is exact).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rotate(x1: &[f32], x2: &[f32], cos1: &[f32], cos2: &[f32], sin1: &[f32], sin2: &[f32], sign: f32, y1: &mut [f32], y2: &mut [f32]) {
    let n = y1.len();
    let (x1, x2, cos1, cos2, sin1, sin2, y2) = (&x1[..n], &x2[..n], &cos1[..n], &cos2[..n], &sin1[..n], &sin2[..n], &mut y2[..n]);
    for i in 0..n {
        y1[i] = x1[i] * cos1[i] - sign * (x2[i] * sin1[i]);
        y2[i] = x2[i] * cos2[i] + sign * (x1[i] * sin2[i]);
    }
}
