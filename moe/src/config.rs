//! Config nodes owned by the model code. The root YAML tree embeds them under `model:`.
//!
//! Each node validates itself and reports issues as `(key path relative to the node,
//! message with a hint)`, so the loader can point at the offending line of the YAML file.

use serde::{Deserialize, Serialize};

/// Issues found by a `validate` call: (key path relative to the node, message).
pub type ConfigIssues = Vec<(String, String)>;

/// The decoder-only transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Size of the token vocabulary; must equal the tokenizer's.
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    /// Hidden size of the dense SwiGLU feed-forward blocks (layers without MoE).
    pub ffn_dim: usize,
    /// Longest sequence the rotary tables are built for.
    pub max_seq_len: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Share the token embedding matrix with the LM head.
    #[serde(default = "default_true")]
    pub tie_embeddings: bool,
    /// Standard deviation of the normal initialisation of every weight matrix.
    #[serde(default = "default_init_std")]
    pub init_std: f64,
    /// Attention variants (grouped-query heads, head size, biases, q/k norm); the defaults
    /// are plain multi-head attention without biases.
    #[serde(default)]
    pub attention: AttentionConfig,
    pub moe: MoeConfig,
}

/// How the attention block's projections are shaped. Every default keeps plain multi-head
/// attention (H heads of d_model / H, no biases, no q/k norm).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AttentionConfig {
    /// Key/value heads (grouped-query attention: each serves n_heads / kv_heads query
    /// heads); default n_heads.
    #[serde(default)]
    pub kv_heads: Option<usize>,
    /// Size of each head; default d_model / n_heads (Qwen3 uses 128 at any width).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Which projections carry a bias.
    #[serde(default)]
    pub bias: AttentionBias,
    /// RMSNorm over each head of q and k before RoPE (Qwen3), with the model's norm_eps.
    #[serde(default)]
    pub qk_norm: bool,
}

/// Biases of the attention projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttentionBias {
    /// No bias (Llama, Mixtral).
    #[default]
    None,
    /// q, k and v carry biases, the output projection none (Qwen2, Qwen2-MoE).
    Qkv,
    /// q, k, v and the output projection (Qwen3's `attention_bias: true`).
    All,
}

/// The mixture-of-experts feed-forward blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Layer `l` has an MoE block when `l % every == 0`; the others have a dense FFN.
    /// `every: 1` puts MoE in every layer.
    #[serde(default = "default_one")]
    pub every: usize,
    pub num_experts: usize,
    pub top_k: usize,
    /// Hidden size of each SwiGLU expert.
    pub expert_ffn_dim: usize,
    #[serde(default)]
    pub router: RouterConfig,
    #[serde(default)]
    pub capacity: CapacityConfig,
    /// Always-on experts that every token passes through beside the routed ones.
    #[serde(default)]
    pub shared_expert: Option<SharedExpertConfig>,
    /// Coefficient of the Switch-Transformer load-balancing loss.
    #[serde(default = "default_lb_coef")]
    pub load_balance_coef: f64,
    /// Coefficient of the ST-MoE router z-loss.
    #[serde(default = "default_z_coef")]
    pub z_loss_coef: f64,
    /// Over which tokens the load-balancing loss counts its expert fractions.
    #[serde(default)]
    pub balance_loss: BalanceLoss,
    /// How the router turns logits into scores.
    #[serde(default)]
    pub score: ScoreFunction,
    /// Multiplies the combine weights of every routed slot after normalisation (DeepSeek-V3's
    /// `routed_scaling_factor`, 2.5 there).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Group-limited routing: each token keeps its best groups of experts first.
    #[serde(default)]
    pub group_limited: Option<GroupLimitedConfig>,
    /// Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias on the scores that
    /// choose the top-k, moved towards balance after every step.
    #[serde(default)]
    pub bias_balance: Option<BiasBalanceConfig>,
}

/// A small MoE block (4 experts, top-2, width 32) with every option at its YAML default:
/// the base of struct literals in tests and tools (`..Default::default()`).
impl Default for MoeConfig {
    fn default() -> Self {
        MoeConfig {
            every: 1,
            num_experts: 4,
            top_k: 2,
            expert_ffn_dim: 32,
            router: RouterConfig::default(),
            capacity: CapacityConfig::default(),
            shared_expert: None,
            load_balance_coef: default_lb_coef(),
            z_loss_coef: default_z_coef(),
            balance_loss: BalanceLoss::default(),
            score: ScoreFunction::default(),
            scaling_factor: default_scaling_factor(),
            group_limited: None,
            bias_balance: None,
        }
    }
}

