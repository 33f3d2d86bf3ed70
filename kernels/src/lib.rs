//! switchyard-kernels: fused CPU operations on raw f32 buffers, as custom autodiff nodes on
//! `Autodiff<Flex>`, and the compute precision of the model's GEMMs ([`precision`]).
//!
//! burn's generic ops allocate a tensor per step and run one pass over memory each; the
//! hot parts of a training step (grouped experts, dispatch gather, combine, attention
//! core, projections, RMSNorm, loss) are written here as one node each, forward and
//! backward, with their GEMMs on [`gemm`] (a packed micro-kernel GEMM whose rounding does
//! not depend on how a GEMM is split) called single-threaded inside parallel tasks (per
//! expert row block, per head, per tile of C). Each op has a readable reference in burn
//! ops and a test pinning output and gradients to it.
//!
//! An op runs here only on the flex backend (plain or autodiff); on any other backend the
//! callers take their burn-op reference path.

pub mod alloc;
pub mod attention;
pub mod combine;
pub mod gemm;
pub mod grouped;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod precision;
pub mod rope;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use burn::backend::BackendTypes;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};

use crate::precision::Precision;

/// The fused paths, each of which can be switched back to its burn-op reference (the
/// benchmark measures every change side by side this way; tests pin the two together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fused {
    /// Grouped SwiGLU over all local experts (`grouped`).
    GroupedExperts,
    /// Dispatch gather and weighted combine (`combine`).
    DispatchCombine,
    /// Causal attention core (`attention`).
    Attention,
    /// Cross-entropy over the vocabulary (`loss`).
    Loss,
    /// One parallel AdamW pass over raw buffers, and the gradient norm and clipping on raw
    /// buffers (in the trainer).
    Optimizer,
    /// Dense projections (attention, LM head) as row-blocked GEMMs (`linear`).
    Linear,
    /// RMSNorm (`norm`).
    Norm,
    /// Split into heads with the rotary embedding, and the merge of heads (`rope`).
    Heads,
}

impl Fused {
    pub const ALL: [Fused; 8] = [
        Fused::GroupedExperts,
        Fused::DispatchCombine,
        Fused::Attention,
        Fused::Loss,
        Fused::Optimizer,
        Fused::Linear,
        Fused::Norm,
        Fused::Heads,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fused::GroupedExperts => "grouped expert GEMM",
            Fused::DispatchCombine => "fused dispatch/combine",
            Fused::Attention => "fused attention core",
            Fused::Loss => "fused cross-entropy",
            Fused::Optimizer => "fused AdamW",
            Fused::Linear => "row-blocked projections",
            Fused::Norm => "fused RMSNorm",
            Fused::Heads => "fused heads + RoPE",
        }
    }
}

/// Bit i set: `Fused::ALL[i]` is switched off (process-wide). All on by default.
static DISABLED: AtomicU32 = AtomicU32::new(0);

/// Switches a fused path on or off for the whole process.
pub fn set_fused(op: Fused, on: bool) {
    let bit = 1 << op as u32;
    if on {
        DISABLED.fetch_and(!bit, Ordering::Relaxed);
    } else {
        DISABLED.fetch_or(bit, Ordering::Relaxed);
    }
}

/// Whether `op` takes its fused path. The GEMM ops compute in f32 only, so under a bf16
/// forward pass (`crate::precision`) they give way to their references, which cast.
pub fn fused(op: Fused) -> bool {
    let f32_gemm = matches!(op, Fused::GroupedExperts | Fused::Attention | Fused::Linear);
    DISABLED.load(Ordering::Relaxed) & (1 << op as u32) == 0
        && !(f32_gemm && crate::precision::current() == Precision::Bf16)
}

/// The flex backend's tensor primitive.
pub type FlexTensor = <Flex as BackendTypes>::FloatTensorPrimitive;

/// A float tensor taken apart for a custom op.
pub enum Prim {
    Tracked(<Autodiff<Flex> as BackendTypes>::FloatTensorPrimitive),
    Plain(FlexTensor),
}

/// The primitive of a flex tensor (autodiff or not); `None` on another backend.
pub fn prim<const D: usize>(t: &Tensor<D>) -> Option<Prim> {
    if t.device().is_autodiff() {
        t.clone()
            .try_into_primitive::<Autodiff<Flex>>()
            .ok()
            .map(Prim::Tracked)
    } else {
        t.clone().try_into_primitive::<Flex>().ok().map(Prim::Plain)
    }
}

/// Computes the gradients of an op's inputs from the gradient of its output;
/// `needed[i]` tells whether input `i` wants one.
pub type BackwardFn<const N: usize> =
    Box<dyn FnOnce(FlexTensor, [bool; N]) -> [Option<FlexTensor>; N] + Send>;

