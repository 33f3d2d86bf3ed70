//! Hugging Face export: a checkpoint's weights (saved at any layout: experts are stored by
//! global id) as what `transformers.AutoModelForCausalLM.from_pretrained` loads —
//! `config.json`, sharded `model-0000N-of-0000M.safetensors` with their index, the
//! tokenizer files and `generation_config.json`, in f32 or bf16. Formats: Mixtral,
//! Qwen2-MoE, Qwen3-MoE; and the way back (`import_weights`), plus sparse upcycling of a
//! dense Llama (`upcycle_weights`).
//!
//! Switchyard stores projections as [in, out] (`x @ W`); Hugging Face's `nn.Linear`
//! weights are [out, in], so every projection is transposed on the way out. Both use
//! half-split rotary embeddings (`rotate_half`), so q and k need no permutation.
//!
//! The export streams: tensors are read from the checkpoint one at a time
//! ([`TensorSource`]; on disk: `checkpoint::TensorReader`), converted and appended to their
//! shard, whose header is written first; the directory appears complete or not at all
//! (written beside it, then renamed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use serde_json::json;
use switchyard_moe::config::{
    AttentionBias, CapacityConfig, ModelConfig, RouterConfig, ScoreFunction,
};

use crate::checkpoint::NamedTensor;
use crate::data::Tokenizer;

/// The target architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfFormat {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
}

impl HfFormat {
    /// The name on the command line and in `config.json`'s `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            HfFormat::Mixtral => "mixtral",
            HfFormat::Qwen2Moe => "qwen2_moe",
            HfFormat::Qwen3Moe => "qwen3_moe",
        }
    }

    fn architecture(self) -> &'static str {
        match self {
            HfFormat::Mixtral => "MixtralForCausalLM",
            HfFormat::Qwen2Moe => "Qwen2MoeForCausalLM",
            HfFormat::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// The format of a `config.json`'s `model_type`.
    pub fn of_model_type(model_type: &str) -> Option<Self> {
        [HfFormat::Mixtral, HfFormat::Qwen2Moe, HfFormat::Qwen3Moe]
            .into_iter()
            .find(|f| f.name() == model_type)
    }
}

/// The element type of the exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfDtype {
    F32,
    Bf16,
}

impl HfDtype {
    fn torch_name(self) -> &'static str {
        match self {
            HfDtype::F32 => "float32",
            HfDtype::Bf16 => "bfloat16",
        }
    }
    fn width(self) -> usize {
        match self {
            HfDtype::F32 => 4,
            HfDtype::Bf16 => 2,
        }
    }
}

/// Why an export cannot happen.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "the {format} format cannot hold this model: {}. Nothing was written",
        .problems.join("; ")
    )]
    Unsupported {
        format: &'static str,
        problems: Vec<String>,
    },
    #[error("{path} already exists and is not empty; choose a new --out directory")]
    OutExists { path: PathBuf },
    #[error("the checkpoint has no tensor `{name}` (or it is not f32 of shape {shape:?})")]
    MissingTensor { name: String, shape: Vec<usize> },
    #[error("writing {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// What the model has that `format` cannot express, named with the formats that could
/// hold it (empty: exportable).
pub fn unsupported(cfg: &ModelConfig, format: HfFormat) -> Vec<String> {
    use HfFormat::*;
    let moe = &cfg.moe;
    let mut out = Vec::new();
    match &moe.router {
        RouterConfig::TopKSoftmax {
            normalize_weights: true,
        } => {}
        RouterConfig::TopKSoftmax {
            normalize_weights: false,
        } => {
            if format == Mixtral {
                out.push(
                    "top-k weights without renormalisation (`normalize_weights: false`; \
                     Mixtral always renormalises; qwen2_moe and qwen3_moe hold it as \
                     `norm_topk_prob: false`)"
                        .into(),
                )
            }
        }
        RouterConfig::NullExperts { .. } => {
            out.push("null experts (AdaMoE); no Hugging Face format has them".into())
        }
        RouterConfig::MoePlusPlus { .. } => {
            out.push("MoE++ zero/copy/constant experts; no Hugging Face format has them".into())
        }
        RouterConfig::Recurrent { .. } => {
            out.push("a recurrent (GRU) router (RMoE); no Hugging Face format has one".into())
        }
    }
    if moe.every != 1 && format == Mixtral {
        out.push(format!(
            "dense layers between MoE layers (`model.moe.every: {}`; Mixtral has MoE in every \
             layer; qwen2_moe and qwen3_moe hold them as `mlp_only_layers`)",
            moe.every
        ));
    }
    if moe.shared_expert.is_some() && format != Qwen2Moe {
        out.push(format!(
            "shared experts ({} has none; qwen2_moe holds them as its gated shared expert)",
            format.name()
        ));
    }
    if moe.score == ScoreFunction::Sigmoid {
        out.push(
            "sigmoid router scores (`model.moe.score: sigmoid`); these formats use a softmax \
             (DeepSeek-V3's format, not exported here, has sigmoid scores)"
                .into(),
        );
    }
    if moe.scaling_factor != 1.0 {
        out.push(format!(
            "scaled routed weights (`model.moe.scaling_factor: {}`); these formats have no \
             routed scaling factor",
            moe.scaling_factor
        ));
    }
    if moe.group_limited.is_some() {
        out.push(
            "group-limited routing (`model.moe.group_limited`); these formats choose the \
             top-k over all experts"
                .into(),
        );
    }
    if moe.bias_balance.is_some() {
        out.push(
            "auxiliary-loss-free routing biases (`model.moe.bias_balance`); these formats \
             have no per-expert bias on the choice of experts"
                .into(),
        );
    }
    if let CapacityConfig::Drop { factor } = moe.capacity {
        out.push(format!(
            "capacity dropping (`capacity: {{type: drop, factor: {factor}}}`): Hugging Face \
             models route every token, so their logits would differ"
        ));
    }
    match (cfg.attention.bias, format) {
        (AttentionBias::None, _)
        | (AttentionBias::Qkv, Qwen2Moe)
        | (AttentionBias::All, Qwen3Moe) => {}
        (AttentionBias::Qkv, _) => out.push(format!(
            "q/k/v projection biases (`attention.bias: qkv`; {} has none; qwen2_moe has them)",
            format.name()
        )),
        (AttentionBias::All, _) => out.push(format!(
            "biases on every attention projection (`attention.bias: all`; {} cannot; \
             qwen3_moe has them as `attention_bias: true`)",
            format.name()
        )),
    }
    match (cfg.attention.qk_norm, format) {
        (true, Qwen3Moe) | (false, Mixtral | Qwen2Moe) => {}
        (true, _) => out.push(format!(
            "per-head q/k norms (`attention.qk_norm: true`; {} has none; qwen3_moe has them)",
            format.name()
        )),
        (false, _) => out.push(
            "attention without q/k norms (qwen3_moe always normalises q and k per head: set \
             `attention.qk_norm: true`, or export to mixtral or qwen2_moe)"
                .into(),
        ),
    }
    out
}

