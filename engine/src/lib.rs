//! longrl engine. Two layers, read apart: [`dataflow`], the generic engine (recipe host,
//! plan, executor, run directory, resume), which names no stage; and [`commands`], the
//! application behind the `longrl` binary (run, report, bench, serve, score, generate).

pub mod commands;
pub mod dataflow;
pub mod out;

pub use dataflow::{CheckError, Params, Plan, Problems, RunOptions, RunReport, ValidPlan, check_recipe, execute, load_plan};
