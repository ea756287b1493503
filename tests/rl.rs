//! The RL phase: the policy loss's gradient on a real model against finite differences, and
//! a recipe where a few GRPO steps raise the mean reward, carry the optimizer state into a
//! second phase and report every metric.

mod support;

use std::path::PathBuf;

use burn::module::{AutodiffModule, Param};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use longrl_backends::{Cpu, CpuTrain};
use longrl_engine::dataflow::recipe::Params;
use longrl_engine::execute;
use longrl_engine::load_plan;
use longrl_stdlib::model::Recompute;
use longrl_stdlib::model::score::score_group_at;
use longrl_stdlib::model::{CausalLm, load_model};
use longrl_stdlib::rl::group::{Group, group_backward, group_loss};
use longrl_stdlib::rl::loss::{Aggregation, KlEstimator, LossConfig, Normalizer};
use longrl_stdlib::train::{OptimConfig, Schedule, Trainer};
use longrl_stdlib::{CancelToken, Registry, StageContext};
use support::{options_in, run_recipe, with_tiny, workspace};

type Model = CausalLm<CpuTrain>;

/// The model with `delta` added to its input embedding matrix (the gradient reaches it
/// through every layer).
fn shifted(model: &Model, delta: &[f32]) -> Model {
    let mut out = model.clone();
    let weight = out.embed_tokens.weight.val();
    let shape = weight.dims();
    let values: Vec<f32> = to_vec(weight.clone()).iter().zip(delta).map(|(w, d)| w + d).collect();
    out.embed_tokens.weight = Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), &weight.device()));
    out
}

