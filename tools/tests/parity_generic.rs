//! The generic paths on the flex backend: with every fused CPU kernel switched off (its own
//! test binary, since the switch is process-wide), the model runs burn's generic ops, and
//! the pipelined expert-parallel block takes the generic chunked path that every non-flex
//! backend takes (`AllToAllDispatcher::try_chunked`). Pinned to the single-process
//! reference like the flex suite: 1e-5 relative. The same generic code runs on wgpu in
//! `parity_wgpu.rs` (feature `wgpu`).

use std::time::Duration;

use burn::tensor::Device;
use switchyard_kernels::{Fused, set_fused};
use switchyard_tools::parity::{Case, TOL, all_cases, run_case};

fn generic_only() {
    for op in Fused::ALL {
        set_fused(op, false);
    }
}

fn run_matching(filter: impl Fn(&Case) -> bool) {
    generic_only();
    let cases: Vec<Case> = all_cases().into_iter().filter(|c| filter(c)).collect();
    assert!(!cases.is_empty());
    let flex = Device::flex().autodiff();
    for case in &cases {
        let worst = run_case(case, &flex, TOL, Duration::from_secs(120));
        eprintln!(
            "generic: {} {}: max relative error {worst:e}",
            case.label,
            case.layout()
        );
    }
}

/// Every pipelined case (chunk counts 2, 3, 8 and `auto`, zero-token ranks, chunks without
/// rows, uneven placement, migration) through the generic chunked block.
#[test]
fn generic_chunked_block_matches_single_process() {
    run_matching(|c| c.overlap.is_some());
}

/// Ring attention and TokenRing with burn's generic attention tiles and no fused kernel
/// around them.
#[test]
fn generic_context_parallel_matches_single_process() {
    run_matching(|c| c.cp > 1 && c.dp * c.ep <= 2);
}
