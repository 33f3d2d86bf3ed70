//! The defining property of each router family, checked directly.

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use switchyard_moe::config::{
    BalanceAnneal, CapacityConfig, MoeConfig, NullInit, NullNormalization, RouterConfig,
};
use switchyard_moe::init::Initializer;
use switchyard_moe::layer::{MoeLayer, MoeOutput};
use switchyard_moe::params::{map_params, named_grads};
use switchyard_moe::router::{Gru, Router, RouterCarry, Routing};

const D: usize = 8;

fn device() -> Device {
    Device::flex().autodiff()
}

fn cfg(router: RouterConfig, top_k: usize) -> MoeConfig {
    MoeConfig {
        every: 1,
        num_experts: 4,
        top_k,
        expert_ffn_dim: 16,
        router,
        capacity: CapacityConfig::Dropless {},
        shared_expert: None,
        load_balance_coef: 0.01,
        z_loss_coef: 0.001,
        ..Default::default()
    }
}

fn moepp(normalize_weights: bool, gating_residual: bool) -> RouterConfig {
    RouterConfig::MoePlusPlus {
        zero: 1,
        copy: 1,
        constant: 1,
        tau: 0.75,
        gating_residual,
        normalize_weights,
    }
}

/// Positive inputs [1, T, D], so a router column of large positive weights wins every token.
fn positive_x(tokens: usize) -> Tensor<3> {
    Tensor::<3>::random([1, tokens, D], Distribution::Uniform(0.1, 1.0), &device())
}

/// A layer whose router sends every token to `slot` first (logit +50 per unit of input).
fn layer_forcing(cfg: &MoeConfig, slot: usize) -> MoeLayer {
    let layer = MoeLayer::new(D, cfg, &mut Initializer::new(1, 0.1, &device()));
    let slots = cfg.num_slots();
    map_params(layer, |name, value| {
        if name.name() != "router.w_gate" {
            return value;
        }
        let w: Vec<f32> = (0..D * slots)
            .map(|i| if i % slots == slot { 50.0 } else { 0.0 })
            .collect();
        Tensor::from_data(TensorData::new(w, [D * slots]), &value.device())
    })
}

fn values(t: Tensor<3>) -> Vec<f32> {
    t.inner().into_data().try_to_vec::<f32>().unwrap()
}

fn run(layer: &MoeLayer, x: Tensor<3>) -> MoeOutput {
    layer.forward(x, &mut RouterCarry::default(), None)
}

#[test]
fn a_zero_expert_contributes_exactly_zero() {
    let cfg = cfg(moepp(false, false), 1);
    let zero_slot = 4; // slots: 4 FFN, then zero, copy, constant
    let layer = layer_forcing(&cfg, zero_slot);
    let out = run(&layer, positive_x(6));
    assert_eq!(
        out.stats.kind_fraction[2], 1.0,
        "every token chose the zero expert"
    );
    assert!(values(out.y).iter().all(|v| *v == 0.0));
    assert_eq!(out.stats.expert_flops, 0);
}

#[test]
fn a_copy_expert_is_the_identity() {
    let cfg = cfg(moepp(true, false), 1);
    let copy_slot = 5;
    let layer = layer_forcing(&cfg, copy_slot);
    let x = positive_x(6);
    let out = run(&layer, x.clone());
    assert_eq!(out.stats.kind_fraction[3], 1.0);
    // top-1, renormalised: weight exactly 1, output exactly x.
    assert_eq!(values(out.y), values(x));
    assert_eq!(out.stats.expert_flops, 0);
}

#[test]
fn a_constant_expert_mixes_input_and_its_vector() {
    let cfg = cfg(moepp(true, false), 1);
    let layer = layer_forcing(&cfg, 6);
    let x = positive_x(3);
    let out = run(&layer, x.clone());
    let direct = layer.constants[0].forward(x.reshape([3, D]));
    let y = values(out.y);
    let expected = direct.inner().into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(y, expected);
    assert_ne!(y, vec![0.0; y.len()]);
}

