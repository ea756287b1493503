//! The generic engine: the Rhai recipe host, the plan and its validation, the threaded
//! executor, run directories and resume. It knows stages only through the registry and the
//! stage contract; it names no stage.

pub mod executor;
pub mod params;
pub mod plan;
pub mod recipe;
pub mod resume;
pub mod rundir;

use std::path::Path;

use longrl_stdlib::{Registry, StageContext};

pub use executor::{RunOptions, RunReport, execute};
pub use plan::{Plan, Problems, ValidPlan};
pub use recipe::{Params, load_plan};

/// Reads, evaluates and validates a recipe file, reporting every problem at once.
pub fn check_recipe(path: &Path, registry: &Registry, params: &Params, base_dir: &Path) -> Result<(String, ValidPlan), CheckError> {
    let source = read_recipe(path)?;
    let name = path.display().to_string();
    let plan = load_plan(&source, &name, registry, params)?;
    let valid = plan.validate(registry, &StageContext::for_check(base_dir))?;
    Ok((source, valid))
}

/// The text of a recipe file: UTF-8 (a leading byte-order mark is skipped), not empty.
pub fn read_recipe(path: &Path) -> Result<String, CheckError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| CheckError::Read(name.clone(), e.to_string()))?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let (line, column) = line_column(&bytes[..e.valid_up_to()]);
            let byte = bytes.get(e.valid_up_to()).copied().unwrap_or(0);
            return Err(CheckError::NotUtf8 { recipe: name, line, column, byte });
        }
    };
    if text.trim().is_empty() {
        return Err(CheckError::Empty(name));
    }
    Ok(text.to_string())
}

/// The 1-based line and column just after `text` (columns count characters).
fn line_column(text: &[u8]) -> (usize, usize) {
    let line = text.iter().filter(|&&b| b == b'\n').count() + 1;
    let last = text.iter().rposition(|&b| b == b'\n').map_or(text, |at| &text[at + 1..]);
    (line, String::from_utf8_lossy(last).chars().count() + 1)
}

/// Why a recipe could not become a valid plan.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot read recipe {0}: {1}")]
    Read(String, String),
    #[error("{recipe}:{line}:{column}: the recipe is not UTF-8 text (byte 0x{byte:02x}); save it as UTF-8")]
    NotUtf8 { recipe: String, line: usize, column: usize, byte: u8 },
    #[error("recipe {0} is empty: a recipe declares at least one stage")]
    Empty(String),
    #[error("{0}")]
    Problems(#[from] Problems),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipe_that_is_not_utf8_names_the_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("latin1.rhai");
        std::fs::write(&path, b"let a = 1;\nlet caf\xe9 = 2;\n").expect("write");
        let err = read_recipe(&path).expect_err("not utf-8").to_string();
        assert!(err.contains("latin1.rhai:2:8:") && err.contains("byte 0xe9"), "{err}");
        std::fs::write(&path, b"\xef\xbb\xbflet a = 1;").expect("write");
        assert_eq!(read_recipe(&path).expect("a BOM is skipped"), "let a = 1;");
        std::fs::write(&path, b" \n\t\n").expect("write");
        assert!(read_recipe(&path).expect_err("empty").to_string().contains("is empty"));
    }
}
