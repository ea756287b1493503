//! Differentiable operations with hand-written gradients. A [`Vjp`] is a function of some
//! float tensors, evaluated on a plain backend, with its vector-Jacobian product written out;
//! [`CustomGrad::custom`] applies it to tensors of any backend. On a plain backend that is
//! just the forward. On `Autodiff<B>` it records one graph node that keeps only the inputs
//! (and whatever the function chooses to save), so a memory-hungry computation (attention
//! over long inputs, a whole decoder layer, the LM head over a long response) costs no more
//! activation memory than its inputs: its backward recomputes what it needs.
//!
//! Burn's autodiff cannot run a nested `.backward()` inside a backward step (the graph lock
//! is held), so the gradients are written by hand over the inner backend's tensor ops, and
//! each `Vjp` is tested against autodiff of the plain computation.

use std::fmt::Debug;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;

use crate::kernels::Kernels;

/// A function of float tensors with its vector-Jacobian product, on backend `B`.
pub trait Vjp<B: Backend>: Clone + Send + Sync + Debug + 'static {
    /// What the forward keeps for the backward besides the inputs (e.g. a row's
    /// log-sum-exp); `()` to recompute everything.
    type Saved: Clone + Send + Debug + 'static;

    /// The output, and what to save.
    fn forward(&self, inputs: &[FloatTensor<B>]) -> (FloatTensor<B>, Self::Saved);

    /// The gradient of each input whose `wanted` entry is true (`None` for the others),
    /// given the gradient of the output.
    fn backward(
        &self,
        inputs: &[FloatTensor<B>],
        saved: Self::Saved,
        output_grad: FloatTensor<B>,
        wanted: &[bool],
    ) -> Vec<Option<FloatTensor<B>>>;
}

/// A backend that can apply [`Vjp`] functions.
pub trait CustomGrad: Kernels {
    /// The backend the functions compute on: the backend itself, or the inner one under
    /// autodiff.
    type Base: Kernels;

    /// Applies `f` to `inputs` (at most [`MAX_INPUTS`]); differentiable under autodiff.
    fn custom<F: Vjp<Self::Base>>(f: F, inputs: Vec<FloatTensor<Self>>) -> FloatTensor<Self>;
}

/// The most inputs a custom function takes.
pub const MAX_INPUTS: usize = 24;

/// A training backend: autodiff over a backend, both able to apply custom functions.
pub trait TrainBackend: AutodiffBackend<InnerBackend: CustomGrad> + CustomGrad {}

impl<T: AutodiffBackend<InnerBackend: CustomGrad> + CustomGrad> TrainBackend for T {}

/// Implements [`CustomGrad`] for a plain backend: the forward only.
macro_rules! plain_custom_grad {
    ($backend:ty) => {
        impl CustomGrad for $backend {
            type Base = $backend;

            fn custom<F: Vjp<Self::Base>>(f: F, inputs: Vec<FloatTensor<Self>>) -> FloatTensor<Self> {
                f.forward(&inputs).0
            }
        }
    };
}

plain_custom_grad!(crate::Cpu);
#[cfg(feature = "wgpu")]
plain_custom_grad!(crate::Wgpu);
#[cfg(feature = "cuda")]
plain_custom_grad!(crate::Cuda);

/// The graph node of a custom function.
#[derive(Debug)]
struct CustomNode<F>(F);

/// What the node keeps for its backward: the inputs and the function's saved tensors.
#[derive(Debug, Clone)]
struct NodeState<B: Backend, S> {
    inputs: Vec<FloatTensor<B>>,
    saved: S,
}

