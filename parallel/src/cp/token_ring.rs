//! TokenRing (Wang et al., arXiv 2412.20501; ACA-Lab-SJTU/token-ring, zigzag variant).
//!
//! Key/value blocks stay where they are; query blocks travel to `r - 1`, and each partial
//! result goes straight back to the owner of its queries, so the two directions of the
//! links carry data at the same time.
//!
//! Forward, rank `r` of `W`: at step `s` it holds the query block of owner `i = r + s`. It
//! posts the send of that block to `r - 1` and the receive of the next one from `r + 1`,
//! computes the tile of those queries against its own keys/values, and sends the partial
//! (output, lse) to `i`. Meanwhile it receives the partials of its own queries (the one
//! from step `s` comes from rank `r - s`) and merges them in step order, one step late so
//! each had a whole step of compute to arrive. Only the query rows that some later holder
//! still needs travel: under a causal zigzag layout, once the block has passed the ranks
//! that hold earlier chunks, only its second half moves on (the reference code's half-Q
//! optimisation, here derived from the tile plans).
//!
//! Backward (the reference code has none; designed here as the mirror of the forward):
//! the query blocks travel the same way again, each with its output gradient, its final
//! log-sum-exp and `delta = rowsum(dO * O)`, which is all a remote rank needs to compute
//! the tile's gradients exactly. The dK/dV of a tile belong to the rank's own keys and
//! values, so they accumulate locally and never travel; the dQ partial goes straight back
//! to the query's owner, which adds the partials in step order. Per step a rank sends one
//! query payload (q, dO, lse, delta) one way and one dQ partial the other way.
//!
//! Shape legend: B batch, H heads, N local tokens, M travelling query rows, Dh head dim.

use std::ops::Range;

use burn::tensor::Tensor;

use super::CpAttention;
use super::saved::Saved;
use super::tile::{self, Merged, add_rows, plan, rows};
use super::transfer::{self, Incoming, Outgoing};
use crate::error::Result;

const TAG_Q: u32 = 0x5130;
const TAG_OUT: u32 = 0x4f30;
const TAG_QB: u32 = 0x5131;
const TAG_DQ: u32 = 0x6451;

/// Names a message in errors.
fn what(attn: &CpAttention, message: &str) -> String {
    format!("TokenRing on `{}`: {message}", attn.comm.name())
}

/// Which rank holds which query block when, and which rows of it are needed.
struct Route<'a> {
    attn: &'a CpAttention,
    w: usize,
    r: usize,
    n: usize,
}

impl Route<'_> {
    fn q_pos(&self, owner: usize) -> Vec<usize> {
        self.attn.layout.positions(owner, self.n)
    }

    /// Positions of rank `rank`'s keys.
    fn k_pos(&self, rank: usize) -> Vec<usize> {
        self.attn.layout.positions(rank, self.n)
    }

    /// First row of `owner`'s query block that a holder at step `from..W` needs (the holder
    /// at step `t` is `owner - t`); `None` when none needs any.
    fn needed_from(&self, owner: usize, from: usize) -> Option<usize> {
        let q_pos = self.q_pos(owner);
        (from..self.w)
            .filter_map(|t| {
                let holder = (owner + self.w - t) % self.w;
                plan(&q_pos, &self.k_pos(holder), self.attn.causal).map(|p| p.rows.start)
            })
            .min()
    }

    /// Rows of this rank's own queries in the partial computed at step `s` (by `r - s`).
    fn own_partial_rows(&self, s: usize) -> Option<Range<usize>> {
        let src = (self.r + self.w - s) % self.w;
        plan(&self.q_pos(self.r), &self.k_pos(src), self.attn.causal).map(|p| p.rows)
    }
}

/// A travelling query block: rows `start..N` of its owner's block, as several tensors
/// ([B, H, M, X] each: q forward; q, dO, lse, delta backward).
struct Held {
    start: usize,
    parts: Vec<Tensor<4>>,
}

impl Held {
    /// Rows `range` (indices into the owner's block) of every part.
    fn rows(&self, range: Range<usize>) -> Vec<Tensor<4>> {
        let local = range.start - self.start..range.end - self.start;
        self.parts
            .iter()
            .map(|t| rows(t.clone(), local.clone()))
            .collect()
    }
}

/// The query exchange of one step: rows of the held block to `r - 1`, the next block from
/// `r + 1`.
struct QueryExchange {
    recv: Option<(usize, Incoming)>,
    send: Option<Outgoing>,
}

