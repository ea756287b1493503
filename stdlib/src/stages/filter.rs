//! `filter` (the data filter): drops records by input length in real tokens, duplicates,
//! missing gold answers or a recipe predicate, and counts what each rule dropped.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::StageError;
use crate::options::{at_most, limits};
use crate::record::Record;
use crate::script::{ScriptFn, to_dynamic};
use crate::stage::{ClosureRef, PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};
use crate::tokenizer::Tokenizer;

/// Options of the `filter` stage.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// tokenizer.json (or a model directory holding one) that measures input length; needed
    /// by the length bounds. Kept records get `input_tokens` set.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Drop records whose input (document + question) has fewer tokens than this.
    #[serde(default)]
    pub min_input_tokens: Option<usize>,
    /// Drop records whose input (document + question) has more tokens than this.
    #[serde(default)]
    pub max_input_tokens: Option<usize>,
    /// Drop a record whose normalized question and document were already seen.
    #[serde(default)]
    pub dedup: bool,
    /// Drop records without a gold answer.
    #[serde(default)]
    pub require_answer: bool,
    /// Keep only the records for which this closure returns true: `|r| r.data_source != "x"`.
    #[serde(default)]
    pub predicate: Option<ClosureRef>,
    /// Records tokenized together (the tokenizer spreads a batch over all cores).
    #[serde(default = "default_batch")]
    pub batch: usize,
}

fn default_batch() -> usize {
    64
}

impl StageConfig for FilterConfig {
    const NAME: &'static str = "filter";
    const SUMMARY: &'static str = "Drops records by input length in tokens, duplicates, missing answers or a predicate.";
    const INPUTS: &'static [PortSpec] = &[PortSpec::required("input", PortKind::Records, "records to filter")];
    const OUTPUTS: &'static [PortSpec] = &[PortSpec::optional("records", PortKind::Records, "the records kept")];

    fn validate(&self, ctx: &StageContext) -> Vec<String> {
        let mut problems = Vec::new();
        let bounded = self.min_input_tokens.is_some() || self.max_input_tokens.is_some();
        match &self.tokenizer {
            None if bounded => problems.push("option `tokenizer` is needed to measure input length".into()),
            None => {}
            Some(path) => {
                let full = ctx.input_path(path);
                let file = if full.is_dir() { full.join("tokenizer.json") } else { full };
                if !file.is_file() {
                    problems.push(format!("option `tokenizer`: file {} does not exist", file.display()));
                }
            }
        }
        if let (Some(lo), Some(hi)) = (self.min_input_tokens, self.max_input_tokens)
            && lo > hi
        {
            problems.push(format!("min_input_tokens ({lo}) is above max_input_tokens ({hi})"));
        }
        if self.batch == 0 {
            problems.push("option `batch` must be at least 1".into());
        }
        problems.extend(at_most("batch", self.batch, limits::GROUP * 16));
        problems
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let tokenizer = match &self.tokenizer {
            Some(path) => Some(Tokenizer::load(&ctx.input_path(path))?),
            None => None,
        };
        let predicate = self.predicate.map(|r| ctx.closure(r)).transpose()?;
        Ok(Box::new(Filter { config: self, tokenizer, predicate, seen: HashSet::new(), counts: DropCounts::default() }))
    }
}

/// How many records each rule dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DropCounts {
    pub no_answer: u64,
    pub predicate: u64,
    pub too_short: u64,
    pub too_long: u64,
    pub duplicate: u64,
    pub kept: u64,
}

struct Filter {
    config: FilterConfig,
    tokenizer: Option<Tokenizer>,
    predicate: Option<ScriptFn>,
    seen: HashSet<u64>,
    counts: DropCounts,
}

impl Filter {
    /// Rules that need no tokenizer; `false` drops the record.
    fn keep_cheap(&mut self, record: &Record) -> Result<bool, StageError> {
        if self.config.require_answer && record.answers.iter().all(|a| a.trim().is_empty()) {
            self.counts.no_answer += 1;
            return Ok(false);
        }
        if let Some(predicate) = &self.predicate
            && !predicate.call_bool(to_dynamic(record)?)?
        {
            self.counts.predicate += 1;
            return Ok(false);
        }
        Ok(true)
    }

    /// Length rules, given the record's token count.
    fn keep_length(&mut self, tokens: usize) -> bool {
        if self.config.min_input_tokens.is_some_and(|lo| tokens < lo) {
            self.counts.too_short += 1;
            return false;
        }
        if self.config.max_input_tokens.is_some_and(|hi| tokens > hi) {
            self.counts.too_long += 1;
            return false;
        }
        true
    }

    /// Dedup last, so a record dropped for another reason does not hide a later copy.
    fn keep_unique(&mut self, record: &Record) -> bool {
        if !self.config.dedup {
            return true;
        }
        if self.seen.insert(content_hash(record)) {
            true
        } else {
            self.counts.duplicate += 1;
            false
        }
    }

    /// Measures and filters a batch, sending what is kept.
    fn flush(&mut self, batch: &mut Vec<Record>, io: &mut StageIo) -> Result<(), StageError> {
        if batch.is_empty() {
            return Ok(());
        }
        if let Some(tokenizer) = &self.tokenizer {
            let texts = batch.iter().map(Record::input_text).collect();
            let counts = tokenizer.count_batch(texts)?;
            for (record, count) in batch.iter_mut().zip(counts) {
                record.input_tokens = Some(count);
            }
        }
        for record in batch.drain(..) {
            let long_enough = record.input_tokens.is_none_or(|t| self.keep_length(t));
            if long_enough && self.keep_unique(&record) {
                self.counts.kept += 1;
                io.send_record("records", record)?;
            }
        }
        Ok(())
    }
}

/// A hash of the normalized question and document (lowercase, whitespace collapsed).
pub fn content_hash(record: &Record) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for text in [&record.question, &record.context] {
        for word in text.split_whitespace() {
            word.to_lowercase().hash(&mut hasher);
        }
        0xffu8.hash(&mut hasher);
    }
    if let Some(prompt) = &record.prompt {
        for turn in prompt {
            for word in turn.content.split_whitespace() {
                word.to_lowercase().hash(&mut hasher);
            }
        }
    }
    hasher.finish()
}

impl Stage for Filter {
    fn run(mut self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let batch_size = self.config.batch;
        let mut batch = Vec::with_capacity(batch_size);
        while let Some(record) = io.recv_record("input")? {
            if self.keep_cheap(&record)? {
                batch.push(record);
                if batch.len() >= batch_size {
                    self.flush(&mut batch, io)?;
                }
            }
        }
        self.flush(&mut batch, io)?;
        let c = self.counts;
        tracing::info!(
            kept = c.kept,
            too_long = c.too_long,
            too_short = c.too_short,
            duplicate = c.duplicate,
            no_answer = c.no_answer,
            predicate = c.predicate,
            "filter finished"
        );
        let summary = io.summary_mut();
        for (name, value) in [
            ("kept", c.kept),
            ("dropped_too_long", c.too_long),
            ("dropped_too_short", c.too_short),
            ("dropped_duplicate", c.duplicate),
            ("dropped_no_answer", c.no_answer),
            ("dropped_predicate", c.predicate),
        ] {
            summary.insert(name.into(), value.into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_ignores_case_and_spacing() {
        let mut a = Record::new("1", "Who wrote  Hamlet?");
        a.context = "A play.".into();
        let mut b = Record::new("2", "who wrote hamlet?");
        b.context = "a   play.".into();
        let mut c = Record::new("3", "who wrote hamlet?");
        c.context = "another play.".into();
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_ne!(content_hash(&a), content_hash(&c));
    }
}
