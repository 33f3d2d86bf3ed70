//! The seam between MoE math and communication.
//!
//! `dispatch` permutes token rows into per-expert groups (and, for expert parallelism, sends
//! them to the ranks that own the experts); `combine` undoes it and applies the routing
//! weights. `LocalDispatcher` does no communication.
//!
//! Shape legend: T tokens, D model dim, K top-k, N routed rows (kept assignments).

use std::fmt::Debug;

use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

use crate::experts::SwiGlu;
use crate::router::Routing;
use switchyard_kernels::combine::{combine_rows, gather_rows};

/// Which assignments survive the capacity limits, for the chosen slots `experts_tk`
/// (row-major [T, K], tokens in admission order) of any batch: this process's, or the
/// global batch gathered from every process. Assignments are admitted choice by choice
/// (every token's first choice before any second choice) and, within a choice, in token
/// order, as in GShard. `capacity[e] = None` admits everything routed to slot `e`.
///
/// Returns a flag per assignment, row-major [T, K].
pub fn admit(experts_tk: &[usize], k: usize, capacity: &[Option<usize>]) -> Vec<bool> {
    let t = experts_tk.len() / k.max(1);
    let mut load = vec![0usize; capacity.len()];
    let mut kept = vec![false; t * k];
    for choice in 0..k {
        for token in 0..t {
            let e = experts_tk[token * k + choice];
            if capacity[e].is_none_or(|c| load[e] < c) {
                load[e] += 1;
                kept[token * k + choice] = true;
            }
        }
    }
    kept
}

/// The permutation that groups kept assignments by expert. Immutable once built; `combine`
/// consumes it.
#[derive(Debug, Clone)]
pub struct DispatchPlan {
    /// For each row (grouped by expert, token order inside a group): its token.
    pub row_token: Vec<i64>,
    /// For each row: its flat index into the [T, K] routing weights.
    pub row_assignment: Vec<i64>,
    /// Rows per expert, indexed by global expert id.
    pub rows_per_expert: Vec<usize>,
    pub num_tokens: usize,
}

impl DispatchPlan {
    /// Groups the kept assignments to FFN experts `0..num_ffn` (the slots after them are
    /// the router's extra experts, computed locally by the layer, never dispatched).
    pub fn new(routing: &Routing, kept: &[bool], num_ffn: usize) -> Self {
        let k = routing.top_k;
        let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); num_ffn];
        for (assignment, &e) in routing.experts_tk.iter().enumerate() {
            if kept[assignment] && e < num_ffn {
                by_expert[e].push(assignment);
            }
        }
        let rows_per_expert = by_expert.iter().map(Vec::len).collect();
        let row_assignment: Vec<i64> = by_expert.into_iter().flatten().map(|a| a as i64).collect();
        let row_token = row_assignment.iter().map(|&a| a / k as i64).collect();
        Self {
            row_token,
            row_assignment,
            rows_per_expert,
            num_tokens: routing.num_tokens,
        }
    }

    pub fn num_rows(&self) -> usize {
        self.row_token.len()
    }
}

/// Rows grouped by expert, ready for the experts this process computes.
pub struct Dispatched {
    /// [N_local, D]: the rows of the local experts, grouped by expert in `local_experts` order.
    pub rows_nd: Tensor<2>,
    /// Global ids of the experts computed here, and the number of rows of each.
    pub local_experts: Vec<(usize, usize)>,
    /// Brings the expert outputs back: made by the dispatcher with whatever this call's
    /// exchange needs (typed inside it), consumed once.
    pub combine: Box<dyn Combine>,
}

/// The second half of one dispatch: undoes its permutation (and exchange) and applies the
/// routing weights.
pub trait Combine: Send {
    /// expert outputs [N_local, D] -> y [T, D] = sum over kept assignments of
    /// weight * expert output. weights: [T, K].
    fn combine(self: Box<Self>, out_nd: Tensor<2>, weights_tk: Tensor<2>) -> Tensor<2>;
}

/// Moves token rows to experts and back. Implementations: `LocalDispatcher` here;
/// the expert-parallel all-to-all dispatcher lives in `switchyard-parallel`.
pub trait TokenDispatcher: Debug + Send + Sync {
    /// x: [T, D] -> rows of the experts computed on this process, and how to combine
    /// their outputs.
    fn dispatch(&self, x_td: Tensor<2>, plan: DispatchPlan) -> Dispatched;

    /// dispatch -> experts -> combine as one step, for a dispatcher that pipelines its
    /// exchange with the expert compute (the transfer of one chunk of rows overlapping the
    /// experts of another). `experts`: the layer's routed experts by global id (`None`: not
    /// held by this process). `None` (the default): the layer runs the three steps itself.
    fn pipelined(
        &self,
        _x_td: &Tensor<2>,
        _plan: &DispatchPlan,
        _weights_tk: &Tensor<2>,
        _experts: &[Option<SwiGlu>],
    ) -> Option<Pipelined> {
        None
    }
}

/// The result of [`TokenDispatcher::pipelined`].
#[derive(Debug)]
pub struct Pipelined {
    /// [T, D], as `combine` returns it.
    pub y_td: Tensor<2>,
    /// Global ids of the experts computed here, and the number of rows of each.
    pub local_experts: Vec<(usize, usize)>,
}

/// Single-process dispatcher: every expert is local, no communication.
#[derive(Debug, Clone, Default)]
pub struct LocalDispatcher;

