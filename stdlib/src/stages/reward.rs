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
        self.judge.as_ref().map(JudgeConfig::problems).unwrap_or_default()
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let mut judge = self.judge.clone().map(Judge::new).transpose()?;
        if let (Some(j), Some(run_dir)) = (judge.take(), &ctx.run_dir) {
            // The run's judge verdicts persist, so a resumed run pays for none twice.
            judge = Some(j.with_cache_file(&run_dir.join(format!("judge_cache-{}.jsonl", ctx.node)))?);
        }
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
        io.send_reward("reward", Arc::clone(&self.reward))
    }
}
