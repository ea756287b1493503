//! Writing a block of values into a tensor's own buffer. Burn's `slice_assign` on the CPU
//! backend (burn-flex 0.21) copies the whole destination on every call, even when the
//! tensor is uniquely owned (the shadowed input keeps a second reference to the buffer while
//! the copy-on-write happens), so a KV cache grown one token at a time with it costs a copy
//! of the cache per token. [`assign`] writes into the buffer itself when the destination is
//! a uniquely owned, contiguous f32 tensor, and falls back to `slice_assign` otherwise.

use std::ops::Range;

use burn::tensor::DType;
use burn::tensor::Slice;
use burn::tensor::ops::FloatTensorOps;
use burn_flex::FlexTensor;

/// `tensor[ranges] = value`, in place when `tensor` is a uniquely owned contiguous f32
/// tensor (its buffer is not shared with any view or clone), else through Burn's
/// `slice_assign`. `value` may be any view (e.g. a slice of `tensor` itself).
///
/// # Shapes
/// - `ranges`: one range per dimension of `tensor`; `value` has the ranges' lengths.
pub fn assign(mut tensor: FlexTensor, ranges: &[Range<usize>], value: FlexTensor) -> FlexTensor {
    let shape: Vec<usize> = tensor.layout().shape().iter().copied().collect();
    let block: Vec<usize> = ranges.iter().map(|r| r.end.saturating_sub(r.start)).collect();
    let value_shape: Vec<usize> = value.layout().shape().iter().copied().collect();
    let fits = ranges.len() == shape.len() && ranges.iter().zip(&shape).all(|(r, &n)| r.start <= r.end && r.end <= n);
    let whole =
        tensor.is_contiguous() && tensor.layout().start_offset() == 0 && tensor.bytes().len() == 4 * shape.iter().product::<usize>();
    if tensor.dtype() != DType::F32 || value.dtype() != DType::F32 || !fits || !whole || value_shape != block {
        return fallback(tensor, ranges, value);
    }
    // The values are copied out first, and `value` dropped: it may be a view of `tensor`'s
    // own buffer, which would make the buffer shared.
    let values: Vec<f32> = value.into_data().into_vec::<f32>().unwrap_or_default();
    match tensor.try_storage_mut::<f32>() {
        Some(dst) => write_block(dst, &shape, ranges, &values),
        None => {
            let value = FlexTensor::from_data(burn::tensor::TensorData::new(values, block));
            return fallback(tensor, ranges, value);
        }
    }
    tensor
}

/// Copies `values` (row-major, of the ranges' lengths) into the contiguous row-major
/// buffer `dst` of `shape` at `ranges`, one innermost run at a time.
fn write_block(dst: &mut [f32], shape: &[usize], ranges: &[Range<usize>], values: &[f32]) {
    let rank = shape.len();
    if rank == 0 || values.is_empty() {
        return;
    }
    let mut strides = vec![1usize; rank];
    for d in (0..rank - 1).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let run = ranges[rank - 1].end - ranges[rank - 1].start;
    let outer: Vec<usize> = ranges[..rank - 1].iter().map(|r| r.end - r.start).collect();
    let mut index = vec![0usize; rank - 1];
    for chunk in values.chunks_exact(run) {
        let start: usize = (0..rank - 1).map(|d| (ranges[d].start + index[d]) * strides[d]).sum::<usize>() + ranges[rank - 1].start;
        dst[start..start + run].copy_from_slice(chunk);
        // Next index of the outer dimensions, last fastest.
        for d in (0..rank - 1).rev() {
            index[d] += 1;
            if index[d] < outer[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

fn fallback(tensor: FlexTensor, ranges: &[Range<usize>], value: FlexTensor) -> FlexTensor {
    let slices: Vec<Slice> = ranges.iter().map(|r| Slice::from(r.clone())).collect();
    <crate::Cpu as FloatTensorOps<crate::Cpu>>::float_slice_assign(tensor, &slices, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn flex(values: Vec<f32>, shape: [usize; 3]) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    fn values(tensor: FlexTensor) -> Vec<f32> {
        tensor.into_data().into_vec::<f32>().expect("f32")
    }

    #[test]
    fn a_uniquely_owned_tensor_is_written_in_its_own_buffer() {
        let tensor = flex(vec![0.0; 2 * 3 * 4], [2, 3, 4]);
        let before = tensor.storage::<f32>().as_ptr();
        let out = assign(tensor, &[0..2, 1..2, 1..3], flex(vec![1.0, 2.0, 3.0, 4.0], [2, 1, 2]));
        assert_eq!(out.storage::<f32>().as_ptr(), before, "no copy of the destination");
        let mut expected = vec![0.0; 24];
        expected[4 + 1] = 1.0;
        expected[4 + 2] = 2.0;
        expected[12 + 4 + 1] = 3.0;
        expected[12 + 4 + 2] = 4.0;
        assert_eq!(values(out), expected);
    }

    #[test]
    fn a_view_of_the_tensor_itself_is_copied_out_before_the_write() {
        // Row 1 := row 0, through a slice of the same buffer.
        let tensor = flex((0..12).map(|v| v as f32).collect(), [3, 2, 2]);
        let before = tensor.storage::<f32>().as_ptr();
        let row0 = slice(&tensor, [0..1, 0..2, 0..2]);
        let out = assign(tensor, &[1..2, 0..2, 0..2], row0);
        assert_eq!(out.storage::<f32>().as_ptr(), before, "still written in place");
        assert_eq!(values(out), vec![0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0, 8.0, 9.0, 10.0, 11.0]);
    }

    #[test]
    fn a_shared_tensor_is_left_intact_and_the_result_matches_slice_assign() {
        let tensor = flex((0..12).map(|v| v as f32).collect(), [3, 2, 2]);
        let keep = tensor.clone();
        let out = assign(tensor, &[2..3, 1..2, 0..2], flex(vec![-1.0, -2.0], [1, 1, 2]));
        assert_eq!(values(keep), (0..12).map(|v| v as f32).collect::<Vec<_>>(), "the other owner sees no change");
        let mut expected: Vec<f32> = (0..12).map(|v| v as f32).collect();
        expected[10] = -1.0;
        expected[11] = -2.0;
        assert_eq!(values(out), expected);
    }

    fn slice(tensor: &FlexTensor, ranges: [Range<usize>; 3]) -> FlexTensor {
        let slices: Vec<Slice> = ranges.iter().map(|r| Slice::from(r.clone())).collect();
        <crate::Cpu as FloatTensorOps<crate::Cpu>>::float_slice(tensor.clone(), &slices)
    }
}
