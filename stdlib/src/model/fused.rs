//! RMSNorm, the rotary embedding and the SwiGLU gate as custom differentiable operations:
//! one autodiff node each, keeping only its inputs, computed by the backend's fused kernel
//! where it has one ([`Kernels`]: one pass, no layout copies) and by the tensor-op formulas
//! here otherwise (bf16, wgpu, CUDA). The decoder layer uses them in every path: plain,
//! recomputed ([`crate::model::recompute`]) and inference. The kernels' forward and backward
//! and the fallbacks' backward are tested against autodiff of the plain formulas; the
//! fallbacks' forward is Burn's own formula, run by the bf16 and wgpu tests.

use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, Tensor, TensorMetadata, TensorPrimitive};
use longrl_backends::{CustomGrad, Kernels, Vjp};

use crate::model::precision::{to_dtype, to_f32};

/// A tensor's primitive.
fn float<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// A primitive as a tensor of rank `D`.
fn from_float<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// A primitive of any rank as `[rows, last]`, with its original shape.
fn as_rows<B: Backend>(p: &FloatTensor<B>) -> (Tensor<B, 2>, Shape) {
    let shape = p.shape();
    let last = shape.iter().last().copied().unwrap_or(1);
    let rows = shape.num_elements() / last.max(1);
    (from_float(B::float_reshape(p.clone(), Shape::new([rows, last]))), shape)
}

/// `[rows, last]` back to `shape`.
fn from_rows<B: Backend>(t: Tensor<B, 2>, shape: Shape) -> FloatTensor<B> {
    B::float_reshape(float(t), shape)
}

// ---------------------------------------------------------------------------------------
// RMSNorm.
// ---------------------------------------------------------------------------------------

/// `x * rsqrt(mean(x^2) + eps) * gamma` over the last axis. Inputs: `x` `[.., d]`, `gamma`
/// `[d]`.
#[derive(Debug, Clone)]
pub struct RmsNormVjp {
    /// Added to the mean of squares.
    pub eps: f64,
}

/// RMSNorm of `x` `[.., d]` with weight `gamma` `[d]` (differentiable in both).
pub fn rms_norm<B: CustomGrad, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    from_float(B::custom(RmsNormVjp { eps }, vec![float(x), float(gamma)]))
}

/// [`rms_norm`] on a plain backend.
pub(crate) fn rms_norm_forward<B: Kernels>(x: &FloatTensor<B>, gamma: &FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    if let Some(y) = B::fused_rms_norm(x, gamma, eps) {
        return y;
    }
    let (x2, shape) = as_rows::<B>(x);
    from_rows(rms_norm_rows(x2, from_float(gamma.clone()), eps).0, shape)
}

/// The gradients of [`rms_norm`]'s `x` and `gamma`, on a plain backend.
pub(crate) fn rms_norm_backward<B: Kernels>(
    x: &FloatTensor<B>,
    gamma: &FloatTensor<B>,
    eps: f64,
    d_y: &FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    if let Some(grads) = B::fused_rms_norm_backward(x, gamma, eps, d_y) {
        return grads;
    }
    rms_norm_backward_ops::<B>(x, gamma, eps, d_y)
}

/// [`rms_norm_backward`] in tensor ops.
fn rms_norm_backward_ops<B: Backend>(
    x: &FloatTensor<B>,
    gamma: &FloatTensor<B>,
    eps: f64,
    d_y: &FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (x2, shape) = as_rows::<B>(x);
    let gamma: Tensor<B, 1> = from_float(gamma.clone());
    let (_, rms) = rms_norm_rows(x2.clone(), gamma.clone(), eps);
    let normed = x2 / rms.clone(); // [n, d]
    let d_y = as_rows::<B>(d_y).0;
    let d_gamma = to_dtype(to_f32(d_y.clone() * normed.clone()).sum_dim(0), gamma.dtype()).squeeze_dim::<1>(0); // [d]
    let d_normed = d_y * gamma.unsqueeze(); // [n, d]
    let projection = (d_normed.clone() * normed.clone()).mean_dim(1); // [n, 1]
    (from_rows((d_normed - normed * projection) / rms, shape), float(d_gamma))
}

/// The tensor-op RMSNorm of rows `[n, d]`, as Burn's module computes it (the mean of
/// squares in f32), and the rows' root mean square `[n, 1]`.
fn rms_norm_rows<B: Backend>(x: Tensor<B, 2>, gamma: Tensor<B, 1>, eps: f64) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let rms = to_dtype((to_f32(x.clone()).square().mean_dim(1) + eps).sqrt(), x.dtype()); // [n, 1]
    ((x / rms.clone()) * gamma.unsqueeze(), rms)
}

