//! `model` source: names a Hugging Face format model directory and publishes it on a model
//! edge, so training stages start from it. With `init: "random"`, the directory needs only
//! config.json and the tokenizer: seeded random weights are written into the run directory.
//! A llama.cpp `.gguf` file is converted into the run directory first (see
//! [`crate::model::gguf`]).

use std::path::PathBuf;

use serde::Deserialize;

use crate::error::StageError;
use crate::model::checkpoint::{RandomInit, SaveDtype, copy_tokenizer_files};
use crate::model::gguf::{ConvertOptions, GgufFile, convert_gguf};
use crate::model::{CausalLm, ModelConfig, save_model};
use crate::stage::{ModelRef, PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};

/// Where the weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// The directory's safetensors.
    #[default]
    Checkpoint,
    /// Seeded random weights (normal, std `init_std`), for models trained from scratch.
    Random,
}

/// Options of the `model` source.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelConfigOptions {
    /// A directory with config.json, tokenizer.json and (unless `init` is random) weights,
    /// or a llama.cpp `.gguf` file (Llama, gpt2 BPE tokenizer), converted into the run
    /// directory as f32 safetensors.
    pub path: PathBuf,
    /// `checkpoint` (load the weights) or `random` (initialize them).
    #[serde(default)]
    pub init: Init,
    /// Seed of random weights (mixed with the run seed).
    #[serde(default)]
    pub seed: u64,
    /// Standard deviation of random weights.
    #[serde(default = "default_std")]
    pub init_std: f32,
    /// With `init: "random"`: the RoPE base written into the new model's config.json instead
    /// of the directory's. A larger base (Qwen2.5 uses 1e6) keeps the rotation between distant
    /// positions small, so a model trained on short inputs reads longer ones better.
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

fn default_std() -> f32 {
    0.02
}

impl StageConfig for ModelConfigOptions {
    const NAME: &'static str = "model";
    const SUMMARY: &'static str = "A model directory in Hugging Face format (or a config to initialize), published on a model edge.";
    const OUTPUTS: &'static [PortSpec] = &[PortSpec::optional("model", PortKind::Model, "the model")];
    const POSITIONAL: &'static [&'static str] = &["path"];

    fn validate(&self, ctx: &StageContext) -> Vec<String> {
        let dir = ctx.input_path(&self.path);
        if is_gguf(&dir) {
            return self.validate_gguf(&dir);
        }
        if !dir.is_dir() {
            return vec![format!("option `path`: model directory {} does not exist", dir.display())];
        }
        let mut problems = Vec::new();
        if !dir.join("config.json").is_file() {
            problems.push(format!("option `path`: {} has no config.json", dir.display()));
        } else if let Err(e) = ModelConfig::load(&dir.join("config.json")) {
            problems.push(e.to_string());
        }
        if let Some(theta) = self.rope_theta {
            if self.init != Init::Random {
                problems.push("option `rope_theta`: applies to `init: \"random\"` only (a trained model keeps the base it learned)".into());
            } else if !(theta.is_finite() && theta > 1.0) {
                problems.push(format!("option `rope_theta`: must be a finite number above 1, not {theta}"));
            }
        }
        if !(self.init_std > 0.0 && self.init_std <= 1.0) {
            problems.push(format!("option `init_std`: must be within (0, 1], got {}", self.init_std));
        }
        let has_weights = dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file();
        if self.init == Init::Checkpoint && !has_weights {
            problems.push(format!(
                "option `path`: {} has no model.safetensors; set `init: \"random\"` to start from random weights",
                dir.display()
            ));
        }
        problems
    }

    const WRITES_FILES: bool = true;

    fn writes(&self, ctx: &StageContext) -> Vec<PathBuf> {
        match self.init {
            Init::Random => vec![ctx.output_path(std::path::Path::new(&format!("model-{}", ctx.node)))],
            Init::Checkpoint => Vec::new(),
        }
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(ModelSource { config: self.clone(), dir: ctx.input_path(&self.path), ctx: ctx.clone() }))
    }
}

/// Whether `path` names a GGUF file (by its extension).
fn is_gguf(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

impl ModelConfigOptions {
    /// A GGUF path must be a readable GGUF file, loaded as a checkpoint.
    fn validate_gguf(&self, file: &std::path::Path) -> Vec<String> {
        if !file.is_file() {
            return vec![format!("option `path`: GGUF file {} does not exist", file.display())];
        }
        let mut problems = Vec::new();
        if self.init == Init::Random {
            problems.push("option `init`: a .gguf model brings its weights; `random` applies to model directories".into());
        }
        match GgufFile::open(file) {
            Ok(gguf) if gguf.get("general.architecture").and_then(|v| v.as_str()) != Some("llama") => {
                problems.push(format!("option `path`: {} is not a llama GGUF model", file.display()));
            }
            Ok(_) => {}
            Err(err) => problems.push(format!("option `path`: {err}")),
        }
        problems
    }
}

struct ModelSource {
    config: ModelConfigOptions,
    dir: PathBuf,
    ctx: StageContext,
}

impl Stage for ModelSource {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let dir = match self.config.init {
            Init::Checkpoint if is_gguf(&self.dir) => {
                let run_dir = self.ctx.run_dir.as_ref().ok_or_else(|| StageError::Invalid("a .gguf model needs a run directory".into()))?;
                let out = run_dir.join(format!("model-{}", self.ctx.node));
                let summary = convert_gguf(&self.dir, &out, &ConvertOptions::default())?;
                io.summary_mut().insert("converted_from".into(), self.dir.display().to_string().into());
                io.summary_mut().insert("parameters".into(), summary.parameters.into());
                out
            }
            Init::Checkpoint => self.dir.clone(),
            Init::Random => {
                let run_dir = self.ctx.run_dir.as_ref().ok_or_else(|| StageError::Invalid("random init needs a run directory".into()))?;
                let out = run_dir.join(format!("model-{}", self.ctx.node));
                let mut config = ModelConfig::load(&self.dir.join("config.json"))?;
                if let Some(theta) = self.config.rope_theta {
                    config.rope_theta = Some(theta);
                    if let Some(serde_json::Value::Object(params)) = config.rope_parameters.as_mut() {
                        params.insert("rope_theta".into(), theta.into());
                    }
                }
                let seed = self.config.seed ^ self.ctx.seed.rotate_left(7);
                let model = CausalLm::<longrl_backends::Cpu>::build(
                    &config,
                    &mut RandomInit::new(seed, self.config.init_std),
                    &Default::default(),
                )?;
                save_model(&model, &config, &out, SaveDtype::F32)?;
                copy_tokenizer_files(&self.dir, &out)?;
                io.summary_mut().insert("parameters".into(), config.num_params().into());
                out
            }
        };
        io.summary_mut().insert("dir".into(), dir.display().to_string().into());
        io.send_model("model", ModelRef { dir })
    }
}
