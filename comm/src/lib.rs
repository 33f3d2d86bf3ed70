//! `switchyard-comm`: Switchyard's transport. It knows bytes and typed buffers, not tensors
//! or models (`parallel` adapts tensors to it).
//!
//! - [`Communicator`]: rank, size, collectives (barrier, broadcast, all-reduce, all-gather(v),
//!   reduce-scatter, all-to-all(v)), point-to-point, `split`; non-blocking `i_*` versions
//!   returning a [`Request`] to `test`/`wait`.
//! - Backends: [`local`] (ranks as threads, optional link model), `mpi` (feature `mpi`),
//!   `nccl` (feature `nccl`). `cuda::probe` (feature `cuda`): is a CUDA driver and device
//!   present (asked before burn's CUDA backend is touched).
//! - [`CommConfig`]: the `comm:` config node.
//!
//! Only this crate contains `unsafe` FFI; each foreign call is wrapped once in a helper that
//! names the call, the operation and the source location in its error.

// Errors carry the operation, communicator and ranks by value; they are built only on the
// failure path, so their size does not matter.
#![allow(clippy::result_large_err)]

pub mod census;
mod communicator;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dtype;
mod error;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;

pub(crate) use communicator::Check;
pub use communicator::{BackendKind, Communicator, DeviceCollectives, PendingOp, Request};
pub use config::{
    CommBackendConfig, CommConfig, LinkConfig, MAX_TIMEOUT_S, MpiProgress, deadline_after,
    duration_from_secs, valid_timeout_s,
};
pub use dtype::{Buffer, DType, Element, ReduceOp};
pub use error::{CommError, Result};
pub use half::{bf16, f16};
pub use local::{LinkModel, LocalWorld};
