//! The run directory `runs/<name>/`: the recipe as run, the plan, `metrics.jsonl`, one
//! summary per stage and `run.json`. A run never reuses another run's directory.

use std::path::{Path, PathBuf};

use longrl_stdlib::StageError;
use longrl_stdlib::fsutil::write_atomic;
use longrl_stdlib::metrics::Metrics;

use crate::dataflow::executor::RunReport;
use crate::dataflow::plan::ValidPlan;

/// A freshly created run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
    pub name: String,
}

/// The file a running process locks inside its run directory (see [`RunDir::lock`]).
pub const LOCK_FILE: &str = ".lock";

/// The first lines of a run's `params.yaml`.
const PARAMS_HEADER: &str = "# The parameters this run started with (the --params file's, then --set's over them).\n# `longrl run RECIPE --params` this file runs the same again.\n";

impl RunDir {
    /// Creates `root/<name>`. An explicit name that exists is an error; without a name the
    /// recipe's stem and the time are used, with a suffix if that exists too.
    pub fn create(root: &Path, name: Option<&str>, recipe: &Path) -> Result<Self, StageError> {
        std::fs::create_dir_all(root).map_err(|e| StageError::io(root, e))?;
        if let Some(name) = name {
            if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
                return Err(StageError::Invalid(format!("run name `{name}` must be a plain directory name")));
            }
            let path = root.join(name);
            return match std::fs::create_dir(&path) {
                Ok(()) => Ok(Self { path, name: name.to_string() }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(StageError::Invalid(format!(
                    "run directory {} already exists; pick another --name (a run never overwrites another)",
                    path.display()
                ))),
                Err(e) => Err(StageError::io(&path, e)),
            };
        }
        let stem = recipe.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
        let base = format!("{stem}-{}", timestamp());
        for attempt in 0..1000 {
            let name = if attempt == 0 { base.clone() } else { format!("{base}-{attempt}") };
            let path = root.join(&name);
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path, name }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(StageError::io(&path, e)),
            }
        }
        Err(StageError::Failed(format!("could not find a free run name like {base} in {}", root.display())))
    }

    /// An existing run directory, to resume.
    pub fn open(path: &Path) -> Result<Self, StageError> {
        if !path.join("run.json").is_file() {
            return Err(StageError::Invalid(format!("{} is not a run directory (it has no run.json)", path.display())));
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Self { path: path.to_path_buf(), name })
    }

    /// Saves the recipe text and the validated plan.
    /// Writes the recipe, its plan, `run.json` (backend, seed, parameters) and, when the run
    /// has parameters, `params.yaml` with their merged values (a `--params` file to run it again).
    pub fn record_inputs(&self, recipe_text: &str, plan: &ValidPlan, run_info: serde_json::Value) -> Result<(), StageError> {
        write_atomic(&self.path.join("recipe.rhai"), recipe_text.as_bytes())?;
        let plan_json = serde_json::to_vec_pretty(&plan.to_json()).map_err(|e| StageError::Failed(e.to_string()))?;
        write_atomic(&self.path.join("plan.json"), &plan_json)?;
        if let Some(params) = run_info["params"].as_object().filter(|params| !params.is_empty()) {
            let yaml = serde_yaml::to_string(params).map_err(|e| StageError::Failed(format!("cannot write params.yaml: {e}")))?;
            let text = format!("{PARAMS_HEADER}{yaml}");
            write_atomic(&self.path.join("params.yaml"), text.as_bytes())?;
        }
        self.write_json("run.json", &run_info)
    }

    /// Takes the run directory for this process: an exclusive lock on its `.lock` file, held
    /// until the returned file is dropped (the OS drops it when the process dies, SIGKILL
    /// included). A second process on the same run, a resume while the run still goes, is
    /// refused instead of writing the same checkpoints and metrics.
    pub fn lock(&self) -> Result<std::fs::File, StageError> {
        let path = self.path.join(LOCK_FILE);
        let file =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| StageError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(StageError::Invalid(format!(
                "run directory {} is in use by another longrl process (it holds {}); wait for it to end or stop it first",
                self.path.display(),
                path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(StageError::io(&path, e)),
        }
    }

    /// Opens `metrics.jsonl` for appending.
    pub fn metrics(&self) -> Result<Metrics, StageError> {
        Metrics::open(&self.path.join("metrics.jsonl"))
    }

    /// Writes `stages/<node>-<stage>.json` for each stage and `report.json` for the run.
    pub fn record_report(&self, report: &RunReport) -> Result<(), StageError> {
        for stage in &report.stages {
            let file = format!("stages/{}.json", stage.label.replace('#', "-"));
            self.write_json(&file, &serde_json::to_value(stage).map_err(|e| StageError::Failed(e.to_string()))?)?;
        }
        self.write_json("report.json", &serde_json::to_value(report).map_err(|e| StageError::Failed(e.to_string()))?)
    }

    fn write_json(&self, relative: &str, value: &serde_json::Value) -> Result<(), StageError> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| StageError::Failed(e.to_string()))?;
        write_atomic(&self.path.join(relative), &bytes)
    }
}

/// `YYYYMMDD-HHMMSS` in UTC, from the system clock (no time-zone database needed).
fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Gregorian date of a day count since 1970-01-01 (H. Hinnant's civil-from-days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_from_day_counts() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_786), (2026, 11, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn an_existing_named_run_is_refused_and_unnamed_runs_get_fresh_directories() {
        let root = tempfile::tempdir().expect("tempdir");
        let recipe = Path::new("scripts/demo.rhai");
        let first = RunDir::create(root.path(), Some("a"), recipe).expect("first");
        assert!(first.path.is_dir());
        let err = RunDir::create(root.path(), Some("a"), recipe).expect_err("exists");
        assert!(err.to_string().contains("already exists"));
        let held = first.lock().expect("the first lock");
        let again = RunDir::open(&first.path);
        assert!(again.is_err(), "no run.json yet");
        let err = first.lock().expect_err("a second lock on the same run");
        assert!(err.to_string().contains("in use by another longrl process"), "{err}");
        drop(held);
        first.lock().expect("free again once dropped");
        let one = RunDir::create(root.path(), None, recipe).expect("auto");
        let two = RunDir::create(root.path(), None, recipe).expect("auto");
        assert_ne!(one.path, two.path);
        assert!(one.name.starts_with("demo-"));
    }
}
