//! Stage options: parsing a recipe's option map into a stage config (collecting every
//! unknown or mistyped option, not just the first) and describing a config's options from
//! its JSON schema, whose descriptions are the fields' `///` docs.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// One documented option of a stage, as `longrl stages` prints it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OptionDoc {
    pub name: String,
    /// A short type: `string`, `integer`, `number`, `boolean`, `closure`, `list of string`,
    /// `one of a|b|c`; `?` marks an option that may be left out without a default.
    pub ty: String,
    /// The default as JSON, when the option has one.
    pub default: Option<String>,
    pub required: bool,
    pub doc: String,
}

/// Parses options into `C`. On failure returns every problem found: all unknown options
/// (with a suggestion when one is close), then each mistyped option.
pub fn parse_options<C: DeserializeOwned + schemars::JsonSchema>(options: &Value) -> Result<C, Vec<String>> {
    let schema = schemars::schema_for!(C);
    let known: Vec<String> =
        schema.get("properties").and_then(Value::as_object).map(|props| props.keys().cloned().collect()).unwrap_or_default();
    let mut problems = Vec::new();
    let mut map = match options {
        Value::Object(map) => map.clone(),
        Value::Null => Map::new(),
        other => return Err(vec![format!("options must be a map, found {}", json_type(other))]),
    };
    let unknown: Vec<String> = map.keys().filter(|k| !known.contains(k)).cloned().collect();
    for key in unknown {
        map.remove(&key);
        problems.push(unknown_option_message(&key, &known));
    }
    // Each pass finds one mistyped option; drop it and look for the next.
    let mut dropped: Vec<String> = Vec::new();
    for _ in 0..=known.len() {
        let value = Value::Object(map.clone());
        match serde_path_to_error::deserialize::<_, C>(value) {
            Ok(config) if problems.is_empty() => return Ok(config),
            Ok(_) => return Err(problems),
            Err(err) => {
                let path = err.path().to_string();
                let top = err.path().iter().next().and_then(|segment| match segment {
                    serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                    _ => None,
                });
                let inner = err.into_inner().to_string();
                if dropped.iter().any(|key| inner == format!("missing field `{key}`")) {
                    // Only missing because a mistyped value was dropped: already reported.
                    return Err(problems);
                }
                let message = if path == "." || path.is_empty() { inner } else { format!("option `{path}`: {inner}") };
                problems.push(message);
                match top {
                    Some(key) if map.remove(&key).is_some() => dropped.push(key),
                    _ => return Err(problems),
                }
            }
        }
    }
    Err(problems)
}

fn unknown_option_message(key: &str, known: &[String]) -> String {
    let closest =
        known.iter().map(|k| (strsim::damerau_levenshtein(key, k), k)).filter(|(d, k)| *d <= 2.max(k.len() / 4)).min_by_key(|(d, _)| *d);
    match closest {
        Some((_, suggestion)) => format!("unknown option `{key}` (did you mean `{suggestion}`?)"),
        None if known.is_empty() => format!("unknown option `{key}` (this stage takes no options)"),
        None => format!("unknown option `{key}` (options are: {})", known.join(", ")),
    }
}

/// A JSON value's type name, for messages.
pub fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// Every option of `C`, in declaration order, from its JSON schema.
pub fn describe_options<C: schemars::JsonSchema>() -> Vec<OptionDoc> {
    let schema = schemars::schema_for!(C);
    let root = schema.as_value();
    let defs = root.get("$defs").cloned().unwrap_or(Value::Null);
    let required: Vec<&str> =
        root.get("required").and_then(Value::as_array).map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let Some(props) = root.get("properties").and_then(Value::as_object) else { return Vec::new() };
    props
        .iter()
        .map(|(name, prop)| {
            let prop = resolve(prop, &defs);
            OptionDoc {
                name: name.clone(),
                ty: type_label(prop, &defs),
                default: prop.get("default").map(Value::to_string),
                required: required.contains(&name.as_str()),
                doc: prop.get("description").and_then(Value::as_str).unwrap_or_default().replace('\n', " "),
            }
        })
        .collect()
}

/// Follows a `$ref` into `$defs`, keeping the referring schema's description and default.
fn resolve<'a>(schema: &'a Value, defs: &'a Value) -> &'a Value {
    schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
        .and_then(|name| defs.get(name))
        .filter(|_| schema.get("description").is_none() && schema.get("default").is_none())
        .unwrap_or(schema)
}