#[test]
fn tokens_routed_only_to_null_experts_pass_unchanged_and_cost_nothing() {
    let router = RouterConfig::NullExperts {
        num_null: 4,
        normalize: NullNormalization::TrueExperts,
        null_init: NullInit::Random,
        anneal: None,
    };
    let cfg = cfg(router, 2);
    // Columns 4..8 are the null slots; make them all win.
    let layer = MoeLayer::new(D, &cfg, &mut Initializer::new(1, 0.1, &device()));
    let layer = map_params(layer, |name, value| {
        if name.name() != "router.w_gate" {
            return value;
        }
        let w: Vec<f32> = (0..D * 8)
            .map(|i| if i % 8 >= 4 { 50.0 } else { 0.0 })
            .collect();
        Tensor::from_data(TensorData::new(w, [D * 8]), &value.device())
    });
    let out = run(&layer, positive_x(5));
    assert_eq!(out.stats.kind_fraction[1], 1.0, "all choices are null");
    assert_eq!(out.stats.ffn_experts_per_token, 0.0);
    assert_eq!(out.stats.expert_flops, 0);
    // The layer adds nothing, so the block's residual leaves the token unchanged.
    assert!(values(out.y).iter().all(|v| *v == 0.0));
}

#[test]
fn null_experts_reduce_true_experts_per_token_and_renormalise_over_true_ones() {
    let router = RouterConfig::NullExperts {
        num_null: 4,
        normalize: NullNormalization::TrueExperts,
        null_init: NullInit::Random,
        anneal: None,
    };
    let cfg = cfg(router, 3);
    let layer = MoeLayer::new(D, &cfg, &mut Initializer::new(9, 0.5, &device()));
    let x = Tensor::<2>::random([64, D], Distribution::Normal(0.0, 1.0), &device());
    let routing = layer.router.forward(x, &mut RouterCarry::default(), None);
    let w = routing
        .weights_tk
        .clone()
        .inner()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let mut true_per_token = 0.0;
    for t in 0..64 {
        let (mut sum, mut trues) = (0.0, 0);
        for k in 0..3 {
            let e = routing.experts_tk[t * 3 + k];
            if e < 4 {
                sum += w[t * 3 + k];
                trues += 1;
            } else {
                assert_eq!(w[t * 3 + k], 0.0, "null weights are zero");
            }
        }
        if trues > 0 {
            assert!(
                (sum - 1.0).abs() < 1e-5,
                "token {t}: true weights sum to {sum}"
            );
        }
        true_per_token += trues as f64 / 64.0;
    }
    assert!(true_per_token < 3.0, "some choices went to null experts");
}

#[test]
fn null_aware_balance_loss_pools_the_null_experts() {
    let router = RouterConfig::NullExperts {
        num_null: 2,
        normalize: NullNormalization::TrueExperts,
        null_init: NullInit::Random,
        anneal: None,
    };
    let null_cfg = cfg(router, 1);
    let device = device();
    let null_router = Router::new(D, &null_cfg, &mut Initializer::new(2, 0.1, &device));
    let vanilla_cfg = MoeConfig {
        num_experts: 6,
        ..cfg(RouterConfig::default(), 1)
    };
    let vanilla_router = Router::new(D, &vanilla_cfg, &mut Initializer::new(2, 0.1, &device));
    // Four tokens, fixed probabilities over 6 slots (4 true + 2 null).
    let probs = Tensor::<2>::from_data(
        TensorData::new(
            (0..24)
                .map(|i| [0.1, 0.1, 0.1, 0.1, 0.4, 0.2][i % 6])
                .collect::<Vec<f32>>(),
            [4, 6],
        ),
        &device,
    );
    let routing = |experts: Vec<usize>| Routing {
        weights_tk: Tensor::ones([4, 1], &device),
        experts_tk: experts,
        num_tokens: 4,
        top_k: 1,
        num_experts: 6,
        probs_te: probs.clone(),
        logits_te: probs.clone().log(),
    };
    let scalar = |t: Tensor<1>| t.inner().into_scalar::<f32>();
    // Same true-expert traffic; the null traffic moves from slot 4 to slot 5.
    let a = routing(vec![0, 1, 4, 4]);
    let b = routing(vec![0, 1, 5, 5]);
    let null_a = scalar(null_router.load_balance_loss(&a));
    let null_b = scalar(null_router.load_balance_loss(&b));
    assert!((null_a - null_b).abs() < 1e-6, "{null_a} vs {null_b}");
    let van_a = scalar(vanilla_router.load_balance_loss(&a));
    let van_b = scalar(vanilla_router.load_balance_loss(&b));
    assert!(
        (van_a - van_b).abs() > 0.1,
        "the Switch loss does separate them"
    );
}

