//! `prepare-data`: tokenize raw text into a Megatron-LM indexed dataset (see [`super::indexed`]).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::error::{DataError, Result};
use super::indexed::{TokenDtype, dataset_paths, encode_index, write_synced};
use super::source::{InputFormat, read_documents};
use super::tokenizer::{Tokenizer, tmp_path};

/// What `prepare_data` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareReport {
    /// Documents written (one per text file, one per JSONL line).
    pub documents: usize,
    /// Tokens written, end-of-document tokens included.
    pub tokens: usize,
    /// Token dtype of the `.bin`.
    pub dtype: TokenDtype,
    /// The files written: `PREFIX.bin`, `PREFIX.idx`.
    pub files: Vec<PathBuf>,
}

impl std::fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} documents, {} tokens ({:?}) ->",
            self.documents, self.tokens, self.dtype
        )?;
        for p in &self.files {
            write!(f, " {}", p.display())?;
        }
        Ok(())
    }
}

/// Tokenizes `inputs` (one document per text file, one per JSONL line; the tokenizer's
/// end-of-document token, if it has one, is appended to each) and writes the Megatron-LM
/// indexed dataset `output_prefix.bin` / `.idx`.
///
/// Both files are written under temporary names and renamed at the end, `.idx` last (any
/// old `.idx` is removed first), so a crash never leaves a dataset that looks complete.
pub fn prepare_data(
    inputs: &[PathBuf],
    format: InputFormat,
    tokenizer: &Tokenizer,
    output_prefix: &Path,
) -> Result<PrepareReport> {
    if inputs.is_empty() {
        return Err(DataError::Prepare(
            "no input files given; pass at least one text or JSONL file".into(),
        ));
    }
    let (bin_path, idx_path) = dataset_paths(output_prefix);
    if let Some(dir) = output_prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io("create directory", dir, e))?;
    }
    let (bin_tmp, idx_tmp) = (tmp_path(&bin_path), tmp_path(&idx_path));
    let result = write_tmp(inputs, &format, tokenizer, &bin_tmp, &idx_tmp);
    let (documents, tokens, dtype) = match result {
        Ok(r) => r,
        Err(e) => {
            // Best effort: the temporary files are useless after a failure.
            let _ = std::fs::remove_file(&bin_tmp);
            let _ = std::fs::remove_file(&idx_tmp);
            return Err(e);
        }
    };
    match std::fs::remove_file(&idx_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DataError::io("remove old index", &idx_path, e)),
    }
    std::fs::rename(&bin_tmp, &bin_path)
        .map_err(|e| DataError::io("rename into place", &bin_path, e))?;
    std::fs::rename(&idx_tmp, &idx_path)
        .map_err(|e| DataError::io("rename into place", &idx_path, e))?;
    Ok(PrepareReport {
        documents,
        tokens,
        dtype,
        files: vec![bin_path, idx_path],
    })
}

