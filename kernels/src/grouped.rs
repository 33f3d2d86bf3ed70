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

use std::mem::MaybeUninit;

use crate::precision::matmul;

use super::gemm::{MR, Mat, PackedB, assume_init, gemm_packed, gemm_packed_into};
use super::{
    BackwardFn, FlexTensor, Fused, custom_op, dims, fused, prim, sigmoid, silu, tensor, values,
    wide,
};

/// The three weights of one SwiGLU expert, as the grouped op reads them (the model's
/// expert type implements it; the kernels know no model types).
pub trait SwiGluWeights {
    /// [D, F]
    fn w_gate(&self) -> Tensor<2>;
    /// [D, F]
    fn w_up(&self) -> Tensor<2>;
    /// [F, D]
    fn w_down(&self) -> Tensor<2>;
}

/// x: [N, D] -> `down(silu(x @ gate) * (x @ up))` [N, D] in burn ops, GEMMs at the forward
/// pass's precision (`crate::precision`): one expert, the reference of the grouped op.
pub fn swiglu<W: SwiGluWeights + ?Sized>(x_nd: Tensor<2>, w: &W) -> Tensor<2> {
    let gate_nf = burn::tensor::activation::silu(matmul(x_nd.clone(), w.w_gate()));
    let up_nf = matmul(x_nd, w.w_up());
    matmul(gate_nf * up_nf, w.w_down())
}

/// Rows per task: small enough to balance the experts' uneven row counts over the cores,
/// large enough to keep the GEMM efficient (the weights are packed once per op, so a
/// block's only overhead is its share of the register-tile edges).
const ROW_BLOCK: usize = 128;

