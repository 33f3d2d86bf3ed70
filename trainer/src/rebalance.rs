//! Load-aware expert placement during training (the `placement:` node).
//!
//! Every step, each rank counts its own tokens' routing (`BatchCounts` from the last
//! micro-batch's `MoeStats`); the counts are summed over the world (every rank routes
//! different tokens) and blended into the moving average (`RoutingStats`, `stats_decay`),
//! identical on every rank. Rank 0 logs the load max/mean and cross-rank traffic of the
//! current placement under those statistics.
//!
//! At `step % rebalance_every == 0`, rank 0 plans with the configured strategy, weighs the
//! plan's predicted gain per step against the predicted cost of its migration
//! (`placement.migration`, [`switchyard_placement::migration`]) and broadcasts the owner
//! vectors, or "keep the placement" when the migration would not pay back within
//! `payback_steps` (the ILP has a wall-clock limit, so planning on every rank could give
//! different answers); every rank then migrates ([`Layout::migrate`]: weights and AdamW
//! state of every moved expert go to the new owner inside each ep group). A plan that
//! fails on rank 0 is broadcast as "keep the placement" and logged.
//!
//! A fresh run with `placement.plan` starts from the plan file's owners
//! ([`initial_placement`], checked against the model and the layout): each rank keeps
//! those experts of the full model every rank builds, so the weights are the contiguous
//! run's, placed differently.
//!
//! The per-layer placement and the statistics are saved in the checkpoint's trainer state
//! (`placement`, `routing`): a resumed run with the same ep size continues with them
//! ([`Rebalancer::restore_placement`]; the checkpoint's placement wins over
//! `placement.plan`); another ep size keeps the run's initial placement (the plan, or
//! contiguous; logged).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use switchyard_moe::experts::SwiGlu;
use switchyard_moe::{MoeStats, Transformer};
use switchyard_parallel::{ExpertMove, ExpertPlacement, Layout, Placement};
use switchyard_placement::{
    BatchCounts, ExpertCost, Metrics, MigrationDecision, PlacementConfig, PlanFile, RoutingStats,
    Topology, decide, evaluate, plan,
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
    /// Prices the migration threshold.
    pub expert: ExpertCost,
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
    /// Whether the migration pays back, and its numbers.
    pub decision: MigrationDecision,
}

/// What a rebalance did, on rank 0: the log line and the decision's numbers for the
/// metrics.
pub struct Rebalanced {
    pub line: String,
    pub scalars: Vec<(String, f64)>,
}

