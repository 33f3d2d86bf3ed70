//! The training loop. Reads top to bottom: build, (resume), then per step: batches ->
//! forward -> backward -> accumulate -> check -> clip -> update -> log -> eval -> save.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use switchyard_moe::config::NullInit;
use switchyard_moe::layer::KIND_NAMES;
use switchyard_moe::model::forward_flops_per_token;
use switchyard_moe::params::{map_params, named_grads, named_params, signature};
use switchyard_moe::{RouterConfig, Transformer, cross_entropy};

use crate::checkpoint::{self, CheckpointManager, ManifestMeta, NamedTensor};
use switchyard_comm::{Buffer, Communicator};
use switchyard_parallel::grad_sync::expert_id;
use switchyard_parallel::{migrate, parallelize_with, relayout};

use crate::config::Config;
use crate::data::{Batch, Corpus, Sampler, SamplerState};
use crate::distributed::Distributed;
use crate::metrics::MetricsSink;
use crate::optim::{AdamMigration, NamedAdamW, clip_scale, global_norm, tensor_to_vec};
use crate::rebalance::{Rebalancer, SavedPlacement};

/// The `train:` node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps of the whole run.
    pub steps: u64,
    /// Micro-batches summed into one optimizer step.
    #[serde(default = "default_one")]
    pub grad_accum_steps: usize,
    /// Evaluate every this many steps (and after the last step); 0 = only after the last.
    #[serde(default)]
    pub eval_every: u64,
    /// Validation batches per evaluation.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// What to do when the loss or a gradient is NaN or infinite.
    #[serde(default)]
    pub nonfinite: NonFinitePolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Stop the run with an error naming the step (the last checkpoint stays valid).
    #[default]
    Stop,
    /// Skip the update (weights and optimizer state unchanged) and go on; logged.
    Skip,
}

/// The `checkpoint:` node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many steps; 0 = only at the end of the run.
    #[serde(default)]
    pub every: u64,
    /// Committed checkpoints to keep; older ones are deleted.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Where checkpoints go; defaults to `<run.output_dir>/checkpoints`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Save after the last step.
    #[serde(default = "default_true")]
    pub save_final: bool,
    /// Seconds the ranks of a multi-rank save wait for each other (writing a large shard
    /// can take longer than `comm.timeout_s`).
    #[serde(default = "default_save_timeout_s")]
    pub save_timeout_s: f64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: 0,
            keep_last: default_keep_last(),
            dir: None,
            save_final: true,
            save_timeout_s: default_save_timeout_s(),
        }
    }
}

fn default_one() -> usize {
    1
}
fn default_eval_batches() -> usize {
    20
}
fn default_keep_last() -> usize {
    3
}
fn default_save_timeout_s() -> f64 {
    1800.0
}
fn default_true() -> bool {
    true
}

impl TrainConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        if self.steps == 0 {
            issues.push(("steps".into(), "must be at least 1".into()));
        }
        if self.grad_accum_steps == 0 {
            issues.push(("grad_accum_steps".into(), "must be at least 1".into()));
        }
        if self.eval_batches == 0 {
            issues.push(("eval_batches".into(), "must be at least 1".into()));
        }
        issues
    }
}

impl CheckpointConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        if self.keep_last == 0 {
            issues.push((
                "keep_last".into(),
                "must be at least 1 (the newest checkpoint is always kept)".into(),
            ));
        }
        if !(self.save_timeout_s.is_finite() && self.save_timeout_s > 0.0) {
            issues.push((
                "save_timeout_s".into(),
                format!(
                    "must be a positive number of seconds, got {}",
                    self.save_timeout_s
                ),
            ));
        }
        issues
    }
}

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

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("data: {0}")]
    Data(#[from] crate::data::DataError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error(
        "step {step}: the {what} is not finite ({value}); train.nonfinite is `stop`. \
         Lower optim.lr, set optim.grad_clip, or set train.nonfinite: skip"
    )]
    NonFinite {
        step: u64,
        what: &'static str,
        value: f64,
    },
    #[error("communication: {0}")]
    Comm(String),
    #[error("resume from {path}: {message}")]
    Resume { path: PathBuf, message: String },
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Device(#[from] crate::device::DeviceError),
}

