//! What a run needs in memory, estimated from the config before anything is allocated, and
//! what the machine has. `switchyard validate-config` and `train` refuse (exit 2) a config
//! whose estimate exceeds the machine, instead of aborting in an allocation.
//!
//! The estimate is a lower bound of the large buffers, not a prediction of the peak: it
//! counts what a rank cannot do without and leaves out allocator slack, kernel workspaces,
//! the data set, checkpoints in flight and the binary. A config it refuses cannot run; one
//! it accepts may still need more.
//!
//! The same sizes give the default of `checkpoint.save_timeout_s` ([`save_timeout_s`]).
//!
//! Shape legend (config names): V `model.vocab_size`, D `model.d_model`, L
//! `model.n_layers`, F `model.ffn_dim`, E `moe.num_experts`, Fe `moe.expert_ffn_dim`, K
//! `moe.top_k`, H `model.n_heads`, S `data.seq_len`, B `data.batch_size`; a rank holds
//! E/ep experts, B/(dp*ep) rows and S/cp tokens of each row. All sizes are f64 bytes, so a
//! 10^12-wide config gives a huge number instead of an overflow.
//!
//! Per rank:
//! - `weights`: f32 parameters the rank holds: embedding V*D, output head D*V unless tied,
//!   per layer attention 4*D^2 and two RMSNorm gains 2*D, then a dense SwiGLU 3*D*F or an
//!   MoE block (router D*slots plus its variant's extras, E/ep experts 3*D*Fe, shared
//!   experts 3*D*Fs each, MoE++ constant experts 3*D each), the final norm D.
//! - `grads`: one f32 per weight.
//! - `optimizer`: AdamW's two moments, two f32 per weight.
//! - `activations`: one micro-batch's forward values kept for the backward, f32: per layer
//!   8 per token and model dimension (norms, q, k, v, attention output, residuals), the
//!   attention scores H*S^2 per row, the FFN's 3*F (dense) or 3*K*Fe (MoE) per token; and
//!   the logits with their gradient, 2*V per token.

use std::fmt;

use switchyard_moe::config::AttentionBias;
use switchyard_moe::{ActivationCheckpointing, ModelConfig, RouterConfig};
use switchyard_parallel::ShardOptimizer;

use crate::config::Config;

const F32: f64 = 4.0;
const GIB: f64 = (1u64 << 30) as f64;

/// A rank's parameters: the replicated (dense) ones and the routed experts it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamCounts {
    /// Held by every rank (embeddings, attention, norms, routers, dense and shared FFNs).
    pub dense: f64,
    /// The routed experts of this rank (E/ep per MoE layer), replicated over dp x cp.
    pub experts: f64,
}

impl ParamCounts {
    pub fn total(&self) -> f64 {
        self.dense + self.experts
    }
}

/// Parameters of the model with expert parallelism `ep`: every expert counted `1/ep` times.
pub fn parameters(model: &ModelConfig, ep: usize) -> f64 {
    param_counts(model, ep).total()
}

/// [`parameters`] split into replicated and expert parameters.
pub fn param_counts(model: &ModelConfig, ep: usize) -> ParamCounts {
    let d = model.d_model as f64;
    let v = model.vocab_size as f64;
    let moe = &model.moe;
    let swiglu = |ffn: usize| 3.0 * d * ffn as f64;
    let slots = moe.num_slots() as f64;
    let (router, router_once) = match &moe.router {
        RouterConfig::TopKSoftmax { .. } | RouterConfig::NullExperts { .. } => (d * slots, 0.0),
        RouterConfig::MoePlusPlus {
            gating_residual,
            constant,
            ..
        } => {
            let residual = if *gating_residual { slots * slots } else { 0.0 };
            // Each constant expert: a D x 2 mix and a D vector.
            (d * slots + residual + 3.0 * d * *constant as f64, 0.0)
        }
        RouterConfig::Recurrent { state_dim, .. } => {
            let s = *state_dim as f64;
            // Per layer: projection D x s and gate s x slots; one GRU (6 s x s, 3 s) shared.
            (d * s + s * slots, 6.0 * s * s + 3.0 * s)
        }
    };
    let shared = moe.shared_expert.as_ref().map_or(0.0, |s| {
        s.count as f64 * swiglu(s.ffn_dim) + if s.gate { d } else { 0.0 }
    });
    let (moe_layers, dense_layers) = layer_counts(model);
    let head = if model.tie_embeddings { 0.0 } else { d * v };
    let any_moe = if moe_layers > 0.0 { router_once } else { 0.0 };
    let experts = moe.num_experts as f64 / ep.max(1) as f64 * swiglu(moe.expert_ffn_dim);
    ParamCounts {
        dense: v * d
            + head
            + model.n_layers as f64 * (attention_params(model) + 2.0 * d)
            + moe_layers * (router + shared)
            + dense_layers * swiglu(model.ffn_dim)
            + d
            + any_moe,
        experts: moe_layers * experts,
    }
}

