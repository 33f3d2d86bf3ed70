//! Layout parity, the core promise: N ranks with expert / data / context parallelism equal one
//! process on the same global batch — the loss of every step, every parameter's gradient
//! (first step) and every weight after 3 AdamW steps (`NamedAdamW`, the trainer's own
//! optimizer), within 1e-5 relative (fp32; per tensor, max |a - b| <= 1e-5 * max |b|).
//!
//! Transport- and backend-agnostic: every rank computes the single-process reference itself
//! on the same burn device, runs its share of the parallel run, and compares what it holds;
//! the worst error is agreed over the world. So the same cases run on the local transport
//! inside `cargo test` (`tools/tests/parity.rs` on flex with its fused CPU kernels,
//! `tools/tests/parity_wgpu.rs` on burn's wgpu backend through the generic paths) and
//! under `mpirun` (`parity-mpi`, feature `mpi`).
//!
//! Cases: layouts dp=2, ep=2, ep=4, dp=2 x ep=2; cp=2, cp=4, dp=2 x cp=2, cp=2 x ep=2,
//! dp=2 x cp=2 x ep=2 with ring attention and TokenRing; routers top-k, null experts (AdaMoE), MoE++
//! (zero / copy / constant experts); a batch where some ranks receive zero tokens (every
//! token picks experts 0 and 1), one where every token goes to one expert, placements
//! that are not contiguous blocks, a different placement per MoE layer, and a live
//! migration after the first step (weights and AdamW state move to new owners; the next
//! steps must still equal one process).

use std::collections::BTreeMap;
use std::time::Duration;

use burn::tensor::{Device, Int, Tensor, TensorData};
use switchyard_comm::local::LocalComm;
use switchyard_comm::{Buffer, Communicator, LocalWorld, ReduceOp};
use switchyard_moe::config::{CapacityConfig, NullInit, NullNormalization};
use switchyard_moe::params::{map_params, named_grads, named_params};
use switchyard_moe::{
    ActivationCheckpointing, Component, ModelConfig, MoeConfig, ParamKey, RouterConfig,
    Transformer, cross_entropy,
};
use switchyard_parallel::{
    CpAlgorithm, CpConfig, ExpertPlacement, GradSync, LossScale, Mesh, MeshShape, Overlap,
    Placement, SeqLayout, ShardOptimizer, ShardedSync, apply_layout, migrate, shard_sequence,
};

use switchyard_trainer::checkpoint::tensor_values;
use switchyard_trainer::optim::{AdamMigration, NamedAdamW, OptimConfig, clip_scale, global_norm};

/// A multiple of 2 x cp for cp = 2 and 4 (zigzag chunks of 2 and 1 tokens).
const SEQ: usize = 8;
const BATCH: usize = 8;
const STEPS: usize = 3;
const LR: f64 = 1e-3;
/// Relative tolerance of every comparison.
pub const TOL: f32 = 1e-5;

/// How the routers are pushed, to build the batches the edge cases need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forcing {
    /// Random routing.
    None,
    /// Every token picks experts 0 and 1 (top-2): ep ranks owning neither get zero rows.
    FirstTwo,
    /// top-1, every token picks expert 0.
    Single,
}

/// One parity case.
#[derive(Clone, Debug)]
pub struct Case {
    pub label: String,
    pub model: ModelConfig,
    pub forcing: Forcing,
    pub dp: usize,
    pub ep: usize,
    /// Context-parallel ranks (1: none) and how their attention moves blocks.
    pub cp: usize,
    pub cp_algorithm: CpAlgorithm,
    /// Expert -> ep rank, one vector per MoE layer (model order; a single vector is used
    /// for every layer); `None` = contiguous blocks.
    pub owners: Option<Vec<Vec<usize>>>,
    /// After this many steps, migrate to these per-layer owners (as `owners`).
    pub migrate: Option<(usize, Vec<Vec<usize>>)>,
    /// The pipelined expert-parallel block with this chunking; `None` = the three-step
    /// reference path.
    pub overlap: Option<Overlap>,
    /// Sharded optimizer state / gradients (`parallel.shard_optimizer`).
    pub shard: ShardOptimizer,
    /// Global-norm clipping (the reference clips too); `None` = none.
    pub grad_clip: Option<f64>,
    /// Activation recomputation of the parallel run (the reference keeps everything).
    pub recompute: ActivationCheckpointing,
}

impl Case {
    pub fn world_size(&self) -> usize {
        self.dp * self.cp * self.ep
    }

    /// `dp=2 cp=2 ep=1 (Ring)`: the layout, for messages.
    pub fn layout(&self) -> String {
        let mut s = format!("dp={} ep={}", self.dp, self.ep);
        if self.cp > 1 {
            s += &format!(" cp={} ({:?})", self.cp, self.cp_algorithm);
        }
        if self.shard.is_sharded() {
            s += &format!(" shard_optimizer={:?}", self.shard);
        }
        if self.recompute != ActivationCheckpointing::None {
            s += &format!(" recompute={:?}", self.recompute);
        }
        s
    }
}

