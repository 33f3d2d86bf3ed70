//! MoETuner's two stages (methods.md section 4) as MILPs through `good_lp`, each started
//! from the heuristic's answer and falling back to it (stage 2 with uniform links is solved
//! exactly without a MILP, below).
//!
//! Stage 1, per layer (experts e, groups c; loads p normalised to a mean group load of 1):
//!   x[e][c] binary, sum_c x[e][c] = 1, sum_e x[e][c] = m (equal experts per rank),
//!   T_c = sum_e p[e] x[e][c], T_0 >= T_1 >= ... (groups are interchangeable: this removes
//!   the N! relabellings), minimise z >= T_0.
//! MoETuner minimises sum_c |T_c - mean| instead; we minimise the largest group load, the
//! quantity that sets the expert-compute and all-to-all tail and the reported max/mean.
//!
//! Stage 2, all layers at once (groups c, ranks g; C_l the group transitions of boundary l,
//! normalised to sum 1; t(g1, g2) the time per unit on that link, 0 within a rank):
//!   y[l][c][g] binary, a permutation per layer,
//!   send_l(g1) = sum_c1 y[l][c1][g1] * a[c1][g1] with
//!   a[c1][g1] = sum_c2 C_l[c1][c2] sum_{g2 != g1} t(g1, g2) y[l+1][c2][g2]  (linear),
//!   receive symmetric, minimise mean_l z_l with z_l >= send_l(g), z_l >= recv_l(g).
//! The product y * a (binary times a bounded linear form, 0 <= a <= M) is linearised as
//! u >= a - M (1 - y), u >= 0 (minimisation presses u down to y * a). This MILP runs for
//! non-uniform links (a two-level topology), where the rank positions, not only the
//! pairings below, set the cost.
//!
//! Uniform links need no MILP: a rank's send at boundary l is (transitions out of its
//! layer-l group c1) - C_l[c1][c2], with c2 its layer-(l+1) group, and its receive is
//! (transitions into c2) - C_l[c1][c2]; so boundary l's time depends only on which groups
//! share a rank, the pairing sigma_l: c1 -> c2, and every sequence of pairings is realised by
//! some maps (fix map_0, then map_{l+1}(sigma_l(c)) = map_l(c)). The boundaries decouple,
//! and each is a bottleneck assignment (minimise the largest pair cost
//! max(out(c1), in(c2)) - C_l[c1][c2]), solved exactly by a threshold search over the pair
//! costs with a bipartite matching per threshold. The MILP (the same formulation with the
//! transport-plan linearisation of the retained transitions) took >30 s to prove 64 experts
//! x 8 ranks x 4 layers optimal with microlp; this takes microseconds.
//!
//! MoETuner's Eq. 8 writes the max without its index; we take it over ranks and
//! directions, the busiest endpoint of the all-to-all (the local link model's cost).

use std::time::{Duration, Instant};

use good_lp::{
    Constraint, Expression, ProblemVariables, ResolutionError, Solution, SolutionStatus,
    SolverModel, Variable, WithInitialSolution, WithMipGap, WithTimeLimit, variable,
};
use serde::Serialize;

use crate::config::IlpSolver;
use crate::evaluate::max_group_load;
use crate::heuristic::{RankMaps, TOLERANCE, stage2_objective};
use crate::instance::Instance;

/// How one ILP solve ended, relative to the heuristic answer it started from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The start is already within the MIP gap of a lower bound: nothing to solve.
    StartProven,
    /// The solver proved its answer optimal (within the MIP gap).
    Optimal,
    /// Solved exactly without the solver (stage 2 with uniform links: bottleneck
    /// assignments, module docs).
    Exact,
    /// Better than the start; not proven optimal within the time limit.
    Improved,
    /// Nothing better than the start within the time limit (or no solution at all from
    /// the solver): the start is kept.
    StartKept,
    /// No time was left for this solve: the start is kept.
    NoTime,
    /// The solver failed (its message): the start is kept.
    Failed(String),
}

/// One solve: objectives in the stage's normalised units.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SolveReport {
    pub objective: f64,
    /// The heuristic's objective, where the solve started.
    pub start_objective: f64,
    /// A proven lower bound on the optimum.
    pub bound: f64,
    pub outcome: Outcome,
    pub seconds: f64,
}

