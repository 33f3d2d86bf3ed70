//! Checkpoints: one directory per step, crash-safe, checksummed, safetensors for tensors.
//!
//! On-disk layout under a checkpoint root:
//!
//! ```text
//! ROOT/step-00000100/model.safetensors      tensors (safetensors: no code runs on load)
//! ROOT/step-00000100/optimizer.safetensors
//! ROOT/step-00000100/manifest.json          written last: step, tokens, trainer state,
//!                                           config, model signature, sha256 + length per
//!                                           file, and a sha256 of the manifest itself
//! ROOT/.step-00000200.tmp-<pid>/            a save in progress (or crashed); never loaded
//! ROOT/.step-00000300.incomplete-<unix s>/  a `step-N` that was not a complete checkpoint,
//!                                           moved aside by a save of that step; never
//!                                           loaded, pruned or deleted (the user's to judge)
//! ```
//!
//! A save writes into the hidden temp directory, fsyncs every file, writes the manifest
//! last, fsyncs the directory, renames it to `step-N` and fsyncs the root. A directory
//! named `step-N` therefore always holds a complete checkpoint unless someone edited it,
//! which [`load`] detects through the checksums.
//!
//! Multi-rank saves ([`CheckpointManager::begin_shared`], [`write_files`],
//! [`CheckpointManager::commit_shared`]): one rank creates the temp directory, every
//! writer writes and fsyncs its own files (e.g. `model.rank-0003.safetensors`) there and
//! reports their [`FileEntry`]s, and only after every writer has reported does one rank
//! write the manifest listing all of them and commit. A crash of any rank before the commit
//! leaves only a temp directory, which the next save removes.
//!
//! Reading trusts nothing on disk. Every byte a resume uses is verified: the data files
//! against the manifest's length and sha256, the manifest against the digest it carries
//! (format 2, see `manifest.rs`; any changed byte, whitespace included, is caught). Format-1
//! manifests (no digest, written before format 2) are still loaded, with a warning that
//! the manifest itself is unverified. A file is opened only if it is itself a regular file
//! inside the checkpoint directory (`O_NOFOLLOW`, then `fstat` of the handle: links,
//! FIFOs, devices are refused with an error naming what was found), a data file only if its
//! length is the manifest's, and never more than that length is read; a manifest over
//! [`manifest::MANIFEST_MAX_BYTES`] is refused unread.
//!
//! Which directories count: [`list_complete`] (`--resume auto`) takes only real `step-N`
//! directories with a valid, verified manifest. A `step-N` that is a symbolic link, has no
//! manifest, or one that is unparsable or fails its digest is skipped with a warning
//! naming it, so a corrupt newest checkpoint is never loaded but a requeued job still
//! resumes from the newest verified one; a save of that step later moves the skipped
//! directory aside (see the layout above), so it neither blocks the run nor is lost. A
//! manifest of an unknown format version or a manifest that is itself a link or a FIFO is
//! an error, not skipped. The root itself may be a symbolic link (e.g. to a scratch
//! filesystem). An explicit resume path that is a symbolic link (e.g. a `latest` link) is
//! resolved once, and the target it resolved to is logged.

mod checkpointer;
mod convert;
mod error;
mod inspect;
mod manifest;
mod regular;
mod stream;
mod tensor;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use checkpointer::{
    Checkpointed, Checkpointer, SaveMeta, Snapshot, f32_values, load_weights, read_any_snapshot,
    read_snapshot, read_weights_snapshot, tensor_values,
};
pub use convert::{init_router_biases, init_weights};
pub use error::{CheckpointError, Result};
pub use inspect::{FileReport, FileStatus, InspectReport, TensorStats, inspect};
pub use manifest::{
    FORMAT_VERSION, FileEntry, MANIFEST_FILE, MANIFEST_MAX_BYTES, Manifest, ManifestMeta,
    read_manifest, step_dir_name, verify_compatible,
};
pub use stream::TensorReader;
pub use tensor::{DType, NamedTensor, TensorData};

use error::io_err;
use manifest::{check_file_name, encode_manifest, file_path, parse_step_dir};
use regular::{open_regular, read_at_most};

/// Saves checkpoints under one root and keeps only the newest `keep_last`.
#[derive(Debug, Clone)]
pub struct CheckpointManager {
    root: PathBuf,
    keep_last: usize,
}

/// A checkpoint read back by [`load`], every file verified.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedCheckpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// `(file name, tensors sorted by name)` in manifest order.
    pub files: Vec<(String, Vec<NamedTensor>)>,
}

