//! Context-parallel attention as a custom autodiff operation.
//!
//! Forward: the chosen algorithm's schedule on the inner (non-autodiff) tensors; the node
//! keeps this rank's q, k, v, output and log-sum-exp (all `O(N)`: no `N x S` score matrix
//! outlives a tile). Backward: the algorithm's backward schedule, run by burn's backward
//! pass as the node's `Backward` step. Every rank runs it, whichever of q, k, v need a
//! gradient, so the transfers are never skipped on one rank only.
//!
//! Implemented on `Autodiff<Flex>` (the CPU backend), like `all_to_all`; the blocks travel
//! through host buffers. Another autodiff backend gets `UnsupportedBackend`.
//!
//! Shape legend: B batch, H heads, N local tokens, Dh head dim.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::Tensor;

use super::saved::Saved;
use super::{CpAlgorithm, CpAttention, ring, token_ring};
use crate::error::{ParallelError, Result};

fn check(attn: &CpAttention, q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> Result<()> {
    let what = || format!("context attention on `{}`", attn.comm.name());
    if q.dims() != k.dims() || q.dims() != v.dims() {
        return Err(ParallelError::Shape {
            what: what(),
            detail: format!(
                "q {:?}, k {:?} and v {:?} must have the same shape [B, H, N, Dh]",
                q.dims(),
                k.dims(),
                v.dims()
            ),
        });
    }
    let n = q.dims()[2];
    attn.layout.check_len(n * attn.layout.ranks)
}

fn forward(attn: &CpAttention, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Result<Saved> {
    match attn.algorithm {
        CpAlgorithm::Ring => ring::forward(attn, q, k, v),
        CpAlgorithm::TokenRing => token_ring::forward(attn, q, k, v),
    }
}

fn backward(
    attn: &CpAttention,
    saved: &Saved,
    d_out: Tensor<4>,
) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
    match attn.algorithm {
        CpAlgorithm::Ring => ring::backward(attn, saved, d_out),
        CpAlgorithm::TokenRing => token_ring::backward(attn, saved, d_out),
    }
}

/// Attention of this rank's queries over the whole sequence held by the ranks of
/// `attn`'s communicator: q, k, v [B, H, N, Dh] (this rank's shard, in the layout's
/// order) -> [B, H, N, Dh]. Differentiable on `Autodiff<Flex>`; plain on any inner
/// device. Every rank must call it, in the same order, with the same shapes.
pub fn context_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    attn: &CpAttention,
) -> Result<Tensor<4>> {
    check(attn, &q, &k, &v)?;
    if !q.device().is_autodiff() {
        return Ok(forward(attn, q, k, v)?.o);
    }
    let unsupported = |e| ParallelError::UnsupportedBackend {
        op: format!("context attention on `{}`", attn.comm.name()),
        detail: format!("{e:?}"),
    };
    let (q, gq) = q
        .try_into_primitive::<Autodiff<Flex>>()
        .map_err(unsupported)?
        .into_parts();
    let (k, gk) = k
        .try_into_primitive::<Autodiff<Flex>>()
        .map_err(unsupported)?
        .into_parts();
    let (v, gv) = v
        .try_into_primitive::<Autodiff<Flex>>()
        .map_err(unsupported)?
        .into_parts();
    let saved = forward(
        attn,
        Tensor::<4>::from_primitive::<Flex>(q),
        Tensor::<4>::from_primitive::<Flex>(k),
        Tensor::<4>::from_primitive::<Flex>(v),
    )?;
    let out = saved
        .o
        .clone()
        .try_into_primitive::<Flex>()
        .map_err(unsupported)?;
    let tracked = match ContextAttentionBackward
        .prepare::<NoCheckpointing>([gq, gk, gv])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            State {
                attn: Arc::new(attn.clone()),
                saved,
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(Tensor::<4>::from_primitive::<Autodiff<Flex>>(tracked))
}

#[derive(Debug, Clone)]
struct State {
    attn: Arc<CpAttention>,
    saved: Saved,
}

#[derive(Debug)]
struct ContextAttentionBackward;

impl Backward<Flex, 3> for ContextAttentionBackward {
    type State = State;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let d_out = Tensor::<4>::from_primitive::<Flex>(grad);
        let State { attn, saved } = ops.state;
        // The backward pass has no error channel: a failed transfer unwinds to the step.
        let (dq, dk, dv) = backward(&attn, &saved, d_out).unwrap_or_else(crate::seam::fail);
        for (parent, g) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(parent) = parent {
                let g = g
                    .try_into_primitive::<Flex>()
                    .unwrap_or_else(|e| panic!("backward of context attention: {e:?}"));
                grads.register::<Flex>(parent.id, g);
            }
        }
    }
}
