//! The standard stages, one per file.

pub mod eval;
pub mod filter;
pub mod hard_buffer;
pub mod hotpotqa;
pub mod jsonl;
pub mod model;
pub mod parquet;
pub mod reward;
pub mod rl_phase;
pub mod score_difficulty;
pub mod sft;
pub mod synthetic;
pub mod write_jsonl;
