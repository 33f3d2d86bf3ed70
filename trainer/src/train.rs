//! The training loop. Reads top to bottom: build (parallelize), (resume), then per step:
//! batches -> forward -> backward -> accumulate -> sync -> check -> clip -> update -> log ->
//! rebalance -> eval -> save.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use switchyard_moe::config::NullInit;
use switchyard_moe::model::forward_flops_per_token;
use switchyard_moe::params::{named_grads, signature};
use switchyard_moe::{MoeStats, ParamKey, RouterConfig, Transformer, cross_entropy};
use switchyard_parallel::{Communicator, Layout, parallelize};

use crate::checkpoint::{
    self, Checkpointed, Checkpointer, SaveMeta, Snapshot, f32_values, load_weights, tensor_values,
};
use crate::config::{Config, NonFinitePolicy};
use crate::data::{Batch, Corpus, Sampler};
use crate::error::TrainError;
use crate::metrics::{MetricsSink, moe_scalars, step_scalars};
use crate::optim::{NamedAdamW, clip_scale, global_norm};
use crate::rebalance::{ModelState, Rebalancer, SavedPlacement, zero_expert};

/// The pool a trainer's steps run on: as many threads as the global pool (`run.threads`),
/// with a main-thread-sized stack (deep autodiff graphs recurse in the backward pass).
fn step_pool() -> Result<rayon::ThreadPool, TrainError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .stack_size(64 << 20)
        .thread_name(|i| format!("switchyard-step-{i}"))
        .build()
        .map_err(|e| TrainError::Io(format!("starting the step's thread pool: {e}")))
}

/// The step counters, saved in the trainer state (`step`, `tokens_seen`, `skipped_steps`)
/// so a resumed run continues exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Optimizer steps taken (skipped ones included).
    pub step: u64,
    pub tokens_seen: u64,
    /// Steps whose update was skipped (non-finite loss or gradient).
    pub skipped_steps: u64,
}

impl Checkpointed for Counters {
    fn save(&self, snapshot: &mut Snapshot) {
        snapshot.put("step", &self.step);
        snapshot.put("tokens_seen", &self.tokens_seen);
        snapshot.put("skipped_steps", &self.skipped_steps);
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        self.step = snapshot.require("step")?;
        self.tokens_seen = snapshot.require("tokens_seen")?;
        self.skipped_steps = snapshot.require("skipped_steps")?;
        Ok(())
    }
}

/// Result of one optimizer step.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: u64,
    pub loss: f64,
    pub aux_loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub skipped: bool,
    pub tokens: u64,
    pub seconds: f64,
}

/// Result of an evaluation.
#[derive(Debug, Clone, Copy)]
pub struct EvalReport {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: u64,
}

/// A model, its optimizer and its data position.
pub struct Trainer {
    pub cfg: Config,
    pub model: Transformer,
    pub optim: NamedAdamW,
    pub sampler: Sampler,
    pub valid: Vec<Batch>,
    pub device: Device,
    pub counters: Counters,
    /// Per-step MoE statistics of the last step (this rank's tokens), for metrics.
    pub last_moe_stats: Vec<(usize, MoeStats)>,
    /// The other ranks, when the layout has more than one.
    pub layout: Option<Layout>,
    /// Routing statistics and the planner (`placement:`); `None` without MoE layers.
    pub rebalancer: Option<Rebalancer>,
    /// Signature of the whole (unsharded) model: the same at every layout.
    signature: String,
    /// The threads a step runs on (see [`Self::step`]).
    pool: Arc<rayon::ThreadPool>,
}

impl Trainer {
    /// Builds model, optimizer and data from the config (fresh weights from `run.seed`),
    /// in one process.
    pub fn new(cfg: &Config, corpus: &Corpus, device: &Device) -> Result<Self, TrainError> {
        Self::new_on(cfg, corpus, device, None)
    }

