//! Mixed precision (`precision: "bf16-mixed"`) against the f32 path: logits of the reference
//! checkpoints within bf16 tolerance of transformers' and of the f32 path's, gradients that
//! reach the f32 master weights, SFT and RL curves that track the f32 run's, and an exact
//! resume from bf16 checkpoints (the f32 master weights are saved beside them).

mod support;

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Int, Tensor, TensorData};
use longrl_backends::Cpu;
use longrl_stdlib::model::load_model;
use longrl_stdlib::model::precision::{Precision, compute_copy, model_dtype};

use support::{run_recipe, with_tiny, workspace};

/// A reference tensor of `reference.safetensors` as f32 values (int64 ids included).
fn reference(dir: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("reference.safetensors")).expect("reference file");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid reference");
    let view = tensors.tensor(name).expect("tensor present");
    let values = match view.dtype() {
        safetensors::Dtype::I64 => view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
        safetensors::Dtype::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    (view.shape().to_vec(), values)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The logits of a reference checkpoint's inputs with the parameters in `dtype`.
fn logits<B: longrl_backends::CustomGrad>(dir: &Path, dtype: DType, device: &B::Device) -> Vec<f32> {
    let (_, model) = load_model::<B>(dir, device).expect("model loads");
    let model = compute_copy(&model, dtype);
    assert_eq!(model_dtype(&model), dtype);
    let (shape, ids) = reference(dir, "input_ids");
    let ids: Vec<i64> = ids.iter().map(|&v| v as i64).collect();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [shape[0], shape[1]]), device);
    model.forward(tokens).into_data().convert::<f32>().into_vec().expect("f32")
}

/// bf16 keeps 8 significant bits: a logit may move by a few units of its last place per
/// layer. The bound: 2^-5 of the largest reference logit, plus 0.02.
fn bf16_tolerance(expected: &[f32]) -> f32 {
    let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    scale / 32.0 + 0.02
}

/// The golden test at `precision: bf16-mixed` on backend `B`: logits within bf16 tolerance
/// of transformers' (f32) and of this backend's f32 path. Returns the compute dtype used and
/// the worst difference from transformers.
fn golden_mixed<B: longrl_backends::CustomGrad>(device: &B::Device) -> (DType, f32) {
    let dtype = Precision::Bf16Mixed.resolve::<B>(device);
    let mut worst = 0.0f32;
    for name in ["tiny-qwen2", "tiny-llama"] {
        let dir = workspace().join("tests/fixtures/reference").join(name);
        let (_, expected) = reference(&dir, "logits");
        let tolerance = bf16_tolerance(&expected);
        let full = logits::<B>(&dir, DType::F32, device);
        let mixed = logits::<B>(&dir, dtype, device);
        let (vs_reference, vs_f32) = (max_abs_diff(&mixed, &expected), max_abs_diff(&mixed, &full));
        println!(
            "{name} ({dtype:?}): max |logit - transformers| = {vs_reference:.3e}, vs f32 path {vs_f32:.3e}, tolerance {tolerance:.3e}"
        );
        assert!(max_abs_diff(&full, &expected) < 1e-3, "{name}: the f32 path matches transformers");
        assert!(vs_reference <= tolerance, "{name}: bf16 logits differ from transformers' by {vs_reference} > {tolerance}");
        assert!(vs_f32 <= tolerance, "{name}: bf16 logits differ from the f32 path's by {vs_f32} > {tolerance}");
        if dtype == DType::BF16 {
            assert!(vs_f32 > 0.0, "{name}: the bf16 path really ran in bf16");
        }
        worst = worst.max(vs_reference);
    }
    (dtype, worst)
}

#[test]
fn bf16_logits_match_transformers_within_bf16_tolerance() {
    let (dtype, worst) = golden_mixed::<Cpu>(&Default::default());
    assert_eq!(dtype, DType::BF16, "the CPU backend computes in bf16");
    println!("cpu: worst bf16 logit difference {worst:.3e}");
}