/// Over which tokens the load-balancing loss measures the expert fractions `f_i` and the
/// mean scores `P_i` (the loss is `sum_i c_i(f) P_i`; see `Router::balance_coefficients`).
/// Every variant is defined on the global batch, so none depends on the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BalanceLoss {
    /// The micro-batch: all its sequences on every rank (Switch, GShard).
    #[default]
    Batch,
    /// Each sequence on its own, then the mean over the sequences (DeepSeek-V3's
    /// sequence-wise balance loss).
    Sequence,
    /// The whole optimizer step: every rank and every accumulation micro-batch
    /// (Megatron-Core's global aux loss). With `grad_accum_steps > 1` the step's counts
    /// come from an extra forward pass without gradients before the first micro-batch.
    GlobalBatch,
}

/// How the router turns its logits into the scores it ranks and weights experts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScoreFunction {
    /// Softmax over the routing slots.
    #[default]
    Softmax,
    /// An independent sigmoid per slot (DeepSeek-V3); the balance loss then uses the
    /// scores normalised to sum to one over the slots.
    Sigmoid,
}

/// Group-limited routing (DeepSeek-V2/V3's node-limited routing): the FFN experts form
/// `groups` groups of consecutive ids; each token ranks the groups by the sum of its two
/// best scores in each, keeps the best `top_groups`, and takes its top-k inside them.
/// Give the groups the experts of one node (or one ep rank) each, so a token's rows cross
/// at most `top_groups` node boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupLimitedConfig {
    pub groups: usize,
    pub top_groups: usize,
}

/// Auxiliary-loss-free balancing: after each optimizer step, every FFN expert's bias moves
/// by `gamma * sign(mean_load - load_e)`, loads counted over every rank and micro-batch of
/// the step. The bias changes which experts are chosen, never their weights. Null and
/// zero-computation slots carry no bias: how often a token skips computation is left to
/// the router (and its balance loss), the bias only evens the load among the FFN experts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BiasBalanceConfig {
    /// Bias update speed (DeepSeek-V3: 0.001).
    pub gamma: f64,
}

/// How tokens are assigned to experts: one router family, with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RouterConfig {
    /// Softmax over the experts (in fp32), then the top-k.
    TopKSoftmax {
        /// Renormalise the k selected probabilities to sum to one (Mixtral);
        /// `false` keeps the raw softmax probabilities (Switch, GShard).
        #[serde(default = "default_true")]
        normalize_weights: bool,
    },
    /// AdaMoE: `num_null` parameter-free null experts join the `num_experts` true ones;
    /// top-k runs over all of them, so a token may use fewer than k true experts (or none:
    /// then it passes the layer unchanged).
    NullExperts {
        /// `m`, the number of null experts.
        num_null: usize,
        /// Which chosen weights are renormalised to sum to one.
        #[serde(default)]
        normalize: NullNormalization,
        /// How the router rows of the null experts start.
        #[serde(default)]
        null_init: NullInit,
        /// "Tight then loose": the load-balancing coefficient drops to `loose_coef` after
        /// `after_step` optimizer steps (the paper: 0.02 in epoch 1, 0.0001 in epoch 2).
        #[serde(default)]
        anneal: Option<BalanceAnneal>,
    },
    /// MoE++: zero (discard), copy (skip) and constant experts beside the FFN experts,
    /// a heterogeneous load-balancing loss weighted by `tau`, and gating residuals.
    MoePlusPlus {
        #[serde(default = "default_one")]
        zero: usize,
        #[serde(default = "default_one")]
        copy: usize,
        #[serde(default = "default_two")]
        constant: usize,
        /// Weight of zero-computation experts in the balancing loss and capacity (paper: 0.75).
        #[serde(default = "default_tau")]
        tau: f64,
        /// Each layer's router adds a learned transform of the previous MoE layer's logits.
        #[serde(default = "default_true")]
        gating_residual: bool,
        /// `false` (the paper, Eq. 1) keeps raw softmax weights; `true` (the reference
        /// code) zeroes zero-expert weights and renormalises the rest over the top-k.
        #[serde(default)]
        normalize_weights: bool,
    },
    /// RMoE: a per-layer projection feeds one GRU cell shared across layers; each layer's
    /// router reads the GRU state, and gradients flow through it from layer to layer.
    Recurrent {
        /// GRU state size `p` (paper: 128).
        #[serde(default = "default_state_dim")]
        state_dim: usize,
        /// Detach the incoming state (the ablation the paper reports as harmful).
        #[serde(default)]
        detach_state: bool,
        #[serde(default = "default_true")]
        normalize_weights: bool,
    },
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig::TopKSoftmax {
            normalize_weights: true,
        }
    }
}

