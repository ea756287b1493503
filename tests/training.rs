//! Task sources, warm-up SFT and evaluation: deterministic long-context tasks that hit their
//! token budget with the gold facts where recorded, the SFT loss against transformers'
//! logits, an SFT step that lowers the loss, and a recipe that trains and evaluates.

use std::path::{Path, PathBuf};

use burn::tensor::ElementConversion;
use burn::tensor::activation::log_softmax;
use longrl_backends::{Cpu, CpuTrain};
use longrl_engine::dataflow::executor::RunOptions;
use longrl_engine::dataflow::recipe::Params;
use longrl_engine::{execute, load_plan};
use longrl_stdlib::model::{CausalLm, load_model};
use longrl_stdlib::stages::sft::response_nll;
use longrl_stdlib::stages::synthetic::{SyntheticConfig, TaskKind, generate};
use longrl_stdlib::tokenizer::Tokenizer;
use longrl_stdlib::train::{OptimConfig, Schedule, Trainer};
use longrl_stdlib::{CancelToken, Record, Registry, StageContext};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn synthetic_config(seed: u64, lengths: Vec<usize>) -> SyntheticConfig {
    SyntheticConfig {
        count: 8,
        lengths,
        tokenizer: workspace().join("examples/tokenizers/qwen2.5"),
        kinds: vec![TaskKind::Retrieval, TaskKind::Multihop, TaskKind::Arithmetic, TaskKind::Choice],
        distractors: 6,
        distractor_keys: Default::default(),
        seed,
        order: Default::default(),
    }
}

/// Checks a record's length (at most `tolerance` under its budget) and where its gold facts are.
fn check_layout(record: &Record, tokenizer: &Tokenizer, tolerance: usize) {
    let budget = record.length_budget.expect("budget");
    let tokens = tokenizer.encode(&record.input_text()).expect("encodes").len();
    assert_eq!(record.input_tokens, Some(tokens), "{}: recorded length", record.id);
    assert!(tokens <= budget && tokens + tolerance >= budget, "{}: {tokens} tokens for a budget of {budget}", record.id);
    let facts = record.metadata["supporting_sentences"].as_array().expect("facts");
    let offsets = record.metadata["fact_offsets"].as_array().expect("offsets");
    let depths = record.metadata["depths"].as_array().expect("depths");
    assert_eq!(offsets.len(), facts.len().min(offsets.len()));
    for ((offset, depth), _) in offsets.iter().zip(depths).zip(facts) {
        let offset = offset.as_u64().expect("offset") as usize;
        let depth = depth.as_f64().expect("depth");
        assert!((depth - offset as f64 / record.context.len() as f64).abs() < 1e-9);
        // The fact (or the gold paragraph starting there) is at the recorded offset.
        let at = &record.context[offset..];
        assert!(facts.iter().any(|f| at.starts_with(f.as_str().expect("fact"))) || record.data_source == "hotpotqa", "{}", record.id);
    }
}

#[test]
fn synthetic_tasks_are_deterministic_and_hit_their_budgets() {
    let tokenizer = Tokenizer::load(&workspace().join("examples/tokenizers/qwen2.5")).expect("tokenizer");
    let config = synthetic_config(7, vec![300, 1200]);
    let first = generate(&config, &tokenizer).expect("generates");
    let second = generate(&config, &tokenizer).expect("generates");
    assert_eq!(first, second, "same seed, same tasks");
    let other = generate(&synthetic_config(8, vec![300, 1200]), &tokenizer).expect("generates");
    assert_ne!(first[0].question, other[0].question, "another seed, other questions");
    assert_eq!(first.len(), 16);
    for record in &first {
        let budget = record.length_budget.expect("budget");
        check_layout(record, &tokenizer, (budget / 50).max(8));
        assert!(!record.answers[0].is_empty());
    }
    // The same question at both lengths: same question and answer, longer document.
    assert_eq!(first[0].question, first[1].question);
    assert_eq!(first[0].answers, first[1].answers);
    assert!(first[1].context.len() > 3 * first[0].context.len());
    // Every kind is present, with its answer kind.
    let sources: Vec<&str> = first.iter().map(|r| r.data_source.as_str()).collect();
    for kind in ["retrieval", "multihop", "arithmetic", "choice"] {
        assert!(sources.iter().any(|s| s.ends_with(kind)), "{kind} missing");
    }
    let arithmetic = first.iter().find(|r| r.data_source.ends_with("arithmetic")).expect("arithmetic");
    assert_eq!(arithmetic.kind, longrl_stdlib::AnswerKind::Number);
    let facts: Vec<&str> =
        arithmetic.metadata["supporting_sentences"].as_array().expect("facts").iter().filter_map(|f| f.as_str()).collect();
    let figures: Vec<i64> =
        facts.iter().map(|f| f.split_whitespace().find_map(|w| w.parse::<i64>().ok().filter(|n| *n < 1000)).expect("a figure")).collect();
    assert_eq!(arithmetic.answers[0], (figures[1] - figures[0]).to_string());
}

