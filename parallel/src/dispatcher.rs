//! `AllToAllDispatcher`: `moe`'s `TokenDispatcher` for expert parallelism.
//!
//! dispatch: (1) order this rank's rows by (owner rank, expert); (2) exchange per-expert
//! row counts with the ep ranks (no gradient); (3) exchange the rows (differentiable
//! all-to-all); (4) regroup what arrived from (source rank, local expert) to (local expert,
//! source rank) so the layer runs each local expert once. combine undoes (4) and (3) and
//! applies the routing weights at home (`scatter_weighted` on the plan in send order).
//!
//! Null and zero-computation experts never get here: the layer computes its extra experts
//! locally. Every rank joins every collective, forward and backward, also with no rows.
//!
//! The layer holds only the experts this rank owns (`parallelize` drops the others), still
//! indexed by global id, so parameter names, checkpoints and the optimizer state stay
//! layout-independent.
//!
//! Shape legend: T tokens, D model dim, K top-k, R_s rows sent, R_r rows received.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use switchyard_comm::{Buffer, Communicator};
use switchyard_kernels::grouped::grouped_swiglu;
use switchyard_moe::dispatch::{
    Combine, DispatchPlan, Dispatched, Pipelined, TokenDispatcher, scatter_weighted,
};
use switchyard_moe::experts::SwiGlu;

use crate::all_to_all::{RowExchange, all_to_all_rows};
use crate::error::{ParallelError, Result};
use crate::mesh::{Mesh, Placement};
use crate::overlap::{AutoState, BlockLayout, BlockTimes, Overlap, agree_time, expert_block};

/// Exchanges token rows with the ep ranks that own the experts.
pub struct AllToAllDispatcher {
    /// The model layer index of its MoE layer (for logs).
    layer: usize,
    ep: Arc<dyn Communicator>,
    placement: Arc<Placement>,
    /// `None`: the three-step reference path; otherwise the pipelined block (`overlap`).
    overlap: Option<Overlap>,
    auto: Mutex<AutoState>,
    /// Waiting and expert compute of the pipelined block, forward and backward, since the
    /// last `take_block_times`.
    block_times: Arc<Mutex<BlockTimes>>,
}

impl std::fmt::Debug for AllToAllDispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllToAllDispatcher")
            .field("ep", &self.ep.name())
            .field("rank", &self.ep.rank())
            .field("layer", &self.layer)
            .finish()
    }
}

/// Steps (1) and (2) of a dispatch.
struct Counts {
    /// Global ids of each ep rank's experts, in local order.
    experts_of: Vec<Vec<usize>>,
    /// Rows this rank sends to each ep rank.
    send_rows: Vec<usize>,
    /// `counts[src * mine + l]`: rows from rank src for this rank's l-th expert.
    counts: Vec<usize>,
    /// This rank's expert count.
    mine: usize,
    /// The plan with its rows in send order.
    send_plan: DispatchPlan,
}

/// What the combine of one dispatch needs: its exchange, run backwards.
#[derive(Debug)]
struct Exchanged {
    exchange: RowExchange,
    /// Position in the received order (source, expert) of each row in the grouped order
    /// (expert, source); `None` when the two orders coincide.
    inverse: Option<Vec<i64>>,
    /// The dispatch plan with its rows in send order.
    send_plan: DispatchPlan,
}

impl AllToAllDispatcher {
    /// A dispatcher over the mesh's ep axis for model layer `layer`, with that layer's
    /// `placement` (each MoE layer has its own dispatcher).
    pub fn new(mesh: &Mesh, layer: usize, placement: Arc<Placement>) -> AllToAllDispatcher {
        AllToAllDispatcher {
            layer,
            ep: mesh.ep_comm().clone(),
            placement,
            overlap: mesh.ep_overlap(),
            auto: Mutex::new(AutoState::default()),
            block_times: Arc::default(),
        }
    }

