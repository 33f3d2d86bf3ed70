//! Causal attention core as one op: per (batch, head), in parallel, `softmax(q k^T *
//! scale + causal mask) v` with the probabilities kept for the backward pass (S x S per
//! head: small at these lengths, and it saves recomputing them).
//!
//! Shape legend: B batch, H heads, S sequence, Dh head dim.

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::gemm::{Mat, gemm};
use super::{BackwardFn, Fused, custom_op, dims, exp, fused, prim, sum, tensor, values, zeros};

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
                gemm(Mat::new(q, s, dh), Mat::new(k, s, dh).t(), p, s, false);
                for (row, p_row) in p.chunks_mut(s).enumerate() {
                    let live = &mut p_row[..=row];
                    let max = live.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
                    for x in live.iter_mut() {
                        *x = exp((*x - max) * scale);
                    }
                    let inv = 1.0 / sum(live);
                    live.iter_mut().for_each(|x| *x *= inv);
                    p_row[row + 1..].fill(0.0);
                }
                gemm(Mat::new(p, s, s), Mat::new(v, s, dh), o, dh, false);
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
                    let d_o = Mat::new(&dov[span], s, dh);
                    let p = &p[i * s * s..(i + 1) * s * s];
                    // dV = P^T dO; dP = dO V^T; dS = P (dP - rowsum(dP P)) * scale.
                    gemm(Mat::new(p, s, s).t(), d_o, dv, dh, false);
                    let mut ds = vec![0f32; s * s];
                    gemm(d_o, Mat::new(v, s, dh).t(), &mut ds, s, false);
                    for (row, (ds_row, p_row)) in ds.chunks_mut(s).zip(p.chunks(s)).enumerate() {
                        let live = ..=row;
                        let dot: f32 = ds_row[live]
                            .iter()
                            .zip(&p_row[live])
                            .map(|(a, b)| a * b)
                            .sum();
                        for (x, &pi) in ds_row[live].iter_mut().zip(&p_row[live]) {
                            *x = pi * (*x - dot) * scale;
                        }
                        ds_row[row + 1..].fill(0.0);
                    }
                    // dQ = dS K; dK = dS^T Q.
                    gemm(Mat::new(&ds, s, s), Mat::new(k, s, dh), dq, dh, false);
                    gemm(Mat::new(&ds, s, s).t(), Mat::new(q, s, dh), dk, dh, false);
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
