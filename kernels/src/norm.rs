//! RMSNorm as one op: a pass per row forward, one backward (burn's version is a chain of
//! six ops, each with its own temporaries and backward).
//!
//! Shape legend: N rows, D model dim.

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::{BackwardFn, Fused, custom_op, dims, fused, prim, tensor, values, zeros};

/// Rows per parallel task.
const ROWS: usize = 64;

/// x: [N, D], gamma: [D] -> `x / sqrt(mean(x^2) + eps) * gamma`. `None` off the flex backend
/// or when switched off.
pub fn rms_norm(x_nd: &Tensor<2>, gamma: &Tensor<1>, eps: f64) -> Option<Tensor<2>> {
    if !fused(Fused::Norm) {
        return None;
    }
    custom_op([prim(x_nd)?, prim(gamma)?], move |[x, gamma]| {
        let (n, d) = (dims(x)[0], dims(x)[1]);
        let (xv, gv) = (values(x), values(gamma));
        let mut y = zeros(n * d);
        let mut inv = zeros(n);
        y.par_chunks_mut(ROWS * d)
            .zip(inv.par_chunks_mut(ROWS))
            .enumerate()
            .for_each(|(c, (y, inv))| {
                for (i, (y_row, r)) in y.chunks_mut(d).zip(inv.iter_mut()).enumerate() {
                    let row = c * ROWS + i;
                    let x_row = &xv[row * d..(row + 1) * d];
                    let ms = x_row.iter().map(|a| a * a).sum::<f32>() / d as f32;
                    *r = 1.0 / (ms + eps as f32).sqrt();
                    for ((o, a), g) in y_row.iter_mut().zip(x_row).zip(gv.iter()) {
                        *o = a * *r * g;
                    }
                }
            });
        let (x, gamma) = (x.clone(), gamma.clone());
        let backward: BackwardFn<2> = Box::new(move |dy, needed| {
            let (xv, gv, dyv) = (values(&x), values(&gamma), values(&dy));
            let mut dx = zeros(n * d);
            // dgamma: per task partial sums, added up after.
            let partial: Vec<Vec<f32>> = dx
                .par_chunks_mut(ROWS * d)
                .enumerate()
                .map(|(c, dx)| {
                    let mut dg = vec![0f32; d];
                    for (i, dx_row) in dx.chunks_mut(d).enumerate() {
                        let row = c * ROWS + i;
                        let (x_row, dy_row) =
                            (&xv[row * d..(row + 1) * d], &dyv[row * d..(row + 1) * d]);
                        let r = inv[row];
                        // xhat = x r; dxhat = dy gamma; dx = r (dxhat - xhat mean(dxhat xhat)).
                        let mut dot = 0f32;
                        for j in 0..d {
                            let xhat = x_row[j] * r;
                            dg[j] += dy_row[j] * xhat;
                            dot += dy_row[j] * gv[j] * xhat;
                        }
                        let mean = dot / d as f32;
                        for j in 0..d {
                            dx_row[j] = r * (dy_row[j] * gv[j] - x_row[j] * r * mean);
                        }
                    }
                    dg
                })
                .collect();
            let mut dgamma = zeros(d);
            for dg in &partial {
                for (acc, v) in dgamma.iter_mut().zip(dg) {
                    *acc += v;
                }
            }
            [
                needed[0].then(|| tensor(dx, &[n, d])),
                needed[1].then(|| tensor(dgamma, &[d])),
            ]
        });
        (tensor(y, &[n, d]), backward)
    })
}
