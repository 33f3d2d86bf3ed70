//! `switchyard-parallel`: expert, data and context parallelism applied from outside to the
//! single-device model of `switchyard-moe`, over the `Communicator` of `switchyard-comm`.
//!
//! - [`parallelize`] -> [`Layout`]: the one entry from the `parallel:` node and the world
//!   communicator to everything per-rank (the order the parallelisms are applied in is in
//!   [`layout`]); the trainer talks to the other ranks only through the [`Layout`].
//! - [`Mesh`]: world = dp x cp x ep, one sub-communicator per axis (fixed topology);
//!   [`ExpertPlacement`]: which ep rank owns which expert, per MoE layer (run-time state).
//! - [`glue`]: burn tensors <-> `comm::Buffer`.
//! - [`autodiff`]: a distributed operation written against burn's generic tensor API as one
//!   autodiff node on any backend of the build (flex, CubeCL: CUDA and wgpu).
//! - [`all_to_all`]: the row all-to-all as a custom autodiff operation (backward = the
//!   transposed all-to-all).
//! - [`AllToAllDispatcher`]: `moe`'s `TokenDispatcher` for expert parallelism.
//! - [`overlap`]: the expert-parallel block split into chunks whose transfers overlap the
//!   expert compute (forward and backward), with `auto` chunking from a cost model.
//! - [`cp`]: context parallelism: ring attention and TokenRing as a custom autodiff
//!   operation, zigzag sequence sharding, the model's attention implementation for cp > 1.
//! - [`apply_layout`] and [`GradSync`]: apply EP + DP + CP to a model; synchronise
//!   gradients so the trained weights do not depend on the layout ([`grad_sync`] documents
//!   the loss scaling).
//! - [`seam`]: a failed collective inside the model (whose seams have no error channel)
//!   unwinds to the step, which reports it as one error.
//! - [`migrate()`]: live expert migration (weights and optimizer state move to the new
//!   owners of per-layer placements at a step boundary).

pub mod all_to_all;
pub mod autodiff;
pub mod config;
pub mod cp;
pub mod device_path;
pub mod dispatcher;
mod error;
pub mod glue;
pub mod grad_sync;
pub mod layout;
pub mod mesh;
pub mod migrate;
pub mod overlap;
pub mod seam;
pub mod shard;

pub use config::{ParallelConfig, ShardOptimizer};
pub use cp::{CpAlgorithm, CpAttention, CpConfig, SeqLayout, Sharding, shard_sequence};
pub use dispatcher::AllToAllDispatcher;
pub use error::{ParallelError, Result};
pub use grad_sync::{GradSync, LossScale, SyncGroup, WorldReducer, apply_layout};
pub use layout::{Layout, Parallelized, parallelize, parallelize_placed};
pub use mesh::{ExpertPlacement, Mesh, MeshShape, Placement};
pub use migrate::{ExpertMove, ExpertState, WeightsOnly, migrate, relayout};
pub use overlap::Overlap;
pub use shard::{Ownership, ShardedSync};

// What the trainer needs of the transport, handed on so that it depends on `comm` only
// through this crate: the world it passes to `parallelize`, and the `comm:` config node.
#[cfg(feature = "cuda")]
pub use switchyard_comm::cuda;
pub use switchyard_comm::{
    CommBackendConfig, CommConfig, Communicator, MAX_TIMEOUT_S, duration_from_secs, valid_timeout_s,
};