/// AdaMoE weight normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NullNormalization {
    /// Over the true experts among the top-k only (the paper's choice): output scale
    /// matches vanilla MoE.
    #[default]
    TrueExperts,
    /// Over all k chosen, nulls included.
    AllChosen,
}

/// Initial router rows of the null experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NullInit {
    /// Drawn like every other weight.
    #[default]
    Random,
    /// Copied cyclically from the true experts' rows, so the expanded router starts
    /// balanced (the paper's choice when converting a trained model).
    CopyTrueRows,
}

/// The load-balancing coefficient after the "tight" phase.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceAnneal {
    pub loose_coef: f64,
    pub after_step: u64,
}

/// What one routing slot of an MoE layer computes. Slots `0..num_experts` are the FFN
/// experts (global expert ids); the router's extra slots follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    Ffn,
    Null,
    Zero,
    Copy,
    /// The i-th constant expert of the layer.
    Constant(usize),
}

/// What happens when more tokens choose an expert than it has room for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CapacityConfig {
    /// Every routed token is computed; expert batches have variable size. A struct variant,
    /// not a unit one: serde ignores unknown keys next to the tag of a unit variant (serde
    /// issue 2123), and `{type: dropless, factor: 1.25}` must be rejected.
    Dropless {},
    /// Each expert takes at most `ceil(factor * tokens * top_k / num_experts)` assignments;
    /// the rest are dropped (the token keeps its residual path).
    Drop { factor: f64 },
}

impl Default for CapacityConfig {
    fn default() -> Self {
        CapacityConfig::Dropless {}
    }
}

/// Always-on shared experts (DeepSeek-MoE style).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedExpertConfig {
    /// Number of shared experts.
    #[serde(default = "default_one")]
    pub count: usize,
    /// Hidden size of each shared expert.
    pub ffn_dim: usize,
    /// Scale the shared experts' sum by a learned per-token gate, sigmoid(x @ w) with
    /// w: [d_model, 1] (Qwen2-MoE's `shared_expert_gate`).
    #[serde(default)]
    pub gate: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_init_std() -> f64 {
    0.02
}
fn default_one() -> usize {
    1
}
fn default_two() -> usize {
    2
}
fn default_tau() -> f64 {
    0.75
}
fn default_state_dim() -> usize {
    128
}
fn default_lb_coef() -> f64 {
    0.01
}
fn default_z_coef() -> f64 {
    0.001
}
fn default_scaling_factor() -> f64 {
    1.0
}

impl ModelConfig {
    /// Every out-of-range value and illegal combination, not just the first.
    pub fn validate(&self) -> ConfigIssues {
        let mut issues = ConfigIssues::new();
        let mut check = |ok: bool, path: &str, msg: String| {
            if !ok {
                issues.push((path.to_string(), msg));
            }
        };
        check(
            self.vocab_size >= 2,
            "vocab_size",
            format!("must be at least 2, got {}", self.vocab_size),
        );
        check(self.d_model > 0, "d_model", "must be positive".into());
        check(self.n_heads > 0, "n_heads", "must be positive".into());
        check(self.n_layers > 0, "n_layers", "must be positive".into());
        check(self.ffn_dim > 0, "ffn_dim", "must be positive".into());
        check(
            self.max_seq_len > 0,
            "max_seq_len",
            "must be positive".into(),
        );
        let explicit_head_dim = self.attention.head_dim.is_some();
        if let Some(head_dim) = self.attention.head_dim {
            check(
                head_dim > 0 && head_dim.is_multiple_of(2),
                "attention.head_dim",
                format!("must be a positive even number (rotary positions), got {head_dim}"),
            );
        }
        if let Some(kv) = self.attention.kv_heads {
            check(
                kv > 0 && self.n_heads.is_multiple_of(kv.max(1)),
                "attention.kv_heads",
                format!(
                    "must divide n_heads ({}) so each key/value head serves a whole group of \
                     query heads, got {kv}; try {}",
                    self.n_heads,
                    largest_divisor_at_most(self.n_heads, kv.max(1))
                ),
            );
        }
        if self.n_heads > 0 && !explicit_head_dim {
            check(
                self.d_model.is_multiple_of(self.n_heads),
                "n_heads",
                format!(
                    "d_model ({}) must be divisible by n_heads ({}); try n_heads = {}, or set \
                     attention.head_dim",
                    self.d_model,
                    self.n_heads,
                    largest_divisor_at_most(self.d_model, self.n_heads)
                ),
            );
            let head_dim = self.d_model / self.n_heads;
            check(
                head_dim.is_multiple_of(2),
                "n_heads",
                format!(
                    "the head dimension d_model / n_heads = {head_dim} must be even for rotary positions"
                ),
            );
        }
        check(
            self.rope_theta > 0.0,
            "rope_theta",
            "must be positive (10000 is usual)".into(),
        );
        check(
            self.norm_eps > 0.0 && self.norm_eps < 1.0,
            "norm_eps",
            "must lie in (0, 1); 1e-5 is usual".into(),
        );
        check(
            self.init_std > 0.0 && self.init_std.is_finite(),
            "init_std",
            "must be a positive number; 0.02 is usual".into(),
        );
        for (path, msg) in self.moe.validate() {
            issues.push((format!("moe.{path}"), msg));
        }
        issues
    }

