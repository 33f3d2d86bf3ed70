//! The `LocalDispatcher` path equals the dense per-expert oracle: outputs and the gradient
//! of every parameter and of the input.

use std::collections::BTreeMap;

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use switchyard_moe::ParamKey;
use switchyard_moe::config::{
    CapacityConfig, MoeConfig, NullInit, NullNormalization, RouterConfig, SharedExpertConfig,
};
use switchyard_moe::init::Initializer;
use switchyard_moe::layer::{MoeLayer, MoeOutput};
use switchyard_moe::params::named_grads;
use switchyard_moe::router::{Gru, RouterCarry};
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
            gate: false,
        }),
        load_balance_coef: 0.01,
        z_loss_coef: 0.001,
        ..Default::default()
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
    let loss = (out.y * probe).sum() + out.load_balance * 0.01 + out.z_loss * 0.001;
    let grads = loss.backward();
    let params = named_grads(layer, &grads)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_data().try_to_vec::<f32>().unwrap()))
        .collect();
    let dx = x
        .grad(&grads)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    (y, params, dx)
}

/// Every gradient equal; a parameter the dispatcher path never touched (an expert no token
/// chose) must have an all-zero gradient in the oracle, which touches every expert.
fn assert_same_grads(grads: &BTreeMap<String, Vec<f32>>, grads_ref: &BTreeMap<String, Vec<f32>>) {
    for (name, r) in grads_ref {
        match grads.get(name) {
            Some(g) => assert_close(name, g, r, 1e-5),
            None => assert!(
                r.iter().all(|v| *v == 0.0),
                "{name}: no gradient through the dispatcher but a non-zero one in the oracle"
            ),
        }
    }
    for name in grads.keys() {
        assert!(
            grads_ref.contains_key(name),
            "{name}: gradient only through the dispatcher"
        );
    }
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
    let mut init = Initializer::new(7, 0.2, &device);
    let layer = MoeLayer::new(16, &cfg, &mut init);
    let state_dim = match cfg.router {
        RouterConfig::Recurrent { state_dim, .. } => Some(state_dim),
        _ => None,
    };
    let gru = state_dim.map(|p| Gru::new(p, &mut init));
    // A carry as a previous MoE layer would leave it, so residual / recurrent paths are live.
    let carry = RouterCarry {
        prev_logits: Some(Tensor::random(
            [tokens, cfg.num_slots()],
            Distribution::Normal(0.0, 1.0),
            &device,
        )),
        state: state_dim
            .map(|p| Tensor::random([tokens, p], Distribution::Normal(0.0, 0.5), &device)),
    };
    let x = Tensor::<3>::random([2, tokens / 2, 16], Distribution::Normal(0.0, 1.0), &device);
    let probe = Tensor::<3>::random([2, tokens / 2, 16], Distribution::Normal(0.0, 1.0), &device);
    let (y, grads, dx) = grads_of(&layer, x.clone(), probe.clone(), |l, x| {
        l.forward(x, &mut carry.clone(), gru.as_ref())
    });
    let (y_ref, grads_ref, dx_ref) = grads_of(&layer, x, probe, |l, x| {
        l.forward_reference(x, &mut carry.clone(), gru.as_ref())
    });
    assert_close("y", &y, &y_ref, 1e-5);
    assert_close("dx", &dx, &dx_ref, 1e-5);
    assert_same_grads(&grads, &grads_ref);
    assert!(grads.contains_key("router.w_gate"));
}

#[test]
fn dropless_matches_oracle() {
    check_layer(moe_cfg(CapacityConfig::Dropless {}, false, true), 24);
}

#[test]
fn dropless_unnormalized_with_shared_expert_matches_oracle() {
    check_layer(moe_cfg(CapacityConfig::Dropless {}, true, false), 24);
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
fn null_experts_match_oracle_both_normalizations() {
    for normalize in [NullNormalization::TrueExperts, NullNormalization::AllChosen] {
        let mut cfg = moe_cfg(CapacityConfig::Dropless {}, false, true);
        cfg.top_k = 3;
        cfg.router = RouterConfig::NullExperts {
            num_null: 4,
            normalize,
            null_init: NullInit::CopyTrueRows,
            anneal: None,
        };
        check_layer(cfg, 24);
    }
}

#[test]
fn moe_plus_plus_matches_oracle_with_heterogeneous_capacity() {
    for (capacity, normalize_weights) in [
        (CapacityConfig::Dropless {}, false),
        (CapacityConfig::Drop { factor: 1.1 }, true),
    ] {
        let mut cfg = moe_cfg(capacity, true, true);
        cfg.router = RouterConfig::MoePlusPlus {
            zero: 1,
            copy: 1,
            constant: 2,
            tau: 0.75,
            gating_residual: true,
            normalize_weights,
        };
        check_layer(cfg, 32);
    }
}

#[test]
fn recurrent_router_matches_oracle() {
    let mut cfg = moe_cfg(CapacityConfig::Dropless {}, false, true);
    cfg.router = RouterConfig::Recurrent {
        state_dim: 8,
        detach_state: false,
        normalize_weights: true,
    };
    check_layer(cfg, 24);
}

#[test]
fn dropping_actually_drops_and_dropped_tokens_get_nothing() {
    let device = device();
    let cfg = moe_cfg(CapacityConfig::Drop { factor: 0.25 }, false, true);
    let layer = MoeLayer::new(16, &cfg, &mut Initializer::new(3, 0.2, &device));
    let x = Tensor::<3>::random([1, 24, 16], Distribution::Normal(0.0, 1.0), &device);
    let out = layer.forward(x, &mut RouterCarry::default(), None);
    assert!(out.stats.dropped_fraction > 0.3, "{:?}", out.stats);
    // capacity = ceil(0.25 * 24 * 2 / 6) = 2 per expert -> at most 12 of 48 assignments kept.
    assert!(out.stats.dropped_fraction >= 1.0 - 12.0 / 48.0 - 1e-9);
}

#[test]
fn whole_model_matches_oracle_with_dense_and_moe_layers() {
    let routers = [
        RouterConfig::TopKSoftmax {
            normalize_weights: true,
        },
        RouterConfig::MoePlusPlus {
            zero: 1,
            copy: 1,
            constant: 1,
            tau: 0.75,
            gating_residual: true,
            normalize_weights: false,
        },
        RouterConfig::Recurrent {
            state_dim: 8,
            detach_state: false,
            normalize_weights: true,
        },
    ];
    for router in routers {
        whole_model_check(router);
    }
}

fn whole_model_check(router: RouterConfig) {
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
        attention: Default::default(),
        moe: MoeConfig {
            every: 2,
            router,
            ..moe_cfg(CapacityConfig::Dropless {}, true, true)
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
        let aux = out.aux_loss(&cfg, 0);
        let loss = cross_entropy(out.logits, targets.clone()) + aux;
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
    let to_vecs = |g: BTreeMap<ParamKey, Tensor<1>>| -> BTreeMap<String, Vec<f32>> {
        g.into_iter()
            .map(|(k, v)| (k.to_string(), v.into_data().try_to_vec::<f32>().unwrap()))
            .collect()
    };
    assert_same_grads(&to_vecs(grads), &to_vecs(grads_ref));
}
