//! The device mesh (world = dp x cp x ep, one sub-communicator per axis: fixed topology,
//! built once at launch and passed down as a value, no global state) and the expert
//! placement (which ep rank computes which expert: run-time state, owned by the
//! [`crate::Layout`], changed by migration).
//!
//! Layout: world rank `r = (d * cp + c) * ep + p`.
//! - The **ep axis** (`p`, consecutive ranks) groups the ranks whose experts together make
//!   up the full expert set: tokens are exchanged inside it.
//! - The **cp axis** (`c`) groups the ranks holding the shards of the same sequences
//!   (context parallelism): ring attention runs inside it.
//! - The **dp axis** (`d`) groups the data-parallel replicas.
//!
//! Batch rows are split over the `dp * ep` batch shards (shard `d * ep + p`, see
//! [`Mesh::batch_shard`]); each batch shard's sequences are split over the cp axis (see
//! [`crate::cp::SeqLayout`]). The ranks holding the same expert are those with the same `p`
//! (the dp x cp plane, [`Mesh::expert_replicas`]): expert gradients are summed over them,
//! dense gradients over the whole world.
//!
//! With cp = 1 the layout is the dp x ep layout `r = d * ep + p` of [`Mesh::new`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use switchyard_comm::Communicator;

use crate::error::{ParallelError, Result};
use crate::overlap::Overlap;

/// Which ep rank owns each routed FFN expert of one MoE layer. An input, so it can change at
/// run time (a planned placement, a live migration); the default is contiguous blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    owner: Vec<usize>,
    ep: usize,
}

impl Placement {
    /// Experts `[i * E/ep, (i+1) * E/ep)` on ep rank `i`.
    pub fn contiguous(num_experts: usize, ep: usize) -> Result<Placement> {
        check_ep(num_experts, ep)?;
        let per = num_experts / ep;
        Placement::from_owners((0..num_experts).map(|e| e / per).collect(), ep)
    }

    /// `owner[e]` is the ep rank that computes expert `e`. Every owner must be below `ep`;
    /// ranks may own different numbers of experts (none included).
    pub fn from_owners(owner: Vec<usize>, ep: usize) -> Result<Placement> {
        if ep == 0 {
            return Err(ParallelError::ZeroAxis { axis: "ep" });
        }
        if let Some((e, &o)) = owner.iter().enumerate().find(|&(_, &o)| o >= ep) {
            return Err(ParallelError::Placement(format!(
                "expert {e} is placed on ep rank {o}, but the ep axis has {ep} ranks \
                 (0..{ep}); place every expert on a rank below {ep}"
            )));
        }
        Ok(Placement { owner, ep })
    }

    pub fn num_experts(&self) -> usize {
        self.owner.len()
    }

    pub fn ep_size(&self) -> usize {
        self.ep
    }

    /// The ep rank that computes expert `e` (`e < num_experts()`).
    pub fn owner(&self, e: usize) -> usize {
        self.owner[e]
    }

    /// Global ids of the experts computed by ep rank `rank`, ascending.
    pub fn experts_of(&self, rank: usize) -> Vec<usize> {
        (0..self.owner.len())
            .filter(|&e| self.owner[e] == rank)
            .collect()
    }

    /// The owner of every expert, by global id.
    pub fn owners(&self) -> &[usize] {
        &self.owner
    }
}

fn check_ep(num_experts: usize, ep: usize) -> Result<()> {
    if ep == 0 {
        return Err(ParallelError::ZeroAxis { axis: "ep" });
    }
    if !num_experts.is_multiple_of(ep) {
        return Err(ParallelError::EpDoesNotDivide {
            ep,
            experts: num_experts,
            divisors: (1..=num_experts)
                .filter(|d| num_experts.is_multiple_of(*d))
                .collect(),
        });
    }
    Ok(())
}

/// The sizes of the mesh axes: world = dp x cp x ep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshShape {
    pub dp: usize,
    pub cp: usize,
    pub ep: usize,
}

