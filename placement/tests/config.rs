//! The `placement:` config node: defaults, strictness, validation.

use switchyard_placement::{IlpSolver, PlacementConfig, Strategy};

fn parse(json: &str) -> Result<PlacementConfig, serde_json::Error> {
    serde_json::from_str(json)
}

#[test]
fn defaults_are_contiguous_and_never_rebalance() {
    let cfg = parse("{}").unwrap();
    assert_eq!(cfg, PlacementConfig::default());
    assert_eq!(cfg.strategy, Strategy::Contiguous {});
    assert_eq!(cfg.rebalance_every, 0);
    assert!(cfg.validate().is_empty());
}

#[test]
fn the_ilp_takes_a_time_limit_and_a_solver() {
    let cfg =
        parse(r#"{"strategy": {"type": "ilp", "time_limit_s": 0.5}, "rebalance_every": 100}"#)
            .unwrap();
    assert_eq!(
        cfg.strategy,
        Strategy::Ilp {
            time_limit_s: 0.5,
            mip_gap: 0.01,
            solver: IlpSolver::Microlp
        }
    );
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    let cfg = parse(r#"{"strategy": {"type": "ilp"}}"#).unwrap();
    assert_eq!(cfg.strategy, Strategy::ilp());
}

#[test]
fn unknown_keys_are_rejected() {
    let err = parse(r#"{"strategy": {"type": "ilp", "time_limit": 1}}"#).unwrap_err();
    assert!(err.to_string().contains("time_limit"), "{err}");
    let err = parse(r#"{"rebalance": 10}"#).unwrap_err();
    assert!(err.to_string().contains("rebalance"), "{err}");
    let err = parse(r#"{"strategy": {"type": "heuristic", "time_limit_s": 1}}"#).unwrap_err();
    assert!(err.to_string().contains("time_limit_s"), "{err}");
    assert!(parse(r#"{"strategy": {"type": "greedy"}}"#).is_err());
}

#[test]
fn validation_names_the_key_and_the_fix() {
    let cfg = parse(
        r#"{"strategy": {"type": "ilp", "time_limit_s": -1, "mip_gap": 1.5}, "stats_decay": 1.0}"#,
    )
    .unwrap();
    let issues = cfg.validate();
    let keys: Vec<&str> = issues.iter().map(|(k, _)| k.as_str()).collect();
    assert!(keys.contains(&"strategy.time_limit_s"), "{issues:?}");
    assert!(keys.contains(&"stats_decay"), "{issues:?}");
    assert!(keys.contains(&"strategy.mip_gap"), "{issues:?}");

    let cfg = parse(r#"{"rebalance_every": 50}"#).unwrap();
    let issues = cfg.validate();
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0].0, "rebalance_every");
    assert!(issues[0].1.contains("heuristic or ilp"), "{issues:?}");

    let cfg = parse(r#"{"strategy": {"type": "ilp", "solver": "highs"}}"#).unwrap();
    assert_eq!(cfg.validate().is_empty(), cfg!(feature = "highs"));
}

#[test]
fn the_migration_threshold_has_defaults_and_refuses_non_positive_rates() {
    let cfg = parse("{}").unwrap();
    assert_eq!(cfg.migration.payback_steps, 100);
    assert_eq!(cfg.plan, None);
    let cfg = parse(
        r#"{"plan": "p.json", "migration": {"payback_steps": 0, "link_gb_per_s": 0, "rank_tflop_per_s": -1}}"#,
    )
    .unwrap();
    assert_eq!(cfg.plan.as_deref(), Some(std::path::Path::new("p.json")));
    let issues = cfg.validate();
    let keys: Vec<&str> = issues.iter().map(|(k, _)| k.as_str()).collect();
    assert!(keys.contains(&"migration.link_gb_per_s"), "{issues:?}");
    assert!(keys.contains(&"migration.rank_tflop_per_s"), "{issues:?}");
    assert!(parse(r#"{"migration": {"payback": 3}}"#).is_err());
}
