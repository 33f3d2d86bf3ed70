//! Layout parity on the local backend (threads): every case of `switchyard_tools::parity`
//! (dp=2, ep=2, ep=4, dp=2 x ep=2 x top-k / null experts / MoE++, zero-token ranks, one
//! expert for every token, non-contiguous and uneven placements, per-layer placements, live
//! migration, context parallelism with ring attention and TokenRing alone and with dp and ep,
//! sharded optimizer state and gradients with clipping) equals one process within
//! 1e-5 relative. The same cases run under mpirun through the `parity-mpi` binary.

use std::time::Duration;

use burn::tensor::Device;
use switchyard_comm::LocalWorld;
use switchyard_tools::parity::{
    Case, Forcing, TOL, all_cases, batch, build, check_case, model_cfg, routers, run_case,
    run_case_wrapped, tensors,
};

/// Runs the case on one thread per rank on flex; returns the agreed worst error.
fn run(case: &Case) -> f32 {
    let worst = run_case(
        case,
        &Device::flex().autodiff(),
        TOL,
        Duration::from_secs(120),
    );
    eprintln!(
        "{} {}: max relative error {worst:e}",
        case.label,
        case.layout()
    );
    worst
}

fn run_matching(filter: impl Fn(&Case) -> bool) {
    let cases: Vec<Case> = all_cases().into_iter().filter(|c| filter(c)).collect();
    assert!(!cases.is_empty());
    for case in &cases {
        run(case);
    }
}

#[test]
fn top_k_router_matches_single_process() {
    run_matching(|c| c.label == "top-k");
}

#[test]
fn null_experts_router_matches_single_process() {
    run_matching(|c| c.label == "null experts");
}

#[test]
fn moe_plus_plus_router_matches_single_process() {
    run_matching(|c| c.label == "MoE++");
}

#[test]
fn ranks_that_receive_zero_tokens_match_single_process() {
    run_matching(|c| c.forcing == Forcing::FirstTwo);
}

#[test]
fn every_token_to_one_expert_matches_single_process() {
    run_matching(|c| c.forcing == Forcing::Single);
}

#[test]
fn non_contiguous_and_uneven_placements_match_single_process() {
    run_matching(|c| c.owners.is_some() && !c.label.contains("per-layer"));
}

#[test]
fn per_layer_placements_match_single_process() {
    run_matching(|c| c.label.contains("per-layer"));
}

/// Weights and AdamW state moved after step 1: the next steps still equal one process.
#[test]
fn live_migration_matches_single_process() {
    run_matching(|c| c.migrate.is_some());
}

/// ZeRO-style sharding (`states`, `states_and_grads`) at dp=2, dp=4 and dp=2 x ep=2 with
/// every router, a live migration and cp=2 x ep=2, clipping on: owned gradients, the
/// weights every rank holds after 3 steps and the losses equal one process.
#[test]
fn sharded_optimizer_matches_single_process() {
    run_matching(|c| c.shard.is_sharded());
}

/// Activation recomputation (`full`, `selective`) around the all-to-all, the pipelined
/// expert block, ring attention and TokenRing, every router family: equal to one process.
#[test]
fn recomputation_matches_single_process() {
    run_matching(|c| c.recompute != switchyard_moe::ActivationCheckpointing::None);
}

/// The matrix covers every layout with every router.
#[test]
fn the_matrix_is_complete() {
    let cases = all_cases();
    for (name, _) in routers() {
        for layout in switchyard_tools::parity::LAYOUTS {
            assert!(
                cases
                    .iter()
                    .any(|c| c.label == name && (c.dp, c.ep) == layout),
                "{name} at {layout:?}"
            );
        }
    }
}

/// The forced batches really do what they claim (so the tests above cover the cases).
#[test]
fn forced_routing_sends_nothing_to_the_other_experts() {
    let (_, top_k) = routers().remove(0);
    for (forcing, k, allowed) in [(Forcing::FirstTwo, 2, 2usize), (Forcing::Single, 1, 1)] {
        let cfg = model_cfg(top_k.clone(), k);
        let device = Device::flex().autodiff();
        let model = build(&cfg, forcing, &device);
        let (inputs, _) = tensors(&batch(cfg.vocab_size), 8, &device);
        for (_, stats) in model.forward(inputs).moe_stats {
            let outside: f64 = stats.expert_fraction[allowed..].iter().sum();
            assert_eq!(outside, 0.0, "{forcing:?}: {:?}", stats.expert_fraction);
        }
    }
}

