//! Checks of a curriculum, which `rl_phase` and `hard_buffer` contribute to plan validation: phases chained policy to policy have
//! growing budgets and bands that do not overlap (or repeat the same band: a phase
//! continued), and a hard buffer's tasks go somewhere: to a later phase than the one that
//! reports to it, or to a file.

use serde_json::Value;

use crate::stage::{PlanNode, PlanView};

/// The band (min_input, max_input] of an `rl_phase` node.
fn band(node: &PlanNode) -> Option<(u64, u64)> {
    let max = node.options.get("max_input")?.as_u64()?;
    let min = node.options.get("min_input").and_then(Value::as_u64).unwrap_or(0);
    Some((min, max))
}

/// Problems of the `rl_phase` node `id` with the phase it continues (its policy comes from
/// another phase): the budget must grow and the bands must not overlap.
pub fn phase_problems(plan: &PlanView, id: usize) -> Vec<(usize, String)> {
    let mut problems = Vec::new();
    let Some(next) = plan.node(id) else { return problems };
    for edge in plan.into_port(id, "policy").filter(|e| plan.is(e.from, "rl_phase")) {
        let Some(prev) = plan.node(edge.from) else { continue };
        let (Some((prev_min, prev_max)), Some((next_min, next_max))) = (band(prev), band(next)) else { continue };
        if (next_min, next_max) == (prev_min, prev_max) {
            // The same phase continued (more steps at the same budget).
            continue;
        }
        if next_max <= prev_max {
            problems.push((
                id,
                format!(
                    "rl_phase: its budget max_input {next_max} is not above the budget {prev_max} of the phase it continues (rl_phase#{}); a curriculum's budgets grow",
                    prev.id
                ),
            ));
        } else if next_min < prev_max {
            problems.push((
                id,
                format!(
                    "rl_phase: its band ({next_min}, {next_max}] overlaps the band of the phase it continues (rl_phase#{}, up to {prev_max}); set min_input: {prev_max}",
                    prev.id
                ),
            ));
        }
    }
    problems
}

/// Problems of the `hard_buffer` node `id`: its tasks must go somewhere, and a phase that
/// reads them must have a larger budget than the phase that reported them.
pub fn buffer_problems(plan: &PlanView, id: usize) -> Vec<(usize, String)> {
    let mut problems = Vec::new();
    if plan.out_of(id).next().is_none() {
        problems.push((
            id,
            "hard_buffer: nothing reads its tasks, so the hard samples it keeps are never trained on (connect it to a later rl_phase)"
                .into(),
        ));
    }
    let readers: Vec<usize> = plan.out_of(id).filter(|e| plan.is(e.to, "rl_phase")).map(|e| e.to).collect();
    for reporter in plan.into_port(id, "reports").map(|e| e.from).filter(|&r| plan.is(r, "rl_phase")) {
        let Some((_, reporter_max)) = plan.node(reporter).and_then(band) else { continue };
        for &reader in &readers {
            if let Some((_, reader_max)) = plan.node(reader).and_then(band)
                && reader_max <= reporter_max
            {
                problems.push((
                        id,
                        format!(
                            "hard_buffer: rl_phase#{reader} (budget {reader_max}) reads the hard tasks of rl_phase#{reporter} (budget {reporter_max}); they belong to a later phase with a larger budget"
                        ),
                    ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::PlanEdge;
    use serde_json::json;

    /// Phase 1 at 256 -> buffer -> phase 2 with the given options: every node's problems.
    fn check(second: Value, edges: &[PlanEdge]) -> Vec<(usize, String)> {
        let (first, buffer) = (json!({ "max_input": 256 }), json!({}));
        let nodes = [
            PlanNode { id: 1, stage: "rl_phase", options: &first },
            PlanNode { id: 2, stage: "hard_buffer", options: &buffer },
            PlanNode { id: 3, stage: "rl_phase", options: &second },
        ];
        let plan = PlanView { nodes: &nodes, edges };
        let mut problems = phase_problems(&plan, 1);
        problems.extend(phase_problems(&plan, 3));
        problems.extend(buffer_problems(&plan, 2));
        problems
    }

    #[test]
    fn a_growing_chain_passes_and_bad_ones_are_named() {
        let edges = [
            PlanEdge { from: 1, from_port: "model", to: 3, to_port: "policy" },
            PlanEdge { from: 1, from_port: "reports", to: 2, to_port: "reports" },
            PlanEdge { from: 2, from_port: "records", to: 3, to_port: "data" },
        ];
        assert!(check(json!({ "max_input": 512, "min_input": 256 }), &edges).is_empty());
        // The same band again is a phase continued, not a curriculum step.
        assert!(check(json!({ "max_input": 256 }), &edges[..1]).iter().all(|(id, _)| *id != 3));
        let overlap = check(json!({ "max_input": 512, "min_input": 128 }), &edges);
        assert_eq!(overlap.len(), 1);
        assert!(overlap[0].0 == 3 && overlap[0].1.contains("overlaps"), "{overlap:?}");
        let shrink = check(json!({ "max_input": 128 }), &edges);
        assert!(shrink.iter().any(|(id, m)| *id == 3 && m.contains("not above")), "{shrink:?}");
        assert!(shrink.iter().any(|(id, m)| *id == 2 && m.contains("later phase")), "{shrink:?}");
        // A buffer nobody reads.
        let unread = check(json!({ "max_input": 512, "min_input": 256 }), &edges[..2]);
        assert!(unread.iter().any(|(id, m)| *id == 2 && m.contains("never trained on")), "{unread:?}");
    }
}
