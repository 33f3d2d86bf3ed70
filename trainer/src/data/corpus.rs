//! Loading a source into train / validation token streams.

use std::path::Path;
use std::sync::Arc;

use super::config::{DataConfig, SourceConfig, TokenizerConfig};
use super::error::{DataError, Result};
use super::indexed::IndexedDataset;
use super::sampler::{Batch, Sampler, valid_batches};
use super::source::{read_jsonl, read_text_file};
use super::synthetic::synthetic_text;
use super::tokenizer::{BPE_EOD_TOKEN, Tokenizer};

/// Raw documents of a text-like source (`None` for an indexed source, which is pre-tokenized).
pub fn raw_documents(source: &SourceConfig) -> Result<Option<Vec<String>>> {
    Ok(Some(match source {
        SourceConfig::Synthetic { seed, bytes } => vec![synthetic_text(*seed, *bytes)],
        SourceConfig::Text { path } => vec![read_text_file(path)?],
        SourceConfig::Jsonl { path, text_key } => read_jsonl(path, text_key)?,
        SourceConfig::Indexed { .. } => return Ok(None),
    }))
}

/// Builds the tokenizer the config asks for.
///
/// For `bpe`, `bpe_path` is where the trained `tokenizer.json` lives: if the file exists it is
/// loaded (so a resumed run reuses the exact tokenizer; it must not be larger than
/// `vocab_size`), otherwise a BPE is trained on the leading `1 - valid_fraction` of the source
/// text (validation text is not seen) and saved there.
pub fn build_tokenizer(cfg: &DataConfig, bpe_path: &Path) -> Result<Tokenizer> {
    check_config(cfg)?;
    match &cfg.tokenizer {
        TokenizerConfig::Byte {} => Ok(Tokenizer::Byte),
        TokenizerConfig::HuggingFace { path, eod_token } => {
            Tokenizer::from_hf_file(path, eod_token.as_deref())
        }
        TokenizerConfig::Bpe { vocab_size } => {
            if bpe_path.exists() {
                let t = Tokenizer::from_hf_file(bpe_path, Some(BPE_EOD_TOKEN))?;
                if t.vocab_size() > *vocab_size {
                    return Err(DataError::Tokenizer {
                        path: Some(bpe_path.to_path_buf()),
                        message: format!(
                            "the saved BPE has {} tokens but data.tokenizer.vocab_size is {vocab_size}; \
                             delete the file to retrain or set vocab_size to match",
                            t.vocab_size()
                        ),
                    });
                }
                return Ok(t);
            }
            let docs = raw_documents(&cfg.source)?.ok_or_else(|| DataError::InvalidConfig {
                problems: vec![(
                    "tokenizer.type".into(),
                    "bpe cannot be trained on an indexed source".into(),
                )],
            })?;
            let train_text = leading_fraction(&docs, 1.0 - cfg.valid_fraction);
            let pieces = train_text.iter().flat_map(|d| d.split_inclusive('\n'));
            Tokenizer::train_bpe(pieces, *vocab_size, bpe_path)
        }
    }
}

/// The documents cut to the first `frac` of their total bytes (at a char boundary).
fn leading_fraction(docs: &[String], frac: f64) -> Vec<&str> {
    let total: usize = docs.iter().map(String::len).sum();
    let mut budget = (total as f64 * frac) as usize;
    let mut out = Vec::new();
    for d in docs {
        if budget == 0 {
            break;
        }
        let mut end = budget.min(d.len());
        while !d.is_char_boundary(end) {
            end -= 1;
        }
        out.push(&d[..end]);
        budget -= budget.min(d.len());
    }
    out
}

fn check_config(cfg: &DataConfig) -> Result<()> {
    let problems = cfg.validate();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(DataError::InvalidConfig { problems })
    }
}

/// Train and validation token streams plus the batch geometry.
#[derive(Debug, Clone)]
pub struct Corpus {
    train: Arc<[u32]>,
    valid: Arc<[u32]>,
    seq_len: usize,
    batch_size: usize,
    vocab_size: usize,
}

