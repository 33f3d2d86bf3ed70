//! One kind of a checkpoint's tensors (`model`), read tensor by tensor.
//!
//! [`load`](super::load) decodes every file of a checkpoint at once (optimizer state
//! included); a reader that needs the weights only and one at a time (`export-hf`) holds one
//! tensor instead. Each file of the kind (`model.safetensors`, `model.rank-NNNN.safetensors`)
//! is verified against the manifest (length, sha256) by a streaming read, its safetensors
//! header parsed; a tensor is read at its offset when asked for. A file replaced between the
//! check and the read would go unnoticed: complete checkpoint directories are never written
//! again.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::{CheckpointError, Result, io_err};
use super::manifest::{file_path, read_manifest};
use super::regular::open_regular;
use super::tensor::tensor_file_kind;

/// Where one f32 tensor lies.
#[derive(Debug, Clone)]
struct Located {
    path: PathBuf,
    shape: Vec<usize>,
    /// Byte offset in the file.
    start: u64,
}

/// The tensors of one kind of a verified checkpoint, by name.
#[derive(Debug)]
pub struct TensorReader {
    tensors: BTreeMap<String, Located>,
}

impl TensorReader {
    /// Verifies every `kind` file of the checkpoint in `dir` and indexes its tensors.
    pub fn open(dir: &Path, kind: &str) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let mut tensors = BTreeMap::new();
        for entry in manifest
            .files
            .iter()
            .filter(|e| tensor_file_kind(&e.name) == Some(kind))
        {
            let path = file_path(dir, entry);
            let Some((mut file, len)) = open_regular(&path)? else {
                return Err(CheckpointError::MissingFile { path });
            };
            if len != entry.bytes {
                return Err(CheckpointError::LengthMismatch {
                    path,
                    expected: entry.bytes,
                    actual: len,
                });
            }
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 8 << 20];
            let mut read = 0u64;
            loop {
                let n = file.read(&mut buf).map_err(io_err("read", &path))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                read += n as u64;
            }
            let actual: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if read != entry.bytes || actual != entry.sha256 {
                return Err(CheckpointError::ChecksumMismatch {
                    path,
                    expected: entry.sha256.clone(),
                    actual,
                });
            }
            for (name, located) in index(&mut file, &path, len)? {
                if tensors.insert(name.clone(), located).is_some() {
                    return Err(CheckpointError::CorruptTensorFile {
                        path,
                        reason: format!("tensor `{name}` is stored twice across the {kind} files"),
                    });
                }
            }
        }
        Ok(TensorReader { tensors })
    }

    /// The shape of tensor `name`, if the checkpoint has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The values of tensor `name` (read from disk now).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| CheckpointError::CorruptTensorFile {
                path: PathBuf::from(name),
                reason: "no such tensor in the checkpoint".into(),
            })?;
        let count: usize = t.shape.iter().product();
        let mut bytes = vec![0u8; count * 4];
        let Some((mut file, _)) = open_regular(&t.path)? else {
            return Err(CheckpointError::MissingFile {
                path: t.path.clone(),
            });
        };
        file.seek(SeekFrom::Start(t.start))
            .map_err(io_err("seek", &t.path))?;
        file.read_exact(&mut bytes)
            .map_err(io_err("read", &t.path))?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// The tensors of one safetensors file of `len` bytes: its header (an 8-byte little-endian
/// length, then JSON: name -> dtype, shape, data offsets after the header).
fn index(file: &mut std::fs::File, path: &Path, len: u64) -> Result<Vec<(String, Located)>> {
    let corrupt = |reason: String| CheckpointError::CorruptTensorFile {
        path: path.to_path_buf(),
        reason,
    };
    file.seek(SeekFrom::Start(0))
        .map_err(io_err("seek", path))?;
    let mut head = [0u8; 8];
    file.read_exact(&mut head).map_err(io_err("read", path))?;
    let header_len = u64::from_le_bytes(head);
    if header_len > len.saturating_sub(8) || header_len > 100 << 20 {
        return Err(corrupt(format!("a header of {header_len} bytes")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io_err("read", path))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| corrupt(format!("header: {e}")))?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in json
        .as_object()
        .ok_or_else(|| corrupt("header is not an object".into()))?
    {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().unwrap_or("?");
        if dtype != "F32" {
            return Err(CheckpointError::UnsupportedDtype {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: dtype.to_string(),
            });
        }
        let shape: Option<Vec<usize>> = info["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect());
        let offsets: Option<Vec<u64>> = info["data_offsets"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect());
        let (Some(shape), Some([begin, end])) = (
            shape,
            offsets
                .as_deref()
                .and_then(|o| <[u64; 2]>::try_from(o).ok()),
        ) else {
            return Err(corrupt(format!(
                "tensor `{name}`: no shape or data offsets"
            )));
        };
        let bytes = shape.iter().product::<usize>() as u64 * 4;
        if end < begin || end - begin != bytes || data_start + end > len {
            return Err(corrupt(format!(
                "tensor `{name}`: offsets {begin}..{end} for {bytes} bytes in a file of {len}"
            )));
        }
        out.push((
            name.clone(),
            Located {
                path: path.to_path_buf(),
                shape,
                start: data_start + begin,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{CheckpointManager, ManifestMeta, NamedTensor, load};

    fn saved(root: &Path) -> PathBuf {
        let model = vec![
            NamedTensor::f32("embed", vec![3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            NamedTensor::f32("layers.0.attn.wq", vec![2, 2], vec![-1.0, 0.5, 0.25, 8.0]),
        ];
        let rank1 = vec![NamedTensor::f32(
            "layers.0.moe.experts.1.w_up",
            vec![1, 3],
            vec![7.0, 8.0, 9.0],
        )];
        let optimizer = vec![NamedTensor::f32("embed.m", vec![3, 2], vec![0.0; 6])];
        CheckpointManager::new(root, 1)
            .unwrap()
            .save(
                4,
                &[
                    ("model.rank-0000.safetensors", model),
                    ("model.rank-0001.safetensors", rank1),
                    ("optimizer.safetensors", optimizer),
                ],
                ManifestMeta::default(),
            )
            .unwrap()
    }

    /// Every tensor of the kind, across rank files, with the values `load` decodes; no
    /// tensor of another kind.
    #[test]
    fn the_reader_gives_what_load_gives_for_its_kind_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = saved(tmp.path());
        let reader = TensorReader::open(&dir, "model").unwrap();
        let names: Vec<&str> = reader.names().collect();
        assert_eq!(
            names,
            ["embed", "layers.0.attn.wq", "layers.0.moe.experts.1.w_up"]
        );
        let loaded = load(&dir).unwrap();
        for (file, tensors) in &loaded.files {
            for t in tensors {
                if file.starts_with("model.") {
                    assert_eq!(reader.shape(&t.name), Some(t.shape.as_slice()));
                    assert_eq!(reader.read_f32(&t.name).unwrap(), t.as_f32().unwrap());
                } else {
                    assert!(reader.shape(&t.name).is_none(), "{}", t.name);
                }
            }
        }
    }

    /// A changed byte in a model file is caught before anything is read from it.
    #[test]
    fn a_corrupted_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = saved(tmp.path());
        let path = dir.join("model.rank-0001.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let err = TensorReader::open(&dir, "model").unwrap_err();
        assert!(
            matches!(err, CheckpointError::ChecksumMismatch { .. }),
            "{err}"
        );
    }
}
