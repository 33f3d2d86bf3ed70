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

const PATIENCE: Duration = Duration::from_secs(600);

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
    let comms = LocalWorld::new(2, Duration::from_secs(600), None);
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
    assert!(started.elapsed() < Duration::from_secs(60));
}
