//! Causal attention core as one op: per (batch, head), in parallel, `softmax(q k^T *
//! scale + causal mask) v` with the probabilities kept for the backward pass (S x S per
//! head: small at these lengths, and it saves recomputing them).
//!
//! Shape legend: B batch, H heads, S sequence, Dh head dim.

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::gemm::{Mat, gemm};
use super::{
    BackwardFn, Fused, custom_op, dims, exp, fused, prim, sum, tensor, values, wide, zeros,
};

/// Query rows per block of the causal loops: the key range of a block ends at its last
/// row, so blocks skip most of the zero upper triangle while staying large enough for an
/// efficient GEMM.
const BLOCK: usize = 64;

/// `(first, end)` rows of each block of `s` rows.
fn row_blocks(s: usize) -> Vec<(usize, usize)> {
    (0..s)
        .step_by(BLOCK)
        .map(|r0| (r0, (r0 + BLOCK).min(s)))
        .collect()
}

/// q, k, v: [B, H, S, Dh] -> [B, H, S, Dh]. `None` off the flex backend or when switched off.
pub fn causal_attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> Option<Tensor<4>> {
    if !fused(Fused::Attention) {
        return None;
    }
    custom_op([prim(q)?, prim(k)?, prim(v)?], |[q, k, v]| {
        let shape = dims(q);
        let (b, h, s, dh) = (shape[0], shape[1], shape[2], shape[3]);
        let scale = 1.0 / (dh as f32).sqrt();
        let (qv, kv, vv) = (values(q), values(k), values(v));
        let head = s * dh;
        let mut p = zeros(b * h * s * s);
        let mut o = zeros(b * h * head);
        p.par_chunks_mut(s * s)
            .zip(o.par_chunks_mut(head))
            .enumerate()
            .for_each(|(i, (p, o))| {
                let span = i * head..(i + 1) * head;
                let (q, k, v) = (&qv[span.clone()], &kv[span.clone()], &vv[span]);
                // Query rows r0..r1 see keys 0..r1 only: the blocks above the diagonal
                // are never computed (they stay zero).
                for (r0, r1) in row_blocks(s) {
                    let rows = r1 - r0;
                    let q_b = Mat::new(&q[r0 * dh..r1 * dh], rows, dh);
                    let p_b = &mut p[r0 * s..r1 * s];
                    gemm(q_b, Mat::new(&k[..r1 * dh], r1, dh).t(), p_b, s, false);
                    wide(
                        #[inline(always)]
                        || {
                            for (row, p_row) in (r0..r1).zip(p_b.chunks_mut(s)) {
                                let live = &mut p_row[..=row];
                                let max = live.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
                                for x in live.iter_mut() {
                                    *x = exp((*x - max) * scale);
                                }
                                let inv = 1.0 / sum(live);
                                live.iter_mut().for_each(|x| *x *= inv);
                                p_row[row + 1..r1].fill(0.0);
                            }
                        },
                    );
                    let p_b = Mat::with_ld(&p[r0 * s..], rows, r1, s);
                    let o_b = &mut o[r0 * dh..r1 * dh];
                    gemm(p_b, Mat::new(&v[..r1 * dh], r1, dh), o_b, dh, false);
                }
            });
        let (q, k, v) = (q.clone(), k.clone(), v.clone());
        let backward: BackwardFn<3> = Box::new(move |d_out, _| {
            let (qv, kv, vv, dov) = (values(&q), values(&k), values(&v), values(&d_out));
            let mut dq = zeros(b * h * head);
            let mut dk = zeros(b * h * head);
            let mut dvv = zeros(b * h * head);
            dq.par_chunks_mut(head)
                .zip(dk.par_chunks_mut(head))
                .zip(dvv.par_chunks_mut(head))
                .enumerate()
                .for_each(|(i, ((dq, dk), dv))| {
                    let span = i * head..(i + 1) * head;
                    let (q, k, v) = (&qv[span.clone()], &kv[span.clone()], &vv[span.clone()]);
                    let d_o = &dov[span];
                    let p = &p[i * s * s..(i + 1) * s * s];
                    // dV = P^T dO; dP = dO V^T; dS = P (dP - rowsum(dP P)) * scale; dQ = dS K;
                    // dK = dS^T Q; over the blocks on and below the diagonal (P and dS
                    // are zero above it).
                    let blocks = row_blocks(s);
                    let mut ds = vec![0f32; s * s];
                    for &(r0, r1) in &blocks {
                        // Rows r0..r1 of dP over columns 0..r1.
                        let d_o = Mat::new(&d_o[r0 * dh..r1 * dh], r1 - r0, dh);
                        let ds_b = &mut ds[r0 * s..r1 * s];
                        gemm(d_o, Mat::new(&v[..r1 * dh], r1, dh).t(), ds_b, s, false);
                        let p_b = &p[r0 * s..r1 * s];
                        wide(
                            #[inline(always)]
                            || {
                                for (row, (ds_row, p_row)) in
                                    (r0..r1).zip(ds_b.chunks_mut(s).zip(p_b.chunks(s)))
                                {
                                    let live = ..=row;
                                    let dot: f32 = ds_row[live]
                                        .iter()
                                        .zip(&p_row[live])
                                        .map(|(a, b)| a * b)
                                        .sum();
                                    for (x, &pi) in ds_row[live].iter_mut().zip(&p_row[live]) {
                                        *x = pi * (*x - dot) * scale;
                                    }
                                    ds_row[row + 1..r1].fill(0.0);
                                }
                            },
                        );
                        let ds_b = Mat::with_ld(&ds[r0 * s..], r1 - r0, r1, s);
                        gemm(
                            ds_b,
                            Mat::new(&k[..r1 * dh], r1, dh),
                            &mut dq[r0 * dh..r1 * dh],
                            dh,
                            false,
                        );
                    }
                    // Key columns c0..c1 get gradient from query rows c0..S only.
                    for &(c0, c1) in &blocks {
                        let rows = s - c0;
                        let d_o = Mat::new(&d_o[c0 * dh..], rows, dh);
                        let p_b = Mat::with_ld(&p[c0 * s + c0..], rows, c1 - c0, s).t();
                        gemm(p_b, d_o, &mut dv[c0 * dh..c1 * dh], dh, false);
                        let ds_b = Mat::with_ld(&ds[c0 * s + c0..], rows, c1 - c0, s).t();
                        let q_b = Mat::new(&q[c0 * dh..], rows, dh);
                        gemm(ds_b, q_b, &mut dk[c0 * dh..c1 * dh], dh, false);
                    }
                });
            let shape = [b, h, s, dh];
            [
                Some(tensor(dq, &shape)),
                Some(tensor(dk, &shape)),
                Some(tensor(dvv, &shape)),
            ]
        });
        (tensor(o, &[b, h, s, dh]), backward)
    })
}
