//! Expert-parallel step time under contiguous, heuristic and ILP placements, side by side,
//! on routing statistics recorded from a real run (`switchyard record-routing`).
//!
//! ```sh
//! cargo run --release -p switchyard-tools --bin placement-bench -- \
//!     --stats runs/placement/e64-l4-mild.json [--ranks 4,8] [--tokens 1024] \
//!     [--d-model 256] [--ffn 512] [--top-k 2] [--latency-us 5] [--bandwidth-gbps 100] \
//!     [--reps 3] [--time-limit 1]
//! ```
//!
//! # What is measured, and how it stays honest on a 2-core machine
//!
//! Placement changes two things in a MoE layer's step under the all-to-all dispatcher (tokens
//! go home after every layer): how many rows each ep rank's experts compute, and how many
//! bytes each rank receives. The benchmark times exactly those, per MoE layer and rank:
//! - **Expert compute, measured.** For each rank, its experts' rows (the layer's recorded
//!   token share of a global batch of `ranks x tokens` tokens, top-k assignments, split by the
//!   placement) go through the real grouped SwiGLU forward and backward (`kernels::grouped`,
//!   the layer's own kernel, autodiff included), one rank at a time inside a one-thread rayon
//!   pool, charged the thread's CPU time (`/proc/thread-self/schedstat`): emulated ranks never
//!   share a core, and other processes on the machine do not inflate it. Each configuration
//!   keeps its fastest of `--reps` repetitions, interleaved over the placements.
//! - **All-to-all, modelled** with the local backend's `LinkModel` (latency + bytes /
//!   bandwidth per message; a cluster-like 5 us, 100 Gb/s per rank by default): each rank
//!   holds `1/ranks` of every expert's tokens (routing does not depend on the home rank),
//!   sends each peer one message in each all-to-all, and its NIC sends and receives at full
//!   duplex; an all-to-all ends when the busiest rank is done. A layer's step has four
//!   (dispatch and combine, forward and backward).
//! - A layer is bulk-synchronous: `4 x all-to-all + max over ranks of expert compute`; the
//!   MoE step is the sum over layers.
//!
//! Not included (the same under every placement, so they only dilute the ratio): attention,
//! router, norms, embeddings and head, the dense and expert gradient all-reduce, and the
//! optimizer. The whole-step ratio is therefore closer to 1 than the MoE-step ratio printed.

use std::time::Instant;

use burn::tensor::{Device, Tensor};
use clap::Parser;
use switchyard_comm::LinkModel;
use switchyard_kernels::grouped::grouped_swiglu;
use switchyard_moe::experts::SwiGlu;
use switchyard_moe::init::Initializer;
use switchyard_placement::{RoutingStats, Strategy, Topology, plan};

/// Expert-parallel MoE step time under contiguous, heuristic and ILP placements, side by
/// side, on recorded routing statistics: expert compute measured per rank (one core, CPU
/// time), all-to-alls modelled with the link model.
#[derive(Parser)]
#[command(name = "placement-bench")]
struct Args {
    /// Routing statistics (JSON, from `switchyard record-routing`).
    #[arg(long)]
    stats: String,
    /// Expert-parallel rank counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4,8")]
    ranks: Vec<usize>,
    /// Tokens per rank (the global batch is ranks x tokens).
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    /// Model width (expert input and output).
    #[arg(long, default_value_t = 256)]
    d_model: usize,
    /// Hidden width of each expert's SwiGLU.
    #[arg(long, default_value_t = 512)]
    ffn: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Link latency per message, microseconds.
    #[arg(long, default_value_t = 5.0)]
    latency_us: f64,
    /// Link bandwidth per rank, Gbit/s.
    #[arg(long, default_value_t = 100.0)]
    bandwidth_gbps: f64,
    /// Repetitions (at least 1), interleaved over the placements; each configuration keeps
    /// its fastest.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// ILP wall-clock budget, seconds.
    #[arg(long, default_value_t = 1.0)]
    time_limit: f64,
}

/// Seconds of CPU time of the calling thread (Linux), else wall time since `origin`.
fn cpu_clock(origin: Instant) -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(|ns| ns as f64 * 1e-9)
        .unwrap_or_else(|| origin.elapsed().as_secs_f64())
}

/// Rows per expert of one layer for a global batch: the recorded share of `assignments`
/// (largest remainders, so the rows add up exactly).
fn rows_per_expert(tokens: &[f64], assignments: usize) -> Vec<usize> {
    let total: f64 = tokens.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let exact: Vec<f64> = tokens
        .iter()
        .map(|t| t / total * assignments as f64)
        .collect();
    let mut rows: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let missing = assignments - rows.iter().sum::<usize>();
    for &e in order.iter().take(missing) {
        rows[e] += 1;
    }
    rows
}

/// CPU seconds of one rank's expert forward + backward on `rows` (one count per local
/// expert), on the calling thread.
fn expert_step(experts: &[SwiGlu], rows: &[usize], d: usize, device: &Device) -> f64 {
    let total: usize = rows.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let x = Tensor::<2>::ones([total, d], device).require_grad();
    let refs: Vec<&SwiGlu> = experts.iter().collect();
    let origin = Instant::now();
    let start = cpu_clock(origin);
    let y = grouped_swiglu(x, &refs, rows);
    let grads = y.sum().backward();
    drop(grads);
    cpu_clock(origin) - start
}