impl<B: Kernels> Vjp<B> for RmsNormVjp {
    type Saved = ();

    fn forward(&self, inputs: &[FloatTensor<B>]) -> (FloatTensor<B>, ()) {
        (rms_norm_forward::<B>(&inputs[0], &inputs[1], self.eps), ())
    }

    fn backward(&self, inputs: &[FloatTensor<B>], _: (), output_grad: FloatTensor<B>, wanted: &[bool]) -> Vec<Option<FloatTensor<B>>> {
        let (d_x, d_gamma) = rms_norm_backward::<B>(&inputs[0], &inputs[1], self.eps, &output_grad);
        vec![wanted[0].then_some(d_x), wanted[1].then_some(d_gamma)]
    }
}

// ---------------------------------------------------------------------------------------
// Rotary embedding.
// ---------------------------------------------------------------------------------------

/// The rotary embedding (rotate half) of queries or keys. Inputs: `x` `[b, heads, s, hd]`,
/// `cos`, `sin` `[b, 1, s, hd]` (tables, not differentiated).
#[derive(Debug, Clone)]
pub struct RopeVjp;

/// Rotates `x` `[b, heads, s, hd]` by the tables `cos`, `sin` `[b, 1, s, hd]`.
pub fn rope<B: CustomGrad>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    from_float(B::custom(RopeVjp, vec![float(x), float(cos), float(sin)]))
}

/// [`rope`] on a plain backend.
pub(crate) fn rope_forward<B: Kernels>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    if let Some(y) = B::fused_rope(&float(x.clone()), &float(cos.clone()), &float(sin.clone()), false) {
        return from_float(y);
    }
    crate::model::rope::Rope::apply(x, cos, sin)
}

/// The gradient of [`rope`]'s input: `dy cos + rot^T(dy sin)`, `rot^T([z1, z2]) = [z2, -z1]`.
pub(crate) fn rope_backward<B: Kernels>(d_y: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    if let Some(d_x) = B::fused_rope(&float(d_y.clone()), &float(cos.clone()), &float(sin.clone()), true) {
        return from_float(d_x);
    }
    rope_backward_ops(d_y, cos, sin)
}

/// [`rope_backward`] in tensor ops.
fn rope_backward_ops<B: Backend>(d_y: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, s, d] = d_y.dims();
    let z = d_y.clone() * sin;
    let first = z.clone().slice([0..b, 0..h, 0..s, 0..d / 2]);
    let second = z.slice([0..b, 0..h, 0..s, d / 2..d]);
    d_y * cos + Tensor::cat(vec![second, first.neg()], 3)
}

impl<B: Kernels> Vjp<B> for RopeVjp {
    type Saved = ();

    fn forward(&self, inputs: &[FloatTensor<B>]) -> (FloatTensor<B>, ()) {
        (float(rope_forward::<B>(from_float(inputs[0].clone()), from_float(inputs[1].clone()), from_float(inputs[2].clone()))), ())
    }

    fn backward(&self, inputs: &[FloatTensor<B>], _: (), output_grad: FloatTensor<B>, wanted: &[bool]) -> Vec<Option<FloatTensor<B>>> {
        let d_x = wanted[0]
            .then(|| float(rope_backward::<B>(from_float(output_grad), from_float(inputs[1].clone()), from_float(inputs[2].clone()))));
        vec![d_x, None, None]
    }
}

// ---------------------------------------------------------------------------------------
// SwiGLU gate.
// ---------------------------------------------------------------------------------------

/// `silu(gate) * up`, element-wise. Inputs: `gate`, `up` of one shape.
#[derive(Debug, Clone)]
pub struct SwiGluVjp;

/// The MLP's gate `silu(gate) * up` (differentiable in both).
pub fn swiglu<B: CustomGrad, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    from_float(B::custom(SwiGluVjp, vec![float(gate), float(up)]))
}

/// [`swiglu`] on a plain backend.
pub(crate) fn swiglu_forward<B: Kernels, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    match B::fused_swiglu(&float(gate.clone()), &float(up.clone())) {
        Some(y) => from_float(y),
        None => silu(gate) * up,
    }
}

