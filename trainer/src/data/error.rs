//! Errors of the data pipeline.

use std::path::PathBuf;

/// Everything that can go wrong while building tokenizers, preparing, loading or sampling data.
///
/// Every message says what was wrong, where (file, line or byte offset) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file system operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done, e.g. "read" or "create".
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The `data:` config node has out-of-range values or illegal combinations.
    #[error("invalid data config:\n{}", format_problems(.problems))]
    InvalidConfig {
        /// (key path relative to `data`, message with a hint) pairs.
        problems: Vec<(String, String)>,
    },

    /// A text file is not valid UTF-8.
    #[error(
        "{path}: not valid UTF-8 at byte offset {byte_offset}; convert the file to UTF-8 \
         (e.g. with iconv) before using it as training text"
    )]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Offset of the first invalid byte (in the decompressed text of a .gz / .zst file).
        byte_offset: usize,
    },

    /// A JSONL line is malformed.
    #[error("{path}:{line}: {message}")]
    Jsonl {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong and what to do.
        message: String,
    },

    /// A Parquet file cannot be read as documents.
    #[error("{path}: {message}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What is wrong (with the row group or row where known) and what to do.
        message: String,
    },

    /// A tokenizer could not be loaded, trained, saved or used.
    #[error("tokenizer error{}: {message}", path_suffix(.path))]
    Tokenizer {
        /// The tokenizer.json involved, if any.
        path: Option<PathBuf>,
        /// What is wrong and what to do.
        message: String,
    },

    /// A token id does not fit the tokenizer's vocabulary or the on-disk dtype.
    #[error("{context}: token id {token} is out of range (vocabulary size {vocab_size}); {hint}")]
    TokenOutOfRange {
        /// Where the token was found.
        context: String,
        /// The offending id.
        token: u64,
        /// Vocabulary size it was checked against.
        vocab_size: usize,
        /// What to do.
        hint: String,
    },

    /// A Megatron indexed dataset file (.idx or .bin) is malformed.
    #[error("{path}: {message}")]
    IndexedFormat {
        /// The .idx or .bin file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },

    /// A train or validation split is too short for one sequence.
    #[error(
        "the {split} split has {tokens} tokens but at least {needed} are needed \
         (one sequence of seq_len + 1 tokens); {hint}"
    )]
    SplitTooShort {
        /// "train" or "validation".
        split: &'static str,
        /// Tokens available.
        tokens: usize,
        /// Tokens needed.
        needed: usize,
        /// What to do.
        hint: String,
    },

    /// A saved sampler state does not belong to the current data.
    #[error("cannot restore the data sampler: {0}")]
    SamplerState(String),

    /// prepare-data was called with unusable arguments.
    #[error("prepare-data: {0}")]
    Prepare(String),
}

/// Result alias of the data pipeline.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

fn format_problems(problems: &[(String, String)]) -> String {
    problems
        .iter()
        .map(|(k, m)| format!("  data.{k}: {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" ({})", p.display()),
        None => String::new(),
    }
}
