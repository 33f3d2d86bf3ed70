//! Incremental decoding: `Transformer::forward_cached` fed a prompt and then one token at a
//! time gives the logits `forward` gives for the whole sequence, for every router family
//! (the router state of MoE++ and recurrent routers travels across the layers of each
//! token, so it needs nothing from earlier tokens), with a dense layer between MoE layers
//! and with untied embeddings.

use burn::tensor::{Device, Int, Tensor, TensorData};
use switchyard_moe::config::RouterConfig;
use switchyard_moe::{KvCache, Transformer};

mod common;
use common::{V, model_cfg, routers};

const B: usize = 2;
const S: usize = 11;

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

/// The attention variants the Hugging Face formats need (grouped-query heads, a head size
/// that is not d_model / n_heads, biases, per-head q/k norms) and Qwen2-MoE's gated shared
/// expert: the cache holds KV heads, not H, and still reproduces the full forward.
#[test]
fn incremental_decoding_reproduces_the_full_forward_for_every_attention_variant() {
    use switchyard_moe::config::{AttentionBias, AttentionConfig, SharedExpertConfig};
    let device = Device::flex();
    let variants = [
        (
            "grouped-query, 2 kv heads",
            Some(2),
            None,
            AttentionBias::None,
            false,
        ),
        (
            "one kv head, head_dim 6",
            Some(1),
            Some(6),
            AttentionBias::Qkv,
            false,
        ),
        (
            "q/k norm, all biases",
            None,
            Some(8),
            AttentionBias::All,
            true,
        ),
    ];
    for (name, kv_heads, head_dim, bias, qk_norm) in variants {
        let mut cfg = model_cfg(RouterConfig::default(), 2, false);
        cfg.attention = AttentionConfig {
            kv_heads,
            head_dim,
            bias,
            qk_norm,
        };
        cfg.moe.shared_expert = Some(SharedExpertConfig {
            count: 1,
            ffn_dim: 8,
            gate: true,
        });
        assert!(cfg.validate().is_empty(), "{name}: {:?}", cfg.validate());
        let model = Transformer::new(&cfg, 5, &device);
        let tokens_bs = tokens(&device);
        let full = values(model.forward(tokens_bs.clone()).logits);
        let mut cache = KvCache::default();
        let mut steps =
            vec![model.forward_cached(tokens_bs.clone().slice([0..B, 0..3]), &mut cache)];
        for s in 3..S {
            steps.push(model.forward_cached(tokens_bs.clone().slice([0..B, s..s + 1]), &mut cache));
        }
        let rel = max_rel(&values(Tensor::cat(steps, 1)), &full);
        assert!(rel < 1e-5, "{name}: token by token: {rel:e}");
        println!("{name}: token by token within {rel:e}");
    }
}
