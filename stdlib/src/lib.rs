//! longrl standard library: the stage contract, the standard stages (sources, filter,
//! sinks, training and evaluation stages) and the model runtime they share.

pub mod adamw;
pub mod checkpoint;
pub mod device_lock;
pub mod driver;
pub mod error;
pub mod fan_in;
pub mod fsutil;
pub mod guard;
pub mod metrics;
pub mod model;
pub mod options;
pub mod parallel;
pub mod progress;
pub mod prompt;
pub mod record;
pub mod registry;
pub mod reward;
pub mod rl;
pub mod script;
pub mod stage;
pub mod stages;
#[cfg(test)]
mod testing;
pub mod tokenizer;
pub mod train;

pub use error::StageError;
pub use record::{AnswerKind, ChatMessage, Difficulty, Record};
pub use registry::Registry;
pub use stage::{
    CancelToken, Chart, ClosureRef, DifficultyReport, Item, ModelRef, PlanEdge, PlanNode, PlanView, PortKind, PortSpec, ReportFigure,
    Stage, StageConfig, StageContext, StageFactory, StageIo,
};
