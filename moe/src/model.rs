//! Decoder-only MoE transformer, single-device code.
//!
//! Pre-norm blocks: `x + attn(norm(x))`, then `x + ffn(norm(x))` where the feed-forward is
//! an MoE layer or a dense SwiGLU. Rotary positions, causal multi-head attention (optionally
//! grouped-query, with biases and per-head q/k norms: `model.attention`), optional weight
//! tying between the embedding and the LM head.
//!
//! Shape legend: B batch, S sequence, D model dim, H query heads, KV key/value heads,
//! Dh head dim (D / H unless set), V vocab.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use crate::attention::{AttentionImpl, DenseAttention, cached_causal_attention};
use crate::config::{AttentionBias, ModelConfig, RouterConfig};
use crate::experts::SwiGlu;
use crate::init::Initializer;
use crate::layer::{MoeLayer, MoeStats};
use crate::profile::{self, Part};
use crate::recompute::{self, ActivationCheckpointing, Keep};
use crate::router::{Gru, RouterCarry};
use switchyard_kernels as cpu;
use switchyard_kernels::precision::{self, Precision};

#[derive(Module, Debug)]
pub struct RmsNorm {
    /// [D]
    pub gamma: Param<Tensor<1>>,
    #[module(skip)]
    eps: f64,
}

impl RmsNorm {
    fn new(d_model: usize, eps: f64, init: &mut Initializer) -> Self {
        Self {
            gamma: init.ones([d_model]),
            eps,
        }
    }

    /// x: [B, S, D] -> [B, S, D]; one fused op on the CPU backend (`cpu::norm`).
    pub fn forward(&self, x_bsd: Tensor<3>) -> Tensor<3> {
        let [b, s, d] = x_bsd.dims();
        let x_nd = x_bsd.clone().reshape([b * s, d]);
        match cpu::norm::rms_norm(&x_nd, &self.gamma.val(), self.eps) {
            Some(y_nd) => y_nd.reshape([b, s, d]),
            None => self.forward_reference(x_bsd),
        }
    }

    /// `forward` with burn ops: the reference of the fused op.
    pub fn forward_reference(&self, x_bsd: Tensor<3>) -> Tensor<3> {
        let rms_bs1 = (x_bsd.clone().powi_scalar(2).mean_dim(2) + self.eps).sqrt();
        x_bsd / rms_bs1 * self.gamma.val().unsqueeze::<3>()
    }
}

/// Rotary position tables, built on the host per forward (cheap next to the matmuls).
#[derive(Debug, Clone)]
struct Rope {
    theta: f64,
    head_dim: usize,
}