/// A 2-layer model, 4 experts, every layer MoE.
pub fn model_cfg(router: RouterConfig, top_k: usize) -> ModelConfig {
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
            top_k,
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

/// The router families of the parity matrix.
pub fn routers() -> Vec<(&'static str, RouterConfig)> {
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
                normalize: NullNormalization::TrueExperts,
                null_init: NullInit::Random,
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
    ]
}

/// The layouts of the parity matrix: (dp, ep).
pub const LAYOUTS: [(usize, usize); 4] = [(2, 1), (1, 2), (1, 4), (2, 2)];

/// Every case of the matrix.
pub fn all_cases() -> Vec<Case> {
    let case = |label: String, model, forcing, (dp, ep), owners: Option<Vec<Vec<usize>>>| Case {
        label,
        model,
        forcing,
        dp,
        ep,
        owners,
        overlap: None,
        migrate: None,
        cp: 1,
        cp_algorithm: CpAlgorithm::Ring,
        shard: ShardOptimizer::None,
        grad_clip: None,
        recompute: ActivationCheckpointing::None,
    };
    let mut cases = Vec::new();
    for (name, router) in routers() {
        for layout in LAYOUTS {
            cases.push(case(
                name.into(),
                model_cfg(router.clone(), 2),
                Forcing::None,
                layout,
                None,
            ));
        }
        for layout in [(1, 2), (1, 4), (2, 2)] {
            cases.push(case(
                format!("{name}, experts 0 and 1 only (zero-token ranks)"),
                model_cfg(router.clone(), 2),
                Forcing::FirstTwo,
                layout,
                None,
            ));
        }
    }
    let (_, top_k) = routers().remove(0);
    for layout in [(1, 2), (1, 4), (2, 2)] {
        cases.push(case(
            "top-1, every token to expert 0".into(),
            model_cfg(top_k.clone(), 1),
            Forcing::Single,
            layout,
            None,
        ));
    }
    // Non-contiguous (rows leave in another order than the plan's) and uneven placements.
    for owners in [[1usize, 0, 1, 0], [1, 1, 0, 1]] {
        for (name, router) in [routers().remove(0), routers().remove(2)] {
            for layout in [(1, 2), (2, 2)] {
                cases.push(case(
                    format!("{name}, placement {owners:?}"),
                    model_cfg(router.clone(), 2),
                    Forcing::None,
                    layout,
                    Some(vec![owners.to_vec()]),
                ));
            }
        }
    }
    // A different placement in each MoE layer (one even, one uneven).
    for (name, router) in [routers().remove(0), routers().remove(2)] {
        for layout in [(1, 2), (2, 2)] {
            cases.push(case(
                format!("{name}, per-layer placements"),
                model_cfg(router.clone(), 2),
                Forcing::None,
                layout,
                Some(vec![vec![1, 0, 1, 0], vec![0, 0, 0, 1]]),
            ));
        }
    }
    // Live migration after step 1: every layer changes owners differently.
    for (name, router) in routers() {
        for (layout, to) in [
            ((1, 2), vec![vec![1, 0, 1, 0], vec![0, 1, 1, 0]]),
            ((1, 4), vec![vec![3, 2, 1, 0], vec![1, 0, 3, 2]]),
            ((2, 2), vec![vec![1, 1, 0, 0], vec![0, 1, 0, 1]]),
        ] {
            let mut c = case(
                format!("{name}, migration"),
                model_cfg(router.clone(), 2),
                Forcing::None,
                layout,
                None,
            );
            c.migrate = Some((1, to));
            cases.push(c);
        }
    }
    // The pipelined block (chunked exchange overlapping the experts): every router at
    // every ep layout with 3 chunks (uneven pieces) and `auto`, zero-token ranks, one
    // expert for every token (chunks with no rows) and an uneven placement.
    let mut pipelined = Vec::new();
    for (name, router) in routers() {
        for layout in [(1, 2), (1, 4), (2, 2)] {
            for overlap in [Overlap::Chunks(3), Overlap::Auto] {
                pipelined.push((
                    name,
                    model_cfg(router.clone(), 2),
                    Forcing::None,
                    layout,
                    None,
                    overlap,
                ));
            }
            pipelined.push((
                name,
                model_cfg(router.clone(), 2),
                Forcing::FirstTwo,
                layout,
                None,
                Overlap::Chunks(2),
            ));
        }
    }
    let (_, top_k) = routers().remove(0);
    pipelined.push((
        "top-1",
        model_cfg(top_k.clone(), 1),
        Forcing::Single,
        (1, 4),
        None,
        Overlap::Chunks(8),
    ));
    pipelined.push((
        "top-k",
        model_cfg(top_k, 2),
        Forcing::None,
        (2, 2),
        Some(vec![vec![1, 1, 0, 1]]),
        Overlap::Chunks(3),
    ));
    for (name, model, forcing, (dp, ep), owners, overlap) in pipelined {
        cases.push(Case {
            label: format!("{name}, pipelined block ({overlap:?}, {forcing:?}, owners {owners:?})"),
            model,
            forcing,
            dp,
            ep,
            owners,
            overlap: Some(overlap),
            migrate: None,
            cp: 1,
            cp_algorithm: CpAlgorithm::Ring,
            shard: ShardOptimizer::None,
            grad_clip: None,
            recompute: ActivationCheckpointing::None,
        });
    }
    // Migration under the pipelined block: the new dispatchers keep the chunking.
    let (_, top_k) = routers().remove(0);
    cases.push(Case {
        label: "top-k, migration, pipelined block (Chunks(2))".into(),
        model: model_cfg(top_k, 2),
        forcing: Forcing::None,
        dp: 1,
        ep: 4,
        owners: None,
        overlap: Some(Overlap::Chunks(2)),
        migrate: Some((1, vec![vec![3, 2, 1, 0], vec![1, 0, 3, 2]])),
        cp: 1,
        cp_algorithm: CpAlgorithm::Ring,
        shard: ShardOptimizer::None,
        grad_clip: None,
        recompute: ActivationCheckpointing::None,
    });
    // Context parallelism, alone and with data and expert parallelism, both algorithms;
    // the null-expert router where cp meets ep.
    for algorithm in [CpAlgorithm::Ring, CpAlgorithm::TokenRing] {
        for (name, router) in [routers().remove(0), routers().remove(1)] {
            for (dp, cp, ep) in CP_LAYOUTS {
                if name != "top-k" && ep == 1 {
                    continue;
                }
                cases.push(Case {
                    label: format!("{name}, context parallel"),
                    model: model_cfg(router.clone(), 2),
                    forcing: Forcing::None,
                    dp,
                    ep,
                    owners: None,
                    overlap: None,
                    migrate: None,
                    cp,
                    cp_algorithm: algorithm,
                    shard: ShardOptimizer::None,
                    grad_clip: None,
                    recompute: ActivationCheckpointing::None,
                });
            }
        }
    }
    // The Hugging Face formats' model options (grouped-query attention with one kv head,
    // q/k norms, attention biases, Qwen2-MoE's gated shared expert, no top-k
    // renormalisation) under every data, expert and context layout.
    for (dp, ep) in LAYOUTS {
        cases.push(case(
            "qwen-shaped".into(),
            qwen_shaped_cfg(),
            Forcing::None,
            (dp, ep),
            None,
        ));
    }
    for algorithm in [CpAlgorithm::Ring, CpAlgorithm::TokenRing] {
        for (dp, cp, ep) in CP_LAYOUTS {
            cases.push(Case {
                label: "qwen-shaped, context parallel".into(),
                model: qwen_shaped_cfg(),
                forcing: Forcing::None,
                dp,
                ep,
                owners: None,
                overlap: (ep > 1).then_some(Overlap::Chunks(2)),
                migrate: None,
                cp,
                cp_algorithm: algorithm,
                shard: ShardOptimizer::None,
                grad_clip: None,
                recompute: ActivationCheckpointing::None,
            });
        }
    }
    // The routing options (sigmoid scores with a scaling factor, the auxiliary-loss-free
    // bias, group-limited routing, the sequence-wise and global-batch balance losses) at
    // every data / expert layout; the balance losses, capacity dropping with shared
    // experts, the recurrent router and MoE++ under context parallelism too.
    for (name, model) in routing_option_models() {
        for layout in LAYOUTS {
            cases.push(case(
                name.into(),
                model.clone(),
                Forcing::None,
                layout,
                None,
            ));
        }
    }
    for (name, model) in cp_models() {
        for (dp, ep) in LAYOUTS {
            let covered = routers().iter().any(|(n, _)| *n == name)
                || routing_option_models().iter().any(|(n, _)| *n == name);
            if !covered {
                cases.push(case(
                    name.into(),
                    model.clone(),
                    Forcing::None,
                    (dp, ep),
                    None,
                ));
            }
        }
        for (dp, cp, ep) in CP_LAYOUTS {
            let mut c = case(
                format!("{name}, context parallel"),
                model.clone(),
                Forcing::None,
                (dp, ep),
                None,
            );
            c.cp = cp;
            cases.push(c);
        }
    }
    // Sharded optimizer state and gradients, with clipping on (a small limit, so every step
    // clips): data and expert layouts, every router, a live migration (moments move with
    // their expert to the owner on the new rank) and context parallelism.
    for shard in [ShardOptimizer::States, ShardOptimizer::StatesAndGrads] {
        for (name, router) in routers() {
            for layout in [(2, 1), (4, 1), (2, 2)] {
                let mut c = case(
                    format!("{name}, sharded optimizer"),
                    model_cfg(router.clone(), 2),
                    Forcing::None,
                    layout,
                    None,
                );
                (c.shard, c.grad_clip) = (shard, Some(0.05));
                cases.push(c);
            }
        }
        let (_, top_k) = routers().remove(0);
        let mut c = case(
            "top-k, sharded optimizer, migration".into(),
            model_cfg(top_k.clone(), 2),
            Forcing::None,
            (2, 2),
            None,
        );
        c.migrate = Some((1, vec![vec![1, 1, 0, 0], vec![0, 1, 0, 1]]));
        (c.shard, c.grad_clip) = (shard, Some(0.05));
        cases.push(c);
        let mut c = case(
            "qwen-shaped, sharded optimizer, context parallel".into(),
            qwen_shaped_cfg(),
            Forcing::None,
            (1, 2),
            None,
        );
        (c.cp, c.shard, c.grad_clip) = (2, shard, Some(0.05));
        cases.push(c);
    }
    // Activation recomputation around the distributed nodes: the pipelined expert block and
    // the all-to-all (recomputed with the whole block under `full`), ring attention and
    // TokenRing (recomputed under both), every router family crossing recomputed blocks.
    for recompute in [
        ActivationCheckpointing::Full,
        ActivationCheckpointing::Selective,
    ] {
        for (name, router) in routers() {
            let mut c = case(
                format!("{name}, recomputation"),
                model_cfg(router, 2),
                Forcing::None,
                (2, 2),
                None,
            );
            c.recompute = recompute;
            cases.push(c);
        }
        // The layer's own collectives (capacity admission's all-gather, the sequence-wise
        // loss's all-reduce) run again in the recomputed forward.
        for (name, model) in cp_models() {
            if name.contains("shared expert") || name.starts_with("sequence") {
                let mut c = case(
                    format!("{name}, recomputation"),
                    model,
                    Forcing::None,
                    (2, 2),
                    None,
                );
                c.recompute = recompute;
                cases.push(c);
            }
        }
        let (_, top_k) = routers().remove(0);
        let mut c = case(
            "top-k, recomputation, pipelined block".into(),
            model_cfg(top_k.clone(), 2),
            Forcing::None,
            (1, 4),
            None,
        );
        (c.recompute, c.overlap) = (recompute, Some(Overlap::Chunks(2)));
        cases.push(c);
        for algorithm in [CpAlgorithm::Ring, CpAlgorithm::TokenRing] {
            let mut c = case(
                "qwen-shaped, recomputation, context parallel".into(),
                qwen_shaped_cfg(),
                Forcing::None,
                (1, 2),
                None,
            );
            (c.recompute, c.cp, c.cp_algorithm) = (recompute, 2, algorithm);
            cases.push(c);
        }
    }
    cases
}

