//! Fused causal attention for the CPU backend: the online-softmax forward (keeping each
//! query row's log-sum-exp) and the FlashAttention-2 backward, over f32 slices, parallel
//! over (batch rows, key/value head, block) tasks with rayon. Scores are computed a key block at
//! a time in vectorizable loops (the module is compiled for the CPU's vector unit at run
//! time, see [`super::vectorized`]); no score tensor larger than a block ever exists, and
//! inputs are read through their strides, so views (heads split from a projection) need no
//! copy.
//!
//! Semantics match the tensor-op path of `longrl_stdlib::model::flash`: queries grouped by
//! key/value head (`rep` query heads per kv head), an optional prefix every row attends to
//! in full, causal own keys (query i sees own keys `..= past + i`), optional key padding,
//! masked scores set to [`MASKED`].

use rayon::prelude::*;

use pulp::Simd;

use super::{Task, exp_nonpositive, vectorized};

/// Score given to masked keys (finite, as the tensor-op path).
pub const MASKED: f32 = -1.0e30;

/// Keys per block.
const KEY_BLOCK: usize = 64;
/// Query rows per task.
const QUERY_BLOCK: usize = 32;

/// A read-only 4-D f32 tensor whose last dimension is contiguous.
#[derive(Debug, Clone, Copy)]
pub struct View4<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    /// Strides of the first three dimensions (the last is 1).
    pub strides: [usize; 3],
    pub dims: [usize; 4],
}

impl<'a> View4<'a> {
    /// The contiguous last-dimension row at `[a, b, c, ..]`.
    #[inline(always)]
    pub(crate) fn row(&self, a: usize, b: usize, c: usize) -> &'a [f32] {
        let start = self.offset + a * self.strides[0] + b * self.strides[1] + c * self.strides[2];
        &self.data[start..start + self.dims[3]]
    }
}

/// One attention call.
#[derive(Debug, Clone, Copy)]
pub struct Problem<'a> {
    /// `[b, heads, s, hd]`.
    pub q: View4<'a>,
    /// `[b, kv_heads, t, hd]`.
    pub own_k: View4<'a>,
    pub own_v: View4<'a>,
    /// `[1, kv_heads, p, hd]`.
    pub shared: Option<(View4<'a>, View4<'a>)>,
    /// Own keys before the first query.
    pub past: usize,
    /// `[b, t]`, true = masked.
    pub key_padding: Option<&'a [bool]>,
}

/// Sizes derived from a problem.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    b: usize,
    heads: usize,
    kvh: usize,
    rep: usize,
    s: usize,
    hd: usize,
    t: usize,
    p: usize,
    scale: f32,
}

impl Problem<'_> {
    fn sizes(&self) -> Sizes {
        let [b, heads, s, hd] = self.q.dims;
        let [_, kvh, t, _] = self.own_k.dims;
        let p = self.shared.map_or(0, |(k, _)| k.dims[2]);
        Sizes { b, heads, kvh, rep: heads / kvh, s, hd, t, p, scale: 1.0 / (hd as f32).sqrt() }
    }

    /// How many keys of the own block `k0..k0 + nk` query `i` can see causally (a prefix
    /// of the block); padding is applied separately.
    #[inline(always)]
    fn causal_keys(&self, i: usize, k0: usize, nk: usize) -> usize {
        (self.past + i + 1).saturating_sub(k0).min(nk)
    }

    /// Padding flags of batch row `bi`'s own keys `k0..k0 + nk`, if the call has padding.
    #[inline(always)]
    fn padding(&self, bi: usize, t: usize, k0: usize, nk: usize) -> Option<&[bool]> {
        self.key_padding.map(|pad| &pad[bi * t + k0..bi * t + k0 + nk])
    }

    /// Sets the scores of the keys query `i` may not see to [`MASKED`].
    #[inline(always)]
    fn mask_scores(&self, bi: usize, t: usize, i: usize, k0: usize, scores: &mut [f32]) {
        let nk = scores.len();
        scores[self.causal_keys(i, k0, nk)..].fill(MASKED);
        if let Some(padding) = self.padding(bi, t, k0, nk) {
            for (s, &pad) in scores.iter_mut().zip(padding) {
                if pad {
                    *s = MASKED;
                }
            }
        }
    }

    /// Own key blocks query rows `..q_end` can see (whole blocks; the mask hides the rest).
    #[inline(always)]
    fn own_blocks(&self, sz: &Sizes, q_end: usize) -> impl Iterator<Item = (usize, usize)> {
        let visible = self.past + q_end;
        let t = sz.t;
        (0..t).step_by(KEY_BLOCK).take_while(move |&start| start < visible).map(move |start| (start, (start + KEY_BLOCK).min(t)))
    }
}

fn blocks(len: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len).step_by(size).map(move |start| (start, (start + size).min(len)))
}

/// A key block's keys transposed (`[hd][KEY_BLOCK]`), so that scores are axpys.
#[inline(always)]
fn transpose_block(view: &View4, bi: usize, g: usize, (k0, k1): (usize, usize), out: &mut [f32]) {
    for (j, key) in (k0..k1).enumerate() {
        for (d, &x) in view.row(bi, g, key).iter().enumerate() {
            out[d * KEY_BLOCK + j] = x;
        }
    }
}

