//! The executor and the data stages: backpressure, cancellation, bad input named by file
//! and line, the length filter with a real tokenizer, atomic outputs.

use std::path::{Path, PathBuf};

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use longrl_engine::dataflow::executor::{RunOptions, RunReport, StageStatus};
use longrl_engine::dataflow::recipe::Params;
use longrl_engine::{execute, load_plan};
use longrl_stdlib::tokenizer::Tokenizer;
use longrl_stdlib::{CancelToken, PortKind, PortSpec, Record, Registry, Stage, StageConfig, StageContext, StageError, StageIo};
use serde::Deserialize;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Runs `recipe` with `dir` as working and run directory.
fn run(recipe: &str, dir: &Path, registry: &Registry, capacity: usize) -> RunReport {
    let plan = load_plan(recipe, "test.rhai", registry, &Params::new()).expect("recipe evaluates");
    let plan = plan.validate(registry, &StageContext::for_check(dir)).expect("plan is valid");
    let mut options = RunOptions::in_dir(dir);
    options.run_dir = Some(dir.to_path_buf());
    options.channel_capacity = capacity;
    execute(&plan, registry, &options, &CancelToken::new()).expect("run starts")
}

// --- test stages -----------------------------------------------------------------------

/// Records produced minus records consumed, and its maximum: how many are in flight.
static IN_FLIGHT: AtomicI64 = AtomicI64::new(0);
static MAX_IN_FLIGHT: AtomicI64 = AtomicI64::new(0);
static PRODUCED: AtomicU64 = AtomicU64::new(0);

/// Emits `count` records as fast as it can (forever when count is 0).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CountSource {
    count: u64,
}

impl StageConfig for CountSource {
    const NAME: &'static str = "count_source";
    const SUMMARY: &'static str = "test source";
    const OUTPUTS: &'static [PortSpec] = &[PortSpec::optional("records", PortKind::Records, "")];
    fn build(self, _: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(self))
    }
}

impl Stage for CountSource {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let mut i = 0;
        while self.count == 0 || i < self.count {
            let now = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
            MAX_IN_FLIGHT.fetch_max(now, Ordering::SeqCst);
            PRODUCED.fetch_add(1, Ordering::SeqCst);
            io.send_record("records", Record::new(format!("r{i}"), "q"))?;
            i += 1;
        }
        Ok(())
    }
}

/// Consumes slowly; fails after `fail_after` records when set.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SlowSink {
    delay_ms: u64,
    #[serde(default)]
    fail_after: Option<u64>,
}

impl StageConfig for SlowSink {
    const NAME: &'static str = "slow_sink";
    const SUMMARY: &'static str = "test sink";
    const INPUTS: &'static [PortSpec] = &[PortSpec::required("input", PortKind::Records, "")];
    fn build(self, _: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(self))
    }
}

impl Stage for SlowSink {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let mut seen = 0;
        while let Some(_record) = io.recv_record("input")? {
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            seen += 1;
            if self.fail_after.is_some_and(|n| seen >= n) {
                return Err(StageError::Failed(format!("sink gave up after {seen} records")));
            }
            std::thread::sleep(Duration::from_millis(self.delay_ms));
        }
        Ok(())
    }
}

/// Fails at once.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Broken {
    message: String,
}

impl StageConfig for Broken {
    const NAME: &'static str = "broken";
    const SUMMARY: &'static str = "test stage that fails";
    const INPUTS: &'static [PortSpec] = &[PortSpec::optional("input", PortKind::Records, "")];
    fn build(self, _: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(self))
    }
}

impl Stage for Broken {
    fn run(self: Box<Self>, _io: &mut StageIo) -> Result<(), StageError> {
        std::thread::sleep(Duration::from_millis(100));
        Err(StageError::Failed(self.message))
    }
}

/// Busy for `seconds` without looking at the stop flag (a long computation, a request).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Stubborn {
    seconds: u64,
}

impl StageConfig for Stubborn {
    const NAME: &'static str = "stubborn";
    const SUMMARY: &'static str = "test stage that ignores a stop";
    fn build(self, _: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(self))
    }
}

impl Stage for Stubborn {
    fn run(self: Box<Self>, _io: &mut StageIo) -> Result<(), StageError> {
        std::thread::sleep(Duration::from_secs(self.seconds));
        Ok(())
    }
}

fn test_registry() -> Registry {
    let mut registry = Registry::standard();
    registry.add::<CountSource>().add::<SlowSink>().add::<Broken>().add::<Stubborn>();
    registry
}

/// The in-flight counters are global: run the tests that use them one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: OnceLock<std::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

// --- tests -----------------------------------------------------------------------------

