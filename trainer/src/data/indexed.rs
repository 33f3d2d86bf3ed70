//! Megatron-LM indexed dataset (`PREFIX.bin` + `PREFIX.idx`), so data prepared for Megatron
//! can be trained on here and the other way round.
//!
//! Layout matched against `megatron/core/datasets/indexed_dataset.py` of NVIDIA/Megatron-LM
//! (`_IndexWriter` / `_IndexReader` / `IndexedDatasetBuilder`, commit 00caa53a, 2025), the
//! non-multimodal case. All integers little-endian.
//!
//! `PREFIX.bin`: the token ids of every sequence, back to back, in the index's dtype.
//!
//! `PREFIX.idx`:
//! | bytes   | field                                                                  |
//! |---------|------------------------------------------------------------------------|
//! | 9       | magic `b"MMIDIDX\x00\x00"`                                             |
//! | 8       | u64 version = 1                                                        |
//! | 1       | u8 dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16 |
//! | 8       | u64 sequence count S                                                   |
//! | 8       | u64 document count D (= number of documents + 1)                       |
//! | 4 * S   | int32 sequence lengths (tokens)                                        |
//! | 8 * S   | int64 sequence pointers (byte offsets into .bin)                       |
//! | 8 * D   | int64 document indices: 0, then the end sequence index of each document|
//!
//! Megatron's writer picks uint16 when the vocabulary has fewer than 65500 ids, else int32;
//! so does [`TokenDtype::for_vocab`]. A document may consist of several sequences (Megatron's
//! `--split-sentences`); [`IndexedDataset::doc`] returns all of them concatenated.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::{DataError, Result};

/// Magic bytes at the start of every `.idx` file.
pub const INDEX_MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
/// The only index version Megatron writes.
pub const INDEX_VERSION: u64 = 1;
const HEADER_LEN: usize = 9 + 8 + 1 + 8 + 8;

/// Element type of the token ids in `.bin` (Megatron's `DType` codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenDtype {
    /// code 1
    U8,
    /// code 2
    I8,
    /// code 3
    I16,
    /// code 4
    I32,
    /// code 5
    I64,
    /// code 8
    U16,
}

impl TokenDtype {
    /// Megatron's choice for a vocabulary of `vocab_size` ids: uint16 below 65500, else int32.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size < 65500 {
            TokenDtype::U16
        } else {
            TokenDtype::I32
        }
    }

    /// Megatron's numeric code.
    pub fn code(self) -> u8 {
        match self {
            TokenDtype::U8 => 1,
            TokenDtype::I8 => 2,
            TokenDtype::I16 => 3,
            TokenDtype::I32 => 4,
            TokenDtype::I64 => 5,
            TokenDtype::U16 => 8,
        }
    }

    /// The dtype of a Megatron code; `None` for unknown codes and float dtypes (6, 7).
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => TokenDtype::U8,
            2 => TokenDtype::I8,
            3 => TokenDtype::I16,
            4 => TokenDtype::I32,
            5 => TokenDtype::I64,
            8 => TokenDtype::U16,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TokenDtype::U8 | TokenDtype::I8 => 1,
            TokenDtype::I16 | TokenDtype::U16 => 2,
            TokenDtype::I32 => 4,
            TokenDtype::I64 => 8,
        }
    }

    /// Largest token id this dtype can hold (as stored by Switchyard: non-negative).
    pub fn max_id(self) -> u64 {
        match self {
            TokenDtype::U8 => u8::MAX as u64,
            TokenDtype::I8 => i8::MAX as u64,
            TokenDtype::I16 => i16::MAX as u64,
            TokenDtype::U16 => u16::MAX as u64,
            TokenDtype::I32 => i32::MAX as u64,
            TokenDtype::I64 => i64::MAX as u64,
        }
    }

    /// Decodes one element; `None` if it is negative or does not fit u32.
    fn read(self, b: &[u8]) -> Option<u32> {
        let v: i64 = match self {
            TokenDtype::U8 => b[0] as i64,
            TokenDtype::I8 => b[0] as i8 as i64,
            TokenDtype::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            TokenDtype::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
            TokenDtype::I32 => i32::from_le_bytes(b[..4].try_into().ok()?) as i64,
            TokenDtype::I64 => i64::from_le_bytes(b[..8].try_into().ok()?),
        };
        u32::try_from(v).ok()
    }

    /// Appends one element (the caller has checked `id <= max_id()`).
    pub(crate) fn write(self, id: u32, out: &mut Vec<u8>) {
        match self {
            TokenDtype::U8 => out.push(id as u8),
            TokenDtype::I8 => out.push(id as i8 as u8),
            TokenDtype::I16 => out.extend_from_slice(&(id as i16).to_le_bytes()),
            TokenDtype::U16 => out.extend_from_slice(&(id as u16).to_le_bytes()),
            TokenDtype::I32 => out.extend_from_slice(&(id as i32).to_le_bytes()),
            TokenDtype::I64 => out.extend_from_slice(&(id as i64).to_le_bytes()),
        }
    }
}

