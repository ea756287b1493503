//! Numeric answers (DocMath-like): parse numbers written with signs, currency symbols,
//! thousands separators, decimals, percents, scale words (thousand, million, billion) or
//! powers like `10^3`, and compare them the way DocMath's checker means to: equal within a
//! relative tolerance; equal after rounding (only the numbers as written, never a rescaled
//! one, and at the gold's own precision when it is written finer than the rule's); or off by
//! a percent/fraction or thousands-unit scale (x100, x1000, within the relative tolerance).
//! A scale word is read both ways ("1.2 million" is 1.2 in millions and 1,200,000).
//! Booleans (yes/true, no/false) match exactly.
//!
//! Why not DocMath's code as it is: combining a 10^k rescaling with 3-decimal rounding makes
//! any small number equal to any other (11.6 x 10^-3 rounds like a gold of 0.012; 42 x 10^-9
//! rounds like a gold of 0), and any exact power-of-ten ratio (300 against 0.0003) passes.

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
    /// Also equal when both round alike to this many decimals (or to the gold's own
    /// decimals when it is written with more); never applied to a rescaled number.
    #[serde(default = "default_decimals")]
    pub decimals: i32,
    /// Also equal when one is the other times 100 or 1000 (a percent written as a fraction,
    /// a figure given in thousands), within the relative tolerance.
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

impl NumericMatch {
    /// Problems with the values (a recipe's typo would silently accept or refuse everything).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(self.tolerance.is_finite() && (0.0..1.0).contains(&self.tolerance)) {
            out.push(format!("numeric tolerance must be within [0, 1), got {}", self.tolerance));
        }
        if !(0..=12).contains(&self.decimals) {
            out.push(format!("numeric decimals must be within 0..=12, got {}", self.decimals));
        }
        out
    }
}

/// Scale factors of the percent/fraction and thousands-unit mix-ups.
const SCALES: [f64; 4] = [1e-3, 1e-2, 1e2, 1e3];

/// A number as written: its value, the value without its scale word, and the decimals each
/// is written to (negative when a scale word makes the last written digit a multiple of 10).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Written {
    value: f64,
    decimals: i32,
    /// Without the scale word ("1.2 million" -> 1.2), when there is one.
    bare: Option<(f64, i32)>,
}

impl Written {
    /// The readings of the number: its value, then its bare value.
    fn readings(&self) -> impl Iterator<Item = (f64, i32)> {
        std::iter::once((self.value, self.decimals)).chain(self.bare)
    }
}

/// The first number (or boolean) written in `text`.
pub fn parse_value(text: &str) -> Option<NumericValue> {
    parse_written(text).map(|parsed| match parsed {
        Parsed::Bool(b) => NumericValue::Bool(b),
        Parsed::Number(n) => NumericValue::Number(n.value),
    })
}

enum Parsed {
    Number(Written),
    Bool(bool),
}

fn parse_written(text: &str) -> Option<Parsed> {
    let lower = text.trim().to_lowercase();
    // A boolean is a yes/no/true/false word alone or followed by punctuation ("Yes, it did").
    let word: String = lower.chars().take_while(|c| c.is_alphabetic()).collect();
    let next = lower[word.len()..].chars().next();
    if next.is_none_or(|c| c.is_ascii_punctuation()) {
        match word.as_str() {
            "yes" | "true" => return Some(Parsed::Bool(true)),
            "no" | "false" => return Some(Parsed::Bool(false)),
            _ => {}
        }
    }
    parse_number(&lower).map(Parsed::Number)
}

