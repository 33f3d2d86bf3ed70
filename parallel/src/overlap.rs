//! The expert-parallel block with overlap: the exchange of rows to the ranks that own their
//! experts, the grouped SwiGLU of the local experts and the return of the results, split
//! into `d` chunks so that the transfer of one chunk overlaps the expert compute of another
//! (Tutel's and FSMoE's pipelining), forward and backward, as ONE custom autodiff node.
//!
//! Why one node: burn runs the backward of its graph nodes strictly one after another, so
//! a transfer can only overlap compute inside a node. The backward is the same pipeline
//! run on gradients: chunk c of dY travels to the owners while chunk c-1's expert backward
//! runs, and each chunk's dX travels home while the next one computes; the weight
//! gradients accumulate over the chunks on the owner.
//!
//! Chunking: every (peer, expert) block of rows is cut into `d` contiguous pieces, piece c
//! of every block forming chunk c, so each chunk carries every expert's share and the
//! owner runs one grouped GEMM per chunk. A rank with nothing to send or receive still
//! takes part in every exchange, forward and backward.
//!
//! The readable reference is the unchunked three-step path of `AllToAllDispatcher`
//! (differentiable all-to-all, `grouped_swiglu`, all-to-all back); `tests/ep_overlap.rs`
//! pins the two together (outputs, input and weight gradients) for d = 1, 2, 3, 8 and
//! `auto`.
//!
//! `auto` measures instead of modelling: the first forward calls try d = 1, 2, 4, 8, 16
//! (two calls each), the ep ranks agree on each call's time (the slowest rank's, by an
//! all-reduce), and the fastest candidate is used from then on. A cost model (FSMoE's
//! transfer = latency + bytes / bandwidth, compute linear in rows) was tried first and
//! dropped: it cannot see the per-chunk overheads that decide the answer on CPUs (smaller
//! GEMMs, one more exchange's synchronisation), so it always picked the largest d.
//!
//! Shape legend: R_s rows this rank sends (grouped by owner rank, then the owner's local
//! expert), R_c rows one chunk brings to the owner, D model dim, F expert hidden dim, E_l
//! local experts.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard_comm::{Buffer, Communicator, ReduceOp, Request};
use switchyard_kernels::grouped::{
    Packed, RowGrads, Stacked, backward_rows, forward_raw, weight_grads,
};
use switchyard_kernels::{BackwardFn, FlexTensor, custom_op, dims, prim, tensor, values};
use switchyard_moe::experts::SwiGlu;

use burn::tensor::Tensor;

use crate::error::{ParallelError, Result};

/// How many chunks the expert-parallel exchange is split into (`parallel.ep_overlap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "OverlapRepr", into = "OverlapRepr")]
pub enum Overlap {
    /// Exactly `d` chunks (1: no overlap, the same op unchunked).
    Chunks(usize),
    /// The first forward calls time the candidates; the fastest is kept (module docs).
    #[default]
    Auto,
}

/// YAML form: a positive integer or `auto`.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum OverlapRepr {
    Chunks(i64),
    Word(String),
}

impl TryFrom<OverlapRepr> for Overlap {
    type Error = String;
    fn try_from(r: OverlapRepr) -> std::result::Result<Overlap, String> {
        match r {
            OverlapRepr::Chunks(d) if d < 1 => Err(format!(
                "ep_overlap is {d}; use a chunk count of at least 1 (1 = no overlap) or `auto`"
            )),
            OverlapRepr::Chunks(d) => Ok(Overlap::Chunks(d as usize)),
            OverlapRepr::Word(w) if w == "auto" => Ok(Overlap::Auto),
            OverlapRepr::Word(w) => Err(format!(
                "ep_overlap is `{w}`; use a chunk count (1 = no overlap, 2, 4, ...) or `auto`"
            )),
        }
    }
}

impl From<Overlap> for OverlapRepr {
    fn from(o: Overlap) -> OverlapRepr {
        match o {
            Overlap::Chunks(d) => OverlapRepr::Chunks(d as i64),
            Overlap::Auto => OverlapRepr::Word("auto".into()),
        }
    }
}

