//! The `parquet` source on verl-layout files written by pyarrow
//! (tests/fixtures/parquet/make_fixture.py): the same records as the `jsonl` source reads
//! from the same table as JSON Lines, snappy and gzip pages, several row groups, and errors
//! naming the file for files that are not Parquet, truncated, or lack the layout's columns.

use std::path::{Path, PathBuf};

use longrl_engine::dataflow::executor::RunOptions;
use longrl_engine::dataflow::recipe::Params;
use longrl_engine::{execute, load_plan};
use longrl_stdlib::stages::jsonl::JsonlFormat;
use longrl_stdlib::stages::parquet::read_all;
use longrl_stdlib::{AnswerKind, CancelToken, Record, Registry, StageContext};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").join("tests/fixtures/parquet").join(name)
}

#[test]
fn verl_rows_become_the_records_jsonl_reads_from_the_same_table() {
    let from_parquet = read_all(&fixture("verl.parquet"), JsonlFormat::Verl).expect("reads");
    let from_jsonl = longrl_stdlib::stages::jsonl::read_all(&fixture("verl.jsonl"), JsonlFormat::Verl).expect("reads");
    assert_eq!(from_parquet.len(), 5, "both row groups");
    // Same records except the default data_source / id stem (the file names differ).
    assert_eq!(from_parquet, from_jsonl);
    let first = &from_parquet[0];
    assert_eq!((first.id.as_str(), first.data_source.as_str(), first.kind), ("0", "docmath", AnswerKind::Number));
    assert_eq!(first.answers, vec!["195".to_string()]);
    assert_eq!(first.question, "What was Acme's profit in 2012, in million dollars?");
    let prompt = first.prompt.as_ref().expect("the prompt");
    assert_eq!(prompt[0].role, "user");
    assert!(prompt[0].content.starts_with("<text>\nIn 2012, Acme"));
    assert_eq!(first.metadata["extra_info"]["split"], "train");
    let kinds: Vec<AnswerKind> = from_parquet.iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [AnswerKind::Number, AnswerKind::Number, AnswerKind::Choice, AnswerKind::Text, AnswerKind::Text]);
    // gzip pages read the same.
    assert_eq!(read_all(&fixture("gzip.parquet"), JsonlFormat::Verl).expect("reads"), from_parquet);
}

/// Runs `recipe` in a fresh directory; returns the records written to out.jsonl, or the
/// check or run error.
fn run(recipe: &str) -> Result<Vec<Record>, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::standard();
    let plan = load_plan(recipe, "parquet.rhai", &registry, &Params::new()).map_err(|e| e.to_string())?;
    let plan = plan.validate(&registry, &StageContext::for_check(dir.path())).map_err(|e| e.to_string())?;
    let mut options = RunOptions::in_dir(dir.path());
    options.run_dir = Some(dir.path().to_path_buf());
    let report = execute(&plan, &registry, &options, &CancelToken::new()).map_err(|e| e.to_string())?;
    if !report.succeeded() {
        return Err(report.failure_message().unwrap_or_else(|| report.to_string()));
    }
    let text = std::fs::read_to_string(dir.path().join("out.jsonl")).map_err(|e| e.to_string())?;
    Ok(text.lines().map(|l| serde_json::from_str(l).expect("record")).collect())
}

#[test]
fn the_stage_reads_with_options_and_limits() {
    let path = fixture("verl.parquet");
    let records = run(&format!(r#"parquet("{}", #{{ limit: 3, kind: "text" }}).write_jsonl("out.jsonl");"#, path.display())).expect("runs");
    assert_eq!(records.len(), 3);
    // `kind` applies only where data_source does not route; verl rows have no kind field.
    assert!(records.iter().all(|r| r.kind == AnswerKind::Text));
    let records = run(&format!(
        r#"parquet("{}", #{{ fields: #{{ question: "extra_info.question", id: "extra_info.split" }} }}).write_jsonl("out.jsonl");"#,
        path.display()
    ))
    .expect("runs");
    assert_eq!(records[4].question, "Who runs the museum in Oslo?");
    assert_eq!(records[4].id, "train");
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_parquet = dir.path().join("notes.parquet");
    std::fs::write(&not_parquet, "just some text, not a parquet file at all").expect("write");
    let err = run(&format!(r#"parquet("{}").write_jsonl("out.jsonl");"#, not_parquet.display())).expect_err("invalid");
    assert!(err.contains("notes.parquet: not a readable Parquet file"), "{err}");

    let bytes = std::fs::read(fixture("verl.parquet")).expect("read");
    let truncated = dir.path().join("truncated.parquet");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let err = run(&format!(r#"parquet("{}").write_jsonl("out.jsonl");"#, truncated.display())).expect_err("invalid");
    assert!(err.contains("truncated.parquet: not a readable Parquet file"), "{err}");
    let err = read_all(&truncated, JsonlFormat::Verl).expect_err("invalid").to_string();
    assert!(err.contains("truncated.parquet"), "{err}");

    // A real Parquet file without the layout's columns: a check-time problem listing them.
    let err = run(&format!(r#"parquet("{}", #{{ format: "longbench" }}).write_jsonl("out.jsonl");"#, fixture("verl.parquet").display()))
        .expect_err("wrong layout");
    assert!(err.contains("verl.parquet has no column `context`"), "{err}");
    assert!(err.contains("has no column `input`"), "{err}");

    // A row that does not fit: the error names file and row.
    let err = run(&format!(
        r#"parquet("{}", #{{ fields: #{{ question: "extra_info.nope" }} }}).write_jsonl("out.jsonl");"#,
        fixture("verl.parquet").display()
    ))
    .expect_err("bad row");
    assert!(err.contains("verl.parquet: row 1: missing field `extra_info.nope`"), "{err}");

    // Corrupt pages inside an intact file: an error naming the file (never a panic), whatever
    // the bytes hit.
    for start in [4, 60, 200, 400] {
        let mut corrupt = bytes.clone();
        for byte in &mut corrupt[start..start + 40] {
            *byte ^= 0x5a;
        }
        let path = dir.path().join(format!("corrupt{start}.parquet"));
        std::fs::write(&path, &corrupt).expect("write");
        let result = read_all(&path, JsonlFormat::Verl);
        println!("corrupt bytes at {start}: {:?}", result.as_ref().map(Vec::len).map_err(ToString::to_string));
        if let Err(err) = result {
            assert!(err.to_string().contains(&format!("corrupt{start}.parquet")), "{err}");
        }
    }

    let missing = run(r#"parquet("nowhere.parquet").write_jsonl("out.jsonl");"#).expect_err("missing");
    assert!(missing.contains("input file") && missing.contains("nowhere.parquet does not exist"), "{missing}");
}
