//! A full training step with context parallelism equals one process on the same global
//! batch: the loss (sum of the ranks' shares) and every parameter's synced gradient,
//! within 1e-5 relative (fp32; per tensor, max |a - b| <= 1e-5 * max |b|), the tolerance
//! of the expert-parallel parity tests.
//!
//! Layouts cp=2, cp=4, cp=2 x ep=2, dp=2 x cp=2, dp=2 x cp=2 x ep=2; both attention
//! algorithms; top-k and null-expert (AdaMoE) routers. Each rank takes its batch shard's
//! rows and the zigzag shard of their sequences (`shard_sequence`, the trainer's helper),
//! and `parallelize_with` swaps in the context-parallel attention.

mod common;

use std::collections::BTreeMap;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{run_world, to_vec};
use switchyard_moe::config::{CapacityConfig, NullInit, NullNormalization};
use switchyard_moe::params::{named_grads, named_params};
use switchyard_moe::{ModelConfig, MoeConfig, RouterConfig, Transformer, cross_entropy};
use switchyard_parallel::{
    CpAlgorithm, CpConfig, ExpertPlacement, GradSync, LossScale, Mesh, MeshShape, SeqLayout,
    apply_layout, shard_sequence,
};

/// A multiple of 2 * cp for cp = 2 and 4 (zigzag chunks of 2 and 1 tokens).
const SEQ: usize = 8;
const BATCH: usize = 4;
const TOL: f32 = 1e-5;

fn model_cfg(router: RouterConfig) -> ModelConfig {
    ModelConfig {
        vocab_size: 32,
        d_model: 16,
        n_heads: 2,
        n_layers: 2,
        ffn_dim: 32,
        max_seq_len: 16,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        init_std: 0.2,
        attention: Default::default(),
        moe: MoeConfig {
            every: 1,
            num_experts: 4,
            top_k: 2,
            expert_ffn_dim: 16,
            router,
            capacity: CapacityConfig::Dropless {},
            shared_expert: None,
            load_balance_coef: 0.01,
            z_loss_coef: 0.001,
            ..Default::default()
        },
    }
}

fn top_k() -> RouterConfig {
    RouterConfig::TopKSoftmax {
        normalize_weights: true,
    }
}

fn null_experts() -> RouterConfig {
    RouterConfig::NullExperts {
        num_null: 2,
        normalize: NullNormalization::TrueExperts,
        null_init: NullInit::Random,
        anneal: None,
    }
}

/// Deterministic global batch: [BATCH, SEQ + 1] tokens.
fn batch(vocab: usize) -> Vec<i64> {
    let mut state = 4242u64;
    (0..BATCH * (SEQ + 1))
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as i64
        })
        .collect()
}

/// Rows of `tokens` -> (inputs, targets) [rows, SEQ].
fn tensors(tokens: &[i64], device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let rows = tokens.len() / (SEQ + 1);
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    for row in tokens.chunks(SEQ + 1) {
        inputs.extend_from_slice(&row[..SEQ]);
        targets.extend_from_slice(&row[1..]);
    }
    (
        Tensor::from_data(TensorData::new(inputs, [rows, SEQ]), device),
        Tensor::from_data(TensorData::new(targets, [rows, SEQ]), device),
    )
}

type Named = BTreeMap<String, Vec<f32>>;

fn reference(cfg: &ModelConfig) -> (f64, Named) {
    let device = Device::flex().autodiff();
    let model = Transformer::new(cfg, 7, &device);
    let (inputs, targets) = tensors(&batch(cfg.vocab_size), &device);
    let out = model.forward(inputs);
    let loss = cross_entropy(out.logits.clone(), targets) + out.aux_loss(cfg, 0);
    let grads = named_grads(&model, &loss.backward());
    let named = named_params(&model)
        .into_iter()
        .map(|(name, _, value)| {
            let g = grads
                .get(&name)
                .cloned()
                .unwrap_or_else(|| value.zeros_like());
            (name.to_string(), to_vec(g))
        })
        .collect();
    (to_vec(loss)[0] as f64, named)
}

