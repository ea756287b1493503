//! Exact resume: a run of SFT, two RL phases and a hard buffer, killed with SIGKILL inside
//! SFT, between the phases and inside the second phase, and resumed each time, ends with
//! the same final weights, bit for bit, and the same metrics as the run left alone. A
//! damaged checkpoint and a changed recipe (an option or a closure's body) are refused with
//! messages that say why; a file the run wrote into its own directory is written again, not
//! refused as someone else's; a resume while the run still goes is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

const RECIPE: &str = r#"
let tiny = "{tiny}";
let policy = model(tiny, #{ init: "random", init_std: 0.08, seed: 3 });
let traces = synthetic(#{ count: 48, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 1 });
let warm = sft(policy, traces, #{ lr: param("lr", 2e-3), epochs: 1, batch_tokens: 600, log_every: 1, checkpoint_every: 2 });
let letters = reward(#{ script: |response, record| {
    let hits = 0;
    for c in response { if c == 'e' { hits += 1; } }
    if response.len() == 0 { 0.0 } else { hits.to_float() / response.len().to_float() }
} });
let short = synthetic(#{ count: 24, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 3 });
let long = synthetic(#{ count: 12, lengths: [160], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 4 });
// The letter-count reward says nothing about correctness: groups are filtered on its variance.
let phase = #{
    reward: letters, dynamic_sampling_metric: "reward", max_output: 8, group: 4, prompts_per_step: param("prompts", 2),
    mini_batch: param("mini_batch", 1), devices: param("devices", 1), lr: 3e-3,
    temperature: 1.0, top_p: 1.0, seed: 1, checkpoint_every: 1,
};
let first = rl_phase(warm, short, phase + #{ max_input: 100, max_steps: 5 });
let hard = hard_buffer(first.output("reports"), long, #{ policy: "hardest", count: 4, mix: 0.5 });
let second = rl_phase(first, hard, phase + #{ min_input: 100, max_input: 200, max_steps: 5 });
// A file the run writes into its own directory early on: each resume writes it again.
write_jsonl(long, "long_tasks.jsonl");
"#;

/// Fields that measure time, which no two runs share.
const TIMING: &[&str] = &["elapsed_s", "tokens_per_s", "rollout_tokens_per_s", "train_tokens_per_s"];

fn longrl(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_longrl"));
    cmd.args(args).current_dir(dir).env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().expect("waits");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Lines of metrics.jsonl per stage, without the timing fields.
fn metrics(run: &Path) -> BTreeMap<String, Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    let mut by_stage: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(mut value) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let object = value.as_object_mut().expect("object");
        for key in TIMING {
            object.remove(*key);
        }
        let stage = object["stage"].as_str().expect("stage").to_string();
        by_stage.entry(stage).or_default().push(value);
    }
    by_stage
}

fn lines_of(run: &Path, prefix: &str) -> usize {
    metrics(run).iter().filter(|(stage, _)| stage.starts_with(prefix)).map(|(_, lines)| lines.len()).sum()
}

/// Starts the run (or resumes it), waits until `ready` holds, and kills it with SIGKILL.
/// Returns what it logged (at info level).
fn kill_when(dir: &Path, args: &[&str], run: &Path, what: &str, ready: impl Fn(&Path) -> bool) -> String {
    let log = dir.join(format!("log-{}.txt", what.replace(' ', "-")));
    let mut cmd = longrl(dir, args);
    cmd.env("RUST_LOG", "info").stderr(std::fs::File::create(&log).expect("log file"));
    let mut child = cmd.spawn().expect("starts");
    let started = Instant::now();
    while !ready(run) {
        if let Some(status) = child.try_wait().expect("polls") {
            panic!("the run ended ({status}) before the kill point `{what}`: {}", finish(child).1);
        }
        assert!(started.elapsed() < Duration::from_secs(600), "kill point `{what}` never reached");
        std::thread::sleep(Duration::from_millis(5));
    }
    // While it runs, a second process on the same run directory is refused.
    let resume = run.strip_prefix(dir).expect("the run lies in dir").display().to_string();
    let (ok, stderr) = finish(longrl(dir, &["run", "--resume", &resume]).spawn().expect("starts"));
    assert!(!ok && stderr.contains("in use by another longrl process"), "a resume beside the live run: {stderr}");
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    std::fs::read_to_string(&log).expect("log")
}

/// Phase 2's entry in the run's report.json.
fn phase2_report(run: &Path) -> serde_json::Value {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).expect("report.json")).expect("json");
    report["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .rev()
        .find(|s| s["label"].as_str().is_some_and(|l| l.starts_with("rl_phase")))
        .expect("phase 2")
        .clone()
}

/// The final weights of phase 2 (paths in the report are relative to the working directory).
fn final_weights(base: &Path, run: &Path) -> Vec<u8> {
    let dir = base.join(phase2_report(run)["summary"]["checkpoint"].as_str().expect("checkpoint"));
    std::fs::read(dir.join("model.safetensors")).expect("weights")
}

#[test]
fn a_run_killed_three_times_and_resumed_ends_bitwise_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = dir.path().join("chain.rhai");
    std::fs::write(&recipe, RECIPE.replace("{tiny}", &workspace().join("examples/models/tiny").display().to_string())).expect("recipe");
    let runs = dir.path().join("runs");

    // The run left alone.
    let (ok, stderr) = finish(longrl(dir.path(), &["run", "chain.rhai", "--name", "whole"]).spawn().expect("starts"));
    assert!(ok, "{stderr}");
    let whole = runs.join("whole");

    // The same run, killed inside SFT, between the phases, and inside phase 2.
    let killed = runs.join("killed");
    let resume = ["run", "--resume", "runs/killed"];
    kill_when(dir.path(), &["run", "chain.rhai", "--name", "killed"], &killed, "inside sft", |run| lines_of(run, "sft") >= 3);
    let sft_dir = killed.join("checkpoints");
    assert!(std::fs::read_dir(&sft_dir).map(|d| d.count() > 0).unwrap_or(false), "a checkpoint was written before the kill");
    let log = kill_when(dir.path(), &resume, &killed, "between the phases", |run| {
        std::fs::read_dir(run.join("checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("rl_phase") && e.path().join("done.json").is_file())
    });
    assert!(log.contains("resuming from") && log.contains("checkpoints/sft-"), "SFT continued from its checkpoint:\n{log}");
    let phase2_label = {
        let plan: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(killed.join("plan.json")).expect("plan")).expect("json");
        let node = plan["nodes"].as_array().expect("nodes").iter().rev().find(|n| n["stage"] == "rl_phase").expect("phase 2").clone();
        format!("rl_phase#{}", node["id"])
    };
    let label = phase2_label.clone();
    let log = kill_when(dir.path(), &resume, &killed, "inside phase 2", move |run| metrics(run).get(&label).is_some_and(|l| l.len() >= 2));
    assert!(log.contains("finished in an earlier attempt"), "SFT and phase 1 were not redone:\n{log}");
    // The runs never ended, yet report.html exists: it is rebuilt after checkpoints.
    assert!(killed.join("report.html").is_file(), "report.html is refreshed during a run");

    // A damaged checkpoint is refused, naming the file (on a copy of the run).
    let damaged = runs.join("damaged");
    copy_dir(&killed, &damaged);
    let phase2_checkpoints = damaged.join("checkpoints").join(phase2_label.replace('#', "-"));
    let latest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(phase2_checkpoints.join("latest.json")).expect("phase 2 has a checkpoint"))
            .expect("json");
    let weights = phase2_checkpoints.join(latest["dir"].as_str().expect("dir")).join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("weights");
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("truncate");
    let (ok, stderr) = finish(longrl(dir.path(), &["run", "--resume", "runs/damaged"]).spawn().expect("starts"));
    assert!(!ok, "a truncated checkpoint must not load");
    assert!(
        stderr.contains("model.safetensors") && stderr.contains(&latest["dir"].as_str().expect("dir").to_string()),
        "the error names the file: {stderr}"
    );

    // A changed recipe is refused, saying what changed.
    let (ok, stderr) = finish(longrl(dir.path(), &["run", "--resume", "runs/killed", "--set", "lr=0.01"]).spawn().expect("starts"));
    assert!(!ok && stderr.contains("option `lr` changed from 0.002 to 0.01"), "{stderr}");
    // So is a recipe whose closure (the reward script) counts another letter.
    let edited = std::fs::read_to_string(&recipe).expect("recipe").replace("c == 'e'", "c == 'a'");
    std::fs::write(dir.path().join("edited.rhai"), edited).expect("edited recipe");
    let (ok, stderr) = finish(longrl(dir.path(), &["run", "edited.rhai", "--resume", "runs/killed"]).spawn().expect("starts"));
    assert!(!ok && stderr.contains("closure #0 (edited.rhai:"), "{stderr}");

    // The last resume runs to the end, phase 2 continuing from its checkpoint.
    let (ok, stderr) = finish(longrl(dir.path(), &resume).env("RUST_LOG", "info").spawn().expect("starts"));
    assert!(ok, "{stderr}");
    let phase2_dir = phase2_label.replace('#', "-");
    assert!(
        stderr.lines().any(|l| l.contains("resuming from") && l.contains(&phase2_dir)),
        "phase 2 continued from its checkpoint:\n{stderr}"
    );

    assert!(
        final_weights(dir.path(), &killed) == final_weights(dir.path(), &whole),
        "the resumed run's final weights differ from the uninterrupted run's"
    );
    // Phase 2's summary counts the attempt killed inside it: its time up to the checkpoint
    // the last attempt resumed from, added to the last attempt's own.
    let (whole2, killed2) = (phase2_report(&whole), phase2_report(&killed));
    assert_eq!((whole2["summary"]["attempts"].as_u64(), killed2["summary"]["attempts"].as_u64()), (Some(1), Some(2)));
    let all = |report: &serde_json::Value| report["summary"]["wall_s_all_attempts"].as_f64().expect("wall_s_all_attempts");
    assert!(all(&whole2) <= whole2["wall_s"].as_f64().expect("wall_s"), "one attempt: its own time");
    assert!(all(&killed2) > killed2["wall_s"].as_f64().expect("wall_s"), "the killed attempt's time is added");
    let (a, b) = (metrics(&whole), metrics(&killed));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (stage, lines) in &a {
        assert_eq!(lines, &b[stage], "metrics of {stage} differ");
    }
    assert!(a[&phase2_label].len() >= 3, "phase 2 logged its steps");
    let tasks = |run: &Path| std::fs::read(run.join("long_tasks.jsonl")).expect("long_tasks.jsonl");
    assert!(tasks(&killed) == tasks(&whole), "the resumed run rewrote its own long_tasks.jsonl with the same records");
}

/// A data-parallel run (three replicas on the CPU, each taking one of a mini-batch's three
/// groups) killed inside its second phase and resumed ends bit for bit as the run left
/// alone.
#[test]
fn a_data_parallel_run_killed_and_resumed_ends_bitwise_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = dir.path().join("chain.rhai");
    std::fs::write(&recipe, RECIPE.replace("{tiny}", &workspace().join("examples/models/tiny").display().to_string())).expect("recipe");
    let runs = dir.path().join("runs");
    let parallel = ["--set", "devices=3", "--set", "mini_batch=3", "--set", "prompts=3"];
    let args = |name: &'static str| [&["run", "chain.rhai", "--name", name][..], &parallel[..]].concat();

    let (ok, stderr) = finish(longrl(dir.path(), &args("whole")).spawn().expect("starts"));
    assert!(ok, "{stderr}");
    let whole = runs.join("whole");
    let killed = runs.join("killed");
    kill_when(dir.path(), &args("killed"), &killed, "inside phase 2", |run| {
        let done_first = std::fs::read_dir(run.join("checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("rl_phase") && e.path().join("done.json").is_file());
        done_first && lines_of(run, "rl_phase") >= 7
    });
    let (ok, stderr) = finish(longrl(dir.path(), &["run", "--resume", "runs/killed"]).spawn().expect("starts"));
    assert!(ok, "{stderr}");
    assert!(
        final_weights(dir.path(), &killed) == final_weights(dir.path(), &whole),
        "the resumed data-parallel run's final weights differ"
    );
    // Phase 2's summary counts the attempt killed inside it: its time up to the checkpoint
    // the last attempt resumed from, added to the last attempt's own.
    let (whole2, killed2) = (phase2_report(&whole), phase2_report(&killed));
    assert_eq!((whole2["summary"]["attempts"].as_u64(), killed2["summary"]["attempts"].as_u64()), (Some(1), Some(2)));
    let all = |report: &serde_json::Value| report["summary"]["wall_s_all_attempts"].as_f64().expect("wall_s_all_attempts");
    assert!(all(&whole2) <= whole2["wall_s"].as_f64().expect("wall_s"), "one attempt: its own time");
    assert!(all(&killed2) > killed2["wall_s"].as_f64().expect("wall_s"), "the killed attempt's time is added");
    let (a, b) = (metrics(&whole), metrics(&killed));
    for (stage, lines) in &a {
        assert_eq!(lines, &b[stage], "metrics of {stage} differ");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A finished run is not resumed. A run moved to another directory resumes there: a finished `score_difficulty`
/// republishes its scores from the run's new place (not the path it recorded), and what
/// flows on from it is the same.
#[test]
fn a_moved_run_republishes_its_scores_from_its_new_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = r#"
let tiny = "{tiny}";
let policy = model(tiny, #{ init: "random", init_std: 0.08, seed: 3 });
let tasks = synthetic(#{ count: 6, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 1 });
let parity = reward(#{ script: |response, record| if record.answers[0].len() % 2 == 0 { 1.0 } else { 0.0 } });
let scored = score_difficulty(policy, tasks, #{ reward: parity, group: 3, max_output: 4 });
scored.output("records").write_jsonl("scored.jsonl");
"#;
    std::fs::write(
        dir.path().join("score.rhai"),
        recipe.replace("{tiny}", &workspace().join("examples/models/tiny").display().to_string()),
    )
    .expect("recipe");
    let (ok, stderr) = finish(longrl(dir.path(), &["run", "score.rhai", "--name", "first"]).spawn().expect("starts"));
    assert!(ok, "{stderr}");
    let runs = dir.path().join("runs");
    let scored_before = std::fs::read(runs.join("first/scored.jsonl")).expect("scored");
    // A finished run is not resumed; without its report.json it reads as killed at the end.
    let (ok, stderr) = finish(longrl(dir.path(), &["run", "--resume", "runs/first"]).spawn().expect("starts"));
    assert!(!ok && stderr.contains("already finished"), "{stderr}");
    std::fs::remove_file(runs.join("first/report.json")).expect("remove report.json");
    std::fs::rename(runs.join("first"), runs.join("moved")).expect("move");
    let (ok, stderr) = finish(longrl(dir.path(), &["run", "--resume", "runs/moved"]).env("RUST_LOG", "info").spawn().expect("starts"));
    assert!(ok, "{stderr}");
    assert!(stderr.contains("finished in an earlier attempt"), "score_difficulty was republished, not redone:\n{stderr}");
    assert!(std::fs::read(runs.join("moved/scored.jsonl")).expect("scored") == scored_before);
}