/// Candidate chunk counts of `auto`.
pub const AUTO_CANDIDATES: [usize; 5] = [1, 2, 4, 8, 16];
/// Forward calls each candidate is timed for (the fastest of them counts).
pub const AUTO_TRIALS: usize = 2;

/// Where one dispatcher stands with `auto`: the candidates' timed forward calls so far
/// (slowest rank, seconds), then the choice.
#[derive(Debug, Default)]
pub struct AutoState {
    timed: Vec<(usize, f64)>,
    chosen: Option<usize>,
}

impl AutoState {
    /// The chunk count for the next call, and whether that call is a timed trial.
    pub fn next(&self, overlap: Overlap) -> (usize, bool) {
        match (overlap, self.chosen) {
            (Overlap::Chunks(d), _) => (d, false),
            (Overlap::Auto, Some(d)) => (d, false),
            (Overlap::Auto, None) => {
                let k = self.timed.len() / AUTO_TRIALS;
                (AUTO_CANDIDATES[k], true)
            }
        }
    }

    /// Records a trial of model layer `layer`'s dispatcher (its time already agreed over
    /// the ep ranks); after the last one, chooses the fastest candidate. Returns the choice
    /// once made.
    pub fn record(&mut self, layer: usize, d: usize, seconds: f64) -> Option<usize> {
        self.timed.push((d, seconds));
        if self.timed.len() == AUTO_CANDIDATES.len() * AUTO_TRIALS {
            let best = |d: usize| {
                self.timed
                    .iter()
                    .filter(|t| t.0 == d)
                    .map(|t| t.1)
                    .fold(f64::INFINITY, f64::min)
            };
            let chosen = AUTO_CANDIDATES
                .into_iter()
                .min_by(|&a, &b| best(a).total_cmp(&best(b)))
                .expect("candidates");
            tracing::info!(
                "ep_overlap auto, layer {layer}: forward block times {} -> {chosen} chunks",
                AUTO_CANDIDATES
                    .iter()
                    .map(|&d| format!("d={d}: {:.2} ms", best(d) * 1e3))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            self.chosen = Some(chosen);
        }
        self.chosen
    }

    /// The chunk count `auto` settled on (`None` while it is still measuring).
    pub fn chosen(&self) -> Option<usize> {
        self.chosen
    }
}

/// The ep ranks agree on a trial's time: the slowest rank's (a collective on `comm`).
pub fn agree_time(comm: &dyn Communicator, seconds: f64) -> Result<f64> {
    let op = "ep_overlap auto: agreement on a trial's time";
    let mut buf = Buffer::F64(vec![seconds]);
    comm.all_reduce(&mut buf, ReduceOp::Max)
        .map_err(ParallelError::comm(op))?;
    let v = buf.into_vec::<f64>().map_err(|b| ParallelError::Shape {
        what: op.into(),
        detail: format!("received {} elements instead of f64", b.dtype()),
    })?;
    Ok(v[0])
}

/// Time a block spent waiting for transfers and computing experts.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct BlockTimes {
    pub wait_dispatch: Duration,
    pub wait_return: Duration,
    pub compute: Duration,
}

impl std::ops::AddAssign for BlockTimes {
    fn add_assign(&mut self, o: BlockTimes) {
        self.wait_dispatch += o.wait_dispatch;
        self.wait_return += o.wait_return;
        self.compute += o.compute;
    }
}

impl BlockTimes {
    /// All the waiting for transfers.
    pub fn waiting(&self) -> Duration {
        self.wait_dispatch + self.wait_return
    }
}

/// The row counts of one block over the ep communicator.
#[derive(Clone)]
pub struct BlockLayout {
    comm: Arc<dyn Communicator>,
    /// `send[j][l]`: rows this rank sends for rank j's l-th local expert (send order: j,
    /// then l).
    send: Vec<Vec<usize>>,
    /// `recv[s][l]`: rows rank s sends for this rank's l-th local expert.
    recv: Vec<Vec<usize>>,
    chunks: usize,
    width: usize,
}

impl fmt::Debug for BlockLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockLayout")
            .field("comm", &self.comm.name())
            .field("send", &self.send)
            .field("recv", &self.recv)
            .field("chunks", &self.chunks)
            .finish()
    }
}

/// One (source, expert) piece at the owner: its rows in arrival order and in grouped order.
type PieceMove = (Range<usize>, Range<usize>);

