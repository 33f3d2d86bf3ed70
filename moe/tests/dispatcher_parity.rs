//! The `LocalDispatcher` path equals the dense per-expert oracle: outputs and the gradient
//! of every parameter and of the input.

use std::collections::BTreeMap;

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use switchyard_moe::config::{CapacityConfig, MoeConfig, RouterConfig, SharedExpertConfig};
use switchyard_moe::init::Initializer;
use switchyard_moe::layer::{MoeLayer, MoeOutput};
use switchyard_moe::params::named_grads;
use switchyard_moe::{ModelConfig, Transformer, cross_entropy};

fn device() -> Device {
    Device::flex().autodiff()
}

fn moe_cfg(capacity: CapacityConfig, shared: bool, normalize: bool) -> MoeConfig {
    MoeConfig {
        every: 1,
        num_experts: 6,
        top_k: 2,
        expert_ffn_dim: 24,
        router: RouterConfig::TopKSoftmax {
            normalize_weights: normalize,
        },
        capacity,
        shared_expert: shared.then_some(SharedExpertConfig {
            count: 1,
            ffn_dim: 16,
        }),
        load_balance_coef: 0.01,
        z_loss_coef: 0.001,
    }
}

/// Loss = sum(y * probe) + aux, so every output element has a distinct gradient.
fn grads_of(
    layer: &MoeLayer,
    x: Tensor<3>,
    probe: Tensor<3>,
    run: impl Fn(&MoeLayer, Tensor<3>) -> MoeOutput,
) -> (Vec<f32>, BTreeMap<String, Vec<f32>>, Vec<f32>) {
    let x = x.require_grad();
    let out = run(layer, x.clone());
    let y = out
        .y
        .clone()
        .inner()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let loss = (out.y * probe).sum() + out.aux_loss.sum();
    let grads = loss.backward();
    let params = named_grads(layer, &grads)
        .into_iter()
        .map(|(k, v)| (k, v.into_data().try_to_vec::<f32>().unwrap()))
        .collect();
    let dx = x
        .grad(&grads)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    (y, params, dx)
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: dispatcher {x} vs oracle {y} (scale {scale})"
        );
    }
}

fn check_layer(cfg: MoeConfig, tokens: usize) {
    let device = device();
    let layer = MoeLayer::new(16, &cfg, &mut Initializer::new(7, 0.2, &device));
    let x = Tensor::<3>::random([2, tokens / 2, 16], Distribution::Normal(0.0, 1.0), &device);
    let probe = Tensor::<3>::random([2, tokens / 2, 16], Distribution::Normal(0.0, 1.0), &device);
    let (y, grads, dx) = grads_of(&layer, x.clone(), probe.clone(), |l, x| l.forward(x));
    let (y_ref, grads_ref, dx_ref) = grads_of(&layer, x, probe, |l, x| l.forward_reference(x));
    assert_close("y", &y, &y_ref, 1e-5);
    assert_close("dx", &dx, &dx_ref, 1e-5);
    assert_eq!(
        grads.keys().collect::<Vec<_>>(),
        grads_ref.keys().collect::<Vec<_>>(),
        "the same parameters receive gradients"
    );
    // Every routed expert that saw a token, the router and any shared expert get a gradient.
    assert!(grads.contains_key("router.w_gate"));
    for (name, g) in &grads {
        assert_close(name, g, &grads_ref[name], 1e-5);
    }
}

#[test]
fn dropless_matches_oracle() {
    check_layer(moe_cfg(CapacityConfig::Dropless, false, true), 24);
}

#[test]
fn dropless_unnormalized_with_shared_expert_matches_oracle() {
    check_layer(moe_cfg(CapacityConfig::Dropless, true, false), 24);
}

#[test]
fn capacity_dropping_matches_oracle() {
    // factor 0.5 drops about half of the assignments.
    check_layer(
        moe_cfg(CapacityConfig::Drop { factor: 0.5 }, false, true),
        32,
    );
}

#[test]
fn dropping_actually_drops_and_dropped_tokens_get_nothing() {
    let device = device();
    let cfg = moe_cfg(CapacityConfig::Drop { factor: 0.25 }, false, true);
    let layer = MoeLayer::new(16, &cfg, &mut Initializer::new(3, 0.2, &device));
    let x = Tensor::<3>::random([1, 24, 16], Distribution::Normal(0.0, 1.0), &device);
    let out = layer.forward(x);
    assert!(out.stats.dropped_fraction > 0.3, "{:?}", out.stats);
    // capacity = ceil(0.25 * 24 * 2 / 6) = 2 per expert -> at most 12 of 48 assignments kept.
    assert!(out.stats.dropped_fraction >= 1.0 - 12.0 / 48.0 - 1e-9);
}

#[test]
fn whole_model_matches_oracle_with_dense_and_moe_layers() {
    let device = device();
    let cfg = ModelConfig {
        vocab_size: 32,
        d_model: 16,
        n_heads: 2,
        n_layers: 3,
        ffn_dim: 20,
        max_seq_len: 8,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        init_std: 0.1,
        moe: MoeConfig {
            every: 2,
            ..moe_cfg(CapacityConfig::Dropless, true, true)
        },
    };
    let model = Transformer::new(&cfg, 11, &device);
    let tokens: Vec<i64> = (0..16).map(|i| (i * 7 % 32) as i64).collect();
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(tokens.clone(), [2, 8]), &device);
    let targets = Tensor::<2, Int>::from_data(
        TensorData::new(
            tokens.iter().map(|t| (t + 1) % 32).collect::<Vec<_>>(),
            [2, 8],
        ),
        &device,
    );
    let run = |reference: bool| {
        let out = if reference {
            model.forward_reference(inputs.clone())
        } else {
            model.forward(inputs.clone())
        };
        assert_eq!(
            out.moe_stats.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            vec![0, 2]
        );
        let loss = cross_entropy(out.logits, targets.clone()) + out.aux_loss;
        let value = loss
            .clone()
            .inner()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let grads = named_grads(&model, &loss.backward());
        (value, grads)
    };
    let (loss, grads) = run(false);
    let (loss_ref, grads_ref) = run(true);
    assert_close("loss", &loss, &loss_ref, 1e-6);
    assert!(grads.contains_key("layers.1.dense.w_up"));
    assert!(grads.contains_key("layers.2.moe.router.w_gate"));
    assert!(grads.contains_key("lm_head"));
    assert_eq!(grads.len(), grads_ref.len());
    for (name, g) in &grads {
        let g = g.clone().into_data().try_to_vec::<f32>().unwrap();
        let r = grads_ref[name]
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_close(name, &g, &r, 1e-5);
    }
}
