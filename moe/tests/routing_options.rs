//! The routing options checked directly: the auxiliary-loss-free bias (choice, not weights;
//! the sign rule), group-limited routing against a brute-force choice, sigmoid scores, and
//! the balance losses and z-loss against values computed independently by
//! `scripts/check_balance_losses.py` (from the papers' definitions, in plain Python).
//!
//! Every router here has D = N and an identity gate, so the router logits are the inputs.

use std::process::Command;

use burn::module::Param;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use switchyard_moe::config::{
    BalanceLoss, BiasBalanceConfig, GroupLimitedConfig, MoeConfig, NullInit, NullNormalization,
    RouterConfig, ScoreFunction,
};
use switchyard_moe::init::Initializer;
use switchyard_moe::layer::MoeLayer;
use switchyard_moe::params::named_grads;
use switchyard_moe::router::{Router, RouterCarry, Routing};

fn device() -> Device {
    Device::flex().autodiff()
}

fn cfg(num_experts: usize, top_k: usize) -> MoeConfig {
    MoeConfig {
        num_experts,
        top_k,
        expert_ffn_dim: 4,
        router: RouterConfig::TopKSoftmax {
            normalize_weights: false,
        },
        ..Default::default()
    }
}

/// [N, N] identity: the logits are the inputs.
fn identity(n: usize) -> Param<Tensor<2>> {
    let v: Vec<f32> = (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(v, [n, n]), &device()))
}

fn router(cfg: &MoeConfig) -> Router {
    let mut router = Router::new(
        cfg.num_slots(),
        cfg,
        &mut Initializer::new(3, 0.1, &device()),
    );
    router.w_gate = identity(cfg.num_slots());
    router
}

fn route(router: &Router, logits: &[Vec<f32>]) -> Routing {
    let n = logits[0].len();
    let flat: Vec<f32> = logits.iter().flatten().copied().collect();
    let x = Tensor::<2>::from_data(TensorData::new(flat, [logits.len(), n]), &device());
    router.forward(x, &mut RouterCarry::default(), None)
}