impl LoadedCheckpoint {
    /// Tensors of the file called `name`, if the checkpoint has it.
    pub fn tensors(&self, name: &str) -> Option<&[NamedTensor]> {
        self.files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_slice())
    }
}

impl CheckpointManager {
    /// A manager for `root` that keeps the newest `keep_last` checkpoints (at least 1).
    /// The root is created on the first save.
    pub fn new(root: impl Into<PathBuf>, keep_last: usize) -> Result<Self> {
        let root = root.into();
        if keep_last == 0 {
            return Err(CheckpointError::InvalidKeepLast { root });
        }
        Ok(Self { root, keep_last })
    }

    /// The checkpoint root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes a checkpoint for `step` holding one safetensors file per `(file name,
    /// tensors)` entry, commits it atomically, then deletes the oldest checkpoints beyond
    /// `keep_last`. Returns the committed directory. Errors leave no `step-N` directory.
    /// A complete `step-N` is never overwritten; an incomplete one is moved aside.
    pub fn save<N: AsRef<str>>(
        &self,
        step: u64,
        files: &[(N, Vec<NamedTensor>)],
        meta: ManifestMeta,
    ) -> Result<PathBuf> {
        let final_dir = self.root.join(step_dir_name(step));
        let mut names = std::collections::HashSet::new();
        for (name, _) in files {
            let name = name.as_ref();
            check_file_name(name, "save() argument")?;
            if name == MANIFEST_FILE || !names.insert(name) {
                return Err(CheckpointError::DuplicateFile {
                    dir: final_dir,
                    name: name.into(),
                });
            }
        }
        std::fs::create_dir_all(&self.root)
            .map_err(io_err("create checkpoint root", &self.root))?;
        make_room(&self.root, &final_dir)?;
        self.remove_stale_temp_dirs()?;

        let tmp = self.root.join(format!(
            ".{}.tmp-{}",
            step_dir_name(step),
            std::process::id()
        ));
        std::fs::create_dir(&tmp).map_err(io_err("create temporary checkpoint directory", &tmp))?;
        match write_and_commit(&tmp, &final_dir, &self.root, step, files, meta) {
            Ok(()) => {}
            Err(e) => {
                // Not a crash: clean up now rather than at the next save.
                if let Err(rm) = std::fs::remove_dir_all(&tmp) {
                    tracing::warn!(dir = %tmp.display(), error = %rm, "could not remove temporary checkpoint directory after a failed save");
                }
                return Err(e);
            }
        }
        tracing::info!(dir = %final_dir.display(), step, "checkpoint committed");

        // The checkpoint is committed; a failed cleanup must not make the caller think the
        // save failed, so it is reported as a warning naming the directory.
        if let Err(e) = self.prune(&final_dir) {
            tracing::warn!(error = %e, "checkpoint saved but pruning old checkpoints failed");
        }
        Ok(final_dir)
    }

    /// Multi-writer save, phase 1 (one rank, before the others write): removes temp
    /// directories of crashed saves, moves an incomplete `step-N` aside (a complete one is
    /// [`CheckpointError::AlreadyExists`]) and creates this save's temp directory, named by
    /// `tag` (the same on every rank, e.g. the committing rank's pid).
    pub fn begin_shared(&self, step: u64, tag: u64) -> Result<PathBuf> {
        let final_dir = self.root.join(step_dir_name(step));
        std::fs::create_dir_all(&self.root)
            .map_err(io_err("create checkpoint root", &self.root))?;
        make_room(&self.root, &final_dir)?;
        self.remove_stale_temp_dirs()?;
        let tmp = self.shared_temp_dir(step, tag);
        std::fs::create_dir(&tmp).map_err(io_err("create temporary checkpoint directory", &tmp))?;
        Ok(tmp)
    }

    /// The temp directory of a multi-writer save (see [`Self::begin_shared`]).
    pub fn shared_temp_dir(&self, step: u64, tag: u64) -> PathBuf {
        self.root
            .join(format!(".{}.tmp-{tag}", step_dir_name(step)))
    }

