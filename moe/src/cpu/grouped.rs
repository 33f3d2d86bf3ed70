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

use super::gemm::{Mat, PackedB, gemm, gemm_packed};
use super::{
    BackwardFn, FlexTensor, Fused, custom_op, dims, fused, prim, sigmoid, silu, tensor, values,
    zeros,
};
use crate::experts::SwiGlu;

/// Rows per task: small enough to balance the experts' uneven row counts over the cores,
/// large enough to keep the GEMM efficient (the weights are packed once per op, so a
/// block's only overhead is its share of the register-tile edges).
const ROW_BLOCK: usize = 128;

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
        let pieces = n.div_ceil(ROW_BLOCK);
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
    let weights = Stacked {
        gate: &values(wg),
        up: &values(wu),
        down: &values(wd),
        d,
        f,
    };
    let (y, g, u) = forward_raw(&values(x), &Packed::forward(&weights, rows), rows);
    let saved = (x.clone(), wg.clone(), wu.clone(), wd.clone(), rows.to_vec());
    let backward: BackwardFn<4> = Box::new(move |dy, needed| {
        let (x, wg, wu, wd, rows) = saved;
        let e_count = rows.len();
        let weights = Stacked {
            gate: &values(&wg),
            up: &values(&wu),
            down: &values(&wd),
            d,
            f,
        };
        let mut dx = needed[0].then(|| zeros(r * d));
        let mut dw: [Option<Vec<f32>>; 3] =
            [1, 2, 3].map(|i| needed[i].then(|| zeros(e_count * d * f)));
        let [dwg, dwu, dwd] = &mut dw;
        backward_raw(
            &values(&x),
            &weights,
            &rows,
            &g,
            &u,
            &values(&dy),
            dx.as_deref_mut(),
            [dwg.as_deref_mut(), dwu.as_deref_mut(), dwd.as_deref_mut()],
        );
        let [dwg, dwu, dwd] = dw;
        [
            dx.map(|v| tensor(v, &[r, d])),
            dwg.map(|v| tensor(v, &[e_count * d, f])),
            dwu.map(|v| tensor(v, &[e_count * d, f])),
            dwd.map(|v| tensor(v, &[e_count * f, d])),
        ]
    });
    (tensor(y, &[r, d]), backward)
}

/// Every expert's weights stacked along the first dimension: gate and up [E·D, F], down
/// [E·F, D] (expert `e` is block `e`).
pub struct Stacked<'a> {
    pub gate: &'a [f32],
    pub up: &'a [f32],
    pub down: &'a [f32],
    pub d: usize,
    pub f: usize,
}

/// Every expert's weights packed for the GEMM kernel, once per op (experts without rows
/// are skipped): the forward's gate [D, F], up [D, F], down [F, D], or the backward's
/// down^T [D, F], gate^T [F, D], up^T [F, D].
pub struct Packed {
    experts: Vec<Option<[PackedB; 3]>>,
    d: usize,
    f: usize,
}

impl Packed {
    pub fn forward(w: &Stacked, rows: &[usize]) -> Packed {
        Self::of(w, rows, false)
    }

    pub fn backward(w: &Stacked, rows: &[usize]) -> Packed {
        Self::of(w, rows, true)
    }

    fn of(w: &Stacked, rows: &[usize], transposed: bool) -> Packed {
        let (d, f) = (w.d, w.f);
        let experts = rows
            .par_iter()
            .enumerate()
            .map(|(e, &n)| {
                (n > 0).then(|| {
                    let (gate, up) = (weight(w.gate, e, d, f), weight(w.up, e, d, f));
                    let down = weight(w.down, e, f, d);
                    if transposed {
                        [down.t(), gate.t(), up.t()].map(PackedB::new)
                    } else {
                        [gate, up, down].map(PackedB::new)
                    }
                })
            })
            .collect();
        Packed { experts, d, f }
    }

    fn expert(&self, e: usize) -> &[PackedB; 3] {
        self.experts[e]
            .as_ref()
            .expect("packed weights for every expert with rows")
    }
}

/// The forward on raw buffers: x [R, D] grouped by expert (`rows[e]` rows of expert `e`,
/// zero allowed), weights from [`Packed::forward`] -> (y [R, D], g [R, F], u [R, F]); g
/// and u are what the backward needs.
pub fn forward_raw(xv: &[f32], w: &Packed, rows: &[usize]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (d, f) = (w.d, w.f);
    let r = rows.iter().sum::<usize>();
    debug_assert_eq!(xv.len(), r * d);
    let blocks = blocks(rows);
    let mut g = zeros(r * f);
    let mut u = zeros(r * f);
    let mut y = zeros(r * d);
    split_rows(&mut g, &blocks, f)
        .into_par_iter()
        .zip(split_rows(&mut u, &blocks, f))
        .zip(split_rows(&mut y, &blocks, d))
        .zip(blocks.par_iter())
        .for_each(|(((g_b, u_b), y_b), b)| {
            let x_b = Mat::new(&xv[b.start * d..(b.start + b.len) * d], b.len, d);
            let [gate, up, down] = w.expert(b.e);
            gemm_packed(x_b, gate, g_b, f, false);
            gemm_packed(x_b, up, u_b, f, false);
            let a_b: Vec<f32> = g_b
                .iter()
                .zip(u_b.iter())
                .map(|(&g, &u)| silu(g) * u)
                .collect();
            gemm_packed(Mat::new(&a_b, b.len, f), down, y_b, d, false);
        });
    (y, g, u)
}

