//! Drawing the next token of every row of a decode batch on the device, so that only the
//! drawn tokens and their log-probabilities come back to the host (`4 x rows` numbers in one
//! transfer) instead of the `[rows, vocab]` logits: on a GPU with Qwen's 152K vocabulary and
//! 64 rows that is 39 MB per decode step, and the host then computes 10M exponentials.
//!
//! Greedy rows take the argmax. A sampled row inverts the CDF of its temperature-scaled
//! weights at one uniform number that the host draws from the row's own stream (the number
//! the host sampler, [`crate::model::sampling::sample_token`], would draw), so an untruncated
//! draw picks the host sampler's token, up to the rounding of the device's sums. Top-k and
//! top-p keep the tokens whose scaled logit reaches a threshold found by bisection (Burn's GPU
//! backends have no sort of their own: theirs copies to the host), so the kept set is the host
//! sampler's except that tokens within 2^-32 of the logit range of the threshold are kept
//! together (as vLLM's top-k keeps ties). Among the kept tokens the CDF runs in vocabulary
//! order, not by weight as on the host: the same distribution, not the same token for a given
//! number.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};

use crate::model::ModelError;
use crate::model::generate::SamplingConfig;
use crate::model::precision::to_f32;

/// Bisection steps for a truncation threshold: the interval ends below 2^-32 of its start.
const BISECTION_STEPS: usize = 32;

/// Tokens below this share of the total weight never matter (the host sampler's floor).
const FLOOR: f32 = 1e-9;

/// One row of a device draw.
#[derive(Debug, Clone, Copy)]
pub struct RowDraw<'a> {
    pub config: &'a SamplingConfig,
    /// A uniform number in [0, 1) from the row's stream; unused when the row is greedy.
    pub uniform: f32,
}

/// Draws one token per row of `logits` on their device; returns each row's token and its
/// log-probability under the temperature-scaled distribution before truncation (as
/// [`crate::model::sampling::sample_token`] does).
///
/// # Shapes
/// - logits: `[rows, vocab]` (any float dtype; computed in f32)
pub fn draw_on_device<B: Backend>(logits: Tensor<B, 2>, rows: &[RowDraw]) -> Result<Vec<(u32, f32)>, ModelError> {
    let [b, vocab] = logits.dims();
    if rows.len() != b {
        return Err(ModelError::Invalid(format!("{} draws for {b} rows of logits", rows.len())));
    }
    if b == 0 {
        return Ok(Vec::new());
    }
    let device = logits.device();
    let column = |values: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(values, [b, 1]), &device);
    let logits = to_f32(logits);
    let shifted = logits.clone() - logits.max_dim(1); // [b, vocab], the largest 0
    let greedy_token = shifted.clone().argmax(1).float(); // [b, 1]
    let greedy_logprob = shifted.clone().exp().sum_dim(1).log().neg(); // [b, 1]

    let temperature = column(rows.iter().map(|r| if r.config.temperature > 0.0 { r.config.temperature } else { 1.0 }).collect());
    let scaled = shifted / temperature; // [b, vocab], log-weights, the largest 0
    let weights = scaled.clone().exp(); // [b, vocab]
    let log_total = weights.clone().sum_dim(1).log(); // [b, 1]
    let kept = match kept_tokens(&scaled, &weights, &log_total, rows) {
        Some(keep) => weights.mask_fill(keep.bool_not(), 0.0),
        None => weights,
    };
    let uniforms = column(rows.iter().map(|r| r.uniform.clamp(0.0, 1.0)).collect());
    let token = inverse_cdf(kept, uniforms).clamp_max((vocab - 1) as f32); // [b, 1]
    let logprob = scaled.gather(1, token.clone().int()) - log_total; // [b, 1]

    let drawn = Tensor::cat(vec![token, logprob, greedy_token, greedy_logprob], 1); // [b, 4]
    let data = drawn.into_data().convert::<f32>();
    let values = data.as_slice::<f32>().map_err(|e| ModelError::Invalid(format!("cannot read drawn tokens: {e:?}")))?;
    Ok(rows
        .iter()
        .zip(values.chunks_exact(4))
        .map(|(row, v)| if row.config.temperature > 0.0 { (v[0] as u32, v[1]) } else { (v[2] as u32, v[3]) })
        .collect())
}

