//! Dynamic sampling (DAPO): a step's batch is filled with groups that teach something. A
//! group whose rewards are all equal (or whose pass rate is outside a chosen band) is dropped
//! and the next prompt of the stream is sampled in its place, until the batch is full or a
//! bound on tries is reached.

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

/// Why a group is dropped, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No response could be scored.
    Unscorable,
    /// Every scorable reward is the same: every advantage is zero.
    ZeroVariance,
    /// The pass rate is outside the accuracy band.
    OutsideBand,
}

/// Whether a group is dropped under dynamic sampling and the accuracy band.
pub fn drop_reason(rewards: &[Option<f32>], pass_rate: f32, dynamic: bool, band: Option<[f32; 2]>) -> Option<DropReason> {
    if rewards.iter().all(Option::is_none) {
        Some(DropReason::Unscorable)
    } else if dynamic && zero_variance(rewards) {
        Some(DropReason::ZeroVariance)
    } else if band.is_some_and(|[a, b]| !(a..=b).contains(&pass_rate)) {
        Some(DropReason::OutsideBand)
    } else {
        None
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
        Ok(drop_reason(&rewards_of(index), 0.5, true, None).is_none().then_some(index))
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
    fn without_dynamic_sampling_every_scorable_group_is_kept() {
        assert_eq!(drop_reason(&[Some(1.0), Some(1.0)], 1.0, false, None), None);
        assert_eq!(drop_reason(&[Some(1.0), Some(1.0)], 1.0, true, None), Some(DropReason::ZeroVariance));
        assert_eq!(drop_reason(&[None, None], 0.0, false, None), Some(DropReason::Unscorable));
        assert_eq!(drop_reason(&[Some(1.0), Some(0.0)], 0.5, true, Some([0.1, 0.4])), Some(DropReason::OutsideBand));
        assert_eq!(drop_reason(&[Some(1.0), Some(0.0)], 0.5, true, Some([0.1, 0.9])), None);
    }
}
