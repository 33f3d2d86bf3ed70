//! Routers: which experts each token visits, and with what weight.
//!
//! Shape legend: T tokens, D model dim, E experts, K top-k.

use burn::module::{Module, Param};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{DType, Tensor};

use crate::config::{MoeConfig, RouterConfig};
use crate::init::Initializer;

/// What a router decides for a batch of tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Weight of each chosen expert, fp32, differentiable: [T, K].
    pub weights_tk: Tensor<2>,
    /// Chosen experts, on the host, row-major [T, K].
    pub experts_tk: Vec<usize>,
    pub num_tokens: usize,
    pub top_k: usize,
    pub num_experts: usize,
    /// Softmax probabilities over all experts, fp32: [T, E] (for the balancing loss).
    pub probs_te: Tensor<2>,
    /// Raw router logits, fp32: [T, E] (for the z-loss).
    pub logits_te: Tensor<2>,
}

/// Top-k softmax router (Switch / GShard / Mixtral).
#[derive(Module, Debug)]
pub struct TopKRouter {
    /// [D, E]
    pub w_gate: Param<Tensor<2>>,
    #[module(skip)]
    top_k: usize,
    #[module(skip)]
    normalize_weights: bool,
}

impl TopKRouter {
    pub fn new(d_model: usize, cfg: &MoeConfig, init: &mut Initializer) -> Self {
        let RouterConfig::TopKSoftmax { normalize_weights } = cfg.router;
        Self {
            w_gate: init.normal([d_model, cfg.num_experts]),
            top_k: cfg.top_k,
            normalize_weights,
        }
    }

    /// x: [T, D] -> routing decisions. Computed in fp32 whatever the activation dtype.
    pub fn forward(&self, x_td: Tensor<2>) -> Routing {
        let x_td = x_td.cast(DType::F32);
        let w_de = self.w_gate.val().cast(DType::F32);
        let logits_te = x_td.matmul(w_de);
        let [num_tokens, num_experts] = logits_te.dims();
        let probs_te = softmax(logits_te.clone(), 1);
        let (mut weights_tk, experts_tk) = probs_te.clone().topk_with_indices(self.top_k, 1);
        if self.normalize_weights {
            weights_tk = weights_tk.clone() / weights_tk.sum_dim(1);
        }
        let experts_tk: Vec<usize> = experts_tk
            .try_into_vec_as::<i64>()
            .expect("top-k indices are integers")
            .into_iter()
            .map(|e| e as usize)
            .collect();
        Routing {
            weights_tk,
            experts_tk,
            num_tokens,
            top_k: self.top_k,
            num_experts,
            probs_te,
            logits_te,
        }
    }
}

/// Auxiliary losses of one MoE layer, before their coefficients.
pub struct AuxLosses {
    /// Switch load-balancing loss `E * sum_e f_e * P_e`; 1.0 when perfectly balanced.
    pub load_balance: Tensor<1>,
    /// ST-MoE router z-loss `mean_t logsumexp(logits_t)^2`.
    pub z_loss: Tensor<1>,
}

/// `f_e` is the fraction of routed assignments (before capacity dropping) that chose expert
/// `e` — a constant — and `P_e` the mean router probability of `e`, which carries the gradient.
pub fn aux_losses(routing: &Routing) -> AuxLosses {
    let device = routing.probs_te.device();
    let mut counts = vec![0f32; routing.num_experts];
    for &e in &routing.experts_tk {
        counts[e] += 1.0;
    }
    let assignments = (routing.num_tokens * routing.top_k).max(1) as f32;
    let fraction_e: Tensor<1> = Tensor::from_floats(
        counts
            .iter()
            .map(|c| c / assignments)
            .collect::<Vec<_>>()
            .as_slice(),
        &device,
    );
    let mean_prob_e: Tensor<1> = routing.probs_te.clone().mean_dim(0).squeeze_dim(0);
    let load_balance = (fraction_e * mean_prob_e).sum() * routing.num_experts as f32;
    // logsumexp = logits - log_softmax, taken at any column; column 0 is always present.
    let lse_t = (routing.logits_te.clone() - log_softmax(routing.logits_te.clone(), 1))
        .slice([0..routing.num_tokens, 0..1])
        .squeeze_dim::<1>(1);
    let z_loss = lse_t.powi_scalar(2).mean();
    AuxLosses {
        load_balance,
        z_loss,
    }
}

/// Route-level statistics for metrics: the fraction of assignments per expert.
pub fn expert_fractions(routing: &Routing) -> Vec<f64> {
    let mut counts = vec![0f64; routing.num_experts];
    for &e in &routing.experts_tk {
        counts[e] += 1.0;
    }
    let total = routing.experts_tk.len().max(1) as f64;
    counts.iter().map(|c| c / total).collect()
}
