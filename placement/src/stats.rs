//! Routing statistics: per MoE layer the tokens dispatched to each expert, and per pair of
//! consecutive MoE layers the transitions (tokens routed to expert i in layer l and to
//! expert j in layer l+1), as a moving average over training steps.
//!
//! One token with choices A in layer l and B in layer l+1 adds 1/|B| to `[a][b]` for every
//! a in A, b in B (dispatched FFN choices only): a row of the transition matrix sums to
//! the tokens of expert a that went on to at least one FFN expert.
//!
//! Under data or expert parallelism every rank sees its own tokens: sum the ranks'
//! `BatchCounts::as_flat` (an all-reduce) and record the sum, the same on every rank.

use std::path::Path;

use serde::{Deserialize, Serialize};
use switchyard_moe::MoeStats;

use crate::error::{PlacementError, Result};
use crate::instance::{Instance, Topology};

/// Counts of one step (one forward pass, or its sum over the ranks of a global batch).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchCounts {
    /// Model layer index of each MoE layer.
    pub moe_layers: Vec<usize>,
    /// [L][E]
    pub tokens: Vec<Vec<f64>>,
    /// [L-1][E][E]
    pub transitions: Vec<Vec<Vec<f64>>>,
}

impl BatchCounts {
    /// From a forward pass's `ModelOutput::moe_stats` (layer index, stats), in layer order.
    pub fn from_moe_stats(moe_stats: &[(usize, MoeStats)]) -> Result<BatchCounts> {
        let Some((_, first)) = moe_stats.first() else {
            return Err(PlacementError::Invalid(
                "the model has no MoE layer: no routing to record".into(),
            ));
        };
        let experts = first.expert_fraction.len();
        let tokens_of = |s: &MoeStats| s.dispatched_tk.len() / s.top_k.max(1);
        let t = tokens_of(first);
        for (layer, s) in moe_stats {
            if s.expert_fraction.len() != experts || tokens_of(s) != t {
                return Err(PlacementError::Invalid(format!(
                    "MoE layer {layer} has {} experts and {} tokens, the first has {experts} and {t}",
                    s.expert_fraction.len(),
                    tokens_of(s)
                )));
            }
        }
        let tokens = moe_stats
            .iter()
            .map(|(_, s)| {
                let mut count = vec![0.0; experts];
                for e in s.dispatched_tk.iter().flatten() {
                    count[*e as usize] += 1.0;
                }
                count
            })
            .collect();
        let transitions = moe_stats
            .windows(2)
            .map(|pair| {
                let (a, b) = (&pair[0].1, &pair[1].1);
                let mut matrix = vec![vec![0.0; experts]; experts];
                for token in 0..t {
                    let from = &a.dispatched_tk[token * a.top_k..(token + 1) * a.top_k];
                    let to = &b.dispatched_tk[token * b.top_k..(token + 1) * b.top_k];
                    let next = to.iter().flatten().count();
                    if next == 0 {
                        continue;
                    }
                    let weight = 1.0 / next as f64;
                    for i in from.iter().flatten() {
                        for j in to.iter().flatten() {
                            matrix[*i as usize][*j as usize] += weight;
                        }
                    }
                }
                matrix
            })
            .collect();
        Ok(BatchCounts {
            moe_layers: moe_stats.iter().map(|(l, _)| *l).collect(),
            tokens,
            transitions,
        })
    }

    /// All counts in one vector (tokens, then transitions), to sum over ranks.
    pub fn as_flat(&self) -> Vec<f64> {
        self.tokens
            .iter()
            .flatten()
            .chain(self.transitions.iter().flatten().flatten())
            .copied()
            .collect()
    }

    /// Replaces the counts by `flat` (the layout of `as_flat`, e.g. its all-reduced sum).
    pub fn set_flat(&mut self, flat: &[f64]) -> Result<()> {
        let expected = self.as_flat().len();
        if flat.len() != expected {
            return Err(PlacementError::Invalid(format!(
                "{} values for counts of {expected}",
                flat.len()
            )));
        }
        let mut values = flat.iter().copied();
        for x in self
            .tokens
            .iter_mut()
            .flatten()
            .chain(self.transitions.iter_mut().flatten().flatten())
        {
            *x = values.next().expect("length checked");
        }
        Ok(())
    }
}

/// The identifier written into every statistics file.
const FORMAT: &str = "switchyard-routing-stats/1";

