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
    pub moe: MoeConfig,
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
}

/// How tokens are assigned to experts.
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
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig::TopKSoftmax {
            normalize_weights: true,
        }
    }
}

/// What happens when more tokens choose an expert than it has room for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CapacityConfig {
    /// Every routed token is computed; expert batches have variable size.
    #[default]
    Dropless,
    /// Each expert takes at most `ceil(factor * tokens * top_k / num_experts)` assignments;
    /// the rest are dropped (the token keeps its residual path).
    Drop { factor: f64 },
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
fn default_lb_coef() -> f64 {
    0.01
}
fn default_z_coef() -> f64 {
    0.001
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
        if self.n_heads > 0 {
            check(
                self.d_model.is_multiple_of(self.n_heads),
                "n_heads",
                format!(
                    "d_model ({}) must be divisible by n_heads ({}); try n_heads = {}",
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

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
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
        if self.top_k == 0 || self.top_k > self.num_experts {
            issues.push((
                "top_k".into(),
                format!(
                    "must be between 1 and num_experts ({}), got {}; lower top_k or add experts",
                    self.num_experts, self.top_k
                ),
            ));
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

fn largest_divisor_at_most(n: usize, at_most: usize) -> usize {
    (1..=at_most.min(n))
        .rev()
        .find(|d| n.is_multiple_of(*d))
        .unwrap_or(1)
}
