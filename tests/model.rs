//! The model runtime against independent references: logits and greedy tokens computed by
//! transformers for every checkpoint under tests/fixtures/reference/, the KV cache and the
//! chunked attention against the plain full forward, checkpoint round trips, the tokenizer
//! against the Python tokenizers library, chat templates against jinja2.

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use longrl_backends::{Cpu, CpuTrain};
use longrl_stdlib::model::attention::AttentionOptions;
use longrl_stdlib::model::batch_decode::{BatchOptions, GroupRequest, SampleOn, generate_groups};
use longrl_stdlib::model::batch_kv::BatchKv;
use longrl_stdlib::model::chat::{ChatTemplate, ModelTokenizer};
use longrl_stdlib::model::checkpoint::{RandomInit, SaveDtype};
use longrl_stdlib::model::generate::{Completion, SamplingConfig, generate_batch, generate_group};
use longrl_stdlib::model::score::{score_batch, score_group};
use longrl_stdlib::model::{Architecture, CausalLm, ForwardArgs, KvCache, ModelConfig, load_model, save_model};
use longrl_stdlib::record::ChatMessage;
use longrl_stdlib::tokenizer::Tokenizer;
use safetensors::SafeTensors;
use support::workspace;

mod support;

/// Every reference directory: config.json + model.safetensors + reference.safetensors.
fn reference_dirs() -> Vec<PathBuf> {
    let root = workspace().join("tests/fixtures/reference");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("reference folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|d| ["config.json", "model.safetensors", "reference.safetensors"].iter().all(|f| d.join(f).is_file()))
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 2, "expected the tiny-qwen2 and tiny-llama references");
    dirs
}

/// A reference tensor as (shape, values) in f64 (int64 and f32 tensors).
fn reference_tensor(dir: &Path, name: &str) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(dir.join("reference.safetensors")).expect("reference file");
    let tensors = SafeTensors::deserialize(&bytes).expect("valid reference");
    let view = tensors.tensor(name).expect("tensor present");
    let values = match view.dtype() {
        safetensors::Dtype::I64 => view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64).collect(),
        safetensors::Dtype::F32 => {
            view.data().chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes")))).collect()
        }
        other => panic!("unexpected dtype {other:?}"),
    };
    (view.shape().to_vec(), values)
}

fn ids_tensor(ids: &[u32], batch: usize, seq: usize) -> Tensor<Cpu, 2, Int> {
    Tensor::from_data(TensorData::new(ids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>(), [batch, seq]), &Default::default())
}

fn to_vec<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().expect("f32 data")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Logits and greedy tokens of every reference checkpoint on backend `B`; returns the
/// largest logit difference.
fn golden<B: longrl_backends::CustomGrad>(device: &B::Device) -> f32 {
    let mut worst = 0.0f32;
    for dir in reference_dirs() {
        let (_, model) = load_model::<B>(&dir, device).expect("model loads");
        let (shape, ids) = reference_tensor(&dir, "input_ids");
        let (batch, seq) = (shape[0], shape[1]);
        let ids: Vec<u32> = ids.iter().map(|&v| v as u32).collect();
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>(), [batch, seq]), device);
        let logits: Vec<f32> = model.forward(tokens).into_data().convert::<f32>().into_vec().expect("f32 data");
        let (ref_shape, expected) = reference_tensor(&dir, "logits");
        assert_eq!(ref_shape, vec![batch, seq, model.vocab_size()]);
        let expected: Vec<f32> = expected.iter().map(|&v| v as f32).collect();
        let diff = max_abs_diff(&logits, &expected);
        println!("{}: max |logit - transformers| = {diff:.2e}", dir.display());
        assert!(diff < 1e-3, "{}: logits differ by {diff}", dir.display());
        worst = worst.max(diff);

        let (greedy_shape, greedy) = reference_tensor(&dir, "greedy");
        let steps = greedy_shape[1];
        for row in 0..batch {
            let prompt = &ids[row * seq..(row + 1) * seq];
            let out = generate_group(&model, prompt, 1, &SamplingConfig::greedy(steps)).expect("generates");
            let expected: Vec<u32> = greedy[row * steps..(row + 1) * steps].iter().map(|&v| v as u32).collect();
            assert_eq!(out[0].tokens, expected, "{} row {row}", dir.display());
        }
        let prompts: Vec<Vec<u32>> = (0..batch).map(|r| ids[r * seq..(r + 1) * seq].to_vec()).collect();
        let batched = generate_batch(&model, &prompts, &SamplingConfig::greedy(steps)).expect("generates");
        for (row, completion) in batched.iter().enumerate() {
            let expected: Vec<u32> = greedy[row * steps..(row + 1) * steps].iter().map(|&v| v as u32).collect();
            assert_eq!(completion.tokens, expected, "{} batched row {row}", dir.display());
        }
        let on_device = SampleOn::Device;
        let requests: Vec<GroupRequest> =
            prompts.iter().map(|p| GroupRequest::group(p.clone(), 2, SamplingConfig::greedy(steps))).collect();
        let drawn = generate_groups(&model, requests, BatchOptions { sample_on: on_device, ..BatchOptions::default() }).expect("generates");
        for (row, group) in drawn.iter().enumerate() {
            let expected: Vec<u32> = greedy[row * steps..(row + 1) * steps].iter().map(|&v| v as u32).collect();
            assert!(group.iter().all(|c| c.tokens == expected), "{} row {row}: greedy tokens drawn on the device", dir.display());
        }
        device_draws_equal_host_draws(&model, model.vocab_size() as u32);
    }
    worst
}

