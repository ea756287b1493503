//! The stage registry: every stage's name, ports, option docs and factory. It is the single
//! source of the recipe API and of `longrl stages`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::stage::{ConfigFactory, StageConfig, StageFactory};

/// Stage factories by recipe name.
#[derive(Clone, Default)]
pub struct Registry {
    factories: BTreeMap<&'static str, Arc<dyn StageFactory>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.factories.keys()).finish()
    }
}

impl Registry {
    /// An empty registry (tests add their own stages).
    pub fn empty() -> Self {
        Self::default()
    }

    /// All standard stages. Adding a stage is one line here.
    pub fn standard() -> Self {
        let mut registry = Self::empty();
        registry.add::<crate::stages::jsonl::JsonlConfig>();
        registry.add::<crate::stages::parquet::ParquetConfig>();
        registry.add::<crate::stages::filter::FilterConfig>();
        registry.add::<crate::stages::write_jsonl::WriteJsonlConfig>();
        registry.add::<crate::stages::model::ModelConfigOptions>();
        registry.add::<crate::stages::synthetic::SyntheticConfig>();
        registry.add::<crate::stages::hotpotqa::HotpotConfig>();
        registry.add::<crate::stages::sft::SftConfig>();
        registry.add::<crate::stages::eval::EvalConfig>();
        registry.add::<crate::stages::reward::RewardConfig>();
        registry.add::<crate::stages::rl_phase::RlPhaseConfig>();
        registry.add::<crate::stages::hard_buffer::HardBufferConfig>();
        registry.add::<crate::stages::score_difficulty::ScoreDifficultyConfig>();
        registry
    }

    /// Registers a stage type by its config.
    pub fn add<C: StageConfig>(&mut self) -> &mut Self {
        self.add_factory(Arc::new(ConfigFactory::<C>::new()))
    }

    /// Registers a factory; a later one with the same name replaces the earlier.
    pub fn add_factory(&mut self, factory: Arc<dyn StageFactory>) -> &mut Self {
        self.factories.insert(factory.name(), factory);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn StageFactory>> {
        self.factories.get(name)
    }

    /// Factories in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn StageFactory>> {
        self.factories.values()
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.factories.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_of_every_stage_has_a_doc_line() {
        let registry = Registry::standard();
        let mut bare = Vec::new();
        for factory in registry.iter() {
            for option in factory.options() {
                if option.doc.trim().is_empty() {
                    bare.push(format!("{}.{}", factory.name(), option.name));
                }
            }
            assert!(!factory.summary().is_empty(), "{} has no summary", factory.name());
            for port in factory.inputs().iter().chain(factory.outputs()) {
                assert!(!port.doc.is_empty(), "{} port {} has no doc", factory.name(), port.name);
            }
        }
        assert!(bare.is_empty(), "options without a doc line (add a `///` comment): {bare:?}");
    }
}
