//! `hard_buffer` stage: collects a phase's difficulty reports, keeps the hardest tasks by a
//! policy (zero accuracy, hardest k, pass-rate band, importance sampling), and emits them
//! mixed with the next phase's fresh tasks at a ratio set in the recipe. Its state is saved
//! as JSON in the run directory.

use std::path::PathBuf;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::StageError;
use crate::fsutil::write_atomic;
use crate::record::Record;
use crate::rl::buffer::{BufferPolicy, HardBuffer, Selection};
use crate::rl::chain::buffer_problems;
use crate::rl::rollout::{PASS_RATE_BINS, pass_rate_bin};
use crate::stage::{Chart, Item, PlanView, PortKind, PortSpec, ReportFigure, Stage, StageConfig, StageContext, StageIo};

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
    /// Share of carried tasks among the tasks the next phase trains on, when fresh tasks are
    /// connected (carried tasks are at most `mix` of the phase's tasks in band plus carried;
    /// the hardest go first). 1 = every held task.
    #[serde(default = "default_mix")]
    pub mix: f32,
    /// Importance weights are `min(difficulty, max_weight)` (difficulty is infinite for tasks
    /// nothing solved).
    #[serde(default = "default_max_weight")]
    pub max_weight: f32,
    /// Seed of the importance sampling and of the mixing order (mixed with the run seed).
    #[serde(default)]
    pub seed: u64,
}

/// A buffer's end-of-run figures: its summary, read back by its report figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BufferSummary {
    /// Difficulty reports received.
    pub reports: usize,
    /// Distinct tasks reported.
    pub tasks_reported: usize,
    /// Tasks the policy selected (at most `capacity`).
    pub held: usize,
    /// Held tasks emitted into the next phase's tasks.
    pub carried: usize,
    /// Fresh tasks received.
    pub fresh: usize,
    /// Reported tasks by pass rate: 0, (0, 1/4], (1/4, 1/2], (1/2, 1), 1 (tasks nothing could
    /// be scored for are left out).
    pub pass_rate_histogram: [usize; 5],
    /// The buffer's saved state, when the run has a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
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
        if !(self.max_weight.is_finite() && self.max_weight > 0.0) {
            problems.push("max_weight must be positive".into());
        }
        problems
    }

    fn check_plan(plan: &PlanView, node: usize) -> Vec<(usize, String)> {
        buffer_problems(plan, node)
    }

    fn report_figures(label: &str, summary: &serde_json::Map<String, serde_json::Value>) -> Vec<ReportFigure> {
        let Ok(figures) = serde_json::from_value::<BufferSummary>(serde_json::Value::Object(summary.clone())) else { return Vec::new() };
        let sizes =
            [("tasks reported", figures.tasks_reported), ("held", figures.held), ("carried", figures.carried), ("fresh", figures.fresh)];
        let passes = PASS_RATE_BINS.iter().zip(figures.pass_rate_histogram).map(|(bin, count)| (bin.to_string(), count as f64)).collect();
        vec![
            ReportFigure {
                section: "Curriculum",
                kind: "buffer-size",
                caption: format!("{label}: tasks reported, held, carried into the next phase, and fresh"),
                chart: Chart::Bars {
                    title: format!("{label}: size"),
                    y_label: "tasks".into(),
                    bars: sizes.iter().map(|(name, n)| (name.to_string(), *n as f64)).collect(),
                    y_max: None,
                },
            },
            ReportFigure {
                section: "Curriculum",
                kind: "difficulty",
                caption: format!(
                    "{label}: pass rates of the reported tasks (pass rate 0 = infinite difficulty; those are carried by `zero_accuracy`)"
                ),
                chart: Chart::Bars {
                    title: format!("{label}: pass-rate distribution"),
                    y_label: "tasks".into(),
                    bars: passes,
                    y_max: None,
                },
            },
        ]
    }

    const WRITES_FILES: bool = true;

    fn writes(&self, ctx: &StageContext) -> Vec<PathBuf> {
        vec![ctx.output_path(std::path::Path::new(&format!("hard_buffer-{}.json", ctx.node)))]
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
        let (mut buffer, fresh, reports) = self.drain(io)?;
        let seed = self.config.seed ^ self.seed.rotate_left(29);
        buffer.select(&Selection {
            policy: self.config.policy,
            count: self.config.count,
            fraction: self.config.fraction,
            band: self.config.band,
            max_weight: self.config.max_weight,
            seed,
        });
        if let Some(path) = &self.state_path {
            let json =
                serde_json::to_vec_pretty(&buffer).map_err(|e| StageError::Failed(format!("cannot encode the buffer state: {e}")))?;
            write_atomic(path, &json)?;
        }
        let mut out = self.carried_records(&buffer, fresh.len(), io.label());
        let carried = out.len();
        let fresh_count = fresh.len();
        out.extend(fresh);
        out.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        self.summarize(io, &buffer, reports, carried, fresh_count)?;
        for record in out {
            io.send_record("records", record)?;
        }
        Ok(())
    }
}