    /// The pipelined block's waiting and expert compute (forward and backward) since the
    /// last call, and resets them.
    pub fn take_block_times(&self) -> BlockTimes {
        std::mem::take(&mut *self.block_times.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The chunk count `ep_overlap: auto` settled on (`None` while it is measuring, or when
    /// the overlap is not `auto`).
    pub fn auto_choice(&self) -> Option<usize> {
        self.auto.lock().unwrap_or_else(|p| p.into_inner()).chosen()
    }

    /// Steps (1) and (2): the send order and the row counts every rank gets.
    fn exchange_counts(&self, plan: &DispatchPlan) -> Result<Counts> {
        let placement = &self.placement;
        let (me, size) = (self.ep.rank(), self.ep.size());
        let num_experts = plan.rows_per_expert.len();
        if placement.num_experts() != num_experts || placement.ep_size() != size {
            return Err(ParallelError::Placement(format!(
                "the placement covers {} experts on {} ep ranks; the layer has {num_experts} \
                 experts and the ep communicator {size} ranks",
                placement.num_experts(),
                placement.ep_size()
            )));
        }
        let experts_of: Vec<Vec<usize>> = (0..size).map(|r| placement.experts_of(r)).collect();
        // (1) rows in send order: by owner rank, then expert, then plan order.
        let mut offset = vec![0usize; num_experts + 1];
        for e in 0..num_experts {
            offset[e + 1] = offset[e] + plan.rows_per_expert[e];
        }
        let mut order = Vec::with_capacity(plan.num_rows());
        let mut send_rows = vec![0usize; size];
        let mut meta = Vec::with_capacity(num_experts);
        for (rank, experts) in experts_of.iter().enumerate() {
            for &e in experts {
                order.extend(offset[e]..offset[e + 1]);
                send_rows[rank] += plan.rows_per_expert[e];
                meta.push(plan.rows_per_expert[e] as i64);
            }
        }
        // (2) per-expert counts: to rank j, the counts of j's experts.
        let mine = experts_of[me].len();
        let meta_send: Vec<usize> = experts_of.iter().map(Vec::len).collect();
        let op = "AllToAllDispatcher: exchange of row counts";
        let request = self
            .ep
            .i_all_to_all_v(Buffer::I64(meta), meta_send, vec![mine; size])
            .map_err(ParallelError::comm(op))?;
        let received = request.wait().map_err(ParallelError::comm(op))?;
        let counts: Vec<usize> = received
            .into_vec::<i64>()
            .map_err(|b| ParallelError::Shape {
                what: op.into(),
                detail: format!("received {} elements instead of i64", b.dtype()),
            })?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let send_plan = DispatchPlan {
            row_token: order.iter().map(|&r| plan.row_token[r]).collect(),
            row_assignment: order.iter().map(|&r| plan.row_assignment[r]).collect(),
            rows_per_expert: plan.rows_per_expert.clone(),
            num_tokens: plan.num_tokens,
        };
        Ok(Counts {
            experts_of,
            send_rows,
            counts,
            mine,
            send_plan,
        })
    }

    /// x_td's rows in send order (differentiable gather).
    fn rows_to_send(x_td: Tensor<2>, send_plan: &DispatchPlan) -> Tensor<2> {
        let rows_sent = send_plan.num_rows();
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(send_plan.row_token.clone(), [rows_sent]),
            &x_td.device(),
        );
        x_td.select(0, index)
    }

    /// The pipelined block (`overlap`), then the weighted combine at home.
    fn try_pipelined(
        &self,
        overlap: Overlap,
        x_td: &Tensor<2>,
        plan: &DispatchPlan,
        weights_tk: &Tensor<2>,
        experts: &[Option<SwiGlu>],
    ) -> Result<Pipelined> {
        let Counts {
            experts_of,
            counts,
            mine,
            send_plan,
            ..
        } = self.exchange_counts(plan)?;
        let (me, size) = (self.ep.rank(), self.ep.size());
        let [_, d] = x_td.dims();
        let send: Vec<Vec<usize>> = experts_of
            .iter()
            .map(|es| es.iter().map(|&e| plan.rows_per_expert[e]).collect())
            .collect();
        let recv: Vec<Vec<usize>> = (0..size)
            .map(|src| counts[src * mine..(src + 1) * mine].to_vec())
            .collect();
        let local = held(&experts_of[me], experts);
        let local_experts = experts_of[me]
            .iter()
            .enumerate()
            .map(|(l, &e)| (e, recv.iter().map(|r| r[l]).sum()))
            .collect();
        let (chunks, trial) = self
            .auto
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next(overlap);
        let started = Instant::now();
        let x_send = Self::rows_to_send(x_td.clone(), &send_plan);
        let layout = BlockLayout::new(self.ep.clone(), send, recv, chunks, d);
        let (home_rd, _) = expert_block(x_send, &local, layout, self.block_times.clone())
            .expect("the dispatcher checked for the flex backend")?;
        if trial {
            let seconds = agree_time(self.ep.as_ref(), started.elapsed().as_secs_f64())?;
            self.auto
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(self.layer, chunks, seconds);
        }
        let y_td = combine_at_home(home_rd, weights_tk.clone(), &send_plan);
        Ok(Pipelined {
            y_td,
            local_experts,
        })
    }

    /// The pipelined block on any backend: the three steps per chunk (every (rank, expert)
    /// block of rows cut into `chunks` pieces), written with burn's generic ops and the
    /// generic all-to-all. The chunks run one after another: each chunk's first exchange
    /// depends on the previous chunk's result (through a zero-valued term), so the
    /// backward runs the chunks' collectives in one order on every rank. Transfers do not
    /// overlap the experts here (the flex block's overlap needs its own schedule).
    fn try_chunked(
        &self,
        chunks: usize,
        x_td: &Tensor<2>,
        plan: &DispatchPlan,
        weights_tk: &Tensor<2>,
        experts: &[Option<SwiGlu>],
    ) -> Result<Pipelined> {
        let Counts {
            experts_of,
            counts,
            mine,
            send_plan,
            ..
        } = self.exchange_counts(plan)?;
        let (me, size) = (self.ep.rank(), self.ep.size());
        let device = x_td.device();
        let local = held(&experts_of[me], experts);
        // Rows sent per (rank, expert) block, in send order.
        let send_blocks: Vec<usize> = experts_of
            .iter()
            .flat_map(|es| es.iter().map(|&e| plan.rows_per_expert[e]))
            .collect();
        let piece = |n: usize, c: usize| n * c / chunks..n * (c + 1) / chunks;
        let x_send = Self::rows_to_send(x_td.clone(), &send_plan);
        let mut sent_order: Vec<i64> = Vec::with_capacity(send_plan.num_rows());
        let mut home_pieces = Vec::with_capacity(chunks);
        let mut after: Option<Tensor<2>> = None;
        for c in 0..chunks {
            // This chunk's rows of every block, in send order.
            let mut index = Vec::new();
            let mut send_rows = vec![0usize; size];
            let mut start = 0;
            let mut block = 0;
            for (rank, es) in experts_of.iter().enumerate() {
                for _ in es {
                    let r = piece(send_blocks[block], c);
                    send_rows[rank] += r.len();
                    index.extend(r.map(|i| (start + i) as i64));
                    start += send_blocks[block];
                    block += 1;
                }
            }
            let recv_counts: Vec<usize> = counts.iter().map(|&n| piece(n, c).len()).collect();
            let recv_rows: Vec<usize> = (0..size)
                .map(|src| recv_counts[src * mine..(src + 1) * mine].iter().sum())
                .collect();
            let n = index.len();
            sent_order.extend_from_slice(&index);
            let mut xs = x_send.clone().select(
                0,
                Tensor::<1, Int>::from_data(TensorData::new(index, [n]), &device),
            );
            if let Some(previous) = after.take() {
                xs = xs + previous.sum().reshape([1, 1]) * 0.0;
            }
            let exchange = RowExchange::new(self.ep.clone(), send_rows, recv_rows)?;
            let x_recv = all_to_all_rows(xs, &exchange)?;
            let (rows_nd, inverse, rows_of) = expert_major(x_recv, &recv_counts, size, mine);
            let out_nd = grouped_swiglu(rows_nd, &local, &rows_of);
            let out_recv = match inverse {
                None => out_nd,
                Some(inverse) => {
                    let n = inverse.len();
                    out_nd.select(
                        0,
                        Tensor::<1, Int>::from_data(TensorData::new(inverse, [n]), &device),
                    )
                }
            };
            let home = all_to_all_rows(out_recv, &exchange.transposed())?;
            after = Some(home.clone());
            home_pieces.push(home);
        }
        // Back to send order.
        let home = Tensor::cat(home_pieces, 0);
        let n = sent_order.len();
        let mut position = vec![0i64; n];
        for (at, &row) in sent_order.iter().enumerate() {
            position[row as usize] = at as i64;
        }
        let home_rd = home.select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(position, [n]), &device),
        );
        let local_experts = experts_of[me]
            .iter()
            .enumerate()
            .map(|(l, &e)| (e, (0..size).map(|src| counts[src * mine + l]).sum()))
            .collect();
        let y_td = combine_at_home(home_rd, weights_tk.clone(), &send_plan);
        Ok(Pipelined {
            y_td,
            local_experts,
        })
    }