/// Groups decoded with their tokens drawn on the device against the same groups drawn on the
/// host: the same tokens for greedy and untruncated sampling (the device inverts the CDF at
/// the number the host would draw); nucleus rows keep to their stop tokens and limit and
/// repeat bit for bit.
fn device_draws_equal_host_draws<B: longrl_backends::CustomGrad>(model: &CausalLm<B>, vocab: u32) {
    let stop_tokens: Vec<u32> = (0..vocab).filter(|t| t % 10 == 3).collect();
    let plain =
        SamplingConfig { temperature: 1.0, max_new_tokens: 12, stop_tokens: stop_tokens.clone(), seed: 4, ..SamplingConfig::default() };
    let cool = SamplingConfig { temperature: 0.6, max_new_tokens: 9, seed: 8, ..SamplingConfig::default() };
    let nucleus = SamplingConfig { temperature: 0.9, top_p: 0.8, top_k: 20, max_new_tokens: 10, stop_tokens, seed: 2 };
    let prompts: [Vec<u32>; 3] = [(3..20).collect(), vec![7], (40..70).map(|t| t % vocab).collect()];
    let requests: Vec<GroupRequest> =
        prompts.iter().zip([plain, cool, nucleus.clone()]).map(|(p, s)| GroupRequest::group(p.clone(), 3, s)).collect();
    let decode = |sample_on| generate_groups(model, requests.clone(), BatchOptions { max_rows: 4, sample_on }).expect("generates");
    let (host, device) = (decode(SampleOn::Host), decode(SampleOn::Device));
    for group in 0..2 {
        assert_same_samples(&device[group], &host[group], &format!("group {group} drawn on the device"));
    }
    for c in &device[2] {
        let stopped = c.tokens.last().is_some_and(|t| nucleus.stop_tokens.contains(t));
        assert!(stopped || c.tokens.len() == nucleus.max_new_tokens, "a nucleus row ends at a stop token or the limit");
        assert!(c.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0), "log-probabilities of drawn tokens");
    }
    assert_eq!(decode(SampleOn::Device), device, "device draws repeat bit for bit");
}

#[test]
fn logits_and_greedy_tokens_match_transformers() {
    golden::<Cpu>(&Default::default());
}

/// The same golden test on the wgpu backend (a software Vulkan driver such as Mesa's
/// llvmpipe is enough). Skipped, saying so, when no adapter is present.
#[cfg(feature = "wgpu")]
#[test]
fn logits_and_greedy_tokens_match_transformers_on_wgpu() {
    let Some(spec) = support::device_or_skip(longrl_backends::BackendKind::Wgpu, "the wgpu golden test") else { return };
    let diff = golden::<longrl_backends::Wgpu>(&longrl_backends::wgpu_device(spec));
    println!("wgpu: worst logit difference {diff:.2e}");
}

