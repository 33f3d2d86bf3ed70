//! `hf::export` on a small model: every Hugging Face tensor read back from the shards is the
//! Switchyard tensor it names (transposed where a projection is), the shards respect the
//! size limit and the index lists each tensor's file; what Mixtral cannot hold is refused
//! with nothing written; an existing output directory is never overwritten. (Loading the
//! export into `transformers` itself: scripts/check_hf_export.py.)

use std::collections::BTreeMap;

use burn::tensor::Device;
use safetensors::SafeTensors;
use switchyard_moe::Transformer;
use switchyard_moe::config::{
    CapacityConfig, ModelConfig, MoeConfig, NullInit, NullNormalization, RouterConfig,
};
use switchyard_moe::params::named_params;
use switchyard_trainer::checkpoint::NamedTensor;
use switchyard_trainer::data::Tokenizer;
use switchyard_trainer::hf::{self, ExportError, HfDtype, HfFormat};

fn cfg(router: RouterConfig) -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        d_model: 16,
        n_heads: 2,
        n_layers: 2,
        ffn_dim: 24,
        max_seq_len: 32,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        init_std: 0.1,
        attention: Default::default(),
        moe: MoeConfig {
            every: 1,
            num_experts: 3,
            top_k: 2,
            expert_ffn_dim: 8,
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

/// The model's tensors as a checkpoint stores them (Switchyard names, [in, out]).
fn stored(cfg: &ModelConfig) -> BTreeMap<String, NamedTensor> {
    let model = Transformer::new(cfg, 3, &Device::flex());
    named_params(&model)
        .into_iter()
        .map(|(key, shape, value)| {
            let data = value
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap();
            (
                key.name().to_string(),
                NamedTensor::f32(key.name(), shape, data),
            )
        })
        .collect()
}

#[test]
fn every_exported_tensor_is_its_source_and_the_shards_follow_the_index() {
    let cfg = cfg(top_k());
    let model = stored(&cfg);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("export");
    let report = hf::export(
        &model,
        &cfg,
        &Tokenizer::Byte,
        HfFormat::Mixtral,
        HfDtype::F32,
        &out,
        4096,
    )
    .unwrap();
    // embed + per layer (2 norms, 4 projections, gate, 3 x 3 expert weights) + norm + head
    assert_eq!(report.tensors, 1 + 2 * (2 + 4 + 1 + 9) + 1 + 1);
    assert!(report.shards > 2, "{report:?}");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    assert_eq!(weight_map.len(), report.tensors);
    let mut seen = 0;
    let mut total = 0u64;
    for s in 1..=report.shards {
        let file = format!("model-{s:05}-of-{:05}.safetensors", report.shards);
        let bytes = std::fs::read(out.join(&file)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let in_shard: usize = st.tensors().iter().map(|(_, t)| t.data().len()).sum();
        assert!(
            in_shard <= 4096 || st.len() == 1,
            "{file}: {in_shard} bytes"
        );
        for (name, view) in st.tensors() {
            assert_eq!(weight_map[&name], file, "{name}");
            let got: Vec<f32> = view
                .data()
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            total += view.data().len() as u64;
            // Back to the Switchyard name and layout.
            let (source, transpose) = source_of(&name);
            let src = &model[&source];
            let want: Vec<f32> = if transpose {
                let (r, c) = (src.shape[0], src.shape[1]);
                assert_eq!(view.shape(), [c, r], "{name}");
                let v = src.as_f32().unwrap();
                (0..c)
                    .flat_map(|j| (0..r).map(move |i| v[i * c + j]))
                    .collect()
            } else {
                assert_eq!(view.shape(), src.shape.as_slice(), "{name}");
                src.as_f32().unwrap().to_vec()
            };
            assert_eq!(got, want, "{name} from {source}");
            seen += 1;
        }
    }
    assert_eq!(seen, report.tensors);
    assert_eq!(index["metadata"]["total_size"], total);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "mixtral");
    assert_eq!(config["num_local_experts"], 3);
    assert_eq!(config["intermediate_size"], 8);
    assert_eq!(config["tie_word_embeddings"], false);
    for f in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }

    // bf16: half the bytes, each value the bf16 rounding of the f32 one.
    let out16 = tmp.path().join("bf16");
    let r16 = hf::export(
        &model,
        &cfg,
        &Tokenizer::Byte,
        HfFormat::Mixtral,
        HfDtype::Bf16,
        &out16,
        1 << 30,
    )
    .unwrap();
    assert_eq!((r16.shards, r16.bytes * 2), (1, report.bytes));
    let bytes = std::fs::read(out16.join("model-00001-of-00001.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let embed = st.tensor("model.embed_tokens.weight").unwrap();
    let first = half::bf16::from_le_bytes([embed.data()[0], embed.data()[1]]);
    assert_eq!(
        first,
        half::bf16::from_f32(model["embed"].as_f32().unwrap()[0])
    );

    // Never into a directory that holds something.
    let again = hf::export(
        &model,
        &cfg,
        &Tokenizer::Byte,
        HfFormat::Mixtral,
        HfDtype::F32,
        &out,
        4096,
    );
    assert!(
        matches!(again, Err(ExportError::OutExists { .. })),
        "{again:?}"
    );
}

/// The Switchyard tensor an exported Mixtral tensor comes from, and whether it is
/// transposed (written independently of the exporter's table).
fn source_of(name: &str) -> (String, bool) {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        ["model", "embed_tokens", "weight"] => ("embed".into(), false),
        ["model", "norm", "weight"] => ("final_norm.gamma".into(), false),
        ["lm_head", "weight"] => ("lm_head".into(), true),
        ["model", "layers", l, "input_layernorm", "weight"] => {
            (format!("layers.{l}.attn_norm.gamma"), false)
        }
        ["model", "layers", l, "post_attention_layernorm", "weight"] => {
            (format!("layers.{l}.ffn_norm.gamma"), false)
        }
        ["model", "layers", l, "self_attn", p, "weight"] => {
            (format!("layers.{l}.attn.w{}", &p[..1]), true)
        }
        ["model", "layers", l, "block_sparse_moe", "gate", "weight"] => {
            (format!("layers.{l}.moe.router.w_gate"), true)
        }
        [
            "model",
            "layers",
            l,
            "block_sparse_moe",
            "experts",
            e,
            w,
            "weight",
        ] => {
            let which = match *w {
                "w1" => "w_gate",
                "w2" => "w_down",
                "w3" => "w_up",
                other => panic!("unexpected expert weight {other}"),
            };
            (format!("layers.{l}.moe.experts.{e}.{which}"), true)
        }
        _ => panic!("unexpected tensor {name}"),
    }
}

#[test]
fn what_mixtral_cannot_hold_is_refused_and_nothing_is_written() {
    let null = cfg(RouterConfig::NullExperts {
        num_null: 2,
        normalize: NullNormalization::default(),
        null_init: NullInit::default(),
        anneal: None,
    });
    let mut dense_between = cfg(top_k());
    dense_between.moe.every = 2;
    let mut dropping = cfg(top_k());
    dropping.moe.capacity = CapacityConfig::Drop { factor: 1.25 };
    let tmp = tempfile::tempdir().unwrap();
    for (what, cfg, needle) in [
        ("null experts", null, "null experts"),
        (
            "dense layers",
            dense_between,
            "dense layers between MoE layers",
        ),
        ("capacity", dropping, "capacity dropping"),
    ] {
        let out = tmp.path().join(what);
        let model = stored(&cfg);
        let err = hf::export(
            &model,
            &cfg,
            &Tokenizer::Byte,
            HfFormat::Mixtral,
            HfDtype::F32,
            &out,
            1 << 20,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(needle) && err.contains("Nothing was written"),
            "{what}: {err}"
        );
        assert!(!out.exists(), "{what}: {}", out.display());
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "no partial directory left"
    );
}

/// What each format holds and refuses: the refusal names the feature and the formats that
/// could hold it; what it holds exports.
#[test]
fn each_format_refuses_what_it_cannot_hold_and_names_the_one_that_can() {
    use switchyard_moe::config::{AttentionBias, SharedExpertConfig};
    let shared = |c: &mut ModelConfig| {
        c.moe.shared_expert = Some(SharedExpertConfig {
            count: 1,
            ffn_dim: 4,
            gate: true,
        })
    };
    let qk_norm = |c: &mut ModelConfig| c.attention.qk_norm = true;
    let qkv_bias = |c: &mut ModelConfig| c.attention.bias = AttentionBias::Qkv;
    let all_bias = |c: &mut ModelConfig| c.attention.bias = AttentionBias::All;
    let dense_between = |c: &mut ModelConfig| c.moe.every = 2;
    let no_renorm = |c: &mut ModelConfig| {
        c.moe.router = RouterConfig::TopKSoftmax {
            normalize_weights: false,
        }
    };
    let plain = |_: &mut ModelConfig| {};
    type Mutation = fn(&mut ModelConfig);
    let cases: Vec<(&str, Mutation, HfFormat, Option<&str>)> = vec![
        (
            "shared expert",
            shared,
            HfFormat::Mixtral,
            Some("qwen2_moe holds them"),
        ),
        (
            "shared expert",
            shared,
            HfFormat::Qwen3Moe,
            Some("qwen2_moe holds them"),
        ),
        ("shared expert", shared, HfFormat::Qwen2Moe, None),
        (
            "q/k norm",
            qk_norm,
            HfFormat::Mixtral,
            Some("qwen3_moe has them"),
        ),
        ("q/k norm", qk_norm, HfFormat::Qwen3Moe, None),
        (
            "no q/k norm",
            plain,
            HfFormat::Qwen3Moe,
            Some("qk_norm: true"),
        ),
        (
            "qkv bias",
            qkv_bias,
            HfFormat::Qwen3Moe,
            Some("qwen2_moe has them"),
        ),
        ("qkv bias", qkv_bias, HfFormat::Qwen2Moe, None),
        (
            "all biases",
            all_bias,
            HfFormat::Qwen2Moe,
            Some("qwen3_moe has them"),
        ),
        (
            "dense layers",
            dense_between,
            HfFormat::Mixtral,
            Some("mlp_only_layers"),
        ),
        ("dense layers", dense_between, HfFormat::Qwen2Moe, None),
        (
            "no renormalisation",
            no_renorm,
            HfFormat::Mixtral,
            Some("norm_topk_prob"),
        ),
        ("no renormalisation", no_renorm, HfFormat::Qwen2Moe, None),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (i, (what, mutate, format, refusal)) in cases.into_iter().enumerate() {
        let mut c = cfg(top_k());
        mutate(&mut c);
        if format == HfFormat::Qwen3Moe && what != "no q/k norm" {
            c.attention.qk_norm = true;
        }
        let out = tmp.path().join(format!("{i}"));
        let result = hf::export(
            &stored(&c),
            &c,
            &Tokenizer::Byte,
            format,
            HfDtype::F32,
            &out,
            1 << 20,
        );
        match refusal {
            Some(needle) => {
                let err = result.unwrap_err().to_string();
                assert!(
                    err.contains(needle) && err.contains(format.name()),
                    "{what} to {}: {err}",
                    format.name()
                );
                assert!(!out.exists());
            }
            None => {
                let report = result.unwrap_or_else(|e| panic!("{what} to {}: {e}", format.name()));
                assert!(report.tensors > 0 && out.join("config.json").exists());
            }
        }
    }
}
