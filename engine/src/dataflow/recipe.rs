//! The recipe host: one hardened Rhai engine that evaluates a recipe into a [`Plan`].
//! Every registered stage is a recipe function; calling it only records a node (nothing
//! heavy runs while the script runs) and returns a handle that later calls connect.

use std::any::TypeId;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use longrl_stdlib::script::ScriptFn;
use longrl_stdlib::{Registry, StageFactory};
use rhai::{Dynamic, Engine, EvalAltResult, FnPtr, Map, NativeCallContext};
use serde_json::Value;

use crate::dataflow::plan::{Edge, Endpoint, Node, Plan, Position, Problem, Problems};

/// Limits of the recipe engine: a recipe declares a graph, so these are generous for that
/// and stop runaway scripts (an endless loop ends at the operation limit).
pub mod limits {
    pub const MAX_OPERATIONS: u64 = 2_000_000;
    pub const MAX_CALL_LEVELS: usize = 64;
    pub const MAX_EXPR_DEPTH: usize = 64;
    pub const MAX_FN_EXPR_DEPTH: usize = 32;
    /// Strings reach this size in closures over records: a 128K-token document is about
    /// 0.5 MB of text, so records of several MB must pass `filter` and `map` closures.
    pub const MAX_STRING_SIZE: usize = 64 << 20;
    pub const MAX_ARRAY_SIZE: usize = 100_000;
    pub const MAX_MAP_SIZE: usize = 10_000;
    pub const MAX_VARIABLES: usize = 10_000;
    /// Stages a recipe may declare: each runs on its own thread.
    pub const MAX_STAGES: usize = 10_000;
}

/// Stage functions accept up to this many arguments (inputs, positional values, options).
const MAX_ARGS: usize = 6;
/// A recipe with more unknown stage names than this is given up on.
const MAX_UNKNOWN_NAMES: usize = 32;

/// A stage handle in a recipe: the node a stage call created, optionally narrowed to one
/// of its output ports with `.output("name")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageHandle {
    pub node: usize,
    pub port: Option<String>,
    pub stage: String,
}

pub use crate::dataflow::params::Params;

/// Everything a recipe script produced while it ran.
#[derive(Default)]
struct Builder {
    nodes: Vec<Node>,
    edges: Vec<Edge>,
    problems: Vec<Problem>,
    closures: Vec<(FnPtr, Position)>,
    params_used: BTreeSet<String>,
}

/// Evaluates `source` (named `recipe` in messages) into a plan. Syntax errors, unknown stages
/// and misplaced arguments come back as problems with their line and column; an unknown
/// stage does not stop the script, so every one of them is reported.
pub fn load_plan(source: &str, recipe: &str, registry: &Registry, params: &Params) -> Result<Plan, Problems> {
    let fail = |list: Vec<Problem>| Problems { recipe: recipe.to_string(), list };
    let mut unknown_names = BTreeSet::new();
    loop {
        let builder = Arc::new(Mutex::new(Builder::default()));
        let engine = build_engine(registry, &builder, params, &unknown_names);
        let ast = engine.compile(source).map_err(|err| {
            let pos = Position::from_rhai(err.position());
            fail(vec![Problem::new(pos, format!("syntax error: {}", err.err_type()))])
        })?;
        let outcome = engine.run_ast(&ast);
        let mut state = std::mem::take(&mut *builder.lock().map_err(|_| fail(vec![poisoned()]))?);
        if let Err(err) = outcome {
            let (inner, pos) = innermost(&err);
            if let EvalAltResult::ErrorFunctionNotFound(signature, _) = inner {
                let name = signature.split([' ', '(']).next().unwrap_or(signature).to_string();
                if registry.get(&name).is_none() && !unknown_names.contains(&name) && unknown_names.len() < MAX_UNKNOWN_NAMES {
                    // Stub the name and run again, so later problems are found too.
                    unknown_names.insert(name);
                    continue;
                }
                let message = match registry.get(&name) {
                    Some(factory) => format!("`{name}` was called with unsupported arguments: {signature}; {}", usage(factory.as_ref())),
                    None => format!("unknown function: {signature}"),
                };
                state.problems.push(Problem::new(pos, message));
            } else {
                state.problems.push(Problem::new(pos, describe_error(inner)));
            }
            state.problems.sort();
            state.problems.dedup();
            return Err(fail(state.problems));
        }
        for key in params.keys().filter(|k| !state.params_used.contains(*k)) {
            state.problems.push(Problem::new(
                Position::default(),
                format!("{}: the recipe never reads parameter `{key}` (is it misspelled?)", params.describe(key)),
            ));
        }
        let engine = Arc::new(engine);
        let ast = Arc::new(ast);
        let closures = state
            .closures
            .into_iter()
            .map(|(ptr, pos)| ScriptFn::new(Arc::clone(&engine), Arc::clone(&ast), ptr, format!("{recipe}:{}:{}", pos.line, pos.column)))
            .collect();
        return Ok(Plan {
            recipe: recipe.to_string(),
            nodes: state.nodes,
            edges: state.edges,
            problems: state.problems,
            closures: Arc::new(closures),
        });
    }
}