/// Query rows handled together by the tile kernels: with two vectors per row, their 12
/// accumulators stay in registers and hide the FMAs' latency.
const GROUP: usize = 6;

/// The first two vectors of a slice of `2 * lanes` floats.
#[inline(always)]
fn load2<S: Simd>(slice: &[f32]) -> [S::f32s; 2] {
    let v = S::as_simd_f32s(slice).0;
    [v[0], v[1]]
}

/// Scores of a group of rows against a transposed key block:
/// `out[r][j] = a_r . b_j` for every row `r < GROUP` (unused rows are zero) and `j <
/// KEY_BLOCK`.
#[inline(always)]
fn tile_scores<S: Simd>(simd: S, a: &[&[f32]; GROUP], bt: &[f32], hd: usize, out: &mut [[f32; KEY_BLOCK]; GROUP]) {
    let step = 2 * S::F32_LANES;
    // Exact lengths let the compiler drop the bounds checks of the inner loops.
    let a: [&[f32]; GROUP] = a.map(|row| &row[..hd]);
    let bt = &bt[..hd * KEY_BLOCK];
    for c in (0..KEY_BLOCK).step_by(step) {
        let zero = simd.splat_f32s(0.0);
        let mut acc = [[zero; 2]; GROUP];
        for d in 0..hd {
            let [b0, b1] = load2::<S>(&bt[d * KEY_BLOCK + c..d * KEY_BLOCK + c + step]);
            for r in 0..GROUP {
                let x = simd.splat_f32s(a[r][d]);
                acc[r][0] = simd.mul_add_f32s(x, b0, acc[r][0]);
                acc[r][1] = simd.mul_add_f32s(x, b1, acc[r][1]);
            }
        }
        for r in 0..GROUP {
            let dst = S::as_mut_simd_f32s(&mut out[r][c..c + step]).0;
            dst[0] = acc[r][0];
            dst[1] = acc[r][1];
        }
    }
}

/// Query rows per batch row (heads per kv head x positions) up to which own keys are scored
/// by dot products of each row with each key, without transposing the block: decoding, a
/// token's few query heads per kv head. Chosen for the whole problem, never by how the rows
/// are split into tasks, so a row's result does not depend on the other rows of the batch.
const DOT_ROWS: usize = 4;

/// `out[r][j] = a_r . key_j` for the `a.len()` rows and keys `j < nk` of a block.
#[inline(always)]
fn dot_scores<S: Simd>(simd: S, a: &[&[f32]], keys: KeyRows, nk: usize, out: &mut [[f32; KEY_BLOCK]; GROUP]) {
    for j in 0..nk {
        let key = keys.row(j);
        for (r, row) in a.iter().enumerate() {
            out[r][j] = super::dot(simd, row, key);
        }
    }
}

/// Rows `k0..` of one (batch row, kv head) of a key or value view.
#[derive(Clone, Copy)]
struct KeyRows<'a> {
    view: &'a View4<'a>,
    batch: usize,
    g: usize,
    k0: usize,
}

impl<'a> KeyRows<'a> {
    #[inline(always)]
    fn row(&self, j: usize) -> &'a [f32] {
        self.view.row(self.batch, self.g, self.k0 + j)
    }
}

/// `acc[r] += sum_j weights[r][j] * row_j` for the group's `n` rows (`acc` is `[n][hd]`)
/// over keys `j < nk` of a value (or key) block.
#[inline(always)]
fn tile_accumulate<S: Simd>(simd: S, acc: &mut [f32], n: usize, weights: &[[f32; KEY_BLOCK]; GROUP], nk: usize, rows: KeyRows, hd: usize) {
    // As many accumulators as rows: a partial group (a decoded token's few heads) does no
    // work for the missing rows.
    debug_assert!((1..=GROUP).contains(&n), "a group of {n} rows");
    match n {
        1 => accumulate_rows::<S, 1>(simd, acc, weights, nk, rows, hd),
        2 => accumulate_rows::<S, 2>(simd, acc, weights, nk, rows, hd),
        3 => accumulate_rows::<S, 3>(simd, acc, weights, nk, rows, hd),
        4 => accumulate_rows::<S, 4>(simd, acc, weights, nk, rows, hd),
        5 => accumulate_rows::<S, 5>(simd, acc, weights, nk, rows, hd),
        _ => accumulate_rows::<S, GROUP>(simd, acc, weights, nk, rows, hd),
    }
}

// The arms above cover every group size.
const _: () = assert!(GROUP == 6);

