//! Shared helpers: run a closure on every rank of a local world, each on its own thread.
#![allow(dead_code)]

use std::time::Duration;

use switchyard_comm::{Communicator, LocalWorld};

/// Runs `f(world)` on `n` threads (one per rank) and returns the results in rank order.
pub fn run_world<R: Send>(n: usize, f: impl Fn(Box<dyn Communicator>) -> R + Sync) -> Vec<R> {
    let comms = LocalWorld::new(n, Duration::from_secs(120), None);
    LocalWorld::spawn(comms, Some(64 << 20), |c| f(Box::new(c)))
}

pub fn to_vec<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.inner()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}
