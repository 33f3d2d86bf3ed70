//! Every fused CPU op (`switchyard_kernels`) equals its burn-op reference: the output and
//! the gradient of every input, within fp32 tolerance, on the autodiff device; and the
//! output on the plain device.

use burn::module::Module;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use switchyard_kernels::{attention, combine, grouped, linear, loss, norm, rope};
use switchyard_moe::attention::causal_attention_reference;
use switchyard_moe::dispatch::DispatchPlan;
use switchyard_moe::dispatch::{gather_rows_reference, scatter_weighted_reference};
use switchyard_moe::experts::SwiGlu;
use switchyard_moe::init::Initializer;
use switchyard_moe::model::{cross_entropy_reference, split_heads_reference};

fn device() -> Device {
    Device::flex().autodiff()
}

fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.clone().inner().into_data().try_to_vec::<f32>().unwrap()
}

fn grad<const D: usize>(t: &Tensor<D>, grads: &burn::tensor::Gradients) -> Vec<f32> {
    t.grad(grads)
        .expect("a gradient")
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: fused {x} vs reference {y} (scale {scale})"
        );
    }
}

fn normal<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

/// Uneven row counts, an expert with no rows, and one expert above the op's row block.
#[test]
fn grouped_experts_match_the_per_expert_reference() {
    let device = device();
    let (d, f) = (24, 40);
    let mut init = Initializer::new(3, 0.2, &device);
    let experts: Vec<SwiGlu> = (0..4).map(|_| SwiGlu::new(d, f, &mut init)).collect();
    let refs: Vec<&SwiGlu> = experts.iter().collect();
    let rows = [5, 0, 300, 17];
    let r: usize = rows.iter().sum();
    let x = normal([r, d], &device).require_grad();
    let probe = normal([r, d], &device);
    let run = |fused: bool| {
        let y = if fused {
            grouped::grouped_swiglu(x.clone(), &refs, &rows)
        } else {
            grouped::grouped_swiglu_reference(x.clone(), &refs, &rows)
        };
        let grads = (y.clone() * probe.clone()).sum().backward();
        let mut out = vec![
            ("y".to_string(), values(&y)),
            ("dx".into(), grad(&x, &grads)),
        ];
        for (e, expert) in experts.iter().enumerate() {
            for (name, w) in [
                ("w_gate", &expert.w_gate),
                ("w_up", &expert.w_up),
                ("w_down", &expert.w_down),
            ] {
                let g = w.val().grad(&grads);
                assert_eq!(
                    g.is_some(),
                    rows[e] > 0,
                    "expert {e} {name}: gradient presence"
                );
                if let Some(g) = g {
                    out.push((format!("{e}.{name}"), g.into_data().try_to_vec().unwrap()));
                }
            }
        }
        out
    };
    let (fast, reference) = (run(true), run(false));
    assert_eq!(fast.len(), reference.len());
    for ((name, a), (_, b)) in fast.iter().zip(&reference) {
        assert_close(name, a, b, 1e-5);
    }
    // The plain device computes the same forward.
    let plain: Vec<SwiGlu> = experts.iter().map(|e| e.clone().valid()).collect();
    let plain_refs: Vec<&SwiGlu> = plain.iter().collect();
    let y = grouped::grouped_swiglu(x.clone().inner(), &plain_refs, &rows);
    assert_close(
        "plain y",
        &y.into_data().try_to_vec::<f32>().unwrap(),
        &reference[0].1,
        1e-5,
    );
}

#[test]
fn gather_and_combine_match_the_reference() {
    let device = device();
    let (t, k, d) = (9, 2, 8);
    // Token t's choices: rows grouped by expert as a plan orders them.
    let token: Vec<i64> = vec![3, 0, 7, 7, 1, 8, 2, 0, 5, 4, 6, 3];
    let assignment: Vec<i64> = token
        .iter()
        .enumerate()
        .map(|(r, &tok)| tok * k as i64 + (r % 2) as i64)
        .collect();
    let plan = DispatchPlan {
        row_token: token.clone(),
        row_assignment: assignment.clone(),
        rows_per_expert: vec![5, 7],
        num_tokens: t,
    };
    let x = normal([t, d], &device).require_grad();
    let weights = normal([t, k], &device).require_grad();
    let probe_rows = normal([token.len(), d], &device);
    let probe = normal([t, d], &device);
    let run = |fused: bool| {
        let rows = if fused {
            combine::gather_rows(&x, &token).unwrap()
        } else {
            gather_rows_reference(x.clone(), &token)
        };
        // Some per-row work between gather and combine, so the row gradient is not trivial.
        let out = rows.clone() * probe_rows.clone();
        let y = if fused {
            combine::combine_rows(&out, &weights, &token, &assignment, t).unwrap()
        } else {
            scatter_weighted_reference(out, weights.clone(), &plan)
        };
        let grads = (y.clone() * probe.clone()).sum().backward();
        vec![
            values(&rows),
            values(&y),
            grad(&x, &grads),
            grad(&weights, &grads),
        ]
    };
    let (fast, reference) = (run(true), run(false));
    for (i, name) in ["rows", "y", "dx", "dweights"].iter().enumerate() {
        assert_close(name, &fast[i], &reference[i], 1e-5);
    }
}

#[test]
fn attention_matches_the_reference() {
    // 17: one block; 150: the causal loops' blocks of 64 rows, the last one partial.
    for s in [17, 150] {
        attention_matches_the_reference_at(s);
    }
}

