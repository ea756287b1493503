//! Resuming a killed run: the recipe's plan must be the one the run started with (every
//! difference is named, closures' bodies and captured values included), `metrics.jsonl` is
//! cut back to what each stage logged before its last checkpoint, so the resumed stages log
//! the rest exactly once, and the half-written files a kill left behind are removed.

use std::collections::BTreeMap;
use std::path::Path;

use longrl_stdlib::StageError;
use longrl_stdlib::checkpoint::metrics_lines_to_keep;
use longrl_stdlib::fsutil::write_atomic;
use serde_json::Value;

/// Differences between the plan a run started with and the plan of the recipe now, as
/// sentences; empty when the run can resume.
pub fn plan_changes(saved: &Value, now: &Value) -> Vec<String> {
    let mut changes = Vec::new();
    let nodes = |plan: &Value| plan["nodes"].as_array().cloned().unwrap_or_default();
    let (before, after) = (nodes(saved), nodes(now));
    if before.len() != after.len() {
        changes.push(format!("the run had {} stages, the recipe now declares {}", before.len(), after.len()));
    }
    for (old, new) in before.iter().zip(&after) {
        let label = format!("{}#{}", old["stage"].as_str().unwrap_or("?"), old["id"]);
        if old["stage"] != new["stage"] {
            changes.push(format!("{label} is now a `{}` stage", new["stage"].as_str().unwrap_or("?")));
            continue;
        }
        let (Some(a), Some(b)) = (old["options"].as_object(), new["options"].as_object()) else {
            if old["options"] != new["options"] {
                changes.push(format!("{label}: options changed from {} to {}", old["options"], new["options"]));
            }
            continue;
        };
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for key in keys {
            match (a.get(key), b.get(key)) {
                (Some(x), Some(y)) if x != y => changes.push(format!("{label}: option `{key}` changed from {x} to {y}")),
                (Some(x), None) => changes.push(format!("{label}: option `{key}` (was {x}) was removed")),
                (None, Some(y)) => changes.push(format!("{label}: option `{key}` = {y} was added")),
                _ => {}
            }
        }
    }
    if saved["edges"] != now["edges"] && before.len() == after.len() {
        changes.push("the stages are connected differently".into());
    }
    changes.extend(closure_changes(saved, now));
    changes
}