impl SolveReport {
    /// Relative gap between the objective and the bound (0 = proven optimal).
    pub fn gap(&self) -> f64 {
        relative_gap(self.objective, self.bound)
    }
}

pub(crate) fn relative_gap(objective: f64, bound: f64) -> f64 {
    if objective > 0.0 {
        ((objective - bound) / objective).max(0.0)
    } else {
        0.0
    }
}

/// Budget and stopping rule of one solve.
pub(crate) struct IlpOptions {
    pub limit: Duration,
    /// Relative gap at which the solve may stop (0 = prove optimality).
    pub mip_gap: f64,
    pub solver: IlpSolver,
}

/// A MILP in good_lp's terms, minimised.
struct Milp {
    vars: ProblemVariables,
    objective: Expression,
    constraints: Vec<Constraint>,
    start: Vec<(Variable, f64)>,
}

/// Values of `read`, whether the solver proved optimality, and its best bound if it has
/// one. `solve_milp` returns `None` when the time ran out before the solver had any
/// solution (microlp adopts the warm start only after the root relaxation is solved).
struct MilpResult {
    values: Vec<f64>,
    /// Optimal within the MIP gap.
    proven: bool,
    /// Optimal, the search complete: the objective is itself a bound.
    exact: bool,
    best_bound: Option<f64>,
}

/// Solves within `limit`, warm-started from `milp.start`.
fn solve_milp(
    milp: Milp,
    read: &[Variable],
    options: &IlpOptions,
) -> Result<Option<MilpResult>, String> {
    let seconds = options.limit.as_secs_f64();
    let gap = options.mip_gap as f32;
    match options.solver {
        IlpSolver::Microlp => {
            let mut model = milp
                .vars
                .minimise(milp.objective)
                .using(good_lp::microlp)
                .with_time_limit(seconds)
                .with_initial_solution(milp.start)
                .with_mip_gap(gap)
                .map_err(|e| e.to_string())?;
            for c in milp.constraints {
                model.add_constraint(c);
            }
            let solution = match model.solve() {
                Ok(solution) => solution,
                Err(ResolutionError::Other(m)) if m.starts_with("Time limit") => return Ok(None),
                Err(e) => return Err(e.to_string()),
            };
            let proven = !matches!(solution.status(), SolutionStatus::TimeLimit);
            let exact = matches!(solution.status(), SolutionStatus::Optimal);
            let values = read.iter().map(|&v| solution.value(v)).collect();
            let best_bound = solution.into_inner().stats().best_bound;
            Ok(Some(MilpResult {
                values,
                proven,
                exact,
                best_bound,
            }))
        }
        #[cfg(feature = "highs")]
        IlpSolver::Highs => {
            use highs::{HighsModelStatus, HighsSolutionStatus};
            // good_lp's HiGHS solution drops the dual bound: solve the highs::Model here.
            let column: std::collections::HashMap<Variable, usize> = milp
                .vars
                .iter_variables_with_def()
                .enumerate()
                .map(|(i, (v, _))| (v, i))
                .collect();
            let mut start = vec![0.0; column.len()];
            for (v, x) in &milp.start {
                start[column[v]] = *x;
            }
            let mut problem = milp.vars.minimise(milp.objective).using(good_lp::highs);
            for c in milp.constraints {
                problem.add_constraint(c);
            }
            let mut model = problem.try_into_inner().map_err(|e| e.to_string())?;
            model.make_quiet();
            model.set_option("time_limit", seconds);
            model.set_option("mip_rel_gap", options.mip_gap);
            model
                .try_set_solution(Some(&start), None, None, None)
                .map_err(|e| format!("HiGHS rejected the start: {e:?}"))?;
            let solved = model.try_solve().map_err(|e| format!("HiGHS: {e:?}"))?;
            let status = solved.status();
            if !matches!(
                status,
                HighsModelStatus::Optimal | HighsModelStatus::ReachedTimeLimit
            ) {
                return Err(format!("HiGHS stopped with status {status:?}"));
            }
            if solved.primal_solution_status() != HighsSolutionStatus::Feasible {
                return Ok(None);
            }
            let columns = solved.get_solution().columns().to_vec();
            let proven = status == HighsModelStatus::Optimal;
            let best_bound = solved
                .double_info_value(c"mip_dual_bound")
                .ok()
                .filter(|b| b.is_finite());
            Ok(Some(MilpResult {
                values: read.iter().map(|v| columns[column[v]]).collect(),
                proven,
                exact: proven && solved.mip_gap() <= 1e-9,
                best_bound,
            }))
        }
        #[cfg(not(feature = "highs"))]
        IlpSolver::Highs => {
            Err(crate::error::PlacementError::SolverUnavailable("highs").to_string())
        }
    }
}

