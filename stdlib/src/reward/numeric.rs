//! Numeric answers (DocMath-like): parse numbers written with signs, currency symbols,
//! thousands separators, decimals, percents, scale words (thousand, million, billion) or
//! powers like `10^3`; match within a relative tolerance, after rounding, or up to a power
//! of ten (a scale or percent/fraction mix-up), as QwenLong-L1's checker does. Booleans
//! (yes/true, no/false) match exactly.

/// A parsed answer value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NumericValue {
    Number(f64),
    Bool(bool),
}

/// How numbers are compared.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NumericMatch {
    /// Relative tolerance (0.0015 = 0.15%).
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// Also equal when both round to this many decimals alike.
    #[serde(default = "default_decimals")]
    pub decimals: i32,
    /// Also equal when one is the other times a power of ten (1e-9 .. 1e9).
    #[serde(default = "default_true")]
    pub power_of_ten: bool,
}

fn default_tolerance() -> f64 {
    0.0015
}
fn default_decimals() -> i32 {
    3
}
fn default_true() -> bool {
    true
}

impl Default for NumericMatch {
    fn default() -> Self {
        Self { tolerance: default_tolerance(), decimals: default_decimals(), power_of_ten: true }
    }
}

/// The first number (or boolean) written in `text`.
pub fn parse_value(text: &str) -> Option<NumericValue> {
    let lower = text.trim().to_lowercase();
    // A boolean is a yes/no/true/false word alone or followed by punctuation ("Yes, it did").
    let word: String = lower.chars().take_while(|c| c.is_alphabetic()).collect();
    let next = lower[word.len()..].chars().next();
    if next.is_none_or(|c| c.is_ascii_punctuation()) {
        match word.as_str() {
            "yes" | "true" => return Some(NumericValue::Bool(true)),
            "no" | "false" => return Some(NumericValue::Bool(false)),
            _ => {}
        }
    }
    parse_number(&lower).map(NumericValue::Number)
}

/// The first number in `text` (lowercase), with its sign, scale word, percent and power.
fn parse_number(text: &str) -> Option<f64> {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() || (chars[i] == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // Sign: a minus just before the digits (possibly before a currency symbol).
            let mut j = i;
            while j > 0 && matches!(chars[j - 1], '$' | '€' | '£' | '¥' | ' ') {
                j -= 1;
            }
            let negative = j > 0 && matches!(chars[j - 1], '-' | '−' | '–');
            let (mantissa, end) = read_digits(&chars, i);
            let mut value = mantissa;
            let mut k = end;
            // Scientific notation or a power: 1.5e3, 10^3, 10**3.
            if k < chars.len() && chars[k] == 'e' && chars.get(k + 1).is_some_and(|c| c.is_ascii_digit() || *c == '-' || *c == '+') {
                let (exp, after) = read_exponent(&chars, k + 1);
                value *= 10f64.powi(exp);
                k = after;
            } else if k < chars.len() && (chars[k] == '^' || (chars[k] == '*' && chars.get(k + 1) == Some(&'*'))) {
                let start = if chars[k] == '^' { k + 1 } else { k + 2 };
                let (exp, after) = read_exponent(&chars, start);
                value = value.powi(exp);
                k = after;
            }
            let rest: String = chars[k..].iter().collect();
            let rest = rest.trim_start();
            if rest.starts_with('%') || rest.starts_with("percent") {
                // Percent is kept as written (12% -> 12); the power-of-ten rule matches 0.12.
            } else {
                let word: String = rest.chars().take_while(|c| c.is_alphabetic()).collect();
                value *= match word.as_str() {
                    "thousand" | "k" => 1e3,
                    "million" | "millions" | "m" | "mn" | "mm" => 1e6,
                    "billion" | "billions" | "bn" | "b" => 1e9,
                    "trillion" | "trillions" | "tn" => 1e12,
                    _ => 1.0,
                };
            }
            return Some(if negative { -value } else { value });
        }
        i += 1;
    }
    None
}

