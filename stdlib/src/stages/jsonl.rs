//! `jsonl` source: reads a JSON Lines file into task records, with ready-made field
//! mappings for longrl, LongBench and verl-style files; a bad line names file and line.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::StageError;
use crate::record::{AnswerKind, ChatMessage, Record};
use crate::reward::judge::judge_question;
use crate::stage::{PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};

/// Which layout the file's objects have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JsonlFormat {
    /// longrl's own record fields (as `write_jsonl` writes them): id, context, question,
    /// answers, kind, data_source, prompt, input_tokens, length_budget, trace, difficulty,
    /// carried_from, metadata.
    #[default]
    Longrl,
    /// LongBench: `_id`, `context`, `input` (the question), `answers`, `dataset`.
    Longbench,
    /// verl RL data: `prompt` (chat list), `reward_model.ground_truth`, `data_source`, `extra_info`.
    Verl,
}

/// A record field that a mapping can point at a JSON key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecordField {
    Id,
    Context,
    Question,
    Answers,
    Kind,
    DataSource,
    Prompt,
}

/// What to do with a line that cannot be read as a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop the run with an error naming file and line.
    #[default]
    Fail,
    /// Skip the line; skipped lines are counted, warned about and listed in the summary.
    Skip,
}

/// Options of the `jsonl` source.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// The JSON Lines file to read (relative to the working directory).
    pub path: PathBuf,
    /// Layout of each line's object: `longrl`, `longbench` or `verl`.
    #[serde(default)]
    pub format: JsonlFormat,
    /// Overrides where record fields come from: `#{ question: "query", answers: "gold.aliases" }`
    /// (dotted paths reach into nested objects). A field named here must be present.
    #[serde(default)]
    pub fields: BTreeMap<RecordField, String>,
    /// Answer kind for records whose data does not say (otherwise inferred from data_source).
    #[serde(default)]
    pub kind: Option<AnswerKind>,
    /// data_source for records whose data does not say (default: the file name without extension).
    #[serde(default)]
    pub data_source: Option<String>,
    /// What a bad line does: `fail` stops the run, `skip` counts and reports it.
    #[serde(default)]
    pub on_error: OnError,
    /// Read at most this many records.
    #[serde(default)]
    pub limit: Option<usize>,
}

impl StageConfig for JsonlConfig {
    const NAME: &'static str = "jsonl";
    const SUMMARY: &'static str = "Reads task records from a JSON Lines file (longrl, LongBench or verl layout).";
    const OUTPUTS: &'static [PortSpec] = &[PortSpec::optional("records", PortKind::Records, "the records read")];
    const POSITIONAL: &'static [&'static str] = &["path"];

    fn validate(&self, ctx: &StageContext) -> Vec<String> {
        if let Some(problem) = ctx.require_file("path", &self.path) {
            return vec![problem];
        }
        let path = ctx.input_path(&self.path);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() == 0 => vec![format!("option `path`: {} is empty (0 bytes): it holds no records", path.display())],
            _ => Vec::new(),
        }
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let path = ctx.input_path(&self.path);
        let default_source =
            self.data_source.clone().unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
        let mapping = Mapping::new(self.format, &self.fields);
        Ok(Box::new(JsonlSource { path, mapping, default_kind: self.kind, default_source, on_error: self.on_error, limit: self.limit }))
    }
}

/// Where each record field is read from, and whether it must be there (shared with the
/// `parquet` source, whose rows are read as JSON objects).
#[derive(Debug, Clone)]
pub(crate) struct Mapping {
    format: JsonlFormat,
    paths: BTreeMap<RecordField, (String, bool)>,
}

impl Mapping {
    pub(crate) fn new(format: JsonlFormat, overrides: &BTreeMap<RecordField, String>) -> Self {
        use RecordField::*;
        let defaults: &[(RecordField, &str, bool)] = match format {
            JsonlFormat::Longrl => &[
                (Id, "id", false),
                (Context, "context", false),
                (Question, "question", true),
                (Answers, "answers", false),
                (Kind, "kind", false),
                (DataSource, "data_source", false),
                (Prompt, "prompt", false),
            ],
            JsonlFormat::Longbench => &[
                (Id, "_id", false),
                (Context, "context", true),
                (Question, "input", true),
                (Answers, "answers", false),
                (DataSource, "dataset", false),
            ],
            JsonlFormat::Verl => &[
                (Id, "extra_info.index", false),
                (Question, "extra_info.question", false),
                (Answers, "reward_model.ground_truth", false),
                (DataSource, "data_source", false),
                (Prompt, "prompt", true),
            ],
        };
        let mut paths: BTreeMap<RecordField, (String, bool)> =
            defaults.iter().map(|(field, path, required)| (*field, ((*path).to_string(), *required))).collect();
        for (field, path) in overrides {
            paths.insert(*field, (path.clone(), true));
        }
        Self { format, paths }
    }