/// The same on wgpu (Mesa's llvmpipe is enough): wgpu's WGSL compiler has no bf16, so
/// `bf16-mixed` falls back to f32 there, and the logits are the f32 path's. Skipped, saying
/// so, when no adapter is present.
#[cfg(feature = "wgpu")]
#[test]
fn bf16_mixed_on_wgpu_falls_back_to_f32_and_matches() {
    let Some(spec) = support::device_or_skip(longrl_backends::BackendKind::Wgpu, "the wgpu mixed-precision test") else { return };
    let (dtype, worst) = golden_mixed::<longrl_backends::Wgpu>(&longrl_backends::wgpu_device(spec));
    assert_eq!(dtype, DType::F32, "wgpu falls back to f32");
    println!("wgpu: worst logit difference {worst:.3e}");
}

/// The same on CUDA, which computes in bf16. Skipped, saying so, when no CUDA device is
/// present, unless `LONGRL_REQUIRE_DEVICE=1` (as `scripts/device_check.sh cuda` sets).
#[cfg(feature = "cuda")]
#[test]
fn bf16_logits_match_transformers_on_cuda() {
    let Some(spec) = support::device_or_skip(longrl_backends::BackendKind::Cuda, "the CUDA mixed-precision test") else { return };
    let (dtype, worst) = golden_mixed::<longrl_backends::Cuda>(&longrl_backends::cuda_device(spec));
    assert_eq!(dtype, DType::BF16, "CUDA computes in bf16");
    println!("cuda: worst bf16 logit difference {worst:.3e}");
}

/// Gradients of the master (f32) weights through a bf16 compute copy, for each attention
/// path: the plain one, the flash custom op, and the recomputed layer.
#[test]
fn bf16_gradients_reach_the_f32_master_weights() {
    use longrl_backends::CpuTrain;
    use longrl_stdlib::model::Recompute;
    use longrl_stdlib::model::attention::AttentionOptions;
    use longrl_stdlib::model::score::score_batch;
    let _autodiff = longrl_stdlib::train::autodiff_lock();
    let dir = workspace().join("tests/fixtures/reference/tiny-qwen2");
    let pairs = vec![((1..20).collect::<Vec<u32>>(), (30..40).collect::<Vec<u32>>()), ((5..9).collect(), (50..70).collect())];
    for (label, options, recompute) in [
        ("plain", AttentionOptions::never_chunked(), Recompute::None),
        ("flash", AttentionOptions::always_chunked(4, 8), Recompute::None),
        ("layer", AttentionOptions::always_chunked(4, 8), Recompute::Layer),
    ] {
        let grad_of = |dtype: DType| -> (f32, Vec<f32>) {
            let (_, master) = load_model::<CpuTrain>(&dir, &Default::default()).expect("loads");
            let master = master.with_attention(options).with_recompute(recompute);
            let copy = compute_copy(&master, dtype);
            let scores = score_batch(&copy, &pairs).expect("scores");
            assert_eq!(scores.logprobs.dtype(), DType::F32, "log-probs in f32");
            let loss = scores.logprobs.sum().neg();
            let value: f32 = loss.clone().into_scalar();
            let grads = loss.backward();
            let g = master.layers[0].self_attn.q_proj.weight.val().grad(&grads).expect("gradient");
            assert_eq!(g.dtype(), DType::F32, "master gradient in f32");
            (value, g.into_data().convert::<f32>().into_vec().expect("f32"))
        };
        let (loss32, g32) = grad_of(DType::F32);
        let (loss16, g16) = grad_of(DType::BF16);
        let dot: f32 = g32.iter().zip(&g16).map(|(a, b)| a * b).sum();
        let norm = |g: &[f32]| g.iter().map(|v| v * v).sum::<f32>().sqrt();
        let cosine = dot / (norm(&g32) * norm(&g16));
        println!("{label}: loss {loss32} vs {loss16}, gradient cosine {cosine}");
        // bf16 rounds each activation to 8 significant bits: the loss moves by well under a
        // percent and the gradient keeps its direction (measured: cosine 0.9998).
        assert!((loss32 - loss16).abs() <= 0.01 * loss32.abs(), "{label}: bf16 loss {loss16} vs f32 {loss32}");
        assert!(cosine > 0.999, "{label}: the bf16 gradient's cosine with the f32 one is {cosine}");
        assert!(g16 != g32, "{label}: the bf16 path really ran in bf16");
    }
}

