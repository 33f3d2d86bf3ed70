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
//! could give different answers); every rank then migrates ([`Layout::migrate`]: weights and
//! AdamW state of every moved expert go to the new owner inside each ep group). A plan that
//! fails on rank 0 is broadcast as "keep the placement" and logged.
//!
//! The per-layer placement and the statistics are saved in the checkpoint's trainer state
//! (`placement`, `routing`): a resumed run with the same ep size continues with them
//! ([`Rebalancer::restore_placement`]); another ep size falls back to contiguous (logged).

use std::collections::BTreeMap;

use burn::module::Param;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use switchyard_moe::experts::SwiGlu;
use switchyard_moe::{MoeStats, Transformer};
use switchyard_parallel::{ExpertMove, ExpertPlacement, Layout, Placement};
use switchyard_placement::{
    BatchCounts, Metrics, PlacementConfig, RoutingStats, Topology, evaluate, plan,
};

use crate::checkpoint::{Checkpointed, Snapshot};
use crate::error::TrainError;
use crate::optim::{AdamMigration, NamedAdamW};

/// The per-layer placement of a run (model layer index -> owner of each expert), saved in
/// checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedPlacement {
    pub ep: usize,
    pub layers: BTreeMap<usize, Vec<usize>>,
}

impl SavedPlacement {
    /// The placement every one of `moe_layers` has now.
    pub fn of(placement: &ExpertPlacement, moe_layers: &[usize]) -> SavedPlacement {
        SavedPlacement {
            ep: placement.ep(),
            layers: moe_layers
                .iter()
                .map(|&l| (l, placement.of(l).owners().to_vec()))
                .collect(),
        }
    }

    pub fn placements(&self) -> Result<BTreeMap<usize, Placement>, TrainError> {
        self.layers
            .iter()
            .map(|(&l, owners)| {
                Placement::from_owners(owners.clone(), self.ep)
                    .map(|p| (l, p))
                    .map_err(|e| TrainError::Placement(format!("layer {l}: {e}")))
            })
            .collect()
    }
}

/// The routing statistics and the planner settings of a run, and the placement changes
/// made from them (live migration, and the placement a checkpoint was saved with).
pub struct Rebalancer {
    pub cfg: PlacementConfig,
    pub stats: RoutingStats,
}