/// One tensor of the Hugging Face model: its name and shape, and how it is made from the
/// Switchyard tensors `parts` (none: zeros) — concatenated along `axis` (in Switchyard's
/// [in, out] orientation), transposed to [out, in] when `transpose`, times `scale`.
struct Mapped {
    name: String,
    shape: Vec<usize>,
    parts: Vec<String>,
    axis: usize,
    transpose: bool,
    scale: f32,
}

impl Mapped {
    fn one(name: String, shape: Vec<usize>, source: String, transpose: bool) -> Self {
        Mapped {
            name,
            shape,
            parts: vec![source],
            axis: 0,
            transpose,
            scale: 1.0,
        }
    }

    /// The shape of the concatenated source (before the transpose).
    fn source_shape(&self) -> Vec<usize> {
        if self.transpose {
            self.shape.iter().rev().copied().collect()
        } else {
            self.shape.clone()
        }
    }

    /// A plain renaming (possibly transposed): what an import can invert.
    fn invertible(&self) -> bool {
        self.parts.len() == 1 && self.scale == 1.0
    }
}

/// Every tensor of `format`'s model for `cfg`, in the order they are written.
fn hf_tensors(cfg: &ModelConfig, format: HfFormat) -> Vec<Mapped> {
    let (d, v, e) = (cfg.d_model, cfg.vocab_size, cfg.moe.num_experts);
    let (q_width, kv_width, dh) = (
        cfg.n_heads * cfg.head_dim(),
        cfg.kv_heads() * cfg.head_dim(),
        cfg.head_dim(),
    );
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, source: String, transpose: bool| {
        out.push(Mapped::one(name, shape, source, transpose))
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![v, d],
        "embed".into(),
        false,
    );
    let (qkv_bias, out_bias) = match cfg.attention.bias {
        AttentionBias::None => (false, false),
        AttentionBias::Qkv => (true, false),
        AttentionBias::All => (true, true),
    };
    let mut layers = Vec::new();
    for l in 0..cfg.n_layers {
        let hf = format!("model.layers.{l}");
        let sy = format!("layers.{l}");
        let mut add = |name: String, shape: Vec<usize>, source: String, transpose: bool| {
            layers.push(Mapped::one(name, shape, source, transpose))
        };
        add(
            format!("{hf}.input_layernorm.weight"),
            vec![d],
            format!("{sy}.attn_norm.gamma"),
            false,
        );
        for (h, s, width, bias) in [
            ("q_proj", "q", q_width, qkv_bias),
            ("k_proj", "k", kv_width, qkv_bias),
            ("v_proj", "v", kv_width, qkv_bias),
            ("o_proj", "o", d, out_bias),
        ] {
            let fan_in = if s == "o" { q_width } else { d };
            add(
                format!("{hf}.self_attn.{h}.weight"),
                vec![width, fan_in],
                format!("{sy}.attn.w{s}"),
                true,
            );
            if bias {
                add(
                    format!("{hf}.self_attn.{h}.bias"),
                    vec![width],
                    format!("{sy}.attn.b{s}"),
                    false,
                );
            }
        }
        if cfg.attention.qk_norm {
            for qk in ["q", "k"] {
                add(
                    format!("{hf}.self_attn.{qk}_norm.weight"),
                    vec![dh],
                    format!("{sy}.attn.{qk}_norm.gamma"),
                    false,
                );
            }
        }
        add(
            format!("{hf}.post_attention_layernorm.weight"),
            vec![d],
            format!("{sy}.ffn_norm.gamma"),
            false,
        );
        // SwiGLU projections: Switchyard's names, Hugging Face's for Llama-style MLPs.
        let swiglu = |f: usize| {
            [
                ("w_gate", "gate_proj", vec![f, d]),
                ("w_up", "up_proj", vec![f, d]),
                ("w_down", "down_proj", vec![d, f]),
            ]
        };
        if !cfg.is_moe_layer(l) {
            for (s, h, shape) in swiglu(cfg.ffn_dim) {
                add(
                    format!("{hf}.mlp.{h}.weight"),
                    shape,
                    format!("{sy}.dense.{s}"),
                    true,
                );
            }
            continue;
        }
        let moe_hf = match format {
            HfFormat::Mixtral => format!("{hf}.block_sparse_moe"),
            _ => format!("{hf}.mlp"),
        };
        add(
            format!("{moe_hf}.gate.weight"),
            vec![e, d],
            format!("{sy}.moe.router.w_gate"),
            true,
        );
        for x in 0..e {
            for (s, h, shape) in swiglu(cfg.moe.expert_ffn_dim) {
                let h = match (format, h) {
                    (HfFormat::Mixtral, "gate_proj") => "w1",
                    (HfFormat::Mixtral, "down_proj") => "w2",
                    (HfFormat::Mixtral, _) => "w3",
                    (_, h) => h,
                };
                add(
                    format!("{moe_hf}.experts.{x}.{h}.weight"),
                    shape,
                    format!("{sy}.moe.experts.{x}.{s}"),
                    true,
                );
            }
        }
        if format == HfFormat::Qwen2Moe {
            layers.extend(qwen2_shared_expert(cfg, &moe_hf, &sy));
        }
    }
    out.extend(layers);
    out.push(Mapped::one(
        "model.norm.weight".into(),
        vec![d],
        "final_norm.gamma".into(),
        false,
    ));
    if !cfg.tie_embeddings {
        out.push(Mapped::one(
            "lm_head.weight".into(),
            vec![v, d],
            "lm_head".into(),
            true,
        ));
    }
    out
}