/// The same golden test on CUDA. Skipped, saying so, when no CUDA device is present, unless
/// `LONGRL_REQUIRE_DEVICE=1` (as `scripts/device_check.sh cuda` sets): then a missing device
/// fails it.
#[cfg(feature = "cuda")]
#[test]
fn logits_and_greedy_tokens_match_transformers_on_cuda() {
    let Some(spec) = support::device_or_skip(longrl_backends::BackendKind::Cuda, "the CUDA golden test") else { return };
    let diff = golden::<longrl_backends::Cuda>(&longrl_backends::cuda_device(spec));
    println!("cuda: worst logit difference {diff:.2e}");
}

#[test]
fn incremental_decoding_with_the_cache_gives_the_full_forward_logits() {
    for dir in reference_dirs() {
        let (_, model) = load_model::<Cpu>(&dir, &Default::default()).expect("model loads");
        let (shape, ids) = reference_tensor(&dir, "input_ids");
        let seq = shape[1];
        let ids: Vec<u32> = ids[..seq].iter().map(|&v| v as u32).collect();
        let full = to_vec(model.forward(ids_tensor(&ids, 1, seq)));
        let vocab = model.vocab_size();
        let device = Default::default();
        let mut cache = model.new_cache();
        let half = seq / 2;
        let hidden = model.forward_hidden(ids_tensor(&ids[..half], 1, half), ForwardArgs::contiguous(1, 0, half, &device), &mut cache);
        let mut incremental = to_vec(model.logits(hidden));
        for pos in half..seq {
            let hidden = model.forward_hidden(ids_tensor(&ids[pos..=pos], 1, 1), ForwardArgs::contiguous(1, pos, 1, &device), &mut cache);
            incremental.extend(to_vec(model.logits(hidden)));
        }
        assert_eq!(incremental.len(), seq * vocab);
        let diff = max_abs_diff(&incremental, &full);
        assert!(diff < 1e-4, "{}: cached logits differ by {diff}", dir.display());
    }
}

/// A random model of the tiny reference's shape with a long input.
fn long_input_model() -> (CausalLm<Cpu>, Vec<u32>) {
    let mut config = ModelConfig::tiny(Architecture::Qwen2, 512, 64, 2, 4, 2, 128);
    config.rope_theta = Some(10_000.0);
    let model = CausalLm::<Cpu>::build(&config, &mut RandomInit::new(5, 0.1), &Default::default()).expect("builds");
    let ids: Vec<u32> = (0..700u32).map(|i| (i * 37 + 11) % 512).collect();
    (model, ids)
}

#[test]
fn chunked_attention_matches_plain_attention_on_a_long_input() {
    let (model, ids) = long_input_model();
    let seq = ids.len();
    let plain = to_vec(model.clone().with_attention(AttentionOptions::never_chunked()).forward(ids_tensor(&ids, 1, seq)));
    // Chunks that do not divide the length, so partial blocks and skipped future blocks occur.
    let chunked = to_vec(model.with_attention(AttentionOptions::always_chunked(96, 128)).forward(ids_tensor(&ids, 1, seq)));
    let diff = max_abs_diff(&plain, &chunked);
    assert!(diff < 1e-4, "chunked attention differs by {diff}");
}

#[test]
fn a_shared_group_prefix_gives_the_same_logits_as_separate_forwards() {
    let (model, ids) = long_input_model();
    let model = model.with_attention(AttentionOptions::always_chunked(64, 100));
    let prompt = &ids[..300];
    let responses: Vec<Vec<u32>> = vec![ids[300..310].to_vec(), ids[400..404].to_vec(), ids[500..512].to_vec()];
    let grouped = score_group(&model, prompt, &responses).expect("scores");
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = responses.iter().map(|r| (prompt.to_vec(), r.clone())).collect();
    let separate = score_batch(&model.clone().with_attention(AttentionOptions::never_chunked()), &pairs).expect("scores");
    let diff = max_abs_diff(&to_vec(grouped.logprobs.clone()), &to_vec(separate.logprobs));
    assert!(diff < 1e-4, "group scoring differs by {diff}");
    let mask = to_vec(grouped.mask);
    assert_eq!(mask.iter().filter(|&&m| m > 0.0).count(), 10 + 4 + 12);
}