/// Models of the routing options, each with a label: run at every data / expert layout.
pub fn routing_option_models() -> Vec<(&'static str, ModelConfig)> {
    use switchyard_moe::config::{
        BalanceLoss, BiasBalanceConfig, GroupLimitedConfig, ScoreFunction,
    };
    let top_k = || model_cfg(routers().remove(0).1, 2);
    let mut sigmoid = top_k();
    sigmoid.moe.score = ScoreFunction::Sigmoid;
    sigmoid.moe.scaling_factor = 2.5;
    // A large gamma, so that the bias changes choices within the three steps.
    let bias = Some(BiasBalanceConfig { gamma: 0.05 });
    let mut aux_free = top_k();
    aux_free.moe.bias_balance = bias;
    let mut grouped = sigmoid.clone();
    grouped.moe.bias_balance = bias;
    grouped.moe.group_limited = Some(GroupLimitedConfig {
        groups: 2,
        top_groups: 1,
    });
    let mut sequence = top_k();
    sequence.moe.balance_loss = BalanceLoss::Sequence;
    sequence.moe.load_balance_coef = 0.1;
    let mut global = top_k();
    global.moe.balance_loss = BalanceLoss::GlobalBatch;
    global.moe.load_balance_coef = 0.1;
    let mut null_bias = model_cfg(routers().remove(1).1, 2);
    null_bias.moe.bias_balance = bias;
    vec![
        ("sigmoid scores, scaling factor 2.5", sigmoid),
        ("aux-loss-free bias", aux_free),
        ("sigmoid, aux-loss-free bias, group-limited 1 of 2", grouped),
        ("sequence-wise balance loss", sequence),
        ("global-batch balance loss", global),
        ("null experts, aux-loss-free bias", null_bias),
    ]
}

