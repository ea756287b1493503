//! Long-input training against the plain path: the linear-memory attention (custom
//! backward), the recomputed decoder layers, the chunked LM head and the micro-batched group
//! loss must give the same values and the same gradient for every weight as plain tensor ops
//! with autodiff (materialized softmax, every activation kept, full logits), on the
//! reference checkpoints, with padding, grouped-query heads and a shared prefix.

mod support;

use burn::module::{ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use longrl_backends::{Cpu, CpuTrain, TrainBackend};
use longrl_stdlib::model::attention::{AttentionKernel, AttentionOptions, attend};
use longrl_stdlib::model::score::score_batch;
use longrl_stdlib::model::{CausalLm, Recompute, load_model};
use longrl_stdlib::rl::group::{Group, group_backward, micro_batches};
use longrl_stdlib::rl::loss::{Aggregation, KlEstimator, LossConfig, Normalizer, ScoredResponses, policy_loss};
use longrl_stdlib::train::{OptimConfig, Schedule, Trainer, autodiff_lock};
use support::workspace;

type Model = CausalLm<CpuTrain>;

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().expect("f32")
}

/// `|a - b| / |a|` over whole vectors.
fn relative_error(reference: &[f32], other: &[f32]) -> f64 {
    assert_eq!(reference.len(), other.len());
    let diff: f64 = reference.iter().zip(other).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = reference.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
    diff / norm.max(1e-12)
}

/// Deterministic values in [-1, 1).
fn noise(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

fn leaf<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<CpuTrain, D> {
    leaf_on::<CpuTrain, D>(shape, seed, &Default::default())
}

fn leaf_on<B: AutodiffBackend, const D: usize>(shape: [usize; D], seed: u64, device: &B::Device) -> Tensor<B, D> {
    let len = shape.iter().product();
    Tensor::<B, D>::from_data(TensorData::new(noise(len, seed), shape), device).require_grad()
}

// ---------------------------------------------------------------------------------------
// The attention operation alone.
// ---------------------------------------------------------------------------------------

/// Output and input gradients of `attend` with one kernel, for a weighted sum of the output.
/// `(b, s, hd, prefix)`: batch rows, own positions, head size and shared-prefix length.
fn attention_run<B: TrainBackend>(
    device: &B::Device,
    kernel: AttentionKernel,
    shared: bool,
    padding: bool,
    past: usize,
    (b, s, hd, prefix): (usize, usize, usize, usize),
) -> Vec<Vec<f32>> {
    let (heads, kv_heads) = (4, 2);
    let q = leaf_on::<B, 4>([b, heads, s, hd], 1, device);
    let own_k = leaf_on::<B, 4>([b, kv_heads, past + s, hd], 2, device);
    let own_v = leaf_on::<B, 4>([b, kv_heads, past + s, hd], 3, device);
    let shared_kv =
        shared.then(|| (leaf_on::<B, 4>([1, kv_heads, prefix, hd], 4, device), leaf_on::<B, 4>([1, kv_heads, prefix, hd], 5, device)));
    // Row 1 has its first three own keys masked (left padding); row 0 none.
    let key_padding = padding.then(|| {
        let flags: Vec<bool> = (0..b).flat_map(|row| (0..past + s).map(move |j| row == 1 && j < 3)).collect();
        Tensor::<B, 2, Bool>::from_data(TensorData::new(flags, [b, past + s]), device)
    });
    let options = AttentionOptions { kernel, chunk_threshold: 0, query_chunk: 5, key_chunk: 7 };
    let out = attend(q.clone(), shared_kv.clone(), own_k.clone(), own_v.clone(), past, key_padding, options);
    // A query whose keys are all masked (row 1's first queries, with padding and no prefix
    // or past keys) is padding itself: its output is never used, so it gets no gradient.
    let weights: Vec<f32> = noise(b * heads * s * hd, 9)
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let (row, position) = (i / (heads * s * hd), i / hd % s);
            let all_masked = padding && !shared && row == 1 && past + position < 3;
            if all_masked { 0.0 } else { w }
        })
        .collect();
    let weights = Tensor::<B, 4>::from_data(TensorData::new(weights, [b, heads, s, hd]), device);
    let grads = (out.clone() * weights.clone()).sum().backward();
    let mut results = vec![to_vec((out * weights_mask(&weights)).inner())];
    let mut tensors = vec![q, own_k, own_v];
    if let Some((k, v)) = shared_kv {
        tensors.push(k);
        tensors.push(v);
    }
    for t in tensors {
        results.push(to_vec(t.grad(&grads).expect("a gradient")));
    }
    results
}

