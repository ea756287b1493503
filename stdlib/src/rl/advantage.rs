//! Group-relative advantages (GRPO): each response's reward against its group's mean,
//! scaled by the group's standard deviation (or not, as Dr. GRPO; or by the batch's), the
//! same for every token of the response. Unscorable responses are left out of the
//! statistics and get no advantage.

use serde::{Deserialize, Serialize};

/// How rewards are scaled into advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StdScaling {
    /// Divide by the group's standard deviation (GRPO, DAPO).
    #[default]
    Group,
    /// Divide by the standard deviation of every reward in the batch.
    Batch,
    /// Do not divide (Dr. GRPO).
    None,
}

/// Added to the standard deviation before dividing.
pub const STD_EPS: f32 = 1e-6;

/// Mean and population standard deviation of the scorable rewards.
pub fn mean_std(rewards: &[Option<f32>]) -> Option<(f32, f32)> {
    let values: Vec<f32> = rewards.iter().flatten().copied().collect();
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f32;
    let mean = values.iter().sum::<f32>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
    Some((mean, var.sqrt()))
}

/// Advantages of one group: `(r - mean) / (std + eps)` over the scorable rewards; `None`
/// for unscorable responses. `batch_std` is used with [`StdScaling::Batch`].
pub fn group_advantages(rewards: &[Option<f32>], scaling: StdScaling, batch_std: f32) -> Vec<Option<f32>> {
    let Some((mean, std)) = mean_std(rewards) else { return vec![None; rewards.len()] };
    let scale = match scaling {
        StdScaling::Group => std + STD_EPS,
        StdScaling::Batch => batch_std + STD_EPS,
        StdScaling::None => 1.0,
    };
    rewards.iter().map(|r| r.map(|r| (r - mean) / scale)).collect()
}

/// Whether a group teaches nothing: all scorable rewards equal (or none scorable).
pub fn zero_variance(rewards: &[Option<f32>]) -> bool {
    let values: Vec<f32> = rewards.iter().flatten().copied().collect();
    values.windows(2).all(|w| (w[0] - w[1]).abs() < 1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[Option<f32>], b: &[Option<f32>]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            match (x, y) {
                (Some(x), Some(y)) => assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}"),
                (None, None) => {}
                _ => panic!("{a:?} vs {b:?}"),
            }
        }
    }

    #[test]
    fn advantages_of_a_known_group() {
        // Rewards 1, 0, 0, 1: mean 0.5, std 0.5 -> +1, -1, -1, +1 (up to eps).
        let rewards = [Some(1.0), Some(0.0), Some(0.0), Some(1.0)];
        let s = 0.5 / (0.5 + STD_EPS);
        close(&group_advantages(&rewards, StdScaling::Group, 0.0), &[Some(s), Some(-s), Some(-s), Some(s)]);
        // Rewards 1, 0, 0, 0: mean 0.25, std sqrt(3)/4.
        let rewards = [Some(1.0), Some(0.0), Some(0.0), Some(0.0)];
        let std = 3f32.sqrt() / 4.0;
        let hi = 0.75 / (std + STD_EPS);
        let lo = -0.25 / (std + STD_EPS);
        close(&group_advantages(&rewards, StdScaling::Group, 0.0), &[Some(hi), Some(lo), Some(lo), Some(lo)]);
        // Dr. GRPO: no scaling.
        close(&group_advantages(&rewards, StdScaling::None, 0.0), &[Some(0.75), Some(-0.25), Some(-0.25), Some(-0.25)]);
        // Batch std.
        close(
            &group_advantages(&rewards, StdScaling::Batch, 0.5),
            &[Some(0.75 / 0.500001), Some(-0.25 / 0.500001), Some(-0.25 / 0.500001), Some(-0.25 / 0.500001)],
        );
    }

    #[test]
    fn all_equal_groups_have_zero_advantage_and_zero_variance() {
        let rewards = [Some(1.0), Some(1.0), Some(1.0)];
        close(&group_advantages(&rewards, StdScaling::Group, 0.0), &[Some(0.0), Some(0.0), Some(0.0)]);
        assert!(zero_variance(&rewards));
        assert!(!zero_variance(&[Some(1.0), Some(0.0)]));
    }

    #[test]
    fn unscorable_samples_are_left_out_of_the_statistics() {
        // Scorable 1 and 0 only: mean 0.5, std 0.5; the unscorable one gets nothing.
        let rewards = [Some(1.0), None, Some(0.0)];
        let s = 0.5 / (0.5 + STD_EPS);
        close(&group_advantages(&rewards, StdScaling::Group, 0.0), &[Some(s), None, Some(-s)]);
        assert!(zero_variance(&[Some(1.0), None, Some(1.0)]));
        assert_eq!(group_advantages(&[None, None], StdScaling::Group, 0.0), vec![None, None]);
    }
}
