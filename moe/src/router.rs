//! Routers: which routing slots each token visits, and with what weight.
//!
//! One `Router` type covers the router families of the config enum; what differs is how
//! the logits are computed (plain, + gating residual, from a recurrent state), how the
//! top-k weights are normalised, and the balancing loss.
//!
//! Shape legend: T tokens, D model dim, N routing slots (FFN experts + extra experts),
//! K top-k, P recurrent state size.

use burn::module::{Module, Param};
use burn::tensor::activation::{log_softmax, sigmoid, softmax};
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::config::{
    GroupLimitedConfig, MoeConfig, NullInit, NullNormalization, RouterConfig, ScoreFunction,
    SlotKind,
};
use crate::init::Initializer;

/// What a router decides for a batch of tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Weight of each chosen slot, fp32, differentiable: [T, K].
    pub weights_tk: Tensor<2>,
    /// Chosen slots, on the host, row-major [T, K].
    pub experts_tk: Vec<usize>,
    pub num_tokens: usize,
    pub top_k: usize,
    /// Routing slots N (FFN experts first, then the extra experts).
    pub num_experts: usize,
    /// Scores over all slots normalised to sum to one per token, fp32: [T, N] (for the
    /// balancing loss): the softmax, or the sigmoid scores over their sum.
    pub probs_te: Tensor<2>,
    /// Router logits, fp32: [T, N] (for the z-loss and the next layer's gating residual).
    pub logits_te: Tensor<2>,
}

/// State that travels from one MoE layer's router to the next within a forward pass.
#[derive(Debug, Clone, Default)]
pub struct RouterCarry {
    /// MoE++: the previous MoE layer's logits [T, N].
    pub prev_logits: Option<Tensor<2>>,
    /// RMoE: the GRU state after the previous MoE layer [T, P].
    pub state: Option<Tensor<2>>,
}

/// The GRU cell RMoE shares across layers: the recurrence runs over depth, every token in
/// parallel. Standard GRU update (the paper's Eq. 3 writes `W_h` for both the input and the
/// state term of the candidate; we use a separate `U_h` as every GRU does).
#[derive(Module, Debug)]
pub struct Gru {
    /// [P, P] each
    pub w_reset: Param<Tensor<2>>,
    pub u_reset: Param<Tensor<2>>,
    pub w_update: Param<Tensor<2>>,
    pub u_update: Param<Tensor<2>>,
    pub w_cand: Param<Tensor<2>>,
    pub u_cand: Param<Tensor<2>>,
    /// [P] each
    pub b_reset: Param<Tensor<1>>,
    pub b_update: Param<Tensor<1>>,
    pub b_cand: Param<Tensor<1>>,
}

impl Gru {
    pub fn new(state_dim: usize, init: &mut Initializer) -> Self {
        let std = 1.0 / (state_dim as f64).sqrt();
        let mut w = || init.normal_with_std([state_dim, state_dim], std);
        let (w_reset, u_reset, w_update, u_update, w_cand, u_cand) = (w(), w(), w(), w(), w(), w());
        let mut b = || init.normal_with_std([state_dim], 0.0);
        Self {
            w_reset,
            u_reset,
            w_update,
            u_update,
            w_cand,
            u_cand,
            b_reset: b(),
            b_update: b(),
            b_cand: b(),
        }
    }

    /// x: [T, P], h: [T, P] -> new h [T, P].
    pub fn forward(&self, x_tp: Tensor<2>, h_tp: Tensor<2>) -> Tensor<2> {
        let bias = |b: &Param<Tensor<1>>| b.val().unsqueeze::<2>();
        let reset = sigmoid(
            x_tp.clone().matmul(self.w_reset.val())
                + h_tp.clone().matmul(self.u_reset.val())
                + bias(&self.b_reset),
        );
        let update = sigmoid(
            x_tp.clone().matmul(self.w_update.val())
                + h_tp.clone().matmul(self.u_update.val())
                + bias(&self.b_update),
        );
        let candidate = (x_tp.matmul(self.w_cand.val())
            + reset * h_tp.clone().matmul(self.u_cand.val())
            + bias(&self.b_cand))
        .tanh();
        (update.ones_like() - update.clone()) * candidate + update * h_tp
    }
}