/// 1 where a weight is non-zero (the outputs compared).
fn weights_mask<B: Backend>(weights: &Tensor<B, 4>) -> Tensor<B, 4> {
    weights.clone().not_equal_elem(0.0).float()
}

/// Plain against flash attention on one backend: value and every input gradient.
fn compare_attention_kernels<B: TrainBackend>(device: &B::Device) {
    // Small shapes (one key block) and larger ones: several query and key blocks of the CPU
    // kernel, partial last blocks, and a head size that is not a multiple of the SIMD width;
    // then decode shapes (many batch rows of one or a few positions after a shared prefix:
    // the CPU kernel's tasks then span several batch rows).
    let mut worst = 0.0f64;
    for dims in [(2, 37, 8, 23), (2, 150, 48, 70), (2, 70, 20, 30), (11, 1, 64, 150), (7, 3, 16, 70)] {
        // (shared prefix, key padding, past keys): the group layout, left padding, a cache.
        for (shared, padding, past) in [(true, false, 0), (false, true, 0), (false, false, 4), (true, true, 2)] {
            let (_, s, ..) = dims;
            if !shared && past + s <= 1 {
                // Every row sees one key at most: the query gradient is zero, which a relative
                // error cannot compare (and decoding always has a prompt before).
                continue;
            }
            let plain = attention_run::<B>(device, AttentionKernel::Plain, shared, padding, past, dims);
            let flash = attention_run::<B>(device, AttentionKernel::Flash, shared, padding, past, dims);
            let names = ["output", "d q", "d own_k", "d own_v", "d shared_k", "d shared_v"];
            for ((reference, other), name) in plain.iter().zip(&flash).zip(names) {
                let error = relative_error(reference, other);
                eprintln!("{dims:?} shared {shared} padding {padding} past {past}: {name} relative error {error:.2e}");
                worst = worst.max(error);
                assert!(error < 1e-5, "{dims:?} shared {shared} padding {padding} past {past}: {name} differs by {error:.2e}");
            }
        }
    }
    println!("flash against plain attention: worst relative error {worst:.2e} (output and gradients)");
}

#[test]
fn linear_memory_attention_matches_plain_attention_in_value_and_gradients() {
    let _autodiff = autodiff_lock();
    compare_attention_kernels::<CpuTrain>(&Default::default());
}

/// The same on wgpu (the tensor-op flash path; a software Vulkan driver is enough). Skipped,
/// saying so, when no adapter is present, unless `LONGRL_REQUIRE_DEVICE=1`.
#[cfg(feature = "wgpu")]
#[test]
fn linear_memory_attention_matches_plain_attention_on_wgpu() {
    let Some(spec) = support::device_or_skip(longrl_backends::BackendKind::Wgpu, "the wgpu attention test") else { return };
    let _autodiff = autodiff_lock();
    compare_attention_kernels::<burn::backend::Autodiff<longrl_backends::Wgpu>>(&longrl_backends::wgpu_device(spec));
}

/// The same on CUDA (run by `scripts/device_check.sh cuda`). Skipped, saying so, when no CUDA
/// device is present, unless `LONGRL_REQUIRE_DEVICE=1`.
#[cfg(feature = "cuda")]
#[test]
fn linear_memory_attention_matches_plain_attention_on_cuda() {
    let Some(spec) = support::device_or_skip(longrl_backends::BackendKind::Cuda, "the CUDA attention test") else { return };
    let _autodiff = autodiff_lock();
    compare_attention_kernels::<burn::backend::Autodiff<longrl_backends::Cuda>>(&longrl_backends::cuda_device(spec));
}

// ---------------------------------------------------------------------------------------
// Whole models: the plain reference and the long-input path.
// ---------------------------------------------------------------------------------------

