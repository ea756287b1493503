//! Stage checkpoints for exact resume. A training stage saves its whole state every few
//! steps into `runs/<name>/checkpoints/<stage>-<node>/step-NNNNNN/` (weights as f32
//! safetensors with the tokenizer, optimizer moments, and `state.json`: step, cursors,
//! counters, metrics lines logged), written in a temporary directory, renamed into place,
//! and only then named by `latest.json`, so an interrupted write leaves the previous
//! checkpoint in force. A finished stage writes `done.json` (what it published and its
//! summary) so a resumed run republishes instead of recomputing.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::driver::SavedState;

use crate::error::StageError;
use crate::fsutil::write_atomic;
use crate::model::checkpoint::{SaveDtype, copy_tokenizer_files};
use crate::model::config::ModelConfig;
use crate::model::{CausalLm, save_model};
use crate::train::{OPTIMIZER_FILE, Trainer};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

/// What a finished stage published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    /// The model directory it sent on its `model` output, if any.
    pub model: Option<PathBuf>,
    /// Its summary figures.
    pub summary: serde_json::Map<String, Value>,
    /// Metrics lines it logged in all.
    pub metrics_lines: usize,
}

/// Fills a checkpoint directory of a training stage: the weights in `save_dtype` with the
/// tokenizer files of `tokenizer_dir` (a loadable Hugging Face model), and the optimizer
/// state: the moments and, when the weights were saved below f32, the f32 master weights
/// (see [`write_master_weights`]), so that a resumed run continues exactly.
pub fn write_training_state<B: AutodiffBackend<InnerBackend: longrl_backends::Kernels>>(
    dir: &Path,
    trainer: &Trainer<B, CausalLm<B>>,
    config: &ModelConfig,
    tokenizer_dir: &Path,
    save_dtype: SaveDtype,
) -> Result<(), StageError> {
    let model = trainer.model().valid();
    save_model(&model, config, dir, save_dtype)?;
    write_master_weights(&model, config, dir, save_dtype)?;
    copy_tokenizer_files(tokenizer_dir, dir)?;
    trainer.save_state(&dir.join(OPTIMIZER_FILE))
}

/// The folder, beside a model's weights and `optimizer.bin`, that holds the f32 master
/// weights (config.json + model.safetensors) when the weights were saved in bf16 or f16.
pub const MASTER_DIR: &str = "master";

/// Writes the f32 master weights into `dir/master/` when `save_dtype` rounds the weights
/// saved in `dir` (part of the optimizer state: a training stage that continues from `dir`
/// reads them instead, see [`load_training_weights`]); with f32 weights, nothing.
pub fn write_master_weights<B: burn::tensor::backend::Backend>(
    model: &CausalLm<B>,
    config: &ModelConfig,
    dir: &Path,
    save_dtype: SaveDtype,
) -> Result<(), StageError> {
    if save_dtype == SaveDtype::F32 {
        return Ok(());
    }
    save_model(model, config, &dir.join(MASTER_DIR), SaveDtype::F32)?;
    Ok(())
}

/// The weights a training stage continues from in `dir`: the f32 master weights of
/// `dir/master/` when present (the weights beside them are rounded), else `dir`'s own.
pub fn load_training_weights<B: burn::tensor::backend::Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(ModelConfig, CausalLm<B>), StageError> {
    let master = dir.join(MASTER_DIR);
    let from = if master.join("model.safetensors").is_file() { master } else { dir.to_path_buf() };
    Ok(crate::model::load_model::<B>(&from, device)?)
}

/// The pointer to a stage's newest complete checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Latest {
    dir: String,
    step: usize,
}

/// The directory of a stage's checkpoints: `checkpoints/<stage>-<node>` for label
/// `stage#node`.
pub fn stage_dir(run_dir: &Path, label: &str) -> PathBuf {
    run_dir.join("checkpoints").join(label.replace('#', "-"))
}

/// Metrics lines a stage may keep on resume: all when it finished, those logged before its
/// newest checkpoint when it has one, none otherwise.
pub fn metrics_lines_to_keep(run_dir: &Path, label: &str) -> Result<usize, StageError> {
    let checkpoints = StageCheckpoints { root: stage_dir(run_dir, label), keep: 1 };
    if let Some(done) = checkpoints.done()? {
        return Ok(done.metrics_lines);
    }
    Ok(match checkpoints.latest()? {
        Some((_, state)) => state.get("metrics_lines").and_then(Value::as_u64).unwrap_or(0) as usize,
        None => 0,
    })
}

/// One stage's checkpoints.
#[derive(Debug, Clone)]
pub struct StageCheckpoints {
    root: PathBuf,
    keep: usize,
}