#[test]
fn sampled_log_probs_match_scoring_and_seeds_repeat() {
    let dir = workspace().join("tests/fixtures/reference/tiny-qwen2");
    let (_, model) = load_model::<Cpu>(&dir, &Default::default()).expect("model loads");
    let prompt: Vec<u32> = (1..30).collect();
    let config = SamplingConfig { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 12, stop_tokens: vec![2], seed: 42 };
    let first = generate_group(&model, &prompt, 4, &config).expect("generates");
    let again = generate_group(&model, &prompt, 4, &config).expect("generates");
    assert_eq!(first, again, "same seed, same samples");
    let other = generate_group(&model, &prompt, 4, &SamplingConfig { seed: 43, ..config.clone() }).expect("generates");
    assert_ne!(first, other, "another seed, other samples");
    assert!(first.windows(2).any(|w| w[0].tokens != w[1].tokens), "samples of a group differ");

    let responses: Vec<Vec<u32>> = first.iter().map(|c| c.tokens.clone()).collect();
    let scores = score_group(&model, &prompt, &responses).expect("scores");
    let scored = to_vec(scores.logprobs);
    let width = responses.iter().map(Vec::len).max().expect("samples");
    for (i, completion) in first.iter().enumerate() {
        for (j, &lp) in completion.logprobs.iter().enumerate() {
            let s = scored[i * width + j];
            assert!((lp - s).abs() < 1e-4, "sample {i} token {j}: sampled {lp}, scored {s}");
        }
    }
}

#[test]
fn group_generation_equals_separate_generation() {
    let dir = workspace().join("tests/fixtures/reference/tiny-llama");
    let (_, model) = load_model::<Cpu>(&dir, &Default::default()).expect("model loads");
    let prompts: Vec<Vec<u32>> = vec![(3..20).collect(), (40..45).collect(), (100..133).collect()];
    let config = SamplingConfig { temperature: 0.8, top_k: 50, top_p: 0.95, max_new_tokens: 10, stop_tokens: vec![], seed: 7 };
    // Left-padded batch vs one prompt at a time (greedy, so streams do not matter).
    let batched = generate_batch(&model, &prompts, &SamplingConfig::greedy(10)).expect("batch");
    for (prompt, completion) in prompts.iter().zip(&batched) {
        let alone = generate_group(&model, prompt, 1, &SamplingConfig::greedy(10)).expect("alone");
        assert_eq!(alone[0].tokens, completion.tokens);
    }
    // Sample i of a group draws from stream i: a group of 3 starts like a group of 1.
    let three = generate_group(&model, &prompts[0], 3, &config).expect("group");
    let one = generate_group(&model, &prompts[0], 1, &config).expect("group");
    assert_eq!(three[0], one[0]);
}

/// The same samples up to float rounding: equal tokens and finish reasons, log-probabilities
/// within 1e-4 (the batch's matmuls may sum in another order for another row count).
fn assert_same_samples(together: &[Completion], alone: &[Completion], context: &str) {
    assert_eq!(together.len(), alone.len(), "{context}: samples");
    for (k, (a, b)) in together.iter().zip(alone).enumerate() {
        assert_eq!((&a.tokens, a.finish), (&b.tokens, b.finish), "{context}, sample {k}");
        let diff = a.logprobs.iter().zip(&b.logprobs).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{context}, sample {k}: log-probabilities differ by {diff}");
    }
}