/// (`PREFIX.bin`, `PREFIX.idx`).
pub fn dataset_paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let with = |ext: &str| {
        let mut s = prefix.as_os_str().to_os_string();
        s.push(ext);
        PathBuf::from(s)
    };
    (with(".bin"), with(".idx"))
}

/// Encodes the `.idx` contents for documents of one sequence each with the given lengths.
pub(crate) fn encode_index(dtype: TokenDtype, doc_lengths: &[u64]) -> Vec<u8> {
    let s = doc_lengths.len();
    let mut out = Vec::with_capacity(HEADER_LEN + 20 * s + 8);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.push(dtype.code());
    out.extend_from_slice(&(s as u64).to_le_bytes());
    out.extend_from_slice(&(s as u64 + 1).to_le_bytes());
    for &len in doc_lengths {
        out.extend_from_slice(&(len as i32).to_le_bytes());
    }
    let mut ptr = 0i64;
    for &len in doc_lengths {
        out.extend_from_slice(&ptr.to_le_bytes());
        ptr += len as i64 * dtype.size() as i64;
    }
    for i in 0..=s as i64 {
        out.extend_from_slice(&i.to_le_bytes());
    }
    out
}

/// A Megatron indexed dataset read fully into memory.
#[derive(Debug, Clone)]
pub struct IndexedDataset {
    tokens: Vec<u32>,
    /// Token offset of each document start, plus the total at the end.
    doc_offsets: Vec<usize>,
    dtype: TokenDtype,
    num_sequences: usize,
}

/// Counts of an indexed dataset, for reports such as the `prepare-data` CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetStats {
    /// Documents.
    pub documents: usize,
    /// Sequences (equals documents unless split into sentences).
    pub sequences: usize,
    /// Tokens.
    pub tokens: usize,
    /// On-disk token dtype.
    pub dtype: TokenDtype,
    /// Size of `PREFIX.bin` in bytes.
    pub bin_bytes: u64,
}

impl std::fmt::Display for DatasetStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} documents, {} sequences, {} tokens ({:?}, {} bytes in .bin)",
            self.documents, self.sequences, self.tokens, self.dtype, self.bin_bytes
        )
    }
}

fn fmt_err(path: &Path, message: String) -> DataError {
    DataError::IndexedFormat {
        path: path.to_path_buf(),
        message,
    }
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}