fn poisoned() -> Problem {
    Problem::new(Position::default(), "internal error: the recipe builder was poisoned by a panic")
}

/// The error inside `ErrorInFunction` wrappers, and the best position for it.
fn innermost(err: &EvalAltResult) -> (&EvalAltResult, Position) {
    let mut current = err;
    let mut pos = Position::from_rhai(err.position());
    while let EvalAltResult::ErrorInFunctionCall(_, _, inner, _) = current {
        current = inner;
        let inner_pos = Position::from_rhai(current.position());
        if inner_pos.line != 0 {
            pos = inner_pos;
        }
    }
    (current, pos)
}

fn describe_error(err: &EvalAltResult) -> String {
    match err {
        EvalAltResult::ErrorTooManyOperations(_) => {
            format!("the recipe ran more than {} operations (an endless loop?); a recipe only declares stages", limits::MAX_OPERATIONS)
        }
        EvalAltResult::ErrorRuntime(value, _) => format!("recipe error: {value}"),
        EvalAltResult::ErrorStackOverflow(_) => {
            format!("the recipe calls functions more than {} levels deep (an endless recursion?)", limits::MAX_CALL_LEVELS)
        }
        other => {
            // Rhai appends " (line L, position C)"; the position is printed separately.
            let text = other.to_string();
            match text.find(" (line ") {
                Some(cut) => text[..cut].to_string(),
                None => text,
            }
        }
    }
}

/// How a stage is called, for messages.
fn usage(factory: &dyn StageFactory) -> String {
    let mut args: Vec<String> = factory.inputs().iter().map(|p| p.name.to_string()).collect();
    args.extend(factory.positional().iter().map(|p| format!("\"{p}\"")));
    args.push("#{ options }".into());
    format!("use {}({})", factory.name(), args.join(", "))
}

