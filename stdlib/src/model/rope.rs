//! Rotary position embedding in the Hugging Face convention ("rotate half": dimension i
//! pairs with i + head_dim/2), with the frequency scalings of [`RopeScaling`]. Burn's own
//! `RotaryEncoding` pairs adjacent dimensions instead, which would not match HF weights.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::model::config::RopeScaling;

/// Inverse frequencies of one head, computed in f32 as transformers does.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: RopeScaling) -> Self {
        let base = theta as f32;
        let mut inv_freq: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32)).collect();
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen { *f / factor } else { *f };
                    let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                    *f = if medium {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Self { inv_freq }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Cosine and sine tables for the given positions.
    ///
    /// # Shapes
    /// - positions: `[batch, seq]` (float, absolute positions)
    /// - returns: two `[batch, 1, seq, head_dim]` tensors
    pub fn tables<B: Backend>(&self, positions: Tensor<B, 2>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let device = positions.device();
        let half = self.inv_freq.len();
        let inv_freq = Tensor::<B, 1>::from_data(TensorData::new(self.inv_freq.clone(), [half]), &device).reshape([1, 1, half]); // [1, 1, half]
        let angles = positions.unsqueeze_dim::<3>(2) * inv_freq; // [batch, seq, half]
        let angles = Tensor::cat(vec![angles.clone(), angles], 2); // [batch, seq, head_dim]
        (angles.clone().cos().unsqueeze_dim(1), angles.sin().unsqueeze_dim(1))
    }

    /// Rotates queries or keys.
    ///
    /// # Shapes
    /// - x: `[batch, heads, seq, head_dim]`; cos, sin: `[batch, 1, seq, head_dim]`
    pub fn apply<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, s, d] = x.dims();
        let first = x.clone().slice([0..b, 0..h, 0..s, 0..d / 2]);
        let second = x.clone().slice([0..b, 0..h, 0..s, d / 2..d]);
        let rotated = Tensor::cat(vec![second.neg(), first], 3); // [b, h, s, d]
        x * cos + rotated * sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use longrl_backends::Cpu;

    #[test]
    fn rotation_pairs_i_with_i_plus_half_and_keeps_norms() {
        let device = Default::default();
        let rope = Rope::new(4, 10_000.0, RopeScaling::None);
        assert_eq!(rope.inv_freq(), &[1.0, 0.01]);
        let x = Tensor::<Cpu, 4>::from_floats([[[[1.0, 2.0, 3.0, 4.0]]]], &device);
        let positions = Tensor::<Cpu, 2>::from_floats([[3.0]], &device);
        let (cos, sin) = rope.tables(positions);
        let y: Vec<f32> = Rope::apply(x, cos, sin).into_data().to_vec().expect("f32");
        // Pair (x0, x2) rotates by 3 rad, pair (x1, x3) by 0.03 rad.
        let (c0, s0, c1, s1) = (3f32.cos(), 3f32.sin(), 0.03f32.cos(), 0.03f32.sin());
        let expected = [1.0 * c0 - 3.0 * s0, 2.0 * c1 - 4.0 * s1, 3.0 * c0 + 1.0 * s0, 4.0 * c1 + 2.0 * s1];
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-5, "{y:?} vs {expected:?}");
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let plain = Rope::new(128, 500_000.0, RopeScaling::None);
        let scaled = Rope::new(
            128,
            500_000.0,
            RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 },
        );
        assert_eq!(plain.inv_freq()[0], scaled.inv_freq()[0]);
        let last = plain.inv_freq().len() - 1;
        assert!((plain.inv_freq()[last] / 8.0 - scaled.inv_freq()[last]).abs() < 1e-12);
    }
}