    fn try_dispatch(&self, x_td: Tensor<2>, plan: DispatchPlan) -> Result<Dispatched> {
        let Counts {
            experts_of,
            send_rows,
            counts,
            mine,
            send_plan,
            ..
        } = self.exchange_counts(&plan)?;
        let (me, size) = (self.ep.rank(), self.ep.size());
        let [_, d] = x_td.dims();
        // counts[src * mine + l]: rows from rank src for my l-th expert.
        let recv_rows: Vec<usize> = (0..size)
            .map(|src| counts[src * mine..(src + 1) * mine].iter().sum())
            .collect();
        // (3) rows to owners.
        let x_send = Self::rows_to_send(x_td, &send_plan);
        let exchange = RowExchange::new(self.ep.clone(), send_rows, recv_rows)?;
        let x_recv = all_to_all_rows(x_send, &exchange)?;
        // (4) regroup (source, expert) -> (expert, source).
        let (rows_nd, inverse, rows_of) = expert_major(x_recv, &counts, size, mine);
        let local_experts: Vec<(usize, usize)> =
            experts_of[me].iter().copied().zip(rows_of).collect();
        debug_assert_eq!(
            rows_nd.dims(),
            [local_experts.iter().map(|(_, n)| n).sum::<usize>(), d]
        );
        Ok(Dispatched {
            rows_nd,
            local_experts,
            combine: Box::new(Exchanged {
                exchange,
                inverse,
                send_plan,
            }),
        })
    }
}