/// The one place the recipe engine is configured.
fn build_engine(registry: &Registry, builder: &Arc<Mutex<Builder>>, params: &Params, unknown_names: &BTreeSet<String>) -> Engine {
    let mut engine = Engine::new();
    engine
        .set_max_operations(limits::MAX_OPERATIONS)
        .set_max_call_levels(limits::MAX_CALL_LEVELS)
        .set_max_expr_depths(limits::MAX_EXPR_DEPTH, limits::MAX_FN_EXPR_DEPTH)
        .set_max_string_size(limits::MAX_STRING_SIZE)
        .set_max_array_size(limits::MAX_ARRAY_SIZE)
        .set_max_map_size(limits::MAX_MAP_SIZE)
        .set_max_variables(limits::MAX_VARIABLES)
        .set_strict_variables(true)
        .set_fail_on_invalid_map_property(true)
        .disable_symbol("eval");
    engine.on_print(|text| crate::errln!("{text}"));
    engine.on_debug(|text, _, pos| crate::errln!("[recipe {pos}] {text}"));

    engine
        .register_type_with_name::<StageHandle>("Stage")
        .register_fn("to_string", |h: &mut StageHandle| handle_name(h))
        .register_fn("to_debug", |h: &mut StageHandle| handle_name(h))
        .register_fn("output", |h: &mut StageHandle, port: &str| StageHandle {
            node: h.node,
            port: Some(port.to_string()),
            stage: h.stage.clone(),
        });

    for factory in registry.iter() {
        for arity in 0..=MAX_ARGS {
            let factory = Arc::clone(factory);
            let builder = Arc::clone(builder);
            let types = vec![TypeId::of::<Dynamic>(); arity];
            engine.register_raw_fn(factory.name(), types, move |ctx: NativeCallContext, args: &mut [&mut Dynamic]| {
                let pos = Position::from_rhai(ctx.call_position());
                let mut state = builder.lock().map_err(|_| "recipe builder poisoned".to_string())?;
                check_stage_count(&state, ctx.call_position())?;
                Ok(add_stage(&mut state, factory.as_ref(), pos, args))
            });
        }
    }

    for name in unknown_names {
        for arity in 0..=MAX_ARGS {
            let builder = Arc::clone(builder);
            let name = name.clone();
            let suggestion = suggest(&name, registry);
            let types = vec![TypeId::of::<Dynamic>(); arity];
            engine.register_raw_fn(name.clone(), types, move |ctx: NativeCallContext, _args: &mut [&mut Dynamic]| {
                let pos = Position::from_rhai(ctx.call_position());
                let mut state = builder.lock().map_err(|_| "recipe builder poisoned".to_string())?;
                check_stage_count(&state, ctx.call_position())?;
                state.problems.push(Problem::new(pos, format!("unknown stage `{name}`{suggestion}")));
                let id = state.nodes.len();
                state.nodes.push(Node { id, stage: name.clone(), options: Value::Null, position: pos, unknown: true });
                Ok(StageHandle { node: id, port: None, stage: name.clone() })
            });
        }
    }

    register_param(&mut engine, builder, params);
    engine.register_fn("env", |name: &str| -> Result<String, Box<EvalAltResult>> {
        std::env::var(name).map_err(|_| format!("environment variable `{name}` is not set").into())
    });
    engine.register_fn("env", |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string()));
    engine
}

/// An error at the call that would declare one stage more than [`limits::MAX_STAGES`].
fn check_stage_count(state: &Builder, pos: rhai::Position) -> Result<(), Box<EvalAltResult>> {
    if state.nodes.len() < limits::MAX_STAGES {
        return Ok(());
    }
    let message = format!(
        "the recipe declares more than {} stages (each runs on its own thread); split the work into several recipes",
        limits::MAX_STAGES
    );
    Err(EvalAltResult::ErrorRuntime(message.into(), pos).into())
}

fn handle_name(handle: &StageHandle) -> String {
    match &handle.port {
        Some(port) => format!("{}#{}.{port}", handle.stage, handle.node),
        None => format!("{}#{}", handle.stage, handle.node),
    }
}

fn suggest(name: &str, registry: &Registry) -> String {
    registry
        .names()
        .map(|known| (strsim::damerau_levenshtein(name, known), known))
        .filter(|(d, known)| *d <= 2.max(known.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, known)| format!(" (did you mean `{known}`?)"))
        .unwrap_or_else(|| format!(" (known stages: {})", registry.names().collect::<Vec<_>>().join(", ")))
}

/// `param("name", default)` returns `--set name=value` or the default (whose type the value
/// must have); `param("name")` requires the value.
fn register_param(engine: &mut Engine, builder: &Arc<Mutex<Builder>>, params: &Params) {
    let with_default = {
        let builder = Arc::clone(builder);
        let params = params.clone();
        move |ctx: NativeCallContext, name: &str, default: Dynamic| -> Result<Dynamic, Box<EvalAltResult>> {
            if let Ok(mut state) = builder.lock() {
                state.params_used.insert(name.to_string());
            }
            let Some(value) = params.get(name) else { return Ok(default) };
            let dynamic = json_to_dynamic(value);
            let same_type = default.type_id() == dynamic.type_id() || (default.is_float() && dynamic.is_int()) || default.is_unit();
            if !same_type {
                return Err(EvalAltResult::ErrorRuntime(
                    format!("{}: expected {} like the default", params.describe(name), default.type_name()).into(),
                    ctx.call_position(),
                )
                .into());
            }
            if default.is_float()
                && let Ok(int) = dynamic.as_int()
            {
                return Ok(Dynamic::from_float(int as rhai::FLOAT));
            }
            Ok(dynamic)
        }
    };
    engine.register_fn("param", with_default);
    let builder = Arc::clone(builder);
    let params = params.clone();
    engine.register_fn("param", move |ctx: NativeCallContext, name: &str| -> Result<Dynamic, Box<EvalAltResult>> {
        if let Ok(mut state) = builder.lock() {
            state.params_used.insert(name.to_string());
        }
        params.get(name).map(json_to_dynamic).ok_or_else(|| {
            EvalAltResult::ErrorRuntime(
                format!("parameter `{name}` is required: pass --set {name}=VALUE or put it in a --params file").into(),
                ctx.call_position(),
            )
            .into()
        })
    });
}

