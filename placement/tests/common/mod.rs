//! Random placement instances with fixed seeds, and brute-force optima.

#![allow(dead_code)] // each test file uses part of this module

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use switchyard_placement::{Instance, Topology, evaluate};

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Log-normal loads (skew `sigma`) and transitions whose rows follow the loads with a
/// random, peaked affinity to the next layer's experts.
pub fn random_instance(
    seed: u64,
    layers: usize,
    experts: usize,
    topology: Topology,
    sigma: f64,
) -> Instance {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let loads: Vec<Vec<f64>> = (0..layers)
        .map(|_| {
            (0..experts)
                .map(|_| (1000.0 * (sigma * normal(&mut rng)).exp()).round())
                .collect()
        })
        .collect();
    let transitions = (0..layers - 1)
        .map(|l| {
            (0..experts)
                .map(|i| {
                    let w: Vec<f64> = (0..experts)
                        .map(|_| (2.0 * normal(&mut rng)).exp())
                        .collect();
                    let total: f64 = w.iter().sum();
                    w.iter().map(|x| loads[l][i] * x / total).collect()
                })
                .collect()
        })
        .collect();
    Instance::new(loads, transitions, topology).expect("valid instance")
}

/// The smallest possible largest group load of one layer (normalised loads `p`, groups of
/// `p.len() / ranks`), by enumerating every balanced partition.
pub fn brute_force_stage1(p: &[f64], ranks: usize) -> f64 {
    fn go(
        p: &[f64],
        i: usize,
        per: usize,
        load: &mut Vec<f64>,
        count: &mut Vec<usize>,
        best: &mut f64,
    ) {
        if i == p.len() {
            *best = best.min(load.iter().cloned().fold(0.0, f64::max));
            return;
        }
        let mut tried_empty = false;
        for g in 0..load.len() {
            if count[g] == per {
                continue;
            }
            // Empty groups are interchangeable: try one of them.
            if count[g] == 0 {
                if tried_empty {
                    continue;
                }
                tried_empty = true;
            }
            load[g] += p[i];
            count[g] += 1;
            go(p, i + 1, per, load, count, best);
            load[g] -= p[i];
            count[g] -= 1;
        }
    }
    let mut best = f64::INFINITY;
    go(
        p,
        0,
        p.len() / ranks,
        &mut vec![0.0; ranks],
        &mut vec![0; ranks],
        &mut best,
    );
    best
}

/// Every permutation of 0..n.
pub fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for pos in 0..n {
            let mut q = p.clone();
            q.insert(pos, n - 1);
            out.push(q);
        }
    }
    out
}

/// The smallest stage-2 objective reachable from `owners` by relabelling the ranks of each
/// layer independently (the groups stay as they are), by enumeration.
pub fn brute_force_stage2(instance: &Instance, owners: &[Vec<usize>]) -> f64 {
    let perms = permutations(instance.ranks());
    let layers = owners.len();
    let mut best = f64::INFINITY;
    let mut choice = vec![0usize; layers];
    loop {
        let relabelled: Vec<Vec<usize>> = (0..layers)
            .map(|l| owners[l].iter().map(|&r| perms[choice[l]][r]).collect())
            .collect();
        best = best.min(evaluate(instance, &relabelled).mean_boundary_traffic);
        // next combination (odometer)
        let mut l = 0;
        loop {
            if l == layers {
                return best;
            }
            choice[l] += 1;
            if choice[l] < perms.len() {
                break;
            }
            choice[l] = 0;
            l += 1;
        }
    }
}