/// Models run under context parallelism (and at every data / expert layout): the
/// sequence-wise balance loss (sequences split over cp ranks), capacity dropping with
/// shared experts, the recurrent router, MoE++.
pub fn cp_models() -> Vec<(&'static str, ModelConfig)> {
    let mut dropping = model_cfg(routers().remove(0).1, 2);
    dropping.moe.capacity = CapacityConfig::Drop { factor: 0.75 };
    dropping.moe.shared_expert = Some(switchyard_moe::config::SharedExpertConfig {
        count: 1,
        ffn_dim: 8,
        gate: false,
    });
    let mut moepp_dropping = model_cfg(routers().remove(2).1, 2);
    moepp_dropping.moe.capacity = CapacityConfig::Drop { factor: 0.75 };
    let recurrent = model_cfg(
        RouterConfig::Recurrent {
            state_dim: 8,
            detach_state: false,
            normalize_weights: true,
        },
        2,
    );
    let sequence = routing_option_models()
        .into_iter()
        .find(|(name, _)| name.starts_with("sequence"))
        .expect("the sequence-wise case exists");
    vec![
        ("capacity drop 0.75, shared expert", dropping),
        ("MoE++, capacity drop 0.75", moepp_dropping),
        ("recurrent router", recurrent),
        ("MoE++", model_cfg(routers().remove(2).1, 2)),
        sequence,
    ]
}

