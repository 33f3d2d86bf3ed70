//! Incremental decoding: `Transformer::forward_cached` fed a prompt and then one token at a
//! time gives the logits `forward` gives for the whole sequence, for every router family
//! (the router state of MoE++ and recurrent routers travels across the layers of each
//! token, so it needs nothing from earlier tokens), with a dense layer between MoE layers
//! and with untied embeddings.

use burn::tensor::{Device, Int, Tensor, TensorData};
use switchyard_moe::config::{
    CapacityConfig, ModelConfig, MoeConfig, NullInit, NullNormalization, RouterConfig,
};
use switchyard_moe::{KvCache, Transformer};

const V: usize = 40;
const B: usize = 2;
const S: usize = 11;

fn model_cfg(router: RouterConfig, every: usize, tie: bool) -> ModelConfig {
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
        },
    }
}

fn routers() -> Vec<(&'static str, RouterConfig)> {
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

fn tokens(device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = (0..B * S).map(|i| ((i * 7 + 3) % V) as i64).collect();
    Tensor::from_data(TensorData::new(ids, [B, S]), device)
}

fn values(t: Tensor<3>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

#[test]
fn incremental_decoding_reproduces_the_full_forward_for_every_router() {
    let device = Device::flex();
    for (name, router) in routers() {
        for (every, tie) in [(1, true), (2, false)] {
            let cfg = model_cfg(router.clone(), every, tie);
            let model = Transformer::new(&cfg, 5, &device);
            let tokens_bs = tokens(&device);
            let full = values(model.forward(tokens_bs.clone()).logits);

            // A fresh cache fed everything at once.
            let at_once = values(model.forward_cached(tokens_bs.clone(), &mut KvCache::default()));
            let rel = max_rel(&at_once, &full);
            assert!(
                rel < 1e-5,
                "{name} every={every}: whole sequence through the cache: {rel:e}"
            );

            // A prompt of 4, then one token at a time.
            let mut cache = KvCache::default();
            let mut steps =
                vec![model.forward_cached(tokens_bs.clone().slice([0..B, 0..4]), &mut cache)];
            for s in 4..S {
                steps.push(
                    model.forward_cached(tokens_bs.clone().slice([0..B, s..s + 1]), &mut cache),
                );
            }
            assert_eq!(cache.len(), S);
            let stepped = values(Tensor::cat(steps, 1));
            let rel = max_rel(&stepped, &full);
            assert!(rel < 1e-5, "{name} every={every}: token by token: {rel:e}");
            println!("{name}, MoE every {every} layers, tied {tie}: token by token within {rel:e}");
        }
    }
}
