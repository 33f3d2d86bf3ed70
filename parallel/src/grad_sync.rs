//! Applying expert, data and context parallelism to a model ([`apply_layout`]), and the
//! gradient sync.
//!
//! # Loss scaling: the trained weights do not depend on the layout
//!
//! The reference is one process on the global batch of `T_g` tokens:
//! `L = CE + a * LB + b * Z` with `CE = (1/T_g) sum_t ce_t`, `Z = (1/T_g) sum_t lse_t^2`,
//! and the balancing loss `LB = sum_i c_i(f) * P_i` where `f_i` (fraction of assignments
//! routed to slot `i`) and `P_i = (1/T_g) sum_t p_ti` are means over the GLOBAL batch and
//! `c_i` depends on `f` only (no gradient through `f`; `N f_i` for Switch, pooled for
//! AdaMoE's nulls, tau-weighted for MoE++).
//!
//! Each rank `r` holds `T_r` of those tokens and builds an additive share `L_r` with
//! `sum_r L_r = L` exactly:
//! - CE: `(T_r / T_g) * mean_local(ce)` — [`LossScale::ce_weight`]; `T_g` comes from an
//!   all-reduce of the token counts, so uneven shards are right too.
//! - LB: [`WorldReducer`] (installed by `parallelize`) all-reduces the slot counts and the
//!   token count in the forward pass (no gradient), so `c_i` is computed from the global
//!   `f`; the rank's share is `sum_i c_i * (sum_{t local} p_ti) / T_g`. Averaging per-rank
//!   balancing losses instead would be wrong: a product of means is not the mean of
//!   products, and the per-rank `f` of a small shard is noisy.
//! - Z: `(sum_{t local} lse_t^2) / T_g`, from the same reducer.
//!
//! The model's `load_balance` and `z_loss` outputs are these shares once parallelized, so
//! the trainer's `ce * ce_weight + aux_loss(cfg, step)` is `L_r` unchanged.
//!
//! Gradients are then SUMMED (not averaged — the `1/T_g` is already in the loss):
//! - dense parameters (every rank holds a replica) over the whole world;
//! - expert parameters over the ranks holding the same expert (the dp x cp plane); the ep
//!   axis needs nothing, the all-to-all backward already brought every token's
//!   contribution to the owner.
//!
//! Context parallelism changes nothing here: a cp rank's tokens are its share of the batch
//! (`T_r` counts them), and the attention backward already brought every query's
//! contribution to the owner of each key and value.
//!
//! With equal shards this equals averaging the per-rank mean losses' gradients over the
//! replicas. Expert parameters a rank does not own are left out of the synced gradients.
//!
//! Capacity dropping is layout-independent too: the layer gathers every rank's choices
//! (with each token's index in the one-process order, from [`BatchReducer::position`]) and
//! admits them in that order against capacities of the global batch, so the same
//! assignments are dropped as in one process.

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::tensor::Tensor;
use switchyard_comm::{Buffer, Communicator, ReduceOp, Request};
use switchyard_moe::dispatch::{BatchPosition, BatchReducer};
use switchyard_moe::params::named_params;
use switchyard_moe::{LocalDispatcher, ParamKey, Transformer};

use crate::cp::{CpAttention, CpConfig, SeqLayout};
use crate::dispatcher::AllToAllDispatcher;
use crate::error::{ParallelError, Result};
use crate::mesh::{ExpertPlacement, Mesh};

/// The MoE layers' batch statistics over the whole world (all-reduce of f64, all-gather
/// of the capacity admission's choices; no gradient). Collectives in the forward pass:
/// every rank calls them in the same order for every MoE layer.
pub struct WorldReducer {
    world: Arc<dyn Communicator>,
    /// This rank's share of the rows: (shard, shards) (`Mesh::batch_shard`).
    batch_shard: (usize, usize),
    /// (cp rank, cp ranks): the zigzag sequence shards.
    cp: (usize, usize),
}