impl MeshShape {
    /// The rank at coordinates (d, c, p).
    pub fn rank_of(&self, d: usize, c: usize, p: usize) -> usize {
        (d * self.cp + c) * self.ep + p
    }

    /// The coordinates (d, c, p) of `rank`.
    pub fn coords(&self, rank: usize) -> (usize, usize, usize) {
        let p = rank % self.ep;
        let c = (rank / self.ep) % self.cp;
        let d = rank / (self.ep * self.cp);
        (d, c, p)
    }

    pub fn world_size(&self) -> usize {
        self.dp * self.cp * self.ep
    }
}

/// world = dp x cp x ep with a communicator per axis. Cloning shares the communicators.
#[derive(Clone)]
pub struct Mesh {
    world: Arc<dyn Communicator>,
    dp_comm: Arc<dyn Communicator>,
    cp_comm: Arc<dyn Communicator>,
    ep_comm: Arc<dyn Communicator>,
    replicas_comm: Arc<dyn Communicator>,
    shape: MeshShape,
    ep_overlap: Option<Overlap>,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("world", &self.world.name())
            .field("rank", &self.world.rank())
            .field("shape", &self.shape)
            .finish()
    }
}

impl Mesh {
    /// A dp x ep mesh (cp = 1): [`Mesh::with_shape`] with `cp: 1`.
    pub fn new(
        world: Box<dyn Communicator>,
        dp: usize,
        ep: usize,
        num_experts: usize,
    ) -> Result<Mesh> {
        Mesh::with_shape(world, MeshShape { dp, cp: 1, ep }, num_experts)
    }

    /// Validates the layout, then splits `world` (a collective: every rank calls it with
    /// the same arguments). `num_experts`: routed FFN experts per MoE layer (ep must divide
    /// it).
    pub fn with_shape(
        world: Box<dyn Communicator>,
        shape: MeshShape,
        num_experts: usize,
    ) -> Result<Mesh> {
        let MeshShape { dp, cp, ep } = shape;
        for (axis, size) in [("dp", dp), ("cp", cp), ("ep", ep)] {
            if size == 0 {
                return Err(ParallelError::ZeroAxis { axis });
            }
        }
        if shape.world_size() != world.size() {
            return Err(ParallelError::WorldSize {
                dp,
                cp,
                ep,
                product: shape.world_size(),
                world: world.size(),
                world_name: world.name().to_string(),
            });
        }
        check_ep(num_experts, ep)?;
        let (d, c, p) = shape.coords(world.rank());
        let split = |color: usize, key: usize, axis: &str| {
            world
                .split(color as u32, key as i32)
                .map(Arc::from)
                .map_err(ParallelError::comm(format!(
                    "mesh: split of the {axis} axis"
                )))
        };
        // Every rank runs the same four splits in the same order (they are collectives).
        let ep_comm = split(d * cp + c, p, "ep")?;
        let cp_comm = split(d * ep + p, c, "cp")?;
        let dp_comm = split(c * ep + p, d, "dp")?;
        let replicas_comm = split(p, d * cp + c, "dp x cp (expert replicas)")?;
        Ok(Mesh {
            world: Arc::from(world),
            dp_comm,
            cp_comm,
            ep_comm,
            replicas_comm,
            shape,
            ep_overlap: None,
        })
    }

    /// Runs the expert-parallel exchange as the pipelined block with this chunking
    /// (`parallel.ep_overlap`); without it the dispatcher takes its unchunked three-step
    /// reference path.
    pub fn with_ep_overlap(mut self, overlap: Overlap) -> Mesh {
        self.ep_overlap = Some(overlap);
        self
    }

    pub fn ep_overlap(&self) -> Option<Overlap> {
        self.ep_overlap
    }