/// [`tile_accumulate`] for `N` rows.
#[inline(always)]
fn accumulate_rows<S: Simd, const N: usize>(
    simd: S,
    acc: &mut [f32],
    weights: &[[f32; KEY_BLOCK]; GROUP],
    nk: usize,
    rows: KeyRows,
    hd: usize,
) {
    let lanes = S::F32_LANES;
    let (pairs, singles) = column_split(hd, lanes);
    for c in (0..pairs).step_by(2 * lanes) {
        let zero = simd.splat_f32s(0.0);
        let mut t = [[zero; 2]; N];
        for r in 0..N {
            t[r] = load2::<S>(&acc[r * hd + c..r * hd + c + 2 * lanes]);
        }
        for j in 0..nk {
            let [b0, b1] = load2::<S>(&rows.row(j)[c..c + 2 * lanes]);
            for r in 0..N {
                let x = simd.splat_f32s(weights[r][j]);
                t[r][0] = simd.mul_add_f32s(x, b0, t[r][0]);
                t[r][1] = simd.mul_add_f32s(x, b1, t[r][1]);
            }
        }
        for r in 0..N {
            let dst = S::as_mut_simd_f32s(&mut acc[r * hd + c..r * hd + c + 2 * lanes]).0;
            dst[0] = t[r][0];
            dst[1] = t[r][1];
        }
    }
    // One vector per row (a head size of 16 with 16 lanes).
    for c in (pairs..singles).step_by(lanes) {
        let zero = simd.splat_f32s(0.0);
        let mut t = [zero; N];
        for r in 0..N {
            t[r] = S::as_simd_f32s(&acc[r * hd + c..r * hd + c + lanes]).0[0];
        }
        for j in 0..nk {
            let b = S::as_simd_f32s(&rows.row(j)[c..c + lanes]).0[0];
            for r in 0..N {
                t[r] = simd.mul_add_f32s(simd.splat_f32s(weights[r][j]), b, t[r]);
            }
        }
        for r in 0..N {
            S::as_mut_simd_f32s(&mut acc[r * hd + c..r * hd + c + lanes]).0[0] = t[r];
        }
    }
    for c in singles..hd {
        for r in 0..N {
            let mut sum = acc[r * hd + c];
            for j in 0..nk {
                sum = weights[r][j].mul_add(rows.row(j)[c], sum);
            }
            acc[r * hd + c] = sum;
        }
    }
}

/// Columns `0..pairs` go two vectors at a time, `pairs..singles` one vector at a time, the
/// rest one float at a time.
#[inline(always)]
fn column_split(hd: usize, lanes: usize) -> (usize, usize) {
    let pairs = hd / (2 * lanes) * (2 * lanes);
    (pairs, pairs + (hd - pairs) / lanes * lanes)
}