/// Per rank: its loss share and the synced gradients of the parameters it holds and owns.
fn parallel(cfg: &ModelConfig, shape: MeshShape, algorithm: CpAlgorithm) -> Vec<(f64, Named)> {
    run_world(shape.world_size(), |comm| {
        let device = Device::flex().autodiff();
        let mesh = Mesh::with_shape(comm, shape, cfg.moe.num_experts).expect("valid mesh");
        let placement = ExpertPlacement::contiguous(cfg.moe.num_experts, shape.ep)
            .expect("contiguous placement");
        let model = apply_layout(
            Transformer::new(cfg, 7, &device),
            &mesh,
            &placement,
            &CpConfig { algorithm },
        )
        .expect("parallelize");
        let (shard, shards) = mesh.batch_shard();
        let rows = BATCH / shards;
        let tokens = batch(cfg.vocab_size);
        let mine = &tokens[shard * rows * (SEQ + 1)..(shard + 1) * rows * (SEQ + 1)];
        let (inputs, targets) = tensors(mine, &device);
        let layout = SeqLayout::zigzag(mesh.cp());
        let inputs = shard_sequence(inputs, &layout, mesh.cp_rank()).expect("shard inputs");
        let targets = shard_sequence(targets, &layout, mesh.cp_rank()).expect("shard targets");
        let scale = LossScale::new(&mesh, rows * SEQ / mesh.cp()).expect("token counts");
        let out = model.forward(inputs);
        let loss =
            cross_entropy(out.logits.clone(), targets) * scale.ce_weight() + out.aux_loss(cfg, 0);
        let sync = GradSync::new(&mesh);
        let grads = sync
            .sync(&model, &named_grads(&model, &loss.backward()))
            .expect("gradient sync");
        // Only the parameters this rank holds: dense ones and the experts it owns.
        let named = grads
            .into_iter()
            .map(|(key, g)| (key.to_string(), to_vec(g)))
            .collect();
        (to_vec(loss)[0] as f64, named)
    })
}

fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    if scale == 0.0 { diff } else { diff / scale }
}

fn check(label: &str, cfg: &ModelConfig, shape: MeshShape, algorithm: CpAlgorithm) {
    let (want_loss, want_grads) = reference(cfg);
    let ranks = parallel(cfg, shape, algorithm);
    let total: f64 = ranks.iter().map(|(l, _)| l).sum();
    let loss_rel = ((total - want_loss) / want_loss).abs() as f32;
    assert!(
        loss_rel <= TOL,
        "{label} {shape:?} {algorithm:?}: loss {total} vs {want_loss}"
    );
    let mut worst = loss_rel;
    for (name, want) in &want_grads {
        let holders: Vec<&Vec<f32>> = ranks.iter().filter_map(|(_, g)| g.get(name)).collect();
        // Dense parameters on every rank; an expert on the dp x cp ranks of its ep rank.
        assert!(
            holders.len() >= shape.dp * shape.cp,
            "{label}: gradient of `{name}` held by {} ranks",
            holders.len()
        );
        for got in holders {
            let rel = max_rel(got, want);
            assert!(
                rel <= TOL,
                "{label} {shape:?} {algorithm:?}: gradient of `{name}`: relative error {rel:e}"
            );
            worst = worst.max(rel);
        }
    }
    eprintln!("{label}: {shape:?} {algorithm:?}: max relative error {worst:e}");
}

fn shape(dp: usize, cp: usize, ep: usize) -> MeshShape {
    MeshShape { dp, cp, ep }
}

#[test]
fn cp2_x_ep2_training_step_matches_single_process() {
    for algorithm in [CpAlgorithm::Ring, CpAlgorithm::TokenRing] {
        for router in [top_k(), null_experts()] {
            check("cp2 x ep2", &model_cfg(router), shape(1, 2, 2), algorithm);
        }
    }
}

#[test]
fn cp_alone_training_step_matches_single_process() {
    for algorithm in [CpAlgorithm::Ring, CpAlgorithm::TokenRing] {
        for cp in [2, 4] {
            check("cp", &model_cfg(top_k()), shape(1, cp, 1), algorithm);
        }
    }
}

#[test]
fn dp_x_cp_x_ep_training_step_matches_single_process() {
    for algorithm in [CpAlgorithm::Ring, CpAlgorithm::TokenRing] {
        check("dp2 x cp2", &model_cfg(top_k()), shape(2, 2, 1), algorithm);
        check(
            "dp2 x cp2 x ep2",
            &model_cfg(top_k()),
            shape(2, 2, 2),
            algorithm,
        );
    }
}
