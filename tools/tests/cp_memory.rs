//! Activation memory per rank for a fixed total sequence at cp = 1, 2, 4: what the
//! autograd graph keeps between forward and backward ("saved"), and the peak above the
//! inputs during forward + backward ("peak"), measured with a counting global allocator.
//! Printed as a table; the saved bytes must fall as 1/cp (within 25%).
//!
//! Two workloads: context attention alone (q, k, v of the rank's shard -> output, loss,
//! backward), and a whole training step of a small MoE transformer (`parallelize_with`;
//! at cp = 1 both the model's dense attention and the one-rank ring are shown).
//!
//! The ranks are threads of this process, so the allocator sees all of them: the figures
//! are the whole world's bytes divided by cp. "saved" is read at a quiescent point (every
//! rank between forward and backward, behind barriers), and zigzag gives every rank the
//! same shapes, so it is exactly the per-rank figure. "peak" is the world's peak / cp,
//! i.e. the average rank's peak if the ranks' peaks coincide (a lower bound otherwise).
//! This test is alone in its binary, so no other test allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Device, Int, Tensor, TensorData};
use switchyard_comm::Communicator;
use switchyard_moe::config::CapacityConfig;
use switchyard_moe::{ModelConfig, MoeConfig, RouterConfig, Transformer, cross_entropy};
use switchyard_parallel::{
    CpAlgorithm, CpAttention, CpConfig, ExpertPlacement, LossScale, Mesh, MeshShape, SeqLayout,
    Sharding, apply_layout, shard_sequence,
};
use switchyard_tools::cp_conformance::shard;
use switchyard_tools::run_world;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards its arguments unchanged to System and returns System's result, so
// System's guarantees hold; the counters are atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `layout` satisfies alloc's contract (our caller's duty), forwarded unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from System, with `layout` (dealloc's
        // contract).
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr`/`layout` came from System via this allocator and `new_size` is valid
        // (realloc's contract).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = new_size - layout.size();
                let live = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// World bytes: (saved between forward and backward, peak during forward + backward),
/// both above the live bytes once the inputs exist.
#[derive(Debug, Clone, Copy)]
struct Bytes {
    saved: usize,
    peak: usize,
}

/// A rank's step: builds its inputs, calls `mark()` (the baseline), runs the forward,
/// calls `mark()` (saved), runs the backward and returns.
type Step = Box<dyn FnMut(&dyn Fn())>;

/// Runs the step that `setup(comm)` returns on `cp` ranks: once to warm up (thread-local
/// scratch of the GEMM kernels, the rayon pool, mailboxes are kept after first use), then
/// measured.
fn measure(cp: usize, setup: impl Fn(Box<dyn Communicator>) -> Step + Sync) -> Bytes {
    let marks = std::sync::Mutex::new(Vec::<(usize, usize)>::new());
    let barrier = std::sync::Barrier::new(cp);
    run_world(cp, |comm| {
        let rank = comm.rank();
        let mut step = setup(comm);
        step(&|| ());
        let mark = || {
            barrier.wait();
            if rank == 0 {
                let live = LIVE.load(Ordering::SeqCst);
                marks
                    .lock()
                    .unwrap()
                    .push((live, PEAK.load(Ordering::SeqCst)));
                PEAK.store(live, Ordering::SeqCst);
            }
            barrier.wait();
        };
        step(&mark);
        mark();
    });
    let m = marks.into_inner().unwrap();
    assert_eq!(m.len(), 3, "two marks inside the step and one after it");
    let (base, _) = m[0];
    Bytes {
        saved: m[1].0.saturating_sub(base),
        peak: m[1].1.max(m[2].1).saturating_sub(base),
    }
}

const SEQ: usize = 512;

fn attention_only(cp: usize) -> Bytes {
    let (b, h, dh) = (1, 4, 32);
    measure(cp, |comm| {
        let rank = comm.rank();
        let attn = CpAttention::new(Arc::from(comm), Sharding::Zigzag, CpAlgorithm::Ring);
        Box::new(move |mark: &dyn Fn()| {
            let device = Device::flex().autodiff();
            let full = |seed: f32| {
                let n = b * h * SEQ * dh;
                let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
                Tensor::<4>::from_data(TensorData::new(v, [b, h, SEQ, dh]), &device)
            };
            let local = |seed| shard(full(seed), &attn, rank).require_grad();
            let (q, k, v) = (local(0.1), local(0.2), local(0.3));
            mark();
            let loss = switchyard_parallel::cp::context_attention(q, k, v, &attn)
                .expect("attention")
                .sum();
            mark();
            drop(loss.backward());
        })
    })
}

fn model_cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        d_model: 64,
        n_heads: 4,
        n_layers: 2,
        ffn_dim: 128,
        max_seq_len: SEQ,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        init_std: 0.02,
        attention: Default::default(),
        moe: MoeConfig {
            every: 1,
            num_experts: 4,
            top_k: 2,
            expert_ffn_dim: 64,
            router: RouterConfig::TopKSoftmax {
                normalize_weights: true,
            },
            capacity: CapacityConfig::Dropless {},
            shared_expert: None,
            load_balance_coef: 0.01,
            z_loss_coef: 0.001,
            ..Default::default()
        },
    }
}

/// A training step of the model on one sequence of SEQ tokens. `ring_at_one`: at cp = 1,
/// use the one-rank ring instead of the model's dense attention.
fn model_step(cp: usize, ring_at_one: bool) -> Bytes {
    let cfg = model_cfg();
    measure(cp, |comm| {
        let cfg = cfg.clone();
        let device = Device::flex().autodiff();
        let mesh = Mesh::with_shape(comm, MeshShape { dp: 1, cp, ep: 1 }, 4).expect("mesh");
        let cp_config = CpConfig::default();
        let placement = ExpertPlacement::contiguous(4, 1).expect("placement");
        let mut model = apply_layout(
            Transformer::new(&cfg, 1, &device),
            &mesh,
            &placement,
            &cp_config,
        )
        .expect("parallelize");
        if cp == 1 && ring_at_one {
            model = model.with_attention(Arc::new(CpAttention::for_mesh(&mesh, &cp_config)));
        }
        let tokens: Vec<i64> = (0..=SEQ as i64).map(|t| (t * 7) % 64).collect();
        Box::new(move |mark: &dyn Fn()| {
            let batch = |range: std::ops::Range<usize>| {
                let data = TensorData::new(tokens[range].to_vec(), [1, SEQ]);
                Tensor::<2, Int>::from_data(data, &device)
            };
            let layout = SeqLayout::zigzag(cp);
            let rank = mesh.cp_rank();
            let inputs = shard_sequence(batch(0..SEQ), &layout, rank).expect("inputs");
            let targets = shard_sequence(batch(1..SEQ + 1), &layout, rank).expect("targets");
            let scale = LossScale::new(&mesh, SEQ / cp).expect("token counts");
            mark();
            let out = model.forward(inputs);
            let loss = cross_entropy(out.logits.clone(), targets) * scale.ce_weight()
                + out.aux_loss(&cfg, 0);
            drop(out);
            mark();
            drop(loss.backward());
        })
    })
}

/// Bytes the grouped expert op saves for its backward that are parameters, not
/// activations: every expert's three weight matrices, stacked once per MoE layer (all
/// experts receive tokens at this size). Zero on the burn-op reference path.
fn stacked_expert_weights(cfg: &ModelConfig) -> usize {
    if !switchyard_kernels::fused(switchyard_kernels::Fused::GroupedExperts) {
        return 0;
    }
    let moe_layers = cfg.n_layers / cfg.moe.every;
    let per_expert = 3 * cfg.d_model * cfg.moe.expert_ffn_dim * std::mem::size_of::<f32>();
    moe_layers * cfg.moe.num_experts * per_expert
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

#[test]
fn activation_memory_per_rank_falls_as_one_over_cp() {
    println!("activation memory per rank, total sequence {SEQ} tokens (world bytes / cp)");
    println!("| workload | cp | saved MiB | saved / cp=1 | peak MiB | peak / cp=1 |");
    println!("|---|---|---|---|---|---|");
    type Workload = Box<dyn Fn(usize) -> Bytes>;
    let weights = stacked_expert_weights(&model_cfg());
    let workloads: [(&str, usize, Workload); 3] = [
        ("ring attention (B1 H4 Dh32)", 0, Box::new(attention_only)),
        (
            "model step, ring attention",
            weights,
            Box::new(|cp| model_step(cp, true)),
        ),
        (
            "model step, dense at cp=1",
            weights,
            Box::new(|cp| model_step(cp, false)),
        ),
    ];
    println!(
        "(model steps: saved bytes exclude the {:.2} MiB per rank of stacked expert weights, \
         which do not depend on the sequence)",
        mib(weights)
    );
    for (name, fixed, run) in workloads {
        let activations = |got: Bytes, cp: usize| Bytes {
            saved: got.saved.saturating_sub(fixed * cp),
            peak: got.peak,
        };
        let base = activations(run(1), 1);
        for cp in [1usize, 2, 4] {
            let got = if cp == 1 {
                base
            } else {
                activations(run(cp), cp)
            };
            let (saved, peak) = (got.saved / cp, got.peak / cp);
            println!(
                "| {name} | {cp} | {:.2} | {:.3} | {:.2} | {:.3} |",
                mib(saved),
                saved as f64 / base.saved as f64,
                mib(peak),
                peak as f64 / base.peak as f64
            );
            if cp > 1 {
                assert!(
                    saved as f64 <= 1.25 * base.saved as f64 / cp as f64,
                    "{name}: saved bytes per rank at cp={cp}: {saved} vs {} at cp=1",
                    base.saved
                );
            }
        }
    }
}