fn to_vec<B: burn::tensor::backend::Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().expect("f32")
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
fn the_policy_loss_gradient_matches_finite_differences() {
    let _autodiff = longrl_stdlib::train::autodiff_lock();
    let dir = workspace().join("tests/fixtures/reference/tiny-llama");
    let device = Default::default();
    let (_, model) = load_model::<CpuTrain>(&dir, &device).expect("model");
    let temperature = 0.8;
    let prompt = vec![5u32, 9, 13, 21, 40];
    let responses = vec![vec![30u32, 31, 2], vec![44u32, 7, 7, 19, 3], vec![8u32]];
    // Old log-probs: the current ones shifted so that some ratios sit well inside the clip
    // range and some well outside (shifts of 0.05 and 0.6), away from the kinks.
    let current = score_group_at(&model.valid(), &prompt, &responses, temperature).expect("scores");
    let current = current.logprobs.into_data().convert::<f32>().into_vec::<f32>().expect("f32");
    let len = responses.iter().map(Vec::len).max().expect("responses");
    let shifts = [0.05f32, -0.6, 0.6, -0.05, 0.05];
    let old_logprobs: Vec<Vec<f32>> = responses
        .iter()
        .enumerate()
        .map(|(i, r)| (0..r.len()).map(|j| current[i * len + j] - shifts[(i + j) % shifts.len()]).collect())
        .collect();
    let group = Group {
        prompt: prompt.clone(),
        responses: responses.clone(),
        old_logprobs,
        rewards: vec![Some(1.0), Some(0.0), Some(0.5)],
        advantages: vec![Some(1.2), Some(-0.9), Some(-0.3)],
    };
    // A reference a little away from the policy, so the KL term has a gradient.
    let [vocab, hidden] = model.embed_tokens.weight.val().dims();
    let nudge: Vec<f32> = (0..vocab * hidden).map(|i| if i % 3 == 0 { 0.01 } else { -0.01 }).collect();
    let reference = shifted(&model, &nudge).valid();
    let normalizer = Normalizer { tokens: 9.0, responses: 3.0 };
    for aggregation in [Aggregation::Token, Aggregation::Sequence, Aggregation::TokenSumNorm] {
        let config = LossConfig {
            eps_low: 0.2,
            eps_high: 0.28,
            aggregation,
            kl_coef: 0.3,
            kl_estimator: KlEstimator::K3,
            entropy_coef: 0.05,
            norm_length: 6.0,
        };
        let loss_at = |m: &Model| -> f64 {
            let (loss, _) = group_loss(m, Some(&reference), &group, temperature, &config, normalizer).expect("loss");
            loss.into_scalar().elem::<f64>()
        };
        let (loss, sums) = group_loss(&model, Some(&reference), &group, temperature, &config, normalizer).expect("loss");
        assert!(sums.clipped_tokens > 0.0 && sums.clipped_tokens < sums.tokens, "the batch mixes clipped and unclipped tokens");
        let grads = loss.backward();
        let grad = to_vec(model.embed_tokens.weight.grad(&grads).expect("embedding gradient"));
        // The same gradient through the memory-saving path: recomputed layers, responses in
        // micro-batches of at most 5 padded tokens that reuse one forward of the prompt.
        let mut trainer = Trainer::new(model.clone().with_recompute(Recompute::Layer), optim());
        group_backward(&mut trainer, Some(&reference), &group, temperature, &config, normalizer, 5).expect("backward");
        let micro = trainer.take_gradients().get::<Cpu, 2>(model.embed_tokens.weight.id).expect("embedding gradient");
        let micro = to_vec(micro);
        let gap: f32 = grad.iter().zip(&micro).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(gap < 1e-5, "{aggregation:?}: the micro-batched, recomputed gradient differs by {gap}");
        // The five largest entries, one at a time, by central differences.
        let mut order: Vec<usize> = (0..grad.len()).collect();
        order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
        let eps = 2e-3f32;
        for &index in order.iter().take(5) {
            let mut delta = vec![0.0f32; grad.len()];
            delta[index] = eps;
            let plus = loss_at(&shifted(&model, &delta));
            delta[index] = -eps;
            let minus = loss_at(&shifted(&model, &delta));
            let numeric = (plus - minus) / (2.0 * f64::from(eps));
            let analytic = f64::from(grad[index]);
            eprintln!("{aggregation:?} embed[{index}]: analytic {analytic:.6}, numeric {numeric:.6}");
            assert!(
                (numeric - analytic).abs() <= 1e-3 + 0.005 * analytic.abs(),
                "{aggregation:?}: d loss / d embed[{index}]: analytic {analytic:.6}, numeric {numeric:.6}"
            );
        }
        // And along a random direction over the whole matrix.
        let mut state = 17u64;
        let direction: Vec<f32> = (0..grad.len())
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        let analytic: f64 = grad.iter().zip(&direction).map(|(g, d)| f64::from(g * d)).sum();
        let step = 2e-3f32;
        let plus = loss_at(&shifted(&model, &direction.iter().map(|d| d * step).collect::<Vec<_>>()));
        let minus = loss_at(&shifted(&model, &direction.iter().map(|d| -d * step).collect::<Vec<_>>()));
        let numeric = (plus - minus) / (2.0 * f64::from(step));
        eprintln!("{aggregation:?} direction: analytic {analytic:.6}, numeric {numeric:.6}");
        assert!(
            (numeric - analytic).abs() <= 1e-3 + 0.005 * analytic.abs(),
            "{aggregation:?}: directional derivative: analytic {analytic:.6}, numeric {numeric:.6}"
        );
    }
}

