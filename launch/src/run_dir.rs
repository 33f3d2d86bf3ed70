//! The run directory, settled before anything in it is touched: one run at a time (a lock
//! that dies with its holder), every directory the run writes to writable now rather than at
//! the first save, and no run silently continuing over (or deleting) a previous run's output.
//!
//! The lock is `flock(LOCK_EX | LOCK_NB)` on `.switchyard.lock` in `run.output_dir` (and in
//! `checkpoint.dir` when that lies outside it); the file holds the holder's host, pid and
//! start time for the refusal message. The kernel releases the lock when its process ends,
//! however it ends, so a crashed run never blocks the next. On NFS, Linux emulates flock
//! with a POSIX lock on the server, so runs on different clients exclude each other when the
//! server supports locking, and a mount with `nolock` makes the lock local to one client.
//! On Lustre, flock needs the `flock` mount option (`localflock`: one node only); where the
//! filesystem refuses locks altogether the run goes on unlocked, with a warning.
//!
//! Only the process of launcher rank 0 calls [`prepare`] (one process per rank under
//! mpirun / srun; ranks as threads share their process's lock).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use switchyard_trainer::checkpoint::{list_complete, read_manifest};
use switchyard_trainer::config::Config;
use switchyard_trainer::metrics::{JSONL_FILE, TENSORBOARD_DIR};

/// The lock file, in the run directory and in an outside checkpoint directory.
pub const LOCK_FILE: &str = ".switchyard.lock";

/// Holds the run's locks; they are released when it is dropped (or the process ends).
#[derive(Debug)]
pub struct RunDirLock {
    _files: Vec<File>,
}

/// Locks the run's directories, decides whether this command may write into them (`resume`:
/// the `--resume` spec; `start_over`: `--start-over`) and checks that it can.
pub fn prepare(cfg: &Config, resume: Option<&str>, start_over: bool) -> Result<RunDirLock> {
    let out = cfg.run.output_dir.clone();
    let ckpt = checkpoint_root(cfg);
    let mut files = vec![lock(&out, "run.output_dir")?];
    if !inside(&ckpt, &out)? {
        files.push(lock(&ckpt, "checkpoint.dir")?);
    }
    match resume {
        None => {
            if let Some(what) = previous_run(&out, &ckpt)? {
                if !start_over {
                    bail!(
                        "{} already holds a run ({what}); this command would train over it. \
                         Choose one: `--resume auto` continues that run from its newest \
                         checkpoint; `--set run.output_dir=<new dir>` starts a new run \
                         elsewhere; `--start-over` moves the old run aside (renamed to \
                         `<dir>.previous-<time>`, nothing deleted) and starts fresh",
                        out.display()
                    );
                }
                // The locks are taken again on the new, empty directories.
                drop(files);
                files = start_afresh(&out, &ckpt)?;
            }
        }
        Some("auto") => {}
        Some(spec) => check_no_newer(&ckpt, Path::new(spec))?,
    }
    writable(&out, "run.output_dir")?;
    writable(&ckpt, "checkpoint.dir")?;
    if cfg.metrics.tensorboard {
        writable(&out.join(TENSORBOARD_DIR), "the TensorBoard directory")?;
    }
    Ok(RunDirLock { _files: files })
}

fn checkpoint_root(cfg: &Config) -> PathBuf {
    cfg.checkpoint
        .dir
        .clone()
        .unwrap_or_else(|| cfg.run.output_dir.join("checkpoints"))
}

/// Whether `dir` is `parent` or below it (both exist after `lock`, or are created here).
fn inside(dir: &Path, parent: &Path) -> Result<bool> {
    create(dir, "checkpoint.dir")?;
    let canon = |p: &Path| {
        p.canonicalize()
            .with_context(|| format!("resolving {}", p.display()))
    };
    Ok(canon(dir)?.starts_with(canon(parent)?))
}

fn create(dir: &Path, key: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create {key} {}; fix the path or its permissions, or set {key} to a \
             writable directory",
            dir.display()
        )
    })
}

/// Takes the exclusive lock of `dir` (created if missing) and records who holds it.
fn lock(dir: &Path, key: &str) -> Result<File> {
    create(dir, key)?;
    let path = dir.join(LOCK_FILE);
    // No truncation before the lock is ours: the file names the run that holds it.
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| {
            format!(
                "{key} {} is not writable (creating its lock file {}); fix its permissions or \
                 set {key} to a writable directory",
                dir.display(),
                path.display()
            )
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = match holder.trim() {
                "" => "its details are not written yet".to_string(),
                h => h.to_string(),
            };
            bail!(
                "{key} {} is in use by another switchyard run ({holder}; lock file {}). Wait \
                 for that run to end or stop it, or give this run another directory \
                 (`--set {key}=<new dir>`)",
                dir.display(),
                path.display()
            );
        }
        Err(TryLockError::Error(e)) => {
            tracing::warn!(dir = %dir.display(), error = %e, "this filesystem does not support flock: the run directory is not protected against a second run");
            return Ok(file);
        }
    }
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    file.set_len(0)
        .and_then(|()| {
            writeln!(
                file,
                "host {}, pid {}, started {}",
                hostname(),
                std::process::id(),
                utc(started)
            )
        })
        .with_context(|| format!("writing the lock file {}", path.display()))?;
    Ok(file)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown host".into())
}

