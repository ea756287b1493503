//! Errors of stages and of the standard library, each naming the file, line or option at fault.

use std::path::PathBuf;

/// Why a stage failed to check, build or run.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Another stage failed or the user pressed Ctrl-C; not a failure of this stage.
    #[error("cancelled")]
    Cancelled,
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data record could not be used.
    #[error("{}:{line}: {message}", path.display())]
    BadRecord { path: PathBuf, line: usize, message: String },
    /// The stage's options are inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// Anything else that stopped the stage, as a sentence.
    #[error("{0}")]
    Failed(String),
}

impl StageError {
    /// An I/O error on a path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    /// Whether this is only the echo of another stage's failure.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Self::Cancelled)
    }
}