    /// Multi-writer save, phase 3 (one rank, after every writer's files are durable):
    /// writes the manifest listing `entries`, commits, prunes. On error the temp directory
    /// is removed.
    pub fn commit_shared(
        &self,
        tmp: &Path,
        step: u64,
        entries: Vec<FileEntry>,
        meta: ManifestMeta,
    ) -> Result<PathBuf> {
        let final_dir = self.root.join(step_dir_name(step));
        let mut names = std::collections::HashSet::new();
        for e in &entries {
            if e.name == MANIFEST_FILE || !names.insert(e.name.clone()) {
                self.abandon(tmp);
                return Err(CheckpointError::DuplicateFile {
                    dir: final_dir,
                    name: e.name.clone(),
                });
            }
        }
        if let Err(e) = commit(tmp, &final_dir, &self.root, step, entries, meta) {
            self.abandon(tmp);
            return Err(e);
        }
        tracing::info!(dir = %final_dir.display(), step, "checkpoint committed");
        if let Err(e) = self.prune(&final_dir) {
            tracing::warn!(error = %e, "checkpoint saved but pruning old checkpoints failed");
        }
        Ok(final_dir)
    }

    /// Removes the temp directory of a save that failed on some rank.
    pub fn abandon(&self, tmp: &Path) {
        if tmp.exists()
            && let Err(rm) = std::fs::remove_dir_all(tmp)
        {
            tracing::warn!(dir = %tmp.display(), error = %rm, "could not remove temporary checkpoint directory after a failed save");
        }
    }

    /// The newest complete checkpoint under the root, or `None` if there is none.
    pub fn latest_complete(&self) -> Result<Option<PathBuf>> {
        latest_complete(&self.root)
    }

    /// All complete checkpoints under the root, oldest first.
    pub fn list_complete(&self) -> Result<Vec<(u64, PathBuf)>> {
        list_complete(&self.root)
    }

    /// Removes `.step-*.tmp-*` / `.step-*.deleting-*` directories left by a crashed run
    /// (never `.step-*.incomplete-*`: those hold what a user may want back).
    fn remove_stale_temp_dirs(&self) -> Result<()> {
        let entries =
            std::fs::read_dir(&self.root).map_err(io_err("list checkpoint root", &self.root))?;
        for entry in entries {
            let entry = entry.map_err(io_err("list checkpoint root", &self.root))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(".step-") && (name.contains(".tmp-") || name.contains(".deleting-"))
            {
                let path = entry.path();
                tracing::warn!(dir = %path.display(), "removing stale temporary checkpoint directory left by an interrupted run");
                std::fs::remove_dir_all(&path)
                    .map_err(io_err("remove stale temporary checkpoint directory", &path))?;
            }
        }
        Ok(())
    }

    /// Deletes the oldest complete checkpoints beyond `keep_last`, never `just_written`.
    fn prune(&self, just_written: &Path) -> Result<Vec<PathBuf>> {
        // Quiet: what a resume skips was already reported when the run resumed.
        let all = scan(&self.root, false)?;
        let excess = all.len().saturating_sub(self.keep_last);
        let mut removed = Vec::new();
        for (step, dir) in all
            .into_iter()
            .filter(|(_, d)| d != just_written)
            .take(excess)
        {
            // Rename first so a crash mid-delete never leaves a `step-N` with missing files.
            let doomed = self.root.join(format!(
                ".{}.deleting-{}",
                step_dir_name(step),
                std::process::id()
            ));
            std::fs::rename(&dir, &doomed)
                .map_err(io_err("rename old checkpoint for deletion", &dir))?;
            std::fs::remove_dir_all(&doomed).map_err(io_err("delete old checkpoint", &doomed))?;
            tracing::info!(dir = %dir.display(), "deleted old checkpoint (keep_last = {})", self.keep_last);
            removed.push(dir);
        }
        Ok(removed)
    }
}

fn write_and_commit<N: AsRef<str>>(
    tmp: &Path,
    final_dir: &Path,
    root: &Path,
    step: u64,
    files: &[(N, Vec<NamedTensor>)],
    meta: ManifestMeta,
) -> Result<()> {
    let entries = write_files(tmp, files)?;
    commit(tmp, final_dir, root, step, entries, meta)
}

/// Encodes and durably writes one safetensors file per `(file name, tensors)` into `dir`;
/// returns their manifest entries. Multi-writer saves: phase 2, on every writer.
pub fn write_files<N: AsRef<str>>(
    dir: &Path,
    files: &[(N, Vec<NamedTensor>)],
) -> Result<Vec<FileEntry>> {
    let mut entries = Vec::with_capacity(files.len());
    for (name, tensors) in files {
        let name = name.as_ref();
        check_file_name(name, "write_files() argument")?;
        let bytes = tensor::encode(name, tensors)?;
        write_durable(&dir.join(name), &bytes)?;
        entries.push(FileEntry {
            name: name.into(),
            bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
        });
    }
    Ok(entries)
}

