//! The pipelined expert-parallel block gives the same bits at every chunk count: the loss,
//! every parameter's gradient (experts' included) and the model output, for d = 1, 2, 3, 8
//! (pieces of uneven size, chunks with no rows) at ep = 2 and 4. This is what lets
//! `ep_overlap: auto` change d mid-run (and a resumed run tune again) without changing the
//! training curve. Parity with one process is the trainer's parity matrix.

mod common;

use std::collections::BTreeMap;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{run_world, to_vec};
use switchyard_moe::config::CapacityConfig;
use switchyard_moe::params::named_grads;
use switchyard_moe::{ModelConfig, MoeConfig, RouterConfig, Transformer, cross_entropy};
use switchyard_parallel::{CpConfig, ExpertPlacement, LossScale, Mesh, Overlap, apply_layout};

const SEQ: usize = 12;
const ROWS: usize = 3;

fn model_cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 40,
        d_model: 16,
        n_heads: 2,
        n_layers: 2,
        ffn_dim: 32,
        max_seq_len: SEQ,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        init_std: 0.2,
        attention: Default::default(),
        moe: MoeConfig {
            every: 1,
            num_experts: 8,
            top_k: 2,
            expert_ffn_dim: 24,
            router: RouterConfig::TopKSoftmax {
                normalize_weights: true,
            },
            capacity: CapacityConfig::Dropless {},
            shared_expert: None,
            load_balance_coef: 0.01,
            z_loss_coef: 0.001,
            ..Default::default()
        },
    }
}

/// This rank's loss, logits and gradients (by name) at chunk count `d`.
type Bits = (Vec<f32>, Vec<f32>, BTreeMap<String, Vec<f32>>);

fn step(ep: usize, d: usize) -> Vec<Bits> {
    let cfg = model_cfg();
    run_world(ep, |world| {
        let rank = world.rank();
        let mesh = Mesh::new(world, 1, ep, cfg.moe.num_experts)
            .expect("mesh")
            .with_ep_overlap(Overlap::Chunks(d));
        let device = Device::flex().autodiff();
        let placement =
            ExpertPlacement::contiguous(cfg.moe.num_experts, ep).expect("contiguous placement");
        let model = apply_layout(
            Transformer::new(&cfg, 3, &device),
            &mesh,
            &placement,
            &CpConfig::default(),
        )
        .expect("parallelize");
        let tokens: Vec<i64> = (0..ROWS * (SEQ + 1))
            .map(|i| ((i * 7 + rank * 13) % cfg.vocab_size) as i64)
            .collect();
        let batch = |offset: usize| {
            let v: Vec<i64> = (0..ROWS)
                .flat_map(|r| tokens[r * (SEQ + 1) + offset..r * (SEQ + 1) + offset + SEQ].to_vec())
                .collect();
            Tensor::<2, Int>::from_data(TensorData::new(v, [ROWS, SEQ]), &device)
        };
        let scale = LossScale::new(&mesh, ROWS * SEQ).expect("scale");
        let out = model.forward(batch(0));
        let loss =
            cross_entropy(out.logits.clone(), batch(1)) * scale.ce_weight() + out.aux_loss(&cfg, 0);
        let grads = named_grads(&model, &loss.backward());
        (
            to_vec(loss),
            to_vec(out.logits),
            grads
                .into_iter()
                .map(|(k, v)| (k.to_string(), to_vec(v)))
                .collect(),
        )
    })
}

#[test]
fn every_chunk_count_gives_the_same_bits() {
    for ep in [2, 4] {
        let base = step(ep, 1);
        assert!(
            base.iter()
                .all(|(_, _, g)| g.keys().any(|k| k.contains("experts"))),
            "every rank holds expert gradients"
        );
        for d in [1, 2, 3, 8] {
            let got = step(ep, d);
            for (rank, (want, have)) in base.iter().zip(&got).enumerate() {
                assert_eq!(want.0, have.0, "ep={ep} d={d} rank {rank}: loss");
                assert_eq!(want.1, have.1, "ep={ep} d={d} rank {rank}: logits");
                assert_eq!(
                    want.2.keys().collect::<Vec<_>>(),
                    have.2.keys().collect::<Vec<_>>(),
                    "ep={ep} d={d} rank {rank}: gradient names"
                );
                for (name, g) in &want.2 {
                    assert!(
                        g == &have.2[name],
                        "ep={ep} d={d} rank {rank}: gradient of {name} differs"
                    );
                }
            }
        }
    }
}
