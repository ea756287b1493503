//! The hard-sample buffer (difficulty-aware retrospective sampling): it keeps the tasks a
//! phase found hardest, by a policy chosen in the recipe, so the next phase trains on them
//! again. Difficulty is 1 / pass rate (infinite when no rollout was correct), see
//! [`Difficulty::score`]; a task none of whose rollouts could be scored is never selected
//! (its difficulty is unknown, not the highest).

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::record::{Difficulty, Record};
use crate::stage::DifficultyReport;

/// Which tasks are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BufferPolicy {
    /// Tasks no rollout solved (QwenLong-L1's choice).
    #[default]
    ZeroAccuracy,
    /// The `count` (or `fraction`) most difficult tasks.
    Hardest,
    /// Tasks whose pass rate lies within `band`.
    Band,
    /// `count` (or `fraction`) tasks drawn without replacement with probability
    /// proportional to their difficulty (capped at `max_weight`).
    Importance,
}

/// How the buffer selects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub policy: BufferPolicy,
    pub count: Option<usize>,
    pub fraction: Option<f32>,
    pub band: Option<[f32; 2]>,
    pub max_weight: f32,
    pub seed: u64,
}

/// The buffer's whole state: what was reported, and what it holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HardBuffer {
    /// Every task reported, by id (a task reported again replaces its earlier report).
    pub reported: BTreeMap<String, DifficultyReport>,
    /// The ids selected, hardest first, at most `capacity`.
    pub held: Vec<String>,
    pub capacity: usize,
}

impl HardBuffer {
    pub fn new(capacity: usize) -> Self {
        Self { reported: BTreeMap::new(), held: Vec::new(), capacity }
    }

    pub fn observe(&mut self, report: DifficultyReport) {
        self.reported.insert(report.record.id.clone(), report);
    }

    /// Ids of the reported tasks that were scored, hardest first (ties: lower pass rate,
    /// then id). Tasks none of whose samples could be scored are left out.
    pub fn by_difficulty(&self) -> Vec<&str> {
        let mut scored: Vec<(f32, f32, &str)> =
            self.reported.values().filter_map(|e| Some((e.difficulty.score()?, e.difficulty.pass_rate?, e.record.id.as_str()))).collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(b.2)));
        scored.into_iter().map(|(_, _, id)| id).collect()
    }

    /// Selects the held tasks from what was reported.
    pub fn select(&mut self, selection: &Selection) {
        let ranked = self.by_difficulty();
        let wanted = |total: usize| match (selection.count, selection.fraction) {
            (Some(count), _) => count.min(total),
            (None, Some(fraction)) => ((total as f32 * fraction).round() as usize).min(total),
            (None, None) => total,
        };
        let mut held: Vec<String> = match selection.policy {
            BufferPolicy::ZeroAccuracy => {
                ranked.iter().filter(|id| self.reported[**id].difficulty.unsolved()).map(|id| id.to_string()).collect()
            }
            BufferPolicy::Hardest => ranked.iter().take(wanted(ranked.len())).map(|id| id.to_string()).collect(),
            BufferPolicy::Band => {
                let [a, b] = selection.band.unwrap_or([0.0, 0.0]);
                ranked
                    .iter()
                    .filter(|id| self.reported[**id].difficulty.pass_rate.is_some_and(|rate| (a..=b).contains(&rate)))
                    .map(|id| id.to_string())
                    .collect()
            }
            BufferPolicy::Importance => {
                // Weighted sampling without replacement (Efraimidis-Spirakis): the largest
                // keys u^(1/w) win.
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(selection.seed);
                let mut keyed: Vec<(f64, &str)> = ranked
                    .iter()
                    .map(|id| {
                        let score = self.reported[*id].difficulty.score().unwrap_or(1.0);
                        let weight = f64::from(score.min(selection.max_weight).max(1e-6));
                        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                        (u.powf(1.0 / weight), *id)
                    })
                    .collect();
                keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
                let mut chosen: Vec<&str> = keyed.iter().take(wanted(keyed.len())).map(|(_, id)| *id).collect();
                // Held in difficulty order like the other policies.
                chosen.sort_by_key(|id| ranked.iter().position(|r| r == id));
                chosen.into_iter().map(str::to_string).collect()
            }
        };
        held.truncate(self.capacity);
        self.held = held;
    }

    /// The reports of the held tasks, hardest first.
    pub fn held_entries(&self) -> impl Iterator<Item = &DifficultyReport> {
        self.held.iter().map(|id| &self.reported[id])
    }
}

