//! The `placement:` config node.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Issues found by `validate`: (key path relative to the node, message with a hint).
pub type ConfigIssues = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementConfig {
    /// How experts are assigned to ep ranks.
    #[serde(default)]
    pub strategy: Strategy,
    /// Optimizer steps between re-plans (with expert migration); 0 = keep the initial
    /// placement for the whole run.
    #[serde(default)]
    pub rebalance_every: u64,
    /// Moving-average decay of the routing statistics per recorded step, in [0, 1): the
    /// statistics weigh the last ~1/(1 - decay) steps.
    #[serde(default = "default_stats_decay")]
    pub stats_decay: f64,
    /// A plan written by `switchyard plan-placement --out` (one strategy): every MoE layer
    /// starts with its owners instead of contiguous blocks. Relative to the config file.
    #[serde(default)]
    pub plan: Option<PathBuf>,
    /// When a re-plan is worth its migration (`rebalance_every`).
    #[serde(default)]
    pub migration: MigrationConfig,
}

/// The migration threshold: a re-plan migrates only when the predicted time it saves per
/// step pays back the predicted time of moving the experts within `payback_steps` steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// Migrate when cost / gain per step <= this many steps; 0 = migrate whenever the plan
    /// moves an expert (no threshold).
    #[serde(default = "default_payback_steps")]
    pub payback_steps: u64,
    /// Bandwidth of the fastest link between ep ranks, GB/s (1e9 bytes): prices the
    /// migrated bytes and the all-to-all.
    #[serde(default = "default_link_gb_per_s")]
    pub link_gb_per_s: f64,
    /// Expert GEMM throughput of one rank, TFLOP/s: prices the busiest rank's expert
    /// compute.
    #[serde(default = "default_rank_tflop_per_s")]
    pub rank_tflop_per_s: f64,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            payback_steps: default_payback_steps(),
            link_gb_per_s: default_link_gb_per_s(),
            rank_tflop_per_s: default_rank_tflop_per_s(),
        }
    }
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            rebalance_every: 0,
            stats_decay: default_stats_decay(),
            plan: None,
            migration: MigrationConfig::default(),
        }
    }
}

/// The placement strategy (`type: ...`).
/// The field-less variants are empty struct variants: serde lets a unit variant of an
/// internally tagged enum ignore unknown keys, `deny_unknown_fields` notwithstanding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Strategy {
    /// Experts `[i * E/ep, (i+1) * E/ep)` on ep rank `i`, in every layer.
    Contiguous {},
    /// Longest-processing-time assignment plus pairwise-swap refinement per layer, then
    /// each layer's groups mapped to ranks to keep consecutive experts together.
    Heuristic {},
    /// MoETuner's two stages as ILPs, started from (and falling back to) the heuristic.
    Ilp {
        /// Wall-clock budget of both stages together, seconds.
        #[serde(default = "default_time_limit_s")]
        time_limit_s: f64,
        /// Relative gap at which a solve may stop (0 = prove optimality). Default 0.01:
        /// 64 experts x 8 ranks x 4 layers is then proven in ~0.2 s, the exact optimum
        /// takes ~3 s (MoETuner ran Gurobi to 0.025).
        #[serde(default = "default_mip_gap")]
        mip_gap: f64,
        #[serde(default)]
        solver: IlpSolver,
    },
}

/// The MILP solver behind `good_lp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IlpSolver {
    /// Pure Rust, always available.
    #[default]
    Microlp,
    /// HiGHS (C++), with the crate feature `highs`.
    Highs,
}

impl IlpSolver {
    pub fn name(self) -> &'static str {
        match self {
            IlpSolver::Microlp => "microlp",
            IlpSolver::Highs => "highs",
        }
    }

    pub fn available(self) -> bool {
        match self {
            IlpSolver::Microlp => true,
            IlpSolver::Highs => cfg!(feature = "highs"),
        }
    }
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy::Contiguous {}
    }
}

impl Strategy {
    /// The ILP with the default time limit and solver.
    pub fn ilp() -> Strategy {
        Strategy::Ilp {
            time_limit_s: default_time_limit_s(),
            mip_gap: default_mip_gap(),
            solver: IlpSolver::default(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Contiguous {} => "contiguous",
            Strategy::Heuristic {} => "heuristic",
            Strategy::Ilp { .. } => "ilp",
        }
    }
}

impl PlacementConfig {
    pub fn validate(&self) -> ConfigIssues {
        let mut issues = ConfigIssues::new();
        if !(0.0..1.0).contains(&self.stats_decay) {
            issues.push((
                "stats_decay".into(),
                format!(
                    "must be in [0, 1), got {}; 0.99 averages over ~100 steps",
                    self.stats_decay
                ),
            ));
        }
        if self.rebalance_every > 0 && self.strategy == (Strategy::Contiguous {}) {
            issues.push((
                "rebalance_every".into(),
                "a contiguous placement never changes; set strategy.type: heuristic or ilp, or rebalance_every: 0".into(),
            ));
        }
        let m = &self.migration;
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(m.link_gb_per_s) {
            issues.push((
                "migration.link_gb_per_s".into(),
                format!(
                    "must be a positive number of GB/s, got {}; 12.5 is a 100 Gbit/s link",
                    m.link_gb_per_s
                ),
            ));
        }
        if !positive(m.rank_tflop_per_s) {
            issues.push((
                "migration.rank_tflop_per_s".into(),
                format!(
                    "must be a positive number of TFLOP/s, got {}; 0.03 is a CPU core's \
                     expert GEMMs",
                    m.rank_tflop_per_s
                ),
            ));
        }
        if let Strategy::Ilp {
            time_limit_s,
            mip_gap,
            solver,
        } = self.strategy
        {
            if !(0.0..1.0).contains(&mip_gap) {
                issues.push((
                    "strategy.mip_gap".into(),
                    format!("must be in [0, 1), got {mip_gap}; 0 proves optimality"),
                ));
            }
            if !(time_limit_s.is_finite() && (0.0..=MAX_TIME_LIMIT_S).contains(&time_limit_s)) {
                issues.push((
                    "strategy.time_limit_s".into(),
                    format!(
                        "must be in [0, {MAX_TIME_LIMIT_S}] seconds (a week at most), got \
                         {time_limit_s}"
                    ),
                ));
            }
            if !solver.available() {
                issues.push((
                    "strategy.solver".into(),
                    format!(
                        "`{}` is not compiled in; rebuild with `--features switchyard-placement/{}` or use `microlp`",
                        solver.name(),
                        solver.name()
                    ),
                ));
            }
        }
        issues
    }
}

fn default_stats_decay() -> f64 {
    0.99
}

/// About the horizon of the default statistics (decay 0.99 weighs ~100 steps): a plan
/// that needs longer to pay back may be stale before it does.
fn default_payback_steps() -> u64 {
    100
}

/// A 100 Gbit/s link.
fn default_link_gb_per_s() -> f64 {
    12.5
}

/// One CPU core's grouped expert GEMMs, forward and backward, as `placement-bench`
/// measured them (26-35 GFLOP/s; docs/benchmarks.md).
fn default_rank_tflop_per_s() -> f64 {
    0.03
}

/// The longest ILP budget a config may set, seconds (a week; the comm timeouts' bound).
pub const MAX_TIME_LIMIT_S: f64 = 604_800.0;

fn default_time_limit_s() -> f64 {
    1.0
}

fn default_mip_gap() -> f64 {
    0.01
}
