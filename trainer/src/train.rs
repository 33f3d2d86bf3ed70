//! The training loop, as a recipe: build (parallelize), (resume), then per step: step ->
//! log -> rebalance -> evaluate -> save -> agree on stopping.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use switchyard_parallel::Communicator;

use crate::checkpoint::Checkpointer;
use crate::config::Config;
use crate::console::ProgressLine;
use crate::data::Corpus;
use crate::error::TrainError;
use crate::metrics::{DevicePeak, EvalReport, MetricsSink, StepRates, moe_scalars, step_scalars};
use crate::stop::StopSignal;
use crate::trainer::Trainer;

/// Where a run's weights come from.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// Fresh weights from `run.seed`.
    Fresh,
    /// Continue a run exactly: weights, optimizer, data position, step.
    Resume(&'a Path),
    /// Weights only, from another run's checkpoint (see `Trainer::init_from`).
    InitFrom(&'a Path),
}

/// How a run ended.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// Every step ran; the last evaluation, if any.
    Finished(Option<EvalReport>),
    /// A preemption signal arrived; every rank stopped at the same step boundary after a
    /// committed checkpoint of that step (`--resume auto` continues from it).
    Preempted { step: u64, checkpoint: PathBuf },
}

/// What a run is handed besides its config, data and device.
pub struct RunContext {
    /// The resolved config, saved in every checkpoint; its YAML (`resolved_yaml`) goes to
    /// TensorBoard's text dashboard.
    pub resolved_config: serde_json::Value,
    pub resolved_yaml: String,
    /// This rank's communicator when the layout has more than one rank (every rank calls
    /// `run`); only rank 0 writes metrics and prints progress.
    pub world: Option<Box<dyn Communicator>>,
    /// Set (by a signal handler) to stop at the next step boundary with a checkpoint; the
    /// decision is collective, so every rank stops at the same step even if only one was
    /// signalled. `run` arms it right before the first step (see [`StopSignal`]).
    pub stop: Option<Arc<StopSignal>>,
}

pub fn run(
    cfg: &Config,
    corpus: &Corpus,
    start: Start<'_>,
    device: &Device,
    context: RunContext,
) -> Result<RunOutcome, TrainError> {
    let RunContext {
        resolved_config,
        resolved_yaml,
        world,
        stop,
    } = context;
    let mut trainer = Trainer::new_on(cfg, corpus, device, world)?;
    let peak = world_peak(&trainer, cfg, device)?;
    let ckpt_dir = cfg
        .checkpoint
        .dir
        .clone()
        .unwrap_or_else(|| cfg.run.output_dir.join("checkpoints"));
    let save_timeout_s = crate::memory::save_timeout_s(cfg);
    if cfg.checkpoint.save_timeout_s.is_none() && trainer.layout.is_some() {
        tracing::info!(
            "checkpoint.save_timeout_s: {save_timeout_s:.0} s (derived: {:.0} MB shard at {} MB/s \
             plus {} s)",
            crate::memory::checkpoint_shard_bytes(cfg) / 1e6,
            crate::memory::MIN_WRITE_BYTES_PER_S / 1e6,
            crate::memory::SAVE_OVERHEAD_S
        );
    }
    if trainer.is_logger() {
        tracing::info!(
            "memory per rank (estimate; `switchyard estimate-memory` breaks it down): {}",
            crate::memory::MemoryEstimate::per_rank(cfg)
        );
    }
    let checkpointer = Checkpointer::new(
        &ckpt_dir,
        cfg.checkpoint.keep_last,
        save_timeout_s,
        resolved_config.clone(),
        stop.clone(),
    )?;
    match start {
        Start::Fresh => {}
        Start::Resume(path) => {
            trainer.restore(path)?;
            tracing::info!(step = trainer.counters.step, path = %path.display(), "resumed");
        }
        Start::InitFrom(path) => {
            trainer.init_from(path)?;
            tracing::info!(path = %path.display(), "weights initialised from checkpoint");
        }
    }
    if trainer.is_logger() {
        log_blend(cfg, &trainer);
    }
    let mut metrics = if trainer.is_logger() {
        Some(
            MetricsSink::new(
                cfg.metrics.clone(),
                &cfg.run.output_dir,
                cfg.train.steps,
                trainer.counters.step,
            )
            .map_err(|e| TrainError::Metrics(e.to_string()))?,
        )
    } else {
        None
    };
    if let Some(metrics) = &mut metrics {
        // As a Markdown code block: TensorBoard's text dashboard renders Markdown.
        let text = format!("```yaml\n{resolved_yaml}\n```");
        metrics.log_text("config", &text, trainer.counters.step);
        metrics.log_hparams(&resolved_config, trainer.counters.step);
    }
    let flops_per_token = trainer.train_flops_per_token();
    let mut last_eval = None;
    if let Some(stop) = &stop {
        stop.arm();
    }
    while trainer.counters.step < cfg.train.steps {
        let report = trainer.step()?;
        let rates = StepRates::of(&report, flops_per_token, peak);
        let mut scalars = step_scalars(&report, &rates, trainer.counters.tokens_seen);
        if trainer.is_logger() {
            scalars.extend(trainer.placement_scalars());
            scalars.extend(trainer.sampler.scalars());
        }
        scalars.extend(moe_scalars(&trainer.last_moe_stats));
        let step = trainer.counters.step;
        let last = step == cfg.train.steps;
        let every = cfg.placement.rebalance_every;
        if every > 0
            && step % every == 0
            && !last
            && let Some(done) = trainer.rebalance()?
        {
            tracing::info!("{}", done.line);
            scalars.extend(done.scalars);
        }
        let mut valid_loss = None;
        if (cfg.train.eval_every > 0 && step % cfg.train.eval_every == 0) || last {
            let eval = trainer.evaluate()?;
            scalars.push(("valid/loss".into(), eval.loss));
            scalars.push(("valid/perplexity".into(), eval.perplexity));
            scalars.extend(
                eval.sources
                    .iter()
                    .map(|(name, loss)| (format!("valid/{name}/loss"), *loss)),
            );
            valid_loss = Some(eval.loss);
            last_eval = Some(eval);
        }
        if let Some(metrics) = &mut metrics {
            let borrowed: Vec<(&str, f64)> =
                scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            metrics
                .log(step, &borrowed)
                .map_err(|e| TrainError::Metrics(e.to_string()))?;
            metrics.progress(ProgressLine {
                step,
                total_steps: cfg.train.steps,
                loss: report.loss,
                valid_loss,
                lr: report.lr,
                tokens_per_sec: rates.tokens_per_sec,
                step_seconds: report.seconds,
                mfu: rates.mfu,
                peak_bytes: rates.peak_bytes,
                eta: None,
            });
        }
        let due = cfg.checkpoint.every > 0 && step % cfg.checkpoint.every == 0;
        let mut saved = None;
        if due || (last && cfg.checkpoint.save_final) {
            saved = Some(trainer.save(&checkpointer)?);
        }
        // A signal that arrived during the step, the evaluation or the save is acted on here.
        let signalled = stop.as_ref().is_some_and(|s| s.requested());
        let stop = match &trainer.layout {
            Some(l) => !l.all_ok(!signalled, "preemption check")?,
            None => signalled,
        };
        if stop && !last {
            let checkpoint = match saved {
                Some(path) => path,
                None => trainer.save(&checkpointer)?,
            };
            if let Some(metrics) = metrics {
                metrics
                    .finish()
                    .map_err(|e| TrainError::Metrics(e.to_string()))?;
            }
            tracing::warn!(step, checkpoint = %checkpoint.display(), "preempted: checkpoint committed, stopping");
            return Ok(RunOutcome::Preempted { step, checkpoint });
        }
    }
    if let Some(metrics) = metrics {
        metrics
            .finish()
            .map_err(|e| TrainError::Metrics(e.to_string()))?;
    }
    Ok(RunOutcome::Finished(last_eval))
}

