//! Drawing a token from a row of logits: greedy, temperature, top-k and top-p (nucleus),
//! each sample from its own random stream. Candidates are ordered by integer keys (weight
//! bits, then index) instead of a comparison closure over the vocabulary, top-k takes its k
//! by partial selection, and only the candidates that can matter (weight above 1e-9 of the
//! total) are ever ordered. The draws are bit for bit those of the sort-based sampler this
//! replaces (a test keeps that sampler as the reference).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::generate::SamplingConfig;

/// An independent random stream per sample, the same whatever the batch around it.
pub fn sample_rng(seed: u64, sample: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(sample as u64);
    rng
}

/// Draws one token from a logits row; returns it with its log-probability under the
/// temperature-scaled distribution before truncation.
pub fn sample_token(logits: &[f32], config: &SamplingConfig, rng: &mut impl Rng) -> (u32, f32) {
    if config.is_greedy() {
        let (best, _) = logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) });
        return (best as u32, log_softmax_at(logits, best, 1.0));
    }
    let t = config.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = logits.iter().map(|&l| ((l - max) / t).exp()).collect();
    let total: f32 = weights.iter().sum();
    if config.top_k == 0 && config.top_p >= 1.0 {
        // No truncation: draw straight from the weights.
        let mut draw = rng.random::<f32>() * total;
        let mut chosen = weights.len() - 1;
        for (i, &w) in weights.iter().enumerate() {
            draw -= w;
            if draw <= 0.0 && w > 0.0 {
                chosen = i;
                break;
            }
        }
        return (chosen as u32, (weights[chosen] / total).ln());
    }
    let candidates = truncated_candidates(&weights, total, config);
    let Some(&last) = candidates.last() else {
        // Every weight is NaN or zero (logits that are not numbers): nothing to draw from.
        return (0, f32::NAN);
    };
    let kept_total: f32 = candidates.iter().map(|&i| weights[i]).sum();
    let mut draw = rng.random::<f32>() * kept_total;
    let mut chosen = last;
    for &i in &candidates {
        draw -= weights[i];
        if draw <= 0.0 {
            chosen = i;
            break;
        }
    }
    (chosen as u32, (weights[chosen] / total).ln())
}

/// The candidates left by top-k and top-p, most likely first (ties: lower index first).
pub(crate) fn truncated_candidates(weights: &[f32], total: f32, config: &SamplingConfig) -> Vec<usize> {
    // Tokens below this share cannot matter.
    let floor = total * 1e-9;
    let mut keys: Vec<u64> = weights.iter().enumerate().filter(|&(_, &w)| w > floor).map(|(i, &w)| order_key(w, i)).collect();
    if config.top_k > 0 && keys.len() > config.top_k {
        keys.select_nth_unstable(config.top_k - 1);
        keys.truncate(config.top_k);
    }
    keys.sort_unstable();
    let mut candidates: Vec<usize> = keys.into_iter().map(|key| (key & 0xffff_ffff) as usize).collect();
    if config.top_p < 1.0 {
        // The running sum goes in the candidates' order, as the nucleus is defined.
        let kept_total: f32 = candidates.iter().map(|&i| weights[i]).sum();
        let mut running = 0.0;
        let mut keep = 0;
        for &i in &candidates {
            running += weights[i];
            keep += 1;
            if running >= config.top_p * kept_total {
                break;
            }
        }
        candidates.truncate(keep.max(1));
    }
    candidates
}

/// A key whose ascending order is descending weight, then ascending index. The weights are
/// positive (above the floor), and a positive float's bits order as its value.
fn order_key(weight: f32, index: usize) -> u64 {
    (u64::from(!weight.to_bits()) << 32) | index as u64
}

