//! `hard_buffer` stage: collects a phase's difficulty reports, keeps the hardest tasks by a
//! policy (zero accuracy, hardest k, pass-rate band, importance sampling), and emits them
//! mixed with the next phase's fresh tasks at a ratio set in the recipe. Its state is saved
//! as JSON in the run directory.

use std::path::PathBuf;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::error::StageError;
use crate::fsutil::write_atomic;
use crate::record::Record;
use crate::rl::buffer::{BufferPolicy, HardBuffer, Selection};
use crate::stage::{Item, PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};

/// Options of the `hard_buffer` stage.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HardBufferConfig {
    /// `zero_accuracy` (tasks no rollout solved), `hardest`, `band` or `importance`.
    #[serde(default)]
    pub policy: BufferPolicy,
    /// Tasks selected by `hardest` and `importance`.
    #[serde(default)]
    pub count: Option<usize>,
    /// Share of the reported tasks selected by `hardest` and `importance` (when no `count`).
    #[serde(default)]
    pub fraction: Option<f32>,
    /// Pass-rate band [a, b] of the `band` policy.
    #[serde(default)]
    pub band: Option<[f32; 2]>,
    /// Most tasks held; the hardest are kept.
    #[serde(default = "default_capacity")]
    pub capacity: usize,
    /// Share of carried tasks in the output when fresh tasks are connected (carried tasks are
    /// at most `mix * total`; the hardest go first). 1 = emit every held task.
    #[serde(default = "default_mix")]
    pub mix: f32,
    /// Importance weights are `min(difficulty, max_weight)` (difficulty is infinite for tasks
    /// nothing solved).
    #[serde(default = "default_max_weight")]
    pub max_weight: f32,
    #[serde(default)]
    pub seed: u64,
}

fn default_capacity() -> usize {
    4096
}
fn default_mix() -> f32 {
    0.25
}
fn default_max_weight() -> f32 {
    20.0
}

impl StageConfig for HardBufferConfig {
    const NAME: &'static str = "hard_buffer";
    const SUMMARY: &'static str = "Keeps a phase's hardest tasks (by its difficulty reports) and mixes them into the next phase's tasks.";
    const INPUTS: &'static [PortSpec] = &[
        PortSpec::required("reports", PortKind::Reports, "difficulty reports of a phase"),
        PortSpec::optional("fresh", PortKind::Records, "the next phase's own tasks"),
    ];
    const OUTPUTS: &'static [PortSpec] = &[PortSpec::optional("records", PortKind::Records, "fresh tasks with the carried ones mixed in")];

    fn validate(&self, _ctx: &StageContext) -> Vec<String> {
        let mut problems = Vec::new();
        if !(0.0..=1.0).contains(&self.mix) {
            problems.push("mix must be within [0, 1]".into());
        }
        if self.fraction.is_some_and(|f| !(0.0..=1.0).contains(&f)) {
            problems.push("fraction must be within [0, 1]".into());
        }
        if self.capacity == 0 {
            problems.push("capacity must be at least 1".into());
        }
        match self.policy {
            BufferPolicy::Band => match self.band {
                Some([a, b]) if (0.0..=1.0).contains(&a) && (0.0..=1.0).contains(&b) && a <= b => {}
                Some(_) => problems.push("band must be [a, b] with 0 <= a <= b <= 1".into()),
                None => problems.push("policy `band` needs the option `band: [a, b]`".into()),
            },
            BufferPolicy::Hardest | BufferPolicy::Importance if self.count.is_none() && self.fraction.is_none() => {
                problems.push(format!("policy `{}` needs `count` or `fraction`", policy_name(self.policy)));
            }
            _ => {}
        }
        if self.max_weight <= 0.0 {
            problems.push("max_weight must be positive".into());
        }
        problems
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let state_path = ctx.run_dir.as_ref().map(|d| d.join(format!("hard_buffer-{}.json", ctx.node)));
        Ok(Box::new(HardBufferStage { config: self, state_path, seed: ctx.seed }))
    }
}

fn policy_name(policy: BufferPolicy) -> &'static str {
    match policy {
        BufferPolicy::ZeroAccuracy => "zero_accuracy",
        BufferPolicy::Hardest => "hardest",
        BufferPolicy::Band => "band",
        BufferPolicy::Importance => "importance",
    }
}

struct HardBufferStage {
    config: HardBufferConfig,
    state_path: Option<PathBuf>,
    seed: u64,
}

impl Stage for HardBufferStage {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let config = &self.config;
        // Both inputs are drained together: the fresh tasks' source may also feed the
        // reporting phase (which needs all its records before it reports), or may wait for
        // that phase's model (which comes after all its reports).
        let mut fresh: Vec<Record> = Vec::new();
        let mut buffer = HardBuffer::new(config.capacity);
        let mut reports = 0usize;
        while let Some((port, item)) = io.recv_any(&["fresh", "reports"])? {
            match (port, item) {
                ("fresh", Item::Record(record)) => fresh.push(*record),
                ("reports", Item::Report(report)) => {
                    buffer.observe(*report);
                    reports += 1;
                }
                (port, item) => return Err(StageError::Failed(format!("{}: unexpected {} on input `{port}`", io.label(), item.kind()))),
            }
        }
        let seed = config.seed ^ self.seed.rotate_left(29);
        buffer.select(&Selection {
            policy: config.policy,
            count: config.count,
            fraction: config.fraction,
            band: config.band,
            max_weight: config.max_weight,
            seed,
        });
        if let Some(path) = &self.state_path {
            let json =
                serde_json::to_vec_pretty(&buffer).map_err(|e| StageError::Failed(format!("cannot encode the buffer state: {e}")))?;
            write_atomic(path, &json)?;
        }
        // How many carried tasks join the fresh ones: at most `mix` of the total.
        let carried_wanted = if fresh.is_empty() || config.mix >= 1.0 {
            buffer.held.len()
        } else {
            ((config.mix * fresh.len() as f32) / (1.0 - config.mix)).round() as usize
        };
        let label = io.label().to_string();
        let mut out: Vec<Record> = buffer
            .held_entries()
            .take(carried_wanted)
            .map(|entry| {
                let mut record = entry.record.clone();
                let difficulty = entry.difficulty();
                record.metadata.insert(
                    "carried".into(),
                    serde_json::json!({
                        "from": label,
                        "pass_rate": entry.pass_rate,
                        "difficulty": if difficulty.is_finite() { serde_json::json!(difficulty) } else { serde_json::Value::Null },
                    }),
                );
                record
            })
            .collect();
        let carried = out.len();
        out.extend(fresh.iter().cloned());
        out.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let summary = io.summary_mut();
        summary.insert("reports".into(), reports.into());
        summary.insert("tasks_reported".into(), buffer.reported.len().into());
        summary.insert("held".into(), buffer.held.len().into());
        summary.insert("carried".into(), carried.into());
        summary.insert("fresh".into(), fresh.len().into());
        if let Some(path) = &self.state_path {
            summary.insert("state".into(), path.display().to_string().into());
        }
        io.metrics().log(
            io.label(),
            0,
            serde_json::Map::from_iter([
                ("held".to_string(), buffer.held.len().into()),
                ("carried".to_string(), carried.into()),
                ("held_pass_rates".to_string(), serde_json::json!(buffer.held_entries().map(|e| e.pass_rate).collect::<Vec<_>>())),
            ]),
        )?;
        for record in out {
            io.send_record("records", record)?;
        }
        Ok(())
    }
}
