//! Live migration on threads: after `migrate`, every rank holds exactly the experts its new
//! per-layer placement gives it, bit-identical to the weights the old owner had, the
//! caller's per-parameter state arrives with them, and migrating back restores the start.

mod common;

use std::collections::BTreeMap;

use burn::tensor::Device;
use common::{run_world, to_vec};
use switchyard_moe::config::CapacityConfig;
use switchyard_moe::params::named_params;
use switchyard_moe::{ModelConfig, MoeConfig, ParamKey, RouterConfig, Transformer};
use switchyard_parallel::migrate::{ExpertState, planned_moves};
use switchyard_parallel::{
    CpConfig, ExpertPlacement, Mesh, Placement, WeightsOnly, apply_layout, migrate,
};

fn model_cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 32,
        d_model: 8,
        n_heads: 2,
        n_layers: 2,
        ffn_dim: 16,
        max_seq_len: 8,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        init_std: 0.2,
        attention: Default::default(),
        moe: MoeConfig {
            every: 1,
            num_experts: 8,
            top_k: 2,
            expert_ffn_dim: 4,
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

/// State = the parameter's name as bytes, checked on arrival.
#[derive(Default)]
struct NameState {
    taken: usize,
    put: usize,
}

impl ExpertState for NameState {
    fn take(&mut self, param: &ParamKey) -> Vec<u8> {
        self.taken += 1;
        param.name().as_bytes().to_vec()
    }
    fn put(&mut self, param: &ParamKey, shape: &[usize], bytes: &[u8]) -> Result<(), String> {
        self.put += 1;
        if bytes != param.name().as_bytes() || shape.len() != 2 {
            return Err(format!(
                "state of {param} arrived as {bytes:?}, shape {shape:?}"
            ));
        }
        Ok(())
    }
}

type Weights = BTreeMap<String, Vec<f32>>;

fn expert_weights(model: &Transformer) -> Weights {
    named_params(model)
        .into_iter()
        .filter(|(key, _, _)| key.routed_expert_id().is_some())
        .map(|(key, _, v)| (key.to_string(), to_vec(v)))
        .collect()
}

fn placements(owners: [[usize; 8]; 2], ep: usize) -> BTreeMap<usize, Placement> {
    (0..2)
        .map(|l| (l, Placement::from_owners(owners[l].to_vec(), ep).unwrap()))
        .collect()
}

/// The model laid out over `mesh` with the contiguous placement (ep = 2).
fn contiguous_model(
    cfg: &ModelConfig,
    mesh: &Mesh,
    device: &Device,
) -> (Transformer, ExpertPlacement) {
    let contiguous = ExpertPlacement::contiguous(8, 2).unwrap();
    let model = apply_layout(
        Transformer::new(cfg, 3, device),
        mesh,
        &contiguous,
        &CpConfig::default(),
    )
    .unwrap();
    (model, contiguous)
}

#[test]
fn experts_and_their_state_move_to_the_new_owners_and_back() {
    let cfg = model_cfg();
    let device = Device::flex().autodiff();
    let full = expert_weights(&Transformer::new(&cfg, 3, &device));
    // dp = 2 x ep = 2: every dp replica moves its own copies.
    let new = [[1, 1, 0, 0, 1, 0, 1, 0], [0, 1, 0, 1, 1, 1, 0, 0]];
    let results = run_world(4, |world| {
        let mesh = Mesh::new(world, 2, 2, 8).unwrap();
        let (model, contiguous) = contiguous_model(&cfg, &mesh, &device);
        let start = expert_weights(&model);
        let moves = planned_moves(&contiguous, &placements(new, 2));
        let mut state = NameState::default();
        let (model, moved, made) = migrate(
            model,
            &mesh,
            &contiguous,
            placements(new, 2),
            &mut state,
            &device,
        )
        .unwrap();
        assert_eq!(made, moves);
        let after = expert_weights(&model);
        let back_owners = [[0, 0, 0, 0, 1, 1, 1, 1]; 2];
        let (model, _, _) = migrate(
            model,
            &mesh,
            &moved,
            placements(back_owners, 2),
            &mut WeightsOnly,
            &device,
        )
        .unwrap();
        (
            mesh.ep_rank(),
            start,
            after,
            expert_weights(&model),
            state.taken,
            state.put,
            moves.len(),
        )
    });
    for (p, start, after, back, taken, put, moves) in results {
        assert!(moves > 0);
        // 3 parameters per expert moved out and in.
        assert!(taken > 0 && put > 0, "rank {p}: taken {taken}, put {put}");
        for (l, owners) in new.iter().enumerate() {
            for (e, &owner) in owners.iter().enumerate() {
                for w in ["w_gate", "w_up", "w_down"] {
                    let name = format!("layers.{l}.moe.experts.{e}.{w}");
                    assert_eq!(
                        after.contains_key(&name),
                        owner == p,
                        "{name} on ep rank {p}"
                    );
                    if let Some(v) = after.get(&name) {
                        assert_eq!(v, &full[&name], "{name} arrived changed");
                    }
                }
            }
        }
        assert_eq!(
            start, back,
            "ep rank {p}: migrating back restores the start"
        );
    }
}

#[test]
fn a_placement_for_a_dense_layer_is_rejected() {
    let mut cfg = model_cfg();
    cfg.moe.every = 2;
    let device = Device::flex().autodiff();
    let errors = run_world(2, |world| {
        let mesh = Mesh::new(world, 1, 2, 8).unwrap();
        let (model, contiguous) = contiguous_model(&cfg, &mesh, &device);
        let bad = placements([[0, 0, 0, 0, 1, 1, 1, 1]; 2], 2);
        migrate(model, &mesh, &contiguous, bad, &mut WeightsOnly, &device)
            .err()
            .map(|e| e.to_string())
    });
    for e in errors {
        assert!(e.unwrap().contains("layer 1 is not a MoE layer"));
    }
}
