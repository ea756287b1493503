//! Backends: the only crate that names concrete Burn backends. It maps
//! `--backend cpu|wgpu|cuda` and `--device N` to a device, probes that the device exists
//! before anything uses it, and runs generic code on the chosen backend through
//! [`BackendTask`].

use std::fmt;
use std::str::FromStr;

pub mod cpu;
pub mod custom;
pub mod inplace;
pub mod kernels;

use burn::backend::Autodiff;

pub use custom::{CustomGrad, TrainBackend, Vjp};
pub use kernels::{AdamWStep, AdamWTensors, AttentionCall, AttentionCallGrads, Kernels};

/// The CPU backend (burn-flex: pure Rust, `gemm` matmul).
pub type Cpu = burn::backend::Flex;
/// The CPU backend with autodiff, for training.
pub type CpuTrain = Autodiff<Cpu>;
/// The CPU backend's device.
pub type CpuDevice = burn::backend::flex::FlexDevice;

#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;

/// Which family of backend a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BackendKind {
    #[default]
    Cpu,
    Wgpu,
    Cuda,
}

impl BackendKind {
    /// Every kind, compiled in or not.
    pub const ALL: [BackendKind; 3] = [Self::Cpu, Self::Wgpu, Self::Cuda];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }

    /// Whether this binary was built with the backend's cargo feature.
    pub fn compiled_in(self) -> bool {
        match self {
            Self::Cpu => true,
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Cuda => cfg!(feature = "cuda"),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(Self::Cpu),
            "wgpu" | "vulkan" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(BackendError::Unknown(other.to_string())),
        }
    }
}

/// A backend kind and a device index within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DeviceSpec {
    pub kind: BackendKind,
    pub index: usize,
}

impl DeviceSpec {
    pub fn new(kind: BackendKind, index: usize) -> Self {
        Self { kind, index }
    }

    pub fn cpu() -> Self {
        Self::default()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            BackendKind::Cpu => f.write_str("cpu"),
            kind => write!(f, "{kind}:{}", self.index),
        }
    }
}

/// Why a backend cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("unknown backend `{0}` (use cpu, wgpu or cuda)")]
    Unknown(String),
    #[error(
        "backend `{kind}` was not compiled into this binary; rebuild with `--features {kind}` (cargo build --release --features {kind})"
    )]
    NotCompiled { kind: BackendKind },
    #[error("no {kind} device {index} is available: {reason}")]
    NoDevice { kind: BackendKind, index: usize, reason: String },
}

/// Generic work to run on whichever backend the user chose. `run` is instantiated once
/// per compiled-in backend (its autodiff form, able to apply custom functions).
pub trait BackendTask {
    type Output;
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output;
}

/// Probes the device, then runs `task` on it.
pub fn dispatch<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output, BackendError> {
    match spec.kind {
        BackendKind::Cpu => Ok(task.run::<CpuTrain>(CpuDevice::default())),
        BackendKind::Wgpu => dispatch_wgpu(spec, task),
        BackendKind::Cuda => dispatch_cuda(spec, task),
    }
}

/// Checks that the device of `spec` exists and works, without running anything else.
pub fn probe(spec: DeviceSpec) -> Result<(), BackendError> {
    match spec.kind {
        BackendKind::Cpu => Ok(()),
        BackendKind::Wgpu => probe_wgpu(spec),
        BackendKind::Cuda => probe_cuda(spec),
    }
}

/// The wgpu device of a spec: index 0 is the default adapter, N the Nth discrete GPU.
#[cfg(feature = "wgpu")]
pub fn wgpu_device(spec: DeviceSpec) -> burn::backend::wgpu::WgpuDevice {
    use burn::backend::wgpu::WgpuDevice;
    if spec.index == 0 { WgpuDevice::DefaultDevice } else { WgpuDevice::DiscreteGpu(spec.index) }
}

#[cfg(feature = "wgpu")]
fn probe_wgpu(spec: DeviceSpec) -> Result<(), BackendError> {
    probe_with::<Wgpu>(spec, wgpu_device(spec))
}

#[cfg(not(feature = "wgpu"))]
fn probe_wgpu(_spec: DeviceSpec) -> Result<(), BackendError> {
    Err(BackendError::NotCompiled { kind: BackendKind::Wgpu })
}

#[cfg(feature = "wgpu")]
fn dispatch_wgpu<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output, BackendError> {
    probe_wgpu(spec)?;
    Ok(task.run::<Autodiff<Wgpu>>(wgpu_device(spec)))
}