impl Rope {
    /// The rotation tables for the S tokens at global `positions`: [S, Dh/2] each.
    fn tables(&self, positions: &[usize]) -> cpu::rope::RopeTables {
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            for i in 0..half {
                let freq = self.theta.powf(-(2.0 * i as f64) / self.head_dim as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        cpu::rope::RopeTables { cos, sin }
    }
}

/// x: [B, H, S, Dh] -> rotated, pairing dimension i with i + Dh/2 (rotate-half form), with
/// burn ops: the rotation of the fused split's reference.
fn apply_rope(x_bhsd: Tensor<4>, tables: &cpu::rope::RopeTables) -> Tensor<4> {
    let [b, h, s, dh] = x_bhsd.dims();
    let half = dh / 2;
    let device = x_bhsd.device();
    let table = |v: &[f32]| {
        Tensor::<2>::from_data(TensorData::new(v.to_vec(), [s, half]), &device).unsqueeze::<4>()
    };
    let (cos, sin) = (table(&tables.cos), table(&tables.sin));
    let x1 = x_bhsd.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x_bhsd.slice([0..b, 0..h, 0..s, half..dh]);
    Tensor::cat(
        vec![
            x1.clone() * cos.clone() - x2.clone() * sin.clone(),
            x1 * sin + x2 * cos,
        ],
        3,
    )
}

/// x: [B, S, H·Dh] -> [B, H, S, Dh], rotated by `rope` when given: one fused op on the CPU
/// backend (`cpu::rope`), else a reshape, a transpose and the rotation in burn ops.
pub fn split_heads(
    x_bsd: Tensor<3>,
    heads: usize,
    rope: Option<&cpu::rope::RopeTables>,
) -> Tensor<4> {
    if let Some(y) = cpu::rope::split_heads(&x_bsd, heads, rope) {
        return y;
    }
    split_heads_reference(x_bsd, heads, rope)
}

/// `split_heads` with burn ops: the reference of the fused op.
pub fn split_heads_reference(
    x_bsd: Tensor<3>,
    heads: usize,
    rope: Option<&cpu::rope::RopeTables>,
) -> Tensor<4> {
    let [b, s, d] = x_bsd.dims();
    let x_bhsd = x_bsd.reshape([b, s, heads, d / heads]).swap_dims(1, 2);
    match rope {
        Some(tables) => apply_rope(x_bhsd, tables),
        None => x_bhsd,
    }
}

/// y: [B, H, S, Dh] -> [B, S, H·Dh]: one fused op on the CPU backend (`cpu::rope`).
pub fn merge_heads(y_bhsd: Tensor<4>) -> Tensor<3> {
    if let Some(x) = cpu::rope::merge_heads(&y_bhsd) {
        return x;
    }
    let [b, h, s, dh] = y_bhsd.dims();
    y_bhsd.swap_dims(1, 2).reshape([b, s, h * dh])
}

#[derive(Module, Debug)]
pub struct Attention {
    /// [D, H·Dh]
    pub wq: Param<Tensor<2>>,
    /// [D, KV·Dh] each
    pub wk: Param<Tensor<2>>,
    pub wv: Param<Tensor<2>>,
    /// [H·Dh, D]
    pub wo: Param<Tensor<2>>,
    /// [H·Dh], [KV·Dh], [KV·Dh]: present with `attention.bias: qkv | all`.
    pub bq: Option<Param<Tensor<1>>>,
    pub bk: Option<Param<Tensor<1>>>,
    pub bv: Option<Param<Tensor<1>>>,
    /// [D]: present with `attention.bias: all`.
    pub bo: Option<Param<Tensor<1>>>,
    /// Per-head RMSNorms of q and k over Dh, before RoPE (`attention.qk_norm`).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    #[module(skip)]
    n_heads: usize,
    #[module(skip)]
    kv_heads: usize,
    #[module(skip)]
    rope: Rope,
}

impl Attention {
    fn new(cfg: &ModelConfig, init: &mut Initializer) -> Self {
        let d = cfg.d_model;
        let (h, kv, dh) = (cfg.n_heads, cfg.kv_heads(), cfg.head_dim());
        let out_std = init.std / (2.0 * cfg.n_layers as f64).sqrt();
        // Drawn in this order whatever the options, so the default model's weights do not
        // change; biases start at zero and the q/k norms at one (no draws).
        let (wq, wk, wv) = (
            init.normal([d, h * dh]),
            init.normal([d, kv * dh]),
            init.normal([d, kv * dh]),
        );
        let wo = init.normal_with_std([h * dh, d], out_std);
        let zeros = |n: usize| Param::from_tensor(Tensor::zeros([n], &wq.val().device()));
        let (qkv_bias, out_bias) = match cfg.attention.bias {
            AttentionBias::None => (false, false),
            AttentionBias::Qkv => (true, false),
            AttentionBias::All => (true, true),
        };
        let qk_norm = cfg.attention.qk_norm;
        Self {
            bq: qkv_bias.then(|| zeros(h * dh)),
            bk: qkv_bias.then(|| zeros(kv * dh)),
            bv: qkv_bias.then(|| zeros(kv * dh)),
            bo: out_bias.then(|| zeros(d)),
            q_norm: qk_norm.then(|| RmsNorm::new(dh, cfg.norm_eps, init)),
            k_norm: qk_norm.then(|| RmsNorm::new(dh, cfg.norm_eps, init)),
            wq,
            wk,
            wv,
            wo,
            n_heads: h,
            kv_heads: kv,
            rope: Rope {
                theta: cfg.rope_theta,
                head_dim: dh,
            },
        }
    }

    /// q [B, H, S, Dh], k and v [B, KV, S, Dh] of x [B, S, D], q and k normed (when
    /// `qk_norm`) and rotated to `positions`.
    fn qkv(&self, x_bsd: Tensor<3>, positions: &[usize]) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let tables = self.rope.tables(positions);
        let projected = |w: &Param<Tensor<2>>, b: &Option<Param<Tensor<1>>>| {
            let y_bso = project(x_bsd.clone(), w.val());
            match b {
                Some(b) => y_bso + b.val().unsqueeze::<3>(),
                None => y_bso,
            }
        };
        let rotated = |y_bso: Tensor<3>, heads: usize, norm: &Option<RmsNorm>| match norm {
            // Qwen3: normalise each head, then rotate (burn ops; the fused split rotates
            // before any norm could run).
            Some(norm) => {
                let y_bhsd = split_heads(y_bso, heads, None);
                let [b, h, s, dh] = y_bhsd.dims();
                let normed = norm.forward(y_bhsd.reshape([b * h, s, dh]));
                apply_rope(normed.reshape([b, h, s, dh]), &tables)
            }
            None => split_heads(y_bso, heads, Some(&tables)),
        };
        let q_bhsd = rotated(projected(&self.wq, &self.bq), self.n_heads, &self.q_norm);
        let k_bksd = rotated(projected(&self.wk, &self.bk), self.kv_heads, &self.k_norm);
        let v_bksd = split_heads(projected(&self.wv, &self.bv), self.kv_heads, None);
        (q_bhsd, k_bksd, v_bksd)
    }

    /// [B, H·Dh] heads merged -> [B, S, D] through the output projection.
    fn output(&self, out_bhsd: Tensor<4>) -> Tensor<3> {
        let y_bsd = project(merge_heads(out_bhsd), self.wo.val());
        match &self.bo {
            Some(b) => y_bsd + b.val().unsqueeze::<3>(),
            None => y_bsd,
        }
    }

    /// Grouped-query attention: each of the KV heads serves H / KV consecutive query heads
    /// (query head i reads key/value head i / (H / KV), as `transformers`' `repeat_kv`).
    /// [B, KV, S, Dh] -> [B, H, S, Dh].
    fn repeat_kv(&self, x_bksd: Tensor<4>) -> Tensor<4> {
        let group = self.n_heads / self.kv_heads;
        if group == 1 {
            return x_bksd;
        }
        let [b, kv, s, dh] = x_bksd.dims();
        x_bksd
            .unsqueeze_dim::<5>(2)
            .expand([b, kv, group, s, dh])
            .reshape([b, kv * group, s, dh])
    }

    /// x: [B, S, D] -> [B, S, D], causal. `positions`: global position of each of the S
    /// tokens (RoPE); `attention` attends over the (possibly sharded) sequence.
    pub fn forward(
        &self,
        x_bsd: Tensor<3>,
        positions: &[usize],
        attention: &dyn AttentionImpl,
    ) -> Tensor<3> {
        let (q_bhsd, k_bksd, v_bksd) = self.qkv(x_bsd, positions);
        let out_bhsd = attention.attend(q_bhsd, self.repeat_kv(k_bksd), self.repeat_kv(v_bksd));
        self.output(out_bhsd)
    }
}

impl Attention {
    /// The T new tokens at positions `P..P + T` (P: what `cache` already holds): q, k, v of
    /// the new tokens, k and v appended to `cache` ([B, KV, P + T, Dh] afterwards), causal
    /// attention over everything so far. x: [B, T, D] -> [B, T, D].
    fn forward_cached(&self, x_btd: Tensor<3>, offset: usize, cache: &mut LayerCache) -> Tensor<3> {
        let [_, t, _] = x_btd.dims();
        let positions: Vec<usize> = (offset..offset + t).collect();
        let (q_bhtd, k_new, v_new) = self.qkv(x_btd, &positions);
        let (k_bkpd, v_bkpd) = match cache.take() {
            Some((k, v)) => (
                Tensor::cat(vec![k, k_new], 2),
                Tensor::cat(vec![v, v_new], 2),
            ),
            None => (k_new, v_new),
        };
        *cache = Some((k_bkpd.clone(), v_bkpd.clone()));
        let out_bhtd = cached_causal_attention(
            q_bhtd,
            self.repeat_kv(k_bkpd),
            self.repeat_kv(v_bkpd),
            offset,
        );
        self.output(out_bhtd)
    }
}

/// One layer's cached keys (after RoPE) and values: [B, KV, P, Dh] each.
type LayerCache = Option<(Tensor<4>, Tensor<4>)>;

/// The keys and values of every token seen so far, per layer: incremental decoding feeds
/// only the new tokens through [`Transformer::forward_cached`].
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    /// Positions held (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// x: [B, S, D] times w: [D, O] -> [B, S, O], as one 2-D product over the B*S rows.
fn project(x_bsd: Tensor<3>, w_do: Tensor<2>) -> Tensor<3> {
    let [b, s, d] = x_bsd.dims();
    let [_, o] = w_do.dims();
    cpu::linear::linear(x_bsd.reshape([b * s, d]), w_do).reshape([b, s, o])
}

#[derive(Module, Debug)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub ffn_norm: RmsNorm,
    /// Exactly one of `dense` and `moe` is present.
    pub dense: Option<SwiGlu>,
    pub moe: Option<MoeLayer>,
}

