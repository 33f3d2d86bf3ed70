//! [`parallelize`]: the one entry that turns the `parallel:` config node and the world
//! communicator into everything a rank needs, and [`Layout`], what it hands the trainer.
//!
//! The parallelisms are applied in this order:
//! 1. **Mesh.** The world is split into dp x cp x ep ([`Mesh`]; validated against the
//!    world size and the model's expert count).
//! 2. **Expert parallelism.** Every MoE layer keeps the routed experts its ep rank owns
//!    under the contiguous [`ExpertPlacement`] and gets the all-to-all dispatcher over the
//!    ep axis (pipelined per `ep_overlap`).
//! 3. **Data parallelism of the statistics.** Every MoE layer gets the world reducer, so
//!    its auxiliary losses are defined over the global batch ([`crate::grad_sync`]).
//! 4. **Context parallelism.** With cp > 1 the attention becomes ring or TokenRing
//!    attention over the cp axis.
//! 5. **What the loop needs.** Gradient sync ([`GradSync`], buckets of `grad_bucket_mib`;
//!    with `shard_optimizer`, [`ShardedSync`]'s reduce-scatter and all-gather),
//!    this rank's share of each batch (rows over dp x ep, zigzag sequence chunks over cp)
//!    and the agreement collectives (stop, non-finite, commit decisions, metric sums) that
//!    come out bit-identical on every rank.
//!
//! A new layout (tensor or pipeline parallelism) is a new step here, a new axis of the
//! [`Mesh`], and whatever the [`Layout`] must then hand the loop.
//!
//! The placement is run-time state with one owner, the [`Layout`]: [`Layout::migrate`] and
//! [`Layout::relayout`] change the experts, the dispatchers and the placement together.
//! Gradient sync needs no placement: a rank holds exactly the experts it owns.
//!
//! Every rank builds the same global batch from the same sampler (same seed, same state)
//! and keeps rows `[s * B / n, (s + 1) * B / n)` of it, where `s` is its (dp, ep) shard and
//! n = dp x ep; with context parallelism it then keeps its zigzag chunks of each sequence.
//! The sampler state is therefore the same on every rank and a checkpoint holds it once.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Int, Tensor};
use switchyard_comm::{Buffer, Communicator, ReduceOp};
use switchyard_moe::experts::SwiGlu;
use switchyard_moe::{ParamKey, Transformer};

use crate::config::{ParallelConfig, ShardOptimizer};
use crate::cp::{CpConfig, SeqLayout, shard_sequence};
use crate::error::{ParallelError, Result};
use crate::grad_sync::{GradSync, LossScale, SyncGroup, apply_layout};
use crate::mesh::{ExpertPlacement, Mesh, MeshShape, Placement};
use crate::migrate::{ExpertMove, ExpertState, migrate, relayout};
use crate::shard::{Ownership, ShardedSync};

/// The model with the layout applied, and this rank's [`Layout`].
pub struct Parallelized {
    pub model: Transformer,
    pub layout: Layout,
}

/// Applies the `parallel:` layout to a single-device model (a collective: every rank of
/// `world` calls it with the same config and the same model). See the module docs for the
/// order. `num_experts` comes from the model.
pub fn parallelize(
    model: Transformer,
    cfg: &ParallelConfig,
    num_experts: usize,
    world: Box<dyn Communicator>,
) -> Result<Parallelized> {
    let placement = ExpertPlacement::contiguous(num_experts, cfg.ep)?;
    parallelize_placed(model, cfg, placement, world)
}

