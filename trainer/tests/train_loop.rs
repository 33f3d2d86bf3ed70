//! Behaviour of the training loop: non-finite policy, accumulation, state round trip.

use burn::tensor::Device;
use switchyard_moe::params::{map_params, named_params};
use switchyard_trainer::config::Config;
use switchyard_trainer::data::Corpus;
use switchyard_trainer::optim::tensor_to_vec;
use switchyard_trainer::train::{NonFinitePolicy, TrainError, Trainer};

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
        .map(|(name, _, value)| (name, tensor_to_vec(&value)))
        .collect()
}

fn poison(trainer: &mut Trainer) {
    trainer.model = map_params(trainer.model.clone(), |name, value| {
        if name == "embed" {
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
    assert_eq!(trainer.skipped_steps, 1);
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
        trainer.sampler.state().position,
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
    let first = trainer.evaluate();
    assert_eq!(first.loss.to_bits(), trainer.evaluate().loss.to_bits());
    for _ in 0..10 {
        trainer.step().unwrap();
    }
    let last = trainer.evaluate();
    assert!(last.loss < first.loss - 0.5, "{first:?} -> {last:?}");
    assert!((last.perplexity - last.loss.exp()).abs() < 1e-9);
}
