//! `manifest.json`: what a checkpoint holds, written last so its presence marks completion.
//!
//! Format 2 seals the manifest with its own digest: the file begins
//! `{\n  "manifest_sha256": "<64 hex>",` and that sha256 is taken over the whole file with
//! those 64 digits read as `0`s, so any changed byte (whitespace included) is detected.
//! Format 1 (no seal) is still read, with a warning at load that it is unverified.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{CheckpointError, Result};
use super::regular::{open_regular, read_at_most};

/// Manifest format version written by this build. Versions 1 (unsealed) and 2 are read.
pub const FORMAT_VERSION: u32 = 2;

/// A manifest longer than this is refused unread; real ones are kilobytes.
pub const MANIFEST_MAX_BYTES: u64 = 64 << 20;

/// How a sealed manifest begins; the digest's 64 hex digits and a `"` follow.
const SEAL_PREFIX: &[u8] = b"{\n  \"manifest_sha256\": \"";
const SEAL_FIELD: &str = "manifest_sha256";
const DIGEST_HEX_LEN: usize = 64;

/// Name of the manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] for manifests this build writes; 1 for older, unsealed ones.
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

/// The bytes of a sealed manifest for `value` (a JSON object with at least one field).
pub(crate) fn encode_manifest(value: &impl Serialize) -> serde_json::Result<Vec<u8>> {
    let body = serde_json::to_vec_pretty(value)?;
    let rest = body
        .strip_prefix(b"{\n")
        .expect("a manifest serialises as a non-empty JSON object");
    let mut out = SEAL_PREFIX.to_vec();
    out.extend([b'0'; DIGEST_HEX_LEN]);
    out.extend(b"\",\n");
    out.extend(rest);
    let digest = seal_digest(&out);
    out[SEAL_PREFIX.len()..SEAL_PREFIX.len() + DIGEST_HEX_LEN].copy_from_slice(digest.as_bytes());
    Ok(out)
}

/// sha256 of a sealed manifest with its recorded digest read as zeros.
fn seal_digest(bytes: &[u8]) -> String {
    let digits = SEAL_PREFIX.len()..SEAL_PREFIX.len() + DIGEST_HEX_LEN;
    let mut h = Sha256::new();
    h.update(&bytes[..digits.start]);
    h.update([b'0'; DIGEST_HEX_LEN]);
    h.update(&bytes[digits.end..]);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `Ok(true)` for a sealed manifest whose digest matches, `Ok(false)` for one without a
/// seal, `Err(reason)` for a seal that does not match.
fn check_seal(bytes: &[u8]) -> std::result::Result<bool, String> {
    let Some(rest) = bytes.strip_prefix(SEAL_PREFIX) else {
        return Ok(false);
    };
    let recorded = rest
        .get(..DIGEST_HEX_LEN)
        .filter(|d| {
            d.iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        })
        .filter(|_| rest.get(DIGEST_HEX_LEN) == Some(&b'"'))
        .ok_or_else(|| format!("its {SEAL_FIELD} is not 64 lowercase hex digits"))?;
    let recorded = String::from_utf8_lossy(recorded);
    let actual = seal_digest(bytes);
    if actual != recorded {
        return Err(format!(
            "its bytes hash to sha256 {actual} but it records {SEAL_FIELD} {recorded}"
        ));
    }
    Ok(true)
}

/// Reads and validates `dir/manifest.json`: only a regular file (no link, FIFO or device)
/// of at most [`MANIFEST_MAX_BYTES`], its seal (format 2), the format version, every file
/// name, and that the step matches the directory name when it has the `step-N` form.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let Some((file, len)) = open_regular(&path)? else {
        return Err(CheckpointError::ManifestMissing { path });
    };
    if len > MANIFEST_MAX_BYTES {
        return Err(CheckpointError::ManifestTooLarge {
            path,
            bytes: len,
            limit: MANIFEST_MAX_BYTES,
        });
    }
    let bytes = read_at_most(file, len, &path)?;
    let sealed = check_seal(&bytes).map_err(|reason| CheckpointError::ManifestCorrupt {
        path: path.clone(),
        reason,
    })?;
    let invalid = |reason: String| CheckpointError::ManifestInvalid {
        path: path.clone(),
        reason,
    };
    // Check the version before the full schema, so a newer format is reported as such
    // rather than as a confusing missing-field error.
    let mut value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    match value.get("format_version").map(serde_json::Value::as_u64) {
        None => return Err(invalid("no format_version field".into())),
        Some(Some(v)) if v == u64::from(FORMAT_VERSION) && !sealed => {
            return Err(CheckpointError::ManifestCorrupt {
                path,
                reason: format!(
                    "format_version {FORMAT_VERSION} manifests begin with their \
                     {SEAL_FIELD}, and this one does not"
                ),
            });
        }
        Some(Some(v)) if v == 1 || v == u64::from(FORMAT_VERSION) => {}
        Some(_) => {
            return Err(CheckpointError::UnsupportedFormatVersion {
                path,
                found: value["format_version"].to_string(),
                supported: FORMAT_VERSION,
            });
        }
    }
    if let Some(obj) = value.as_object_mut() {
        obj.remove(SEAL_FIELD);
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
