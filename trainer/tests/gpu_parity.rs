//! CUDA against the CPU backend: the MoE layer (output, auxiliary losses, the input's and
//! every parameter's gradient) and a whole MoE transformer step (loss and every gradient),
//! in fp32 and bf16. Built with `--features cuda` on a machine with a GPU these compare;
//! anywhere else each test prints `skipped: <reason>` and passes.
//!
//! Tolerance: the largest difference over the largest magnitude of each tensor, 2e-3 in
//! fp32 (CubeCL may take TF32 tensor-core paths for f32 GEMMs, 10-bit mantissas) and 5e-2
//! in bf16 (two differently ordered bf16 computations).
//!
//! The parallel layouts (expert-parallel all-to-all, the pipelined block, ring attention,
//! TokenRing) on a GPU are `tools/tests/gpu_parallel.rs`.

use std::collections::BTreeMap;

use burn::tensor::{Device, Int, Tensor, TensorData};
use switchyard_moe::config::{CapacityConfig, MoeConfig, RouterConfig, SharedExpertConfig};
use switchyard_moe::init::Initializer;
use switchyard_moe::layer::MoeLayer;
use switchyard_moe::params::named_grads;
use switchyard_moe::precision::scoped;
use switchyard_moe::router::RouterCarry;
use switchyard_moe::{ModelConfig, Precision, Transformer, cross_entropy};
use switchyard_trainer::device::DeviceConfig;

/// The first GPU, or `None` after printing why there is none.
fn cuda() -> Option<Device> {
    match DeviceConfig::Cuda(Some(0)).resolve(0) {
        Ok(device) => Some(device),
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

fn cpu() -> Device {
    Device::flex().autodiff()
}

fn host(t: Tensor<1>) -> Vec<f32> {
    t.inner()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let h = (i ^ seed).wrapping_mul(2_654_435_761).rotate_left(13);
            (h % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn compare(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-12f32, |m, x| m.max(x.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    assert!(
        diff <= tol,
        "{what}: max |cuda - cpu| / max |cpu| = {diff:e} > {tol:e}"
    );
    diff
}

fn compare_all(
    got: &BTreeMap<String, Vec<f32>>,
    want: &BTreeMap<String, Vec<f32>>,
    tol: f32,
) -> f32 {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    want.iter()
        .map(|(k, w)| compare(k, &got[k], w, tol))
        .fold(0f32, f32::max)
}

fn moe_cfg() -> MoeConfig {
    MoeConfig {
        every: 1,
        num_experts: 8,
        top_k: 2,
        expert_ffn_dim: 48,
        router: RouterConfig::TopKSoftmax {
            normalize_weights: true,
        },
        capacity: CapacityConfig::Dropless {},
        shared_expert: Some(SharedExpertConfig {
            count: 1,
            ffn_dim: 32,
            gate: false,
        }),
        load_balance_coef: 0.01,
        z_loss_coef: 0.001,
        ..Default::default()
    }
}

/// Output, aux losses and gradients (input and every parameter) of one MoE layer.
fn moe_layer_run(device: &Device, precision: Precision) -> BTreeMap<String, Vec<f32>> {
    let (b, s, d) = (2, 16, 32);
    let layer = MoeLayer::new(d, &moe_cfg(), &mut Initializer::new(7, 0.1, device));
    let x = Tensor::<3>::from_data(TensorData::new(values(b * s * d, 1), [b, s, d]), device)
        .require_grad();
    let probe = Tensor::<3>::from_data(TensorData::new(values(b * s * d, 2), [b, s, d]), device);
    let out = scoped(precision, || {
        layer.forward(x.clone(), &mut RouterCarry::default(), None)
    });
    let loss = (out.y.clone() * probe).sum()
        + out.load_balance.clone() * 0.01
        + out.z_loss.clone() * 0.001;
    let grads = loss.backward();
    let mut all: BTreeMap<String, Vec<f32>> = named_grads(&layer, &grads)
        .into_iter()
        .map(|(k, v)| (format!("grad {k}"), host(v)))
        .collect();
    all.insert("y".into(), host(out.y.reshape([-1])));
    all.insert("load_balance".into(), host(out.load_balance));
    all.insert("z_loss".into(), host(out.z_loss));
    all.insert("grad x".into(), host(x.grad(&grads).unwrap().reshape([-1])));
    all
}

fn model_cfg() -> ModelConfig {
    serde_yaml::from_str(
        "{vocab_size: 96, d_model: 32, n_heads: 4, n_layers: 2, ffn_dim: 64, max_seq_len: 32, \
          moe: {every: 2, num_experts: 8, top_k: 2, expert_ffn_dim: 32}}",
    )
    .unwrap()
}

/// Loss and every gradient of one forward/backward of a two-layer transformer (one dense
/// and one MoE layer).
fn model_run(device: &Device, precision: Precision) -> BTreeMap<String, Vec<f32>> {
    let cfg = model_cfg();
    let model = Transformer::new(&cfg, 5, device).with_precision(precision);
    let (b, s) = (2, 32);
    let ids = |seed: u32| -> Tensor<2, Int> {
        let v: Vec<i64> = values(b * s, seed)
            .iter()
            .map(|x| ((x + 1.0) * 47.0) as i64)
            .collect();
        Tensor::from_data(TensorData::new(v, [b, s]), device)
    };
    let out = model.forward(ids(3));
    let loss = cross_entropy(out.logits.clone(), ids(4)) + out.aux_loss(&cfg, 0);
    let grads = loss.backward();
    let mut all: BTreeMap<String, Vec<f32>> = named_grads(&model, &grads)
        .into_iter()
        .map(|(k, v)| (format!("grad {k}"), host(v)))
        .collect();
    all.insert("loss".into(), host(loss));
    all
}

#[test]
fn moe_layer_on_cuda_matches_cpu() {
    let Some(gpu) = cuda() else { return };
    for (precision, tol) in [(Precision::Fp32, 2e-3), (Precision::Bf16, 5e-2)] {
        let worst = compare_all(
            &moe_layer_run(&gpu, precision),
            &moe_layer_run(&cpu(), precision),
            tol,
        );
        println!(
            "MoE layer {precision:?}: worst relative difference {worst:e} (tolerance {tol:e})"
        );
    }
}

#[test]
fn transformer_step_on_cuda_matches_cpu() {
    let Some(gpu) = cuda() else { return };
    for (precision, tol) in [(Precision::Fp32, 2e-3), (Precision::Bf16, 5e-2)] {
        let worst = compare_all(
            &model_run(&gpu, precision),
            &model_run(&cpu(), precision),
            tol,
        );
        println!(
            "transformer {precision:?}: worst relative difference {worst:e} (tolerance {tol:e})"
        );
    }
}
