//! The task prompt: the document inside `<text>...</text>`, the question, and an
//! instruction to finish with "Therefore, the answer is ...", rendered with the model's
//! chat template; inputs over budget are cut in the middle (first and last halves kept).

use crate::model::ModelError;
use crate::model::chat::ModelTokenizer;
use crate::record::{ChatMessage, Record};

/// Our instruction, appended after the question.
pub const INSTRUCTION: &str = "Reason step by step, then end with \"Therefore, the answer is\" and the answer.";

/// The user turn of a record without a prebuilt prompt.
pub fn user_turn(record: &Record) -> String {
    format!("<text>\n{}\n</text>\n\n{}\n\n{INSTRUCTION}", record.context, record.question)
}

/// The conversation to render: the record's own prompt, or one user turn.
pub fn messages(record: &Record) -> Vec<ChatMessage> {
    record.prompt.clone().unwrap_or_else(|| vec![ChatMessage { role: "user".into(), content: user_turn(record) }])
}

/// Keeps the first `budget / 2` and the last `budget - budget / 2` tokens.
pub fn truncate_middle(ids: &[u32], budget: usize) -> Vec<u32> {
    if ids.len() <= budget {
        return ids.to_vec();
    }
    let head = budget / 2;
    let tail = budget - head;
    let mut out = Vec::with_capacity(budget);
    out.extend_from_slice(&ids[..head]);
    out.extend_from_slice(&ids[ids.len() - tail..]);
    out
}

/// Prompt token ids of a record: chat-templated with a generation prompt, cut in the middle
/// to `max_input` tokens. Returns the ids and whether they were cut.
pub fn encode_prompt(tokenizer: &ModelTokenizer, record: &Record, max_input: usize) -> Result<(Vec<u32>, bool), ModelError> {
    let ids = tokenizer.encode_chat(&messages(record), true, &serde_json::json!({ "enable_thinking": true }))?;
    let cut = ids.len() > max_input;
    Ok((truncate_middle(&ids, max_input), cut))
}

/// The SFT target of a record: its `trace` if the source wrote one, else a trace quoting
/// the supporting sentences of its data (`metadata.supporting_sentences`, as HotpotQA-style
/// files carry them), then the answer.
pub fn reasoning_trace(record: &Record) -> Option<String> {
    if let Some(trace) = &record.trace {
        return Some(trace.clone());
    }
    let answer = record.answers.first()?;
    let facts: Vec<String> = record
        .metadata
        .get("supporting_sentences")
        .and_then(serde_json::Value::as_array)
        .map(|list| list.iter().filter_map(serde_json::Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    Some(quoting_trace(&facts, answer))
}

/// A short reasoning trace: the facts quoted inside `<think>`, then the answer in the form
/// the rule check reads.
pub fn quoting_trace(facts: &[String], answer: &str) -> String {
    if facts.is_empty() {
        format!("<think>\nThe text answers this directly.\n</think>\n\nTherefore, the answer is {answer}.")
    } else {
        format!("<think>\nThe text says: {}\n</think>\n\nTherefore, the answer is {answer}.", facts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn middle_truncation_keeps_both_ends() {
        let ids: Vec<u32> = (0..10).collect();
        assert_eq!(truncate_middle(&ids, 4), vec![0, 1, 8, 9]);
        assert_eq!(truncate_middle(&ids, 5), vec![0, 1, 7, 8, 9]);
        assert_eq!(truncate_middle(&ids, 10), ids);
        assert_eq!(truncate_middle(&ids, 20), ids);
    }

    #[test]
    fn traces_quote_the_supporting_sentences() {
        let mut record = Record::new("1", "Where?");
        record.answers = vec!["Oslo".into()];
        record.metadata.insert("supporting_sentences".into(), serde_json::json!(["Ann lives in Oslo."]));
        let trace = reasoning_trace(&record).expect("trace");
        assert!(trace.contains("The text says: Ann lives in Oslo."));
        assert!(trace.ends_with("Therefore, the answer is Oslo."));
        let user = user_turn(&record);
        assert!(user.starts_with("<text>\n") && user.contains("</text>\n\nWhere?"));
    }
}
