//! What a context-parallel attention forward keeps for its backward (shared by the ring and
//! TokenRing schedules and the autodiff node of `op.rs`).
//!
//! Shape legend: B batch, H heads, N local tokens, Dh head dim.

use burn::tensor::Tensor;

/// What the forward pass keeps for the backward pass: the local q, k, v [B, H, N, Dh], the
/// merged output [B, H, N, Dh] and its log-sum-exp [B, H, N, 1].
#[derive(Debug, Clone)]
pub struct Saved {
    pub q: Tensor<4>,
    pub k: Tensor<4>,
    pub v: Tensor<4>,
    pub o: Tensor<4>,
    pub lse: Tensor<4>,
}
