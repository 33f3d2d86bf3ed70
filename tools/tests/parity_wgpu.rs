//! The layout-parity matrix on a second burn backend: wgpu (feature `wgpu`; in CI Mesa's
//! lavapipe, a software Vulkan device that runs the same CubeCL kernels a GPU would, as
//! WGSL compiled by naga; cubecl takes Vulkan first and OpenGL only without a Vulkan
//! device). Off
//! the flex backend the fused CPU kernels stand aside, so every case runs the generic
//! paths: the all-to-all, ring attention and TokenRing as backend-generic autodiff nodes
//! (`switchyard_parallel::autodiff`), gradient sync and migration through host buffers.
//! Each case's single-process reference runs on the same device; the tolerance is the flex
//! suite's (1e-5 relative, fp32).
//!
//! `cargo test --release -p switchyard-tools --features wgpu --test parity_wgpu`
#![cfg(feature = "wgpu")]

use std::time::{Duration, Instant};

use burn::tensor::{Device, DeviceKind, Tensor};
use switchyard_moe::ActivationCheckpointing;
use switchyard_tools::parity::{Case, TOL, all_cases, run_case};

/// The wgpu device (autodiff), after checking that an adapter exists: without one (no
/// Vulkan or OpenGL driver) cubecl panics deep inside; say what to install instead.
fn device() -> Device {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let probe = std::panic::catch_unwind(|| {
        let t = Tensor::<1>::from_floats([1.0, 2.0], &device);
        t.sum().into_scalar::<f32>()
    });
    match probe {
        Ok(sum) => assert_eq!(sum, 3.0, "the wgpu device adds 1 + 2 wrong"),
        Err(_) => panic!(
            "no usable wgpu adapter: on Debian install `mesa-vulkan-drivers` (lavapipe, a \
             CPU Vulkan driver)"
        ),
    }
    device.autodiff()
}

fn run_matching(filter: impl Fn(&Case) -> bool) {
    let device = device();
    // Activation recomputation runs on the flex backend only (config validation refuses it
    // elsewhere), so its cases stay on flex.
    let cases: Vec<Case> = all_cases()
        .into_iter()
        .filter(|c| c.recompute == ActivationCheckpointing::None && filter(c))
        .collect();
    assert!(!cases.is_empty());
    for case in &cases {
        let started = Instant::now();
        let worst = run_case(case, &device, TOL, Duration::from_secs(300));
        eprintln!(
            "wgpu: {} {}: max relative error {worst:e} ({:.1} s)",
            case.label,
            case.layout(),
            started.elapsed().as_secs_f64()
        );
    }
}

#[test]
fn expert_and_data_parallel_layouts_match_single_process_on_wgpu() {
    run_matching(|c| c.cp == 1 && c.overlap.is_none() && c.owners.is_none() && c.migrate.is_none());
}

#[test]
fn placements_and_live_migration_match_single_process_on_wgpu() {
    run_matching(|c| {
        c.cp == 1 && c.overlap.is_none() && (c.owners.is_some() || c.migrate.is_some())
    });
}

#[test]
fn pipelined_expert_block_matches_single_process_on_wgpu() {
    run_matching(|c| c.overlap.is_some());
}

#[test]
fn context_parallel_layouts_match_single_process_on_wgpu() {
    run_matching(|c| c.cp > 1);
}