/// The capacity cases drop assignments (so their parity covers the admission order), and
/// the group-limited case keeps each token inside one group of two experts.
#[test]
fn capacity_cases_drop_and_group_limited_routing_stays_in_one_group() {
    let device = Device::flex().autodiff();
    for (name, cfg) in switchyard_tools::parity::cp_models() {
        if !name.contains("capacity") {
            continue;
        }
        let model = build(&cfg, Forcing::None, &device);
        let (inputs, _) = tensors(&batch(cfg.vocab_size), 8, &device);
        for (layer, stats) in model.forward(inputs).moe_stats {
            assert!(
                stats.dropped_fraction > 0.0,
                "{name}, layer {layer}: {stats:?}"
            );
        }
    }
    let (_, cfg) = switchyard_tools::parity::routing_option_models()
        .into_iter()
        .find(|(name, _)| name.contains("group-limited"))
        .expect("the group-limited case exists");
    let model = build(&cfg, Forcing::None, &device);
    let (inputs, _) = tensors(&batch(cfg.vocab_size), 8, &device);
    for (layer, stats) in model.forward(inputs).moe_stats {
        for token in stats.dispatched_tk.chunks(2) {
            let groups: Vec<u32> = token.iter().flatten().map(|e| e / 2).collect();
            assert!(
                groups.windows(2).all(|g| g[0] == g[1]),
                "layer {layer}: {token:?}"
            );
        }
    }
}

/// A case run on a world of the wrong size is an error, never a vacuous pass.
#[test]
fn a_wrong_world_size_is_reported() {
    let case = all_cases().remove(0);
    let comms = LocalWorld::new(1, Duration::from_secs(10), None);
    let err = check_case(&case, Box::new(comms.into_iter().next().unwrap())).unwrap_err();
    assert!(err.contains("needs 2 ranks"), "{err}");
}

#[test]
fn pipelined_expert_block_matches_single_process() {
    run_matching(|c| c.overlap.is_some());
}

/// Ring attention and TokenRing at cp=2, cp=4, dp=2 x cp=2, cp=2 x ep=2, dp=2 x cp=2 x ep=2.
#[test]
fn context_parallel_layouts_match_single_process() {
    run_matching(|c| c.cp > 1);
}

/// The same layouts with NCCL's point-to-point semantics (`Rendezvous`: sends and receives
/// issued in groups at the first wait, a send complete only once its peer issued the
/// receive): an order of sends, receives and waits that would hang NCCL times out here. Also
/// the pipelined block and migration, whose collectives flush the deferred operations.
#[test]
fn every_layout_completes_under_nccl_point_to_point_semantics() {
    use switchyard_comm::rendezvous::Rendezvous;
    let cases: Vec<Case> = all_cases()
        .into_iter()
        .filter(|c| c.cp > 1 || c.overlap.is_some() || c.migrate.is_some())
        .collect();
    for case in &cases {
        let worst = run_case_wrapped(
            case,
            &Device::flex().autodiff(),
            TOL,
            Duration::from_secs(60),
            |c| Box::new(Rendezvous::new(Box::new(c))),
        );
        eprintln!(
            "rendezvous: {} {}: max relative error {worst:e}",
            case.label,
            case.layout()
        );
    }
}

/// Grouped-query attention, q/k norms, attention biases and the gated shared expert (the
/// Hugging Face formats' options) at every dp/ep layout, and under context parallelism
/// (both algorithms, with ep through the pipelined block).
#[test]
fn qwen_shaped_model_matches_single_process() {
    run_matching(|c| c.label.starts_with("qwen-shaped"));
}

/// Sigmoid scores with a scaling factor, the auxiliary-loss-free bias (compared with the
/// weights after every step's update), group-limited routing, the sequence-wise and
/// global-batch balance losses, at every data / expert layout.
#[test]
fn routing_options_match_single_process() {
    let names: Vec<&str> = switchyard_tools::parity::routing_option_models()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    run_matching(|c| c.cp == 1 && names.contains(&c.label.as_str()));
}

/// Capacity dropping (with a shared expert; and MoE++'s zero-computation capacities), the
/// recurrent router, MoE++ and the sequence-wise balance loss at every data / expert layout
/// and under context parallelism with data and expert parallelism: the same assignments are
/// dropped as in one process.
#[test]
fn capacity_recurrent_and_moe_plus_plus_match_single_process_under_every_axis() {
    let names: Vec<&str> = switchyard_tools::parity::cp_models()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    run_matching(|c| {
        names
            .iter()
            .any(|name| c.label == *name || c.label == format!("{name}, context parallel"))
            && (c.cp > 1 || !["MoE++", "sequence-wise balance loss"].contains(&c.label.as_str()))
    });
}
