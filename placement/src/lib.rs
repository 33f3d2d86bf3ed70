//! switchyard-placement: load-aware expert placement.
//!
//! Routing statistics recorded during training (`RoutingStats`: tokens per expert and
//! layer-to-layer transitions, a moving average) become a placement problem (`Instance`),
//! which a planner solves with one of three strategies (`Strategy`): contiguous blocks, a
//! heuristic (longest-processing-time + pairwise swaps), or MoETuner's two-stage ILP through
//! `good_lp`. The answer is, per MoE layer, an owner vector (expert -> ep rank) with the same
//! number of experts on every rank, as `switchyard_parallel::Placement::from_owners` takes.
//!
//! Units: a layer's loads are normalised so that the mean rank load is 1 (the stage-1
//! objective is max over mean); a boundary's transitions are normalised to sum to 1 and
//! divided by the relative bandwidth of the link they cross (the stage-2 objective is the
//! busiest rank's share of the boundary's transitions, in fastest-link time).

pub mod config;
pub mod error;
pub mod evaluate;
pub mod heuristic;
pub mod ilp;
pub mod instance;
pub mod migration;
pub mod plan;
pub mod plan_file;
pub mod stats;

pub use config::{IlpSolver, MigrationConfig, PlacementConfig, Strategy};
pub use error::{PlacementError, Result};
pub use evaluate::{Metrics, evaluate};
pub use instance::{Instance, Topology};
pub use migration::{ExpertCost, MigrationDecision, decide};
pub use plan::{Plan, PlanReport, StageReport, StageStatus, plan};
pub use plan_file::{PLAN_FORMAT, PlanFile, PlanFileOut, SavedPlan};
pub use stats::{BatchCounts, RoutingStats};