/// Qwen2-MoE's one shared expert behind a sigmoid gate, from Switchyard's shared experts:
/// several become one of their summed width (their hidden units side by side); an ungated
/// one gets a zero gate (sigmoid 0.5) and a doubled down projection (exact: powers of two);
/// none becomes a zero expert of width 1 (it adds exactly 0).
fn qwen2_shared_expert(cfg: &ModelConfig, moe_hf: &str, sy: &str) -> Vec<Mapped> {
    let d = cfg.d_model;
    let shared = cfg.moe.shared_expert.as_ref();
    let (count, width, gated) =
        shared.map_or((0, 1, false), |s| (s.count, s.count * s.ffn_dim, s.gate));
    let parts = |w: &str| -> Vec<String> {
        (0..count)
            .map(|i| format!("{sy}.moe.shared.{i}.{w}"))
            .collect()
    };
    let scale = if shared.is_some() && !gated { 2.0 } else { 1.0 };
    let mut out: Vec<Mapped> = [
        ("gate_proj", "w_gate", vec![width, d], 1, 1.0),
        ("up_proj", "w_up", vec![width, d], 1, 1.0),
        ("down_proj", "w_down", vec![d, width], 0, scale),
    ]
    .into_iter()
    .map(|(h, s, shape, axis, scale)| Mapped {
        name: format!("{moe_hf}.shared_expert.{h}.weight"),
        shape,
        parts: parts(s),
        axis,
        transpose: true,
        scale,
    })
    .collect();
    out.push(Mapped {
        name: format!("{moe_hf}.shared_expert_gate.weight"),
        shape: vec![1, d],
        parts: if gated {
            vec![format!("{sy}.moe.shared_gate")]
        } else {
            Vec::new()
        },
        axis: 0,
        transpose: true,
        scale: 1.0,
    });
    out
}

/// Layers without an MoE block, as `mlp_only_layers`.
fn dense_layers(cfg: &ModelConfig) -> Vec<usize> {
    (0..cfg.n_layers)
        .filter(|&l| !cfg.is_moe_layer(l))
        .collect()
}

fn config_json(
    cfg: &ModelConfig,
    format: HfFormat,
    dtype: HfDtype,
    eod: Option<u32>,
) -> serde_json::Value {
    let normalize = matches!(
        cfg.moe.router,
        RouterConfig::TopKSoftmax {
            normalize_weights: true
        }
    );
    let mut c = json!({
        "architectures": [format.architecture()],
        "model_type": format.name(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads(),
        "head_dim": cfg.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_experts_per_tok": cfg.moe.top_k,
        "router_aux_loss_coef": cfg.moe.load_balance_coef,
        "output_router_logits": false,
        "sliding_window": null,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": true,
        "bos_token_id": null,
        "eos_token_id": eod,
        "torch_dtype": dtype.torch_name(),
    });
    let extra = match format {
        HfFormat::Mixtral => json!({
            "intermediate_size": cfg.moe.expert_ffn_dim,
            "num_local_experts": cfg.moe.num_experts,
            "router_jitter_noise": 0.0,
        }),
        HfFormat::Qwen2Moe | HfFormat::Qwen3Moe => {
            let mut q = json!({
                "intermediate_size": cfg.ffn_dim,
                "moe_intermediate_size": cfg.moe.expert_ffn_dim,
                "num_experts": cfg.moe.num_experts,
                "norm_topk_prob": normalize,
                "decoder_sparse_step": 1,
                "mlp_only_layers": dense_layers(cfg),
                "use_sliding_window": false,
            });
            if format == HfFormat::Qwen2Moe {
                let shared = cfg.moe.shared_expert.as_ref();
                q["shared_expert_intermediate_size"] =
                    json!(shared.map_or(1, |s| s.count * s.ffn_dim));
                q["qkv_bias"] = json!(cfg.attention.bias == AttentionBias::Qkv);
            } else {
                q["attention_bias"] = json!(cfg.attention.bias == AttentionBias::All);
            }
            q
        }
    };
    for (k, value) in extra.as_object().expect("an object") {
        c[k] = value.clone();
    }
    c
}

/// GPT-2's byte-to-character table: the byte-level BPE alphabet.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("a valid code point")
        })
        .collect()
}

/// A `tokenizer.json` that encodes text to its UTF-8 bytes as ids 0..=255, as Switchyard's
/// byte tokenizer does: byte-level BPE without merges.
pub fn byte_tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), json!(id)))
        .collect();
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
    });
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

/// Where an export reads the checkpoint's tensors (Switchyard names, f32), one at a time.
pub trait TensorSource {
    /// The shape of tensor `name`, if there is one.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Its values.
    fn read(&self, name: &str) -> Result<Vec<f32>, String>;
}

/// Tensors in memory (tests; a snapshot).
impl TensorSource for BTreeMap<String, NamedTensor> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name)
            .filter(|t| t.as_f32().is_some())
            .map(|t| t.shape.clone())
    }
    fn read(&self, name: &str) -> Result<Vec<f32>, String> {
        self.get(name)
            .and_then(|t| t.as_f32())
            .map(<[f32]>::to_vec)
            .ok_or_else(|| format!("no f32 tensor `{name}`"))
    }
}

/// A checkpoint on disk, read tensor by tensor: the export holds one tensor (and the
/// parts of a concatenated one) at a time.
impl TensorSource for crate::checkpoint::TensorReader {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        crate::checkpoint::TensorReader::shape(self, name).map(<[usize]>::to_vec)
    }
    fn read(&self, name: &str) -> Result<Vec<f32>, String> {
        self.read_f32(name).map_err(|e| e.to_string())
    }
}

