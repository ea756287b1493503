//! Drawing the next token of every row of a decode batch on the device, so that only the
//! drawn tokens and their log-probabilities come back to the host (`4 x rows` numbers in one
//! transfer) instead of the `[rows, vocab]` logits: on a GPU with Qwen's 152K vocabulary and
//! 64 rows that is 39 MB per decode step, and the host then computes 10M exponentials.
//!
//! Greedy rows take the argmax. A sampled row inverts the CDF of its temperature-scaled
//! weights at one uniform number that the host draws from the row's own stream (the number
//! the host sampler, [`crate::model::sampling::sample_token`], would draw), so an untruncated
//! draw picks the host sampler's token, up to the rounding of the device's sums. The running
//! sum goes in two levels (blocks of about sqrt(vocab) tokens, then inside the chosen block):
//! Burn 0.21's GPU cumsum reads a row's whole prefix for every element, so one scan over a
//! 152K vocabulary would cost 10^10 reads per row.
//!
//! Top-k and top-p keep the tokens whose scaled logit reaches a threshold found by bisection
//! (Burn's GPU backends sort on the host, and their top-k takes k at compile time), so the
//! kept set is the host sampler's except at ties: tokens equal at the threshold (or within
//! 2^-32 of the bisected interval, about 5e-9 in scaled log-weight) are all kept, as vLLM's
//! top-k keeps them, where the host keeps the lower indices. Among the kept tokens the CDF
//! runs in vocabulary order, not by weight as on the host: the same distribution, not the
//! same token for a given number.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

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
    if vocab == 0 {
        return Err(ModelError::Invalid("cannot draw from logits over an empty vocabulary".into()));
    }
    let device = logits.device();
    let logits = to_f32(logits);
    let shifted = logits.clone() - logits.max_dim(1); // [b, vocab], the largest 0
    let greedy_token = shifted.clone().argmax(1).float(); // [b, 1]
    let greedy_logprob = shifted.clone().exp().sum_dim(1).log().neg(); // [b, 1]

    let temperature = column::<B>(rows.iter().map(|r| if r.config.is_greedy() { 1.0 } else { r.config.temperature }).collect(), &device);
    let scaled = shifted / temperature; // [b, vocab], log-weights, the largest 0
    let weights = scaled.clone().exp(); // [b, vocab]
    let log_total = weights.clone().sum_dim(1).log(); // [b, 1]
    let kept = match kept_tokens(&scaled, &weights, &log_total, rows) {
        Some(keep) => weights.mask_fill(keep.bool_not(), 0.0),
        None => weights,
    };
    let uniforms = column::<B>(rows.iter().map(|r| r.uniform.clamp(0.0, 1.0)).collect(), &device);
    let token = inverse_cdf(kept, uniforms).clamp_max((vocab - 1) as f32); // [b, 1]
    let logprob = scaled.gather(1, token.clone().int()) - log_total; // [b, 1]

    let drawn = Tensor::cat(vec![token, logprob, greedy_token, greedy_logprob], 1); // [b, 4]
    let data = drawn.into_data().convert::<f32>();
    let values = data.as_slice::<f32>().map_err(|e| ModelError::Invalid(format!("cannot read drawn tokens: {e:?}")))?;
    Ok(rows
        .iter()
        .zip(values.chunks_exact(4))
        .map(|(row, v)| if row.config.is_greedy() { (v[2] as u32, v[3]) } else { (v[0] as u32, v[1]) })
        .collect())
}

/// A `[b, 1]` column of `values`.
fn column<B: Backend>(values: Vec<f32>, device: &B::Device) -> Tensor<B, 2> {
    let b = values.len();
    Tensor::from_data(TensorData::new(values, [b, 1]), device)
}

/// The index where each row's running sum of `weights` first reaches `uniform` times its
/// total (the first token with weight when the number is 0). The sum runs over blocks of
/// about sqrt(vocab) tokens, then inside the block that reaches the draw, so a backend whose
/// cumsum is quadratic in the row's length does linear work.
///
/// # Shapes
/// - weights: `[b, vocab]` (non-negative), uniforms: `[b, 1]` -> `[b, 1]` (indices as floats)
fn inverse_cdf<B: Backend>(weights: Tensor<B, 2>, uniforms: Tensor<B, 2>) -> Tensor<B, 2> {
    let [b, vocab] = weights.dims();
    let device = weights.device();
    let width = ((vocab as f64).sqrt().ceil() as usize).max(1);
    let blocks = vocab.div_ceil(width);
    let padded =
        if blocks * width > vocab { Tensor::cat(vec![weights, Tensor::zeros([b, blocks * width - vocab], &device)], 1) } else { weights };
    let tiled = padded.reshape([b, blocks, width]); // [b, blocks, width]
    let block_sums = tiled.clone().sum_dim(2).reshape([b, blocks]); // [b, blocks]
    let block_cdf = block_sums.clone().cumsum(1); // [b, blocks]
    // The last running sum as the total: the draw never passes the end of the scan.
    let draw = uniforms * block_cdf.clone().slice([0..b, blocks - 1..blocks]); // [b, 1]
    let block = first_reaching(block_cdf.clone(), draw.clone()).clamp_max((blocks - 1) as f32); // [b, 1]
    let block_index = block.clone().int(); // [b, 1]
    let before = block_cdf.gather(1, block_index.clone()) - block_sums.gather(1, block_index.clone()); // [b, 1]
    let inside = tiled.gather(1, block_index.reshape([b, 1, 1]).expand([b, 1, width])).reshape([b, width]); // [b, width]
    // Past the block's last token with weight only when rounding carries the draw there.
    let positions = Tensor::<B, 1, Int>::arange(0..width as i64, &device).float().reshape([1, width]); // [1, width]
    let last_with_weight = (inside.clone().greater_elem(0.0).float() * positions).max_dim(1); // [b, 1]
    let position = first_reaching(inside.cumsum(1), draw - before).min_pair(last_with_weight); // [b, 1]
    block * (width as f32) + position
}

