//! The attention seam: how the transformer attends over the sequence.
//!
//! The model computes q, k, v and applies RoPE itself; an `AttentionImpl` says which global
//! positions the tokens of this process have (RoPE and the causal mask use them) and
//! computes causal attention of the local queries over the whole sequence. `DenseAttention`
//! (the default) holds the whole sequence; `switchyard-parallel` swaps in context-parallel
//! attention, where each process holds a shard of the sequence (`parallelize`).
//!
//! Shape legend: B batch, H heads, S local sequence length, Dh head dim.

use std::fmt::Debug;

use burn::tensor::Tensor;

use crate::model::causal_attention;

/// Attention over the (possibly sharded) sequence.
pub trait AttentionImpl: Debug + Send + Sync {
    /// Global positions of the `local_len` tokens this process holds, in their order here.
    fn positions(&self, local_len: usize) -> Vec<usize>;

    /// Causal attention: q, k, v [B, H, S, Dh] (after RoPE) -> [B, H, S, Dh]. Query `i`
    /// attends every key of the whole sequence whose position is at most its own.
    fn attend(&self, q_bhsd: Tensor<4>, k_bhsd: Tensor<4>, v_bhsd: Tensor<4>) -> Tensor<4>;
}

/// One process holds the whole sequence: positions `0..S`, dense causal attention.
#[derive(Debug, Clone, Copy, Default)]
pub struct DenseAttention;

impl AttentionImpl for DenseAttention {
    fn positions(&self, local_len: usize) -> Vec<usize> {
        (0..local_len).collect()
    }

    fn attend(&self, q_bhsd: Tensor<4>, k_bhsd: Tensor<4>, v_bhsd: Tensor<4>) -> Tensor<4> {
        causal_attention(q_bhsd, k_bhsd, v_bhsd)
    }
}