#[test]
fn annealed_balance_coefficient_goes_from_tight_to_loose() {
    let router = RouterConfig::NullExperts {
        num_null: 2,
        normalize: NullNormalization::TrueExperts,
        null_init: NullInit::Random,
        anneal: Some(BalanceAnneal {
            loose_coef: 0.0001,
            after_step: 100,
        }),
    };
    let c = MoeConfig {
        load_balance_coef: 0.02,
        ..cfg(router, 2)
    };
    assert_eq!(c.load_balance_coef_at(0), 0.02);
    assert_eq!(c.load_balance_coef_at(99), 0.02);
    assert_eq!(c.load_balance_coef_at(100), 0.0001);
}

#[test]
fn copying_true_router_rows_into_null_rows() {
    let router = RouterConfig::NullExperts {
        num_null: 6,
        normalize: NullNormalization::TrueExperts,
        null_init: NullInit::CopyTrueRows,
        anneal: None,
    };
    let c = cfg(router, 2);
    let r = Router::new(D, &c, &mut Initializer::new(4, 0.1, &device()));
    let w = r
        .w_gate
        .val()
        .inner()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    for row in 0..D {
        for slot in 4..10 {
            assert_eq!(w[row * 10 + slot], w[row * 10 + slot % 4]);
        }
    }
}

#[test]
fn the_gating_residual_reads_the_previous_layers_scores() {
    for residual in [true, false] {
        let c = cfg(moepp(false, residual), 2);
        let layer = MoeLayer::new(D, &c, &mut Initializer::new(5, 0.3, &device()));
        let x = Tensor::<3>::random([1, 6, D], Distribution::Normal(0.0, 1.0), &device());
        let with_prev = |seed: f32| {
            let prev = Tensor::<2>::ones([6, c.num_slots()], &device()) * seed;
            let prev = prev
                + Tensor::random(
                    [6, c.num_slots()],
                    Distribution::Normal(0.0, 2.0),
                    &device(),
                ) * seed;
            let mut carry = RouterCarry {
                prev_logits: Some(prev),
                state: None,
            };
            let out = layer.forward(x.clone(), &mut carry, None);
            assert!(
                carry.prev_logits.is_some(),
                "the layer passes its logits on"
            );
            values(out.y)
        };
        let (a, b) = (with_prev(1.0), with_prev(-3.0));
        if residual {
            assert_ne!(a, b, "changing the previous scores changes the output");
        } else {
            assert_eq!(a, b, "without a residual the previous scores are ignored");
        }
    }
}

/// Two recurrent-routed layers sharing one GRU; the loss reads only the second layer.
/// Returns the gradient of the FIRST layer's projection.
fn first_layer_projection_grad(detach_state: bool) -> Option<Vec<f32>> {
    let router = RouterConfig::Recurrent {
        state_dim: 6,
        detach_state,
        normalize_weights: true,
    };
    let c = cfg(router, 2);
    let device = device();
    let mut init = Initializer::new(8, 0.3, &device);
    let first = MoeLayer::new(D, &c, &mut init);
    let second = MoeLayer::new(D, &c, &mut init);
    let gru = Gru::new(6, &mut init);
    let x1 = Tensor::<3>::random([1, 5, D], Distribution::Normal(0.0, 1.0), &device);
    let x2 = Tensor::<3>::random([1, 5, D], Distribution::Normal(0.0, 1.0), &device);
    let mut carry = RouterCarry::default();
    let _ = first.forward(x1, &mut carry, Some(&gru));
    let out = second.forward(x2, &mut carry, Some(&gru));
    let grads = out.y.sum().backward();
    named_grads(&first, &grads)
        .remove("router.w_proj")
        .map(|g| g.into_data().try_to_vec::<f32>().unwrap())
}

#[test]
fn the_recurrent_state_carries_gradient_to_earlier_layers_unless_detached() {
    let live = first_layer_projection_grad(false).expect("gradient reaches layer 1");
    assert!(live.iter().any(|v| v.abs() > 1e-9), "{live:?}");
    match first_layer_projection_grad(true) {
        None => {}
        Some(g) => assert!(g.iter().all(|v| *v == 0.0), "{g:?}"),
    }
}