impl IndexedDataset {
    /// Reads and validates `PREFIX.idx` and `PREFIX.bin`.
    pub fn open(prefix: &Path) -> Result<Self> {
        let (bin_path, idx_path) = dataset_paths(prefix);
        let idx =
            std::fs::read(&idx_path).map_err(|e| DataError::io("read index", &idx_path, e))?;
        let regen = "re-create it with prepare-data (or Megatron's preprocess_data.py)";
        if idx.len() < HEADER_LEN {
            return Err(fmt_err(
                &idx_path,
                format!(
                    "is {} bytes, shorter than the {HEADER_LEN}-byte header; {regen}",
                    idx.len()
                ),
            ));
        }
        if &idx[..9] != INDEX_MAGIC {
            return Err(fmt_err(
                &idx_path,
                format!(
                    "bad magic {:?} at byte 0 (expected {:?}); not a Megatron mmap indexed dataset index; {regen}",
                    String::from_utf8_lossy(&idx[..9]),
                    String::from_utf8_lossy(INDEX_MAGIC)
                ),
            ));
        }
        let version = read_u64(&idx, 9);
        if version != INDEX_VERSION {
            return Err(fmt_err(
                &idx_path,
                format!(
                    "unsupported version {version} at byte 9 (only {INDEX_VERSION} exists); {regen}"
                ),
            ));
        }
        let code = idx[17];
        let dtype = TokenDtype::from_code(code).ok_or_else(|| {
            fmt_err(
                &idx_path,
                format!(
                    "dtype code {code} at byte 17 is not an integer token type \
                     (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16); {regen}"
                ),
            )
        })?;
        let s64 = read_u64(&idx, 18);
        let d64 = read_u64(&idx, 26);
        let expected = (s64 as u128) * 12 + (d64 as u128) * 8 + HEADER_LEN as u128;
        if idx.len() as u128 != expected {
            let extra = if idx.len() as u128 == expected + s64 as u128 {
                " (this looks like a multimodal index with sequence modes, which is not supported)"
            } else {
                ""
            };
            return Err(fmt_err(
                &idx_path,
                format!(
                    "is {} bytes but a header with {s64} sequences and {d64} document indices needs \
                     {expected}{extra}; the file is truncated or corrupt; {regen}",
                    idx.len()
                ),
            ));
        }
        // The length check above bounds s and d by the file size, so they fit usize.
        let (s, d) = (s64 as usize, d64 as usize);
        let len_at = HEADER_LEN;
        let ptr_at = len_at + 4 * s;
        let doc_at = ptr_at + 8 * s;
        let mut seq_lens = Vec::with_capacity(s);
        let mut expect_ptr: i64 = 0;
        for i in 0..s {
            let off = len_at + 4 * i;
            let len = i32::from_le_bytes(idx[off..off + 4].try_into().expect("4 bytes"));
            if len < 0 {
                return Err(fmt_err(
                    &idx_path,
                    format!("sequence {i} has negative length {len} (byte {off}); {regen}"),
                ));
            }
            let poff = ptr_at + 8 * i;
            let ptr = read_u64(&idx, poff) as i64;
            if ptr != expect_ptr {
                return Err(fmt_err(
                    &idx_path,
                    format!(
                        "sequence {i} points to byte {ptr} of the .bin (index byte {poff}) but the \
                         sequences before it end at byte {expect_ptr}; non-contiguous data is not supported; {regen}"
                    ),
                ));
            }
            expect_ptr += len as i64 * dtype.size() as i64;
            seq_lens.push(len as usize);
        }
        if d == 0 {
            return Err(fmt_err(
                &idx_path,
                format!("has no document indices (needs at least the leading 0); {regen}"),
            ));
        }
        let mut doc_seq = Vec::with_capacity(d);
        for j in 0..d {
            let off = doc_at + 8 * j;
            let v = read_u64(&idx, off) as i64;
            let prev = doc_seq.last().copied().unwrap_or(0);
            let ok = if j == 0 {
                v == 0
            } else {
                v >= prev && v <= s as i64
            };
            if !ok {
                return Err(fmt_err(
                    &idx_path,
                    format!(
                        "document index {j} (byte {off}) is {v}; document indices must start at 0, \
                         never decrease and not exceed the sequence count {s}; {regen}"
                    ),
                ));
            }
            doc_seq.push(v);
        }
        if *doc_seq.last().expect("d >= 1") != s as i64 {
            return Err(fmt_err(
                &idx_path,
                format!(
                    "the last document index is {} but must equal the sequence count {s}; {regen}",
                    doc_seq[d - 1]
                ),
            ));
        }

        let bin = std::fs::read(&bin_path).map_err(|e| DataError::io("read data", &bin_path, e))?;
        let total_bytes = expect_ptr as u64;
        if bin.len() as u64 != total_bytes {
            return Err(fmt_err(
                &bin_path,
                format!(
                    "is {} bytes but {} describes {} tokens of {:?} = {total_bytes} bytes; \
                     the .bin is truncated or belongs to another index; {regen}",
                    bin.len(),
                    idx_path.display(),
                    total_bytes / dtype.size() as u64,
                    dtype
                ),
            ));
        }
        let mut tokens = Vec::with_capacity(bin.len() / dtype.size());
        for (i, chunk) in bin.chunks_exact(dtype.size()).enumerate() {
            let t = dtype.read(chunk).ok_or_else(|| {
                fmt_err(
                    &bin_path,
                    format!(
                        "token {i} (byte {}) is negative or above u32; {regen}",
                        i * dtype.size()
                    ),
                )
            })?;
            tokens.push(t);
        }
        // Token offset of each sequence start, then of each document start.
        let mut seq_offsets = Vec::with_capacity(s + 1);
        seq_offsets.push(0usize);
        for &l in &seq_lens {
            seq_offsets.push(seq_offsets.last().expect("nonempty") + l);
        }
        let doc_offsets = doc_seq.iter().map(|&k| seq_offsets[k as usize]).collect();
        Ok(IndexedDataset {
            tokens,
            doc_offsets,
            dtype,
            num_sequences: s,
        })
    }

