//! The small model and the router families the model tests share (each test file is its
//! own crate and takes what it uses).
#![allow(dead_code)]

use switchyard_moe::config::{
    CapacityConfig, ModelConfig, MoeConfig, NullInit, NullNormalization, RouterConfig,
};

/// Vocabulary of [`model_cfg`].
pub const V: usize = 40;

/// A 3-layer model, 4 experts top-2, MoE at every `every`-th layer; `tie`: tied embeddings.
pub fn model_cfg(router: RouterConfig, every: usize, tie: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: V,
        d_model: 16,
        n_heads: 4,
        n_layers: 3,
        ffn_dim: 24,
        max_seq_len: 32,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: tie,
        init_std: 0.1,
        attention: Default::default(),
        moe: MoeConfig {
            every,
            num_experts: 4,
            top_k: 2,
            expert_ffn_dim: 12,
            router,
            capacity: CapacityConfig::Dropless {},
            shared_expert: None,
            load_balance_coef: 0.01,
            z_loss_coef: 0.001,
            ..Default::default()
        },
    }
}

pub fn routers() -> Vec<(&'static str, RouterConfig)> {
    vec![
        (
            "top-k",
            RouterConfig::TopKSoftmax {
                normalize_weights: true,
            },
        ),
        (
            "null experts",
            RouterConfig::NullExperts {
                num_null: 2,
                normalize: NullNormalization::default(),
                null_init: NullInit::default(),
                anneal: None,
            },
        ),
        (
            "MoE++",
            RouterConfig::MoePlusPlus {
                zero: 1,
                copy: 1,
                constant: 1,
                tau: 0.75,
                gating_residual: true,
                normalize_weights: false,
            },
        ),
        (
            "recurrent",
            RouterConfig::Recurrent {
                state_dim: 8,
                detach_state: false,
                normalize_weights: true,
            },
        ),
    ]
}