#[derive(Module, Debug)]
pub struct Transformer {
    /// [V, D]
    pub embed: Param<Tensor<2>>,
    pub layers: Vec<Block>,
    pub final_norm: RmsNorm,
    /// [D, V]; absent when tied to `embed`.
    pub lm_head: Option<Param<Tensor<2>>>,
    /// RMoE: the GRU cell shared by every MoE layer's router.
    pub router_gru: Option<Gru>,
    /// How attention covers the sequence (dense here; swapped by context parallelism).
    #[module(skip)]
    attention: Arc<dyn AttentionImpl>,
    /// The dtype of the GEMMs of a forward pass (f32 master weights either way).
    #[module(skip)]
    precision: Precision,
    /// What the backward recomputes (`train.activation_checkpointing`).
    #[module(skip)]
    recompute: ActivationCheckpointing,
}

/// Output of a forward pass.
pub struct ModelOutput {
    /// [B, S, V]
    pub logits: Tensor<3>,
    /// Sum over MoE layers of the load-balancing losses, before the coefficient: [1].
    pub load_balance: Tensor<1>,
    /// Sum over MoE layers of the router z-losses, before the coefficient: [1].
    pub z_loss: Tensor<1>,
    /// One entry per MoE layer, in layer order, with its layer index.
    pub moe_stats: Vec<(usize, MoeStats)>,
}

