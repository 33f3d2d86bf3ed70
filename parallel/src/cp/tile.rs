//! One tile of blockwise attention: queries of one block against keys/values of another,
//! forward (partial output + log-sum-exp), backward (FlashAttention-2 style, from the final
//! log-sum-exp), and the fp32 log-sum-exp merge of partial outputs. Pure math on the inner
//! (non-autodiff) device; the schedules in `ring` and `token_ring` decide what meets what.
//!
//! A tile is planned from global positions: with a causal mask only the queries that see
//! at least one key (a suffix of the block, since positions ascend inside a block) and the
//! keys seen by at least one query (a prefix) take part, and the mask is built only when
//! some pair inside that crop is masked. Zigzag blocks therefore give the balanced shapes
//! of zigzag ring attention without special cases: the own block is causal, a block of an
//! earlier rank meets every query with its first half, a block of a later rank meets the
//! second half of the queries only.
//!
//! Shape legend: B batch, H heads, Nq tile queries, Nk tile keys, Dh head dim.

use std::ops::Range;

use burn::tensor::activation::{log_sigmoid, sigmoid};
use burn::tensor::{Bool, Device, Tensor, TensorData};
use switchyard_comm::Buffer;

use crate::error::{ParallelError, Result};

/// The part of a (query block, key block) pair that interacts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TilePlan {
    /// Query rows (indices into the query block).
    pub rows: Range<usize>,
    /// Key columns (indices into the key block).
    pub cols: Range<usize>,
    /// Some pair inside rows x cols is masked.
    pub masked: bool,
}

/// `q_pos`, `k_pos`: ascending global positions of the two blocks. `None`: nothing to do.
pub fn plan(q_pos: &[usize], k_pos: &[usize], causal: bool) -> Option<TilePlan> {
    debug_assert!(q_pos.is_sorted() && k_pos.is_sorted());
    if q_pos.is_empty() || k_pos.is_empty() {
        return None;
    }
    if !causal {
        return Some(TilePlan {
            rows: 0..q_pos.len(),
            cols: 0..k_pos.len(),
            masked: false,
        });
    }
    let first_row = q_pos.iter().position(|&p| p >= k_pos[0])?;
    let last_q = *q_pos.last().expect("non-empty");
    let cols_end = k_pos.iter().rposition(|&p| p <= last_q)? + 1;
    Some(TilePlan {
        rows: first_row..q_pos.len(),
        cols: 0..cols_end,
        masked: k_pos[cols_end - 1] > q_pos[first_row],
    })
}

impl TilePlan {
    /// [1, 1, Nq, Nk], true where the key comes after the query; `None` when nothing is.
    pub fn mask(
        &self,
        q_pos: &[usize],
        k_pos: &[usize],
        device: &Device,
    ) -> Option<Tensor<4, Bool>> {
        if !self.masked {
            return None;
        }
        let (nq, nk) = (self.rows.len(), self.cols.len());
        let mut future = Vec::with_capacity(nq * nk);
        for &qp in &q_pos[self.rows.clone()] {
            future.extend(k_pos[self.cols.clone()].iter().map(|&kp| kp > qp));
        }
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(future, [nq, nk]), device);
        Some(mask.unsqueeze::<4>())
    }
}

/// Rows `rows` of a [B, H, N, X] tensor (dimension 2).
pub fn rows<const D: usize>(t: Tensor<D>, rows: Range<usize>) -> Tensor<D> {
    if rows.start == 0 && rows.end == t.dims()[2] {
        return t;
    }
    t.narrow(2, rows.start, rows.len())
}

/// `t[rows] += add` along dimension 2.
pub fn add_rows(t: Tensor<4>, rows: Range<usize>, add: Tensor<4>) -> Tensor<4> {
    let [b, h, n, x] = t.dims();
    if rows.start == 0 && rows.end == n {
        return t + add;
    }
    let current = t.clone().narrow(2, rows.start, rows.len());
    t.slice_assign([0..b, 0..h, rows, 0..x], current + add)
}

