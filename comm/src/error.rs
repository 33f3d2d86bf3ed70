//! Errors of the communication layer. Each says what went wrong, where (operation,
//! communicator, ranks) and what to do about it.

use std::time::Duration;

/// Result alias of the communication layer.
pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// Everything that can go wrong in `switchyard-comm`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    /// A collective or point-to-point operation did not complete within the configured timeout.
    #[error(
        "{op} on communicator `{comm}` (rank {rank} of {size}) timed out after {timeout:?}; \
         ranks that did not arrive: {missing:?}{detail}. Check that every rank issues the same \
         operations in the same order (a rank that crashed, hangs in compute or took another \
         branch), or raise `comm.timeout_s`"
    )]
    Timeout {
        op: String,
        comm: String,
        rank: usize,
        size: usize,
        timeout: Duration,
        /// Ranks (in this communicator) whose contribution had not arrived.
        missing: Vec<usize>,
        /// Extra diagnostics (what the missing ranks were doing, where known).
        detail: String,
    },
    /// Ranks called different operations, or the same one with incompatible types or sizes.
    #[error(
        "mismatched {op} on communicator `{comm}` (seen by rank {rank}): {detail}. Every rank \
         must call the same collective, in the same order, with the same element type and \
         matching sizes"
    )]
    Mismatch {
        op: String,
        comm: String,
        rank: usize,
        detail: String,
    },
    /// The caller passed arguments that cannot be right (wrong lengths, bad rank, ...).
    #[error("invalid arguments to {op} on communicator `{comm}` (rank {rank}): {detail}")]
    InvalidArgument {
        op: String,
        comm: String,
        rank: usize,
        detail: String,
    },
    /// A call into the MPI or NCCL library failed.
    #[error(
        "{backend} call {call} failed during {op} on communicator `{comm}` (rank {rank}) at \
         {location}: {detail}"
    )]
    Backend {
        backend: &'static str,
        call: &'static str,
        op: String,
        comm: String,
        rank: usize,
        location: String,
        detail: String,
    },
    /// A backend cannot be used on this machine or build.
    #[error("the {backend} backend is not available: {reason}. {hint}")]
    Unavailable {
        backend: &'static str,
        reason: String,
        hint: String,
    },
    /// A rank this operation needs left without taking part (threads of one process: its
    /// thread returned or failed). Its own error, if any, is the cause.
    #[error(
        "{op} on communicator `{comm}` (rank {rank} of {size}): rank(s) {exited:?} stopped \
         without taking part (finished, or failed with their own error); this rank stops too"
    )]
    PeerExited {
        op: String,
        comm: String,
        rank: usize,
        size: usize,
        exited: Vec<usize>,
    },
    /// The communicator is unusable because an earlier operation on it failed.
    #[error(
        "communicator `{comm}` (rank {rank}) is unusable after an earlier failure ({first}); \
         abort the job (`Communicator::abort`)"
    )]
    Poisoned {
        comm: String,
        rank: usize,
        first: String,
    },
}

impl CommError {
    /// Whether this error only reports another rank's failure (that rank's own error is the
    /// one to show the user).
    pub fn is_consequence(&self) -> bool {
        matches!(
            self,
            CommError::PeerExited { .. } | CommError::Poisoned { .. }
        )
    }

    /// The ranks that did not arrive, for a timeout; empty otherwise.
    pub fn missing_ranks(&self) -> &[usize] {
        match self {
            CommError::Timeout { missing, .. } => missing,
            _ => &[],
        }
    }
}