/// Every float parameter's gradient, by parameter, in visiting order.
fn parameter_grads(model: &Model, grads: &GradientsParams) -> Vec<Vec<f32>> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<Vec<f32>>,
    }
    impl ModuleVisitor<CpuTrain> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<CpuTrain, D>>) {
            let Some(grad) = self.grads.get::<Cpu, D>(param.id) else {
                panic!("parameter {} (of {:?}) has no gradient", self.out.len(), param.val().dims())
            };
            self.out.push(to_vec(grad));
        }
    }
    let mut collect = Collect { grads, out: Vec::new() };
    burn::module::Module::visit(model, &mut collect);
    collect.out
}

fn assert_same_gradients(what: &str, reference: &[Vec<f32>], other: &[Vec<f32>]) {
    assert_eq!(reference.len(), other.len());
    let worst = reference.iter().zip(other).map(|(a, b)| relative_error(a, b)).fold(0.0, f64::max);
    eprintln!("{what}: {} parameters, worst relative gradient error {worst:.2e}", reference.len());
    assert!(worst < 1e-4, "{what}: a gradient differs by {worst:.2e}");
}

/// The reference models, plain: materialized attention, every activation kept.
fn models() -> Vec<(String, Model)> {
    ["tiny-qwen2", "tiny-llama"]
        .iter()
        .map(|name| {
            let dir = workspace().join("tests/fixtures/reference").join(name);
            let (_, model) = load_model::<CpuTrain>(&dir, &Default::default()).expect("model");
            (name.to_string(), model.with_attention(AttentionOptions::never_chunked()).with_recompute(Recompute::None))
        })
        .collect()
}

/// The same model on the long-input paths: linear-memory attention in small blocks, with
/// every activation kept and with recomputed layers.
fn long_input_paths(model: &Model) -> Vec<(Recompute, Model)> {
    let flash = AttentionOptions { kernel: AttentionKernel::Flash, chunk_threshold: 0, query_chunk: 5, key_chunk: 7 };
    [Recompute::None, Recompute::Layer].into_iter().map(|r| (r, model.clone().with_attention(flash).with_recompute(r))).collect()
}

/// Log-probs and entropies of `target` tokens at `positions` of a full plain forward.
fn plain_token_scores(
    model: &Model,
    tokens: &[u32],
    positions: std::ops::Range<usize>,
    temperature: f32,
) -> (Tensor<CpuTrain, 1>, Tensor<CpuTrain, 1>) {
    let device = Default::default();
    let ids = Tensor::<CpuTrain, 2, Int>::from_data(
        TensorData::new(tokens.iter().map(|&t| i64::from(t)).collect::<Vec<_>>(), [1, tokens.len()]),
        &device,
    );
    let logits = model.forward(ids).div_scalar(temperature); // [1, len, vocab]
    let [_, len, vocab] = logits.dims();
    let logp = log_softmax(logits.reshape([len, vocab]), 1).slice([positions.clone(), 0..vocab]); // [n, vocab]
    let n = positions.len();
    let targets: Vec<i64> = positions.map(|pos| i64::from(tokens[pos + 1])).collect();
    let targets = Tensor::<CpuTrain, 2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    let picked = logp.clone().gather(1, targets).reshape([n]);
    let entropy = (logp.clone().exp() * logp).sum_dim(1).reshape([n]).neg();
    (picked, entropy)
}

/// `[n]` tensors padded into one `[rows, len]` tensor.
fn pad_rows(rows: Vec<Tensor<CpuTrain, 1>>, len: usize) -> Tensor<CpuTrain, 2> {
    let padded = rows
        .into_iter()
        .map(|row| {
            let n = row.dims()[0];
            let row = if n < len { Tensor::cat(vec![row, Tensor::zeros([len - n], &Default::default())], 0) } else { row };
            row.reshape([1, len])
        })
        .collect();
    Tensor::cat(padded, 0)
}

