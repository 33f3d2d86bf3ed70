//! Reading raw documents from text and JSON Lines files.

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
}

/// Reads a whole UTF-8 text file (one document).
pub fn read_text_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io("read", path, e))?;
    String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
        path: path.to_path_buf(),
        byte_offset: e.utf8_error().valid_up_to(),
    })
}

/// Reads the documents of a JSON Lines file; blank lines are skipped (common JSONL practice),
/// anything else that is not an object with a string under `text_key` is an error naming the
/// line.
pub fn read_jsonl(path: &Path, text_key: &str) -> Result<Vec<String>> {
    let content = read_text_file(path)?;
    let mut docs = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| DataError::Jsonl {
            path: path.to_path_buf(),
            line: line_no,
            message,
        };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            err(format!(
                "invalid JSON ({e}); each line must be one JSON object"
            ))
        })?;
        let obj = value.as_object().ok_or_else(|| {
            err(format!(
                "expected a JSON object with a {text_key:?} field, found {}",
                kind(&value)
            ))
        })?;
        match obj.get(text_key) {
            Some(serde_json::Value::String(s)) => docs.push(s.clone()),
            Some(other) => {
                return Err(err(format!(
                    "field {text_key:?} is {}, expected a string",
                    kind(other)
                )));
            }
            None => {
                let keys: Vec<&str> = obj.keys().map(String::as_str).take(8).collect();
                return Err(err(format!(
                    "no field {text_key:?} (fields present: {keys:?}); set text_key to the field holding the text"
                )));
            }
        }
    }
    Ok(docs)
}

/// Reads the documents of one input file.
pub fn read_documents(path: &Path, format: &InputFormat) -> Result<Vec<String>> {
    match format {
        InputFormat::Text => Ok(vec![read_text_file(path)?]),
        InputFormat::Jsonl { text_key } => read_jsonl(path, text_key),
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
    }
}
