//! Context-parallel attention step (forward + backward of one long causal sequence) at
//! cp = 1, 2, 4, 8: ring attention vs TokenRing, with compute time, communication time and
//! how much of the communication the schedule hides.
//!
//! ```sh
//! cargo run --release -p switchyard-tools --bin cp-bench -- \
//!     [--seq 4096] [--heads 4] [--head-dim 64] [--batch 1] [--ranks 1,2,4,8] \
//!     [--latency-us 10] [--bandwidth-gbps 1,10] [--reps 3]
//! ```
//!
//! # Honest compute on a small machine: measure, record, replay
//!
//! The ranks are threads of one process (`LocalWorld`). With 8 ranks on 2 cores, ranks that
//! compute at the same time slow each other down, and a wall-clock step (e.g. `LocalWorld`
//! with a sleeping `LinkModel`) would measure the oversubscribed machine, not the schedule.
//! So the benchmark separates the two:
//! 1. **Measure.** The real algorithm runs on `W` threads over `LocalWorld` (no link model:
//!    the data really moves, instantly). Each emulated machine is one core: a rank runs
//!    inside its own one-thread rayon pool, so its tensor kernels run on its own thread,
//!    and a compute segment (the work between two communication calls) is charged the CPU
//!    time of that thread (Linux `/proc/thread-self/schedstat`; wall time where that is
//!    unavailable). CPU time does not grow when other processes share the cores (this
//!    machine is shared), and a rank computes only while it holds the process's single
//!    CPU token, which it gives up whenever it blocks in `wait`, so the ranks do not
//!    compete for caches either. Each rank records its trace: compute segments, sends
//!    (peer, tag, bytes), waits. The algorithms never branch on timing, so the trace is
//!    the schedule itself. (Recording and replay are `switchyard_tools::trace`, shared
//!    with `ep-overlap-bench` and `placement-step-bench`.)
//! 2. **Replay.** The traces are replayed on per-rank virtual clocks with the local
//!    backend's `LinkModel` cost (latency + bytes / bandwidth per message): a message sent
//!    at `t` arrives at `max(t, link free) + cost`; messages on one directed link queue
//!    (a fully connected network of full-duplex links, as NVLink/NVSwitch, the setting
//!    TokenRing targets); waiting for a receive (or for a send to be delivered) moves the
//!    clock to the arrival. The same traces are also replayed with free links (cost 0).
//!
//! Reported, for the rank that finishes last: step time; its compute; "comm", the summed
//! link cost of the messages it received (what it would pay with no overlap at all);
//! "exposed", step time minus the step time with free links (the communication the
//! schedule did not hide; waiting for slower peers is not counted); hidden =
//! 1 - exposed / comm. "Efficiency" is the summed compute of all ranks over W x step.
//! Each configuration is measured `--reps` times; the traces of the repetitions have the
//! same events, and each compute segment keeps its shortest measurement (on a shared
//! machine, noise only ever adds time: preemption, a busy sibling hyperthread). Every link
//! model is replayed from the same combined traces, so the columns of one row, and the
//! rows of one configuration under different links, compare like with like.
//!
//! cp = 1 is the same operation on one rank: one N x N tile (N = S), which materialises
//! the S x S scores; blockwise tiles at cp > 1 are smaller and cache-friendlier, so speedups
//! over cp = 1 can exceed cp. The efficiency column does not depend on that baseline.
//!
//! Shape legend: B batch, H heads, S sequence, N = S / W local tokens, Dh head dim.

use std::sync::Arc;
use std::time::Duration;

use burn::tensor::{Device, Tensor, TensorData};
use clap::Parser;
use switchyard_comm::{Communicator, LinkModel, LocalWorld};
use switchyard_parallel::cp::{CpAlgorithm, CpAttention, Sharding, context_attention};
use switchyard_tools::clock::thread_cpu_time;
use switchyard_tools::trace::{Event, fastest, replay, run_ranks};

/// Context-parallel attention step (forward + backward of one causal sequence, zigzag
/// sharding) at each rank count: ring attention vs TokenRing, compute measured per rank and
/// communication replayed with a link model, one table per bandwidth.
#[derive(Parser, Debug, Clone)]
#[command(name = "cp-bench")]
struct Args {
    /// Sequence length S (a multiple of 2 x every rank count).
    #[arg(long, default_value_t = 4096)]
    seq: usize,
    /// Attention heads H.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Head dimension Dh.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Batch B (sequences).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Rank counts (cp degrees), comma-separated; ring and TokenRing at each (one rank: the
    /// baseline).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    ranks: Vec<usize>,
    /// Link latency per message, microseconds.
    #[arg(long, default_value_t = 10.0)]
    latency_us: f64,
    /// Link bandwidths, Gbit/s per direction per peer, comma-separated: one table each.
    #[arg(
        long = "bandwidth-gbps",
        value_name = "GBPS",
        value_delimiter = ',',
        default_value = "1,10"
    )]
    bandwidths_gbps: Vec<f64>,
    /// Measurements per configuration (at least 1); each compute segment keeps its fastest.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