/// Writes the manifest last (its presence marks the checkpoint complete), then renames the
/// temp directory into place.
fn commit(
    tmp: &Path,
    final_dir: &Path,
    root: &Path,
    step: u64,
    entries: Vec<FileEntry>,
    meta: ManifestMeta,
) -> Result<()> {
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step,
        tokens_seen: meta.tokens_seen,
        model_signature: meta.model_signature,
        trainer_state: meta.trainer_state,
        config: meta.config,
        files: entries,
    };
    let json = encode_manifest(&manifest).map_err(|e| CheckpointError::ManifestInvalid {
        path: tmp.join(MANIFEST_FILE),
        reason: format!("could not serialize: {e}"),
    })?;
    write_durable(&tmp.join(MANIFEST_FILE), &json)?;
    fsync_dir(tmp)?;
    // Again: another process may have created it since the save began.
    make_room(root, final_dir)?;
    std::fs::rename(tmp, final_dir)
        .map_err(io_err("rename temporary checkpoint into place", final_dir))?;
    fsync_dir(root)
}

fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Before a save commits `final_dir` (`step-N`): a complete checkpoint there is never
/// overwritten ([`CheckpointError::AlreadyExists`]); what [`list_complete`] skips there (no
/// manifest, a damaged one, a symbolic link, a plain file) would block every later save of
/// step N, so it is renamed to `.step-N.incomplete-<unix time>` with a warning. Other
/// manifest errors (an unknown format version, ...) are returned: the directory may be a
/// complete checkpoint this build cannot judge.
fn make_room(root: &Path, final_dir: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(final_dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect existing checkpoint", final_dir)(e)),
    };
    let reason = if meta.file_type().is_symlink() {
        symlink_description(final_dir)
    } else if !meta.is_dir() {
        "it is not a directory".to_string()
    } else {
        match read_manifest(final_dir) {
            Ok(_) => {
                return Err(CheckpointError::AlreadyExists {
                    path: final_dir.into(),
                });
            }
            Err(e) if is_incomplete(&e) => e.to_string(),
            Err(e) => return Err(e),
        }
    };
    let name = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = root.join(format!(".{name}.incomplete-{secs}"));
    for n in 1.. {
        if std::fs::symlink_metadata(&aside).is_err() {
            break;
        }
        aside = root.join(format!(".{name}.incomplete-{secs}-{n}"));
    }
    std::fs::rename(final_dir, &aside)
        .map_err(io_err("move incomplete checkpoint aside", final_dir))?;
    tracing::warn!(
        dir = %final_dir.display(),
        moved_to = %aside.display(),
        reason = %reason,
        "an incomplete checkpoint directory stood where this save goes; it was moved aside \
         (never loaded or deleted: inspect it, then delete it yourself)"
    );
    Ok(())
}

/// Manifest errors that mean "not a complete checkpoint" (a crash, a torn or damaged
/// manifest), as opposed to a checkpoint this build cannot read or a hostile directory.
fn is_incomplete(e: &CheckpointError) -> bool {
    matches!(
        e,
        CheckpointError::ManifestMissing { .. }
            | CheckpointError::ManifestInvalid { .. }
            | CheckpointError::ManifestCorrupt { .. }
    )
}

fn symlink_description(path: &Path) -> String {
    match std::fs::read_link(path) {
        Ok(target) => format!("it is a symbolic link to {}", target.display()),
        Err(_) => "it is a symbolic link".into(),
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// All complete checkpoints under `root`, oldest first. Temp and quarantined directories
/// are ignored; `step-N` entries that are symbolic links, or whose manifest is missing,
/// unparsable or fails its digest, are skipped with a warning; a manifest of an unknown
/// format version (or one that is a link, FIFO, ...) is an error (it must not be silently
/// skipped in favour of an older checkpoint). A missing root has no checkpoints; the root
/// itself may be a symbolic link.
pub fn list_complete(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    scan(root, true)
}

/// [`list_complete`], with the warnings about skipped directories only when `report`.
fn scan(root: &Path, report: bool) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list checkpoint root", root)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list checkpoint root", root))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(parse_step_dir) else {
            continue;
        };
        let dir = entry.path();
        // The entry's own type: a link to a directory is not followed.
        let kind = entry
            .file_type()
            .map_err(io_err("inspect checkpoint directory", &dir))?;
        if kind.is_symlink() {
            if report {
                tracing::warn!(dir = %dir.display(), reason = %symlink_description(&dir), "skipping a checkpoint directory that is a symbolic link: checkpoints are loaded only from real step-N directories; copy it here, or pass its target to --resume explicitly");
            }
            continue;
        }
        if !kind.is_dir() {
            continue;
        }
        match read_manifest(&dir) {
            Ok(_) => out.push((step, dir)),
            Err(e) if is_incomplete(&e) => {
                if report {
                    tracing::warn!(dir = %dir.display(), error = %e, "skipping incomplete or damaged checkpoint directory: it is never loaded, and a save of this step moves it aside");
                }
            }
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint under `root` (see [`list_complete`]), or `None`.
pub fn latest_complete(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list_complete(root)?.pop().map(|(_, d)| d))
}

