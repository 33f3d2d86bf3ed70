//! One training step (forward + backward) of an MoE model under expert parallelism with the
//! pipelined expert block at overlap degrees d = 1, 2, 4, 8, 16 and `auto`: step time,
//! communication time, compute time and the overlap efficiency
//! `(step at d=1 - step at d) / min(communication, expert compute)`.
//!
//! ```sh
//! # ranks as threads over the local backend, with the link model (and with free links):
//! cargo run --release -p switchyard-tools --bin ep-overlap-bench -- \
//!     [--ranks 4] [--gbps 1] [--latency-us 5] [--steps 10] [--warmup 2] \
//!     [--batch 4] [--seq 128] [--d-model 256] [--experts 8] [--expert-ffn 512] [--layers 2]
//! # the same under MPI (real transport, no link model):
//! cargo build --release -p switchyard-tools --features mpi --bin ep-overlap-bench
//! mpirun -np 4 target/release/ep-overlap-bench --mpi
//! ```
//!
//! Threads mode (the default) records and replays, as `cp-bench` and `placement-step-bench`
//! do (details in `switchyard_tools::trace`): with 4 ranks on 2 shared cores a wall-clock
//! step measures the oversubscribed machine, not the schedule. Each rank computes on one core
//! (one-thread pool, one rank at a time, charged its thread's CPU time); its trace of
//! compute, collective posts and waits is replayed on virtual clocks with the link model, and
//! again with free links. The degrees run interleaved in one world (every round one step of each, one
//! dispatcher per degree swapped into the model), so load on the machine hits them alike.
//! `auto`'s wall-clock trials would time the oversubscribed machine here, so its rule is
//! applied to replayed times: the first two recorded rounds are its trials (each candidate's
//! fastest), and the chosen degree's later rounds are its row. Definitions (all from the
//! same run):
//! - step: forward + loss + backward, the slowest rank's replayed end; each measured step
//!   is replayed on its own and the median over the rounds is reported (every column).
//! - exposed comm: step with the link minus step with free links.
//! - communication: the exposed comm at d=1 (nothing overlaps there).
//! - expert compute: the block's grouped-GEMM time, forward and backward (slowest rank).
//! - efficiency(d) = (step(1) - step(d)) / min(communication, expert compute at d=1), the
//!   issue's definition. Chunking also changes the compute itself (smaller GEMMs, cache
//!   effects: the free-link column), which this definition counts too; the exposed-comm
//!   column isolates the overlap.
//!
//! MPI mode: the runtime's own `auto` (wall-clock trials over the ep ranks); wall-clock
//! steps (fastest of the rounds); communication = the block's waiting at d=1 (slowest
//! rank), which on one machine is mostly waiting for slower ranks.
//!
//! The link bandwidth is scaled to the CPU: a rank here computes about 10^4 times slower
//! than an H100, so the default 1 Gbit/s makes transfer and expert compute comparable, as
//! a 100-400 Gbit/s fabric does for fine-grained experts on GPUs (the regime where
//! overlap matters). The default experts are bench-small's (d_model 256 -> 512 -> 256);
//! with `--expert-ffn 256` the forward block is link-bound (its expert compute is smaller
//! than its two transfers), so it cannot hide all of its communication at any d.
//!
//! Shape legend: B batch rows per rank, S sequence.

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::Parser;
use switchyard_comm::{Communicator, LinkModel, LocalWorld};
use switchyard_moe::config::CapacityConfig;
use switchyard_moe::{ModelConfig, MoeConfig, RouterConfig, Transformer, cross_entropy};
use switchyard_parallel::overlap::{AUTO_CANDIDATES, AUTO_TRIALS, BlockTimes};
use switchyard_parallel::{
    AllToAllDispatcher, CpConfig, ExpertPlacement, LossScale, Mesh, Overlap, apply_layout,
};
use switchyard_tools::trace::{Event, Recorder, replay, run_ranks};