/// What an export wrote.
#[derive(Debug)]
pub struct ExportReport {
    pub tensors: usize,
    pub shards: usize,
    pub bytes: u64,
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> ExportError {
    ExportError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes the export of `model` (the checkpoint's model tensors by Switchyard name) to
/// `out` (absent or empty). Refuses, before writing anything, what `format` cannot hold.
pub fn export(
    model: &dyn TensorSource,
    cfg: &ModelConfig,
    tokenizer: &Tokenizer,
    format: HfFormat,
    dtype: HfDtype,
    out: &Path,
    shard_bytes: usize,
) -> Result<ExportReport, ExportError> {
    let problems = unsupported(cfg, format);
    if !problems.is_empty() {
        return Err(ExportError::Unsupported {
            format: format.name(),
            problems,
        });
    }
    if out.exists() && std::fs::read_dir(out).map_or(true, |mut d| d.next().is_some()) {
        return Err(ExportError::OutExists {
            path: out.to_path_buf(),
        });
    }
    let mapped = hf_tensors(cfg, format);
    for m in &mapped {
        check_parts(model, m)?;
    }
    // Shards in tensor order, each at most `shard_bytes` (a larger tensor alone).
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut filled = usize::MAX;
    for (i, m) in mapped.iter().enumerate() {
        let bytes = m.shape.iter().product::<usize>() * dtype.width();
        if filled.saturating_add(bytes) > shard_bytes {
            shards.push(Vec::new());
            filled = 0;
        }
        shards.last_mut().expect("opened").push(i);
        filled += bytes;
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = parent.join(format!(
        ".{}.partial-{}",
        out.file_name()
            .map_or("export".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| write_err(&tmp, e))?;
    let result = write_all(model, cfg, tokenizer, format, dtype, &mapped, &shards, &tmp);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        return result;
    }
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| write_err(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| write_err(out, e))?;
    result
}

#[allow(clippy::too_many_arguments)]
fn write_all(
    model: &dyn TensorSource,
    cfg: &ModelConfig,
    tokenizer: &Tokenizer,
    format: HfFormat,
    dtype: HfDtype,
    mapped: &[Mapped],
    shards: &[Vec<usize>],
    dir: &Path,
) -> Result<ExportReport, ExportError> {
    let mut weight_map = serde_json::Map::new();
    let mut total: u64 = 0;
    let (st_dtype, width) = match dtype {
        HfDtype::F32 => ("F32", 4),
        HfDtype::Bf16 => ("BF16", 2),
    };
    for (s, members) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards.len());
        let path = dir.join(&file);
        // The header first (every shape is known), then each tensor as it is converted.
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0usize;
        for &i in members {
            let m = &mapped[i];
            let bytes = m.shape.iter().product::<usize>() * width;
            header.insert(
                m.name.clone(),
                json!({"dtype": st_dtype, "shape": m.shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
            weight_map.insert(m.name.clone(), json!(file));
        }
        let mut header = serde_json::to_string(&header).expect("json");
        // safetensors aligns the data to 8 bytes with spaces after the header.
        while !header.len().is_multiple_of(8) {
            header.push(' ');
        }
        let mut writer = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&path).map_err(|e| write_err(&path, e))?,
        );
        use std::io::Write;
        writer
            .write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| writer.write_all(header.as_bytes()))
            .map_err(|e| write_err(&path, e))?;
        for &i in members {
            let values = exported_values(model, &mapped[i]).map_err(|e| write_err(&path, e))?;
            let bytes: Vec<u8> = match dtype {
                HfDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                HfDtype::Bf16 => values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
            };
            writer.write_all(&bytes).map_err(|e| write_err(&path, e))?;
        }
        writer
            .into_inner()
            .map_err(|e| write_err(&path, e.error()))?
            .sync_all()
            .map_err(|e| write_err(&path, e))?;
        total += offset as u64;
    }
    let write_json = |name: &str, value: &serde_json::Value| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(value).expect("json") + "\n",
        )
        .map_err(|e| write_err(&path, e))
    };
    write_json(
        "model.safetensors.index.json",
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )?;
    let eod = tokenizer.eod_token();
    write_json("config.json", &config_json(cfg, format, dtype, eod))?;
    write_json(
        "generation_config.json",
        &json!({"bos_token_id": null, "eos_token_id": eod}),
    )?;
    let tokenizer_json = match tokenizer.path() {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| write_err(path, e))?;
            serde_json::from_str(&text).map_err(|e| write_err(path, e))?
        }
        None => byte_tokenizer_json(),
    };
    write_json("tokenizer.json", &tokenizer_json)?;
    let eos = eod.and_then(|id| tokenizer.decode(&[id]).ok());
    write_json(
        "tokenizer_config.json",
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_seq_len,
            "eos_token": eos,
            "clean_up_tokenization_spaces": false,
        }),
    )?;
    Ok(ExportReport {
        tensors: mapped.len(),
        shards: shards.len(),
        bytes: total,
    })
}

/// Checks that `m`'s Switchyard parts exist as f32 tensors that concatenate to its shape.
fn check_parts(model: &dyn TensorSource, m: &Mapped) -> Result<(), ExportError> {
    let want = m.source_shape();
    let mut along = 0;
    for part in &m.parts {
        let mut part_want = want.clone();
        let missing = |shape| ExportError::MissingTensor {
            name: part.clone(),
            shape,
        };
        let shape = model
            .shape(part)
            .filter(|s| s.len() == want.len())
            .ok_or_else(|| missing(want.clone()))?;
        part_want[m.axis] = shape[m.axis];
        along += shape[m.axis];
        if shape != part_want {
            return Err(missing(part_want));
        }
    }
    if !m.parts.is_empty() && along != want[m.axis] {
        return Err(ExportError::MissingTensor {
            name: m.parts.join(" + "),
            shape: want,
        });
    }
    Ok(())
}

/// The values of `m` (checked by `check_parts`), in Hugging Face's orientation.
fn exported_values(model: &dyn TensorSource, m: &Mapped) -> Result<Vec<f32>, String> {
    let want = m.source_shape();
    let mut values = match m.parts.as_slice() {
        [] => vec![0f32; want.iter().product()],
        [one] => model.read(one)?,
        parts => {
            let tensors = parts
                .iter()
                .map(|p| Ok((model.shape(p).unwrap_or_default(), model.read(p)?)))
                .collect::<Result<Vec<_>, String>>()?;
            let views: Vec<(&[usize], &[f32])> = tensors
                .iter()
                .map(|(s, v)| (s.as_slice(), v.as_slice()))
                .collect();
            concatenated(&views, m.axis)
        }
    };
    if m.transpose {
        // The source is the [in, out] transpose of the exported [out, in].
        values = transposed(&want, &values).1;
    }
    if m.scale != 1.0 {
        values.iter_mut().for_each(|v| *v *= m.scale);
    }
    Ok(values)
}

/// 2-D (or 1-D along axis 0) row-major tensors side by side along `axis`.
fn concatenated(tensors: &[(&[usize], &[f32])], axis: usize) -> Vec<f32> {
    if axis == 0 {
        return tensors
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .collect();
    }
    let rows = tensors[0].0[0];
    let mut out = Vec::with_capacity(tensors.iter().map(|(_, v)| v.len()).sum());
    for r in 0..rows {
        for (shape, values) in tensors {
            let cols = shape[1];
            out.extend_from_slice(&values[r * cols..(r + 1) * cols]);
        }
    }
    out
}