    /// As [`Self::new`], as one rank of `world` (a collective: every rank calls it) laid out
    /// by `parallel:` (`parallel::parallelize`; this rank keeps only its experts).
    pub fn new_on(
        cfg: &Config,
        corpus: &Corpus,
        device: &Device,
        world: Option<Box<dyn Communicator>>,
    ) -> Result<Self, TrainError> {
        let mut model =
            Transformer::new(&cfg.model, cfg.run.seed, device).with_precision(cfg.precision);
        let signature = signature(&model);
        let layout = match world {
            Some(world) => {
                let parallel = parallelize(model, &cfg.parallel, cfg.model.moe.num_experts, world)?;
                model = parallel.model;
                Some(parallel.layout)
            }
            None => None,
        };
        let sampler = corpus.train_sampler(cfg.data.shuffle_seed_or(cfg.run.seed))?;
        let mut valid = corpus.valid_batches(cfg.train.eval_batches);
        if let Some(l) = &layout {
            // Ranks take equal shares: a last, partial batch keeps a multiple of the world
            // size of its rows (the same rows on every rank).
            let w = l.row_shards();
            for b in &mut valid {
                if !b.batch_size.is_multiple_of(w) {
                    *b = b.rows(0..b.batch_size - b.batch_size % w);
                }
            }
            valid.retain(|b| b.batch_size > 0);
        }
        let optim = NamedAdamW::new(&cfg.optim, &model);
        let has_moe = (0..cfg.model.n_layers).any(|l| cfg.model.is_moe_layer(l));
        let rebalancer = if has_moe {
            Some(Rebalancer::new(&cfg.placement)?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            model,
            optim,
            sampler,
            valid,
            device: device.clone(),
            counters: Counters::default(),
            last_moe_stats: Vec::new(),
            layout,
            rebalancer,
            signature,
            pool: Arc::new(step_pool()?),
        })
    }

    /// Inputs and targets of this rank's rows, cut to its sequence chunks under cp.
    fn local_tensors(&self, batch: &Batch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let (inputs, targets) = batch_tensors(batch, device);
        match &self.layout {
            Some(l) => (l.shard_sequence(inputs), l.shard_sequence(targets)),
            None => (inputs, targets),
        }
    }

    /// Whether this rank logs, prints and writes run-level files (rank 0).
    pub fn is_logger(&self) -> bool {
        self.layout.as_ref().is_none_or(|l| l.rank() == 0)
    }

    /// One optimizer step over `grad_accum_steps` micro-batches.
    pub fn step(&mut self) -> Result<StepReport, TrainError> {
        // On a thread of a pool: every parallel op inside is then a join among workers,
        // not a job injected from outside, which per op wakes a sleeping worker and, at its
        // end, the blocked caller (two futex wake-ups on the critical path, ~20% of a
        // two-thread step). The trainer's own pool, not the global one: ranks that are
        // threads of one process block in collectives, and blocked workers of a shared pool
        // would starve the other ranks. Already on a pool (a benchmark's per-rank pool),
        // the step stays there.
        if rayon::current_thread_index().is_some() {
            return self.step_on_pool();
        }
        let pool = Arc::clone(&self.pool);
        pool.install(|| self.step_on_pool())
    }

