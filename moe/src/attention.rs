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

use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Tensor, TensorData};
use switchyard_kernels as cpu;
use switchyard_kernels::precision;

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

/// softmax(q k^T / sqrt(Dh) + causal mask) v. q, k, v: [B, H, S, Dh] -> [B, H, S, Dh].
/// One fused op on the CPU backend (`cpu::attention`).
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    match cpu::attention::causal_attention(&q, &k, &v) {
        Some(out) => out,
        None => causal_attention_reference(q, k, v),
    }
}

/// `causal_attention` with burn ops: the reference of the fused op. The two GEMMs run at the
/// forward pass's precision, the softmax in f32.
pub fn causal_attention_reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [_, _, s, dh] = q.dims();
    let scores_bhss = precision::matmul(q, k.swap_dims(2, 3)) / (dh as f64).sqrt();
    // true above the diagonal: key position after query position.
    let future_ss = Tensor::<2, Bool>::tril_mask([s, s], 0, &scores_bhss.device());
    let scores_bhss = scores_bhss.mask_fill(future_ss.unsqueeze::<4>(), f32::NEG_INFINITY);
    precision::matmul(softmax(scores_bhss, 3), v)
}

/// Causal attention of T new queries at positions `offset..offset + T` over every key so
/// far (positions `0..offset + T`): q [B, H, T, Dh], k, v [B, H, P + T, Dh] with
/// `P == offset` -> [B, H, T, Dh]. Incremental decoding with a key/value cache; with
/// `offset == 0` it is `causal_attention_reference`. Burn ops, GEMMs at the forward pass's
/// precision, softmax in f32.
pub fn cached_causal_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    offset: usize,
) -> Tensor<4> {
    let [_, _, t, dh] = q.dims();
    let [_, _, keys, _] = k.dims();
    let scores_bhtk = precision::matmul(q, k.swap_dims(2, 3)) / (dh as f64).sqrt();
    // true where the key comes after the query.
    let future: Vec<bool> = (0..t)
        .flat_map(|i| (0..keys).map(move |j| j > offset + i))
        .collect();
    let future_tk =
        Tensor::<2, Bool>::from_data(TensorData::new(future, [t, keys]), &scores_bhtk.device());
    let scores_bhtk = scores_bhtk.mask_fill(future_tk.unsqueeze::<4>(), f32::NEG_INFINITY);
    precision::matmul(softmax(scores_bhtk, 3), v)
}
