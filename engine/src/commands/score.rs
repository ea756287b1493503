//! `longrl score FILE.jsonl`: scores responses with the rule verifiers (and a judge when one
//! is configured) and writes each input line back with a `score` field, to debug reward
//! rules and check a judge.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use longrl_stdlib::record::{AnswerKind, Record};
use longrl_stdlib::reward::Reward;
use serde_json::Value;

/// Reads `path` (one JSON object per line with `response`, `gold` and `kind`, optionally
/// `question` and `data_source`), scores every line and writes it to `out` with `score`
/// (null when unscorable), `answer` (the extracted answer) and, with a judge, `judge`.
pub fn score_file(path: &Path, reward: &Reward, out: &mut dyn Write) -> Result<usize> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut objects = Vec::new();
    let mut records = Vec::new();
    let mut responses = Vec::new();
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let number = index + 1;
        let line = line.with_context(|| format!("{}:{number}: cannot read the line", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let object: Value = serde_json::from_str(&line).with_context(|| format!("{}:{number}: malformed JSON", path.display()))?;
        let text = |key: &str| object.get(key).and_then(Value::as_str).map(str::to_string);
        let Some(response) = text("response") else { bail!("{}:{number}: missing string field `response`", path.display()) };
        let gold: Vec<String> = match object.get("gold") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Number(n)) => vec![n.to_string()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    _ => Err(anyhow::anyhow!("{}:{number}: `gold` must hold strings", path.display())),
                })
                .collect::<Result<_>>()?,
            _ => bail!("{}:{number}: missing field `gold` (a string or a list of strings)", path.display()),
        };
        let kind = match text("kind") {
            None => AnswerKind::Text,
            Some(name) => AnswerKind::parse(&name)
                .with_context(|| format!("{}:{number}: unknown kind `{name}` (text, number or choice)", path.display()))?,
        };
        let mut record = Record::new(format!("line-{number}"), text("question").unwrap_or_default());
        record.answers = gold;
        record.kind = kind;
        record.data_source = text("data_source").unwrap_or_default();
        records.push(record);
        responses.push(response);
        objects.push(object);
    }
    let pairs: Vec<(&Record, &str)> = records.iter().zip(&responses).map(|(r, s)| (r, s.as_str())).collect();
    let outcomes = reward.score_all(&pairs).map_err(|e| anyhow::anyhow!("{e}"))?;
    for (mut object, outcome) in objects.into_iter().zip(outcomes) {
        if let Value::Object(map) = &mut object {
            map.insert("score".into(), outcome.score.map_or(Value::Null, |s| Value::from(f64::from(s))));
            map.insert("answer".into(), outcome.rule.answer.clone().map_or(Value::Null, Value::from));
            if let Some(judge) = &outcome.judge {
                map.insert("judge".into(), serde_json::to_value(judge)?);
            }
        }
        writeln!(out, "{object}")?;
    }
    Ok(records.len())
}