/// Piece `c` of `chunks` of a block of `n` rows.
fn piece(n: usize, c: usize, chunks: usize) -> Range<usize> {
    n * c / chunks..n * (c + 1) / chunks
}

/// Copies rows `from[i]` of `src` to consecutive rows of the result.
fn gather(src: &[f32], width: usize, ranges: impl Iterator<Item = Range<usize>>) -> Vec<f32> {
    let mut out = Vec::new();
    for r in ranges {
        out.extend_from_slice(&src[r.start * width..r.end * width]);
    }
    out
}

impl BlockLayout {
    pub fn new(
        comm: Arc<dyn Communicator>,
        send: Vec<Vec<usize>>,
        recv: Vec<Vec<usize>>,
        chunks: usize,
        width: usize,
    ) -> BlockLayout {
        debug_assert_eq!(send.len(), comm.size());
        debug_assert_eq!(recv.len(), comm.size());
        BlockLayout {
            comm,
            send,
            recv,
            chunks: chunks.max(1),
            width,
        }
    }

    pub fn rows_sent(&self) -> usize {
        self.send.iter().flatten().sum()
    }

    /// Local experts (`recv[s].len()`, the same for every s).
    fn local_experts(&self) -> usize {
        self.recv.first().map_or(0, Vec::len)
    }

    /// Rows this rank's l-th expert gets over all chunks and sources.
    fn total_rows(&self) -> Vec<usize> {
        (0..self.local_experts())
            .map(|l| self.recv.iter().map(|r| r[l]).sum())
            .collect()
    }

    /// Rows of chunk `c` this rank's l-th expert gets, over all sources.
    pub fn chunk_rows(&self, c: usize) -> Vec<usize> {
        (0..self.local_experts())
            .map(|l| {
                self.recv
                    .iter()
                    .map(|r| piece(r[l], c, self.chunks).len())
                    .sum()
            })
            .collect()
    }

    /// Row ranges, in send order, of chunk `c`'s pieces; and the rows per peer.
    fn home_pieces(&self, c: usize) -> (Vec<Range<usize>>, Vec<usize>) {
        let mut ranges = Vec::new();
        let mut per_peer = Vec::with_capacity(self.send.len());
        let mut start = 0;
        for blocks in &self.send {
            let mut rows = 0;
            for &n in blocks {
                let p = piece(n, c, self.chunks);
                ranges.push(start + p.start..start + p.end);
                rows += p.len();
                start += n;
            }
            per_peer.push(rows);
        }
        (ranges, per_peer)
    }

    /// For chunk `c` as it arrives at the owner (source s, then expert l): the row range of
    /// each (s, l) piece in arrival order and in grouped order (expert l, then source s);
    /// and the rows per source.
    fn owner_pieces(&self, c: usize) -> (Vec<PieceMove>, Vec<usize>) {
        let (size, mine) = (self.recv.len(), self.local_experts());
        let len = |s: usize, l: usize| piece(self.recv[s][l], c, self.chunks).len();
        let mut grouped_start = vec![vec![0usize; size]; mine];
        let mut at = 0;
        for (l, starts) in grouped_start.iter_mut().enumerate() {
            for (s, start) in starts.iter_mut().enumerate() {
                *start = at;
                at += len(s, l);
            }
        }
        let mut pieces = Vec::with_capacity(size * mine);
        let mut per_source = Vec::with_capacity(size);
        let mut arrival = 0;
        for s in 0..size {
            let mut rows = 0;
            for (l, starts) in grouped_start.iter().enumerate() {
                let n = len(s, l);
                pieces.push((arrival..arrival + n, starts[s]..starts[s] + n));
                arrival += n;
                rows += n;
            }
            per_source.push(rows);
        }
        (pieces, per_source)
    }