fn type_label(schema: &Value, defs: &Value) -> String {
    if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
        let name = target.trim_start_matches("#/$defs/");
        return match defs.get(name) {
            Some(def) => type_label(def, defs),
            None => name.to_string(),
        };
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        let names: Vec<String> = values.iter().map(|v| v.as_str().map_or(v.to_string(), str::to_string)).collect();
        return format!("one of {}", names.join("|"));
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema.get(key).and_then(Value::as_array) {
            let labels: Vec<String> = options
                .iter()
                .filter(|o| o.get("type").and_then(Value::as_str) != Some("null"))
                .map(|o| match o.get("const") {
                    Some(Value::String(s)) => s.clone(),
                    _ => type_label(o, defs),
                })
                .collect();
            let nullable = options.iter().any(|o| o.get("type").and_then(Value::as_str) == Some("null"));
            let all_consts = options.iter().all(|o| o.get("const").is_some() || o.get("type").and_then(Value::as_str) == Some("null"));
            let label = if all_consts { format!("one of {}", labels.join("|")) } else { labels.join(" or ") };
            return if nullable { format!("{label}?") } else { label };
        }
    }
    match schema.get("type") {
        Some(Value::String(t)) if t == "array" => {
            let item = schema.get("items").map_or_else(|| "value".to_string(), |i| type_label(i, defs));
            format!("list of {item}")
        }
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(types)) => {
            let nullable = types.iter().any(|t| t == "null");
            let base: Vec<&str> = types.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect();
            let mut label = base.join(" or ");
            if base == ["array"] {
                let item = schema.get("items").map_or_else(|| "value".to_string(), |i| type_label(i, defs));
                label = format!("list of {item}");
            }
            if nullable { format!("{label}?") } else { label }
        }
        _ if schema.get("additionalProperties").is_some() => "map".to_string(),
        _ => "value".to_string(),
    }
}

/// The largest sizes a recipe may ask for. Beyond them a value is a typo or an attack: it
/// would take the machine's memory or years of compute before anything useful happened, so
/// `longrl check` refuses it with the limit in the message.
pub mod limits {
    /// Tokens of one input or output budget (eight times QwenLong-L1's 128K).
    pub const TOKENS: usize = 1 << 20;
    /// Records a source generates or a stage counts.
    pub const RECORDS: usize = 10_000_000;
    /// Responses sampled per prompt, prompts per step, samples per evaluation item.
    pub const GROUP: usize = 4096;
    /// Passes over the data, tries, accumulations.
    pub const PASSES: usize = 100_000;
    /// Distractor facts of a synthetic task.
    pub const DISTRACTORS: usize = 1000;
}

/// A problem when `value` of `option` exceeds `max`.
pub fn at_most(option: &str, value: usize, max: usize) -> Option<String> {
    (value > max).then(|| format!("option `{option}` is {value}, above the limit of {max}"))
}

/// Problems with sampling settings: the temperature must be finite and positive (or 0 for
/// greedy decoding, when `greedy_allowed`), top-p within (0, 1].
pub fn sampling_problems(temperature: f32, top_p: f32, greedy_allowed: bool) -> Vec<String> {
    let mut out = Vec::new();
    let greedy = greedy_allowed && temperature == 0.0;
    if !temperature.is_finite() || (temperature <= 0.0 && !greedy) {
        let allowed = if greedy_allowed { "0 (greedy) or positive" } else { "positive" };
        out.push(format!("temperature must be {allowed}, got {temperature}"));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        out.push(format!("top_p must be within (0, 1], got {top_p}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// Options of a made-up stage.
    #[derive(Debug, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Demo {
        /// Where to read.
        path: String,
        /// How many tokens at most.
        #[serde(default = "default_max")]
        max_tokens: usize,
        /// Drop duplicates.
        #[serde(default)]
        dedup: bool,
    }

    fn default_max() -> usize {
        4096
    }

    #[test]
    fn every_bad_option_is_reported() {
        let options = serde_json::json!({
            "path": 3, "max_tokns": 10, "dedup": "yes", "colour": 1
        });
        let problems = parse_options::<Demo>(&options).expect_err("options are bad");
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("`max_tokns` (did you mean `max_tokens`?)"), "{problems:?}");
        assert!(problems[1].contains("unknown option `colour`"), "{problems:?}");
        assert!(problems.iter().any(|p| p.starts_with("option `path`: invalid type: integer")));
        assert!(problems.iter().any(|p| p.starts_with("option `dedup`: invalid type: string")));
    }

    #[test]
    fn good_options_parse_with_defaults() {
        let demo: Demo = parse_options(&serde_json::json!({"path": "x"})).expect("valid");
        assert_eq!(demo.max_tokens, 4096);
        assert!(!demo.dedup);
    }

    #[test]
    fn docs_come_from_field_comments() {
        let docs = describe_options::<Demo>();
        let names: Vec<&str> = docs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["path", "max_tokens", "dedup"]);
        assert_eq!(docs[0].doc, "Where to read.");
        assert!(docs[0].required);
        assert_eq!(docs[1].ty, "integer");
        assert_eq!(docs[1].default.as_deref(), Some("4096"));
        assert_eq!(docs[2].ty, "boolean");
    }

    #[test]
    fn sampling_settings_outside_their_range_are_named() {
        assert!(sampling_problems(0.7, 0.95, false).is_empty());
        assert!(sampling_problems(0.0, 1.0, true).is_empty());
        assert_eq!(sampling_problems(0.0, 1.0, false).len(), 1);
        assert_eq!(sampling_problems(f32::NAN, 1.0, true).len(), 1);
        assert_eq!(sampling_problems(-1.0, 1.0, true).len(), 1);
        assert!(sampling_problems(1.0, 0.0, true)[0].contains("top_p"));
        assert!(sampling_problems(1.0, 1.5, true)[0].contains("top_p"));
        assert!(sampling_problems(1.0, f32::NAN, true)[0].contains("top_p"));
        assert!(at_most("count", 5, 4).is_some_and(|p| p.contains("limit of 4")));
    }
}
