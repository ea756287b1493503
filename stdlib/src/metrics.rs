//! `metrics.jsonl`: one JSON line per step per stage, shared by every stage of a run.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Map, Value};

use crate::error::StageError;

/// A cloneable handle to the run's metrics file (or to nowhere, in tests and checks).
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Option<Arc<Mutex<MetricsFile>>>,
    started: Instant,
}

#[derive(Debug)]
struct MetricsFile {
    path: PathBuf,
    writer: BufWriter<File>,
}

impl Metrics {
    /// Metrics that are dropped (checks, tests, benchmarks).
    pub fn discard() -> Self {
        Self { inner: None, started: Instant::now() }
    }

    /// Appends to `path`, creating it.
    pub fn open(path: &Path) -> Result<Self, StageError> {
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| StageError::io(path, e))?;
        Ok(Self {
            inner: Some(Arc::new(Mutex::new(MetricsFile { path: path.to_path_buf(), writer: BufWriter::new(file) }))),
            started: Instant::now(),
        })
    }

    /// Writes one line: `{"stage": .., "step": .., "elapsed_s": .., ...fields}`, flushed at
    /// once so a killed run keeps every line it logged.
    pub fn log(&self, stage: &str, step: u64, fields: Map<String, Value>) -> Result<(), StageError> {
        let Some(inner) = &self.inner else { return Ok(()) };
        let mut line = Map::new();
        line.insert("stage".into(), stage.into());
        line.insert("step".into(), step.into());
        line.insert("elapsed_s".into(), self.started.elapsed().as_secs_f64().into());
        line.extend(fields);
        let mut file = inner.lock().map_err(|_| StageError::Failed("metrics writer poisoned by a panic".into()))?;
        let path = file.path.clone();
        let text = Value::Object(line).to_string();
        writeln!(file.writer, "{text}").and_then(|()| file.writer.flush()).map_err(|e| StageError::io(path, e))
    }
}
