//! The planner's answers: valid placements, the ILP never worse than the heuristic it
//! starts from, proven optima that match brute force, over random instances with fixed
//! seeds.

mod common;

use common::{brute_force_stage1, brute_force_stage2, permutations, random_instance};
use switchyard_parallel::Placement;
use switchyard_placement::ilp::{Outcome, bottleneck_assignment};
use switchyard_placement::{
    IlpSolver, Instance, Plan, StageStatus, Strategy, Topology, evaluate, plan,
};

fn ilp(time_limit_s: f64) -> Strategy {
    ilp_with(IlpSolver::Microlp, time_limit_s)
}

fn ilp_with(solver: IlpSolver, time_limit_s: f64) -> Strategy {
    Strategy::Ilp {
        time_limit_s,
        mip_gap: 0.0,
        solver,
    }
}

/// microlp, and HiGHS when it is compiled in.
fn solvers() -> Vec<IlpSolver> {
    [IlpSolver::Microlp, IlpSolver::Highs]
        .into_iter()
        .filter(|s| s.available())
        .collect()
}

const TOL: f64 = 1e-9;

fn assert_valid(instance: &Instance, plan: &Plan) {
    let ranks = instance.ranks();
    let per_rank = instance.experts() / ranks;
    assert_eq!(plan.owners.len(), instance.layers());
    for (l, owner) in plan.owners.iter().enumerate() {
        let placement = Placement::from_owners(owner.clone(), ranks)
            .unwrap_or_else(|e| panic!("{}: layer {l} rejected: {e}", plan.strategy));
        let mut seen = vec![0; instance.experts()];
        for r in 0..ranks {
            let experts = placement.experts_of(r);
            assert_eq!(
                experts.len(),
                per_rank,
                "{}: layer {l} rank {r}",
                plan.strategy
            );
            for e in experts {
                seen[e] += 1;
            }
        }
        assert!(
            seen.iter().all(|&s| s == 1),
            "{}: layer {l}: {seen:?}",
            plan.strategy
        );
    }
    // The reported metrics are those of the owners.
    assert_eq!(plan.metrics, evaluate(instance, &plan.owners));
}

#[test]
fn every_strategy_places_every_expert_once_with_equal_counts() {
    for seed in 0..12 {
        for (experts, ranks, layers) in [
            (16, 4, 2),
            (32, 8, 3),
            (12, 3, 4),
            (8, 8, 2),
            (6, 1, 2),
            (8, 2, 1),
        ] {
            let instance = random_instance(seed, layers, experts, Topology::uniform(ranks), 1.0);
            for strategy in [Strategy::Contiguous {}, Strategy::Heuristic {}, ilp(0.2)] {
                let plan = plan(&instance, &strategy).unwrap();
                assert_valid(&instance, &plan);
            }
        }
    }
}

#[test]
fn contiguous_matches_the_mesh_default() {
    let instance = random_instance(3, 2, 16, Topology::uniform(4), 1.0);
    let plan = plan(&instance, &Strategy::Contiguous {}).unwrap();
    let default = Placement::contiguous(16, 4).unwrap();
    for owner in &plan.owners {
        assert!((0..16).all(|e| owner[e] == default.owner(e)), "{owner:?}");
    }
}

#[test]
fn heuristic_balances_better_than_contiguous_on_skewed_loads() {
    let mut wins = 0;
    for seed in 0..20 {
        let instance = random_instance(seed, 2, 32, Topology::uniform(8), 1.5);
        let contiguous = plan(&instance, &Strategy::Contiguous {}).unwrap();
        let heuristic = plan(&instance, &Strategy::Heuristic {}).unwrap();
        let c = contiguous.metrics.mean_load_max_over_mean;
        let h = heuristic.metrics.mean_load_max_over_mean;
        assert!(h >= 1.0 - TOL);
        if h < c - 1e-6 {
            wins += 1;
        }
    }
    assert!(
        wins >= 18,
        "the heuristic beat contiguous on only {wins} of 20 skewed instances"
    );
}