/// One attention block: q and o projections D x (H Dh), k and v D x (KV Dh), their biases
/// and the per-head q/k norm gains.
fn attention_params(model: &ModelConfig) -> f64 {
    let d = model.d_model as f64;
    let q = (model.n_heads * model.head_dim()) as f64;
    let kv = (model.kv_heads() * model.head_dim()) as f64;
    let bias = match model.attention.bias {
        AttentionBias::None => 0.0,
        AttentionBias::Qkv => q + 2.0 * kv,
        AttentionBias::All => q + 2.0 * kv + d,
    };
    let qk_norm = if model.attention.qk_norm {
        2.0 * model.head_dim() as f64
    } else {
        0.0
    };
    2.0 * d * q + 2.0 * d * kv + bias + qk_norm
}

/// (MoE layers, dense layers): layer `l` is MoE when `l` is a multiple of `moe.every`.
fn layer_counts(model: &ModelConfig) -> (f64, f64) {
    let l = model.n_layers;
    let moe = match model.moe.every {
        0 => l.min(1),
        every => l.div_ceil(every),
    };
    (moe as f64, (l - moe) as f64)
}

/// Bytes of one micro-batch's activations kept for the backward, per token (f32), of one
/// block: its attention sub-block and its feed-forward / MoE sub-block.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LayerActivations {
    attention: f64,
    ffn: f64,
}

/// What a block keeps per token. Attention: the norm's input and output, q, k, v (k and v
/// again at H heads when grouped), the attention probabilities (H x S: the fused core keeps
/// them) and the attention output; feed-forward: the norm's input and output, then a dense
/// SwiGLU's gate, up and product (3 F), or the router's logits, probabilities and weights
/// (3 slots), the K dispatched rows and expert outputs (2 K D) with their gate, up and
/// product (3 K Fe), and the shared experts'.
fn layer_activations(model: &ModelConfig, seq_len: f64, moe: bool) -> LayerActivations {
    let d = model.d_model as f64;
    let q = (model.n_heads * model.head_dim()) as f64;
    let kv = (model.kv_heads() * model.head_dim()) as f64;
    let grouped = if kv < q { 2.0 * q } else { 0.0 };
    let attention = 2.0 * d + q + 2.0 * kv + grouped + model.n_heads as f64 * seq_len + q;
    let m = &model.moe;
    let ffn = if moe {
        let slots = m.num_slots() as f64;
        let k = m.top_k as f64;
        let shared = m
            .shared_expert
            .as_ref()
            .map_or(0.0, |s| s.count as f64 * (3.0 * s.ffn_dim as f64 + d));
        2.0 * d + 3.0 * slots + k * (2.0 * d + 3.0 * m.expert_ffn_dim as f64) + shared
    } else {
        2.0 * d + 3.0 * model.ffn_dim as f64
    };
    LayerActivations {
        attention: F32 * attention,
        ffn: F32 * ffn,
    }
}

