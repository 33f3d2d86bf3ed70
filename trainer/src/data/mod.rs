//! Data pipeline: tokenizers, the Megatron-LM indexed dataset format and `prepare-data`, the
//! synthetic quickstart corpus, train/validation splits and the resumable shuffling sampler.
//!
//! Typical use: `cfg.validate()` and `cfg.check_paths()` before anything is allocated, then
//! [`build_tokenizer`], [`Corpus::load`], [`Corpus::train_sampler`] (a [`BlendSampler`]: one source
//! or several mixed by weight; restored from a checkpoint on resume) and [`Corpus::valid_batches`].

mod blend;
mod config;
mod corpus;
mod error;
pub mod indexed;
mod parquet;
mod prepare;
mod sampler;
mod source;
mod synthetic;
mod tokenizer;

pub use blend::{
    BlendSampler, BlendSourceState, BlendState, SourceUse, blend_choice, blend_counts,
};
pub use config::{
    BlendSource, DataConfig, MIN_BPE_VOCAB, SourceConfig, TokenizerConfig, normalize,
};
pub use corpus::{Corpus, CorpusSource, ValidSet, build_tokenizer, raw_documents};
pub use error::{DataError, Result};
pub use indexed::{DatasetStats, IndexedDataset, TokenDtype, dataset_stats};
pub use prepare::{PrepareOptions, PrepareReport, prepare_data};
pub use sampler::{Batch, Sampler, SamplerState, epoch_permutation, valid_batches};
pub use source::InputFormat;
pub use synthetic::synthetic_text;
pub use tokenizer::{BPE_EOD_TOKEN, BYTE_EOD, HfTokenizer, Tokenizer};

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const EXAMPLE: &str = "
tokenizer:
  type: byte
source:
  type: synthetic