fn values<const R: usize>(t: &Tensor<R>) -> Vec<f32> {
    t.clone()
        .inner()
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32")
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&x| (x as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn sigmoid(x: f32) -> f64 {
    1.0 / (1.0 + (-(x as f64)).exp())
}

#[test]
fn the_bias_changes_which_expert_is_chosen_but_not_its_weight() {
    let mut c = cfg(4, 1);
    c.bias_balance = Some(BiasBalanceConfig { gamma: 0.1 });
    let mut router = router(&c);
    let logits = vec![vec![2.0, 1.9, 0.0, -1.0]];
    let before = route(&router, &logits);
    assert_eq!(before.experts_tk, vec![0]);
    // softmax: p0 ~ 0.49, p1 ~ 0.45; a bias of 0.1 on expert 1 outranks expert 0.
    router.set_bias(vec![0.0, 0.1, 0.0, 0.0]);
    let after = route(&router, &logits);
    assert_eq!(after.experts_tk, vec![1]);
    let p = softmax(&logits[0]);
    let weight = values(&after.weights_tk)[0] as f64;
    assert!(
        (weight - p[1]).abs() < 1e-6,
        "weight {weight} vs p1 {}",
        p[1]
    );
    // The balance-loss probabilities ignore the bias too.
    let probs = values(&after.probs_te);
    for (got, want) in probs.iter().zip(&p) {
        assert!((*got as f64 - want).abs() < 1e-6);
    }
}

#[test]
fn the_bias_moves_by_gamma_towards_the_mean_load() {
    let mut c = cfg(4, 2);
    c.bias_balance = Some(BiasBalanceConfig { gamma: 0.25 });
    let mut router = router(&c);
    assert_eq!(router.bias(), Some(&[0.0f32; 4][..]));
    // mean 6: over-loaded expert 0 goes down, under-loaded expert 1 up, the rest stay.
    router.update_bias(&[10.0, 2.0, 6.0, 6.0], 0.25);
    assert_eq!(router.bias(), Some(&[-0.25f32, 0.25, 0.0, 0.0][..]));
    router.update_bias(&[10.0, 2.0, 7.0, 5.0], 0.25);
    assert_eq!(router.bias(), Some(&[-0.5f32, 0.5, -0.25, 0.25][..]));
}

#[test]
fn null_experts_carry_no_bias() {
    let mut c = cfg(4, 2);
    c.router = RouterConfig::NullExperts {
        num_null: 3,
        normalize: NullNormalization::TrueExperts,
        null_init: NullInit::Random,
        anneal: None,
    };
    c.bias_balance = Some(BiasBalanceConfig { gamma: 0.1 });
    let router = router(&c);
    // One bias per FFN expert only.
    assert_eq!(router.bias().map(<[f32]>::len), Some(4));
    // A bias of -1 on every FFN expert leaves the null slots, which carry none, on top.
    let mut router = router;
    router.set_bias(vec![-1.0; 4]);
    let routing = route(&router, &[vec![0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0]]);
    let mut chosen = routing.experts_tk.clone();
    chosen.sort();
    assert_eq!(
        chosen,
        vec![4, 5],
        "the two best null slots (bias -1 on every expert)"
    );
}

#[test]
fn group_limited_routing_equals_the_brute_force_choice() {
    let (experts, groups, top_groups, k) = (8, 4, 2, 3);
    let mut c = cfg(experts, k);
    c.router = RouterConfig::TopKSoftmax {
        normalize_weights: true,
    };
    c.score = ScoreFunction::Sigmoid;
    c.group_limited = Some(GroupLimitedConfig { groups, top_groups });
    let router = router(&c);
    let x = Tensor::<2>::random([64, experts], Distribution::Normal(0.0, 1.0), &device());
    let logits = values(&x);
    let routing = router.forward(x, &mut RouterCarry::default(), None);
    let per_group = experts / groups;
    for (t, row) in logits.chunks(experts).enumerate() {
        let score: Vec<f64> = row.iter().map(|&l| sigmoid(l)).collect();
        // Every group's two best, summed; the best `top_groups` groups by that.
        let mut group_rank: Vec<(f64, usize)> = (0..groups)
            .map(|g| {
                let mut members: Vec<f64> = score[g * per_group..(g + 1) * per_group].to_vec();
                members.sort_by(|a, b| b.total_cmp(a));
                (members[0] + members[1], g)
            })
            .collect();
        group_rank.sort_by(|a, b| b.0.total_cmp(&a.0));
        let allowed: Vec<usize> = group_rank[..top_groups].iter().map(|&(_, g)| g).collect();
        let mut candidates: Vec<usize> = (0..experts)
            .filter(|e| allowed.contains(&(e / per_group)))
            .collect();
        candidates.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
        let mut want = candidates[..k].to_vec();
        let mut got = routing.experts_tk[t * k..(t + 1) * k].to_vec();
        want.sort();
        got.sort();
        assert_eq!(got, want, "token {t}");
        // Weights: the chosen sigmoid scores normalised over the k chosen.
        let sum: f64 = want.iter().map(|&e| score[e]).sum();
        let weights = values(&routing.weights_tk);
        for (j, &e) in routing.experts_tk[t * k..(t + 1) * k].iter().enumerate() {
            let w = weights[t * k + j] as f64;
            assert!((w - score[e] / sum).abs() < 1e-6, "token {t} expert {e}");
        }
    }
}

#[test]
fn sigmoid_scores_are_normalised_scaled_and_feed_the_balance_loss_normalised() {
    let mut c = cfg(4, 2);
    c.router = RouterConfig::TopKSoftmax {
        normalize_weights: true,
    };
    c.score = ScoreFunction::Sigmoid;
    c.scaling_factor = 2.5;
    let router = router(&c);
    let logits = vec![vec![1.0, -0.5, 0.25, 2.0], vec![-1.0, 0.0, 3.0, 0.5]];
    let routing = route(&router, &logits);
    let weights = values(&routing.weights_tk);
    let probs = values(&routing.probs_te);
    for (t, row) in logits.iter().enumerate() {
        let s: Vec<f64> = row.iter().map(|&l| sigmoid(l)).collect();
        let mut order: Vec<usize> = (0..4).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
        assert_eq!(&routing.experts_tk[t * 2..t * 2 + 2], &order[..2]);
        let chosen: f64 = order[..2].iter().map(|&e| s[e]).sum();
        for j in 0..2 {
            let want = 2.5 * s[order[j]] / chosen;
            assert!((weights[t * 2 + j] as f64 - want).abs() < 1e-6);
        }
        let total: f64 = s.iter().sum();
        for e in 0..4 {
            assert!((probs[t * 4 + e] as f64 - s[e] / total).abs() < 1e-6);
        }
    }
}

/// A layer with an identity router over `experts` slots (D = N) and the given options.
fn layer(c: &MoeConfig) -> MoeLayer {
    let mut layer = MoeLayer::new(c.num_experts, c, &mut Initializer::new(5, 0.1, &device()));
    layer.router.w_gate = identity(c.num_experts);
    layer
}

/// [micro-batch][sequence][token][slot] logits -> one [B, S, N] tensor per micro-batch.
fn micro_batches(logits: &[Vec<Vec<Vec<f32>>>]) -> Vec<Tensor<3>> {
    logits
        .iter()
        .map(|batch| {
            let (b, s, n) = (batch.len(), batch[0].len(), batch[0][0].len());
            let flat: Vec<f32> = batch.iter().flatten().flatten().copied().collect();
            Tensor::from_data(TensorData::new(flat, [b, s, n]), &device())
        })
        .collect()
}

/// The Python script's values for `logits`.
fn python_values(logits: &[Vec<Vec<Vec<f32>>>], k: usize, score: &str) -> serde_json::Value {
    let dir = std::env::temp_dir().join(format!("balance-losses-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join(format!("{score}.json"));
    let spec = serde_json::json!({"logits": logits, "top_k": k, "score": score});
    std::fs::write(&input, spec.to_string()).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/check_balance_losses.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(&input)
        .output()
        .expect("python3 runs (the independent check needs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn scalar(t: &Tensor<1>) -> f64 {
    values(t)[0] as f64
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-6 * want.abs().max(1.0),
        "{what}: {got} vs {want} (Python)"
    );
}

/// Two micro-batches of 3 sequences of 5 tokens over 6 experts, top-2.
fn sample_logits(seed: u64) -> Vec<Vec<Vec<Vec<f32>>>> {
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    };
    (0..2)
        .map(|_| {
            (0..3)
                .map(|_| (0..5).map(|_| (0..6).map(|_| next()).collect()).collect())
                .collect()
        })
        .collect()
}

#[test]
fn balance_losses_and_z_loss_equal_independent_values() {
    for (score, name) in [
        (ScoreFunction::Softmax, "softmax"),
        (ScoreFunction::Sigmoid, "sigmoid"),
    ] {
        let logits = sample_logits(if name == "softmax" { 1 } else { 2 });
        let want = python_values(&logits, 2, name);
        let inputs = micro_batches(&logits);
        let with = |balance_loss| {
            let mut c = cfg(6, 2);
            c.score = score;
            c.balance_loss = balance_loss;
            layer(&c)
        };
        for (m, x) in inputs.iter().enumerate() {
            let batch =
                with(BalanceLoss::Batch).forward(x.clone(), &mut RouterCarry::default(), None);
            close(
                scalar(&batch.load_balance),
                want["batch"][m].as_f64().unwrap(),
                &format!("{name} batch loss, micro-batch {m}"),
            );
            close(
                scalar(&batch.z_loss),
                want["z"][m].as_f64().unwrap(),
                &format!("{name} z-loss, micro-batch {m}"),
            );
            let sequence =
                with(BalanceLoss::Sequence).forward(x.clone(), &mut RouterCarry::default(), None);
            close(
                scalar(&sequence.load_balance),
                want["sequence"][m].as_f64().unwrap(),
                &format!("{name} sequence-wise loss, micro-batch {m}"),
            );
        }
        // Global batch: the step's counts installed, each micro-batch's share, averaged as
        // the trainer averages its micro-batches.
        let mut global = with(BalanceLoss::GlobalBatch);
        let mut counts = vec![0.0; 6];
        for x in &inputs {
            let out = global.forward(x.clone(), &mut RouterCarry::default(), None);
            for (c, s) in counts.iter_mut().zip(&out.stats.slot_counts) {
                *c += s;
            }
        }
        global.set_step_counts(Some(counts));
        let shares: f64 = inputs
            .iter()
            .map(|x| {
                scalar(
                    &global
                        .forward(x.clone(), &mut RouterCarry::default(), None)
                        .load_balance,
                )
            })
            .sum();
        close(
            shares / inputs.len() as f64,
            want["global_batch"].as_f64().unwrap(),
            &format!("{name} global-batch loss"),
        );
    }
}

/// The global-batch loss over two micro-batches has the gradient of the batch loss over
/// both at once (the coefficient means the same whatever the accumulation; Megatron-LM
/// issue 3672 is this scaling gone wrong).
#[test]
fn global_batch_loss_over_micro_batches_has_the_gradient_of_one_big_batch() {
    let logits = sample_logits(3);
    let inputs = micro_batches(&logits);
    let mut c = cfg(6, 2);
    c.balance_loss = BalanceLoss::GlobalBatch;
    let mut global = layer(&c);
    let mut counts = vec![0.0; 6];
    for x in &inputs {
        let out = global.forward(x.clone(), &mut RouterCarry::default(), None);
        for (c, s) in counts.iter_mut().zip(&out.stats.slot_counts) {
            *c += s;
        }
    }
    global.set_step_counts(Some(counts));
    // The trainer's accumulation: each micro-batch's loss / accum, gradients summed.
    let mut accumulated: Option<Vec<f32>> = None;
    for x in &inputs {
        let out = global.forward(x.clone(), &mut RouterCarry::default(), None);
        let loss = out.load_balance / inputs.len() as f32;
        let grads = named_grads(&global, &loss.backward());
        let g = values(&grads["router.w_gate"]);
        accumulated = Some(match accumulated {
            Some(acc) => acc.iter().zip(&g).map(|(a, b)| a + b).collect(),
            None => g,
        });
    }
    let accumulated = accumulated.unwrap();
    c.balance_loss = BalanceLoss::Batch;
    let whole = layer(&c);
    let both = Tensor::cat(inputs.clone(), 0);
    let out = whole.forward(both, &mut RouterCarry::default(), None);
    let grads = named_grads(&whole, &out.load_balance.backward());
    let want = values(&grads["router.w_gate"]);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    for (got, want) in accumulated.iter().zip(&want) {
        assert!(
            (got - want).abs() <= 1e-6 * scale,
            "accumulated {got} vs whole-batch {want}"
        );
    }
}