/// A lower bound on stage 1's optimum for one layer (loads `p`, mean group load 1): the
/// mean; the group of the heaviest expert (plus the m-1 lightest experts); and, by
/// pigeonhole, a group holding two of the N+1 heaviest experts (plus the m-2 lightest).
pub fn stage1_bound(p: &[f64], ranks: usize) -> f64 {
    let per_rank = p.len() / ranks;
    let mut sorted = p.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let lightest = |k: usize| -> f64 { sorted[sorted.len() - k..].iter().sum() };
    let mut bound = sorted.iter().sum::<f64>() / ranks as f64;
    bound = bound.max(sorted[0] + lightest(per_rank - 1));
    if per_rank >= 2 {
        bound = bound.max(sorted[ranks - 1] + sorted[ranks] + lightest(per_rank - 2));
    }
    bound
}

/// Stage 1 for one layer: `p` normalised loads, `start` the heuristic's groups.
pub(crate) fn stage1_layer(
    p: &[f64],
    ranks: usize,
    start: &[usize],
    options: &IlpOptions,
) -> (Vec<usize>, SolveReport) {
    let started = Instant::now();
    let start_objective = max_group_load(p, start, ranks);
    let mut bound = stage1_bound(p, ranks);
    let tol = TOLERANCE * start_objective.max(1.0);
    let finish = |groups: Vec<usize>, objective: f64, bound: f64, outcome: Outcome| {
        let report = SolveReport {
            objective,
            start_objective,
            bound: bound.min(objective),
            outcome,
            seconds: started.elapsed().as_secs_f64(),
        };
        (groups, report)
    };
    if start_objective <= bound + tol || relative_gap(start_objective, bound) <= options.mip_gap {
        return finish(start.to_vec(), start_objective, bound, Outcome::StartProven);
    }
    if options.limit < Duration::from_millis(1) {
        return finish(start.to_vec(), start_objective, bound, Outcome::NoTime);
    }
    let (n, e) = (ranks, p.len());
    let per_rank = e / n;
    // Relabel the start's groups heaviest first so it satisfies T_0 >= T_1 >= ...
    let mut start_load = vec![0.0; n];
    for (i, &g) in start.iter().enumerate() {
        start_load[g] += p[i];
    }
    let mut by_load: Vec<usize> = (0..n).collect();
    by_load.sort_by(|&a, &b| start_load[b].total_cmp(&start_load[a]).then(a.cmp(&b)));
    let mut relabel = vec![0; n];
    for (new, &old) in by_load.iter().enumerate() {
        relabel[old] = new;
    }

    let mut vars = ProblemVariables::new();
    let x: Vec<Vec<Variable>> = (0..e)
        .map(|_| (0..n).map(|_| vars.add(variable().binary())).collect())
        .collect();
    let z = vars.add(variable().min(0.0));
    let load = |c: usize| -> Expression {
        let mut ex = Expression::with_capacity(e);
        for i in 0..e {
            ex.add_mul(p[i], x[i][c]);
        }
        ex
    };
    let mut constraints = Vec::new();
    for row in &x {
        constraints.push(sum(row.iter().copied()).eq(1.0));
    }
    // The last group's count is implied (a redundant equality leaves microlp's basis
    // singular).
    for c in 0..n - 1 {
        constraints.push(sum(x.iter().map(|row| row[c])).eq(per_rank as f64));
    }
    for c in 0..n - 1 {
        constraints.push((load(c) - load(c + 1)).geq(0.0));
    }
    constraints.push((Expression::from(z) - load(0)).geq(0.0));
    let mut warm: Vec<(Variable, f64)> = Vec::with_capacity(e * n + 1);
    for (i, row) in x.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            warm.push((v, (relabel[start[i]] == c) as u8 as f64));
        }
    }
    warm.push((z, start_objective));
    let milp = Milp {
        vars,
        objective: z.into(),
        constraints,
        start: warm,
    };
    let read: Vec<Variable> = x.iter().flatten().copied().collect();
    match solve_milp(milp, &read, options) {
        Err(message) => finish(
            start.to_vec(),
            start_objective,
            bound,
            Outcome::Failed(message),
        ),
        Ok(None) => finish(start.to_vec(), start_objective, bound, Outcome::StartKept),
        Ok(Some(result)) => {
            let groups: Vec<usize> = (0..e)
                .map(|i| argmax(&result.values[i * n..(i + 1) * n]))
                .collect();
            if let Some(b) = result.best_bound {
                bound = bound.max(b);
            }
            let valid = (0..n).all(|c| groups.iter().filter(|&&g| g == c).count() == per_rank);
            let objective = max_group_load(p, &groups, ranks);
            if !valid {
                let message = "the solver's assignment breaks the equal-count constraint".into();
                return finish(
                    start.to_vec(),
                    start_objective,
                    bound,
                    Outcome::Failed(message),
                );
            }
            if result.exact {
                bound = bound.max(objective);
            }
            if objective < start_objective - tol {
                let outcome = if result.proven {
                    Outcome::Optimal
                } else {
                    Outcome::Improved
                };
                finish(groups, objective, bound, outcome)
            } else {
                let outcome = if result.proven {
                    Outcome::Optimal
                } else {
                    Outcome::StartKept
                };
                finish(start.to_vec(), start_objective, bound, outcome)
            }
        }
    }
}

