//! Behaviour of the training loop: non-finite policy, accumulation, state round trip.

use burn::tensor::Device;
use switchyard_moe::params::{map_params, named_params};
use switchyard_trainer::TrainError;
use switchyard_trainer::Trainer;
use switchyard_trainer::checkpoint::tensor_values;
use switchyard_trainer::config::Config;
use switchyard_trainer::config::NonFinitePolicy;
use switchyard_trainer::data::Corpus;

fn config(extra: &str) -> Config {
    let yaml = format!(
        r#"
run: {{name: t, output_dir: /nonexistent, seed: 3}}
model:
  vocab_size: 256
  d_model: 16
  n_heads: 2
  n_layers: 2
  ffn_dim: 32
  max_seq_len: 16
  moe: {{num_experts: 4, top_k: 2, expert_ffn_dim: 16}}
data:
  tokenizer: {{type: byte}}
  source: {{type: synthetic}}
  seq_len: 8
  batch_size: 2
optim: {{lr: 1.0e-2, grad_clip: 1.0}}
train: {{steps: 10, eval_batches: 2{extra}}}
"#
    );
    serde_yaml::from_str(&yaml).unwrap()
}

fn corpus(cfg: &Config) -> Corpus {
    // A period-10 pattern: learnable within a few steps.
    let tokens: Vec<u32> = (0..4000u32).map(|i| 65 + (i * 7) % 10).collect();
    let (train, valid) = tokens.split_at(3600);
    Corpus::from_splits(
        train.to_vec(),
        valid.to_vec(),
        cfg.data.seq_len,
        cfg.data.batch_size,
        256,
    )
    .unwrap()
}

fn weights(trainer: &Trainer) -> Vec<(String, Vec<f32>)> {
    named_params(&trainer.model)
        .into_iter()
        .map(|(key, _, value)| (key.to_string(), tensor_values(&value)))
        .collect()
}

fn poison(trainer: &mut Trainer) {
    trainer.model = map_params(trainer.model.clone(), |name, value| {
        if name.name() == "embed" {
            value * f32::NAN
        } else {
            value
        }
    });
}

#[test]
fn nonfinite_stop_names_the_step_and_skip_leaves_weights_untouched() {
    let device = Device::flex().autodiff();
    let cfg = config("");
    assert_eq!(cfg.train.nonfinite, NonFinitePolicy::Stop);
    let corpus = corpus(&cfg);
    let mut trainer = Trainer::new(&cfg, &corpus, &device).unwrap();
    trainer.step().unwrap();
    poison(&mut trainer);
    match trainer.step() {
        Err(TrainError::NonFinite { step, what, .. }) => {
            assert_eq!(step, 1);
            assert_eq!(what, "loss");
        }
        other => panic!("expected a non-finite error, got {other:?}"),
    }

    let cfg = config(", nonfinite: skip");
    let mut trainer = Trainer::new(&cfg, &corpus, &device).unwrap();
    trainer.step().unwrap();
    poison(&mut trainer);
    let before = weights(&trainer);
    let report = trainer.step().unwrap();
    assert!(report.skipped && !report.loss.is_finite());
    assert_eq!(trainer.counters.skipped_steps, 1);
    assert_eq!(
        trainer.optim.steps_taken(),
        1,
        "the skipped step did not update"
    );
    let after = weights(&trainer);
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{name} changed during a skipped step");
    }
}

#[test]
fn accumulation_consumes_micro_batches_and_updates_once() {
    let device = Device::flex().autodiff();
    let cfg = config(", grad_accum_steps: 3");
    let corpus = corpus(&cfg);
    let mut trainer = Trainer::new(&cfg, &corpus, &device).unwrap();
    let before = weights(&trainer);
    let report = trainer.step().unwrap();
    assert_eq!(report.tokens, 3 * 2 * 8);
    assert_eq!(
        trainer.sampler.samples(),
        3 * 2,
        "three micro-batches of two windows"
    );
    assert_eq!(trainer.optim.steps_taken(), 1);
    assert_ne!(before, weights(&trainer));
}

#[test]
fn loss_falls_and_evaluation_is_deterministic() {
    let device = Device::flex().autodiff();
    let cfg = config("");
    let corpus = corpus(&cfg);
    let mut trainer = Trainer::new(&cfg, &corpus, &device).unwrap();
    let first = trainer.evaluate().unwrap();
    assert_eq!(
        first.loss.to_bits(),
        trainer.evaluate().unwrap().loss.to_bits()
    );
    for _ in 0..10 {
        trainer.step().unwrap();
    }
    let last = trainer.evaluate().unwrap();
    assert!(last.loss < first.loss - 0.5, "{first:?} -> {last:?}");
    assert!((last.perplexity - last.loss.exp()).abs() < 1e-9);
}

