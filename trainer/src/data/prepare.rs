//! `prepare-data`: tokenize raw text into a Megatron-LM indexed dataset (see [`super::indexed`]).
//!
//! A pipeline over threads, with bounded memory for a corpus of any size:
//!
//! ```text
//! reader (decompress, parse)  --items of ~256 KiB of text-->  workers (tokenize, N threads)
//!        ^                                                          |
//!        +------ credits (at most IN_FLIGHT items unwritten) ---- writer (this thread: in
//!                                                                  input order, .bin, lengths)
//! ```

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use super::error::{DataError, Result};
use super::indexed::{TokenDtype, dataset_paths, encode_index, write_synced};
use super::source::{InputFormat, Piece, for_each_piece};
use super::tokenizer::{Tokenizer, tmp_path};

/// How `prepare_data` reads and what it writes between documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareOptions {
    /// The format of every input; `None`: each file's own, from its name
    /// ([`InputFormat::from_file_name`]).
    pub format: Option<InputFormat>,
    /// The JSONL field / Parquet column of the text when the format comes from the name.
    pub text_key: String,
    /// Token appended after every document (see [`Tokenizer::document_separator`]); `None`:
    /// documents follow each other directly.
    pub eod: Option<u32>,
    /// Tokenizer threads (at least 1).
    pub workers: usize,
    /// Text per work item, bytes; a text file is cut into pieces of about this size.
    pub piece_bytes: usize,
}

impl PrepareOptions {
    /// Formats from the file names, `text` as the text key, no separator, a tokenizer
    /// thread per core, 256 KiB pieces (a tokenizer holds several times a piece while it encodes it).
    pub fn new(eod: Option<u32>) -> Self {
        PrepareOptions {
            format: None,
            text_key: super::config::default_text_key(),
            eod,
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            piece_bytes: 256 << 10,
        }
    }
}

/// What `prepare_data` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareReport {
    /// Documents written (one per text file, JSONL line or Parquet row).
    pub documents: usize,
    /// Tokens written, end-of-document tokens included.
    pub tokens: usize,
    /// Bytes of text read (after decompression).
    pub text_bytes: u64,
    /// Wall-clock seconds from the first read to the renamed files.
    pub seconds: f64,
    /// Token dtype of the `.bin`.
    pub dtype: TokenDtype,
    /// The files written: `PREFIX.bin`, `PREFIX.idx`.
    pub files: Vec<PathBuf>,
}

impl std::fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} documents, {} tokens ({:?}) from {:.1} MB of text in {:.1} s ({:.1} MB/s) ->",
            self.documents,
            self.tokens,
            self.dtype,
            self.text_bytes as f64 / 1e6,
            self.seconds,
            self.text_bytes as f64 / 1e6 / self.seconds.max(1e-9)
        )?;
        for p in &self.files {
            write!(f, " {}", p.display())?;
        }
        Ok(())
    }
}

/// Tokenizes `inputs` (one document per text file, JSONL line or Parquet row; plain, gzip or
/// zstd; `opts.eod` appended to each) and writes the Megatron-LM indexed dataset
/// `output_prefix.bin` / `.idx`.
///
/// Both files are written under temporary names and renamed at the end, `.idx` last (any
/// old `.idx` is removed first), so a crash never leaves a dataset that looks complete.
pub fn prepare_data(
    inputs: &[PathBuf],
    opts: &PrepareOptions,
    tokenizer: &Tokenizer,
    output_prefix: &Path,
) -> Result<PrepareReport> {
    if inputs.is_empty() {
        return Err(DataError::Prepare(
            "no input files given; pass at least one text, JSONL or Parquet file".into(),
        ));
    }
    let started = Instant::now();
    let (bin_path, idx_path) = dataset_paths(output_prefix);
    if let Some(dir) = output_prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io("create directory", dir, e))?;
    }
    let (bin_tmp, idx_tmp) = (tmp_path(&bin_path), tmp_path(&idx_path));
    let written = match write_tmp(inputs, opts, tokenizer, &bin_tmp, &idx_tmp) {
        Ok(w) => w,
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
        documents: written.doc_lengths.len(),
        tokens: written.doc_lengths.iter().sum::<u64>() as usize,
        text_bytes: written.text_bytes,
        seconds: started.elapsed().as_secs_f64(),
        dtype: written.dtype,
        files: vec![bin_path, idx_path],
    })
}