/// The moving average of `BatchCounts` over training steps; a JSON file on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingStats {
    pub format: String,
    /// Model layer index of each MoE layer.
    pub moe_layers: Vec<usize>,
    pub num_experts: usize,
    /// Weight of the old average at each record (`placement.stats_decay`).
    pub decay: f64,
    /// Steps recorded so far.
    pub records: u64,
    /// Moving average of tokens per expert per step: [L][E].
    pub tokens: Vec<Vec<f64>>,
    /// Moving average of transitions per step: [L-1][E][E].
    pub transitions: Vec<Vec<Vec<f64>>>,
    /// Where the statistics come from (free text: config, steps).
    #[serde(default)]
    pub source: String,
}

impl RoutingStats {
    /// Empty statistics; `decay` in [0, 1).
    pub fn new(decay: f64) -> Result<RoutingStats> {
        if !(0.0..1.0).contains(&decay) {
            return Err(PlacementError::Invalid(format!(
                "the moving-average decay must be in [0, 1), got {decay}"
            )));
        }
        Ok(RoutingStats {
            format: FORMAT.into(),
            moe_layers: Vec::new(),
            num_experts: 0,
            decay,
            records: 0,
            tokens: Vec::new(),
            transitions: Vec::new(),
            source: String::new(),
        })
    }

    /// Adds one step's counts: the first record sets the average, later ones blend in
    /// with weight `1 - decay`.
    pub fn record(&mut self, counts: &BatchCounts) -> Result<()> {
        if self.records == 0 {
            self.moe_layers = counts.moe_layers.clone();
            self.num_experts = counts.tokens.first().map_or(0, Vec::len);
            self.tokens = counts.tokens.clone();
            self.transitions = counts.transitions.clone();
            self.records = 1;
            return Ok(());
        }
        if counts.moe_layers != self.moe_layers
            || counts.tokens.first().map_or(0, Vec::len) != self.num_experts
        {
            return Err(PlacementError::Invalid(format!(
                "counts for MoE layers {:?} with {} experts do not match the statistics' \
                 layers {:?} with {} experts",
                counts.moe_layers,
                counts.tokens.first().map_or(0, Vec::len),
                self.moe_layers,
                self.num_experts
            )));
        }
        let d = self.decay;
        let blend = |avg: &mut f64, x: f64| *avg = d * *avg + (1.0 - d) * x;
        for (avg, x) in self
            .tokens
            .iter_mut()
            .flatten()
            .zip(counts.tokens.iter().flatten())
        {
            blend(avg, *x);
        }
        for (avg, x) in self
            .transitions
            .iter_mut()
            .flatten()
            .flatten()
            .zip(counts.transitions.iter().flatten().flatten())
        {
            blend(avg, *x);
        }
        self.records += 1;
        Ok(())
    }

    /// The placement problem for `topology.ranks()` ep ranks.
    pub fn instance(&self, topology: Topology) -> Result<Instance> {
        if self.records == 0 {
            return Err(PlacementError::Invalid(
                "the routing statistics are empty (no step recorded)".into(),
            ));
        }
        Instance::new(self.tokens.clone(), self.transitions.clone(), topology)
    }

    /// Writes the statistics as JSON (to a temporary file, then renamed into place).
    pub fn save(&self, path: &Path) -> Result<()> {
        let error = |message: String| PlacementError::StatsFile {
            path: path.to_path_buf(),
            message,
        };
        let json = serde_json::to_string(self).map_err(|e| error(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json).map_err(|e| error(format!("writing: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| error(format!("renaming into place: {e}")))
    }

    /// Reads and checks statistics written by `save`.
    pub fn load(path: &Path) -> Result<RoutingStats> {
        let error = |message: String| PlacementError::StatsFile {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(format!("reading: {e}")))?;
        let stats: RoutingStats = serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
        if stats.format != FORMAT {
            return Err(error(format!(
                "format `{}`, expected `{FORMAT}`",
                stats.format
            )));
        }
        let (l, e) = (stats.moe_layers.len(), stats.num_experts);
        let shapes_ok = stats.tokens.len() == l
            && stats.tokens.iter().all(|row| row.len() == e)
            && stats.transitions.len() == l.saturating_sub(1)
            && stats
                .transitions
                .iter()
                .all(|m| m.len() == e && m.iter().all(|row| row.len() == e));
        if !shapes_ok {
            return Err(error(format!(
                "shapes do not match {l} MoE layers of {e} experts"
            )));
        }
        Ok(stats)
    }
}