/// The first number in `text` (lowercase), with its sign, scale word, percent and power.
fn parse_number(text: &str) -> Option<Written> {
    let chars: Vec<char> = text.chars().collect();
    let start =
        (0..chars.len()).find(|&i| chars[i].is_ascii_digit() || (chars[i] == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)))?;
    // Sign: a minus just before the digits (possibly before a currency symbol).
    let mut j = start;
    while j > 0 && matches!(chars[j - 1], '$' | '€' | '£' | '¥' | ' ') {
        j -= 1;
    }
    let negative = j > 0 && matches!(chars[j - 1], '-' | '−' | '–');
    let (mantissa, mut decimals, end) = read_digits(&chars, start);
    let (mut value, mut k) = (mantissa, end);
    // Scientific notation or a power: 1.5e3, 10^3, 10**3.
    if k < chars.len() && chars[k] == 'e' && chars.get(k + 1).is_some_and(|c| c.is_ascii_digit() || *c == '-' || *c == '+') {
        let (exp, after) = read_exponent(&chars, k + 1);
        value *= 10f64.powi(exp);
        decimals = decimals.saturating_sub(exp);
        k = after;
    } else if k < chars.len() && (chars[k] == '^' || (chars[k] == '*' && chars.get(k + 1) == Some(&'*'))) {
        let start = if chars[k] == '^' { k + 1 } else { k + 2 };
        let (exp, after) = read_exponent(&chars, start);
        value = value.powi(exp);
        decimals = 0;
        k = after;
    }
    let sign = if negative { -1.0 } else { 1.0 };
    let rest: String = chars[k..].iter().collect();
    let rest = rest.trim_start();
    // A percent is kept as written (12% -> 12); the x100 scale matches a fraction (0.12).
    let power = if rest.starts_with('%') || rest.starts_with("percent") { 0 } else { scale_word(rest) };
    let bare = (power != 0).then_some((sign * value, decimals));
    Some(Written { value: sign * value * 10f64.powi(power), decimals: decimals.saturating_sub(power), bare })
}

/// The power of ten a scale word right after a number stands for (0 for none).
fn scale_word(rest: &str) -> i32 {
    let word: String = rest.chars().take_while(|c| c.is_alphabetic()).collect();
    match word.as_str() {
        "thousand" | "k" => 3,
        "million" | "millions" | "m" | "mn" | "mm" => 6,
        "billion" | "billions" | "bn" | "b" => 9,
        "trillion" | "trillions" | "tn" => 12,
        _ => 0,
    }
}

/// Digits with optional thousands separators and a decimal part, from `start`: the value,
/// the number of digits after the point, and where the number ends.
fn read_digits(chars: &[char], start: usize) -> (f64, i32, usize) {
    let mut text = String::new();
    let mut i = start;
    let mut decimals: Option<i32> = None;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() {
            text.push(c);
            if let Some(d) = decimals.as_mut() {
                *d = d.saturating_add(1);
            }
        } else if c == ','
            && decimals.is_none()
            && chars.get(i + 1).is_some_and(char::is_ascii_digit)
            && chars.get(i + 2).is_some_and(char::is_ascii_digit)
            && chars.get(i + 3).is_some_and(char::is_ascii_digit)
            && !chars.get(i + 4).is_some_and(char::is_ascii_digit)
        {
            // A thousands separator: exactly three digits follow.
        } else if c == '.' && decimals.is_none() && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
            decimals = Some(0);
            text.push('.');
        } else {
            break;
        }
        i += 1;
    }
    (text.parse().unwrap_or(0.0), decimals.unwrap_or(0), i)
}

/// An exponent's digits (at most four are read: larger powers are not answers).
fn read_exponent(chars: &[char], start: usize) -> (i32, usize) {
    let mut i = start;
    let mut text = String::new();
    if i < chars.len() && (chars[i] == '-' || chars[i] == '+') {
        text.push(chars[i]);
        i += 1;
    }
    while i < chars.len() && chars[i].is_ascii_digit() {
        if text.trim_start_matches(['-', '+']).len() < 4 {
            text.push(chars[i]);
        }
        i += 1;
    }
    (text.parse().unwrap_or(0), i)
}

