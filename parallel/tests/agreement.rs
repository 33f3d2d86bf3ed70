//! Agreements end on every rank: a rank that leaves fails the others' wait at once, and a
//! stop signal caps a rank's wait for a stuck one at the communication timeout.

mod common;

use std::time::{Duration, Instant};

use burn::tensor::Device;
use switchyard_comm::{Communicator, LocalWorld};
use switchyard_moe::config::CapacityConfig;
use switchyard_moe::{ModelConfig, MoeConfig, RouterConfig, Transformer};
use switchyard_parallel::{Layout, ParallelConfig, parallelize};

fn model_cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 32,
        d_model: 8,
        n_heads: 2,
        n_layers: 1,
        ffn_dim: 16,
        max_seq_len: 8,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        init_std: 0.2,
        attention: Default::default(),
        moe: MoeConfig {
            every: 1,
            num_experts: 4,
            top_k: 2,
            expert_ffn_dim: 4,
            router: RouterConfig::TopKSoftmax {
                normalize_weights: true,
            },
            capacity: CapacityConfig::Dropless {},
            shared_expert: None,
            load_balance_coef: 0.01,
            z_loss_coef: 0.001,
            ..Default::default()
        },
    }
}

/// A dp = 1 x ep = 2 layout of the tiny model over `world`.
fn layout(world: Box<dyn Communicator>) -> Layout {
    let cfg = model_cfg();
    let model = Transformer::new(&cfg, 3, &Device::flex().autodiff());
    let parallel = ParallelConfig {
        ep: 2,
        ..ParallelConfig::default()
    };
    parallelize(model, &parallel, 4, world).unwrap().layout
}

/// The save agreements' patience (`checkpoint.save_timeout_s`): long enough that a test
/// which ends within half of it did not wait it out.
const PATIENCE: Duration = Duration::from_secs(60);

#[test]
fn a_stop_signal_caps_the_wait_for_a_stuck_rank_at_the_comm_timeout() {
    let comm_timeout = Duration::from_millis(300);
    let comms = LocalWorld::new(2, comm_timeout, None);
    let results = LocalWorld::spawn(comms, Some(64 << 20), |c| {
        let layout = layout(Box::new(c));
        if layout.rank() == 1 {
            // Stuck writing its shard for far longer than the comm timeout.
            std::thread::sleep(Duration::from_secs(4));
            return None;
        }
        let started = Instant::now();
        let signalled = || true;
        let result =
            layout.all_ok_within(true, "checkpoint of step 3: commit", PATIENCE, &signalled);
        Some((result, started.elapsed()))
    });
    let (result, waited) = results.into_iter().next().unwrap().unwrap();
    let message = result.unwrap_err().to_string();
    assert!(
        message.contains("checkpoint of step 3: commit"),
        "{message}"
    );
    assert!(message.contains("stop signal"), "{message}");
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
}

#[test]
fn a_rank_that_returns_early_fails_the_agreement_on_the_others_at_once() {
    let comms = LocalWorld::new(2, PATIENCE, None);
    let started = Instant::now();
    let results = LocalWorld::spawn(comms, Some(64 << 20), |c| {
        let layout = layout(Box::new(c));
        if layout.rank() == 1 {
            return None; // fails before the agreement: its handles go away
        }
        let not_signalled = || false;
        Some(layout.all_ok_within(
            true,
            "checkpoint of step 3: commit",
            PATIENCE,
            &not_signalled,
        ))
    });
    let e = results.into_iter().next().unwrap().unwrap().unwrap_err();
    assert!(e.is_consequence(), "{e}");
    assert!(e.to_string().contains("stopped without taking part"), "{e}");
    assert!(started.elapsed() < PATIENCE / 2);
}

/// The hang of #19: a collective times out on one rank and completes on another (the late
/// rank finds the early one's contribution), so the late rank goes on alone into the next
/// agreement, a save's, whose patience is long. It must fail at once there, not wait it out.
#[test]
fn a_rank_left_alone_by_a_one_sided_timeout_fails_its_next_agreement_at_once() {
    let comms = LocalWorld::new(2, Duration::from_millis(200), None);
    let started = Instant::now();
    let results = LocalWorld::spawn(comms, Some(64 << 20), |c| {
        let layout = layout(Box::new(c));
        if layout.rank() == 1 {
            // Late for the preemption check: rank 0 has given up on it by now.
            std::thread::sleep(Duration::from_millis(600));
        }
        let check = layout.all_ok(true, "preemption check");
        if layout.rank() == 0 {
            return (check.map(|_| ()), None);
        }
        let not_signalled = || false;
        let waited = Instant::now();
        let save = layout.all_ok_within(
            true,
            "checkpoint of step 4: create the temp directory",
            PATIENCE,
            &not_signalled,
        );
        (check.map(|_| ()), Some((save, waited.elapsed())))
    });
    let mut results = results.into_iter();
    let (early, _) = results.next().unwrap();
    let early = early.unwrap_err();
    assert!(early.to_string().contains("timed out"), "{early}");
    let (late, save) = results.next().unwrap();
    late.expect("the late rank completes the check with the early one's contribution");
    let (save, waited) = save.unwrap();
    let e = save.unwrap_err();
    assert!(e.is_consequence(), "{e}");
    assert!(waited < Duration::from_secs(5), "waited {waited:?}: {e}");
    assert!(started.elapsed() < PATIENCE / 2);
}