/// `2024-06-01T12:00:00Z` of Unix seconds (the civil-from-days algorithm, proleptic
/// Gregorian calendar).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64 + 719_468;
    let (era, doe) = (days.div_euclid(146_097), days.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let s = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// What of a previous run `out` and `ckpt` hold (committed checkpoints, metrics), if any. A
/// run that stopped before its first metric line left nothing worth keeping.
fn previous_run(out: &Path, ckpt: &Path) -> Result<Option<String>> {
    let checkpoints = list_complete(ckpt)?;
    if let Some((step, _)) = checkpoints.last() {
        return Ok(Some(format!(
            "{} committed checkpoint(s) in {}, the newest of step {step}",
            checkpoints.len(),
            ckpt.display()
        )));
    }
    let metrics = out.join(JSONL_FILE);
    if std::fs::metadata(&metrics).is_ok_and(|m| m.len() > 0) {
        return Ok(Some(format!("metrics in {}", metrics.display())));
    }
    let events = std::fs::read_dir(out.join(TENSORBOARD_DIR)).is_ok_and(|mut d| {
        d.any(|e| {
            e.is_ok_and(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("events.out.tfevents.")
            })
        })
    });
    Ok(events.then(|| {
        format!(
            "TensorBoard events in {}",
            out.join(TENSORBOARD_DIR).display()
        )
    }))
}

/// `--start-over`: renames `out` (and an outside `ckpt`) to `<dir>.previous-<time>` and
/// locks new, empty directories in their place.
fn start_afresh(out: &Path, ckpt: &Path) -> Result<Vec<File>> {
    let outside = !inside(ckpt, out)?;
    move_aside(out, "run.output_dir")?;
    let mut files = vec![lock(out, "run.output_dir")?];
    if outside {
        move_aside(ckpt, "checkpoint.dir")?;
        files.push(lock(ckpt, "checkpoint.dir")?);
    }
    Ok(files)
}

fn move_aside(dir: &Path, key: &str) -> Result<()> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stamp = utc(secs).replace([':', '-'], "");
    let name = dir
        .file_name()
        .with_context(|| format!("{key} {} has no name to rename", dir.display()))?
        .to_string_lossy()
        .into_owned();
    // rename(2) replaces an empty directory: never reuse a name.
    let target = (0..)
        .map(|n| match n {
            0 => dir.with_file_name(format!("{name}.previous-{stamp}")),
            n => dir.with_file_name(format!("{name}.previous-{stamp}-{n}")),
        })
        .find(|p| !p.exists())
        .expect("an unused name");
    std::fs::rename(dir, &target).with_context(|| {
        format!(
            "--start-over: could not move {key} {} aside to {}; move or delete it yourself, \
             or set {key} to a new directory",
            dir.display(),
            target.display()
        )
    })?;
    eprintln!(
        "--start-over: the previous run in {} was moved to {}",
        dir.display(),
        target.display()
    );
    Ok(())
}

/// `--resume PATH` of a checkpoint older than committed ones in this run's checkpoint
/// directory: the run would stop at the first save of a step that exists ("never
/// overwritten"), after deleting newer checkpoints under `keep_last`.
fn check_no_newer(ckpt: &Path, resume: &Path) -> Result<()> {
    // An unreadable PATH is reported by the resume itself.
    let Ok(manifest) = read_manifest(resume) else {
        return Ok(());
    };
    let newer: Vec<_> = list_complete(ckpt)?
        .into_iter()
        .filter(|(step, _)| *step > manifest.step)
        .collect();
    if let Some((step, dir)) = newer.last() {
        bail!(
            "--resume {} is the checkpoint of step {}, but {} holds {} newer one(s) up to step \
             {step} ({}); continuing from the older one would collide with them. Choose one: \
             `--resume auto` continues from the newest; `--set run.output_dir=<new dir>` (and \
             `checkpoint.dir` if set) branches a new run off step {}; or move the newer \
             checkpoints away yourself",
            resume.display(),
            manifest.step,
            ckpt.display(),
            newer.len(),
            dir.display(),
            manifest.step
        );
    }
    Ok(())
}

/// Creates `dir` if missing and checks that a file can be created in it, so a read-only
/// directory is found now, not at the first save.
fn writable(dir: &Path, key: &str) -> Result<()> {
    create(dir, key)?;
    let probe = dir.join(format!(".switchyard-write-probe-{}", std::process::id()));
    File::create(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| {
            format!(
                "{key} {} is not writable (creating a probe file in it); fix its permissions \
                 or point {key} at a writable directory",
                dir.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_formats_unix_seconds() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400 + 3_723), "2000-02-29T01:02:03Z");
        assert_eq!(utc(1_718_000_000), "2024-06-10T06:13:20Z");
    }
}