/// x: [R, D], rows grouped by expert (`rows[i]` rows for `experts[i]`, in order) ->
/// [R, D] with `y_r = SwiGlu_e(x_r)`. Falls back to [`grouped_swiglu_reference`] off the
/// flex backend.
pub fn grouped_swiglu<W: SwiGluWeights>(
    x_rd: Tensor<2>,
    experts: &[&W],
    rows: &[usize],
) -> Tensor<2> {
    assert_eq!(experts.len(), rows.len(), "one row count per expert");
    let [r, _] = x_rd.dims();
    assert_eq!(
        rows.iter().sum::<usize>(),
        r,
        "row counts add up to the rows"
    );
    // Experts with no rows take no part (no gradient), as in the reference.
    let (experts, rows): (Vec<&W>, Vec<usize>) = experts
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
    let stack = |w: fn(&W) -> Tensor<2>| Tensor::cat(experts.iter().map(|e| w(e)).collect(), 0);
    let wg = stack(W::w_gate);
    let wu = stack(W::w_up);
    let wd = stack(W::w_down);
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

/// The readable reference: one [`swiglu`] per expert on its slice of rows.
pub fn grouped_swiglu_reference<W: SwiGluWeights>(
    x_rd: Tensor<2>,
    experts: &[&W],
    rows: &[usize],
) -> Tensor<2> {
    let [_, d] = x_rd.dims();
    let mut outputs = Vec::with_capacity(experts.len());
    let mut offset = 0;
    for (expert, &n) in experts.iter().zip(rows) {
        if n == 0 {
            continue;
        }
        outputs.push(swiglu(
            x_rd.clone().slice([offset..offset + n, 0..d]),
            *expert,
        ));
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
        // Inner boundaries on multiples of the kernel's tile height, so that only an
        // expert's last block has a partial (partly wasted) row tile.
        let boundary = |p: usize| {
            if p == pieces {
                n
            } else {
                n * p / pieces / MR * MR
            }
        };
        for p in 0..pieces {
            let (a, b) = (boundary(p), boundary(p + 1));
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
fn split_rows<'a, T>(mut buf: &'a mut [T], blocks: &[Block], width: usize) -> Vec<&'a mut [T]> {
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
        let [dx, dwg, dwu, dwd] =
            backward_raw(&values(&x), &weights, &rows, &g, &u, &values(&dy), needed);
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
    let (mut g, mut u, mut y) = (
        Vec::with_capacity(r * f),
        Vec::with_capacity(r * f),
        Vec::with_capacity(r * d),
    );
    split_rows(&mut g.spare_capacity_mut()[..r * f], &blocks, f)
        .into_par_iter()
        .zip(split_rows(&mut u.spare_capacity_mut()[..r * f], &blocks, f))
        .zip(split_rows(&mut y.spare_capacity_mut()[..r * d], &blocks, d))
        .zip(blocks.par_iter())
        .for_each(|(((g_b, u_b), y_b), b)| {
            let x_b = Mat::new(&xv[b.start * d..(b.start + b.len) * d], b.len, d);
            let [gate, up, down] = w.expert(b.e);
            let g_b = gemm_packed_into(x_b, gate, g_b);
            let u_b = gemm_packed_into(x_b, up, u_b);
            let mut a_b = Vec::with_capacity(b.len * f);
            wide(
                #[inline(always)]
                || {
                    let acts = a_b.spare_capacity_mut()[..b.len * f].iter_mut();
                    for (a, (&g, &u)) in acts.zip(g_b.iter().zip(u_b.iter())) {
                        a.write(silu(g) * u);
                    }
                },
            );
            // SAFETY: the loop wrote all b.len * f activations (g_b and u_b have as many).
            unsafe { a_b.set_len(b.len * f) };
            gemm_packed_into(Mat::new(&a_b, b.len, f), down, y_b);
        });
    // SAFETY: the blocks cover every row and each block of g, u and y was written whole.
    unsafe {
        g.set_len(r * f);
        u.set_len(r * f);
        y.set_len(r * d);
    }
    (y, g, u)
}

/// The backward on raw buffers (`g`, `u` from [`forward_raw`]): [dx [R, D], dWg, dWu, dWd]
/// (weight gradients stacked like the weights), each computed only where `needed`.
#[allow(clippy::too_many_arguments)]
pub fn backward_raw(
    xv: &[f32],
    w: &Stacked,
    rows: &[usize],
    g: &[f32],
    u: &[f32],
    dyv: &[f32],
    needed: [bool; 4],
) -> [Option<Vec<f32>>; 4] {
    let packed = Packed::backward(w, rows);
    let RowGrads { a, dg, du, dx } = backward_rows(&packed, rows, g, u, dyv, needed[0]);
    let [dwg, dwu, dwd] =
        weight_grads(xv, w, rows, &a, &dg, &du, dyv, [1, 2, 3].map(|i| needed[i]));
    [dx, dwg, dwu, dwd]
}

/// What the row pass gives: dX [R, D] (when asked for), and what the weight gradients need:
/// A = silu(G) U, dG and dU, [R, F] each.
pub struct RowGrads {
    pub a: Vec<f32>,
    pub dg: Vec<f32>,
    pub du: Vec<f32>,
    pub dx: Option<Vec<f32>>,
}

/// The row part of the backward (weights from [`Packed::backward`]). Every row's results
/// depend on that row alone, bit for bit (the GEMM kernel's rounding does not depend on the
/// number of rows in a call).
pub fn backward_rows(
    w: &Packed,
    rows: &[usize],
    g: &[f32],
    u: &[f32],
    dyv: &[f32],
    want_dx: bool,
) -> RowGrads {
    let (d, f) = (w.d, w.f);
    let r = rows.iter().sum::<usize>();
    let blocks = blocks(rows);
    // Per row block: dA = dY Wd^T, then dG, dU (and A for dWd), then dX.
    let (mut a, mut dg, mut du) = (
        Vec::with_capacity(r * f),
        Vec::with_capacity(r * f),
        Vec::with_capacity(r * f),
    );
    let mut dx = Vec::with_capacity(if want_dx { r * d } else { 0 });
    let dx_blocks: Vec<Option<&mut [MaybeUninit<f32>]>> = if want_dx {
        split_rows(&mut dx.spare_capacity_mut()[..r * d], &blocks, d)
            .into_iter()
            .map(Some)
            .collect()
    } else {
        blocks.iter().map(|_| None).collect()
    };
    split_rows(&mut a.spare_capacity_mut()[..r * f], &blocks, f)
        .into_par_iter()
        .zip(split_rows(
            &mut dg.spare_capacity_mut()[..r * f],
            &blocks,
            f,
        ))
        .zip(split_rows(
            &mut du.spare_capacity_mut()[..r * f],
            &blocks,
            f,
        ))
        .zip(dx_blocks)
        .zip(blocks.par_iter())
        .for_each(|((((a_b, dg_b), du_b), dx_b), b)| {
            let span = b.start * f..(b.start + b.len) * f;
            let [down_t, gate_t, up_t] = w.expert(b.e);
            let dy_b = Mat::new(&dyv[b.start * d..(b.start + b.len) * d], b.len, d);
            // dA lands in dg_b, then is turned into dG in place.
            let dg_b = gemm_packed_into(dy_b, down_t, dg_b);
            // With s = sigmoid(g): silu(g) = g s, silu'(g) = s (1 + g (1 - s)).
            let grads = a_b.iter_mut().zip(du_b.iter_mut()).zip(dg_b.iter_mut());
            wide(
                #[inline(always)]
                || {
                    for (((a, du), dg), (&gi, &ui)) in
                        grads.zip(g[span.clone()].iter().zip(&u[span]))
                    {
                        let da = *dg;
                        let s = sigmoid(gi);
                        let act = gi * s;
                        a.write(act * ui);
                        du.write(da * act);
                        *dg = da * ui * s * (1.0 + gi * (1.0 - s));
                    }
                },
            );
            // dX = dG Wg^T + dU Wu^T.
            if let Some(dx_b) = dx_b {
                let dx_b = gemm_packed_into(Mat::new(dg_b, b.len, f), gate_t, dx_b);
                // SAFETY: the loop above wrote every element of du_b.
                let du_b = unsafe { assume_init(du_b) };
                gemm_packed(Mat::new(du_b, b.len, f), up_t, dx_b, d, true);
            }
        });
    // SAFETY: the blocks cover every row; each block of a, dg, du (and dx when asked for)
    // was written whole.
    unsafe {
        a.set_len(r * f);
        dg.set_len(r * f);
        du.set_len(r * f);
        dx.set_len(if want_dx { r * d } else { 0 });
    }
    RowGrads {
        a,
        dg,
        du,
        dx: want_dx.then_some(dx),
    }
}

/// The weight part of the backward: X^T dG, X^T dU, A^T dY of each expert (one GEMM over
/// all of its rows), stacked like the weights, for each weight `needed` (experts without
/// rows get zeros).
#[allow(clippy::too_many_arguments)]
pub fn weight_grads(
    xv: &[f32],
    w: &Stacked,
    rows: &[usize],
    a: &[f32],
    dg: &[f32],
    du: &[f32],
    dyv: &[f32],
    needed: [bool; 3],
) -> [Option<Vec<f32>>; 3] {
    let (d, f) = (w.d, w.f);
    let len = rows.len() * d * f;
    let mut offsets = vec![0usize; rows.len() + 1];
    for e in 0..rows.len() {
        offsets[e + 1] = offsets[e] + rows[e];
    }
    let mut grads: [Vec<f32>; 3] = needed.map(|n| Vec::with_capacity(if n { len } else { 0 }));
    // One task per (weight, expert, half of the gradient's rows), so that the experts'
    // uneven row counts balance over the cores (the halves' bits are those of one GEMM).
    let mut tasks: Vec<(usize, usize, usize, &mut [MaybeUninit<f32>])> =
        Vec::with_capacity(6 * rows.len());
    for (which, buf) in grads.iter_mut().enumerate() {
        if !needed[which] {
            continue;
        }
        let width = if which == 2 { d } else { f };
        for (e, chunk) in buf.spare_capacity_mut()[..len]
            .chunks_mut(d * f)
            .enumerate()
        {
            let half = (d * f / width).div_ceil(2) * width;
            let (top, bottom) = chunk.split_at_mut(half);
            tasks.push((which, e, 0, top));
            tasks.push((which, e, half / width, bottom));
        }
    }
    fn rows_of(v: &[f32], o: usize, n: usize, width: usize) -> Mat<'_> {
        Mat::new(&v[o * width..(o + n) * width], n, width)
    }
    // dW_gate = X^T dG, dW_up = X^T dU ([D, F]); dW_down = A^T dY ([F, D]): the left factor
    // of (weight, expert) and its right one, packed once for both halves.
    let operands = |which: usize, e: usize| {
        let (o, n) = (offsets[e], rows[e]);
        match which {
            0 => (rows_of(xv, o, n, d), rows_of(dg, o, n, f)),
            1 => (rows_of(xv, o, n, d), rows_of(du, o, n, f)),
            _ => (rows_of(a, o, n, f), rows_of(dyv, o, n, d)),
        }
    };
    let packed: Vec<Option<PackedB>> = (0..3 * rows.len())
        .into_par_iter()
        .map(|i| {
            let (which, e) = (i / rows.len(), i % rows.len());
            (needed[which] && rows[e] > 0).then(|| PackedB::new(operands(which, e).1))
        })
        .collect();
    tasks.into_par_iter().for_each(|(which, e, r0, out)| {
        let Some(rhs) = &packed[which * rows.len() + e] else {
            // An expert without rows: a zero gradient.
            out.fill(MaybeUninit::new(0.0));
            return;
        };
        let width = if which == 2 { d } else { f };
        let lhs_t = operands(which, e).0;
        gemm_packed_into(lhs_t.t().rows(r0, out.len() / width), rhs, out);
    });
    // SAFETY: the tasks cover every expert's block of each needed gradient, written whole.
    for (buf, need) in grads.iter_mut().zip(needed) {
        unsafe { buf.set_len(if need { len } else { 0 }) };
    }
    let [dwg, dwu, dwd] = grads;
    [(needed[0], dwg), (needed[1], dwu), (needed[2], dwd)].map(|(n, v)| n.then_some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// The buffers are written without zeroing: an expert without rows still gets a zero
    /// gradient block (not whatever the allocator handed back), and the others the bits of
    /// the same op without that expert.
    #[test]
    fn an_expert_without_rows_gets_zero_weight_gradients() {
        let (d, f) = (4, 8);
        let (gate, up, down) = (
            filled(3 * d * f, 1),
            filled(3 * d * f, 2),
            filled(3 * f * d, 3),
        );
        let stacked = Stacked {
            gate: &gate,
            up: &up,
            down: &down,
            d,
            f,
        };
        let rows = [3, 0, 2];
        let x = filled(5 * d, 4);
        let dy = filled(5 * d, 5);
        let (_, g, u) = forward_raw(&x, &Packed::forward(&stacked, &rows), &rows);
        // Leave garbage in freed blocks of the gradients' size for the allocator to hand
        // back (glibc keeps up to 7 small freed blocks per size for reuse).
        drop(
            (0..8)
                .map(|_| vec![f32::NAN; 3 * d * f])
                .collect::<Vec<_>>(),
        );
        let with_gap = backward_raw(&x, &stacked, &rows, &g, &u, &dy, [true; 4]);

        let drop_expert_1 = |w: &[f32], rows_per_expert: usize| -> Vec<f32> {
            let block = rows_per_expert * w.len() / (3 * rows_per_expert);
            [&w[..block], &w[2 * block..]].concat()
        };
        let (gate2, up2, down2) = (
            drop_expert_1(&gate, d),
            drop_expert_1(&up, d),
            drop_expert_1(&down, f),
        );
        let without = Stacked {
            gate: &gate2,
            up: &up2,
            down: &down2,
            d,
            f,
        };
        let dense = backward_raw(&x, &without, &[3, 2], &g, &u, &dy, [true; 4]);

        assert_eq!(with_gap[0], dense[0], "dx");
        for i in 1..4 {
            let (gap, dense) = (with_gap[i].as_ref().unwrap(), dense[i].as_ref().unwrap());
            let block = d * f;
            assert_eq!(gap[..block], dense[..block], "weight {i}, expert 0");
            assert!(
                gap[block..2 * block].iter().all(|&v| v == 0.0),
                "weight {i}, expert 1"
            );
            assert_eq!(gap[2 * block..], dense[block..], "weight {i}, expert 2");
        }
        let none = backward_raw(&x, &stacked, &rows, &g, &u, &dy, [false; 4]);
        assert!(
            none.iter().all(Option::is_none),
            "nothing asked, nothing computed"
        );
    }
}
