//! The generic engine: the Rhai recipe host, the plan and its validation, the threaded
//! executor, run directories and resume. It knows stages only through the registry and the
//! stage contract; it names no stage.

pub mod executor;
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
    let source = std::fs::read_to_string(path).map_err(|e| CheckError::Read(path.display().to_string(), e))?;
    let name = path.display().to_string();
    let plan = load_plan(&source, &name, registry, params)?;
    let valid = plan.validate(registry, &StageContext::for_check(base_dir))?;
    Ok((source, valid))
}

/// Why a recipe could not become a valid plan.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot read recipe {0}: {1}")]
    Read(String, #[source] std::io::Error),
    #[error("{0}")]
    Problems(#[from] Problems),
}