    /// Size of each attention head.
    pub fn head_dim(&self) -> usize {
        self.attention
            .head_dim
            .unwrap_or(self.d_model / self.n_heads.max(1))
    }

    /// Key/value heads (n_heads without grouped-query attention).
    pub fn kv_heads(&self) -> usize {
        self.attention.kv_heads.unwrap_or(self.n_heads)
    }

    /// Whether layer `layer` (0-based) carries an MoE block.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer.is_multiple_of(self.moe.every)
    }
}

impl MoeConfig {
    pub fn validate(&self) -> ConfigIssues {
        let mut issues = ConfigIssues::new();
        if self.every == 0 {
            issues.push((
                "every".into(),
                "must be at least 1 (1 = every layer)".into(),
            ));
        }
        if self.num_experts == 0 {
            issues.push(("num_experts".into(), "must be positive".into()));
        }
        let slots = self.num_slots();
        if self.top_k == 0 || self.top_k > slots {
            let what = if slots == self.num_experts {
                format!("num_experts ({})", self.num_experts)
            } else {
                format!("the router's {slots} slots (num_experts plus its extra experts)")
            };
            issues.push((
                "top_k".into(),
                format!(
                    "must be between 1 and {what}, got {}; lower top_k or add experts",
                    self.top_k
                ),
            ));
        }
        match &self.router {
            RouterConfig::TopKSoftmax { .. } => {}
            RouterConfig::NullExperts {
                num_null, anneal, ..
            } => {
                if *num_null == 0 {
                    issues.push((
                        "router.num_null".into(),
                        "must be at least 1; use `type: top_k_softmax` for no null experts".into(),
                    ));
                }
                if let Some(a) = anneal
                    && !(a.loose_coef >= 0.0 && a.loose_coef.is_finite())
                {
                    issues.push((
                        "router.anneal.loose_coef".into(),
                        "must be a non-negative number (paper: 0.0001)".into(),
                    ));
                }
            }
            RouterConfig::MoePlusPlus {
                zero,
                copy,
                constant,
                tau,
                ..
            } => {
                if zero + copy + constant == 0 {
                    issues.push((
                        "router".into(),
                        "MoE++ needs at least one zero, copy or constant expert; \
                         use `type: top_k_softmax` otherwise"
                            .into(),
                    ));
                }
                if !(*tau > 0.0 && *tau <= 1.0) {
                    issues.push((
                        "router.tau".into(),
                        format!("must lie in (0, 1] (paper default 0.75), got {tau}"),
                    ));
                }
            }
            RouterConfig::Recurrent { state_dim, .. } => {
                if *state_dim == 0 {
                    issues.push((
                        "router.state_dim".into(),
                        "must be positive (paper: 128)".into(),
                    ));
                }
            }
        }
        if self.expert_ffn_dim == 0 {
            issues.push(("expert_ffn_dim".into(), "must be positive".into()));
        }
        if let CapacityConfig::Drop { factor } = self.capacity
            && !(factor > 0.0 && factor.is_finite())
        {
            issues.push((
                "capacity.factor".into(),
                format!("must be a positive number (1.0 to 2.0 is usual), got {factor}"),
            ));
        }
        if let Some(shared) = &self.shared_expert {
            if shared.count == 0 {
                issues.push((
                    "shared_expert.count".into(),
                    "must be at least 1; remove `shared_expert` to have none".into(),
                ));
            }
            if shared.ffn_dim == 0 {
                issues.push(("shared_expert.ffn_dim".into(), "must be positive".into()));
            }
        }
        if !(self.scaling_factor > 0.0 && self.scaling_factor.is_finite()) {
            issues.push((
                "scaling_factor".into(),
                format!(
                    "must be a positive number (1.0 keeps the weights; DeepSeek-V3 uses 2.5), got {}",
                    self.scaling_factor
                ),
            ));
        }
        if let Some(groups) = &self.group_limited {
            self.validate_groups(groups, &mut issues);
        }
        if let Some(bias) = &self.bias_balance
            && !(bias.gamma > 0.0 && bias.gamma.is_finite())
        {
            issues.push((
                "bias_balance.gamma".into(),
                format!(
                    "must be a positive number (DeepSeek-V3: 0.001), got {}",
                    bias.gamma
                ),
            ));
        }
        for (key, value) in [
            ("load_balance_coef", self.load_balance_coef),
            ("z_loss_coef", self.z_loss_coef),
        ] {
            if !(value >= 0.0 && value.is_finite()) {
                issues.push((
                    key.into(),
                    format!("must be a non-negative number, got {value}"),
                ));
            }
        }
        issues
    }
}