/// Stage 2: group -> rank maps for all layers, from `start`; `c` the group transitions
/// ([L-1][N][N], normalised).
pub(crate) fn stage2(
    instance: &Instance,
    c: &[Vec<Vec<f64>>],
    start: &RankMaps,
    options: &IlpOptions,
) -> (RankMaps, SolveReport) {
    let started = Instant::now();
    let start_objective = stage2_objective(instance, c, start);
    let tol = TOLERANCE * start_objective.max(1.0);
    let finish = |maps: RankMaps, objective: f64, bound: f64, outcome: Outcome| {
        let report = SolveReport {
            objective,
            start_objective,
            bound: bound.clamp(0.0, objective),
            outcome,
            seconds: started.elapsed().as_secs_f64(),
        };
        (maps, report)
    };
    if c.is_empty() || start_objective <= tol {
        return finish(
            start.clone(),
            start_objective,
            start_objective,
            Outcome::StartProven,
        );
    }
    let topology = &instance.topology;
    let n = instance.ranks();
    if topology.is_uniform() {
        let (maps, optimum) = stage2_uniform(c, n, topology.cost(0, 1), &start[0]);
        if start_objective <= optimum + tol {
            return finish(
                start.clone(),
                start_objective,
                optimum,
                Outcome::StartProven,
            );
        }
        let objective = stage2_objective(instance, c, &maps);
        return finish(maps, objective, optimum, Outcome::Exact);
    }
    // Every transition between ranks costs at least the fastest link: the uniform optimum
    // at that cost bounds the optimum from below.
    let fastest = (0..n)
        .flat_map(|g1| (0..n).filter(move |&g2| g2 != g1).map(move |g2| (g1, g2)))
        .map(|(g1, g2)| topology.cost(g1, g2))
        .fold(f64::INFINITY, f64::min);
    let floor = stage2_uniform(c, n, fastest, &start[0]).1;
    let finish = |maps: RankMaps, objective: f64, bound: f64, outcome: Outcome| {
        finish(maps, objective, bound.max(floor), outcome)
    };
    if options.limit < Duration::from_millis(1) {
        return finish(start.clone(), start_objective, 0.0, Outcome::NoTime);
    }
    let layers = start.len();

    let mut vars = ProblemVariables::new();
    // y[l][c][g].
    let y: Vec<Vec<Vec<Variable>>> = (0..layers)
        .map(|_| {
            (0..n)
                .map(|_| (0..n).map(|_| vars.add(variable().binary())).collect())
                .collect()
        })
        .collect();
    let y_expr = |l: usize, grp: usize, g: usize| -> Expression { y[l][grp][g].into() };
    let y_start = |l: usize, grp: usize, g: usize| (start[l][grp] == g) as u8 as f64;
    let mut constraints = Vec::new();
    let mut warm: Vec<(Variable, f64)> = Vec::new();
    for (l, layer) in y.iter().enumerate() {
        for (grp, row) in layer.iter().enumerate() {
            constraints.push(sum(row.iter().copied()).eq(1.0));
            for (g, &v) in row.iter().enumerate() {
                warm.push((v, y_start(l, grp, g)));
            }
        }
        // Every rank holds one group; the last rank's row is implied by the others (and
        // a redundant equality leaves microlp's basis singular).
        for g in 0..n - 1 {
            constraints.push(sum(layer.iter().map(|row| row[g])).eq(1.0));
        }
    }
    let mut objective = Expression::with_capacity(c.len());
    for (b, cb) in c.iter().enumerate() {
        let z = vars.add(variable().min(0.0));
        objective.add_mul(1.0 / c.len() as f64, z);
        let start_time = crate::evaluate::boundary_time(cb, &start[b], &start[b + 1], topology);
        warm.push((z, start_time));
        // Big-M products. Sending side: rows of layer b; receiving side:
        // columns of layer b+1.
        for outgoing in [true, false] {
            for g in 0..n {
                let mut rank_total = Expression::with_capacity(n);
                for grp in 0..n {
                    // a = sum over the other side's groups and ranks; M its largest value.
                    let mut a = Expression::with_capacity(n * n);
                    let mut a_start = 0.0;
                    let mut big_m = 0.0;
                    // Transitions from `grp` (outgoing) or into it, by the other group.
                    let flows: Vec<f64> = if outgoing {
                        cb[grp].clone()
                    } else {
                        cb.iter().map(|row| row[grp]).collect()
                    };
                    for (other, &t) in flows.iter().enumerate() {
                        if t <= 0.0 {
                            continue;
                        }
                        let mut slowest: f64 = 0.0;
                        for g2 in (0..n).filter(|&g2| g2 != g) {
                            let cost = if outgoing {
                                topology.cost(g, g2)
                            } else {
                                topology.cost(g2, g)
                            };
                            slowest = slowest.max(cost);
                            let other_layer = if outgoing { b + 1 } else { b };
                            a.add_mul(t * cost, y_expr(other_layer, other, g2));
                            a_start += t * cost * y_start(other_layer, other, g2);
                        }
                        big_m += t * slowest;
                    }
                    if big_m <= 0.0 {
                        continue;
                    }
                    let own_layer = if outgoing { b } else { b + 1 };
                    let u = vars.add(variable().min(0.0));
                    // u >= a - M (1 - y)
                    constraints.push(
                        (Expression::from(u) - a - big_m * y_expr(own_layer, grp, g)).geq(-big_m),
                    );
                    warm.push((u, y_start(own_layer, grp, g) * a_start));
                    rank_total.add_mul(1.0, u);
                }
                constraints.push((Expression::from(z) - rank_total).geq(0.0));
            }
        }
    }
    let read: Vec<Variable> = y.iter().flatten().flatten().copied().collect();
    let milp = Milp {
        vars,
        objective,
        constraints,
        start: warm,
    };
    match solve_milp(milp, &read, options) {
        Err(message) => finish(
            start.clone(),
            start_objective,
            0.0,
            Outcome::Failed(message),
        ),
        Ok(None) => finish(start.clone(), start_objective, 0.0, Outcome::StartKept),
        Ok(Some(result)) => {
            let mut values = result.values.into_iter();
            let maps: RankMaps = (0..layers)
                .map(|_| {
                    (0..n)
                        .map(|_| {
                            let row: Vec<f64> = values.by_ref().take(n).collect();
                            argmax(&row)
                        })
                        .collect()
                })
                .collect();
            let valid = maps.iter().all(|map| is_permutation(map));
            if !valid {
                let message = "the solver's maps are not permutations".into();
                return finish(
                    start.clone(),
                    start_objective,
                    0.0,
                    Outcome::Failed(message),
                );
            }
            let objective = stage2_objective(instance, c, &maps);
            let mut bound = result.best_bound.unwrap_or(0.0);
            if result.exact {
                bound = bound.max(objective.min(start_objective));
            }
            if objective < start_objective - tol {
                let outcome = if result.proven {
                    Outcome::Optimal
                } else {
                    Outcome::Improved
                };
                finish(maps, objective, bound, outcome)
            } else {
                let outcome = if result.proven {
                    Outcome::Optimal
                } else {
                    Outcome::StartKept
                };
                finish(start.clone(), start_objective, bound, outcome)
            }
        }
    }
}

