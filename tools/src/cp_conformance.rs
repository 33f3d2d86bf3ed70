//! Parity of context attention with dense single-device attention, forward and backward,
//! on any communicator: the local tests (`tests/cp_attention.rs`) and the MPI run
//! (`bin/cp-parity.rs`) use the same cases.
//!
//! Every rank builds the same full-sequence q, k, v and output gradient g (a fixed host
//! generator), computes the dense reference and its gradients with burn's autodiff, runs
//! context attention on its shard with the same g, and compares its shard of the output
//! and of dq, dk, dv with the reference's (max abs error).
//!
//! Shape legend: B batch, H heads, S sequence, N local tokens, Dh head dim.

use std::sync::Arc;

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use switchyard_comm::Communicator;
use switchyard_moe::attention::causal_attention;

use switchyard_parallel::Result;
use switchyard_parallel::cp::{CpAlgorithm, CpAttention, Sharding, context_attention};

/// One parity case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    pub algorithm: CpAlgorithm,
    pub sharding: Sharding,
    pub causal: bool,
    pub batch: usize,
    pub heads: usize,
    /// Global sequence length.
    pub seq: usize,
    pub head_dim: usize,
    /// Inputs are uniform in [-amplitude, amplitude).
    pub amplitude: f32,
    pub seed: u64,
}

/// The standard cases for a ring of `ranks`: both algorithms x {causal zigzag, causal
/// contiguous (unbalanced, with skipped tiles), non-causal}.
pub fn cases(ranks: usize) -> Vec<Case> {
    let mut out = Vec::new();
    for algorithm in [CpAlgorithm::Ring, CpAlgorithm::TokenRing] {
        for (sharding, causal) in [
            (Sharding::Zigzag, true),
            (Sharding::Contiguous, true),
            (Sharding::Zigzag, false),
        ] {
            out.push(Case {
                algorithm,
                sharding,
                causal,
                batch: 2,
                heads: 3,
                // 3 tokens per zigzag chunk.
                seq: 6 * ranks,
                head_dim: 8,
                amplitude: 2.0,
                seed: 17 + ranks as u64,
            });
        }
    }
    out
}

/// Max abs errors of this rank's shard, and the largest magnitude of the reference in it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Errors {
    pub out: f32,
    pub dq: f32,
    pub dk: f32,
    pub dv: f32,
    /// max |reference| of out, dq, dk, dv.
    pub reference_max: [f32; 4],
}

impl Errors {
    /// The largest abs error.
    pub fn max(&self) -> f32 {
        self.out.max(self.dq).max(self.dk).max(self.dv)
    }

    /// The largest abs error relative to its reference's magnitude.
    pub fn max_relative(&self) -> f32 {
        [self.out, self.dq, self.dk, self.dv]
            .iter()
            .zip(self.reference_max)
            .map(|(e, m)| if m > 0.0 { e / m } else { *e })
            .fold(0.0, f32::max)
    }
}

/// Deterministic values in [-amplitude, amplitude) (a 64-bit LCG; the same on every rank
/// and platform).
fn values(n: usize, amplitude: f32, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amplitude
        })
        .collect()
}

/// Dense attention over the whole sequence (the model's causal attention, or plain
/// softmax attention without the mask).
fn dense(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, causal: bool) -> Tensor<4> {
    if causal {
        return causal_attention(q, k, v);
    }
    let dh = q.dims()[3];
    softmax(q.matmul(k.swap_dims(2, 3)) / (dh as f64).sqrt(), 3).matmul(v)
}

/// The shard of `rank` of a [B, H, S, X] tensor along the sequence -> [B, H, N, X].
pub fn shard(t: Tensor<4>, attn: &CpAttention, rank: usize) -> Tensor<4> {
    let s = t.dims()[2];
    let n = s / attn.layout().ranks;
    let index: Vec<i64> = attn
        .layout()
        .positions(rank, n)
        .into_iter()
        .map(|p| p as i64)
        .collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(index, [n]), &t.device());
    t.select(2, index)
}

fn max_abs(a: Tensor<4>, b: Tensor<4>) -> f32 {
    (a - b).abs().max().into_scalar()
}

/// Runs `case` on this rank of `comm` (every rank must call it with the same case).
pub fn check(comm: Arc<dyn Communicator>, case: &Case) -> Result<Errors> {
    let Case {
        batch: b,
        heads: h,
        seq: s,
        head_dim: dh,
        ..
    } = *case;
    let rank = comm.rank();
    let mut attn = CpAttention::new(comm, case.sharding, case.algorithm);
    if !case.causal {
        attn = attn.non_causal();
    }
    attn.layout().check_len(s)?;
    let device = Device::flex().autodiff();
    let full = |i: u64| {
        Tensor::<4>::from_data(
            TensorData::new(
                values(b * h * s * dh, case.amplitude, case.seed * 8 + i),
                [b, h, s, dh],
            ),
            &device,
        )
    };
    let [q, k, v, g] = [full(0), full(1), full(2), full(3)];

    // Reference: dense attention over the whole sequence.
    let (rq, rk, rv) = (
        q.clone().require_grad(),
        k.clone().require_grad(),
        v.clone().require_grad(),
    );
    let out = dense(rq.clone(), rk.clone(), rv.clone(), case.causal);
    let grads = (out.clone() * g.clone()).sum().backward();
    let reference = [
        out.inner(),
        rq.grad(&grads).expect("dq"),
        rk.grad(&grads).expect("dk"),
        rv.grad(&grads).expect("dv"),
    ];

    // This rank's shard through context attention.
    let local = |t: &Tensor<4>| shard(t.clone(), &attn, rank).require_grad();
    let (lq, lk, lv) = (local(&q), local(&k), local(&v));
    let out = context_attention(lq.clone(), lk.clone(), lv.clone(), &attn)?;
    let grads = (out.clone() * shard(g, &attn, rank)).sum().backward();
    let got = [
        out.inner(),
        lq.grad(&grads).expect("dq"),
        lk.grad(&grads).expect("dk"),
        lv.grad(&grads).expect("dv"),
    ];
    let want: [Tensor<4>; 4] = std::array::from_fn(|i| shard(reference[i].clone(), &attn, rank));
    let [out, dq, dk, dv]: [f32; 4] =
        std::array::from_fn(|i| max_abs(got[i].clone(), want[i].clone()));
    let reference_max = std::array::from_fn(|i| want[i].clone().abs().max().into_scalar());
    Ok(Errors {
        out,
        dq,
        dk,
        dv,
        reference_max,
    })
}