#[test]
fn ilp_is_never_worse_than_its_heuristic_start() {
    let mut stage1_improved = 0;
    let mut stage2_improved = 0;
    for seed in 0..16 {
        for (experts, layers, topology) in [
            (16, 3, Topology::uniform(4)),
            (24, 2, Topology::two_level(4, 2, 9.0).unwrap()),
            (32, 4, Topology::uniform(8)),
        ] {
            let instance = random_instance(100 + seed, layers, experts, topology, 1.2);
            let heuristic = plan(&instance, &Strategy::Heuristic {}).unwrap();
            let ilp_plan = plan(&instance, &ilp(1.0)).unwrap();
            assert_valid(&instance, &ilp_plan);
            let s1 = ilp_plan.report.stage1.as_ref().unwrap();
            let s2 = ilp_plan.report.stage2.as_ref().unwrap();
            let (h1, i1) = (
                heuristic.metrics.mean_load_max_over_mean,
                ilp_plan.metrics.mean_load_max_over_mean,
            );
            // The reports describe the placement and its start.
            assert!((s1.objective - i1).abs() < TOL, "{} vs {i1}", s1.objective);
            assert!((s1.start_objective - h1).abs() < TOL);
            assert!((s2.objective - ilp_plan.metrics.mean_boundary_traffic).abs() < TOL);
            assert!(s1.bound <= s1.objective + TOL && s2.bound <= s2.objective + TOL);
            assert!(i1 <= h1 + TOL, "seed {seed}: stage 1 {i1} > heuristic {h1}");
            assert!(s2.objective <= s2.start_objective + TOL);
            if i1 < h1 - 1e-6 {
                stage1_improved += 1;
            } else {
                // Same groups: stage 2 started from the heuristic's own maps.
                let h2 = heuristic.metrics.mean_boundary_traffic;
                assert!((s2.start_objective - h2).abs() < TOL);
                assert!(
                    s2.objective <= h2 + TOL,
                    "seed {seed}: stage 2 {} > {h2}",
                    s2.objective
                );
            }
            if s2.objective < s2.start_objective - 1e-6 {
                stage2_improved += 1;
            }
        }
    }
    // The solver must actually do something on some of these instances.
    assert!(
        stage1_improved > 0,
        "the ILP never improved the heuristic's load balance"
    );
    assert!(
        stage2_improved > 0,
        "the ILP never improved the heuristic's traffic"
    );
}

#[test]
fn ilp_stage1_matches_brute_force_on_small_instances() {
    let mut improved = 0;
    for solver in solvers() {
        for seed in 0..12 {
            for (experts, ranks) in [(8, 2), (8, 4), (9, 3), (12, 3), (12, 4)] {
                let instance =
                    random_instance(200 + seed, 2, experts, Topology::uniform(ranks), 1.0);
                let plan = plan(&instance, &ilp_with(solver, 60.0)).unwrap();
                let s1 = plan.report.stage1.as_ref().unwrap();
                assert_eq!(
                    s1.status,
                    StageStatus::Proven,
                    "seed {seed} {experts}x{ranks}: {s1:?}"
                );
                for l in 0..instance.layers() {
                    let optimum = brute_force_stage1(&instance.normalized_loads(l), ranks);
                    let got = plan.metrics.load_max_over_mean[l];
                    assert!(
                        (got - optimum).abs() < 1e-7,
                        "seed {seed} {experts}x{ranks} layer {l}: ILP {got}, brute force {optimum}"
                    );
                    let solve = &s1.solves[l];
                    assert!(solve.gap() < 1e-6, "{solve:?}");
                    if solve.outcome == Outcome::Optimal
                        && solve.objective < solve.start_objective - 1e-6
                    {
                        improved += 1;
                    }
                }
            }
        }
    }
    assert!(
        improved > 0,
        "no instance where the heuristic was suboptimal: the test is too easy"
    );
}