/// Stage 2 with uniform links (time `unit` per transition), exactly (module docs): per
/// boundary a bottleneck assignment of layer-l groups to layer-(l+1) groups, chained into
/// maps from `first` (layer 0's map). Returns the maps and the optimum (the mean over
/// boundaries of each one's busiest rank).
fn stage2_uniform(c: &[Vec<Vec<f64>>], n: usize, unit: f64, first: &[usize]) -> (RankMaps, f64) {
    let mut maps: RankMaps = vec![first.to_vec()];
    let mut total = 0.0;
    for cb in c {
        let out_of: Vec<f64> = cb.iter().map(|row| row.iter().sum()).collect();
        let into: Vec<f64> = (0..n)
            .map(|c2| cb.iter().map(|row| row[c2]).sum())
            .collect();
        // cost[c1][c2]: the busier direction of the rank holding c1 and then c2.
        let cost: Vec<Vec<f64>> = (0..n)
            .map(|c1| {
                (0..n)
                    .map(|c2| unit * (out_of[c1].max(into[c2]) - cb[c1][c2]))
                    .collect()
            })
            .collect();
        let (pairing, worst) = bottleneck_assignment(&cost);
        total += worst;
        let prev = maps.last().expect("layer 0 is mapped");
        let mut next = vec![0; n];
        for (c1, &c2) in pairing.iter().enumerate() {
            next[c2] = prev[c1];
        }
        maps.push(next);
    }
    let optimum = if c.is_empty() {
        0.0
    } else {
        total / c.len() as f64
    };
    (maps, optimum)
}

