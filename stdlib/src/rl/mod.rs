//! Reinforcement learning pieces: group advantages, the policy loss, overlong shaping.

pub mod advantage;
pub mod buffer;
pub mod chain;
pub mod dynamic;
pub mod group;
pub mod loss;
pub mod remote;
pub mod rollout;
pub mod shaping;
pub mod source;