impl<B: Backend, F: Vjp<B>, const N: usize> Backward<B, N> for CustomNode<F> {
    type State = NodeState<B, F::Saved>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let output_grad = grads.consume::<B>(&ops.node);
        let wanted: Vec<bool> = ops.parents.iter().map(Option::is_some).collect();
        let input_grads = self.0.backward(&ops.state.inputs, ops.state.saved, output_grad, &wanted);
        for (parent, grad) in ops.parents.into_iter().zip(input_grads) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// Records `f` over `N` inputs in the autodiff graph.
fn record<B: Backend, C: CheckpointStrategy, F: Vjp<B>, const N: usize>(
    f: F,
    inputs: [FloatTensor<Autodiff<B, C>>; N],
) -> FloatTensor<Autodiff<B, C>> {
    let nodes = inputs.each_ref().map(|t| t.node.clone());
    let primitives: Vec<FloatTensor<B>> = inputs.into_iter().map(|t| t.primitive).collect();
    match CustomNode(f.clone()).prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (output, saved) = f.forward(&primitives);
            prep.finish(NodeState { inputs: primitives, saved }, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(f.forward(&primitives).0),
    }
}

/// Calls [`record`] with the input count as a constant.
macro_rules! record_by_arity {
    ($f:expr, $inputs:expr, $($n:literal)*) => {
        match $inputs.len() {
            $($n => match <[_; $n]>::try_from($inputs) {
                Ok(array) => record::<B, C, F, $n>($f, array),
                Err(_) => unreachable!("the length was just checked"),
            },)*
            n => panic!("a custom function takes 1 to {MAX_INPUTS} inputs, not {n}"),
        }
    };
}

impl<B: CustomGrad<Base = B>, C: CheckpointStrategy> CustomGrad for Autodiff<B, C> {
    type Base = B;

    fn custom<F: Vjp<B>>(f: F, inputs: Vec<FloatTensor<Self>>) -> FloatTensor<Self> {
        record_by_arity!(f, inputs, 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuTrain;
    use burn::tensor::{Tensor, TensorData, TensorPrimitive};

    /// f(a, b) = a * b + a, elementwise, with its hand-written product rule.
    #[derive(Debug, Clone)]
    struct MulAdd;

    fn wrap<B: Backend>(p: FloatTensor<B>) -> Tensor<B, 1> {
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }

    impl<B: Backend> Vjp<B> for MulAdd {
        type Saved = ();

        fn forward(&self, inputs: &[FloatTensor<B>]) -> (FloatTensor<B>, ()) {
            let (a, b) = (wrap::<B>(inputs[0].clone()), wrap::<B>(inputs[1].clone()));
            ((a.clone() * b + a).into_primitive().tensor(), ())
        }

        fn backward(&self, inputs: &[FloatTensor<B>], _: (), grad: FloatTensor<B>, wanted: &[bool]) -> Vec<Option<FloatTensor<B>>> {
            let (a, b, g) = (wrap::<B>(inputs[0].clone()), wrap::<B>(inputs[1].clone()), wrap::<B>(grad));
            let da = wanted[0].then(|| (g.clone() * (b + 1.0)).into_primitive().tensor());
            let db = wanted[1].then(|| (g * a).into_primitive().tensor());
            vec![da, db]
        }
    }

    #[test]
    fn a_custom_function_gets_its_hand_written_gradients_and_only_wanted_ones() {
        let device = Default::default();
        let a = Tensor::<CpuTrain, 1>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0], [3]), &device).require_grad();
        let b = Tensor::<CpuTrain, 1>::from_data(TensorData::new(vec![4.0f32, 5.0, 6.0], [3]), &device);
        let out = CpuTrain::custom(MulAdd, vec![a.clone().into_primitive().tensor(), b.clone().into_primitive().tensor()]);
        let out: Tensor<CpuTrain, 1> = Tensor::from_primitive(TensorPrimitive::Float(out));
        let values: Vec<f32> = out.clone().into_data().into_vec().expect("f32");
        assert_eq!(values, vec![5.0, 12.0, 21.0]);
        // Downstream ops keep working: d/da sum(2 f) = 2 (b + 1).
        let grads = out.mul_scalar(2.0).sum().backward();
        let da: Vec<f32> = a.grad(&grads).expect("a's gradient").into_data().into_vec().expect("f32");
        assert_eq!(da, vec![10.0, 12.0, 14.0]);
        assert!(b.grad(&grads).is_none(), "b does not require a gradient");
    }
}
