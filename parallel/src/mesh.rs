//! The device mesh: world = dp x ep, one sub-communicator per axis, and the expert
//! placement. Built once at launch and passed down as a value (no global state).
//!
//! Layout: world rank `r = d * ep + p`. The **ep axis** (`p`, consecutive ranks) groups the
//! ranks whose experts together make up the full expert set: tokens are exchanged inside
//! it. The **dp axis** (`d`) groups the ranks holding the same experts (the replicas of
//! an expert). Every world rank holds its own share of the global batch.

use std::fmt;
use std::sync::Arc;

use switchyard_comm::Communicator;

use crate::error::{ParallelError, Result};

/// Which ep rank owns each routed FFN expert. An input, so it can later change at run time
/// (e.g. from an ILP placement); the default is contiguous blocks.
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

/// world = dp x ep with a communicator per axis. Cloning shares the communicators.
#[derive(Clone)]
pub struct Mesh {
    world: Arc<dyn Communicator>,
    dp_comm: Arc<dyn Communicator>,
    ep_comm: Arc<dyn Communicator>,
    dp: usize,
    ep: usize,
    placement: Arc<Placement>,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("world", &self.world.name())
            .field("rank", &self.world.rank())
            .field("dp", &self.dp)
            .field("ep", &self.ep)
            .field("placement", &self.placement)
            .finish()
    }
}

impl Mesh {
    /// Validates the layout, then splits `world` (a collective: every rank calls it with
    /// the same arguments). `num_experts`: routed FFN experts per MoE layer.
    pub fn new(
        world: Box<dyn Communicator>,
        dp: usize,
        ep: usize,
        num_experts: usize,
    ) -> Result<Mesh> {
        if dp == 0 {
            return Err(ParallelError::ZeroAxis { axis: "dp" });
        }
        if ep == 0 {
            return Err(ParallelError::ZeroAxis { axis: "ep" });
        }
        if dp * ep != world.size() {
            return Err(ParallelError::WorldSize {
                dp,
                ep,
                product: dp * ep,
                world: world.size(),
                world_name: world.name().to_string(),
            });
        }
        check_ep(num_experts, ep)?;
        let placement = Placement::contiguous(num_experts, ep)?;
        let rank = world.rank();
        let (d, p) = (rank / ep, rank % ep);
        let ep_comm = world
            .split(d as u32, p as i32)
            .map_err(ParallelError::comm("mesh: split of the ep axis"))?;
        let dp_comm = world
            .split(p as u32, d as i32)
            .map_err(ParallelError::comm("mesh: split of the dp axis"))?;
        Ok(Mesh {
            world: Arc::from(world),
            dp_comm: Arc::from(dp_comm),
            ep_comm: Arc::from(ep_comm),
            dp,
            ep,
            placement: Arc::new(placement),
        })
    }

    /// Replaces the expert placement (same number of experts and ep size).
    pub fn with_placement(mut self, placement: Placement) -> Result<Mesh> {
        if placement.ep_size() != self.ep || placement.num_experts() != self.placement.num_experts()
        {
            return Err(ParallelError::Placement(format!(
                "the placement is for {} experts on {} ep ranks, the mesh has {} experts on \
                 {} ep ranks; build the placement for the mesh's layout",
                placement.num_experts(),
                placement.ep_size(),
                self.placement.num_experts(),
                self.ep
            )));
        }
        self.placement = Arc::new(placement);
        Ok(self)
    }

    pub fn world(&self) -> &Arc<dyn Communicator> {
        &self.world
    }
    /// Ranks holding the same experts (replicas); size `dp`.
    pub fn dp_comm(&self) -> &Arc<dyn Communicator> {
        &self.dp_comm
    }
    /// Ranks exchanging tokens; size `ep`.
    pub fn ep_comm(&self) -> &Arc<dyn Communicator> {
        &self.ep_comm
    }
    pub fn dp(&self) -> usize {
        self.dp
    }
    pub fn ep(&self) -> usize {
        self.ep
    }
    pub fn rank(&self) -> usize {
        self.world.rank()
    }
    pub fn dp_rank(&self) -> usize {
        self.dp_comm.rank()
    }
    pub fn ep_rank(&self) -> usize {
        self.ep_comm.rank()
    }
    pub fn placement(&self) -> &Arc<Placement> {
        &self.placement
    }
}
