//! The MoE feed-forward layer: router -> dispatch -> experts -> combine (+ the router's
//! local extra experts) (+ shared experts).
//!
//! Extra experts never enter the dispatcher: null and zero experts contribute nothing,
//! copy experts return their input, constant experts `a1*x + a2*v` — all computed here, on
//! every process, at no expert-matmul cost.
//!
//! Shape legend: B batch, S sequence, T = B*S tokens, D model dim, N routing slots,
//! K top-k, R routed rows.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{Tensor, TensorData};

use crate::config::{BalanceLoss, CapacityConfig, MoeConfig, RouterConfig, SlotKind};
use crate::dispatch::{
    BatchPosition, BatchReducer, DispatchPlan, LocalDispatcher, LocalReducer, TokenDispatcher,
    admit,
};
use crate::experts::SwiGlu;
use crate::init::Initializer;
use crate::profile::{self, Part};
use crate::router::{Gru, Router, RouterCarry, Routing, slot_counts, z_loss_share};
use switchyard_kernels::grouped::grouped_swiglu;

/// Per-layer routing statistics for metrics. Counts and fractions are over the GLOBAL
/// batch (every rank: they ride on the all-reduce the balance loss needs anyway), the
/// same on every rank; `dispatched_tk` is this rank's tokens.
#[derive(Debug, Clone, Default)]
pub struct MoeStats {
    /// Routed assignments per slot over the global batch (before capacity dropping).
    pub slot_counts: Vec<f64>,
    /// Fraction of routed assignments per FFN expert (before capacity dropping).
    pub expert_fraction: Vec<f64>,
    /// Fraction of assignments per slot kind: ffn, null, zero, copy, constant.
    pub kind_fraction: [f64; 5],
    /// Kept assignments to FFN experts per token (k for vanilla dropless MoE).
    pub ffn_experts_per_token: f64,
    /// Fraction of assignments dropped by the capacity limit.
    pub dropped_fraction: f64,
    /// The auxiliary-loss-free bias of each FFN expert (empty without `bias_balance`).
    pub bias: Vec<f32>,
    /// Unweighted load-balancing loss (1.0 = balanced).
    pub load_balance: f64,
    pub z_loss: f64,
    /// Matmul FLOPs spent in routed FFN experts in this forward (shared experts excluded).
    pub expert_flops: u64,
    /// Wall time of this layer's forward (the CPU backend executes eagerly, so this is the
    /// layer's compute time).
    pub seconds: f64,
    /// Choices per token (the router's k).
    pub top_k: usize,
    /// Per token and choice, row-major [T, K] in the batch's token order: the FFN expert the
    /// assignment was dispatched to, `None` for an extra-expert slot (null, zero, copy,
    /// constant) or a dropped assignment. Placement statistics pair these across layers.
    pub dispatched_tk: Vec<Option<u32>>,
}

/// Names of `MoeStats::kind_fraction`'s entries.
pub const KIND_NAMES: [&str; 5] = ["ffn", "null", "zero", "copy", "constant"];

impl MoeStats {
    /// Max over mean of the per-FFN-expert load; 1.0 is perfect balance.
    pub fn max_over_mean_load(&self) -> f64 {
        let (mean, max) = (
            self.mean_load(),
            self.expert_fraction.iter().cloned().fold(0.0, f64::max),
        );
        if mean == 0.0 { 0.0 } else { max / mean }
    }

    /// Min over mean of the per-FFN-expert load; 1.0 is perfect balance, 0 an idle expert.
    pub fn min_over_mean_load(&self) -> f64 {
        let mean = self.mean_load();
        let min = self
            .expert_fraction
            .iter()
            .cloned()
            .fold(f64::INFINITY, f64::min);
        if mean == 0.0 { 0.0 } else { min / mean }
    }

    /// Coefficient of variation (population standard deviation over mean) of the
    /// per-FFN-expert load; 0 is perfect balance.
    pub fn load_cv(&self) -> f64 {
        let mean = self.mean_load();
        if mean == 0.0 {
            return 0.0;
        }
        let n = self.expert_fraction.len().max(1) as f64;
        let var = self
            .expert_fraction
            .iter()
            .map(|f| (f - mean).powi(2))
            .sum::<f64>()
            / n;
        var.sqrt() / mean
    }

