//! `longrl bench ...`: throughput and memory figures, each printed as a table or, with
//! `--json`, as JSON for scripts that compare them with the PyTorch equivalents.

pub mod gemm;
pub mod grpo;
pub mod judge;
pub mod memory;
pub mod model;
pub mod pipeline;
pub mod rollout;

pub use judge::judge_throughput;
pub use model::{Figure, ModelBench, prefill_peak_memory};
pub use pipeline::{PipelineFigures, generate_records, pipeline};
pub use rollout::{RolloutBench, RolloutFigures};

/// This process's peak resident memory in MiB (VmHWM of /proc/self/status): a benchmark
/// that measures memory runs in a child process so that earlier work does not count.
pub fn peak_rss_mib() -> Result<f64, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
    let peak_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or("no VmHWM in /proc/self/status")?;
    Ok(peak_kb / 1024.0)
}