/// Whether two values match under `rule`, each rounded at `rule.decimals` (see
/// [`score_numeric`] for texts, which also knows the gold's written precision).
pub fn values_match(prediction: NumericValue, gold: NumericValue, rule: &NumericMatch) -> bool {
    match (prediction, gold) {
        (NumericValue::Bool(a), NumericValue::Bool(b)) => a == b,
        (NumericValue::Number(p), NumericValue::Number(g)) => {
            let written = |value| Written { value, decimals: 0, bare: None };
            numbers_match(&written(p), &written(g), rule)
        }
        _ => false,
    }
}

/// Whether some reading of the prediction matches some reading of the gold.
fn numbers_match(prediction: &Written, gold: &Written, rule: &NumericMatch) -> bool {
    prediction.readings().any(|(p, _)| {
        gold.readings().any(|(g, gold_decimals)| {
            within(p, g, rule.tolerance)
                || rounds_alike(p, g, rule.decimals.max(gold_decimals))
                || (rule.power_of_ten && SCALES.iter().any(|scale| within(p * scale, g, rule.tolerance)))
        })
    })
}

/// `p` within `tolerance` of `g`, relative to `g` (a gold of 0 needs an exact 0).
fn within(p: f64, g: f64, tolerance: f64) -> bool {
    p.is_finite() && g.is_finite() && (p - g).abs() <= tolerance * g.abs()
}

/// Both round to the same number at `decimals` places (at most 12).
fn rounds_alike(p: f64, g: f64, decimals: i32) -> bool {
    let scale = 10f64.powi(decimals.clamp(0, 12));
    let (a, b) = ((p * scale).round(), (g * scale).round());
    a.is_finite() && b.is_finite() && a == b
}