/// The gradients of [`swiglu`]'s `gate` and `up`: `d_gate = dy up s (1 + g (1 - s))` with
/// `s = sigmoid(g)`, and `d_up = dy silu(g)`.
pub(crate) fn swiglu_backward<B: Kernels, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
    d_y: Tensor<B, D>,
) -> (Tensor<B, D>, Tensor<B, D>) {
    if let Some((d_gate, d_up)) = B::fused_swiglu_backward(&float(gate.clone()), &float(up.clone()), &float(d_y.clone())) {
        return (from_float(d_gate), from_float(d_up));
    }
    swiglu_backward_ops(gate, up, d_y)
}

/// [`swiglu_backward`] in tensor ops.
fn swiglu_backward_ops<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
    d_y: Tensor<B, D>,
) -> (Tensor<B, D>, Tensor<B, D>) {
    let sig = sigmoid(gate.clone());
    let d_up = d_y.clone() * silu(gate.clone());
    let d_gate = d_y * up * sig.clone() * (gate * (sig.neg() + 1.0) + 1.0);
    (d_gate, d_up)
}

impl<B: Kernels> Vjp<B> for SwiGluVjp {
    type Saved = ();

    fn forward(&self, inputs: &[FloatTensor<B>]) -> (FloatTensor<B>, ()) {
        let ((gate, shape), (up, _)) = (as_rows::<B>(&inputs[0]), as_rows::<B>(&inputs[1]));
        (from_rows(swiglu_forward(gate, up), shape), ())
    }

    fn backward(&self, inputs: &[FloatTensor<B>], _: (), output_grad: FloatTensor<B>, wanted: &[bool]) -> Vec<Option<FloatTensor<B>>> {
        let ((gate, shape), (up, _), (d_y, _)) = (as_rows::<B>(&inputs[0]), as_rows::<B>(&inputs[1]), as_rows::<B>(&output_grad));
        let (d_gate, d_up) = swiglu_backward(gate, up, d_y);
        vec![wanted[0].then(|| from_rows(d_gate, shape.clone())), wanted[1].then(|| from_rows(d_up, shape))]
    }
}

#[cfg(test)]
mod tests {
    //! Each operation's fused CPU kernel and its tensor-op fallback against autodiff of the
    //! plain formulas (Burn's own ops), forward and gradients.

    use super::*;
    use burn::tensor::{Distribution, TensorData};
    use longrl_backends::{Cpu, CpuTrain};

