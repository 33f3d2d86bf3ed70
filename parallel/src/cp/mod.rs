//! Context parallelism: each rank of the cp axis holds one shard of every sequence, and
//! attention runs over the whole sequence by moving blocks around the ring.
//!
//! - [`SeqLayout`]: which tokens a cp rank holds. `Zigzag` (the default) cuts the sequence
//!   into `2W` chunks and gives rank `r` chunks `r` and `2W-1-r`, so under a causal mask
//!   every rank does the same work; `Contiguous` gives rank `r` the `r`-th of `W` blocks
//!   (balanced only without a mask). [`shard_sequence`] applies it to a `[B, S]` batch.
//! - [`context_attention`]: the attention of the local queries over the whole sequence, a
//!   custom autodiff operation ([`op`]) with two algorithms ([`CpAlgorithm`]):
//!   - `Ring` ([`ring`]): key/value blocks travel around the ring (rank `r` sends to `r+1`),
//!     the next block's transfer overlapping the current block's compute; the backward
//!     pass sends the key/value blocks around again with their gradient accumulators one
//!     step behind, and the accumulators arrive at their owners after `W` steps.
//!   - `TokenRing` ([`token_ring`]): key/value blocks stay; query blocks travel the other
//!     way (to `r-1`), and each partial output goes straight back to its query's owner, so
//!     both directions of the links carry data. Backward (designed here; the reference
//!     code has none): the queries travel again with their output gradients and
//!     log-sum-exps, each rank adds the key/value gradients of its own block locally, and
//!     the query-gradient partials go straight back to their owners.
//! - Partial results are merged with the log-sum-exp rule in fp32 ([`tile`]), in a fixed
//!   order, so the result does not depend on timing.
//! - [`CpAttention`]: the `AttentionImpl` that `parallelize` puts into the model when
//!   cp > 1; it also tells the model the global positions of its tokens (RoPE).
//!
//! Shape legend: B batch, H heads, N local sequence length (`S / W`), Dh head dim,
//! S global sequence length, W cp ranks.

pub mod op;
pub mod ring;
pub mod saved;
pub mod tile;
pub mod token_ring;
pub mod transfer;

use std::fmt;
use std::sync::Arc;

use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use switchyard_comm::Communicator;
use switchyard_moe::AttentionImpl;

use crate::error::{ParallelError, Result};
use crate::mesh::Mesh;

pub use op::context_attention;

/// How key/value and query blocks move (`cp.algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpAlgorithm {
    /// Ring attention: key/value blocks travel.
    #[default]
    Ring,
    /// TokenRing: query blocks travel, partial outputs return to their owners.
    TokenRing,
}

/// The `cp:` config node. The cp size itself is a mesh axis ([`crate::MeshShape`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpConfig {
    #[serde(default)]
    pub algorithm: CpAlgorithm,
}

/// Which chunks of the sequence each cp rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// `2W` chunks; rank `r` holds chunks `r` and `2W-1-r` (causal load balance).
    Zigzag,
    /// `W` blocks; rank `r` holds block `r`.
    Contiguous,
}

/// The sequence layout over `ranks` cp ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqLayout {
    pub ranks: usize,
    pub sharding: Sharding,
}

impl SeqLayout {
    pub fn zigzag(ranks: usize) -> SeqLayout {
        SeqLayout {
            ranks,
            sharding: Sharding::Zigzag,
        }
    }

    fn chunks(&self) -> usize {
        match self.sharding {
            Sharding::Zigzag => 2 * self.ranks,
            Sharding::Contiguous => self.ranks,
        }
    }

    /// Checks that a sequence of `seq_len` tokens splits into this layout's equal chunks.
    pub fn check_len(&self, seq_len: usize) -> Result<()> {
        let chunks = self.chunks();
        if self.ranks == 0 || seq_len == 0 || !seq_len.is_multiple_of(chunks) {
            return Err(ParallelError::Shape {
                what: format!("context parallelism over {} ranks", self.ranks),
                detail: format!(
                    "a sequence of {seq_len} tokens does not split into {chunks} equal \
                     non-empty chunks ({:?} sharding); choose a sequence length that is a \
                     multiple of {chunks}",
                    self.sharding
                ),
            });
        }
        Ok(())
    }

