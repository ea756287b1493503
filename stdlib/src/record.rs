//! The task record: one long-context question with its document and gold answers, the
//! unit that flows on record edges between stages.

use serde::{Deserialize, Serialize};

/// How a record's answer is checked: it picks the rule verifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AnswerKind {
    /// Free text, compared after normalization (multi-hop QA).
    #[default]
    Text,
    /// A number, compared within a relative tolerance (DocMath-like).
    Number,
    /// A multiple-choice letter A-D.
    Choice,
}

impl AnswerKind {
    /// Parses the names used in data files (`text`, `number`/`numeric`, `choice`/`choices`/`mc`).
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" | "qa" | "string" => Some(Self::Text),
            "number" | "numeric" | "math" => Some(Self::Number),
            "choice" | "choices" | "mc" | "multiple_choice" => Some(Self::Choice),
            _ => None,
        }
    }

    /// The canonical lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Number => "number",
            Self::Choice => "choice",
        }
    }
}

/// One chat turn of a prebuilt prompt (verl-style records carry the whole prompt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// One task: a question over a (long) document, with its gold answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unique id within its source.
    pub id: String,
    /// The document the question is about; empty when `prompt` already embeds it.
    #[serde(default)]
    pub context: String,
    /// The question.
    #[serde(default)]
    pub question: String,
    /// Gold answers; any one of them counts as correct.
    #[serde(default)]
    pub answers: Vec<String>,
    /// How answers are compared.
    #[serde(default)]
    pub kind: AnswerKind,
    /// Where the record comes from (routes rewards and eval tables).
    #[serde(default)]
    pub data_source: String,
    /// A prebuilt chat prompt; when present it is used as is instead of the prompt template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Vec<ChatMessage>>,
    /// Input length in tokens, once a tokenizing stage has measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<usize>,
    /// The document length in tokens a source built the task for (synthetic and padded
    /// tasks); it decides the task's phase band and evaluation bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length_budget: Option<usize>,
    /// The SFT target: a reasoning trace ending with the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// How hard the task was for a policy (set by `score_difficulty` and hard buffers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difficulty: Option<Difficulty>,
    /// The hard buffer (its stage label) that carried this task over from an earlier phase;
    /// a carried task trains in the next phase whatever its length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried_from: Option<String>,
    /// The most a carried task's buffer lets carried tasks make of the phase that trains on
    /// them (its `mix`); the phase counts its own tasks in band against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carry_share: Option<f32>,
    /// Anything else the source carried (free-form, never read by the standard stages).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// How hard one task was for a policy: the outcome of its group of sampled responses.
/// Build it with [`Difficulty::new`], which fills the derived figures.
///
/// Difficulty comes from correctness (QwenLong-L1's 1 / mean group reward with rewards of 0
/// or 1), not from rewards after overlong shaping; a task none of whose samples could be
/// scored has no pass rate and no difficulty: it is unknown, not the hardest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Difficulty {
    /// Fraction of the scorable samples judged correct; absent when no sample was scorable.
    pub pass_rate: Option<f32>,
    /// The reward's score of each scorable sample (unscorable ones left out), before any
    /// length shaping.
    pub rewards: Vec<f32>,
    /// Samples drawn, scorable or not.
    pub samples: usize,
    /// Mean of `rewards` (absent when no sample was scorable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_reward: Option<f32>,
    /// 1 / pass rate; absent when infinite (nothing solved) or unknown (nothing scorable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difficulty: Option<f32>,
}

impl Difficulty {
    /// The difficulty of a group: how many samples were correct, the scorable samples'
    /// rewards (before shaping), and how many samples were drawn.
    pub fn new(correct: usize, rewards: Vec<f32>, samples: usize) -> Self {
        let scorable = rewards.len();
        let pass_rate = (scorable > 0).then(|| correct.min(scorable) as f32 / scorable as f32);
        let mean_reward = (scorable > 0).then(|| rewards.iter().sum::<f32>() / scorable as f32);
        let difficulty = pass_rate.filter(|&rate| rate > 0.0).map(|rate| 1.0 / rate);
        Self { pass_rate, rewards, samples, mean_reward, difficulty }
    }

    /// Whether at least one sample could be scored.
    pub fn scored(&self) -> bool {
        self.pass_rate.is_some()
    }

    /// Scored, and no sample was correct (QwenLong-L1's carried tasks).
    pub fn unsolved(&self) -> bool {
        self.pass_rate.is_some_and(|rate| rate <= 0.0)
    }

    /// 1 / pass rate: infinite when nothing was solved, `None` when nothing was scorable.
    pub fn score(&self) -> Option<f32> {
        self.pass_rate.map(|_| self.difficulty.unwrap_or(f32::INFINITY))
    }
}

impl Record {
    /// A record with an id and a question, everything else empty.
    pub fn new(id: impl Into<String>, question: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            context: String::new(),
            question: question.into(),
            answers: Vec::new(),
            kind: AnswerKind::Text,
            data_source: String::new(),
            prompt: None,
            input_tokens: None,
            length_budget: None,
            trace: None,
            difficulty: None,
            carried_from: None,
            carry_share: None,
            metadata: serde_json::Map::new(),
        }
    }

    /// The task's length in tokens, the one rule every stage uses for bands and buckets:
    /// the budget its source built it for, else the measured input tokens, else the length
    /// of its encoded prompt.
    pub fn length(&self, prompt_tokens: usize) -> usize {
        self.length_budget.or(self.input_tokens).unwrap_or(prompt_tokens)
    }

    /// The text a length filter measures: the prompt turns when prebuilt, else the
    /// document followed by the question.
    pub fn input_text(&self) -> String {
        match &self.prompt {
            Some(turns) => {
                let mut text = String::new();
                for turn in turns {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&turn.content);
                }
                text
            }
            None if self.context.is_empty() => self.question.clone(),
            None => format!("{}\n\n{}", self.context, self.question),
        }
    }
}
