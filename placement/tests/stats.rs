//! Routing statistics: counts from a real forward pass, transitions, the moving average,
//! the all-reduce layout and the JSON file.

use burn::tensor::{Device, Int, Tensor, TensorData};
use switchyard_moe::{ModelConfig, MoeStats, Transformer};
use switchyard_placement::{BatchCounts, RoutingStats, Topology};

fn stats(experts: usize, top_k: usize, dispatched: &[Option<u32>]) -> MoeStats {
    MoeStats {
        expert_fraction: vec![0.0; experts],
        top_k,
        dispatched_tk: dispatched.to_vec(),
        ..MoeStats::default()
    }
}

#[test]
fn counts_and_transitions_of_hand_made_routing() {
    // 3 tokens, top-2, 4 experts; token 2's second choice in layer 1 was dropped.
    let l0 = stats(
        4,
        2,
        &[Some(0), Some(1), Some(2), Some(3), Some(0), Some(3)],
    );
    let l1 = stats(4, 2, &[Some(1), Some(2), Some(1), Some(0), Some(3), None]);
    let counts = BatchCounts::from_moe_stats(&[(0, l0), (2, l1)]).unwrap();
    assert_eq!(counts.moe_layers, vec![0, 2]);
    assert_eq!(
        counts.tokens,
        vec![vec![2.0, 1.0, 1.0, 2.0], vec![1.0, 2.0, 1.0, 1.0]]
    );
    let mut expected = vec![vec![0.0; 4]; 4];
    // token 0: {0, 1} -> {1, 2}, weight 1/2 each pair
    for i in [0, 1] {
        for j in [1, 2] {
            expected[i][j] += 0.5;
        }
    }
    // token 1: {2, 3} -> {1, 0}
    for i in [2, 3] {
        for j in [1, 0] {
            expected[i][j] += 0.5;
        }
    }
    // token 2: {0, 3} -> {3} (one dispatched choice: weight 1)
    expected[0][3] += 1.0;
    expected[3][3] += 1.0;
    assert_eq!(counts.transitions, vec![expected]);
}

#[test]
fn flat_layout_round_trips() {
    let l0 = stats(2, 1, &[Some(0), Some(1), Some(1)]);
    let l1 = stats(2, 1, &[Some(1), Some(1), Some(0)]);
    let mut counts = BatchCounts::from_moe_stats(&[(0, l0), (1, l1)]).unwrap();
    let flat = counts.as_flat();
    assert_eq!(flat.len(), 2 * 2 + 4);
    let doubled: Vec<f64> = flat.iter().map(|x| 2.0 * x).collect();
    counts.set_flat(&doubled).unwrap();
    assert_eq!(counts.as_flat(), doubled);
    assert_eq!(counts.tokens[0], vec![2.0, 4.0]);
    assert!(counts.set_flat(&doubled[1..]).is_err());
}

#[test]
fn moving_average_and_file_round_trip() {
    let a = BatchCounts::from_moe_stats(&[
        (0, stats(2, 1, &[Some(0), Some(0)])),
        (1, stats(2, 1, &[Some(1), Some(1)])),
    ])
    .unwrap();
    let b = BatchCounts::from_moe_stats(&[
        (0, stats(2, 1, &[Some(1), Some(1)])),
        (1, stats(2, 1, &[Some(0), Some(0)])),
    ])
    .unwrap();
    let mut avg = RoutingStats::new(0.75).unwrap();
    avg.record(&a).unwrap();
    assert_eq!(avg.tokens[0], vec![2.0, 0.0]);
    avg.record(&b).unwrap();
    assert_eq!(avg.records, 2);
    assert_eq!(avg.tokens[0], vec![1.5, 0.5]);
    assert_eq!(avg.transitions[0], vec![vec![0.0, 1.5], vec![0.5, 0.0]]);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stats.json");
    avg.save(&path).unwrap();
    assert_eq!(RoutingStats::load(&path).unwrap(), avg);
    let instance = avg.instance(Topology::uniform(2)).unwrap();
    assert_eq!(instance.loads, avg.tokens);

    // Mismatched layouts and damaged files are rejected.
    let other = BatchCounts::from_moe_stats(&[(0, stats(2, 1, &[Some(0)]))]).unwrap();
    assert!(avg.record(&other).is_err());
    std::fs::write(&path, r#"{"format": "other"}"#).unwrap();
    assert!(RoutingStats::load(&path).is_err());
    assert!(RoutingStats::new(1.0).is_err());
}

fn model_config(router: &str, capacity: &str) -> ModelConfig {
    serde_json::from_str(&format!(
        r#"{{"vocab_size": 32, "d_model": 16, "n_heads": 2, "n_layers": 3, "ffn_dim": 32,
            "max_seq_len": 16,
            "moe": {{"num_experts": 8, "top_k": 2, "expert_ffn_dim": 8,
                    "router": {router}, "capacity": {capacity}}}}}"#
    ))
    .unwrap()
}

fn forward(cfg: &ModelConfig) -> Vec<(usize, MoeStats)> {
    let device = Device::flex();
    let model = Transformer::new(cfg, 5, &device);
    let (b, s) = (3, 16);
    let tokens: Vec<i64> = (0..b * s).map(|i| (i * 7 % 32) as i64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(tokens, [b, s]), &device);
    model.forward(tokens).moe_stats
}

#[test]
fn a_real_forward_reports_every_dispatched_choice() {
    let cfg = model_config(r#"{"type": "top_k_softmax"}"#, r#"{"type": "dropless"}"#);
    let moe_stats = forward(&cfg);
    assert_eq!(moe_stats.len(), 3);
    let t = 3 * 16;
    for (_, s) in &moe_stats {
        assert_eq!(s.top_k, 2);
        assert_eq!(s.dispatched_tk.len(), t * 2);
        // Dropless vanilla routing: every choice is dispatched, and the counts are the
        // fractions the metrics report.
        for (e, f) in s.expert_fraction.iter().enumerate() {
            let n = s
                .dispatched_tk
                .iter()
                .filter(|&&x| x == Some(e as u32))
                .count();
            assert!((n as f64 / (2 * t) as f64 - f).abs() < 1e-12);
        }
        // The two choices of a token are different experts.
        for token in s.dispatched_tk.chunks(2) {
            assert_ne!(token[0], token[1]);
        }
    }
    let counts = BatchCounts::from_moe_stats(&moe_stats).unwrap();
    for (l, matrix) in counts.transitions.iter().enumerate() {
        // Rows sum to the tokens of the expert (every token goes on to two FFN experts).
        for (i, row) in matrix.iter().enumerate() {
            let sum: f64 = row.iter().sum();
            assert!((sum - counts.tokens[l][i]).abs() < 1e-9);
        }
    }
}

#[test]
fn null_experts_and_dropped_choices_are_not_dispatched() {
    let cfg = model_config(
        r#"{"type": "null_experts", "num_null": 8}"#,
        r#"{"type": "drop", "factor": 0.5}"#,
    );
    let moe_stats = forward(&cfg);
    let t = 3 * 16;
    for (_, s) in &moe_stats {
        let dispatched = s.dispatched_tk.iter().flatten().count();
        assert!(s.dispatched_tk.iter().flatten().all(|&e| e < 8));
        // Kept FFN choices are exactly what the layer reports as FFN experts per token.
        assert!((dispatched as f64 / t as f64 - s.ffn_experts_per_token).abs() < 1e-12);
        assert!(dispatched < 2 * t, "some choices must be null or dropped");
    }
}