/// One MoE training step (forward + backward) under expert parallelism at overlap degrees
/// d = 1, 2, 4, 8, 16 and `auto`: step time, communication, expert compute and overlap
/// efficiency. By default the ranks are threads, each computing on one core, and their traces
/// are replayed with the link model (and with free links); `--mpi` runs under mpirun on the
/// wall clock.
#[derive(Parser, Clone, Debug)]
#[command(name = "ep-overlap-bench")]
struct Args {
    /// Expert-parallel ranks (threads mode; under `--mpi` the world size counts).
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    /// Link bandwidth, Gbit/s (threads mode).
    #[arg(long, default_value_t = 1.0)]
    gbps: f64,
    /// Link latency per message, microseconds (threads mode).
    #[arg(long, default_value_t = 5.0)]
    latency_us: f64,
    /// Measured steps of every degree (threads mode: after `auto`'s trial rounds).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Unmeasured warm-up rounds (under `--mpi` at least enough for `auto`'s trials).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Sequences per rank (B).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence (S).
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Model width.
    #[arg(long, default_value_t = 256)]
    d_model: usize,
    /// Experts per MoE layer (top-2 routing).
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Hidden width of each expert's SwiGLU.
    #[arg(long, default_value_t = 512)]
    expert_ffn: usize,
    /// Transformer layers (every one MoE).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Run under mpirun (real transport, wall clock, the runtime's own `auto`); needs the
    /// `mpi` feature.
    #[arg(long)]
    mpi: bool,
}

fn model_cfg(a: &Args) -> ModelConfig {
    ModelConfig {
        vocab_size: 256,
        d_model: a.d_model,
        n_heads: 4,
        n_layers: a.layers,
        ffn_dim: 4 * a.d_model,
        max_seq_len: a.seq,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        init_std: 0.02,
        attention: Default::default(),
        moe: MoeConfig {
            every: 1,
            num_experts: a.experts,
            top_k: 2,
            expert_ffn_dim: a.expert_ffn,
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

/// One rank's measured steps: (step seconds, block times of that step, recorded trace).
type Measured = Vec<(f64, BlockTimes, Vec<Event>)>;

/// Runs `a.warmup` warm-up rounds and `rounds` measured ones on this rank: every round runs
/// one step with each overlap degree of `degrees` in turn (one dispatcher per degree, swapped into the
/// model), so load changes on the machine hit every degree alike. With `rec`, records each
/// measured step's trace (the world must be wrapped in a `RecordingComm` on that recorder).
/// Returns one `Measured` per degree.
fn rank_run(
    world: Box<dyn Communicator>,
    a: &Args,
    degrees: &[Overlap],
    rounds: usize,
    rec: Option<&Recorder>,
) -> Vec<Measured> {
    let cfg = model_cfg(a);
    let rank = world.rank();
    let mesh = Mesh::new(world, 1, a.ranks, cfg.moe.num_experts).expect("mesh");
    let device = Device::flex().autodiff();
    let placement = ExpertPlacement::contiguous(cfg.moe.num_experts, a.ranks).expect("placement");
    let mut model = apply_layout(
        Transformer::new(&cfg, 7, &device),
        &mesh,
        &placement,
        &CpConfig::default(),
    )
    .expect("parallelize");
    // Our own handles on the dispatchers, to read the block's timers.
    let dispatchers: Vec<Arc<AllToAllDispatcher>> = degrees
        .iter()
        .map(|&o| {
            Arc::new(AllToAllDispatcher::new(
                &mesh.clone().with_ep_overlap(o),
                0,
                placement.of(0).clone(),
            ))
        })
        .collect();
    // Every rank its own tokens (a fixed pseudo-random stream).
    let mut state = 0x9e37_79b9_u64 ^ (rank as u64 * 0x1234_5678_9abc);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % cfg.vocab_size as u64) as i64
    };
    let (b, s) = (a.batch, a.seq);
    let tokens: Vec<i64> = (0..b * (s + 1)).map(|_| next()).collect();
    let batch = |offset: usize| {
        let v: Vec<i64> = (0..b)
            .flat_map(|r| tokens[r * (s + 1) + offset..r * (s + 1) + offset + s].to_vec())
            .collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, [b, s]), &device)
    };
    let scale = LossScale::new(&mesh, b * s).expect("loss scale");
    let world = mesh.world().clone();
    let mut out: Vec<Measured> = vec![Vec::new(); degrees.len()];
    for round in 0..a.warmup + rounds {
        for (k, dispatcher) in dispatchers.iter().enumerate() {
            for block in &mut model.layers {
                if let Some(moe) = block.moe.take() {
                    block.moe = Some(moe.with_dispatcher(dispatcher.clone()));
                }
            }
            world.barrier().expect("barrier");
            dispatcher.take_block_times();
            let recording = rec.filter(|_| round >= a.warmup);
            if let Some(r) = recording {
                r.start();
            }
            let started = Instant::now();
            let output = model.forward(batch(0));
            let loss = cross_entropy(output.logits.clone(), batch(1)) * scale.ce_weight()
                + output.aux_loss(&cfg, 0);
            drop(loss.backward());
            let events = recording.map(Recorder::stop).unwrap_or_default();
            world.barrier().expect("barrier");
            let seconds = started.elapsed().as_secs_f64();
            if round >= a.warmup {
                out[k].push((seconds, dispatcher.take_block_times(), events));
            }
        }
    }
    if rank == 0
        && let Some(k) = degrees.iter().position(|&o| o == Overlap::Auto)
    {
        eprintln!("  auto chose d = {:?}", dispatchers[k].auto_choice());
    }
    out
}

