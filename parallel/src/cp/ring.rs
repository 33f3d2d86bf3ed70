//! Ring attention (Liu et al., arXiv 2310.01889; the schedule of zhuzilin's
//! ring-flash-attention, zigzag variant).
//!
//! Forward, rank `r` of `W`: at step `s` it holds the key/value block of rank `r - s`. It
//! posts the send of that block to `r + 1` and the receive of the next one from `r - 1`,
//! computes the tile of its queries against the block it holds, merges the partial into
//! its running (output, lse) in fp32, and only then waits for the transfer: the transfer
//! of step `s + 1` overlaps the compute of step `s`.
//!
//! Backward: the key/value blocks travel the same way again; the gradient accumulators of
//! a block travel one step behind it (rank `r` receives the accumulator of the block it
//! holds from `r - 1`, adds its tile's dK/dV and passes it to `r + 1`). After step `W - 1`
//! the accumulator of rank `r + 1`'s block is sent to `r + 1`: every accumulator ends at its
//! owner. dQ accumulates locally. The receive of the accumulator is posted before the
//! tile's compute, so it overlaps too.
//!
//! Shape legend: B batch, H heads, N local tokens, Dh head dim.

use burn::tensor::Tensor;

use super::CpAttention;
use super::saved::Saved;
use super::tile::{self, Merged, add_rows, plan, rows};
use super::transfer::{self, Incoming, Outgoing};
use crate::error::Result;

const TAG_KV: u32 = 0x4b56;
const TAG_DKV: u32 = 0x644b;

/// Names a message in errors.
fn what(attn: &CpAttention, message: &str) -> String {
    format!("ring attention on `{}`: {message}", attn.comm.name())
}

/// The key/value exchange of one step: receive from `r - 1`, send to `r + 1`.
struct KvExchange {
    recv: Incoming,
    send: Outgoing,
}

impl KvExchange {
    fn post(attn: &CpAttention, k: &Tensor<4>, v: &Tensor<4>) -> Result<KvExchange> {
        let (w, r) = (attn.comm.size(), attn.comm.rank());
        let shape = k.dims();
        let recv = transfer::recv(
            attn,
            vec![shape, shape],
            (r + w - 1) % w,
            TAG_KV,
            k,
            what(attn, "receive of a key/value block"),
        )?;
        let send = transfer::send(
            attn,
            &[k.clone(), v.clone()],
            (r + 1) % w,
            TAG_KV,
            what(attn, "send of a key/value block"),
        )?;
        Ok(KvExchange { recv, send })
    }

    fn finish(self) -> Result<(Tensor<4>, Tensor<4>)> {
        let mut kv = self.recv.wait()?.into_iter();
        self.send.wait()?;
        Ok((kv.next().expect("k"), kv.next().expect("v")))
    }
}

