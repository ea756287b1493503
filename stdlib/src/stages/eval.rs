//! `eval` stage: generates answers for held-out tasks and scores them: pass@1 (the mean
//! over samples) and pass@k, per data source and per input-length bucket. Writes every item
//! and a summary table into the run directory; the same questions at several lengths give an
//! accuracy-vs-length curve.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use longrl_backends::TrainBackend;
use serde::{Deserialize, Serialize};

use crate::driver::{Cadence, Driver, ModelStage, StageInputs, StageRun, StepOutcome};
use crate::error::StageError;
use crate::fsutil::{AtomicFile, write_atomic};
use crate::model::batch_decode::{BatchDecoder, BatchOptions, GroupRequest, SampleOn};
use crate::model::chat::ModelTokenizer;
use crate::model::generate::{Completion, FinishReason, SamplingConfig};
use crate::model::{CausalLm, load_model};
use crate::options::{at_most, limits, sampling_problems};
use crate::prompt::encode_prompt;
use crate::record::Record;
use crate::reward::{Reward, RewardOutcome, RuleConfig};
use crate::rl::remote::RolloutConfig;
use crate::rl::rollout::collect_groups;
use crate::rl::source::Rollouts;
use crate::stage::{PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};

/// Options of the `eval` stage.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Prompt budget in tokens; longer prompts are cut in the middle.
    #[serde(default = "default_max_input")]
    pub max_input: usize,
    /// Most tokens generated per answer.
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// Samples per task (k of pass@k); pass@1 is their mean score.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Sampling temperature (0 = greedy).
    #[serde(default)]
    pub temperature: f32,
    /// Nucleus sampling threshold (1 = off).
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    /// Seed of the sampling (mixed with the run seed).
    #[serde(default)]
    pub seed: u64,
    /// Rule check of the answers, when no `reward` edge is connected.
    #[serde(default)]
    pub rule: RuleConfig,
    /// Length bucket edges in tokens; a task goes to the first edge at or above its length
    /// (its `length_budget` when the source recorded one). Default: powers of two.
    #[serde(default)]
    pub buckets: Vec<usize>,
    /// Tasks per step, whose samples decode together. With one sample per task, a step's
    /// prompts draw from the streams of one seed, so sampled answers depend on this size.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Most responses decoded together (rows of several tasks; a task's samples are never
    /// split).
    #[serde(default = "default_decode_rows")]
    pub decode_rows: usize,
    /// Where decoding draws its tokens: `"host"`, `"device"` (only the tokens and their
    /// log-probabilities come back from a GPU) or `"auto"` (the host, until the device check
    /// has measured both on a GPU).
    #[serde(default)]
    pub sample_on: SampleOn,
    /// Name of this evaluation in tables and files (default: the stage label).
    #[serde(default)]
    pub name: Option<String>,
    /// Generate on inference servers instead of in process (see `rl_phase`'s `rollout`):
    /// the servers load the evaluated model's directory, and each prompt is one request
    /// with `n` = `samples`.
    #[serde(default)]
    pub rollout: Option<RolloutConfig>,
}

fn default_max_input() -> usize {
    8192
}
fn default_max_new() -> usize {
    512
}
fn default_samples() -> usize {
    1
}
fn default_top_p() -> f32 {
    1.0
}
fn default_batch() -> usize {
    8
}
fn default_decode_rows() -> usize {
    64
}

