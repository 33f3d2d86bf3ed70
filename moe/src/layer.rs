//! The MoE feed-forward layer: router -> dispatch -> experts -> combine (+ shared experts).
//!
//! Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K top-k,
//! N routed rows.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};

use crate::config::{CapacityConfig, MoeConfig};
use crate::dispatch::{DispatchPlan, LocalDispatcher, TokenDispatcher, admit};
use crate::experts::SwiGlu;
use crate::init::Initializer;
use crate::router::{TopKRouter, aux_losses, expert_fractions};

/// Per-layer routing statistics for metrics.
#[derive(Debug, Clone, Default)]
pub struct MoeStats {
    /// Fraction of routed assignments per expert (before capacity dropping).
    pub expert_fraction: Vec<f64>,
    /// Fraction of assignments dropped by the capacity limit.
    pub dropped_fraction: f64,
    /// Unweighted load-balancing loss (1.0 = balanced).
    pub load_balance: f64,
    pub z_loss: f64,
    /// Matmul FLOPs spent in routed and shared experts in this forward.
    pub expert_flops: u64,
}

impl MoeStats {
    /// Max over mean of the per-expert load; 1.0 is perfect balance.
    pub fn max_over_mean_load(&self) -> f64 {
        let n = self.expert_fraction.len().max(1) as f64;
        let max = self.expert_fraction.iter().cloned().fold(0.0, f64::max);
        max * n
    }
}

/// Output of an MoE layer.
pub struct MoeOutput {
    /// [B, S, D]
    pub y: Tensor<3>,
    /// `lb_coef * load_balance + z_coef * z_loss`: scalar [1], added to the training loss.
    pub aux_loss: Tensor<1>,
    pub stats: MoeStats,
}

#[derive(Module, Debug)]
pub struct MoeLayer {
    pub router: TopKRouter,
    /// Routed experts, indexed by global expert id.
    pub experts: Vec<SwiGlu>,
    /// Always-on shared experts.
    pub shared: Vec<SwiGlu>,
    #[module(skip)]
    dispatcher: Arc<dyn TokenDispatcher>,
    #[module(skip)]
    capacity: CapacityConfig,
    #[module(skip)]
    load_balance_coef: f64,
    #[module(skip)]
    z_loss_coef: f64,
}

impl MoeLayer {
    pub fn new(d_model: usize, cfg: &MoeConfig, init: &mut Initializer) -> Self {
        let router = TopKRouter::new(d_model, cfg, init);
        let experts = (0..cfg.num_experts)
            .map(|_| SwiGlu::new(d_model, cfg.expert_ffn_dim, init))
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
        Self {
            router,
            experts,
            shared,
            dispatcher: Arc::new(LocalDispatcher),
            capacity: cfg.capacity,
            load_balance_coef: cfg.load_balance_coef,
            z_loss_coef: cfg.z_loss_coef,
        }
    }

    /// Swap the token dispatcher (how `parallelize` applies expert parallelism).
    pub fn with_dispatcher(mut self, dispatcher: Arc<dyn TokenDispatcher>) -> Self {
        self.dispatcher = dispatcher;
        self
    }

    fn capacity(&self, num_tokens: usize, top_k: usize) -> Option<usize> {
        match self.capacity {
            CapacityConfig::Dropless => None,
            CapacityConfig::Drop { factor } => {
                let per_expert = (num_tokens * top_k) as f64 / self.experts.len() as f64;
                Some(((factor * per_expert).ceil() as usize).max(1))
            }
        }
    }

    /// x: [B, S, D] -> y: [B, S, D], through the token dispatcher.
    pub fn forward(&self, x_bsd: Tensor<3>) -> MoeOutput {
        self.forward_with(x_bsd, |layer, x_td, routing, kept| {
            let plan = DispatchPlan::new(routing, kept);
            let dispatched = layer.dispatcher.dispatch(x_td, plan);
            let out_nd = layer.run_experts(dispatched.rows_nd, &dispatched.local_experts);
            let y_td =
                layer
                    .dispatcher
                    .combine(out_nd, routing.weights_tk.clone(), dispatched.handle);
            let flops = dispatched
                .local_experts
                .iter()
                .map(|&(e, rows)| layer.experts[e].forward_flops(rows))
                .sum();
            (y_td, flops)
        })
    }