impl TokenDispatcher for AllToAllDispatcher {
    fn pipelined(
        &self,
        x_td: &Tensor<2>,
        plan: &DispatchPlan,
        weights_tk: &Tensor<2>,
        experts: &[Option<SwiGlu>],
    ) -> Option<Pipelined> {
        let overlap = self.overlap?;
        // The fused block runs its expert GEMMs in f32 on the flex backend; elsewhere, under
        // a bf16 forward pass, or with the grouped GEMM switched off, the generic chunked
        // path does the work (`auto` takes 2 chunks there: nothing overlaps to measure).
        let fused = switchyard_kernels::prim(x_td).is_some()
            && switchyard_kernels::fused(switchyard_kernels::Fused::GroupedExperts);
        let done = if fused {
            self.try_pipelined(overlap, x_td, plan, weights_tk, experts)
        } else {
            let chunks = match overlap {
                Overlap::Chunks(d) => d,
                Overlap::Auto => 2,
            };
            self.try_chunked(chunks, x_td, plan, weights_tk, experts)
        };
        // The seam has no error channel: a failed collective unwinds to the step (`seam`).
        Some(done.unwrap_or_else(crate::seam::fail))
    }

    fn dispatch(&self, x_td: Tensor<2>, plan: DispatchPlan) -> Dispatched {
        // The seam has no error channel: a failed collective unwinds to the step (`seam`).
        self.try_dispatch(x_td, plan)
            .unwrap_or_else(crate::seam::fail)
    }
}