impl StageConfig for EvalConfig {
    const NAME: &'static str = "evaluate";
    const SUMMARY: &'static str = "Scores a model's answers: pass@1 and pass@k per data source and input length.";
    const INPUTS: &'static [PortSpec] = &[
        PortSpec::required("policy", PortKind::Model, "the model to evaluate"),
        PortSpec::required("data", PortKind::Records, "held-out tasks"),
        PortSpec::optional("reward", PortKind::Reward, "how answers are scored (default: the `rule` option)"),
    ];

    fn validate(&self, _ctx: &StageContext) -> Vec<String> {
        let mut problems = self.rule.problems();
        if self.samples == 0 || self.batch == 0 || self.max_new_tokens == 0 || self.max_input == 0 {
            problems.push("samples, batch, max_input and max_new_tokens must be at least 1".into());
        }
        if self.decode_rows == 0 {
            problems.push("decode_rows must be at least 1".into());
        }
        problems.extend(sampling_problems(self.temperature, self.top_p, true));
        if self.samples > 1 && self.temperature <= 0.0 {
            problems.push("pass@k with several samples needs temperature > 0".into());
        }
        let sizes = [
            ("max_input", self.max_input, limits::TOKENS),
            ("max_new_tokens", self.max_new_tokens, limits::TOKENS),
            ("samples", self.samples, limits::GROUP),
            ("batch", self.batch, limits::GROUP),
            ("decode_rows", self.decode_rows, limits::GROUP),
        ];
        problems.extend(sizes.iter().filter_map(|(name, value, max)| at_most(name, *value, *max)));
        if let Some(rollout) = &self.rollout {
            problems.extend(rollout.problems());
            problems.extend(rollout.request_problem(self.samples, self.max_new_tokens));
        }
        problems
    }

    const WRITES_FILES: bool = true;

    fn writes(&self, ctx: &StageContext) -> Vec<PathBuf> {
        vec![ctx.output_path(Path::new(&self.dir_name(ctx)))]
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let name = self.dir_name(ctx);
        let out_dir = ctx.run_dir.as_ref().map(|d| d.join(&name));
        Ok(Driver::boxed(Eval { config: self, run_seed: ctx.seed, name }, ctx, out_dir))
    }
}

impl EvalConfig {
    /// The evaluation's name, which is also its directory in the run.
    fn dir_name(&self, ctx: &StageContext) -> String {
        self.name.clone().unwrap_or_else(|| format!("eval-{}", ctx.node))
    }
}

/// The `evaluate` stage, independent of the backend.
struct Eval {
    config: EvalConfig,
    run_seed: u64,
    name: String,
}

/// The result of one task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
    pub data_source: String,
    pub bucket: usize,
    pub input_tokens: usize,
    pub truncated: bool,
    pub gold: Vec<String>,
    pub responses: Vec<String>,
    pub verdicts: Vec<RewardOutcome>,
    /// Mean score over the scorable samples; absent when no sample could be scored (the
    /// item is then left out of the accuracies and counted apart).
    pub pass_at_1: Option<f64>,
    /// 1 when any sample is fully correct; absent when no sample could be scored.
    pub pass_at_k: Option<f64>,
    /// Samples the reward could not score (left out of the means).
    pub unscorable: usize,
    /// Samples that reached `max_new_tokens` before a stop token (their answer is often
    /// missing: a budget shorter than the model's reasoning shows here first).
    #[serde(default)]
    pub cut: usize,
}

impl ItemResult {
    /// Builds an item's figures from its samples' outcomes.
    pub fn from_outcomes(
        record: &Record,
        bucket: usize,
        input_tokens: usize,
        truncated: bool,
        responses: Vec<String>,
        verdicts: Vec<RewardOutcome>,
    ) -> Self {
        let scores: Vec<f64> = verdicts.iter().filter_map(|v| v.score).map(f64::from).collect();
        let scored = !scores.is_empty();
        let pass_at_1 = scored.then(|| scores.iter().sum::<f64>() / scores.len() as f64);
        Self {
            id: record.id.clone(),
            data_source: record.data_source.clone(),
            bucket,
            input_tokens,
            truncated,
            gold: record.answers.clone(),
            pass_at_1,
            pass_at_k: scored.then(|| if scores.iter().any(|&s| s >= 1.0) { 1.0 } else { 0.0 }),
            unscorable: verdicts.len() - scores.len(),
            cut: 0,
            responses,
            verdicts,
        }
    }
}

