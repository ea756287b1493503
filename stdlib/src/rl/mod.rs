//! Reinforcement learning pieces: group advantages, the policy loss, overlong shaping.

pub mod advantage;
pub mod dynamic;
pub mod loss;
pub mod shaping;