impl Corpus {
    /// Loads and tokenizes the configured source and splits it.
    ///
    /// Text, JSONL and synthetic sources: documents are tokenized and concatenated (each
    /// followed by the tokenizer's end-of-document token, if it has one) and the last
    /// `valid_fraction` of the tokens is the validation split (a contiguous tail, like
    /// nanoGPT). Indexed sources: the last `valid_fraction` of the documents (rounded up) is
    /// the validation split. Both splits must hold at least `seq_len + 1` tokens.
    pub fn load(cfg: &DataConfig, tokenizer: &Tokenizer) -> Result<Corpus> {
        check_config(cfg)?;
        let vocab = tokenizer.vocab_size();
        let (train, valid) = match &cfg.source {
            SourceConfig::Indexed { prefix } => {
                let ds = IndexedDataset::open(prefix)?;
                if let Some(max) = ds.max_token().filter(|&m| m as usize >= vocab) {
                    return Err(DataError::TokenOutOfRange {
                        context: format!("indexed dataset {}", prefix.display()),
                        token: max.into(),
                        vocab_size: vocab,
                        hint: "configure the tokenizer the data was prepared with".into(),
                    });
                }
                let n = ds.num_docs();
                let n_valid = ((n as f64 * cfg.valid_fraction).ceil() as usize).min(n);
                if n_valid == n {
                    return Err(DataError::SplitTooShort {
                        split: "train",
                        tokens: 0,
                        needed: cfg.seq_len + 1,
                        hint: format!(
                            "{} has only {n} documents, all of them held out for validation by \
                             valid_fraction {}; prepare more documents or lower valid_fraction",
                            prefix.display(),
                            cfg.valid_fraction
                        ),
                    });
                }
                (
                    ds.docs(0..n - n_valid).to_vec(),
                    ds.docs(n - n_valid..n).to_vec(),
                )
            }
            source => {
                let docs = raw_documents(source)?.expect("text-like source");
                let mut all = Vec::new();
                for d in &docs {
                    all.extend(tokenizer.encode(d)?);
                    all.extend(tokenizer.eod_token());
                }
                if let Some(&bad) = all.iter().find(|&&t| t as usize >= vocab) {
                    return Err(DataError::TokenOutOfRange {
                        context: "tokenized source".into(),
                        token: bad.into(),
                        vocab_size: vocab,
                        hint: "the tokenizer produced an id outside its own vocabulary".into(),
                    });
                }
                let cut = (all.len() as f64 * (1.0 - cfg.valid_fraction)) as usize;
                let valid = all.split_off(cut);
                (all, valid)
            }
        };
        Corpus::from_splits(train, valid, cfg.seq_len, cfg.batch_size, vocab)
    }

    /// A corpus from ready token streams (checks that each holds one window).
    pub fn from_splits(
        train: Vec<u32>,
        valid: Vec<u32>,
        seq_len: usize,
        batch_size: usize,
        vocab_size: usize,
    ) -> Result<Corpus> {
        let needed = seq_len + 1;
        for (split, toks) in [("train", &train), ("validation", &valid)] {
            if toks.len() < needed {
                return Err(DataError::SplitTooShort {
                    split,
                    tokens: toks.len(),
                    needed,
                    hint: "use more data, a smaller seq_len, or adjust valid_fraction".into(),
                });
            }
        }
        Ok(Corpus {
            train: train.into(),
            valid: valid.into(),
            seq_len,
            batch_size,
            vocab_size,
        })
    }

    /// Training tokens.
    pub fn train_tokens(&self) -> &[u32] {
        &self.train
    }

    /// Validation tokens.
    pub fn valid_tokens(&self) -> &[u32] {
        &self.valid
    }

    /// Vocabulary size of the tokenizer the corpus was loaded with.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// A fresh shuffling sampler over the training windows.
    pub fn train_sampler(&self, seed: u64) -> Result<Sampler> {
        Sampler::new(self.train.clone(), self.seq_len, self.batch_size, seed)
    }

    /// Up to `max_batches` validation batches, in order, identical on every call.
    pub fn valid_batches(&self, max_batches: usize) -> Vec<Batch> {
        valid_batches(&self.valid, self.seq_len, self.batch_size, max_batches)
    }
}

#[cfg(test)]
mod tests {
    use super::super::indexed::dataset_paths;
    use super::super::prepare::{PrepareOptions, prepare_data};
    use super::*;

    fn cfg(source: SourceConfig, tokenizer: TokenizerConfig) -> DataConfig {
        DataConfig {
            tokenizer,
            source,
            valid_fraction: 0.1,
            seq_len: 16,
            batch_size: 4,
            shuffle_seed: None,
        }
    }

    #[test]
    fn synthetic_byte_corpus_holds_out_the_tail() {
        let c = cfg(
            SourceConfig::Synthetic {
                seed: 1,
                bytes: 10_000,
            },
            TokenizerConfig::Byte {},
        );
        let corpus = Corpus::load(&c, &Tokenizer::Byte).unwrap();
        let text = synthetic_text(1, 10_000);
        assert_eq!(
            corpus.train_tokens().len() + corpus.valid_tokens().len(),
            10_000
        );
        assert_eq!(corpus.valid_tokens().len(), 1_000);
        let all: Vec<u32> = corpus
            .train_tokens()
            .iter()
            .chain(corpus.valid_tokens())
            .copied()
            .collect();
        assert_eq!(all, Tokenizer::Byte.encode(&text).unwrap());
        let vb = corpus.valid_batches(100);
        assert_eq!(vb.iter().map(|b| b.batch_size).sum::<usize>(), 1_000 / 17);
        assert_eq!(vb, corpus.valid_batches(100));
        let mut s = corpus.train_sampler(0).unwrap();
        assert_eq!(s.num_windows(), 9_000 / 17);
        assert!(s.next_batch().tokens.iter().all(|&t| (0..256).contains(&t)));
    }

