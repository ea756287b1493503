//! `longrl score FILE.jsonl`: scores responses with the rule verifiers (and a judge when one
//! is configured) and writes each input line back with a `score` field, to debug reward
//! rules and check a judge.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use longrl_stdlib::record::{AnswerKind, Record};
use longrl_stdlib::reward::Reward;
use longrl_stdlib::reward::judge::JudgeVerdict;
use serde_json::Value;

/// Reads `path` (one JSON object per line with `response`, `gold` and `kind`, optionally
/// `question` and `data_source`), scores every line and writes it to `out` with `score`
/// (null when unscorable), `answer` (the extracted answer) and, with a judge, `judge`. A
/// line the reward could not score is named on stderr with the reason.
pub fn score_file(path: &Path, reward: &Reward, out: &mut dyn Write) -> Result<usize> {
    let lines = read_lines(path)?;
    let pairs: Vec<(&Record, &str)> = lines.iter().map(|line| (&line.record, line.response.as_str())).collect();
    let outcomes = reward.score_all(&pairs).map_err(|e| anyhow::anyhow!("{e}"))?;
    for (line, outcome) in lines.iter().zip(outcomes) {
        let mut object = line.object.clone();
        if outcome.score.is_none() {
            let reason = match &outcome.judge {
                Some(JudgeVerdict::Unscorable { reason }) => reason.clone(),
                _ => "no score".to_string(),
            };
            crate::errln!("warning: {}:{}: unscorable: {reason}", path.display(), line.number);
        }
        if let Value::Object(map) = &mut object {
            map.insert("score".into(), outcome.score.map_or(Value::Null, |s| Value::from(f64::from(s))));
            map.insert("answer".into(), outcome.rule.answer.clone().map_or(Value::Null, Value::from));
            if let Some(judge) = &outcome.judge {
                map.insert("judge".into(), serde_json::to_value(judge)?);
            }
        }
        writeln!(out, "{object}")?;
    }
    Ok(lines.len())
}

/// One line of the input: its number, the object as read, the record to score and the response.
struct Line {
    number: usize,
    object: Value,
    record: Record,
    response: String,
}

/// Every non-blank line of `path`, each checked; the first bad line is an error naming it. A
/// UTF-8 byte-order mark at the start is skipped.
fn read_lines(path: &Path) -> Result<Vec<Line>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut lines = Vec::new();
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let number = index + 1;
        let line = line.with_context(|| format!("{}:{number}: cannot read the line (is the file UTF-8 text?)", path.display()))?;
        let line = if number == 1 { line.trim_start_matches('\u{feff}').to_string() } else { line };
        if line.trim().is_empty() {
            continue;
        }
        let parsed = parse_line(&line, number).map_err(|message| anyhow::anyhow!("{}:{number}: {message}", path.display()))?;
        lines.push(parsed);
    }
    if lines.is_empty() {
        bail!("{}: no lines to score (the file is empty)", path.display());
    }
    Ok(lines)
}

/// One line as a record and a response; `Err` says what is wrong with it.
fn parse_line(line: &str, number: usize) -> Result<Line, String> {
    let object: Value = serde_json::from_str(line).map_err(|e| format!("malformed JSON ({e})"))?;
    if !object.is_object() {
        return Err("expected a JSON object with `response`, `gold` and `kind`".into());
    }
    let text = |key: &str| object.get(key).and_then(Value::as_str).map(str::to_string);
    let response = text("response").ok_or("missing string field `response`")?;
    let gold = gold_answers(object.get("gold"))?;
    let kind = match object.get("kind") {
        None | Some(Value::Null) => AnswerKind::Text,
        Some(Value::String(name)) => {
            AnswerKind::parse(name).ok_or_else(|| format!("unknown kind `{name}` (use text, number or choice)"))?
        }
        Some(other) => return Err(format!("`kind` must be a string (text, number or choice), found {other}")),
    };
    let mut record = Record::new(format!("line-{number}"), text("question").unwrap_or_default());
    record.answers = gold;
    record.kind = kind;
    record.data_source = text("data_source").unwrap_or_default();
    Ok(Line { number, object, record, response })
}

/// The gold answers of a line: a non-empty string or number, or a non-empty list of them.
fn gold_answers(value: Option<&Value>) -> Result<Vec<String>, String> {
    let one = |v: &Value| match v {
        Value::String(s) if s.trim().is_empty() => Err("`gold` holds an empty answer".to_string()),
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!("`gold` must hold strings or numbers, found {other}")),
    };
    match value {
        None | Some(Value::Null) => Err("missing field `gold` (a string or a list of strings)".into()),
        Some(Value::Array(items)) if items.is_empty() => Err("`gold` is an empty list".into()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(other) => Ok(vec![one(other)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_of_a_score_file_are_errors_naming_the_line() {
        let cases = [
            (r#"{"response": "the answer is 3", "gold": "3", "kind": 7}"#, "`kind` must be a string"),
            (r#"{"response": "the answer is 3", "gold": "3", "kind": "essay"}"#, "unknown kind `essay`"),
            (r#"{"response": "the answer is 3", "gold": ""}"#, "empty answer"),
            (r#"{"response": "the answer is 3", "gold": []}"#, "empty list"),
            (r#"{"response": "the answer is 3", "gold": ["3", "  "]}"#, "empty answer"),
            (r#"{"response": "the answer is 3"}"#, "missing field `gold`"),
            (r#"{"gold": "3"}"#, "missing string field `response`"),
            (r#"[1, 2]"#, "expected a JSON object"),
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        for (line, expected) in cases {
            let path = dir.path().join("lines.jsonl");
            std::fs::write(&path, format!("{{\"response\": \"x\", \"gold\": \"y\"}}\n{line}\n")).expect("write");
            let err = score_file(&path, &Reward::rule_only(Default::default()), &mut Vec::new()).expect_err(line).to_string();
            assert!(err.contains("lines.jsonl:2: ") && err.contains(expected), "{line}: {err}");
        }
    }

    #[test]
    fn a_byte_order_mark_is_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bom.jsonl");
        std::fs::write(&path, "\u{feff}{\"response\": \"the answer is 3\", \"gold\": 3, \"kind\": \"number\"}\n").expect("write");
        let mut out = Vec::new();
        assert_eq!(score_file(&path, &Reward::rule_only(Default::default()), &mut out).expect("scores"), 1);
        assert!(String::from_utf8_lossy(&out).contains("\"score\":1.0"));
    }
}