impl Transformer {
    /// Builds the model with weights drawn deterministically from `seed`.
    pub fn new(cfg: &ModelConfig, seed: u64, device: &burn::tensor::Device) -> Self {
        let mut init = Initializer::new(seed, cfg.init_std, device);
        let embed = init.normal([cfg.vocab_size, cfg.d_model]);
        let out_std = cfg.init_std / (2.0 * cfg.n_layers as f64).sqrt();
        let layers = (0..cfg.n_layers)
            .map(|layer| {
                let attn_norm = RmsNorm::new(cfg.d_model, cfg.norm_eps, &mut init);
                let attn = Attention::new(cfg, &mut init);
                let ffn_norm = RmsNorm::new(cfg.d_model, cfg.norm_eps, &mut init);
                let (dense, moe) = if cfg.is_moe_layer(layer) {
                    (None, Some(MoeLayer::new(cfg.d_model, &cfg.moe, &mut init)))
                } else {
                    (Some(SwiGlu::new(cfg.d_model, cfg.ffn_dim, &mut init)), None)
                };
                Block {
                    attn_norm,
                    attn,
                    ffn_norm,
                    dense,
                    moe,
                }
            })
            .collect();
        let final_norm = RmsNorm::new(cfg.d_model, cfg.norm_eps, &mut init);
        let lm_head = (!cfg.tie_embeddings)
            .then(|| init.normal_with_std([cfg.d_model, cfg.vocab_size], out_std));
        let router_gru = match cfg.moe.router {
            RouterConfig::Recurrent { state_dim, .. } => Some(Gru::new(state_dim, &mut init)),
            _ => None,
        };
        Self {
            embed,
            layers,
            final_norm,
            lm_head,
            router_gru,
            attention: Arc::new(DenseAttention),
            precision: Precision::Fp32,
            recompute: ActivationCheckpointing::None,
        }
    }

    /// Sets the compute precision of the forward pass (`crate::precision`).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets what the backward recomputes instead of keeping (`crate::recompute`).
    pub fn with_recompute(mut self, recompute: ActivationCheckpointing) -> Self {
        self.recompute = recompute;
        self
    }

    /// Swap the attention implementation (how `parallelize` applies context parallelism).
    pub fn with_attention(mut self, attention: Arc<dyn AttentionImpl>) -> Self {
        self.attention = attention;
        self
    }

    /// The auxiliary-loss-free bias of every MoE layer that has one: (layer index, one
    /// bias per FFN expert).
    pub fn router_biases(&self) -> Vec<(usize, Vec<f32>)> {
        self.moe_layers()
            .filter_map(|(l, moe)| Some((l, moe.router.bias()?.to_vec())))
            .collect()
    }