impl QueryExchange {
    /// `widths`: the last dimension of each part; `tag`: the stream; `like`: a tensor on
    /// the device the block lands on.
    fn post(
        route: &Route,
        s: usize,
        held: Option<&Held>,
        shape_bh: [usize; 2],
        widths: &[usize],
        tag: u32,
        like: &Tensor<4>,
    ) -> Result<QueryExchange> {
        let Route { attn, w, r, n } = *route;
        let [b, h] = shape_bh;
        let shapes =
            |m: usize| -> Vec<[usize; 4]> { widths.iter().map(|&x| [b, h, m, x]).collect() };
        let recv = match route.needed_from((r + s + 1) % w, s + 1) {
            None => None,
            Some(start) => {
                let incoming = transfer::recv(
                    attn,
                    shapes(n - start),
                    (r + 1) % w,
                    tag,
                    like,
                    what(attn, "receive of a query block"),
                )?;
                Some((start, incoming))
            }
        };
        let send = match route.needed_from((r + s) % w, s + 1) {
            None => None,
            Some(start) => {
                let held = held.expect("a block someone still needs was received");
                Some(transfer::send(
                    attn,
                    &held.rows(start..n),
                    (r + w - 1) % w,
                    tag,
                    what(attn, "send of a query block"),
                )?)
            }
        };
        Ok(QueryExchange { recv, send })
    }

    fn finish(self) -> Result<Option<Held>> {
        if let Some(send) = self.send {
            send.wait()?;
        }
        let Some((start, recv)) = self.recv else {
            return Ok(None);
        };
        Ok(Some(Held {
            start,
            parts: recv.wait()?,
        }))
    }
}

/// Waits for a send, if any.
fn wait_send(send: Option<Outgoing>) -> Result<()> {
    send.map_or(Ok(()), Outgoing::wait)
}

