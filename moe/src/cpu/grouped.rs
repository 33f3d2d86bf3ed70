//! Grouped SwiGLU: every local expert in one op over the expert-sorted rows, forward and
//! backward (as Megatron-Core's grouped GEMM and MegaBlocks do on GPUs).
//!
//! The experts keep their own parameters (`experts.{id}.w_gate`, ...); the op takes them
//! stacked along the first dimension (a copy per forward, small next to the GEMMs), so the
//! stacking's backward hands each expert its own gradient block.
//!
//! Shape legend: R rows (grouped by expert), D model dim, F expert ffn dim, E experts in
//! the group, r rows of one expert.

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::gemm::{Mat, gemm};
use super::{
    BackwardFn, FlexTensor, Fused, custom_op, dims, fused, prim, sigmoid, silu, tensor, values,
};
use crate::experts::SwiGlu;

/// Row blocks per task: small enough to spread one expert over both cores, large enough
/// to keep the GEMM efficient.
const ROW_BLOCK: usize = 256;

/// x: [R, D], rows grouped by expert (`rows[i]` rows for `experts[i]`, in order) ->
/// [R, D] with `y_r = SwiGlu_e(x_r)`. Falls back to [`grouped_swiglu_reference`] off the
/// flex backend.
pub fn grouped_swiglu(x_rd: Tensor<2>, experts: &[&SwiGlu], rows: &[usize]) -> Tensor<2> {
    assert_eq!(experts.len(), rows.len(), "one row count per expert");
    let [r, _] = x_rd.dims();
    assert_eq!(
        rows.iter().sum::<usize>(),
        r,
        "row counts add up to the rows"
    );
    // Experts with no rows take no part (no gradient), as in the reference.
    let (experts, rows): (Vec<&SwiGlu>, Vec<usize>) = experts
        .iter()
        .zip(rows)
        .filter(|(_, n)| **n > 0)
        .map(|(e, &n)| (*e, n))
        .unzip();
    if experts.is_empty() {
        return x_rd;
    }
    // Off the flex backend, before stacking copies of the weights for nothing.
    if !fused(Fused::GroupedExperts) || prim(&x_rd).is_none() {
        return grouped_swiglu_reference(x_rd, &experts, &rows);
    }
    let stack =
        |w: fn(&SwiGlu) -> Tensor<2>| Tensor::cat(experts.iter().map(|e| w(e)).collect(), 0);
    let wg = stack(|e| e.w_gate.val());
    let wu = stack(|e| e.w_up.val());
    let wd = stack(|e| e.w_down.val());
    let inputs = [prim(&x_rd), prim(&wg), prim(&wu), prim(&wd)];
    if let [Some(x), Some(g), Some(u), Some(d)] = inputs
        && let Some(y) = custom_op([x, g, u, d], |[x, wg, wu, wd]| {
            forward(x, wg, wu, wd, &rows)
        })
    {
        return y;
    }
    grouped_swiglu_reference(x_rd, &experts, &rows)
}

/// The readable reference: one `SwiGlu::forward` per expert on its slice of rows.
pub fn grouped_swiglu_reference(x_rd: Tensor<2>, experts: &[&SwiGlu], rows: &[usize]) -> Tensor<2> {
    let [_, d] = x_rd.dims();
    let mut outputs = Vec::with_capacity(experts.len());
    let mut offset = 0;
    for (expert, &n) in experts.iter().zip(rows) {
        if n == 0 {
            continue;
        }
        outputs.push(expert.forward(x_rd.clone().slice([offset..offset + n, 0..d])));
        offset += n;
    }
    if outputs.is_empty() {
        return x_rd;
    }
    Tensor::cat(outputs, 0)
}

/// One task: rows `start..start + len` of expert `e` (global row indices).
#[derive(Clone, Copy)]
struct Block {
    e: usize,
    start: usize,
    len: usize,
}

fn blocks(rows: &[usize]) -> Vec<Block> {
    let mut out = Vec::new();
    let mut start = 0;
    for (e, &n) in rows.iter().enumerate() {
        let pieces = n.div_ceil(ROW_BLOCK).max(1);
        for p in 0..pieces {
            let (a, b) = (n * p / pieces, n * (p + 1) / pieces);
            out.push(Block {
                e,
                start: start + a,
                len: b - a,
            });
        }
        start += n;
    }
    out
}

/// Expert `e`'s `rows x cols` block of a stacked weight.
fn weight(stacked: &[f32], e: usize, rows: usize, cols: usize) -> Mat<'_> {
    Mat::new(&stacked[e * rows * cols..(e + 1) * rows * cols], rows, cols)
}

/// Splits `buf` (rows of `width`) into the blocks' disjoint row ranges.
fn split_rows<'a>(mut buf: &'a mut [f32], blocks: &[Block], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(blocks.len());
    for b in blocks {
        let (head, tail) = buf.split_at_mut(b.len * width);
        out.push(head);
        buf = tail;
    }
    out
}

