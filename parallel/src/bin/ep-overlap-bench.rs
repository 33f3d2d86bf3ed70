//! One training step (forward + backward) of an MoE model under expert parallelism with the
//! pipelined expert block at overlap degrees d = 1, 2, 4, 8 and `auto`: step time,
//! communication time, compute time and the overlap efficiency
//! `(step at d=1 - step at d) / min(communication, expert compute)`.
//!
//! ```sh
//! # ranks as threads over the local backend, with the link model (and with free links):
//! cargo run --release -p switchyard-parallel --bin ep-overlap-bench -- \
//!     [--ranks 4] [--gbps 1] [--latency-us 5] [--steps 8] [--warmup 6] \
//!     [--batch 4] [--seq 128] [--d-model 256] [--experts 8] [--expert-ffn 64] [--layers 2]
//! # the same under MPI (real transport, no link model):
//! cargo build --release -p switchyard-parallel --features mpi --bin ep-overlap-bench
//! mpirun -np 4 target/release/ep-overlap-bench --mpi
//! ```
//!
//! Definitions (all measured in the same run):
//! - step: wall time of forward + loss + backward between two barriers (the fastest of
//!   the steps: noise on a shared machine only adds time; every rank's step ends at the
//!   barrier, so it is the slowest rank's).
//! - comm: local backend: the step at d=1 with the link model minus the step at d=1 with
//!   free links (at d=1 nothing overlaps, so this is every transfer of the step). MPI: the
//!   block's time waiting for transfers at d=1 (slowest rank).
//! - expert compute: the block's grouped-GEMM time, forward and backward, at d=1 (slowest
//!   rank) — the work a transfer can hide behind.
//! - efficiency(d) = (step(1) - step(d)) / min(comm, expert compute): 1 = every
//!   hideable millisecond hidden.
//!
//! The link bandwidth is scaled to the CPU: a rank here computes about 10^4 times slower
//! than an H100, so the default 1 Gbit/s makes transfer and expert compute comparable, as
//! a 100-400 Gbit/s fabric does for fine-grained experts on GPUs (the regime where
//! overlap matters). The ranks share this machine's cores (4 ranks on 2 cores: compute is
//! contended in every configuration alike); the link model waits without spinning, so
//! transfers cost no CPU, as a NIC's DMA does not.
//!
//! Shape legend: B batch rows per rank, S sequence.

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Int, Tensor, TensorData};
use switchyard_comm::{Communicator, LinkModel, LocalWorld};
use switchyard_moe::config::CapacityConfig;
use switchyard_moe::{ModelConfig, MoeConfig, RouterConfig, Transformer, cross_entropy};
use switchyard_parallel::overlap::BlockTimes;
use switchyard_parallel::{AllToAllDispatcher, LossScale, Mesh, Overlap, parallelize};

#[derive(Clone, Debug)]
struct Args {
    ranks: usize,
    gbps: f64,
    latency_us: f64,
    steps: usize,
    warmup: usize,
    batch: usize,
    seq: usize,
    d_model: usize,
    experts: usize,
    expert_ffn: usize,
    layers: usize,
    mpi: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            ranks: 4,
            gbps: 1.0,
            latency_us: 5.0,
            steps: 8,
            warmup: 6,
            batch: 4,
            seq: 128,
            d_model: 256,
            experts: 8,
            expert_ffn: 64,
            layers: 2,
            mpi: false,
        }
    }
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--mpi" {
            a.mpi = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|e| format!("{flag} {v}: {e}"));
        let int = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--ranks" => a.ranks = int(&value)?,
            "--gbps" => a.gbps = num(&value)?,
            "--latency-us" => a.latency_us = num(&value)?,
            "--steps" => a.steps = int(&value)?,
            "--warmup" => a.warmup = int(&value)?,
            "--batch" => a.batch = int(&value)?,
            "--seq" => a.seq = int(&value)?,
            "--d-model" => a.d_model = int(&value)?,
            "--experts" => a.experts = int(&value)?,
            "--expert-ffn" => a.expert_ffn = int(&value)?,
            "--layers" => a.layers = int(&value)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
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
        moe: MoeConfig {
            every: 1,
            num_experts: a.experts,
            top_k: 2,
            expert_ffn_dim: a.expert_ffn,
            router: RouterConfig::TopKSoftmax {
                normalize_weights: true,
            },
            capacity: CapacityConfig::Dropless,
            shared_expert: None,
            load_balance_coef: 0.01,
            z_loss_coef: 0.001,
        },
    }
}

