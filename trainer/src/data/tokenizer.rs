//! Tokenizers: the built-in byte-level one, Hugging Face `tokenizer.json`, and byte-level BPE
//! trained with the `tokenizers` crate.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

use super::error::{DataError, Result};

/// End-of-document token of the BPE tokenizers Switchyard trains.
pub const BPE_EOD_TOKEN: &str = "<|endoftext|>";

/// The byte tokenizer's document separator in `prepare-data`: byte 0xFF, which never occurs
/// in UTF-8 text, so it cannot be mistaken for text (decoded, it is U+FFFD).
pub const BYTE_EOD: u32 = 0xFF;

/// End-of-document tokens looked for among a `tokenizer.json`'s special tokens when its
/// `tokenizer_config.json` names no `eos_token`, in this order.
const EOD_NAMES: [&str; 5] = [
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
];

/// A tokenizer: maps text to token ids and back.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// Ids 0..=255 are the bytes of the UTF-8 text; no special tokens.
    Byte,
    /// A Hugging Face tokenizer (loaded from a `tokenizer.json`, or trained BPE).
    HuggingFace(HfTokenizer),
}

/// A loaded Hugging Face tokenizer plus the facts Switchyard needs about it.
#[derive(Debug, Clone)]
pub struct HfTokenizer {
    inner: Box<tokenizers::Tokenizer>,
    path: PathBuf,
    vocab_size: usize,
    eod: Option<u32>,
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. `eod_token`, if given, must be in its vocabulary.
    pub fn from_hf_file(path: &Path, eod_token: Option<&str>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
            path: Some(path.to_path_buf()),
            message: format!("cannot load tokenizer.json: {e}; check that the file is a Hugging Face tokenizer.json"),
        })?;
        // Ids can have gaps (added tokens), so the embedding must cover the largest id.
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0);
        if vocab_size == 0 {
            return Err(DataError::Tokenizer {
                path: Some(path.to_path_buf()),
                message: "the vocabulary is empty; use a trained tokenizer.json".into(),
            });
        }
        let eod = match eod_token {
            None => None,
            Some(t) => Some(inner.token_to_id(t).ok_or_else(|| DataError::Tokenizer {
                path: Some(path.to_path_buf()),
                message: format!(
                    "eod_token {t:?} is not in the vocabulary; name a token that exists \
                     (e.g. \"<|endoftext|>\" or \"</s>\") or remove eod_token"
                ),
            })?),
        };
        Ok(Tokenizer::HuggingFace(HfTokenizer {
            inner: Box::new(inner),
            path: path.to_path_buf(),
            vocab_size,
            eod,
        }))
    }

    /// Trains a byte-level BPE of `vocab_size` tokens (256 byte tokens, [`BPE_EOD_TOKEN`] and
    /// merges) on `texts`, saves it to `save_path` (written to a temporary name, then renamed)
    /// and returns the tokenizer loaded back from that file, so a later run that loads the
    /// file gets exactly the same tokenizer.
    pub fn train_bpe<I, S>(texts: I, vocab_size: usize, save_path: &Path) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size < super::config::MIN_BPE_VOCAB {
            return Err(DataError::Tokenizer {
                path: None,
                message: format!(
                    "BPE vocab_size {vocab_size} is below {} (256 bytes + end-of-document)",
                    super::config::MIN_BPE_VOCAB
                ),
            });
        }
        let terr = |message: String| DataError::Tokenizer {
            path: Some(save_path.to_path_buf()),
            message,
        };
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(0)
            .initial_alphabet(alphabet)
            .special_tokens(vec![AddedToken::from(BPE_EOD_TOKEN, true)])
            .build();
        // No prefix space and no normalizer, so decode(encode(text)) == text.
        let byte_level = ByteLevel::new(false, false, true);
        let mut tk = TokenizerBuilder::<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)))
        .with_post_processor(None)
        .with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)))
        .build()
        .map_err(|e| terr(format!("cannot build the BPE tokenizer: {e}")))?;
        tk.train(&mut trainer, texts)
            .map_err(|e| terr(format!("BPE training failed: {e}")))?;

        if let Some(dir) = save_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io("create directory", dir, e))?;
        }
        let tmp = tmp_path(save_path);
        tk.save(&tmp, true).map_err(|e| {
            terr(format!(
                "cannot save the trained tokenizer to {}: {e}",
                tmp.display()
            ))
        })?;
        std::fs::rename(&tmp, save_path)
            .map_err(|e| DataError::io("rename into place", save_path, e))?;
        Self::from_hf_file(save_path, Some(BPE_EOD_TOKEN))
    }

    /// Number of token ids (largest id + 1).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte => 256,
            Tokenizer::HuggingFace(h) => h.vocab_size,
        }
    }

    /// Token appended after each document, if the tokenizer has one.
    pub fn eod_token(&self) -> Option<u32> {
        match self {
            Tokenizer::Byte => None,
            Tokenizer::HuggingFace(h) => h.eod,
        }
    }

    /// The token `prepare-data` appends after each document, and where it comes from (for
    /// the log): the byte tokenizer's [`BYTE_EOD`]; a Hugging Face tokenizer's configured
    /// `eod_token`, else the `eos_token` of the `tokenizer_config.json` beside its
    /// `tokenizer.json`, else the first of [`EOD_NAMES`] among its special tokens. An error
    /// when it has none of them, saying how to name one.
    pub fn document_separator(&self) -> Result<(u32, String)> {
        let h = match self {
            Tokenizer::Byte => {
                return Ok((
                    BYTE_EOD,
                    "byte 0xFF (id 255: the byte tokenizer's separator, never part of UTF-8 text)"
                        .into(),
                ));
            }
            Tokenizer::HuggingFace(h) => h,
        };
        let name = |id: u32| h.inner.id_to_token(id).unwrap_or_default();
        if let Some(id) = h.eod {
            return Ok((id, format!("{:?} (id {id}, as named)", name(id))));
        }
        let config = h.path.with_file_name("tokenizer_config.json");
        if let Some(eos) = eos_of_tokenizer_config(&config) {
            let id = h.inner.token_to_id(&eos).ok_or_else(|| DataError::Tokenizer {
                path: Some(config.clone()),
                message: format!(
                    "eos_token {eos:?} is not in the vocabulary of {}; name the end-of-document \
                     token with --eod-token",
                    h.path.display()
                ),
            })?;
            return Ok((
                id,
                format!("{eos:?} (id {id}, eos_token of {})", config.display()),
            ));
        }
        let specials = h.inner.get_added_tokens_decoder();
        for eod in EOD_NAMES {
            if let Some((&id, _)) = specials.iter().find(|(_, t)| t.special && t.content == eod) {
                return Ok((
                    id,
                    format!("{eod:?} (id {id}, a special token of the tokenizer)"),
                ));
            }
        }
        Err(DataError::Tokenizer {
            path: Some(h.path.clone()),
            message: format!(
                "no end-of-document token found: no eos_token in {} and none of the special \
                 tokens {EOD_NAMES:?}; name one with --eod-token TOKEN, or pass --no-eod to \
                 write the documents back to back",
                config.display()
            ),
        })
    }

    /// The `tokenizer.json` this tokenizer was loaded from, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Tokenizer::Byte => None,
            Tokenizer::HuggingFace(h) => Some(&h.path),
        }
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Byte => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::HuggingFace(h) => h
                .inner
                .encode_fast(text, false) // no offsets: only the ids are kept
                .map(|enc| enc.get_ids().to_vec())
                .map_err(|e| DataError::Tokenizer {
                    path: Some(h.path.clone()),
                    message: format!("encoding failed: {e}"),
                }),
        }
    }

    /// Text of `ids`; invalid UTF-8 from byte tokens is replaced (lossy).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Byte => {
                let bytes = ids
                    .iter()
                    .map(|&id| {
                        u8::try_from(id).map_err(|_| DataError::TokenOutOfRange {
                            context: "byte tokenizer decode".into(),
                            token: id.into(),
                            vocab_size: 256,
                            hint: "the ids were not produced by the byte tokenizer".into(),
                        })
                    })
                    .collect::<Result<Vec<u8>>>()?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::HuggingFace(h) => {
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= h.vocab_size) {
                    return Err(DataError::TokenOutOfRange {
                        context: format!("decode with {}", h.path.display()),
                        token: bad.into(),
                        vocab_size: h.vocab_size,
                        hint: "the ids were not produced by this tokenizer".into(),
                    });
                }
                h.inner
                    .decode(ids, false)
                    .map_err(|e| DataError::Tokenizer {
                        path: Some(h.path.clone()),
                        message: format!("decoding failed: {e}"),
                    })
            }
        }
    }
}

