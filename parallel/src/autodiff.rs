//! A differentiable distributed operation on any burn backend.
//!
//! The distributed operations (the row all-to-all, ring attention and TokenRing) are written
//! against burn's backend-generic tensor API plus the `Communicator`: their forward and
//! backward take and return tensors on the inner (non-autodiff) device, whatever backend
//! that is. [`differentiable`] makes such a pair one node of burn's autodiff graph: it
//! finds the autodiff backend the inputs live on (flex, or the CubeCL backend of CUDA and
//! wgpu when this build has it), runs the forward on the inner tensors and
//! records a node whose `Backward` step calls the returned gradient function.
//!
//! The backward runs whether or not an input needs a gradient (`needed` says which do), so
//! a collective inside it is never skipped on one rank only.

use std::fmt;
use std::sync::{Arc, Mutex};

#[cfg(any(feature = "cuda", feature = "wgpu"))]
use burn::backend::Cube;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::Tensor;

use crate::error::{ParallelError, Result};

/// The gradients of the N inputs ([.., DI dims], inner device) from the gradient of the
/// output ([.., DO dims]); `needed[i]`: whether input `i` wants its gradient.
pub type GradFn<const N: usize, const DI: usize, const DO: usize> =
    Box<dyn FnOnce(Tensor<DO>, [bool; N]) -> [Option<Tensor<DI>>; N] + Send>;

/// The names of the autodiff backends [`differentiable`] supports in this build.
pub fn supported_backends() -> &'static [&'static str] {
    &[
        "flex",
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        "cube (cuda, wgpu)",
    ]
}

/// Runs `forward` on the inputs' values and, on an autodiff device, records it as one node
/// whose backward is the returned [`GradFn`]. Off autodiff the gradient function is
/// dropped unused. All inputs must live on the same device. `op` names the operation in
/// errors.
pub fn differentiable<const N: usize, const DI: usize, const DO: usize>(
    op: &str,
    inputs: [Tensor<DI>; N],
    forward: impl FnOnce([Tensor<DI>; N]) -> Result<(Tensor<DO>, GradFn<N, DI, DO>)>,
) -> Result<Tensor<DO>> {
    let Some(first) = inputs.first() else {
        return forward(inputs).map(|(out, _)| out);
    };
    if !first.device().is_autodiff() {
        return forward(inputs).map(|(out, _)| out);
    }
    let device = first.device();
    macro_rules! on {
        ($B:ty) => {
            if first.clone().try_into_primitive::<Autodiff<$B>>().is_ok() {
                let mut values = Vec::with_capacity(N);
                let mut guards = Vec::with_capacity(N);
                for (i, t) in inputs.into_iter().enumerate() {
                    let (value, guard) = t
                        .try_into_primitive::<Autodiff<$B>>()
                        .map_err(|e| mixed(op, i, e))?
                        .into_parts();
                    values.push(Tensor::<DI>::from_primitive::<$B>(value));
                    guards.push(guard);
                }
                let (Ok(values), Ok(guards)) = (values.try_into(), guards.try_into()) else {
                    unreachable!("N inputs give N values and N guards")
                };
                let (out, grad_fn) = forward(values)?;
                let out = out
                    .try_into_primitive::<$B>()
                    .map_err(|e| mixed(op, N, e))?;
                let prepared =
                    <Node<N, DI, DO> as Backward<$B, N>>::prepare::<NoCheckpointing>(Node, guards);
                let tracked = match prepared.compute_bound().stateful() {
                    OpsKind::Tracked(prep) => prep.finish(
                        State {
                            grad_fn: Arc::new(Mutex::new(Some(grad_fn))),
                        },
                        out,
                    ),
                    OpsKind::UnTracked(prep) => prep.finish(out),
                };
                return Ok(Tensor::<DO>::from_primitive::<Autodiff<$B>>(tracked));
            }
        };
    }
    on!(Flex);
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    on!(Cube);
    Err(ParallelError::UnsupportedBackend {
        op: op.to_string(),
        detail: format!(
            "the device {device:?} is none of this build's autodiff backends ({})",
            supported_backends().join(", ")
        ),
    })
}

fn mixed(op: &str, i: usize, e: impl fmt::Debug) -> ParallelError {
    ParallelError::Shape {
        what: op.to_string(),
        detail: format!(
            "tensor {i} is not on the first input's backend ({e:?}); every input must be on \
             one device"
        ),
    }
}

/// The gradient function, taken once by the backward step.
struct State<const N: usize, const DI: usize, const DO: usize> {
    grad_fn: Arc<Mutex<Option<GradFn<N, DI, DO>>>>,
}

impl<const N: usize, const DI: usize, const DO: usize> Clone for State<N, DI, DO> {
    fn clone(&self) -> Self {
        State {
            grad_fn: self.grad_fn.clone(),
        }
    }
}

impl<const N: usize, const DI: usize, const DO: usize> fmt::Debug for State<N, DI, DO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Node<const N: usize, const DI: usize, const DO: usize>;

macro_rules! backward_on {
    ($B:ty) => {
        impl<const N: usize, const DI: usize, const DO: usize> Backward<$B, N> for Node<N, DI, DO> {
            type State = State<N, DI, DO>;

            fn backward(
                self,
                ops: Ops<Self::State, N>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = Tensor::<DO>::from_primitive::<$B>(grads.consume::<$B>(&ops.node));
                let needed = ops.parents.each_ref().map(Option::is_some);
                let grad_fn = ops
                    .state
                    .grad_fn
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .expect("a node's backward runs once");
                for (parent, g) in ops.parents.into_iter().zip(grad_fn(grad, needed)) {
                    if let (Some(parent), Some(g)) = (parent, g) {
                        let g = g.try_into_primitive::<$B>().unwrap_or_else(|e| {
                            panic!("a gradient left the backend of its node: {e:?}")
                        });
                        grads.register::<$B>(parent.id, g);
                    }
                }
            }
        }
    };
}

backward_on!(Flex);
#[cfg(any(feature = "cuda", feature = "wgpu"))]
backward_on!(Cube);
