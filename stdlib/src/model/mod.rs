//! The model runtime: Qwen2/Llama-family transformers on Burn, Hugging Face checkpoints in
//! and out, chat templates, KV-cache generation for groups, and log-probs for training.

pub mod attention;
pub mod batch_decode;
pub mod batch_kv;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod device_sampling;
pub mod flash;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod head;
pub mod llama;
pub mod precision;
pub mod qwen2;
pub mod recompute;
pub mod rope;
pub mod sampling;
pub mod score;
pub mod transformer;

use std::path::{Path, PathBuf};

pub use attention::AttentionOptions;
pub use checkpoint::{SaveDtype, load_model, save_model};
pub use config::{Architecture, ModelConfig};
pub use transformer::{CausalLm, ForwardArgs, KvCache, Recompute};

use crate::error::StageError;

/// What went wrong loading, running or saving a model; each names the file or tensor.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid model config: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("{0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
}

impl ModelError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io { path: path.as_ref().to_path_buf(), source }
    }

    pub fn checkpoint(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Self::Checkpoint { path: path.as_ref().to_path_buf(), message: message.into() }
    }
}

impl From<ModelError> for StageError {
    fn from(err: ModelError) -> Self {
        StageError::Failed(err.to_string())
    }
}