    /// Replaces the bias of the router of layer `layer` (a restored checkpoint). Errors
    /// name what does not match the model.
    pub fn set_router_bias(&mut self, layer: usize, bias: Vec<f32>) -> Result<(), String> {
        let moe = self
            .layers
            .get_mut(layer)
            .and_then(|block| block.moe.as_mut())
            .ok_or_else(|| format!("layer {layer} has no MoE block"))?;
        let Some(old) = moe.router.bias() else {
            return Err(format!(
                "layer {layer}'s router has no bias (model.moe.bias_balance is not set)"
            ));
        };
        if old.len() != bias.len() {
            return Err(format!(
                "layer {layer}: {} biases for {} experts",
                bias.len(),
                old.len()
            ));
        }
        moe.router.set_bias(bias);
        Ok(())
    }

    /// One auxiliary-loss-free update of every MoE layer's bias from the step's global
    /// assignments per slot (`counts`: layer index -> counts, as in `MoeStats::slot_counts`).
    pub fn update_router_biases(&mut self, counts: &[(usize, Vec<f64>)], gamma: f64) {
        for (layer, slot_counts) in counts {
            if let Some(moe) = self.layers.get_mut(*layer).and_then(|b| b.moe.as_mut()) {
                let experts = moe.experts.len();
                moe.router.update_bias(&slot_counts[..experts], gamma);
            }
        }
    }

    /// Installs, per MoE layer, the step's global assignments per slot for
    /// `balance_loss: global_batch` (`None` removes them).
    pub fn set_step_counts(&mut self, counts: Option<&[(usize, Vec<f64>)]>) {
        for (l, block) in self.layers.iter_mut().enumerate() {
            if let Some(moe) = &mut block.moe {
                let mine = counts.and_then(|c| c.iter().find(|(layer, _)| *layer == l));
                moe.set_step_counts(mine.map(|(_, c)| c.clone()));
            }
        }
    }

    fn moe_layers(&self) -> impl Iterator<Item = (usize, &MoeLayer)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(l, block)| Some((l, block.moe.as_ref()?)))
    }

    /// tokens: [B, S] -> logits [B, S, V] and the auxiliary losses.
    pub fn forward(&self, tokens_bs: Tensor<2, Int>) -> ModelOutput {
        self.forward_impl(tokens_bs, false)
    }

    /// Same as `forward` with every MoE layer computed by its dense per-expert oracle.
    pub fn forward_reference(&self, tokens_bs: Tensor<2, Int>) -> ModelOutput {
        self.forward_impl(tokens_bs, true)
    }

    fn forward_impl(&self, tokens_bs: Tensor<2, Int>, reference: bool) -> ModelOutput {
        precision::scoped(self.precision, || {
            self.forward_at_precision(tokens_bs, reference)
        })
    }

    fn forward_at_precision(&self, tokens_bs: Tensor<2, Int>, reference: bool) -> ModelOutput {
        let [b, s] = tokens_bs.dims();
        let embed_vd = self.embed.val();
        let [_, d] = embed_vd.dims();
        let device = embed_vd.device();
        let mut x_bsd = embed_vd
            .clone()
            .select(0, tokens_bs.reshape([b * s]))
            .reshape([b, s, d]);
        let mut load_balance = Tensor::<1>::zeros([1], &device);
        let mut z_loss = Tensor::<1>::zeros([1], &device);
        let mut moe_stats = Vec::new();
        // Router state from one MoE layer to the next (gating residuals, RMoE's GRU state).
        let mut carry = RouterCarry::default();
        let positions = self.attention.positions(s);
        for (index, block) in self.layers.iter().enumerate() {
            // Every block is one node of the autodiff graph with a graph of its own, kept
            // (no recomputation, `selective`) or rebuilt in the backward (`full`): the same
            // graphs either way, so the same bits (`crate::recompute`).
            let keep = match self.recompute {
                ActivationCheckpointing::Full => Keep::Inputs,
                ActivationCheckpointing::None | ActivationCheckpointing::Selective => {
                    Keep::Activations
                }
            };
            let moe_out;
            (x_bsd, moe_out) =
                self.block_node(block, x_bsd, &mut carry, &positions, reference, keep);
            if let Some((lb, z, stats)) = moe_out {
                load_balance = load_balance + lb;
                z_loss = z_loss + z;
                moe_stats.push((index, stats));
            }
        }
        let h_bsd = self.final_norm.forward(x_bsd);
        let head_dv = match &self.lm_head {
            Some(head) => head.val(),
            None => embed_vd.transpose(),
        };
        let logits = project(h_bsd, head_dv);
        ModelOutput {
            logits,
            load_balance,
            z_loss,
            moe_stats,
        }
    }
}