/// q, k, v [B, H, N, Dh] of this rank -> its output and everything the backward needs.
pub fn forward(attn: &CpAttention, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Result<Saved> {
    let (w, r) = (attn.comm.size(), attn.comm.rank());
    let [_, _, n, dh] = q.dims();
    let scale = 1.0 / (dh as f64).sqrt();
    let device = q.device();
    let q_pos = attn.layout.positions(r, n);
    let (mut k_cur, mut v_cur) = (k.clone(), v.clone());
    let mut merged: Option<Merged> = None;
    for s in 0..w {
        let src = (r + w - s) % w;
        let exchange = (s + 1 < w)
            .then(|| KvExchange::post(attn, &k_cur, &v_cur))
            .transpose()?;
        let k_pos = attn.layout.positions(src, n);
        if let Some(t) = plan(&q_pos, &k_pos, attn.causal) {
            let mask = t.mask(&q_pos, &k_pos, &device);
            let (o_b, lse_b) = tile::forward(
                rows(q.clone(), t.rows.clone()),
                rows(k_cur.clone(), t.cols.clone()),
                rows(v_cur.clone(), t.cols.clone()),
                mask,
                scale,
            );
            match &mut merged {
                Some(m) => m.merge(t.rows, o_b, lse_b),
                None => {
                    // Step 0 is the own block: every query sees at least itself.
                    debug_assert_eq!(t.rows, 0..n);
                    merged = Some(Merged { o: o_b, lse: lse_b });
                }
            }
        }
        if let Some(exchange) = exchange {
            (k_cur, v_cur) = exchange.finish()?;
        }
    }
    let Merged { o, lse } = merged.expect("the own block is always attended");
    Ok(Saved { q, k, v, o, lse })
}

/// Output gradient [B, H, N, Dh] -> (dq, dk, dv) of this rank's q, k, v.
pub fn backward(
    attn: &CpAttention,
    saved: &Saved,
    d_out: Tensor<4>,
) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
    let (w, r) = (attn.comm.size(), attn.comm.rank());
    let Saved { q, k, v, o, lse } = saved;
    let [_, _, n, dh] = q.dims();
    let shape = k.dims();
    let scale = 1.0 / (dh as f64).sqrt();
    let device = q.device();
    let q_pos = attn.layout.positions(r, n);
    let delta = (d_out.clone() * o.clone()).sum_dim(3);
    let mut dq = q.zeros_like();
    let (mut k_cur, mut v_cur) = (k.clone(), v.clone());
    let (prev, next) = ((r + w - 1) % w, (r + 1) % w);
    let mut acc_send: Option<Outgoing> = None;
    let mut own = None;
    for s in 0..w {
        let src = (r + w - s) % w;
        let exchange = (s + 1 < w)
            .then(|| KvExchange::post(attn, &k_cur, &v_cur))
            .transpose()?;
        // The accumulator of the block held now, from the rank that held it one step ago.
        let acc_recv = (s > 0)
            .then(|| {
                transfer::recv(
                    attn,
                    vec![shape, shape],
                    prev,
                    TAG_DKV,
                    k,
                    what(attn, "receive of a dK/dV accumulator"),
                )
            })
            .transpose()?;
        let k_pos = attn.layout.positions(src, n);
        let tile_grads = plan(&q_pos, &k_pos, attn.causal).map(|t| {
            let mask = t.mask(&q_pos, &k_pos, &device);
            let (dq_t, dk_t, dv_t) = tile::backward(
                rows(q.clone(), t.rows.clone()),
                rows(k_cur.clone(), t.cols.clone()),
                rows(v_cur.clone(), t.cols.clone()),
                rows(d_out.clone(), t.rows.clone()),
                rows(lse.clone(), t.rows.clone()),
                rows(delta.clone(), t.rows.clone()),
                mask,
                scale,
            );
            dq = add_rows(dq.clone(), t.rows, dq_t);
            (t.cols, dk_t, dv_t)
        });
        let (mut dk_acc, mut dv_acc) = match acc_recv {
            None => (k.zeros_like(), v.zeros_like()),
            Some(incoming) => {
                let mut acc = incoming.wait()?.into_iter();
                (acc.next().expect("dk"), acc.next().expect("dv"))
            }
        };
        if let Some((cols, dk_t, dv_t)) = tile_grads {
            dk_acc = add_rows(dk_acc, cols.clone(), dk_t);
            dv_acc = add_rows(dv_acc, cols, dv_t);
        }
        // The accumulator is sent after this step's K/V exchange is waited, so that on every
        // rank it goes out with the next step's exchange and the receive it matches: NCCL
        // issues the sends and receives posted before a wait as one group, and a send
        // completes only once its peer issued the receive (see `comm::rendezvous`).
        if let Some(exchange) = exchange {
            (k_cur, v_cur) = exchange.finish()?;
        }
        if w == 1 {
            own = Some((dk_acc, dv_acc));
        } else {
            if let Some(sent) = acc_send.take() {
                sent.wait()?;
            }
            acc_send = Some(transfer::send(
                attn,
                &[dk_acc, dv_acc],
                next,
                TAG_DKV,
                what(attn, "send of a dK/dV accumulator"),
            )?);
        }
    }
    let (dk, dv) = match own {
        Some(own) => own,
        None => {
            // The accumulator of the own block, complete, from r - 1.
            let own = transfer::recv(
                attn,
                vec![shape, shape],
                prev,
                TAG_DKV,
                k,
                what(attn, "receive of the own dK/dV"),
            )?
            .wait()?;
            if let Some(sent) = acc_send.take() {
                sent.wait()?;
            }
            let mut acc = own.into_iter();
            (acc.next().expect("dk"), acc.next().expect("dv"))
        }
    };
    Ok((dq, dk, dv))
}