/// One row of the summary table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub data_source: String,
    /// Bucket edge in tokens (0 for the all-lengths row).
    pub bucket: usize,
    /// Items with at least one scorable sample (the accuracies are over these).
    pub n: usize,
    /// Mean pass@1 of the `n` items; absent when `n` is 0.
    pub pass_at_1: Option<f64>,
    pub pass_at_k: Option<f64>,
    /// Items none of whose samples could be scored, left out of the accuracies.
    #[serde(default)]
    pub unscorable: usize,
}

/// The bucket of a task: its length (see [`Record::length`]) rounded up to an edge.
pub fn bucket_of(record: &Record, prompt_tokens: usize, edges: &[usize]) -> usize {
    let length = record.length(prompt_tokens);
    if edges.is_empty() {
        return length.checked_next_power_of_two().unwrap_or(usize::MAX);
    }
    edges.iter().copied().find(|&e| length <= e).unwrap_or(usize::MAX)
}

/// Share of samples cut at `max_new_tokens` above which the evaluation warns.
const CUT_WARNING_SHARE: f64 = 0.1;

/// Counts the samples that reached `max_new_tokens`, warning when they are more than a
/// tenth of all: their answers are mostly missing, so the accuracies measure the budget.
fn warn_of_cut_samples(items: &[ItemResult], max_new_tokens: usize) -> usize {
    let cut: usize = items.iter().map(|i| i.cut).sum();
    let samples: usize = items.iter().map(|i| i.responses.len()).sum();
    if samples > 0 && cut as f64 > CUT_WARNING_SHARE * samples as f64 {
        tracing::warn!(
            cut,
            samples,
            max_new_tokens,
            "many samples reached max_new_tokens before their end, so most of their answers are missing: raise max_new_tokens above the length of the model's answers"
        );
    }
    cut
}

/// Per (data source, bucket) means, then per data source over all lengths, then overall.
pub fn summarize(items: &[ItemResult]) -> Vec<Row> {
    let mut groups: BTreeMap<(String, usize), Vec<&ItemResult>> = BTreeMap::new();
    for item in items {
        groups.entry((item.data_source.clone(), item.bucket)).or_default().push(item);
        groups.entry((item.data_source.clone(), 0)).or_default().push(item);
        groups.entry(("all".into(), item.bucket)).or_default().push(item);
        groups.entry(("all".into(), 0)).or_default().push(item);
    }
    groups
        .into_iter()
        .map(|((data_source, bucket), members)| {
            let mean = |values: Vec<f64>| (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64);
            let pass_at_1: Vec<f64> = members.iter().filter_map(|m| m.pass_at_1).collect();
            let pass_at_k: Vec<f64> = members.iter().filter_map(|m| m.pass_at_k).collect();
            Row {
                data_source,
                bucket,
                n: pass_at_1.len(),
                unscorable: members.len() - pass_at_1.len(),
                pass_at_1: mean(pass_at_1),
                pass_at_k: mean(pass_at_k),
            }
        })
        .collect()
}

/// The summary as an aligned text table (a pass@k column only when k > 1, an unscorable
/// column only when some item could not be scored).
pub fn render_table(name: &str, rows: &[Row], samples: usize) -> String {
    let with_unscorable = rows.iter().any(|r| r.unscorable > 0);
    let mut out = format!("{name}: accuracy by data source and input length\n");
    out.push_str(&format!("{:<24} {:>10} {:>6} {:>8}", "data source", "length", "n", "pass@1"));
    if samples > 1 {
        out.push_str(&format!(" {:>8}", format!("pass@{samples}")));
    }
    if with_unscorable {
        out.push_str(&format!(" {:>11}", "unscorable"));
    }
    out.push('\n');
    let percent = |value: Option<f64>| value.map_or_else(|| format!("{:>8}", "-"), |v| format!("{:>7.1}%", 100.0 * v));
    for row in rows {
        let length = match row.bucket {
            0 => "all".to_string(),
            usize::MAX => "longer".to_string(),
            b => format!("<={b}"),
        };
        out.push_str(&format!("{:<24} {:>10} {:>6} {}", row.data_source, length, row.n, percent(row.pass_at_1)));
        if samples > 1 {
            out.push_str(&format!(" {}", percent(row.pass_at_k)));
        }
        if with_unscorable {
            out.push_str(&format!(" {:>11}", row.unscorable));
        }
        out.push('\n');
    }
    out
}

