//! `manifest.json`: what a checkpoint holds, written last so its presence marks completion.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{CheckpointError, Result, io_err};

/// Manifest format version written by this build; any other version is rejected on read.
pub const FORMAT_VERSION: u32 = 1;

/// Name of the manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`] for manifests this build accepts.
    pub format_version: u32,
    /// Optimizer step the checkpoint was taken after.
    pub step: u64,
    /// Training tokens consumed up to `step`.
    pub tokens_seen: u64,
    /// Identifies the model's parameter layout; see [`verify_compatible`].
    pub model_signature: String,
    /// Trainer-owned state: data sampler position, RNG state, LR schedule, ...
    pub trainer_state: serde_json::Value,
    /// The resolved run configuration.
    pub config: serde_json::Value,
    /// Every other file of the checkpoint, with its length and digest.
    pub files: Vec<FileEntry>,
}

/// One data file of a checkpoint. With multi-rank shards each rank contributes entries
/// for the files it wrote; the single manifest still lists them all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Plain file name inside the checkpoint directory.
    pub name: String,
    /// Length in bytes.
    pub bytes: u64,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: String,
}

/// What the trainer supplies to [`super::CheckpointManager::save`] besides the tensors.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ManifestMeta {
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// See [`Manifest::model_signature`].
    pub model_signature: String,
    /// See [`Manifest::trainer_state`].
    pub trainer_state: serde_json::Value,
    /// See [`Manifest::config`].
    pub config: serde_json::Value,
}

/// Rejects names that could leave the checkpoint directory or clash with the manifest.
pub(crate) fn check_file_name(name: &str, context: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.contains('/') || name.contains('\\') {
        Some("it contains a path separator")
    } else if name == "." || name == ".." {
        Some("it names a directory")
    } else if name.contains('\0') {
        Some("it contains a NUL byte")
    } else if Path::new(name).is_absolute() {
        Some("it is an absolute path")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CheckpointError::UnsafeFileName {
            context: context.into(),
            name: name.into(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Reads and validates `dir/manifest.json`: the format version, every file name, and that
/// the step matches the directory name when it has the `step-N` form.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::ManifestMissing { path });
        }
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    let invalid = |reason: String| CheckpointError::ManifestInvalid {
        path: path.clone(),
        reason,
    };
    // Check the version before the full schema, so a newer format is reported as such
    // rather than as a confusing missing-field error.
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    match value.get("format_version") {
        None => return Err(invalid("no format_version field".into())),
        Some(v) if v.as_u64() == Some(u64::from(FORMAT_VERSION)) => {}
        Some(v) => {
            return Err(CheckpointError::UnsupportedFormatVersion {
                path,
                found: v.to_string(),
                supported: FORMAT_VERSION,
            });
        }
    }
    let manifest: Manifest = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
    let context = path.display().to_string();
    let mut names = std::collections::HashSet::new();
    for f in &manifest.files {
        check_file_name(&f.name, &context)?;
        if f.name == MANIFEST_FILE || !names.insert(f.name.as_str()) {
            return Err(CheckpointError::DuplicateFile {
                dir: dir.into(),
                name: f.name.clone(),
            });
        }
    }
    if let Some(dir_step) = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_step_dir)
        && dir_step != manifest.step
    {
        return Err(CheckpointError::StepMismatch {
            path,
            manifest_step: manifest.step,
            dir_step,
        });
    }
    Ok(manifest)
}

/// Rejects a checkpoint whose `model_signature` differs from `expected`. `dir` is the
/// checkpoint directory, used in the error message.
pub fn verify_compatible(manifest: &Manifest, dir: &Path, expected: &str) -> Result<()> {
    if manifest.model_signature == expected {
        Ok(())
    } else {
        Err(CheckpointError::SignatureMismatch {
            path: dir.join(MANIFEST_FILE),
            expected: expected.into(),
            found: manifest.model_signature.clone(),
        })
    }
}

/// Directory name of a committed checkpoint for `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Parses `step-<digits>`; anything else (temp dirs, user files) is `None`.
pub(crate) fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Path of a file named in a manifest (the name was checked by [`read_manifest`]).
pub(crate) fn file_path(dir: &Path, entry: &FileEntry) -> PathBuf {
    dir.join(&entry.name)
}