    /// Every chunk's saved rows, row gradients and dY, put back into the unchunked grouped
    /// order (expert l, then source s, then chunk c: the pieces of one (s, l) block are
    /// consecutive, so this is the order of d = 1).
    fn unchunked(
        &self,
        chunks: &[(SavedChunk, RowGrads, Vec<f32>)],
        d: usize,
        f: usize,
    ) -> Unchunked {
        let (size, mine) = (self.recv.len(), self.local_experts());
        let mut all = Unchunked {
            rows: (0..mine)
                .map(|l| self.recv.iter().map(|r| r[l]).sum())
                .collect(),
            ..Unchunked::default()
        };
        let pieces: Vec<Vec<PieceMove>> =
            (0..chunks.len()).map(|c| self.owner_pieces(c).0).collect();
        for l in 0..mine {
            for s in 0..size {
                for (c, (saved, grads, dy)) in chunks.iter().enumerate() {
                    let rows = &pieces[c][s * mine + l].1;
                    let (fd, ff) = (rows.start * d..rows.end * d, rows.start * f..rows.end * f);
                    all.x.extend_from_slice(&saved.x[fd.clone()]);
                    all.dy.extend_from_slice(&dy[fd]);
                    all.a.extend_from_slice(&grads.a[ff.clone()]);
                    all.dg.extend_from_slice(&grads.dg[ff.clone()]);
                    all.du.extend_from_slice(&grads.du[ff]);
                }
            }
        }
        all
    }

    /// Runs the pipeline: chunk c of `home` (R_s x D, send order) goes to the owners,
    /// `compute(c, rows grouped by local expert, rows per local expert)` runs there, and
    /// the results come back into a new R_s x D buffer. The next chunk's exchange is posted
    /// before this chunk's compute starts.
    ///
    /// `tail` runs once the last chunk's results are on their way home (work that needs
    /// every chunk and overlaps the last transfers).
    pub fn run(
        &self,
        home: &[f32],
        what: &str,
        mut compute: impl FnMut(usize, Vec<f32>, &[usize]) -> Vec<f32>,
        tail: impl FnOnce(),
    ) -> Result<(Vec<f32>, BlockTimes)> {
        let w = self.width;
        let op = |stage: &str| format!("{what}: {stage} (ep communicator `{}`)", self.comm.name());
        let post = |c: usize| -> Result<Request> {
            let (ranges, per_peer) = self.home_pieces(c);
            let (_, per_source) = self.owner_pieces(c);
            let buf = gather(home, w, ranges.into_iter());
            self.comm
                .i_all_to_all_v(
                    Buffer::F32(buf),
                    per_peer.iter().map(|r| r * w).collect(),
                    per_source.iter().map(|r| r * w).collect(),
                )
                .map_err(ParallelError::comm(op("rows to the experts' owners")))
        };
        let f32s = |b: Buffer, stage: &str| {
            b.into_vec::<f32>().map_err(|b| ParallelError::Shape {
                what: op(stage),
                detail: format!("received {} elements instead of f32", b.dtype()),
            })
        };
        let mut times = BlockTimes::default();
        let mut returns = Vec::with_capacity(self.chunks);
        let mut next = Some(post(0)?);
        for c in 0..self.chunks {
            let request = next.take().expect("posted one chunk ahead");
            if c + 1 < self.chunks {
                next = Some(post(c + 1)?);
            }
            let waited = Instant::now();
            let arrived = request
                .wait()
                .map_err(ParallelError::comm(op("rows to the experts' owners")))?;
            times.wait_dispatch += waited.elapsed();
            let arrived = f32s(arrived, "rows to the experts' owners")?;
            let (pieces, per_source) = self.owner_pieces(c);
            let mut grouped = vec![0f32; arrived.len()];
            for (from, to) in &pieces {
                grouped[to.start * w..to.end * w]
                    .copy_from_slice(&arrived[from.start * w..from.end * w]);
            }
            let started = Instant::now();
            let out = compute(c, grouped, &self.chunk_rows(c));
            times.compute += started.elapsed();
            let mut back = vec![0f32; out.len()];
            for (from, to) in &pieces {
                back[from.start * w..from.end * w].copy_from_slice(&out[to.start * w..to.end * w]);
            }
            let (_, per_peer) = self.home_pieces(c);
            returns.push(
                self.comm
                    .i_all_to_all_v(
                        Buffer::F32(back),
                        per_source.iter().map(|r| r * w).collect(),
                        per_peer.iter().map(|r| r * w).collect(),
                    )
                    .map_err(ParallelError::comm(op("results back home")))?,
            );
        }
        let started = Instant::now();
        tail();
        times.compute += started.elapsed();
        let mut result = vec![0f32; home.len()];
        for (c, request) in returns.into_iter().enumerate() {
            let waited = Instant::now();
            let back = request
                .wait()
                .map_err(ParallelError::comm(op("results back home")))?;
            times.wait_return += waited.elapsed();
            let back = f32s(back, "results back home")?;
            let (ranges, _) = self.home_pieces(c);
            let mut at = 0;
            for r in ranges {
                let n = r.len() * w;
                result[r.start * w..r.end * w].copy_from_slice(&back[at..at + n]);
                at += n;
            }
        }
        Ok((result, times))
    }
}