impl std::fmt::Debug for WorldReducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorldReducer({})", self.world.name())
    }
}

impl WorldReducer {
    pub fn new(mesh: &Mesh) -> WorldReducer {
        WorldReducer {
            world: mesh.world().clone(),
            batch_shard: mesh.batch_shard(),
            cp: (mesh.cp_comm().rank(), mesh.cp_comm().size()),
        }
    }
}

impl BatchReducer for WorldReducer {
    fn sum(&self, values: Vec<f64>) -> Vec<f64> {
        let mut buf = Buffer::F64(values);
        // The seam has no error channel: a failed collective unwinds to the step (`seam`).
        self.world
            .all_reduce(&mut buf, ReduceOp::Sum)
            .unwrap_or_else(|e| crate::seam::fail_comm("MoE batch statistics all-reduce", e));
        buf.into_vec::<f64>()
            .unwrap_or_else(|b| panic!("all-reduce of f64 returned {}", b.dtype()))
    }

    fn gather(&self, values: Vec<i64>) -> Vec<i64> {
        let counts = vec![values.len(); self.world.size()];
        let gathered = self
            .world
            .all_gather_v(&Buffer::I64(values), &counts)
            .unwrap_or_else(|e| crate::seam::fail_comm("MoE capacity admission all-gather", e));
        gathered
            .into_vec::<i64>()
            .unwrap_or_else(|b| panic!("all-gather of i64 returned {}", b.dtype()))
    }

    fn position(&self, rows: usize, len: usize) -> BatchPosition {
        let (shard, shards) = self.batch_shard;
        let (cp_rank, cp) = self.cp;
        let positions = if cp == 1 {
            (0..len).collect()
        } else {
            SeqLayout::zigzag(cp).positions(cp_rank, len)
        };
        BatchPosition {
            rows,
            global_rows: rows * shards,
            global_len: len * cp,
            row_offset: shard * rows,
            positions,
        }
    }
}

/// Applies expert, data and context parallelism to a single-device model: every MoE layer
/// gets the all-to-all dispatcher over the mesh's ep axis with its layer's `placement` (the
/// local dispatcher when ep = 1) and the world reducer for its auxiliary losses, and keeps
/// only the routed experts this rank owns (the others are dropped: their memory is freed
/// and they leave the parameter list); when cp > 1 the attention becomes context-parallel
/// over the cp axis (zigzag shards; the model then expects this rank's shard of every
/// sequence, see [`crate::shard_sequence`]). The kept weights are untouched (every rank
/// builds the same weights from the seed); gradients are synced by [`GradSync`].
/// [`crate::parallelize`] calls it with the `parallel:` node's layout.
pub fn apply_layout(
    mut model: Transformer,
    mesh: &Mesh,
    placement: &ExpertPlacement,
    cp: &CpConfig,
) -> Result<Transformer> {
    let experts = placement.num_experts();
    if placement.ep() != mesh.ep() {
        return Err(ParallelError::Placement(format!(
            "the placement is for {} ep ranks, the mesh has {}",
            placement.ep(),
            mesh.ep()
        )));
    }
    let reducer: Arc<dyn BatchReducer> = Arc::new(WorldReducer::new(mesh));
    for (index, block) in model.layers.iter_mut().enumerate() {
        if let Some(layer) = block.moe.take() {
            if layer.experts.len() != experts {
                return Err(ParallelError::Model(format!(
                    "layer {index} has {} experts, the placement was built for {experts}; \
                     build it for model.moe.num_experts",
                    layer.experts.len()
                )));
            }
            let layer_placement = placement.of(index).clone();
            let me = mesh.ep_rank();
            block.moe = Some(
                layer
                    .retain_experts(|e| layer_placement.owner(e) == me)
                    .with_dispatcher(layer_dispatcher(mesh, index, layer_placement))
                    .with_reducer(reducer.clone()),
            );
        }
    }
    if mesh.cp() > 1 {
        model = model.with_attention(Arc::new(CpAttention::for_mesh(mesh, cp)));
    }
    Ok(model)
}