valid_fraction: 0.1
seq_len: 128
batch_size: 8
shuffle_seed: 0
";

    fn parse(yaml: &str) -> std::result::Result<DataConfig, String> {
        serde_yaml::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn yaml_shapes_deserialize() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.tokenizer, TokenizerConfig::Byte {});
        assert_eq!(
            c.source,
            SourceConfig::Synthetic {
                seed: 0,
                bytes: 2_000_000
            }
        );
        assert_eq!(c.shuffle_seed, Some(0));
        assert!(c.validate().is_empty());

        let c = parse(
            "tokenizer: {type: huggingface, path: tok.json, eod_token: \"</s>\"}\n\
             source: {type: jsonl, path: d.jsonl}\nseq_len: 4\nbatch_size: 2\n",
        )
        .unwrap();
        assert_eq!(
            c.tokenizer,
            TokenizerConfig::HuggingFace {
                path: "tok.json".into(),
                eod_token: Some("</s>".into())
            }
        );
        assert_eq!(
            c.source,
            SourceConfig::Jsonl {
                path: "d.jsonl".into(),
                text_key: "text".into()
            }
        );
        assert_eq!((c.valid_fraction, c.shuffle_seed), (0.1, None));
        assert_eq!(c.shuffle_seed_or(77), 77);

        let c = parse("tokenizer: {type: bpe}\nsource: {type: text, path: a.txt}\nseq_len: 4\nbatch_size: 2\n").unwrap();
        assert_eq!(c.tokenizer, TokenizerConfig::Bpe { vocab_size: 4096 });
        let c = parse("tokenizer: {type: byte}\nsource: {type: indexed, prefix: data/x}\nseq_len: 4\nbatch_size: 2\n")
            .unwrap();
        assert_eq!(
            c.source,
            SourceConfig::Indexed {
                prefix: "data/x".into()
            }
        );

        // Serialization round-trips.
        let back = parse(&serde_yaml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_keys_and_types_are_rejected() {
        for (yaml, needle) in [
            (format!("{EXAMPLE}extra: 1\n"), "extra"),
            (
                EXAMPLE.replace("type: synthetic", "type: synthetic\n  bites: 5"),
                "bites",
            ),
            (
                EXAMPLE.replace("type: byte", "type: byte\n  vocab_size: 5"),
                "vocab_size",
            ),
            (
                EXAMPLE.replace("type: synthetic", "type: parquet"),
                "parquet",
            ),
            (EXAMPLE.replace("seq_len: 128", "seq_len: many"), "seq_len"),
        ] {
            let e = parse(&yaml).unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn validate_reports_every_problem_with_its_key() {
        let mut c = parse(EXAMPLE).unwrap();
        c.seq_len = 0;
        c.batch_size = 0;
        c.valid_fraction = 1.0;
        c.tokenizer = TokenizerConfig::Bpe { vocab_size: 256 };
        c.source = SourceConfig::Jsonl {
            path: PathBuf::new(),
            text_key: String::new(),
        };
        let keys: Vec<String> = c.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "seq_len",
                "batch_size",
                "valid_fraction",
                "tokenizer.vocab_size",
                "source.path",
                "source.text_key"
            ]
        );
        for f in [0.0, -0.5, f64::NAN] {
            c.valid_fraction = f;
            assert!(
                c.validate().iter().any(|(k, _)| k == "valid_fraction"),
                "{f}"
            );
        }

        let mut c = parse(EXAMPLE).unwrap();
        c.tokenizer = TokenizerConfig::Bpe { vocab_size: 257 };
        assert!(c.validate().is_empty(), "257 is the smallest legal BPE");
        c.source = SourceConfig::Indexed { prefix: "x".into() };
        let p = c.validate();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, "tokenizer.type");
        assert!(p[0].1.contains("indexed"));

        // Loading refuses an invalid config with all its problems in the message.
        let mut c = parse(EXAMPLE).unwrap();
        c.batch_size = 0;
        let e = Corpus::load(&c, &Tokenizer::Byte).unwrap_err().to_string();
        assert!(e.contains("data.batch_size"), "{e}");
    }

    #[test]
    fn blend_sources_parse_validate_and_resolve_with_their_keys() {
        let yaml = "tokenizer: {type: byte}\nseq_len: 4\nbatch_size: 2\nsource:\n  type: blend\n  \
                    sources:\n  - {prefix: a/web, weight: 7}\n  - {prefix: b/code, weight: 3, name: code}\n";
        let mut c = parse(yaml).unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        let SourceConfig::Blend { sources } = &c.source else {
            panic!("{:?}", c.source)
        };
        assert_eq!(
            sources.iter().map(BlendSource::name).collect::<Vec<_>>(),
            ["web", "code"]
        );
        assert_eq!(parse(&serde_yaml::to_string(&c).unwrap()).unwrap(), c);
        let e = parse(&yaml.replace("weight: 3,", "weight: 3, wieght: 1,")).unwrap_err();
        assert!(e.contains("wieght"), "{e}");

        // Each prefix resolves against the base of its own key.
        let (cwd, config_dir) = (PathBuf::from("/cwd"), PathBuf::from("/configs"));
        c.resolve_paths(|key| {
            if key == "source.sources[1].prefix" {
                &cwd
            } else {
                &config_dir
            }
        });
        let SourceConfig::Blend { sources } = &c.source else {
            unreachable!()
        };
        assert_eq!(sources[0].prefix, PathBuf::from("/configs/a/web"));
        assert_eq!(sources[1].prefix, PathBuf::from("/cwd/b/code"));
        let p = c.check_paths();
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[2].0 == "source.sources[1].prefix" && p[2].1.contains("/cwd/b/code.idx"));

        let problems = |sources: &str| -> Vec<(String, String)> {
            let yaml = format!(
                "tokenizer: {{type: byte}}\nseq_len: 4\nbatch_size: 2\n\
                 source: {{type: blend, sources: {sources}}}\n"
            );
            parse(&yaml).unwrap().validate()
        };
        let p = problems("[]");
        assert_eq!(p[0].0, "source.sources");
        assert!(p[0].1.contains("is empty"), "{p:?}");
        let p = problems(
            "[{prefix: x/a, weight: 0}, {prefix: y/b, weight: -1}, {prefix: z/c, weight: .nan}, \
             {prefix: ./x/a, weight: 1}, {prefix: w/a, weight: 1}, {prefix: q, weight: 1, name: \"a b\"}]",
        );
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "source.sources[0].weight",
                "source.sources[1].weight",
                "source.sources[2].weight",
                "source.sources[3].prefix",
                "source.sources[4].name",
                "source.sources[5].name",
            ],
            "{p:?}"
        );
        assert!(
            p[0].1.contains("positive") && p[1].1.contains("-1"),
            "{p:?}"
        );
        assert!(p[3].1.contains("also sources[0].prefix"), "{p:?}");
        assert!(p[4].1.contains("also the name of sources[0]") && p[4].1.contains("name:"));
        assert!(p[5].1.contains("not a metric name"), "{p:?}");
        let mut c = parse(yaml).unwrap();
        c.tokenizer = TokenizerConfig::Bpe { vocab_size: 300 };
        assert_eq!(c.validate()[0].0, "tokenizer.type");
    }

    #[test]
    fn check_paths_names_missing_files_and_resolve_paths_joins_base() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = parse(
            "tokenizer: {type: huggingface, path: missing_tok.json}\n\
             source: {type: indexed, prefix: corpus}\nseq_len: 4\nbatch_size: 2\n",
        )
        .unwrap();
        // The tokenizer's path came from the command line: the working directory is its base.
        let cwd = dir.path().join("cwd");
        let config_dir = dir.path().join("configs");
        c.resolve_paths(|key| {
            if key == "tokenizer.path" {
                &cwd
            } else {
                &config_dir
            }
        });
        assert_eq!(
            c.tokenizer,
            TokenizerConfig::HuggingFace {
                path: cwd.join("missing_tok.json"),
                eod_token: None
            }
        );
        assert_eq!(
            c.source,
            SourceConfig::Indexed {
                prefix: config_dir.join("corpus")
            }
        );
        // `..` and `.` are resolved; absolute paths stay.
        let mut d = parse(
            "tokenizer: {type: huggingface, path: /abs/./tok.json}\n\
             source: {type: text, path: ../data/./x/../input.txt.gz}\nseq_len: 4\nbatch_size: 2\n",
        )
        .unwrap();
        d.resolve_paths(|_| &config_dir);
        assert_eq!(
            d.source,
            SourceConfig::Text {
                path: dir.path().join("data/input.txt.gz")
            }
        );
        assert_eq!(
            d.tokenizer,
            TokenizerConfig::HuggingFace {
                path: "/abs/./tok.json".into(),
                eod_token: None
            }
        );
        let mut c = parse(
            "tokenizer: {type: huggingface, path: missing_tok.json}\n\
             source: {type: indexed, prefix: corpus}\nseq_len: 4\nbatch_size: 2\n",
        )
        .unwrap();
        c.resolve_paths(|_| dir.path());
        std::fs::write(dir.path().join("corpus.bin"), b"").unwrap();
        let p = c.check_paths();
        let msgs: Vec<&str> = p.iter().map(|(_, m)| m.as_str()).collect();
        assert_eq!(p.len(), 2, "{msgs:?}");
        assert!(p[0].0 == "tokenizer.path" && msgs[0].contains("missing_tok.json"));
        assert!(p[1].0 == "source.prefix" && msgs[1].contains("corpus.idx"));
        assert!(parse(EXAMPLE).unwrap().check_paths().is_empty());
    }
}