/// [`parallelize`] with the experts laid out by `placement` instead of contiguous blocks
/// (a saved plan): each rank keeps the experts `placement` gives it from the full model
/// every rank built, so the weights are those of the contiguous run, placed differently.
pub fn parallelize_placed(
    model: Transformer,
    cfg: &ParallelConfig,
    placement: ExpertPlacement,
    world: Box<dyn Communicator>,
) -> Result<Parallelized> {
    let num_experts = placement.num_experts();
    if placement.ep() != cfg.ep {
        return Err(ParallelError::Placement(format!(
            "the placement is for {} ep ranks, but parallel.ep is {}; plan it for {}",
            placement.ep(),
            cfg.ep,
            cfg.ep
        )));
    }
    let shape = MeshShape {
        dp: cfg.dp,
        cp: cfg.cp,
        ep: cfg.ep,
    };
    let mesh = Mesh::with_shape(world, shape, num_experts)?.with_ep_overlap(cfg.ep_overlap);
    let cp = CpConfig {
        algorithm: cfg.cp_algorithm,
    };
    let model = apply_layout(model, &mesh, &placement, &cp)?;
    let sync = GradSync::new(&mesh).with_bucket_elems(cfg.bucket_elems());
    let shard = cfg
        .shard_optimizer
        .is_sharded()
        .then(|| ShardedSync::new(&mesh, &model, cfg.bucket_elems()));
    Ok(Parallelized {
        model,
        layout: Layout {
            mesh,
            placement,
            sync,
            shard_mode: cfg.shard_optimizer,
            shard,
        },
    })
}

/// One rank's view of a multi-rank run: the mesh, the expert placement, gradient sync, the
/// batch sharder and the agreement collectives.
#[derive(Debug)]
pub struct Layout {
    mesh: Mesh,
    placement: ExpertPlacement,
    sync: GradSync,
    shard_mode: ShardOptimizer,
    /// Present when `shard_optimizer` is not `none`.
    shard: Option<ShardedSync>,
}

impl Layout {
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    pub fn placement(&self) -> &ExpertPlacement {
        &self.placement
    }

    pub fn rank(&self) -> usize {
        self.mesh.rank()
    }

    pub fn world_size(&self) -> usize {
        self.mesh.world().size()
    }

    pub fn ep(&self) -> usize {
        self.mesh.ep()
    }

    // ---- the batch sharder ----

    /// Ranks that split the rows of a batch (dp x ep).
    pub fn row_shards(&self) -> usize {
        self.mesh.batch_shard().1
    }

    /// This rank's rows of a batch of `batch_size` rows (a multiple of [`Self::row_shards`]:
    /// config validation checks it for training batches).
    pub fn rows(&self, batch_size: usize) -> Range<usize> {
        let (shard, shards) = self.mesh.batch_shard();
        let per = batch_size / shards;
        shard * per..(shard + 1) * per
    }

    /// Inputs or targets `[rows, S]` of this rank's rows -> its zigzag chunks `[rows, S/cp]`
    /// (unchanged when cp = 1).
    pub fn shard_sequence(&self, tokens: Tensor<2, Int>) -> Tensor<2, Int> {
        let cp = self.mesh.cp_comm();
        if cp.size() == 1 {
            return tokens;
        }
        shard_sequence(tokens, &SeqLayout::zigzag(cp.size()), cp.rank())
            .expect("config validation checks that seq_len splits into 2·cp chunks")
    }

    /// The weight of this rank's mean cross-entropy in the global mean (`T_r / T_g`) for a
    /// global batch of `batch_size` sequences of `seq_len` tokens.
    pub fn loss_scale(&self, batch_size: usize, seq_len: usize) -> LossScale {
        let per = batch_size / self.row_shards();
        LossScale {
            local_tokens: per * seq_len / self.mesh.cp_comm().size(),
            global_tokens: batch_size * seq_len,
        }
    }

    /// Whether this rank writes its experts into checkpoints: the first of the ranks holding
    /// the same experts (every expert is written once).
    pub fn writes_experts(&self) -> bool {
        self.mesh.expert_replicas().rank() == 0
    }

    // ---- gradients ----

    /// Sums this rank's gradients over the right groups (see [`GradSync::sync`]); with a
    /// sharded optimizer, reduce-scatters them: only the parameters this rank owns come
    /// back ([`ShardedSync::reduce_scatter`]).
    pub fn sync_grads(
        &self,
        model: &Transformer,
        grads: &BTreeMap<ParamKey, Tensor<1>>,
    ) -> Result<BTreeMap<ParamKey, Tensor<1>>> {
        match &self.shard {
            Some(shard) => shard.reduce_scatter(model, grads),
            None => self.sync.sync(model, grads),
        }
    }

    /// `parallel.shard_optimizer`.
    pub fn shard_mode(&self) -> ShardOptimizer {
        self.shard_mode
    }

