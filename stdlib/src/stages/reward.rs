//! `reward` stage: declares the reward (rule check, LLM judge on misses, optional recipe
//! closure) and publishes it on a reward edge, shared by RL phases and evaluations.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::error::StageError;
use crate::record::AnswerKind;
use crate::reward::RuleConfig;
use crate::reward::judge::{Judge, JudgeConfig};
use crate::reward::{JudgeWhen, Reward, ScriptMode};
use crate::stage::{ClosureRef, PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};

/// Options of the `reward` stage.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// The rule check: `#{ text: "contains", require_think_end: false, numeric: #{ tolerance: 0.0015 } }`.
    #[serde(default)]
    pub rule: RuleConfig,
    /// An LLM judge behind an OpenAI-compatible API: `#{ url: "http://127.0.0.1:8000/v1", model: "judge" }`.
    #[serde(default)]
    pub judge: Option<JudgeConfig>,
    /// When the judge is asked: `miss` (rule below 1), `always` or `never`.
    #[serde(default)]
    pub judge_when: JudgeWhen,
    /// A closure `|response, record| -> number`, as the reward or an extra term.
    #[serde(default)]
    pub script: Option<ClosureRef>,
    /// `replace`: the closure is the reward; `add`: it is added to the rule/judge reward.
    #[serde(default)]
    pub script_mode: ScriptMode,
    /// Answer kind by data_source (`#{ docmath: "number" }`), overriding the records' kinds.
    #[serde(default)]
    pub kinds: BTreeMap<String, AnswerKind>,
}

impl StageConfig for RewardConfig {
    const NAME: &'static str = "reward";
    const SUMMARY: &'static str = "The reward: rule check, LLM judge where the rule misses (max of both), optional closure.";
    const OUTPUTS: &'static [PortSpec] = &[PortSpec::optional("reward", PortKind::Reward, "the reward, for RL phases and evaluations")];

    fn validate(&self, _ctx: &StageContext) -> Vec<String> {
        let mut problems = self.rule.problems();
        problems.extend(self.judge.as_ref().map(JudgeConfig::problems).unwrap_or_default());
        problems
    }

    const WRITES_FILES: bool = true;

    fn writes(&self, ctx: &StageContext) -> Vec<std::path::PathBuf> {
        let cache = std::path::PathBuf::from(format!("judge_cache-{}.jsonl", ctx.node));
        self.judge.iter().map(|_| ctx.output_path(&cache)).collect()
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let judge = match (self.judge.clone().map(Judge::new).transpose()?, &ctx.run_dir) {
            // The run's judge verdicts persist, so a resumed run pays for none twice.
            (Some(judge), Some(run_dir)) => Some(judge.with_cache_file(&run_dir.join(format!("judge_cache-{}.jsonl", ctx.node)))?),
            // Without a run directory (library use) the judge is kept, with its cache in memory.
            (judge, _) => judge,
        };
        let judge = judge.map(Arc::new);
        let script = self.script.map(|r| ctx.closure(r)).transpose()?;
        let reward =
            Reward { rule: self.rule, judge, judge_when: self.judge_when, script, script_mode: self.script_mode, kinds: self.kinds };
        Ok(Box::new(RewardSource { reward: Arc::new(reward) }))
    }
}

struct RewardSource {
    reward: Arc<Reward>,
}

impl Stage for RewardSource {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        if let Some(judge) = &self.reward.judge {
            judge.watch(io.cancel_token());
        }
        io.send_reward("reward", Arc::clone(&self.reward))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_judge_is_kept_when_the_stage_runs_without_a_run_directory() {
        let options = serde_json::json!({ "judge": { "url": "http://127.0.0.1:9/v1", "model": "judge" } });
        let config: RewardConfig = serde_json::from_value(options).expect("options");
        let ctx = StageContext::for_check(".");
        assert!(ctx.run_dir.is_none());
        let stage = config.build(&ctx).expect("builds");
        let (tx, rx) = crossbeam_channel::bounded(1);
        let outputs = vec![(RewardConfig::OUTPUTS[0], vec![tx])];
        let metrics = crate::metrics::Metrics::discard();
        let mut io = StageIo::new("reward#0", Vec::new(), outputs, Default::default(), Default::default(), metrics);
        stage.run(&mut io).expect("runs");
        let Ok(crate::stage::Item::Reward(reward)) = rx.recv() else { panic!("a reward is published") };
        assert!(reward.judge.is_some(), "the judge was dropped");
    }
}