/// Bytes one rank needs, by kind (see the module legend), and the peak they make.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    /// f32 parameters this rank holds.
    pub weights: f64,
    /// The most gradient bytes held at once (a micro-batch's, the accumulated ones, the
    /// synced ones).
    pub grads: f64,
    /// AdamW's two f32 moments of the parameters this rank owns.
    pub optimizer: f64,
    /// One micro-batch's activations kept for the backward, with the configured
    /// recomputation, at their peak (the start of the backward).
    pub activations: f64,
    /// The same without recomputation.
    pub activations_kept: f64,
    /// Per block (kept without recomputation), by layer.
    pub per_layer: Vec<f64>,
    /// Gradient-sync buffers (every bucket in flight) and the expert all-to-all's rows.
    pub comm: f64,
    /// What each phase of a step holds at its worst moment: (name, bytes).
    pub phases: Vec<(&'static str, f64)>,
    /// The peak: the largest of the step's phases (forward/backward, gradient sync,
    /// optimizer update, weight all-gather).
    pub total: f64,
}

impl MemoryEstimate {
    /// The estimate for one rank of `cfg`'s layout.
    pub fn per_rank(cfg: &Config) -> MemoryEstimate {
        let p = &cfg.parallel;
        let m = &cfg.model;
        let counts = param_counts(m, p.ep);
        let params = counts.total();
        let weights = F32 * params;
        // Owned share of each parameter kind under sharding.
        let sharded = p.shard_optimizer.is_sharded();
        let owned = if sharded {
            counts.dense / p.world_size().max(1) as f64
                + counts.experts / (p.dp * p.cp).max(1) as f64
        } else {
            params
        };
        let optimizer = 2.0 * F32 * owned;
        let rows = (cfg.data.batch_size as f64 / p.batch_shards().max(1) as f64).ceil();
        let seq = cfg.data.seq_len as f64;
        let tokens = rows * (seq / p.cp.max(1) as f64).ceil();
        let d = m.d_model as f64;
        let per_layer: Vec<LayerActivations> = (0..m.n_layers)
            .map(|l| layer_activations(m, seq, m.is_moe_layer(l)))
            .collect();
        // Embedding output, final norm, logits and their gradient.
        let ends = F32 * (3.0 * d + 2.0 * m.vocab_size as f64);
        let kept: f64 = per_layer.iter().map(|a| a.attention + a.ffn).sum();
        let largest = per_layer
            .iter()
            .map(|a| a.attention + a.ffn)
            .fold(0.0, f64::max);
        let carry = F32 * m.moe.num_experts as f64;
        let recomputed = match cfg.train.activation_checkpointing {
            ActivationCheckpointing::None => kept,
            // Each block's input (and router state); the rebuilt block is the workspace.
            ActivationCheckpointing::Full => m.n_layers as f64 * (F32 * d + carry),
            // The attention sub-blocks keep their input; the rebuilt one is the workspace.
            ActivationCheckpointing::Selective => {
                per_layer.iter().map(|a| F32 * d + a.ffn).sum::<f64>()
            }
        };
        let activations = tokens * (recomputed + ends);
        let activations_kept = tokens * (kept + ends);
        // The backward of one block needs about as much again as the block keeps (the
        // gradients of what it kept); a recomputed block is rebuilt first.
        let workspace = tokens
            * match cfg.train.activation_checkpointing {
                ActivationCheckpointing::None => largest,
                ActivationCheckpointing::Full => 2.0 * largest,
                ActivationCheckpointing::Selective => {
                    largest + per_layer.iter().map(|a| a.attention).fold(0.0, f64::max)
                }
            };
        let accum = cfg.train.grad_accum_steps;
        let local_grads = F32 * params;
        let owned_grads = F32 * owned;
        // The accumulated gradients of earlier micro-batches.
        let accumulated = match (accum > 1, p.shard_optimizer) {
            (false, _) => 0.0,
            (true, ShardOptimizer::StatesAndGrads) => owned_grads,
            (true, _) => local_grads,
        };
        let multi_rank = p.world_size() > 1;
        let sync_flat = if multi_rank { local_grads } else { 0.0 };
        let a2a = if p.ep > 1 {
            2.0 * F32 * tokens * m.moe.top_k as f64 * d
        } else {
            0.0
        };
        let held = weights + optimizer;
        // The backward's worst moment: its start (every activation kept, the last block's
        // backward running) or its end (every gradient made, the first block's backward).
        let backward = held
            + accumulated
            + a2a
            + (activations + workspace).max(local_grads + workspace + tokens * ends);
        let sync = if multi_rank {
            // Local gradients, their flat copies in flight, the summed (or owned) result.
            held + accumulated.max(local_grads) + sync_flat + owned_grads
        } else {
            0.0
        };
        // The update writes new weights and moments beside the old ones.
        let update = held + owned_grads + F32 * owned + optimizer;
        // The all-gather builds every new value beside the old weights, from flat buffers.
        let gather = if sharded {
            held + owned_grads + 2.0 * weights
        } else {
            0.0
        };
        let phases = vec![
            ("forward and backward", backward),
            ("gradient sync", sync),
            ("optimizer update", update),
            ("weight all-gather", gather),
        ];
        let total = phases.iter().map(|(_, b)| *b).fold(0.0, f64::max);
        MemoryEstimate {
            weights,
            grads: (accumulated + local_grads).max(local_grads + owned_grads),
            optimizer,
            activations,
            activations_kept,
            per_layer: per_layer
                .iter()
                .map(|a| tokens * (a.attention + a.ffn))
                .collect(),
            comm: sync_flat.max(a2a),
            phases,
            total,
        }
    }
}

