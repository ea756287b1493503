//! Dynamic sampling (DAPO): a step's batch is filled with groups that teach something. A
//! group whose samples are all correct or all wrong (DAPO's accuracy rule; or, as an option,
//! whose rewards are all equal), or whose pass rate is outside a chosen band, is dropped and
//! the next prompt of the stream is sampled in its place, until the batch is full or a bound
//! on tries is reached. [`fill_step_batched`] rolls out several prompts at once and decides
//! exactly as the one-at-a-time [`fill_step`] does.

use std::collections::{BTreeMap, VecDeque};

use crate::error::StageError;
use crate::model::batch_decode::GroupRequest;
use crate::model::generate::Completion;
use crate::rl::advantage::zero_variance;
use crate::rl::rollout::Rollouts;

/// What filling one step produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Filled<T> {
    /// The groups kept, in the order they were sampled.
    pub kept: Vec<T>,
    /// Prompts sampled (kept and dropped).
    pub tried: usize,
    /// Groups dropped.
    pub dropped: usize,
    /// The batch is not full: the try bound was hit or the prompts ran out.
    pub short: bool,
}

/// Samples prompts taken from the front of `queue` with `rollout` until `want` groups are
/// kept or `max_tries` prompts were tried. `rollout` returns `None` for a group to drop.
pub fn fill_step<T, E>(
    queue: &mut VecDeque<usize>,
    want: usize,
    max_tries: usize,
    mut rollout: impl FnMut(usize) -> Result<Option<T>, E>,
) -> Result<Filled<T>, E> {
    let mut filled = Filled { kept: Vec::with_capacity(want), tried: 0, dropped: 0, short: false };
    while filled.kept.len() < want && filled.tried < max_tries {
        let Some(index) = queue.pop_front() else { break };
        filled.tried += 1;
        match rollout(index)? {
            Some(group) => filled.kept.push(group),
            None => filled.dropped += 1,
        }
    }
    filled.short = filled.kept.len() < want;
    Ok(filled)
}

/// [`fill_step`] with the prompts' groups generated concurrently by `rollouts`: the same
/// prompts are tried, judged in the same order (`judge` sees them in queue order, whatever
/// order they finish in) and kept or dropped alike, given that a group's completions do not
/// depend on the others'. A prompt is started only when the prompts before it cannot fill
/// the step even if every one of them is kept, so no group is generated that the
/// one-at-a-time order would not try. `check` runs between polls (cancellation).
pub fn fill_step_batched<T>(
    queue: &mut VecDeque<usize>,
    want: usize,
    max_tries: usize,
    rollouts: &mut dyn Rollouts,
    mut request: impl FnMut(usize) -> GroupRequest,
    mut judge: impl FnMut(usize, Vec<Completion>) -> Result<Option<T>, StageError>,
    mut check: impl FnMut() -> Result<(), StageError>,
) -> Result<Filled<T>, StageError> {
    let mut filled = Filled { kept: Vec::with_capacity(want), tried: 0, dropped: 0, short: false };
    // Prompts started and not yet judged, in queue order: (try number, prompt index).
    let mut started: VecDeque<(usize, usize)> = VecDeque::new();
    let mut finished: BTreeMap<usize, Vec<Completion>> = BTreeMap::new();
    loop {
        while filled.kept.len() + started.len() < want && filled.tried + started.len() < max_tries {
            let Some(index) = queue.pop_front() else { break };
            let attempt = filled.tried + started.len();
            rollouts.submit(attempt, request(index))?;
            started.push_back((attempt, index));
        }
        let Some(&(attempt, index)) = started.front() else { break };
        if let Some(completions) = finished.remove(&attempt) {
            started.pop_front();
            filled.tried += 1;
            match judge(index, completions)? {
                Some(group) => filled.kept.push(group),
                None => filled.dropped += 1,
            }
            continue;
        }
        check()?;
        finished.extend(rollouts.poll()?);
    }
    filled.short = filled.kept.len() < want;
    Ok(filled)
}

/// What dynamic sampling looks at to decide that a group teaches nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FilterMetric {
    /// The samples' correctness: a group all correct or all wrong is dropped (DAPO).
    #[default]
    Accuracy,
    /// The rewards after shaping: a group whose rewards are all equal is dropped.
    Reward,
}

