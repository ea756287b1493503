//! Test helpers shared by the property tests of the parsers and verifiers: a fixed-seed
//! proptest configuration (the same cases on every run, no regression files written).

use proptest::test_runner::{Config, RngSeed};

/// `cases` generated cases from a fixed seed.
pub fn config(cases: u32) -> Config {
    Config { cases, rng_seed: RngSeed::Fixed(0x10_76_41), failure_persistence: None, ..Config::default() }
}
