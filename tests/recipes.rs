//! Recipe host and plan validation: every problem reported at once with its line and
//! column, hardened limits, typed edges.

use std::path::Path;

use longrl_engine::dataflow::plan::{Position, Problems};
use longrl_engine::dataflow::recipe::Params;
use longrl_engine::{ValidPlan, load_plan};
use longrl_stdlib::{Registry, StageContext};

/// Evaluates and validates `source` with `dir` as the working directory.
fn check(source: &str, dir: &Path) -> Result<ValidPlan, Problems> {
    check_with(source, dir, &Params::new())
}

fn check_with(source: &str, dir: &Path, params: &Params) -> Result<ValidPlan, Problems> {
    let registry = Registry::standard();
    let plan = load_plan(source, "recipe.rhai", &registry, params)?;
    plan.validate(&registry, &StageContext::for_check(dir))
}

fn positions(problems: &Problems) -> Vec<(usize, usize)> {
    problems.list.iter().map(|p| (p.position.line, p.position.column)).collect()
}

fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tasks.jsonl"), "{\"question\": \"q\", \"answers\": [\"a\"]}\n").expect("write");
    dir
}

#[test]
fn a_syntax_error_names_its_line_and_column() {
    let dir = data_dir();
    let problems = check("let x = jsonl(\"tasks.jsonl\");\nlet y = x.filter(#{ dedup: true };\n", dir.path()).expect_err("syntax error");
    assert_eq!(problems.list.len(), 1);
    let problem = &problems.list[0];
    assert_eq!(problem.position.line, 2, "{problems}");
    assert!(problem.message.starts_with("syntax error"), "{problems}");
    assert!(problems.to_string().contains("recipe.rhai:2:"), "{problems}");
}

