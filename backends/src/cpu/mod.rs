//! Fused kernels of the CPU backend (burn-flex), over f32 slices read from Flex tensors
//! through their strides: no layout copies, one pass where Burn's ops take several, parallel
//! with rayon, and compiled for the machine's vector unit at run time.

pub mod attention;

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

/// A contiguous f32 tensor of `shape` holding `values`.
pub fn tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}