impl ModelStage for Eval {
    type State = EvalState;
    type Run<B: TrainBackend> = EvalRun<B>;

    fn rule(&self) -> RuleConfig {
        self.config.rule.clone()
    }

    fn cadence(&self) -> Cadence {
        Cadence::NONE
    }

    fn prepare<B: TrainBackend>(&self, inputs: StageInputs, device: B::Device, io: &mut StageIo) -> Result<EvalRun<B>, StageError> {
        let config = &self.config;
        let tokenizer = ModelTokenizer::load(&inputs.policy.dir)?;
        let vocab_size = crate::model::ModelConfig::load(&inputs.policy.dir.join("config.json"))?.vocab_size;
        let rollouts = Rollouts::connect(config.rollout.as_ref(), io.label(), None, vocab_size, io.cancel_token())?;
        // The servers generate: the model is not loaded here.
        let model = match rollouts.remote() {
            None => Some(load_model::<B::InnerBackend>(&inputs.policy.dir, &device)?.1),
            Some(_) => {
                rollouts.sync_dir(&inputs.policy.dir, &format!("{}:{}", io.label(), inputs.policy.dir.display()))?;
                None
            }
        };
        let sampling = SamplingConfig {
            temperature: config.temperature,
            top_p: config.top_p,
            top_k: 0,
            max_new_tokens: config.max_new_tokens,
            stop_tokens: tokenizer.stop_ids.clone(),
            seed: config.seed ^ self.run_seed.rotate_left(29),
        };
        let mut prompts = Vec::with_capacity(inputs.records.len());
        for record in &inputs.records {
            io.cancel_token().check()?;
            prompts.push(encode_prompt(&tokenizer, record, config.max_input)?);
        }
        // One step generates the samples of `batch` prompts, together.
        let per_step = config.batch;
        let steps: Vec<Vec<usize>> = (0..prompts.len()).collect::<Vec<_>>().chunks(per_step).map(<[usize]>::to_vec).collect();
        Ok(EvalRun {
            config: config.clone(),
            name: self.name.clone(),
            tokenizer,
            model,
            sampling,
            reward: inputs.reward,
            records: inputs.records,
            responses: vec![Vec::new(); prompts.len()],
            cut: vec![0; prompts.len()],
            prompts,
            steps,
            rollouts,
        })
    }
}

/// An evaluation keeps no checkpoints (it reruns on resume); it has no state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalState {}

/// An evaluation logs its figures once, at the end.
#[derive(Debug, Clone, Serialize)]
pub struct NoStepMetrics {}

/// An evaluation on one backend.
pub struct EvalRun<B: TrainBackend> {
    config: EvalConfig,
    name: String,
    tokenizer: ModelTokenizer,
    /// The model, when generating in process.
    model: Option<CausalLm<B::InnerBackend>>,
    sampling: SamplingConfig,
    reward: Arc<Reward>,
    records: Vec<Record>,
    /// Each task's encoded prompt and whether it was cut.
    prompts: Vec<(Vec<u32>, bool)>,
    /// Each task's decoded samples so far.
    responses: Vec<Vec<String>>,
    /// Each task's samples so far that reached `max_new_tokens`.
    cut: Vec<usize>,
    /// The tasks each step generates for.
    steps: Vec<Vec<usize>>,
    rollouts: Rollouts,
}