/// The backward on raw buffers (`g`, `u` from [`forward_raw`]): writes dx [R, D] when
/// given and ADDS the weight gradients (stacked like the weights) into `dw` when given.
#[allow(clippy::too_many_arguments)]
pub fn backward_raw(
    xv: &[f32],
    w: &Stacked,
    rows: &[usize],
    g: &[f32],
    u: &[f32],
    dyv: &[f32],
    dx: Option<&mut [f32]>,
    dw: [Option<&mut [f32]>; 3],
) {
    let packed = Packed::backward(w, rows);
    let RowGrads { a, dg, du } = backward_rows(&packed, rows, g, u, dyv, dx);
    weight_grads(xv, w, rows, &a, &dg, &du, dyv, dw);
}

/// What the weight gradients need from the row pass: A = silu(G) U, dG and dU, [R, F] each.
pub struct RowGrads {
    pub a: Vec<f32>,
    pub dg: Vec<f32>,
    pub du: Vec<f32>,
}

/// The row part of the backward (weights from [`Packed::backward`]): dx [R, D] (when given)
/// and what the weight gradients need. Every row's results depend on that row alone, bit
/// for bit (the GEMM kernel's rounding does not depend on the number of rows in a call).
pub fn backward_rows(
    w: &Packed,
    rows: &[usize],
    g: &[f32],
    u: &[f32],
    dyv: &[f32],
    dx: Option<&mut [f32]>,
) -> RowGrads {
    let (d, f) = (w.d, w.f);
    let r = rows.iter().sum::<usize>();
    let blocks = blocks(rows);
    // Per row block: dA = dY Wd^T, then dG, dU (and A for dWd), then dX.
    let mut a = zeros(r * f);
    let mut dg = zeros(r * f);
    let mut du = zeros(r * f);
    let mut dx_scratch = Vec::new();
    let dx = match dx {
        Some(dx) => dx,
        None => {
            dx_scratch.resize(r * d, 0f32);
            &mut dx_scratch[..]
        }
    };
    split_rows(&mut a, &blocks, f)
        .into_par_iter()
        .zip(split_rows(&mut dg, &blocks, f))
        .zip(split_rows(&mut du, &blocks, f))
        .zip(split_rows(dx, &blocks, d))
        .zip(blocks.par_iter())
        .for_each(|((((a_b, dg_b), du_b), dx_b), b)| {
            let span = b.start * f..(b.start + b.len) * f;
            let [down_t, gate_t, up_t] = w.expert(b.e);
            let dy_b = Mat::new(&dyv[b.start * d..(b.start + b.len) * d], b.len, d);
            // dA lands in dg_b, then is turned into dG in place.
            gemm_packed(dy_b, down_t, dg_b, f, false);
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
            // dX = dG Wg^T + dU Wu^T.
            gemm_packed(Mat::new(dg_b, b.len, f), gate_t, dx_b, d, false);
            gemm_packed(Mat::new(du_b, b.len, f), up_t, dx_b, d, true);
        });
    RowGrads { a, dg, du }
}

/// The weight part of the backward: ADDS X^T dG, X^T dU, A^T dY of each expert (one GEMM
/// over all of its rows, stacked like the weights) into `dw` where given.
#[allow(clippy::too_many_arguments)]
pub fn weight_grads(
    xv: &[f32],
    w: &Stacked,
    rows: &[usize],
    a: &[f32],
    dg: &[f32],
    du: &[f32],
    dyv: &[f32],
    dw: [Option<&mut [f32]>; 3],
) {
    let (d, f) = (w.d, w.f);
    // Weight gradients: one task per (expert, weight): X^T dG, X^T dU, A^T dY, added in.
    let mut offsets = vec![0usize; rows.len() + 1];
    for e in 0..rows.len() {
        offsets[e + 1] = offsets[e] + rows[e];
    }
    // One task per (weight, expert, half of the gradient's rows), so that the experts'
    // uneven row counts balance over the cores (the halves' bits are those of one GEMM).
    let mut tasks: Vec<(usize, usize, usize, &mut [f32])> = Vec::with_capacity(6 * rows.len());
    for (which, buf) in dw.into_iter().enumerate() {
        let Some(buf) = buf else { continue };
        let width = if which == 2 { d } else { f };
        for (e, chunk) in buf.chunks_mut(d * f).enumerate() {
            if rows[e] == 0 {
                continue;
            }
            let half = (d * f / width).div_ceil(2) * width;
            let (top, bottom) = chunk.split_at_mut(half);
            tasks.push((which, e, 0, top));
            tasks.push((which, e, half / width, bottom));
        }
    }
    tasks.into_par_iter().for_each(|(which, e, r0, out)| {
        let (o, n) = (offsets[e], rows[e]);
        fn rows_of(v: &[f32], o: usize, n: usize, width: usize) -> Mat<'_> {
            Mat::new(&v[o * width..(o + n) * width], n, width)
        }
        // dW_gate = X^T dG, dW_up = X^T dU ([D, F]); dW_down = A^T dY ([F, D]).
        let (lhs_t, rhs, width) = match which {
            0 => (rows_of(xv, o, n, d), rows_of(dg, o, n, f), f),
            1 => (rows_of(xv, o, n, d), rows_of(du, o, n, f), f),
            _ => (rows_of(a, o, n, f), rows_of(dyv, o, n, d), d),
        };
        gemm(lhs_t.t().rows(r0, out.len() / width), rhs, out, width, true);
    });
}