/// Groups of several prompts (different lengths and seeds) decoded together, with rows
/// stopping at different steps, groups waiting for room and KV buffers growing: each group
/// must be what generating it alone gives (the same tokens; greedy and sampled), whatever
/// the row limit, and a second batched run must repeat the first bit for bit.
fn batched_groups_equal_groups_alone(model: &CausalLm<Cpu>, vocab: u32) {
    let prompts: Vec<Vec<u32>> = vec![
        (3..20).collect(),
        (40..45).map(|t| t % vocab).collect(),
        (100..133).map(|t| t % vocab).collect(),
        vec![7],
        (200..260).map(|t| t % vocab).collect(),
        (5..40).map(|t| (t * 13) % vocab).collect(),
    ];
    // A tenth of the vocabulary stops a row: rows finish at scattered steps.
    let stop_tokens: Vec<u32> = (0..vocab).filter(|t| t % 10 == 3).collect();
    let configs = [
        SamplingConfig { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 24, stop_tokens: stop_tokens.clone(), seed: 11 },
        SamplingConfig { temperature: 0.8, top_p: 0.9, top_k: 30, max_new_tokens: 19, stop_tokens: stop_tokens.clone(), seed: 5 },
        SamplingConfig { temperature: 0.0, top_p: 1.0, top_k: 0, max_new_tokens: 20, stop_tokens: vec![], seed: 0 },
    ];
    let mut requests = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let mut sampling = configs[i % configs.len()].clone();
        sampling.seed += i as u64;
        requests.push(GroupRequest::group(prompt.clone(), 1 + i % 4, sampling));
    }
    let alone: Vec<_> = requests.iter().map(|r| generate_group(model, &r.prompt, r.samples, &r.sampling).expect("generates")).collect();
    assert!(alone.iter().flatten().any(|c| c.tokens.len() < 6), "some rows stop early");
    assert!(alone.iter().flatten().any(|c| c.tokens.len() > 16), "some buffers grow");
    for max_rows in [1, 4, 7, 64] {
        let batched = generate_groups(model, requests.clone(), BatchOptions::rows(max_rows)).expect("generates");
        for (i, (together, single)) in batched.iter().zip(&alone).enumerate() {
            assert_same_samples(together, single, &format!("group {i} with at most {max_rows} rows"));
        }
        let again = generate_groups(model, requests.clone(), BatchOptions::rows(max_rows)).expect("generates");
        assert_eq!(again, batched, "the same seeds give the same samples, at most {max_rows} rows");
    }
}

#[test]
fn groups_decoded_together_equal_each_group_decoded_alone() {
    for dir in reference_dirs() {
        let (config, model) = load_model::<Cpu>(&dir, &Default::default()).expect("model loads");
        batched_groups_equal_groups_alone(&model, config.vocab_size as u32);
    }
    // Wider layers, where the matmul takes its blocked path.
    let config = ModelConfig::preset("tiny", 4096).expect("preset");
    let model = CausalLm::<Cpu>::build(&config, &mut RandomInit::new(3, 0.02), &Default::default()).expect("builds");
    batched_groups_equal_groups_alone(&model, 4096);
}

/// A prompt prefilled alone (batch 1), as a concatenating cache: the reference for a segment.
fn prefilled(model: &CausalLm<Cpu>, prompt: &[u32]) -> KvCache<Cpu> {
    let mut cache = model.new_cache();
    let p = prompt.len();
    model.forward_hidden(ids_tensor(prompt, 1, p), ForwardArgs::contiguous(1, 0, p, &Default::default()), &mut cache);
    cache
}