    fn random<B: Backend, const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
        <B as Backend>::seed(&Default::default(), seed);
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().expect("f32 values")
    }

    /// Largest difference relative to the largest magnitude of `expected`.
    fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32, what: &str) {
        assert_eq!(actual.len(), expected.len(), "{what}: lengths");
        let scale = expected.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        let worst = actual.iter().zip(expected).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst / scale < tolerance, "{what}: relative difference {} (scale {scale})", worst / scale);
    }

    /// The gradient of `sum(f(inputs) * weights)` for each input, by autodiff.
    fn gradients<const D: usize, const N: usize>(
        inputs: [Tensor<Cpu, D>; N],
        weights: Tensor<Cpu, D>,
        f: impl Fn(&[Tensor<CpuTrain, D>]) -> Tensor<CpuTrain, D>,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let tracked: Vec<Tensor<CpuTrain, D>> = inputs.iter().map(|t| Tensor::from_inner(t.clone()).require_grad()).collect();
        let y = f(&tracked);
        let out = values(y.clone().inner());
        let grads = (y * Tensor::from_inner(weights)).sum().backward();
        (out, tracked.iter().map(|t| values(t.grad(&grads).expect("a gradient"))).collect())
    }

    #[test]
    fn rms_norm_kernel_and_fallback_match_autodiff() {
        // 450 rows of 40: two blocks of the kernel's backward, whose gamma gradients are summed.
        let (x, gamma, weights) = (random::<Cpu, 3>([3, 150, 40], 1), random::<Cpu, 1>([40], 2), random::<Cpu, 3>([3, 150, 40], 3));
        let eps = 1e-5;
        let plain = |t: &[Tensor<CpuTrain, 3>]| {
            let gamma: Tensor<CpuTrain, 1> = t[1].clone().reshape([40]);
            let rms = (t[0].clone().square().mean_dim(2) + eps).sqrt();
            (t[0].clone() / rms) * gamma.unsqueeze()
        };
        let gamma3 = gamma.clone().reshape([1, 1, 40]);
        let (y_ref, g_ref) = gradients([x.clone(), gamma3.clone()], weights.clone(), plain);
        let fused = |t: &[Tensor<CpuTrain, 3>]| rms_norm(t[0].clone(), t[1].clone().reshape([40]), eps);
        let (y, g) = gradients([x.clone(), gamma3], weights.clone(), fused);
        assert_close(&y, &y_ref, 1e-5, "fused forward");
        assert_close(&g[0], &g_ref[0], 1e-4, "fused d_x");
        assert_close(&g[1], &g_ref[1], 1e-4, "fused d_gamma");
        let d_y = weights.into_primitive().tensor();
        let (d_x, d_gamma) = rms_norm_backward_ops::<Cpu>(&x.into_primitive().tensor(), &gamma.into_primitive().tensor(), eps, &d_y);
        assert_close(&values(from_float::<Cpu, 3>(d_x)), &g_ref[0], 1e-4, "tensor-op d_x");
        assert_close(&values(from_float::<Cpu, 1>(d_gamma)), &g_ref[1], 1e-4, "tensor-op d_gamma");
    }

    #[test]
    fn rope_kernel_and_fallback_match_autodiff_on_strided_heads() {
        // 26 tokens: the kernel's tasks of 16 tokens straddle the two batch rows.
        let (b, s, heads, hd) = (2, 13, 3, 16);
        let rope_tables = crate::model::rope::Rope::new(hd, 10_000.0, crate::model::config::RopeScaling::None);
        let positions: Vec<f32> = (0..b * s).map(|i| (i % s + 3 * (i / s)) as f32).collect();
        let (cos, sin) = rope_tables.tables::<Cpu>(Tensor::from_data(TensorData::new(positions, [b, s]), &Default::default()));
        // Heads split from a projection: a `[b, heads, s, hd]` view of `[b, s, heads, hd]`.
        let x = random::<Cpu, 4>([b, s, heads, hd], 4).swap_dims(1, 2);
        let weights = random::<Cpu, 4>([b, heads, s, hd], 5);
        let (c, sn) = (cos.clone(), sin.clone());
        let plain = move |t: &[Tensor<CpuTrain, 4>]| {
            crate::model::rope::Rope::apply(t[0].clone(), Tensor::from_inner(c.clone()), Tensor::from_inner(sn.clone()))
        };
        let (y_ref, g_ref) = gradients([x.clone()], weights.clone(), plain);
        let (c, sn) = (cos.clone(), sin.clone());
        let fused = move |t: &[Tensor<CpuTrain, 4>]| rope(t[0].clone(), Tensor::from_inner(c.clone()), Tensor::from_inner(sn.clone()));
        let (y, g) = gradients([x], weights.clone(), fused);
        assert_close(&y, &y_ref, 1e-6, "fused forward");
        assert_close(&g[0], &g_ref[0], 1e-6, "fused d_x");
        assert_close(&values(rope_backward_ops(weights, cos.clone(), sin.clone())), &g_ref[0], 1e-6, "tensor-op d_x");
        // Tables of one batch row, broadcast over both.
        let (cos1, sin1) = (cos.slice([0..1, 0..1, 0..s, 0..hd]), sin.slice([0..1, 0..1, 0..s, 0..hd]));
        let x = random::<Cpu, 4>([b, heads, s, hd], 9);
        let expected = values(crate::model::rope::Rope::apply(x.clone(), cos1.clone(), sin1.clone()));
        assert_close(&values(rope_forward(x, cos1, sin1)), &expected, 1e-6, "broadcast tables");
    }

    #[test]
    fn swiglu_kernel_and_fallback_match_autodiff() {
        // Two of the kernel's blocks of 16,384 elements.
        let (gate, up, weights) = (random::<Cpu, 2>([6, 3000], 6), random::<Cpu, 2>([6, 3000], 7), random::<Cpu, 2>([6, 3000], 8));
        let plain = |t: &[Tensor<CpuTrain, 2>]| silu(t[0].clone()) * t[1].clone();
        let (y_ref, g_ref) = gradients([gate.clone(), up.clone()], weights.clone(), plain);
        let fused = |t: &[Tensor<CpuTrain, 2>]| swiglu(t[0].clone(), t[1].clone());
        let (y, g) = gradients([gate.clone(), up.clone()], weights.clone(), fused);
        assert_close(&y, &y_ref, 1e-6, "fused forward");
        assert_close(&g[0], &g_ref[0], 1e-5, "fused d_gate");
        assert_close(&g[1], &g_ref[1], 1e-5, "fused d_up");
        let (d_gate, d_up) = swiglu_backward_ops(gate, up, weights);
        assert_close(&values(d_gate), &g_ref[0], 1e-5, "tensor-op d_gate");
        assert_close(&values(d_up), &g_ref[1], 1e-5, "tensor-op d_up");
    }
}