/// Score in {0, 1} of a predicted text against a gold text.
pub fn score_numeric(prediction: &str, gold: &str, rule: &NumericMatch) -> f32 {
    let matched = match (parse_written(prediction), parse_written(gold)) {
        (Some(Parsed::Bool(a)), Some(Parsed::Bool(b))) => a == b,
        (Some(Parsed::Number(p)), Some(Parsed::Number(g))) => numbers_match(&p, &g, rule),
        _ => false,
    };
    f32::from(matched)
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

    /// (prediction, gold, expected score) under the default rule.
    fn check(cases: &[(&str, &str, f32)]) {
        let rule = NumericMatch::default();
        for (p, g, expected) in cases {
            assert_eq!(score_numeric(p, g, &rule), *expected, "{p:?} vs gold {g:?}");
        }
    }

    #[test]
    fn matching_follows_the_docmath_rules() {
        check(&[
            ("$1,234.5 million", "1234.5", 1.0),
            ("$1,234.5 million", "1234500000", 1.0),
            ("1.2345 billion", "1234.5", 1.0),
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
        ]);
        let strict = NumericMatch { power_of_ten: false, ..NumericMatch::default() };
        assert_eq!(score_numeric("12%", "0.12", &strict), 0.0);
    }

    #[test]
    fn a_gold_of_zero_accepts_only_what_rounds_to_zero() {
        check(&[
            ("0", "0", 1.0),
            ("0.0", "0", 1.0),
            ("-0.0004", "0", 1.0),
            ("0.0004", "0.0", 1.0),
            ("0.01", "0", 0.0),
            ("42", "0", 0.0),
            ("11.6", "0", 0.0),
            ("300", "0", 0.0),
            ("0", "5", 0.0),
        ]);
    }

    #[test]
    fn small_golds_are_not_matched_by_rescaled_far_off_numbers() {
        check(&[
            ("11.6", "0.012", 0.0),
            ("42", "0.012", 0.0),
            ("300", "0.0003", 0.0),
            ("42", "0.0003", 0.0),
            ("0.0001", "0.0003", 0.0),
            ("0.0003", "0.0003", 1.0),
            ("0.012", "0.012", 1.0),
            // Rounding at the gold's written precision: 0.0116 is 0.012 to three places.
            ("0.0116", "0.012", 1.0),
            ("0.0124", "0.012", 1.0),
            ("0.0126", "0.012", 0.0),
            // A percent for a small fraction: 1.2% is 0.012.
            ("1.2%", "0.012", 1.0),
            ("1.2", "0.012", 1.0),
        ]);
    }

    #[test]
    fn negative_golds_keep_their_sign() {
        check(&[
            ("-5", "-5", 1.0),
            ("-$5.00", "-5", 1.0),
            ("5", "-5", 0.0),
            ("-500", "-5", 1.0),
            ("-0.05", "-5", 1.0),
            ("0.05", "-5", 0.0),
            ("-12.3%", "-0.123", 1.0),
        ]);
    }

    #[test]
    fn percent_and_scaled_golds() {
        check(&[
            ("25%", "25", 1.0),
            ("25 percent", "0.25", 1.0),
            ("0.25", "25%", 1.0),
            ("2.5%", "25%", 0.0),
            ("1,500", "1.5", 1.0),
            ("1.5 thousand", "1500", 1.0),
            ("1500000", "1.5", 0.0),
            ("3 million", "3", 1.0),
            ("3 million", "3000000", 1.0),
            ("4 million", "3000000", 0.0),
        ]);
    }

    #[test]
    fn bad_rule_values_are_named() {
        assert!(NumericMatch::default().problems().is_empty());
        let bad = NumericMatch { tolerance: f64::NAN, decimals: 40, power_of_ten: true };
        let problems = bad.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::testing::config(512))]

        #[test]
        fn parsing_and_scoring_never_panic(prediction in any::<String>(), gold in any::<String>()) {
            let score = score_numeric(&prediction, &gold, &NumericMatch::default());
            prop_assert!(score == 0.0 || score == 1.0);
        }

        #[test]
        fn number_like_text_never_panics(text in "[-+$%.,0-9e^* kmbn]{0,40}") {
            let _ = parse_value(&text);
            let _ = score_numeric(&text, &text, &NumericMatch::default());
        }

        #[test]
        fn a_prediction_equal_to_the_gold_is_accepted(value in -1e12f64..1e12, decimals in 0usize..6, percent in any::<bool>()) {
            let gold = format!("{value:.decimals$}{}", if percent { "%" } else { "" });
            prop_assert_eq!(score_numeric(&gold, &gold, &NumericMatch::default()), 1.0, "{}", gold);
            // The same number written differently: with a currency sign and thousands separators.
            let rounded: f64 = format!("{value:.decimals$}").parse().expect("number");
            let spelled = format!("{}${}", if rounded < 0.0 { "-" } else { "" }, thousands(rounded.abs(), decimals));
            if !percent {
                prop_assert_eq!(score_numeric(&spelled, &gold, &NumericMatch::default()), 1.0, "{} vs {}", spelled, gold);
            }
        }

        #[test]
        fn a_prediction_off_by_more_than_the_tolerance_is_refused(
            magnitude in 1.0f64..1e9,
            negative in any::<bool>(),
            off in prop_oneof![0.002f64..0.5, -0.5f64..-0.002],
        ) {
            let gold = if negative { -magnitude } else { magnitude };
            let prediction = gold * (1.0 + off);
            // Far enough apart that rounding at three places cannot join them either.
            prop_assume!((prediction - gold).abs() > 1e-3);
            let rule = NumericMatch::default();
            prop_assert_eq!(score_numeric(&format!("{prediction}"), &format!("{gold}"), &rule), 0.0, "{} vs {}", prediction, gold);
        }
    }

    /// `value` with comma thousands separators and `decimals` places.
    fn thousands(value: f64, decimals: usize) -> String {
        let text = format!("{value:.decimals$}");
        let (whole, fraction) = text.split_once('.').map_or((text.as_str(), None), |(w, f)| (w, Some(f)));
        let mut grouped = String::new();
        for (i, digit) in whole.chars().enumerate() {
            if i > 0 && (whole.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(digit);
        }
        match fraction {
            Some(f) => format!("{grouped}.{f}"),
            None => grouped,
        }
    }
}