/// The dispatcher of MoE layer `layer` (model layer index) with `placement`: the
/// all-to-all over the ep axis (the local dispatcher when ep = 1).
pub(crate) fn layer_dispatcher(
    mesh: &Mesh,
    layer: usize,
    placement: Arc<crate::mesh::Placement>,
) -> Arc<dyn switchyard_moe::TokenDispatcher> {
    if mesh.ep() == 1 {
        Arc::new(LocalDispatcher)
    } else {
        Arc::new(AllToAllDispatcher::new(mesh, layer, placement))
    }
}

/// The share of the global batch's mean cross-entropy that this rank's local mean stands
/// for: `T_r / T_g`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    pub local_tokens: usize,
    pub global_tokens: usize,
}

impl LossScale {
    /// All-reduces the token counts over the world (collective).
    pub fn new(mesh: &Mesh, local_tokens: usize) -> Result<LossScale> {
        let mut buf = Buffer::I64(vec![local_tokens as i64]);
        mesh.world()
            .all_reduce(&mut buf, ReduceOp::Sum)
            .map_err(ParallelError::comm(
                "LossScale: all-reduce of the token counts",
            ))?;
        let global = buf.get_f64(0) as usize;
        Ok(LossScale {
            local_tokens,
            global_tokens: global,
        })
    }

    /// Multiply this rank's mean cross-entropy by this.
    pub fn ce_weight(&self) -> f32 {
        self.local_tokens as f32 / self.global_tokens.max(1) as f32
    }
}

/// Which group a parameter's gradient is summed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncGroup {
    /// Dense parameter: the whole world.
    World,
    /// Routed expert (held only by the ranks that own it): the ranks holding the same
    /// expert (dp x cp).
    Replicas,
}

impl SyncGroup {
    pub fn of(key: &ParamKey) -> SyncGroup {
        match key.routed_expert_id() {
            Some(_) => SyncGroup::Replicas,
            None => SyncGroup::World,
        }
    }
}

/// Parameters of the given sizes (flattened, in order) in buckets of consecutive ones up to
/// `bucket_elems` floats (a larger parameter is a bucket of its own): indices per bucket.
pub(crate) fn buckets(sizes: &[usize], bucket_elems: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut filled = usize::MAX;
    for (i, &n) in sizes.iter().enumerate() {
        if filled.saturating_add(n) > bucket_elems {
            out.push(Vec::new());
            filled = 0;
        }
        out.last_mut().expect("a bucket was opened").push(i);
        filled += n;
    }
    out
}

/// A flattened parameter or gradient [n] of `key` as host f32 values.
pub(crate) fn host_f32(t: &Tensor<1>, key: &ParamKey) -> Result<Vec<f32>> {
    t.clone()
        .inner()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| ParallelError::Shape {
            what: format!("gradient or value of `{key}`"),
            detail: format!("not readable as f32: {e:?}"),
        })
}

/// Sums named gradients over the right axis, in buckets of at most `bucket_elems` floats
/// (all buckets of an axis are in flight together, then waited).
pub struct GradSync {
    mesh: Mesh,
    bucket_elems: usize,
}

impl std::fmt::Debug for GradSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradSync")
            .field("mesh", &self.mesh)
            .field("bucket_elems", &self.bucket_elems)
            .finish()
    }
}

impl GradSync {
    pub fn new(mesh: &Mesh) -> GradSync {
        GradSync {
            mesh: mesh.clone(),
            bucket_elems: 1 << 22,
        }
    }

    /// Bucket size in f32 elements (at least 1).
    pub fn with_bucket_elems(mut self, elems: usize) -> GradSync {
        self.bucket_elems = elems.max(1);
        self
    }

