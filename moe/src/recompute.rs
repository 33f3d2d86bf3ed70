//! Activation recomputation (`train.activation_checkpointing`): a piece of the model runs
//! as ONE node of burn's autodiff graph that keeps only its inputs; its backward runs the
//! piece's forward again with autodiff (a fresh graph of its own: the module's parameters
//! as new leaves, the saved inputs as a new leaf), back-propagates the node's output
//! gradient through it, hands the input gradient to the outer graph and adds each
//! parameter's gradient to that parameter's node in the outer graph.
//!
//! Why not burn's own checkpointing (`autodiff_with_gradient_checkpointing`, balanced
//! strategy): it decides per operation (it recomputes memory-bound ops and keeps
//! compute-bound ones), knows nothing of the model's pieces, and moves the device off the
//! `Autodiff<Flex>` backend that Switchyard's fused kernels and distributed nodes are written
//! for, so the arithmetic (and the result) would change. Here the forward that is
//! recomputed is the same code on the same kernels, so loss and gradients are the same
//! bits with and without recomputation (`moe/tests/recompute.rs`).
//!
//! # Bits
//!
//! The loss and the auxiliary losses are the same bits with and without recomputation (the
//! forward of a piece is the tracked forward's code on the autodiff backend, untracked).
//! `selective`'s gradients are the same bits too (`moe/tests/recompute.rs`, every router
//! family). `full`'s gradients are the same bits unless a block holds a node whose
//! gradient is the sum of three or more contributions (the router's logits with the z-loss
//! and the load-balancing loss on) or a parameter is shared between blocks (the recurrent
//! router's GRU): burn adds contributions in the order of its backward tape, sorted by the
//! depth of each node from the graph's leaves, and a block's own graph starts at depth 0
//! where the whole model's graph has it deep; a shared parameter's gradient is summed per
//! block before it is added to the other blocks'. Measured: at most 3.4e-7 relative per
//! tensor, every router family.
//!
//! Everything a piece does in its forward runs again in the backward: the collectives of
//! an expert-parallel dispatcher, of ring attention or of the world reducer included.
//! Every rank recomputes in the order its backward visits the nodes, which is the same on
//! every rank (the graphs are built in the same order), as for the distributed nodes.
//!
//! Shape legend: inputs and outputs of a piece travel flattened, `[n]`; the caller
//! reshapes.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// `train.activation_checkpointing`: what the backward recomputes instead of keeping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationCheckpointing {
    /// Every activation of the forward is kept for the backward.
    #[default]
    None,
    /// Per transformer block, only its input (and the router state it receives) is kept;
    /// the whole block (attention and feed-forward / MoE) is recomputed in the backward.
    Full,
    /// Per block, the attention sub-block (its norm, q/k/v projections, rotary embedding,
    /// attention core and output projection) is recomputed; the feed-forward / MoE
    /// activations are kept, so no expert computation and no expert all-to-all is repeated.
    Selective,
}

/// The function a piece computes: `(module, inputs) -> (outputs, extra)`, where `extra` is
/// what the forward reports besides tensors (routing statistics; dropped on recompute).
pub type PieceFn<M, E> = dyn Fn(&M, Vec<Tensor<1>>) -> (Vec<Tensor<1>>, E) + Send + Sync;

/// Runs `piece(module, inputs)`; on an autodiff device as one recomputed node (see the
/// module docs). `inputs` and the outputs are flattened tensors; the outputs come back in
/// `piece`'s order. Off autodiff (evaluation, generation) it is simply `piece`.
///
/// Panics on an autodiff backend other than flex (config validation refuses
/// recomputation elsewhere).
pub fn checkpointed<M, E>(
    module: &M,
    inputs: Vec<Tensor<1>>,
    piece: Arc<PieceFn<M, E>>,
) -> (Vec<Tensor<1>>, E)
where
    M: Module + Clone + Send + Sync + fmt::Debug + 'static,
    E: 'static,
{
    let Some(first) = inputs.first() else {
        return piece(module, inputs);
    };
    if !first.device().is_autodiff() {
        return piece(module, inputs);
    }
    let in_sizes: Vec<usize> = inputs.iter().map(|t| t.dims()[0]).collect();
    let input = Tensor::cat(inputs, 0)
        .try_into_primitive::<Autodiff<Flex>>()
        .unwrap_or_else(|e| {
            panic!("activation recomputation runs on the flex backend only, not {e:?}")
        });
    let (value, guard) = input.into_parts();
    let saved = Tensor::<1>::from_primitive::<Flex>(value);
    // The forward on the autodiff backend, untracked (parameters and input without
    // gradients: nothing is recorded or kept): the same operations as a tracked forward,
    // hence the same bits (the plain flex backend rounds some operations differently).
    let untracked = module.clone().no_grad();
    let (outputs, extra) = piece(
        &untracked,
        split(Tensor::from_inner(saved.clone()), &in_sizes),
    );
    let out_sizes: Vec<usize> = outputs.iter().map(|t| t.dims()[0]).collect();
    let out = Tensor::cat(outputs, 0)
        .inner()
        .try_into_primitive::<Flex>()
        .expect("a piece's outputs stay on its inputs' backend");
    let inner = module.valid();
    let prepared = <RecomputeNode<M, E> as Backward<Flex, 1>>::prepare::<NoCheckpointing>(
        RecomputeNode(std::marker::PhantomData),
        [guard],
    );
    let tracked = match prepared.compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                inner,
                input: saved,
                in_sizes,
                params: param_nodes(module),
                piece,
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    let out = Tensor::<1>::from_primitive::<Autodiff<Flex>>(tracked);
    (split(out, &out_sizes), extra)
}

