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
    /// Anything else the source carried or stages annotated.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
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
            metadata: serde_json::Map::new(),
        }
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