/// Runs every rank as a thread of a local world (one core each, `trace::run_ranks`),
/// recording `rounds` rounds of every degree of `THREAD_DEGREES`; per degree, per rank.
fn threads(a: &Args, rounds: usize) -> Vec<Vec<Measured>> {
    let comms = LocalWorld::new(a.ranks, Duration::from_secs(600), None);
    let per_rank = run_ranks(comms, |world, rec| {
        rank_run(world, a, &THREAD_DEGREES, rounds, Some(&rec))
    });
    (0..THREAD_DEGREES.len())
        .map(|k| per_rank.iter().map(|r| r[k].clone()).collect())
        .collect()
}

/// Replayed step times (ms, from the combined traces) with the link and with free links, the
/// largest link cost of any rank and the block's expert compute per step (ms, slowest rank).
#[derive(Clone, Copy, Debug)]
struct Replayed {
    step: f64,
    free: f64,
    link_cost: f64,
    compute: f64,
}

/// Each measured step replayed on its own (with the link, and with free links); the medians
/// over the steps. (Combining the steps' fastest compute segments instead favours the
/// larger chunk counts: more, shorter segments each keep their luckiest measurement.)
fn replay_all(per_rank: &[Measured], link: LinkModel) -> Replayed {
    let steps = per_rank[0].len();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    let traces =
        |i: usize| -> Vec<Vec<Event>> { per_rank.iter().map(|r| r[i].2.clone()).collect() };
    let linked: Vec<(f64, f64)> = (0..steps)
        .map(|i| {
            let r = replay(&traces(i), Some(link));
            (r.step(), r.max_comm())
        })
        .collect();
    Replayed {
        step: median(linked.iter().map(|l| l.0).collect()),
        free: median(
            (0..steps)
                .map(|i| replay(&traces(i), None).step())
                .collect(),
        ),
        link_cost: median(linked.iter().map(|l| l.1).collect()),
        // The block's expert compute: the slowest rank's, per step.
        compute: median(
            (0..steps)
                .map(|i| {
                    per_rank
                        .iter()
                        .map(|r| r[i].1.compute.as_secs_f64())
                        .fold(0.0, f64::max)
                })
                .collect(),
        ),
    }
}

/// Summary over steps and ranks (MPI mode): the fastest step (on a shared machine noise only ever
/// adds time), and the block's waiting and compute per step (slowest rank, mean over
/// steps), in milliseconds.
#[cfg(feature = "mpi")]
#[derive(Clone, Copy, Debug)]
struct Summary {
    step: f64,
    waiting: f64,
    compute: f64,
}

#[cfg(feature = "mpi")]
fn summarize(per_rank: &[Measured]) -> Summary {
    let steps = per_rank[0].len();
    let mut step: Vec<f64> = (0..steps)
        .map(|i| per_rank.iter().map(|r| r[i].0).fold(0.0, f64::max))
        .collect();
    step.sort_by(f64::total_cmp);
    let per_step_max = |f: fn(&BlockTimes) -> Duration| {
        (0..steps)
            .map(|i| {
                per_rank
                    .iter()
                    .map(|r| f(&r[i].1).as_secs_f64())
                    .fold(0.0, f64::max)
            })
            .sum::<f64>()
            / steps as f64
    };
    Summary {
        step: step[0] * 1e3,
        waiting: per_step_max(|t| t.waiting()) * 1e3,
        compute: per_step_max(|t| t.compute) * 1e3,
    }
}