/// The `eos_token` of a `tokenizer_config.json` (a string, or an object with `content`);
/// `None` when the file is absent, unreadable or names none.
fn eos_of_tokenizer_config(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    match value.get("eos_token")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `path` with `.tmp` appended to the file name (same directory, so rename is atomic).
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(format!(".tmp{}", std::process::id()));
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "the cat sat on the mat. the cats sat on the mats.\n\
        a dog runs in the park; dogs run in parks. naïve café – ünïcödé ✓\n";

    #[test]
    fn byte_tokenizer_round_trips_and_has_no_eod() {
        let t = Tokenizer::Byte;
        let ids = t.encode(SAMPLE).unwrap();
        assert_eq!(ids.len(), SAMPLE.len());
        assert!(ids.iter().all(|&i| i < 256));
        assert_eq!(t.decode(&ids).unwrap(), SAMPLE);
        assert_eq!(t.eod_token(), None);
        assert_eq!(t.vocab_size(), 256);
        assert!(t.decode(&[300]).is_err());
    }

    #[test]
    fn bpe_trains_saves_and_loads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tokenizer.json");
        let lines: Vec<String> = (0..50).map(|i| format!("{SAMPLE} line {i}")).collect();
        let trained = Tokenizer::train_bpe(lines.iter(), 300, &path).unwrap();
        assert!(path.is_file());
        assert!(trained.vocab_size() <= 300 && trained.vocab_size() > 257);
        let eod = trained
            .eod_token()
            .expect("trained BPE has an end-of-document token");
        assert!((eod as usize) < trained.vocab_size());

        let loaded = Tokenizer::from_hf_file(&path, Some(BPE_EOD_TOKEN)).unwrap();
        let text = "the cats sat in the park. ünïcödé ✓ unseen words zq";
        let a = trained.encode(text).unwrap();
        let b = loaded.encode(text).unwrap();
        assert_eq!(a, b);
        // Merges were learned: frequent text compresses below one token per byte.
        assert!(trained.encode(SAMPLE).unwrap().len() < SAMPLE.len() / 2);
        assert_eq!(loaded.decode(&b).unwrap(), text);
        assert_eq!(loaded.vocab_size(), trained.vocab_size());
        assert_eq!(loaded.eod_token(), Some(eod));
    }

    #[test]
    fn document_separators_are_found_or_their_absence_explained() {
        assert_eq!(Tokenizer::Byte.document_separator().unwrap().0, BYTE_EOD);
        // UTF-8 text never encodes to the byte separator.
        assert!(!Tokenizer::Byte.encode(SAMPLE).unwrap().contains(&BYTE_EOD));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let trained = Tokenizer::train_bpe(std::iter::once(SAMPLE), 280, &path).unwrap();
        let eod = trained.eod_token().unwrap();
        // Loaded without naming it: found among the special tokens.
        let loaded = Tokenizer::from_hf_file(&path, None).unwrap();
        let (id, how) = loaded.document_separator().unwrap();
        assert_eq!(id, eod);
        assert!(
            how.contains("<|endoftext|>") && how.contains("special token"),
            "{how}"
        );
        // tokenizer_config.json's eos_token comes first.
        let other = loaded.encode("a").unwrap()[0];
        let name = match &loaded {
            Tokenizer::HuggingFace(h) => h.inner.id_to_token(other).unwrap(),
            Tokenizer::Byte => unreachable!(),
        };
        let config = dir.path().join("tokenizer_config.json");
        std::fs::write(
            &config,
            serde_json::json!({"eos_token": {"content": name}}).to_string(),
        )
        .unwrap();
        let (id, how) = loaded.document_separator().unwrap();
        assert_eq!(id, other);
        assert!(how.contains("tokenizer_config.json"), "{how}");
        // A tokenizer without any: the error says how to name one or go without.
        std::fs::remove_file(&config).unwrap();
        let json = std::fs::read_to_string(&path)
            .unwrap()
            .replace("<|endoftext|>", "<|something|>");
        std::fs::write(&path, json).unwrap();
        let e = Tokenizer::from_hf_file(&path, None)
            .unwrap()
            .document_separator()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--eod-token") && e.contains("--no-eod"), "{e}");
    }

    #[test]
    fn hf_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let err = Tokenizer::from_hf_file(&missing, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.json"), "{err}");

        let path = dir.path().join("tok.json");
        Tokenizer::train_bpe(std::iter::once(SAMPLE), 280, &path).unwrap();
        let err = Tokenizer::from_hf_file(&path, Some("<no-such-token>"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("<no-such-token>") && err.contains("tok.json"),
            "{err}"
        );
    }
}
