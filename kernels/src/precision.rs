//! Compute precision of the model's matrix products (the root config's `precision:`).
//!
//! `bf16` is mixed precision as trainers run it on GPUs: the master weights, the gradients
//! the optimizer sees and its state stay f32; every GEMM of the transformer (attention
//! projections, scores and the probability-value product, expert and dense SwiGLU, LM head)
//! casts its two operands to bf16 and its result back to f32, so the backward GEMMs run in
//! bf16 as well (autodiff follows the casts). The router, the softmaxes and log-sum-exps
//! (attention, cross-entropy), RMSNorm, SiLU and the losses stay f32.
//!
//! The `Transformer` carries its precision and sets it for the duration of its forward pass
//! on the calling thread ([`scoped`]), so the layers below need no extra argument and a
//! layer called on its own (tests, benchmarks) computes in f32 unless wrapped the same way.
//! Under bf16 the fused CPU GEMM ops (`cpu::grouped`, `attention`, `linear`: f32 kernels)
//! give way to their burn-op references, which cast.

use std::cell::Cell;

use burn::tensor::{FloatDType, Tensor};
use serde::{Deserialize, Serialize};

/// The dtype of the transformer's GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    Fp32,
    /// bf16 GEMM operands and results, f32 master weights, router, softmax and loss.
    Bf16,
}

thread_local! {
    static CURRENT: Cell<Precision> = const { Cell::new(Precision::Fp32) };
}

/// The precision of the forward pass running on this thread (f32 outside any [`scoped`]).
pub fn current() -> Precision {
    CURRENT.get()
}

/// Runs `f` with `precision` as this thread's compute precision (restored afterwards, also
/// on panic).
pub fn scoped<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.set(self.0);
        }
    }
    let _restore = Restore(CURRENT.replace(precision));
    f()
}

/// `a.matmul(b)` at the current precision; the result is f32 either way.
pub fn matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    match current() {
        Precision::Fp32 => a.matmul(b),
        Precision::Bf16 => a
            .cast(FloatDType::BF16)
            .matmul(b.cast(FloatDType::BF16))
            .cast(FloatDType::F32),
    }
}