/// Whether `name` is a checkpoint directory's name, `step-` and digits: a pointer naming
/// anything else (a path, `..`) would read outside the stage's checkpoints.
fn is_step_name(name: &str) -> bool {
    name.strip_prefix("step-").is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `path` lies inside `dir`: lexically (no `..`), and, when both exist, once links
/// are resolved.
pub(crate) fn lies_inside(path: &Path, dir: &Path) -> bool {
    use std::path::Component;
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return false;
    }
    match (path.canonicalize(), dir.canonicalize()) {
        (Ok(real), Ok(real_dir)) => real.starts_with(real_dir),
        _ => path.starts_with(dir),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StageError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            StageError::Failed(format!(
                "{}: corrupt checkpoint file ({e}); delete the stage's checkpoints to start it over",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StageError::io(path, e)),
    }
}

impl StageCheckpoints {
    /// The checkpoints of the stage `label` in `run_dir`, keeping the newest `keep`.
    pub fn new(run_dir: &Path, label: &str, keep: usize) -> Self {
        Self { root: stage_dir(run_dir, label), keep: keep.max(1) }
    }

    /// What the stage published, when it finished in an earlier attempt of this run. A model
    /// directory outside the run directory is taken from this run when it has one of that
    /// name (the run was moved or copied), and refused otherwise (the file was edited).
    pub fn done(&self) -> Result<Option<Done>, StageError> {
        let path = self.root.join("done.json");
        let Some(mut done) = read_json::<Done>(&path)? else { return Ok(None) };
        let run_dir = self.root.parent().and_then(Path::parent).unwrap_or(&self.root);
        if let Some(model) = done.model.as_ref().filter(|model| !lies_inside(model, run_dir)) {
            let own = model.file_name().map(|name| run_dir.join(name)).filter(|own| own.is_dir() && lies_inside(own, run_dir));
            let Some(own) = own else {
                return Err(StageError::Failed(format!(
                    "{}: names the model {}, outside the run directory {} (which has no directory of that name); refusing it (delete the file to redo the stage)",
                    path.display(),
                    model.display(),
                    run_dir.display()
                )));
            };
            tracing::info!(recorded = %model.display(), used = %own.display(), "the run was moved or copied; using its own copy of the model");
            done.model = Some(own);
        }
        Ok(Some(done))
    }

    /// Records that the stage finished.
    pub fn mark_done(&self, done: &Done) -> Result<(), StageError> {
        let json = serde_json::to_vec_pretty(done).map_err(|e| StageError::Failed(e.to_string()))?;
        write_atomic(&self.root.join("done.json"), &json)
    }

    /// The newest complete checkpoint: its directory and raw state.
    pub fn latest(&self) -> Result<Option<(PathBuf, Value)>, StageError> {
        let pointer = self.root.join("latest.json");
        let Some(latest) = read_json::<Latest>(&pointer)? else { return Ok(None) };
        let dir = self.root.join(&latest.dir);
        if !is_step_name(&latest.dir) || !lies_inside(&dir, &self.root) {
            return Err(StageError::Failed(format!(
                "{}: points at `{}`, which is not a checkpoint of this stage (a step-NNNNNN directory beside it); refusing to read outside the run directory",
                pointer.display(),
                latest.dir
            )));
        }
        let state_path = dir.join("state.json");
        let state: Value = read_json(&state_path)?.ok_or_else(|| {
            StageError::Failed(format!("{}: missing; the checkpoint {} is incomplete", state_path.display(), dir.display()))
        })?;
        Ok(Some((dir, state)))
    }

    /// The newest complete checkpoint with its state typed as a model stage saved it.
    pub fn latest_state<S: DeserializeOwned>(&self) -> Result<Option<(PathBuf, SavedState<S>)>, StageError> {
        let Some((dir, state)) = self.latest()? else { return Ok(None) };
        let saved = serde_json::from_value(state).map_err(|e| {
            StageError::Failed(format!(
                "{}: unreadable checkpoint state ({e}); delete the stage's checkpoints to start it over",
                dir.join("state.json").display()
            ))
        })?;
        Ok(Some((dir, saved)))
    }

    /// Saves a checkpoint of `step`: `write` fills a fresh directory and returns the state,
    /// which goes to its state.json; then the directory is renamed into place and made the
    /// latest, and older ones beyond `keep` are removed. A staging directory a killed save
    /// left (`.step-NNNNNN.*`) is removed when the run resumes.
    pub fn save<T: Serialize>(&self, step: usize, write: impl FnOnce(&Path) -> Result<T, StageError>) -> Result<PathBuf, StageError> {
        std::fs::create_dir_all(&self.root).map_err(|e| StageError::io(&self.root, e))?;
        let staging = tempfile::Builder::new()
            .prefix(&format!(".step-{step:06}."))
            .tempdir_in(&self.root)
            .map_err(|e| StageError::io(&self.root, e))?;
        let state = write(staging.path())?;
        let json = serde_json::to_vec_pretty(&state).map_err(|e| StageError::Failed(e.to_string()))?;
        write_atomic(&staging.path().join("state.json"), &json)?;
        let name = format!("step-{step:06}");
        let dir = self.root.join(&name);
        if dir.exists() {
            // A resumed run saving its step again: `latest.json` must not name the directory
            // while it is replaced, or a kill meanwhile would leave no checkpoint to resume.
            self.point_latest_away_from(&name)?;
            std::fs::remove_dir_all(&dir).map_err(|e| StageError::io(&dir, e))?;
        }
        let staged = staging.keep();
        std::fs::rename(&staged, &dir).map_err(|e| StageError::io(&dir, e))?;
        let latest = serde_json::to_vec(&Latest { dir: name.clone(), step }).map_err(|e| StageError::Failed(e.to_string()))?;
        write_atomic(&self.root.join("latest.json"), &latest)?;
        self.prune(&name)?;
        Ok(dir)
    }

    /// When `latest.json` names the checkpoint `name`, makes it name the newest other
    /// complete one, or removes it when there is none.
    fn point_latest_away_from(&self, name: &str) -> Result<(), StageError> {
        let pointer = self.root.join("latest.json");
        if !read_json::<Latest>(&pointer)?.is_some_and(|latest| latest.dir == name) {
            return Ok(());
        }
        let mut others: Vec<(usize, String)> = std::fs::read_dir(&self.root)
            .map_err(|e| StageError::io(&self.root, e))?
            .filter_map(|entry| entry.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|other| other != name && is_step_name(other) && self.root.join(other).join("state.json").is_file())
            .filter_map(|other| Some((other.strip_prefix("step-")?.parse().ok()?, other)))
            .collect();
        others.sort();
        match others.pop() {
            Some((step, dir)) => {
                let json = serde_json::to_vec(&Latest { dir, step }).map_err(|e| StageError::Failed(e.to_string()))?;
                write_atomic(&pointer, &json)
            }
            None => std::fs::remove_file(&pointer).map_err(|e| StageError::io(&pointer, e)),
        }
    }

    /// Removes all but the newest `keep` step directories (never `current`).
    fn prune(&self, current: &str) -> Result<(), StageError> {
        let mut steps: Vec<String> = std::fs::read_dir(&self.root)
            .map_err(|e| StageError::io(&self.root, e))?
            .filter_map(|entry| entry.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|name| name.starts_with("step-"))
            .collect();
        steps.sort();
        let excess = steps.len().saturating_sub(self.keep);
        for name in steps.into_iter().take(excess).filter(|n| n != current) {
            let path = self.root.join(name);
            std::fs::remove_dir_all(&path).map_err(|e| StageError::io(&path, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_weights(bytes: &'static [u8], state: Value) -> impl FnOnce(&Path) -> Result<Value, StageError> {
        move |dir| write_atomic(&dir.join("weights.bin"), bytes).map(|()| state)
    }

    #[test]
    fn the_latest_complete_checkpoint_wins_and_old_ones_are_pruned() {
        let run = tempfile::tempdir().expect("tempdir");
        let checkpoints = StageCheckpoints::new(run.path(), "sft#3", 2);
        assert!(checkpoints.latest().expect("reads").is_none());
        for step in [1, 2, 3] {
            checkpoints.save(step, write_weights(b"w", serde_json::json!({ "step": step }))).expect("saves");
        }
        let (dir, state) = checkpoints.latest().expect("reads").expect("a checkpoint");
        assert_eq!(state["step"], 3);
        assert!(dir.ends_with("step-000003"));
        let mut left: Vec<String> = std::fs::read_dir(stage_dir(run.path(), "sft#3"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("step-"))
            .collect();
        left.sort();
        assert_eq!(left, vec!["step-000002", "step-000003"]);
    }

    #[test]
    fn a_write_that_fails_midway_leaves_the_previous_checkpoint_in_force() {
        let run = tempfile::tempdir().expect("tempdir");
        let checkpoints = StageCheckpoints::new(run.path(), "rl_phase#4", 3);
        checkpoints.save(1, write_weights(b"first", serde_json::json!({ "step": 1 }))).expect("saves");
        let failed = checkpoints.save(2, |dir| -> Result<Value, StageError> {
            write_atomic(&dir.join("weights.bin"), b"half")?;
            Err(StageError::Failed("disk full".into()))
        });
        assert!(failed.is_err());
        let (dir, state) = checkpoints.latest().expect("reads").expect("still a checkpoint");
        assert_eq!(state["step"], 1);
        assert_eq!(std::fs::read(dir.join("weights.bin")).expect("weights"), b"first");
        assert!(!stage_dir(run.path(), "rl_phase#4").join("step-000002").exists());
    }

    #[test]
    fn a_step_saved_again_is_replaced_whole_and_never_named_while_it_is_replaced() {
        let run = tempfile::tempdir().expect("tempdir");
        let checkpoints = StageCheckpoints::new(run.path(), "sft#2", 3);
        let root = stage_dir(run.path(), "sft#2");
        checkpoints.save(1, write_weights(b"one", serde_json::json!({ "step": 1 }))).expect("saves");
        checkpoints.save(2, write_weights(b"old", serde_json::json!({ "step": 2 }))).expect("saves");
        std::fs::write(root.join("step-000002").join("stray.bin"), b"from the old save").expect("write");
        // While step 2 is replaced, latest.json names step 1.
        checkpoints.point_latest_away_from("step-000002").expect("points away");
        let (dir, state) = checkpoints.latest().expect("reads").expect("a checkpoint");
        assert_eq!((dir.ends_with("step-000001"), &state["step"]), (true, &serde_json::json!(1)));
        checkpoints.save(2, write_weights(b"new", serde_json::json!({ "step": 2, "again": true }))).expect("saves again");
        let (dir, state) = checkpoints.latest().expect("reads").expect("a checkpoint");
        assert_eq!(state["again"], true);
        assert_eq!(std::fs::read(dir.join("weights.bin")).expect("weights"), b"new");
        assert!(!dir.join("stray.bin").exists(), "nothing of the old save is kept");
        // With no other checkpoint, nothing is named meanwhile.
        let single = StageCheckpoints::new(run.path(), "sft#5", 1);
        single.save(4, write_weights(b"w", serde_json::json!({ "step": 4 }))).expect("saves");
        single.point_latest_away_from("step-000004").expect("points away");
        assert!(single.latest().expect("reads").is_none());
        single.save(4, write_weights(b"w2", serde_json::json!({ "step": 4 }))).expect("saves again");
        assert!(single.latest().expect("reads").is_some());
    }

    #[test]
    fn a_pointer_outside_the_run_directory_is_refused() {
        let run = tempfile::tempdir().expect("tempdir");
        let checkpoints = StageCheckpoints::new(run.path(), "sft#1", 1);
        checkpoints.save(1, write_weights(b"w", serde_json::json!({}))).expect("saves");
        let latest = stage_dir(run.path(), "sft#1").join("latest.json");
        for dir in ["../../../etc", "/etc", "step-000001/../../..", "", "step-"] {
            std::fs::write(&latest, serde_json::json!({ "dir": dir, "step": 1 }).to_string()).expect("forge");
            let error = checkpoints.latest().expect_err(dir).to_string();
            assert!(error.contains("latest.json") && error.contains("refusing"), "{dir}: {error}");
        }
        let done = stage_dir(run.path(), "sft#1").join("done.json");
        std::fs::write(&done, serde_json::json!({ "model": "/etc", "summary": {}, "metrics_lines": 0 }).to_string()).expect("forge");
        let error = checkpoints.done().expect_err("outside").to_string();
        assert!(error.contains("done.json") && error.contains("outside the run directory"), "{error}");
        // A copied run: the model recorded in the original is taken from the copy.
        std::fs::create_dir_all(run.path().join("sft-1")).expect("model dir");
        let original = serde_json::json!({ "model": "/elsewhere/runs/original/sft-1", "summary": {}, "metrics_lines": 0 });
        std::fs::write(&done, original.to_string()).expect("copied");
        let done = checkpoints.done().expect("relocated").expect("done");
        assert_eq!(done.model, Some(run.path().join("sft-1")));
    }

    #[test]
    fn a_corrupt_pointer_names_its_file() {
        let run = tempfile::tempdir().expect("tempdir");
        let checkpoints = StageCheckpoints::new(run.path(), "sft#1", 1);
        checkpoints.save(1, write_weights(b"w", serde_json::json!({}))).expect("saves");
        let latest = stage_dir(run.path(), "sft#1").join("latest.json");
        std::fs::write(&latest, "{\"dir\": ").expect("corrupt");
        let error = checkpoints.latest().expect_err("corrupt").to_string();
        assert!(error.contains("latest.json") && error.contains("corrupt"), "{error}");
    }
}
