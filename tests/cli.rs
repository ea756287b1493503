//! The `longrl` binary end to end: check, run, graph, stages, exit codes and messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn longrl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_longrl")).args(args).current_dir(workspace()).env("RUST_LOG", "warn").output().expect("longrl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_prints_the_quickstart_plan() {
    let out = longrl(&["check", "scripts/quickstart.rhai"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for stage in [
        "model#0",
        "synthetic#1",
        "synthetic#2",
        "sft#3",
        "rl_phase#5",
        "hard_buffer#7",
        "rl_phase#8",
        "evaluate#9",
        "evaluate#10",
        "evaluate#11",
    ] {
        assert!(stdout.contains(stage), "{stage} missing from\n{stdout}");
    }
    for recipe in [
        "scripts/filter_hotpotqa.rhai",
        "scripts/rl_phase.rhai",
        "scripts/qwenlong_l1.rhai",
        "scripts/ablation_single_phase.rhai",
        "scripts/ablation_no_retrospective.rhai",
    ] {
        let out = longrl(&["check", recipe]);
        assert!(out.status.success(), "{recipe}: {}", text(&out.stderr));
    }
    // The ablation grid's settings (scripts/ablation_grid.sh): the harder task mix.
    for recipe in ["scripts/qwenlong_l1.rhai", "scripts/ablation_single_phase.rhai", "scripts/ablation_no_retrospective.rhai"] {
        let harder = r#"kinds=["chain","aggregate","docqa_choice"]"#;
        let grid =
            [harder, "distractors=6", "sft_length=192", "sft_count=14400", "max_output=128", "overlong_buffer=16", "eval_count=1100"];
        let mut args = vec!["check", recipe];
        args.extend(grid.iter().flat_map(|setting| ["--set", setting]));
        let out = longrl(&args);
        assert!(out.status.success(), "{recipe}: {}", text(&out.stderr));
    }
    // The buffer sweep's settings: pass rates of phase 1's final policy, importance sampling;
    // a misspelled source of pass rates is an error at its recipe line.
    let sweep = ["buffer_scores=final", "buffer_policy=importance", "buffer_fraction=0.5", "mix=0.5"];
    let out = longrl(&["check", "scripts/qwenlong_l1.rhai"].into_iter().chain(sweep.iter().flat_map(|s| ["--set", s])).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("score_difficulty"), "phase 1's policy is scored again: {}", text(&out.stdout));
    let out = longrl(&["check", "scripts/qwenlong_l1.rhai", "--set", "buffer_scores=last"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(r#"qwenlong_l1.rhai:87:5: recipe error: buffer_scores must be "phase" or "final", not "last""#),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_lists_every_problem_of_a_broken_recipe_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = dir.path().join("broken.rhai");
    std::fs::write(&recipe, "let t = jsonl(\"nope.jsonl\");\nt.filtre(#{});\nt.filter(#{ dedupe: true });\n").expect("write");
    let out = longrl(&["check", recipe.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("has 3 problems"), "{stderr}");
    assert!(stderr.contains("broken.rhai:1:9: jsonl: option `path`"), "{stderr}");
    assert!(stderr.contains("broken.rhai:2:3: unknown stage `filtre`"), "{stderr}");
    assert!(stderr.contains("broken.rhai:3:3: filter: unknown option `dedupe` (did you mean `dedup`?)"), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
}

#[test]
fn run_writes_a_run_directory_and_never_reuses_one() {
    let runs = tempfile::tempdir().expect("tempdir");
    let runs_dir = runs.path().to_str().expect("utf-8 path");
    let out = longrl(&["run", "scripts/filter_hotpotqa.rhai", "--runs-dir", runs_dir, "--name", "qs", "--set", "budget=1500"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = runs.path().join("qs");
    for file in ["recipe.rhai", "plan.json", "run.json", "report.json", "tasks.jsonl", "stages/filter-1.json"] {
        assert!(run.join(file).is_file(), "missing {file}");
    }
    let kept = std::fs::read_to_string(run.join("tasks.jsonl")).expect("output").lines().count();
    assert!(kept > 100 && kept < 300, "kept {kept}");
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).expect("run.json")).expect("json");
    assert_eq!(info["params"]["budget"], 1500);

    let again = longrl(&["run", "scripts/filter_hotpotqa.rhai", "--runs-dir", runs_dir, "--name", "qs"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains("already exists"), "{}", text(&again.stderr));
}

#[test]
fn a_backend_that_was_not_compiled_in_is_a_clear_error() {
    let runs = tempfile::tempdir().expect("tempdir");
    let out = longrl(&["run", "scripts/filter_hotpotqa.rhai", "--runs-dir", runs.path().to_str().expect("path"), "--backend", "cuda"]);
    if cfg!(feature = "cuda") {
        return;
    }
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("backend `cuda` was not compiled into this binary") && stderr.contains("--features cuda"), "{stderr}");
}

#[test]
fn stages_lists_options_with_their_docs() {
    let out = longrl(&["stages", "filter"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout.contains("option max_input_tokens"), "{stdout}");
    assert!(stdout.contains("Drop records whose input (document + question) has more tokens than this."), "{stdout}");
    assert!(stdout.contains("input input        records"), "{stdout}");
    let out = longrl(&["stages", "nope"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn graph_prints_dot() {
    let out = longrl(&["graph", "scripts/filter_hotpotqa.rhai", "--dot"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("digraph plan {") && stdout.contains("n1 -> n2"), "{stdout}");
}

#[test]
fn generate_continues_token_ids_as_transformers_does() {
    // Row 0 of the tiny-qwen2 reference: its greedy continuation was computed by transformers.
    let bytes = std::fs::read(workspace().join("tests/fixtures/reference/tiny-qwen2/reference.safetensors")).expect("read");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid");
    let ints = |name: &str| -> Vec<i64> {
        tensors.tensor(name).expect("tensor").data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
    };
    let input = ints("input_ids");
    let greedy = ints("greedy");
    let prompt: Vec<String> = input[..24].iter().map(i64::to_string).collect();
    let out = longrl(&["generate", "--model", "tests/fixtures/reference/tiny-qwen2", "--ids", &prompt.join(","), "--max-new-tokens", "8"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let produced: Vec<i64> = text(&out.stdout).split_whitespace().map(|t| t.parse().expect("id")).collect();
    // Generation stops early only at eos (id 2); compare what was produced.
    assert!(!produced.is_empty());
    assert_eq!(produced[..], greedy[..produced.len()]);

    let out = longrl(&["generate", "--model", "tests/fixtures/reference/tiny-qwen2", "--ids", "1,2,9999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("token id 9999 is outside the model's vocabulary of 512"), "{}", text(&out.stderr));
}

#[test]
fn bench_rollout_prints_batched_and_one_group_figures_as_json() {
    let args = ["bench", "rollout", "--vocab", "512", "--prompts", "3", "--group", "2", "--prompt-len", "12", "--new-tokens", "6"];
    let out = longrl(&[&args[..], &["--max-rows", "4", "--stop-share", "0.1", "--json"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let figures: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).expect("one JSON object");
    for key in ["one_group_at_a_time", "batched", "speedup", "tokens"] {
        assert!(figures[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {figures}");
    }
    assert_eq!(figures["identical_groups"], 3, "the batched groups have the tokens of the groups alone: {figures}");
    assert_eq!(figures["sampled_on"], "host", "auto draws on the host on the CPU backend: {figures}");
    let out = longrl(&[&args[..], &["--sample-on", "device", "--top-p", "0.9", "--json"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let figures: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).expect("one JSON object");
    assert_eq!(figures["sampled_on"], "device", "{figures}");
    assert!(figures["top_p"].as_f64().is_some_and(|p| (p - 0.9).abs() < 1e-6), "{figures}");
    assert!(figures["batched"].as_f64().is_some_and(|v| v > 0.0), "{figures}");
    let out = longrl(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("groups decoded together (<= 64 rows, host)"), "{}", text(&out.stdout));
}

#[test]
fn bench_pipeline_json_has_one_line_per_variant_with_every_record() {
    let out = longrl(&["bench", "pipeline", "--records", "300", "--words", "20", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(|line| serde_json::from_str(line).expect("a JSON object per line")).collect();
    let variants: Vec<&str> = lines.iter().filter_map(|f| f["variant"].as_str()).collect();
    assert_eq!(
        variants,
        ["copy, one source", "copy, two sources merged (fan-in)", "no tokenization (dedup only)", "tokenize + length filter"]
    );
    for figures in &lines {
        assert_eq!(figures["records"], 300, "{figures}");
        assert!(figures["records_per_s"].as_f64().is_some_and(|v| v > 0.0), "{figures}");
    }
}

#[test]
fn bench_model_json_has_the_keys_of_the_transformers_script() {
    let sizes = ["--vocab", "512", "--prompt-len", "16", "--new-tokens", "4", "--group", "2", "--train-batch", "1", "--train-seq", "16"];
    let out = longrl(&[&["bench", "model"][..], &sizes, &["--json"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let figures: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).expect("one JSON object");
    for key in ["prefill", "decode_batch1", "decode_group", "train"] {
        assert!(figures[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {figures}");
    }
}

#[test]
fn params_files_set_recipe_parameters_and_runs_record_them() {
    let runs = tempfile::tempdir().expect("tempdir");
    let runs_dir = runs.path().to_str().expect("utf-8 path");
    let params = runs.path().join("filter.yaml");
    std::fs::write(&params, "# a budget\nbudget: 1200\n").expect("write");
    let params = params.to_str().expect("utf-8 path");

    // --set overrides the file; the run records the merged values, and a params.yaml
    // that runs the same again.
    let out =
        longrl(&["run", "scripts/filter_hotpotqa.rhai", "--runs-dir", runs_dir, "--name", "p", "--params", params, "--set", "budget=1500"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = runs.path().join("p");
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).expect("run.json")).expect("json");
    assert_eq!(info["params"]["budget"], 1500);
    assert_eq!(info["params_file"], params);
    let recorded = std::fs::read_to_string(run.join("params.yaml")).expect("params.yaml");
    assert!(recorded.lines().any(|l| l == "budget: 1500"), "{recorded}");
    let plan = |extra: &[&str]| {
        let mut args = vec!["check", "scripts/filter_hotpotqa.rhai"];
        args.extend_from_slice(extra);
        let out = longrl(&args);
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let run_params = run.join("params.yaml");
    let (ok, again, stderr) = plan(&["--params", run_params.to_str().expect("utf-8")]);
    assert!(ok && again.contains("1500"), "{again}{stderr}");

    // Resuming with a different value is refused, naming the parameter and where it came from.
    let out = longrl(&["run", "--resume", run.to_str().expect("utf-8"), "--params", params]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("parameter `budget` changed from 1500 to 1200 (") && stderr.contains("filter.yaml:2: budget: 1200"),
        "{stderr}"
    );

    // A key the recipe never reads, or of the wrong type, names the file and line.
    let bad = runs.path().join("bad.yaml");
    std::fs::write(&bad, "budget: 1200\nbugdet: 5\n").expect("write");
    let (ok, _, stderr) = plan(&["--params", bad.to_str().expect("utf-8")]);
    assert!(!ok && stderr.contains("bad.yaml:2: bugdet: 5: the recipe never reads parameter `bugdet`"), "{stderr}");
    std::fs::write(&bad, "budget: large\n").expect("write");
    let (ok, _, stderr) = plan(&["--params", bad.to_str().expect("utf-8")]);
    assert!(!ok && stderr.contains("bad.yaml:1: budget: \"large\": expected i64 like the default"), "{stderr}");
    std::fs::write(&bad, "budget: [1200\n").expect("write");
    let (ok, _, stderr) = plan(&["--params", bad.to_str().expect("utf-8")]);
    assert!(!ok && stderr.contains("bad.yaml:2:1: not valid YAML"), "{stderr}");
    let (ok, _, stderr) = plan(&["--params", "no/such/params.yaml"]);
    assert!(!ok && stderr.contains("cannot read parameter file no/such/params.yaml"), "{stderr}");
}

#[test]
fn the_paper_parameter_files_fit_the_qwenlong_recipe() {
    // Every key of examples/params is read by scripts/qwenlong_l1.rhai with the type of its
    // default, and reaches the stages (the paths in them are placeholders, so the plan is
    // evaluated, not validated against files).
    let registry = longrl_stdlib::Registry::standard();
    let source = std::fs::read_to_string(workspace().join("scripts/qwenlong_l1.rhai")).expect("recipe");
    let mut files: Vec<PathBuf> = std::fs::read_dir(workspace().join("examples/params"))
        .expect("examples/params")
        .map(|entry| entry.expect("entry").path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    for file in files {
        let params = longrl_engine::dataflow::params::read_params_file(&file).expect("a valid parameter file");
        let plan = longrl_engine::load_plan(&source, "qwenlong_l1.rhai", &registry, &params)
            .unwrap_or_else(|problems| panic!("{}: {problems}", file.display()));
        let phases: Vec<_> = plan.nodes.iter().filter(|n| n.stage == "rl_phase").collect();
        assert_eq!(phases.len(), 2);
        assert_eq!(phases[0].options["max_input"], 20000, "{}", file.display());
        assert_eq!(phases[1].options["max_input"], 60000);
        assert_eq!(phases[0].options["lr"], 2e-6);
        assert_eq!(phases[0].options["top_p"], 0.95);
        assert_eq!(phases[0].options["precision"], "bf16-mixed");
    }
}

/// `scripts/paired_gain.py` on a hand-computed case: four questions answered by both
/// evaluations (one only by the second), per-question pass@1 before 0, 0.5, 1, 0 and after
/// 1, 0.5, 0.5, 1: differences 1, 0, -0.5, 1, mean 0.375, sample variance 0.5625, so the 95%
/// half-width is 1.96 x sqrt(0.5625 / 4) = 0.735.
#[test]
fn paired_gain_reports_the_mean_difference_and_its_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, values: &[(&str, f64)]| {
        let lines: Vec<String> =
            values.iter().map(|(id, pass)| serde_json::json!({ "id": id, "bucket": 64, "pass_at_1": pass }).to_string()).collect();
        let path = dir.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").expect("write");
        path
    };
    let before = write("before.jsonl", &[("a", 0.0), ("b", 0.5), ("c", 1.0), ("d", 0.0)]);
    let after = write("after.jsonl", &[("a", 1.0), ("b", 0.5), ("c", 0.5), ("d", 1.0), ("e", 1.0)]);
    let out = Command::new("python3")
        .arg(workspace().join("scripts/paired_gain.py"))
        .args([&before, &after])
        .arg("--json")
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let row: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).expect("one JSON line");
    let close = |key: &str, expected: f64| {
        let got = row[key].as_f64().expect(key);
        assert!((got - expected).abs() < 1e-9, "{key}: {got} != {expected}");
    };
    close("before", 37.5);
    close("after", 75.0);
    close("gain", 37.5);
    close("gain_95", 73.5);
    assert_eq!((row["questions"].as_u64(), row["rose"].as_u64(), row["fell"].as_u64()), (Some(4), Some(2), Some(1)));
    assert_eq!(row["unmatched"], 1);
}

/// `scripts/grid_table.py` pairs a grid's runs by the seed in their names, whatever their
/// order: seed 1's SFT scores 0.5 and its single phase 1.0, seed 2's 0.25 and 0.75, so the
/// phase gains +50 points in both seeds (an interval of zero); pairing by position would
/// match seed 2's SFT with seed 1's phase and give +75 and +25.
#[test]
fn grid_table_pairs_each_ideas_gain_by_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |run: &str, eval: &str, scores: &[f64]| {
        let folder = dir.path().join(run).join(eval);
        std::fs::create_dir_all(&folder).expect("mkdir");
        let lines: Vec<String> = scores.iter().map(|pass| serde_json::json!({ "bucket": 256, "pass_at_1": pass }).to_string()).collect();
        std::fs::write(folder.join("items.jsonl"), lines.join("\n") + "\n").expect("write");
        dir.path().join(run)
    };
    let runs = [
        write("grid-t-s2-qwenlong_l1", "sft", &[0.5, 0.0]),
        write("grid-t-s1-ablation_single_phase", "single_phase", &[1.0, 1.0]),
        write("grid-t-s1-qwenlong_l1", "sft", &[0.5, 0.5]),
        write("grid-t-s2-ablation_single_phase", "single_phase", &[1.0, 0.5]),
    ];
    let out = Command::new("python3").arg(workspace().join("scripts/grid_table.py")).args(&runs).output().expect("python3 runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let row = table.lines().find(|l| l.starts_with("| one RL phase over SFT only")).unwrap_or_else(|| panic!("no gain row in\n{table}"));
    assert_eq!(row, "| one RL phase over SFT only | +50.0 ± 0.0 [2/2] | +50.0 ± 0.0 [2/2] |", "{table}");
    assert!(table.contains("| SFT only | 37.5 ± 158.8 [± "), "the unpaired means: {table}");
}
