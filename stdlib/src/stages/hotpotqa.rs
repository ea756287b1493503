//! `hotpotqa` source: real multi-hop QA at any token budget. Reads HotpotQA's distractor
//! format (question, answer, supporting facts, ten paragraphs) and pads each question's
//! paragraphs with other questions' paragraphs up to the budget, the gold paragraphs at
//! random depths (the RULER way), so one question exists at 1K, 4K, 16K, 64K... tokens.

use std::collections::BTreeSet;
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::json;

use crate::error::StageError;
use crate::options::{at_most, limits};
use crate::record::{AnswerKind, Record};
use crate::stage::{PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};
use crate::tokenizer::Tokenizer;

/// Options of the `hotpotqa` source.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HotpotConfig {
    /// The HotpotQA JSON file (a list of questions in the distractor format).
    pub path: PathBuf,
    /// Input lengths in tokens (document + question); every question is rendered at each.
    pub lengths: Vec<usize>,
    /// tokenizer.json (or a model directory) that measures lengths.
    pub tokenizer: PathBuf,
    /// Skip this many questions first (separates training from held-out questions).
    #[serde(default)]
    pub offset: usize,
    /// Use at most this many questions.
    #[serde(default)]
    pub count: Option<usize>,
    /// Seed of the padding and placement.
    #[serde(default)]
    pub seed: u64,
}

impl StageConfig for HotpotConfig {
    const NAME: &'static str = "hotpotqa";
    const SUMMARY: &'static str = "HotpotQA multi-hop questions padded with other questions' paragraphs to given token lengths.";
    const OUTPUTS: &'static [PortSpec] = &[PortSpec::optional("records", PortKind::Records, "the tasks")];
    const POSITIONAL: &'static [&'static str] = &["path"];

    fn validate(&self, ctx: &StageContext) -> Vec<String> {
        let mut problems: Vec<String> = ctx.require_file("path", &self.path).into_iter().collect();
        let full = ctx.input_path(&self.tokenizer);
        let file = if full.is_dir() { full.join("tokenizer.json") } else { full };
        if !file.is_file() {
            problems.push(format!("option `tokenizer`: file {} does not exist", file.display()));
        }
        if self.lengths.is_empty() {
            problems.push("option `lengths` must list at least one length".into());
        }
        problems.extend(self.lengths.iter().find_map(|&l| at_most("lengths", l, limits::TOKENS)));
        problems
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let path = ctx.input_path(&self.path);
        let questions = load(&path)?;
        if self.offset >= questions.len() {
            return Err(StageError::Invalid(format!(
                "option `offset` is {} but {} holds {} questions: the source would give none",
                self.offset,
                path.display(),
                questions.len()
            )));
        }
        let tokenizer = Tokenizer::load(&ctx.input_path(&self.tokenizer))?;
        Ok(Box::new(Hotpot { config: self, questions, tokenizer }))
    }
}

/// One question of the distractor format.
#[derive(Debug, Clone, Deserialize)]
pub struct HotpotItem {
    #[serde(rename = "_id")]
    pub id: String,
    pub question: String,
    pub answer: String,
    pub supporting_facts: Vec<(String, usize)>,
    pub context: Vec<(String, Vec<String>)>,
    #[serde(default)]
    pub r#type: String,
    #[serde(default)]
    pub level: String,
}

/// Reads a HotpotQA JSON file, naming the file on error.
pub fn load(path: &std::path::Path) -> Result<Vec<HotpotItem>, StageError> {
    let bytes = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    // A byte-order mark some editors write is not part of the JSON.
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    serde_json::from_slice(bytes).map_err(|e| StageError::BadRecord {
        path: path.to_path_buf(),
        line: e.line(),
        message: format!("not HotpotQA distractor JSON: {e}"),
    })
}

struct Hotpot {
    config: HotpotConfig,
    questions: Vec<HotpotItem>,
    tokenizer: Tokenizer,
}

/// A paragraph as the document shows it: the title line, then the text.
fn paragraph(title: &str, sentences: &[String]) -> String {
    format!("{title}\n{}", sentences.concat().trim())
}