/// The backward's inputs of the weight gradients for all chunks, in the unchunked order.
#[derive(Default)]
struct Unchunked {
    rows: Vec<usize>,
    x: Vec<f32>,
    a: Vec<f32>,
    dg: Vec<f32>,
    du: Vec<f32>,
    dy: Vec<f32>,
}

/// What the owner keeps of one chunk for the backward.
struct SavedChunk {
    x: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    rows: Vec<usize>,
}

/// x_send: [R_s, D] (send order) -> the local experts' outputs back home, [R_s, D], in the
/// same order. `experts`: this rank's local experts in local order (the owner's l-th expert
/// is the l-th entry of the send/receive counts). Differentiable on `Autodiff<Flex>`; plain
/// on `Flex`; `None` on any other backend (the caller takes the reference path).
///
/// The forward's times are returned; forward and backward both add theirs to `totals`.
pub fn expert_block(
    x_send: Tensor<2>,
    experts: &[&SwiGlu],
    layout: BlockLayout,
    totals: Arc<Mutex<BlockTimes>>,
) -> Option<Result<(Tensor<2>, BlockTimes)>> {
    let times = Arc::new(Mutex::new(None::<Result<BlockTimes>>));
    let output = if experts.is_empty() {
        let times = times.clone();
        custom_op::<1, 2>([prim(&x_send)?], move |[x]| {
            let (out, backward) = forward(x, None, layout, &times, totals);
            (
                out,
                Box::new(move |dy, needed: [bool; 1]| {
                    let [dx, ..] = backward(dy, [needed[0], false, false, false]);
                    [dx]
                }) as BackwardFn<1>,
            )
        })?
    } else {
        let stack =
            |w: fn(&SwiGlu) -> Tensor<2>| Tensor::cat(experts.iter().map(|e| w(e)).collect(), 0);
        let wg = stack(|e| e.w_gate.val());
        let wu = stack(|e| e.w_up.val());
        let wd = stack(|e| e.w_down.val());
        let times = times.clone();
        custom_op::<4, 2>(
            [prim(&x_send)?, prim(&wg)?, prim(&wu)?, prim(&wd)?],
            move |[x, wg, wu, wd]| {
                let (out, backward) = forward(x, Some([wg, wu, wd]), layout, &times, totals);
                (out, backward)
            },
        )?
    };
    let taken = times.lock().unwrap_or_else(|p| p.into_inner()).take();
    Some(match taken {
        Some(Ok(t)) => Ok((output, t)),
        Some(Err(e)) => Err(e),
        None => unreachable!("the block's forward ran"),
    })
}

type BlockBackward = Box<dyn FnOnce(FlexTensor, [bool; 4]) -> [Option<FlexTensor>; 4] + Send>;