    fn mean_load(&self) -> f64 {
        self.expert_fraction.iter().sum::<f64>() / self.expert_fraction.len().max(1) as f64
    }
}

/// Which assignments a layer keeps: this process's flags and the global drop count.
struct Admission {
    /// Row-major [T, K] over this process's tokens.
    kept: Vec<bool>,
    /// Assignments dropped over the global batch: all, and those to FFN experts.
    dropped: usize,
    dropped_ffn: usize,
}

/// Output of an MoE layer.
pub struct MoeOutput {
    /// [B, S, D]
    pub y: Tensor<3>,
    /// Load-balancing loss of the router family, before its coefficient: [1].
    pub load_balance: Tensor<1>,
    /// Router z-loss, before its coefficient: [1].
    pub z_loss: Tensor<1>,
    pub stats: MoeStats,
}

/// MoE++ constant expert: `a1 * x + a2 * v` with `[a1, a2] = softmax(x W_c)`.
#[derive(Module, Debug)]
pub struct ConstantExpert {
    /// [D, 2]
    pub w_mix: Param<Tensor<2>>,
    /// [D]
    pub v: Param<Tensor<1>>,
}

impl ConstantExpert {
    fn new(d_model: usize, init: &mut Initializer) -> Self {
        Self {
            w_mix: init.normal([d_model, 2]),
            // The reference code draws v from N(0, 1).
            v: init.normal_with_std([d_model], 1.0),
        }
    }

    /// x: [T, D] -> [T, D]
    pub fn forward(&self, x_td: Tensor<2>) -> Tensor<2> {
        let [t, d] = x_td.dims();
        let mix_t2 = softmax(x_td.clone().matmul(self.w_mix.val()), 1);
        let a1 = mix_t2.clone().slice([0..t, 0..1]);
        let a2 = mix_t2.slice([0..t, 1..2]);
        x_td * a1 + self.v.val().reshape([1, d]) * a2
    }
}

#[derive(Module, Debug)]
pub struct MoeLayer {
    pub router: Router,
    /// Routed FFN experts, indexed by global expert id; `None` for an expert another rank
    /// owns under expert parallelism (so parameter names stay global: `experts.{e}.w_up`).
    pub experts: Vec<Option<SwiGlu>>,
    /// MoE++ constant experts.
    pub constants: Vec<ConstantExpert>,
    /// Always-on shared experts.
    pub shared: Vec<SwiGlu>,
    /// [D, 1]: the shared experts' per-token gate, sigmoid(x @ w) (`shared_expert.gate`).
    pub shared_gate: Option<Param<Tensor<2>>>,
    #[module(skip)]
    dispatcher: Arc<dyn TokenDispatcher>,
    /// Sums the batch statistics of the auxiliary losses over the processes that share the
    /// global batch (identity in one process).
    #[module(skip)]
    reducer: Arc<dyn BatchReducer>,
    #[module(skip)]
    capacity: CapacityConfig,
    #[module(skip)]
    tau: Option<f64>,
    #[module(skip)]
    balance_loss: BalanceLoss,
    /// `balance_loss: global_batch`: the assignments per slot over the whole optimizer step
    /// (every rank, every micro-batch), installed by the trainer before the step's
    /// micro-batches; `None`: the micro-batch's own counts.
    #[module(skip)]
    step_counts: Option<Vec<f64>>,
}

impl MoeLayer {
    pub fn new(d_model: usize, cfg: &MoeConfig, init: &mut Initializer) -> Self {
        let router = Router::new(d_model, cfg, init);
        let experts = (0..cfg.num_experts)
            .map(|_| Some(SwiGlu::new(d_model, cfg.expert_ffn_dim, init)))
            .collect();
        let constant_count = cfg
            .slot_kinds()
            .iter()
            .filter(|k| matches!(k, SlotKind::Constant(_)))
            .count();
        let constants = (0..constant_count)
            .map(|_| ConstantExpert::new(d_model, init))
            .collect();
        let shared = cfg
            .shared_expert
            .as_ref()
            .map(|s| {
                (0..s.count)
                    .map(|_| SwiGlu::new(d_model, s.ffn_dim, init))
                    .collect()
            })
            .unwrap_or_default();
        let shared_gate = cfg
            .shared_expert
            .as_ref()
            .filter(|s| s.gate)
            .map(|_| init.normal([d_model, 1]));
        let tau = match cfg.router {
            RouterConfig::MoePlusPlus { tau, .. } => Some(tau),
            _ => None,
        };
        Self {
            router,
            experts,
            constants,
            shared,
            shared_gate,
            dispatcher: Arc::new(LocalDispatcher),
            reducer: Arc::new(LocalReducer),
            capacity: cfg.capacity,
            tau,
            balance_loss: cfg.balance_loss,
            step_counts: None,
        }
    }