/// One rank's measured steps: (step seconds, block times of that step).
type Measured = Vec<(f64, BlockTimes)>;

fn rank_run(world: Box<dyn Communicator>, a: &Args, overlap: Overlap) -> Measured {
    let cfg = model_cfg(a);
    let rank = world.rank();
    let mesh = Mesh::new(world, 1, a.ranks, cfg.moe.num_experts)
        .expect("mesh")
        .with_ep_overlap(overlap);
    let device = Device::flex().autodiff();
    let mut model = parallelize(Transformer::new(&cfg, 7, &device), &mesh).expect("parallelize");
    // Our own handle on the dispatcher, to read the block's timers.
    let dispatcher = Arc::new(AllToAllDispatcher::new(&mesh));
    for block in &mut model.layers {
        if let Some(moe) = block.moe.take() {
            block.moe = Some(moe.with_dispatcher(dispatcher.clone()));
        }
    }
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
    let mut out = Vec::new();
    for step in 0..a.warmup + a.steps {
        world.barrier().expect("barrier");
        dispatcher.take_block_times();
        let started = Instant::now();
        let output = model.forward(batch(0));
        let loss = cross_entropy(output.logits.clone(), batch(1)) * scale.ce_weight()
            + output.aux_loss(&cfg, 0);
        drop(loss.backward());
        world.barrier().expect("barrier");
        let seconds = started.elapsed().as_secs_f64();
        if step >= a.warmup {
            out.push((seconds, dispatcher.take_block_times()));
        }
    }
    if rank == 0
        && let Overlap::Auto = overlap
    {
        eprintln!("  auto chose d = {:?}", dispatcher.auto_choice());
    }
    out
}

/// Runs every rank as a thread of a local world.
fn threads(a: &Args, link: Option<LinkModel>, overlap: Overlap) -> Vec<Measured> {
    let comms = LocalWorld::new(a.ranks, Duration::from_secs(600), link);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                std::thread::Builder::new()
                    .stack_size(64 << 20)
                    .spawn_scoped(s, move || rank_run(Box::new(c), a, overlap))
                    .expect("spawn rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank thread panicked"))
            .collect()
    })
}

/// Summary over steps and ranks: the fastest step (on a shared machine noise only ever
/// adds time), and the block's waiting and compute per step (slowest rank, mean over
/// steps), in milliseconds.
#[derive(Clone, Copy, Debug)]
struct Summary {
    step: f64,
    waiting: f64,
    compute: f64,
}

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

const DEGREES: [Overlap; 5] = [
    Overlap::Chunks(1),
    Overlap::Chunks(2),
    Overlap::Chunks(4),
    Overlap::Chunks(8),
    Overlap::Auto,
];

fn name(o: Overlap) -> String {
    match o {
        Overlap::Chunks(d) => d.to_string(),
        Overlap::Auto => "auto".into(),
    }
}

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
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ep-overlap-bench: {e}");
            std::process::exit(2);
        }
    };
    if a.mpi {
        mpi_main(&a);
        return;
    }
    let link = LinkModel::new(a.latency_us, a.gbps);
    println!(
        "ep={} ranks as threads, link {} Gbit/s + {} us per message; {} layers (all MoE), \
         d_model {}, {} experts top-2 (expert ffn {}), {} x {} tokens per rank; {} steps after \
         {} warm-up",
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
    let mut rows = Vec::new();
    for o in DEGREES {
        eprintln!("d = {} ...", name(o));
        let linked = summarize(&threads(&a, Some(link), o));
        let free = summarize(&threads(&a, None, o));
        rows.push((o, linked, Some(free)));
    }
    let (_, at1, free1) = rows[0];
    let comm = at1.step - free1.expect("measured").step;
    print_table(&rows, comm, at1.compute);
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
    let rank = world.rank();
    let mut rows = Vec::new();
    for o in DEGREES {
        let dup = world.split(0, rank as i32).expect("split");
        let mine = rank_run(dup, &a, o);
        // Every rank's measurements to rank 0.
        let flat: Vec<f64> = mine
            .iter()
            .flat_map(|(s, t)| {
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
