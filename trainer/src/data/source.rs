//! Reading raw documents from text, JSON Lines and Parquet files, plain or compressed
//! (gzip, zstd: recognised by their magic bytes, whatever the file is called), as a stream
//! of bounded pieces.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::error::{DataError, Result};

/// Format of raw input files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputFormat {
    /// A UTF-8 text file; the whole file is one document.
    Text,
    /// JSON Lines: each non-blank line is an object and one document, text under `text_key`.
    Jsonl {
        /// Key of the text field.
        text_key: String,
    },
    /// Parquet (the Hugging Face datasets' format): one document per row, text in the string
    /// column `text_key`.
    Parquet {
        /// Name of the text column.
        text_key: String,
    },
}

impl InputFormat {
    /// The format a file name says, after a `.gz` / `.zst` / `.zstd` suffix: `.jsonl` /
    /// `.json` / `.ndjson` are JSON Lines, `.parquet` Parquet, anything else text.
    pub fn from_file_name(path: &Path, text_key: &str) -> InputFormat {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let name = [".gz", ".zst", ".zstd"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        let text_key = text_key.to_string();
        match name.rsplit_once('.').map(|(_, ext)| ext) {
            Some("jsonl" | "json" | "ndjson") => InputFormat::Jsonl { text_key },
            Some("parquet") => InputFormat::Parquet { text_key },
            _ => InputFormat::Text,
        }
    }
}

/// Read buffer of the input files.
const READ_BUFFER: usize = 1 << 20;

/// Opens `path` for reading, decompressing a gzip (several members too, as `pigz` and
/// `cat a.gz b.gz` make) or zstd stream, recognised by its first bytes.
fn open_decompressed(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io("open", path, e))?;
    let mut raw = BufReader::with_capacity(READ_BUFFER, file);
    let head = raw.fill_buf().map_err(|e| DataError::io("read", path, e))?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(BufReader::with_capacity(
            READ_BUFFER,
            flate2::bufread::MultiGzDecoder::new(raw),
        ))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = zstd::stream::read::Decoder::with_buffer(raw)
            .map_err(|e| DataError::io("start zstd decoding of", path, e))?;
        Box::new(BufReader::with_capacity(READ_BUFFER, decoder))
    } else {
        Box::new(raw)
    })
}

/// Reads a whole UTF-8 text file (one document), decompressing it if it is gzip or zstd.
pub fn read_text_file(path: &Path) -> Result<String> {
    let mut bytes = Vec::new();
    open_decompressed(path)?
        .read_to_end(&mut bytes)
        .map_err(|e| DataError::io("read", path, e))?;
    String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
        path: path.to_path_buf(),
        byte_offset: e.utf8_error().valid_up_to(),
    })
}

/// Reads the documents of a JSON Lines file (plain or compressed); blank lines are skipped
/// (common JSONL practice), anything else that is not an object with a string under
/// `text_key` is an error naming the line.
pub fn read_jsonl(path: &Path, text_key: &str) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for_each_piece(
        path,
        &InputFormat::Jsonl {
            text_key: text_key.into(),
        },
        usize::MAX,
        |p| {
            docs.push(p.text);
            Ok(())
        },
    )?;
    Ok(docs)
}

/// A piece of a document: all of it, or (a long text document) a stretch of whole lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    /// Whether the document ends with this piece.
    pub ends_doc: bool,
    /// Where the document starts, for messages: "`file`", "`file`:LINE" or "`file` row R".
    pub origin: String,
}

/// Calls `f` with the documents of `path` in order, each as one or more pieces: a JSONL line
/// or a Parquet row is one piece; a text file (one document) is cut into pieces of about
/// `piece_bytes` so that memory stays bounded for a file of any size.
///
/// A text piece ends at a line break that follows a letter or digit (`...word|\nNext`), where
/// the byte-level BPE pre-tokenizers (GPT-2's and Llama 3's patterns) end a pre-token anyway,
/// so encoding the pieces one by one gives the tokens of the whole text. A stretch of
/// `4 x piece_bytes` without such a break is cut at any line break, then at any character.
pub fn for_each_piece(
    path: &Path,
    format: &InputFormat,
    piece_bytes: usize,
    mut f: impl FnMut(Piece) -> Result<()>,
) -> Result<()> {
    match format {
        InputFormat::Text => text_pieces(path, piece_bytes, f),
        InputFormat::Jsonl { text_key } => jsonl_pieces(path, text_key, f),
        InputFormat::Parquet { text_key } => super::parquet::rows(path, text_key, |text, row| {
            f(Piece {
                text,
                ends_doc: true,
                origin: format!("{} row {row}", path.display()),
            })
        }),
    }
}

