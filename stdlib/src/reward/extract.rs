//! Answer extraction: the final answer of a response is the text after the last `</think>`
//! (optionally required), then after the last "the answer is" (or "the correct answer is",
//! the phrase multiple-choice prompts ask for, or "the final answer is"), on the same line or,
//! when that line ends at the marker, on the next line that has text; trimmed of markup.

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

/// The phrases that introduce the final answer, lowercase.
const MARKERS: [&str; 3] = ["the answer is", "the correct answer is", "the final answer is"];

/// Extracts the final answer of `response`.
pub fn extract_answer(response: &str, require_think_end: bool) -> Extracted {
    let after_think = match response.rfind("</think>") {
        Some(at) => &response[at + "</think>".len()..],
        None if require_think_end => return Extracted::NoThinkEnd,
        None => response,
    };
    let Some(end) = MARKERS.iter().filter_map(|marker| last_marker_end(after_think, marker)).max() else {
        return Extracted::NoAnswer;
    };
    let answer = clean(&after_think[end..]);
    if answer.is_empty() { Extracted::NoAnswer } else { Extracted::Answer(answer) }
}

/// Byte offset in `text` just after the last case-insensitive (ASCII) `marker`. Bytes are
/// compared, so text in any script keeps its offsets.
fn last_marker_end(text: &str, marker: &str) -> Option<usize> {
    let (bytes, needle) = (text.as_bytes(), marker.as_bytes());
    if bytes.len() < needle.len() {
        return None;
    }
    (0..=bytes.len() - needle.len())
        .rev()
        .find(|&i| text.is_char_boundary(i) && bytes[i..i + needle.len()].eq_ignore_ascii_case(needle))
        .map(|i| i + needle.len())
}

/// The answer's first line without markup: leading ':' and spaces (and line breaks, when the
/// answer starts on the next line), bold/italics markers, `\boxed{..}`, wrapping quotes or
/// brackets, a trailing period.
fn clean(tail: &str) -> String {
    let line = tail.trim_start_matches(|c: char| c == ':' || c.is_whitespace()).lines().next().unwrap_or("").trim();
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
            ("The correct answer is (C).", false, Extracted::Answer("(C)".into())),
            ("So the final answer is: 12", false, Extracted::Answer("12".into())),
            ("the answer is 3; on reflection the correct answer is (B)", false, Extracted::Answer("(B)".into())),
            ("Straße: the answer is Köln.", false, Extracted::Answer("Köln".into())),
            ("İİİ the answer is x", false, Extracted::Answer("x".into())),
            // The DocQA multiple-choice phrasing.
            ("<think>(B) fits</think>\n\nThe correct answer is (B).", true, Extracted::Answer("(B)".into())),
            ("The correct answer is (A). On reflection, the answer is (C).", false, Extracted::Answer("(C)".into())),
        ];
        for (response, require, expected) in cases {
            assert_eq!(&extract_answer(response, *require), expected, "{response:?}");
        }
    }

    #[test]
    fn an_answer_on_the_line_after_the_marker_is_read() {
        let cases = [
            ("Therefore, the answer is:\nParis", "Paris"),
            ("Therefore, the answer is:\n\n**Ed Wood**.", "Ed Wood"),
            ("Therefore, the answer is\n  42\nbecause of the table", "42"),
            ("<think>x</think>\nThe correct answer is:\r\n(D)", "(D)"),
        ];
        for (response, expected) in cases {
            assert_eq!(extract_answer(response, false).answer(), Some(expected), "{response:?}");
        }
        assert_eq!(extract_answer("the answer is:\n\n", false), Extracted::NoAnswer);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Text without any marker phrase, so the answer written after one is the last.
    fn plain_text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 ,;.\\n<>/]{0,80}".prop_filter("no marker", |t| !t.to_lowercase().contains("answer is"))
    }

    proptest! {
        #![proptest_config(crate::testing::config(512))]

        #[test]
        fn extraction_never_panics(response in any::<String>(), require in any::<bool>()) {
            if let Extracted::Answer(answer) = extract_answer(&response, require) {
                prop_assert!(!answer.is_empty());
                prop_assert!(!answer.contains('\n'));
            }
        }

        #[test]
        fn extraction_never_panics_near_markers(
            parts in proptest::collection::vec(prop_oneof![
                Just("the answer is".to_string()), Just("THE CORRECT ANSWER IS".to_string()), Just("</think>".to_string()),
                Just(":\n".to_string()), Just("**".to_string()), Just("\\boxed{".to_string()), "\\PC{0,6}",
            ], 0..12)
        ) {
            let response = parts.concat();
            let _ = extract_answer(&response, false);
            let _ = extract_answer(&response, true);
        }

        #[test]
        fn the_answer_after_the_last_marker_is_read(
            before in plain_text(),
            answer in "[A-Za-z0-9][A-Za-z0-9 ]{0,20}[A-Za-z0-9]",
            marker in prop_oneof![Just("the answer is"), Just("The correct answer is"), Just("the final answer is:")],
            newline in any::<bool>(),
        ) {
            let gap = if newline { "\n" } else { " " };
            let response = format!("{before} Therefore, {marker}{gap}{answer}.");
            let extracted = extract_answer(&response, false);
            prop_assert_eq!(extracted.answer(), Some(answer.as_str()));
        }
    }
}