impl<B: TrainBackend> EvalRun<B> {
    /// Keeps task `task`'s sampled completions: their text, and how many ran out of tokens.
    fn keep(&mut self, task: usize, completions: Vec<Completion>) -> Result<(), StageError> {
        for completion in completions {
            let text = self.decode(&completion.tokens)?;
            self.responses[task].push(text);
            self.cut[task] += usize::from(completion.finish == FinishReason::Length);
        }
        Ok(())
    }

    /// A completion's text, without its stop token.
    fn decode(&self, tokens: &[u32]) -> Result<String, StageError> {
        let mut tokens = tokens.to_vec();
        if tokens.last().is_some_and(|t| self.tokenizer.stop_ids.contains(t)) {
            tokens.pop();
        }
        self.tokenizer.tokenizer.decode(&tokens, false)
    }

    /// Task `task`'s samples, at `position` in its step's `tasks`. With several samples, each
    /// task draws from its own seed; with one, the step's prompts draw from the streams of
    /// one batch (the seed of its first task, one stream per position), as they always did.
    fn request(&self, tasks: &[usize], position: usize, task: usize) -> GroupRequest {
        let prompt = self.prompts[task].0.clone();
        let mut sampling = self.sampling.clone();
        if self.config.samples == 1 {
            sampling.seed = self.sampling.seed.wrapping_add(tasks[0] as u64);
            GroupRequest { prompt, samples: 1, sampling, first_stream: position }
        } else {
            sampling.seed = self.sampling.seed.wrapping_add(task as u64);
            GroupRequest::group(prompt, self.config.samples, sampling)
        }
    }

    /// Every task's result, scored by the reward.
    fn score(&self) -> Result<Vec<ItemResult>, StageError> {
        let pairs: Vec<(&Record, &str)> =
            self.records.iter().zip(&self.responses).flat_map(|(r, texts)| texts.iter().map(move |t| (r, t.as_str()))).collect();
        let mut outcomes = self.reward.score_all(&pairs)?.into_iter();
        let mut items = Vec::with_capacity(self.records.len());
        for (((record, (prompt, truncated)), texts), &cut) in self.records.iter().zip(&self.prompts).zip(&self.responses).zip(&self.cut) {
            let verdicts: Vec<RewardOutcome> = outcomes.by_ref().take(texts.len()).collect();
            let tokens = record.input_tokens.unwrap_or(prompt.len());
            let bucket = bucket_of(record, prompt.len(), &self.config.buckets);
            let item = ItemResult::from_outcomes(record, bucket, tokens, *truncated, texts.clone(), verdicts);
            items.push(ItemResult { cut, ..item });
        }
        Ok(items)
    }

    /// `items.jsonl` (every task's samples and verdicts) and `summary.json`.
    fn write_files(&self, dir: &Path, items: &[ItemResult], rows: &[Row]) -> Result<(), StageError> {
        let path = dir.join("items.jsonl");
        let mut file = AtomicFile::create(&path, true)?;
        for item in items {
            let line = serde_json::to_string(item).map_err(|e| StageError::Failed(e.to_string()))?;
            writeln!(file, "{line}").map_err(|e| StageError::io(&path, e))?;
        }
        file.commit()?;
        let summary = serde_json::json!({ "name": self.name, "samples": self.config.samples, "rows": rows });
        write_atomic(&dir.join("summary.json"), summary.to_string().as_bytes())
    }
}

impl<B: TrainBackend> StageRun<B> for EvalRun<B> {
    type State = EvalState;
    type Metrics = NoStepMetrics;

    fn total_steps(&self) -> usize {
        self.steps.len()
    }

    fn restore(&mut self, _dir: &Path, _state: EvalState, _io: &mut StageIo) -> Result<(), StageError> {
        Ok(())
    }

