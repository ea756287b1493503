//! Text answers: SQuAD-style normalization (lowercase, no punctuation, no articles,
//! single spaces), then exact match, containment or token F1.

use std::collections::HashMap;

/// How a normalized prediction is compared with a normalized gold answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TextMatch {
    /// Equal after normalization.
    Exact,
    /// Gold inside the prediction or the prediction inside gold (QwenLong-L1's released rule).
    #[default]
    Contains,
    /// Token-level F1 (a partial score).
    F1,
}

/// Lowercase, drop punctuation and the articles a/an/the, collapse whitespace.
pub fn normalize(text: &str) -> String {
    let lower = text.to_lowercase();
    let no_punct: String = lower.chars().map(|c| if c.is_ascii_punctuation() || is_unicode_punct(c) { ' ' } else { c }).collect();
    no_punct.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).collect::<Vec<_>>().join(" ")
}

fn is_unicode_punct(c: char) -> bool {
    matches!(c, '\u{2018}' | '\u{2019}' | '\u{201c}' | '\u{201d}' | '\u{2013}' | '\u{2014}' | '\u{2026}' | '\u{00bf}' | '\u{00a1}')
}

/// Score in [0, 1] of a prediction against one gold answer.
pub fn score_text(prediction: &str, gold: &str, mode: TextMatch) -> f32 {
    let (p, g) = (normalize(prediction), normalize(gold));
    if p.is_empty() || g.is_empty() {
        return 0.0;
    }
    match mode {
        TextMatch::Exact => f32::from(p == g),
        TextMatch::Contains => f32::from(contains_words(&p, &g) || contains_words(&g, &p)),
        TextMatch::F1 => token_f1(&p, &g),
    }
}

/// Whether `needle`'s words appear consecutively in `haystack`'s words.
fn contains_words(haystack: &str, needle: &str) -> bool {
    let h: Vec<&str> = haystack.split(' ').collect();
    let n: Vec<&str> = needle.split(' ').collect();
    n.len() <= h.len() && h.windows(n.len()).any(|w| w == n.as_slice())
}

fn token_f1(p: &str, g: &str) -> f32 {
    let mut counts: HashMap<&str, i32> = HashMap::new();
    for w in g.split(' ') {
        *counts.entry(w).or_default() += 1;
    }
    let mut common = 0;
    for w in p.split(' ') {
        if let Some(c) = counts.get_mut(w)
            && *c > 0
        {
            *c -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f32 / p.split(' ').count() as f32;
    let recall = common as f32 / g.split(' ').count() as f32;
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_cases() {
        let cases: &[(&str, &str, TextMatch, f32)] = &[
            ("The Eiffel Tower.", "eiffel tower", TextMatch::Exact, 1.0),
            ("an apple, a pear", "Apple pear", TextMatch::Exact, 1.0),
            ("It is the Eiffel Tower in Paris", "Eiffel Tower", TextMatch::Contains, 1.0),
            ("Eiffel", "The Eiffel Tower", TextMatch::Contains, 1.0),
            ("Tower Eiffel", "Eiffel Tower", TextMatch::Contains, 0.0),
            ("yes", "no", TextMatch::Contains, 0.0),
            ("", "x", TextMatch::Contains, 0.0),
            ("the", "a", TextMatch::Exact, 0.0),
        ];
        for (p, g, mode, expected) in cases {
            assert_eq!(score_text(p, g, *mode), *expected, "{p:?} vs {g:?} ({mode:?})");
        }
        let f1 = score_text("Eiffel Tower Paris", "Eiffel Tower", TextMatch::F1);
        assert!((f1 - 0.8).abs() < 1e-6, "{f1}");
        // "contains" matches whole words, not substrings: "11" is not in "110".
        assert_eq!(score_text("110", "11", TextMatch::Contains), 0.0);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn mode() -> impl Strategy<Value = TextMatch> {
        prop_oneof![Just(TextMatch::Exact), Just(TextMatch::Contains), Just(TextMatch::F1)]
    }

    proptest! {
        #![proptest_config(crate::testing::config(512))]

        #[test]
        fn text_scores_never_panic_and_stay_in_range(prediction in any::<String>(), gold in any::<String>(), mode in mode()) {
            let score = score_text(&prediction, &gold, mode);
            prop_assert!((0.0..=1.0).contains(&score), "{}", score);
        }

        #[test]
        fn a_prediction_equal_to_the_gold_is_accepted(gold in "\\PC{1,40}", mode in mode()) {
            prop_assume!(!normalize(&gold).is_empty());
            prop_assert_eq!(score_text(&gold, &gold, mode), 1.0);
            // Case, punctuation and articles do not matter.
            let dressed = format!("The {}.", gold.to_uppercase());
            if normalize(&dressed) == normalize(&gold) {
                prop_assert_eq!(score_text(&dressed, &gold, mode), 1.0);
            }
        }

        #[test]
        fn answers_without_a_common_word_are_refused(
            prediction in proptest::collection::vec("[a-m]{2,6}", 1..5),
            gold in proptest::collection::vec("[n-z]{2,6}", 1..5),
            mode in mode(),
        ) {
            prop_assert_eq!(score_text(&prediction.join(" "), &gold.join(" "), mode), 0.0);
        }
    }
}