    /// The value at a field's path; `Ok(None)` when absent and optional.
    fn get<'a>(&self, object: &'a Value, field: RecordField) -> Result<Option<&'a Value>, String> {
        let Some((path, required)) = self.paths.get(&field) else { return Ok(None) };
        let mut value = object;
        for key in path.split('.') {
            match value.get(key) {
                Some(inner) => value = inner,
                None if *required => return Err(format!("missing field `{path}`")),
                None => return Ok(None),
            }
        }
        if value.is_null() && !*required { Ok(None) } else { Ok(Some(value)) }
    }

    fn path(&self, field: RecordField) -> &str {
        self.paths.get(&field).map_or("?", |(p, _)| p.as_str())
    }

    /// The top-level keys that every object must have (the first part of required paths).
    pub(crate) fn required_keys(&self) -> Vec<&str> {
        self.paths.values().filter(|(_, required)| *required).filter_map(|(path, _)| path.split('.').next()).collect()
    }

    /// A record from one object, with the default data_source and answer kind where the
    /// object does not give them (`index` numbers records without an id).
    pub(crate) fn read(
        &self,
        object: &Value,
        index: usize,
        default_source: &str,
        default_kind: Option<AnswerKind>,
    ) -> Result<Record, String> {
        let mut record = self.record(object, index, default_source)?;
        if record.data_source.is_empty() {
            record.data_source = default_source.to_string();
        }
        let has_kind = self.get(object, RecordField::Kind).ok().flatten().is_some();
        if !has_kind {
            record.kind = default_kind.unwrap_or_else(|| infer_kind(&record.data_source));
        }
        Ok(record)
    }

    /// Builds a record from one parsed line.
    fn record(&self, object: &Value, line: usize, stem: &str) -> Result<Record, String> {
        use RecordField::*;
        if !object.is_object() {
            return Err(format!("expected a JSON object, found {}", crate::options::json_type(object)));
        }
        let text = |field: RecordField| -> Result<Option<String>, String> {
            match self.get(object, field)? {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(format!("field `{}` must be a string, found {}", self.path(field), crate::options::json_type(other))),
            }
        };
        let id = match self.get(object, Id)? {
            None => format!("{stem}:{line}"),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(other) => {
                return Err(format!("field `{}` must be a string or integer, found {}", self.path(Id), crate::options::json_type(other)));
            }
        };
        let answers = match self.get(object, Answers)? {
            None => Vec::new(),
            Some(value) => answer_list(value).map_err(|e| format!("field `{}`: {e}", self.path(Answers)))?,
        };
        let prompt = match self.get(object, Prompt)? {
            None => None,
            Some(value) => Some(
                serde_json::from_value::<Vec<ChatMessage>>(value.clone())
                    .map_err(|e| format!("field `{}` must be a list of {{role, content}} turns: {e}", self.path(Prompt)))?,
            ),
        };
        let mut question = text(Question)?.unwrap_or_default();
        if question.is_empty() && self.format == JsonlFormat::Verl {
            // verl records keep the question inside the prompt: the last user turn's text
            // after its document (the judge is shown the question, never the document).
            question = prompt
                .as_ref()
                .and_then(|turns| turns.iter().rev().find(|t| t.role == "user"))
                .map(|t| judge_question(&t.content))
                .unwrap_or_default();
        }
        let kind = match text(Kind)? {
            None => None,
            Some(name) => Some(
                AnswerKind::parse(&name)
                    .ok_or_else(|| format!("field `{}`: unknown answer kind `{name}` (use text, number or choice)", self.path(Kind)))?,
            ),
        };
        let mut record = Record::new(id, question);
        record.context = text(Context)?.unwrap_or_default();
        record.answers = answers;
        record.data_source = text(DataSource)?.unwrap_or_default();
        record.prompt = prompt;
        if let Some(kind) = kind {
            record.kind = kind;
        }
        if let Some(Value::Object(meta)) = object.get("metadata") {
            record.metadata = meta.clone();
        }
        if self.format == JsonlFormat::Longrl {
            read_annotations(object, &mut record)?;
        }
        if let Some(Value::Object(extra)) = object.get("extra_info").filter(|_| self.format == JsonlFormat::Verl) {
            record.metadata.insert("extra_info".into(), Value::Object(extra.clone()));
        }
        Ok(record)
    }
}