/// `model_cfg` with the attention and shared-expert options of the Qwen formats.
pub fn qwen_shaped_cfg() -> ModelConfig {
    let mut cfg = model_cfg(
        RouterConfig::TopKSoftmax {
            normalize_weights: false,
        },
        2,
    );
    cfg.attention = switchyard_moe::config::AttentionConfig {
        kv_heads: Some(1),
        head_dim: Some(6),
        bias: switchyard_moe::config::AttentionBias::All,
        qk_norm: true,
    };
    cfg.moe.shared_expert = Some(switchyard_moe::config::SharedExpertConfig {
        count: 1,
        ffn_dim: 8,
        gate: true,
    });
    cfg
}

/// The context-parallel layouts of the matrix: (dp, cp, ep).
pub const CP_LAYOUTS: [(usize, usize, usize); 5] =
    [(1, 2, 1), (1, 4, 1), (2, 2, 1), (1, 2, 2), (2, 2, 2)];

/// Per-layer owner vectors -> placements keyed by model layer index (a single vector
/// applies to every MoE layer).
fn layer_placements(
    cfg: &ModelConfig,
    owners: &[Vec<usize>],
    ep: usize,
) -> Result<BTreeMap<usize, Placement>, String> {
    let moe_layers: Vec<usize> = (0..cfg.n_layers).filter(|&l| cfg.is_moe_layer(l)).collect();
    moe_layers
        .iter()
        .enumerate()
        .map(|(k, &l)| {
            let o = &owners[k.min(owners.len() - 1)];
            Placement::from_owners(o.clone(), ep)
                .map(|p| (l, p))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// The same model on every rank and in the reference; `forcing` makes feature 0 of every
/// token a large constant and the routers prefer the forced experts along it.
pub fn build(cfg: &ModelConfig, forcing: Forcing, device: &Device) -> Transformer {
    // Attention (and GRU) biases start at zero: drawn here instead, so that the weights after 3 steps
    // are not a few learning rates around zero, where the relative comparison divides
    // summation-order noise by almost nothing (measured: 1.95e-5 on `bq` at cp=2 with the
    // gradients within 1e-5).
    let model = map_params(Transformer::new(cfg, 7, device), |name, value| {
        let key = name.name();
        let attention_bias = ["bq", "bk", "bv", "bo"]
            .iter()
            .any(|b| key.ends_with(&format!("attn.{b}")));
        // The recurrent router's GRU biases start at zero too (measured: 1.1e-5 on
        // `router_gru.b_reset` at cp=4 with them at zero, the gradients within 1e-6).
        let gru_bias = key.starts_with("router_gru.b_");
        if !attention_bias && !gru_bias {
            return value;
        }
        let n = value.dims()[0];
        let v: Vec<f32> = (0..n)
            .map(|i| 0.2 * ((i * 7 + key.len() * 13) as f32).sin())
            .collect();
        Tensor::from_floats(v.as_slice(), &value.device())
    });
    let favoured: &[usize] = match forcing {
        Forcing::None => return model,
        Forcing::FirstTwo => &[0, 1],
        Forcing::Single => &[0],
    };
    let d = cfg.d_model;
    map_params(model, |name, value| {
        let mut v = tensor_values(&value);
        if name.component() == Component::Embedding {
            for row in v.chunks_mut(d) {
                row[0] = 5.0;
            }
        } else if name.is_router_gate() {
            // [D, N] row-major: row 0 is the weight of feature 0.
            let slots = v.len() / d;
            for (e, w) in v[..slots].iter_mut().enumerate() {
                *w = match favoured.iter().position(|&f| f == e) {
                    Some(rank) => 3.0 - rank as f32,
                    None => -3.0,
                };
            }
        } else {
            return value;
        }
        Tensor::from_floats(v.as_slice(), &value.device())
    })
}

/// Deterministic global batch: [BATCH, SEQ + 1] tokens.
pub fn batch(vocab: usize) -> Vec<i64> {
    let mut state = 12345u64;
    (0..BATCH * (SEQ + 1))
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as i64
        })
        .collect()
}

/// Inputs and targets [rows, SEQ] of `tokens` ([rows, SEQ + 1]).
pub fn tensors(tokens: &[i64], rows: usize, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
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

fn optim_cfg() -> OptimConfig {
    OptimConfig {
        lr: LR,
        min_lr: LR,
        warmup_steps: 0,
        decay_steps: None,
        beta1: 0.9,
        beta2: 0.95,
        // Not the trainer's 1e-8: AdamW's first update g / (|g| + eps) has slope 1 / (4 eps)
        // at |g| = eps, so with 1e-8 a gradient element that cancels to ~1e-8 turns fp32
        // summation-order noise of ~1e-12 (any change of kernel or row split) into a
        // weight difference near 1e-5 relative. Measured on the ill-conditioned case (null
        // experts, every token to experts 0 and 1): 2.7e-6 .. 1.04e-5 depending on which
        // fused kernels run at eps = 1e-8, 2.9e-7 .. 1.9e-6 at 1e-6; every other case sits at
        // ~3e-7 either way. Gradients are compared directly as well.
        eps: 1e-6,
        weight_decay: 0.1,
        grad_clip: None,
    }
}

type Named = BTreeMap<String, Vec<f32>>;

/// Loss (share) per step, first-step gradients, final weights.
struct Run {
    losses: Vec<f64>,
    grads: Named,
    weights: Named,
}

fn scalar(t: &Tensor<1>) -> f64 {
    tensor_values(t)[0] as f64
}

fn reference(cfg: &ModelConfig, forcing: Forcing, grad_clip: Option<f64>, device: &Device) -> Run {
    let device = device.clone();
    let mut model = build(cfg, forcing, &device);
    let mut adam = NamedAdamW::new(&optim_cfg(), &model);
    let tokens = batch(cfg.vocab_size);
    let mut run = Run {
        losses: vec![],
        grads: Named::new(),
        weights: Named::new(),
    };
    for step in 0..STEPS {
        let (inputs, targets) = tensors(&tokens, BATCH, &device);
        let out = model.forward(inputs);
        let loss = cross_entropy(out.logits.clone(), targets) + out.aux_loss(cfg, step as u64);
        run.losses.push(scalar(&loss));
        let grads = named_grads(&model, &loss.backward());
        if step == 0 {
            for (name, _, value) in named_params(&model) {
                let g = grads
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| value.zeros_like());
                run.grads.insert(name.to_string(), tensor_values(&g));
            }
        }
        let scale = clip_scale(global_norm(&grads), grad_clip);
        model = adam.step(model, &grads, scale, LR);
        update_biases(&mut model, cfg, &out.moe_stats);
    }
    for (name, _, value) in named_params(&model) {
        run.weights.insert(name.to_string(), tensor_values(&value));
    }
    insert_biases(&mut run.weights, &model);
    run
}

/// The auxiliary-loss-free step after an update (as the trainer's): the step's global
/// counts per slot, the same on every rank.
fn update_biases(
    model: &mut Transformer,
    cfg: &ModelConfig,
    stats: &[(usize, switchyard_moe::MoeStats)],
) {
    if let Some(bias) = &cfg.moe.bias_balance {
        let counts: Vec<(usize, Vec<f64>)> = stats
            .iter()
            .map(|(l, s)| (*l, s.slot_counts.clone()))
            .collect();
        model.update_router_biases(&counts, bias.gamma);
    }
}

/// The routers' biases join the compared weights (every rank holds them all).
fn insert_biases(weights: &mut Named, model: &Transformer) {
    for (layer, bias) in model.router_biases() {
        weights.insert(format!("layers.{layer}.moe.router.bias"), bias);
    }
}

/// This rank's loss shares, synced first-step gradients and final weights of the
/// parameters it holds.
fn parallel(
    case: &Case,
    world: Box<dyn Communicator>,
    device: &Device,
) -> Result<(Run, Mesh), String> {
    let cfg = &case.model;
    let device = device.clone();
    let shape = MeshShape {
        dp: case.dp,
        cp: case.cp,
        ep: case.ep,
    };
    let mut mesh =
        Mesh::with_shape(world, shape, cfg.moe.num_experts).map_err(|e| e.to_string())?;
    let mut placement =
        ExpertPlacement::contiguous(cfg.moe.num_experts, case.ep).map_err(|e| e.to_string())?;
    if let Some(owners) = &case.owners {
        placement = placement
            .with_layers(layer_placements(cfg, owners, case.ep)?)
            .map_err(|e| e.to_string())?;
    }
    if let Some(overlap) = case.overlap {
        mesh = mesh.with_ep_overlap(overlap);
    }
    let mut model = apply_layout(
        build(cfg, case.forcing, &device).with_recompute(case.recompute),
        &mesh,
        &placement,
        &CpConfig {
            algorithm: case.cp_algorithm,
        },
    )
    .map_err(|e| e.to_string())?;
    let sync = GradSync::new(&mesh).with_bucket_elems(700);
    let mut sharded = case
        .shard
        .is_sharded()
        .then(|| ShardedSync::new(&mesh, &model, 700));
    let mut adam = NamedAdamW::new(&optim_cfg(), &model)
        .sharded(sharded.as_ref().map(|s| s.ownership().clone()));
    if case.grad_clip.is_some() && sharded.is_none() {
        return Err(format!(
            "{}: clipping is compared with a sharded optimizer only (its norm)",
            case.label
        ));
    }
    // Batch rows per dp x ep shard; each cp rank of a shard takes its zigzag columns.
    let (shard, shards) = mesh.batch_shard();
    let rows = BATCH / shards;
    let tokens = batch(cfg.vocab_size);
    let mine = &tokens[shard * rows * (SEQ + 1)..(shard + 1) * rows * (SEQ + 1)];
    let seq_layout = SeqLayout::zigzag(mesh.cp());
    let scale = LossScale::new(&mesh, rows * SEQ / mesh.cp()).map_err(|e| e.to_string())?;
    let mut run = Run {
        losses: vec![],
        grads: Named::new(),
        weights: Named::new(),
    };
    for step in 0..STEPS {
        if let Some((_, to)) = case.migrate.as_ref().filter(|(at, _)| *at == step) {
            let mut state = AdamMigration { optim: &mut adam };
            let new = layer_placements(cfg, to, case.ep)?;
            let moved;
            (model, placement, moved) = migrate(model, &mesh, &placement, new, &mut state, &device)
                .map_err(|e| e.to_string())?;
            if moved.is_empty() {
                return Err(format!("{}: the migration moved nothing", case.label));
            }
            if let Some(shard) = &mut sharded {
                shard.reset(&mesh, &model);
            }
        }
        let (inputs, targets) = tensors(mine, rows, &device);
        let (inputs, targets) = if mesh.cp() > 1 {
            let cp_rank = mesh.cp_rank();
            (
                shard_sequence(inputs, &seq_layout, cp_rank).map_err(|e| e.to_string())?,
                shard_sequence(targets, &seq_layout, cp_rank).map_err(|e| e.to_string())?,
            )
        } else {
            (inputs, targets)
        };
        let out = model.forward(inputs);
        let loss = cross_entropy(out.logits.clone(), targets) * scale.ce_weight()
            + out.aux_loss(cfg, step as u64);
        run.losses.push(scalar(&loss));
        let local = named_grads(&model, &loss.backward());
        let grads = match &sharded {
            // The owned gradients only: each is compared on its owner.
            Some(shard) => shard.reduce_scatter(&model, &local),
            None => sync.sync(&model, &local),
        }
        .map_err(|e| e.to_string())?;
        if step == 0 {
            for (name, g) in &grads {
                run.grads.insert(name.to_string(), tensor_values(g));
            }
        }
        model = match &sharded {
            Some(shard) => {
                let norm = shard.grad_norm(&grads).map_err(|e| e.to_string())?;
                let model = adam.step(model, &grads, clip_scale(norm, case.grad_clip), LR);
                shard.all_gather(model).map_err(|e| e.to_string())?
            }
            None => adam.step(model, &grads, 1.0, LR),
        };
        update_biases(&mut model, cfg, &out.moe_stats);
    }
    for (name, _, value) in named_params(&model) {
        run.weights.insert(name.to_string(), tensor_values(&value));
    }
    insert_biases(&mut run.weights, &model);
    Ok((run, mesh))
}

fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    if scale == 0.0 { diff } else { diff / scale }
}