/// The reward of the end-to-end test: the share of the letter `e` in the response, a
/// deterministic target that a randomly initialised model can learn in a few steps.
const RECIPE: &str = r#"
let tiny = "{tiny}";
let policy = model(tiny, #{ init: "random", init_std: 0.08, seed: 3 });
let tasks = synthetic(#{ count: 48, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 1 });
let letters = reward(#{ script: |response, record| {
    let hits = 0;
    for c in response { if c == 'e' { hits += 1; } }
    if response.len() == 0 { 0.0 } else { hits.to_float() / response.len().to_float() }
} });
// The letter share is a graded reward, not correctness: groups are filtered on its variance.
let phase = #{
    reward: letters, dynamic_sampling_metric: "reward", max_input: 256, max_output: 12, group: 6, prompts_per_step: 4, mini_batch: 2,
    lr: 3e-3, schedule: "constant", warmup_steps: 0, temperature: 1.0, top_p: 1.0, seed: 5,
};
let first = rl_phase(policy, tasks, phase + #{ max_steps: 12 });
rl_phase(first, tasks, phase + #{ max_steps: 1 });
"#;

#[test]
fn a_few_rl_steps_raise_the_mean_reward_and_the_next_phase_carries_the_optimizer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = run_recipe(&with_tiny(RECIPE), "rl.rhai", dir.path());

    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("metrics");
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    let first_label = lines.iter().find_map(|l| l["stage"].as_str().filter(|s| s.starts_with("rl_phase"))).expect("rl metrics");
    let first: Vec<&serde_json::Value> = lines.iter().filter(|l| l["stage"] == first_label).collect();
    assert_eq!(first.len(), 12, "one metrics line per step: {metrics}");
    for line in &first {
        for field in [
            "reward_mean",
            "accuracy",
            "pass_rate_histogram",
            "entropy",
            "clip_fraction",
            "response_length",
            "truncation_rate",
            "groups_filtered",
            "unscorable",
            "rollout_tokens_per_s",
            "train_tokens_per_s",
            "loss",
            "grad_norm",
            "lr",
        ] {
            assert!(!line[field].is_null(), "metrics lack {field}: {line}");
        }
    }
    let reward = |l: &&serde_json::Value| l["reward_mean"].as_f64().expect("reward");
    let early: f64 = first[..3].iter().map(reward).sum::<f64>() / 3.0;
    let late: f64 = first[9..].iter().map(reward).sum::<f64>() / 3.0;
    eprintln!("mean reward per step: {:?}", first.iter().map(reward).map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>());
    assert!(late > early + 0.05, "mean reward {early:.3} -> {late:.3}: {metrics}");

    let phases: Vec<_> = report.stages.iter().filter(|s| s.label.starts_with("rl_phase")).collect();
    assert_eq!(phases.len(), 2);
    assert_eq!(phases[0].summary["optimizer_state"], "fresh");
    assert_eq!(phases[1].summary["optimizer_state"], "carried", "the second phase continues the first one's moments");
    let checkpoint = PathBuf::from(phases[0].summary["checkpoint"].as_str().expect("checkpoint"));
    for file in ["model.safetensors", "config.json", "tokenizer.json", "optimizer.bin"] {
        assert!(checkpoint.join(file).is_file(), "the phase's checkpoint lacks {file}");
    }
}

/// Phase 1 reports every task; the reward depends only on the task (1 when its answer has
/// an even number of characters), so the zero-accuracy tasks are known in advance.
const CHAIN: &str = r#"
let tiny = "{tiny}";
let policy = model(tiny, #{ init: "random", init_std: 0.08, seed: 3 });
let short = synthetic(#{ count: 8, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 1 });
short.write_jsonl("short.jsonl");
let long = synthetic(#{ count: 3, lengths: [160], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 2 });
let parity = reward(#{ script: |response, record| if record.answers[0].len() % 2 == 0 { 1.0 } else { 0.0 } });
let phase = #{ reward: parity, max_output: 4, group: 2, mini_batch: 2, lr: 1e-3, dynamic_sampling: false, seed: 1 };
let first = rl_phase(policy, short, phase + #{ max_input: 100, prompts_per_step: 4 });
let hard = hard_buffer(first.output("reports"), long, #{ policy: "zero_accuracy", mix: 1.0 });
rl_phase(first, hard, phase + #{ min_input: 100, max_input: 200, prompts_per_step: 2, max_steps: 1 });
"#;

#[test]
fn the_second_phase_receives_the_first_phases_zero_accuracy_tasks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = run_recipe(&with_tiny(CHAIN), "chain.rhai", dir.path());

    let read_lines = |path: PathBuf| -> Vec<serde_json::Value> {
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    };
    let short = read_lines(dir.path().join("short.jsonl"));
    let mut zero: Vec<String> = short
        .iter()
        .filter(|r| r["answers"][0].as_str().expect("answer").chars().count() % 2 == 1)
        .map(|r| r["id"].as_str().expect("id").to_string())
        .collect();
    zero.sort();
    assert!(!zero.is_empty() && zero.len() < short.len(), "the fixture needs both kinds of task: {zero:?}");

    let phases: Vec<_> = report.stages.iter().filter(|s| s.label.starts_with("rl_phase")).collect();
    let second_dir = PathBuf::from(phases[1].summary["checkpoint"].as_str().expect("checkpoint"));
    let tasks = read_lines(second_dir.join("tasks.jsonl"));
    let mut carried: Vec<String> =
        tasks.iter().filter(|t| t["carried"] == true).map(|t| t["id"].as_str().expect("id").to_string()).collect();
    carried.sort();
    assert_eq!(carried, zero, "phase 2 trains on exactly phase 1's zero-accuracy tasks");
    assert_eq!(tasks.iter().filter(|t| t["carried"] == false).count(), 3, "and on its own fresh tasks");
    assert_eq!(phases[1].summary["carried_tasks"], zero.len());
    assert_eq!(phases[1].summary["optimizer_state"], "carried");
    let buffer = report.stages.iter().find(|s| s.label.starts_with("hard_buffer")).expect("buffer");
    assert_eq!(buffer.summary["tasks_reported"], short.len());
    let state: longrl_stdlib::rl::buffer::HardBuffer =
        serde_json::from_str(&std::fs::read_to_string(buffer.summary["state"].as_str().expect("state")).expect("state file"))
            .expect("state");
    let mut held = state.held.clone();
    held.sort();
    assert_eq!(held, zero);
}

#[test]
fn check_rejects_a_curriculum_whose_bands_overlap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = with_tiny(CHAIN).replace("min_input: 100,", "min_input: 50,");
    let registry = Registry::standard();
    let plan = load_plan(&recipe, "chain.rhai", &registry, &Params::new()).expect("recipe");
    let problems = plan.validate(&registry, &StageContext::for_check(dir.path())).expect_err("overlapping bands");
    let text = problems.to_string();
    assert!(text.contains("chain.rhai:11:1") && text.contains("overlaps"), "{text}");
}

#[test]
fn offline_difficulty_scoring_annotates_records_and_feeds_a_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = r#"
        let tiny = "{tiny}";
        let policy = model(tiny, #{ init: "random", init_std: 0.08, seed: 3 });
        let tasks = synthetic(#{ count: 6, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 1 });
        let parity = reward(#{ script: |response, record| if record.answers[0].len() % 2 == 0 { 1.0 } else { 0.0 } });
        let scored = score_difficulty(policy, tasks, #{ reward: parity, group: 3, max_output: 4 });
        scored.output("records").write_jsonl("scored.jsonl");
        hard_buffer(scored.output("reports"), #{ policy: "zero_accuracy", mix: 1.0 }).write_jsonl("hard.jsonl");
    "#;
    run_recipe(&with_tiny(recipe), "score.rhai", dir.path());
    let read = |name: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.path().join(name)).expect("output").lines().map(|l| serde_json::from_str(l).expect("json")).collect()
    };
    let scored = read("scored.jsonl");
    assert_eq!(scored.len(), 6);
    let mut unsolved = Vec::new();
    for record in &scored {
        let even = record["answers"][0].as_str().expect("answer").chars().count() % 2 == 0;
        let difficulty = &record["difficulty"];
        assert_eq!(difficulty["pass_rate"].as_f64(), Some(if even { 1.0 } else { 0.0 }), "{record}");
        assert_eq!(difficulty["rewards"].as_array().expect("rewards").len(), 3);
        if even {
            assert_eq!(difficulty["difficulty"].as_f64(), Some(1.0), "1 / mean reward");
        } else {
            assert!(difficulty["difficulty"].is_null(), "infinite difficulty is null");
            unsolved.push(record["id"].as_str().expect("id").to_string());
        }
    }
    let mut carried: Vec<String> = read("hard.jsonl").iter().map(|r| r["id"].as_str().expect("id").to_string()).collect();
    carried.sort();
    unsolved.sort();
    assert!(!unsolved.is_empty());
    assert_eq!(carried, unsolved, "the buffer holds the tasks nothing solved");
}

/// The buffer's fresh tasks wait for phase 1's model (they are scored by it), and phase 1
/// sends more reports than an edge holds: the buffer must read both inputs together.
#[test]
fn a_buffer_whose_fresh_tasks_wait_for_the_reporting_phase_does_not_deadlock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = r#"
        let tiny = "{tiny}";
        let policy = model(tiny, #{ init: "random", init_std: 0.08, seed: 3 });
        let short = synthetic(#{ count: 8, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 1 });
        let long = synthetic(#{ count: 3, lengths: [160], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 2 });
        let parity = reward(#{ script: |response, record| if record.answers[0].len() % 2 == 0 { 1.0 } else { 0.0 } });
        let phase = #{ reward: parity, max_output: 4, group: 2, mini_batch: 2, lr: 1e-3, dynamic_sampling: false, seed: 1 };
        let first = rl_phase(policy, short, phase + #{ max_input: 100, prompts_per_step: 4 });
        let scored = score_difficulty(first, long, #{ reward: parity, group: 2, max_output: 4 });
        let hard = hard_buffer(first.output("reports"), scored.output("records"), #{ mix: 1.0 });
        rl_phase(first, hard, phase + #{ min_input: 100, max_input: 200, prompts_per_step: 2, max_steps: 1 });
    "#;
    let report = run_with_small_queues(recipe, "wait.rhai", dir.path());
    let buffer = report.stages.iter().find(|s| s.label.starts_with("hard_buffer")).expect("buffer");
    assert_eq!(buffer.summary["reports"], 8);
    assert_eq!(buffer.summary["fresh"], 3);
}

/// One source feeds a warm-up SFT and the RL phase after it, and the held-out set feeds an
/// evaluation before and after: each source sends more records than an edge holds while a
/// stage that reads it waits for a model made from the source's other consumer. Model stages
/// must drain their records while they wait for the policy.
#[test]
fn model_stages_drain_their_records_while_they_wait_for_the_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = r#"
        let tiny = "{tiny}";
        let policy = model(tiny, #{ init: "random", init_std: 0.08, seed: 3 });
        let train = synthetic(#{ count: 8, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 1 });
        let held_out = synthetic(#{ count: 6, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 2 });
        let evaluation = #{ max_new_tokens: 2, samples: 1, batch: 2 };
        evaluate(policy, held_out, evaluation + #{ name: "before" });
        let warm = sft(policy, train, #{ epochs: 1, lr: 1e-3, batch_tokens: 256, max_steps: 1 });
        let tuned = rl_phase(warm, train, #{ max_input: 100, max_output: 4, group: 2, prompts_per_step: 2, mini_batch: 2, lr: 1e-3, dynamic_sampling: false, max_steps: 1, seed: 1 });
        evaluate(tuned, held_out, evaluation + #{ name: "after" });
    "#;
    let report = run_with_small_queues(recipe, "fan_out.rhai", dir.path());
    let evaluated: Vec<_> = report.stages.iter().filter(|s| s.label.starts_with("evaluate")).collect();
    assert_eq!(evaluated.len(), 2);
    for stage in evaluated {
        assert_eq!(stage.summary["tasks"], 6, "{}: {:?}", stage.label, stage.summary);
    }
}

/// Runs a recipe on the tiny model with queues of two items per edge, failing the test
/// (and stopping the run) if it has not finished within five minutes.
fn run_with_small_queues(recipe: &str, name: &str, dir: &std::path::Path) -> longrl_engine::RunReport {
    let registry = Registry::standard();
    let plan = load_plan(&with_tiny(recipe), name, &registry, &Params::new()).expect("recipe");
    let plan = plan.validate(&registry, &StageContext::for_check(dir)).expect("valid");
    let mut options = options_in(dir);
    options.channel_capacity = 2;
    let cancel = CancelToken::new();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let handle = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            let report = execute(&plan, &registry, &options, &cancel);
            let _ = done_tx.send(());
            report
        })
    };
    if done_rx.recv_timeout(std::time::Duration::from_secs(300)).is_err() {
        cancel.cancel();
        panic!("the run deadlocked");
    }
    let report = handle.join().expect("thread").expect("runs");
    assert!(report.succeeded(), "{report}");
    report
}