    fn step(&mut self, step: usize, io: &mut StageIo) -> Result<StepOutcome<NoStepMetrics>, StageError> {
        let tasks = self.steps[step].clone();
        let Some(model) = &self.model else {
            // On the servers: each task one request with its `samples`.
            let samplings: Vec<SamplingConfig> = tasks
                .iter()
                .map(|&i| SamplingConfig { seed: self.sampling.seed.wrapping_add(i as u64), ..self.sampling.clone() })
                .collect();
            let prompts: Vec<&[u32]> = tasks.iter().map(|&i| self.prompts[i].0.as_slice()).collect();
            let sampled = self.rollouts.generate::<B::InnerBackend>(None, &prompts, self.config.samples, &samplings, io.cancel_token())?;
            for (&i, group) in tasks.iter().zip(sampled) {
                self.keep(i, group.completions)?;
            }
            return Ok(StepOutcome { metrics: None, status: String::new(), last: false });
        };
        let requests = tasks.iter().enumerate().map(|(position, &i)| self.request(&tasks, position, i)).collect();
        let mut decoder = BatchDecoder::new(model, BatchOptions { max_rows: self.config.decode_rows, sample_on: self.config.sample_on });
        let groups = collect_groups(&mut decoder, requests, || io.cancel_token().check())?;
        for (&i, completions) in tasks.iter().zip(groups) {
            self.keep(i, completions)?;
        }
        Ok(StepOutcome { metrics: None, status: String::new(), last: false })
    }

    fn checkpoint(&self, _dir: &Path) -> Result<EvalState, StageError> {
        Ok(EvalState {})
    }