/// `out[j] += sum_r weights[r][j] * rows[r]` for keys `j < nk` (`out` is `[nk][hd]`): the
/// key-side products of the backward (dV from P and dO, dK from dS and Q).
#[inline(always)]
fn tile_accumulate_keys<S: Simd>(
    simd: S,
    out: &mut [f32],
    nk: usize,
    weights: &[[f32; KEY_BLOCK]; GROUP],
    rows: &[&[f32]; GROUP],
    hd: usize,
) {
    let lanes = S::F32_LANES;
    let (pairs, singles) = column_split(hd, lanes);
    for c in (0..pairs).step_by(2 * lanes) {
        let held: [[S::f32s; 2]; GROUP] = std::array::from_fn(|r| load2::<S>(&rows[r][c..c + 2 * lanes]));
        for j in 0..nk {
            let slot = S::as_mut_simd_f32s(&mut out[j * hd + c..j * hd + c + 2 * lanes]).0;
            let (mut t0, mut t1) = (slot[0], slot[1]);
            for r in 0..GROUP {
                let x = simd.splat_f32s(weights[r][j]);
                t0 = simd.mul_add_f32s(x, held[r][0], t0);
                t1 = simd.mul_add_f32s(x, held[r][1], t1);
            }
            slot[0] = t0;
            slot[1] = t1;
        }
    }
    for c in (pairs..singles).step_by(lanes) {
        let held: [S::f32s; GROUP] = std::array::from_fn(|r| S::as_simd_f32s(&rows[r][c..c + lanes]).0[0]);
        for j in 0..nk {
            let slot = &mut S::as_mut_simd_f32s(&mut out[j * hd + c..j * hd + c + lanes]).0[0];
            let mut t = *slot;
            for r in 0..GROUP {
                t = simd.mul_add_f32s(simd.splat_f32s(weights[r][j]), held[r], t);
            }
            *slot = t;
        }
    }
    for c in singles..hd {
        for j in 0..nk {
            let mut sum = out[j * hd + c];
            for r in 0..GROUP {
                sum = weights[r][j].mul_add(rows[r][c], sum);
            }
            out[j * hd + c] = sum;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------

/// The forward's results: output `[b, heads, s, hd]` and log-sum-exp `[b, kvh, rep, s]`.
#[derive(Debug, Clone)]
pub struct Forward {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

/// The query rows of one task: for each of its batch rows, `rep` heads x `rows` positions,
/// index `((bi - b0) * rep + r) * rows + i`.
struct TaskRows {
    /// Scaled queries, `[batch rows * rep * rows][hd]`.
    q: Vec<f32>,
    /// Positions per head.
    rows: usize,
    /// First query position.
    q0: usize,
    /// First batch row.
    b0: usize,
}

impl TaskRows {
    #[inline(always)]
    fn new(problem: &Problem, sz: &Sizes, (b0, b1): (usize, usize), g: usize, (q0, q1): (usize, usize)) -> Self {
        let rows = q1 - q0;
        let mut q = Vec::with_capacity((b1 - b0) * sz.rep * rows * sz.hd);
        for bi in b0..b1 {
            for r in 0..sz.rep {
                for i in q0..q1 {
                    q.extend(problem.q.row(bi, g * sz.rep + r, i).iter().map(|x| x * sz.scale));
                }
            }
        }
        Self { q, rows, q0, b0 }
    }

    /// Rows of batch row `bi` (all its heads and positions), a range of the task's rows.
    #[inline(always)]
    fn of_batch_row(&self, sz: &Sizes, bi: usize) -> (usize, usize) {
        let per_batch_row = sz.rep * self.rows;
        let first = (bi - self.b0) * per_batch_row;
        (first, first + per_batch_row)
    }
}

/// The slices of `GROUP` consecutive rows of a `[n][hd]` buffer starting at `first` (rows
/// past the end are `zero`).
#[inline(always)]
fn group_rows<'a>(buffer: &'a [f32], first: usize, n: usize, hd: usize, zero: &'a [f32]) -> [&'a [f32]; GROUP] {
    std::array::from_fn(|r| if r < n { &buffer[(first + r) * hd..(first + r + 1) * hd] } else { zero })
}

/// One task's online softmax over key blocks: its query rows of one kv head (batch rows x
/// `rep` heads x positions).
struct OnlineRows {
    max: Vec<f32>,
    norm: Vec<f32>,
    /// Unnormalized outputs, `[rows][hd]`.
    acc: Vec<f32>,
}

impl OnlineRows {
    /// Folds a group's scores (masked) of one key block into rows `first..first + n`: the
    /// scores become the block's weights and the rows' outputs are rescaled. Reductions run
    /// over vector lanes (a sequential float sum would be a chain of dependent
    /// additions as slow as the block's products).
    #[inline(always)]
    fn update<S: Simd>(&mut self, simd: S, first: usize, n: usize, nk: usize, hd: usize, tile: &mut [[f32; KEY_BLOCK]; GROUP]) {
        for (r, scores) in tile.iter_mut().enumerate() {
            if r >= n {
                scores.fill(0.0);
                continue;
            }
            scores[nk..].fill(MASKED);
            let row = first + r;
            let vectors = S::as_simd_f32s(scores).0;
            let block_max = simd.reduce_max_f32s(vectors.iter().fold(simd.splat_f32s(MASKED), |m, &v| simd.max_f32s(m, v)));
            let new_max = self.max[row].max(block_max);
            let correction = exp_nonpositive(self.max[row] - new_max);
            for x in scores.iter_mut() {
                *x = exp_nonpositive(*x - new_max);
            }
            let vectors = S::as_simd_f32s(scores).0;
            let sum = simd.reduce_sum_f32s(vectors.iter().fold(simd.splat_f32s(0.0), |t, &v| simd.add_f32s(t, v)));
            self.norm[row] = self.norm[row] * correction + sum;
            self.max[row] = new_max;
            if correction != 1.0 {
                self.acc[row * hd..(row + 1) * hd].iter_mut().for_each(|a| *a *= correction);
            }
        }
    }
}

/// One forward task's buffers: its query rows, online softmax state and scratch space.
struct ForwardScratch {
    rows: TaskRows,
    state: OnlineRows,
    kt: Vec<f32>,
    zero: Vec<f32>,
    tile: [[f32; KEY_BLOCK]; GROUP],
}

impl ForwardScratch {
    /// Folds one key block into the task's rows `lo..hi`: all of them for a shared prefix
    /// block, one batch row's for its own keys (`bi`, masked causally and by padding).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn block<S: Simd>(
        &mut self,
        simd: S,
        problem: &Problem,
        sz: &Sizes,
        (keys, values): (KeyRows, KeyRows),
        k1: usize,
        (lo, hi): (usize, usize),
        own: Option<usize>,
    ) {
        let (k0, g) = (keys.k0, keys.g);
        let nk = k1 - k0;
        let direct = own.is_some() && sz.rep * sz.s <= DOT_ROWS;
        if !direct {
            transpose_block(keys.view, keys.batch, g, (k0, k1), &mut self.kt);
        }
        for first in (lo..hi).step_by(GROUP) {
            let n = GROUP.min(hi - first);
            let group = group_rows(&self.rows.q, first, n, sz.hd, &self.zero);
            if direct {
                dot_scores(simd, &group[..n], keys, nk, &mut self.tile);
            } else {
                tile_scores(simd, &group, &self.kt, sz.hd, &mut self.tile);
            }
            if let Some(bi) = own {
                for (r, scores) in self.tile.iter_mut().enumerate().take(n) {
                    let i = self.rows.q0 + (first + r - lo) % self.rows.rows;
                    problem.mask_scores(bi, sz.t, i, k0, &mut scores[..nk]);
                }
            }
            self.state.update(simd, first, n, nk, sz.hd, &mut self.tile);
            let acc = &mut self.state.acc[first * sz.hd..(first + n) * sz.hd];
            tile_accumulate(simd, acc, n, &self.tile, nk, values, sz.hd);
        }
    }
}

/// One forward task: query rows `q0..q1` of kv head `g` of batch rows `b0..b1`, all its
/// query heads. A shared prefix's key blocks are read once for all the batch rows. Returns
/// `(out [batch rows][rep][rows][hd], lse [batch rows][rep][rows])`.
#[inline(always)]
fn forward_task<S: Simd>(
    simd: S,
    problem: &Problem,
    sz: &Sizes,
    batch: (usize, usize),
    g: usize,
    span: (usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let rows = TaskRows::new(problem, sz, batch, g, span);
    let total = (batch.1 - batch.0) * sz.rep * rows.rows;
    let state = OnlineRows { max: vec![MASKED; total], norm: vec![0.0; total], acc: vec![0.0; total * sz.hd] };
    let mut scratch =
        ForwardScratch { rows, state, kt: vec![0.0f32; sz.hd * KEY_BLOCK], zero: vec![0.0f32; sz.hd], tile: [[0.0f32; KEY_BLOCK]; GROUP] };
    if let Some((shared_k, shared_v)) = &problem.shared {
        for (k0, k1) in blocks(sz.p, KEY_BLOCK) {
            let (keys, values) = (KeyRows { view: shared_k, batch: 0, g, k0 }, KeyRows { view: shared_v, batch: 0, g, k0 });
            scratch.block(simd, problem, sz, (keys, values), k1, (0, total), None);
        }
    }
    for bi in batch.0..batch.1 {
        let rows = scratch.rows.of_batch_row(sz, bi);
        for (k0, k1) in problem.own_blocks(sz, span.1) {
            let (keys, values) = (KeyRows { view: &problem.own_k, batch: bi, g, k0 }, KeyRows { view: &problem.own_v, batch: bi, g, k0 });
            scratch.block(simd, problem, sz, (keys, values), k1, rows, Some(bi));
        }
    }
    let OnlineRows { max, norm, mut acc } = scratch.state;
    for (r, row) in acc.chunks_mut(sz.hd).enumerate() {
        let inverse = 1.0 / norm[r];
        row.iter_mut().for_each(|a| *a *= inverse);
    }
    let lse = max.iter().zip(&norm).map(|(m, l)| m + l.ln()).collect();
    (acc, lse)
}

struct ForwardTask<'a> {
    problem: &'a Problem<'a>,
    sz: &'a Sizes,
    batch: (usize, usize),
    g: usize,
    q: (usize, usize),
}

impl Task for ForwardTask<'_> {
    type Output = (Vec<f32>, Vec<f32>);

    #[inline(always)]
    fn run<S: Simd>(self, simd: S) -> Self::Output {
        forward_task(simd, self.problem, self.sz, self.batch, self.g, self.q)
    }
}

/// Batch rows per forward task. One, unless a prefix is shared and each row has fewer query
/// positions than a query block (decoding a group): then as many as fill a query block, so
/// that each of the prefix's key blocks is transposed and read once for several rows, while
/// leaving at least two tasks per thread where the batch allows.
fn batch_rows_per_task(sz: &Sizes, shared: bool, threads: usize) -> usize {
    if !shared || sz.p == 0 || sz.b == 0 || sz.s == 0 || sz.s >= QUERY_BLOCK {
        return 1;
    }
    let filling = (QUERY_BLOCK / (sz.s * sz.rep)).max(1);
    let for_threads = (2 * threads).div_ceil(sz.kvh).max(1);
    let chunks = sz.b.div_ceil(filling).max(for_threads).min(sz.b);
    sz.b.div_ceil(chunks.max(1))
}

/// Causal attention over the problem's keys, parallel over (batch rows, kv head, query
/// block).
pub fn forward(problem: &Problem) -> Forward {
    forward_many(std::slice::from_ref(problem)).pop().unwrap_or(Forward { out: Vec::new(), lse: Vec::new() })
}

/// One forward task's place: its problem, batch rows, kv head and query positions.
#[derive(Debug, Clone, Copy)]
struct TaskSpan {
    problem: usize,
    batch: (usize, usize),
    g: usize,
    q: (usize, usize),
}

/// [`forward`] of several problems (a decode batch's segments, each with its own prefix),
/// their tasks run as one parallel loop.
pub fn forward_many(problems: &[Problem]) -> Vec<Forward> {
    // Threads each problem may keep busy on its own.
    let threads = rayon::current_num_threads().div_ceil(problems.len().max(1));
    let sizes: Vec<Sizes> = problems.iter().map(Problem::sizes).collect();
    let mut tasks: Vec<TaskSpan> = Vec::new();
    for (index, (problem, sz)) in problems.iter().zip(&sizes).enumerate() {
        let per_task = batch_rows_per_task(sz, problem.shared.is_some(), threads);
        for batch in blocks(sz.b, per_task) {
            for g in 0..sz.kvh {
                tasks.extend(blocks(sz.s, QUERY_BLOCK).map(|q| TaskSpan { problem: index, batch, g, q }));
            }
        }
    }
    let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|t| vectorized(ForwardTask { problem: &problems[t.problem], sz: &sizes[t.problem], batch: t.batch, g: t.g, q: t.q }))
        .collect();
    let mut outputs: Vec<Forward> = sizes
        .iter()
        .map(|sz| Forward { out: vec![0.0f32; sz.b * sz.heads * sz.s * sz.hd], lse: vec![0.0f32; sz.b * sz.heads * sz.s] })
        .collect();
    for (task, result) in tasks.iter().zip(results) {
        scatter(&sizes[task.problem], task, result, &mut outputs[task.problem]);
    }
    outputs
}