    /// Number of documents.
    pub fn num_docs(&self) -> usize {
        self.doc_offsets.len() - 1
    }

    /// Tokens of document `i` (all its sequences); panics if `i >= num_docs()` like slice indexing.
    pub fn doc(&self, i: usize) -> &[u32] {
        &self.tokens[self.doc_offsets[i]..self.doc_offsets[i + 1]]
    }

    /// Tokens of documents `range`, concatenated.
    pub fn docs(&self, range: std::ops::Range<usize>) -> &[u32] {
        &self.tokens[self.doc_offsets[range.start]..self.doc_offsets[range.end]]
    }

    /// Total number of tokens.
    pub fn total_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// On-disk dtype.
    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    /// Largest token id, if any token exists.
    pub fn max_token(&self) -> Option<u32> {
        self.tokens.iter().copied().max()
    }

    /// Counts for reports.
    pub fn stats(&self) -> DatasetStats {
        DatasetStats {
            documents: self.num_docs(),
            sequences: self.num_sequences,
            tokens: self.total_tokens(),
            dtype: self.dtype,
            bin_bytes: (self.tokens.len() * self.dtype.size()) as u64,
        }
    }
}

/// Token counts of the indexed dataset at `prefix` (validates it fully).
pub fn dataset_stats(prefix: &Path) -> Result<DatasetStats> {
    Ok(IndexedDataset::open(prefix)?.stats())
}