    /// Installs (or with `None` removes) the step's global assignments per slot that
    /// `balance_loss: global_batch` computes its fractions from.
    pub fn set_step_counts(&mut self, counts: Option<Vec<f64>>) {
        self.step_counts = counts;
    }

    /// Swap the token dispatcher (how `parallelize` applies expert parallelism).
    pub fn with_dispatcher(mut self, dispatcher: Arc<dyn TokenDispatcher>) -> Self {
        self.dispatcher = dispatcher;
        self
    }

    /// Swap the batch-statistics reducer (how `parallelize` makes the auxiliary losses
    /// global). With a non-local reducer, `MoeOutput::load_balance` and `z_loss` are this
    /// process's additive shares of the global-batch losses.
    pub fn with_reducer(mut self, reducer: Arc<dyn BatchReducer>) -> Self {
        self.reducer = reducer;
        self
    }

    /// Keeps only the routed experts for which `held(e)` is true (the others become `None`:
    /// their memory is freed and they leave the parameter list).
    pub fn retain_experts(mut self, held: impl Fn(usize) -> bool) -> Self {
        for (e, slot) in self.experts.iter_mut().enumerate() {
            if !held(e) {
                *slot = None;
            }
        }
        self
    }

    /// Routed expert `e`. Panics if this rank does not hold it: the dispatcher's placement
    /// and the layer's experts disagree, a bug of whoever changed one without the other.
    pub fn expert(&self, e: usize) -> &SwiGlu {
        self.experts[e].as_ref().unwrap_or_else(|| {
            panic!(
                "expert {e} is not held by this rank, but the dispatcher routed rows to it; \
                 the placement and the layer's experts must change together"
            )
        })
    }

    /// Capacity per routing slot for `assignments = T * K` routed assignments. Null slots
    /// are never limited (they cost nothing). MoE++ splits capacity between FFN and
    /// zero-computation slots as its Eq. 8: `gamma * tau * A / (tau * N_ffn + N_zc)` and
    /// `gamma * A / (tau * N_ffn + N_zc)`; with tau = 1 this is the usual `gamma * A / N`.
    pub fn capacities(&self, assignments: usize) -> Vec<Option<usize>> {
        let kinds = self.router.slot_kinds();
        let CapacityConfig::Drop { factor } = self.capacity else {
            return vec![None; kinds.len()];
        };
        let tau = self.tau.unwrap_or(1.0);
        let n_ffn = kinds.iter().filter(|k| **k == SlotKind::Ffn).count() as f64;
        let n_other = kinds
            .iter()
            .filter(|k| !matches!(k, SlotKind::Ffn | SlotKind::Null))
            .count() as f64;
        let n_null = kinds.len() as f64 - n_ffn - n_other;
        // Null slots take their share of assignments without needing capacity.
        let denominator = tau * (n_ffn + n_null) + n_other;
        let a = assignments as f64;
        kinds
            .iter()
            .map(|kind| {
                let share = match kind {
                    SlotKind::Null => return None,
                    SlotKind::Ffn => tau * a / denominator,
                    _ => a / denominator,
                };
                Some(((factor * share).ceil() as usize).max(1))
            })
            .collect()
    }