#[test]
fn ilp_stage2_matches_brute_force_on_small_instances() {
    for solver in solvers() {
        for seed in 0..8 {
            for (experts, ranks, layers, topology) in [
                (6, 3, 3, Topology::uniform(3)),
                (8, 4, 3, Topology::uniform(4)),
                (8, 4, 3, Topology::two_level(4, 2, 9.0).unwrap()),
                (12, 4, 2, Topology::two_level(4, 2, 4.0).unwrap()),
            ] {
                let uniform = topology.is_uniform();
                let instance = random_instance(300 + seed, layers, experts, topology, 1.0);
                let plan = plan(&instance, &ilp_with(solver, 60.0)).unwrap();
                let s2 = plan.report.stage2.as_ref().unwrap();
                assert_eq!(
                    s2.status,
                    StageStatus::Proven,
                    "{solver:?} seed {seed}: {s2:?}"
                );
                let optimum = brute_force_stage2(&instance, &plan.owners);
                assert!(
                    (plan.metrics.mean_boundary_traffic - optimum).abs() < 1e-7,
                    "{solver:?} seed {seed} {experts}x{ranks}x{layers} uniform={uniform}: ILP {}, brute force {optimum}",
                    plan.metrics.mean_boundary_traffic
                );
            }
        }
    }
}

#[test]
fn zero_time_limit_falls_back_to_the_heuristic() {
    // Two-level links: stage 2 is a MILP there (with uniform links it is solved exactly,
    // in microseconds, whatever the limit).
    let topology = Topology::two_level(8, 4, 9.0).unwrap();
    let instance = random_instance(7, 3, 32, topology, 1.5);
    let heuristic = plan(&instance, &Strategy::Heuristic {}).unwrap();
    let fallback = plan(&instance, &ilp(0.0)).unwrap();
    assert_valid(&instance, &fallback);
    assert_eq!(fallback.owners, heuristic.owners);
    for solve in fallback
        .report
        .stage1
        .iter()
        .chain(&fallback.report.stage2)
        .flat_map(|s| &s.solves)
    {
        assert!(
            matches!(solve.outcome, Outcome::NoTime | Outcome::StartProven),
            "{solve:?}"
        );
    }
}

#[test]
fn uniform_loads_and_no_traffic_are_proven_at_once() {
    let loads = vec![vec![5.0; 8]; 2];
    let transitions = vec![vec![vec![0.0; 8]; 8]];
    let instance = Instance::new(loads, transitions, Topology::uniform(4)).unwrap();
    let plan = plan(&instance, &ilp(1.0)).unwrap();
    assert_valid(&instance, &plan);
    let s1 = plan.report.stage1.unwrap();
    assert_eq!(s1.status, StageStatus::Proven);
    assert!((s1.objective - 1.0).abs() < TOL && s1.gap < TOL);
    assert_eq!(plan.report.stage2.unwrap().status, StageStatus::Proven);
}

#[test]
fn a_rank_count_that_does_not_divide_the_experts_is_an_error() {
    let err = Instance::new(vec![vec![1.0; 10]], vec![], Topology::uniform(4)).unwrap_err();
    assert!(err.to_string().contains("cannot be split evenly"), "{err}");
}

#[test]
fn bottleneck_assignment_matches_brute_force() {
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Few distinct values: ties between thresholds are exercised too.
        ((state >> 33) % 7) as f64
    };
    let worst_of = |cost: &[Vec<f64>], p: &[usize]| {
        (0..cost.len())
            .map(|i| cost[i][p[i]])
            .fold(f64::MIN, f64::max)
    };
    for n in 1..=6 {
        for _ in 0..20 {
            let cost: Vec<Vec<f64>> = (0..n).map(|_| (0..n).map(|_| next()).collect()).collect();
            let (p, worst) = bottleneck_assignment(&cost);
            let mut sorted = p.clone();
            sorted.sort();
            assert_eq!(
                sorted,
                (0..n).collect::<Vec<_>>(),
                "not a permutation: {p:?}"
            );
            assert_eq!(worst_of(&cost, &p), worst);
            let optimum = permutations(n)
                .iter()
                .map(|q| worst_of(&cost, q))
                .fold(f64::MAX, f64::min);
            assert_eq!(worst, optimum, "{cost:?}");
        }
    }
}
