//! Context-parallel attention as a custom autodiff operation.
//!
//! Forward: the chosen algorithm's schedule on the inner (non-autodiff) tensors; the node
//! keeps this rank's q, k, v, output and log-sum-exp (all `O(N)`: no `N x S` score matrix
//! outlives a tile). Backward: the algorithm's backward schedule, run by burn's backward
//! pass as the node's `Backward` step. Every rank runs it, whichever of q, k, v need a
//! gradient, so the transfers are never skipped on one rank only.
//!
//! Written against burn's backend-generic tensor API and made one autodiff node by
//! [`crate::autodiff::differentiable`], like `all_to_all`, so it runs on every backend of the
//! build; the blocks travel through host buffers.
//!
//! Shape legend: B batch, H heads, N local tokens, Dh head dim.

use std::sync::Arc;

use burn::tensor::Tensor;

use super::saved::Saved;
use super::{CpAlgorithm, CpAttention, ring, token_ring};
use crate::autodiff::{GradFn, differentiable};
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
/// order) -> [B, H, N, Dh]. Differentiable on every autodiff backend of this build
/// ([`crate::autodiff`]); plain on any inner device. Every rank must call it, in the same
/// order, with the same shapes.
pub fn context_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    attn: &CpAttention,
) -> Result<Tensor<4>> {
    check(attn, &q, &k, &v)?;
    let op = format!("context attention on `{}`", attn.comm.name());
    differentiable(&op, [q, k, v], |[q, k, v]| {
        let saved = forward(attn, q, k, v)?;
        let out = saved.o.clone();
        let attn = Arc::new(attn.clone());
        let grad_fn: GradFn<3, 4, 4> = Box::new(move |d_out, _needed| {
            // Every rank runs the backward schedule, whichever of q, k, v need a gradient.
            // The backward pass has no error channel: a failed transfer unwinds to the step.
            let (dq, dk, dv) = backward(&attn, &saved, d_out).unwrap_or_else(crate::seam::fail);
            [Some(dq), Some(dk), Some(dv)]
        });
        Ok((out, grad_fn))
    })
}
