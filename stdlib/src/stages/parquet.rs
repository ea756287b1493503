//! `parquet` source: reads an Apache Parquet file of task records, as verl's RL data ships
//! (QwenLong-L1's DocQA-RL-1.6K among them): each row is read as a JSON object and mapped
//! to a record exactly as the `jsonl` source maps a line (same layouts, same field options).
//! A file that is not Parquet, a compression codec this build lacks, or a row that does
//! not fit the layout is an error naming the file (and the row).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde::Deserialize;
use serde_json::Value;

use crate::error::StageError;
use crate::record::{AnswerKind, Record};
use crate::stage::{PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};
use crate::stages::jsonl::{JsonlFormat, Mapping, OnError, RecordField};

/// Options of the `parquet` source.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    /// The Parquet file to read (relative to the working directory).
    pub path: PathBuf,
    /// Layout of each row, as for `jsonl`: `verl` (the default here: `prompt` chat list,
    /// `reward_model.ground_truth`, `data_source`, `extra_info`), `longrl` or `longbench`.
    #[serde(default = "default_format")]
    pub format: JsonlFormat,
    /// Overrides where record fields come from: `#{ question: "extra_info.question" }`
    /// (dotted paths reach into nested columns). A field named here must be present.
    #[serde(default)]
    pub fields: BTreeMap<RecordField, String>,
    /// Answer kind for records whose data does not say (otherwise inferred from data_source).
    #[serde(default)]
    pub kind: Option<AnswerKind>,
    /// data_source for records whose data does not say (default: the file name without extension).
    #[serde(default)]
    pub data_source: Option<String>,
    /// What a bad row does: `fail` stops the run, `skip` counts and reports it.
    #[serde(default)]
    pub on_error: OnError,
    /// Read at most this many records.
    #[serde(default)]
    pub limit: Option<usize>,
}

fn default_format() -> JsonlFormat {
    JsonlFormat::Verl
}

impl StageConfig for ParquetConfig {
    const NAME: &'static str = "parquet";
    const SUMMARY: &'static str = "Reads task records from a Parquet file (verl, longrl or LongBench layout).";
    const OUTPUTS: &'static [PortSpec] = &[PortSpec::optional("records", PortKind::Records, "the records read")];
    const POSITIONAL: &'static [&'static str] = &["path"];

    fn validate(&self, ctx: &StageContext) -> Vec<String> {
        if let Some(problem) = ctx.require_file("path", &self.path) {
            return vec![problem];
        }
        let path = ctx.input_path(&self.path);
        let mapping = Mapping::new(self.format, &self.fields);
        match columns(&path) {
            Err(message) => vec![format!("option `path`: {message}")],
            Ok(columns) => mapping
                .required_keys()
                .into_iter()
                .filter(|key| !columns.iter().any(|c| c == key))
                .map(|key| format!("option `path`: {} has no column `{key}` (columns: {})", path.display(), columns.join(", ")))
                .collect(),
        }
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let path = ctx.input_path(&self.path);
        let default_source =
            self.data_source.clone().unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
        let mapping = Mapping::new(self.format, &self.fields);
        Ok(Box::new(ParquetSource { path, mapping, default_kind: self.kind, default_source, on_error: self.on_error, limit: self.limit }))
    }
}

/// Opens a Parquet file (reading its footer), with errors that name the file.
fn open(path: &Path) -> Result<SerializedFileReader<File>, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    SerializedFileReader::new(file).map_err(|e| format!("{}: not a readable Parquet file: {e}", path.display()))
}

/// The top-level column names of a Parquet file.
fn columns(path: &Path) -> Result<Vec<String>, String> {
    let reader = open(path)?;
    let schema = reader.metadata().file_metadata().schema_descr().root_schema().clone();
    Ok(schema.get_fields().iter().map(|f| f.name().to_string()).collect())
}

/// Every row of a Parquet file as a JSON object, in order, passed to `each` (which returns
/// false to stop). Errors name the file and the row.
///
/// The parquet crate's row reader may panic on corrupt pages rather than return an error;
/// a panic is caught here and reported as the file's error, so bad input never aborts a run.
pub fn for_each_row(path: &Path, mut each: impl FnMut(usize, Value) -> Result<bool, StageError>) -> Result<(), StageError> {
    let reader = open(path).map_err(StageError::Failed)?;
    let walk = std::panic::AssertUnwindSafe(|| -> Result<(), StageError> {
        let rows = reader.get_row_iter(None).map_err(|e| StageError::Failed(format!("{}: cannot read rows: {e}", path.display())))?;
        for (index, row) in rows.enumerate() {
            let row = row.map_err(|e| StageError::Failed(format!("{}: row {}: cannot be read: {e}", path.display(), index + 1)))?;
            if !each(index + 1, row.to_json_value())? {
                break;
            }
        }
        Ok(())
    });
    std::panic::catch_unwind(walk).unwrap_or_else(|panic| {
        let reason = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(StageError::Failed(format!("{}: corrupt Parquet data ({})", path.display(), reason.unwrap_or_default())))
    })
}

struct ParquetSource {
    path: PathBuf,
    mapping: Mapping,
    default_kind: Option<AnswerKind>,
    default_source: String,
    on_error: OnError,
    limit: Option<usize>,
}

impl ParquetSource {
    fn record(&self, row: usize, object: &Value) -> Result<Record, String> {
        self.mapping.read(object, row, &self.default_source, self.default_kind)
    }
}

impl Stage for ParquetSource {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let (mut emitted, mut skipped) = (0usize, Vec::<Value>::new());
        for_each_row(&self.path, |row, object| {
            if self.limit.is_some_and(|limit| emitted >= limit) {
                return Ok(false);
            }
            match self.record(row, &object) {
                Ok(record) => {
                    io.send_record("records", record)?;
                    emitted += 1;
                }
                Err(message) => match self.on_error {
                    OnError::Fail => return Err(StageError::Failed(format!("{}: row {row}: {message}", self.path.display()))),
                    OnError::Skip => {
                        tracing::warn!(file = %self.path.display(), row, error = %message, "skipped a bad row");
                        skipped.push(serde_json::json!({ "row": row, "error": message }));
                    }
                },
            }
            Ok(true)
        })?;
        let summary = io.summary_mut();
        summary.insert("file".into(), self.path.display().to_string().into());
        summary.insert("records".into(), emitted.into());
        summary.insert("skipped_rows".into(), skipped.len().into());
        if !skipped.is_empty() {
            summary.insert("skipped".into(), Value::Array(skipped.into_iter().take(20).collect()));
        }
        Ok(())
    }
}

/// Reads every record of a Parquet file with a layout (used by tools and tests).
pub fn read_all(path: &Path, format: JsonlFormat) -> Result<Vec<Record>, StageError> {
    let mapping = Mapping::new(format, &BTreeMap::new());
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut records = Vec::new();
    for_each_row(path, |row, object| {
        let record =
            mapping.read(&object, row, &stem, None).map_err(|m| StageError::Failed(format!("{}: row {row}: {m}", path.display())))?;
        records.push(record);
        Ok(true)
    })?;
    Ok(records)
}