#[test]
fn a_vanilla_checkpoint_initialises_a_null_expert_model() {
    use switchyard_moe::config::{NullInit, NullNormalization, RouterConfig};
    use switchyard_trainer::checkpoint::Checkpointer;

    let device = Device::flex().autodiff();
    let vanilla_cfg = config("");
    let corpus = corpus(&vanilla_cfg);
    let mut vanilla = Trainer::new(&vanilla_cfg, &corpus, &device).unwrap();
    vanilla.step().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let checkpointer = Checkpointer::new(dir.path(), 1, 60.0, serde_json::json!({}), None).unwrap();
    let saved = vanilla.save(&checkpointer).unwrap();

    for null_init in [NullInit::CopyTrueRows, NullInit::Random] {
        let mut cfg = vanilla_cfg.clone();
        cfg.model.moe.top_k = 3;
        cfg.model.moe.router = RouterConfig::NullExperts {
            num_null: 6,
            normalize: NullNormalization::TrueExperts,
            null_init,
            anneal: None,
        };
        let mut ada = Trainer::new(&cfg, &corpus, &device).unwrap();
        let fresh = weights(&ada);
        ada.init_from(&saved).unwrap();
        assert_eq!(ada.counters.step, 0, "a fresh run, not a resume");
        let old: std::collections::BTreeMap<_, _> = weights(&vanilla).into_iter().collect();
        let fresh: std::collections::BTreeMap<_, _> = fresh.into_iter().collect();
        for (name, new) in weights(&ada) {
            if !name.ends_with("router.w_gate") {
                assert_eq!(new, old[&name], "{name} copied as is");
                continue;
            }
            // [D = 16, 4 true] -> [16, 10 slots]
            for row in 0..16 {
                for col in 0..10 {
                    let got = new[row * 10 + col];
                    let want = if col < 4 || null_init == NullInit::CopyTrueRows {
                        old[&name][row * 4 + col % 4]
                    } else {
                        fresh[&name][row * 10 + col]
                    };
                    assert_eq!(got, want, "{name}[{row}, {col}] with {null_init:?}");
                }
            }
        }
        ada.step().unwrap();
    }

    // Anything else that differs is refused, naming the tensor.
    let mut other = vanilla_cfg.clone();
    other.model.d_model = 32;
    let mut wrong = Trainer::new(&other, &corpus, &device).unwrap();
    let err = wrong.init_from(&saved).unwrap_err().to_string();
    assert!(err.contains("embed") && err.contains("shape"), "{err}");
}

#[test]
fn init_from_carries_the_router_biases_of_bias_balance() {
    use switchyard_moe::config::BiasBalanceConfig;
    use switchyard_trainer::checkpoint::Checkpointer;

    let device = Device::flex().autodiff();
    let mut cfg = config("");
    cfg.model.moe.bias_balance = Some(BiasBalanceConfig { gamma: 1e-2 });
    let corpus = corpus(&cfg);
    let mut biased = Trainer::new(&cfg, &corpus, &device).unwrap();
    for _ in 0..3 {
        biased.step().unwrap();
    }
    let trained = biased.model.router_biases();
    assert!(
        trained.iter().any(|(_, b)| b.iter().any(|&x| x != 0.0)),
        "three steps move the biases: {trained:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let checkpointer = Checkpointer::new(dir.path(), 1, 60.0, serde_json::json!({}), None).unwrap();
    let saved = biased.save(&checkpointer).unwrap();

    let mut fine_tune = Trainer::new(&cfg, &corpus, &device).unwrap();
    fine_tune.init_from(&saved).unwrap();
    assert_eq!(fine_tune.model.router_biases(), trained);
    assert_eq!(weights(&fine_tune), weights(&biased));
    fine_tune.step().unwrap();

    // Without bias_balance the weights still come (the biases are dropped, with a warning);
    // from a checkpoint without biases, a bias_balance model starts them at zero.
    let plain_cfg = config("");
    let mut plain = Trainer::new(&plain_cfg, &corpus, &device).unwrap();
    plain.init_from(&saved).unwrap();
    assert!(plain.model.router_biases().is_empty());
    assert_eq!(weights(&plain), weights(&biased));
    let plain_saved = plain.save(&checkpointer).unwrap();
    let mut again = Trainer::new(&cfg, &corpus, &device).unwrap();
    again.init_from(&plain_saved).unwrap();
    assert!(
        again
            .model
            .router_biases()
            .iter()
            .all(|(_, b)| b.iter().all(|&x| x == 0.0))
    );
}
