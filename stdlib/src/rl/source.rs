//! Where a stage samples its groups ([`Rollouts`]): in its own process, one group at a time
//! ([`generate_group`]), or on inference servers ([`crate::rl::remote`]). The seam between
//! a stage and its rollout engine: the stage asks for `G` samples of each of a batch of
//! prompts and, for servers, syncs its weights before a step.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::error::StageError;
use crate::model::CausalLm;
use crate::model::batch_decode::GroupRequest;
use crate::model::checkpoint::copy_tokenizer_files;
use crate::model::generate::{Completion, SamplingConfig, generate_group};
use crate::model::{ModelConfig, save_model};
use crate::rl::remote::{Flavor, RemoteRollouts, RolloutConfig};
use crate::stage::CancelToken;

/// One prompt's samples, wherever they were drawn.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub completions: Vec<Completion>,
    /// The servers' weights version (`None` in process, or from vLLM).
    pub weights_version: Option<String>,
    /// Drawn by a server: its log-probs are another engine's, to be checked.
    pub remote: bool,
}

/// Where a stage samples its groups: chosen once, when the stage prepares.
#[derive(Debug)]
pub enum Rollouts {
    /// In the stage's process, from its own copy of the policy, one group at a time.
    InProcess,
    /// On inference servers.
    Remote {
        servers: Box<RemoteRollouts>,
        /// Where the policy is written for the servers to load.
        weights_dir: Option<PathBuf>,
    },
}

impl Rollouts {
    /// In process without a `rollout` option; else the servers it names, for `stage`,
    /// writing weights into its `weights_dir` or `default_dir`; their replies must hold ids
    /// below `vocab_size`.
    pub fn connect(
        config: Option<&RolloutConfig>,
        stage: &str,
        default_dir: Option<PathBuf>,
        vocab_size: usize,
        cancel: &CancelToken,
    ) -> Result<Self, StageError> {
        let Some(config) = config else { return Ok(Self::InProcess) };
        let weights_dir = config.weights_dir.clone().or(default_dir);
        Ok(Self::Remote { servers: Box::new(RemoteRollouts::connect(config.clone(), stage, vocab_size, cancel)?), weights_dir })
    }

    pub fn remote(&self) -> Option<&RemoteRollouts> {
        match self {
            Self::InProcess => None,
            Self::Remote { servers, .. } => Some(servers),
        }
    }

    /// Samples `group` responses to each prompt (prompt `i` with `samplings[i]`). In process
    /// `model` is required; the servers use the weights they were last given.
    pub fn generate<B: longrl_backends::CustomGrad>(
        &self,
        model: Option<&CausalLm<B>>,
        prompts: &[&[u32]],
        group: usize,
        samplings: &[SamplingConfig],
        cancel: &CancelToken,
    ) -> Result<Vec<Sampled>, StageError> {
        match self {
            Self::InProcess => {
                let model = model.ok_or_else(|| StageError::Invalid("in-process rollouts need the model".into()))?;
                prompts
                    .iter()
                    .zip(samplings)
                    .map(|(prompt, sampling)| {
                        // A step samples many groups: a stopped run does not wait for all of them.
                        cancel.check()?;
                        let completions = generate_group(model, prompt, group, sampling)?;
                        Ok(Sampled { completions, weights_version: None, remote: false })
                    })
                    .collect()
            }
            Self::Remote { servers, .. } => Ok(servers
                .generate(prompts, group, samplings, cancel)?
                .into_iter()
                .map(|g| Sampled { completions: g.completions, weights_version: g.weights_version, remote: true })
                .collect()),
        }
    }

    /// Makes the servers serve `model` as `version` (unless they already do): writes it into
    /// the weights directory (atomically, file by file) and asks each to load it. In
    /// process: nothing to do.
    pub fn sync_model<B: Backend>(
        &self,
        model: &CausalLm<B>,
        config: &ModelConfig,
        tokenizer_dir: &Path,
        version: &str,
    ) -> Result<(), StageError> {
        let Self::Remote { servers, weights_dir } = self else { return Ok(()) };
        if servers.loaded_version().as_deref() == Some(version) {
            return Ok(());
        }
        let dir =
            weights_dir.as_ref().ok_or_else(|| StageError::Invalid("rollout: give weights_dir (the stage has no run directory)".into()))?;
        save_model(model, config, dir, servers.config().weights_dtype)?;
        copy_tokenizer_files(tokenizer_dir, dir)?;
        servers.load_weights(dir, version)
    }

    /// Makes the servers serve the model directory `dir` as `version`. vLLM reloads only
    /// the directory it started on, so for vLLM the files are copied there first.
    pub fn sync_dir(&self, dir: &Path, version: &str) -> Result<(), StageError> {
        let Self::Remote { servers, weights_dir } = self else { return Ok(()) };
        if servers.config().flavor != Flavor::Vllm {
            return servers.load_weights(dir, version);
        }
        let target = weights_dir.as_ref().ok_or_else(|| StageError::Invalid("rollout: flavor \"vllm\" needs weights_dir".into()))?;
        std::fs::create_dir_all(target).map_err(|e| StageError::io(target, e))?;
        let entries = std::fs::read_dir(dir).map_err(|e| StageError::io(dir, e))?;
        for entry in entries {
            let name = entry.map_err(|e| StageError::io(dir, e))?.file_name().to_string_lossy().into_owned();
            if name == "config.json" || name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json") {
                let from = dir.join(&name);
                let bytes = std::fs::read(&from).map_err(|e| StageError::io(&from, e))?;
                crate::fsutil::write_atomic(&target.join(&name), &bytes)?;
            }
        }
        copy_tokenizer_files(dir, target)?;
        servers.load_weights(target, version)
    }
}

/// The rollout servers as a [`crate::rl::rollout::Rollouts`]: the groups queued between two
/// polls go out together (spread over the servers, `n` samples each), and a poll returns
/// them all. The groups of one poll must ask for the same number of samples.
#[derive(Debug)]
pub struct RemoteBatch<'a> {
    servers: &'a RemoteRollouts,
    queued: Vec<(usize, GroupRequest)>,
    cancel: &'a CancelToken,
}

impl<'a> RemoteBatch<'a> {
    pub fn new(servers: &'a RemoteRollouts, cancel: &'a CancelToken) -> Self {
        Self { servers, queued: Vec::new(), cancel }
    }
}

impl crate::rl::rollout::Rollouts for RemoteBatch<'_> {
    fn submit(&mut self, id: usize, request: GroupRequest) -> Result<(), StageError> {
        self.queued.push((id, request));
        Ok(())
    }

    fn poll(&mut self) -> Result<Vec<(usize, Vec<Completion>)>, StageError> {
        let queued = std::mem::take(&mut self.queued);
        let Some(n) = queued.first().map(|(_, request)| request.samples) else { return Ok(Vec::new()) };
        if queued.iter().any(|(_, request)| request.samples != n) {
            return Err(StageError::Invalid("remote rollouts: groups of one batch ask for different sample counts".into()));
        }
        let prompts: Vec<&[u32]> = queued.iter().map(|(_, request)| request.prompt.as_slice()).collect();
        let samplings: Vec<SamplingConfig> = queued.iter().map(|(_, request)| request.sampling.clone()).collect();
        let groups = self.servers.generate(&prompts, n, &samplings, self.cancel)?;
        Ok(queued.iter().map(|(id, _)| *id).zip(groups.into_iter().map(|group| group.completions)).collect())
    }
}