/// Work items read but not yet written, at most: bounds the memory of the pipeline.
fn in_flight(workers: usize) -> usize {
    2 * workers + 2
}

/// A work item: consecutive pieces, numbered in input order.
struct Item {
    seq: u64,
    pieces: Vec<Piece>,
}

/// The tokens of an item's pieces, each with whether its document ends there and the
/// document's origin (for messages).
type Encoded = Result<Vec<(Vec<u32>, bool, String)>>;

struct Written {
    doc_lengths: Vec<u64>,
    text_bytes: u64,
    dtype: TokenDtype,
}

fn write_tmp(
    inputs: &[PathBuf],
    opts: &PrepareOptions,
    tokenizer: &Tokenizer,
    bin_tmp: &Path,
    idx_tmp: &Path,
) -> Result<Written> {
    let vocab = tokenizer.vocab_size();
    let dtype = TokenDtype::for_vocab(vocab);
    if let Some(eod) = opts.eod.filter(|&t| t as usize >= vocab) {
        return Err(DataError::TokenOutOfRange {
            context: "the end-of-document token".into(),
            token: eod.into(),
            vocab_size: vocab,
            hint: "name a token of this tokenizer".into(),
        });
    }
    let workers = opts.workers.max(1);
    let limit = in_flight(workers);
    // The work queue holds every item in flight, so the reader never blocks on it, only
    // on a credit: a writer that stops (an error) lets it finish at once.
    let (work_tx, work_rx) = sync_channel::<Item>(limit);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = sync_channel::<(u64, Encoded)>(limit);
    let (credit_tx, credit_rx) = sync_channel::<()>(limit);
    for _ in 0..limit {
        credit_tx.send(()).expect("the receiver is alive");
    }
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_items(inputs, opts, &work_tx, &credit_rx));
        for _ in 0..workers {
            let (work_rx, done_tx) = (&work_rx, done_tx.clone());
            scope.spawn(move || {
                loop {
                    let Ok(item) = work_rx.lock().expect("no worker panics").recv() else {
                        return; // the reader is done
                    };
                    let encoded = encode_item(tokenizer, dtype, item.pieces);
                    if done_tx.send((item.seq, encoded)).is_err() {
                        return; // the writer stopped
                    }
                }
            });
        }
        drop(done_tx);
        let written = write_items(done_rx, credit_tx, opts.eod, dtype, bin_tmp);
        // A reader's error (an unreadable input) is the cause of an early end.
        let read = reader.join().expect("the reader does not panic");
        let (doc_lengths, text_bytes) = match (written, read) {
            (Ok(lengths), Ok(text_bytes)) => (lengths, text_bytes),
            (Err(e), Err(DataError::Prepare(m))) if m == STOPPED => return Err(e),
            (_, Err(e)) | (Err(e), Ok(_)) => return Err(e),
        };
        write_synced(idx_tmp, &encode_index(dtype, &doc_lengths))?;
        Ok(Written {
            doc_lengths,
            text_bytes,
            dtype,
        })
    })
}

/// The reader's error when the writer stopped first (it reports its own).
const STOPPED: &str = "stopped: the writer failed";

