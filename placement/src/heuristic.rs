//! The fast heuristic, in the same two stages as the ILP:
//! 1. per layer, experts into N groups of m experts with balanced load: longest processing
//!    time first (each expert, heaviest first, to the lightest group with room), then
//!    pairwise swaps out of the heaviest group while they lower it;
//! 2. groups to ranks: layer 0's group g on rank g; each next layer's groups matched
//!    greedily to the ranks their incoming transitions come from, then pairwise rank swaps
//!    within a layer while they lower the stage-2 objective.
//!
//! Shape legend: L layers, E experts, N ranks = groups per layer, m = E / N.

use crate::evaluate::{boundary_time, mean};
use crate::instance::Instance;

/// Stage-1 result: per layer, expert -> group (N groups of m experts).
pub type Groups = Vec<Vec<usize>>;
/// Stage-2 result: per layer, group -> rank (a permutation of 0..N).
pub type RankMaps = Vec<Vec<usize>>;

/// Relative tolerance below which a change does not count as an improvement.
pub(crate) const TOLERANCE: f64 = 1e-9;

/// `owners[l][e] = maps[l][groups[l][e]]`.
pub fn owners(groups: &Groups, maps: &RankMaps) -> Vec<Vec<usize>> {
    groups
        .iter()
        .zip(maps)
        .map(|(group, map)| group.iter().map(|&g| map[g]).collect())
        .collect()
}

/// Experts `[i * m, (i+1) * m)` on rank `i` in every layer.
pub fn contiguous(layers: usize, experts: usize, ranks: usize) -> Vec<Vec<usize>> {
    let per_rank = experts / ranks;
    vec![(0..experts).map(|e| e / per_rank).collect(); layers]
}

/// Stage 1 for one layer: loads `p` ([E]) into `ranks` groups of E / ranks experts.
pub fn balance_layer(p: &[f64], ranks: usize) -> Vec<usize> {
    let per_rank = p.len() / ranks;
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let mut group = vec![0; p.len()];
    let mut load = vec![0.0f64; ranks];
    let mut count = vec![0; ranks];
    for &e in &order {
        let g = (0..ranks)
            .filter(|&g| count[g] < per_rank)
            .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
            .expect("E = N * m leaves room for every expert");
        group[e] = g;
        load[g] += p[e];
        count[g] += 1;
    }
    refine_swaps(p, &mut group, &mut load);
    group
}

/// Swaps one expert of the heaviest group with a lighter expert of another group while that
/// lowers the pair's larger load below the heaviest load (the best such swap each time).
/// Every swap lowers the sorted vector of group loads, so this terminates.
fn refine_swaps(p: &[f64], group: &mut [usize], load: &mut [f64]) {
    let tol = TOLERANCE * p.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    for _ in 0..p.len() * p.len() {
        let heaviest = (0..load.len())
            .max_by(|&a, &b| load[a].total_cmp(&load[b]).then(b.cmp(&a)))
            .expect("at least one group");
        let mut best: Option<(f64, usize, usize)> = None;
        for i in (0..p.len()).filter(|&i| group[i] == heaviest) {
            for j in (0..p.len()).filter(|&j| group[j] != heaviest) {
                let moved = p[i] - p[j];
                if moved <= 0.0 {
                    continue;
                }
                let pair_max = (load[heaviest] - moved).max(load[group[j]] + moved);
                if pair_max < load[heaviest] - tol && best.is_none_or(|(b, _, _)| pair_max < b) {
                    best = Some((pair_max, i, j));
                }
            }
        }
        let Some((_, i, j)) = best else { break };
        let (gi, gj) = (group[i], group[j]);
        let moved = p[i] - p[j];
        load[gi] -= moved;
        load[gj] += moved;
        group.swap(i, j);
    }
}

/// Per boundary, the normalised transitions between the groups of layer l (rows) and of
/// layer l+1 (columns): [L-1][N][N].
pub fn group_transitions(instance: &Instance, groups: &Groups) -> Vec<Vec<Vec<f64>>> {
    let n = instance.ranks();
    (0..instance.layers() - 1)
        .map(|l| {
            let mut c = vec![vec![0.0; n]; n];
            for (i, row) in instance.normalized_transitions(l).iter().enumerate() {
                for (j, &t) in row.iter().enumerate() {
                    c[groups[l][i]][groups[l + 1][j]] += t;
                }
            }
            c
        })
        .collect()
}

/// Stage-2 objective: mean over boundaries of the busiest rank's send or receive time.
pub fn stage2_objective(instance: &Instance, c: &[Vec<Vec<f64>>], maps: &RankMaps) -> f64 {
    let per_boundary: Vec<f64> = (0..c.len())
        .map(|l| boundary_time(&c[l], &maps[l], &maps[l + 1], &instance.topology))
        .collect();
    mean(&per_boundary)
}

/// Stage 2: groups to ranks (see the module docs).
pub fn map_groups(instance: &Instance, c: &[Vec<Vec<f64>>]) -> RankMaps {
    let n = instance.ranks();
    let mut maps: RankMaps = vec![(0..n).collect()];
    for boundary in c {
        let prev = maps.last().expect("layer 0 is mapped");
        // Pairs (rank, next group) by the transitions they would keep on one rank.
        let mut pairs: Vec<(f64, usize, usize)> = Vec::with_capacity(n * n);
        for (c1, &rank) in prev.iter().enumerate() {
            for (c2, &t) in boundary[c1].iter().enumerate() {
                pairs.push((t, rank, c2));
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut map = vec![usize::MAX; n];
        let mut rank_used = vec![false; n];
        for (_, rank, group) in pairs {
            if map[group] == usize::MAX && !rank_used[rank] {
                map[group] = rank;
                rank_used[rank] = true;
            }
        }
        maps.push(map);
    }
    refine_maps(instance, c, &mut maps);
    maps
}

/// Pairwise rank swaps within one layer while they lower the stage-2 objective.
fn refine_maps(instance: &Instance, c: &[Vec<Vec<f64>>], maps: &mut RankMaps) {
    let n = instance.ranks();
    let layers = maps.len();
    let topology = &instance.topology;
    let local = |maps: &RankMaps, l: usize| -> f64 {
        let mut cost = 0.0;
        if l > 0 {
            cost += boundary_time(&c[l - 1], &maps[l - 1], &maps[l], topology);
        }
        if l + 1 < layers {
            cost += boundary_time(&c[l], &maps[l], &maps[l + 1], topology);
        }
        cost
    };
    for _ in 0..100 {
        let mut improved = false;
        for l in 0..layers {
            for a in 0..n {
                for b in a + 1..n {
                    let before = local(maps, l);
                    swap_ranks(&mut maps[l], a, b);
                    if local(maps, l) < before - TOLERANCE {
                        improved = true;
                    } else {
                        swap_ranks(&mut maps[l], a, b);
                    }
                }
            }
        }
        if !improved {
            break;
        }
    }
}

/// Exchanges the groups on ranks `a` and `b`.
fn swap_ranks(map: &mut [usize], a: usize, b: usize) {
    for rank in map.iter_mut() {
        if *rank == a {
            *rank = b;
        } else if *rank == b {
            *rank = a;
        }
    }
}

/// The whole heuristic: stage-1 groups and stage-2 maps.
pub fn solve(instance: &Instance) -> (Groups, RankMaps) {
    let groups: Groups = (0..instance.layers())
        .map(|l| balance_layer(&instance.normalized_loads(l), instance.ranks()))
        .collect();
    let c = group_transitions(instance, &groups);
    let maps = map_groups(instance, &c);
    (groups, maps)
}
