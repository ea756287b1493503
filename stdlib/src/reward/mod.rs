//! Rewards: answer extraction, the rule verifiers for text, numeric and choice answers, the
//! LLM judge, and [`Reward`], the reward a recipe declares (rule, judge where the rule
//! misses, optional script), which travels on reward edges. The verifier used for a record
//! follows its answer kind, overridable per recipe.

pub mod choice;
pub mod extract;
pub mod hybrid;
pub mod judge;
pub mod numeric;
pub mod text;

use serde::{Deserialize, Serialize};

use crate::record::{AnswerKind, Record};
pub use extract::{Extracted, extract_answer};
pub use hybrid::{JudgeWhen, Reward, RewardOutcome, ScriptMode};
pub use numeric::NumericMatch;
pub use text::TextMatch;

/// Options of the rule check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[derive(Default)]
pub struct RuleConfig {
    /// Score 0 when the response has no `</think>` (QwenLong-L1's released rule).
    #[serde(default)]
    pub require_think_end: bool,
    /// How text answers are compared: `exact`, `contains` or `f1`.
    #[serde(default)]
    pub text: TextMatch,
    /// How numeric answers are compared.
    #[serde(default)]
    pub numeric: NumericMatch,
    /// Use this verifier for every record instead of following its answer kind.
    #[serde(default)]
    pub kind: Option<AnswerKind>,
}

/// How a response was judged by the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Correct,
    Incorrect,
    /// Nothing to compare: no "the answer is" (or no `</think>` when required).
    NoAnswer,
}

/// The rule's score of one response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// In [0, 1]; 1 is a full match (token F1 gives partial scores).
    pub score: f32,
    pub outcome: Outcome,
    /// The extracted answer, if any.
    pub answer: Option<String>,
}

impl RuleConfig {
    /// Problems with the values, for a stage's validation.
    pub fn problems(&self) -> Vec<String> {
        self.numeric.problems()
    }

    /// Scores a response against a record's gold answers (the best over them).
    pub fn score(&self, response: &str, record: &Record) -> Verdict {
        self.score_against(response, &record.answers, self.kind.unwrap_or(record.kind))
    }

    /// Scores a response against gold answers of a kind.
    pub fn score_against(&self, response: &str, golds: &[String], kind: AnswerKind) -> Verdict {
        let Some(answer) = extract_answer(response, self.require_think_end).answer().map(str::to_string) else {
            return Verdict { score: 0.0, outcome: Outcome::NoAnswer, answer: None };
        };
        let score = golds
            .iter()
            .map(|gold| match kind {
                AnswerKind::Text => text::score_text(&answer, gold, self.text),
                AnswerKind::Number => numeric::score_numeric(&answer, gold, &self.numeric),
                AnswerKind::Choice => choice::score_choice(&answer, gold),
            })
            .fold(0.0, f32::max);
        let outcome = if score >= 1.0 { Outcome::Correct } else { Outcome::Incorrect };
        Verdict { score, outcome, answer: Some(answer) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_picks_the_verifier() {
        let rule = RuleConfig::default();
        let golds = vec!["1234.5".to_string()];
        let v = rule.score_against("Therefore, the answer is $1,234.5 million.", &golds, AnswerKind::Number);
        assert_eq!((v.score, v.outcome), (1.0, Outcome::Correct));
        let v = rule.score_against("Therefore, the answer is $1,234.5 million.", &golds, AnswerKind::Text);
        assert_eq!(v.outcome, Outcome::Incorrect);
        let v = rule.score_against("I give up.", &golds, AnswerKind::Number);
        assert_eq!((v.score, v.outcome, v.answer), (0.0, Outcome::NoAnswer, None));
        let v = rule.score_against("The correct answer is (B).", &["B".into()], AnswerKind::Choice);
        assert_eq!(v.outcome, Outcome::Correct, "the DocQA phrasing counts");
        let v = rule.score_against("So the answer is (B).", &["B".into()], AnswerKind::Choice);
        assert_eq!(v.outcome, Outcome::Correct);
        let v = rule.score_against("the answer is the Eiffel Tower", &["Tower".into(), "Eiffel Tower".into()], AnswerKind::Text);
        assert_eq!(v.score, 1.0);
    }

    #[test]
    fn choice_answers_phrased_as_docqa_prompts_ask_are_scored() {
        let rule = RuleConfig::default();
        let gold = vec!["B".to_string()];
        for response in ["The correct answer is (B).", "<think>..</think>The correct answer is B", "The correct answer is:\n(B)"] {
            let v = rule.score_against(response, &gold, AnswerKind::Choice);
            assert_eq!((v.score, v.outcome), (1.0, Outcome::Correct), "{response:?}");
        }
        let v = rule.score_against("The correct answer is A bank may refuse.", &["A".into()], AnswerKind::Choice);
        assert_eq!(v.outcome, Outcome::Incorrect, "an article is not choice A");
    }
}