/// Every tensor of the Hugging Face model in `dir` (`model.safetensors`, or the shards its
/// index names; f32, bf16 or f16) as f32, by name.
/// A tensor read from a Hugging Face file: its shape and f32 values.
type HfTensor = (Vec<usize>, Vec<f32>);

fn read_hf_tensors(dir: &Path) -> Result<BTreeMap<String, HfTensor>, ImportError> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| read_err(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| read_err(&index, e))?;
        let mut names: Vec<String> = json["weight_map"]
            .as_object()
            .ok_or_else(|| read_err(&index, "no weight_map"))?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut out = BTreeMap::new();
    for file in &files {
        let bytes = std::fs::read(file).map_err(|e| read_err(file, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| read_err(file, format!("{e:?}")))?;
        for (name, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => {
                    return Err(read_err(
                        file,
                        format!("tensor `{name}` is {other:?}; f32, bf16 and f16 are imported"),
                    ));
                }
            };
            out.insert(name, (view.shape().to_vec(), values));
        }
    }
    Ok(out)
}

/// [rows, cols] row-major -> [cols, rows].
fn transposed(shape: &[usize], values: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let (rows, cols) = (shape[0], shape[1]);
    let mut t = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = values[r * cols + c];
        }
    }
    (vec![cols, rows], t)
}

