//! Multiple-choice answers: a letter A-D, written as "(A)", "A", "A." or "option A" (the
//! answer extraction already reads "The correct answer is (A)"). A sentence-initial article
//! "A" ("A company may ...") is not choice A.

/// Words that, after a bare "A", make it a choice letter rather than an article ("A is
/// correct", "A because ...").
const AFTER_LETTER: &[&str] =
    &["is", "was", "because", "since", "as", "and", "or", "but", "fits", "matches", "corresponds", "seems", "appears", "would", "should"];

/// The chosen letter in an extracted answer: the first standalone A-D.
pub fn parse_choice(text: &str) -> Option<char> {
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let upper = c.to_ascii_uppercase();
        if !matches!(upper, 'A'..='D') {
            continue;
        }
        let before = i.checked_sub(1).map(|j| chars[j]);
        let after = chars.get(i + 1).copied();
        let bracketed = matches!(before, Some('(' | '[')) && matches!(after, Some(')' | ']'));
        // A lowercase letter counts only alone or in brackets ("a cat" is not a choice).
        if c.is_ascii_lowercase() && chars.len() > 1 && !bracketed {
            continue;
        }
        let standalone = before.is_none_or(|b| !b.is_alphanumeric()) && after.is_none_or(|a| !a.is_alphanumeric());
        if standalone && !(c == 'A' && !bracketed && is_article(&chars[i + 1..])) {
            return Some(upper);
        }
    }
    None
}

/// Whether the text after a bare "A" reads as a noun phrase: a space, then a lowercase word
/// that is not one of [`AFTER_LETTER`].
fn is_article(rest: &[char]) -> bool {
    let Some((first, tail)) = rest.split_first() else { return false };
    if !first.is_whitespace() {
        return false;
    }
    let word: String = tail.iter().skip_while(|c| c.is_whitespace()).take_while(|c| c.is_alphabetic()).collect();
    word.chars().next().is_some_and(char::is_lowercase) && !AFTER_LETTER.contains(&word.as_str())
}

/// Score in {0, 1}: the predicted letter equals the gold letter.
pub fn score_choice(prediction: &str, gold: &str) -> f32 {
    match (parse_choice(prediction), parse_choice(gold)) {
        (Some(p), Some(g)) => f32::from(p == g),
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_in_their_usual_forms() {
        for (text, expected) in [
            ("(A)", Some('A')),
            ("B", Some('B')),
            ("C.", Some('C')),
            ("option D: Paris", Some('D')),
            ("(b)", Some('B')),
            ("[c]", Some('C')),
            ("Paris", None),
            ("E", None),
            ("a cat", None),
        ] {
            assert_eq!(parse_choice(text), expected, "{text:?}");
        }
        assert_eq!(score_choice("(C) because", "C"), 1.0);
        assert_eq!(score_choice("(A)", "C"), 0.0);
    }

    #[test]
    fn a_sentence_initial_article_is_not_choice_a() {
        for (text, expected) in [
            ("A company may not cancel the policy, so (C)", Some('C')),
            ("A bank loan", None),
            ("A tenant must pay. D", Some('D')),
            ("A", Some('A')),
            ("A.", Some('A')),
            ("A) the first", Some('A')),
            ("A is correct", Some('A')),
            ("A because the text says so", Some('A')),
            ("A, since the clause applies", Some('A')),
            ("(A) a company", Some('A')),
        ] {
            assert_eq!(parse_choice(text), expected, "{text:?}");
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::record::AnswerKind;
    use crate::reward::{Outcome, RuleConfig};
    use proptest::prelude::*;

    fn letter() -> impl Strategy<Value = char> {
        prop_oneof![Just('A'), Just('B'), Just('C'), Just('D')]
    }

    proptest! {
        #![proptest_config(crate::testing::config(512))]

        #[test]
        fn choice_parsing_never_panics(prediction in any::<String>(), gold in any::<String>()) {
            let score = score_choice(&prediction, &gold);
            prop_assert!(score == 0.0 || score == 1.0);
        }

        #[test]
        fn the_gold_letter_is_accepted_and_another_refused(gold in letter(), other in letter(), form in 0usize..4) {
            let written = |l: char| match form {
                0 => format!("({l})"),
                1 => format!("{l}"),
                2 => format!("{l}."),
                _ => format!("option {l}"),
            };
            prop_assert_eq!(score_choice(&written(gold), &gold.to_string()), 1.0);
            prop_assert_eq!(score_choice(&written(other), &gold.to_string()), f32::from(other == gold));
            let response = format!("Reasoning.</think>\nThe correct answer is {}", written(gold));
            let verdict = RuleConfig::default().score_against(&response, &[gold.to_string()], AnswerKind::Choice);
            prop_assert_eq!(verdict.outcome, Outcome::Correct);
        }
    }
}