/// The typed annotations of a longrl record, as `write_jsonl` writes them (input tokens,
/// length budget, trace, difficulty, carried-from).
fn read_annotations(object: &Value, record: &mut Record) -> Result<(), String> {
    let field = |name: &str| object.get(name).filter(|v| !v.is_null());
    // Token counts: at most what any length option accepts.
    let count = |name: &str| -> Result<Option<usize>, String> {
        let Some(value) = field(name) else { return Ok(None) };
        let n = value
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| format!("field `{name}` must be a non-negative integer, found {}", crate::options::json_type(value)))?;
        if n > crate::options::limits::TOKENS {
            return Err(format!("field `{name}` is {n} tokens, more than the {} longrl handles", crate::options::limits::TOKENS));
        }
        Ok(Some(n))
    };
    let text = |name: &str| -> Result<Option<String>, String> {
        match field(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("field `{name}` must be a string, found {}", crate::options::json_type(other))),
        }
    };
    record.input_tokens = count("input_tokens")?;
    record.length_budget = count("length_budget")?;
    record.trace = text("trace")?;
    record.carried_from = text("carried_from")?;
    if let Some(value) = field("carry_share") {
        let share = value.as_f64().filter(|s| (0.0..=1.0).contains(s));
        record.carry_share =
            Some(share.ok_or_else(|| format!("field `carry_share` must be a number within [0, 1], found {value}"))? as f32);
    }
    if let Some(value) = field("difficulty") {
        let difficulty = serde_json::from_value(value.clone())
            .map_err(|e| format!("field `difficulty` must be {{pass_rate, rewards, samples}}: {e}"))?;
        record.difficulty = Some(difficulty);
    }
    Ok(())
}

/// Gold answers: a string, a number, or a list of those.
fn answer_list(value: &Value) -> Result<Vec<String>, String> {
    let one = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!("answers must be strings or numbers, found {}", crate::options::json_type(other))),
    };
    match value {
        Value::Array(items) => items.iter().map(one).collect(),
        other => Ok(vec![one(other)?]),
    }
}

/// Guesses the answer kind from a data_source name, as QwenLong-L1's reward routing does.
pub fn infer_kind(data_source: &str) -> AnswerKind {
    let source = data_source.to_ascii_lowercase();
    if source.contains("docmath") || source.contains("math") || source.contains("numeric") {
        AnswerKind::Number
    } else if source.contains("choice") || source.contains("mcq") {
        AnswerKind::Choice
    } else {
        AnswerKind::Text
    }
}

struct JsonlSource {
    path: PathBuf,
    mapping: Mapping,
    default_kind: Option<AnswerKind>,
    default_source: String,
    on_error: OnError,
    limit: Option<usize>,
}

impl JsonlSource {
    fn parse_line(&self, bytes: &[u8], line: usize) -> Result<Record, String> {
        // A byte-order mark some editors put at the start of a file is not part of the JSON.
        let bytes = if line == 1 { bytes.strip_prefix(BOM).unwrap_or(bytes) } else { bytes };
        let text = std::str::from_utf8(bytes).map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to() + 1))?;
        let object: Value = serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
        self.mapping.read(&object, line, &self.default_source, self.default_kind)
    }
}