    /// x: [B, S, D] -> y: [B, S, D], through the token dispatcher.
    pub fn forward(
        &self,
        x_bsd: Tensor<3>,
        carry: &mut RouterCarry,
        gru: Option<&Gru>,
    ) -> MoeOutput {
        self.forward_with(x_bsd, carry, gru, |layer, x_td, routing, kept| {
            let plan = DispatchPlan::new(routing, kept, layer.experts.len());
            let pipelined = profile::time(Part::Experts, || {
                layer
                    .dispatcher
                    .pipelined(&x_td, &plan, &routing.weights_tk, &layer.experts)
            });
            if let Some(done) = pipelined {
                return (done.y_td, layer.flops(&done.local_experts));
            }
            let dispatched = profile::time(Part::Dispatch, || {
                let x_td = profile::region_start(x_td, Part::Dispatch);
                let mut dispatched = layer.dispatcher.dispatch(x_td, plan);
                dispatched.rows_nd = profile::region_end(dispatched.rows_nd, Part::Dispatch);
                dispatched
            });
            let out_nd = profile::time(Part::Experts, || {
                let rows_nd = profile::region_start(dispatched.rows_nd, Part::Experts);
                let out_nd = layer.run_experts(rows_nd, &dispatched.local_experts);
                profile::region_end(out_nd, Part::Experts)
            });
            let y_td = profile::time(Part::Combine, || {
                let out_nd = profile::region_start(out_nd, Part::Combine);
                let weights_tk = profile::region_start(routing.weights_tk.clone(), Part::Combine);
                let y_td = dispatched.combine.combine(out_nd, weights_tk);
                profile::region_end(y_td, Part::Combine)
            });
            (y_td, layer.flops(&dispatched.local_experts))
        })
    }

    /// The oracle: every FFN expert runs on every token, and its output is weighted by the
    /// token's routing weight for that expert (zero when not chosen or dropped). No
    /// permutation, no dispatcher: slow and obviously right. Expert FLOPs are reported as
    /// the routed ones, so both paths agree on cost.
    pub fn forward_reference(
        &self,
        x_bsd: Tensor<3>,
        carry: &mut RouterCarry,
        gru: Option<&Gru>,
    ) -> MoeOutput {
        self.forward_with(x_bsd, carry, gru, |layer, x_td, routing, kept| {
            let mut y_td = x_td.zeros_like();
            let mut routed_rows = 0;
            for e in 0..layer.experts.len() {
                let expert = layer.expert(e);
                let gate_t1 = gate_of_slot(routing, kept, e);
                y_td = y_td + expert.forward(x_td.clone()) * gate_t1;
                routed_rows += (0..kept.len())
                    .filter(|&a| kept[a] && routing.experts_tk[a] == e)
                    .count();
            }
            let flops = layer
                .experts
                .first()
                .map(|_| layer.expert(0).forward_flops(routed_rows))
                .unwrap_or(0);
            (y_td, flops)
        })
    }

    /// Routing, capacity, extra experts, shared experts and auxiliary losses around a
    /// routed-FFN-expert core.
    fn forward_with(
        &self,
        x_bsd: Tensor<3>,
        carry: &mut RouterCarry,
        gru: Option<&Gru>,
        routed: impl FnOnce(&Self, Tensor<2>, &Routing, &[bool]) -> (Tensor<2>, u64),
    ) -> MoeOutput {
        let started = std::time::Instant::now();
        let x_bsd = profile::region_start(x_bsd, Part::MoeLayer);
        let [b, s, d] = x_bsd.dims();
        let x_td = x_bsd.reshape([b * s, d]);
        let routing = self.router.forward(x_td.clone(), carry, gru);
        let position = self.reducer.position(b, s);
        let admission = self.admit(&routing, &position);
        let kept = &admission.kept;
        let (mut y_td, expert_flops) = routed(self, x_td.clone(), &routing, kept);
        y_td = y_td + self.extra_experts(x_td.clone(), &routing, kept);
        if let Some(shared_td) = self
            .shared
            .iter()
            .map(|shared| shared.forward(x_td.clone()))
            .reduce(|a, b| a + b)
        {
            y_td = y_td
                + match &self.shared_gate {
                    // [T, 1] broadcast over D.
                    Some(w_d1) => sigmoid(x_td.clone().matmul(w_d1.val())) * shared_td,
                    None => shared_td,
                };
        }
        // Global slot counts and token count (identity in one process), then this
        // process's shares of the global-batch auxiliary losses.
        let mut values = slot_counts(&routing);
        values.push(routing.num_tokens as f64);
        let mut global = self.reducer.sum(values);
        let global_tokens = global.pop().unwrap_or(0.0).round() as usize;
        let load_balance = match self.balance_loss {
            BalanceLoss::Batch => {
                self.router
                    .load_balance_loss_share(&routing, &global, global_tokens)
            }
            BalanceLoss::GlobalBatch => {
                let counts = self.step_counts.as_deref().unwrap_or(&global);
                self.router
                    .load_balance_loss_share(&routing, counts, global_tokens)
            }
            BalanceLoss::Sequence => self.sequence_balance(&routing, &position),
        };
        let z = z_loss_share(&routing, global_tokens);
        let mut stats = self.stats(
            &routing,
            &admission,
            global,
            &load_balance,
            &z,
            expert_flops,
        );
        stats.seconds = started.elapsed().as_secs_f64();
        profile::add(Part::MoeLayer, stats.seconds);
        MoeOutput {
            y: profile::region_end(y_td.reshape([b, s, d]), Part::MoeLayer),
            load_balance,
            z_loss: z,
            stats,
        }
    }

