//! The application behind the `longrl` binary: each command's work, over the generic engine
//! of [`crate::dataflow`].

pub mod bench;
pub mod convert;
pub mod generate;
pub mod report;
pub mod run;
pub mod score;
pub mod serve;
pub mod stages;
