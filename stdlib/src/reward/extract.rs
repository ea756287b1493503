//! Answer extraction: the final answer of a response is the text after the last `</think>`
//! (optionally required), then after the last "the answer is" (or "the correct answer is",
//! the DocQA multiple-choice phrasing), trimmed of markup.

/// What extraction found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extracted {
    /// The answer text.
    Answer(String),
    /// `</think>` was required and is absent (the reasoning never finished).
    NoThinkEnd,
    /// No "the answer is" after the reasoning.
    NoAnswer,
}

impl Extracted {
    pub fn answer(&self) -> Option<&str> {
        match self {
            Self::Answer(text) => Some(text),
            _ => None,
        }
    }
}

/// Phrases the answer follows; the last one in the response wins.
const MARKERS: [&str; 2] = ["the answer is", "the correct answer is"];

/// Extracts the final answer of `response`.
pub fn extract_answer(response: &str, require_think_end: bool) -> Extracted {
    let after_think = match response.rfind("</think>") {
        Some(at) => &response[at + "</think>".len()..],
        None if require_think_end => return Extracted::NoThinkEnd,
        None => response,
    };
    let lower = after_think.to_lowercase();
    // Lowercasing can change byte lengths (rare scripts); search on a char-aligned copy.
    let Some(end) =
        MARKERS.iter().filter_map(|marker| find_last_ascii_case_insensitive(after_think, &lower, marker).map(|at| at + marker.len())).max()
    else {
        return Extracted::NoAnswer;
    };
    let tail = &after_think[end..];
    let answer = clean(tail);
    if answer.is_empty() { Extracted::NoAnswer } else { Extracted::Answer(answer) }
}

/// Byte offset in `text` of the last case-insensitive `marker` (lowercase ASCII).
fn find_last_ascii_case_insensitive(text: &str, lower: &str, marker: &str) -> Option<usize> {
    if lower.len() == text.len() {
        return lower.rfind(marker);
    }
    let bytes = text.as_bytes();
    (0..=bytes.len().saturating_sub(marker.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i) && bytes[i..i + marker.len()].eq_ignore_ascii_case(marker.as_bytes()))
}

/// The answer's first line without markup: leading ':' and spaces, bold/italics markers,
/// `\boxed{..}`, wrapping quotes or brackets, a trailing period.
fn clean(tail: &str) -> String {
    let line = tail.trim_start_matches([':', ' ', '\t']).lines().next().unwrap_or("").trim();
    let mut text = line.replace("**", "").replace("__", "").trim().to_string();
    loop {
        let before = text.len();
        text = text.trim_end_matches(['.', ' ', '!']).to_string();
        if let Some(inner) = text.strip_prefix("\\boxed{").and_then(|t| t.strip_suffix('}')) {
            text = inner.trim().to_string();
        }
        for (open, close) in [('"', '"'), ('\'', '\''), ('`', '`'), ('*', '*'), ('$', '$')] {
            if text.len() >= 2 && text.starts_with(open) && text.ends_with(close) {
                text = text[open.len_utf8()..text.len() - close.len_utf8()].trim().to_string();
            }
        }
        if text.len() == before {
            return text;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_cases() {
        let cases: &[(&str, bool, Extracted)] = &[
            ("<think>hmm</think>\nTherefore, the answer is Paris.", true, Extracted::Answer("Paris".into())),
            ("The answer is 3. No wait, the answer is 4.", false, Extracted::Answer("4".into())),
            ("reasoning without end. The answer is 5.", true, Extracted::NoThinkEnd),
            ("reasoning without end. The answer is 5.", false, Extracted::Answer("5".into())),
            ("<think>the answer is 1</think> I am not sure.", true, Extracted::NoAnswer),
            ("Therefore, THE ANSWER IS: **\"Ed Wood\"**.\nMore text", false, Extracted::Answer("Ed Wood".into())),
            ("so the answer is \\boxed{42}.", false, Extracted::Answer("42".into())),
            ("the answer is", false, Extracted::NoAnswer),
            ("", false, Extracted::NoAnswer),
            // The DocQA multiple-choice phrasing.
            ("<think>(B) fits</think>\n\nThe correct answer is (B).", true, Extracted::Answer("(B)".into())),
            ("The correct answer is (A). On reflection, the answer is (C).", false, Extracted::Answer("(C)".into())),
        ];
        for (response, require, expected) in cases {
            assert_eq!(&extract_answer(response, *require), expected, "{response:?}");
        }
    }
}