/// The forward pipeline; returns the output and the backward (weights `None`: this rank
/// holds no experts and only takes part in the exchanges). A failed exchange is stored in
/// `times` (the output is then zeros and must not be used).
fn forward(
    x: &FlexTensor,
    weights: Option<[&FlexTensor; 3]>,
    layout: BlockLayout,
    times: &Mutex<Option<Result<BlockTimes>>>,
    totals: Arc<Mutex<BlockTimes>>,
) -> (FlexTensor, BlockBackward) {
    let (rows_sent, width) = (dims(x)[0], dims(x)[1]);
    let weights = weights.map(|w| w.map(Clone::clone));
    let f = weights.as_ref().map_or(0, |[wg, ..]| dims(wg)[1]);
    let experts = weights
        .as_ref()
        .map_or(0, |[wg, ..]| dims(wg)[0] / width.max(1));
    let mut saved: Vec<SavedChunk> = Vec::with_capacity(layout.chunks);
    let result = {
        let values_w = weights
            .as_ref()
            .map(|[g, u, d]| [values(g), values(u), values(d)]);
        // Packed once for every chunk.
        let packed = values_w.as_ref().map(|[g, u, d]| {
            let stacked = Stacked {
                gate: g,
                up: u,
                down: d,
                d: width,
                f,
            };
            Packed::forward(&stacked, &layout.total_rows())
        });
        layout.run(
            &values(x),
            "expert-parallel block (forward)",
            |_, xs, rows| {
                let Some(packed) = &packed else {
                    return xs;
                };
                let (y, g, u) = forward_raw(&xs, packed, rows);
                saved.push(SavedChunk {
                    x: xs,
                    g,
                    u,
                    rows: rows.to_vec(),
                });
                y
            },
            || {},
        )
    };
    let out = match result {
        Ok((out, t)) => {
            *totals.lock().unwrap_or_else(|p| p.into_inner()) += t;
            *times.lock().unwrap_or_else(|p| p.into_inner()) = Some(Ok(t));
            out
        }
        Err(e) => {
            *times.lock().unwrap_or_else(|p| p.into_inner()) = Some(Err(e));
            vec![0f32; rows_sent * width]
        }
    };
    let backward: BlockBackward = Box::new(move |dy, needed| {
        let mut dw: Option<[Option<Vec<f32>>; 3]> = None;
        let values_w = weights
            .as_ref()
            .map(|[g, u, d]| [values(g), values(u), values(d)]);
        let stacked = values_w.as_ref().map(|[g, u, d]| Stacked {
            gate: g,
            up: u,
            down: d,
            d: width,
            f,
        });
        let packed = stacked
            .as_ref()
            .map(|s| Packed::backward(s, &layout.total_rows()));
        // Per chunk: the row part (dX travels home at once); the weight gradients wait for
        // every chunk and are one GEMM per expert over its rows in the unchunked order, so
        // the chunk count never changes a single bit of them (or of anything else: every
        // other result is per row).
        let rows_done: std::cell::RefCell<Vec<(SavedChunk, RowGrads, Vec<f32>)>> =
            std::cell::RefCell::new(Vec::with_capacity(layout.chunks));
        let mut pending = saved.into_iter();
        let (dx, t) = layout
            .run(
                &values(&dy),
                "expert-parallel block (backward)",
                |_, dys, rows| {
                    let Some(packed) = &packed else {
                        return dys;
                    };
                    let chunk = pending.next().expect("one saved chunk per chunk");
                    debug_assert_eq!(chunk.rows, rows);
                    let mut grads = backward_rows(packed, rows, &chunk.g, &chunk.u, &dys, true);
                    let dx = grads.dx.take().expect("dx was asked for");
                    rows_done.borrow_mut().push((chunk, grads, dys));
                    dx
                },
                || {
                    if let Some(stacked) = &stacked
                        && needed[1..].iter().any(|&n| n)
                    {
                        let all = layout.unchunked(&rows_done.borrow(), width, f);
                        dw = Some(weight_grads(
                            &all.x,
                            stacked,
                            &all.rows,
                            &all.a,
                            &all.dg,
                            &all.du,
                            &all.dy,
                            [needed[1], needed[2], needed[3]],
                        ));
                    }
                },
            )
            // The backward pass has no error channel: a failed exchange unwinds to the step.
            .unwrap_or_else(crate::seam::fail);
        *totals.lock().unwrap_or_else(|p| p.into_inner()) += t;
        // Without local experts (or rows) the weight gradients are zeros.
        let [dwg, dwu, dwd] = dw.unwrap_or_else(|| {
            std::array::from_fn(|i| needed[i + 1].then(|| vec![0f32; experts * width * f]))
        });
        let e_rows = experts * width;
        [
            needed[0].then(|| tensor(dx, &[rows_sent, width])),
            dwg.map(|v| tensor(v, &[e_rows, f])),
            dwu.map(|v| tensor(v, &[e_rows, f])),
            dwd.map(|v| tensor(v, &[experts * f, width])),
        ]
    });
    (tensor(out, &[rows_sent, width]), backward)
}