/// Why a group is dropped, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No response could be scored.
    Unscorable,
    /// Every sample alike under the filter metric (all correct or all wrong; or all rewards
    /// equal): the group has no learning signal.
    ZeroVariance,
    /// The pass rate is outside the accuracy band.
    OutsideBand,
}

/// How dynamic sampling and the accuracy band filter groups.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupFilter {
    /// Drop groups without a learning signal (see [`FilterMetric`]).
    pub dynamic: bool,
    pub metric: FilterMetric,
    /// Keep only groups whose pass rate lies within [a, b].
    pub band: Option<[f32; 2]>,
}

impl GroupFilter {
    /// Why a group with these (shaped) rewards and this pass rate is dropped, if it is.
    pub fn drop_reason(&self, rewards: &[Option<f32>], pass_rate: Option<f32>) -> Option<DropReason> {
        let Some(rate) = pass_rate.filter(|_| rewards.iter().any(Option::is_some)) else { return Some(DropReason::Unscorable) };
        let alike = match self.metric {
            FilterMetric::Accuracy => rate <= 0.0 || rate >= 1.0,
            FilterMetric::Reward => zero_variance(rewards),
        };
        if self.dynamic && alike {
            Some(DropReason::ZeroVariance)
        } else if self.band.is_some_and(|[a, b]| !(a..=b).contains(&rate)) {
            Some(DropReason::OutsideBand)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prompts 0..10; the even ones give all-equal rewards.
    fn rewards_of(index: usize) -> Vec<Option<f32>> {
        if index.is_multiple_of(2) { vec![Some(1.0); 4] } else { vec![Some(1.0), Some(0.0), Some(0.0), Some(1.0)] }
    }

    fn rollout(index: usize) -> Result<Option<usize>, ()> {
        let filter = GroupFilter { dynamic: true, metric: FilterMetric::Reward, band: None };
        Ok(filter.drop_reason(&rewards_of(index), Some(0.5)).is_none().then_some(index))
    }

    #[test]
    fn zero_variance_groups_are_replaced_by_the_next_prompts() {
        let mut queue: VecDeque<usize> = (0..10).collect();
        let filled = fill_step(&mut queue, 3, 12, rollout).expect("fills");
        assert_eq!(filled.kept, vec![1, 3, 5]);
        assert_eq!((filled.tried, filled.dropped, filled.short), (6, 3, false));
        // The stream goes on where it stopped.
        assert_eq!(queue.front(), Some(&6));
    }

    /// Rollouts that finish the queued groups out of order: each poll returns one group,
    /// picked by a fixed pseudo-random sequence. A group's "completion" is its prompt index.
    struct Shuffled {
        queued: Vec<(usize, usize)>,
        state: u64,
        polls: usize,
    }

    impl Rollouts for Shuffled {
        fn submit(&mut self, id: usize, request: GroupRequest) -> Result<(), StageError> {
            self.queued.push((id, request.prompt[0] as usize));
            Ok(())
        }

        fn poll(&mut self) -> Result<Vec<(usize, Vec<Completion>)>, StageError> {
            self.polls += 1;
            if self.queued.is_empty() {
                return Ok(Vec::new());
            }
            self.state = self.state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (id, index) = self.queued.swap_remove((self.state >> 33) as usize % self.queued.len());
            let completion =
                Completion { tokens: vec![index as u32], logprobs: vec![0.0], finish: crate::model::generate::FinishReason::Stop };
            Ok(vec![(id, vec![completion])])
        }
    }

    #[test]
    fn batched_filling_tries_keeps_and_judges_exactly_as_one_at_a_time() {
        // Drop patterns: every prompt index kept or dropped by a fixed rule per case.
        let rules: [fn(usize) -> bool; 4] = [|i| i % 2 == 1, |i| i % 3 == 0, |_| true, |i| i > 7];
        for (case, keep) in rules.iter().enumerate() {
            for (want, max_tries, len) in [(3, 12, 10), (4, 5, 20), (2, 100, 3), (6, 6, 30), (1, 1, 5)] {
                let rollout_one = |index: usize| -> Result<Option<usize>, StageError> { Ok(keep(index).then_some(index)) };
                let mut queue: VecDeque<usize> = (0..len).collect();
                let expected = fill_step(&mut queue, want, max_tries, rollout_one).expect("fills");
                let mut batched_queue: VecDeque<usize> = (0..len).collect();
                let mut rollouts = Shuffled { queued: Vec::new(), state: case as u64 + 7, polls: 0 };
                let mut judged = Vec::new();
                let filled = fill_step_batched(
                    &mut batched_queue,
                    want,
                    max_tries,
                    &mut rollouts,
                    |index| GroupRequest::group(vec![index as u32], 1, crate::model::generate::SamplingConfig::default()),
                    |index, completions| {
                        assert_eq!(completions[0].tokens, vec![index as u32], "a group comes back to its own prompt");
                        judged.push(index);
                        Ok(keep(index).then_some(index))
                    },
                    || Ok(()),
                )
                .expect("fills");
                assert_eq!(filled, expected, "case {case}, want {want}, tries {max_tries}");
                assert_eq!(batched_queue, queue, "the same prompts are left");
                assert_eq!(judged.len(), expected.tried, "every prompt tried is judged once, none beyond");
                assert!(judged.windows(2).all(|w| w[0] < w[1]), "judged in queue order: {judged:?}");
            }
        }
    }

    #[test]
    fn the_try_bound_leaves_a_short_batch() {
        let mut queue: VecDeque<usize> = (0..10).collect();
        let filled = fill_step(&mut queue, 3, 4, rollout).expect("fills");
        assert_eq!(filled.kept, vec![1, 3]);
        assert_eq!((filled.tried, filled.dropped, filled.short), (4, 2, true));
        // Prompts running out also leaves it short.
        let mut queue: VecDeque<usize> = [0, 2, 5].into_iter().collect();
        let filled = fill_step(&mut queue, 3, 100, rollout).expect("fills");
        assert_eq!((filled.kept, filled.tried, filled.short), (vec![5], 3, true));
    }

    #[test]
    fn without_dynamic_sampling_every_scorable_group_is_kept() {
        let filter = |dynamic, metric, band| GroupFilter { dynamic, metric, band };
        let reward = FilterMetric::Reward;
        assert_eq!(filter(false, reward, None).drop_reason(&[Some(1.0), Some(1.0)], Some(1.0)), None);
        assert_eq!(filter(true, reward, None).drop_reason(&[Some(1.0), Some(1.0)], Some(1.0)), Some(DropReason::ZeroVariance));
        assert_eq!(filter(false, reward, None).drop_reason(&[None, None], None), Some(DropReason::Unscorable));
        let band = Some([0.1, 0.4]);
        assert_eq!(filter(true, reward, band).drop_reason(&[Some(1.0), Some(0.0)], Some(0.5)), Some(DropReason::OutsideBand));
        assert_eq!(filter(true, reward, Some([0.1, 0.9])).drop_reason(&[Some(1.0), Some(0.0)], Some(0.5)), None);
    }

    #[test]
    fn dynamic_sampling_filters_on_accuracy_not_on_shaped_rewards() {
        // All four wrong, but overlong shaping made their rewards differ: no accuracy signal.
        let shaped = [Some(0.0), Some(-0.25), Some(-1.0), Some(0.0)];
        let accuracy = GroupFilter { dynamic: true, metric: FilterMetric::Accuracy, band: None };
        assert_eq!(accuracy.drop_reason(&shaped, Some(0.0)), Some(DropReason::ZeroVariance));
        // The reward-variance rule keeps it.
        let reward = GroupFilter { metric: FilterMetric::Reward, ..accuracy };
        assert_eq!(reward.drop_reason(&shaped, Some(0.0)), None);
        // All correct is dropped too; a mixed group is kept.
        assert_eq!(accuracy.drop_reason(&[Some(1.0), Some(0.9)], Some(1.0)), Some(DropReason::ZeroVariance));
        assert_eq!(accuracy.drop_reason(&[Some(1.0), Some(0.0)], Some(0.5)), None);
    }
}