fn placement_err(
    what: &str,
) -> impl FnOnce(switchyard_placement::PlacementError) -> TrainError + '_ {
    move |e| TrainError::Placement(format!("{what}: {e}"))
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
        layout: Option<&Layout>,
    ) -> Result<(), TrainError> {
        let mut counts =
            BatchCounts::from_moe_stats(moe_stats).map_err(placement_err("routing counts"))?;
        if let Some(layout) = layout {
            let flat = layout.sum(counts.as_flat(), "routing counts all-reduce")?;
            counts
                .set_flat(&flat)
                .map_err(placement_err("routing counts"))?;
        }
        self.stats
            .record(&counts)
            .map_err(placement_err("routing statistics"))
    }

    fn current_owners(&self, placement: &ExpertPlacement) -> Vec<Vec<usize>> {
        self.stats
            .moe_layers
            .iter()
            .map(|&l| placement.of(l).owners().to_vec())
            .collect()
    }

    /// Load max/mean per layer and cross-rank traffic of the current placement under the
    /// statistics (empty before the first record or with one ep rank).
    pub fn scalars(&self, placement: &ExpertPlacement) -> Vec<(String, f64)> {
        if self.stats.records == 0 || placement.ep() < 2 {
            return Vec::new();
        }
        let Ok(instance) = self.stats.instance(Topology::uniform(placement.ep())) else {
            return Vec::new();
        };
        let m = evaluate(&instance, &self.current_owners(placement));
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

    /// Rank 0's plan for the placement's ep ranks from the statistics.
    pub fn plan(&self, placement: &ExpertPlacement) -> Result<Planned, TrainError> {
        let instance = self
            .stats
            .instance(Topology::uniform(placement.ep()))
            .map_err(placement_err("placement instance"))?;
        let before = evaluate(&instance, &self.current_owners(placement));
        let planned = plan(&instance, &self.cfg.strategy).map_err(placement_err("planning"))?;
        Ok(Planned {
            owners: planned.owners,
            before,
            after: planned.metrics,
            seconds: planned.report.seconds,
        })
    }

    /// Re-plans the placement and migrates the experts (a collective: every rank calls it
    /// at the same step boundary). Rank 0 plans and broadcasts the owners. Returns the log
    /// line (rank 0) or `None` when nothing was planned (one ep rank, no statistics yet).
    pub fn rebalance(&self, step: u64, run: ModelState<'_>) -> Result<Option<String>, TrainError> {
        let layers = self.stats.moe_layers.clone();
        let experts = self.stats.num_experts;
        if run.layout.ep() < 2 || layers.is_empty() {
            return Ok(None);
        }
        let (mut flat, mut line) = (vec![0i64; layers.len() * experts], None);
        if run.layout.rank() == 0 {
            match self.plan(run.layout.placement()) {
                Ok(p) => {
                    flat = p.owners.iter().flatten().map(|&o| o as i64).collect();
                    line = Some(format!(
                        "placement: step {step}, {} plan in {:.3} s: predicted load max/mean \
                         {:.3} -> {:.3}, cross-rank transitions {:.3} -> {:.3}",
                        self.cfg.strategy.name(),
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
        let flat = run
            .layout
            .broadcast_i64s(flat, "placement: broadcast of the plan")?;
        if flat.iter().any(|&o| o < 0) {
            return Ok(None);
        }
        let owners: Vec<Vec<usize>> = flat
            .chunks(experts)
            .map(|o| o.iter().map(|&x| x as usize).collect())
            .collect();
        let moves = set_placement(run, &layers, &owners)?;
        Ok(line.map(|l| format!("{l}; {}", describe_moves(&moves))))
    }

    /// Lays the experts out as the checkpoint's run had them (before its weights are read
    /// by key): same ep size -> the saved per-layer placement; another ep size (or a
    /// single-process checkpoint) -> contiguous, which `parallelize` already set. The
    /// optimizer is rebuilt for the parameters now held.
    pub fn restore_placement(
        saved: Option<&SavedPlacement>,
        run: ModelState<'_>,
        fresh_expert: impl Fn() -> SwiGlu,
        optim: impl FnOnce(&Transformer) -> NamedAdamW,
    ) -> Result<(), TrainError> {
        let Some(saved) = saved else {
            return Ok(());
        };
        if saved.ep != run.layout.ep() {
            tracing::info!(
                saved_ep = saved.ep,
                ep = run.layout.ep(),
                "the checkpoint's expert placement was for another ep size: using the \
                 contiguous placement"
            );
            return Ok(());
        }
        let new = saved.placements()?;
        *run.model = run.layout.relayout(run.model.clone(), new, fresh_expert)?;
        // The decay set and held parameters cover those at construction; rebuild them.
        *run.optim = optim(run.model);
        Ok(())
    }
}

/// What a placement change touches: the model's experts, the layout's placement and the
/// optimizer's state of the moved experts.
pub struct ModelState<'a> {
    pub model: &'a mut Transformer,
    pub layout: &'a mut Layout,
    pub optim: &'a mut NamedAdamW,
    /// The device of the model's parameters (received experts are built on it).
    pub device: &'a Device,
}

/// Moves every MoE layer's experts to `owners[i]` (the ep rank of each expert of the i-th
/// of `moe_layers`), weights and optimizer state (a collective: every rank calls it with the
/// same owners at the same step boundary). Returns what moved.
pub fn set_placement(
    run: ModelState<'_>,
    moe_layers: &[usize],
    owners: &[Vec<usize>],
) -> Result<Vec<ExpertMove>, TrainError> {
    if owners.len() != moe_layers.len() {
        return Err(TrainError::Placement(format!(
            "{} owner vectors for {} MoE layers",
            owners.len(),
            moe_layers.len()
        )));
    }
    let ep = run.layout.ep();
    let new: BTreeMap<usize, Placement> = moe_layers
        .iter()
        .zip(owners)
        .map(|(&l, owners)| Placement::from_owners(owners.clone(), ep).map(|p| (l, p)))
        .collect::<Result<_, _>>()?;
    let mut state = AdamMigration { optim: run.optim };
    let (model, moves) = run
        .layout
        .migrate(run.model.clone(), new, &mut state, run.device)?;
    *run.model = model;
    Ok(moves)
}

/// `moved N experts (expert:from->to ep rank) layer L [e:a->b ...], ...`
fn describe_moves(moves: &[ExpertMove]) -> String {
    let mut per_layer: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for m in moves {
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
        "moved {} experts (expert:from->to ep rank) {}",
        moves.len(),
        if detail.is_empty() {
            "(none)".to_string()
        } else {
            detail.join(", ")
        }
    )
}

/// The routing statistics in the trainer state's `routing` field (absent before the first
/// record).
impl Checkpointed for Rebalancer {
    fn save(&self, snapshot: &mut Snapshot) {
        if self.stats.records > 0 {
            snapshot.put("routing", &self.stats);
        }
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        if let Some(stats) = snapshot.get::<RoutingStats>("routing")? {
            self.stats = stats;
        }
        Ok(())
    }
}

/// A placeholder expert of the model's shape (zeros), to be overwritten by a restore.
pub fn zero_expert(d_model: usize, ffn_dim: usize, device: &Device) -> SwiGlu {
    let zeros = |shape: [usize; 2]| Param::from_tensor(Tensor::<2>::zeros(shape, device));
    SwiGlu {
        w_gate: zeros([d_model, ffn_dim]),
        w_up: zeros([d_model, ffn_dim]),
        w_down: zeros([ffn_dim, d_model]),
    }
}
