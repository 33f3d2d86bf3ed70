//! Loading a source into train / validation token streams.

use std::path::Path;
use std::sync::Arc;

use super::blend::{BlendSampler, blend_valid_rows, normalised, source_seed};
use super::config::{DataConfig, SourceConfig, TokenizerConfig};
use super::error::{DataError, Result};
use super::indexed::{IndexedDataset, TokenDtype};
use super::sampler::{Batch, Sampler};
use super::source::{read_jsonl, read_text_file};
use super::synthetic::synthetic_text;
use super::tokenizer::{BPE_EOD_TOKEN, Tokenizer};

/// Raw documents of a text-like source (`None` for an indexed source, which is pre-tokenized).
pub fn raw_documents(source: &SourceConfig) -> Result<Option<Vec<String>>> {
    Ok(Some(match source {
        SourceConfig::Synthetic { seed, bytes } => vec![synthetic_text(*seed, *bytes)],
        SourceConfig::Text { path } => vec![read_text_file(path)?],
        SourceConfig::Jsonl { path, text_key } => read_jsonl(path, text_key)?,
        SourceConfig::Indexed { .. } | SourceConfig::Blend { .. } => return Ok(None),
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

/// One source's train and validation token streams.
#[derive(Debug, Clone)]
pub struct CorpusSource {
    /// Name in metrics and logs (a blend's `name`; `data` for a single source).
    pub name: String,
    /// Blend weight as configured (1 for a single source; normalised by the sampler).
    pub weight: f64,
    pub train: Arc<[u32]>,
    pub valid: Arc<[u32]>,
}

/// Train and validation token streams of each source plus the batch geometry.
#[derive(Debug, Clone)]
pub struct Corpus {
    sources: Vec<CorpusSource>,
    seq_len: usize,
    batch_size: usize,
    vocab_size: usize,
}

/// An indexed dataset's (train, validation) split: its last `valid_fraction` of the
/// documents (rounded up) is held out. `key`: the config key of its prefix, for errors.
fn indexed_splits(
    prefix: &Path,
    key: &str,
    cfg: &DataConfig,
    vocab: usize,
) -> Result<(Vec<u32>, Vec<u32>, TokenDtype)> {
    let ds = IndexedDataset::open(prefix)?;
    if let Some(max) = ds.max_token().filter(|&m| m as usize >= vocab) {
        return Err(DataError::TokenOutOfRange {
            context: format!("indexed dataset {} (data.{key})", prefix.display()),
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
                "{} (data.{key}) has only {n} documents, all of them held out for validation \
                 by valid_fraction {}; prepare more documents or lower valid_fraction",
                prefix.display(),
                cfg.valid_fraction
            ),
        });
    }
    Ok((
        ds.docs(0..n - n_valid).to_vec(),
        ds.docs(n - n_valid..n).to_vec(),
        ds.dtype(),
    ))
}

impl Corpus {
    /// Loads and tokenizes the configured source and splits it.
    ///
    /// Text, JSONL and synthetic sources: documents are tokenized and concatenated (each
    /// followed by the tokenizer's end-of-document token, if it has one) and the last
    /// `valid_fraction` of the tokens is the validation split (a contiguous tail, like
    /// nanoGPT). Indexed sources: the last `valid_fraction` of the documents (rounded up) is
    /// the validation split; a blend splits each of its datasets so. Every split must hold
    /// at least `seq_len + 1` tokens.
    pub fn load(cfg: &DataConfig, tokenizer: &Tokenizer) -> Result<Corpus> {
        check_config(cfg)?;
        let vocab = tokenizer.vocab_size();
        let (train, valid) = match &cfg.source {
            SourceConfig::Indexed { prefix } => {
                let (train, valid, _) = indexed_splits(prefix, "source.prefix", cfg, vocab)?;
                (train, valid)
            }
            SourceConfig::Blend { sources } => {
                let mut parts = Vec::with_capacity(sources.len());
                let mut first_dtype = None;
                for (i, s) in sources.iter().enumerate() {
                    let key = format!("source.sources[{i}].prefix");
                    let (train, valid, dtype) = indexed_splits(&s.prefix, &key, cfg, vocab)?;
                    // The dtype follows the preparing tokenizer's vocabulary size: a
                    // different one means a different tokenizer, whose ids mean other text.
                    let (first, first_dtype) = *first_dtype.get_or_insert((0, dtype));
                    if dtype != first_dtype {
                        return Err(DataError::InvalidConfig {
                            problems: vec![(
                                key,
                                format!(
                                    "{} holds {dtype:?} token ids but sources[{first}] holds \
                                     {first_dtype:?}: they were prepared with tokenizers of \
                                     different vocabulary sizes; prepare every source with the \
                                     configured tokenizer",
                                    s.prefix.display()
                                ),
                            )],
                        });
                    }
                    let name = s.name();
                    parts.push(
                        CorpusSource {
                            name: name.clone(),
                            weight: s.weight,
                            train: train.into(),
                            valid: valid.into(),
                        }
                        .checked(cfg.seq_len, Some(&format!("source {name} (data.{key})")))?,
                    );
                }
                return Ok(Corpus {
                    sources: parts,
                    seq_len: cfg.seq_len,
                    batch_size: cfg.batch_size,
                    vocab_size: vocab,
                });
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

    /// A single-source corpus from ready token streams (checks that each holds one window).
    pub fn from_splits(
        train: Vec<u32>,
        valid: Vec<u32>,
        seq_len: usize,
        batch_size: usize,
        vocab_size: usize,
    ) -> Result<Corpus> {
        let source = CorpusSource {
            name: "data".into(),
            weight: 1.0,
            train: train.into(),
            valid: valid.into(),
        }
        .checked(seq_len, None)?;
        Ok(Corpus {
            sources: vec![source],
            seq_len,
            batch_size,
            vocab_size,
        })
    }

    /// The sources (one unless the config is a blend).
    pub fn sources(&self) -> &[CorpusSource] {
        &self.sources
    }

    /// Training tokens of the first source (the only one unless a blend).
    pub fn train_tokens(&self) -> &[u32] {
        &self.sources[0].train
    }

    /// Validation tokens of the first source (the only one unless a blend).
    pub fn valid_tokens(&self) -> &[u32] {
        &self.sources[0].valid
    }

    /// Vocabulary size of the tokenizer the corpus was loaded with.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// A fresh shuffling sampler over the training windows of every source, mixed by
    /// weight (see `blend.rs`); `seed` is the data seed (each source of a blend derives its
    /// own from it).
    pub fn train_sampler(&self, seed: u64) -> Result<BlendSampler> {
        let k = self.sources.len();
        let parts = self
            .sources
            .iter()
            .enumerate()
            .map(|(j, s)| {
                let sampler = Sampler::new(
                    s.train.clone(),
                    self.seq_len,
                    self.batch_size,
                    source_seed(seed, j, k),
                )?;
                Ok((s.name.clone(), s.weight, sampler))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BlendSampler::new(parts, self.seq_len, self.batch_size))
    }

    /// Up to `max_batches` validation batches, identical on every call: the held-out
    /// windows in order, a blend's mixed by weight until every source's are read (see
    /// [`blend_valid_rows`]), with each row's source.
    pub fn valid_set(&self, max_batches: usize) -> ValidSet {
        let sources: Vec<(&[u32], f64)> = self
            .sources
            .iter()
            .map(|s| (&s.valid[..], s.weight))
            .collect();
        let max_rows = max_batches.saturating_mul(self.batch_size);
        let rows = blend_valid_rows(&sources, self.seq_len + 1, max_rows);
        let weights = normalised(&self.sources.iter().map(|s| s.weight).collect::<Vec<_>>());
        let chunks = rows.chunks(self.batch_size.max(1));
        ValidSet {
            sources: self
                .sources
                .iter()
                .map(|s| s.name.clone())
                .zip(weights)
                .collect(),
            batches: chunks
                .clone()
                .map(|chunk| Batch {
                    tokens: chunk
                        .iter()
                        .flat_map(|(_, w)| w.iter().map(|&t| i64::from(t)))
                        .collect(),
                    batch_size: chunk.len(),
                    seq_len: self.seq_len,
                })
                .collect(),
            row_sources: chunks
                .map(|chunk| chunk.iter().map(|(j, _)| *j).collect())
                .collect(),
        }
    }
}

/// The validation batches and the source of each of their rows. A blend's validation loss
/// is the weighted mean of its sources' mean losses, so it weighs them as training does
/// whatever the mix of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSet {
    /// (name, normalised weight) of each source (`data`, 1 for a single source).
    pub sources: Vec<(String, f64)>,
    pub batches: Vec<Batch>,
    /// Per batch, the source index of each of its rows.
    pub row_sources: Vec<Vec<usize>>,
}

impl ValidSet {
    /// The names of the sources none of whose rows are in the batches.
    pub fn unread_sources(&self) -> Vec<&str> {
        self.sources
            .iter()
            .enumerate()
            .filter(|(j, _)| !self.row_sources.iter().flatten().any(|r| r == j))
            .map(|(_, (name, _))| name.as_str())
            .collect()
    }

    /// Keeps only the first `rows` rows of every batch that has more than a multiple of
    /// `multiple` of them, then drops the batches left without rows.
    pub fn trim_to_multiple(&mut self, multiple: usize) {
        for (batch, sources) in self.batches.iter_mut().zip(&mut self.row_sources) {
            let keep = batch.batch_size - batch.batch_size % multiple;
            if keep != batch.batch_size {
                *batch = batch.rows(0..keep);
                sources.truncate(keep);
            }
        }
        let mut sources = std::mem::take(&mut self.row_sources).into_iter();
        let (batches, row_sources) = std::mem::take(&mut self.batches)
            .into_iter()
            .zip(&mut sources)
            .filter(|(b, _)| b.batch_size > 0)
            .unzip();
        (self.batches, self.row_sources) = (batches, row_sources);
    }
}

impl CorpusSource {
    /// Itself if both splits hold a window of `seq_len + 1` tokens; `what` (a blend's
    /// source) leads the hint.
    fn checked(self, seq_len: usize, what: Option<&str>) -> Result<Self> {
        let needed = seq_len + 1;
        for (split, toks) in [("train", &self.train), ("validation", &self.valid)] {
            if toks.len() < needed {
                return Err(DataError::SplitTooShort {
                    split,
                    tokens: toks.len(),
                    needed,
                    hint: format!(
                        "{}use more data, a smaller seq_len, or adjust valid_fraction",
                        what.map(|w| format!("{w}: ")).unwrap_or_default()
                    ),
                });
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::BlendSource;
    use super::super::indexed::{dataset_paths, encode_index};
    use super::super::prepare::{PrepareOptions, prepare_data};
    use super::super::sampler::valid_batches;
    use super::*;
    use std::path::PathBuf;

    /// An indexed dataset `dir/name` prepared with the byte tokenizer from `docs`, one
    /// input file each.
    fn prepared(dir: &Path, name: &str, docs: impl Iterator<Item = Vec<u8>>) -> PathBuf {
        let inputs: Vec<PathBuf> = docs
            .enumerate()
            .map(|(i, doc)| {
                let p = dir.join(format!("{name}{i}.txt"));
                std::fs::write(&p, doc).unwrap();
                p
            })
            .collect();
        let prefix = dir.join(name);
        prepare_data(
            &inputs,
            &PrepareOptions::new(None),
            &Tokenizer::Byte,
            &prefix,
        )
        .unwrap();
        prefix
    }

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
        let set = corpus.valid_set(100);
        assert_eq!(set.sources, [("data".to_string(), 1.0)]);
        assert_eq!(
            set.batches,
            valid_batches(corpus.valid_tokens(), 16, 4, 100)
        );
        assert_eq!(
            set.batches.iter().map(|b| b.batch_size).sum::<usize>(),
            1_000 / 17
        );
        assert!(set.row_sources.iter().flatten().all(|&j| j == 0));
        assert_eq!(set, corpus.valid_set(100));
        // Ranks split the rows evenly: 58 windows = 14 full batches and one of 2 rows.
        let mut trimmed = set.clone();
        trimmed.trim_to_multiple(4);
        assert_eq!(trimmed.batches, set.batches[..14]);
        assert_eq!(trimmed.row_sources.len(), 14);
        let mut s = corpus.train_sampler(0).unwrap();
        assert_eq!(s.plan(0)[0].windows, 9_000 / 17);
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
        let prefix = prepared(
            dir.path(),
            "ds",
            (0..10).map(|i| format!("{i}").repeat(20 + i).into_bytes()),
        );
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
    fn a_blend_splits_each_dataset_and_refuses_another_token_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let prepare = |name: &str, docs: usize, byte: u8| {
            let prefix = prepared(dir.path(), name, (0..docs).map(|_| [byte].repeat(40)));
            BlendSource {
                prefix,
                weight: 1.0,
                name: None,
            }
        };
        let (mut a, mut b) = (prepare("a", 20, b'a'), prepare("b", 10, b'b'));
        (a.weight, b.weight) = (3.0, 1.0);
        let c = cfg(
            SourceConfig::Blend {
                sources: vec![a.clone(), b.clone()],
            },
            TokenizerConfig::Byte {},
        );
        let corpus = Corpus::load(&c, &Tokenizer::Byte).unwrap();
        let s = corpus.sources();
        // 40 tokens a document; 2 and 1 documents held out.
        assert_eq!((s[0].name.as_str(), s[0].weight), ("a", 3.0));
        assert_eq!((s[0].train.len(), s[0].valid.len()), (18 * 40, 2 * 40));
        assert_eq!((s[1].train.len(), s[1].valid.len()), (9 * 40, 40));
        let mut sampler = corpus.train_sampler(0).unwrap();
        let rows: Vec<i64> = (0..5)
            .flat_map(|_| {
                let b = sampler.next_batch();
                (0..b.batch_size).map(|i| b.row(i)[0]).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(sampler.taken(), [15, 5]);
        assert_eq!(rows.iter().filter(|&&t| t == i64::from(b'b')).count(), 5);
        // Validation: a's 4 held-out windows of 17 tokens (80 tokens) and b's 2 (40), mixed
        // a a b a a, then b once a has none left.
        let set = corpus.valid_set(100);
        assert_eq!(
            set.sources,
            [("a".to_string(), 0.75), ("b".to_string(), 0.25)]
        );
        assert_eq!(set.row_sources, [vec![0, 0, 1, 0], vec![0, 1]]);
        for (batch, sources) in set.batches.iter().zip(&set.row_sources) {
            for (i, &j) in sources.iter().enumerate() {
                assert_eq!(batch.row(i)[0], i64::from([b'a', b'b'][j]));
            }
        }
        assert_eq!(corpus.valid_set(1).row_sources, [vec![0, 0, 1, 0]]);
        assert!(set.unread_sources().is_empty());
        let mut trimmed = set.clone();
        trimmed.trim_to_multiple(3);
        assert_eq!(trimmed.row_sources, [vec![0, 0, 1]]);
        assert_eq!(trimmed.batches, [set.batches[0].rows(0..3)]);
        trimmed.trim_to_multiple(2);
        assert_eq!(trimmed.row_sources, [vec![0, 0]]);
        assert_eq!(trimmed.unread_sources(), ["b"]);

        // A dataset of int32 ids (prepared for a vocabulary above 65,500) is refused.
        let wide = dir.path().join("wide");
        let (bin, idx) = dataset_paths(&wide);
        let mut data = Vec::new();
        for _ in 0..10 * 41 {
            TokenDtype::I32.write(97, &mut data);
        }
        std::fs::write(bin, data).unwrap();
        std::fs::write(idx, encode_index(TokenDtype::I32, &[41; 10])).unwrap();
        let c = cfg(
            SourceConfig::Blend {
                sources: vec![
                    a,
                    BlendSource {
                        prefix: wide,
                        weight: 1.0,
                        name: None,
                    },
                ],
            },
            TokenizerConfig::Byte {},
        );
        let e = Corpus::load(&c, &Tokenizer::Byte).unwrap_err().to_string();
        assert!(
            e.contains("data.source.sources[1].prefix") && e.contains("I32") && e.contains("U16"),
            "{e}"
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