/// Copies a task's outputs `[rows of the task][hd]` and log-sum-exp into the problem's
/// `[b, heads, s, hd]` and `[b, heads, s]` (= `[b, kvh, rep, s]`).
fn scatter(sz: &Sizes, task: &TaskSpan, (task_out, task_lse): (Vec<f32>, Vec<f32>), Forward { out, lse }: &mut Forward) {
    let ((b0, b1), (q0, q1)) = (task.batch, task.q);
    let rows = q1 - q0;
    // The task's rows in order: (batch row, head of the group), then position.
    let heads = (b0..b1).flat_map(|bi| (0..sz.rep).map(move |r| (bi, task.g * sz.rep + r)));
    for (k, (bi, head)) in heads.enumerate() {
        let dst = ((bi * sz.heads + head) * sz.s + q0) * sz.hd;
        out[dst..dst + rows * sz.hd].copy_from_slice(&task_out[k * rows * sz.hd..(k + 1) * rows * sz.hd]);
        let dst = (bi * sz.heads + head) * sz.s + q0;
        lse[dst..dst + rows].copy_from_slice(&task_lse[k * rows..(k + 1) * rows]);
    }
}

// ---------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------

/// What the backward reads besides the problem: the forward's output and log-sum-exp, and
/// the output's gradient (all contiguous, `[b, heads, s, hd]` and `[b, heads, s]`).
#[derive(Debug, Clone, Copy)]
pub struct Saved<'a> {
    pub out: &'a [f32],
    pub lse: &'a [f32],
    pub d_out: &'a [f32],
}

