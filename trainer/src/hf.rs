//! Hugging Face export: a checkpoint's weights (saved at any layout: experts are stored by
//! global id) as what `transformers.AutoModelForCausalLM.from_pretrained` loads —
//! `config.json`, sharded `model-0000N-of-0000M.safetensors` with their index, the
//! tokenizer files and `generation_config.json`, in f32 or bf16. Formats: Mixtral.
//!
//! Switchyard stores projections as [in, out] (`x @ W`); Hugging Face's `nn.Linear`
//! weights are [out, in], so every projection is transposed on the way out. Both use
//! half-split rotary embeddings (`rotate_half`), so q and k need no permutation.
//!
//! The export streams: one tensor is converted at a time and one shard (at most
//! `shard_bytes`) is held before it is written; the directory appears complete or not at
//! all (written beside it, then renamed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use switchyard_moe::config::{CapacityConfig, ModelConfig, RouterConfig};

use crate::checkpoint::NamedTensor;
use crate::data::Tokenizer;

/// The target architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfFormat {
    Mixtral,
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
    let HfFormat::Mixtral = format;
    let moe = &cfg.moe;
    let mut out = Vec::new();
    match &moe.router {
        RouterConfig::TopKSoftmax {
            normalize_weights: true,
        } => {}
        RouterConfig::TopKSoftmax {
            normalize_weights: false,
        } => out.push(
            "top-k weights without renormalisation (`normalize_weights: false`; Mixtral \
             always renormalises; Qwen-MoE's `norm_topk_prob: false` is planned)"
                .into(),
        ),
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
    if moe.every != 1 {
        out.push(format!(
            "dense layers between MoE layers (`model.moe.every: {}`; Mixtral has MoE in every \
             layer)",
            moe.every
        ));
    }
    if moe.shared_expert.is_some() {
        out.push("shared experts (Qwen2-MoE's gated shared expert is planned)".into());
    }
    if let CapacityConfig::Drop { factor } = moe.capacity {
        out.push(format!(
            "capacity dropping (`capacity: {{type: drop, factor: {factor}}}`): Hugging Face \
             models route every token, so their logits would differ"
        ));
    }
    if !cfg.d_model.is_multiple_of(cfg.n_heads) {
        out.push("a model dimension not divisible by the head count".into());
    }
    out
}

/// Hugging Face name, shape, the Switchyard tensor it comes from, and whether it is
/// transposed.
struct Mapped {
    name: String,
    shape: Vec<usize>,
    source: String,
    transpose: bool,
}

fn mixtral_tensors(cfg: &ModelConfig) -> Vec<Mapped> {
    let (d, v, f, e) = (
        cfg.d_model,
        cfg.vocab_size,
        cfg.moe.expert_ffn_dim,
        cfg.moe.num_experts,
    );
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, source: String, transpose: bool| {
        out.push(Mapped {
            name,
            shape,
            source,
            transpose,
        })
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![v, d],
        "embed".into(),
        false,
    );
    for l in 0..cfg.n_layers {
        let hf = format!("model.layers.{l}");
        let sy = format!("layers.{l}");
        add(
            format!("{hf}.input_layernorm.weight"),
            vec![d],
            format!("{sy}.attn_norm.gamma"),
            false,
        );
        for (h, s) in [
            ("q_proj", "wq"),
            ("k_proj", "wk"),
            ("v_proj", "wv"),
            ("o_proj", "wo"),
        ] {
            add(
                format!("{hf}.self_attn.{h}.weight"),
                vec![d, d],
                format!("{sy}.attn.{s}"),
                true,
            );
        }
        add(
            format!("{hf}.post_attention_layernorm.weight"),
            vec![d],
            format!("{sy}.ffn_norm.gamma"),
            false,
        );
        add(
            format!("{hf}.block_sparse_moe.gate.weight"),
            vec![e, d],
            format!("{sy}.moe.router.w_gate"),
            true,
        );
        for x in 0..e {
            let he = format!("{hf}.block_sparse_moe.experts.{x}");
            let se = format!("{sy}.moe.experts.{x}");
            add(
                format!("{he}.w1.weight"),
                vec![f, d],
                format!("{se}.w_gate"),
                true,
            );
            add(
                format!("{he}.w2.weight"),
                vec![d, f],
                format!("{se}.w_down"),
                true,
            );
            add(
                format!("{he}.w3.weight"),
                vec![f, d],
                format!("{se}.w_up"),
                true,
            );
        }
    }
    add(
        "model.norm.weight".into(),
        vec![d],
        "final_norm.gamma".into(),
        false,
    );
    if !cfg.tie_embeddings {
        add("lm_head.weight".into(), vec![v, d], "lm_head".into(), true);
    }
    out
}