fn text_pieces(
    path: &Path,
    piece_bytes: usize,
    mut f: impl FnMut(Piece) -> Result<()>,
) -> Result<()> {
    let piece_bytes = piece_bytes.max(1);
    let limit = piece_bytes.saturating_mul(4);
    let mut reader = open_decompressed(path)?;
    let origin = format!("{}", path.display());
    // buf holds the bytes not yet handed out; `offset` is where it starts in the text.
    let mut buf: Vec<u8> = Vec::new();
    let mut offset = 0usize;
    let mut eof = false;
    loop {
        while !eof && buf.len() < limit && cut_point(&buf, piece_bytes, limit).is_none() {
            let chunk = reader
                .fill_buf()
                .map_err(|e| DataError::io("read", path, e))?;
            if chunk.is_empty() {
                eof = true;
                break;
            }
            let n = chunk.len();
            buf.extend_from_slice(chunk);
            reader.consume(n);
        }
        let cut = match cut_point(&buf, piece_bytes, limit) {
            Some(cut) => cut,
            None if buf.len() >= limit => fallback_cut(&buf, limit),
            None => buf.len(), // the end of the text
        };
        let rest = buf.split_off(cut);
        let text = String::from_utf8(std::mem::replace(&mut buf, rest)).map_err(|e| {
            DataError::NotUtf8 {
                path: path.to_path_buf(),
                byte_offset: offset + e.utf8_error().valid_up_to(),
            }
        })?;
        offset += cut;
        let ends_doc = eof && buf.is_empty();
        f(Piece {
            text,
            ends_doc,
            origin: origin.clone(),
        })?;
        if ends_doc {
            return Ok(());
        }
    }
}

/// The first `\n` in `buf[from..limit]` whose previous byte is an ASCII letter or digit;
/// the piece ends before it.
fn cut_point(buf: &[u8], from: usize, limit: usize) -> Option<usize> {
    (from.max(1)..buf.len().min(limit))
        .find(|&i| buf[i] == b'\n' && buf[i - 1].is_ascii_alphanumeric())
}

/// For `limit` bytes without a [`cut_point`]: after their last line break, or else at their
/// last character boundary.
fn fallback_cut(buf: &[u8], limit: usize) -> usize {
    let head = &buf[..limit];
    if let Some(i) = head.iter().rposition(|&b| b == b'\n').filter(|&i| i > 0) {
        return i + 1;
    }
    // UTF-8 continuation bytes are 0b10xxxxxx: back up to the start of a character.
    (1..limit)
        .rev()
        .find(|&i| buf[i] & 0xc0 != 0x80)
        .unwrap_or(limit)
}

fn jsonl_pieces(path: &Path, text_key: &str, mut f: impl FnMut(Piece) -> Result<()>) -> Result<()> {
    let mut reader = open_decompressed(path)?;
    let mut line = Vec::new();
    let mut line_no = 0;
    let mut offset = 0usize;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| DataError::io("read", path, e))?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        let text = std::str::from_utf8(&line).map_err(|e| DataError::NotUtf8 {
            path: path.to_path_buf(),
            byte_offset: offset + e.valid_up_to(),
        })?;
        offset += n;
        if text.trim().is_empty() {
            continue;
        }
        let doc = jsonl_document(text, text_key).map_err(|message| DataError::Jsonl {
            path: path.to_path_buf(),
            line: line_no,
            message,
        })?;
        f(Piece {
            text: doc,
            ends_doc: true,
            origin: format!("{}:{line_no}", path.display()),
        })?;
    }
}