/// Input gradients, contiguous in the inputs' logical shapes.
#[derive(Debug, Clone)]
pub struct Backward {
    pub d_q: Vec<f32>,
    pub d_own_k: Vec<f32>,
    pub d_own_v: Vec<f32>,
    pub d_shared: Option<(Vec<f32>, Vec<f32>)>,
}

/// A list of query rows gathered for the tile kernels: scaled queries, output gradients,
/// log-sum-exp and rowsum(dO * O), and each row's (batch row, position).
struct Gathered {
    q: Vec<f32>,
    d_out: Vec<f32>,
    lse: Vec<f32>,
    delta: Vec<f32>,
    at: Vec<(usize, usize)>,
}

struct Grads<'a> {
    problem: &'a Problem<'a>,
    saved: Saved<'a>,
    sz: Sizes,
    /// rowsum(dO * O), `[b, heads, s]`.
    delta: Vec<f32>,
}

impl<'a> Grads<'a> {
    /// The rows `(bi, head, i)` listed, gathered contiguously.
    #[inline(always)]
    fn gather(&self, rows: impl Iterator<Item = (usize, usize, usize)>) -> Gathered {
        let sz = &self.sz;
        let mut out = Gathered { q: Vec::new(), d_out: Vec::new(), lse: Vec::new(), delta: Vec::new(), at: Vec::new() };
        for (bi, head, i) in rows {
            let index = (bi * sz.heads + head) * sz.s + i;
            out.q.extend(self.problem.q.row(bi, head, i).iter().map(|x| x * sz.scale));
            out.d_out.extend_from_slice(&self.saved.d_out[index * sz.hd..(index + 1) * sz.hd]);
            out.lse.push(self.saved.lse[index]);
            out.delta.push(self.delta[index]);
            out.at.push((bi, i));
        }
        out
    }

