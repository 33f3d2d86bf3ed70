//! Mixed precision (`precision: bf16`): the GEMMs really compute in bf16, the master
//! weights and their gradients stay f32, and bf16 training follows the fp32 loss curve.
//!
//! On the CPU backend burn-flex stores bf16 tensors as bf16 and multiplies them with f32
//! accumulation, rounding the product to bf16: the arithmetic of a GPU's bf16 GEMM (bf16
//! operands and output, f32 accumulator), so this tests the same casts the CUDA path runs.

use burn::tensor::{DType, Device, Distribution, Tensor};
use switchyard_moe::Precision;
use switchyard_moe::params::named_params;
use switchyard_moe::precision::{matmul, scoped};
use switchyard_trainer::Trainer;
use switchyard_trainer::checkpoint::tensor_values;
use switchyard_trainer::config::Config;
use switchyard_trainer::data::Corpus;

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

#[test]
fn bf16_matmul_rounds_to_bf16_and_returns_f32_gradients() {
    let device = Device::flex().autodiff();
    let a = Tensor::<2>::random([48, 64], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let b = Tensor::<2>::random([64, 40], Distribution::Normal(0.0, 1.0), &device);
    let exact = tensor_values(&a.clone().matmul(b.clone()).reshape([-1]));
    let fp32 = scoped(Precision::Fp32, || matmul(a.clone(), b.clone()));
    assert_eq!(
        tensor_values(&fp32.reshape([-1])),
        exact,
        "fp32 is the plain matmul"
    );
    let bf16 = scoped(Precision::Bf16, || matmul(a.clone(), b.clone()));
    assert_eq!(bf16.dtype(), DType::F32, "results come back as f32");
    let got = tensor_values(&bf16.clone().reshape([-1]));
    // bf16 keeps 8 significant bits: operand rounding (2^-9 relative each) over 64 terms
    // and the rounded output give errors of order 1e-3 of the largest entry; an f32 GEMM
    // would be within 1e-6.
    let diff = max_rel_diff(&got, &exact);
    assert!(
        (1e-4..3e-2).contains(&diff),
        "bf16 product differs from f32 by {diff:e} of the largest entry"
    );
    // Every output is a bf16 value (the low 16 bits of its f32 pattern are zero).
    assert!(got.iter().all(|x| x.to_bits() & 0xffff == 0));
    // The gradient reaching the (f32) leaf is f32.
    let grads = bf16.sum().backward();
    let grad_a = a.grad(&grads).expect("a gradient for a");
    assert_eq!(grad_a.dtype(), DType::F32);
    // Outside any scope the thread computes in f32.
    assert_eq!(switchyard_moe::precision::current(), Precision::Fp32);
}

fn config(precision: &str) -> Config {
    let yaml = format!(
        r#"
run: {{name: mp, output_dir: /nonexistent, seed: 11}}
precision: {precision}
model:
  vocab_size: 256
  d_model: 32
  n_heads: 2
  n_layers: 2
  ffn_dim: 64
  max_seq_len: 16
  moe: {{num_experts: 4, top_k: 2, expert_ffn_dim: 32, shared_expert: {{count: 1, ffn_dim: 32}}}}
data:
  tokenizer: {{type: byte}}
  source: {{type: synthetic}}
  seq_len: 16
  batch_size: 4
optim: {{lr: 3.0e-3, warmup_steps: 20, grad_clip: 1.0}}
train: {{steps: 300, eval_batches: 2}}
"#
    );
    let cfg: Config = serde_yaml::from_str(&yaml).unwrap();
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    cfg
}

/// A noisy order-1 Markov chain over 32 symbols: learnable, with an entropy floor well
/// above zero (so relative loss differences stay meaningful).
fn corpus(cfg: &Config) -> Corpus {
    let mut state = 0x2545_f491_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut tokens = vec![0u32];
    for _ in 1..20_000 {
        let prev = *tokens.last().unwrap();
        let r = next();
        let t = if r % 10 < 7 {
            (prev * 5 + 3) % 32
        } else {
            (r >> 8) as u32 % 32
        };
        tokens.push(t);
    }
    let (train, valid) = tokens.split_at(18_000);
    Corpus::from_splits(
        train.to_vec(),
        valid.to_vec(),
        cfg.data.seq_len,
        cfg.data.batch_size,
        cfg.model.vocab_size,
    )
    .unwrap()
}

fn curve(precision: &str) -> (Vec<f64>, Trainer) {
    let cfg = config(precision);
    let mut trainer = Trainer::new(&cfg, &corpus(&cfg), &Device::flex().autodiff()).unwrap();
    let losses = (0..cfg.train.steps)
        .map(|_| trainer.step().unwrap().loss)
        .collect();
    (losses, trainer)
}

/// Tolerance: the mean over the curve of |bf16 - fp32| / fp32 below 2%, and the final loss
/// (mean of the last 25 steps) within 2%. Measured: see the printed figures.
#[test]
fn bf16_training_tracks_fp32() {
    let (fp32, _) = curve("fp32");
    let (bf16, trainer) = curve("bf16");
    assert_eq!(trainer.model.precision(), Precision::Bf16);
    let n = fp32.len();
    let rel: Vec<f64> = fp32
        .iter()
        .zip(&bf16)
        .map(|(a, b)| (b - a).abs() / a)
        .collect();
    let mean_rel = rel.iter().sum::<f64>() / n as f64;
    let tail = |c: &[f64]| c[n - 25..].iter().sum::<f64>() / 25.0;
    let (end32, end16) = (tail(&fp32), tail(&bf16));
    let final_rel = (end16 - end32).abs() / end32;
    println!(
        "fp32 loss {:.4} -> {end32:.4}, bf16 {:.4} -> {end16:.4}; curve mean relative \
         difference {mean_rel:.2e}, max {:.2e}; final (last 25 steps) {final_rel:.2e}",
        fp32[0],
        bf16[0],
        rel.iter().cloned().fold(0.0, f64::max)
    );
    assert!(
        end32 < 0.8 * fp32[0],
        "the model learns: {} -> {end32}",
        fp32[0]
    );
    assert!(mean_rel < 0.02, "curve mean relative difference {mean_rel}");
    assert!(
        final_rel < 0.02,
        "final loss relative difference {final_rel}"
    );
    // bf16 really computed something else (an identical curve would mean no cast ran).
    assert!(
        rel.iter().any(|&r| r > 1e-6),
        "bf16 curve equals fp32 bit for bit"
    );
    // Master weights stay f32.
    for (name, _, value) in named_params(&trainer.model) {
        assert_eq!(value.dtype(), DType::F32, "{name}");
    }
}
