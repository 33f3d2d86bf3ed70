//! The placement problem: per-layer loads, transitions between consecutive MoE layers, the
//! number of ep ranks and the links between them.
//!
//! Shape legend: L MoE layers, E experts per layer, N ep ranks, m = E / N experts per rank.

use crate::error::{PlacementError, Result};

/// Relative bandwidth of every ordered pair of ep ranks (the fastest link is 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// [N][N]; the diagonal is unused (traffic inside a rank is free).
    bandwidth: Vec<Vec<f64>>,
}

impl Topology {
    /// Every pair of ranks has the same link.
    pub fn uniform(ranks: usize) -> Topology {
        Topology {
            bandwidth: vec![vec![1.0; ranks]; ranks],
        }
    }

    /// Ranks `[k * per_node, (k+1) * per_node)` share node `k`; links between nodes are
    /// `inter_node_slowdown` times slower than links inside a node.
    pub fn two_level(ranks: usize, per_node: usize, inter_node_slowdown: f64) -> Result<Topology> {
        if per_node == 0 || !ranks.is_multiple_of(per_node) {
            return Err(PlacementError::Invalid(format!(
                "ranks per node ({per_node}) must divide the number of ranks ({ranks})"
            )));
        }
        if !(inter_node_slowdown.is_finite() && inter_node_slowdown >= 1.0) {
            return Err(PlacementError::Invalid(format!(
                "the inter-node slowdown must be a finite number >= 1, got {inter_node_slowdown}"
            )));
        }
        let bandwidth = (0..ranks)
            .map(|a| {
                (0..ranks)
                    .map(|b| {
                        if a / per_node == b / per_node {
                            1.0
                        } else {
                            1.0 / inter_node_slowdown
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(Topology { bandwidth })
    }

    /// From a full matrix of link bandwidths in any unit; rescaled so the fastest is 1.
    pub fn from_matrix(bandwidth: Vec<Vec<f64>>) -> Result<Topology> {
        let n = bandwidth.len();
        let mut fastest: f64 = 0.0;
        for (a, row) in bandwidth.iter().enumerate() {
            if row.len() != n {
                return Err(PlacementError::Invalid(format!(
                    "bandwidth row {a} has {} entries, expected {n}",
                    row.len()
                )));
            }
            for (b, &bw) in row.iter().enumerate() {
                if a != b {
                    if !(bw.is_finite() && bw > 0.0) {
                        return Err(PlacementError::Invalid(format!(
                            "bandwidth[{a}][{b}] must be positive and finite, got {bw}"
                        )));
                    }
                    fastest = fastest.max(bw);
                }
            }
        }
        let scale = if fastest > 0.0 { fastest } else { 1.0 };
        Ok(Topology {
            bandwidth: bandwidth
                .into_iter()
                .map(|row| row.into_iter().map(|bw| bw / scale).collect())
                .collect(),
        })
    }

    pub fn ranks(&self) -> usize {
        self.bandwidth.len()
    }

    /// Time per unit of traffic from rank `a` to rank `b` (1 on the fastest link, 0 inside
    /// a rank).
    pub fn cost(&self, a: usize, b: usize) -> f64 {
        if a == b {
            0.0
        } else {
            1.0 / self.bandwidth[a][b]
        }
    }

    /// Every link equal: relabelling ranks does not change any cost.
    pub fn is_uniform(&self) -> bool {
        let n = self.ranks();
        (0..n).all(|a| (0..n).all(|b| a == b || self.bandwidth[a][b] == self.bandwidth[0][1]))
    }
}

/// A placement problem. Loads and transitions are kept as given (token counts or their
/// moving averages); the planner normalises them (see the crate docs for the units).
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// [L][E] tokens dispatched to each expert.
    pub loads: Vec<Vec<f64>>,
    /// [L-1][E][E]: `transitions[l][i][j]` tokens routed to expert i in MoE layer l and to
    /// expert j in MoE layer l+1.
    pub transitions: Vec<Vec<Vec<f64>>>,
    pub topology: Topology,
}

impl Instance {
    pub fn new(
        loads: Vec<Vec<f64>>,
        transitions: Vec<Vec<Vec<f64>>>,
        topology: Topology,
    ) -> Result<Instance> {
        let layers = loads.len();
        if layers == 0 {
            return Err(PlacementError::Invalid("no MoE layers".into()));
        }
        let experts = loads[0].len();
        let ranks = topology.ranks();
        if ranks == 0 || experts == 0 || !experts.is_multiple_of(ranks) {
            return Err(PlacementError::Invalid(format!(
                "{experts} experts per layer cannot be split evenly over {ranks} ranks; use a \
                 rank count that divides {experts}"
            )));
        }
        let bad = |x: f64| !(x.is_finite() && x >= 0.0);
        for (l, row) in loads.iter().enumerate() {
            if row.len() != experts {
                return Err(PlacementError::Invalid(format!(
                    "layer {l} has {} expert loads, layer 0 has {experts}",
                    row.len()
                )));
            }
            if row.iter().any(|&x| bad(x)) {
                return Err(PlacementError::Invalid(format!(
                    "layer {l}: loads must be finite and non-negative"
                )));
            }
        }
        if transitions.len() != layers - 1 {
            return Err(PlacementError::Invalid(format!(
                "{} transition matrices for {layers} layers; expected {}",
                transitions.len(),
                layers - 1
            )));
        }
        for (l, matrix) in transitions.iter().enumerate() {
            if matrix.len() != experts || matrix.iter().any(|row| row.len() != experts) {
                return Err(PlacementError::Invalid(format!(
                    "transition matrix {l} must be {experts} x {experts}"
                )));
            }
            if matrix.iter().flatten().any(|&x| bad(x)) {
                return Err(PlacementError::Invalid(format!(
                    "transition matrix {l}: entries must be finite and non-negative"
                )));
            }
        }
        Ok(Instance {
            loads,
            transitions,
            topology,
        })
    }

    pub fn layers(&self) -> usize {
        self.loads.len()
    }

    pub fn experts(&self) -> usize {
        self.loads[0].len()
    }

    pub fn ranks(&self) -> usize {
        self.topology.ranks()
    }

    /// Experts per rank per layer.
    pub fn per_rank(&self) -> usize {
        self.experts() / self.ranks()
    }

    /// Layer `l`'s loads scaled so the mean rank load is 1 (all ones-over-m when the layer
    /// saw no tokens, so an unused layer counts as balanced).
    pub fn normalized_loads(&self, l: usize) -> Vec<f64> {
        let total: f64 = self.loads[l].iter().sum();
        let ranks = self.ranks() as f64;
        if total > 0.0 {
            self.loads[l].iter().map(|&x| x * ranks / total).collect()
        } else {
            vec![1.0 / self.per_rank() as f64; self.experts()]
        }
    }

    /// Boundary `l`'s transitions scaled to sum to 1 (all zeros when there were none).
    pub fn normalized_transitions(&self, l: usize) -> Vec<Vec<f64>> {
        let total: f64 = self.transitions[l].iter().flatten().sum();
        let scale = if total > 0.0 { 1.0 / total } else { 0.0 };
        self.transitions[l]
            .iter()
            .map(|row| row.iter().map(|&x| x * scale).collect())
            .collect()
    }

    /// Checks that `owners` ([L][E]) puts every expert of every layer on exactly one rank
    /// below N with exactly m experts per rank.
    pub fn check_owners(&self, owners: &[Vec<usize>]) -> Result<()> {
        if owners.len() != self.layers() {
            return Err(PlacementError::Invalid(format!(
                "{} owner vectors for {} layers",
                owners.len(),
                self.layers()
            )));
        }
        for (l, owner) in owners.iter().enumerate() {
            if owner.len() != self.experts() {
                return Err(PlacementError::Invalid(format!(
                    "layer {l}: {} owners for {} experts",
                    owner.len(),
                    self.experts()
                )));
            }
            let mut count = vec![0; self.ranks()];
            for (e, &r) in owner.iter().enumerate() {
                if r >= self.ranks() {
                    return Err(PlacementError::Invalid(format!(
                        "layer {l}: expert {e} on rank {r}, but there are {} ranks",
                        self.ranks()
                    )));
                }
                count[r] += 1;
            }
            if let Some(r) = count.iter().position(|&c| c != self.per_rank()) {
                return Err(PlacementError::Invalid(format!(
                    "layer {l}: rank {r} holds {} experts, every rank must hold {}",
                    count[r],
                    self.per_rank()
                )));
            }
        }
        Ok(())
    }
}