    #[test]
    fn too_short_split_says_how_many_tokens() {
        let mut c = cfg(
            SourceConfig::Synthetic {
                seed: 1,
                bytes: 100,
            },
            TokenizerConfig::Byte {},
        );
        c.seq_len = 50;
        let e = Corpus::load(&c, &Tokenizer::Byte).unwrap_err().to_string();
        assert!(
            e.contains("validation split has 10 tokens") && e.contains("at least 51"),
            "{e}"
        );
    }

    #[test]
    fn jsonl_documents_are_separated_by_eod() {
        let dir = tempfile::tempdir().unwrap();
        let tok = Tokenizer::train_bpe(
            ["hello world\n", "bye world\n"].into_iter(),
            270,
            &dir.path().join("t.json"),
        )
        .unwrap();
        let eod = tok.eod_token().unwrap();
        let p = dir.path().join("d.jsonl");
        let lines: String = (0..40)
            .map(|i| format!("{{\"text\": \"hello world number {i}\"}}\n"))
            .collect();
        std::fs::write(&p, lines).unwrap();
        let mut c = cfg(
            SourceConfig::Jsonl {
                path: p,
                text_key: "text".into(),
            },
            TokenizerConfig::Byte {},
        );
        c.seq_len = 8;
        let corpus = Corpus::load(&c, &tok).unwrap();
        let all: Vec<u32> = corpus
            .train_tokens()
            .iter()
            .chain(corpus.valid_tokens())
            .copied()
            .collect();
        assert_eq!(all.iter().filter(|&&t| t == eod).count(), 40);
        assert_eq!(*all.last().unwrap(), eod);
        let first_doc: Vec<u32> = all.iter().copied().take_while(|&t| t != eod).collect();
        assert_eq!(tok.decode(&first_doc).unwrap(), "hello world number 0");
    }

    #[test]
    fn indexed_source_holds_out_last_documents() {
        let dir = tempfile::tempdir().unwrap();
        let inputs: Vec<_> = (0..10)
            .map(|i| {
                let p = dir.path().join(format!("{i}.txt"));
                std::fs::write(&p, format!("{i}").repeat(20 + i)).unwrap();
                p
            })
            .collect();
        let prefix = dir.path().join("ds");
        prepare_data(
            &inputs,
            &PrepareOptions::new(None),
            &Tokenizer::Byte,
            &prefix,
        )
        .unwrap();
        let mut c = cfg(
            SourceConfig::Indexed {
                prefix: prefix.clone(),
            },
            TokenizerConfig::Byte {},
        );
        c.valid_fraction = 0.15; // ceil(1.5) = 2 documents
        let corpus = Corpus::load(&c, &Tokenizer::Byte).unwrap();
        assert_eq!(
            corpus.valid_tokens(),
            [b"8".repeat(28), b"9".repeat(29)]
                .concat()
                .iter()
                .map(|&b| b as u32)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            corpus.train_tokens().len(),
            (0..8).map(|i| 20 + i).sum::<usize>()
        );

        // A missing index is an error naming the file.
        std::fs::remove_file(dataset_paths(&prefix).1).unwrap();
        assert!(
            Corpus::load(&c, &Tokenizer::Byte)
                .unwrap_err()
                .to_string()
                .contains("ds.idx")
        );
    }

    #[test]
    fn bpe_is_trained_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bpe/tokenizer.json");
        let c = cfg(
            SourceConfig::Synthetic {
                seed: 2,
                bytes: 30_000,
            },
            TokenizerConfig::Bpe { vocab_size: 400 },
        );
        let t1 = build_tokenizer(&c, &path).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let t2 = build_tokenizer(&c, &path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            mtime,
            "not retrained"
        );
        let sample = synthetic_text(5, 2_000);
        assert_eq!(t1.encode(&sample).unwrap(), t2.encode(&sample).unwrap());
        let smaller = cfg(
            SourceConfig::Synthetic {
                seed: 2,
                bytes: 30_000,
            },
            TokenizerConfig::Bpe { vocab_size: 300 },
        );
        let e = build_tokenizer(&smaller, &path).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("vocab_size is 300"),
            "{e}"
        );
        let corpus = Corpus::load(&c, &t1).unwrap();
        assert!(
            corpus.train_tokens().len() < 27_000,
            "BPE compresses the text"
        );
    }
}