/// Records a stage call: handles become edges, plain values positional options, a map the
/// options. Problems are recorded, never thrown, so the script goes on.
fn add_stage(state: &mut Builder, factory: &dyn StageFactory, pos: Position, args: &mut [&mut Dynamic]) -> StageHandle {
    let id = state.nodes.len();
    let name = factory.name();
    let mut options = serde_json::Map::new();
    let mut input_index = 0;
    let mut positional_index = 0;
    let inputs = factory.inputs();
    let outputs = factory.outputs();

    for arg in args.iter_mut() {
        let value = arg.flatten_clone();
        if let Some(handle) = value.clone().try_cast::<StageHandle>() {
            match inputs.get(input_index) {
                Some(port) => state.edges.push(Edge {
                    from: Endpoint { node: handle.node, port: handle.port },
                    to: Endpoint { node: id, port: Some(port.name.to_string()) },
                    position: pos,
                }),
                None => state.problems.push(Problem::new(
                    pos,
                    format!("{name}: too many stage inputs ({} takes {}); {}", name, inputs.len(), usage(factory)),
                )),
            }
            input_index += 1;
        } else if value.is_map() {
            let map = value.cast::<Map>();
            for (key, item) in map {
                let key = key.to_string();
                add_option(state, factory, id, pos, &key, &item, &mut options);
            }
        } else if value.is_unit() {
            // `()` fills no slot.
        } else {
            match factory.positional().get(positional_index) {
                Some(option) => match to_json(state, &value, pos) {
                    Ok(json) => {
                        options.insert((*option).to_string(), json);
                    }
                    Err(message) => state.problems.push(Problem::new(pos, format!("{name}: {message}"))),
                },
                None => state.problems.push(Problem::new(
                    pos,
                    format!("{name}: unexpected argument {} ({}); {}", describe_dynamic(&value), value.type_name(), usage(factory)),
                )),
            }
            positional_index += 1;
        }
    }
    let _ = outputs;
    state.nodes.push(Node { id, stage: name.to_string(), options: Value::Object(options), position: pos, unknown: false });
    StageHandle { node: id, port: None, stage: name.to_string() }
}

/// One `key: value` of an option map: a handle under a port name is an edge, anything else
/// an option.
fn add_option(
    state: &mut Builder,
    factory: &dyn StageFactory,
    id: usize,
    pos: Position,
    key: &str,
    item: &Dynamic,
    options: &mut serde_json::Map<String, Value>,
) {
    let name = factory.name();
    let item = item.flatten_clone();
    let handles: Option<Vec<StageHandle>> = if let Some(handle) = item.clone().try_cast::<StageHandle>() {
        Some(vec![handle])
    } else if item.is_array() {
        let array = item.clone().cast::<rhai::Array>();
        let all: Vec<StageHandle> = array.iter().filter_map(|v| v.flatten_clone().try_cast::<StageHandle>()).collect();
        if !all.is_empty() && all.len() == array.len() { Some(all) } else { None }
    } else {
        None
    };
    let Some(handles) = handles else {
        match to_json(state, &item, pos) {
            Ok(json) => {
                options.insert(key.to_string(), json);
            }
            Err(message) => state.problems.push(Problem::new(pos, format!("{name}: option `{key}`: {message}"))),
        }
        return;
    };
    if factory.inputs().iter().any(|p| p.name == key) {
        for handle in handles {
            state.edges.push(Edge {
                from: Endpoint { node: handle.node, port: handle.port },
                to: Endpoint { node: id, port: Some(key.to_string()) },
                position: pos,
            });
        }
    } else if factory.outputs().iter().any(|p| p.name == key) {
        for handle in handles {
            state.edges.push(Edge {
                from: Endpoint { node: id, port: Some(key.to_string()) },
                to: Endpoint { node: handle.node, port: None },
                position: pos,
            });
        }
    } else {
        let ports: Vec<&str> = factory.inputs().iter().chain(factory.outputs()).map(|p| p.name).collect();
        let hint = if ports.is_empty() { String::new() } else { format!(" (its ports: {})", ports.join(", ")) };
        state.problems.push(Problem::new(pos, format!("{name}: option `{key}` got a stage, but `{key}` is not a port of {name}{hint}")));
    }
}