/// SFT then an RL phase on the embedded tiny model, at `{precision}`.
const RECIPE: &str = r#"
let tiny = "{tiny}";
let policy = model(tiny, #{ init: "random", init_std: 0.08, seed: 3 });
let traces = synthetic(#{ count: 48, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 1 });
let warm = sft(policy, traces, #{ lr: 2e-3, epochs: 1, batch_tokens: 600, log_every: 1, checkpoint_every: 2, precision: "{precision}" });
let letters = reward(#{ script: |response, record| {
    let hits = 0;
    for c in response { if c == 'e' { hits += 1; } }
    if response.len() == 0 { 0.0 } else { hits.to_float() / response.len().to_float() }
} });
let tasks = synthetic(#{ count: 48, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 2 });
rl_phase(warm, tasks, #{
    reward: letters, dynamic_sampling_metric: "reward", max_input: 256, max_output: 12, group: 6, prompts_per_step: 4, mini_batch: 2,
    lr: 3e-3, schedule: "constant", warmup_steps: 0, temperature: 1.0, top_p: 1.0, seed: 5, max_steps: 10, checkpoint_every: 1,
    precision: "{precision}",
});
"#;

/// `field` of every metrics line of the stage whose label starts with `prefix`.
fn curve(dir: &Path, prefix: &str, field: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics");
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|l| l["stage"].as_str().is_some_and(|s| s.starts_with(prefix)))
        .map(|l| l[field].as_f64().unwrap_or_else(|| panic!("{field} in {l}")))
        .collect()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

#[test]
fn bf16_mixed_sft_and_rl_curves_track_the_f32_run() {
    let runs: Vec<(tempfile::TempDir, longrl_engine::dataflow::executor::RunReport)> = ["f32", "bf16-mixed"]
        .iter()
        .map(|precision| {
            let dir = tempfile::tempdir().expect("tempdir");
            let report = run_recipe(&with_tiny(RECIPE).replace("{precision}", precision), "precision.rhai", dir.path());
            (dir, report)
        })
        .collect();
    let (f32_dir, bf16_dir) = (runs[0].0.path(), runs[1].0.path());
    for (_, report) in &runs {
        for stage in report.stages.iter().filter(|s| s.label.starts_with("sft") || s.label.starts_with("rl_phase")) {
            assert!(stage.summary.contains_key("precision"), "{} reports its precision", stage.label);
        }
    }

    // SFT: the same batches, so the losses match step by step within bf16's rounding.
    let (sft32, sft16) = (curve(f32_dir, "sft", "loss"), curve(bf16_dir, "sft", "loss"));
    assert_eq!(sft32.len(), sft16.len());
    assert!(sft32.len() >= 4, "SFT logged its steps");
    println!("sft loss f32  {sft32:.4?}\nsft loss bf16 {sft16:.4?}");
    for (step, (a, b)) in sft32.iter().zip(&sft16).enumerate() {
        assert!((a - b).abs() <= 0.02 * a.abs() + 0.02, "SFT step {step}: loss {b} (bf16-mixed) vs {a} (f32)");
    }
    assert!(sft16.last() < sft16.first(), "bf16-mixed SFT learns: {sft16:?}");

    // RL: sampled rollouts diverge once a rounding flips a token, so the curves are compared
    // as means over the phase, and each must rise as the f32 one does.
    let (reward32, reward16) = (curve(f32_dir, "rl_phase", "reward_mean"), curve(bf16_dir, "rl_phase", "reward_mean"));
    println!("rl reward f32  {reward32:.3?}\nrl reward bf16 {reward16:.3?}");
    assert_eq!(reward32.len(), reward16.len());
    assert!((mean(&reward32) - mean(&reward16)).abs() <= 0.06, "mean reward {} (bf16-mixed) vs {} (f32)", mean(&reward16), mean(&reward32));
    for (step, (a, b)) in reward32.iter().zip(&reward16).enumerate() {
        assert!((a - b).abs() <= 0.1, "RL step {step}: mean reward {b} (bf16-mixed) vs {a} (f32)");
    }
    let half = reward16.len() / 2;
    for curve in [&reward32, &reward16] {
        assert!(mean(&curve[half..]) > mean(&curve[..half]), "the reward rises: {curve:?}");
    }
    let (loss32, loss16) = (curve(f32_dir, "rl_phase", "loss"), curve(bf16_dir, "rl_phase", "loss"));
    println!("rl loss f32  {loss32:.4?}\nrl loss bf16 {loss16:.4?}");
    assert!(loss16.iter().all(|l| l.is_finite()), "finite RL losses: {loss16:?}");

    // The bf16-mixed run saves bf16 weights with the f32 master weights beside them.
    let phase = runs[1].1.stages.iter().find(|s| s.label.starts_with("rl_phase")).expect("phase");
    let published = PathBuf::from(phase.summary["checkpoint"].as_str().expect("checkpoint"));
    let dtype_of = |file: &Path| {
        let bytes = std::fs::read(file).expect("weights");
        let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        tensors.tensor("model.norm.weight").expect("norm").dtype()
    };
    assert_eq!(dtype_of(&published.join("model.safetensors")), safetensors::Dtype::BF16);
    assert_eq!(dtype_of(&published.join("master/model.safetensors")), safetensors::Dtype::F32);
}

/// Metrics lines of a run without the timing fields, which no two runs share.
fn untimed_metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|mut v| {
            let object = v.as_object_mut().expect("object");
            for key in ["elapsed_s", "tokens_per_s", "rollout_tokens_per_s", "train_tokens_per_s"] {
                object.remove(key);
            }
            v
        })
        .collect()
}