/// The experts' outputs back home [R_s, D] (send order) -> the weighted sum per token
/// [T, D]. With no rows sent, the exchange's output is still kept in the graph (a zero
/// term), so this rank runs its backward: the other ranks wait for it there.
fn combine_at_home(
    home_rd: Tensor<2>,
    weights_tk: Tensor<2>,
    send_plan: &DispatchPlan,
) -> Tensor<2> {
    if send_plan.num_rows() == 0 {
        let ([t, _], [_, d]) = (weights_tk.dims(), home_rd.dims());
        let y_td = scatter_weighted(home_rd.clone(), weights_tk, send_plan);
        debug_assert_eq!(y_td.dims(), [t, d]);
        return y_td + home_rd.sum().reshape([1, 1]) * 0.0;
    }
    scatter_weighted(home_rd, weights_tk, send_plan)
}

/// The layer's experts with the global ids `mine` (this rank's, in local order).
fn held<'a>(mine: &[usize], experts: &'a [Option<SwiGlu>]) -> Vec<&'a SwiGlu> {
    mine.iter()
        .map(|&e| {
            experts[e].as_ref().unwrap_or_else(|| {
                panic!(
                    "expert {e} is placed on this rank but the layer does not hold it; the \
                     placement and the layer's experts must change together"
                )
            })
        })
        .collect()
}

/// Rows received in (source rank, local expert) blocks (`counts[src * mine + l]` rows
/// each) -> the same rows grouped by local expert, [R_r, D]; the position in the received
/// order of each grouped row's inverse (`None` when the orders coincide); rows per local
/// expert.
fn expert_major(
    x_recv: Tensor<2>,
    counts: &[usize],
    size: usize,
    mine: usize,
) -> (Tensor<2>, Option<Vec<i64>>, Vec<usize>) {
    let mut block_start = vec![0usize; size * mine];
    let mut at = 0;
    for (b, start) in block_start.iter_mut().enumerate() {
        *start = at;
        at += counts[b];
    }
    let mut grouped = Vec::with_capacity(at);
    let mut rows_of = Vec::with_capacity(mine);
    for l in 0..mine {
        let mut rows = 0;
        for src in 0..size {
            let b = src * mine + l;
            let n = counts[b];
            grouped.extend((block_start[b]..block_start[b] + n).map(|r| r as i64));
            rows += n;
        }
        rows_of.push(rows);
    }
    if grouped.iter().enumerate().all(|(i, &r)| i as i64 == r) {
        return (x_recv, None, rows_of);
    }
    let mut inverse = vec![0i64; grouped.len()];
    for (q, &r) in grouped.iter().enumerate() {
        inverse[r as usize] = q as i64;
    }
    let n = grouped.len();
    let device = x_recv.device();
    let index = Tensor::<1, Int>::from_data(TensorData::new(grouped, [n]), &device);
    (x_recv.select(0, index), Some(inverse), rows_of)
}

impl Exchanged {
    fn try_combine(&self, out_nd: Tensor<2>, weights_tk: Tensor<2>) -> Result<Tensor<2>> {
        let device = out_nd.device();
        let out_recv = match &self.inverse {
            None => out_nd,
            Some(inverse) => {
                let n = inverse.len();
                let index =
                    Tensor::<1, Int>::from_data(TensorData::new(inverse.clone(), [n]), &device);
                out_nd.select(0, index)
            }
        };
        let home_rd = all_to_all_rows(out_recv, &self.exchange.transposed())?;
        Ok(combine_at_home(home_rd, weights_tk, &self.send_plan))
    }
}

impl Combine for Exchanged {
    fn combine(self: Box<Self>, out_nd: Tensor<2>, weights_tk: Tensor<2>) -> Tensor<2> {
        // The seam has no error channel: a failed collective unwinds to the step (`seam`).
        self.try_combine(out_nd, weights_tk)
            .unwrap_or_else(crate::seam::fail)
    }
}
