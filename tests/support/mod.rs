//! Helpers shared by the end-to-end tests: where the workspace is, and running a recipe
//! text in a directory the way `longrl run` does (metrics file included).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use longrl_engine::dataflow::executor::{RunOptions, RunReport};
use longrl_engine::dataflow::recipe::Params;
use longrl_engine::{execute, load_plan};
use longrl_stdlib::{CancelToken, Registry, StageContext};

pub mod serving;

/// The workspace root: from `CARGO_MANIFEST_DIR` at run time when it is set (cargo sets it for
/// `cargo test`; `scripts/device_check.sh --prebuilt` sets it for test executables built on
/// another machine), else from where the test was compiled.
pub fn workspace() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().expect("workspace root").to_path_buf()
}

/// Device 0 of a GPU backend for a test, when it answers; else `None`, saying that `what` is
/// skipped and why. A missing device fails the test instead under `LONGRL_REQUIRE_DEVICE=1`
/// (as `scripts/device_check.sh` sets), so that a device check cannot pass by skipping.
pub fn device_or_skip(kind: longrl_backends::BackendKind, what: &str) -> Option<longrl_backends::DeviceSpec> {
    let spec = longrl_backends::DeviceSpec::new(kind, 0);
    match longrl_backends::probe(spec) {
        Ok(()) => Some(spec),
        Err(err) => {
            assert!(std::env::var("LONGRL_REQUIRE_DEVICE").as_deref() != Ok("1"), "no {kind} device for {what}: {err}");
            eprintln!("skipping {what}: {err}");
            None
        }
    }
}

/// A recipe with `{tiny}` replaced by the embedded tiny model's directory.
pub fn with_tiny(recipe: &str) -> String {
    recipe.replace("{tiny}", &workspace().join("examples/models/tiny").display().to_string())
}

/// Options for running in `dir`: outputs and metrics.jsonl there.
pub fn options_in(dir: &Path) -> RunOptions {
    let mut options = RunOptions::in_dir(dir);
    options.run_dir = Some(dir.to_path_buf());
    options.metrics = longrl_stdlib::metrics::Metrics::open(&dir.join("metrics.jsonl")).expect("metrics");
    options
}

/// Checks and runs `recipe` in `dir` with `options`; the run must succeed.
pub fn run_with(recipe: &str, name: &str, dir: &Path, options: &RunOptions, cancel: &CancelToken) -> RunReport {
    let registry = Registry::standard();
    let plan = load_plan(recipe, name, &registry, &Params::new()).expect("recipe");
    let plan = plan.validate(&registry, &StageContext::for_check(dir)).expect("valid");
    let report = execute(&plan, &registry, options, cancel).expect("runs");
    assert!(report.succeeded(), "{report}");
    report
}

/// Checks and runs `recipe` in `dir`; the run must succeed.
pub fn run_recipe(recipe: &str, name: &str, dir: &Path) -> RunReport {
    run_with(recipe, name, dir, &options_in(dir), &CancelToken::new())
}