/// The busiest rank's time for one all-to-all in which rank `s` sends `sent[s][r]` rows to
/// `r`: one message per peer, send and receive at full duplex.
fn all_to_all(link: &LinkModel, sent: &[Vec<usize>], row_bytes: usize) -> f64 {
    let n = sent.len();
    (0..n)
        .map(|me| {
            let out: usize = (0..n).filter(|&r| r != me).map(|r| sent[me][r]).sum();
            let inn: usize = (0..n).filter(|&s| s != me).map(|s| sent[s][me]).sum();
            let send = link.cost(n - 1, out * row_bytes).as_secs_f64();
            let recv = link.cost(n - 1, inn * row_bytes).as_secs_f64();
            send.max(recv)
        })
        .fold(0.0, f64::max)
}

struct Measured {
    name: String,
    load: f64,
    cross: f64,
    solve_s: f64,
    compute_s: Vec<Vec<f64>>,
    a2a_s: f64,
    owners: Vec<Vec<usize>>,
}

fn main() {
    let mut args = Args::parse();
    args.reps = args.reps.max(1);
    let stats = RoutingStats::load(std::path::Path::new(&args.stats)).unwrap_or_else(|e| {
        eprintln!("placement-bench: {e}");
        std::process::exit(2);
    });
    let device = Device::flex().autodiff();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool");
    let link = LinkModel::new(args.latency_us, args.bandwidth_gbps);
    let row_bytes = args.d_model * 4;
    println!(
        "routing statistics {} ({} MoE layers x {} experts, {} steps recorded)",
        args.stats,
        stats.moe_layers.len(),
        stats.num_experts,
        stats.records
    );
    println!(
        "per rank {} tokens x top-{}, experts {} -> {} -> {}, links {} us + {} Gb/s, best of {}",
        args.tokens,
        args.top_k,
        args.d_model,
        args.ffn,
        args.d_model,
        args.latency_us,
        args.bandwidth_gbps,
        args.reps
    );
    for &ranks in &args.ranks {
        let instance = match stats.instance(Topology::uniform(ranks)) {
            Ok(i) => i,
            Err(e) => {
                println!("\n{ranks} ranks: skipped ({e})");
                continue;
            }
        };
        let strategies = [
            Strategy::Contiguous {},
            Strategy::Heuristic {},
            Strategy::Ilp {
                time_limit_s: args.time_limit,
                mip_gap: 0.01,
                solver: Default::default(),
            },
        ];
        let mut results: Vec<Measured> = Vec::new();
        for s in &strategies {
            let started = Instant::now();
            let p = plan(&instance, s).expect("planning a valid instance");
            results.push(Measured {
                name: s.name().into(),
                load: p.metrics.mean_load_max_over_mean,
                cross: p.metrics.cross_rank_fraction,
                solve_s: started.elapsed().as_secs_f64(),
                compute_s: vec![vec![f64::INFINITY; ranks]; stats.moe_layers.len()],
                a2a_s: 0.0,
                owners: p.owners,
            });
        }
        let per_rank = stats.num_experts / ranks;
        let mut init = Initializer::new(1, 0.02, &device);
        let experts: Vec<SwiGlu> = (0..per_rank)
            .map(|_| SwiGlu::new(args.d_model, args.ffn, &mut init))
            .collect();
        let assignments = ranks * args.tokens * args.top_k;
        let rows: Vec<Vec<usize>> = stats
            .tokens
            .iter()
            .map(|t| rows_per_expert(t, assignments))
            .collect();
        for _ in 0..args.reps {
            for m in results.iter_mut() {
                for (l, owners) in m.owners.iter().enumerate() {
                    for r in 0..ranks {
                        let mine: Vec<usize> = (0..stats.num_experts)
                            .filter(|&e| owners[e] == r)
                            .map(|e| rows[l][e])
                            .collect();
                        let t =
                            pool.install(|| expert_step(&experts, &mine, args.d_model, &device));
                        m.compute_s[l][r] = m.compute_s[l][r].min(t);
                    }
                }
            }
        }
        for m in results.iter_mut() {
            m.a2a_s = m
                .owners
                .iter()
                .enumerate()
                .map(|(l, owners)| {
                    // Rows for rank r's experts, a 1/ranks share from every home rank.
                    let load: Vec<usize> = (0..ranks)
                        .map(|r| {
                            (0..stats.num_experts)
                                .filter(|&e| owners[e] == r)
                                .map(|e| rows[l][e])
                                .sum()
                        })
                        .collect();
                    let sent: Vec<Vec<usize>> = (0..ranks)
                        .map(|_| load.iter().map(|&n| n.div_ceil(ranks)).collect())
                        .collect();
                    4.0 * all_to_all(&link, &sent, row_bytes)
                })
                .sum();
        }
        println!(
            "\n{ranks} ranks, {} experts x {} MoE layers ({} per rank):",
            stats.num_experts,
            stats.moe_layers.len(),
            per_rank
        );
        println!(
            "{:<11} {:>9} {:>10} {:>9} {:>11} {:>10} {:>10} {:>10} {:>8}",
            "placement",
            "load m/m",
            "cross-rank",
            "solve s",
            "compute ms",
            "a2a ms",
            "step ms",
            "ratio",
            "lower %"
        );
        let step = |m: &Measured| -> (f64, f64) {
            let compute: f64 = m
                .compute_s
                .iter()
                .map(|per| per.iter().cloned().fold(0.0, f64::max))
                .sum();
            (compute, compute + m.a2a_s)
        };
        let (_, base) = step(&results[0]);
        for m in &results {
            let (compute, total) = step(m);
            println!(
                "{:<11} {:>9.4} {:>10.4} {:>9.3} {:>11.2} {:>10.2} {:>10.2} {:>10.4} {:>8.1}",
                m.name,
                m.load,
                m.cross,
                m.solve_s,
                compute * 1e3,
                m.a2a_s * 1e3,
                total * 1e3,
                total / base,
                (1.0 - total / base) * 100.0
            );
        }
    }
}