/// The preallocated cache written in place ([`BatchKv`], two prompts' segments decoded
/// together, buffers growing past their first capacity, a finished row's slot refilled by
/// the segment's last row) gives the logits of the concatenating cache that decodes each
/// prompt's rows alone and drops finished rows by selection.
#[test]
fn the_in_place_batch_cache_gives_the_concatenating_cache_logits() {
    let dir = workspace().join("tests/fixtures/reference/tiny-qwen2");
    let (_, model) = load_model::<Cpu>(&dir, &Default::default()).expect("model loads");
    let vocab = model.vocab_size() as u32;
    let device = Default::default();
    let prompts: Vec<Vec<u32>> = vec![(3..20).collect(), (40..49).collect()];
    let mut rows = vec![2usize, 3];
    let mut batch = BatchKv::<Cpu>::new(model.num_layers());
    let mut reference = Vec::new();
    for (prompt, &n) in prompts.iter().zip(&rows) {
        let cache = prefilled(&model, prompt);
        batch.push_segment(cache.clone(), n, 40).expect("a batch-1 prompt cache");
        reference.push(cache.into_shared().expect("shared prefix"));
    }
    let mut worst = 0.0f32;
    for step in 0..36usize {
        if step == 7 {
            // Row 0 of the second prompt finishes: the last row takes its slot.
            batch.remove_row(1, 0);
            reference[1].select_rows(Tensor::from_data(TensorData::new(vec![2i64, 1], [2]), &device));
            rows[1] -= 1;
        }
        let mut expected = Vec::new();
        let mut all_tokens = Vec::new();
        let mut all_positions = Vec::new();
        for (s, cache) in reference.iter_mut().enumerate() {
            let n = rows[s];
            let tokens: Vec<u32> = (0..n).map(|r| ((step * 7 + r * 3 + s * 11) as u32) % vocab).collect();
            let position = prompts[s].len() + step;
            let hidden = model.forward_hidden(ids_tensor(&tokens, n, 1), ForwardArgs::contiguous(n, position, 1, &device), cache);
            expected.extend(to_vec(model.logits(hidden)));
            all_tokens.extend(tokens);
            all_positions.extend(std::iter::repeat_n(position as f32, n));
        }
        let b = all_tokens.len();
        let positions = Tensor::<Cpu, 2>::from_data(TensorData::new(all_positions, [b, 1]), &device);
        let hidden = model.forward_segments(ids_tensor(&all_tokens, b, 1), positions, &mut batch);
        let diff = max_abs_diff(&to_vec(model.logits(hidden)), &expected);
        assert!(diff < 1e-4, "step {step}: the in-place cache's logits differ by {diff}");
        worst = worst.max(diff);
    }
    assert_eq!(batch.segments().iter().map(|s| s.len).collect::<Vec<_>>(), vec![36, 36]);
    println!("worst logit difference {worst:.2e}");
}

#[test]
fn one_sample_prompts_decoded_together_match_the_left_padded_batch() {
    let dir = workspace().join("tests/fixtures/reference/tiny-qwen2");
    let (_, model) = load_model::<Cpu>(&dir, &Default::default()).expect("model loads");
    let prompts: Vec<Vec<u32>> = vec![(3..20).collect(), (40..45).collect(), (100..133).collect()];
    let padded = generate_batch(&model, &prompts, &SamplingConfig::greedy(10)).expect("batch");
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(k, p)| GroupRequest { prompt: p.clone(), samples: 1, sampling: SamplingConfig::greedy(10), first_stream: k })
        .collect();
    let together = generate_groups(&model, requests, BatchOptions::default()).expect("generates");
    for (row, (completions, expected)) in together.iter().zip(&padded).enumerate() {
        assert_eq!(completions[0].tokens, expected.tokens, "prompt {row}");
    }
    // Bad requests are errors, not panics.
    let empty = GroupRequest::group(Vec::new(), 2, SamplingConfig::greedy(3));
    assert!(generate_groups(&model, vec![empty], BatchOptions::default()).is_err());
    let none = GroupRequest::group(vec![1, 2], 0, SamplingConfig::greedy(3));
    assert!(generate_groups(&model, vec![none], BatchOptions::default()).is_err());
    let zero = GroupRequest::group(vec![1, 2], 2, SamplingConfig::greedy(0));
    let out = generate_groups(&model, vec![zero], BatchOptions::default()).expect("nothing to generate");
    assert!(out[0].iter().all(|c| c.tokens.is_empty()));
}

#[test]
fn saved_checkpoints_load_back_with_identical_logits_and_bf16_loads() {
    let dir = workspace().join("tests/fixtures/reference/tiny-llama");
    let (config, model) = load_model::<Cpu>(&dir, &Default::default()).expect("model loads");
    let ids: Vec<u32> = (5..25).collect();
    let before = to_vec(model.forward(ids_tensor(&ids, 1, ids.len())));
    let out = tempfile::tempdir().expect("tempdir");
    save_model(&model, &config, out.path(), SaveDtype::F32).expect("saves");
    let (config_back, loaded) = load_model::<Cpu>(out.path(), &Default::default()).expect("loads back");
    assert_eq!(config_back.num_hidden_layers, config.num_hidden_layers);
    assert_eq!(to_vec(loaded.forward(ids_tensor(&ids, 1, ids.len()))), before, "f32 round trip must be exact");
    // Same tensor names as the transformers checkpoint.
    let original = std::fs::read(dir.join("model.safetensors")).expect("read");
    let saved = std::fs::read(out.path().join("model.safetensors")).expect("read");
    let mut a: Vec<String> = SafeTensors::deserialize(&original).expect("valid").names().iter().map(|s| s.to_string()).collect();
    let mut b: Vec<String> = SafeTensors::deserialize(&saved).expect("valid").names().iter().map(|s| s.to_string()).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);

    let bf16_dir = tempfile::tempdir().expect("tempdir");
    save_model(&model, &config, bf16_dir.path(), SaveDtype::Bf16).expect("saves bf16");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bf16_dir.path().join("config.json")).expect("config")).expect("json");
    assert_eq!(json["torch_dtype"], "bfloat16");
    let (_, bf16) = load_model::<Cpu>(bf16_dir.path(), &Default::default()).expect("bf16 loads");
    let diff = max_abs_diff(&to_vec(bf16.forward(ids_tensor(&ids, 1, ids.len()))), &before);
    assert!(diff > 0.0 && diff < 0.05, "bf16 weights change logits a little: {diff}");
}

