//! Fused kernels of the CPU backend (burn-flex), over f32 slices read from Flex tensors
//! through their strides: no layout copies, one pass where Burn's ops take several, parallel
//! with rayon, and compiled for the machine's vector unit at run time.

pub mod adamw;
pub mod attention;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;
pub mod token_scores;

use burn::tensor::TensorData;
use burn_flex::FlexTensor;

use attention::View4;

/// A piece of kernel work, written over pulp's portable vector type `S::f32s` (8 lanes with
/// AVX2, 16 with AVX-512). Its `run` must be `#[inline(always)]`, as must every function in
/// its hot path, so that [`vectorized`] compiles it for the CPU's vector extension.
pub trait Task {
    type Output;
    fn run<S: pulp::Simd>(self, simd: S) -> Self::Output;
}

/// A [`Task`] as pulp's dispatch takes it.
struct Dispatched<T>(T);

impl<T: Task> pulp::WithSimd for Dispatched<T> {
    type Output = T::Output;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) -> T::Output {
        self.0.run(simd)
    }
}

/// Runs `task` in code compiled for the best vector extension this CPU has (AVX2 with FMA,
/// or AVX-512, on x86-64), chosen at run time, so one binary runs everywhere: the task's
/// loops vectorize for that extension and `mul_add` is one instruction.
pub fn vectorized<T: Task>(task: T) -> T::Output {
    pulp::Arch::new().dispatch(Dispatched(task))
}

/// A 4-D f32 tensor's view, when its last dimension is contiguous and its strides are
/// non-negative.
pub fn view4(tensor: &FlexTensor) -> Option<View4<'_>> {
    if tensor.dtype() != burn::tensor::DType::F32 {
        return None;
    }
    let layout = tensor.layout();
    let dims: Vec<usize> = layout.shape().iter().copied().collect();
    let strides = layout.strides();
    if dims.len() != 4 || (strides[3] != 1 && dims[3] > 1) || strides.iter().any(|&s| s < 0) {
        return None;
    }
    let data = tensor.storage::<f32>();
    Some(View4 {
        data,
        offset: layout.start_offset(),
        strides: [strides[0] as usize, strides[1] as usize, strides[2] as usize],
        dims: [dims[0], dims[1], dims[2], dims[3]],
    })
}

/// Multiply-adds from which a product pays for being split over threads (a rayon task
/// costs a few microseconds; a million multiply-adds take about ten on one core).
const SPLIT_FROM_MACS: usize = 1 << 20;
/// Multiply-adds from which Burn's CPU matmul threads a single product itself (192^3).
const THREADED_FROM_MACS: usize = 192 * 192 * 192;
/// Fewest rows per block: fewer would waste the gemm kernel's row tile.
const MIN_BLOCK_ROWS: usize = 16;

/// Row blocks for a `[rows, k] x [k, n]` product on `threads` threads (see
/// `Kernels::product_row_blocks`): as many as threads, of at least [`MIN_BLOCK_ROWS`] rows
/// each and dividing the rows evenly; 1 where the product is too small to gain or large
/// enough for the matmul to thread it.
pub fn row_blocks(rows: usize, k: usize, n: usize, threads: usize) -> usize {
    let macs = rows.saturating_mul(k).saturating_mul(n);
    if !(SPLIT_FROM_MACS..THREADED_FROM_MACS).contains(&macs) {
        return 1;
    }
    (2..=threads.min(rows / MIN_BLOCK_ROWS)).rev().find(|blocks| rows % blocks == 0).unwrap_or(1)
}

/// A contiguous f32 tensor of `shape` holding `values`.
pub fn tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

/// `sum_i a[i] b[i]`, vectorized (lanes summed at the end).
#[inline(always)]
pub(crate) fn dot<S: pulp::Simd>(simd: S, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a_head, a_tail) = S::as_simd_f32s(&a[..n]);
    let (b_head, b_tail) = S::as_simd_f32s(&b[..n]);
    let mut acc = simd.splat_f32s(0.0);
    for (&x, &y) in a_head.iter().zip(b_head) {
        acc = simd.mul_add_f32s(x, y, acc);
    }
    let mut sum = simd.reduce_sum_f32s(acc);
    for (&x, &y) in a_tail.iter().zip(b_tail) {
        sum = x.mul_add(y, sum);
    }
    sum
}

/// `sum_i a[i] b[i] c[i]`, vectorized.
#[inline(always)]
pub(crate) fn dot3<S: pulp::Simd>(simd: S, a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a_head, a_tail) = S::as_simd_f32s(&a[..n]);
    let (b_head, b_tail) = S::as_simd_f32s(&b[..n]);
    let (c_head, c_tail) = S::as_simd_f32s(&c[..n]);
    let mut acc = simd.splat_f32s(0.0);
    for ((&x, &y), &z) in a_head.iter().zip(b_head).zip(c_head) {
        acc = simd.mul_add_f32s(simd.mul_f32s(x, y), z, acc);
    }
    let mut sum = simd.reduce_sum_f32s(acc);
    for ((&x, &y), &z) in a_tail.iter().zip(b_tail).zip(c_tail) {
        sum = (x * y).mul_add(z, sum);
    }
    sum
}

/// A tensor's values as one contiguous f32 slice (copied into `holder` first when the
/// tensor is a strided view), or `None` when it is not f32.
pub fn f32_values<'a>(tensor: &FlexTensor, holder: &'a mut Option<FlexTensor>) -> Option<&'a [f32]> {
    if tensor.dtype() != burn::tensor::DType::F32 {
        return None;
    }
    let contiguous = holder.insert(tensor.to_contiguous());
    contiguous.as_slice::<f32>()
}

/// `exp(x)` for x <= 0 within about 2e-7 relative, 0 below -87; written so that loops over
/// it vectorize.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let clamped = x.max(-87.0);
    let t = clamped * std::f32::consts::LOG2_E;
    // Round to nearest by adding and removing 1.5 * 2^23 (plain arithmetic, so it
    // vectorizes without SSE4.1).
    let n = (t + 12_582_912.0) - 12_582_912.0;
    let y = (t - n) * std::f32::consts::LN_2;
    let poly = 1.0 + y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 { 0.0 } else { poly * scale }
}

/// A tensor as a contiguous tensor covering its whole buffer, which this caller owns alone
/// unless the buffer is shared elsewhere (then writing its storage copies it first): a copy
/// only when it was a view.
pub fn owned_contiguous(tensor: FlexTensor) -> FlexTensor {
    let contiguous = tensor.to_contiguous();
    drop(tensor);
    contiguous
}

#[cfg(test)]
mod tests {
    use super::row_blocks;

    #[test]
    fn products_split_into_even_row_blocks_only_between_the_thresholds() {
        // A decode step of 64 rows of a small model: one block per thread.
        assert_eq!(row_blocks(64, 128, 384, 2), 2);
        assert_eq!(row_blocks(64, 128, 384, 16), 4); // at least 16 rows a block
        assert_eq!(row_blocks(48, 128, 384, 4), 3); // 4 does not divide 48
        assert_eq!(row_blocks(61, 128, 384, 4), 1); // a prime: no even split
        // Too small to gain (one group of 8 rows), or threaded by the matmul itself.
        assert_eq!(row_blocks(8, 128, 1024, 2), 1);
        assert_eq!(row_blocks(64, 576, 1536, 2), 1);
        assert_eq!(row_blocks(64, 128, 384, 1), 1);
    }
}
