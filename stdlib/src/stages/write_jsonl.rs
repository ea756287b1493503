//! `write_jsonl` sink: writes the records it receives as JSON Lines, atomically.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use serde::Deserialize;

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
    /// resumed run, which replaces the file its earlier attempt wrote in the run directory).
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
        let overwrite = self.overwrite || ctx.owns_existing_output(&path);
        let file = AtomicFile::create(&path, overwrite)?;
        Ok(Box::new(WriteJsonl { file, path }))
    }
}

struct WriteJsonl {
    file: AtomicFile,
    path: PathBuf,
}

impl Stage for WriteJsonl {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let path = self.path;
        let mut writer = BufWriter::new(self.file);
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
        Ok(())
    }
}
