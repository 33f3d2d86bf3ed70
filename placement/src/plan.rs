//! The planner: one entry point for the three strategies.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Strategy;
use crate::error::Result;
use crate::evaluate::{Metrics, evaluate, mean};
use crate::heuristic::{self, Groups, group_transitions, map_groups};
use crate::ilp::{self, IlpOptions, Outcome, SolveReport, relative_gap, stage1_bound};
use crate::instance::Instance;

/// A placement and what it is predicted to cost.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub strategy: &'static str,
    /// [L][E]: the ep rank of each expert in each MoE layer; every rank holds E / N.
    pub owners: Vec<Vec<usize>>,
    pub metrics: Metrics,
    pub report: PlanReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    /// Wall time of the whole plan (heuristic and ILP included).
    pub seconds: f64,
    /// Load balancing (ILP only): the mean over layers of each layer's solve.
    pub stage1: Option<StageReport>,
    /// Groups to ranks (ILP only).
    pub stage2: Option<StageReport>,
}

/// A stage's result; objectives in the stage's normalised units (crate docs).
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub objective: f64,
    /// The heuristic's objective, where the ILP started.
    pub start_objective: f64,
    /// A proven lower bound on the stage's optimum.
    pub bound: f64,
    /// (objective - bound) / objective.
    pub gap: f64,
    pub status: StageStatus,
    pub seconds: f64,
    /// One solve per layer (stage 1) or a single solve (stage 2).
    pub solves: Vec<SolveReport>,
}

/// Summary of a stage's solves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Every solve proven optimal within the requested MIP gap (by the solver or by a
    /// bound; exactly optimal when the gap is 0).
    Proven,
    /// At least one solve stopped at the time limit with a better answer than its start.
    Improved,
    /// Not proven, and nothing better than the heuristic was found.
    HeuristicKept,
    /// A solver error: the heuristic answer stands where it happened.
    Failed,
}

impl StageReport {
    fn new(solves: Vec<SolveReport>, seconds: f64) -> StageReport {
        let objective = mean(&solves.iter().map(|s| s.objective).collect::<Vec<_>>());
        let bound = mean(&solves.iter().map(|s| s.bound).collect::<Vec<_>>());
        let proven = |s: &SolveReport| {
            matches!(
                s.outcome,
                Outcome::StartProven | Outcome::Optimal | Outcome::Exact
            )
        };
        let status = if solves
            .iter()
            .any(|s| matches!(s.outcome, Outcome::Failed(_)))
        {
            StageStatus::Failed
        } else if solves.iter().all(proven) {
            StageStatus::Proven
        } else if solves.iter().any(|s| s.outcome == Outcome::Improved) {
            StageStatus::Improved
        } else {
            StageStatus::HeuristicKept
        };
        StageReport {
            objective,
            start_objective: mean(&solves.iter().map(|s| s.start_objective).collect::<Vec<_>>()),
            bound,
            gap: relative_gap(objective, bound),
            status,
            seconds,
            solves,
        }
    }
}

/// Places every layer's experts on `instance.ranks()` ranks with `strategy`.
pub fn plan(instance: &Instance, strategy: &Strategy) -> Result<Plan> {
    if let Strategy::Ilp { solver, .. } = strategy
        && !solver.available()
    {
        return Err(crate::error::PlacementError::SolverUnavailable(
            solver.name(),
        ));
    }
    let started = Instant::now();
    let (owners, stage1, stage2) = match *strategy {
        Strategy::Contiguous {} => (
            heuristic::contiguous(instance.layers(), instance.experts(), instance.ranks()),
            None,
            None,
        ),
        Strategy::Heuristic {} => {
            let (groups, maps) = heuristic::solve(instance);
            (heuristic::owners(&groups, &maps), None, None)
        }
        Strategy::Ilp {
            time_limit_s,
            mip_gap,
            solver,
        } => {
            // Never panics: an unrepresentable budget (validation refuses them) is unbounded.
            let after = |secs: f64| {
                Duration::try_from_secs_f64(secs.max(0.0))
                    .ok()
                    .and_then(|d| started.checked_add(d))
                    .unwrap_or(started + Duration::from_secs(100 * 365 * 24 * 3600))
            };
            let deadline = after(time_limit_s);
            let stage1_deadline = after(time_limit_s / 2.0);
            let (start_groups, start_maps) = heuristic::solve(instance);

            let stage1_started = Instant::now();
            let layers = instance.layers();
            let mut groups: Groups = Vec::with_capacity(layers);
            let mut solves = Vec::with_capacity(layers);
            for (l, start) in start_groups.iter().enumerate() {
                let left = stage1_deadline.saturating_duration_since(Instant::now());
                let limit = left / (layers - l) as u32;
                let p = instance.normalized_loads(l);
                let options = IlpOptions {
                    limit,
                    mip_gap,
                    solver,
                };
                let (layer_groups, report) =
                    ilp::stage1_layer(&p, instance.ranks(), start, &options);
                groups.push(layer_groups);
                solves.push(report);
            }
            let stage1 = StageReport::new(solves, stage1_started.elapsed().as_secs_f64());

            let stage2_started = Instant::now();
            let c = group_transitions(instance, &groups);
            // Unchanged groups: start from the heuristic's own maps; otherwise map the new
            // groups the heuristic's way.
            let maps_start = if groups == start_groups {
                start_maps
            } else {
                map_groups(instance, &c)
            };
            let limit = deadline.saturating_duration_since(Instant::now());
            let options = IlpOptions {
                limit,
                mip_gap,
                solver,
            };
            let (maps, report) = ilp::stage2(instance, &c, &maps_start, &options);
            let stage2 = StageReport::new(vec![report], stage2_started.elapsed().as_secs_f64());
            (
                heuristic::owners(&groups, &maps),
                Some(stage1),
                Some(stage2),
            )
        }
    };
    instance.check_owners(&owners)?;
    let metrics = evaluate(instance, &owners);
    Ok(Plan {
        strategy: strategy.name(),
        owners,
        metrics,
        report: PlanReport {
            seconds: started.elapsed().as_secs_f64(),
            stage1,
            stage2,
        },
    })
}

/// The stage-1 lower bound of the whole instance (mean over layers), for reports on any
/// strategy.
pub fn load_bound(instance: &Instance) -> f64 {
    mean(
        &(0..instance.layers())
            .map(|l| stage1_bound(&instance.normalized_loads(l), instance.ranks()))
            .collect::<Vec<_>>(),
    )
}