fn write_tmp(
    inputs: &[PathBuf],
    format: &InputFormat,
    tokenizer: &Tokenizer,
    bin_tmp: &Path,
    idx_tmp: &Path,
) -> Result<(usize, usize, TokenDtype)> {
    let vocab = tokenizer.vocab_size();
    let dtype = TokenDtype::for_vocab(vocab);
    let eod = tokenizer.eod_token();
    let file = std::fs::File::create(bin_tmp).map_err(|e| DataError::io("create", bin_tmp, e))?;
    let mut out = BufWriter::new(file);
    let mut doc_lengths: Vec<u64> = Vec::new();
    let mut buf = Vec::new();
    for input in inputs {
        let docs = read_documents(input, format)?;
        for (i, doc) in docs.iter().enumerate() {
            let mut ids = tokenizer.encode(doc)?;
            ids.extend(eod);
            let where_ = || match format {
                InputFormat::Text => input.display().to_string(),
                InputFormat::Jsonl { .. } => {
                    format!("{} (document {} of the file)", input.display(), i + 1)
                }
            };
            if let Some(&bad) = ids
                .iter()
                .find(|&&t| t as usize >= vocab || t as u64 > dtype.max_id())
            {
                return Err(DataError::TokenOutOfRange {
                    context: where_(),
                    token: bad.into(),
                    vocab_size: vocab,
                    hint: "the tokenizer produced an id outside its own vocabulary; check the tokenizer.json".into(),
                });
            }
            if ids.len() > i32::MAX as usize {
                return Err(DataError::Prepare(format!(
                    "{}: {} tokens in one document exceed the int32 lengths of the index; split the document",
                    where_(),
                    ids.len()
                )));
            }
            buf.clear();
            for &t in &ids {
                dtype.write(t, &mut buf);
            }
            out.write_all(&buf)
                .map_err(|e| DataError::io("write", bin_tmp, e))?;
            doc_lengths.push(ids.len() as u64);
        }
    }
    let file = out
        .into_inner()
        .map_err(|e| DataError::io("write", bin_tmp, e.into_error()))?;
    file.sync_all()
        .map_err(|e| DataError::io("sync", bin_tmp, e))?;
    write_synced(idx_tmp, &encode_index(dtype, &doc_lengths))?;
    let tokens = doc_lengths.iter().sum::<u64>() as usize;
    Ok((doc_lengths.len(), tokens, dtype))
}

#[cfg(test)]
mod tests {
    use super::super::indexed::IndexedDataset;
    use super::*;

    #[test]
    fn prepare_then_read_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        let b = dir.path().join("b.txt");
        std::fs::write(&a, "first document ✓").unwrap();
        std::fs::write(&b, "second\nline").unwrap();
        let prefix = dir.path().join("out/ds");
        let tok = Tokenizer::Byte;
        let rep = prepare_data(&[a, b], InputFormat::Text, &tok, &prefix).unwrap();
        assert_eq!(rep.documents, 2);
        assert_eq!(rep.tokens, "first document ✓".len() + "second\nline".len());
        assert_eq!(rep.dtype, TokenDtype::U16);
        assert!(rep.files.iter().all(|f| f.is_file()));
        let ds = IndexedDataset::open(&prefix).unwrap();
        assert_eq!(ds.num_docs(), 2);
        assert_eq!(tok.decode(ds.doc(0)).unwrap(), "first document ✓");
        assert_eq!(tok.decode(ds.doc(1)).unwrap(), "second\nline");
        assert_eq!(ds.total_tokens(), rep.tokens);
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn jsonl_with_eod_tokenizer_appends_eod_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let tok_path = dir.path().join("tok.json");
        let corpus = ["the cat sits.", "the cats sit.", "a dog runs."];
        let tok = Tokenizer::train_bpe(corpus.iter(), 300, &tok_path).unwrap();
        let eod = tok.eod_token().unwrap();
        let input = dir.path().join("in.jsonl");
        let lines: Vec<String> = corpus
            .iter()
            .map(|t| serde_json::json!({ "body": t }).to_string())
            .collect();
        std::fs::write(&input, lines.join("\n")).unwrap();
        let prefix = dir.path().join("ds");
        let fmt = InputFormat::Jsonl {
            text_key: "body".into(),
        };
        let rep = prepare_data(&[input], fmt, &tok, &prefix).unwrap();
        assert_eq!(rep.documents, 3);
        let ds = IndexedDataset::open(&prefix).unwrap();
        for (i, text) in corpus.iter().enumerate() {
            let d = ds.doc(i);
            assert_eq!(*d.last().unwrap(), eod);
            assert_eq!(tok.decode(&d[..d.len() - 1]).unwrap(), *text);
        }
    }

    #[test]
    fn failure_leaves_no_dataset_behind() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.jsonl");
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&good, "{\"text\": \"ok\"}\n").unwrap();
        std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"text\": null}\n").unwrap();
        let prefix = dir.path().join("ds");
        let fmt = InputFormat::Jsonl {
            text_key: "text".into(),
        };
        let e = prepare_data(&[good, bad], fmt, &Tokenizer::Byte, &prefix)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.jsonl:2:"), "{e}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "only the two inputs remain"
        );
    }
}