/// Under MPI: the fixed degrees and the runtime's `auto` (wall-clock trials, one rank per
/// process).
#[cfg(feature = "mpi")]
const MPI_DEGREES: [Overlap; 5] = [
    Overlap::Chunks(1),
    Overlap::Chunks(2),
    Overlap::Chunks(4),
    Overlap::Chunks(8),
    Overlap::Auto,
];

/// In threads mode `auto`'s wall-clock trials would time 4 ranks oversubscribing 2 cores, so
/// its rule is applied to the replayed times instead: every candidate is measured, the first
/// `AUTO_TRIALS` recorded rounds are the trials (fastest trial wins, as at run time), and the
/// chosen degree's later rounds are reported.
const THREAD_DEGREES: [Overlap; 5] = [
    Overlap::Chunks(AUTO_CANDIDATES[0]),
    Overlap::Chunks(AUTO_CANDIDATES[1]),
    Overlap::Chunks(AUTO_CANDIDATES[2]),
    Overlap::Chunks(AUTO_CANDIDATES[3]),
    Overlap::Chunks(AUTO_CANDIDATES[4]),
];

fn name(o: Overlap) -> String {
    match o {
        Overlap::Chunks(d) => d.to_string(),
        Overlap::Auto => "auto".into(),
    }
}

#[cfg(feature = "mpi")]
fn print_table(rows: &[(Overlap, Summary, Option<Summary>)], comm: f64, compute: f64) {
    let base = rows[0].1.step;
    let hideable = comm.min(compute);
    println!(
        "communication {comm:.1} ms, expert compute {compute:.1} ms per step (at d=1) -> \
         hideable min = {hideable:.1} ms"
    );
    println!(
        "| d | step ms | free-link step ms | block waiting ms | block expert compute ms | \
         saved vs d=1 ms | efficiency |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (o, s, free) in rows {
        let saved = base - s.step;
        println!(
            "| {} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.2} |",
            name(*o),
            s.step,
            free.map_or("-".into(), |f| format!("{:.1}", f.step)),
            s.waiting,
            s.compute,
            saved,
            saved / hideable
        );
    }
}