/// The upcycled MoE's weights from the dense Llama model in `dir` (see [`Upcycle`]).
pub fn upcycle_weights(
    dir: &Path,
    cfg: &ModelConfig,
    upcycle: &Upcycle,
) -> Result<Vec<NamedTensor>, ImportError> {
    use rand::{Rng, SeedableRng};
    let mut hf = read_hf_tensors(dir)?;
    if cfg.tie_embeddings {
        hf.remove("lm_head.weight");
    }
    // Everything but the MoE blocks is named as in a Mixtral of the same shape.
    let mut out = Vec::new();
    for m in hf_tensors(cfg, HfFormat::Mixtral) {
        if !m.name.contains(".block_sparse_moe.") {
            out.push(take_mapped(&mut hf, dir, &m)?);
        }
    }
    let (d, f, e) = (cfg.d_model, cfg.ffn_dim, upcycle.num_experts);
    let expert_f = cfg.moe.expert_ffn_dim;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(upcycle.seed);
    // Box-Muller: a normal draw of standard deviation `std`.
    let normal = |rng: &mut rand_chacha::ChaCha8Rng, std: f64| -> f32 {
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
        (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    };
    for l in 0..cfg.n_layers {
        let hf_l = format!("model.layers.{l}.mlp");
        let sy = format!("layers.{l}.moe");
        let gate: Vec<f32> = match upcycle.split {
            UpcycleSplit::Copy => (0..d * e).map(|_| normal(&mut rng, cfg.init_std)).collect(),
            UpcycleSplit::Partition => vec![0.0; d * e],
        };
        out.push(NamedTensor::f32(
            format!("{sy}.router.w_gate"),
            vec![d, e],
            gate,
        ));
        for (h, w, shape) in [
            ("gate_proj", "w_gate", vec![f, d]),
            ("up_proj", "w_up", vec![f, d]),
            ("down_proj", "w_down", vec![d, f]),
        ] {
            let source = Mapped::one(format!("{hf_l}.{h}.weight"), shape, String::new(), true);
            // [D, F] (gate, up) or [F, D] (down), Switchyard's orientation.
            let (shape, values) = take_hf(&mut hf, dir, &source)?;
            for x in 0..e {
                let (expert_shape, mut expert) = match upcycle.split {
                    UpcycleSplit::Copy => (shape.clone(), values.clone()),
                    // Expert x keeps hidden units x·F/E..(x+1)·F/E; its down projection
                    // is scaled by E, so that E experts at equal weights 1/E sum to the
                    // dense MLP.
                    UpcycleSplit::Partition => {
                        let units = x * expert_f..(x + 1) * expert_f;
                        if w == "w_down" {
                            let rows = values[units.start * d..units.end * d]
                                .iter()
                                .map(|v| v * e as f32)
                                .collect();
                            (vec![expert_f, d], rows)
                        } else {
                            let cols = (0..d)
                                .flat_map(|r| {
                                    values[r * f + units.start..r * f + units.end].to_vec()
                                })
                                .collect();
                            (vec![d, expert_f], cols)
                        }
                    }
                };
                if upcycle.noise_std > 0.0 {
                    expert
                        .iter_mut()
                        .for_each(|c| *c += normal(&mut rng, upcycle.noise_std));
                }
                out.push(NamedTensor::f32(
                    format!("{sy}.experts.{x}.{w}"),
                    expert_shape,
                    expert,
                ));
            }
        }
    }
    if let Some(name) = hf.keys().find(|k| !k.ends_with("rotary_emb.inv_freq")) {
        return Err(read_err(
            dir,
            format!("tensor `{name}` is not part of a Llama model of this config"),
        ));
    }
    Ok(out)
}

/// Removes `m`'s Hugging Face tensor from `hf`, checks its shape and returns it in
/// Switchyard's orientation.
fn take_hf(
    hf: &mut BTreeMap<String, HfTensor>,
    dir: &Path,
    m: &Mapped,
) -> Result<HfTensor, ImportError> {
    let (shape, values) = hf
        .remove(&m.name)
        .ok_or_else(|| read_err(dir, format!("the model has no tensor `{}`", m.name)))?;
    if shape != m.shape {
        return Err(read_err(
            dir,
            format!(
                "tensor `{}` has shape {shape:?}; the config says {:?}",
                m.name, m.shape
            ),
        ));
    }
    Ok(if m.transpose {
        transposed(&shape, &values)
    } else {
        (shape, values)
    })
}

/// `take_hf` under the Switchyard name of a plain renaming.
fn take_mapped(
    hf: &mut BTreeMap<String, HfTensor>,
    dir: &Path,
    m: &Mapped,
) -> Result<NamedTensor, ImportError> {
    assert!(m.invertible(), "import maps renamings only: {}", m.name);
    let (shape, values) = take_hf(hf, dir, m)?;
    Ok(NamedTensor::f32(m.parts[0].clone(), shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn mixtral_json() -> serde_json::Value {
        json!({
            "model_type": "mixtral", "vocab_size": 256, "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 96, "num_local_experts": 4, "num_experts_per_tok": 2,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "sliding_window": null,
            "hidden_act": "silu", "tie_word_embeddings": false,
            "rope_parameters": {"rope_theta": 12345.0, "rope_type": "default"}
        })
    }

    #[test]
    fn a_mixtral_config_becomes_a_model_config_and_what_differs_is_named() {
        let path = Path::new("config.json");
        let cfg = model_config_of(&mixtral_json(), path).unwrap();
        assert_eq!((cfg.d_model, cfg.n_heads, cfg.n_layers), (64, 4, 2));
        assert_eq!(
            (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_ffn_dim),
            (4, 2, 96)
        );
        assert_eq!((cfg.rope_theta, cfg.norm_eps), (12345.0, 1e-6));
        // Files written before transformers 5 keep rope_theta at the top.
        let mut old = mixtral_json();
        old.as_object_mut().unwrap().remove("rope_parameters");
        old["rope_theta"] = json!(500.0);
        assert_eq!(model_config_of(&old, path).unwrap().rope_theta, 500.0);
        let mut gqa = mixtral_json();
        gqa["num_key_value_heads"] = json!(2);
        assert_eq!(model_config_of(&gqa, path).unwrap().kv_heads(), 2);
        for (key, value, needle) in [
            ("mlp_bias", json!(true), "mlp_bias"),
            ("sliding_window", json!(4096), "sliding-window"),
            (
                "rope_parameters",
                json!({"rope_theta": 1e4, "rope_type": "yarn"}),
                "RoPE scaling `yarn`",
            ),
            (
                "model_type",
                json!("deepseek_v3"),
                "model_type `deepseek_v3`",
            ),
        ] {
            let mut c = mixtral_json();
            c[key] = value;
            let err = model_config_of(&c, path).unwrap_err().to_string();
            assert!(err.contains(needle), "{key}: {err}");
        }
    }

    /// A one-layer dense Llama (d 16, intermediate 64, 4 heads of 2 kv) written as
    /// safetensors, its config, and its MLP weights by Hugging Face name.
    fn tiny_llama(dir: &Path) -> (serde_json::Value, BTreeMap<String, HfTensor>) {
        let config = json!({
            "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
            "intermediate_size": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "tie_word_embeddings": true, "rope_theta": 10000.0
        });
        let shapes: [(&str, Vec<usize>); 11] = [
            ("model.embed_tokens.weight", vec![32, 16]),
            ("model.layers.0.input_layernorm.weight", vec![16]),
            ("model.layers.0.self_attn.q_proj.weight", vec![16, 16]),
            ("model.layers.0.self_attn.k_proj.weight", vec![8, 16]),
            ("model.layers.0.self_attn.v_proj.weight", vec![8, 16]),
            ("model.layers.0.self_attn.o_proj.weight", vec![16, 16]),
            ("model.layers.0.post_attention_layernorm.weight", vec![16]),
            ("model.layers.0.mlp.gate_proj.weight", vec![64, 16]),
            ("model.layers.0.mlp.up_proj.weight", vec![64, 16]),
            ("model.layers.0.mlp.down_proj.weight", vec![16, 64]),
            ("model.norm.weight", vec![16]),
        ];
        let mut tensors = BTreeMap::new();
        let mut bytes = Vec::new();
        for (i, (name, shape)) in shapes.iter().enumerate() {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|j| ((i * 1000 + j) as f32 * 0.37).sin())
                .collect();
            bytes.push((name.to_string(), shape.clone(), values.clone()));
            tensors.insert(name.to_string(), (shape.clone(), values));
        }
        let raw: Vec<(String, Vec<usize>, Vec<u8>)> = bytes
            .into_iter()
            .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        let views: Vec<(String, TensorView)> = raw
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        (config, tensors)
    }

    fn by_name(tensors: &[NamedTensor]) -> BTreeMap<String, Vec<f32>> {
        tensors
            .iter()
            .map(|t| (t.name.clone(), t.as_f32().unwrap().to_vec()))
            .collect()
    }

    /// Noise: each expert is the dense MLP plus its own N(0, std) draw (mean ~0, std within
    /// 5% over 1024 x 4 values per matrix), the same at the same seed, another at another.
    /// Partition: expert x holds hidden units 16x..16x+16, its down projection times 4.
    #[test]
    fn upcycling_adds_noise_of_the_asked_std_and_partitions_the_hidden_units() {
        let dir = tempfile::tempdir().unwrap();
        let (config, hf) = tiny_llama(dir.path());
        let path = dir.path().join("config.json");
        let upcycle = |split, noise_std, seed| Upcycle {
            num_experts: 4,
            top_k: 2,
            noise_std,
            seed,
            split,
        };
        let weights = |u: &Upcycle| {
            let cfg = upcycled_config_of(&config, &path, u).unwrap();
            by_name(&upcycle_weights(dir.path(), &cfg, u).unwrap())
        };
        let noisy = weights(&upcycle(UpcycleSplit::Copy, 0.05, 3));
        let (_, dense_gate) = transposed(&[64, 16], &hf["model.layers.0.mlp.gate_proj.weight"].1);
        let deltas: Vec<Vec<f32>> = (0..4)
            .map(|x| {
                let expert = &noisy[&format!("layers.0.moe.experts.{x}.w_gate")];
                expert.iter().zip(&dense_gate).map(|(e, d)| e - d).collect()
            })
            .collect();
        let all: Vec<f64> = deltas.iter().flatten().map(|&v| v as f64).collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let std = (all.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / all.len() as f64).sqrt();
        assert!(
            mean.abs() < 4.0 * 0.05 / (all.len() as f64).sqrt(),
            "mean {mean}"
        );
        assert!((std / 0.05 - 1.0).abs() < 0.05, "std {std}");
        assert_ne!(deltas[0], deltas[1], "experts share one noise draw");
        assert_eq!(noisy, weights(&upcycle(UpcycleSplit::Copy, 0.05, 3)));
        assert_ne!(noisy, weights(&upcycle(UpcycleSplit::Copy, 0.05, 4)));
        // Without noise the copies are the dense MLP exactly.
        let copies = weights(&upcycle(UpcycleSplit::Copy, 0.0, 3));
        assert_eq!(copies["layers.0.moe.experts.2.w_gate"], dense_gate);

        let parts = weights(&upcycle(UpcycleSplit::Partition, 0.0, 3));
        let (_, dense_down) = transposed(&[16, 64], &hf["model.layers.0.mlp.down_proj.weight"].1);
        for x in 0..4 {
            let gate = &parts[&format!("layers.0.moe.experts.{x}.w_gate")];
            let want: Vec<f32> = (0..16)
                .flat_map(|r| dense_gate[r * 64 + 16 * x..r * 64 + 16 * (x + 1)].to_vec())
                .collect();
            assert_eq!(gate, &want, "expert {x} gate");
            let down = &parts[&format!("layers.0.moe.experts.{x}.w_down")];
            let want: Vec<f32> = dense_down[16 * x * 16..16 * (x + 1) * 16]
                .iter()
                .map(|v| v * 4.0)
                .collect();
            assert_eq!(down, &want, "expert {x} down");
        }
        assert!(
            parts["layers.0.moe.router.w_gate"]
                .iter()
                .all(|&w| w == 0.0)
        );
    }

    /// The exported byte tokenizer encodes text to its UTF-8 bytes, as Switchyard's does.
    #[test]
    fn the_byte_tokenizer_json_encodes_bytes() {
        let json = serde_json::to_string(&byte_tokenizer_json()).unwrap();
        let tok: tokenizers::Tokenizer = json.parse().unwrap();
        assert_eq!(tok.get_vocab_size(true), 256);
        for text in [
            "ROMEO:\nWhat light",
            "h\u{e9}llo \t\u{1f600} ~\u{0}\u{7f}",
            "  two  spaces",
        ] {
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
            assert_eq!(ids, bytes, "{text:?}");
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
    }
}

/// Why an import cannot happen.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error(
        "{path}: this {model_type} model cannot be a Switchyard model: {}",
        .problems.join("; ")
    )]
    Unsupported {
        path: PathBuf,
        model_type: String,
        problems: Vec<String>,
    },
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> ImportError {
    ImportError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The Switchyard model a Hugging Face `config.json` describes (Mixtral), or what in it
/// Switchyard cannot be.
pub fn model_config_of(
    config_json: &serde_json::Value,
    path: &Path,
) -> Result<ModelConfig, ImportError> {
    model_config_with(config_json, path, None)
}

/// Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts
/// from Dense Checkpoints"): every MLP of a dense model becomes `num_experts` experts, plus
/// optional Gaussian noise of std `noise_std` on their weights; see [`UpcycleSplit`] for
/// how the experts and the router start.
#[derive(Debug, Clone, PartialEq)]
pub struct Upcycle {
    pub num_experts: usize,
    pub top_k: usize,
    pub noise_std: f64,
    pub seed: u64,
    pub split: UpcycleSplit,
}

/// How a dense MLP becomes experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpcycleSplit {
    /// Every expert is a copy of the MLP (the paper's choice), behind a router drawn like
    /// any fresh router (normal, std `initializer_range`). With the top-k weights
    /// renormalised and no noise, the first forward is exactly the dense model's.
    Copy,
    /// Expert x keeps the x-th of `num_experts` equal slices of the MLP's hidden units
    /// (`expert_ffn_dim = intermediate_size / num_experts`, same compute per token at top-1
    /// as one copy at 1/E the width) with its down projection scaled by `num_experts`,
    /// behind a zero router: at top_k = num_experts the uniform weights 1/E sum the slices
    /// back to the dense MLP, so the first forward is the dense model's; the experts differ,
    /// so the router's gradient breaks the tie from the first step.
    Partition,
}

/// The MoE a dense Llama `config.json` upcycles to.
pub fn upcycled_config_of(
    config_json: &serde_json::Value,
    path: &Path,
    upcycle: &Upcycle,
) -> Result<ModelConfig, ImportError> {
    model_config_with(config_json, path, Some(upcycle))
}

fn model_config_with(
    config_json: &serde_json::Value,
    path: &Path,
    upcycle: Option<&Upcycle>,
) -> Result<ModelConfig, ImportError> {
    let model_type = config_json["model_type"].as_str().unwrap_or("").to_string();
    let unsupported = |problems: Vec<String>| ImportError::Unsupported {
        path: path.to_path_buf(),
        model_type: model_type.clone(),
        problems,
    };
    let format = HfFormat::of_model_type(&model_type);
    match (format, model_type.as_str(), upcycle) {
        (Some(_), _, None) | (None, "llama", Some(_)) => {}
        (None, "llama", None) => {
            return Err(unsupported(vec![
                "a dense model; upcycle it into an MoE with `--upcycle-experts N \
                 --upcycle-top-k K`"
                    .into(),
            ]));
        }
        (_, _, Some(_)) => {
            return Err(unsupported(vec![format!(
                "model_type `{model_type}` is not a dense model Switchyard upcycles (llama)"
            )]));
        }
        _ => {
            return Err(unsupported(vec![format!(
                "model_type `{model_type}` is not one Switchyard imports (mixtral, qwen2_moe, \
                 qwen3_moe; llama with upcycling)"
            )]));
        }
    }
    let mut problems = Vec::new();
    let mut int = |key: &str| match config_json[key].as_u64() {
        Some(v) => v as usize,
        None => {
            problems.push(format!("`{key}` is missing or not an integer"));
            0
        }
    };
    let (v, d, h, l, f) = (
        int("vocab_size"),
        int("hidden_size"),
        int("num_attention_heads"),
        int("num_hidden_layers"),
        int("intermediate_size"),
    );
    let (e, k, expert_f) = match (upcycle, format) {
        (Some(u), _) => (u.num_experts, u.top_k, f),
        (None, Some(HfFormat::Mixtral)) => {
            (int("num_local_experts"), int("num_experts_per_tok"), f)
        }
        // transformers 5 writes Qwen3-MoE's `num_experts` as `num_local_experts`.
        (None, _) if config_json["num_experts"].is_null() => (
            int("num_local_experts"),
            int("num_experts_per_tok"),
            int("moe_intermediate_size"),
        ),
        (None, _) => (
            int("num_experts"),
            int("num_experts_per_tok"),
            int("moe_intermediate_size"),
        ),
    };
    let shared_f = match format {
        Some(HfFormat::Qwen2Moe) if upcycle.is_none() => {
            Some(int("shared_expert_intermediate_size"))
        }
        _ => None,
    };
    let flag = |key: &str, default: bool| config_json[key].as_bool().unwrap_or(default);
    if flag("mlp_bias", false) {
        problems.push("`mlp_bias: true` (Switchyard's feed-forward blocks have no bias)".into());
    }
    let bias = match format {
        Some(HfFormat::Qwen2Moe) if flag("qkv_bias", true) => AttentionBias::Qkv,
        Some(HfFormat::Qwen2Moe) => AttentionBias::None,
        // Llama, Mixtral and Qwen3 name it `attention_bias`: q, k, v and o.
        _ if flag("attention_bias", false) => AttentionBias::All,
        _ => AttentionBias::None,
    };
    let mut expert_f = expert_f;
    if let Some(u) = upcycle {
        if e == 0 || k == 0 || k > e {
            problems.push(format!(
                "upcycling to {e} experts with top-{k}: need 1 <= k <= experts"
            ));
        } else if u.split == UpcycleSplit::Partition {
            if f.is_multiple_of(e) {
                expert_f = f / e;
            } else {
                problems.push(format!(
                    "a partitioned split needs intermediate_size ({f}) divisible by the \
                     {e} experts"
                ));
            }
        }
    }
    let max_seq_len = config_json["max_position_embeddings"]
        .as_u64()
        .unwrap_or(4096) as usize;
    let kv = config_json["num_key_value_heads"]
        .as_u64()
        .map_or(h, |x| x as usize);
    let head_dim = config_json["head_dim"]
        .as_u64()
        .map(|x| x as usize)
        .filter(|&hd| h == 0 || hd * h != d || !d.is_multiple_of(h));
    // Qwen's configs keep a `sliding_window` that applies only with `use_sliding_window`.
    let sliding = match format {
        Some(HfFormat::Qwen2Moe | HfFormat::Qwen3Moe) => flag("use_sliding_window", false)
            .then(|| config_json["sliding_window"].as_u64())
            .flatten(),
        _ => config_json["sliding_window"].as_u64(),
    };
    if let Some(w) = sliding {
        problems.push(format!("sliding-window attention ({w} tokens)"));
    }
    if config_json["hidden_act"]
        .as_str()
        .is_some_and(|a| a != "silu")
    {
        problems.push(format!(
            "hidden_act {} (Switchyard's experts are SwiGLU)",
            config_json["hidden_act"]
        ));
    }
    // transformers 5 keeps RoPE's settings in `rope_parameters` (older files: `rope_theta`,
    // `rope_scaling`); only plain RoPE is Switchyard's.
    let rope = &config_json["rope_parameters"];
    let rope_theta = rope["rope_theta"]
        .as_f64()
        .or_else(|| config_json["rope_theta"].as_f64())
        .unwrap_or(1e6);
    let rope_type = rope["rope_type"]
        .as_str()
        .or_else(|| config_json["rope_scaling"]["rope_type"].as_str())
        .or_else(|| config_json["rope_scaling"]["type"].as_str())
        .unwrap_or("default");
    if rope_type != "default" {
        problems.push(format!(
            "RoPE scaling `{rope_type}` (Switchyard has plain RoPE)"
        ));
    }
    // Qwen: layer l is MoE unless listed in `mlp_only_layers` or (l + 1) % step != 0;
    // Switchyard's layer l is MoE when l % every == 0.
    let mut every = 1;
    if matches!(format, Some(HfFormat::Qwen2Moe | HfFormat::Qwen3Moe)) && upcycle.is_none() {
        let step = config_json["decoder_sparse_step"]
            .as_u64()
            .unwrap_or(1)
            .max(1) as usize;
        let dense: Vec<usize> = config_json["mlp_only_layers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as usize)
                    .collect()
            })
            .unwrap_or_default();
        let moe_layers: Vec<usize> = (0..l)
            .filter(|i| !dense.contains(i) && (i + 1).is_multiple_of(step))
            .collect();
        match (1..=l.max(1)).find(|&n| {
            (0..l)
                .filter(|i| i.is_multiple_of(n))
                .eq(moe_layers.iter().copied())
        }) {
            Some(n) => every = n,
            None => problems.push(format!(
                "MoE blocks in layers {moe_layers:?} (Switchyard puts them in the layers l with \
                 l % every == 0)"
            )),
        }
    }
    let normalize_weights = match format {
        Some(HfFormat::Qwen2Moe | HfFormat::Qwen3Moe) if upcycle.is_none() => {
            flag("norm_topk_prob", false)
        }
        _ => true,
    };
    let shared_expert = shared_f.map(|ffn_dim| switchyard_moe::config::SharedExpertConfig {
        count: 1,
        ffn_dim,
        gate: true,
    });
    if !problems.is_empty() {
        return Err(unsupported(problems));
    }
    Ok(ModelConfig {
        vocab_size: v,
        d_model: d,
        n_heads: h,
        n_layers: l,
        ffn_dim: f,
        max_seq_len,
        rope_theta,
        norm_eps: config_json["rms_norm_eps"].as_f64().unwrap_or(1e-5),
        tie_embeddings: flag("tie_word_embeddings", false),
        init_std: config_json["initializer_range"].as_f64().unwrap_or(0.02),
        attention: switchyard_moe::config::AttentionConfig {
            kv_heads: (kv != h).then_some(kv),
            head_dim,
            bias,
            qk_norm: format == Some(HfFormat::Qwen3Moe),
        },
        moe: switchyard_moe::config::MoeConfig {
            every,
            num_experts: e,
            top_k: k,
            expert_ffn_dim: expert_f,
            router: RouterConfig::TopKSoftmax { normalize_weights },
            capacity: CapacityConfig::Dropless {},
            shared_expert,
            load_balance_coef: config_json["router_aux_loss_coef"].as_f64().unwrap_or(0.02),
            z_loss_coef: 0.001,
            ..Default::default()
        },
    })
}

/// The weights of the Hugging Face model (`format`) in `dir` as Switchyard tensors of
/// `cfg`, by Switchyard name (f32, [in, out] projections).
pub fn import_weights(
    dir: &Path,
    cfg: &ModelConfig,
    format: HfFormat,
) -> Result<Vec<NamedTensor>, ImportError> {
    let mut hf = read_hf_tensors(dir)?;
    if cfg.tie_embeddings {
        hf.remove("lm_head.weight");
    }
    let out = hf_tensors(cfg, format)
        .iter()
        .map(|m| take_mapped(&mut hf, dir, m))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(name) = hf.keys().find(|k| !k.ends_with("rotary_emb.inv_freq")) {
        return Err(read_err(
            dir,
            format!(
                "tensor `{name}` is not part of a {} model of this config",
                format.name()
            ),
        ));
    }
    Ok(out)
}