#[test]
fn broken_checkpoints_name_the_file_and_tensor() {
    let source = workspace().join("tests/fixtures/reference/tiny-qwen2");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).expect("copy");
    let bytes = std::fs::read(source.join("model.safetensors")).expect("read");

    std::fs::write(dir.path().join("model.safetensors"), &bytes[..bytes.len() / 2]).expect("write");
    let err = load_model::<Cpu>(dir.path(), &Default::default()).expect_err("truncated").to_string();
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");

    // Drop one tensor: rewrite the file without it.
    let tensors = SafeTensors::deserialize(&bytes).expect("valid");
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        tensors.tensors().into_iter().filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight").collect();
    std::fs::write(dir.path().join("model.safetensors"), safetensors::serialize(kept, None).expect("serialize")).expect("write");
    let err = load_model::<Cpu>(dir.path(), &Default::default()).expect_err("missing").to_string();
    assert!(err.contains("tensor `model.layers.1.mlp.up_proj.weight` is missing"), "{err}");

    // A config that disagrees with the weights' shapes.
    std::fs::write(dir.path().join("model.safetensors"), &bytes).expect("write");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).expect("read")).expect("json");
    config["intermediate_size"] = 100.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write");
    let err = load_model::<Cpu>(dir.path(), &Default::default()).expect_err("shape").to_string();
    assert!(err.contains("has shape [176, 64], expected [100, 64]"), "{err}");

    std::fs::remove_file(dir.path().join("model.safetensors")).expect("remove");
    let err = load_model::<Cpu>(dir.path(), &Default::default()).expect_err("absent").to_string();
    assert!(err.contains("holds neither model.safetensors"), "{err}");
}

#[test]
fn sharded_checkpoints_load() {
    let source = workspace().join("tests/fixtures/reference/tiny-qwen2");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).expect("copy");
    let bytes = std::fs::read(source.join("model.safetensors")).expect("read");
    let tensors = SafeTensors::deserialize(&bytes).expect("valid");
    let all = tensors.tensors();
    let (first, second): (Vec<_>, Vec<_>) = all.into_iter().partition(|(n, _)| n.contains("layers.0") || n.contains("embed"));
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        for (name, _) in &part {
            weight_map.insert(name.clone(), file.into());
        }
        std::fs::write(dir.path().join(file), safetensors::serialize(part, None).expect("serialize")).expect("write");
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).expect("write");
    let (_, sharded) = load_model::<Cpu>(dir.path(), &Default::default()).expect("sharded loads");
    let (_, single) = load_model::<Cpu>(&source, &Default::default()).expect("single loads");
    let ids: Vec<u32> = (1..10).collect();
    assert_eq!(to_vec(sharded.forward(ids_tensor(&ids, 1, 9))), to_vec(single.forward(ids_tensor(&ids, 1, 9))));
}

#[test]
fn scoring_is_differentiable_on_the_autodiff_backend() {
    let _autodiff = longrl_stdlib::train::autodiff_lock();
    let dir = workspace().join("tests/fixtures/reference/tiny-qwen2");
    let (_, model) = load_model::<CpuTrain>(&dir, &Default::default()).expect("model loads");
    let scores = score_group(&model, &[5, 6, 7, 8], &[vec![9, 10, 11], vec![12, 13]]).expect("scores");
    let loss = scores.logprobs.sum().neg();
    let grads = loss.backward();
    let grad = model.embed_tokens.weight.val().grad(&grads).expect("embedding has a gradient");
    let norm: f32 = grad.square().sum().into_data().convert::<f32>().into_vec::<f32>().expect("f32")[0];
    assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
}