impl Stage for Hotpot {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let end = self.config.count.map_or(self.questions.len(), |c| self.config.offset.saturating_add(c).min(self.questions.len()));
        let (mut emitted, mut too_long) = (0u64, 0u64);
        for index in self.config.offset..end {
            for &length in &self.config.lengths {
                match self.render(index, length)? {
                    Some(record) => {
                        io.send_record("records", record)?;
                        emitted += 1;
                    }
                    None => too_long += 1,
                }
            }
        }
        if too_long > 0 {
            tracing::warn!(count = too_long, "questions whose own paragraphs exceed a length were skipped");
        }
        let summary = io.summary_mut();
        summary.insert("records".into(), emitted.into());
        summary.insert("skipped_gold_over_budget".into(), too_long.into());
        Ok(())
    }
}

impl Hotpot {
    /// The question at `index` padded to `length` tokens; `None` when its gold paragraphs
    /// alone exceed the length.
    fn render(&self, index: usize, length: usize) -> Result<Option<Record>, StageError> {
        let item = &self.questions[index];
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ (length as u64).wrapping_mul(0x9e37_79b9));
        rng.set_stream(index as u64);
        let gold_titles: BTreeSet<&str> = item.supporting_facts.iter().map(|(t, _)| t.as_str()).collect();
        let gold: Vec<String> =
            item.context.iter().filter(|(t, _)| gold_titles.contains(t.as_str())).map(|(t, s)| paragraph(t, s)).collect();
        let supporting: Vec<String> = item
            .supporting_facts
            .iter()
            .filter_map(|(title, i)| item.context.iter().find(|(t, _)| t == title).and_then(|(_, s)| s.get(*i)))
            .map(|s| s.trim().to_string())
            .collect();
        // Padding: the question's own distractors first, then other questions' paragraphs.
        let mut own: Vec<(&String, &Vec<String>)> =
            item.context.iter().filter(|(t, _)| !gold_titles.contains(t.as_str())).map(|(t, s)| (t, s)).collect();
        own.shuffle(&mut rng);
        let mut others: Vec<usize> = (0..self.questions.len()).filter(|&i| i != index).collect();
        others.shuffle(&mut rng);
        let candidates = own
            .into_iter()
            .chain(others.iter().flat_map(|&i| self.questions[i].context.iter().map(|(t, s)| (t, s))))
            .filter(|(t, _)| !gold_titles.contains(t.as_str()));
        let count = |text: &str| self.tokenizer.encode(text).map(|ids| ids.len());
        let fixed = count(&format!("{}\n\n{}", gold.join("\n\n"), item.question))?;
        if fixed > length {
            return Ok(None);
        }
        let mut used = fixed;
        let mut padding: Vec<String> = Vec::new();
        for (title, sentences) in candidates {
            let whole = paragraph(title, sentences);
            let cost = count(&format!("\n\n{whole}"))?;
            if used + cost <= length {
                used += cost;
                padding.push(whole);
                continue;
            }
            // The last paragraph only in part: as many sentences as still fit.
            let mut taken: Vec<String> = Vec::new();
            for sentence in sentences {
                taken.push(sentence.clone());
                if used + count(&format!("\n\n{}", paragraph(title, &taken)))? > length {
                    taken.pop();
                    break;
                }
            }
            if !taken.is_empty() {
                padding.push(paragraph(title, &taken));
            }
            break;
        }
        padding.shuffle(&mut rng);
        let mut slots: Vec<usize> = gold.iter().map(|_| rng.random_range(0..=padding.len())).collect();
        slots.sort_unstable();
        let mut body = padding;
        for (offset, (slot, text)) in slots.iter().zip(&gold).enumerate() {
            body.insert(slot + offset, text.clone());
        }
        let context = body.join("\n\n");
        let offsets: Vec<usize> = gold.iter().filter_map(|g| context.find(g.as_str())).collect();
        let total = context.len().max(1) as f64;
        let mut record = Record::new(format!("{}@{length}", item.id), item.question.clone());
        record.context = context;
        record.answers = vec![item.answer.clone()];
        record.kind = AnswerKind::Text;
        record.data_source = "hotpotqa".into();
        record.input_tokens = Some(count(&record.input_text())?);
        record.length_budget = Some(length);
        record.trace = Some(crate::prompt::quoting_trace(&supporting, &item.answer));
        record.metadata.insert("question_id".into(), item.id.clone().into());
        record.metadata.insert("supporting_sentences".into(), json!(supporting));
        record.metadata.insert("fact_offsets".into(), json!(offsets));
        record.metadata.insert("depths".into(), json!(offsets.iter().map(|&o| o as f64 / total).collect::<Vec<_>>()));
        record.metadata.insert("type".into(), item.r#type.clone().into());
        record.metadata.insert("level".into(), item.level.clone().into());
        Ok(Some(record))
    }
}
