//! The reward a recipe declares: the rule check, the LLM judge where the rule misses
//! (score = max of the two, as QwenLong-L1), and an optional recipe closure as the reward or
//! an extra term. One object, shared by RL phases and evaluations.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::StageError;
use crate::record::{AnswerKind, Record};
use crate::reward::judge::{Judge, JudgeRequest, JudgeVerdict, judge_question};
use crate::reward::{RuleConfig, Verdict};
use crate::script::{ScriptFn, to_dynamic};

/// When the judge is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JudgeWhen {
    /// Only when the rule scores below 1 (QwenLong-L1's released code).
    #[default]
    Miss,
    Always,
    Never,
}

/// How a script's value combines with the rule and judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScriptMode {
    /// The script's value is the reward.
    #[default]
    Replace,
    /// The script's value is added to the rule/judge reward.
    Add,
}

/// The score of one response and how it was reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardOutcome {
    /// `None` when the sample could not be scored (the judge failed where it was needed).
    pub score: Option<f32>,
    pub rule: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeVerdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<f32>,
}

/// A reward: rule, optional judge, optional script.
pub struct Reward {
    pub rule: RuleConfig,
    pub judge: Option<Arc<Judge>>,
    pub judge_when: JudgeWhen,
    pub script: Option<ScriptFn>,
    pub script_mode: ScriptMode,
    /// Answer kind by data_source, overriding the records' own.
    pub kinds: BTreeMap<String, AnswerKind>,
}

impl std::fmt::Debug for Reward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reward")
            .field("rule", &self.rule)
            .field("judge", &self.judge.as_ref().map(|j| j.config().model.clone()))
            .field("judge_when", &self.judge_when)
            .finish_non_exhaustive()
    }
}

impl Reward {
    /// The rule check alone.
    pub fn rule_only(rule: RuleConfig) -> Self {
        Self { rule, judge: None, judge_when: JudgeWhen::Never, script: None, script_mode: ScriptMode::Replace, kinds: BTreeMap::new() }
    }

    fn kind_of(&self, record: &Record) -> AnswerKind {
        self.rule.kind.or_else(|| self.kinds.get(&record.data_source).copied()).unwrap_or(record.kind)
    }

    /// Scores many (record, response) pairs; the judge's requests run concurrently.
    pub fn score_all(&self, items: &[(&Record, &str)]) -> Result<Vec<RewardOutcome>, StageError> {
        let mut outcomes: Vec<RewardOutcome> = items
            .iter()
            .map(|(record, response)| {
                let rule = self.rule.score_against(response, &record.answers, self.kind_of(record));
                RewardOutcome { score: Some(rule.score), rule, judge: None, script: None }
            })
            .collect();
        if let Some(judge) = &self.judge {
            let wanted: Vec<usize> = (0..items.len())
                .filter(|&i| {
                    let outcome = &outcomes[i];
                    let asks = match self.judge_when {
                        JudgeWhen::Never => false,
                        JudgeWhen::Always => true,
                        JudgeWhen::Miss => outcome.rule.score < 1.0,
                    };
                    // Choice answers are letters: the rule is exact, as in QwenLong-L1.
                    asks && outcome.rule.answer.is_some() && self.kind_of(items[i].0) != AnswerKind::Choice
                })
                .collect();
            let requests: Vec<JudgeRequest> = wanted
                .iter()
                .map(|&i| JudgeRequest {
                    question: judge_question(&items[i].0.question),
                    prediction: outcomes[i].rule.answer.clone().unwrap_or_default(),
                    gold: items[i].0.answers.join(" | "),
                })
                .collect();
            for (&i, verdict) in wanted.iter().zip(judge.judge_all(&requests)) {
                let outcome = &mut outcomes[i];
                outcome.score = match verdict.score() {
                    Some(j) => Some(j.max(outcome.rule.score)),
                    None if outcome.rule.score >= 1.0 => Some(outcome.rule.score),
                    None => None,
                };
                outcome.judge = Some(verdict);
            }
        }
        if let Some(script) = &self.script {
            for ((record, response), outcome) in items.iter().zip(outcomes.iter_mut()) {
                let value = script.call2((*response).into(), to_dynamic(*record)?)?;
                let value =
                    value.as_float().map(|f| f as f32).or_else(|_| value.as_int().map(|i| i as f32)).map_err(|t| {
                        StageError::Failed(format!("reward closure at {} returned {t}, expected a number", script.origin()))
                    })?;
                if !value.is_finite() {
                    return Err(StageError::Failed(format!(
                        "reward closure at {} returned {value} (as f32) for a response to `{}`; a reward must be a finite number",
                        script.origin(),
                        crate::guard::first_line(&record.question, 80)
                    )));
                }
                outcome.script = Some(value);
                outcome.score = match self.script_mode {
                    ScriptMode::Replace => Some(value),
                    ScriptMode::Add => outcome.score.map(|s| s + value),
                };
            }
        }
        Ok(outcomes)
    }
}
