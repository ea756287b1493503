//! Recipe closures called from stage threads: a filter predicate, a reward function.
//! Compiled once with the recipe; each call runs under the recipe engine's limits.

use std::fmt;
use std::sync::Arc;

use rhai::{AST, Dynamic, Engine, FnPtr};

use crate::error::StageError;

/// A closure from the recipe (`|record| record.question.len() < 200`), callable from any
/// thread. Cloning shares the engine and compiled script.
#[derive(Clone)]
pub struct ScriptFn {
    engine: Arc<Engine>,
    ast: Arc<AST>,
    function: FnPtr,
    /// Where the closure was written, for messages: `recipe.rhai:7:21`.
    origin: String,
}

impl fmt::Debug for ScriptFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptFn").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl ScriptFn {
    pub fn new(engine: Arc<Engine>, ast: Arc<AST>, function: FnPtr, origin: impl Into<String>) -> Self {
        Self { engine, ast, function, origin: origin.into() }
    }

    /// Where the closure was written.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// What identifies the closure's behaviour across processes: Rhai names an anonymous
    /// function by a hash of its parameters and body (positions included), and the values
    /// it captured follow. Two recipes whose closure differs in any of these differ here.
    pub fn fingerprint(&self) -> String {
        let captured: Vec<String> = self.function.curry().iter().map(|value| format!("{value:?}")).collect();
        format!("{}({})", self.function.fn_name(), captured.join(", "))
    }

    /// Calls the closure with one argument.
    pub fn call1(&self, arg: Dynamic) -> Result<Dynamic, StageError> {
        self.function
            .call::<Dynamic>(&self.engine, &self.ast, (arg,))
            .map_err(|err| StageError::Failed(format!("closure at {}: {err}", self.origin)))
    }

    /// Calls the closure with two arguments.
    pub fn call2(&self, a: Dynamic, b: Dynamic) -> Result<Dynamic, StageError> {
        self.function
            .call::<Dynamic>(&self.engine, &self.ast, (a, b))
            .map_err(|err| StageError::Failed(format!("closure at {}: {err}", self.origin)))
    }

    /// Calls a predicate; anything but a boolean result is an error.
    pub fn call_bool(&self, arg: Dynamic) -> Result<bool, StageError> {
        let value = self.call1(arg)?;
        value
            .as_bool()
            .map_err(|type_name| StageError::Failed(format!("closure at {} returned {type_name}, expected a boolean", self.origin)))
    }
}

/// A record (or any serializable value) as a Rhai object map.
pub fn to_dynamic<T: serde::Serialize>(value: &T) -> Result<Dynamic, StageError> {
    rhai::serde::to_dynamic(value).map_err(|e| StageError::Failed(format!("cannot pass value to a closure: {e}")))
}