/// Runs a custom op: `forward` gets the inputs' values and returns the output and the
/// backward closure (dropped when nothing is tracked). Inputs must all be tracked or all
/// plain (`None` otherwise, and the caller takes its reference path).
pub fn custom_op<const N: usize, const D: usize>(
    inputs: [Prim; N],
    forward: impl FnOnce([&FlexTensor; N]) -> (FlexTensor, BackwardFn<N>),
) -> Option<Tensor<D>> {
    if inputs.iter().all(|p| matches!(p, Prim::Plain(_))) {
        let values = inputs.map(|p| match p {
            Prim::Plain(t) => t,
            Prim::Tracked(_) => unreachable!(),
        });
        let (out, _) = forward(values.each_ref());
        return Some(Tensor::from_primitive::<Flex>(out));
    }
    if !inputs.iter().all(|p| matches!(p, Prim::Tracked(_))) {
        return None;
    }
    let (values, guards) = split(inputs);
    let (out, backward) = forward(values.each_ref());
    let tracked = match Custom::<N>
        .prepare::<NoCheckpointing>(guards)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            State {
                backward: Arc::new(std::sync::Mutex::new(Some(backward))),
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(Tensor::from_primitive::<Autodiff<Flex>>(tracked))
}

type Guard = burn::backend::autodiff::ops::NodeGuard;

fn split<const N: usize>(inputs: [Prim; N]) -> ([FlexTensor; N], [Guard; N]) {
    let mut values = Vec::with_capacity(N);
    let mut guards = Vec::with_capacity(N);
    for p in inputs {
        let Prim::Tracked(t) = p else { unreachable!() };
        let (v, g) = t.into_parts();
        values.push(v);
        guards.push(g);
    }
    let (Ok(values), Ok(guards)) = (values.try_into(), guards.try_into()) else {
        unreachable!()
    };
    (values, guards)
}

struct State<const N: usize> {
    /// Taken once by the backward step.
    backward: Arc<std::sync::Mutex<Option<BackwardFn<N>>>>,
}

impl<const N: usize> Clone for State<N> {
    fn clone(&self) -> Self {
        Self {
            backward: self.backward.clone(),
        }
    }
}

impl<const N: usize> fmt::Debug for State<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Custom<const N: usize>;

impl<const N: usize> Backward<Flex, N> for Custom<N> {
    type State = State<N>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let needed = ops.parents.each_ref().map(Option::is_some);
        let backward = ops
            .state
            .backward
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("a custom op's backward runs once");
        let input_grads = backward(grad, needed);
        for (parent, g) in ops.parents.into_iter().zip(input_grads) {
            if let (Some(parent), Some(g)) = (parent, g) {
                grads.register::<Flex>(parent.id, g);
            }
        }
    }
}

/// Contiguous f32 values of a flex tensor (a copy only when it is a strided view).
pub fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().unwrap().to_vec()),
    }
}

/// `n` zeros; a large buffer is written by the thread pool (zeroing the ops' output
/// buffers on the calling thread was a fifth of a step's serial time).
pub fn zeros(n: usize) -> Vec<f32> {
    use rayon::iter::{ParallelExtend, repeat_n};
    if n < 1 << 16 {
        return vec![0f32; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(repeat_n(0f32, n));
    v
}

/// A flex tensor of `shape` holding `data`.
pub fn tensor(data: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape.to_vec()))
}

/// The dims of a flex tensor.
pub fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

/// `e^x` for f32 to about 2e-7 relative error: 2^n from the exponent bits and a
/// degree-6 polynomial on the remainder. Branch-free, so loops over slices vectorise
/// (the libm call does not, and the activations and softmaxes of a step take tens of
/// millions of exponentials).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Runs `f` inside a function compiled for AVX2 + FMA when the CPU has them, so that the
/// elementwise loops inlined into it use 8-lane vectors (the build targets baseline x86-64,
/// whose vectors have 4 lanes). The results are the same bits either way: Rust never fuses
/// `a * b + c` into one rounding, and the loops keep their order of summation.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if gemm::has_avx2_fma() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `sum_i x_i` with eight independent partial sums, so the loop vectorises (a single
/// running f32 sum is a dependency chain the compiler must keep in order).
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `sum_i x_i^2` with eight independent partial sums, like [`sum`].
#[inline(always)]
pub fn sum_squares(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x * x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The sum of squares of a vector (a gradient, for the global norm). On the flex device one
/// parallel pass over the values (per chunk in f32 with eight partial sums, so it
/// vectorises; chunks added in f64); elsewhere, or with [`Fused::Optimizer`] off, burn ops.
pub fn squared_norm(g: &Tensor<1>) -> f64 {
    use rayon::prelude::*;
    if fused(Fused::Optimizer) && g.device() == burn::tensor::Device::flex() {
        let primitive = g
            .clone()
            .try_into_primitive::<Flex>()
            .expect("a tensor on the flex device");
        return values(&primitive)
            .par_chunks(1 << 14)
            .map(|c| {
                wide(
                    #[inline(always)]
                    || sum_squares(c),
                ) as f64
            })
            .sum::<f64>();
    }
    g.clone().powi_scalar(2).sum().into_scalar::<f32>() as f64
}

/// The logistic sigmoid.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// SiLU.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

#[cfg(test)]
mod tests {
    /// The AVX2 build of a loop gives the bits of the baseline build.
    #[test]
    fn wide_loops_round_like_narrow_ones() {
        let xs: Vec<f32> = (0..4099).map(|i| (i as f32 - 2000.0) * 0.0173).collect();
        let act = |xs: &[f32]| -> Vec<f32> { xs.iter().map(|&x| super::silu(x) * x).collect() };
        let narrow = act(&xs);
        let wide = super::wide(
            #[inline(always)]
            || act(&xs),
        );
        assert_eq!(wide, narrow);
        assert_eq!(
            super::wide(|| super::sum(&narrow)).to_bits(),
            super::sum(&narrow).to_bits()
        );
    }

    #[test]
    fn exp_is_close_to_libm() {
        let mut worst = 0f32;
        for i in -8700..8800 {
            let x = i as f32 * 0.01 + 0.003;
            let rel = (super::exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(super::exp(f32::NEG_INFINITY) < 1e-37);
    }
}