#[test]
fn hotpotqa_questions_are_padded_to_their_budgets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = format!(
        r#"hotpotqa("{}", #{{ lengths: [1024, 4096], tokenizer: "{}", count: 3, seed: 5 }}).write_jsonl("h.jsonl");"#,
        workspace().join("examples/data/hotpotqa/sample.json").display(),
        workspace().join("examples/tokenizers/qwen2.5").display()
    );
    let run = |name: &str| -> Vec<Record> {
        let out = dir.path().join(name);
        std::fs::create_dir_all(&out).expect("mkdir");
        let registry = Registry::standard();
        let plan = load_plan(&recipe, "hotpot.rhai", &registry, &Params::new()).expect("recipe");
        let plan = plan.validate(&registry, &StageContext::for_check(&out)).expect("valid");
        let mut options = RunOptions::in_dir(&out);
        options.run_dir = Some(out.clone());
        let report = execute(&plan, &registry, &options, &CancelToken::new()).expect("runs");
        assert!(report.succeeded(), "{report}");
        std::fs::read_to_string(out.join("h.jsonl")).expect("output").lines().map(|l| serde_json::from_str(l).expect("record")).collect()
    };
    let first = run("a");
    assert_eq!(first, run("b"), "deterministic for a seed");
    assert_eq!(first.len(), 6);
    let tokenizer = Tokenizer::load(&workspace().join("examples/tokenizers/qwen2.5")).expect("tokenizer");
    for record in &first {
        for sentence in record.metadata["supporting_sentences"].as_array().expect("facts") {
            assert!(record.context.contains(sentence.as_str().expect("sentence")), "{}: gold sentence missing", record.id);
        }
        // Padding ends at a whole sentence: within one sentence of the budget.
        check_layout(record, &tokenizer, 64);
    }
}

#[test]
fn the_sft_loss_is_the_response_token_mean_of_transformers_logits() {
    let dir = workspace().join("tests/fixtures/reference/tiny-qwen2");
    let (_, model) = load_model::<Cpu>(&dir, &Default::default()).expect("model");
    let bytes = std::fs::read(dir.join("reference.safetensors")).expect("reference");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid");
    let ids: Vec<u32> = tensors
        .tensor("input_ids")
        .expect("ids")
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8")) as u32)
        .collect();
    let logits: Vec<f32> =
        tensors.tensor("logits").expect("logits").data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect();
    let (seq, vocab, split) = (24, 512, 15);
    // Expected: -mean over response positions of log softmax(reference logits)[next token].
    let reference = burn::tensor::Tensor::<Cpu, 2>::from_data(
        burn::tensor::TensorData::new(logits[..seq * vocab].to_vec(), [seq, vocab]),
        &Default::default(),
    );
    let logp: Vec<f32> = log_softmax(reference, 1).into_data().convert::<f32>().into_vec().expect("f32");
    let expected: f64 =
        (split - 1..seq - 1).map(|pos| -f64::from(logp[pos * vocab + ids[pos + 1] as usize])).sum::<f64>() / (seq - split) as f64;
    let example = (ids[..split].to_vec(), ids[split..seq].to_vec());
    let loss = response_nll(&model, &[example.clone()], (seq - split) as f64).expect("loss").into_scalar().elem::<f64>();
    assert!((loss - expected).abs() < 1e-4, "loss {loss} vs transformers {expected}");
    // Prompt positions carry no loss: the same response after a different prompt prefix is
    // scored only on its own tokens, so its count sets the mean.
    let longer = (ids[..split].iter().chain(&ids[..split]).copied().collect::<Vec<_>>(), ids[split..seq].to_vec());
    let masked_count = longrl_stdlib::model::score::score_batch(&model, &[longer]).expect("scores").mask.sum().into_scalar().elem::<f64>();
    assert_eq!(masked_count, (seq - split) as f64);
}

