//! The standard stages, one per file.

pub mod filter;
pub mod jsonl;
pub mod model;
pub mod write_jsonl;