/// One MoE layer's router.
#[derive(Module, Debug)]
pub struct Router {
    /// [D, N], or [P, N] for the recurrent router.
    pub w_gate: Param<Tensor<2>>,
    /// MoE++ gating residual: [N, N].
    pub w_residual: Option<Param<Tensor<2>>>,
    /// RMoE per-layer projection into the GRU: [D, P].
    pub w_proj: Option<Param<Tensor<2>>>,
    #[module(skip)]
    cfg: RouterConfig,
    #[module(skip)]
    top_k: usize,
    #[module(skip)]
    kinds: Vec<SlotKind>,
    #[module(skip)]
    score: ScoreFunction,
    #[module(skip)]
    scaling_factor: f64,
    #[module(skip)]
    groups: Option<GroupLimitedConfig>,
    /// Auxiliary-loss-free balancing: the bias of each FFN expert, added to its score when
    /// the top-k is chosen (not to the weights). `None` without `bias_balance`. Not a
    /// parameter: no gradient, moved by [`Router::update_bias`] after each step.
    #[module(skip)]
    bias: Option<Vec<f32>>,
}

impl Router {
    pub fn new(d_model: usize, cfg: &MoeConfig, init: &mut Initializer) -> Self {
        let kinds = cfg.slot_kinds();
        let slots = kinds.len();
        let (w_gate, w_residual, w_proj) = match &cfg.router {
            RouterConfig::TopKSoftmax { .. } => (init.normal([d_model, slots]), None, None),
            RouterConfig::NullExperts { null_init, .. } => {
                let w = init.normal([d_model, slots]);
                let w = match null_init {
                    NullInit::Random => w,
                    NullInit::CopyTrueRows => {
                        let true_rows = w.val().slice([0..d_model, 0..cfg.num_experts]);
                        Param::from_tensor(expand_with_copies(true_rows, slots).detach())
                    }
                };
                (w, None, None)
            }
            RouterConfig::MoePlusPlus {
                gating_residual, ..
            } => (
                init.normal([d_model, slots]),
                gating_residual.then(|| init.normal([slots, slots])),
                None,
            ),
            RouterConfig::Recurrent { state_dim, .. } => (
                init.normal_with_std([*state_dim, slots], 1.0 / (*state_dim as f64).sqrt()),
                None,
                Some(init.normal([d_model, *state_dim])),
            ),
        };
        Self {
            w_gate,
            w_residual,
            w_proj,
            cfg: cfg.router.clone(),
            top_k: cfg.top_k,
            kinds,
            score: cfg.score,
            scaling_factor: cfg.scaling_factor,
            groups: cfg.group_limited,
            bias: cfg.bias_balance.map(|_| vec![0.0; cfg.num_experts]),
        }
    }

    /// The auxiliary-loss-free bias of each FFN expert (`None` without `bias_balance`).
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// Replaces the bias (a restored checkpoint). Panics on a length other than the
    /// number of FFN experts: the caller checks it against the model first.
    pub fn set_bias(&mut self, bias: Vec<f32>) {
        let experts = self.kinds.iter().filter(|k| **k == SlotKind::Ffn).count();
        assert_eq!(bias.len(), experts, "one bias per FFN expert");
        self.bias = Some(bias);
    }

    /// One auxiliary-loss-free step: `bias_e += gamma * sign(mean - load_e)` over the FFN
    /// experts, from `ffn_counts` (the step's assignments per FFN expert, over every rank
    /// and micro-batch: the same on every rank, so every replica moves alike). An expert at
    /// exactly the mean load keeps its bias. No-op without `bias_balance`.
    pub fn update_bias(&mut self, ffn_counts: &[f64], gamma: f64) {
        let Some(bias) = &mut self.bias else {
            return;
        };
        let mean = ffn_counts.iter().sum::<f64>() / ffn_counts.len().max(1) as f64;
        for (b, &load) in bias.iter_mut().zip(ffn_counts) {
            let step = if load < mean {
                gamma
            } else if load > mean {
                -gamma
            } else {
                0.0
            };
            *b = (*b as f64 + step) as f32;
        }
    }

    pub fn slot_kinds(&self) -> &[SlotKind] {
        &self.kinds
    }

