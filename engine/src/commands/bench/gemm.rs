//! `longrl bench gemm`: GFLOP/s of the backend's matrix product on the shapes the model
//! runs (decode rows, a prefill, a training batch, the LM head, a weight gradient), output
//! allocation included as the model pays it; `examples/bench/compare_gemm.py` runs the same
//! shapes through torch's sgemm and prints the ratios.

use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use longrl_backends::TrainBackend;
use serde::Serialize;

/// One product `[m, k] x [k, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GemmShape {
    pub name: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl GemmShape {
    const fn new(name: &'static str, m: usize, k: usize, n: usize) -> Self {
        Self { name, m, k, n }
    }

    fn flops(&self) -> f64 {
        2.0 * (self.m * self.k * self.n) as f64
    }
}

/// The SmolLM2-135M shape's products (hidden 576, MLP 1536, vocabulary 49,152), from one
/// decoded row to a training batch, and a square product for the machine's peak.
pub const SHAPES: [GemmShape; 9] = [
    GemmShape::new("decode, 1 row (MLP up)", 1, 576, 1536),
    GemmShape::new("decode, group of 8 (MLP up)", 8, 576, 1536),
    GemmShape::new("decode, 64 rows (MLP up)", 64, 576, 1536),
    GemmShape::new("decode, 64 rows (MLP down)", 64, 1536, 576),
    GemmShape::new("decode, 64 rows (LM head)", 64, 576, 49_152),
    GemmShape::new("prefill 512 (MLP up)", 512, 576, 1536),
    GemmShape::new("train 4 x 256 (MLP down)", 1024, 1536, 576),
    GemmShape::new("weight gradient (x^T dy)", 576, 1024, 1536),
    GemmShape::new("square 1024", 1024, 1024, 1024),
];

/// The measurement: every shape of [`SHAPES`], each for at least `seconds`.
#[derive(Debug, Clone)]
pub struct GemmBench {
    pub seconds: f64,
}

/// One shape's figure (`--json` prints a list of these).
#[derive(Debug, Clone, Serialize)]
pub struct GemmFigure {
    #[serde(flatten)]
    pub shape: GemmShape,
    pub gflops: f64,
    /// Products timed.
    pub runs: usize,
}

impl GemmBench {
    fn measure<B: TrainBackend>(&self, device: B::Device) -> Vec<GemmFigure> {
        SHAPES.iter().map(|shape| self.measure_shape::<B::InnerBackend>(*shape, &device)).collect()
    }

    /// The best of several timed batches of products (the least disturbed by the rest of
    /// the machine), each batch at least a tenth of the time budget.
    fn measure_shape<B: burn::tensor::backend::Backend>(&self, shape: GemmShape, device: &B::Device) -> GemmFigure {
        let a = Tensor::<B, 2>::random([shape.m, shape.k], Distribution::Default, device);
        let b = Tensor::<B, 2>::random([shape.k, shape.n], Distribution::Default, device);
        let product = || {
            let out = a.clone().matmul(b.clone());
            // Waits for the device (and keeps the product from being skipped).
            let _ = out.slice([0..1, 0..1]).into_data();
        };
        product(); // warm-up: thread pools, packing buffers
        let (mut best, mut runs, started) = (f64::INFINITY, 0, Instant::now());
        while started.elapsed().as_secs_f64() < self.seconds {
            let (batch_started, mut count) = (Instant::now(), 0);
            while count == 0 || batch_started.elapsed().as_secs_f64() < self.seconds / 10.0 {
                product();
                count += 1;
            }
            best = best.min(batch_started.elapsed().as_secs_f64() / count as f64);
            runs += count;
        }
        GemmFigure { shape, gflops: shape.flops() / best / 1e9, runs }
    }
}

impl longrl_backends::BackendTask for GemmBench {
    type Output = Vec<GemmFigure>;

    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        self.measure::<B>(device)
    }
}
