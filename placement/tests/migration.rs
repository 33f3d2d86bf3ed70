//! The migration threshold (`placement.migration`) and the plan file (`placement.plan`).

use switchyard_placement::{
    ExpertCost, Instance, MigrationConfig, PLAN_FORMAT, PlanFile, PlanFileOut, Strategy, Topology,
    decide, evaluate, plan,
};

/// One layer of 4 experts on 2 ranks; experts 0 and 1 take `hot` tokens each, 2 and 3 one.
fn skewed(hot: f64) -> Instance {
    Instance::new(vec![vec![hot, hot, 1.0, 1.0]], vec![], Topology::uniform(2)).unwrap()
}

fn cfg(payback_steps: u64) -> MigrationConfig {
    MigrationConfig {
        payback_steps,
        ..MigrationConfig::default()
    }
}

/// A d_model 64 x ffn 64 expert: 147 KB to move with its moments, 74 kFLOP per token.
fn expert() -> ExpertCost {
    ExpertCost::swiglu(64, 64, 1)
}

/// Contiguous [0, 0, 1, 1] puts both hot experts on rank 0; [0, 1, 0, 1] balances them.
fn weigh(instance: &Instance, m: &MigrationConfig) -> switchyard_placement::MigrationDecision {
    let before = vec![vec![0, 0, 1, 1]];
    let after = vec![vec![0, 1, 0, 1]];
    decide(
        instance,
        (&before, &evaluate(instance, &before)),
        (&after, &evaluate(instance, &after)),
        &expert(),
        m,
    )
}

#[test]
fn a_plan_that_pays_back_within_the_threshold_migrates() {
    // 1e6 hot tokens per step: balancing saves far more per step than moving 2 experts.
    let d = weigh(&skewed(1e6), &cfg(100));
    assert_eq!(d.moved_experts, 2);
    assert_eq!(d.total_experts, 4);
    assert!((d.moved_bytes - 2.0 * expert().bytes).abs() < 1e-6);
    assert!(d.gain_per_step_s > 0.0);
    let payback = d.payback_steps.unwrap();
    assert!(payback < 1.0, "{d:?}");
    assert!(d.migrate, "{d:?}");
    assert!(d.describe().ends_with("migrate"), "{}", d.describe());
}

#[test]
fn a_plan_that_does_not_pay_back_is_kept() {
    // Nearly balanced: the same two moves save a thousandth of a token per step.
    let d = weigh(&skewed(1.001), &cfg(100));
    let payback = d.payback_steps.unwrap();
    assert!(payback > 100.0, "{d:?}");
    assert!(!d.migrate, "{d:?}");
    assert!(d.describe().ends_with("keep"), "{}", d.describe());
    // The same plan migrates once the threshold admits its payback, and with no threshold.
    let admitted = cfg(payback.ceil() as u64);
    assert!(weigh(&skewed(1.001), &admitted).migrate);
    assert!(weigh(&skewed(1.001), &cfg(0)).migrate);
    // 9 tokens per step off the busiest rank pay back at a CPU's expert GEMM rate, but
    // not when the compute is priced as nearly free (only the all-to-all share is saved).
    assert!(weigh(&skewed(10.0), &cfg(10)).migrate);
    let fast = MigrationConfig {
        rank_tflop_per_s: 1e6,
        ..cfg(10)
    };
    assert!(!weigh(&skewed(10.0), &fast).migrate);
}

#[test]
fn a_plan_without_gain_is_kept_and_one_without_moves_is_never_migrated() {
    // Already balanced: moving experts saves nothing.
    let d = weigh(&skewed(1.0), &cfg(100));
    assert_eq!(d.moved_experts, 2);
    assert!(d.gain_per_step_s.abs() < 1e-15, "{d:?}");
    assert_eq!(d.payback_steps, None);
    assert!(!d.migrate);
    assert!(d.describe().contains("payback never"), "{}", d.describe());
    // The plan is the current placement: nothing to move, even without a threshold.
    let instance = skewed(1e6);
    let same = vec![vec![0, 0, 1, 1]];
    let m = evaluate(&instance, &same);
    let d = decide(&instance, (&same, &m), (&same, &m), &expert(), &cfg(0));
    assert_eq!(d.moved_experts, 0);
    assert!(!d.migrate);
}

