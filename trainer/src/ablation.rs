//! `switchyard ablate`: vanilla top-k MoE, AdaMoE, MoE++ and RMoE of the same size, trained
//! on the same data for the same steps, compared side by side in one run: validation loss,
//! FFN-expert FLOPs per token, and expert-layer forward throughput.

use std::fmt;

use burn::module::Module;
use burn::tensor::Device;
use switchyard_moe::config::{BalanceAnneal, NullInit, NullNormalization, RouterConfig};
use switchyard_moe::cross_entropy;
use switchyard_parallel::{Communicator, ParallelError};

use crate::config::Config;
use crate::data::Corpus;
use crate::error::TrainError;
use crate::trainer::Trainer;

/// One variant's figures.
#[derive(Debug, Clone)]
pub struct VariantReport {
    pub name: &'static str,
    pub router: String,
    pub valid_loss: f64,
    /// FFN-expert matmul FLOPs per token in the forward pass (routed experts only).
    pub ffn_flops_per_token: f64,
    /// Kept FFN-expert assignments per token, averaged over MoE layers.
    pub ffn_experts_per_token: f64,
    /// Tokens per second through the MoE layers' forward (router, dispatch, experts,
    /// combine, zero-computation experts), eval mode.
    pub moe_forward_tokens_per_sec: f64,
    pub train_seconds: f64,
}

#[derive(Debug, Clone)]
pub struct AblationReport {
    pub steps: u64,
    pub variants: Vec<VariantReport>,
}

impl fmt::Display for AblationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = &self.variants[0];
        writeln!(
            f,
            "ablation: {} optimizer steps each, same data and seed",
            self.steps
        )?;
        writeln!(
            f,
            "{:<8} {:>10} {:>10} {:>14} {:>12} {:>10} {:>14} {:>12} {:>9}",
            "variant",
            "val loss",
            "vs vanilla",
            "FFN MFLOP/tok",
            "vs vanilla",
            "FFN exp/tok",
            "MoE fwd tok/s",
            "vs vanilla",
            "train s"
        )?;
        for v in &self.variants {
            writeln!(
                f,
                "{:<8} {:>10.4} {:>+9.2}% {:>14.3} {:>+11.1}% {:>10.2} {:>14.0} {:>11.2}x {:>9.0}",
                v.name,
                v.valid_loss,
                100.0 * (v.valid_loss / base.valid_loss - 1.0),
                v.ffn_flops_per_token / 1e6,
                100.0 * (v.ffn_flops_per_token / base.ffn_flops_per_token - 1.0),
                v.ffn_experts_per_token,
                v.moe_forward_tokens_per_sec,
                v.moe_forward_tokens_per_sec / base.moe_forward_tokens_per_sec,
                v.train_seconds,
            )?;
        }
        for v in &self.variants {
            writeln!(f, "  {}: {}", v.name, v.router)?;
        }
        Ok(())
    }
}

/// The four router families at the size of `base` (which must use the vanilla top-k
/// router): AdaMoE with as many null experts as true ones and top-(k+1) (the paper's main
/// Mixtral setting, m = 8 / k = 3 for 8 experts top-2), tight-then-loose balancing switched
/// half way; MoE++ with 1 zero, 1 copy and 2 constant experts, tau = 0.75, top-k; RMoE with
/// a 128-dim GRU, top-k.
pub fn variants(base: &Config) -> Vec<(&'static str, Config)> {
    let moe = &base.model.moe;
    let with = |router: RouterConfig, top_k: usize| {
        let mut cfg = base.clone();
        cfg.model.moe.router = router;
        cfg.model.moe.top_k = top_k;
        cfg
    };
    vec![
        ("vanilla", base.clone()),
        (
            "adamoe",
            with(
                RouterConfig::NullExperts {
                    num_null: moe.num_experts,
                    normalize: NullNormalization::TrueExperts,
                    null_init: NullInit::Random,
                    anneal: Some(BalanceAnneal {
                        loose_coef: moe.load_balance_coef / 200.0,
                        after_step: base.train.steps / 2,
                    }),
                },
                moe.top_k + 1,
            ),
        ),
        (
            "moe++",
            with(
                RouterConfig::MoePlusPlus {
                    zero: 1,
                    copy: 1,
                    constant: 2,
                    tau: 0.75,
                    gating_residual: true,
                    normalize_weights: false,
                },
                moe.top_k,
            ),
        ),
        (
            "rmoe",
            with(
                RouterConfig::Recurrent {
                    state_dim: 128,
                    detach_state: false,
                    normalize_weights: true,
                },
                moe.top_k,
            ),
        ),
    ]
}