/// The index where each row's running sum of `weights` first reaches `uniform` times its
/// total (the first token with weight when the number is 0).
///
/// # Shapes
/// - weights: `[b, vocab]` (non-negative), uniforms: `[b, 1]` -> `[b, 1]` (indices as floats)
fn inverse_cdf<B: Backend>(weights: Tensor<B, 2>, uniforms: Tensor<B, 2>) -> Tensor<B, 2> {
    let [b, vocab] = weights.dims();
    let cdf = weights.cumsum(1); // [b, vocab]
    // The last running sum as the total: the draw never passes the end of the scan.
    let draw = uniforms * cdf.clone().slice([0..b, vocab - 1..vocab]); // [b, 1]
    let before = (cdf.clone() - draw).lower_elem(0.0).bool_or(cdf.lower_equal_elem(0.0)); // [b, vocab]
    before.float().sum_dim(1)
}

/// Which tokens top-k and top-p leave each truncated row (`None`: no row is truncated).
/// An untruncated row keeps every token.
///
/// # Shapes
/// - scaled, weights: `[b, vocab]`; log_total: `[b, 1]` -> `[b, vocab]`
fn kept_tokens<B: Backend>(
    scaled: &Tensor<B, 2>,
    weights: &Tensor<B, 2>,
    log_total: &Tensor<B, 2>,
    rows: &[RowDraw],
) -> Option<Tensor<B, 2, Bool>> {
    if !rows.iter().any(|r| r.config.truncates()) {
        return None;
    }
    let [b, vocab] = scaled.dims();
    let device = scaled.device();
    let column = |values: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(values, [b, 1]), &device);
    // The host sampler's candidates: weight above FLOOR of the total.
    let floor = log_total.clone().add_scalar(FLOOR.ln()); // [b, 1]
    let mut keep = (scaled.clone() - floor.clone()).greater_elem(0.0); // [b, vocab]

    if rows.iter().any(|r| r.config.truncates() && r.config.top_k > 0) {
        // Rows without top-k ask for more tokens than there are: the threshold stays at the floor.
        let wanted = column(rows.iter().map(|r| if r.config.top_k > 0 { r.config.top_k as f32 } else { (vocab + 1) as f32 }).collect());
        let candidates = keep.clone();
        let threshold = largest_threshold(scaled, floor.clone(), |at: &Tensor<B, 2, Bool>| {
            at.clone().bool_and(candidates.clone()).float().sum_dim(1) - wanted.clone()
        });
        keep = keep.bool_and((scaled.clone() - threshold).greater_equal_elem(0.0));
    }
    if rows.iter().any(|r| r.config.truncates() && r.config.top_p < 1.0) {
        let share = column(rows.iter().map(|r| if r.config.top_p < 1.0 { r.config.top_p } else { f32::INFINITY }).collect());
        let candidates = weights.clone().mask_fill(keep.clone().bool_not(), 0.0); // [b, vocab]
        let wanted = candidates.clone().sum_dim(1) * share; // [b, 1]
        let threshold = largest_threshold(scaled, floor, |at: &Tensor<B, 2, Bool>| {
            candidates.clone().mask_fill(at.clone().bool_not(), 0.0).sum_dim(1) - wanted.clone()
        });
        keep = keep.bool_and((scaled.clone() - threshold).greater_equal_elem(0.0));
    }
    let untruncated: Vec<bool> = rows.iter().map(|r| !r.config.truncates()).collect();
    let untruncated = Tensor::<B, 2, Bool>::from_data(TensorData::new(untruncated, [b, 1]), &device);
    Some(keep.bool_or(untruncated.expand([b, vocab])))
}