/// The published phase's weights and master weights of a run directory.
fn final_files(base: &Path, run: &Path) -> (Vec<u8>, Vec<u8>) {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).expect("report.json")).expect("json");
    let phase = report["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .find(|s| s["label"].as_str().is_some_and(|l| l.starts_with("rl_phase")))
        .expect("phase");
    let dir = base.join(phase["summary"]["checkpoint"].as_str().expect("checkpoint"));
    (std::fs::read(dir.join("model.safetensors")).expect("weights"), std::fs::read(dir.join("master/model.safetensors")).expect("master"))
}

/// A bf16-mixed run killed inside its RL phase and resumed ends bitwise identical to the run
/// left alone: the checkpoints hold bf16 weights, and the f32 master weights beside them.
#[test]
fn a_bf16_mixed_run_resumes_exactly() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("mixed.rhai"), with_tiny(RECIPE).replace("{precision}", "bf16-mixed")).expect("recipe");
    let longrl = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_longrl"));
        cmd.args(args).current_dir(dir.path()).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped());
        cmd
    };
    let out = longrl(&["run", "mixed.rhai", "--name", "whole"]).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let killed = dir.path().join("runs/killed");
    let mut child = longrl(&["run", "mixed.rhai", "--name", "killed"]).stderr(Stdio::null()).spawn().expect("starts");
    let started = Instant::now();
    let rl_lines =
        |run: &Path| untimed_metrics(run).iter().filter(|l| l["stage"].as_str().is_some_and(|s| s.starts_with("rl_phase"))).count();
    while rl_lines(&killed) < 3 {
        assert!(child.try_wait().expect("polls").is_none(), "the run ended before the kill point");
        assert!(started.elapsed() < Duration::from_secs(600), "kill point never reached");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let checkpoints = killed.join("checkpoints");
    let master_saved = walk(&checkpoints).iter().any(|p| p.ends_with("master/model.safetensors"));
    assert!(master_saved, "the checkpoints hold the f32 master weights");

    let out = longrl(&["run", "--resume", "runs/killed"]).output().expect("resumes");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.lines().any(|l| l.contains("resuming from") && l.contains("rl_phase")), "the phase resumed from its checkpoint:\n{log}");
    let whole = dir.path().join("runs/whole");
    let (a, b) = (final_files(dir.path(), &whole), final_files(dir.path(), &killed));
    assert!(a.0 == b.0, "the resumed run's bf16 weights differ from the uninterrupted run's");
    assert!(a.1 == b.1, "the resumed run's f32 master weights differ from the uninterrupted run's");
    assert_eq!(untimed_metrics(&whole), untimed_metrics(&killed), "metrics differ");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