impl HardBufferStage {
    /// Reads both inputs together: the fresh tasks' source may also feed the reporting phase
    /// (which needs all its records before it reports), or may wait for that phase's model
    /// (which comes after all its reports). Returns the buffer of reports, the fresh tasks
    /// and the number of reports.
    fn drain(&self, io: &mut StageIo) -> Result<(HardBuffer, Vec<Record>, usize), StageError> {
        let mut fresh: Vec<Record> = Vec::new();
        let mut buffer = HardBuffer::new(self.config.capacity);
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
        Ok((buffer, fresh, reports))
    }

    /// The held tasks to emit, hardest first, marked as carried with the buffer's share:
    /// at most `mix` of the output when fresh tasks are connected. The phase that reads them
    /// caps them again against the fresh tasks it actually trains on (those in its band),
    /// which this stage cannot measure; counting every fresh task here only bounds them.
    fn carried_records(&self, buffer: &HardBuffer, fresh: usize, label: &str) -> Vec<Record> {
        let mix = self.config.mix;
        let capped = fresh > 0 && mix < 1.0;
        let wanted = if capped { ((mix * fresh as f32) / (1.0 - mix)).round() as usize } else { buffer.held.len() };
        buffer
            .held_entries()
            .take(wanted)
            .map(|entry| {
                let mut record = entry.record.clone();
                record.difficulty = Some(entry.difficulty.clone());
                record.carried_from = Some(label.to_string());
                record.carry_share = capped.then_some(mix);
                record
            })
            .collect()
    }

    /// The typed summary (read back by the report figures) and one metrics line.
    fn summarize(&self, io: &mut StageIo, buffer: &HardBuffer, reports: usize, carried: usize, fresh: usize) -> Result<(), StageError> {
        let mut pass_rate_histogram = [0usize; 5];
        for rate in buffer.reported.values().filter_map(|entry| entry.difficulty.pass_rate) {
            pass_rate_histogram[pass_rate_bin(rate)] += 1;
        }
        let figures = BufferSummary {
            reports,
            tasks_reported: buffer.reported.len(),
            held: buffer.held.len(),
            carried,
            fresh,
            pass_rate_histogram,
            state: self.state_path.as_ref().map(|p| p.display().to_string()),
        };
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(&figures) {
            io.summary_mut().extend(fields);
        }
        let held_pass_rates: Vec<f32> = buffer.held_entries().filter_map(|e| e.difficulty.pass_rate).collect();
        io.log_metrics(
            0,
            serde_json::Map::from_iter([
                ("held".to_string(), buffer.held.len().into()),
                ("carried".to_string(), carried.into()),
                ("held_pass_rates".to_string(), serde_json::json!(held_pass_rates)),
            ]),
        )
    }
}