    /// Global positions of the `local_len` tokens held by `rank`, ascending.
    pub fn positions(&self, rank: usize, local_len: usize) -> Vec<usize> {
        match self.sharding {
            Sharding::Contiguous => (rank * local_len..(rank + 1) * local_len).collect(),
            Sharding::Zigzag => {
                let c = local_len / 2;
                let last = 2 * self.ranks - 1 - rank;
                (rank * c..(rank + 1) * c)
                    .chain(last * c..(last + 1) * c)
                    .collect()
            }
        }
    }
}

/// The shard of `rank` of a `[B, S]` batch (token ids or targets) -> `[B, S / W]`: the
/// columns at [`SeqLayout::positions`]. Inputs and targets are sharded alike, so each
/// token keeps its next-token target.
pub fn shard_sequence(
    tokens_bs: Tensor<2, Int>,
    layout: &SeqLayout,
    rank: usize,
) -> Result<Tensor<2, Int>> {
    let [_, s] = tokens_bs.dims();
    layout.check_len(s)?;
    let local = s / layout.ranks;
    let positions: Vec<i64> = layout
        .positions(rank, local)
        .into_iter()
        .map(|p| p as i64)
        .collect();
    let index =
        Tensor::<1, Int>::from_data(TensorData::new(positions, [local]), &tokens_bs.device());
    Ok(tokens_bs.select(1, index))
}

/// Context-parallel attention over a cp communicator: the model's `AttentionImpl` when
/// cp > 1. Causal by default (the model's attention).
#[derive(Clone)]
pub struct CpAttention {
    pub(crate) comm: Arc<dyn Communicator>,
    pub(crate) layout: SeqLayout,
    pub(crate) algorithm: CpAlgorithm,
    pub(crate) causal: bool,
}

impl fmt::Debug for CpAttention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpAttention")
            .field("comm", &self.comm.name())
            .field("rank", &self.comm.rank())
            .field("layout", &self.layout)
            .field("algorithm", &self.algorithm)
            .field("causal", &self.causal)
            .finish()
    }
}

impl CpAttention {
    /// Causal attention over `comm` (one rank per sequence shard, in shard order).
    pub fn new(comm: Arc<dyn Communicator>, sharding: Sharding, algorithm: CpAlgorithm) -> Self {
        let layout = SeqLayout {
            ranks: comm.size(),
            sharding,
        };
        CpAttention {
            comm,
            layout,
            algorithm,
            causal: true,
        }
    }

    /// Zigzag-sharded causal attention over the mesh's cp axis.
    pub fn for_mesh(mesh: &Mesh, config: &CpConfig) -> Self {
        CpAttention::new(mesh.cp_comm().clone(), Sharding::Zigzag, config.algorithm)
    }

    /// Without the causal mask (every query attends every key), e.g. for encoders.
    pub fn non_causal(mut self) -> Self {
        self.causal = false;
        self
    }

    pub fn layout(&self) -> &SeqLayout {
        &self.layout
    }

    pub fn algorithm(&self) -> CpAlgorithm {
        self.algorithm
    }

    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }
}

impl AttentionImpl for CpAttention {
    fn positions(&self, local_len: usize) -> Vec<usize> {
        self.layout.positions(self.comm.rank(), local_len)
    }

    fn attend(&self, q_bhsd: Tensor<4>, k_bhsd: Tensor<4>, v_bhsd: Tensor<4>) -> Tensor<4> {
        // The seam has no error channel: a failed transfer unwinds to the step (`seam`).
        context_attention(q_bhsd, k_bhsd, v_bhsd, self).unwrap_or_else(crate::seam::fail)
    }
}