/// An RL group over the reference vocabularies, with old log-probs near the current ones.
fn group() -> Group {
    let responses = vec![vec![30u32, 31, 2, 17], vec![44u32, 7, 7, 19, 3, 11, 12], vec![8u32], vec![5u32, 6, 9], vec![60u32, 61]];
    let old_logprobs =
        responses.iter().enumerate().map(|(i, r)| (0..r.len()).map(|j| -3.0 - 0.3 * ((i + j) % 3) as f32).collect()).collect();
    Group {
        prompt: vec![5, 9, 13, 21, 40, 41, 42, 43, 44, 45, 46],
        responses,
        old_logprobs,
        rewards: vec![Some(1.0), Some(0.0), None, Some(0.5), Some(1.0)],
        advantages: vec![Some(1.2), Some(-0.9), None, Some(-0.3), Some(0.4)],
    }
}

fn loss_config(aggregation: Aggregation) -> LossConfig {
    LossConfig {
        eps_low: 0.2,
        eps_high: 0.28,
        aggregation,
        kl_coef: 0.0,
        kl_estimator: KlEstimator::K3,
        entropy_coef: 0.05,
        norm_length: 8.0,
    }
}

/// The group's loss by the plain path: each response after the prompt as one full sequence.
fn plain_group_loss(model: &Model, group: &Group, temperature: f32, config: &LossConfig, normalizer: Normalizer) -> Tensor<CpuTrain, 1> {
    let rows = group.scorable_rows();
    let len = rows.iter().map(|&i| group.responses[i].len()).max().expect("rows");
    let p = group.prompt.len();
    let (mut logps, mut entropies, mut mask, mut old, mut advantages) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &i in &rows {
        let response = &group.responses[i];
        let tokens: Vec<u32> = group.prompt.iter().chain(response).copied().collect();
        let (logp, entropy) = plain_token_scores(model, &tokens, p - 1..p - 1 + response.len(), temperature);
        logps.push(logp);
        entropies.push(entropy);
        mask.extend((0..len).map(|j| if j < response.len() { 1.0f32 } else { 0.0 }));
        old.extend((0..len).map(|j| group.old_logprobs[i].get(j).copied().unwrap_or(0.0)));
        advantages.push(group.advantages[i].expect("scorable"));
    }
    let n = rows.len();
    let device = Default::default();
    let mask = Tensor::<CpuTrain, 2>::from_data(TensorData::new(mask, [n, len]), &device);
    let batch = ScoredResponses {
        logp: pad_rows(logps, len) * mask.clone(),
        old_logp: Tensor::from_data(TensorData::new(old, [n, len]), &device),
        advantages: Tensor::from_data(TensorData::new(advantages, [n]), &device),
        entropy: pad_rows(entropies, len) * mask.clone(),
        mask,
        ref_logp: None,
    };
    policy_loss(batch, config, normalizer).0
}

fn optim() -> OptimConfig {
    OptimConfig {
        lr: 1e-3,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        min_lr_ratio: 1.0,
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.0,
        grad_clip: 0.0,
    }
}

#[test]
fn the_micro_batched_group_loss_on_the_long_input_path_matches_the_plain_loss() {
    let _autodiff = autodiff_lock();
    let group = group();
    let normalizer = Normalizer { tokens: 16.0, responses: 4.0 };
    let temperature = 0.8;
    // Micro-batches of at most 8 padded tokens: [7], [4, 3] -> ... several, reusing the prompt.
    assert!(micro_batches(&group, 8).len() >= 3);
    for (name, model) in models() {
        for aggregation in [Aggregation::Token, Aggregation::Sequence] {
            let config = loss_config(aggregation);
            let plain = plain_group_loss(&model, &group, temperature, &config, normalizer);
            let plain_value = f64::from(to_vec(plain.clone().inner())[0]);
            let reference = parameter_grads(&model, &GradientsParams::from_grads(plain.backward(), &model));
            for (recompute, long) in long_input_paths(&model) {
                for budget in [0, 8] {
                    let mut trainer = Trainer::new(long.clone(), optim());
                    let (value, sums) = group_backward(&mut trainer, None, &group, temperature, &config, normalizer, budget).expect("loss");
                    assert_eq!(sums.tokens, 16.0);
                    assert!((value - plain_value).abs() < 1e-5 * plain_value.abs().max(1.0), "{name}: loss {value} vs plain {plain_value}");
                    let grads = trainer.take_gradients();
                    let ours = parameter_grads(trainer.model(), &grads);
                    assert_same_gradients(
                        &format!("{name} {aggregation:?} recompute {recompute:?} micro-batch budget {budget}"),
                        &reference,
                        &ours,
                    );
                }
            }
        }
    }
}

