//! The parallel layouts on one GPU (feature `cuda`): ranks as threads sharing GPU 0, the
//! all-to-all (plain and the chunked pipelined block), ring attention and TokenRing as
//! backend-generic autodiff nodes on CUDA tensors, gradient sync and a migration through
//! host buffers. Each case is compared with its single-process reference on the same GPU
//! (loss, every gradient, weights after 3 AdamW steps) at the GPU suite's fp32 tolerance,
//! 2e-3 (CubeCL may take TF32 paths for f32 GEMMs). Without a GPU every test prints
//! `skipped: <reason>` and passes; `scripts/gpu_check.sh` runs it on a GPU machine.
#![cfg(feature = "cuda")]

use std::time::{Duration, Instant};

use burn::tensor::Device;
use switchyard_tools::parity::{Case, all_cases, run_case};
use switchyard_trainer::device::DeviceConfig;

const GPU_TOL: f32 = 2e-3;

/// GPU 0 (autodiff), or `None` after printing why there is none.
fn cuda() -> Option<Device> {
    match DeviceConfig::Cuda(Some(0)).resolve(0) {
        Ok(device) => Some(device),
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

fn run_matching(filter: impl Fn(&Case) -> bool) {
    let Some(gpu) = cuda() else { return };
    let cases: Vec<Case> = all_cases().into_iter().filter(|c| filter(c)).collect();
    assert!(!cases.is_empty());
    for case in &cases {
        let started = Instant::now();
        let worst = run_case(case, &gpu, GPU_TOL, Duration::from_secs(300));
        println!(
            "cuda: {} {}: max relative error {worst:e} ({:.1} s)",
            case.label,
            case.layout(),
            started.elapsed().as_secs_f64()
        );
    }
}

#[test]
fn expert_parallel_on_cuda_matches_single_process() {
    run_matching(|c| {
        c.cp == 1 && c.dp * c.ep == 2 && c.owners.is_none() && c.label == "top-k"
            || c.migrate.is_some() && c.ep == 2 && c.label.starts_with("top-k")
            || c.overlap.is_some() && c.ep == 2 && c.dp == 1 && c.label.starts_with("top-k")
    });
}

#[test]
fn ring_attention_and_token_ring_on_cuda_match_single_process() {
    run_matching(|c| c.cp == 2 && c.dp * c.ep <= 2);
}
