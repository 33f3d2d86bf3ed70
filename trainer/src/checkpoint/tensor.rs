//! In-memory tensors and their safetensors encoding.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};

use super::error::{CheckpointError, Result};

/// Element type of a [`NamedTensor`]. The safetensors header records it, so adding
/// variants (bf16, i64, ...) does not change the on-disk format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit IEEE float, little-endian on disk.
    F32,
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DType::F32 => f.write_str("F32"),
        }
    }
}

/// Typed tensor payload, row-major.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TensorData {
    /// f32 elements.
    F32(Vec<f32>),
}

impl TensorData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
        }
    }
}

/// A named, shaped tensor as stored in a checkpoint file.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Unique name within its file (e.g. `layers.3.moe.experts.17.w1`).
    pub name: String,
    /// Dimensions, outermost first. `[]` is a scalar.
    pub shape: Vec<usize>,
    /// Elements; their count must equal the product of `shape`.
    pub data: TensorData,
}

impl NamedTensor {
    /// An f32 tensor. The shape is checked when the tensor is saved.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self {
            name: name.into(),
            shape,
            data: TensorData::F32(data),
        }
    }

    /// The elements as f32, or `None` for another dtype.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
}

/// Borrowed little-endian view handed to the safetensors serializer.
struct LeView<'a> {
    shape: &'a [usize],
    data: &'a TensorData,
}

impl View for LeView<'_> {
    fn dtype(&self) -> Dtype {
        match self.data {
            TensorData::F32(_) => Dtype::F32,
        }
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.data {
            // Explicit little-endian so the file is the same on every host.
            TensorData::F32(v) => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        }
    }
    fn data_len(&self) -> usize {
        match self.data {
            TensorData::F32(v) => v.len() * 4,
        }
    }
}

/// Checks names and shapes, then encodes `tensors` as one safetensors file in memory.
pub(crate) fn encode(file: &str, tensors: &[NamedTensor]) -> Result<Vec<u8>> {
    let mut seen = HashSet::new();
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(CheckpointError::DuplicateTensor {
                file: file.into(),
                tensor: t.name.clone(),
            });
        }
        let expected = t
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if expected != Some(t.data.len()) {
            return Err(CheckpointError::ShapeMismatch {
                file: file.into(),
                tensor: t.name.clone(),
                shape: t.shape.clone(),
                expected: expected
                    .map_or_else(|| "an overflowing number of".into(), |n| n.to_string()),
                actual: t.data.len(),
            });
        }
    }
    let views = tensors.iter().map(|t| {
        (
            t.name.as_str(),
            LeView {
                shape: &t.shape,
                data: &t.data,
            },
        )
    });
    safetensors::serialize(views, None).map_err(|e| CheckpointError::Encode {
        file: file.into(),
        reason: e.to_string(),
    })
}

/// Decodes a safetensors file. Tensors come back sorted by name. `path` is only used in errors.
pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<Vec<NamedTensor>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::CorruptTensorFile {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(st.len());
    for (name, view) in st.iter() {
        let data = match view.dtype() {
            Dtype::F32 => TensorData::F32(
                view.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            other => {
                return Err(CheckpointError::UnsupportedDtype {
                    path: path.into(),
                    tensor: name.to_string(),
                    dtype: other.to_string(),
                });
            }
        };
        out.push(NamedTensor {
            name: name.to_string(),
            shape: view.shape().to_vec(),
            data,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// `model` of `model.safetensors` or `model.rank-0003.safetensors`.
pub(crate) fn tensor_file_kind(file: &str) -> Option<&str> {
    let stem = file.strip_suffix(".safetensors")?;
    match stem.split_once(".rank-") {
        Some((kind, rank)) if !rank.is_empty() && rank.bytes().all(|b| b.is_ascii_digit()) => {
            Some(kind)
        }
        Some(_) => None,
        None => Some(stem),
    }
}

#[cfg(test)]
mod tests {
    use super::tensor_file_kind;

    #[test]
    fn tensor_files_by_kind() {
        assert_eq!(tensor_file_kind("model.safetensors"), Some("model"));
        assert_eq!(
            tensor_file_kind("optimizer.rank-0003.safetensors"),
            Some("optimizer")
        );
        assert_eq!(tensor_file_kind("model.rank-.safetensors"), None);
        assert_eq!(tensor_file_kind("model.rank-x1.safetensors"), None);
        assert_eq!(tensor_file_kind("manifest.json"), None);
    }
}