#[test]
fn one_sft_step_lowers_the_loss() {
    let _autodiff = longrl_stdlib::train::autodiff_lock();
    let dir = workspace().join("tests/fixtures/reference/tiny-llama");
    let (_, model) = load_model::<CpuTrain>(&dir, &Default::default()).expect("model");
    let batch = vec![(vec![5u32, 9, 13, 21], vec![30u32, 31, 2]), (vec![7u32, 8], vec![40u32, 41, 42, 2])];
    let loss_of = |m: &CausalLm<CpuTrain>| response_nll(m, &batch, 7.0).expect("loss");
    let config = OptimConfig {
        lr: 1e-2,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        min_lr_ratio: 1.0,
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.0,
        grad_clip: 1.0,
    };
    let mut trainer = Trainer::<CpuTrain, CausalLm<CpuTrain>>::new(model, config);
    let before = loss_of(trainer.model());
    let before_value = before.clone().into_scalar().elem::<f64>();
    trainer.backward(before);
    let info = trainer.step(0, 1).expect("finite gradients");
    let after = loss_of(trainer.model()).into_scalar().elem::<f64>();
    assert!(after < before_value - 0.05, "loss {before_value} -> {after}");
    assert!(info.grad_norm > 0.0 && info.lr == 1e-2);

    // A diverged loss: NaN gradients are refused and leave the weights as they were.
    let weights_before = loss_of(trainer.model()).into_scalar().elem::<f64>();
    trainer.backward(loss_of(trainer.model()).mul_scalar(f32::NAN));
    let err = trainer.step(1, 2).expect_err("NaN gradients");
    assert!(err.contains("update 2 are not finite") && err.contains("the weights were not updated"), "{err}");
    assert_eq!(loss_of(trainer.model()).into_scalar().elem::<f64>(), weights_before);
}