/// The write bandwidth a rank is assumed to have at least when saving its checkpoint shard
/// (a slow network filesystem shared by many writers): 25 MB/s.
pub const MIN_WRITE_BYTES_PER_S: f64 = 25e6;

/// What every save gets on top of its writing time (directory creation, fsyncs, renames,
/// the manifest, a busy metadata server): two minutes.
pub const SAVE_OVERHEAD_S: f64 = 120.0;

/// Bytes the largest shard of a checkpoint holds: rank 0's f32 weights and AdamW moments
/// (the dense tensors and its experts; other ranks write only their experts).
pub fn checkpoint_shard_bytes(cfg: &Config) -> f64 {
    let e = MemoryEstimate::per_rank(cfg);
    e.weights + e.optimizer
}

/// How long the ranks of a save wait for each other: `checkpoint.save_timeout_s` when set,
/// else [`SAVE_OVERHEAD_S`] plus the time to write the largest shard at
/// [`MIN_WRITE_BYTES_PER_S`] (a week at most).
pub fn save_timeout_s(cfg: &Config) -> f64 {
    cfg.checkpoint.save_timeout_s.unwrap_or_else(|| {
        let writing = checkpoint_shard_bytes(cfg) / MIN_WRITE_BYTES_PER_S;
        (SAVE_OVERHEAD_S + writing.ceil()).min(switchyard_parallel::MAX_TIMEOUT_S)
    })
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at the peak (weights {}, gradients {}, AdamW moments {}, activations {}, \
             communication buffers {})",
            gib(self.total),
            gib(self.weights),
            gib(self.grads),
            gib(self.optimizer),
            gib(self.activations),
            gib(self.comm)
        )
    }
}

/// `bytes` as GiB for messages (`1.5 GiB`, `3.7e12 GiB`).
pub fn gib(bytes: f64) -> String {
    let g = bytes / GIB;
    if g < 1e6 {
        format!("{g:.1} GiB")
    } else {
        format!("{g:.1e} GiB")
    }
}

/// Memory this process may use, bytes, and where that figure comes from: the machine's
/// `MemTotal` (/proc/meminfo), lowered by a cgroup limit when one is set (v2
/// `/sys/fs/cgroup/memory.max`, v1 `/sys/fs/cgroup/memory/memory.limit_in_bytes`). None
/// when neither can be read (not Linux): then nothing is refused.
pub fn available_memory() -> Option<(f64, &'static str)> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let total = read("/proc/meminfo").and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024.0)
    });
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .into_iter()
    // "max" (v2) or a page-rounded i64::MAX (v1) mean no limit: they fail or lose here.
    .find_map(|path| read(path)?.trim().parse::<f64>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) if c < t => Some((c, "the cgroup's memory limit")),
        (Some(t), _) => Some((t, "MemTotal")),
        (None, Some(c)) => Some((c, "the cgroup's memory limit")),
        (None, None) => None,
    }
}