/// Reads the inputs into items of about `opts.piece_bytes` of text; the bytes read.
fn read_items(
    inputs: &[PathBuf],
    opts: &PrepareOptions,
    work: &SyncSender<Item>,
    credits: &Receiver<()>,
) -> Result<u64> {
    let mut seq = 0u64;
    let mut batch: Vec<Piece> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut total = 0u64;
    let mut send = |pieces: Vec<Piece>| -> Result<()> {
        let stopped = || DataError::Prepare(STOPPED.into());
        credits.recv().map_err(|_| stopped())?;
        work.send(Item { seq, pieces }).map_err(|_| stopped())?;
        seq += 1;
        Ok(())
    };
    for input in inputs {
        let format = opts
            .format
            .clone()
            .unwrap_or_else(|| InputFormat::from_file_name(input, &opts.text_key));
        for_each_piece(input, &format, opts.piece_bytes, |piece| {
            batch_bytes += piece.text.len();
            total += piece.text.len() as u64;
            batch.push(piece);
            if batch_bytes >= opts.piece_bytes {
                batch_bytes = 0;
                send(std::mem::take(&mut batch))?;
            }
            Ok(())
        })?;
    }
    if !batch.is_empty() {
        send(batch)?;
    }
    Ok(total)
}

fn encode_item(tokenizer: &Tokenizer, dtype: TokenDtype, pieces: Vec<Piece>) -> Encoded {
    let vocab = tokenizer.vocab_size();
    pieces
        .into_iter()
        .map(|piece| {
            let ids = tokenizer.encode(&piece.text)?;
            if let Some(&bad) = ids
                .iter()
                .find(|&&t| t as usize >= vocab || t as u64 > dtype.max_id())
            {
                return Err(DataError::TokenOutOfRange {
                    context: piece.origin,
                    token: bad.into(),
                    vocab_size: vocab,
                    hint: "the tokenizer produced an id outside its own vocabulary; check the tokenizer.json".into(),
                });
            }
            Ok((ids, piece.ends_doc, piece.origin))
        })
        .collect()
}