/// Per row, the largest threshold `t` in `[low, 0]` (to within 2^-32 of the interval) whose
/// set `scaled >= t` still satisfies `enough(set) >= 0`; `low` when none above it does. The
/// largest log-weight is 0, so the set at a threshold below 0 is never empty.
///
/// # Shapes
/// - scaled: `[b, vocab]`; low: `[b, 1]`; `enough` maps a `[b, vocab]` set to `[b, 1]` -> `[b, 1]`
fn largest_threshold<B: Backend>(
    scaled: &Tensor<B, 2>,
    low: Tensor<B, 2>,
    enough: impl Fn(&Tensor<B, 2, Bool>) -> Tensor<B, 2>,
) -> Tensor<B, 2> {
    let mut low = low;
    let mut high = low.zeros_like();
    for _ in 0..BISECTION_STEPS {
        let middle = (low.clone() + high.clone()).mul_scalar(0.5);
        let at = (scaled.clone() - middle.clone()).greater_equal_elem(0.0);
        let satisfied = enough(&at).greater_equal_elem(0.0); // [b, 1]
        low = low.mask_where(satisfied.clone(), middle.clone());
        high = high.mask_where(satisfied.bool_not(), middle);
    }
    low
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sampling::{sample_rng, sample_token, truncated_candidates};
    use longrl_backends::Cpu;
    use rand::Rng;
    use rand_distr::{Distribution, Normal};

    /// `rows` rows of `vocab` normal logits (no ties) with the given spread.
    fn random_logits(rows: usize, vocab: usize, scale: f32, seed: u64) -> Vec<Vec<f32>> {
        let mut source = sample_rng(seed, 0);
        let normal = Normal::new(0.0f32, scale).expect("valid");
        (0..rows).map(|_| (0..vocab).map(|_| normal.sample(&mut source)).collect()).collect()
    }

    fn tensor(rows: &[Vec<f32>]) -> Tensor<Cpu, 2> {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), &Default::default())
    }

    #[test]
    fn untruncated_and_greedy_draws_equal_the_host_samplers() {
        let configs = [
            SamplingConfig { temperature: 1.0, ..SamplingConfig::default() },
            SamplingConfig { temperature: 0.7, ..SamplingConfig::default() },
            SamplingConfig::greedy(1),
        ];
        for (round, scale) in [0.5f32, 3.0].into_iter().enumerate() {
            let logits = random_logits(24, 3000, scale, round as u64);
            for (c, config) in configs.iter().enumerate() {
                let mut host_rngs: Vec<_> = (0..24).map(|i| sample_rng(round as u64, 100 * c + i)).collect();
                let mut device_rngs = host_rngs.clone();
                for _ in 0..4 {
                    let host: Vec<(u32, f32)> =
                        logits.iter().zip(&mut host_rngs).map(|(row, rng)| sample_token(row, config, rng)).collect();
                    let draws: Vec<RowDraw> = device_rngs
                        .iter_mut()
                        .map(|rng| RowDraw { config, uniform: if config.temperature > 0.0 { rng.random::<f32>() } else { 0.0 } })
                        .collect();
                    let device = draw_on_device(tensor(&logits), &draws).expect("draw");
                    for (row, (h, d)) in host.iter().zip(&device).enumerate() {
                        assert_eq!(h.0, d.0, "scale {scale}, config {c}, row {row}");
                        assert!((h.1 - d.1).abs() < 1e-4, "log-prob {} vs {}", h.1, d.1);
                    }
                }
            }
        }
    }

    /// The host sampler's kept set and the token a draw in vocabulary order over it gives.
    fn reference_draw(logits: &[f32], config: &SamplingConfig, uniform: f32) -> (Vec<usize>, u32, f32) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits.iter().map(|&l| f64::from((l - max) / config.temperature).exp()).collect();
        let weights32: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
        let total: f32 = weights32.iter().sum();
        let mut kept = truncated_candidates(&weights32, total, config);
        kept.sort_unstable();
        let kept_total: f64 = kept.iter().map(|&i| weights[i]).sum();
        let mut running = 0.0;
        let mut chosen = kept[kept.len() - 1];
        for &i in &kept {
            running += weights[i];
            if running >= f64::from(uniform) * kept_total {
                chosen = i;
                break;
            }
        }
        let logprob = (weights[chosen] / weights.iter().sum::<f64>()).ln() as f32;
        (kept, chosen as u32, logprob)
    }

    #[test]
    fn top_k_and_top_p_keep_the_host_samplers_tokens_and_draw_in_vocabulary_order() {
        let configs = [
            SamplingConfig { temperature: 0.7, top_p: 0.95, ..SamplingConfig::default() },
            SamplingConfig { temperature: 1.0, top_k: 50, ..SamplingConfig::default() },
            SamplingConfig { temperature: 0.8, top_k: 40, top_p: 0.9, ..SamplingConfig::default() },
            SamplingConfig { temperature: 1.3, top_p: 0.5, ..SamplingConfig::default() },
            SamplingConfig { temperature: 1.0, top_k: 1, ..SamplingConfig::default() },
        ];
        let mut uniforms = sample_rng(7, 0);
        for (round, scale) in [0.5f32, 2.0, 6.0].into_iter().enumerate() {
            let logits = random_logits(16, 2000, scale, 10 + round as u64);
            for (c, config) in configs.iter().enumerate() {
                let draws: Vec<RowDraw> = (0..16).map(|_| RowDraw { config, uniform: uniforms.random::<f32>() }).collect();
                let device = draw_on_device(tensor(&logits), &draws).expect("draw");
                let [b, vocab] = [16, 2000];
                let scaled = (tensor(&logits) - tensor(&logits).max_dim(1)) / config.temperature;
                let weights = scaled.clone().exp();
                let log_total = weights.clone().sum_dim(1).log();
                let keep = kept_tokens(&scaled, &weights, &log_total, &draws).expect("truncated");
                let keep = keep.into_data().to_vec::<bool>().expect("bools");
                for row in 0..b {
                    let (kept, token, logprob) = reference_draw(&logits[row], config, draws[row].uniform);
                    let on_device: Vec<usize> = (0..vocab).filter(|&i| keep[row * vocab + i]).collect();
                    assert_eq!(kept, on_device, "scale {scale}, config {c}, row {row}");
                    assert_eq!(device[row].0, token, "scale {scale}, config {c}, row {row}");
                    assert!((device[row].1 - logprob).abs() < 1e-4, "log-prob {} vs {logprob}", device[row].1);
                }
            }
        }
    }

    #[test]
    fn a_batch_mixes_greedy_untruncated_and_nucleus_rows() {
        let logits = random_logits(3, 500, 2.0, 5);
        let (greedy, plain, nucleus) = (
            SamplingConfig::greedy(1),
            SamplingConfig { temperature: 1.0, ..SamplingConfig::default() },
            SamplingConfig { temperature: 1.0, top_p: 0.3, ..SamplingConfig::default() },
        );
        // The plain row's number comes from a stream, as in a decode; the host draws from a copy.
        let mut stream = sample_rng(1, 0);
        let host_plain = sample_token(&logits[1], &plain, &mut stream.clone());
        let draws = [
            RowDraw { config: &greedy, uniform: 0.0 },
            RowDraw { config: &plain, uniform: stream.random::<f32>() },
            RowDraw { config: &nucleus, uniform: 0.999_999 },
        ];
        let device = draw_on_device(tensor(&logits), &draws).expect("draw");
        let argmax = |row: &[f32]| row.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
        assert_eq!(device[0].0 as usize, argmax(&logits[0]));
        assert_eq!(device[1].0, host_plain.0);
        let (kept, token, _) = reference_draw(&logits[2], &nucleus, 0.999_999);
        assert_eq!(device[2].0, token);
        assert!(kept.contains(&(device[2].0 as usize)));
    }

    #[test]
    fn a_draw_at_zero_takes_the_first_token_with_weight() {
        // Token 0 has no weight at this temperature; a draw of 0 must not pick it.
        let logits = vec![vec![-1000.0, 1.0, 2.0, 0.5]];
        let config = SamplingConfig { temperature: 0.5, top_p: 0.99, ..SamplingConfig::default() };
        let device = draw_on_device(tensor(&logits), &[RowDraw { config: &config, uniform: 0.0 }]).expect("draw");
        assert_eq!(device[0].0, 1);
        let plain = SamplingConfig { temperature: 0.5, ..SamplingConfig::default() };
        let device = draw_on_device(tensor(&logits), &[RowDraw { config: &plain, uniform: 0.0 }]).expect("draw");
        assert_eq!(device[0].0, 1);
    }
}
