//! What the trainer needs from the other ranks: the mesh and gradient sync, this rank's
//! share of each global batch, and collective decisions (loss, gradient norm, "did every
//! rank succeed?") that come out bit-identical on every rank, so the ranks never disagree
//! about skipping a step, clipping, or committing a checkpoint.
//!
//! Every rank builds the same global batch from the same sampler (same seed, same state)
//! and keeps rows `[s * B / n, (s + 1) * B / n)` of it, where `s` is its (dp, ep) shard and
//! n = dp x ep; with context parallelism it then keeps its zigzag chunks of each sequence.
//! The sampler state is therefore the same on every rank and a checkpoint holds it once.

use switchyard_comm::{Buffer, Communicator, ReduceOp};
use switchyard_parallel::cp::{CpConfig, SeqLayout, shard_sequence};
use switchyard_parallel::grad_sync::SyncGroup;
use switchyard_parallel::mesh::MeshShape;
use switchyard_parallel::{GradSync, LossScale, Mesh};

use crate::config::Config;
use crate::data::Batch;
use crate::train::TrainError;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use burn::tensor::{Int, Tensor};

/// One rank's view of a multi-rank run.
pub struct Distributed {
    pub mesh: Mesh,
    pub sync: GradSync,
}

fn comm_err(what: &str) -> impl FnOnce(switchyard_comm::CommError) -> TrainError + '_ {
    move |e| TrainError::Comm(format!("{what}: {e}"))
}

impl Distributed {
    /// Builds the mesh from `parallel:` (a collective: every rank calls it).
    pub fn new(world: Box<dyn Communicator>, cfg: &Config) -> Result<Distributed, TrainError> {
        let p = &cfg.parallel;
        let shape = MeshShape {
            dp: p.dp,
            cp: p.cp,
            ep: p.ep,
        };
        let mesh = Mesh::with_shape(world, shape, cfg.model.moe.num_experts)
            .map_err(|e| TrainError::Comm(format!("building the mesh: {e}")))?
            .with_ep_overlap(p.ep_overlap);
        let sync = GradSync::new(&mesh).with_bucket_elems(p.bucket_elems());
        Ok(Distributed { mesh, sync })
    }

    pub fn rank(&self) -> usize {
        self.mesh.rank()
    }

    pub fn world_size(&self) -> usize {
        self.mesh.world().size()
    }

    /// The context-parallel attention settings for `parallelize_with`.
    pub fn cp_config(cfg: &Config) -> CpConfig {
        CpConfig {
            algorithm: cfg.parallel.cp_algorithm,
        }
    }

    /// This rank's rows of a global batch (the row count is divisible by dp x ep:
    /// `Config::validate` checks it; a validation batch may be cut to a multiple first).
    pub fn shard(&self, batch: &Batch) -> Batch {
        let (shard, shards) = self.mesh.batch_shard();
        let per = batch.batch_size / shards;
        batch.rows(shard * per..(shard + 1) * per)
    }

    /// Ranks that split the rows (dp x ep).
    pub fn row_shards(&self) -> usize {
        self.mesh.batch_shard().1
    }

    /// Inputs or targets `[rows, S]` of this rank's rows -> its zigzag chunks `[rows, S/cp]`
    /// (unchanged when cp = 1).
    pub fn shard_sequence(&self, tokens: Tensor<2, Int>) -> Tensor<2, Int> {
        let cp = self.mesh.cp_comm();
        if cp.size() == 1 {
            return tokens;
        }
        shard_sequence(tokens, &SeqLayout::zigzag(cp.size()), cp.rank())
            .expect("Config::validate checks that seq_len splits into 2·cp chunks")
    }

    /// The weight of this rank's mean cross-entropy in the global mean (`T_r / T_g`).
    pub fn loss_scale(&self, global: &Batch) -> LossScale {
        let per = global.batch_size / self.row_shards();
        LossScale {
            local_tokens: per * global.seq_len / self.mesh.cp_comm().size(),
            global_tokens: global.batch_size * global.seq_len,
        }
    }

    /// Whether this rank writes its experts into checkpoints: the first of the ranks holding
    /// the same experts (every expert is written once).
    pub fn writes_experts(&self) -> bool {
        self.mesh.expert_replicas().rank() == 0
    }