impl Rebalancer {
    pub fn new(cfg: &PlacementConfig, expert: ExpertCost) -> Result<Rebalancer, TrainError> {
        Ok(Rebalancer {
            cfg: cfg.clone(),
            stats: RoutingStats::new(cfg.stats_decay).map_err(placement_err("placement"))?,
            expert,
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
        let current = self.current_owners(placement);
        let before = evaluate(&instance, &current);
        let planned = plan(&instance, &self.cfg.strategy).map_err(placement_err("planning"))?;
        let decision = decide(
            &instance,
            (&current, &before),
            (&planned.owners, &planned.metrics),
            &self.expert,
            &self.cfg.migration,
        );
        Ok(Planned {
            owners: planned.owners,
            before,
            after: planned.metrics,
            seconds: planned.report.seconds,
            decision,
        })
    }

    /// Re-plans the placement and, when the migration pays back (`placement.migration`),
    /// migrates the experts (a collective: every rank calls it at the same step boundary).
    /// Rank 0 plans, decides and broadcasts the owners or "keep". Returns rank 0's log line
    /// and the decision's numbers, or `None` when nothing was planned (one ep rank, no
    /// statistics yet).
    pub fn rebalance(
        &self,
        step: u64,
        run: ModelState<'_>,
    ) -> Result<Option<Rebalanced>, TrainError> {
        let layers = self.stats.moe_layers.clone();
        let experts = self.stats.num_experts;
        if run.layout.ep() < 2 || layers.is_empty() {
            return Ok(None);
        }
        let (mut flat, mut done) = (vec![0i64; layers.len() * experts], None);
        if run.layout.rank() == 0 {
            match self.plan(run.layout.placement()) {
                Ok(p) => {
                    let d = &p.decision;
                    flat = if d.migrate {
                        p.owners.iter().flatten().map(|&o| o as i64).collect()
                    } else {
                        vec![-1; flat.len()]
                    };
                    let line = format!(
                        "placement: step {step}, {} plan in {:.3} s: predicted load max/mean \
                         {:.3} -> {:.3}, cross-rank transitions {:.3} -> {:.3}; {}",
                        self.cfg.strategy.name(),
                        p.seconds,
                        p.before.mean_load_max_over_mean,
                        p.after.mean_load_max_over_mean,
                        p.before.cross_rank_fraction,
                        p.after.cross_rank_fraction,
                        d.describe()
                    );
                    done = Some(Rebalanced {
                        line,
                        scalars: decision_scalars(d),
                    });
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
            // Kept (or planning failed): rank 0's line says which.
            return Ok(done.map(|mut r| {
                r.line.push_str("; the placement stays");
                r
            }));
        }
        let owners: Vec<Vec<usize>> = flat
            .chunks(experts)
            .map(|o| o.iter().map(|&x| x as usize).collect())
            .collect();
        let moves = set_placement(run, &layers, &owners)?;
        Ok(done.map(|mut r| {
            r.line = format!("{}; {}", r.line, describe_moves(&moves));
            r
        }))
    }

    /// Lays the experts out as the checkpoint's run had them (before its weights are read
    /// by key): same ep size -> the saved per-layer placement; another ep size (or a
    /// single-process checkpoint) -> contiguous, which `parallelize` already set. The
    /// optimizer is rebuilt for the parameters now held.
    /// `initial_plan` names the `placement.plan` the run was built from (`None`:
    /// contiguous), which stays when the checkpoint has none for this ep size.
    pub fn restore_placement(
        saved: Option<&SavedPlacement>,
        initial_plan: Option<&str>,
        run: ModelState<'_>,
        fresh_expert: impl Fn() -> SwiGlu,
        optim: impl FnOnce(&Transformer) -> NamedAdamW,
    ) -> Result<(), TrainError> {
        let Some(saved) = saved else {
            return Ok(());
        };
        let initial = initial_plan.unwrap_or("contiguous");
        if saved.ep != run.layout.ep() {
            tracing::info!(
                saved_ep = saved.ep,
                ep = run.layout.ep(),
                "the checkpoint's expert placement was for another ep size: using the \
                 {initial} placement"
            );
            return Ok(());
        }
        if let Some(initial) = initial_plan {
            tracing::info!(
                "resumed with the checkpoint's expert placement; the {initial} placement is \
                 only a fresh run's start"
            );
        }
        let new = saved.placements()?;
        *run.model = run.layout.relayout(run.model.clone(), new, fresh_expert)?;
        // The decay set and held parameters cover those at construction; rebuild them.
        *run.optim = optim(run.model);
        Ok(())
    }
}

/// The numbers of a rebalance decision, as metrics (`placement/...`).
fn decision_scalars(d: &MigrationDecision) -> Vec<(String, f64)> {
    let mut out = vec![
        (
            "placement/planned_moves".to_string(),
            d.moved_experts as f64,
        ),
        (
            "placement/migrated_experts".to_string(),
            if d.migrate {
                d.moved_experts as f64
            } else {
                0.0
            },
        ),
        ("placement/migration_mb".to_string(), d.moved_bytes / 1e6),
        (
            "placement/migration_cost_steps".to_string(),
            d.cost_in_steps(),
        ),
        ("placement/gain_per_step".to_string(), d.gain_fraction()),
    ];
    // JSON has no infinity: a plan that saves nothing has no payback entry.
    if let Some(p) = d.payback_steps {
        out.push(("placement/payback_steps".to_string(), p));
    }
    out
}

/// The placement a fresh run starts from: the owners of `placement.plan`, checked against
/// the model (`moe_layers`, `num_experts`) and the layout's `ep`; `None` without a plan.
pub fn initial_placement(
    cfg: &PlacementConfig,
    ep: usize,
    moe_layers: &[usize],
    num_experts: usize,
) -> Result<Option<(ExpertPlacement, String)>, TrainError> {
    let Some(path) = &cfg.plan else {
        return Ok(None);
    };
    let file = read_plan(path, ep, moe_layers, num_experts)?;
    let plan = file.single().map_err(TrainError::Placement)?;
    let placements = moe_layers
        .iter()
        .zip(&plan.owners)
        .map(|(&l, owners)| Placement::from_owners(owners.clone(), ep).map(|p| (l, p)))
        .collect::<Result<Vec<_>, _>>()?;
    let placement = ExpertPlacement::contiguous(num_experts, ep)?.with_layers(placements)?;
    let name = format!("`{}` plan of {}", plan.strategy, path.display());
    Ok(Some((placement, name)))
}

/// Reads `placement.plan` and checks it (every mismatch at once, each naming the key).
pub fn read_plan(
    path: &Path,
    ep: usize,
    moe_layers: &[usize],
    num_experts: usize,
) -> Result<PlanFile, TrainError> {
    let file =
        PlanFile::load(path).map_err(|e| TrainError::Placement(format!("placement.plan: {e}")))?;
    let issues = file.check(ep, moe_layers, num_experts);
    if !issues.is_empty() {
        return Err(TrainError::Placement(format!(
            "placement.plan {}: {}",
            path.display(),
            issues.join("; ")
        )));
    }
    Ok(file)
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