fn config_json(cfg: &ModelConfig, dtype: HfDtype, eod: Option<u32>) -> serde_json::Value {
    json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.moe.expert_ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.d_model / cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_local_experts": cfg.moe.num_experts,
        "num_experts_per_tok": cfg.moe.top_k,
        "router_aux_loss_coef": cfg.moe.load_balance_coef,
        "output_router_logits": false,
        "router_jitter_noise": 0.0,
        "sliding_window": null,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": true,
        "bos_token_id": null,
        "eos_token_id": eod,
        "torch_dtype": dtype.torch_name(),
    })
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
    model: &BTreeMap<String, NamedTensor>,
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
            format: "mixtral",
            problems,
        });
    }
    if out.exists() && std::fs::read_dir(out).map_or(true, |mut d| d.next().is_some()) {
        return Err(ExportError::OutExists {
            path: out.to_path_buf(),
        });
    }
    let mapped = mixtral_tensors(cfg);
    for m in &mapped {
        let want: Vec<usize> = if m.transpose {
            m.shape.iter().rev().copied().collect()
        } else {
            m.shape.clone()
        };
        match model.get(&m.source) {
            Some(t) if t.shape == want && t.as_f32().is_some() => {}
            _ => {
                return Err(ExportError::MissingTensor {
                    name: m.source.clone(),
                    shape: want,
                });
            }
        }
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
    let result = write_all(model, cfg, tokenizer, dtype, &mapped, &shards, &tmp);
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

fn write_all(
    model: &BTreeMap<String, NamedTensor>,
    cfg: &ModelConfig,
    tokenizer: &Tokenizer,
    dtype: HfDtype,
    mapped: &[Mapped],
    shards: &[Vec<usize>],
    dir: &Path,
) -> Result<ExportReport, ExportError> {
    let mut weight_map = serde_json::Map::new();
    let mut total: u64 = 0;
    for (s, members) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards.len());
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(members.len());
        for &i in members {
            let m = &mapped[i];
            let src = model[&m.source].as_f32().expect("checked above");
            let values: Vec<f32> = if m.transpose {
                // The source is the [in, out] transpose of the exported [out, in].
                transposed(&[m.shape[1], m.shape[0]], src).1
            } else {
                src.to_vec()
            };
            let bytes: Vec<u8> = match dtype {
                HfDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                HfDtype::Bf16 => values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
            };
            total += bytes.len() as u64;
            weight_map.insert(m.name.clone(), json!(file));
            data.push((m.name.clone(), m.shape.clone(), bytes));
        }
        let st_dtype = match dtype {
            HfDtype::F32 => Dtype::F32,
            HfDtype::Bf16 => Dtype::BF16,
        };
        let views = data
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(st_dtype, shape.clone(), bytes).map(|v| (name.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| write_err(&dir.join(&file), format!("{e:?}")))?;
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, Some(metadata), &path)
            .map_err(|e| write_err(&path, format!("{e:?}")))?;
        // Written through a private temporary file: readable like the JSON files.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| write_err(&path, e))?;
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
    write_json("config.json", &config_json(cfg, dtype, eod))?;
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
    let hf = read_hf_tensors(dir)?;
    let mut used = std::collections::BTreeSet::new();
    let mut take =
        |name: &str, shape: Vec<usize>| -> Result<&(Vec<usize>, Vec<f32>), ImportError> {
            let t = hf
                .get(name)
                .ok_or_else(|| read_err(dir, format!("the model has no tensor `{name}`")))?;
            if t.0 != shape {
                return Err(read_err(
                    dir,
                    format!(
                        "tensor `{name}` has shape {:?}; the config says {shape:?}",
                        t.0
                    ),
                ));
            }
            used.insert(name.to_string());
            Ok(t)
        };
    let (d, v, f, e) = (
        cfg.d_model,
        cfg.vocab_size,
        cfg.ffn_dim,
        upcycle.num_experts,
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(upcycle.seed);
    let mut out = Vec::new();
    let mut put = |name: String, (shape, values): (Vec<usize>, Vec<f32>)| {
        out.push(NamedTensor::f32(name, shape, values));
    };
    let plain = |t: &(Vec<usize>, Vec<f32>)| t.clone();
    put(
        "embed".into(),
        plain(take("model.embed_tokens.weight", vec![v, d])?),
    );
    // Box-Muller: a normal draw of standard deviation `std`.
    let normal = |rng: &mut rand_chacha::ChaCha8Rng, std: f64| -> f32 {
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
        (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    };
    for l in 0..cfg.n_layers {
        let hf_l = format!("model.layers.{l}");
        let sy = format!("layers.{l}");
        put(
            format!("{sy}.attn_norm.gamma"),
            plain(take(&format!("{hf_l}.input_layernorm.weight"), vec![d])?),
        );
        for (h, w) in [
            ("q_proj", "wq"),
            ("k_proj", "wk"),
            ("v_proj", "wv"),
            ("o_proj", "wo"),
        ] {
            let t = take(&format!("{hf_l}.self_attn.{h}.weight"), vec![d, d])?;
            put(format!("{sy}.attn.{w}"), transposed(&t.0, &t.1));
        }
        put(
            format!("{sy}.ffn_norm.gamma"),
            plain(take(
                &format!("{hf_l}.post_attention_layernorm.weight"),
                vec![d],
            )?),
        );
        let gate: Vec<f32> = (0..d * e).map(|_| normal(&mut rng, cfg.init_std)).collect();
        put(format!("{sy}.moe.router.w_gate"), (vec![d, e], gate));
        let mlp = [
            ("gate_proj", "w_gate", vec![f, d]),
            ("up_proj", "w_up", vec![f, d]),
            ("down_proj", "w_down", vec![d, f]),
        ];
        for (h, w, shape) in mlp {
            let t = take(&format!("{hf_l}.mlp.{h}.weight"), shape)?;
            let (shape, values) = transposed(&t.0, &t.1);
            for x in 0..e {
                let mut copy = values.clone();
                if upcycle.noise_std > 0.0 {
                    copy.iter_mut()
                        .for_each(|c| *c += normal(&mut rng, upcycle.noise_std));
                }
                put(format!("{sy}.moe.experts.{x}.{w}"), (shape.clone(), copy));
            }
        }
    }
    put(
        "final_norm.gamma".into(),
        plain(take("model.norm.weight", vec![d])?),
    );
    if !cfg.tie_embeddings {
        let t = take("lm_head.weight", vec![v, d])?;
        put("lm_head".into(), transposed(&t.0, &t.1));
    }
    let unused: Vec<&String> = hf
        .keys()
        .filter(|k| {
            !(used.contains(*k)
                || k.ends_with("rotary_emb.inv_freq")
                || cfg.tie_embeddings && *k == "lm_head.weight")
        })
        .collect();
    if let Some(name) = unused.first() {
        return Err(read_err(
            dir,
            format!("tensor `{name}` is not part of a Llama model of this config"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for (key, value, needle) in [
            ("num_key_value_heads", json!(2), "grouped-query attention"),
            ("sliding_window", json!(4096), "sliding-window"),
            (
                "rope_parameters",
                json!({"rope_theta": 1e4, "rope_type": "yarn"}),
                "RoPE scaling `yarn`",
            ),
            ("model_type", json!("qwen2_moe"), "model_type `qwen2_moe`"),
        ] {
            let mut c = mixtral_json();
            c[key] = value;
            let err = model_config_of(&c, path).unwrap_err().to_string();
            assert!(err.contains(needle), "{key}: {err}");
        }
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
/// from Dense Checkpoints"): every MLP of a dense model becomes `num_experts` experts that
/// start as copies of it (plus optional Gaussian noise of std `noise_std`), behind a new
/// router drawn like any fresh router (normal, std `initializer_range`). With top-k weights
/// renormalised to sum to one and no noise, the upcycled model computes exactly the dense
/// one at the first step.
#[derive(Debug, Clone, PartialEq)]
pub struct Upcycle {
    pub num_experts: usize,
    pub top_k: usize,
    pub noise_std: f64,
    pub seed: u64,
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
    match (model_type.as_str(), upcycle) {
        ("mixtral", None) | ("llama", Some(_)) => {}
        ("llama", None) => {
            return Err(unsupported(vec![
                "a dense model; upcycle it into an MoE with `--upcycle-experts N \
                 --upcycle-top-k K`"
                    .into(),
            ]));
        }
        (_, Some(_)) => {
            return Err(unsupported(vec![format!(
                "model_type `{model_type}` is not a dense model Switchyard upcycles (llama)"
            )]));
        }
        _ => {
            return Err(unsupported(vec![format!(
                "model_type `{model_type}` is not one Switchyard imports (mixtral; llama with \
                 upcycling)"
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
    let (e, k) = match upcycle {
        Some(u) => (u.num_experts, u.top_k),
        None => (int("num_local_experts"), int("num_experts_per_tok")),
    };
    for key in ["attention_bias", "mlp_bias"] {
        if config_json[key].as_bool() == Some(true) {
            problems.push(format!(
                "`{key}: true` (Switchyard's projections have no bias)"
            ));
        }
    }
    if upcycle.is_some() && (e == 0 || k == 0 || k > e) {
        problems.push(format!(
            "upcycling to {e} experts with top-{k}: need 1 <= k <= experts"
        ));
    }
    let max_seq_len = config_json["max_position_embeddings"]
        .as_u64()
        .unwrap_or(4096) as usize;
    let kv = config_json["num_key_value_heads"]
        .as_u64()
        .map_or(h, |x| x as usize);
    if kv != h {
        problems.push(format!(
            "grouped-query attention ({kv} key/value heads for {h} query heads); Switchyard's \
             attention has one key/value head per query head"
        ));
    }
    if let Some(hd) = config_json["head_dim"].as_u64()
        && h > 0
        && hd as usize != d / h
    {
        problems.push(format!(
            "head_dim {hd} is not hidden_size / num_attention_heads"
        ));
    }
    if let Some(w) = config_json["sliding_window"].as_u64() {
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
        tie_embeddings: config_json["tie_word_embeddings"]
            .as_bool()
            .unwrap_or(false),
        init_std: config_json["initializer_range"].as_f64().unwrap_or(0.02),
        moe: switchyard_moe::config::MoeConfig {
            every: 1,
            num_experts: e,
            top_k: k,
            expert_ffn_dim: f,
            router: RouterConfig::TopKSoftmax {
                normalize_weights: true,
            },
            capacity: CapacityConfig::Dropless {},
            shared_expert: None,
            load_balance_coef: config_json["router_aux_loss_coef"].as_f64().unwrap_or(0.02),
            z_loss_coef: 0.001,
        },
    })
}

/// The weights of the Hugging Face Mixtral in `dir` as Switchyard tensors of `cfg`, by
/// Switchyard name (f32, [in, out] projections).
pub fn import_weights(dir: &Path, cfg: &ModelConfig) -> Result<Vec<NamedTensor>, ImportError> {
    let mapped = mixtral_tensors(cfg);
    let mut hf = read_hf_tensors(dir)?;
    if cfg.tie_embeddings {
        hf.remove("lm_head.weight");
    }
    let mut out = Vec::with_capacity(mapped.len());
    for m in &mapped {
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
        let (shape, values) = if m.transpose {
            transposed(&shape, &values)
        } else {
            (shape, values)
        };
        out.push(NamedTensor::f32(m.source.clone(), shape, values));
    }
    if let Some(name) = hf.keys().next() {
        return Err(read_err(
            dir,
            format!("tensor `{name}` is not part of a Mixtral model of this config"),
        ));
    }
    Ok(out)
}