/// Deterministic inputs in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Measures one attention step (forward + backward) on `w` ranks: the per-rank traces.
fn measure(args: &Args, w: usize, algorithm: CpAlgorithm) -> Vec<Vec<Event>> {
    let (b, h, dh) = (args.batch, args.heads, args.head_dim);
    let n = args.seq / w;
    let comms = LocalWorld::new(w, Duration::from_secs(600), None);
    // One machine = one core: each rank's kernels run on its own one-thread pool.
    run_ranks(comms, |world, rec| {
        let rank = world.rank();
        let comm: Arc<dyn Communicator> = Arc::from(world);
        let attn = CpAttention::new(comm.clone(), Sharding::Zigzag, algorithm);
        let device = Device::flex().autodiff();
        let input = |seed: u64| {
            let data = values(b * h * n * dh, seed * 64 + rank as u64);
            Tensor::<4>::from_data(TensorData::new(data, [b, h, n, dh]), &device)
        };
        let (q, k, v, g) = (
            input(1).require_grad(),
            input(2).require_grad(),
            input(3).require_grad(),
            input(4),
        );
        let step = || {
            let out = context_attention(q.clone(), k.clone(), v.clone(), &attn).expect("attention");
            let grads = (out * g.clone()).sum().backward();
            q.grad(&grads).expect("dq")
        };
        // Warm-up (thread pools, kernel scratch, mailboxes), not recorded.
        drop(step());
        comm.barrier().expect("barrier");
        rec.start();
        let dq = step();
        let trace = rec.stop();
        drop(dq);
        comm.barrier().expect("barrier");
        trace
    })
}

/// The row of one configuration on one link, from its traces.
#[derive(Debug, Clone, Copy)]
struct Row {
    step: f64,
    compute: f64,
    comm: f64,
    exposed: f64,
    efficiency: f64,
    mib_sent: f64,
}

fn row(traces: &[Vec<Event>], link: LinkModel) -> Row {
    let w = traces.len();
    let real = replay(traces, Some(link));
    let free = replay(traces, None);
    let last = real.last();
    let step = real.end[last];
    Row {
        step,
        compute: real.compute[last],
        comm: real.comm[last],
        exposed: (step - free.step()).max(0.0),
        efficiency: real.compute.iter().sum::<f64>() / (w as f64 * step),
        mib_sent: real.sent.iter().copied().max().unwrap_or(0) as f64 / (1 << 20) as f64,
    }
}

fn main() {
    let mut args = Args::parse();
    args.reps = args.reps.max(1);
    for &w in &args.ranks {
        assert!(
            w > 0 && args.seq.is_multiple_of(2 * w),
            "--seq {} must be a multiple of 2 x {w} (zigzag chunks)",
            args.seq
        );
    }
    let links: Vec<LinkModel> = args
        .bandwidths_gbps
        .iter()
        .map(|&g| LinkModel::new(args.latency_us, g))
        .collect();
    println!(
        "cp-bench: causal attention forward + backward, B={} H={} S={} Dh={} fp32, zigzag; one \
         core per rank, compute = {}, links replayed; fastest of {} runs per compute segment",
        args.batch,
        args.heads,
        args.seq,
        args.head_dim,
        if thread_cpu_time().is_some() {
            "thread CPU time"
        } else {
            "wall time (no /proc/thread-self/schedstat)"
        },
        args.reps
    );
    // Measure every configuration first, then print one table per link.
    let mut results: Vec<(usize, CpAlgorithm, Vec<Row>)> = Vec::new();
    for &w in &args.ranks {
        let algorithms: &[CpAlgorithm] = if w == 1 {
            &[CpAlgorithm::Ring]
        } else {
            &[CpAlgorithm::Ring, CpAlgorithm::TokenRing]
        };
        for &algorithm in algorithms {
            let traces = fastest((0..args.reps).map(|_| measure(&args, w, algorithm)));
            let rows = links.iter().map(|&link| row(&traces, link)).collect();
            results.push((w, algorithm, rows));
        }
    }
    for (i, gbps) in args.bandwidths_gbps.iter().enumerate() {
        println!(
            "\nlink: {} us latency, {gbps} Gbit/s per direction per peer",
            args.latency_us
        );
        println!(
            "| cp | algorithm | step ms | vs cp=1 | compute ms | comm ms | exposed comm ms | \
             comm hidden | efficiency | MiB sent / rank | TokenRing / ring |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        let base = results[0].2[i].step;
        let mut ring_step = None;
        for (w, algorithm, rows) in &results {
            let r = rows[i];
            let hidden = if r.comm > 0.0 {
                format!("{:.0}%", 100.0 * (1.0 - r.exposed / r.comm).clamp(0.0, 1.0))
            } else {
                "-".into()
            };
            let (name, ratio) = match (*w, algorithm) {
                (1, _) => ("one rank", "-".to_string()),
                (_, CpAlgorithm::Ring) => {
                    ring_step = Some(r.step);
                    ("ring", "-".to_string())
                }
                (_, CpAlgorithm::TokenRing) => (
                    "token_ring",
                    ring_step.map_or("-".into(), |s| format!("{:.2}", r.step / s)),
                ),
            };
            println!(
                "| {w} | {name} | {:.1} | {:.2}x | {:.1} | {:.1} | {:.1} | {hidden} | {:.0}% | \
                 {:.1} | {ratio} |",
                r.step * 1e3,
                base / r.step,
                r.compute * 1e3,
                r.comm * 1e3,
                r.exposed * 1e3,
                100.0 * r.efficiency,
                r.mib_sent,
            );
        }
    }
}