fn main() {
    let a = Args::parse();
    if a.mpi {
        mpi_main(&a);
        return;
    }
    let link = LinkModel::new(a.latency_us, a.gbps);
    println!(
        "ep={} ranks as threads, recorded (one core each, CPU time) and replayed with a link \
         of {} Gbit/s + {} us per message; {} layers (all MoE), d_model {}, {} experts top-2 \
         (expert ffn {}), {} x {} tokens per rank; median of {} steps after {} warm-up",
        a.ranks,
        a.gbps,
        a.latency_us,
        a.layers,
        a.d_model,
        a.experts,
        a.expert_ffn,
        a.batch,
        a.seq,
        a.steps,
        a.warmup
    );
    eprintln!("measuring every degree, interleaved ...");
    let measured = threads(&a, AUTO_TRIALS + a.steps);
    let (trials, reported): (Vec<Vec<Measured>>, Vec<Vec<Measured>>) = measured
        .into_iter()
        .map(|per_rank| {
            let split = |r: &Measured, range: std::ops::Range<usize>| r[range].to_vec();
            let total = AUTO_TRIALS + a.steps;
            (
                per_rank.iter().map(|r| split(r, 0..AUTO_TRIALS)).collect(),
                per_rank
                    .iter()
                    .map(|r| split(r, AUTO_TRIALS..total))
                    .collect(),
            )
        })
        .unzip();
    // `auto`'s rule on the trial rounds: each candidate's fastest trial (slowest rank).
    let trial_ms: Vec<f64> = trials
        .iter()
        .map(|per_rank| {
            (0..AUTO_TRIALS)
                .map(|i| {
                    let traces: Vec<Vec<Event>> = per_rank.iter().map(|r| r[i].2.clone()).collect();
                    replay(&traces, Some(link)).step()
                })
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    let chosen = (0..trial_ms.len())
        .min_by(|&i, &j| trial_ms[i].total_cmp(&trial_ms[j]))
        .expect("candidates");
    eprintln!(
        "  auto's trials (ms, fastest of {AUTO_TRIALS}): {}; chose d = {}",
        THREAD_DEGREES
            .iter()
            .zip(&trial_ms)
            .map(|(o, t)| format!("{}: {:.1}", name(*o), t * 1e3))
            .collect::<Vec<_>>()
            .join(", "),
        name(THREAD_DEGREES[chosen])
    );
    let mut rows: Vec<(String, Replayed)> = THREAD_DEGREES
        .iter()
        .zip(&reported)
        .map(|(&o, m)| (name(o), replay_all(m, link)))
        .collect();
    let auto = rows[chosen].1;
    rows.push((format!("auto (d={})", name(THREAD_DEGREES[chosen])), auto));
    let at1 = rows[0].1;
    let comm = at1.step - at1.free;
    let hideable = comm.min(at1.compute);
    println!(
        "communication {comm:.1} ms (step at d=1 with the link minus with free links), expert \
         compute {:.1} ms per step (at d=1) -> hideable min = {hideable:.1} ms",
        at1.compute
    );
    println!(
        "| d | step ms | free-link step ms | exposed comm ms | link cost ms | expert compute ms | \
         saved vs d=1 ms | efficiency |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (o, r) in &rows {
        let saved = at1.step - r.step;
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            o,
            r.step,
            r.free,
            r.step - r.free,
            r.link_cost,
            r.compute,
            saved,
            saved / hideable
        );
    }
}

#[cfg(feature = "mpi")]
fn mpi_main(a: &Args) {
    use switchyard_comm::mpi::{MpiEnv, MpiOptions};
    let (env, world) = MpiEnv::init(MpiOptions {
        timeout: Duration::from_secs(600),
        ..MpiOptions::default()
    })
    .unwrap_or_else(|e| {
        eprintln!("ep-overlap-bench: {e}");
        std::process::exit(2)
    });
    let mut a = a.clone();
    a.ranks = world.size();
    // `auto` times every candidate on its first forward calls (one per MoE layer per step):
    // keep those in the warm-up.
    let trial_calls = AUTO_CANDIDATES.len() * AUTO_TRIALS;
    a.warmup = a.warmup.max(trial_calls.div_ceil(a.layers.max(1)));
    let rank = world.rank();
    let dup = world.split(0, rank as i32).expect("split");
    let measured = rank_run(dup, &a, &MPI_DEGREES, a.steps, None);
    let mut rows = Vec::new();
    for (&o, mine) in MPI_DEGREES.iter().zip(&measured) {
        // Every rank's measurements to rank 0.
        let flat: Vec<f64> = mine
            .iter()
            .flat_map(|(s, t, _)| {
                [
                    *s,
                    t.wait_dispatch.as_secs_f64(),
                    t.wait_return.as_secs_f64(),
                    t.compute.as_secs_f64(),
                ]
            })
            .collect();
        let n = flat.len();
        let all = world
            .all_gather_v(&switchyard_comm::Buffer::F64(flat), &vec![n; a.ranks])
            .expect("gather")
            .into_vec::<f64>()
            .expect("f64");
        let per_rank: Vec<Measured> = all
            .chunks(n)
            .map(|r| {
                r.chunks(4)
                    .map(|v| {
                        (
                            v[0],
                            BlockTimes {
                                wait_dispatch: Duration::from_secs_f64(v[1]),
                                wait_return: Duration::from_secs_f64(v[2]),
                                compute: Duration::from_secs_f64(v[3]),
                            },
                            Vec::new(),
                        )
                    })
                    .collect()
            })
            .collect();
        rows.push((o, summarize(&per_rank), None));
    }
    if rank == 0 {
        println!(
            "ep={} MPI ranks (real transport), {} layers, d_model {}, {} experts top-2 (expert \
             ffn {}), {} x {} tokens per rank",
            a.ranks, a.layers, a.d_model, a.experts, a.expert_ffn, a.batch, a.seq
        );
        let (_, at1, _) = rows[0];
        print_table(&rows, at1.waiting, at1.compute);
    }
    drop(world);
    drop(env);
}

#[cfg(not(feature = "mpi"))]
fn mpi_main(_: &Args) {
    eprintln!("ep-overlap-bench: --mpi needs the `mpi` feature (cargo build --features mpi)");
    std::process::exit(2);
}