/// The run's peak FLOP/s for MFU: every rank measures its own at once (a sum first lines
/// them up) and the world sums them. A rank that cannot measure (a GPU error) leaves MFU
/// out (the rank says why).
fn world_peak(
    trainer: &Trainer,
    cfg: &Config,
    device: &Device,
) -> Result<Option<DevicePeak>, TrainError> {
    if let Some(l) = &trainer.layout {
        l.sum(vec![0.0], "lining up the ranks to measure their peak")?;
    }
    let mine = crate::bench::rank_peak_gflops(cfg, device).unwrap_or_else(|e| {
        tracing::warn!("MFU not reported: measuring the device's peak: {e}");
        f64::NAN
    });
    let gflops = match &trainer.layout {
        Some(l) => l.sum(vec![mine], "the ranks' peak FLOP/s")?[0],
        None => mine,
    };
    Ok(gflops.is_finite().then_some(DevicePeak { gflops }))
}

/// Passes over a source beyond which the start-up log warns that the run repeats it.
const MANY_EPOCHS: f64 = 4.0;

/// A blend's sources at the start of a run: name, weight, size and the epochs of each that
/// the whole run (`train.steps`) reads; a warning for a source read more than
/// [`MANY_EPOCHS`] times.
fn log_blend(cfg: &Config, trainer: &Trainer) {
    if trainer.sampler.num_sources() < 2 {
        return;
    }
    let samples = cfg.train.steps * (cfg.train.grad_accum_steps * cfg.data.batch_size) as u64;
    for s in trainer.sampler.plan(samples) {
        tracing::info!(
            "blend source {}: weight {:.4}, {} training sequences ({} tokens), {:.2} epochs over \
             {} steps",
            s.name,
            s.weight,
            s.windows,
            s.tokens,
            s.epochs,
            cfg.train.steps
        );
        if s.epochs > MANY_EPOCHS {
            tracing::warn!(
                "blend source {} is read {:.1} times over ({:.4} of {samples} sequences from \
                 {} of its own): it will be memorised rather than learnt from; lower its \
                 weight or add data",
                s.name,
                s.epochs,
                s.weight,
                s.windows
            );
        }
    }
}