impl Stage for JsonlSource {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let file = File::open(&self.path).map_err(|e| StageError::io(&self.path, e))?;
        let mut reader = BufReader::new(file);
        let mut buffer = Vec::new();
        let (mut line, mut emitted, mut skipped) = (0usize, 0usize, Vec::<Value>::new());
        loop {
            if self.limit.is_some_and(|limit| emitted >= limit) {
                break;
            }
            buffer.clear();
            let read = reader.read_until(b'\n', &mut buffer).map_err(|e| StageError::io(&self.path, e))?;
            if read == 0 {
                break;
            }
            line += 1;
            let bytes = trim_line(&buffer);
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match self.parse_line(bytes, line) {
                Ok(record) => {
                    io.send_record("records", record)?;
                    emitted += 1;
                }
                Err(message) => match self.on_error {
                    OnError::Fail => return Err(StageError::BadRecord { path: self.path.clone(), line, message }),
                    OnError::Skip => {
                        tracing::warn!(file = %self.path.display(), line, error = %message, "skipped a bad line");
                        skipped.push(serde_json::json!({ "line": line, "error": message }));
                    }
                },
            }
        }
        if !skipped.is_empty() {
            tracing::warn!(file = %self.path.display(), count = skipped.len(), "bad lines were skipped");
        }
        if emitted == 0 && skipped.is_empty() && self.limit != Some(0) {
            return Err(StageError::Failed(format!("{}: holds no records (only blank lines)", self.path.display())));
        }
        let summary = io.summary_mut();
        summary.insert("file".into(), self.path.display().to_string().into());
        summary.insert("records".into(), emitted.into());
        summary.insert("skipped_lines".into(), skipped.len().into());
        if !skipped.is_empty() {
            summary.insert("skipped".into(), Value::Array(skipped.into_iter().take(20).collect()));
        }
        Ok(())
    }
}