/// An issue `(key path, message)` when `ranks_in_process` ranks of `cfg` (threads of one
/// process under the local backend; 1 per process under MPI, where the ranks sharing a
/// node are not known before MPI starts, so each rank is checked alone) need more than
/// `available` bytes (from [`available_memory`], named by `source`).
pub fn memory_issue(
    cfg: &Config,
    ranks_in_process: usize,
    available: f64,
    source: &str,
) -> Option<(String, String)> {
    let rank = MemoryEstimate::per_rank(cfg);
    let need = rank.total * ranks_in_process as f64;
    if need <= available {
        return None;
    }
    // Point at what dominates: the batch for activations, the model otherwise.
    let key = if rank.activations > 4.0 * rank.weights {
        "data.batch_size"
    } else {
        "model"
    };
    let ranks = if ranks_in_process > 1 {
        format!(
            " x {ranks_in_process} ranks in this process = {}",
            gib(need)
        )
    } else {
        String::new()
    };
    Some((
        key.to_string(),
        format!(
            "needs at least {rank} per rank{ranks} (estimated), but the machine has {} \
             ({source}); shrink the model or the batch, or use more ranks (parallel.ep / dp \
             under MPI)",
            gib(available)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use switchyard_moe::Transformer;

    fn model(yaml: &str) -> ModelConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    const SMALL: &str = "vocab_size: 256
d_model: 32
n_heads: 2
n_layers: 3
ffn_dim: 64
max_seq_len: 32
moe: {every: 2, num_experts: 4, top_k: 2, expert_ffn_dim: 16}
";

    /// By hand: embedding 256*32 = 8192 (the head is tied by default); per layer
    /// 4*32^2 + 2*32 = 4160 (x3); layers 0 and 2 are MoE: router 32*4 + experts
    /// 4*3*32*16 = 6272 (x2); layer 1 dense 3*32*64 = 6144; final norm 32.
    /// Total 8192 + 12480 + 12544 + 6144 + 32 = 39392.
    #[test]
    fn parameters_match_a_hand_count_and_the_model() {
        let cfg = model(SMALL);
        assert_eq!(parameters(&cfg, 1), 39_392.0);
        // Two ep ranks hold half the experts each.
        assert_eq!(
            parameters(&cfg, 2),
            39_392.0 - 2.0 * 2.0 * 3.0 * 32.0 * 16.0
        );
        let device = Default::default();
        for extra in [
            "",
            ", router: {type: null_experts, num_null: 2}",
            ", router: {type: moe_plus_plus}",
            ", router: {type: recurrent, state_dim: 8}",
            ", shared_expert: {count: 1, ffn_dim: 24}",
            ", shared_expert: {count: 2, ffn_dim: 24, gate: true}",
        ] {
            let yaml = SMALL.replace(
                "expert_ffn_dim: 16}",
                &format!("expert_ffn_dim: 16{extra}}}"),
            );
            let cfg = model(&yaml);
            let real = Transformer::new(&cfg, 0, &device).num_params() as f64;
            assert_eq!(parameters(&cfg, 1), real, "{extra}");
        }
    }

    /// The attention options of the Hugging Face formats change the count as the model does.
    #[test]
    fn attention_options_are_counted_as_the_model_has_them() {
        let device = Default::default();
        for attention in [
            "{kv_heads: 1}",
            "{head_dim: 24}",
            "{kv_heads: 1, head_dim: 12, bias: qkv}",
            "{bias: all, qk_norm: true}",
        ] {
            let cfg = model(&format!("{SMALL}attention: {attention}\n"));
            let real = Transformer::new(&cfg, 0, &device).num_params() as f64;
            assert_eq!(parameters(&cfg, 1), real, "{attention}");
        }
    }

    /// Sharding divides the moments (dense over the world, experts over dp x cp), never the
    /// weights; recomputation shrinks the activations kept, not the per-layer figures.
    #[test]
    fn sharding_and_recomputation_shrink_what_they_should() {
        let base = config(SMALL, "parallel: {dp: 2, ep: 2}");
        let sharded = config(SMALL, "parallel: {dp: 2, ep: 2, shard_optimizer: states}");
        let (a, b) = (
            MemoryEstimate::per_rank(&base),
            MemoryEstimate::per_rank(&sharded),
        );
        assert_eq!(a.weights, b.weights);
        let counts = param_counts(&base.model, 2);
        let owned = counts.dense / 4.0 + counts.experts / 2.0;
        assert_eq!(b.optimizer, 2.0 * F32 * owned);
        assert_eq!(a.optimizer, 2.0 * F32 * counts.total());
        for mode in [
            ActivationCheckpointing::Full,
            ActivationCheckpointing::Selective,
        ] {
            let mut cfg = config(SMALL, "");
            let none = MemoryEstimate::per_rank(&cfg);
            cfg.train.activation_checkpointing = mode;
            let r = MemoryEstimate::per_rank(&cfg);
            assert!(r.activations < none.activations, "{mode:?}");
            assert_eq!(r.activations_kept, none.activations_kept, "{mode:?}");
            assert_eq!(r.per_layer, none.per_layer, "{mode:?}");
        }
    }

    fn config(model_yaml: &str, extra: &str) -> Config {
        let model = model_yaml.replace('\n', "\n  ");
        serde_yaml::from_str(&format!(
            "run: {{name: t, output_dir: /nonexistent}}
model:
  {model}
data: {{tokenizer: {{type: byte}}, source: {{type: synthetic}}, seq_len: 8, batch_size: 4}}
optim: {{lr: 1.0e-3}}
train: {{steps: 1}}
{extra}"
        ))
        .unwrap()
    }

    /// The default save timeout: two minutes plus rank 0's shard (weights and both AdamW
    /// moments, f32) at 25 MB/s; an explicit value wins.
    #[test]
    fn the_save_timeout_follows_the_shard_size_unless_set() {
        let small = config(SMALL, "");
        let shard = 3.0 * F32 * parameters(&small.model, 1);
        assert_eq!(checkpoint_shard_bytes(&small), shard);
        assert_eq!(save_timeout_s(&small), 120.0 + (shard / 25e6).ceil());
        assert_eq!(save_timeout_s(&small), 121.0);
        // ~4.5e8 parameters: a 5.4 GB shard takes 3.6 minutes at 25 MB/s.
        let big = config(
            &SMALL
                .replace("d_model: 32", "d_model: 2048")
                .replace("expert_ffn_dim: 16", "expert_ffn_dim: 8192"),
            "",
        );
        let shard = checkpoint_shard_bytes(&big);
        assert!(shard > 5e9, "{shard}");
        assert_eq!(save_timeout_s(&big), 120.0 + (shard / 25e6).ceil());
        // Expert parallelism splits the experts: a smaller shard, a shorter wait.
        let sharded = config(
            &SMALL
                .replace("d_model: 32", "d_model: 2048")
                .replace("expert_ffn_dim: 16", "expert_ffn_dim: 8192"),
            "parallel: {ep: 2}",
        );
        assert!(save_timeout_s(&sharded) < save_timeout_s(&big));
        let set = config(SMALL, "checkpoint: {save_timeout_s: 30}");
        assert_eq!(save_timeout_s(&set), 30.0);
    }

    #[test]
    fn huge_sizes_give_huge_estimates_not_overflows() {
        let cfg = model(&SMALL.replace("d_model: 32", "d_model: 1000000000000"));
        let p = parameters(&cfg, 1);
        assert!(p.is_finite() && p > 1e24, "{p}");
        assert_eq!(gib(p * F32), "4.5e16 GiB");
    }
}