/// `log softmax(logits / t)[index]`, computed stably.
fn log_softmax_at(logits: &[f32], index: usize, t: f32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| ((l - max) / t).exp()).sum();
    (logits[index] - max) / t - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    /// The sampler as it was before candidates were ordered by keys: a comparison sort of
    /// every candidate. The reference the new one must match bit for bit.
    fn sort_based(logits: &[f32], config: &SamplingConfig, rng: &mut impl Rng) -> (u32, f32) {
        let t = config.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = logits.iter().map(|&l| ((l - max) / t).exp()).collect();
        let total: f32 = weights.iter().sum();
        let floor = total * 1e-9;
        let mut candidates: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > floor).collect();
        candidates.sort_unstable_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        if config.top_k > 0 && candidates.len() > config.top_k {
            candidates.truncate(config.top_k);
        }
        if config.top_p < 1.0 {
            let kept_total: f32 = candidates.iter().map(|&i| weights[i]).sum();
            let mut running = 0.0;
            let mut keep = 0;
            for &i in &candidates {
                running += weights[i];
                keep += 1;
                if running >= config.top_p * kept_total {
                    break;
                }
            }
            candidates.truncate(keep.max(1));
        }
        let kept_total: f32 = candidates.iter().map(|&i| weights[i]).sum();
        let mut draw = rng.random::<f32>() * kept_total;
        let mut chosen = candidates[candidates.len() - 1];
        for &i in &candidates {
            draw -= weights[i];
            if draw <= 0.0 {
                chosen = i;
                break;
            }
        }
        (chosen as u32, (weights[chosen] / total).ln())
    }

    #[test]
    fn top_k_and_top_p_draws_equal_the_sort_based_sampler_bit_for_bit() {
        let mut source = sample_rng(99, 0);
        let configs = [
            SamplingConfig { temperature: 0.7, top_p: 0.95, ..SamplingConfig::default() },
            SamplingConfig { temperature: 1.0, top_k: 50, ..SamplingConfig::default() },
            SamplingConfig { temperature: 0.8, top_k: 40, top_p: 0.9, ..SamplingConfig::default() },
            SamplingConfig { temperature: 1.3, top_p: 0.5, ..SamplingConfig::default() },
        ];
        for (round, scale) in [0.5f32, 2.0, 6.0].into_iter().enumerate() {
            let normal = Normal::new(0.0f32, scale).expect("valid");
            // Ties: quantized logits make many equal weights.
            let logits: Vec<f32> = (0..5000).map(|_| (normal.sample(&mut source) * 4.0).round() / 4.0).collect();
            for (c, config) in configs.iter().enumerate() {
                let (mut a, mut b) = (sample_rng(round as u64, c), sample_rng(round as u64, c));
                for _ in 0..50 {
                    let new = sample_token(&logits, config, &mut a);
                    let old = sort_based(&logits, config, &mut b);
                    assert_eq!((new.0, new.1.to_bits()), (old.0, old.1.to_bits()), "scale {scale}, config {c}");
                }
            }
        }
    }

    #[test]
    fn greedy_takes_the_argmax_with_its_log_probability() {
        let logits = [0.0, 2.0, 1.0];
        let (token, logprob) = sample_token(&logits, &SamplingConfig::greedy(1), &mut sample_rng(0, 0));
        assert_eq!(token, 1);
        let expected = 2.0 - (1.0f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((logprob - expected).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [5.0, 4.0, 0.0, -1.0];
        let top1 = SamplingConfig { temperature: 1.0, top_k: 1, ..SamplingConfig::default() };
        let nucleus = SamplingConfig { temperature: 1.0, top_p: 0.5, ..SamplingConfig::default() };
        let mut rng = sample_rng(3, 0);
        for _ in 0..200 {
            assert_eq!(sample_token(&logits, &top1, &mut rng).0, 0);
            assert_eq!(sample_token(&logits, &nucleus, &mut rng).0, 0);
        }
    }

    #[test]
    fn logits_that_are_not_numbers_give_no_panic() {
        let config = SamplingConfig { temperature: 1.0, top_p: 0.9, ..SamplingConfig::default() };
        let (token, logprob) = sample_token(&[f32::NAN; 4], &config, &mut sample_rng(0, 0));
        assert_eq!(token, 0);
        assert!(logprob.is_nan());
    }

    #[test]
    fn sampling_follows_the_distribution_and_reports_its_log_probability() {
        let logits = [0.0f32, 1.0f32.ln() + 0.0, 2f32.ln()]; // weights 1 : 1 : 2
        let config = SamplingConfig { temperature: 1.0, ..SamplingConfig::default() };
        let mut rng = sample_rng(11, 0);
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            let (token, logprob) = sample_token(&logits, &config, &mut rng);
            counts[token as usize] += 1;
            let expected = [0.25f32, 0.25, 0.5][token as usize].ln();
            assert!((logprob - expected).abs() < 1e-5);
        }
        let share = counts[2] as f32 / 20_000.0;
        assert!((share - 0.5).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn temperature_sharpens_and_the_log_probability_uses_it() {
        let logits = [0.0, 1.0];
        let config = SamplingConfig { temperature: 0.5, ..SamplingConfig::default() };
        let (token, logprob) = sample_token(&logits, &config, &mut sample_rng(1, 0));
        // Scaled logits are [0, 2].
        let z = 1.0f32 + (2.0f32).exp();
        let expected = if token == 1 { 2.0 - z.ln() } else { 0.0 - z.ln() };
        assert!((logprob - expected).abs() < 1e-5);
    }
}
