//! Data-parallel RL training: an `rl_phase` with `devices: N` (replicas on the CPU backend,
//! gradients summed by burn-collective's all-reduce) ends with the same weights as the same
//! phase on one device, for shares of equal and of unequal size; so does `sft` with `devices`.

mod support;

use std::path::Path;

use support::{run_recipe, with_tiny};

/// Three optimizer updates of four groups each (G = 4), from the same random start.
fn recipe(devices: usize) -> String {
    with_tiny(&format!(
        r#"
        let tiny = "{{tiny}}";
        let policy = model(tiny, #{{ init: "random", init_std: 0.08, seed: 3 }});
        let letters = reward(#{{ script: |response, record| {{
            let hits = 0;
            for c in response {{ if c == 'e' {{ hits += 1; }} }}
            if response.len() == 0 {{ 0.0 }} else {{ hits.to_float() / response.len().to_float() }}
        }} }});
        let tasks = synthetic(#{{ count: 24, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], seed: 3 }});
        rl_phase(policy, tasks, #{{
            reward: letters, dynamic_sampling_metric: "reward", max_input: 100, max_output: 8, group: 4,
            prompts_per_step: 4, mini_batch: 4, lr: 1e-3, temperature: 1.0, top_p: 1.0, seed: 1,
            max_steps: 3, devices: {devices},
        }});
        "#
    ))
}

/// A model's weights: each tensor's name and values.
type Weights = Vec<(String, Vec<f32>)>;

/// The weights in the run directory's subdirectory whose name starts with `prefix`, by
/// tensor name.
fn weights(dir: &Path, prefix: &str) -> Weights {
    let found = std::fs::read_dir(dir)
        .expect("run directory")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(prefix) && e.path().join("model.safetensors").is_file())
        .unwrap_or_else(|| panic!("no {prefix}* weights in {}", dir.display()));
    let bytes = std::fs::read(found.path().join("model.safetensors")).expect("weights");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut out: Vec<(String, Vec<f32>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            (name, view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The same tensors, every value finite and within 1e-5 of the one-device run's.
fn assert_close(one: &Weights, many: &Weights, devices: usize) {
    let names = |w: &Weights| w.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>();
    assert_eq!(names(one), names(many), "devices {devices}: other tensors");
    for ((name, a), (_, b)) in one.iter().zip(many) {
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(b) {
            let close = x.is_finite() && y.is_finite() && (x - y).abs() <= 1e-5;
            assert!(close, "devices {devices}: {name} has {y} where one device has {x}");
        }
    }
}

/// How many optimizer updates of the training stage (label starting with `stage`) drew on
/// more than one replica.
fn parallel_updates(report: &longrl_engine::RunReport, stage: &str) -> u64 {
    let stage = report.stages.iter().find(|s| s.label.starts_with(stage)).expect("the training stage");
    stage.summary["parallel_updates"].as_u64().expect("parallel_updates")
}

/// The starting weights and the phase's final ones.
fn trained(devices: usize) -> (Weights, Weights) {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = run_recipe(&recipe(devices), &format!("dp{devices}.rhai"), dir.path());
    // Three updates, each of four groups: split over the replicas whenever there are several.
    assert_eq!(parallel_updates(&report, "rl_phase"), if devices > 1 { 3 } else { 0 });
    (weights(dir.path(), "model-"), weights(dir.path(), "rl-"))
}

#[test]
fn replicas_end_with_the_weights_of_one_device() {
    let (start, one) = trained(1);
    let moved: f32 = one.iter().zip(&start).flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0.0, f32::max);
    assert!(moved > 1e-4, "training moved the weights by only {moved}");
    for devices in [2, 3] {
        let (_, many) = trained(devices);
        assert_eq!(many.len(), one.len());
        assert_close(&one, &many, devices);
    }
}

/// SFT with four micro-batches per step, on one device and on two or three replicas.
fn sft_recipe(devices: usize) -> String {
    with_tiny(&format!(
        r#"
        let tiny = "{{tiny}}";
        let policy = model(tiny, #{{ init: "random", init_std: 0.08, seed: 3 }});
        let traces = synthetic(#{{ count: 32, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], seed: 1 }});
        sft(policy, traces, #{{ lr: 1e-3, epochs: 1, batch_tokens: 300, grad_accum: 4, max_steps: 3, log_every: 1, devices: {devices} }});
        "#
    ))
}

#[test]
fn sft_replicas_end_with_the_weights_of_one_device() {
    let run = |devices: usize| {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = run_recipe(&sft_recipe(devices), &format!("sft{devices}.rhai"), dir.path());
        let steps_split = parallel_updates(&report, "sft");
        assert!(if devices > 1 { steps_split >= 2 } else { steps_split == 0 }, "devices {devices}: {steps_split} steps split");
        (weights(dir.path(), "model-"), weights(dir.path(), "sft-"))
    };
    let (start, one) = run(1);
    let moved: f32 = one.iter().zip(&start).flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0.0, f32::max);
    assert!(moved > 1e-4, "training moved the weights by only {moved}");
    for devices in [2, 3] {
        let (_, many) = run(devices);
        let worst = one.iter().zip(&many).flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "devices {devices}: weights differ by {worst}");
    }
}