impl TokenDispatcher for LocalDispatcher {
    fn dispatch(&self, x_td: Tensor<2>, plan: DispatchPlan) -> Dispatched {
        let rows_nd = gather_rows(&x_td, &plan.row_token)
            .unwrap_or_else(|| gather_rows_reference(x_td, &plan.row_token));
        let local_experts = plan.rows_per_expert.iter().copied().enumerate().collect();
        Dispatched {
            rows_nd,
            local_experts,
            combine: Box::new(LocalCombine { plan }),
        }
    }
}

/// Every row is home already: the weighted scatter of the plan.
struct LocalCombine {
    plan: DispatchPlan,
}

impl Combine for LocalCombine {
    fn combine(self: Box<Self>, out_nd: Tensor<2>, weights_tk: Tensor<2>) -> Tensor<2> {
        scatter_weighted(out_nd, weights_tk, &self.plan)
    }
}

/// rows[r] = x[token[r]] with burn ops: the reference of the fused gather.
pub fn gather_rows_reference(x_td: Tensor<2>, token: &[i64]) -> Tensor<2> {
    let device = x_td.device();
    let index =
        Tensor::<1, Int>::from_data(TensorData::new(token.to_vec(), [token.len()]), &device);
    x_td.select(0, index)
}

/// y[t] = sum over rows r of token t: weight[r] * out[r]. Shared by every dispatcher once
/// the rows are back home in plan order. One fused op on the CPU backend.
pub fn scatter_weighted(
    out_nd: Tensor<2>,
    weights_tk: Tensor<2>,
    plan: &DispatchPlan,
) -> Tensor<2> {
    if plan.num_rows() > 0
        && let Some(y_td) = combine_rows(
            &out_nd,
            &weights_tk,
            &plan.row_token,
            &plan.row_assignment,
            plan.num_tokens,
        )
    {
        return y_td;
    }
    scatter_weighted_reference(out_nd, weights_tk, plan)
}

/// `scatter_weighted` with burn ops: the reference of the fused combine.
pub fn scatter_weighted_reference(
    out_nd: Tensor<2>,
    weights_tk: Tensor<2>,
    plan: &DispatchPlan,
) -> Tensor<2> {
    let device = out_nd.device();
    let [_, d] = out_nd.dims();
    let rows = plan.num_rows();
    let y_td = Tensor::<2>::zeros([plan.num_tokens, d], &device);
    if rows == 0 {
        // Keep the weights in the graph so every process builds the same backward.
        return y_td + weights_tk.sum().reshape([1, 1]) * 0.0;
    }
    let [t, k] = weights_tk.dims();
    let assignment = Tensor::<1, Int>::from_data(
        TensorData::new(plan.row_assignment.clone(), [rows]),
        &device,
    );
    let token =
        Tensor::<1, Int>::from_data(TensorData::new(plan.row_token.clone(), [rows]), &device);
    let weight_n1 = weights_tk
        .reshape([t * k])
        .select(0, assignment)
        .reshape([rows, 1]);
    y_td.select_assign(0, token, out_nd * weight_n1, IndexingUpdateOp::Add)
}

/// Host-side batch statistics over every process that holds a share of the global
/// batch. The MoE layer uses it so that its auxiliary losses and its capacity limits are
/// defined over the GLOBAL batch whatever the layout: the load-balancing loss needs the
/// global slot fractions `f` (a product of means is not the mean of products) and the
/// global token count; capacity admission needs every token's choices in the one-process
/// token order.
///
/// `LocalReducer` (the default) is the identity: one process holds the whole batch. The
/// distributed implementation lives in `switchyard-parallel`. `sum` and `gather` are
/// collectives: every process calls them the same number of times, in the same order
/// (once or twice per MoE layer forward, in layer order).
pub trait BatchReducer: Debug + Send + Sync {
    /// Element-wise sum of `values` over every process holding a share of the batch.
    fn sum(&self, values: Vec<f64>) -> Vec<f64>;

    /// Every process's `values` (the same length on each), concatenated in process order.
    fn gather(&self, values: Vec<i64>) -> Vec<i64>;

    /// Where this process's `[rows, len]` tokens sit in the global batch.
    fn position(&self, rows: usize, len: usize) -> BatchPosition;
}

/// Where a process's `[rows, len]` tokens sit in the global `[global_rows, global_len]`
/// batch: local row `b` is global row `row_offset + b`, local column `s` is global position
/// `positions[s]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPosition {
    pub rows: usize,
    pub global_rows: usize,
    pub global_len: usize,
    pub row_offset: usize,
    pub positions: Vec<usize>,
}

impl BatchPosition {
    /// One process holding the whole `[rows, len]` batch.
    pub fn whole(rows: usize, len: usize) -> BatchPosition {
        BatchPosition {
            rows,
            global_rows: rows,
            global_len: len,
            row_offset: 0,
            positions: (0..len).collect(),
        }
    }

    /// Whether the process holds the whole batch (nothing to gather).
    pub fn is_whole(&self) -> bool {
        self.global_rows == self.rows
            && self.global_len == self.positions.len()
            && self.positions.iter().enumerate().all(|(i, &p)| i == p)
    }

    /// Global token index (row-major over the global batch, the one-process order) of
    /// local token `t` (row-major over the local `[rows, len]`).
    pub fn global_index(&self, t: usize) -> usize {
        let len = self.positions.len();
        (self.row_offset + t / len) * self.global_len + self.positions[t % len]
    }
}

/// One process holds the whole batch: nothing to sum or gather.
#[derive(Debug, Clone, Default)]
pub struct LocalReducer;

impl BatchReducer for LocalReducer {
    fn sum(&self, values: Vec<f64>) -> Vec<f64> {
        values
    }

    fn gather(&self, values: Vec<i64>) -> Vec<i64> {
        values
    }

    fn position(&self, rows: usize, len: usize) -> BatchPosition {
        BatchPosition::whole(rows, len)
    }
}
