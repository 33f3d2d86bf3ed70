//! Activation recomputation (`train.activation_checkpointing`) and the model pieces it
//! works on. A piece (a transformer block, or its attention sub-block) runs as ONE node of
//! burn's autodiff graph ([`piece_node`]) whose backward back-propagates through a graph of
//! the piece's own — the module's parameters as fresh leaves (same ids), the node's inputs
//! as a fresh leaf — hands the input gradient to the outer graph and adds each parameter's
//! gradient to that parameter's node in the outer graph. The piece's graph is either kept
//! from the forward ([`Keep::Activations`]) or, with recomputation, built again in the
//! backward from the kept inputs ([`Keep::Inputs`]: the forward ran untracked and kept
//! nothing else).
//!
//! # Bits
//!
//! Every block is such a node whatever the setting (`Transformer::forward`), so with and
//! without recomputation the backward runs the same graphs and adds every gradient in the
//! same order: loss and gradients are the same bits (`moe/tests/recompute.rs`). This is why
//! `none` runs the blocks as nodes too: burn adds the gradient contributions of a node in
//! the order of its backward tape, sorted by depth from the graph's leaves, and a block's
//! own graph starts at depth 0 where a whole-model graph has it deep, so a recomputed block
//! would otherwise add (for instance) the router logits' three contributions — combine
//! weights, load-balancing loss, z-loss — in another order than the whole-model graph, and
//! a parameter shared by the blocks (the recurrent router's GRU) would be summed per block
//! in one and per use in the other. The untracked forward of `Keep::Inputs` runs the
//! autodiff backend's own operations, so its values are those of a tracked forward (the
//! plain flex backend rounds some operations differently). Other backends than flex run
//! the pieces inline (config validation refuses recomputation there).
//!
//! Why not burn's own checkpointing (`autodiff_with_gradient_checkpointing`, balanced
//! strategy): it decides per operation (it recomputes memory-bound ops and keeps
//! compute-bound ones), knows nothing of the model's pieces, and moves the device off the
//! `Autodiff<Flex>` backend that Switchyard's fused kernels and distributed nodes are written
//! for.
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

/// What a piece's node keeps for its backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The piece's own autodiff graph from the forward (every activation): no recomputation.
    Activations,
    /// Only the inputs: the backward rebuilds the graph by running the piece again.
    Inputs,
}

