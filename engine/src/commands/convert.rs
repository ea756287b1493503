//! `longrl convert gguf FILE OUT_DIR`: turns a llama.cpp GGUF model into a Hugging Face
//! model directory (safetensors, config.json, tokenizer.json, tokenizer_config.json with the
//! chat template) that longrl and transformers load.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use longrl_stdlib::model::SaveDtype;
use longrl_stdlib::model::gguf::{ConvertOptions, ConvertSummary, convert_gguf};

/// What to convert.
#[derive(Debug, Clone)]
pub struct GgufConversion {
    pub file: PathBuf,
    pub out_dir: PathBuf,
    pub dtype: SaveDtype,
    /// Write into an existing non-empty directory.
    pub force: bool,
}

/// Converts, refusing to mix the result into a directory that already holds files unless
/// `force` is set.
pub fn convert(request: &GgufConversion) -> Result<ConvertSummary> {
    if !request.force && is_non_empty_dir(&request.out_dir) {
        bail!("{} already holds files; pass --force to write the model into it anyway", request.out_dir.display());
    }
    Ok(convert_gguf(&request.file, &request.out_dir, &ConvertOptions { dtype: request.dtype })?)
}

fn is_non_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_some())
}

/// The lines `longrl convert gguf` prints.
pub fn describe(summary: &ConvertSummary) -> String {
    let types: Vec<String> = summary.types.iter().map(|(ty, n)| format!("{n} {ty}")).collect();
    format!(
        "converted a {} model of {} parameters (tensors: {}; vocabulary {}; {} embeddings) into {}",
        summary.architecture,
        if summary.parameters >= 1_000_000 { format!("{:.1}M", summary.parameters as f64 / 1e6) } else { summary.parameters.to_string() },
        types.join(", "),
        summary.vocab_size,
        if summary.tied_embeddings { "tied" } else { "untied" },
        summary.out_dir.display()
    )
}