    /// Probabilities (into `p`) and score gradients (into `d_s`) of a group of gathered rows
    /// against a key block, masked entries 0.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn group_grads<S: Simd>(
        &self,
        simd: S,
        rows: &Gathered,
        first: usize,
        n: usize,
        (kt, vt): (&[f32], &[f32]),
        (k0, nk): (usize, usize),
        own: bool,
        zero: &[f32],
        (p, d_s): (&mut [[f32; KEY_BLOCK]; GROUP], &mut [[f32; KEY_BLOCK]; GROUP]),
    ) {
        let hd = self.sz.hd;
        tile_scores(simd, &group_rows(&rows.q, first, n, hd, zero), kt, hd, p);
        tile_scores(simd, &group_rows(&rows.d_out, first, n, hd, zero), vt, hd, d_s);
        for r in 0..GROUP {
            if r >= n {
                p[r].fill(0.0);
                d_s[r].fill(0.0);
                continue;
            }
            let (lse, delta) = (rows.lse[first + r], rows.delta[first + r]);
            let (bi, i) = rows.at[first + r];
            // Keys `visible..` are in the row's future or past the block's end.
            let visible = if own { self.problem.causal_keys(i, k0, nk) } else { nk };
            for j in 0..visible {
                let prob = exp_nonpositive((p[r][j] - lse).min(0.0));
                p[r][j] = prob;
                d_s[r][j] = prob * (d_s[r][j] - delta);
            }
            p[r][visible..].fill(0.0);
            d_s[r][visible..].fill(0.0);
            // Padding flags index own keys only (`k0` of a prefix block is no own position).
            if let Some(padding) = own.then(|| self.problem.padding(bi, self.sz.t, k0, nk)).flatten() {
                for (j, &pad) in padding.iter().enumerate() {
                    if pad {
                        p[r][j] = 0.0;
                        d_s[r][j] = 0.0;
                    }
                }
            }
        }
    }

    /// dK and dV of one key block (`[nk][hd]` each) from the query rows that see it.
    #[inline(always)]
    fn key_block<S: Simd>(
        &self,
        simd: S,
        keys: (&View4, &View4, usize),
        g: usize,
        block: (usize, usize),
        batches: std::ops::Range<usize>,
        own: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let sz = &self.sz;
        let (k_view, v_view, key_batch) = keys;
        let nk = block.1 - block.0;
        let (mut kt, mut vt) = (vec![0.0f32; sz.hd * KEY_BLOCK], vec![0.0f32; sz.hd * KEY_BLOCK]);
        let (mut d_k, mut d_v) = (vec![0.0f32; nk * sz.hd], vec![0.0f32; nk * sz.hd]);
        let (mut p, mut d_s) = ([[0.0f32; KEY_BLOCK]; GROUP], [[0.0f32; KEY_BLOCK]; GROUP]);
        let zero = vec![0.0f32; sz.hd];
        for bi in batches {
            let kb = if own { bi } else { key_batch };
            transpose_block(k_view, kb, g, block, &mut kt);
            transpose_block(v_view, kb, g, block, &mut vt);
            // Own keys are seen by queries from `block.0 - past` on.
            let first = if own { block.0.saturating_sub(self.problem.past) } else { 0 };
            let rows = self.gather((0..sz.rep).flat_map(|r| (first..sz.s).map(move |i| (bi, g * sz.rep + r, i))));
            let total = rows.lse.len();
            for start in (0..total).step_by(GROUP) {
                let n = GROUP.min(total - start);
                self.group_grads(simd, &rows, start, n, (&kt, &vt), (block.0, nk), own, &zero, (&mut p, &mut d_s));
                tile_accumulate_keys(simd, &mut d_v, nk, &p, &group_rows(&rows.d_out, start, n, sz.hd, &zero), sz.hd);
                tile_accumulate_keys(simd, &mut d_k, nk, &d_s, &group_rows(&rows.q, start, n, sz.hd, &zero), sz.hd);
            }
        }
        (d_k, d_v)
    }

    /// Adds one key block's part of dQ to rows `rows` of a query block.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn query_block_keys<S: Simd>(
        &self,
        simd: S,
        rows: &Gathered,
        d_q: &mut [f32],
        (keys, values): (KeyRows, KeyRows),
        k1: usize,
        own: bool,
        (kt, vt): (&mut [f32], &mut [f32]),
        scratch: (&mut [[f32; KEY_BLOCK]; GROUP], &mut [[f32; KEY_BLOCK]; GROUP]),
        zero: &[f32],
    ) {
        let hd = self.sz.hd;
        let k0 = keys.k0;
        transpose_block(keys.view, keys.batch, keys.g, (k0, k1), kt);
        transpose_block(values.view, values.batch, values.g, (k0, k1), vt);
        let nk = k1 - k0;
        let total = rows.lse.len();
        let (p, d_s) = scratch;
        for start in (0..total).step_by(GROUP) {
            let n = GROUP.min(total - start);
            self.group_grads(simd, rows, start, n, (kt, vt), (k0, nk), own, zero, (&mut *p, &mut *d_s));
            tile_accumulate(simd, &mut d_q[start * hd..(start + n) * hd], n, d_s, nk, keys, hd);
        }
    }

    /// dQ of query rows `q0..q1` of one head: `scale * sum_j dS_j k_j` over every key they
    /// see, `[rows][hd]`.
    #[inline(always)]
    fn query_block<S: Simd>(&self, simd: S, bi: usize, head: usize, (q0, q1): (usize, usize)) -> Vec<f32> {
        let sz = &self.sz;
        let g = head / sz.rep;
        let rows = self.gather((q0..q1).map(|i| (bi, head, i)));
        let mut d_q = vec![0.0f32; (q1 - q0) * sz.hd];
        let (mut kt, mut vt) = (vec![0.0f32; sz.hd * KEY_BLOCK], vec![0.0f32; sz.hd * KEY_BLOCK]);
        let (mut p, mut d_s) = ([[0.0f32; KEY_BLOCK]; GROUP], [[0.0f32; KEY_BLOCK]; GROUP]);
        let zero = vec![0.0f32; sz.hd];
        if let Some((shared_k, shared_v)) = &self.problem.shared {
            for (k0, k1) in blocks(sz.p, KEY_BLOCK) {
                let pair = (KeyRows { view: shared_k, batch: 0, g, k0 }, KeyRows { view: shared_v, batch: 0, g, k0 });
                self.query_block_keys(simd, &rows, &mut d_q, pair, k1, false, (&mut kt, &mut vt), (&mut p, &mut d_s), &zero);
            }
        }
        for (k0, k1) in self.problem.own_blocks(sz, q1) {
            let pair = (KeyRows { view: &self.problem.own_k, batch: bi, g, k0 }, KeyRows { view: &self.problem.own_v, batch: bi, g, k0 });
            self.query_block_keys(simd, &rows, &mut d_q, pair, k1, true, (&mut kt, &mut vt), (&mut p, &mut d_s), &zero);
        }
        d_q.iter_mut().for_each(|x| *x *= sz.scale);
        d_q
    }
}

/// dK and dV of one key block (see [`Grads::key_block`]).
struct KeyBlockTask<'a> {
    grads: &'a Grads<'a>,
    keys: (&'a View4<'a>, &'a View4<'a>, usize),
    g: usize,
    block: (usize, usize),
    batches: std::ops::Range<usize>,
    own: bool,
}