/// Runs `piece(module, inputs)`; on an autodiff device as one node of the outer graph
/// whose backward back-propagates through the piece's own graph, kept from the forward or
/// rebuilt (`keep`; see the module docs). `inputs` and the outputs are flattened tensors;
/// the outputs come back in `piece`'s order. Off autodiff (evaluation, generation) it is
/// simply `piece`.
///
/// Panics on an autodiff backend other than flex (config validation refuses
/// recomputation elsewhere).
pub fn piece_node<M, E>(
    module: &M,
    inputs: Vec<Tensor<1>>,
    piece: Arc<PieceFn<M, E>>,
    keep: Keep,
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
    let on_flex = first.clone().try_into_primitive::<Autodiff<Flex>>().is_ok();
    if !on_flex {
        // Other backends run the model inline (their autodiff keeps every activation).
        assert!(
            keep == Keep::Activations,
            "activation recomputation runs on the flex backend only"
        );
        return piece(module, inputs);
    }
    let in_sizes: Vec<usize> = inputs.iter().map(|t| t.dims()[0]).collect();
    let input = Tensor::cat(inputs, 0)
        .try_into_primitive::<Autodiff<Flex>>()
        .expect("every input of a piece lives on its first input's backend");
    let (value, guard) = input.into_parts();
    let saved = Tensor::<1>::from_primitive::<Flex>(value);
    let params = param_nodes(module);
    let (outputs, extra, graph) = match keep {
        Keep::Activations => {
            // A graph of its own from the start, as the backward of `Inputs` builds it.
            let fresh = module.valid().train();
            let input = Tensor::<1>::from_inner(saved).require_grad();
            let (outputs, extra) = piece(&fresh, split(input.clone(), &in_sizes));
            let values: Vec<Tensor<1>> = outputs.iter().map(|t| t.clone().inner()).collect();
            let graph = PieceGraph::Kept {
                module: fresh,
                input,
                outputs,
            };
            (values, extra, graph)
        }
        Keep::Inputs => {
            // The forward on the autodiff backend, untracked (parameters and input without
            // gradients: nothing is recorded or kept): the same operations as a tracked
            // forward, hence the same bits (the plain flex backend rounds some operations
            // differently).
            let untracked = module.clone().no_grad();
            let (outputs, extra) = piece(
                &untracked,
                split(Tensor::from_inner(saved.clone()), &in_sizes),
            );
            let values: Vec<Tensor<1>> = outputs.into_iter().map(Tensor::inner).collect();
            let graph = PieceGraph::Rebuild {
                inner: module.valid(),
                input: saved,
                in_sizes,
            };
            (values, extra, graph)
        }
    };
    let out_sizes: Vec<usize> = outputs.iter().map(|t| t.dims()[0]).collect();
    let out = Tensor::cat(outputs, 0)
        .try_into_primitive::<Flex>()
        .expect("a piece's outputs stay on its inputs' backend");
    let prepared = <PieceNode<M, E> as Backward<Flex, 1>>::prepare::<NoCheckpointing>(
        PieceNode(std::marker::PhantomData),
        [guard],
    );
    let tracked = match prepared.compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                graph,
                params,
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

/// A piece's own graph: kept from the forward, or what rebuilding it takes (the module
/// without autodiff and the inputs' values).
#[derive(Clone)]
enum PieceGraph<M> {
    Kept {
        /// The module whose fresh parameter leaves the graph hangs from.
        module: M,
        input: Tensor<1>,
        outputs: Vec<Tensor<1>>,
    },
    Rebuild {
        inner: M,
        input: Tensor<1>,
        in_sizes: Vec<usize>,
    },
}

/// What the backward needs: the piece's graph (or how to rebuild it) and where each
/// parameter's gradient goes.
struct Saved<M, E> {
    graph: PieceGraph<M>,
    params: HashMap<ParamId, NodeId>,
    piece: Arc<PieceFn<M, E>>,
}

impl<M: Clone, E> Clone for Saved<M, E> {
    fn clone(&self) -> Self {
        Saved {
            graph: self.graph.clone(),
            params: self.params.clone(),
            piece: self.piece.clone(),
        }
    }
}

impl<M, E> fmt::Debug for Saved<M, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.graph {
            PieceGraph::Kept { .. } => "kept",
            PieceGraph::Rebuild { .. } => "rebuilt",
        };
        f.debug_struct("Saved")
            .field("graph", &kind)
            .finish_non_exhaustive()
    }
}

struct PieceNode<M, E>(std::marker::PhantomData<fn() -> (M, E)>);

impl<M, E> fmt::Debug for PieceNode<M, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PieceNode")
    }
}

impl<M, E> Backward<Flex, 1> for PieceNode<M, E>
where
    M: Module + Clone + Send + Sync + fmt::Debug + 'static,
    E: 'static,
{
    type State = Saved<M, E>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad_out = Tensor::<1>::from_primitive::<Flex>(grads.consume::<Flex>(&ops.node));
        let Saved {
            graph,
            params,
            piece,
        } = ops.state;
        let (fresh, input, outputs) = match graph {
            PieceGraph::Kept {
                module,
                input,
                outputs,
            } => (module, input, outputs),
            PieceGraph::Rebuild {
                inner,
                input,
                in_sizes,
            } => {
                // A graph of its own: fresh parameter leaves (same ids) and a fresh input.
                let fresh = inner.train();
                let input = Tensor::<1>::from_inner(input).require_grad();
                let (outputs, _) = piece(&fresh, split(input.clone(), &in_sizes));
                (fresh, input, outputs)
            }
        };
        // d/d(out) of sum(out * g) is g exactly, so the piece's backward starts from the
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