/// q, k, v [B, H, N, Dh] of this rank -> its output and everything the backward needs.
pub fn forward(attn: &CpAttention, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Result<Saved> {
    let (w, r) = (attn.comm.size(), attn.comm.rank());
    let [b, h, n, dh] = q.dims();
    let scale = 1.0 / (dh as f64).sqrt();
    let device = q.device();
    let route = Route { attn, w, r, n };
    let k_pos = route.k_pos(r);
    let widths = [dh];
    let mut held = Some(Held {
        start: 0,
        parts: vec![q.clone()],
    });
    let mut merged: Option<Merged> = None;
    // The receive of the partial of the previous step, merged after this step's compute.
    let mut pending: Option<(Range<usize>, Incoming)> = None;
    let mut out_send: Option<Outgoing> = None;
    for s in 0..w {
        let owner = (r + s) % w;
        let exchange = (s + 1 < w)
            .then(|| QueryExchange::post(&route, s, held.as_ref(), [b, h], &widths, TAG_Q, &q))
            .transpose()?;
        let incoming = match (s > 0).then(|| route.own_partial_rows(s)).flatten() {
            None => None,
            Some(rows) => {
                let m = rows.len();
                let incoming = transfer::recv(
                    attn,
                    vec![[b, h, m, dh], [b, h, m, 1]],
                    (r + w - s) % w,
                    TAG_OUT,
                    &q,
                    what(attn, "receive of a partial output"),
                )?;
                Some((rows, incoming))
            }
        };
        let q_pos = route.q_pos(owner);
        if let Some(t) = plan(&q_pos, &k_pos, attn.causal) {
            let held = held
                .as_ref()
                .expect("the block of a planned tile was received");
            let [q_t] = <[Tensor<4>; 1]>::try_from(held.rows(t.rows.clone())).expect("one part");
            let (o_b, lse_b) = tile::forward(
                q_t,
                rows(k.clone(), t.cols.clone()),
                rows(v.clone(), t.cols.clone()),
                t.mask(&q_pos, &k_pos, &device),
                scale,
            );
            if s == 0 {
                debug_assert_eq!(t.rows, 0..n);
                merged = Some(Merged { o: o_b, lse: lse_b });
            } else {
                wait_send(out_send.take())?;
                out_send = Some(transfer::send(
                    attn,
                    &[o_b, lse_b],
                    owner,
                    TAG_OUT,
                    what(attn, "send of a partial output"),
                )?);
            }
        }
        let merged = merged.as_mut().expect("step 0 attends the own block");
        if let Some((rows, incoming)) = pending.take() {
            merge_partial(merged, rows, incoming)?;
        }
        pending = incoming;
        if let Some(exchange) = exchange {
            held = exchange.finish()?;
        }
    }
    let mut merged = merged.expect("step 0 attends the own block");
    if let Some((rows, incoming)) = pending.take() {
        merge_partial(&mut merged, rows, incoming)?;
    }
    wait_send(out_send)?;
    let Merged { o, lse } = merged;
    Ok(Saved { q, k, v, o, lse })
}

fn merge_partial(merged: &mut Merged, rows: Range<usize>, incoming: Incoming) -> Result<()> {
    let mut parts = incoming.wait()?.into_iter();
    merged.merge(rows, parts.next().expect("o"), parts.next().expect("lse"));
    Ok(())
}

/// Output gradient [B, H, N, Dh] -> (dq, dk, dv) of this rank's q, k, v.
pub fn backward(
    attn: &CpAttention,
    saved: &Saved,
    d_out: Tensor<4>,
) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
    let (w, r) = (attn.comm.size(), attn.comm.rank());
    let Saved { q, k, v, o, lse } = saved;
    let [b, h, n, dh] = q.dims();
    let scale = 1.0 / (dh as f64).sqrt();
    let device = q.device();
    let route = Route { attn, w, r, n };
    let k_pos = route.k_pos(r);
    let delta = (d_out.clone() * o.clone()).sum_dim(3);
    // The travelling payload: q, dO, lse, delta.
    let widths = [dh, dh, 1, 1];
    let mut held = Some(Held {
        start: 0,
        parts: vec![q.clone(), d_out, lse.clone(), delta],
    });
    let (mut dq, mut dk, mut dv) = (q.zeros_like(), k.zeros_like(), v.zeros_like());
    let mut pending: Option<(Range<usize>, Incoming)> = None;
    let mut dq_send: Option<Outgoing> = None;
    for s in 0..w {
        let owner = (r + s) % w;
        let exchange = (s + 1 < w)
            .then(|| QueryExchange::post(&route, s, held.as_ref(), [b, h], &widths, TAG_QB, q))
            .transpose()?;
        let incoming = match (s > 0).then(|| route.own_partial_rows(s)).flatten() {
            None => None,
            Some(rows) => {
                let incoming = transfer::recv(
                    attn,
                    vec![[b, h, rows.len(), dh]],
                    (r + w - s) % w,
                    TAG_DQ,
                    q,
                    what(attn, "receive of a dQ partial"),
                )?;
                Some((rows, incoming))
            }
        };
        let q_pos = route.q_pos(owner);
        if let Some(t) = plan(&q_pos, &k_pos, attn.causal) {
            let held = held
                .as_ref()
                .expect("the block of a planned tile was received");
            let [q_t, do_t, lse_t, delta_t] =
                <[Tensor<4>; 4]>::try_from(held.rows(t.rows.clone())).expect("four parts");
            let (dq_t, dk_t, dv_t) = tile::backward(
                q_t,
                rows(k.clone(), t.cols.clone()),
                rows(v.clone(), t.cols.clone()),
                do_t,
                lse_t,
                delta_t,
                t.mask(&q_pos, &k_pos, &device),
                scale,
            );
            dk = add_rows(dk, t.cols.clone(), dk_t);
            dv = add_rows(dv, t.cols, dv_t);
            if s == 0 {
                dq = add_rows(dq, t.rows, dq_t);
            } else {
                wait_send(dq_send.take())?;
                dq_send = Some(transfer::send(
                    attn,
                    &[dq_t],
                    owner,
                    TAG_DQ,
                    what(attn, "send of a dQ partial"),
                )?);
            }
        }
        if let Some((rows, incoming)) = pending.take() {
            dq = add_dq_partial(dq, rows, incoming)?;
        }
        pending = incoming;
        if let Some(exchange) = exchange {
            held = exchange.finish()?;
        }
    }
    if let Some((rows, incoming)) = pending.take() {
        dq = add_dq_partial(dq, rows, incoming)?;
    }
    wait_send(dq_send)?;
    Ok((dq, dk, dv))
}

fn add_dq_partial(dq: Tensor<4>, rows: Range<usize>, incoming: Incoming) -> Result<Tensor<4>> {
    let part = incoming.wait()?.pop().expect("one part");
    Ok(add_rows(dq, rows, part))
}