fn forward(
    x: &FlexTensor,
    wg: &FlexTensor,
    wu: &FlexTensor,
    wd: &FlexTensor,
    rows: &[usize],
) -> (FlexTensor, BackwardFn<4>) {
    let (r, d) = (dims(x)[0], dims(x)[1]);
    let f = dims(wg)[1];
    let xv = values(x);
    let (wgv, wuv, wdv) = (values(wg), values(wu), values(wd));
    let blocks = blocks(rows);
    let mut g = vec![0f32; r * f];
    let mut u = vec![0f32; r * f];
    let mut y = vec![0f32; r * d];
    split_rows(&mut g, &blocks, f)
        .into_par_iter()
        .zip(split_rows(&mut u, &blocks, f))
        .zip(split_rows(&mut y, &blocks, d))
        .zip(blocks.par_iter())
        .for_each(|(((g_b, u_b), y_b), b)| {
            let x_b = Mat::new(&xv[b.start * d..(b.start + b.len) * d], b.len, d);
            let w = |v, rows_per, cols| weight(v, b.e, rows_per, cols);
            gemm(x_b, w(&wgv, d, f), g_b, f, false);
            gemm(x_b, w(&wuv, d, f), u_b, f, false);
            let a_b: Vec<f32> = g_b
                .iter()
                .zip(u_b.iter())
                .map(|(&g, &u)| silu(g) * u)
                .collect();
            gemm(Mat::new(&a_b, b.len, f), w(&wdv, f, d), y_b, d, false);
        });
    let saved = (x.clone(), wg.clone(), wu.clone(), wd.clone(), rows.to_vec());
    let backward: BackwardFn<4> = Box::new(move |dy, needed| {
        let (x, wg, wu, wd, rows) = saved;
        backward(&x, &wg, &wu, &wd, &rows, &g, &u, &dy, needed)
    });
    (tensor(y, &[r, d]), backward)
}

#[allow(clippy::too_many_arguments)]
fn backward(
    x: &FlexTensor,
    wg: &FlexTensor,
    wu: &FlexTensor,
    wd: &FlexTensor,
    rows: &[usize],
    g: &[f32],
    u: &[f32],
    dy: &FlexTensor,
    needed: [bool; 4],
) -> [Option<FlexTensor>; 4] {
    let (r, d) = (dims(x)[0], dims(x)[1]);
    let f = dims(wg)[1];
    let e_count = rows.len();
    let (xv, dyv) = (values(x), values(dy));
    let (wgv, wuv, wdv) = (values(wg), values(wu), values(wd));
    let blocks = blocks(rows);
    // Per row block: dA = dY Wd^T, then dG, dU (and A for dWd), then dX.
    let mut a = vec![0f32; r * f];
    let mut dg = vec![0f32; r * f];
    let mut du = vec![0f32; r * f];
    let mut dx = vec![0f32; r * d];
    split_rows(&mut a, &blocks, f)
        .into_par_iter()
        .zip(split_rows(&mut dg, &blocks, f))
        .zip(split_rows(&mut du, &blocks, f))
        .zip(split_rows(&mut dx, &blocks, d))
        .zip(blocks.par_iter())
        .for_each(|((((a_b, dg_b), du_b), dx_b), b)| {
            let span = b.start * f..(b.start + b.len) * f;
            let w = |v, rows_per, cols| weight(v, b.e, rows_per, cols);
            let dy_b = Mat::new(&dyv[b.start * d..(b.start + b.len) * d], b.len, d);
            // dA lands in dg_b, then is turned into dG in place.
            gemm(dy_b, w(&wdv, f, d).t(), dg_b, f, false);
            // With s = sigmoid(g): silu(g) = g s, silu'(g) = s (1 + g (1 - s)).
            let grads = a_b.iter_mut().zip(du_b.iter_mut()).zip(dg_b.iter_mut());
            for (((a, du), dg), (&gi, &ui)) in grads.zip(g[span.clone()].iter().zip(&u[span])) {
                let da = *dg;
                let s = sigmoid(gi);
                let act = gi * s;
                *a = act * ui;
                *du = da * act;
                *dg = da * ui * s * (1.0 + gi * (1.0 - s));
            }
            gemm(Mat::new(dg_b, b.len, f), w(&wgv, d, f).t(), dx_b, d, false);
            gemm(Mat::new(du_b, b.len, f), w(&wuv, d, f).t(), dx_b, d, true);
        });
    // Weight gradients: one task per (expert, weight): X^T dG, X^T dU, A^T dY.
    let mut offsets = vec![0usize; e_count + 1];
    for e in 0..e_count {
        offsets[e + 1] = offsets[e] + rows[e];
    }
    let mut dwg = vec![0f32; e_count * d * f];
    let mut dwu = vec![0f32; e_count * d * f];
    let mut dwd = vec![0f32; e_count * f * d];
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(3 * e_count);
    for (which, buf) in [&mut dwg, &mut dwu, &mut dwd].into_iter().enumerate() {
        if needed[which + 1] {
            for (e, chunk) in buf.chunks_mut(d * f).enumerate() {
                tasks.push((which, e, chunk));
            }
        }
    }
    tasks.into_par_iter().for_each(|(which, e, out)| {
        let (o, n) = (offsets[e], rows[e]);
        let x_e = Mat::new(&xv[o * d..(o + n) * d], n, d);
        match which {
            0 => gemm(
                x_e.t(),
                Mat::new(&dg[o * f..(o + n) * f], n, f),
                out,
                f,
                false,
            ),
            1 => gemm(
                x_e.t(),
                Mat::new(&du[o * f..(o + n) * f], n, f),
                out,
                f,
                false,
            ),
            _ => {
                let a_e = Mat::new(&a[o * f..(o + n) * f], n, f);
                gemm(
                    a_e.t(),
                    Mat::new(&dyv[o * d..(o + n) * d], n, d),
                    out,
                    d,
                    false,
                )
            }
        }
    });
    [
        needed[0].then(|| tensor(dx, &[r, d])),
        needed[1].then(|| tensor(dwg, &[e_count * d, f])),
        needed[2].then(|| tensor(dwu, &[e_count * d, f])),
        needed[3].then(|| tensor(dwd, &[e_count * f, d])),
    ]
}
