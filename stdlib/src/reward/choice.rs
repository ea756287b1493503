//! Multiple-choice answers: a letter A-D, written as "(A)", "A", "A." or "option A".

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
        // A lowercase letter counts only alone or in parentheses ("a cat" is not a choice).
        if c.is_ascii_lowercase() && chars.len() > 1 && !(before == Some('(') && after == Some(')')) {
            continue;
        }
        let standalone = before.is_none_or(|b| !b.is_alphanumeric()) && after.is_none_or(|a| !a.is_alphanumeric());
        if standalone {
            return Some(upper);
        }
    }
    None
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
            ("Paris", None),
            ("E", None),
            ("a cat", None),
        ] {
            assert_eq!(parse_choice(text), expected, "{text:?}");
        }
        assert_eq!(score_choice("(C) because", "C"), 1.0);
        assert_eq!(score_choice("(A)", "C"), 0.0);
    }
}
