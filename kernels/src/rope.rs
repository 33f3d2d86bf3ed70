//! The split of a projection into attention heads, with the rotary position embedding of
//! queries and keys, as one op (and its inverse, the merge of the heads): burn's version is
//! a transposing copy plus a dozen full-size elementwise ops (slices, products, a cat) on
//! the calling thread, while the thread pool waits.
//!
//! Shape legend: B batch, S sequence, H heads, Dh head dim, D = H·Dh.

use std::sync::Arc;

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::{BackwardFn, Fused, custom_op, dims, fused, prim, tensor, values, zeros};

/// Rotation tables, `[S, Dh/2]` each: dimension i of a head pairs with i + Dh/2 and turns
/// by the angle whose cosine and sine are at `[s, i]` (rotate-half form).
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

/// x: [B, S, D] -> [B, H, S, Dh] (contiguous), rotated by `rope` when given. `None` off the
/// flex backend or when switched off.
pub fn split_heads(
    x_bsd: &Tensor<3>,
    heads: usize,
    rope: Option<&RopeTables>,
) -> Option<Tensor<4>> {
    if !fused(Fused::Heads) {
        return None;
    }
    let rope = rope.map(|r| Arc::new(r.clone()));
    custom_op([prim(x_bsd)?], move |[x]| {
        let shape = dims(x);
        let (b, s, d) = (shape[0], shape[1], shape[2]);
        let dh = d / heads;
        let y = split(&values(x), b, s, heads, dh, rope.as_deref(), 1.0);
        let backward: BackwardFn<1> = Box::new(move |dy, _| {
            let dx = merge(&values(&dy), b, s, heads, dh, rope.as_deref(), -1.0);
            [Some(tensor(dx, &[b, s, d]))]
        });
        (tensor(y, &[b, heads, s, dh]), backward)
    })
}

/// y: [B, H, S, Dh] -> [B, S, D] (the inverse of [`split_heads`] without rotation). `None`
/// off the flex backend or when switched off.
pub fn merge_heads(y_bhsd: &Tensor<4>) -> Option<Tensor<3>> {
    if !fused(Fused::Heads) {
        return None;
    }
    custom_op([prim(y_bhsd)?], |[y]| {
        let shape = dims(y);
        let (b, h, s, dh) = (shape[0], shape[1], shape[2], shape[3]);
        let x = merge(&values(y), b, s, h, dh, None, 1.0);
        let backward: BackwardFn<1> = Box::new(move |dx, _| {
            let dy = split(&values(&dx), b, s, h, dh, None, 1.0);
            [Some(tensor(dy, &[b, h, s, dh]))]
        });
        (tensor(x, &[b, s, h * dh]), backward)
    })
}

/// [B, S, H·Dh] -> [B, H, S, Dh], each head vector rotated by `sign` times its angle.
fn split(
    x: &[f32],
    b: usize,
    s: usize,
    h: usize,
    dh: usize,
    rope: Option<&RopeTables>,
    sign: f32,
) -> Vec<f32> {
    let d = h * dh;
    let mut y = zeros(b * h * s * dh);
    y.par_chunks_mut(s * dh).enumerate().for_each(|(bh, y)| {
        let (bi, hi) = (bh / h, bh % h);
        for (si, y_row) in y.chunks_mut(dh).enumerate() {
            let x_row = &x[(bi * s + si) * d + hi * dh..][..dh];
            rotate(x_row, y_row, rope, si, sign);
        }
    });
    y
}

/// [B, H, S, Dh] -> [B, S, H·Dh], each head vector rotated by `sign` times its angle.
fn merge(
    y: &[f32],
    b: usize,
    s: usize,
    h: usize,
    dh: usize,
    rope: Option<&RopeTables>,
    sign: f32,
) -> Vec<f32> {
    let d = h * dh;
    let mut x = zeros(b * s * d);
    x.par_chunks_mut(d).enumerate().for_each(|(bs, x_row)| {
        let (bi, si) = (bs / s, bs % s);
        for (hi, x_head) in x_row.chunks_mut(dh).enumerate() {
            let y_row = &y[((bi * h + hi) * s + si) * dh..][..dh];
            rotate(y_row, x_head, rope, si, sign);
        }
    });
    x
}

/// `out = R(sign * angle_s) src` for one head vector (a copy without tables).
#[inline(always)]
fn rotate(src: &[f32], out: &mut [f32], rope: Option<&RopeTables>, si: usize, sign: f32) {
    let Some(rope) = rope else {
        out.copy_from_slice(src);
        return;
    };
    let half = src.len() / 2;
    let cos = &rope.cos[si * half..(si + 1) * half];
    let sin = &rope.sin[si * half..(si + 1) * half];
    let (x1, x2) = src.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        let (c, s) = (cos[i], sign * sin[i]);
        o1[i] = x1[i] * c - x2[i] * s;
        o2[i] = x1[i] * s + x2[i] * c;
    }
}