/// Runs `case` as this rank of `world` (every rank of a world of `case.world_size()`
/// calls it) on the flex device. Returns the worst relative error over every rank's
/// comparisons (agreed over the world), or the first mismatch this rank saw.
pub fn check_case(case: &Case, world: Box<dyn Communicator>) -> Result<f32, String> {
    check_case_on(case, world, &Device::flex().autodiff())
}

/// [`check_case`] on `device` (an autodiff device): the reference and the parallel run
/// both run there.
pub fn check_case_on(
    case: &Case,
    world: Box<dyn Communicator>,
    device: &Device,
) -> Result<f32, String> {
    check_case_within(case, world, device, TOL)
}

/// [`check_case_on`] with another relative tolerance `tol` (a GPU's f32 GEMMs may round
/// through TF32, so its layouts are compared at the GPU suite's 2e-3).
pub fn check_case_within(
    case: &Case,
    world: Box<dyn Communicator>,
    device: &Device,
    tol: f32,
) -> Result<f32, String> {
    if world.size() != case.world_size() {
        return Err(format!(
            "{}: the case needs {} ranks, the world has {}",
            case.label,
            case.world_size(),
            world.size()
        ));
    }
    let want = reference(&case.model, case.forcing, case.grad_clip, device);
    let (got, mesh) = parallel(case, world, device)?;
    let mut worst = 0f32;
    let mut problems = Vec::new();
    // Loss: the shares sum to the global loss.
    let mut losses = Buffer::F64(got.losses.clone());
    mesh.world()
        .all_reduce(&mut losses, ReduceOp::Sum)
        .map_err(|e| e.to_string())?;
    for (step, want_loss) in want.losses.iter().enumerate() {
        let total = losses.get_f64(step);
        let rel = ((total - want_loss) / want_loss).abs() as f32;
        worst = worst.max(rel);
        if rel > tol {
            problems.push(format!("loss of step {step}: {total} vs {want_loss}"));
        }
    }
    for (what, got_map, want_map) in [
        ("gradient", &got.grads, &want.grads),
        ("weight after 3 steps", &got.weights, &want.weights),
    ] {
        // Every held parameter is compared; every dense parameter must be held.
        for (name, g) in got_map {
            let Some(w) = want_map.get(name) else {
                problems.push(format!("{what} of `{name}`: not in the reference"));
                continue;
            };
            if g.len() != w.len() {
                problems.push(format!(
                    "{what} of `{name}`: {} vs {} values",
                    g.len(),
                    w.len()
                ));
                continue;
            }
            let rel = max_rel(g, w);
            worst = worst.max(rel);
            if rel > tol {
                problems.push(format!("{what} of `{name}`: relative error {rel:e}"));
            }
        }
    }
    // Coverage: every expert's weights on exactly its dp replicas.
    let held: Vec<u8> = want
        .weights
        .keys()
        .map(|name| got.weights.contains_key(name) as u8)
        .collect();
    let counts = mesh
        .world()
        .all_gather_v(
            &Buffer::U8(held.clone()),
            &vec![held.len(); mesh.world().size()],
        )
        .map_err(|e| e.to_string())?
        .into_vec::<u8>()
        .map_err(|_| "all-gather of u8".to_string())?;
    for (i, name) in want.weights.keys().enumerate() {
        let holders: usize = counts.chunks(held.len()).map(|c| c[i] as usize).sum();
        let expected = if ParamKey::parse(name).routed_expert_id().is_some() {
            case.dp * case.cp
        } else {
            case.world_size()
        };
        if holders != expected {
            problems.push(format!(
                "`{name}` is held by {holders} ranks, expected {expected}"
            ));
        }
    }
    let mut agreed = Buffer::F64(vec![worst as f64, problems.len() as f64]);
    mesh.world()
        .all_reduce(&mut agreed, ReduceOp::Max)
        .map_err(|e| e.to_string())?;
    if !problems.is_empty() {
        return Err(format!(
            "{} ({}), rank {}: {}",
            case.label,
            case.layout(),
            mesh.rank(),
            problems.join("; ")
        ));
    }
    if agreed.get_f64(1) > 0.0 {
        return Err(format!("{}: another rank saw a mismatch", case.label));
    }
    Ok(agreed.get_f64(0) as f32)
}