/// Digits with optional thousands separators and a decimal part, from `start`.
fn read_digits(chars: &[char], start: usize) -> (f64, usize) {
    let mut text = String::new();
    let mut i = start;
    let mut seen_point = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() {
            text.push(c);
        } else if c == ','
            && !seen_point
            && chars.get(i + 1).is_some_and(char::is_ascii_digit)
            && chars.get(i + 2).is_some_and(char::is_ascii_digit)
            && chars.get(i + 3).is_some_and(char::is_ascii_digit)
            && !chars.get(i + 4).is_some_and(char::is_ascii_digit)
        {
            // A thousands separator: exactly three digits follow.
        } else if c == '.' && !seen_point && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
            seen_point = true;
            text.push('.');
        } else {
            break;
        }
        i += 1;
    }
    (text.parse().unwrap_or(0.0), i)
}

fn read_exponent(chars: &[char], start: usize) -> (i32, usize) {
    let mut i = start;
    let mut text = String::new();
    if i < chars.len() && (chars[i] == '-' || chars[i] == '+') {
        text.push(chars[i]);
        i += 1;
    }
    while i < chars.len() && chars[i].is_ascii_digit() {
        text.push(chars[i]);
        i += 1;
    }
    (text.parse().unwrap_or(0), i)
}

/// Whether two values match under `rule`.
pub fn values_match(prediction: NumericValue, gold: NumericValue, rule: &NumericMatch) -> bool {
    match (prediction, gold) {
        (NumericValue::Bool(a), NumericValue::Bool(b)) => a == b,
        (NumericValue::Number(p), NumericValue::Number(g)) => {
            if close(p, g, rule) {
                return true;
            }
            rule.power_of_ten && (-9..=9).filter(|k| *k != 0).any(|k| close(p * 10f64.powi(k), g, rule))
        }
        _ => false,
    }
}

fn close(p: f64, g: f64, rule: &NumericMatch) -> bool {
    if !p.is_finite() || !g.is_finite() {
        return false;
    }
    let scale = 10f64.powi(rule.decimals);
    (p - g).abs() <= rule.tolerance * g.abs().max(f64::MIN_POSITIVE) || (p * scale).round() == (g * scale).round()
}

/// Score in {0, 1} of a predicted text against a gold text.
pub fn score_numeric(prediction: &str, gold: &str, rule: &NumericMatch) -> f32 {
    match (parse_value(prediction), parse_value(gold)) {
        (Some(p), Some(g)) => f32::from(values_match(p, g, rule)),
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_in_their_many_spellings() {
        let cases: &[(&str, f64)] = &[
            ("1234.5", 1234.5),
            ("$1,234.5 million", 1_234.5e6),
            ("-$3.2", -3.2),
            ("−17", -17.0),
            ("12%", 12.0),
            ("about 2.5 billion dollars", 2.5e9),
            ("10^3", 1000.0),
            ("1.5e3", 1500.0),
            (".5", 0.5),
            ("1,000,000", 1e6),
            ("3 apples, 4 pears", 3.0),
            ("7k", 7000.0),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_value(text), Some(NumericValue::Number(*expected)), "{text:?}");
        }
        assert_eq!(parse_value("Yes, it did"), Some(NumericValue::Bool(true)));
        assert_eq!(parse_value("false"), Some(NumericValue::Bool(false)));
        assert_eq!(parse_value("no number here"), None);
    }

    #[test]
    fn matching_follows_the_docmath_rules() {
        let rule = NumericMatch::default();
        let cases: &[(&str, &str, f32)] = &[
            ("$1,234.5 million", "1234.5", 1.0),
            ("12%", "0.12", 1.0),
            ("0.12", "12%", 1.0),
            ("100.1", "100", 1.0),
            ("100.2", "100", 0.0),
            ("3.14159", "3.1416", 1.0),
            ("42", "24", 0.0),
            ("yes", "true", 1.0),
            ("no", "true", 0.0),
            ("7", "yes", 0.0),
            ("nothing", "5", 0.0),
        ];
        for (p, g, expected) in cases {
            assert_eq!(score_numeric(p, g, &rule), *expected, "{p:?} vs {g:?}");
        }
        let strict = NumericMatch { power_of_ten: false, ..NumericMatch::default() };
        assert_eq!(score_numeric("12%", "0.12", &strict), 0.0);
    }
}