    /// Who owns which parameter, when the optimizer is sharded.
    pub fn ownership(&self) -> Option<&Ownership> {
        self.shard.as_ref().map(ShardedSync::ownership)
    }

    /// After the owners updated their parameters: every rank gets every value it holds
    /// (the model unchanged when the optimizer is not sharded).
    pub fn gather_params(&self, model: Transformer) -> Result<Transformer> {
        match &self.shard {
            Some(shard) => shard.all_gather(model),
            None => Ok(model),
        }
    }

    /// The global L2 norm of synced gradients: dense gradients are identical on every rank
    /// (counted once), each expert's gradient lives on the ranks that own it (counted once
    /// per ep group). The same bits on every rank.
    pub fn grad_norm(&self, grads: &BTreeMap<ParamKey, Tensor<1>>) -> Result<f64> {
        if let Some(shard) = &self.shard {
            return shard.grad_norm(grads);
        }
        let (mut dense, mut experts) = (0f64, 0f64);
        for (key, g) in grads {
            let sq = switchyard_kernels::squared_norm(g);
            match SyncGroup::of(key) {
                SyncGroup::World => dense += sq,
                SyncGroup::Replicas => experts += sq,
            }
        }
        let mut buf = Buffer::F64(vec![experts]);
        self.mesh
            .ep_comm()
            .all_reduce(&mut buf, ReduceOp::Sum)
            .map_err(ParallelError::comm("gradient norm over the ep axis"))?;
        let total = dense + buf.get_f64(0);
        // Agree on the bits (dp groups may round differently).
        let mut agreed = Buffer::F64(vec![total]);
        self.mesh
            .world()
            .all_reduce(&mut agreed, ReduceOp::Max)
            .map_err(ParallelError::comm("gradient norm"))?;
        Ok(agreed.get_f64(0).sqrt())
    }

    // ---- agreement collectives ----

    /// Sums `values` over the world; every rank gets the same bits (the sum is followed by
    /// a max, which is exact, so a reduction whose rounding depends on the rank cannot make
    /// ranks disagree).
    pub fn sum_agreed(&self, values: Vec<f64>, what: &str) -> Result<Vec<f64>> {
        let mut buf = Buffer::F64(self.sum(values, what)?);
        self.mesh
            .world()
            .all_reduce(&mut buf, ReduceOp::Max)
            .map_err(ParallelError::comm(what))?;
        f64s(buf, what)
    }

    /// Sums `values` over the world (rounding may differ between ranks: for statistics that
    /// every rank only records).
    pub fn sum(&self, values: Vec<f64>, what: &str) -> Result<Vec<f64>> {
        let mut buf = Buffer::F64(values);
        self.mesh
            .world()
            .all_reduce(&mut buf, ReduceOp::Sum)
            .map_err(ParallelError::comm(what))?;
        f64s(buf, what)
    }

    /// Whether every rank reports `ok` (a collective: a failure on one rank makes every
    /// rank return an error instead of waiting for it in the next collective).
    pub fn all_ok(&self, ok: bool, what: &str) -> Result<bool> {
        let mut failed = Buffer::I64(vec![!ok as i64]);
        self.mesh
            .world()
            .all_reduce(&mut failed, ReduceOp::Max)
            .map_err(ParallelError::comm(what))?;
        Ok(failed.get_f64(0) == 0.0)
    }

