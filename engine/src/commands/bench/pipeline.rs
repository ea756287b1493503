//! `longrl bench pipeline`: records per second through source -> filter -> sink, with and
//! without tokenization, and through a plain copy from one source and from two sources
//! merged into one input (the fan-in's turn taking), on generated records of a chosen length.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use longrl_stdlib::{CancelToken, Registry, StageContext};
use rand::{Rng, SeedableRng};

use crate::dataflow::executor::{RunOptions, execute};
use crate::dataflow::recipe::{Params, load_plan};

/// Figures of one pipeline variant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineFigures {
    pub variant: String,
    pub records: u64,
    pub wall_s: f64,
    pub records_per_s: f64,
    pub mb_per_s: f64,
}

/// Writes `count` records with documents of about `words` words each into `dir`.
pub fn generate_records(dir: &Path, count: usize, words: usize, seed: u64) -> std::io::Result<(PathBuf, u64)> {
    const VOCAB: &[&str] = &[
        "the",
        "river",
        "report",
        "quarterly",
        "revenue",
        "of",
        "company",
        "was",
        "in",
        "million",
        "north",
        "station",
        "museum",
        "director",
        "founded",
        "album",
        "released",
        "population",
        "census",
        "county",
        "built",
        "bridge",
        "author",
        "novel",
        "published",
        "election",
        "minister",
        "team",
        "season",
        "league",
        "born",
        "village",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let path = dir.join("bench_records.jsonl");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for i in 0..count {
        let mut document = String::with_capacity(words * 7);
        for w in 0..words {
            if w > 0 {
                document.push(if w % 17 == 0 { '.' } else { ' ' });
                if w % 17 == 0 {
                    document.push(' ');
                }
            }
            document.push_str(VOCAB[rng.random_range(0..VOCAB.len())]);
        }
        let record = serde_json::json!({
            "id": format!("r{i}"), "context": document, "question": format!("What is fact {i}?"), "answers": [format!("answer {i}")]
        });
        writeln!(out, "{record}")?;
    }
    out.flush()?;
    let bytes = std::fs::metadata(&path)?.len();
    Ok((path, bytes))
}

/// Runs every variant and returns their figures.
pub fn pipeline(count: usize, words: usize, tokenizer: &Path) -> Result<Vec<PipelineFigures>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (data, bytes) = generate_records(dir.path(), count, words, 7).map_err(|e| e.to_string())?;
    // The same number of records in two files, for the merge.
    let halves = [dir.path().join("first"), dir.path().join("second")];
    let mut half_files = Vec::new();
    for (half, (folder, records)) in halves.iter().zip([count / 2, count - count / 2]).enumerate() {
        std::fs::create_dir_all(folder).map_err(|e| e.to_string())?;
        half_files.push(generate_records(folder, records, words, 8 + half as u64).map_err(|e| e.to_string())?.0);
    }
    let tokenizer = std::fs::canonicalize(tokenizer).map_err(|e| format!("{}: {e}", tokenizer.display()))?;
    let variants = [
        ("copy, one source", format!(r#"jsonl("{}").write_jsonl("copy.jsonl")"#, data.display())),
        (
            "copy, two sources merged (fan-in)",
            format!(
                r#"let a = jsonl("{}"); let b = jsonl("{}"); write_jsonl(#{{ input: [a, b], path: "merged.jsonl" }})"#,
                half_files[0].display(),
                half_files[1].display()
            ),
        ),
        ("no tokenization (dedup only)", format!(r#"jsonl("{}").filter(#{{ dedup: true }}).write_jsonl("plain.jsonl")"#, data.display())),
        (
            "tokenize + length filter",
            format!(
                r#"jsonl("{}").filter(#{{ dedup: true, tokenizer: "{}", max_input_tokens: 1000000 }}).write_jsonl("tok.jsonl")"#,
                data.display(),
                tokenizer.display()
            ),
        ),
    ];
    let registry = Registry::standard();
    let mut figures = Vec::new();
    for (variant, recipe) in variants {
        let plan = load_plan(&recipe, "bench.rhai", &registry, &Params::new()).map_err(|p| p.to_string())?;
        let plan = plan.validate(&registry, &StageContext::for_check(dir.path())).map_err(|p| p.to_string())?;
        let mut options = RunOptions::in_dir(dir.path());
        options.run_dir = Some(dir.path().to_path_buf());
        let started = Instant::now();
        let report = execute(&plan, &registry, &options, &CancelToken::new()).map_err(|e| e.to_string())?;
        let wall = started.elapsed().as_secs_f64();
        if let Some(message) = report.failure_message() {
            return Err(message);
        }
        let records = report.stages.iter().find(|s| s.label.starts_with("write_jsonl")).map_or(0, |s| s.items_in);
        figures.push(PipelineFigures {
            variant: variant.to_string(),
            records,
            wall_s: wall,
            records_per_s: records as f64 / wall,
            mb_per_s: bytes as f64 / 1e6 / wall,
        });
    }
    Ok(figures)
}