/// The UTF-8 byte-order mark.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// A line without its `\n` / `\r\n` ending.
fn trim_line(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

/// Reads every record of a file (used by tools and tests; stages stream instead).
pub fn read_all(path: &Path, format: JsonlFormat) -> Result<Vec<Record>, StageError> {
    let source = JsonlSource {
        path: path.to_path_buf(),
        mapping: Mapping::new(format, &BTreeMap::new()),
        default_kind: None,
        default_source: path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        on_error: OnError::Fail,
        limit: None,
    };
    let text = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    let mut records = Vec::new();
    for (index, line) in text.split(|b| *b == b'\n').enumerate() {
        let line_bytes = trim_line(line);
        if line_bytes.iter().all(u8::is_ascii_whitespace) || (index == 0 && line_bytes == BOM) {
            continue;
        }
        let record = source.parse_line(line_bytes, index + 1).map_err(|message| StageError::BadRecord {
            path: path.to_path_buf(),
            line: index + 1,
            message,
        })?;
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(super) fn source(format: JsonlFormat) -> JsonlSource {
        JsonlSource {
            path: "t.jsonl".into(),
            mapping: Mapping::new(format, &BTreeMap::new()),
            default_kind: None,
            default_source: "t".into(),
            on_error: OnError::Fail,
            limit: None,
        }
    }

    #[test]
    fn longbench_records_map_their_fields() {
        let line = json!({"_id": "a1", "input": "Who?", "context": "Doc.", "answers": ["Ann", "Anne"], "dataset": "hotpotqa", "length": 3});
        let record = source(JsonlFormat::Longbench).parse_line(line.to_string().as_bytes(), 1).expect("valid");
        assert_eq!(record.id, "a1");
        assert_eq!(record.question, "Who?");
        assert_eq!(record.context, "Doc.");
        assert_eq!(record.answers, ["Ann", "Anne"]);
        assert_eq!(record.data_source, "hotpotqa");
        assert_eq!(record.kind, AnswerKind::Text);
    }

    #[test]
    fn verl_records_take_the_prompt_and_ground_truth() {
        let line = json!({
            "data_source": "docmath",
            "prompt": [{"role": "user", "content": "<text>..</text> What is x?"}],
            "reward_model": {"ground_truth": 12.5, "style": "rule"},
            "extra_info": {"index": 7}
        });
        let record = source(JsonlFormat::Verl).parse_line(line.to_string().as_bytes(), 4).expect("valid");
        assert_eq!(record.id, "7");
        assert_eq!(record.answers, ["12.5"]);
        assert_eq!(record.kind, AnswerKind::Number);
        assert_eq!(record.question, "What is x?");
        assert_eq!(record.prompt.as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let s = source(JsonlFormat::Longrl);
        let cases: [(&[u8], &str); 5] = [
            (b"{\"question\": ", "malformed JSON"),
            (b"{\"id\": \"x\"}", "missing field `question`"),
            (b"{\"question\": 3}", "field `question` must be a string, found an integer"),
            (b"{\"question\": \"q\", \"kind\": \"essay\"}", "unknown answer kind `essay`"),
            (b"{\"question\": \"\xff\"}", "invalid UTF-8"),
        ];
        for (line, expected) in cases {
            let err = s.parse_line(line, 9).expect_err("line is bad");
            assert!(err.contains(expected), "{err:?} should mention {expected:?}");
        }
    }

    #[test]
    fn a_byte_order_mark_on_the_first_line_is_accepted() {
        let s = source(JsonlFormat::Longrl);
        let record = s.parse_line(b"\xef\xbb\xbf{\"question\": \"q\"}", 1).expect("BOM skipped");
        assert_eq!(record.question, "q");
        let err = s.parse_line(b"\xef\xbb\xbf{\"question\": \"q\"}", 2).expect_err("only at the start of the file");
        assert!(err.contains("malformed JSON"), "{err}");
    }

    #[test]
    fn verl_records_without_a_question_give_the_judge_the_question_not_the_document() {
        let document = "A long clause about insurance. ".repeat(2000);
        let line = json!({
            "data_source": "docqa_choices",
            "prompt": [{"role": "user", "content": format!("<text>\n{document}\n</text>\n\nWhich clause applies? (A) x (B) y")}],
            "reward_model": {"ground_truth": "B"},
        });
        let record = source(JsonlFormat::Verl).parse_line(line.to_string().as_bytes(), 1).expect("valid");
        assert_eq!(record.question, "Which clause applies? (A) x (B) y");
        assert_eq!(record.kind, AnswerKind::Choice);
    }

    #[test]
    fn missing_ids_fall_back_to_file_and_line() {
        let record = source(JsonlFormat::Longrl).parse_line(br#"{"question": "q", "answers": "a"}"#, 12).expect("valid");
        assert_eq!(record.id, "t:12");
        assert_eq!(record.answers, ["a"]);
    }
}

#[cfg(test)]
mod properties {
    use super::tests::source;
    use super::*;
    use proptest::prelude::*;

    /// Arbitrary JSON values, nested a few levels.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "\\PC{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("question".to_string()),
                        Just("answers".to_string()),
                        Just("prompt".to_string()),
                        Just("kind".to_string()),
                        Just("difficulty".to_string()),
                        Just("reward_model".to_string()),
                        Just("ground_truth".to_string()),
                        Just("extra_info".to_string()),
                        Just("id".to_string()),
                        Just("length_budget".to_string()),
                        Just("carry_share".to_string()),
                        "[a-z_]{1,8}",
                    ],
                    inner,
                    0..6,
                )
                .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    fn format() -> impl Strategy<Value = JsonlFormat> {
        prop_oneof![Just(JsonlFormat::Longrl), Just(JsonlFormat::Longbench), Just(JsonlFormat::Verl)]
    }

    proptest! {
        #![proptest_config(crate::testing::config(512))]

        #[test]
        fn any_bytes_give_a_record_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..200), format in format(), line in 1usize..4) {
            let _ = source(format).parse_line(&bytes, line);
        }

        #[test]
        fn any_json_gives_a_record_or_an_error(value in json_value(), format in format()) {
            let text = value.to_string();
            if let Ok(record) = source(format).parse_line(text.as_bytes(), 1) {
                prop_assert!(!record.id.is_empty());
                prop_assert!(record.carry_share.is_none_or(|s| (0.0..=1.0).contains(&s)));
            }
        }

        #[test]
        fn any_file_reads_or_names_its_bad_line(lines in proptest::collection::vec(prop_oneof![
            json_value().prop_map(|v| v.to_string().into_bytes()),
            proptest::collection::vec(any::<u8>(), 0..40),
        ], 0..6)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("data.jsonl");
            std::fs::write(&path, lines.join(&b'\n')).expect("write");
            match read_all(&path, JsonlFormat::Longrl) {
                Ok(records) => prop_assert!(records.len() <= lines.len()),
                Err(StageError::BadRecord { path: bad, line, .. }) => {
                    prop_assert_eq!(bad, path);
                    prop_assert!(line >= 1 && line <= lines.len().max(1));
                }
                Err(other) => prop_assert!(false, "unexpected error {}", other),
            }
        }
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
        let deep = format!("{{\"question\": {}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
        let err = source(JsonlFormat::Longrl).parse_line(deep.as_bytes(), 1).expect_err("too deep");
        assert!(err.contains("malformed JSON") && err.contains("recursion limit"), "{err}");
    }
}
