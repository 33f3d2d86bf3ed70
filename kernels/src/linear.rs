//! `x w` for the dense projections (attention, LM head) as one op whose three GEMMs
//! (forward, input gradient, weight gradient) are tiled over the thread pool
//! (`gemm_parallel`). burn's 3-D matmul against a broadcast weight runs one GEMM per batch
//! entry and sums a [B, D, O] weight gradient over the batch.
//!
//! Shape legend: N rows, D input dim, O output dim.

use burn::tensor::Tensor;

use super::gemm::{Mat, gemm_parallel_new};
use super::{BackwardFn, Fused, custom_op, dims, fused, prim, tensor, values};

/// x: [N, D], w: [D, O] -> [N, O]; burn's matmul (at the forward pass's precision) off the
/// flex backend, under bf16 or when switched off.
pub fn linear(x_nd: Tensor<2>, w_do: Tensor<2>) -> Tensor<2> {
    if fused(Fused::Linear)
        && let (Some(x), Some(w)) = (prim(&x_nd), prim(&w_do))
        && let Some(y) = custom_op([x, w], |[x, w]| forward(x, w))
    {
        return y;
    }
    crate::precision::matmul(x_nd, w_do)
}

fn forward(x: &super::FlexTensor, w: &super::FlexTensor) -> (super::FlexTensor, BackwardFn<2>) {
    let (n, d) = (dims(x)[0], dims(x)[1]);
    let o = dims(w)[1];
    let y = gemm_parallel_new(Mat::new(&values(x), n, d), Mat::new(&values(w), d, o));
    let (x, w) = (x.clone(), w.clone());
    let backward: BackwardFn<2> = Box::new(move |dy, needed| {
        let (xv, wv, dyv) = (values(&x), values(&w), values(&dy));
        let dy = Mat::new(&dyv, n, o);
        let dx = needed[0].then(|| tensor(gemm_parallel_new(dy, Mat::new(&wv, d, o).t()), &[n, d]));
        let dw = needed[1].then(|| tensor(gemm_parallel_new(Mat::new(&xv, n, d).t(), dy), &[d, o]));
        [dx, dw]
    });
    (tensor(y, &[n, o]), backward)
}