#[test]
fn every_problem_is_reported_together_with_its_position() {
    let dir = data_dir();
    let recipe = r#"
let tasks = jsonl("tasks.jsonl");
let a = tasks.filtr(#{ dedup: true });
let b = tasks.filter(#{ max_tokns: 10 });
let c = tasks.filter(#{ dedup: "yes" });
let d = jsonl("missing.jsonl");
let e = normalize(d);
"#;
    let problems = check(recipe, dir.path()).expect_err("broken recipe");
    let text = problems.to_string();
    let expect = [
        (3, "unknown stage `filtr` (did you mean `filter`?)"),
        (4, "filter: unknown option `max_tokns`"),
        (5, "filter: option `dedup`: invalid type: string \"yes\", expected a boolean"),
        (6, "jsonl: option `path`: input file"),
        (7, "unknown stage `normalize`"),
    ];
    for (line, message) in expect {
        assert!(
            problems.list.iter().any(|p| p.position.line == line && p.message.contains(message)),
            "missing line {line}: {message}\n{text}"
        );
    }
    assert_eq!(problems.list.len(), expect.len(), "{text}");
    assert!(positions(&problems).iter().all(|&(line, column)| line > 0 && column > 0), "{text}");
    assert!(text.contains("missing.jsonl does not exist"), "{text}");
}

#[test]
fn an_endless_loop_is_stopped_by_the_operation_limit() {
    let dir = data_dir();
    let started = std::time::Instant::now();
    let problems = check("let n = 0;\nloop { n += 1; }\n", dir.path()).expect_err("endless loop");
    assert!(problems.list[0].message.contains("operations"), "{problems}");
    assert_eq!(problems.list[0].position.line, 2, "{problems}");
    assert!(started.elapsed().as_secs() < 30);
}

#[test]
fn eval_and_undefined_variables_are_rejected() {
    let dir = data_dir();
    let problems = check("eval(\"1\")", dir.path()).expect_err("eval is disabled");
    assert!(problems.list[0].message.contains("syntax error"), "{problems}");
    let problems = check("let x = jsonl(undefined_path);", dir.path()).expect_err("strict variables");
    assert!(problems.to_string().contains("undefined_path"), "{problems}");
}

#[test]
fn edges_of_the_wrong_kind_and_unconnected_inputs_are_reported() {
    let dir = data_dir();
    std::fs::create_dir(dir.path().join("m")).expect("mkdir");
    std::fs::write(dir.path().join("m/config.json"), "{}").expect("write");
    let recipe = "let m = model(\"m\");\nlet f = filter(m, #{});\nlet w = write_jsonl(#{ path: \"x.jsonl\" });\n";
    let problems = check(recipe, dir.path()).expect_err("bad edges");
    let text = problems.to_string();
    assert!(
        problems.list.iter().any(|p| p.position.line == 2
            && p.message.contains("wrong kind of edge")
            && p.message.contains("takes records")
            && p.message.contains("model")),
        "{text}"
    );
    assert!(problems.list.iter().any(|p| p.position.line == 3 && p.message.contains("input `input` (records) is not connected")), "{text}");
}

#[test]
fn a_cycle_is_reported() {
    let dir = data_dir();
    // `records: a` feeds b's output back into a, which feeds b.
    let recipe = "let a = filter(#{});\nlet b = filter(a, #{ records: a });\n";
    let problems = check(recipe, dir.path()).expect_err("cycle");
    assert!(problems.list.iter().any(|p| p.message.contains("cycle") && p.message.contains("filter#0")), "{problems}");
}

#[test]
fn a_valid_recipe_gives_a_plan_with_typed_edges() {
    let dir = data_dir();
    let recipe = r#"
let tasks = jsonl("tasks.jsonl", #{ format: "longrl", on_error: "skip" });
tasks.filter(#{ require_answer: true, predicate: |r| r.question.len() < 100 }).write_jsonl("out.jsonl");
"#;
    let plan = check(recipe, dir.path()).expect("valid");
    assert_eq!(plan.nodes.len(), 3);
    assert_eq!(plan.edges.len(), 2);
    assert_eq!(plan.edges[0].from_port, "records");
    assert_eq!(plan.edges[0].to_port, "input");
    assert_eq!(plan.closures.len(), 1);
    assert_eq!(plan.nodes[1].position, Position::new(3, 7));
    assert!(plan.to_dot().contains("n0 -> n1"));
}

#[test]
fn parameters_come_from_set_and_unknown_ones_are_errors() {
    let dir = data_dir();
    let recipe = "let n = param(\"budget\", 100);\njsonl(\"tasks.jsonl\").filter(#{ max_input_tokens: n, tokenizer: \"tasks.jsonl\" });\n";
    let mut params = Params::new();
    params.insert("budget".into(), serde_json::json!(4096));
    let plan = check_with(recipe, dir.path(), &params).expect("valid");
    assert_eq!(plan.nodes[1].options["max_input_tokens"], 4096);

    params.insert("budgte".into(), serde_json::json!(1));
    let problems = check_with(recipe, dir.path(), &params).expect_err("unknown param");
    assert!(problems.to_string().contains("never reads parameter `budgte`"), "{problems}");

    let mut wrong = Params::new();
    wrong.insert("budget".into(), serde_json::json!("large"));
    let problems = check_with(recipe, dir.path(), &wrong).expect_err("wrong type");
    assert!(problems.to_string().contains("expected i64"), "{problems}");
}

#[test]
fn stage_calls_with_misplaced_arguments_are_reported() {
    let dir = data_dir();
    let recipe =
        "let t = jsonl(\"tasks.jsonl\", \"extra\");\nlet w = write_jsonl(t, t, \"o.jsonl\");\nlet f = filter(t, #{ input2: t });\n";
    let problems = check(recipe, dir.path()).expect_err("bad args");
    let text = problems.to_string();
    assert!(problems.list.iter().any(|p| p.position.line == 1 && p.message.contains("unexpected argument")), "{text}");
    assert!(problems.list.iter().any(|p| p.position.line == 2 && p.message.contains("too many stage inputs")), "{text}");
    assert!(problems.list.iter().any(|p| p.position.line == 3 && p.message.contains("not a port of filter")), "{text}");
}

#[test]
fn a_rope_base_applies_to_random_weights_only_and_must_be_sane() {
    let dir = data_dir();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").join("examples/models/tiny");
    let recipe = format!(
        "let a = model(\"{tiny}\", #{{ rope_theta: 1e6 }});\nlet b = model(\"{tiny}\", #{{ init: \"random\", rope_theta: -1.0 }});\nlet c = model(\"{tiny}\", #{{ init: \"random\", rope_theta: 1e6 }});\n",
        tiny = tiny.display()
    );
    let problems = check(&recipe, dir.path()).expect_err("two bad bases");
    let text = problems.to_string();
    // Line 1 also lacks weights to load; line 3 is fine.
    assert_eq!(positions(&problems).iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 1, 2], "{text}");
    assert!(text.contains("applies to `init: \"random\"` only"), "{text}");
    assert!(text.contains("must be a finite number above 1"), "{text}");
}