    /// [`Self::all_ok`] for phases where a rank may legitimately be busy for longer than the
    /// communication timeout (writing its checkpoint shard): waits up to `patience`. Once
    /// `interrupted()` (a stop signal arrived while this rank waits) the wait goes on for at
    /// most the communication timeout: a healthy rank still finishes its part of the save,
    /// a stuck one does not hold the job until `patience` runs out.
    pub fn all_ok_within(
        &self,
        ok: bool,
        what: &str,
        patience: Duration,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<bool> {
        let world = self.mesh.world();
        let mut request = world
            .i_all_reduce(Buffer::I64(vec![!ok as i64]), ReduceOp::Max)
            .map_err(ParallelError::comm(what))?;
        let started = Instant::now();
        let mut deadline = switchyard_comm::deadline_after(patience);
        let mut signalled = false;
        while !request.test().map_err(ParallelError::comm(what))? {
            let now = Instant::now();
            if !signalled && interrupted() {
                signalled = true;
                deadline = deadline.min(switchyard_comm::deadline_after(world.timeout()));
                tracing::warn!(
                    "{what}: a stop signal arrived while waiting for the other ranks; waiting \
                     at most {:.0} s more (comm.timeout_s)",
                    world.timeout().as_secs_f64()
                );
            }
            if now > deadline {
                let bound = if signalled {
                    "the stop signal's grace of comm.timeout_s"
                } else {
                    "checkpoint.save_timeout_s"
                };
                return Err(ParallelError::Agreement(format!(
                    "{what}: not every rank arrived within {:.0} s ({bound}); a rank is stuck \
                     writing its shard or has died",
                    (now - started).as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let failed = request.wait().map_err(ParallelError::comm(what))?;
        Ok(failed.get_f64(0) == 0.0)
    }

    /// Rank 0's `values` on every rank.
    pub fn broadcast_i64s(&self, values: Vec<i64>, what: &str) -> Result<Vec<i64>> {
        let mut buf = Buffer::I64(values);
        self.mesh
            .world()
            .broadcast(&mut buf, 0)
            .map_err(ParallelError::comm(what))?;
        buf.into_vec::<i64>().map_err(|b| ParallelError::Shape {
            what: what.into(),
            detail: format!("the broadcast returned {} instead of i64", b.dtype()),
        })
    }

    /// Every rank's bytes, in rank order, on every rank.
    pub fn all_gather_bytes(&self, bytes: Vec<u8>, what: &str) -> Result<Vec<Vec<u8>>> {
        let world = self.mesh.world();
        let n = world.size();
        let lens = world
            .all_gather_v(&Buffer::I64(vec![bytes.len() as i64]), &vec![1; n])
            .map_err(ParallelError::comm(what))?;
        let counts: Vec<usize> = (0..n).map(|r| lens.get_f64(r) as usize).collect();
        let flat = world
            .all_gather_v(&Buffer::U8(bytes), &counts)
            .map_err(ParallelError::comm(what))?
            .into_vec::<u8>()
            .map_err(|b| ParallelError::Shape {
                what: what.into(),
                detail: format!("the all-gather returned {} instead of u8", b.dtype()),
            })?;
        let mut at = 0;
        Ok(counts
            .iter()
            .map(|&c| {
                at += c;
                flat[at - c..at].to_vec()
            })
            .collect())
    }

    // ---- placement changes ----

    /// Moves experts (weights and `state`) to the owners of `new` (model layer index ->
    /// placement), at a step boundary (a collective: every rank calls it with the same
    /// `new`). Returns the model and the moves made; the layout keeps the new placement.
    pub fn migrate(
        &mut self,
        model: Transformer,
        new: BTreeMap<usize, Placement>,
        state: &mut dyn ExpertState,
        device: &Device,
    ) -> Result<(Transformer, Vec<ExpertMove>)> {
        let (model, placement, moves) =
            migrate(model, &self.mesh, &self.placement, new, state, device)?;
        self.placement = placement;
        if let Some(shard) = &mut self.shard {
            shard.reset(&self.mesh, &model);
        }
        Ok((model, moves))
    }

    /// Lays the experts out for `new` without moving data (before a checkpoint restore
    /// overwrites every expert; see [`crate::relayout`]). Local.
    pub fn relayout(
        &mut self,
        model: Transformer,
        new: BTreeMap<usize, Placement>,
        fresh: impl Fn() -> SwiGlu,
    ) -> Result<Transformer> {
        let (model, placement) = relayout(model, &self.mesh, &self.placement, new, fresh)?;
        self.placement = placement;
        if let Some(shard) = &mut self.shard {
            shard.reset(&self.mesh, &model);
        }
        Ok(model)
    }
}

fn f64s(buf: Buffer, what: &str) -> Result<Vec<f64>> {
    buf.into_vec::<f64>().map_err(|b| ParallelError::Shape {
        what: what.into(),
        detail: format!("the all-reduce returned {} instead of f64", b.dtype()),
    })
}
