//! Activation recomputation (`train.activation_checkpointing`) changes memory, not results,
//! for every router family (MoE++'s gating residual and the recurrent router's GRU state
//! cross the recomputed blocks), with dense layers between MoE layers, a shared expert and
//! capacity dropping: the loss, the auxiliary losses and every gradient are the same bits
//! with `full` and `selective` as without. Evaluation (no autodiff) is unchanged.

use std::collections::BTreeMap;

use burn::tensor::{Device, Int, Tensor, TensorData};
use switchyard_moe::config::{CapacityConfig, ModelConfig, RouterConfig, SharedExpertConfig};
use switchyard_moe::params::named_grads;
use switchyard_moe::{ActivationCheckpointing, Transformer, cross_entropy};

mod common;
use common::{V, routers};

const B: usize = 2;
const S: usize = 9;

fn model_cfg(router: RouterConfig, every: usize) -> ModelConfig {
    common::model_cfg(router, every, false)
}

/// (loss, load balance, z-loss) bits and every gradient's bits.
type Outcome = ([u32; 3], BTreeMap<String, Vec<u32>>);

fn run(cfg: &ModelConfig, mode: ActivationCheckpointing) -> Outcome {
    let device = Device::flex().autodiff();
    let model = Transformer::new(cfg, 11, &device).with_recompute(mode);
    let tokens: Vec<i64> = (0..B * (S + 1)).map(|i| ((i * 7 + 3) % V) as i64).collect();
    let rows = |skip: usize| -> Tensor<2, Int> {
        let v: Vec<i64> = tokens
            .chunks(S + 1)
            .flat_map(|r| r[skip..skip + S].to_vec())
            .collect();
        Tensor::from_data(TensorData::new(v, [B, S]), &device)
    };
    let out = model.forward(rows(0));
    let bits = |t: &Tensor<1>| t.clone().inner().into_scalar::<f32>().to_bits();
    let ce = cross_entropy(out.logits.clone(), rows(1));
    let scalars = [bits(&ce), bits(&out.load_balance), bits(&out.z_loss)];
    let loss = ce + out.aux_loss(cfg, 0);
    let grads = named_grads(&model, &loss.backward())
        .into_iter()
        .map(|(key, g)| {
            let v: Vec<f32> = g.inner().into_data().convert::<f32>().try_to_vec().unwrap();
            (key.to_string(), v.into_iter().map(f32::to_bits).collect())
        })
        .collect();
    (scalars, grads)
}

/// The worst per-tensor relative difference of the gradients (max |a - b| / max |b|, as
/// the layout parity matrix measures), after checking that loss, auxiliary losses and the
/// set of parameters with a gradient are the same bits.
fn compare(label: &str, want: &Outcome, got: &Outcome) -> f32 {
    assert_eq!(want.0, got.0, "{label}: loss / aux loss bits differ");
    assert_eq!(
        want.1.keys().collect::<Vec<_>>(),
        got.1.keys().collect::<Vec<_>>(),
        "{label}: the parameters with a gradient differ"
    );
    let mut worst = 0f32;
    for (name, w) in &want.1 {
        let (w, g): (Vec<f32>, Vec<f32>) = w
            .iter()
            .zip(&got.1[name])
            .map(|(a, b)| (f32::from_bits(*a), f32::from_bits(*b)))
            .unzip();
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = w
            .iter()
            .zip(&g)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let rel = if scale == 0.0 { diff } else { diff / scale };
        worst = worst.max(rel);
    }
    worst
}

/// `selective` and `full` give the same bits as keeping everything.
fn check(label: &str, cfg: &ModelConfig) {
    let want = run(cfg, ActivationCheckpointing::None);
    assert!(want.1.len() > 10, "{label}: gradients were computed");
    for mode in [
        ActivationCheckpointing::Selective,
        ActivationCheckpointing::Full,
    ] {
        let worst = compare(label, &want, &run(cfg, mode));
        assert_eq!(
            worst, 0.0,
            "{label}, {mode:?}: gradients differ ({worst:e})"
        );
    }
}

#[test]
fn every_router_family_gives_the_same_bits() {
    for (name, router) in routers() {
        check(name, &model_cfg(router.clone(), 1));
        check(
            &format!("{name}, dense layer between"),
            &model_cfg(router, 2),
        );
    }
}

#[test]
fn shared_experts_and_capacity_dropping_give_the_same_bits() {
    let (_, top_k) = routers().remove(0);
    let mut cfg = model_cfg(top_k, 1);
    cfg.moe.shared_expert = Some(SharedExpertConfig {
        count: 1,
        ffn_dim: 8,
        gate: true,
    });
    check("gated shared expert", &cfg);
    let (_, top_k) = routers().remove(0);
    let mut cfg = model_cfg(top_k, 1);
    cfg.moe.capacity = CapacityConfig::Drop { factor: 0.5 };
    check("capacity drop", &cfg);
}

#[test]
fn evaluation_is_unchanged() {
    let (_, router) = routers().remove(3);
    let cfg = model_cfg(router, 1);
    let device = Device::flex();
    let tokens = Tensor::<2, Int>::from_data(
        TensorData::new(
            (0..B * S).map(|i| (i % V) as i64).collect::<Vec<_>>(),
            [B, S],
        ),
        &device,
    );
    let logits = |mode| {
        let out = Transformer::new(&cfg, 3, &device)
            .with_recompute(mode)
            .forward(tokens.clone());
        out.logits
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(
        logits(ActivationCheckpointing::None),
        logits(ActivationCheckpointing::Full)
    );
}