/// The permutation `p` minimising `max_i cost[i][p[i]]`, and that maximum: the smallest
/// threshold (over the distinct costs, by bisection) under which the bipartite graph of
/// cheaper pairs still has a perfect matching.
pub fn bottleneck_assignment(cost: &[Vec<f64>]) -> (Vec<usize>, f64) {
    let n = cost.len();
    let mut levels: Vec<f64> = cost.iter().flatten().copied().collect();
    levels.sort_by(f64::total_cmp);
    levels.dedup();
    let (mut lo, mut hi) = (0, levels.len() - 1);
    let mut best = perfect_matching(cost, levels[hi]).expect("the complete graph has one");
    while lo < hi {
        let mid = (lo + hi) / 2;
        match perfect_matching(cost, levels[mid]) {
            Some(m) => {
                best = m;
                hi = mid;
            }
            None => lo = mid + 1,
        }
    }
    let worst = (0..n).map(|i| cost[i][best[i]]).fold(f64::MIN, f64::max);
    (best, worst)
}

/// A perfect matching using only pairs with `cost <= threshold` (augmenting paths), as
/// `row -> column`, or `None`.
fn perfect_matching(cost: &[Vec<f64>], threshold: f64) -> Option<Vec<usize>> {
    let n = cost.len();
    let mut column_of = vec![usize::MAX; n];
    let mut row_of = vec![usize::MAX; n];
    fn augment(
        i: usize,
        cost: &[Vec<f64>],
        threshold: f64,
        seen: &mut [bool],
        column_of: &mut [usize],
        row_of: &mut [usize],
    ) -> bool {
        for j in 0..cost.len() {
            if cost[i][j] > threshold || seen[j] {
                continue;
            }
            seen[j] = true;
            if row_of[j] == usize::MAX
                || augment(row_of[j], cost, threshold, seen, column_of, row_of)
            {
                row_of[j] = i;
                column_of[i] = j;
                return true;
            }
        }
        false
    }
    for i in 0..n {
        let mut seen = vec![false; n];
        if !augment(i, cost, threshold, &mut seen, &mut column_of, &mut row_of) {
            return None;
        }
    }
    Some(column_of)
}

fn sum(vars: impl Iterator<Item = Variable>) -> Expression {
    let mut ex = Expression::default();
    for v in vars {
        ex.add_mul(1.0, v);
    }
    ex
}

fn argmax(values: &[f64]) -> usize {
    (0..values.len())
        .max_by(|&a, &b| values[a].total_cmp(&values[b]).then(b.cmp(&a)))
        .expect("non-empty")
}

fn is_permutation(map: &[usize]) -> bool {
    let mut seen = vec![false; map.len()];
    map.iter()
        .all(|&g| g < seen.len() && !std::mem::replace(&mut seen[g], true))
}