/// Per row, how many running sums come before the first that reaches `draw` and is
/// positive: the index of the entry whose weight the draw falls in.
///
/// # Shapes
/// - cdf: `[b, n]` (non-decreasing), draw: `[b, 1]` -> `[b, 1]` (counts as floats)
fn first_reaching<B: Backend>(cdf: Tensor<B, 2>, draw: Tensor<B, 2>) -> Tensor<B, 2> {
    (cdf.clone() - draw).lower_elem(0.0).bool_or(cdf.lower_equal_elem(0.0)).float().sum_dim(1)
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
    // The host sampler's candidates: weight above FLOOR of the total.
    let floor = log_total.clone().add_scalar(FLOOR.ln()); // [b, 1]
    let mut keep = (scaled.clone() - floor.clone()).greater_elem(0.0); // [b, vocab]

    if rows.iter().any(|r| r.config.truncates() && r.config.top_k > 0) {
        // Rows without top-k ask for more tokens than there are: the threshold stays at the floor.
        let wanted = column::<B>(
            rows.iter().map(|r| if r.config.top_k > 0 { r.config.top_k as f32 } else { (vocab + 1) as f32 }).collect(),
            &device,
        );
        let candidates = keep.clone();
        let threshold = largest_threshold(scaled, floor.clone(), |at: &Tensor<B, 2, Bool>| {
            at.clone().bool_and(candidates.clone()).float().sum_dim(1) - wanted.clone()
        });
        keep = keep.bool_and((scaled.clone() - threshold).greater_equal_elem(0.0));
    }
    if rows.iter().any(|r| r.config.truncates() && r.config.top_p < 1.0) {
        let share = column::<B>(rows.iter().map(|r| if r.config.top_p < 1.0 { r.config.top_p } else { f32::INFINITY }).collect(), &device);
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

    /// Whether the draw `uniform` falls within `tolerance` (a share of the total weight) of
    /// the boundary between tokens `a` and `b`: where f32 sums in another order may pick
    /// either. Weights in f64.
    fn at_a_boundary(weights: &[f64], a: u32, b: u32, uniform: f32, tolerance: f64) -> bool {
        let total: f64 = weights.iter().sum();
        let boundary: f64 = weights[..=a.min(b) as usize].iter().sum();
        a.abs_diff(b) == 1 && (f64::from(uniform) * total - boundary).abs() <= tolerance * total
    }

    #[test]
    fn untruncated_and_greedy_draws_equal_the_host_samplers() {
        let configs = [
            SamplingConfig { temperature: 1.0, ..SamplingConfig::default() },
            SamplingConfig { temperature: 0.7, ..SamplingConfig::default() },
            SamplingConfig::greedy(1),
        ];
        let (mut draws_made, mut at_boundaries) = (0, 0);
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
                        .map(|rng| RowDraw { config, uniform: if config.is_greedy() { 0.0 } else { rng.random::<f32>() } })
                        .collect();
                    let device = draw_on_device(tensor(&logits), &draws).expect("draw");
                    for (row, (h, d)) in host.iter().zip(&device).enumerate() {
                        draws_made += 1;
                        if h.0 != d.0 {
                            // Only where the two sums round across a boundary (1e-5 of the total).
                            let max = logits[row].iter().copied().fold(f32::MIN, f32::max);
                            let t = f64::from(config.temperature);
                            let weights: Vec<f64> = logits[row].iter().map(|&l| (f64::from(l - max) / t).exp()).collect();
                            assert!(
                                !config.is_greedy() && at_a_boundary(&weights, h.0, d.0, draws[row].uniform, 1e-5),
                                "scale {scale}, config {c}, row {row}: host {} device {}",
                                h.0,
                                d.0
                            );
                            at_boundaries += 1;
                            continue;
                        }
                        assert!((h.1 - d.1).abs() < 1e-4, "log-prob {} vs {}", h.1, d.1);
                    }
                }
            }
        }
        assert!(at_boundaries * 50 <= draws_made, "{at_boundaries} of {draws_made} draws differ");
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
    fn no_rows_give_no_draws_and_an_empty_vocabulary_is_an_error() {
        let config = SamplingConfig::default();
        let none = Tensor::<Cpu, 2>::zeros([0, 8], &Default::default());
        assert!(draw_on_device(none, &[]).expect("nothing to draw").is_empty());
        let empty = Tensor::<Cpu, 2>::zeros([1, 0], &Default::default());
        assert!(draw_on_device(empty, &[RowDraw { config: &config, uniform: 0.5 }]).is_err());
        let one = Tensor::<Cpu, 2>::zeros([1, 3], &Default::default());
        assert!(draw_on_device(one, &[]).is_err(), "a draw per row");
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