    /// The capacity limits applied in the one-process order over the global batch: every
    /// process's choices are gathered with their tokens' global indices, admitted choice by
    /// choice in global token order against the capacities of the global assignment count,
    /// and each process keeps its own tokens' flags. So the dropped assignments, and the
    /// trained weights, do not depend on the layout.
    fn admit(&self, routing: &Routing, position: &BatchPosition) -> Admission {
        let (t, k) = (routing.num_tokens, routing.top_k);
        if matches!(self.capacity, CapacityConfig::Dropless {}) {
            return Admission {
                kept: vec![true; t * k],
                dropped: 0,
                dropped_ffn: 0,
            };
        }
        if position.is_whole() {
            let kept = admit(&routing.experts_tk, k, &self.capacities(t * k));
            let (dropped, dropped_ffn) = self.drops(&routing.experts_tk, &kept);
            return Admission {
                kept,
                dropped,
                dropped_ffn,
            };
        }
        // Per local token: its global index, then its k choices.
        let mut mine = Vec::with_capacity(t * (k + 1));
        for token in 0..t {
            mine.push(position.global_index(token) as i64);
            mine.extend(
                routing.experts_tk[token * k..(token + 1) * k]
                    .iter()
                    .map(|&e| e as i64),
            );
        }
        let gathered = self.reducer.gather(mine);
        let mut tokens: Vec<&[i64]> = gathered.chunks(k + 1).collect();
        tokens.sort_unstable_by_key(|token| token[0]);
        let experts_tk: Vec<usize> = tokens
            .iter()
            .flat_map(|token| token[1..].iter().map(|&e| e as usize))
            .collect();
        let kept_global = admit(&experts_tk, k, &self.capacities(tokens.len() * k));
        let (dropped, dropped_ffn) = self.drops(&experts_tk, &kept_global);
        // Global indices are distinct and sorted: a local token's flags sit at its rank.
        let kept = (0..t)
            .flat_map(|token| {
                let global = position.global_index(token) as i64;
                let at = tokens
                    .binary_search_by_key(&global, |token| token[0])
                    .expect("every local token is among the gathered ones");
                kept_global[at * k..(at + 1) * k].iter().copied()
            })
            .collect();
        Admission {
            kept,
            dropped,
            dropped_ffn,
        }
    }

    /// Dropped assignments among `experts` (flags `kept`): all, and those to FFN experts.
    fn drops(&self, experts: &[usize], kept: &[bool]) -> (usize, usize) {
        let kinds = self.router.slot_kinds();
        let dropped = experts.iter().zip(kept).filter(|(_, kept)| !**kept);
        let ffn = dropped
            .clone()
            .filter(|(e, _)| kinds[**e] == SlotKind::Ffn)
            .count();
        (dropped.count(), ffn)
    }

    /// This process's share of the sequence-wise balance loss: each local row's slot
    /// counts are summed over the processes holding parts of its sequence (an all-reduce
    /// of [global rows, N] counts), then [`Router::sequence_balance_loss_share`].
    fn sequence_balance(&self, routing: &Routing, position: &BatchPosition) -> Tensor<1> {
        let slots = routing.num_experts;
        let rows = position.rows;
        let mut counts = vec![0f64; position.global_rows * slots];
        for (a, &e) in routing.experts_tk.iter().enumerate() {
            let row = position.row_offset + a / routing.top_k / position.positions.len();
            counts[row * slots + e] += 1.0;
        }
        let counts = self.reducer.sum(counts);
        let row_counts: Vec<Vec<f64>> = (0..rows)
            .map(|b| {
                let row = position.row_offset + b;
                counts[row * slots..(row + 1) * slots].to_vec()
            })
            .collect();
        self.router.sequence_balance_loss_share(
            routing,
            &row_counts,
            position.global_len,
            position.global_rows,
        )
    }