/// Writes `bytes` to `path` and flushes it to disk.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| DataError::io("create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| DataError::io("write", path, e))?;
    f.sync_all().map_err(|e| DataError::io("sync", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_dataset(prefix: &Path, dtype: TokenDtype, docs: &[Vec<u32>]) {
        let (bin, idx) = dataset_paths(prefix);
        let mut data = Vec::new();
        for d in docs {
            for &t in d {
                dtype.write(t, &mut data);
            }
        }
        std::fs::write(bin, data).unwrap();
        let lens: Vec<u64> = docs.iter().map(|d| d.len() as u64).collect();
        std::fs::write(idx, encode_index(dtype, &lens)).unwrap();
    }

    #[test]
    fn megatron_header_layout_is_byte_exact() {
        // Two documents of 3 and 1 tokens, uint16: checked field by field against the
        // layout Megatron's _IndexWriter produces.
        let idx = encode_index(TokenDtype::U16, &[3, 1]);
        assert_eq!(&idx[0..9], b"MMIDIDX\x00\x00");
        assert_eq!(u64::from_le_bytes(idx[9..17].try_into().unwrap()), 1);
        assert_eq!(idx[17], 8);
        assert_eq!(u64::from_le_bytes(idx[18..26].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(idx[26..34].try_into().unwrap()), 3);
        let i32s: Vec<i32> = idx[34..42]
            .chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(i32s, [3, 1]);
        let i64s: Vec<i64> = idx[42..]
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(i64s, [0, 6, 0, 1, 2]); // pointers (bytes), then document indices
        assert_eq!(idx.len(), 34 + 2 * 4 + 2 * 8 + 3 * 8);
    }

    #[test]
    fn multi_sequence_documents_and_all_int_dtypes_read_back() {
        let dir = tempfile::tempdir().unwrap();
        for dtype in [
            TokenDtype::U8,
            TokenDtype::I16,
            TokenDtype::U16,
            TokenDtype::I32,
            TokenDtype::I64,
        ] {
            let prefix = dir.path().join(format!("d{}", dtype.code()));
            let docs = vec![vec![1, 2, 3], vec![], vec![7, 8]];
            write_dataset(&prefix, dtype, &docs);
            let ds = IndexedDataset::open(&prefix).unwrap();
            assert_eq!(ds.num_docs(), 3);
            for (i, d) in docs.iter().enumerate() {
                assert_eq!(ds.doc(i), &d[..]);
            }
            assert_eq!(ds.total_tokens(), 5);
        }
        // Hand-made index where document 0 spans two sequences (Megatron --split-sentences).
        let prefix = dir.path().join("split");
        let (bin, idx_path) = dataset_paths(&prefix);
        let mut idx = encode_index(TokenDtype::U16, &[2, 1, 2]);
        // Document indices become [0, 2, 3]: rewrite D and the tail.
        idx[26..34].copy_from_slice(&3u64.to_le_bytes());
        let tail_at = idx.len() - 4 * 8;
        idx.truncate(tail_at);
        for v in [0i64, 2, 3] {
            idx.extend_from_slice(&v.to_le_bytes());
        }
        std::fs::write(&idx_path, idx).unwrap();
        let data: Vec<u8> = [10u16, 11, 12, 13, 14]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        std::fs::write(&bin, data).unwrap();
        let ds = IndexedDataset::open(&prefix).unwrap();
        assert_eq!(ds.num_docs(), 2);
        assert_eq!(ds.doc(0), &[10, 11, 12]);
        assert_eq!(ds.doc(1), &[13, 14]);
        assert_eq!(ds.stats().sequences, 3);
    }

    #[test]
    fn corrupt_files_are_rejected_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("ds");
        write_dataset(&prefix, TokenDtype::U16, &[vec![1, 2, 3], vec![4, 5]]);
        let (bin, idx) = dataset_paths(&prefix);
        assert!(IndexedDataset::open(&prefix).is_ok());

        let good_bin = std::fs::read(&bin).unwrap();
        std::fs::write(&bin, &good_bin[..good_bin.len() - 2]).unwrap();
        let e = IndexedDataset::open(&prefix).unwrap_err().to_string();
        assert!(e.contains("ds.bin") && e.contains("truncated"), "{e}");
        std::fs::write(&bin, &good_bin).unwrap();

        let good_idx = std::fs::read(&idx).unwrap();
        let mut bad = good_idx.clone();
        bad[0] = b'X';
        std::fs::write(&idx, &bad).unwrap();
        let e = IndexedDataset::open(&prefix).unwrap_err().to_string();
        assert!(e.contains("ds.idx") && e.contains("magic"), "{e}");

        let mut bad = good_idx.clone();
        bad[17] = 7; // float32
        std::fs::write(&idx, &bad).unwrap();
        let e = IndexedDataset::open(&prefix).unwrap_err().to_string();
        assert!(e.contains("ds.idx") && e.contains("dtype code 7"), "{e}");

        std::fs::write(&idx, &good_idx[..good_idx.len() - 1]).unwrap();
        let e = IndexedDataset::open(&prefix).unwrap_err().to_string();
        assert!(e.contains("ds.idx") && e.contains("truncated"), "{e}");

        std::fs::remove_file(&idx).unwrap();
        let e = IndexedDataset::open(&prefix).unwrap_err().to_string();
        assert!(e.contains("ds.idx"), "{e}");
    }
}