    fn finish(self, out_dir: Option<&Path>, io: &mut StageIo) -> Result<Option<PathBuf>, StageError> {
        let items = self.score()?;
        let rows = summarize(&items);
        let table = render_table(&self.name, &rows, self.config.samples);
        if let Some(dir) = out_dir {
            self.write_files(dir, &items, &rows)?;
        }
        for row in rows.iter().filter(|r| r.data_source == "all") {
            let (Some(pass_at_1), Some(pass_at_k)) = (row.pass_at_1, row.pass_at_k) else { continue };
            let mut fields = serde_json::Map::new();
            fields.insert("eval".into(), self.name.clone().into());
            fields.insert("bucket".into(), row.bucket.into());
            fields.insert("pass_at_1".into(), pass_at_1.into());
            fields.insert("pass_at_k".into(), pass_at_k.into());
            fields.insert("n".into(), row.n.into());
            io.log_metrics(0, fields)?;
        }
        let unscorable: usize = items.iter().map(|i| i.unscorable).sum();
        let unscorable_items = items.iter().filter(|i| i.pass_at_1.is_none()).count();
        if unscorable > 0 {
            tracing::warn!(
                unscorable,
                unscorable_items,
                "samples could not be scored and are left out of the accuracies (items none of whose samples could be scored are left out of pass@1 and counted apart)"
            );
        }
        let cut = warn_of_cut_samples(&items, self.config.max_new_tokens);
        let judge_stats = self.reward.judge.as_ref().map(|j| j.stats.snapshot());
        let summary = io.summary_mut();
        summary.insert("cut_samples".into(), cut.into());
        summary.insert("unscorable".into(), unscorable.into());
        summary.insert("unscorable_items".into(), unscorable_items.into());
        if let Some(stats) = judge_stats {
            summary.extend(stats);
        }
        summary.insert("tasks".into(), items.len().into());
        summary.insert("rows".into(), serde_json::to_value(&rows).map_err(|e| StageError::Failed(e.to_string()))?);
        summary.insert("table".into(), table.into());
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::AnswerKind;

    fn record(id: &str, source: &str, budget: usize, gold: &str) -> Record {
        let mut r = Record::new(id, "q");
        r.data_source = source.into();
        r.answers = vec![gold.into()];
        r.kind = AnswerKind::Text;
        r.length_budget = Some(budget);
        r
    }

    #[test]
    fn hand_made_responses_give_the_expected_table() {
        let rule = RuleConfig::default();
        let cases = [
            (record("a", "qa", 512, "Oslo"), vec!["Therefore, the answer is Oslo.", "the answer is Rome"]),
            (record("b", "qa", 512, "Lima"), vec!["the answer is Lima", "the answer is lima."]),
            (record("c", "qa", 2048, "Bern"), vec!["I do not know", "the answer is Riga"]),
            (record("d", "math", 2048, "7"), vec!["the answer is 7", "the answer is 8"]),
        ];
        let reward = Reward::rule_only(rule);
        let items: Vec<ItemResult> = cases
            .iter()
            .map(|(r, texts)| {
                let pairs: Vec<(&Record, &str)> = texts.iter().map(|t| (r, *t)).collect();
                let verdicts = reward.score_all(&pairs).expect("scores");
                ItemResult::from_outcomes(r, bucket_of(r, 0, &[]), 0, false, texts.iter().map(|t| t.to_string()).collect(), verdicts)
            })
            .collect();
        let rows = summarize(&items);
        let find = |source: &str, bucket: usize| rows.iter().find(|r| r.data_source == source && r.bucket == bucket).cloned().expect("row");
        let row = |source: &str, bucket, n, pass_at_1, pass_at_k| Row {
            data_source: String::from(source),
            bucket,
            n,
            pass_at_1: Some(pass_at_1),
            pass_at_k: Some(pass_at_k),
            unscorable: 0,
        };
        assert_eq!(find("qa", 512), row("qa", 512, 2, 0.75, 1.0));
        assert_eq!(find("qa", 2048), row("qa", 2048, 1, 0.0, 0.0));
        assert_eq!(find("qa", 0).pass_at_1, Some(0.5));
        assert_eq!(find("math", 2048).pass_at_1, Some(0.5));
        assert_eq!(find("all", 0), row("all", 0, 4, 0.5, 0.75));
        let table = render_table("demo", &rows, 2);
        assert!(table.contains("pass@2") && table.contains("<=512"), "{table}");
    }

    #[test]
    fn items_no_sample_of_which_could_be_scored_are_left_out_of_pass_at_1() {
        use crate::reward::{Outcome, Verdict};
        let outcome = |score: Option<f32>| RewardOutcome {
            score,
            rule: Verdict { score: 0.0, outcome: Outcome::Incorrect, answer: Some("x".into()) },
            judge: None,
            script: None,
        };
        let item = |id: &str, scores: &[Option<f32>]| {
            let r = record(id, "qa", 512, "gold");
            let texts = vec![String::new(); scores.len()];
            ItemResult::from_outcomes(&r, 512, 0, false, texts, scores.iter().map(|s| outcome(*s)).collect())
        };
        let items = vec![item("a", &[Some(1.0), None]), item("b", &[None, None]), item("c", &[Some(0.0), Some(0.0)])];
        assert_eq!(items[1].pass_at_1, None);
        let rows = summarize(&items);
        let all = rows.iter().find(|r| r.data_source == "all" && r.bucket == 0).expect("row");
        assert_eq!((all.n, all.unscorable, all.pass_at_1, all.pass_at_k), (2, 1, Some(0.5), Some(0.5)));
        let table = render_table("demo", &rows, 2);
        assert!(table.contains("unscorable"), "{table}");
        // A bucket with nothing scorable has no accuracy, not 0%.
        let rows = summarize(&items[1..2]);
        assert!(rows.iter().all(|r| r.pass_at_1.is_none() && r.n == 0 && r.unscorable == 1));
        assert!(render_table("demo", &rows, 1).contains("       -"));
    }

    #[test]
    fn buckets_follow_edges_or_powers_of_two() {
        let mut r = Record::new("x", "q");
        assert_eq!(bucket_of(&r, 700, &[]), 1024);
        assert_eq!(bucket_of(&r, 700, &[512, 2048]), 2048);
        assert_eq!(bucket_of(&r, 5000, &[512, 2048]), usize::MAX);
        r.length_budget = Some(4096);
        assert_eq!(bucket_of(&r, 4000, &[]), 4096);
    }
}