/// Attention of q [B, H, Nq, Dh] over k, v [B, H, Nk, Dh] -> (o [B, H, Nq, Dh],
/// lse [B, H, Nq, 1]). Every query must see at least one key (guaranteed by `plan`).
pub fn forward(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    scale: f64,
) -> (Tensor<4>, Tensor<4>) {
    let scores = q.matmul(k.swap_dims(2, 3)) * scale;
    let scores = match mask {
        Some(m) => scores.mask_fill(m, f32::NEG_INFINITY),
        None => scores,
    };
    let max = scores.clone().max_dim(3);
    let p = (scores - max.clone()).exp();
    let sum = p.clone().sum_dim(3);
    let o = p.matmul(v) / sum.clone();
    (o, max + sum.log())
}

/// Gradients of one tile, given the FINAL log-sum-exp of the queries' rows (so
/// `exp(scores - lse)` are the true attention probabilities) and
/// `delta = rowsum(dO * O)` [B, H, Nq, 1] of the final output. Returns (dq, dk, dv).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    d_out: Tensor<4>,
    lse: Tensor<4>,
    delta: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    scale: f64,
) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let scores = q.clone().matmul(k.clone().swap_dims(2, 3)) * scale;
    let scores = match mask {
        Some(m) => scores.mask_fill(m, f32::NEG_INFINITY),
        None => scores,
    };
    let p = (scores - lse).exp();
    let dv = p.clone().swap_dims(2, 3).matmul(d_out.clone());
    let dp = d_out.matmul(v.swap_dims(2, 3));
    let ds = p * (dp - delta);
    let dq = ds.clone().matmul(k) * scale;
    let dk = ds.swap_dims(2, 3).matmul(q) * scale;
    (dq, dk, dv)
}

/// The running (output, log-sum-exp) of a query block, merged in fp32.
#[derive(Debug, Clone)]
pub struct Merged {
    /// [B, H, N, Dh]
    pub o: Tensor<4>,
    /// [B, H, N, 1]
    pub lse: Tensor<4>,
}

impl Merged {
    /// Merges the partial (o_b, lse_b) of rows `rows`:
    /// `lse' = lse - logsigmoid(lse - lse_b)` (= log(e^lse + e^lse_b)) and
    /// `o' = o - sigmoid(lse_b - lse) * (o - o_b)`; the sigmoid forms never overflow.
    pub fn merge(&mut self, rows: Range<usize>, o_b: Tensor<4>, lse_b: Tensor<4>) {
        let o = self::rows(self.o.clone(), rows.clone());
        let lse = self::rows(self.lse.clone(), rows.clone());
        let new_lse = lse.clone() - log_sigmoid(lse.clone() - lse_b.clone());
        let new_o = o.clone() - sigmoid(lse_b - lse) * (o - o_b);
        let [b, h, n, dh] = self.o.dims();
        if rows.start == 0 && rows.end == n {
            self.o = new_o;
            self.lse = new_lse;
        } else {
            self.o = self
                .o
                .clone()
                .slice_assign([0..b, 0..h, rows.clone(), 0..dh], new_o);
            self.lse = self
                .lse
                .clone()
                .slice_assign([0..b, 0..h, rows, 0..1], new_lse);
        }
    }
}

/// Concatenates f32 tensors into one message.
pub fn pack(parts: &[Tensor<4>]) -> Result<Buffer> {
    let mut out = Vec::with_capacity(parts.iter().map(|t| t.shape().num_elements()).sum());
    for t in parts {
        let values = t
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| ParallelError::Shape {
                what: "context parallelism: packing a block".into(),
                detail: format!("cannot read the tensor as f32: {e:?}"),
            })?;
        out.extend_from_slice(&values);
    }
    Ok(Buffer::F32(out))
}

/// An empty receive buffer for tensors of `shapes`.
pub fn recv_buffer(shapes: &[[usize; 4]]) -> Buffer {
    Buffer::F32(vec![
        0.0;
        shapes.iter().map(|s| s.iter().product::<usize>()).sum()
    ])
}