    pub fn world(&self) -> &Arc<dyn Communicator> {
        &self.world
    }
    /// The data-parallel replicas (same c and p); size `dp`.
    pub fn dp_comm(&self) -> &Arc<dyn Communicator> {
        &self.dp_comm
    }
    /// Ranks holding the shards of the same sequences (same d and p); size `cp`, ordered by
    /// `c` (rank `c` holds sequence shard `c`).
    pub fn cp_comm(&self) -> &Arc<dyn Communicator> {
        &self.cp_comm
    }
    /// Ranks exchanging tokens (same d and c); size `ep`.
    pub fn ep_comm(&self) -> &Arc<dyn Communicator> {
        &self.ep_comm
    }
    /// Ranks holding the same experts (same p: the dp x cp plane); size `dp * cp`. Expert
    /// gradients are summed over it.
    pub fn expert_replicas(&self) -> &Arc<dyn Communicator> {
        &self.replicas_comm
    }
    pub fn shape(&self) -> MeshShape {
        self.shape
    }
    pub fn dp(&self) -> usize {
        self.shape.dp
    }
    pub fn cp(&self) -> usize {
        self.shape.cp
    }
    pub fn ep(&self) -> usize {
        self.shape.ep
    }
    pub fn rank(&self) -> usize {
        self.world.rank()
    }
    pub fn dp_rank(&self) -> usize {
        self.dp_comm.rank()
    }
    pub fn cp_rank(&self) -> usize {
        self.cp_comm.rank()
    }
    pub fn ep_rank(&self) -> usize {
        self.ep_comm.rank()
    }
    /// This rank's batch shard and the number of batch shards: `(d * ep + p, dp * ep)`. The
    /// cp ranks of one batch shard hold the same rows (different sequence shards).
    pub fn batch_shard(&self) -> (usize, usize) {
        let (d, _, p) = self.shape.coords(self.rank());
        (d * self.shape.ep + p, self.shape.dp * self.shape.ep)
    }
}

/// The expert placement of every MoE layer: a placement per model layer index
/// (`layers.{l}.moe`), and one for the layers without their own. One value, owned by the
/// [`crate::Layout`]; the dispatchers installed in the model hold their layer's copy, which
/// [`crate::migrate()`] and [`crate::relayout`] replace together with the experts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertPlacement {
    default: Arc<Placement>,
    layers: BTreeMap<usize, Arc<Placement>>,
}

impl ExpertPlacement {
    /// Experts `[i * E/ep, (i+1) * E/ep)` on ep rank `i`, in every layer.
    pub fn contiguous(num_experts: usize, ep: usize) -> Result<ExpertPlacement> {
        Ok(ExpertPlacement::uniform(Placement::contiguous(
            num_experts,
            ep,
        )?))
    }

    /// `placement` in every layer.
    pub fn uniform(placement: Placement) -> ExpertPlacement {
        ExpertPlacement {
            default: Arc::new(placement),
            layers: BTreeMap::new(),
        }
    }

    /// Sets the placement of the MoE layer at model layer index `layer` (same number of
    /// experts and ep size as the others).
    pub fn with_layer(mut self, layer: usize, placement: Placement) -> Result<ExpertPlacement> {
        if placement.ep_size() != self.default.ep_size()
            || placement.num_experts() != self.default.num_experts()
        {
            return Err(ParallelError::Placement(format!(
                "the placement of layer {layer} is for {} experts on {} ep ranks, the others \
                 for {} experts on {} ep ranks; build every layer's placement for the mesh's \
                 layout",
                placement.num_experts(),
                placement.ep_size(),
                self.default.num_experts(),
                self.default.ep_size()
            )));
        }
        self.layers.insert(layer, Arc::new(placement));
        Ok(self)
    }

    /// [`ExpertPlacement::with_layer`] for every entry (model layer index -> placement).
    pub fn with_layers(
        mut self,
        placements: impl IntoIterator<Item = (usize, Placement)>,
    ) -> Result<ExpertPlacement> {
        for (layer, placement) in placements {
            self = self.with_layer(layer, placement)?;
        }
        Ok(self)
    }

    /// The placement of the MoE layer at model layer index `layer`.
    pub fn of(&self, layer: usize) -> &Arc<Placement> {
        self.layers.get(&layer).unwrap_or(&self.default)
    }

    /// Routed experts per MoE layer.
    pub fn num_experts(&self) -> usize {
        self.default.num_experts()
    }

    pub fn ep(&self) -> usize {
        self.default.ep_size()
    }
}