/// What the trainer carries from step to step besides weights and optimizer moments; saved
/// in the checkpoint manifest so a resumed run continues exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub tokens_seen: u64,
    pub optimizer_steps_taken: usize,
    pub skipped_steps: u64,
    pub sampler: SamplerState,
    /// The per-layer expert placement when it is not the contiguous default of a
    /// single-process run.
    #[serde(default)]
    pub placement: Option<SavedPlacement>,
    /// The routing statistics (moving average) so far.
    #[serde(default)]
    pub routing: Option<switchyard_placement::RoutingStats>,
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
    pub state_step: u64,
    pub tokens_seen: u64,
    pub skipped_steps: u64,
    /// Per-step MoE statistics of the last step (this rank's tokens), for metrics.
    pub last_moe_stats: Vec<(usize, switchyard_moe::MoeStats)>,
    /// The other ranks, when the layout has more than one.
    pub dist: Option<Distributed>,
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
    /// by `parallel:`; the model is parallelized (this rank keeps only its experts).
    pub fn new_on(
        cfg: &Config,
        corpus: &Corpus,
        device: &Device,
        world: Option<Box<dyn Communicator>>,
    ) -> Result<Self, TrainError> {
        let mut model =
            Transformer::new(&cfg.model, cfg.run.seed, device).with_precision(cfg.precision);
        let signature = signature(&model);
        let dist = match world {
            Some(world) => {
                let dist = Distributed::new(world, cfg)?;
                model = parallelize_with(model, &dist.mesh, &Distributed::cp_config(cfg))
                    .map_err(|e| TrainError::Comm(format!("parallelize: {e}")))?;
                Some(dist)
            }
            None => None,
        };
        let sampler = corpus.train_sampler(cfg.data.shuffle_seed_or(cfg.run.seed))?;
        let mut valid = corpus.valid_batches(cfg.train.eval_batches);
        if let Some(d) = &dist {
            // Ranks take equal shares: a last, partial batch keeps a multiple of the world
            // size of its rows (the same rows on every rank).
            let w = d.row_shards();
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
            state_step: 0,
            tokens_seen: 0,
            skipped_steps: 0,
            last_moe_stats: Vec::new(),
            dist,
            rebalancer,
            signature,
            pool: Arc::new(step_pool()?),
        })
    }

    /// Inputs and targets of this rank's rows, cut to its sequence chunks under cp.
    fn local_tensors(&self, batch: &Batch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let (inputs, targets) = batch_tensors(batch, device);
        match &self.dist {
            Some(d) => (d.shard_sequence(inputs), d.shard_sequence(targets)),
            None => (inputs, targets),
        }
    }

    /// Whether this rank logs, prints and writes run-level files (rank 0).
    pub fn is_logger(&self) -> bool {
        self.dist.as_ref().is_none_or(|d| d.rank() == 0)
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
        let step = self.state_step;
        let accum = self.cfg.train.grad_accum_steps;
        let lr = self.cfg.optim.lr_at(step, self.cfg.train.steps);
        let mut grads: BTreeMap<String, Tensor<1>> = BTreeMap::new();
        let (mut loss_sum, mut aux_sum, mut tokens) = (0f64, 0f64, 0u64);
        let mut moe_stats = Vec::new();
        for _ in 0..accum {
            let global = self.sampler.next_batch();
            tokens += (global.batch_size * global.seq_len) as u64;
            // This rank's share; its mean cross-entropy weighs T_r / T_g of the global mean.
            let (batch, ce_weight) = match &self.dist {
                Some(d) => (d.shard(&global), d.loss_scale(&global).ce_weight()),
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
        let (loss, aux_loss, grad_norm) = match &self.dist {
            Some(d) => {
                let grads_synced = d
                    .sync
                    .sync(&self.model, &grads)
                    .map_err(|e| TrainError::Comm(format!("step {step}: {e}")))?;
                grads = grads_synced;
                let sums = d.sum_agreed(vec![loss_sum, aux_sum], "step loss")?;
                (
                    sums[0] / accum as f64,
                    sums[1] / accum as f64,
                    d.grad_norm(&grads)?,
                )
            }
            None => (
                loss_sum / accum as f64,
                aux_sum / accum as f64,
                global_norm(&grads),
            ),
        };
        if let Some(r) = &mut self.rebalancer {
            r.record(&moe_stats, self.dist.as_ref())?;
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
            self.skipped_steps += 1;
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
        self.state_step += 1;
        self.tokens_seen += tokens;
        self.last_moe_stats = moe_stats;
        Ok(StepReport {
            step: self.state_step,
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
            let batch = match &self.dist {
                Some(d) => d.shard(global),
                None => global.clone(),
            };
            let (inputs, targets) = self.local_tensors(&batch, &inner);
            let n = targets.dims().iter().product::<usize>() as f64;
            let out = model.forward(inputs);
            sum += scalar(&cross_entropy(out.logits, targets)) * n;
            tokens += n;
        }
        if let Some(d) = &self.dist {
            let sums = d.sum_agreed(vec![sum, tokens], "evaluation")?;
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

    pub fn trainer_state(&self) -> TrainerState {
        TrainerState {
            step: self.state_step,
            tokens_seen: self.tokens_seen,
            optimizer_steps_taken: self.optim.steps_taken(),
            skipped_steps: self.skipped_steps,
            sampler: self.sampler.state(),
            placement: self.saved_placement(),
            routing: self
                .rebalancer
                .as_ref()
                .filter(|r| r.stats.records > 0)
                .map(|r| r.stats.clone()),
        }
    }

    /// Model layer indices of the MoE layers.
    fn moe_layers(&self) -> Vec<usize> {
        (0..self.cfg.model.n_layers)
            .filter(|&l| self.cfg.model.is_moe_layer(l))
            .collect()
    }

    fn saved_placement(&self) -> Option<SavedPlacement> {
        let d = self.dist.as_ref()?;
        Some(SavedPlacement::of(&d.mesh, &self.moe_layers()))
    }

    /// Placement metrics of this step (rank 0 logs them): load max/mean per MoE layer and
    /// cross-rank traffic of the current placement under the routing statistics.
    pub fn placement_scalars(&self) -> Vec<(String, f64)> {
        match (&self.rebalancer, &self.dist) {
            (Some(r), Some(d)) => r.scalars(&d.mesh),
            _ => Vec::new(),
        }
    }

    /// Re-plans the placement and migrates the experts (a collective: every rank calls it
    /// at the same step boundary). Rank 0 plans and broadcasts the owners. Returns the log
    /// line (rank 0) or `None` when nothing was planned (one ep rank, no statistics yet).
    pub fn rebalance(&mut self) -> Result<Option<String>, TrainError> {
        let (Some(r), Some(d)) = (&self.rebalancer, &mut self.dist) else {
            return Ok(None);
        };
        let layers = r.stats.moe_layers.clone();
        let experts = r.stats.num_experts;
        if d.mesh.ep() < 2 || layers.is_empty() {
            return Ok(None);
        }
        let step = self.state_step;
        let (mut flat, mut line) = (vec![0i64; layers.len() * experts], None);
        if d.rank() == 0 {
            match r.plan(&d.mesh) {
                Ok(p) => {
                    flat = p.owners.iter().flatten().map(|&o| o as i64).collect();
                    line = Some(format!(
                        "placement: step {step}, {} plan in {:.3} s: predicted load max/mean \
                         {:.3} -> {:.3}, cross-rank transitions {:.3} -> {:.3}",
                        r.cfg.strategy.name(),
                        p.seconds,
                        p.before.mean_load_max_over_mean,
                        p.after.mean_load_max_over_mean,
                        p.before.cross_rank_fraction,
                        p.after.cross_rank_fraction
                    ));
                }
                Err(e) => {
                    tracing::warn!(
                        step,
                        "placement: planning failed, keeping the placement: {e}"
                    );
                    flat = vec![-1; flat.len()];
                }
            }
        }
        let mut buf = Buffer::I64(flat);
        d.mesh
            .world()
            .broadcast(&mut buf, 0)
            .map_err(|e| TrainError::Comm(format!("placement: broadcast of the plan: {e}")))?;
        let flat = buf
            .into_vec::<i64>()
            .expect("a broadcast of i64 returns i64");
        if flat.iter().any(|&o| o < 0) {
            return Ok(None);
        }
        let owners: Vec<Vec<usize>> = flat
            .chunks(experts)
            .map(|o| o.iter().map(|&x| x as usize).collect())
            .collect();
        let moves = self.set_placement(&owners)?;
        Ok(line.map(|l| {
            let mut per_layer: BTreeMap<usize, Vec<String>> = BTreeMap::new();
            for m in &moves {
                per_layer
                    .entry(m.layer)
                    .or_default()
                    .push(format!("{}:{}->{}", m.expert, m.from, m.to));
            }
            let detail: Vec<String> = per_layer
                .iter()
                .map(|(l, v)| format!("layer {l} [{}]", v.join(" ")))
                .collect();
            format!(
                "{l}; moved {} experts (expert:from->to ep rank) {}",
                moves.len(),
                if detail.is_empty() {
                    "(none)".to_string()
                } else {
                    detail.join(", ")
                }
            )
        }))
    }

    /// Moves every MoE layer's experts to `owners[i]` (the ep rank of each expert of the
    /// i-th MoE layer), weights and optimizer state (a collective: every rank calls it with
    /// the same owners at the same step boundary). Returns what moved.
    pub fn set_placement(
        &mut self,
        owners: &[Vec<usize>],
    ) -> Result<Vec<switchyard_parallel::ExpertMove>, TrainError> {
        let step = self.state_step;
        let Some(d) = &mut self.dist else {
            return Err(TrainError::Comm(
                "placement: setting a placement needs expert parallelism".into(),
            ));
        };
        let layers: Vec<usize> = (0..self.cfg.model.n_layers)
            .filter(|&l| self.cfg.model.is_moe_layer(l))
            .collect();
        if owners.len() != layers.len() {
            return Err(TrainError::Comm(format!(
                "placement: {} owner vectors for {} MoE layers",
                owners.len(),
                layers.len()
            )));
        }
        let new: BTreeMap<usize, switchyard_parallel::Placement> = layers
            .iter()
            .zip(owners)
            .map(|(&l, owners)| {
                switchyard_parallel::Placement::from_owners(owners.clone(), d.mesh.ep())
                    .map(|p| (l, p))
            })
            .collect::<Result<_, _>>()
            .map_err(|e| TrainError::Comm(format!("placement: the plan: {e}")))?;
        let mut state = AdamMigration {
            optim: &mut self.optim,
            device: self.device.clone().inner(),
        };
        let (model, mesh, moves) =
            migrate(self.model.clone(), &d.mesh, new, &mut state, &self.device)
                .map_err(|e| TrainError::Comm(format!("step {step}: {e}")))?;
        self.model = model;
        d.sync.set_mesh(&mesh);
        d.mesh = mesh;
        Ok(moves)
    }

    /// Model tensors and optimizer tensors, by name.
    pub fn export(&self) -> (Vec<NamedTensor>, Vec<NamedTensor>) {
        let model = named_params(&self.model)
            .into_iter()
            .map(|(name, shape, value)| NamedTensor::f32(name, shape, tensor_to_vec(&value)))
            .collect();
        (model, self.optim.export())
    }

    /// Save a checkpoint of the current step (a collective when distributed: the dp-rank-0
    /// replica of every ep rank writes its experts, world rank 0 also the dense parameters,
    /// each into its own files; rank 0 commits once every shard is durable).
    pub fn save(
        &self,
        manager: &CheckpointManager,
        resolved_config: &serde_json::Value,
    ) -> Result<PathBuf, TrainError> {
        let (model, optimizer) = self.export();
        let state = serde_json::to_value(self.trainer_state()).expect("trainer state serialises");
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
        let meta = ManifestMeta {
            tokens_seen: self.tokens_seen,
            model_signature: self.signature.clone(),
            trainer_state: state,
            config: resolved_config.clone(),
        };
        let step = self.state_step;
        let Some(d) = &self.dist else {
            let files = [
                ("model.safetensors", model),
                ("optimizer.safetensors", optimizer),
            ];
            return Ok(manager.save(step, &files, meta)?);
        };
        let rank = d.rank();
        // Every expert once (dp rank 0 of its ep rank), every dense tensor once (rank 0).
        let writes = d.writes_experts();
        let mine = |tensors: Vec<NamedTensor>| -> Vec<NamedTensor> {
            tensors
                .into_iter()
                .filter(|t| rank == 0 || expert_id(&t.name).is_some())
                .collect()
        };
        let tag = d.broadcast_u64(std::process::id() as u64, "checkpoint: save tag")?;
        let tmp = manager.shared_temp_dir(step, tag);
        let begun = if rank == 0 {
            manager.begin_shared(step, tag).map(|_| ())
        } else {
            Ok(())
        };
        self.agree_saved(d, manager, &tmp, begun, step, "create the temp directory")?;
        let written = if writes {
            let files = [
                (format!("model.rank-{rank:04}.safetensors"), mine(model)),
                (
                    format!("optimizer.rank-{rank:04}.safetensors"),
                    mine(optimizer),
                ),
            ];
            let borrowed: Vec<(&str, Vec<NamedTensor>)> =
                files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            checkpoint::write_files(&tmp, &borrowed)
        } else {
            Ok(Vec::new())
        };
        let entries = match &written {
            Ok(e) => serde_json::to_vec(e).expect("file entries serialise"),
            Err(_) => Vec::new(),
        };
        self.agree_saved(
            d,
            manager,
            &tmp,
            written.map(|_| ()),
            step,
            "write the shards",
        )?;
        let gathered = d.all_gather_bytes(entries, "checkpoint: file entries")?;
        let committed = if rank == 0 {
            let mut all: Vec<checkpoint::FileEntry> = Vec::new();
            for part in gathered {
                let entries: Vec<checkpoint::FileEntry> =
                    serde_json::from_slice(&part).expect("file entries written above parse");
                all.extend(entries);
            }
            manager.commit_shared(&tmp, step, all, meta).map(|_| ())
        } else {
            Ok(())
        };
        self.agree_saved(d, manager, &tmp, committed, step, "commit")?;
        Ok(manager.root().join(checkpoint::step_dir_name(step)))
    }

    /// Collective outcome of one phase of a distributed save: every rank learns whether
    /// every rank succeeded; on failure rank 0 removes the temp directory.
    fn agree_saved(
        &self,
        d: &Distributed,
        manager: &CheckpointManager,
        tmp: &Path,
        outcome: Result<(), checkpoint::CheckpointError>,
        step: u64,
        phase: &str,
    ) -> Result<(), TrainError> {
        let patience = std::time::Duration::from_secs_f64(self.cfg.checkpoint.save_timeout_s);
        let ok = d.all_ok_within(
            outcome.is_ok(),
            &format!("checkpoint of step {step}: {phase}"),
            patience,
        )?;
        if ok {
            return Ok(());
        }
        if d.rank() == 0 {
            manager.abandon(tmp);
        }
        match outcome {
            Err(e) => Err(e.into()),
            Ok(()) => Err(TrainError::Comm(format!(
                "checkpoint of step {step}: another rank failed to {phase} (its own error is \
                 in its log); nothing was committed"
            ))),
        }
    }

    /// Restore weights, optimizer moments, data position and counters from a checkpoint.
    pub fn restore(&mut self, path: &Path) -> Result<(), TrainError> {
        let resume_err = |message: String| TrainError::Resume {
            path: path.to_path_buf(),
            message,
        };
        let manifest = checkpoint::read_manifest(path)?;
        checkpoint::verify_compatible(&manifest, path, &self.signature)?;
        let loaded = checkpoint::load(path)?;
        let state: TrainerState = serde_json::from_value(loaded.manifest.trainer_state.clone())
            .map_err(|e| resume_err(format!("manifest.json trainer_state: {e}")))?;
        let model_tensors = merged(&loaded, "model").map_err(resume_err)?;
        let optim_tensors = merged(&loaded, "optimizer").map_err(resume_err)?;
        self.restore_placement(state.placement.as_ref())?;
        if let (Some(r), Some(stats)) = (&mut self.rebalancer, &state.routing) {
            r.stats = stats.clone();
        }
        let sizes = self
            .load_weights(&model_tensors, |name, stored, shape, _| {
                if stored.shape != shape {
                    return Err(format!(
                        "tensor `{name}` has shape {:?} in the checkpoint but {shape:?} in the model",
                        stored.shape
                    ));
                }
                f32_values(name, stored)
            })
            .map_err(resume_err)?;
        let device = self.device.clone();
        self.optim
            .import(
                &optim_tensors,
                state.optimizer_steps_taken,
                &sizes,
                &device.clone().inner(),
            )
            .map_err(resume_err)?;
        self.sampler.restore(&state.sampler)?;
        self.state_step = state.step;
        self.tokens_seen = state.tokens_seen;
        self.skipped_steps = state.skipped_steps;
        Ok(())
    }
}

impl Trainer {
    /// Lays the experts out as the checkpoint's run had them (before its weights are read
    /// by name): same ep size -> the saved per-layer placement; another ep size (or a
    /// single-process checkpoint) -> contiguous, which `parallelize` already set.
    fn restore_placement(&mut self, saved: Option<&SavedPlacement>) -> Result<(), TrainError> {
        let (Some(saved), Some(d)) = (saved, &mut self.dist) else {
            return Ok(());
        };
        if saved.ep != d.mesh.ep() {
            tracing::info!(
                saved_ep = saved.ep,
                ep = d.mesh.ep(),
                "the checkpoint's expert placement was for another ep size: using the \
                 contiguous placement"
            );
            return Ok(());
        }
        let new = saved.placements()?;
        let (d_model, f) = (self.cfg.model.d_model, self.cfg.model.moe.expert_ffn_dim);
        let device = self.device.clone();
        let zeros = |shape: [usize; 2]| {
            burn::module::Param::from_tensor(Tensor::<2>::zeros(shape, &device))
        };
        let fresh = || switchyard_moe::experts::SwiGlu {
            w_gate: zeros([d_model, f]),
            w_up: zeros([d_model, f]),
            w_down: zeros([f, d_model]),
        };
        let (model, mesh) = relayout(self.model.clone(), &d.mesh, new, fresh)
            .map_err(|e| TrainError::Comm(format!("restoring the placement: {e}")))?;
        self.model = model;
        d.sync.set_mesh(&mesh);
        d.mesh = mesh;
        // The decay set covers the parameters held at construction; rebuild it.
        self.optim = NamedAdamW::new(&self.cfg.optim, &self.model);
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
        let loaded = checkpoint::load(path)?;
        let tensors = merged(&loaded, "model").map_err(err)?;
        let moe = self.cfg.model.moe.clone();
        let copy_nulls = match moe.router {
            RouterConfig::NullExperts { null_init, .. } => {
                Some(null_init == NullInit::CopyTrueRows)
            }
            _ => None,
        };
        self.load_weights(&tensors, |name, stored, shape, current| {
            if stored.shape == shape {
                return f32_values(name, stored);
            }
            let expandable = name.ends_with("router.w_gate")
                && copy_nulls.is_some()
                && stored.shape.len() == 2
                && shape.len() == 2
                && stored.shape[0] == shape[0]
                && stored.shape[1] == moe.num_experts
                && shape[1] == moe.num_slots();
            if !expandable {
                return Err(format!(
                    "tensor `{name}` has shape {:?} in the checkpoint but {shape:?} in the model",
                    stored.shape
                ));
            }
            let (rows, n, slots) = (shape[0], stored.shape[1], shape[1]);
            let old = f32_values(name, stored)?;
            let fresh = tensor_to_vec(current);
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
        .map_err(err)?;
        Ok(())
    }

    /// Replace every parameter by `value(name, stored tensor, model shape, current value)`;
    /// returns each parameter's element count. Every model parameter must be stored.
    fn load_weights(
        &mut self,
        stored: &BTreeMap<String, NamedTensor>,
        value: impl Fn(&str, &NamedTensor, &[usize], &Tensor<1>) -> Result<Vec<f32>, String>,
    ) -> Result<BTreeMap<String, usize>, String> {
        let mut values = BTreeMap::new();
        for (name, shape, current) in named_params(&self.model) {
            let t = stored.get(&name).ok_or_else(|| {
                format!(
                    "the checkpoint has no tensor `{name}` (in model.safetensors or any \
                     model.rank-NNNN.safetensors shard)"
                )
            })?;
            values.insert(name.clone(), value(&name, t, &shape, &current)?);
        }
        let sizes = values.iter().map(|(k, v)| (k.clone(), v.len())).collect();
        let inner = self.device.clone().inner();
        self.model = map_params(self.model.clone(), |name, _| {
            Tensor::from_floats(values[name].as_slice(), &inner)
        });
        Ok(sizes)
    }
}

/// The tensors of every `{kind}.safetensors` / `{kind}.rank-NNNN.safetensors` file of a
/// checkpoint, by name (a checkpoint written at any layout reads the same way).
fn merged(
    loaded: &checkpoint::LoadedCheckpoint,
    kind: &str,
) -> Result<BTreeMap<String, NamedTensor>, String> {
    let mut out = BTreeMap::new();
    let mut found = false;
    for (file, tensors) in &loaded.files {
        let Some(rest) = file.strip_prefix(kind) else {
            continue;
        };
        if !(rest == ".safetensors" || rest.starts_with(".rank-") && rest.ends_with(".safetensors"))
        {
            continue;
        }
        found = true;
        for t in tensors {
            if out.insert(t.name.clone(), t.clone()).is_some() {
                return Err(format!(
                    "tensor `{}` is stored twice (again in {file}); the checkpoint's shards \
                     overlap",
                    t.name
                ));
            }
        }
    }
    if !found {
        return Err(format!(
            "the checkpoint has no {kind}.safetensors (nor {kind}.rank-NNNN.safetensors shards)"
        ));
    }
    Ok(out)
}

fn f32_values(name: &str, t: &NamedTensor) -> Result<Vec<f32>, String> {
    t.as_f32()
        .map(<[f32]>::to_vec)
        .ok_or_else(|| format!("`{name}` in model.safetensors is not f32"))
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

/// Runs a whole training job: the function the `train` subcommand calls.
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
    let manager = CheckpointManager::new(&ckpt_dir, cfg.checkpoint.keep_last)?;
    match start {
        Start::Fresh => {}
        Start::Resume(path) => {
            trainer.restore(path)?;
            tracing::info!(step = trainer.state_step, path = %path.display(), "resumed");
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
                trainer.state_step,
            )
            .map_err(|e| TrainError::Metrics(e.to_string()))?,
        )
    } else {
        None
    };
    let flops_per_token = trainer.train_flops_per_token();
    let mut last_eval = None;
    while trainer.state_step < cfg.train.steps {
        let report = trainer.step()?;
        let tokens_per_sec = report.tokens as f64 / report.seconds.max(1e-9);
        let mut scalars: Vec<(String, f64)> = vec![
            ("train/loss".into(), report.loss),
            ("train/aux_loss".into(), report.aux_loss),
            ("train/grad_norm".into(), report.grad_norm),
            ("train/lr".into(), report.lr),
            ("train/tokens_per_sec".into(), tokens_per_sec),
            (
                "train/gflops_per_sec".into(),
                tokens_per_sec * flops_per_token / 1e9,
            ),
            ("train/tokens_seen".into(), trainer.tokens_seen as f64),
            ("train/skipped".into(), report.skipped as u8 as f64),
        ];
        if trainer.is_logger() {
            scalars.extend(trainer.placement_scalars());
        }
        for (layer, stats) in &trainer.last_moe_stats {
            scalars.push((
                format!("moe/layer{layer}/max_over_mean_load"),
                stats.max_over_mean_load(),
            ));
            scalars.push((
                format!("moe/layer{layer}/dropped_fraction"),
                stats.dropped_fraction,
            ));
            scalars.push((
                format!("moe/layer{layer}/load_balance_loss"),
                stats.load_balance,
            ));
            scalars.push((
                format!("moe/layer{layer}/ffn_experts_per_token"),
                stats.ffn_experts_per_token,
            ));
            for (name, f) in KIND_NAMES.iter().zip(stats.kind_fraction) {
                scalars.push((format!("moe/layer{layer}/{name}_fraction"), f));
            }
            for (e, f) in stats.expert_fraction.iter().enumerate() {
                scalars.push((format!("moe/layer{layer}/expert{e}_fraction"), *f));
            }
        }
        let step = trainer.state_step;
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
            saved = Some(trainer.save(&manager, &resolved_config)?);
        }
        // A signal that arrived during the step, the evaluation or the save is acted on here.
        let signalled = preempt.is_some_and(|p| p.load(Ordering::SeqCst));
        let stop = match &trainer.dist {
            Some(d) => !d.all_ok(!signalled, "preemption check")?,
            None => signalled,
        };
        if stop && !last {
            let checkpoint = match saved {
                Some(path) => path,
                None => trainer.save(&manager, &resolved_config)?,
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