/// The text under `text_key` of one JSONL line, or what is wrong with the line.
fn jsonl_document(line: &str, text_key: &str) -> std::result::Result<String, String> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| format!("invalid JSON ({e}); each line must be one JSON object"))?;
    let serde_json::Value::Object(mut obj) = value else {
        return Err(format!(
            "expected a JSON object with a {text_key:?} field, found {}",
            kind(&value)
        ));
    };
    match obj.remove(text_key) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "field {text_key:?} is {}, expected a string",
            kind(&other)
        )),
        None => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).take(8).collect();
            Err(format!(
                "no field {text_key:?} (fields present: {keys:?}); set text_key to the field holding the text"
            ))
        }
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        let cases = [
            ("{\"text\": \"a\"}\n{\"text\": \"b\"\n", 2, "invalid JSON"),
            (
                "{\"text\": \"a\"}\n\n{\"body\": \"b\"}\n",
                3,
                "no field \"text\"",
            ),
            ("{\"text\": 5}\n", 1, "a number"),
            ("[1, 2]\n", 1, "expected a JSON object"),
        ];
        for (content, line, what) in cases {
            std::fs::write(&p, content).unwrap();
            let e = read_jsonl(&p, "text").unwrap_err().to_string();
            assert!(
                e.contains(&format!("in.jsonl:{line}:")) && e.contains(what),
                "{e}"
            );
        }
        std::fs::write(
            &p,
            "{\"text\": \"a\"}\n\n{\"text\": \"b\\nc\", \"id\": 1}\n",
        )
        .unwrap();
        assert_eq!(read_jsonl(&p, "text").unwrap(), ["a", "b\nc"]);
    }

    #[test]
    fn invalid_utf8_names_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.txt");
        std::fs::write(&p, b"hello \xff world").unwrap();
        let e = read_text_file(&p).unwrap_err().to_string();
        assert!(e.contains("bad.txt") && e.contains("byte offset 6"), "{e}");
        // In a piece after the first, the offset still counts from the start of the file.
        let mut text = b"ab\n".repeat(10);
        text.extend(b"c\xffd\n");
        std::fs::write(&p, &text).unwrap();
        let e = for_each_piece(&p, &InputFormat::Text, 4, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("byte offset 31"), "{e}");
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn gzip_and_zstd_files_read_like_the_plain_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = "To be, or not to be: that is the question.\nWhether 'tis nobler ✓\n".repeat(50);
        let jsonl: String = text
            .lines()
            .map(|l| serde_json::json!({ "text": l }).to_string() + "\n")
            .collect();
        let plain = dir.path().join("a.txt");
        std::fs::write(&plain, &text).unwrap();
        // Two gzip members back to back (what `cat a.gz b.gz` makes) are one stream.
        let (head, tail) = text.as_bytes().split_at(1000);
        let gz = dir.path().join("a.txt.gz");
        std::fs::write(&gz, [gzip(head), gzip(tail)].concat()).unwrap();
        let zst = dir.path().join("a.txt.zst");
        std::fs::write(&zst, zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
        // The magic bytes decide, not the name.
        let misnamed = dir.path().join("really-gzip.txt");
        std::fs::write(&misnamed, gzip(text.as_bytes())).unwrap();
        for p in [&plain, &gz, &zst, &misnamed] {
            assert_eq!(read_text_file(p).unwrap(), text, "{}", p.display());
        }
        let jz = dir.path().join("a.jsonl.zst");
        std::fs::write(&jz, zstd::encode_all(jsonl.as_bytes(), 3).unwrap()).unwrap();
        let docs = read_jsonl(&jz, "text").unwrap();
        assert_eq!(docs, text.lines().collect::<Vec<_>>());
    }

    #[test]
    fn text_pieces_join_to_the_document_and_end_after_a_word() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        let text =
            "First Citizen:\nBefore we proceed any further, hear me speak\n\nAll:\nSpeak, speak\n"
                .repeat(40);
        std::fs::write(&p, &text).unwrap();
        let mut pieces = Vec::new();
        for_each_piece(&p, &InputFormat::Text, 64, |piece| {
            pieces.push(piece);
            Ok(())
        })
        .unwrap();
        assert!(pieces.len() > 10, "{} pieces", pieces.len());
        assert_eq!(
            pieces.iter().map(|p| p.text.as_str()).collect::<String>(),
            text
        );
        let (last, rest) = pieces.split_last().unwrap();
        assert!(last.ends_doc && rest.iter().all(|p| !p.ends_doc));
        for piece in rest {
            // A piece ends with a letter or digit, and the next one starts with a line break.
            assert!(piece.text.len() >= 64, "{:?}", piece.text);
            assert!(
                piece
                    .text
                    .as_bytes()
                    .last()
                    .unwrap()
                    .is_ascii_alphanumeric()
            );
        }
        assert!(pieces[1..].iter().all(|p| p.text.starts_with('\n')));
    }

    #[test]
    fn a_text_without_line_breaks_is_cut_at_characters() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        let text = "ünïcödé ".repeat(100);
        std::fs::write(&p, &text).unwrap();
        let mut pieces = Vec::new();
        for_each_piece(&p, &InputFormat::Text, 16, |piece| {
            pieces.push(piece.text);
            Ok(())
        })
        .unwrap();
        assert!(pieces.len() > 4);
        assert!(pieces.iter().all(|p| p.len() <= 4 * 16), "{pieces:?}");
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn format_follows_the_file_name() {
        let f = |name: &str| InputFormat::from_file_name(Path::new(name), "body");
        assert_eq!(f("a.txt"), InputFormat::Text);
        assert_eq!(f("a.txt.gz"), InputFormat::Text);
        assert_eq!(f("data"), InputFormat::Text);
        let jsonl = InputFormat::Jsonl {
            text_key: "body".into(),
        };
        assert_eq!(f("a.jsonl"), jsonl);
        assert_eq!(f("dir/a.JSONL.ZST"), jsonl);
        assert_eq!(f("a.json.gz"), jsonl);
        assert_eq!(
            f("train-00000-of-00001.parquet"),
            InputFormat::Parquet {
                text_key: "body".into()
            }
        );
    }
}
