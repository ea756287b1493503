//! `model` source: names a Hugging Face format model directory and publishes it on a model
//! edge, so training stages start from it.

use std::path::PathBuf;

use serde::Deserialize;

use crate::error::StageError;
use crate::stage::{ModelRef, PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};

/// Options of the `model` source.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A directory with config.json, model.safetensors (or shards) and tokenizer.json.
    pub path: PathBuf,
}

impl StageConfig for ModelConfig {
    const NAME: &'static str = "model";
    const SUMMARY: &'static str = "A model directory in Hugging Face format, published on a model edge.";
    const OUTPUTS: &'static [PortSpec] = &[PortSpec::optional("model", PortKind::Model, "the model")];
    const POSITIONAL: &'static [&'static str] = &["path"];

    fn validate(&self, ctx: &StageContext) -> Vec<String> {
        let dir = ctx.input_path(&self.path);
        if !dir.is_dir() {
            return vec![format!("option `path`: model directory {} does not exist", dir.display())];
        }
        if !dir.join("config.json").is_file() {
            return vec![format!("option `path`: {} has no config.json", dir.display())];
        }
        Vec::new()
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(ModelSource { dir: ctx.input_path(&self.path) }))
    }
}

struct ModelSource {
    dir: PathBuf,
}

impl Stage for ModelSource {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        io.summary_mut().insert("dir".into(), self.dir.display().to_string().into());
        io.send_model("model", ModelRef { dir: self.dir })
    }
}