/// Resolves a resume spec: `"auto"` gives the newest complete checkpoint under `root`
/// (or `None` to start fresh); anything else is a checkpoint directory path (relative
/// paths are relative to the working directory) that must hold a valid manifest; a path
/// that is a symbolic link is resolved (and the target logged).
pub fn resume_target(root: &Path, spec: &str) -> Result<Option<PathBuf>> {
    if spec == "auto" {
        return latest_complete(root);
    }
    let not = |reason: String| CheckpointError::NotACheckpoint {
        spec: spec.into(),
        reason,
    };
    if spec.is_empty() {
        return Err(not(
            "it is empty; use \"auto\" or a checkpoint directory path".into(),
        ));
    }
    let mut dir = PathBuf::from(spec);
    if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
        let target = std::fs::canonicalize(&dir).map_err(|e| {
            not(format!(
                "{} is a symbolic link that does not resolve ({e}); use \"auto\" or an existing step-N directory",
                dir.display()
            ))
        })?;
        tracing::info!(link = %dir.display(), target = %target.display(), "the resume path is a symbolic link; resuming from its target");
        dir = target;
    }
    if !dir.is_dir() {
        return Err(not(format!(
            "{} is not a directory; use \"auto\" or an existing step-N directory",
            dir.display()
        )));
    }
    read_manifest(&dir).map_err(|e| not(e.to_string()))?;
    Ok(Some(dir))
}

/// Reads a checkpoint, verifying every listed file's existence, length and sha256 and
/// decoding it, before returning anything.
pub fn load(dir: &Path) -> Result<LoadedCheckpoint> {
    load_kinds(dir, |_| true)
}

/// [`load`] of the tensor files whose kind (`model`, `optimizer`; see
/// `tensor_file_kind`) `wanted` accepts: a weights-only reader (evaluation) does not read
/// the optimizer's shards.
pub fn load_kinds(dir: &Path, wanted: impl Fn(&str) -> bool) -> Result<LoadedCheckpoint> {
    let manifest = read_manifest(dir)?;
    if manifest.format_version < FORMAT_VERSION {
        tracing::warn!(
            manifest = %dir.join(MANIFEST_FILE).display(),
            "this checkpoint's manifest is format {}, which carries no digest of its own: its \
             step, trainer state and config are unverified (its data files are still checked \
             against it); checkpoints saved from now on are format {FORMAT_VERSION}",
            manifest.format_version
        );
    }
    let mut files = Vec::with_capacity(manifest.files.len());
    for entry in &manifest.files {
        if !tensor::tensor_file_kind(&entry.name).is_none_or(&wanted) {
            continue;
        }
        let bytes = read_verified(dir, entry)?;
        let path = file_path(dir, entry);
        files.push((entry.name.clone(), tensor::decode(&path, &bytes)?));
    }
    Ok(LoadedCheckpoint {
        dir: dir.into(),
        manifest,
        files,
    })
}

/// Reads one manifest-listed file and checks its length and digest: only a regular file
/// (see [`open_regular`]), only if its length is the manifest's, and no more than that.
pub(crate) fn read_verified(dir: &Path, entry: &FileEntry) -> Result<Vec<u8>> {
    let path = file_path(dir, entry);
    let Some((file, len)) = open_regular(&path)? else {
        return Err(CheckpointError::MissingFile { path });
    };
    if len != entry.bytes {
        return Err(CheckpointError::LengthMismatch {
            path,
            expected: entry.bytes,
            actual: len,
        });
    }
    let bytes = read_at_most(file, len, &path)?;
    // Shorter than its fstat length: truncated while it was read.
    if bytes.len() as u64 != entry.bytes {
        return Err(CheckpointError::LengthMismatch {
            path,
            expected: entry.bytes,
            actual: bytes.len() as u64,
        });
    }
    let actual = sha256_hex(&bytes);
    if actual != entry.sha256 {
        return Err(CheckpointError::ChecksumMismatch {
            path,
            expected: entry.sha256.clone(),
            actual,
        });
    }
    Ok(bytes)
}