#[test]
fn a_recipe_trains_and_evaluates_the_tiny_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = format!(
        r#"
        let tiny = "{tiny}";
        let policy = model(tiny, #{{ init: "random", seed: 3, rope_theta: 500000.0 }});
        let train = synthetic(#{{ count: 12, lengths: [128], tokenizer: tiny, kinds: ["retrieval"], seed: 1 }});
        let held = synthetic(#{{ count: 4, lengths: [128, 256], tokenizer: tiny, kinds: ["retrieval"], seed: 2 }});
        let warm = sft(policy, train, #{{ lr: 1e-3, epochs: 1, batch_tokens: 1024, log_every: 1 }});
        let judged = reward(#{{ rule: #{{ text: "exact" }} }});
        evaluate(warm, held, #{{ max_new_tokens: 8, name: "after", reward: judged }});
        "#,
        tiny = workspace().join("examples/models/tiny").display()
    );
    let registry = Registry::standard();
    let plan = load_plan(&recipe, "train.rhai", &registry, &Params::new()).expect("recipe");
    let plan = plan.validate(&registry, &StageContext::for_check(dir.path())).expect("valid");
    let mut options = RunOptions::in_dir(dir.path());
    options.run_dir = Some(dir.path().to_path_buf());
    options.metrics = longrl_stdlib::metrics::Metrics::open(&dir.path().join("metrics.jsonl")).expect("metrics");
    let report = execute(&plan, &registry, &options, &CancelToken::new()).expect("runs");
    assert!(report.succeeded(), "{report}");
    let checkpoint = dir.path().join("sft-3");
    for file in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(checkpoint.join(file).is_file(), "checkpoint lacks {file}");
    }
    load_model::<Cpu>(&checkpoint, &Default::default()).expect("the checkpoint loads");
    // The RoPE base asked of the random model is in its config and carried by the checkpoint.
    for dir in [dir.path().join("model-0"), checkpoint.clone()] {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config")).expect("json");
        assert_eq!(config["rope_theta"], 500000.0, "{}", dir.display());
    }
    let items = std::fs::read_to_string(dir.path().join("after/items.jsonl")).expect("items");
    assert_eq!(items.lines().count(), 8);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("after/summary.json")).expect("summary")).expect("json");
    assert!(summary["rows"].as_array().expect("rows").iter().any(|r| r["bucket"] == 256));
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("metrics");
    let sft_lines: Vec<serde_json::Value> =
        metrics.lines().map(|l| serde_json::from_str(l).expect("json")).filter(|v: &serde_json::Value| v["stage"] == "sft#3").collect();
    assert!(
        !sft_lines.is_empty() && sft_lines.iter().all(|l| l["loss"].is_number() && l["lr"].is_number() && l["tokens_per_s"].is_number())
    );
}

/// Two model stages on one device (an evaluation of the starting policy while SFT trains it,
/// both on the CPU) take turns step by step: their steps never overlap in time, and the
/// device's queue interleaves them rather than letting one run all its steps first.
#[test]
fn two_model_stages_on_one_device_never_step_at_the_same_time() {
    use longrl_backends::DeviceSpec;
    use longrl_stdlib::device_lock::{first_overlap, queue};
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = format!(
        r#"
        let tiny = "{tiny}";
        let policy = model(tiny, #{{ init: "random", seed: 3 }});
        let train = synthetic(#{{ count: 24, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], seed: 1 }});
        let held = synthetic(#{{ count: 12, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], seed: 2 }});
        sft(policy, train, #{{ lr: 1e-3, epochs: 1, batch_tokens: 160, log_every: 1, checkpoint_every: 0 }});
        evaluate(policy, held, #{{ max_new_tokens: 6, name: "during", batch: 1 }});
        "#,
        tiny = workspace().join("examples/models/tiny").display()
    );
    let registry = Registry::standard();
    let plan = load_plan(&recipe, "shared.rhai", &registry, &Params::new()).expect("recipe");
    let plan = plan.validate(&registry, &StageContext::for_check(dir.path())).expect("valid");
    let mut options = RunOptions::in_dir(dir.path());
    options.run_dir = Some(dir.path().to_path_buf());
    let started = std::time::Instant::now();
    let report = execute(&plan, &registry, &options, &CancelToken::new()).expect("runs");
    assert!(report.succeeded(), "{report}");
    let ended = std::time::Instant::now();

    // Every turn the CPU's queue gave (other tests of this binary included): none overlap.
    let history = queue(DeviceSpec::cpu()).history();
    if let Some((a, b)) = first_overlap(&history) {
        panic!("two steps ran at once on the CPU: {} {:?}..{:?} and {} {:?}..{:?}", a.holder, a.start, a.end, b.holder, b.start, b.end);
    }
    // This run's stages (labels are unique within the plan) each stepped several times.
    let mine: Vec<_> = history.iter().filter(|s| s.start >= started && s.end <= ended).collect();
    let labels: Vec<String> =
        report.stages.iter().map(|s| s.label.clone()).filter(|l| l.starts_with("sft") || l.starts_with("evaluate")).collect();
    assert_eq!(labels.len(), 2, "{labels:?}");
    for label in &labels {
        let steps = mine.iter().filter(|s| &s.holder == label).count();
        assert!(steps >= 3, "{label} took {steps} turns");
    }
    let order: Vec<&str> = mine.iter().filter(|s| labels.contains(&s.holder)).map(|s| s.holder.as_str()).collect();
    let switches = order.windows(2).filter(|w| w[0] != w[1]).count();
    println!("turns: {order:?}");
    assert!(switches >= 2, "the stages took turns rather than one running to the end first: {order:?}");
}