    /// `grads`: this rank's gradients of its loss share, by key (absent = zero). Returns the
    /// summed gradient of every parameter this rank holds, on the inner device (a rank
    /// holds exactly the experts it owns, so no placement is needed here).
    /// Parameters come from `named_params(model)`, the same list on every rank, so every
    /// rank issues the same collectives in the same order.
    pub fn sync(
        &self,
        model: &Transformer,
        grads: &BTreeMap<ParamKey, Tensor<1>>,
    ) -> Result<BTreeMap<ParamKey, Tensor<1>>> {
        let params = named_params(model);
        let mut out = BTreeMap::new();
        for (group, comm) in [
            (SyncGroup::World, self.mesh.world()),
            (SyncGroup::Replicas, self.mesh.expert_replicas()),
        ] {
            let members: Vec<(&ParamKey, &Tensor<1>)> = params
                .iter()
                .filter(|(key, _, _)| SyncGroup::of(key) == group)
                .map(|(name, _, value)| (name, value))
                .collect();
            self.sync_group(comm.as_ref(), &members, grads, &mut out)?;
        }
        Ok(out)
    }

    fn sync_group(
        &self,
        comm: &dyn Communicator,
        members: &[(&ParamKey, &Tensor<1>)],
        grads: &BTreeMap<ParamKey, Tensor<1>>,
        out: &mut BTreeMap<ParamKey, Tensor<1>>,
    ) -> Result<()> {
        let sizes: Vec<usize> = members.iter().map(|(_, value)| value.dims()[0]).collect();
        let buckets = buckets(&sizes, self.bucket_elems);
        let mut requests: Vec<(Vec<usize>, Request)> = Vec::with_capacity(buckets.len());
        for bucket in buckets {
            if comm.device_collectives().is_some() {
                // Gradients on the communicator's GPU: summed in device memory (NCCL).
                let parts: Vec<Tensor<1>> = bucket
                    .iter()
                    .map(|&i| {
                        let (name, value) = members[i];
                        grads.get(name).map_or_else(
                            || Tensor::zeros([value.dims()[0]], &value.device()),
                            |g| g.clone().inner(),
                        )
                    })
                    .collect();
                let what = || format!("gradient sync over `{}`", comm.name());
                if let Some(summed) =
                    crate::device_path::all_reduce_sum(&Tensor::cat(parts, 0), comm, &what)
                {
                    let summed = summed?;
                    let mut at = 0;
                    for &i in &bucket {
                        let (name, value) = members[i];
                        let n = value.dims()[0];
                        out.insert(name.clone(), summed.clone().slice(at..at + n));
                        at += n;
                    }
                    continue;
                }
            }
            let mut flat: Vec<f32> = Vec::new();
            for &i in &bucket {
                let (name, value) = members[i];
                match grads.get(name) {
                    Some(g) => flat.extend(host_f32(g, name)?),
                    None => flat.extend(std::iter::repeat_n(0.0, value.dims()[0])),
                }
            }
            let op = format!("gradient sync over `{}`", comm.name());
            let request = comm
                .i_all_reduce(Buffer::F32(flat), ReduceOp::Sum)
                .map_err(ParallelError::comm(op))?;
            requests.push((bucket, request));
        }
        for (bucket, request) in requests {
            let op = format!("gradient sync over `{}`", comm.name());
            let summed = request
                .wait()
                .map_err(ParallelError::comm(op.clone()))?
                .into_vec::<f32>()
                .map_err(|b| ParallelError::Shape {
                    what: op,
                    detail: format!("all-reduce returned {} elements", b.dtype()),
                })?;
            let mut at = 0;
            for i in bucket {
                let (name, value) = members[i];
                let n = value.dims()[0];
                let device = value.device();
                let g = Tensor::<1>::from_floats(&summed[at..at + n], &device);
                out.insert(name.clone(), g);
                at += n;
            }
        }
        Ok(())
    }
}
