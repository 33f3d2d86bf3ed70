//! switchyard-tools: the benchmark and harness binaries (`src/bin`), and what they share
//! with the tests that run the same suites inside `cargo test`:
//!
//! - [`comm_conformance`]: one suite of collective checks, run unchanged against every
//!   `Communicator` backend (threads in `cargo test`, MPI under mpirun, NCCL on GPUs).
//! - [`cp_conformance`]: context-parallel attention (ring, TokenRing) against dense
//!   attention, forward and backward, on any communicator.
//! - [`parity`]: layout parity of the whole training step (loss, gradients, weights after
//!   AdamW steps) against one process.
//! - [`trace`] and [`clock`]: record each emulated rank's compute and communication, then
//!   replay the traces on virtual clocks with a link model (benchmarks that emulate more
//!   ranks than the machine has cores).
//! - [`cli`]: command-line values the binaries share.
//!
//! Nothing here is a dependency of the trainer or the `switchyard` binary.

pub mod cli;
pub mod clock;
pub mod comm_conformance;
pub mod cp_conformance;
pub mod parity;
pub mod trace;

use std::time::Duration;

use switchyard_comm::{Communicator, LocalWorld};

/// Runs `f(world)` on `n` threads of a local world (one per rank, 64 MiB stacks: deep
/// autodiff graphs recurse in the backward pass) and returns the results in rank order.
pub fn run_world<R: Send>(n: usize, f: impl Fn(Box<dyn Communicator>) -> R + Sync) -> Vec<R> {
    let comms = LocalWorld::new(n, Duration::from_secs(120), None);
    LocalWorld::spawn(comms, Some(64 << 20), |c| f(Box::new(c)))
}