/// Runs `case` on one thread per rank (a local world whose collectives time out after
/// `timeout`) on `device`, compared at `tol`. Returns the agreed worst relative error;
/// panics with the first rank's mismatch.
pub fn run_case(case: &Case, device: &Device, tol: f32, timeout: Duration) -> f32 {
    run_case_wrapped(case, device, tol, timeout, |c| Box::new(c))
}

/// [`run_case`] with each rank's communicator wrapped by `wrap` first (e.g. in
/// [`switchyard_comm::rendezvous::Rendezvous`], NCCL's point-to-point semantics).
pub fn run_case_wrapped(
    case: &Case,
    device: &Device,
    tol: f32,
    timeout: Duration,
    wrap: impl Fn(LocalComm) -> Box<dyn Communicator> + Sync,
) -> f32 {
    let comms = LocalWorld::new(case.world_size(), timeout, None);
    let results: Vec<Result<f32, String>> = LocalWorld::spawn(comms, Some(64 << 20), |c| {
        check_case_within(case, wrap(c), device, tol)
    });
    let mut worst = 0f32;
    for r in results {
        worst = worst.max(r.unwrap_or_else(|e| panic!("{e}")));
    }
    assert!(
        worst <= tol,
        "{} {}: worst relative error {worst:e}",
        case.label,
        case.layout()
    );
    worst
}