/// Splits a message made by `pack` back into tensors of `shapes` on `device`.
pub fn unpack(buf: Buffer, shapes: &[[usize; 4]], device: &Device) -> Result<Vec<Tensor<4>>> {
    let dtype = buf.dtype();
    let values = buf.into_vec::<f32>().map_err(|_| ParallelError::Shape {
        what: "context parallelism: unpacking a block".into(),
        detail: format!("the message holds {dtype} elements; f32 is expected"),
    })?;
    let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    if values.len() != total {
        return Err(ParallelError::Shape {
            what: "context parallelism: unpacking a block".into(),
            detail: format!(
                "the message holds {} elements, {shapes:?} need {total}",
                values.len()
            ),
        });
    }
    let mut at = 0;
    Ok(shapes
        .iter()
        .map(|&shape| {
            let n: usize = shape.iter().product();
            let t =
                Tensor::<4>::from_data(TensorData::new(values[at..at + n].to_vec(), shape), device);
            at += n;
            t
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    /// Two partials with lse ~ 1000 (exp overflows fp32 beyond 88): the merged lse is
    /// log(e^a + e^b) and the output the e^lse-weighted mean, computed here in f64.
    #[test]
    fn merge_is_exact_where_exp_overflows() {
        let device = Device::flex();
        let t = |v: Vec<f32>, n: usize, d: usize| {
            Tensor::<4>::from_data(TensorData::new(v, [1, 1, n, d]), &device)
        };
        let (a, b) = ([1000.0f32, -3.0], [1000.5f32, 40.0]);
        let (oa, ob) = ([1.0f32, -2.0, 0.5, 4.0], [3.0f32, 1.0, -1.5, 2.0]);
        let mut merged = Merged {
            o: t(oa.to_vec(), 2, 2),
            lse: t(a.to_vec(), 2, 1),
        };
        merged.merge(0..2, t(ob.to_vec(), 2, 2), t(b.to_vec(), 2, 1));
        let (o, lse) = (values(merged.o), values(merged.lse));
        for row in 0..2 {
            let (la, lb) = (a[row] as f64, b[row] as f64);
            let m = la.max(lb);
            let want_lse = m + ((la - m).exp() + (lb - m).exp()).ln();
            assert!(
                (lse[row] as f64 - want_lse).abs() <= 1e-5 * want_lse.abs(),
                "{lse:?}"
            );
            let (wa, wb) = ((la - want_lse).exp(), (lb - want_lse).exp());
            for col in 0..2 {
                let i = row * 2 + col;
                let want = wa * oa[i] as f64 + wb * ob[i] as f64;
                assert!((o[i] as f64 - want).abs() <= 1e-6, "{o:?} vs {want}");
            }
        }
    }

    /// Merging rows 1..2 only leaves row 0 untouched.
    #[test]
    fn merge_of_a_row_range_touches_only_those_rows() {
        let device = Device::flex();
        let o = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 2, 2]),
            &device,
        );
        let lse = Tensor::<4>::from_data(TensorData::new(vec![0.0f32, 0.0], [1, 1, 2, 1]), &device);
        let mut merged = Merged { o, lse };
        let o_b = Tensor::<4>::from_data(TensorData::new(vec![5.0f32, 6.0], [1, 1, 1, 2]), &device);
        let lse_b = Tensor::<4>::from_data(TensorData::new(vec![0.0f32], [1, 1, 1, 1]), &device);
        merged.merge(1..2, o_b, lse_b);
        assert_eq!(values(merged.o), vec![1.0, 2.0, 4.0, 5.0]);
        let lse = values(merged.lse);
        assert_eq!(lse[0], 0.0);
        assert!((lse[1] - std::f32::consts::LN_2).abs() < 1e-6);
    }

    #[test]
    fn zigzag_tiles_have_the_balanced_shapes() {
        // W = 2, chunk 2: rank 0 holds positions 0,1,6,7; rank 1 holds 2,3,4,5.
        let r0 = [0, 1, 6, 7];
        let r1 = [2, 3, 4, 5];
        // Own block: causal over all rows and columns.
        assert_eq!(
            plan(&r0, &r0, true),
            Some(TilePlan {
                rows: 0..4,
                cols: 0..4,
                masked: true
            })
        );
        // Earlier rank's block: every query, first half of the keys, no mask.
        assert_eq!(
            plan(&r1, &r0, true),
            Some(TilePlan {
                rows: 0..4,
                cols: 0..2,
                masked: false
            })
        );
        // Later rank's block: second half of the queries, every key, no mask.
        assert_eq!(
            plan(&r0, &r1, true),
            Some(TilePlan {
                rows: 2..4,
                cols: 0..4,
                masked: false
            })
        );
        // Contiguous: a later block is invisible.
        assert_eq!(plan(&[0, 1], &[2, 3], true), None);
        assert_eq!(
            plan(&[0, 1], &[2, 3], false),
            Some(TilePlan {
                rows: 0..2,
                cols: 0..2,
                masked: false
            })
        );
    }
}
