//! The trainer's error type: what failed, at which step or path, and what to do.

use std::path::PathBuf;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("data: {0}")]
    Data(#[from] crate::data::DataError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error(
        "step {step}: the {what} is not finite ({value}); train.nonfinite is `stop`. \
         Lower optim.lr, set optim.grad_clip, or set train.nonfinite: skip"
    )]
    NonFinite {
        step: u64,
        what: &'static str,
        value: f64,
    },
    /// Another rank failed; its own error is the cause.
    #[error("{0}")]
    OtherRank(String),
    #[error("parallel: {0}")]
    Parallel(#[from] switchyard_parallel::ParallelError),
    #[error("placement: {0}")]
    Placement(String),
    #[error("resume from {path}: {message}")]
    Resume { path: PathBuf, message: String },
    /// `--init-from` could not take the checkpoint's weights.
    #[error("--init-from {path}: {message}")]
    InitFrom { path: PathBuf, message: String },
    /// A checkpoint's files do not form a snapshot (whatever reads it: resume, init, eval).
    #[error("checkpoint {path}: {message}")]
    Snapshot { path: PathBuf, message: String },
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Device(#[from] crate::device::DeviceError),
}

impl TrainError {
    /// Whether this error only reports another rank's failure: when ranks run as threads of
    /// one process, the launcher shows the others' errors instead.
    pub fn is_consequence(&self) -> bool {
        match self {
            TrainError::OtherRank(_) => true,
            TrainError::Parallel(e) => e.is_consequence(),
            _ => false,
        }
    }
}
