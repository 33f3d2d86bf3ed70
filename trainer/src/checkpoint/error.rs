//! Errors of the checkpoint module. Every variant names the file or directory involved
//! and says what to do about it.

use std::path::PathBuf;

/// Result alias for checkpoint operations.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// Everything that can go wrong while saving, finding, loading or inspecting a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// An operating-system call failed.
    #[error(
        "could not {op} {path}: {source}; check that the path exists, is writable and the disk is not full"
    )]
    Io {
        /// What was attempted ("create directory", "fsync", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// `keep_last` was 0, which would delete the checkpoint just written.
    #[error(
        "checkpoint keep_last must be at least 1 (it counts the checkpoint just written); got 0 for root {root}"
    )]
    InvalidKeepLast {
        /// The checkpoint root.
        root: PathBuf,
    },

    /// The final directory for this step already exists; it is never overwritten.
    #[error(
        "checkpoint {path} already exists; it is never overwritten: move it away, or resume from it instead of re-running this step"
    )]
    AlreadyExists {
        /// The existing directory.
        path: PathBuf,
    },

    /// A tensor's shape does not match its number of elements.
    #[error(
        "tensor '{tensor}' for {file}: shape {shape:?} holds {expected} elements but the data has {actual}; fix the conversion that built it"
    )]
    ShapeMismatch {
        /// The file the tensor was going to.
        file: String,
        /// The tensor name.
        tensor: String,
        /// Its declared shape.
        shape: Vec<usize>,
        /// Product of the shape (None on overflow).
        expected: String,
        /// Length of the data.
        actual: usize,
    },

    /// Two tensors in one file share a name.
    #[error("tensor name '{tensor}' appears twice in {file}; tensor names must be unique per file")]
    DuplicateTensor {
        /// The file name.
        file: String,
        /// The duplicated tensor name.
        tensor: String,
    },

    /// Two files of one checkpoint share a name, or a file is named like the manifest.
    #[error(
        "checkpoint file name '{name}' is used twice (or is reserved) in {dir}; give every file a distinct name other than manifest.json"
    )]
    DuplicateFile {
        /// The directory of the checkpoint.
        dir: PathBuf,
        /// The name.
        name: String,
    },

    /// A file name (given to `save` or found in a manifest) would leave the checkpoint directory.
    #[error(
        "unsafe checkpoint file name '{name}' in {context}: {reason}; file names must be plain names inside the checkpoint directory"
    )]
    UnsafeFileName {
        /// Where the name came from (manifest path or "save() argument").
        context: String,
        /// The offending name.
        name: String,
        /// Why it is rejected.
        reason: &'static str,
    },

    /// The tensors could not be encoded as safetensors.
    #[error("could not encode {file} as safetensors: {reason}")]
    Encode {
        /// The file name.
        file: String,
        /// The safetensors error.
        reason: String,
    },

    /// The directory has no `manifest.json`: it is not a complete checkpoint.
    #[error(
        "{path} is missing: this directory is not a complete checkpoint (a crashed save never writes it); pick another checkpoint"
    )]
    ManifestMissing {
        /// Path of the expected manifest.
        path: PathBuf,
    },

    /// The manifest is not valid JSON or lacks required fields.
    #[error("manifest {path} is unreadable: {reason}; the checkpoint is damaged, use another one")]
    ManifestInvalid {
        /// Path of the manifest.
        path: PathBuf,
        /// Parser message.
        reason: String,
    },

    /// The manifest's recorded sha256 does not match its bytes (or is missing or malformed
    /// in a format that has one): it changed after it was written.
    #[error(
        "manifest {path} is corrupt: {reason}; it was modified or damaged after the save, so nothing it says can be trusted: use another checkpoint"
    )]
    ManifestCorrupt {
        /// Path of the manifest.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },

    /// The manifest is larger than any manifest this build writes; it is not read.
    #[error(
        "manifest {path} is {bytes} bytes, more than the {limit}-byte limit for a manifest; it is not a Switchyard manifest, use another checkpoint"
    )]
    ManifestTooLarge {
        /// Path of the manifest.
        path: PathBuf,
        /// Its length.
        bytes: u64,
        /// The limit.
        limit: u64,
    },

    /// A checkpoint file is a symbolic link, FIFO, device or directory. Checkpoints are
    /// read only from regular files inside their directory.
    #[error(
        "checkpoint file {path} is {found}, not a regular file; a checkpoint is read only from regular files inside its directory (links are not followed): replace it with a copy of the real file, or use another checkpoint"
    )]
    NotRegularFile {
        /// Path of the file.
        path: PathBuf,
        /// What was found instead ("a symbolic link to /x", "a FIFO (named pipe)", ...).
        found: String,
    },

    /// The manifest was written by a different (probably newer) format version.
    #[error(
        "manifest {path} has format_version {found}, this build reads versions 1 to {supported}; use the Switchyard version that wrote it"
    )]
    UnsupportedFormatVersion {
        /// Path of the manifest.
        path: PathBuf,
        /// Version found in the file.
        found: String,
        /// Version this build supports.
        supported: u32,
    },

    /// The manifest's step does not match its directory name.
    #[error(
        "manifest {path} says step {manifest_step} but the directory name says step {dir_step}; the directory was renamed or the manifest copied, fix or remove it"
    )]
    StepMismatch {
        /// Path of the manifest.
        path: PathBuf,
        /// Step in the manifest.
        manifest_step: u64,
        /// Step in the directory name.
        dir_step: u64,
    },

    /// A file listed in the manifest does not exist.
    #[error(
        "checkpoint file {path} is listed in the manifest but missing; the checkpoint is incomplete, use another one"
    )]
    MissingFile {
        /// Path of the missing file.
        path: PathBuf,
    },

    /// A file has a different length than the manifest records (usually truncation).
    #[error(
        "checkpoint file {path} is {actual} bytes but the manifest records {expected}; it was truncated or replaced, use another checkpoint"
    )]
    LengthMismatch {
        /// Path of the file.
        path: PathBuf,
        /// Length in the manifest.
        expected: u64,
        /// Length on disk.
        actual: u64,
    },

    /// A file's sha256 differs from the manifest.
    #[error(
        "checksum mismatch for {path}: manifest sha256 {expected}, file sha256 {actual}; the file is corrupted, use another checkpoint"
    )]
    ChecksumMismatch {
        /// Path of the file.
        path: PathBuf,
        /// Digest in the manifest.
        expected: String,
        /// Digest of the file.
        actual: String,
    },

    /// A tensor file is not a valid safetensors file.
    #[error(
        "{path} is not a valid safetensors file: {reason}; the file is corrupted, use another checkpoint"
    )]
    CorruptTensorFile {
        /// Path of the file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A tensor file holds a dtype this build cannot load.
    #[error(
        "tensor '{tensor}' in {path} has dtype {dtype}, which this build cannot load (supported: F32)"
    )]
    UnsupportedDtype {
        /// Path of the file.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// The dtype found.
        dtype: String,
    },

    /// The checkpoint was written for a different model.
    #[error(
        "checkpoint {path} was written for model signature '{found}' but this model has '{expected}'; the architecture or parameter names differ, use a checkpoint of this model or change the model config back"
    )]
    SignatureMismatch {
        /// The manifest path.
        path: PathBuf,
        /// Signature the caller expected.
        expected: String,
        /// Signature in the manifest.
        found: String,
    },

    /// A resume spec named something that is not a complete checkpoint.
    #[error("resume target '{spec}' is not a complete checkpoint: {reason}")]
    NotACheckpoint {
        /// The spec as given.
        spec: String,
        /// Why.
        reason: String,
    },
}

/// Builds an `Io` error; keeps call sites short.
pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.into();
    move |source| CheckpointError::Io { op, path, source }
}