#[test]
fn the_cost_scales_with_the_busiest_rank_and_the_links() {
    // Four ranks, every expert moves one rank on: each rank sends one and receives one.
    let instance = Instance::new(vec![vec![1.0; 4]], vec![], Topology::uniform(4)).unwrap();
    let (before, after) = (vec![vec![0, 1, 2, 3]], vec![vec![1, 2, 3, 0]]);
    let m = cfg(100);
    let e = expert();
    let (moved, bytes, cost) =
        switchyard_placement::migration::migration_seconds(&instance, &before, &after, &e, &m);
    assert_eq!(moved, 4);
    assert!((bytes - 4.0 * e.bytes).abs() < 1e-6);
    let one = e.bytes / (m.link_gb_per_s * 1e9);
    assert!((cost - one).abs() < 1e-12 * one.max(1.0), "{cost} vs {one}");
    // Across a 9x slower inter-node link (2 nodes of 2) the moves 1->2 and 3->0 cost 9x.
    let two_level = Instance::new(
        vec![vec![1.0; 4]],
        vec![],
        Topology::two_level(4, 2, 9.0).unwrap(),
    )
    .unwrap();
    let (_, _, slow) =
        switchyard_placement::migration::migration_seconds(&two_level, &before, &after, &e, &m);
    assert!((slow - 9.0 * one).abs() < 1e-9, "{slow} vs {}", 9.0 * one);
}

fn plan_file(dir: &std::path::Path, ranks: usize, strategies: &[Strategy]) -> std::path::PathBuf {
    let instance = Instance::new(
        vec![vec![5.0, 1.0, 1.0, 1.0], vec![1.0, 1.0, 1.0, 5.0]],
        vec![vec![vec![1.0; 4]; 4]],
        Topology::uniform(ranks),
    )
    .unwrap();
    let plans: Vec<_> = strategies
        .iter()
        .map(|s| plan(&instance, s).unwrap())
        .collect();
    let path = dir.join(format!("plan-{ranks}-{}.json", strategies.len()));
    PlanFileOut {
        format: PLAN_FORMAT,
        ep: ranks,
        moe_layers: &[0, 2],
        num_experts: 4,
        stats: "stats.json".into(),
        stats_source: "test",
        plans: &plans,
    }
    .save(&path)
    .unwrap();
    path
}

#[test]
fn a_plan_file_fits_only_its_model_and_ep() {
    let tmp = tempfile::tempdir().unwrap();
    let path = plan_file(tmp.path(), 2, &[Strategy::Heuristic {}]);
    let file = PlanFile::load(&path).unwrap();
    assert_eq!(file.ep, 2);
    assert_eq!(file.moe_layers, vec![0, 2]);
    assert_eq!(file.single().unwrap().strategy, "heuristic");
    assert!(file.check(2, &[0, 2], 4).is_empty());

    let joined = |issues: Vec<String>| issues.join("\n");
    let ep = joined(file.check(4, &[0, 2], 4));
    assert!(
        ep.contains("planned for 2 ep ranks, but parallel.ep is 4"),
        "{ep}"
    );
    assert!(ep.contains("--ranks 4"), "{ep}");
    let experts = joined(file.check(2, &[0, 2], 8));
    assert!(experts.contains("places 4 experts per layer"), "{experts}");
    assert!(experts.contains("num_experts is 8"), "{experts}");
    let layers = joined(file.check(2, &[0, 1], 4));
    assert!(layers.contains("MoE layers [0, 2]"), "{layers}");
    assert!(layers.contains("[0, 1]"), "{layers}");

    // Hand-edited owners: out of range, unequal counts.
    let mut bad = file.clone();
    bad.plans[0].owners[1] = vec![0, 0, 0, 2];
    let range = joined(bad.check(2, &[0, 2], 4));
    assert!(
        range.contains("layer 2: expert 3 is on ep rank 2"),
        "{range}"
    );
    bad.plans[0].owners[1] = vec![0, 0, 0, 1];
    let counts = joined(bad.check(2, &[0, 2], 4));
    assert!(
        counts.contains("layer 2: ep rank 0 holds 3 experts"),
        "{counts}"
    );
    assert!(
        counts.contains("every rank holds num_experts / ep = 2"),
        "{counts}"
    );

    // Several plans: the run must be told which.
    let many = plan_file(
        tmp.path(),
        2,
        &[Strategy::Contiguous {}, Strategy::Heuristic {}],
    );
    let many = joined(PlanFile::load(&many).unwrap().check(2, &[0, 2], 4));
    assert!(
        many.contains("holds 2 plans (contiguous, heuristic)"),
        "{many}"
    );
    assert!(many.contains("--strategy NAME"), "{many}");
}

#[test]
fn files_that_are_not_plans_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let err = |p: &std::path::Path| PlanFile::load(p).unwrap_err().to_string();
    let old = write("old.json", r#"[{"strategy": "ilp", "owners": [[0, 1]]}]"#);
    assert!(err(&old).contains("bare list of plans"), "{}", err(&old));
    let other = write("stats.json", r#"{"format": "switchyard-routing-stats/1"}"#);
    assert!(
        err(&other).contains("format `switchyard-routing-stats/1`"),
        "{}",
        err(&other)
    );
    let text = write("x.json", "not json");
    assert!(err(&text).contains("not JSON"), "{}", err(&text));
    let missing = tmp.path().join("missing.json");
    assert!(
        err(&missing).contains("missing.json: reading"),
        "{}",
        err(&missing)
    );
}