    /// Sums `values` over the world; every rank gets the same bits (the sum is followed by
    /// a max, which is exact, so a reduction whose rounding depends on the rank cannot make
    /// ranks disagree).
    pub fn sum_agreed(&self, values: Vec<f64>, what: &str) -> Result<Vec<f64>, TrainError> {
        let world = self.mesh.world();
        let mut buf = Buffer::F64(values);
        world
            .all_reduce(&mut buf, ReduceOp::Sum)
            .map_err(comm_err(what))?;
        world
            .all_reduce(&mut buf, ReduceOp::Max)
            .map_err(comm_err(what))?;
        Ok(buf
            .into_vec::<f64>()
            .expect("an all-reduce of f64 returns f64"))
    }

    /// Whether every rank reports `ok` (a collective: a failure on one rank makes every
    /// rank return an error instead of waiting for it in the next collective).
    pub fn all_ok(&self, ok: bool, what: &str) -> Result<bool, TrainError> {
        let mut failed = Buffer::I64(vec![!ok as i64]);
        self.mesh
            .world()
            .all_reduce(&mut failed, ReduceOp::Max)
            .map_err(comm_err(what))?;
        Ok(failed.get_f64(0) == 0.0)
    }

    /// [`Self::all_ok`] for phases where a rank may legitimately be busy for longer than the
    /// communication timeout (writing its checkpoint shard): waits up to `patience`.
    pub fn all_ok_within(
        &self,
        ok: bool,
        what: &str,
        patience: Duration,
    ) -> Result<bool, TrainError> {
        let mut request = self
            .mesh
            .world()
            .i_all_reduce(Buffer::I64(vec![!ok as i64]), ReduceOp::Max)
            .map_err(comm_err(what))?;
        let deadline = Instant::now() + patience;
        while !request.test().map_err(comm_err(what))? {
            if Instant::now() > deadline {
                return Err(TrainError::Comm(format!(
                    "{what}: not every rank arrived within {:.0} s (checkpoint.save_timeout_s); \
                     a rank is stuck writing its shard or has died",
                    patience.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let failed = request.wait().map_err(comm_err(what))?;
        Ok(failed.get_f64(0) == 0.0)
    }

    /// The global L2 norm of synced gradients: dense gradients are identical on every rank
    /// (counted once), each expert's gradient lives on the ranks that own it (counted once
    /// per ep group).
    pub fn grad_norm(&self, grads: &BTreeMap<String, Tensor<1>>) -> Result<f64, TrainError> {
        let (mut dense, mut experts) = (0f64, 0f64);
        for (name, g) in grads {
            let sq = crate::optim::squared_norm(g);
            match self.sync.group_of(name) {
                SyncGroup::World => dense += sq,
                SyncGroup::Dp => experts += sq,
                SyncGroup::NotOwned => {}
            }
        }
        let mut buf = Buffer::F64(vec![experts]);
        self.mesh
            .ep_comm()
            .all_reduce(&mut buf, ReduceOp::Sum)
            .map_err(comm_err("gradient norm over the ep axis"))?;
        let total = dense + buf.get_f64(0);
        // Agree on the bits (dp groups may round differently).
        let mut agreed = Buffer::F64(vec![total]);
        self.mesh
            .world()
            .all_reduce(&mut agreed, ReduceOp::Max)
            .map_err(comm_err("gradient norm"))?;
        Ok(agreed.get_f64(0).sqrt())
    }

    /// Rank 0's `value` on every rank.
    pub fn broadcast_u64(&self, value: u64, what: &str) -> Result<u64, TrainError> {
        let mut buf = Buffer::I64(vec![value as i64]);
        self.mesh
            .world()
            .broadcast(&mut buf, 0)
            .map_err(comm_err(what))?;
        Ok(buf.get_f64(0) as u64)
    }

    /// Every rank's bytes, in rank order, on every rank.
    pub fn all_gather_bytes(&self, bytes: Vec<u8>, what: &str) -> Result<Vec<Vec<u8>>, TrainError> {
        let world = self.mesh.world();
        let n = world.size();
        let lens = world
            .all_gather_v(&Buffer::I64(vec![bytes.len() as i64]), &vec![1; n])
            .map_err(comm_err(what))?;
        let counts: Vec<usize> = (0..n).map(|r| lens.get_f64(r) as usize).collect();
        let flat = world
            .all_gather_v(&Buffer::U8(bytes), &counts)
            .map_err(comm_err(what))?
            .into_vec::<u8>()
            .expect("an all-gather of u8 returns u8");
        let mut at = 0;
        Ok(counts
            .iter()
            .map(|&c| {
                at += c;
                flat[at - c..at].to_vec()
            })
            .collect())
    }
}