/// A short rendering of a recipe value for messages.
fn describe_dynamic(value: &Dynamic) -> String {
    let text = value.to_string();
    if text.len() > 40 { format!("{}...", &text[..text.floor_char_boundary(40)]) } else { text }
}

/// Converts a recipe value into JSON options. Closures are stored and become
/// `{"$closure": n}`; stage handles are not values.
fn to_json(state: &mut Builder, value: &Dynamic, pos: Position) -> Result<Value, String> {
    let value = value.flatten_clone();
    if value.is_unit() {
        return Ok(Value::Null);
    }
    if let Ok(b) = value.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Ok(i) = value.as_int() {
        return Ok(Value::from(i));
    }
    if let Ok(f) = value.as_float() {
        return serde_json::Number::from_f64(f).map(Value::Number).ok_or_else(|| format!("{f} is not a finite number"));
    }
    if let Ok(c) = value.as_char() {
        return Ok(Value::String(c.to_string()));
    }
    if value.is_string() {
        return Ok(Value::String(value.into_string().unwrap_or_default()));
    }
    if value.is_array() {
        let array = value.cast::<rhai::Array>();
        return array.iter().map(|v| to_json(state, v, pos)).collect::<Result<Vec<_>, _>>().map(Value::Array);
    }
    if value.is_map() {
        let map = value.cast::<Map>();
        let mut object = serde_json::Map::new();
        for (key, item) in &map {
            object.insert(key.to_string(), to_json(state, item, pos)?);
        }
        return Ok(Value::Object(object));
    }
    if value.is::<FnPtr>() {
        let ptr = value.cast::<FnPtr>();
        let id = state.closures.len();
        state.closures.push((ptr, pos));
        return Ok(serde_json::json!({ "$closure": id }));
    }
    if value.is::<StageHandle>() {
        return Err("a stage handle is only allowed as an input or under a port name".into());
    }
    Err(format!("values of type {} cannot be stage options", value.type_name()))
}

/// JSON (from `--set`) as a recipe value.
fn json_to_dynamic(value: &Value) -> Dynamic {
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Array(items) => Dynamic::from_array(items.iter().map(json_to_dynamic).collect()),
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                out.insert(k.as_str().into(), json_to_dynamic(v));
            }
            Dynamic::from_map(out)
        }
    }
}

/// Parses `key=value` from `--set`: the value is read as JSON when it parses (numbers,
/// booleans, lists), else taken as a plain string.
pub fn parse_set(text: &str) -> Result<(String, Value), String> {
    let (key, raw) = text.split_once('=').ok_or_else(|| format!("--set {text}: expected key=value"))?;
    let key = key.trim();
    if !crate::dataflow::params::valid_name(key) {
        return Err(format!("--set {text}: `{key}` is not a valid parameter name"));
    }
    let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    if value.is_null() {
        return Err(format!("--set {text}: a parameter needs a value (leave it out for the recipe's default)"));
    }
    Ok((key.to_string(), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_values_parse_as_json_or_strings() {
        assert_eq!(parse_set("budget=4096"), Ok(("budget".into(), Value::from(4096))));
        assert_eq!(parse_set("lr=2e-6"), Ok(("lr".into(), serde_json::json!(2e-6))));
        assert_eq!(parse_set("name=hello"), Ok(("name".into(), Value::from("hello"))));
        assert_eq!(parse_set("flag=true"), Ok(("flag".into(), Value::from(true))));
        assert!(parse_set("oops").is_err());
        assert!(parse_set("x=null").is_err());
        assert!(parse_set("a b=1").is_err());
    }

    #[test]
    fn ast_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<rhai::AST>();
        assert_send_sync::<Engine>();
    }
}
