//! Checks of a curriculum, run by plan validation: phases chained policy to policy have
//! growing budgets and bands that do not overlap (or repeat the same band: a phase
//! continued), and a hard buffer's tasks go somewhere: to a later phase than the one that
//! reports to it, or to a file.

use serde_json::Value;

/// A stage of the plan, as plan validation sees it.
pub struct ChainNode<'a> {
    pub id: usize,
    pub stage: &'a str,
    pub options: &'a Value,
}

/// A resolved edge of the plan.
pub struct ChainEdge<'a> {
    pub from: usize,
    pub from_port: &'a str,
    pub to: usize,
    pub to_port: &'a str,
}

/// The band (min_input, max_input] of an `rl_phase` node.
fn band(node: &ChainNode) -> Option<(u64, u64)> {
    let max = node.options.get("max_input")?.as_u64()?;
    let min = node.options.get("min_input").and_then(Value::as_u64).unwrap_or(0);
    Some((min, max))
}

/// Every problem of the plan's phase chains, with the node it belongs to.
pub fn chain_problems(nodes: &[ChainNode], edges: &[ChainEdge]) -> Vec<(usize, String)> {
    let node = |id: usize| nodes.iter().find(|n| n.id == id);
    let is_phase = |id: usize| node(id).is_some_and(|n| n.stage == "rl_phase");
    let mut problems = Vec::new();
    // Phase -> phase through the policy.
    for edge in edges.iter().filter(|e| e.to_port == "policy" && is_phase(e.from) && is_phase(e.to)) {
        let (Some(prev), Some(next)) = (node(edge.from), node(edge.to)) else { continue };
        let (Some((prev_min, prev_max)), Some((next_min, next_max))) = (band(prev), band(next)) else { continue };
        if (next_min, next_max) == (prev_min, prev_max) {
            // The same phase continued (more steps at the same budget).
            continue;
        }
        if next_max <= prev_max {
            problems.push((
                next.id,
                format!(
                    "rl_phase: its budget max_input {next_max} is not above the budget {prev_max} of the phase it continues (rl_phase#{}); a curriculum's budgets grow",
                    prev.id
                ),
            ));
        } else if next_min < prev_max {
            problems.push((
                next.id,
                format!(
                    "rl_phase: its band ({next_min}, {next_max}] overlaps the band of the phase it continues (rl_phase#{}, up to {prev_max}); set min_input: {prev_max}",
                    prev.id
                ),
            ));
        }
    }
    // Buffers: fed by a phase's reports, read by a later phase.
    for buffer in nodes.iter().filter(|n| n.stage == "hard_buffer") {
        let reporters: Vec<usize> = edges.iter().filter(|e| e.to == buffer.id && e.to_port == "reports").map(|e| e.from).collect();
        let readers: Vec<usize> = edges.iter().filter(|e| e.from == buffer.id && is_phase(e.to)).map(|e| e.to).collect();
        if !edges.iter().any(|e| e.from == buffer.id) {
            problems.push((
                buffer.id,
                "hard_buffer: nothing reads its tasks, so the hard samples it keeps are never trained on (connect it to a later rl_phase)"
                    .into(),
            ));
        }
        for &reporter in reporters.iter().filter(|&&r| is_phase(r)) {
            let Some((_, reporter_max)) = node(reporter).and_then(band) else { continue };
            for &reader in &readers {
                if let Some((_, reader_max)) = node(reader).and_then(band) {
                    if reader_max <= reporter_max {
                        problems.push((
                            buffer.id,
                            format!(
                                "hard_buffer: rl_phase#{reader} (budget {reader_max}) reads the hard tasks of rl_phase#{reporter} (budget {reporter_max}); they belong to a later phase with a larger budget"
                            ),
                        ));
                    }
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Phase 1 at 256 -> buffer -> phase 2 with the given options.
    fn check(second: Value, edges: &[ChainEdge]) -> Vec<(usize, String)> {
        let (first, buffer) = (json!({ "max_input": 256 }), json!({}));
        let nodes = [
            ChainNode { id: 1, stage: "rl_phase", options: &first },
            ChainNode { id: 2, stage: "hard_buffer", options: &buffer },
            ChainNode { id: 3, stage: "rl_phase", options: &second },
        ];
        chain_problems(&nodes, edges)
    }

    #[test]
    fn a_growing_chain_passes_and_bad_ones_are_named() {
        let edges = [
            ChainEdge { from: 1, from_port: "model", to: 3, to_port: "policy" },
            ChainEdge { from: 1, from_port: "reports", to: 2, to_port: "reports" },
            ChainEdge { from: 2, from_port: "records", to: 3, to_port: "data" },
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