#[test]
fn a_slow_consumer_bounds_the_records_in_flight() {
    let _guard = serial();
    IN_FLIGHT.store(0, Ordering::SeqCst);
    MAX_IN_FLIGHT.store(0, Ordering::SeqCst);
    let dir = tempfile::tempdir().expect("tempdir");
    let capacity = 8;
    let report = run("count_source(#{ count: 300 }).slow_sink(#{ delay_ms: 1 });", dir.path(), &test_registry(), capacity);
    assert!(report.succeeded(), "{report}");
    let max = MAX_IN_FLIGHT.load(Ordering::SeqCst);
    // The queue holds `capacity`; one more is being handed over and one is counted before
    // its send blocks. Without backpressure all 300 would be in flight.
    assert!(max <= capacity as i64 + 2, "max in flight {max} with capacity {capacity}");
    assert!(max >= capacity as i64, "the queue should have filled: max {max}");
    assert_eq!(report.stages[1].items_in, 300);
}

#[test]
fn a_failing_stage_stops_an_endless_source() {
    let _guard = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let report = run("count_source(#{ count: 0 }).slow_sink(#{ delay_ms: 0, fail_after: 50 });", dir.path(), &test_registry(), 4);
    assert!(!report.succeeded());
    assert_eq!(report.stages[0].status, StageStatus::Cancelled, "{report}");
    assert_eq!(report.stages[1].status, StageStatus::Failed, "{report}");
    let message = report.failure_message().expect("a failure");
    assert!(message.contains("sink gave up after 50 records"), "{message}");
    assert!(message.contains("1 other stage stopped"), "{message}");
}

