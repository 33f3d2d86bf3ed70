//! Load-aware expert placement during training (the `placement:` node).
//!
//! Every step, each rank counts its own tokens' routing (`BatchCounts` from the last
//! micro-batch's `MoeStats`); the counts are summed over the world (every rank routes
//! different tokens) and blended into the moving average (`RoutingStats`, `stats_decay`),
//! identical on every rank. Rank 0 logs the load max/mean and cross-rank traffic of the
//! current placement under those statistics.
//!
//! At `step % rebalance_every == 0`, rank 0 plans with the configured strategy and
//! broadcasts the owner vectors (the ILP has a wall-clock limit, so planning on every rank
//! could give different answers); every rank then migrates (`parallel::migrate`: weights and
//! AdamW state of every moved expert go to the new owner inside each ep group). A plan that
//! fails on rank 0 is broadcast as "keep the placement" and logged.
//!
//! The per-layer placement and the statistics are saved in the checkpoint's trainer state:
//! a resumed run with the same ep size continues with them; another ep size falls back to
//! contiguous (logged).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use switchyard_comm::{Buffer, ReduceOp};
use switchyard_moe::MoeStats;
use switchyard_parallel::{Mesh, Placement};
use switchyard_placement::{
    BatchCounts, Metrics, PlacementConfig, RoutingStats, Topology, evaluate, plan,
};

use crate::distributed::Distributed;
use crate::train::TrainError;

/// The per-layer placement of a run (model layer index -> owner of each expert), saved in
/// checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedPlacement {
    pub ep: usize,
    pub layers: BTreeMap<usize, Vec<usize>>,
}

impl SavedPlacement {
    /// The placement every MoE layer of `mesh` has now.
    pub fn of(mesh: &Mesh, moe_layers: &[usize]) -> SavedPlacement {
        SavedPlacement {
            ep: mesh.ep(),
            layers: moe_layers
                .iter()
                .map(|&l| (l, mesh.placement_of(l).owners().to_vec()))
                .collect(),
        }
    }

    pub fn placements(&self) -> Result<BTreeMap<usize, Placement>, TrainError> {
        self.layers
            .iter()
            .map(|(&l, owners)| {
                Placement::from_owners(owners.clone(), self.ep)
                    .map(|p| (l, p))
                    .map_err(|e| TrainError::Comm(format!("placement of layer {l}: {e}")))
            })
            .collect()
    }
}

/// The routing statistics and the planner settings of a run.
pub struct Rebalancer {
    pub cfg: PlacementConfig,
    pub stats: RoutingStats,
}

fn placement_err(
    what: &str,
) -> impl FnOnce(switchyard_placement::PlacementError) -> TrainError + '_ {
    move |e| TrainError::Comm(format!("{what}: {e}"))
}

/// What rank 0 planned, for the log line.
pub struct Planned {
    pub owners: Vec<Vec<usize>>,
    pub before: Metrics,
    pub after: Metrics,
    pub seconds: f64,
}

impl Rebalancer {
    pub fn new(cfg: &PlacementConfig) -> Result<Rebalancer, TrainError> {
        Ok(Rebalancer {
            cfg: cfg.clone(),
            stats: RoutingStats::new(cfg.stats_decay).map_err(placement_err("placement"))?,
        })
    }

    /// Records one step's routing, summed over the world when distributed (a collective).
    pub fn record(
        &mut self,
        moe_stats: &[(usize, MoeStats)],
        dist: Option<&Distributed>,
    ) -> Result<(), TrainError> {
        let mut counts =
            BatchCounts::from_moe_stats(moe_stats).map_err(placement_err("routing counts"))?;
        if let Some(d) = dist {
            let mut buf = Buffer::F64(counts.as_flat());
            d.mesh
                .world()
                .all_reduce(&mut buf, ReduceOp::Sum)
                .map_err(|e| TrainError::Comm(format!("routing counts all-reduce: {e}")))?;
            let flat = buf
                .into_vec::<f64>()
                .expect("an all-reduce of f64 returns f64");
            counts
                .set_flat(&flat)
                .map_err(placement_err("routing counts"))?;
        }
        self.stats
            .record(&counts)
            .map_err(placement_err("routing statistics"))
    }

    fn current_owners(&self, mesh: &Mesh) -> Vec<Vec<usize>> {
        self.stats
            .moe_layers
            .iter()
            .map(|&l| mesh.placement_of(l).owners().to_vec())
            .collect()
    }

    /// Load max/mean per layer and cross-rank traffic of the mesh's current placement under
    /// the statistics (empty before the first record or with one ep rank).
    pub fn scalars(&self, mesh: &Mesh) -> Vec<(String, f64)> {
        if self.stats.records == 0 || mesh.ep() < 2 {
            return Vec::new();
        }
        let Ok(instance) = self.stats.instance(Topology::uniform(mesh.ep())) else {
            return Vec::new();
        };
        let m = evaluate(&instance, &self.current_owners(mesh));
        let mut out: Vec<(String, f64)> = self
            .stats
            .moe_layers
            .iter()
            .zip(&m.load_max_over_mean)
            .map(|(l, v)| (format!("placement/layer{l}/load_max_over_mean"), *v))
            .collect();
        out.push((
            "placement/cross_rank_fraction".into(),
            m.cross_rank_fraction,
        ));
        out.push((
            "placement/mean_boundary_traffic".into(),
            m.mean_boundary_traffic,
        ));
        out
    }

    /// Rank 0's plan for `mesh.ep()` ranks from the statistics.
    pub fn plan(&self, mesh: &Mesh) -> Result<Planned, TrainError> {
        let instance = self
            .stats
            .instance(Topology::uniform(mesh.ep()))
            .map_err(placement_err("placement instance"))?;
        let before = evaluate(&instance, &self.current_owners(mesh));
        let planned = plan(&instance, &self.cfg.strategy).map_err(placement_err("planning"))?;
        Ok(Planned {
            owners: planned.owners,
            before,
            after: planned.metrics,
            seconds: planned.report.seconds,
        })
    }
}