impl MoeConfig {
    fn validate_groups(&self, g: &GroupLimitedConfig, issues: &mut ConfigIssues) {
        if self.num_slots() != self.num_experts {
            issues.push((
                "group_limited".into(),
                "groups are made of FFN experts only; a router with null or zero-computation \
                 experts cannot be group-limited (use `type: top_k_softmax` or `recurrent`)"
                    .into(),
            ));
            return;
        }
        if g.groups < 2 || !self.num_experts.is_multiple_of(g.groups.max(1)) {
            issues.push((
                "group_limited.groups".into(),
                format!(
                    "must be at least 2 and divide num_experts ({}) into equal groups, got {}; \
                     use the number of nodes or of ep ranks",
                    self.num_experts, g.groups
                ),
            ));
            return;
        }
        let per_group = self.num_experts / g.groups;
        if g.top_groups == 0 || g.top_groups > g.groups || g.top_groups * per_group < self.top_k {
            issues.push((
                "group_limited.top_groups".into(),
                format!(
                    "must lie between 1 and groups ({}) and keep at least top_k ({}) experts \
                     ({per_group} per group), got {}",
                    g.groups, self.top_k, g.top_groups
                ),
            ));
        }
    }

    /// What each routing slot computes, in slot order.
    pub fn slot_kinds(&self) -> Vec<SlotKind> {
        let mut kinds = vec![SlotKind::Ffn; self.num_experts];
        match &self.router {
            RouterConfig::TopKSoftmax { .. } | RouterConfig::Recurrent { .. } => {}
            RouterConfig::NullExperts { num_null, .. } => {
                kinds.extend(std::iter::repeat_n(SlotKind::Null, *num_null));
            }
            RouterConfig::MoePlusPlus {
                zero,
                copy,
                constant,
                ..
            } => {
                kinds.extend(std::iter::repeat_n(SlotKind::Zero, *zero));
                kinds.extend(std::iter::repeat_n(SlotKind::Copy, *copy));
                kinds.extend((0..*constant).map(SlotKind::Constant));
            }
        }
        kinds
    }

    /// Routing slots: FFN experts plus the router's extra (null / zero-computation) experts.
    pub fn num_slots(&self) -> usize {
        // Counted, not collected: validation runs this on configs with 10^9 experts.
        let extra = match &self.router {
            RouterConfig::TopKSoftmax { .. } | RouterConfig::Recurrent { .. } => 0,
            RouterConfig::NullExperts { num_null, .. } => *num_null,
            RouterConfig::MoePlusPlus {
                zero,
                copy,
                constant,
                ..
            } => zero.saturating_add(*copy).saturating_add(*constant),
        };
        self.num_experts.saturating_add(extra)
    }

    /// The load-balancing coefficient in force at optimizer step `step` (AdaMoE's
    /// tight-then-loose schedule; constant otherwise).
    pub fn load_balance_coef_at(&self, step: u64) -> f64 {
        match &self.router {
            RouterConfig::NullExperts {
                anneal: Some(anneal),
                ..
            } if step >= anneal.after_step => anneal.loose_coef,
            _ => self.load_balance_coef,
        }
    }
}

fn largest_divisor_at_most(n: usize, at_most: usize) -> usize {
    (1..=at_most.min(n))
        .rev()
        .find(|d| n.is_multiple_of(*d))
        .unwrap_or(1)
}