    /// x: [T, D] -> routing decisions. Computed in fp32 whatever the activation dtype.
    /// Reads and updates `carry` (gating residual, recurrent state); `gru` is the model's
    /// shared cell, required by the recurrent router.
    pub fn forward(&self, x_td: Tensor<2>, carry: &mut RouterCarry, gru: Option<&Gru>) -> Routing {
        let x_td = x_td.cast(DType::F32);
        let w_gate = self.w_gate.val().cast(DType::F32);
        let logits_te = match &self.cfg {
            RouterConfig::TopKSoftmax { .. } | RouterConfig::NullExperts { .. } => {
                x_td.matmul(w_gate)
            }
            RouterConfig::MoePlusPlus { .. } => {
                let own = x_td.matmul(w_gate);
                match (&self.w_residual, carry.prev_logits.take()) {
                    (Some(w_res), Some(prev)) => own + prev.matmul(w_res.val().cast(DType::F32)),
                    _ => own,
                }
            }
            RouterConfig::Recurrent { detach_state, .. } => {
                let gru = gru.expect("the recurrent router needs the model's shared GRU");
                let proj = self
                    .w_proj
                    .as_ref()
                    .expect("recurrent router has a projection");
                let x_tp = x_td.matmul(proj.val().cast(DType::F32));
                let h_prev = match carry.state.take() {
                    Some(h) if *detach_state => h.detach(),
                    Some(h) => h,
                    None => x_tp.zeros_like(),
                };
                let h_tp = gru.forward(x_tp, h_prev);
                carry.state = Some(h_tp.clone());
                h_tp.matmul(w_gate)
            }
        };
        if matches!(self.cfg, RouterConfig::MoePlusPlus { .. }) {
            carry.prev_logits = Some(logits_te.clone());
        }
        let [num_tokens, num_experts] = logits_te.dims();
        let (scores_te, probs_te) = match self.score {
            ScoreFunction::Softmax => {
                let probs_te = softmax(logits_te.clone(), 1);
                (probs_te.clone(), probs_te)
            }
            ScoreFunction::Sigmoid => {
                let scores_te = sigmoid(logits_te.clone());
                let probs_te = scores_te.clone() / scores_te.clone().sum_dim(1);
                (scores_te, probs_te)
            }
        };
        let (raw_tk, experts_tk) = if self.bias.is_none() && self.groups.is_none() {
            let (raw_tk, experts_tk) = scores_te.topk_with_indices(self.top_k, 1);
            let experts_tk: Vec<usize> = experts_tk
                .try_into_vec_as::<i64>()
                .expect("top-k indices are integers")
                .into_iter()
                .map(|e| e as usize)
                .collect();
            (raw_tk, experts_tk)
        } else {
            // Biased or group-limited choice: ranked on the host, the weights gathered from
            // the unbiased scores (the bias never reaches the gradient).
            let host: Vec<f32> = scores_te
                .clone()
                .inner()
                .into_data()
                .try_to_vec::<f32>()
                .expect("router scores are f32");
            let experts_tk = self.choose(&host, num_experts);
            let index: Vec<i64> = experts_tk.iter().map(|&e| e as i64).collect();
            let index_tk = Tensor::<2, Int>::from_data(
                TensorData::new(index, [num_tokens, self.top_k]),
                &scores_te.device(),
            );
            (scores_te.gather(1, index_tk), experts_tk)
        };
        let mut weights_tk = self.normalize(raw_tk, &experts_tk);
        if self.scaling_factor != 1.0 {
            weights_tk = weights_tk * self.scaling_factor as f32;
        }
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

    /// The top-k slots of each token (row-major [T, K], best first) under the bias and the
    /// group limit. `scores`: [T, N] row-major. Ties go to the lower slot id.
    fn choose(&self, scores: &[f32], slots: usize) -> Vec<usize> {
        let k = self.top_k;
        let mut chosen = Vec::with_capacity(scores.len() / slots.max(1) * k);
        let mut keyed: Vec<(f32, usize)> = Vec::with_capacity(slots);
        for token_scores in scores.chunks(slots) {
            keyed.clear();
            keyed.extend(token_scores.iter().enumerate().map(|(e, &score)| {
                let bias = self.bias.as_ref().and_then(|b| b.get(e)).copied();
                (score + bias.unwrap_or(0.0), e)
            }));
            if let Some(groups) = &self.groups {
                keep_best_groups(&mut keyed, groups);
            }
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            chosen.extend(keyed.iter().take(k).map(|&(_, e)| e));
        }
        chosen
    }

    /// The per-variant weight normalisation of the chosen top-k probabilities.
    fn normalize(&self, raw_tk: Tensor<2>, experts_tk: &[usize]) -> Tensor<2> {
        // Renormalise over the chosen slots whose `keep` is true; the others get weight 0.
        // A row with nothing to keep stays all zero (the reference code's "sum 0 -> 1").
        let renormalize_over = |keep: &dyn Fn(SlotKind) -> bool| {
            let [t, k] = raw_tk.dims();
            let mask: Vec<f32> = experts_tk
                .iter()
                .map(|&e| keep(self.kinds[e]) as u8 as f32)
                .collect();
            let mask_tk = Tensor::<2>::from_data(TensorData::new(mask, [t, k]), &raw_tk.device());
            let kept_tk = raw_tk.clone() * mask_tk.clone();
            let sum_t1 = kept_tk.clone().sum_dim(1);
            // Where nothing is kept, divide by 1 instead of 0.
            let empty_t1 = mask_tk.sum_dim(1).equal_elem(0.0);
            kept_tk / sum_t1.mask_fill(empty_t1, 1.0)
        };
        match &self.cfg {
            RouterConfig::TopKSoftmax { normalize_weights }
            | RouterConfig::Recurrent {
                normalize_weights, ..
            } => {
                if *normalize_weights {
                    raw_tk.clone() / raw_tk.sum_dim(1)
                } else {
                    raw_tk
                }
            }
            RouterConfig::NullExperts { normalize, .. } => match normalize {
                NullNormalization::TrueExperts => renormalize_over(&|kind| kind == SlotKind::Ffn),
                NullNormalization::AllChosen => raw_tk.clone() / raw_tk.sum_dim(1),
            },
            RouterConfig::MoePlusPlus {
                normalize_weights, ..
            } => {
                if *normalize_weights {
                    renormalize_over(&|kind| kind != SlotKind::Zero)
                } else {
                    raw_tk
                }
            }
        }
    }

    /// The load-balancing loss of this router family (unscaled; 1.0 when balanced):
    /// Switch `N * sum_i f_i P_i`; AdaMoE's null-aware form, where all null experts share
    /// one averaged bucket; MoE++'s heterogeneous form, where zero-computation slots are
    /// weighted by `tau` (scaled by N so that tau = 1 is the Switch loss).
    pub fn load_balance_loss(&self, routing: &Routing) -> Tensor<1> {
        let counts = slot_counts(routing);
        self.load_balance_loss_share(routing, &counts, routing.num_tokens)
    }

    /// This process's additive share of the load-balancing loss of a batch spread over
    /// several processes. `counts`: routed assignments per slot over the batch whose
    /// fractions `f` the loss uses (no gradient flows through them); `global_tokens`:
    /// tokens of the batch this forward is a share of. The share is
    /// `sum_i c_i(f) * (sum over local tokens of p_ti) / global_tokens`, so the shares of
    /// all processes sum to the loss of the whole batch computed in one process. With the
    /// local counts and token count it is the loss of this batch.
    pub fn load_balance_loss_share(
        &self,
        routing: &Routing,
        counts: &[f64],
        global_tokens: usize,
    ) -> Tensor<1> {
        let coef: Vec<f32> = self
            .balance_coefficients(counts)
            .into_iter()
            .map(|c| c as f32)
            .collect();
        let device = routing.probs_te.device();
        let coef_e = Tensor::<1>::from_floats(coef.as_slice(), &device);
        let mean_prob_e: Tensor<1> =
            routing.probs_te.clone().sum_dim(0).squeeze_dim::<1>(0) / global_tokens.max(1) as f32;
        (coef_e * mean_prob_e).sum()
    }

    /// This process's share of the sequence-wise balance loss `mean_b sum_i c_i(f^b) P^b_i`
    /// (DeepSeek-V3), `f^b` and `P^b` over the tokens of sequence `b` alone. The routing is
    /// of `rows` local rows of equal length, row-major; `row_counts[b]`: the assignments per
    /// slot of the whole sequence of local row `b` (summed over the processes holding parts
    /// of it); `seq_len` and `sequences`: the global sequence length and count.
    pub fn sequence_balance_loss_share(
        &self,
        routing: &Routing,
        row_counts: &[Vec<f64>],
        seq_len: usize,
        sequences: usize,
    ) -> Tensor<1> {
        let rows = row_counts.len();
        let slots = routing.num_experts;
        let coef: Vec<f32> = row_counts
            .iter()
            .flat_map(|counts| self.balance_coefficients(counts))
            .map(|c| c as f32)
            .collect();
        let device = routing.probs_te.device();
        let coef_be = Tensor::<2>::from_data(TensorData::new(coef, [rows, slots]), &device);
        let local_len = routing.num_tokens / rows.max(1);
        let prob_sum_be = routing
            .probs_te
            .clone()
            .reshape([rows, local_len, slots])
            .sum_dim(1)
            .reshape([rows, slots]);
        (coef_be * prob_sum_be).sum() / (seq_len * sequences).max(1) as f32
    }

    /// `c_i(f)` of the balance loss `sum_i c_i(f) P_i` from the assignments per slot
    /// (`f_i = counts_i / sum(counts)`): `N f_i` (Switch), with the null experts' fractions
    /// pooled to their mean (AdaMoE), or the zero-computation slots weighted by `tau`
    /// (MoE++).
    pub fn balance_coefficients(&self, counts: &[f64]) -> Vec<f64> {
        let assignments = counts.iter().sum::<f64>().max(1.0);
        let mut fraction: Vec<f64> = counts.iter().map(|c| c / assignments).collect();
        let slots = self.kinds.len();
        let mut weight = vec![1.0f64; slots];
        match &self.cfg {
            RouterConfig::TopKSoftmax { .. } | RouterConfig::Recurrent { .. } => {}
            RouterConfig::NullExperts { .. } => {
                let nulls: Vec<usize> = (0..slots)
                    .filter(|&i| self.kinds[i] == SlotKind::Null)
                    .collect();
                let mean = nulls.iter().map(|&i| fraction[i]).sum::<f64>() / nulls.len() as f64;
                for i in nulls {
                    fraction[i] = mean;
                }
            }
            RouterConfig::MoePlusPlus { tau, .. } => {
                for (i, kind) in self.kinds.iter().enumerate() {
                    if *kind != SlotKind::Ffn {
                        weight[i] = *tau;
                    }
                }
            }
        }
        (0..slots)
            .map(|i| weight[i] * fraction[i] * slots as f64)
            .collect()
    }
}

/// Group-limited routing for one token: `keyed` holds (choice score, slot) for every slot
/// (all FFN experts, in slot order); the slots outside the token's best `top_groups`
/// groups get -inf. A group's rank is the sum of its two best choice scores (its only one
/// for groups of one expert); ties go to the lower group.
fn keep_best_groups(keyed: &mut [(f32, usize)], groups: &GroupLimitedConfig) {
    let per_group = keyed.len() / groups.groups;
    let mut group_scores: Vec<(f32, usize)> = keyed
        .chunks(per_group)
        .enumerate()
        .map(|(g, members)| {
            let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &(score, _) in members {
                if score > first {
                    (first, second) = (score, first);
                } else if score > second {
                    second = score;
                }
            }
            let sum = if per_group > 1 { first + second } else { first };
            (sum, g)
        })
        .collect();
    group_scores.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut keep = vec![false; groups.groups];
    for &(_, g) in group_scores.iter().take(groups.top_groups) {
        keep[g] = true;
    }
    for (score, e) in keyed.iter_mut() {
        if !keep[*e / per_group] {
            *score = f32::NEG_INFINITY;
        }
    }
}

/// `w`: [D, n] -> [D, slots] whose extra columns repeat the first n cyclically.
pub fn expand_with_copies(w_dn: Tensor<2>, slots: usize) -> Tensor<2> {
    let [d, n] = w_dn.dims();
    let columns: Vec<Tensor<2>> = (0..slots)
        .map(|i| w_dn.clone().slice([0..d, i % n..i % n + 1]))
        .collect();
    Tensor::cat(columns, 1)
}

/// Routed assignments (before capacity dropping) per slot.
pub fn slot_counts(routing: &Routing) -> Vec<f64> {
    let mut counts = vec![0f64; routing.num_experts];
    for &e in &routing.experts_tk {
        counts[e] += 1.0;
    }
    counts
}

/// ST-MoE router z-loss `mean_t logsumexp(logits_t)^2`: [1].
pub fn z_loss(routing: &Routing) -> Tensor<1> {
    z_loss_share(routing, routing.num_tokens)
}

/// This process's additive share of the z-loss of a batch of `global_tokens` tokens:
/// `sum over local tokens of logsumexp^2 / global_tokens`.
pub fn z_loss_share(routing: &Routing, global_tokens: usize) -> Tensor<1> {
    // logsumexp = logits - log_softmax, taken at any column; column 0 is always present.
    let lse_t = (routing.logits_te.clone() - log_softmax(routing.logits_te.clone(), 1))
        .slice([0..routing.num_tokens, 0..1])
        .squeeze_dim::<1>(1);
    lse_t.powi_scalar(2).sum() / global_tokens.max(1) as f32
}
