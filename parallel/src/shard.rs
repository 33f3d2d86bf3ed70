//! Sharded optimizer state and gradients (`parallel.shard_optimizer`, ZeRO stages 1 and 2).
//!
//! Every parameter has one **owner** among the ranks that replicate it: a dense parameter
//! among all ranks of the world, a routed expert's parameter among its dp x cp replicas
//! (the ranks of [`Mesh::expert_replicas`]). Only the owner keeps the parameter's AdamW
//! moments and updates it. One step:
//! 1. **Reduce-scatter** ([`ShardedSync::reduce_scatter`]): per bucket, the gradients are
//!    laid out owner by owner and reduce-scattered, so each rank receives the summed
//!    gradient of exactly the parameters it owns (the same sum [`crate::GradSync`]
//!    all-reduces, see `grad_sync.rs` for the loss scaling).
//! 2. **Norm** ([`ShardedSync::grad_norm`]): each parameter's gradient is on one rank of the
//!    world, so the global norm is the world sum of the owners' squared norms.
//! 3. The owner updates its parameters (the trainer's optimizer, restricted by
//!    [`Ownership::owns`]).
//! 4. **All-gather** ([`ShardedSync::all_gather`]): the owners' new values go to every
//!    replica, in the same buckets.
//!
//! Ownership is a pure function of the parameter key and the mesh, the same on every rank:
//! dense parameters are dealt out largest first to the least-loaded rank (the dense list
//! never changes during a run); an expert parameter's owner is `(layer + expert + leaf) mod
//! replicas`, so when an expert migrates along the ep axis its moments move between ranks
//! of the same dp x cp coordinates and stay with the owner (`migrate.rs` moves them).
//! Checkpoints name the moments by parameter, so a checkpoint saved at one sharding or
//! layout is read at any other: each rank takes the moments of what it owns.
//!
//! Shape legend: every tensor here is a flattened parameter or gradient `[n]`.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use switchyard_comm::{Buffer, Communicator, ReduceOp, Request};
use switchyard_moe::params::{map_params, named_params};
use switchyard_moe::{ParamKey, Transformer};

use crate::error::{ParallelError, Result};
use crate::grad_sync::{SyncGroup, buckets, host_f32};
use crate::mesh::Mesh;

/// Which rank of its replica group owns each parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Ownership {
    /// Owner (world rank) of every dense parameter.
    dense: BTreeMap<ParamKey, usize>,
    world_rank: usize,
    /// This rank's index among the dp x cp replicas of its experts, and their count.
    replica_rank: usize,
    replicas: usize,
}

/// The position of an expert tensor among its expert's tensors, for spreading an expert
/// over its replicas (any value is correct; these spread SwiGLU's three matrices).
fn leaf_ordinal(leaf: &str) -> usize {
    match leaf {
        "w_gate" => 0,
        "w_up" => 1,
        "w_down" => 2,
        other => other.bytes().map(usize::from).sum(),
    }
}

impl Ownership {
    /// Ownership over `mesh` of `model`'s parameters (every rank of the world calls it with
    /// its own model; the dense list is the same on all of them).
    pub fn new(mesh: &Mesh, model: &Transformer) -> Ownership {
        let world = mesh.world().size();
        let mut dense: Vec<(ParamKey, usize)> = named_params(model)
            .into_iter()
            .filter(|(key, _, _)| SyncGroup::of(key) == SyncGroup::World)
            .map(|(key, shape, _)| (key, shape.iter().product()))
            .collect();
        // Largest first (ties in key order) to the least-loaded rank (ties to the lowest).
        dense.sort_by(|(ka, na), (kb, nb)| nb.cmp(na).then_with(|| ka.cmp(kb)));
        let mut load = vec![0usize; world];
        let dense = dense
            .into_iter()
            .map(|(key, n)| {
                let rank = (0..world)
                    .min_by_key(|&r| (load[r], r))
                    .expect("a world has a rank");
                load[rank] += n;
                (key, rank)
            })
            .collect();
        Ownership {
            dense,
            world_rank: mesh.rank(),
            replica_rank: mesh.expert_replicas().rank(),
            replicas: mesh.expert_replicas().size(),
        }
    }

    /// The owner of `key` as a rank of its [`SyncGroup`]'s communicator (the world for
    /// dense parameters, the expert replicas for routed experts).
    pub fn owner(&self, key: &ParamKey) -> usize {
        match key.routed_expert_id() {
            Some((layer, expert)) => (layer + expert + leaf_ordinal(key.leaf())) % self.replicas,
            None => *self.dense.get(key).unwrap_or_else(|| {
                panic!("`{key}` is not a dense parameter of the model the ownership was built for")
            }),
        }
    }