/// Closures whose fingerprint (body and captured values) differs; nothing for a plan saved
/// before plans recorded closures.
fn closure_changes(saved: &Value, now: &Value) -> Vec<String> {
    let (Some(before), Some(after)) = (saved["closures"].as_array(), now["closures"].as_array()) else { return Vec::new() };
    if before.len() != after.len() {
        return vec![format!("the recipe had {} closures, it now has {}", before.len(), after.len())];
    }
    before
        .iter()
        .zip(after)
        .enumerate()
        .filter(|(_, (old, new))| old["fingerprint"] != new["fingerprint"])
        .map(|(i, (_, new))| {
            format!(
                "closure #{i} ({}) changed: its body, its place in the recipe or a value it captures",
                new["at"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// Removes what a killed attempt left half-written in the run directory: atomic writes'
/// temporary files (`.NAME.*.tmp`) and checkpoint staging directories (`.step-NNNNNN.*`),
/// neither of which is ever read. Returns how many were removed. Links are not followed.
pub fn remove_leftovers(run_dir: &Path) -> Result<usize, StageError> {
    let mut removed = 0;
    let mut pending = vec![run_dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| StageError::io(&dir, e))? {
            let entry = entry.map_err(|e| StageError::io(&dir, e))?;
            let (path, name) = (entry.path(), entry.file_name().to_string_lossy().into_owned());
            let kind = entry.file_type().map_err(|e| StageError::io(&path, e))?;
            if kind.is_dir() && name.starts_with(".step-") {
                std::fs::remove_dir_all(&path).map_err(|e| StageError::io(&path, e))?;
                removed += 1;
            } else if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() && name.starts_with('.') && name.ends_with(".tmp") {
                std::fs::remove_file(&path).map_err(|e| StageError::io(&path, e))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Rewrites `metrics.jsonl` keeping, per stage, the lines it logged before its last
/// checkpoint (all of a finished stage's, none of a stage without checkpoints). Returns the
/// number of lines kept.
pub fn rewind_metrics(run_dir: &Path, labels: &[String]) -> Result<usize, StageError> {
    let path = run_dir.join("metrics.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StageError::io(&path, e)),
    };
    let mut allowed: BTreeMap<&str, usize> = BTreeMap::new();
    for label in labels {
        allowed.insert(label, metrics_lines_to_keep(run_dir, label)?);
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = String::new();
    let mut kept = 0;
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            // A line cut short by the kill.
            tracing::warn!("{}:{}: dropping a partial metrics line", path.display(), index + 1);
            continue;
        };
        let stage = value["stage"].as_str().unwrap_or_default().to_string();
        let count = seen.entry(stage.clone()).or_default();
        *count += 1;
        if *count <= allowed.get(stage.as_str()).copied().unwrap_or(0) {
            out.push_str(line);
            out.push('\n');
            kept += 1;
        }
    }
    write_atomic(&path, out.as_bytes())?;
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plan_changes_name_what_changed() {
        let saved = json!({ "nodes": [{ "id": 0, "stage": "sft", "options": { "lr": 0.001, "epochs": 1 } }], "edges": [] });
        assert!(plan_changes(&saved, &saved).is_empty());
        let now = json!({ "nodes": [{ "id": 0, "stage": "sft", "options": { "lr": 0.002, "seed": 3 } }], "edges": [] });
        let changes = plan_changes(&saved, &now);
        assert!(changes.iter().any(|c| c.contains("sft#0: option `lr` changed from 0.001 to 0.002")), "{changes:?}");
        assert!(changes.iter().any(|c| c.contains("`epochs` (was 1) was removed")), "{changes:?}");
        assert!(changes.iter().any(|c| c.contains("`seed` = 3 was added")), "{changes:?}");
        let more =
            json!({ "nodes": [{ "id": 0, "stage": "sft", "options": {} }, { "id": 1, "stage": "evaluate", "options": {} }], "edges": [] });
        assert!(plan_changes(&saved, &more).iter().any(|c| c.contains("had 1 stages")));

        let with =
            |fingerprint: &str| json!({ "nodes": [], "edges": [], "closures": [{ "at": "r.rhai:3:9", "fingerprint": fingerprint }] });
        assert!(plan_changes(&with("anon$1()"), &with("anon$1()")).is_empty());
        let changes = plan_changes(&with("anon$1()"), &with("anon$2()"));
        assert!(changes.iter().any(|c| c.contains("closure #0 (r.rhai:3:9) changed")), "{changes:?}");
        let older = json!({ "nodes": [], "edges": [] });
        assert!(plan_changes(&older, &with("anon$1()")).is_empty(), "plans saved before closures were recorded still resume");
    }

    #[test]
    fn leftovers_of_a_kill_are_removed_and_nothing_else() {
        let run = tempfile::tempdir().expect("tempdir");
        let stage = run.path().join("checkpoints/sft-4");
        std::fs::create_dir_all(stage.join("step-000002")).expect("dirs");
        std::fs::create_dir_all(stage.join(".step-000004.Xy12")).expect("dirs");
        std::fs::write(stage.join(".step-000004.Xy12/model.safetensors"), b"half").expect("write");
        std::fs::create_dir_all(run.path().join("sft-4")).expect("dirs");
        std::fs::write(run.path().join("sft-4/.model.safetensors.Ab3.tmp"), b"half").expect("write");
        std::fs::write(run.path().join("sft-4/model.safetensors"), b"whole").expect("write");
        std::fs::write(run.path().join(".lock"), b"").expect("write");
        std::fs::write(run.path().join("metrics.jsonl"), b"").expect("write");
        assert_eq!(remove_leftovers(run.path()).expect("sweeps"), 2);
        assert!(!stage.join(".step-000004.Xy12").exists() && !run.path().join("sft-4/.model.safetensors.Ab3.tmp").exists());
        for kept in ["checkpoints/sft-4/step-000002", "sft-4/model.safetensors", ".lock", "metrics.jsonl"] {
            assert!(run.path().join(kept).exists(), "{kept} was kept");
        }
    }
}
