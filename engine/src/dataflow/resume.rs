//! Resuming a killed run: the recipe's plan must be the one the run started with (every
//! difference is named), and `metrics.jsonl` is cut back to what each stage logged before
//! its last checkpoint, so the resumed stages log the rest exactly once.

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
    changes
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
    }
}
