//! Dispatch gather and weighted combine as single fused ops (no index tensors, no
//! intermediate [N, D] products, one pass each way).
//!
//! Shape legend: T tokens, D model dim, K top-k, N rows.

use burn::tensor::Tensor;

use super::{BackwardFn, Fused, custom_op, dims, fused, prim, tensor, values, zeros};

/// x: [T, D] -> rows [N, D] with `rows[r] = x[token[r]]`. `None` off the flex backend.
pub fn gather_rows(x_td: &Tensor<2>, token: &[i64]) -> Option<Tensor<2>> {
    if !fused(Fused::DispatchCombine) {
        return None;
    }
    let token: Vec<usize> = token.iter().map(|&t| t as usize).collect();
    custom_op([prim(x_td)?], move |[x]| {
        let (t, d) = (dims(x)[0], dims(x)[1]);
        let xv = values(x);
        let mut out = zeros(token.len() * d);
        for (row, &tok) in out.chunks_mut(d).zip(&token) {
            row.copy_from_slice(&xv[tok * d..(tok + 1) * d]);
        }
        let n = token.len();
        let backward: BackwardFn<1> = Box::new(move |dy, _| {
            let dyv = values(&dy);
            let mut dx = zeros(t * d);
            for (row, &tok) in dyv.chunks(d).zip(&token) {
                for (acc, g) in dx[tok * d..(tok + 1) * d].iter_mut().zip(row) {
                    *acc += g;
                }
            }
            [Some(tensor(dx, &[t, d]))]
        });
        (tensor(out, &[n, d]), backward)
    })
}

/// out: [N, D], weights: [T, K] -> y [T, D] with
/// `y[token[r]] += weights[assignment[r]] * out[r]`. `None` off the flex backend.
pub fn combine_rows(
    out_nd: &Tensor<2>,
    weights_tk: &Tensor<2>,
    token: &[i64],
    assignment: &[i64],
    num_tokens: usize,
) -> Option<Tensor<2>> {
    if !fused(Fused::DispatchCombine) {
        return None;
    }
    let token: Vec<usize> = token.iter().map(|&t| t as usize).collect();
    let assignment: Vec<usize> = assignment.iter().map(|&a| a as usize).collect();
    let inputs = [prim(out_nd)?, prim(weights_tk)?];
    custom_op(inputs, move |[out, weights]| {
        let (n, d) = (dims(out)[0], dims(out)[1]);
        let (t, k) = (dims(weights)[0], dims(weights)[1]);
        debug_assert_eq!(t, num_tokens);
        let (ov, wv) = (values(out), values(weights));
        let mut y = zeros(t * d);
        for ((row, &tok), &a) in ov.chunks(d).zip(&token).zip(&assignment) {
            let w = wv[a];
            for (acc, o) in y[tok * d..(tok + 1) * d].iter_mut().zip(row) {
                *acc += w * o;
            }
        }
        let (out, weights) = (out.clone(), weights.clone());
        let backward: BackwardFn<2> = Box::new(move |dy, needed| {
            let dyv = values(&dy);
            let (ov, wv) = (values(&out), values(&weights));
            let mut d_out = zeros(if needed[0] { n * d } else { 0 });
            let mut d_w = zeros(t * k);
            for (r, (&tok, &a)) in token.iter().zip(&assignment).enumerate() {
                let g = &dyv[tok * d..(tok + 1) * d];
                if needed[0] {
                    for (o, gi) in d_out[r * d..(r + 1) * d].iter_mut().zip(g) {
                        *o = wv[a] * gi;
                    }
                }
                d_w[a] += ov[r * d..(r + 1) * d]
                    .iter()
                    .zip(g)
                    .map(|(o, gi)| o * gi)
                    .sum::<f32>();
            }
            [
                needed[0].then(|| tensor(d_out, &[n, d])),
                needed[1].then(|| tensor(d_w, &[t, k])),
            ]
        });
        (tensor(y, &[t, d]), backward)
    })
}