/// The positions of the carried tasks among a phase's `tasks` that exceed their buffer's
/// share (`carry_share`, its `mix`): carried tasks may be at most `share / (1 - share)` times
/// the phase's own tasks (those in its band, not every fresh task the buffer saw). The
/// hardest carried tasks are kept; nothing is dropped without fresh tasks or a share.
pub fn carried_beyond_share(tasks: &[&Record]) -> BTreeSet<usize> {
    let fresh = tasks.iter().filter(|r| r.carried_from.is_none()).count();
    let share = tasks.iter().filter_map(|r| r.carry_share).reduce(f32::min);
    let Some(share) = share.filter(|&s| fresh > 0 && s < 1.0) else { return BTreeSet::new() };
    let allowed = ((share * fresh as f32) / (1.0 - share)).round() as usize;
    let mut carried: Vec<(usize, &Record)> = tasks.iter().copied().enumerate().filter(|(_, r)| r.carried_from.is_some()).collect();
    if carried.len() <= allowed {
        return BTreeSet::new();
    }
    // Hardest first: highest difficulty (unknown last), then lowest pass rate, then id.
    let rank = |r: &Record| {
        let d = r.difficulty.as_ref();
        (d.and_then(Difficulty::score).unwrap_or(f32::NEG_INFINITY), d.and_then(|d| d.pass_rate).unwrap_or(1.0))
    };
    carried.sort_by(|(_, a), (_, b)| {
        let ((da, pa), (db, pb)) = (rank(a), rank(b));
        db.total_cmp(&da).then(pa.total_cmp(&pb)).then(a.id.cmp(&b.id))
    });
    carried[allowed..].iter().map(|(i, _)| *i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: &str, rewards: &[f32]) -> DifficultyReport {
        let correct = rewards.iter().filter(|r| **r >= 1.0).count();
        DifficultyReport {
            record: serde_json::from_value(serde_json::json!({ "id": id })).expect("record"),
            difficulty: crate::record::Difficulty::new(correct, rewards.to_vec(), rewards.len()),
        }
    }

    /// Six tasks of known difficulty: mean rewards 0, 0, 0.25, 0.5, 0.75, 1.
    fn filled(capacity: usize) -> HardBuffer {
        let mut buffer = HardBuffer::new(capacity);
        for (id, rewards) in [
            ("f", &[1.0, 1.0, 1.0, 1.0][..]),
            ("a", &[0.0, 0.0, 0.0, 0.0]),
            ("c", &[1.0, 0.0, 0.0, 0.0]),
            ("b", &[0.0, 0.0, 0.0, 0.0]),
            ("d", &[1.0, 1.0, 0.0, 0.0]),
            ("e", &[1.0, 1.0, 1.0, 0.0]),
        ] {
            buffer.observe(report(id, rewards));
        }
        buffer
    }

    fn selection(policy: BufferPolicy) -> Selection {
        Selection { policy, count: None, fraction: None, band: None, max_weight: 20.0, seed: 7 }
    }

    #[test]
    fn difficulty_is_the_inverse_mean_reward() {
        let buffer = filled(10);
        assert_eq!(buffer.reported["a"].difficulty.score(), Some(f32::INFINITY));
        assert_eq!(buffer.reported["c"].difficulty.score(), Some(4.0));
        assert_eq!(buffer.reported["d"].difficulty.score(), Some(2.0));
        assert_eq!(buffer.reported["f"].difficulty.score(), Some(1.0));
        assert_eq!(buffer.by_difficulty(), vec!["a", "b", "c", "d", "e", "f"]);
    }

    #[test]
    fn each_policy_carries_the_expected_tasks() {
        let mut buffer = filled(10);
        buffer.select(&selection(BufferPolicy::ZeroAccuracy));
        assert_eq!(buffer.held, vec!["a", "b"]);
        buffer.select(&Selection { count: Some(3), ..selection(BufferPolicy::Hardest) });
        assert_eq!(buffer.held, vec!["a", "b", "c"]);
        buffer.select(&Selection { fraction: Some(0.5), ..selection(BufferPolicy::Hardest) });
        assert_eq!(buffer.held, vec!["a", "b", "c"]);
        buffer.select(&Selection { band: Some([0.2, 0.6]), ..selection(BufferPolicy::Band) });
        assert_eq!(buffer.held, vec!["c", "d"]);
        // Capacity keeps the hardest.
        let mut small = filled(1);
        small.select(&selection(BufferPolicy::ZeroAccuracy));
        assert_eq!(small.held, vec!["a"]);
        // A task reported again is replaced, not duplicated.
        let mut buffer = filled(10);
        buffer.observe(report("a", &[1.0, 1.0, 1.0, 1.0]));
        buffer.select(&selection(BufferPolicy::ZeroAccuracy));
        assert_eq!(buffer.held, vec!["b"]);
        assert_eq!(buffer.reported.len(), 6);
    }

    #[test]
    fn importance_sampling_follows_difficulty() {
        // Draw 2 of the 6 many times: the frequencies follow the weights (20, 20, 4, 2,
        // 1.33, 1: difficulty, the zero-reward tasks capped at max_weight 20).
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let runs = 2000;
        for seed in 0..runs {
            let mut buffer = filled(10);
            buffer.select(&Selection { count: Some(2), seed, ..selection(BufferPolicy::Importance) });
            assert_eq!(buffer.held.len(), 2);
            assert_ne!(buffer.held[0], buffer.held[1], "no duplicates");
            for id in &buffer.held {
                *counts.entry(id.clone()).or_default() += 1;
            }
        }
        // Exact inclusion probability of a draw of two without replacement:
        // P(i) = w_i / T + sum over j != i of (w_j / T) (w_i / (T - w_j)).
        let weights = [("a", 20.0f64), ("b", 20.0), ("c", 4.0), ("d", 2.0), ("e", 4.0 / 3.0), ("f", 1.0)];
        let total: f64 = weights.iter().map(|(_, w)| w).sum();
        for (id, w) in weights {
            let second: f64 = weights.iter().filter(|(j, _)| *j != id).map(|(_, wj)| wj / total * w / (total - wj)).sum();
            let expected = w / total + second;
            let share = counts.get(id).copied().unwrap_or(0) as f64 / runs as f64;
            assert!((share - expected).abs() < 0.035, "{id}: drawn {share:.3}, expected {expected:.3} ({counts:?})");
        }
        // Same seed, same draw.
        let mut x = filled(10);
        let mut y = filled(10);
        let s = Selection { count: Some(3), ..selection(BufferPolicy::Importance) };
        x.select(&s);
        y.select(&s);
        assert_eq!(x.held, y.held);
    }

    #[test]
    fn a_task_no_rollout_of_which_could_be_scored_is_not_the_hardest() {
        let unscorable = DifficultyReport {
            record: serde_json::from_value(serde_json::json!({ "id": "0-unscorable" })).expect("record"),
            difficulty: crate::record::Difficulty::new(0, Vec::new(), 4),
        };
        assert_eq!((unscorable.difficulty.pass_rate, unscorable.difficulty.score()), (None, None));
        let mut buffer = filled(10);
        buffer.observe(unscorable);
        assert!(!buffer.by_difficulty().contains(&"0-unscorable"));
        for policy in [BufferPolicy::ZeroAccuracy, BufferPolicy::Hardest, BufferPolicy::Band, BufferPolicy::Importance] {
            buffer.select(&Selection { count: Some(10), band: Some([0.0, 1.0]), ..selection(policy) });
            assert!(!buffer.held.iter().any(|id| id == "0-unscorable"), "{policy:?} held it");
        }
    }

    #[test]
    fn difficulty_comes_from_correctness_not_from_shaped_rewards() {
        // Two of four correct; one more sample could not be scored. Difficulty 1 / (2 / 4).
        let partial = crate::record::Difficulty::new(2, vec![1.0, 1.0, 0.0, 0.0], 5);
        assert_eq!((partial.pass_rate, partial.score(), partial.samples), (Some(0.5), Some(2.0), 5));
        let none = crate::record::Difficulty::new(0, vec![0.0, 0.0], 2);
        assert!(none.unsolved() && none.score() == Some(f32::INFINITY));
    }

    #[test]
    fn the_mix_share_counts_the_fresh_tasks_the_phase_trains_on() {
        // The buffer saw 300 fresh tasks and let 100 carried ones through (mix 0.25); the
        // phase trains on 60 of the fresh ones (its band): 20 carried at most.
        let mut tasks: Vec<Record> = (0..60).map(|i| Record::new(format!("fresh{i}"), "q")).collect();
        for i in 0..100 {
            let mut carried = Record::new(format!("hard{i:03}"), "q");
            carried.carried_from = Some("hard_buffer#7".into());
            carried.carry_share = Some(0.25);
            // Every tenth one was solved once in eight (difficulty 8); the rest never.
            let correct = usize::from(i % 10 == 0);
            carried.difficulty = Some(Difficulty::new(correct, vec![0.0; 8], 8));
            tasks.push(carried);
        }
        let refs: Vec<&Record> = tasks.iter().collect();
        let dropped = carried_beyond_share(&refs);
        assert_eq!(dropped.len(), 80);
        let kept: Vec<&str> = tasks.iter().enumerate().filter(|(i, _)| !dropped.contains(i)).map(|(_, r)| r.id.as_str()).collect();
        let kept_carried: Vec<&&str> = kept.iter().filter(|id| id.starts_with("hard")).collect();
        assert_eq!(kept_carried.len(), 20);
        // The never-solved ones are the hardest and go first.
        assert!(kept_carried.iter().all(|id| !id.ends_with('0')), "{kept_carried:?}");
        assert_eq!(kept.iter().filter(|id| id.starts_with("fresh")).count(), 60);
        // Without fresh tasks in band, or with mix 1, every carried task stays.
        assert!(carried_beyond_share(&refs[60..]).is_empty());
        let mut all = tasks.clone();
        all.iter_mut().for_each(|r| r.carry_share = r.carry_share.map(|_| 1.0));
        assert!(carried_beyond_share(&all.iter().collect::<Vec<_>>()).is_empty());
    }

    #[test]
    fn the_state_round_trips_through_serialization() {
        let mut buffer = filled(4);
        buffer.select(&Selection { count: Some(3), ..selection(BufferPolicy::Hardest) });
        let json = serde_json::to_string(&buffer).expect("serializes");
        let back: HardBuffer = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, buffer);
        assert_eq!(back.held_entries().map(|e| e.record.id.as_str()).collect::<Vec<_>>(), vec!["a", "b", "c"]);
    }
}