#[test]
fn sft_on_the_long_input_path_matches_the_plain_loss() {
    let _autodiff = autodiff_lock();
    // Right-padded rows of different prompt and response lengths.
    let batch =
        vec![(vec![5u32, 9, 13, 21], vec![30u32, 31, 2]), (vec![7u32, 8], vec![40u32, 41, 42, 2, 17, 18]), (vec![3u32; 9], vec![9u32])];
    let tokens: f64 = batch.iter().map(|(_, r)| r.len() as f64).sum();
    for (name, model) in models() {
        let mut plain = Tensor::<CpuTrain, 1>::zeros([1], &Default::default());
        for (prompt, response) in &batch {
            let sequence: Vec<u32> = prompt.iter().chain(response).copied().collect();
            let (logp, _) = plain_token_scores(&model, &sequence, prompt.len() - 1..prompt.len() - 1 + response.len(), 1.0);
            plain = plain + logp.sum().neg().reshape([1]);
        }
        let plain = plain.div_scalar(tokens);
        let plain_value = to_vec(plain.clone().inner())[0];
        let reference = parameter_grads(&model, &GradientsParams::from_grads(plain.backward(), &model));
        for (recompute, long) in long_input_paths(&model) {
            let loss = score_batch(&long, &batch).expect("scores").logprobs.sum().neg().div_scalar(tokens);
            let value = to_vec(loss.clone().inner())[0];
            assert!((value - plain_value).abs() < 1e-5, "{name}: loss {value} vs plain {plain_value}");
            let ours = parameter_grads(&long, &GradientsParams::from_grads(loss.backward(), &long));
            assert_same_gradients(&format!("{name} sft recompute {recompute:?}"), &reference, &ours);
        }
    }
}

/// The chunked head's entropy gradient is only computed when asked: without it, the
/// gradient of the log-probs alone is unchanged.
#[test]
fn the_chunked_head_matches_full_logits_for_tied_and_untied_heads() {
    let _autodiff = autodiff_lock();
    for (name, model) in models() {
        let [_, d] = model.embed_tokens.weight.val().dims();
        let n = 13;
        let hidden = leaf([n, d], 21);
        let targets: Vec<i64> = (0..n as i64).map(|i| (i * 7) % 50).collect();
        let coefficients = Tensor::<CpuTrain, 1>::from_data(TensorData::new(noise(n, 22), [n]), &Default::default());
        for entropy_weight in [0.0f32, 0.3] {
            // Plain: full logits.
            let logits = model.logits(hidden.clone().reshape([1, n, d])).reshape([n, model.vocab_size()]).div_scalar(0.7);
            let logp = log_softmax(logits, 1);
            let ids = Tensor::<CpuTrain, 2, Int>::from_data(TensorData::new(targets.clone(), [n, 1]), &Default::default());
            let picked = logp.clone().gather(1, ids).reshape([n]);
            let entropy = (logp.clone().exp() * logp).sum_dim(1).reshape([n]).neg();
            let plain = (picked * coefficients.clone()).sum() + entropy.sum().mul_scalar(entropy_weight);
            let plain_grads = plain.backward();
            // Chunked.
            let (picked, entropy) = model.token_scores(hidden.clone(), targets.clone(), 0.7, entropy_weight > 0.0);
            let chunked = (picked * coefficients.clone()).sum() + entropy.sum().mul_scalar(entropy_weight);
            let chunked_grads = chunked.backward();
            let weight = match &model.lm_head {
                Some(head) => head.weight.val(),
                None => model.embed_tokens.weight.val(),
            };
            for (what, reference, other) in [
                ("hidden", hidden.grad(&plain_grads), hidden.grad(&chunked_grads)),
                ("head weight", weight.grad(&plain_grads), weight.grad(&chunked_grads)),
            ] {
                let error = relative_error(&to_vec(reference.expect("grad")), &to_vec(other.expect("grad")));
                eprintln!("{name} entropy weight {entropy_weight}: d {what} relative error {error:.2e}");
                assert!(error < 1e-5, "{name}: d {what} differs by {error:.2e}");
            }
        }
    }
}