/// Trains every variant and measures it, as one rank of `world` when the layout has more
/// than one (every rank calls `run`; the figures are the world's on every rank).
pub fn run(
    base: &Config,
    corpus: &Corpus,
    device: &Device,
    world: Option<Box<dyn Communicator>>,
) -> Result<AblationReport, TrainError> {
    let mut reports = Vec::new();
    for (name, cfg) in variants(base) {
        // Each variant's trainer takes a communicator of its own: a duplicate of the world.
        let variant_world = match &world {
            Some(w) => Some(
                w.split(0, w.rank() as i32)
                    .map_err(|e| ParallelError::Comm {
                        op: format!("ablation: the communicator of {name}"),
                        source: Box::new(e),
                    })?,
            ),
            None => None,
        };
        let started = std::time::Instant::now();
        let mut trainer = Trainer::new_on(&cfg, corpus, device, variant_world)?;
        if trainer.is_logger() {
            tracing::info!(variant = name, "ablation: training");
        }
        while trainer.counters.step < cfg.train.steps {
            trainer.step()?;
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let mut report = measure(name, &cfg, &trainer)?;
        report.train_seconds = train_seconds;
        reports.push(report);
    }
    Ok(AblationReport {
        steps: base.train.steps,
        variants: reports,
    })
}

/// Timed passes over the validation batches; the fastest MoE time is kept, because on a
/// shared machine noise only ever adds time.
const TIMED_PASSES: usize = 3;

/// Validation loss and the expert-layer figures over the fixed validation batches (each
/// rank its rows; the sums are over the world, the MoE throughput is the ranks' together).
fn measure(
    name: &'static str,
    cfg: &Config,
    trainer: &Trainer,
) -> Result<VariantReport, TrainError> {
    let model = trainer.model.valid();
    let device = trainer.device.clone().inner();
    let (mut loss_sum, mut tokens) = (0.0, 0.0);
    let (mut flops, mut ffn_per_token, mut layer_samples) = (0.0, 0.0, 0.0);
    let mut best_moe_seconds = f64::MAX;
    for pass in 0..TIMED_PASSES {
        let mut moe_seconds = 0.0;
        for batch in &trainer.valid {
            let (inputs, targets) = trainer.valid_tensors(batch, &device);
            let out = model.forward(inputs);
            moe_seconds += out.moe_stats.iter().map(|(_, s)| s.seconds).sum::<f64>();
            if pass > 0 {
                continue;
            }
            let n = targets.dims().iter().product::<usize>() as f64;
            loss_sum += cross_entropy(out.logits, targets).into_scalar::<f32>() as f64 * n;
            tokens += n;
            for (_, stats) in &out.moe_stats {
                flops += stats.expert_flops as f64;
                ffn_per_token += stats.ffn_experts_per_token;
                layer_samples += 1.0;
            }
        }
        best_moe_seconds = best_moe_seconds.min(moe_seconds);
    }
    let moe_layers = (layer_samples / trainer.valid.len().max(1) as f64).max(1.0);
    // Tokens pass through every MoE layer: per-layer throughput is tokens * layers / time.
    let moe_tokens_per_sec = tokens * moe_layers / best_moe_seconds.max(1e-12);
    let mut figures = [
        loss_sum,
        tokens,
        flops,
        ffn_per_token,
        layer_samples,
        moe_tokens_per_sec,
    ];
    if let Some(l) = &trainer.layout {
        let sums = l.sum(figures.to_vec(), "ablation: the ranks' figures")?;
        figures = sums[..].try_into().expect("the sum has as many values");
    }
    let [
        loss_sum,
        tokens,
        flops,
        ffn_per_token,
        layer_samples,
        moe_tokens_per_sec,
    ] = figures;
    Ok(VariantReport {
        name,
        router: format!("{:?} top_k={}", cfg.model.moe.router, cfg.model.moe.top_k),
        valid_loss: loss_sum / tokens.max(1.0),
        ffn_flops_per_token: flops / tokens.max(1.0),
        ffn_experts_per_token: ffn_per_token / layer_samples.max(1.0),
        moe_forward_tokens_per_sec: moe_tokens_per_sec,
        train_seconds: 0.0,
    })
}