    /// Whether this rank owns `key` (keeps its moments, updates it).
    pub fn owns(&self, key: &ParamKey) -> bool {
        let me = match SyncGroup::of(key) {
            SyncGroup::World => self.world_rank,
            SyncGroup::Replicas => self.replica_rank,
        };
        self.owner(key) == me
    }
}

/// A bucket laid out owner by owner: the member indices of each owner's segment, in
/// member order (segment `r` is what rank `r` receives or sends).
fn segments(bucket: &[usize], owners: &[usize], n: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); n];
    for &i in bucket {
        out[owners[i]].push(i);
    }
    out
}

/// The reduce-scatter / norm / all-gather of a sharded step (see the module docs).
pub struct ShardedSync {
    mesh: Mesh,
    ownership: Ownership,
    bucket_elems: usize,
}

impl std::fmt::Debug for ShardedSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedSync")
            .field("mesh", &self.mesh)
            .field("bucket_elems", &self.bucket_elems)
            .finish()
    }
}

/// One replica group's parameters: keys, current values [n], sizes, owners (ranks of
/// `comm`).
struct Group<'a> {
    comm: &'a dyn Communicator,
    keys: Vec<ParamKey>,
    values: Vec<Tensor<1>>,
    sizes: Vec<usize>,
    owners: Vec<usize>,
}

impl Group<'_> {
    /// The group's buckets, each laid out owner by owner: the member indices of every
    /// owner's segment and the segment lengths (the collectives' per-rank counts).
    fn owner_buckets(&self, bucket_elems: usize) -> Vec<(Vec<Vec<usize>>, Vec<usize>)> {
        buckets(&self.sizes, bucket_elems)
            .into_iter()
            .map(|bucket| {
                let segs = segments(&bucket, &self.owners, self.comm.size());
                let counts = segs
                    .iter()
                    .map(|s| s.iter().map(|&i| self.sizes[i]).sum())
                    .collect();
                (segs, counts)
            })
            .collect()
    }
}

impl ShardedSync {
    /// For `model` as laid out on `mesh`; `bucket_elems` floats per collective.
    pub fn new(mesh: &Mesh, model: &Transformer, bucket_elems: usize) -> ShardedSync {
        ShardedSync {
            mesh: mesh.clone(),
            ownership: Ownership::new(mesh, model),
            bucket_elems: bucket_elems.max(1),
        }
    }

    pub fn ownership(&self) -> &Ownership {
        &self.ownership
    }

    /// After a migration or relayout: the mesh that holds the new placement and the model
    /// with its new experts.
    pub fn reset(&mut self, mesh: &Mesh, model: &Transformer) {
        self.mesh = mesh.clone();
        self.ownership = Ownership::new(mesh, model);
    }

    fn groups(&self, params: &[(ParamKey, Vec<usize>, Tensor<1>)]) -> [Group<'_>; 2] {
        [
            (SyncGroup::World, self.mesh.world()),
            (SyncGroup::Replicas, self.mesh.expert_replicas()),
        ]
        .map(|(group, comm)| {
            let (keys, values): (Vec<ParamKey>, Vec<Tensor<1>>) = params
                .iter()
                .filter(|(key, _, _)| SyncGroup::of(key) == group)
                .map(|(key, _, value)| (key.clone(), value.clone()))
                .unzip();
            let sizes = values.iter().map(|v| v.dims()[0]).collect();
            let owners = keys.iter().map(|k| self.ownership.owner(k)).collect();
            Group {
                comm: comm.as_ref(),
                keys,
                values,
                sizes,
                owners,
            }
        })
    }

    /// `grads`: this rank's gradients of its loss share (absent = zero). Returns the summed
    /// gradients of the parameters this rank owns, on the parameters' device.
    pub fn reduce_scatter(
        &self,
        model: &Transformer,
        grads: &BTreeMap<ParamKey, Tensor<1>>,
    ) -> Result<BTreeMap<ParamKey, Tensor<1>>> {
        let params = named_params(model);
        let device = params
            .first()
            .map(|(_, _, v)| v.device())
            .ok_or_else(|| ParallelError::Model("the model has no parameters".into()))?;
        let mut out = BTreeMap::new();
        for group in self.groups(&params) {
            let me = group.comm.rank();
            let op = format!("gradient reduce-scatter over `{}`", group.comm.name());
            let mut pending: Vec<(Vec<usize>, Request)> = Vec::new();
            for (segs, counts) in group.owner_buckets(self.bucket_elems) {
                let mut flat: Vec<f32> = Vec::with_capacity(counts.iter().sum());
                for &i in segs.iter().flatten() {
                    match grads.get(&group.keys[i]) {
                        Some(g) => flat.extend(host_f32(g, &group.keys[i])?),
                        None => flat.extend(std::iter::repeat_n(0.0, group.sizes[i])),
                    }
                }
                let request = group
                    .comm
                    .i_reduce_scatter(Buffer::F32(flat), counts, ReduceOp::Sum)
                    .map_err(ParallelError::comm(op.clone()))?;
                pending.push((
                    segs.into_iter().nth(me).expect("a segment per rank"),
                    request,
                ));
            }
            for (mine, request) in pending {
                let summed = f32s(
                    request.wait().map_err(ParallelError::comm(op.clone()))?,
                    &op,
                )?;
                let mut at = 0;
                for i in mine {
                    let n = group.sizes[i];
                    let g = Tensor::<1>::from_floats(&summed[at..at + n], &device);
                    out.insert(group.keys[i].clone(), g);
                    at += n;
                }
            }
        }
        Ok(out)
    }