/// A MoE layer's contribution: its load-balancing and z-loss terms [1] and statistics.
type MoeTerms = Option<(Tensor<1>, Tensor<1>, MoeStats)>;

/// How one block runs: everything its forward needs besides its weights.
struct BlockPieces<'a> {
    positions: &'a [usize],
    attention: Arc<dyn AttentionImpl>,
    precision: Precision,
    reference: bool,
    /// `selective` recomputation: the attention sub-block is one recomputed node.
    recompute_attention: bool,
}

/// The attention sub-block as a module of its own (what `selective` recomputes).
#[derive(Module, Debug)]
struct AttentionSubBlock {
    norm: RmsNorm,
    attn: Attention,
}

/// A whole block with the router GRU it shares with the other layers (what `full`
/// recomputes).
#[derive(Module, Debug)]
struct BlockUnit {
    block: Block,
    gru: Option<Gru>,
}

impl BlockPieces<'_> {
    /// x [B, S, D] -> the block's output [B, S, D] and its MoE terms; `carry` is updated.
    fn block(
        &self,
        block: &Block,
        gru: Option<&Gru>,
        x_bsd: Tensor<3>,
        carry: &mut RouterCarry,
    ) -> (Tensor<3>, MoeTerms) {
        let attn_bsd = profile::time(Part::AttentionBlock, || {
            let x_bsd = profile::region_start(x_bsd.clone(), Part::AttentionBlock);
            let out_bsd = if self.recompute_attention {
                self.attention_recomputed(block, x_bsd)
            } else {
                block.attn.forward(
                    block.attn_norm.forward(x_bsd),
                    self.positions,
                    self.attention.as_ref(),
                )
            };
            profile::region_end(out_bsd, Part::AttentionBlock)
        });
        let x_bsd = x_bsd + attn_bsd;
        let h_bsd = block.ffn_norm.forward(x_bsd.clone());
        let (ffn_bsd, terms) = match (&block.dense, &block.moe) {
            (Some(dense), None) => {
                let [b, s, d] = h_bsd.dims();
                let y = dense.forward(h_bsd.reshape([b * s, d])).reshape([b, s, d]);
                (y, None)
            }
            (None, Some(moe)) => {
                let out = if self.reference {
                    moe.forward_reference(h_bsd, carry, gru)
                } else {
                    moe.forward(h_bsd, carry, gru)
                };
                (out.y, Some((out.load_balance, out.z_loss, out.stats)))
            }
            _ => unreachable!("a block has exactly one feed-forward"),
        };
        (x_bsd + ffn_bsd, terms)
    }

    /// The attention sub-block as one recomputed node: keeps x [B, S, D] only.
    fn attention_recomputed(&self, block: &Block, x_bsd: Tensor<3>) -> Tensor<3> {
        let dims = x_bsd.dims();
        let values = dims.iter().product::<usize>();
        let positions = self.positions.to_vec();
        let attention = self.attention.clone();
        let precision = self.precision;
        let unit = AttentionSubBlock {
            norm: block.attn_norm.clone(),
            attn: block.attn.clone(),
        };
        let piece = Arc::new(move |unit: &AttentionSubBlock, inputs: Vec<Tensor<1>>| {
            precision::scoped(precision, || {
                let x_bsd = inputs[0].clone().reshape(dims);
                let y = unit
                    .attn
                    .forward(unit.norm.forward(x_bsd), &positions, attention.as_ref());
                (vec![y.reshape([values])], ())
            })
        });
        let (mut out, ()) =
            recompute::piece_node(&unit, vec![x_bsd.reshape([values])], piece, Keep::Inputs);
        out.remove(0).reshape(dims)
    }
}