/// Writes the encoded items in input order to `bin_tmp` (synced) and returns the document
/// lengths; a credit goes back to the reader for every item written.
fn write_items(
    done: Receiver<(u64, Encoded)>,
    credits: SyncSender<()>,
    eod: Option<u32>,
    dtype: TokenDtype,
    bin_tmp: &Path,
) -> Result<Vec<u64>> {
    let file = std::fs::File::create(bin_tmp).map_err(|e| DataError::io("create", bin_tmp, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut doc_lengths: Vec<u64> = Vec::new();
    let mut doc_len = 0u64;
    let mut buf = Vec::new();
    let mut pending: BTreeMap<u64, Encoded> = BTreeMap::new();
    let mut next = 0u64;
    for (seq, encoded) in done {
        pending.insert(seq, encoded);
        while let Some(encoded) = pending.remove(&next) {
            for (mut ids, ends_doc, origin) in encoded? {
                if ends_doc {
                    ids.extend(eod);
                }
                doc_len += ids.len() as u64;
                if doc_len > i32::MAX as u64 {
                    return Err(DataError::Prepare(format!(
                        "{origin}: more than {} tokens in one document exceed the int32 lengths \
                         of the index; split the document",
                        i32::MAX
                    )));
                }
                buf.clear();
                for &t in &ids {
                    dtype.write(t, &mut buf);
                }
                out.write_all(&buf)
                    .map_err(|e| DataError::io("write", bin_tmp, e))?;
                if ends_doc {
                    doc_lengths.push(doc_len);
                    doc_len = 0;
                }
            }
            // The reader may be gone after its last item.
            let _ = credits.send(());
            next += 1;
        }
    }
    let file = out
        .into_inner()
        .map_err(|e| DataError::io("write", bin_tmp, e.into_error()))?;
    file.sync_all()
        .map_err(|e| DataError::io("sync", bin_tmp, e))?;
    Ok(doc_lengths)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::super::indexed::IndexedDataset;
    use super::super::tokenizer::BYTE_EOD;
    use super::*;

    fn opts(format: Option<InputFormat>, eod: Option<u32>) -> PrepareOptions {
        PrepareOptions {
            format,
            ..PrepareOptions::new(eod)
        }
    }

    #[test]
    fn prepare_then_read_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        let b = dir.path().join("b.txt");
        std::fs::write(&a, "first document ✓").unwrap();
        std::fs::write(&b, "second\nline").unwrap();
        let tok = Tokenizer::Byte;
        for eod in [None, Some(BYTE_EOD)] {
            let prefix = dir.path().join(format!("out{eod:?}/ds"));
            let rep =
                prepare_data(&[a.clone(), b.clone()], &opts(None, eod), &tok, &prefix).unwrap();
            let ends = usize::from(eod.is_some());
            assert_eq!(rep.documents, 2);
            assert_eq!(
                rep.tokens,
                "first document ✓".len() + "second\nline".len() + 2 * ends
            );
            assert_eq!(rep.dtype, TokenDtype::U16);
            assert!(rep.files.iter().all(|f| f.is_file()));
            let ds = IndexedDataset::open(&prefix).unwrap();
            assert_eq!(ds.num_docs(), 2);
            for (i, text) in ["first document ✓", "second\nline"].iter().enumerate() {
                let d = ds.doc(i);
                assert_eq!(tok.decode(&d[..d.len() - ends]).unwrap(), *text);
                assert_eq!(d.last() == Some(&BYTE_EOD), eod.is_some());
            }
            assert_eq!(ds.total_tokens(), rep.tokens);
            // No temporary files are left behind.
            let names: Vec<String> = std::fs::read_dir(prefix.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names.len(), 2, "{names:?}");
        }
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
        let rep = prepare_data(&[input], &opts(Some(fmt), Some(eod)), &tok, &prefix).unwrap();
        assert_eq!(rep.documents, 3);
        let ds = IndexedDataset::open(&prefix).unwrap();
        for (i, text) in corpus.iter().enumerate() {
            let d = ds.doc(i);
            assert_eq!(*d.last().unwrap(), eod);
            assert_eq!(tok.decode(&d[..d.len() - 1]).unwrap(), *text);
        }
    }

    /// Text cut into pieces, compressed JSONL and Parquet, tokenized by 1 and by 3 threads
    /// with tiny work items: the same `.bin` and `.idx` as the whole documents encoded one by
    /// one, in input order.
    #[test]
    fn threads_and_pieces_change_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let line = |i: usize| format!("Line {i} of the play: speak, speak\nAnd more words {i}\n");
        let text: String = (0..400).map(line).collect();
        let docs: Vec<String> = (0..300)
            .map(|i| format!("document {i}: {}", line(i)))
            .collect();
        let tok_path = dir.path().join("tok.json");
        let tok = Tokenizer::train_bpe(std::iter::once(text.as_str()), 400, &tok_path).unwrap();
        let eod = tok.eod_token().unwrap();

        let txt = dir.path().join("play.txt");
        std::fs::write(&txt, &text).unwrap();
        let jsonl = dir.path().join("docs.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for d in &docs {
            writeln!(gz, "{}", serde_json::json!({ "text": d })).unwrap();
        }
        std::fs::write(&jsonl, gz.finish().unwrap()).unwrap();
        let parquet = dir.path().join("docs.parquet");
        let rows: Vec<Option<&str>> = docs.iter().map(|d| Some(d.as_str())).collect();
        super::super::parquet::tests::write_parquet(&parquet, &rows, 64);
        let inputs = [txt, jsonl, parquet];

        let mut expected: Vec<u32> = Vec::new();
        let mut lengths = Vec::new();
        for d in std::iter::once(&text).chain(&docs).chain(&docs) {
            let mut ids = tok.encode(d).unwrap();
            ids.push(eod);
            lengths.push(ids.len());
            expected.extend(ids);
        }
        for workers in [1, 3] {
            let prefix = dir.path().join(format!("w{workers}"));
            let o = PrepareOptions {
                workers,
                piece_bytes: 100,
                ..PrepareOptions::new(Some(eod))
            };
            let rep = prepare_data(&inputs, &o, &tok, &prefix).unwrap();
            assert_eq!(rep.documents, 1 + 2 * docs.len());
            let ds = IndexedDataset::open(&prefix).unwrap();
            let got: Vec<usize> = (0..ds.num_docs()).map(|i| ds.doc(i).len()).collect();
            assert_eq!(got, lengths, "{workers} workers");
            assert!(ds.docs(0..ds.num_docs()) == expected, "{workers} workers");
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
        let e = prepare_data(&[good, bad], &opts(None, None), &Tokenizer::Byte, &prefix)
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