impl Task for KeyBlockTask<'_> {
    type Output = (Vec<f32>, Vec<f32>);

    #[inline(always)]
    fn run<S: Simd>(self, simd: S) -> Self::Output {
        self.grads.key_block(simd, self.keys, self.g, self.block, self.batches, self.own)
    }
}

/// dQ of one block of query rows of one head.
struct QueryBlockTask<'a> {
    grads: &'a Grads<'a>,
    bi: usize,
    head: usize,
    rows: (usize, usize),
}

impl Task for QueryBlockTask<'_> {
    type Output = Vec<f32>;

    #[inline(always)]
    fn run<S: Simd>(self, simd: S) -> Vec<f32> {
        self.grads.query_block(simd, self.bi, self.head, self.rows)
    }
}

/// The FlashAttention-2 backward: dK and dV by key block, then dQ by query block, each
/// block's scores recomputed from the saved log-sum-exp.
pub fn backward(problem: &Problem, saved: Saved) -> Backward {
    let sz = problem.sizes();
    let delta: Vec<f32> =
        saved.d_out.chunks(sz.hd).zip(saved.out.chunks(sz.hd)).map(|(g, o)| g.iter().zip(o).map(|(a, b)| a * b).sum()).collect();
    let grads = Grads { problem, saved, sz, delta };
    let d_own = own_key_grads(&grads);
    let d_shared = problem.shared.as_ref().map(|shared| shared_key_grads(&grads, shared));
    let d_q = query_grads(&grads);
    Backward { d_q, d_own_k: d_own.0, d_own_v: d_own.1, d_shared }
}

/// dK, dV of the own keys, `[b, kvh, t, hd]`.
fn own_key_grads(grads: &Grads) -> (Vec<f32>, Vec<f32>) {
    let sz = grads.sz;
    let tasks: Vec<(usize, usize, (usize, usize))> =
        (0..sz.b).flat_map(|bi| (0..sz.kvh).flat_map(move |g| blocks(sz.t, KEY_BLOCK).map(move |k| (bi, g, k)))).collect();
    let keys = (&grads.problem.own_k, &grads.problem.own_v, 0);
    let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(bi, g, block)| vectorized(KeyBlockTask { grads, keys, g, block, batches: bi..bi + 1, own: true }))
        .collect();
    let (mut d_k, mut d_v) = (vec![0.0f32; sz.b * sz.kvh * sz.t * sz.hd], vec![0.0f32; sz.b * sz.kvh * sz.t * sz.hd]);
    for (&(bi, g, (k0, k1)), (bk, bv)) in tasks.iter().zip(results) {
        let dst = ((bi * sz.kvh + g) * sz.t + k0) * sz.hd;
        d_k[dst..dst + (k1 - k0) * sz.hd].copy_from_slice(&bk);
        d_v[dst..dst + (k1 - k0) * sz.hd].copy_from_slice(&bv);
    }
    (d_k, d_v)
}

/// dK, dV of the shared prefix, `[1, kvh, p, hd]`, summed over the batch.
fn shared_key_grads(grads: &Grads, shared: &(View4, View4)) -> (Vec<f32>, Vec<f32>) {
    let sz = grads.sz;
    let tasks: Vec<(usize, (usize, usize))> = (0..sz.kvh).flat_map(|g| blocks(sz.p, KEY_BLOCK).map(move |k| (g, k))).collect();
    let keys = (&shared.0, &shared.1, 0);
    let results: Vec<(Vec<f32>, Vec<f32>)> =
        tasks.par_iter().map(|&(g, block)| vectorized(KeyBlockTask { grads, keys, g, block, batches: 0..sz.b, own: false })).collect();
    let (mut d_k, mut d_v) = (vec![0.0f32; sz.kvh * sz.p * sz.hd], vec![0.0f32; sz.kvh * sz.p * sz.hd]);
    for (&(g, (k0, k1)), (bk, bv)) in tasks.iter().zip(results) {
        let dst = (g * sz.p + k0) * sz.hd;
        d_k[dst..dst + (k1 - k0) * sz.hd].copy_from_slice(&bk);
        d_v[dst..dst + (k1 - k0) * sz.hd].copy_from_slice(&bv);
    }
    (d_k, d_v)
}

/// dQ, `[b, heads, s, hd]`.
fn query_grads(grads: &Grads) -> Vec<f32> {
    let sz = grads.sz;
    let tasks: Vec<(usize, usize, (usize, usize))> =
        (0..sz.b).flat_map(|bi| (0..sz.heads).flat_map(move |h| blocks(sz.s, QUERY_BLOCK).map(move |q| (bi, h, q)))).collect();
    let results: Vec<Vec<f32>> = tasks.par_iter().map(|&(bi, head, rows)| vectorized(QueryBlockTask { grads, bi, head, rows })).collect();
    let mut d_q = vec![0.0f32; sz.b * sz.heads * sz.s * sz.hd];
    for (&(bi, head, (q0, q1)), rows) in tasks.iter().zip(results) {
        let dst = ((bi * sz.heads + head) * sz.s + q0) * sz.hd;
        d_q[dst..dst + (q1 - q0) * sz.hd].copy_from_slice(&rows);
    }
    d_q
}