impl Transformer {
    /// One block as a node ([`recompute::piece_node`]) whose inputs are x [B, S, D] and
    /// the router state it receives ([T, N] gating logits, [T, P] GRU state) and whose
    /// outputs are the block's output, its MoE terms and the new router state; `keep`: its
    /// graph kept from the forward, or only its inputs (`full` recomputation).
    fn block_node(
        &self,
        block: &Block,
        x_bsd: Tensor<3>,
        carry: &mut RouterCarry,
        positions: &[usize],
        reference: bool,
        keep: Keep,
    ) -> (Tensor<3>, MoeTerms) {
        let dims = x_bsd.dims();
        let tokens = dims[0] * dims[1];
        let values = tokens * dims[2];
        let is_moe = block.moe.is_some();
        // Only a MoE block reads or writes the router state.
        let carried_in = if is_moe {
            [carry.prev_logits.clone(), carry.state.clone()]
        } else {
            [None, None]
        };
        let present = carried_in.each_ref().map(Option::is_some);
        let widths = carried_in
            .each_ref()
            .map(|t| t.as_ref().map_or(0, |t| t.dims()[1]));
        let mut inputs = vec![x_bsd.reshape([values])];
        inputs.extend(carried_in.into_iter().flatten().map(|t| {
            let n = t.dims().iter().product::<usize>();
            t.reshape([n])
        }));
        let unit = BlockUnit {
            block: block.clone(),
            gru: self.router_gru.clone().filter(|_| is_moe),
        };
        let positions = positions.to_vec();
        let attention = self.attention.clone();
        let precision = self.precision;
        let recompute_attention = self.recompute == ActivationCheckpointing::Selective;
        let piece = Arc::new(move |unit: &BlockUnit, inputs: Vec<Tensor<1>>| {
            let mut inputs = inputs.into_iter();
            let x_bsd = inputs.next().expect("the block input").reshape(dims);
            let mut take = |present: bool, width: usize| {
                present.then(|| {
                    inputs
                        .next()
                        .expect("a carried state")
                        .reshape([tokens, width])
                })
            };
            let mut carry = RouterCarry {
                prev_logits: take(present[0], widths[0]),
                state: take(present[1], widths[1]),
            };
            let pieces = BlockPieces {
                positions: &positions,
                attention: attention.clone(),
                precision,
                reference,
                recompute_attention,
            };
            precision::scoped(precision, || {
                let (y, terms) = pieces.block(&unit.block, unit.gru.as_ref(), x_bsd, &mut carry);
                let mut out = vec![y.reshape([values])];
                let stats = terms.map(|(lb, z, stats)| {
                    out.extend([lb, z]);
                    stats
                });
                let passed = [&carry.prev_logits, &carry.state].map(Option::is_some);
                for t in [carry.prev_logits, carry.state].into_iter().flatten() {
                    let [t_len, w] = t.dims();
                    out.push(t.reshape([t_len * w]));
                }
                (out, (stats, passed))
            })
        });
        let (outputs, (stats, passed)) = recompute::piece_node(&unit, inputs, piece, keep);
        let mut outputs = outputs.into_iter();
        let y = outputs.next().expect("the block output").reshape(dims);
        let terms = stats.map(|stats| {
            let lb = outputs.next().expect("the load-balancing term");
            let z = outputs.next().expect("the z-loss term");
            (lb, z, stats)
        });
        if is_moe {
            // The router state the MoE layer passes on: gating logits (MoE++), then the GRU
            // state (RMoE), in that order, each [T, width].
            let mut next = |present: bool| {
                present.then(|| {
                    let t = outputs.next().expect("a carried state");
                    let n = t.dims()[0];
                    t.reshape([tokens, n / tokens])
                })
            };
            carry.prev_logits = next(passed[0]);
            carry.state = next(passed[1]);
        }
        (y, terms)
    }
}