#[test]
fn the_qwen_tokenizer_gives_the_reference_ids() {
    let tokenizer = Tokenizer::load(&workspace().join("examples/tokenizers/qwen2.5/tokenizer.json")).expect("tokenizer");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(workspace().join("tests/fixtures/reference_ids.json")).expect("read")).expect("json");
    for case in cases.as_array().expect("list") {
        let text = case["text"].as_str().expect("text");
        let expected: Vec<u32> = case["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
        assert_eq!(tokenizer.encode(text).expect("encodes"), expected, "{text:?}");
        assert_eq!(tokenizer.decode(&expected, false).expect("decodes"), text);
    }
    let bundle = ModelTokenizer::load(&workspace().join("examples/tokenizers/qwen2.5")).expect("bundle");
    assert_eq!(bundle.think_end_id, Some(151668));
    assert_eq!(bundle.stop_ids, vec![151645], "eos <|im_end|> from tokenizer_config.json");
    assert_eq!(bundle.pad_id, Some(151643));
}

/// A Qwen2.5-Instruct-like model lists `<|endoftext|>` (151643) as eos in config.json and
/// `<|im_end|>` (151645) in tokenizer_config.json: SFT traces must end with the turn's end
/// token, not with the smallest stop id.
#[test]
fn sft_traces_end_with_the_end_of_turn_token_not_the_smallest_stop_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = workspace().join("examples/tokenizers/qwen2.5");
    for entry in std::fs::read_dir(&source).expect("tokenizer dir") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
    }
    std::fs::write(dir.path().join("config.json"), r#"{"eos_token_id": 151643}"#).expect("config");
    let bundle = ModelTokenizer::load(dir.path()).expect("bundle");
    assert_eq!(bundle.stop_ids, vec![151643, 151645]);
    assert_eq!(bundle.end_of_turn, Some(151645));
    let mut record = longrl_stdlib::Record::new("1", "Where?");
    record.answers = vec!["Oslo".into()];
    let (examples, _) = longrl_stdlib::stages::sft::make_examples(&bundle, &[record], 512, 64).expect("examples");
    assert_eq!(examples[0].1.last(), Some(&151645), "the trace ends with <|im_end|>");
}

#[test]
fn chat_templates_render_as_jinja2_does() {
    let root = workspace().join("tests/fixtures/chat-templates");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("expected.json")).expect("read")).expect("json");
    let messages: Vec<ChatMessage> = serde_json::from_value(expected["messages"].clone()).expect("messages");
    let cases = [
        ("qwen2.5", "Qwen-Qwen2.5-7B-Instruct.jinja", "", "", serde_json::json!({})),
        (
            "r1-distill",
            "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            serde_json::json!({"enable_thinking": true}),
        ),
        ("qwen3", "Qwen-Qwen3-0.6B.jinja", "", "", serde_json::json!({})),
    ];
    for (name, file, bos, eos, extra) in cases {
        let template = ChatTemplate::new(&std::fs::read_to_string(root.join(file)).expect("template"), bos, eos).expect("compiles");
        for generation in [true, false] {
            let rendered = template.render(&messages, generation, &extra).expect("renders");
            let want = expected["renders"][format!("{name}/gen={}", if generation { "True" } else { "False" })].as_str().expect("expected");
            assert_eq!(rendered, want, "{name} add_generation_prompt={generation}");
        }
    }
    // The tokenizer directory's own template (Qwen2.5 / Qwen3 tokenizer_config.json).
    let bundle = ModelTokenizer::load(&workspace().join("examples/tokenizers/qwen2.5")).expect("bundle");
    let ids = bundle
        .encode_chat(
            &[ChatMessage { role: "user".into(), content: "What is 2+3?".into() }],
            true,
            &serde_json::json!({"enable_thinking": true}),
        )
        .expect("encodes");
    assert_eq!(&ids[..3], &[151644, 872, 198], "<|im_start|>user\\n");
}