    fn step_on_pool(&mut self) -> Result<StepReport, TrainError> {
        let started = Instant::now();
        let step = self.counters.step;
        let accum = self.cfg.train.grad_accum_steps;
        let lr = self.cfg.optim.lr_at(step, self.cfg.train.steps);
        let mut grads: BTreeMap<ParamKey, Tensor<1>> = BTreeMap::new();
        let (mut loss_sum, mut aux_sum, mut tokens) = (0f64, 0f64, 0u64);
        let mut moe_stats = Vec::new();
        for _ in 0..accum {
            let global = self.sampler.next_batch();
            tokens += (global.batch_size * global.seq_len) as u64;
            // This rank's share; its mean cross-entropy weighs T_r / T_g of the global mean.
            let (batch, ce_weight) = match &self.layout {
                Some(l) => (
                    global.rows(l.rows(global.batch_size)),
                    l.loss_scale(global.batch_size, global.seq_len).ce_weight(),
                ),
                None => (global, 1.0),
            };
            let (inputs, targets) = self.local_tensors(&batch, &self.device);
            let output = self.model.forward(inputs);
            let aux_loss = output.aux_loss(&self.cfg.model, step);
            let ce = cross_entropy(output.logits, targets) * ce_weight;
            loss_sum += scalar(&ce);
            aux_sum += scalar(&aux_loss);
            let loss = (ce + aux_loss) / accum as f32;
            let micro = named_grads(&self.model, &loss.backward());
            for (name, g) in micro {
                match grads.remove(&name) {
                    Some(acc) => grads.insert(name, acc + g),
                    None => grads.insert(name, g),
                };
            }
            moe_stats = output.moe_stats;
        }
        let (loss, aux_loss, grad_norm) = match &self.layout {
            Some(l) => {
                grads = l.sync_grads(&self.model, &grads)?;
                let sums = l.sum_agreed(vec![loss_sum, aux_sum], "step loss")?;
                (
                    sums[0] / accum as f64,
                    sums[1] / accum as f64,
                    l.grad_norm(&grads)?,
                )
            }
            None => (
                loss_sum / accum as f64,
                aux_sum / accum as f64,
                global_norm(&grads),
            ),
        };
        if let Some(r) = &mut self.rebalancer {
            r.record(&moe_stats, self.layout.as_ref())?;
        }
        let finite = loss.is_finite() && grad_norm.is_finite();
        if !finite {
            if self.cfg.train.nonfinite == NonFinitePolicy::Stop {
                let (what, value) = if loss.is_finite() {
                    ("gradient norm", grad_norm)
                } else {
                    ("loss", loss)
                };
                return Err(TrainError::NonFinite { step, what, value });
            }
            self.counters.skipped_steps += 1;
            tracing::warn!(
                step,
                loss,
                grad_norm,
                "non-finite loss or gradient: update skipped"
            );
        } else {
            let scale = clip_scale(grad_norm, self.cfg.optim.grad_clip);
            // Cloning a module clones tensor handles, not data.
            self.model = self.optim.step(self.model.clone(), &grads, scale, lr);
        }
        self.counters.step += 1;
        self.counters.tokens_seen += tokens;
        self.last_moe_stats = moe_stats;
        Ok(StepReport {
            step: self.counters.step,
            loss,
            aux_loss,
            grad_norm,
            lr,
            skipped: !finite,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Mean validation cross-entropy over the fixed validation batches (each rank
    /// evaluates its rows of every batch; a collective when distributed).
    pub fn evaluate(&self) -> Result<EvalReport, TrainError> {
        let model = self.model.valid();
        let inner = self.device.clone().inner();
        let (mut sum, mut tokens) = (0f64, 0f64);
        for global in &self.valid {
            let batch = match &self.layout {
                Some(l) => global.rows(l.rows(global.batch_size)),
                None => global.clone(),
            };
            let (inputs, targets) = self.local_tensors(&batch, &inner);
            let n = targets.dims().iter().product::<usize>() as f64;
            let out = model.forward(inputs);
            sum += scalar(&cross_entropy(out.logits, targets)) * n;
            tokens += n;
        }
        if let Some(l) = &self.layout {
            let sums = l.sum_agreed(vec![sum, tokens], "evaluation")?;
            (sum, tokens) = (sums[0], sums[1]);
        }
        let loss = sum / tokens.max(1.0);
        Ok(EvalReport {
            loss,
            perplexity: loss.exp(),
            tokens: tokens as u64,
        })
    }

    /// The model's matmul FLOPs per trained token, forward + backward (3x forward).
    pub fn train_flops_per_token(&self) -> f64 {
        3.0 * forward_flops_per_token(&self.cfg.model, self.cfg.data.seq_len)
    }

    /// Model layer indices of the MoE layers.
    fn moe_layers(&self) -> Vec<usize> {
        (0..self.cfg.model.n_layers)
            .filter(|&l| self.cfg.model.is_moe_layer(l))
            .collect()
    }

    /// Placement metrics of this step (rank 0 logs them): load max/mean per MoE layer and
    /// cross-rank traffic of the current placement under the routing statistics.
    pub fn placement_scalars(&self) -> Vec<(String, f64)> {
        match (&self.rebalancer, &self.layout) {
            (Some(r), Some(l)) => r.scalars(l.placement()),
            _ => Vec::new(),
        }
    }

    /// What a placement change touches, or `None` in one process.
    fn model_state(&mut self) -> Option<ModelState<'_>> {
        Some(ModelState {
            model: &mut self.model,
            layout: self.layout.as_mut()?,
            optim: &mut self.optim,
            device: &self.device,
        })
    }

    /// Re-plans the placement and migrates the experts (a collective; see
    /// [`Rebalancer::rebalance`]). Returns rank 0's log line.
    pub fn rebalance(&mut self) -> Result<Option<String>, TrainError> {
        let step = self.counters.step;
        let Some(rebalancer) = self.rebalancer.take() else {
            return Ok(None);
        };
        let line = match self.model_state() {
            Some(state) => rebalancer.rebalance(step, state),
            None => Ok(None),
        };
        self.rebalancer = Some(rebalancer);
        line
    }

    /// Moves every MoE layer's experts to `owners[i]` (the ep rank of each expert of the
    /// i-th MoE layer), weights and optimizer state (a collective).
    pub fn set_placement(
        &mut self,
        owners: &[Vec<usize>],
    ) -> Result<Vec<switchyard_parallel::ExpertMove>, TrainError> {
        let layers = self.moe_layers();
        let state = self.model_state().ok_or_else(|| {
            TrainError::Placement("setting a placement needs expert parallelism".into())
        })?;
        crate::rebalance::set_placement(state, &layers, owners)
    }

    /// Everything a checkpoint holds, from every part.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        self.model.save(&mut snapshot);
        self.optim.save(&mut snapshot);
        self.sampler.save(&mut snapshot);
        self.counters.save(&mut snapshot);
        if let Some(r) = &self.rebalancer {
            r.save(&mut snapshot);
        }
        if let Some(l) = &self.layout {
            snapshot.put(
                "placement",
                &SavedPlacement::of(l.placement(), &self.moe_layers()),
            );
        }
        snapshot
    }

    /// Saves a checkpoint of the current step (a collective when distributed).
    pub fn save(&self, checkpointer: &Checkpointer) -> Result<PathBuf, TrainError> {
        if self.is_logger()
            && let Some(r) = self.rebalancer.as_ref().filter(|r| r.stats.records > 0)
        {
            // For `switchyard plan-placement --stats`; the checkpoint holds its own copy.
            let path = self.cfg.run.output_dir.join("routing-stats.json");
            if let Err(e) = std::fs::create_dir_all(&self.cfg.run.output_dir)
                .map_err(|e| e.to_string())
                .and_then(|_| r.stats.save(&path).map_err(|e| e.to_string()))
            {
                tracing::warn!("routing statistics not saved: {e}");
            }
        }
        let meta = SaveMeta {
            tokens_seen: self.counters.tokens_seen,
            model_signature: self.signature.clone(),
        };
        checkpointer.save(
            self.counters.step,
            self.snapshot(),
            meta,
            self.layout.as_ref(),
        )
    }

    /// Restores weights, optimizer moments, data position, counters, routing statistics
    /// and the expert placement from a checkpoint of this model (any layout).
    pub fn restore(&mut self, path: &Path) -> Result<(), TrainError> {
        let resume_err = |message: String| TrainError::Resume {
            path: path.to_path_buf(),
            message,
        };
        let snapshot = checkpoint::read_snapshot(path, &self.signature)?;
        // The placement first: the weights are read for the experts this rank then holds.
        let saved: Option<SavedPlacement> = snapshot.get("placement").map_err(resume_err)?;
        let (d_model, ffn) = (self.cfg.model.d_model, self.cfg.model.moe.expert_ffn_dim);
        let device = self.device.clone();
        let optim_cfg = self.cfg.optim.clone();
        if let Some(state) = self.model_state() {
            Rebalancer::restore_placement(
                saved.as_ref(),
                state,
                || zero_expert(d_model, ffn, &device),
                |model| NamedAdamW::new(&optim_cfg, model),
            )?;
        }
        let mut parts: Vec<&mut dyn Checkpointed> = vec![
            &mut self.model,
            &mut self.optim,
            &mut self.sampler,
            &mut self.counters,
        ];
        if let Some(r) = &mut self.rebalancer {
            parts.push(r);
        }
        for part in parts {
            part.restore(&snapshot).map_err(resume_err)?;
        }
        Ok(())
    }

    /// Start from the weights of another run's checkpoint (fine-tuning, conversion): the
    /// optimizer, data position and step start fresh. A vanilla router's `[D, n]` weights
    /// fill a null-expert router's `[D, n + m]`: the true-expert columns are copied, and the
    /// null columns too (cyclically) with `null_init: copy_true_rows`, so the expanded router
    /// starts balanced (AdaMoE's conversion); with `random` they keep their fresh values.
    /// Any other difference in names or shapes is an error naming the tensor.
    pub fn init_from(&mut self, path: &Path) -> Result<(), TrainError> {
        let err = |message: String| TrainError::Resume {
            path: path.to_path_buf(),
            message,
        };
        let snapshot = checkpoint::read_any_snapshot(path)?;
        let tensors = snapshot.tensors("model").map_err(err)?;
        let moe = &self.cfg.model.moe;
        let copy_nulls = match moe.router {
            RouterConfig::NullExperts { null_init, .. } => {
                Some(null_init == NullInit::CopyTrueRows)
            }
            _ => None,
        };
        load_weights(&mut self.model, tensors, |key, stored, shape, current| {
            if stored.shape == shape {
                return f32_values(key, stored);
            }
            let expandable = key.is_router_gate()
                && copy_nulls.is_some()
                && stored.shape.len() == 2
                && shape.len() == 2
                && stored.shape[0] == shape[0]
                && stored.shape[1] == moe.num_experts
                && shape[1] == moe.num_slots();
            if !expandable {
                return Err(format!(
                    "tensor `{key}` has shape {:?} in the checkpoint but {shape:?} in the model",
                    stored.shape
                ));
            }
            let (rows, n, slots) = (shape[0], stored.shape[1], shape[1]);
            let old = f32_values(key, stored)?;
            let fresh = tensor_values(current);
            Ok((0..rows * slots)
                .map(|i| {
                    let (row, col) = (i / slots, i % slots);
                    if col < n || copy_nulls == Some(true) {
                        old[row * n + col % n]
                    } else {
                        fresh[i]
                    }
                })
                .collect())
        })
        .map_err(err)
    }
}

/// Inputs and next-token targets of a batch: [B, S] each.
pub fn batch_tensors(batch: &Batch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let shape = [batch.batch_size, batch.seq_len];
    (
        Tensor::from_data(TensorData::new(batch.inputs(), shape), device),
        Tensor::from_data(TensorData::new(batch.targets(), shape), device),
    )
}

fn scalar(t: &Tensor<1>) -> f64 {
    t.clone().inner().into_scalar::<f32>() as f64
}

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

/// `world`: this rank's communicator when the layout has more than one rank (every rank
/// calls `run`); only rank 0 writes metrics and prints progress. `preempt`: set (by a
/// signal handler) to stop at the next step boundary with a checkpoint; the decision is
/// collective, so every rank stops at the same step even if only one was signalled.
pub fn run(
    cfg: &Config,
    corpus: &Corpus,
    start: Start<'_>,
    device: &Device,
    resolved_config: serde_json::Value,
    world: Option<Box<dyn Communicator>>,
    preempt: Option<&AtomicBool>,
) -> Result<RunOutcome, TrainError> {
    let mut trainer = Trainer::new_on(cfg, corpus, device, world)?;
    let ckpt_dir = cfg
        .checkpoint
        .dir
        .clone()
        .unwrap_or_else(|| cfg.run.output_dir.join("checkpoints"));
    let checkpointer = Checkpointer::new(
        &ckpt_dir,
        cfg.checkpoint.keep_last,
        cfg.checkpoint.save_timeout_s,
        resolved_config,
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
    let flops_per_token = trainer.train_flops_per_token();
    let mut last_eval = None;
    while trainer.counters.step < cfg.train.steps {
        let report = trainer.step()?;
        let tokens_per_sec = report.tokens as f64 / report.seconds.max(1e-9);
        let mut scalars = step_scalars(&report, flops_per_token, trainer.counters.tokens_seen);
        if trainer.is_logger() {
            scalars.extend(trainer.placement_scalars());
        }
        scalars.extend(moe_scalars(&trainer.last_moe_stats));
        let step = trainer.counters.step;
        let last = step == cfg.train.steps;
        let every = cfg.placement.rebalance_every;
        if every > 0
            && step % every == 0
            && !last
            && let Some(line) = trainer.rebalance()?
        {
            tracing::info!("{line}");
        }
        if (cfg.train.eval_every > 0 && step % cfg.train.eval_every == 0) || last {
            let eval = trainer.evaluate()?;
            scalars.push(("valid/loss".into(), eval.loss));
            scalars.push(("valid/perplexity".into(), eval.perplexity));
            last_eval = Some(eval);
        }
        if let Some(metrics) = &mut metrics {
            let borrowed: Vec<(&str, f64)> =
                scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            metrics
                .log(step, &borrowed)
                .map_err(|e| TrainError::Metrics(e.to_string()))?;
            metrics.progress(step, report.loss, tokens_per_sec);
        }
        let due = cfg.checkpoint.every > 0 && step % cfg.checkpoint.every == 0;
        let mut saved = None;
        if due || (last && cfg.checkpoint.save_final) {
            saved = Some(trainer.save(&checkpointer)?);
        }
        // A signal that arrived during the step, the evaluation or the save is acted on here.
        let signalled = preempt.is_some_and(|p| p.load(Ordering::SeqCst));
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
