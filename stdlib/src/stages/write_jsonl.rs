//! `write_jsonl` sink: writes the records it receives as JSON Lines, atomically.
//!
//! In a run directory the stage records the file it wrote (`checkpoints/write_jsonl-N/
//! done.json`), so that a resumed run writes that file again rather than refusing it as
//! someone else's, wherever it lies.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::checkpoint::{Done, StageCheckpoints};
use crate::error::StageError;
use crate::fsutil::AtomicFile;
use crate::stage::{PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};

/// Options of the `write_jsonl` sink.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteJsonlConfig {
    /// Output file; a relative path lands in the run directory. The file appears only once
    /// complete (written beside it, then renamed).
    pub path: PathBuf,
    /// Replace the file if it exists (otherwise an existing file is an error, except in a
    /// resumed run, which replaces the file its earlier attempt wrote).
    #[serde(default)]
    pub overwrite: bool,
}

impl StageConfig for WriteJsonlConfig {
    const NAME: &'static str = "write_jsonl";
    const SUMMARY: &'static str = "Writes records to a JSON Lines file (in the run directory unless absolute).";
    const INPUTS: &'static [PortSpec] = &[PortSpec::required("input", PortKind::Records, "records to write")];
    const POSITIONAL: &'static [&'static str] = &["path"];

    fn validate(&self, _ctx: &StageContext) -> Vec<String> {
        if self.path.as_os_str().is_empty() { vec!["option `path` is empty".into()] } else { Vec::new() }
    }

    const WRITES_FILES: bool = true;

    fn writes(&self, ctx: &StageContext) -> Vec<PathBuf> {
        vec![ctx.output_path(&self.path)]
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let path = ctx.output_path(&self.path);
        let marker = ctx.run_dir.as_ref().map(|run| StageCheckpoints::new(run, &format!("{}#{}", Self::NAME, ctx.node), 1));
        let overwrite = self.overwrite || ctx.owns_existing_output(&path) || (ctx.resuming && wrote_before(marker.as_ref(), &path));
        let file = AtomicFile::create(&path, overwrite)?;
        Ok(Box::new(WriteJsonl { file, path, marker }))
    }
}

/// Whether an earlier attempt of this run recorded writing `path`.
fn wrote_before(marker: Option<&StageCheckpoints>, path: &Path) -> bool {
    let Some(Ok(Some(done))) = marker.map(StageCheckpoints::done) else { return false };
    done.summary.get("file").and_then(serde_json::Value::as_str) == Some(path.display().to_string().as_str())
}

struct WriteJsonl {
    file: AtomicFile,
    path: PathBuf,
    /// Where the stage records the file it wrote; `None` without a run directory.
    marker: Option<StageCheckpoints>,
}

impl Stage for WriteJsonl {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let WriteJsonl { file, path, marker } = *self;
        let mut writer = BufWriter::new(file);
        let mut count = 0u64;
        while let Some(record) = io.recv_record("input")? {
            serde_json::to_writer(&mut writer, &record).map_err(|e| StageError::io(&path, e.into()))?;
            writer.write_all(b"\n").map_err(|e| StageError::io(&path, e))?;
            count += 1;
        }
        let file = writer.into_inner().map_err(|e| StageError::io(&path, e.into_error()))?;
        file.commit()?;
        let summary = io.summary_mut();
        summary.insert("file".into(), path.display().to_string().into());
        summary.insert("records".into(), count.into());
        if let Some(marker) = &marker {
            marker.mark_done(&Done { model: None, summary: summary.clone(), metrics_lines: 0 })?;
        }
        Ok(())
    }
}