#[cfg(not(feature = "wgpu"))]
fn dispatch_wgpu<T: BackendTask>(_spec: DeviceSpec, _task: T) -> Result<T::Output, BackendError> {
    Err(BackendError::NotCompiled { kind: BackendKind::Wgpu })
}

/// The CUDA device of a spec.
#[cfg(feature = "cuda")]
pub fn cuda_device(spec: DeviceSpec) -> burn::backend::cuda::CudaDevice {
    burn::backend::cuda::CudaDevice::new(spec.index)
}

#[cfg(feature = "cuda")]
fn probe_cuda(spec: DeviceSpec) -> Result<(), BackendError> {
    probe_with::<Cuda>(spec, cuda_device(spec))
}

#[cfg(not(feature = "cuda"))]
fn probe_cuda(_spec: DeviceSpec) -> Result<(), BackendError> {
    Err(BackendError::NotCompiled { kind: BackendKind::Cuda })
}

#[cfg(feature = "cuda")]
fn dispatch_cuda<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output, BackendError> {
    probe_cuda(spec)?;
    Ok(task.run::<Autodiff<Cuda>>(cuda_device(spec)))
}

#[cfg(not(feature = "cuda"))]
fn dispatch_cuda<T: BackendTask>(_spec: DeviceSpec, _task: T) -> Result<T::Output, BackendError> {
    Err(BackendError::NotCompiled { kind: BackendKind::Cuda })
}

/// Burn's GPU devices are created lazily and panic on first use when the driver or adapter
/// is missing. Run one small computation with the panic caught (and its message kept quiet)
/// and turn a panic into an error naming the device. The device starts on a thread of its
/// own, so the panic caught here is often only a closed channel: the reason given is the
/// first panic seen on any thread meanwhile (e.g. cudarc's "Unable to dynamically load the
/// nvrtc shared library").
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn probe_with<B: burn::tensor::backend::Backend>(spec: DeviceSpec, device: B::Device) -> Result<(), BackendError> {
    use burn::tensor::Tensor;
    use std::sync::{Arc, Mutex};
    let panics: Arc<Mutex<Vec<String>>> = Arc::default();
    let previous = std::panic::take_hook();
    let seen = Arc::clone(&panics);
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut seen) = seen.lock() {
            seen.push(panic_message(info.payload()));
        }
    }));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let x = Tensor::<B, 1>::from_floats([1.0, 2.0, 3.0], &device);
        let sum: f32 = x.sum().into_scalar().elem();
        sum
    }));
    std::panic::set_hook(previous);
    match outcome {
        Ok(sum) if (sum - 6.0).abs() < 1e-4 => Ok(()),
        Ok(sum) => {
            Err(BackendError::NoDevice { kind: spec.kind, index: spec.index, reason: format!("a test sum gave {sum} instead of 6") })
        }
        Err(payload) => {
            let first = panics.lock().ok().and_then(|seen| seen.first().cloned());
            let reason = first.unwrap_or_else(|| panic_message(&*payload));
            let reason = reason.lines().find(|line| !line.trim().is_empty()).unwrap_or("the device failed to start").trim().to_string();
            Err(BackendError::NoDevice { kind: spec.kind, index: spec.index, reason })
        }
    }
}

/// A panic's message, when it carries one.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "the device failed to start".into())
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
use burn::tensor::ElementConversion as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_parse() {
        assert_eq!("cpu".parse::<BackendKind>(), Ok(BackendKind::Cpu));
        assert_eq!("CUDA".parse::<BackendKind>(), Ok(BackendKind::Cuda));
        let err = "tpu".parse::<BackendKind>().expect_err("unknown");
        assert_eq!(err.to_string(), "unknown backend `tpu` (use cpu, wgpu or cuda)");
    }

    #[test]
    fn a_backend_not_compiled_in_is_a_clear_error() {
        for kind in BackendKind::ALL.into_iter().filter(|k| !k.compiled_in()) {
            let err = probe(DeviceSpec::new(kind, 0)).expect_err("not compiled");
            assert!(err.to_string().contains(&format!("--features {kind}")), "{err}");
        }
    }

    struct Sum;
    impl BackendTask for Sum {
        type Output = f32;
        fn run<B: TrainBackend>(self, device: B::Device) -> f32 {
            use burn::tensor::{ElementConversion, Tensor};
            Tensor::<B, 1>::from_floats([1.0, 2.0, 3.5], &device).sum().into_scalar().elem()
        }
    }

    #[test]
    fn cpu_dispatch_runs_generic_code() {
        assert_eq!(dispatch(DeviceSpec::cpu(), Sum), Ok(6.5));
    }
}