/// `t` [sum of sizes] -> its consecutive pieces.
fn split(t: Tensor<1>, sizes: &[usize]) -> Vec<Tensor<1>> {
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            let piece = t.clone().slice(at..at + n);
            at += n;
            piece
        })
        .collect()
}

/// Each trainable parameter's node in the outer graph, by parameter id.
fn param_nodes<M: Module>(module: &M) -> HashMap<ParamId, NodeId> {
    struct Nodes(HashMap<ParamId, NodeId>);
    impl ModuleVisitor for Nodes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_require_grad() {
                return;
            }
            if let Ok(t) = param.val().try_into_primitive::<Autodiff<Flex>>() {
                self.0.insert(param.id, t.id());
            }
        }
    }
    let mut nodes = Nodes(HashMap::new());
    module.visit(&mut nodes);
    nodes.0
}

/// What the backward needs: the module without autodiff, the saved inputs (inner) and
/// where each parameter's gradient goes.
struct Saved<M, E> {
    inner: M,
    input: Tensor<1>,
    in_sizes: Vec<usize>,
    params: HashMap<ParamId, NodeId>,
    piece: Arc<PieceFn<M, E>>,
}

impl<M: Clone, E> Clone for Saved<M, E> {
    fn clone(&self) -> Self {
        Saved {
            inner: self.inner.clone(),
            input: self.input.clone(),
            in_sizes: self.in_sizes.clone(),
            params: self.params.clone(),
            piece: self.piece.clone(),
        }
    }
}

impl<M, E> fmt::Debug for Saved<M, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Saved")
            .field("in_sizes", &self.in_sizes)
            .finish_non_exhaustive()
    }
}

struct RecomputeNode<M, E>(std::marker::PhantomData<fn() -> (M, E)>);

impl<M, E> fmt::Debug for RecomputeNode<M, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecomputeNode")
    }
}

impl<M, E> Backward<Flex, 1> for RecomputeNode<M, E>
where
    M: Module + Clone + Send + Sync + fmt::Debug + 'static,
    E: 'static,
{
    type State = Saved<M, E>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad_out = Tensor::<1>::from_primitive::<Flex>(grads.consume::<Flex>(&ops.node));
        let Saved {
            inner,
            input,
            in_sizes,
            params,
            piece,
        } = ops.state;
        // A graph of its own: fresh parameter leaves (same ids) and a fresh input leaf.
        let fresh = inner.train();
        let input = Tensor::<1>::from_inner(input).require_grad();
        let (outputs, _) = piece(&fresh, split(input.clone(), &in_sizes));
        // d/d(out) of sum(out * g) is g exactly, so the recomputed backward starts from the
        // very gradient the outer graph holds.
        let seed = Tensor::cat(outputs, 0) * Tensor::<1>::from_inner(grad_out);
        let local = seed.sum().backward();
        if let [Some(parent)] = &ops.parents {
            let g = input
                .grad(&local)
                .unwrap_or_else(|| input.clone().inner().zeros_like());
            grads.register::<Flex>(
                parent.id,
                g.try_into_primitive::<Flex>()
                    .expect("the recomputed gradient is on flex"),
            );
        }
        struct Register<'a> {
            local: &'a burn::tensor::Gradients,
            outer: &'a mut Gradients,
            params: &'a HashMap<ParamId, NodeId>,
        }
        impl ModuleVisitor for Register<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let Some(&node) = self.params.get(&param.id) else {
                    return;
                };
                if let Some(g) = param.val().grad(self.local) {
                    let g = g
                        .try_into_primitive::<Flex>()
                        .expect("the recomputed gradient is on flex");
                    self.outer.register::<Flex>(node, g);
                }
            }
        }
        fresh.visit(&mut Register {
            local: &local,
            outer: grads,
            params: &params,
        });
    }
}