#[test]
fn every_failing_stage_is_reported() {
    let _guard = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = r#"
        broken(#{ message: "first failure" });
        broken(#{ message: "second failure" });
        count_source(#{ count: 0 }).slow_sink(#{ delay_ms: 0 });
    "#;
    let report = run(recipe, dir.path(), &test_registry(), 4);
    let message = report.failure_message().expect("failures");
    assert!(message.contains("first failure") && message.contains("second failure"), "{message}");
    assert_eq!(report.stages.iter().filter(|s| s.status == StageStatus::Failed).count(), 2, "{report}");
    assert_eq!(report.stages.iter().filter(|s| s.status == StageStatus::Cancelled).count(), 2, "{report}");
}

#[test]
fn a_stage_that_ignores_the_stop_does_not_hold_the_run_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = std::time::Instant::now();
    let report = run("stubborn(#{ seconds: 60 });\nbroken(#{ message: \"out of disk\" });", dir.path(), &test_registry(), 4);
    let elapsed = started.elapsed();
    let grace = longrl_engine::dataflow::executor::STOP_GRACE;
    assert!(elapsed < grace + Duration::from_secs(3), "the run took {elapsed:?}, waiting for a stage that ignored the stop");
    let stubborn = report.stages.iter().find(|s| s.stage == "stubborn").expect("reported");
    assert_eq!(stubborn.status, StageStatus::Cancelled, "{report}");
    assert!(stubborn.error.as_deref().is_some_and(|e| e.contains("did not stop")), "{report}");
    assert!(report.failure_message().expect("a failure").contains("out of disk"));
}

#[test]
fn a_malformed_line_names_the_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("tasks.jsonl");
    std::fs::write(&data, "{\"question\": \"a\"}\n\n{\"question\": \"b\"}\n{\"question\": \"c\"\n{\"question\": \"d\"}\n").expect("write");
    let report = run(r#"jsonl("tasks.jsonl").write_jsonl("out.jsonl");"#, dir.path(), &Registry::standard(), 4);
    let message = report.failure_message().expect("bad line");
    assert!(message.contains(&format!("{}:4: malformed JSON", data.display())), "{message}");
    assert!(!dir.path().join("out.jsonl").exists(), "a failed sink must not leave a partial file");

    let report = run(r#"jsonl("tasks.jsonl", #{ on_error: "skip" }).write_jsonl("out.jsonl");"#, dir.path(), &Registry::standard(), 4);
    assert!(report.succeeded(), "{report}");
    assert_eq!(report.stages[0].summary["skipped_lines"], 1);
    assert_eq!(report.stages[0].summary["skipped"][0]["line"], 4);
    let written = std::fs::read_to_string(dir.path().join("out.jsonl")).expect("output");
    assert_eq!(written.lines().count(), 3);
}

#[test]
fn the_length_filter_counts_real_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokenizer_path = workspace().join("examples/tokenizers/qwen2.5/tokenizer.json");
    let tokenizer = Tokenizer::load(&tokenizer_path).expect("tokenizer");
    let mut lines = String::new();
    let mut expected_kept = Vec::new();
    let (mut too_short, mut too_long) = (0, 0);
    for (i, words) in [5usize, 40, 80, 200, 400].into_iter().enumerate() {
        let context = (0..words).map(|w| format!("word{w}")).collect::<Vec<_>>().join(" ");
        let record = serde_json::json!({"id": format!("t{i}"), "context": context, "question": "Which word?", "answers": ["word1"]});
        let tokens = tokenizer.encode(&format!("{context}\n\nWhich word?")).expect("encode").len();
        match tokens {
            0..50 => too_short += 1,
            50..=600 => expected_kept.push((format!("t{i}"), tokens)),
            _ => too_long += 1,
        }
        lines.push_str(&format!("{record}\n"));
    }
    // A duplicate of t1 (spacing and case differ) and a record without an answer.
    let first = serde_json::from_str::<serde_json::Value>(lines.lines().nth(1).expect("line")).expect("json");
    let mut dup = first.clone();
    dup["id"] = "dup".into();
    dup["question"] = "which   WORD?".into();
    lines.push_str(&format!("{dup}\n"));
    lines.push_str("{\"id\": \"noanswer\", \"question\": \"q\", \"context\": \"x\"}\n");
    std::fs::write(dir.path().join("tasks.jsonl"), lines).expect("write");

    let recipe = format!(
        r#"jsonl("tasks.jsonl").filter(#{{ tokenizer: "{}", min_input_tokens: 50, max_input_tokens: 600, dedup: true, require_answer: true, batch: 2 }}).write_jsonl("kept.jsonl");"#,
        tokenizer_path.display()
    );
    let report = run(&recipe, dir.path(), &Registry::standard(), 4);
    assert!(report.succeeded(), "{report}");
    let kept: Vec<(String, usize)> = std::fs::read_to_string(dir.path().join("kept.jsonl"))
        .expect("output")
        .lines()
        .map(|l| {
            let r: Record = serde_json::from_str(l).expect("record");
            (r.id, r.input_tokens.expect("token count"))
        })
        .collect();
    assert_eq!(kept, expected_kept);
    let summary = &report.stages[1].summary;
    assert!(too_short > 0 && too_long > 0 && !expected_kept.is_empty(), "the cases should cover every band");
    assert_eq!(summary["dropped_too_short"], too_short, "{summary:?}");
    assert_eq!(summary["dropped_too_long"], too_long, "{summary:?}");
    assert_eq!(summary["dropped_duplicate"], 1, "{summary:?}");
    assert_eq!(summary["dropped_no_answer"], 1, "{summary:?}");
}

#[test]
fn a_recipe_predicate_runs_in_the_filter_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lines: String = (0..10)
        .map(|i| {
            format!(
                "{{\"id\": \"{i}\", \"question\": \"{}\", \"data_source\": \"{}\"}}\n",
                "q".repeat(i + 1),
                if i % 2 == 0 { "even" } else { "odd" }
            )
        })
        .collect();
    std::fs::write(dir.path().join("tasks.jsonl"), lines).expect("write");
    let recipe = r#"
        let limit = 6;
        jsonl("tasks.jsonl")
            .filter(#{ predicate: |r| r.data_source == "even" && r.question.len() < limit })
            .write_jsonl("kept.jsonl");
    "#;
    let report = run(recipe, dir.path(), &Registry::standard(), 4);
    assert!(report.succeeded(), "{report}");
    let ids: Vec<String> = std::fs::read_to_string(dir.path().join("kept.jsonl"))
        .expect("output")
        .lines()
        .map(|l| serde_json::from_str::<Record>(l).expect("record").id)
        .collect();
    assert_eq!(ids, ["0", "2", "4"]);
    assert_eq!(report.stages[1].summary["dropped_predicate"], 7);
}

#[test]
fn a_predicate_that_errors_fails_its_stage_with_the_recipe_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tasks.jsonl"), "{\"question\": \"q\"}\n").expect("write");
    let report = run(
        "jsonl(\"tasks.jsonl\").filter(#{ predicate: |r| r.no_such_field > 1 }).write_jsonl(\"o.jsonl\");",
        dir.path(),
        &Registry::standard(),
        4,
    );
    let message = report.failure_message().expect("fails");
    assert!(message.contains("closure at test.rhai:1:"), "{message}");
}

/// Runs `recipe` from `base` into the run directory `run_dir`, as a fresh run or a resumed one.
fn run_into(recipe: &str, base: &Path, run_dir: &Path, resuming: bool) -> RunReport {
    let registry = Registry::standard();
    let plan = load_plan(recipe, "test.rhai", &registry, &Params::new()).expect("recipe evaluates");
    let plan = plan.validate(&registry, &StageContext::for_check(base)).expect("plan is valid");
    let mut options = RunOptions::in_dir(base);
    options.run_dir = Some(run_dir.to_path_buf());
    options.resuming = resuming;
    execute(&plan, &registry, &options, &CancelToken::new()).expect("run starts")
}

#[test]
fn a_resumed_run_rewrites_its_own_outputs_and_no_one_elses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    std::fs::write(base.join("tasks.jsonl"), "{\"question\": \"q\"}\n").expect("write");
    let run_dir = base.join("runs/a");
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let exported = base.join("exported.jsonl");
    let recipe = format!(r#"let t = jsonl("tasks.jsonl"); write_jsonl(t, "inside.jsonl"); write_jsonl(t, "{}");"#, exported.display());
    assert!(run_into(&recipe, base, &run_dir, false).succeeded());
    // The same plan again as a fresh run finds both files there and refuses them ...
    let again = run_into(&recipe, base, &run_dir, false);
    assert!(again.failure_message().expect("refused").contains("refusing to overwrite"));
    // ... and as a resume writes both again: inside the run directory and the one outside,
    // which the earlier attempt recorded writing.
    let resumed = run_into(&recipe, base, &run_dir, true);
    assert!(resumed.succeeded(), "{resumed}");
    let inside = std::fs::read_to_string(run_dir.join("inside.jsonl")).expect("inside");
    assert!(inside.lines().count() == 1 && std::fs::read_to_string(&exported).expect("exported") == inside);

    // A file this run never wrote stays refused when resuming, `..` out of the run too.
    std::fs::write(base.join("runs/precious.jsonl"), "precious\n").expect("write");
    std::fs::write(base.join("other.jsonl"), "other\n").expect("write");
    for path in ["../precious.jsonl".to_string(), base.join("other.jsonl").display().to_string()] {
        let report = run_into(&format!(r#"write_jsonl(jsonl("tasks.jsonl"), "{path}");"#), base, &run_dir, true);
        assert!(report.failure_message().expect("refused").contains("refusing to overwrite"), "{path}");
    }
    assert_eq!(std::fs::read_to_string(base.join("runs/precious.jsonl")).expect("read"), "precious\n");
    assert_eq!(std::fs::read_to_string(base.join("other.jsonl")).expect("read"), "other\n");
}

#[test]
fn outputs_never_overwrite_existing_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tasks.jsonl"), "{\"question\": \"q\"}\n").expect("write");
    std::fs::write(dir.path().join("out.jsonl"), "precious\n").expect("write");
    let report = run(r#"jsonl("tasks.jsonl").write_jsonl("out.jsonl");"#, dir.path(), &Registry::standard(), 4);
    assert!(report.failure_message().expect("refused").contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(dir.path().join("out.jsonl")).expect("read"), "precious\n");
}

#[test]
fn several_edges_into_one_input_take_turns_in_recipe_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    let lines = |tag: &str, n: usize| (0..n).map(|i| format!("{{\"question\": \"{tag}{i}\"}}\n")).collect::<String>();
    std::fs::write(base.join("a.jsonl"), lines("a", 40)).expect("write");
    std::fs::write(base.join("b.jsonl"), lines("b", 25)).expect("write");
    // Edge b goes through a filter (one more thread, so other timing); queues hold one item.
    let recipe = r#"let a = jsonl("a.jsonl"); let b = jsonl("b.jsonl").filter(#{ predicate: |r| true });
                    write_jsonl(#{ input: [a, b], path: "merged.jsonl" });"#;
    let mut expected = Vec::new();
    for i in 0..40 {
        expected.push(format!("a{i}"));
        if i < 25 {
            expected.push(format!("b{i}"));
        }
    }
    for attempt in 0..3 {
        let run_dir = base.join(format!("runs/{attempt}"));
        std::fs::create_dir_all(&run_dir).expect("run dir");
        let plan = load_plan(recipe, "test.rhai", &Registry::standard(), &Params::new()).expect("recipe evaluates");
        let plan = plan.validate(&Registry::standard(), &StageContext::for_check(base)).expect("plan is valid");
        let mut options = RunOptions::in_dir(base);
        options.run_dir = Some(run_dir.clone());
        options.channel_capacity = 1;
        let report = execute(&plan, &Registry::standard(), &options, &CancelToken::new()).expect("run starts");
        assert!(report.succeeded(), "{report}");
        let merged = std::fs::read_to_string(run_dir.join("merged.jsonl")).expect("merged");
        let questions: Vec<String> = merged
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("json")["question"].as_str().expect("question").to_string())
            .collect();
        assert_eq!(questions, expected, "attempt {attempt}");
    }
}