    /// Sum over copy and constant slots of weight * E(x); null and zero slots add nothing.
    fn extra_experts(&self, x_td: Tensor<2>, routing: &Routing, kept: &[bool]) -> Tensor<2> {
        let mut y_td = x_td.zeros_like();
        for (slot, kind) in self.router.slot_kinds().iter().enumerate() {
            let output = match kind {
                SlotKind::Ffn | SlotKind::Null | SlotKind::Zero => continue,
                SlotKind::Copy => x_td.clone(),
                SlotKind::Constant(i) => self.constants[*i].forward(x_td.clone()),
            };
            y_td = y_td + output * gate_of_slot(routing, kept, slot);
        }
        y_td
    }

    fn stats(
        &self,
        routing: &Routing,
        admission: &Admission,
        global_counts: Vec<f64>,
        load_balance: &Tensor<1>,
        z: &Tensor<1>,
        expert_flops: u64,
    ) -> MoeStats {
        let kinds = self.router.slot_kinds();
        let assignments = global_counts.iter().sum::<f64>();
        let fraction = |c: f64| {
            if assignments > 0.0 {
                c / assignments
            } else {
                0.0
            }
        };
        let mut kind_fraction = [0.0; 5];
        for (slot, kind) in kinds.iter().enumerate() {
            let index = match kind {
                SlotKind::Ffn => 0,
                SlotKind::Null => 1,
                SlotKind::Zero => 2,
                SlotKind::Copy => 3,
                SlotKind::Constant(_) => 4,
            };
            kind_fraction[index] += fraction(global_counts[slot]);
        }
        let kept = &admission.kept;
        let routed_ffn: f64 = global_counts[..self.experts.len()].iter().sum();
        let kept_ffn = routed_ffn - admission.dropped_ffn as f64;
        let tokens = assignments / routing.top_k.max(1) as f64;
        MoeStats {
            expert_fraction: global_counts[..self.experts.len()]
                .iter()
                .map(|&c| fraction(c))
                .collect(),
            slot_counts: global_counts,
            kind_fraction,
            ffn_experts_per_token: if tokens > 0.0 { kept_ffn / tokens } else { 0.0 },
            dropped_fraction: if assignments > 0.0 {
                admission.dropped as f64 / assignments
            } else {
                0.0
            },
            bias: self.router.bias().map(<[f32]>::to_vec).unwrap_or_default(),
            load_balance: scalar(load_balance),
            z_loss: scalar(z),
            expert_flops,
            seconds: 0.0,
            top_k: routing.top_k,
            dispatched_tk: (0..kept.len())
                .map(|a| {
                    let slot = routing.experts_tk[a];
                    (kept[a] && kinds[slot] == SlotKind::Ffn).then_some(slot as u32)
                })
                .collect(),
        }
    }

    /// Forward FLOPs of the routed experts computed here.
    fn flops(&self, local_experts: &[(usize, usize)]) -> u64 {
        local_experts
            .iter()
            .map(|&(e, rows)| self.expert(e).forward_flops(rows))
            .sum()
    }

    /// rows: [R, D] grouped by expert as in `local_experts` -> outputs [R, D], same order:
    /// all local experts in one grouped op.
    fn run_experts(&self, rows_nd: Tensor<2>, local_experts: &[(usize, usize)]) -> Tensor<2> {
        let experts: Vec<&SwiGlu> = local_experts.iter().map(|&(e, _)| self.expert(e)).collect();
        let rows: Vec<usize> = local_experts.iter().map(|&(_, n)| n).collect();
        grouped_swiglu(rows_nd, &experts, &rows)
    }
}

/// Per token, the summed routing weight of its kept assignments to `slot`: [T, 1].
fn gate_of_slot(routing: &Routing, kept: &[bool], slot: usize) -> Tensor<2> {
    let (t, k) = (routing.num_tokens, routing.top_k);
    let mask: Vec<f32> = (0..t * k)
        .map(|a| (routing.experts_tk[a] == slot && kept[a]) as u8 as f32)
        .collect();
    let device = routing.weights_tk.device();
    let mask_tk = Tensor::<2>::from_data(TensorData::new(mask, [t, k]), &device);
    (routing.weights_tk.clone() * mask_tk).sum_dim(1)
}

fn scalar(t: &Tensor<1>) -> f64 {
    t.clone().inner().into_scalar::<f32>() as f64
}