    /// The global L2 norm of the gradients `reduce_scatter` returned (each parameter's on
    /// its owner): the world sum of the owners' squared norms. The same bits on every rank.
    pub fn grad_norm(&self, owned: &BTreeMap<ParamKey, Tensor<1>>) -> Result<f64> {
        let mine: f64 = owned.values().map(switchyard_kernels::squared_norm).sum();
        let mut buf = Buffer::F64(vec![mine]);
        let world = self.mesh.world();
        world
            .all_reduce(&mut buf, ReduceOp::Sum)
            .map_err(ParallelError::comm("sharded gradient norm"))?;
        // Agree on the bits (the reduction's rounding may depend on the rank).
        world
            .all_reduce(&mut buf, ReduceOp::Max)
            .map_err(ParallelError::comm("sharded gradient norm"))?;
        Ok(buf.get_f64(0).sqrt())
    }

    /// Every replica gets the owners' values of every parameter it holds (after the owners
    /// updated theirs).
    pub fn all_gather(&self, model: Transformer) -> Result<Transformer> {
        let params = named_params(&model);
        let mut gathered: BTreeMap<ParamKey, Tensor<1>> = BTreeMap::new();
        for group in self.groups(&params) {
            let me = group.comm.rank();
            let op = format!("weight all-gather over `{}`", group.comm.name());
            let mut pending: Vec<(Vec<Vec<usize>>, Request)> = Vec::new();
            for (segs, counts) in group.owner_buckets(self.bucket_elems) {
                let mut send: Vec<f32> = Vec::with_capacity(counts[me]);
                for &i in &segs[me] {
                    send.extend(host_f32(&group.values[i], &group.keys[i])?);
                }
                let request = group
                    .comm
                    .i_all_gather_v(Buffer::F32(send), counts)
                    .map_err(ParallelError::comm(op.clone()))?;
                pending.push((segs, request));
            }
            for (segs, request) in pending {
                let all = f32s(
                    request.wait().map_err(ParallelError::comm(op.clone()))?,
                    &op,
                )?;
                let mut at = 0;
                for &i in segs.iter().flatten() {
                    let n = group.sizes[i];
                    let key = &group.keys[i];
                    let device = group.values[i].device();
                    gathered.insert(key.clone(), Tensor::from_floats(&all[at..at + n], &device));
                    at += n;
                }
            }
        }
        Ok(map_params(model, |key, value| {
            gathered.remove(key).unwrap_or(value)
        }))
    }
}

fn f32s(buf: Buffer, op: &str) -> Result<Vec<f32>> {
    buf.into_vec::<f32>().map_err(|b| ParallelError::Shape {
        what: op.to_string(),
        detail: format!("the collective returned {} instead of f32", b.dtype()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_segments_cover_every_parameter_once() {
        let sizes = [5, 3, 9, 1, 1, 4];
        let owners = [0, 1, 0, 2, 1, 2];
        let bs = buckets(&sizes, 8);
        assert_eq!(bs, vec![vec![0, 1], vec![2], vec![3, 4, 5]]);
        let mut seen = Vec::new();
        for b in &bs {
            let segs = segments(b, &owners, 3);
            for (r, seg) in segs.iter().enumerate() {
                assert!(seg.iter().all(|&i| owners[i] == r));
            }
            seen.extend(segs.into_iter().flatten());
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn expert_leaves_spread_over_the_replicas() {
        let own = Ownership {
            dense: BTreeMap::new(),
            world_rank: 0,
            replica_rank: 0,
            replicas: 2,
        };
        let owners: Vec<usize> = ["w_gate", "w_up", "w_down"]
            .iter()
            .map(|leaf| own.owner(&ParamKey::routed_expert(1, 2, leaf)))
            .collect();
        assert_eq!(owners, vec![1, 0, 1]);
    }
}