impl Transformer {
    /// Incremental decoding: the logits [B, T, V] of T new tokens [B, T] that follow the
    /// `cache.len()` tokens already in `cache`, which then holds them too. Every MoE layer
    /// routes the new tokens as `forward` does (the router state of MoE++ and recurrent
    /// routers travels across the layers of each token, as in `forward`); attention is
    /// dense over the cached positions (`cached_causal_attention`), whatever attention
    /// the model was parallelised with. A fresh cache fed the whole sequence gives
    /// `forward`'s logits.
    pub fn forward_cached(&self, tokens_bt: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        precision::scoped(self.precision, || {
            let [b, t] = tokens_bt.dims();
            let embed_vd = self.embed.val();
            let [_, d] = embed_vd.dims();
            let mut x_btd = embed_vd
                .clone()
                .select(0, tokens_bt.reshape([b * t]))
                .reshape([b, t, d]);
            cache.layers.resize(self.layers.len(), None);
            let offset = cache.len;
            let mut carry = RouterCarry::default();
            let gru = self.router_gru.as_ref();
            for (block, layer_cache) in self.layers.iter().zip(&mut cache.layers) {
                let attn_btd = block.attn.forward_cached(
                    block.attn_norm.forward(x_btd.clone()),
                    offset,
                    layer_cache,
                );
                x_btd = x_btd + attn_btd;
                let h_btd = block.ffn_norm.forward(x_btd.clone());
                let ffn_btd = match (&block.dense, &block.moe) {
                    (Some(dense), None) => {
                        dense.forward(h_btd.reshape([b * t, d])).reshape([b, t, d])
                    }
                    (None, Some(moe)) => moe.forward(h_btd, &mut carry, gru).y,
                    _ => unreachable!("a block has exactly one feed-forward"),
                };
                x_btd = x_btd + ffn_btd;
            }
            cache.len += t;
            let h_btd = self.final_norm.forward(x_btd);
            let head_dv = match &self.lm_head {
                Some(head) => head.val(),
                None => embed_vd.transpose(),
            };
            project(h_btd, head_dv)
        })
    }
}

impl ModelOutput {
    /// The auxiliary loss added to the cross-entropy at optimizer step `step`.
    pub fn aux_loss(&self, cfg: &ModelConfig, step: u64) -> Tensor<1> {
        self.load_balance.clone() * cfg.moe.load_balance_coef_at(step) as f32
            + self.z_loss.clone() * cfg.moe.z_loss_coef as f32
    }

    /// The z-loss term of [`aux_loss`](Self::aux_loss) (coefficient included), as a number:
    /// for the metrics, which show it apart from the balance loss.
    pub fn z_loss_term(&self, cfg: &ModelConfig) -> f64 {
        let z = self.z_loss.clone().inner().into_scalar::<f32>();
        f64::from(z) * cfg.moe.z_loss_coef
    }
}

/// Mean next-token cross-entropy in nats. logits: [B, S, V], targets: [B, S] -> [1].
pub fn cross_entropy(logits_bsv: Tensor<3>, targets_bs: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, v] = logits_bsv.dims();
    let logits_nv = logits_bsv.clone().reshape([b * s, v]);
    if let Some(loss) = cpu::loss::cross_entropy(&logits_nv, &targets_bs.clone().reshape([b * s])) {
        return loss;
    }
    cross_entropy_reference(logits_bsv, targets_bs)
}

/// `cross_entropy` with burn ops: the reference of the fused op.
pub fn cross_entropy_reference(logits_bsv: Tensor<3>, targets_bs: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, v] = logits_bsv.dims();
    let logp_nv = log_softmax(logits_bsv.reshape([b * s, v]), 1);
    let picked_n1 = logp_nv.gather(1, targets_bs.reshape([b * s, 1]));
    picked_n1.mean().neg()
}

/// Matmul FLOPs of one forward pass per token, counting `top_k` FFN experts per token (exact
/// for vanilla dropless routing; an upper bound with null / zero-computation experts or
/// capacity dropping). Callers count backward as twice the forward.
pub fn forward_flops_per_token(cfg: &ModelConfig, seq_len: usize) -> f64 {
    let (d, v) = (cfg.d_model as f64, cfg.vocab_size as f64);
    let q_width = (cfg.n_heads * cfg.head_dim()) as f64;
    let kv_width = (cfg.kv_heads() * cfg.head_dim()) as f64;
    let attn_proj = 2.0 * d * (2.0 * q_width + 2.0 * kv_width);
    // q k^T and (softmax) v over the full sequence; a causal kernel could skip half.
    let attn_scores = 2.0 * 2.0 * seq_len as f64 * q_width;
    let mut total = 2.0 * d * v; // LM head
    for layer in 0..cfg.n_layers {
        total += attn_proj + attn_scores;
        if cfg.is_moe_layer(layer) {
            let e = cfg.moe.num_experts as f64;
            total += 2.0 * d * e; // router
            total += cfg.moe.top_k as f64 * 3.0 * 2.0 * d * cfg.moe.expert_ffn_dim as f64;
            if let Some(shared) = &cfg.moe.shared_expert {
                total += shared.count as f64 * 3.0 * 2.0 * d * shared.ffn_dim as f64;
            }
        } else {
            total += 3.0 * 2.0 * d * cfg.ffn_dim as f64;
        }
    }
    total
}
