//! Human-readable summary of a checkpoint (`switchyard inspect`-style).

use std::fmt;
use std::path::{Path, PathBuf};

use super::error::Result;
use super::manifest::{FORMAT_VERSION, Manifest, file_path, read_manifest};
use super::tensor::{DType, NamedTensor, TensorData, decode};

/// Outcome of verifying one file listed in the manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum FileStatus {
    /// Length, sha256 and safetensors structure all check out.
    Ok,
    /// Verification or decoding failed; the message is the error's text.
    Bad(String),
}

/// Summary statistics of one tensor. NaNs are counted and excluded from min/max/mean.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorStats {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Number of elements.
    pub count: usize,
    /// Smallest non-NaN element, `None` if there is none.
    pub min: Option<f64>,
    /// Largest non-NaN element, `None` if there is none.
    pub max: Option<f64>,
    /// Mean of the non-NaN elements (accumulated in f64), `None` if there is none.
    pub mean: Option<f64>,
    /// Number of NaN elements.
    pub nan_count: usize,
}

/// Verification result and tensor statistics for one file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileReport {
    /// File name from the manifest.
    pub name: String,
    /// Length recorded in the manifest.
    pub bytes: u64,
    /// Verification outcome.
    pub status: FileStatus,
    /// Statistics per tensor (empty unless the file verified).
    pub tensors: Vec<TensorStats>,
}

/// What [`inspect`] found; `Display` prints it for humans.
#[derive(Debug, Clone, PartialEq)]
pub struct InspectReport {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// One report per manifest file, in manifest order.
    pub files: Vec<FileReport>,
}

impl InspectReport {
    /// True when every file verified.
    pub fn all_ok(&self) -> bool {
        self.files.iter().all(|f| f.status == FileStatus::Ok)
    }
}

/// Reads the manifest of `dir` and verifies every file. Bad files are reported in the
/// result rather than failing it; an unreadable or corrupt manifest is an error (nothing
/// it lists can be checked against it).
pub fn inspect(dir: &Path) -> Result<InspectReport> {
    let manifest = read_manifest(dir)?;
    let files = manifest
        .files
        .iter()
        .map(|entry| {
            let decoded = super::read_verified(dir, entry)
                .and_then(|bytes| decode(&file_path(dir, entry), &bytes));
            let (status, tensors) = match decoded {
                Ok(ts) => (FileStatus::Ok, ts.iter().map(stats).collect()),
                Err(e) => (FileStatus::Bad(e.to_string()), Vec::new()),
            };
            FileReport {
                name: entry.name.clone(),
                bytes: entry.bytes,
                status,
                tensors,
            }
        })
        .collect();
    Ok(InspectReport {
        dir: dir.into(),
        manifest,
        files,
    })
}

fn stats(t: &NamedTensor) -> TensorStats {
    let (mut min, mut max, mut sum, mut n, mut nan_count) =
        (f64::INFINITY, f64::NEG_INFINITY, 0.0f64, 0usize, 0);
    match &t.data {
        TensorData::F32(v) => {
            for &x in v {
                if x.is_nan() {
                    nan_count += 1;
                    continue;
                }
                let x = f64::from(x);
                min = min.min(x);
                max = max.max(x);
                sum += x;
                n += 1;
            }
        }
    }
    let some = |x: f64| (n > 0).then_some(x);
    TensorStats {
        name: t.name.clone(),
        dtype: t.dtype(),
        shape: t.shape.clone(),
        count: t.data.len(),
        min: some(min),
        max: some(max),
        mean: some(sum / n.max(1) as f64),
        nan_count,
    }
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.manifest;
        writeln!(f, "checkpoint {}", self.dir.display())?;
        writeln!(
            f,
            "  format_version {}  step {}  tokens_seen {}",
            m.format_version, m.step, m.tokens_seen
        )?;
        writeln!(f, "  model_signature {}", m.model_signature)?;
        if m.format_version < FORMAT_VERSION {
            writeln!(
                f,
                "  manifest.json  UNVERIFIED: format {} carries no digest of its own",
                m.format_version
            )?;
        } else {
            writeln!(f, "  manifest.json  sha256 OK")?;
        }
        for file in &self.files {
            let status = match &file.status {
                FileStatus::Ok => "checksum OK".to_string(),
                FileStatus::Bad(msg) => format!("BAD: {msg}"),
            };
            writeln!(f, "  {}  {} bytes  {}", file.name, file.bytes, status)?;
            for t in &file.tensors {
                let num =
                    |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v:.6e}"));
                write!(
                    f,
                    "    {}  {}  {:?}  count={}  min={}  max={}  mean={}",
                    t.name,
                    t.dtype,
                    t.shape,
                    t.count,
                    num(t.min),
                    num(t.max),
                    num(t.mean)
                )?;
                if t.nan_count > 0 {
                    write!(f, "  nan={}", t.nan_count)?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}
