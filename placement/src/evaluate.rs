//! What a placement costs: per-rank load balance and cross-rank transition traffic.

use serde::{Deserialize, Serialize};

use crate::instance::{Instance, Topology};

/// Predicted quality of a placement (see the crate docs for the units).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Per layer: the busiest rank's tokens over the mean rank's (1 = balanced).
    pub load_max_over_mean: Vec<f64>,
    /// Mean over layers of `load_max_over_mean`: the stage-1 objective.
    pub mean_load_max_over_mean: f64,
    pub worst_load_max_over_mean: f64,
    /// Fraction of all layer-to-layer transitions whose two experts sit on different ranks.
    pub cross_rank_fraction: f64,
    /// Per boundary between consecutive MoE layers: the busiest rank's bandwidth-normalized
    /// send or receive volume, as a fraction of the boundary's transitions.
    pub boundary_traffic: Vec<f64>,
    /// Mean over boundaries of `boundary_traffic`: the stage-2 objective.
    pub mean_boundary_traffic: f64,
}

/// Evaluates `owners` ([L][E] expert -> rank) on `instance`.
pub fn evaluate(instance: &Instance, owners: &[Vec<usize>]) -> Metrics {
    let ranks = instance.ranks();
    let load_max_over_mean: Vec<f64> = (0..instance.layers())
        .map(|l| {
            let p = instance.normalized_loads(l);
            max_group_load(&p, &owners[l], ranks)
        })
        .collect();
    let (mut crossing, mut total) = (0.0, 0.0);
    let boundary_traffic: Vec<f64> = (0..instance.layers() - 1)
        .map(|l| {
            for (i, row) in instance.transitions[l].iter().enumerate() {
                for (j, &t) in row.iter().enumerate() {
                    total += t;
                    if owners[l][i] != owners[l + 1][j] {
                        crossing += t;
                    }
                }
            }
            let c = instance.normalized_transitions(l);
            boundary_time(&c, &owners[l], &owners[l + 1], &instance.topology)
        })
        .collect();
    Metrics {
        mean_load_max_over_mean: mean(&load_max_over_mean),
        worst_load_max_over_mean: load_max_over_mean.iter().cloned().fold(0.0, f64::max),
        load_max_over_mean,
        cross_rank_fraction: if total > 0.0 { crossing / total } else { 0.0 },
        mean_boundary_traffic: mean(&boundary_traffic),
        boundary_traffic,
    }
}

/// The largest sum of `p` over the items of one rank (`rank_of[item]`).
pub(crate) fn max_group_load(p: &[f64], rank_of: &[usize], ranks: usize) -> f64 {
    let mut load = vec![0.0; ranks];
    for (item, &r) in rank_of.iter().enumerate() {
        load[r] += p[item];
    }
    load.into_iter().fold(0.0, f64::max)
}

/// One boundary's cost: `c[a][b]` traffic from row item a (on rank `rank_a[a]`) to column
/// item b (on rank `rank_b[b]`); the busiest rank's send or receive time. Items are experts
/// or groups of experts.
pub(crate) fn boundary_time(
    c: &[Vec<f64>],
    rank_a: &[usize],
    rank_b: &[usize],
    topology: &Topology,
) -> f64 {
    let n = topology.ranks();
    let (mut send, mut recv) = (vec![0.0; n], vec![0.0; n]);
    for (a, row) in c.iter().enumerate() {
        let ga = rank_a[a];
        for (b, &t) in row.iter().enumerate() {
            let gb = rank_b[b];
            if ga != gb && t > 0.0 {
                let time = t * topology.cost(ga, gb);
                send[ga] += time;
                recv[gb] += time;
            }
        }
    }
    send.into_iter().chain(recv).fold(0.0, f64::max)
}

pub(crate) fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}
