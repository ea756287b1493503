//! Dynamic sampling (DAPO): a step's batch is filled with groups that teach something. A
//! group whose samples are all correct or all wrong (DAPO's accuracy rule; or, as an option,
//! whose rewards are all equal), or whose pass rate is outside a chosen band, is dropped and
//! the next prompt of the stream is sampled in its place, until the batch is full or a bound
//! on tries is reached.

use std::collections::VecDeque;

use crate::rl::advantage::zero_variance;

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

/// [`fill_step`] for a rollout that samples several prompts at once: `rollout` gets as many
/// prompts from the front of `queue` as the step still needs (within the try bound) and
/// returns each one's group, or `None` to drop it, in the same order. It never asks for
/// more than could be kept, so the prompts tried, the groups kept and the queue left are
/// those [`fill_step`] gives with the same decisions.
pub fn fill_step_batched<T, E>(
    queue: &mut VecDeque<usize>,
    want: usize,
    max_tries: usize,
    mut rollout: impl FnMut(&[usize]) -> Result<Vec<Option<T>>, E>,
) -> Result<Filled<T>, E> {
    let mut filled = Filled { kept: Vec::with_capacity(want), tried: 0, dropped: 0, short: false };
    loop {
        let room = want.saturating_sub(filled.kept.len()).min(max_tries.saturating_sub(filled.tried));
        let batch: Vec<usize> = std::iter::from_fn(|| queue.pop_front()).take(room).collect();
        if batch.is_empty() {
            break;
        }
        filled.tried += batch.len();
        for group in rollout(&batch)? {
            match group {
                Some(group) => filled.kept.push(group),
                None => filled.dropped += 1,
            }
        }
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
    fn filling_in_batches_tries_and_keeps_what_filling_one_by_one_does() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for _ in 0..200 {
            let keep: Vec<bool> = (0..30).map(|_| rng.random_bool(0.4)).collect();
            let (want, tries, len) = (rng.random_range(1..8), rng.random_range(1..40), rng.random_range(0..30));
            let decide = |i: usize| Ok::<_, ()>(keep[i].then_some(i));
            let mut one = (0..len).collect::<VecDeque<usize>>();
            let mut many = one.clone();
            let single = fill_step(&mut one, want, tries, decide).expect("fills");
            let mut asked = Vec::new();
            let batched = fill_step_batched(&mut many, want, tries, |batch| {
                asked.push(batch.len());
                batch.iter().map(|&i| decide(i)).collect()
            })
            .expect("fills");
            assert_eq!(single, batched);
            assert_eq!(one, many);
            assert!(asked.iter().all(|&n| n <= want), "never more than the step needs");
        }
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
