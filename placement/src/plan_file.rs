//! The plan file: what `switchyard plan-placement --out` writes and `placement.plan` reads.
//!
//! ```json
//! {"format": "switchyard-placement-plan/1", "ep": 2, "moe_layers": [0, 1],
//!  "num_experts": 4, "stats": "stats.json", "stats_source": "...",
//!  "plans": [{"strategy": "ilp", "owners": [[0, 1, 0, 1], [1, 0, 0, 1]],
//!             "metrics": {...}, "report": {...}}]}
//! ```
//! `owners[i][e]` is the ep rank of expert e in the i-th MoE layer (model layer
//! `moe_layers[i]`). Training reads a file that holds exactly one plan.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{PlacementError, Result};
use crate::evaluate::Metrics;
use crate::plan::Plan;

/// The identifier written into every plan file.
pub const PLAN_FORMAT: &str = "switchyard-placement-plan/1";

/// A plan file as written.
#[derive(Debug, Serialize)]
pub struct PlanFileOut<'a> {
    pub format: &'static str,
    pub ep: usize,
    pub moe_layers: &'a [usize],
    pub num_experts: usize,
    /// The statistics file planned from, and where it came from.
    pub stats: PathBuf,
    pub stats_source: &'a str,
    pub plans: &'a [Plan],
}

/// A plan file as read (the reports are not read back).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PlanFile {
    pub format: String,
    pub ep: usize,
    pub moe_layers: Vec<usize>,
    pub num_experts: usize,
    #[serde(default)]
    pub stats: PathBuf,
    #[serde(default)]
    pub stats_source: String,
    pub plans: Vec<SavedPlan>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SavedPlan {
    pub strategy: String,
    /// [L][E]
    pub owners: Vec<Vec<usize>>,
    pub metrics: Option<Metrics>,
}

impl<'a> PlanFileOut<'a> {
    pub fn save(&self, path: &Path) -> Result<()> {
        let error = |message: String| PlacementError::PlanFile {
            path: path.to_path_buf(),
            message,
        };
        let json = serde_json::to_string_pretty(self).map_err(|e| error(e.to_string()))?;
        std::fs::write(path, json).map_err(|e| error(format!("writing: {e}")))
    }
}

impl PlanFile {
    /// Reads a plan file; any problem with the file itself (unreadable, not JSON, another
    /// format) is a message about `path`.
    pub fn load(path: &Path) -> Result<PlanFile> {
        let error = |message: String| PlacementError::PlanFile {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(format!("reading: {e}")))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            error(format!(
                "not JSON ({e}); expected a file written by `switchyard plan-placement --out`"
            ))
        })?;
        if value.is_array() {
            return Err(error(format!(
                "a bare list of plans (plan-placement's output before format `{PLAN_FORMAT}`, \
                 without the ep size and MoE layers it was planned for); re-run `switchyard \
                 plan-placement --stats ... --ranks N --strategy NAME --out FILE`"
            )));
        }
        let format = value.get("format").and_then(|f| f.as_str()).unwrap_or("");
        if format != PLAN_FORMAT {
            return Err(error(format!(
                "format `{format}`, expected `{PLAN_FORMAT}`; write the plan with this \
                 switchyard's `plan-placement --out`"
            )));
        }
        serde_json::from_value(value).map_err(|e| error(e.to_string()))
    }

    /// The one plan a run starts from.
    pub fn single(&self) -> std::result::Result<&SavedPlan, String> {
        match self.plans.as_slice() {
            [plan] => Ok(plan),
            plans => Err(format!(
                "holds {} plans ({}); a run starts from one: write it with `switchyard \
                 plan-placement --strategy NAME --out FILE`",
                plans.len(),
                plans
                    .iter()
                    .map(|p| p.strategy.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Every way the file does not fit a run with `ep` ranks on the expert axis and MoE
    /// layers `moe_layers` (model layer indices) of `num_experts` experts each; empty when
    /// it fits. Each message names both values and what to do.
    pub fn check(&self, ep: usize, moe_layers: &[usize], num_experts: usize) -> Vec<String> {
        let mut issues = Vec::new();
        let plan = match self.single() {
            Ok(plan) => plan,
            Err(e) => return vec![e],
        };
        let replan = format!(
            "re-plan for this model and layout: `switchyard plan-placement --ranks {ep} \
             --strategy {} --out FILE` on routing statistics of this model",
            plan.strategy
        );
        if self.ep != ep {
            issues.push(format!(
                "was planned for {} ep ranks, but parallel.ep is {ep}; {replan}",
                self.ep
            ));
        }
        if self.num_experts != num_experts {
            issues.push(format!(
                "places {} experts per layer, but model.moe.num_experts is {num_experts}; \
                 {replan}",
                self.num_experts
            ));
        }
        if self.moe_layers != moe_layers {
            issues.push(format!(
                "places MoE layers {:?}, but the model's MoE layers are {moe_layers:?}; {replan}",
                self.moe_layers
            ));
        }
        if !issues.is_empty() {
            return issues;
        }
        if plan.owners.len() != moe_layers.len() {
            return vec![format!(
                "has {} owner vectors for {} MoE layers; {replan}",
                plan.owners.len(),
                moe_layers.len()
            )];
        }
        let per_rank = num_experts / ep.max(1);
        for (owners, layer) in plan.owners.iter().zip(moe_layers) {
            if owners.len() != num_experts {
                issues.push(format!(
                    "layer {layer}: {} owners for {num_experts} experts; {replan}",
                    owners.len()
                ));
                continue;
            }
            if let Some((e, &r)) = owners.iter().enumerate().find(|&(_, &r)| r >= ep) {
                issues.push(format!(
                    "layer {layer}: expert {e} is on ep rank {r}, but parallel.ep is {ep} \
                     (ranks 0..{ep}); {replan}"
                ));
                continue;
            }
            let mut count = vec![0usize; ep];
            for &r in owners {
                count[r] += 1;
            }
            if let Some(r) = count.iter().position(|&c| c != per_rank) {
                issues.push(format!(
                    "layer {layer}: ep rank {r} holds {} experts, but every rank holds \
                     num_experts / ep = {per_rank} (the memory estimate and the planner \
                     assume it); {replan}",
                    count[r]
                ));
            }
        }
        issues
    }
}
