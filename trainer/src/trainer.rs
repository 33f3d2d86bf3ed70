//! [`Trainer`]: one rank's model, optimizer and data position, and one optimizer step over
//! them (batches -> forward -> backward -> accumulate -> sync -> check -> clip -> update),
//! plus evaluation. What it saves and how its experts move is in `state.rs`; the loop that
//! drives it is `train.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use switchyard_kernels::alloc;
use switchyard_moe::config::BalanceLoss;
use switchyard_moe::model::forward_flops_per_token;
use switchyard_moe::params::{named_grads, signature};
use switchyard_moe::{MoeStats, ParamKey, Transformer, cross_entropy};
use switchyard_parallel::{Communicator, Layout, ShardOptimizer, parallelize, parallelize_placed};
use switchyard_placement::ExpertCost;

use crate::config::{Config, NonFinitePolicy};
use crate::data::{Batch, BlendSampler, Corpus, ValidSet};
use crate::error::TrainError;
use crate::metrics::{EvalReport, StepMemory, StepReport};
use crate::optim::{NamedAdamW, clip_scale, global_norm};
use crate::rebalance::{Rebalancer, initial_placement};

/// The pool a trainer's steps run on: as many threads as the global pool (`run.threads`),
/// with a main-thread-sized stack (deep autodiff graphs recurse in the backward pass).
/// Its workers speak for the rank that builds it (see `console::current_rank`).
fn step_pool() -> Result<rayon::ThreadPool, TrainError> {
    let rank = crate::console::thread_rank();
    rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .stack_size(64 << 20)
        .thread_name(|i| format!("switchyard-step-{i}"))
        .start_handler(move |_| crate::console::set_thread_rank(rank))
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

/// A model, its optimizer and its data position.
pub struct Trainer {
    pub cfg: Config,
    pub model: Transformer,
    pub optim: NamedAdamW,
    pub sampler: BlendSampler,
    /// The validation batches and each row's source.
    pub valid: ValidSet,
    pub device: Device,
    pub counters: Counters,
    /// Per-step MoE statistics of the last step (this rank's tokens), for metrics.
    pub last_moe_stats: Vec<(usize, MoeStats)>,
    /// The other ranks, when the layout has more than one.
    pub layout: Option<Layout>,
    /// Routing statistics and the planner (`placement:`); `None` without MoE layers.
    pub rebalancer: Option<Rebalancer>,
    /// Signature of the whole (unsharded) model: the same at every layout.
    pub(crate) signature: String,
    /// The threads a step runs on (see [`Self::step`]).
    pool: Arc<rayon::ThreadPool>,
    /// Whether each step's routing goes into the rebalancer's statistics. Distributed, that
    /// is a world all-reduce per step: on only when something re-plans from them
    /// (`placement.rebalance_every > 0`) or records them (`record-routing` sets it). In one
    /// process they are free, and saved for `plan-placement`.
    pub record_routing: bool,
    /// The `placement.plan` this run was built from, by name (for the resume log); `None`:
    /// the contiguous placement.
    pub(crate) initial_plan: Option<String>,
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
        let mut model = Transformer::new(&cfg.model, cfg.run.seed, device)
            .with_precision(cfg.precision)
            .with_recompute(cfg.train.activation_checkpointing);
        let signature = signature(&model);
        let moe_layers = cfg.moe_layers();
        let num_experts = cfg.model.moe.num_experts;
        let mut initial_plan = None;
        let layout = match world {
            Some(world) => {
                let planned =
                    initial_placement(&cfg.placement, cfg.parallel.ep, &moe_layers, num_experts)?;
                let parallel = match planned {
                    Some((placement, name)) => {
                        initial_plan = Some(name);
                        parallelize_placed(model, &cfg.parallel, placement, world)?
                    }
                    None => parallelize(model, &cfg.parallel, num_experts, world)?,
                };
                model = parallel.model;
                Some(parallel.layout)
            }
            None => None,
        };
        if let Some(l) = &layout
            && l.rank() == 0
            && let Some(plan) = &initial_plan
        {
            tracing::info!(
                "placement.plan: starting from the {plan} (ep {}), owners (expert -> ep \
                 rank) per MoE layer: {}",
                l.ep(),
                moe_layers
                    .iter()
                    .map(|&m| format!("layer {m} {:?}", l.placement().of(m).owners()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let sampler = corpus.train_sampler(cfg.data.shuffle_seed_or(cfg.run.seed))?;
        let mut valid = corpus.valid_set(cfg.train.eval_batches);
        if let Some(l) = &layout {
            // Ranks take equal shares: a last, partial batch keeps a multiple of the world
            // size of its rows (the same rows on every rank).
            valid.trim_to_multiple(l.row_shards());
        }
        let unread = valid.unread_sources();
        if !unread.is_empty() && layout.as_ref().is_none_or(|l| l.rank() == 0) {
            tracing::warn!(
                "validation: no held-out sequence of {} within train.eval_batches = {} \
                 batches; its loss is not measured and valid/loss weighs the other sources. \
                 Raise train.eval_batches to measure every source",
                unread.join(", "),
                cfg.train.eval_batches
            );
        }
        let optim = NamedAdamW::new(&cfg.optim, &model)
            .sharded(layout.as_ref().and_then(|l| l.ownership().cloned()));
        let has_moe = (0..cfg.model.n_layers).any(|l| cfg.model.is_moe_layer(l));
        let rebalancer = if has_moe {
            let expert = ExpertCost::swiglu(
                cfg.model.d_model,
                cfg.model.moe.expert_ffn_dim,
                cfg.train.grad_accum_steps,
            );
            Some(Rebalancer::new(&cfg.placement, expert)?)
        } else {
            None
        };
        let record_routing = layout.is_none() || cfg.placement.rebalance_every > 0;
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
            record_routing,
            initial_plan,
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

    /// The rows of a global batch of `batch_size` rows that this rank holds.
    fn local_rows(&self, batch_size: usize) -> std::ops::Range<usize> {
        match &self.layout {
            Some(l) => l.rows(batch_size),
            None => 0..batch_size,
        }
    }

    /// This rank's share of a validation batch (its rows, its sequence chunks).
    pub(crate) fn valid_tensors(
        &self,
        global: &Batch,
        device: &Device,
    ) -> (Tensor<2, Int>, Tensor<2, Int>) {
        match &self.layout {
            Some(_) => self.local_tensors(&global.rows(self.local_rows(global.batch_size)), device),
            None => self.local_tensors(global, device),
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
            return switchyard_parallel::seam::catch_seam_failure(|| self.step_on_pool());
        }
        let pool = Arc::clone(&self.pool);
        switchyard_parallel::seam::catch_seam_failure(|| pool.install(|| self.step_on_pool()))
    }

    fn step_on_pool(&mut self) -> Result<StepReport, TrainError> {
        let started = Instant::now();
        let step = self.counters.step;
        let accum = self.cfg.train.grad_accum_steps;
        let lr = self.cfg.optim.lr_at(step, self.cfg.train.steps);
        let mut grads: BTreeMap<ParamKey, Tensor<1>> = BTreeMap::new();
        let (mut loss_sum, mut aux_sum, mut z_sum, mut tokens) = (0f64, 0f64, 0f64, 0u64);
        let mut moe_stats = Vec::new();
        let counting = alloc::counting();
        let held_at_start = alloc::live_bytes() as u64;
        alloc::reset_peak();
        // With `states_and_grads` each micro-batch's gradients are reduce-scattered at once
        // and only the owned sums are accumulated; otherwise the full local gradients are
        // accumulated and synced after the last micro-batch.
        let sync_each_micro = self
            .layout
            .as_ref()
            .is_some_and(|l| l.shard_mode() == ShardOptimizer::StatesAndGrads);
        let batches: Vec<_> = (0..accum).map(|_| self.sampler.next_batch()).collect();
        if self.cfg.model.moe.balance_loss == BalanceLoss::GlobalBatch && accum > 1 {
            let counts = self.step_routing_counts(&batches);
            self.model.set_step_counts(Some(&counts));
        }
        // Per MoE layer, the step's routed assignments per slot over every rank and
        // micro-batch (for the auxiliary-loss-free bias).
        let mut step_counts: Vec<(usize, Vec<f64>)> = Vec::new();
        for global in batches {
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
            z_sum += output.z_loss_term(&self.cfg.model);
            let ce = cross_entropy(output.logits, targets) * ce_weight;
            loss_sum += scalar(&ce);
            aux_sum += scalar(&aux_loss);
            let loss = (ce + aux_loss) / accum as f32;
            let mut micro = named_grads(&self.model, &loss.backward());
            if sync_each_micro && let Some(l) = &self.layout {
                micro = l.sync_grads(&self.model, &micro)?;
            }
            for (name, g) in micro {
                match grads.remove(&name) {
                    Some(acc) => grads.insert(name, acc + g),
                    None => grads.insert(name, g),
                };
            }
            add_slot_counts(&mut step_counts, &output.moe_stats);
            moe_stats = output.moe_stats;
        }
        self.model.set_step_counts(None);
        let held_before_sync = alloc::live_bytes() as u64;
        let (loss, aux_loss, z_loss, grad_norm) = match &self.layout {
            Some(l) => {
                if !sync_each_micro {
                    grads = l.sync_grads(&self.model, &grads)?;
                }
                let sums = l.sum_agreed(vec![loss_sum, aux_sum, z_sum], "step loss")?;
                (
                    sums[0] / accum as f64,
                    sums[1] / accum as f64,
                    sums[2] / accum as f64,
                    l.grad_norm(&grads)?,
                )
            }
            None => (
                loss_sum / accum as f64,
                aux_sum / accum as f64,
                z_sum / accum as f64,
                global_norm(&grads),
            ),
        };
        if let Some(r) = self.rebalancer.as_mut().filter(|_| self.record_routing) {
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
            if let Some(l) = &self.layout {
                self.model = l.gather_params(self.model.clone())?;
            }
            if let Some(bias) = &self.cfg.model.moe.bias_balance {
                self.model.update_router_biases(&step_counts, bias.gamma);
            }
        }
        self.counters.step += 1;
        self.counters.tokens_seen += tokens;
        self.last_moe_stats = moe_stats;
        let memory = if counting {
            let peak = alloc::peak_bytes() as f64;
            let peak_per_rank = match &self.layout {
                Some(l) => {
                    let mut mine = vec![0.0; l.world_size()];
                    mine[l.rank()] = peak;
                    l.sum(mine, "step memory")?
                }
                None => vec![peak],
            };
            Some(StepMemory {
                at_start: held_at_start,
                before_sync: held_before_sync,
                peak_per_rank: peak_per_rank.into_iter().map(|b| b as u64).collect(),
            })
        } else {
            None
        };
        Ok(StepReport {
            memory,
            step: self.counters.step,
            loss,
            aux_loss,
            z_loss,
            grad_norm,
            lr,
            skipped: !finite,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// `balance_loss: global_batch` over several micro-batches: the step's routed
    /// assignments per slot of every MoE layer, from a forward pass without gradients over
    /// every micro-batch (a collective when distributed, like the step itself).
    fn step_routing_counts(&self, batches: &[Batch]) -> Vec<(usize, Vec<f64>)> {
        let model = self.model.valid();
        let inner = self.device.clone().inner();
        let mut counts = Vec::new();
        for global in batches {
            let batch = match &self.layout {
                Some(l) => global.rows(l.rows(global.batch_size)),
                None => global.clone(),
            };
            let (inputs, _) = self.local_tensors(&batch, &inner);
            add_slot_counts(&mut counts, &model.forward(inputs).moe_stats);
        }
        counts
    }

    /// Mean validation cross-entropy over the fixed validation batches (each rank
    /// evaluates its rows of every batch; a collective when distributed).
    pub fn evaluate(&self) -> Result<EvalReport, TrainError> {
        switchyard_parallel::seam::catch_seam_failure(|| self.evaluate_here())
    }

    fn evaluate_here(&self) -> Result<EvalReport, TrainError> {
        let model = self.model.valid();
        let inner = self.device.clone().inner();
        // [loss sum, tokens] per source, summed over the ranks in one collective.
        let mut sums = vec![0f64; 2 * self.valid.sources.len()];
        for (global, row_sources) in self.valid.batches.iter().zip(&self.valid.row_sources) {
            let (inputs, targets_bs) = self.valid_tensors(global, &inner);
            let logits_bsv = model.forward(inputs).logits;
            let local = &row_sources[self.local_rows(global.batch_size)];
            for (j, rows) in rows_by_source(local) {
                let (logits_bsv, targets_bs) = if rows.len() == local.len() {
                    (logits_bsv.clone(), targets_bs.clone())
                } else {
                    let rows = Tensor::<1, Int>::from_data(
                        TensorData::new(rows.clone(), [rows.len()]),
                        &targets_bs.device(),
                    );
                    (
                        logits_bsv.clone().select(0, rows.clone()),
                        targets_bs.clone().select(0, rows),
                    )
                };
                let n = targets_bs.dims().iter().product::<usize>() as f64;
                sums[2 * j] += scalar(&cross_entropy(logits_bsv, targets_bs)) * n;
                sums[2 * j + 1] += n;
            }
        }
        if let Some(l) = &self.layout {
            sums = l.sum_agreed(sums, "evaluation")?;
        }
        // (name, weight, mean loss) of the sources that had rows; a source without any (a
        // small eval_batches budget) is left out and the others' weights renormalised.
        let evaluated: Vec<(&str, f64, f64)> = self
            .valid
            .sources
            .iter()
            .zip(sums.chunks(2))
            .filter(|(_, s)| s[1] > 0.0)
            .map(|((name, weight), s)| (name.as_str(), *weight, s[0] / s[1]))
            .collect();
        let weight: f64 = evaluated.iter().map(|e| e.1).sum();
        let loss = evaluated.iter().map(|e| e.1 * e.2).sum::<f64>() / weight.max(f64::MIN_POSITIVE);
        Ok(EvalReport {
            loss,
            perplexity: loss.exp(),
            tokens: sums.chunks(2).map(|s| s[1]).sum::<f64>() as u64,
            sources: if self.valid.sources.len() > 1 {
                evaluated.iter().map(|e| (e.0.to_string(), e.2)).collect()
            } else {
                Vec::new()
            },
        })
    }

    /// The model's matmul FLOPs per trained token, forward + backward (3x forward).
    pub fn train_flops_per_token(&self) -> f64 {
        3.0 * forward_flops_per_token(&self.cfg.model, self.cfg.data.seq_len)
    }

    /// Model layer indices of the MoE layers.
    pub(crate) fn moe_layers(&self) -> Vec<usize> {
        self.cfg.moe_layers()
    }
}

/// The positions of the rows of each source present in `row_sources` (source index ->
/// row positions, in source order).
fn rows_by_source(row_sources: &[usize]) -> BTreeMap<usize, Vec<i64>> {
    let mut rows: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
    for (i, &j) in row_sources.iter().enumerate() {
        rows.entry(j).or_default().push(i as i64);
    }
    rows
}

/// Adds each MoE layer's global slot counts of one forward pass to `sums`.
fn add_slot_counts(sums: &mut Vec<(usize, Vec<f64>)>, stats: &[(usize, MoeStats)]) {
    if sums.is_empty() {
        sums.extend(
            stats
                .iter()
                .map(|(l, s)| (*l, vec![0.0; s.slot_counts.len()])),
        );
    }
    for ((_, sum), (_, s)) in sums.iter_mut().zip(stats) {
        for (total, count) in sum.iter_mut().zip(&s.slot_counts) {
            *total += count;
        }
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