    /// The oracle: every expert runs on every token, and its output is weighted by the
    /// token's routing weight for that expert (zero when not chosen or dropped). No
    /// permutation, no dispatcher: slow and obviously right.
    pub fn forward_reference(&self, x_bsd: Tensor<3>) -> MoeOutput {
        self.forward_with(x_bsd, |layer, x_td, routing, kept| {
            let device = x_td.device();
            let (t, k) = (routing.num_tokens, routing.top_k);
            let [_, d] = x_td.dims();
            let mut y_td = Tensor::<2>::zeros([t, d], &device);
            for (e, expert) in layer.experts.iter().enumerate() {
                let mask: Vec<f32> = (0..t * k)
                    .map(|a| (routing.experts_tk[a] == e && kept[a]) as u8 as f32)
                    .collect();
                let mask_tk = Tensor::<2>::from_data(TensorData::new(mask, [t, k]), &device);
                let gate_t1 = (routing.weights_tk.clone() * mask_tk).sum_dim(1);
                y_td = y_td + expert.forward(x_td.clone()) * gate_t1;
            }
            let flops = layer.experts.iter().map(|e| e.forward_flops(t)).sum();
            (y_td, flops)
        })
    }

    /// Routing, capacity, shared experts and auxiliary losses around a routed-expert core.
    fn forward_with(
        &self,
        x_bsd: Tensor<3>,
        routed: impl FnOnce(&Self, Tensor<2>, &crate::router::Routing, &[bool]) -> (Tensor<2>, u64),
    ) -> MoeOutput {
        let [b, s, d] = x_bsd.dims();
        let x_td = x_bsd.reshape([b * s, d]);
        let routing = self.router.forward(x_td.clone());
        let kept = admit(&routing, self.capacity(routing.num_tokens, routing.top_k));
        let (mut y_td, mut expert_flops) = routed(self, x_td.clone(), &routing, &kept);
        for shared in &self.shared {
            y_td = y_td + shared.forward(x_td.clone());
            expert_flops += shared.forward_flops(b * s);
        }
        let aux = aux_losses(&routing);
        let load_balance = scalar(&aux.load_balance);
        let z_loss = scalar(&aux.z_loss);
        let aux_loss =
            aux.load_balance * self.load_balance_coef as f32 + aux.z_loss * self.z_loss_coef as f32;
        let dropped = kept.iter().filter(|&&k| !k).count() as f64 / kept.len().max(1) as f64;
        MoeOutput {
            y: y_td.reshape([b, s, d]),
            aux_loss,
            stats: MoeStats {
                expert_fraction: expert_fractions(&routing),
                dropped_fraction: dropped,
                load_balance,
                z_loss,
                expert_flops,
            },
        }
    }

    /// rows: [N, D] grouped by expert as in `local_experts` -> outputs [N, D], same order.
    fn run_experts(&self, rows_nd: Tensor<2>, local_experts: &[(usize, usize)]) -> Tensor<2> {
        let [_, d] = rows_nd.dims();
        let mut outputs = Vec::with_capacity(local_experts.len());
        let mut offset = 0;
        for &(expert, rows) in local_experts {
            if rows == 0 {
                continue;
            }
            let chunk = rows_nd.clone().slice([offset..offset + rows, 0..d]);
            outputs.push(self.experts[expert].forward(chunk));
            offset += rows;
        }
        if outputs.is_empty() {
            return rows_nd;
        }
        Tensor::cat(outputs, 0)
    }
}

fn scalar(t: &Tensor<1>) -> f64 {
    t.clone().inner().into_scalar::<f32>() as f64
}
