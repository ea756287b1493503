//! Recipe parameters, read by `param(..)` in a recipe: values from a YAML parameter file
//! (`--params FILE.yaml`) overridden by `--set key=value`, each remembering where it came
//! from so that a message about it names the file and line or the flag.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;

/// Where one parameter's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `--set key=value` on the command line (also the default for values set in code).
    Set,
    /// A parameter file, and the line of the key when it could be told.
    File { path: String, line: Option<usize> },
    /// The values a run recorded when it started (`run.json`), used again by `--resume`.
    Recorded,
}

/// The parameters of one recipe evaluation.
#[derive(Debug, Clone, Default)]
pub struct Params {
    values: BTreeMap<String, Value>,
    origins: BTreeMap<String, Origin>,
}

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` as `--set key=value` would.
    pub fn insert(&mut self, key: String, value: Value) {
        self.insert_from(key, value, Origin::Set);
    }

    /// Sets `key`, replacing an earlier value and its origin.
    pub fn insert_from(&mut self, key: String, value: Value, origin: Origin) {
        self.origins.insert(key.clone(), origin);
        self.values.insert(key, value);
    }

    /// `other`'s values over these (a later source overrides an earlier one).
    pub fn extend(&mut self, other: Params) {
        for (key, value) in other.values {
            let origin = other.origins.get(&key).cloned().unwrap_or(Origin::Set);
            self.insert_from(key, value, origin);
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.values.keys()
    }

    /// The values alone, as the run directory records them.
    pub fn values(&self) -> &BTreeMap<String, Value> {
        &self.values
    }

    /// How a message names the setting of `key`: `--set lr=0.01`, or
    /// `params.yaml:4: lr: 0.01`.
    pub fn describe(&self, key: &str) -> String {
        let value = self.values.get(key).map(Value::to_string).unwrap_or_default();
        match self.origins.get(key) {
            Some(Origin::File { path, line: Some(line) }) => format!("{path}:{line}: {key}: {value}"),
            Some(Origin::File { path, line: None }) => format!("{path}: {key}: {value}"),
            Some(Origin::Recorded) => format!("{key}={value} (recorded in run.json)"),
            Some(Origin::Set) | None => format!("--set {key}={value}"),
        }
    }
}

/// Whether `key` may name a parameter: ASCII letters, digits and underscores.
pub fn valid_name(key: &str) -> bool {
    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Reads a YAML parameter file: a mapping from parameter names to values (numbers,
/// strings, booleans, lists and maps of those). Anything else is an error naming the file
/// and, where it can be told, the line.
pub fn read_params_file(path: &Path) -> Result<Params, String> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read parameter file {name}: {e}"))?;
    let not_yaml = |e: serde_yaml::Error| match e.location() {
        Some(at) => format!("{name}:{}:{}: not valid YAML: {e}", at.line(), at.column()),
        None => format!("{name}: not valid YAML: {e}"),
    };
    let mut document: serde_yaml::Value = serde_yaml::from_str(&text).map_err(not_yaml)?;
    // `<<: *base` merges an anchored mapping, as YAML 1.1 files expect.
    document.apply_merge().map_err(not_yaml)?;
    let mapping = match document {
        serde_yaml::Value::Mapping(mapping) => mapping,
        serde_yaml::Value::Null => return Err(format!("{name}: the parameter file is empty; write `name: value` lines")),
        other => return Err(format!("{name}: a parameter file is a mapping of `name: value` lines, not {}", yaml_kind(&other))),
    };
    let mut params = Params::new();
    let key_lines = key_lines(&text);
    for (key, value) in mapping {
        let serde_yaml::Value::String(key) = key else {
            return Err(format!("{name}: parameter names are strings, found {}", yaml_kind(&key)));
        };
        let line = key_lines.get(key.as_str()).copied();
        let at = line.map_or_else(|| name.clone(), |line| format!("{name}:{line}"));
        if !valid_name(&key) {
            return Err(format!("{at}: `{key}` is not a valid parameter name (letters, digits and _)"));
        }
        let value = yaml_to_json(&value).map_err(|why| format!("{at}: {key}: {why}"))?;
        params.insert_from(key, value, Origin::File { path: name.clone(), line });
    }
    Ok(params)
}

/// The 1-based line where each top-level key is first written (`key:`, `"key":` or
/// `'key':` at the start of a line), read in one pass so that a file of many keys costs
/// time linear in its size.
fn key_lines(text: &str) -> HashMap<&str, usize> {
    let mut lines = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let key = match line.chars().next() {
            Some(quote @ ('"' | '\'')) => {
                line[1..].split_once(quote).and_then(|(key, rest)| rest.trim_start().starts_with(':').then_some(key))
            }
            Some(c) if !c.is_whitespace() && c != '#' && c != '-' => line.split_once(':').map(|(key, _)| key.trim_end()),
            _ => None,
        };
        if let Some(key) = key {
            lines.entry(key).or_insert(index + 1);
        }
    }
    lines
}

/// A YAML value as the JSON a recipe parameter holds.
fn yaml_to_json(value: &serde_yaml::Value) -> Result<Value, String> {
    use serde_yaml::Value as Yaml;
    Ok(match value {
        Yaml::Null => return Err("has no value (write one, or leave the line out for the recipe's default)".into()),
        Yaml::Bool(b) => Value::Bool(*b),
        Yaml::Number(n) => {
            if let Some(int) = n.as_i64() {
                Value::from(int)
            } else if let Some(float) = n.as_f64().filter(|f| f.is_finite()) {
                Value::from(float)
            } else {
                return Err(format!("{n} is not a finite number"));
            }
        }
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Sequence(items) => Value::Array(items.iter().map(yaml_to_json).collect::<Result<_, _>>()?),
        Yaml::Mapping(map) => {
            let mut object = serde_json::Map::new();
            for (key, item) in map {
                let Yaml::String(key) = key else { return Err(format!("map keys are strings, found {}", yaml_kind(key))) };
                object.insert(key.clone(), yaml_to_json(item)?);
            }
            Value::Object(object)
        }
        Yaml::Tagged(tagged) => return Err(format!("YAML tags ({}) are not parameter values", tagged.tag)),
    })
}

fn yaml_kind(value: &serde_yaml::Value) -> &'static str {
    use serde_yaml::Value as Yaml;
    match value {
        Yaml::Null => "nothing",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a list",
        Yaml::Mapping(_) => "a mapping",
        Yaml::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Params, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("p.yaml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        read_params_file(&path)
    }

    #[test]
    fn values_keep_their_types_and_lines() {
        let params = read("# paper\nl1: 20000\nlr: 2.0e-6\nname: \"x\"\nlengths: [1, 2]\njudge: {url: http://a, retries: 2}\nflag: true\n")
            .expect("valid");
        assert_eq!(params.get("l1"), Some(&Value::from(20000)));
        assert_eq!(params.get("lr"), Some(&serde_json::json!(2e-6)));
        assert_eq!(params.get("lengths"), Some(&serde_json::json!([1, 2])));
        assert_eq!(params.get("judge"), Some(&serde_json::json!({"url": "http://a", "retries": 2})));
        assert!(params.describe("lr").ends_with("p.yaml:3: lr: 2e-6"), "{}", params.describe("lr"));
    }

    #[test]
    fn bad_files_are_errors_naming_the_place() {
        let cases = [
            ("l1: 1\nl1: 2\n", "duplicate"),
            ("- 1\n- 2\n", "not a list"),
            ("", "is empty"),
            ("l1: [1, 2\n", "p.yaml:2:1: not valid YAML"),
            ("ok: 1\nbad name: 2\n", "p.yaml:2: `bad name` is not a valid parameter name"),
            ("ok: 1\nnothing:\n", "p.yaml:2: nothing: has no value"),
            ("x: .nan\n", "p.yaml:1: x: .nan is not a finite number"),
            ("x: !secret 3\n", "YAML tags"),
            ("1: 2\n", "parameter names are strings"),
            ("{lr: 1, bad key: 2}\n", "p.yaml: `bad key` is not a valid parameter name"),
        ];
        for (text, expected) in cases {
            let err = read(text).expect_err(text);
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn quoted_keys_and_files_of_many_keys_keep_their_lines() {
        let params = read("# c\n\"lr\": 0.1\n'steps' : 3\nnested:\n  lr: 9\n").expect("valid");
        assert!(params.describe("lr").ends_with("p.yaml:2: lr: 0.1"), "{}", params.describe("lr"));
        assert!(params.describe("steps").ends_with("p.yaml:3: steps: 3"), "{}", params.describe("steps"));
        let many: String = (0..50_000).map(|i| format!("key_{i}: {i}\n")).collect();
        let params = read(&many).expect("valid");
        assert!(params.describe("key_49999").ends_with("p.yaml:50000: key_49999: 49999"), "{}", params.describe("key_49999"));
    }

    #[test]
    fn anchors_and_merge_keys_are_resolved() {
        let params = read("base: &base {group: 8, lr: 0.1}\nphase: {<<: *base, lr: 0.2}\nsteps: 3\n").expect("valid");
        assert_eq!(params.get("phase"), Some(&serde_json::json!({"group": 8, "lr": 0.2})));
        // A flow-style file has no line per key: messages name the file alone.
        let params = read("{lr: 0.1}\n").expect("valid");
        assert!(params.describe("lr").ends_with("p.yaml: lr: 0.1"), "{}", params.describe("lr"));
    }

    #[test]
    fn later_sources_override_earlier_ones() {
        let mut params = read("lr: 0.1\nsteps: 3\n").expect("valid");
        let mut set = Params::new();
        set.insert("lr".into(), Value::from(0.5));
        params.extend(set);
        assert_eq!(params.get("lr"), Some(&Value::from(0.5)));
        assert_eq!(params.describe("lr"), "--set lr=0.5");
        assert!(params.describe("steps").contains("p.yaml:2"));
    }
}
