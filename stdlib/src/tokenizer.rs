//! Tokenizers: Hugging Face `tokenizer.json` files loaded with the `tokenizers` crate.

use std::path::{Path, PathBuf};

use crate::error::StageError;

/// A loaded `tokenizer.json`, with the path it came from for messages.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `path`, which is a `tokenizer.json` or a directory holding one.
    pub fn load(path: &Path) -> Result<Self, StageError> {
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        if !file.is_file() {
            return Err(StageError::Failed(format!("tokenizer file {} does not exist", file.display())));
        }
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| StageError::Failed(format!("{}: not a valid tokenizer.json: {e}", file.display())))?;
        Ok(Self { inner, path: file })
    }

    /// The file this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, StageError> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| StageError::Failed(format!("tokenizer {}: {e}", self.path.display())))
    }

    /// Token counts of many texts, encoded in parallel.
    pub fn count_batch(&self, texts: Vec<String>) -> Result<Vec<usize>, StageError> {
        self.inner
            .encode_batch_fast(texts, false)
            .map(|encodings| encodings.iter().map(|e| e.get_ids().len()).collect())
            .map_err(|e| StageError::Failed(format!("tokenizer {}: {e}", self.path.display())))
    }

    /// Text of `ids`; special tokens are kept when `skip_special` is false.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, StageError> {
        self.inner.decode(ids, skip_special).map_err(|e| StageError::Failed(format!("tokenizer {}: {e}", self.path.display())))
    }

    /// The id of a token string (special or not), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The largest id in the vocabulary, added tokens included (ids need not be dense, so
    /// this can exceed [`Tokenizer::vocab_size`]).
    pub fn max_id(&self) -> Option<u32> {
        self.inner.get_vocab(true).into_values().max()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