fn attention_matches_the_reference_at(s: usize) {
    let device = device();
    let shape = [2, 3, s, 8];
    let (q, k) = (
        normal(shape, &device).require_grad(),
        normal(shape, &device).require_grad(),
    );
    // v: [B, S, H, Dh], viewed as [B, H, S, Dh].
    let v = normal([2, s, 3, 8], &device).require_grad();
    let probe = normal(shape, &device);
    let run = |fused: bool| {
        // A strided view, as the model's heads are.
        let v_view = v.clone().swap_dims(1, 2);
        let out = if fused {
            attention::causal_attention(&q, &k, &v_view).unwrap()
        } else {
            causal_attention_reference(q.clone(), k.clone(), v_view.clone())
        };
        let grads = (out.clone() * probe.clone()).sum().backward();
        vec![
            values(&out),
            grad(&q, &grads),
            grad(&k, &grads),
            grad(&v, &grads),
        ]
    };
    let (fast, reference) = (run(true), run(false));
    for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
        assert_close(&format!("{name} (S = {s})"), &fast[i], &reference[i], 1e-5);
    }
}

#[test]
fn cross_entropy_matches_the_reference() {
    let device = device();
    let (b, s, v) = (2, 5, 300);
    let logits = (normal([b, s, v], &device) * 3.0).require_grad();
    let ids: Vec<i64> = (0..b * s).map(|i| (i * 37 % v) as i64).collect();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
    let run = |fused: bool| {
        let loss = if fused {
            loss::cross_entropy(
                &logits.clone().reshape([b * s, v]),
                &targets.clone().reshape([b * s]),
            )
            .unwrap()
        } else {
            cross_entropy_reference(logits.clone(), targets.clone())
        };
        let grads = (loss.clone() * 1.7).backward();
        vec![values(&loss), grad(&logits, &grads)]
    };
    let (fast, reference) = (run(true), run(false));
    assert_close("loss", &fast[0], &reference[0], 1e-5);
    assert_close("dlogits", &fast[1], &reference[1], 1e-5);
}

#[test]
fn linear_matches_matmul() {
    let device = device();
    // More rows than one block, and a transposed (strided) weight as a tied head has.
    let x = normal([70, 12], &device).require_grad();
    let w = normal([9, 12], &device).require_grad();
    let probe = normal([70, 9], &device);
    let run = |fused: bool| {
        let w_t = w.clone().transpose();
        let y = if fused {
            linear::linear(x.clone(), w_t)
        } else {
            x.clone().matmul(w_t)
        };
        let grads = (y.clone() * probe.clone()).sum().backward();
        vec![values(&y), grad(&x, &grads), grad(&w, &grads)]
    };
    let (fast, reference) = (run(true), run(false));
    for (i, name) in ["y", "dx", "dw"].iter().enumerate() {
        assert_close(name, &fast[i], &reference[i], 1e-5);
    }
}

#[test]
fn rms_norm_matches_the_reference() {
    let device = device();
    let (n, d) = (150, 16);
    let x = normal([n, d], &device).require_grad();
    let gamma = (normal([d], &device) * 0.3 + 1.0).require_grad();
    let probe = normal([n, d], &device);
    let run = |fused: bool| {
        let y = if fused {
            norm::rms_norm(&x, &gamma, 1e-5).unwrap()
        } else {
            let rms = (x.clone().powi_scalar(2).mean_dim(1) + 1e-5).sqrt();
            x.clone() / rms * gamma.clone().unsqueeze::<2>()
        };
        let grads = (y.clone() * probe.clone()).sum().backward();
        vec![values(&y), grad(&x, &grads), grad(&gamma, &grads)]
    };
    let (fast, reference) = (run(true), run(false));
    for (i, name) in ["y", "dx", "dgamma"].iter().enumerate() {
        assert_close(name, &fast[i], &reference[i], 1e-5);
    }
}

#[test]
fn heads_split_with_rope_and_merge_match_the_reference() {
    let device = device();
    let (b, s, h, dh) = (2, 5, 3, 4);
    let tables = rope::RopeTables {
        cos: (0..s * dh / 2).map(|i| (i as f32 * 0.3).cos()).collect(),
        sin: (0..s * dh / 2).map(|i| (i as f32 * 0.3).sin()).collect(),
    };
    let x = normal([b, s, h * dh], &device).require_grad();
    let probe = normal([b, s, h * dh], &device);
    // Scales the heads differently, so the merge's gradient is not the split's inverse of
    // a constant.
    let head_scale = normal([1, h, 1, 1], &device);
    for with_rope in [true, false] {
        let tables = with_rope.then_some(&tables);
        let run = |fused: bool| {
            let split = if fused {
                rope::split_heads(&x, h, tables).unwrap()
            } else {
                split_heads_reference(x.clone(), h, tables)
            };
            let scaled = split.clone() * head_scale.clone();
            let merged = if fused {
                rope::merge_heads(&scaled).unwrap()
            } else {
                merge_heads_reference(scaled)
            };
            let grads = (merged.clone() * probe.clone()).sum().backward();
            vec![values(&split), values(&merged), grad(&x, &grads)]
        };
        let (fast, reference) = (run(true), run(false));
        for (i, name) in ["split", "merged", "dx"].iter().enumerate() {
            assert_close(
                &format!("{name} (rope {with_rope})"),
                &fast[i],
                &reference[i],
                1e-6,
            );
        }
    }
}

fn merge_heads_reference(y_bhsd: Tensor<4>) -> Tensor<3> {
    let [b, h, s, dh] = y_bhsd.dims();
    y_bhsd.swap_dims(1, 2).reshape([b, s, h * dh])
}
